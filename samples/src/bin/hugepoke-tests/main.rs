//! The in-guest integration tests: run inside a virtme-ng guest with
//! hugepoke.ko loaded (scripts/guest), observe the real kernel, print TAP.
//!
//!   hugepoke-tests [--no-reload | --only-reload] [--list] [FILTER]
//!
//! runs (or with --list names, one a line) the tests whose name contains
//! FILTER; --no-reload leaves out the tests that reload the module, so that
//! the module's counters can be checked before a reload resets them, and
//! --only-reload runs just those.
//!   hugepoke-tests --helper …  what a test runs in another process (helper.rs)

type TestResult = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// One in-guest test: the function's name, the function, and whether it
/// unloads and reloads the module (`--no-reload` leaves those out,
/// `--only-reload` runs just those).
struct Test {
    name: &'static str,
    run: fn() -> TestResult,
    reloads: bool,
}

/// `tests! { GROUP: [test_fn, #[reloads] other_fn, …]; … }` at the end of
/// a test module: a `pub(crate) const GROUP: &[Test]` for each group of
/// its tests, each named by `stringify!`; [`SUITE`] orders the groups.
macro_rules! tests {
    (@reloads reloads) => {
        true
    };
    (@reloads) => {
        false
    };
    ($($group:ident: [$($(#[$reloads:ident])? $name:ident),* $(,)?];)+) => {
        $(
            pub(crate) const $group: &[crate::Test] = &[$(crate::Test {
                name: stringify!($name),
                run: $name,
                reloads: tests!(@reloads $($reloads)?),
            }),*];
        )+
    };
}

mod authority;
mod batch;
mod batch_core;
mod cli;
mod common;
mod file_scope;
mod filesystems;
mod foreign;
mod foundation;
mod hardening;
mod helper;
mod identity;
mod map;
mod mechanism;
mod races;
mod real_programs;
mod trace_events;
mod uffd;
mod visibility;

/// Every in-guest test in the order they run, and `--list` names them:
/// the modules' groups (each module's `tests!`), each step tested after
/// what it builds on, the tests that reload the module last.
const SUITE: &[&[Test]] = &[
    foundation::TESTS,
    mechanism::ONE_PAGE,
    trace_events::TESTS,
    mechanism::COLLAPSE,
    map::TESTS,
    mechanism::EXPECT,
    batch_core::TESTS,
    mechanism::OVERLAP_AND_CLOSE,
    batch::TESTS,
    mechanism::CLI_HOLD,
    hardening::TESTS,
    uffd::TESTS,
    identity::TESTS,
    authority::TESTS,
    uffd::WP_AND_MISSING,
    identity::KILLED_RESTORE,
    hardening::RMMOD,
    races::TESTS,
    cli::TESTS,
    races::WORKERS,
    visibility::TESTS,
    filesystems::TESTS,
    foreign::TESTS,
    file_scope::TESTS,
    real_programs::TESTS,
    hardening::RELOADING,
    identity::RELOADING,
];

/// Tests the debug flavour (the one with kmemleak) leaves to the base
/// one, for the warm `make check` to stay within its 12 minutes: most of
/// their time there is a real program's own start, or its copy, under
/// KASAN and TCG, and the module paths they reach run in the debug flavour
/// through other tests.  bpftrace's start takes a minute and a half there
/// (what it tests, bpftrace on our events, is the same in both); gdb's
/// start about 40 s (COLLAPSE of a ptrace writer's copies: as of a
/// `/proc/PID/mem` writer's,
/// `collapse_drops_a_mem_writers_copies_and_gives_the_pmd_back`).
/// python3 and libz3 (30 MB) take 24 s to read over 9p there (2.5 s in the
/// base guest), and the seven python3 tests 79 s in all: their module
/// paths are the synthetic targets' on tmpfs, ext4 and XFS
/// (`full_cycle_on_*`), PATCH_FILE over several processes
/// (`patch_file_reaches_every_process_and_restore_takes_it_back`), threads
/// running the text on another CPU
/// (`spinner_sees_each_patch_and_restore_whole_and_at_once`) and COLLAPSE
/// (`collapse_*` in foreign.rs).
const BASE_ONLY: &[&str] = &[
    "bpftrace_counts_steps_per_pid_and_times_patch",
    "collapse_after_gdb_set_and_removed_a_breakpoint",
    "killed_restore_waiting_for_the_mmap_lock_keeps_the_patch",
    "real_python3_library_function_by_symbol",
    "real_python3_library_function_by_symbol_on_ext4",
    "real_python3_library_function_by_symbol_on_xfs",
    "real_python3_own_function_in_text_no_pmd_can_map",
    "real_python3_library_patched_by_file_in_two_processes",
    "real_python3_threads_on_both_cpus_while_patched_and_restored",
    "real_python3_sites_by_symbol_in_two_objects",
    "collapse_pid_makes_a_real_programs_text_huge",
];

/// The tests of [`SUITE`], in order (in the debug flavour, not [`BASE_ONLY`]).
fn all_tests() -> impl Iterator<Item = &'static Test> {
    let debug = std::path::Path::new("/sys/kernel/debug/kmemleak").exists();
    SUITE
        .iter()
        .flat_map(|group| group.iter())
        .filter(move |t| !(debug && BASE_ONLY.contains(&t.name)))
}

/// A test that takes longer than this is reported as failed, and the run
/// stops there (its thread cannot be killed): one hang must not stall the guest.
const TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// How one test ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    Passed,
    Skipped(String),
    Failed(String),
    /// The test panicked: the panic's message.
    Panicked(String),
    /// Still running after the limit (its thread cannot be killed).
    TimedOut,
}

/// Run `test` on its own thread, at most `limit`.
fn run_one(test: fn() -> TestResult, limit: std::time::Duration) -> Outcome {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = std::panic::catch_unwind(test).map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into())
        });
        let _ = tx.send(result);
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(Ok(()))) => Outcome::Passed,
        Ok(Ok(Err(why))) => match why.strip_prefix("SKIP: ") {
            Some(why) => Outcome::Skipped(why.to_string()),
            None => Outcome::Failed(why),
        },
        Ok(Err(message)) => Outcome::Panicked(message),
        Err(_) => Outcome::TimedOut,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--helper") {
        // Before any thread exists: the helper forks and changes credentials.
        helper::main(&args[2..]);
    }
    let args: Vec<String> = args[1..].to_vec();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let filter = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_default();
    let selected: Vec<&Test> = all_tests()
        .filter(|t| t.name.contains(&filter))
        .filter(|t| match (flag("--no-reload"), flag("--only-reload")) {
            (true, _) => !t.reloads,
            (_, true) => t.reloads,
            _ => true,
        })
        .collect();
    if flag("--list") {
        selected.iter().for_each(|t| println!("{}", t.name));
        return;
    }
    println!("1..{}", selected.len());
    let mut failed = 0;
    for (i, test) in selected.iter().enumerate() {
        let name = test.name;
        let started = std::time::Instant::now();
        let outcome = run_one(test.run, TEST_TIMEOUT);
        // Where the guest's time goes (a diagnostic, never a verdict).
        let took = || println!("# {name} took {:.1} s", started.elapsed().as_secs_f64());
        let why = match outcome {
            Outcome::Passed => {
                println!("ok {} - {name}", i + 1);
                took();
                continue;
            }
            Outcome::Skipped(why) => {
                println!("ok {} - {name} # SKIP {why}", i + 1);
                took();
                continue;
            }
            Outcome::Failed(why) => why,
            Outcome::Panicked(message) => format!("panicked: {message}"),
            Outcome::TimedOut => {
                println!("not ok {} - {name}", i + 1);
                println!("# timed out after {TEST_TIMEOUT:?}; stopping here");
                for (j, rest) in selected.iter().enumerate().skip(i + 1) {
                    println!("not ok {} - {} # not run", j + 1, rest.name);
                }
                std::process::exit(1);
            }
        };
        failed += 1;
        println!("not ok {} - {name}", i + 1);
        for line in why.lines() {
            println!("# {line}");
        }
        took();
    }
    std::process::exit(i32::from(failed > 0));
}

#[cfg(test)]
mod harness {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_panicking_test_is_reported_as_a_panic_not_a_timeout() {
        fn panics() -> TestResult {
            panic!("boom at step 3")
        }
        assert_eq!(
            run_one(panics, Duration::from_secs(5)),
            Outcome::Panicked("boom at step 3".into())
        );
    }

    #[test]
    fn the_reloading_tests_come_last() {
        let reloads: Vec<bool> = all_tests().map(|t| t.reloads).collect();
        let first = reloads.iter().position(|r| *r).expect("a test reloads");
        assert!(reloads[first..].iter().all(|r| *r), "{reloads:?}");
    }

    #[test]
    fn outcomes_of_plain_tests() {
        assert_eq!(run_one(|| Ok(()), Duration::from_secs(5)), Outcome::Passed);
        assert_eq!(
            run_one(|| Err("SKIP: no kmemleak".into()), Duration::from_secs(5)),
            Outcome::Skipped("no kmemleak".into())
        );
        assert_eq!(
            run_one(|| Err("bad".into()), Duration::from_secs(5)),
            Outcome::Failed("bad".into())
        );
        assert_eq!(
            run_one(
                || {
                    std::thread::sleep(Duration::from_secs(3));
                    Ok(())
                },
                Duration::from_millis(100)
            ),
            Outcome::TimedOut
        );
    }
}

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

mod batch;
mod batch_core;
mod cli;
mod common;
mod filesystems;
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

use batch::*;
use batch_core::*;
use cli::*;
use filesystems::*;
use foundation::*;
use hardening::*;
use identity::*;
use map::*;
use mechanism::*;
use races::*;
use real_programs::*;
use trace_events::*;
use uffd::*;
use visibility::*;

const TESTS: &[(&str, fn() -> TestResult)] = &[
    ("module_is_loaded", module_is_loaded),
    ("device_is_root_only", device_is_root_only),
    ("debugfs_files_exist", debugfs_files_exist),
    (
        "open_close_and_unknown_ioctl_are_journaled",
        open_close_and_unknown_ioctl_are_journaled,
    ),
    (
        "unprivileged_user_cannot_open",
        unprivileged_user_cannot_open,
    ),
    (
        "target_text_is_pmd_mapped_thp",
        target_text_is_pmd_mapped_thp,
    ),
    (
        "patch_restore_collapse_one_page",
        patch_restore_collapse_one_page,
    ),
    (
        "trace_events_carry_each_step_and_its_pfns",
        trace_events_carry_each_step_and_its_pfns,
    ),
    (
        "collapse_waits_for_the_last_patch",
        collapse_waits_for_the_last_patch,
    ),
    (
        "install_pmd_maps_without_a_fault",
        install_pmd_maps_without_a_fault,
    ),
    (
        "map_shows_patch_restore_and_collapse",
        map_shows_patch_restore_and_collapse,
    ),
    (
        "expect_mismatch_changes_nothing",
        expect_mismatch_changes_nothing,
    ),
    (
        "batch_patches_and_restores_every_site",
        batch_patches_and_restores_every_site,
    ),
    (
        "batch_restore_follows_moves_drops_and_swap",
        batch_restore_follows_moves_drops_and_swap,
    ),
    (
        "batch_restore_after_remap_writes_nothing",
        batch_restore_after_remap_writes_nothing,
    ),
    (
        "batch_restore_after_fork_leaves_the_child_patched",
        batch_restore_after_fork_leaves_the_child_patched,
    ),
    ("overlapping_patch_is_refused", overlapping_patch_is_refused),
    (
        "closing_the_file_restores_and_persist_survives",
        closing_the_file_restores_and_persist_survives,
    ),
    (
        "batch_refused_at_its_last_site_changes_nothing",
        batch_refused_at_its_last_site_changes_nothing,
    ),
    (
        "batch_failing_on_a_later_page_undoes_the_earlier_pages",
        batch_failing_on_a_later_page_undoes_the_earlier_pages,
    ),
    (
        "batch_over_pages_of_one_thp_splits_once_and_collapses_once",
        batch_over_pages_of_one_thp_splits_once_and_collapses_once,
    ),
    (
        "overlapping_batches_at_once_one_wins",
        overlapping_batches_at_once_one_wins,
    ),
    (
        "batch_restore_refused_by_one_changed_site_writes_nothing",
        batch_restore_refused_by_one_changed_site_writes_nothing,
    ),
    (
        "batch_refuses_one_file_page_at_two_addresses",
        batch_refuses_one_file_page_at_two_addresses,
    ),
    (
        "cli_patch_holds_until_stdin_closes",
        cli_patch_holds_until_stdin_closes,
    ),
    (
        "bad_input_gets_errno_reason_and_changes_nothing",
        bad_input_gets_errno_reason_and_changes_nothing,
    ),
    (
        "caller_that_cannot_ptrace_gets_eperm",
        caller_that_cannot_ptrace_gets_eperm,
    ),
    (
        "killed_controller_leaves_nothing_patched",
        killed_controller_leaves_nothing_patched,
    ),
    (
        "target_exit_and_exec_leave_patches_gone",
        target_exit_and_exec_leave_patches_gone,
    ),
    (
        "fork_before_and_during_a_patch",
        fork_before_and_during_a_patch,
    ),
    (
        "patched_pte_is_soft_dirty_but_not_writable",
        patched_pte_is_soft_dirty_but_not_writable,
    ),
    (
        "userfaultfd_armed_text_is_refused",
        userfaultfd_armed_text_is_refused,
    ),
    (
        "pinned_page_is_restored_but_not_zapped",
        pinned_page_is_restored_but_not_zapped,
    ),
    (
        "restore_after_remap_to_another_file_writes_nothing",
        restore_after_remap_to_another_file_writes_nothing,
    ),
    ("restore_follows_mremap", restore_follows_mremap),
    (
        "restore_refuses_bytes_changed_by_someone_else",
        restore_refuses_bytes_changed_by_someone_else,
    ),
    (
        "restore_refuses_a_writable_mapping",
        restore_refuses_a_writable_mapping,
    ),
    (
        "failed_collapse_is_reported_with_the_kernels_reason",
        failed_collapse_is_reported_with_the_kernels_reason,
    ),
    (
        "swapped_out_patch_restores_and_frees_its_swap_slot",
        swapped_out_patch_restores_and_frees_its_swap_slot,
    ),
    (
        "uffd_wp_on_pmd_mapped_text_is_never_written_through",
        uffd_wp_on_pmd_mapped_text_is_never_written_through,
    ),
    (
        "uffd_missing_after_patch_keeps_the_anonymous_page",
        uffd_missing_after_patch_keeps_the_anonymous_page,
    ),
    (
        "killed_restore_keeps_the_patch",
        killed_restore_keeps_the_patch,
    ),
    (
        "rmmod_waits_for_the_last_close",
        rmmod_waits_for_the_last_close,
    ),
    (
        "execve_during_patch_never_patches_the_new_image",
        execve_during_patch_never_patches_the_new_image,
    ),
    (
        "expect_is_checked_in_the_step_that_writes",
        expect_is_checked_in_the_step_that_writes,
    ),
    (
        "cli_patch_writes_only_over_the_bytes_it_checked",
        cli_patch_writes_only_over_the_bytes_it_checked,
    ),
    (
        "cli_json_output_matches_the_kernel",
        cli_json_output_matches_the_kernel,
    ),
    ("cli_patch_sites_is_one_batch", cli_patch_sites_is_one_batch),
    (
        "a_parked_patch_does_not_stall_other_targets",
        a_parked_patch_does_not_stall_other_targets,
    ),
    (
        "last_mm_reference_is_dropped_by_a_worker",
        last_mm_reference_is_dropped_by_a_worker,
    ),
    (
        "restore_drains_lru_batches_once_and_unlocked",
        restore_drains_lru_batches_once_and_unlocked,
    ),
    (
        "close_restores_even_when_the_closer_is_killed",
        close_restores_even_when_the_closer_is_killed,
    ),
    (
        "spinner_sees_each_patch_and_restore_whole_and_at_once",
        spinner_sees_each_patch_and_restore_whole_and_at_once,
    ),
    (
        "full_cycle_on_tmpfs_huge_always",
        full_cycle_on_tmpfs_huge_always,
    ),
    ("full_cycle_on_ext4", full_cycle_on_ext4),
    ("full_cycle_on_xfs", full_cycle_on_xfs),
    (
        "cycle_on_a_4k_page_cache_queues_no_collapse",
        cycle_on_a_4k_page_cache_queues_no_collapse,
    ),
    (
        "cycle_on_an_mthp_page_cache_queues_no_collapse",
        cycle_on_an_mthp_page_cache_queues_no_collapse,
    ),
    (
        "real_python3_library_function_by_symbol",
        real_python3_library_function_by_symbol,
    ),
    (
        "real_python3_library_function_by_symbol_on_ext4",
        real_python3_library_function_by_symbol_on_ext4,
    ),
    (
        "real_python3_library_function_by_symbol_on_xfs",
        real_python3_library_function_by_symbol_on_xfs,
    ),
    (
        "real_python3_own_function_in_text_no_pmd_can_map",
        real_python3_own_function_in_text_no_pmd_can_map,
    ),
    (
        "real_python3_threads_on_both_cpus_while_patched_and_restored",
        real_python3_threads_on_both_cpus_while_patched_and_restored,
    ),
    (
        "real_python3_sites_by_symbol_in_two_objects",
        real_python3_sites_by_symbol_in_two_objects,
    ),
    (
        "collapse_pid_makes_a_real_programs_text_huge",
        collapse_pid_makes_a_real_programs_text_huge,
    ),
    // Last: they unload and reload the module.
    (
        "module_unload_restores_persistent_patches",
        module_unload_restores_persistent_patches,
    ),
    (
        "unload_after_collapse_leaks_nothing",
        unload_after_collapse_leaks_nothing,
    ),
];

/// The tests that unload and reload the module: the last ones in TESTS.
const RELOADING: &[&str] = &[
    "module_unload_restores_persistent_patches",
    "unload_after_collapse_leaks_nothing",
];

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
    let reload = |n: &str| RELOADING.contains(&n);
    let selected: Vec<_> = TESTS
        .iter()
        .filter(|(n, _)| n.contains(&filter))
        .filter(
            |(n, _)| match (flag("--no-reload"), flag("--only-reload")) {
                (true, _) => !reload(n),
                (_, true) => reload(n),
                _ => true,
            },
        )
        .collect();
    if flag("--list") {
        selected.iter().for_each(|(n, _)| println!("{n}"));
        return;
    }
    println!("1..{}", selected.len());
    let mut failed = 0;
    for (i, (name, test)) in selected.iter().enumerate() {
        let started = std::time::Instant::now();
        let outcome = run_one(*test, TEST_TIMEOUT);
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
                for (j, (rest, _)) in selected.iter().enumerate().skip(i + 1) {
                    println!("not ok {} - {rest} # not run", j + 1);
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
        let tail: Vec<_> = TESTS[TESTS.len() - RELOADING.len()..]
            .iter()
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(tail, RELOADING);
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

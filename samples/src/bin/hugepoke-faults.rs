//! Injected faults: every allocation that PATCH, PATCH_BATCH, RESTORE and
//! COLLAPSE make — the module's own, and the kernel's under it: GUP's
//! faults, page tables, the COW copy, the split — made to fail in turn.
//!
//!   hugepoke-faults [--max N]
//!
//! How: `/proc/thread-self/fail-nth` = n fails the nth fault-injection
//! point this thread passes (then reads back 0); failslab and
//! fail_page_alloc are set to count only allocations with the module
//! (its core image, from /proc/modules) on the stack (`require-start`/`require-end`), of every size, order
//! and GFP mode.  For each operation, n = 1, 2, ... until a call passes
//! all its points without reaching n (or N, default 400).  After each
//! injected fault:
//! - a call that failed returned ENOMEM or EAGAIN, and the target is as it was:
//!   PATCH and PATCH_BATCH left no patch and the file's bytes; RESTORE
//!   kept the patch (its bytes run, the handle listed) and a second,
//!   uninjected RESTORE gives the file's bytes back; COLLAPSE left the
//!   file's bytes;
//! - a call that succeeded anyway did its whole job (a fault the kernel
//!   retried or worked around);
//! - either way, once the state is set back (RESTORE, COLLAPSE), the text
//!   is the file's byte for byte, has no anonymous memory and is PMD-mapped
//!   within 10 s (khugepaged is asleep: the module's collapse), and the
//!   module lists no patch.
//!
//! The collapse RESTORE queues runs in a kworker: for n = 1, 2, ... it is
//! parked at the module's `collapse` pause point, that kworker (the one
//! whose stack runs through the module's pause) gets n in its own
//! `/proc/PID/fail-nth`, and the work is released.  Its verdict must be
//! journaled; if it collapsed, the text is as above, and if it did not, a
//! COLLAPSE puts the PMD back.  The kworker's fail-nth is set back to 0.
//!
//! A fault after which any of that fails is "lost".  Prints one line
//! `# faults: N injected, L lost (...)` and a `# lost:` line for each; exits
//! 1 if any was lost or injection could not be set up.  Leaks are
//! reported by the runner: the module's live counts at unload and, in the
//! debug flavour, kmemleak.  Needs CONFIG_FAULT_INJECTION_DEBUG_FS,
//! FAILSLAB, FAIL_PAGE_ALLOC and FAULT_INJECTION_STACKTRACE_FILTER (the
//! debug flavour); run with khugepaged asleep (samples/guest-checks).

use hugepoke::device::Device;
use hugepoke::proc;
use hugepoke::testkit::pause::Pause;
use hugepoke::testkit::target::Target;
use hugepoke::testkit::text;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const DEBUGFS: &str = "/sys/kernel/debug";

/// failslab and fail_page_alloc set to fail only under the module's text;
/// their settings are put back when dropped.
struct Injection {
    saved: Vec<(String, String)>,
    fail_nth: fs::File,
}

impl Injection {
    fn set_up() -> Result<Self, String> {
        let (start, end) = module_text()?;
        let mut inj = Injection {
            saved: Vec::new(),
            fail_nth: fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/proc/thread-self/fail-nth")
                .map_err(|e| format!("/proc/thread-self/fail-nth: {e}"))?,
        };
        for attr in ["failslab", "fail_page_alloc"] {
            let mut set = vec![
                ("require-start", start.to_string()),
                ("require-end", end.to_string()),
                ("stacktrace-depth", "32".to_string()),
                ("verbose", "0".to_string()),
                ("ignore-gfp-wait", "N".to_string()),
            ];
            if attr == "fail_page_alloc" {
                set.push(("ignore-gfp-highmem", "N".to_string()));
                set.push(("min-order", "0".to_string()));
            }
            for (name, value) in set {
                inj.set(&format!("{DEBUGFS}/{attr}/{name}"), &value)?;
            }
        }
        Ok(inj)
    }

    fn set(&mut self, path: &str, value: &str) -> Result<(), String> {
        let before = fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        fs::write(path, value).map_err(|e| format!("{path} = {value}: {e}"))?;
        self.saved
            .push((path.to_string(), before.trim().to_string()));
        Ok(())
    }

    /// Fail the `n`th injection point this thread reaches from now.
    fn arm(&self, n: u32) {
        self.fail_nth
            .write_at(n.to_string().as_bytes(), 0)
            .expect("writing fail-nth");
    }

    /// Whether the armed fault was injected; disarms it either way.
    fn disarm(&self) -> bool {
        let mut buf = [0u8; 16];
        let n = self
            .fail_nth
            .read_at(&mut buf, 0)
            .expect("reading fail-nth");
        let left: u32 = String::from_utf8_lossy(&buf[..n])
            .trim()
            .parse()
            .unwrap_or(1);
        self.fail_nth.write_at(b"0", 0).expect("writing fail-nth");
        left == 0
    }
}

impl Drop for Injection {
    fn drop(&mut self) {
        for (path, value) in self.saved.iter().rev() {
            let _ = fs::write(path, value);
        }
    }
}

/// The module's core image, `[start, end)`, from /proc/modules (text and
/// data: only text is ever on a stack).
fn module_text() -> Result<(u64, u64), String> {
    let modules = fs::read_to_string("/proc/modules").map_err(|e| format!("/proc/modules: {e}"))?;
    let line = modules
        .lines()
        .find(|l| l.starts_with("hugepoke "))
        .ok_or("hugepoke is not in /proc/modules")?;
    let w: Vec<&str> = line.split_whitespace().collect();
    let size: u64 = w
        .get(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no size in /proc/modules")?;
    let start = w
        .get(5)
        .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .filter(|&a| a != 0)
        .ok_or("no address in /proc/modules (hidden?)")?;
    Ok((start, start + size))
}

/// The operations whose faults are injected.
#[derive(Clone, Copy, Debug)]
enum Op {
    Patch,
    PatchBatch,
    Restore,
    Collapse,
}

/// The sites a PATCH_BATCH writes: two on page 1, one on page 2.
const BATCH: [(usize, usize, u32); 3] = [(1, 0, 77), (1, 64, 78), (2, 0, 79)];

struct Run {
    dev: Device,
    t: Target,
    inj: Injection,
    injected: BTreeMap<&'static str, u32>,
    outcomes: BTreeMap<String, u32>,
    lost: Vec<String>,
}

impl Run {
    fn op_name(op: Op) -> &'static str {
        match op {
            Op::Patch => "PATCH",
            Op::PatchBatch => "PATCH_BATCH",
            Op::Restore => "RESTORE",
            Op::Collapse => "COLLAPSE",
        }
    }

    /// The state each injected call starts from (uninjected): for RESTORE
    /// a live patch (its handle), for COLLAPSE an anonymous copy of page 3
    /// equal to the file (a /proc/PID/mem write of its own byte).
    fn prepare(&mut self, op: Op) -> Result<u64, String> {
        match op {
            Op::Patch | Op::PatchBatch => Ok(0),
            Op::Restore => self
                .patch_page_0()
                .map_err(|e| format!("setting up a patch: {e}")),
            Op::Collapse => {
                let addr = self.t.page_addr(3);
                let mem = fs::OpenOptions::new()
                    .write(true)
                    .open(format!("/proc/{}/mem", self.t.pid))
                    .map_err(|e| e.to_string())?;
                let byte = [text::blob()[3 * text::PAGE]];
                mem.write_at(&byte, addr)
                    .map_err(|e| format!("/proc/PID/mem: {e}"))?;
                Ok(0)
            }
        }
    }

    /// PATCH page 0 to return 42, persistent: the PATCH injected, and the
    /// patch RESTORE's injections start from.
    fn patch_page_0(&self) -> std::io::Result<u64> {
        self.dev
            .patch_sites(
                self.t.pid,
                &[site(&self.t, 0, 0, 42)],
                false,
                hugepoke::uapi::PATCH_PERSIST,
            )
            .map_err(|e| e.error)
    }

    /// The call itself: Ok(handle) or the errno.
    fn call(&self, op: Op, handle: u64) -> Result<u64, i32> {
        let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(0);
        match op {
            Op::Patch => self.patch_page_0().map_err(errno),
            Op::PatchBatch => {
                let sites: Vec<_> = BATCH
                    .iter()
                    .map(|&(p, o, v)| site(&self.t, p, o, v))
                    .collect();
                self.dev
                    .patch_sites(self.t.pid, &sites, true, hugepoke::uapi::PATCH_PERSIST)
                    .map_err(|e| errno(e.error))
            }
            Op::Restore => self.dev.restore(handle).map(|()| handle).map_err(errno),
            Op::Collapse => self
                .dev
                .collapse(self.t.pid, self.t.addr)
                .map(|_| 0)
                .map_err(errno),
        }
    }

    /// What must hold right after the call, then the state set back.
    fn judge(&mut self, op: Op, handle: u64, result: Result<u64, i32>) -> Result<(), String> {
        if let Err(e) = result {
            // Only what running out of memory may say.
            if ![libc::ENOMEM, libc::EAGAIN].contains(&e) {
                return Err(format!(
                    "failed with {} (errno {e})",
                    hugepoke::errno_name(e)
                ));
            }
        }
        let listed = |h: u64| -> Result<bool, String> { Ok(proc::listed_handles()?.contains(&h)) };
        match (op, result) {
            (Op::Patch, Ok(h)) => {
                self.expect_value(0, 42)?;
                self.dev
                    .restore(h)
                    .map_err(|e| format!("RESTORE after it: {e}"))?;
            }
            (Op::PatchBatch, Ok(h)) => {
                self.expect_value(1, 77)?;
                self.expect_value(2, 79)?;
                self.dev
                    .restore(h)
                    .map_err(|e| format!("RESTORE after it: {e}"))?;
            }
            (Op::Patch | Op::PatchBatch, Err(_)) => {
                if !proc::listed_handles()?.is_empty() {
                    return Err("a failed PATCH left a patch listed".into());
                }
            }
            (Op::Restore, Ok(_)) => {
                if listed(handle)? {
                    return Err("RESTORE succeeded but the handle is still listed".into());
                }
            }
            (Op::Restore, Err(_)) => {
                // A failed RESTORE keeps the patch: listed, and running.
                if !listed(handle)? {
                    return Err("a failed RESTORE dropped the handle".into());
                }
                self.expect_value(0, 42)?;
                self.dev
                    .restore(handle)
                    .map_err(|e| format!("the second RESTORE: {e}"))?;
            }
            (Op::Collapse, _) => {
                // COLLAPSE again, uninjected, puts the PMD back either way.
                self.dev
                    .collapse(self.t.pid, self.t.addr)
                    .map_err(|e| format!("COLLAPSE after it: {e}"))?;
            }
        }
        self.expect_file_text()
    }

    fn expect_value(&mut self, page: usize, want: u32) -> Result<(), String> {
        match self.t.call(page)? {
            v if v == want => Ok(()),
            v => Err(format!("page {page} returns {v}, not {want}")),
        }
    }

    /// The target runs the file's text, PMD-mapped, no anonymous memory,
    /// and the module lists nothing.
    fn expect_file_text(&mut self) -> Result<(), String> {
        let mut now = vec![0u8; text::THP_SIZE];
        fs::File::open(format!("/proc/{}/mem", self.t.pid))
            .and_then(|m| m.read_exact_at(&mut now, self.t.addr))
            .map_err(|e| format!("reading the text: {e}"))?;
        if let Some(at) = now.iter().zip(text::blob()).position(|(a, b)| *a != b) {
            return Err(format!("the text differs from the file at {at:#x}"));
        }
        let begin = Instant::now();
        loop {
            self.t.call(0)?;
            let s = proc::smaps_entry(self.t.pid, self.t.addr).map_err(|e| e.to_string())?;
            if s.pmd_mapped_kb() == 2048 && s.kb("Anonymous") == 0 {
                break;
            }
            if begin.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "10 s on, {} kB PMD-mapped and {} kB anonymous",
                    s.pmd_mapped_kb(),
                    s.kb("Anonymous")
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match proc::listed_handles()?.as_slice() {
            [] => Ok(()),
            left => Err(format!("patches left: {left:?}")),
        }
    }

    /// Fail each injection point of `op` in turn; the number injected.
    fn inject_all(&mut self, op: Op, max: u32) -> Result<u32, String> {
        let name = Self::op_name(op);
        for n in 1..=max {
            let handle = self.prepare(op)?;
            self.inj.arm(n);
            let result = self.call(op, handle);
            let injected = self.inj.disarm();
            if !injected {
                // Past the last point: an ordinary call, judged the same.
                self.judge(op, handle, result)
                    .map_err(|e| format!("{name} with no fault injected: {e}"))?;
                return Ok(n - 1);
            }
            *self.injected.entry(name).or_default() += 1;
            let outcome = match result {
                Ok(_) => "ok".to_string(),
                Err(e) => hugepoke::errno_name(e).to_string(),
            };
            *self
                .outcomes
                .entry(format!("{name} {outcome}"))
                .or_default() += 1;
            if let Err(why) = self.judge(op, handle, result) {
                self.lost
                    .push(format!("{name}, fault {n} ({outcome}): {why}"));
                // Back to a clean state for the next fault, or stop.
                self.clean_up()?;
            }
        }
        Err(format!(
            "{name}: still reaching injection points after {max}"
        ))
    }

    /// The collapse work RESTORE queues, in its kworker: for n = 1, 2, ...
    /// the work is parked, the kworker's fail-nth set to n, and the work
    /// released; the number of points injected.
    fn inject_collapse_work(&mut self, max: u32) -> Result<u32, String> {
        let name = "collapse work";
        for n in 1..=max {
            let handle = self
                .patch_page_0()
                .map_err(|e| format!("setting up a patch: {e}"))?;
            let pause = Pause::arm("collapse", self.t.pid)?;
            self.dev
                .restore(handle)
                .map_err(|e| format!("RESTORE: {e}"))?;
            pause.wait_parked("collapse")?;
            let kworker = FailNth::arm(parked_kworker()?, n)?;
            let seq = hugepoke::device::journal_seq();
            pause.release()?;
            let verdict = self.collapse_verdict(seq);
            let injected = kworker.disarm()?;
            drop(pause);
            let judged = match &verdict {
                None => Err("no verdict journaled in 10 s".to_string()),
                Some(e) if e.result != "ok" => self
                    .dev
                    .collapse(self.t.pid, self.t.addr)
                    .map_err(|e| format!("COLLAPSE after it: {e}"))
                    .and_then(|_| self.expect_file_text()),
                Some(_) => self.expect_file_text(),
            };
            if !injected {
                // Past the last point: an ordinary work, judged the same.
                judged.map_err(|e| format!("{name} with no fault injected: {e}"))?;
                return Ok(n - 1);
            }
            *self.injected.entry(name).or_default() += 1;
            let outcome = match &verdict {
                Some(e) => format!("{name} {}", e.result),
                None => format!("{name} not journaled"),
            };
            *self.outcomes.entry(outcome.clone()).or_default() += 1;
            if let Err(why) = judged {
                self.lost.push(format!("{outcome}, fault {n}: {why}"));
                self.clean_up()?;
            }
        }
        Err(format!(
            "{name}: still reaching injection points after {max}"
        ))
    }

    /// The collapse work's verdict on the target, journaled after `seq`
    /// (waited for up to 10 s).
    fn collapse_verdict(&self, seq: u64) -> Option<proc::EventLine> {
        (0..2000).find_map(|_| {
            let events = proc::parse_events(&proc::debugfs("events").ok()?);
            let found = events
                .into_iter()
                .find(|e| e.seq > seq && e.pid == self.t.pid && e.step == "collapse");
            if found.is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
            found
        })
    }

    /// Restore whatever is listed, collapse, and check.
    fn clean_up(&mut self) -> Result<(), String> {
        for h in proc::listed_handles()? {
            let _ = self.dev.restore(h);
        }
        let _ = self.dev.collapse(self.t.pid, self.t.addr);
        self.expect_file_text()
            .map_err(|e| format!("the state could not be set back: {e}"))
    }
}

/// The one kworker parked at the module's pause point: its stack runs
/// through `[hugepoke]`'s pause.
fn parked_kworker() -> Result<i32, String> {
    let dir = fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))?;
    let parked: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let read = |f: &str| fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
            read("comm").starts_with("kworker")
                && read("stack")
                    .lines()
                    .any(|l| l.contains("[hugepoke]") && l.contains("pause"))
        })
        .collect();
    match parked[..] {
        [one] => Ok(one),
        _ => Err(format!(
            "kworkers parked in the module's pause (/proc/PID/stack): {parked:?}, want one"
        )),
    }
}

/// Another task's fail-nth (`/proc/PID/fail-nth`), set to 0 again when
/// dropped: a kworker runs other work after ours.
struct FailNth {
    file: fs::File,
}

impl FailNth {
    fn arm(pid: i32, n: u32) -> Result<Self, String> {
        let path = format!("/proc/{pid}/fail-nth");
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{path}: {e}"))?;
        file.write_at(n.to_string().as_bytes(), 0)
            .map_err(|e| format!("{path}: {e}"))?;
        Ok(FailNth { file })
    }

    /// Whether the fault was injected (fail-nth counted down to 0).
    fn disarm(self) -> Result<bool, String> {
        let mut buf = [0u8; 16];
        let n = self.file.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
        let left = String::from_utf8_lossy(&buf[..n]).trim().parse::<u32>();
        Ok(left == Ok(0))
    }
}

impl Drop for FailNth {
    fn drop(&mut self) {
        let _ = self.file.write_at(b"0", 0);
    }
}

fn site(t: &Target, page: usize, offset: usize, value: u32) -> hugepoke::device::Site {
    hugepoke::device::Site {
        addr: t.page_addr(page) + offset as u64,
        bytes: text::mov_eax_ret(value).to_vec(),
        expect: None,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let max = args
        .iter()
        .position(|a| a == "--max")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(400);
    let setup = || -> Result<Run, String> {
        Ok(Run {
            dev: Device::open().map_err(|e| format!("/dev/hugepoke: {e}"))?,
            t: Target::spawn(&[])?,
            inj: Injection::set_up()?,
            injected: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            lost: Vec::new(),
        })
    };
    let mut run = match setup() {
        Ok(r) => r,
        Err(e) => {
            println!("# faults: cannot inject: {e}");
            std::process::exit(1);
        }
    };
    let mut problems = Vec::new();
    if let Err(e) = run.expect_file_text() {
        problems.push(format!("before any fault: {e}"));
    }
    let mut points = Vec::new();
    for op in [Op::Patch, Op::PatchBatch, Op::Restore, Op::Collapse] {
        match run.inject_all(op, max) {
            // COLLAPSE allocates nothing; the others must reach a point,
            // or the filter lost them.
            Ok(0) if !matches!(op, Op::Collapse) => {
                problems.push(format!("{}: no injection point reached", Run::op_name(op)))
            }
            // (Said so: zero points is no coverage, only nothing to cover.)
            Ok(0) => points.push(format!(
                "{} 0 (nothing to inject: no allocation under it)",
                Run::op_name(op)
            )),
            Ok(n) => points.push(format!("{} {n}", Run::op_name(op))),
            Err(e) => problems.push(e),
        }
    }
    // The queued collapse, in its kworker.  (Zero is said as zero.)
    match run.inject_collapse_work(max) {
        Ok(0) => points.push("collapse work 0 (nothing to inject: no allocation under it)".into()),
        Ok(n) => points.push(format!("collapse work {n}")),
        Err(e) => problems.push(e),
    }
    let injected: u32 = run.injected.values().sum();
    let outcomes: Vec<String> = run
        .outcomes
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    println!(
        "# faults: {injected} injected, {} lost (points: {}; outcomes: {})",
        run.lost.len(),
        points.join(", "),
        outcomes.join(", ")
    );
    for l in &run.lost {
        println!("# lost: {l}");
    }
    for p in &problems {
        println!("# problem: {p}");
    }
    let failed = !run.lost.is_empty() || !problems.is_empty();
    // The debugfs settings go back before we exit.
    drop(run);
    if failed {
        std::process::exit(1);
    }
}

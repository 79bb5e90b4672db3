//! Stress: controller threads PATCH and RESTORE text pages of one target
//! while the target's own threads run that code on every CPU.
//!
//!   hugepoke-stress [--cycles N] [--seconds S] [--min-cycles M]
//!                   [--controllers C] [--checkers K] [--pages P] [--chaos]
//!
//! Each cycle takes a page no other controller is working on, PATCHes its
//! function with one of several encodings that return the stress value but
//! split the bytes into instructions differently (`text::encodings_returning`),
//! checks that an overlapping PATCH is refused (EBUSY), and RESTOREs it.
//! Around each ioctl it tells the target's checking threads what the page
//! must run (`hugepoke::testkit::check_state`) and waits until one of them has seen
//! it: so a patch whose bytes never become visible (a missing TLB flush),
//! or a RESTORE that leaves them, fails the run, as does any other value
//! (a torn instruction), a crash or a hang of the target.
//!
//! With --chaos the target races us on the very pages we patch: it
//! MADV_DONTNEEDs them and mprotect()s them writable and back (see
//! thp-target --chaos).  Then PATCH may be refused with EINVAL (the
//! mapping is writable at that moment) or EAGAIN (the page table kept
//! changing), and RESTORE may keep the patch with EACCES (writable) or
//! EAGAIN, and is retried until it succeeds; a patch that MADV_DONTNEED
//! dropped may read back as the original code.  Nothing else is accepted.
//!
//! Every other cycle is a batch: the controller takes up to two more free
//! pages and PATCH_BATCHes all their functions in one call (one handle),
//! each page's checkers must see its new code; a batch of a harmless site
//! and one overlapping a site of the batch is refused with EBUSY at the
//! overlapping index and writes nothing (its harmless site is read back);
//! then RESTORE of the handle gives every page its original code back.
//! Under chaos PATCH_BATCH may be refused and RESTORE kept as for single
//! PATCHes.
//!
//! Stops at N cycles or S seconds, whichever is first, or at the first
//! failure; fails with fewer than M cycles (a run that did nothing).  Then
//! checks that the target is alive and runs its original code, no patch is
//! left, and that no anonymous memory is left and the PMD mapping comes back.
//! Prints one summary line and a `# problem:` line per failure; exits 1 on
//! any.

use hugepoke::device::{batch_site, Device, PatchRequest};
use hugepoke::testkit::check_state::{self, Shared, Slot, State};
use hugepoke::testkit::target::Target;
use hugepoke::testkit::text;
use hugepoke::{errno_name, proc};
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a controller waits for a checker to see a state, and for a
/// RESTORE that chaos keeps refusing: far beyond what a slow TCG guest
/// needs, short enough to report a hang.
const WAIT_LIMIT: Duration = Duration::from_secs(30);

fn arg(args: &[String], flag: &str, default: u64) -> u64 {
    match args.iter().position(|a| a == flag) {
        None => default,
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                eprintln!("hugepoke-stress: {flag} needs a number");
                std::process::exit(2)
            }),
    }
}

/// What the controllers share.
struct Run {
    pid: i32,
    base: u64,
    chaos: bool,
    state: Shared,
    /// One flag per page: a controller is working on it.
    busy: Vec<AtomicBool>,
    stop: AtomicBool,
    cycles: AtomicU64,
    /// Of the cycles, batches, and the sites (pages) they patched.
    batches: AtomicU64,
    batch_sites: AtomicU64,
    /// Pages skipped because another controller had them.
    contended: AtomicU64,
    /// Time spent in PATCH, in RESTORE, and waiting for the checkers (ns).
    patch_ns: AtomicU64,
    restore_ns: AtomicU64,
    wait_ns: AtomicU64,
    /// Refusals that chaos explains: "PATCH EINVAL" etc.
    refused: Mutex<BTreeMap<String, u64>>,
}

impl Run {
    fn count(&self, what: &str, e: &io::Error) {
        let key = format!("{what} {}", errno_name(e.raw_os_error().unwrap_or(0)));
        *self.refused.lock().unwrap().entry(key).or_default() += 1;
    }

    /// Whether the target process is still there (not a zombie).
    fn target_alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
    }

    /// Publish `st` for `page` and wait until a checker has seen the page
    /// run the code of that state.
    fn publish_and_wait(&self, page: usize, slot: &Slot, st: State) -> Result<(), String> {
        let generation = slot.publish(st);
        let start = Instant::now();
        let _timed = Timed(&self.wait_ns, start);
        while !slot.wait_seen(generation, Duration::from_millis(100)) {
            if !self.target_alive() {
                return Err(format!(
                    "page {page}: the target died (waiting for its checkers to see {st:?})"
                ));
            }
            if start.elapsed() > WAIT_LIMIT {
                return Err(format!(
                    "page {page}: no checker saw it run the {st:?} code within {WAIT_LIMIT:?}"
                ));
            }
        }
        Ok(())
    }

    /// One PATCH + RESTORE of `page` (which this controller holds).
    fn cycle(&self, dev: &Device, page: usize, encoding: &[u8]) -> Result<bool, String> {
        let slot = self.state.slot(page);
        let addr = self.base + (page * text::PAGE) as u64;
        let dontneed = slot.dontneed.load(std::sync::atomic::Ordering::SeqCst);
        slot.dontneed_before
            .store(dontneed, std::sync::atomic::Ordering::Release);
        slot.publish(State::Patching);
        let req = PatchRequest {
            pid: self.pid,
            addr,
            bytes: encoding.to_vec(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let patched = dev.patch(&req);
        self.patch_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
        let handle = match patched {
            Ok(h) => h,
            Err(e)
                if self.chaos && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EAGAIN)) =>
            {
                self.count("PATCH", &e);
                // A refused PATCH changed nothing.
                self.publish_and_wait(page, slot, State::Original)?;
                return Ok(false);
            }
            Err(e) => return Err(format!("PATCH page {page}: {e}")),
        };
        self.publish_and_wait(page, slot, State::Patched)?;

        // An overlapping PATCH is refused, every time.
        let overlap = PatchRequest {
            pid: self.pid,
            addr: addr + 1,
            bytes: vec![0xcc; 2],
            ..Default::default()
        };
        match dev.patch(&overlap) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.count("overlapping PATCH", &e),
            Err(e) if self.chaos && e.raw_os_error() == Some(libc::EINVAL) => {
                self.count("overlapping PATCH", &e)
            }
            Err(e) => return Err(format!("overlapping PATCH page {page}: {e} (not EBUSY)")),
            Ok(h) => {
                let _ = dev.restore(h);
                return Err(format!("overlapping PATCH page {page} succeeded"));
            }
        }

        let start = Instant::now();
        loop {
            slot.publish(State::Restoring);
            let t0 = Instant::now();
            let restored = dev.restore(handle);
            self.restore_ns
                .fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
            match restored {
                Ok(()) => break,
                Err(e)
                    if self.chaos
                        && matches!(e.raw_os_error(), Some(libc::EACCES | libc::EAGAIN))
                        && start.elapsed() < WAIT_LIMIT =>
                {
                    self.count("RESTORE (kept, retried)", &e);
                    // A refused RESTORE changed nothing.
                    self.publish_and_wait(page, slot, State::Patched)?;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(format!("RESTORE page {page} (handle {handle}): {e}")),
            }
        }
        self.publish_and_wait(page, slot, State::Original)?;
        Ok(true)
    }

    /// RESTORE `handle`, retrying while chaos keeps it (the pages stay
    /// patched meanwhile, and the checkers must keep seeing that).
    fn restore_retrying(&self, dev: &Device, handle: u64, pages: &[usize]) -> Result<(), String> {
        let start = Instant::now();
        loop {
            for &page in pages {
                self.state.slot(page).publish(State::Restoring);
            }
            let t0 = Instant::now();
            let restored = dev.restore(handle);
            self.restore_ns
                .fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
            match restored {
                Ok(()) => return Ok(()),
                Err(e)
                    if self.chaos
                        && matches!(e.raw_os_error(), Some(libc::EACCES | libc::EAGAIN))
                        && start.elapsed() < WAIT_LIMIT =>
                {
                    self.count("RESTORE (kept, retried)", &e);
                    for &page in pages {
                        self.publish_and_wait(page, self.state.slot(page), State::Patched)?;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(format!("RESTORE of pages {pages:?} (handle {handle}): {e}")),
            }
        }
    }

    /// One PATCH_BATCH + RESTORE of the functions of `pages` (which this
    /// controller holds), one site a page, each with its encoding.
    fn batch_cycle(&self, dev: &Device, pages: &[usize], pick: u64) -> Result<bool, String> {
        let addr = |page: usize| self.base + (page * text::PAGE) as u64;
        let mut sites = Vec::new();
        for (k, &page) in pages.iter().enumerate() {
            let slot = self.state.slot(page);
            let dontneed = slot.dontneed.load(std::sync::atomic::Ordering::SeqCst);
            slot.dontneed_before
                .store(dontneed, std::sync::atomic::Ordering::Release);
            slot.publish(State::Patching);
            let encodings = text::encodings_returning(text::stress_value(page));
            sites.push(batch_site(
                addr(page),
                &encodings[(pick as usize + k) % encodings.len()],
                None,
            ));
        }
        let t0 = Instant::now();
        let patched = dev.patch_batch(self.pid, &sites, 0);
        self.patch_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
        let handle = match patched {
            Ok(h) => h,
            Err(e)
                if self.chaos
                    && matches!(e.error.raw_os_error(), Some(libc::EINVAL | libc::EAGAIN)) =>
            {
                self.count("PATCH_BATCH", &e.error);
                // A refused batch changed nothing, on any of its pages.
                for &page in pages {
                    self.publish_and_wait(page, self.state.slot(page), State::Original)?;
                }
                return Ok(false);
            }
            Err(e) => return Err(format!("PATCH_BATCH of pages {pages:?}: {e}")),
        };
        for &page in pages {
            self.publish_and_wait(page, self.state.slot(page), State::Patched)?;
        }

        // A batch overlapping one of ours is refused at the overlapping
        // site, and its other site (int3 over the padding of our first
        // page, 100 bytes in: never run) is not written.
        let last = *pages.last().unwrap();
        let harmless = addr(pages[0]) + 100;
        let overlap = [
            batch_site(harmless, &[0x90], Some(&[0xcc])),
            batch_site(addr(last) + 1, &[0xcc; 2], None),
        ];
        match dev.patch_batch(self.pid, &overlap, 0) {
            Err(e) if e.error.raw_os_error() == Some(libc::EBUSY) && e.failed == Some(1) => {
                self.count("overlapping PATCH_BATCH", &e.error)
            }
            Err(e) if self.chaos && e.error.raw_os_error() == Some(libc::EINVAL) => {
                self.count("overlapping PATCH_BATCH", &e.error)
            }
            Err(e) => {
                return Err(format!(
                    "overlapping PATCH_BATCH on page {last}: {e} (not EBUSY at site 1)"
                ))
            }
            Ok(h) => {
                let _ = dev.restore(h);
                return Err(format!("overlapping PATCH_BATCH on page {last} succeeded"));
            }
        }
        match read_byte(self.pid, harmless) {
            Ok(0xcc) => {}
            Ok(b) => {
                return Err(format!(
                    "a refused PATCH_BATCH wrote {b:#x} on page {}",
                    pages[0]
                ))
            }
            Err(e) => return Err(format!("reading the target: {e}")),
        }

        self.restore_retrying(dev, handle, pages)?;
        for &page in pages {
            self.publish_and_wait(page, self.state.slot(page), State::Original)?;
        }
        self.batches.fetch_add(1, Relaxed);
        self.batch_sites.fetch_add(pages.len() as u64, Relaxed);
        Ok(true)
    }

    /// Take a free page, run a cycle on it, give it back; until told to stop.
    fn control(&self, controller: u64) -> Result<(), String> {
        let dev = Device::open()
            .map_err(|e| format!("controller {controller}: opening /dev/hugepoke: {e}"))?;
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (controller + 1);
        let pages = self.busy.len() as u64;
        while !self.stop.load(Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let page = (x % pages) as usize;
            if self.busy[page].swap(true, std::sync::atomic::Ordering::Acquire) {
                self.contended.fetch_add(1, Relaxed);
                continue;
            }
            let result = if x >> 63 == 1 {
                // A batch: this page and up to two more free ones.
                let mut held = vec![page];
                for k in 1..3u64 {
                    let other = ((x >> (8 * k)) % pages) as usize;
                    if !held.contains(&other)
                        && !self.busy[other].swap(true, std::sync::atomic::Ordering::Acquire)
                    {
                        held.push(other);
                    }
                }
                let result = self.batch_cycle(&dev, &held, x >> 32);
                for &p in &held[1..] {
                    self.busy[p].store(false, std::sync::atomic::Ordering::Release);
                }
                result
            } else {
                let encodings = text::encodings_returning(text::stress_value(page));
                self.cycle(&dev, page, &encodings[(x >> 32) as usize % encodings.len()])
            };
            self.busy[page].store(false, std::sync::atomic::Ordering::Release);
            if result? {
                self.cycles.fetch_add(1, Relaxed);
            }
        }
        Ok(())
    }
}

/// One byte of the target's memory, as a debugger reads it.
fn read_byte(pid: i32, addr: u64) -> io::Result<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8];
    std::fs::File::open(format!("/proc/{pid}/mem"))?.read_exact_at(&mut b, addr)?;
    Ok(b[0])
}

/// Adds the time since it was made to a counter when dropped.
struct Timed<'a>(&'a AtomicU64, Instant);

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        self.0
            .fetch_add(self.1.elapsed().as_nanos() as u64, Relaxed);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cycles = arg(&args, "--cycles", 1_000_000);
    let seconds = arg(&args, "--seconds", 10);
    let min_cycles = arg(&args, "--min-cycles", 100);
    let controllers = arg(&args, "--controllers", 2);
    let pages = arg(&args, "--pages", 4) as usize;
    // One checker per CPU but one: each cycle waits for a checker to see
    // its states, and the controllers need a CPU too; more checkers than
    // free CPUs only make every wait a wait for the scheduler.
    let free_cpus = std::thread::available_parallelism()
        .map_or(1, |n| n.get() as u64 - 1)
        .max(1);
    let cpus = arg(&args, "--checkers", free_cpus) as usize;
    let chaos = args.iter().any(|a| a == "--chaos");
    if pages == 0 || pages + 4 > check_state::PAGES {
        eprintln!(
            "hugepoke-stress: --pages must be 1 to {}",
            check_state::PAGES - 4
        );
        std::process::exit(2);
    }
    let mut problems = Vec::new();
    let (n, elapsed, run, mut t) = match start(
        cycles,
        seconds,
        controllers,
        pages,
        cpus,
        chaos,
        &mut problems,
    ) {
        Ok(r) => r,
        Err(e) => {
            println!("# problem: {e}");
            std::process::exit(1);
        }
    };
    if n < min_cycles {
        problems.push(format!(
            "only {n} PATCH+RESTORE cycles (at least {min_cycles} required)"
        ));
    }
    after_the_run(&run, &mut t, pages, chaos, &mut problems);
    t.kill();

    let per_cycle_ms = |ns: &AtomicU64| ns.load(Relaxed) as f64 / 1e6 / n.max(1) as f64;
    println!(
        "# stress{}: {n} PATCH+RESTORE cycles ({} of them PATCH_BATCHes of {} sites in all) in {:.1} s (per cycle: {:.2} ms in PATCH, {:.2} ms in RESTORE, {:.2} ms waiting for the checkers; {} page contentions; refused: {:?}), {controllers} controllers, {cpus} checking target threads, {pages} pages",
        if chaos { " with chaos" } else { "" },
        run.batches.load(Relaxed),
        run.batch_sites.load(Relaxed),
        elapsed.as_secs_f64(),
        per_cycle_ms(&run.patch_ns),
        per_cycle_ms(&run.restore_ns),
        per_cycle_ms(&run.wait_ns),
        run.contended.load(Relaxed),
        run.refused.lock().unwrap(),
    );
    for p in &problems {
        println!("# problem: {p}");
    }
    std::process::exit(i32::from(!problems.is_empty()));
}

/// Spawn the target, run the controllers until done; the cycle count, the
/// time taken, the shared run and the target.
fn start(
    cycles: u64,
    seconds: u64,
    controllers: u64,
    pages: usize,
    cpus: usize,
    chaos: bool,
    problems: &mut Vec<String>,
) -> Result<(u64, Duration, Arc<Run>, Target), String> {
    let (state, fd) = Shared::create().map_err(|e| format!("check state: {e}"))?;
    let file = format!(
        "{}/stress.bin",
        std::env::var("HUGEPOKE_THP_DIR").unwrap_or_else(|_| "/tmp/hugepoke-thp".into())
    );
    let (threads_arg, pages_arg, fd_arg) = (cpus.to_string(), pages.to_string(), fd.to_string());
    let mut targs = vec![
        "--file",
        &file,
        "--check-threads",
        &threads_arg,
        "--check-pages",
        &pages_arg,
        "--check-state",
        &fd_arg,
    ];
    if chaos {
        targs.push("--chaos");
    }
    let t = Target::spawn(&targs)?;
    let run = Arc::new(Run {
        pid: t.pid,
        base: t.addr,
        chaos,
        state,
        busy: (0..pages).map(|_| AtomicBool::new(false)).collect(),
        stop: AtomicBool::new(false),
        cycles: AtomicU64::new(0),
        batches: AtomicU64::new(0),
        batch_sites: AtomicU64::new(0),
        contended: AtomicU64::new(0),
        refused: Mutex::new(BTreeMap::new()),
        patch_ns: AtomicU64::new(0),
        restore_ns: AtomicU64::new(0),
        wait_ns: AtomicU64::new(0),
    });
    let begin = Instant::now();
    let threads: Vec<_> = (0..controllers)
        .map(|c| {
            let run = run.clone();
            std::thread::spawn(move || {
                let r = run.control(c);
                // The first failure stops everyone.
                run.stop.store(true, Relaxed);
                r
            })
        })
        .collect();
    while !run.stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        if run.cycles.load(Relaxed) >= cycles || begin.elapsed() >= Duration::from_secs(seconds) {
            run.stop.store(true, Relaxed);
        }
    }
    for (c, th) in threads.into_iter().enumerate() {
        match th.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(format!("controller {c}: {e}")),
            Err(panic) => problems.push(format!(
                "controller {c} panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        }
    }
    Ok((run.cycles.load(Relaxed), begin.elapsed(), run, t))
}

/// The checks after the controllers stopped.
fn after_the_run(run: &Run, t: &mut Target, pages: usize, chaos: bool, problems: &mut Vec<String>) {
    // What the checkers let pass: stale calls tolerated (at most
    // MISSES_ALLOWED in a row) and original values excused by a
    // MADV_DONTNEED of the chaos.
    let (misses, excused) = (0..pages).fold((0u64, 0u64), |(m, e), p| {
        let slot = run.state.slot(p);
        (
            m + u64::from(slot.misses.load(Relaxed)),
            e + slot.excused.load(Relaxed),
        )
    });
    println!(
        "# stress: checkers tolerated {misses} stale calls (at most {} in a row) and excused {excused} original values after a MADV_DONTNEED",
        check_state::MISSES_ALLOWED
    );
    if chaos {
        // Stop the chaos; one more checked cycle queues the collapse that it
        // may have thwarted (a split VMA cannot be collapsed).
        if let Err(e) = t.command("calm") {
            problems.push(format!("calm: {e}"));
        }
        let encoding = text::mov_eax_ret(text::stress_value(0));
        match Device::open()
            .map_err(|e| e.to_string())
            .and_then(|dev| run.cycle(&dev, 0, &encoding))
        {
            Ok(true) => {}
            Ok(false) => problems.push("final cycle: PATCH refused after calm".into()),
            Err(e) => problems.push(format!("final cycle: {e}")),
        }
    }
    // The target is alive and runs the original code everywhere.
    for page in 0..pages + 4 {
        match t.call(page) {
            Ok(v) if v == text::original_value(page) => {}
            Ok(v) => problems.push(format!("page {page} returns {v} after the run")),
            Err(e) => {
                problems.push(format!("target died: {e}"));
                return;
            }
        }
    }
    match proc::debugfs("patches") {
        // Only the header: a "# a target is busy" line would hide patches.
        Ok(p) if p.lines().all(|l| l.starts_with("# handle ")) => {}
        Ok(p) => problems.push(format!("patches left:\n{p}")),
        Err(e) => problems.push(e.to_string()),
    }
    // The collapse is asynchronous: wait for it, generously.
    let begin = Instant::now();
    loop {
        let _ = t.call(0);
        let s = proc::smaps_entry(run.pid, run.base).unwrap_or_default();
        if s.pmd_mapped_kb() == 2048 && s.kb("Anonymous") == 0 {
            println!(
                "# stress: PMD back, no anonymous memory, {:.2} s after the run",
                begin.elapsed().as_secs_f64()
            );
            break;
        }
        if begin.elapsed() > WAIT_LIMIT {
            problems.push(format!("{WAIT_LIMIT:?} after the run: {s:?}"));
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

//! Stress: controller threads PATCH and RESTORE the same and different text
//! pages of one target while the target's own threads run that code on every
//! CPU and check they only ever see the old or the new bytes.
//!
//!   hugepoke-stress [--cycles N] [--seconds S] [--controllers C] [--pages P] [--chaos]
//!
//! With --chaos the target races us: it madvise(MADV_DONTNEED)s and
//! mprotect()s its text all along (see thp-target --chaos).
//!
//! Stops at N PATCH+RESTORE cycles or S seconds, whichever is first; then
//! checks that the target is alive, no patch is left, no anonymous memory is
//! left and the PMD mapping comes back.  Prints one summary line.

use hugepoke::device::{Device, PatchRequest};
use hugepoke::proc;
use hugepoke::target::Target;
use hugepoke::text;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn arg(args: &[String], flag: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cycles = arg(&args, "--cycles", 1_000_000);
    let seconds = arg(&args, "--seconds", 10);
    let controllers = arg(&args, "--controllers", 2) as usize;
    let pages = arg(&args, "--pages", 4) as usize;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chaos = args.iter().any(|a| a == "--chaos");

    let file = format!("{}/stress.bin", std::env::var("HUGEPOKE_THP_DIR").unwrap_or_else(|_| "/tmp/hugepoke-thp".into()));
    let (threads_arg, pages_arg) = (cpus.to_string(), pages.to_string());
    let mut targs = vec!["--file", &file, "--check-threads", &threads_arg, "--check-pages", &pages_arg];
    if chaos {
        targs.push("--chaos");
    }
    let mut t = Target::spawn(&targs).expect("thp-target");
    let (pid, base) = (t.pid, t.addr);

    let done = Arc::new(AtomicU64::new(0));
    let busy = Arc::new(AtomicU64::new(0));
    let raced = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let failure = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let threads: Vec<_> = (0..controllers)
        .map(|c| {
            let (done, busy, raced, stop, failure) = (done.clone(), busy.clone(), raced.clone(), stop.clone(), failure.clone());
            std::thread::spawn(move || {
                let dev = Device::open().expect("/dev/hugepoke");
                // Controllers share pages (EBUSY on overlap is expected) and
                // each also has pages of its own.
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (c as u64 + 1);
                while !stop.load(Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = (x % pages as u64) as usize;
                    let req = PatchRequest {
                        pid,
                        addr: base + (page * text::PAGE) as u64,
                        bytes: text::mov_eax_ret(text::stress_value(page)).to_vec(),
                        ..Default::default()
                    };
                    match dev.patch(&req) {
                        Ok(h) => {
                            if let Err(e) = dev.restore(h) {
                                *failure.lock().unwrap() = Some(format!("RESTORE: {e}"));
                                stop.store(true, Relaxed);
                            }
                            done.fetch_add(1, Relaxed);
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                            busy.fetch_add(1, Relaxed);
                        }
                        // The target changing its page tables under PATCH.
                        Err(e) if chaos && e.raw_os_error() == Some(libc::EAGAIN) => {
                            raced.fetch_add(1, Relaxed);
                        }
                        Err(e) => {
                            *failure.lock().unwrap() = Some(format!("PATCH page {page}: {e}"));
                            stop.store(true, Relaxed);
                        }
                    }
                }
            })
        })
        .collect();

    while !stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        if done.load(Relaxed) >= cycles || start.elapsed() >= Duration::from_secs(seconds) {
            stop.store(true, Relaxed);
        }
    }
    for th in threads {
        let _ = th.join();
    }
    let elapsed = start.elapsed();
    let n = done.load(Relaxed);

    let mut problems = Vec::new();
    if let Some(f) = failure.lock().unwrap().take() {
        problems.push(f);
    }
    if chaos {
        // Stop the chaos; one more cycle queues the collapse it may have
        // thwarted (a split VMA cannot be collapsed).
        let _ = t.command("calm");
        let dev = Device::open().expect("/dev/hugepoke");
        let req = PatchRequest { pid, addr: base, bytes: text::mov_eax_ret(text::stress_value(0)).to_vec(), ..Default::default() };
        match dev.patch(&req).and_then(|h| dev.restore(h)) {
            Ok(()) => {}
            Err(e) => problems.push(format!("final cycle: {e}")),
        }
    }
    // The target is alive and runs the original code everywhere.
    for page in 0..pages {
        match t.call(page) {
            Ok(v) if v == text::original_value(page) => {}
            Ok(v) => problems.push(format!("page {page} returns {v} after the run")),
            Err(e) => problems.push(format!("target died: {e}")),
        }
    }
    match proc::debugfs("patches") {
        Ok(p) if p.lines().count() == 1 => {}
        Ok(p) => problems.push(format!("patches left:\n{p}")),
        Err(e) => problems.push(e.to_string()),
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let _ = t.call(0);
        let s = proc::smaps_entry(pid, base).unwrap_or_default();
        if s.pmd_mapped_kb() == 2048 && s.kb("Anonymous") == 0 {
            break;
        }
        if Instant::now() > deadline {
            problems.push(format!("after the run: {s:?}"));
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    t.kill();

    println!(
        "# stress{}: {n} PATCH+RESTORE cycles ({} EBUSY, {} EAGAIN) in {:.1} s, {controllers} controllers, {cpus} checking target threads, {pages} pages",
        if chaos { " with chaos" } else { "" },
        busy.load(Relaxed),
        raced.load(Relaxed),
        elapsed.as_secs_f64()
    );
    for p in &problems {
        println!("# problem: {p}");
    }
    std::process::exit(i32::from(!problems.is_empty()));
}

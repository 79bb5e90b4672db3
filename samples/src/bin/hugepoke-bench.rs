//! Side-by-side timings, in one run, on the same address of the same target:
//! hugepoke PATCH/RESTORE, a uprobe attach/detach there (perf_event_open on
//! the "uprobe" PMU), and a /proc/PID/mem write of the new bytes and of the
//! originals; plus how long the PMD mapping takes to come back after each.
//!
//!   hugepoke-bench [ITERATIONS]   (default 100)
//!
//! Guests here run under TCG: only the ratios mean anything.

use hugepoke::device::{Device, PatchRequest};
use hugepoke::proc;
use hugepoke::target::Target;
use hugepoke::text;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const PAGE: usize = 17;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pmd_mapped(t: &Target) -> bool {
    proc::smaps_entry(t.pid, t.addr).map(|s| s.pmd_mapped_kb() == 2048).unwrap_or(false)
}

/// Time until the (spinning) target's text is PMD-mapped again, or None
/// after `limit`.
fn time_to_pmd(t: &Target, since: Instant, limit: Duration) -> Option<Duration> {
    loop {
        if pmd_mapped(t) {
            return Some(since.elapsed());
        }
        if since.elapsed() > limit {
            return None;
        }
    }
}

/// perf_event_open of a uprobe at `offset` in `path`, for `pid`.
fn uprobe_open(pmu_type: u32, path: &std::ffi::CStr, offset: u64, pid: i32) -> std::io::Result<i32> {
    #[repr(C)]
    #[derive(Default)]
    struct PerfEventAttr {
        type_: u32,
        size: u32,
        config: u64,
        sample_period: u64,
        sample_type: u64,
        read_format: u64,
        flags: u64,
        wakeup_events: u32,
        bp_type: u32,
        config1: u64,
        config2: u64,
        rest: [u64; 10],
    }
    let attr = PerfEventAttr {
        type_: pmu_type,
        size: 128,
        config1: path.as_ptr() as u64,
        config2: offset,
        ..Default::default()
    };
    // SAFETY: a valid perf_event_attr (size 128, zero-filled beyond the
    // fields set) and a NUL-terminated path that outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, &attr, pid, -1, -1, 0) };
    if fd < 0 { Err(std::io::Error::last_os_error()) } else { Ok(fd as i32) }
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    let t = Target::spawn(&["--spin"]).expect("thp-target");
    let addr = t.page_addr(PAGE);
    let new = text::mov_eax_ret(7).to_vec();
    let orig = text::mov_eax_ret(text::original_value(PAGE)).to_vec();
    assert!(time_to_pmd(&t, Instant::now(), Duration::from_secs(2)).is_some(), "target not PMD-mapped");

    // hugepoke
    let dev = Device::open().expect("/dev/hugepoke");
    let (mut patch, mut restore, mut back) = (vec![], vec![], vec![]);
    for _ in 0..n {
        let req = PatchRequest { pid: t.pid, addr, bytes: new.clone(), ..Default::default() };
        let s = Instant::now();
        let h = dev.patch(&req).expect("PATCH");
        patch.push(s.elapsed());
        let s = Instant::now();
        dev.restore(h).expect("RESTORE");
        let done = Instant::now();
        restore.push(s.elapsed());
        back.push(time_to_pmd(&t, done, Duration::from_secs(2)).expect("PMD did not come back after RESTORE"));
    }

    // uprobe attach/detach at the same address.
    let pmu: u32 = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")
        .expect("uprobe PMU (CONFIG_UPROBE_EVENTS)")
        .trim()
        .parse()
        .unwrap();
    let path = std::ffi::CString::new(t.file.clone()).unwrap();
    let offset = (PAGE * text::PAGE) as u64;
    let (mut attach, mut detach, mut uback) = (vec![], vec![], vec![]);
    for _ in 0..n {
        let s = Instant::now();
        let fd = uprobe_open(pmu, &path, offset, t.pid).expect("perf_event_open(uprobe)");
        attach.push(s.elapsed());
        let s = Instant::now();
        // SAFETY: closing the perf event fd we opened.
        unsafe { libc::close(fd) };
        let done = Instant::now();
        detach.push(s.elapsed());
        uback.push(time_to_pmd(&t, done, Duration::from_secs(2)).expect("PMD did not come back after uprobe detach"));
    }

    // /proc/PID/mem: the new bytes, then the originals.
    let mem = std::fs::OpenOptions::new().read(true).write(true).open(format!("/proc/{}/mem", t.pid)).expect("/proc/PID/mem");
    let s = Instant::now();
    mem.write_all_at(&new, addr).expect("/proc/PID/mem write");
    let mem_new = s.elapsed();
    let s = Instant::now();
    mem.write_all_at(&orig, addr).expect("/proc/PID/mem write");
    let mem_orig = s.elapsed();
    let mem_back = time_to_pmd(&t, Instant::now(), Duration::from_secs(2));
    let anon_kb = proc::smaps_entry(t.pid, t.addr).map(|s| s.kb("Anonymous")).unwrap_or(0);

    let (p, r, b) = (median(&mut patch), median(&mut restore), median(&mut back));
    let (a, d, ub) = (median(&mut attach), median(&mut detach), median(&mut uback));
    println!("# {n} iterations each, text page {PAGE} of pid {}, medians", t.pid);
    println!("hugepoke PATCH            {p:>12.1?}   {:.2}x uprobe attach", p.as_secs_f64() / a.as_secs_f64());
    println!("hugepoke RESTORE          {r:>12.1?}   {:.2}x uprobe detach", r.as_secs_f64() / d.as_secs_f64());
    println!("PMD back after RESTORE    {b:>12.1?}");
    println!("uprobe attach             {a:>12.1?}");
    println!("uprobe detach             {d:>12.1?}");
    println!("PMD back after detach     {ub:>12.1?}");
    println!("/proc/PID/mem new bytes   {mem_new:>12.1?}");
    println!("/proc/PID/mem originals   {mem_orig:>12.1?}");
    match mem_back {
        Some(t) => println!("PMD back after /proc/PID/mem  {t:.1?}"),
        None => println!("PMD back after /proc/PID/mem  never (2 s; Anonymous {anon_kb} kB remains)"),
    }
}

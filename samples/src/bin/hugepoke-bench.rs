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

/// Outcome of one cycle: how long the two halves took, and the PMD.
struct Cycle {
    on: Duration,
    off: Duration,
    pmd_back: Option<Duration>,
    anon_kb: u64,
}

fn summarize(name: (&str, &str), cycles: &mut [Cycle]) -> (Duration, Duration) {
    let mut on: Vec<_> = cycles.iter().map(|c| c.on).collect();
    let mut off: Vec<_> = cycles.iter().map(|c| c.off).collect();
    let mut back: Vec<_> = cycles.iter().filter_map(|c| c.pmd_back).collect();
    let kept = cycles.iter().filter(|c| c.pmd_back.is_none()).count();
    let (on, off) = (median(&mut on), median(&mut off));
    println!("{:<26}{on:>12.1?}", name.0);
    println!("{:<26}{off:>12.1?}", name.1);
    if back.is_empty() {
        println!("  PMD back after {:<10}    never in {} cycles (Anonymous {} kB left)", name.1, cycles.len(), cycles[0].anon_kb);
    } else {
        println!("  PMD back after {:<10}{:>12.1?} median; not back within 2 s in {kept} of {} cycles", name.1, median(&mut back), cycles.len());
    }
    (on, off)
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    let file = format!("{}/bench.bin", std::env::var("HUGEPOKE_THP_DIR").unwrap_or_else(|_| "/tmp/hugepoke-thp".into()));
    // Every cycle gets a fresh, spinning target on the same file, so every
    // PATCH or attach starts from a PMD-mapped THP at the same text page.
    let fresh = || {
        let t = Target::spawn(&["--spin", "--file", &file]).expect("thp-target");
        assert!(time_to_pmd(&t, Instant::now(), Duration::from_secs(2)).is_some(), "target not PMD-mapped");
        t
    };
    let new = text::mov_eax_ret(7).to_vec();
    let orig = text::mov_eax_ret(text::original_value(PAGE)).to_vec();
    let limit = Duration::from_secs(2);
    let anon = |t: &Target| proc::smaps_entry(t.pid, t.addr).map(|s| s.kb("Anonymous")).unwrap_or(0);

    let dev = Device::open().expect("/dev/hugepoke");
    let mut hp = Vec::new();
    for _ in 0..n {
        let t = fresh();
        let req = PatchRequest { pid: t.pid, addr: t.page_addr(PAGE), bytes: new.clone(), ..Default::default() };
        let s = Instant::now();
        let h = dev.patch(&req).expect("PATCH");
        let on = s.elapsed();
        let s = Instant::now();
        dev.restore(h).expect("RESTORE");
        let off = s.elapsed();
        let pmd_back = time_to_pmd(&t, Instant::now(), limit);
        hp.push(Cycle { on, off, pmd_back, anon_kb: anon(&t) });
    }

    let pmu: u32 = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")
        .expect("uprobe PMU (CONFIG_UPROBE_EVENTS)")
        .trim()
        .parse()
        .unwrap();
    let path = std::ffi::CString::new(file.clone()).unwrap();
    let offset = (PAGE * text::PAGE) as u64;
    let mut up = Vec::new();
    for _ in 0..n {
        let t = fresh();
        let s = Instant::now();
        let fd = uprobe_open(pmu, &path, offset, t.pid).expect("perf_event_open(uprobe)");
        let on = s.elapsed();
        let s = Instant::now();
        // SAFETY: closing the perf event fd we opened.
        unsafe { libc::close(fd) };
        let off = s.elapsed();
        let pmd_back = time_to_pmd(&t, Instant::now(), limit);
        up.push(Cycle { on, off, pmd_back, anon_kb: anon(&t) });
    }

    let t = fresh();
    let mem = std::fs::OpenOptions::new().read(true).write(true).open(format!("/proc/{}/mem", t.pid)).expect("/proc/PID/mem");
    let s = Instant::now();
    mem.write_all_at(&new, t.page_addr(PAGE)).expect("/proc/PID/mem write");
    let mem_on = s.elapsed();
    let s = Instant::now();
    mem.write_all_at(&orig, t.page_addr(PAGE)).expect("/proc/PID/mem write");
    let mem_off = s.elapsed();
    let mut pm = [Cycle { on: mem_on, off: mem_off, pmd_back: time_to_pmd(&t, Instant::now(), limit), anon_kb: anon(&t) }];

    println!("# {n} cycles each on text page {PAGE} of {file}, a fresh spinning target per cycle; medians (TCG guest)");
    let (p, r) = summarize(("hugepoke PATCH", "RESTORE"), &mut hp);
    let (a, d) = summarize(("uprobe attach", "detach"), &mut up);
    summarize(("/proc/PID/mem new bytes", "originals"), &mut pm);
    println!("ratio PATCH/attach   {:.2}", p.as_secs_f64() / a.as_secs_f64());
    println!("ratio RESTORE/detach {:.2}", r.as_secs_f64() / d.as_secs_f64());
}

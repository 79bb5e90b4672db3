//! What the measurements read: the two clocks, one pagemap entry's
//! PMD-ness, the target's bytes, and the module's journal.

use hugepoke::proc::{self, EventLine, Pagemap};
use hugepoke::testkit::target::Target;
use hugepoke::testkit::text;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

/// End the run: a sample that fails its check is never recorded.
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            eprintln!("hugepoke-bench: CHECK FAILED: {}", format!($($msg)+));
            std::process::exit(1);
        }
    };
}
pub(crate) use check;

fn clock(id: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// CLOCK_MONOTONIC, the clock the journal's `time_ns` is on.
pub fn mono_ns() -> i64 {
    clock(libc::CLOCK_MONOTONIC)
}

/// This thread's CPU time.
pub fn thread_cpu_ns() -> i64 {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// One timed call: its result, and its CLOCK_MONOTONIC start and end and
/// the calling thread's CPU time over it.
pub struct Timed<T> {
    pub value: T,
    pub start: i64,
    pub end: i64,
    pub cpu: i64,
}

impl<T> Timed<T> {
    pub fn wall(&self) -> i64 {
        self.end - self.start
    }
}

/// What the CPU-time bracket costs beyond the wall-clock one it encloses
/// (the two CLOCK_MONOTONIC reads, and half of each
/// CLOCK_THREAD_CPUTIME_ID read, a real syscall): subtracted from every
/// sample's CPU time.  Set once by [`calibrate`].
static CPU_OVERHEAD_NS: AtomicI64 = AtomicI64::new(0);

/// Time `f`: the wall-clock bracket is the inner one, so that it holds
/// nothing but the call and two vDSO clock reads.
pub fn timed<T>(f: impl FnOnce() -> T) -> Timed<T> {
    let cpu0 = thread_cpu_ns();
    let start = mono_ns();
    let value = f();
    let end = mono_ns();
    let cpu_raw = thread_cpu_ns() - cpu0;
    // A thread cannot run longer than the wall clock that encloses it.
    let cpu = (cpu_raw - CPU_OVERHEAD_NS.load(Relaxed)).clamp(0, end - start);
    Timed {
        value,
        start,
        end,
        cpu,
    }
}

/// Measure the CPU bracket's own cost: the median of (CPU − wall) over
/// empty calls.
pub fn calibrate() -> i64 {
    CPU_OVERHEAD_NS.store(0, Relaxed);
    let mut extra: Vec<i64> = (0..500)
        .map(|_| {
            let cpu0 = thread_cpu_ns();
            let start = mono_ns();
            let end = mono_ns();
            thread_cpu_ns() - cpu0 - (end - start)
        })
        .collect();
    extra.sort_unstable();
    let overhead = extra[extra.len() / 2].max(0);
    CPU_OVERHEAD_NS.store(overhead, Relaxed);
    overhead
}

/// `/proc/PID/pagemap`, opened once per target, for both PFNs and the
/// PAGEMAP_SCAN ioctl.
pub struct Watch {
    pagemap: Pagemap,
}

impl Watch {
    pub fn open(pid: i32) -> std::io::Result<Self> {
        Ok(Watch {
            pagemap: Pagemap::open(pid)?,
        })
    }

    /// Is the 4 KiB page at `addr` mapped by a present PMD?
    /// ([`Pagemap::pmd_mapped_ranges`]).
    pub fn pmd_mapped(&self, addr: u64) -> bool {
        let r = self
            .pagemap
            .pmd_mapped_ranges(addr, addr + text::PAGE as u64, 1);
        check!(r.is_ok(), "PAGEMAP_SCAN: {}", r.as_ref().unwrap_err());
        !r.unwrap().is_empty()
    }

    /// The PFN mapped at `addr` now, if present (needs root).
    pub fn pfn(&self, addr: u64) -> Option<u64> {
        let e = self.pagemap.entry(addr).ok()?;
        e.present().then(|| e.pfn())
    }

    /// Poll `pmd_mapped(addr)` until it holds or `limit_ns` after `since`.
    /// The first CLOCK_MONOTONIC time it was seen, and the poll count.
    pub fn wait_pmd(&self, addr: u64, since: i64, limit_ns: i64) -> Poll {
        let mut polls = 0u64;
        loop {
            let now = mono_ns();
            polls += 1;
            if self.pmd_mapped(addr) {
                return Poll {
                    seen_at: Some(now),
                    polls,
                    ended: mono_ns(),
                };
            }
            if now - since > limit_ns {
                return Poll {
                    seen_at: None,
                    polls,
                    ended: mono_ns(),
                };
            }
        }
    }
}

pub struct Poll {
    pub seen_at: Option<i64>,
    pub polls: u64,
    pub ended: i64,
}

/// The target's memory, as a debugger sees it.
pub struct Mem(File);

impl Mem {
    pub fn open(pid: i32) -> Self {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"));
        check!(f.is_ok(), "opening /proc/{pid}/mem: {:?}", f.err());
        Mem(f.unwrap())
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let r = self.0.read_exact_at(&mut buf, addr);
        check!(r.is_ok(), "reading the target at {addr:#x}: {:?}", r.err());
        buf
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.0.write_all_at(bytes, addr)
    }
}

/// A fresh target on `file`, its text PMD-mapped (else the run fails).
pub fn fresh_target(file: &str, spin: bool) -> (Target, Watch) {
    let args: &[&str] = if spin {
        &["--spin", "--file", file]
    } else {
        &["--file", file]
    };
    let t = Target::spawn(args);
    check!(t.is_ok(), "spawning thp-target: {:?}", t.err());
    let t = t.unwrap();
    let w = Watch::open(t.pid);
    check!(w.is_ok(), "opening pagemap: {:?}", w.err());
    let w = w.unwrap();
    let p = w.wait_pmd(t.addr, mono_ns(), 2_000_000_000);
    check!(
        p.seen_at.is_some(),
        "target {} text not PMD-mapped within 2 s",
        t.pid
    );
    (t, w)
}

/// Journal events after `seq` for `pid`.
pub fn events_since(seq: u64, pid: i32) -> Vec<EventLine> {
    let text = proc::debugfs("events");
    check!(text.is_ok(), "reading debugfs events: {:?}", text.err());
    let text = text.unwrap();
    let events = proc::parse_events(&text);
    check!(
        events.first().is_none_or(|e| e.seq <= seq + 1),
        "the journal dropped events after seq {seq} (ring overflow)"
    );
    events
        .into_iter()
        .filter(|e| e.seq > seq && e.pid == pid)
        .collect()
}

/// What the journal says about one PATCH + RESTORE of a handle.
#[derive(Debug, Default, PartialEq)]
pub struct Steps {
    pub patch_at: Option<i64>,
    pub restore_at: Option<i64>,
    /// (start, end) of each LRU drain of every CPU.
    pub drains: Vec<(i64, i64)>,
    /// Drains of the caller's own CPU's batches (`lru_add_drain()`).
    pub local_drains: usize,
    pub queued_at: Option<i64>,
    /// When the collapse work finished, and its note.
    pub collapsed: Option<(i64, String)>,
}

/// Pick the steps of `handle` out of the journal.  `patch` carries no
/// handle (it is logged before one exists): the first `patch` event.
pub fn steps(events: &[EventLine], handle: u64) -> Steps {
    let mine = |e: &&EventLine| e.handle == Some(handle);
    let mut s = Steps {
        patch_at: events
            .iter()
            .find(|e| e.step == "patch" && e.result == "ok")
            .map(|e| e.time_ns as i64),
        ..Default::default()
    };
    let mut open = None;
    for e in events.iter().filter(mine) {
        match (e.step.as_str(), e.note.as_str()) {
            ("restore", _) if e.result == "ok" && s.restore_at.is_none() => {
                s.restore_at = Some(e.time_ns as i64)
            }
            ("lru_drain", "draining all CPUs' LRU batches") => open = Some(e.time_ns as i64),
            ("lru_drain", note) if note.starts_with("drained this CPU's LRU batches") => {
                s.local_drains += 1
            }
            ("lru_drain", "drained") => {
                if let Some(t) = open.take() {
                    s.drains.push((t, e.time_ns as i64));
                }
            }
            ("queue_collapse", _) => s.queued_at = Some(e.time_ns as i64),
            _ => {}
        }
    }
    // The collapse work logs the range, not the handle.
    s.collapsed = events
        .iter()
        .find(|e| e.step == "collapse")
        .map(|e| (e.time_ns as i64, format!("{} {}", e.result, e.note)));
    s
}

/// Of threads' results `(start, end, patches, restores)`: how many calls
/// they made, and the wall time from the first start to the last end.
pub(crate) fn calls_and_span<A, B>(results: &[(i64, i64, Vec<A>, Vec<B>)]) -> (usize, i64) {
    let start = results.iter().map(|r| r.0).min().unwrap_or(0);
    let end = results.iter().map(|r| r.1).max().unwrap_or(0);
    (
        results.iter().map(|r| r.2.len() + r.3.len()).sum(),
        end - start,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_from_the_journal() {
        let text = "\
10 1000 42 - 0x7f0000211000 patch - - ok
11 1100 42 - 0x7f0000211000 resolve_target - - ok
12 1500 42 3 0x7f0000211000 patched 0x99 0 ok
13 2000 42 3 0x7f0000211000 restore - - ok
13 2050 42 3 0x7f0000211000 lru_drain - - ok drained this CPU's LRU batches: a copy is still held (another CPU's batch?)
14 2100 42 3 0x7f0000211000 lru_drain - - ok draining all CPUs' LRU batches
15 2600 42 3 0x7f0000211000 lru_drain - - ok drained
16 2700 42 3 0x7f0000200000 queue_collapse - - ok collapse_pte_mapped_thp(install_pmd=false) queued
17 2800 42 3 0x7f0000211000 restored - - ok
18 3900 42 - 0x7f0000200000 collapse - - ok SCAN_SUCCEED: page table retracted; PMD at next fault
";
        let s = steps(&proc::parse_events(text), 3);
        assert_eq!(s.patch_at, Some(1000));
        assert_eq!(s.restore_at, Some(2000));
        assert_eq!(s.drains, vec![(2100, 2600)]);
        assert_eq!(s.local_drains, 1);
        assert_eq!(s.queued_at, Some(2700));
        assert_eq!(
            s.collapsed,
            Some((
                3900,
                "ok SCAN_SUCCEED: page table retracted; PMD at next fault".into()
            ))
        );
        // Another handle's drain is not ours.
        assert_eq!(steps(&proc::parse_events(text), 4).drains, vec![]);
    }
}

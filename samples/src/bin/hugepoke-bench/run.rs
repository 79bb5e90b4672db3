//! The measurements, in the guest.  Every sample is checked before it is
//! recorded: the bytes are read back through /proc/PID/mem (what a
//! debugger sees of the target), the PFN through pagemap, the PMD through
//! PAGEMAP_SCAN; a failed check ends the run (`check!`).

use crate::probe::{calibrate, check, events_since, fresh_target, mono_ns, steps, timed, Mem};
use crate::report::{Bench, Bound, Phase, Row, SiteCost, Stack, Throughput, SCHEMA};
use crate::stats::median;
use crate::trace::{off_cpu, SchedTrace};
use hugepoke::device::{journal_seq, Device, PatchRequest};
use hugepoke::testkit::khugepaged;
use hugepoke::testkit::text::{self, mov_eax_ret, original_value, PAGE, PAGES, THP_SIZE};
use std::ffi::CString;

#[path = "calls.rs"]
mod calls;
#[path = "cli.rs"]
mod cli;
#[path = "file.rs"]
mod file;
#[path = "foreign.rs"]
mod foreign;
#[path = "many.rs"]
mod many;

/// Sites on each page in the "N sites per target" rows.
const SCALE_PER_PAGE: usize = 8;
/// The text page of the single-site methods (not executed: the spinning
/// thread runs page 0).
const SITE_PAGE: usize = 17;
/// How long every method's undo (RESTORE, detach, write-back) gets for
/// its PMD to come back, counted: the same window for each.  khugepaged
/// sleeps through the whole run (`khugepaged_asleep`), so only the
/// method's own work can bring the PMD back in it.
const PMD_WINDOW_NS: i64 = 200_000_000;
const PMD_WINDOW: &str = "200 ms";
/// How long a hugepoke RESTORE gets in all (required): generous, since a
/// loaded host can starve the vCPU that runs the collapse work or the
/// refault; the "PMD visible" rows say how long it really took.
const PMD_REQUIRED_NS: i64 = 2_000_000_000;
const PMD_REQUIRED: &str = "2 s";

pub struct Options {
    pub cycles: usize,
    pub command: String,
    pub commit: String,
    pub host_load: String,
    /// `tcg` or `kvm`: how scripts/bench ran the guest.
    pub accel: String,
    /// Only the phases whose name contains this, or one of its
    /// `|`-separated parts (for trying one out).
    pub only: Option<String>,
    /// The host machine, as scripts/bench describes it.
    pub machine: String,
    /// A file the host keeps its /proc/loadavg in (scripts/bench rewrites
    /// it every second in the directory it shares with the guest).
    pub host_load_file: Option<String>,
}

impl Options {
    /// The host's load now, when scripts/bench shares it.
    fn host_load_now(&self) -> String {
        self.host_load_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map_or_else(|| "unknown".into(), |l| l.trim().to_string())
    }
}

/// A khugepaged tunable or counter (the run fails if it cannot be read).
fn khugepaged_read(name: &str) -> String {
    let v = khugepaged::read(name);
    check!(v.is_ok(), "reading khugepaged's {name}: {:?}", v.err());
    v.unwrap()
}

/// Puts khugepaged to sleep for `f` (a day between scans; the scan the
/// write itself wakes is let finish first), and says what it did meanwhile:
/// it must collapse nothing, so that every "PMD back" is the method's own.
/// khugepaged scans at once when a process registers while none is
/// registered, whatever its sleep: this process keeps `huge_file` (on a
/// huge tmpfs) mapped throughout, so that one always is.
fn khugepaged_asleep(huge_file: &str, f: impl FnOnce()) -> String {
    let file = std::fs::File::open(huge_file);
    check!(file.is_ok(), "opening {huge_file}: {:?}", file.err());
    let file = file.unwrap();
    let len = text::THP_SIZE;
    // SAFETY: a new private read-only mapping of our own open file, unmapped below.
    let keep = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    check!(keep != libc::MAP_FAILED, "mapping {huge_file}");
    let asleep = khugepaged::Asleep::new(86_400_000);
    check!(
        asleep.is_ok(),
        "putting khugepaged to sleep: {:?}",
        asleep.err()
    );
    let asleep = asleep.unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (collapsed, scans) = (
        khugepaged_read("pages_collapsed"),
        khugepaged_read("full_scans"),
    );
    f();
    let (collapsed2, scans2) = (
        khugepaged_read("pages_collapsed"),
        khugepaged_read("full_scans"),
    );
    let sleep = asleep.before().to_string();
    drop(asleep);
    let after = khugepaged_read("scan_sleep_millisecs");
    check!(
        after == sleep,
        "khugepaged's sleep is {after} after the run, was {sleep}"
    );
    // SAFETY: the mapping made above, used by nothing.
    unsafe { libc::munmap(keep, len) };
    check!(
        collapsed == collapsed2 && scans == scans2,
        "khugepaged worked during the run (pages_collapsed {collapsed} then {collapsed2}, full_scans {scans} then {scans2})"
    );
    format!(
        "asleep for the whole run (scan_sleep_millisecs 86400000, {sleep} before and after), \
         finished no scan and collapsed nothing during it (pages_collapsed {collapsed}, full_scans {scans}, before and after)"
    )
}

struct Run {
    dev: Device,
    file: String,
    cycles: usize,
    clock_checks: u64,
    /// Per PMD wait: its time over its poll count.
    poll_ns: Vec<i64>,
    rows: Vec<Row>,
    throughput: Vec<Throughput>,
    uprobe_sleeps: Vec<Stack>,
    site_costs: Vec<SiteCost>,
    ratios: Vec<crate::report::Ratio>,
    /// The caller and its targets are pinned to one CPU (see `same_cpu`).
    same_cpu: bool,
}

fn thp_dir() -> String {
    std::env::var("HUGEPOKE_THP_DIR").unwrap_or_else(|_| "/tmp/hugepoke-thp".into())
}

pub fn run(o: &Options) -> Bench {
    let dev = Device::open();
    check!(dev.is_ok(), "opening /dev/hugepoke: {:?}", dev.err());
    let mut r = Run {
        dev: dev.unwrap(),
        file: format!("{}/bench.bin", thp_dir()),
        cycles: o.cycles,
        clock_checks: 0,
        poll_ns: Vec::new(),
        rows: Vec::new(),
        throughput: Vec::new(),
        uprobe_sleeps: Vec::new(),
        site_costs: Vec::new(),
        ratios: Vec::new(),
        same_cpu: false,
    };
    let cpu_clock_overhead_ns = calibrate();
    let t0 = mono_ns();
    type Step = (&'static str, fn(&mut Run));
    let phases: &[Step] = &[
        ("hugepoke, spinning target", |r| r.hugepoke_single(true)),
        ("hugepoke, spinning target on the caller's CPU", |r| {
            r.same_cpu(|r| r.hugepoke_single(true))
        }),
        ("hugepoke, idle target, --install-pmd", |r| {
            r.hugepoke_single(false)
        }),
        ("uprobe attach/detach, spinning target", |r| {
            r.uprobe(true, false)
        }),
        ("uprobe attach/detach, idle target", |r| {
            r.uprobe(false, false)
        }),
        ("uprobe attach/detach, traced", |r| r.uprobe(true, true)),
        ("/proc/PID/mem, spinning target", |r| r.proc_mem(true)),
        ("/proc/PID/mem, spinning target on the caller's CPU", |r| {
            r.same_cpu(|r| r.proc_mem(true))
        }),
        ("/proc/PID/mem, idle target", |r| r.proc_mem(false)),
        ("single calls on a copied page", |r| r.calls_on_a_copy()),
        ("8 sites per target", |r| r.scale(8)),
        ("64 sites per target", |r| r.scale(64)),
        ("512 sites per target", |r| r.scale(512)),
        ("4096 sites per target", |r| r.scale(4096)),
        ("two targets concurrently", |r| r.concurrent(256)),
        ("10,000 sites: PATCH_BATCH", |r| r.many_batch()),
        ("10,000 sites: single PATCH", |r| r.many_single()),
        ("10,000 sites: /proc/PID/mem", |r| r.many_proc_mem()),
        ("10,000 sites: uprobes", |r| r.many_uprobe()),
        ("10,000 sites: two targets concurrently", |r| {
            r.many_concurrent()
        }),
        ("table: no other live site", |r| r.table(0, true)),
        ("table: 1 other live site", |r| r.table(1, true)),
        ("table: 1,000 other live sites in a batch", |r| {
            r.table(1_000, true)
        }),
        ("table: 10,000 other live sites in a batch", |r| {
            r.table(10_000, true)
        }),
        ("table: 100,000 other live sites in batches", |r| {
            r.table(100_000, true)
        }),
        ("table: 10,000 other live single patches", |r| {
            r.table(10_000, false)
        }),
        ("collapse after 1 other tool's copy", |r| r.foreign(1)),
        ("collapse after 16 other tools' copies", |r| r.foreign(16)),
        ("collapse after 256 other tools' copies", |r| r.foreign(256)),
        ("file scope: 1 process", |r| r.file_scope(1)),
        ("file scope: 8 processes", |r| r.file_scope(8)),
        ("file scope: 64 processes", |r| r.file_scope(64)),
        ("CLI: 10,000 sites by symbol in libLLVM", |r| r.cli_sites()),
    ];
    let mut done = Vec::new();
    let keep = format!("{}/khugepaged-keep.bin", thp_dir());
    let w = std::fs::write(&keep, text::blob());
    check!(w.is_ok(), "writing {keep}: {:?}", w.err());
    let khugepaged = khugepaged_asleep(&keep, || {
        for (name, f) in phases {
            if o.only
                .as_ref()
                .is_none_or(|only| only.split('|').any(|o| name.contains(o)))
            {
                eprintln!(
                    "hugepoke-bench: {name} ({:.1} s)",
                    (mono_ns() - t0) as f64 / 1e9
                );
                let (before, start) = (o.host_load_now(), mono_ns());
                f(&mut r);
                done.push(Phase {
                    name: name.to_string(),
                    wall_ns: mono_ns() - start,
                    host_load_before: before,
                    host_load_after: o.host_load_now(),
                });
            }
        }
    });
    eprintln!(
        "hugepoke-bench: done ({:.1} s)",
        (mono_ns() - t0) as f64 / 1e9
    );
    Bench {
        schema: SCHEMA,
        command: o.command.clone(),
        commit: o.commit.clone(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .into(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        host_load: o.host_load.clone(),
        accel: o.accel.clone(),
        cycles: o.cycles,
        pmd_poll_ns: median(&r.poll_ns).unwrap_or(0),
        clock_checks: r.clock_checks,
        cpu_clock_overhead_ns,
        rows: r.rows,
        throughput: r.throughput,
        uprobe_sleeps: r.uprobe_sleeps,
        site_costs: r.site_costs,
        machine: o.machine.clone(),
        ratios: r.ratios,
        phases: done,
        khugepaged,
    }
}

/// The original function at the start of `page`, and a replacement.
fn original(page: usize) -> Vec<u8> {
    mov_eax_ret(original_value(page)).to_vec()
}

fn new_bytes(k: usize) -> Vec<u8> {
    mov_eax_ret(0x7000_0000 + k as u32).to_vec()
}

fn perf_uprobe_open(pmu_type: u32, path: &CString, offset: u64, pid: i32) -> std::io::Result<i32> {
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
    if fd < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fd as i32)
    }
}

fn close(fd: i32) -> i32 {
    // SAFETY: closes a perf event descriptor this thread opened and nothing else uses.
    unsafe { libc::close(fd) }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

fn set_affinity(cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and
    // sched_setaffinity(0 = this thread) only touch it and this thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    check!(
        rc == 0,
        "sched_setaffinity({cpus:?}): {}",
        std::io::Error::last_os_error()
    );
}

/// One single-site cycle's target: its text, pagemap and memory, the
/// site on page `SITE_PAGE`, and the page-cache PFN mapped there.
struct Site {
    t: hugepoke::testkit::target::Target,
    w: crate::probe::Watch,
    mem: Mem,
    addr: u64,
    cache_pfn: Option<u64>,
}

impl Run {
    /// A fresh target for one cycle of a single-site method, checked as
    /// every such cycle starts: placed (see `same_cpu`), the original
    /// function at the site, a page-cache PFN there.
    fn fresh_site(&self, spin: bool) -> Site {
        let (t, w) = fresh_target(&self.file, spin);
        self.check_placement(t.pid);
        let mem = Mem::open(t.pid);
        let addr = t.page_addr(SITE_PAGE);
        check!(
            mem.read(addr, 6) == original(SITE_PAGE),
            "target's page {SITE_PAGE} is not the original function"
        );
        let cache_pfn = w.pfn(addr);
        check!(
            cache_pfn.is_some(),
            "no PFN for the site (pagemap needs root)"
        );
        Site {
            t,
            w,
            mem,
            addr,
            cache_pfn,
        }
    }

    /// Run `f` with this thread pinned to CPU 0; the targets it spawns
    /// inherit that, so the spinning thread shares the caller's CPU: no
    /// other CPU runs the target's mm while the caller is in the kernel
    /// (no TLB-flush IPI to wait for, no remote LRU batch).  A control for
    /// what a target spinning on another CPU costs.
    fn same_cpu(&mut self, f: impl FnOnce(&mut Self)) {
        let all: Vec<usize> =
            (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        set_affinity(&[0]);
        self.same_cpu = true;
        f(self);
        self.same_cpu = false;
        set_affinity(&all);
    }

    /// On `same_cpu`, check that the target really is confined to CPU 0.
    fn check_placement(&self, pid: i32) {
        if self.same_cpu {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            check!(
                status.lines().any(|l| l == "Cpus_allowed_list:\t0"),
                "target {pid} is not confined to CPU 0"
            );
        }
    }

    /// Row tag and words for a target kind, with the CPU placement.
    fn who(&self, spin: bool, extra: &str) -> (String, String) {
        match (spin, self.same_cpu) {
            (true, true) => (
                "spin1cpu".into(),
                format!("spinning target on the caller's CPU{extra}"),
            ),
            (true, false) => ("spin".into(), format!("spinning target{extra}")),
            (false, _) => ("idle".into(), format!("idle target{extra}")),
        }
    }

    fn poll_cost(&mut self, since: i64, p: &crate::probe::Poll) {
        if p.polls > 0 {
            self.poll_ns.push((p.ended - since) / p.polls as i64);
        }
    }

    /// One site on page 17, PATCH then RESTORE, a fresh target per cycle.
    /// Spinning: default flags (PMD at the spinning thread's next fault);
    /// idle: --install-pmd (nothing would fault it back otherwise).
    fn hugepoke_single(&mut self, spin: bool) {
        let (tag, who) = self.who(spin, if spin { "" } else { ", --install-pmd" });
        let read_back = "bytes read back (new after PATCH, originals after RESTORE); anonymous PFN after PATCH; \
                         page-cache PFN and PMD back after RESTORE; journal stamps inside the ioctl";
        let mut patch = Row::new(&format!("hugepoke.patch.{tag}"), &format!("hugepoke PATCH ({who})"),
            "the PATCH ioctl, from the caller: GUP with FOLL_SPLIT_PMD (PMD split), COW, the write under the PT lock", read_back);
        let mut restore = Row::new(&format!("hugepoke.restore.{tag}"), &format!("hugepoke RESTORE ({who})"),
            "the RESTORE ioctl, from the caller: find the anonymous copy, verify, write back, LRU drain when needed, zap, queue the collapse (not wait for it)",
            read_back);
        let mut drain = Row::new(&format!("hugepoke.drain.{tag}"), &format!("  of which LRU drain of every CPU ({who})"),
            "lru_add_drain_all() inside RESTORE: journal `lru_drain` \"drained\" minus \"draining\" time_ns", "");
        let mut after = Row::new(&format!("hugepoke.collapsed.{tag}"), &format!("  collapse work done, after RESTORE returned ({who})"),
            "journal `collapse` time_ns minus the CLOCK_MONOTONIC time RESTORE returned (negative: done before the caller saw the return)", "");
        let mut work = Row::new(&format!("hugepoke.work.{tag}"), &format!("  queue_collapse → collapse done ({who})"),
            "journal `collapse` minus `queue_collapse` time_ns: the work item's wait for a worker plus collapse_pte_mapped_thp()", "");
        let mut visible = Row::new(&format!("hugepoke.pmd.{tag}"), &format!("  PMD visible in pagemap, after RESTORE returned ({who})"),
            "first PAGEMAP_SCAN poll of the site's page that shows PAGE_IS_HUGE|PRESENT, minus the time RESTORE returned; includes the collapse work and (spinning) the target's refault",
            "");
        let (mut drains, mut local, mut restores, mut in_window) = (0, 0, 0, 0);
        let new = new_bytes(SITE_PAGE);
        let orig = original(SITE_PAGE);
        for _ in 0..self.cycles {
            let Site {
                t,
                w,
                mem,
                addr,
                cache_pfn,
            } = self.fresh_site(spin);
            let seq = journal_seq();
            let req = PatchRequest {
                pid: t.pid,
                addr,
                bytes: new.clone(),
                install_pmd: !spin,
                ..Default::default()
            };
            let p = timed(|| self.dev.patch(&req));
            check!(p.value.is_ok(), "PATCH: {:?}", p.value);
            let h = *p.value.as_ref().unwrap();
            check!(
                mem.read(addr, 6) == new,
                "after PATCH the target does not have the new bytes"
            );
            check!(
                w.pfn(addr).is_some_and(|f| Some(f) != cache_pfn),
                "after PATCH the site is not on an anonymous copy"
            );
            let r = timed(|| self.dev.restore(h));
            check!(r.value.is_ok(), "RESTORE: {:?}", r.value);
            let poll_start = mono_ns();
            let mut poll = w.wait_pmd(addr, r.end, PMD_WINDOW_NS);
            self.poll_cost(poll_start, &poll);
            in_window += usize::from(poll.seen_at.is_some());
            if poll.seen_at.is_none() {
                poll = w.wait_pmd(addr, r.end, PMD_REQUIRED_NS);
            }
            if poll.seen_at.is_none() {
                let s = steps(&events_since(seq, t.pid), h);
                check!(
                    false,
                    "PMD not back within {PMD_REQUIRED} of RESTORE (target {}); journal: {s:?}",
                    t.pid
                );
            }
            check!(
                w.pfn(addr) == cache_pfn,
                "after RESTORE the site does not map the page-cache page"
            );
            check!(
                mem.read(addr, 6) == orig,
                "after RESTORE the target does not have the original bytes"
            );
            // The work journals its outcome after collapse_pte_mapped_thp()
            // returns: a spinning target may fault the PMD in before that.
            let mut s = steps(&events_since(seq, t.pid), h);
            let asked = mono_ns();
            while s.collapsed.is_none() && mono_ns() - asked < 2_000_000_000 {
                std::thread::sleep(std::time::Duration::from_millis(1));
                s = steps(&events_since(seq, t.pid), h);
            }
            let inside = |at: Option<i64>, a: i64, b: i64| at.is_some_and(|t| a <= t && t <= b);
            check!(
                inside(s.patch_at, p.start, p.end),
                "journal `patch` {:?} not inside the PATCH call [{}, {}]",
                s.patch_at,
                p.start,
                p.end
            );
            check!(
                inside(s.restore_at, r.start, r.end),
                "journal `restore` {:?} not inside the RESTORE call [{}, {}]",
                s.restore_at,
                r.start,
                r.end
            );
            let Some((done, note)) = &s.collapsed else {
                check!(
                    false,
                    "no collapse in the journal 2 s after the PMD came back: {s:?}"
                );
                unreachable!()
            };
            check!(note.starts_with("ok SCAN_SUCCEED"), "collapse: {note}");
            let queued = s.queued_at.unwrap_or(0);
            check!(
                inside(s.queued_at, r.start, r.end),
                "journal `queue_collapse` {:?} not inside RESTORE",
                s.queued_at
            );
            patch.push(p.wall(), p.cpu);
            restore.push(r.wall(), r.cpu);
            restores += 1;
            for (a, b) in &s.drains {
                check!(
                    r.start <= *a && *b <= r.end,
                    "a drain outside the RESTORE call"
                );
                drain.samples_ns.push(b - a);
            }
            drains += usize::from(!s.drains.is_empty());
            local += usize::from(s.local_drains > 0 && s.drains.is_empty());
            // patch, restore, queue_collapse, and each drain's two stamps.
            self.clock_checks += 3 + 2 * s.drains.len() as u64;
            after.samples_ns.push(done - r.end);
            work.samples_ns.push(done - queued);
            visible.samples_ns.push(poll.seen_at.unwrap() - r.end);
        }
        restore.count(
            &format!("PMD back within {PMD_WINDOW} (every one within {PMD_REQUIRED}, required)"),
            in_window,
            restores,
        );
        restore.count(
            "RESTOREs that drained only their own CPU's LRU batches",
            local,
            restores,
        );
        restore.count("RESTOREs that drained every CPU's", drains, restores);
        let drain = drain.bound_by(Bound::Wall, "flush_work() on every CPU with a non-empty batch: a worker must run there (a spinning CPU lets it in at a tick or preemption)");
        let after = after.bound_by(
            Bound::Wall,
            "a workqueue worker must be scheduled; then collapse_pte_mapped_thp() runs on its CPU",
        );
        let work = work.bound_by(Bound::Wall, "as the row above, from the queueing");
        let visible = visible.bound_by(
            Bound::Wall,
            "the collapse work and the target's own refault, on other threads",
        );
        self.rows.extend([
            patch.classify(),
            restore.classify(),
            drain,
            after,
            work,
            visible,
        ]);
    }

    /// perf_event_open of a uprobe at the site (attach) and close (detach).
    /// Traced: the same, with the closing thread's sleeps and their stacks.
    /// The PMD is waited for only on a spinning target (an idle one never
    /// faults it back).
    fn uprobe(&mut self, spin: bool, traced: bool) {
        let (tag, who) = if spin {
            ("spin", "spinning target")
        } else {
            ("idle", "idle target")
        };
        let pmu = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type");
        check!(pmu.is_ok(), "no uprobe PMU (CONFIG_UPROBE_EVENTS)");
        let pmu: u32 = pmu.unwrap().trim().parse().unwrap_or(0);
        let path = CString::new(self.file.clone()).unwrap();
        let offset = (SITE_PAGE * PAGE) as u64;
        let orig = original(SITE_PAGE);
        let mut int3 = orig.clone();
        int3[0] = 0xcc;
        let checked = "int3 (0xcc) then the original 5 bytes read back after attach, the originals after detach; anonymous PFN after attach";
        let mut attach = Row::new(&format!("uprobe.attach.{tag}"), &format!("uprobe attach (perf_event_open, {who})"),
            "perf_event_open(2) of a `uprobe` PMU event for the target's pid: perf_event_alloc() (may wait for an RCU grace period), the trace_uprobe, uprobe_register() (register_for_each_vma() under percpu_down_write(&dup_mmap_sem), whose rcu_sync_enter() waits for a grace period), and uprobe_apply() writing the int3 (GUP fault and COW of the page)", checked);
        let mut detach = Row::new(&format!("uprobe.detach.{tag}"), &format!("uprobe detach (close, {who})"),
            "close(2) of that event: uprobe_apply(false) writes the original byte back (register_for_each_vma(): rcu_sync_enter()'s grace period, unless the last writer's still holds), uprobe_unregister_nosync(), uprobe_unregister_sync() (synchronize_rcu_tasks_trace() = synchronize_srcu(&rcu_tasks_trace_srcu_struct), then synchronize_srcu(&uretprobes_srcu)), then perf_trace_event_unreg()'s tracepoint_synchronize_unregister() (the same two SRCU waits, the second for tracepoint_srcu)",
            checked);
        // The traced cycles: each call with its blocked intervals.
        let mut traced_rows = [
            (Row::new("uprobe.attach.traced", "uprobe attach, traced (perf_event_open, spinning target)",
                "as row \"uprobe attach (perf_event_open, spinning target)\", in separate cycles, with sched_switch tracing of the calling thread on (a kernel stack at every switch-out)", checked),
             Row::new("uprobe.attach.gp", "  of which asleep in grace-period waits", "", ""),
             Row::new("uprobe.attach.other", "  of which asleep elsewhere", "", "")),
            (Row::new("uprobe.detach.traced", "uprobe detach, traced (close, spinning target)",
                "as row \"uprobe detach (close, spinning target)\", in separate cycles, with sched_switch tracing of the closing thread on", checked),
             Row::new("uprobe.detach.gp", "  of which asleep in grace-period waits", "", ""),
             Row::new("uprobe.detach.other", "  of which asleep elsewhere", "", "")),
        ];
        let mut waits: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
        let (mut outside, mut traced_sleeps) = (0, 0);
        let (mut pmd_back, mut cache_back) = (0, 0);
        let tracer = traced.then(|| SchedTrace::start(gettid()));
        for _ in 0..self.cycles {
            let Site {
                t,
                w,
                mem,
                addr,
                cache_pfn,
            } = self.fresh_site(spin);
            let (a, attach_trace) = match &tracer {
                Some(tr) => {
                    let (a, text) =
                        tr.around(|| timed(|| perf_uprobe_open(pmu, &path, offset, t.pid)));
                    (a, Some(text))
                }
                None => (timed(|| perf_uprobe_open(pmu, &path, offset, t.pid)), None),
            };
            check!(a.value.is_ok(), "perf_event_open(uprobe): {:?}", a.value);
            let fd = *a.value.as_ref().unwrap();
            check!(
                mem.read(addr, 6) == int3,
                "after attach the target does not have int3 at the site"
            );
            check!(
                w.pfn(addr).is_some_and(|f| Some(f) != cache_pfn),
                "after attach the site is not on an anonymous copy"
            );
            let (d, trace) = match &tracer {
                Some(tr) => {
                    let (d, text) = tr.around(|| timed(|| close(fd)));
                    (d, Some(text))
                }
                None => (timed(|| close(fd)), None),
            };
            check!(
                d.value == 0,
                "close(uprobe event): {}",
                std::io::Error::last_os_error()
            );
            if let (Some(attach_text), Some(detach_text)) = (attach_trace, trace) {
                let calls = [
                    ("attach", a.start, a.end, a.wall(), a.cpu, attach_text),
                    ("detach", d.start, d.end, d.wall(), d.cpu, detach_text),
                ];
                for (i, (during, start, end, wall, cpu, text)) in calls.into_iter().enumerate() {
                    // Trace stamps are whole µs: a µs of slack either side.
                    let (sleeps, out): (Vec<_>, Vec<_>) = off_cpu(&text, gettid())
                        .into_iter()
                        .partition(|o| start <= o.from_ns + 1_000 && o.to_ns <= end + 1_000);
                    outside += out.len();
                    traced_sleeps += out.len() + sleeps.len();
                    if during == "detach" {
                        check!(!sleeps.is_empty(), "no blocked interval traced inside the close() bracket: trace clock not CLOCK_MONOTONIC, or tracing broken");
                    }
                    let (g, rest): (Vec<_>, Vec<_>) = sleeps.iter().partition(|o| o.grace_period());
                    let (row, gp, other) = &mut traced_rows[i];
                    row.push(wall, cpu);
                    gp.samples_ns
                        .push(g.iter().map(|o| o.to_ns - o.from_ns).sum());
                    other
                        .samples_ns
                        .push(rest.iter().map(|o| o.to_ns - o.from_ns).sum());
                    waits[i].push(g.len());
                    for o in &sleeps {
                        let frames = o.stack_from_schedule();
                        match self
                            .uprobe_sleeps
                            .iter_mut()
                            .find(|s| s.during == during && s.frames == frames)
                        {
                            Some(s) => s.count += 1,
                            None => self.uprobe_sleeps.push(Stack {
                                during: during.into(),
                                count: 1,
                                grace_period: o.grace_period(),
                                frames,
                            }),
                        }
                    }
                }
            } else {
                attach.push(a.wall(), a.cpu);
                detach.push(d.wall(), d.cpu);
                if spin {
                    let poll_start = mono_ns();
                    let poll = w.wait_pmd(addr, d.end, PMD_WINDOW_NS);
                    self.poll_cost(poll_start, &poll);
                    pmd_back += usize::from(poll.seen_at.is_some());
                }
                cache_back += usize::from(w.pfn(addr) == cache_pfn);
            }
            check!(
                mem.read(addr, 6) == orig,
                "after detach the target does not have the original bytes"
            );
        }
        if traced {
            self.uprobe_sleeps
                .sort_by(|a, b| a.during.cmp(&b.during).then(b.count.cmp(&a.count)));
            for (i, (row, mut gp, mut other)) in traced_rows.into_iter().enumerate() {
                let n = waits[i].len();
                let mut ks = waits[i].clone();
                ks.sort_unstable();
                ks.dedup();
                for k in ks {
                    gp.count(
                        &format!("calls with {k} grace-period sleeps"),
                        waits[i].iter().filter(|&&x| x == k).count(),
                        n,
                    );
                }
                gp.includes = "the calling thread's blocked intervals inside the call (switch-out to switch-in; sched_switch on the `mono` trace clock, µs stamps) whose kernel stack holds synchronize_srcu/synchronize_rcu: stacks below the table".into();
                other.includes = "the calling thread's other blocked intervals inside the call (mutexes, I/O, …)".into();
                if i == 1 {
                    other.count(
                        "blocked intervals traced outside the calls' brackets (not counted above)",
                        outside,
                        traced_sleeps,
                    );
                }
                let gp = gp.bound_by(Bound::Wall, "RCU and SRCU grace periods: driven by the RCU machinery's kthreads, workqueues and ticks, not by the caller's CPU");
                let other = other.bound_by(Bound::Wall, "asleep, by definition");
                self.rows.extend([row.classify(), gp, other]);
            }
        } else {
            if spin {
                detach.count(
                    &format!("PMD back within {PMD_WINDOW}"),
                    pmd_back,
                    self.cycles,
                );
            }
            detach.count("page-cache page mapped again", cache_back, self.cycles);
            self.rows.extend([attach.classify(), detach.classify()]);
        }
    }

    /// pwrite of the new bytes into /proc/PID/mem, then of the originals.
    fn proc_mem(&mut self, spin: bool) {
        let (tag, who) = self.who(spin, "");
        let new = new_bytes(SITE_PAGE);
        let orig = original(SITE_PAGE);
        let checked = "bytes read back after each write; anonymous PFN after the first";
        let mut first = Row::new(&format!("procmem.new.{tag}"), &format!("/proc/PID/mem write of new bytes ({who})"),
            "pwrite(2) of 6 bytes into /proc/PID/mem of a fresh target whose text is a PMD-mapped page-cache THP: GUP FOLL_FORCE|FOLL_WRITE (PMD split, COW), copy", checked);
        let mut second = Row::new(&format!("procmem.orig.{tag}"), &format!("/proc/PID/mem write of the originals ({who})"),
            "pwrite(2) of the original 6 bytes right after: the page is already the anonymous copy (no COW); nothing zaps it or collapses", checked);
        let (mut pmd_back, mut cache_back) = (0, 0);
        for _ in 0..self.cycles {
            let Site {
                t: _target,
                w,
                mem,
                addr,
                cache_pfn,
            } = self.fresh_site(spin);
            // `_target` keeps the target alive to the end of the cycle.
            let a = timed(|| mem.write(addr, &new));
            check!(a.value.is_ok(), "/proc/PID/mem write: {:?}", a.value);
            check!(
                mem.read(addr, 6) == new,
                "after the write the target does not have the new bytes"
            );
            check!(
                w.pfn(addr).is_some_and(|f| Some(f) != cache_pfn),
                "after the write the site is not on an anonymous copy"
            );
            let b = timed(|| mem.write(addr, &orig));
            check!(b.value.is_ok(), "/proc/PID/mem write: {:?}", b.value);
            check!(
                mem.read(addr, 6) == orig,
                "after the second write the target does not have the originals"
            );
            if spin {
                let poll_start = mono_ns();
                let poll = w.wait_pmd(addr, b.end, PMD_WINDOW_NS);
                self.poll_cost(poll_start, &poll);
                pmd_back += usize::from(poll.seen_at.is_some());
            }
            cache_back += usize::from(w.pfn(addr) == cache_pfn);
            first.push(a.wall(), a.cpu);
            second.push(b.wall(), b.cpu);
        }
        if spin {
            second.count(
                &format!("PMD back within {PMD_WINDOW}"),
                pmd_back,
                self.cycles,
            );
        }
        second.count("page-cache page mapped again", cache_back, self.cycles);
        self.rows.extend([first.classify(), second.classify()]);
    }

    /// `sites` live sites on one idle target, 8 on each page for every
    /// `sites` (so 1 PATCH in 8 COWs a page and 1 RESTORE in 8 zaps one):
    /// PATCH each (the table grows), then RESTORE each; a fresh target
    /// per cycle, at least 3 cycles and 100 samples.
    fn scale(&mut self, sites: usize) {
        assert!(sites.is_multiple_of(SCALE_PER_PAGE) && sites <= SCALE_PER_PAGE * PAGES);
        let cycles = self.cycles.div_ceil(sites).max(3);
        let checked = &format!("each site's bytes read back after its call; the whole 2 MiB text compared with what it must be after the last PATCH and after the last RESTORE; the PMD back within {PMD_REQUIRED} of the last RESTORE");
        let mut patch = Row::new(&format!("scale.patch.{sites}"), &format!("PATCH, {sites} sites per target, 8 a page (idle, --install-pmd, a fresh target per cycle)"),
            &format!("one PATCH ioctl while the target has 0 to {} other live sites, 8 sites on each of {} pages (6 bytes each, in the int3 padding, 64 + 512·k bytes into the page), so the first of each page's 8 splits the PMD (once) and COWs", sites - 1, sites / SCALE_PER_PAGE), checked);
        let mut restore = Row::new(&format!("scale.restore.{sites}"), &format!("RESTORE, {sites} sites per target, 8 a page (idle, --install-pmd, a fresh target per cycle)"),
            &format!("one RESTORE ioctl, the {sites} sites restored in PATCH order; the last on a page drains (when needed) and zaps, the last of all queues the collapse"), checked);
        for _ in 0..cycles {
            let (t, w) = fresh_target(&self.file, false);
            let mem = Mem::open(t.pid);
            let pristine = text::blob();
            check!(
                mem.read(t.addr, THP_SIZE) == pristine,
                "target's text is not the pristine blob"
            );
            let mut image = pristine.clone();
            let mut handles = Vec::with_capacity(sites);
            for k in 0..sites {
                let at = (k / SCALE_PER_PAGE) * PAGE + 64 + (k % SCALE_PER_PAGE) * 512;
                let bytes = new_bytes(k);
                let req = PatchRequest {
                    pid: t.pid,
                    addr: t.addr + at as u64,
                    bytes: bytes.clone(),
                    install_pmd: true,
                    ..Default::default()
                };
                let p = timed(|| self.dev.patch(&req));
                check!(p.value.is_ok(), "PATCH site {k}: {:?}", p.value);
                check!(
                    mem.read(req.addr, 6) == bytes,
                    "site {k}: new bytes not read back"
                );
                patch.push(p.wall(), p.cpu);
                image[at..at + 6].copy_from_slice(&bytes);
                handles.push((*p.value.as_ref().unwrap(), req.addr, at));
            }
            check!(
                mem.read(t.addr, THP_SIZE) == image,
                "after {sites} PATCHes the text is not the blob plus exactly those sites"
            );
            let mut last_end = 0;
            for (k, (h, addr, at)) in handles.into_iter().enumerate() {
                let r = timed(|| self.dev.restore(h));
                check!(r.value.is_ok(), "RESTORE site {k}: {:?}", r.value);
                check!(
                    mem.read(addr, 6) == pristine[at..at + 6],
                    "site {k}: originals not read back"
                );
                restore.push(r.wall(), r.cpu);
                last_end = r.end;
            }
            let poll = w.wait_pmd(t.addr, last_end, PMD_REQUIRED_NS);
            check!(
                poll.seen_at.is_some(),
                "PMD not back within {PMD_REQUIRED} of the last of {sites} RESTOREs"
            );
            check!(
                mem.read(t.addr, THP_SIZE) == pristine,
                "after the RESTOREs the text is not the pristine blob"
            );
        }
        self.rows.extend([patch.classify(), restore.classify()]);
    }

    /// `sites` PATCHes then RESTOREs on one target by one thread, then on
    /// two targets by two threads at once (each its own /dev/hugepoke).
    fn concurrent(&mut self, sites: usize) {
        let reps = self.cycles.div_ceil(sites).max(5);
        let dir = thp_dir();
        let checked = "each site's bytes read back after its call";
        let mut patch = Row::new("concurrent.patch", "PATCH, 2 targets patched concurrently (idle, --install-pmd)",
            &format!("one PATCH ioctl by one of two threads, each patching {sites} sites into its own target at the same time"), checked);
        let mut restore = Row::new(
            "concurrent.restore",
            "RESTORE, 2 targets concurrently (idle, --install-pmd)",
            "one RESTORE ioctl by one of the two threads, each restoring its own target's sites",
            checked,
        );
        // Repetitions alternate which of one and two threads goes first.
        let (mut walls, mut calls) = ([Vec::new(), Vec::new()], [0, 0]);
        for rep in 0..reps {
            let order = if rep.is_multiple_of(2) {
                [1, 2]
            } else {
                [2, 1]
            };
            for threads in order {
                let (c, wall, samples) =
                    patch_restore(&format!("{dir}/bench-a.bin"), sites, threads);
                calls[threads - 1] = c;
                walls[threads - 1].push(wall);
                if threads == 2 {
                    for (p, r) in samples {
                        patch.samples_ns.extend(p.iter().map(|s| s.0));
                        patch.on_cpu_ns.extend(p.iter().map(|s| s.1));
                        restore.samples_ns.extend(r.iter().map(|s| s.0));
                        restore.on_cpu_ns.extend(r.iter().map(|s| s.1));
                    }
                }
            }
        }
        self.rows.extend([patch.classify(), restore.classify()]);
        let [one, two] = walls;
        self.throughput.push(Throughput::from_reps(
            format!("PATCH + RESTORE of {sites} sites, one target"),
            1,
            calls[0],
            calls[0] / 2,
            one,
        ));
        self.throughput.push(Throughput::from_reps(
            format!("PATCH + RESTORE of {sites} sites each, two targets at once"),
            2,
            calls[1],
            calls[1] / 2,
            two,
        ));
    }
}

type Samples = Vec<(i64, i64)>;

/// `threads` threads, each with its own device and idle target (on its own
/// file, `base` with the thread number), PATCH `sites` sites then RESTORE
/// them.  Calls made, wall time from the first start to the last end, and
/// each thread's (wall, cpu) per PATCH and per RESTORE.
fn patch_restore(
    base: &str,
    sites: usize,
    threads: usize,
) -> (usize, i64, Vec<(Samples, Samples)>) {
    let barrier = std::sync::Barrier::new(threads);
    let results: Vec<(i64, i64, Samples, Samples)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|i| {
                let barrier = &barrier;
                let file = base.replace("-a.", &format!("-{}.", (b'a' + i as u8) as char));
                s.spawn(move || {
                    let dev = Device::open();
                    check!(dev.is_ok(), "opening /dev/hugepoke: {:?}", dev.err());
                    let dev = dev.unwrap();
                    let (t, _w) = fresh_target(&file, false);
                    let mem = Mem::open(t.pid);
                    let (mut ps, mut rs) = (Vec::new(), Vec::new());
                    let mut handles = Vec::new();
                    barrier.wait();
                    let start = mono_ns();
                    for k in 0..sites {
                        let addr = t.page_addr(k % PAGES) + 64 + (k / PAGES * 512) as u64;
                        let bytes = new_bytes(k);
                        let req = PatchRequest {
                            pid: t.pid,
                            addr,
                            bytes: bytes.clone(),
                            install_pmd: true,
                            ..Default::default()
                        };
                        let p = timed(|| dev.patch(&req));
                        check!(
                            p.value.is_ok(),
                            "PATCH (thread {i}) site {k}: {:?}",
                            p.value
                        );
                        check!(
                            mem.read(addr, 6) == bytes,
                            "thread {i} site {k}: new bytes not read back"
                        );
                        ps.push((p.wall(), p.cpu));
                        handles.push((*p.value.as_ref().unwrap(), addr));
                    }
                    for (k, (h, addr)) in handles.into_iter().enumerate() {
                        let r = timed(|| dev.restore(h));
                        check!(
                            r.value.is_ok(),
                            "RESTORE (thread {i}) site {k}: {:?}",
                            r.value
                        );
                        check!(
                            mem.read(addr, 6) == [0xcc; 6],
                            "thread {i} site {k}: originals (int3) not read back"
                        );
                        rs.push((r.wall(), r.cpu));
                    }
                    (start, mono_ns(), ps, rs)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .collect()
    });
    let (calls, span) = crate::probe::calls_and_span(&results);
    (
        calls,
        span,
        results.into_iter().map(|r| (r.2, r.3)).collect(),
    )
}

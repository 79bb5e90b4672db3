//! Many sites (issue 10): 10,000 sites on 100 pages of one THP text by
//! PATCH_BATCH, by single PATCHes, by uprobes and by /proc/PID/mem writes,
//! and their undoing; one PATCH's cost while 0 to 100,000 other sites are
//! live; batches into two targets from two threads at once.  As everywhere
//! in the bench, every sample is checked before it is kept.

use super::{Run, Site, PMD_REQUIRED, PMD_REQUIRED_NS, SITE_PAGE};
use crate::probe::{check, events_since, fresh_target, mono_ns, timed, Mem, Timed, Watch};
use crate::report::{Row, SiteCost, Throughput};
use crate::stats::median;
use hugepoke::device::{batch_site, journal_seq, Device, PatchRequest};
use hugepoke::testkit::target::Target;
use hugepoke::testkit::text::{self, PAGE, PAGES, THP_SIZE};
use hugepoke::uapi::{BatchSite, MAX_BATCH, PATCH_INSTALL_PMD};
use std::ffi::CString;

/// The sites: `PER_PAGE` on each of `SITE_PAGES` pages from `FIRST_PAGE`,
/// one byte each, at 64 + 40·k into the page.
const FIRST_PAGE: usize = 100;
const SITE_PAGES: usize = 100;
const PER_PAGE: usize = 100;
pub(crate) const SITES: usize = SITE_PAGES * PER_PAGE;
/// What the bench file holds at every site (an instruction a uprobe can
/// probe: it refuses int3 padding), and what every method writes there
/// (what a uprobe writes).
const NOP: u8 = 0x90;
const INT3: u8 = 0xcc;

/// Offsets of the sites into the text, in address order.
fn site_offsets() -> Vec<usize> {
    (0..SITES)
        .map(|i| (FIRST_PAGE + i / PER_PAGE) * PAGE + 64 + 40 * (i % PER_PAGE))
        .collect()
}

/// The text with `byte` at every site.
fn text_with(byte: u8) -> Vec<u8> {
    let mut b = text::blob();
    for at in site_offsets() {
        b[at] = byte;
    }
    b
}

/// A target on a file whose text has a nop at every site, and the
/// page-cache PFN of every text page.
struct Many {
    t: Target,
    w: Watch,
    mem: Mem,
    cache_pfns: Vec<Option<u64>>,
}

impl Many {
    fn spawn(file: &str) -> Self {
        let (t, w) = fresh_target(file, false);
        let mem = Mem::open(t.pid);
        check!(
            mem.read(t.addr, THP_SIZE) == text_with(NOP),
            "target {} text is not the bench's nop layout",
            t.pid
        );
        let cache_pfns: Vec<Option<u64>> = (0..PAGES).map(|p| w.pfn(t.page_addr(p))).collect();
        check!(
            cache_pfns.iter().all(Option::is_some),
            "no PFNs for the text (pagemap needs root)"
        );
        Many {
            t,
            w,
            mem,
            cache_pfns,
        }
    }

    fn addr(&self, offset: usize) -> u64 {
        self.t.addr + offset as u64
    }

    /// Text pages not mapped by their page-cache page now.
    fn off_cache_pages(&self) -> usize {
        (0..PAGES)
            .filter(|&p| self.w.pfn(self.t.page_addr(p)) != self.cache_pfns[p])
            .count()
    }

    /// After the patching half: int3 at every site, and exactly the site
    /// pages on anonymous copies.
    fn check_patched(&self, how: &str) {
        check!(
            self.mem.read(self.t.addr, THP_SIZE) == text_with(INT3),
            "{how}: the text is not the nop layout with int3 at exactly the {SITES} sites"
        );
        let moved: Vec<usize> = (0..PAGES)
            .filter(|&p| self.w.pfn(self.t.page_addr(p)) != self.cache_pfns[p])
            .collect();
        check!(
            moved == (FIRST_PAGE..FIRST_PAGE + SITE_PAGES).collect::<Vec<_>>(),
            "{how}: pages off the page cache {moved:?}, want exactly {FIRST_PAGE}..{}",
            FIRST_PAGE + SITE_PAGES
        );
    }

    fn check_unpatched(&self, how: &str) {
        check!(
            self.mem.read(self.t.addr, THP_SIZE) == text_with(NOP),
            "{how}: the text is not the nop layout again"
        );
    }
}

/// The module's time for each call made on `pid` since `seq`, from the
/// journal: for each handle, from the `begin` event that opened its call
/// to the last `end` event with its handle.  A PATCH's `patch` event has
/// no handle yet: it is the last handle-less `patch` before the handle's
/// first event (the calls are made one at a time).  Each span is checked
/// to lie inside its call's CLOCK_MONOTONIC bracket.
fn module_spans<T>(
    seq: u64,
    pid: i32,
    begin: &str,
    end: &str,
    calls: &[(u64, &Timed<T>)],
) -> Vec<i64> {
    let evs = events_since(seq, pid);
    calls
        .iter()
        .map(|&(h, call)| {
            let first = evs.iter().position(|e| e.handle == Some(h));
            check!(first.is_some(), "no journal event for handle {h}");
            let first = first.unwrap();
            let start = if begin == "patch" {
                evs[..first]
                    .iter()
                    .rev()
                    .find(|e| e.step == "patch" && e.handle.is_none())
            } else {
                evs[first..]
                    .iter()
                    .find(|e| e.step == begin && e.handle == Some(h))
            };
            let stop = evs
                .iter()
                .rev()
                .find(|e| e.step == end && e.handle == Some(h) && e.result == "ok");
            check!(
                start.is_some() && stop.is_some(),
                "handle {h}: no `{begin}` … `{end}` in the journal"
            );
            let (a, b) = (start.unwrap().time_ns as i64, stop.unwrap().time_ns as i64);
            check!(
                call.start <= a && a <= b && b <= call.end,
                "handle {h}: journal `{begin}` {a} … `{end}` {b} not inside the call [{}, {}]",
                call.start,
                call.end
            );
            b - a
        })
        .collect()
}

fn perf_close(fd: i32) -> i32 {
    super::close(fd)
}

/// Room for 10,000 perf event descriptors at once.
fn raise_nofile(n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit reads one rlimit we own.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    check!(
        rc == 0,
        "setrlimit(RLIMIT_NOFILE, {n}): {}",
        std::io::Error::last_os_error()
    );
}

/// A call's row, classified, then its module-time row, bound as the call
/// is: its time lies inside those calls.
fn with_module(call: Row, module: Row) -> [Row; 2] {
    let call = call.classify();
    let module = module.bound_by(
        call.bound,
        "inside the calls of the row above, whose on-CPU share it shares",
    );
    [call, module]
}

/// Each cost's median sample over the sites a sample covers.
fn set_medians(costs: &mut [SiteCost; 2], patch: &Row, restore: &Row, sites_per_sample: usize) {
    for (c, r) in costs.iter_mut().zip([patch, restore]) {
        c.median_ns = median(&r.samples_ns).map(|m| m / sites_per_sample as i64);
    }
}

/// Sum of a cycle's calls' wall and CPU times.
fn sums<T>(calls: &[Timed<T>]) -> (i64, i64) {
    calls
        .iter()
        .fold((0, 0), |(w, c), t| (w + t.wall(), c + t.cpu))
}

impl Run {
    fn many_file(&self, name: &str) -> String {
        let file = format!("{}/{name}", super::thp_dir());
        // Written only when it differs: rewriting a file targets map would
        // change their text under them.
        if std::fs::read(&file).ok().as_deref() != Some(&text_with(NOP)[..]) {
            let w = std::fs::write(&file, text_with(NOP));
            check!(w.is_ok(), "writing {file}: {:?}", w.err());
        }
        file
    }

    /// 10,000 sites by PATCH_BATCH: `MAX_BATCH` sites a call (one call
    /// since it is 16,384), then RESTORE of the handles; --install-pmd, so
    /// the PMD comes back without a fault.
    pub(super) fn many_batch(&mut self) {
        let cycles = (self.cycles / 10).max(1);
        let file = self.many_file("bench-sites.bin");
        let calls = SITES.div_ceil(MAX_BATCH);
        let split = match calls {
            1 => format!("one call; at most {MAX_BATCH} sites a call"),
            n => format!("{n} calls of at most {MAX_BATCH} sites"),
        };
        let (these, batches) = match calls {
            1 => ("that".to_string(), "batch"),
            n => (format!("those {n}"), "batches"),
        };
        let checked = "the whole 2 MiB text read back after the last call of each half (int3 at exactly the 10,000 sites, then the nops again); pagemap: exactly the 100 site pages on anonymous copies after PATCH_BATCH, all 512 on their page-cache pages after RESTORE; the PMD back; journal spans inside the calls";
        let mut patch = Row::new("many.batch.patch", &format!("PATCH_BATCH, 10,000 sites ({split})"),
            &format!("the {calls} PATCH_BATCH ioctls of one cycle, summed: 1-byte sites (int3 over a nop, expected bytes checked) on 100 pages of a fresh idle target's PMD-mapped text, 100 a page; one PMD split, one COW per page"), checked);
        let mut patch_mod = Row::new(
            "many.batch.patch.module",
            "  of which in the module (journal)",
            "journal `patched` minus `patch` time_ns of each call, summed over the cycle's calls",
            "",
        );
        let mut restore = Row::new("many.batch.restore", &format!("RESTORE of {these} {batches}"),
            &format!("the {calls} RESTORE ioctls of the cycle, summed: every site written back, the 100 copies zapped, one collapse queued"), checked);
        let mut restore_mod = Row::new(
            "many.batch.restore.module",
            "  of which in the module (journal)",
            "journal `restored` (the batch's last) minus `restore` time_ns of each call, summed",
            "",
        );
        let mut costs = [
            SiteCost::new("PATCH_BATCH", "patch", true),
            SiteCost::new("RESTORE of the batches", "restore", true),
        ];
        let offsets = site_offsets();
        for _ in 0..cycles {
            let m = Many::spawn(&file);
            let sites: Vec<BatchSite> = offsets
                .iter()
                .map(|&at| batch_site(m.addr(at), &[INT3], Some(&[NOP])))
                .collect();
            let seq = journal_seq();
            let ps: Vec<Timed<_>> = sites
                .chunks(MAX_BATCH)
                .map(|chunk| timed(|| self.dev.patch_batch(m.t.pid, chunk, PATCH_INSTALL_PMD)))
                .collect();
            let mut handles = Vec::new();
            for (i, p) in ps.iter().enumerate() {
                check!(
                    p.value.is_ok(),
                    "PATCH_BATCH call {i}: {}",
                    p.value.as_ref().unwrap_err()
                );
                handles.push(*p.value.as_ref().unwrap());
            }
            m.check_patched("after PATCH_BATCH");
            let spans = module_spans(
                seq,
                m.t.pid,
                "patch",
                "patched",
                &handles.iter().copied().zip(ps.iter()).collect::<Vec<_>>(),
            );
            let seq = journal_seq();
            let rs: Vec<Timed<_>> = handles
                .iter()
                .map(|&h| timed(|| self.dev.restore(h)))
                .collect();
            for (i, r) in rs.iter().enumerate() {
                check!(r.value.is_ok(), "RESTORE of batch {i}: {:?}", r.value);
            }
            m.check_unpatched("after RESTORE of the batches");
            let rspans = module_spans(
                seq,
                m.t.pid,
                "restore",
                "restored",
                &handles.iter().copied().zip(rs.iter()).collect::<Vec<_>>(),
            );
            let last_end = rs.last().unwrap().end;
            let poll = m.w.wait_pmd(m.t.addr, last_end, PMD_REQUIRED_NS);
            check!(
                poll.seen_at.is_some(),
                "PMD not back within {PMD_REQUIRED} of the last batch RESTORE"
            );
            check!(
                m.off_cache_pages() == 0,
                "after the batch RESTOREs some text page is not its page-cache page"
            );
            self.clock_checks += 2 * (spans.len() + rspans.len()) as u64;
            let (w, c) = sums(&ps);
            patch.push(w, c);
            patch_mod.samples_ns.push(spans.iter().sum());
            costs[0].add(SITES, ps.len(), w, c, Some(spans.iter().sum()));
            let (w, c) = sums(&rs);
            restore.push(w, c);
            restore_mod.samples_ns.push(rspans.iter().sum());
            costs[1].add(SITES, rs.len(), w, c, Some(rspans.iter().sum()));
        }
        set_medians(&mut costs, &patch, &restore, SITES);
        self.rows.extend(with_module(patch, patch_mod));
        self.rows.extend(with_module(restore, restore_mod));
        self.site_costs.extend(costs);
    }

    /// The same 10,000 sites by one PATCH each (expected bytes checked,
    /// --install-pmd), then one RESTORE each, in PATCH order.
    pub(super) fn many_single(&mut self) {
        let cycles = (self.cycles / 50).max(1);
        let file = self.many_file("bench-sites.bin");
        let checked = "each site's byte read back after its call; the whole text and pagemap as for PATCH_BATCH after the last call of each half; the PMD back; journal spans inside the calls";
        let mut patch = Row::new("many.single.patch", "PATCH, one of 10,000 single sites",
            "one PATCH ioctl of a 1-byte site (as PATCH_BATCH's); the first on the text splits the PMD, the first on each page COWs it; 0 to 9,999 of the target's other sites live", checked);
        let mut patch_mod = Row::new(
            "many.single.patch.module",
            "  of which in the module (journal)",
            "journal `patched` minus `patch` time_ns",
            "",
        );
        let mut restore = Row::new("many.single.restore", "RESTORE, one of 10,000 single sites",
            "one RESTORE ioctl; the last on a page zaps the copy, the last of all queues the collapse", checked);
        let mut restore_mod = Row::new(
            "many.single.restore.module",
            "  of which in the module (journal)",
            "journal `restored` minus `restore` time_ns",
            "",
        );
        let mut costs = [
            SiteCost::new("PATCH, one call a site", "patch", false),
            SiteCost::new("RESTORE, one call a site", "restore", false),
        ];
        // The journal keeps 4,096 events: read it every so many calls.
        const READ_EVERY: usize = 64;
        for _ in 0..cycles {
            let m = Many::spawn(&file);
            let mut handles = Vec::with_capacity(SITES);
            for chunk in site_offsets().chunks(READ_EVERY) {
                let seq = journal_seq();
                let mut done = Vec::with_capacity(chunk.len());
                for &at in chunk {
                    let req = PatchRequest {
                        pid: m.t.pid,
                        addr: m.addr(at),
                        bytes: vec![INT3],
                        expect: Some(vec![NOP]),
                        install_pmd: true,
                        ..Default::default()
                    };
                    let p = timed(|| self.dev.patch(&req));
                    check!(p.value.is_ok(), "PATCH at +{at:#x}: {:?}", p.value);
                    check!(
                        m.mem.read(req.addr, 1) == [INT3],
                        "PATCH at +{at:#x}: int3 not read back"
                    );
                    done.push((*p.value.as_ref().unwrap(), p));
                }
                let spans = module_spans(
                    seq,
                    m.t.pid,
                    "patch",
                    "patched",
                    &done.iter().map(|(h, p)| (*h, p)).collect::<Vec<_>>(),
                );
                for ((h, p), span) in done.into_iter().zip(spans) {
                    patch.push(p.wall(), p.cpu);
                    patch_mod.samples_ns.push(span);
                    costs[0].add(1, 1, p.wall(), p.cpu, Some(span));
                    handles.push((h, p.value.unwrap()));
                    self.clock_checks += 2;
                }
            }
            m.check_patched("after 10,000 PATCHes");
            let offsets = site_offsets();
            let mut last_end = 0;
            for (chunk, offs) in handles.chunks(READ_EVERY).zip(offsets.chunks(READ_EVERY)) {
                let seq = journal_seq();
                let mut done = Vec::with_capacity(chunk.len());
                for (&(h, _), &at) in chunk.iter().zip(offs) {
                    let r = timed(|| self.dev.restore(h));
                    check!(r.value.is_ok(), "RESTORE at +{at:#x}: {:?}", r.value);
                    check!(
                        m.mem.read(m.addr(at), 1) == [NOP],
                        "RESTORE at +{at:#x}: the nop not read back"
                    );
                    last_end = r.end;
                    done.push((h, r));
                }
                let spans = module_spans(
                    seq,
                    m.t.pid,
                    "restore",
                    "restored",
                    &done.iter().map(|(h, r)| (*h, r)).collect::<Vec<_>>(),
                );
                for ((_, r), span) in done.into_iter().zip(spans) {
                    restore.push(r.wall(), r.cpu);
                    restore_mod.samples_ns.push(span);
                    costs[1].add(1, 1, r.wall(), r.cpu, Some(span));
                    self.clock_checks += 2;
                }
            }
            m.check_unpatched("after 10,000 RESTOREs");
            let poll = m.w.wait_pmd(m.t.addr, last_end, PMD_REQUIRED_NS);
            check!(
                poll.seen_at.is_some(),
                "PMD not back within {PMD_REQUIRED} of the last single RESTORE"
            );
            check!(
                m.off_cache_pages() == 0,
                "after the RESTOREs some text page is not its page-cache page"
            );
        }
        set_medians(&mut costs, &patch, &restore, 1);
        self.rows.extend(with_module(patch, patch_mod));
        self.rows.extend(with_module(restore, restore_mod));
        self.site_costs.extend(costs);
    }

    /// The same 10,000 sites by uprobes: one perf_event_open of a `uprobe`
    /// PMU event for the target's pid per site, all held, then all closed.
    pub(super) fn many_uprobe(&mut self) {
        let file = self.many_file("bench-sites.bin");
        let pmu = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type");
        check!(pmu.is_ok(), "no uprobe PMU (CONFIG_UPROBE_EVENTS)");
        let pmu: u32 = pmu.unwrap().trim().parse().unwrap_or(0);
        let path = CString::new(file.clone()).unwrap();
        raise_nofile(SITES as u64 + 1024);
        let checked = "the whole text and pagemap as for PATCH_BATCH after the last attach; the whole text after the last detach";
        let mut attach = Row::new("many.uprobe.attach", "uprobe attach, one of 10,000 sites (perf_event_open)",
            "perf_event_open(2) of a `uprobe` event at one site for the target's pid (as row \"uprobe attach … idle target\"), 0 to 9,999 others held", checked);
        let mut detach = Row::new(
            "many.uprobe.detach",
            "uprobe detach, one of 10,000 sites (close)",
            "close(2) of one of those events, in attach order",
            checked,
        );
        let mut costs = [
            SiteCost::new("uprobe attach", "patch", false),
            SiteCost::new("uprobe detach", "restore", false),
        ];
        let m = Many::spawn(&file);
        let mut fds = Vec::with_capacity(SITES);
        for at in site_offsets() {
            let a = timed(|| super::perf_uprobe_open(pmu, &path, at as u64, m.t.pid));
            check!(
                a.value.is_ok(),
                "perf_event_open(uprobe at +{at:#x}): {:?}",
                a.value
            );
            attach.push(a.wall(), a.cpu);
            costs[0].add(1, 1, a.wall(), a.cpu, None);
            fds.push(*a.value.as_ref().unwrap());
        }
        m.check_patched("after 10,000 uprobe attaches");
        for fd in fds {
            let d = timed(|| perf_close(fd));
            check!(
                d.value == 0,
                "close(uprobe event): {}",
                std::io::Error::last_os_error()
            );
            detach.push(d.wall(), d.cpu);
            costs[1].add(1, 1, d.wall(), d.cpu, None);
        }
        m.check_unpatched("after 10,000 uprobe detaches");
        detach.count(
            "site pages back on their page-cache page after the last detach",
            SITE_PAGES - m.off_cache_pages().min(SITE_PAGES),
            SITE_PAGES,
        );
        set_medians(&mut costs, &attach, &detach, 1);
        self.rows.extend([attach.classify(), detach.classify()]);
        self.site_costs.extend(costs);
    }

    /// The same 10,000 sites by /proc/PID/mem: a 1-byte pwrite each, then
    /// the nops written back the same way.  Nothing gives the anonymous
    /// copies back: the PMD does not return.
    pub(super) fn many_proc_mem(&mut self) {
        let cycles = (self.cycles / 50).max(1);
        let file = self.many_file("bench-sites.bin");
        let checked = "each site's byte read back after its write; the whole text and pagemap as for PATCH_BATCH after the last write of the first half, the whole text after the second";
        let mut first = Row::new("many.procmem.new", "/proc/PID/mem write, one of 10,000 sites",
            "pwrite(2) of int3 over a site's nop; the first on the text splits the PMD, the first on each page COWs it", checked);
        let mut second = Row::new(
            "many.procmem.orig",
            "/proc/PID/mem write back, one of 10,000 sites",
            "pwrite(2) of the nop back; the page stays the anonymous copy",
            checked,
        );
        let mut costs = [
            SiteCost::new("/proc/PID/mem write", "patch", false),
            SiteCost::new("/proc/PID/mem write back", "restore", false),
        ];
        let (mut anon_left, mut pmd_back) = (0, 0);
        for _ in 0..cycles {
            let m = Many::spawn(&file);
            for (byte, row, cost) in [(INT3, &mut first, 0), (NOP, &mut second, 1)] {
                for at in site_offsets() {
                    let a = timed(|| m.mem.write(m.addr(at), &[byte]));
                    check!(
                        a.value.is_ok(),
                        "/proc/PID/mem write at +{at:#x}: {:?}",
                        a.value
                    );
                    check!(
                        m.mem.read(m.addr(at), 1) == [byte],
                        "/proc/PID/mem write at +{at:#x}: not read back"
                    );
                    row.push(a.wall(), a.cpu);
                    costs[cost].add(1, 1, a.wall(), a.cpu, None);
                }
                if byte == INT3 {
                    m.check_patched("after 10,000 /proc/PID/mem writes");
                }
            }
            m.check_unpatched("after writing the nops back");
            anon_left += m.off_cache_pages();
            pmd_back += usize::from(m.w.pmd_mapped(m.t.addr));
        }
        second.count(
            "site pages still anonymous copies after the write-back",
            anon_left,
            SITE_PAGES * cycles,
        );
        second.count("PMD mapped after the write-back", pmd_back, cycles);
        set_medians(&mut costs, &first, &second, 1);
        self.rows.extend([first.classify(), second.classify()]);
        self.site_costs.extend(costs);
    }

    /// One PATCH + RESTORE of page 17's function, `self.cycles` times, in
    /// one target (reused for every cycle) that holds `live` other sites
    /// itself: one-byte int3-over-int3 sites, 255 a page from page 32 on,
    /// made by batches of `MAX_BATCH` (`batched`) or by single PATCHes (a
    /// handle each).  With none, the PMD is back before each PATCH, which
    /// splits it, and RESTORE queues the collapse; with some, the PMD stays
    /// split and page 17 is on its page-cache page before each PATCH, so
    /// every N > 0 does the same work on a table of N.
    pub(super) fn table(&mut self, live: usize, batched: bool) {
        let how = match (live, batched) {
            (0, _) => "no other live site in the target (the PMD split and collapsed each cycle)"
                .to_string(),
            (1, true) => "1 other live site in the target".to_string(),
            (n, true) => match n.div_ceil(MAX_BATCH) {
                1 => format!("{n} other live sites in the target, 1 batch"),
                b => format!("{n} other live sites in the target, {b} batches"),
            },
            (n, false) => format!("{n} other live single patches in the target"),
        };
        let tag = format!("{live}.{}", if batched { "batched" } else { "single" });
        let checked = "bytes read back and the anonymous PFN after PATCH, the originals and the page-cache PFN after RESTORE (and the PMD back, with no other site); journal spans inside the calls; the target's other sites counted live by QUERY before and after";
        let what = match live {
            0 => "one PATCH ioctl of 6 bytes on page 17 of one target reused for every cycle, the PMD back before each: PMD split, COW, write",
            _ => "one PATCH ioctl of 6 bytes on page 17 of one target reused for every cycle, whose PMD its other sites keep split, page 17 on its page-cache page before each: COW, write",
        };
        let mut patch = Row::new(
            &format!("table.patch.{tag}"),
            &format!("PATCH with {how} (idle, --install-pmd)"),
            what,
            checked,
        );
        let mut patch_mod = Row::new(
            &format!("table.patch.module.{tag}"),
            "  of which in the module (journal)",
            "journal `patched` minus `patch` time_ns",
            "",
        );
        let mut restore = Row::new(
            &format!("table.restore.{tag}"),
            &format!("RESTORE with {how} (idle, --install-pmd)"),
            match live {
                0 => "one RESTORE ioctl of that patch: write back, zap, queue the collapse",
                _ => "one RESTORE ioctl of that patch: write back, zap (no collapse: the other sites keep the range)",
            },
            checked,
        );

        let Site {
            t,
            w,
            mem,
            addr,
            cache_pfn,
        } = {
            let (t, w) = fresh_target(&self.file, false);
            let mem = Mem::open(t.pid);
            let addr = t.page_addr(SITE_PAGE);
            let cache_pfn = w.pfn(addr);
            Site {
                t,
                w,
                mem,
                addr,
                cache_pfn,
            }
        };
        let addrs: Vec<u64> = (0..live)
            .map(|k| t.addr + ((32 + k / 255) * PAGE + 8 + 16 * (k % 255)) as u64)
            .collect();
        check!(
            addrs.last().is_none_or(|&a| a < t.addr + THP_SIZE as u64),
            "{live} sites do not fit in the text"
        );
        let mut others = Vec::new();
        if batched {
            for chunk in addrs.chunks(MAX_BATCH) {
                let sites: Vec<BatchSite> = chunk
                    .iter()
                    .map(|&a| batch_site(a, &[INT3], Some(&[INT3])))
                    .collect();
                let h = self.dev.patch_batch(t.pid, &sites, 0);
                check!(
                    h.is_ok(),
                    "the target's own PATCH_BATCH: {}",
                    h.unwrap_err()
                );
                others.push(h.unwrap());
            }
        } else {
            for &a in &addrs {
                let h = self.dev.patch(&PatchRequest {
                    pid: t.pid,
                    addr: a,
                    bytes: vec![INT3],
                    expect: Some(vec![INT3]),
                    ..Default::default()
                });
                check!(h.is_ok(), "the target's own PATCH: {:?}", h);
                others.push(h.unwrap());
            }
        }
        let count_live = |dev: &Device| -> usize {
            others
                .iter()
                .map(|&h| dev.query(h).map_or(0, |q| q.count as usize))
                .sum()
        };
        check!(
            count_live(&self.dev) == live,
            "QUERY counts {} of the target's other sites live, want {live}",
            count_live(&self.dev)
        );

        let (orig, new) = (super::original(SITE_PAGE), super::new_bytes(SITE_PAGE));
        for _ in 0..self.cycles {
            // Reading faults page 17's page-cache page back in (N > 0).
            check!(
                mem.read(addr, 6) == orig && w.pfn(addr) == cache_pfn,
                "page {SITE_PAGE} not the page-cache original before PATCH"
            );
            check!(
                w.pmd_mapped(addr) == (live == 0),
                "the PMD is not as {live} other sites leave it before PATCH"
            );
            let seq = journal_seq();
            let req = PatchRequest {
                pid: t.pid,
                addr,
                bytes: new.clone(),
                install_pmd: true,
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
            let span = module_spans(seq, t.pid, "patch", "patched", &[(h, &p)]);
            let r = timed(|| self.dev.restore(h));
            check!(r.value.is_ok(), "RESTORE: {:?}", r.value);
            check!(
                mem.read(addr, 6) == orig,
                "after RESTORE the target does not have the originals"
            );
            if live == 0 {
                let poll = w.wait_pmd(addr, r.end, PMD_REQUIRED_NS);
                check!(
                    poll.seen_at.is_some(),
                    "PMD not back within {PMD_REQUIRED} of RESTORE"
                );
            }
            check!(
                w.pfn(addr) == cache_pfn,
                "after RESTORE the site does not map the page-cache page"
            );
            patch.push(p.wall(), p.cpu);
            patch_mod.samples_ns.push(span[0]);
            restore.push(r.wall(), r.cpu);
            self.clock_checks += 2;
        }
        check!(
            count_live(&self.dev) == live,
            "the target's other sites changed during the measurement"
        );
        for &h in &others {
            let r = self.dev.restore(h);
            check!(r.is_ok(), "RESTORE of the target's other sites: {r:?}");
        }
        drop(t);
        self.rows.extend(with_module(patch, patch_mod));
        self.rows.push(restore.classify());
    }

    /// PATCH_BATCH + RESTORE of the 10,000 sites by one thread on one
    /// target, and by two threads on two targets at once, one round each
    /// repetition, the two alternating which goes first; then the same
    /// with /proc/PID/mem writes, the control.
    pub(super) fn many_concurrent(&mut self) {
        let reps = (self.cycles / 20).max(5);
        let files = [
            self.many_file("bench-sites-a.bin"),
            self.many_file("bench-sites-b.bin"),
        ];
        let per_round = SITES.div_ceil(MAX_BATCH);
        let checked = "the whole 2 MiB text read back after each round's PATCH_BATCHes and after its RESTOREs";
        let order = |rep: usize| {
            if rep.is_multiple_of(2) {
                [1, 2]
            } else {
                [2, 1]
            }
        };
        let mut walls = [Vec::new(), Vec::new()];
        let mut samples = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
        for rep in 0..reps {
            for threads in order(rep) {
                let (calls, wall, ps, rs) = batch_rounds(&files[..threads], 1);
                check!(calls == threads * 2 * per_round, "{calls} calls made");
                walls[threads - 1].push(wall);
                samples[threads - 1].0.extend(ps);
                samples[threads - 1].1.extend(rs);
            }
        }
        let who = ["one target alone", "two targets at once"];
        for threads in [1, 2] {
            let mut patch = Row::new(&format!("concurrent.batch.patch.{threads}"), &format!("PATCH_BATCH call, {} (10,000 sites in {per_round} call{})", who[threads - 1], if per_round == 1 { "" } else { "s" }),
                &format!("one PATCH_BATCH ioctl of at most {MAX_BATCH} sites (as row \"PATCH_BATCH, 10,000 sites\", default flags), by each of the threads of the throughput row"), checked);
            let mut restore = Row::new(
                &format!("concurrent.batch.restore.{threads}"),
                &format!("RESTORE of a batch, {}", who[threads - 1]),
                "one RESTORE ioctl of one of those batches",
                checked,
            );
            let (ps, rs) = std::mem::take(&mut samples[threads - 1]);
            ps.into_iter().for_each(|(w, c)| patch.push(w, c));
            rs.into_iter().for_each(|(w, c)| restore.push(w, c));
            self.rows.extend([patch.classify(), restore.classify()]);
            self.throughput.push(Throughput::from_reps(
                format!(
                    "PATCH_BATCH + RESTORE of 10,000 sites ({per_round} + {per_round} calls), {}",
                    ["one target", "two targets at once, a thread each"][threads - 1]
                ),
                threads,
                threads * 2 * per_round,
                threads * SITES,
                std::mem::take(&mut walls[threads - 1]),
            ));
        }
        // The control: the same two-thread shape with no hugepoke in it, so
        // that a ratio well below 2 can be told apart from host contention.
        let mut calls = [0, 0];
        for rep in 0..reps {
            for threads in order(rep) {
                let (c, wall) = proc_mem_rounds(&files[..threads], 1);
                calls[threads - 1] = c;
                walls[threads - 1].push(wall);
            }
        }
        for threads in [1, 2] {
            self.throughput.push(Throughput::from_reps(
                format!(
                    "control: /proc/PID/mem writes of the 10,000 sites and back, {}",
                    ["one target", "two targets at once, a thread each"][threads - 1]
                ),
                threads,
                calls[threads - 1],
                threads * SITES,
                std::mem::take(&mut walls[threads - 1]),
            ));
        }
    }
}

/// `batch_rounds`' shape with 1-byte /proc/PID/mem writes instead of
/// hugepoke: calls made and the wall time.
fn proc_mem_rounds(files: &[String], rounds: usize) -> (usize, i64) {
    let barrier = std::sync::Barrier::new(files.len());
    let results: Vec<(i64, i64, usize)> = std::thread::scope(|s| {
        let hs: Vec<_> = files
            .iter()
            .map(|file| {
                let barrier = &barrier;
                s.spawn(move || {
                    let m = Many::spawn(file);
                    let mut calls = 0;
                    barrier.wait();
                    let start = mono_ns();
                    for _ in 0..rounds {
                        for byte in [INT3, NOP] {
                            for at in site_offsets() {
                                let w = m.mem.write(m.addr(at), &[byte]);
                                check!(w.is_ok(), "/proc/PID/mem write: {w:?}");
                                calls += 1;
                            }
                            check!(
                                m.mem.read(m.t.addr, THP_SIZE) == text_with(byte),
                                "after the writes the text is not {byte:#x} at exactly the sites"
                            );
                        }
                    }
                    (start, mono_ns(), calls)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .collect()
    });
    let start = results.iter().map(|r| r.0).min().unwrap();
    let end = results.iter().map(|r| r.1).max().unwrap();
    (results.iter().map(|r| r.2).sum(), end - start)
}

/// (wall, on-CPU) of each call.
type Calls = Vec<(i64, i64)>;

/// `files.len()` threads, each with its own device and idle target on its
/// own file: `rounds` times PATCH_BATCH of the 10,000 sites and RESTORE,
/// the text read back after each half.  Calls made, the wall time from
/// the first start to the last end, and every PATCH_BATCH's and RESTORE's
/// (wall, on-CPU) over all threads.
fn batch_rounds(files: &[String], rounds: usize) -> (usize, i64, Calls, Calls) {
    let barrier = std::sync::Barrier::new(files.len());
    let results: Vec<(i64, i64, Calls, Calls)> = std::thread::scope(|s| {
        let hs: Vec<_> = files
            .iter()
            .map(|file| {
                let barrier = &barrier;
                s.spawn(move || {
                    let dev = Device::open();
                    check!(dev.is_ok(), "opening /dev/hugepoke: {:?}", dev.err());
                    let dev = dev.unwrap();
                    let m = Many::spawn(file);
                    let sites: Vec<BatchSite> = site_offsets()
                        .iter()
                        .map(|&at| batch_site(m.addr(at), &[INT3], Some(&[NOP])))
                        .collect();
                    let (mut ps, mut rs) = (Vec::new(), Vec::new());
                    barrier.wait();
                    let start = mono_ns();
                    for _ in 0..rounds {
                        let mut handles = Vec::new();
                        for chunk in sites.chunks(MAX_BATCH) {
                            let h = timed(|| dev.patch_batch(m.t.pid, chunk, 0));
                            check!(
                                h.value.is_ok(),
                                "PATCH_BATCH: {}",
                                h.value.as_ref().unwrap_err()
                            );
                            ps.push((h.wall(), h.cpu));
                            handles.push(h.value.unwrap());
                        }
                        check!(
                            m.mem.read(m.t.addr, THP_SIZE) == text_with(INT3),
                            "after the batches the text is not int3 at exactly the sites"
                        );
                        for h in handles {
                            let r = timed(|| dev.restore(h));
                            check!(r.value.is_ok(), "RESTORE of a batch: {:?}", r.value);
                            rs.push((r.wall(), r.cpu));
                        }
                        m.check_unpatched("after the batch RESTOREs");
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
    let (mut ps, mut rs) = (Vec::new(), Vec::new());
    for r in results {
        ps.extend(r.2);
        rs.extend(r.3);
    }
    (calls, span, ps, rs)
}

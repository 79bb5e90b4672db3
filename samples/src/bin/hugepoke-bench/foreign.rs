//! Other tools' copies (issue 21): a text split by N copies another tool
//! left (a `/proc/PID/mem` write of new bytes and of the originals back,
//! on N pages), given back by hugepoke's COLLAPSE, against
//! `process_madvise(MADV_COLLAPSE)` alone on the same state, which cannot
//! drop a copy.  Every sample is checked.

use super::Run;
use crate::probe::{check, fresh_target, timed, Mem};
use crate::report::Row;
use hugepoke::collapse::{madvise_collapse, pidfd_open, PMD_SIZE};
use hugepoke::testkit::text::{PAGE, PAGES};
use hugepoke::uapi;

impl Run {
    /// `copies` pages of a fresh idle target written and written back
    /// through `/proc/PID/mem`; then MADV_COLLAPSE of the range (refused,
    /// nothing changes), then COLLAPSE (every copy dropped, the PMD
    /// installed).  Cycles enough for 10+ samples.
    pub(super) fn foreign(&mut self, copies: usize) {
        let cycles = (self.cycles * 16)
            .div_ceil(copies)
            .clamp(self.cycles.min(10), self.cycles);
        let what = if copies == 1 { "copy" } else { "copies" };
        let mut madvise = Row::new(&format!("foreign.madvise.{copies}"), &format!("MADV_COLLAPSE alone, {copies} foreign {what}"),
            &format!("process_madvise(pidfd, MADV_COLLAPSE) of the 2 MiB text range of an idle target on which a /proc/PID/mem writer left {copies} anonymous {what} equal to the page cache (new bytes written and the originals written back)"),
            "the range is still not PMD-mapped and every copy still there after it (pagemap)");
        let mut collapse = Row::new(&format!("foreign.collapse.{copies}"), &format!("hugepoke COLLAPSE, {copies} foreign {what}"),
            &format!("the COLLAPSE ioctl of that range right after: a page-table walk of its 512 PTEs, {copies} {what} compared with the page-cache page and zapped (with one lru_add_drain_all() when a fresh copy's LRU-batch reference keeps it), collapse_pte_mapped_thp(install_pmd)"),
            "COLLAPSE said COLLAPSE_DONE with every copy dropped; pagemap shows the range PMD-mapped by the page-cache THP");
        let mut refused = 0;
        for _ in 0..cycles {
            let (t, w) = fresh_target(&self.file, false);
            let head = w.pfn(t.addr).unwrap_or(0);
            let mem = Mem::open(t.pid);
            let pages: Vec<u64> = (0..copies)
                .map(|k| t.page_addr(k * PAGES / copies))
                .collect();
            for &at in &pages {
                let orig = mem.read(at, 1);
                check!(mem.write(at, &[!orig[0]]).is_ok(), "/proc/PID/mem write");
                check!(mem.write(at, &orig).is_ok(), "/proc/PID/mem write back");
            }
            let cache = |at: u64| w.pfn(at) == Some(head + (at - t.addr) / PAGE as u64);
            check!(
                !w.pmd_mapped(t.addr) && !pages.iter().any(|&at| cache(at)),
                "the writer left no copies"
            );
            let pidfd = pidfd_open(t.pid);
            check!(pidfd.is_ok(), "pidfd_open: {:?}", pidfd.err());
            let pidfd = pidfd.unwrap();
            let m = timed(|| madvise_collapse(pidfd, t.addr, PMD_SIZE));
            // SAFETY: our own descriptor, closed once.
            unsafe { libc::close(pidfd) };
            refused += usize::from(m.value.is_err());
            check!(
                !w.pmd_mapped(t.addr) && !pages.iter().any(|&at| cache(at)),
                "MADV_COLLAPSE changed the range or dropped a copy"
            );
            let c = timed(|| self.dev.collapse(t.pid, t.addr));
            check!(
                c.value
                    .as_ref()
                    .is_ok_and(|a| a.result == uapi::COLLAPSE_DONE && a.dropped as usize == copies),
                "COLLAPSE said {:?}",
                c.value
            );
            check!(
                w.pmd_mapped(t.addr) && pages.iter().all(|&at| cache(at)),
                "after COLLAPSE the range is not the page-cache THP's PMD"
            );
            madvise.push(m.wall(), m.cpu);
            collapse.push(c.wall(), c.cpu);
        }
        madvise.count("returned an error", refused, cycles);
        self.rows.extend([madvise.classify(), collapse.classify()]);
    }
}

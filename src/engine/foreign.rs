// SPDX-License-Identifier: GPL-2.0

//! COLLAPSE: the PMD of one 2 MiB range of a target's text given back
//! after anyone's patch.  A detached uprobe, a debugger whose breakpoints
//! are gone, a `/proc/PID/mem` writer that wrote the originals back: each
//! leaves anonymous copies that equal their page-cache page, and while one
//! is mapped no PMD can map the range.  Each copy is dropped by RESTORE's
//! own rule ([`keep_reason`], with the PTE cleared and flushed) unless a
//! live hugepoke patch is on it; every other copy is kept and counted by
//! why.  With no copy left, `collapse_pte_mapped_thp()` maps the range by
//! a PMD again, right here (the caller waits for the verdict).
//!
//! Locks as PATCH takes them: the target's state (if hugepoke has one for
//! this mm: its live patches must not change under us), then its mmap
//! lock for writing while copies are dropped (no `/proc/PID/mem` or ptrace
//! write comes between the compare and the zap), for reading while the
//! range is collapsed.

use kernel::{mm::virt::VmaRef, mm::MmWithUser, prelude::*, sync::Arc};

use super::{
    patch::resolve_target,
    zap::{before_zap, keep_reason, Keep},
};
use crate::{
    journal::{Event, Step},
    policy,
    sys::{self, MmapWriteGuard, PageRef, VmaInfo, PAGE_SIZE, PMD_SIZE},
    uapi::{self, CollapseArgs},
    Hugepoke,
};

/// What the copies of the range came to.
#[derive(Default)]
struct Tally {
    dropped: u32,
    differs: u32,
    pinned: u32,
    uffd: u32,
    patched: u32,
    no_cache: u32,
    first_kept: usize,
    /// A copy kept for a reference an LRU batch may hold: drain and look again.
    need_drain: bool,
}

impl Tally {
    fn kept(&self) -> u32 {
        self.differs + self.pinned + self.uffd + self.patched + self.no_cache
    }

    fn keep(&mut self, why: Option<Keep>, addr: usize) {
        let count = match why {
            None => &mut self.patched,
            Some(Keep::Differs) => &mut self.differs,
            Some(Keep::Pinned) => &mut self.pinned,
            Some(Keep::UffdMissing | Keep::UffdWp | Keep::UffdMinor) => &mut self.uffd,
            Some(Keep::NoCache | Keep::StaleCache) => &mut self.no_cache,
        };
        *count += 1;
        if self.first_kept == 0 {
            self.first_kept = addr;
        }
    }

    /// A new pass looks at every copy left again; what it dropped stays dropped.
    fn new_pass(&mut self) {
        *self = Tally {
            dropped: self.dropped,
            ..Tally::default()
        };
    }

    fn write_to(&self, args: &mut CollapseArgs) {
        args.dropped = self.dropped;
        args.kept_differs = self.differs;
        args.kept_pinned = self.pinned;
        args.kept_uffd = self.uffd;
        args.kept_patched = self.patched;
        args.kept_no_cache = self.no_cache;
        args.first_kept = self.first_kept as u64;
    }
}

/// COLLAPSE the range `args` names: drop the copies that may go, then,
/// with none kept, collapse.  Fills in `args`' results.
pub(crate) fn collapse(hp: &Arc<Hugepoke>, args: &mut CollapseArgs) -> Result {
    let ev = Event::new(Step::CollapseRange)
        .pid(args.pid)
        .addr(args.addr as usize);
    let haddr = policy::check_collapse_args(args).map_err(|r| hp.journal.refuse(ev, r))?;
    let (mm, process) = resolve_target(hp, args.pid, haddr)?;
    let ev = ev.pid(process.tgid());
    hp.journal
        .record(ev.note("COLLAPSE: dropping the copies equal to the page cache"));
    let target = hp.registry.lock().target_of_mm(&mm);
    let state = match &target {
        Some(t) => Some(t.lock_killable(&hp.journal, ev)?),
        None => None,
    };
    // A copy under a live patch of ours is RESTORE's to give back.
    let patched = |key| state.as_ref().is_some_and(|s| s.patches.on_page(key) != 0);
    let mut tally = Tally::default();
    let cache_pmd = drop_copies(hp, &mm, ev, haddr, &patched, &mut tally)?;
    tally.write_to(args);
    let install_pmd = args.flags & uapi::COLLAPSE_INSTALL_PMD != 0;
    let (result, outcome) = if tally.kept() != 0 {
        let why = "copies kept (see keep_anon_page): range not collapsed";
        (uapi::COLLAPSE_COPIES_KEPT, Err((EBUSY, why)))
    } else if !cache_pmd {
        let why =
            "no copy left, but no PMD-sized page-cache folio to map (MADV_COLLAPSE can make one)";
        (uapi::COLLAPSE_SMALL_FOLIOS, Err((EBUSY, why)))
    } else {
        collapse_now(&mm, haddr, install_pmd)
    };
    args.result = result;
    hp.journal.record(match outcome {
        Ok(note) => ev.note(note),
        Err((e, why)) => ev.error(e, why),
    });
    drop(state);
    Ok(())
}

/// Drop every copy in the range that may go, counting the others in
/// `tally`: one pass with the mmap lock held for writing, and one more
/// after an LRU drain (without the lock) if a copy was kept for a
/// reference a per-CPU LRU batch may hold.  Whether the page-cache folio
/// behind the range is PMD-sized.
fn drop_copies(
    hp: &Hugepoke,
    mm: &MmWithUser,
    ev: Event,
    haddr: usize,
    patched: &impl Fn((usize, usize)) -> bool,
    tally: &mut Tally,
) -> Result<bool> {
    let mut drained = false;
    loop {
        let guard = MmapWriteGuard::lock_killable(mm).map_err(|e| {
            let why = "fatal signal while waiting for the target's mmap lock";
            hp.journal.fail(ev, e, why)
        })?;
        let vma = guard
            .vma_lookup(haddr)
            .ok_or_else(|| hp.journal.fail(ev, EFAULT, "address is not mapped"))?;
        let info = sys::vma_info(vma);
        policy::check_collapse_vma(&info, haddr).map_err(|r| hp.journal.refuse(ev, r))?;
        tally.new_pass();
        if info.has_anon_vma {
            // (A VMA without an anon_vma holds no copy: nothing to look at.)
            let at = Copies {
                mm,
                vma,
                info: &info,
                pid: ev.pid,
            };
            for addr in (haddr..haddr + PMD_SIZE).step_by(PAGE_SIZE) {
                if let Some(page) = sys::anon_copy_at(vma, addr) {
                    let key = (info.mapping, info.pgoff_of(addr));
                    at.drop_or_keep(hp, &guard, addr, page, patched(key), tally);
                }
            }
        }
        let cache_pmd = sys::page_cache_page(vma, haddr).is_some_and(|c| c.pmd_mappable());
        if drained || !tally.need_drain {
            // mutant: collapse-no-drain
            return Ok(cache_pmd);
        }
        drop(guard);
        let ev = Event::new(Step::LruDrain).pid(ev.pid).addr(haddr);
        hp.journal
            .record(ev.note("a kept copy may sit in an LRU batch: draining all CPUs' LRU batches"));
        sys::lru_add_drain_all();
        drained = true;
    }
}

/// Where the copies are: the target's mm and the VMA of the range.
struct Copies<'a> {
    mm: &'a MmWithUser,
    vma: &'a VmaRef,
    info: &'a VmaInfo,
    pid: i32,
}

impl Copies<'_> {
    /// Drop the copy `page` at `addr` if it may go, else count why not.
    fn drop_or_keep(
        &self,
        hp: &Hugepoke,
        _guard: &MmapWriteGuard<'_>,
        addr: usize,
        page: PageRef,
        patched: bool,
        tally: &mut Tally,
    ) {
        let ev = |step| {
            Event::new(step)
                .pid(self.pid)
                .addr(addr)
                .page(page.pfn(), 0)
        };
        if patched {
            // mutant: patched-copy-dropped
            tally.keep(None, addr);
            hp.journal
                .record(ev(Step::KeepAnonPage).note("a live hugepoke patch is on this page"));
            return;
        }
        if sys::beyond_eof(self.vma, self.info.pgoff_of(addr)) {
            // No page-cache page there: a fault would not give these bytes back.
            tally.keep(Some(Keep::NoCache), addr);
            hp.journal
                .record(ev(Step::KeepAnonPage).note("the copy is past the end of the file"));
            return;
        }
        let _invalidate = before_zap(self.mm, &page, addr);
        // The walk let go of the PT lock: the copy may be gone since.
        let Some(pte) = sys::lock_pte(self.vma, addr, &page) else {
            return;
        };
        let pte = pte.unmap();
        let cache = sys::page_cache_page(self.vma, addr);
        match keep_reason(self.info, &page, cache.as_ref(), &pte) {
            // mutant: collapse-drops-differing collapse-drops-pinned collapse-never-drops collapse-drops-under-uffd
            Some(why) => {
                drop(pte);
                tally.need_drain |= why == Keep::Pinned && page.may_be_lru_cached();
                tally.keep(Some(why), addr);
                hp.journal.record(ev(Step::KeepAnonPage).note(why.why()));
            }
            None => {
                pte.zap(&page);
                tally.dropped += 1;
                let why = "a copy equal to the page-cache page: dropped; the page-cache page faults back in";
                hp.journal.record(ev(Step::ZapAnonPage).note(why));
            }
        }
    }
}

/// `collapse_pte_mapped_thp()` of the range, with the mmap lock held (for
/// writing: that wait is killable): the `result` for COLLAPSE and the
/// kernel's verdict.
fn collapse_now(
    mm: &MmWithUser,
    haddr: usize,
    install_pmd: bool,
) -> (u32, Result<&'static str, (Error, &'static str)>) {
    let Ok(guard) = MmapWriteGuard::lock_killable(mm) else {
        let why = "fatal signal while waiting for the target's mmap lock";
        return (uapi::COLLAPSE_REFUSED, Err((EINTR, why)));
    };
    let result = sys::collapse_pte_mapped_thp(mm, &guard, haddr, install_pmd);
    match sys::collapse_verdict(result, install_pmd) {
        Ok((note, true)) => (uapi::COLLAPSE_DONE, Ok(note)),
        Ok((note, false)) => (uapi::COLLAPSE_AT_FAULT, Ok(note)),
        Err(name) => (uapi::COLLAPSE_REFUSED, Err((EBUSY, name))),
    }
}

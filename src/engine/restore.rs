// SPDX-License-Identifier: GPL-2.0

//! RESTORE, whatever the number of sites, and the undo of a PATCH that
//! failed part way, in three passes over the pages: find every copy and
//! check every site's bytes (`locate`); write every page's originals back
//! (a page that fails then has the pages before it re-patched: nothing is
//! half done); and only then zap the copies that equal their page-cache
//! page, which cannot be undone.  The one LRU drain a RESTORE may need is
//! taken after the first pass, with the mmap lock dropped (nothing is
//! written yet) and the first pass made again; only the undo of a failed
//! PATCH drains with it held, since dropping it there would let a writer
//! in between our write and its undo (the drain's per-CPU work takes no mm
//! lock; khugepaged's `madvise_collapse()` drains under the mmap lock too).

use kernel::{mm::MmWithUser, prelude::*, sync::Arc};

use super::{
    locate::{locate_and_check, Located, Shared},
    outcome::{Refused, Restored},
    page::{kept, restore_and_zap, write_page, zap_page},
    plan::{Dir, Outcome, PageState, PageWork, Written},
};
use crate::{
    collapse,
    journal::Step,
    patches::{PageKey, Site},
    pause::Point,
    refusal::Refusal,
    sys::{self, MmapWriteGuard, PAGE_MASK, PMD_MASK},
    target::{Target, TargetState},
    Hugepoke,
};

/// Pass 2: write every found page's originals back.  If a page cannot be
/// written, the pages before it get the patched bytes again; one that
/// cannot stays `Written` (its sites are restored: the caller forgets them).
/// A plan's only page (the single call) is zapped, if it may be, under the
/// same page-table-lock hold as its write: nothing after it can fail.
fn write_originals(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    mm: &MmWithUser,
    sites: &[Site],
    pages: &mut [PageWork],
    last_on_page: &impl Fn(&[Site]) -> bool,
) -> Result<(), (Refused, usize)> {
    let found = |w: &PageWork| matches!(w.state, PageState::Found(..));
    let only_page = pages.iter().filter(|w| found(w)).count() == 1; // mutant: zap-before-all-written
    for g in 0..pages.len() {
        let (done, rest) = pages.split_at_mut(g);
        let w = &mut rest[0];
        if !found(w) {
            continue;
        }
        let r = w.range.clone();
        let written = if only_page && last_on_page(&sites[r.clone()]) && !w.copy_before {
            restore_and_zap(hp, guard, mm, &sites[r.clone()], w)
                .map(|z| z.map_or(Outcome::Written, Outcome::Done))
        } else {
            write_page(hp, guard, &sites[r.clone()], w, Dir::Revert).map(|()| Outcome::Written)
        };
        match written {
            Ok(outcome) => w.outcome = outcome,
            Err(refused) => {
                reapply(hp, guard, sites, done);
                return Err((refused, r.start));
            }
        }
    }
    Ok(())
}

/// The undo of a pass 2 that could not finish: the pages it wrote get the
/// patched bytes again (none was zapped: only a plan's only page is zapped
/// in pass 2) — but for a page where another tool had put some originals
/// back: that one stays restored (its sites are forgotten).
fn reapply(hp: &Hugepoke, guard: &MmapWriteGuard<'_>, sites: &[Site], done: &mut [PageWork]) {
    for w in done
        .iter_mut()
        .filter(|w| matches!(w.outcome, Outcome::Written) && !w.already)
    // mutant: reapply-ignores-already
    {
        if write_page(hp, guard, &sites[w.range.clone()], w, Dir::Reapply).is_ok() {
            // mutant: restore-half-done
            w.outcome = Outcome::Untouched;
        }
    }
}

/// Pass 3: zap the copies that now equal their page-cache page.
fn zap_copies(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    mm: &MmWithUser,
    sites: &[Site],
    pages: &mut [PageWork],
    last_on_page: &impl Fn(&[Site]) -> bool,
) {
    for w in pages.iter_mut() {
        let PageState::Found(page_addr, page) = &mut w.state else {
            continue;
        };
        if !matches!(w.outcome, Outcome::Written) {
            continue;
        }
        let r = w.range.clone();
        if w.copy_before {
            // An undo puts back what was there: another tool's copy.
            let why = "the copy was there before PATCH (another tool's): the undo leaves it";
            w.outcome = Outcome::Done(kept(hp, &sites[r.start], *page_addr, page, why));
            continue;
        }
        w.outcome = Outcome::Done(zap_page(
            hp,
            guard,
            mm,
            &sites[r.start],
            *page_addr,
            page,
            last_on_page(&sites[r]),
        ));
    }
}

/// Restore the pages of `sites` with the target's mmap lock taken here:
/// pass 1 (dropping the lock once for an LRU drain when a copy may sit in
/// an LRU batch: nothing is written yet), then passes 2 and 3 without
/// letting go of it.
pub(crate) fn restore_pages(
    hp: &Hugepoke,
    mm: &MmWithUser,
    sites: &[Site],
    pages: &mut [PageWork],
    last_on_page: impl Fn(&[Site]) -> bool,
    shared: Shared,
) -> Result<(), (Refused, usize)> {
    let mut drained = false;
    loop {
        let waiting = |e| Refusal::new(e, "fatal signal while waiting for the target's mmap lock");
        let guard =
            MmapWriteGuard::lock_killable(mm).map_err(|e| (Refused::Kept(waiting(e)), 0))?;
        if !drained {
            hp.pauses.at(Point::Restore, sites[0].pid, &hp.journal);
        }
        let mut located = locate_and_check(hp, &guard, sites, pages, &last_on_page, shared);
        if matches!(located, Located::NeedDrain) && !drained {
            located = drain_this_cpu(hp, sites, pages, &last_on_page);
        }
        match located {
            Located::Refused(refused, at) => return Err((refused, at)),
            Located::NeedDrain if !drained => {
                // Without the mmap lock: nothing is written yet.
                drop(guard); // mutant: drain-under-mmap-lock
                drain_lru_batches(hp, &sites[0]); // mutant: drain-under-registry drain-under-mmap-lock/2
                drained = true;
                continue;
            }
            Located::NeedDrain | Located::Ready => {}
        }
        hp.pauses.at(Point::Located, sites[0].pid, &hp.journal);
        write_originals(hp, &guard, mm, sites, pages, &last_on_page)?;
        zap_copies(hp, &guard, mm, sites, pages, &last_on_page);
        return Ok(());
    }
}

/// Give back the pages a failed PATCH wrote or COWed, with the mmap lock
/// still held: dropping it would let a writer in between our write and its
/// undo.  So the one LRU drain the zaps may need runs under it.
pub(crate) fn undo(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    mm: &MmWithUser,
    sites: &[Site],
    pages: &mut [PageWork],
    last_on_page: impl Fn(&[Site]) -> bool,
) -> Result<(), Refusal> {
    // Only the pages written (or COWed): the others never changed — but
    // for their PMD, if PATCH split it: its range is to be collapsed.
    for w in pages.iter_mut().filter(|w| w.written == Written::No) {
        w.state = PageState::Gone(Ok(()), "not written");
        w.cache_back = w.split.then_some(sites[w.range.start].addr & PAGE_MASK);
        // mutant: failed-split-not-collapsed
    }
    // (PATCH held the mmap lock throughout: no fork came in.)
    match locate_and_check(hp, guard, sites, pages, &last_on_page, Shared::Break) {
        Located::Refused(refused, _) => refused.stops_undo().map_or(Ok(()), Err)?,
        Located::Ready => {}
        Located::NeedDrain => {
            if let Located::NeedDrain = drain_this_cpu(hp, sites, pages, &last_on_page) {
                lru_drain_journaled(hp, &sites[0]);
            }
        }
    }
    if let Err((refused, _)) = write_originals(hp, guard, mm, sites, pages, &last_on_page) {
        refused.stops_undo().map_or(Ok(()), Err)?;
    }
    zap_copies(hp, guard, mm, sites, pages, &last_on_page);
    Ok(())
}

/// After the pages of `sites` were given back (and their sites left the
/// table): one collapse per 2 MiB range with a zapped PMD-mappable page, or
/// a page whose copy is gone with the page-cache page back in its place,
/// and no patch left in it; a note for ranges over smaller folios.  Called
/// without the mmap lock (at unload a collapse runs synchronously, and
/// takes it).  `here`: a collapse whose work cannot be allocated may run
/// right here (not while sites the table does not hold yet are written).
pub(crate) fn queue_collapses(
    hp: &Arc<Hugepoke>,
    target: &Arc<Target>,
    state: &mut TargetState,
    sites: &[Site],
    pages: &[PageWork],
    here: bool,
) {
    let mut last: Option<PageKey> = None;
    for w in pages.iter() {
        let site = &sites[w.range.start];
        let restored = match &w.outcome {
            Outcome::Done(restored) if restored.zapped => *restored,
            // No copy left to zap (the target dropped it, or PATCH failed
            // after its split): the PMD is still ours to give back.
            Outcome::Untouched if w.cache_back.is_some() && (w.split || site.pmd_mappable) => {
                Restored {
                    zapped: true,
                    pmd_mappable: true,
                    cache_order: sys::PMD_ORDER,
                    page_addr: w.cache_back.unwrap_or_default(),
                }
            }
            _ => continue,
        };
        if last == Some(site.range_key()) {
            // mutant: collapse-per-page
            continue;
        }
        last = Some(site.range_key());
        collapse_after_restore(hp, target, state, site, &restored, here);
    }
}

/// If the copy of `site`'s page was zapped, queue the collapse of its
/// 2 MiB range when no patch is left there, or journal why not.
fn collapse_after_restore(
    hp: &Arc<Hugepoke>,
    target: &Arc<Target>,
    state: &mut TargetState,
    site: &Site,
    restored: &Restored,
    here: bool,
) {
    let ev = site.event(Step::QueueCollapse);
    if restored.zapped && restored.pmd_mappable {
        // mutant: collapse-small-folio
        if state.patches.in_range(site.range_key()) == 0 {
            // mutant: collapse-before-the-last-patch
            collapse::queue_collapse(hp, target, state, site, restored.page_addr & PMD_MASK, here);
        } else {
            hp.journal
                .record(ev.note("not yet: other patches in this 2 MiB range"));
        }
    } else if restored.zapped {
        // mutant: no-collapse-reason
        // 4 KiB or mTHP page cache: the subpage faults back in, and there
        // is no PMD to rebuild.
        hp.journal.record(
            ev.order(restored.cache_order)
                .note("none: the page-cache folio is smaller than a PMD"),
        );
    }
}

/// This CPU's LRU batches, drained with the mmap lock held (it waits for
/// nothing): a copy this caller made or read (a `/proc/PID/mem` read
/// queues it for activation) waits there most often.  `Ready` if no copy
/// is held by a batch any more, else `NeedDrain` (another CPU's batch holds
/// one: the caller drains them all); journaled either way.
fn drain_this_cpu(
    hp: &Hugepoke,
    sites: &[Site],
    pages: &[PageWork],
    last_on_page: &impl Fn(&[Site]) -> bool,
) -> Located {
    sys::lru_add_drain(); // mutant: no-local-drain
    let held = pages
        .iter()
        .any(|w| super::locate::may_wait_in_lru_batch(&sites[w.range.clone()], w, last_on_page));
    let ev = sites[0].event(Step::LruDrain);
    if held {
        hp.journal.record(
            ev.note("drained this CPU's LRU batches: a copy is still held (another CPU's batch?)"),
        );
        Located::NeedDrain
    } else {
        hp.journal
            .record(ev.note("drained this CPU's LRU batches: every copy is free"));
        Located::Ready
    }
}

/// One `lru_add_drain_all()`, journaled.  It waits for work on every CPU,
/// so the caller holds neither the target's mmap lock nor the registry
/// (only this target's state lock: this target's operations wait, no
/// other's).  The `drain` pause point is here, so a test can see which
/// locks are free while it runs.
fn drain_lru_batches(hp: &Hugepoke, site: &Site) {
    hp.pauses.at(Point::Drain, site.pid, &hp.journal);
    lru_drain_journaled(hp, site);
}

/// The drain itself, journaled (start, done), with no pause point: the
/// undo of a failed PATCH drains with the mmap lock held.
fn lru_drain_journaled(hp: &Hugepoke, site: &Site) {
    let ev = site.event(Step::LruDrain);
    hp.journal.record(ev.note("draining all CPUs' LRU batches"));
    sys::lru_add_drain_all();
    hp.journal.record(ev.note("drained"));
}

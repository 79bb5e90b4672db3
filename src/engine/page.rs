// SPDX-License-Identifier: GPL-2.0

//! The steps for one file page, each under the page-table lock with the
//! PTE cleared and the TLB flushed, right after reading what is there:
//! split the PMD and copy the page (GUP with `FOLL_SPLIT_PMD`), write the
//! patched bytes against the expected ones, write them back the other way
//! against the patched ones, and zap the copy when it equals the
//! page-cache page.  A page's sites are written under one hold of its
//! page-table lock, so the target never runs the page half written.

use kernel::{mm::virt::VmaRef, mm::MmWithUser, prelude::*};

use super::{
    locate::relock_pte,
    outcome::{Mismatch, Refused, Restored, WriteError, MAX_TRIES},
    plan::{swap_bytes, Dir, PageState, PageWork, Written},
    zap::{before_zap, keep_reason, Keep},
};
use crate::{
    journal::{Event, Step},
    patches::Site,
    pause::Point,
    refusal::Refusal,
    sys::{self, CacheRef, ClearedPte, Mapping, MmapWriteGuard, PageRef, PAGE_MASK},
    uapi::{self, MAX_BYTES},
    Hugepoke,
};

/// Split the PMD and break COW at `page_addr`: GUP with `FOLL_FORCE |
/// FOLL_WRITE | FOLL_SPLIT_PMD`.  `None` if GUP gave a page-cache page.
fn cow_page(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    ev: &impl Fn(Step) -> Event,
    page_addr: usize,
    before: Option<Mapping>,
) -> Result<Option<PageRef>, Error> {
    let gup_flags = sys::FOLL_FORCE | sys::FOLL_WRITE | sys::FOLL_SPLIT_PMD;
    let page = guard.get_user_page(page_addr, gup_flags).map_err(|e| {
        hp.journal
            .fail(ev(Step::SplitPmd), e, "get_user_pages_remote failed")
    })?;
    if let Some(before) = before {
        // FOLL_SPLIT_PMD split only the PMD: the THP stays whole in the
        // page cache.  (For a file VMA the split zaps the PMD: the range is
        // PTE-mapped from now on, its pages faulted back in one by one.)
        hp.journal.record(match before {
            Mapping::Pmd(pfn) => ev(Step::SplitPmd)
                .page(pfn & !(sys::PMD_PAGES - 1), sys::PMD_ORDER)
                .note("PMD split to PTEs; THP stays whole"),
            Mapping::Pte(pfn) => ev(Step::SplitPmd).page(pfn, 0).note("already PTE-mapped"),
            Mapping::None => ev(Step::SplitPmd).note("was not mapped"),
        });
    }
    if !page.is_anon() {
        hp.journal.record(
            ev(Step::CowPage)
                .page(page.pfn(), page.folio_order())
                .error(EAGAIN, "GUP returned a page-cache page; retrying"),
        );
        return Ok(None);
    }
    let copied_before = matches!(before, Some(Mapping::Pte(pfn)) if pfn == page.pfn());
    if !copied_before {
        // The fresh copy waits in this CPU's LRU batch, holding a
        // reference that RESTORE would otherwise have to drain from every
        // CPU (waiting on each, and on a busy target's for a tick).
        sys::lru_add_drain(); // mutant: copy-left-in-lru-batch
    }
    hp.journal
        .record(
            ev(Step::CowPage)
                .page(page.pfn(), page.folio_order())
                .note(if copied_before {
                    "already an anonymous copy"
                } else {
                    "exclusive anonymous copy"
                }),
        );
    Ok(Some(page))
}

/// PATCH of one page (its sites sorted, not overlapping), mapped as
/// `before` says: split the PMD, break COW, and, under one hold of the PT
/// lock, check the expected bytes of every site and write all of them.
/// Fills every site's `orig`, `pfn`, `family` and `since`.
pub(crate) fn write_patch(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    vma: &VmaRef,
    before: Mapping,
    sites: &mut [Site],
    expects: &[Option<[u8; MAX_BYTES]>],
) -> Result<PageRef, WriteError> {
    let (pid, addr) = (sites[0].pid, sites[0].addr);
    let ev = |step| Event::new(step).pid(pid).addr(addr);
    let page_addr = addr & PAGE_MASK;
    let mut before = Some(before);
    // The file's own bytes, to compare the ones we replace with: read in
    // if need be, once, before any PT lock is taken.
    let check_file = sites[0].flags & uapi::PATCH_OVER_CHANGED == 0; // mutant: over-changed-bytes
    let file = check_file.then(|| sys::read_file_page(vma, page_addr));
    for _ in 0..MAX_TRIES {
        let page = match cow_page(hp, guard, &ev, page_addr, before.take()) {
            Ok(Some(page)) => page,
            Ok(None) => continue,
            Err(e) => return Err(WriteError::Failed(e)),
        };
        hp.pauses.at(Point::Cowed, pid, &hp.journal);
        let Some(pte) = sys::lock_pte(vma, page_addr, &page) else {
            hp.journal
                .record(ev(Step::WriteBytes).error(EAGAIN, "PTE changed after GUP; retrying"));
            continue;
        };
        // We'd prefer a writable PTE, but the VMA is not writable: then the
        // page must be exclusive (no GUP-fast pin can race).  (Not uffd-wp:
        // `check_vma` refused a VMA registered for it, under the mmap lock.)
        if !pte.writable() && !pte.anon_exclusive() {
            drop(pte);
            hp.journal
                .record(ev(Step::WriteBytes).error(EAGAIN, "page may be shared; retrying COW"));
            continue;
        }
        // Unmap and flush, so no CPU executes the page half-written and no
        // fault maps it between our read and our write.  (A write through
        // a reference taken earlier — /proc/PID/mem's kmap — is excluded by
        // the mmap lock, which we hold for writing.)
        let mut pte = pte.unmap();
        let stamp = Stamp {
            pfn: page.pfn(),
            family: page.family(),
            since: sys::boottime_ns(),
        };
        if let Some((k, m)) = swap_expected(
            &mut pte,
            sites,
            expects,
            file.as_ref().map(Option::as_ref),
            stamp,
        ) {
            drop(pte);
            return Err(WriteError::NotExpected(k, page, m));
        }
        drop(pte);
        hp.journal
            .record(ev(Step::WriteBytes).page(page.pfn(), page.folio_order()));
        return Ok(page);
    }
    Err(WriteError::Failed(hp.journal.fail(
        ev(Step::WriteBytes),
        EAGAIN,
        "page table kept changing",
    )))
}

/// What a PATCH records of the page it writes, in each of its sites.
struct Stamp {
    pfn: usize,
    family: usize,
    since: u64,
}

/// Under the PT lock, PTE cleared: read every site's `orig`, and if each
/// is the expected bytes (where a site has some) and, when `file` is
/// given, the file's own bytes, write every site's bytes.  The first site
/// that was not as it had to be, and how, else None.
fn swap_expected(
    pte: &mut ClearedPte<'_>,
    sites: &mut [Site],
    expects: &[Option<[u8; MAX_BYTES]>],
    file: Option<Option<&CacheRef>>,
    stamp: Stamp,
) -> Option<(usize, Mismatch)> {
    for site in sites.iter_mut() {
        pte.read(site.offset(), &mut site.orig[..site.len]);
        site.pfn = stamp.pfn;
        site.family = stamp.family;
        site.since = stamp.since;
    }
    let mismatch = sites
        .iter()
        .zip(expects)
        .position(|(s, e)| not_expected(s, e))
        .map(|k| (k, Mismatch::Expected))
        .or_else(|| file.and_then(|f| changed(sites, f)));
    if mismatch.is_none() {
        for site in sites.iter() {
            pte.write(site.offset(), &site.bytes[..site.len]);
        }
    }
    mismatch
}

/// The first site whose `orig` (read under the lock) is not the file's
/// own bytes: another tool's breakpoint or patch, which RESTORE would
/// later put back after that tool took it away (uprobes never installs
/// over a breakpoint, and restores the file's instruction).
fn changed(sites: &[Site], file: Option<&CacheRef>) -> Option<(usize, Mismatch)> {
    let Some(file) = file.filter(|c| c.uptodate()) else {
        return Some((0, Mismatch::NoFilePage));
    };
    sites
        .iter()
        .position(|s| {
            let mut theirs = [0u8; MAX_BYTES];
            file.read(s.offset(), &mut theirs[..s.len]);
            theirs[..s.len] != s.orig[..s.len]
        })
        .map(|k| (k, Mismatch::Changed))
}

/// Does site `s`, as read under the lock, differ from what it was
/// expected to hold (when it has an expectation)?
fn not_expected(s: &Site, expect: &Option<[u8; MAX_BYTES]>) -> bool {
    expect.is_some_and(|e| e[..s.len] != s.orig[..s.len]) // mutant: expect-checked-early
}

/// Write one found page's sites the way `dir` says, under its PT lock with
/// the PTE cleared, after checking every site holds what it should now.
pub(crate) fn write_page(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    sites: &[Site],
    w: &mut PageWork,
    dir: Dir,
) -> Result<(), Refused> {
    let (written, sure) = (w.written, w.sure);
    let PageState::Found(page_addr, page) = &mut w.state else {
        return Ok(());
    };
    let (_, pte, already) = write_locked(hp, guard, sites, *page_addr, page, (written, sure), dir)?;
    drop(pte);
    w.already |= already;
    Ok(())
}

/// RESTORE of a plan's only page, no patch left on it (no later page can
/// fail and need it written again): write the originals and zap the copy
/// if clean, as [`zap_page`] would, under the same page-table-lock hold —
/// one hold and one TLB flush, not two.  None if the page was not found.
pub(crate) fn restore_and_zap(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    mm: &MmWithUser,
    sites: &[Site],
    w: &mut PageWork,
) -> Result<Option<Restored>, Refused> {
    let (written, sure) = (w.written, w.sure);
    let PageState::Found(page_addr, page) = &mut w.state else {
        return Ok(None);
    };
    let page_addr = *page_addr;
    let _invalidate = before_zap(mm, page, page_addr);
    let (vma, pte, _) = write_locked(
        hp,
        guard,
        sites,
        page_addr,
        page,
        (written, sure),
        Dir::Revert,
    )?;
    Ok(Some(zap_cleared(hp, &sites[0], vma, pte, page, page_addr)))
}

/// Lock the PTE of the copy at `page_addr` again, check it is still ours,
/// and write its sites the way `dir` says with the PTE cleared; the caller
/// remaps or zaps it.  `(written, sure)`: what PATCH left in the page, and
/// whether the copy is certainly the patch's.  Also says whether some
/// site held its originals already.
fn write_locked<'a>(
    hp: &Hugepoke,
    guard: &'a MmapWriteGuard<'_>,
    sites: &[Site],
    page_addr: usize,
    page: &mut PageRef,
    (written, sure): (Written, bool),
    dir: Dir,
) -> Result<(&'a VmaRef, ClearedPte<'a>, bool), Refused> {
    let rep = &sites[0];
    let (vma, pte) = relock_pte(guard, rep, page_addr, page).ok_or(Refused::Kept(Refusal::new(
        EAGAIN,
        "page table kept changing",
    )))?;
    // The first pass saw this copy exclusive and not uffd-wp; reclaim may
    // have swapped it out and a read fault back in since, shared (with a
    // child that holds the swap entry) or write-protected.  Not ours then.
    if !pte.writable() && (pte.uffd_wp() || !pte.anon_exclusive()) {
        // mutant: no-cow-break-after-fork/2 batch-no-cow-break/2 uffd-wp-write-through/2
        let why =
            "the copy is no longer exclusive to the target (swapped in shared?); nothing written";
        return Err(Refused::Kept(Refusal::new(EAGAIN, why)));
    }
    let mut pte = pte.unmap();
    let already = swap_sites(&mut pte, sites, written, dir, sure)?;
    let ev = rep.event(Step::RestoreBytes).addr(page_addr + rep.offset());
    hp.journal.record(ev.page(page.pfn(), 0).note(match dir {
        Dir::Reapply => "patched bytes written again (undo of a restore that could not finish)",
        Dir::Revert if already == sites.len() => {
            "the original bytes were already there (another tool put them back?); nothing written"
        }
        Dir::Revert if already != 0 => "original bytes written back where they were not already",
        Dir::Revert if page_addr == rep.addr & PAGE_MASK => "original bytes written back",
        Dir::Revert => "original bytes written back (text moved since PATCH)",
    }));
    Ok((vma, pte, already != 0))
}

/// Under the PT lock with the PTE cleared: if every site holds what it
/// should now (for `dir`), or, restoring a copy that is `sure`ly the
/// patch's, already the originals, write the other bytes where they are
/// not; else write nothing.  How many sites of a RESTORE held their
/// originals already.
fn swap_sites(
    pte: &mut ClearedPte<'_>,
    sites: &[Site],
    written: Written,
    dir: Dir,
    sure: bool,
) -> Result<usize, Refused> {
    let mut already = 0;
    for s in sites {
        let (now_there, new) = swap_bytes(s, written, dir);
        let mut now = [0u8; MAX_BYTES];
        pte.read(s.offset(), &mut now[..s.len]);
        let restoring = dir == Dir::Revert && written == Written::Bytes && sure;
        if restoring && now[..s.len] == *new {
            // mutant: restore-refuses-originals/2
            already += 1;
        } else if now[..s.len] != *now_there {
            // mutant: no-byte-check/2
            let why = "bytes at a site changed while it was restored; nothing left written";
            return Err(Refused::Kept(Refusal::new(sys::eilseq(), why)));
        }
    }
    for s in sites {
        let new = swap_bytes(s, written, dir).1;
        let mut now = [0u8; MAX_BYTES];
        pte.read(s.offset(), &mut now[..s.len]);
        if now[..s.len] != *new {
            pte.write(s.offset(), new);
        }
    }
    Ok(already)
}

/// The last step for a page whose originals are back: zap the copy if it
/// equals the page-cache page and nothing else holds it (see
/// [`keep_reason`]), else keep it.
pub(crate) fn zap_page(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    mm: &MmWithUser,
    rep: &Site,
    page_addr: usize,
    page: &mut PageRef,
    last_on_page: bool,
) -> Restored {
    if !last_on_page {
        return kept(
            hp,
            rep,
            page_addr,
            page,
            "other patches remain on this page",
        );
    }
    let _invalidate = before_zap(mm, page, page_addr);
    let Some((vma, pte)) = relock_pte(guard, rep, page_addr, page) else {
        return kept(
            hp,
            rep,
            page_addr,
            page,
            "the page moved while it was restored",
        );
    };
    zap_cleared(hp, rep, vma, pte.unmap(), page, page_addr)
}

/// Keep the copy at `page_addr` mapped, and say why.
pub(crate) fn kept(
    hp: &Hugepoke,
    rep: &Site,
    page_addr: usize,
    page: &PageRef,
    why: &'static str,
) -> Restored {
    let ev = rep.event(Step::KeepAnonPage).addr(page_addr + rep.offset());
    hp.journal.record(ev.page(page.pfn(), 0).note(why));
    Restored::kept(page_addr)
}

/// Under the PT lock with the PTE cleared and the originals written: zap
/// the copy in `vma` if [`keep_reason`] finds no reason to keep it.
fn zap_cleared(
    hp: &Hugepoke,
    rep: &Site,
    vma: &VmaRef,
    pte: ClearedPte<'_>,
    page: &PageRef,
    page_addr: usize,
) -> Restored {
    let info = sys::vma_info(vma);
    let cache = sys::page_cache_page(vma, page_addr);
    let keep = keep_reason(&info, page, cache.as_ref(), &pte).map(Keep::why); // mutant: map-no-zap
    zap_or_keep(hp, rep, pte, page, keep, cache, page_addr)
}

/// Under the PT lock with the PTE cleared and the originals written: zap
/// the anonymous page so the page-cache page faults back in, unless `keep`
/// says why not.
fn zap_or_keep(
    hp: &Hugepoke,
    rep: &Site,
    pte: ClearedPte<'_>,
    page: &PageRef,
    keep: Option<&'static str>,
    cache: Option<CacheRef>,
    page_addr: usize,
) -> Restored {
    let (None, Some(c)) = (keep, cache) else {
        drop(pte);
        return kept(hp, rep, page_addr, page, keep.unwrap_or(""));
    };
    let ev = |step| rep.event(step).addr(page_addr + rep.offset());
    hp.journal.record(ev(Step::ZapAnonPage).page(page.pfn(), 0).note(match pte.zap(page) {
        sys::SwapSlot::Freed => "PTE zapped, swap slot freed; page-cache page faults back in",
        sys::SwapSlot::Kept => "PTE zapped, page stays in the swap cache (locked elsewhere); page-cache page faults back in",
        sys::SwapSlot::None => "PTE zapped; page-cache page faults back in",
    }));
    hp.journal.record(
        ev(Step::ZapAnonPage)
            .page(c.pfn(), c.folio_order())
            .note("page-cache page to fault in"),
    );
    Restored {
        zapped: true,
        pmd_mappable: c.pmd_mappable(),
        cache_order: c.folio_order(),
        page_addr,
    }
}

// SPDX-License-Identifier: GPL-2.0

//! The processes forked while a patch lives.  fork() shares the patched
//! copy with the child (COW), so the child runs the patch too; RESTORE
//! takes it back from each of them first, then restores the target.
//!
//! Who they are is the rmap walk's answer for the page PATCH wrote, while
//! the target still maps that very page (each child's children too: they
//! map it as well).  Each candidate is checked again under its own mmap
//! write lock and page-table lock: its PTE maps that page, in a private
//! read-only executable mapping of the same file page; the page holds the
//! patched bytes at every site and the page-cache page's everywhere else,
//! the patch's originals are the file's, nothing else holds the page and
//! no userfaultfd watches the mapping (RESTORE's rule, [`keep_reason_with`]).
//! Then its PTE is zapped — the text as it was before the patch faults
//! back in — and its 2 MiB range collapsed.  The shared page itself is
//! never written: that would change every mapper at once.  A child whose
//! copy may not go refuses the RESTORE before the target is touched.
//!
//! Locks: the target's state (held by RESTORE), then one mmap lock at a
//! time — the target's while its copies are looked up, then each child's.

use kernel::{
    mm::{Mm, MmWithUser},
    prelude::*,
    sync::aref::ARef,
};

use super::{
    outcome::Refused,
    plan::PageWork,
    zap::{before_zap, keep_reason_with, Keep},
};
use crate::{
    journal::{Event, Step},
    patches::Site,
    policy,
    refusal::Refusal,
    sys::{self, CacheRef, ClearedPte, MmapWriteGuard, PageRef, PAGE_MASK, PMD_MASK},
    uapi::PATCH_INSTALL_PMD,
    Hugepoke,
};

/// Most processes one patched page is looked for in.
const MAX_MAPPERS: usize = 1024;

/// Take the patch of `sites` (their `pages`) back from every process that
/// maps a page PATCH wrote besides the target `mm`.  Refuses (with the
/// site to blame) if one of them may not give it back.
pub(super) fn restore_forked(
    hp: &Hugepoke,
    mm: &MmWithUser,
    sites: &[Site],
    pages: &[PageWork],
) -> Result<(), (Refused, usize)> {
    let copies = patched_copies(mm, sites, pages).map_err(|r| (Refused::Kept(r), 0))?;
    let mut collapses: KVec<(ARef<Mm>, usize, bool)> = KVec::new();
    let mut drained = false;
    for (page, range) in copies.iter() {
        let nomem = |_| {
            (
                Refused::Kept(Refusal::new(
                    ENOMEM,
                    "no memory to list who maps the patched page",
                )),
                range.start,
            )
        };
        let mappers = page.mappers(mm, MAX_MAPPERS).map_err(nomem)?; // mutant: child-left-patched
        for (child, addr) in mappers.iter() {
            // Its last mmput (if it exits meanwhile) never runs under our locks.
            let Some(child_user) = child.mmget_not_zero().map(MmWithUser::into_mmput_async) else {
                continue;
            };
            let mut dropped = drop_child_copy(hp, &child_user, *addr, page, &sites[range.clone()]);
            if matches!(dropped, Err(Some(Keep::Pinned))) && !drained && page.may_be_lru_cached() {
                // A per-CPU LRU batch may hold the page: drain once, no lock held.
                sys::lru_add_drain_all();
                drained = true;
                dropped = drop_child_copy(hp, &child_user, *addr, page, &sites[range.clone()]);
            }
            match dropped {
                Ok(Some(haddr)) => {
                    let install = sites[range.start].flags & PATCH_INSTALL_PMD != 0;
                    let _ = collapses.push((child.clone(), haddr, install), GFP_KERNEL);
                }
                Ok(None) => {}
                Err(Some(_)) => {
                    let r = Refusal::new(EBUSY, "a process forked while the patch lived may not give its copy back (see keep_anon_page); nothing restored");
                    return Err((Refused::Kept(r), range.start));
                }
                Err(None) => {
                    let r = Refusal::new(
                        EINTR,
                        "fatal signal while waiting for a forked process's mmap lock",
                    );
                    return Err((Refused::Kept(r), range.start));
                }
            }
        }
    }
    collapse_children(hp, &collapses);
    Ok(())
}

/// The pages of `pages` whose copy at the patch's own address in the
/// target is still the page PATCH wrote, with their sites' range.
fn patched_copies(
    mm: &MmWithUser,
    sites: &[Site],
    pages: &[PageWork],
) -> Result<KVec<(PageRef, core::ops::Range<usize>)>, Refusal> {
    let waiting = |e| Refusal::new(e, "fatal signal while waiting for the target's mmap lock");
    let guard = MmapWriteGuard::lock_killable(mm).map_err(waiting)?;
    let mut copies = KVec::new();
    for w in pages.iter() {
        let rep = &sites[w.range.start];
        let page_addr = rep.addr & PAGE_MASK;
        let Some(vma) = guard.vma_lookup(page_addr) else {
            continue;
        };
        if sys::vma_info(vma).address_of(rep.mapping, rep.pgoff) != Some(page_addr) {
            continue;
        }
        match sys::anon_copy_at(vma, page_addr) {
            Some(page) if page.pfn() == rep.pfn => {
                let nomem = Refusal::new(ENOMEM, "no memory to list the patched pages");
                copies
                    .push((page, w.range.clone()), GFP_KERNEL)
                    .map_err(|_| nomem)?;
            }
            _ => {}
        }
    }
    Ok(copies)
}

/// In `child`, where `addr` may map the patched `page`: zap its PTE if it
/// maps that very page and the page may go (Ok with the 2 MiB range to
/// collapse), say nothing if it does not map it (Ok(None)), or say why it
/// is kept (journaled; None: a fatal signal came first).
fn drop_child_copy(
    hp: &Hugepoke,
    child: &MmWithUser,
    addr: usize,
    page: &PageRef,
    sites: &[Site],
) -> Result<Option<usize>, Option<Keep>> {
    let rep = &sites[0];
    let pid = sys::mm_owner_tgid(child);
    let ev = |step| {
        Event::new(step)
            .pid(pid)
            .addr(addr + rep.offset())
            .handle(rep.handle)
            .page(page.pfn(), 0)
    };
    let Ok(guard) = MmapWriteGuard::lock_killable(child) else {
        return Err(None);
    };
    let Some(vma) = guard.vma_lookup(addr) else {
        return Ok(None);
    };
    let info = sys::vma_info(vma);
    if info.address_of(rep.mapping, rep.pgoff) != Some(addr) {
        return Ok(None);
    }
    // A look first: a process forked before PATCH shares the anon_vma but
    // maps a page of its own here, and is left alone (not even notified).
    if sys::anon_copy_at(vma, addr).is_none_or(|p| p.pfn() != page.pfn()) {
        return Ok(None);
    }
    let _invalidate = before_zap(child, page, addr);
    let Some(pte) = sys::lock_pte(vma, addr, page) else {
        return Ok(None);
    };
    // It maps the very page PATCH wrote: the patch is this process's too.
    let pte = pte.unmap();
    let cache = sys::page_cache_page(vma, addr);
    let keep = match policy::check_restore_vma(&info) {
        Err(_) => Some(Keep::Differs),
        Ok(()) => keep_reason_with(&info, page, cache.as_ref(), |c| {
            only_the_patch(&pte, c, sites)
        }),
    };
    if let Some(why) = keep {
        drop(pte);
        hp.journal.record(ev(Step::KeepAnonPage).note(why.why()));
        return Err(Some(why));
    }
    pte.zap(page);
    hp.journal.record(ev(Step::ZapAnonPage).note(
        "a process forked while the patch lived: its PTE of the patched page zapped; the page-cache page faults back in",
    ));
    Ok(cache
        .filter(CacheRef::pmd_mappable)
        .map(|_| addr & PMD_MASK))
}

/// Is the copy under `pte` the page-cache page `cache` with the patch of
/// `sites` and nothing else: the patched bytes at every site, the file's
/// own bytes (the patch's originals) under them, equal everywhere else?
fn only_the_patch(pte: &ClearedPte<'_>, cache: &CacheRef, sites: &[Site]) -> bool {
    let mut holes = KVec::new(); // mutant: child-copy-not-checked
    for s in sites {
        let (mut now, mut file) = ([0u8; 16], [0u8; 16]);
        pte.read(s.offset(), &mut now[..s.len]);
        cache.read(s.offset(), &mut file[..s.len]);
        if now[..s.len] != s.bytes[..s.len] || file[..s.len] != s.orig[..s.len] {
            return false;
        }
        if holes.push((s.offset(), s.len), GFP_KERNEL).is_err() {
            return false;
        }
    }
    // (RESTORE's sites come in offset order within a page; out of order,
    // the compare says "differs", which only keeps the copy.)
    pte.identical_to_except(cache, &holes)
}

/// Collapse each child's 2 MiB range whose patched page was zapped, each
/// with that child's mmap lock held for reading; journaled.
fn collapse_children(hp: &Hugepoke, collapses: &[(ARef<Mm>, usize, bool)]) {
    for (i, (mm, haddr, install)) in collapses.iter().enumerate() {
        if collapses[..i]
            .iter()
            .any(|(m, h, _)| core::ptr::eq(&**m, &**mm) && h == haddr)
        {
            continue;
        }
        let Some(user) = mm.mmget_not_zero().map(MmWithUser::into_mmput_async) else {
            continue;
        };
        let guard = user.mmap_read_lock();
        let result = sys::collapse_pte_mapped_thp(&user, &guard, *haddr, *install);
        drop(guard);
        let ev = Event::new(Step::Collapse)
            .pid(sys::mm_owner_tgid(&user))
            .addr(*haddr);
        let name = sys::scan_result_name(result);
        hp.journal.record(if sys::scan_result_ok(result) {
            ev.note(name)
        } else {
            ev.error(EBUSY, name)
        });
    }
}

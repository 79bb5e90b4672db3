// SPDX-License-Identifier: GPL-2.0

//! The processes forked while a patch lives.  fork() shares the patched
//! copy with the child (COW), so the child — and its children — run the
//! patch too; RESTORE restores each of them first, by RESTORE's own passes
//! in that process, then the target.
//!
//! Who they are is the rmap walk's answer for the target's copy of each
//! patched page, found as RESTORE finds it (following `mremap`, swap and
//! migration) and walked with the target's mmap lock held, which keeps
//! the copy's anon_vma alive.  The walk names every process that *may*
//! map the page (one forked before the patch shares the anon_vma too), so
//! each is asked, under its own mmap lock, whether it maps that very page;
//! only then is the patch restored there: its copy found, every site's
//! bytes checked to be the patched ones, COW broken (the page is shared:
//! it is never written), the originals written into its own copy, the
//! copy zapped if it now equals the page-cache page, its range collapsed.
//! A change of its own stays with it.
//!
//! A process that refuses stops the RESTORE before the target is touched
//! ("patch kept; RESTORE may be retried"), but for a closing file or an
//! unloading module: then it is journaled and the target restored anyway.
//!
//! Locks: the target's state (held by RESTORE), then one mmap lock at a
//! time — the target's while its copies are walked, then each child's.

use kernel::{
    alloc::AllocError,
    mm::{Mm, MmWithUser},
    prelude::*,
    sync::aref::ARef,
};

use super::{
    locate::{find_anon_copy, Look, Shared},
    outcome::{Closing, Refused},
    plan::{self, Outcome, Written},
    restore::restore_pages,
};
use crate::{
    journal::{Event, Step},
    patches::Site,
    refusal::Refusal,
    sys::{self, MmapWriteGuard, PageRef, PMD_MASK},
    target::Target,
    uapi::PATCH_INSTALL_PMD,
    Hugepoke,
};

/// Most places one patched page is looked for in.
const MAX_MAPPERS: usize = 4096;

/// Who may map the patched pages: each candidate's mm, the address there,
/// and which of `copies` (the target's patched pages, with the index of
/// their first site) it may map.
struct Candidates {
    copies: KVec<(PageRef, usize)>,
    places: KVVec<(ARef<Mm>, usize, usize)>,
}

/// Restore the patch of `sites` (their `pages`) in every process forked
/// while it lived, before the target `mm`; `last_on_page` as for the
/// target.  Refuses (with the site to blame) if one of them cannot give
/// it back, unless the patch's file is closing or the module unloading.
pub(super) fn restore_forked(
    hp: &Hugepoke,
    mm: &MmWithUser,
    sites: &[Site],
    pages: &[plan::PageWork],
    last_on_page: &impl Fn(&[Site]) -> bool,
    closing: Closing,
) -> Result<(), (Refused, usize)> {
    let pass = Pass { hp, sites, closing };
    let found = match candidates(hp, mm, sites, pages) {
        Ok(found) => found,
        Err(r) => return pass.stop(sites[0].pid, (Refused::Kept(r), 0)),
    };
    let mut collapses = KVec::new();
    let mut result = Ok(());
    for (i, (child, _, _)) in found.places.iter().enumerate() {
        // Each process once, at its first place.
        if !found.places[..i]
            .iter()
            .any(|(m, _, _)| core::ptr::eq(&**m, &**child))
        {
            result = pass.child(child, &found, i, last_on_page, &mut collapses);
        }
        if result.is_err() {
            break;
        }
    }
    // The target's copies go before its own RESTORE counts their references.
    drop(found);
    collapse_children(hp, &collapses);
    result
}

/// One RESTORE's pass over the forked processes.
struct Pass<'a> {
    hp: &'a Hugepoke,
    sites: &'a [Site],
    closing: Closing,
}

impl Pass<'_> {
    /// Restore the patch in `child` (named first at place `i` of `found`)
    /// if it maps a patched page; a refusal goes through [`Pass::stop`].
    fn child(
        &self,
        child: &Mm,
        found: &Candidates,
        i: usize,
        last_on_page: &impl Fn(&[Site]) -> bool,
        collapses: &mut KVec<(ARef<Mm>, usize, bool)>,
    ) -> Result<(), (Refused, usize)> {
        // Its last mmput (if it exits meanwhile) never runs under our locks.
        let Some(child) = child.mmget_not_zero().map(MmWithUser::into_mmput_async) else {
            return Ok(());
        };
        let pid = sys::mm_owner_tgid(&child);
        match maps_a_patched_page(&child, found, i, self.sites) {
            Err(r) => self.stop(pid, (Refused::Kept(r), 0)),
            Ok(ours) => {
                if !ours {
                    // mutant: child-precheck-skipped
                    return Ok(());
                }
                restore_child(self.hp, &child, self.sites, last_on_page, collapses)
                    .or_else(|e| self.stop(pid, e))
            }
        }
    }

    /// What a forked process's refusal does: stop a RESTORE before the
    /// target, or, at close and unload (the target is restored whatever
    /// its children say), only be journaled.
    fn stop(&self, pid: i32, (refused, at): (Refused, usize)) -> Result<(), (Refused, usize)> {
        let Some(r) = refused.stops_undo() else {
            return Ok(());
        };
        if self.closing == Closing::No {
            return Err((Refused::Kept(r), at));
        }
        let why = "a process forked while the patch lived could not give it back; the target is restored all the same (its file closed, or the module unloads)";
        let ev = self.sites[at].event(Step::Restore).pid(pid);
        self.hp.journal.record(ev.error(r.errno, why));
        self.hp.journal.record(ev.error(r.errno, r.why));
        Ok(())
    }
}

/// The target's copy of each patched page, and every place the rmap walk
/// says it may be mapped by another process; the target's mmap lock is
/// held for the walk.
fn candidates(
    hp: &Hugepoke,
    mm: &MmWithUser,
    sites: &[Site],
    pages: &[plan::PageWork],
) -> Result<Candidates, Refusal> {
    let waiting = |e| Refusal::new(e, "fatal signal while waiting for the target's mmap lock");
    let guard = MmapWriteGuard::lock_killable(mm).map_err(waiting)?;
    let nomem = |_| Refusal::new(ENOMEM, "no memory to list who maps the patched pages");
    let mut found = Candidates {
        copies: KVec::new(),
        places: KVVec::new(),
    };
    for w in pages.iter() {
        let rep = &sites[w.range.start];
        // (No copy, or one RESTORE would refuse: its own pass says why.)
        let Ok(Look::Copy(_, _, page, _)) = find_anon_copy(&guard, rep) else {
            continue;
        };
        let places = match page.mappers(mm, MAX_MAPPERS) {
            Ok(places) => places, // mutant: child-left-patched
            Err(e) if e == EBUSY => {
                let why = "the patched page is a KSM or large folio now: processes forked since PATCH are not looked for";
                hp.journal.record(rep.event(Step::Restore).note(why));
                continue;
            }
            Err(e) if e == E2BIG => {
                let why = "more than 4096 places may map the patched page: nothing restored";
                return Err(Refusal::new(E2BIG, why));
            }
            Err(e) => {
                return Err(Refusal::new(
                    e,
                    "the walk of who maps the patched page failed",
                ))
            }
        };
        let k = found.copies.len();
        found
            .copies
            .push((page, w.range.start), GFP_KERNEL)
            .map_err(nomem)?;
        for (m, addr) in places.into_iter() {
            found.places.push((m, addr, k), GFP_KERNEL).map_err(nomem)?;
        }
    }
    Ok(found)
}

/// Does `child` map, at one of the places the walk named for it (from
/// the `first`), the very page of the target's copy that place names?
/// Only where it maps the same file page there; a look at the page tables,
/// and a read fault (a swapped-out copy) unless userfaultfd watches it.
fn maps_a_patched_page(
    child: &MmWithUser,
    found: &Candidates,
    first: usize,
    sites: &[Site],
) -> Result<bool, Refusal> {
    let waiting = |e| {
        Refusal::new(
            e,
            "fatal signal while waiting for a forked process's mmap lock",
        )
    };
    let guard = MmapWriteGuard::lock_killable(child).map_err(waiting)?;
    let me = &found.places[first].0;
    for (m, addr, k) in found.places[first..].iter() {
        if !core::ptr::eq(&**m, &**me) {
            continue;
        }
        let (copy, rep) = (&found.copies[*k].0, &sites[found.copies[*k].1]);
        let Some(vma) = guard.vma_lookup(*addr) else {
            continue;
        };
        let info = sys::vma_info(vma);
        if info.address_of(rep.mapping, rep.pgoff) != Some(*addr) {
            continue;
        }
        let page = match sys::anon_copy_at(vma, *addr) {
            Some(page) => Some(page),
            None if info.uffd_armed || !info.has_anon_vma => None,
            None => guard.get_user_page(*addr, sys::FOLL_FORCE).ok(),
        };
        if page.is_some_and(|p| p.pfn() == copy.pfn()) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// RESTORE's passes in `child` for `sites` (journaled under its pid);
/// the 2 MiB ranges whose copy was zapped go to `collapses`.
fn restore_child(
    hp: &Hugepoke,
    child: &MmWithUser,
    sites: &[Site],
    last_on_page: &impl Fn(&[Site]) -> bool,
    collapses: &mut KVec<(ARef<Mm>, usize, bool)>,
) -> Result<(), (Refused, usize)> {
    let pid = sys::mm_owner_tgid(child);
    let nomem = |_| {
        (
            Refused::Kept(Refusal::new(ENOMEM, "no memory to list the patch's sites")),
            0,
        )
    };
    let mut own = KVVec::with_capacity(sites.len(), GFP_KERNEL).map_err(nomem)?;
    for s in sites {
        own.push(Site { pid, ..*s }, GFP_KERNEL).map_err(nomem)?;
    }
    let mut pages = plan::pages_of(&own, Written::Bytes).map_err(|_| nomem(AllocError))?;
    let why = "a process forked while the patch lived runs it too: restoring it there first";
    hp.journal.record(own[0].event(Step::Restore).note(why));
    // The page is the target's too: COW is broken for the child alone.
    restore_pages(hp, child, &own, &mut pages, last_on_page, Shared::Break)?;
    let install = sites[0].flags & PATCH_INSTALL_PMD != 0;
    for w in pages.iter() {
        if let Outcome::Done(r) = &w.outcome {
            if r.zapped && r.pmd_mappable {
                let _ = collapses.push(
                    (ARef::from(&**child), r.page_addr & PMD_MASK, install),
                    GFP_KERNEL,
                );
            }
        }
    }
    Ok(())
}

/// Collapse each child's 2 MiB range whose copy was zapped, each with that
/// child's mmap lock held for reading; journaled.
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
        let ev = Event::new(Step::Collapse)
            .pid(sys::mm_owner_tgid(&user))
            .addr(*haddr);
        // Killable (for writing): RESTORE runs in the caller's task.
        let Ok(guard) = MmapWriteGuard::lock_killable(&user) else {
            let why = "fatal signal while waiting for a forked process's mmap lock: not collapsed";
            hp.journal.record(ev.error(EINTR, why));
            return;
        };
        let result = sys::collapse_pte_mapped_thp(&user, &guard, *haddr, *install);
        drop(guard);
        hp.journal
            .record(match sys::collapse_verdict(result, *install) {
                Ok((note, _)) => ev.note(note),
                Err(name) => ev.error(EBUSY, name),
            });
    }
}

/// The processes forked while `handle`'s patch of `target` lived that run
/// it now, added to `pids` (each once): QUERY_FORKED's answer.  None if
/// the target is gone.
pub(crate) fn forked_of(
    hp: &Hugepoke,
    target: &Target,
    handle: u64,
    pids: &mut KVec<i32>,
) -> Result {
    let ev = Event::new(Step::Query).handle(handle);
    let state = target.lock_killable(&hp.journal, ev)?;
    let sites = state.patches.sites_of(handle)?;
    let Some(mm) = target.mm_user() else {
        return Ok(());
    };
    if sites.is_empty() {
        return Ok(());
    }
    forked_pids(hp, &mm, &sites, pids)
}

/// The processes forked while the patch of `sites` lived that run it now
/// (they map one of its patched pages), added to `pids` by pid, each
/// once.  Found as RESTORE finds them (the rmap walk of the target `mm`'s
/// copies, then each process asked under its own mmap lock).
fn forked_pids(hp: &Hugepoke, mm: &MmWithUser, sites: &[Site], pids: &mut KVec<i32>) -> Result {
    let pages = plan::pages_of(sites, Written::Bytes)?;
    let found = candidates(hp, mm, sites, &pages).map_err(|r| r.errno)?;
    for (i, (m, _, _)) in found.places.iter().enumerate() {
        if found.places[..i]
            .iter()
            .any(|(o, _, _)| core::ptr::eq(&**o, &**m))
        {
            continue;
        }
        let Some(child) = m.mmget_not_zero().map(MmWithUser::into_mmput_async) else {
            continue;
        };
        // (The walk names processes forked before the patch too.)
        if maps_a_patched_page(&child, &found, i, sites).map_err(|r| r.errno)? {
            // mutant: forked-query-unchecked
            let pid = sys::mm_owner_tgid(&child);
            if pid > 0 && !pids.contains(&pid) {
                pids.push(pid, GFP_KERNEL)?;
            }
        }
    }
    Ok(())
}

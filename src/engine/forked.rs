// SPDX-License-Identifier: GPL-2.0

//! The processes forked while a patch lives.  fork() shares the patched
//! copy with the child (COW), so the child — and its children — run the
//! patch too; RESTORE restores each of them first, by RESTORE's own passes
//! in that process, then the target.
//!
//! Who they are is `lineage`'s to say (found through the file's own
//! mappings in the target's fork family, by ancestry and bytes).
//! Only then is the patch restored there: its copy found, every site's
//! bytes checked to be the patched ones, COW broken (the page may be
//! shared: it is never written), the originals written into its own
//! copy, the copy zapped if it now equals the page-cache page, its range
//! collapsed.  A change of its own stays with it.
//!
//! A process that refuses stops the RESTORE before the target is touched
//! ("patch kept; RESTORE may be retried"), but for a closing file or an
//! unloading module: then it is journaled and the target restored anyway.
//!
//! Locks: the target's state (held by RESTORE), then one mmap lock at a
//! time (each child's), as `lineage` takes them.

use kernel::{
    alloc::AllocError,
    mm::{Mm, MmWithUser},
    prelude::*,
    sync::aref::ARef,
};

use super::{
    lineage::{candidates, files_of, runs_the_patch, Candidates, Lineage, Runs},
    locate::Shared,
    outcome::{Closing, Refused},
    plan::{self, Outcome, Written},
    restore::restore_pages,
};
use crate::{
    journal::{Event, Step},
    patches::Site,
    refusal::Refusal,
    sys::{self, MmapWriteGuard, PMD_MASK},
    target::Target,
    uapi::PATCH_INSTALL_PMD,
    Hugepoke,
};

/// What a forked pass met.
#[derive(Default)]
pub(super) struct Reach {
    /// The walk named other processes of the target's fork family.
    pub(super) others: bool,
    /// A process it restored had its copy shared (not exclusive): with
    /// one the walk did not see, maybe (forked meanwhile).
    pub(super) shared: bool,
}

/// Restore the patch of `sites` (their `pages`) in every process forked
/// while it lived; `last_on_page` as for the target.  What the pass met,
/// or a refusal (with the site to blame) if one that runs the patch
/// cannot give it back, unless the patch's file is closing or the module
/// unloading.
pub(super) fn restore_forked(
    hp: &Hugepoke,
    lineage: &Lineage<'_>,
    sites: &[Site],
    pages: &[plan::PageWork],
    last_on_page: &impl Fn(&[Site]) -> bool,
    closing: Closing,
) -> Result<Reach, (Refused, usize)> {
    let pass = Pass {
        hp,
        sites,
        closing,
        lineage,
    };
    let found = match candidates(hp, lineage, sites, pages) {
        Ok(found) => found,
        Err(r) => {
            return pass
                .stop(sites[0].pid, (Refused::Kept(r), 0))
                .map(|()| Reach::default())
        }
    };
    let mut reach = Reach {
        others: !found.places.is_empty(),
        shared: false,
    };
    let mut collapses = KVec::new();
    let mut result = Ok(false);
    for (i, (child, _, _)) in found.places.iter().enumerate() {
        // Each process once, at its first place.
        if !found.places[..i]
            .iter()
            .any(|(m, _, _)| core::ptr::eq(&**m, &**child))
        {
            result = pass.child(child, &found, i, last_on_page, &mut collapses);
        }
        match result {
            Ok(shared) => reach.shared |= shared,
            Err(_) => break,
        }
    }
    drop(found);
    collapse_children(hp, &collapses);
    result.map(|_| reach)
}

/// One RESTORE's pass over the forked processes.
struct Pass<'a> {
    hp: &'a Hugepoke,
    sites: &'a [Site],
    closing: Closing,
    lineage: &'a Lineage<'a>,
}

impl Pass<'_> {
    /// Restore the patch in `child` (named first at place `i` of `found`)
    /// if it runs it (whether its copy was shared); a refusal goes through
    /// [`Pass::stop`].
    fn child(
        &self,
        child: &Mm,
        found: &Candidates,
        i: usize,
        last_on_page: &impl Fn(&[Site]) -> bool,
        collapses: &mut KVec<(ARef<Mm>, usize, bool)>,
    ) -> Result<bool, (Refused, usize)> {
        // Its last mmput (if it exits meanwhile) never runs under our locks.
        let Some(child) = child.mmget_not_zero().map(MmWithUser::into_mmput_async) else {
            return Ok(false);
        };
        let pid = sys::mm_owner_tgid(&child);
        match runs_the_patch(&child, found, i, self.sites, self.lineage) {
            Err(r) => self.stop(pid, (Refused::Kept(r), 0)).map(|()| false),
            Ok(Runs::Unsure(why)) => {
                let refused = Refused::Kept(Refusal::new(EBUSY, why));
                self.stop(pid, (refused, 0)).map(|()| false) // mutant: unsure-left-silently
            }
            Ok(verdict) => {
                if verdict == Runs::No {
                    // mutant: child-precheck-skipped
                    return Ok(false);
                }
                restore_child(self.hp, &child, self.sites, last_on_page, collapses)
                    .or_else(|e| self.stop(pid, e).map(|()| false))
            }
        }
    }

    /// What a forked process's refusal does (journaled under its pid):
    /// stop a RESTORE before the target, or, at close and unload (the
    /// target is restored whatever its children say), nothing more.
    fn stop(&self, pid: i32, (refused, at): (Refused, usize)) -> Result<(), (Refused, usize)> {
        let Some(r) = refused.stops_undo() else {
            return Ok(());
        };
        // Under the process's own pid first: which one it was.
        let ev = self.sites[at].event(Step::Restore).pid(pid);
        self.hp.journal.record(ev.error(r.errno, r.why));
        // At close the target is restored whatever its children say —
        // unless an earlier RESTORE restored it already: then nothing but
        // them runs the patch, which is kept (persistent).
        let target_done = self.sites.iter().any(|s| s.restored_at != 0);
        if self.closing == Closing::No || (self.closing == Closing::File && target_done) {
            return Err((Refused::Kept(r), at));
        }
        let why = "a process forked while the patch lived could not give it back; the target is restored all the same (its file closed, or the module unloads)";
        self.hp.journal.record(ev.error(r.errno, why));
        Ok(())
    }
}

/// RESTORE's passes in `child` for `sites` (journaled under its pid);
/// the 2 MiB ranges whose copy was zapped go to `collapses`.  Whether a
/// copy there was shared (not exclusive).
fn restore_child(
    hp: &Hugepoke,
    child: &MmWithUser,
    sites: &[Site],
    last_on_page: &impl Fn(&[Site]) -> bool,
    collapses: &mut KVec<(ARef<Mm>, usize, bool)>,
) -> Result<bool, (Refused, usize)> {
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
    Ok(pages.iter().any(|w| w.shared))
}

/// Collapse each child's 2 MiB range whose copy was zapped, each with that
/// child's mmap lock held (for writing: the wait is killable); journaled.
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
/// it now, added to `pids` (each once): QUERY_FORKED's answer, found as
/// RESTORE finds them (also when the target is gone).
pub(crate) fn forked_of(
    hp: &Hugepoke,
    target: &Target,
    handle: u64,
    pids: &mut KVec<i32>,
) -> Result {
    let ev = Event::new(Step::Query).handle(handle);
    let state = target.lock_killable(&hp.journal, ev)?;
    let sites = state.patches.sites_of(handle)?;
    if sites.is_empty() {
        return Ok(());
    }
    let pages = plan::pages_of(&sites, Written::Bytes)?;
    let files = files_of(&state.patches, &sites, &pages)?;
    let mm = target.mm_user();
    let lineage = Lineage {
        mm: mm.as_deref().map(|m| &**m),
        pid: target.pid.as_ref(),
        parent: target.parent.as_ref(),
        files: &files,
    };
    let found = candidates(hp, &lineage, &sites, &pages).map_err(|r| r.errno)?;
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
        // (The walk names every process of the family.)
        if runs_the_patch(&child, &found, i, &sites, &lineage).map_err(|r| r.errno)? == Runs::Yes {
            // mutant: forked-query-unchecked
            let pid = sys::mm_owner_tgid(&child);
            if pid > 0 && !pids.contains(&pid) {
                pids.push(pid, GFP_KERNEL)?;
            }
        }
    }
    Ok(())
}

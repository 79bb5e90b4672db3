// SPDX-License-Identifier: GPL-2.0

//! The processes forked while a patch lives.  fork() shares the patched
//! copy with the child (COW), so the child — and its children — run the
//! patch too; RESTORE restores each of them first, by RESTORE's own passes
//! in that process, then the target.
//!
//! Who they are: every process whose private executable mapping of a
//! patched file page belongs to the target's fork family (the root of the
//! anon_vma of the copy PATCH wrote, which every process forked from the
//! target since shares) — found through the file's own mappings, as
//! uprobes finds its mms, so a child is found when its copy has diverged
//! from the target's, when the target no longer maps it and when the
//! target is gone.  Each is then asked, under its own mmap lock, whether
//! it runs the patch: it was forked from the target, or from a process
//! forked from it, after PATCH wrote the page (its ancestry, as far as it
//! is still known: a process whose parent exited was given to a reaper),
//! and its copy holds the patch's bytes at one of its sites at least.
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
//! time (each child's); the file walk takes the page-cache folio's lock
//! and the file's i_mmap lock with no mmap lock held.

use core::ops::Range;
use kernel::{
    alloc::AllocError,
    fs::File,
    mm::{Mm, MmWithUser},
    prelude::*,
    sync::aref::ARef,
};

use super::{
    locate::Shared,
    outcome::{Closing, Refused},
    plan::{self, Outcome, Written},
    restore::restore_pages,
};
use crate::{
    journal::{Event, Step},
    patches::{Patches, Site},
    refusal::Refusal,
    sys::{self, Forked, MmapWriteGuard, PidRef, PAGE_MASK, PMD_MASK},
    target::Target,
    uapi::PATCH_INSTALL_PMD,
    Hugepoke,
};

/// Most places one patched page is looked for in.
const MAX_MAPPERS: usize = 4096;

/// Whose forked processes a pass looks for: the target's mm (skipped by
/// the walk; None once the process is gone), its process (whom they
/// descend from), and the file of each page of the plan, in its order.
pub(super) struct Lineage<'a> {
    pub(super) mm: Option<&'a MmWithUser>,
    pub(super) pid: Option<&'a PidRef>,
    pub(super) files: &'a [Option<ARef<File>>],
}

/// The file of each page of `pages` (a plan of `sites`), from the table.
pub(super) fn files_of(
    patches: &Patches<ARef<File>>,
    sites: &[Site],
    pages: &[plan::PageWork],
) -> Result<KVec<Option<ARef<File>>>> {
    let mut files = KVec::with_capacity(pages.len(), GFP_KERNEL)?;
    for w in pages {
        let file = patches.file_of(&sites[w.range.start].page_key()).cloned();
        files.push(file, GFP_KERNEL)?;
    }
    Ok(files)
}

/// Who may run the patched pages: the range of `sites` on each page
/// looked at, and each place (a candidate's mm, the address there, which
/// of `pages`) the family walk named.
struct Candidates {
    /// Per page looked at: its sites, and the PFN of the target's copy.
    pages: KVec<(Range<usize>, Option<usize>)>,
    places: KVVec<(ARef<Mm>, usize, usize)>,
}

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
        if self.closing == Closing::No {
            return Err((Refused::Kept(r), at));
        }
        let why = "a process forked while the patch lived could not give it back; the target is restored all the same (its file closed, or the module unloads)";
        self.hp.journal.record(ev.error(r.errno, why));
        Ok(())
    }
}

/// Every place where a process of the target's fork family maps a
/// patched file page, but the target itself: the file's own mappings,
/// walked once per page-cache folio.
fn candidates(
    hp: &Hugepoke,
    lineage: &Lineage<'_>,
    sites: &[Site],
    pages: &[plan::PageWork],
) -> Result<Candidates, Refusal> {
    let nomem = |_| Refusal::new(ENOMEM, "no memory to list who maps the patched pages");
    let mut found = Candidates {
        pages: KVec::new(),
        places: KVVec::new(),
    };
    let seen = target_view(lineage, sites, pages)?;
    // The last walk: its file, family, the first page past its folio.
    let mut walked: Option<(usize, usize, usize, KVVec<sys::FileVma>)> = None;
    for ((w, file), (alone, target_pfn)) in pages.iter().zip(lineage.files).zip(seen) {
        let rep = &sites[w.range.start];
        let Some(file) = file.as_ref().filter(|_| rep.family != 0 && !alone) else {
            continue;
        };
        // Pages come in file order: this one may be in the folio walked last.
        let seen = |&(m, f, next, _): &(usize, usize, usize, _)| {
            m == rep.mapping && f == rep.family && rep.pgoff < next
        };
        if !walked.as_ref().is_some_and(seen) {
            let skip = lineage.mm.map(|mm| &**mm);
            match sys::family_vmas(file, rep.pgoff, rep.family, skip, MAX_MAPPERS) {
                Ok((vmas, next)) => walked = Some((rep.mapping, rep.family, next, vmas)), // mutant: child-left-patched
                // Truncated: no process maps the page any more.
                Err(e) if e == ENXIO => continue,
                Err(e) => return Err(walk_failed(hp, rep, e)),
            }
        }
        let Some((_, _, _, vmas)) = &walked else {
            continue;
        };
        let k = found.pages.len();
        found
            .pages
            .push((w.range.clone(), target_pfn), GFP_KERNEL)
            .map_err(nomem)?;
        for v in vmas.iter() {
            if let Some(addr) = v.addr_of(rep.pgoff) {
                let place = (v.mm.clone(), addr, k);
                found.places.push(place, GFP_KERNEL).map_err(nomem)?;
            }
        }
    }
    Ok(found)
}

/// For each page of `pages`, as the target (alive) maps it at the site
/// now, with its mmap lock held: is it alone in its fork family there (its
/// text mapping's anon_vma is the family's root, and no fork ever gave it
/// a child: then no walk, which would read the file page in, is needed),
/// and the PFN of its copy (faulted in if swapped out, unless userfaultfd
/// watches it), which a process that shares it runs.
fn target_view(
    lineage: &Lineage<'_>,
    sites: &[Site],
    pages: &[plan::PageWork],
) -> Result<KVec<(bool, Option<usize>)>, Refusal> {
    let nomem = |_| Refusal::new(ENOMEM, "no memory to list who maps the patched pages");
    let mut seen = KVec::with_capacity(pages.len(), GFP_KERNEL).map_err(nomem)?;
    let Some(mm) = lineage.mm else {
        seen.extend_with(pages.len(), (false, None), GFP_KERNEL)
            .map_err(nomem)?;
        return Ok(seen);
    };
    let waiting = |e| Refusal::new(e, "fatal signal while waiting for the target's mmap lock");
    let guard = MmapWriteGuard::lock_killable(mm).map_err(waiting)?;
    for w in pages {
        let rep = &sites[w.range.start];
        let vma = guard.vma_lookup(rep.addr).filter(|v| {
            sys::vma_info(v).address_of(rep.mapping, rep.pgoff) == Some(rep.addr & PAGE_MASK)
        });
        let others = vma.is_none_or(|v| sys::family_may_have_others(v, rep.family));
        let copy = vma.and_then(|v| {
            let info = sys::vma_info(v);
            let page = match sys::anon_copy_at(v, rep.addr & PAGE_MASK) {
                Some(page) => Some(page),
                None if info.uffd_armed || !info.has_anon_vma => None,
                None => guard
                    .get_user_page(rep.addr & PAGE_MASK, sys::FOLL_FORCE)
                    .ok(),
            };
            page.filter(|p| p.is_anon()).map(|p| p.pfn())
        });
        seen.push((!others, copy), GFP_KERNEL).map_err(nomem)?;
    }
    Ok(seen)
}

/// Why the walk of who maps `rep`'s file page failed (`e`), journaled.
fn walk_failed(hp: &Hugepoke, rep: &Site, e: Error) -> Refusal {
    let why = if e == E2BIG {
        "more than 4096 mappings of the patched file page may be forked from the target: nothing restored"
    } else if e == EINTR {
        "fatal signal while walking who maps the patched file page"
    } else {
        "the walk of who maps the patched file page failed"
    };
    hp.journal.record(rep.event(Step::Restore).error(e, why));
    Refusal::new(e, why)
}

/// Does `child` run the patch at one of the places the walk named for it
/// (from the `first`)?  It was forked from the target since PATCH (see
/// [`how_forked`]: one that was not is not even locked); there it maps
/// the same file page, in a VMA of the target's fork family; and its copy
/// (faulted in if swapped out, unless userfaultfd watches it) holds the
/// patch's bytes at one site of that page at least (a process that started
/// just after PATCH but was forked before it has none) — and is the very
/// page PATCH wrote, when its ancestry no longer tells.
fn runs_the_patch(
    child: &MmWithUser,
    found: &Candidates,
    first: usize,
    sites: &[Site],
    lineage: &Lineage<'_>,
) -> Result<Runs, Refusal> {
    let me = &found.places[first].0;
    let mine = || {
        found.places[first..]
            .iter()
            .filter(move |(m, _, _)| core::ptr::eq(&**m, &**me))
    };
    let how = |k: usize| how_forked(child, &sites[found.pages[k].0.start], lineage);
    if mine().all(|(_, _, k)| how(*k).is_none()) {
        return Ok(Runs::No);
    }
    let waiting = |e| {
        Refusal::new(
            e,
            "fatal signal while waiting for a forked process's mmap lock",
        )
    };
    let guard = MmapWriteGuard::lock_killable(child).map_err(waiting)?;
    let mut verdict = Runs::No;
    for (_, addr, k) in mine() {
        let Some(same_page_only) = how(*k) else {
            continue;
        };
        let (range, target_pfn) = &found.pages[*k];
        let on_page = &sites[range.clone()];
        let same_page = same_page_only.then_some((on_page[0].pfn, *target_pfn));
        match copy_runs_the_patch(&guard, *addr, on_page, same_page) {
            Runs::Yes => return Ok(Runs::Yes),
            Runs::Unsure(why) => verdict = Runs::Unsure(why),
            Runs::No => {}
        }
    }
    Ok(verdict)
}

/// Whether a process runs a patch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Runs {
    Yes,
    No,
    /// It may, and cannot be told (why): the RESTORE is refused.
    Unsure(&'static str),
}

/// Does the copy mapped at `addr` (with `guard` held) run the patch of
/// `on_page` (one file page's sites): a VMA of the family maps that file
/// page there, and its copy (faulted in if swapped out, unless userfaultfd
/// watches it) holds the patch's bytes at one site at least — and, when
/// `same_page` names them, is the very page PATCH wrote or the target's
/// copy now (PFNs)?  A copy that cannot be looked at, or one with the
/// bytes on another page then, is [`Runs::Unsure`].
fn copy_runs_the_patch(
    guard: &MmapWriteGuard<'_>,
    addr: usize,
    on_page: &[Site],
    same_page: Option<(usize, Option<usize>)>,
) -> Runs {
    let rep = &on_page[0];
    let Some(vma) = guard.vma_lookup(addr) else {
        return Runs::No;
    };
    let info = sys::vma_info(vma);
    if info.address_of(rep.mapping, rep.pgoff) != Some(addr) || sys::vma_family(vma) != rep.family {
        return Runs::No;
    }
    let page = match sys::anon_copy_at(vma, addr) {
        Some(page) => page,
        None if !info.has_anon_vma => return Runs::No,
        None if info.uffd_armed => return Runs::Unsure(UFFD_UNSEEN),
        None => match guard.get_user_page(addr, sys::FOLL_FORCE) {
            Ok(page) => page,
            Err(_) => return Runs::Unsure(NOT_FAULTED),
        },
    };
    let holds_the_bytes = |page: &sys::PageRef| {
        on_page.iter().any(|s| {
            let mut now = [0u8; crate::uapi::MAX_BYTES];
            page.read(s.offset(), &mut now[..s.len]);
            now[..s.len] == s.bytes[..s.len] // mutant: forked-foreign-bytes-taken diverged-child-left-patched
        })
    };
    if !page.is_anon() || !holds_the_bytes(&page) {
        return Runs::No;
    }
    match same_page {
        Some((patched, target)) if page.pfn() != patched && Some(page.pfn()) != target => {
            Runs::Unsure(LINEAGE_LOST)
        }
        _ => Runs::Yes,
    }
}

const UFFD_UNSEEN: &str = "a process forked since the patch may run it: its copy is not present and userfaultfd watches its text, so it is not faulted in to be looked at; patch kept";
const NOT_FAULTED: &str = "a process forked since the patch may run it: its copy could not be faulted in to be looked at; patch kept";
const LINEAGE_LOST: &str = "a process forked since the patch may run it: its copy holds the patch's bytes but is neither the page PATCH wrote nor the target's, and its parent exited (or the target is gone), so whose it is cannot be told; patch kept (RESTORE_DROP forgets it)";

/// How `child` came from the target of `rep`'s patch: None if it was not
/// forked from it since the patch; else whether only the very page PATCH
/// wrote says its copy is the patch's — when its ancestry no longer
/// reaches the target (a parent exited: it was given to a reaper), or the
/// target is gone (a process of the image it exec'd may be of a new fork
/// family that reuses the old one's identity).
fn how_forked(child: &Mm, rep: &Site, lineage: &Lineage<'_>) -> Option<bool> {
    match sys::forked_since(child, rep.since, lineage.pid) {
        Forked::No => None,
        Forked::FromTarget if lineage.mm.is_some() => Some(false),
        _ => Some(true), // mutant: adopted-any-copy
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

// SPDX-License-Identifier: GPL-2.0

//! Who runs a patch besides its target: the processes forked from it
//! since PATCH, found through the patched file page's own mappings (the
//! walk of its page-cache folio, as uprobes' `build_map_info()` finds its
//! mms) in the target's fork family, and each asked, under its own mmap
//! lock, whether it runs the patch (its ancestry since the stamp, its
//! copy's bytes, and the page itself when the ancestry is lost).  What
//! RESTORE then does in them is `forked`'s.
//!
//! Locks: the target's mmap lock alone (to see its copies), then the file
//! walk (the page-cache folio's lock and i_mmap, no mmap lock held), then
//! one process's mmap lock at a time.

use core::ops::Range;
use kernel::{
    fs::File,
    mm::{Mm, MmWithUser},
    prelude::*,
    sync::aref::ARef,
};

use super::plan;
use crate::{
    journal::Step,
    patches::{Patches, Site},
    refusal::Refusal,
    sys::{self, Forked, MmapWriteGuard, PageRef, PidRef, VmaInfo, PAGE_MASK},
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
    /// The target's parent (a CLONE_PARENT child's parent too).
    pub(super) parent: Option<&'a PidRef>,
    pub(super) files: &'a [Option<ARef<File>>],
}

/// The file of each page of `pages` (a plan of `sites`), from the table.
pub(super) fn files_of(
    patches: &Patches<ARef<File>>,
    sites: &[Site],
    pages: &[plan::PageWork],
) -> Result<KVVec<Option<ARef<File>>>> {
    let mut files = KVVec::with_capacity(pages.len(), GFP_KERNEL)?;
    for w in pages {
        let file = patches.file_of(&sites[w.range.start].page_key()).cloned();
        files.push(file, GFP_KERNEL)?;
    }
    Ok(files)
}

/// Who may run the patched pages: the range of `sites` on each page
/// looked at, and each place (a candidate's mm, the address there, which
/// of `pages`) the family walk named.
pub(super) struct Candidates {
    /// Per page looked at: its sites, and the PFN of the target's copy.
    pub(super) pages: KVVec<(Range<usize>, Option<usize>)>,
    pub(super) places: KVVec<(ARef<Mm>, usize, usize)>,
}

/// Every place where a process of the target's fork family maps a
/// patched file page, but the target itself: the file's own mappings,
/// walked once per page-cache folio.
pub(super) fn candidates(
    hp: &Hugepoke,
    lineage: &Lineage<'_>,
    sites: &[Site],
    pages: &[plan::PageWork],
) -> Result<Candidates, Refusal> {
    let nomem = |_| Refusal::new(ENOMEM, "no memory to list who maps the patched pages");
    let mut found = Candidates {
        pages: KVVec::new(),
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
) -> Result<KVVec<(bool, Option<usize>)>, Refusal> {
    let nomem = |_| Refusal::new(ENOMEM, "no memory to list who maps the patched pages");
    let mut seen = KVVec::with_capacity(pages.len(), GFP_KERNEL).map_err(nomem)?;
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
        // Alone: no walk, so no need of the copy (nor to fault it in).
        // Restored already: the target's copy is no longer the patch's.
        let copy = vma
            .filter(|_| others && rep.restored_at == 0)
            .and_then(|v| {
                let page = copy_at(&guard, v, &sys::vma_info(v), rep.addr & PAGE_MASK);
                page.ok()
                    .flatten()
                    .filter(PageRef::is_anon)
                    .map(|p| p.pfn())
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
pub(super) fn runs_the_patch(
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
        let Some(proof) = how(*k) else {
            continue;
        };
        let (range, target_pfn) = &found.pages[*k];
        let on_page = &sites[range.clone()];
        let pages = (on_page[0].pfn, *target_pfn);
        match copy_runs_the_patch(&guard, *addr, on_page, proof, pages) {
            Runs::Yes => return Ok(Runs::Yes),
            Runs::Unsure(why) => verdict = Runs::Unsure(why),
            Runs::No => {}
        }
    }
    Ok(verdict)
}

/// Whether a process runs a patch.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Runs {
    Yes,
    No,
    /// It may, and cannot be told (why): the RESTORE is refused.
    Unsure(&'static str),
}

/// Does the copy mapped at `addr` (with `guard` held) run the patch of
/// `on_page` (one file page's sites): a VMA of the family maps that file
/// page there, and its copy (faulted in if swapped out, unless userfaultfd
/// watches it) holds the patch's bytes at one site at least — and, unless
/// the `proof` is the bytes alone, is the very page PATCH wrote or the
/// target's copy now (`pages`, PFNs)?  A copy that cannot be looked at, or
/// one with the bytes on another page then, is [`Runs::Unsure`] (or not
/// the patch's, for [`Proof::PageElseNot`]).
fn copy_runs_the_patch(
    guard: &MmapWriteGuard<'_>,
    addr: usize,
    on_page: &[Site],
    proof: Proof,
    (patched, target): (usize, Option<usize>),
) -> Runs {
    let rep = &on_page[0];
    let Some(vma) = guard.vma_lookup(addr) else {
        return Runs::No;
    };
    let info = sys::vma_info(vma);
    if info.address_of(rep.mapping, rep.pgoff) != Some(addr) || sys::vma_family(vma) != rep.family {
        return Runs::No;
    }
    let page = match copy_at(guard, vma, &info, addr) {
        Ok(Some(page)) => page,
        Ok(None) => return Runs::No,
        Err(why) => return Runs::Unsure(why),
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
    let same_page = page.pfn() == patched || Some(page.pfn()) == target;
    match proof {
        Proof::Page if !same_page => Runs::Unsure(LINEAGE_LOST),
        Proof::PageElseNot if !same_page => Runs::No,
        _ => Runs::Yes,
    }
}

/// The copy `vma` (`info`) maps at `addr`, with `guard` held: the page
/// mapped there, or, for a swap entry, faulted in for reading — unless
/// userfaultfd watches the mapping, or the fault fails: then why it cannot
/// be looked at.  None where no copy can be (no anon_vma, or none there).
fn copy_at(
    guard: &MmapWriteGuard<'_>,
    vma: &kernel::mm::virt::VmaRef,
    info: &VmaInfo,
    addr: usize,
) -> Result<Option<PageRef>, &'static str> {
    match sys::anon_copy_at(vma, addr) {
        Some(page) => Ok(Some(page)),
        None if !info.has_anon_vma => Ok(None),
        None if info.uffd_armed => Err(UFFD_UNSEEN),
        None => guard
            .get_user_page(addr, sys::FOLL_FORCE)
            .map(Some)
            .map_err(|_| NOT_FAULTED),
    }
}

const UFFD_UNSEEN: &str = "a process forked since the patch may run it: its copy is not present and userfaultfd watches its text, so it is not faulted in to be looked at; patch kept";
const NOT_FAULTED: &str = "a process forked since the patch may run it: its copy could not be faulted in to be looked at; patch kept";
const LINEAGE_LOST: &str = "a process forked since the patch may run it: its copy holds the patch's bytes but is neither the page PATCH wrote nor the target's, and its parent exited (or is not its forker, or the target is gone), so whose it is cannot be told; patch kept (RESTORE_DROP forgets it)";

/// How `child` came from the target of `rep`'s patch: None if it was not
/// forked from it since the patch; else whether only the very page PATCH
/// wrote says its copy is the patch's — when its ancestry no longer
/// reaches the target (a parent exited: it was given to a reaper; a
/// CLONE_PARENT child has the target's parent for its own), or the
/// target is gone (a process of the image it exec'd may be of a new fork
/// family that reuses the old one's identity).
fn how_forked(child: &Mm, rep: &Site, lineage: &Lineage<'_>) -> Option<Proof> {
    let until = if rep.restored_at != 0 {
        rep.restored_at
    } else {
        u64::MAX
    };
    let target = (lineage.pid, lineage.mm.map(|m| &**m));
    match sys::forked_since(child, (rep.since, until), target, lineage.parent) {
        Forked::No => None,
        Forked::FromTarget if lineage.mm.is_some() => Some(Proof::Bytes),
        Forked::ParentsChild => Some(Proof::PageElseNot), // mutant: sibling-taken-for-child
        _ => Some(Proof::Page),                           // mutant: adopted-any-copy
    }
}

/// What says that a process forked since PATCH runs the patch, besides
/// the patch's bytes in its copy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proof {
    /// Nothing more: it descends from the target since PATCH.
    Bytes,
    /// Its copy is the page PATCH wrote or the target's copy; a copy of its
    /// own with the bytes cannot be told ([`Runs::Unsure`]).
    Page,
    /// As `Page`, but a copy of its own is its parent's line, not ours:
    /// the target's sibling, or a CLONE_PARENT child whose copy went its
    /// own way.
    PageElseNot,
}

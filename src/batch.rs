// SPDX-License-Identifier: GPL-2.0

//! PATCH_BATCH and the RESTORE of a batch: up to `MAX_BATCH` sites in one
//! target under one handle, all written or none.
//!
//! Everything happens with the target's state locked and its mmap lock
//! held for writing for the whole call (see `table` for the lock order), so
//! no `/proc/PID/mem` or ptrace write, no mprotect, mremap or munmap can
//! come between checking one site and writing another.  Work goes a page
//! at a time in address order: one GUP with `FOLL_SPLIT_PMD` per page (a
//! 2 MiB range is split by its first page, its later pages are PTE-mapped
//! already), one COW per page, and all the sites of a page checked and
//! written under one hold of its page-table lock, with the PTE cleared.
//!
//! A RESTORE of a batch (and the undo of a PATCH_BATCH that failed part
//! way) runs in three passes over the pages: find every copy and check
//! every site's bytes; write every page's originals back (a page that
//! fails then has the pages before it re-patched: nothing is half done);
//! and only then zap the copies that equal their page-cache page, which
//! cannot be undone.  The one LRU drain it may need is taken with the mmap
//! lock held: the drain's per-CPU work takes no mm lock (khugepaged's
//! `madvise_collapse()` drains under the mmap lock as well).

use kernel::{
    alloc::KVVec,
    fs::File,
    mm::MmWithUser,
    prelude::*,
    rbtree::RBTree,
    sync::{aref::ARef, Arc},
};

use crate::{
    collapse,
    journal::{Event, Step},
    patch::{self, Closing, Refused, Restored, WriteError, MAX_TRIES},
    pause::Point,
    sys::{self, MmapWriteGuard, PageRef, PAGE_MASK, PMD_MASK},
    table::{Owner, PageKey, Site, Target, TargetState},
    uapi::{self, BatchSite, PatchBatchArgs, MAX_BATCH, MAX_BYTES},
    Hugepoke,
};

/// A refused or failed batch: the errno and the site to blame (its index
/// in the caller's array), if one is.
pub(crate) struct Failure {
    pub(crate) error: Error,
    pub(crate) site: Option<u32>,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Self { error, site: None }
    }
}

/// Validate the batch header before the sites are read.
pub(crate) fn check_batch_args(args: &PatchBatchArgs) -> Result<(), (Error, &'static str)> {
    uapi::check_header(args.size, args.flags, core::mem::size_of::<PatchBatchArgs>(), uapi::BATCH_FLAGS)
        .map_err(|why| (EINVAL, why))?;
    if args.count == 0 || args.count as usize > MAX_BATCH {
        return Err((EINVAL, "a batch holds 1 to 4096 sites"));
    }
    Ok(())
}

/// One site on its way in: the table record it becomes, its expected
/// bytes, and the file it will hold.
struct Planned {
    site: Site,
    expect: Option<[u8; MAX_BYTES]>,
    file: ARef<File>,
}

/// Consecutive runs of `sites` on one page, as index ranges.
fn pages_of<'a, T, K: PartialEq>(sites: &'a [T], page: impl Fn(&T) -> K + 'a) -> impl Iterator<Item = core::ops::Range<usize>> + 'a {
    let mut start = 0;
    core::iter::from_fn(move || {
        let first = sites.get(start)?;
        let p = page(first);
        let len = sites[start..].iter().take_while(|s| page(s) == p).count();
        let range = start..start + len;
        start += len;
        Some(range)
    })
}

/// PATCH_BATCH: write every site of `sites` into the target, or none.
pub(crate) fn patch_batch(hp: &Arc<Hugepoke>, owner: u64, args: &PatchBatchArgs, sites: &[BatchSite]) -> Result<u64, Failure> {
    let ev = |step| Event::new(step).pid(args.pid);
    hp.journal.record(ev(Step::Patch).note("batch"));
    let blame = |i: usize, e: Error, why: &'static str| Failure {
        error: hp.journal.fail(ev(Step::Patch).addr(sites[i].addr as usize), e, why),
        site: Some(i as u32),
    };
    for (i, s) in sites.iter().enumerate() {
        if s.flags & !uapi::SITE_FLAGS != 0 {
            return Err(blame(i, EINVAL, "unknown site flag bits"));
        }
        patch::check_range(s.addr, s.len).map_err(|(e, why)| blame(i, e, why))?;
    }
    // In address order; sites of one batch may not overlap.
    let nomem = || Failure::from(hp.journal.fail(ev(Step::Patch), ENOMEM, "no memory to sort a batch"));
    let mut order: KVVec<u32> = KVVec::with_capacity(sites.len(), GFP_KERNEL).map_err(|_| nomem())?;
    for i in 0..sites.len() as u32 {
        order.push(i, GFP_KERNEL).map_err(|_| nomem())?;
    }
    order.sort_unstable_by_key(|&i| sites[i as usize].addr);
    for w in order.windows(2) {
        let (a, b) = (&sites[w[0] as usize], &sites[w[1] as usize]);
        if a.addr + a.len as u64 > b.addr {
            return Err(blame(w[0].max(w[1]) as usize, EINVAL, "site overlaps another site of this batch"));
        }
    }

    let (mm, pid) = patch::resolve_target(hp, args.pid, |step| ev(step))?;
    let owner: Owner = if args.flags & uapi::PATCH_PERSIST != 0 { None } else { Some(owner) };
    let mut failure = None;
    let handle = patch::with_new_handle(hp, &mm, owner, ev(Step::Patch), |target, state, handle| {
        batch_locked(hp, target, state, &mm, pid, owner, args.flags, sites, &order, handle, &mut failure).map_err(|f| {
            let e = f.error;
            failure = Some(f);
            e
        })
    });
    match (handle, failure) {
        (Ok(handle), None) => Ok(handle),
        // Failed, and what it wrote could not be undone: kept (see `undo`).
        (Ok(_), Some(f)) => Err(f),
        (Err(e), f) => Err(f.unwrap_or(Failure { error: e, site: None })),
    }
}

/// PATCH_BATCH with the target's state locked.
#[allow(clippy::too_many_arguments)]
fn batch_locked(
    hp: &Arc<Hugepoke>,
    target: &Arc<Target>,
    state: &mut TargetState,
    mm: &MmWithUser,
    pid: i32,
    owner: Owner,
    flags: u32,
    sites: &[BatchSite],
    order: &[u32],
    handle: u64,
    kept: &mut Option<Failure>,
) -> Result<(), Failure> {
    let ev = |step| Event::new(step).pid(pid);
    let nomem = || Failure::from(hp.journal.fail(ev(Step::Patch), ENOMEM, "no memory to record a batch"));
    let room = state.patches.reserve(sites.len()).map_err(|_| nomem())?;
    let mut planned: KVVec<Planned> = KVVec::with_capacity(sites.len(), GFP_KERNEL).map_err(|_| nomem())?;

    let guard = MmapWriteGuard::lock_killable(mm)
        .map_err(|e| hp.journal.fail(ev(Step::CheckVma), e, "fatal signal while waiting for the target's mmap lock"))?;
    // Check every site before anything is written.
    for &i in order {
        let s = &sites[i as usize];
        let addr = s.addr as usize;
        let blame = |e: Error, why: &'static str| Failure {
            error: hp.journal.fail(ev(Step::CheckVma).addr(addr), e, why),
            site: Some(i),
        };
        let vma = guard.vma_lookup(addr).ok_or_else(|| blame(EFAULT, "address is not mapped"))?;
        let info = sys::vma_info(vma);
        patch::check_vma(&info).map_err(|(e, why)| blame(e, why))?;
        let pgoff = info.pgoff_of(addr & PAGE_MASK);
        let (offset, len) = (addr & !PAGE_MASK, s.len as usize);
        if state.patches.overlaps(info.mapping, pgoff, offset, len) {
            return Err(blame(EBUSY, "range overlaps a live patch"));
        }
        let file = sys::vma_file(vma).ok_or_else(|| blame(EINVAL, "not a file-backed mapping"))?;
        let site = Site {
            handle,
            index: i,
            owner,
            pid,
            addr,
            len,
            flags: flags | s.flags,
            mapping: info.mapping,
            pgoff,
            bytes: s.bytes,
            orig: [0; MAX_BYTES],
            pfn: 0,
            pmd_mappable: false,
        };
        let expect = (s.flags & uapi::PATCH_EXPECT != 0).then_some(s.expect);
        planned.push(Planned { site, expect, file }, GFP_KERNEL).map_err(|_| nomem())?;
    }
    // One file page mapped at two addresses would be two copies: the
    // table knows a patch by its file page, so that is refused.
    {
        let mut at: RBTree<PageKey, usize> = RBTree::new();
        for p in planned.iter() {
            let page_addr = p.site.addr & PAGE_MASK;
            match at.get(&p.site.page_key()) {
                Some(&a) if a != page_addr => {
                    return Err(Failure {
                        error: hp.journal.fail(ev(Step::CheckVma).addr(p.site.addr), EINVAL, "two sites on one file page mapped at two addresses"),
                        site: Some(p.site.index),
                    });
                }
                Some(_) => {}
                None => {
                    at.try_create_and_insert(p.site.page_key(), page_addr, GFP_KERNEL).map_err(|_| nomem())?;
                }
            }
        }
    }
    // The cheap look at the expected bytes, one plain GUP a page: a
    // mismatch here changes nothing.  The check that counts is repeated
    // under the page-table lock, in the step that writes.
    for r in pages_of(&planned, |p| p.site.addr & PAGE_MASK) {
        if planned[r.clone()].iter().all(|p| p.expect.is_none()) {
            continue;
        }
        let page_addr = planned[r.start].site.addr & PAGE_MASK;
        let page = guard.get_user_page(page_addr, sys::FOLL_FORCE).map_err(|e| Failure {
            error: hp.journal.fail(ev(Step::CheckExpected).addr(page_addr), e, "cannot read the target page"),
            site: Some(planned[r.start].site.index),
        })?;
        for p in planned[r].iter() {
            let mut now = [0u8; MAX_BYTES];
            page.read(p.site.offset(), &mut now[..p.site.len]);
            if p.expect.is_some_and(|e| e[..p.site.len] != now[..p.site.len]) {
                return Err(Failure {
                    error: hp.journal.fail(ev(Step::CheckExpected).addr(p.site.addr), sys::eilseq(), "bytes at the address are not the expected ones"),
                    site: Some(p.site.index),
                });
            }
        }
    }
    hp.journal.record(ev(Step::CheckVma).handle(handle as u32).note("every site of the batch checked"));
    hp.pauses.at(Point::Checked, pid, &hp.journal);

    // Write, a page at a time.
    let mut written = 0;
    let mut failed: Option<Failure> = None;
    let ranges = {
        let mut v: KVVec<core::ops::Range<usize>> = KVVec::new();
        for r in pages_of(&planned, |p| p.site.addr & PAGE_MASK) {
            v.push(r, GFP_KERNEL).map_err(|_| nomem())?;
        }
        v
    };
    for r in ranges.iter() {
        let page_addr = planned[r.start].site.addr & PAGE_MASK;
        let Some(vma) = guard.vma_lookup(page_addr) else {
            failed = Some(Failure { error: EFAULT, site: Some(planned[r.start].site.index) });
            break;
        };
        let before = sys::mapping_of(vma, page_addr);
        let mut sites: KVVec<Site> = KVVec::with_capacity(r.len(), GFP_KERNEL).map_err(|_| nomem())?;
        let mut expects: KVVec<Option<[u8; MAX_BYTES]>> = KVVec::with_capacity(r.len(), GFP_KERNEL).map_err(|_| nomem())?;
        for p in planned[r.clone()].iter() {
            sites.push(p.site, GFP_KERNEL).map_err(|_| nomem())?;
            expects.push(p.expect, GFP_KERNEL).map_err(|_| nomem())?;
        }
        let result = patch::write_bytes(hp, &guard, vma, &mut sites, &expects, before);
        // `orig` and `pfn` are filled whether or not the write happened.
        for (p, s) in planned[r.clone()].iter_mut().zip(sites.iter()) {
            p.site.orig = s.orig;
            p.site.pfn = s.pfn;
        }
        match result {
            Ok(()) => {
                let pmd_mappable = sys::page_cache_page(vma, page_addr).is_some_and(|c| c.pmd_mappable());
                for p in planned[r.clone()].iter_mut() {
                    p.site.pmd_mappable = pmd_mappable;
                }
                written = r.end;
            }
            Err(WriteError::Failed(e)) => {
                failed = Some(Failure { error: e, site: Some(planned[r.start].site.index) });
                break;
            }
            Err(WriteError::NotExpected(k)) => {
                let site = &planned[r.start + k].site;
                let e = hp.journal.fail(
                    ev(Step::CheckExpected).addr(site.addr),
                    sys::eilseq(),
                    "bytes at the address are not the expected ones (under the page-table lock)",
                );
                failed = Some(Failure { error: e, site: Some(site.index) });
                // COWed but not written: given back with the others, as
                // a restore of "patched" bytes that are the ones there.
                for p in planned[r.clone()].iter_mut() {
                    p.site.bytes = p.site.orig;
                }
                written = r.end;
                break;
            }
        }
    }

    if let Some(failure) = failed {
        if undo(hp, target, state, &guard, mm, &planned[..written], handle) {
            return Err(failure);
        }
        // Pages that could not be given back stay patched, and stay known:
        // under this handle, as persistent (RESTORE or unload may undo them).
        drop(guard);
        planned.truncate(written);
        for p in planned.iter_mut() {
            p.site.owner = None;
        }
        state.patches.insert(room, planned.into_iter().map(|p| (p.site, p.file)));
        let left = hp.registry.lock().disown(handle);
        drop(left);
        hp.journal.record(ev(Step::Patch).handle(handle as u32).error(failure.error, "batch failed and could not be undone: its written sites kept under this handle, persistent"));
        *kept = Some(failure);
        return Ok(());
    }
    drop(guard);
    let count = planned.len();
    let first_addr = planned.first().map_or(0, |p| p.site.addr);
    state.patches.insert(room, planned.into_iter().map(|p| (p.site, p.file)));
    hp.journal.record(
        ev(Step::Patched).addr(first_addr).handle(handle as u32).note(if count == 1 {
            "batch of 1 site written"
        } else {
            "batch: every site written"
        }),
    );
    Ok(())
}

/// Give back the pages a failed PATCH_BATCH wrote (`planned`, in address
/// order), with the mmap lock still held: restore the originals, zap the
/// copies, queue the collapses.  Nothing of the batch is in the table.
/// False if they could not be given back (nothing of them was then).
fn undo(
    hp: &Arc<Hugepoke>,
    target: &Arc<Target>,
    state: &mut TargetState,
    guard: &MmapWriteGuard<'_>,
    mm: &MmWithUser,
    planned: &[Planned],
    handle: u64,
) -> bool {
    if planned.is_empty() {
        return true;
    }
    let pid = planned[0].site.pid;
    let ev = Event::new(Step::Restore).pid(pid).addr(planned[0].site.addr).handle(handle as u32);
    hp.journal.record(ev.note("undoing the batch's pages written so far"));
    let mut sites: KVVec<Site> = KVVec::new();
    for p in planned.iter() {
        if sites.push(p.site, GFP_KERNEL).is_err() {
            hp.journal.record(ev.error(ENOMEM, "no memory to undo the batch: its written pages stay patched"));
            return false;
        }
    }
    let last_on_page = |s: &[Site]| state.patches.on_page(s[0].page_key()) == 0;
    match restore_pages(hp, guard, mm, &sites, last_on_page) {
        Ok(pages) => {
            queue_collapses(hp, target, state, &sites, &pages);
            hp.journal.record(ev.note("batch undone: every page written so far restored"));
            true
        }
        Err((Refused::Kept(e, why), _)) => {
            // Only a writer holding a pin taken before the batch can get
            // here; the pages stay as they are, and the journal says so.
            hp.journal.record(ev.error(e, why));
            false
        }
        // Unreachable: `restore_pages` reports a gone page per page.
        Err((Refused::Gone { why, .. }, _)) => {
            hp.journal.record(ev.note(why));
            true
        }
    }
}

/// What the restore passes found for one page.
enum PageState {
    /// The page's copy, where it is mapped now, and the reference on it.
    Found(usize, PageRef),
    /// Nothing to restore: the patch went (how, and what RESTORE returns).
    Gone(Result, &'static str),
}

/// Restore the pages of `sites` (grouped by page, one file page per
/// group): every copy found and every site's patched bytes checked before
/// anything is written; every page's originals written; then the copies
/// that equal their page-cache page zapped.  `last_on_page(group)` says
/// whether no other patch stays on a group's page.  On refusal nothing is
/// written (`usize`: the position in `sites` to blame).
fn restore_pages(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    mm: &MmWithUser,
    sites: &[Site],
    last_on_page: impl Fn(&[Site]) -> bool,
) -> Result<KVVec<(usize, Option<Restored>, Option<(Result, &'static str)>)>, (Refused, usize)> {
    let ev = |s: &Site, step| Event::new(step).pid(s.pid).addr(s.addr).handle(s.handle as u32);
    let nomem = |at| (Refused::Kept(ENOMEM, "no memory to restore the batch"), at);
    let mut groups: KVVec<(core::ops::Range<usize>, PageState)> = KVVec::new();
    let mut need_drain = false;

    // Pass 1: find every copy and check every site's bytes.
    for r in pages_of(sites, |s| s.page_key()) {
        let rep = &sites[r.start];
        let mut found = None;
        for _ in 0..MAX_TRIES {
            let (vma, page_addr, page) = match patch::find_anon_copy(guard, rep) {
                Ok(f) => f,
                Err(Refused::Gone { result, why }) => {
                    found = Some(PageState::Gone(result, why));
                    break;
                }
                Err(kept) => return Err((kept, r.start)),
            };
            let Some(pte) = sys::lock_pte(vma, page_addr, &page) else { continue };
            if !pte.writable() && (pte.uffd_wp() || !pte.anon_exclusive()) {
                // As a single RESTORE: a uffd-wp PTE or a copy shared with a
                // forked child is a fault to take with FOLL_WRITE.
                drop(pte);
                hp.journal.record(ev(rep, Step::RestoreBytes).page(page.pfn(), 0).error(EAGAIN, "PTE is write-protected or shared; faulting it with FOLL_WRITE"));
                match guard.get_user_page(page_addr, sys::FOLL_FORCE | sys::FOLL_WRITE | sys::FOLL_SPLIT_PMD) {
                    Ok(_) => continue,
                    Err(e) => return Err((Refused::Kept(e, "cannot fault the page in for writing"), r.start)),
                }
            }
            drop(pte);
            for (k, s) in sites[r.clone()].iter().enumerate() {
                let mut now = [0u8; MAX_BYTES];
                page.read(s.offset(), &mut now[..s.len]);
                if now[..s.len] != s.bytes[..s.len] {
                    hp.journal.record(ev(s, Step::RestoreBytes).page(page.pfn(), 0).error(sys::eilseq(), "this site's bytes are not the ones PATCH wrote"));
                    return Err((
                        Refused::Kept(sys::eilseq(), "bytes at a site of the batch are not the ones PATCH wrote; nothing written"),
                        r.start + k,
                    ));
                }
            }
            need_drain |= last_on_page(&sites[r.clone()]) && page.unexpected_refs() > 0 && page.may_be_lru_cached();
            found = Some(PageState::Found(page_addr, page));
            break;
        }
        let Some(found) = found else {
            return Err((Refused::Kept(EAGAIN, "page table kept changing"), r.start));
        };
        groups.push((r, found), GFP_KERNEL).map_err(|_| nomem(0))?;
    }
    if need_drain {
        // Maybe only LRU batches' references (a fresh COW leaves one).
        let ev = Event::new(Step::LruDrain).pid(sites[0].pid).handle(sites[0].handle as u32);
        hp.journal.record(ev.note("draining all CPUs' LRU batches"));
        sys::lru_add_drain_all();
        hp.journal.record(ev.note("drained"));
    }

    // Pass 2: write every page's originals back; if a page cannot be
    // written, the pages before it get the patched bytes again.
    for g in 0..groups.len() {
        let (r, PageState::Found(page_addr, page)) = &mut groups[g] else { continue };
        let (r, page_addr) = (r.clone(), *page_addr);
        if let Err(refused) = write_page(hp, guard, &sites[r.clone()], page_addr, page, false) {
            for (r, state) in groups[..g].iter_mut() {
                if let PageState::Found(page_addr, page) = state {
                    let _ = write_page(hp, guard, &sites[r.clone()], *page_addr, page, true);
                }
            }
            return Err((refused, r.start));
        }
    }

    // Pass 3: zap the copies that now equal their page-cache page.
    let mut out = KVVec::with_capacity(groups.len(), GFP_KERNEL).map_err(|_| nomem(0))?;
    for (r, state) in groups.iter_mut() {
        let rep = &sites[r.start];
        match state {
            PageState::Gone(result, why) => {
                let _ = out.push((r.start, None, Some((*result, *why))), GFP_KERNEL);
            }
            PageState::Found(page_addr, page) => {
                let restored = zap_page(hp, guard, mm, rep, *page_addr, page, last_on_page(&sites[r.clone()]));
                let _ = out.push((r.start, Some(restored), None), GFP_KERNEL);
            }
        }
    }
    Ok(out)
}

/// Lock the PTE that maps `page` at `page_addr`, taking the page again
/// (one read fault, e.g. back from the swap cache) if reclaim or
/// migration moved it since we looked.
fn lock_page<'a>(guard: &'a MmapWriteGuard<'_>, rep: &Site, page_addr: usize, page: &mut PageRef) -> Option<sys::LockedPte<'a>> {
    for _ in 0..MAX_TRIES {
        let vma = patch::still_mapped_at(guard, rep, page_addr)?;
        if let Some(pte) = sys::lock_pte(vma, page_addr, page) {
            return Some(pte);
        }
        match guard.get_user_page(page_addr, sys::FOLL_FORCE) {
            Ok(p) if p.is_anon() => *page = p,
            _ => return None,
        }
    }
    None
}

/// Pass 2 for one page: under its PT lock with the PTE cleared, check the
/// bytes of every site are the ones expected there and write the others
/// (`repatch`: the patched bytes over the originals, to undo).
fn write_page(hp: &Hugepoke, guard: &MmapWriteGuard<'_>, sites: &[Site], page_addr: usize, page: &mut PageRef, repatch: bool) -> Result<(), Refused> {
    let rep = &sites[0];
    let ev = |step| Event::new(step).pid(rep.pid).addr(page_addr + rep.offset()).handle(rep.handle as u32);
    let mut pte = lock_page(guard, rep, page_addr, page).ok_or(Refused::Kept(EAGAIN, "page table kept changing"))?;
    pte.unmap();
    for s in sites {
        let (there, _) = pick(s, repatch);
        let mut now = [0u8; MAX_BYTES];
        pte.read(s.offset(), &mut now[..s.len]);
        if now[..s.len] != there[..s.len] {
            return Err(Refused::Kept(sys::eilseq(), "bytes at a site of the batch changed while it was restored; nothing left written"));
        }
    }
    for s in sites {
        let (_, new) = pick(s, repatch);
        pte.write(s.offset(), &new[..s.len]);
    }
    pte.remap_dirty();
    drop(pte);
    hp.journal.record(ev(Step::RestoreBytes).page(page.pfn(), 0).note(if repatch {
        "patched bytes written again (undo of a restore that could not finish)"
    } else if page_addr == rep.addr & PAGE_MASK {
        "original bytes written back"
    } else {
        "original bytes written back (text moved since PATCH)"
    }));
    Ok(())
}

/// The bytes that should be at a site now, and the ones to write.
fn pick(s: &Site, repatch: bool) -> (&[u8; MAX_BYTES], &[u8; MAX_BYTES]) {
    if repatch {
        (&s.orig, &s.bytes)
    } else {
        (&s.bytes, &s.orig)
    }
}

/// Pass 3 for one page: zap the copy if it equals the page-cache page and
/// nothing else holds it (see `patch::keep_reason`), else keep it.
fn zap_page(hp: &Hugepoke, guard: &MmapWriteGuard<'_>, mm: &MmWithUser, rep: &Site, page_addr: usize, page: &mut PageRef, last_on_page: bool) -> Restored {
    let ev = |step| Event::new(step).pid(rep.pid).addr(page_addr + rep.offset()).handle(rep.handle as u32);
    let kept = |why: &'static str, pfn: usize| {
        hp.journal.record(ev(Step::KeepAnonPage).page(pfn, 0).note(why));
        Restored { zapped: false, pmd_mappable: false, cache_order: 0, page_addr }
    };
    if !last_on_page {
        return kept("other patches remain on this page", page.pfn());
    }
    // Zapping happens under the PT lock, where notifiers cannot sleep.
    let _invalidate = sys::InvalidateRange::start(mm, page_addr);
    let Some(vma) = patch::still_mapped_at(guard, rep, page_addr) else {
        return kept("the page moved while it was restored", page.pfn());
    };
    let info = sys::vma_info(vma);
    let Some(mut pte) = lock_page(guard, rep, page_addr, page) else {
        return kept("the page moved while it was restored", page.pfn());
    };
    pte.unmap();
    let cache = sys::page_cache_page(vma, page_addr);
    match (patch::keep_reason(true, &info, page, cache.as_ref(), &pte), cache) {
        (None, Some(c)) => {
            let swapped = pte.zap(page);
            hp.journal.record(ev(Step::ZapAnonPage).page(page.pfn(), 0).note(if swapped {
                "PTE zapped, swap slot freed; page-cache page faults back in"
            } else {
                "PTE zapped; page-cache page faults back in"
            }));
            hp.journal.record(ev(Step::ZapAnonPage).page(c.pfn(), c.folio_order()).note("page-cache page to fault in"));
            Restored { zapped: true, pmd_mappable: c.pmd_mappable(), cache_order: c.folio_order(), page_addr }
        }
        (why, _) => {
            pte.remap_dirty();
            drop(pte);
            kept(why.unwrap_or(""), page.pfn())
        }
    }
}

/// After the pages of `sites` were given back (and the sites left the
/// table): one collapse per 2 MiB range with a zapped PMD-mappable page
/// and no patch left in it; a note for ranges over smaller folios.
fn queue_collapses(
    hp: &Arc<Hugepoke>,
    target: &Arc<Target>,
    state: &mut TargetState,
    sites: &[Site],
    pages: &[(usize, Option<Restored>, Option<(Result, &'static str)>)],
) {
    let mut last: Option<PageKey> = None;
    for (at, restored, _) in pages.iter() {
        let Some(restored) = restored else { continue };
        let site = &sites[*at];
        if !restored.zapped || last == Some(site.range_key()) {
            continue;
        }
        last = Some(site.range_key());
        let ev = Event::new(Step::QueueCollapse).pid(site.pid).addr(site.addr).handle(site.handle as u32);
        if !restored.pmd_mappable {
            hp.journal.record(ev.order(restored.cache_order).note("none: the page-cache folio is smaller than a PMD"));
        } else if state.patches.in_range(site.range_key()) != 0 {
            hp.journal.record(ev.note("not yet: other patches in this 2 MiB range"));
        } else {
            collapse::queue_collapse(hp, target, state, site, restored.page_addr & PMD_MASK);
        }
    }
}

/// RESTORE every site of batch `handle`, all or none, with the target
/// locked; forget the sites restored or gone and queue the collapses.
pub(crate) fn restore_batch(hp: &Arc<Hugepoke>, target: &Arc<Target>, state: &mut TargetState, handle: u64, closing: Closing) -> Result {
    let Ok(sites) = state.patches.sites_of(handle) else {
        let ev = Event::new(Step::Restore).handle(handle as u32);
        return Err(hp.journal.fail(ev, ENOMEM, "no memory to list the batch's sites: batch kept"));
    };
    let Some(first) = sites.first().copied() else { return Err(ENOENT) };
    let ev = |step| Event::new(step).pid(first.pid).addr(first.addr).handle(handle as u32);
    hp.journal.record(ev(Step::Restore).note("batch"));
    let outcome = match target.mm_user() {
        None => Err((Refused::Gone { result: Ok(()), why: "target process is gone" }, 0)),
        Some(mm) => match MmapWriteGuard::lock_killable(&mm) {
            Err(e) => Err((Refused::Kept(e, "fatal signal while waiting for the target's mmap lock"), 0)),
            Ok(guard) => {
                hp.pauses.at(Point::Restore, first.pid, &hp.journal);
                // Every site of this batch on a page is being restored.
                let last_on_page = |s: &[Site]| state.patches.on_page(s[0].page_key()) as usize <= s.len();
                restore_pages(hp, &guard, &mm, &sites, last_on_page)
            }
        },
    };
    let (result, pages) = match outcome {
        Ok(pages) => {
            let mut result = Ok(());
            for (at, _, gone) in pages.iter() {
                if let Some((r, why)) = gone {
                    let ev = Event::new(Step::Restored).pid(first.pid).addr(sites[*at].addr).handle(handle as u32);
                    match r {
                        Ok(()) => hp.journal.record(ev.note(why)),
                        Err(e) => {
                            result = Err(*e);
                            hp.journal.record(ev.error(*e, why))
                        }
                    };
                }
            }
            (result, Some(pages))
        }
        Err((Refused::Gone { result, why }, _)) => {
            match result {
                Ok(()) => hp.journal.record(ev(Step::Restored).note(why)),
                Err(e) => hp.journal.record(ev(Step::Restored).error(e, why)),
            };
            (result, None)
        }
        Err((Refused::Kept(e, why), at)) => {
            let fate = match closing {
                Closing::No => "batch kept whole; RESTORE may be retried",
                Closing::File => "its file closed: batch kept whole as persistent",
                Closing::Module => "module unloading: batch abandoned",
            };
            hp.journal.record(ev(Step::Restore).error(e, fate));
            hp.journal.record(ev(Step::RestoreBytes).addr(sites.get(at).map_or(first.addr, |s| s.addr)).error(e, why));
            match closing {
                Closing::No => return Err(e),
                Closing::File => {
                    state.patches.disown(handle);
                    let left = hp.registry.lock().disown(handle);
                    drop(left);
                    return Err(e);
                }
                Closing::Module => (Err(e), None),
            }
        }
    };
    // Restored, gone or abandoned: forget every site, then decide about
    // the ranges without them.  References are dropped after the locks.
    let mut gone: KVVec<_> = KVVec::with_capacity(sites.len(), GFP_KERNEL).unwrap_or_default();
    for s in sites.iter() {
        if let Some(p) = state.patches.remove(handle, s.index) {
            // Without room to keep it, the reference goes right here.
            let _ = gone.push(p, GFP_KERNEL);
        }
    }
    if let Some(pages) = pages {
        queue_collapses(hp, target, state, &sites, &pages);
    }
    hp.journal.record(ev(Step::Restored).note("batch: every site restored or gone"));
    let retired = if state.idle() { hp.registry.lock().retire(target, state) } else { None };
    let forgotten = hp.registry.lock().forget_handle(handle);
    drop((gone, retired, forgotten));
    result
}

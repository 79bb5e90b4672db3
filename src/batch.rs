// SPDX-License-Identifier: GPL-2.0

//! PATCH_BATCH and the RESTORE of a batch: up to `MAX_BATCH` sites in one
//! target under one handle, all written or none.
//!
//! Everything happens with the target's state locked and its mmap lock
//! held for writing for the whole call (see `table` for the lock order), so
//! no `/proc/PID/mem` or ptrace write, no mprotect, mremap, munmap or fork
//! can come between checking one site and writing another.  What the mmap
//! lock does not keep out — MADV_DONTNEED and faults under the per-VMA
//! lock, reclaim, migration, truncation — is met where it matters: every
//! write is made under the PT lock after `lock_pte` found the very page we
//! hold, and after the bytes there were read and compared.  Work goes a page
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
//! cannot be undone.  The one LRU drain a RESTORE may need is taken after
//! the first pass, with the mmap lock dropped (nothing is written yet) and
//! the first pass made again; only the undo of a failed PATCH_BATCH drains
//! with it held, since dropping it there would let a writer in between our
//! write and its undo (the drain's per-CPU work takes no mm lock;
//! khugepaged's `madvise_collapse()` drains under the mmap lock as well).

use kernel::{
    alloc::KVVec,
    fs::File,
    mm::MmWithUser,
    prelude::*,
    rbtree::RBTree,
    sync::{aref::ARef, Arc},
};

use crate::{
    journal::{Event, Step},
    patch::{self, Closing, Refused, Restored, WriteError, MAX_TRIES},
    pause::Point,
    sys::{self, MmapWriteGuard, PageRef, PAGE_MASK},
    table::{Owner, PageKey, Site, Target, TargetState},
    uapi::{self, BatchSite, PatchBatchArgs, MAX_BATCH, MAX_BYTES},
    Hugepoke,
};

/// A refused or failed batch: the errno and the site to blame (its index
/// in the caller's array), if one is.
pub(crate) struct Failure {
    pub(crate) error: Error,
    pub(crate) site: Option<u32>,
    /// Sites it wrote and could not give back are kept under this handle.
    pub(crate) kept: Option<u64>,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Self { error, site: None, kept: None }
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
        kept: None,
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
        // Failed, and what it wrote could not all be undone: kept (see `undo`).
        (Ok(handle), Some(f)) => Err(Failure { kept: Some(handle), ..f }),
        (Err(e), f) => Err(f.unwrap_or(Failure { error: e, site: None, kept: None })),
    }
}

/// A batch on its way in, in address order: the table records its sites
/// become, their expected bytes, its pages (runs of sites) and each page's
/// file.  Everything the write phase needs is allocated before anything
/// is written, so no allocation can fail between a write and its record.
struct Plan {
    sites: KVVec<Site>,
    expects: KVVec<Option<[u8; MAX_BYTES]>>,
    pages: KVVec<PageWork>,
    /// One per page (taken by the table if the page is new to it).
    files: KVVec<Option<ARef<File>>>,
}

/// PATCH_BATCH with the target's state locked.  `Ok` with `kept` set:
/// it failed, and the sites it could not give back are recorded.
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
    let n = sites.len();
    let mut plan = Plan {
        sites: KVVec::with_capacity(n, GFP_KERNEL).map_err(|_| nomem())?,
        expects: KVVec::with_capacity(n, GFP_KERNEL).map_err(|_| nomem())?,
        pages: KVVec::with_capacity(n, GFP_KERNEL).map_err(|_| nomem())?,
        files: KVVec::with_capacity(n, GFP_KERNEL).map_err(|_| nomem())?,
    };
    // The file pages the batch reaches.
    let mut at: RBTree<PageKey, ()> = RBTree::new();

    let guard = MmapWriteGuard::lock_killable(mm)
        .map_err(|e| hp.journal.fail(ev(Step::CheckVma), e, "fatal signal while waiting for the target's mmap lock"))?;
    // Check every site before anything is written.
    let mut cached: Option<(sys::VmaInfo, ARef<File>)> = None;
    let mut on_page = state.patches.page(&(0, 0));
    for &i in order {
        let s = &sites[i as usize];
        let addr = s.addr as usize;
        let blame = |e: Error, why: &'static str| Failure {
            error: hp.journal.fail(ev(Step::CheckVma).addr(addr), e, why),
            site: Some(i),
            kept: None,
        };
        // Sites come in address order: most are in the VMA of the one before.
        let (info, file) = match cached.take() {
            Some((info, file)) if info.start <= addr && addr < info.end => (info, file),
            _ => {
                let vma = guard.vma_lookup(addr).ok_or_else(|| blame(EFAULT, "address is not mapped"))?;
                let info = sys::vma_info(vma);
                patch::check_vma(&info).map_err(|(e, why)| blame(e, why))?;
                let file = sys::vma_file(vma).ok_or_else(|| blame(EINVAL, "not a file-backed mapping"))?;
                (info, file)
            }
        };
        let pgoff = info.pgoff_of(addr & PAGE_MASK);
        let (offset, len) = (addr & !PAGE_MASK, s.len as usize);
        // Sites come in address order: a page's sites are one run, and its
        // table entry is looked up once.
        let new_page = plan.pages.last().is_none_or(|w| plan.sites[w.range.start].addr & PAGE_MASK != addr & PAGE_MASK);
        if new_page {
            on_page = state.patches.page(&(info.mapping, pgoff));
        }
        if on_page.overlaps(offset, len) {
            return Err(blame(EBUSY, "range overlaps a live patch"));
        }
        if new_page {
            // One file page reached at two addresses would be two copies:
            // the table knows a patch by its file page, so that is refused.
            if at.get(&(info.mapping, pgoff)).is_some() {
                return Err(blame(EINVAL, "two sites on one file page mapped at two addresses"));
            }
            at.try_create_and_insert((info.mapping, pgoff), (), GFP_KERNEL).map_err(|_| nomem())?;
            let at = plan.sites.len();
            // Within capacity: at most one page a site.
            let _ = plan.pages.push_within_capacity(PageWork::new(at..at));
            let _ = plan.files.push_within_capacity(Some(file.clone()));
        }
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
        // Within capacity: n each.
        let _ = plan.sites.push_within_capacity(site);
        let _ = plan.expects.push_within_capacity((s.flags & uapi::PATCH_EXPECT != 0).then_some(s.expect));
        if let Some(w) = plan.pages.last_mut() {
            w.range.end = plan.sites.len();
        }
        cached = Some((info, file));
    }
    drop(cached);
    drop(at);
    // Room for the records, before anything is written.
    let sites_of_page = |w: &PageWork| (plan.sites[w.range.start].page_key(), w.range.len());
    let room = state.patches.reserve(n, plan.pages.iter().map(sites_of_page)).map_err(|_| nomem())?;
    // The cheap look at the expected bytes, one plain GUP a page: a
    // mismatch here changes nothing.  The check that counts is repeated
    // under the page-table lock, in the step that writes.
    for w in plan.pages.iter() {
        let r = w.range.clone();
        if plan.expects[r.clone()].iter().all(|e| e.is_none()) {
            continue;
        }
        let first = &plan.sites[r.start];
        let page = guard.get_user_page(first.addr & PAGE_MASK, sys::FOLL_FORCE).map_err(|e| Failure {
            error: hp.journal.fail(ev(Step::CheckExpected).addr(first.addr), e, "cannot read the target page"),
            site: Some(first.index),
            kept: None,
        })?;
        for (s, expect) in plan.sites[r.clone()].iter().zip(plan.expects[r].iter()) {
            let mut now = [0u8; MAX_BYTES];
            page.read(s.offset(), &mut now[..s.len]);
            if expect.is_some_and(|e| e[..s.len] != now[..s.len]) {
                return Err(Failure {
                    error: hp.journal.fail(ev(Step::CheckExpected).addr(s.addr), sys::eilseq(), "bytes at the address are not the expected ones"),
                    site: Some(s.index),
                    kept: None,
                });
            }
        }
    }
    hp.journal.record(ev(Step::CheckVma).handle(handle as u32).note("every site of the batch checked"));
    hp.pauses.at(Point::Checked, pid, &hp.journal);

    // Write, a page at a time.  Each written page's reference is kept, so
    // an undo needs no GUP (which a fatal signal would cut short).
    let mut failed: Option<Failure> = None;
    for w in plan.pages.iter_mut() {
        let r = w.range.clone();
        let page_addr = plan.sites[r.start].addr & PAGE_MASK;
        let Some(vma) = guard.vma_lookup(page_addr) else {
            let e = hp.journal.fail(ev(Step::WriteBytes).addr(page_addr), EFAULT, "page is no longer mapped");
            failed = Some(Failure { error: e, site: Some(plan.sites[r.start].index), kept: None });
            break;
        };
        let before = sys::mapping_of(vma, page_addr);
        let result = patch::write_bytes(hp, &guard, vma, &mut plan.sites[r.clone()], &plan.expects[r.clone()], before);
        match result {
            Ok(page) => {
                let pmd_mappable = sys::page_cache_page(vma, page_addr).is_some_and(|c| c.pmd_mappable());
                for s in plan.sites[r].iter_mut() {
                    s.pmd_mappable = pmd_mappable;
                }
                w.state = PageState::Found(page_addr, page);
                w.written = true;
            }
            Err(WriteError::Failed(e)) => {
                failed = Some(Failure { error: e, site: Some(plan.sites[r.start].index), kept: None });
                break;
            }
            Err(WriteError::NotExpected(k, page)) => {
                let site = &plan.sites[r.start + k];
                let e = hp.journal.fail(
                    ev(Step::CheckExpected).addr(site.addr),
                    sys::eilseq(),
                    "bytes at the address are not the expected ones (under the page-table lock)",
                );
                failed = Some(Failure { error: e, site: Some(site.index), kept: None });
                // COWed but not written: given back with the others, as
                // a restore of "patched" bytes that are the ones there.
                for s in plan.sites[r].iter_mut() {
                    s.bytes = s.orig;
                }
                w.state = PageState::Found(page_addr, page);
                w.written = true;
                break;
            }
        }
    }

    if let Some(failure) = failed {
        let journal_ev = Event::new(Step::Restore).pid(pid).handle(handle as u32);
        hp.journal.record(journal_ev.note("undoing the batch's pages written so far"));
        // Nothing of the batch is in the table.
        let last_on_page = |s: &[Site]| state.patches.on_page(s[0].page_key()) == 0;
        let result = undo(hp, &guard, mm, &plan.sites, &mut plan.pages, last_on_page);
        drop(guard);
        // Collapses only now: at unload one runs synchronously, and takes
        // the mmap lock.
        queue_collapses(hp, target, state, &plan.sites, &plan.pages);
        if let Err((e, why)) = result {
            hp.journal.record(journal_ev.error(e, why));
        }
        // Sites on pages still holding them (an undo refused) stay known:
        // under this handle, persistent.
        // (By what was written, not by what the undo found: a page it
        // refused on may have lost its reference on the way.)
        let left = |w: &PageWork| w.written && matches!(w.outcome, Outcome::Untouched);
        if !plan.pages.iter().any(left) {
            hp.journal.record(journal_ev.note("batch undone: every page written so far restored"));
            return Err(failure);
        }
        // Only their sites, moved down in place (no allocation now).
        let mut to = 0;
        for w in plan.pages.iter_mut() {
            let r = w.range.clone();
            w.range = to..to + if left(w) { r.len() } else { 0 };
            plan.sites.copy_within(r.start..r.start + w.range.len(), to);
            to = w.range.end;
        }
        plan.sites.truncate(to);
        // Not the whole batch's room for the life of the handle; if the
        // smaller vector cannot be had, the larger one does as well.
        let _ = plan.sites.shrink_to(to, GFP_KERNEL);
        for s in plan.sites.iter_mut() {
            s.owner = None;
        }
        let still_written = plan.pages.iter().zip(plan.files.iter_mut()).filter(|(w, _)| !w.range.is_empty());
        let left_out = state.patches.insert(room, plan.sites, still_written.map(|(w, file)| (w.range.clone(), file)));
        patch::journal_left_out(hp, ev(Step::Patched).handle(handle as u32), left_out);
        let left = hp.registry.lock().disown(handle);
        drop(left);
        hp.journal.record(
            ev(Step::Patch)
                .handle(handle as u32)
                .error(failure.error, "batch failed and could not all be undone: the sites still written are kept under this handle, persistent"),
        );
        // The handle lives: `stats` counts it among the patched.
        hp.journal.record(ev(Step::Patched).handle(handle as u32).note("the sites still written by a failed batch, kept (persistent)"));
        *kept = Some(failure);
        return Ok(());
    }
    drop(guard);
    let first_addr = plan.sites.first().map_or(0, |s| s.addr);
    let left_out = state.patches.insert(room, plan.sites, plan.pages.iter().zip(plan.files.iter_mut()).map(|(w, file)| (w.range.clone(), file)));
    patch::journal_left_out(hp, ev(Step::Patched).handle(handle as u32), left_out);
    hp.journal.record(ev(Step::Patched).addr(first_addr).handle(handle as u32).note(if n == 1 {
        "batch of 1 site written"
    } else {
        "batch: every site written"
    }));
    Ok(())
}

/// Give back the pages a failed PATCH_BATCH wrote (those `written` in
/// `pages`), with the mmap lock still held: dropping it would let a writer
/// in between our write and its undo.  So the one LRU drain the zaps may
/// need runs under it (its per-CPU work takes no mm lock; khugepaged's
/// `madvise_collapse()` drains under the mmap lock as well).
fn undo(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    mm: &MmWithUser,
    sites: &[Site],
    pages: &mut [PageWork],
    last_on_page: impl Fn(&[Site]) -> bool,
) -> Result<(), (Error, &'static str)> {
    // Only the pages written (or COWed): the others never changed.
    for w in pages.iter_mut() {
        if !w.written {
            w.state = PageState::Gone(Ok(()), "not written");
        }
    }
    match locate_and_check(hp, guard, sites, pages, &last_on_page) {
        Located::Refused(Refused::Kept(e, why) | Refused::Gone { result: Err(e), why }, _) => return Err((e, why)),
        Located::Refused(Refused::Gone { result: Ok(()), .. }, _) => {}
        Located::NeedDrain => patch::lru_drain_journaled(hp, &sites[0]),
        Located::Ready => {}
    }
    if let Err((Refused::Kept(e, why) | Refused::Gone { result: Err(e), why }, _)) = write_originals(hp, guard, sites, pages) {
        return Err((e, why));
    }
    zap_copies(hp, guard, mm, sites, pages, &last_on_page);
    Ok(())
}

/// One page's part in a batch RESTORE (or undo): which sites, what the
/// passes found, and what was done.
struct PageWork {
    range: core::ops::Range<usize>,
    state: PageState,
    outcome: Outcome,
    /// PATCH_BATCH wrote (or COWed) this page: what an undo must give back,
    /// and what is kept if it cannot.
    written: bool,
}

impl PageWork {
    fn new(range: core::ops::Range<usize>) -> Self {
        Self { range, state: PageState::Unknown, outcome: Outcome::Untouched, written: false }
    }
}

/// What the restore passes found for one page.
enum PageState {
    /// Not looked at yet.
    Unknown,
    /// The page's copy, where it is mapped now, and the reference on it.
    Found(usize, PageRef),
    /// Nothing to restore: the patch went (how, and what RESTORE returns).
    Gone(Result, &'static str),
}

/// What was done to one page.
enum Outcome {
    /// Nothing: it holds the patched bytes (or never did).
    Untouched,
    /// The originals are back in the copy, which is still mapped.
    Written,
    /// Restored, and zapped or kept as `Restored` says.
    Done(Restored),
}

/// How pass 1 ended.
enum Located {
    /// Every copy found and every site's bytes are the patched ones.
    Ready,
    /// As `Ready`, but a copy may sit in an LRU batch: drain first.
    NeedDrain,
    /// Refused (the position in `sites` to blame); nothing written.
    Refused(Refused, usize),
}

/// Pass 1 of a batch RESTORE: find every page's copy (reusing one found
/// before, if the PTE still maps it there) and check every site's bytes
/// are the ones PATCH wrote.  Writes nothing.
fn locate_and_check(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    sites: &[Site],
    pages: &mut [PageWork],
    last_on_page: &impl Fn(&[Site]) -> bool,
) -> Located {
    let ev = |s: &Site, step| Event::new(step).pid(s.pid).addr(s.addr).handle(s.handle as u32);
    let mut need_drain = false;
    for w in pages.iter_mut() {
        let r = w.range.clone();
        let rep = &sites[r.start];
        if matches!(w.state, PageState::Gone(..)) {
            continue;
        }
        let mut ready = false;
        for _ in 0..MAX_TRIES {
            let (vma, page_addr, page) = match core::mem::replace(&mut w.state, PageState::Unknown) {
                // Held from before (written by PATCH_BATCH, or found before
                // a drain): no new GUP, whose FOLL_TOUCH could put the page
                // in an LRU batch right back.
                PageState::Found(page_addr, page) => match patch::still_mapped_at(guard, rep, page_addr) {
                    Some(vma) => (vma, page_addr, page),
                    None => continue,
                },
                _ => match patch::find_anon_copy(guard, rep) {
                    Ok(found) => found,
                    Err(Refused::Gone { result, why }) => {
                        w.state = PageState::Gone(result, why);
                        ready = true;
                        break;
                    }
                    Err(kept) => return Located::Refused(kept, r.start),
                },
            };
            let Some(pte) = sys::lock_pte(vma, page_addr, &page) else { continue };
            if !pte.writable() && (pte.uffd_wp() || !pte.anon_exclusive()) {
                // As a single RESTORE: a uffd-wp PTE or a copy shared with a
                // forked child is a fault to take with FOLL_WRITE.
                drop(pte);
                hp.journal.record(ev(rep, Step::RestoreBytes).page(page.pfn(), 0).error(EAGAIN, "PTE is write-protected or shared; faulting it with FOLL_WRITE"));
                if let Err(e) = guard.get_user_page(page_addr, sys::FOLL_FORCE | sys::FOLL_WRITE | sys::FOLL_SPLIT_PMD) {
                    return Located::Refused(Refused::Kept(e, "cannot fault the page in for writing"), r.start);
                }
                continue;
            }
            drop(pte);
            // A look before the write; the write checks again under the PT lock.
            for (k, s) in sites[r.clone()].iter().enumerate() {
                let mut now = [0u8; MAX_BYTES];
                page.read(s.offset(), &mut now[..s.len]);
                if now[..s.len] != s.bytes[..s.len] {
                    hp.journal.record(ev(s, Step::RestoreBytes).page(page.pfn(), 0).error(sys::eilseq(), "this site's bytes are not the ones PATCH wrote"));
                    return Located::Refused(
                        Refused::Kept(sys::eilseq(), "bytes at a site of the batch are not the ones PATCH wrote; nothing written"),
                        r.start + k,
                    );
                }
            }
            need_drain |= last_on_page(&sites[r.clone()]) && page.unexpected_refs() > 0 && page.may_be_lru_cached();
            w.state = PageState::Found(page_addr, page);
            ready = true;
            break;
        }
        if !ready {
            return Located::Refused(Refused::Kept(EAGAIN, "page table kept changing"), r.start);
        }
    }
    if need_drain { Located::NeedDrain } else { Located::Ready }
}

/// Pass 2: write every found page's originals back.  If a page cannot be
/// written, the pages before it get the patched bytes again; one that
/// cannot stays `Written` (its sites are restored: the caller forgets them).
fn write_originals(hp: &Hugepoke, guard: &MmapWriteGuard<'_>, sites: &[Site], pages: &mut [PageWork]) -> Result<(), (Refused, usize)> {
    for g in 0..pages.len() {
        let (done, rest) = pages.split_at_mut(g);
        let w = &mut rest[0];
        let PageState::Found(page_addr, page) = &mut w.state else { continue };
        let r = w.range.clone();
        if let Err(refused) = write_page(hp, guard, &sites[r.clone()], *page_addr, page, false) {
            for w in done.iter_mut() {
                let PageState::Found(page_addr, page) = &mut w.state else { continue };
                if write_page(hp, guard, &sites[w.range.clone()], *page_addr, page, true).is_ok() {
                    w.outcome = Outcome::Untouched;
                }
            }
            return Err((refused, r.start));
        }
        w.outcome = Outcome::Written;
    }
    Ok(())
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
        let PageState::Found(page_addr, page) = &mut w.state else { continue };
        if !matches!(w.outcome, Outcome::Written) {
            continue;
        }
        let r = w.range.clone();
        w.outcome = Outcome::Done(zap_page(hp, guard, mm, &sites[r.start], *page_addr, page, last_on_page(&sites[r])));
    }
}

/// Restore the pages of `sites` (grouped by file page in `pages`) with
/// the target's mmap lock taken here: pass 1 (dropping the lock once for
/// an LRU drain, when a copy may sit in an LRU batch: nothing is written
/// yet), then passes 2 and 3 without letting go of it.
fn restore_pages(
    hp: &Hugepoke,
    mm: &MmWithUser,
    sites: &[Site],
    pages: &mut [PageWork],
    last_on_page: impl Fn(&[Site]) -> bool,
) -> Result<(), (Refused, usize)> {
    let mut drained = false;
    loop {
        let guard = MmapWriteGuard::lock_killable(mm)
            .map_err(|e| (Refused::Kept(e, "fatal signal while waiting for the target's mmap lock"), 0))?;
        if !drained {
            hp.pauses.at(Point::Restore, sites[0].pid, &hp.journal);
        }
        match locate_and_check(hp, &guard, sites, pages, &last_on_page) {
            Located::Refused(refused, at) => return Err((refused, at)),
            Located::NeedDrain if !drained => {
                // Without the mmap lock: nothing is written yet.
                drop(guard);
                patch::drain_lru_batches(hp, &sites[0]);
                drained = true;
                continue;
            }
            Located::NeedDrain | Located::Ready => {}
        }
        write_originals(hp, &guard, sites, pages)?;
        zap_copies(hp, &guard, mm, sites, pages, &last_on_page);
        return Ok(());
    }
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
    // A swap-out in flight would keep the swap slot past the zap.
    page.wait_writeback();
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
    let keep = patch::keep_reason(true, &info, page, cache.as_ref(), &pte);
    patch::zap_or_keep(hp, ev, pte, page, keep, cache, page_addr)
}

/// After the pages of `sites` were given back (and the sites left the
/// table): one collapse per 2 MiB range with a zapped PMD-mappable page
/// and no patch left in it; a note for ranges over smaller folios.
/// Called without the mmap lock.
fn queue_collapses(hp: &Arc<Hugepoke>, target: &Arc<Target>, state: &mut TargetState, sites: &[Site], pages: &[PageWork]) {
    let mut last: Option<PageKey> = None;
    for w in pages.iter() {
        let Outcome::Done(restored) = &w.outcome else { continue };
        let site = &sites[w.range.start];
        if !restored.zapped || last == Some(site.range_key()) {
            continue;
        }
        last = Some(site.range_key());
        patch::collapse_after_restore(hp, target, state, site, restored);
    }
}

/// RESTORE every site of batch `handle`, all or none, with the target
/// locked; forget the sites restored or gone and queue the collapses.
pub(crate) fn restore_batch(hp: &Arc<Hugepoke>, target: &Arc<Target>, state: &mut TargetState, handle: u64, closing: Closing) -> Result {
    let nomem = |state: &mut TargetState| {
        if closing == Closing::File {
            // Kept, so it must not stay owned by the file that closed.
            state.patches.disown(handle);
            drop(hp.registry.lock().disown(handle));
        }
        hp.journal.fail(Event::new(Step::Restore).handle(handle as u32), ENOMEM, "no memory to list the batch's sites: batch kept")
    };
    let Ok(sites) = state.patches.sites_of(handle) else { return Err(nomem(state)) };
    let Some(first) = sites.first().copied() else { return Err(ENOENT) };
    let Ok(mut pages) = KVVec::<PageWork>::with_capacity(sites.len(), GFP_KERNEL) else { return Err(nomem(state)) };
    for r in pages_of(&sites, |s| s.page_key()) {
        let _ = pages.push_within_capacity(PageWork::new(r));
    }
    let ev = |step| Event::new(step).pid(first.pid).addr(first.addr).handle(handle as u32);
    hp.journal.record(ev(Step::Restore).note("batch"));
    let outcome = match target.mm_user() {
        None => Err((Refused::Gone { result: Ok(()), why: "target process is gone" }, 0)),
        Some(mm) => {
            // Every site of this batch on a page is being restored.
            let last_on_page = |s: &[Site]| state.patches.on_page(s[0].page_key()) as usize <= s.len();
            restore_pages(hp, &mm, &sites, &mut pages, last_on_page)
        }
    };
    let mut result = Ok(());
    // Which pages' sites leave the table: all of them, unless refused.
    let mut forget_all = true;
    // What the one `restored` record of the handle says (`stats` counts a
    // handle as restored, or forgotten with a reason, by it).
    let mut settled: Option<&'static str> = Some("batch: every site restored or gone");
    match outcome {
        Ok(()) => {
            for w in pages.iter() {
                if let PageState::Gone(r, why) = &w.state {
                    // Per page, as a step; the handle's verdict comes last.
                    let ev = ev(Step::RestoreBytes).addr(sites[w.range.start].addr);
                    match r {
                        Ok(()) => hp.journal.record(ev.note(why)),
                        Err(e) => {
                            result = Err(*e);
                            settled = Some("batch: a site's file page is no longer mapped in the target; its sites forgotten, the others restored");
                            hp.journal.record(ev.error(*e, why))
                        }
                    };
                }
            }
        }
        Err((Refused::Gone { result: r, why }, _)) => {
            result = r;
            settled = Some(why);
        }
        Err((Refused::Kept(e, why), at)) => {
            // Pages restored that could not be re-patched leave the batch.
            let partial = pages.iter().any(|w| matches!(w.outcome, Outcome::Written | Outcome::Done(_)));
            let fate = match (closing, partial) {
                (Closing::No, false) => "batch kept whole; RESTORE may be retried",
                (Closing::No, true) => "batch kept but for the pages restored that could not be re-patched; RESTORE may be retried",
                (Closing::File, false) => "its file closed: batch kept whole as persistent",
                (Closing::File, true) => "its file closed: batch kept as persistent but for the pages restored that could not be re-patched",
                (Closing::Module, _) => "module unloading: batch abandoned",
            };
            hp.journal.record(ev(Step::Restore).error(e, fate));
            hp.journal.record(ev(Step::RestoreBytes).addr(sites.get(at).map_or(first.addr, |s| s.addr)).error(e, why));
            result = Err(e);
            forget_all = closing == Closing::Module;
            // Abandoned at unload: no verdict, as for a single patch.
            settled = None;
        }
    }
    // Forget the sites restored or gone (all of them, unless kept; a
    // page whose originals are back and could not be re-patched is
    // restored either way).  References are dropped after the locks.
    let mut forgotten: KVVec<_> = KVVec::with_capacity(pages.len(), GFP_KERNEL).unwrap_or_default();
    for w in pages.iter() {
        if forget_all || matches!(w.outcome, Outcome::Written | Outcome::Done(_)) {
            if !forget_all {
                hp.journal.record(ev(Step::RestoreBytes).addr(sites[w.range.start].addr).note("this page was restored and could not be re-patched: its sites are forgotten"));
            }
            if let Some(p) = state.patches.remove_page(handle, sites[w.range.start].page_key()) {
                // Without room to keep it, the reference goes right here.
                let _ = forgotten.push(p, GFP_KERNEL);
            }
        }
    }
    queue_collapses(hp, target, state, &sites, &pages);
    if state.patches.count(handle) != 0 {
        if closing == Closing::File {
            state.patches.disown(handle);
            let left = hp.registry.lock().disown(handle);
            drop((left, forgotten));
        }
        return result;
    }
    match (settled, result) {
        (Some(why), Ok(())) => hp.journal.record(ev(Step::Restored).note(why)),
        (Some(why), Err(e)) => hp.journal.record(ev(Step::Restored).error(e, why)),
        (None, _) => 0,
    };
    let retired = if state.idle() { hp.registry.lock().retire(target, state) } else { None };
    let handle = hp.registry.lock().forget_handle(handle);
    drop((forgotten, retired, handle));
    result
}

// SPDX-License-Identifier: GPL-2.0

//! PATCH and RESTORE: the steps of the THP-aware uprobe series, as
//! `uprobe_write()`/`__uprobe_write()` take them in 7.2, each step
//! journaled.  The locks they take, and in which order, are written down
//! in `table`.
//!
//! Every write into the target — PATCH's bytes, RESTORE's originals —
//! happens under the page-table lock with the PTE cleared, right after
//! reading what is there now: PATCH_EXPECT compares with that read, and
//! RESTORE writes only if the bytes there are still exactly the ones
//! PATCH wrote (uprobes' `verify_opcode`).  RESTORE finds the patched page
//! by its identity (file, page offset), wherever the target maps it now.

use kernel::{
    mm::{virt::VmaRef, Mm, MmWithUser, MmWithUserAsync},
    sync::aref::ARef,
    new_work,
    prelude::*,
    sync::{Arc, Completion},
    workqueue::{Work, WorkItem},
    impl_has_work,
};

use crate::{
    batch, collapse,
    journal::{Event, Step},
    live::{self, Live},
    pause::Point,
    sys::{self, Mapping, MmapWriteGuard, PageRef, Process, PAGE_MASK, PAGE_SIZE, PMD_MASK},
    table::{self, Owner, Site, Target, TargetState},
    uapi::{self, PatchArgs, MAX_BYTES},
    Hugepoke,
};

/// How often PATCH/RESTORE retry when the page table changed under them.
pub(crate) const MAX_TRIES: u32 = 6;

/// The checks PATCH makes on the VMA: what uprobes may patch, and no more.
pub(crate) fn check_vma(info: &sys::VmaInfo) -> Result<(), (Error, &'static str)> {
    use kernel::bindings::{VM_EXEC, VM_HUGETLB, VM_IO, VM_MAYWRITE, VM_PFNMAP, VM_SHARED, VM_WRITE};
    let has = |flag| info.flags & flag as usize != 0;
    if has(VM_HUGETLB) || has(VM_IO) || has(VM_PFNMAP) {
        return Err((EINVAL, "hugetlb, VM_IO or VM_PFNMAP mapping"));
    }
    if !info.file_backed() {
        return Err((EINVAL, "not a file-backed mapping"));
    }
    if has(VM_SHARED) {
        return Err((EINVAL, "shared mapping: writing would change the file"));
    }
    if has(VM_WRITE) {
        return Err((EINVAL, "writable mapping: not text"));
    }
    if !has(VM_EXEC) {
        return Err((EINVAL, "mapping is not executable"));
    }
    if !has(VM_MAYWRITE) {
        return Err((EINVAL, "mapping cannot be COWed (no VM_MAYWRITE)"));
    }
    if info.uffd_armed {
        // GUP's write fault would wait for the uffd reader, and dropping the
        // uffd-wp bit silently is not ours to do (seed 003).
        return Err((EBUSY, "userfaultfd is armed on this mapping"));
    }
    Ok(())
}

/// Validate a PATCH request before anything is looked up.
pub(crate) fn check_patch_args(args: &PatchArgs) -> Result<(), (Error, &'static str)> {
    uapi::check_header(args.size, args.flags, core::mem::size_of::<PatchArgs>(), uapi::PATCH_FLAGS)
        .map_err(|why| (EINVAL, why))?;
    check_range(args.addr, args.len)
}

/// The checks of one site's address and length.
pub(crate) fn check_range(addr: u64, len: u32) -> Result<(), (Error, &'static str)> {
    let len = len as usize;
    if len == 0 || len > MAX_BYTES {
        return Err((EINVAL, "length must be 1 to 16 bytes"));
    }
    // The range must not wrap: `addr + len` is computed below.
    let Some(addr) = usize::try_from(addr).ok().filter(|a| a.checked_add(len).is_some()) else {
        return Err((EFAULT, "address out of range"));
    };
    if (addr & !PAGE_MASK) + len > PAGE_SIZE {
        return Err((EINVAL, "range crosses a page boundary"));
    }
    Ok(())
}

/// Step 1: pid → task → mm, with the ptrace check made under the target's
/// exec_update_lock (no execve() can come in between).  Returns the mm and
/// the target's tgid.
pub(crate) fn resolve_target(hp: &Hugepoke, pid: i32, ev: impl Fn(Step) -> Event) -> Result<(ARef<MmWithUserAsync>, i32)> {
    let process = Process::find(pid).ok_or_else(|| hp.journal.fail(ev(Step::ResolveTarget), ESRCH, "no such process"))?;
    if process.is_kernel_thread() {
        return Err(hp.journal.fail(ev(Step::ResolveTarget), EINVAL, "a kernel thread has no user text"));
    }
    let mm = process.mm_access().map_err(|e| {
        let (e, why) = match e {
            e if e == EACCES || e == EPERM => (EPERM, "caller may not ptrace-attach to the target"),
            e if e == ESRCH => (ESRCH, "process has no address space (exiting or zombie)"),
            e => (e, "mm_access failed (interrupted?)"),
        };
        hp.journal.fail(ev(Step::ResolveTarget), e, why)
    })?;
    hp.journal.record(ev(Step::ResolveTarget));
    hp.pauses.at(Point::Resolved, pid, &hp.journal);
    Ok((mm, process.tgid()))
}

/// Run `make` with a new handle for `owner` and the target of `mm` locked;
/// on failure the handle is forgotten (and the target retired if idle).
/// The registry lock is never held while `make` runs.
pub(crate) fn with_new_handle(
    hp: &Arc<Hugepoke>,
    mm: &Mm,
    owner: Owner,
    ev: Event,
    mut make: impl FnMut(&Arc<Target>, &mut TargetState, u64) -> Result,
) -> Result<u64> {
    loop {
        let (target, handle) = {
            let mut registry = hp.registry.lock();
            if registry.closing {
                return Err(hp.journal.fail(ev, ENODEV, "module is unloading"));
            }
            let target = registry.target_for(mm).map_err(|_| hp.journal.fail(ev, ENOMEM, "no memory to record a patch"))?;
            let handle = registry
                .new_handle(&target, owner)
                .map_err(|_| hp.journal.fail(ev, ENOMEM, "no memory to record a patch"))?;
            (target, handle)
        };
        let mut state = target.state.lock();
        let result = if state.retired { None } else { Some(make(&target, &mut state, handle)) };
        if let Some(Ok(())) = result {
            return Ok(handle);
        }
        let retired = if state.idle() && !state.retired { hp.registry.lock().retire(&target, &mut state) } else { None };
        drop(state);
        let forgotten = hp.registry.lock().forget_handle(handle);
        drop((retired, forgotten));
        if let Some(Err(e)) = result {
            return Err(e);
        }
        // The target was retired while we waited for it: look it up again.
    }
}

/// PATCH: write `args.bytes` into the target's text at `args.addr`.
pub(crate) fn patch(hp: &Arc<Hugepoke>, owner: u64, args: &PatchArgs) -> Result<u64> {
    let ev = |step| Event::new(step).pid(args.pid).addr(args.addr as usize);
    hp.journal.record(ev(Step::Patch));
    check_patch_args(args).map_err(|(e, why)| hp.journal.fail(ev(Step::Patch), e, why))?;
    let (mm, pid) = resolve_target(hp, args.pid, ev)?;
    // The opener's file owns the patch, unless it is persistent.
    let owner: Owner = if args.flags & uapi::PATCH_PERSIST != 0 { None } else { Some(owner) };
    with_new_handle(hp, &mm, owner, ev(Step::Patch), |target, state, handle| {
        patch_locked(hp, target, state, &mm, pid, owner, args, handle)
    })
}

/// PATCH with the target's state locked.
#[allow(clippy::too_many_arguments)]
fn patch_locked(
    hp: &Arc<Hugepoke>,
    target: &Arc<Target>,
    state: &mut TargetState,
    mm: &MmWithUser,
    pid: i32,
    owner: Owner,
    args: &PatchArgs,
    handle: u64,
) -> Result {
    let ev = |step| Event::new(step).pid(args.pid).addr(args.addr as usize);
    let addr = args.addr as usize;
    let len = args.len as usize;
    let offset = addr & !PAGE_MASK;
    let page_addr = addr & PAGE_MASK;
    // For writing, as uprobes: see `MmapWriteGuard`.
    let guard = MmapWriteGuard::lock_killable(mm)
        .map_err(|e| hp.journal.fail(ev(Step::CheckVma), e, "fatal signal while waiting for the target's mmap lock"))?;
    let vma = guard
        .vma_lookup(addr)
        .ok_or_else(|| hp.journal.fail(ev(Step::CheckVma), EFAULT, "address is not mapped"))?;
    let info = sys::vma_info(vma);
    check_vma(&info).map_err(|(e, why)| hp.journal.fail(ev(Step::CheckVma), e, why))?;
    let pgoff = info.pgoff_of(page_addr);
    if state.patches.overlaps(info.mapping, pgoff, offset, len) {
        return Err(hp.journal.fail(ev(Step::CheckVma), EBUSY, "range overlaps a live patch"));
    }
    let file = sys::vma_file(vma).ok_or_else(|| hp.journal.fail(ev(Step::CheckVma), EINVAL, "not a file-backed mapping"))?;
    // Room for the record first: once the bytes are written, nothing may fail.
    let nomem = || hp.journal.fail(ev(Step::Patch), ENOMEM, "no memory to record a patch");
    let room = state.patches.reserve(1, core::iter::once(((info.mapping, pgoff), 1))).map_err(|_| nomem())?;
    let mut record = KVVec::with_capacity(1, GFP_KERNEL).map_err(|_| nomem())?;
    hp.journal.record(ev(Step::CheckVma));

    // A cheap refusal that changes nothing: the expected bytes, read through
    // a plain (non-COWing) GUP.  The check that counts is repeated under the
    // page-table lock, in the step that writes.
    let expect = (args.flags & uapi::PATCH_EXPECT != 0).then_some(&args.expect[..len]);
    if let Some(expect) = expect {
        let page = guard.get_user_page(page_addr, sys::FOLL_FORCE)
            .map_err(|e| hp.journal.fail(ev(Step::CheckExpected), e, "cannot read the target page"))?;
        let mut now = [0u8; MAX_BYTES];
        page.read(offset, &mut now[..len]);
        if now[..len] != *expect {
            return Err(hp.journal.fail(ev(Step::CheckExpected), sys::eilseq(), "bytes at the address are not the expected ones"));
        }
    }

    hp.pauses.at(Point::Checked, args.pid, &hp.journal);

    let before = sys::mapping_of(vma, page_addr);
    let mut site = Site {
        handle,
        index: 0,
        owner,
        pid,
        addr,
        len,
        flags: args.flags,
        mapping: info.mapping,
        pgoff,
        bytes: args.bytes,
        orig: [0; MAX_BYTES],
        pfn: 0,
        pmd_mappable: false,
    };
    let expect = expect.map(|_| args.expect);
    match write_bytes(hp, &guard, vma, core::slice::from_mut(&mut site), &[expect], before) {
        Ok(_) => {}
        Err(WriteError::Failed(e)) => return Err(e),
        Err(WriteError::NotExpected(..)) => {
            // The COW happened but nothing was written: give the page
            // back as RESTORE would (the "patched" bytes are the ones there).
            drop(guard);
            site.bytes = site.orig;
            // Not in the table: the last on its page if no other is there.
            let last_on_page = state.patches.on_page(site.page_key()) == 0;
            let undo = restore_site(hp, mm, &site, last_on_page);
            if let Ok(Restored { zapped: true, pmd_mappable: true, page_addr, .. }) = undo {
                if state.patches.in_range(site.range_key()) == 0 {
                    collapse::queue_collapse(hp, target, state, &site, page_addr & PMD_MASK);
                }
            }
            return Err(hp.journal.fail(
                ev(Step::CheckExpected),
                sys::eilseq(),
                "bytes at the address are not the expected ones (under the page-table lock)",
            ));
        }
    }
    site.pmd_mappable = sys::page_cache_page(vma, page_addr).is_some_and(|c| c.pmd_mappable());
    drop(guard);
    let _ = record.push_within_capacity(site);
    let left_out = state.patches.insert(room, record, core::iter::once((0..1, &mut Some(file))));
    journal_left_out(hp, ev(Step::Patched).handle(handle as u32), left_out);
    hp.journal.record(
        ev(Step::Patched)
            .handle(handle as u32)
            .page(site.pfn, 0)
            .note(if site.pmd_mappable { "page-cache folio is PMD-mappable" } else { "page-cache folio is not PMD-mappable" }),
    );
    Ok(())
}

/// Say so if the table could not record sites that were written (see
/// `Patches::insert`: a bug of ours if it ever happens).
pub(crate) fn journal_left_out(hp: &Hugepoke, ev: Event, left_out: usize) {
    if left_out != 0 {
        hp.journal.record(ev.error(ENOMEM, "sites written but not recorded: their table room was missing (a hugepoke bug; RESTORE cannot give them back)"));
    }
}

pub(crate) enum WriteError {
    Failed(Error),
    /// The bytes read under the PT lock were not the expected ones at
    /// site `.0` of the page; the page (`.1`) was COWed, nothing written
    /// (`orig` of every site holds what is there).
    NotExpected(usize, PageRef),
}

/// Steps 2–4 of PATCH for the sites of one page (sorted, not overlapping):
/// split the PMD, break COW, and, under one hold of the PT lock, check the
/// expected bytes of every site and write all of them into the exclusive
/// anonymous page, so the target never runs the page with only some
/// written.  Fills every site's `orig` and `pfn`.
pub(crate) fn write_bytes(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    vma: &VmaRef,
    sites: &mut [Site],
    expects: &[Option<[u8; MAX_BYTES]>],
    before: Mapping,
) -> Result<PageRef, WriteError> {
    let Some(first) = sites.first() else { return Err(WriteError::Failed(EINVAL)) };
    // No handle yet: the patch does not exist until `patched`.
    let (pid, addr) = (first.pid, first.addr);
    let ev = |step| Event::new(step).pid(pid).addr(addr);
    let page_addr = addr & PAGE_MASK;
    let gup_flags = sys::FOLL_FORCE | sys::FOLL_WRITE | sys::FOLL_SPLIT_PMD;

    for attempt in 0..MAX_TRIES {
        let page = guard.get_user_page(page_addr, gup_flags)
            .map_err(|e| WriteError::Failed(hp.journal.fail(ev(Step::SplitPmd), e, "get_user_pages_remote failed")))?;
        if attempt == 0 {
            // FOLL_SPLIT_PMD split only the PMD: the THP stays whole in the
            // page cache, now mapped by 512 PTEs (one of them ours).
            hp.journal.record(match before {
                Mapping::Pmd(pfn) => ev(Step::SplitPmd).page(pfn & !511, 9).note("PMD split to PTEs; THP stays whole"),
                Mapping::Pte(pfn) => ev(Step::SplitPmd).page(pfn, 0).note("already PTE-mapped"),
                Mapping::None => ev(Step::SplitPmd).note("was not mapped"),
            });
        }
        if !page.is_anon() {
            hp.journal.record(ev(Step::CowPage).page(page.pfn(), page.folio_order()).error(EAGAIN, "GUP returned a page-cache page; retrying"));
            continue;
        }
        hp.journal.record(ev(Step::CowPage).page(page.pfn(), page.folio_order()).note(match before {
            Mapping::Pte(pfn) if pfn == page.pfn() => "already an anonymous copy",
            _ => "exclusive anonymous copy",
        }));

        let Some(mut pte) = sys::lock_pte(vma, page_addr, &page) else {
            hp.journal.record(ev(Step::WriteBytes).error(EAGAIN, "PTE changed after GUP; retrying"));
            continue;
        };
        // We'd prefer a writable PTE, but the VMA is not writable: then the
        // page must be exclusive (no GUP-fast pin can race) and not uffd-wp.
        if !pte.writable() {
            if pte.uffd_wp() {
                return Err(WriteError::Failed(hp.journal.fail(ev(Step::WriteBytes), EBUSY, "PTE is userfaultfd write-protected")));
            }
            if !pte.anon_exclusive() {
                drop(pte);
                hp.journal.record(ev(Step::WriteBytes).error(EAGAIN, "page may be shared; retrying COW"));
                continue;
            }
        }
        // Unmap and flush, so no CPU executes the page half-written and no
        // fault maps it between our read and our write.  (A write through a
        // reference taken earlier — /proc/PID/mem's kmap — is excluded by
        // the mmap lock, which we hold for writing.)
        pte.unmap();
        for site in sites.iter_mut() {
            let (offset, len) = (site.offset(), site.len);
            pte.read(offset, &mut site.orig[..len]);
            site.pfn = page.pfn();
        }
        let mismatch = sites
            .iter()
            .zip(expects)
            .position(|(site, expect)| expect.is_some_and(|e| e[..site.len] != site.orig[..site.len]));
        if let Some(i) = mismatch {
            drop(pte);
            return Err(WriteError::NotExpected(i, page));
        }
        for site in sites.iter() {
            pte.write(site.offset(), &site.bytes[..site.len]);
        }
        pte.remap_dirty();
        drop(pte);
        hp.journal.record(ev(Step::WriteBytes).page(page.pfn(), page.folio_order()).note(if sites.len() == 1 {
            ""
        } else {
            "every site of the page written under one page-table lock hold"
        }));
        return Ok(page);
    }
    Err(WriteError::Failed(hp.journal.fail(ev(Step::WriteBytes), EAGAIN, "page table kept changing")))
}

/// What RESTORE did, when it did not refuse.
pub(crate) struct Restored {
    /// The anonymous page was zapped: the page-cache page faults back in.
    pub(crate) zapped: bool,
    /// … and its folio is PMD-mappable.
    pub(crate) pmd_mappable: bool,
    /// The order of the page-cache folio that faults back in (when zapped).
    pub(crate) cache_order: u32,
    /// Where the patched page is mapped now.
    pub(crate) page_addr: usize,
}

/// Why RESTORE did not restore.
pub(crate) enum Refused {
    /// There is nothing left to restore: the patch is forgotten and RESTORE
    /// returns `result`.
    Gone { result: Result, why: &'static str },
    /// The patch stays in the table: RESTORE returns the error.
    Kept(Error, &'static str),
}

/// RESTORE one patch, with its target's state locked: find the anonymous
/// copy of the patched file page, verify the patched bytes are there, write
/// the originals back, and zap the copy when it is identical to the
/// page-cache page (only if `last_on_page`: no other patch stays on the
/// page).  The patch is not removed here.
fn restore_site(hp: &Hugepoke, mm: &MmWithUser, site: &Site, last_on_page: bool) -> Result<Restored, Refused> {
    let ev = |step| Event::new(step).pid(site.pid).addr(site.addr).handle(site.handle as u32);
    let len = site.len;
    // No FOLL_WRITE at first: if the anonymous page is gone, so is the patch.
    let mut gup_flags = sys::FOLL_FORCE;
    let mut drained = false;
    // The page kept across an LRU drain: looked at again without another
    // GUP, whose FOLL_TOUCH could put it in an LRU batch right back.
    let mut held: Option<(usize, PageRef)> = None;

    for _ in 0..MAX_TRIES {
        let guard = MmapWriteGuard::lock_killable(mm)
            .map_err(|e| Refused::Kept(e, "fatal signal while waiting for the target's mmap lock"))?;
        hp.pauses.at(Point::Restore, site.pid, &hp.journal);
        let found = match held.take() {
            Some((page_addr, page)) => still_mapped_at(&guard, site, page_addr).map(|vma| (vma, page_addr, page)),
            None => None,
        };
        let reused = found.is_some();
        let (vma, page_addr, page) = match found {
            Some(found) => found,
            None => find_anon_copy(&guard, site)?,
        };
        let page = if reused || gup_flags & sys::FOLL_WRITE == 0 {
            page
        } else {
            // Fault it writable now (uffd-wp, or shared after fork()): only
            // this page, only in this mapping.
            drop(page);
            match guard.get_user_page(page_addr, gup_flags) {
                Ok(p) if p.is_anon() => p,
                Ok(_) => continue,
                Err(e) => return Err(Refused::Kept(e, "cannot fault the page in for writing")),
            }
        };
        let info = sys::vma_info(vma);
        if last_on_page {
            // A swap-out in flight would keep the swap slot past the zap.
            page.wait_writeback();
        }
        // Zapping happens under the PT lock, where notifiers cannot sleep.
        let _invalidate = last_on_page.then(|| sys::InvalidateRange::start(mm, page_addr));
        let Some(mut pte) = sys::lock_pte(vma, page_addr, &page) else {
            hp.journal.record(ev(Step::RestoreBytes).error(EAGAIN, "PTE changed after GUP; retrying"));
            continue;
        };
        if !pte.writable() {
            if pte.uffd_wp() {
                // As uprobes: a uffd-wp PTE is a fault to take with
                // FOLL_WRITE, never a bit to write through.  Without
                // FAULT_FLAG_ALLOW_RETRY (no `locked` to GUP) the uffd fault
                // fails (EFAULT) instead of waiting for the reader.
                drop(pte);
                hp.journal.record(ev(Step::RestoreBytes).page(page.pfn(), 0).error(EAGAIN, "PTE is userfaultfd write-protected; faulting it with FOLL_WRITE"));
                gup_flags = sys::FOLL_FORCE | sys::FOLL_WRITE | sys::FOLL_SPLIT_PMD;
                continue;
            }
            if !pte.anon_exclusive() {
                // After fork() the page may be shared with the child, which
                // keeps the patched copy it inherited: break COW for us.
                drop(pte);
                hp.journal.record(ev(Step::RestoreBytes).page(page.pfn(), 0).error(EAGAIN, "page may be shared (forked child?); breaking COW first"));
                gup_flags = sys::FOLL_FORCE | sys::FOLL_WRITE | sys::FOLL_SPLIT_PMD;
                continue;
            }
        }
        if last_on_page && !drained && page.unexpected_refs() > 0 && page.may_be_lru_cached() {
            // Maybe only an LRU batch's reference (a fresh COW leaves one):
            // drain every CPU's once, without our locks, then look again.
            drop(pte);
            drop(_invalidate);
            drop(guard);
            drain_lru_batches(hp, site);
            drained = true;
            held = Some((page_addr, page));
            continue;
        }
        pte.unmap();
        let mut now = [0u8; MAX_BYTES];
        pte.read(site.offset(), &mut now[..len]);
        if now[..len] != site.bytes[..len] {
            // Someone else (a debugger, /proc/PID/mem, the target) changed
            // them: they are not ours to overwrite.  The PTE goes back as is.
            drop(pte);
            return Err(Refused::Kept(sys::eilseq(), "bytes at the patch are not the ones PATCH wrote; nothing written"));
        }
        pte.write(site.offset(), &site.orig[..len]);
        hp.journal.record(ev(Step::RestoreBytes).addr(page_addr + site.offset()).page(page.pfn(), 0).note(
            if page_addr == site.addr & PAGE_MASK { "original bytes written back" } else { "original bytes written back (text moved since PATCH)" },
        ));

        // Zap only when the page-cache page would fault back in with exactly
        // this content, and nothing else may hold the anonymous page.
        let cache = sys::page_cache_page(vma, page_addr);
        let keep = keep_reason(last_on_page, &info, &page, cache.as_ref(), &pte);
        return Ok(zap_or_keep(hp, ev, pte, &page, keep, cache, page_addr));
    }
    Err(Refused::Kept(EAGAIN, "page table kept changing"))
}

/// The last step of a RESTORE of a page, under its PT lock with the PTE
/// cleared and the originals written: zap the anonymous page so the
/// page-cache page faults back in, unless `keep` says why not.
pub(crate) fn zap_or_keep(
    hp: &Hugepoke,
    ev: impl Fn(Step) -> Event,
    mut pte: sys::LockedPte<'_>,
    page: &PageRef,
    keep: Option<&'static str>,
    cache: Option<sys::CacheRef>,
    page_addr: usize,
) -> Restored {
    match (keep, cache) {
        (None, Some(c)) => {
            hp.journal.record(ev(Step::ZapAnonPage).page(page.pfn(), 0).note(match pte.zap(page) {
                sys::SwapSlot::Freed => "PTE zapped, swap slot freed; page-cache page faults back in",
                sys::SwapSlot::Kept => "PTE zapped, page stays in the swap cache (locked elsewhere); page-cache page faults back in",
                sys::SwapSlot::None => "PTE zapped; page-cache page faults back in",
            }));
            hp.journal.record(ev(Step::ZapAnonPage).page(c.pfn(), c.folio_order()).note("page-cache page to fault in"));
            Restored { zapped: true, pmd_mappable: c.pmd_mappable(), cache_order: c.folio_order(), page_addr }
        }
        (why, _) => {
            pte.remap_dirty();
            drop(pte);
            hp.journal.record(ev(Step::KeepAnonPage).page(page.pfn(), 0).note(why.unwrap_or("")));
            Restored { zapped: false, pmd_mappable: false, cache_order: 0, page_addr }
        }
    }
}

/// Why RESTORE keeps the anonymous page it wrote the originals back into,
/// or None when it may zap it: only when the page-cache page would fault
/// back in with exactly this content, and nothing else may hold the page.
pub(crate) fn keep_reason(
    last_on_page: bool,
    info: &sys::VmaInfo,
    page: &PageRef,
    cache: Option<&sys::CacheRef>,
    pte: &sys::LockedPte<'_>,
) -> Option<&'static str> {
    if !last_on_page {
        Some("other patches remain on this page")
    } else if info.uffd_missing {
        Some("userfaultfd missing mode is armed")
    } else if info.uffd_wp {
        Some("userfaultfd write-protect is registered: zapping would drop the wp bit")
    } else if page.unexpected_refs() != 0 {
        Some("page has unexpected references (pinned or in a pipe)")
    } else {
        match cache {
            None => Some("no page-cache page to fault back in"),
            Some(c) if !c.uptodate() => Some("page-cache page is not uptodate"),
            Some(c) if !c.identical_to(pte) => Some("page differs from the page-cache page"),
            Some(_) => None,
        }
    }
}

/// After RESTORE gave back the page of `site` (the patch already out of
/// the table): if the copy was zapped, queue the collapse of its 2 MiB
/// range when no patch is left there, or journal why not.
pub(crate) fn collapse_after_restore(hp: &Arc<Hugepoke>, target: &Arc<Target>, state: &mut TargetState, site: &Site, restored: &Restored) {
    let ev = Event::new(Step::QueueCollapse).pid(site.pid).addr(site.addr).handle(site.handle as u32);
    if restored.zapped && restored.pmd_mappable {
        if state.patches.in_range(site.range_key()) == 0 {
            collapse::queue_collapse(hp, target, state, site, restored.page_addr & PMD_MASK);
        } else {
            hp.journal.record(ev.note("not yet: other patches in this 2 MiB range"));
        }
    } else if restored.zapped {
        // 4 KiB or mTHP page cache: the subpage faults back in, and
        // there is no PMD to rebuild.
        hp.journal.record(ev.order(restored.cache_order).note("none: the page-cache folio is smaller than a PMD"));
    }
}

/// One `lru_add_drain_all()`, journaled.  It waits for work on every CPU,
/// so the caller holds neither the target's mmap lock nor the registry
/// (only this target's state lock: this target's operations wait, no
/// other's).  The `drain` pause point is here, so a test can see which
/// locks are free while it runs.
pub(crate) fn drain_lru_batches(hp: &Hugepoke, site: &Site) {
    hp.pauses.at(Point::Drain, site.pid, &hp.journal);
    lru_drain_journaled(hp, site);
}

/// The drain itself, journaled (start, done), with no pause point: the
/// undo of a failed PATCH_BATCH drains with the mmap lock held.
pub(crate) fn lru_drain_journaled(hp: &Hugepoke, site: &Site) {
    let ev = Event::new(Step::LruDrain).pid(site.pid).addr(site.addr).handle(site.handle as u32);
    hp.journal.record(ev.note("draining all CPUs' LRU batches"));
    sys::lru_add_drain_all();
    hp.journal.record(ev.note("drained"));
}

/// The VMA at `page_addr`, if it still maps `site`'s file page there and
/// RESTORE may write into it.  (Whether the PTE still maps the page we hold
/// is for `lock_pte` to say.)
pub(crate) fn still_mapped_at<'a>(guard: &'a MmapWriteGuard<'_>, site: &Site, page_addr: usize) -> Option<&'a VmaRef> {
    let vma = guard.find_vma(page_addr)?;
    let info = sys::vma_info(vma);
    let at = table::address_in(site, &info)? & PAGE_MASK;
    (at == page_addr && table::check_restore_vma(&info).is_ok()).then_some(vma)
}

/// Where the target maps the anonymous copy of `site`'s file page now: the
/// VMA, the page's address, and the page.  Walks every VMA, so it follows
/// `mremap()`; a file page mapped more than once (ELF segments share
/// boundary pages; a library mapped twice) is looked at in each mapping.
/// Of several private copies it takes the one holding the page PATCH wrote
/// (its PFN), else the one at the address PATCH wrote; if there are several
/// and neither tells, it refuses rather than guess.
pub(crate) fn find_anon_copy<'a>(
    guard: &'a MmapWriteGuard<'_>,
    site: &Site,
) -> Result<(&'a VmaRef, usize, PageRef), Refused> {
    let made_at = site.addr & PAGE_MASK;
    let (mut cursor, mut mapped, mut copies) = (0, false, 0);
    let (mut refused, mut error) = (None, None);
    let mut best: Option<(u8, &'a VmaRef, usize, PageRef)> = None;
    while let Some(vma) = guard.find_vma(cursor) {
        cursor = vma.end();
        let info = sys::vma_info(vma);
        let Some(page_addr) = table::address_in(site, &info).map(|a| a & PAGE_MASK) else {
            continue;
        };
        mapped = true;
        // One mapping that cannot be faulted in (uffd, a guard region, past
        // EOF) says nothing about the others.
        let page = match guard.get_user_page(page_addr, sys::FOLL_FORCE) {
            Ok(page) => page,
            Err(e) => {
                error = Some(e);
                continue;
            }
        };
        if !page.is_anon() {
            continue;
        }
        if let Err(why) = table::check_restore_vma(&info) {
            refused = Some(why);
            continue;
        }
        copies += 1;
        let rank = if page.pfn() == site.pfn { 3 } else if page_addr == made_at { 2 } else { 1 };
        if best.as_ref().is_none_or(|b| rank > b.0) {
            best = Some((rank, vma, page_addr, page));
        }
    }
    match best {
        Some((rank, vma, page_addr, page)) if rank > 1 || copies == 1 => return Ok((vma, page_addr, page)),
        Some(_) => {
            return Err(Refused::Kept(
                EBUSY,
                "several private copies of the file page, none with the page or at the address PATCH wrote; nothing written",
            ))
        }
        None => {}
    }
    Err(match (mapped, refused, error) {
        (_, Some(why), _) => Refused::Kept(EACCES, why),
        (_, None, Some(e)) => Refused::Kept(e, "cannot get the page"),
        (true, None, None) => Refused::Gone { result: Ok(()), why: "page is no longer anonymous: already undone" },
        (false, None, None) => {
            Refused::Gone { result: Err(sys::enxio()), why: "the patched file page is no longer mapped in the target; nothing written" }
        }
    })
}

/// RESTORE `handle` (any opener may restore any patch).
pub(crate) fn restore(hp: &Arc<Hugepoke>, handle: u64) -> Result {
    let unknown = || {
        let ev = Event::new(Step::Restore).handle(handle as u32);
        hp.journal.fail(ev, ENOENT, "no such patch (unknown or already restored)")
    };
    let target = hp.registry.lock().target_of(handle).ok_or_else(unknown)?;
    let mut state = target.state.lock();
    restore_handle(hp, &target, &mut state, handle, Closing::No).unwrap_or_else(|| Err(unknown()))
}

/// RESTORE every site of `handle`, with its target locked: a single patch
/// here, a batch in `batch`.  None if the handle has no site here.
pub(crate) fn restore_handle(hp: &Arc<Hugepoke>, target: &Arc<Target>, state: &mut TargetState, handle: u64, closing: Closing) -> Option<Result> {
    match state.patches.count(handle) {
        0 => None,
        1 => {
            let site = state.patches.sites_of_handle(handle).next().copied()?;
            Some(restore_and_settle(hp, target, state, &site, closing))
        }
        _ => Some(batch::restore_batch(hp, target, state, handle, closing)),
    }
}

/// Who is restoring: an ioctl, or the cleanup when a file closes or the
/// module unloads (which cannot hand a refusal back to anyone).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closing {
    No,
    /// The owner closed its file: a patch that cannot be restored now is
    /// kept, as persistent (anyone may RESTORE it later; unload will).
    File,
    /// The module unloads: a patch that cannot be restored is abandoned.
    Module,
}

/// RESTORE one patch of a locked target and update the tables: forget the
/// patch if it was restored or is gone, keep it otherwise; queue the
/// collapse when the last patch of a 2 MiB range went.
fn restore_and_settle(hp: &Arc<Hugepoke>, target: &Arc<Target>, state: &mut TargetState, site: &Site, closing: Closing) -> Result {
    let ev = |step| Event::new(step).pid(site.pid).addr(site.addr).handle(site.handle as u32);
    hp.journal.record(ev(Step::Restore));
    let outcome = match target.mm_user() {
        None => Err(Refused::Gone { result: Ok(()), why: "target process is gone" }),
        // The site itself is still in the table.
        Some(mm) => restore_site(hp, &mm, site, state.patches.on_page(site.page_key()) <= 1),
    };
    let (result, restored) = match outcome {
        Ok(restored) => (Ok(()), Some(restored)),
        Err(Refused::Gone { result, why }) => {
            match result {
                Ok(()) => hp.journal.record(ev(Step::Restored).note(why)),
                Err(e) => hp.journal.record(ev(Step::Restored).error(e, why)),
            };
            (result, None)
        }
        Err(Refused::Kept(e, why)) => {
            // What happens to the patch first, then why (the newest failure
            // in `events` is the reason).
            let fate = match closing {
                Closing::No => "patch kept; RESTORE may be retried",
                Closing::File => "its file closed: patch kept as persistent",
                Closing::Module => "module unloading: patch abandoned",
            };
            hp.journal.record(ev(Step::Restore).error(e, fate));
            hp.journal.record(ev(Step::RestoreBytes).error(e, why));
            match closing {
                Closing::No => return Err(e),
                Closing::File => {
                    state.patches.disown(site.handle);
                    let left = hp.registry.lock().disown(site.handle);
                    drop(left);
                    return Err(e);
                }
                Closing::Module => (Err(e), None),
            }
        }
    };
    // Restored, gone or abandoned: forget it, then decide about the range
    // without it.  File and target references are dropped after the locks.
    let patch = state.patches.remove(site.handle, site.index);
    if let Some(restored) = restored {
        collapse_after_restore(hp, target, state, site, &restored);
        hp.journal.record(ev(Step::Restored));
    }
    let retired = if state.idle() { hp.registry.lock().retire(target, state) } else { None };
    let handle = hp.registry.lock().forget_handle(site.handle);
    drop((patch, retired, handle));
    result
}

/// Restore every patch `owner` made (every patch for `None`), as `closing`
/// says.  Runs in a work item (see [`restore_owned`]).
fn restore_all(hp: &Arc<Hugepoke>, owner: Owner, closing: Closing) {
    // Only the targets this owner patched: one busy elsewhere (a PATCH
    // waiting on a slow fault) must not hold up this file's close.
    let no_memory = || {
        let why = "no memory to list the patches: left in place (RESTORE by handle, or unload, restores them)";
        hp.journal.record(Event::new(Step::Restore).error(ENOMEM, why));
    };
    let Ok(targets) = hp.registry.lock().targets_of(owner) else { return no_memory() };
    for target in targets.iter() {
        let mut state = target.state.lock();
        let mut handles = KVec::new();
        if state.patches.handles_of(owner, &mut handles).is_err() {
            no_memory();
            continue;
        }
        for handle in handles {
            let _ = restore_handle(hp, target, &mut state, handle, closing);
        }
    }
}

/// A restore of many patches, run by hugepoke's workqueue so that a fatal
/// signal pending for the closing task cannot cut GUP short (EINTR).
#[pin_data]
struct RestoreWork {
    hugepoke: Arc<Hugepoke>,
    owner: Owner,
    closing: Closing,
    _live: Live,
    #[pin]
    done: Completion,
    #[pin]
    work: Work<RestoreWork>,
}

impl_has_work! {
    impl HasWork<Self> for RestoreWork { self.work }
}

impl WorkItem for RestoreWork {
    type Pointer = Arc<RestoreWork>;

    fn run(this: Arc<RestoreWork>) {
        restore_all(&this.hugepoke, this.owner, this.closing);
        this.done.complete_all();
    }
}

/// Restore what `owner` made (everything for `None`) from a work item, and
/// wait for it.
pub(crate) fn restore_owned(hp: &Arc<Hugepoke>, owner: Owner, closing: Closing) {
    let work = Arc::pin_init(
        pin_init!(RestoreWork {
            hugepoke: hp.clone(),
            owner,
            closing,
            _live: Live::new(&live::WORKS),
            done <- Completion::new(),
            work <- new_work!("hugepoke::restore"),
        }),
        GFP_KERNEL,
    );
    match work {
        Ok(work) => {
            let _ = hp.workqueue.queue().enqueue(work.clone());
            work.done.wait_for_completion();
        }
        // No memory for the work: do it here, as well as we can.
        Err(_) => restore_all(hp, owner, closing),
    }
}

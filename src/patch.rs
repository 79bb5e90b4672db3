// SPDX-License-Identifier: GPL-2.0

//! PATCH and RESTORE: the steps of the THP-aware uprobe series, as
//! `uprobe_write()`/`__uprobe_write()` take them in 7.2, for one target at a
//! time, each step journaled.
//!
//! All patches live in one [`PatchTable`] behind a mutex that PATCH, RESTORE
//! and the collapse work hold for their whole run (lock order: table, then
//! the target's mmap lock, then its page-table lock).  That serializes the
//! decisions that span several patches: "last patch on this page", "no
//! patch left in this 2 MiB range", "overlapping ranges".

use core::fmt;
use kernel::{
    mm::{virt::VmaRef, Mm, MmWithUser, MmapReadGuard},
    prelude::*,
    sync::aref::ARef,
};

use crate::{
    journal::{Event, Step},
    sys::{self, Mapping, PageRef, Process, PAGE_MASK, PAGE_SIZE, PMD_MASK},
    uapi::{self, PatchArgs, MAX_BYTES},
    Hugepoke,
};

/// How often PATCH/RESTORE retry when the page table changed under them.
const MAX_TRIES: u32 = 4;

/// Who owns a patch: the open file that made it, or nobody (persistent).
pub(crate) type Owner = Option<u64>;

/// One live patch.
pub(crate) struct Patch {
    pub(crate) handle: u64,
    pub(crate) owner: Owner,
    /// Target tgid as the patcher named it.
    pub(crate) pid: i32,
    /// The target's address space, by `mm_count` only: it does not keep the
    /// process's memory alive.
    pub(crate) mm: ARef<Mm>,
    pub(crate) addr: usize,
    pub(crate) len: usize,
    pub(crate) flags: u32,
    pub(crate) bytes: [u8; MAX_BYTES],
    pub(crate) orig: [u8; MAX_BYTES],
    /// The anonymous page the bytes were written to.
    pub(crate) pfn: usize,
    /// Is the page-cache folio behind the page PMD-mappable?
    pub(crate) pmd_mappable: bool,
}

impl Patch {
    fn mm_id(&self) -> usize {
        sys::mm_id(&self.mm)
    }

    fn page(&self) -> usize {
        self.addr & PAGE_MASK
    }

    fn offset(&self) -> usize {
        self.addr & !PAGE_MASK
    }

    fn event(&self, step: Step) -> Event {
        Event::new(step).pid(self.pid).addr(self.addr).handle(self.handle as u32)
    }

    /// Has the target process gone away?
    pub(crate) fn target_gone(&self) -> bool {
        self.mm.mmget_not_zero().is_none()
    }
}

/// All live patches.
pub(crate) struct PatchTable {
    pub(crate) patches: KVec<Patch>,
    next_handle: u64,
    /// Set at module unload: no new patches, no new collapse work.
    pub(crate) closing: bool,
}

impl PatchTable {
    pub(crate) fn new() -> Self {
        Self { patches: KVec::new(), next_handle: 1, closing: false }
    }

    fn position(&self, handle: u64) -> Option<usize> {
        self.patches.iter().position(|p| p.handle == handle)
    }

    pub(crate) fn get(&self, handle: u64) -> Option<&Patch> {
        self.patches.iter().find(|p| p.handle == handle)
    }

    fn overlaps(&self, mm_id: usize, addr: usize, len: usize) -> bool {
        self.patches
            .iter()
            .any(|p| p.mm_id() == mm_id && p.addr < addr + len && addr < p.addr + p.len)
    }

    fn any_on_page(&self, mm_id: usize, page: usize) -> bool {
        self.patches.iter().any(|p| p.mm_id() == mm_id && p.page() == page)
    }

    pub(crate) fn any_in_pmd_range(&self, mm_id: usize, haddr: usize) -> bool {
        self.patches.iter().any(|p| p.mm_id() == mm_id && p.addr & PMD_MASK == haddr)
    }

    /// Handles of the patches `owner` made (all patches for `None`).
    pub(crate) fn handles_of(&self, owner: Owner) -> Result<KVec<u64>> {
        let mut v = KVec::new();
        for p in self.patches.iter().filter(|p| owner.is_none() || p.owner == owner) {
            v.push(p.handle, GFP_KERNEL)?;
        }
        Ok(v)
    }

    /// `patches` in debugfs.
    pub(crate) fn write(&self, f: &mut impl fmt::Write) -> fmt::Result {
        writeln!(f, "# handle pid addr len state pfn owner pmd_mappable bytes orig")?;
        for p in self.patches.iter() {
            write!(
                f,
                "{} {} {:#x} {} {} {:#x} ",
                p.handle,
                p.pid,
                p.addr,
                p.len,
                if p.target_gone() { "gone" } else { "live" },
                p.pfn
            )?;
            match p.owner {
                Some(o) => write!(f, "file:{o} ")?,
                None => write!(f, "persistent ")?,
            }
            write!(f, "{} ", if p.pmd_mappable { "yes" } else { "no" })?;
            write_hex(f, &p.bytes[..p.len])?;
            write!(f, " ")?;
            write_hex(f, &p.orig[..p.len])?;
            writeln!(f)?;
        }
        Ok(())
    }
}

pub(crate) fn write_hex(f: &mut impl fmt::Write, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// The checks PATCH makes on the VMA: what uprobes may patch, and no more.
fn check_vma(info: &sys::VmaInfo) -> Result<(), (Error, &'static str)> {
    use kernel::bindings::{VM_EXEC, VM_HUGETLB, VM_IO, VM_MAYWRITE, VM_PFNMAP, VM_SHARED, VM_WRITE};
    let has = |flag| info.flags & flag as usize != 0;
    if has(VM_HUGETLB) || has(VM_IO) || has(VM_PFNMAP) {
        return Err((EINVAL, "hugetlb, VM_IO or VM_PFNMAP mapping"));
    }
    if !info.file_backed {
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
    let len = args.len as usize;
    if len == 0 || len > MAX_BYTES {
        return Err((EINVAL, "length must be 1 to 16 bytes"));
    }
    // The range must not wrap: `addr + len` is computed below.
    let Some(addr) = usize::try_from(args.addr).ok().filter(|a| a.checked_add(len).is_some()) else {
        return Err((EFAULT, "address out of range"));
    };
    if (addr & !PAGE_MASK) + len > PAGE_SIZE {
        return Err((EINVAL, "range crosses a page boundary"));
    }
    Ok(())
}

/// PATCH: write `args.bytes` into the target's text at `args.addr`.
pub(crate) fn patch(hp: &Hugepoke, owner: u64, args: &PatchArgs) -> Result<u64> {
    let ev = |step| Event::new(step).pid(args.pid).addr(args.addr as usize);
    hp.journal.record(ev(Step::Patch));
    check_patch_args(args).map_err(|(e, why)| hp.journal.fail(ev(Step::Patch), e, why))?;
    let addr = args.addr as usize;
    let len = args.len as usize;
    let offset = addr & !PAGE_MASK;
    let page_addr = addr & PAGE_MASK;

    // Step 1: pid → task → mm; the task may be exiting.
    let target = Process::find(args.pid)
        .ok_or_else(|| hp.journal.fail(ev(Step::ResolveTarget), ESRCH, "no such process"))?;
    if target.is_kernel_thread() {
        return Err(hp.journal.fail(ev(Step::ResolveTarget), EINVAL, "a kernel thread has no user text"));
    }
    if !target.caller_may_attach() {
        return Err(hp.journal.fail(ev(Step::ResolveTarget), EPERM, "caller may not ptrace-attach to the target"));
    }
    let mm = target
        .mm()
        .ok_or_else(|| hp.journal.fail(ev(Step::ResolveTarget), ESRCH, "process has no address space (exiting or zombie)"))?;
    hp.journal.record(ev(Step::ResolveTarget));

    let mut table = hp.patches.lock();
    if table.closing {
        return Err(hp.journal.fail(ev(Step::Patch), ENODEV, "module is unloading"));
    }
    let mm_id = sys::mm_id(&mm);
    if table.overlaps(mm_id, addr, len) {
        return Err(hp.journal.fail(ev(Step::CheckVma), EBUSY, "range overlaps a live patch"));
    }
    let handle = table.next_handle;
    // Room for the record first: once the bytes are written, nothing may fail.
    table
        .patches
        .reserve(1, GFP_KERNEL)
        .map_err(|_| hp.journal.fail(ev(Step::Patch), ENOMEM, "no memory to record a patch"))?;

    let guard = mm.mmap_read_lock();
    let vma = guard
        .vma_lookup(addr)
        .ok_or_else(|| hp.journal.fail(ev(Step::CheckVma), EFAULT, "address is not mapped"))?;
    let info = sys::vma_info(vma);
    check_vma(&info).map_err(|(e, why)| hp.journal.fail(ev(Step::CheckVma), e, why))?;
    hp.journal.record(ev(Step::CheckVma));

    // Before anything changes: the expected bytes, read through a plain
    // (non-COWing) GUP of whatever page is mapped there now.
    if args.flags & uapi::PATCH_EXPECT != 0 {
        let page = sys::get_user_page(&mm, &guard, page_addr, sys::FOLL_FORCE)
            .map_err(|e| hp.journal.fail(ev(Step::CheckExpected), e, "cannot read the target page"))?;
        let mut now = [0u8; MAX_BYTES];
        page.read(offset, &mut now[..len]);
        if now[..len] != args.expect[..len] {
            return Err(hp.journal.fail(ev(Step::CheckExpected), sys::eilseq(), "bytes at the address are not the expected ones"));
        }
        hp.journal.record(ev(Step::CheckExpected).page(page.pfn(), page.folio_order()));
    }

    let before = sys::mapping_of(vma, page_addr);
    let mut orig = [0u8; MAX_BYTES];
    let page = write_bytes(hp, &mm, &guard, vma, args, before, &mut orig)?;
    let pfn = page.pfn();
    drop(page);
    // The COW put the new folio in this CPU's LRU batch, with a reference
    // that would make RESTORE think the page is pinned.
    sys::lru_add_drain();

    let pmd_mappable = sys::page_cache_page(vma, page_addr).is_some_and(|c| c.pmd_mappable());
    let patch = Patch {
        handle,
        owner: if args.flags & uapi::PATCH_PERSIST != 0 { None } else { Some(owner) },
        pid: target.tgid(),
        mm: ARef::from(&**mm),
        addr,
        len,
        flags: args.flags,
        bytes: args.bytes,
        orig,
        pfn,
        pmd_mappable,
    };
    drop(guard);
    // Cannot fail: reserved above, under the same lock.
    let _ = table.patches.push_within_capacity(patch);
    table.next_handle += 1;
    hp.journal.record(
        ev(Step::Patched)
            .handle(handle as u32)
            .page(pfn, 0)
            .note(if pmd_mappable { "page-cache folio is PMD-mappable" } else { "page-cache folio is not PMD-mappable" }),
    );
    Ok(handle)
}

/// Steps 2–4 of PATCH: split the PMD, break COW, and write the bytes into
/// the exclusive anonymous page under the PT lock.  Returns the page.
fn write_bytes(
    hp: &Hugepoke,
    mm: &MmWithUser,
    guard: &MmapReadGuard<'_>,
    vma: &VmaRef,
    args: &PatchArgs,
    before: Mapping,
    orig: &mut [u8; MAX_BYTES],
) -> Result<PageRef> {
    let ev = |step| Event::new(step).pid(args.pid).addr(args.addr as usize);
    let addr = args.addr as usize;
    let (len, offset, page_addr) = (args.len as usize, addr & !PAGE_MASK, addr & PAGE_MASK);
    let gup_flags = sys::FOLL_FORCE | sys::FOLL_WRITE | sys::FOLL_SPLIT_PMD;

    for attempt in 0..MAX_TRIES {
        let page = sys::get_user_page(mm, guard, page_addr, gup_flags)
            .map_err(|e| hp.journal.fail(ev(Step::SplitPmd), e, "get_user_pages_remote failed"))?;
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
                return Err(hp.journal.fail(ev(Step::WriteBytes), EBUSY, "PTE is userfaultfd write-protected"));
            }
            if !pte.anon_exclusive() {
                drop(pte);
                hp.journal.record(ev(Step::WriteBytes).error(EAGAIN, "page may be shared; retrying COW"));
                continue;
            }
        }
        // Unmap and flush, so no CPU executes the page half-written.
        pte.unmap();
        pte.rewrite(offset, &args.bytes[..len], &mut orig[..len]);
        pte.remap_dirty();
        drop(pte);
        hp.journal.record(ev(Step::WriteBytes).page(page.pfn(), page.folio_order()));
        return Ok(page);
    }
    Err(hp.journal.fail(ev(Step::WriteBytes), EAGAIN, "page table kept changing"))
}

/// What RESTORE did with the anonymous page.
enum Outcome {
    /// Zapped: the page-cache page faults back in.
    Zapped { pmd_mappable: bool },
    /// Kept, for the reason given.
    Kept,
    /// There was nothing to restore (process, mapping or page gone).
    Gone,
}

/// RESTORE `handle` (any opener may restore any patch).
pub(crate) fn restore(hp: &Hugepoke, handle: u64) -> Result {
    let mut table = hp.patches.lock();
    let Some(i) = table.position(handle) else {
        let ev = Event::new(Step::Restore).handle(handle as u32);
        return Err(hp.journal.fail(ev, ENOENT, "no such patch (unknown or already restored)"));
    };
    let patch = table.patches.remove(i)?;
    restore_patch(hp, &mut table, patch);
    Ok(())
}

/// Restore every patch `owner` made (every patch for `None`).
pub(crate) fn restore_all(hp: &Hugepoke, owner: Owner) {
    let mut table = hp.patches.lock();
    let Ok(handles) = table.handles_of(owner) else { return };
    for handle in handles {
        if let Some(i) = table.position(handle) {
            if let Ok(patch) = table.patches.remove(i) {
                restore_patch(hp, &mut table, patch);
            }
        }
    }
}

/// RESTORE, step by step.  The patch is already out of the table; whatever
/// happens, it is gone afterwards.
fn restore_patch(hp: &Hugepoke, table: &mut PatchTable, p: Patch) {
    hp.journal.record(p.event(Step::Restore));
    let Some(mm) = p.mm.mmget_not_zero() else {
        hp.journal.record(p.event(Step::Restored).note("target process is gone"));
        return;
    };
    let guard = mm.mmap_read_lock();
    let outcome = match guard.vma_lookup(p.addr) {
        Some(vma) if sys::vma_info(vma).file_backed => restore_bytes(hp, table, &mm, &guard, vma, &p),
        _ => {
            hp.journal.record(p.event(Step::RestoreBytes).note("mapping is gone; nothing to restore"));
            Outcome::Gone
        }
    };
    drop(guard);

    if let Outcome::Zapped { pmd_mappable: true } = outcome {
        let haddr = p.addr & PMD_MASK;
        if !table.any_in_pmd_range(p.mm_id(), haddr) {
            crate::collapse::queue_collapse(hp, table, &p, haddr);
        } else {
            hp.journal.record(p.event(Step::QueueCollapse).note("not yet: other patches in this 2 MiB range"));
        }
    }
    hp.journal.record(p.event(Step::Restored));
}

fn restore_bytes(
    hp: &Hugepoke,
    table: &PatchTable,
    mm: &MmWithUser,
    guard: &MmapReadGuard<'_>,
    vma: &VmaRef,
    p: &Patch,
) -> Outcome {
    let last_on_page = !table.any_on_page(p.mm_id(), p.page());
    // No FOLL_WRITE at first: if the anonymous page is gone, so is the patch.
    let mut gup_flags = sys::FOLL_FORCE;
    for _ in 0..MAX_TRIES {
        let page = match sys::get_user_page(mm, guard, p.page(), gup_flags) {
            Ok(page) => page,
            Err(e) => {
                hp.journal.record(p.event(Step::RestoreBytes).error(e, "cannot get the page"));
                return Outcome::Gone;
            }
        };
        if !page.is_anon() {
            hp.journal.record(p.event(Step::RestoreBytes).page(page.pfn(), page.folio_order()).note("page is no longer anonymous: already undone"));
            return Outcome::Gone;
        }
        if last_on_page && page.unexpected_refs() > 0 {
            // Maybe only another CPU's LRU batch; let it go before judging.
            sys::lru_add_drain_all();
        }
        // Zapping happens under the PT lock, where notifiers cannot sleep.
        let _invalidate = last_on_page.then(|| sys::InvalidateRange::start(mm, p.page()));
        let Some(mut pte) = sys::lock_pte(vma, p.page(), &page) else {
            hp.journal.record(p.event(Step::RestoreBytes).error(EAGAIN, "PTE changed after GUP; retrying"));
            continue;
        };
        // A page that may be shared — after fork(), with the child — must
        // not be written: break COW for this process first, as uprobes does.
        // The child keeps the patched copy it inherited.  (A uffd-wp bit set
        // since PATCH is kept: the PTE is set back as it was, plus dirty.)
        if !pte.writable() && !pte.anon_exclusive() {
            drop(pte);
            hp.journal.record(p.event(Step::RestoreBytes).page(page.pfn(), 0).error(EAGAIN, "page may be shared (forked child?); breaking COW first"));
            gup_flags = sys::FOLL_FORCE | sys::FOLL_WRITE | sys::FOLL_SPLIT_PMD;
            continue;
        }
        pte.unmap();
        let mut was = [0u8; MAX_BYTES];
        pte.rewrite(p.offset(), &p.orig[..p.len], &mut was[..p.len]);
        hp.journal.record(p.event(Step::RestoreBytes).page(page.pfn(), 0).note(if was[..p.len] == p.bytes[..p.len] {
            "original bytes written back"
        } else {
            "original bytes written back (the patched bytes had been changed)"
        }));

        // Zap only when the page-cache page would fault back in with exactly
        // this content, and nothing else may hold the anonymous page.
        let cache = sys::page_cache_page(vma, p.page());
        let keep = if !last_on_page {
            Some("other patches remain on this page")
        } else if pte.uffd_missing() {
            Some("userfaultfd missing mode is armed")
        } else if page.unexpected_refs() != 0 {
            Some("page has unexpected references (pinned or in a pipe)")
        } else {
            match &cache {
                None => Some("no page-cache page to fault back in"),
                Some(c) if !c.uptodate() => Some("page-cache page is not uptodate"),
                Some(c) if !c.identical_to(&page) => Some("page differs from the page-cache page"),
                Some(_) => None,
            }
        };
        return match (keep, cache) {
            (None, Some(c)) => {
                // Consumes the walk: the PT lock is dropped here.
                pte.zap(&page);
                hp.journal.record(p.event(Step::ZapAnonPage).page(page.pfn(), 0).note("PTE zapped; page-cache page faults back in"));
                hp.journal.record(p.event(Step::ZapAnonPage).page(c.pfn(), c.folio_order()).note("page-cache page to fault in"));
                Outcome::Zapped { pmd_mappable: c.pmd_mappable() }
            }
            (why, _) => {
                pte.remap_dirty();
                drop(pte);
                hp.journal.record(p.event(Step::KeepAnonPage).page(page.pfn(), 0).note(why.unwrap_or("")));
                Outcome::Kept
            }
        };
    }
    hp.journal.record(p.event(Step::RestoreBytes).error(EAGAIN, "page table kept changing; patch dropped"));
    Outcome::Gone
}

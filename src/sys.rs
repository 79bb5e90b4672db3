// SPDX-License-Identifier: GPL-2.0

//! The thin unsafe layer: every call into `bindings::` lives here, each with
//! the reason it is sound.  Everything above this module is safe Rust.
//!
//! The types here own exactly one kernel reference each and drop it in
//! `Drop`: [`Process`] a task, [`PageRef`] a folio (from GUP), [`CacheRef`]
//! a page-cache folio.  [`LockedPte`] is a `folio_walk` that holds the
//! page-table lock until it is dropped.

use core::ptr::NonNull;
use kernel::{
    bindings,
    mm::{virt::VmaRef, Mm, MmWithUser, MmapReadGuard},
    prelude::*,
    sync::aref::ARef,
    task::Task,
};

pub(crate) const PAGE_SIZE: usize = bindings::PAGE_SIZE;
pub(crate) const PAGE_MASK: usize = !(PAGE_SIZE - 1);
/// Size of the range one PMD maps (2 MiB on x86-64).
pub(crate) const PMD_SIZE: usize = PAGE_SIZE << 9;
pub(crate) const PMD_MASK: usize = !(PMD_SIZE - 1);

/// Thread-group id of the calling task, in its own pid namespace.
pub(crate) fn current_tgid() -> i32 {
    kernel::current!().tgid_nr_ns(None)
}

/// CLOCK_MONOTONIC in nanoseconds, comparable with userspace's
/// `clock_gettime(CLOCK_MONOTONIC)`.
pub(crate) fn ktime_ns() -> u64 {
    // SAFETY: no preconditions; NMI-safe and callable with spinlocks held.
    unsafe { bindings::ktime_get_mono_fast_ns() }
}

/// A process named by the caller, with a reference on its task.
pub(crate) struct Process {
    task: ARef<Task>,
}

impl Process {
    /// Look `pid` up in the caller's pid namespace.
    pub(crate) fn find(pid: i32) -> Option<Self> {
        if pid <= 0 {
            return None;
        }
        // SAFETY: `find_get_pid` takes any number; it returns a counted
        // `struct pid` or null.
        let spid = unsafe { bindings::find_get_pid(pid) };
        if spid.is_null() {
            return None;
        }
        // SAFETY: `spid` is a valid, counted pid; `get_pid_task` returns a
        // counted task or null.  We drop our pid reference right after.
        let task = unsafe {
            let task = bindings::get_pid_task(spid, bindings::pid_type_PIDTYPE_PID);
            bindings::put_pid(spid);
            task
        };
        let task = NonNull::new(task)?.cast::<Task>();
        // SAFETY: `get_pid_task` gave us one reference, which the `ARef`
        // now owns; `Task` is a transparent wrapper of `task_struct`.
        Some(Self { task: unsafe { ARef::from_raw(task) } })
    }

    /// Its tgid, as the caller sees it.
    pub(crate) fn tgid(&self) -> i32 {
        self.task.tgid_nr_ns(None)
    }

    pub(crate) fn is_kernel_thread(&self) -> bool {
        // SAFETY: the task is valid while we hold our reference; `flags` is
        // a plain word that PF_KTHREAD never leaves once set.
        let flags = unsafe { (*self.task.as_ptr()).flags };
        flags & bindings::PF_KTHREAD != 0
    }

    /// May the caller ptrace-attach to it, with its real credentials (the
    /// check `process_vm_writev()` and `/proc/PID/mem` make)?
    pub(crate) fn caller_may_attach(&self) -> bool {
        // SAFETY: the task is valid while we hold our reference;
        // `ptrace_may_access` takes `task_lock` itself.
        unsafe {
            bindings::ptrace_may_access(
                self.task.as_ptr(),
                bindings::PTRACE_MODE_ATTACH_REALCREDS,
            )
        }
    }

    /// Its address space, with a user reference (`mm_users`), or `None` for
    /// a zombie, an exiting process or a kernel thread.
    pub(crate) fn mm(&self) -> Option<ARef<MmWithUser>> {
        // SAFETY: the task is valid; `get_task_mm` returns an mm with
        // `mm_users` raised, or null.
        let mm = unsafe { bindings::get_task_mm(self.task.as_ptr()) };
        let mm = NonNull::new(mm)?.cast::<MmWithUser>();
        // SAFETY: the `ARef` takes over the `mm_users` reference (its drop
        // is `mmput`); `MmWithUser` is a transparent `mm_struct`.
        Some(unsafe { ARef::from_raw(mm) })
    }
}

/// Identity of an address space, for comparing patches; never dereferenced.
pub(crate) fn mm_id(mm: &Mm) -> usize {
    mm.as_raw() as usize
}

/// What hugepoke needs to know of a VMA.
pub(crate) struct VmaInfo {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) flags: usize,
    pub(crate) file_backed: bool,
    pub(crate) uffd_armed: bool,
}

pub(crate) fn vma_info(vma: &VmaRef) -> VmaInfo {
    let raw = vma.as_ptr();
    // SAFETY: the VMA is valid while the mmap lock that gave us `vma` is
    // held; `vm_file` is stable under it.
    let file_backed = unsafe { !(*raw).vm_file.is_null() };
    // SAFETY: as above.
    let uffd_armed = unsafe { bindings::userfaultfd_armed(raw) };
    VmaInfo {
        start: vma.start(),
        end: vma.end(),
        flags: vma.flags() as usize,
        file_backed,
        uffd_armed,
    }
}

/// The page-cache index of `addr` in the file `vma` maps.
fn linear_page_index(vma: &VmaRef, addr: usize) -> usize {
    // SAFETY: the VMA is valid under the mmap lock; `vm_pgoff` is stable.
    let pgoff = unsafe { (*vma.as_ptr()).vm_pgoff } as usize;
    ((addr - vma.start()) >> bindings::PAGE_SHIFT) + pgoff
}

/// `FOLL_*` flags for [`get_user_page`].
pub(crate) const FOLL_FORCE: u32 = bindings::FOLL_FORCE;
pub(crate) const FOLL_WRITE: u32 = bindings::FOLL_WRITE;
pub(crate) const FOLL_SPLIT_PMD: u32 = bindings::FOLL_SPLIT_PMD;

/// One page and a reference on its folio, from GUP.
pub(crate) struct PageRef {
    page: NonNull<bindings::page>,
}

// SAFETY: a folio reference may be dropped from any task.
unsafe impl Send for PageRef {}

/// `get_user_pages_remote()` of the one page at `addr`.
pub(crate) fn get_user_page(
    mm: &MmWithUser,
    _locked: &MmapReadGuard<'_>,
    addr: usize,
    gup_flags: u32,
) -> Result<PageRef> {
    let mut page: *mut bindings::page = core::ptr::null_mut();
    // SAFETY: `mm` has a user reference and its mmap lock is held for read
    // (`_locked`); `page` has room for the one page asked for.
    let ret = unsafe {
        bindings::get_user_pages_remote(
            mm.as_raw(),
            addr as _,
            1,
            gup_flags,
            &mut page,
            core::ptr::null_mut(),
        )
    };
    if ret < 0 {
        return Err(Error::from_errno(ret as i32));
    }
    match NonNull::new(page) {
        Some(page) if ret == 1 => Ok(PageRef { page }),
        _ => Err(EFAULT),
    }
}

impl PageRef {
    fn folio(&self) -> *mut bindings::folio {
        // SAFETY: we hold a reference on the page's folio.
        unsafe { bindings::page_folio(self.page.as_ptr()) }
    }

    pub(crate) fn pfn(&self) -> usize {
        // SAFETY: the page is valid while we hold the folio reference.
        unsafe { bindings::page_to_pfn(self.page.as_ptr()) as usize }
    }

    pub(crate) fn is_anon(&self) -> bool {
        // SAFETY: as above.
        unsafe {
            bindings::folio_test_anon(self.folio()) && !bindings::folio_is_zone_device(self.folio())
        }
    }

    pub(crate) fn folio_order(&self) -> u32 {
        // SAFETY: as above.
        unsafe { bindings::folio_order(self.folio()) }
    }

    /// References beyond the ones its mappings, the page cache and our GUP
    /// hold: a pin, a pipe, an LRU batch…
    pub(crate) fn unexpected_refs(&self) -> i32 {
        // SAFETY: as above.
        unsafe {
            bindings::folio_ref_count(self.folio())
                - bindings::folio_expected_ref_count(self.folio())
                - 1
        }
    }

    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) {
        read_page(self.page, offset, out)
    }
}

impl Drop for PageRef {
    fn drop(&mut self) {
        // SAFETY: we own one reference on the folio.
        unsafe { bindings::folio_put(self.folio()) };
    }
}

fn read_page(page: NonNull<bindings::page>, offset: usize, out: &mut [u8]) {
    assert!(offset + out.len() <= PAGE_SIZE);
    // SAFETY: the caller holds a reference on the page, so it stays
    // allocated; the copy stays inside the one mapped page.
    unsafe {
        let kaddr = bindings::kmap_local_page(page.as_ptr()).cast::<u8>();
        core::ptr::copy_nonoverlapping(kaddr.add(offset), out.as_mut_ptr(), out.len());
        bindings::kunmap_local(kaddr.cast());
    }
}

/// The page-cache page behind `addr` of a file mapping, with a reference.
pub(crate) struct CacheRef {
    folio: NonNull<bindings::folio>,
    page: NonNull<bindings::page>,
}

// SAFETY: a folio reference may be dropped from any task.
unsafe impl Send for CacheRef {}

/// Look up (never read in) the page-cache folio behind `addr` of `vma`.
pub(crate) fn page_cache_page(vma: &VmaRef, addr: usize) -> Option<CacheRef> {
    let index = linear_page_index(vma, addr);
    // SAFETY: the VMA is file-backed (checked by the caller through
    // `VmaInfo`) and valid under the mmap lock, so `vm_file->f_mapping` is
    // valid; `filemap_get_folio` returns a counted folio or an ERR_PTR.
    let folio = unsafe {
        let file = (*vma.as_ptr()).vm_file;
        if file.is_null() {
            return None;
        }
        bindings::filemap_get_folio((*file).f_mapping, index as _)
    };
    if folio.is_null() || kernel::error::from_err_ptr(folio).is_err() {
        return None;
    }
    // SAFETY: `folio` is valid and counted, and contains `index`.
    let page = unsafe { bindings::folio_file_page(folio, index as _) };
    Some(CacheRef {
        folio: NonNull::new(folio)?,
        page: NonNull::new(page)?,
    })
}

impl CacheRef {
    pub(crate) fn pfn(&self) -> usize {
        // SAFETY: we hold a reference on the folio.
        unsafe { bindings::page_to_pfn(self.page.as_ptr()) as usize }
    }

    pub(crate) fn folio_order(&self) -> u32 {
        // SAFETY: as above.
        unsafe { bindings::folio_order(self.folio.as_ptr()) }
    }

    pub(crate) fn pmd_mappable(&self) -> bool {
        // SAFETY: as above.
        unsafe { bindings::folio_test_pmd_mappable(self.folio.as_ptr()) }
    }

    pub(crate) fn uptodate(&self) -> bool {
        // SAFETY: as above.
        unsafe { bindings::folio_test_uptodate(self.folio.as_ptr()) }
    }

    /// Is the whole page byte-for-byte equal to `page`?
    pub(crate) fn identical_to(&self, page: &PageRef) -> bool {
        // SAFETY: we hold references on both pages; kmap_local mappings are
        // released in reverse order.
        unsafe {
            let a = bindings::kmap_local_page(self.page.as_ptr()).cast::<u8>();
            let b = bindings::kmap_local_page(page.page.as_ptr()).cast::<u8>();
            let same = core::slice::from_raw_parts(a, PAGE_SIZE)
                == core::slice::from_raw_parts(b, PAGE_SIZE);
            bindings::kunmap_local(b.cast());
            bindings::kunmap_local(a.cast());
            same
        }
    }
}

impl Drop for CacheRef {
    fn drop(&mut self) {
        // SAFETY: we own one reference on the folio.
        unsafe { bindings::folio_put(self.folio.as_ptr()) };
    }
}

/// How the page tables map an address right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Mapped by a PTE, to the page with this PFN.
    Pte(usize),
    /// Mapped by a huge PMD; the PFN of the page at the address.
    Pmd(usize),
    /// Not mapped (no PTE, or no page table at all).
    None,
}

/// Walk the page tables once and report how `addr` is mapped.
pub(crate) fn mapping_of(vma: &VmaRef, addr: usize) -> Mapping {
    let mut fw = bindings::folio_walk::default();
    // SAFETY: the VMA is valid under the mmap lock held by our caller; on
    // success the walk holds the PT lock until `folio_walk_end`.
    unsafe {
        if bindings::folio_walk_start(&mut fw, vma.as_ptr(), addr as _, 0).is_null() {
            return Mapping::None;
        }
        let pfn = bindings::page_to_pfn(fw.page) as usize;
        let level = fw.level;
        bindings::folio_walk_end(&mut fw, vma.as_ptr());
        match level {
            bindings::folio_walk_level_FW_LEVEL_PTE => Mapping::Pte(pfn),
            _ => Mapping::Pmd(pfn),
        }
    }
}

/// The PTE that maps one page, with the page-table lock held until drop.
pub(crate) struct LockedPte<'a> {
    fw: bindings::folio_walk,
    vma: &'a VmaRef,
    addr: usize,
    /// The PTE as it was before `unmap`, while it is cleared.
    cleared: Option<bindings::pte_t>,
}

/// Walk to `addr` and lock its page table, if `addr` is mapped by a PTE to
/// exactly `page` (otherwise the walk is undone and `None` returned).
pub(crate) fn lock_pte<'a>(vma: &'a VmaRef, addr: usize, page: &PageRef) -> Option<LockedPte<'a>> {
    let mut fw = bindings::folio_walk::default();
    // SAFETY: the VMA is valid under the mmap lock held by our caller.
    let folio = unsafe { bindings::folio_walk_start(&mut fw, vma.as_ptr(), addr as _, 0) };
    if folio.is_null() {
        return None;
    }
    let locked = LockedPte { fw, vma, addr: addr & PAGE_MASK, cleared: None };
    if locked.fw.level != bindings::folio_walk_level_FW_LEVEL_PTE || locked.fw.page != page.page.as_ptr() {
        return None; // Dropping `locked` ends the walk.
    }
    Some(locked)
}

impl LockedPte<'_> {
    fn pte(&self) -> bindings::pte_t {
        // SAFETY: a PTE-level walk fills `fw.pte` (the union's PTE member).
        unsafe { self.fw.__bindgen_anon_2.pte }
    }

    pub(crate) fn writable(&self) -> bool {
        // SAFETY: `pte_write` only inspects the value.
        unsafe { bindings::pte_write(self.pte()) != 0 }
    }

    pub(crate) fn uffd_wp(&self) -> bool {
        // SAFETY: the VMA is valid; the helper only inspects the values.
        unsafe { bindings::userfaultfd_pte_wp(self.vma.as_ptr(), self.pte()) }
    }

    /// Is the mapped page marked exclusive to this mapping (so that no
    /// GUP-fast pin can race with us changing it)?
    pub(crate) fn anon_exclusive(&self) -> bool {
        // SAFETY: the page is valid: it is mapped and we hold the PT lock.
        unsafe { bindings::PageAnonExclusive(self.fw.page) }
    }

    pub(crate) fn uffd_missing(&self) -> bool {
        // SAFETY: the VMA is valid under the mmap lock.
        unsafe { bindings::userfaultfd_missing(self.vma.as_ptr()) }
    }

    /// Clear the PTE and flush the TLB, so that no CPU can execute the page
    /// while it is being rewritten.
    pub(crate) fn unmap(&mut self) {
        if self.cleared.is_some() {
            return;
        }
        let vma = self.vma.as_ptr();
        // SAFETY: we hold the PT lock for this PTE; `ptep` points into the
        // locked page table; the cleared value is kept to be set back.
        let old = unsafe {
            bindings::flush_cache_page(vma, self.addr as _, bindings::pte_pfn(self.pte()));
            bindings::ptep_clear_flush(vma, self.addr as _, self.fw.__bindgen_anon_1.ptep)
        };
        self.cleared = Some(old);
    }

    /// Copy `bytes` into the (unmapped) page at `offset`, returning what was
    /// there.
    pub(crate) fn rewrite(&mut self, offset: usize, bytes: &[u8], old: &mut [u8]) {
        assert!(self.cleared.is_some(), "rewrite of a mapped PTE");
        assert!(offset + bytes.len() <= PAGE_SIZE && old.len() == bytes.len());
        // SAFETY: the page stays valid (mapped, PT lock held); no CPU maps it
        // now that the PTE is cleared and flushed; the copy stays in the page.
        unsafe {
            let kaddr = bindings::kmap_local_page(self.fw.page).cast::<u8>();
            core::ptr::copy_nonoverlapping(kaddr.add(offset), old.as_mut_ptr(), old.len());
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), kaddr.add(offset), bytes.len());
            bindings::kunmap_local(kaddr.cast());
        }
    }

    /// Drop the cleared PTE's anonymous page from this mapping for good, so
    /// that the next access faults the page-cache page back in.  `page` is
    /// the GUP reference the caller still holds (and drops later).
    pub(crate) fn zap(mut self, page: &PageRef) {
        assert!(self.cleared.take().is_some(), "zap of a mapped PTE");
        let vma = self.vma.as_ptr();
        // SAFETY: the PTE is cleared and the PT lock held, so this mapping's
        // rmap and reference are ours to drop, exactly once; the caller's
        // GUP reference keeps the folio alive past `folio_put`.
        unsafe {
            bindings::dec_mm_counter((*vma).vm_mm, bindings::MM_ANONPAGES as _);
            bindings::folio_remove_rmap_ptes(page.folio(), self.fw.page, 1, vma);
            bindings::folio_put(page.folio());
        }
    }

    /// Set the cleared PTE back, marked dirty (we modified the page; soft-dirty
    /// follows pte_mkdirty).  Also what dropping a cleared `LockedPte` does.
    pub(crate) fn remap_dirty(&mut self) {
        if let Some(old) = self.cleared.take() {
            // SAFETY: we hold the PT lock and the PTE is clear; the barrier
            // orders our writes to the page before the PTE that exposes it.
            unsafe {
                bindings::smp_wmb();
                bindings::set_pte_at(
                    (*self.vma.as_ptr()).vm_mm,
                    self.addr as _,
                    self.fw.__bindgen_anon_1.ptep,
                    bindings::pte_mkdirty(old),
                );
            }
        }
    }
}

impl Drop for LockedPte<'_> {
    fn drop(&mut self) {
        self.remap_dirty();
        // SAFETY: the walk succeeded and holds the PT lock; end it once.
        unsafe { bindings::folio_walk_end(&mut self.fw, self.vma.as_ptr()) };
    }
}

/// An mmu-notifier invalidation of one page, started before the PT lock is
/// taken (it may sleep) and ended on drop.
pub(crate) struct InvalidateRange {
    range: bindings::mmu_notifier_range,
}

impl InvalidateRange {
    pub(crate) fn start(mm: &MmWithUser, addr: usize) -> Self {
        let mut range = bindings::mmu_notifier_range::default();
        let addr = addr & PAGE_MASK;
        // SAFETY: `mm` is a live address space (user reference held);
        // `range` is initialized before start, ended exactly once in drop.
        unsafe {
            bindings::mmu_notifier_range_init(
                &mut range,
                bindings::mmu_notifier_event_MMU_NOTIFY_CLEAR,
                0,
                mm.as_raw(),
                addr as _,
                (addr + PAGE_SIZE) as _,
            );
            bindings::mmu_notifier_invalidate_range_start(&mut range);
        }
        Self { range }
    }
}

impl Drop for InvalidateRange {
    fn drop(&mut self) {
        // SAFETY: started in `start`; ended once.
        unsafe { bindings::mmu_notifier_invalidate_range_end(&mut self.range) };
    }
}

/// Flush this CPU's LRU batches, which hold a reference on a just-COWed folio.
pub(crate) fn lru_add_drain() {
    // SAFETY: no preconditions.
    unsafe { bindings::lru_add_drain() };
}

/// Flush every CPU's LRU batches (sleeps).
pub(crate) fn lru_add_drain_all() {
    // SAFETY: no preconditions beyond process context.
    unsafe { bindings::lru_add_drain_all() };
}

/// `collapse_pte_mapped_thp()`: map the 2 MiB range at `haddr` by a PMD
/// again if all its PTEs map the page-cache THP.
pub(crate) fn collapse_pte_mapped_thp(
    mm: &MmWithUser,
    _locked: &MmapReadGuard<'_>,
    haddr: usize,
    install_pmd: bool,
) {
    // SAFETY: `mm` has a user reference and its mmap lock is held, as
    // collapse_pte_mapped_thp() requires.
    unsafe { bindings::collapse_pte_mapped_thp(mm.as_raw(), haddr as _, install_pmd) };
}

/// EILSEQ, which `kernel::error::code` does not declare.
pub(crate) fn eilseq() -> Error {
    Error::from_errno(-(bindings::EILSEQ as i32))
}

/// hugepoke's own workqueue, so that module unload can wait for every work
/// item to return (`drain`) without flushing a system-wide queue.
pub(crate) struct Workqueue(NonNull<bindings::workqueue_struct>);

// SAFETY: a workqueue may be used and destroyed from any task.
unsafe impl Send for Workqueue {}
// SAFETY: queueing is thread-safe.
unsafe impl Sync for Workqueue {}

impl Workqueue {
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: a constant format string without conversions, so no
        // variadic arguments are read.
        let wq = unsafe {
            bindings::alloc_workqueue_noprof(c"hugepoke".as_ptr().cast(), bindings::wq_flags_WQ_UNBOUND, 0)
        };
        NonNull::new(wq).map(Self).ok_or(ENOMEM)
    }

    pub(crate) fn queue(&self) -> &kernel::workqueue::Queue {
        // SAFETY: the workqueue lives until `self` is dropped.
        unsafe { kernel::workqueue::Queue::from_raw(self.0.as_ptr()) }
    }

    /// Wait until every work item queued has run and returned.  Must not be
    /// called from a work item of this queue, nor with a lock they take.
    pub(crate) fn drain(&self) {
        // SAFETY: valid workqueue; process context (module unload).
        unsafe { bindings::drain_workqueue(self.0.as_ptr()) };
    }
}

impl Drop for Workqueue {
    fn drop(&mut self) {
        // SAFETY: the last reference to the workqueue; it drains first.
        unsafe { bindings::destroy_workqueue(self.0.as_ptr()) };
    }
}

// SPDX-License-Identifier: GPL-2.0

//! The thin unsafe layer: every call into `bindings::` lives here, each with
//! the reason it is sound.  Everything above this module is safe Rust.
//!
//! The static inlines it needs are compiled into the module from
//! `helpers.c` (the `hugepoke_*` functions declared below), so the kernel
//! series adds no helper to vmlinux.
//!
//! The types here own exactly one kernel reference each and drop it in
//! `Drop`: [`Process`] a task, [`PageRef`] a folio (from GUP), [`CacheRef`]
//! a page-cache folio.  [`LockedPte`] is a `folio_walk` that holds the
//! page-table lock until it is dropped; [`MmapWriteGuard`] the target's
//! mmap lock, for writing.

use core::ptr::NonNull;
use kernel::{
    bindings,
    fs::File,
    mm::{virt::VmaRef, Mm, MmWithUser, MmWithUserAsync, MmapReadGuard},
    prelude::*,
    sync::aref::ARef,
    task::Task,
    types::NotThreadSafe,
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

    /// Its address space, with a user reference, if the caller may
    /// ptrace-attach to it with its real credentials (the check
    /// `process_vm_writev()` and `/proc/PID/mem` make).  `mm_access()`
    /// makes the check and takes the mm under the target's
    /// `exec_update_lock`, so an `execve()` cannot come between them.
    /// The reference is dropped with `mmput_async`, so that the last
    /// `mmput` of an exiting target never runs in our locks.
    pub(crate) fn mm_access(&self) -> Result<ARef<MmWithUserAsync>> {
        // SAFETY: the task is valid while we hold our reference; the mode is
        // a valid PTRACE_MODE_* combination.
        let mm = unsafe { bindings::mm_access(self.task.as_ptr(), bindings::PTRACE_MODE_ATTACH_REALCREDS) };
        if mm.is_null() {
            return Err(ESRCH);
        }
        let mm = kernel::error::from_err_ptr(mm)?;
        // SAFETY: `mm_access` returned an mm with `mm_users` raised, which
        // the `ARef` now owns; `MmWithUser` is a transparent `mm_struct`.
        let mm: ARef<MmWithUser> = unsafe { ARef::from_raw(NonNull::new_unchecked(mm.cast())) };
        Ok(MmWithUser::into_mmput_async(mm))
    }
}

/// Identity of an address space, for comparing targets; never dereferenced.
pub(crate) fn mm_id(mm: &Mm) -> usize {
    mm.as_raw() as usize
}

// The static inlines, compiled into the module from helpers.c.  (The
// bindgen types are opaque to the lint, as in `bindings` itself.)
#[allow(improper_ctypes)]
extern "C" {
    fn hugepoke_mmap_write_lock_killable(mm: *mut bindings::mm_struct) -> i32;
    fn hugepoke_mmap_write_unlock(mm: *mut bindings::mm_struct);
    fn hugepoke_page_to_pfn(page: *const bindings::page) -> usize;
    fn hugepoke_page_folio(page: *mut bindings::page) -> *mut bindings::folio;
    fn hugepoke_page_anon_exclusive(page: *const bindings::page) -> bool;
    fn hugepoke_folio_put(folio: *mut bindings::folio);
    fn hugepoke_folio_unexpected_refs(folio: *mut bindings::folio) -> i32;
    fn hugepoke_folio_is_anon(folio: *mut bindings::folio) -> bool;
    fn hugepoke_folio_may_be_lru_cached(folio: *mut bindings::folio) -> bool;
    fn hugepoke_folio_order(folio: *const bindings::folio) -> u32;
    fn hugepoke_folio_uptodate(folio: *const bindings::folio) -> bool;
    fn hugepoke_folio_pmd_mappable(folio: *const bindings::folio) -> bool;
    fn hugepoke_page_cache_folio(mapping: *mut bindings::address_space, index: usize) -> *mut bindings::folio;
    fn hugepoke_folio_file_page(folio: *mut bindings::folio, index: usize) -> *mut bindings::page;
    fn hugepoke_pte_write(pte: bindings::pte_t) -> bool;
    fn hugepoke_pte_uffd_wp(vma: *mut bindings::vm_area_struct, pte: bindings::pte_t) -> bool;
    fn hugepoke_pte_unmap(
        vma: *mut bindings::vm_area_struct,
        addr: usize,
        ptep: *mut bindings::pte_t,
        pte: bindings::pte_t,
    ) -> bindings::pte_t;
    fn hugepoke_pte_remap_dirty(
        vma: *mut bindings::vm_area_struct,
        addr: usize,
        ptep: *mut bindings::pte_t,
        pte: bindings::pte_t,
    );
    fn hugepoke_zap_anon_pte(
        vma: *mut bindings::vm_area_struct,
        folio: *mut bindings::folio,
        page: *mut bindings::page,
    ) -> i32;
    fn hugepoke_folio_walk_end(fw: *mut bindings::folio_walk, vma: *mut bindings::vm_area_struct);
    fn hugepoke_invalidate_start(
        range: *mut bindings::mmu_notifier_range,
        mm: *mut bindings::mm_struct,
        start: usize,
        end: usize,
    );
    fn hugepoke_invalidate_end(range: *mut bindings::mmu_notifier_range);
    fn hugepoke_uffd_armed(vma: *mut bindings::vm_area_struct) -> bool;
    fn hugepoke_uffd_missing(vma: *mut bindings::vm_area_struct) -> bool;
    fn hugepoke_uffd_wp(vma: *mut bindings::vm_area_struct) -> bool;
    fn hugepoke_module_get() -> bool;
    fn hugepoke_module_put();
    fn hugepoke_trace(
        step: u32,
        seq: u64,
        pid: i32,
        handle: u32,
        addr: usize,
        pfn: usize,
        order: i32,
        err: i32,
        reason: *const u8,
        reason_len: usize,
    );
    fn hugepoke_trace_step_name(step: u32) -> *const kernel::ffi::c_char;
}

/// One journal step as a trace event, `hugepoke:hugepoke_<step>`; `step`
/// indexes `HUGEPOKE_STEPS` in helpers.h.  `None` goes out as 0 (`order`:
/// -1).  Callable in any context, spinlocks held included.
#[allow(clippy::too_many_arguments)]
pub(crate) fn trace_step(
    step: u32,
    seq: u64,
    pid: i32,
    handle: Option<u32>,
    addr: Option<usize>,
    pfn: Option<usize>,
    order: Option<u32>,
    err: i32,
    reason: &str,
) {
    let order = order.map_or(-1, |o| o as i32);
    // SAFETY: `reason` is valid for `reason.len()` bytes for the call (the
    // event copies them; no NUL is needed); the other arguments are plain
    // values, and a tracepoint may fire in atomic context.
    unsafe {
        hugepoke_trace(
            step,
            seq,
            pid,
            handle.unwrap_or(0),
            addr.unwrap_or(0),
            pfn.unwrap_or(0),
            order,
            err,
            reason.as_ptr(),
            reason.len(),
        )
    };
}

/// The step whose trace event `step` emits, as helpers.c names it.
pub(crate) fn trace_step_name(step: u32) -> Option<&'static CStr> {
    // SAFETY: no preconditions; the result is null or a string literal.
    let name = unsafe { hugepoke_trace_step_name(step) };
    // SAFETY: non-null, it is a NUL-terminated literal that lives forever.
    (!name.is_null()).then(|| unsafe { CStr::from_char_ptr(name) })
}

/// A reference on this module, held by every open file of the device
/// (the Rust miscdevice sets no `fops->owner`), so that `rmmod` waits for
/// the last `close()`.
pub(crate) struct ModuleRef(());

impl ModuleRef {
    pub(crate) fn get() -> Option<Self> {
        // SAFETY: try_module_get() on our own module, from one of its calls.
        unsafe { hugepoke_module_get() }.then_some(Self(()))
    }
}

impl Drop for ModuleRef {
    fn drop(&mut self) {
        // SAFETY: drops the one reference `get` took.  Callers drop it as
        // their very last act, so only their return runs after it.
        unsafe { hugepoke_module_put() };
    }
}

/// What hugepoke needs to know of a VMA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct VmaInfo {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) flags: usize,
    /// The file's `address_space`, as an identity (0: not file-backed).
    pub(crate) mapping: usize,
    /// The file page mapped at `start`.
    pub(crate) pgoff: usize,
    pub(crate) uffd_armed: bool,
    pub(crate) uffd_wp: bool,
    pub(crate) uffd_missing: bool,
}

impl VmaInfo {
    pub(crate) fn file_backed(&self) -> bool {
        self.mapping != 0
    }

    /// Where file page `pgoff` of `mapping` is mapped in this VMA, if it is.
    pub(crate) fn address_of(&self, mapping: usize, pgoff: usize) -> Option<usize> {
        let pages = (self.end - self.start) >> bindings::PAGE_SHIFT;
        if mapping == 0 || mapping != self.mapping || pgoff < self.pgoff || pgoff - self.pgoff >= pages {
            return None;
        }
        Some(self.start + ((pgoff - self.pgoff) << bindings::PAGE_SHIFT))
    }

    /// The file page mapped at `addr` (inside the VMA).
    pub(crate) fn pgoff_of(&self, addr: usize) -> usize {
        ((addr - self.start) >> bindings::PAGE_SHIFT) + self.pgoff
    }
}

pub(crate) fn vma_info(vma: &VmaRef) -> VmaInfo {
    let raw = vma.as_ptr();
    // SAFETY: the VMA is valid while the mmap lock that gave us `vma` is
    // held; `vm_file`, its `f_mapping` and `vm_pgoff` are stable under it.
    let (mapping, pgoff) = unsafe {
        let file = (*raw).vm_file;
        let mapping = if file.is_null() { 0 } else { (*file).f_mapping as usize };
        (mapping, (*raw).vm_pgoff as usize)
    };
    // SAFETY: as above; the helpers only read the VMA's flags and context.
    let (uffd_armed, uffd_wp, uffd_missing) =
        unsafe { (hugepoke_uffd_armed(raw), hugepoke_uffd_wp(raw), hugepoke_uffd_missing(raw)) };
    VmaInfo {
        start: vma.start(),
        end: vma.end(),
        flags: vma.flags() as usize,
        mapping,
        pgoff,
        uffd_armed,
        uffd_wp,
        uffd_missing,
    }
}

/// A counted reference to the file `vma` maps, if any.
pub(crate) fn vma_file(vma: &VmaRef) -> Option<ARef<File>> {
    // SAFETY: the VMA is valid under the mmap lock; `vm_file` holds a
    // reference on the file while the VMA exists.
    let file = unsafe { (*vma.as_ptr()).vm_file };
    if file.is_null() {
        return None;
    }
    // SAFETY: `file` is a valid file for as long as the VMA; `ARef::from`
    // takes a reference of our own (get_file) before we return.  We never
    // use its position, so the fdget_pos rule of `File` is moot.
    Some(ARef::from(unsafe { File::from_raw_file(file) }))
}

/// A target's mmap lock, held for writing while PATCH and RESTORE look,
/// check and write, as uprobes holds it: `/proc/PID/mem` and ptrace pokes
/// (`access_remote_vm`) hold it for reading across their copy into the
/// page, so none of their writes can land between our check of the bytes
/// and our write; nor can the target's own `mprotect`/`mremap`/`munmap`.
pub(crate) struct MmapWriteGuard<'a> {
    mm: &'a MmWithUser,
    /// The rwsem is unlocked by the task that locked it.
    _nts: NotThreadSafe,
}

impl<'a> MmapWriteGuard<'a> {
    /// Take it; `EINTR` if a fatal signal comes first.
    pub(crate) fn lock_killable(mm: &'a MmWithUser) -> Result<Self> {
        // SAFETY: `mm` has a user reference, so the mm_struct is valid.
        if unsafe { hugepoke_mmap_write_lock_killable(mm.as_raw()) } != 0 {
            return Err(EINTR);
        }
        Ok(Self { mm, _nts: NotThreadSafe })
    }

    /// The VMA that contains `addr` or, if none does, the first one above it.
    pub(crate) fn find_vma(&self, addr: usize) -> Option<&VmaRef> {
        // SAFETY: the mmap lock is held while `self` lives, so the VMA tree
        // is stable and the VMA returned stays valid as long as the borrow.
        unsafe {
            let vma = bindings::find_vma(self.mm.as_raw(), addr as _);
            (!vma.is_null()).then(|| VmaRef::from_raw(vma))
        }
    }

    /// The VMA that contains `addr`.
    pub(crate) fn vma_lookup(&self, addr: usize) -> Option<&VmaRef> {
        self.find_vma(addr).filter(|vma| vma.start() <= addr)
    }

    /// `get_user_pages_remote()` of the one page at `addr`, in this mm.
    pub(crate) fn get_user_page(&self, addr: usize, gup_flags: u32) -> Result<PageRef> {
        let mut page: *mut bindings::page = core::ptr::null_mut();
        // SAFETY: `mm` has a user reference and its mmap lock is held while
        // `self` lives; `page` has room for the one page asked for.
        let ret = unsafe {
            bindings::get_user_pages_remote(self.mm.as_raw(), addr as _, 1, gup_flags, &mut page, core::ptr::null_mut())
        };
        if ret < 0 {
            return Err(Error::from_errno(ret as i32));
        }
        match NonNull::new(page) {
            Some(page) if ret == 1 => Ok(PageRef { page }),
            _ => Err(EFAULT),
        }
    }
}

impl Drop for MmapWriteGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: we took the lock for writing in `lock_killable`.
        unsafe { hugepoke_mmap_write_unlock(self.mm.as_raw()) };
    }
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

impl PageRef {
    fn folio(&self) -> *mut bindings::folio {
        // SAFETY: we hold a reference on the page's folio.
        unsafe { hugepoke_page_folio(self.page.as_ptr()) }
    }

    pub(crate) fn pfn(&self) -> usize {
        // SAFETY: the page is valid while we hold the folio reference.
        unsafe { hugepoke_page_to_pfn(self.page.as_ptr()) }
    }

    pub(crate) fn is_anon(&self) -> bool {
        // SAFETY: as above.
        unsafe { hugepoke_folio_is_anon(self.folio()) }
    }

    pub(crate) fn folio_order(&self) -> u32 {
        // SAFETY: as above.
        unsafe { hugepoke_folio_order(self.folio()) }
    }

    /// Wait until the folio is not under writeback (a swap-out in flight),
    /// so that a zap can free its swap slot.  Sleeps; no spinlock held.
    pub(crate) fn wait_writeback(&self) {
        // SAFETY: we hold a reference on the folio, as the function requires.
        unsafe { bindings::folio_wait_writeback(self.folio()) }
    }

    /// References beyond the ones its mappings, the page or swap cache and
    /// our GUP hold: a pin, a pipe, an LRU batch…
    pub(crate) fn unexpected_refs(&self) -> i32 {
        // SAFETY: as above.
        unsafe { hugepoke_folio_unexpected_refs(self.folio()) }
    }

    /// A per-CPU LRU batch may hold a reference (the kernel's own
    /// predicate: any small folio may).
    pub(crate) fn may_be_lru_cached(&self) -> bool {
        // SAFETY: as above.
        unsafe { hugepoke_folio_may_be_lru_cached(self.folio()) }
    }

    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) {
        read_page(self.page, offset, out)
    }
}

impl Drop for PageRef {
    fn drop(&mut self) {
        // SAFETY: we own one reference on the folio.
        unsafe { hugepoke_folio_put(self.folio()) };
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

/// The page-cache page of one file page, with a reference.
pub(crate) struct CacheRef {
    folio: NonNull<bindings::folio>,
    page: NonNull<bindings::page>,
}

// SAFETY: a folio reference may be dropped from any task.
unsafe impl Send for CacheRef {}

/// Look up (never read in) the page-cache folio behind `addr` of `vma`.
pub(crate) fn page_cache_page(vma: &VmaRef, addr: usize) -> Option<CacheRef> {
    let info = vma_info(vma);
    if !info.file_backed() {
        return None;
    }
    let index = info.pgoff_of(addr);
    // SAFETY: the VMA is file-backed and valid under the mmap lock, so
    // `vm_file->f_mapping` is valid; the helper returns a counted folio or
    // null.
    let folio = unsafe { hugepoke_page_cache_folio(info.mapping as *mut bindings::address_space, index) };
    let folio = NonNull::new(folio)?;
    // SAFETY: `folio` is valid and counted, and contains `index`.
    let page = unsafe { hugepoke_folio_file_page(folio.as_ptr(), index) };
    let Some(page) = NonNull::new(page) else {
        // SAFETY: we own the reference just taken.
        unsafe { hugepoke_folio_put(folio.as_ptr()) };
        return None;
    };
    Some(CacheRef { folio, page })
}

impl CacheRef {
    pub(crate) fn pfn(&self) -> usize {
        // SAFETY: we hold a reference on the folio.
        unsafe { hugepoke_page_to_pfn(self.page.as_ptr()) }
    }

    pub(crate) fn folio_order(&self) -> u32 {
        // SAFETY: as above.
        unsafe { hugepoke_folio_order(self.folio.as_ptr()) }
    }

    pub(crate) fn pmd_mappable(&self) -> bool {
        // SAFETY: as above.
        unsafe { hugepoke_folio_pmd_mappable(self.folio.as_ptr()) }
    }

    pub(crate) fn uptodate(&self) -> bool {
        // SAFETY: as above.
        unsafe { hugepoke_folio_uptodate(self.folio.as_ptr()) }
    }

    /// Is the whole page byte-for-byte equal to the page `pte` maps?
    pub(crate) fn identical_to(&self, pte: &LockedPte<'_>) -> bool {
        // SAFETY: we hold a reference on the cache page and the PT lock that
        // keeps the mapped page; kmap_local mappings are released in
        // reverse order.
        unsafe {
            let a = bindings::kmap_local_page(self.page.as_ptr()).cast::<u8>();
            let b = bindings::kmap_local_page(pte.fw.page).cast::<u8>();
            let same = core::slice::from_raw_parts(a, PAGE_SIZE) == core::slice::from_raw_parts(b, PAGE_SIZE);
            bindings::kunmap_local(b.cast());
            bindings::kunmap_local(a.cast());
            same
        }
    }
}

impl Drop for CacheRef {
    fn drop(&mut self) {
        // SAFETY: we own one reference on the folio.
        unsafe { hugepoke_folio_put(self.folio.as_ptr()) };
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
        let pfn = hugepoke_page_to_pfn(fw.page);
        let level = fw.level;
        hugepoke_folio_walk_end(&mut fw, vma.as_ptr());
        match level {
            bindings::folio_walk_level_FW_LEVEL_PTE => Mapping::Pte(pfn),
            _ => Mapping::Pmd(pfn),
        }
    }
}

/// What a zap did to the page's swap slot.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum SwapSlot {
    /// The page was not in the swap cache.
    None,
    /// It was, and its slot is freed.
    Freed,
    /// It stays in the swap cache (locked by someone else): reclaim frees it.
    Kept,
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
        unsafe { hugepoke_pte_write(self.pte()) }
    }

    pub(crate) fn uffd_wp(&self) -> bool {
        // SAFETY: the VMA is valid; the helper only inspects the values.
        unsafe { hugepoke_pte_uffd_wp(self.vma.as_ptr(), self.pte()) }
    }

    /// Is the mapped page marked exclusive to this mapping (so that no
    /// GUP-fast pin can race with us changing it)?
    pub(crate) fn anon_exclusive(&self) -> bool {
        // SAFETY: the page is valid: it is mapped and we hold the PT lock.
        unsafe { hugepoke_page_anon_exclusive(self.fw.page) }
    }

    /// Clear the PTE and flush the TLB, so that no CPU can execute the page
    /// while it is being read and rewritten.
    pub(crate) fn unmap(&mut self) {
        if self.cleared.is_some() {
            return;
        }
        // SAFETY: we hold the PT lock for this PTE; `ptep` points into the
        // locked page table; the cleared value is kept to be set back.
        let old = unsafe { hugepoke_pte_unmap(self.vma.as_ptr(), self.addr, self.fw.__bindgen_anon_1.ptep, self.pte()) };
        self.cleared = Some(old);
    }

    /// Read `out.len()` bytes of the (unmapped) page at `offset`.
    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(self.cleared.is_some(), "read of a mapped PTE");
        // SAFETY: the page stays valid while it is mapped and the PT lock held.
        read_page(unsafe { NonNull::new_unchecked(self.fw.page) }, offset, out)
    }

    /// Copy `bytes` into the (unmapped) page at `offset`.
    pub(crate) fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(self.cleared.is_some(), "write to a mapped PTE");
        assert!(offset + bytes.len() <= PAGE_SIZE);
        // SAFETY: the page stays valid (mapped, PT lock held); no CPU maps it
        // now that the PTE is cleared and flushed; the copy stays in the page.
        unsafe {
            let kaddr = bindings::kmap_local_page(self.fw.page).cast::<u8>();
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), kaddr.add(offset), bytes.len());
            bindings::kunmap_local(kaddr.cast());
        }
    }

    /// Drop the cleared PTE's anonymous page from this mapping for good, so
    /// that the next access faults the page-cache page back in; its swap
    /// slot, if any, is freed.  `page` is the GUP reference the caller
    /// still holds (and drops later).  Says what became of a swap slot.
    pub(crate) fn zap(mut self, page: &PageRef) -> SwapSlot {
        assert!(self.cleared.take().is_some(), "zap of a mapped PTE");
        // SAFETY: the PTE is cleared and the PT lock held, so this mapping's
        // rmap and reference are ours to drop, exactly once; the caller's
        // GUP reference keeps the folio alive past the helper's folio_put.
        match unsafe { hugepoke_zap_anon_pte(self.vma.as_ptr(), page.folio(), self.fw.page) } {
            0 => SwapSlot::None,
            1 => SwapSlot::Freed,
            _ => SwapSlot::Kept,
        }
    }

    /// Set the cleared PTE back, marked dirty (we modified the page;
    /// soft-dirty follows pte_mkdirty).  Also what dropping a cleared
    /// `LockedPte` does.
    pub(crate) fn remap_dirty(&mut self) {
        if let Some(old) = self.cleared.take() {
            // SAFETY: we hold the PT lock and the PTE is clear.
            unsafe { hugepoke_pte_remap_dirty(self.vma.as_ptr(), self.addr, self.fw.__bindgen_anon_1.ptep, old) };
        }
    }
}

impl Drop for LockedPte<'_> {
    fn drop(&mut self) {
        self.remap_dirty();
        // SAFETY: the walk succeeded and holds the PT lock; end it once.
        unsafe { hugepoke_folio_walk_end(&mut self.fw, self.vma.as_ptr()) };
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
        // `range` is initialized by the helper, ended exactly once in drop.
        unsafe { hugepoke_invalidate_start(&mut range, mm.as_raw(), addr, addr + PAGE_SIZE) };
        Self { range }
    }
}

impl Drop for InvalidateRange {
    fn drop(&mut self) {
        // SAFETY: started in `start`; ended once.
        unsafe { hugepoke_invalidate_end(&mut self.range) };
    }
}

/// Flush every CPU's LRU batches (sleeps; waits for every CPU).
pub(crate) fn lru_add_drain_all() {
    // SAFETY: no preconditions beyond process context.
    unsafe { bindings::lru_add_drain_all() };
}

/// `collapse_pte_mapped_thp()`: map the 2 MiB range at `haddr` by a PMD
/// again if all its PTEs map the page-cache THP.  Returns the kernel's
/// `enum scan_result`.
pub(crate) fn collapse_pte_mapped_thp(
    mm: &MmWithUser,
    _locked: &MmapReadGuard<'_>,
    haddr: usize,
    install_pmd: bool,
) -> u32 {
    // SAFETY: `mm` has a user reference and its mmap lock is held, as
    // collapse_pte_mapped_thp() requires.
    unsafe { bindings::collapse_pte_mapped_thp(mm.as_raw(), haddr as _, install_pmd) as u32 }
}

/// The name of a `enum scan_result` value, as khugepaged's trace events
/// spell it.
#[allow(non_upper_case_globals)] // bindgen's names for the enum's values
pub(crate) fn scan_result_name(result: u32) -> &'static str {
    use bindings::*;
    match result {
        scan_result_SCAN_FAIL => "SCAN_FAIL",
        scan_result_SCAN_SUCCEED => "SCAN_SUCCEED",
        scan_result_SCAN_NO_PTE_TABLE => "SCAN_NO_PTE_TABLE",
        scan_result_SCAN_PMD_MAPPED => "SCAN_PMD_MAPPED",
        scan_result_SCAN_PTE_NON_PRESENT => "SCAN_PTE_NON_PRESENT",
        scan_result_SCAN_PTE_UFFD_WP => "SCAN_PTE_UFFD_WP",
        scan_result_SCAN_PAGE_NULL => "SCAN_PAGE_NULL",
        scan_result_SCAN_PAGE_COMPOUND => "SCAN_PAGE_COMPOUND",
        scan_result_SCAN_PAGE_ANON => "SCAN_PAGE_ANON",
        scan_result_SCAN_VMA_CHECK => "SCAN_VMA_CHECK",
        scan_result_SCAN_VMA_NULL => "SCAN_VMA_NULL",
        scan_result_SCAN_ADDRESS_RANGE => "SCAN_ADDRESS_RANGE",
        scan_result_SCAN_PAGE_LOCK => "SCAN_PAGE_LOCK",
        _ => "SCAN_other",
    }
}

/// Did the collapse leave the range PMD-mapped (or ready to be)?
pub(crate) fn scan_result_ok(result: u32) -> bool {
    result == bindings::scan_result_SCAN_SUCCEED || result == bindings::scan_result_SCAN_PMD_MAPPED
}

/// EILSEQ, ENXIO: not in `kernel::error::code`'s list.
pub(crate) fn eilseq() -> Error {
    Error::from_errno(-(bindings::EILSEQ as i32))
}

pub(crate) fn enxio() -> Error {
    Error::from_errno(-(bindings::ENXIO as i32))
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

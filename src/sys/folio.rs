// SPDX-License-Identifier: GPL-2.0

//! Pages and the folios they belong to, each type owning one reference:
//! [`PageRef`] a page from GUP, [`CacheRef`] a page-cache page.  Every
//! kmap of hugepoke goes through [`with_page_mapped`].

use core::ptr::NonNull;
use kernel::{bindings, mm::virt::VmaRef};

use super::{
    hugepoke_folio_file_page, hugepoke_folio_is_anon, hugepoke_folio_mapped_elsewhere,
    hugepoke_folio_may_be_lru_cached, hugepoke_folio_order, hugepoke_folio_pmd_mappable,
    hugepoke_folio_put, hugepoke_folio_unexpected_refs, hugepoke_folio_uptodate,
    hugepoke_page_anon_exclusive, hugepoke_page_cache_folio, hugepoke_page_folio,
    hugepoke_page_to_pfn, vma::vma_info, PAGE_SIZE,
};

/// Map `page` into the kernel for the length of `f` (`kmap_local_page`).
///
/// # Safety
///
/// The caller holds a reference (or a lock) that keeps `page` allocated
/// for the call.
unsafe fn with_page_mapped<T>(page: NonNull<bindings::page>, f: impl FnOnce(*mut u8) -> T) -> T {
    // SAFETY: the page stays allocated (our caller's contract).
    let kaddr = unsafe { bindings::kmap_local_page(page.as_ptr()) }.cast::<u8>();
    let result = f(kaddr);
    // SAFETY: mapped above; kmap_local mappings nest, and any taken inside
    // `f` were released before it returned.
    unsafe { bindings::kunmap_local(kaddr.cast()) };
    result
}

/// Copy `out.len()` bytes of `page` from `offset`.
///
/// # Safety
///
/// As [`with_page_mapped`].
pub(super) unsafe fn read_page(page: NonNull<bindings::page>, offset: usize, out: &mut [u8]) {
    assert!(offset + out.len() <= PAGE_SIZE);
    // SAFETY: the page stays allocated (our caller); the copy stays inside
    // the one mapped page (asserted above).
    unsafe {
        with_page_mapped(page, |kaddr| {
            core::ptr::copy_nonoverlapping(kaddr.add(offset), out.as_mut_ptr(), out.len())
        })
    }
}

/// Copy `bytes` into `page` at `offset`.
///
/// # Safety
///
/// As [`with_page_mapped`], and no CPU may execute or write the page
/// through another mapping meanwhile.
pub(super) unsafe fn write_page(page: NonNull<bindings::page>, offset: usize, bytes: &[u8]) {
    assert!(offset + bytes.len() <= PAGE_SIZE);
    // SAFETY: as `read_page`; no other writer (our caller).
    unsafe {
        with_page_mapped(page, |kaddr| {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), kaddr.add(offset), bytes.len())
        })
    }
}

/// Are the whole of pages `a` and `b` byte-for-byte equal?
///
/// # Safety
///
/// As [`with_page_mapped`], for both, and neither is written meanwhile.
pub(super) unsafe fn pages_equal(a: NonNull<bindings::page>, b: NonNull<bindings::page>) -> bool {
    // `memcmp` over raw pointers, not slices: a write(2) to the file may be
    // changing the page-cache page meanwhile (then the answer may be
    // "differs", which only keeps the copy).
    let compare = |a: *mut u8, b: *mut u8| {
        // SAFETY: both are mapped pages of PAGE_SIZE bytes.
        unsafe { bindings::memcmp(a.cast(), b.cast(), PAGE_SIZE) == 0 }
    };
    // SAFETY: both stay allocated (our caller); the inner mapping is
    // released first.
    unsafe { with_page_mapped(a, |a| with_page_mapped(b, |b| compare(a, b))) }
}

/// One page and a reference on its folio, from GUP.
///
/// # Invariants
///
/// We own one reference on the folio of `page`.
pub(crate) struct PageRef {
    page: NonNull<bindings::page>,
}

// SAFETY: a folio reference may be dropped from any task.
unsafe impl Send for PageRef {}

impl PageRef {
    /// Take over the reference `get_user_pages_remote()` gave on `page`.
    pub(super) fn from_gup(page: NonNull<bindings::page>) -> Self {
        // INVARIANT: GUP returned the page with a reference on its folio.
        Self { page }
    }

    /// Take a new reference on the folio of `page`.
    ///
    /// # Safety
    ///
    /// `page` is valid and stays so until the reference is taken (the PT
    /// lock of a PTE that maps it is held).
    pub(super) unsafe fn get(page: NonNull<bindings::page>) -> Self {
        // SAFETY: `page` is valid (our caller), so is its folio.
        unsafe { super::hugepoke_folio_get(hugepoke_page_folio(page.as_ptr())) };
        // INVARIANT: the reference just taken.
        Self { page }
    }

    pub(super) fn page(&self) -> NonNull<bindings::page> {
        self.page
    }

    pub(super) fn folio(&self) -> *mut bindings::folio {
        // SAFETY: by the type invariant the page is valid.
        unsafe { hugepoke_page_folio(self.page.as_ptr()) }
    }

    pub(crate) fn pfn(&self) -> usize {
        // SAFETY: by the type invariant the page is valid.
        unsafe { hugepoke_page_to_pfn(self.page.as_ptr()) }
    }

    pub(crate) fn is_anon(&self) -> bool {
        // SAFETY: as above.
        unsafe { hugepoke_folio_is_anon(self.folio()) }
    }

    /// `PageAnonExclusive`: mapped by one process only, so a write fault
    /// (or GUP) reuses it whatever its reference count.  Fork clears it
    /// under the mmap lock, so it holds while the caller holds that.
    pub(crate) fn anon_exclusive(&self) -> bool {
        // SAFETY: as above; reading a page flag.
        unsafe { hugepoke_page_anon_exclusive(self.page.as_ptr()) }
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

    /// Does another page table map this page (a small, non-KSM anonymous
    /// folio; false for any other)?  Stable against fork only under the
    /// mmap write lock of the process that maps it.
    pub(crate) fn mapped_elsewhere(&self) -> bool {
        // SAFETY: as above.
        unsafe { hugepoke_folio_mapped_elsewhere(self.folio()) }
    }

    /// Its fork family: the root of its anon_vma, shared by every process
    /// forked from one that maps it (an identity); 0 for a KSM page.  The
    /// caller keeps it mapped (its mmap lock held).
    pub(crate) fn family(&self) -> usize {
        // SAFETY: we hold a reference on the folio; mapped, its anon_vma
        // is alive, and only its `root` pointer is read.
        unsafe { super::hugepoke_folio_family(self.folio()) }
    }

    /// Its fork family, held: see [`FamilyRef`].  None where
    /// [`Self::family`] is 0.  The caller keeps it mapped (as `family`).
    pub(crate) fn hold_family(&self) -> Option<FamilyRef> {
        // SAFETY: as `family`; the root anon_vma is alive (the mapped
        // folio's anon_vma holds a reference on it), so one more is taken.
        NonNull::new(unsafe { super::hugepoke_folio_hold_family(self.folio()) }).map(FamilyRef)
    }

    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) {
        // SAFETY: by the type invariant the page stays allocated.
        unsafe { read_page(self.page, offset, out) }
    }
}

impl Drop for PageRef {
    fn drop(&mut self) {
        // SAFETY: by the type invariant we own one reference on the folio.
        unsafe { hugepoke_folio_put(self.folio()) };
    }
}

/// The page-cache page of one file page, with a reference.
///
/// # Invariants
///
/// We own one reference on `folio`, which contains `page`.
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
    let (index, mapping) = (
        info.pgoff_of(addr),
        info.mapping as *mut bindings::address_space,
    );
    // SAFETY: the VMA is file-backed and valid under the mmap lock, so
    // `vm_file->f_mapping` is valid; the helper returns a counted folio or
    // null.
    let folio = unsafe { hugepoke_page_cache_folio(mapping, index) };
    // SAFETY: a counted folio of the page cache, or null.
    unsafe { CacheRef::adopt(NonNull::new(folio)?, index) }
}

/// The page-cache page behind `addr` of the file-backed `vma`, read in
/// from the file if it is not in the page cache (may sleep: call it
/// without the PT lock).  None if it cannot be read.
pub(crate) fn read_file_page(vma: &VmaRef, addr: usize) -> Option<CacheRef> {
    let info = vma_info(vma);
    if !info.file_backed() {
        return None;
    }
    let index = info.pgoff_of(addr);
    // SAFETY: the VMA is valid and file-backed (it has a file and vm_ops)
    // under the mmap lock held by our caller; the helper returns a counted
    // folio or an ERR_PTR.
    let folio = unsafe { super::hugepoke_read_file_folio(vma.as_ptr(), index) };
    let folio = kernel::error::from_err_ptr(folio).ok()?;
    // SAFETY: a counted folio of the page cache (not an ERR_PTR: above).
    unsafe { CacheRef::adopt(NonNull::new(folio)?, index) }
}

impl CacheRef {
    /// Take over a counted reference on a page-cache `folio` that holds
    /// file page `index`; its reference is dropped if the page is not
    /// there.
    ///
    /// # Safety
    ///
    /// `folio` is valid, we own one reference on it, and it contains `index`.
    unsafe fn adopt(folio: NonNull<bindings::folio>, index: usize) -> Option<Self> {
        // SAFETY: `folio` is valid and counted, and contains `index` (our caller).
        let page = unsafe { hugepoke_folio_file_page(folio.as_ptr(), index) };
        let Some(page) = NonNull::new(page) else {
            // SAFETY: we own the reference (our caller).
            unsafe { hugepoke_folio_put(folio.as_ptr()) };
            return None;
        };
        // INVARIANT: the caller's reference, and the folio's page at `index`.
        Some(CacheRef { folio, page })
    }

    pub(crate) fn pfn(&self) -> usize {
        // SAFETY: by the type invariant the folio and page are valid.
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

    /// Copy `out.len()` bytes of the page at `offset` into `out`.
    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) {
        // SAFETY: by the type invariant we hold a reference on the page.
        unsafe { read_page(self.page, offset, out) }
    }

    pub(super) fn page(&self) -> NonNull<bindings::page> {
        self.page
    }
}

impl Drop for CacheRef {
    fn drop(&mut self) {
        // SAFETY: by the type invariant we own one reference on the folio.
        unsafe { hugepoke_folio_put(self.folio.as_ptr()) };
    }
}

/// A reference on a fork family's root anon_vma ([`PageRef::family`]):
/// while it is held, no anon_vma made since can have that identity, so a
/// mapping made after a patch is never taken for the patch's family.
///
/// # Invariants
///
/// We own one reference on the anon_vma.
pub(crate) struct FamilyRef(NonNull<bindings::anon_vma>);

// SAFETY: a reference count, taken and dropped from any task.
unsafe impl Send for FamilyRef {}
// SAFETY: `&FamilyRef` only reads the address.
unsafe impl Sync for FamilyRef {}

impl FamilyRef {
    /// The family, as [`PageRef::family`] names it.
    pub(crate) fn id(&self) -> usize {
        self.0.as_ptr() as usize
    }
}

impl Drop for FamilyRef {
    fn drop(&mut self) {
        // SAFETY: by the type invariant we own one reference.  Never
        // dropped under a spinlock: the last put may sleep.
        unsafe { super::hugepoke_put_family(self.0.as_ptr()) }
    }
}

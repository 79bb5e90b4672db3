// SPDX-License-Identifier: GPL-2.0

//! Page-table entries: how an address is mapped now ([`mapping_of`]), the
//! PTE of one page with its page-table lock held ([`LockedPte`]), and the
//! same PTE cleared and flushed while the page is read and written
//! ([`ClearedPte`]): the page is read or written only in that state, and
//! the compiler holds the code to it.  [`InvalidateRange`] brackets a zap
//! for mmu notifiers.

use core::ptr::NonNull;
use kernel::{bindings, mm::virt::VmaRef, mm::MmWithUser};

use super::{
    folio::{pages_equal, read_page, write_page, CacheRef, PageRef},
    hugepoke_folio_walk_end, hugepoke_invalidate_end, hugepoke_invalidate_start,
    hugepoke_page_anon_exclusive, hugepoke_page_to_pfn, hugepoke_pte_remap, hugepoke_pte_uffd_wp,
    hugepoke_pte_unmap, hugepoke_pte_write, hugepoke_zap_anon_pte, PAGE_MASK, PAGE_SIZE,
};

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

/// The anonymous page a PTE maps at `addr` (a private copy of the file
/// page), with a reference; None for a page-cache page, a PMD, or nothing.
/// Walks the page tables only: no fault, no GUP (whose `FOLL_TOUCH` could
/// put the folio in an LRU batch, a reference the zap check then counts).
pub(crate) fn anon_copy_at(vma: &VmaRef, addr: usize) -> Option<PageRef> {
    let mut fw = bindings::folio_walk::default();
    // SAFETY: the VMA is valid under the mmap lock held by our caller; on
    // success the walk holds the PT lock until `folio_walk_end`.
    let folio = unsafe { bindings::folio_walk_start(&mut fw, vma.as_ptr(), addr as _, 0) };
    if folio.is_null() {
        return None;
    }
    // SAFETY: the walk found `fw.page` and holds the PT lock, so the page
    // stays mapped (and allocated) while we look at it and take a reference.
    let page = unsafe {
        let anon = fw.level == bindings::folio_walk_level_FW_LEVEL_PTE
            && super::hugepoke_folio_is_anon(folio);
        let page = NonNull::new(fw.page)
            .filter(|_| anon)
            .map(|p| PageRef::get(p));
        hugepoke_folio_walk_end(&mut fw, vma.as_ptr());
        page
    };
    page
}

/// What a zap did to the page's swap slot.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum SwapSlot {
    /// The page was not in the swap cache.
    None,
    /// It was, and its slot is freed.
    Freed,
    /// It stays in the swap cache (locked elsewhere): reclaim frees it.
    Kept,
}

/// The PTE that maps one page, with the page-table lock held until drop.
///
/// # Invariants
///
/// `fw` is a PTE-level `folio_walk` of `vma` at `addr` that succeeded and
/// holds the page-table lock; the PTE maps `fw.page`, a page we hold.
pub(crate) struct LockedPte<'a> {
    fw: bindings::folio_walk,
    vma: &'a VmaRef,
    addr: usize,
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
    let is_ours =
        fw.level == bindings::folio_walk_level_FW_LEVEL_PTE && fw.page == page.page().as_ptr();
    // INVARIANT: the walk succeeded; if it is not a PTE of `page`, the
    // `LockedPte` only lives to end the walk in its drop.
    let locked = LockedPte {
        fw,
        vma,
        addr: addr & PAGE_MASK,
    };
    is_ours.then_some(locked)
}

impl<'a> LockedPte<'a> {
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
        // SAFETY: by the type invariant the page is mapped and the PT lock held.
        unsafe { hugepoke_page_anon_exclusive(self.fw.page) }
    }

    /// Clear the PTE and flush the TLB, so that no CPU can execute the page
    /// while it is being read and rewritten.
    pub(crate) fn unmap(self) -> ClearedPte<'a> {
        // SAFETY: by the type invariant we hold the PT lock for this PTE and
        // `ptep` points into the locked page table; the cleared value is
        // kept to be set back.
        let old = unsafe {
            hugepoke_pte_unmap(
                self.vma.as_ptr(),
                self.addr,
                self.fw.__bindgen_anon_1.ptep,
                self.pte(),
            )
        };
        // INVARIANT: the PTE is clear and `old` is what it held.
        ClearedPte {
            locked: self,
            old: Some(old),
            written: false,
        }
    }
}

impl Drop for LockedPte<'_> {
    fn drop(&mut self) {
        // SAFETY: by the type invariant the walk holds the PT lock; ended once.
        unsafe { hugepoke_folio_walk_end(&mut self.fw, self.vma.as_ptr()) };
    }
}

/// A [`LockedPte`] whose PTE is cleared and the TLB flushed: no CPU maps
/// the page, so it may be read and written.  Dropping it sets the PTE back,
/// marked dirty if we wrote the page (soft-dirty follows `pte_mkdirty`);
/// as it was if we only read it (a refusal is no change for a tracker).
///
/// # Invariants
///
/// While `old` is `Some`, the PTE of `locked` is clear and `old` is what it
/// held; `zap` alone takes it, having dropped the page from the mapping.
pub(crate) struct ClearedPte<'a> {
    locked: LockedPte<'a>,
    old: Option<bindings::pte_t>,
    written: bool,
}

impl ClearedPte<'_> {
    pub(super) fn page(&self) -> NonNull<bindings::page> {
        // SAFETY: by `LockedPte`'s invariant the walk found a page.
        unsafe { NonNull::new_unchecked(self.locked.fw.page) }
    }

    /// Read `out.len()` bytes of the page at `offset`.
    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) {
        // SAFETY: the PT lock keeps the page mapped here, so allocated.
        unsafe { read_page(self.page(), offset, out) }
    }

    /// Copy `bytes` into the page at `offset`.
    pub(crate) fn write(&mut self, offset: usize, bytes: &[u8]) {
        self.written = true;
        // SAFETY: as `read`; no CPU maps the page now that the PTE is
        // cleared and flushed, and the mmap lock (held for writing by our
        // callers) keeps out writers through references taken earlier.
        unsafe { write_page(self.page(), offset, bytes) }
    }

    /// Is the whole page byte-for-byte equal to the page-cache page `cache`?
    pub(crate) fn identical_to(&self, cache: &CacheRef) -> bool {
        // SAFETY: the PT lock keeps our page, and `cache` holds a reference
        // on its page; the cache page is uptodate text no one writes, and no
        // CPU maps ours (its PTE is cleared, the PT lock held).
        unsafe { pages_equal(cache.page(), self.page()) }
    }

    /// Drop the anonymous page from this mapping for good, so that the next
    /// access faults the page-cache page back in; its swap slot, if any, is
    /// freed.  `page` is the GUP reference the caller still holds (and
    /// drops later).  Says what became of a swap slot.
    pub(crate) fn zap(mut self, page: &PageRef) -> SwapSlot {
        self.old = None;
        let (vma, mapped) = (self.locked.vma.as_ptr(), self.locked.fw.page);
        // (`old` is gone, so drop does not set the PTE back.)
        // SAFETY: PTE cleared, PT lock held: this mapping's rmap and reference
        // are ours to drop, once; the caller's GUP reference outlives folio_put.
        let slot = unsafe { hugepoke_zap_anon_pte(vma, page.folio(), mapped) };
        match slot {
            0 => SwapSlot::None,
            1 => SwapSlot::Freed,
            _ => SwapSlot::Kept,
        }
    }
}

impl Drop for ClearedPte<'_> {
    fn drop(&mut self) {
        if let Some(old) = self.old.take() {
            let l = &mut self.locked;
            // SAFETY: we hold the PT lock and the PTE is clear (invariant);
            // the walk found a PTE, so `ptep` is the union's live field.
            unsafe {
                let ptep = l.fw.__bindgen_anon_1.ptep;
                hugepoke_pte_remap(l.vma.as_ptr(), l.addr, ptep, old, self.written)
                // mutant: refusal-marks-dirty
            };
        }
        // `locked` ends the walk when it drops, after this.
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

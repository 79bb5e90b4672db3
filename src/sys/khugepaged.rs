// SPDX-License-Identifier: GPL-2.0

//! What hugepoke asks of mm's own machinery around a copy: the LRU drains
//! that let go of a fresh copy's batch reference (this CPU's right after
//! the COW, every CPU's as RESTORE's fallback), and
//! khugepaged's `collapse_pte_mapped_thp()` with its `enum scan_result`.

use kernel::{
    bindings,
    mm::{MmWithUser, MmapReadGuard},
};

/// Flush this CPU's LRU batches (where a copy just made by a COW fault on
/// it waits to reach the LRU, holding a reference).  Cheap: no waiting on
/// other CPUs.
pub(crate) fn lru_add_drain() {
    // SAFETY: no preconditions beyond process context (it takes the
    // per-CPU batch lock itself).
    unsafe { bindings::lru_add_drain() };
}

/// Flush every CPU's LRU batches (sleeps; waits for every CPU).
pub(crate) fn lru_add_drain_all() {
    // SAFETY: no preconditions beyond process context.
    unsafe { bindings::lru_add_drain_all() };
}

/// Proof that an mm's mmap lock is held, for reading or for writing.
pub(crate) trait MmapLocked {}
impl MmapLocked for MmapReadGuard<'_> {}
impl MmapLocked for super::MmapWriteGuard<'_> {}

/// `collapse_pte_mapped_thp()`: map the 2 MiB range at `haddr` by a PMD
/// again if all its PTEs map the page-cache THP.  Returns the kernel's
/// `enum scan_result`.
pub(crate) fn collapse_pte_mapped_thp(
    mm: &MmWithUser,
    _locked: &impl MmapLocked,
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

/// What `collapse_pte_mapped_thp()`'s `result` means, in words: Ok with
/// whether a PMD maps the range now (else the page table was retracted
/// for the next fault to map it), or Err with the `SCAN_*` name.
pub(crate) fn collapse_verdict(
    result: u32,
    install_pmd: bool,
) -> Result<(&'static str, bool), &'static str> {
    let succeeded = scan_result_ok(result); // mutant: collapse-result-ignored
    match (succeeded, result == bindings::scan_result_SCAN_PMD_MAPPED) {
        (true, true) => Ok(("SCAN_PMD_MAPPED: already PMD-mapped", true)),
        (true, false) if install_pmd => Ok(("SCAN_SUCCEED: PMD installed", true)),
        (true, false) => Ok((
            "SCAN_SUCCEED: page table retracted; PMD at next fault",
            false,
        )),
        (false, _) => Err(scan_result_name(result)),
    }
}

/// Did the collapse leave the range PMD-mapped (or ready to be)?
pub(crate) fn scan_result_ok(result: u32) -> bool {
    result == bindings::scan_result_SCAN_SUCCEED || result == bindings::scan_result_SCAN_PMD_MAPPED
}

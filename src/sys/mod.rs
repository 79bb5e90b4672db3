// SPDX-License-Identifier: GPL-2.0

//! The thin unsafe layer: every call into `bindings::` lives here, each with
//! the reason it is sound.  Everything above this module is safe Rust.
//! One file per concept, as `rust/kernel` splits mm:
//!
//! | file | what it owns |
//! |---|---|
//! | `task` | a target process ([`Process`]), its mm, the module reference |
//! | `mm` | the target's mmap lock held for writing ([`MmapWriteGuard`]), GUP |
//! | `vma` | what hugepoke knows of a VMA ([`VmaInfo`]) and the file it maps |
//! | `file` | a file's own mappings: who maps its text ([`file_vmas`]) |
//! | `folio` | page references ([`PageRef`], [`CacheRef`]) and the one kmap helper |
//! | `pte` | how an address is mapped; a locked, then cleared, PTE ([`LockedPte`] → [`ClearedPte`]) |
//! | `khugepaged` | the LRU drain and `collapse_pte_mapped_thp()` |
//! | `sync` | killable waits: a `Mutex` lock and a done flag ([`Done`]) |
//! | `wq` | hugepoke's workqueue |
//! | `abi` | the ioctl structs as plain bytes (`FromBytes`, `AsBytes`) |
//!
//! This file holds the `extern "C"` declarations of the static inlines
//! `helpers.c` compiles into the module (so the kernel series adds no
//! helper to vmlinux), the trace event, and the constants.

mod abi;
mod file;
mod folio;
mod khugepaged;
mod mm;
mod pte;
mod sync;
mod task;
mod vma;
mod wq;

pub(crate) use file::{family_vmas, file_mapping, file_vmas, FileVma};
pub(crate) use folio::{page_cache_page, read_file_page, CacheRef, FamilyRef, PageRef};
pub(crate) use khugepaged::{
    collapse_pte_mapped_thp, collapse_verdict, lru_add_drain, lru_add_drain_all,
};
pub(crate) use mm::{MmapWriteGuard, FOLL_FORCE, FOLL_SPLIT_PMD, FOLL_WRITE};
pub(crate) use pte::{
    anon_copy_at, lock_pte, mapping_of, ClearedPte, InvalidateRange, LockedPte, Mapping, SwapSlot,
};
pub(crate) use sync::{fatal_signal_pending, lock_killable, Done};
pub(crate) use task::{
    capable_sys_admin, capable_sys_admin_noaudit, current_tgid, forked_since, mm_id, mm_owner,
    mm_owner_tgid, Forked, ModuleRef, PidRef, Process,
};
pub(crate) use vma::{
    beyond_eof, family_may_have_others, gone_for_good, vma_family, vma_file, vma_info, VmaInfo,
};
pub(crate) use wq::Workqueue;

use kernel::{bindings, prelude::*};

pub(crate) use kernel::page::{PAGE_MASK, PAGE_SIZE};
/// The order of the folio one PMD maps, and its pages.
pub(crate) const PMD_ORDER: u32 = 9;
pub(crate) const PMD_PAGES: usize = 1 << PMD_ORDER;
/// Size of the range one PMD maps (2 MiB on x86-64).
pub(crate) const PMD_SIZE: usize = PAGE_SIZE << PMD_ORDER;
pub(crate) const PMD_MASK: usize = !(PMD_SIZE - 1);

/// CLOCK_MONOTONIC in nanoseconds, comparable with userspace's
/// `clock_gettime(CLOCK_MONOTONIC)`.
pub(crate) fn ktime_ns() -> u64 {
    // SAFETY: no preconditions; NMI-safe and callable with spinlocks held.
    unsafe { bindings::ktime_get_mono_fast_ns() }
}

/// CLOCK_BOOTTIME in nanoseconds: what a task's `start_boottime` is.
pub(crate) fn boottime_ns() -> u64 {
    // SAFETY: no preconditions.
    unsafe { hugepoke_boottime_ns() }
}

// The static inlines, compiled into the module from helpers.c.  (The
// bindgen types are opaque to the lint, as in `bindings` itself.)
#[allow(improper_ctypes)]
extern "C" {
    fn hugepoke_mmap_write_lock_killable(mm: *mut bindings::mm_struct) -> i32;
    fn hugepoke_mmap_write_unlock(mm: *mut bindings::mm_struct);
    fn hugepoke_mutex_lock_killable(lock: *mut bindings::mutex) -> i32;
    fn hugepoke_fatal_signal_pending() -> bool;
    fn hugepoke_page_to_pfn(page: *const bindings::page) -> usize;
    fn hugepoke_page_folio(page: *mut bindings::page) -> *mut bindings::folio;
    fn hugepoke_page_anon_exclusive(page: *const bindings::page) -> bool;
    fn hugepoke_folio_put(folio: *mut bindings::folio);
    fn hugepoke_folio_get(folio: *mut bindings::folio);
    fn hugepoke_mm_owner(mm: *mut bindings::mm_struct) -> i32;
    fn hugepoke_mm_owner_tgid(mm: *mut bindings::mm_struct) -> i32;
    fn hugepoke_file_vmas(
        file: *mut bindings::file,
        index: usize,
        out: *mut file::RawFileVma,
        max: i32,
        next: *mut usize,
    ) -> i32;
    fn hugepoke_family_vmas(
        file: *mut bindings::file,
        index: usize,
        family: usize,
        skip: *mut bindings::mm_struct,
        out: *mut file::RawFileVma,
        max: i32,
        next: *mut usize,
    ) -> i32;
    fn hugepoke_folio_family(folio: *mut bindings::folio) -> usize;
    fn hugepoke_folio_hold_family(folio: *mut bindings::folio) -> *mut bindings::anon_vma;
    fn hugepoke_put_family(root: *mut bindings::anon_vma);
    fn hugepoke_vma_family(vma: *mut bindings::vm_area_struct) -> usize;
    fn hugepoke_family_may_have_others(vma: *mut bindings::vm_area_struct, family: usize) -> bool;
    fn hugepoke_boottime_ns() -> u64;
    fn hugepoke_parent_tgid(task: *mut bindings::task_struct) -> *mut bindings::pid;
    fn hugepoke_forked_since(
        mm: *mut bindings::mm_struct,
        since: u64,
        target: *mut bindings::pid,
        target_mm: *mut bindings::mm_struct,
        parent: *mut bindings::pid,
        until: u64,
    ) -> i32;
    fn hugepoke_folio_unexpected_refs(folio: *mut bindings::folio) -> i32;
    fn hugepoke_folio_is_anon(folio: *mut bindings::folio) -> bool;
    fn hugepoke_folio_may_be_lru_cached(folio: *mut bindings::folio) -> bool;
    fn hugepoke_folio_mapped_elsewhere(folio: *mut bindings::folio) -> bool;
    fn hugepoke_folio_order(folio: *const bindings::folio) -> u32;
    fn hugepoke_folio_uptodate(folio: *const bindings::folio) -> bool;
    fn hugepoke_folio_pmd_mappable(folio: *const bindings::folio) -> bool;
    fn hugepoke_page_cache_folio(
        mapping: *mut bindings::address_space,
        index: usize,
    ) -> *mut bindings::folio;
    fn hugepoke_folio_file_page(folio: *mut bindings::folio, index: usize) -> *mut bindings::page;
    fn hugepoke_pte_write(pte: bindings::pte_t) -> bool;
    fn hugepoke_pte_uffd_wp(vma: *mut bindings::vm_area_struct, pte: bindings::pte_t) -> bool;
    fn hugepoke_pte_unmap(
        vma: *mut bindings::vm_area_struct,
        addr: usize,
        ptep: *mut bindings::pte_t,
        pte: bindings::pte_t,
    ) -> bindings::pte_t;
    fn hugepoke_pte_remap(
        vma: *mut bindings::vm_area_struct,
        addr: usize,
        ptep: *mut bindings::pte_t,
        pte: bindings::pte_t,
        dirty: bool,
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
    fn hugepoke_next_vma_mapping(
        mm: *mut bindings::mm_struct,
        addr: usize,
        mapping: *mut bindings::address_space,
        pgoff: usize,
    ) -> *mut bindings::vm_area_struct;
    fn hugepoke_uffd_armed(vma: *mut bindings::vm_area_struct) -> bool;
    fn hugepoke_uffd_missing(vma: *mut bindings::vm_area_struct) -> bool;
    fn hugepoke_uffd_wp(vma: *mut bindings::vm_area_struct) -> bool;
    fn hugepoke_uffd_minor(vma: *mut bindings::vm_area_struct) -> bool;
    fn hugepoke_vma_file_pages(vma: *mut bindings::vm_area_struct) -> usize;
    fn hugepoke_read_file_folio(
        vma: *mut bindings::vm_area_struct,
        index: usize,
    ) -> *mut bindings::folio;
    fn hugepoke_module_get() -> bool;
    fn hugepoke_module_put();
    fn hugepoke_trace(
        step: u32,
        seq: u64,
        pid: i32,
        handle: u64,
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
    handle: Option<u64>,
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

/// EILSEQ: not in `kernel::error::code`'s list.
pub(crate) fn eilseq() -> Error {
    Error::from_errno(-(bindings::EILSEQ as i32))
}

// SPDX-License-Identifier: GPL-2.0

//! hugepoke's ioctl ABI, version 5 (version 1 had no PATCH_BATCH, and
//! QUERY had no `index`/`count`; version 2 had no `PATCH_OVER_CHANGED`
//! and no `RESTORE_DROP`, and let any opener RESTORE and QUERY any handle;
//! version 3 had no COLLAPSE; version 4 no PATCH_FILE).
//!
//! This file is shared verbatim by the module and by `samples/` (the CLI and
//! tests), so it uses nothing but `core`.  `include/uapi/hugepoke.h` is the
//! same ABI for C.  Documentation/abi.md describes it.
//!
//! Every argument struct starts with `size` (the caller's `sizeof`) and
//! `flags`; the module refuses sizes and flag bits it does not know.

/// The ABI version this file describes (debugfs `abi` says which one the
/// loaded module speaks).
pub const ABI_VERSION: u32 = 5;

/// Most bytes one PATCH may write.
pub const MAX_BYTES: usize = 16;

/// Most sites one PATCH_BATCH may hold.
pub const MAX_BATCH: usize = 16384;

/// Most live sites one target may have (PATCH and PATCH_BATCH beyond it
/// get ENOSPC): the table's memory per target is bounded.
pub const MAX_TARGET_SITES: usize = 131072;

/// PATCH_BATCH `failed` when no single site is to blame.
pub const NO_SITE: u32 = u32::MAX;

/// PATCH: the patch outlives the file that made it (until RESTORE or unload).
pub const PATCH_PERSIST: u32 = 1 << 0;
/// PATCH: refuse unless the target holds `expect` at `addr` now.
pub const PATCH_EXPECT: u32 = 1 << 1;
/// PATCH: when RESTORE collapses the range, install the PMD right away
/// instead of retracting the page table and letting the next fault map it.
pub const PATCH_INSTALL_PMD: u32 = 1 << 2;
/// PATCH: write even over bytes that differ from the file's own (another
/// tool's breakpoint or patch), and record them as the originals RESTORE
/// puts back.  Without it such a site is refused with EBUSY.
pub const PATCH_OVER_CHANGED: u32 = 1 << 3;
pub const PATCH_FLAGS: u32 = PATCH_PERSIST | PATCH_EXPECT | PATCH_INSTALL_PMD | PATCH_OVER_CHANGED;
/// The flags of a whole batch (`PATCH_EXPECT` is per site).
pub const BATCH_FLAGS: u32 = PATCH_PERSIST | PATCH_INSTALL_PMD | PATCH_OVER_CHANGED;
/// The flags of one batch site.
pub const SITE_FLAGS: u32 = PATCH_EXPECT;

/// QUERY `state`: the patch is in place.
pub const STATE_LIVE: u32 = 1;
/// QUERY `state`: the target process is gone; the patch went with it.
pub const STATE_GONE: u32 = 2;
/// QUERY `state`: the target's own copy is restored, but a process forked
/// from it refused that RESTORE: the patch lives on only there (a retry
/// leaves the target alone).
pub const STATE_FORKED_ONLY: u32 = 3;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PatchArgs {
    /// In: `size_of::<PatchArgs>()`.
    pub size: u32,
    /// In: `PATCH_*`.
    pub flags: u32,
    /// In: target pid, in the caller's pid namespace.
    pub pid: i32,
    /// In: how many bytes, 1..=MAX_BYTES; `addr..addr+len` lies in one page.
    pub len: u32,
    /// In: user virtual address in the target's file-backed executable text.
    pub addr: u64,
    /// In: the new bytes.
    pub bytes: [u8; MAX_BYTES],
    /// In: the bytes expected at `addr` now (with `PATCH_EXPECT`).
    pub expect: [u8; MAX_BYTES],
    /// Out: the handle of the new patch.
    pub handle: u64,
}

/// One site of a PATCH_BATCH: what one PATCH would write.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchSite {
    /// User virtual address in the target's file-backed executable text.
    pub addr: u64,
    /// 1..=MAX_BYTES; `addr..addr+len` lies in one page.
    pub len: u32,
    /// `PATCH_EXPECT` or 0.
    pub flags: u32,
    pub bytes: [u8; MAX_BYTES],
    pub expect: [u8; MAX_BYTES],
}

/// PATCH_BATCH: `count` sites in one target, all written or none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PatchBatchArgs {
    /// In: `size_of::<PatchBatchArgs>()`.
    pub size: u32,
    /// In: `BATCH_FLAGS` bits, for every site.
    pub flags: u32,
    /// In: target pid, in the caller's pid namespace.
    pub pid: i32,
    /// In: how many sites, 1..=MAX_BATCH.
    pub count: u32,
    /// In: user pointer to `count` `BatchSite`s.
    pub sites: u64,
    /// Out: the one handle of all the sites (on success); on failure 0,
    /// or the handle under which the sites it wrote and could not undo
    /// are kept (persistent).
    pub handle: u64,
    /// Out: on failure, the index of the site refused or failed
    /// (`NO_SITE` when no one site is to blame); `NO_SITE` on success.
    pub failed: u32,
    /// Out: on failure, the positive errno of that site (also returned).
    pub error: i32,
}

/// RESTORE: forget the handle without writing anything (CAP_SYS_ADMIN):
/// for a patch that cannot be restored.  The target keeps whatever its
/// copies hold, and their ranges stay PTE-mapped.
pub const RESTORE_DROP: u32 = 1 << 0;
pub const RESTORE_FLAGS: u32 = RESTORE_DROP;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreArgs {
    /// In: `size_of::<RestoreArgs>()`.
    pub size: u32,
    /// In: `RESTORE_*`.
    pub flags: u32,
    /// In: a handle from PATCH.
    pub handle: u64,
}

/// QUERY: instead of a site, process `index` (by pid, in `pid`) of those
/// forked while the patch lived that run it now (`count` of them), found
/// as RESTORE finds them; every other out field 0.
pub const QUERY_FORKED: u32 = 1 << 0;
pub const QUERY_FLAGS: u32 = QUERY_FORKED;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueryArgs {
    /// In: `size_of::<QueryArgs>()`.
    pub size: u32,
    /// In: `QUERY_FORKED` or 0.
    pub flags: u32,
    /// In: a handle from PATCH.
    pub handle: u64,
    /// Out: `STATE_*`.
    pub state: u32,
    /// Out: the target pid, in the caller's pid namespace (0 if not visible).
    pub pid: i32,
    /// Out: the patched address and length.
    pub addr: u64,
    pub len: u32,
    /// Out: the `PATCH_*` flags the patch was made with.
    pub patch_flags: u32,
    /// Out: PFN of the anonymous page that holds the patch (0 unless the
    /// caller has CAP_SYS_ADMIN).
    pub pfn: u64,
    /// Out: the bytes that were there before, and the bytes written.
    pub orig: [u8; MAX_BYTES],
    pub bytes: [u8; MAX_BYTES],
    /// In: which of the handle's live sites, 0..count, in the order
    /// PATCH_BATCH was given them (0 for a single PATCH).
    pub index: u32,
    /// Out: how many live sites the handle has (1 for a single PATCH).
    pub count: u32,
    /// Out: that site's place in the PATCH_BATCH array (`index` itself
    /// unless some of the batch's sites are gone).
    pub site: u32,
    /// Out: 0.
    pub reserved: u32,
}

/// COLLAPSE: install the PMD right away instead of retracting the page
/// table and letting the next fault map it.
pub const COLLAPSE_INSTALL_PMD: u32 = 1 << 0;
pub const COLLAPSE_FLAGS: u32 = COLLAPSE_INSTALL_PMD;

/// COLLAPSE `result`: a PMD maps the range now (or already did).
pub const COLLAPSE_DONE: u32 = 1;
/// COLLAPSE `result`: the page table is retracted; the next fault maps
/// the PMD.
pub const COLLAPSE_AT_FAULT: u32 = 2;
/// COLLAPSE `result`: anonymous copies were kept (the `kept_*` counts say
/// why), so the range was not collapsed.
pub const COLLAPSE_COPIES_KEPT: u32 = 3;
/// COLLAPSE `result`: no copy is left, but the page cache holds no
/// PMD-sized folio for the range (small folios, or none): only
/// `MADV_COLLAPSE` can make one.
pub const COLLAPSE_SMALL_FOLIOS: u32 = 4;
/// COLLAPSE `result`: no copy is left, and `collapse_pte_mapped_thp()`
/// refused (its `enum scan_result` is in the journal).
pub const COLLAPSE_REFUSED: u32 = 5;

/// COLLAPSE: give one 2 MiB range of a target's text its PMD back after
/// any tool's patch.  The anonymous copies in it that equal their
/// page-cache page, that nothing else holds, that no userfaultfd watches
/// and that carry no live hugepoke patch are dropped; every other copy is
/// kept and counted by why; with none left, the range is collapsed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CollapseArgs {
    /// In: `size_of::<CollapseArgs>()`.
    pub size: u32,
    /// In: `COLLAPSE_*` flags.
    pub flags: u32,
    /// In: target pid, in the caller's pid namespace.
    pub pid: i32,
    /// Out: `COLLAPSE_DONE` .. `COLLAPSE_REFUSED`.
    pub result: u32,
    /// In: a 2 MiB-aligned address whose 2 MiB lie in one private,
    /// executable, file-backed mapping of the target, at a file offset a
    /// PMD can map.
    pub addr: u64,
    /// Out: copies dropped (equal to their page-cache page).
    pub dropped: u32,
    /// Out: copies kept because they differ from the page-cache page
    /// (another tool's change, live).
    pub kept_differs: u32,
    /// Out: kept because something else holds a reference (a pin, a pipe).
    pub kept_pinned: u32,
    /// Out: kept because userfaultfd is registered on the mapping.
    pub kept_uffd: u32,
    /// Out: kept because a live hugepoke patch is on the page.
    pub kept_patched: u32,
    /// Out: kept because no uptodate page-cache page could replace them.
    pub kept_no_cache: u32,
    /// Out: the address of the first copy kept (0 if none).
    pub first_kept: u64,
}

/// PATCH_FILE: find the processes, write nothing: `pids` says who would
/// be patched.
pub const FILE_DRY_RUN: u32 = 1 << 8;
/// The flags of a PATCH_FILE.
pub const FILE_FLAGS: u32 = BATCH_FLAGS | FILE_DRY_RUN;
/// Most processes one PATCH_FILE may patch.
pub const MAX_FILE_PROCESSES: usize = 1024;

/// PATCH_FILE: the sites of one file's text, patched in every process that
/// maps them privately and executably when the call runs (the caller
/// itself excepted), all or none, under one handle.  Needs CAP_SYS_ADMIN.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PatchFileArgs {
    /// In: `size_of::<PatchFileArgs>()`.
    pub size: u32,
    /// In: `FILE_FLAGS` bits.
    pub flags: u32,
    /// In: an open file descriptor of the file (a regular file; read-only
    /// is enough).
    pub fd: i32,
    /// In: how many sites, 1..=MAX_BATCH.
    pub count: u32,
    /// In: user pointer to `count` `BatchSite`s whose `addr` is an offset
    /// in the file, not an address.
    pub sites: u64,
    /// In: user pointer to `max_pids` `i32`s; out: the processes patched
    /// (or, with `FILE_DRY_RUN`, that would be), by pid, ascending.
    pub pids: u64,
    /// In: room in `pids`; more processes than that is E2BIG, nothing
    /// patched (`nr_pids` says how many).
    pub max_pids: u32,
    /// Out: how many processes map the sites.
    pub nr_pids: u32,
    /// Out: the one handle of the whole patch (on success); on failure 0,
    /// or the handle under which what could not be undone is kept.
    pub handle: u64,
    /// Out: on failure, the site refused (`NO_SITE` if none is to blame).
    pub failed: u32,
    /// Out: on failure, the positive errno (also returned).
    pub error: i32,
    /// Out: on failure, the process that refused or failed (0 if none).
    pub failed_pid: i32,
    /// Out: 0.
    pub reserved: u32,
}

/// The checks every argument struct's header gets: its `size` must be the
/// one this ABI knows and `flags` may only hold `known` bits.
pub fn check_header(
    size: u32,
    flags: u32,
    struct_size: usize,
    known: u32,
) -> Result<(), &'static str> {
    if size as usize != struct_size {
        return Err("unknown struct size");
    }
    if flags & !known != 0 {
        return Err("unknown flag bits");
    }
    Ok(())
}

/// ioctl type byte.
pub const IOC_TYPE: u32 = b'H' as u32;

/// `_IOWR(type, nr, size)`, as `include/uapi/asm-generic/ioctl.h` builds it.
pub const fn iowr(nr: u32, size: usize) -> u32 {
    (3 << 30) | ((size as u32) << 16) | (IOC_TYPE << 8) | nr
}

pub const IOCTL_PATCH: u32 = iowr(1, core::mem::size_of::<PatchArgs>());
pub const IOCTL_RESTORE: u32 = iowr(2, core::mem::size_of::<RestoreArgs>());
pub const IOCTL_QUERY: u32 = iowr(3, core::mem::size_of::<QueryArgs>());
pub const IOCTL_PATCH_BATCH: u32 = iowr(4, core::mem::size_of::<PatchBatchArgs>());
pub const IOCTL_COLLAPSE: u32 = iowr(5, core::mem::size_of::<CollapseArgs>());
pub const IOCTL_PATCH_FILE: u32 = iowr(6, core::mem::size_of::<PatchFileArgs>());

// The layout is the ABI: no implicit padding, fixed sizes.
const _: () = assert!(core::mem::size_of::<PatchArgs>() == 64);
const _: () = assert!(core::mem::size_of::<RestoreArgs>() == 16);
const _: () = assert!(core::mem::size_of::<QueryArgs>() == 96);
const _: () = assert!(core::mem::size_of::<BatchSite>() == 48);
const _: () = assert!(core::mem::size_of::<PatchBatchArgs>() == 40);
const _: () = assert!(core::mem::size_of::<CollapseArgs>() == 56);
const _: () = assert!(core::mem::size_of::<PatchFileArgs>() == 64);

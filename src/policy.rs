// SPDX-License-Identifier: GPL-2.0

//! What may be patched and restored: the checks of a request's arguments
//! and of the VMAs it reaches, as plain functions of the request and of a
//! [`VmaInfo`] snapshot, so the KUnit suite can hold them to their word.
//! Each refusal is an errno and, in words, why.

use kernel::{
    bindings::vm_flags_t,
    mm::virt::flags::{EXEC, HUGETLB, IO, MAYWRITE, NOHUGEPAGE, PFNMAP, SHARED, WRITE},
    prelude::*,
};

use crate::{
    patches::Site,
    refusal::Refusal,
    sys::{VmaInfo, PAGE_MASK, PAGE_SIZE, PMD_PAGES, PMD_SIZE},
    uapi::{self, CollapseArgs, PatchArgs, PatchBatchArgs, PatchFileArgs, MAX_BATCH, MAX_BYTES},
};

fn has(vma: &VmaInfo, flag: vm_flags_t) -> bool {
    vma.flags & flag as usize != 0
}

/// Validate a PATCH request's header and range before anything is looked up.
pub(crate) fn check_patch_args(args: &PatchArgs) -> Result<(), Refusal> {
    uapi::check_header(
        args.size,
        args.flags,
        core::mem::size_of::<PatchArgs>(),
        uapi::PATCH_FLAGS,
    )
    .map_err(|why| Refusal::new(EINVAL, why))?;
    check_range(args.addr, args.len)
}

/// Validate a PATCH_BATCH header before the sites are read.
pub(crate) fn check_batch_args(args: &PatchBatchArgs) -> Result<(), Refusal> {
    uapi::check_header(
        args.size,
        args.flags,
        core::mem::size_of::<PatchBatchArgs>(),
        uapi::BATCH_FLAGS,
    )
    .map_err(|why| Refusal::new(EINVAL, why))?;
    if args.count == 0 || args.count as usize > MAX_BATCH {
        return Err(Refusal::new(EINVAL, "a batch holds 1 to 16384 sites"));
    }
    Ok(())
}

/// The checks of a PATCH_FILE's own fields (its sites are checked as a
/// batch's).
pub(crate) fn check_file_args(args: &PatchFileArgs) -> Result<(), Refusal> {
    uapi::check_header(
        args.size,
        args.flags,
        core::mem::size_of::<PatchFileArgs>(),
        uapi::FILE_FLAGS,
    )
    .map_err(|why| Refusal::new(EINVAL, why))?;
    if args.count == 0 || args.count as usize > MAX_BATCH {
        // mutant: file-count-unchecked
        return Err(Refusal::new(EINVAL, "a batch holds 1 to 16384 sites"));
    }
    if args.reserved != 0 {
        return Err(Refusal::new(EINVAL, "reserved field is not 0"));
    }
    Ok(())
}

/// The checks of one site's address and length.
pub(crate) fn check_range(addr: u64, len: u32) -> Result<(), Refusal> {
    let len = len as usize;
    if len == 0 || len > MAX_BYTES {
        return Err(Refusal::new(EINVAL, "length must be 1 to 16 bytes"));
    }
    // The range must not wrap: `addr + len` is computed later.
    let Some(addr) = usize::try_from(addr)
        .ok()
        .filter(|a| a.checked_add(len).is_some())
    else {
        return Err(Refusal::new(EFAULT, "address out of range"));
    };
    if (addr & !PAGE_MASK) + len > PAGE_SIZE {
        return Err(Refusal::new(EINVAL, "range crosses a page boundary"));
    }
    Ok(())
}

/// The checks PATCH makes on the VMA: what uprobes may patch, and no more.
pub(crate) fn check_vma(vma: &VmaInfo) -> Result<(), Refusal> {
    if has(vma, HUGETLB) || has(vma, IO) || has(vma, PFNMAP) {
        return Err(Refusal::new(EINVAL, "hugetlb, VM_IO or VM_PFNMAP mapping"));
    }
    if !vma.file_backed() {
        return Err(Refusal::new(
            EINVAL,
            "not a file-backed mapping (anonymous, or private /dev/zero)",
        ));
    }
    if has(vma, SHARED) {
        return Err(Refusal::new(
            EINVAL,
            "shared mapping: writing would change the file",
        ));
    }
    if has(vma, WRITE) {
        return Err(Refusal::new(EINVAL, "writable mapping: not text"));
    }
    if !has(vma, EXEC) {
        return Err(Refusal::new(EINVAL, "mapping is not executable"));
    }
    if !has(vma, MAYWRITE) {
        return Err(Refusal::new(
            EINVAL,
            "mapping cannot be COWed (no VM_MAYWRITE)",
        ));
    }
    if vma.uffd_armed {
        // mutant: no-uffd-armed-check
        // GUP's write fault would wait for the uffd reader, and dropping
        // the uffd-wp bit silently is not ours to do.
        return Err(Refusal::new(EBUSY, "userfaultfd is armed on this mapping"));
    }
    Ok(())
}

/// May RESTORE write into the anonymous copy of a patch's page in this
/// VMA?  Only in a private, not writable, executable mapping of the file:
/// the kind of mapping PATCH wrote into.
pub(crate) fn check_restore_vma(vma: &VmaInfo) -> Result<(), Refusal> {
    if has(vma, SHARED) {
        return Err(Refusal::new(
            EACCES,
            "the patched file page is now mapped shared; nothing written",
        ));
    }
    if has(vma, WRITE) {
        // mutant: no-vma-check
        return Err(Refusal::new(
            EACCES,
            "the patched file page is now mapped writable; nothing written",
        ));
    }
    if !has(vma, EXEC) {
        return Err(Refusal::new(
            EACCES,
            "the patched file page is now mapped without exec; nothing written",
        ));
    }
    Ok(())
}

/// Validate a COLLAPSE request: its header, and a 2 MiB-aligned range
/// that does not wrap.
pub(crate) fn check_collapse_args(args: &CollapseArgs) -> Result<usize, Refusal> {
    uapi::check_header(
        args.size,
        args.flags,
        core::mem::size_of::<CollapseArgs>(),
        uapi::COLLAPSE_FLAGS,
    )
    .map_err(|why| Refusal::new(EINVAL, why))?;
    let Some(haddr) = usize::try_from(args.addr)
        .ok()
        .filter(|a| a.checked_add(PMD_SIZE).is_some())
    else {
        return Err(Refusal::new(EFAULT, "address out of range"));
    };
    if haddr % PMD_SIZE != 0 {
        return Err(Refusal::new(EINVAL, "address is not 2 MiB-aligned"));
    }
    Ok(haddr)
}

/// May COLLAPSE drop copies in this VMA and collapse its 2 MiB range at
/// `haddr`?  Only in private executable file text a PMD can map there.
pub(crate) fn check_collapse_vma(vma: &VmaInfo, haddr: usize) -> Result<(), Refusal> {
    if has(vma, HUGETLB) || has(vma, IO) || has(vma, PFNMAP) || !vma.file_backed() {
        return Err(Refusal::new(
            EINVAL,
            "not a file-backed mapping of ordinary pages",
        ));
    }
    if has(vma, SHARED) || has(vma, WRITE) || !has(vma, EXEC) {
        return Err(Refusal::new(
            EINVAL,
            "not a private, read-only, executable mapping: not text",
        ));
    }
    if vma.start > haddr || vma.end - haddr < PMD_SIZE {
        return Err(Refusal::new(
            EINVAL,
            "the 2 MiB range is not inside one mapping",
        ));
    }
    if vma.pgoff_of(haddr) % PMD_PAGES != 0 {
        return Err(Refusal::new(
            EINVAL,
            "address and file offset differ modulo 2 MiB: no PMD can map this range",
        ));
    }
    if has(vma, NOHUGEPAGE) {
        // No copy is dropped where the collapse could not follow.
        return Err(Refusal::new(
            EINVAL,
            "the mapping is MADV_NOHUGEPAGE: no PMD may map it, its copies are left alone",
        ));
    }
    Ok(())
}

/// Where a patch's file page is mapped in a VMA, if this VMA maps it.
pub(crate) fn address_in(site: &Site, vma: &VmaInfo) -> Option<usize> {
    vma.address_of(site.mapping, site.pgoff)
        .map(|page| page + site.offset())
}

// SPDX-License-Identifier: GPL-2.0

//! One VMA, as hugepoke needs to know it: a [`VmaInfo`] snapshot taken
//! under the mmap lock (plain data, so the policy over it is testable),
//! and the file it maps.

use kernel::{bindings, fs::File, mm::virt::VmaRef, sync::aref::ARef};

use super::{
    hugepoke_uffd_armed, hugepoke_uffd_minor, hugepoke_uffd_missing, hugepoke_uffd_wp,
    hugepoke_vma_file_pages,
};

/// What hugepoke needs to know of a VMA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct VmaInfo {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) flags: usize,
    /// The file's `address_space`, as an identity (0: not file-backed, or
    /// anonymous although it carries a file, as private `/dev/zero`).
    pub(crate) mapping: usize,
    /// The file page mapped at `start`.
    pub(crate) pgoff: usize,
    pub(crate) uffd_armed: bool,
    pub(crate) uffd_wp: bool,
    pub(crate) uffd_missing: bool,
    pub(crate) uffd_minor: bool,
    /// The VMA has an anon_vma: it may hold anonymous (COWed) pages.  A
    /// VMA without one has none to find.
    pub(crate) has_anon_vma: bool,
}

impl VmaInfo {
    pub(crate) fn file_backed(&self) -> bool {
        self.mapping != 0
    }

    /// Where file page `pgoff` of `mapping` is mapped in this VMA, if it is.
    pub(crate) fn address_of(&self, mapping: usize, pgoff: usize) -> Option<usize> {
        let pages = (self.end - self.start) >> bindings::PAGE_SHIFT;
        if mapping == 0
            || mapping != self.mapping
            || pgoff < self.pgoff
            || pgoff - self.pgoff >= pages
        {
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
    // A VMA without `vm_ops` is anonymous even when it carries a file (a
    // private `/dev/zero` mapping): no file page to patch or find again.
    // SAFETY: the VMA is valid while the mmap lock that gave us `vma` is
    // held; `vm_file`, its `f_mapping` and `vm_pgoff` are stable under it.
    let (mapping, pgoff) = unsafe {
        let file = (*raw).vm_file;
        let mapping = if file.is_null() || (*raw).vm_ops.is_null() {
            // mutant: private-dev-zero
            0
        } else {
            (*file).f_mapping as usize
        };
        (mapping, (*raw).vm_pgoff as usize)
    };
    // SAFETY: as above; the helpers only read the VMA's flags and context.
    let (uffd_armed, uffd_wp, uffd_missing, uffd_minor) = unsafe {
        (
            hugepoke_uffd_armed(raw),
            hugepoke_uffd_wp(raw),
            hugepoke_uffd_missing(raw),
            hugepoke_uffd_minor(raw),
        )
    };
    VmaInfo {
        start: vma.start(),
        end: vma.end(),
        flags: vma.flags() as usize,
        mapping,
        pgoff,
        uffd_armed,
        uffd_wp,
        uffd_missing,
        uffd_minor,
        // SAFETY: as above; a pointer-sized load, only compared with null.
        // In a private read-only mapping only a FOLL_FORCE write (under the
        // mmap lock) sets it, and nothing clears it while the VMA lives.
        has_anon_vma: unsafe { !core::ptr::read_volatile(&raw const (*raw).anon_vma).is_null() },
    }
}

/// May processes other than `vma`'s own map pages of fork `family`?
/// False only when `vma`'s anon_vma is the family's root and no fork ever
/// gave it a child: a hint to skip a walk, read under the mmap lock.
pub(crate) fn family_may_have_others(vma: &VmaRef, family: usize) -> bool {
    // SAFETY: the VMA is valid under the mmap lock that gave us `vma`; its
    // anon_vma lives as long as the VMA.
    unsafe { super::hugepoke_family_may_have_others(vma.as_ptr(), family) }
}

/// The fork family of `vma`'s anonymous pages (see `PageRef::family`), or
/// 0 if it has none yet.
pub(crate) fn vma_family(vma: &VmaRef) -> usize {
    // SAFETY: the VMA is valid under the mmap lock that gave us `vma`.
    unsafe { super::hugepoke_vma_family(vma.as_ptr()) }
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

/// Why GUP's EFAULT at file page `pgoff` of the file-backed `vma` (`info`)
/// means the page can hold no copy to restore any more, if it does: the
/// file is now shorter than the page (truncation zaps private copies too:
/// the fault was SIGBUS), or a guard region replaced it (installing one
/// zaps what it covers: the fault was SIGSEGV on its marker; the kernel
/// marks such VMAs, and without userfaultfd nothing else faults so there).
pub(crate) fn gone_for_good(vma: &VmaRef, info: &VmaInfo, pgoff: usize) -> Option<&'static str> {
    if beyond_eof(vma, pgoff) {
        // mutant: truncated-kept
        return Some(
            "the file was truncated below the patched page (its copy went with it); nothing to restore",
        );
    }
    if info.maybe_guard() && !info.uffd_armed {
        // mutant: guard-kept
        return Some(
            "a guard region (MADV_GUARD_INSTALL) replaced the patched page; nothing to restore",
        );
    }
    None
}

/// Is file page `pgoff` past the end of the file `vma` maps?  (A copy
/// there stands for bytes a fault would not bring back: SIGBUS, or, on a
/// shmem THP mapped across the end, zeroes only while the PMD maps it.)
pub(crate) fn beyond_eof(vma: &VmaRef, pgoff: usize) -> bool {
    // SAFETY: the VMA is valid and file-backed under the mmap lock held by
    // our caller; the helper reads its file's size.
    pgoff >= unsafe { hugepoke_vma_file_pages(vma.as_ptr()) }
}

impl VmaInfo {
    /// Has a guard region (MADV_GUARD_INSTALL, which zaps what it covers,
    /// copies included) ever been installed in this VMA?  The kernel's
    /// own hint; GUP's EFAULT there, without userfaultfd, is such a guard.
    pub(crate) fn maybe_guard(&self) -> bool {
        self.flags & (1 << bindings::VMA_MAYBE_GUARD_BIT) != 0
    }
}

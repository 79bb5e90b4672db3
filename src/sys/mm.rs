// SPDX-License-Identifier: GPL-2.0

//! A target's address space, locked for writing ([`MmapWriteGuard`]): the
//! VMA lookups and the GUP of one page that need that lock.

use core::ptr::NonNull;
use kernel::{bindings, mm::virt::VmaRef, mm::MmWithUser, prelude::*, types::NotThreadSafe};

use super::{
    folio::PageRef, hugepoke_mmap_write_lock_killable, hugepoke_mmap_write_unlock,
    hugepoke_next_vma_mapping,
};

/// A target's mmap lock, held for writing while PATCH and RESTORE look,
/// check and write, as uprobes holds it: `/proc/PID/mem` and ptrace pokes
/// (`access_remote_vm`) hold it for reading across their copy into the
/// page, so none of their writes can land between our check of the bytes
/// and our write; nor can the target's own `mprotect`/`mremap`/`munmap`.
///
/// # Invariants
///
/// The task that made the guard holds `mm`'s mmap lock for writing for as
/// long as the guard lives.
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
        // INVARIANT: we just took the lock for writing.
        Ok(Self {
            mm,
            _nts: NotThreadSafe,
        })
    }

    /// The VMA that contains `addr` or, if none does, the first one above it.
    pub(crate) fn find_vma(&self, addr: usize) -> Option<&VmaRef> {
        // SAFETY: by the type invariant the mmap lock is held, so the VMA tree
        // is stable and the VMA returned stays valid as long as the borrow.
        unsafe {
            let vma = bindings::find_vma(self.mm.as_raw(), addr as _);
            (!vma.is_null()).then(|| VmaRef::from_raw(vma))
        }
    }

    /// The first VMA at or above `addr` whose file is `mapping` (an
    /// `address_space`, as [`super::VmaInfo`] gives it) and that covers
    /// its page `pgoff`: a filter for walks that look for one file page.
    pub(crate) fn next_vma_mapping(
        &self,
        addr: usize,
        mapping: usize,
        pgoff: usize,
    ) -> Option<&VmaRef> {
        // SAFETY: by the type invariant the mmap lock is held, so the VMA
        // tree is stable while the helper walks it and the VMA returned
        // stays valid as long as the borrow; `mapping` is only compared.
        unsafe {
            let vma = hugepoke_next_vma_mapping(
                self.mm.as_raw(),
                addr,
                mapping as *mut bindings::address_space,
                pgoff,
            );
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
        // SAFETY: `mm` has a user reference and, by the type invariant, its
        // mmap lock is held; `page` has room for the one page asked for.
        let ret = unsafe {
            bindings::get_user_pages_remote(
                self.mm.as_raw(),
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
            Some(page) if ret == 1 => Ok(PageRef::from_gup(page)),
            _ => Err(EFAULT),
        }
    }
}

impl Drop for MmapWriteGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: by the type invariant we hold the lock for writing.
        unsafe { hugepoke_mmap_write_unlock(self.mm.as_raw()) };
    }
}

/// `FOLL_*` flags for [`get_user_page`].
pub(crate) const FOLL_FORCE: u32 = bindings::FOLL_FORCE;
pub(crate) const FOLL_WRITE: u32 = bindings::FOLL_WRITE;
pub(crate) const FOLL_SPLIT_PMD: u32 = bindings::FOLL_SPLIT_PMD;

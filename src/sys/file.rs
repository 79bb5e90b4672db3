// SPDX-License-Identifier: GPL-2.0

//! A file's own mappings: which processes map a file's text privately and
//! executably ([`file_vmas`]), for PATCH_FILE, the way uprobes'
//! `build_map_info()` finds them; and which of them belong to one fork
//! family ([`family_vmas`]), for RESTORE's forked pass.

use core::ptr::NonNull;
use kernel::{alloc::KVVec, bindings, fs::LocalFile, mm::Mm, prelude::*, sync::aref::ARef};

/// One private executable VMA of a file, as the walk saw it: only a
/// candidate, checked again under its mm's own mmap lock before anything
/// is written.
pub(crate) struct FileVma {
    /// With an `mm_count` reference: it does not keep the process alive.
    pub(crate) mm: ARef<Mm>,
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// The file page at `start`.
    pub(crate) pgoff: usize,
}

impl FileVma {
    /// The address of file page `pgoff` in this VMA, if it maps it.
    pub(crate) fn addr_of(&self, pgoff: usize) -> Option<usize> {
        let pages = (self.end - self.start) >> kernel::page::PAGE_SHIFT;
        let i = pgoff.checked_sub(self.pgoff).filter(|&i| i < pages)?;
        Some(self.start + (i << kernel::page::PAGE_SHIFT))
    }
}

/// `struct hugepoke_file_vma`, as the helper fills it in.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct RawFileVma {
    mm: *mut bindings::mm_struct,
    start: usize,
    end: usize,
    pgoff: usize,
}

/// The file's `address_space`, as an identity (what `VmaInfo::mapping` is).
pub(crate) fn file_mapping(file: &LocalFile) -> usize {
    // SAFETY: `file` is a valid, referenced file; `f_mapping` is set at
    // open and stays for its life.
    unsafe { (*file.as_ptr()).f_mapping as usize }
}

/// Every private executable VMA of `file` that maps a page of the folio
/// holding file page `index`, but the caller's own, and the first page past
/// that folio (so one walk serves a whole huge folio).  `E2BIG` if there
/// may be more than `max`; `ENXIO` past EOF, `EINVAL` for no regular file,
/// `EINTR` on a fatal signal, or the error reading the page in.  Sleeps.
pub(crate) fn file_vmas(
    file: &LocalFile,
    index: usize,
    max: usize,
) -> Result<(KVVec<FileVma>, usize)> {
    // SAFETY: `file` is a valid, referenced file; `raw` has room for
    // `room` entries (the walk's contract).
    walk(max, index, |raw, room, next| unsafe {
        super::hugepoke_file_vmas(file.as_ptr(), index, raw, room, next)
    })
}

/// As [`file_vmas`], but only the VMAs of fork `family` (an anonymous
/// copy's [`super::PageRef::family`]) and not `skip`'s: where the
/// processes forked from a patched one map the file.
pub(crate) fn family_vmas(
    file: &LocalFile,
    index: usize,
    family: usize,
    skip: Option<&Mm>,
    max: usize,
) -> Result<(KVVec<FileVma>, usize)> {
    let skip = skip.map_or(core::ptr::null_mut(), Mm::as_raw);
    // SAFETY: as in `file_vmas`; `skip` is only compared.
    walk(max, index, |raw, room, next| unsafe {
        super::hugepoke_family_vmas(file.as_ptr(), index, family, skip, raw, room, next)
    })
}

/// Room for the first try of a walk: most pages have few mappers, and a
/// walk's buffer is allocated whole.
const FIRST_ROOM: usize = 32;

/// A walk of a file's mappings by `helper` (see [`walk_once`]): first with
/// room for a few, then, if that is not enough, for `max`.
fn walk(
    max: usize,
    index: usize,
    helper: impl Fn(*mut RawFileVma, i32, *mut usize) -> i32,
) -> Result<(KVVec<FileVma>, usize)> {
    let first = max.min(FIRST_ROOM);
    match walk_once(first, index, &helper) {
        Err(e) if e == E2BIG && first < max => walk_once(max, index, &helper), // mutant: walk-no-second-try
        walked => walked,
    }
}

/// One walk of a file's mappings by `helper`, given room for `max + 1`
/// entries (its second argument) and where to write the first page past
/// the folio (`index + 1` unless it writes it); it gives each recorded mm
/// an mm_count reference and returns how many it recorded, or a negative
/// errno.  `E2BIG` if there may be more than `max`.
fn walk_once(
    max: usize,
    index: usize,
    helper: &impl Fn(*mut RawFileVma, i32, *mut usize) -> i32,
) -> Result<(KVVec<FileVma>, usize)> {
    let blank = RawFileVma {
        mm: core::ptr::null_mut(),
        start: 0,
        end: 0,
        pgoff: 0,
    };
    // One slot more than `max`: a full walk says there may be more.
    let mut raw = KVVec::new();
    raw.extend_with(max + 1, blank, GFP_KERNEL)?;
    let mut next = index + 1;
    let n = helper(raw.as_mut_ptr(), max as i32 + 1, &mut next);
    if n < 0 {
        return Err(Error::from_errno(n));
    }
    let mut out = KVVec::with_capacity(n as usize, GFP_KERNEL);
    for v in raw.iter().take(n as usize) {
        // SAFETY: the helper took an mm_count reference on `v.mm`, which
        // `ARef<Mm>` (`mmgrab`/`mmdrop`) now owns.
        let mm = unsafe { ARef::from_raw(NonNull::new_unchecked(v.mm.cast::<Mm>())) };
        let vma = FileVma {
            mm,
            start: v.start,
            end: v.end,
            pgoff: v.pgoff,
        };
        if let Ok(out) = &mut out {
            // Within capacity; without room the reference goes here.
            let _ = out.push_within_capacity(vma);
        }
    }
    match out {
        Ok(_) if n as usize > max => Err(E2BIG),
        Ok(v) => Ok((v, next)),
        Err(_) => Err(ENOMEM),
    }
}

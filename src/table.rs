// SPDX-License-Identifier: GPL-2.0

//! Who is patched where: the [`Registry`] of targets and handles, and per
//! target ([`Target`]) the live patches and the collapses queued for it.
//!
//! A patch's identity is the file page it changed in one target: the
//! file's `address_space` and the page offset in it ([`Site::mapping`],
//! [`Site::pgoff`]), plus the target's mm.  Every decision PATCH, RESTORE
//! and the collapse work take — overlap, last patch on a page, last patch
//! in a 2 MiB range, patches of an owner — compares identities, never the
//! address a patch was made at, so they hold after the target `mremap`s
//! its text.  The decisions are plain functions of [`Patches`], which the
//! KUnit suite exercises without a target.
//!
//! Locks, outermost first:
//! 1. `Target::state` — one target's patches.  PATCH, RESTORE and the
//!    collapse work of that target hold it for their whole run, across
//!    GUP, the target's mmap lock and its page-table lock, so they see
//!    and change one consistent set of patches.  Targets never wait for
//!    each other.
//! 2. the target's mmap lock — for writing in PATCH and RESTORE (see
//!    `sys::MmapWriteGuard`), for reading in the collapse work — then its
//!    page-table lock.
//! 3. `Hugepoke::registry` — a leaf: held only to look up or record a
//!    handle or a target, never across GUP, an mm lock or another
//!    target's lock.
//! 4. the journal's spinlock, innermost.

use core::fmt;
use kernel::{
    fs::File,
    mm::{Mm, MmWithUser, MmWithUserAsync},
    new_mutex, prelude::*, sync::aref::ARef, sync::Arc, sync::Mutex};

use crate::{
    live::{self, Live},
    sys,
    uapi::MAX_BYTES,
};

/// Who owns a patch: the open file that made it, or nobody (persistent).
pub(crate) type Owner = Option<u64>;

/// Pages in the range one PMD maps.
const PMD_PAGES: usize = 512;

/// What a patch is, as plain data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Site {
    pub(crate) handle: u64,
    pub(crate) owner: Owner,
    /// Target tgid as the patcher named it.
    pub(crate) pid: i32,
    /// The address the patch was made at (the text may move since).
    pub(crate) addr: usize,
    pub(crate) len: usize,
    pub(crate) flags: u32,
    /// The file's `address_space`, as an identity.
    pub(crate) mapping: usize,
    /// The file page patched.
    pub(crate) pgoff: usize,
    pub(crate) bytes: [u8; MAX_BYTES],
    pub(crate) orig: [u8; MAX_BYTES],
    /// The anonymous page the bytes were written to, at PATCH time.
    pub(crate) pfn: usize,
    /// Is the page-cache folio behind the page PMD-mappable?
    pub(crate) pmd_mappable: bool,
}

impl Site {
    /// Offset of the patch in its page.
    pub(crate) fn offset(&self) -> usize {
        self.addr & !sys::PAGE_MASK
    }

    /// Same file page as `other`?
    pub(crate) fn same_page(&self, mapping: usize, pgoff: usize) -> bool {
        self.mapping == mapping && self.pgoff == pgoff
    }

    /// In the same PMD-sized range of the same file?
    pub(crate) fn same_range(&self, mapping: usize, pgoff: usize) -> bool {
        self.mapping == mapping && self.pgoff / PMD_PAGES == pgoff / PMD_PAGES
    }
}

/// One live patch: what it is, and the file it holds a reference on (so
/// the identity cannot be reused by another file while the patch lives).
pub(crate) struct Patch<F> {
    pub(crate) site: Site,
    /// Held, never read: dropped (fput) with the patch, outside the locks.
    #[allow(dead_code)]
    pub(crate) file: F,
}

/// One target's live patches.  `F` is the file reference (`ARef<File>`;
/// `()` in KUnit).
pub(crate) struct Patches<F> {
    list: KVec<Patch<F>>,
}

impl<F> Patches<F> {
    pub(crate) fn new() -> Self {
        Self { list: KVec::new() }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Site> {
        self.list.iter().map(|p| &p.site)
    }

    pub(crate) fn get(&self, handle: u64) -> Option<&Site> {
        self.iter().find(|s| s.handle == handle)
    }

    pub(crate) fn get_mut(&mut self, handle: u64) -> Option<&mut Site> {
        self.list.iter_mut().map(|p| &mut p.site).find(|s| s.handle == handle)
    }

    /// Would `len` bytes at `offset` of file page `pgoff` overlap a patch?
    pub(crate) fn overlaps(&self, mapping: usize, pgoff: usize, offset: usize, len: usize) -> bool {
        self.iter()
            .any(|s| s.same_page(mapping, pgoff) && s.offset() < offset + len && offset < s.offset() + s.len)
    }

    /// Is any patch but `except` on this file page?
    pub(crate) fn others_on_page(&self, except: u64, mapping: usize, pgoff: usize) -> bool {
        self.iter().any(|s| s.handle != except && s.same_page(mapping, pgoff))
    }

    /// Is any patch but `except` in the PMD-sized file range of `pgoff`?
    pub(crate) fn others_in_range(&self, except: u64, mapping: usize, pgoff: usize) -> bool {
        self.iter().any(|s| s.handle != except && s.same_range(mapping, pgoff))
    }

    /// Handles of the patches `owner` made (all patches for `None`).
    pub(crate) fn handles_of(&self, owner: Owner, out: &mut KVec<u64>) -> Result {
        for s in self.iter().filter(|s| owner.is_none() || s.owner == owner) {
            out.push(s.handle, GFP_KERNEL)?;
        }
        Ok(())
    }

    pub(crate) fn reserve(&mut self) -> Result {
        self.list.reserve(1, GFP_KERNEL).map_err(|_| ENOMEM)
    }

    /// Record a patch; room was reserved with [`Self::reserve`].
    pub(crate) fn insert_reserved(&mut self, site: Site, file: F) {
        // Cannot fail after `reserve`, under the same lock.
        let _ = self.list.push_within_capacity(Patch { site, file });
    }

    /// Forget a patch; returns it (with its file reference) to be dropped
    /// outside the lock, if it was there.
    pub(crate) fn remove(&mut self, handle: u64) -> Option<Patch<F>> {
        let i = self.list.iter().position(|p| p.site.handle == handle)?;
        self.list.remove(i).ok()
    }
}

/// Where a patch's file page is mapped in a VMA, if this VMA maps it.
pub(crate) fn address_in(site: &Site, vma: &sys::VmaInfo) -> Option<usize> {
    vma.address_of(site.mapping, site.pgoff).map(|page| page + site.offset())
}

/// May RESTORE write into the anonymous copy of a patch's page in this
/// VMA?  Only in a private, not writable, executable mapping of the file:
/// the kind of mapping PATCH wrote into.
pub(crate) fn check_restore_vma(vma: &sys::VmaInfo) -> Result<(), &'static str> {
    use kernel::bindings::{VM_EXEC, VM_SHARED, VM_WRITE};
    let has = |flag| vma.flags & flag as usize != 0;
    if has(VM_SHARED) {
        return Err("the patched file page is now mapped shared; nothing written");
    }
    if has(VM_WRITE) {
        return Err("the patched file page is now mapped writable; nothing written");
    }
    if !has(VM_EXEC) {
        return Err("the patched file page is now mapped without exec; nothing written");
    }
    Ok(())
}

/// One target: an mm with patches or queued collapses.
#[pin_data]
pub(crate) struct Target {
    /// The target's address space, by `mm_count` only: it does not keep
    /// the process's memory alive.
    pub(crate) mm: ARef<Mm>,
    #[pin]
    pub(crate) state: Mutex<TargetState>,
    _live: Live,
}

pub(crate) struct TargetState {
    pub(crate) patches: Patches<ARef<File>>,
    /// Queued, not yet started collapses: (mapping, PMD-sized file range).
    pub(crate) pending_collapses: KVec<(usize, usize)>,
    /// Out of the registry: a new PATCH must look the target up again.
    pub(crate) retired: bool,
}

impl Target {
    pub(crate) fn new(mm: &Mm) -> Result<Arc<Self>> {
        Arc::pin_init(
            pin_init!(Self {
                mm: ARef::from(mm),
                state <- new_mutex!(
                    TargetState { patches: Patches::new(), pending_collapses: KVec::new(), retired: false },
                    "hugepoke_target"
                ),
                _live: Live::new(&live::TARGETS),
            }),
            GFP_KERNEL,
        )
    }

    pub(crate) fn mm_id(&self) -> usize {
        sys::mm_id(&self.mm)
    }

    /// A user reference on the target's address space, unless the process
    /// is gone.  Dropped with `mmput_async`: the last `mmput` of a target
    /// never runs under our locks.
    pub(crate) fn mm_user(&self) -> Option<ARef<MmWithUserAsync>> {
        self.mm.mmget_not_zero().map(MmWithUser::into_mmput_async)
    }

    /// Has the target process's address space gone away?
    pub(crate) fn gone(&self) -> bool {
        self.mm_user().is_none()
    }
}

impl TargetState {
    /// Nothing left for this target: no patch, no queued collapse.
    pub(crate) fn idle(&self) -> bool {
        self.patches.is_empty() && self.pending_collapses.is_empty()
    }
}

/// Every target and every handle.  See the lock order above.
pub(crate) struct Registry {
    targets: KVec<Arc<Target>>,
    /// Every handle, its owner (as PATCH recorded it, or `None` once the
    /// patch became persistent) and its target: a closing file visits the
    /// targets it patched and waits for no other.
    handles: KVec<(u64, Owner, Arc<Target>)>,
    next_handle: u64,
    /// Set at module unload: no new patches.
    pub(crate) closing: bool,
}

impl Registry {
    pub(crate) fn new() -> Self {
        Self { targets: KVec::new(), handles: KVec::new(), next_handle: 1, closing: false }
    }

    /// The target for `mm`, made if there is none.
    pub(crate) fn target_for(&mut self, mm: &Mm) -> Result<Arc<Target>> {
        let id = sys::mm_id(mm);
        if let Some(t) = self.targets.iter().find(|t| t.mm_id() == id) {
            return Ok(t.clone());
        }
        let t = Target::new(mm)?;
        self.targets.push(t.clone(), GFP_KERNEL)?;
        Ok(t)
    }

    /// A new handle for a patch of `target`, recorded before the patch is
    /// made (so that recording cannot fail after the bytes are written).
    pub(crate) fn new_handle(&mut self, target: &Arc<Target>, owner: Owner) -> Result<u64> {
        let handle = self.next_handle;
        self.handles.push((handle, owner, target.clone()), GFP_KERNEL)?;
        self.next_handle += 1;
        Ok(handle)
    }

    pub(crate) fn target_of(&self, handle: u64) -> Option<Arc<Target>> {
        self.handles.iter().find(|(h, _, _)| *h == handle).map(|(_, _, t)| t.clone())
    }

    /// The patch behind `handle` now belongs to nobody (persistent).
    pub(crate) fn disown(&mut self, handle: u64) {
        if let Some(entry) = self.handles.iter_mut().find(|(h, _, _)| *h == handle) {
            entry.1 = None;
        }
    }

    /// Forget a handle; the target reference is returned to be dropped
    /// outside the lock.
    pub(crate) fn forget_handle(&mut self, handle: u64) -> Option<Arc<Target>> {
        let i = self.handles.iter().position(|(h, _, _)| *h == handle)?;
        self.handles.remove(i).ok().map(|(_, _, t)| t)
    }

    /// Take a target out of the registry (its state is locked by the
    /// caller and idle).
    pub(crate) fn retire(&mut self, target: &Target, state: &mut TargetState) -> Option<Arc<Target>> {
        state.retired = true;
        let id = target.mm_id();
        let i = self.targets.iter().position(|t| t.mm_id() == id)?;
        self.targets.remove(i).ok()
    }

    /// The targets `owner` has patches on (every target for `None`), for
    /// walking without the registry lock.
    pub(crate) fn targets_of(&self, owner: Owner) -> Result<KVec<Arc<Target>>> {
        if owner.is_none() {
            return self.targets();
        }
        let mut v: KVec<Arc<Target>> = KVec::new();
        for (_, o, t) in self.handles.iter() {
            if *o == owner && !v.iter().any(|seen| Arc::ptr_eq(seen, t)) {
                v.push(t.clone(), GFP_KERNEL)?;
            }
        }
        Ok(v)
    }

    /// Every target, for walking without the registry lock.
    pub(crate) fn targets(&self) -> Result<KVec<Arc<Target>>> {
        let mut v = KVec::with_capacity(self.targets.len(), GFP_KERNEL)?;
        for t in self.targets.iter() {
            v.push(t.clone(), GFP_KERNEL)?;
        }
        Ok(v)
    }
}

/// `patches` in debugfs, one target at a time.
pub(crate) fn write_patches(targets: &[Arc<Target>], f: &mut impl fmt::Write) -> fmt::Result {
    writeln!(f, "# handle pid addr len state pfn owner pmd_mappable bytes orig")?;
    for t in targets {
        let gone = t.gone();
        // A target busy in a long PATCH or RESTORE (GUP can wait on a
        // fault) must not hold up this reader, nor anything behind it; a
        // short holder (QUERY, a collapse) is waited out for a moment.
        let state = (0..50).find_map(|_| {
            let locked = t.state.try_lock();
            if locked.is_none() {
                kernel::time::delay::fsleep(kernel::time::Delta::from_millis(2));
            }
            locked
        });
        let Some(state) = state else {
            writeln!(f, "# a target is busy (PATCH, RESTORE or collapse running): its patches are not listed")?;
            continue;
        };
        for p in state.patches.iter() {
            write!(
                f,
                "{} {} {:#x} {} {} {:#x} ",
                p.handle,
                p.pid,
                p.addr,
                p.len,
                if gone { "gone" } else { "live" },
                p.pfn
            )?;
            match p.owner {
                Some(o) => write!(f, "file:{o} ")?,
                None => write!(f, "persistent ")?,
            }
            write!(f, "{} ", if p.pmd_mappable { "yes" } else { "no" })?;
            write_hex(f, &p.bytes[..p.len])?;
            write!(f, " ")?;
            write_hex(f, &p.orig[..p.len])?;
            writeln!(f)?;
        }
    }
    Ok(())
}

pub(crate) fn write_hex(f: &mut impl fmt::Write, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

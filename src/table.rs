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
//! A handle names one site (PATCH) or up to `MAX_BATCH` (PATCH_BATCH).
//! Every lookup is O(log N): [`Patches`] keeps a target's sites in
//! red-black trees by position (file page and offset) and by handle, with
//! counts per file page and per 2 MiB file range; the [`Registry`] keeps
//! targets, handles and each owner's targets the same way.
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
//!    target's lock.  It is the only lock all targets share, so PATCH,
//!    RESTORE and collapses of different targets run in parallel.
//! 4. the journal's spinlock, innermost (taken for one record, also
//!    under a page-table lock).

use core::fmt;
use kernel::{
    alloc::KVVec,
    fs::File,
    mm::{Mm, MmWithUser, MmWithUserAsync},
    new_mutex,
    prelude::*,
    rbtree::{Entry, RBTree, RBTreeNode, RBTreeNodeReservation},
    sync::aref::ARef,
    sync::Arc,
    sync::Mutex,
};

use crate::{
    live::{self, Live},
    sys,
    uapi::MAX_BYTES,
};

/// Who owns a patch: the open file that made it, or nobody (persistent).
pub(crate) type Owner = Option<u64>;

/// Pages in the range one PMD maps.
const PMD_PAGES: usize = 512;

/// What a patch is, as plain data: one site (a single PATCH has one, a
/// PATCH_BATCH up to `MAX_BATCH` under one handle).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Site {
    pub(crate) handle: u64,
    /// Which site of the handle, in the order PATCH_BATCH was given them.
    pub(crate) index: u32,
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

    fn key(&self) -> SiteKey {
        (self.mapping, self.pgoff, self.offset())
    }

    pub(crate) fn page_key(&self) -> PageKey {
        (self.mapping, self.pgoff)
    }

    pub(crate) fn range_key(&self) -> PageKey {
        (self.mapping, self.pgoff / PMD_PAGES)
    }
}

/// Where a site is: file `address_space`, page offset, offset in the page.
type SiteKey = (usize, usize, usize);
/// A file page `(mapping, pgoff)`, or a PMD-sized file range `(mapping, pgoff / 512)`.
pub(crate) type PageKey = (usize, usize);

/// One live patch site: what it is, and the file it holds a reference on
/// (so the identity cannot be reused by another file while the patch lives).
pub(crate) struct Patch<F> {
    pub(crate) site: Site,
    /// Held, never read: dropped (fput) with the patch, outside the locks.
    #[allow(dead_code)]
    pub(crate) file: F,
}

/// What the table knows of a handle.
#[derive(Clone, Copy)]
struct HandleInfo {
    count: u32,
    owner: Owner,
}

/// One target's live patches, indexed so that every decision PATCH and
/// RESTORE take costs O(log N) in the target's N sites: overlap (the one
/// site before the end of the new range), last on a page and last in a
/// 2 MiB range (counts), a handle's sites and an owner's handles (ordered
/// keys).  `F` is the file reference (`ARef<File>`; `()` in KUnit).
pub(crate) struct Patches<F> {
    sites: RBTree<SiteKey, Patch<F>>,
    by_handle: RBTree<(u64, u32), SiteKey>,
    per_page: RBTree<PageKey, u32>,
    per_range: RBTree<PageKey, u32>,
    handles: RBTree<u64, HandleInfo>,
    /// `(owner, handle)` of the handles a file owns (not the persistent).
    owned: RBTree<(u64, u64), ()>,
}

/// Room for one site in every index, reserved before anything is written.
struct SiteRoom<F> {
    site: RBTreeNodeReservation<SiteKey, Patch<F>>,
    by_handle: RBTreeNodeReservation<(u64, u32), SiteKey>,
}

/// A count node for a file page or a 2 MiB range.
type CountRoom = RBTreeNodeReservation<PageKey, u32>;

/// Room for one handle of `count` sites on at most `pages` file pages
/// (see [`Patches::reserve`]).
pub(crate) struct Reserved<F> {
    handle: RBTreeNodeReservation<u64, HandleInfo>,
    owned: RBTreeNodeReservation<(u64, u64), ()>,
    sites: KVVec<SiteRoom<F>>,
    /// One page count and one range count per file page, at most.
    counts: KVVec<CountRoom>,
}

/// Add one to the count at `key`, using a node of `rooms` if the key is
/// new (there is one: a page or range new to the table is one of the
/// pages the room was reserved for).
fn count_up(tree: &mut RBTree<PageKey, u32>, key: PageKey, rooms: &mut KVVec<CountRoom>) {
    match tree.entry(key) {
        Entry::Occupied(mut e) => *e.get_mut() += 1,
        Entry::Vacant(e) => {
            if let Some(room) = rooms.pop() {
                e.insert(1, room);
            }
        }
    }
}

/// Take one from the count at `key`; the node goes when it reaches 0.
fn count_down(tree: &mut RBTree<PageKey, u32>, key: PageKey) {
    if let Some(mut e) = tree.find_mut(&key) {
        if *e.get() <= 1 {
            drop(e.remove_node());
        } else {
            *e.get_mut() -= 1;
        }
    }
}

impl<F> Patches<F> {
    pub(crate) fn new() -> Self {
        Self {
            sites: RBTree::new(),
            by_handle: RBTree::new(),
            per_page: RBTree::new(),
            per_range: RBTree::new(),
            handles: RBTree::new(),
            owned: RBTree::new(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Every site, in file-page order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Site> {
        self.sites.values().map(|p| &p.site)
    }

    /// Site `index` of `handle`.
    pub(crate) fn get(&self, handle: u64, index: u32) -> Option<&Site> {
        let key = self.by_handle.get(&(handle, index))?;
        self.sites.get(key).map(|p| &p.site)
    }

    /// How many sites `handle` has (0 if it is not here).
    pub(crate) fn count(&self, handle: u64) -> u32 {
        self.handles.get(&handle).map_or(0, |h| h.count)
    }

    /// The sites of `handle`, in index order.  Indexes need not be
    /// 0..count: a batch that kept only some of its sites keeps theirs.
    pub(crate) fn sites_of_handle(&self, handle: u64) -> impl Iterator<Item = &Site> {
        let mut next = Some((handle, 0u32));
        core::iter::from_fn(move || {
            let c = self.by_handle.cursor_lower_bound(&next?)?;
            let (&(h, i), key) = c.current();
            if h != handle {
                return None;
            }
            next = i.checked_add(1).map(|i| (handle, i));
            self.sites.get(key).map(|p| &p.site)
        })
    }

    /// Copies of every site of `handle`, in file-page order (pages
    /// grouped), for RESTORE to work from without holding the table.
    pub(crate) fn sites_of(&self, handle: u64) -> Result<KVVec<Site>> {
        let mut v = KVVec::with_capacity(self.count(handle) as usize, GFP_KERNEL)?;
        for s in self.sites_of_handle(handle) {
            v.push(*s, GFP_KERNEL)?;
        }
        v.sort_unstable_by_key(|s| s.key());
        Ok(v)
    }

    /// Would `len` bytes at `offset` of file page `pgoff` overlap a patch?
    /// Sites on a page never overlap each other, so only the last one that
    /// starts before `offset + len` can.
    pub(crate) fn overlaps(&self, mapping: usize, pgoff: usize, offset: usize, len: usize) -> bool {
        let end = (mapping, pgoff, offset + len);
        let before = match self.sites.cursor_lower_bound(&end) {
            Some(c) => c.peek_prev().map(|(k, p)| (*k, p.site.len)),
            None => self.sites.cursor_back().map(|c| {
                let (k, p) = c.current();
                (*k, p.site.len)
            }),
        };
        before.is_some_and(|((m, p, o), l)| m == mapping && p == pgoff && o + l > offset)
    }

    /// Live sites on file page `(mapping, pgoff)`.
    pub(crate) fn on_page(&self, page: PageKey) -> u32 {
        self.per_page.get(&page).copied().unwrap_or(0)
    }

    /// Live sites in the PMD-sized file range `(mapping, pgoff / 512)`.
    pub(crate) fn in_range(&self, range: PageKey) -> u32 {
        self.per_range.get(&range).copied().unwrap_or(0)
    }

    /// Handles of the patches `owner` made (every handle for `None`).
    pub(crate) fn handles_of(&self, owner: Owner, out: &mut KVec<u64>) -> Result {
        match owner {
            None => {
                for h in self.handles.keys() {
                    out.push(*h, GFP_KERNEL)?;
                }
            }
            Some(o) => {
                // Ordered by (owner, handle): from the owner's first on.
                let mut next = (o, 0);
                while let Some(c) = self.owned.cursor_lower_bound(&next) {
                    let &(owner, handle) = c.current().0;
                    if owner != o {
                        break;
                    }
                    out.push(handle, GFP_KERNEL)?;
                    next = (o, handle + 1);
                }
            }
        }
        Ok(())
    }

    /// Room for a handle of `count` sites on at most `pages` file pages,
    /// so that recording cannot fail once the bytes are written.
    pub(crate) fn reserve(&self, count: usize, pages: usize) -> Result<Reserved<F>> {
        let mut sites = KVVec::with_capacity(count, GFP_KERNEL)?;
        for _ in 0..count {
            sites.push(
                SiteRoom { site: RBTreeNodeReservation::new(GFP_KERNEL)?, by_handle: RBTreeNodeReservation::new(GFP_KERNEL)? },
                GFP_KERNEL,
            )?;
        }
        let mut counts = KVVec::with_capacity(2 * pages, GFP_KERNEL)?;
        for _ in 0..2 * pages {
            counts.push(RBTreeNodeReservation::new(GFP_KERNEL)?, GFP_KERNEL)?;
        }
        Ok(Reserved {
            handle: RBTreeNodeReservation::new(GFP_KERNEL)?,
            owned: RBTreeNodeReservation::new(GFP_KERNEL)?,
            sites,
            counts,
        })
    }

    /// Record the sites of one handle (all with the same `handle` and
    /// `owner`, indexes 0..n), in the room `reserved` for at least as many.
    pub(crate) fn insert(&mut self, reserved: Reserved<F>, sites: impl Iterator<Item = (Site, F)>) {
        let Reserved { handle: handle_room, owned: owned_room, sites: mut rooms, mut counts } = reserved;
        let mut info: Option<(u64, HandleInfo)> = None;
        for (site, file) in sites {
            // Room was reserved for every site.
            let Some(room) = rooms.pop() else { break };
            let key = site.key();
            info.get_or_insert((site.handle, HandleInfo { count: 0, owner: site.owner })).1.count += 1;
            count_up(&mut self.per_page, site.page_key(), &mut counts);
            count_up(&mut self.per_range, site.range_key(), &mut counts);
            self.by_handle.insert(room.by_handle.into_node((site.handle, site.index), key));
            self.sites.insert(room.site.into_node(key, Patch { site, file }));
        }
        if let Some((handle, info)) = info {
            if let Some(o) = info.owner {
                self.owned.insert(owned_room.into_node((o, handle), ()));
            }
            self.handles.insert(handle_room.into_node(handle, info));
        }
    }

    /// Forget one site; returns it (with its file reference) to be dropped
    /// outside the lock, if it was there.  The handle goes with its last site.
    pub(crate) fn remove(&mut self, handle: u64, index: u32) -> Option<Patch<F>> {
        let key = self.by_handle.remove(&(handle, index))?;
        let patch = self.sites.remove(&key)?;
        count_down(&mut self.per_page, patch.site.page_key());
        count_down(&mut self.per_range, patch.site.range_key());
        let last = match self.handles.get_mut(&handle) {
            Some(info) => {
                info.count -= 1;
                info.count == 0
            }
            None => false,
        };
        if last {
            if let Some(HandleInfo { owner: Some(o), .. }) = self.handles.remove(&handle) {
                self.owned.remove(&(o, handle));
            }
        }
        Some(patch)
    }

    /// The patches behind `handle` now belong to nobody (persistent).
    pub(crate) fn disown(&mut self, handle: u64) {
        let Some(info) = self.handles.get_mut(&handle) else { return };
        if let Some(o) = info.owner.take() {
            self.owned.remove(&(o, handle));
        }
        let mut next = (handle, 0u32);
        while let Some(c) = self.by_handle.cursor_lower_bound(&next) {
            let (&(h, i), &key) = c.current();
            if h != handle {
                break;
            }
            if let Some(p) = self.sites.get_mut(&key) {
                p.site.owner = None;
            }
            let Some(i) = i.checked_add(1) else { break };
            next = (handle, i);
        }
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

/// A target's identity in [`Registry::owner_targets`].
fn target_key(target: &Target) -> usize {
    core::ptr::from_ref(target) as usize
}

/// Every target and every handle, each lookup O(log N).  See the lock
/// order above.
pub(crate) struct Registry {
    /// By `mm_id`.
    targets: RBTree<usize, Arc<Target>>,
    /// Every handle, its owner (as PATCH recorded it, or `None` once the
    /// patch became persistent) and its target: a closing file visits the
    /// targets it patched and waits for no other.
    handles: RBTree<u64, (Owner, Arc<Target>)>,
    /// `(owner, target)` → how many of the owner's handles are on that
    /// target (by the target's address: a retired target and a newer one
    /// for the same mm are two).
    owner_targets: RBTree<(u64, usize), (u32, Arc<Target>)>,
    next_handle: u64,
    /// Set at module unload: no new patches.
    pub(crate) closing: bool,
}

impl Registry {
    pub(crate) fn new() -> Self {
        Self {
            targets: RBTree::new(),
            handles: RBTree::new(),
            owner_targets: RBTree::new(),
            next_handle: 1,
            closing: false,
        }
    }

    /// The target for `mm`, made if there is none.
    pub(crate) fn target_for(&mut self, mm: &Mm) -> Result<Arc<Target>> {
        let id = sys::mm_id(mm);
        if let Some(t) = self.targets.get(&id) {
            return Ok(t.clone());
        }
        let t = Target::new(mm)?;
        self.targets.try_create_and_insert(id, t.clone(), GFP_KERNEL)?;
        Ok(t)
    }

    /// A new handle for a patch of `target`, recorded before the patch is
    /// made (so that recording cannot fail after the bytes are written).
    pub(crate) fn new_handle(&mut self, target: &Arc<Target>, owner: Owner) -> Result<u64> {
        let handle = self.next_handle;
        let handle_node = RBTreeNode::new(handle, (owner, target.clone()), GFP_KERNEL)?;
        if let Some(o) = owner {
            let key = (o, target_key(target));
            match self.owner_targets.entry(key) {
                Entry::Occupied(mut e) => e.get_mut().0 += 1,
                Entry::Vacant(e) => {
                    e.insert((1, target.clone()), RBTreeNodeReservation::new(GFP_KERNEL)?);
                }
            }
        }
        self.handles.insert(handle_node);
        self.next_handle += 1;
        Ok(handle)
    }

    pub(crate) fn target_of(&self, handle: u64) -> Option<Arc<Target>> {
        self.handles.get(&handle).map(|(_, t)| t.clone())
    }

    /// `owner` has one handle fewer on `target`; returns the reference to
    /// drop outside the lock when it was its last there.
    fn owner_leaves(&mut self, owner: u64, target: &Target) -> Option<(u32, Arc<Target>)> {
        let mut e = self.owner_targets.find_mut(&(owner, target_key(target)))?;
        if e.get().0 > 1 {
            e.get_mut().0 -= 1;
            return None;
        }
        Some(e.remove_node().to_key_value().1)
    }

    /// The patch behind `handle` now belongs to nobody (persistent); a
    /// reference to drop outside the lock may come back.
    pub(crate) fn disown(&mut self, handle: u64) -> Option<(u32, Arc<Target>)> {
        let (owner, target) = self.handles.get_mut(&handle)?;
        let owner = owner.take()?;
        let target = target.clone();
        self.owner_leaves(owner, &target)
    }

    /// Forget a handle; the target references are returned to be dropped
    /// outside the lock.
    pub(crate) fn forget_handle(&mut self, handle: u64) -> Option<(Arc<Target>, Option<(u32, Arc<Target>)>)> {
        let (owner, target) = self.handles.remove(&handle)?;
        let left = owner.and_then(|o| self.owner_leaves(o, &target));
        Some((target, left))
    }

    /// Take a target out of the registry (its state is locked by the
    /// caller and idle).
    pub(crate) fn retire(&mut self, target: &Target, state: &mut TargetState) -> Option<Arc<Target>> {
        state.retired = true;
        // Only this target: a newer one for the same mm stays.
        let id = target.mm_id();
        if !self.targets.get(&id).is_some_and(|t| core::ptr::eq(&**t, target)) {
            return None;
        }
        self.targets.remove(&id)
    }

    /// The targets `owner` has patches on (every target for `None`), for
    /// walking without the registry lock.
    pub(crate) fn targets_of(&self, owner: Owner) -> Result<KVec<Arc<Target>>> {
        let Some(o) = owner else { return self.targets() };
        let mut v: KVec<Arc<Target>> = KVec::new();
        let mut next = (o, 0);
        while let Some(c) = self.owner_targets.cursor_lower_bound(&next) {
            let (&(owner, id), (_, t)) = c.current();
            if owner != o {
                break;
            }
            v.push(t.clone(), GFP_KERNEL)?;
            next = (o, id + 1);
        }
        Ok(v)
    }

    /// Every target, for walking without the registry lock.
    pub(crate) fn targets(&self) -> Result<KVec<Arc<Target>>> {
        let mut v = KVec::new();
        for t in self.targets.values() {
            v.push(t.clone(), GFP_KERNEL)?;
        }
        Ok(v)
    }
}

/// `patches` in debugfs, one target at a time.
pub(crate) fn write_patches(targets: &[Arc<Target>], f: &mut impl fmt::Write) -> fmt::Result {
    writeln!(f, "# handle pid addr len state pfn owner pmd_mappable bytes orig site")?;
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
            writeln!(f, " {}/{}", p.index, state.patches.count(p.handle))?;
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

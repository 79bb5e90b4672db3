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
//! Every lookup is O(log N), and a batch costs per file page, not per
//! site: [`Patches`] keeps a red-black tree of the file pages that hold
//! sites (each with its sites by offset in one vector), one of handles
//! (each with its sites in one vector) and counts per 2 MiB file range;
//! the [`Registry`] keeps targets, handles and each owner's targets in
//! trees too.
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

/// One site's place on its file page: enough to decide overlaps and to
/// find the site among its handle's.
#[derive(Clone, Copy)]
struct Slot {
    offset: u16,
    len: u16,
    /// Where the site is in its handle's vector.
    pos: u32,
    handle: u64,
}

/// The live sites on one file page, by offset (they never overlap), and a
/// reference on the file while any is there (so the identity cannot be
/// reused by another file while a patch lives).
struct PageSites<F> {
    slots: KVVec<Slot>,
    /// Held, never read: dropped (fput) with the page's last site, outside
    /// the locks.
    #[allow(dead_code)]
    file: F,
}

/// The live sites of one file page, to check many new sites against.
#[derive(Clone, Copy)]
pub(crate) struct OnPage<'a>(&'a [Slot]);

impl OnPage<'_> {
    /// Would `len` bytes at `offset` overlap a site?  Sites on a page never
    /// overlap each other, so only the last one that starts before
    /// `offset + len` can.
    pub(crate) fn overlaps(&self, offset: usize, len: usize) -> bool {
        let i = self.0.partition_point(|s| (s.offset as usize) < offset + len);
        i > 0 && {
            let s = &self.0[i - 1];
            s.offset as usize + s.len as usize > offset
        }
    }
}

/// Merge `n` new slots (`slot(0..n)`, by offset) into `slots` (by offset),
/// from the back: O(len + n), and no allocation.  False, and nothing
/// merged, if the room reserved for them is not there.
fn merge_slots(slots: &mut KVVec<Slot>, n: usize, slot: impl Fn(usize) -> Slot) -> bool {
    let k = slots.len();
    if slots.capacity() - k < n {
        return false;
    }
    for j in 0..n {
        let _ = slots.push_within_capacity(slot(j));
    }
    // Slots k.. hold the new ones for now; each is taken again from `slot`.
    let (mut i, mut j) = (k, n);
    while j > 0 && i > 0 {
        let new = slot(j - 1);
        let w = i + j - 1;
        if slots[i - 1].offset > new.offset {
            slots[w] = slots[i - 1];
            i -= 1;
        } else {
            slots[w] = new;
            j -= 1;
        }
    }
    // Left over: new slots below every old one, already at 0..j.
    for j in 0..j {
        slots[j] = slot(j);
    }
    true
}

/// A handle's sites in index order, and which of them are forgotten (a
/// RESTORE forgets them a file page at a time; the vector stays).
struct HandleSites {
    owner: Owner,
    live: u32,
    sites: KVVec<Site>,
    /// A bit a site, set when forgotten.
    forgotten: KVVec<u64>,
}

impl HandleSites {
    fn is_live(&self, pos: usize) -> bool {
        self.forgotten.get(pos / 64).is_some_and(|w| w & (1 << (pos % 64)) == 0)
    }

    fn live(&self) -> impl Iterator<Item = &Site> {
        self.sites.iter().enumerate().filter(|(pos, _)| self.is_live(*pos)).map(|(_, s)| s)
    }

    fn position(&self, index: u32) -> Option<usize> {
        self.sites.binary_search_by_key(&index, |s| s.index).ok()
    }

    fn forget(&mut self, pos: usize) {
        if let Some(w) = self.forgotten.get_mut(pos / 64) {
            *w |= 1 << (pos % 64);
        }
    }
}

/// What a RESTORE takes out of the table: how many sites, and the file
/// reference that went with the page's last one, to drop outside the locks.
pub(crate) struct Forgotten<F> {
    pub(crate) sites: u32,
    #[allow(dead_code)]
    pub(crate) file: Option<F>,
}

/// One target's live patches, indexed so that every decision PATCH and
/// RESTORE take costs O(log N) in the target's N sites and a batch costs
/// per file page, not per site: a tree of file pages, each with its sites
/// by offset (overlap: one search; last on a page: its length), counts per
/// 2 MiB file range, and a tree of handles, each with its sites in one
/// vector.  `F` is the file reference (`ARef<File>`; `()` in KUnit).
pub(crate) struct Patches<F> {
    pages: RBTree<PageKey, PageSites<F>>,
    per_range: RBTree<PageKey, u32>,
    handles: RBTree<u64, HandleSites>,
    /// `(owner, handle)` of the handles a file owns (not the persistent).
    owned: RBTree<(u64, u64), ()>,
}

/// A node and a slot vector for a file page new to the table.
struct PageRoom<F> {
    key: PageKey,
    node: RBTreeNodeReservation<PageKey, PageSites<F>>,
    slots: KVVec<Slot>,
}

/// A count node for a 2 MiB range.
type CountRoom = RBTreeNodeReservation<PageKey, u32>;

/// Room for one handle of `count` sites on the file pages it was reserved
/// for (see [`Patches::reserve`]), so that recording cannot fail.
pub(crate) struct Reserved<F> {
    handle: RBTreeNodeReservation<u64, HandleSites>,
    owned: RBTreeNodeReservation<(u64, u64), ()>,
    forgotten: KVVec<u64>,
    /// For the pages not in the table yet, in the order given.
    pages: KVVec<Option<PageRoom<F>>>,
    /// One range count node per page new to the table, at most.
    ranges: KVVec<CountRoom>,
}

impl<F> Patches<F> {
    pub(crate) fn new() -> Self {
        Self { pages: RBTree::new(), per_range: RBTree::new(), handles: RBTree::new(), owned: RBTree::new() }
    }

    /// No site at all (a handle leaves with its last site).
    pub(crate) fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Every site, by handle.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Site> {
        self.handles.values().flat_map(|h| h.live())
    }

    /// Site `index` of `handle`.
    pub(crate) fn get(&self, handle: u64, index: u32) -> Option<&Site> {
        let h = self.handles.get(&handle)?;
        let pos = h.position(index)?;
        h.is_live(pos).then(|| &h.sites[pos])
    }

    /// How many sites `handle` has (0 if it is not here).
    pub(crate) fn count(&self, handle: u64) -> u32 {
        self.handles.get(&handle).map_or(0, |h| h.live)
    }

    /// The sites of `handle`, in index order.  Indexes need not be
    /// 0..count: a batch that kept only some of its sites keeps theirs.
    pub(crate) fn sites_of_handle(&self, handle: u64) -> impl Iterator<Item = &Site> {
        self.handles.get(&handle).into_iter().flat_map(|h| h.live())
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
    pub(crate) fn overlaps(&self, mapping: usize, pgoff: usize, offset: usize, len: usize) -> bool {
        self.page(&(mapping, pgoff)).overlaps(offset, len)
    }

    /// The live sites of file page `page`.
    pub(crate) fn page(&self, page: &PageKey) -> OnPage<'_> {
        OnPage(self.pages.get(page).map_or(&[], |p| &p.slots[..]))
    }

    /// Live sites on file page `(mapping, pgoff)`.
    pub(crate) fn on_page(&self, page: PageKey) -> u32 {
        self.pages.get(&page).map_or(0, |p| p.slots.len() as u32)
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

    /// Room for a handle of `count` sites on `pages` (each file page once,
    /// with how many of the sites are on it), so that recording cannot
    /// fail once the bytes are written.  Pages already in the table get
    /// room in their own slot vectors now; nothing else may change the
    /// table (the target's state stays locked) until [`Self::insert`].
    pub(crate) fn reserve(&mut self, count: usize, pages: impl Iterator<Item = (PageKey, usize)>) -> Result<Reserved<F>> {
        // One look at each page: room for the new ones grows as they come.
        let (mut rooms, mut ranges) = (KVVec::new(), KVVec::new());
        for (key, n) in pages {
            if let Some(page) = self.pages.get_mut(&key) {
                page.slots.reserve(n, GFP_KERNEL)?;
                continue;
            }
            rooms.push(
                Some(PageRoom { key, node: RBTreeNodeReservation::new(GFP_KERNEL)?, slots: KVVec::with_capacity(n, GFP_KERNEL)? }),
                GFP_KERNEL,
            )?;
            ranges.push(RBTreeNodeReservation::new(GFP_KERNEL)?, GFP_KERNEL)?;
        }
        let mut forgotten = KVVec::new();
        forgotten.extend_with(count.div_ceil(64), 0, GFP_KERNEL)?;
        Ok(Reserved {
            handle: RBTreeNodeReservation::new(GFP_KERNEL)?,
            owned: RBTreeNodeReservation::new(GFP_KERNEL)?,
            forgotten,
            pages: rooms,
            ranges,
        })
    }

    /// Record `sites`, one handle's (all with the same `handle` and
    /// `owner`, at most as many as reserved), in the room `reserved` for
    /// them.  `pages` groups them by file page: each page's run of `sites`
    /// (by offset) and the file it is mapped from (taken if the page is new
    /// to the table); the runs cover `sites`, and come in the order the
    /// pages were reserved in (some may be left out: the kept part of a
    /// failed batch).  Returns how many sites it could not record, which
    /// only a caller that broke that contract sees (the kernel warns): 0.
    pub(crate) fn insert<'a>(
        &mut self,
        reserved: Reserved<F>,
        mut sites: KVVec<Site>,
        pages: impl Iterator<Item = (core::ops::Range<usize>, &'a mut Option<F>)>,
    ) -> usize
    where
        F: 'a,
    {
        let Reserved { handle: handle_room, owned: owned_room, forgotten, pages: mut rooms, mut ranges } = reserved;
        let Some(&Site { handle, owner, .. }) = sites.first() else { return 0 };
        // The handle's vector is kept in index order: if `sites` is not in
        // it, the slots are pointed at their sites once it is.
        let in_order = sites.is_sorted_by_key(|s| s.index);
        // New pages come in the order reserved (some may be skipped).
        let mut next_room = 0;
        for (range, file) in pages {
            let start = range.start;
            let run = &sites[range.clone()];
            let Some(first) = run.first() else { continue };
            let (key, range_key, n) = (first.page_key(), first.range_key(), run.len());
            let slot = |k: usize| {
                let s = &run[k];
                Slot { offset: s.offset() as u16, len: s.len as u16, pos: (start + k) as u32, handle }
            };
            // Everything the run needs is there before any of it is used.
            let range_room = self.per_range.get(&range_key).is_some() || !ranges.is_empty();
            let placed = range_room
                && match self.pages.get_mut(&key) {
                    // Room was reserved in its vector.
                    Some(page) => merge_slots(&mut page.slots, n, slot),
                    None => {
                        let found = (next_room..rooms.len()).find(|&i| rooms[i].as_ref().is_some_and(|r| r.key == key));
                        match (found, file.is_some()) {
                            (Some(i), true) => match (rooms[i].take(), file.take()) {
                                (Some(mut room), Some(file)) => {
                                    next_room = i + 1;
                                    let merged = merge_slots(&mut room.slots, n, slot);
                                    if merged {
                                        self.pages.insert(room.node.into_node(key, PageSites { slots: room.slots, file }));
                                    }
                                    merged
                                }
                                _ => false,
                            },
                            _ => false,
                        }
                    }
                };
            if !placed {
                // The target holds these bytes and the table would not
                // know of them: the caller journals it.
                for s in &mut sites[range] {
                    s.len = 0;
                }
                continue;
            }
            match self.per_range.entry(range_key) {
                Entry::Occupied(mut e) => *e.get_mut() += n as u32,
                Entry::Vacant(e) => {
                    if let Some(room) = ranges.pop() {
                        e.insert(n as u32, room);
                    }
                }
            }
        }
        if !in_order {
            sites.sort_unstable_by_key(|s| s.index);
            for (pos, s) in sites.iter().enumerate() {
                let Some(page) = self.pages.get_mut(&s.page_key()) else { continue };
                let at = page.slots.partition_point(|slot| (slot.offset as usize) < s.offset());
                if let Some(slot) = page.slots.get_mut(at).filter(|slot| slot.handle == handle && slot.offset as usize == s.offset()) {
                    slot.pos = pos as u32;
                }
            }
        }
        let mut h = HandleSites { owner, live: 0, sites, forgotten };
        for pos in 0..h.sites.len() {
            if h.sites[pos].len == 0 {
                h.forget(pos);
            } else {
                h.live += 1;
            }
        }
        let left_out = h.sites.len() - h.live as usize;
        kernel::warn_on!(left_out != 0);
        if h.live != 0 {
            if let Some(o) = owner {
                self.owned.insert(owned_room.into_node((o, handle), ()));
            }
            self.handles.insert(handle_room.into_node(handle, h));
        }
        left_out
    }

    /// Forget the sites of `handle` on file page `page` (every one of them,
    /// or only site `index`), and the handle with its last site.
    fn forget(&mut self, handle: u64, page: PageKey, index: Option<u32>) -> Option<Forgotten<F>> {
        let h = self.handles.get_mut(&handle)?;
        let mut p = self.pages.find_mut(&page)?;
        let mut n = 0;
        p.get_mut().slots.retain(|s| {
            let pos = s.pos as usize;
            if s.handle != handle || index.is_some_and(|i| h.sites.get(pos).is_none_or(|site| site.index != i)) {
                return true;
            }
            h.forget(pos);
            n += 1;
            false
        });
        if n == 0 {
            return None;
        }
        h.live -= n;
        let last = h.live == 0;
        let file = if p.get().slots.is_empty() { Some(p.remove().file) } else { None };
        if let Some(mut e) = self.per_range.find_mut(&(page.0, page.1 / PMD_PAGES)) {
            if *e.get() <= n {
                drop(e.remove_node());
            } else {
                *e.get_mut() -= n;
            }
        }
        if last {
            if let Some(HandleSites { owner: Some(o), .. }) = self.handles.remove(&handle) {
                self.owned.remove(&(o, handle));
            }
        }
        Some(Forgotten { sites: n, file })
    }

    /// Forget one site; returns it (with its file reference) to be dropped
    /// outside the lock, if it was there.  The handle goes with its last site.
    pub(crate) fn remove(&mut self, handle: u64, index: u32) -> Option<Forgotten<F>> {
        let page = self.get(handle, index)?.page_key();
        self.forget(handle, page, Some(index))
    }

    /// Forget every site of `handle` on file page `page` (a page of a
    /// batch restored): one pass over the page's sites.
    pub(crate) fn remove_page(&mut self, handle: u64, page: PageKey) -> Option<Forgotten<F>> {
        self.forget(handle, page, None)
    }

    /// The patches behind `handle` now belong to nobody (persistent).
    pub(crate) fn disown(&mut self, handle: u64) {
        let Some(h) = self.handles.get_mut(&handle) else { return };
        if let Some(o) = h.owner.take() {
            self.owned.remove(&(o, handle));
        }
        for s in h.sites.iter_mut() {
            s.owner = None;
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

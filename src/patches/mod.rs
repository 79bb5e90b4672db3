// SPDX-License-Identifier: GPL-2.0

//! One target's live patches, as plain data: [`Site`]s indexed by the
//! file page they changed and by handle.
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
//! A handle names one site or up to `MAX_BATCH`.  Every lookup is O(log
//! N), and a batch costs per file page, not per site: [`Patches`] keeps a
//! red-black tree of the file pages that hold sites (each with its sites
//! by offset in one vector), one of handles (each with its sites in one
//! vector) and counts per 2 MiB file range.

mod record;

pub(crate) use record::Reserved;

use kernel::{alloc::KVVec, prelude::*, rbtree::RBTree};

use crate::{
    few::Few,
    journal::{Event, Step},
    sys::{PAGE_MASK, PMD_PAGES},
    uapi::{self, MAX_BYTES},
};

/// Who owns a patch: the open file that made it, or nobody (persistent).
pub(crate) type Owner = Option<u64>;

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
    /// That page's fork family ([`crate::sys::PageRef::family`]): where
    /// the processes forked from the target since PATCH map their copies.
    pub(crate) family: usize,
    /// When the bytes were written (boot-time ns, under the mmap lock a
    /// fork takes too): a process forked later started after it.
    pub(crate) since: u64,
    /// Is the page-cache folio behind the page PMD-mappable?
    pub(crate) pmd_mappable: bool,
    /// When the target's own copy was restored (boot-time ns; 0: not yet),
    /// by a RESTORE that went on to a process forked from it, which
    /// refused: only processes forked from the target before then may
    /// still run this site, and a retry leaves the target alone.
    pub(crate) restored_at: u64,
}

impl Site {
    /// An event of `step` about this site: its target, address and handle.
    pub(crate) fn event(&self, step: Step) -> Event {
        Event::new(step)
            .pid(self.pid)
            .addr(self.addr)
            .handle(self.handle)
    }

    /// QUERY's (and debugfs `patches`') state of this site, its target
    /// `gone` or not.
    pub(crate) fn state(&self, gone: bool) -> u32 {
        if gone {
            uapi::STATE_GONE
        } else if self.restored_at != 0 {
            // mutant: forked-only-shown-live
            uapi::STATE_FORKED_ONLY
        } else {
            uapi::STATE_LIVE
        }
    }

    /// Offset of the patch in its page.
    pub(crate) fn offset(&self) -> usize {
        self.addr & !PAGE_MASK
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
    /// Dropped (fput) with the page's last site, outside the locks; read
    /// by RESTORE to find the processes forked from the target.
    file: F,
}

/// The live sites of one file page, to check many new sites against.
#[derive(Clone, Copy)]
pub(crate) struct OnPage<'a>(&'a [Slot]);

impl Default for OnPage<'_> {
    /// No sites: a page not looked up yet.
    fn default() -> Self {
        OnPage(&[])
    }
}

impl OnPage<'_> {
    /// Would `len` bytes at `offset` overlap a site?  Sites on a page never
    /// overlap each other, so only the last one that starts before
    /// `offset + len` can.
    pub(crate) fn overlaps(&self, offset: usize, len: usize) -> bool {
        let i = self
            .0
            .partition_point(|s| (s.offset as usize) < offset + len);
        i > 0 && {
            let s = &self.0[i - 1];
            s.offset as usize + s.len as usize > offset
        }
    }
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
    /// A handle's record of `sites`: those placed in the table (`len` not
    /// 0) are live, the others forgotten.
    fn new(owner: Owner, sites: KVVec<Site>, forgotten: KVVec<u64>) -> Self {
        let mut h = HandleSites {
            owner,
            live: 0,
            sites,
            forgotten,
        };
        for pos in 0..h.sites.len() {
            if h.sites[pos].len == 0 {
                h.forget(pos);
            } else {
                h.live += 1;
            }
        }
        h
    }

    fn is_live(&self, pos: usize) -> bool {
        self.forgotten
            .get(pos / 64)
            .is_some_and(|w| w & (1 << (pos % 64)) == 0)
    }

    fn live(&self) -> impl Iterator<Item = &Site> {
        self.sites
            .iter()
            .enumerate()
            .filter(|(pos, _)| self.is_live(*pos))
            .map(|(_, s)| s)
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
    /// Live sites, of every handle.
    live_sites: usize,
    pages: RBTree<PageKey, PageSites<F>>,
    per_range: RBTree<PageKey, u32>,
    handles: RBTree<u64, HandleSites>,
    /// `(owner, handle)` of the handles a file owns (not the persistent).
    owned: RBTree<(u64, u64), ()>,
}

impl<F> Patches<F> {
    pub(crate) fn new() -> Self {
        Self {
            live_sites: 0,
            pages: RBTree::new(),
            per_range: RBTree::new(),
            handles: RBTree::new(),
            owned: RBTree::new(),
        }
    }

    /// How many live sites there are, of every handle.
    pub(crate) fn live_sites(&self) -> usize {
        self.live_sites
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
    pub(crate) fn sites_of(&self, handle: u64) -> Result<Few<Site>> {
        let mut v = Few::with_capacity(self.count(handle) as usize, GFP_KERNEL)?;
        for s in self.sites_of_handle(handle) {
            // Within capacity: `count` is the number of live sites.
            v.push_within_capacity(*s).map_err(|_| ENOMEM)?;
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

    /// The file the sites of file page `page` are mapped from.
    pub(crate) fn file_of(&self, page: &PageKey) -> Option<&F> {
        self.pages.get(page).map(|p| &p.file)
    }

    /// Live sites on file page `(mapping, pgoff)`.
    pub(crate) fn on_page(&self, page: PageKey) -> u32 {
        self.pages.get(&page).map_or(0, |p| p.slots.len() as u32)
    }

    /// Live sites in the PMD-sized file range `(mapping, pgoff / 512)`.
    pub(crate) fn in_range(&self, range: PageKey) -> u32 {
        self.per_range.get(&range).copied().unwrap_or(0)
    }

    /// The first handle from `from` on that `owner` made (any, for None):
    /// a walk that needs no memory.
    pub(crate) fn next_handle_of(&self, owner: Owner, from: u64) -> Option<u64> {
        match owner {
            None => self
                .handles
                .cursor_lower_bound(&from)
                .map(|c| *c.current().0),
            // Ordered by (owner, handle).
            Some(o) => self
                .owned
                .cursor_lower_bound(&(o, from))
                .map(|c| *c.current().0)
                .and_then(|(owner, handle)| (owner == o).then_some(handle)),
        }
    }

    /// Forget the sites of `handle` on file page `page` (every one of them,
    /// or only site `index`), and the handle with its last site.
    fn forget(&mut self, handle: u64, page: PageKey, index: Option<u32>) -> Option<Forgotten<F>> {
        let h = self.handles.get_mut(&handle)?;
        let mut p = self.pages.find_mut(&page)?;
        let mut n = 0;
        p.get_mut().slots.retain(|s| {
            let pos = s.pos as usize;
            if s.handle != handle
                || index.is_some_and(|i| h.sites.get(pos).is_none_or(|site| site.index != i))
            {
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
        self.live_sites -= n as usize;
        let last = h.live == 0;
        let file = if p.get().slots.is_empty() {
            Some(p.remove().file)
        } else {
            None
        };
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

    /// `handle`'s sites on file page `page` were restored in the target's
    /// own copy at `at` (see [`Site::restored_at`]).
    pub(crate) fn mark_target_restored(&mut self, handle: u64, page: PageKey, at: u64) {
        if let Some(h) = self.handles.get_mut(&handle) {
            for s in h.sites.iter_mut().filter(|s| s.page_key() == page) {
                s.restored_at = at;
            }
        }
    }

    /// The patches behind `handle` now belong to nobody (persistent).
    pub(crate) fn disown(&mut self, handle: u64) {
        let Some(h) = self.handles.get_mut(&handle) else {
            return;
        };
        if let Some(o) = h.owner.take() {
            self.owned.remove(&(o, handle));
        }
        for s in h.sites.iter_mut() {
            s.owner = None;
        }
    }
}

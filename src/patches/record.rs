// SPDX-License-Identifier: GPL-2.0

//! Recording a handle's sites in [`Patches`] without a failure after the
//! bytes are written: the room is reserved first ([`Patches::reserve`],
//! which may fail), then used ([`Patches::insert`], which allocates
//! nothing).

use kernel::{
    alloc::KVVec,
    prelude::*,
    rbtree::{Entry, RBTreeNodeReservation},
};

use super::{HandleSites, PageKey, PageSites, Patches, Site, Slot};

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
    /// Room for a handle of `count` sites on `pages` (each file page once,
    /// with how many of the sites are on it), so that recording cannot
    /// fail once the bytes are written.  Pages already in the table get
    /// room in their own slot vectors now; nothing else may change the
    /// table (the target's state stays locked) until [`Self::insert`].
    pub(crate) fn reserve(
        &mut self,
        count: usize,
        pages: impl Iterator<Item = (PageKey, usize)>,
    ) -> Result<Reserved<F>> {
        // One look at each page: room for the new ones grows as they come.
        let (mut rooms, mut ranges) = (KVVec::new(), KVVec::new());
        for (key, n) in pages {
            if let Some(page) = self.pages.get_mut(&key) {
                page.slots.reserve(n, GFP_KERNEL_ACCOUNT)?;
                continue;
            }
            rooms.push(
                Some(PageRoom {
                    key,
                    node: RBTreeNodeReservation::new(GFP_KERNEL_ACCOUNT)?,
                    slots: KVVec::with_capacity(n, GFP_KERNEL_ACCOUNT)?,
                }),
                GFP_KERNEL_ACCOUNT,
            )?;
            ranges.push(
                RBTreeNodeReservation::new(GFP_KERNEL_ACCOUNT)?,
                GFP_KERNEL_ACCOUNT,
            )?;
        }
        let mut forgotten = KVVec::new();
        forgotten.extend_with(count.div_ceil(64), 0, GFP_KERNEL_ACCOUNT)?;
        Ok(Reserved {
            handle: RBTreeNodeReservation::new(GFP_KERNEL_ACCOUNT)?,
            owned: RBTreeNodeReservation::new(GFP_KERNEL_ACCOUNT)?,
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
        let Reserved {
            handle: handle_room,
            owned: owned_room,
            forgotten,
            pages: mut rooms,
            mut ranges,
        } = reserved;
        let Some(&Site { handle, owner, .. }) = sites.first() else {
            return 0;
        };
        // The handle's vector is kept in index order: if `sites` is not in
        // it, the slots are pointed at their sites once it is.
        let in_order = sites.is_sorted_by_key(|s| s.index);
        // New pages come in the order reserved (some may be skipped).
        let mut next_room = 0;
        for (range, file) in pages {
            if !self.place_run(
                &sites,
                range.clone(),
                file,
                &mut rooms,
                &mut next_room,
                &mut ranges,
            ) {
                // The target holds these bytes and the table would not
                // know of them: the caller journals it.
                sites[range].iter_mut().for_each(|s| s.len = 0);
            }
        }
        if !in_order {
            sites.sort_unstable_by_key(|s| s.index);
            self.repoint_slots(&sites, handle);
        }
        let h = HandleSites::new(owner, sites, forgotten);
        let left_out = h.sites.len() - h.live as usize;
        kernel::warn_on!(left_out != 0);
        if h.live != 0 {
            self.live_sites += h.live as usize;
            self.record_handle(handle, h, handle_room, owned_room);
        }
        left_out
    }

    /// Put handle `handle`'s record `h` in the trees, in its room.
    fn record_handle(
        &mut self,
        handle: u64,
        h: HandleSites,
        handle_room: RBTreeNodeReservation<u64, HandleSites>,
        owned_room: RBTreeNodeReservation<(u64, u64), ()>,
    ) {
        if let Some(o) = h.owner {
            self.owned.insert(owned_room.into_node((o, handle), ()));
        }
        self.handles.insert(handle_room.into_node(handle, h));
    }

    /// Place one page's run of `sites` (`range`) in the page's vector, in
    /// the room reserved for it (a new page takes its node from `rooms`,
    /// searched from `next_room`, and `file`), and count it in its 2 MiB
    /// range.  False, and nothing placed, if the room is not there.
    fn place_run(
        &mut self,
        sites: &[Site],
        range: core::ops::Range<usize>,
        file: &mut Option<F>,
        rooms: &mut KVVec<Option<PageRoom<F>>>,
        next_room: &mut usize,
        ranges: &mut KVVec<CountRoom>,
    ) -> bool {
        let (start, run) = (range.start, &sites[range]);
        let Some(first) = run.first() else {
            return true;
        };
        let (key, range_key, n) = (first.page_key(), first.range_key(), run.len());
        let slot = |k: usize| {
            let s = &run[k];
            Slot {
                offset: s.offset() as u16,
                len: s.len as u16,
                pos: (start + k) as u32,
                handle: s.handle,
            }
        };
        // Everything the run needs is there before any of it is used.
        if self.per_range.get(&range_key).is_none() && ranges.is_empty() {
            return false;
        }
        let placed = match self.pages.get_mut(&key) {
            // Room was reserved in its vector.
            Some(page) => merge_slots(&mut page.slots, n, slot),
            None => self.place_new_page(key, n, slot, file, rooms, next_room),
        };
        if placed {
            self.count_in_range(range_key, n as u32, ranges);
        }
        placed
    }

    /// Place a run of `n` slots on file page `key`, new to the table, in
    /// its room (found in `rooms` from `next_room` on) with `file`.
    fn place_new_page(
        &mut self,
        key: PageKey,
        n: usize,
        slot: impl Fn(usize) -> Slot,
        file: &mut Option<F>,
        rooms: &mut KVVec<Option<PageRoom<F>>>,
        next_room: &mut usize,
    ) -> bool {
        let found =
            (*next_room..rooms.len()).find(|&i| rooms[i].as_ref().is_some_and(|r| r.key == key));
        let (Some(i), true) = (found, file.is_some()) else {
            return false;
        };
        let (Some(mut room), Some(file)) = (rooms[i].take(), file.take()) else {
            return false;
        };
        *next_room = i + 1;
        let merged = merge_slots(&mut room.slots, n, slot);
        if merged {
            let sites = PageSites {
                slots: room.slots,
                file,
            };
            self.pages.insert(room.node.into_node(key, sites));
        }
        merged
    }

    /// Count `n` more sites in the 2 MiB range `range_key` (a node from
    /// `ranges` if the range is new).
    fn count_in_range(&mut self, range_key: PageKey, n: u32, ranges: &mut KVVec<CountRoom>) {
        match self.per_range.entry(range_key) {
            Entry::Occupied(mut e) => *e.get_mut() += n,
            Entry::Vacant(e) => {
                if let Some(room) = ranges.pop() {
                    e.insert(n, room);
                }
            }
        }
    }

    /// Point each slot of `handle` at its site's place in `sites` (sorted
    /// by index now).
    fn repoint_slots(&mut self, sites: &[Site], handle: u64) {
        for (pos, s) in sites.iter().enumerate() {
            let Some(page) = self.pages.get_mut(&s.page_key()) else {
                continue;
            };
            let at = page
                .slots
                .partition_point(|slot| (slot.offset as usize) < s.offset());
            if let Some(slot) = page
                .slots
                .get_mut(at)
                .filter(|slot| slot.handle == handle && slot.offset as usize == s.offset())
            {
                slot.pos = pos as u32;
            }
        }
    }
}

// SPDX-License-Identifier: GPL-2.0

//! Who is patched where: the [`Registry`] of targets and handles, and per
//! target ([`Target`]) its live [`Patches`] and the collapses queued for
//! it.  The [`Registry`] keeps targets, handles and each owner's targets
//! in red-black trees: every lookup is O(log N).
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
//!
//! (`module::INSTANCE`, the global lock on the live instance, is taken
//! only by `open` and at load and unload, with none of these held.)

use kernel::{
    alloc::KVVec,
    fs::File,
    mm::{Mm, MmWithUser, MmWithUserAsync},
    new_mutex,
    prelude::*,
    rbtree::{Entry, RBTree, RBTreeNode, RBTreeNodeReservation},
    sync::aref::ARef,
    sync::Arc,
    sync::{Mutex, MutexGuard},
};

use crate::{
    journal::{Event, Journal},
    live::{self, Live},
    patches::{Owner, Patches},
    sys,
};

/// One target: an mm with patches or queued collapses.
#[pin_data]
pub(crate) struct Target {
    /// The target's address space, by `mm_count` only: it does not keep
    /// the process's memory alive.
    pub(crate) mm: ARef<Mm>,
    /// The process the first PATCH found with this mm (its thread group):
    /// QUERY's pid in the caller's namespace, and whom a caller must be
    /// allowed to ptrace to RESTORE a patch it does not own.  None if it
    /// was being reaped.
    pub(crate) pid: Option<sys::PidRef>,
    /// Its parent's then (None if reaped): a child it makes with
    /// clone(CLONE_PARENT) has that parent, not the target.
    pub(crate) parent: Option<sys::PidRef>,
    #[pin]
    pub(crate) state: Mutex<TargetState>,
    _live: Live,
}

/// The fields of a [`Target`] protected by its `state` mutex.
pub(crate) struct TargetState {
    pub(crate) patches: Patches<ARef<File>>,
    /// Queued, not yet started collapses: (mapping, PMD-sized file range).
    pub(crate) pending_collapses: KVec<(usize, usize)>,
    /// Out of the registry: a new PATCH must look the target up again.
    pub(crate) retired: bool,
    /// A reference on every fork family a live site was written in
    /// (`Site::family`), each once, so that no mapping made since can
    /// take its identity; the last site's RESTORE lets them go.
    families: KVVec<sys::FamilyRef>,
    /// How many families the last pruning kept.
    families_kept: usize,
}

impl Target {
    pub(crate) fn new(
        mm: &Mm,
        pid: Option<sys::PidRef>,
        parent: Option<sys::PidRef>,
    ) -> Result<Arc<Self>> {
        Arc::pin_init(
            pin_init!(Self {
                mm: ARef::from(mm),
                pid,
                parent,
                state <- new_mutex!(
                    TargetState {
                        patches: Patches::new(),
                        pending_collapses: KVec::new(),
                        retired: false,
                        families: KVVec::new(),
                        families_kept: 0,
                    },
                    "hugepoke_target"
                ),
                _live: Live::new(&live::TARGETS),
            }),
            GFP_KERNEL_ACCOUNT,
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

impl Target {
    /// The target's state, for an ioctl (`ev` says which): `EINTR`,
    /// journaled, if a fatal signal comes while another operation (one
    /// stuck in a fault?) holds it.
    pub(crate) fn lock_killable(
        &self,
        journal: &Journal,
        ev: Event,
    ) -> Result<MutexGuard<'_, TargetState>> {
        sys::lock_killable(&self.state).map_err(|e| {
            // mutant: restore-waits-unkillable
            let why = "fatal signal while waiting for the target (busy with another operation)";
            journal.fail(ev, e, why)
        })
    }
}

impl TargetState {
    /// Nothing left for this target: no patch, no queued collapse.
    pub(crate) fn idle(&self) -> bool {
        self.patches.is_empty() && self.pending_collapses.is_empty()
    }

    /// Room to hold the families of `pages` more written pages.
    pub(crate) fn reserve_families(&mut self, pages: usize) -> Result {
        self.families.reserve(pages, GFP_KERNEL).map_err(|_| ENOMEM)
    }

    /// Hold `family` for sites recorded with it (within the room
    /// reserved; a family held already is not held twice).
    pub(crate) fn hold_family(&mut self, family: sys::FamilyRef) {
        if !self.families.iter().any(|f| f.id() == family.id()) {
            let _ = self.families.push_within_capacity(family);
        }
    }

    /// After sites were recorded: let go of the families no live site
    /// names, once their number has doubled since the last time (a pass
    /// over every site, so not at every PATCH), and of unused room.
    pub(crate) fn prune_families(&mut self) {
        if self.families.len() > FEW_FAMILIES.max(2 * self.families_kept) {
            let patches = &self.patches;
            self.families
                .retain(|f| patches.iter().any(|s| s.family == f.id()));
            self.families_kept = self.families.len();
        }
        if self.families.capacity() > 2 * self.families.len() + FEW_FAMILIES {
            let _ = self.families.shrink_to(self.families.len(), GFP_KERNEL);
        }
    }

    /// The families held, once the target's last site has left (to drop
    /// after the locks); none while a site lives.
    pub(crate) fn release_families(&mut self) -> KVVec<sys::FamilyRef> {
        if !self.patches.is_empty() {
            // mutant: families-released-early
            return KVVec::new();
        }
        self.families_kept = 0;
        core::mem::take(&mut self.families)
    }
}

/// Families a target holds before any is let go (a patch in each of a few
/// libraries holds one each).
const FEW_FAMILIES: usize = 8;

/// A PATCH_FILE's handle: one patch in many processes, each its own
/// handle in the registry (RESTORE of this one restores them all).
pub(crate) struct FileHandle {
    /// The file that made it (None: persistent), as its members'.
    pub(crate) owner: Owner,
    /// The members' handles; some may be gone (restored on their own).
    pub(crate) members: KVVec<u64>,
    /// PATCH_FILE is still patching its processes: RESTORE and QUERY of
    /// it wait for the call to return (EBUSY).
    pub(crate) building: bool,
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
    /// PATCH_FILE's handles: each the handles of its processes' patches.
    files: RBTree<u64, FileHandle>,
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
            files: RBTree::new(),
            next_handle: 1,
            closing: false,
        }
    }

    /// The target for `mm` (of `process`), made if there is none.
    pub(crate) fn target_for(&mut self, mm: &Mm, process: &sys::Process) -> Result<Arc<Target>> {
        let id = sys::mm_id(mm);
        if let Some(t) = self.targets.get(&id) {
            return Ok(t.clone());
        }
        let t = Target::new(mm, process.tgid_pid(), process.parent_tgid_pid())?;
        let node = self
            .targets
            .try_create_and_insert(id, t.clone(), GFP_KERNEL_ACCOUNT); // mutant: leak-target
        node?;
        Ok(t)
    }

    /// A new handle for a patch of `target`, recorded before the patch is
    /// made (so that recording cannot fail after the bytes are written).
    pub(crate) fn new_handle(&mut self, target: &Arc<Target>, owner: Owner) -> Result<u64> {
        let handle = self.next_handle;
        let handle_node = RBTreeNode::new(handle, (owner, target.clone()), GFP_KERNEL_ACCOUNT)?;
        if let Some(o) = owner {
            let key = (o, target_key(target));
            match self.owner_targets.entry(key) {
                Entry::Occupied(mut e) => e.get_mut().0 += 1,
                Entry::Vacant(e) => {
                    e.insert(
                        (1, target.clone()),
                        RBTreeNodeReservation::new(GFP_KERNEL_ACCOUNT)?,
                    );
                }
            }
        }
        self.handles.insert(handle_node);
        self.next_handle += 1;
        Ok(handle)
    }

    /// A new PATCH_FILE handle for `owner`, with no member yet.
    pub(crate) fn new_file_handle(&mut self, owner: Owner) -> Result<u64> {
        let handle = self.next_handle;
        let members = KVVec::new();
        self.files.try_create_and_insert(
            handle,
            FileHandle {
                owner,
                members,
                building: true,
            },
            GFP_KERNEL_ACCOUNT,
        )?;
        self.next_handle += 1;
        Ok(handle)
    }

    /// The PATCH_FILE handle `handle`, if it is one.
    pub(crate) fn file_handle(&self, handle: u64) -> Option<&FileHandle> {
        self.files.get(&handle)
    }

    /// Make `members` the members of PATCH_FILE handle `handle` (its
    /// owner `owner`); the old vector comes back, to drop outside the lock.
    pub(crate) fn set_members(
        &mut self,
        handle: u64,
        owner: Owner,
        members: KVVec<u64>,
    ) -> Option<KVVec<u64>> {
        let f = self.files.get_mut(&handle)?;
        f.owner = owner;
        f.building = false;
        Some(core::mem::replace(&mut f.members, members))
    }

    /// Forget a PATCH_FILE handle (its members stay as they are).
    pub(crate) fn forget_file_handle(&mut self, handle: u64) -> Option<FileHandle> {
        self.files.remove(&handle)
    }

    /// Every PATCH_FILE handle, in handle order.
    pub(crate) fn file_handles(&self) -> impl Iterator<Item = (&u64, &FileHandle)> {
        self.files.iter()
    }

    /// The first PATCH_FILE handle that `owner` made: a closing file
    /// forgets them one by one (their members are restored on their own).
    pub(crate) fn file_handle_of(&self, owner: u64) -> Option<u64> {
        self.files
            .iter()
            .find(|(_, f)| f.owner == Some(owner))
            .map(|(h, _)| *h)
    }

    /// The target of the address space `mm`, if it has one.
    pub(crate) fn target_of_mm(&self, mm: &Mm) -> Option<Arc<Target>> {
        self.targets.get(&sys::mm_id(mm)).cloned()
    }

    pub(crate) fn target_of(&self, handle: u64) -> Option<Arc<Target>> {
        self.handles.get(&handle).map(|(_, t)| t.clone())
    }

    /// The owner (None: persistent) and the target of `handle`.
    pub(crate) fn handle(&self, handle: u64) -> Option<(Owner, Arc<Target>)> {
        self.handles.get(&handle).map(|(o, t)| (*o, t.clone()))
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
    pub(crate) fn forget_handle(
        &mut self,
        handle: u64,
    ) -> Option<(Arc<Target>, Option<(u32, Arc<Target>)>)> {
        let (owner, target) = self.handles.remove(&handle)?;
        let left = owner.and_then(|o| self.owner_leaves(o, &target));
        Some((target, left))
    }

    /// Take a target out of the registry (its state is locked by the
    /// caller and idle).
    pub(crate) fn retire(
        &mut self,
        target: &Target,
        state: &mut TargetState,
    ) -> Option<Arc<Target>> {
        state.retired = true;
        // Only this target: a newer one for the same mm stays.
        let id = target.mm_id();
        if !self
            .targets
            .get(&id)
            .is_some_and(|t| core::ptr::eq(&**t, target))
        {
            return None;
        }
        self.targets.remove(&id)
    }

    /// The first target from key `from` on that `owner` has patches on
    /// (any, for None), with its key: a walk that needs no memory.
    pub(crate) fn next_target_of(&self, owner: Owner, from: usize) -> Option<(usize, Arc<Target>)> {
        match owner {
            None => self
                .targets
                .cursor_lower_bound(&from)
                .map(|c| (*c.current().0, c.current().1.clone())),
            Some(o) => {
                let c = self.owner_targets.cursor_lower_bound(&(o, from))?;
                let (&(owner, key), (_, t)) = c.current();
                (owner == o).then(|| (key, t.clone()))
            }
        }
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

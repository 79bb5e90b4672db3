// SPDX-License-Identifier: GPL-2.0

//! Restoring from a work item, where no fatal signal can cut GUP short:
//! everything one owner made, when its file closes (or every patch, when
//! the module unloads), and what a PATCH killed part way could not undo.

use kernel::{
    impl_has_work, new_work,
    prelude::*,
    sync::Arc,
    workqueue::{Work, WorkItem},
};

use super::{
    outcome::Closing,
    settle::{restore, restore_handle},
};
use crate::{
    journal::{Event, Step},
    live::{self, Live},
    patches::Owner,
    sys::Done,
    Hugepoke,
};

/// Restore every patch `owner` made (every patch for `None`), as `closing`
/// says, a target and a handle at a time.  Only the targets this owner
/// patched are locked: one busy elsewhere (a PATCH waiting on a slow
/// fault) must not hold up this file's close.  The walk needs no memory,
/// so no patch is ever left owned by a file that closed.
fn restore_all(hp: &Arc<Hugepoke>, owner: Owner, closing: Closing) {
    let mut next_target = 0;
    loop {
        // (Its own statement: the registry guard goes before the body runs.)
        let found = hp.registry.lock().next_target_of(owner, next_target);
        let Some((key, target)) = found else {
            return;
        };
        next_target = key + 1;
        let mut state = target.state.lock();
        let mut next = 0;
        // Each handle once: one kept stays in the table (at unload too).
        while let Some(handle) = state.patches.next_handle_of(owner, next) {
            next = handle + 1;
            let _ = restore_handle(hp, &target, &mut state, handle, closing);
        }
    }
}

/// What a restore work item restores.
#[derive(Clone, Copy)]
enum Which {
    /// Every patch of an owner (every patch for `None`), as `Closing` says.
    Owned(Owner, Closing),
    /// One handle: what a PATCH killed part way kept, as a RESTORE would.
    Handle(u64),
}

/// A restore, run by hugepoke's workqueue: a kworker has no signal to cut
/// its GUP short.
#[pin_data]
struct RestoreWork {
    hugepoke: Arc<Hugepoke>,
    which: Which,
    _live: Live,
    #[pin]
    done: Done,
    #[pin]
    work: Work<RestoreWork>,
}

impl_has_work! {
    impl HasWork<Self> for RestoreWork { self.work }
}

impl WorkItem for RestoreWork {
    type Pointer = Arc<RestoreWork>;

    fn run(this: Arc<RestoreWork>) {
        match this.which {
            Which::Owned(owner, closing) => restore_all(&this.hugepoke, owner, closing),
            Which::Handle(handle) => {
                let _ = restore(&this.hugepoke, handle);
            }
        }
        this.done.complete();
    }
}

/// Queue a restore work item for `which`; None if there is no memory.
fn queue_restore(hp: &Arc<Hugepoke>, which: Which) -> Option<Arc<RestoreWork>> {
    let work = Arc::pin_init(
        pin_init!(RestoreWork {
            hugepoke: hp.clone(),
            which,
            _live: Live::new(&live::WORKS),
            done <- Done::new(),
            work <- new_work!("hugepoke::restore"),
        }),
        GFP_KERNEL,
    )
    .ok()?;
    let _ = hp.workqueue.queue().enqueue(work.clone());
    Some(work)
}

/// Restore what `owner` made (everything for `None`) from a work item, and
/// wait for it — unless a fatal signal comes (the closer is being killed
/// behind a target stuck in a fault): the work goes on without us, and
/// module unload drains it.
pub(crate) fn restore_owned(hp: &Arc<Hugepoke>, owner: Owner, closing: Closing) {
    match queue_restore(hp, Which::Owned(owner, closing)) {
        // mutant: close-restores-in-the-dying-task
        Some(work) => {
            if work.done.wait_killable().is_err() {
                // mutant: close-waits-unkillable
                let ev = Event::new(Step::Restore);
                let why = "fatal signal while waiting for the restore at close: it goes on in its work item";
                hp.journal.record(ev.error(EINTR, why));
            }
        }
        // No memory for the work: do it here, as well as we can.
        None => restore_all(hp, owner, closing),
    }
}

/// A PATCH that a fatal signal cut short kept what it could not undo (its
/// GUPs fail with EINTR from now on): RESTORE it from a work item, which
/// has no signal pending.  The caller is dying, so nobody waits for it.
pub(crate) fn restore_after_killed_patch(hp: &Arc<Hugepoke>, handle: u64) {
    let ev = Event::new(Step::Restore).handle(handle);
    if queue_restore(hp, Which::Handle(handle)).is_some() {
        // mutant: killed-batch-kept
        hp.journal.record(
            ev.note("PATCH killed part way: the sites it kept are restored from a work item"),
        );
    } else {
        let why = "PATCH killed part way: no memory to restore what it kept (persistent; RESTORE or unload restores it)";
        hp.journal.record(ev.error(ENOMEM, why));
    }
}

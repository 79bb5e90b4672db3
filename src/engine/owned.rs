// SPDX-License-Identifier: GPL-2.0

//! Restoring everything one owner made, when its file closes (or every
//! patch, when the module unloads), from a work item: a fatal signal
//! pending for the closing task cannot cut GUP short.

use kernel::{
    impl_has_work, new_work,
    prelude::*,
    sync::{Arc, Completion},
    workqueue::{Work, WorkItem},
};

use super::{outcome::Closing, settle::restore_handle};
use crate::{
    journal::{Event, Step},
    live::{self, Live},
    patches::Owner,
    Hugepoke,
};

/// Restore every patch `owner` made (every patch for `None`), as `closing`
/// says.
fn restore_all(hp: &Arc<Hugepoke>, owner: Owner, closing: Closing) {
    // Only the targets this owner patched: one busy elsewhere (a PATCH
    // waiting on a slow fault) must not hold up this file's close.
    let no_memory = || {
        let why = "no memory to list the patches: left in place (RESTORE by handle, or unload, restores them)";
        hp.journal
            .record(Event::new(Step::Restore).error(ENOMEM, why));
    };
    let Ok(targets) = hp.registry.lock().targets_of(owner) else {
        return no_memory();
    };
    for target in targets.iter() {
        let mut state = target.state.lock();
        let mut handles = KVec::new();
        if state.patches.handles_of(owner, &mut handles).is_err() {
            no_memory();
            continue;
        }
        for handle in handles {
            let _ = restore_handle(hp, target, &mut state, handle, closing);
        }
    }
}

/// A restore of many patches, run by hugepoke's workqueue.
#[pin_data]
struct RestoreWork {
    hugepoke: Arc<Hugepoke>,
    owner: Owner,
    closing: Closing,
    _live: Live,
    #[pin]
    done: Completion,
    #[pin]
    work: Work<RestoreWork>,
}

impl_has_work! {
    impl HasWork<Self> for RestoreWork { self.work }
}

impl WorkItem for RestoreWork {
    type Pointer = Arc<RestoreWork>;

    fn run(this: Arc<RestoreWork>) {
        restore_all(&this.hugepoke, this.owner, this.closing);
        this.done.complete_all();
    }
}

/// Restore what `owner` made (everything for `None`) from a work item, and
/// wait for it.
pub(crate) fn restore_owned(hp: &Arc<Hugepoke>, owner: Owner, closing: Closing) {
    let work = Arc::pin_init(
        pin_init!(RestoreWork {
            hugepoke: hp.clone(),
            owner,
            closing,
            _live: Live::new(&live::WORKS),
            done <- Completion::new(),
            work <- new_work!("hugepoke::restore"),
        }),
        GFP_KERNEL,
    );
    match work {
        // mutant: close-restores-in-the-dying-task
        Ok(work) => {
            let _ = hp.workqueue.queue().enqueue(work.clone());
            work.done.wait_for_completion();
        }
        // No memory for the work: do it here, as well as we can.
        Err(_) => restore_all(hp, owner, closing),
    }
}

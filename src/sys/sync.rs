// SPDX-License-Identifier: GPL-2.0

//! Waits a fatal signal may cut short, which `kernel::sync` does not offer:
//! a killable [`lock_killable`] of a `Mutex`, and a [`Done`] flag whose
//! wait is killable.  A caller queued behind a target stuck in a fault it
//! cannot leave (a FUSE server, a hard NFS mount) can still be killed.

use kernel::{
    bindings,
    prelude::*,
    sync::{
        lock::{mutex::MutexBackend, Guard},
        Mutex,
    },
    types::Opaque,
};

use super::{hugepoke_fatal_signal_pending, hugepoke_mutex_lock_killable};

/// Is a fatal signal pending for the calling task?
pub(crate) fn fatal_signal_pending() -> bool {
    // SAFETY: reads the current task's pending signals; no preconditions.
    unsafe { hugepoke_fatal_signal_pending() }
}

/// Lock `mutex`, or give up with `EINTR` when a fatal signal comes first.
pub(crate) fn lock_killable<T>(mutex: &Mutex<T>) -> Result<Guard<'_, T, MutexBackend>> {
    // `Lock` is `repr(C)` with its `struct mutex` (`state`) as first field.
    let raw = core::ptr::from_ref(mutex)
        .cast::<bindings::mutex>()
        .cast_mut();
    // SAFETY: `raw` is the initialized `struct mutex` of `mutex` (above),
    // which lives as long as the borrow.
    if unsafe { hugepoke_mutex_lock_killable(raw) } != 0 {
        return Err(EINTR);
    }
    // SAFETY: we hold the lock just taken; `MutexBackend`'s guard state is `()`.
    Ok(unsafe { Guard::new(mutex, ()) })
}

/// A one-shot "done" a waiter can be killed out of
/// (`wait_for_completion_killable`).
#[pin_data]
pub(crate) struct Done {
    #[pin]
    inner: Opaque<bindings::completion>,
}

// SAFETY: a `struct completion` may be signalled and waited on from any task.
unsafe impl Send for Done {}
// SAFETY: as above; its own spinlock serializes concurrent use.
unsafe impl Sync for Done {}

impl Done {
    pub(crate) fn new() -> impl PinInit<Self> {
        pin_init!(Self {
            inner <- Opaque::ffi_init(|slot: *mut bindings::completion| {
                // SAFETY: `slot` is valid for writing an uninitialized completion.
                unsafe { bindings::init_completion(slot) };
            }),
        })
    }

    /// Done, for every waiter now and later.
    pub(crate) fn complete(&self) {
        // SAFETY: `inner` was initialized by `new` and is pinned.
        unsafe { bindings::complete_all(self.inner.get()) };
    }

    /// Wait until done; `EINTR` if a fatal signal comes first.
    pub(crate) fn wait_killable(&self) -> Result {
        // SAFETY: as in `complete`.
        match unsafe { bindings::wait_for_completion_killable(self.inner.get()) } {
            0 => Ok(()),
            _ => Err(EINTR),
        }
    }
}

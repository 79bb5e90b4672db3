// SPDX-License-Identifier: GPL-2.0

//! hugepoke's own workqueue ([`Workqueue`]), for the collapse and restore
//! work items.

use core::ptr::NonNull;
use kernel::{bindings, prelude::*};

/// hugepoke's own workqueue, so that module unload can wait for every work
/// item to return (`drain`) without flushing a system-wide queue.
pub(crate) struct Workqueue(NonNull<bindings::workqueue_struct>);

// SAFETY: a workqueue may be used and destroyed from any task.
unsafe impl Send for Workqueue {}
// SAFETY: queueing is thread-safe.
unsafe impl Sync for Workqueue {}

impl Workqueue {
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: a constant format string without conversions, so no
        // variadic arguments are read.
        let wq = unsafe {
            bindings::alloc_workqueue_noprof(
                c"hugepoke".as_ptr().cast(),
                bindings::wq_flags_WQ_UNBOUND,
                0,
            )
        };
        NonNull::new(wq).map(Self).ok_or(ENOMEM)
    }

    pub(crate) fn queue(&self) -> &kernel::workqueue::Queue {
        // SAFETY: the workqueue lives until `self` is dropped.
        unsafe { kernel::workqueue::Queue::from_raw(self.0.as_ptr()) }
    }

    /// Wait until every work item queued has run and returned.  Must not be
    /// called from a work item of this queue, nor with a lock they take.
    pub(crate) fn drain(&self) {
        // SAFETY: valid workqueue; process context (module unload).
        unsafe { bindings::drain_workqueue(self.0.as_ptr()) };
    }
}

impl Drop for Workqueue {
    fn drop(&mut self) {
        // SAFETY: the last reference to the workqueue; it drains first.
        unsafe { bindings::destroy_workqueue(self.0.as_ptr()) };
    }
}

// SPDX-License-Identifier: GPL-2.0

//! Live-object counts, for the leak check at unload.  Every object that
//! pins hugepoke's state or a target's mm — a [`Target`](crate::target::Target),
//! a collapse or restore work item — carries a [`Live`] token.  When the
//! shared state itself is freed (the last `Arc<Hugepoke>` goes, at unload),
//! the kernel log says how many are still alive: zero unless something
//! leaked; and if the state leaks, the line never appears.

use kernel::sync::atomic::{Atomic, Relaxed};

/// Targets alive.
pub(crate) static TARGETS: Atomic<usize> = Atomic::new(0);
/// Work items alive (collapse and restore).
pub(crate) static WORKS: Atomic<usize> = Atomic::new(0);

/// Counts its owner in `counter` while it lives.
pub(crate) struct Live(&'static Atomic<usize>);

impl Live {
    pub(crate) fn new(counter: &'static Atomic<usize>) -> Self {
        counter.fetch_add(1, Relaxed);
        Self(counter)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

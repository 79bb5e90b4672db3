// SPDX-License-Identifier: GPL-2.0

//! The thin unsafe layer: every call into `bindings::` lives here, each with
//! the reason it is sound.  Everything above this module is safe Rust.

use kernel::bindings;

/// Thread-group id of the calling task, in its own pid namespace.
pub(crate) fn current_tgid() -> i32 {
    kernel::current!().tgid_nr_ns(None)
}

/// CLOCK_MONOTONIC in nanoseconds, comparable with userspace's
/// `clock_gettime(CLOCK_MONOTONIC)`.
pub(crate) fn ktime_ns() -> u64 {
    // SAFETY: no preconditions; NMI-safe and callable with spinlocks held.
    unsafe { bindings::ktime_get_mono_fast_ns() }
}

// SPDX-License-Identifier: GPL-2.0

//! [`Few`]: a vector for what is most often one item — the sites and
//! pages of a single PATCH or RESTORE.  One item lives inline, so a single
//! call allocates nothing for it; room for more is one `KVVec`, made up
//! front (nothing is allocated once items are added).

use core::ops::{Deref, DerefMut};
use kernel::{
    alloc::{AllocError, Flags, KVVec},
    prelude::*,
};

/// Up to its capacity of items: one inline, more in a `KVVec`.
pub(crate) enum Few<T> {
    /// Room for one, and none in it.
    Empty,
    One(T),
    Many(KVVec<T>),
}

impl<T> Default for Few<T> {
    fn default() -> Self {
        Few::Empty
    }
}

impl<T> Few<T> {
    /// Room for `n` items: allocated only when `n` is more than one.
    pub(crate) fn with_capacity(n: usize, flags: Flags) -> Result<Self, AllocError> {
        Ok(match n {
            0 | 1 => Few::Empty,
            n => Few::Many(KVVec::with_capacity(n, flags)?),
        })
    }

    /// Add `item` if there is room for it, else give it back.
    pub(crate) fn push_within_capacity(&mut self, item: T) -> Result<(), T> {
        match self {
            Few::Empty => {
                *self = Few::One(item);
                Ok(())
            }
            Few::One(_) => Err(item),
            Few::Many(v) => v.push_within_capacity(item).map_err(|e| e.0),
        }
    }
}

impl<T> Deref for Few<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            Few::Empty => &[],
            Few::One(item) => core::slice::from_ref(item),
            Few::Many(v) => v,
        }
    }
}

impl<T> DerefMut for Few<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Few::Empty => &mut [],
            Few::One(item) => core::slice::from_mut(item),
            Few::Many(v) => v,
        }
    }
}

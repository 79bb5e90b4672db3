// SPDX-License-Identifier: GPL-2.0

//! The one shape of every refusal the module makes: an errno and, in
//! words, why ([`Refusal`]).  The policy checks, the engine's steps and the
//! collapse work return it; the journal records it once, where it is
//! decided or where it crosses back to the caller.

use kernel::prelude::*;

/// An errno, and why, in words, for `events` and `stats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) errno: Error,
    pub(crate) why: &'static str,
}

impl Refusal {
    pub(crate) const fn new(errno: Error, why: &'static str) -> Self {
        Self { errno, why }
    }
}

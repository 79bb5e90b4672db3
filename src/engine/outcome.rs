// SPDX-License-Identifier: GPL-2.0

//! What the engine's steps hand back: a page PATCH did not write
//! ([`WriteError`], [`Mismatch`]), a PATCH that failed ([`Failure`]), a
//! RESTORE that did not restore ([`Refused`]) or did ([`Restored`]), and
//! who is restoring ([`Closing`]).

use kernel::prelude::*;

use crate::{
    refusal::Refusal,
    sys::{self, PageRef},
};

/// How often a step retries when the page table changed under it.
pub(crate) const MAX_TRIES: u32 = 6;

/// Why PATCH did not write a page.
pub(crate) enum WriteError {
    /// Failed, journaled; nothing written (GUP may have split the PMD and
    /// COWed the page: a copy with nothing of ours in it).
    Failed(Error),
    /// The bytes read under the PT lock at site `.0` of the page were not
    /// the ones they had to be (`.2` says which); the page (`.1`) was
    /// COWed, nothing written (`orig` of every site holds what is there).
    NotExpected(usize, PageRef, Mismatch),
}

/// What the bytes PATCH would replace were not.
#[derive(Clone, Copy)]
pub(crate) enum Mismatch {
    /// The caller's expected bytes.
    Expected,
    /// The file's own bytes: another tool changed them.
    Changed,
    /// The file's page could not be read to compare them with.
    NoFilePage,
}

impl Mismatch {
    pub(crate) fn refusal(self) -> Refusal {
        match self {
            Mismatch::Expected => Refusal::new(
                sys::eilseq(),
                "bytes at the address are not the expected ones (under the page-table lock)",
            ),
            Mismatch::Changed => Refusal::new(
                EBUSY,
                "these bytes were changed by another tool (they differ from the file's: a debugger's or a uprobe's breakpoint?); nothing written (PATCH_OVER_CHANGED writes over them)",
            ),
            Mismatch::NoFilePage => Refusal::new(
                EIO,
                "the file's own page could not be read to compare these bytes with; nothing written",
            ),
        }
    }
}

/// A refused or failed PATCH: the errno, already journaled with its
/// reason, and the site to blame (its index in the request), if one is.
pub(crate) struct Failure {
    pub(crate) error: Error,
    pub(crate) site: Option<u32>,
    /// Sites it wrote and could not give back are kept under this handle.
    pub(crate) kept: Option<u64>,
}

impl Failure {
    /// A failure that blames site `site` of the request.
    pub(crate) fn at(error: Error, site: u32) -> Self {
        Self {
            error,
            site: Some(site),
            kept: None,
        }
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Self {
            error,
            site: None,
            kept: None,
        }
    }
}

/// What RESTORE did to one page, when it did not refuse.
#[derive(Clone, Copy)]
pub(crate) struct Restored {
    /// The anonymous page was zapped: the page-cache page faults back in.
    pub(crate) zapped: bool,
    /// … and its folio is PMD-mappable.
    pub(crate) pmd_mappable: bool,
    /// The order of the page-cache folio that faults back in (when zapped).
    pub(crate) cache_order: u32,
    /// Where the patched page is mapped now.
    pub(crate) page_addr: usize,
}

impl Restored {
    /// The originals are back, in a copy that stays mapped.
    pub(crate) fn kept(page_addr: usize) -> Self {
        Self {
            zapped: false,
            pmd_mappable: false,
            cache_order: 0,
            page_addr,
        }
    }
}

/// Why RESTORE did not restore.
pub(crate) enum Refused {
    /// There is nothing left to restore: the patch is forgotten and RESTORE
    /// returns `result`.  `cache_back`: the page-cache page is what maps (or
    /// faults in) where the patch was, at this page address (the text may
    /// have moved since), so its range may be collapsed.
    Gone {
        result: Result,
        why: &'static str,
        cache_back: Option<usize>,
    },
    /// The patch stays in the table: RESTORE returns the errno.
    Kept(Refusal),
}

impl Refused {
    /// What stops an undo: a refusal, or a patch gone with an error.
    pub(crate) fn stops_undo(&self) -> Option<Refusal> {
        match *self {
            Refused::Kept(r) => Some(r),
            Refused::Gone {
                result: Err(e),
                why,
                ..
            } => Some(Refusal::new(e, why)),
            Refused::Gone { result: Ok(()), .. } => None,
        }
    }
}

/// Who is restoring: an ioctl, or the cleanup when a file closes or the
/// module unloads (which cannot hand a refusal back to anyone).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closing {
    No,
    /// The owner closed its file: a patch that cannot be restored now is
    /// kept, as persistent (anyone may RESTORE it later; unload will).
    File,
    /// The module unloads: a patch that cannot be restored is abandoned.
    Module,
}

// SPDX-License-Identifier: GPL-2.0

//! Whether an anonymous copy of a file page may be zapped so the page-cache
//! page faults back in — the one rule for RESTORE's own copies and for the
//! copies other tools left (COLLAPSE): only when the page-cache page would
//! fault back in with exactly the copy's content, nothing else may hold
//! the copy, and no userfaultfd monitor would see the difference.

use kernel::mm::MmWithUser;

use crate::sys::{self, CacheRef, ClearedPte, PageRef, VmaInfo};

/// Why a copy is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Keep {
    UffdMissing,
    UffdWp,
    UffdMinor,
    /// A reference beyond its mappings': a pin, a pipe, an LRU batch.
    Pinned,
    NoCache,
    StaleCache,
    /// Its bytes are not the page-cache page's.
    Differs,
}

impl Keep {
    pub(crate) fn why(self) -> &'static str {
        match self {
            Keep::UffdMissing => "userfaultfd missing mode is armed",
            Keep::UffdWp => {
                "userfaultfd write-protect is registered: zapping would drop the wp bit"
            }
            Keep::UffdMinor => {
                "userfaultfd minor mode is registered: the next fetch would wait for its monitor"
            }
            Keep::Pinned => "page has unexpected references (pinned or in a pipe)",
            Keep::NoCache => "no page-cache page to fault back in",
            Keep::StaleCache => "page-cache page is not uptodate",
            Keep::Differs => "page differs from the page-cache page",
        }
    }
}

/// Why the copy `page`, whose PTE in the VMA `info` is cleared (`pte`), is
/// to be kept, or None when it may be zapped; `cache` is the page-cache
/// page that would fault in.  Asked with the PTE cleared and flushed, so no
/// GUP-fast can take a new reference after the count is read.
pub(crate) fn keep_reason(
    info: &VmaInfo,
    page: &PageRef,
    cache: Option<&CacheRef>,
    pte: &ClearedPte<'_>,
) -> Option<Keep> {
    if info.uffd_missing {
        // mutant: uffd-missing-zapped
        Some(Keep::UffdMissing)
    } else if info.uffd_wp {
        // mutant: uffd-wp-zapped
        Some(Keep::UffdWp)
    } else if info.uffd_minor {
        // mutant: uffd-minor-zapped
        Some(Keep::UffdMinor)
    } else if page.unexpected_refs() != 0 {
        // mutant: no-unexpected-ref-check
        Some(Keep::Pinned)
    } else {
        match cache {
            None => Some(Keep::NoCache), // mutant: no-cache-zapped
            Some(c) if !c.uptodate() => Some(Keep::StaleCache), // mutant: stale-cache-compared
            Some(c) if !pte.identical_to(c) => {
                // mutant: identical-always
                Some(Keep::Differs)
            }
            Some(_) => None,
        }
    }
}

/// What a zap needs before the PT lock is taken: a swap-out in flight
/// would keep the swap slot past the zap, and the mmu-notifier
/// invalidation may sleep (the zap itself happens under the PT lock).
pub(crate) fn before_zap(
    mm: &MmWithUser,
    page: &PageRef,
    page_addr: usize,
) -> sys::InvalidateRange {
    page.wait_writeback();
    sys::InvalidateRange::start(mm, page_addr)
}

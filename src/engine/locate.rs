// SPDX-License-Identifier: GPL-2.0

//! Finding a patch's copy again: where the target maps the anonymous copy
//! of a patched file page now (it may have `mremap`ped its text, mapped
//! the file twice, or forked), and the first pass of every RESTORE — find
//! every page's copy and check every site holds the bytes PATCH wrote,
//! writing nothing.

use kernel::{mm::virt::VmaRef, prelude::*};

use super::{
    outcome::{Refused, MAX_TRIES},
    plan::{swap_bytes, Dir, PageState, PageWork, Written},
};
use crate::{
    journal::Step,
    patches::Site,
    policy,
    refusal::Refusal,
    sys::{self, LockedPte, MmapWriteGuard, PageRef, VmaInfo, PAGE_MASK},
    uapi::MAX_BYTES,
    Hugepoke,
};

/// The VMA at `page_addr`, if it still maps `site`'s file page there and
/// RESTORE may write into it.  (Whether the PTE still maps the page we
/// hold is for `lock_pte` to say.)
pub(crate) fn still_mapped_at<'a>(
    guard: &'a MmapWriteGuard<'_>,
    site: &Site,
    page_addr: usize,
) -> Option<&'a VmaRef> {
    let vma = guard.find_vma(page_addr)?;
    let info = sys::vma_info(vma);
    let at = policy::address_in(site, &info)? & PAGE_MASK; // mutant: address-identity
    (at == page_addr && policy::check_restore_vma(&info).is_ok()).then_some(vma)
}

/// Lock the PTE that maps `page` at `page_addr` (in the VMA returned with
/// it), taking the page again (one read fault, e.g. back from the swap
/// cache) if reclaim or migration moved it since we looked.
pub(crate) fn relock_pte<'a>(
    guard: &'a MmapWriteGuard<'_>,
    rep: &Site,
    page_addr: usize,
    page: &mut PageRef,
) -> Option<(&'a VmaRef, LockedPte<'a>)> {
    for _ in 0..MAX_TRIES {
        let vma = still_mapped_at(guard, rep, page_addr)?;
        if let Some(pte) = sys::lock_pte(vma, page_addr, page) {
            return Some((vma, pte));
        }
        match guard.get_user_page(page_addr, sys::FOLL_FORCE) {
            Ok(p) if p.is_anon() => *page = p,
            _ => return None,
        }
    }
    None
}

/// What the walk over the target's VMAs saw of a file page.
#[derive(Default)]
struct Seen<'a> {
    /// Some VMA maps the file page.
    mapped: bool,
    /// Private copies RESTORE may write into.
    copies: u32,
    /// The best of them: (rank, vma, address, page).
    best: Option<(u8, &'a VmaRef, usize, PageRef)>,
    /// A copy in a mapping RESTORE may not write into, and why.
    refused: Option<Refusal>,
    /// A mapping that could not be faulted in.
    error: Option<Error>,
    /// A mapping whose page can hold no copy any more, and why.
    gone: Option<&'static str>,
    /// Where the page-cache page maps (or faults in) in its place, and how
    /// sure that is the text PATCH wrote in: 3, a mapping of the fork
    /// family at the address PATCH wrote; 2, one elsewhere (the text moved
    /// since: its range is the one to collapse); 1, a mapping the target
    /// never COWed, at that address.  Another view of the file elsewhere
    /// is not the text, and is never collapsed for it.
    cache_at: Option<(u8, usize)>,
}

/// Where the target maps the anonymous copy of `site`'s file page now: the
/// VMA, the page's address, and the page.  Walks every VMA of the fork
/// family PATCH wrote in (a mapping made since holds no copy of ours),
/// so it follows `mremap()`; a file page mapped more than once (ELF segments share
/// boundary pages; a library mapped twice) is looked at in each mapping.
/// Of several private copies it takes the one holding the page PATCH wrote
/// (its PFN), else the one at the address PATCH wrote; if there are several
/// and neither tells, it refuses rather than guess.
pub(crate) fn find_anon_copy<'a>(
    guard: &'a MmapWriteGuard<'_>,
    site: &Site,
) -> Result<Look<'a>, Refused> {
    let mut seen = Seen::default();
    let mut cursor = 0;
    while let Some(vma) = guard.next_vma_mapping(cursor, site.mapping, site.pgoff) {
        cursor = vma.end();
        let info = sys::vma_info(vma);
        let page_addr = policy::address_in(site, &info).map(|a| a & PAGE_MASK); // mutant: address-identity/2 address-identity-remap
        let Some(page_addr) = page_addr else { continue };
        seen.mapped = true;
        let at_site = page_addr == site.addr & PAGE_MASK;
        if info.has_anon_vma && site.family != 0 && sys::vma_family(vma) != site.family {
            // mutant: copy-of-another-family
            // A mapping made since (not of the fork family PATCH wrote in):
            // a copy there is another's, whatever its bytes.
            continue;
        }
        if !info.has_anon_vma {
            // mutant: fault-every-mapping
            // No anonymous page can be there: no fault (and no I/O, no
            // uffd fault) in a mapping the target never COWed.
            seen.note_cache(page_addr, if at_site { 1 } else { 0 }); // mutant: collapse-at-any-view
            continue;
        }
        let Some(page) = seen.fault_copy(guard, vma, &info, site.pgoff, (page_addr, at_site))
        else {
            continue;
        };
        if let Err(r) = policy::check_restore_vma(&info) {
            seen.refused = Some(r);
            continue;
        }
        seen.copies += 1;
        let rank = if page.pfn() == site.pfn {
            3
        } else if page_addr == site.addr & PAGE_MASK {
            2
        } else {
            1
        };
        if seen.best.as_ref().is_none_or(|b| rank > b.0) {
            seen.best = Some((rank, vma, page_addr, page));
        }
    }
    seen.verdict()
}

impl<'a> Seen<'a> {
    /// The anonymous copy at `page_addr` of `vma` (`info`), faulted in if
    /// need be; else none, noting why when it is not just the page-cache
    /// page (and when it is, whether that is at the address PATCH wrote:
    /// `at_site`).  One mapping that cannot be faulted in (uffd) says nothing
    /// about the others.
    fn fault_copy(
        &mut self,
        guard: &MmapWriteGuard<'_>,
        vma: &VmaRef,
        info: &VmaInfo,
        pgoff: usize,
        (page_addr, at_site): (usize, bool),
    ) -> Option<PageRef> {
        // A copy mapped there is taken from the page table: GUP's
        // FOLL_TOUCH would mark it accessed, and a second touch queues it
        // in this CPU's activate batch (a reference that would then cost
        // RESTORE a drain of every CPU).
        if let Some(page) = sys::anon_copy_at(vma, page_addr) {
            // mutant: restore-touches-the-copy
            return Some(page);
        }
        match guard.get_user_page(page_addr, sys::FOLL_FORCE) {
            Ok(page) if page.is_anon() => return Some(page),
            Ok(_) => self.note_cache(page_addr, if at_site { 3 } else { 2 }), // mutant: collapse-only-where-patched
            // Gone for good (truncated, guarded), or kept.
            Err(e) if e == EFAULT => match sys::gone_for_good(vma, info, pgoff) {
                Some(why) => self.gone = Some(why),
                None => self.error = Some(e),
            },
            Err(e) => self.error = Some(e),
        }
        None
    }

    /// The page-cache page maps at `page_addr`, as sure as `rank` (see
    /// `cache_at`; 0: not at all) to be the text: the surest wins.
    fn note_cache(&mut self, page_addr: usize, rank: u8) {
        if rank > self.cache_at.map_or(0, |(r, _)| r) {
            self.cache_at = Some((rank, page_addr));
        }
    }

    fn verdict(self) -> Result<Look<'a>, Refused> {
        match self.best {
            Some((rank, vma, page_addr, page)) if rank > 1 || self.copies == 1 => {
                // mutant: copies-guessed
                // Certainly the patch's only if no other mapping holds a
                // copy we could not look at or may not write.
                let sure = self.copies == 1 && self.refused.is_none() && self.error.is_none(); // mutant: sure-beside-refused
                return Ok(Look::Copy(vma, page_addr, page, sure));
            }
            Some(_) => {
                let why = "several private copies of the file page, none with the page or at the address PATCH wrote; nothing written";
                return Err(Refused::Kept(Refusal::new(EBUSY, why)));
            }
            None => {}
        }
        Err(match (self.mapped, self.refused, self.error) {
            (_, Some(r), _) => Refused::Kept(r),
            (_, None, None) if self.gone.is_some() => Refused::Gone {
                result: Ok(()),
                why: self.gone.unwrap_or_default(),
                cache_back: None,
            },
            (_, None, Some(e)) => Refused::Kept(Refusal::new(e, "cannot get the page")), // mutant: gup-error-forgets
            (true, None, None) => Refused::Gone {
                result: Ok(()),
                why: "page is no longer anonymous: already undone",
                cache_back: self.cache_at.map(|(_, at)| at), // mutant: no-collapse-after-undone
            },
            (false, None, None) => Refused::Gone {
                result: Err(ENXIO),
                why: "the patched file page is no longer mapped in the target; nothing written",
                cache_back: None,
            },
        })
    }
}

/// How the first pass ended.
pub(crate) enum Located {
    /// Every copy found and every site's bytes are the patched ones.
    Ready,
    /// As `Ready`, but a copy may sit in an LRU batch: drain first.
    NeedDrain,
    /// Refused (the position in `sites` to blame); nothing written.
    Refused(Refused, usize),
}

/// May the copy found for page `w` (its sites `on_page`) be held by a
/// per-CPU LRU batch, which would keep it from being zapped?  Only when
/// it is to be zapped (its last sites) and holds a reference we cannot
/// account for.
pub(crate) fn may_wait_in_lru_batch(
    on_page: &[Site],
    w: &PageWork,
    last_on_page: &impl Fn(&[Site]) -> bool,
) -> bool {
    matches!(&w.state, PageState::Found(_, page)
        if last_on_page(on_page) && page.unexpected_refs() > 0 && page.may_be_lru_cached())
}

/// The first pass of a RESTORE: find every page's copy (reusing one found
/// before, if the PTE still maps it there) and check every site's bytes
/// are the ones PATCH wrote.  Writes nothing.
pub(crate) fn locate_and_check(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    sites: &[Site],
    pages: &mut [PageWork],
    last_on_page: &impl Fn(&[Site]) -> bool,
    shared: Shared,
) -> Located {
    let mut need_drain = false;
    for w in pages.iter_mut() {
        if matches!(w.state, PageState::Gone(..)) {
            continue;
        }
        let r = w.range.clone();
        if let Err(refused) = locate_page(hp, guard, &sites[r.clone()], w, shared) {
            return Located::Refused(refused.0, r.start + refused.1);
        }
        need_drain |= may_wait_in_lru_batch(&sites[r], w, last_on_page);
    }
    if need_drain {
        Located::NeedDrain
    } else {
        Located::Ready
    }
}

/// What RESTORE does with a copy another process maps too.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shared {
    /// Break COW for this process, leave the other's mapping as it is: a
    /// forked process restored in its own pass, or a target restored at
    /// close or unload whatever its children said.
    Break,
    /// Refuse with [`FORKED_DURING_RESTORE`]: the target's copy is mapped
    /// by a process forked after RESTORE's forked pass (the mmap write
    /// lock held here keeps any new fork out), which RESTORE takes again.
    Refuse,
}

/// The refusal of [`Shared::Refuse`], which RESTORE answers with its
/// forked pass again.
pub(crate) const FORKED_DURING_RESTORE: &str =
    "the patched copy is mapped by a process forked during RESTORE: taking it back there first";

/// The first pass for one page: leaves `w.state` `Found` or `Gone`, or
/// refuses (with the site to blame, counted from the page's first).
fn locate_page(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    sites: &[Site],
    w: &mut PageWork,
    shared: Shared,
) -> Result<(), (Refused, usize)> {
    let rep = &sites[0];
    for _ in 0..MAX_TRIES {
        let (vma, page_addr, page, sure) = match look_up(guard, rep, w).map_err(|r| (r, 0))? {
            Look::Copy(vma, page_addr, page, sure) => (vma, page_addr, page, sure),
            Look::Again => continue,
            Look::Gone => return Ok(()),
        };
        let Some(pte) = sys::lock_pte(vma, page_addr, &page) else {
            continue;
        };
        if !pte.writable() && (pte.uffd_wp() || !pte.anon_exclusive()) {
            // mutant: no-cow-break-after-fork batch-no-cow-break uffd-wp-write-through
            let forked_runs_it = page.mapped_elsewhere() && runs_patch(sites, w.written, &page);
            if shared == Shared::Refuse && forked_runs_it {
                // mutant: forked-during-restore-kept
                let r = Refusal::new(EAGAIN, FORKED_DURING_RESTORE);
                return Err((Refused::Kept(r), 0));
            }
            w.shared |= !pte.anon_exclusive(); // mutant: no-sweep-after-cow-break
            fault_writable(hp, guard, rep, pte, &page, page_addr).map_err(|r| (r, 0))?;
            continue;
        }
        drop(pte);
        check_patched(hp, sites, w.written, &page, sure)?;
        w.state = PageState::Found(page_addr, page);
        w.sure = sure;
        return Ok(());
    }
    let why = "page table kept changing";
    Err((Refused::Kept(Refusal::new(EAGAIN, why)), 0))
}

/// What one look for a page's copy found.
pub(crate) enum Look<'a> {
    /// The copy, where it is mapped, the page, and whether it is certainly
    /// the patch's (held since PATCH, or the only private copy).
    Copy(&'a VmaRef, usize, PageRef, bool),
    /// The copy held from before moved: look again.
    Again,
    /// Nothing to restore (`w.state` says why).
    Gone,
}

/// Take the copy held from before (written by PATCH, or found before a
/// drain: no new GUP, whose FOLL_TOUCH could put the page in an LRU batch
/// right back) if the PTE still maps it there, else find it.
fn look_up<'a>(
    guard: &'a MmapWriteGuard<'_>,
    rep: &Site,
    w: &mut PageWork,
) -> Result<Look<'a>, Refused> {
    match core::mem::replace(&mut w.state, PageState::Unknown) {
        PageState::Found(page_addr, page) => Ok(match still_mapped_at(guard, rep, page_addr) {
            Some(vma) => Look::Copy(vma, page_addr, page, true),
            None => Look::Again,
        }),
        _ => match find_anon_copy(guard, rep) {
            Ok(copy) => Ok(copy),
            Err(Refused::Gone {
                result,
                why,
                cache_back,
            }) => {
                w.state = PageState::Gone(result, why);
                w.cache_back = cache_back;
                Ok(Look::Gone)
            }
            Err(kept) => Err(kept),
        },
    }
}

/// A uffd-wp PTE (as uprobes: a fault to take, never a bit to write
/// through) or a copy shared with a forked child: take the fault with
/// FOLL_WRITE, for this page in this mapping, and let the caller look again.
fn fault_writable(
    hp: &Hugepoke,
    guard: &MmapWriteGuard<'_>,
    rep: &Site,
    pte: LockedPte<'_>,
    page: &PageRef,
    page_addr: usize,
) -> Result<(), Refused> {
    let why = if pte.uffd_wp() {
        "PTE is userfaultfd write-protected; faulting it with FOLL_WRITE"
    } else {
        "page may be shared (forked child?); breaking COW first"
    };
    drop(pte);
    let ev = rep.event(Step::RestoreBytes);
    hp.journal.record(ev.page(page.pfn(), 0).error(EAGAIN, why));
    let flags = sys::FOLL_FORCE | sys::FOLL_WRITE | sys::FOLL_SPLIT_PMD;
    match guard.get_user_page(page_addr, flags) {
        Ok(_) => Ok(()),
        Err(e) => Err(Refused::Kept(Refusal::new(
            e,
            "cannot fault the page in for writing",
        ))),
    }
}

/// Does some site of the page hold the bytes PATCH wrote?  A copy back to
/// the originals at every site (another tool's, after the target dropped
/// ours) runs no patch in whoever shares it: breaking COW there leaves
/// nothing patched behind.
fn runs_patch(sites: &[Site], written: Written, page: &PageRef) -> bool {
    sites.iter().any(|s| {
        let (patched, _) = swap_bytes(s, written, Dir::Revert);
        let mut now = [0u8; MAX_BYTES];
        page.read(s.offset(), &mut now[..s.len]);
        now[..s.len] == *patched // mutant: shared-originals-refused
    })
}

/// A look before the write (the write checks again under the PT lock):
/// every site of the page holds the bytes PATCH wrote, or, in a copy that
/// is `sure`ly the patch's, already the originals.
fn check_patched(
    hp: &Hugepoke,
    sites: &[Site],
    written: Written,
    page: &PageRef,
    sure: bool,
) -> Result<(), (Refused, usize)> {
    for (k, s) in sites.iter().enumerate() {
        let (patched, orig) = swap_bytes(s, written, Dir::Revert);
        let mut now = [0u8; MAX_BYTES];
        page.read(s.offset(), &mut now[..s.len]);
        // (Another tool may have put the originals back: nothing to write.)
        if now[..s.len] != *patched && !(sure && now[..s.len] == *orig) {
            // mutant: no-byte-check restore-half-done/2 zap-before-all-written/2 restore-refuses-originals
            let ev = s.event(Step::RestoreBytes);
            let why = "this site's bytes are not the ones PATCH wrote";
            hp.journal
                .record(ev.page(page.pfn(), 0).error(sys::eilseq(), why));
            let why = "bytes at a site are not the ones PATCH wrote; nothing written";
            return Err((Refused::Kept(Refusal::new(sys::eilseq(), why)), k));
        }
    }
    Ok(())
}

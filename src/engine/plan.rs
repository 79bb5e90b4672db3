// SPDX-License-Identifier: GPL-2.0

//! A request as a plan of file pages: its sites checked, in address order
//! and grouped by the file page they fall in, each page with the file it
//! belongs to and what the steps found and did there.  A single PATCH is a
//! plan of one site; a RESTORE plans the sites of its handle the same way.
//! Everything the write phase needs is allocated here, before anything is
//! written, so no allocation can fail between a write and its record.

use kernel::{alloc::KVVec, fs::File, prelude::*, rbtree::RBTree, sync::aref::ARef};

use super::outcome::{Failure, Restored};
use crate::{
    few::Few,
    journal::{Event, Step},
    patches::{OnPage, Owner, PageKey, Site},
    policy,
    refusal::Refusal,
    sys::{self, MmapWriteGuard, PageRef, VmaInfo, PAGE_MASK},
    target::TargetState,
    uapi::{self, BatchSite, MAX_BYTES},
    Hugepoke,
};

/// A PATCH of one site or of a batch, as the ioctl gave it.
pub(crate) struct Request<'a> {
    pub(crate) pid: i32,
    /// `PATCH_PERSIST`, `PATCH_INSTALL_PMD` (each site has its own `PATCH_EXPECT`).
    pub(crate) flags: u32,
    pub(crate) sites: &'a [BatchSite],
    /// A PATCH_FILE's part in one process: what the sites must be.
    pub(crate) scope: Option<FileScope<'a>>,
}

/// What a PATCH_FILE asks of one process, for the PATCH there to hold it
/// to under the process's own locks (the walk saw VMAs without them): the
/// address space the walk found (not the image of a later `execve()`, nor
/// another process given the pid), and every site that file's page at
/// that offset.
#[derive(Clone, Copy)]
pub(crate) struct FileScope<'a> {
    /// The address space the walk found (`sys::mm_id`).
    pub(crate) mm: usize,
    /// The file's `address_space`.
    pub(crate) mapping: usize,
    /// The PATCH_FILE's own sites, in the request's order: their `addr`
    /// is the offset in the file.
    pub(crate) sites: &'a [BatchSite],
}

impl FileScope<'_> {
    /// Is site `i`, at `addr` on file page `key`, the file's text the
    /// request named?
    fn holds(&self, i: u32, addr: usize, key: PageKey) -> bool {
        let off = self.sites[i as usize].addr as usize;
        key == (self.mapping, off >> kernel::page::PAGE_SHIFT)
            && addr & !PAGE_MASK == off & !PAGE_MASK
    }
}

/// How far PATCH got on a page, so an undo knows what to give back.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// Untouched.
    No,
    /// COWed, nothing written: the bytes under the page-table lock were not
    /// the expected ones.  Its sites' `orig` hold what is there.
    Cowed,
    /// Every site of the page holds its patched bytes.
    Bytes,
}

/// Which way a page's sites are written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// RESTORE: the patched bytes are expected, the originals written.
    Revert,
    /// Undo of a RESTORE that could not finish: the other way round.
    Reapply,
}

/// The bytes a site should hold now, and the ones to write, for `dir`.
pub(crate) fn swap_bytes(s: &Site, written: Written, dir: Dir) -> (&[u8], &[u8]) {
    let patched = if written == Written::Cowed {
        &s.orig
    } else {
        &s.bytes
    };
    let (now, new) = match dir {
        Dir::Revert => (patched, &s.orig),
        Dir::Reapply => (&s.orig, patched),
    };
    (&now[..s.len], &new[..s.len])
}

/// One file page of a plan: which sites, what the steps found, what was done.
pub(crate) struct PageWork {
    pub(crate) range: core::ops::Range<usize>,
    pub(crate) state: PageState,
    pub(crate) outcome: Outcome,
    pub(crate) written: Written,
    /// A PATCH's: the file the page belongs to (taken by the table if the
    /// page is new to it).  RESTORE's pages have none.
    pub(crate) file: Option<ARef<File>>,
    /// A PATCH's: its sites' fork family, held from the write on (taken
    /// by the target's state with the sites).  RESTORE's pages have none.
    pub(crate) family: Option<sys::FamilyRef>,
    /// The copy found is certainly the patch's (the page PATCH wrote, held
    /// since, or the only private copy): only then may RESTORE take a site
    /// holding its originals for one another tool restored.
    pub(crate) sure: bool,
    /// RESTORE found some site of this page holding its originals already:
    /// an undo of RESTORE does not patch this page again.
    pub(crate) already: bool,
    /// PATCH split the PMD that mapped this page.
    pub(crate) split: bool,
    /// A PATCH's: an anonymous copy (another tool's) mapped the page
    /// before PATCH wrote into it; its undo leaves the copy, not zaps it.
    pub(crate) copy_before: bool,
    /// No copy of the page is left where the patch was: the page-cache
    /// page maps (or faults) back there, at this page address, so the
    /// range may be collapsed.
    pub(crate) cache_back: Option<usize>,
    /// RESTORE found this process's copy shared with another mapping (not
    /// exclusive) and broke COW for it: the other may run the patch still.
    pub(crate) shared: bool,
    /// RESTORE restored the target's own copy, then a process forked from
    /// it refused: the page's sites stay, marked `target_restored`.
    pub(crate) target_restored: bool,
}

impl PageWork {
    pub(crate) fn new(range: core::ops::Range<usize>, written: Written) -> Self {
        Self {
            range,
            state: PageState::Unknown,
            outcome: Outcome::Untouched,
            written,
            file: None,
            family: None,
            sure: false,
            already: false,
            split: false,
            copy_before: false,
            cache_back: None,
            shared: false,
            target_restored: false,
        }
    }
}

/// What the steps found for one page.
pub(crate) enum PageState {
    /// Not looked at yet.
    Unknown,
    /// The page's copy, where it is mapped now, and the reference on it.
    Found(usize, PageRef),
    /// Nothing to restore: the patch went (how, and what RESTORE returns).
    Gone(Result, &'static str),
}

/// What was done to one page by a RESTORE (or an undo).
pub(crate) enum Outcome {
    /// Nothing: it holds what it held before.
    Untouched,
    /// The originals are back in the copy, which is still mapped.
    Written,
    /// Restored, and zapped or kept as `Restored` says.
    Done(Restored),
}

/// Consecutive runs of `sites` on one page, as index ranges.
pub(crate) fn runs<'a, T, K: PartialEq>(
    sites: &'a [T],
    page: impl Fn(&T) -> K + 'a,
) -> impl Iterator<Item = core::ops::Range<usize>> + 'a {
    let mut start = 0;
    core::iter::from_fn(move || {
        let first = sites.get(start)?;
        let p = page(first);
        let len = sites[start..].iter().take_while(|s| page(s) == p).count();
        start += len;
        Some(start - len..start)
    })
}

/// The pages of `sites` (in page order), as `PageWork` with `written`.
pub(crate) fn pages_of(sites: &[Site], written: Written) -> Result<Few<PageWork>> {
    let mut pages = Few::with_capacity(sites.len(), GFP_KERNEL)?;
    for r in runs(sites, |s| s.page_key()) {
        // Within capacity: at most one page a site.
        let _ = pages.push_within_capacity(PageWork::new(r, written));
    }
    Ok(pages)
}

/// The checks that need no target: flags and range of every site, and no
/// two sites overlapping.  Returns the sites' indexes in address order.
pub(crate) fn check_sites(hp: &Hugepoke, req: &Request<'_>) -> Result<Few<u32>, Failure> {
    let sites = req.sites;
    let blame = |i: usize, r: Refusal| {
        let ev = Event::new(Step::Patch)
            .pid(req.pid)
            .addr(sites[i].addr as usize);
        Failure::at(hp.journal.refuse(ev, r), i as u32)
    };
    for (i, s) in sites.iter().enumerate() {
        if s.flags & !uapi::SITE_FLAGS != 0 {
            return Err(blame(i, Refusal::new(EINVAL, "unknown site flag bits")));
        }
        policy::check_range(s.addr, s.len).map_err(|r| blame(i, r))?;
    }
    let nomem = || {
        Failure::from(hp.journal.fail(
            Event::new(Step::Patch).pid(req.pid),
            ENOMEM,
            "no memory to sort the sites",
        ))
    };
    let mut order = Few::with_capacity(sites.len(), GFP_KERNEL).map_err(|_| nomem())?;
    for i in 0..sites.len() as u32 {
        // Within capacity: one a site.
        let _ = order.push_within_capacity(i);
    }
    order.sort_unstable_by_key(|&i| sites[i as usize].addr);
    for w in order.windows(2) {
        let (a, b) = (&sites[w[0] as usize], &sites[w[1] as usize]);
        if a.addr + a.len as u64 > b.addr {
            // mutant: self-overlap
            return Err(blame(
                w[0].max(w[1]) as usize,
                Refusal::new(EINVAL, "site overlaps another site of this request"),
            ));
        }
    }
    Ok(order)
}

/// A request on its way in, in address order: the table records its sites
/// become, their expected bytes, and its pages with their files.
pub(crate) struct Plan {
    pub(crate) sites: KVVec<Site>,
    pub(crate) expects: Expects,
    pub(crate) pages: Few<PageWork>,
}

/// The expected bytes of a plan's sites, one per site, or none at all when
/// no site of the request has any.
pub(crate) struct Expects(pub(crate) Option<Few<Option<[u8; MAX_BYTES]>>>);

impl Expects {
    /// Those of the sites in `r`, in order (empty when there are none).
    pub(crate) fn of(&self, r: core::ops::Range<usize>) -> &[Option<[u8; MAX_BYTES]>] {
        self.0.as_ref().map_or(&[], |e| &e[r])
    }
}

/// Who the plan's sites belong to.
pub(crate) struct Identity {
    pub(crate) handle: u64,
    pub(crate) owner: Owner,
    pub(crate) pid: i32,
}

/// The VMA the last site was in, to check the next one against.
struct LastVma(Option<(VmaInfo, ARef<File>)>);

impl Plan {
    /// Room for `n` sites (and as many pages), and their expected bytes if
    /// some site has them: nothing is allocated once sites are added.
    fn with_capacity(n: usize, expects: bool) -> Result<Self> {
        Ok(Self {
            // (The table keeps this vector: charged to the caller.)
            sites: KVVec::with_capacity(n, GFP_KERNEL_ACCOUNT)?,
            expects: Expects(match expects {
                true => Some(Few::with_capacity(n, GFP_KERNEL)?),
                false => None,
            }),
            pages: Few::with_capacity(n, GFP_KERNEL)?,
        })
    }

    /// Check every site of `req` against the target's VMAs and live patches
    /// (nothing is written), in address order (`order`).
    pub(crate) fn build(
        hp: &Hugepoke,
        guard: &MmapWriteGuard<'_>,
        state: &TargetState,
        req: &Request<'_>,
        order: &[u32],
        who: &Identity,
    ) -> Result<Self, Failure> {
        let nomem = || {
            Failure::from(hp.journal.fail(
                Event::new(Step::Patch).pid(who.pid),
                ENOMEM,
                "no memory to record a patch",
            ))
        };
        let expects = req.sites.iter().any(|s| s.flags & uapi::PATCH_EXPECT != 0);
        let mut plan = Self::with_capacity(order.len(), expects).map_err(|_| nomem())?;
        // The file pages the request reaches.
        let mut at: RBTree<PageKey, ()> = RBTree::new();
        let mut last = LastVma(None);
        // The live sites of the page the last site was on: looked up once a page.
        let mut on_page = OnPage::default();
        for &i in order {
            let blame = |r: Refusal| {
                let ev = Event::new(Step::CheckVma)
                    .pid(who.pid)
                    .addr(req.sites[i as usize].addr as usize);
                Failure::at(hp.journal.refuse(ev, r), i)
            };
            let (info, file) = last
                .lookup(guard, req.sites[i as usize].addr as usize)
                .map_err(blame)?;
            plan.add_site(state, &mut on_page, &mut at, req, i, who, &info, &file)
                .map_err(blame)?;
            last.0 = Some((info, file));
        }
        Ok(plan)
    }

    /// Add site `i` of `req` in VMA `info`: refused if it overlaps a live
    /// patch, or reaches a file page it already reached at another address.
    #[allow(clippy::too_many_arguments)]
    fn add_site<'s>(
        &mut self,
        state: &'s TargetState,
        on_page: &mut OnPage<'s>,
        at: &mut RBTree<PageKey, ()>,
        req: &Request<'_>,
        i: u32,
        who: &Identity,
        info: &VmaInfo,
        file: &ARef<File>,
    ) -> Result<(), Refusal> {
        let s = &req.sites[i as usize];
        let addr = s.addr as usize;
        let key = (info.mapping, info.pgoff_of(addr & PAGE_MASK));
        if req.scope.is_some_and(|f| !f.holds(i, addr, key)) {
            // mutant: file-scope-unchecked
            let why = "the file's text moved in this process since its mappings were walked";
            return Err(Refusal::new(EAGAIN, why));
        }
        // Sites come in address order: a page's sites are one run.
        let last_page = self
            .pages
            .last()
            .map(|w| self.sites[w.range.start].addr & PAGE_MASK);
        let new_page = last_page != Some(addr & PAGE_MASK); // mutant: page-per-site
        if new_page {
            *on_page = state.patches.page(&key);
        }
        if on_page.overlaps(addr & !PAGE_MASK, s.len as usize) {
            // mutant: overlap-live overlap-first-site-only
            return Err(Refusal::new(EBUSY, "range overlaps a live patch"));
        }
        // (A request's only site has no other to meet.)
        if new_page && req.sites.len() > 1 {
            // One file page reached at two addresses would be two copies:
            // the table knows a patch by its file page, so that is refused.
            if at.get(&key).is_some() {
                // mutant: two-addresses two-addresses-adjacent-only page-per-site/2
                return Err(Refusal::new(
                    EINVAL,
                    "two sites on one file page mapped at two addresses",
                ));
            }
            let nomem = |_| Refusal::new(ENOMEM, "no memory to record a patch");
            at.try_create_and_insert(key, (), GFP_KERNEL)
                .map_err(nomem)?;
        }
        let site = planned_site(who, i, s, req.flags | s.flags, key);
        self.push_site(site, s, new_page.then_some(file));
        Ok(())
    }

    /// Record `site` (`s` of the request), on a new page of `file` if one
    /// is given, else on the last page.  Within the capacity made up front.
    fn push_site(&mut self, site: Site, s: &BatchSite, new_page: Option<&ARef<File>>) {
        if let Some(file) = new_page {
            let start = self.sites.len();
            let page = PageWork {
                file: Some(file.clone()),
                ..PageWork::new(start..start, Written::No)
            };
            // Within capacity: at most one page a site.
            let _ = self.pages.push_within_capacity(page);
        }
        // Within capacity: n each.
        let _ = self.sites.push_within_capacity(site);
        if let Some(expects) = &mut self.expects.0 {
            let _ = expects
                .push_within_capacity((s.flags & uapi::PATCH_EXPECT != 0).then_some(s.expect));
        }
        if let Some(w) = self.pages.last_mut() {
            w.range.end = self.sites.len();
        }
    }

    /// (file page, sites on it) for each page, to reserve the table's room.
    pub(crate) fn page_counts(&self) -> impl Iterator<Item = (PageKey, usize)> + '_ {
        self.pages
            .iter()
            .map(|w| (self.sites[w.range.start].page_key(), w.range.len()))
    }

    /// The cheap look at the expected bytes, one plain (non-COWing) GUP a
    /// page: a mismatch here changes nothing.  The check that counts is
    /// made again under the page-table lock, in the step that writes.
    pub(crate) fn peek_expected(
        &self,
        hp: &Hugepoke,
        guard: &MmapWriteGuard<'_>,
    ) -> Result<(), Failure> {
        for w in self.pages.iter() {
            let r = w.range.clone();
            if self.expects.of(r.clone()).iter().all(|e| e.is_none()) {
                continue;
            }
            let first = &self.sites[r.start];
            let ev = |s: &Site| Event::new(Step::CheckExpected).pid(s.pid).addr(s.addr);
            let page = guard
                .get_user_page(first.addr & PAGE_MASK, sys::FOLL_FORCE)
                .map_err(|e| {
                    Failure::at(
                        hp.journal.fail(ev(first), e, "cannot read the target page"),
                        first.index,
                    )
                })?;
            for (s, expect) in self.sites[r.clone()].iter().zip(self.expects.of(r)) {
                let mut now = [0u8; MAX_BYTES];
                page.read(s.offset(), &mut now[..s.len]);
                if expect.is_some_and(|e| e[..s.len] != now[..s.len]) {
                    // mutant: expect-only-under-lock
                    let why = "bytes at the address are not the expected ones";
                    return Err(Failure::at(
                        hp.journal.fail(ev(s), sys::eilseq(), why),
                        s.index,
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The table record site `i` (`s`) of a request becomes, on file page `key`.
fn planned_site(who: &Identity, i: u32, s: &BatchSite, flags: u32, key: PageKey) -> Site {
    Site {
        handle: who.handle,
        index: i,
        owner: who.owner,
        pid: who.pid,
        addr: s.addr as usize,
        len: s.len as usize,
        flags,
        mapping: key.0,
        pgoff: key.1,
        bytes: s.bytes,
        orig: [0; MAX_BYTES],
        pfn: 0,
        family: 0,
        since: 0,
        pmd_mappable: false,
        restored_at: 0,
    }
}

impl LastVma {
    /// The VMA of `addr`, checked; sites come in address order, so most
    /// are in the VMA of the one before.
    fn lookup(
        &mut self,
        guard: &MmapWriteGuard<'_>,
        addr: usize,
    ) -> Result<(VmaInfo, ARef<File>), Refusal> {
        match self.0.take() {
            Some((info, file)) if info.start <= addr && addr < info.end => Ok((info, file)),
            _ => {
                let vma = guard
                    .vma_lookup(addr)
                    .ok_or(Refusal::new(EFAULT, "address is not mapped"))?;
                let info = sys::vma_info(vma);
                policy::check_vma(&info)?;
                let file =
                    sys::vma_file(vma).ok_or(Refusal::new(EINVAL, "not a file-backed mapping"))?;
                Ok((info, file))
            }
        }
    }
}

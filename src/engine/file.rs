// SPDX-License-Identifier: GPL-2.0

//! PATCH_FILE: one patch of a file's text in every process that maps it
//! privately and executably when the call runs, all or none, under one
//! handle.
//!
//! The processes are found through the file's own mappings, as uprobes'
//! `build_map_info()` finds them ([`members`]): the rmap walk of each
//! site's page-cache folio lists the VMAs, without any process's lock.
//! Each process is then patched by PATCH itself, with the walk's findings
//! as its [`FileScope`]: under that process's own locks, PATCH refuses a
//! site that is no longer that file's page at that offset.  A refusal or failure in one process undoes the
//! processes patched before it (RESTORE of their handles), so nothing is
//! left but what could not be undone, kept under the returned handle.
//! Processes that map the file later are not patched.
//!
//! The handle ([`FileHandle`] in the registry) holds the handles of the
//! processes' patches; RESTORE and QUERY of it go through them.

use kernel::{alloc::KVVec, fs::LocalFile, mm::Mm, prelude::*, sync::aref::ARef, sync::Arc};

use super::{
    owned::restore_after_killed_patch,
    patch::patch,
    plan::{FileScope, Request},
    settle::{drop_handle, restore_of},
};
use crate::{
    journal::{Event, Step},
    patches::Owner,
    pause::Point,
    sys::{self, FileVma, PAGE_MASK},
    target::Target,
    uapi::{self, BatchSite, MAX_FILE_PROCESSES},
    Hugepoke,
};

/// RESTORE or QUERY of a file patch while PATCH_FILE still makes it.
const BUILDING: &str = "the file patch is still being made (PATCH_FILE has not returned)";

/// Most VMAs one walk may list: a process may map a file's text more than once.
const MAX_FILE_VMAS: usize = 4 * MAX_FILE_PROCESSES;

/// One process a PATCH_FILE reaches: its address space and pid as the
/// walk found them, and the request's sites at their addresses there.
pub(crate) struct Member {
    mm: ARef<Mm>,
    pub(crate) pid: i32,
    sites: KVVec<BatchSite>,
}

impl Member {
    /// PATCH in this process, held to what the walk found (`FileScope`,
    /// with `file_sites`, the PATCH_FILE's own sites).
    fn patch(
        &self,
        hp: &Arc<Hugepoke>,
        owner: u64,
        flags: u32,
        mapping: usize,
        file_sites: &[BatchSite],
    ) -> Result<u64, super::Failure> {
        let request = Request {
            pid: self.pid,
            flags,
            sites: &self.sites,
            scope: Some(FileScope {
                mm: sys::mm_id(&self.mm),
                mapping,
                sites: file_sites,
            }),
        };
        patch(hp, owner, &request)
    }
}

/// How a PATCH_FILE failed: the error, the site and the process to blame,
/// and the handle that keeps what could not be undone.
pub(crate) struct FileFailure {
    pub(crate) error: Error,
    pub(crate) site: Option<u32>,
    pub(crate) pid: i32,
    pub(crate) kept: Option<u64>,
}

impl FileFailure {
    /// A failure that blames site `site` in process `pid`.
    fn of_process(error: Error, pid: i32, site: usize) -> Self {
        Self {
            error,
            site: Some(site as u32),
            pid,
            kept: None,
        }
    }
}

impl From<Error> for FileFailure {
    fn from(error: Error) -> Self {
        Self {
            error,
            site: None,
            pid: 0,
            kept: None,
        }
    }
}

/// The processes that map `sites` (file offsets) of `file` privately and
/// executably, the caller excepted, in pid order, each with its sites'
/// addresses.  A process that maps some of the sites' pages but not all,
/// or one of them at two addresses, is refused: it would be half patched.
pub(crate) fn members(
    hp: &Hugepoke,
    file: &LocalFile,
    sites: &[BatchSite],
) -> Result<KVVec<Member>, FileFailure> {
    let ev = Event::new(Step::ResolveTarget);
    let vmas = walk(hp, file, sites)?;
    let nomem = |_| {
        hp.journal
            .fail(ev, ENOMEM, "no memory for the file's processes")
    };
    let mut members = KVVec::new();
    for run in super::plan::runs(&vmas, |v| sys::mm_id(&v.mm)) {
        let Some(m) = member(hp, &vmas[run], sites)? else {
            continue;
        };
        if members.len() == MAX_FILE_PROCESSES {
            let why = "more processes map the file than one PATCH_FILE may patch";
            return Err(hp.journal.fail(ev, E2BIG, why).into());
        }
        // In pid order (a search, not a sort: objtool and the sort's code).
        let at = members.partition_point(|o: &Member| o.pid < m.pid);
        members.reserve(1, GFP_KERNEL).map_err(nomem)?;
        let _ = members.insert_within_capacity(at, m);
    }
    hp.journal.record(ev.note("the file's processes found"));
    Ok(members)
}

/// Every private executable VMA that maps a page of the sites, by address
/// space and start: one rmap walk a page-cache folio.
fn walk(hp: &Hugepoke, file: &LocalFile, sites: &[BatchSite]) -> Result<KVVec<FileVma>, Error> {
    let ev = Event::new(Step::ResolveTarget);
    let nomem = |_| {
        hp.journal
            .fail(ev, ENOMEM, "no memory for the file's mappings")
    };
    // The page ranges walked so far: one walk lists the VMAs of every
    // page of its folio.
    let mut walked: KVVec<(usize, usize)> = KVVec::new();
    let mut vmas: KVVec<FileVma> = KVVec::new();
    for s in sites {
        let page = s.addr as usize >> kernel::page::PAGE_SHIFT;
        if walked.iter().any(|&(a, b)| a <= page && page < b) {
            continue;
        }
        let (found, past) = sys::file_vmas(file, page, MAX_FILE_VMAS).map_err(|e| {
            let why = match e {
                e if e == E2BIG => {
                    "the file is mapped by more VMAs than one PATCH_FILE may look at"
                }
                e if e == ENXIO => "a site is past the end of the file",
                e if e == EINVAL => "not a regular file",
                _ => "cannot read the file's page to walk its mappings",
            };
            hp.journal
                .fail(ev.addr(page << kernel::page::PAGE_SHIFT), e, why)
        })?;
        walked.push((page, past), GFP_KERNEL).map_err(nomem)?;
        for v in found {
            let key = (sys::mm_id(&v.mm), v.start);
            if let Err(at) = vmas.binary_search_by_key(&key, |w| (sys::mm_id(&w.mm), w.start)) {
                if vmas.len() == MAX_FILE_VMAS {
                    let why = "the file is mapped by more VMAs than one PATCH_FILE may look at";
                    return Err(hp.journal.fail(ev, E2BIG, why));
                }
                vmas.reserve(1, GFP_KERNEL).map_err(nomem)?;
                // Within capacity, and `at <= len`.
                let _ = vmas.insert_within_capacity(at, v);
            }
        }
    }
    Ok(vmas)
}

/// The pid of `mm`'s process in the caller's pid namespace; None for one
/// whose last task is exiting (its mm has no owner: it runs nothing more);
/// EPERM for one the caller's namespace does not see (it could not be
/// named).
fn visible_pid(hp: &Hugepoke, mm: &Mm) -> Result<Option<i32>, FileFailure> {
    match sys::mm_owner(mm) {
        Some(0) => {
            let why = "a process that maps the file is not visible in the caller's pid namespace";
            let ev = Event::new(Step::ResolveTarget);
            Err(hp.journal.fail(ev, EPERM, why).into())
        }
        pid => Ok(pid),
    }
}

/// The member the VMAs `vmas` of one address space make, if it maps any
/// site: every site's address there, each page mapped exactly once.
fn member(
    hp: &Hugepoke,
    vmas: &[FileVma],
    sites: &[BatchSite],
) -> Result<Option<Member>, FileFailure> {
    let Some(pid) = visible_pid(hp, &vmas[0].mm)? else {
        return Ok(None);
    };
    let ev = Event::new(Step::ResolveTarget).pid(pid);
    let mut out = KVVec::with_capacity(sites.len(), GFP_KERNEL).map_err(|_| {
        hp.journal
            .fail(ev, ENOMEM, "no memory for the file's processes")
    })?;
    let mut missing = None;
    for (i, s) in sites.iter().enumerate() {
        let pgoff = s.addr as usize >> kernel::page::PAGE_SHIFT;
        let mut at = vmas.iter().filter_map(|v| v.addr_of(pgoff));
        match (at.next(), at.next()) {
            (Some(addr), None) => {
                // Within capacity: one a site.
                let _ = out.push_within_capacity(BatchSite {
                    addr: (addr | (s.addr as usize & !PAGE_MASK)) as u64,
                    ..*s
                });
            }
            (Some(_), Some(_)) => {
                let why = "a process maps a site's file page at two addresses";
                let error = hp.journal.fail(ev.addr(s.addr as usize), EINVAL, why);
                return Err(FileFailure::of_process(error, pid, i));
            }
            (None, _) => missing = missing.or(Some(i)),
        }
    }
    match missing {
        // (It maps another part of a folio a site is on.)
        Some(_) if out.is_empty() => Ok(None), // mutant: file-partial-skipped
        Some(i) => {
            let why = "a process maps the file's text but not every site's page";
            let error = hp
                .journal
                .fail(ev.addr(sites[i].addr as usize), EINVAL, why);
            Err(FileFailure::of_process(error, pid, i))
        }
        None => Ok(Some(Member {
            mm: vmas[0].mm.clone(),
            pid,
            sites: out,
        })),
    }
}

/// PATCH_FILE: patch `sites` in every member, in pid order, all or none;
/// the one handle of the whole patch.  On failure, the members patched so
/// far are restored; what could not be is kept under the handle returned
/// in the failure.
pub(crate) fn patch_file(
    hp: &Arc<Hugepoke>,
    owner: u64,
    file: &LocalFile,
    flags: u32,
    sites: &[BatchSite],
    members: &[Member],
) -> Result<u64, FileFailure> {
    let ev = Event::new(Step::Patch);
    let owned: Owner = (flags & uapi::PATCH_PERSIST == 0).then_some(owner);
    let nomem = || {
        hp.journal
            .fail(ev, ENOMEM, "no memory to record a file's patch")
    };
    let mut handles = KVVec::with_capacity(members.len(), GFP_KERNEL).map_err(|_| nomem())?;
    let handle = hp
        .registry
        .lock()
        .new_file_handle(owned)
        .map_err(|_| nomem())?;
    let ev = ev.handle(handle);
    let mapping = sys::file_mapping(file);
    for m in members {
        hp.pauses.at(Point::Walked, m.pid, &hp.journal);
        match m.patch(hp, owner, flags, mapping, sites) {
            // Within capacity: one a member.
            Ok(h) => drop(handles.push_within_capacity(h)),
            Err(f) => {
                let kept = undo(hp, handle, owned, handles, f.kept);
                // A note: the process's own refusal is the failure to read.
                let undone = "a process refused or failed: the file's patch is undone";
                hp.journal.record(ev.pid(m.pid).note(undone));
                return Err(FileFailure {
                    error: f.error,
                    site: f.site,
                    pid: m.pid,
                    kept,
                });
            }
        }
    }
    let old = hp.registry.lock().set_members(handle, owned, handles);
    drop(old);
    hp.journal
        .record(ev.note("the file's text patched in every process that maps it"));
    Ok(handle)
}

/// Restore the members patched so far (`done`) of the file patch `handle`
/// after one failed (and kept `failed_kept`, if so): the file handle if
/// anything is left, else nothing (and the handle forgotten).
fn undo(
    hp: &Arc<Hugepoke>,
    handle: u64,
    owner: Owner,
    mut done: KVVec<u64>,
    failed_kept: Option<u64>,
) -> Option<u64> {
    if sys::fatal_signal_pending() {
        // The caller is dying: its undo's GUPs would fail with EINTR; a
        // work item's do not.  Nobody will be told a handle.  (The failed
        // process's own part too: PATCH queued it only if the signal had
        // come by then; a second RESTORE of it finds nothing.)
        for &h in done.iter() {
            restore_after_killed_patch(hp, h); // mutant: killed-file-patch-kept
        }
        if let Some(h) = failed_kept {
            restore_after_killed_patch(hp, h);
        }
        drop(hp.registry.lock().forget_file_handle(handle));
        return None;
    }
    let target = |h| hp.registry.lock().target_of(h);
    done.retain(|&mut h| target(h).is_some_and(|t| restore_of(hp, &t, h).is_err())); // mutant: file-no-undo
    if let Some(h) = failed_kept {
        if done.push(h, GFP_KERNEL).is_err() {
            // Still its own handle, persistent: `patches` lists it.
            hp.journal.record(Event::new(Step::Patch).handle(h).error(
                ENOMEM,
                "no memory to keep a process's part under the file's handle",
            ));
        }
    }
    let mut registry = hp.registry.lock();
    if done.is_empty() {
        let forgotten = registry.forget_file_handle(handle);
        drop(registry);
        drop(forgotten);
        return None;
    }
    let old = registry.set_members(handle, owner, done);
    drop(registry);
    drop(old);
    Some(handle)
}

/// RESTORE (or, with `drop`, RESTORE_DROP) of the file patch `handle`:
/// every member still there, in turn.  A member that fails stays under the
/// handle, and the first error is returned once every member was tried;
/// the handle goes with its last member.
pub(crate) fn restore_file(hp: &Arc<Hugepoke>, handle: u64, drop_only: bool) -> Result {
    let ev = Event::new(Step::Restore).handle(handle);
    let (owner, members) = {
        let registry = hp.registry.lock();
        let f = registry.file_handle(handle).ok_or_else(|| {
            hp.journal
                .fail(ev, ENOENT, "no such patch (unknown or already restored)")
        })?;
        if f.building {
            // mutant: file-restore-while-building
            return Err(hp.journal.fail(ev, EBUSY, BUILDING));
        }
        let mut members = KVVec::with_capacity(f.members.len(), GFP_KERNEL).map_err(|_| {
            hp.journal
                .fail(ev, ENOMEM, "no memory to restore a file's patch")
        })?;
        for &h in f.members.iter() {
            // Within capacity.
            let _ = members.push_within_capacity(h);
        }
        (f.owner, members)
    };
    let mut first = Ok(());
    let mut left = members;
    left.retain(|&mut h| {
        let Some(target) = hp.registry.lock().target_of(h) else {
            return false;
        };
        let r = match drop_only {
            true => drop_handle(hp, &target, h),
            false => restore_of(hp, &target, h),
        };
        if let (Err(e), Ok(())) = (r, &first) {
            first = Err(e);
        }
        r.is_err() // mutant: file-restore-forgets-failed
    });
    let mut registry = hp.registry.lock();
    let gone = if left.is_empty() {
        registry.forget_file_handle(handle).map(|f| f.members)
    } else {
        registry.set_members(handle, owner, left)
    };
    drop(registry);
    drop(gone);
    if first.is_ok() {
        hp.journal
            .record(ev.note("the file's patch restored in every process"));
    }
    first
}

/// The live sites of the file patch `handle`, counted over its members,
/// and site `index` of them: its member's target, handle and index there.
pub(crate) fn site_of(
    hp: &Hugepoke,
    handle: u64,
    index: u32,
) -> Result<(u32, Option<(Arc<Target>, u64, u32)>)> {
    let ev = Event::new(Step::Query).handle(handle);
    let (mut total, mut found) = (0u32, None);
    for (t, h) in patches_of(hp, handle)? {
        let n = t.lock_killable(&hp.journal, ev)?.patches.count(h);
        if found.is_none() && index < total + n {
            found = Some((t, h, index - total));
        }
        total += n;
    }
    Ok((total, found))
}

/// RESTORE of any handle, a file patch's or a process's.
pub(crate) fn restore_any(hp: &Arc<Hugepoke>, handle: u64) -> Result {
    if hp.registry.lock().file_handle(handle).is_some() {
        return restore_file(hp, handle, false);
    }
    super::settle::restore(hp, handle)
}

/// Forget the file patches `owner` made: its file is closing, and closing
/// restores their members (each its own handle, owned by that file).
pub(crate) fn forget_file_handles(hp: &Hugepoke, owner: u64) {
    loop {
        let forgotten = {
            let mut registry = hp.registry.lock();
            let handle = registry.file_handle_of(owner);
            handle.and_then(|h| registry.forget_file_handle(h))
        };
        match forgotten {
            Some(f) => drop(f),
            None => break,
        }
    }
}

/// The processes' patches behind `handle` — a file patch's members, or the
/// handle itself — with their targets.
pub(crate) fn patches_of(hp: &Hugepoke, handle: u64) -> Result<KVec<(Arc<Target>, u64)>> {
    let registry = hp.registry.lock();
    let mut out = KVec::new();
    match registry.file_handle(handle) {
        Some(f) if f.building => {
            let ev = Event::new(Step::Query).handle(handle);
            return Err(hp.journal.fail(ev, EBUSY, BUILDING));
        }
        Some(f) => {
            for &h in f.members.iter() {
                if let Some(t) = registry.target_of(h) {
                    out.push((t, h), GFP_KERNEL)?;
                }
            }
        }
        None => {
            if let Some(t) = registry.target_of(handle) {
                out.push((t, handle), GFP_KERNEL)?;
            }
        }
    }
    Ok(out)
}

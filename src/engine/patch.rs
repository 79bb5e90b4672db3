// SPDX-License-Identifier: GPL-2.0

//! PATCH, of one site or of many under one handle, all or none: the
//! request checked and planned, the expected bytes peeked at, then a page
//! at a time split, copied and written, and the plan recorded — or, when a
//! page fails, the pages written so far given back by RESTORE's own
//! passes, with the mmap lock still held.
//!
//! The target's state is locked and its mmap lock held for writing for the
//! whole call (see `table` for the lock order), so no `/proc/PID/mem` or
//! ptrace write, no mprotect, mremap, munmap or fork comes between checking
//! one site and writing another.  What the mmap lock does not keep out —
//! MADV_DONTNEED and faults under the per-VMA lock, reclaim, migration,
//! truncation — is met where it matters: every write is made under the PT
//! lock after `lock_pte` found the very page we hold, right after the bytes
//! there were read and compared.

use kernel::{
    mm::{virt::VmaRef, Mm, MmWithUser, MmWithUserAsync},
    prelude::*,
    sync::{aref::ARef, Arc},
};

use super::{
    outcome::{Failure, WriteError},
    owned::restore_after_killed_patch,
    page::write_patch,
    plan::{check_sites, Identity, PageState, Plan, Request, Written},
    restore::{queue_collapses, undo},
};
use crate::{
    journal::{Event, Step},
    patches::{Owner, Reserved, Site},
    pause::Point,
    sys::{self, Mapping, MmapWriteGuard, PageRef, Process, PAGE_MASK},
    target::{Target, TargetState},
    uapi, Hugepoke,
};

/// PATCH: write every site of `req` into the target, or none.  `owner` is
/// the opener's file, which owns the patch unless it is persistent.
pub(crate) fn patch(hp: &Arc<Hugepoke>, owner: u64, req: &Request<'_>) -> Result<u64, Failure> {
    let ev = Event::new(Step::Patch).pid(req.pid);
    hp.journal.record(ev.addr(req.sites[0].addr as usize));
    let order = check_sites(hp, req)?;
    let (mm, process) = resolve_target(hp, req.pid, req.sites[0].addr as usize)?;
    if req.scope.is_some_and(|f| f.mm != sys::mm_id(&mm)) {
        // mutant: file-scope-other-mm
        let why =
            "the process is not the one the file's walk found (execve, or its pid reused, since)";
        let ev = Event::new(Step::ResolveTarget).pid(req.pid);
        return Err(hp.journal.fail(ev, EAGAIN, why).into());
    }
    let pid = process.tgid();
    let owner: Owner = if req.flags & uapi::PATCH_PERSIST != 0 {
        None
    } else {
        Some(owner)
    };
    let result = with_new_handle(hp, &mm, &process, owner, ev, |target, state, handle| {
        let who = Identity { handle, owner, pid };
        patch_locked(hp, target, state, &mm, req, &order, &who)
    });
    if let Err(Failure {
        kept: Some(handle), ..
    }) = result
    {
        if sys::fatal_signal_pending() {
            // Its undo's GUPs failed with EINTR; a kworker's will not.
            restore_after_killed_patch(hp, handle);
        }
    }
    result
}

/// pid → task → mm, with the ptrace check made under the target's
/// exec_update_lock (no execve() can come in between).  Returns the mm and
/// the process.
pub(super) fn resolve_target(
    hp: &Hugepoke,
    pid: i32,
    addr: usize,
) -> Result<(ARef<MmWithUserAsync>, Process)> {
    let ev = || Event::new(Step::ResolveTarget).pid(pid).addr(addr);
    let process =
        Process::find(pid).ok_or_else(|| hp.journal.fail(ev(), ESRCH, "no such process"))?;
    if process.is_kernel_thread() {
        return Err(hp
            .journal
            .fail(ev(), EINVAL, "a kernel thread has no user text"));
    }
    let mm = process.mm_access().map_err(|e| {
        let (e, why) = match e {
            e if e == EACCES || e == EPERM => (EPERM, "caller may not ptrace-attach to the target"),
            e if e == ESRCH => (ESRCH, "process has no address space (exiting or zombie)"),
            e => (e, "mm_access failed (interrupted?)"),
        };
        hp.journal.fail(ev(), e, why)
    })?;
    hp.journal.record(ev());
    hp.pauses.at(Point::Resolved, pid, &hp.journal); // mutant: exec-recheck-mm
    Ok((mm, process))
}

/// Run `make` with a new handle for `owner` and the target of `mm` locked.
/// If it fails, the handle is forgotten (and the target retired if idle),
/// unless the failure keeps sites under it.  The registry lock is never
/// held while `make` runs.
fn with_new_handle(
    hp: &Arc<Hugepoke>,
    mm: &Mm,
    process: &Process,
    owner: Owner,
    ev: Event,
    mut make: impl FnMut(&Arc<Target>, &mut TargetState, u64) -> Result<(), Failure>,
) -> Result<u64, Failure> {
    loop {
        let (target, handle) = {
            let mut registry = hp.registry.lock();
            if registry.closing {
                return Err(hp.journal.fail(ev, ENODEV, "module is unloading").into());
            }
            let nomem = |_| hp.journal.fail(ev, ENOMEM, "no memory to record a patch");
            let target = registry.target_for(mm, process).map_err(nomem)?;
            (
                target.clone(),
                registry.new_handle(&target, owner).map_err(nomem)?,
            )
        };
        let mut state = match target.lock_killable(&hp.journal, ev) {
            // mutant: registry-held-across-patch
            Ok(state) => state,
            Err(e) => {
                drop(hp.registry.lock().forget_handle(handle));
                return Err(e.into());
            }
        };
        let result = if state.retired {
            None
        } else {
            Some(make(&target, &mut state, handle))
        };
        match result {
            Some(Ok(())) => return Ok(handle), // mutant: sync-mmput-under-lock
            Some(Err(f)) if f.kept.is_some() => return Err(f),
            _ => {}
        }
        let retired = if state.idle() && !state.retired {
            hp.registry.lock().retire(&target, &mut state)
        } else {
            None
        };
        drop(state);
        let forgotten = hp.registry.lock().forget_handle(handle);
        drop((retired, forgotten));
        if let Some(Err(f)) = result {
            return Err(f);
        }
        // The target was retired while we waited for it: look it up again.
    }
}

/// PATCH with the target's state locked.
fn patch_locked(
    hp: &Arc<Hugepoke>,
    target: &Arc<Target>,
    state: &mut TargetState,
    mm: &MmWithUser,
    req: &Request<'_>,
    order: &[u32],
    who: &Identity,
) -> Result<(), Failure> {
    let ev = |step| Event::new(step).pid(who.pid);
    let guard = MmapWriteGuard::lock_killable(mm).map_err(|e| {
        hp.journal.fail(
            ev(Step::CheckVma),
            e,
            "fatal signal while waiting for the target's mmap lock",
        )
    })?;
    let mut plan = Plan::build(hp, &guard, state, req, order, who)?;
    if state.patches.live_sites() + plan.sites.len() > uapi::MAX_TARGET_SITES {
        // mutant: no-site-cap
        let why =
            "the target would have more than 131,072 live sites, the most one target may have";
        return Err(hp.journal.fail(ev(Step::Patch), ENOSPC, why).into());
    }
    // Room for the records first: once the bytes are written, nothing may fail.
    let nomem = |_| {
        hp.journal
            .fail(ev(Step::Patch), ENOMEM, "no memory to record a patch")
    };
    let room = state
        .patches
        .reserve(plan.sites.len(), plan.page_counts())
        .map_err(nomem)?;
    state.reserve_families(plan.pages.len()).map_err(nomem)?;
    plan.peek_expected(hp, &guard)?;
    hp.journal.record(
        ev(Step::CheckVma)
            .handle(who.handle)
            .note("every site checked"),
    );
    hp.pauses.at(Point::Checked, who.pid, &hp.journal); // mutant: expect-not-under-lock
    if let Err(failure) = write_pages(hp, &guard, &mut plan) {
        return Err(give_back(
            hp, target, state, guard, mm, plan, room, who, failure,
        ));
    }
    drop(guard);
    commit(hp, state, room, plan);
    Ok(())
}

/// Write the plan a page at a time.  Each written page's reference is
/// kept, so an undo needs no GUP (which a fatal signal would cut short).
fn write_pages(hp: &Hugepoke, guard: &MmapWriteGuard<'_>, plan: &mut Plan) -> Result<(), Failure> {
    for w in plan.pages.iter_mut() {
        let r = w.range.clone();
        let first = &plan.sites[r.start];
        let (first_pid, first_addr, blame) = (first.pid, first.addr, first.index);
        let page_addr = first_addr & PAGE_MASK;
        let ev = |step| Event::new(step).pid(first_pid).addr(first_addr);
        let Some(vma) = guard.vma_lookup(page_addr) else {
            return Err(Failure::at(
                hp.journal
                    .fail(ev(Step::WriteBytes), EFAULT, "page is no longer mapped"),
                blame,
            ));
        };
        let before = sys::mapping_of(vma, page_addr);
        w.split = matches!(before, Mapping::Pmd(_));
        // The undo leaves the page PATCH writes only if it is the very copy
        // another tool had mapped here, not one GUP made after the target
        // dropped that.
        let (found_pfn, _held) = found_copy(vma, page_addr);
        let found_it = |page: &PageRef| found_pfn == Some(page.pfn());
        let sites = &mut plan.sites[r.clone()];
        match write_patch(hp, guard, vma, before, sites, plan.expects.of(r)) {
            Ok(page) => {
                w.copy_before = found_it(&page); // mutant: undo-zaps-a-found-copy
                let pmd_mappable =
                    sys::page_cache_page(vma, page_addr).is_some_and(|c| c.pmd_mappable());
                sites.iter_mut().for_each(|s| s.pmd_mappable = pmd_mappable);
                w.family = page.hold_family();
                w.state = PageState::Found(page_addr, page); // mutant: leak-folio-ref-at-patch
                w.written = Written::Bytes;
                hp.pauses.at(Point::Written, first_pid, &hp.journal);
            }
            // A copy GUP made holds the file's bytes: not the undo's to
            // check (a refusal there would keep the pages written), but
            // the PMD it split is given back (`split`).
            Err(WriteError::Failed(e)) => return Err(Failure::at(e, blame)),
            Err(WriteError::NotExpected(k, page, mismatch)) => {
                let site = &sites[k];
                let ev = Event::new(Step::CheckExpected)
                    .pid(site.pid)
                    .addr(site.addr);
                let failure = Failure::at(hp.journal.refuse(ev, mismatch.refusal()), site.index);
                // COWed but not written: an undo gives the copy back.
                w.copy_before = found_it(&page); // mutant: undo-zaps-a-found-copy
                w.family = page.hold_family();
                w.state = PageState::Found(page_addr, page);
                w.written = Written::Cowed;
                return Err(failure);
            }
        }
    }
    Ok(())
}

/// Another tool's copy mapped at `page_addr` now: its PFN, and the copy
/// held if it is exclusive, so that the PFN cannot be reused meanwhile
/// (GUP reuses an exclusive copy whatever its count; our reference on a
/// shared one would make the kernel copy it rather than reuse it).
fn found_copy(vma: &VmaRef, page_addr: usize) -> (Option<usize>, Option<PageRef>) {
    let found = sys::anon_copy_at(vma, page_addr);
    let pfn = found.as_ref().map(|c| c.pfn());
    (pfn, found.filter(|c| c.anon_exclusive()))
}

/// Record the plan's sites under their handle (each site carries it).
fn commit(
    hp: &Hugepoke,
    state: &mut TargetState,
    room: Reserved<ARef<kernel::fs::File>>,
    plan: Plan,
) {
    let first = &plan.sites[0];
    let (ev, handle) = (first.event(Step::Patched).page(first.pfn, 0), first.handle);
    let mappable = plan.sites.iter().filter(|s| s.pmd_mappable).count();
    let note = match mappable {
        0 => "every site written; page-cache folio not PMD-mappable",
        m if m == plan.sites.len() => "every site written; page-cache folio PMD-mappable",
        _ => "every site written; some page-cache folios not PMD-mappable",
    };
    let Plan {
        sites, mut pages, ..
    } = plan;
    let left_out = state.patches.insert(
        room,
        sites,
        pages.iter_mut().map(|w| (w.range.clone(), &mut w.file)),
    );
    hold_families(state, &mut pages);
    journal_left_out(hp, state, ev, handle, left_out);
    hp.journal.record(ev.note(note));
}

/// The target holds the fork family of every page written (its sites'
/// `family`) while they live.
fn hold_families(state: &mut TargetState, pages: &mut [super::plan::PageWork]) {
    for family in pages.iter_mut().filter_map(|w| w.family.take()) {
        state.hold_family(family); // mutant: family-not-held
    }
    state.prune_families();
}

/// Say so if the table could not record sites that were written (see
/// `Patches::insert`: a bug of ours if it ever happens); a handle left
/// with no site is forgotten, so it holds no target.
fn journal_left_out(hp: &Hugepoke, state: &TargetState, ev: Event, handle: u64, left_out: usize) {
    if left_out != 0 {
        let why = "sites written but not recorded: their table room was missing (a hugepoke bug; RESTORE cannot give them back)";
        hp.journal.record(ev.error(ENOMEM, why));
        if state.patches.count(handle) == 0 {
            drop(hp.registry.lock().forget_handle(handle));
        }
    }
}

/// A page failed: give back the pages written so far (RESTORE's passes,
/// the mmap lock still held), queue their collapses, and keep under the
/// handle, persistent, the sites of any page that could not be given back.
#[allow(clippy::too_many_arguments)]
fn give_back(
    hp: &Arc<Hugepoke>,
    target: &Arc<Target>,
    state: &mut TargetState,
    guard: MmapWriteGuard<'_>,
    mm: &MmWithUser,
    mut plan: Plan,
    room: Reserved<ARef<kernel::fs::File>>,
    who: &Identity,
    failure: Failure,
) -> Failure {
    let ev = Event::new(Step::Restore).pid(who.pid).handle(who.handle);
    hp.journal
        .record(ev.note("undoing the pages written so far"));
    // Nothing of the plan is in the table.
    let last_on_page = |s: &[Site]| state.patches.on_page(s[0].page_key()) == 0;
    let result = undo(hp, &guard, mm, &plan.sites, &mut plan.pages, last_on_page); // mutant: no-undo
    drop(guard);
    // Collapses only now: at unload one runs synchronously, and takes the
    // mmap lock.  None runs here while pages written are not yet back in
    // the table (keep_still_written): the work runs after they are.
    let kept = plan.pages.iter().any(still_written);
    queue_collapses(hp, target, state, &plan.sites, &plan.pages, !kept);
    if let Err(r) = result {
        hp.journal.record(ev.error(r.errno, r.why));
    }
    // (By what was written, not by what the undo found: a page it refused
    // on may have lost its reference on the way.)
    if !plan.pages.iter().any(still_written) {
        hp.journal
            .record(ev.note("undone: every page written so far restored"));
        return failure;
    }
    keep_still_written(hp, state, room, plan, who.handle, failure.error);
    Failure {
        kept: Some(who.handle),
        ..failure
    }
}

/// A page PATCH wrote whose undo did not give it back.
/// A page PATCH wrote (or COWed) that the undo did not give back: not
/// restored, and not found gone (the target dropped or unmapped it).
fn still_written(w: &super::plan::PageWork) -> bool {
    w.written != Written::No
        && matches!(w.outcome, super::plan::Outcome::Untouched)
        && !matches!(w.state, PageState::Gone(..))
}

/// Record the sites of the pages still written, persistent, under `handle`.
fn keep_still_written(
    hp: &Hugepoke,
    state: &mut TargetState,
    room: Reserved<ARef<kernel::fs::File>>,
    mut plan: Plan,
    handle: u64,
    error: Error,
) {
    // Only their sites, moved down in place (no allocation now).
    let mut to = 0;
    for w in plan.pages.iter_mut() {
        let r = w.range.clone();
        w.range = to..to + if still_written(w) { r.len() } else { 0 };
        if w.written == Written::Cowed {
            // COWed, nothing written: what the copy holds at these sites,
            // and what RESTORE will find there, is the originals.
            plan.sites[r.clone()]
                .iter_mut()
                .for_each(|s| s.bytes = s.orig);
        }
        plan.sites.copy_within(r.start..r.start + w.range.len(), to);
        to = w.range.end;
    }
    plan.sites.truncate(to);
    // Not the whole request's room for the life of the handle; if the
    // smaller vector cannot be had, the larger one does as well.
    let _ = plan.sites.shrink_to(to, GFP_KERNEL);
    plan.sites.iter_mut().for_each(|s| s.owner = None);
    let ev = Event::new(Step::Patched)
        .pid(plan.sites[0].pid)
        .handle(handle);
    let kept = plan.pages.iter_mut().filter(|w| !w.range.is_empty());
    let left_out = state.patches.insert(
        room,
        plan.sites,
        kept.map(|w| (w.range.clone(), &mut w.file)),
    );
    hold_families(state, &mut plan.pages);
    journal_left_out(hp, state, ev, handle, left_out);
    drop(hp.registry.lock().disown(handle));
    let why = "failed and could not all be undone: the sites still written are kept under this handle, persistent";
    hp.journal.record(
        Event::new(Step::Patch)
            .pid(ev.pid)
            .handle(handle)
            .error(error, why),
    );
    // The handle lives: `stats` counts it among the patched.
    hp.journal
        .record(ev.note("the sites still written by a failed PATCH, kept (persistent)"));
}

// SPDX-License-Identifier: GPL-2.0

//! RESTORE of a handle, whatever its number of sites, and what follows for
//! the table: the sites restored or gone are forgotten, those refused are
//! kept (as persistent when their file closed), the collapses are queued
//! and the handle's one `restored` record says how it ended (`stats`
//! counts a handle as restored, or forgotten with a reason, by it).

use kernel::{
    fs::File,
    mm::MmWithUser,
    prelude::*,
    sync::{aref::ARef, Arc},
};

use super::{
    forked::restore_forked,
    lineage::{files_of, Lineage},
    locate::{Shared, FORKED_DURING_RESTORE},
    outcome::{Closing, Refused},
    plan::{self, Outcome, PageState, PageWork, Written},
    restore::{queue_collapses, restore_pages},
};
use crate::{
    few::Few,
    journal::{Event, Step},
    patches::{Forgotten, Site},
    pause::Point,
    refusal::Refusal,
    sys,
    target::{Target, TargetState},
    Hugepoke,
};

/// RESTORE `handle`, its target looked up here.
pub(crate) fn restore(hp: &Arc<Hugepoke>, handle: u64) -> Result {
    let target = hp
        .registry
        .lock()
        .target_of(handle)
        .ok_or_else(|| unknown(hp, handle))?;
    restore_of(hp, &target, handle)
}

/// RESTORE `handle` of `target` (who may is `authority`'s to say).
pub(crate) fn restore_of(hp: &Arc<Hugepoke>, target: &Arc<Target>, handle: u64) -> Result {
    let mut state = target.lock_killable(&hp.journal, Event::new(Step::Restore).handle(handle))?;
    restore_handle(hp, target, &mut state, handle, Closing::No)
        .unwrap_or_else(|| Err(unknown(hp, handle)))
}

fn unknown(hp: &Hugepoke, handle: u64) -> Error {
    let ev = Event::new(Step::Restore).handle(handle);
    hp.journal
        .fail(ev, ENOENT, "no such patch (unknown or already restored)")
}

/// RESTORE_DROP: forget `handle` without looking at or writing into its
/// target, for a patch RESTORE cannot give back.  Whatever the target's
/// copies hold stays, and their ranges stay PTE-mapped.
pub(crate) fn drop_handle(hp: &Arc<Hugepoke>, target: &Arc<Target>, handle: u64) -> Result {
    let mut state = target.lock_killable(&hp.journal, Event::new(Step::Restore).handle(handle))?;
    if state.patches.count(handle) == 0 {
        return Err(unknown(hp, handle));
    }
    let listed = state
        .patches
        .sites_of(handle)
        .and_then(|sites| Ok((plan::pages_of(&sites, Written::Bytes)?, sites)));
    let Ok((pages, sites)) = listed else {
        let ev = Event::new(Step::Restore).handle(handle);
        return Err(hp
            .journal
            .fail(ev, ENOMEM, "no memory to list the patch's sites"));
    };
    let ev = |step| sites[0].event(step);
    let forgotten = forget(hp, &ev, &mut state, handle, &sites, &pages, true);
    let families = state.release_families();
    let verdict = Verdict {
        result: Ok(()),
        forget_all: true,
        settled: Some(
            "dropped without restoring (RESTORE_DROP): the target keeps what its copies hold",
        ),
    };
    finish(
        hp,
        &target,
        &mut state,
        handle,
        verdict,
        &ev(Step::Restored),
    );
    drop((forgotten, families));
    Ok(())
}

/// A page whose target copy an earlier RESTORE restored: the target's
/// pass leaves it alone (another tool may have written there since).
const TARGET_RESTORED: &str = "restored in the target by an earlier RESTORE (a process forked from it refused then): the target is left alone";

/// How a RESTORE of a handle ended, for the table and the journal.
struct Verdict {
    result: Result,
    /// Every site leaves the table (else only the pages restored).
    forget_all: bool,
    /// What the handle's `restored` record says; None: no record.
    settled: Option<&'static str>,
}

/// RESTORE every site of `handle`, all or none, with its target locked;
/// forget the sites restored or gone and queue the collapses.  None if the
/// handle has no site here.
pub(crate) fn restore_handle(
    hp: &Arc<Hugepoke>,
    target: &Arc<Target>,
    state: &mut TargetState,
    handle: u64,
    closing: Closing,
) -> Option<Result> {
    if state.patches.count(handle) == 0 {
        return None;
    }
    let listed = state.patches.sites_of(handle).and_then(|sites| {
        let pages = plan::pages_of(&sites, Written::Bytes)?;
        Ok((files_of(&state.patches, &sites, &pages)?, pages, sites))
    });
    let Ok((files, mut pages, sites)) = listed else {
        keep_if_closing(hp, state, handle, closing);
        let ev = Event::new(Step::Restore).handle(handle);
        let why = "no memory to list the patch's sites: patch kept";
        return Some(Err(hp.journal.fail(ev, ENOMEM, why)));
    };
    let first = sites[0];
    let ev = |step| first.event(step);
    hp.journal.record(ev(Step::Restore));
    leave_restored_targets(&sites, &mut pages);
    // Every site of this handle on a page is being restored.
    let patches = &state.patches;
    let last_on_page = |s: &[Site]| patches.on_page(s[0].page_key()) as usize <= s.len();
    let outcome = run_passes(
        hp,
        target,
        &files,
        &sites,
        &mut pages,
        &last_on_page,
        closing,
    );
    let verdict = judge(hp, &ev, &sites, &pages, outcome, closing);
    let now = sys::boottime_ns();
    for w in pages.iter().filter(|w| w.target_restored) {
        let page = sites[w.range.start].page_key();
        state.patches.mark_target_restored(handle, page, now);
    }
    let forgotten = forget(hp, &ev, state, handle, &sites, &pages, verdict.forget_all);
    let families = state.release_families();
    queue_collapses(hp, target, state, &sites, &pages, true);
    if state.patches.count(handle) != 0 {
        keep_if_closing(hp, state, handle, closing);
        drop((forgotten, files, families));
        return Some(verdict.result);
    }
    let result = verdict.result;
    finish(hp, target, state, handle, verdict, &ev(Step::Restored));
    // File and family references are dropped after the locks.
    drop((forgotten, files, families));
    Some(result)
}

/// The pages whose target copy an earlier RESTORE restored (a process
/// forked from it refused then): the target's pass leaves them alone.
fn leave_restored_targets(sites: &[Site], pages: &mut [PageWork]) {
    for w in pages.iter_mut() {
        if sites[w.range.start].restored_at != 0 {
            // mutant: target-restored-twice
            w.state = PageState::Gone(Ok(()), TARGET_RESTORED);
            // Its copy was zapped then, its range's collapse held back
            // by these very sites.
            w.cache_back = Some(sites[w.range.start].addr & sys::PAGE_MASK);
        }
    }
}

/// RESTORE's passes for `sites` (their `pages`, from `files`): in the
/// processes forked from the target and in the target, or, once it is
/// gone, in its forked processes only.
fn run_passes(
    hp: &Hugepoke,
    target: &Target,
    files: &[Option<ARef<File>>],
    sites: &[Site],
    pages: &mut [PageWork],
    last_on_page: &impl Fn(&[Site]) -> bool,
    closing: Closing,
) -> Result<(), (Refused, usize)> {
    let mm = target.mm_user();
    let lineage = Lineage {
        mm: mm.as_deref().map(|m| &**m),
        pid: target.pid.as_ref(),
        parent: target.parent.as_ref(),
        files,
    };
    let Some(mm) = lineage.mm else {
        let gone = Refused::Gone {
            result: Ok(()),
            why: "target process is gone",
            cache_back: None,
        };
        // Its children may still run the patch.
        let forked = sweep_forked(hp, &lineage, sites, pages, last_on_page, closing); // mutant: orphans-left-patched
        return forked.and(Err((gone, 0)));
    };
    restore_everywhere(hp, mm, &lineage, sites, pages, last_on_page, closing)
}

/// Most times RESTORE takes a patch back from processes forked during it.
const FORKED_PASSES: usize = 3;

/// RESTORE's passes: in the processes forked since PATCH first, then in
/// the target.  A process forked in between (its fork came after the
/// walk, before the target's mmap lock) still shares the target's copy:
/// the target's pass, under that lock (no fork comes in), sees it and
/// refuses, and the forked pass runs again, a few times at most (then
/// the patch is kept: `EAGAIN`).  At close and unload the target is
/// restored whatever its children say: COW is broken for it.  A process
/// the target's pass cannot count (its PTE a swap entry; a copy of a copy,
/// forked from a child during the child's pass) is found by forked passes
/// after it, taken when the target's copy was not exclusive or its family
/// has others, and again while one of them found a copy shared.
fn restore_everywhere(
    hp: &Hugepoke,
    mm: &MmWithUser,
    lineage: &Lineage<'_>,
    sites: &[Site],
    pages: &mut [PageWork],
    last_on_page: &impl Fn(&[Site]) -> bool,
    closing: Closing,
) -> Result<(), (Refused, usize)> {
    let shared = match closing {
        Closing::No => Shared::Refuse,
        _ => Shared::Break,
    };
    let (mut passes, mut others) = (0, false);
    loop {
        passes += 1;
        let forked = restore_forked(hp, lineage, sites, pages, last_on_page, closing);
        let result = forked.and_then(|reach| {
            others |= reach.others;
            hp.pauses.at(Point::Forked, sites[0].pid, &hp.journal);
            restore_pages(hp, mm, sites, pages, last_on_page, shared)
        });
        match result {
            Err((Refused::Kept(r), _))
                if r.why == FORKED_DURING_RESTORE && passes < FORKED_PASSES =>
            {
                hp.journal
                    .record(sites[0].event(Step::Restore).note(FORKED_DURING_RESTORE));
            }
            Ok(()) if others || pages.iter().any(|w| w.shared) => break,
            result => return result,
        }
    }
    let why = "the target's copy was not exclusive, or others of its fork family map the page: looking once more for processes that run the patch";
    hp.journal.record(sites[0].event(Step::Restore).note(why));
    sweep_forked(hp, lineage, sites, pages, last_on_page, closing).map_err(|refused| {
        keep_after_forked_refusal(hp, sites, pages);
        refused
    })
}

/// The target is restored, a process forked from it is not: every site
/// stays, marked with when the target was restored (a retry leaves the
/// target, and what it forked since, alone), else that process runs a
/// patch nobody knows of.
fn keep_after_forked_refusal(hp: &Hugepoke, sites: &[Site], pages: &mut [PageWork]) {
    let why = "the target is restored, but a process forked from it still runs the patch: every site kept; RESTORE may be retried";
    hp.journal.record(sites[0].event(Step::Restore).note(why));
    for w in pages.iter_mut() {
        w.target_restored |= matches!(w.outcome, Outcome::Written | Outcome::Done(_));
        w.outcome = Outcome::Untouched; // mutant: forked-refusal-forgets
    }
}

/// The forked passes that follow one that met a shared copy (a process
/// forked from a patched one during the pass shares it), a few at most.
fn sweep_forked(
    hp: &Hugepoke,
    lineage: &Lineage<'_>,
    sites: &[Site],
    pages: &[PageWork],
    last_on_page: &impl Fn(&[Site]) -> bool,
    closing: Closing,
) -> Result<(), (Refused, usize)> {
    for _ in 0..FORKED_PASSES {
        let reach = restore_forked(hp, lineage, sites, pages, last_on_page, closing)?;
        if !reach.shared {
            return Ok(());
        }
    }
    let why = "processes kept being forked from the patched ones during RESTORE: some may still run the patch";
    Err((Refused::Kept(Refusal::new(EAGAIN, why)), 0))
}

/// The handle's last site left the table: its `restored` record, then
/// the handle and, if idle, the target go.
fn finish(
    hp: &Hugepoke,
    target: &Arc<Target>,
    state: &mut TargetState,
    handle: u64,
    verdict: Verdict,
    ev: &Event,
) {
    match (verdict.settled, verdict.result) {
        (Some(why), Ok(())) => hp.journal.record(ev.note(why)),
        (Some(why), Err(e)) => hp.journal.record(ev.error(e, why)),
        (None, _) => 0,
    };
    let retired = if state.idle() {
        hp.registry.lock().retire(target, state)
    } else {
        None
    };
    let handle = hp.registry.lock().forget_handle(handle);
    // Target references are dropped after the locks.
    drop((retired, handle));
}

/// A patch kept when its file closed must not stay owned by that file.
fn keep_if_closing(hp: &Hugepoke, state: &mut TargetState, handle: u64, closing: Closing) {
    if closing == Closing::File {
        // mutant: close-refused-stays-owned
        state.patches.disown(handle);
        drop(hp.registry.lock().disown(handle));
    }
}

/// What the passes' outcome means for the handle, journaled.
fn judge(
    hp: &Hugepoke,
    ev: &impl Fn(Step) -> Event,
    sites: &[Site],
    pages: &[PageWork],
    outcome: Result<(), (Refused, usize)>,
    closing: Closing,
) -> Verdict {
    match outcome {
        Ok(()) => {
            let mut verdict = Verdict {
                result: Ok(()),
                forget_all: true,
                settled: Some("every site restored or gone"),
            };
            for w in pages.iter() {
                let PageState::Gone(r, why) = &w.state else {
                    continue;
                };
                // Per page, as a step; the handle's verdict comes last.
                let ev = ev(Step::RestoreBytes).addr(sites[w.range.start].addr);
                match r {
                    Ok(()) => hp.journal.record(ev.note(why)),
                    Err(e) => {
                        verdict.result = Err(*e);
                        verdict.settled = Some("a site's file page is no longer mapped in the target; its sites forgotten, the others restored");
                        hp.journal.record(ev.error(*e, why))
                    }
                };
            }
            verdict
        }
        Err((Refused::Gone { result, why, .. }, _)) => Verdict {
            result,
            forget_all: true,
            settled: Some(why),
        },
        Err((Refused::Kept(Refusal { errno: e, why }), at)) => {
            // Pages restored that could not be re-patched leave the handle.
            let partial = pages
                .iter()
                .any(|w| matches!(w.outcome, Outcome::Written | Outcome::Done(_)));
            hp.journal
                .record(ev(Step::Restore).error(e, fate(closing, partial)));
            hp.journal.record(
                ev(Step::RestoreBytes)
                    .addr(sites.get(at).map_or(sites[0].addr, |s| s.addr))
                    .error(e, why),
            );
            // Abandoned at unload: no verdict.
            Verdict {
                result: Err(e),
                forget_all: closing == Closing::Module,
                settled: None,
            }
        }
    }
}

/// What happens to a patch RESTORE refused, in words: first in the journal,
/// then why.
fn fate(closing: Closing, partial: bool) -> &'static str {
    match (closing, partial) {
        (Closing::No, false) => "patch kept whole; RESTORE may be retried",
        (Closing::No, true) => "patch kept but for the pages restored that could not be re-patched; RESTORE may be retried",
        (Closing::File, false) => "its file closed: patch kept whole as persistent",
        (Closing::File, true) => "its file closed: patch kept as persistent but for the pages restored that could not be re-patched",
        (Closing::Module, _) => "module unloading: patch abandoned",
    }
}

/// Forget the sites restored or gone (all of them, unless kept; a page
/// whose originals are back and could not be re-patched is restored
/// either way).  The references are returned, to drop after the locks.
fn forget(
    hp: &Hugepoke,
    ev: &impl Fn(Step) -> Event,
    state: &mut TargetState,
    handle: u64,
    sites: &[Site],
    pages: &[PageWork],
    forget_all: bool,
) -> Few<Forgotten<ARef<File>>> {
    let mut forgotten = Few::with_capacity(pages.len(), GFP_KERNEL).unwrap_or_default();
    for w in pages.iter() {
        if !forget_all && !matches!(w.outcome, Outcome::Written | Outcome::Done(_)) {
            continue;
        }
        let rep = &sites[w.range.start];
        if !forget_all {
            let why = "this page was restored and could not be re-patched: its sites are forgotten";
            hp.journal
                .record(ev(Step::RestoreBytes).addr(rep.addr).note(why));
        }
        if let Some(p) = state.patches.remove_page(handle, rep.page_key()) {
            // Without room to keep it, the reference goes right here.
            let _ = forgotten.push_within_capacity(p);
        }
    }
    forgotten
}

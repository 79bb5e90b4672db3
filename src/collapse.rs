// SPDX-License-Identifier: GPL-2.0

//! Putting the PMD back: after RESTORE zapped the last anonymous page of a
//! 2 MiB range whose page-cache folio is PMD-mappable, `queue_collapse`
//! queues `collapse_pte_mapped_thp()` as work, like uprobes calls it after
//! unregistering — but on a workqueue, so RESTORE does not wait for it —
//! and the work journals the kernel's own answer (`enum scan_result`).
//!
//! One pending work per (target, file range): a second RESTORE in the range
//! before the work runs is coalesced into it.  Pending ranges are plain
//! data in the target's state; a work holds references to the device state
//! and the target, and nothing holds the work, so nothing outlives the
//! workqueue that module unload drains.

use kernel::{
    impl_has_work, new_work,
    prelude::*,
    sync::Arc,
    workqueue::{Work, WorkItem},
};

use crate::{
    journal::{Event, Step},
    live::{self, Live},
    patches::Site,
    refusal::Refusal,
    sys::{self, PMD_SIZE},
    target::{Target, TargetState},
    Hugepoke,
};

/// Which range: the file's `address_space` and the PMD-sized file range.
type RangeKey = (usize, usize);

fn range_key(site: &Site) -> RangeKey {
    site.range_key()
}

#[pin_data]
pub(crate) struct CollapseWork {
    hugepoke: Arc<Hugepoke>,
    target: Arc<Target>,
    pid: i32,
    haddr: usize,
    key: RangeKey,
    install_pmd: bool,
    _live: Live,
    #[pin]
    work: Work<CollapseWork>,
}

impl_has_work! {
    impl HasWork<Self> for CollapseWork { self.work }
}

/// Queue the collapse of the 2 MiB range at `haddr`, which holds `site`'s
/// page.  Called with the target's state locked.  Without memory for the
/// work, collapse right here if `here` allows.
pub(crate) fn queue_collapse(
    hp: &Arc<Hugepoke>,
    target: &Arc<Target>,
    state: &mut TargetState,
    site: &Site,
    haddr: usize,
    here: bool,
) {
    let ev = site.event(Step::QueueCollapse).addr(haddr);
    let install_pmd = site.flags & crate::uapi::PATCH_INSTALL_PMD != 0; // mutant: install-pmd-ignored
    let key = range_key(site);
    if hp.registry.lock().closing {
        // Module unload: no work may outlive us; collapse right here.
        hp.journal
            .record(ev.note("module is unloading; collapsing synchronously"));
        return collapse_now(hp, target, state, site, (haddr, install_pmd), true);
    }
    if state.pending_collapses.iter().any(|k| *k == key) {
        hp.journal
            .record(ev.note("coalesced into the pending collapse"));
        return;
    }
    let work = Arc::pin_init(
        pin_init!(CollapseWork {
            hugepoke: hp.clone(),
            target: target.clone(),
            pid: site.pid,
            haddr,
            key,
            install_pmd,
            _live: Live::new(&live::WORKS),
            work <- new_work!("hugepoke::collapse"),
        }),
        GFP_KERNEL,
    );
    // Without memory for the work, collapse here rather than leave the
    // range PTE-mapped (seen by fail-nth: hugepoke-faults).
    let tracked = work.is_ok() && state.pending_collapses.push(key, GFP_KERNEL).is_ok();
    let (Ok(work), true) = (work, tracked) else {
        if !here {
            hp.journal
                .record(ev.error(ENOMEM, "no memory for the collapse work"));
            return;
        }
        hp.journal
            .record(ev.note("no memory for the collapse work; collapsing here"));
        return collapse_now(hp, target, state, site, (haddr, install_pmd), false);
    };
    let _ = hp.workqueue.queue().enqueue(work); // mutant: leak-collapse-work collapse-never-runs
    hp.journal.record(ev.note(if install_pmd {
        "collapse_pte_mapped_thp(install_pmd=true) queued"
    } else {
        "collapse_pte_mapped_thp(install_pmd=false) queued"
    }));
}

/// The collapse of the range at `haddr`, run here, the caller holding the
/// target's state and not the mmap lock, as the work would.  At unload it
/// waits for the mmap lock and says the outcome in the kernel log too (the
/// journal goes away with the module); otherwise it does not wait for the
/// lock (an ioctl's waits are killable, and the kernel has no killable
/// read lock for us).
fn collapse_now(
    hp: &Hugepoke,
    target: &Target,
    state: &TargetState,
    site: &Site,
    (haddr, install_pmd): (usize, bool),
    at_unload: bool,
) {
    let outcome = collapse_range(
        state,
        target,
        haddr,
        range_key(site),
        install_pmd,
        at_unload,
    );
    match outcome {
        Ok(note) if at_unload => pr_info!(
            "unload: collapse of pid {} at {:#x}: {}\n",
            site.pid,
            haddr,
            note
        ),
        Err(r) if at_unload => pr_info!(
            "unload: collapse of pid {} at {:#x} failed: {}\n",
            site.pid,
            haddr,
            r.why
        ),
        _ => {}
    }
    record_outcome(
        hp,
        Event::new(Step::Collapse).pid(site.pid).addr(haddr),
        outcome,
    );
}

impl WorkItem for CollapseWork {
    type Pointer = Arc<CollapseWork>;

    fn run(this: Arc<CollapseWork>) {
        let hp = &this.hugepoke;
        hp.pauses
            .at(crate::pause::Point::Collapse, this.pid, &hp.journal);
        let mut state = this.target.state.lock();
        // From here on, a RESTORE in the range queues a new work.
        state.pending_collapses.retain(|k| *k != this.key);
        let (key, install_pmd) = (this.key, this.install_pmd);
        let outcome = collapse_range(&state, &this.target, this.haddr, key, install_pmd, true); // mutant: map-no-collapse
        record_outcome(
            hp,
            Event::new(Step::Collapse).pid(this.pid).addr(this.haddr),
            outcome,
        );
        let retired = if state.idle() && !state.retired {
            hp.registry.lock().retire(&this.target, &mut state)
        } else {
            None
        };
        drop(state);
        drop(retired);
    }
}

fn record_outcome(hp: &Hugepoke, ev: Event, outcome: Result<&'static str, Refusal>) {
    hp.journal.record(match outcome {
        Ok(note) => ev.note(note),
        Err(r) => ev.error(r.errno, r.why),
    });
}

/// Collapse the 2 MiB range at `haddr` of the target, with its state
/// locked; the kernel's verdict, as a note or an error.  Without `wait`,
/// only if the mmap lock is free now.
fn collapse_range(
    state: &TargetState,
    target: &Target,
    haddr: usize,
    key: RangeKey,
    install_pmd: bool,
    wait: bool,
) -> Result<&'static str, Refusal> {
    if state.patches.in_range(key) != 0 {
        return Err(Refusal::new(EBUSY, "range was patched again"));
    }
    let mm = target
        .mm_user()
        .ok_or(Refusal::new(ESRCH, "target process is gone"))?;
    let guard = if wait {
        mm.mmap_read_lock()
    } else {
        mm.mmap_read_trylock().ok_or(Refusal::new(
            EAGAIN,
            "mmap lock busy: not waited for outside a work (hugepoke collapse puts the PMD back)",
        ))?
    };
    let vma = guard
        .vma_lookup(haddr)
        .ok_or(Refusal::new(EFAULT, "range is no longer mapped"))?;
    let info = sys::vma_info(vma);
    if info.start > haddr || info.end < haddr + PMD_SIZE {
        return Err(Refusal::new(EINVAL, "VMA no longer covers the 2 MiB range"));
    }
    let result = sys::collapse_pte_mapped_thp(&mm, &guard, haddr, install_pmd);
    sys::collapse_verdict(result, install_pmd)
        .map(|(note, _)| note)
        .map_err(|name| Refusal::new(EBUSY, name))
}

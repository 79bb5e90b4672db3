// SPDX-License-Identifier: GPL-2.0

//! Putting the PMD back: after RESTORE zapped the last anonymous page of a
//! 2 MiB range whose page-cache folio is PMD-mappable, `queue_collapse`
//! queues `collapse_pte_mapped_thp()` as work, like uprobes calls it after
//! unregistering — but on a workqueue, so RESTORE does not wait for it.
//!
//! One pending work per (mm, 2 MiB range): a second RESTORE in the range
//! before the work runs is coalesced into it.  The works run on hugepoke's
//! own workqueue, which module unload drains before the module's code goes
//! away; no work is ever flushed with the patch table locked (the work takes
//! that lock).

use kernel::{
    impl_has_work,
    mm::Mm,
    new_work,
    prelude::*,
    sync::{
        atomic::{Atomic, Relaxed},
        Arc,
    },
    workqueue::{Work, WorkItem},
};

use crate::{
    journal::{Event, Step},
    patch::{Patch, PatchTable},
    sys::{self, Mapping, PMD_SIZE},
    Hugepoke,
};

#[pin_data]
pub(crate) struct CollapseWork {
    hugepoke: Arc<Hugepoke>,
    mm: kernel::sync::aref::ARef<kernel::mm::Mm>,
    pid: i32,
    haddr: usize,
    install_pmd: bool,
    /// Set (under the patch-table lock) once `run` has started: no more
    /// coalescing into it.
    started: Atomic<bool>,
    #[pin]
    work: Work<CollapseWork>,
}

impl_has_work! {
    impl HasWork<Self> for CollapseWork { self.work }
}

/// Collapse work items queued and maybe not started yet, for coalescing.
/// Nests inside `Hugepoke::patches`.
pub(crate) struct Collapses {
    works: KVec<Arc<CollapseWork>>,
}

impl Collapses {
    pub(crate) fn new() -> Self {
        Self { works: KVec::new() }
    }
}

impl CollapseWork {
    fn event(&self, step: Step) -> Event {
        Event::new(step).pid(self.pid).addr(self.haddr)
    }
}

/// Queue the collapse of the 2 MiB range at `haddr` of `p`'s target.
/// Called with the patch table locked.
pub(crate) fn queue_collapse(hp: &Hugepoke, table: &mut PatchTable, p: &Patch, haddr: usize) {
    let ev = Event::new(Step::QueueCollapse).pid(p.pid).addr(haddr).handle(p.handle as u32);
    let install_pmd = p.flags & crate::uapi::PATCH_INSTALL_PMD != 0;
    if table.closing {
        // Module unload: no work may outlive us; collapse right here.
        hp.journal.record(ev.note("module is unloading; collapsing synchronously"));
        let outcome = collapse_range(table, &p.mm, haddr, install_pmd);
        record_outcome(hp, Event::new(Step::Collapse).pid(p.pid).addr(haddr), outcome);
        return;
    }
    let mut collapses = hp.collapses.lock();
    // Forget the ones that started: they cannot be coalesced into any more.
    collapses.works.retain(|w| !w.started.load(Relaxed));
    let mm_id = sys::mm_id(&p.mm);
    if collapses
        .works
        .iter()
        .any(|w| sys::mm_id(&w.mm) == mm_id && w.haddr == haddr && !w.started.load(Relaxed))
    {
        hp.journal.record(ev.note("coalesced into the pending collapse"));
        return;
    }
    let Some(hugepoke) = Hugepoke::get() else { return };
    let work = Arc::pin_init(
        pin_init!(CollapseWork {
            hugepoke,
            mm: p.mm.clone(),
            pid: p.pid,
            haddr,
            install_pmd,
            started: Atomic::new(false),
            work <- new_work!("hugepoke::collapse"),
        }),
        GFP_KERNEL,
    );
    let Ok(work) = work else {
        hp.journal.record(ev.error(ENOMEM, "no memory for the collapse work"));
        return;
    };
    if collapses.works.push(work.clone(), GFP_KERNEL).is_err() {
        hp.journal.record(ev.error(ENOMEM, "no memory for the collapse work"));
        return;
    }
    let _ = hp.workqueue.queue().enqueue(work);
    hp.journal.record(ev.note(if install_pmd {
        "collapse_pte_mapped_thp(install_pmd=true) queued"
    } else {
        "collapse_pte_mapped_thp(install_pmd=false) queued"
    }));
}

impl WorkItem for CollapseWork {
    type Pointer = Arc<CollapseWork>;

    fn run(this: Arc<CollapseWork>) {
        let hp = &this.hugepoke;
        let table = hp.patches.lock();
        this.started.store(true, Relaxed);
        let outcome = collapse_range(&table, &this.mm, this.haddr, this.install_pmd);
        record_outcome(hp, this.event(Step::Collapse), outcome);
    }
}

fn record_outcome(hp: &Hugepoke, ev: Event, outcome: Result<&'static str, (Error, &'static str)>) {
    hp.journal.record(match outcome {
        Ok(note) => ev.note(note),
        Err((err, why)) => ev.error(err, why),
    });
}

/// Collapse the 2 MiB range at `haddr` of `mm`, with the patch table locked.
fn collapse_range(
    table: &PatchTable,
    mm: &Mm,
    haddr: usize,
    install_pmd: bool,
) -> Result<&'static str, (Error, &'static str)> {
    if table.any_in_pmd_range(sys::mm_id(mm), haddr) {
        return Err((EBUSY, "range was patched again"));
    }
    let mm = mm.mmget_not_zero().ok_or((ESRCH, "target process is gone"))?;
    let guard = mm.mmap_read_lock();
    let vma = guard.vma_lookup(haddr).ok_or((EFAULT, "range is no longer mapped"))?;
    let info = sys::vma_info(vma);
    if info.start > haddr || info.end < haddr + PMD_SIZE {
        return Err((EINVAL, "VMA no longer covers the 2 MiB range"));
    }
    sys::collapse_pte_mapped_thp(&mm, &guard, haddr, install_pmd);
    // collapse_pte_mapped_thp() reports nothing; look at what it did.
    match sys::mapping_of(vma, haddr) {
        Mapping::Pmd(_) => Ok("PMD installed"),
        Mapping::None => Ok("page table retracted; PMD at next fault"),
        Mapping::Pte(_) if info.uffd_armed => Err((EBUSY, "not collapsed: userfaultfd armed")),
        Mapping::Pte(_) => Err((EBUSY, "not collapsed: a PTE does not map the page-cache THP")),
    }
}

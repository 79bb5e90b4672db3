// SPDX-License-Identifier: GPL-2.0

//! hugepoke: patch bytes into another process's THP-backed text, one
//! observable step at a time, the way uprobes does it — and put the
//! page-cache THP back afterwards.
//!
//! `/dev/hugepoke` takes the requests; `/sys/kernel/debug/hugepoke/`
//! reports every step.

use kernel::{
    debugfs,
    miscdevice::{MiscDeviceOptions, MiscDeviceRegistration},
    prelude::*,
    sync::Arc,
};

mod device;
mod journal;
mod sys;
#[cfg(CONFIG_KUNIT)]
mod tests;

use device::Controller;
use journal::{Journal, Step};

module! {
    type: HugepokeModule,
    name: "hugepoke",
    authors: ["hugepoke developers"],
    description: "Patch THP-backed text of a process the way uprobes does, observably",
    license: "GPL",
}

/// State shared by the device, its open files and debugfs.
#[pin_data]
pub(crate) struct Hugepoke {
    #[pin]
    pub(crate) journal: Journal,
}

kernel::sync::global_lock! {
    // SAFETY: `init` is called in the module initializer, before the device
    // exists, so nothing can lock it earlier.
    pub(crate) unsafe(uninit) static INSTANCE: Mutex<Option<Arc<Hugepoke>>> = None;
}

impl Hugepoke {
    /// The live instance, for a file being opened.  `None` once the module
    /// is on its way out.
    pub(crate) fn get() -> Option<Arc<Hugepoke>> {
        INSTANCE.lock().clone()
    }
}

#[pin_data(PinnedDrop)]
struct HugepokeModule {
    #[pin]
    misc: MiscDeviceRegistration<Controller>,
    // Dropped (removed) before `dir`, which the files live in.
    #[pin]
    events: debugfs::File<Arc<Hugepoke>>,
    #[pin]
    stats: debugfs::File<Arc<Hugepoke>>,
    dir: debugfs::Dir,
}

impl kernel::InPlaceModule for HugepokeModule {
    fn init(_module: &'static ThisModule) -> impl PinInit<Self, Error> {
        pin_init::pin_init_scope(|| {
            // SAFETY: called once, first thing at module load, before the
            // device or any debugfs file can reach `INSTANCE`.
            unsafe { INSTANCE.init() };

            let state = Arc::pin_init(
                pin_init!(Hugepoke {
                    journal <- Journal::new()?,
                }),
                GFP_KERNEL,
            )?;
            state.journal.record(Step::Load.event());
            *INSTANCE.lock() = Some(state.clone());

            let dir = debugfs::Dir::new(c"hugepoke");
            Ok(try_pin_init!(Self {
                events <- dir.read_callback_file(c"events", state.clone(), &|s: &Arc<Hugepoke>, f| {
                    s.journal.write_events(f)
                }),
                stats <- dir.read_callback_file(c"stats", state, &|s: &Arc<Hugepoke>, f| {
                    s.journal.write_stats(f)
                }),
                misc <- MiscDeviceRegistration::register(MiscDeviceOptions { name: c"hugepoke" }),
                dir: dir,
            }))
        })
    }
}

#[pinned_drop]
impl PinnedDrop for HugepokeModule {
    fn drop(self: Pin<&mut Self>) {
        // No file can be open here (each holds a module reference), so the
        // instance goes with the module.
        if let Some(state) = INSTANCE.lock().take() {
            state.journal.record(Step::Unload.event());
        }
    }
}

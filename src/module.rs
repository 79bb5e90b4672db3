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
    new_mutex,
    prelude::*,
    sync::{
        atomic::{Atomic, Relaxed},
        Arc, Mutex,
    },
};

mod authority;
mod collapse;
mod device;
mod engine;
mod few;
mod journal;
mod listing;
mod live;
mod patches;
mod pause;
mod policy;
mod refusal;
mod sys;
mod target;
#[cfg(CONFIG_KUNIT)]
mod tests;
// Shared verbatim with userspace, where these items are the public API.
#[allow(unreachable_pub)]
mod uapi;

use device::Controller;
use journal::{Journal, Step};
use target::Registry;

module! {
    type: HugepokeModule,
    name: "hugepoke",
    authors: ["hugepoke developers"],
    description: "Patch THP-backed text of a process the way uprobes does, observably",
    license: "GPL",
}

/// State shared by the device, its open files and debugfs.
#[pin_data(PinnedDrop)]
pub(crate) struct Hugepoke {
    #[pin]
    pub(crate) journal: Journal,
    /// Every target and handle.  A leaf lock: see `table` for the order.
    #[pin]
    pub(crate) registry: Mutex<Registry>,
    /// Where collapses and close-time restores run; drained at unload.
    /// Nothing but queued work items holds them.
    pub(crate) workqueue: sys::Workqueue,
    /// The test hook behind debugfs `pause`.
    #[pin]
    pub(crate) pauses: pause::Pauses,
    next_owner: Atomic<u64>,
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

    /// A fresh owner id for an open file.
    pub(crate) fn new_owner_id(&self) -> u64 {
        self.next_owner.fetch_add(1, Relaxed) + 1
    }
}

#[pinned_drop]
impl PinnedDrop for Hugepoke {
    fn drop(self: Pin<&mut Self>) {
        // The leak check at unload (see `live`); tests read this line.
        pr_info!(
            "state freed; still alive: {} targets, {} work items\n",
            live::TARGETS.load(Relaxed),
            live::WORKS.load(Relaxed)
        );
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
    #[pin]
    patches: debugfs::File<Arc<Hugepoke>>,
    #[pin]
    files: debugfs::File<Arc<Hugepoke>>,
    #[pin]
    forked: debugfs::File<Arc<Hugepoke>>,
    #[pin]
    pause: debugfs::File<Arc<Hugepoke>>,
    #[pin]
    abi: debugfs::File<u32>,
    dir: debugfs::Dir,
}

impl kernel::InPlaceModule for HugepokeModule {
    fn init(_module: &'static ThisModule) -> impl PinInit<Self, Error> {
        pin_init::pin_init_scope(|| {
            // SAFETY: called once, first thing at module load, before the
            // device or any debugfs file can reach `INSTANCE`.
            unsafe { INSTANCE.init() };

            let state = Arc::pin_init(
                try_pin_init!(Hugepoke {
                    journal <- Journal::new()?,
                    registry <- new_mutex!(Registry::new(), "hugepoke_registry"),
                    workqueue: sys::Workqueue::new()?,
                    pauses <- pause::Pauses::new(),
                    next_owner: Atomic::new(0),
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
                stats <- dir.read_callback_file(c"stats", state.clone(), &|s: &Arc<Hugepoke>, f| {
                    s.journal.write_stats(f)
                }),
                pause <- dir.read_write_callback_file(
                    c"pause",
                    state.clone(),
                    &|s: &Arc<Hugepoke>, f| s.pauses.write_state(f),
                    &|s: &Arc<Hugepoke>, r| s.pauses.command(r),
                ),
                files <- dir.read_callback_file(c"files", state.clone(), &|s: &Arc<Hugepoke>, f| {
                    listing::write_files(&s.registry.lock(), f)
                }),
                forked <- dir.read_callback_file(c"forked", state.clone(), &|s: &Arc<Hugepoke>, f| {
                    // Each target's own lock, never under the registry's.
                    let targets = s.registry.lock().targets().map_err(|_| core::fmt::Error)?;
                    listing::write_forked(s, &targets, f)
                }),
                patches <- dir.read_callback_file(c"patches", state, &|s: &Arc<Hugepoke>, f| {
                    // Each target's own lock, never under the registry's.
                    let targets = s.registry.lock().targets().map_err(|_| core::fmt::Error)?;
                    listing::write_patches(&targets, f)
                }),
                abi <- dir.read_callback_file(c"abi", uapi::ABI_VERSION, &|v: &u32, f| writeln!(f, "{v}")),
                misc <- MiscDeviceRegistration::register(MiscDeviceOptions { name: c"hugepoke" }),
                dir: dir,
            }))
        })
    }
}

#[pinned_drop]
impl PinnedDrop for HugepokeModule {
    fn drop(self: Pin<&mut Self>) {
        // No file can be open here (each holds a module reference); what is
        // left are persistent patches and collapse work.
        let Some(hp) = INSTANCE.lock().take() else {
            return;
        };
        hp.registry.lock().closing = true;
        engine::restore_owned(&hp, None, engine::Closing::Module);
        // Every queued work runs and returns, dropping what it holds; `hp`
        // outlives them, so the last reference (and the workqueue's
        // destruction) is never a work item's.
        hp.workqueue.drain();
        hp.journal.record(Step::Unload.event());
    }
}

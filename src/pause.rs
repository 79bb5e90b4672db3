// SPDX-License-Identifier: GPL-2.0

//! Pause points: a test hook that parks one PATCH at a named point until
//! debugfs `pause` releases it, so that a test can make the change a race
//! would make (an `execve()`, a write to the file, another target's PATCH)
//! inside a window that is otherwise microseconds wide, every time.
//!
//! `echo POINT PID > pause` arms the point (one shot) for operations on
//! target PID only, `echo go > pause` releases what is parked there;
//! reading says `idle`, `armed POINT pid=P` or `parked POINT pid=P`.
//! Disarmed, a point costs one uncontended mutex.  A parked operation
//! gives up after [`PARK_LIMIT_MS`] or on a signal, and goes on: the hook
//! can delay an operation, never change its outcome.  While parked at
//! `checked`, `cowed`, `written`, `restore` or `located` it holds the
//! target's locks (its mmap lock for writing): that target stalls, as it
//! would behind a slow fault.  (Its own per-VMA-locked faults and
//! `MADV_DONTNEED` still run: that is what the points between steps are
//! for.)
//!
//! `Pauses::state` is a leaf lock, never held while parked.

use core::fmt;
use kernel::{
    new_condvar, new_mutex,
    prelude::*,
    sync::{CondVar, CondVarTimeoutResult, Mutex},
    time::msecs_to_jiffies,
    uaccess::UserSliceReader,
};

use crate::journal::{Event, Journal, Step};

/// The longest a PATCH stays parked.
const PARK_LIMIT_MS: u32 = 60_000;

/// Where a PATCH can be parked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Point {
    /// PATCH_FILE, before it patches this process: the file's mappings
    /// were walked; no lock is held.
    Walked,
    /// The target's mm is taken (`mm_access`); no lock is held yet.
    Resolved,
    /// The target's state lock and mmap lock are held, the VMA is checked
    /// and PATCH_EXPECT's cheap early read passed; nothing written yet.
    Checked,
    /// PATCH, for each try at a page: GUP split the PMD and returned the
    /// anonymous copy; the page-table lock is not taken yet (the target's
    /// state lock and mmap lock are held).
    Cowed,
    /// PATCH: a page's sites are written and its page-table lock released;
    /// the next page is not started (the same locks held).
    Written,
    /// RESTORE: the target's state lock and mmap lock are held; the
    /// patched page is not looked up yet.
    Restore,
    /// RESTORE, after the processes forked since PATCH gave their copies
    /// back and before the target is looked at: only the target's state
    /// lock is held (a fork may come in here).
    Forked,
    /// RESTORE, after its first pass found every copy and checked every
    /// byte, before any is written (state and mmap lock held).
    Located,
    /// RESTORE, right before its one `lru_add_drain_all()`: only the
    /// target's state lock is held.
    Drain,
    /// The queued collapse work, before it takes any lock: RESTORE has
    /// returned and the range is still PTE-mapped, for as long as a test
    /// needs to look at it (`hugepoke map`); the target runs and faults.
    Collapse,
}

impl Point {
    fn name(self) -> &'static str {
        match self {
            Point::Walked => "walked",
            Point::Resolved => "resolved",
            Point::Checked => "checked",
            Point::Cowed => "cowed",
            Point::Written => "written",
            Point::Restore => "restore",
            Point::Forked => "forked",
            Point::Located => "located",
            Point::Drain => "drain",
            Point::Collapse => "collapse",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Point::Walked,
            Point::Resolved,
            Point::Checked,
            Point::Cowed,
            Point::Written,
            Point::Restore,
            Point::Forked,
            Point::Located,
            Point::Drain,
            Point::Collapse,
        ]
        .into_iter()
        .find(|p| p.name() == s)
    }
}

#[derive(Default)]
struct PauseState {
    /// The point armed, for operations on this target pid.
    armed: Option<(Point, i32)>,
    /// The point an operation is parked at, and its target pid.
    parked: Option<(Point, i32)>,
    /// Bumped by `go`: a parked PATCH leaves when it changes.
    releases: u64,
}

#[pin_data]
pub(crate) struct Pauses {
    #[pin]
    state: Mutex<PauseState>,
    #[pin]
    changed: CondVar,
}

impl Pauses {
    pub(crate) fn new() -> impl PinInit<Self> {
        pin_init!(Self {
            state <- new_mutex!(PauseState::default(), "hugepoke_pause"),
            changed <- new_condvar!("hugepoke_pause"),
        })
    }

    /// Park here if `point` is armed for target `pid`; returns when
    /// released, after [`PARK_LIMIT_MS`] or on a signal.
    pub(crate) fn at(&self, point: Point, pid: i32, journal: &Journal) {
        let mut state = self.state.lock();
        if state.armed != Some((point, pid)) || state.parked.is_some() {
            return;
        }
        state.armed = None;
        state.parked = Some((point, pid));
        let releases = state.releases;
        journal.record(Event::new(Step::Pause).pid(pid).note(point.name()));
        let mut left = msecs_to_jiffies(PARK_LIMIT_MS);
        let why = loop {
            match self.changed.wait_interruptible_timeout(&mut state, left) {
                _ if state.releases != releases => break "released",
                CondVarTimeoutResult::Woken { jiffies } => left = jiffies,
                CondVarTimeoutResult::Timeout => break "not released in time: going on",
                CondVarTimeoutResult::Signal { .. } => break "signal: going on",
            }
        };
        state.parked = None;
        drop(state);
        journal.record(Event::new(Step::Resume).pid(pid).note(why));
    }

    /// `pause` read: what is armed or parked.
    pub(crate) fn write_state(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        match (state.parked, state.armed) {
            (Some((p, pid)), _) => writeln!(f, "parked {} pid={pid}", p.name()),
            (None, Some((p, pid))) => writeln!(f, "armed {} pid={pid}", p.name()),
            (None, None) => writeln!(f, "idle"),
        }
    }

    /// `pause` write: `POINT PID` arms it, `go` releases what is parked,
    /// `off` disarms.
    pub(crate) fn command(&self, reader: &mut UserSliceReader) -> Result {
        let mut buf = [0u8; 32];
        let n = reader.len();
        if n > buf.len() {
            return Err(EINVAL);
        }
        reader.read_slice(&mut buf[..n])?;
        let mut words = core::str::from_utf8(&buf[..n])
            .map_err(|_| EINVAL)?
            .split_whitespace();
        let (word, pid) = (words.next().ok_or(EINVAL)?, words.next());
        let mut state = self.state.lock();
        match (word, pid) {
            ("go", None) => {
                state.releases += 1;
                self.changed.notify_all();
            }
            ("off", None) => state.armed = None,
            (point, Some(pid)) => {
                let point = Point::parse(point).ok_or(EINVAL)?;
                let pid = pid.parse::<i32>().map_err(|_| EINVAL)?;
                state.armed = Some((point, pid));
            }
            _ => return Err(EINVAL),
        }
        Ok(())
    }
}

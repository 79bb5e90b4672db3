// SPDX-License-Identifier: GPL-2.0

//! Pause points: a test hook that parks one PATCH at a named point until
//! debugfs `pause` releases it, so that a test can make the change a race
//! would make (an `execve()`, a write to the file, another target's PATCH)
//! inside a window that is otherwise microseconds wide, every time.
//!
//! `echo POINT > pause` arms the point (one shot), `echo go > pause`
//! releases what is parked there; reading says `idle`, `armed POINT` or
//! `parked POINT pid=P`.  Disarmed, a point costs one uncontended mutex.
//! A parked PATCH gives up after [`PARK_LIMIT_MS`] or on a signal, and
//! goes on: the hook can delay an operation, never change its outcome.
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

use crate::{
    journal::{Event, Journal, Step},
    sys,
};

/// The longest a PATCH stays parked.
const PARK_LIMIT_MS: u32 = 60_000;

/// Where a PATCH can be parked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Point {
    /// The target's mm is taken (`mm_access`); no lock is held yet.
    Resolved,
    /// The target's state lock and mmap lock are held, the VMA is checked
    /// and PATCH_EXPECT's cheap early read passed; nothing written yet.
    Checked,
}

impl Point {
    fn name(self) -> &'static str {
        match self {
            Point::Resolved => "resolved",
            Point::Checked => "checked",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Point::Resolved, Point::Checked].into_iter().find(|p| p.name() == s)
    }
}

#[derive(Default)]
struct PauseState {
    armed: Option<Point>,
    /// The point a PATCH is parked at, and the caller's tgid.
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

    /// Park here if `point` is armed; returns when released, after
    /// [`PARK_LIMIT_MS`] or on a signal.
    pub(crate) fn at(&self, point: Point, journal: &Journal) {
        let mut state = self.state.lock();
        if state.armed != Some(point) || state.parked.is_some() {
            return;
        }
        state.armed = None;
        state.parked = Some((point, sys::current_tgid()));
        let releases = state.releases;
        journal.record(Event::new(Step::Pause).note(point.name()));
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
        journal.record(Event::new(Step::Resume).note(why));
    }

    /// `pause` read: what is armed or parked.
    pub(crate) fn write_state(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        match (state.parked, state.armed) {
            (Some((p, pid)), _) => writeln!(f, "parked {} pid={pid}", p.name()),
            (None, Some(p)) => writeln!(f, "armed {}", p.name()),
            (None, None) => writeln!(f, "idle"),
        }
    }

    /// `pause` write: `POINT` arms it, `go` releases what is parked,
    /// `off` disarms.
    pub(crate) fn command(&self, reader: &mut UserSliceReader) -> Result {
        let mut buf = [0u8; 16];
        let n = reader.len();
        if n > buf.len() {
            return Err(EINVAL);
        }
        reader.read_slice(&mut buf[..n])?;
        let word = core::str::from_utf8(&buf[..n]).map_err(|_| EINVAL)?.trim();
        let mut state = self.state.lock();
        match word {
            "go" => {
                state.releases += 1;
                self.changed.notify_all();
            }
            "off" => state.armed = None,
            _ => state.armed = Some(Point::parse(word).ok_or(EINVAL)?),
        }
        Ok(())
    }
}

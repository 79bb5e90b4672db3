// SPDX-License-Identifier: GPL-2.0

//! The journal: an ordered, bounded log of every step hugepoke takes, and
//! counters per step and outcome.  Both are what debugfs shows.

use core::fmt;
use kernel::{new_spinlock, prelude::*, sync::SpinLock};

use crate::{refusal::Refusal, sys};

/// How many events the log keeps; older ones are counted as dropped.
pub(crate) const EVENT_CAPACITY: usize = 4096;
/// How many distinct (step, reason) pairs `stats` breaks down.
const REASON_CAPACITY: usize = 64;

macro_rules! steps {
    ($($variant:ident => $name:literal,)*) => {
        /// One step of hugepoke's work, as named in `events` and `stats`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        pub(crate) enum Step { $($variant,)* }

        impl Step {
            pub(crate) const ALL: &'static [Step] = &[$(Step::$variant,)*];
            pub(crate) const COUNT: usize = Self::ALL.len();

            pub(crate) fn name(self) -> &'static str {
                match self { $(Step::$variant => $name,)* }
            }
        }
    };
}

steps! {
    Load => "load",
    Unload => "unload",
    Open => "open",
    Release => "release",
    Ioctl => "ioctl",
    // PATCH, in order.
    Patch => "patch",
    ResolveTarget => "resolve_target",
    CheckVma => "check_vma",
    CheckExpected => "check_expected",
    SplitPmd => "split_pmd",
    CowPage => "cow_page",
    WriteBytes => "write_bytes",
    Patched => "patched",
    // RESTORE, in order.
    Restore => "restore",
    RestoreBytes => "restore_bytes",
    LruDrain => "lru_drain",
    ZapAnonPage => "zap_anon_page",
    KeepAnonPage => "keep_anon_page",
    QueueCollapse => "queue_collapse",
    Collapse => "collapse",
    Restored => "restored",
    Query => "query",
    // COLLAPSE: its start and verdict; per copy zap_anon_page or keep_anon_page.
    CollapseRange => "collapse_range",
    // The test hook (`pause`).
    Pause => "pause",
    Resume => "resume",
}

impl Step {
    /// A successful event of this step with no further detail.
    pub(crate) fn event(self) -> Event {
        Event::new(self)
    }
}

/// One line of `events`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Event {
    pub(crate) step: Step,
    /// The process acted upon, or the caller for device-level steps.
    pub(crate) pid: i32,
    pub(crate) handle: Option<u64>,
    pub(crate) addr: Option<usize>,
    pub(crate) pfn: Option<usize>,
    pub(crate) order: Option<u32>,
    /// 0 or a negative errno.
    pub(crate) result: i32,
    /// Why, in words: what was decided or what was wrong.
    pub(crate) note: &'static str,
}

impl Event {
    pub(crate) fn new(step: Step) -> Self {
        Self {
            step,
            pid: sys::current_tgid(),
            handle: None,
            addr: None,
            pfn: None,
            order: None,
            result: 0,
            note: "",
        }
    }

    pub(crate) fn pid(mut self, pid: i32) -> Self {
        self.pid = pid;
        self
    }

    pub(crate) fn addr(mut self, addr: usize) -> Self {
        self.addr = Some(addr);
        self
    }

    pub(crate) fn handle(mut self, handle: u64) -> Self {
        self.handle = Some(handle);
        self
    }

    pub(crate) fn page(mut self, pfn: usize, order: u32) -> Self {
        self.pfn = Some(pfn);
        self.order = Some(order);
        self
    }

    /// A folio order without a page (what a decision was about).
    pub(crate) fn order(mut self, order: u32) -> Self {
        self.order = Some(order);
        self
    }

    pub(crate) fn error(mut self, err: Error, note: &'static str) -> Self {
        self.result = err.to_errno();
        self.note = note;
        self
    }

    pub(crate) fn note(mut self, note: &'static str) -> Self {
        self.note = note;
        self
    }

    /// Emit this event, journaled as `seq`, as a trace event.
    fn trace(&self, seq: u64) {
        let e = self;
        sys::trace_step(
            e.step as u32,
            seq,
            e.pid,
            e.handle,
            e.addr,
            e.pfn,
            e.order,
            e.result,
            e.note,
        );
    }
}

/// An event as stored: stamped with its sequence number and time.
#[derive(Clone, Copy)]
struct Record {
    seq: u64,
    time_ns: u64,
    event: Event,
}

/// A fixed-capacity ring of records; the oldest is overwritten and counted.
pub(crate) struct Ring {
    records: KVec<Record>,
    capacity: usize,
    /// Index of the oldest record once the ring is full.
    head: usize,
    next_seq: u64,
    dropped: u64,
    /// `[ok, failed]` per step.
    counts: [[u64; 2]; Step::COUNT],
    /// Counts per (step, reason) for failures and for the outcomes that are
    /// decisions (keeping a page, a collapse, …); `REASON_CAPACITY` pairs,
    /// the rest counted under `other`.
    reasons: KVec<(Step, &'static str, u64)>,
    other_reasons: u64,
}

impl Step {
    /// Is an `ok` outcome of this step worth counting by its reason?
    fn outcome_has_reason(self) -> bool {
        matches!(
            self,
            Step::KeepAnonPage
                | Step::Collapse
                | Step::CollapseRange
                | Step::QueueCollapse
                | Step::SplitPmd
                | Step::CowPage
        )
    }
}

impl Ring {
    pub(crate) fn with_capacity(capacity: usize) -> Result<Self> {
        Ok(Self {
            records: KVec::with_capacity(capacity, GFP_KERNEL)?,
            capacity,
            head: 0,
            next_seq: 1,
            dropped: 0,
            counts: [[0; 2]; Step::COUNT],
            reasons: KVec::with_capacity(REASON_CAPACITY, GFP_KERNEL)?,
            other_reasons: 0,
        })
    }

    pub(crate) fn push(&mut self, event: Event, time_ns: u64) -> u64 {
        let record = Record {
            seq: self.next_seq,
            time_ns,
            event,
        };
        self.next_seq += 1;
        self.counts[event.step as usize][usize::from(event.result != 0)] += 1;
        if !event.note.is_empty() && (event.result != 0 || event.step.outcome_has_reason()) {
            self.count_reason(event.step, event.note);
        }
        if self.records.len() < self.capacity {
            // Cannot fail: the capacity was reserved up front.
            let _ = self.records.push_within_capacity(record);
        } else {
            self.records[self.head] = record;
            self.head = (self.head + 1) % self.capacity;
            self.dropped += 1;
        }
        record.seq
    }

    /// Records from oldest to newest.
    fn iter(&self) -> impl Iterator<Item = &Record> {
        let (newer, older) = self.records.split_at(self.head);
        Iterator::chain(older.iter(), newer.iter())
    }

    fn count_reason(&mut self, step: Step, note: &'static str) {
        if let Some(r) = self.reasons.iter_mut().find(|r| r.0 == step && r.1 == note) {
            r.2 += 1;
        } else if self.reasons.push_within_capacity((step, note, 1)).is_err() {
            self.other_reasons += 1;
        }
    }

    /// How often `step` was taken for `reason`.
    pub(crate) fn count_by_reason(&self, step: Step, reason: &str) -> u64 {
        self.reasons
            .iter()
            .find(|r| r.0 == step && r.1 == reason)
            .map_or(0, |r| r.2)
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    pub(crate) fn count(&self, step: Step, failed: bool) -> u64 {
        self.counts[step as usize][usize::from(failed)]
    }

    pub(crate) fn write_events(&self, f: &mut impl fmt::Write) -> fmt::Result {
        writeln!(f, "# dropped {}", self.dropped)?;
        writeln!(
            f,
            "# seq time_ns pid handle addr step pfn order result note"
        )?;
        for r in self.iter() {
            write_record(f, r)?;
        }
        Ok(())
    }

    pub(crate) fn write_stats(&self, f: &mut impl fmt::Write) -> fmt::Result {
        writeln!(f, "# step ok failed")?;
        for &step in Step::ALL {
            writeln!(
                f,
                "{} {} {}",
                step.name(),
                self.count(step, false),
                self.count(step, true)
            )?;
        }
        writeln!(f, "events_dropped {}", self.dropped)?;
        writeln!(f, "# step count reason")?;
        for (step, reason, n) in self.reasons.iter() {
            writeln!(f, "{} {n} {reason}", step.name())?;
        }
        writeln!(f, "other_reasons {}", self.other_reasons)
    }
}

fn write_record(f: &mut impl fmt::Write, r: &Record) -> fmt::Result {
    let e = &r.event;
    write!(f, "{} {} {} ", r.seq, r.time_ns, e.pid)?;
    match e.handle {
        Some(h) => write!(f, "{h} ")?,
        None => write!(f, "- ")?,
    }
    match e.addr {
        Some(a) => write!(f, "{a:#x} ")?,
        None => write!(f, "- ")?,
    }
    write!(f, "{} ", e.step.name())?;
    match e.pfn {
        Some(p) => write!(f, "{p:#x} ")?,
        None => write!(f, "- ")?,
    }
    match e.order {
        Some(o) => write!(f, "{o} ")?,
        None => write!(f, "- ")?,
    }
    if e.result == 0 {
        write!(f, "ok")?;
    } else {
        write!(f, "{}", ErrnoName(e.result))?;
    }
    if e.note.is_empty() {
        writeln!(f)
    } else {
        writeln!(f, " {}", e.note)
    }
}

/// `-EINVAL` and friends; unknown numbers print as `-E<n>`.
pub(crate) struct ErrnoName(pub(crate) i32);

impl fmt::Display for ErrnoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match -self.0 {
            1 => "EPERM",
            2 => "ENOENT",
            3 => "ESRCH",
            4 => "EINTR",
            5 => "EIO",
            7 => "E2BIG",
            9 => "EBADF",
            11 => "EAGAIN",
            12 => "ENOMEM",
            13 => "EACCES",
            14 => "EFAULT",
            16 => "EBUSY",
            17 => "EEXIST",
            19 => "ENODEV",
            22 => "EINVAL",
            25 => "ENOTTY",
            28 => "ENOSPC",
            34 => "ERANGE",
            84 => "EILSEQ",
            6 => "ENXIO",
            130 => "EOWNERDEAD",
            61 => "ENODATA",
            95 => "EOPNOTSUPP",
            n => return write!(f, "-E{n}"),
        };
        write!(f, "-{name}")
    }
}

/// The journal proper: a ring behind a spinlock, so that steps taken under
/// the page-table lock can be recorded too.
#[pin_data]
pub(crate) struct Journal {
    #[pin]
    ring: SpinLock<Ring>,
}

impl Journal {
    pub(crate) fn new() -> Result<impl PinInit<Self>> {
        let ring = Ring::with_capacity(EVENT_CAPACITY)?;
        Ok(pin_init!(Self {
            ring <- new_spinlock!(ring, "hugepoke_journal"),
        }))
    }

    /// Log `event`, and emit it as its step's trace event (under the lock,
    /// so that the trace has the journal's order).
    pub(crate) fn record(&self, event: Event) -> u64 {
        let now = sys::ktime_ns();
        let mut ring = self.ring.lock();
        let seq = ring.push(event, now);
        event.trace(seq);
        seq
    }

    /// Record `ev` as failed with `err` for the reason `why`, and return `err`.
    pub(crate) fn fail(&self, ev: Event, err: Error, why: &'static str) -> Error {
        self.record(ev.error(err, why));
        err
    }

    /// Journal `r` as the failure of `ev`; its errno, for the caller.
    pub(crate) fn refuse(&self, ev: Event, r: Refusal) -> Error {
        self.fail(ev, r.errno, r.why)
    }

    pub(crate) fn write_events(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.ring.lock().write_events(f)
    }

    pub(crate) fn write_stats(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.ring.lock().write_stats(f)
    }
}

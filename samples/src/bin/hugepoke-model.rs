//! A model-based test: random sequences of operations on a real target and
//! real device files, each step checked against a reference model
//! (proptest-state-machine), a failing sequence shrunk to a minimal one.
//!
//!   hugepoke-model [--seconds S] [--seed N] [--replay 'OP; OP; ...']
//!
//! The target is a fresh `thp-target` per sequence; the operations act on
//! the functions at the start of its text pages 0 to 3, through two
//! controllers (two open /dev/hugepoke files):
//!   patch cC pP vV [persist]   PATCH page P to return 2000+V
//!   batch cC pP.. vV [persist] PATCH_BATCH of those pages, one handle
//!   restore hH [other]         the Hth handle made (live or not), through
//!                              its controller or the other one
//!   restore hH [other] user    the same from a thread that dropped to
//!                              user nobody: allowed only through the file
//!                              that made a patch that does not persist
//!                              (EPERM otherwise, the patch kept)
//!   query hH                   the same; its state, pid and site count
//!   reopen cC                  close controller C (its patches that do not
//!                              persist are restored) and open it again
//!   dontneed pP                the target MADV_DONTNEEDs page P
//!   memwrite pP                /proc/PID/mem writes page P's own byte 100
//!                              (an anonymous copy equal to the file)
//!   collapse                   COLLAPSE (copies under a live patch stay)
//!   protect rwx / protect rx   the target mprotect()s its whole text
//!                              writable, or back (PATCH is then refused
//!                              EINVAL, RESTORE EACCES and the patch kept)
//!   move                       the target mremap()s its text elsewhere
//!   fork                       the target forks a child that sleeps
//!   pageout pP                 MADV_PAGEOUT of page P's copy to swap (the
//!                              check's call brings it back: a new page)
//!   unmap                      the target munmap()s page 3 (for good)
//!   exec                       the target execs a new thp-target: same
//!                              pid, a new mm, the patches gone with the old
//!   probe pP / unprobe         a tracefs uprobe at page P's first byte
//!                              (its int3 in the target's copy; a call runs
//!                              the file's instruction), and its removal
//!                              (then the page is dropped unless it runs a
//!                              patch: whether uprobes zap their own copy
//!                              hangs on an LRU batch's reference)
//!   paused AT dontneed pQ: OP  OP (a patch, batch or restore) from another
//!                              thread, parked at the module's pause point
//!                              AT (src/pause.rs) while the target drops
//!                              page Q, then released: the module must
//!                              see the change (a copy gone between GUP
//!                              and the PTE lock, between RESTORE's passes)
//! The model says what each call returns (ok, EBUSY on a patched page,
//! ENOENT for a handle no longer live; a failure must be journaled with
//! its reason), and after every step what every page runs and holds, which pages are anonymous copies (pagemap; smaps'
//! Anonymous is 4 kB each), which handles the module lists, and when the
//! range must be PMD-mapped again (waited for, up to 10 s; khugepaged must
//! be asleep).
//!
//! Prints `# model: N sequences, M steps, F failures (mix: ...)`; a failure
//! is printed shrunk, as a command line that replays it (`--replay`).
//! Exits 1 on a failure.

use hugepoke::device::{Device, Site};
use hugepoke::proc;
use hugepoke::testkit::pause::Pause;
use hugepoke::testkit::target::Target;
use hugepoke::testkit::text;
use hugepoke::testkit::uprobe::Uprobe;
use hugepoke::uapi;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sequences the model found failing, each replayed (fixed) before any
/// random one: a fixed seed need not come across them again.
const FOUND: &[&str] = &[
    // RESTORE said EAGAIN: the copy the target shares with its child holds
    // the originals, and the module waited for the child to give back a
    // patch it never ran (src/engine/locate.rs, `runs_patch`).
    "patch c0 p1 v0; dontneed p1; memwrite p1; fork; restore h0",
    // No collapse: the target dropped the patch's copy and moved its text,
    // and RESTORE looked for the page cache only where PATCH wrote
    // (src/engine/locate.rs, `note_cache`).
    "patch c0 p2 v0; dontneed p2; move; restore h0",
    // The model's own teardown left a persistent patch in a writable text
    // (RESTORE refused it: EACCES), seen by the module's counters.
    "patch c0 p0 v0 persist; protect rwx",
    // The model's own mistake: a patch gone with an exec'd image is
    // restored (nothing written) whatever the new image's text is.
    "patch c0 p0 v0; exec; protect rwx; restore h0",
    // A batch refused at a uprobe's int3 zapped, in its undo, another
    // tool's copy it had written into (src/engine/restore.rs,
    // `copy_before`): not as it was.
    "memwrite p0; probe p1; batch c0 p0 p1 v0",
];

const PAGES: u8 = 4;
const CONTROLLERS: u8 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Patch {
        ctl: u8,
        page: u8,
        value: u8,
        persist: bool,
    },
    Batch {
        ctl: u8,
        pages: Vec<u8>,
        value: u8,
        persist: bool,
    },
    Restore {
        id: usize,
        /// Through the other controller (allowed: the caller is root).
        other: bool,
    },
    /// RESTORE from a thread without privileges (user nobody).
    UserRestore {
        id: usize,
        other: bool,
    },
    Query {
        id: usize,
    },
    Reopen {
        ctl: u8,
    },
    DontNeed {
        page: u8,
    },
    MemWrite {
        page: u8,
    },
    Collapse,
    /// mprotect() of the whole text: read+write+exec, or back to read+exec.
    Protect {
        writable: bool,
    },
    /// mremap() of the whole text to another 2 MiB-aligned address.
    Move,
    /// The target forks a child that sleeps (one per sequence).
    Fork,
    /// MADV_PAGEOUT of page P's anonymous copy (swap is on for the run).
    PageOut {
        page: u8,
    },
    /// munmap() of the last page: a hole no PMD can map over.
    Unmap,
    /// The target execs thp-target again: same pid, a new mm.
    Exec,
    /// A uprobe at page P's first byte (one at a time).
    Probe {
        page: u8,
    },
    /// The uprobe removed.
    Unprobe,
    /// `call` parked at `at` while the target MADV_DONTNEEDs `page`.
    Paused {
        at: At,
        page: u8,
        call: Box<Op>,
    },
}

/// The pause points `Op::Paused` parks at (src/pause.rs says where each
/// is): where the target's own MADV_DONTNEED (per-VMA locked) still runs.
/// `Cowed` and `Located` are where a drop changes the call's course.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    Resolved,
    Checked,
    Cowed,
    Written,
    Restore,
    Forked,
    Located,
}

const PATCH_POINTS: [At; 4] = [At::Resolved, At::Checked, At::Cowed, At::Written];
const RESTORE_POINTS: [At; 3] = [At::Restore, At::Forked, At::Located];
/// The points drawn, half at the one where a drop changes the call's course.
const PATCH_DRAWS: [At; 6] = [
    At::Cowed,
    At::Cowed,
    At::Cowed,
    At::Resolved,
    At::Checked,
    At::Written,
];
const RESTORE_DRAWS: [At; 6] = [
    At::Located,
    At::Located,
    At::Located,
    At::Restore,
    At::Forked,
    At::Restore,
];

impl At {
    fn name(self) -> &'static str {
        match self {
            At::Resolved => "resolved",
            At::Checked => "checked",
            At::Cowed => "cowed",
            At::Written => "written",
            At::Restore => "restore",
            At::Forked => "forked",
            At::Located => "located",
        }
    }

    fn parse(s: &str) -> Option<At> {
        PATCH_POINTS
            .into_iter()
            .chain(RESTORE_POINTS)
            .find(|a| a.name() == s)
    }
}

/// The page `Op::Unmap` unmaps.
const UNMAPPED: u8 = PAGES - 1;

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::Patch { .. } => "patch",
            Op::Batch { .. } => "batch",
            Op::Restore { .. } => "restore",
            Op::UserRestore { .. } => "user-restore",
            Op::Query { .. } => "query",
            Op::Reopen { .. } => "reopen",
            Op::DontNeed { .. } => "dontneed",
            Op::MemWrite { .. } => "memwrite",
            Op::Collapse => "collapse",
            Op::Protect { .. } => "protect",
            Op::Move => "move",
            Op::Fork => "fork",
            Op::PageOut { .. } => "pageout",
            Op::Unmap => "unmap",
            Op::Exec => "exec",
            Op::Probe { .. } => "probe",
            Op::Unprobe => "unprobe",
            Op::Paused { .. } => "paused",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let persist = |p: &bool| if *p { " persist" } else { "" };
        match self {
            Op::Patch {
                ctl,
                page,
                value,
                persist: p,
            } => {
                write!(f, "patch c{ctl} p{page} v{value}{}", persist(p))
            }
            Op::Batch {
                ctl,
                pages,
                value,
                persist: p,
            } => {
                let pages: Vec<String> = pages.iter().map(|p| format!("p{p}")).collect();
                write!(f, "batch c{ctl} {} v{value}{}", pages.join(" "), persist(p))
            }
            Op::Restore { id, other } => {
                write!(f, "restore h{id}{}", if *other { " other" } else { "" })
            }
            Op::UserRestore { id, other } => {
                write!(
                    f,
                    "restore h{id}{} user",
                    if *other { " other" } else { "" }
                )
            }
            Op::Query { id } => write!(f, "query h{id}"),
            Op::Reopen { ctl } => write!(f, "reopen c{ctl}"),
            Op::DontNeed { page } => write!(f, "dontneed p{page}"),
            Op::MemWrite { page } => write!(f, "memwrite p{page}"),
            Op::Collapse => write!(f, "collapse"),
            Op::Protect { writable } => {
                write!(f, "protect {}", if *writable { "rwx" } else { "rx" })
            }
            Op::Move => write!(f, "move"),
            Op::Fork => write!(f, "fork"),
            Op::PageOut { page } => write!(f, "pageout p{page}"),
            Op::Unmap => write!(f, "unmap"),
            Op::Exec => write!(f, "exec"),
            Op::Probe { page } => write!(f, "probe p{page}"),
            Op::Unprobe => write!(f, "unprobe"),
            Op::Paused { at, page, call } => {
                write!(f, "paused {} dontneed p{page}: {call}", at.name())
            }
        }
    }
}

/// `--replay`'s parser: the Display form, `;`-separated.
fn parse_op(s: &str) -> Option<Op> {
    if let Some((pause, call)) = s
        .trim()
        .strip_prefix("paused ")
        .and_then(|p| p.split_once(':'))
    {
        let w: Vec<&str> = pause.split_whitespace().collect();
        let page = w.get(2)?.strip_prefix('p')?.parse().ok()?;
        return (w.len() == 3 && w[1] == "dontneed").then_some(Op::Paused {
            at: At::parse(w[0])?,
            page,
            call: Box::new(parse_op(call)?),
        });
    }
    let w: Vec<&str> = s.split_whitespace().collect();
    let num = |p: &str, c: char| p.strip_prefix(c)?.parse::<u8>().ok();
    let id = |p: &str| p.strip_prefix('h')?.parse::<usize>().ok();
    let persist = w.last() == Some(&"persist");
    Some(match *w.first()? {
        "patch" => Op::Patch {
            ctl: num(w.get(1)?, 'c')?,
            page: num(w.get(2)?, 'p')?,
            value: num(w.get(3)?, 'v')?,
            persist,
        },
        "batch" => {
            let pages = w[2..].iter().filter_map(|p| num(p, 'p')).collect();
            let value = w.iter().find_map(|p| num(p, 'v'))?;
            Op::Batch {
                ctl: num(w.get(1)?, 'c')?,
                pages,
                value,
                persist,
            }
        }
        "restore" if w.last() == Some(&"user") => Op::UserRestore {
            id: id(w.get(1)?)?,
            other: w.get(2) == Some(&"other"),
        },
        "restore" => Op::Restore {
            id: id(w.get(1)?)?,
            other: w.get(2) == Some(&"other"),
        },
        "query" => Op::Query { id: id(w.get(1)?)? },
        "reopen" => Op::Reopen {
            ctl: num(w.get(1)?, 'c')?,
        },
        "dontneed" => Op::DontNeed {
            page: num(w.get(1)?, 'p')?,
        },
        "memwrite" => Op::MemWrite {
            page: num(w.get(1)?, 'p')?,
        },
        "collapse" => Op::Collapse,
        "protect" => Op::Protect {
            writable: *w.get(1)? == "rwx",
        },
        "move" => Op::Move,
        "fork" => Op::Fork,
        "pageout" => Op::PageOut {
            page: num(w.get(1)?, 'p')?,
        },
        "unmap" => Op::Unmap,
        "exec" => Op::Exec,
        "probe" => Op::Probe {
            page: num(w.get(1)?, 'p')?,
        },
        "unprobe" => Op::Unprobe,
        _ => return None,
    })
}

/// What one text page holds, in the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Page {
    /// The live patch on it: its handle id and value.
    patch: Option<(usize, u8)>,
    /// An anonymous copy maps it (a patch's, or a /proc/PID/mem write's).
    copy: bool,
    /// That copy holds the patch's bytes (MADV_DONTNEED dropped them, and
    /// a later write's copy is the file's).
    shows_patch: bool,
    /// The uprobe's int3 is at its first byte (in a copy).
    probed: bool,
}

#[derive(Clone, Debug)]
struct Handle {
    ctl: u8,
    persist: bool,
    live: bool,
    /// How many sites its PATCH made (QUERY's count while it lives).
    sites: usize,
    /// Its target execed since the PATCH: the patch went with the old mm,
    /// and RESTORE (which writes nothing there) minds no later mapping.
    gone: bool,
}

#[derive(Clone, Debug, Default)]
struct Model {
    pages: [Page; PAGES as usize],
    /// Every handle a call was expected to make, in order.
    handles: Vec<Handle>,
    /// The range must be PMD-mapped again (a collapse ran with nothing left).
    pmd: bool,
    /// What the last call must return: 0 (success) or an errno.
    expect: i32,
    /// The text is mapped writable (Protect).
    writable: bool,
    /// Page [`UNMAPPED`] is unmapped (Unmap).
    unmapped: bool,
    /// The page a uprobe is attached at (Probe).
    probe: Option<u8>,
    /// The forked child's pages, as the parent's were at the fork: PATCH
    /// and the target's own changes after it do not reach the child, a
    /// RESTORE (or a close) of a patch it inherited takes it back there.
    child: Option<[Page; PAGES as usize]>,
}

impl Model {
    fn settle(&mut self, id: usize) {
        // A collapse is queued for a page whose copy RESTORE zapped, or
        // whose copy the target dropped, where the text is now (found by
        // this model: once only where PATCH wrote, so a text moved since
        // stayed split until `hugepoke collapse`).
        let collapse = self
            .pages
            .iter()
            .any(|p| p.patch.is_some_and(|(h, _)| h == id));
        for p in self.pages.iter_mut() {
            if p.patch.is_some_and(|(h, _)| h == id) {
                // RESTORE writes the original back and zaps the copy,
                // now equal to the page cache.
                *p = Page::default();
            }
        }
        self.restore_child(id);
        self.handles[id].live = false;
        if collapse {
            self.collapsed();
        }
    }
    /// RESTORE of `id` in the forked child: a page that runs the patch is
    /// given back (its copy zapped); a copy that does not (the target
    /// dropped ours and a later write made one equal to the file before
    /// the fork) is no copy of ours and stays.
    fn restore_child(&mut self, id: usize) {
        for p in self.child.iter_mut().flatten() {
            if p.patch.is_some_and(|(h, _)| h == id) {
                let kept = p.copy && !p.shows_patch;
                *p = Page {
                    copy: kept,
                    ..Page::default()
                };
            }
        }
    }
    /// Some page of handle `id` has the uprobe's int3 on it.
    fn probed(&self, id: usize) -> bool {
        self.pages
            .iter()
            .any(|p| p.probed && p.patch.is_some_and(|(h, _)| h == id))
    }
    /// A collapse ran: the PMD is back if nothing is left in the range.
    fn collapsed(&mut self) {
        self.pmd = !self.unmapped && self.pages.iter().all(|p| *p == Page::default());
    }
    fn value(&self, page: usize) -> u32 {
        Self::value_of(&self.pages[page], page)
    }
    fn value_of(p: &Page, page: usize) -> u32 {
        match *p {
            // The uprobe single-steps the file's first instruction.
            Page { probed: true, .. } => text::original_value(page),
            Page {
                patch: Some((_, v)),
                shows_patch: true,
                ..
            } => 2000 + v as u32,
            _ => text::original_value(page),
        }
    }
}

struct Reference;

impl ReferenceStateMachine for Reference {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model {
            pmd: true,
            ..Model::default()
        })
        .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Op> {
        let ctl = 0..CONTROLLERS;
        let page = 0..PAGES;
        let handles = state.handles.len().max(1);
        let patch = (ctl.clone(), page.clone(), any::<u8>(), any::<bool>())
            .prop_map(|(ctl, page, value, persist)| Op::Patch {
                ctl,
                page,
                value,
                persist,
            })
            .boxed();
        let batch = (
            ctl.clone(),
            proptest::sample::subsequence((0..PAGES).collect::<Vec<_>>(), 1..=3),
            any::<u8>(),
            any::<bool>(),
        )
            .prop_map(|(ctl, pages, value, persist)| Op::Batch {
                ctl,
                pages,
                value,
                persist,
            })
            .boxed();
        let restore = (0..handles, proptest::bool::weighted(0.25))
            .prop_map(|(id, other)| Op::Restore { id, other })
            .boxed();
        let mut calls = vec![(2, patch.clone()), (1, batch.clone())];
        if !state.handles.is_empty() {
            calls.push((2, restore.clone()));
        }
        // Half the draws at the points where a drop changes the call's
        // course (`cowed`: the copy GUP returned goes before the PTE lock;
        // `located`: a copy goes between RESTORE's passes), and three in
        // four of a page the call works on (its first, at `cowed`).
        let now = state.pages;
        let paused = (
            0..6usize,
            0..4usize,
            page.clone(),
            proptest::strategy::Union::new_weighted(calls),
        )
            .prop_map(move |(i, pick, page, call)| {
                let (at, mine): (At, Vec<u8>) = match &call {
                    Op::Restore { id, .. } => (
                        RESTORE_DRAWS[i],
                        (0..PAGES)
                            .filter(|&p| now[p as usize].patch.is_some_and(|(h, _)| h == *id))
                            .collect(),
                    ),
                    Op::Patch { page, .. } => (PATCH_DRAWS[i], vec![*page]),
                    Op::Batch { pages, .. } if PATCH_DRAWS[i] == At::Cowed => {
                        (At::Cowed, pages.iter().min().into_iter().copied().collect())
                    }
                    Op::Batch { pages, .. } => (PATCH_DRAWS[i], pages.clone()),
                    _ => unreachable!("only PATCH and RESTORE are parked"),
                };
                let page = match mine.len() {
                    n if n > 0 && pick < 3 => mine[page as usize % n],
                    _ => page,
                };
                Op::Paused {
                    at,
                    page,
                    call: Box::new(call),
                }
            })
            .boxed();
        let mut ops = vec![
            (4, patch),
            (2, batch),
            (2, paused),
            (1, ctl.prop_map(|ctl| Op::Reopen { ctl }).boxed()),
            (
                1,
                page.clone().prop_map(|page| Op::DontNeed { page }).boxed(),
            ),
            (1, page.prop_map(|page| Op::MemWrite { page }).boxed()),
            (1, Just(Op::Collapse).boxed()),
            (
                1,
                any::<bool>()
                    .prop_map(|writable| Op::Protect { writable })
                    .boxed(),
            ),
            (1, Just(Op::Move).boxed()),
            (1, Just(Op::Fork).boxed()),
            (1, (0..PAGES).prop_map(|page| Op::PageOut { page }).boxed()),
            (1, Just(Op::Unmap).boxed()),
            (1, Just(Op::Exec).boxed()),
            (1, (0..PAGES).prop_map(|page| Op::Probe { page }).boxed()),
            (2, Just(Op::Unprobe).boxed()),
        ];
        if !state.handles.is_empty() {
            ops.push((4, restore));
            ops.push((
                1,
                (0..handles, any::<bool>())
                    .prop_map(|(id, other)| Op::UserRestore { id, other })
                    .boxed(),
            ));
            ops.push((1, (0..handles).prop_map(|id| Op::Query { id }).boxed()));
        }
        proptest::strategy::Union::new_weighted(ops).boxed()
    }

    fn preconditions(state: &Model, op: &Op) -> bool {
        let w = state.writable;
        let hole = state.unmapped;
        // What PATCH and the target's own calls do over the hole is not
        // modelled, nor mremap, mprotect, COLLAPSE or fork across it.
        let mapped = |p: &u8| !hole || *p != UNMAPPED;
        let probe = state.probe.is_some();
        match op {
            Op::Paused { at, page, call } => Self::paused_preconditions(state, *at, *page, call),
            Op::Move | Op::Protect { .. } | Op::Collapse | Op::Fork if hole => false,
            // What a uprobe does in a writable mapping, in a forked child,
            // across an exec or a hole is not modelled.
            Op::Protect { .. } | Op::Fork | Op::Exec | Op::Unmap if probe => false,
            Op::Probe { .. } => !probe && !w && !hole && state.child.is_none(),
            Op::Unprobe => probe,
            Op::DontNeed { page } | Op::MemWrite { page } | Op::Patch { page, .. }
                if !mapped(page) =>
            {
                false
            }
            Op::Batch { pages, .. } if !pages.iter().all(mapped) => false,
            // Only a copy of the target's own (MADV_PAGEOUT leaves a page
            // a child shares) goes to swap; the hole is its own.
            Op::PageOut { page } => {
                mapped(page) && state.pages[*page as usize].copy && state.child.is_none()
            }
            // (A child's RESTORE over a hole in its parent's text is not
            // modelled; nor a writable text with a hole, which no
            // mprotect() over the whole text makes text again.)
            Op::Unmap => !hole && !w && state.child.is_none(),
            Op::Query { id } => *id < state.handles.len(),
            Op::UserRestore { id, .. } => Self::preconditions(
                state,
                &Op::Restore {
                    id: *id,
                    other: false,
                },
            ),
            // Writable: only a RESTORE that finds a copy on each page (it
            // refuses to write there); a dropped one is not modelled.
            Op::Restore { id, .. } => {
                *id < state.handles.len()
                    && (!w
                        || !state.handles[*id].live
                        || state
                            .pages
                            .iter()
                            .all(|p| p.patch.map(|(h, _)| h) != Some(*id) || p.copy))
            }
            // What COLLAPSE does in a writable mapping, and what a close
            // restores there, are not modelled.
            Op::Collapse => !w,
            Op::Reopen { .. } => !w,
            // (A child forked writable stays writable: what a RESTORE
            // does there is not modelled.)
            Op::Fork => state.child.is_none() && !w,
            // Writable: which refusal comes first over a patched page is
            // not modelled.
            Op::Patch { page, .. } => !w || state.pages[*page as usize].patch.is_none(),
            Op::Batch { pages, .. } => {
                !pages.is_empty()
                    && (!w
                        || pages
                            .iter()
                            .all(|&p| state.pages[p as usize].patch.is_none()))
            }
            _ => true,
        }
    }

    fn apply(mut s: Model, op: &Op) -> Model {
        s.expect = 0;
        match op {
            Op::Paused { at, page, call } => return Self::paused(s, *at, *page, call),
            Op::Patch {
                ctl,
                page,
                value,
                persist,
            } => {
                s.patch(*ctl, &[*page], *value, *persist);
            }
            Op::Batch {
                ctl,
                pages,
                value,
                persist,
            } => s.patch(*ctl, pages, *value, *persist),
            Op::Restore { id, .. } => {
                if !s.handles[*id].live {
                    s.expect = libc::ENOENT;
                } else if s.handles[*id].gone {
                    s.settle(*id);
                } else if s.probed(*id) {
                    // The int3 is not a byte PATCH wrote: nothing written.
                    s.expect = libc::EILSEQ;
                } else if s.unmapped
                    && s.pages[UNMAPPED as usize]
                        .patch
                        .is_some_and(|(h, _)| h == *id)
                {
                    // The hole's sites are forgotten, the others restored.
                    s.expect = libc::ENXIO;
                    s.settle(*id);
                } else if s.writable {
                    // Nothing written into the target's writable mapping,
                    // the patch kept there (EACCES); a forked child's own
                    // mapping is not writable, and its copy is restored.
                    s.expect = libc::EACCES;
                    s.restore_child(*id);
                } else {
                    s.settle(*id);
                }
            }
            Op::UserRestore { id, other } => {
                let h = &s.handles[*id];
                if h.live && (h.persist || *other) {
                    // Neither this file's patch nor one that dies with it,
                    // and nobody may not ptrace-attach to the target.
                    s.expect = libc::EPERM;
                } else {
                    return Self::apply(
                        s,
                        &Op::Restore {
                            id: *id,
                            other: false,
                        },
                    );
                }
            }
            Op::Protect { writable } => s.writable = *writable,
            // The patches, copies and PMD move with the text.
            Op::Move => {}
            Op::Fork => s.child = Some(s.pages),
            // The check's call faults the copy back in from swap: the same
            // bytes in another page.
            Op::PageOut { .. } => {}
            Op::Unmap => {
                s.unmapped = true;
                let p = &mut s.pages[UNMAPPED as usize];
                (p.copy, p.shows_patch) = (false, false);
                s.pmd = false;
            }
            // A new image: the file's code, PMD-mapped, nothing patched;
            // the handles stay (their target's mm is gone), and a child
            // forked before keeps what it had.
            Op::Probe { page } => {
                s.probe = Some(*page);
                let p = &mut s.pages[*page as usize];
                (p.probed, p.copy) = (true, true);
                s.pmd = false;
            }
            // Removed, the int3 gives way to the file's first byte (a
            // patch's too: `mov`); a page that runs no patch is dropped.
            Op::Unprobe => {
                let page = s.probe.take().unwrap_or_default() as usize;
                let p = &mut s.pages[page];
                p.probed = false;
                if !(p.patch.is_some() && p.shows_patch) {
                    (p.copy, p.shows_patch) = (false, false);
                }
            }
            Op::Exec => {
                s.handles.iter_mut().for_each(|h| h.gone = true);
                s.pages = Default::default();
                (s.writable, s.unmapped, s.pmd) = (false, false, true);
            }
            Op::Query { id } => {
                if !s.handles[*id].live {
                    s.expect = libc::ENOENT;
                }
            }
            Op::Reopen { ctl } => {
                let gone: Vec<usize> = (0..s.handles.len())
                    .filter(|&i| {
                        s.handles[i].live && s.handles[i].ctl == *ctl && !s.handles[i].persist
                    })
                    .collect();
                for id in gone {
                    if s.probed(id) {
                        // The close's RESTORE is refused: the patch stays,
                        // persistent, for a RESTORE to come.
                        s.handles[id].persist = true;
                    } else {
                        s.settle(id);
                    }
                }
            }
            Op::DontNeed { page } => {
                s.pages[*page as usize].copy = false;
                s.pages[*page as usize].shows_patch = false;
                s.pages[*page as usize].probed = false;
                s.pmd = false;
            }
            Op::MemWrite { page } => {
                s.pages[*page as usize].copy = true;
                s.pmd = false;
            }
            // Every copy goes but those on a page with a live patch,
            // RESTORE's to give back (whatever they hold).
            Op::Collapse => {
                // (The int3's copy differs from the file: kept.)
                for p in s
                    .pages
                    .iter_mut()
                    .filter(|p| p.patch.is_none() && !p.probed)
                {
                    p.copy = false;
                }
                s.collapsed();
            }
        }
        s
    }
}

impl Reference {
    /// Only a call that succeeds parks (a refusal may come before the
    /// point); only a page of the text, neither writable nor probed.
    fn paused_preconditions(state: &Model, at: At, page: u8, call: &Op) -> bool {
        let restored = match *call {
            Op::Restore { id, .. } => Some(id),
            _ => None,
        };
        let gone = restored.is_some_and(|id| id < state.handles.len() && state.handles[id].gone);
        let p = &state.pages[page as usize];
        // A copy of the handle's that runs no patch (the target dropped
        // ours, a write made one): what RESTORE's passes make of its going
        // is not modelled; nor RESTORE's undo in a forked child.
        let unclear = at == At::Located
            && (state.child.is_some()
                || (restored.is_some()
                    && p.patch.map(|(h, _)| h) == restored
                    && p.copy
                    && !p.shows_patch));
        let hole = state.unmapped && page == UNMAPPED;
        !(state.writable || state.probe.is_some() || hole || gone || unclear)
            && Self::preconditions(state, call)
            && Self::apply(state.clone(), call).expect == 0
    }

    /// The target dropped `page` while `call` was parked at `at`: the same
    /// as the drop before the call, but for the page PATCH wrote first
    /// (dropped after: the patch gone from it, the handle made), and for a
    /// copy of the restored handle's dropped between RESTORE's passes
    /// (EAGAIN, the handle kept, nothing else changed).
    fn paused(s: Model, at: At, page: u8, call: &Op) -> Model {
        let dropped = Op::DontNeed { page };
        let first = match call {
            Op::Patch { page, .. } => Some(*page),
            Op::Batch { pages, .. } => pages.iter().min().copied(),
            _ => None,
        };
        let ours = match *call {
            Op::Restore { id, .. } => s.pages[page as usize].patch.is_some_and(|(h, _)| h == id),
            _ => false,
        };
        match at {
            At::Written if first == Some(page) => {
                let s = Self::apply(s, call);
                Model {
                    expect: 0,
                    ..Self::apply(s, &dropped)
                }
            }
            At::Located if ours && s.pages[page as usize].copy => Model {
                expect: libc::EAGAIN,
                ..Self::apply(s, &dropped)
            },
            _ => Self::apply(Self::apply(s, &dropped), call),
        }
    }
}

impl Model {
    fn patch(&mut self, ctl: u8, pages: &[u8], value: u8, persist: bool) {
        if self.writable {
            // A writable mapping is not text.
            self.expect = libc::EINVAL;
            return;
        }
        if pages.iter().any(|&p| {
            let p = &self.pages[p as usize];
            p.patch.is_some() || p.probed
        }) {
            self.expect = libc::EBUSY;
            return;
        }
        let id = self.handles.len();
        self.handles.push(Handle {
            ctl,
            persist,
            live: true,
            sites: pages.len(),
            gone: false,
        });
        for &p in pages {
            self.pages[p as usize] = Page {
                patch: Some((id, value)),
                copy: true,
                shows_patch: true,
                probed: false,
            };
        }
        self.pmd = false;
    }
}

/// The system under test: the target, the controllers, the real handles.
struct System {
    t: Target,
    /// The forked child, and its text's address (the parent's at the fork).
    child: Option<(i32, u64)>,
    ctl: Vec<Device>,
    /// The module's handle for each model handle (0: the call failed).
    real: Vec<u64>,
    /// The uprobe attached (removed on drop), and its page.
    probe: Option<(Uprobe, u8)>,
    /// The journal's newest event when it was last read.
    seen: u64,
}

/// The text file the model's targets run: a copy of its own, so that a
/// uprobe on it reaches no other test's process.
fn model_file() -> String {
    static FILE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = std::env::var("HUGEPOKE_THP_DIR").unwrap_or_else(|_| "/tmp/hugepoke-thp".into());
        let path = format!("{dir}/model.bin");
        std::fs::write(&path, text::blob()).expect("the model's text file");
        path
    })
    .clone()
}

/// This thread alone becomes user and group nobody, without capabilities
/// (raw syscalls: libc's set*id would change every thread).
fn as_nobody() -> Result<(), i32> {
    const NOBODY: libc::c_long = 65534;
    // SAFETY: credential changes of the calling thread; no memory passed.
    let dropped = unsafe {
        libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY) == 0
            && libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY) == 0
    };
    dropped.then_some(()).ok_or(-1)
}

/// A PATCH or RESTORE made ready to run, on the controllers.
type Ioctl = Box<dyn FnOnce(&[Device]) -> Result<u64, i32> + Send>;

static SEQUENCES: AtomicU64 = AtomicU64::new(0);
static STEPS: AtomicU64 = AtomicU64::new(0);
static MIX: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

fn site(t: &Target, page: u8, value: u8) -> Site {
    Site {
        addr: t.page_addr(page as usize),
        bytes: text::mov_eax_ret(2000 + value as u32).to_vec(),
        expect: None,
    }
}

impl System {
    /// PATCH, PATCH_BATCH or RESTORE, made ready to run on any thread:
    /// the handle PATCH made (0 for RESTORE), or the errno.
    fn ioctl(&self, model: &Model, op: &Op) -> Ioctl {
        let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(0);
        let flags = |p: bool| if p { uapi::PATCH_PERSIST } else { 0 };
        let pid = self.t.pid;
        match op {
            Op::Patch {
                ctl,
                page,
                value,
                persist,
            } => {
                let (c, sites, f) = (
                    *ctl as usize,
                    [site(&self.t, *page, *value)],
                    flags(*persist),
                );
                Box::new(move |ctl: &[Device]| {
                    ctl[c]
                        .patch_sites(pid, &sites, false, f)
                        .map_err(|e| errno(e.error))
                })
            }
            Op::Batch {
                ctl,
                pages,
                value,
                persist,
            } => {
                let sites: Vec<Site> = pages.iter().map(|&p| site(&self.t, p, *value)).collect();
                let (c, f) = (*ctl as usize, flags(*persist));
                Box::new(move |ctl: &[Device]| {
                    ctl[c]
                        .patch_sites(pid, &sites, true, f)
                        .map_err(|e| errno(e.error))
                })
            }
            Op::Restore { id, other } => {
                let c = model.handles[*id].ctl as usize ^ *other as usize;
                let handle = self.real[*id];
                Box::new(move |ctl: &[Device]| ctl[c].restore(handle).map(|_| 0).map_err(errno))
            }
            _ => unreachable!("{op} is no PATCH or RESTORE"),
        }
    }

    /// What `ioctl` returned, kept: the handle a PATCH made.
    fn ran(&mut self, model: &Model, op: &Op, r: Result<u64, i32>) -> Result<(), i32> {
        match op {
            Op::Restore { .. } => r.map(|_| ()),
            _ => self.made(model, r),
        }
    }

    /// `call` on another thread, parked at `at` while the target drops
    /// `page`, then released.  A call that returns without parking is a
    /// failure of the model's (it said the call would get there).
    fn paused(&mut self, model: &Model, at: At, page: u8, call: &Op) -> Result<(), i32> {
        let pause = Pause::arm(at.name(), self.t.pid).unwrap_or_else(|e| panic!("{e}"));
        let ioctl = self.ioctl(model, call);
        let (t, ctl) = (&mut self.t, &self.ctl);
        let (parked, dropped, r) = std::thread::scope(|scope| {
            let job = scope.spawn(move || ioctl(ctl));
            let begin = Instant::now();
            let mut parked = false;
            while !parked && !job.is_finished() && begin.elapsed() < Duration::from_secs(60) {
                parked = pause.parked(at.name()).unwrap_or_else(|e| panic!("{e}"));
                std::thread::sleep(Duration::from_millis(1));
            }
            let dropped =
                parked && t.command(&format!("dontneed {page}")) == Ok(format!("dontneed {page}"));
            // Made while the call was parked, not after it gave up waiting.
            let still = !parked || pause.parked(at.name()).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                still,
                "{call}: no longer parked at {} once page {page} was dropped",
                at.name()
            );
            pause.release().unwrap_or_else(|e| panic!("{e}"));
            (parked, dropped, job.join().expect("the parked call"))
        });
        drop(pause);
        assert!(
            parked,
            "{call} returned {r:?} without parking at {}",
            at.name()
        );
        let r = self.ran(model, call, r);
        if !dropped {
            return Err(-1);
        }
        r
    }

    fn call(&mut self, model: &Model, op: &Op) -> Result<(), i32> {
        let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(0);
        match op {
            Op::Patch { .. } | Op::Batch { .. } | Op::Restore { .. } => {
                let r = self.ioctl(model, op)(&self.ctl);
                self.ran(model, op, r)
            }
            Op::Paused { at, page, call } => self.paused(model, *at, *page, call),
            Op::UserRestore { id, other } => {
                let c = model.handles[*id].ctl as usize ^ *other as usize;
                let (dev, handle) = (&self.ctl[c], self.real[*id]);
                std::thread::scope(|scope| {
                    let job = scope.spawn(move || {
                        as_nobody()?;
                        dev.restore(handle).map_err(errno)
                    });
                    job.join().expect("the unprivileged RESTORE")
                })
            }
            Op::Query { id } => {
                let h = &model.handles[*id];
                let q = self.ctl[h.ctl as usize]
                    .query(self.real[*id])
                    .map_err(errno)?;
                // What QUERY answers, not only that it answers: the
                // target (same pid across an exec), every site, and
                // whether the patch went with its mm.
                let state = if h.gone {
                    uapi::STATE_GONE
                } else {
                    uapi::STATE_LIVE
                };
                let got = (q.state, q.pid, q.count as usize);
                let want = (state, self.t.pid, h.sites);
                assert!(
                    got == want,
                    "{op}: QUERY said (state, pid, count) {got:?}, the model says {want:?}"
                );
                Ok(())
            }
            Op::Reopen { ctl } => {
                self.ctl[*ctl as usize] = Device::open().map_err(errno)?;
                Ok(())
            }
            Op::DontNeed { page } => match self.t.command(&format!("dontneed {page}")) {
                Ok(a) if a == format!("dontneed {page}") => Ok(()),
                _ => Err(-1),
            },
            Op::MemWrite { page } => {
                use std::os::unix::fs::FileExt;
                let at = *page as usize * text::PAGE + 100;
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(format!("/proc/{}/mem", self.t.pid))
                    .and_then(|m| {
                        m.write_all_at(&text::blob()[at..at + 1], self.t.addr + at as u64)
                    })
                    .map_err(errno)
            }
            Op::Collapse => self.ctl[0]
                .collapse(self.t.pid, self.t.addr)
                .map(|_| ())
                .map_err(errno),
            Op::Protect { writable } => {
                let prot = if *writable { "rwx" } else { "rx" };
                match self.t.command(&format!("protect {prot}")) {
                    Ok(a) if a == "protected 0" => Ok(()),
                    _ => Err(-1),
                }
            }
            Op::Fork => {
                let said = self.t.command("fork").map_err(|_| -1)?;
                let pid = said
                    .strip_prefix("child ")
                    .and_then(|p| p.parse().ok())
                    .ok_or(-1)?;
                self.child = Some((pid, self.t.addr));
                Ok(())
            }
            Op::PageOut { page } => match self.t.command(&format!("pageout {page}")) {
                Ok(a) if a == "pageout ok" => Ok(()),
                _ => Err(-1),
            },
            Op::Unmap => match self.t.command(&format!("unmap {UNMAPPED}")) {
                Ok(a) if a == format!("unmap {UNMAPPED} 0") => Ok(()),
                _ => Err(-1),
            },
            // The old image (and so the old mm) is gone when the new one
            // says it is ready.
            Op::Exec => self
                .t
                .exec("thp-target", &["--file", &model_file()])
                .map_err(|_| -1),
            Op::Probe { page } => {
                let offset = (*page as usize * text::PAGE) as u64;
                let probe = Uprobe::add("hugepoke_model/probe", &self.t.file, offset);
                self.probe = Some((probe.map_err(|_| -1)?, *page));
                Ok(())
            }
            Op::Unprobe => {
                let (probe, page) = self.probe.take().ok_or(-1)?;
                drop(probe);
                // What uprobes left of their copy, gone (see the model),
                // unless the page runs a patch.
                let p = &model.pages[page as usize];
                if !(p.patch.is_some() && p.shows_patch) {
                    return self.call(model, &Op::DontNeed { page });
                }
                Ok(())
            }
            Op::Move => {
                let moved = self.t.command("move").map_err(|_| -1)?;
                self.t.addr = moved
                    .strip_prefix("moved ")
                    .and_then(hugepoke::parse_number)
                    .ok_or(-1)?;
                Ok(())
            }
        }
    }

    /// Record the handle a PATCH made (the model already counts it).
    fn made(&mut self, model: &Model, r: Result<u64, i32>) -> Result<(), i32> {
        if self.real.len() < model.handles.len() {
            self.real.push(*r.as_ref().unwrap_or(&0));
        }
        r.map(|_| ())
    }

    /// Every byte of text page `page` (/proc/PID/mem) is what the model
    /// says: the file's, but for a patch's bytes it shows and the uprobe's
    /// int3.  (A write anywhere else on the page is seen.)
    fn check_bytes(&self, m: &Model, page: usize) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let mut now = vec![0u8; text::PAGE];
        std::fs::File::open(format!("/proc/{}/mem", self.t.pid))
            .and_then(|f| f.read_exact_at(&mut now, self.t.page_addr(page)))
            .map_err(|e| format!("reading page {page}: {e}"))?;
        // The file's page (as `text::blob()` makes it, without making all
        // 2 MiB of it: that, four times a step, was most of a step's time).
        let mut want = vec![0xcc; text::PAGE];
        want[..6].copy_from_slice(&text::mov_eax_ret(text::original_value(page)));
        let p = &m.pages[page];
        if let (Some((_, v)), true) = (p.patch, p.shows_patch) {
            want[..6].copy_from_slice(&text::mov_eax_ret(2000 + v as u32));
        }
        if p.probed {
            want[0] = 0xcc;
        }
        match now.iter().zip(&want).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(at) => Err(format!(
                "page {page} holds {:#04x} at {at:#x}, the model says {:#04x}",
                now[at], want[at]
            )),
        }
    }

    /// Every check of one step; the first difference, said.
    fn check(&mut self, m: &Model) -> Result<(), String> {
        for page in 0..PAGES as usize {
            if m.unmapped && page == UNMAPPED as usize {
                continue;
            }
            let v = self.t.call(page)?;
            if v != m.value(page) {
                return Err(format!(
                    "page {page} returns {v}, the model says {}",
                    m.value(page)
                ));
            }
            self.check_bytes(m, page)?;
        }
        let pagemap = proc::Pagemap::open(self.t.pid).map_err(|e| e.to_string())?;
        for page in 0..PAGES as usize {
            let e = pagemap
                .entry(self.t.page_addr(page))
                .map_err(|e| e.to_string())?;
            let copy = e.present() && !e.file();
            if copy != m.pages[page].copy {
                return Err(format!(
                    "page {page}: anonymous copy {copy}, the model says {}",
                    m.pages[page].copy
                ));
            }
        }
        let listed = proc::listed_handles()?;
        for (id, h) in m.handles.iter().enumerate() {
            if h.live != listed.contains(&self.real[id]) {
                return Err(format!(
                    "handle h{id} ({}) listed {}, the model says live {}",
                    self.real[id], !h.live, h.live
                ));
            }
        }
        if let (Some((pid, addr)), Some(pages)) = (self.child, &m.child) {
            check_child(pid, addr, pages).map_err(|e| format!("forked child {pid}: {e}"))?;
        }
        let anon_kb = 4 * m.pages.iter().filter(|p| p.copy).count() as u64;
        let begin = Instant::now();
        loop {
            let s = proc::smaps_entry(self.t.pid, self.t.addr).map_err(|e| e.to_string())?;
            let anon = s.kb("Anonymous");
            if anon != anon_kb {
                return Err(format!(
                    "{anon} kB anonymous in the text, the model says {anon_kb}"
                ));
            }
            if !m.pmd || s.pmd_mapped_kb() == 2048 {
                return Ok(());
            }
            if begin.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "not PMD-mapped 10 s on ({} kB), the model says it is",
                    s.pmd_mapped_kb()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
            self.t.call(0)?;
        }
    }
}

/// The forked child (asleep): each page's code read back, its anonymous
/// copies by pagemap and smaps.  (Its PMD is not checked: nothing runs
/// there to fault it back in.)
fn check_child(pid: i32, addr: u64, pages: &[Page]) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).map_err(|e| e.to_string())?;
    let pagemap = proc::Pagemap::open(pid).map_err(|e| e.to_string())?;
    for (page, p) in pages.iter().enumerate() {
        let at = addr + (page * text::PAGE) as u64;
        let mut code = [0u8; 6];
        mem.read_exact_at(&mut code, at)
            .map_err(|e| e.to_string())?;
        let want = text::mov_eax_ret(Model::value_of(p, page));
        if code != want {
            return Err(format!(
                "page {page} holds {code:02x?}, the model says {want:02x?}"
            ));
        }
        let e = pagemap.entry(at).map_err(|e| e.to_string())?;
        if (e.present() && !e.file()) != p.copy {
            return Err(format!(
                "page {page}: anonymous copy {}, the model says {}",
                !p.copy, p.copy
            ));
        }
    }
    let anon = proc::smaps_entry(pid, addr)
        .map_err(|e| e.to_string())?
        .kb("Anonymous");
    let want = 4 * pages.iter().filter(|p| p.copy).count() as u64;
    if anon != want {
        return Err(format!(
            "{anon} kB anonymous in the text, the model says {want}"
        ));
    }
    Ok(())
}

impl Drop for System {
    fn drop(&mut self) {
        if let Some((pid, _)) = self.child {
            // SAFETY: kill(2) of the child the target forked for us.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A module call that failed with `errno` journaled why (debugfs
/// `events`: a step after `seen`, the journal's newest at the last look,
/// with that errno and a reason); the newest now.  (Read only after a
/// failure: reading the whole journal each step slowed the debug guest's
/// model threefold.)
fn journaled(op: &Op, seen: u64, errno: i32) -> u64 {
    let text = proc::debugfs("events").unwrap_or_else(|e| panic!("debugfs events: {e}"));
    let same = format!("-{}", hugepoke::errno_name(errno));
    let events = proc::parse_events(&text);
    let why = events
        .iter()
        .any(|e| e.seq > seen && e.result == same && !e.note.is_empty());
    assert!(why, "{op}: {same} with no reason in the journal");
    events.last().map_or(seen, |e| e.seq)
}

struct Test;

impl StateMachineTest for Test {
    type SystemUnderTest = System;
    type Reference = Reference;

    fn init_test(_: &Model) -> System {
        SEQUENCES.fetch_add(1, Relaxed);
        if std::env::var_os("HUGEPOKE_MODEL_TRACE").is_some() {
            eprintln!("-- sequence");
        }
        let open = || Device::open().expect("/dev/hugepoke");
        let t = Target::spawn(&["--file", &model_file()]).expect("thp-target");
        System {
            t,
            child: None,
            ctl: (0..CONTROLLERS).map(|_| open()).collect(),
            real: Vec::new(),
            probe: None,
            seen: hugepoke::device::journal_seq(),
        }
    }

    fn apply(mut sys: System, model: &Model, op: Op) -> System {
        STEPS.fetch_add(1, Relaxed);
        *MIX.lock().unwrap().entry(op.kind()).or_default() += 1;
        let got = sys.call(model, &op);
        if std::env::var_os("HUGEPOKE_MODEL_TRACE").is_some() {
            eprintln!("{op} -> {got:?}");
        }
        let got = got.err().unwrap_or(0);
        let name = |e: i32| {
            if e == 0 {
                "ok"
            } else {
                hugepoke::errno_name(e)
            }
        };
        assert!(
            got == model.expect,
            "{op}: returned {}, the model says {}",
            name(got),
            name(model.expect)
        );
        if got > 0 {
            sys.seen = journaled(&op, sys.seen, got);
        }
        if let Err(e) = sys.check(model) {
            panic!("after {op}: {e}");
        }
        sys
    }

    fn teardown(mut sys: System, model: Model) {
        // The int3 first: RESTORE refuses a byte it did not write.
        sys.probe = None;
        // Persistent patches outlive their files: restore them, in a text
        // made text again (RESTORE refuses a writable mapping: such a
        // patch was left behind, its target killed, until guest-checks
        // read the module's counters after the model).  Each must go; a
        // hole's sites are forgotten (ENXIO).
        if model.writable {
            let r = sys.t.command("protect rx");
            assert!(r == Ok("protected 0".into()), "teardown: protect rx: {r:?}");
        }
        for (id, h) in model.handles.iter().enumerate() {
            if h.live {
                let r = sys.ctl[h.ctl as usize].restore(sys.real[id]);
                let e = r.err().and_then(|e| e.raw_os_error());
                // ENXIO only for a patch with a site in the hole.
                let hole = model.unmapped
                    && !h.gone
                    && model.pages[UNMAPPED as usize]
                        .patch
                        .is_some_and(|(p, _)| p == id);
                assert!(
                    e.is_none() || (hole && e == Some(libc::ENXIO)),
                    "teardown: restore h{id}: {}",
                    hugepoke::errno_name(e.unwrap_or(0))
                );
            }
        }
        let listed = proc::listed_handles().unwrap_or_else(|e| panic!("teardown: {e}"));
        let left: Vec<&u64> = sys.real.iter().filter(|h| listed.contains(h)).collect();
        assert!(left.is_empty(), "teardown: handles {left:?} still listed");
        // Every patch gone: the target runs the file's code everywhere.
        for page in 0..PAGES as usize {
            if !(model.unmapped && page == UNMAPPED as usize) {
                let v = sys.t.call(page);
                assert!(
                    v == Ok(text::original_value(page)),
                    "teardown: page {page} returns {v:?} with every patch restored"
                );
            }
        }
    }
}

fn run(ops: Vec<Op>) -> Result<(), String> {
    let r = std::panic::catch_unwind(|| {
        let model = <Reference as ReferenceStateMachine>::init_state()
            .new_tree(&mut TestRunner::deterministic())
            .unwrap()
            .current();
        Test::test_sequential(Config::default(), model, ops, None);
    });
    r.map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "panic".into())
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let seconds: u64 = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(20);
    let seed: u64 = arg("--seed")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    // MADV_PAGEOUT (Op::PageOut) needs somewhere to put a copy.
    let _swap = hugepoke::testkit::backing::Swap::on().unwrap_or_else(|e| {
        eprintln!("hugepoke-model: no swap: {e}");
        std::process::exit(2)
    });
    std::panic::set_hook(Box::new(|_| {}));
    let failure = if let Some(replay) = arg("--replay") {
        let ops: Option<Vec<Op>> = replay
            .split(';')
            .filter(|s| !s.trim().is_empty())
            .map(parse_op)
            .collect();
        let Some(ops) = ops else {
            eprintln!("hugepoke-model: cannot parse --replay {replay:?}");
            std::process::exit(2);
        };
        // Each step must be one the generator could have made.
        let mut model = Model {
            pmd: true,
            ..Model::default()
        };
        for op in &ops {
            if !Reference::preconditions(&model, op) {
                eprintln!("hugepoke-model: --replay: {op} cannot come here (no such handle, or a live one)");
                std::process::exit(2);
            }
            model = Reference::apply(model, op);
        }
        run(ops.clone()).err().map(|e| (e, ops))
    } else {
        println!("# seed {seed}");
        replay_found().or_else(|| explore(seed, Duration::from_secs(seconds)))
    };
    let mix: Vec<String> = MIX
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!(
        "# model: {} sequences, {} steps, {} failures (mix: {})",
        SEQUENCES.load(Relaxed),
        STEPS.load(Relaxed),
        failure.is_some() as u32,
        mix.join(", ")
    );
    if let Some((why, ops)) = failure {
        let ops: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
        println!("# failure: {why}");
        println!(
            "# shrunk to {} steps; replay: hugepoke-model --replay '{}'",
            ops.len(),
            ops.join("; ")
        );
        std::process::exit(1);
    }
}

/// The sequences of [`FOUND`]; the first that fails.
fn replay_found() -> Option<(String, Vec<Op>)> {
    FOUND.iter().find_map(|found| {
        let ops: Vec<Op> = found.split(';').filter_map(parse_op).collect();
        run(ops.clone()).err().map(|e| (e, ops))
    })
}

/// Random sequences until `limit`; the first failure, shrunk.
fn explore(seed: u64, limit: Duration) -> Option<(String, Vec<Op>)> {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases: 1,
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    };
    // A runner runs `cases` cases in all, over all its runs: one runner a
    // sequence, each with its own generator drawn from the seeded one.
    let mut seeds = TestRunner::new_with_rng(
        config.clone(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let strategy = Reference::sequential_strategy(1..24);
    let begin = Instant::now();
    while begin.elapsed() < limit {
        let mut runner = TestRunner::new_with_rng(config.clone(), seeds.new_rng());
        let result = runner.run(&strategy, |(model, ops, seen)| {
            Test::test_sequential(Config::default(), model, ops, seen);
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(TestError::Fail(why, (_, ops, _))) => {
                return Some((why.message().to_string(), ops))
            }
            Err(TestError::Abort(why)) => {
                return Some((format!("aborted: {}", why.message()), Vec::new()))
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_found_sequence_parses_and_can_be_generated() {
        for found in FOUND {
            let ops: Vec<Op> = found.split(';').filter_map(parse_op).collect();
            assert_eq!(ops.len(), found.split(';').count(), "{found}");
            let mut m = Model {
                pmd: true,
                ..Model::default()
            };
            for op in &ops {
                assert!(Reference::preconditions(&m, op), "{found}: {op}");
                m = Reference::apply(m, op);
            }
        }
    }

    #[test]
    fn a_forked_copy_that_runs_no_patch_stays_in_the_child() {
        let mut m = Model {
            pmd: true,
            ..Model::default()
        };
        for op in FOUND[0].split(';').filter_map(parse_op) {
            m = Reference::apply(m, &op);
        }
        let child = m.child.unwrap();
        assert_eq!((m.expect, m.pages[1], m.pmd), (0, Page::default(), true));
        assert_eq!((child[1].copy, child[1].patch), (true, None));
    }

    fn applied(ops: &[Op]) -> Model {
        let mut m = Model {
            pmd: true,
            ..Model::default()
        };
        for op in ops {
            assert!(Reference::preconditions(&m, op), "{op}");
            m = Reference::apply(m, op);
        }
        m
    }

    #[test]
    fn a_hole_forgets_its_sites_with_enxio_and_keeps_the_pmd_away() {
        let batch = Op::Batch {
            ctl: 0,
            pages: vec![1, UNMAPPED],
            value: 9,
            persist: false,
        };
        let m = applied(&[
            batch,
            Op::Unmap,
            Op::Restore {
                id: 0,
                other: false,
            },
        ]);
        assert_eq!(
            (m.expect, m.handles[0].live, m.pages[1], m.pmd),
            (libc::ENXIO, false, Page::default(), false)
        );
        assert!(!Reference::preconditions(&m, &Op::Move));
        assert!(!Reference::preconditions(
            &m,
            &Op::MemWrite { page: UNMAPPED }
        ));
    }

    #[test]
    fn exec_leaves_the_handles_to_a_restore_that_writes_nothing() {
        let patch = Op::Patch {
            ctl: 1,
            page: 2,
            value: 3,
            persist: true,
        };
        let m = applied(&[patch.clone(), Op::Exec]);
        assert_eq!(
            (m.handles[0].live, m.value(2), m.pmd),
            (true, text::original_value(2), true)
        );
        let m = applied(&[
            patch.clone(),
            Op::Exec,
            patch,
            Op::Restore {
                id: 0,
                other: false,
            },
        ]);
        assert_eq!((m.expect, m.value(2), m.pmd), (0, 2003, false));
    }

    #[test]
    fn a_uprobe_over_a_patch_runs_the_file_and_holds_restore_off() {
        let patch = Op::Patch {
            ctl: 0,
            page: 1,
            value: 4,
            persist: false,
        };
        let restore = Op::Restore {
            id: 0,
            other: false,
        };
        let m = applied(&[patch.clone(), Op::Probe { page: 1 }, restore.clone()]);
        assert_eq!(
            (m.expect, m.value(1), m.handles[0].live),
            (libc::EILSEQ, text::original_value(1), true)
        );
        let m = applied(&[patch.clone(), Op::Probe { page: 1 }, Op::Reopen { ctl: 0 }]);
        assert_eq!((m.handles[0].live, m.handles[0].persist), (true, true));
        let m = applied(&[patch, Op::Probe { page: 1 }, Op::Unprobe]);
        assert_eq!((m.value(1), m.pages[1].copy), (2004, true));
        let m = applied(&[Op::Probe { page: 2 }, Op::Collapse]);
        assert!(m.pages[2].copy && !m.pmd, "COLLAPSE keeps the int3's copy");
        let m = applied(&[
            Op::Probe { page: 2 },
            Op::Collapse,
            Op::Unprobe,
            Op::Collapse,
        ]);
        assert!(m.pages[2] == Page::default() && m.pmd);
        assert!(!Reference::preconditions(
            &applied(&[Op::Probe { page: 0 }]),
            &Op::Fork
        ));
    }

    #[test]
    fn a_page_dropped_while_parked_is_dropped_before_the_call_but_where_it_was_done() {
        let batch = |pages: Vec<u8>| Op::Batch {
            ctl: 0,
            pages,
            value: 1,
            persist: false,
        };
        let paused = |at, page, call| Op::Paused {
            at,
            page,
            call: Box::new(call),
        };
        // Dropped after the first page was written: that patch is gone.
        let m = applied(&[paused(At::Written, 1, batch(vec![1, 2]))]);
        assert_eq!(
            (m.expect, m.value(1), m.value(2)),
            (0, text::original_value(1), 2001)
        );
        assert!(m.handles[0].live && !m.pages[1].copy && m.pages[2].copy);
        // Dropped before the page was written: the patch runs.
        let m = applied(&[paused(At::Written, 2, batch(vec![1, 2]))]);
        assert_eq!((m.value(1), m.value(2)), (2001, 2001));
        let m = applied(&[paused(At::Cowed, 1, batch(vec![1]))]);
        assert_eq!((m.expect, m.value(1)), (0, 2001));
        // Between RESTORE's passes: EAGAIN, the rest still patched.
        let restore = Op::Restore {
            id: 0,
            other: false,
        };
        let m = applied(&[batch(vec![1, 2]), paused(At::Located, 2, restore.clone())]);
        assert_eq!(
            (m.expect, m.handles[0].live, m.value(1), m.pages[2].copy),
            (libc::EAGAIN, true, 2001, false)
        );
        let m = applied(&[batch(vec![1, 2]), paused(At::Located, 3, restore.clone())]);
        assert_eq!((m.expect, m.handles[0].live, m.pmd), (0, false, true));
        let m = applied(&[batch(vec![1, 2]), paused(At::Restore, 2, restore.clone())]);
        assert_eq!((m.expect, m.handles[0].live, m.pmd), (0, false, true));
        // Only a call that succeeds parks.
        let m = applied(&[batch(vec![1])]);
        assert!(!Reference::preconditions(
            &m,
            &paused(At::Checked, 0, batch(vec![1]))
        ));
        let m = applied(&[batch(vec![1]), restore.clone()]);
        assert!(!Reference::preconditions(
            &m,
            &paused(At::Restore, 0, restore)
        ));
    }

    #[test]
    fn nobody_restores_only_through_the_file_that_made_a_patch_that_dies_with_it() {
        let patch = |persist| Op::Patch {
            ctl: 0,
            page: 1,
            value: 2,
            persist,
        };
        let user = |other| Op::UserRestore { id: 0, other };
        let m = applied(&[patch(false), user(true)]);
        assert_eq!(
            (m.expect, m.handles[0].live, m.value(1)),
            (libc::EPERM, true, 2002)
        );
        let m = applied(&[patch(true), user(false)]);
        assert_eq!((m.expect, m.handles[0].live), (libc::EPERM, true));
        let m = applied(&[patch(false), user(false)]);
        assert_eq!((m.expect, m.handles[0].live, m.pmd), (0, false, true));
        let m = applied(&[patch(false), user(false), user(true)]);
        assert_eq!(m.expect, libc::ENOENT);
    }

    #[test]
    fn a_printed_sequence_replays_as_itself() {
        let ops = vec![
            Op::Patch {
                ctl: 1,
                page: 2,
                value: 7,
                persist: true,
            },
            Op::Batch {
                ctl: 0,
                pages: vec![0, 3],
                value: 255,
                persist: false,
            },
            Op::Restore { id: 1, other: true },
            Op::UserRestore { id: 0, other: true },
            Op::UserRestore {
                id: 2,
                other: false,
            },
            Op::Query { id: 0 },
            Op::Reopen { ctl: 1 },
            Op::DontNeed { page: 3 },
            Op::MemWrite { page: 0 },
            Op::Collapse,
            Op::Protect { writable: true },
            Op::Protect { writable: false },
            Op::Move,
            Op::Fork,
            Op::PageOut { page: 2 },
            Op::Unmap,
            Op::Exec,
            Op::Probe { page: 3 },
            Op::Unprobe,
            Op::Paused {
                at: At::Located,
                page: 1,
                call: Box::new(Op::Restore { id: 0, other: true }),
            },
            Op::Paused {
                at: At::Written,
                page: 0,
                call: Box::new(Op::Batch {
                    ctl: 1,
                    pages: vec![0, 2],
                    value: 3,
                    persist: true,
                }),
            },
        ];
        let printed: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
        let parsed: Vec<Op> = printed
            .join("; ")
            .split(';')
            .map(|s| parse_op(s).unwrap())
            .collect();
        assert_eq!(parsed, ops);
    }

    #[test]
    fn the_model_refuses_overlaps_and_settles_what_a_closed_file_leaves() {
        let mut m = Model {
            pmd: true,
            ..Model::default()
        };
        m = Reference::apply(
            m,
            &Op::Patch {
                ctl: 0,
                page: 1,
                value: 5,
                persist: false,
            },
        );
        assert_eq!((m.expect, m.value(1), m.pmd), (0, 2005, false));
        m = Reference::apply(
            m,
            &Op::Batch {
                ctl: 1,
                pages: vec![0, 1],
                value: 6,
                persist: true,
            },
        );
        assert_eq!(
            (m.expect, m.value(0)),
            (libc::EBUSY, text::original_value(0))
        );
        m = Reference::apply(
            m,
            &Op::Batch {
                ctl: 1,
                pages: vec![0, 2],
                value: 6,
                persist: true,
            },
        );
        m = Reference::apply(m, &Op::Reopen { ctl: 0 });
        assert_eq!(
            (m.value(1), m.handles[0].live, m.value(2)),
            (text::original_value(1), false, 2006)
        );
        assert!(!m.pmd, "a persistent patch is left");
        m = Reference::apply(m, &Op::DontNeed { page: 2 });
        assert_eq!(m.value(2), text::original_value(2));
        m = Reference::apply(
            m,
            &Op::Restore {
                id: 1,
                other: false,
            },
        );
        assert_eq!((m.expect, m.pmd), (0, true));
        m = Reference::apply(
            m,
            &Op::Restore {
                id: 1,
                other: false,
            },
        );
        assert_eq!(m.expect, libc::ENOENT);
    }
}

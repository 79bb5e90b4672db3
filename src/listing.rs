// SPDX-License-Identifier: GPL-2.0

//! The `patches` file in debugfs: every live patch, one target at a time;
//! `files`: every PATCH_FILE handle with its processes' handles; and
//! `forked`: the processes forked from each patch's target that run it.
//! (`events` and `stats` are the journal's; `module` wires the files.)

use core::fmt;
use kernel::{prelude::*, sync::Arc};

use crate::{
    engine,
    target::{Registry, Target},
    uapi, Hugepoke,
};

/// `files` in debugfs: each PATCH_FILE handle, its owner and the handles
/// of its processes' patches (each listed in `patches` with its pid).
/// Written under the registry lock (a leaf: nothing here sleeps).
pub(crate) fn write_files(registry: &Registry, f: &mut impl fmt::Write) -> fmt::Result {
    writeln!(f, "# handle owner handles")?;
    for (handle, file) in registry.file_handles() {
        write!(f, "{handle} ")?;
        match file.owner {
            Some(o) => write!(f, "file:{o}")?,
            None => write!(f, "persistent")?,
        }
        for m in file.members.iter() {
            write!(f, " {m}")?;
        }
        writeln!(f)?;
    }
    Ok(())
}

/// `patches` in debugfs, one target at a time.
pub(crate) fn write_patches(targets: &[Arc<Target>], f: &mut impl fmt::Write) -> fmt::Result {
    writeln!(
        f,
        "# handle pid addr len state pfn owner pmd_mappable bytes orig site"
    )?;
    for t in targets {
        let gone = t.gone();
        // A target busy in a long PATCH or RESTORE (GUP can wait on a
        // fault) must not hold up this reader, nor anything behind it; a
        // short holder (QUERY, a collapse) is waited out for a moment.
        let state = (0..50).find_map(|_| {
            let locked = t.state.try_lock();
            if locked.is_none() {
                kernel::time::delay::fsleep(kernel::time::Delta::from_millis(2));
            }
            locked
        });
        let Some(state) = state else {
            writeln!(f, "# a target is busy (PATCH, RESTORE or collapse running): its patches are not listed")?;
            continue;
        };
        for p in state.patches.iter() {
            write!(
                f,
                "{} {} {:#x} {} {} {:#x} ",
                p.handle,
                p.pid,
                p.addr,
                p.len,
                match p.state(gone) {
                    uapi::STATE_GONE => "gone",
                    uapi::STATE_FORKED_ONLY => "forked-only",
                    _ => "live",
                },
                p.pfn
            )?;
            match p.owner {
                Some(o) => write!(f, "file:{o} ")?,
                None => write!(f, "persistent ")?,
            }
            write!(f, "{} ", if p.pmd_mappable { "yes" } else { "no" })?;
            write_hex(f, &p.bytes[..p.len])?;
            write!(f, " ")?;
            write_hex(f, &p.orig[..p.len])?;
            writeln!(f, " {}/{}", p.index, state.patches.count(p.handle))?;
        }
    }
    Ok(())
}

/// `forked` in debugfs: each handle whose target forked processes that
/// run its patch now (QUERY_FORKED's answer), with their pids.  Each
/// target's state is waited for (killable), and each process's mmap lock
/// is taken in turn, as RESTORE takes them.
pub(crate) fn write_forked(
    hp: &Hugepoke,
    targets: &[Arc<Target>],
    f: &mut impl fmt::Write,
) -> fmt::Result {
    writeln!(f, "# handle pids")?;
    for t in targets {
        let mut handles = KVec::new();
        if let Ok(state) = crate::sys::lock_killable(&t.state) {
            let mut next = state.patches.next_handle_of(None, 0);
            while let Some(h) = next {
                if handles.push(h, GFP_KERNEL).is_err() {
                    break;
                }
                next = state.patches.next_handle_of(None, h + 1);
            }
        }
        for h in handles {
            let mut pids = KVec::<i32>::new();
            if engine::forked_of(hp, t, h, &mut pids).is_err() || pids.is_empty() {
                // mutant: debugfs-forked-empty
                continue;
            }
            write!(f, "{h}")?;
            for p in pids.iter() {
                write!(f, " {p}")?;
            }
            writeln!(f)?;
        }
    }
    Ok(())
}

pub(crate) fn write_hex(f: &mut impl fmt::Write, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

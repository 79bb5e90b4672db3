//! `hugepoke list`: debugfs `patches`, with each patch's symbol+offset
//! added, then the file patches of debugfs `files` with their processes,
//! then the processes forked from a target that run its patch (`forked`).

use super::{describe, print_json};
use crate::CliError;
use hugepoke::symbols::{self, Object};
use hugepoke::{device, proc, report};
use std::io::{self, Write};

pub fn exec(json: bool) -> Result<(), CliError> {
    let seq = device::journal_seq();
    let text = proc::debugfs("patches").map_err(|e| CliError::kernel("patches", e, seq, None))?;
    let mut p = report::parse_patches(&text);
    let mut objects: Vec<(i32, Vec<Object>)> = Vec::new();
    for l in &mut p.patches {
        if !objects.iter().any(|(pid, _)| *pid == l.pid) {
            objects.push((l.pid, symbols::objects(l.pid).unwrap_or_default()));
        }
        let objs = &objects.iter().find(|(pid, _)| *pid == l.pid).unwrap().1;
        l.symbol = describe(objs, l.addr);
    }
    // (A module without `files` has no file patches.)
    p.files = report::parse_files(&proc::debugfs("files").unwrap_or_default());
    for f in &mut p.files {
        for l in p.patches.iter().filter(|l| f.handles.contains(&l.handle)) {
            if !f.pids.contains(&l.pid) {
                f.pids.push(l.pid);
            }
        }
        f.pids.sort_unstable();
    }
    // (A module without `forked` lists none.)
    p.forked = report::parse_forked(&proc::debugfs("forked").unwrap_or_default());
    if json {
        print_json(&p);
        return Ok(());
    }
    let mut out = io::stdout().lock();
    let header = if p.header.is_empty() {
        "# handle pid addr len state pfn owner pmd_mappable bytes orig"
    } else {
        &p.header
    };
    let _ = writeln!(out, "{header} symbol");
    for l in &p.patches {
        let _ = writeln!(out, "{} {}", l.raw, l.symbol.as_deref().unwrap_or("-"));
    }
    for o in &p.other {
        let _ = writeln!(out, "{o}");
    }
    for f in &p.files {
        let join = |v: Vec<String>| v.join(" ");
        let _ = writeln!(
            out,
            "# file patch {} {}: handles {}; pids {}",
            f.handle,
            f.owner,
            join(f.handles.iter().map(u64::to_string).collect()),
            join(f.pids.iter().map(i32::to_string).collect())
        );
    }
    for f in &p.forked {
        let pids: Vec<String> = f.pids.iter().map(i32::to_string).collect();
        let _ = writeln!(
            out,
            "# forked from handle {}: pids {}",
            f.handle,
            pids.join(" ")
        );
    }
    Ok(())
}

//! `hugepoke list`: debugfs `patches`, with each patch's symbol+offset added.

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
    Ok(())
}

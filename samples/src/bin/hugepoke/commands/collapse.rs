//! `hugepoke collapse --pid PID`: MADV_COLLAPSE over a process's
//! executable file mappings, a report per mapping.

use super::print_json;
use crate::CliError;
use clap::Args;
use hugepoke::{collapse, errno_name};
use serde::Serialize;

#[derive(Args)]
pub struct CollapseArgs {
    /// The process.
    #[arg(long)]
    pid: i32,
}

/// One mapping of `collapse --json`.
#[derive(Serialize)]
struct CollapseOut<'a> {
    start: u64,
    end: u64,
    perms: &'a str,
    path: &'a str,
    fs: &'a str,
    /// 2 MiB ranges a PMD could map, and how many MADV_COLLAPSE collapsed.
    ranges: u64,
    collapsed: u64,
    /// The refused ranges: `{"range": start, "errno": "EINVAL"}`.
    failures: Vec<serde_json::Value>,
    pmd_kb: u64,
    why_not: Option<&'a str>,
    /// The plain line.
    summary: String,
}

pub fn exec(args: CollapseArgs, json: bool) -> Result<(), CliError> {
    let reports =
        collapse::collapse(args.pid).map_err(|e| CliError::Failed(format!("collapse: {e}")))?;
    if json {
        let out: Vec<CollapseOut> = reports
            .iter()
            .map(|r| CollapseOut {
                start: r.mapping.start,
                end: r.mapping.end,
                perms: &r.mapping.perms,
                path: &r.mapping.path,
                fs: &r.fs,
                ranges: r.ranges,
                collapsed: r.collapsed,
                failures: r
                    .failures
                    .iter()
                    .map(|(a, e)| serde_json::json!({ "range": a, "errno": errno_name(*e) }))
                    .collect(),
                pmd_kb: r.pmd_kb,
                why_not: r.why_not.as_deref(),
                summary: collapse::report_line(r),
            })
            .collect();
        print_json(&out);
    } else {
        for r in &reports {
            println!("{}", collapse::report_line(r));
        }
    }
    // A refused range is in the report already.
    if reports.iter().any(|r| !r.failures.is_empty()) {
        return Err(CliError::Reported);
    }
    Ok(())
}

//! `hugepoke collapse --pid PID`: the PMD back over a process's executable
//! file mappings — other tools' copies equal to the page cache dropped by
//! the module, then the range collapsed — a report per mapping and per
//! range that dropped or kept something.

use super::print_json;
use crate::CliError;
use clap::Args;
use hugepoke::{collapse, errno_name};
use serde::Serialize;

#[derive(Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["pid", "file"]))]
pub struct CollapseArgs {
    /// The process.
    #[arg(long)]
    pid: Option<i32>,
    /// Every process that maps this file privately and executably now.
    #[arg(long)]
    file: Option<String>,
}

/// One mapping of `collapse --json`.
#[derive(Serialize)]
struct CollapseOut<'a> {
    pid: i32,
    start: u64,
    end: u64,
    perms: &'a str,
    path: &'a str,
    fs: &'a str,
    /// 2 MiB ranges a PMD could map, and how many a PMD maps now.
    ranges: u64,
    collapsed: u64,
    /// Every range: `{"range", "collapsed", "dropped", "kept": {...},
    /// "module_errno", "madvise_errno", "why_not"}`.
    range_reports: Vec<serde_json::Value>,
    pmd_kb: u64,
    why_not: Option<&'a str>,
    /// The plain line.
    summary: String,
}

pub fn exec(args: CollapseArgs, json: bool) -> Result<(), CliError> {
    let failed = |e| CliError::Failed(format!("collapse: {e}"));
    let (reports, unreadable) = match (args.pid, &args.file) {
        (Some(pid), _) => (vec![(pid, collapse::collapse(pid).map_err(failed)?)], 0),
        (None, Some(path)) => {
            let f = collapse::collapse_file(path).map_err(failed)?;
            if f.processes.is_empty() {
                return Err(CliError::Failed(format!(
                    "collapse: no process maps {path} privately and executably ({} processes' maps could not be read)",
                    f.unreadable
                )));
            }
            (f.processes, f.unreadable)
        }
        (None, None) => unreachable!("clap requires --pid or --file"),
    };
    if json {
        let out: Vec<CollapseOut> = reports
            .iter()
            .flat_map(|(pid, rs)| rs.iter().map(move |r| (*pid, r)))
            .map(|(pid, r)| CollapseOut {
                pid,
                start: r.mapping.start,
                end: r.mapping.end,
                perms: &r.mapping.perms,
                path: &r.mapping.path,
                fs: &r.fs,
                ranges: r.ranges,
                collapsed: r.collapsed,
                range_reports: r
                    .range_reports
                    .iter()
                    .map(|x| range_json(x, &r.fs))
                    .collect(),
                pmd_kb: r.pmd_kb,
                why_not: r.why_not.as_deref(),
                summary: collapse::report_line(r),
            })
            .collect();
        print_json(&out);
    } else {
        print_plain(&reports, args.file.is_some(), unreadable);
    }
    // Every range a PMD could map is PMD-mapped, or exit 1 (the report says why).
    if reports.iter().any(|(_, rs)| rs.iter().any(|r| !r.done())) {
        return Err(CliError::Reported);
    }
    Ok(())
}

/// The plain report; with `--file`, each process's lines under its pid
/// (processes that map the file later are not touched: said last).
fn print_plain(reports: &[(i32, Vec<collapse::MappingReport>)], by_file: bool, unreadable: usize) {
    for (pid, rs) in reports {
        if by_file {
            println!("pid {pid}:");
        }
        for r in rs {
            for line in collapse::report_lines(r) {
                println!("{line}");
            }
        }
    }
    if by_file {
        println!(
            "{} process(es) mapped the file ({unreadable} processes' maps could not be read: gone, or not ours to read); processes that map it later are not collapsed",
            reports.len()
        );
    }
}

fn range_json(r: &collapse::RangeReport, fs: &str) -> serde_json::Value {
    let m = r.module.unwrap_or_default();
    serde_json::json!({
        "range": r.start,
        "collapsed": r.collapsed,
        "dropped": m.dropped,
        "kept": {
            "differs": m.kept_differs,
            "pinned": m.kept_pinned,
            "uffd": m.kept_uffd,
            "patched": m.kept_patched,
            "no_cache": m.kept_no_cache,
            "first": m.first_kept,
        },
        "module_errno": r.module_errno.map(errno_name),
        "madvise_errno": r.madvise_errno.map(errno_name),
        "why_not": (!r.collapsed).then(|| collapse::range_line(r, fs)),
    })
}

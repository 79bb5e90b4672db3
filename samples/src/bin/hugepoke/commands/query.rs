//! `hugepoke query HANDLE`: one patch, every site of a batch (and of a
//! file patch, in every process), and the processes forked while it lived
//! that run it too.

use super::{number, open_device, print_json};
use crate::CliError;
use clap::Args;
use hugepoke::report::hex;
use hugepoke::{device, uapi};
use serde::Serialize;

#[derive(Args)]
pub struct QueryArgs {
    /// The handle PATCH printed.
    #[arg(value_parser = number)]
    handle: u64,
}

/// What `query --json` prints.
#[derive(Serialize)]
struct QueryOut {
    handle: u64,
    /// `live`, or `gone` once the target has exited.
    state: &'static str,
    pid: i32,
    /// How many sites the handle has (1 for a single PATCH).
    count: u32,
    sites: Vec<QuerySite>,
    /// The processes forked while the patch lived that run it now (they
    /// share its copy; RESTORE restores them too).
    forked: Vec<i32>,
}

#[derive(Serialize)]
struct QuerySite {
    /// The process this site is patched in (a file patch has several).
    pid: i32,
    site: u32,
    addr: u64,
    len: u32,
    /// The PATCH_* flags the site was made with.
    flags: u32,
    /// The anonymous page that holds it.
    pfn: u64,
    bytes: String,
    orig: String,
}

pub fn exec(args: QueryArgs, json: bool) -> Result<(), CliError> {
    let handle = args.handle;
    let seq = device::journal_seq();
    let dev = open_device(seq)?;
    let failed = |e| CliError::kernel("query", e, seq, None);
    let first = dev.query(handle).map_err(failed)?;
    let mut sites = Vec::new();
    for index in 0..first.count.max(1) {
        let q = if index == 0 {
            first
        } else {
            dev.query_site(handle, index).map_err(failed)?
        };
        let n = (q.len as usize).min(uapi::MAX_BYTES);
        sites.push(QuerySite {
            pid: q.pid,
            site: q.site,
            addr: q.addr,
            len: q.len,
            flags: q.patch_flags,
            pfn: q.pfn,
            bytes: hex(&q.bytes[..n]),
            orig: hex(&q.orig[..n]),
        });
    }
    let out = QueryOut {
        handle,
        state: match first.state {
            uapi::STATE_LIVE => "live",
            uapi::STATE_FORKED_ONLY => "forked-only",
            _ => "gone",
        },
        pid: first.pid,
        count: first.count.max(1),
        sites,
        // The sites are the answer; who else runs them is a note if it fails.
        forked: dev.query_forked(handle).unwrap_or_else(|e| {
            eprintln!(
                "hugepoke: query: the processes forked since the patch could not be listed: {e}"
            );
            Vec::new()
        }),
    };
    if json {
        print_json(&out);
        return Ok(());
    }
    for s in &out.sites {
        println!(
            "handle={handle} state={} pid={} addr={:#x} len={} flags={:#x} pfn={:#x} bytes={} orig={} site={}/{}",
            out.state, s.pid, s.addr, s.len, s.flags, s.pfn, s.bytes, s.orig, s.site, out.count
        );
    }
    if !out.forked.is_empty() {
        let pids: Vec<String> = out.forked.iter().map(i32::to_string).collect();
        println!("handle={handle} forked={}", pids.join(","));
    }
    Ok(())
}

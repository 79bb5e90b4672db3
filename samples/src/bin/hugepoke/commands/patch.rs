//! `hugepoke patch`: one site from the command line, or many from
//! `--sites FILE` in one PATCH_BATCH; each resolved, checked
//! (hugepoke::decode::check_patch), then patched all or none.

use super::{describe, hex_arg, number, print_json, Hex};
use crate::CliError;
use clap::Args;
use hugepoke::decode::check_patch;
use hugepoke::device::{self, Device};
use hugepoke::parse_hex_bytes;
use hugepoke::report::{hex, PatchOut, SiteOut};
use hugepoke::sites::{self, Place, Site};
use hugepoke::symbols;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct PatchArgs {
    /// The target process.
    #[arg(long, required_unless_present = "file", conflicts_with = "file")]
    pid: Option<i32>,
    /// Patch this file's text in every process that maps it now, all or
    /// none, under one handle (CAP_SYS_ADMIN); --symbol is the file's own,
    /// numbers in --sites are file offsets.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["object", "addr"])]
    pub(super) file: Option<PathBuf>,
    /// With --file: the file offset to patch (0x… or decimal).
    #[arg(long, value_parser = number, requires = "file", conflicts_with = "symbol")]
    offset: Option<u64>,
    /// The address to patch (0x… or decimal).
    #[arg(long, value_parser = number, required_unless_present_any = ["symbol", "sites", "offset"], conflicts_with = "symbol")]
    addr: Option<u64>,
    /// The function to patch: NAME, NAME+OFFSET, NAME@VERSION, from .symtab or .dynsym.
    #[arg(long)]
    symbol: Option<String>,
    /// Which mapped object defines --symbol (or the sites' symbols): a path or a basename (`libc`, `libc.so.6`).
    #[arg(long)]
    object: Option<String>,
    /// The new bytes in hex, 1-16 of them, spaces allowed: "b8 2a 00 00 00 c3".
    #[arg(long, value_parser = hex_arg, required_unless_present = "sites")]
    bytes: Option<Hex>,
    /// Refuse (EILSEQ) unless these bytes are there now.
    #[arg(long, value_parser = hex_arg)]
    expect: Option<Hex>,
    /// Patch many sites at once, all or none (PATCH_BATCH), from FILE (`-`: stdin): a line `ADDR|SYMBOL BYTES [EXPECT]` each.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["addr", "offset", "symbol", "bytes", "expect"])]
    sites: Option<PathBuf>,
    /// Keep the patch after this command exits (until `restore` or module unload).
    #[arg(long)]
    pub(super) persist: bool,
    /// Have the collapse after RESTORE install the PMD at once, not at the next fault.
    #[arg(long)]
    pub(super) install_pmd: bool,
    /// Patch even where the instruction check refuses.
    #[arg(long)]
    pub(super) force: bool,
    /// Patch even over bytes another tool changed (a debugger's or uprobe's
    /// breakpoint: they differ from the file's); RESTORE puts those bytes back.
    #[arg(long)]
    pub(super) over_changed: bool,
    /// Show the old and new instructions and what the check says; patch nothing.
    #[arg(long)]
    pub(super) dry_run: bool,
    /// With --sites: what the check says of every site (without it, only
    /// of the sites with a warning or a refusal, then a summary).
    #[arg(long)]
    pub(super) verbose: bool,
}

/// The `PATCH_*` flags of the whole request.
pub(super) fn patch_flags(args: &PatchArgs) -> u32 {
    use hugepoke::uapi;
    [
        (args.persist, uapi::PATCH_PERSIST),
        (args.install_pmd, uapi::PATCH_INSTALL_PMD),
        (args.over_changed, uapi::PATCH_OVER_CHANGED),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .fold(0, |flags, (_, f)| flags | f)
}

/// Bytes as `b8 2a 00 00 00 c3`.
fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The sites to patch: those of `--sites FILE`, or the one of `--addr` or
/// `--symbol`, `--bytes` and `--expect`.
pub(super) fn sites_in(args: &PatchArgs) -> Result<Vec<Site>, CliError> {
    if let Some(path) = &args.sites {
        return sites::read(path).map_err(|e| CliError::Usage(format!("--sites {e}")));
    }
    let bytes = args
        .bytes
        .clone()
        .expect("clap requires --bytes without --sites")
        .0;
    let place = match (&args.symbol, args.addr.or(args.offset)) {
        (Some(sym), _) => Place::Symbol(sym.clone()),
        (None, Some(a)) => Place::Addr(a),
        (None, None) => unreachable!("clap requires --addr, --offset or --symbol"),
    };
    let expect = args.expect.clone().map(|h| h.0);
    if let Some(e) = &expect {
        if e.len() != bytes.len() {
            return Err(CliError::Usage(format!(
                "--expect has {} bytes and --bytes {}: they must be as long",
                e.len(),
                bytes.len()
            )));
        }
    }
    Ok(vec![Site {
        label: None,
        line: None,
        place,
        bytes,
        expect,
    }])
}

pub fn exec(args: PatchArgs, json: bool) -> Result<(), CliError> {
    if args.file.is_some() {
        return super::patch_file::exec(args, json);
    }
    let pid = args.pid.expect("clap requires --pid without --file");
    let from_stdin = args.sites.as_deref() == Some(Path::new("-"));
    let inputs = sites_in(&args)?;
    let any_symbol = inputs.iter().any(|s| matches!(s.place, Place::Symbol(_)));
    if args.object.is_some() && !any_symbol {
        return Err(CliError::Usage(
            "--object needs --symbol (or symbols in the sites file)".into(),
        ));
    }
    let objects = match symbols::objects(pid) {
        Ok(o) => o,
        Err(e) if any_symbol => return Err(CliError::Usage(e)),
        Err(_) => Vec::new(),
    };
    // What the check says goes to stdout with a plain --dry-run, else to
    // stderr (stdout holds only the handle or the JSON).
    let mut out: Box<dyn Write> = if args.dry_run && !json {
        Box::new(io::stdout())
    } else {
        Box::new(io::stderr())
    };

    // The same path for every site: resolve, check, settle the expected
    // bytes.  A sites file's detail only on request (or where it matters).
    let detail = args.verbose || args.sites.is_none();
    let mut sites_out = Vec::new();
    let (mut warned, mut forced) = (0, 0);
    for s in &inputs {
        let pre = s.prefix();
        let mut sink = io::sink();
        let shown: &mut dyn Write = if detail { &mut out } else { &mut sink };
        let addr = s
            .resolve(&objects, args.object.as_deref(), shown)
            .map_err(CliError::Usage)?;
        let check = check_patch(pid, args.force, &objects, addr, &s.bytes);
        check.write(addr, shown);
        let matters = !check.warnings.is_empty() || !check.refusals.is_empty();
        if matters && !detail {
            let _ = writeln!(
                out,
                "{pre}{}:",
                describe(&objects, addr).unwrap_or(format!("{addr:#x}"))
            );
            check.write(addr, &mut out);
        }
        warned += usize::from(!check.warnings.is_empty());
        forced += usize::from(!check.refusals.is_empty());
        if !check.refusals.is_empty() && !args.force {
            let _ = out.flush();
            return Err(CliError::Refused(format!(
                "{pre}the instruction check failed (see above; --force patches anyway)"
            )));
        }
        let expect = match (s.expect.clone(), check.here.clone()) {
            // --force leaves the verdict to the kernel, under the PT lock.
            (Some(e), Some(here)) if e != here && !args.force => {
                let what = if s.label.is_some() {
                    "EXPECT"
                } else {
                    "--expect"
                };
                return Err(CliError::Refused(format!(
                    "{pre}{what} {} is not what is there now ({})",
                    hex_bytes(&e),
                    hex_bytes(&here)
                )));
            }
            (Some(e), _) => Some(e),
            (None, here) => here,
        };
        sites_out.push(SiteOut {
            line: s.line,
            addr,
            symbol: describe(&objects, addr),
            len: s.bytes.len(),
            bytes: hex(&s.bytes),
            expect: expect.as_deref().map(hex),
            check,
        });
    }
    if !detail {
        let _ = writeln!(
            out,
            "{} sites checked: {warned} with a warning, {forced} patched over a refusal (--force); --verbose shows every site",
            sites_out.len()
        );
    }
    let mut result = PatchOut {
        handle: None,
        pid,
        persist: args.persist,
        dry_run: args.dry_run,
        sites: sites_out,
    };
    if args.dry_run {
        if json {
            print_json(&result);
        } else {
            let _ = writeln!(out, "dry run: nothing patched");
        }
        return Ok(());
    }
    drop(out);

    // Closing `dev` restores a patch without --persist: it lives to the end.
    let (dev, handle) = apply(&args, pid, &inputs, &result)?;
    result.handle = Some(handle);
    if json {
        print_json(&result);
    } else {
        println!("{handle}");
    }
    let _ = io::stdout().flush();
    if !args.persist {
        // Hold the patch until stdin closes (or, when stdin gave the
        // sites, until a signal ends us); closing the device restores it.
        if from_stdin {
            loop {
                // SAFETY: pause() only waits for a signal.
                unsafe { libc::pause() };
            }
        }
        let _ = io::stdin().read_to_end(&mut Vec::new());
    }
    drop(dev);
    Ok(())
}

/// Make the checked patch: PATCH for one site from the command line,
/// PATCH_BATCH for a sites file: the device it was made on, and its handle.
fn apply(
    args: &PatchArgs,
    pid: i32,
    inputs: &[Site],
    result: &PatchOut,
) -> Result<(Device, u64), CliError> {
    let seq = device::journal_seq();
    let dev = Device::open().map_err(|e| CliError::kernel("open /dev/hugepoke", e, seq, None))?;
    let sites: Vec<device::Site> = inputs
        .iter()
        .zip(&result.sites)
        .map(|(i, o)| device::Site {
            addr: o.addr,
            bytes: i.bytes.clone(),
            expect: o.expect.as_deref().and_then(parse_hex_bytes),
        })
        .collect();
    let batch = args.sites.is_some();
    let handle = dev
        .patch_sites(pid, &sites, batch, patch_flags(args))
        .map_err(|e| {
            let what = match e.failed {
                Some(i) if i < inputs.len() => {
                    format!("patch: site {i} ({}, {:#x})", inputs[i].label.as_deref().unwrap_or("?"), result.sites[i].addr)
                }
                Some(i) => format!("patch: site {i}"),
                None => "patch".into(),
            };
            if let Some(h) = e.kept {
                eprintln!("hugepoke: patch: the sites the kernel could not undo stay patched, persistent, under handle {h} (hugepoke restore {h})");
            }
            CliError::kernel(&what, e.error, seq, Some(pid))
        })?;
    Ok((dev, handle))
}

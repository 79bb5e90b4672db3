//! `hugepoke patch --file PATH`: the sites of a file's text (by symbol of
//! the file's own ELF, or by file offset) patched in every process that
//! maps it when the call runs, all or none, under one handle (PATCH_FILE).
//! The instruction check runs in the first of those processes; the
//! expected bytes are the file's own unless `--expect` says otherwise.

use super::patch::{patch_flags, sites_in, PatchArgs};
use super::{describe, print_json};
use crate::CliError;
use hugepoke::decode::check_patch;
use hugepoke::device::{self, batch_site, Device};
use hugepoke::report::hex;
use hugepoke::sites::{Place, Site};
use hugepoke::symbols::{self, Elf, Mapping, Object};
use hugepoke::uapi::{BatchSite, FILE_DRY_RUN};
use serde::Serialize;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// `--json` of `patch --file`.
#[derive(Serialize)]
struct FilePatchOut {
    /// Null with --dry-run.
    handle: Option<u64>,
    file: String,
    /// The processes patched (or, with --dry-run, that would be).
    pids: Vec<i32>,
    persist: bool,
    dry_run: bool,
    sites: Vec<FileSiteOut>,
}

#[derive(Serialize)]
struct FileSiteOut {
    offset: u64,
    symbol: Option<String>,
    len: usize,
    bytes: String,
    expect: Option<String>,
}

/// PATH as an object of its own: its ELF (if it is one) and a mapping per
/// executable segment, at the object's own addresses (bias 0).
fn file_object(path: &Path, file: &File) -> Result<Object, CliError> {
    let what = path.display().to_string();
    let elf = Elf::read(
        file.try_clone()
            .map_err(|e| CliError::Usage(format!("{what}: {e}")))?,
        &what,
    )
    .map_err(CliError::Usage)?;
    let meta = file
        .metadata()
        .map_err(|e| CliError::Usage(format!("{what}: {e}")))?;
    let mappings = elf
        .iter()
        .flat_map(|e| &e.loads)
        .filter(|l| l.exec)
        .map(|l| Mapping {
            start: l.vaddr,
            end: l.vaddr + l.filesz,
            perms: "r-xp".into(),
            offset: l.offset,
            dev: (0, 0),
            inode: meta.ino(),
            path: what.clone(),
        });
    Ok(Object {
        path: what.clone(),
        mappings: mappings.collect(),
        main: true,
        elf,
        bias: 0,
        error: None,
    })
}

/// The file offset of `site`: its symbol's in the file's ELF, or the
/// number given (an offset, with --file).
fn offset_of(site: &Site, object: &Object, out: &mut dyn Write) -> Result<u64, CliError> {
    let pre = site.prefix();
    match &site.place {
        Place::Addr(off) => Ok(*off),
        Place::Symbol(sym) => {
            if object.elf.is_none() {
                return Err(CliError::Usage(format!(
                    "{pre}{sym}: {} is not an ELF file: give --offset",
                    object.path
                )));
            }
            let r = symbols::resolve(std::slice::from_ref(object), sym, None)
                .map_err(|e| CliError::Usage(format!("{pre}{e}")))?;
            let off = object
                .mapping(r.addr)
                .map(|m| m.file_offset(r.addr))
                .unwrap_or(0);
            let _ = writeln!(
                out,
                "{pre}{sym}: {}+{:#x} at file offset {off:#x} of {}",
                r.symbol.full_name(),
                r.offset,
                object.path
            );
            Ok(off)
        }
    }
}

/// Where file offset `off` of the file (`dev`, `ino`) is in the process
/// that maps `objects`.
fn address_in(objects: &[Object], dev: u64, ino: u64, off: u64) -> Option<u64> {
    let want = (libc::major(dev), libc::minor(dev));
    objects
        .iter()
        .flat_map(|o| &o.mappings)
        .find(|m| {
            m.executable()
                && m.inode == ino
                && m.dev == want
                && m.offset <= off
                && off < m.offset + (m.end - m.start)
        })
        .map(|m| m.start + (off - m.offset))
}

/// The instruction check, in process `pid` (the first the kernel found),
/// whose mapped `objects` are read once for every site: the same check as
/// `patch --pid`, at the site's address there.
fn check_in(
    args: &PatchArgs,
    pid: i32,
    objects: &[Object],
    meta: &std::fs::Metadata,
    off: u64,
    bytes: &[u8],
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let Some(addr) = address_in(objects, meta.dev(), meta.ino(), off) else {
        let _ = writeln!(
            out,
            "file offset {off:#x}: not checked as instructions (pid {pid} no longer maps it)"
        );
        return Ok(());
    };
    let check = check_patch(pid, args.force, objects, addr, bytes);
    let _ = writeln!(
        out,
        "file offset {off:#x}, checked in pid {pid} at {addr:#x}:"
    );
    check.write(addr, out);
    if !check.refusals.is_empty() && !args.force {
        let _ = out.flush();
        return Err(CliError::Refused(
            "the instruction check failed (see above; --force patches anyway)".into(),
        ));
    }
    Ok(())
}

/// Each site's file offset and expected bytes, as PATCH_FILE takes them,
/// and as `--json` shows them.
fn planned(
    args: &PatchArgs,
    inputs: &[Site],
    object: &Object,
    file: &File,
    out: &mut dyn Write,
) -> Result<(Vec<BatchSite>, Vec<FileSiteOut>), CliError> {
    let mut batch = Vec::new();
    let mut sites_out = Vec::new();
    for s in inputs {
        let off = offset_of(s, object, out)?;
        // The file's own bytes are expected, unless --expect says, or
        // --over-changed writes over whatever is there.
        let mut here = vec![0u8; s.bytes.len()];
        file.read_exact_at(&mut here, off)
            .map_err(|e| CliError::Usage(format!("{}file offset {off:#x}: {e}", s.prefix())))?;
        let expect = s.expect.clone().or((!args.over_changed).then_some(here));
        batch.push(batch_site(off, &s.bytes, expect.as_deref()));
        sites_out.push(FileSiteOut {
            offset: off,
            symbol: describe(std::slice::from_ref(object), off_to_vaddr(object, off)),
            len: s.bytes.len(),
            bytes: hex(&s.bytes),
            expect: expect.as_deref().map(hex),
        });
    }
    Ok((batch, sites_out))
}

pub fn exec(args: PatchArgs, json: bool) -> Result<(), CliError> {
    let path = args.file.clone().expect("clap: --file");
    let file = File::open(&path)
        .map_err(|e| CliError::Usage(format!("--file {}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| CliError::Usage(format!("--file {}: {e}", path.display())))?;
    let object = file_object(&path, &file)?;
    let inputs = sites_in(&args)?;
    let mut out: Box<dyn Write> = if args.dry_run && !json {
        Box::new(io::stdout())
    } else {
        Box::new(io::stderr())
    };
    let (batch, sites_out) = planned(&args, &inputs, &object, &file, &mut out)?;
    let seq = device::journal_seq();
    let dev = Device::open().map_err(|e| CliError::kernel("open /dev/hugepoke", e, seq, None))?;
    let flags = patch_flags(&args);
    let pids = file_call(&dev, &file, &batch, flags | FILE_DRY_RUN, seq, &inputs)?.1;
    let Some(&first) = pids.first() else {
        return Err(CliError::Failed(format!(
            "no process maps the sites of {} privately and executably",
            path.display()
        )));
    };
    let objects = symbols::objects(first).unwrap_or_default();
    for (s, b) in inputs.iter().zip(&batch) {
        check_in(&args, first, &objects, &meta, b.addr, &s.bytes, &mut out)?;
    }
    let mut result = FilePatchOut {
        handle: None,
        file: path.display().to_string(),
        pids,
        persist: args.persist,
        dry_run: args.dry_run,
        sites: sites_out,
    };
    if args.dry_run {
        if json {
            print_json(&result);
        } else {
            let _ = writeln!(
                out,
                "dry run: would patch {} processes: {}",
                result.pids.len(),
                pid_list(&result.pids)
            );
        }
        return Ok(());
    }
    let (handle, pids) = file_call(&dev, &file, &batch, flags, seq, &inputs)?;
    result.handle = Some(handle);
    result.pids = pids;
    report_and_hold(dev, &result, &path, json);
    Ok(())
}

/// Say what was patched (the handle on stdout), then, without --persist,
/// hold the patch until stdin closes: closing the device restores it in
/// every process.
fn report_and_hold(dev: Device, result: &FilePatchOut, path: &Path, json: bool) {
    let handle = result.handle.unwrap_or(0);
    eprintln!(
        "patched {} processes: {} (processes that map {} later are not patched)",
        result.pids.len(),
        pid_list(&result.pids),
        path.display()
    );
    if json {
        print_json(result);
    } else {
        println!("{handle}");
    }
    let _ = io::stdout().flush();
    if !result.persist {
        let _ = io::stdin().read_to_end(&mut Vec::new());
    }
    drop(dev);
}

/// The object address of file offset `off` (for naming its symbol).
fn off_to_vaddr(object: &Object, off: u64) -> u64 {
    object
        .mappings
        .iter()
        .find(|m| m.offset <= off && off < m.offset + (m.end - m.start))
        .map_or(0, |m| m.start + (off - m.offset))
}

fn pid_list(pids: &[i32]) -> String {
    pids.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// One PATCH_FILE, its refusal in words: which process and site.
fn file_call(
    dev: &Device,
    file: &File,
    batch: &[BatchSite],
    flags: u32,
    seq: u64,
    inputs: &[Site],
) -> Result<(u64, Vec<i32>), CliError> {
    dev.patch_file(file, batch, flags).map_err(|e| {
        let mut what = String::from("patch --file");
        if let Some(pid) = e.pid {
            what += &format!(": pid {pid}");
        }
        match e.batch.failed {
            Some(i) if i < inputs.len() => what += &format!(": site {i} ({})", inputs[i].label.as_deref().unwrap_or("?")),
            Some(i) => what += &format!(": site {i}"),
            None => {}
        }
        if let Some(h) = e.batch.kept {
            eprintln!("hugepoke: patch --file: what the kernel could not undo stays patched under handle {h} (hugepoke restore {h})");
        }
        if !e.pids.is_empty() {
            eprintln!("hugepoke: patch --file: the processes that map the file: {}", pid_list(&e.pids));
        }
        CliError::kernel(&what, e.batch.error, seq, e.pid)
    })
}

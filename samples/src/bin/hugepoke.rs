//! The hugepoke CLI (`hugepoke --help`, `hugepoke SUBCOMMAND --help`,
//! `man hugepoke`; Documentation/cli.md).
//!
//! A patch belongs to the open file that made it.  Without --persist,
//! `patch` prints the handle and keeps the device open until its standard
//! input closes (or it is killed): then the patch is restored.  With
//! --persist it prints the handle and exits; the patch lives until
//! `hugepoke restore HANDLE` or module unload.  `patch --sites FILE` makes
//! many patches in one target with one PATCH_BATCH: all of them or none.
//!
//! Before patching, the code at each address is read from /proc/PID/mem
//! and decoded: a patch that does not start on an instruction boundary, or
//! whose bytes are not whole instructions, is refused unless --force.
//!
//! `--json` makes every command that prints print one JSON value instead
//! (JSON Lines for `events --follow`); the field names are stable.
//!
//! Exit status: 0 done; 1 refused (by the kernel: the errno name and the
//! module's reason; or by the instruction check); 2 the command line is
//! wrong (a bad argument or sites file, a symbol that is missing or
//! ambiguous).

use clap::{Args, CommandFactory, Parser, Subcommand};
use hugepoke::decode::{self, Start};
use hugepoke::device::{self, Device};
use hugepoke::report::{self, hex, write_json};
use hugepoke::sites::{self, Place};
use hugepoke::symbols::{self, Object};
use hugepoke::{collapse, errno_name, parse_hex_bytes, parse_number, proc, uapi};
use serde::Serialize;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const EXIT_STATUS: &str = "\
Exit status: 0 done; 1 refused (by the kernel: its errno name and reason from the journal; by the \
instruction check); 2 the command line is wrong (a bad argument or sites file, a missing or ambiguous symbol).";

#[derive(Parser)]
#[command(
    name = "hugepoke",
    version,
    about = "Patch the THP-backed text of a running process, restore it, and watch the kernel do it",
    after_help = EXIT_STATUS,
    // `--help` on every subcommand instead: a `help` subcommand would
    // have no man page of its own.
    disable_help_subcommand = true
)]
struct Cli {
    /// Print JSON instead of text: one value per call (JSON Lines with events --follow); fields in Documentation/cli.md.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Patch bytes into a process's executable file text (prints the handle first).
    #[command(after_help = EXIT_STATUS)]
    Patch(PatchCmd),
    /// Restore a patch (all the sites of a batch) by its handle.
    Restore {
        /// The handle PATCH printed.
        #[arg(value_parser = number)]
        handle: u64,
    },
    /// Show one patch, every site of a batch: state, pid, address, bytes, the original bytes.
    Query {
        /// The handle PATCH printed.
        #[arg(value_parser = number)]
        handle: u64,
    },
    /// List the live patches (debugfs `patches`), each with its symbol+offset.
    List,
    /// Print the module's journal of every step (debugfs `events`).
    Events {
        /// Then keep printing new entries as they are journaled, until SIGINT or the reader goes away.
        #[arg(long, short)]
        follow: bool,
        /// How often --follow reads the journal, in milliseconds.
        #[arg(long, default_value_t = 100, requires = "follow", value_parser = clap::value_parser!(u64).range(1..=60_000))]
        interval_ms: u64,
    },
    /// Print the module's per-step counters (debugfs `stats`).
    Stats,
    /// Make a process's executable file mappings huge (process_madvise MADV_COLLAPSE) and report per mapping.
    Collapse {
        /// The process.
        #[arg(long)]
        pid: i32,
    },
    /// Draw the 2 MiB range around an address: how each of its 512 pages is mapped now, and the live patches.
    Map(MapCmd),
    /// Write the man pages or a shell's completions (make install-tools uses it).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
}

#[derive(Subcommand)]
enum Generate {
    /// hugepoke.1 and hugepoke-SUBCOMMAND.1, into DIR.
    Man { dir: PathBuf },
    /// The completion script for SHELL, on standard output.
    Completions { shell: clap_complete::Shell },
}

#[derive(Args)]
struct MapCmd {
    /// The process.
    #[arg(long)]
    pid: i32,
    /// An address in the range (0x… or decimal); the range is the 2 MiB-aligned one around it.
    #[arg(long, value_parser = number)]
    addr: u64,
    /// Also write the picture as SVG to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<std::path::PathBuf>,
}

/// `hugepoke map`: read the range (hugepoke::map), print it, maybe write the SVG.
fn map_cmd(cmd: MapCmd, json: bool) {
    use std::io::IsTerminal;
    let m = hugepoke::map::RangeMap::read(cmd.pid, cmd.addr).unwrap_or_else(|e| {
        eprintln!("hugepoke: map: pid {} at {:#x}: {e}", cmd.pid, cmd.addr);
        std::process::exit(1)
    });
    if let Some(path) = &cmd.svg {
        std::fs::write(path, hugepoke::map::render_svg(&m)).unwrap_or_else(|e| {
            eprintln!("hugepoke: map: writing {}: {e}", path.display());
            std::process::exit(1)
        });
    }
    if json {
        println!("{}", serde_json::to_string(&m).expect("a map serializes"));
    } else {
        let colour = io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        print!("{}", hugepoke::map::render_text(&m, colour));
    }
}

#[derive(Args)]
struct PatchCmd {
    /// The target process.
    #[arg(long)]
    pid: i32,
    /// The address to patch (0x… or decimal).
    #[arg(long, value_parser = number, required_unless_present_any = ["symbol", "sites"], conflicts_with = "symbol")]
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
    #[arg(long, value_name = "FILE", conflicts_with_all = ["addr", "symbol", "bytes", "expect"])]
    sites: Option<PathBuf>,
    /// Keep the patch after this command exits (until `restore` or module unload).
    #[arg(long)]
    persist: bool,
    /// Have the collapse after RESTORE install the PMD at once, not at the next fault.
    #[arg(long)]
    install_pmd: bool,
    /// Patch even where the instruction check refuses.
    #[arg(long)]
    force: bool,
    /// Show the old and new instructions and what the check says; patch nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Clone)]
struct Hex(Vec<u8>);

fn number(s: &str) -> Result<u64, String> {
    parse_number(s).ok_or_else(|| format!("{s:?} is not a number (0x… hex or decimal)"))
}

fn hex_arg(s: &str) -> Result<Hex, String> {
    parse_hex_bytes(s)
        .map(Hex)
        .ok_or_else(|| format!("{s:?} is not hex bytes (like \"b8 2a 00 00 00 c3\")"))
}

/// Print `what: ERRNO: reason` and exit 1.
fn fail(what: &str, err: io::Error, seq: u64) -> ! {
    fail_for(what, err, seq, None)
}

/// [`fail`], with the reason looked up among `target`'s events and ours.
fn fail_for(what: &str, err: io::Error, seq: u64, target: Option<i32>) -> ! {
    let errno = err.raw_os_error().unwrap_or(0);
    let reason = device::failure_since(seq, target).unwrap_or_else(|| err.to_string());
    eprintln!("hugepoke: {what}: {}: {reason}", errno_name(errno));
    std::process::exit(1)
}

/// Bytes as `b8 2a 00 00 00 c3`.
fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A bad argument: exit 2.
fn usage_error(msg: &str) -> ! {
    eprintln!("hugepoke: {msg}");
    std::process::exit(2)
}

fn refuse(msg: &str) -> ! {
    eprintln!("hugepoke: refused: {msg}");
    std::process::exit(1)
}

/// Print `value` as the call's one JSON value.
fn print_json<T: Serialize>(value: &T) {
    let _ = write_json(&mut io::stdout().lock(), value);
}

/// `NAME+0xOFF (object)` for an address, if one of `objects` maps it.
fn describe(objects: &[Object], addr: u64) -> Option<String> {
    let o = &objects[symbols::object_at(objects, addr)?];
    o.describe(addr)
}

fn read_mem(pid: i32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let f = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, addr)?;
    Ok(buf)
}

/// The live patches of `pid` (from debugfs) that overlap `[addr, addr+len)`.
fn overlapping_patches(pid: i32, addr: u64, len: u64) -> Vec<String> {
    let Ok(text) = proc::debugfs("patches") else {
        return vec![];
    };
    report::parse_patches(&text)
        .patches
        .iter()
        .filter(|p| p.pid == pid && p.addr < addr + len && addr < p.addr + p.len as u64)
        .map(|p| format!("handle {} at {:#x}", p.handle, p.addr))
        .collect()
}

/// One decoded instruction, as `--json` shows it.
#[derive(Serialize)]
struct InsnOut {
    addr: u64,
    bytes: String,
    text: String,
    /// `NAME+0xOFF` (`?` after the offset: only the nearest symbol before).
    symbol: Option<String>,
}

/// What the instruction check found at one site.
#[derive(Serialize, Default)]
struct Check {
    /// The old code was read and decoded (false: the kernel alone decides; `notes` or `warnings` say why).
    checked: bool,
    /// `NAME+0xOFF in PATH`.
    at: Option<String>,
    old: Vec<InsnOut>,
    new: Vec<InsnOut>,
    notes: Vec<String>,
    warnings: Vec<String>,
    /// Why the patch is refused (empty: it passed).
    refusals: Vec<String>,
    /// --force overrode `refusals`.
    forced: bool,
    /// The old and new instructions, as the plain output lists them.
    #[serde(skip)]
    listing: String,
    /// The bytes the check read at the address.
    #[serde(skip)]
    here: Option<Vec<u8>>,
}

impl Check {
    fn note(mut self, n: String) -> Self {
        self.notes.push(n);
        self
    }

    /// The plain text: where, the instructions, the notes, the verdict.
    fn write(&self, addr: u64, out: &mut dyn Write) {
        if let Some(at) = &self.at {
            let _ = writeln!(out, "{addr:#x} is {at}");
        }
        let _ = write!(out, "{}", self.listing);
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        for r in &self.refusals {
            let _ = writeln!(
                out,
                "{}: {r}",
                if self.forced { "forced" } else { "refused" }
            );
        }
    }
}

/// Check patching `new` at `addr` of `pid` against the code the process
/// has now.  Its `here` (the bytes it read at the address) is what PATCH
/// then passes as its expected bytes: the kernel writes only if they are
/// still there under the page-table lock (the code may change between
/// this look and the write: a dlclose/dlopen, a debugger, another patch
/// beside this one).
fn check_patch(pid: i32, force: bool, objects: &[Object], addr: u64, new: &[u8]) -> Check {
    let len = new.len() as u64;
    let c = Check {
        forced: force,
        ..Default::default()
    };
    // Not decoded: the kernel decides whether it may patch there, and
    // writes only over the bytes there now (read here, passed as expected).
    let unchecked = |c: Check, why: String| {
        let mut c = c.note(format!("{why}: not checked as instructions (the kernel decides; it writes only over the bytes read here)"));
        c.here = read_mem(pid, addr, new.len()).ok();
        c
    };
    let Some(oi) = symbols::object_at(objects, addr) else {
        return unchecked(
            c,
            format!("{addr:#x} is in no executable file mapping of pid {pid}"),
        );
    };
    let o = &objects[oi];
    let m = o.mapping(addr).unwrap();
    if !m.executable() {
        return unchecked(
            c,
            format!("{addr:#x} is in {} but not executable there", o.path),
        );
    }
    if addr + len > m.end {
        return unchecked(
            c,
            format!("the patch runs past the end of the mapping at {:#x}", m.end),
        );
    }
    let mut c = c;
    // Decode from the start of the covering symbol; without one, from the
    // nearest symbol before in this mapping, or the mapping's start.
    let vaddr = addr.wrapping_sub(o.bias);
    let sym = o.elf.as_ref().and_then(|e| e.symbol_at(vaddr));
    let (from, start) = match &sym {
        Some(s) if s.covers(vaddr) => (
            s.value.wrapping_add(o.bias),
            Start::Symbol {
                name: s.full_name(),
            },
        ),
        Some(s) if m.contains(s.value.wrapping_add(o.bias)) => (
            s.value.wrapping_add(o.bias),
            Start::Guess {
                what: format!(
                    "the nearest symbol before, {} (size {:#x})",
                    s.full_name(),
                    s.size
                ),
            },
        ),
        _ => {
            let why = if o.elf.is_none() {
                format!("{} is not an ELF object", o.basename())
            } else {
                "no symbol before it in this mapping".into()
            };
            (
                m.start,
                Start::Guess {
                    what: format!("the start of the mapping ({why})"),
                },
            )
        }
    };
    let to = (addr + len + 16).min(m.end);
    let old = match read_mem(pid, from, (to - from) as usize) {
        Ok(b) => b,
        Err(e) if force => {
            c.warnings.push(format!(
                "cannot read the old code from /proc/{pid}/mem: {e}; not checked (--force)"
            ));
            return c;
        }
        Err(e) => {
            c.refusals.push(format!("cannot read the old code from /proc/{pid}/mem to check the patch: {e} (--force patches unchecked)"));
            return c;
        }
    };
    c.checked = true;
    let review = decode::review(&old, from, &start, addr, new);
    let name = |a: u64| o.describe(a);
    let insns = |v: &[decode::Insn]| -> Vec<InsnOut> {
        v.iter()
            .map(|i| InsnOut {
                addr: i.addr,
                bytes: hex(&i.bytes),
                text: i.text.clone(),
                symbol: o.describe(i.addr),
            })
            .collect()
    };
    c.at = Some(format!(
        "{} in {}",
        o.describe(addr).unwrap_or_default(),
        o.path
    ));
    c.listing = format!(
        "old:\n{}new:\n{}",
        decode::listing(&review.old, name),
        decode::listing(&review.new, name)
    );
    c.old = insns(&review.old);
    c.new = insns(&review.new);

    // The text may be patched already (by us or a debugger): compare with the file.
    let here = &old[(addr - from) as usize..][..len as usize];
    let file_bytes =
        std::fs::File::open(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
            .or_else(|_| std::fs::File::open(&m.path))
            .and_then(|f| {
                let mut b = vec![0; len as usize];
                f.read_exact_at(&mut b, m.file_offset(addr)).map(|_| b)
            });
    match file_bytes {
        Ok(b) if b != here => {
            let by = overlapping_patches(pid, addr, len);
            let by = if by.is_empty() {
                "not by a live hugepoke patch: a debugger or another tool".to_string()
            } else {
                by.join(", ")
            };
            c.notes.push(format!(
                "the process's bytes there differ from its file's: already patched ({by})"
            ));
        }
        _ => {}
    }
    if let Some(s) = sym.filter(|s| s.covers(vaddr)) {
        if s.ifunc {
            c.warnings.push(format!(
                "{} is an IFUNC: this is its resolver, not the implementation callers run",
                s.full_name()
            ));
        }
        if s.size != 0 && vaddr + len > s.value + s.size {
            c.warnings.push(format!(
                "the patch runs past the end of {} (size {:#x})",
                s.full_name(),
                s.size
            ));
        }
    }
    c.notes.extend(review.notes);
    c.warnings.extend(review.warnings);
    c.refusals.extend(review.refusals);
    c.here = Some(here.to_vec());
    c
}

/// One site of a `patch` call, as `--json` shows it.
#[derive(Serialize)]
struct SiteOut {
    /// The sites file's line (null without --sites).
    line: Option<usize>,
    addr: u64,
    /// `NAME+0xOFF` of `addr` in the process.
    symbol: Option<String>,
    len: usize,
    bytes: String,
    /// What the kernel is told must be there (PATCH_EXPECT): the given
    /// expected bytes, or those the check read; null for none.
    expect: Option<String>,
    check: Check,
}

/// What `patch --json` prints.
#[derive(Serialize)]
struct PatchOut {
    /// Null with --dry-run.
    handle: Option<u64>,
    pid: i32,
    persist: bool,
    dry_run: bool,
    sites: Vec<SiteOut>,
}

/// A site before checking: where the command line or the sites file put it.
struct SiteIn {
    /// `FILE line N`, for messages; None without --sites.
    label: Option<String>,
    line: Option<usize>,
    place: Place,
    bytes: Vec<u8>,
    expect: Option<Vec<u8>>,
}

impl SiteIn {
    /// `prefix: ` for messages about this site.
    fn prefix(&self) -> String {
        self.label
            .as_ref()
            .map(|l| format!("{l}: "))
            .unwrap_or_default()
    }
}

/// The sites of `--sites FILE` (`-`: standard input); exit 2 on a bad file.
fn read_sites(path: &Path) -> Vec<SiteIn> {
    let (name, text) = if path == Path::new("-") {
        let mut t = String::new();
        io::stdin()
            .read_to_string(&mut t)
            .unwrap_or_else(|e| usage_error(&format!("--sites -: cannot read stdin: {e}")));
        ("<stdin>".to_string(), t)
    } else {
        let t = std::fs::read_to_string(path)
            .unwrap_or_else(|e| usage_error(&format!("--sites {}: {e}", path.display())));
        (path.display().to_string(), t)
    };
    let lines =
        sites::parse(&text).unwrap_or_else(|e| usage_error(&format!("--sites {name}: {e}")));
    lines
        .into_iter()
        .map(|s| SiteIn {
            label: Some(format!("{name} line {}", s.line)),
            line: Some(s.line),
            place: s.place,
            bytes: s.bytes,
            expect: s.expect,
        })
        .collect()
}

fn patch(cmd: PatchCmd, json: bool) {
    let from_stdin = cmd.sites.as_deref() == Some(Path::new("-"));
    let inputs = match &cmd.sites {
        Some(path) => read_sites(path),
        None => {
            let bytes = cmd
                .bytes
                .clone()
                .expect("clap requires --bytes without --sites")
                .0;
            let place = match (&cmd.symbol, cmd.addr) {
                (Some(sym), _) => Place::Symbol(sym.clone()),
                (None, Some(a)) => Place::Addr(a),
                (None, None) => unreachable!("clap requires --addr or --symbol"),
            };
            let expect = cmd.expect.clone().map(|h| h.0);
            if let Some(e) = &expect {
                if e.len() != bytes.len() {
                    usage_error(&format!(
                        "--expect has {} bytes and --bytes {}: they must be as long",
                        e.len(),
                        bytes.len()
                    ));
                }
            }
            vec![SiteIn {
                label: None,
                line: None,
                place,
                bytes,
                expect,
            }]
        }
    };
    let any_symbol = inputs.iter().any(|s| matches!(s.place, Place::Symbol(_)));
    if cmd.object.is_some() && !any_symbol {
        usage_error("--object needs --symbol (or symbols in the sites file)");
    }
    let objects = match symbols::objects(cmd.pid) {
        Ok(o) => o,
        Err(e) if any_symbol => usage_error(&e),
        Err(_) => Vec::new(),
    };
    // What the check says goes to stdout with a plain --dry-run, else to
    // stderr (stdout holds only the handle or the JSON).
    let mut out: Box<dyn Write> = if cmd.dry_run && !json {
        Box::new(io::stdout())
    } else {
        Box::new(io::stderr())
    };

    // The same path for every site: resolve, check, settle the expected bytes.
    let mut sites_out = Vec::new();
    for s in &inputs {
        let pre = s.prefix();
        let addr = match &s.place {
            Place::Symbol(sym) => {
                let r = symbols::resolve(&objects, sym, cmd.object.as_deref())
                    .unwrap_or_else(|e| usage_error(&format!("{pre}{e}")));
                let o = &objects[r.object];
                let _ = writeln!(
                    out,
                    "{pre}{sym}: {}+{:#x} in {} at {:#x} (symbol value {:#x}, size {:#x}, load bias {:#x})",
                    r.symbol.full_name(),
                    r.offset,
                    o.path,
                    r.addr,
                    r.symbol.value,
                    r.symbol.size,
                    o.bias
                );
                r.addr
            }
            Place::Addr(a) => {
                if s.label.is_some() {
                    let _ = writeln!(out, "{pre}{a:#x}");
                }
                *a
            }
        };
        let check = check_patch(cmd.pid, cmd.force, &objects, addr, &s.bytes);
        check.write(addr, &mut out);
        if !check.refusals.is_empty() && !cmd.force {
            let _ = out.flush();
            refuse(&format!(
                "{pre}the instruction check failed (see above; --force patches anyway)"
            ));
        }
        let expect = match (s.expect.clone(), check.here.clone()) {
            // --force leaves the verdict to the kernel, under the PT lock.
            (Some(e), Some(here)) if e != here && !cmd.force => {
                let what = if s.label.is_some() {
                    "EXPECT"
                } else {
                    "--expect"
                };
                refuse(&format!(
                    "{pre}{what} {} is not what is there now ({})",
                    hex_bytes(&e),
                    hex_bytes(&here)
                ))
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
    let mut result = PatchOut {
        handle: None,
        pid: cmd.pid,
        persist: cmd.persist,
        dry_run: cmd.dry_run,
        sites: sites_out,
    };
    if cmd.dry_run {
        if json {
            print_json(&result);
        } else {
            let _ = writeln!(out, "dry run: nothing patched");
        }
        return;
    }
    drop(out);

    let seq = device::journal_seq();
    let dev = Device::open().unwrap_or_else(|e| fail("open /dev/hugepoke", e, seq));
    let expects: Vec<Option<Vec<u8>>> = result
        .sites
        .iter()
        .map(|s| s.expect.as_deref().and_then(parse_hex_bytes))
        .collect();
    let handle = if cmd.sites.is_none() {
        let s = &inputs[0];
        let req = device::PatchRequest {
            pid: cmd.pid,
            addr: result.sites[0].addr,
            bytes: s.bytes.clone(),
            expect: expects[0].clone(),
            persist: cmd.persist,
            install_pmd: cmd.install_pmd,
        };
        dev.patch(&req)
            .unwrap_or_else(|e| fail_for("patch", e, seq, Some(cmd.pid)))
    } else {
        let batch: Vec<uapi::BatchSite> = inputs
            .iter()
            .zip(&result.sites)
            .zip(&expects)
            .map(|((i, o), e)| device::batch_site(o.addr, &i.bytes, e.as_deref()))
            .collect();
        let mut flags = 0;
        if cmd.persist {
            flags |= uapi::PATCH_PERSIST;
        }
        if cmd.install_pmd {
            flags |= uapi::PATCH_INSTALL_PMD;
        }
        dev.patch_batch(cmd.pid, &batch, flags).unwrap_or_else(|e| {
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
            fail_for(&what, e.error, seq, Some(cmd.pid))
        })
    };
    result.handle = Some(handle);
    if json {
        print_json(&result);
    } else {
        println!("{handle}");
    }
    let _ = io::stdout().flush();
    if !cmd.persist {
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
}

#[derive(Serialize)]
struct QuerySite {
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

fn query(handle: u64, json: bool, seq: u64) {
    let dev = Device::open().unwrap_or_else(|e| fail("open /dev/hugepoke", e, seq));
    let first = dev.query(handle).unwrap_or_else(|e| fail("query", e, seq));
    let mut sites = Vec::new();
    for index in 0..first.count.max(1) {
        let q = if index == 0 {
            first
        } else {
            dev.query_site(handle, index)
                .unwrap_or_else(|e| fail("query", e, seq))
        };
        let n = (q.len as usize).min(uapi::MAX_BYTES);
        sites.push(QuerySite {
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
        state: if first.state == uapi::STATE_LIVE {
            "live"
        } else {
            "gone"
        },
        pid: first.pid,
        count: first.count.max(1),
        sites,
    };
    if json {
        return print_json(&out);
    }
    for s in &out.sites {
        println!(
            "handle={handle} state={} pid={} addr={:#x} len={} flags={:#x} pfn={:#x} bytes={} orig={} site={}/{}",
            out.state, out.pid, s.addr, s.len, s.flags, s.pfn, s.bytes, s.orig, s.site, out.count
        );
    }
}

/// debugfs `patches`, with each patch's symbol+offset added.
fn list(json: bool, seq: u64) {
    let text = proc::debugfs("patches").unwrap_or_else(|e| fail("patches", e, seq));
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
        return print_json(&p);
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
}

/// Set by SIGINT: `events --follow` finishes the line it is on and exits 0.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// `events --follow`: the journal, then each new entry as it comes,
/// polling debugfs by `seq`; a read that fails (the module unloaded) is
/// retried.  Ends at SIGINT (exit 0) or when stdout's reader goes away.
fn follow(json: bool, interval: Duration, seq: u64) {
    let first = proc::debugfs("events").unwrap_or_else(|e| fail("events", e, seq));
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let mut follower = report::Follower::default();
    let mut text = Some(first);
    let mut stdout = io::stdout().lock();
    if !json {
        let _ = writeln!(
            stdout,
            "# dropped {}",
            report::parse_dropped(text.as_deref().unwrap_or(""))
        );
        let _ = writeln!(
            stdout,
            "# seq time_ns pid handle addr step pfn order result note"
        );
    }
    while !INTERRUPTED.load(Ordering::Relaxed) {
        if let Some(t) = text.take() {
            for item in follower.next(&t) {
                let r = if json {
                    item.write_json(&mut stdout)
                } else {
                    writeln!(stdout, "{}", item.line())
                };
                // The reader went away (EPIPE with SIGPIPE ignored): done.
                if r.and_then(|_| stdout.flush()).is_err() {
                    return;
                }
            }
        }
        std::thread::sleep(interval);
        text = proc::debugfs("events").ok();
    }
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

fn collapse_cmd(pid: i32, json: bool) {
    let reports = collapse::collapse(pid).unwrap_or_else(|e| {
        eprintln!("hugepoke: collapse: {e}");
        std::process::exit(1)
    });
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
    if reports.iter().any(|r| !r.failures.is_empty()) {
        std::process::exit(1);
    }
}

fn print_debugfs(name: &str, json: bool, seq: u64) {
    let text = proc::debugfs(name).unwrap_or_else(|e| fail(name, e, seq));
    match (name, json) {
        ("events", true) => print_json(&report::parse_events(&text)),
        ("stats", true) => print_json(&report::parse_stats(&text)),
        _ => print!("{text}"),
    }
}

/// The command without its hidden subcommands (`generate`), which
/// clap_complete would offer.
fn visible_command() -> clap::Command {
    let cli = Cli::command();
    let subs: Vec<clap::Command> = cli
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let mut cmd = clap::Command::new("hugepoke")
        .version(env!("CARGO_PKG_VERSION"))
        .disable_help_subcommand(true)
        .subcommand_required(true);
    for a in cli.get_arguments() {
        cmd = cmd.arg(a.clone());
    }
    cmd.subcommands(subs)
}

/// `hugepoke generate man DIR`: hugepoke.1, and hugepoke-SUB.1 for each
/// visible subcommand.
fn generate_man(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
    cmd.build();
    let write = |name: &str, c: clap::Command| -> io::Result<()> {
        let mut f = std::fs::File::create(dir.join(format!("{name}.1")))?;
        clap_mangen::Man::new(c).render(&mut f)
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // clap names are &'static str (without its `string` feature); a
        // generator run leaks a few.
        let name: &'static str = Box::leak(format!("hugepoke-{}", sub.get_name()).into_boxed_str());
        let bin: &'static str = Box::leak(format!("hugepoke {}", sub.get_name()).into_boxed_str());
        write(name, sub.clone().name(name).bin_name(bin))?;
    }
    write("hugepoke", cmd)
}

fn main() {
    // Die quietly of SIGPIPE, as other Unix tools do (`hugepoke events | head`).
    // SAFETY: restores the default disposition; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let json = cli.json;
    if let Command::Generate { what } = cli.command {
        match what {
            Generate::Man { dir } => generate_man(&dir).unwrap_or_else(|e| {
                eprintln!("hugepoke: generate man: {e}");
                std::process::exit(1)
            }),
            Generate::Completions { shell } => clap_complete::generate(
                shell,
                &mut visible_command(),
                "hugepoke",
                &mut io::stdout(),
            ),
        }
        return;
    }
    let seq = device::journal_seq();
    match cli.command {
        Command::Patch(cmd) => patch(cmd, json),
        Command::Restore { handle } => {
            let dev = Device::open().unwrap_or_else(|e| fail("open /dev/hugepoke", e, seq));
            dev.restore(handle)
                .unwrap_or_else(|e| fail("restore", e, seq));
        }
        Command::Query { handle } => query(handle, json, seq),
        Command::List => list(json, seq),
        Command::Events {
            follow: true,
            interval_ms,
        } => follow(json, Duration::from_millis(interval_ms), seq),
        Command::Events { .. } => print_debugfs("events", json, seq),
        Command::Stats => print_debugfs("stats", json, seq),
        Command::Collapse { pid } => collapse_cmd(pid, json),
        Command::Map(cmd) => map_cmd(cmd, json),
        Command::Generate { .. } => unreachable!(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_documents_every_flag() {
        let mut cmd = Cli::command();
        cmd.build();
        for sub in cmd.get_subcommands_mut() {
            let help = sub.render_long_help().to_string();
            for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                let flag = match arg.get_long() {
                    Some(l) => format!("--{l}"),
                    None => format!("<{}>", arg.get_id().as_str().to_uppercase()),
                };
                assert!(
                    help.contains(&flag),
                    "{} --help lacks {flag}:\n{help}",
                    sub.get_name()
                );
                assert!(
                    arg.get_help().is_some(),
                    "{} {flag} has no help text",
                    sub.get_name()
                );
            }
        }
    }
}

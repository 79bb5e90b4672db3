//! The hugepoke CLI (`hugepoke --help`, `hugepoke SUBCOMMAND --help`;
//! Documentation/cli.md).
//!
//! A patch belongs to the open file that made it.  Without --persist,
//! `patch` prints the handle and keeps the device open until its standard
//! input closes (or it is killed): then the patch is restored.  With
//! --persist it prints the handle and exits; the patch lives until
//! `hugepoke restore HANDLE` or module unload.
//!
//! Before patching, the code at the address is read from /proc/PID/mem and
//! decoded: a patch that does not start on an instruction boundary, or
//! whose bytes are not whole instructions, is refused unless --force.
//!
//! Exit status: 0 done; 1 refused (by the kernel: the errno name and the
//! module's reason; or by the instruction check); 2 the command line is
//! wrong (a bad argument, a symbol that is missing or ambiguous).

use clap::{Args, Parser, Subcommand};
use hugepoke::decode::{self, Start};
use hugepoke::device::{self, Device, PatchRequest};
use hugepoke::symbols::{self, Object};
use hugepoke::{collapse, errno_name, parse_hex_bytes, parse_number, proc};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

#[derive(Parser)]
#[command(name = "hugepoke", version, about = "Patch the THP-backed text of a running process, restore it, and watch the kernel do it")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Patch bytes into a process's executable file text (prints the handle first).
    Patch(PatchCmd),
    /// Restore a patch by its handle.
    Restore {
        #[arg(value_parser = number)]
        handle: u64,
    },
    /// Show one patch: state, pid, address, bytes and the original bytes.
    Query {
        #[arg(value_parser = number)]
        handle: u64,
    },
    /// List the live patches (debugfs `patches`), each with its symbol+offset.
    List,
    /// Print the module's journal of every step (debugfs `events`).
    Events,
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
}

#[derive(Args)]
struct MapCmd {
    /// The process.
    #[arg(long)]
    pid: i32,
    /// An address in the range (0x… or decimal); the range is the 2 MiB-aligned one around it.
    #[arg(long, value_parser = number)]
    addr: u64,
    /// Print the map as JSON (fields in Documentation/cli.md) instead of the picture.
    #[arg(long)]
    json: bool,
    /// Also write the picture as SVG to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<std::path::PathBuf>,
}

/// `hugepoke map`: read the range (hugepoke::map), print it, maybe write the SVG.
fn map_cmd(cmd: MapCmd) {
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
    if cmd.json {
        println!("{}", serde_json::to_string_pretty(&m).expect("a map serializes"));
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
    #[arg(long, value_parser = number, required_unless_present = "symbol", conflicts_with = "symbol")]
    addr: Option<u64>,
    /// The function to patch: NAME, NAME+OFFSET, NAME@VERSION, from .symtab or .dynsym.
    #[arg(long)]
    symbol: Option<String>,
    /// Which mapped object defines --symbol: a path or a basename (`libc`, `libc.so.6`).
    #[arg(long, requires = "symbol")]
    object: Option<String>,
    /// The new bytes in hex, 1-16 of them, spaces allowed: "b8 2a 00 00 00 c3".
    #[arg(long, value_parser = hex)]
    bytes: Hex,
    /// Refuse (EILSEQ) unless these bytes are there now.
    #[arg(long, value_parser = hex)]
    expect: Option<Hex>,
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

fn hex(s: &str) -> Result<Hex, String> {
    parse_hex_bytes(s).map(Hex).ok_or_else(|| format!("{s:?} is not hex bytes (like \"b8 2a 00 00 00 c3\")"))
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

/// A bad argument: exit 2.
/// Bytes as `b8 2a 00 00 00 c3`.
fn hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

fn usage_error(msg: &str) -> ! {
    eprintln!("hugepoke: {msg}");
    std::process::exit(2)
}

fn refuse(msg: &str) -> ! {
    eprintln!("hugepoke: refused: {msg}");
    std::process::exit(1)
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
    let Ok(text) = proc::debugfs("patches") else { return vec![] };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let (h, p, a, n) = (w.first()?, w.get(1)?.parse::<i32>().ok()?, parse_number(w.get(2)?)?, w.get(3)?.parse::<u64>().ok()?);
            (p == pid && a < addr + len && addr < a + n).then(|| format!("handle {h} at {a:#x}"))
        })
        .collect()
}

/// Check the patch against the code the process has now; print what it
/// finds (to `out`); exit 1 if it refuses and --force is not given.
/// Returns the bytes it checked at the address, which PATCH then passes as
/// its expected bytes: the kernel writes only if they are still there
/// under the page-table lock (the code may change between this look and
/// the write: a dlclose/dlopen, a debugger, another patch beside this one).
/// None when it could not look.
fn check_patch(cmd: &PatchCmd, objects: &[Object], addr: u64, out: &mut dyn Write) -> Option<Vec<u8>> {
    let new = &cmd.bytes.0;
    let len = new.len() as u64;
    let Some(oi) = symbols::object_at(objects, addr) else {
        let _ = writeln!(out, "note: {addr:#x} is in no executable file mapping of pid {}: not checked (the kernel decides)", cmd.pid);
        return None;
    };
    let o = &objects[oi];
    let m = o.mapping(addr).unwrap();
    if !m.executable() {
        let _ = writeln!(out, "note: {addr:#x} is in {} but not executable there: not checked (the kernel decides)", o.path);
        return None;
    }
    if addr + len > m.end {
        let _ = writeln!(out, "note: the patch runs past the end of the mapping at {:#x}: not checked (the kernel decides)", m.end);
        return None;
    }
    // Decode from the start of the covering symbol; without one, from the
    // nearest symbol before in this mapping, or the mapping's start.
    let vaddr = addr.wrapping_sub(o.bias);
    let sym = o.elf.as_ref().and_then(|e| e.symbol_at(vaddr));
    let (from, start) = match &sym {
        Some(s) if s.covers(vaddr) => (s.value.wrapping_add(o.bias), Start::Symbol { name: s.full_name() }),
        Some(s) if m.contains(s.value.wrapping_add(o.bias)) => {
            (s.value.wrapping_add(o.bias), Start::Guess { what: format!("the nearest symbol before, {} (size {:#x})", s.full_name(), s.size) })
        }
        _ => {
            let why = if o.elf.is_none() { format!("{} is not an ELF object", o.basename()) } else { "no symbol before it in this mapping".into() };
            (m.start, Start::Guess { what: format!("the start of the mapping ({why})") })
        }
    };
    let to = (addr + len + 16).min(m.end);
    let old = match read_mem(cmd.pid, from, (to - from) as usize) {
        Ok(b) => b,
        Err(e) if cmd.force => {
            let _ = writeln!(out, "warning: cannot read the old code from /proc/{}/mem: {e}; not checked (--force)", cmd.pid);
            return None;
        }
        Err(e) => refuse(&format!("cannot read the old code from /proc/{}/mem to check the patch: {e} (--force patches unchecked)", cmd.pid)),
    };
    let review = decode::review(&old, from, &start, addr, new);
    let name = |a: u64| o.describe(a);
    let _ = writeln!(out, "{addr:#x} is {} in {}", o.describe(addr).unwrap_or_default(), o.path);
    let _ = write!(out, "old:\n{}new:\n{}", decode::listing(&review.old, name), decode::listing(&review.new, name));

    // The text may be patched already (by us or a debugger): compare with the file.
    let here = &old[(addr - from) as usize..][..len as usize];
    let file_bytes = std::fs::File::open(format!("/proc/{}/map_files/{:x}-{:x}", cmd.pid, m.start, m.end))
        .or_else(|_| std::fs::File::open(&m.path))
        .and_then(|f| {
            let mut b = vec![0; len as usize];
            f.read_exact_at(&mut b, m.file_offset(addr)).map(|_| b)
        });
    match file_bytes {
        Ok(b) if b != here => {
            let by = overlapping_patches(cmd.pid, addr, len);
            let by = if by.is_empty() { "not by a live hugepoke patch: a debugger or another tool".to_string() } else { by.join(", ") };
            let _ = writeln!(out, "note: the process's bytes there differ from its file's: already patched ({by})");
        }
        _ => {}
    }
    if let Some(s) = sym.filter(|s| s.covers(vaddr)) {
        if s.ifunc {
            let _ = writeln!(out, "warning: {} is an IFUNC: this is its resolver, not the implementation callers run", s.full_name());
        }
        if s.size != 0 && vaddr + len > s.value + s.size {
            let _ = writeln!(out, "warning: the patch runs past the end of {} (size {:#x})", s.full_name(), s.size);
        }
    }
    for n in &review.notes {
        let _ = writeln!(out, "note: {n}");
    }
    for w in &review.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    if !review.ok() {
        for r in &review.refusals {
            let _ = writeln!(out, "{}: {r}", if cmd.force { "forced" } else { "refused" });
        }
        if !cmd.force {
            let _ = out.flush();
            refuse("the instruction check failed (see above; --force patches anyway)");
        }
    }
    Some(here.to_vec())
}

fn patch(cmd: PatchCmd) {
    if let Some(e) = &cmd.expect {
        if e.0.len() != cmd.bytes.0.len() {
            usage_error(&format!("--expect has {} bytes and --bytes {}: they must be as long", e.0.len(), cmd.bytes.0.len()));
        }
    }
    let objects = match symbols::objects(cmd.pid) {
        Ok(o) => o,
        Err(e) if cmd.symbol.is_some() => usage_error(&e),
        Err(_) => Vec::new(),
    };
    let addr = match (&cmd.symbol, cmd.addr) {
        (Some(sym), _) => {
            let r = symbols::resolve(&objects, sym, cmd.object.as_deref()).unwrap_or_else(|e| usage_error(&e));
            let o = &objects[r.object];
            let line = format!(
                "{sym}: {}+{:#x} in {} at {:#x} (symbol value {:#x}, size {:#x}, load bias {:#x})",
                r.symbol.full_name(),
                r.offset,
                o.path,
                r.addr,
                r.symbol.value,
                r.symbol.size,
                o.bias
            );
            if cmd.dry_run { println!("{line}") } else { eprintln!("{line}") }
            r.addr
        }
        (None, Some(a)) => a,
        (None, None) => unreachable!("clap requires --addr or --symbol"),
    };
    let stdout = io::stdout();
    if cmd.dry_run {
        check_patch(&cmd, &objects, addr, &mut stdout.lock());
        println!("dry run: nothing patched");
        return;
    }
    let checked = check_patch(&cmd, &objects, addr, &mut io::stderr().lock());
    let expect = match (cmd.expect.map(|h| h.0), checked) {
        // --force leaves the verdict to the kernel, under the PT lock.
        (Some(e), Some(here)) if e != here && !cmd.force => {
            refuse(&format!("--expect {} is not what is there now ({})", hex_bytes(&e), hex_bytes(&here)))
        }
        (Some(e), _) => Some(e),
        (None, here) => here,
    };

    let req = PatchRequest {
        pid: cmd.pid,
        addr,
        bytes: cmd.bytes.0,
        expect,
        persist: cmd.persist,
        install_pmd: cmd.install_pmd,
    };
    let seq = device::journal_seq();
    let dev = Device::open().unwrap_or_else(|e| fail("open /dev/hugepoke", e, seq));
    let handle = dev.patch(&req).unwrap_or_else(|e| fail_for("patch", e, seq, Some(req.pid)));
    println!("{handle}");
    let _ = io::stdout().flush();
    if !req.persist {
        // Hold the patch until stdin closes; closing the device restores it.
        let _ = io::stdin().read_to_end(&mut Vec::new());
    }
}

/// debugfs `patches`, with each patch's symbol+offset appended.
fn list(seq: u64) {
    let text = proc::debugfs("patches").unwrap_or_else(|e| fail("patches", e, seq));
    let mut objects: Vec<(i32, Vec<Object>)> = Vec::new();
    for line in text.lines() {
        if line.starts_with("# handle") {
            println!("{line} symbol");
            continue;
        }
        if line.starts_with('#') {
            println!("{line}");
            continue;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        let (Some(pid), Some(addr)) = (w.get(1).and_then(|p| p.parse::<i32>().ok()), w.get(2).and_then(|a| parse_number(a))) else {
            println!("{line}");
            continue;
        };
        if !objects.iter().any(|(p, _)| *p == pid) {
            objects.push((pid, symbols::objects(pid).unwrap_or_default()));
        }
        let objs = &objects.iter().find(|(p, _)| *p == pid).unwrap().1;
        let sym = describe(objs, addr).unwrap_or_else(|| "-".into());
        println!("{line} {sym}");
    }
}

fn collapse_cmd(pid: i32) {
    let reports = collapse::collapse(pid).unwrap_or_else(|e| {
        eprintln!("hugepoke: collapse: {e}");
        std::process::exit(1)
    });
    for r in &reports {
        println!("{}", collapse::report_line(r));
    }
    if reports.iter().any(|r| !r.failures.is_empty()) {
        std::process::exit(1);
    }
}

fn print_debugfs(name: &str, seq: u64) {
    match proc::debugfs(name) {
        Ok(text) => print!("{text}"),
        Err(e) => fail(name, e, seq),
    }
}

fn main() {
    let cli = Cli::parse();
    let seq = device::journal_seq();
    match cli.command {
        Command::Patch(cmd) => patch(cmd),
        Command::Restore { handle } => {
            let dev = Device::open().unwrap_or_else(|e| fail("open /dev/hugepoke", e, seq));
            dev.restore(handle).unwrap_or_else(|e| fail("restore", e, seq));
        }
        Command::Query { handle } => {
            let dev = Device::open().unwrap_or_else(|e| fail("open /dev/hugepoke", e, seq));
            let q = dev.query(handle).unwrap_or_else(|e| fail("query", e, seq));
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            let n = q.len as usize;
            println!(
                "handle={handle} state={} pid={} addr={:#x} len={n} flags={:#x} pfn={:#x} bytes={} orig={}",
                if q.state == hugepoke::uapi::STATE_LIVE { "live" } else { "gone" },
                q.pid,
                q.addr,
                q.patch_flags,
                q.pfn,
                hex(&q.bytes[..n]),
                hex(&q.orig[..n])
            );
        }
        Command::List => list(seq),
        Command::Events => print_debugfs("events", seq),
        Command::Stats => print_debugfs("stats", seq),
        Command::Collapse { pid } => collapse_cmd(pid),
        Command::Map(cmd) => map_cmd(cmd),
    }
}

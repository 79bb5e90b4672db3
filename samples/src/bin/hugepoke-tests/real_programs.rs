//! Real programs that no one here wrote (issue 9), on a tmpfs `huge=always`:
//! Debian's python3 (a non-PIE interpreter, run from a copy on the tmpfs)
//! driving, through ctypes, a function of Debian's libz3 (a 23 MB C++
//! library whose text has eight 2 MiB-aligned ranges a PMD can map),
//! addressed by symbol with the CLI.  Each test changes what the program
//! visibly does, restores it, and checks that the page-cache page and the
//! PMD come back, from the kernel's own accounting (pagemap, kpageflags,
//! smaps) and the journal.  The program keeps running throughout.
//!
//! The function: `std::__detail::__to_chars_10_impl<unsigned>(char *first,
//! unsigned len, unsigned value)`, the decimal printer libstdc++ inlines
//! into libz3, at 0x35e790 in its text.  Patched with `ret` (`c3`, a
//! start-of-function return), it writes nothing: "1234----" becomes
//! "--------".
//!
//! python3's own text is on the tmpfs too, but cannot be PMD-mapped at all
//! (a non-PIE text segment at 0x41f000-0x6d2000 holds no 2 MiB-aligned
//! 2 MiB range): its own function (`Py_IsInitialized`) is patched and
//! restored all the same, and the journal says why no PMD comes back.

use crate::cli::hugepoke;
use crate::common::*;
use crate::TestResult;
use hugepoke::proc::PagemapEntry;
use hugepoke::symbols;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;

const PMD: u64 = 2 << 20;
const LIB: &str = "/usr/lib/x86_64-linux-gnu/libz3.so.4";
const FUNC: &str = "_ZNSt8__detail18__to_chars_10_implIjEEvPcjT_";
/// The tmpfs (`huge=always`) the programs run from.
const ALWAYS: &str = "/tmp/hugepoke-real";
/// A tmpfs `huge=advise`: 4 KiB page cache for what is copied in, text
/// mapped 2 MiB-aligned; `hugepoke collapse` makes it huge.
const ADVISE: &str = "/tmp/hugepoke-real-advise";

const SCRIPT: &str = r#"
import ctypes, os, sys, threading
lib = ctypes.CDLL(sys.argv[1])
digits = lib[sys.argv[2]]
digits.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint]
digits.restype = None
libc = ctypes.CDLL(None)
def to_chars(n):
    buf = ctypes.create_string_buffer(b"-" * 8, 8)
    digits(buf, len(str(n)), n)
    return buf.raw.decode("latin-1")
counts, cpus, threads, stop = {}, {}, [], [False]
def worker(cpu):
    os.sched_setaffinity(0, {cpu})
    mine = counts[cpu] = {}
    seen = cpus[cpu] = set()
    buf = ctypes.create_string_buffer(8)
    while not stop[0]:
        ctypes.memset(buf, 45, 8)
        digits(buf, 4, 1234)
        v = buf.raw.decode("latin-1")
        mine[v] = mine.get(v, 0) + 1
        seen.add(libc.sched_getcpu())
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "call":
        print(to_chars(int(cmd[1])), flush=True)
    elif cmd[0] == "py":
        print(ctypes.pythonapi.Py_IsInitialized(), flush=True)
    elif cmd[0] == "threads":
        for cpu in (0, 1):
            t = threading.Thread(target=worker, args=(cpu,))
            t.start()
            threads.append(t)
        print("started", flush=True)
    elif cmd[0] == "counts":
        out = []
        for c in (0, 1):
            m = dict(counts.get(c, {}))
            ok, patched = m.pop("1234----", 0), m.pop("--------", 0)
            out.append("%d %d %d %d %s" % (c, ok, patched, sum(m.values()), ",".join(map(str, sorted(cpus.get(c, ()))))))
        print(";".join(out), flush=True)
    elif cmd[0] == "quit":
        break
stop[0] = True
for t in threads:
    t.join()
print("bye", flush=True)
"#;

/// The copies on the tmpfs: `(python3, libz3)`.
struct Copies {
    python: String,
    lib: String,
}

fn mount_tmpfs(dir: &str, huge: &str) -> Result<(), String> {
    io(std::fs::create_dir_all(dir))?;
    let mounted = Command::new("mountpoint")
        .args(["-q", dir])
        .status()
        .map_err(|e| e.to_string())?
        .success();
    if !mounted {
        let opts = format!("huge={huge},size=256M");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "hugepoke-real", dir])
            .status()
            .map_err(|e| e.to_string())?;
        ensure!(st.success(), "mount -t tmpfs -o {opts} {dir} failed");
    }
    Ok(())
}

/// `src` copied (once) into `dir`: from a copy already on the other
/// tmpfs when there is one, else from the host's file, in 4 MiB reads
/// (`std::fs::copy` sends a 9p file in pipe-sized pieces, a round trip
/// each: about 38 s for python3 and libz3 in the debug guest).
fn copy_in(dir: &str, src: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let name = src.rsplit('/').next().unwrap();
    let dst = format!("{dir}/{name}");
    if std::path::Path::new(&dst).exists() {
        return Ok(dst);
    }
    let from = [ALWAYS, ADVISE]
        .iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| p != &dst && std::path::Path::new(p).exists())
        .unwrap_or_else(|| src.to_string());
    let tmp = format!("{dst}.tmp");
    let (mut input, mut output) = (
        io(std::fs::File::open(&from))?,
        io(std::fs::File::create(&tmp))?,
    );
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = io(input.read(&mut buf))?;
        if n == 0 {
            break;
        }
        io(output.write_all(&buf[..n]))?;
    }
    let mode = io(std::fs::metadata(&from))?.permissions();
    io(std::fs::set_permissions(&tmp, mode))?;
    io(std::fs::rename(&tmp, &dst))?;
    Ok(dst)
}

/// python3 and libz3 from the host's Debian, copied (once) onto the tmpfs
/// at `dir`; a SKIP when the host lacks them.
fn copies(dir: &'static str, huge: &str) -> Result<Copies, String> {
    let python = std::fs::canonicalize("/usr/bin/python3")
        .map_err(|_| "SKIP: no /usr/bin/python3 on the host".to_string())?;
    if !std::path::Path::new(LIB).exists() {
        return Err(format!(
            "SKIP: no {LIB} on the host (libz3-4, which llvm-19 depends on)"
        ));
    }
    mount_tmpfs(dir, huge)?;
    hugepoke::testkit::backing::compact_memory();
    let started = Instant::now();
    let c = Copies {
        python: copy_in(dir, python.to_str().unwrap())?,
        lib: copy_in(dir, LIB)?,
    };
    println!(
        "# {dir} (huge={huge}): python3 and libz3 copied in {:?}",
        started.elapsed()
    );
    Ok(c)
}

fn always() -> Result<&'static Copies, String> {
    static COPIES: OnceLock<Result<Copies, String>> = OnceLock::new();
    COPIES
        .get_or_init(|| copies(ALWAYS, "always"))
        .as_ref()
        .map_err(Clone::clone)
}

/// A python3 process running [`SCRIPT`] over a library.
struct Python {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: i32,
}

impl Python {
    fn spawn(python: &str, lib: &str) -> Result<Python, String> {
        let started = Instant::now();
        let mut child = Command::new(python)
            .args(["-c", SCRIPT, lib, FUNC])
            // Its stdlib is found from /usr, not from beside the copy.
            .env("PYTHONHOME", "/usr")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{python}: {e}"))?;
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut p = Python {
            child,
            stdin,
            stdout,
            pid: 0,
        };
        let ready = p.line()?;
        p.pid = ready
            .strip_prefix("ready ")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("python3 said {ready:?}"))?;
        println!("# python3 pid {} ready in {:?}", p.pid, started.elapsed());
        Ok(p)
    }

    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        io(self.stdout.read_line(&mut line))?;
        ensure!(
            !line.is_empty(),
            "python3 is gone: {:?}",
            self.child.try_wait()
        );
        Ok(line.trim_end().to_string())
    }

    fn ask(&mut self, cmd: &str) -> Result<String, String> {
        writeln!(self.stdin, "{cmd}").map_err(|e| format!("python3 is gone: {e}"))?;
        self.line()
    }

    /// What the library function writes for 1234 now.
    fn call(&mut self) -> Result<String, String> {
        self.ask("call 1234")
    }

    fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            other => Err(format!("python3 died: {other:?}")),
        }
    }

    /// Stop it cleanly: it must exit 0.
    fn quit(mut self) -> Result<(), String> {
        ensure!(self.ask("quit")? == "bye", "python3 did not say bye");
        let st = io(self.child.wait())?;
        ensure!(st.success(), "python3 exited {st:?}");
        Ok(())
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `hugepoke patch --persist --symbol …`: the handle it printed first.
fn patch_symbol(
    pid: i32,
    symbol: &str,
    object: Option<&str>,
    bytes: &str,
) -> Result<(u64, String), String> {
    let pid_s = pid.to_string();
    let mut args = vec![
        "patch",
        "--pid",
        &pid_s,
        "--symbol",
        symbol,
        "--bytes",
        bytes,
        "--persist",
    ];
    if let Some(o) = object {
        args.extend(["--object", o]);
    }
    let (code, out, err) = hugepoke(&args)?;
    ensure!(code == 0, "hugepoke {args:?} exited {code}: {err}");
    let handle = out
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("CLI printed {out:?}"))?;
    Ok((handle, err))
}

fn restore(handle: u64) -> TestResult {
    let (code, _, err) = hugepoke(&["restore", &handle.to_string()])?;
    ensure!(code == 0, "hugepoke restore {handle} exited {code}: {err}");
    Ok(())
}

/// The executable mapping of `path` in `pid`, from smaps.
fn text_of(pid: i32, path: &str) -> Result<SmapsEntry, String> {
    let text = io(std::fs::read_to_string(format!("/proc/{pid}/smaps")))?;
    proc::parse_smaps(&text)
        .into_iter()
        .find(|e| e.path == path && e.perms.contains('x'))
        .ok_or_else(|| format!("pid {pid} has no executable mapping of {path}"))
}

fn page(pid: i32, addr: u64) -> Result<PagemapEntry, String> {
    io(io(Pagemap::open(pid))?.entry(addr))
}

/// Where `symbol` is in `pid`, as the library resolves it (the CLI too).
fn address_of(pid: i32, symbol: &str, object: Option<&str>) -> Result<u64, String> {
    let objects = symbols::objects(pid)?;
    Ok(symbols::resolve(&objects, symbol, object)?.addr)
}

/// The page-cache page at `addr` (in a PMD-mapped range) as it is before a
/// patch: present, file, a THP subpage that lines up with the 2 MiB range.
fn page_cache_page(pid: i32, addr: u64) -> Result<u64, String> {
    let e = page(pid, addr)?;
    ensure!(e.present() && e.file(), "{addr:#x} before PATCH: {e:?}");
    let f = io(io(KpageFlags::open())?.get(e.pfn()))?;
    ensure!(f.thp() && !f.anon(), "{addr:#x} before PATCH: flags {f:?}");
    ensure!(
        e.pfn() % 512 == (addr % PMD) / 4096,
        "pfn {:#x} does not line up with {addr:#x} in a PMD",
        e.pfn()
    );
    Ok(e.pfn())
}

/// After RESTORE: `addr` maps page-cache PFN `pfn` again (re-faulting it
/// with `poke` while the queued collapse may have retracted the table).
fn page_cache_page_back(
    pid: i32,
    addr: u64,
    pfn: u64,
    mut poke: impl FnMut() -> TestResult,
) -> TestResult {
    let mut e = page(pid, addr)?;
    for _ in 0..50 {
        if e.present() {
            break;
        }
        poke()?;
        e = page(pid, addr)?;
    }
    ensure!(
        e.present() && e.file() && e.pfn() == pfn,
        "{addr:#x} after RESTORE: {e:?}, want page-cache pfn {pfn:#x}"
    );
    let f = io(io(KpageFlags::open())?.get(e.pfn()))?;
    ensure!(!f.anon(), "{addr:#x} after RESTORE: flags {f:?}");
    Ok(())
}

/// The journal of one patch: RESTORE wrote, zapped the anonymous page and
/// queued the collapse of `range`, which succeeded.
fn journal_shows_restore_and_collapse(handle: u64, pid: i32, range: u64) -> TestResult {
    let evs = events_of(handle)?;
    let got = steps(&evs);
    for want in [
        "patched:ok",
        "restore:ok",
        "restore_bytes:ok",
        "zap_anon_page:ok",
        "queue_collapse:ok",
        "restored:ok",
    ] {
        ensure!(
            got.iter().any(|s| s == want),
            "journal of handle {handle} lacks {want}: {got:?}"
        );
    }
    let collapse = events()?
        .into_iter()
        .rev()
        .find(|e| e.step == "collapse" && e.pid == pid && e.addr == Some(range))
        .ok_or_else(|| format!("no collapse of {range:#x} journaled"))?;
    ensure!(
        collapse.result == "ok" && collapse.note.starts_with("SCAN_SUCCEED"),
        "collapse {collapse:?}"
    );
    Ok(())
}

/// Poke until smaps shows `want` kB PMD-mapped in `path`'s text again.
fn wait_pmd_kb(
    pid: i32,
    path: &str,
    want: u64,
    mut poke: impl FnMut() -> TestResult,
) -> Result<Duration, String> {
    wait_for(
        &format!("{want} kB PMD-mapped in {path}"),
        Duration::from_secs(30),
        || {
            poke()?;
            Ok(text_of(pid, path)?.pmd_mapped_kb() == want)
        },
    )
}

/// `hugepoke collapse --pid` on the program; its report line for `path`.
fn collapse_cli(pid: i32, path: &str) -> Result<String, String> {
    let (code, out, err) = hugepoke(&["collapse", "--pid", &pid.to_string()])?;
    ensure!(code == 0, "hugepoke collapse exited {code}: {out}{err}");
    out.lines()
        .find(|l| l.split_whitespace().nth(2) == Some(path))
        .map(str::to_string)
        .ok_or_else(|| format!("collapse reported nothing for {path}: {out}"))
}

/// python3 calls a libz3 function through ctypes; patched by symbol with
/// `ret` it writes nothing; restored, it writes the digits again; the
/// page-cache page and the PMD come back.
pub(crate) fn real_python3_library_function_by_symbol() -> TestResult {
    library_cycle(always()?)
}

/// The same, with python3 and libz3 on ext4 and on XFS: copied from the
/// tmpfs copies (a 9p read of libz3 under TCG takes most of a test's time)
/// and synced, since a dirty page cache is not collapsed.  `ld.so` maps the
/// library 2 MiB-aligned there too (`thp_get_unmapped_area`), its page
/// cache holds the small folios the copy wrote, and `hugepoke collapse
/// --pid` makes its text huge before the cycle.
pub(crate) fn real_python3_library_function_by_symbol_on_ext4() -> TestResult {
    library_cycle(&on_image("ext4")?)
}

pub(crate) fn real_python3_library_function_by_symbol_on_xfs() -> TestResult {
    library_cycle(&on_image("xfs")?)
}

/// python3 and libz3 on a fresh `fs` image (hugepoke::testkit::backing).
fn on_image(fs: &str) -> Result<Copies, String> {
    let from = always()?;
    let dir = hugepoke::testkit::backing::image(fs)?;
    hugepoke::testkit::backing::compact_memory();
    let started = Instant::now();
    let copy = |src: &str| -> Result<String, String> {
        let dst = format!("{dir}/{}", src.rsplit('/').next().unwrap());
        let _ = std::fs::remove_file(&dst);
        io(std::fs::copy(src, &dst))?;
        io(io(std::fs::File::open(&dst))?.sync_all())?;
        Ok(dst)
    };
    let c = Copies {
        python: copy(&from.python)?,
        lib: copy(&from.lib)?,
    };
    println!(
        "# {fs}: python3 and libz3 copied from the tmpfs and synced in {:?}",
        started.elapsed()
    );
    Ok(c)
}

/// PATCH libz3's function by symbol in a running python3, see it change,
/// RESTORE, see the page-cache page and the PMD back.
fn library_cycle(c: &Copies) -> TestResult {
    let mut py = Python::spawn(&c.python, &c.lib)?;
    ensure!(py.call()? == "1234----", "unpatched: {:?}", py.call()?);
    // Its text PMD-mapped, whatever has faulted so far.
    let line = collapse_cli(py.pid, &c.lib)?;
    println!("# {line}");
    let pmd_kb = text_of(py.pid, &c.lib)?.pmd_mapped_kb();
    ensure!(
        pmd_kb == 8 * 2048,
        "libz3's text: {pmd_kb} kB PMD-mapped, want its 8 ranges: {line}"
    );
    let addr = address_of(py.pid, FUNC, None)?;
    let range = addr & !(PMD - 1);
    let pfn = page_cache_page(py.pid, addr)?;

    let (handle, said) = patch_symbol(py.pid, FUNC, None, "c3")?;
    ensure!(
        said.contains(&format!("{addr:#x}"))
            && said.contains("ret")
            && said.contains("mov ecx, edx"),
        "CLI said: {said}"
    );
    ensure!(py.call()? == "--------", "patched function still writes");
    let e = page(py.pid, addr)?;
    ensure!(e.present() && !e.file(), "patched page {e:?}");
    let s = text_of(py.pid, &c.lib)?;
    ensure!(
        s.pmd_mapped_kb() == pmd_kb - 2048 && s.kb("Anonymous") == 4,
        "after PATCH: {s:?}"
    );
    let (_, list, _) = hugepoke(&["list"])?;
    ensure!(
        list.lines()
            .any(|l| l.starts_with(&format!("{handle} ")) && l.ends_with(&format!("{FUNC}+0x0"))),
        "list: {list}"
    );

    restore(handle)?;
    ensure!(
        py.call()? == "1234----",
        "restored function does not write the digits"
    );
    page_cache_page_back(py.pid, addr, pfn, || py.call().map(drop))?;
    let took = wait_pmd_kb(py.pid, &c.lib, pmd_kb, || py.call().map(drop))?;
    println!("# PMD back {took:?} after RESTORE");
    ensure!(
        text_of(py.pid, &c.lib)?.kb("Anonymous") == 0,
        "anonymous memory left in libz3's text"
    );
    page_cache_page(py.pid, addr)?;
    journal_shows_restore_and_collapse(handle, py.pid, range)?;
    py.alive()?;
    py.quit()
}

/// `hugepoke patch --file libz3 --symbol FUNC` over two python3
/// processes that map the same copy: one handle, both patched (the
/// instruction check run in the first), both given their bytes, their
/// page-cache page and their PMDs back by one RESTORE.
pub(crate) fn real_python3_library_patched_by_file_in_two_processes() -> TestResult {
    let c = always()?;
    let mut pys = [
        Python::spawn(&c.python, &c.lib)?,
        Python::spawn(&c.python, &c.lib)?,
    ];
    let mut pmd_kb = 0;
    for py in pys.iter_mut() {
        collapse_cli(py.pid, &c.lib)?;
        pmd_kb = text_of(py.pid, &c.lib)?.pmd_mapped_kb();
        ensure!(pmd_kb == 8 * 2048, "libz3's text: {pmd_kb} kB PMD-mapped");
    }
    // Inside an instruction: the check, run in the first process, refuses.
    let inside = format!("{FUNC}+1");
    let bad = [
        "patch",
        "--file",
        &c.lib,
        "--symbol",
        &inside,
        "--bytes",
        "c3",
        "--persist",
    ];
    let (code, _, err) = hugepoke(&bad)?;
    ensure!(
        code == 1 && err.contains("instruction check failed"),
        "{bad:?} exited {code}: {err}"
    );
    for py in pys.iter_mut() {
        ensure!(
            py.call()? == "1234----",
            "pid {}: patched by a refused call",
            py.pid
        );
    }
    let args = [
        "patch",
        "--file",
        &c.lib,
        "--symbol",
        FUNC,
        "--bytes",
        "c3",
        "--persist",
    ];
    let (code, out, err) = hugepoke(&args)?;
    ensure!(code == 0, "hugepoke {args:?} exited {code}: {err}");
    let handle: u64 = out
        .trim()
        .parse()
        .map_err(|_| format!("CLI printed {out:?}"))?;
    ensure!(
        err.contains("patched 2 processes") && err.contains("ret") && err.contains("mov ecx, edx"),
        "CLI said: {err}"
    );
    for py in pys.iter_mut() {
        ensure!(py.call()? == "--------", "pid {}: not patched", py.pid);
        let s = text_of(py.pid, &c.lib)?;
        ensure!(
            s.pmd_mapped_kb() == pmd_kb - 2048 && s.kb("Anonymous") == 4,
            "pid {} after PATCH: {s:?}",
            py.pid
        );
    }
    restore(handle)?;
    for py in pys.iter_mut() {
        ensure!(py.call()? == "1234----", "pid {}: not restored", py.pid);
        let pid = py.pid;
        wait_pmd_kb(pid, &c.lib, pmd_kb, || py.call().map(drop))?;
        ensure!(
            text_of(pid, &c.lib)?.kb("Anonymous") == 0,
            "pid {pid}: anonymous memory left in libz3's text"
        );
    }
    let [a, b] = pys;
    a.quit()?;
    b.quit()
}

/// python3's own function, in a non-PIE text no PMD can map: PATCH and
/// RESTORE work, the page-cache page comes back, and the journal says why
/// there is no PMD.
pub(crate) fn real_python3_own_function_in_text_no_pmd_can_map() -> TestResult {
    let c = always()?;
    let mut py = Python::spawn(&c.python, &c.lib)?;
    ensure!(py.ask("py")? == "1", "Py_IsInitialized() unpatched");
    let line = collapse_cli(py.pid, &c.python)?;
    ensure!(
        line.contains("no 2 MiB-aligned 2 MiB range inside"),
        "collapse said: {line}"
    );
    let addr = address_of(py.pid, "Py_IsInitialized", None)?;
    let before = page(py.pid, addr)?;
    ensure!(before.present() && before.file(), "{before:?}");

    let (handle, _) = patch_symbol(
        py.pid,
        "Py_IsInitialized",
        Some("python3.11"),
        "b8 2a 00 00 00 c3",
    )?;
    ensure!(py.ask("py")? == "42", "patched Py_IsInitialized()");
    ensure!(!page(py.pid, addr)?.file(), "patched page is not anonymous");
    restore(handle)?;
    ensure!(py.ask("py")? == "1", "restored Py_IsInitialized()");
    page_cache_page_back(py.pid, addr, before.pfn(), || py.ask("py").map(drop))?;
    ensure!(
        text_of(py.pid, &c.python)?.kb("Anonymous") == 0,
        "anonymous memory left"
    );
    ensure!(
        text_of(py.pid, &c.python)?.pmd_mapped_kb() == 0,
        "python3's text PMD-mapped?"
    );
    // The journal: the collapse was tried and refused, with the kernel's reason.
    let evs = events_of(handle)?;
    ensure!(
        steps(&evs).iter().any(|s| s == "restored:ok"),
        "journal {:?}",
        steps(&evs)
    );
    let collapse = wait_for("the collapse verdict", Duration::from_secs(10), || {
        Ok(events()?
            .iter()
            .any(|e| e.step == "collapse" && e.pid == py.pid))
    })
    .and_then(|_| {
        events()?
            .into_iter()
            .rev()
            .find(|e| e.step == "collapse" && e.pid == py.pid)
            .ok_or("gone".into())
    })?;
    ensure!(
        collapse.result != "ok" && !collapse.note.is_empty(),
        "collapse {collapse:?}"
    );
    println!(
        "# python3's text: collapse {} {}",
        collapse.result, collapse.note
    );
    py.quit()
}

/// Two threads of python3, pinned to CPU 0 and CPU 1, call the libz3
/// function (ctypes drops the GIL around the call) all the while it is
/// patched and restored: both see the patch, both see it go, neither sees
/// anything else, and the program lives on.
pub(crate) fn real_python3_threads_on_both_cpus_while_patched_and_restored() -> TestResult {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cpus < 2 {
        return Err(format!("SKIP: {cpus} CPU"));
    }
    let c = always()?;
    let mut py = Python::spawn(&c.python, &c.lib)?;
    let pid = py.pid;
    collapse_cli(pid, &c.lib)?;
    let pmd_kb = text_of(pid, &c.lib)?.pmd_mapped_kb();
    let addr = address_of(pid, FUNC, Some("libz3"))?;
    let pfn = page_cache_page(pid, addr)?;
    ensure!(py.ask("threads")? == "started", "threads");
    // (ok, patched, other) per CPU, and the CPUs each thread ran on.
    type Counts = Vec<(u64, u64, u64, String)>;
    let mut counts = || -> Result<Counts, String> {
        let line = py.ask("counts")?;
        line.split(';')
            .map(|t| {
                let w: Vec<&str> = t.split(' ').collect();
                let n = |i: usize| {
                    w.get(i)
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| format!("counts {line:?}"))
                };
                Ok((n(1)?, n(2)?, n(3)?, w.get(4).unwrap_or(&"").to_string()))
            })
            .collect()
    };
    let wait_both = |what: &str,
                     counts: &mut dyn FnMut() -> Result<Counts, String>,
                     pick: fn(&(u64, u64, u64, String)) -> u64| {
        let base: Vec<u64> = counts()?.iter().map(pick).collect();
        wait_for(what, Duration::from_secs(60), || {
            let now = counts()?;
            Ok(now.iter().zip(&base).all(|(n, b)| pick(n) > *b))
        })
    };
    wait_both("both threads calling", &mut counts, |c| c.0)?;

    let (handle, _) = patch_symbol(pid, FUNC, Some("libz3"), "c3")?;
    let took = wait_both("both threads running the patch", &mut counts, |c| c.1)?;
    println!("# both CPUs ran the patched function within {took:?}");
    restore(handle)?;
    let took = wait_both(
        "both threads running the original again",
        &mut counts,
        |c| c.0,
    )?;
    println!("# both CPUs ran the restored function within {took:?}");
    let now = counts()?;
    for (cpu, (ok, patched, other, seen)) in now.iter().enumerate() {
        ensure!(
            *other == 0,
            "CPU {cpu}'s thread saw {other} results that are neither: {now:?}"
        );
        ensure!(
            *seen == cpu.to_string(),
            "the thread pinned to CPU {cpu} ran on {seen:?}"
        );
        println!("# CPU {cpu}: {ok} calls unpatched, {patched} patched");
    }
    py.alive()?;
    page_cache_page_back(py.pid, addr, pfn, || py.call().map(drop))?;
    wait_pmd_kb(py.pid, &c.lib, pmd_kb, || py.call().map(drop))?;
    journal_shows_restore_and_collapse(handle, py.pid, addr & !(PMD - 1))?;
    py.quit()
}

/// `hugepoke collapse --pid` makes a real program's library text huge
/// without its cooperation: libz3 on a tmpfs `huge=advise` (4 KiB page
/// cache, mapped 2 MiB-aligned) has no PMD until the collapse, then all 8
/// ranges; what cannot get one says why; the program works on.
pub(crate) fn collapse_pid_makes_a_real_programs_text_huge() -> TestResult {
    let c = copies(ADVISE, "advise")?;
    let mut py = Python::spawn(&c.python, &c.lib)?;
    ensure!(py.call()? == "1234----", "unpatched");
    let addr = address_of(py.pid, FUNC, None)?;
    let s = text_of(py.pid, &c.lib)?;
    ensure!(
        s.pmd_mapped_kb() == 0,
        "libz3's text PMD-mapped before the collapse: {s:?}"
    );
    ensure!(
        s.start % PMD == 0x8a000 % PMD,
        "libz3 text at {:#x}: not mapped 2 MiB-aligned",
        s.start
    );
    let kpf = io(KpageFlags::open())?;
    let e = page(py.pid, addr)?;
    ensure!(
        e.present() && !io(kpf.get(e.pfn()))?.thp(),
        "before: {e:?} is a THP already"
    );

    let started = Instant::now();
    let (code, out, err) = hugepoke(&["collapse", "--pid", &py.pid.to_string()])?;
    println!("# hugepoke collapse took {:?}", started.elapsed());
    ensure!(code == 0, "collapse exited {code}: {out}{err}");
    let line = out
        .lines()
        .find(|l| l.contains(&c.lib))
        .ok_or(format!("no line for libz3: {out}"))?;
    println!("# {line}");
    ensure!(
        line.contains("16384 kB PMD-mapped, all 8 2 MiB range(s) collapsed"),
        "libz3: {line}"
    );
    ensure!(
        text_of(py.pid, &c.lib)?.pmd_mapped_kb() == 8 * 2048,
        "smaps disagrees: {:?}",
        text_of(py.pid, &c.lib)?
    );
    let e = page(py.pid, addr)?;
    let f = io(kpf.get(e.pfn()))?;
    ensure!(
        e.present() && e.file() && f.thp() && !f.anon(),
        "after: {e:?} {f:?}"
    );
    let python = out
        .lines()
        .find(|l| l.contains(&c.python))
        .ok_or(format!("no line for python3: {out}"))?;
    ensure!(
        python.contains("0 kB PMD-mapped; no PMD: no 2 MiB-aligned 2 MiB range inside"),
        "python3: {python}"
    );
    let libc = out
        .lines()
        .find(|l| l.contains("/libc.so.6"))
        .ok_or(format!("no line for libc: {out}"))?;
    ensure!(libc.contains("no PMD:"), "libc: {libc}");
    ensure!(
        py.call()? == "1234----",
        "the program's function after the collapse"
    );
    py.alive()?;
    py.quit()
}

/// `hugepoke patch --sites` by symbol, in two objects of one real process:
/// libz3's function and python3's own `Py_IsInitialized`, one batch, each
/// line resolved as `--symbol` would be; then one RESTORE for both.
pub(crate) fn real_python3_sites_by_symbol_in_two_objects() -> TestResult {
    let c = always()?;
    let mut py = Python::spawn(&c.python, &c.lib)?;
    ensure!(
        py.call()? == "1234----" && py.ask("py")? == "1",
        "unpatched"
    );
    let want = [
        address_of(py.pid, FUNC, None)?,
        address_of(py.pid, "Py_IsInitialized", Some("python3.11"))?,
    ];
    let file = format!("/tmp/hugepoke-sites-py-{}", py.pid);
    io(std::fs::write(&file, format!("# libz3, then python3\n{FUNC} c3\nPy_IsInitialized b82a000000c3   # mov eax, 42; ret\n")))?;
    let (code, out, err) = hugepoke(&[
        "--json",
        "patch",
        "--pid",
        &py.pid.to_string(),
        "--sites",
        &file,
        "--persist",
    ])?;
    let _ = std::fs::remove_file(&file);
    ensure!(code == 0, "patch --sites exited {code}: {err}");
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("not JSON ({e}): {out}"))?;
    let handle = v["handle"].as_u64().ok_or(format!("no handle: {v}"))?;
    for (i, (addr, line)) in want.iter().zip([2, 3]).enumerate() {
        let s = &v["sites"][i];
        ensure!(
            s["addr"] == *addr
                && s["line"] == line
                && s["check"]["refusals"]
                    .as_array()
                    .is_some_and(|r| r.is_empty()),
            "site {i}: {s}"
        );
    }
    ensure!(
        py.call()? == "--------" && py.ask("py")? == "42",
        "not both patched"
    );
    let (code, q, err) = hugepoke(&["query", "--json", &handle.to_string()])?;
    ensure!(code == 0, "query: {err}");
    let q: serde_json::Value = serde_json::from_str(&q).map_err(|e| e.to_string())?;
    ensure!(q["count"] == 2, "query: {q}");
    for (i, addr) in want.iter().enumerate() {
        let e = page(py.pid, *addr)?;
        ensure!(
            e.present()
                && !e.file()
                && q["sites"][i]["pfn"] == e.pfn()
                && q["sites"][i]["addr"] == *addr,
            "site {i} vs pagemap {e:?}: {q}"
        );
    }
    restore(handle)?;
    ensure!(
        py.call()? == "1234----" && py.ask("py")? == "1",
        "not both restored"
    );
    py.quit()
}

// This module's in-guest tests (main.rs's SUITE says when they run).
tests! {
    TESTS: [
        real_python3_library_function_by_symbol,
        real_python3_library_function_by_symbol_on_ext4,
        real_python3_library_function_by_symbol_on_xfs,
        real_python3_own_function_in_text_no_pmd_can_map,
        real_python3_library_patched_by_file_in_two_processes,
        real_python3_threads_on_both_cpus_while_patched_and_restored,
        real_python3_sites_by_symbol_in_two_objects,
        collapse_pid_makes_a_real_programs_text_huge,
    ];
}

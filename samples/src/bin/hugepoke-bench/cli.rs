//! The CLI in front of a batch (issue 22): `hugepoke patch --sites` with
//! 10,000 sites by symbol in a real library, libLLVM.so.19.1 copied onto a
//! huge tmpfs and loaded by a python3 process, checked only (`--dry-run`),
//! then checked and patched (one PATCH_BATCH), then `hugepoke restore` of
//! its handle.  Each repetition runs the three commands as a user would;
//! every site's byte is read back after each.

use super::Run;
use crate::probe::{check, timed, Mem};
use crate::report::{Row, SiteCost};
use hugepoke::device::batch_site;
use hugepoke::symbols::Elf;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const LIB: &str = "/usr/lib/x86_64-linux-gnu/libLLVM.so.19.1";
const DIR: &str = "/tmp/hugepoke-bench-lib";
const SITES: usize = 10_000;
const INT3: u8 = 0xcc;

/// python3 holding the copy loaded (ctypes), waiting on stdin.
struct Loader(Child, i32);

impl Loader {
    fn spawn(lib: &str) -> Self {
        let script = "import ctypes, os, sys\nctypes.CDLL(sys.argv[1])\nprint('ready', os.getpid(), flush=True)\nsys.stdin.read()\n";
        let child = Command::new("/usr/bin/python3")
            .args(["-c", script, lib])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn();
        check!(child.is_ok(), "python3: {:?}", child.err());
        let mut child = child.unwrap();
        let mut line = String::new();
        let read = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let pid = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok());
        check!(read.is_ok() && pid.is_some(), "python3 said {line:?}");
        Loader(child, pid.unwrap())
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The library on a huge tmpfs (copied once).
fn copy_of_lib() -> String {
    let dst = format!("{DIR}/libLLVM.so.19.1");
    if !std::path::Path::new(&dst).exists() {
        let _ = std::fs::create_dir_all(DIR);
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "huge=always,size=256M",
                "hugepoke-bench-lib",
                DIR,
            ])
            .status();
        check!(st.is_ok_and(|s| s.success()), "mounting a tmpfs on {DIR}");
        let c = std::fs::copy(LIB, &dst);
        check!(c.is_ok(), "copying {LIB}: {:?}", c.err());
    }
    dst
}

/// `SITES` exported functions spread evenly over the library (in address
/// order), each named by exactly one dynamic symbol and at an address no
/// other has: the sites file's lines, `NAME cc`.
fn sites_file(lib: &str) -> String {
    let elf = std::fs::File::open(lib)
        .map_err(|e| e.to_string())
        .and_then(|f| Elf::read(f, lib));
    check!(matches!(elf, Ok(Some(_))), "reading {lib}: {:?}", elf.err());
    let mut syms: Vec<_> = elf
        .unwrap()
        .unwrap()
        .symbols()
        .into_iter()
        .filter(|s| s.dynamic && s.size > 0 && !s.ifunc)
        .collect();
    syms.sort_by(|a, b| a.name.cmp(&b.name));
    let unique: Vec<_> = syms
        .iter()
        .enumerate()
        .filter(|(i, s)| {
            (*i == 0 || syms[i - 1].name != s.name)
                && syms.get(i + 1).is_none_or(|n| n.name != s.name)
        })
        .map(|(_, s)| s)
        .collect();
    // Aliases (two names, one address) would be two sites on one byte.
    let mut unique: Vec<_> = unique;
    unique.sort_by_key(|s| s.value);
    unique.dedup_by_key(|s| s.value);
    check!(
        unique.len() >= SITES,
        "{lib}: only {} functions",
        unique.len()
    );
    let step = unique.len() / SITES;
    let text: String = (0..SITES)
        .map(|k| format!("{} cc\n", unique[k * step].name))
        .collect();
    let path = format!("{DIR}/sites.txt");
    let w = std::fs::write(&path, text);
    check!(w.is_ok(), "writing {path}: {:?}", w.err());
    path
}

/// Children's CPU time so far (user + system), to charge a command's.
fn children_cpu_ns() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let ns = |t: libc::timeval| t.tv_sec * 1_000_000_000 + t.tv_usec * 1000;
    ns(u.ru_utime) + ns(u.ru_stime)
}

/// Runs `hugepoke ARGS`: its JSON output, wall time (Timed) and CPU time.
fn hugepoke(args: &[&str]) -> (serde_json::Value, crate::probe::Timed<()>, i64) {
    let cpu0 = children_cpu_ns();
    let mut out = None;
    let t = timed(|| out = Some(Command::new("hugepoke").args(args).output()));
    let cpu = children_cpu_ns() - cpu0;
    let out = out.unwrap();
    check!(
        out.as_ref().is_ok_and(|o| o.status.success()),
        "hugepoke {}: {:?}",
        args.join(" "),
        out.as_ref()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
    );
    let v = serde_json::from_slice(&out.unwrap().stdout).unwrap_or(serde_json::Value::Null);
    (v, t, cpu)
}

impl Run {
    pub(super) fn cli_sites(&mut self) {
        let lib = copy_of_lib();
        let file = sites_file(&lib);
        let loader = Loader::spawn(&lib);
        let (pid, mem) = (loader.1.to_string(), Mem::open(loader.1));
        let label = "10,000 sites by symbol in libLLVM.so.19.1 (tmpfs, a python3 that loaded it)";
        let checked = "every site's byte read back through /proc/PID/mem after each call: int3 after a patch, the original after a restore and after the dry run";
        let whole = "; the command's own CPU time (user + system) in the CPU column";
        let mut rows = [
            Row::new("cli.dry", &format!("CLI: hugepoke patch --sites --dry-run, {label}"), &format!("the whole command: the process's maps and the ELF symbols read once, each site resolved and its instruction checked, nothing patched{whole}"), checked),
            Row::new("cli.patch", &format!("CLI: hugepoke patch --sites --persist, {label}"), &format!("the whole command: as --dry-run, then one PATCH_BATCH of the 10,000 sites{whole}"), checked),
            Row::new("cli.restore", "CLI: hugepoke restore of that handle", &format!("the whole command: one RESTORE ioctl of the batch{whole}"), checked),
            Row::new("cli.batch", "PATCH_BATCH of the same 10,000 sites, by address (no CLI)", "one PATCH_BATCH ioctl from the bench, int3 with the original byte expected at each site, alternated with the CLI's commands", checked),
            Row::new("cli.batch.restore", "RESTORE of that batch (no CLI)", "one RESTORE ioctl from the bench", checked),
        ];
        let mut costs = [
            SiteCost::new(
                "CLI: patch --sites --dry-run, by symbol (libLLVM)",
                "patch",
                false,
            ),
            SiteCost::new("CLI: patch --sites, by symbol (libLLVM)", "patch", false),
            SiteCost::new("CLI: restore of that batch (libLLVM)", "restore", false),
            SiteCost::new(
                "PATCH_BATCH of the same sites (libLLVM, no CLI)",
                "patch",
                false,
            ),
            SiteCost::new("RESTORE of that batch (libLLVM, no CLI)", "restore", false),
        ];
        let common = [
            "--json", "patch", "--pid", &pid, "--object", "libLLVM", "--sites", &file,
        ];
        let (v, _, _) = hugepoke(&[&common[..], &["--dry-run"]].concat());
        let addrs: Vec<u64> = v["sites"]
            .as_array()
            .map(|s| s.iter().filter_map(|s| s["addr"].as_u64()).collect())
            .unwrap_or_default();
        check!(
            addrs.len() == SITES,
            "the dry run named {} sites: {v}",
            addrs.len()
        );
        let originals: Vec<u8> = addrs.iter().map(|&a| mem.read(a, 1)[0]).collect();
        let bytes_are = |want: &dyn Fn(usize) -> u8| {
            addrs
                .iter()
                .enumerate()
                .all(|(k, &a)| mem.read(a, 1)[0] == want(k))
        };
        let batch: Vec<_> = addrs
            .iter()
            .zip(&originals)
            .map(|(&a, &o)| batch_site(a, &[INT3], Some(&[o])))
            .collect();
        for _ in 0..(self.cycles / 20).max(3) {
            let (_, dry, cpu) = hugepoke(&[&common[..], &["--dry-run"]].concat());
            check!(bytes_are(&|k| originals[k]), "the dry run changed a site");
            rows[0].push(dry.wall(), cpu);
            let (v, p, cpu) = hugepoke(&[&common[..], &["--persist"]].concat());
            check!(
                bytes_are(&|_| INT3),
                "after the CLI's patch some site is not int3"
            );
            rows[1].push(p.wall(), cpu);
            let h = v["handle"].as_u64();
            check!(h.is_some(), "no handle: {v}");
            let (_, r, cpu) = hugepoke(&["restore", &h.unwrap().to_string()]);
            check!(
                bytes_are(&|k| originals[k]),
                "after the CLI's restore some site is not its original"
            );
            rows[2].push(r.wall(), cpu);
            let p = timed(|| self.dev.patch_batch(loader.1, &batch, 0));
            check!(p.value.is_ok(), "PATCH_BATCH: {:?}", p.value.as_ref().err());
            check!(
                bytes_are(&|_| INT3),
                "after PATCH_BATCH some site is not int3"
            );
            rows[3].push(p.wall(), p.cpu);
            let r = timed(|| self.dev.restore(*p.value.as_ref().unwrap()));
            check!(r.value.is_ok(), "RESTORE: {:?}", r.value);
            check!(
                bytes_are(&|k| originals[k]),
                "after RESTORE some site is not its original"
            );
            rows[4].push(r.wall(), r.cpu);
        }
        for (c, r) in costs.iter_mut().zip(&rows) {
            for (&w, &cpu) in r.samples_ns.iter().zip(&r.on_cpu_ns) {
                c.add(SITES, 1, w, cpu, None);
            }
            c.median_ns = crate::stats::median(&r.samples_ns).map(|m| m / SITES as i64);
        }
        self.rows.extend(rows.map(Row::classify));
        self.site_costs.extend(costs);
        drop(loader);
    }
}

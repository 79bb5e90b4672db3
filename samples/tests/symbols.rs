//! Symbol resolution against ground truth: this process's own maps and
//! the dynamic linker's answers (dlsym, dlvsym, function pointers), and
//! child processes that print their own addresses (a non-PIE C program
//! built here, Debian's non-PIE python3) or whose bias the kernel gives
//! (bash's AT_ENTRY in /proc/PID/auxv).

use hugepoke::symbols::{self, Object};
use std::ffi::CString;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A function of this (PIE) test executable, found through its `.symtab`.
#[no_mangle]
#[inline(never)]
pub extern "C" fn hugepoke_symbols_probe(x: u32) -> u32 {
    x.wrapping_mul(2654435761)
}

fn me() -> i32 {
    std::process::id() as i32
}

fn objects(pid: i32) -> Vec<Object> {
    symbols::objects(pid).unwrap()
}

fn addr_of(pid: i32, query: &str, object: Option<&str>) -> Result<u64, String> {
    let objs = objects(pid);
    symbols::resolve(&objs, query, object).map(|r| r.addr)
}

fn dlsym(name: &str) -> u64 {
    let c = CString::new(name).unwrap();
    // SAFETY: a lookup in the global scope by a valid C string.
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) as u64 }
}

fn dlvsym(name: &str, version: &str) -> u64 {
    let (c, v) = (CString::new(name).unwrap(), CString::new(version).unwrap());
    // SAFETY: as dlsym, with a version.
    unsafe { libc::dlvsym(libc::RTLD_DEFAULT, c.as_ptr(), v.as_ptr()) as u64 }
}

#[test]
fn own_pie_executable_by_symtab() {
    let objs = objects(me());
    assert!(objs[0].main, "main executable not first: {}", objs[0].path);
    let elf = objs[0].elf.as_ref().expect("test binary is ELF");
    assert!(!elf.exec_type, "cargo test binaries are PIE");
    let r = symbols::resolve(&objs, "hugepoke_symbols_probe", None).unwrap();
    assert_eq!(r.addr, hugepoke_symbols_probe as *const () as usize as u64);
    assert!(!r.symbol.dynamic, "found in .symtab");
    assert_eq!(r.object, 0);
    // +OFFSET, and describe() going back.
    let r4 = symbols::resolve(&objs, "hugepoke_symbols_probe+4", None).unwrap();
    assert_eq!(r4.addr, r.addr + 4);
    assert_eq!(
        objs[0].describe(r.addr + 4).unwrap(),
        "hugepoke_symbols_probe+0x4"
    );
    assert_eq!(hugepoke_symbols_probe(1), 2654435761);
}

#[test]
fn libc_by_dynsym_with_versions() {
    let pid = me();
    for name in ["getpid", "puts", "fork", "open"] {
        assert_eq!(addr_of(pid, name, None).unwrap(), dlsym(name), "{name}");
        assert_eq!(
            addr_of(pid, name, Some("libc")).unwrap(),
            dlsym(name),
            "{name} --object libc"
        );
        assert_eq!(
            addr_of(pid, name, Some("libc.so.6")).unwrap(),
            dlsym(name),
            "{name} --object libc.so.6"
        );
    }
    assert_eq!(
        addr_of(pid, "getpid", None).unwrap(),
        libc::getpid as *const () as usize as u64
    );
    assert_eq!(
        addr_of(pid, "puts@@GLIBC_2.2.5", None).unwrap(),
        dlsym("puts")
    );
    // Two versions at two addresses: the default unless one is named.
    assert_eq!(addr_of(pid, "realpath", None).unwrap(), dlsym("realpath"));
    assert_eq!(
        addr_of(pid, "realpath@@GLIBC_2.3", None).unwrap(),
        dlvsym("realpath", "GLIBC_2.3")
    );
    assert_eq!(
        addr_of(pid, "realpath@GLIBC_2.2.5", None).unwrap(),
        dlvsym("realpath", "GLIBC_2.2.5")
    );
    assert_ne!(dlvsym("realpath", "GLIBC_2.2.5"), dlsym("realpath"));
    // The full path of the object, as maps shows it, selects it too.
    let objs = objects(pid);
    let libc_path = objs
        .iter()
        .find(|o| o.basename() == "libc.so.6")
        .unwrap()
        .path
        .clone();
    assert_eq!(
        addr_of(pid, "getpid", Some(&libc_path)).unwrap(),
        dlsym("getpid")
    );
}

#[test]
fn clear_errors() {
    let pid = me();
    let e = addr_of(pid, "no_such_function_anywhere", None).unwrap_err();
    assert!(
        e.contains("no code symbol no_such_function_anywhere"),
        "{e}"
    );
    let e = addr_of(pid, "getpid", Some("libnosuch")).unwrap_err();
    assert!(
        e.contains("maps no such object") && e.contains("libc.so.6"),
        "{e}"
    );
    let e = addr_of(pid, "realpath@GLIBC_9.9", None).unwrap_err();
    assert!(e.contains("version GLIBC_9.9"), "{e}");
    // Past the end of a sized symbol.
    let e = addr_of(pid, "getpid+0x1000", None).unwrap_err();
    assert!(e.contains("past the end of getpid"), "{e}");
}

/// A child that prints one line, then waits for its stdin to close.
struct Child1 {
    child: Child,
    line: String,
}

impl Child1 {
    fn spawn(cmd: &mut Command) -> Child1 {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Child1 { child, line }
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    fn field(&self, key: &str) -> u64 {
        let w = self
            .line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in {:?}", self.line));
        hugepoke::parse_number(w).unwrap()
    }
}

impl Drop for Child1 {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const NOPIE_A: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>
int helper_a(void);
int helper_b(void);
__attribute__((noinline)) int hugepoke_nopie_probe(int x) { return x * 3 + helper_a() + helper_b(); }
/* Defined here and in libc: ambiguous without --object. */
pid_t getppid(void) { return 4242; }
int main(void) {
    printf("probe=%p puts=%p getppid=%p\n", (void *)hugepoke_nopie_probe, dlsym(RTLD_DEFAULT, "puts"), (void *)getppid);
    fflush(stdout);
    char buf[1];
    while (read(0, buf, 1) > 0) {}
    return hugepoke_nopie_probe(0) == 99;
}
"#;
/* Two files, one static name each: two `helper`s in .symtab. */
const NOPIE_B: &str = "__attribute__((noinline)) static int helper(void) { return 1; } int helper_a(void) { return helper(); }\n";
const NOPIE_C: &str = "__attribute__((noinline)) static int helper(void) { return 2; } int helper_b(void) { return helper(); }\n";

#[test]
fn non_pie_program_built_here() {
    let dir = std::env::temp_dir().join(format!("hugepoke-nopie-{}", me()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in [("a.c", NOPIE_A), ("b.c", NOPIE_B), ("c.c", NOPIE_C)] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let exe = dir.join("nopie");
    let built = Command::new("gcc")
        .args(["-O1", "-no-pie", "-fno-pie", "-o"])
        .arg(&exe)
        .args([dir.join("a.c"), dir.join("b.c"), dir.join("c.c")])
        .arg("-ldl")
        .status();
    match built {
        Ok(s) if s.success() => {}
        other => {
            missing(&format!("no gcc that builds -no-pie here: {other:?}"));
            return;
        }
    }
    let c = Child1::spawn(&mut Command::new(&exe));
    let pid = c.pid();
    let objs = objects(pid);
    assert!(
        objs[0].main && objs[0].elf.as_ref().unwrap().exec_type,
        "main executable is ET_EXEC"
    );
    assert_eq!(objs[0].bias, 0);
    assert_eq!(
        addr_of(pid, "hugepoke_nopie_probe", None).unwrap(),
        c.field("probe=")
    );
    // Its PLT stub for puts is an undefined symbol with a value: not a definition.
    assert_eq!(addr_of(pid, "puts", None).unwrap(), c.field("puts="));
    let e = addr_of(pid, "getppid", None).unwrap_err();
    assert!(
        e.contains("more than one object") && e.contains("nopie") && e.contains("libc.so.6"),
        "{e}"
    );
    assert_eq!(
        addr_of(pid, "getppid", Some("nopie")).unwrap(),
        c.field("getppid=")
    );
    assert_eq!(
        addr_of(pid, "getppid", Some(exe.to_str().unwrap())).unwrap(),
        c.field("getppid=")
    );
    let e = addr_of(pid, "helper", None).unwrap_err();
    assert!(e.contains("ambiguous") && e.contains("2 times"), "{e}");
    // Deleted while it runs: maps says "(deleted)", map_files still has the inode.
    std::fs::remove_file(&exe).unwrap();
    let objs = objects(pid);
    assert!(
        objs[0].path.ends_with(" (deleted)") && objs[0].basename() == "nopie",
        "{}",
        objs[0].path
    );
    assert_eq!(
        symbols::resolve(&objs, "hugepoke_nopie_probe", Some("nopie"))
            .unwrap()
            .addr,
        c.field("probe=")
    );
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Debian's python3 is a non-PIE executable that exports its C API in
/// `.dynsym`; ctypes tells us where the dynamic linker put things.
#[test]
fn debian_python3_non_pie_and_its_libc() {
    let python = "/usr/bin/python3";
    if !std::path::Path::new(python).exists() {
        missing(&format!("no {python}"));
        return;
    }
    let script = "import ctypes, sys\n\
        a = lambda f: ctypes.cast(f, ctypes.c_void_p).value\n\
        print('py=%#x getpid=%#x' % (a(ctypes.pythonapi.Py_IsInitialized), a(ctypes.CDLL(None).getpid)), flush=True)\n\
        sys.stdin.read()\n";
    let c = Child1::spawn(Command::new(python).args(["-c", script]));
    let pid = c.pid();
    assert_eq!(
        addr_of(pid, "Py_IsInitialized", None).unwrap(),
        c.field("py=")
    );
    assert_eq!(addr_of(pid, "getpid", None).unwrap(), c.field("getpid="));
    let objs = objects(pid);
    assert!(objs[0].main, "{}", objs[0].path);
}

/// bash is PIE and stripped: `.dynsym` only.  The kernel's AT_ENTRY gives
/// its load bias independently of our reading of maps.
#[test]
fn debian_bash_pie_by_dynsym() {
    let bash = "/usr/bin/bash";
    if !std::path::Path::new(bash).exists() {
        missing(&format!("no {bash}"));
        return;
    }
    let c = Child1::spawn(Command::new(bash).args(["-c", "echo ready; read"]));
    let pid = c.pid();
    let objs = objects(pid);
    let main = &objs[0];
    assert!(main.main && main.basename() == "bash", "{}", main.path);
    let auxv = std::fs::read(format!("/proc/{pid}/auxv")).unwrap();
    let at_entry = auxv
        .chunks_exact(16)
        .map(|p| {
            (
                u64::from_ne_bytes(p[..8].try_into().unwrap()),
                u64::from_ne_bytes(p[8..].try_into().unwrap()),
            )
        })
        .find(|(k, _)| *k == libc::AT_ENTRY)
        .unwrap()
        .1;
    let e_entry = u64::from_le_bytes(std::fs::read(bash).unwrap()[0x18..0x20].try_into().unwrap());
    assert_eq!(main.bias, at_entry - e_entry, "bias from maps vs AT_ENTRY");
    let r = symbols::resolve(&objs, "readline", None).unwrap();
    assert!(r.symbol.dynamic);
    assert_eq!(r.addr, at_entry - e_entry + r.symbol.value);
    // The bytes there in the process are the file's bytes at that symbol.
    let f = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut got = [0u8; 16];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, r.addr).unwrap();
    let off = main
        .elf
        .as_ref()
        .unwrap()
        .file_offset(r.symbol.value)
        .unwrap() as usize;
    assert_eq!(&got[..], &std::fs::read(bash).unwrap()[off..off + 16]);
}

/// A library mapped executable a second time (as `dlmopen` or a program's
/// own mmap would) has two load biases, so a name in it names two places:
/// resolution refuses, with or without --object, and says why.
#[test]
fn a_library_loaded_twice_is_refused() {
    let python = "/usr/bin/python3";
    if !std::path::Path::new(python).exists() {
        missing(&format!("no {python}"));
        return;
    }
    let c = Child1::spawn(Command::new(python).args([
        "-c",
        "import sys; print('ready=0x1', flush=True); sys.stdin.read()",
    ]));
    let pid = c.pid();
    let libc = objects(pid)
        .into_iter()
        .find(|o| o.basename().starts_with("libc.so"))
        .expect("python3 maps libc");
    let exec = libc
        .mappings
        .iter()
        .find(|m| m.executable())
        .unwrap()
        .clone();
    assert!(
        addr_of(pid, "getpid", Some("libc")).is_ok(),
        "loaded once: resolves"
    );
    drop(c);

    let script = format!(
        "import mmap, sys\n\
         f = open({path:?}, 'rb')\n\
         m = mmap.mmap(f.fileno(), {len}, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC, offset={off})\n\
         print('ready=0x1', flush=True)\n\
         sys.stdin.read()\n",
        path = exec.path,
        len = exec.end - exec.start,
        off = exec.offset
    );
    let c = Child1::spawn(Command::new(python).args(["-c", &script]));
    for object in [None, Some("libc")] {
        let err = addr_of(c.pid(), "getpid", object).unwrap_err();
        assert!(err.contains("loaded more than once"), "{object:?}: {err}");
    }
}

/// A tool the test needs is missing: a failure (scripts/setup installs
/// it), or with HP_ALLOW_SKIPS=1 a skip that says so.
fn missing(what: &str) {
    if std::env::var_os("HP_ALLOW_SKIPS").is_none() {
        panic!("{what}: scripts/setup installs it (HP_ALLOW_SKIPS=1 to skip)");
    }
    eprintln!("SKIP: {what}");
}

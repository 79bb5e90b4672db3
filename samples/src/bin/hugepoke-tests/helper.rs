//! `hugepoke-tests --helper …`: what a test needs done in another process
//! (another user, a child to fork).  The tests run on threads of a
//! multithreaded process, where only async-signal-safe code may run
//! between fork() and exec(); so they spawn this program afresh instead,
//! and it is single-threaded: it forks, drops privileges or patches here.
//!
//!   --helper open-as-nobody PATH         open PATH as nobody; exit 0 or errno
//!   --helper patch-as-nobody PID ADDR HEX
//!                                        open /dev/hugepoke as root, drop to
//!                                        nobody, PATCH; exit 0 or errno
//!   --helper undo-as-nobody HANDLE       open /dev/hugepoke as root, drop to
//!                                        nobody, QUERY, RESTORE_DROP and
//!                                        RESTORE HANDLE; print
//!                                        `query=E pfn=P drop=E restore=E`
//!   --helper own-undo-as-nobody PID ADDR HEX
//!                                        as root PATCH (not persistent), drop
//!                                        to nobody, QUERY, RESTORE_DROP and
//!                                        RESTORE its own handle; print the
//!                                        same line
//!   --helper patch-file-as-nobody PATH  open /dev/hugepoke and PATH as
//!                                        root, drop to nobody, PATCH_FILE
//!                                        (dry run) one site of PATH; exit
//!                                        with its errno (0: allowed)
//!   --helper file-handle-as-nobody HANDLE
//!                                        as undo-as-nobody, and QUERY_FORKED
//!                                        first (`forked=E`, its own line)
//!   --helper query-in-new-pidns HANDLE   QUERY from a new pid namespace;
//!                                        print `query=E pid=P`
//!   --helper zombie                      fork a child that exits; once it is
//!                                        a zombie (waitid WNOWAIT), print
//!                                        `zombie PID`; reap it at end of stdin

use hugepoke::device::{Device, PatchRequest};
use std::io::{BufRead, Write};

/// Exit codes the helper uses for its own failures (errnos are below 100).
const SETUP_FAILED: i32 = 100;
const BAD_USAGE: i32 = 101;

/// Run the helper named by `args` (what followed `--helper`); never returns.
pub(crate) fn main(args: &[String]) -> ! {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let code = match args.as_slice() {
        ["open-as-nobody", path] => {
            drop_to_nobody();
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
            {
                Ok(_) => 0,
                Err(e) => e.raw_os_error().unwrap_or(SETUP_FAILED),
            }
        }
        ["patch-as-nobody", pid, addr, hex] => {
            let req = patch_request(pid, addr, hex);
            // Opened while still root: the device's own check passes, and
            // only PATCH's ptrace check can refuse.
            let Ok(dev) = Device::open() else {
                std::process::exit(SETUP_FAILED)
            };
            drop_to_nobody();
            match dev.patch(&req) {
                Ok(_) => 0,
                Err(e) => e.raw_os_error().unwrap_or(SETUP_FAILED),
            }
        }
        ["undo-as-nobody", handle] => {
            let Some(handle) = hugepoke::parse_number(handle) else {
                std::process::exit(BAD_USAGE)
            };
            let Ok(dev) = Device::open() else {
                std::process::exit(SETUP_FAILED)
            };
            drop_to_nobody();
            undo(&dev, handle, true)
        }
        ["own-undo-as-nobody", pid, addr, hex] => {
            let req = patch_request(pid, addr, hex);
            let Ok(dev) = Device::open() else {
                std::process::exit(SETUP_FAILED)
            };
            let Ok(handle) = dev.patch(&req) else {
                std::process::exit(SETUP_FAILED)
            };
            drop_to_nobody();
            undo(&dev, handle, true)
        }
        ["patch-file-as-nobody", path] => {
            // Device and file opened as root: only PATCH_FILE's own check
            // (CAP_SYS_ADMIN) can refuse.
            let (Ok(dev), Ok(file)) = (Device::open(), std::fs::File::open(path)) else {
                std::process::exit(SETUP_FAILED)
            };
            drop_to_nobody();
            let site = hugepoke::device::batch_site(0, &[0xcc], None);
            match dev.patch_file(&file, &[site], hugepoke::uapi::FILE_DRY_RUN) {
                Ok(_) => 0,
                Err(e) => e.batch.error.raw_os_error().unwrap_or(SETUP_FAILED),
            }
        }
        ["file-handle-as-nobody", handle] => {
            let Some(handle) = hugepoke::parse_number(handle) else {
                std::process::exit(BAD_USAGE)
            };
            let Ok(dev) = Device::open() else {
                std::process::exit(SETUP_FAILED)
            };
            drop_to_nobody();
            let forked = errno(&dev.query_forked(handle).map(drop));
            println!("forked={forked}");
            undo(&dev, handle, true)
        }
        ["query-in-new-pidns", handle] => query_in_new_pidns(handle),
        ["zombie"] => zombie(),
        _ => BAD_USAGE,
    };
    std::process::exit(code)
}

/// The errno of an ioctl's result (0: it succeeded).
fn errno<T>(r: &std::io::Result<T>) -> i32 {
    r.as_ref()
        .err()
        .map_or(0, |e| e.raw_os_error().unwrap_or(SETUP_FAILED))
}

/// QUERY, then (if `drop`) RESTORE_DROP, then RESTORE `handle`; print what
/// each returned and the PFN QUERY showed.
fn undo(dev: &Device, handle: u64, drop: bool) -> i32 {
    let q = dev.query(handle);
    let pfn = q.as_ref().map_or(0, |q| q.pfn);
    let d = if drop {
        errno(&dev.restore_flags(handle, hugepoke::uapi::RESTORE_DROP))
    } else {
        0
    };
    let r = dev.restore(handle);
    println!(
        "query={} pfn={pfn} drop={d} restore={}",
        errno(&q),
        errno(&r)
    );
    0
}

/// QUERY `handle` from a child in a new pid namespace, where the target's
/// pid does not exist: it must read 0.
fn query_in_new_pidns(handle: &str) -> i32 {
    let Some(handle) = hugepoke::parse_number(handle) else {
        return BAD_USAGE;
    };
    // SAFETY: unshare and fork in this single-threaded process; the child
    // only opens the device, queries, prints and exits.
    unsafe {
        if libc::unshare(libc::CLONE_NEWPID) != 0 {
            return SETUP_FAILED;
        }
        match libc::fork() {
            -1 => SETUP_FAILED,
            0 => {
                let code = match Device::open() {
                    Ok(dev) => {
                        let q = dev.query(handle);
                        let pid = q.as_ref().map_or(-1, |q| q.pid);
                        println!("query={} pid={pid}", errno(&q));
                        0
                    }
                    Err(_) => SETUP_FAILED,
                };
                libc::_exit(code)
            }
            child => {
                let mut status = 0;
                libc::waitpid(child, &mut status, 0);
                if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    SETUP_FAILED
                }
            }
        }
    }
}

/// The PATCH of `HEX` at `ADDR` in `PID`, from the helper's arguments.
fn patch_request(pid: &str, addr: &str, hex: &str) -> PatchRequest {
    let (Some(pid), Some(addr), Some(bytes)) = (
        pid.parse().ok(),
        hugepoke::parse_number(addr),
        hugepoke::parse_hex_bytes(hex),
    ) else {
        std::process::exit(BAD_USAGE)
    };
    PatchRequest {
        pid,
        addr,
        bytes,
        ..Default::default()
    }
}

fn drop_to_nobody() {
    // SAFETY: credential changes of this single-threaded process.
    if unsafe { libc::setgid(65534) != 0 || libc::setuid(65534) != 0 } {
        std::process::exit(SETUP_FAILED);
    }
}

/// A child that exited and is not reaped: waitid(WNOWAIT) returns exactly
/// when it is a zombie (its address space already gone), and leaves it so.
fn zombie() -> i32 {
    // SAFETY: fork of this single-threaded process; the child only exits.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return SETUP_FAILED;
    }
    if child == 0 {
        // SAFETY: exit at once, running nothing of the parent's.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: a zeroed siginfo_t for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child, without reaping it.
    if unsafe {
        libc::waitid(
            libc::P_PID,
            child as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        )
    } != 0
    {
        return SETUP_FAILED;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "zombie {child}");
    let _ = out.flush();
    // Keep it a zombie until the test closes our stdin.
    for _ in std::io::stdin().lock().lines() {}
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
    0
}

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
            let (Some(pid), Some(addr), Some(bytes)) = (
                pid.parse().ok(),
                hugepoke::parse_number(addr),
                hugepoke::parse_hex_bytes(hex),
            ) else {
                std::process::exit(BAD_USAGE)
            };
            // Opened while still root: the device's own check passes, and
            // only PATCH's ptrace check can refuse.
            let Ok(dev) = Device::open() else {
                std::process::exit(SETUP_FAILED)
            };
            drop_to_nobody();
            match dev.patch(&PatchRequest {
                pid,
                addr,
                bytes,
                ..Default::default()
            }) {
                Ok(_) => 0,
                Err(e) => e.raw_os_error().unwrap_or(SETUP_FAILED),
            }
        }
        ["zombie"] => zombie(),
        _ => BAD_USAGE,
    };
    std::process::exit(code)
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

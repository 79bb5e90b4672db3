//! The hugepoke CLI.
//!
//!   hugepoke patch --pid PID --addr ADDR --bytes HEX [--expect HEX] [--persist] [--install-pmd]
//!   hugepoke restore HANDLE
//!   hugepoke query HANDLE
//!   hugepoke list | events | stats
//!
//! A patch belongs to the open file that made it.  Without --persist,
//! `patch` prints the handle and keeps the device open until its standard
//! input closes (or it is killed): then the patch is restored.  With
//! --persist it prints the handle and exits; the patch lives until
//! `hugepoke restore HANDLE` or module unload.
//!
//! On failure it exits 1 and prints the errno name and the module's reason.

use hugepoke::device::{self, Device, PatchRequest};
use hugepoke::{errno_name, parse_hex_bytes, parse_number, proc};
use std::io::{self, Read, Write};

const USAGE: &str = "usage: hugepoke patch --pid PID --addr ADDR --bytes HEX [--expect HEX] [--persist] [--install-pmd]
       hugepoke restore HANDLE
       hugepoke query HANDLE
       hugepoke list | events | stats";

fn usage() -> ! {
    eprintln!("{USAGE}");
    std::process::exit(2)
}

/// Print `what: ERRNO: reason` and exit 1.
fn fail(what: &str, err: io::Error, seq: u64) -> ! {
    let errno = err.raw_os_error().unwrap_or(0);
    let reason = device::failure_since(seq).unwrap_or_else(|| err.to_string());
    eprintln!("hugepoke: {what}: {}: {reason}", errno_name(errno));
    std::process::exit(1)
}

fn value<'a>(args: &mut impl Iterator<Item = &'a String>, flag: &str) -> &'a str {
    args.next().unwrap_or_else(|| {
        eprintln!("hugepoke: {flag} needs a value");
        usage()
    })
}

fn patch(args: &[String]) {
    let mut req = PatchRequest::default();
    let (mut have_pid, mut have_addr) = (false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--pid" => {
                req.pid = value(&mut it, a).parse().unwrap_or_else(|_| usage());
                have_pid = true;
            }
            "--addr" => {
                req.addr = parse_number(value(&mut it, a)).unwrap_or_else(|| usage());
                have_addr = true;
            }
            "--bytes" => req.bytes = parse_hex_bytes(value(&mut it, a)).unwrap_or_else(|| usage()),
            "--expect" => req.expect = Some(parse_hex_bytes(value(&mut it, a)).unwrap_or_else(|| usage())),
            "--persist" => req.persist = true,
            "--install-pmd" => req.install_pmd = true,
            _ => usage(),
        }
    }
    if !have_pid || !have_addr || req.bytes.is_empty() {
        usage();
    }
    let seq = device::journal_seq();
    let dev = Device::open().unwrap_or_else(|e| fail("open /dev/hugepoke", e, seq));
    let handle = dev.patch(&req).unwrap_or_else(|e| fail("patch", e, seq));
    println!("{handle}");
    let _ = io::stdout().flush();
    if !req.persist {
        // Hold the patch until stdin closes; closing the device restores it.
        let _ = io::stdin().read_to_end(&mut Vec::new());
    }
}

fn handle_arg(args: &[String]) -> u64 {
    match args {
        [h] => parse_number(h).unwrap_or_else(|| usage()),
        _ => usage(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { usage() };
    let rest = &args[1..];
    let seq = device::journal_seq();
    match cmd.as_str() {
        "patch" => patch(rest),
        "restore" => {
            let h = handle_arg(rest);
            let dev = Device::open().unwrap_or_else(|e| fail("open /dev/hugepoke", e, seq));
            dev.restore(h).unwrap_or_else(|e| fail("restore", e, seq));
        }
        "query" => {
            let h = handle_arg(rest);
            let dev = Device::open().unwrap_or_else(|e| fail("open /dev/hugepoke", e, seq));
            let q = dev.query(h).unwrap_or_else(|e| fail("query", e, seq));
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            let n = q.len as usize;
            println!(
                "handle={h} state={} pid={} addr={:#x} len={n} flags={:#x} pfn={:#x} bytes={} orig={}",
                if q.state == hugepoke::uapi::STATE_LIVE { "live" } else { "gone" },
                q.pid, q.addr, q.patch_flags, q.pfn, hex(&q.bytes[..n]), hex(&q.orig[..n])
            );
        }
        "list" | "events" | "stats" if rest.is_empty() => {
            let name = if cmd == "list" { "patches" } else { cmd.as_str() };
            match proc::debugfs(name) {
                Ok(text) => print!("{text}"),
                Err(e) => fail(name, e, seq),
            }
        }
        _ => usage(),
    }
}

//! `hugepoke events [--follow]`: the module's journal of every step.

use super::print_json;
use crate::CliError;
use clap::Args;
use hugepoke::{device, proc, report};
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Args)]
pub struct EventsArgs {
    /// Then keep printing new entries as they are journaled, until SIGINT or the reader goes away.
    #[arg(long, short)]
    follow: bool,
    /// How often --follow reads the journal, in milliseconds.
    #[arg(long, default_value_t = 100, requires = "follow", value_parser = clap::value_parser!(u64).range(1..=60_000))]
    interval_ms: u64,
}

pub fn exec(args: EventsArgs, json: bool) -> Result<(), CliError> {
    let seq = device::journal_seq();
    let text = proc::debugfs("events").map_err(|e| CliError::kernel("events", e, seq, None))?;
    if args.follow {
        follow(text, json, Duration::from_millis(args.interval_ms));
    } else if json {
        print_json(&report::parse_events(&text));
    } else {
        print!("{text}");
    }
    Ok(())
}

/// Set by SIGINT: `events --follow` finishes the line it is on and exits 0.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// `events --follow`: the journal (`first`, as read), then each new entry
/// as it comes, polling debugfs by `seq`; a read that fails (the module
/// unloaded) is retried.  Ends at SIGINT (exit 0) or when stdout's reader
/// goes away.
fn follow(first: String, json: bool, interval: Duration) {
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

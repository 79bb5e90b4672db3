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
//! ambiguous).  Each subcommand is a file in `commands/` whose `exec`
//! returns a [`CliError`]; `main` alone says it and exits.

mod commands;

use clap::Parser;
use hugepoke::{device, errno_name};
use std::io;
use std::process::ExitCode;

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
    command: commands::Command,
}

/// Why a command did not do what it was asked: what `main` says on stderr
/// (after `hugepoke: `) and the exit status (Documentation/cli.md).
#[derive(Debug)]
enum CliError {
    /// The command line is wrong (a bad argument or sites file, a missing
    /// or ambiguous symbol): exit 2.
    Usage(String),
    /// The instruction check (or the expected bytes) refused: `refused: …`, exit 1.
    Refused(String),
    /// The kernel refused, or a read or write failed: exit 1.
    Failed(String),
    /// Already said on stdout (a collapse with a refused range): exit 1, nothing more.
    Reported,
}

impl CliError {
    /// A call that failed: `WHAT: ERRNO: reason`, the reason being the
    /// module's, from the journal entries since `seq` about `target` or
    /// this process, or else the OS's.
    fn kernel(what: &str, err: io::Error, seq: u64, target: Option<i32>) -> Self {
        let errno = err.raw_os_error().unwrap_or(0);
        let reason = device::failure_since(seq, target, errno).unwrap_or_else(|| err.to_string());
        CliError::Failed(format!("{what}: {}: {reason}", errno_name(errno)))
    }
}

fn main() -> ExitCode {
    // Die quietly of SIGPIPE, as other Unix tools do (`hugepoke events | head`).
    // SAFETY: restores the default disposition; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    // The one place that turns an outcome into words and an exit status.
    let (message, status) = match commands::exec(cli.command, cli.json) {
        Ok(()) => (None, 0),
        Err(CliError::Usage(m)) => (Some(m), 2),
        Err(CliError::Refused(m)) => (Some(format!("refused: {m}")), 1),
        Err(CliError::Failed(m)) => (Some(m), 1),
        Err(CliError::Reported) => (None, 1),
    };
    if let Some(m) = message {
        eprintln!("hugepoke: {m}");
    }
    ExitCode::from(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

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

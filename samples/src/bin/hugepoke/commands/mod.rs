//! The subcommands, one file each: its clap arguments and an `exec` that
//! returns a [`CliError`] instead of exiting.  What is not argument
//! handling or output lives in the library (the instruction check in
//! `hugepoke::decode`, the sites file in `hugepoke::sites`).

mod collapse;
mod events;
mod generate;
mod list;
mod map;
mod patch;
mod patch_file;
mod query;
mod restore;
mod stats;

use crate::{CliError, EXIT_STATUS};
use clap::Subcommand;
use hugepoke::device::Device;
use hugepoke::report::write_json;
use hugepoke::symbols::{self, Object};
use hugepoke::{parse_hex_bytes, parse_number};
use serde::Serialize;
use std::io;

#[derive(Subcommand)]
pub enum Command {
    /// Patch bytes into a process's executable file text (prints the handle first).
    #[command(after_help = EXIT_STATUS)]
    Patch(patch::PatchArgs),
    /// Restore a patch (all the sites of a batch) by its handle.
    Restore(restore::RestoreArgs),
    /// Show one patch, every site of a batch: state, pid, address, bytes, the original bytes.
    Query(query::QueryArgs),
    /// List the live patches (debugfs `patches`), each with its symbol+offset.
    List,
    /// Print the module's journal of every step (debugfs `events`).
    Events(events::EventsArgs),
    /// Print the module's per-step counters (debugfs `stats`).
    Stats,
    /// Make a process's executable file mappings huge (process_madvise MADV_COLLAPSE) and report per mapping.
    Collapse(collapse::CollapseArgs),
    /// Draw the 2 MiB range around an address: how each of its 512 pages is mapped now, and the live patches.
    Map(map::MapArgs),
    /// Write the man pages or a shell's completions (make install-tools uses it).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
}

/// Run one subcommand; `json`: the global `--json`.
pub fn exec(command: Command, json: bool) -> Result<(), CliError> {
    match command {
        Command::Patch(args) => patch::exec(args, json),
        Command::Restore(args) => restore::exec(args),
        Command::Query(args) => query::exec(args, json),
        Command::List => list::exec(json),
        Command::Events(args) => events::exec(args, json),
        Command::Stats => stats::exec(json),
        Command::Collapse(args) => collapse::exec(args, json),
        Command::Map(args) => map::exec(args, json),
        Command::Generate(args) => generate::exec(args),
    }
}

/// An address or number argument: `0x…` hex or decimal.
fn number(s: &str) -> Result<u64, String> {
    parse_number(s).ok_or_else(|| format!("{s:?} is not a number (0x… hex or decimal)"))
}

/// A bytes argument: hex, spaces allowed.
#[derive(Clone)]
struct Hex(Vec<u8>);

fn hex_arg(s: &str) -> Result<Hex, String> {
    parse_hex_bytes(s)
        .map(Hex)
        .ok_or_else(|| format!("{s:?} is not hex bytes (like \"b8 2a 00 00 00 c3\")"))
}

/// Open /dev/hugepoke; `seq`: the journal's newest entry before the command.
fn open_device(seq: u64) -> Result<Device, CliError> {
    Device::open().map_err(|e| CliError::kernel("open /dev/hugepoke", e, seq, None))
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

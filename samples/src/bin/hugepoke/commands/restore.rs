//! `hugepoke restore [--drop] HANDLE`.

use super::{number, open_device};
use crate::CliError;
use clap::Args;
use hugepoke::device;

#[derive(Args)]
pub struct RestoreArgs {
    /// The handle PATCH printed.
    #[arg(value_parser = number)]
    handle: u64,
    /// Forget the handle without restoring anything (CAP_SYS_ADMIN): for a
    /// patch that cannot be restored; the target keeps what its copies hold.
    #[arg(long)]
    drop: bool,
}

pub fn exec(args: RestoreArgs) -> Result<(), CliError> {
    let seq = device::journal_seq();
    let dev = open_device(seq)?;
    let flags = if args.drop {
        hugepoke::uapi::RESTORE_DROP
    } else {
        0
    };
    dev.restore_flags(args.handle, flags)
        .map_err(|e| CliError::kernel("restore", e, seq, None))
}

//! `hugepoke restore HANDLE`.

use super::{number, open_device};
use crate::CliError;
use clap::Args;
use hugepoke::device;

#[derive(Args)]
pub struct RestoreArgs {
    /// The handle PATCH printed.
    #[arg(value_parser = number)]
    handle: u64,
}

pub fn exec(args: RestoreArgs) -> Result<(), CliError> {
    let seq = device::journal_seq();
    let dev = open_device(seq)?;
    dev.restore(args.handle)
        .map_err(|e| CliError::kernel("restore", e, seq, None))
}

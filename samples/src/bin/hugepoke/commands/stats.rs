//! `hugepoke stats`: the module's per-step counters.

use super::print_json;
use crate::CliError;
use hugepoke::{device, proc, report};

pub fn exec(json: bool) -> Result<(), CliError> {
    let seq = device::journal_seq();
    let text = proc::debugfs("stats").map_err(|e| CliError::kernel("stats", e, seq, None))?;
    if json {
        print_json(&report::parse_stats(&text));
    } else {
        print!("{text}");
    }
    Ok(())
}

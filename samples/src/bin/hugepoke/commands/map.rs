//! `hugepoke map`: read the range (hugepoke::map), print it, maybe write the SVG.

use super::number;
use crate::CliError;
use clap::Args;
use std::io::{self, IsTerminal};
use std::path::PathBuf;

#[derive(Args)]
pub struct MapArgs {
    /// The process.
    #[arg(long)]
    pid: i32,
    /// An address in the range (0x… or decimal); the range is the 2 MiB-aligned one around it.
    #[arg(long, value_parser = number)]
    addr: u64,
    /// Also write the picture as SVG to FILE.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

pub fn exec(args: MapArgs, json: bool) -> Result<(), CliError> {
    let m = hugepoke::map::RangeMap::read(args.pid, args.addr)
        .map_err(|e| CliError::Failed(format!("map: pid {} at {:#x}: {e}", args.pid, args.addr)))?;
    if let Some(path) = &args.svg {
        std::fs::write(path, hugepoke::map::render_svg(&m))
            .map_err(|e| CliError::Failed(format!("map: writing {}: {e}", path.display())))?;
    }
    if json {
        println!("{}", serde_json::to_string(&m).expect("a map serializes"));
    } else {
        let colour = io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        print!("{}", hugepoke::map::render_text(&m, colour));
    }
    Ok(())
}

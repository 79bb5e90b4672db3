//! `hugepoke generate` (hidden): the man pages and the shell completions,
//! for make install-tools (scripts/install-tools).

use crate::{Cli, CliError};
use clap::{Args, CommandFactory, Subcommand};
use std::io;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    what: Generate,
}

#[derive(Subcommand)]
enum Generate {
    /// hugepoke.1 and hugepoke-SUBCOMMAND.1, into DIR.
    Man { dir: PathBuf },
    /// The completion script for SHELL, on standard output.
    Completions { shell: clap_complete::Shell },
}

pub fn exec(args: GenerateArgs) -> Result<(), CliError> {
    match args.what {
        Generate::Man { dir } => {
            generate_man(&dir).map_err(|e| CliError::Failed(format!("generate man: {e}")))
        }
        Generate::Completions { shell } => {
            clap_complete::generate(shell, &mut visible_command(), "hugepoke", &mut io::stdout());
            Ok(())
        }
    }
}

/// The command without its hidden subcommands (`generate`), which
/// clap_complete would offer.
fn visible_command() -> clap::Command {
    let cli = Cli::command();
    let subs: Vec<clap::Command> = cli
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let mut cmd = clap::Command::new("hugepoke")
        .version(env!("CARGO_PKG_VERSION"))
        .disable_help_subcommand(true)
        .subcommand_required(true);
    for a in cli.get_arguments() {
        cmd = cmd.arg(a.clone());
    }
    cmd.subcommands(subs)
}

/// `hugepoke generate man DIR`: hugepoke.1, and hugepoke-SUB.1 for each
/// visible subcommand.
fn generate_man(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
    cmd.build();
    let write = |name: &str, c: clap::Command| -> io::Result<()> {
        let mut f = std::fs::File::create(dir.join(format!("{name}.1")))?;
        clap_mangen::Man::new(c).render(&mut f)
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // clap names are &'static str (without its `string` feature); a
        // generator run leaks a few.
        let name: &'static str = Box::leak(format!("hugepoke-{}", sub.get_name()).into_boxed_str());
        let bin: &'static str = Box::leak(format!("hugepoke {}", sub.get_name()).into_boxed_str());
        write(name, sub.clone().name(name).bin_name(bin))?;
    }
    write("hugepoke", cmd)
}

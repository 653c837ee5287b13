//! `shoal relay ...`

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum RelayCommand {
    /// Write a commented default config and fresh keys.
    Init,
}

pub fn run(cmd: RelayCommand) -> anyhow::Result<()> {
    match cmd {
        RelayCommand::Init => anyhow::bail!("not yet built"),
    }
}

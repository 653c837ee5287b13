//! `shoal authority ...`

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum AuthorityCommand {
    /// Write a commented default config and fresh keys.
    Init,
}

pub fn run(cmd: AuthorityCommand) -> anyhow::Result<()> {
    match cmd {
        AuthorityCommand::Init => anyhow::bail!("not yet built"),
    }
}

//! `shoal chat`: an interactive terminal chat on the real client.
//!
//! The UI is a pure state struct with a key reducer (`state`) drawn by `view`; this
//! module is the thin driver between it, the terminal (ratatui + crossterm) and the
//! managed messenger task on the client driver (`shoal_client::managed`). Everything
//! sent goes through the client's durable queue and leaves at its steady send
//! schedule, so the chat works offline: messages wait as "queued" until the link is up.
//!
//! Files in the client directory besides `client.toml` / `client.redb`:
//! - `credential` and `policy`: what the subnet admin hands a new member; read once,
//!   on first use, then kept inside the messenger's state in the store;
//! - `chat.json`: this user's contacts (their cards) and the names given to groups;
//! - `my-card.txt`: written by `/card`;
//! - `chat.log`: the log while the chat runs (never over the screen).

pub(crate) mod member;
mod net;
mod state;
mod view;

pub(crate) use state::{DEFAULT_TTL_SECS, human_secs};

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// The client directory (made by `shoal client init`).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// First use only: the membership credential your subnet admin gave you
    /// (default DIR/credential).
    #[arg(long)]
    pub credential: Option<PathBuf>,
    /// First use only: your subnet's policy file (default DIR/policy).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// First use only: how long group changes are collected before they take effect
    /// (every member must get them within this time).
    #[arg(long, default_value_t = 30)]
    pub commit_settle_secs: u64,
    /// Print your contact card (to give to people) and exit.
    #[arg(long)]
    pub print_card: bool,
}

/// The log file in the client directory while the chat runs.
pub(crate) const LOG_FILE: &str = "chat.log";

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    net::run(args)
}

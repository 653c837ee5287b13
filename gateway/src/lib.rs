#![doc = include_str!("../README.md")]

pub mod admin;
pub mod admin_inbox;
pub mod config;
pub mod driver;
pub mod limit;
pub mod mailbox;
pub mod metrics;
pub mod pull;
pub mod remote_admin;
pub mod store;

mod error;

pub use config::Config;
pub use driver::{GatewayHandle, spawn};
pub use error::GatewayError;
pub use limit::{Admit, LimitConfig, SendLimiter};
pub use mailbox::{
    AccountKey, AckToSend, BatchId, CommitFailed, CommitResult, Committed, DeliverOutcome, ItemId,
    Mailbox, MailboxConfig, MailboxStats, MailboxTag, PullItem, PullPlan, Recovered, Salt,
    WriteBatch,
};
pub use metrics::{AckDrop, GatewayStats};
pub use shoal_packet::protocol::{AdminRefusal, ClientMsg, ErrorCode, GatewayMsg};
pub use store::{Store, StoreConfig, StoreStats, TrySubmitError};

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;

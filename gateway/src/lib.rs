#![doc = include_str!("../README.md")]

pub mod mailbox;
pub mod protocol;
pub mod store;

mod error;

pub use error::GatewayError;
pub use mailbox::{
    AccountKey, AckToSend, BatchId, CommitFailed, CommitResult, Committed, DeliverOutcome, ItemId,
    Mailbox, MailboxConfig, MailboxStats, MailboxTag, PullItem, PullPlan, Recovered, Salt,
    WriteBatch,
};
pub use protocol::{ClientMsg, ErrorCode, GatewayMsg};
pub use store::{Store, StoreConfig, StoreStats, TrySubmitError};

#![doc = include_str!("../README.md")]

pub mod contact;
pub mod core;
pub mod driver;
pub mod group;
pub mod keys;
pub mod managed;
pub mod messenger;
pub mod receipts;
pub mod schedule;
/// The end-to-end seal (in `shoal-packet`, which gateways share).
pub use shoal_packet::seal;
pub mod session;
pub mod store;

#[cfg(test)]
mod testnet;

pub use contact::{CardError, Contact, ContactCard};
pub use core::{
    ClientConfig, ClientCore, ClientError, ClientSnapshot, ClientStats, Event, Identity,
    OutgoingFragment, OutgoingMessage, PartialOp, RetransmitPolicy, SendRecord,
};
pub use keys::MemberKeys;
pub use schedule::Stream;
pub use seal::SealError;
pub use store::{ClientStore, ReceivedMessage};

#[cfg(test)]
mod rogue;

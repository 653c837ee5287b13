#![doc = include_str!("../README.md")]

pub mod assign;
pub mod authority;
pub mod descriptor;
pub mod document;
pub mod epoch;
pub mod operator;
pub mod params;
pub mod route;

mod encoding;
mod error;

pub use assign::gateway_for_member;
pub use authority::{
    Authority, AuthorityConfig, Inclusion, LIVENESS_PERIODS, RosterEntry,
    default_descriptor_max_age_secs,
};
pub use descriptor::{Descriptor, MAX_DESCRIPTOR_BYTES, SignedDescriptor, SphinxKeyEntry};
pub use document::{
    AuthoritySet, AuthoritySignature, DocumentBody, NetworkBody, NodeEntry, SignatureChecked,
    SignedDocument, SignedNetwork, Topology, UncheckedDocument,
};
pub use encoding::{AuthorityAddr, Hex32, Hex64};
pub use epoch::EpochSchedule;
pub use error::TopologyError;
pub use operator::{Admission, AdmittedOperator, NodeCertificate};
pub use params::NetworkParams;

/// A node's identity: its Ed25519 public key. Also its Sphinx address and the key
/// its QUIC links are pinned to.
pub type NodeId = [u8; 32];

/// What a node does in the network.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A mix in one of the layers.
    Relay,
    /// Entry and exit hop; hosts mailboxes.
    Gateway,
}

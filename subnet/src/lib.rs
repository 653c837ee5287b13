#![doc = include_str!("../README.md")]

pub mod admin_mail;
pub mod binding;
pub mod command;
pub mod credential;
pub mod federation;
pub mod policy;
pub mod usage;

mod envelope;
mod error;

pub use admin_mail::{AdminRequest, AnswerBody, ReplyTo, SignedAnswer};
pub use binding::{AddressBinding, BindingBody, MemberCard};
pub use command::{
    AccountAction, AdminCommand, CommandBody, CommandGuard, SignedCheckedCommand, SignedCommand,
    UncheckedCommand,
};
pub use credential::{
    CredentialBody, MemberCredential, SignedCredential, UncheckedCredential, VerifiedCredential,
};
pub use envelope::SubnetAdmin;
pub use error::{PolicyRefusal, SubnetError};
pub use federation::{
    FederationOffer, OfferBody, OfferGuard, SignedOffer, UncheckedOffer, VerifiedOffer,
};
pub use policy::{
    BurnOnRead, Federation, MessageOptions, Policy, PolicyBody, RoleRule, SignedPolicy,
    UncheckedPolicy,
};
pub use usage::{AccountUsage, UsageId, UsageReport, usage_id};

/// A subnet is named by its admin's Ed25519 public key.
pub type SubnetId = shoal_topology::Hex32;

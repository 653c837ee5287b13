use crate::SubnetId;

/// Why a credential, policy or command could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubnetError {
    /// Bytes did not parse as the named document.
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    /// The signature does not verify under the subnet's admin key.
    #[error("bad admin signature on {what}")]
    BadSignature { what: &'static str },
    /// Signed by a subnet this checker does not accept.
    #[error("{what} is from subnet {subnet:?}, which is not accepted here")]
    WrongSubnet {
        what: &'static str,
        subnet: SubnetId,
    },
    /// Outside its validity window.
    #[error("{what} is valid from {not_before} to {not_after}, not at {now}")]
    NotValidAt {
        what: &'static str,
        not_before: u64,
        not_after: u64,
        now: u64,
    },
    /// A policy older than (or as old as) the one already held.
    #[error("policy version {got} is not newer than {have}")]
    StalePolicy { have: u64, got: u64 },
    /// A command whose sequence number was already used (a replay) or is out of order.
    #[error("command sequence {got} is not above the last accepted {last}")]
    Replayed { last: u64, got: u64 },
    /// A command addressed to another gateway.
    #[error("command is for another gateway")]
    WrongGateway,
    /// A field is out of range.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// A federation offer made by this very subnet.
    #[error("the federation offer is from this subnet itself")]
    OwnOffer,
    /// A federation offer accepted before, or older than one accepted from its subnet.
    #[error("federation offer refused as a replay: {reason}")]
    ReplayedOffer { reason: &'static str },
}

/// Why policy refuses a message or a group member. Each says which rule was hit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyRefusal {
    /// The credential does not belong to the subnet whose policy is asked.
    #[error("own credential is from another subnet than this policy")]
    NotOwnSubnet,
    /// A credential is outside its validity window.
    #[error("credential of {handle:?} has expired or is not yet valid")]
    Expired { handle: String },
    /// The credential's signing key or handle is on the revocation list.
    #[error("credential of {handle:?} is revoked")]
    Revoked { handle: String },
    /// The role is not defined by the policy.
    #[error("role {role:?} is not defined by policy")]
    UnknownRole { role: String },
    /// Policy does not let `from` talk to `to` inside the subnet.
    #[error("role {from:?} may not talk to role {to:?}")]
    RolesNotAllowed { from: String, to: String },
    /// The other subnet is not federated.
    #[error("subnet {subnet:?} is not federated")]
    NotFederated { subnet: SubnetId },
    /// The subnet is federated but not for these roles.
    #[error(
        "federation with {subnet:?} does not allow local role {local:?} with remote role {remote:?}"
    )]
    FederationRoleNotAllowed {
        subnet: SubnetId,
        local: String,
        remote: String,
    },
    /// Message time-to-live outside the policy's bounds.
    #[error("message TTL {ttl}s is outside [{min}s, {max}s]")]
    Ttl { ttl: u64, min: u64, max: u64 },
    /// Burn-on-read is required, or is not allowed.
    #[error("burn-on-read {0}")]
    BurnOnRead(&'static str),
}

/// Why a descriptor, document or route could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// Bytes did not parse as the named document.
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    /// A signature did not verify.
    #[error("bad signature on {what}")]
    BadSignature { what: &'static str },
    /// Fewer than the threshold of distinct authorities signed.
    #[error("document for epoch {epoch} has {valid} valid authority signatures, needs {needed}")]
    NotEnoughSignatures {
        epoch: u64,
        valid: usize,
        needed: usize,
    },
    /// The document is not valid at the given time.
    #[error(
        "document for epoch {epoch} is valid from {valid_after} to {valid_until}, not at {now}"
    )]
    NotValidAt {
        epoch: u64,
        valid_after: u64,
        valid_until: u64,
        now: u64,
    },
    /// A parameter or field is out of range.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// An authority refused a node's descriptor (see `authority::Refusal`).
    #[error("descriptor refused ({reason}): {detail}")]
    Refused {
        reason: &'static str,
        detail: &'static str,
    },
    /// A route could not be built from this topology.
    #[error("no route: {0}")]
    NoRoute(String),
    /// The named node is not in the topology.
    #[error("unknown node")]
    UnknownNode,
}

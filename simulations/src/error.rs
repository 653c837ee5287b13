use shoal_packet::PacketError;
use shoal_topology::TopologyError;

/// Why the harness could not build a network, a packet or the next epoch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A harness builder or simulator config setting is out of range or unsupported.
    #[error("invalid setting {what}: {reason}")]
    Config { what: &'static str, reason: String },
    /// The topology layer refused something while the harness was doing `doing`.
    #[error("topology, while {doing}: {source}")]
    Topology {
        doing: &'static str,
        #[source]
        source: TopologyError,
    },
    /// The packet layer refused something while the harness was doing `doing`.
    #[error("packet, while {doing}: {source}")]
    Packet {
        doing: &'static str,
        #[source]
        source: PacketError,
    },
    /// No document for that epoch was ever published in this run.
    #[error("no document for epoch {epoch}")]
    NoDocument { epoch: u64 },
    /// The node is not part of this network.
    #[error("unknown node")]
    UnknownNode,
    /// `drive_until_idle` was asked to wait for a network that is never idle.
    #[error("the network is never idle while relay loop cover is on; use drive_until")]
    NeverIdle,
    /// A model-mode output file could not be written.
    #[error("writing {path}: {reason}")]
    Output {
        path: std::path::PathBuf,
        reason: String,
    },
}

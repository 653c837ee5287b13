/// Everything that can go wrong decoding or building Shoal packets.
///
/// Messages name what was being parsed, never the bytes themselves: packet contents
/// are user data and must not reach logs.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PacketError {
    /// A buffer had the wrong length for what it claimed to be.
    #[error("{what}: expected {expected} bytes, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A field held a value the format does not allow.
    #[error("{what}: invalid value {value}")]
    Field { what: &'static str, value: u64 },
    /// The Sphinx layer rejected the packet (bad MAC, bad routing info, ...).
    #[error("sphinx: {0}")]
    Sphinx(String),
    /// A route or delay list did not have the shape every packet must have.
    #[error("route: {0}")]
    Route(&'static str),
    /// The packet's replay tag was already seen in its key epoch.
    #[error("replayed packet")]
    Replayed,
    /// The packet names a key epoch this node holds no key or replay generation for.
    #[error("no key for epoch {epoch}")]
    UnknownEpoch { epoch: u64 },
    /// The replay filter reached its configured capacity; the packet is shed, not forwarded
    /// unchecked.
    #[error("replay filter full")]
    ReplayFilterFull,
    /// A message is too large to fragment.
    #[error("message of {len} bytes exceeds the maximum of {max}")]
    MessageTooLarge { len: usize, max: usize },
}

impl From<sphinx_packet::Error> for PacketError {
    fn from(e: sphinx_packet::Error) -> Self {
        // The crate's messages describe structure only (lengths, kinds), never contents.
        PacketError::Sphinx(e.to_string())
    }
}

//! Fixed-size byte strings carried as hex in JSON documents.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! hex_bytes {
    ($name:ident, $n:expr) => {
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $n]);

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", hex::encode(self.0))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&hex::encode(self.0))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                let mut out = [0u8; $n];
                hex::decode_to_slice(s.as_bytes(), &mut out).map_err(serde::de::Error::custom)?;
                Ok($name(out))
            }
        }

        /// Exactly the hex digits of the bytes; surrounding whitespace is ignored. The
        /// error does not repeat the input (it may be an id the user keeps private).
        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                let mut out = [0u8; $n];
                hex::decode_to_slice(s.trim(), &mut out)
                    .map_err(|_| format!("expected {} hex digits", 2 * $n))?;
                Ok($name(out))
            }
        }

        impl From<[u8; $n]> for $name {
            fn from(v: [u8; $n]) -> Self {
                $name(v)
            }
        }
    };
}

hex_bytes!(Hex32, 32);
hex_bytes!(Hex64, 64);

/// A directory authority as nodes and clients are configured with it: its HTTP address
/// and its Ed25519 signing key. Written `ADDR=HEXKEY` on command lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityAddr {
    /// Its HTTP address.
    pub addr: std::net::SocketAddr,
    /// Its Ed25519 signing key.
    pub key: [u8; 32],
}

impl std::str::FromStr for AuthorityAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, key) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected ADDR=HEXKEY"))?;
        let addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not ip:port"))?;
        let key: Hex32 = key.parse().map_err(|e| format!("the key: {e}"))?;
        ed25519_dalek::VerifyingKey::from_bytes(&key.0)
            .map_err(|_| format!("{key:?} is not an Ed25519 public key"))?;
        Ok(AuthorityAddr { addr, key: key.0 })
    }
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_authority_addresses_parse_or_say_why() {
        let hex = "ab".repeat(32);
        assert_eq!(hex.parse::<Hex32>(), Ok(Hex32([0xab; 32])));
        assert_eq!(format!(" {hex}\n").parse::<Hex32>(), Ok(Hex32([0xab; 32])));
        assert_eq!("abc".parse::<Hex32>(), Err("expected 64 hex digits".into()));
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let ok = format!("127.0.0.1:9000={}", hex::encode(key.to_bytes()));
        let a: AuthorityAddr = ok.parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.key, key.to_bytes());
        assert!("127.0.0.1:9000".parse::<AuthorityAddr>().is_err());
        assert!(format!("host:1={hex}").parse::<AuthorityAddr>().is_err());
    }
}

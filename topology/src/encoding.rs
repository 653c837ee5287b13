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

        impl From<[u8; $n]> for $name {
            fn from(v: [u8; $n]) -> Self {
                $name(v)
            }
        }
    };
}

hex_bytes!(Hex32, 32);
hex_bytes!(Hex64, 64);

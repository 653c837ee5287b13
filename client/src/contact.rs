//! Contacts and their pasteable text form.
//!
//! ```text
//! shoal1:<base64url, no padding, of:>
//! | version = 1 (1) | mailbox (32) | gateway id (32) | x25519 key (32) | name len (1) | name (utf-8) | checksum (4) |
//! ```
//! The checksum is the first four bytes of `SHA-256("shoal contact card" || everything
//! before it)`: it catches a truncated or mistyped paste, it is not a signature. A card
//! tells its holder where to reach someone, so it should travel over a channel the two
//! people already trust (or be checked out of band, like a safety number).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2_0_11::{Digest, Sha256};
use shoal_packet::sphinx::MailboxAddress;
use shoal_topology::NodeId;
use x25519_dalek::PublicKey;

/// Text every card starts with; the digit is the card format version.
pub const CARD_PREFIX: &str = "shoal1:";
/// Longest name a card carries, in bytes.
pub const MAX_NAME_LEN: usize = 64;
const CARD_VERSION: u8 = 1;
const CHECKSUM_DOMAIN: &[u8] = b"shoal contact card";
const FIXED_LEN: usize = 1 + 32 + 32 + 32 + 1;
const CHECKSUM_LEN: usize = 4;

/// Where and how to reach someone: their mailbox at their gateway, and the key their
/// bodies are sealed to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Contact {
    pub mailbox: MailboxAddress,
    pub gateway: NodeId,
    /// X25519 public key for [`crate::seal`].
    pub public_key: [u8; 32],
}

impl std::fmt::Debug for Contact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Mailbox addresses must not reach logs.
        f.write_str("Contact(..)")
    }
}

impl Contact {
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(self.public_key)
    }
}

/// A contact with the name its owner chose, as shared between people.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactCard {
    pub name: String,
    pub contact: Contact,
}

impl std::fmt::Debug for ContactCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContactCard(..)")
    }
}

/// Why a pasted card was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CardError {
    #[error("a contact card starts with \"{CARD_PREFIX}\"")]
    MissingPrefix,
    #[error("contact card is not valid base64url: {0}")]
    Encoding(String),
    #[error("contact card is too short ({got} bytes after decoding); it may be cut off")]
    Truncated { got: usize },
    #[error("contact card has {extra} unexpected trailing bytes")]
    TrailingBytes { extra: usize },
    #[error("contact card version {0} is not supported")]
    Version(u8),
    #[error("contact card checksum does not match; it was mistyped or cut off")]
    Checksum,
    #[error("contact card name: {0}")]
    Name(&'static str),
    #[error("contact card key is not a usable X25519 public key")]
    WeakKey,
}

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut h = Sha256::new();
    h.update(CHECKSUM_DOMAIN);
    h.update(bytes);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

fn check_name(name: &str) -> Result<(), CardError> {
    if name.len() > MAX_NAME_LEN {
        return Err(CardError::Name("longer than 64 bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err(CardError::Name("contains control characters"));
    }
    Ok(())
}

/// Low-order points give the same shared secret for every sender; a card carrying one
/// is refused rather than produce bodies anyone could open.
fn is_weak_key(key: &[u8; 32]) -> bool {
    let probe = x25519_dalek::StaticSecret::from([0x42; 32]);
    !probe
        .diffie_hellman(&PublicKey::from(*key))
        .was_contributory()
}

impl ContactCard {
    pub fn new(name: impl Into<String>, contact: Contact) -> Result<Self, CardError> {
        let name = name.into();
        check_name(&name)?;
        if is_weak_key(&contact.public_key) {
            return Err(CardError::WeakKey);
        }
        Ok(ContactCard { name, contact })
    }

    /// The pasteable text form.
    pub fn to_text(&self) -> String {
        // `name` is public, so it may be longer than `new` allows: cut it at a char
        // boundary, never inside a UTF-8 sequence (which `parse` would then refuse).
        let mut cut = self.name.len().min(MAX_NAME_LEN);
        while !self.name.is_char_boundary(cut) {
            cut -= 1;
        }
        let name = &self.name.as_bytes()[..cut];
        let mut bytes = Vec::with_capacity(FIXED_LEN + name.len() + CHECKSUM_LEN);
        bytes.push(CARD_VERSION);
        bytes.extend_from_slice(&self.contact.mailbox);
        bytes.extend_from_slice(&self.contact.gateway);
        bytes.extend_from_slice(&self.contact.public_key);
        bytes.push(name.len() as u8);
        bytes.extend_from_slice(name);
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum);
        format!("{CARD_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Parses a pasted card; surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Self, CardError> {
        let body = text
            .trim()
            .strip_prefix(CARD_PREFIX)
            .ok_or(CardError::MissingPrefix)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| CardError::Encoding(e.to_string()))?;
        if bytes.len() < FIXED_LEN + CHECKSUM_LEN {
            return Err(CardError::Truncated { got: bytes.len() });
        }
        let name_len = usize::from(bytes[FIXED_LEN - 1]);
        let total = FIXED_LEN + name_len + CHECKSUM_LEN;
        if bytes.len() < total {
            return Err(CardError::Truncated { got: bytes.len() });
        }
        if bytes.len() > total {
            return Err(CardError::TrailingBytes {
                extra: bytes.len() - total,
            });
        }
        let (content, sum) = bytes.split_at(total - CHECKSUM_LEN);
        if checksum(content) != sum {
            return Err(CardError::Checksum);
        }
        if content[0] != CARD_VERSION {
            return Err(CardError::Version(content[0]));
        }
        let field = |at: usize| -> [u8; 32] {
            let mut out = [0u8; 32];
            out.copy_from_slice(&content[at..at + 32]);
            out
        };
        let name =
            std::str::from_utf8(&content[FIXED_LEN..]).map_err(|_| CardError::Name("not UTF-8"))?;
        Self::new(
            name,
            Contact {
                mailbox: field(1),
                gateway: field(33),
                public_key: field(65),
            },
        )
    }
}

impl std::fmt::Display for ContactCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl std::str::FromStr for ContactCard {
    type Err = CardError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use x25519_dalek::StaticSecret;

    fn contact() -> Contact {
        Contact {
            mailbox: [1; 32],
            gateway: [2; 32],
            public_key: PublicKey::from(&StaticSecret::from([3; 32])).to_bytes(),
        }
    }

    #[test]
    fn testvec_card() {
        let card = ContactCard::new("Ana", contact()).unwrap();
        let text = card.to_text();
        assert_eq!(text, CARD_VECTOR);
        assert_eq!(ContactCard::parse(&text).unwrap(), card);
        assert_eq!(format!(" {text}\n").parse::<ContactCard>().unwrap(), card);
    }

    const CARD_VECTOR: &str = "shoal1:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgJd_t07a9R_b6KO4V2WnVuw6lN3TUiL2vnfHG4BJLPvIgNBbmHWO2H4";

    #[test]
    fn clear_errors() {
        let text = ContactCard::new("Ana", contact()).unwrap().to_text();
        assert_eq!(
            ContactCard::parse("shoal2:AAAA"),
            Err(CardError::MissingPrefix)
        );
        assert!(matches!(
            ContactCard::parse("shoal1:***"),
            Err(CardError::Encoding(_))
        ));
        assert!(matches!(
            ContactCard::parse(&text[..CARD_PREFIX.len() + 40]),
            Err(CardError::Truncated { .. })
        ));
        assert!(matches!(
            ContactCard::parse(&text[..text.len() - 4]),
            Err(CardError::Truncated { .. })
        ));
        // A typo in the middle is caught by the checksum.
        let mut typo: Vec<char> = text.chars().collect();
        let i = CARD_PREFIX.len() + 20;
        typo[i] = if typo[i] == 'A' { 'B' } else { 'A' };
        let typo: String = typo.into_iter().collect();
        assert_eq!(ContactCard::parse(&typo), Err(CardError::Checksum));
        assert_eq!(
            ContactCard::new("a\nb", contact()),
            Err(CardError::Name("contains control characters"))
        );
        assert!(ContactCard::new("x".repeat(65), contact()).is_err());
        let mut weak = contact();
        weak.public_key = [0; 32];
        assert_eq!(ContactCard::new("w", weak), Err(CardError::WeakKey));
    }

    // Regression: a long name was cut at byte 64, inside a UTF-8 sequence, so the card
    // text made from it did not parse back.
    #[test]
    fn long_name_is_cut_at_a_char_boundary() {
        let card = ContactCard {
            name: "é".repeat(40),
            contact: contact(),
        };
        let back = ContactCard::parse(&card.to_text()).unwrap();
        assert_eq!(back.name, "é".repeat(32));
    }

    proptest! {
        #[test]
        fn roundtrip(name in "[a-zA-Z0-9 _.-]{0,64}", mailbox: [u8; 32], gateway: [u8; 32], key: [u8; 32]) {
            let c = Contact { mailbox, gateway, public_key: PublicKey::from(&StaticSecret::from(key)).to_bytes() };
            let card = ContactCard::new(name, c).unwrap();
            prop_assert_eq!(ContactCard::parse(&card.to_text()).unwrap(), card);
        }

        #[test]
        fn parse_never_panics(s in "shoal1:[A-Za-z0-9_-]{0,200}") {
            let _ = ContactCard::parse(&s);
        }
    }
}

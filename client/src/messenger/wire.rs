//! The application envelope: what travels inside the end-to-end seal of a 1:1 message.
//!
//! ```text
//! envelope = "SM" | version (1) | kind (1) | fields
//! kind 1 Direct  : credential (len32 | bytes) | ttl_secs u64 | burn u8 | body (len32 | bytes) | signature [64]
//! kind 2 Mls     : MLS message bytes (Welcome, commit, proposal, application)
//! kind 3 Policy  : admin-signed policy bytes
//! kind 4 Invite  : credential (len32 | bytes) | key package (len32 | bytes)
//! ```
//!
//! Integers are big-endian. A direct message is signed by the sender's member key over
//! [`DIRECT_DOMAIN`], the recipient's signing key, the options and the body, so it can
//! neither be forged under another member's credential nor re-targeted to someone else.
//! Decoding checks every length against what is left and never panics.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use shoal_subnet::MessageOptions;

const MAGIC: &[u8; 2] = b"SM";
const VERSION: u8 = 1;
const KIND_DIRECT: u8 = 1;
const KIND_MLS: u8 = 2;
const KIND_POLICY: u8 = 3;
const KIND_INVITE: u8 = 4;
/// Domain of the sender's signature on a direct message.
pub const DIRECT_DOMAIN: &[u8] = b"shoal direct message v1\0";

/// A decoded envelope. Nothing in it is checked yet except its shape.
#[derive(Clone, PartialEq, Eq)]
pub enum Envelope {
    Direct(DirectMessage),
    Mls(Vec<u8>),
    Policy(Vec<u8>),
    Invite(Invite),
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Contents are user data; only the kind and size are printed.
        match self {
            Envelope::Direct(d) => write!(f, "Direct({} bytes)", d.body.len()),
            Envelope::Mls(b) => write!(f, "Mls({} bytes)", b.len()),
            Envelope::Policy(b) => write!(f, "Policy({} bytes)", b.len()),
            Envelope::Invite(_) => f.write_str("Invite"),
        }
    }
}

/// A signed 1:1 message with its options.
#[derive(Clone, PartialEq, Eq)]
pub struct DirectMessage {
    /// The sender's admin-signed membership credential.
    pub credential: Vec<u8>,
    pub options: MessageOptions,
    pub body: Vec<u8>,
    pub signature: [u8; 64],
}

impl std::fmt::Debug for DirectMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The body is user data.
        write!(f, "DirectMessage({} bytes)", self.body.len())
    }
}

/// The group half of an invite: a membership credential and a fresh MLS KeyPackage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    pub credential: Vec<u8>,
    pub key_package: Vec<u8>,
}

/// Why an envelope did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed envelope: {0}")]
pub struct WireError(pub &'static str);

fn signed_bytes(recipient_key: &[u8; 32], options: &MessageOptions, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DIRECT_DOMAIN.len() + 41 + body.len());
    m.extend_from_slice(DIRECT_DOMAIN);
    m.extend_from_slice(recipient_key);
    m.extend_from_slice(&options.ttl_secs.to_be_bytes());
    m.push(u8::from(options.burn_on_read));
    m.extend_from_slice(body);
    m
}

impl DirectMessage {
    /// Signs `body` for the member whose signing key is `recipient_key`.
    pub fn sign(
        key: &SigningKey,
        credential: Vec<u8>,
        recipient_key: &[u8; 32],
        options: MessageOptions,
        body: Vec<u8>,
    ) -> Self {
        let signature = key
            .sign(&signed_bytes(recipient_key, &options, &body))
            .to_bytes();
        DirectMessage {
            credential,
            options,
            body,
            signature,
        }
    }

    /// Checks the signature by `sender_key` for `recipient_key`.
    pub fn verify(&self, sender_key: &[u8; 32], recipient_key: &[u8; 32]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(sender_key) else {
            return false;
        };
        key.verify_strict(
            &signed_bytes(recipient_key, &self.options, &self.body),
            &Signature::from_bytes(&self.signature),
        )
        .is_ok()
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Messages are bounded far below 4 GiB by the fragment layer.
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        match self {
            Envelope::Direct(d) => {
                out.push(KIND_DIRECT);
                put_bytes(&mut out, &d.credential);
                out.extend_from_slice(&d.options.ttl_secs.to_be_bytes());
                out.push(u8::from(d.options.burn_on_read));
                put_bytes(&mut out, &d.body);
                out.extend_from_slice(&d.signature);
            }
            Envelope::Mls(b) => {
                out.push(KIND_MLS);
                out.extend_from_slice(b);
            }
            Envelope::Policy(b) => {
                out.push(KIND_POLICY);
                out.extend_from_slice(b);
            }
            Envelope::Invite(i) => {
                out.push(KIND_INVITE);
                put_bytes(&mut out, &i.credential);
                put_bytes(&mut out, &i.key_package);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader(bytes);
        if r.take(2)? != MAGIC {
            return Err(WireError("not a Shoal envelope"));
        }
        if r.u8()? != VERSION {
            return Err(WireError("unknown version"));
        }
        let env = match r.u8()? {
            KIND_DIRECT => {
                let credential = r.bytes()?.to_vec();
                let ttl_secs = u64::from_be_bytes(r.array()?);
                let burn_on_read = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError("burn-on-read flag")),
                };
                let body = r.bytes()?.to_vec();
                let signature = r.array()?;
                Envelope::Direct(DirectMessage {
                    credential,
                    options: MessageOptions {
                        ttl_secs,
                        burn_on_read,
                    },
                    body,
                    signature,
                })
            }
            KIND_MLS => Envelope::Mls(r.rest().to_vec()),
            KIND_POLICY => Envelope::Policy(r.rest().to_vec()),
            KIND_INVITE => Envelope::Invite(Invite {
                credential: r.bytes()?.to_vec(),
                key_package: r.bytes()?.to_vec(),
            }),
            _ => return Err(WireError("unknown kind")),
        };
        if !r.0.is_empty() {
            return Err(WireError("trailing bytes"));
        }
        Ok(env)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        self.take(N)?.try_into().map_err(|_| WireError("truncated"))
    }
    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let len = u32::from_be_bytes(self.array()?) as usize;
        self.take(len)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn testvec_direct() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let opts = MessageOptions {
            ttl_secs: 60,
            burn_on_read: true,
        };
        let d = DirectMessage::sign(&key, b"cred".to_vec(), &[4; 32], opts, b"hi".to_vec());
        let bytes = Envelope::Direct(d.clone()).encode();
        assert_eq!(
            hex::encode(&bytes[..27]),
            "534d01010000000463726564000000000000003c01000000026869"
        );
        assert_eq!(
            Envelope::decode(&bytes).unwrap(),
            Envelope::Direct(d.clone())
        );
        let sender = key.verifying_key().to_bytes();
        assert!(d.verify(&sender, &[4; 32]));
        // Re-targeted or altered, it no longer verifies.
        assert!(!d.verify(&sender, &[5; 32]));
        let mut longer = d.clone();
        longer.options.ttl_secs = 61;
        assert!(!longer.verify(&sender, &[4; 32]));
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(Envelope::decode(b"").is_err());
        assert!(Envelope::decode(b"XX\x01\x02").is_err());
        assert!(Envelope::decode(b"SM\x02\x02").is_err());
        assert!(Envelope::decode(b"SM\x01\x09").is_err());
        let inv = Envelope::Invite(Invite {
            credential: vec![1],
            key_package: vec![2, 3],
        })
        .encode();
        assert!(Envelope::decode(&inv[..inv.len() - 1]).is_err());
        let mut trailing = inv.clone();
        trailing.push(0);
        assert!(Envelope::decode(&trailing).is_err());
        assert!(Envelope::decode(&inv).is_ok());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Envelope::decode(&bytes);
            let mut framed = b"SM\x01".to_vec();
            framed.extend_from_slice(&bytes);
            if let Ok(e) = Envelope::decode(&framed) {
                prop_assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
            }
        }
    }
}

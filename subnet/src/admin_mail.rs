//! Admin commands as mixnet messages: what an admin's own client sends to a gateway's
//! admin endpoint, and the answer the gateway sends back.
//!
//! ```text
//! request  = REQUEST_MAGIC | JSON { command: <SignedCommand text>, reply_to: { mailbox, gateway, seal_key } }
//! answer   = ANSWER_MAGIC  | JSON envelope { body: <AnswerBody JSON>, signature }   (signed by the gateway)
//! ```
//! Both travel as ordinary messages: fragmented into fixed-size bodies, sealed end to
//! end, sent on the λP schedule of the admin's client (the request) and as forward
//! packets from the gateway to the admin client's mailbox (the answer). The request is
//! sealed to the gateway; the command inside stays the only thing the gateway trusts
//! (its signature, target, expiry and sequence are checked as before), so `reply_to`
//! needs no signature: a forged one can only redirect the answer to a command the
//! admin signed, and that command is refused as a replay.
//!
//! The answer names the gateway, subnet and sequence of the command it answers and is
//! signed by the gateway's identity key, so the admin believes only the gateway it
//! asked, and only about that command.

use serde::{Deserialize, Serialize};
use shoal_topology::Hex32;

use crate::envelope::Envelope;
use crate::{SignedCommand, SubnetError, SubnetId};

/// First bytes of a request: tells the gateway's endpoint what it holds.
pub const REQUEST_MAGIC: &[u8] = b"shoal admin request v1\n";
/// First bytes of an answer: lets the admin's client set it aside from its mail.
pub const ANSWER_MAGIC: &[u8] = b"shoal admin answer v1\n";
/// The longest request a gateway reassembles (a policy with many revoked keys fits).
pub const MAX_REQUEST_BYTES: usize = 96 * 1024;
/// The longest answer: a usage report is cut to fit (it says how many it left out).
pub const MAX_ANSWER_BYTES: usize = 16 * 1024;

const ANSWER_DOMAIN: &str = "shoal gateway admin answer v1";
const REQUEST: &str = "admin request";
const ANSWER: &str = "admin answer";

/// Where the gateway sends its answer: the admin's own client, as a contact card names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyTo {
    pub mailbox: Hex32,
    /// The gateway that holds `mailbox` (its node key).
    pub gateway: Hex32,
    /// The X25519 key the answer is sealed to.
    pub seal_key: Hex32,
}

/// A signed command and where to answer it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminRequest {
    /// The [`SignedCommand`]'s text, checked by the gateway as it always was.
    pub command: String,
    pub reply_to: ReplyTo,
}

impl AdminRequest {
    pub fn new(command: &SignedCommand, reply_to: ReplyTo) -> Self {
        AdminRequest {
            command: String::from_utf8_lossy(&command.to_bytes()).into_owned(),
            reply_to,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = REQUEST_MAGIC.to_vec();
        out.extend_from_slice(&serde_json::to_vec(self).unwrap_or_default());
        out
    }

    /// Reads a request; anything else (or longer than [`MAX_REQUEST_BYTES`]) is refused.
    /// Never panics.
    pub fn parse(bytes: &[u8]) -> Result<Self, SubnetError> {
        let malformed = |reason: &str| SubnetError::Malformed {
            what: REQUEST,
            reason: reason.to_owned(),
        };
        if bytes.len() > MAX_REQUEST_BYTES {
            return Err(malformed("too long"));
        }
        let json = bytes
            .strip_prefix(REQUEST_MAGIC)
            .ok_or_else(|| malformed("not an admin request"))?;
        serde_json::from_slice(json).map_err(|e| malformed(&e.to_string()))
    }
}

/// What the gateway tells the admin about one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerBody {
    /// The gateway answering (whose key signs the answer).
    pub gateway: Hex32,
    pub subnet: SubnetId,
    /// The sequence number of the command answered.
    pub sequence: u64,
    /// `None`: applied and durable. Otherwise the refusal's label (`replayed`, ...).
    pub refusal: Option<String>,
    /// A short message without keys or addresses.
    pub message: String,
    /// For account usage: the report, as [`crate::UsageReport::encode`] writes it, in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<String>,
}

/// An answer signed by its gateway, as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedAnswer {
    envelope: Envelope,
}

impl SignedAnswer {
    /// Signs `body` with the gateway's identity key (`body.gateway` is overwritten).
    pub fn issue(
        key: &ed25519_dalek::SigningKey,
        mut body: AnswerBody,
    ) -> Result<Self, SubnetError> {
        body.gateway = Hex32(key.verifying_key().to_bytes());
        Ok(SignedAnswer {
            envelope: Envelope::seal(key, ANSWER_DOMAIN, ANSWER, &body)?,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = ANSWER_MAGIC.to_vec();
        out.extend_from_slice(&self.envelope.to_bytes());
        out
    }

    /// Whether `bytes` claim to be an answer (nothing checked): how a client tells one
    /// from mail.
    pub fn looks_like(bytes: &[u8]) -> bool {
        bytes.starts_with(ANSWER_MAGIC)
    }

    /// Reads an answer and checks it was signed by `gateway`. Never panics.
    pub fn verify(bytes: &[u8], gateway: &Hex32) -> Result<AnswerBody, SubnetError> {
        if bytes.len() > MAX_ANSWER_BYTES {
            return Err(SubnetError::Malformed {
                what: ANSWER,
                reason: "too long".into(),
            });
        }
        let json = bytes
            .strip_prefix(ANSWER_MAGIC)
            .ok_or(SubnetError::Malformed {
                what: ANSWER,
                reason: "not an admin answer".into(),
            })?;
        let envelope = Envelope::parse(json, ANSWER)?;
        envelope.verify(gateway, ANSWER_DOMAIN, ANSWER)?;
        let body: AnswerBody = envelope.body(ANSWER)?;
        if body.gateway != *gateway {
            return Err(SubnetError::WrongGateway);
        }
        Ok(body)
    }

    /// The body, unchecked: for a holder that files answers before anyone verifies them.
    pub fn peek(bytes: &[u8]) -> Option<AnswerBody> {
        let json = bytes.strip_prefix(ANSWER_MAGIC)?;
        Envelope::parse(json, ANSWER).ok()?.body(ANSWER).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AccountAction, CommandBody, SubnetAdmin};
    use ed25519_dalek::SigningKey;

    fn reply() -> ReplyTo {
        ReplyTo {
            mailbox: Hex32([1; 32]),
            gateway: Hex32([2; 32]),
            seal_key: Hex32([3; 32]),
        }
    }

    #[test]
    fn request_roundtrip_and_refusals() {
        let admin = SubnetAdmin::from_secret([1; 32]);
        let cmd = admin
            .issue_command(CommandBody {
                subnet: Hex32([0; 32]),
                gateway: Hex32([8; 32]),
                sequence: 4,
                expires_at: 99,
                action: AccountAction::AccountUsage,
            })
            .unwrap();
        let req = AdminRequest::new(&cmd, reply());
        let bytes = req.to_bytes();
        assert_eq!(AdminRequest::parse(&bytes).unwrap(), req);
        assert_eq!(req.command.as_bytes(), &cmd.to_bytes()[..]);
        assert!(AdminRequest::parse(&bytes[1..]).is_err());
        assert!(AdminRequest::parse(b"").is_err());
        let mut long = REQUEST_MAGIC.to_vec();
        long.resize(MAX_REQUEST_BYTES + 1, b' ');
        assert!(AdminRequest::parse(&long).is_err());
    }

    #[test]
    fn answer_is_believed_only_from_its_gateway() {
        let gw = SigningKey::from_bytes(&[5; 32]);
        let other = SigningKey::from_bytes(&[6; 32]);
        let gw_id = Hex32(gw.verifying_key().to_bytes());
        let body = AnswerBody {
            gateway: Hex32([0; 32]),
            subnet: Hex32([7; 32]),
            sequence: 9,
            refusal: Some("replayed".into()),
            message: "command sequence is not above the last accepted".into(),
            usage: None,
        };
        let bytes = SignedAnswer::issue(&gw, body.clone()).unwrap().to_bytes();
        assert!(SignedAnswer::looks_like(&bytes));
        let got = SignedAnswer::verify(&bytes, &gw_id).unwrap();
        assert_eq!((got.sequence, got.gateway), (9, gw_id));
        assert_eq!(SignedAnswer::peek(&bytes).unwrap(), got);
        // Another gateway's key, or a changed byte: refused.
        let forged = SignedAnswer::issue(&other, body).unwrap().to_bytes();
        assert!(SignedAnswer::verify(&forged, &gw_id).is_err());
        let text = String::from_utf8(bytes)
            .unwrap()
            .replace("\\\"sequence\\\":9", "\\\"sequence\\\":8");
        assert!(SignedAnswer::verify(text.as_bytes(), &gw_id).is_err());
        assert!(SignedAnswer::verify(b"hello", &gw_id).is_err());
    }
}

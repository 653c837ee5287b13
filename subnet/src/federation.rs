//! Signed federation offers: how two admins agree to federate without trusting the
//! channel they paste through.
//!
//! Chain: text → [`UncheckedOffer`] → `.check_signature()` → [`VerifiedOffer`] →
//! `.check_fresh(us, now, &mut OfferGuard)` → [`FederationOffer`]. An offer is signed by
//! the offering subnet's admin (the subnet named in its body, as credentials are), so
//! checking it needs no key store; *whether* to federate is the accepting admin's
//! decision, shown to it as a policy diff before anything is signed.
//!
//! Federation is mutual: A's offer, accepted by B, puts A into B's policy; B's
//! counter-offer (addressed to A, answering A's nonce), accepted by A, puts B into A's.
//! Replay: each offer carries a random nonce and its issue time; an [`OfferGuard`] (kept
//! by the accepting admin) refuses a nonce it accepted before and any offer from the same
//! subnet issued before the newest one it accepted, so an old offer with fewer or other
//! roles cannot be slipped in after a newer one.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use shoal_topology::Hex32;

use crate::credential::check_name;
use crate::envelope::Envelope;
use crate::{Federation, SubnetAdmin, SubnetError, SubnetId};

const DOMAIN: &str = "shoal subnet federation offer v1";
const WHAT: &str = "federation offer";
/// The line that carries the offer in its pasteable text.
pub const OFFER_PREFIX: &str = "shoal-federation-offer1:";
/// The longest offer text accepted (a few hundred roles; far above any real offer).
pub const MAX_OFFER_TEXT: usize = 64 * 1024;
/// Clock difference between two admins' machines tolerated on `issued_at`.
pub const CLOCK_SKEW_SECS: u64 = 300;

/// What the offering admin signs, from its own side: `local_roles` of the offering
/// subnet may talk to `remote_roles` of the accepting one ("the roles allowed to reach
/// us").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferBody {
    /// The offering subnet (its admin's key, which signs the offer).
    pub subnet: SubnetId,
    /// Only this subnet may accept it (set on counter-offers; `None`: anyone it is given to).
    pub to: Option<SubnetId>,
    /// The offering subnet's roles that may talk to the other subnet.
    pub local_roles: Vec<String>,
    /// The accepting subnet's roles the offering subnet lets reach its members.
    pub remote_roles: Vec<String>,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds after which the offer is refused.
    pub expires_at: u64,
    /// Random, unique per offer: what makes a replay recognisable.
    pub nonce: Hex32,
    /// The nonce of the offer this one answers (a counter-offer), if any.
    pub reply_to: Option<Hex32>,
}

impl OfferBody {
    fn validate(&self) -> Result<(), SubnetError> {
        let invalid = |reason: &str| SubnetError::Invalid {
            what: WHAT,
            reason: reason.into(),
        };
        if self.local_roles.is_empty() || self.remote_roles.is_empty() {
            return Err(invalid("names no roles on one side"));
        }
        for r in self.local_roles.iter().chain(&self.remote_roles) {
            check_name("role", r)?;
        }
        if self.expires_at <= self.issued_at {
            return Err(invalid("expires before it is issued"));
        }
        if self.to == Some(self.subnet) {
            return Err(invalid("is addressed to its own subnet"));
        }
        Ok(())
    }
}

/// An offer as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedOffer {
    envelope: Envelope,
    body: OfferBody,
}

impl SignedOffer {
    /// The offer as the line `shoal-federation-offer1:<base64url of the envelope>`.
    pub fn to_line(&self) -> String {
        format!(
            "{OFFER_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(self.envelope.to_bytes())
        )
    }

    /// Pasteable text: comment lines saying what the offer is (informational: only the
    /// signed line counts), then the line.
    pub fn to_text(&self) -> String {
        let b = &self.body;
        let to =
            b.to.map_or_else(|| "any subnet it is given to".to_owned(), |s| hex(&s));
        format!(
            "# Shoal federation offer (signed; only the last line counts)\n\
             # from subnet: {}\n\
             # to: {to}\n\
             # their roles {} may talk to your roles {}\n\
             # expires at unix time {}\n\
             {}\n",
            hex(&b.subnet),
            b.local_roles.join(","),
            b.remote_roles.join(","),
            b.expires_at,
            self.to_line()
        )
    }

    pub fn body(&self) -> &OfferBody {
        &self.body
    }
}

fn hex(h: &Hex32) -> String {
    h.0.iter().map(|b| format!("{b:02x}")).collect()
}

impl SubnetAdmin {
    /// Signs a federation offer from this subnet (`body.subnet` is overwritten). The
    /// caller draws `body.nonce` at random.
    pub fn issue_offer(&self, mut body: OfferBody) -> Result<SignedOffer, SubnetError> {
        body.subnet = self.subnet();
        body.validate()?;
        Ok(SignedOffer {
            envelope: Envelope::seal(self.key(), DOMAIN, WHAT, &body)?,
            body,
        })
    }
}

/// Parsed, nothing checked.
#[derive(Debug, Clone)]
pub struct UncheckedOffer {
    envelope: Envelope,
    body: OfferBody,
}

impl UncheckedOffer {
    /// Reads pasteable text: blank lines and `#` comments are skipped, exactly one line
    /// must start with [`OFFER_PREFIX`], anything else is refused (so a mangled paste is
    /// an error, not silently half-read).
    pub fn parse(text: &str) -> Result<Self, SubnetError> {
        let malformed = |reason: &str| SubnetError::Malformed {
            what: WHAT,
            reason: reason.into(),
        };
        if text.len() > MAX_OFFER_TEXT {
            return Err(malformed("too long"));
        }
        let mut found = None;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some(encoded) = line.strip_prefix(OFFER_PREFIX) else {
                return Err(malformed(
                    "a line is neither a comment nor the offer (expected shoal-federation-offer1:...)",
                ));
            };
            if found.replace(encoded).is_some() {
                return Err(malformed("more than one offer line"));
            }
        }
        let encoded = found.ok_or_else(|| malformed("no shoal-federation-offer1: line"))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| malformed("the offer line is not base64url"))?;
        let envelope = Envelope::parse(&bytes, WHAT)?;
        let body: OfferBody = envelope.body(WHAT)?;
        body.validate()?;
        Ok(UncheckedOffer { envelope, body })
    }

    /// Checks the signature of the subnet the offer names (a changed role, expiry or
    /// subnet breaks it).
    pub fn check_signature(self) -> Result<VerifiedOffer, SubnetError> {
        self.envelope.verify(&self.body.subnet, DOMAIN, WHAT)?;
        Ok(VerifiedOffer {
            signed: SignedOffer {
                envelope: self.envelope,
                body: self.body,
            },
        })
    }
}

/// Signed by the subnet it names; not yet checked for us, expiry or replay.
#[derive(Debug, Clone)]
pub struct VerifiedOffer {
    signed: SignedOffer,
}

impl VerifiedOffer {
    pub fn body(&self) -> &OfferBody {
        &self.signed.body
    }

    /// Checks the offer is for subnet `us` (not from it, and addressed to it if
    /// addressed at all), valid at `now_unix`, and neither accepted before nor older
    /// than the newest offer accepted from its subnet; records it in `guard`.
    pub fn check_fresh(
        self,
        us: &SubnetId,
        now_unix: u64,
        guard: &mut OfferGuard,
    ) -> Result<FederationOffer, SubnetError> {
        let b = &self.signed.body;
        if b.subnet == *us {
            return Err(SubnetError::OwnOffer);
        }
        if let Some(to) = b.to
            && to != *us
        {
            return Err(SubnetError::WrongSubnet {
                what: "federation offer's addressee",
                subnet: to,
            });
        }
        if now_unix > b.expires_at || now_unix.saturating_add(CLOCK_SKEW_SECS) < b.issued_at {
            return Err(SubnetError::NotValidAt {
                what: WHAT,
                not_before: b.issued_at,
                not_after: b.expires_at,
                now: now_unix,
            });
        }
        guard.check_and_record(b)?;
        Ok(FederationOffer {
            signed: self.signed,
        })
    }
}

/// An offer this subnet may accept now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationOffer {
    signed: SignedOffer,
}

impl FederationOffer {
    pub fn body(&self) -> &OfferBody {
        &self.signed.body
    }
    pub fn subnet(&self) -> SubnetId {
        self.signed.body.subnet
    }

    /// The entry the accepting subnet's policy gets: the offer seen from the other side
    /// (our `local_roles` are the offer's `remote_roles`, and the reverse).
    pub fn federation(&self) -> Federation {
        let b = &self.signed.body;
        Federation {
            subnet: b.subnet,
            local_roles: b.remote_roles.clone(),
            remote_roles: b.local_roles.clone(),
        }
    }

    /// The body of the counter-offer that completes the federation: from us, to the
    /// offering subnet, answering its nonce, with the roles of `federation` (our policy
    /// entry for it). The caller sets the times and a fresh nonce.
    pub fn counter_body(
        &self,
        federation: &Federation,
        issued_at: u64,
        expires_at: u64,
        nonce: Hex32,
    ) -> OfferBody {
        OfferBody {
            subnet: Hex32([0; 32]),
            to: Some(self.subnet()),
            local_roles: federation.local_roles.clone(),
            remote_roles: federation.remote_roles.clone(),
            issued_at,
            expires_at,
            nonce,
            reply_to: Some(self.signed.body.nonce),
        }
    }
}

/// What an accepting admin remembers per offering subnet. It persists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferGuard {
    peers: BTreeMap<SubnetId, PeerOffers>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerOffers {
    /// Issue time of the newest offer accepted; older ones are refused.
    newest_issued_at: u64,
    /// Nonces accepted at `newest_issued_at` (older ones are refused by time anyway).
    nonces: BTreeSet<Hex32>,
}

impl OfferGuard {
    fn check_and_record(&mut self, b: &OfferBody) -> Result<(), SubnetError> {
        let peer = self.peers.entry(b.subnet).or_default();
        if peer.nonces.contains(&b.nonce) {
            return Err(SubnetError::ReplayedOffer {
                reason: "this offer was already accepted",
            });
        }
        if b.issued_at < peer.newest_issued_at {
            return Err(SubnetError::ReplayedOffer {
                reason: "a newer offer from that subnet was already accepted",
            });
        }
        if b.issued_at > peer.newest_issued_at {
            peer.nonces.clear();
            peer.newest_issued_at = b.issued_at;
        }
        peer.nonces.insert(b.nonce);
        Ok(())
    }

    /// Whether an offer from `subnet` was ever accepted.
    pub fn knows(&self, subnet: &SubnetId) -> bool {
        self.peers.contains_key(subnet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(nonce: u8, issued_at: u64) -> OfferBody {
        OfferBody {
            subnet: Hex32([0; 32]),
            to: None,
            local_roles: vec!["staff".into()],
            remote_roles: vec!["staff".into(), "lead".into()],
            issued_at,
            expires_at: issued_at + 1000,
            nonce: Hex32([nonce; 32]),
            reply_to: None,
        }
    }

    fn accept(
        text: &str,
        us: &SubnetId,
        now: u64,
        g: &mut OfferGuard,
    ) -> Result<FederationOffer, SubnetError> {
        UncheckedOffer::parse(text)?
            .check_signature()?
            .check_fresh(us, now, g)
    }

    #[test]
    fn testvec_offer() {
        let a = SubnetAdmin::from_secret([1; 32]);
        let line = a.issue_offer(body(7, 1000)).unwrap().to_line();
        assert_eq!(line, OFFER_VECTOR);
        let b = SubnetAdmin::from_secret([2; 32]);
        let offer = accept(OFFER_VECTOR, &b.subnet(), 1500, &mut OfferGuard::default()).unwrap();
        assert_eq!(offer.subnet(), a.subnet());
        let mut expect = body(7, 1000);
        expect.subnet = a.subnet();
        assert_eq!(offer.body(), &expect);
    }

    const OFFER_VECTOR: &str = "shoal-federation-offer1:eyJib2R5Ijoie1wic3VibmV0XCI6XCI4YTg4ZTNkZDc0MDlmMTk1ZmQ1MmRiMmQzY2JhNWQ3MmNhNjcwOWJmMWQ5NDEyMWJmMzc0ODgwMWI0MGY2ZjVjXCIsXCJ0b1wiOm51bGwsXCJsb2NhbF9yb2xlc1wiOltcInN0YWZmXCJdLFwicmVtb3RlX3JvbGVzXCI6W1wic3RhZmZcIixcImxlYWRcIl0sXCJpc3N1ZWRfYXRcIjoxMDAwLFwiZXhwaXJlc19hdFwiOjIwMDAsXCJub25jZVwiOlwiMDcwNzA3MDcwNzA3MDcwNzA3MDcwNzA3MDcwNzA3MDcwNzA3MDcwNzA3MDcwNzA3MDcwNzA3MDcwNzA3MDcwN1wiLFwicmVwbHlfdG9cIjpudWxsfSIsInNpZ25hdHVyZSI6IjcyZmI2ZjI1ZjhhYjFjY2U1NWMwMWVmNmI1YTUwMDAxNGEwNjhlMWNmZTFhNzg4NjM1MzRiYjhkMGM3MTU2OWRkYzc0M2RkM2RmNzdmZjEzZjI3N2Q2ZjFkOTg5NmU1MTk3M2Q2MjgwNzBjMmNjMmEyOGZjMmY1NWM2NmFkMTBkIn0";

    #[test]
    fn offer_and_counter_offer_make_both_policies_list_each_other() {
        let a = SubnetAdmin::from_secret([1; 32]);
        let b = SubnetAdmin::from_secret([2; 32]);
        let offer = a.issue_offer(body(1, 1000)).unwrap();
        let text = offer.to_text();
        assert!(text.contains(&hex(&a.subnet())), "{text}");
        let mut gb = OfferGuard::default();
        let got = accept(&text, &b.subnet(), 1100, &mut gb).unwrap();
        let fed_b = got.federation();
        assert_eq!(fed_b.subnet, a.subnet());
        assert_eq!(fed_b.local_roles, vec!["staff", "lead"]);
        assert_eq!(fed_b.remote_roles, vec!["staff"]);
        assert!(gb.knows(&a.subnet()));

        let counter = b
            .issue_offer(got.counter_body(&fed_b, 1100, 2100, Hex32([9; 32])))
            .unwrap();
        let mut ga = OfferGuard::default();
        let back = accept(&counter.to_text(), &a.subnet(), 1200, &mut ga).unwrap();
        assert_eq!(back.body().reply_to, Some(Hex32([1; 32])));
        let fed_a = back.federation();
        assert_eq!(fed_a.subnet, b.subnet());
        assert_eq!(fed_a.local_roles, vec!["staff"]);
        assert_eq!(fed_a.remote_roles, vec!["staff", "lead"]);
        // The counter-offer is addressed to A: a third subnet cannot accept it.
        let c = SubnetAdmin::from_secret([3; 32]);
        assert!(matches!(
            accept(
                &counter.to_text(),
                &c.subnet(),
                1200,
                &mut OfferGuard::default()
            ),
            Err(SubnetError::WrongSubnet { .. })
        ));
    }

    #[test]
    fn tampered_expired_own_and_replayed_offers_are_refused() {
        let a = SubnetAdmin::from_secret([1; 32]);
        let b = SubnetAdmin::from_secret([2; 32]);
        let us = b.subnet();
        let offer = a.issue_offer(body(1, 1000)).unwrap();
        let mut g = OfferGuard::default();

        // Tampered: a role added to the signed body, re-encoded.
        let mut env = offer.envelope.clone();
        env.body = env
            .body
            .replace("\"staff\",\"lead\"", "\"staff\",\"lead\",\"admin\"");
        assert_ne!(env.body, offer.envelope.body);
        let forged = format!("{OFFER_PREFIX}{}", URL_SAFE_NO_PAD.encode(env.to_bytes()));
        assert!(matches!(
            accept(&forged, &us, 1100, &mut g),
            Err(SubnetError::BadSignature { .. })
        ));
        // Claiming another subnet as the offerer breaks the signature too.
        let mut env = offer.envelope.clone();
        env.body = env.body.replace(
            &hex(&a.subnet()),
            &hex(&SubnetAdmin::from_secret([4; 32]).subnet()),
        );
        let forged = format!("{OFFER_PREFIX}{}", URL_SAFE_NO_PAD.encode(env.to_bytes()));
        assert!(matches!(
            accept(&forged, &us, 1100, &mut g),
            Err(SubnetError::BadSignature { .. })
        ));
        // Expired, and not yet valid (beyond the clock skew).
        assert!(matches!(
            accept(&offer.to_text(), &us, 2001, &mut g),
            Err(SubnetError::NotValidAt { .. })
        ));
        assert!(matches!(
            accept(&offer.to_text(), &us, 1000 - CLOCK_SKEW_SECS - 1, &mut g),
            Err(SubnetError::NotValidAt { .. })
        ));
        // Our own offer pasted back to us.
        assert_eq!(
            accept(&offer.to_text(), &a.subnet(), 1100, &mut g).unwrap_err(),
            SubnetError::OwnOffer
        );
        // Refusals above recorded nothing: the genuine offer is accepted once.
        assert!(!g.knows(&a.subnet()));
        accept(&offer.to_text(), &us, 1100, &mut g).unwrap();
        assert!(matches!(
            accept(&offer.to_text(), &us, 1101, &mut g),
            Err(SubnetError::ReplayedOffer { .. })
        ));
        // A newer offer replaces it; the older one (unseen nonce) cannot come back after.
        let older = a.issue_offer(body(2, 900)).unwrap();
        let newer = a.issue_offer(body(3, 1050)).unwrap();
        accept(&newer.to_text(), &us, 1100, &mut g).unwrap();
        assert!(matches!(
            accept(&older.to_text(), &us, 1100, &mut g),
            Err(SubnetError::ReplayedOffer { .. })
        ));
        // The guard survives a round-trip through its persisted JSON.
        let saved = serde_json::to_string(&g).unwrap();
        let mut g2: OfferGuard = serde_json::from_str(&saved).unwrap();
        assert!(matches!(
            accept(&newer.to_text(), &us, 1100, &mut g2),
            Err(SubnetError::ReplayedOffer { .. })
        ));
    }

    #[test]
    fn malformed_texts_are_refused_without_panicking() {
        let a = SubnetAdmin::from_secret([1; 32]);
        let line = a.issue_offer(body(1, 1000)).unwrap().to_line();
        for bad in [
            String::new(),
            "# only a comment\n".to_owned(),
            format!("{line}\n{line}\n"),
            format!("hello\n{line}\n"),
            format!("{OFFER_PREFIX}!!!"),
            format!("{OFFER_PREFIX}{}", URL_SAFE_NO_PAD.encode(b"{}")),
            line[..line.len() - 5].to_owned(),
            "x".repeat(MAX_OFFER_TEXT + 1),
        ] {
            assert!(
                matches!(
                    UncheckedOffer::parse(&bad),
                    Err(SubnetError::Malformed { .. })
                ),
                "{bad:.80}"
            );
        }
        // Invalid bodies are refused before signing and after parsing.
        let mut b = body(1, 1000);
        b.remote_roles.clear();
        assert!(matches!(a.issue_offer(b), Err(SubnetError::Invalid { .. })));
        let mut b = body(1, 1000);
        b.expires_at = 1000;
        assert!(a.issue_offer(b).is_err());
        let mut b = body(1, 1000);
        b.to = Some(a.subnet());
        assert!(a.issue_offer(b).is_err());
    }
}

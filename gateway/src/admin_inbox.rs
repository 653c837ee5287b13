//! The gateway's admin endpoint, sans-IO: subnet commands arrive through the mixnet as
//! ordinary messages and their answers leave the same way.
//!
//! An admin's own client (a `shoal client run` like any member's) sends an
//! [`AdminRequest`] to [`ADMIN_MAILBOX`] at this gateway, sealed to [`admin_seal_key`]
//! (the gateway's identity on the Montgomery curve), fragmented into fixed-size bodies
//! and carried in its λP slots, so its link shows nothing but its usual schedule. The
//! mailbox core acks each packet like λP cover; the driver hands the payload to
//! [`AdminInbox::handle_payload`], which opens and reassembles it (within
//! [`MAX_REQUEST_BYTES`] and [`MAX_PENDING`] requests). The command inside goes through
//! the one gate it always had: [`crate::remote_admin::check_command`] (signature, hosted
//! subnet) then [`crate::Mailbox::apply_admin`] (target, expiry, sequence). Each request
//! whose command parses is answered once its change is durable, or refused, by a
//! [`SignedAnswer`] sealed to the request's `reply_to` and sent as forward packets from
//! this gateway through the mix layers ([`answer_plaintexts`], [`route_answer`]), without
//! ack slots. A refusal is one fragment of fixed content naming only what the request
//! claimed, so the endpoint sends no more than it was sent.
//!
//! The X25519 key is the Ed25519 identity converted (RFC 7748 birational map); using
//! one key pair for Ed25519 signatures and an X25519-based hybrid encryption is shown
//! sound in Thormarker, "On using the same key pair for Ed25519 and an X25519 based
//! KEM" (eprint 2021/509). It spares the directory a new key and the admin a new value
//! to copy: the gateway key it already names is enough.

use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::CryptoRng;
use shoal_packet::fragment::{self, ReassemblyLimits};
use shoal_packet::payload::{self, ACK_MESSAGE_SIZE, AckSlot};
pub use shoal_packet::sphinx::ADMIN_MAILBOX;
use shoal_packet::sphinx::{self, SURB_SIZE};
use shoal_packet::{BodyKind, Fragment, Frame, Reassembler, seal};
pub use shoal_subnet::admin_mail::{MAX_ANSWER_BYTES, MAX_REQUEST_BYTES};
use shoal_subnet::{AdminRequest, AnswerBody, ReplyTo, SignedAnswer, SubnetId, UsageReport};
use shoal_topology::route::sample_delays;
use shoal_topology::{EpochSchedule, NodeId, Topology};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::GatewayError;
use crate::remote_admin::Refusal;

/// Requests being reassembled at once; beyond this the least advanced is dropped.
pub const MAX_PENDING: usize = 16;
/// An incomplete request is dropped once no fragment of it came for this long.
const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(600);
/// Completed request ids remembered, so a retransmitted fragment is not a second request.
const REMEMBER_COMPLETED: usize = 4096;

/// The X25519 key admins seal requests to, from the gateway's Ed25519 identity `gateway`
/// (its node key); `None` if that is not a valid Ed25519 key.
pub fn admin_seal_key(gateway: &[u8; 32]) -> Option<PublicKey> {
    let key = ed25519_dalek::VerifyingKey::from_bytes(gateway).ok()?;
    Some(PublicKey::from(key.to_montgomery().to_bytes()))
}

/// Why a payload for the admin endpoint led to nothing (counted, never logged with content).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxDrop {
    /// Not a forward payload sealed to this gateway, or not a message fragment.
    Unreadable,
    /// A fragment already seen, or of a request too large to hold.
    Ignored,
    /// The reassembled message is not an admin request.
    NotARequest,
}

/// Reassembles admin requests from the payloads delivered to [`ADMIN_MAILBOX`].
pub struct AdminInbox {
    secret: StaticSecret,
    reassembler: Reassembler,
}

impl std::fmt::Debug for AdminInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminInbox")
            .field("pending", &self.reassembler.pending())
            .finish_non_exhaustive()
    }
}

impl AdminInbox {
    /// The endpoint of the gateway whose identity is `identity`.
    pub fn new(identity: &SigningKey) -> Self {
        AdminInbox {
            secret: StaticSecret::from(identity.to_scalar_bytes()),
            reassembler: Reassembler::new(ReassemblyLimits {
                max_pending: MAX_PENDING,
                max_bytes: MAX_REQUEST_BYTES,
                timeout: REASSEMBLY_TIMEOUT,
                remember_completed: REMEMBER_COMPLETED,
            }),
        }
    }

    /// Takes the Sphinx payload of a packet that ended at [`ADMIN_MAILBOX`]; returns the
    /// request once its last fragment is in (`Ok(None)` while more are needed). Costs
    /// one X25519 operation, like any packet's unwrap; holds at most
    /// [`MAX_REQUEST_BYTES`] across [`MAX_PENDING`] requests.
    pub fn handle_payload(
        &mut self,
        payload: &[u8],
        now: Instant,
    ) -> Result<Option<AdminRequest>, InboxDrop> {
        let plaintext = sphinx::open_forward(payload).map_err(|_| InboxDrop::Unreadable)?;
        let (_, sealed) =
            payload::split_plaintext(&plaintext).map_err(|_| InboxDrop::Unreadable)?;
        let inner = seal::open(&self.secret, sealed).map_err(|_| InboxDrop::Unreadable)?;
        let fragment = Fragment::decode(&inner).map_err(|_| InboxDrop::Unreadable)?;
        if fragment.kind != BodyKind::Real {
            return Err(InboxDrop::Unreadable);
        }
        match self.reassembler.insert(fragment, now) {
            fragment::Reassembled::Pending => Ok(None),
            fragment::Reassembled::Complete { message, .. } => AdminRequest::parse(&message)
                .map(Some)
                .map_err(|_| InboxDrop::NotARequest),
            _ => Err(InboxDrop::Ignored),
        }
    }

    /// Requests partly received.
    pub fn pending(&self) -> usize {
        self.reassembler.pending()
    }
}

/// The signed answer to the command (`subnet`, `sequence`) once it was applied and made
/// durable (`Ok`, with the usage report of a usage query) or refused.
pub fn answer(
    identity: &SigningKey,
    subnet: SubnetId,
    sequence: u64,
    outcome: &Result<Option<UsageReport>, Refusal>,
) -> Result<Vec<u8>, GatewayError> {
    let (refusal, message, usage) = match outcome {
        Ok(usage) => (None, "applied".to_owned(), usage.as_ref()),
        Err((cause, message)) => (Some(cause.label().to_owned()), (*message).to_owned(), None),
    };
    // Hex doubles the report; the rest of the answer is well under 1 KiB.
    let usage = usage.map(|r| hex::encode(r.encode((MAX_ANSWER_BYTES - 1024) / 2)));
    let body = AnswerBody {
        gateway: shoal_topology::Hex32([0; 32]),
        subnet,
        sequence,
        refusal,
        message,
        usage,
    };
    let signed = SignedAnswer::issue(identity, body).map_err(|_| GatewayError::TooLong {
        what: "admin answer",
        len: 0,
        max: MAX_ANSWER_BYTES,
    })?;
    Ok(signed.to_bytes())
}

/// The exit plaintexts that carry `answer` to `to`: one per fragment, sealed to its seal
/// key, with an all-zero ack slot (no ack is asked for, as for λD drops).
pub fn answer_plaintexts<R: CryptoRng + ?Sized>(
    rng: &mut R,
    to: &ReplyTo,
    answer: &[u8],
) -> Result<Vec<Vec<u8>>, GatewayError> {
    if answer.len() > MAX_ANSWER_BYTES {
        return Err(GatewayError::TooLong {
            what: "admin answer",
            len: answer.len(),
            max: MAX_ANSWER_BYTES,
        });
    }
    let seal_to = PublicKey::from(to.seal_key.0);
    let mut id = [0u8; 16];
    rng.fill_bytes(&mut id);
    let slot = AckSlot {
        surb: [0; SURB_SIZE],
        message: [0; ACK_MESSAGE_SIZE],
    };
    let mut out = Vec::new();
    for f in fragment::fragment(id, answer).map_err(GatewayError::Frame)? {
        let sealed = seal::seal(rng, &seal_to, &f.encode()).map_err(|_| GatewayError::Field {
            what: "admin reply seal key",
            value: 0,
        })?;
        out.push(payload::join_plaintext(&slot, &sealed).map_err(GatewayError::Frame)?);
    }
    Ok(out)
}

/// Wraps each plaintext in a forward packet to `to`'s mailbox on a route
/// `[me, L1, L2, L3, to.gateway]` of `topo`, with delays drawn as a client draws them.
/// The frames enter this gateway's own pipeline, as its clients' packets do.
pub fn route_answer<R: CryptoRng + ?Sized>(
    rng: &mut R,
    topo: &Topology,
    me: &NodeId,
    to: &ReplyTo,
    plaintexts: &[Vec<u8>],
) -> Result<Vec<Frame>, GatewayError> {
    let epoch = topo.epoch();
    let label = EpochSchedule::frame_label(epoch);
    let mut frames = Vec::with_capacity(plaintexts.len());
    for plaintext in plaintexts {
        let route = topo
            .client_route(rng, epoch, me, &to.gateway.0)
            .map_err(|_| GatewayError::Field {
                what: "admin reply gateway (not in the directory)",
                value: 0,
            })?;
        let delays = sample_delays(rng, topo.params(), route.len());
        let (fwd, _) = sphinx::build_forward(rng, &route, &delays, &to.mailbox.0, plaintext)
            .map_err(GatewayError::Frame)?;
        frames.push(Frame::sphinx(label, &fwd.packet).map_err(GatewayError::Frame)?);
    }
    Ok(frames)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub(crate) mod tests {
    use super::*;
    use crate::mailbox::tests::Net;
    use crate::mailbox::{Committed, DeliverOutcome, Mailbox, MailboxConfig, Salt};
    use crate::remote_admin::check_command;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use shoal_packet::fragment::Reassembled;
    use shoal_packet::protocol::AdminRefusal;
    use shoal_subnet::{AccountAction, CommandBody, SubnetAdmin};
    use shoal_topology::Hex32;
    use std::time::UNIX_EPOCH;

    const NOW: u64 = 1_700_000_000;

    pub(crate) fn gateway_key() -> SigningKey {
        SigningKey::from_bytes(&[0x47; 32])
    }

    /// The admin's client's identity the answers are sealed to.
    fn admin_client() -> (StaticSecret, ReplyTo) {
        let secret = StaticSecret::from([0x31; 32]);
        let to = ReplyTo {
            mailbox: Hex32([0x32; 32]),
            gateway: Hex32([0x33; 32]),
            seal_key: Hex32(PublicKey::from(&secret).to_bytes()),
        };
        (secret, to)
    }

    /// The Sphinx payloads an admin's client sends for `message`, as the exit gateway
    /// receives them: fragments sealed to the gateway, each with a real SURB-ack, built
    /// with the client's primitives.
    pub(crate) fn request_payloads(net: &mut Net, gw: &SigningKey, message: &[u8]) -> Vec<Vec<u8>> {
        let seal_to = admin_seal_key(&gw.verifying_key().to_bytes()).unwrap();
        // A fresh message id per send, as a client draws one.
        static SENDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SENDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut rng = StdRng::seed_from_u64(n);
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        fragment::fragment(id, message)
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let body = seal::seal(&mut rng, &seal_to, &f.encode()).unwrap();
                net.forward_with_body(&ADMIN_MAILBOX, &[0x77; 32], [i as u8; 16], &body)
                    .1
            })
            .collect()
    }

    fn command(admin: &SubnetAdmin, gw: &SigningKey, seq: u64, action: AccountAction) -> Vec<u8> {
        let cmd = admin
            .issue_command(CommandBody {
                subnet: Hex32([0; 32]),
                gateway: Hex32(gw.verifying_key().to_bytes()),
                sequence: seq,
                expires_at: NOW + 600,
                action,
            })
            .unwrap();
        AdminRequest::new(&cmd, admin_client().1).to_bytes()
    }

    fn create(account: u8) -> AccountAction {
        AccountAction::CreateAccount {
            account: Hex32(
                SigningKey::from_bytes(&[account; 32])
                    .verifying_key()
                    .to_bytes(),
            ),
            mailbox: Hex32([account; 32]),
            quota: 10,
        }
    }

    /// What the driver does with one delivered payload, in one function: the mailbox
    /// core acks it, the inbox reassembles it, the command is checked and applied, the
    /// batch is made durable, and the answer is built. Returns the answer as the admin's
    /// client reads it, if one was sent.
    fn deliver(
        m: &mut Mailbox,
        inbox: &mut AdminInbox,
        gw: &SigningKey,
        hosted: &[SubnetId],
        payload: &[u8],
    ) -> Option<AnswerBody> {
        let now = UNIX_EPOCH + Duration::from_secs(NOW);
        assert_eq!(
            m.deliver(&ADMIN_MAILBOX, [9; 16], payload, now),
            DeliverOutcome::Admin { ack: true }
        );
        let request = inbox.handle_payload(payload, Instant::now()).ok()??;
        let (subnet, seq, outcome) = match check_command(request.command.as_bytes(), hosted) {
            Ok(checked) => (
                checked.subnet(),
                checked.command.sequence(),
                m.apply_admin(checked, &Hex32(gw.verifying_key().to_bytes()), now)
                    .map(|a| a.usage),
            ),
            Err(refusal) => {
                let (subnet, seq) = crate::remote_admin::claimed(request.command.as_bytes())?;
                (subnet, seq, Err(refusal))
            }
        };
        // The packet's ack rides the same batch as the change.
        let mut acks = 0;
        while let Some(b) = m.poll_write() {
            acks += m
                .on_committed(Committed::dangerously_assume_durable(&b))
                .len();
        }
        assert_eq!(acks, 1, "every command packet is acked, as cover is");
        let bytes = answer(gw, subnet, seq, &outcome).unwrap();
        let (secret, to) = admin_client();
        let plaintexts = answer_plaintexts(&mut StdRng::seed_from_u64(1), &to, &bytes).unwrap();
        Some(read_answer(&secret, &plaintexts, gw))
    }

    /// The admin's side: open each fragment, reassemble, check the gateway's signature.
    fn read_answer(secret: &StaticSecret, plaintexts: &[Vec<u8>], gw: &SigningKey) -> AnswerBody {
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let mut done = None;
        for p in plaintexts {
            let (slot, sealed) = payload::split_plaintext(p).unwrap();
            assert!(slot.surb.iter().all(|b| *b == 0), "answers ask for no ack");
            let f = Fragment::decode(&seal::open(secret, sealed).unwrap()).unwrap();
            if let Reassembled::Complete { message, .. } = r.insert(f, Instant::now()) {
                done = Some(message);
            }
        }
        SignedAnswer::verify(&done.unwrap(), &Hex32(gw.verifying_key().to_bytes())).unwrap()
    }

    fn mailbox() -> Mailbox {
        Mailbox::new(
            MailboxConfig {
                pull_batch: 4,
                redelivery_timeout: Duration::from_secs(10),
                ttl: Duration::from_secs(3600),
            },
            Salt::from_bytes([3; 32]),
        )
        .unwrap()
    }

    #[test]
    fn seal_key_matches_the_identity() {
        let gw = gateway_key();
        let public = admin_seal_key(&gw.verifying_key().to_bytes()).unwrap();
        let secret = StaticSecret::from(gw.to_scalar_bytes());
        assert_eq!(PublicKey::from(&secret), public);
    }

    /// A command arriving as delivered mixnet packets is applied once and answered; its
    /// replay, a forged signature and another subnet's command change nothing and are
    /// answered as refused; a request whose command does not parse gets no answer.
    #[test]
    fn a_command_through_the_mixnet_is_applied_once_and_answered() {
        let gw = gateway_key();
        let a = SubnetAdmin::from_secret([1; 32]);
        let b = SubnetAdmin::from_secret([2; 32]);
        let hosted = [a.subnet()];
        let mut m = mailbox();
        let mut inbox = AdminInbox::new(&gw);
        let mut net = Net::new(5);

        let req = command(&a, &gw, 1, create(10));
        let payloads = request_payloads(&mut net, &gw, &req);
        assert_eq!(payloads.len(), 1);
        let got = deliver(&mut m, &mut inbox, &gw, &hosted, &payloads[0]).unwrap();
        assert_eq!(
            (got.subnet, got.sequence, got.refusal.as_deref()),
            (a.subnet(), 1, None)
        );
        let account = SigningKey::from_bytes(&[10; 32]).verifying_key().to_bytes();
        assert!(m.is_account(&account));
        assert_eq!(m.stats().admin_applied, 1);

        // The same packet again (a retransmission) is no second request.
        assert_eq!(
            inbox.handle_payload(&payloads[0], Instant::now()),
            Err(InboxDrop::Ignored)
        );
        // The same command in a new message (a replay by whoever held it): refused,
        // answered as such.
        let again = request_payloads(&mut net, &gw, &command(&a, &gw, 1, create(11)));
        // (A different body under the same sequence: its own signature, still a replay.)
        let got = deliver(&mut m, &mut inbox, &gw, &hosted, &again[0]).unwrap();
        assert_eq!(got.refusal.as_deref(), Some(AdminRefusal::Replayed.label()));
        assert!(!m.is_account(&SigningKey::from_bytes(&[11; 32]).verifying_key().to_bytes()));

        // A forged command (changed after signing) and another subnet's: no change, no answer.
        let forged = String::from_utf8(command(&a, &gw, 2, create(12)))
            .unwrap()
            .replace("\\\\\\\"quota\\\\\\\":10", "\\\\\\\"quota\\\\\\\":99");
        assert!(forged.contains("99"), "the forgery changed the command");
        let p = request_payloads(&mut net, &gw, forged.as_bytes());
        let got = deliver(&mut m, &mut inbox, &gw, &hosted, &p[0]).unwrap();
        assert_eq!(
            (got.refusal.as_deref(), got.sequence),
            (Some(AdminRefusal::BadSignature.label()), 2)
        );
        let p = request_payloads(&mut net, &gw, &command(&b, &gw, 3, create(13)));
        let got = deliver(&mut m, &mut inbox, &gw, &hosted, &p[0]).unwrap();
        assert_eq!(
            (got.refusal.as_deref(), got.subnet),
            (Some(AdminRefusal::UnknownSubnet.label()), b.subnet())
        );
        let garbage = AdminRequest {
            command: "not a command".into(),
            reply_to: admin_client().1,
        };
        let p = request_payloads(&mut net, &gw, &garbage.to_bytes());
        assert_eq!(deliver(&mut m, &mut inbox, &gw, &hosted, &p[0]), None);
        assert_eq!(m.last_sequence(&a.subnet()), Some(1));
        assert_eq!(m.stats().admin_applied, 1);
        assert_eq!(m.stats().admin_packets, 5);
        assert!(!m.is_account(&SigningKey::from_bytes(&[12; 32]).verifying_key().to_bytes()));
    }

    /// A request of several fragments (a policy with many revoked keys) is reassembled
    /// within the bounds; junk and bodies sealed to another key are refused.
    #[test]
    fn long_requests_reassemble_and_junk_is_refused() {
        let gw = gateway_key();
        let a = SubnetAdmin::from_secret([1; 32]);
        let mut inbox = AdminInbox::new(&gw);
        let mut net = Net::new(6);
        let policy = crate::remote_admin::tests::policy(
            &a,
            1,
            60,
            (0..200u8).map(|i| Hex32([i; 32])).collect(),
        );
        let req = command(&a, &gw, 4, policy);
        let payloads = request_payloads(&mut net, &gw, &req);
        assert!(payloads.len() > 5, "{}", payloads.len());
        let mut done = None;
        // Out of order, as the mix delivers them.
        for p in payloads.iter().rev() {
            if let Some(r) = inbox.handle_payload(p, Instant::now()).unwrap() {
                done = Some(r);
            }
        }
        assert_eq!(done.unwrap().to_bytes(), req);
        assert_eq!(inbox.pending(), 0);

        // Sealed to another key, or not a forward payload at all.
        let other = SigningKey::from_bytes(&[0x48; 32]);
        let p = request_payloads(&mut net, &other, &req[..100]);
        assert_eq!(
            inbox.handle_payload(&p[0], Instant::now()),
            Err(InboxDrop::Unreadable)
        );
        assert_eq!(
            inbox.handle_payload(&[7; 2048], Instant::now()),
            Err(InboxDrop::Unreadable)
        );
        // A complete message that is no request.
        let p = request_payloads(&mut net, &gw, b"hello");
        assert_eq!(
            inbox.handle_payload(&p[0], Instant::now()),
            Err(InboxDrop::NotARequest)
        );
        // A message announcing more than MAX_REQUEST_BYTES is refused at its first fragment.
        let big = vec![b'x'; MAX_REQUEST_BYTES + 5000];
        let p = request_payloads(&mut net, &gw, &big);
        assert_eq!(
            inbox.handle_payload(&p[0], Instant::now()),
            Err(InboxDrop::Ignored)
        );
        assert_eq!(inbox.pending(), 0);
    }

    /// A usage query's answer carries the report; a long one is cut to fit the answer.
    #[test]
    fn usage_answer_fits_and_verifies() {
        use shoal_subnet::AccountUsage;
        let gw = gateway_key();
        let report = UsageReport {
            total_accounts: 2000,
            accounts: (0..2000u32)
                .map(|i| AccountUsage {
                    id: [(i % 251) as u8; 16],
                    items: i,
                    quota: 10,
                    bytes: 0,
                })
                .collect(),
        };
        let bytes = answer(&gw, Hex32([1; 32]), 7, &Ok(Some(report.clone()))).unwrap();
        assert!(bytes.len() <= MAX_ANSWER_BYTES, "{}", bytes.len());
        let (secret, to) = admin_client();
        let plaintexts = answer_plaintexts(&mut StdRng::seed_from_u64(3), &to, &bytes).unwrap();
        assert!(plaintexts.len() <= MAX_ANSWER_BYTES.div_ceil(fragment::FRAGMENT_DATA_SIZE));
        let body = read_answer(&secret, &plaintexts, &gw);
        let got = UsageReport::decode(&hex::decode(body.usage.unwrap()).unwrap()).unwrap();
        assert_eq!(got.total_accounts, 2000);
        assert!(got.accounts.len() > 100 && got.accounts.len() < 2000);
        assert_eq!(got.accounts[..], report.accounts[..got.accounts.len()]);
    }
}

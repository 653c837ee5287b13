//! Building and unwrapping Shoal's Sphinx packets, wire-compatible with `sphinx-packet` 0.8.
//!
//! Headers are built by the `build` module in one X25519 ladder per hop (the crate spends
//! `n(n+1)/2`); SURB use, reply recovery and unwrapping are the crate's.
//!
//! Client routes have [`ROUTE_HOPS`] hops; node loops may be shorter. The header is
//! padded to the maximum either way, so every packet is the same size. A node's Sphinx address is its Ed25519
//! identity key, so the next hop in a header is also the key its link is pinned to.

use std::time::Duration;

use rand::CryptoRng;
use sphinx_packet::constants::{NODE_ADDRESS_LENGTH, PAYLOAD_KEY_SEED_SIZE};
use sphinx_packet::header::{HEADER_SIZE, SphinxHeader};
use sphinx_packet::surb::{SURB, SurbReplyRecovery};
use sphinx_packet::version::SINGLE_SEED_SURB_VERSION;
use sphinx_packet::{ProcessedPacketData, SphinxPacket};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

mod build;

use crate::replay::{ReplayFilter, ReplayVerdict};
use crate::{PLAINTEXT_SIZE, PacketError, ROUTE_HOPS, SPHINX_PACKET_SIZE, SPHINX_PAYLOAD_SIZE};

/// A node's address in Sphinx headers: its Ed25519 identity key.
pub type NodeAddress = [u8; 32];
/// A mailbox address at an exit gateway.
pub type MailboxAddress = [u8; 32];
/// The cover/drop mailbox every gateway has: what arrives for it is never stored. A
/// forward packet for it that carries a usable SURB-ack (λP cover) is acked like a real
/// one; one whose ack slot's SURB is all zero (λD drops) is not.
pub const DROP_MAILBOX: MailboxAddress = [0u8; 32];
/// The admin endpoint every gateway has: a message sealed to the gateway (its identity
/// key on the Montgomery curve) and sent here is a subnet admin's signed command. It is
/// acked like λP cover and never stored in a mailbox (see `shoal-gateway`).
pub const ADMIN_MAILBOX: MailboxAddress = [0xad; 32];
/// Identifier the exit hop receives with the payload; for SURB replies it names the
/// recovery material, for forward packets it is random.
pub type SurbId = [u8; 16];
/// Key epoch number (see the topology crate).
pub type KeyEpoch = u64;

/// One hop of a route: where to send, and the hop's Sphinx key for the packet's epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    pub address: NodeAddress,
    pub sphinx_key: PublicKey,
}

/// A built packet and the node it must be handed to first.
#[derive(Debug)]
pub struct ForwardPacket {
    pub first_hop: NodeAddress,
    pub packet: Vec<u8>,
}

/// The result of unwrapping one layer.
#[derive(Debug)]
pub enum Unwrapped {
    /// Forward `packet` to `next_hop` after `delay`.
    Forward {
        next_hop: NodeAddress,
        delay: Duration,
        packet: Vec<u8>,
    },
    /// This node is the exit: `payload` belongs in the mailbox `destination`.
    Final {
        destination: MailboxAddress,
        surb_id: SurbId,
        payload: Vec<u8>,
    },
}

/// Each hop's delay in nanoseconds, as the header encodes it (saturating, as before).
fn delays_ns(route: &[Hop], delays: &[Duration]) -> Result<Vec<u64>, PacketError> {
    if route.is_empty() || route.len() > ROUTE_HOPS {
        return Err(PacketError::Route("a route has one to five hops"));
    }
    if delays.len() != route.len() {
        return Err(PacketError::Route("a route needs one delay per hop"));
    }
    Ok(delays
        .iter()
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .collect())
}

/// The header version of every packet and SURB Shoal builds: payload keys from seeds,
/// single-seed SURBs. It is also the crate's default for forward packets
/// (`forward_packets_use_the_crates_default_version`).
const VERSION: sphinx_packet::version::Version = SINGLE_SEED_SURB_VERSION;

/// Builds a forward packet carrying `plaintext` (exactly [`PLAINTEXT_SIZE`] bytes) to
/// `mailbox` at the last hop of `route`. Also returns the random identifier the exit
/// hop will see with it, which lets a node recognise its own returning loops.
///
/// The header costs one X25519 ladder per hop and is byte for byte what
/// `sphinx-packet`'s builder makes from the same initial secret and padding.
pub fn build_forward<R: CryptoRng + ?Sized>(
    rng: &mut R,
    route: &[Hop],
    delays: &[Duration],
    mailbox: &MailboxAddress,
    plaintext: &[u8],
) -> Result<(ForwardPacket, SurbId), PacketError> {
    if plaintext.len() != PLAINTEXT_SIZE {
        return Err(PacketError::Length {
            what: "forward plaintext",
            expected: PLAINTEXT_SIZE,
            got: plaintext.len(),
        });
    }
    let delays = delays_ns(route, delays)?;
    let mut surb_id = [0u8; 16];
    rng.fill_bytes(&mut surb_id);
    let built = header_from_fresh_secret(rng, route, &delays, mailbox, &surb_id)?;
    let payload = built.payload(plaintext, SPHINX_PAYLOAD_SIZE)?;
    let mut packet = Vec::with_capacity(SPHINX_PACKET_SIZE);
    packet.extend_from_slice(&built.header);
    packet.extend_from_slice(payload.as_bytes());
    Ok((
        ForwardPacket {
            first_hop: route[0].address,
            packet,
        },
        surb_id,
    ))
}

/// A header from a fresh initial secret drawn from `rng` (wiped after use), the same for
/// forward packets and SURBs.
fn header_from_fresh_secret<R: CryptoRng + ?Sized>(
    rng: &mut R,
    route: &[Hop],
    delays_ns: &[u64],
    mailbox: &MailboxAddress,
    surb_id: &[u8; 16],
) -> Result<build::BuiltHeader, PacketError> {
    let mut initial = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(initial.as_mut());
    build::build_header(
        &initial,
        route,
        delays_ns,
        mailbox,
        surb_id,
        VERSION,
        &mut |b| rng.fill_bytes(b),
    )
}

/// Serialized size of a single-seed SURB: header, first hop, one payload key seed.
pub const SURB_SIZE: usize = HEADER_SIZE + NODE_ADDRESS_LENGTH + PAYLOAD_KEY_SEED_SIZE;

/// A reply block and the secret material its creator keeps to read the reply.
#[derive(Debug)]
pub struct ReplyBlock {
    /// Goes into the packet; whoever holds it can send one packet back.
    pub surb: [u8; SURB_SIZE],
    /// Stays with the creator, looked up by `SurbReplyRecovery::identifier`.
    pub recovery: SurbReplyRecovery,
}

/// Builds a single-seed SURB that routes back to `mailbox` at the last hop of `route`.
///
/// Single-seed SURBs give the replier only the last hop's payload key, so the replier
/// cannot compute the payload at earlier hops and trace its own reply. The header is
/// built as in [`build_forward`]; the bytes are the crate's `SURB::to_bytes` layout
/// (`HEADER || FIRST_HOP || LAST_SEED`) and the recovery its `IDENTIFIER || SEEDS`.
pub fn build_surb<R: CryptoRng + ?Sized>(
    rng: &mut R,
    route: &[Hop],
    delays: &[Duration],
    mailbox: &MailboxAddress,
) -> Result<ReplyBlock, PacketError> {
    let delays = delays_ns(route, delays)?;
    // The crate refuses a zero identifier: it is what the recovery is looked up by.
    let mut surb_id = [0u8; 16];
    while surb_id == [0u8; 16] {
        rng.fill_bytes(&mut surb_id);
    }
    let built = header_from_fresh_secret(rng, route, &delays, mailbox, &surb_id)?;
    let last_seed = built
        .seeds
        .last()
        .ok_or(PacketError::Route("a route has one to five hops"))?;
    let mut surb = [0u8; SURB_SIZE];
    surb[..HEADER_SIZE].copy_from_slice(&built.header);
    surb[HEADER_SIZE..HEADER_SIZE + NODE_ADDRESS_LENGTH].copy_from_slice(&route[0].address);
    surb[HEADER_SIZE + NODE_ADDRESS_LENGTH..].copy_from_slice(last_seed);
    let mut recovery = Zeroizing::new(Vec::with_capacity(16 + 16 * built.seeds.len()));
    recovery.extend_from_slice(&surb_id);
    for seed in built.seeds.iter() {
        recovery.extend_from_slice(seed);
    }
    let recovery = SurbReplyRecovery::from_bytes(&recovery)?;
    Ok(ReplyBlock { surb, recovery })
}

/// Turns a SURB found in a payload into a full-size packet carrying `message`.
pub fn use_surb(surb: &[u8], message: &[u8]) -> Result<ForwardPacket, PacketError> {
    if surb.len() != SURB_SIZE {
        return Err(PacketError::Length {
            what: "surb",
            expected: SURB_SIZE,
            got: surb.len(),
        });
    }
    let surb = SURB::from_bytes(surb)?;
    let (packet, first_hop) = surb.use_surb(message, SPHINX_PAYLOAD_SIZE)?;
    Ok(ForwardPacket {
        first_hop: first_hop.to_bytes(),
        packet: packet.to_bytes(),
    })
}

/// Reads a reply that arrived at its creator's mailbox.
pub fn open_reply(recovery: &SurbReplyRecovery, payload: &[u8]) -> Result<Vec<u8>, PacketError> {
    let payload = sphinx_packet::payload::Payload::from_bytes(payload)?;
    Ok(recovery.recover_plaintext(payload)?)
}

/// Reads the plaintext of a forward packet's final payload.
pub fn open_forward(payload: &[u8]) -> Result<Vec<u8>, PacketError> {
    let payload = sphinx_packet::payload::Payload::from_bytes(payload)?;
    Ok(payload.recover_plaintext()?)
}

/// Unwraps one layer with `secret`, dropping replays of packets seen in `epoch`.
///
/// The replay tag is checked before the expensive payload decryption and recorded
/// only after the packet processed (its header MAC verified), so garbage cannot fill
/// the filter.
pub fn unwrap(
    secret: &StaticSecret,
    epoch: KeyEpoch,
    replay: &ReplayFilter,
    packet: &[u8],
) -> Result<Unwrapped, PacketError> {
    unwrap_from(secret, epoch, replay, packet, None)
}

/// [`unwrap`] for a packet that came from `upstream`, which holds one of `shares`
/// shares of the replay filter ([`ReplayFilter::insert_from`]).
pub fn unwrap_from(
    secret: &StaticSecret,
    epoch: KeyEpoch,
    replay: &ReplayFilter,
    packet: &[u8],
    upstream: Option<(&[u8; 32], usize)>,
) -> Result<Unwrapped, PacketError> {
    if packet.len() != SPHINX_PACKET_SIZE {
        return Err(PacketError::Length {
            what: "sphinx packet",
            expected: SPHINX_PACKET_SIZE,
            got: packet.len(),
        });
    }
    let header_len = sphinx_packet::header::HEADER_SIZE;
    let header = SphinxHeader::from_bytes(&packet[..header_len])?;
    let expanded = header.compute_expanded_shared_secret(secret);
    let tag = *expanded.replay_tag();
    if replay.contains(epoch, &tag) {
        return Err(PacketError::Replayed);
    }
    // `process_with_expanded_secret` verifies the header MAC before anything else; a
    // second check here would cost one more HMAC per packet.
    let payload = sphinx_packet::payload::Payload::from_bytes(&packet[header_len..])?;
    let processed = SphinxPacket { header, payload }.process_with_expanded_secret(&expanded)?;
    let verdict = match upstream {
        Some((from, shares)) => replay.insert_from(epoch, &tag, from, shares),
        None => replay.insert(epoch, &tag),
    };
    match verdict {
        ReplayVerdict::Fresh => {}
        ReplayVerdict::Replayed => return Err(PacketError::Replayed),
        ReplayVerdict::UnknownEpoch => return Err(PacketError::UnknownEpoch { epoch }),
        ReplayVerdict::Full => return Err(PacketError::ReplayFilterFull),
    }
    Ok(match processed.data {
        ProcessedPacketData::ForwardHop {
            next_hop_packet,
            next_hop_address,
            delay,
        } => Unwrapped::Forward {
            next_hop: next_hop_address.to_bytes(),
            delay: delay.to_duration(),
            packet: next_hop_packet.to_bytes(),
        },
        ProcessedPacketData::FinalHop {
            destination,
            identifier,
            payload,
        } => Unwrapped::Final {
            destination: destination.as_bytes(),
            surb_id: identifier,
            payload: payload.into_bytes(),
        },
    })
}

/// Generates a fresh X25519 Sphinx key pair.
pub fn generate_key<R: CryptoRng + ?Sized>(rng: &mut R) -> (StaticSecret, PublicKey) {
    let secret = StaticSecret::random_from_rng(rng);
    let public = PublicKey::from(&secret);
    (secret, public)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    pub(crate) fn route(rng: &mut StdRng) -> (Vec<StaticSecret>, Vec<Hop>) {
        let mut secrets = Vec::new();
        let mut hops = Vec::new();
        for i in 0..ROUTE_HOPS {
            let (s, p) = generate_key(rng);
            secrets.push(s);
            hops.push(Hop {
                address: [i as u8 + 1; 32],
                sphinx_key: p,
            });
        }
        (secrets, hops)
    }

    fn delays() -> Vec<Duration> {
        (1..=5).map(|i| Duration::from_millis(i * 10)).collect()
    }

    fn walk(secrets: &[StaticSecret], hops: &[Hop], mut packet: Vec<u8>) -> Unwrapped {
        let filters: Vec<ReplayFilter> = (0..ROUTE_HOPS)
            .map(|_| ReplayFilter::new(0, 1 << 20))
            .collect();
        for i in 0..ROUTE_HOPS {
            match unwrap(&secrets[i], 0, &filters[i], &packet).unwrap() {
                Unwrapped::Forward {
                    next_hop,
                    delay,
                    packet: next,
                } => {
                    assert_eq!(next_hop, hops[i + 1].address);
                    assert_eq!(delay, Duration::from_millis(i as u64 * 10 + 10));
                    assert_eq!(next.len(), SPHINX_PACKET_SIZE);
                    packet = next;
                }
                fin @ Unwrapped::Final { .. } => {
                    assert_eq!(i, ROUTE_HOPS - 1);
                    return fin;
                }
            }
        }
        panic!("route did not end at the exit");
    }

    #[test]
    fn forward_packet_crosses_five_hops() {
        let mut rng = StdRng::seed_from_u64(7);
        let (secrets, hops) = route(&mut rng);
        let plaintext: Vec<u8> = (0..PLAINTEXT_SIZE).map(|i| i as u8).collect();
        let (fwd, id) = build_forward(&mut rng, &hops, &delays(), &[9; 32], &plaintext).unwrap();
        assert_eq!(fwd.first_hop, hops[0].address);
        assert_eq!(fwd.packet.len(), SPHINX_PACKET_SIZE);
        match walk(&secrets, &hops, fwd.packet) {
            Unwrapped::Final {
                destination,
                payload,
                surb_id,
            } => {
                assert_eq!(destination, [9; 32]);
                assert_eq!(surb_id, id);
                assert_eq!(payload.len(), SPHINX_PAYLOAD_SIZE);
                assert_eq!(open_forward(&payload).unwrap(), plaintext);
            }
            Unwrapped::Forward { .. } => unreachable!(),
        }
    }

    /// Every secret this layer creates or holds wipes itself on drop: node Sphinx keys
    /// (`StaticSecret`), the per-hop expanded shared secret `unwrap` derives (header MAC,
    /// stream-cipher, payload keys and blinding factor all come from it), and a SURB's
    /// recovery seeds. Fails to compile if a dependency update drops one. The builder's
    /// secrets (initial secret, scalar product, shared secrets, hop keys) are held in
    /// `Zeroizing` in `build.rs`; the scalar and point types must stay `Zeroize`.
    #[test]
    fn secrets_are_zeroized_on_drop() {
        fn zeroize_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroize_on_drop::<StaticSecret>();
        zeroize_on_drop::<sphinx_packet::header::shared_secret::ExpandedSharedSecret>();
        zeroize_on_drop::<SurbReplyRecovery>();
        zeroize_on_drop::<Zeroizing<curve25519_dalek::scalar::Scalar>>();
        zeroize_on_drop::<Zeroizing<curve25519_dalek::montgomery::MontgomeryPoint>>();
    }

    #[test]
    fn reply_block_debug_hides_the_recovery_seeds() {
        let mut rng = StdRng::seed_from_u64(11);
        let (_, hops) = route(&mut rng);
        let block = build_surb(&mut rng, &hops, &delays(), &[3; 32]).unwrap();
        let shown = format!("{block:?}");
        let recovery = format!("{:?}", block.recovery);
        let bytes = block.recovery.to_bytes();
        // `IDENTIFIER || SEEDS`. The last hop's seed travels in the SURB by design (the
        // replier needs it); the others are the creator's alone and must not be shown.
        let seeds: Vec<&[u8]> = bytes[16..].chunks(16).collect();
        for (i, seed) in seeds.iter().enumerate() {
            let list = format!("{seed:?}");
            let list = list.trim_matches(['[', ']']);
            assert!(!recovery.contains(list) && !recovery.contains(&hex_lower(seed)));
            if i + 1 < seeds.len() {
                assert!(!shown.contains(list), "{shown}");
                assert!(!shown.contains(&hex_lower(seed)), "{shown}");
            }
        }
        assert!(shown.contains("redacted"), "{shown}");
    }

    fn hex_lower(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn surb_reply_is_full_size_and_readable_only_by_creator() {
        let mut rng = StdRng::seed_from_u64(8);
        let (secrets, hops) = route(&mut rng);
        let block = build_surb(&mut rng, &hops, &delays(), &[3; 32]).unwrap();
        let reply = use_surb(&block.surb, b"ack ack").unwrap();
        assert_eq!(reply.packet.len(), SPHINX_PACKET_SIZE);
        assert_eq!(reply.first_hop, hops[0].address);
        match walk(&secrets, &hops, reply.packet) {
            Unwrapped::Final {
                destination,
                surb_id,
                payload,
            } => {
                assert_eq!(destination, [3; 32]);
                assert_eq!(&surb_id, block.recovery.identifier());
                // The exit hop cannot read it without the recovery material.
                assert_ne!(
                    open_forward(&payload).ok().as_deref(),
                    Some(&b"ack ack"[..])
                );
                assert_eq!(open_reply(&block.recovery, &payload).unwrap(), b"ack ack");
            }
            Unwrapped::Forward { .. } => unreachable!(),
        }
    }

    #[test]
    fn replay_is_dropped_and_wrong_key_rejected() {
        let mut rng = StdRng::seed_from_u64(9);
        let (secrets, hops) = route(&mut rng);
        let (fwd, _) =
            build_forward(&mut rng, &hops, &delays(), &[1; 32], &[0; PLAINTEXT_SIZE]).unwrap();
        let filter = ReplayFilter::new(0, 1024);
        assert!(unwrap(&secrets[0], 0, &filter, &fwd.packet).is_ok());
        assert_eq!(
            unwrap(&secrets[0], 0, &filter, &fwd.packet).unwrap_err(),
            PacketError::Replayed
        );
        let other = ReplayFilter::new(0, 1024);
        assert!(matches!(
            unwrap(&secrets[1], 0, &other, &fwd.packet),
            Err(PacketError::Sphinx(_))
        ));
        assert!(
            other.is_empty(),
            "a packet that failed its MAC must not be recorded"
        );
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let mut rng = StdRng::seed_from_u64(10);
        let (secrets, hops) = route(&mut rng);
        let filter = ReplayFilter::new(0, 1024);
        assert!(unwrap(&secrets[0], 0, &filter, &[]).is_err());
        assert!(unwrap(&secrets[0], 0, &filter, &[0u8; SPHINX_PACKET_SIZE]).is_err());
        assert!(use_surb(&[0u8; 5], b"x").is_err());
        assert!(build_forward(&mut rng, &[], &[], &[0; 32], &[0; PLAINTEXT_SIZE]).is_err());
        assert!(
            build_forward(
                &mut rng,
                &hops[..4],
                &delays(),
                &[0; 32],
                &[0; PLAINTEXT_SIZE]
            )
            .is_err()
        );
        assert!(build_forward(&mut rng, &hops, &delays(), &[0; 32], &[0; 10]).is_err());
    }
}

#![no_main]
//! Shoal's linear Sphinx builder against `sphinx-packet` 0.8: for arbitrary route
//! lengths, keys, delays, destinations and contents, the group element is the crate's for
//! the same initial secret, the crate's `process` unwraps every hop to the right plaintext,
//! and a SURB built by Shoal carries a reply the crate recovers.
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_packet::sphinx::{Hop, build_forward, build_surb, generate_key};
use shoal_packet::{PLAINTEXT_SIZE, SPHINX_PAYLOAD_SIZE};
use sphinx_packet::header::delays::Delay;
use sphinx_packet::route::{Destination, DestinationAddressBytes, Node, NodeAddressBytes};
use sphinx_packet::surb::SURB;
use sphinx_packet::{ProcessedPacketData, SphinxPacket, SphinxPacketBuilder};
use x25519_dalek::StaticSecret;

/// Returns the exit's destination, identifier and payload bytes.
fn walk(secrets: &[StaticSecret], hops: &[Hop], delays: &[u64], packet: &[u8]) -> ([u8; 32], [u8; 16], Vec<u8>) {
    let mut packet = SphinxPacket::from_bytes(packet).expect("our packet parses");
    for (i, secret) in secrets.iter().enumerate() {
        match packet.process(secret).expect("the crate processes our packet").data {
            ProcessedPacketData::ForwardHop { next_hop_packet, next_hop_address, delay } => {
                assert_eq!(next_hop_address.to_bytes(), hops[i + 1].address);
                assert_eq!(delay.to_nanos(), delays[i]);
                packet = next_hop_packet;
            }
            ProcessedPacketData::FinalHop { destination, identifier, payload } => {
                assert_eq!(i, secrets.len() - 1);
                return (destination.as_bytes(), identifier, payload.into_bytes());
            }
        }
    }
    panic!("route did not end at the exit");
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<41>() else {
        return;
    };
    let n = 1 + usize::from(head[0] % 5);
    let seed = u64::from_le_bytes(head[1..9].try_into().unwrap());
    let dest: [u8; 32] = head[9..41].try_into().unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let (secrets, hops): (Vec<StaticSecret>, Vec<Hop>) = (0..n)
        .map(|_| {
            let (s, p) = generate_key(&mut rng);
            let mut address = [0u8; 32];
            rng.fill_bytes(&mut address);
            (s, Hop { address, sphinx_key: p })
        })
        .unzip();
    let delays: Vec<u64> = (0..n).map(|_| rng.next_u64() >> (rng.next_u32() % 64)).collect();
    let durations: Vec<Duration> = delays.iter().map(|d| Duration::from_nanos(*d)).collect();
    let mut plaintext = vec![0u8; PLAINTEXT_SIZE];
    let k = rest.len().min(PLAINTEXT_SIZE);
    plaintext[..k].copy_from_slice(&rest[..k]);

    // The same draws `build_forward` makes from its RNG: identifier, then initial secret.
    let mut rng = StdRng::seed_from_u64(!seed);
    let mut replay = StdRng::seed_from_u64(!seed);
    let mut x = [0u8; 32];
    replay.fill_bytes(&mut [0u8; 16]);
    replay.fill_bytes(&mut x);
    let (fwd, id) = build_forward(&mut rng, &hops, &durations, &dest, &plaintext).expect("build");
    let nodes: Vec<Node> = hops
        .iter()
        .map(|h| Node::new(NodeAddressBytes::from_bytes(h.address), h.sphinx_key))
        .collect();
    let theirs = SphinxPacketBuilder::new()
        .with_payload_size(SPHINX_PAYLOAD_SIZE)
        .with_initial_secret(&StaticSecret::from(x))
        .build_packet(
            &plaintext,
            &nodes,
            &Destination::new(DestinationAddressBytes::from_bytes(dest), id),
            &delays.iter().map(|d| Delay::new_from_nanos(*d)).collect::<Vec<_>>(),
        )
        .expect("crate build");
    assert_eq!(&fwd.packet[..32], theirs.header.shared_secret.as_bytes());
    let (d, i, payload) = walk(&secrets, &hops, &delays, &fwd.packet);
    assert_eq!((d, i), (dest, id));
    let payload = sphinx_packet::payload::Payload::from_bytes(&payload).expect("payload");
    assert_eq!(payload.recover_plaintext().expect("plaintext"), plaintext);

    let block = build_surb(&mut rng, &hops, &durations, &dest).expect("surb");
    let message = &rest[..rest.len().min(PLAINTEXT_SIZE)];
    let (reply, _) = SURB::from_bytes(&block.surb)
        .expect("surb parses")
        .use_surb(message, SPHINX_PAYLOAD_SIZE)
        .expect("use surb");
    let (d, i, payload) = walk(&secrets, &hops, &delays, &reply.to_bytes());
    assert_eq!((d, &i), (dest, block.recovery.identifier()));
    let payload = sphinx_packet::payload::Payload::from_bytes(&payload).expect("payload");
    assert_eq!(block.recovery.recover_plaintext(payload).expect("reply"), message);
});

//! Why a client's packet build costs what it does: `sphinx-packet` 0.8 derives hop `i`'s
//! shared secret with `i` X25519 ladders (it re-blinds the hop's key by every earlier
//! blinding factor), so an `n`-hop header costs `n(n+1)/2` ladders, not `n`. This times
//! a forward packet per route length next to one ladder, in the same run
//! (BENCHMARKS.md § Client).
//!
//! `cargo run --release -p shoal-bench --example sphinx_build_cost`

use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use sphinx_packet::SphinxPacketBuilder;
use sphinx_packet::header::delays::Delay;
use sphinx_packet::route::{Destination, DestinationAddressBytes, Node, NodeAddressBytes};
use x25519_dalek::{PublicKey, StaticSecret};

const ROUNDS: u32 = 300;

fn main() -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let nodes: Vec<Node> = (0..5u8)
        .map(|i| {
            let key = PublicKey::from(&StaticSecret::random_from_rng(&mut rng));
            Node::new(NodeAddressBytes::from_bytes([i; 32]), key)
        })
        .collect();
    let dest = Destination::new(DestinationAddressBytes::from_bytes([3; 32]), [1; 16]);
    let plaintext = vec![7u8; shoal_packet::PLAINTEXT_SIZE];

    let secret = StaticSecret::random_from_rng(&mut rng);
    let peer = PublicKey::from(&StaticSecret::random_from_rng(&mut rng));
    let start = Instant::now();
    for _ in 0..ROUNDS {
        std::hint::black_box(secret.diffie_hellman(std::hint::black_box(&peer)));
    }
    let ladder_us = start.elapsed().as_secs_f64() * 1e6 / f64::from(ROUNDS);
    println!("one X25519 ladder: {ladder_us:.1} µs");
    println!("hops  build µs  ladders (n(n+1)/2)  build ÷ ladder  one ladder per hop would be");
    for n in 1..=nodes.len() {
        let route = &nodes[..n];
        let delays = vec![Delay::new_from_nanos(20_000_000); n];
        let start = Instant::now();
        for _ in 0..ROUNDS {
            let packet = SphinxPacketBuilder::new()
                .with_payload_size(shoal_packet::SPHINX_PAYLOAD_SIZE)
                .with_initial_secret(&StaticSecret::random_from_rng(&mut rng))
                .build_packet(&plaintext, route, &dest, &delays)?;
            std::hint::black_box(packet);
        }
        let build_us = start.elapsed().as_secs_f64() * 1e6 / f64::from(ROUNDS);
        let ladders = n * (n + 1) / 2;
        println!(
            "{n:>4}  {build_us:>8.1}  {ladders:>18}  {:>14.1}  {:>8.1} µs",
            build_us / ladder_us,
            build_us - (ladders - n) as f64 * ladder_us
        );
    }
    Ok(())
}

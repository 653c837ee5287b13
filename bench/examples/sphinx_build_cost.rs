//! Why a client's packet build costs what it does: `sphinx-packet` 0.8 derives hop `i`'s
//! shared secret with `i` X25519 ladders (it re-blinds the hop's key by every earlier
//! blinding factor), so an `n`-hop header costs `n(n+1)/2` ladders, not `n`. This times
//! a forward packet per route length next to one ladder, and Shoal's own builder
//! (`shoal_packet::sphinx::build_forward`: one ladder per hop and one fixed-base
//! multiplication), all in the same run and timed in this thread's CPU time, so other
//! load on the machine moves wall time but not the figures (BENCHMARKS.md § Client).
//!
//! `cargo run --release -p shoal-bench --example sphinx_build_cost`

use rand::SeedableRng;
use rand::rngs::StdRng;
use shoal_packet::sphinx::{Hop, build_forward};
use sphinx_packet::SphinxPacketBuilder;
use sphinx_packet::header::delays::Delay;
use sphinx_packet::route::{Destination, DestinationAddressBytes, Node, NodeAddressBytes};
use x25519_dalek::{PublicKey, StaticSecret};

const ROUNDS: u32 = 300;

/// This thread's CPU time in µs.
fn cpu_us() -> f64 {
    shoal_bench::ceiling::thread_cpu_ns().unwrap_or(0) as f64 / 1e3
}

fn main() -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let hops: Vec<Hop> = (0..5u8)
        .map(|i| Hop {
            address: [i; 32],
            sphinx_key: PublicKey::from(&StaticSecret::random_from_rng(&mut rng)),
        })
        .collect();
    let nodes: Vec<Node> = hops
        .iter()
        .map(|h| Node::new(NodeAddressBytes::from_bytes(h.address), h.sphinx_key))
        .collect();
    let dest = Destination::new(DestinationAddressBytes::from_bytes([3; 32]), [1; 16]);
    let plaintext = vec![7u8; shoal_packet::PLAINTEXT_SIZE];

    let secret = StaticSecret::random_from_rng(&mut rng);
    let peer = PublicKey::from(&StaticSecret::random_from_rng(&mut rng));
    let start = cpu_us();
    for _ in 0..ROUNDS {
        std::hint::black_box(secret.diffie_hellman(std::hint::black_box(&peer)));
    }
    let ladder_us = (cpu_us() - start) / f64::from(ROUNDS);
    println!("one X25519 ladder: {ladder_us:.1} µs");
    println!(
        "hops  crate µs  ladders n(n+1)/2  crate ÷ ladder  shoal µs  ladders n  shoal ÷ ladder  crate ÷ shoal"
    );
    for n in 1..=nodes.len() {
        let route = &nodes[..n];
        let delays = vec![Delay::new_from_nanos(20_000_000); n];
        let start = cpu_us();
        for _ in 0..ROUNDS {
            let packet = SphinxPacketBuilder::new()
                .with_payload_size(shoal_packet::SPHINX_PAYLOAD_SIZE)
                .with_initial_secret(&StaticSecret::random_from_rng(&mut rng))
                .build_packet(&plaintext, route, &dest, &delays)?;
            std::hint::black_box(packet);
        }
        let crate_us = (cpu_us() - start) / f64::from(ROUNDS);
        let durations = vec![std::time::Duration::from_millis(20); n];
        let start = cpu_us();
        for _ in 0..ROUNDS {
            let packet = build_forward(&mut rng, &hops[..n], &durations, &[3; 32], &plaintext)?;
            std::hint::black_box(packet);
        }
        let shoal_us = (cpu_us() - start) / f64::from(ROUNDS);
        let ladders = n * (n + 1) / 2;
        println!(
            "{n:>4}  {crate_us:>8.1}  {ladders:>16}  {:>14.1}  {shoal_us:>8.1}  {n:>9}  {:>14.1}  {:>13.2}",
            crate_us / ladder_us,
            shoal_us / ladder_us,
            crate_us / shoal_us,
        );
    }
    Ok(())
}

//! The relay's per-packet path (`Unwrapper::unwrap_frame`: frame decode, key lookup,
//! Sphinx unwrap, replay filter, re-framing) on pre-built packets, for profilers:
//!
//! ```sh
//! cargo build --release -p shoal-relay --example unwrap_profile
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!     target/release/examples/unwrap_profile 300
//! callgrind_annotate --inclusive=yes /tmp/cg.out | head -60
//! ```

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use shoal_packet::sphinx::{self, Hop};
use shoal_packet::{Frame, PLAINTEXT_SIZE};
use shoal_relay::{KeyRing, Unwrapper};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let mut rng = StdRng::seed_from_u64(1);
    let (secret, public) = sphinx::generate_key(&mut rng);
    let next = sphinx::generate_key(&mut rng).1;
    let route = [
        Hop {
            address: [1; 32],
            sphinx_key: public,
        },
        Hop {
            address: [2; 32],
            sphinx_key: next,
        },
    ];
    let frames: Vec<Frame> = (0..n)
        .filter_map(|_| {
            let (p, _) = sphinx::build_forward(
                &mut rng,
                &route,
                &[Duration::from_millis(1); 2],
                &[3; 32],
                &[0u8; PLAINTEXT_SIZE],
            )
            .ok()?;
            Frame::sphinx(0, &p.packet).ok()
        })
        .collect();
    let mut ring = KeyRing::new();
    ring.insert(0, secret);
    let unwrapper = Unwrapper::new(ring, n * 2);
    let ok = frames
        .iter()
        .filter(|f| unwrapper.unwrap_frame(f.as_bytes()).is_ok())
        .count();
    println!("unwrapped {ok} of {n}");
}

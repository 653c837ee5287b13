#![no_main]
//! The relay's whole per-packet path on arbitrary frames: decode, key lookup, Sphinx
//! unwrap, replay filter.
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shoal_packet::FRAME_SIZE;
use shoal_relay::{KeyRing, Unwrapper};
use x25519_dalek::StaticSecret;

fn unwrapper() -> &'static Unwrapper {
    static U: OnceLock<Unwrapper> = OnceLock::new();
    U.get_or_init(|| {
        let mut ring = KeyRing::new();
        ring.insert(0, StaticSecret::from([7u8; 32]));
        ring.insert(1, StaticSecret::from([8u8; 32]));
        Unwrapper::new(ring, 1 << 16)
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = unwrapper().unwrap_frame(data);
    // Also as a well-sized frame with a valid header, so the Sphinx layer is reached.
    let mut frame = vec![0u8; FRAME_SIZE];
    frame[0] = 1;
    frame[1] = 1;
    frame[3] = data.first().copied().unwrap_or(0) & 1;
    let n = data.len().min(FRAME_SIZE - 4);
    frame[4..4 + n].copy_from_slice(&data[..n]);
    let _ = unwrapper().unwrap_frame(&frame);
});

#![no_main]
//! Fragment headers and reassembly: the input is cut into inner bodies, each decoded and
//! fed to one reassembler (bounded limits), so hostile sequences of fragments are tried too.
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shoal_packet::payload::INNER_BODY_SIZE;
use shoal_packet::fragment::{FRAGMENT_DATA_SIZE, Fragment, Reassembler, ReassemblyLimits};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Fragment::decode(data) {
        let again = Fragment::decode(&f.encode()).expect("an encoded fragment decodes");
        assert_eq!(again, f);
    }
    let mut r = Reassembler::new(ReassemblyLimits {
        max_pending: 4,
        max_bytes: 3 * FRAGMENT_DATA_SIZE,
        timeout: Duration::from_secs(60),
        remember_completed: 8,
    });
    let t0 = Instant::now();
    // Short chunks keep the fuzzer fast; the decoder pads or rejects them itself.
    for (i, chunk) in data.chunks(INNER_BODY_SIZE.min(64)).enumerate() {
        let mut body = vec![0u8; INNER_BODY_SIZE];
        body[..chunk.len()].copy_from_slice(chunk);
        if let Ok(f) = Fragment::decode(&body) {
            let _ = r.insert(f, t0 + Duration::from_secs(i as u64));
        }
        assert!(r.pending() <= 4);
        // The message just fed may overshoot by less than one fragment.
        assert!(r.bytes_held() < 4 * FRAGMENT_DATA_SIZE);
        let _ = r.take_dropped();
    }
});

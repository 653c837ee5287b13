#![no_main]
//! Frame decoding: any bytes from a peer.
use libfuzzer_sys::fuzz_target;
use shoal_packet::Frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::decode(data) {
        assert_eq!(Frame::decode(f.as_bytes()).ok(), Some(f));
    }
});

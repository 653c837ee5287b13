#![no_main]
//! Frame decoding: any bytes from a peer, as they come and resized to the frame size
//! (so the header checks are reached without the fuzzer having to find the length).
use libfuzzer_sys::fuzz_target;
use shoal_packet::{FRAME_SIZE, Frame};

fuzz_target!(|data: &[u8]| {
    let _ = Frame::decode(data);
    let mut sized = data.to_vec();
    sized.resize(FRAME_SIZE, 0);
    if let Ok(f) = Frame::decode(&sized) {
        assert_eq!(Frame::decode(f.as_bytes()).ok(), Some(f));
    }
});

#![no_main]
//! Everything a client or gateway parses out of a payload.
use libfuzzer_sys::fuzz_target;
use shoal_packet::fragment::Fragment;
use shoal_packet::payload::{parse_ack_message, split_plaintext, INNER_BODY_SIZE};
use shoal_packet::sphinx::{open_forward, use_surb, SURB_SIZE};

fuzz_target!(|data: &[u8]| {
    let _ = parse_ack_message(data);
    if let Ok((slot, _body)) = split_plaintext(data) {
        let _ = use_surb(&slot.surb, &slot.message);
    }
    if data.len() >= SURB_SIZE {
        let _ = use_surb(&data[..SURB_SIZE], &data[SURB_SIZE..]);
    }
    let _ = open_forward(data);
    let mut body = vec![0u8; INNER_BODY_SIZE];
    let n = data.len().min(INNER_BODY_SIZE);
    body[..n].copy_from_slice(&data[..n]);
    if let Ok(f) = Fragment::decode(&body) {
        assert_eq!(Fragment::decode(&f.encode()).ok(), Some(f));
    }
});

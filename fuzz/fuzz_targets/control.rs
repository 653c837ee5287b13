#![no_main]
//! Client↔gateway control messages, both directions (a `Pull` carrying ack ids among
//! them): decoding never panics, and whatever decodes re-encodes into one fixed-size
//! frame that decodes to the same message.
use libfuzzer_sys::fuzz_target;
use shoal_packet::protocol::{ClientMsg, GatewayMsg};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ClientMsg::decode(data)
        && let Ok(bytes) = m.encode()
    {
        assert_eq!(ClientMsg::decode(&bytes).as_ref(), Ok(&m));
        let frame = m.to_frame().expect("a decoded message fits one frame");
        assert_eq!(ClientMsg::from_frame(&frame).as_ref(), Ok(&m));
    }
    if let Ok(m) = GatewayMsg::decode(data)
        && let Ok(bytes) = m.encode()
    {
        assert!(GatewayMsg::decode(&bytes).is_ok());
    }
});

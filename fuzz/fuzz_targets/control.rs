#![no_main]
//! Client↔gateway control messages, both directions.
use libfuzzer_sys::fuzz_target;
use shoal_gateway::protocol::{ClientMsg, GatewayMsg};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ClientMsg::decode(data)
        && let Ok(bytes) = m.encode()
    {
        assert!(ClientMsg::decode(&bytes).is_ok());
    }
    if let Ok(m) = GatewayMsg::decode(data)
        && let Ok(bytes) = m.encode()
    {
        assert!(GatewayMsg::decode(&bytes).is_ok());
    }
});

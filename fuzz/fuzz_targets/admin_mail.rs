#![no_main]
//! Admin commands through the mixnet: a request as the gateway's admin endpoint
//! reassembles it, and an answer as the admin's client files and checks it.
use libfuzzer_sys::fuzz_target;
use shoal_subnet::{AdminRequest, SignedAnswer};
use shoal_topology::Hex32;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = AdminRequest::parse(data) {
        let _ = shoal_gateway::remote_admin::claimed(r.command.as_bytes());
    }
    let _ = SignedAnswer::looks_like(data);
    let _ = SignedAnswer::peek(data);
    let _ = SignedAnswer::verify(data, &Hex32([0x11; 32]));
});

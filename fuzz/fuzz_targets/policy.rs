#![no_main]
//! Subnet policies as members and gateways receive them.
use libfuzzer_sys::fuzz_target;
use shoal_subnet::UncheckedPolicy;
use shoal_topology::Hex32;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = UncheckedPolicy::parse(data) {
        let _ = p.check_signature(&Hex32([0x11; 32]));
    }
});

#![no_main]
//! Membership credentials as they arrive in MLS leaves and contact invites.
use libfuzzer_sys::fuzz_target;
use shoal_subnet::{MemberCredential, UncheckedCredential};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = UncheckedCredential::parse(data) {
        let _ = c.claimed_subnet();
        if let Ok(v) = c.check_signature() {
            let _ = v.check_valid_at(1_700_000_000);
        }
    }
    let _ = MemberCredential::verify(data, 1_700_000_000);
});

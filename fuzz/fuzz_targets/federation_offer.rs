#![no_main]
//! Federation offers as an admin pastes them in (`shoal admin federate accept`), and the
//! usage reports an admin reads from its gateways: parse, check the signature, check
//! freshness against a guard; decode a report.
use libfuzzer_sys::fuzz_target;
use shoal_subnet::{OfferGuard, UncheckedOffer, UsageReport};
use shoal_topology::Hex32;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(offer) = UncheckedOffer::parse(text)
        && let Ok(verified) = offer.check_signature()
    {
        let mut guard = OfferGuard::default();
        let _ = verified.check_fresh(&Hex32([0x11; 32]), 1_700_000_000, &mut guard);
    }
    let _ = UsageReport::decode(data);
});

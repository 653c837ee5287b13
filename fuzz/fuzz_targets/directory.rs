#![no_main]
//! Directory documents and descriptors from the network.
use libfuzzer_sys::fuzz_target;
use shoal_topology::{AuthoritySet, Hex32, SignedDescriptor, UncheckedDocument};

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = SignedDescriptor::from_json(data) {
        let _ = d.check();
    }
    if let Ok(doc) = UncheckedDocument::parse(data) {
        let auths = AuthoritySet { threshold: 1, keys: vec![Hex32([1; 32])] };
        let _ = doc.check_signatures(&auths);
    }
});

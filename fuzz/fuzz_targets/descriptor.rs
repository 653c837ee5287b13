#![no_main]
//! Self-signed node descriptors as posted to an authority: parse, check the signature
//! and fields, and check that what passes re-encodes to something that passes again.
use libfuzzer_sys::fuzz_target;
use shoal_topology::SignedDescriptor;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = SignedDescriptor::from_json(data)
        && let Ok(checked) = d.check()
    {
        let again = SignedDescriptor::from_json(&d.to_json()).expect("re-encoded descriptor parses");
        assert_eq!(again.check().expect("re-encoded descriptor checks"), checked);
    }
});

#![no_main]
//! Relay and gateway TOML configs (two-phase: serde with deny_unknown_fields, then
//! validation). The authority and client configs live in the `shoal` binary.
use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/fuzz/config.toml");
    let _ = shoal_relay::Config::parse(text, path);
    let _ = shoal_gateway::Config::parse(text, path);
});

#![no_main]
//! Admin-signed gateway commands, through the gateway's own check (which also parses
//! and verifies an embedded policy).
use libfuzzer_sys::fuzz_target;
use shoal_gateway::remote_admin::check_command;
use shoal_subnet::UncheckedCommand;
use shoal_topology::Hex32;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = UncheckedCommand::parse(data) {
        let _ = c.check_signature(&[Hex32([0x11; 32])]);
    }
    let _ = check_command(data, &[Hex32([0x11; 32])]);
});

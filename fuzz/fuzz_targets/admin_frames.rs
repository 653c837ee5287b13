#![no_main]
//! An admin link's frames as the gateway reads them: control bodies decoded, admin
//! chunks reassembled (with the driver's limit), and every complete command checked.
use libfuzzer_sys::fuzz_target;
use shoal_packet::protocol::{
    CONTROL_BODY_SIZE, ChunkAssembler, ClientMsg, GatewayMsg, MAX_ADMIN_CHUNKS, MAX_CHUNK_BYTES,
};
use shoal_gateway::remote_admin::check_command;
use shoal_topology::Hex32;

fuzz_target!(|data: &[u8]| {
    let mut assembler = ChunkAssembler::new(MAX_CHUNK_BYTES * usize::from(MAX_ADMIN_CHUNKS));
    // Short bodies make many chunks per input; zero padding is what frames carry.
    for body in data.chunks(CONTROL_BODY_SIZE.min(64)) {
        if let Ok(ClientMsg::AdminChunk {
            index,
            count,
            bytes,
        }) = ClientMsg::decode(body)
            && count <= MAX_ADMIN_CHUNKS
            && let Ok(Some(command)) = assembler.push(index, count, &bytes)
        {
            let _ = check_command(&command, &[Hex32([0x11; 32])]);
        }
        if let Ok(m @ GatewayMsg::AdminResult { .. }) = GatewayMsg::decode(body) {
            let again = m.encode().expect("a decoded result encodes");
            assert_eq!(GatewayMsg::decode(&again).expect("re-decodes"), m);
        }
    }
});

#![no_main]
//! The mailbox protocol as it arrives on a client↔gateway link: whole frames decoded
//! into client and gateway messages, and directory chunks fed to the bounded assembler.
use libfuzzer_sys::fuzz_target;
use shoal_packet::protocol::{ChunkAssembler, ClientMsg, GatewayMsg};
use shoal_packet::{FRAME_SIZE, Frame};

fuzz_target!(|data: &[u8]| {
    let mut asm = ChunkAssembler::new(16 * 1024);
    for chunk in data.chunks(FRAME_SIZE) {
        let mut buf = vec![0u8; FRAME_SIZE];
        buf[..chunk.len()].copy_from_slice(chunk);
        let Ok(frame) = Frame::decode(&buf) else {
            continue;
        };
        let _ = ClientMsg::from_frame(&frame);
        if let Ok(GatewayMsg::DirectoryChunk { index, count, bytes }) = GatewayMsg::from_frame(&frame)
            && let Ok(Some(doc)) = asm.push(index, count, &bytes)
        {
            assert!(doc.len() <= 16 * 1024);
        }
    }
});

//! The UDP socket under every link: pads handshake datagrams to the wire size.
//!
//! quinn pads every datagram that holds a 1-RTT packet to the fixed MTU
//! (`pad_to_mtu`), and client Initial datagrams to 1200 bytes. What is left are
//! datagrams made only of long-header packets (the server's Handshake flight,
//! Handshake-space ACKs): each long-header packet states its own length, so bytes
//! after the last one are a trailing invalid packet that receivers discard
//! (RFC 9000 §12.2, §14.1). This wrapper appends zeros to such datagrams up to
//! [`crate::WIRE_DATAGRAM_SIZE`]. A datagram that ends in a short-header packet cannot
//! be extended (that packet runs to the end of the datagram), so it is sent as is.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Wraps the runtime's UDP socket; see the module docs.
pub(crate) struct PaddingSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    size: usize,
}

impl PaddingSocket {
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>, size: u16) -> Self {
        Self {
            inner,
            size: usize::from(size),
        }
    }
}

impl fmt::Debug for PaddingSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PaddingSocket")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl PaddingSocket {
    /// Sends one datagram, padded if it is short and made only of long-header packets.
    fn send_one(&self, transmit: &Transmit, datagram: &[u8]) -> io::Result<()> {
        let mut padded = Vec::new();
        let contents = if datagram.len() < self.size && only_long_headers(datagram) {
            padded.reserve_exact(self.size);
            padded.extend_from_slice(datagram);
            padded.resize(self.size, 0);
            &padded[..]
        } else {
            datagram
        };
        self.inner.try_send(&Transmit {
            destination: transmit.destination,
            ecn: transmit.ecn,
            contents,
            segment_size: None,
            src_ip: transmit.src_ip,
        })
    }
}

impl AsyncUdpSocket for PaddingSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let contents = transmit.contents;
        match transmit.segment_size {
            // A GSO batch of full-size datagrams (the normal case once connected).
            Some(seg) if seg == self.size && contents.len().is_multiple_of(seg) => {
                self.inner.try_send(transmit)
            }
            // During a handshake a batch can start with a short datagram, which sets a
            // shorter segment size, or end with one: send its datagrams one by one.
            Some(seg) if seg > 0 => {
                for datagram in contents.chunks(seg) {
                    self.send_one(transmit, datagram)?;
                }
                Ok(())
            }
            _ => self.send_one(transmit, contents),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// Reads a QUIC variable-length integer at `pos`; returns (value, bytes used).
fn varint(b: &[u8], pos: usize) -> Option<(usize, usize)> {
    let first = *b.get(pos)?;
    let n = 1usize << (first >> 6);
    let bytes = b.get(pos..pos + n)?;
    let mut v = u64::from(first & 0x3f);
    for &x in &bytes[1..] {
        v = (v << 8) | u64::from(x);
    }
    Some((usize::try_from(v).ok()?, n))
}

/// Whether `d` is one or more complete long-header packets with length fields
/// (Initial, 0-RTT, Handshake) and nothing else.
fn only_long_headers(d: &[u8]) -> bool {
    let mut pos = 0;
    while pos < d.len() {
        match long_packet_len(d, pos) {
            Some(n) if n > 0 => pos += n,
            _ => return false,
        }
    }
    pos == d.len() && pos > 0
}

/// Total length of the long-header packet at `pos`, if it has a length field.
fn long_packet_len(d: &[u8], pos: usize) -> Option<usize> {
    let first = *d.get(pos)?;
    if first & 0x80 == 0 {
        return None;
    }
    let version = d.get(pos + 1..pos + 5)?;
    if version == [0, 0, 0, 0] {
        return None; // version negotiation: no length field
    }
    let packet_type = (first >> 4) & 0x03;
    if packet_type == 3 {
        return None; // Retry: no length field
    }
    let mut p = pos + 5;
    let dcid = usize::from(*d.get(p)?);
    p += 1 + dcid;
    let scid = usize::from(*d.get(p)?);
    p += 1 + scid;
    if packet_type == 0 {
        let (token, n) = varint(d, p)?;
        p = p.checked_add(n)?.checked_add(token)?;
    }
    let (length, n) = varint(d, p)?;
    let end = p.checked_add(n)?.checked_add(length)?;
    (end <= d.len()).then_some(end - pos)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn handshake_packet(payload: usize) -> Vec<u8> {
        // Handshake type (2), version 1, 8-byte DCID, 0-byte SCID, 2-byte length.
        let mut p = vec![0xe0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0];
        p.extend_from_slice(&[0x40 | (payload >> 8) as u8, payload as u8]);
        p.extend(std::iter::repeat_n(0xaa, payload));
        p
    }

    #[test]
    fn long_header_datagrams_are_recognised() {
        let one = handshake_packet(100);
        assert!(only_long_headers(&one));
        let two = [handshake_packet(30), handshake_packet(300)].concat();
        assert!(only_long_headers(&two));
        // A trailing short-header packet makes the datagram unpaddable.
        let mut mixed = handshake_packet(30);
        mixed.extend_from_slice(&[0x40, 1, 2, 3]);
        assert!(!only_long_headers(&mixed));
        // Truncated and empty input is refused, not read past.
        assert!(!only_long_headers(&one[..one.len() - 1]));
        assert!(!only_long_headers(&[]));
        assert!(!only_long_headers(&[0xc0, 0, 0, 0, 0]));
    }
}

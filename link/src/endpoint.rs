//! QUIC endpoint, links, and fixed-size frame streams.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, trace};

use crate::socket::PaddingSocket;
use crate::tls::{self, parse_ed25519_spki};
use crate::{LinkError, NodeKey, PeerSet};

/// Largest frame size a stream accepts; Sphinx packets are a few kB.
pub const MAX_FRAME_SIZE: usize = 1 << 20;

/// Keep-alive interval: idle links stay up, and a dead peer is noticed.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// A link with no traffic (not even keep-alives) for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Per-stream receive window. At 50 MB/s this covers 80 ms of round trip.
const STREAM_WINDOW: u32 = 4 << 20;
/// Per-connection receive and send windows (a couple of busy streams).
const CONNECTION_WINDOW: u32 = 8 << 20;
/// Unidirectional streams a peer may have open at once (a handful are used).
const MAX_UNI_STREAMS: u32 = 16;
/// Inbound handshakes in flight; beyond this new attempts are refused.
const MAX_PENDING_HANDSHAKES: usize = 256;
/// Authenticated links waiting for [`LinkEndpoint::accept`].
const ACCEPT_QUEUE: usize = 64;
/// Kernel buffer asked for each UDP socket, each direction. Linux's default (208 KiB,
/// under a hundred padded datagrams once kernel overhead is counted) overflowed on a
/// loaded host when a reader was off the CPU for a few ms during a pull answer's burst;
/// each dropped datagram stalls its stream until QUIC's loss recovery resends it (tens
/// of ms). The kernel caps the request at `net.core.rmem_max`/`wmem_max`.
const SOCKET_BUFFER: usize = 4 << 20;

/// UDP payload size of every datagram on a link. 1200 bytes is QUIC's minimum, so
/// it fits every path without discovery.
pub const WIRE_DATAGRAM_SIZE: u16 = 1200;

/// Application close code sent by [`LinkEndpoint::close`] and [`Link::close`].
const CLOSE_CODE: u32 = 0;

fn transport_config() -> Result<Arc<TransportConfig>, LinkError> {
    let idle = IdleTimeout::try_from(IDLE_TIMEOUT).map_err(|e| LinkError::Config {
        context: "QUIC idle timeout",
        detail: e.to_string(),
    })?;
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(idle))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS))
        // Frames travel on unidirectional streams only; datagrams are too small
        // for a Sphinx packet.
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None)
        // One datagram size on the wire: quinn pads every 1-RTT datagram (ACK-only
        // ones included) to the path MTU, which is fixed because discovery is off
        // and the initial and minimum MTU are the same. GSO hands the kernel a batch
        // of such datagrams in one call; it is split into 1200-byte datagrams before
        // any wire (only a capture on a GSO-capable loopback sees the batch whole).
        .pad_to_mtu(true)
        .initial_mtu(WIRE_DATAGRAM_SIZE)
        .min_mtu(WIRE_DATAGRAM_SIZE)
        .mtu_discovery_config(None)
        .enable_segmentation_offload(true)
        // Every ACK-only packet now costs a full datagram: ask the peer to ack every
        // 10th ack-eliciting packet (or within 10 ms) instead of every 2nd.
        .ack_frequency_config(Some(ack_frequency()))
        .congestion_controller_factory(Arc::new(crate::congestion::FloorFactory::new()));
    Ok(Arc::new(t))
}

fn ack_frequency() -> quinn::AckFrequencyConfig {
    let mut a = quinn::AckFrequencyConfig::default();
    a.ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD))
        .max_ack_delay(Some(Duration::from_millis(10)));
    a
}

/// The peer acks after more than this many ack-eliciting packets (see `ack_frequency`).
const ACK_ELICITING_THRESHOLD: u32 = 9;

/// Asks for [`SOCKET_BUFFER`] each way. A smaller grant (the kernel's cap) or a refusal
/// leaves the default, which works, only with more loss under load.
fn enlarge_buffers(socket: &std::net::UdpSocket) {
    let Ok(state) = quinn::udp::UdpSocketState::new(socket.into()) else {
        return;
    };
    let recv = state.set_recv_buffer_size(socket.into(), SOCKET_BUFFER);
    let send = state.set_send_buffer_size(socket.into(), SOCKET_BUFFER);
    if recv.is_err() || send.is_err() {
        debug!("cannot enlarge the UDP socket buffers; keeping the defaults");
    }
}

/// The peer key proven in the handshake of `conn`.
fn peer_key(conn: &quinn::Connection) -> Result<NodeKey, LinkError> {
    let identity = conn.peer_identity().ok_or(LinkError::PeerIdentity)?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| LinkError::PeerIdentity)?;
    match certs.as_slice() {
        [only] => parse_ed25519_spki(only).ok_or(LinkError::PeerIdentity),
        _ => Err(LinkError::PeerIdentity),
    }
}

/// One QUIC endpoint per node: it listens, and it dials peers. Every link is
/// mutually authenticated with Ed25519 raw public keys.
pub struct LinkEndpoint {
    endpoint: quinn::Endpoint,
    identity: tls::Identity,
    transport: Arc<TransportConfig>,
    incoming: Mutex<mpsc::Receiver<Result<Link, LinkError>>>,
    acceptor: JoinHandle<()>,
}

impl fmt::Debug for LinkEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkEndpoint")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl LinkEndpoint {
    /// Bind a UDP socket at `addr` and start accepting links from keys in `accept_from`.
    ///
    /// Must be called inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        identity: &SigningKey,
        accept_from: PeerSet,
    ) -> Result<Self, LinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| LinkError::NoRuntime)?;
        let transport = transport_config()?;
        let identity = tls::Identity::new(identity)?;
        let tls = tls::server_config(&identity, accept_from.clone())?;
        let crypto = QuicServerConfig::try_from(tls).map_err(|e| LinkError::Config {
            context: "QUIC server crypto",
            detail: e.to_string(),
        })?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport.clone());
        let socket =
            std::net::UdpSocket::bind(addr).map_err(|source| LinkError::Bind { addr, source })?;
        enlarge_buffers(&socket);
        let udp = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)
            .map_err(|source| LinkError::Bind { addr, source })?;
        let padded = Arc::new(PaddingSocket::new(udp, WIRE_DATAGRAM_SIZE));
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server),
            padded,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| LinkError::Bind { addr, source })?;

        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let acceptor = runtime.spawn(accept_loop(endpoint.clone(), accept_from, tx));
        Ok(Self {
            endpoint,
            identity,
            transport,
            incoming: Mutex::new(rx),
            acceptor,
        })
    }

    /// The bound UDP address (useful after binding port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        self.endpoint.local_addr().map_err(LinkError::LocalAddr)
    }

    /// Dial `addr` and require that the server proves `expected` (pinned from the directory).
    ///
    /// A wrong or unproven server key fails here. A server that does not list
    /// *our* key refuses only after the client side of the TLS 1.3 handshake is
    /// done, so that case shows as a link that closes within a round trip: the
    /// first stream operation on it fails with [`LinkError::Closed`] or
    /// [`LinkError::Write`].
    pub async fn connect(&self, addr: SocketAddr, expected: NodeKey) -> Result<Link, LinkError> {
        let tls = tls::client_config(&self.identity, expected)?;
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| LinkError::Config {
            context: "QUIC client crypto",
            detail: e.to_string(),
        })?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(self.transport.clone());
        // The name is a placeholder: the server is identified by its pinned key,
        // and SNI is disabled so the name is never sent.
        let connecting = self
            .endpoint
            .connect_with(client, addr, "shoal")
            .map_err(|source| LinkError::Connect { addr, source })?;
        let conn = connecting
            .await
            .map_err(|source| LinkError::Handshake { addr, source })?;
        let peer = peer_key(&conn)?;
        if peer != expected {
            // Unreachable with the pinned verifier; kept as a second lock.
            conn.close(VarInt::from_u32(CLOSE_CODE), b"");
            return Err(LinkError::PeerIdentity);
        }
        trace!(%addr, "link dialled");
        Ok(Link { conn, peer })
    }

    /// Next inbound link, already authenticated and checked against `accept_from`.
    ///
    /// `Some(Err(_))` reports one failed inbound handshake; keep calling.
    /// `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<Result<Link, LinkError>> {
        self.incoming.lock().await.recv().await
    }

    /// Close every link and stop accepting. Pending [`accept`](Self::accept) calls return `None`.
    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(CLOSE_CODE), b"");
    }

    /// Wait until every link of this endpoint is closed and its close is delivered.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

impl Drop for LinkEndpoint {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// Accepts QUIC connections and completes their handshakes concurrently, so a
/// slow peer cannot hold up the others.
async fn accept_loop(
    endpoint: quinn::Endpoint,
    accept_from: PeerSet,
    tx: mpsc::Sender<Result<Link, LinkError>>,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            debug!("too many inbound handshakes in flight; refusing one");
            incoming.refuse();
            continue;
        };
        let tx = tx.clone();
        let accept_from = accept_from.clone();
        let span = tracing::debug_span!("inbound");
        tokio::spawn(
            async move {
                let result = handshake(incoming, &accept_from).await;
                if let Err(e) = &result {
                    debug!(error = %e, "inbound handshake failed");
                }
                drop(permit);
                // A closed receiver means the endpoint was dropped; the link goes with it.
                let _ = tx.send(result).await;
            }
            .instrument(span),
        );
    }
}

async fn handshake(incoming: quinn::Incoming, accept_from: &PeerSet) -> Result<Link, LinkError> {
    let conn = incoming
        .await
        .map_err(|source| LinkError::InboundHandshake { source })?;
    let peer = peer_key(&conn)?;
    if !accept_from.contains(&peer) {
        // The verifier already refused unknown keys; a PeerSet update may race with it.
        conn.close(VarInt::from_u32(CLOSE_CODE), b"");
        return Err(LinkError::PeerIdentity);
    }
    trace!("link accepted");
    Ok(Link { conn, peer })
}

/// An authenticated QUIC connection to one peer. Cheap to clone.
#[derive(Clone)]
pub struct Link {
    conn: quinn::Connection,
    peer: NodeKey,
}

// Neither the peer key nor its address belongs in debug output.
impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("id", &self.conn.stable_id())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// The Ed25519 key the peer proved in the handshake.
    pub fn peer(&self) -> NodeKey {
        self.peer
    }

    /// The underlying quinn connection (statistics, `closed()`, remote address).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Close the link at once; unsent data is dropped.
    pub fn close(&self) {
        self.conn.close(VarInt::from_u32(CLOSE_CODE), b"");
    }

    /// Open a long-lived unidirectional stream of `frame_size`-byte frames.
    ///
    /// The peer sees the stream (in [`accept_frames`](Self::accept_frames))
    /// once the first frame is sent.
    pub async fn open_frames(&self, frame_size: usize) -> Result<FrameSender, LinkError> {
        check_frame_size(frame_size)?;
        let stream = self
            .conn
            .open_uni()
            .await
            .map_err(|source| LinkError::Closed { source })?;
        Ok(FrameSender { stream, frame_size })
    }

    /// Accept the next unidirectional stream the peer opened, as `frame_size`-byte frames.
    pub async fn accept_frames(&self, frame_size: usize) -> Result<FrameReceiver, LinkError> {
        check_frame_size(frame_size)?;
        let stream = self
            .conn
            .accept_uni()
            .await
            .map_err(|source| LinkError::Closed { source })?;
        Ok(FrameReceiver {
            stream,
            buf: vec![0; frame_size],
        })
    }
}

fn check_frame_size(frame_size: usize) -> Result<(), LinkError> {
    if frame_size == 0 || frame_size > MAX_FRAME_SIZE {
        Err(LinkError::InvalidFrameSize(frame_size))
    } else {
        Ok(())
    }
}

/// Sending half of a frame stream: every frame is exactly `frame_size` bytes.
#[derive(Debug)]
pub struct FrameSender {
    stream: quinn::SendStream,
    frame_size: usize,
}

impl FrameSender {
    /// Frame size of this stream.
    pub fn frame_size(&self) -> usize {
        self.frame_size
    }

    fn check(&self, len: usize) -> Result<(), LinkError> {
        if len == self.frame_size {
            Ok(())
        } else {
            Err(LinkError::FrameSize {
                expected: self.frame_size,
                got: len,
            })
        }
    }

    /// Send one frame. Waits only for send-window space, not for delivery.
    pub async fn send(&mut self, frame: &[u8]) -> Result<(), LinkError> {
        self.check(frame.len())?;
        self.stream
            .write_all(frame)
            .await
            .map_err(|source| LinkError::Write { source })
    }

    /// Send a batch of frames without copying them. Every frame is checked
    /// before any is sent; on success the slice is left holding empty `Bytes`.
    pub async fn send_many(&mut self, frames: &mut [Bytes]) -> Result<(), LinkError> {
        for f in frames.iter() {
            self.check(f.len())?;
        }
        self.stream
            .write_all_chunks(frames)
            .await
            .map_err(|source| LinkError::Write { source })
    }

    /// End the stream cleanly; the receiver then gets `Ok(None)` after the last frame.
    ///
    /// Data still buffered is delivered only while the [`Link`] stays open.
    pub fn finish(&mut self) -> Result<(), LinkError> {
        self.stream.finish().map_err(|_| LinkError::StreamClosed)
    }
}

/// Receiving half of a frame stream.
#[derive(Debug)]
pub struct FrameReceiver {
    stream: quinn::RecvStream,
    buf: Vec<u8>,
}

impl FrameReceiver {
    /// Frame size of this stream.
    pub fn frame_size(&self) -> usize {
        self.buf.len()
    }

    /// Receive the next frame into an internal buffer; `Ok(None)` when the
    /// sender finished the stream on a frame boundary.
    pub async fn recv(&mut self) -> Result<Option<&[u8]>, LinkError> {
        match read_frame(&mut self.stream, &mut self.buf).await? {
            true => Ok(Some(&self.buf)),
            false => Ok(None),
        }
    }

    /// Receive the next frame into `out`, which must be exactly `frame_size`
    /// bytes. Returns `false` when the sender finished the stream.
    pub async fn recv_into(&mut self, out: &mut [u8]) -> Result<bool, LinkError> {
        if out.len() != self.buf.len() {
            return Err(LinkError::FrameSize {
                expected: self.buf.len(),
                got: out.len(),
            });
        }
        read_frame(&mut self.stream, out).await
    }
}

async fn read_frame(stream: &mut quinn::RecvStream, out: &mut [u8]) -> Result<bool, LinkError> {
    match stream.read_exact(out).await {
        Ok(()) => Ok(true),
        Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(false),
        Err(quinn::ReadExactError::FinishedEarly(got)) => Err(LinkError::TruncatedFrame {
            expected: out.len(),
            got,
        }),
        Err(quinn::ReadExactError::ReadError(source)) => Err(LinkError::Read { source }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// Regression: links kept the kernel's default 208 KiB receive buffer and dropped
    /// datagrams of pull-answer bursts on a loaded host (`RcvbufErrors`).
    #[test]
    fn udp_socket_buffers_are_enlarged_up_to_the_kernel_cap() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let state = quinn::udp::UdpSocketState::new((&socket).into()).unwrap();
        let before = state.recv_buffer_size((&socket).into()).unwrap();
        enlarge_buffers(&socket);
        let after = state.recv_buffer_size((&socket).into()).unwrap();
        // Linux grants min(request, rmem_max) and reports twice that (bookkeeping).
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        match cap {
            Some(cap) if cap > before => assert!(after >= SOCKET_BUFFER.min(cap), "{after}"),
            _ => assert!(after >= before),
        }
    }
}

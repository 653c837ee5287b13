//! End-to-end tests over real QUIC on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;

use crate::{LinkEndpoint, LinkError, NodeKey, PeerSet, node_key};

const FRAME: usize = 2400;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn endpoint(identity: &SigningKey, accept_from: PeerSet) -> (LinkEndpoint, SocketAddr) {
    let ep = LinkEndpoint::bind(localhost(), identity, accept_from).unwrap();
    let addr = ep.local_addr().unwrap();
    (ep, addr)
}

fn frame(i: u32) -> Vec<u8> {
    let mut f = vec![(i % 251) as u8; FRAME];
    f[..4].copy_from_slice(&i.to_le_bytes());
    f
}

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .expect("test step timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_frames_arrive_intact_and_in_order() {
    let (a, b) = (key(1), key(2));
    let (server, server_addr) = endpoint(&a, PeerSet::from_keys([node_key(&b)]));
    let (client, _) = endpoint(&b, PeerSet::new());

    let receiver = tokio::spawn(async move {
        let link = within(server.accept()).await.unwrap().unwrap();
        assert_eq!(link.peer(), node_key(&key(2)));
        let mut rx = within(link.accept_frames(FRAME)).await.unwrap();
        let mut n = 0u32;
        while let Some(f) = within(rx.recv()).await.unwrap() {
            assert_eq!(f, frame(n).as_slice(), "frame {n}");
            n += 1;
        }
        n
    });

    let link = within(client.connect(server_addr, node_key(&a)))
        .await
        .unwrap();
    assert_eq!(link.peer(), node_key(&a));
    let mut tx = link.open_frames(FRAME).await.unwrap();
    for i in 0..5_000 {
        tx.send(&frame(i)).await.unwrap();
    }
    // The second half goes in batches, without copies.
    for batch in (5_000..10_000).collect::<Vec<u32>>().chunks(100) {
        let mut frames: Vec<Bytes> = batch.iter().map(|&i| Bytes::from(frame(i))).collect();
        tx.send_many(&mut frames).await.unwrap();
    }
    tx.finish().unwrap();
    assert_eq!(within(receiver).await.unwrap(), 10_000);
}

#[tokio::test]
async fn wrong_sizes_are_errors() {
    let (a, b) = (key(1), key(2));
    let (server, server_addr) = endpoint(&a, PeerSet::from_keys([node_key(&b)]));
    let (client, _) = endpoint(&b, PeerSet::new());
    let link = within(client.connect(server_addr, node_key(&a)))
        .await
        .unwrap();
    let inbound = within(server.accept()).await.unwrap().unwrap();

    assert!(matches!(
        link.open_frames(0).await,
        Err(LinkError::InvalidFrameSize(0))
    ));
    let mut tx = link.open_frames(FRAME).await.unwrap();
    assert!(matches!(
        tx.send(&[0; FRAME - 1]).await,
        Err(LinkError::FrameSize {
            expected: FRAME,
            got: 2399
        })
    ));
    let mut batch = vec![Bytes::from(frame(0)), Bytes::from_static(&[0; 10])];
    assert!(matches!(
        tx.send_many(&mut batch).await,
        Err(LinkError::FrameSize { got: 10, .. })
    ));
    tx.send(&frame(7)).await.unwrap();

    let mut rx = within(inbound.accept_frames(FRAME)).await.unwrap();
    let mut small = [0u8; 10];
    assert!(matches!(
        rx.recv_into(&mut small).await,
        Err(LinkError::FrameSize { .. })
    ));
    let mut out = vec![0u8; FRAME];
    assert!(within(rx.recv_into(&mut out)).await.unwrap());
    assert_eq!(out, frame(7));
}

#[tokio::test]
async fn truncated_frame_is_an_error() {
    let (a, b) = (key(1), key(2));
    let (server, server_addr) = endpoint(&a, PeerSet::from_keys([node_key(&b)]));
    let (client, _) = endpoint(&b, PeerSet::new());
    let link = within(client.connect(server_addr, node_key(&a)))
        .await
        .unwrap();
    let inbound = within(server.accept()).await.unwrap().unwrap();

    // Bypass FrameSender to write half a frame, as a broken peer would.
    let mut raw = link.connection().open_uni().await.unwrap();
    raw.write_all(&[1; FRAME / 2]).await.unwrap();
    raw.finish().unwrap();
    let mut rx = within(inbound.accept_frames(FRAME)).await.unwrap();
    assert!(matches!(
        within(rx.recv()).await,
        Err(LinkError::TruncatedFrame { got, .. }) if got == FRAME / 2
    ));
}

/// Expect the dial from `client` to be refused by the server's PeerSet.
/// In TLS 1.3 the client may finish its side of the handshake before the
/// server has judged its key, so refusal shows either as a failed connect or
/// as the link being closed right after.
async fn assert_client_refused(
    client: &LinkEndpoint,
    server: &LinkEndpoint,
    server_addr: SocketAddr,
    server_key: NodeKey,
) {
    match within(client.connect(server_addr, server_key)).await {
        Err(LinkError::Handshake { .. }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(link) => {
            within(link.connection().closed()).await;
        }
    }
    assert!(matches!(
        within(server.accept()).await,
        Some(Err(LinkError::InboundHandshake { .. }))
    ));
}

#[tokio::test]
async fn unknown_client_key_is_refused_until_listed() {
    let (a, b, c) = (key(1), key(2), key(3));
    let accept = PeerSet::from_keys([node_key(&c)]);
    let (server, server_addr) = endpoint(&a, accept.clone());
    let (client, _) = endpoint(&b, PeerSet::new());
    assert_client_refused(&client, &server, server_addr, node_key(&a)).await;

    // A directory update that lists b lets it in on the next dial.
    accept.replace([node_key(&b), node_key(&c)]);
    let link = within(client.connect(server_addr, node_key(&a)))
        .await
        .unwrap();
    let inbound = within(server.accept()).await.unwrap().unwrap();
    assert_eq!(inbound.peer(), node_key(&b));
    assert_eq!(link.peer(), node_key(&a));

    // And removing it again locks it out.
    accept.replace([node_key(&c)]);
    assert_client_refused(&client, &server, server_addr, node_key(&a)).await;
}

#[tokio::test]
async fn wrong_pinned_server_key_is_refused() {
    let (a, b, c) = (key(1), key(2), key(3));
    let (server, server_addr) = endpoint(&a, PeerSet::from_keys([node_key(&b)]));
    let (client, _) = endpoint(&b, PeerSet::new());
    assert!(matches!(
        within(client.connect(server_addr, node_key(&c))).await,
        Err(LinkError::Handshake { .. })
    ));
    // The server saw the client abort.
    assert!(matches!(
        within(server.accept()).await,
        Some(Err(LinkError::InboundHandshake { .. }))
    ));
}

#[tokio::test]
async fn any_set_accepts_unlisted_keys_and_reports_them() {
    let gateway = key(10);
    let (server, server_addr) = endpoint(&gateway, PeerSet::any());
    for seed in [20, 21] {
        let (client, _) = endpoint(&key(seed), PeerSet::new());
        let link = within(client.connect(server_addr, node_key(&gateway)))
            .await
            .unwrap();
        let inbound = within(server.accept()).await.unwrap().unwrap();
        assert_eq!(inbound.peer(), node_key(&key(seed)));
        assert_eq!(link.peer(), node_key(&gateway));
    }
}

#[tokio::test]
async fn close_ends_accept() {
    let (server, _) = endpoint(&key(1), PeerSet::new());
    server.close();
    assert!(within(server.accept()).await.is_none());
}

#[test]
fn bind_outside_runtime_is_an_error() {
    assert!(matches!(
        LinkEndpoint::bind(localhost(), &key(1), PeerSet::new()),
        Err(LinkError::NoRuntime)
    ));
}

/// A UDP proxy between client and server that records the payload size of every
/// datagram in each direction: what a passive observer of the link sees.
async fn recording_proxy(
    server: SocketAddr,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<(bool, usize)>>>) {
    use std::sync::{Arc, Mutex};
    use tokio::net::UdpSocket;
    let front = Arc::new(UdpSocket::bind(localhost()).await.unwrap());
    let back = Arc::new(UdpSocket::bind(localhost()).await.unwrap());
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let client = Arc::new(Mutex::new(None::<SocketAddr>));
    {
        let (front, back, seen, client) = (front.clone(), back.clone(), seen.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                seen.lock().unwrap().push((true, n));
                let _ = back.send(&buf[..n]).await;
            }
        });
    }
    {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = back.recv(&mut buf).await {
                seen.lock().unwrap().push((false, n));
                let to = *client.lock().unwrap();
                if let Some(to) = to {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        });
    }
    (addr, seen)
}

/// On the wire, every datagram that carries frames has the same size: frame
/// boundaries, write bursts and the sender's activity pattern are not visible in
/// datagram lengths. The only other datagrams are small control packets (ACKs,
/// keep-alives), which carry no frame bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_carrying_frames_all_have_one_size() {
    let (a, b) = (key(40), key(41));
    let (server, server_addr) = endpoint(&b, PeerSet::from_keys([node_key(&a)]));
    let (client, _) = endpoint(&a, PeerSet::new());
    let (proxy, seen) = recording_proxy(server_addr).await;

    let recv = tokio::spawn(async move {
        let link = server.accept().await.unwrap().unwrap();
        let mut rx = link.accept_frames(FRAME).await.unwrap();
        let mut n = 0;
        while let Ok(Some(_)) = rx.recv().await {
            n += 1;
            if n == 600 {
                break;
            }
        }
        n
    });
    let link = within(client.connect(proxy, node_key(&b))).await.unwrap();
    let mut tx = link.open_frames(FRAME).await.unwrap();
    // Irregular bursts: single frames, pairs and batches, with pauses between.
    let mut i = 0u32;
    while i < 600 {
        let burst = [1, 2, 7, 1, 30][(i % 5) as usize];
        let mut batch: Vec<Bytes> = (0..burst).map(|k| Bytes::from(frame(i + k))).collect();
        tx.send_many(&mut batch).await.unwrap();
        i += burst;
        tokio::time::sleep(Duration::from_millis((i % 3) as u64)).await;
    }
    assert_eq!(within(recv).await.unwrap(), 600);

    let seen = seen.lock().unwrap().clone();
    let big: Vec<usize> = seen.iter().filter(|(_, n)| *n > 200).map(|(_, n)| *n).collect();
    let small = seen.iter().filter(|(_, n)| *n <= 200).count();
    assert!(
        big.len() >= 600 * FRAME / usize::from(crate::WIRE_DATAGRAM_SIZE),
        "the frames crossed the proxy ({} large datagrams)",
        big.len()
    );
    let sizes: std::collections::BTreeSet<usize> = big.iter().copied().collect();
    assert_eq!(
        sizes,
        [usize::from(crate::WIRE_DATAGRAM_SIZE)].into(),
        "every datagram carrying data has the same size ({small} small control datagrams)"
    );
}

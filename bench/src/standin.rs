//! A stand-in gateway: a real QUIC endpoint with a real identity and Sphinx keys,
//! registered with the authorities, that injects pre-built packets and receives what
//! the relays forward. Used by the relay benchmark and the end-to-end relay tests,
//! where a full gateway would measure the gateway rather than the relays.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Deserialize;
use shoal_link::{LinkEndpoint, PeerSet, http};
use shoal_packet::FRAME_SIZE;
use shoal_relay::core::Processed;
use shoal_relay::{KeyRing, Unwrapper};
use shoal_topology::{
    AuthoritySet, Descriptor, EpochSchedule, Hex32, NetworkParams, NodeId, Role, SphinxKeyEntry,
    Topology, UncheckedDocument,
};

/// What `/v1/network` answers.
#[derive(Debug, Clone, Deserialize)]
pub struct NetworkInfo {
    pub schedule: EpochSchedule,
    pub params: NetworkParams,
    pub authorities: AuthoritySet,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub async fn network_info(authority: SocketAddr) -> anyhow::Result<NetworkInfo> {
    let (status, body) = http::get(authority, "/v1/network").await?;
    if status != 200 {
        bail!("authority answered {status} to /v1/network");
    }
    Ok(serde_json::from_slice(&body)?)
}

/// Fetches and checks the document for `epoch` (or the current one).
pub async fn fetch_topology(
    authority: SocketAddr,
    auths: &AuthoritySet,
    epoch: Option<u64>,
) -> anyhow::Result<Topology> {
    let path = match epoch {
        Some(e) => format!("/v1/document/{e}"),
        None => "/v1/document/current".to_string(),
    };
    let (status, body) = http::get(authority, &path).await?;
    if status != 200 {
        bail!("authority answered {status} to {path}");
    }
    Ok(UncheckedDocument::parse(&body)?
        .check_signatures(auths)?
        .check_valid_at(unix_now())?)
}

/// One frame as it arrived at a stand-in.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Instant,
    /// For unwrapped final-hop packets: the first 16 bytes of the plaintext.
    pub tag: Option<[u8; 16]>,
}

/// Counters and (optionally) per-frame arrivals of a stand-in's receiving side.
#[derive(Debug, Default)]
pub struct Received {
    pub frames: AtomicU64,
    pub bad: AtomicU64,
    pub arrivals: Mutex<Vec<Arrival>>,
}

/// A stand-in gateway.
pub struct StandIn {
    pub identity: SigningKey,
    pub keys: KeyRing,
    pub endpoint: Arc<LinkEndpoint>,
    pub received: Arc<Received>,
}

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandIn").finish_non_exhaustive()
    }
}

/// Relay stand-ins (seeds below 64, admitted in advance) that fill the mix layers a
/// measurement's own nodes leave empty: authorities publish no document until every
/// layer has a relay. They only sink what reaches them. Re-register them with
/// [`StandIn::register_as`] like any stand-in when a run spans epochs.
pub async fn layer_fillers(
    authority: SocketAddr,
    info: &NetworkInfo,
    seeds: &[u64],
) -> anyhow::Result<Vec<StandIn>> {
    let mut fillers = Vec::new();
    for &seed in seeds {
        let mut s = StandIn::bind(seed)?;
        s.register_as(&[authority], info, Role::Relay).await?;
        s.spawn_sink(false, false);
        fillers.push(s);
    }
    Ok(fillers)
}

impl StandIn {
    /// Binds a QUIC endpoint on loopback that accepts links from anyone (it is a sink).
    pub fn bind(seed: u64) -> anyhow::Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let identity = SigningKey::generate(&mut rng);
        let endpoint = Arc::new(LinkEndpoint::bind(
            "127.0.0.1:0".parse()?,
            &identity,
            PeerSet::any(),
        )?);
        Ok(StandIn {
            identity,
            keys: KeyRing::new(),
            endpoint,
            received: Arc::default(),
        })
    }

    pub fn id(&self) -> NodeId {
        self.identity.verifying_key().to_bytes()
    }

    /// Keeps Sphinx keys for the previous, current and next two epochs and uploads a
    /// gateway descriptor to every authority.
    pub async fn register(
        &mut self,
        authorities: &[SocketAddr],
        info: &NetworkInfo,
    ) -> anyhow::Result<()> {
        self.register_as(authorities, info, Role::Gateway).await
    }

    /// [`Self::register`] in `role`. A relay stand-in fills a mix layer: authorities
    /// publish no document until every layer has a relay.
    pub async fn register_as(
        &mut self,
        authorities: &[SocketAddr],
        info: &NetworkInfo,
        role: Role,
    ) -> anyhow::Result<()> {
        let mut rng = StdRng::seed_from_u64(u64::from_le_bytes(self.id()[..8].try_into()?));
        let now = info.schedule.epoch_at(unix_now());
        // Keys of retired epochs go, or after a few epochs the descriptor carries more
        // keys than an authority accepts and the stand-in silently drops out.
        self.keys.retire_before(now.saturating_sub(1));
        self.keys.ensure(&mut rng, now..=now + 2);
        let descriptor = Descriptor {
            identity: Hex32(self.id()),
            role,
            link_addr: self.endpoint.local_addr()?.to_string(),
            sphinx_keys: self
                .keys
                .iter()
                .map(|(epoch, k)| SphinxKeyEntry {
                    epoch,
                    key: Hex32(x25519_dalek::PublicKey::from(k).to_bytes()),
                })
                .collect(),
            published_unix: unix_now(),
            version: None,
        };
        let operator = shoal_topology::operator::solo_operator_key(&self.identity);
        let cert = shoal_topology::NodeCertificate::issue(&operator, self.id(), role);
        let signed = descriptor.sign(&self.identity)?.certified(cert);
        for a in authorities {
            // The authority re-reads its admitted operators once per sync round: an
            // operator admitted a moment ago may not be known yet.
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            loop {
                let (status, body) = http::post(*a, "/v1/descriptor", &signed.to_json()).await?;
                if status == 200 {
                    break;
                }
                let text = String::from_utf8_lossy(&body).into_owned();
                if !text.contains("not admitted") || std::time::Instant::now() >= deadline {
                    bail!("authority refused descriptor: {status} {text}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// The public key of this stand-in's operator (itself), to admit at the authority.
    pub fn operator_hex(&self) -> String {
        hex::encode(
            shoal_topology::operator::solo_operator_key(&self.identity)
                .verifying_key()
                .to_bytes(),
        )
    }

    /// [`StandIn::operator_hex`] of the stand-in `bind(seed)` makes, without binding.
    pub fn operator_hex_for_seed(seed: u64) -> String {
        let identity = SigningKey::generate(&mut StdRng::seed_from_u64(seed));
        hex::encode(
            shoal_topology::operator::solo_operator_key(&identity)
                .verifying_key()
                .to_bytes(),
        )
    }

    /// Accepts links and reads frames. With `unwrap`, final-hop packets are unwrapped
    /// with this stand-in's keys and tagged with their first plaintext bytes.
    pub fn spawn_sink(&self, unwrap: bool, record: bool) {
        let endpoint = self.endpoint.clone();
        let received = self.received.clone();
        let unwrapper = Arc::new(Unwrapper::new(self.keys.clone(), 1 << 22));
        tokio::spawn(async move {
            while let Some(link) = endpoint.accept().await {
                let Ok(link) = link else { continue };
                let received = received.clone();
                let unwrapper = unwrapper.clone();
                tokio::spawn(async move {
                    while let Ok(mut frames) = link.accept_frames(FRAME_SIZE).await {
                        let received = received.clone();
                        let unwrapper = unwrapper.clone();
                        tokio::spawn(async move {
                            while let Ok(Some(frame)) = frames.recv().await {
                                let at = Instant::now();
                                received.frames.fetch_add(1, Ordering::Relaxed);
                                let tag = if unwrap {
                                    match unwrapper.unwrap_frame(frame) {
                                        Ok(Processed::Final { payload, .. }) => {
                                            shoal_packet::sphinx::open_forward(&payload)
                                                .ok()
                                                .and_then(|p| {
                                                    p.get(..16).and_then(|s| s.try_into().ok())
                                                })
                                        }
                                        _ => {
                                            received.bad.fetch_add(1, Ordering::Relaxed);
                                            None
                                        }
                                    }
                                } else {
                                    None
                                };
                                if record && let Ok(mut a) = received.arrivals.lock() {
                                    a.push(Arrival { at, tag });
                                }
                            }
                        });
                    }
                });
            }
        });
    }

    /// Waits until `n` frames have arrived or `timeout` passes; returns the count.
    pub async fn wait_for(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received.frames.load(Ordering::Relaxed);
            if got >= n || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Polls the authority until the current document lists every node in `expect`.
pub async fn wait_for_topology(
    authority: SocketAddr,
    auths: &AuthoritySet,
    expect: &[NodeId],
    timeout: Duration,
) -> anyhow::Result<Topology> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(t) = fetch_topology(authority, auths, None).await
            && expect.iter().all(|id| t.node(id).is_some())
        {
            return Ok(t);
        }
        if Instant::now() >= deadline {
            return Err(anyhow::anyhow!(
                "no document listing all {} nodes within {timeout:?}",
                expect.len()
            ))
            .context("waiting for the directory");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

//! The authority driver: the HTTP API of `docs/authority-api.md` around a
//! [`shoal_topology::Authority`], and the loop that syncs with the other authorities.
//! Every decision (what to accept, when to vote, what to publish) is the
//! `Authority`'s; this file only moves bytes and reads the clock.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::de::DeserializeOwned;
use shoal_link::http::{self, Request, Response};
use shoal_topology::{Authority, AuthoritySignature, SignedDescriptor, SignedDocument};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::authority_config::{AuthorityFileConfig, Peer};

/// The authority and the limits its API enforces, behind one lock.
pub struct State {
    pub auth: Authority,
    pub limits: Limits,
}

type Shared = Arc<Mutex<State>>;

/// Largest request body any endpoint takes; only descriptor posts have a body, and a
/// descriptor is at most [`shoal_topology::MAX_DESCRIPTOR_BYTES`].
pub const MAX_REQUEST_BYTES: usize = shoal_topology::MAX_DESCRIPTOR_BYTES;
/// Sources whose request rate is tracked; beyond it the idlest are forgotten.
pub const MAX_SOURCES: usize = 4096;

/// Per-source request rate limits, with a bounded table. Pure: time comes in as an
/// argument. A source is a network, not an address: an IPv4 /24 or an IPv6 /64, since
/// whoever holds one address of those usually holds them all.
#[derive(Debug)]
pub struct Limits {
    /// Requests per second a source may sustain.
    pub rate: f64,
    /// Requests a source may make at once.
    pub burst: f64,
    buckets: std::collections::HashMap<std::net::IpAddr, (f64, u64)>,
    /// Requests refused for rate, since start.
    pub limited: u64,
}

impl Limits {
    pub fn new(rate: f64, burst: f64) -> Self {
        Limits {
            rate,
            burst,
            buckets: std::collections::HashMap::new(),
            limited: 0,
        }
    }

    /// Whether `source` may make a request at `now_ms`.
    pub fn allow(&mut self, source: Option<std::net::IpAddr>, now_ms: u64) -> bool {
        let Some(source) = source.map(source_network) else {
            return true;
        };
        if !self.buckets.contains_key(&source) && self.buckets.len() >= MAX_SOURCES {
            // Forget the sources with the fullest buckets (the idlest): a full bucket
            // is what a forgotten source starts with anyway.
            let (rate, burst) = (self.rate, self.burst);
            let level = |&(tokens, at): &(f64, u64)| {
                (tokens + now_ms.saturating_sub(at) as f64 / 1000.0 * rate).min(burst)
            };
            let mut levels: Vec<f64> = self.buckets.values().map(level).collect();
            levels.sort_by(f64::total_cmp);
            let cut = levels[levels.len() / 2];
            self.buckets.retain(|_, b| level(b) < cut);
            if self.buckets.len() >= MAX_SOURCES {
                self.buckets.clear();
            }
        }
        let (tokens, at) = self.buckets.entry(source).or_insert((self.burst, now_ms));
        *tokens =
            (*tokens + now_ms.saturating_sub(*at) as f64 / 1000.0 * self.rate).min(self.burst);
        *at = now_ms;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            self.limited += 1;
            false
        }
    }

    pub fn sources(&self) -> usize {
        self.buckets.len()
    }
}

/// The network a request's address is counted under: its /24 (IPv4) or /64 (IPv6).
pub fn source_network(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from_bits(v4.to_bits() & !0xff)),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
    }
}

fn lock(state: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves the authority's maps intact (every
    // mutation is a single insert or remove), so carry on with them.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(cfg: AuthorityFileConfig) -> anyhow::Result<()> {
    let started = now_unix();
    let authority = Authority::new(cfg.key, cfg.authority.clone())
        .context("invalid authority configuration")?;
    if authority.config().admission.is_empty() {
        warn!(
            operators = %cfg.operators_path.display(),
            "no operators admitted: every descriptor will be refused (shoal authority operator admit)"
        );
    }
    let network = serde_json::to_vec(&serde_json::json!({
        "schedule": cfg.authority.schedule,
        "params": cfg.authority.params,
        "authorities": cfg.authority.authorities,
        "signed": authority.network_description()?,
    }))?;
    let state: Shared = Arc::new(Mutex::new(State {
        auth: authority,
        limits: Limits::new(cfg.rate_per_source, cfg.burst_per_source),
    }));
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    info!(
        listen = %cfg.listen,
        authorities = cfg.authority.authorities.keys.len(),
        threshold = cfg.authority.authorities.threshold,
        "directory authority running"
    );

    let handler_state = state.clone();
    let admit_state = state.clone();
    let server = tokio::spawn(http::serve_admitting(
        listener,
        move |peer| lock(&admit_state).limits.allow(Some(peer), now_ms()),
        move |req| {
            let mut state = lock(&handler_state);
            let State { auth, limits } = &mut *state;
            respond(auth, limits, &network, &req, now_unix())
        },
    ));

    let sync = async {
        let mut sync = Sync::new(cfg.peers.clone(), started, cfg.operators_path.clone());
        let mut tick = tokio::time::interval(cfg.sync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            sync.round(&state).await;
        }
    };
    tokio::select! {
        () = sync => {}
        r = crate::runtime::wait_for_signal() => r?,
    }
    server.abort();
    info!("directory authority stopped");
    Ok(())
}

fn json(body: Vec<u8>) -> Response {
    Response::new(200, "application/json", body)
}

/// The authority's own counters, in the Prometheus text format.
fn metrics(auth: &Authority, limits: &Limits) -> String {
    let mut out = String::new();
    out.push_str("# HELP shoal_authority_descriptors_accepted_total Descriptors taken.\n");
    out.push_str("# TYPE shoal_authority_descriptors_accepted_total counter\n");
    out.push_str(&format!(
        "shoal_authority_descriptors_accepted_total {}\n",
        auth.accepted()
    ));
    out.push_str(
        "# HELP shoal_authority_descriptors_refused_total Descriptors refused, by reason.\n",
    );
    out.push_str("# TYPE shoal_authority_descriptors_refused_total counter\n");
    for (why, n) in auth.refusals() {
        out.push_str(&format!(
            "shoal_authority_descriptors_refused_total{{reason=\"{}\"}} {n}\n",
            why.as_str()
        ));
    }
    out.push_str("# HELP shoal_authority_descriptors_held Descriptors held (bounded by the operators' caps).\n");
    out.push_str("# TYPE shoal_authority_descriptors_held gauge\n");
    out.push_str(&format!(
        "shoal_authority_descriptors_held {}\n",
        auth.descriptor_count()
    ));
    out.push_str("# HELP shoal_authority_operators_admitted Operators this authority admits.\n");
    out.push_str("# TYPE shoal_authority_operators_admitted gauge\n");
    out.push_str(&format!(
        "shoal_authority_operators_admitted {}\n",
        auth.config().admission.len()
    ));
    out.push_str("# HELP shoal_authority_rate_sources Source addresses whose rate is tracked.\n");
    out.push_str("# TYPE shoal_authority_rate_sources gauge\n");
    out.push_str(&format!(
        "shoal_authority_rate_sources {}\n",
        limits.sources()
    ));
    out.push_str(
        "# HELP shoal_authority_requests_limited_total Requests refused for rate (429).\n",
    );
    out.push_str("# TYPE shoal_authority_requests_limited_total counter\n");
    out.push_str(&format!(
        "shoal_authority_requests_limited_total {}\n",
        limits.limited
    ));
    out
}

/// Answers one API request. Pure apart from the authority's state.
pub fn respond(
    auth: &mut Authority,
    limits: &Limits,
    network: &[u8],
    req: &Request,
    now: u64,
) -> Response {
    if req.body.len() > MAX_REQUEST_BYTES {
        if req.method == "POST" {
            // Counted as the descriptor refusal it is.
            let _ = auth.handle_descriptor_bytes(&req.body, now);
        }
        return Response::text(413, "request too large\n");
    }
    let path = req.path.split('?').next().unwrap_or("");
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let epoch = |s: &str| s.parse::<u64>().ok();
    match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["v1", "network"]) => json(network.to_vec()),
        ("GET", ["metrics"]) => Response::new(
            200,
            "text/plain; version=0.0.4",
            metrics(auth, limits).into_bytes(),
        ),
        ("POST", ["v1", "descriptor"]) => match auth.handle_descriptor_bytes(&req.body, now) {
            Ok(_) => Response::text(200, "ok\n"),
            Err(e) => Response::text(400, format!("{e}\n")),
        },
        ("GET", ["v1", "descriptors"]) => {
            json(serde_json::to_vec(&auth.descriptors()).unwrap_or_default())
        }
        ("GET", ["v1", "vote", e]) => match epoch(e).and_then(|e| auth.signature_for(e)) {
            Some(sig) => json(serde_json::to_vec(&sig).unwrap_or_default()),
            None => Response::not_found(),
        },
        ("GET", ["v1", "document", "current"]) => match auth.current_document(now) {
            Some(doc) => json(doc.to_json()),
            None => Response::not_found(),
        },
        ("GET", ["v1", "document", e]) => match epoch(e).and_then(|e| auth.document(e)) {
            Some(doc) => json(doc.to_json()),
            None => Response::not_found(),
        },
        ("GET", ["v1", "roster", which]) => {
            let current = auth.config().schedule.epoch_at(now);
            let e = match *which {
                "current" => Some(current),
                "next" => Some(current + 1),
                e => epoch(e),
            };
            match e {
                Some(e) => json(
                    serde_json::to_vec(&serde_json::json!({
                        "epoch": e,
                        "published": auth.document(e).is_some(),
                        "nodes": auth.roster(e),
                    }))
                    .unwrap_or_default(),
                ),
                None => Response::not_found(),
            }
        }
        (
            _,
            ["v1", "network" | "descriptor" | "descriptors"]
            | ["v1", "vote" | "document" | "roster", _]
            | ["metrics"],
        ) => Response::text(405, "method not allowed\n"),
        _ => Response::not_found(),
    }
}

/// Sync state that is about peers, not about the directory.
struct Sync {
    peers: Vec<Peer>,
    started: u64,
    operators_path: std::path::PathBuf,
    /// Whether each peer answered last time (absent: not asked yet), to log changes
    /// rather than every failure.
    reachable: BTreeMap<SocketAddr, bool>,
    /// Epochs whose publication has been logged.
    announced: BTreeSet<u64>,
}

/// What one peer told us in the first phase of a round.
struct PeerState {
    descriptors: Vec<SignedDescriptor>,
    documents: Vec<SignedDocument>,
}

impl Sync {
    fn new(peers: Vec<Peer>, started: u64, operators_path: std::path::PathBuf) -> Self {
        Sync {
            peers,
            started,
            operators_path,
            reachable: BTreeMap::new(),
            announced: BTreeSet::new(),
        }
    }

    /// One round: merge peers' descriptors and documents, vote where it is time, and
    /// collect peers' votes for those epochs.
    async fn round(&mut self, state: &Shared) {
        let now = now_unix();
        let admission = super::authority_config::load_operators(&self.operators_path);
        let interest = {
            let mut state = lock(state);
            let auth = &mut state.auth;
            match admission {
                Ok(a) if a != auth.config().admission => {
                    info!(operators = a.len(), "admitted operators changed");
                    auth.set_admission(a);
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "cannot read the admitted operators; keeping the old list")
                }
            }
            auth.expire_descriptors(now);
            auth.epochs_of_interest(now)
        };

        let mut tasks = JoinSet::new();
        for peer in self.peers.clone() {
            tasks.spawn(async move {
                let descriptors =
                    get_json::<Vec<SignedDescriptor>>(peer.addr, "/v1/descriptors").await;
                let mut documents = Vec::new();
                for e in interest {
                    if let Ok(Some(doc)) =
                        get_json::<SignedDocument>(peer.addr, &format!("/v1/document/{e}")).await
                    {
                        documents.push(doc);
                    }
                }
                (
                    peer.addr,
                    descriptors.map(|d| PeerState {
                        descriptors: d.unwrap_or_default(),
                        documents,
                    }),
                )
            });
        }
        let mut answers = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let Ok((addr, result)) = joined else { continue };
            match result {
                Ok(answer) => {
                    self.mark(addr, None);
                    answers.push(answer);
                }
                Err(e) => self.mark(addr, Some(format!("{e:#}"))),
            }
        }

        let to_vote = {
            let mut state = lock(state);
            let auth = &mut state.auth;
            for answer in answers {
                for d in answer.descriptors {
                    // Peers pass on what nodes uploaded; a stale or bad one is not news.
                    if let Err(e) = auth.handle_descriptor(d, now) {
                        debug!(error = %e, "peer passed on an unusable descriptor");
                    }
                }
                for doc in answer.documents {
                    if let Err(e) = auth.adopt(doc) {
                        debug!(error = %e, "peer served a document we cannot adopt");
                    }
                }
            }
            let to_vote = auth.epochs_to_vote(now, self.started);
            for &e in &to_vote {
                if let Err(e) = auth.vote(e) {
                    debug!(error = %e, "not voting");
                }
            }
            self.announce(auth);
            to_vote
        };
        if to_vote.is_empty() {
            return;
        }

        let mut tasks = JoinSet::new();
        for peer in self.peers.clone() {
            let epochs = to_vote.clone();
            tasks.spawn(async move {
                let mut sigs = Vec::new();
                for e in epochs {
                    if let Ok(Some(sig)) =
                        get_json::<AuthoritySignature>(peer.addr, &format!("/v1/vote/{e}")).await
                    {
                        sigs.push((e, sig));
                    }
                }
                sigs
            });
        }
        let mut sigs = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            sigs.extend(joined.unwrap_or_default());
        }
        let mut state = lock(state);
        for (e, sig) in sigs {
            // A signature over another body is normal while inputs still differ.
            state.auth.add_signature(e, sig);
        }
        self.announce(&state.auth);
    }

    /// Records whether `addr` answered; logs only changes.
    fn mark(&mut self, addr: SocketAddr, error: Option<String>) {
        let ok = error.is_none();
        match (self.reachable.insert(addr, ok), error) {
            // Peers start at different times: not yet answering is normal.
            (None, Some(error)) => info!(peer = %addr, %error, "authority peer not reachable yet"),
            (Some(true), Some(error)) => warn!(peer = %addr, %error, "authority peer unreachable"),
            (None | Some(false), None) => info!(peer = %addr, "authority peer reachable"),
            _ => {}
        }
    }

    /// Logs each epoch's first publication once.
    fn announce(&mut self, auth: &Authority) {
        for e in auth.published_epochs() {
            if self.announced.insert(e)
                && let (Some(doc), Some(body)) = (auth.document(e), auth.document_body(e))
            {
                info!(
                    epoch = e,
                    nodes = body.nodes.len(),
                    signatures = doc.signatures.len(),
                    "published directory document"
                );
            }
        }
        if let Some(&newest) = self.announced.iter().next_back() {
            self.announced.retain(|&e| e + 8 >= newest);
        }
    }
}

/// `GET path` from a peer: `Ok(None)` on 404, an error on anything else unexpected.
async fn get_json<T: DeserializeOwned>(addr: SocketAddr, path: &str) -> anyhow::Result<Option<T>> {
    let (status, body) = http::get(addr, path).await?;
    match status {
        200 => Ok(Some(
            serde_json::from_slice(&body).with_context(|| format!("bad JSON from {path}"))?,
        )),
        404 => Ok(None),
        s => anyhow::bail!("{path} answered {s}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// One source flooding the API is held to its rate, others are not affected, and
    /// the table of sources stays bounded however many addresses appear.
    #[test]
    fn sybil_flood_of_requests_is_rate_limited_per_source_with_bounded_state() {
        let mut limits = Limits::new(10.0, 20.0);
        let flooder: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let honest: std::net::IpAddr = "198.51.100.7".parse().unwrap();
        let allowed = (0..1000)
            .filter(|_| limits.allow(Some(flooder), 5_000))
            .count();
        assert_eq!(allowed, 20, "the burst, then nothing");
        assert!(limits.allow(Some(honest), 5_000));
        // One second later, the rate's worth again.
        let allowed = (0..1000)
            .filter(|_| limits.allow(Some(flooder), 6_000))
            .count();
        assert_eq!(allowed, 10);
        assert_eq!(limits.limited, 980 + 990);
        // A flooder that rotates its address inside its /24, or its IPv6 /64, is still
        // one source.
        let mut limits = Limits::new(10.0, 20.0);
        let v4 = (0..=255u8)
            .filter(|&i| limits.allow(Some([192, 0, 2, i].into()), 8_000))
            .count();
        let v6 = (0..1000u128)
            .filter(|&i| {
                let ip = std::net::Ipv6Addr::from_bits((0x2001_0db8_0000_0001 << 64) | (i * 7919));
                limits.allow(Some(ip.into()), 8_000)
            })
            .count();
        assert_eq!((v4, v6), (20, 20));
        assert!(limits.allow(Some([192, 0, 3, 1].into()), 8_000));
        // 10^5 distinct sources: the table never grows past its bound.
        for i in 0..100_000u32 {
            let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            limits.allow(Some(ip), 7_000);
            assert!(limits.sources() <= MAX_SOURCES);
        }
    }
}

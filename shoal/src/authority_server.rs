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

type Shared = Arc<Mutex<Authority>>;

fn lock(state: &Shared) -> MutexGuard<'_, Authority> {
    // A panic while holding the lock leaves the authority's maps intact (every
    // mutation is a single insert or remove), so carry on with them.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    let network = serde_json::to_vec(&serde_json::json!({
        "schedule": cfg.authority.schedule,
        "params": cfg.authority.params,
        "authorities": cfg.authority.authorities,
    }))?;
    let state: Shared = Arc::new(Mutex::new(authority));
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
    let server = tokio::spawn(http::serve(listener, move |req| {
        respond(&mut lock(&handler_state), &network, &req, now_unix())
    }));

    let sync = async {
        let mut sync = Sync::new(cfg.peers.clone(), started);
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

/// Answers one API request. Pure apart from the authority's state.
pub fn respond(auth: &mut Authority, network: &[u8], req: &Request, now: u64) -> Response {
    let path = req.path.split('?').next().unwrap_or("");
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let epoch = |s: &str| s.parse::<u64>().ok();
    match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["v1", "network"]) => json(network.to_vec()),
        ("POST", ["v1", "descriptor"]) => {
            let result =
                SignedDescriptor::from_json(&req.body).and_then(|d| auth.handle_descriptor(d, now));
            match result {
                Ok(_) => Response::text(200, "ok\n"),
                Err(e) => Response::text(400, format!("{e}\n")),
            }
        }
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
            | ["v1", "vote" | "document" | "roster", _],
        ) => Response::text(405, "method not allowed\n"),
        _ => Response::not_found(),
    }
}

/// Sync state that is about peers, not about the directory.
struct Sync {
    peers: Vec<Peer>,
    started: u64,
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
    fn new(peers: Vec<Peer>, started: u64) -> Self {
        Sync {
            peers,
            started,
            reachable: BTreeMap::new(),
            announced: BTreeSet::new(),
        }
    }

    /// One round: merge peers' descriptors and documents, vote where it is time, and
    /// collect peers' votes for those epochs.
    async fn round(&mut self, state: &Shared) {
        let now = now_unix();
        let interest = {
            let mut auth = lock(state);
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
            let mut auth = lock(state);
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
            self.announce(&auth);
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
        let mut auth = lock(state);
        for (e, sig) in sigs {
            // A signature over another body is normal while inputs still differ.
            auth.add_signature(e, sig);
        }
        self.announce(&auth);
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

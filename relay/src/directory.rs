//! Keeping up with the directory: Sphinx key rotation, descriptor publication and
//! document fetching (see `docs/authority-api.md`).
//!
//! Fetching is here; everything about what a document means is in `shoal-topology`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use serde::Deserialize;
use shoal_link::{PeerSet, http};
use shoal_topology::{
    AuthoritySet, Descriptor, EpochSchedule, Hex32, NetworkParams, Role, SphinxKeyEntry, Topology,
    UncheckedDocument,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::AuthorityAddr;
use crate::core::MixConfig;
use crate::driver::{Shared, View};
use crate::outbound::Router;
use crate::{KeyRing, keystore};

/// Epochs ahead of the current one whose keys are generated and published.
const KEYS_AHEAD: u64 = 2;
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Longest sleep between directory checks once everything is in hand.
const IDLE_CHECK: Duration = Duration::from_secs(30);

/// What `/v1/network` answers. Only `signed` is read, and only with the signature of
/// the authority asked (its key from the config): the plain copies beside it are for
/// people and tools.
#[derive(Debug, Clone, Deserialize)]
pub struct NetworkInfo {
    pub schedule: EpochSchedule,
    pub params: NetworkParams,
    pub signed: Option<shoal_topology::SignedNetwork>,
}

impl NetworkInfo {
    /// The schedule and parameters `authority` signed.
    pub fn checked(
        &self,
        authority: &[u8; 32],
    ) -> Result<NetworkInfo, shoal_topology::TopologyError> {
        let signed = self
            .signed
            .as_ref()
            .ok_or(shoal_topology::TopologyError::BadSignature {
                what: "network description (unsigned)",
            })?;
        let body = signed.check(authority)?;
        Ok(NetworkInfo {
            schedule: body.schedule,
            params: body.params,
            signed: None,
        })
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The per-worker core settings a document implies.
pub(crate) fn mix_config(
    params: &NetworkParams,
    workers: usize,
    delay_queue_capacity: usize,
) -> MixConfig {
    let workers = workers.max(1);
    let max_delay = Duration::from_secs_f64((params.max_hop_delay_ms / 1000.0).clamp(0.0, 3600.0));
    MixConfig {
        max_delay,
        max_queue: delay_queue_capacity.div_ceil(workers),
        // Each worker runs an independent Poisson process; their sum runs at λM.
        loop_rate: params.lambda_m / workers as f64,
        // A loop crosses four hops, each delayed at most `max_delay`.
        loop_timeout: (max_delay * 4 + Duration::from_secs(10))
            .max(MixConfig::default().loop_timeout),
    }
}

pub(crate) struct DirectoryTask {
    pub shared: Arc<Shared>,
    pub router: Arc<Router>,
    pub peers: PeerSet,
    pub identity: SigningKey,
    pub certificate: shoal_topology::NodeCertificate,
    pub role: Role,
    pub link_addr: String,
    pub authorities: Vec<AuthorityAddr>,
    pub authority_set: AuthoritySet,
    pub data_dir: std::path::PathBuf,
    pub keys: KeyRing,
    pub workers: usize,
    pub delay_queue_capacity: usize,
    pub shutdown: watch::Receiver<bool>,
}

impl DirectoryTask {
    /// Sleeps for `d`; `false` if shutdown came first.
    async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            _ = self.shutdown.changed() => false,
        }
    }

    async fn network_info(&mut self) -> Option<NetworkInfo> {
        let mut retry = RETRY_MIN;
        let mut attempts = 0u32;
        loop {
            for a in &self.authorities {
                match http::get(a.addr, "/v1/network").await {
                    Ok((200, body)) => match serde_json::from_slice::<NetworkInfo>(&body)
                        .map_err(|e| e.to_string())
                        .and_then(|i| i.checked(&a.key).map_err(|e| e.to_string()))
                    {
                        Ok(info) => return Some(info),
                        Err(e) => {
                            warn!(authority = %a.addr, error = %e, "malformed /v1/network answer")
                        }
                    },
                    Ok((status, _)) => debug!(authority = %a.addr, status, "/v1/network refused"),
                    Err(e) => debug!(authority = %a.addr, error = %e, "/v1/network failed"),
                }
            }
            attempts += 1;
            if attempts == 5 {
                warn!("no authority answered /v1/network yet; still trying");
            }
            if !self.sleep(retry).await {
                return None;
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    /// Generates keys up to `current + KEYS_AHEAD` and retires those past their grace.
    /// Returns whether the key set changed.
    fn rotate_keys(
        &mut self,
        schedule: &EpochSchedule,
        grace: u64,
        now: u64,
    ) -> Result<bool, crate::RelayError> {
        let current = schedule.epoch_at(now);
        let retired: Vec<u64> = self
            .keys
            .epochs()
            .into_iter()
            .filter(|&e| schedule.end_of(e).saturating_add(grace) < now)
            .collect();
        let made = self
            .keys
            .ensure(&mut rand::rng(), current..=current + KEYS_AHEAD);
        keystore::save_sphinx_keys(&self.data_dir, &self.keys, &made)?;
        if let Some(&last) = retired.last() {
            self.keys.retire_before(last + 1);
            keystore::remove_sphinx_keys(&self.data_dir, &retired)?;
        }
        let changed = !made.is_empty() || !retired.is_empty();
        if changed {
            self.shared.unwrapper.set_keys(self.keys.clone());
            info!(
                made = made.len(),
                retired = retired.len(),
                "Sphinx keys rotated"
            );
        }
        Ok(changed)
    }

    /// Signs a fresh descriptor and posts it to every authority; `true` if one took it.
    async fn publish(&mut self, schedule: &EpochSchedule, now: u64) -> bool {
        let current = schedule.epoch_at(now);
        let descriptor = Descriptor {
            identity: Hex32(self.identity.verifying_key().to_bytes()),
            role: self.role,
            link_addr: self.link_addr.clone(),
            sphinx_keys: self
                .keys
                .iter()
                .filter(|(e, _)| *e >= current)
                .map(|(epoch, secret)| SphinxKeyEntry {
                    epoch,
                    key: Hex32(x25519_dalek::PublicKey::from(secret).to_bytes()),
                })
                .collect(),
            published_unix: now,
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        };
        let signed = match descriptor.sign(&self.identity) {
            Ok(s) => s.certified(self.certificate.clone()).to_json(),
            Err(e) => {
                warn!(error = %e, "cannot sign our descriptor");
                return false;
            }
        };
        // Post to all authorities at once, so one unreachable authority does not
        // delay the others by its whole timeout.
        let mut posts = tokio::task::JoinSet::new();
        for a in &self.authorities {
            let (addr, body) = (a.addr, signed.clone());
            posts.spawn(async move { (addr, http::post(addr, "/v1/descriptor", &body).await) });
        }
        let mut accepted = 0;
        while let Some(joined) = posts.join_next().await {
            let Ok((addr, result)) = joined else { continue };
            match result {
                Ok((200, _)) => accepted += 1,
                Ok((status, body)) => warn!(
                    authority = %addr,
                    status,
                    // Escaped: the authority's text cannot forge a log line.
                    reason = ?String::from_utf8_lossy(&body[..body.len().min(200)]).trim(),
                    "authority refused our descriptor"
                ),
                Err(e) => debug!(authority = %addr, error = %e, "posting descriptor failed"),
            }
        }
        if accepted == 0 {
            warn!("no authority accepted our descriptor; will retry");
        }
        accepted > 0
    }

    async fn fetch_document(
        &self,
        epoch: u64,
        now: u64,
        schedule: &EpochSchedule,
    ) -> Option<Topology> {
        let n = self.authorities.len();
        let start = usize::try_from(epoch).unwrap_or(0) % n.max(1);
        for i in 0..n {
            let a = &self.authorities[(start + i) % n];
            let body = match http::get(a.addr, &format!("/v1/document/{epoch}")).await {
                Ok((200, body)) => body,
                Ok((status, _)) => {
                    debug!(authority = %a.addr, epoch, status, "no document");
                    continue;
                }
                Err(e) => {
                    debug!(authority = %a.addr, epoch, error = %e, "document fetch failed");
                    continue;
                }
            };
            let checked = UncheckedDocument::parse(&body)
                .and_then(|u| {
                    if u.claimed_epoch() == epoch {
                        Ok(u)
                    } else {
                        Err(shoal_topology::TopologyError::Invalid {
                            what: "document epoch",
                            reason: format!("asked for {epoch}, got {}", u.claimed_epoch()),
                        })
                    }
                })
                .and_then(|u| u.check_signatures(&self.authority_set))
                .and_then(|s| s.check_valid_at(now))
                .and_then(|t| {
                    if t.schedule() == schedule {
                        Ok(t)
                    } else {
                        Err(shoal_topology::TopologyError::Invalid {
                            what: "document schedule",
                            reason: "differs from the one /v1/network gave: restart the node"
                                .into(),
                        })
                    }
                });
            match checked {
                Ok(t) => return Some(t),
                Err(e) => {
                    warn!(authority = %a.addr, epoch, error = %e, "rejected a directory document")
                }
            }
        }
        None
    }

    /// Makes `docs` the relay's view: who may connect, where next hops are, loop settings.
    fn apply(&self, docs: &BTreeMap<u64, Arc<Topology>>, current: u64) {
        let topology = docs.range(..=current).next_back().map(|(_, t)| t.clone());
        let params = topology
            .as_ref()
            .or_else(|| docs.values().next())
            .map(|t| t.params().clone());
        let mix = match &params {
            Some(p) => mix_config(p, self.workers, self.delay_queue_capacity),
            None => self.shared.view().mix.clone(),
        };
        let listed = |id: &[u8; 32]| docs.values().any(|t| t.node(id).is_some());
        self.peers.replace(
            docs.values()
                .flat_map(|t| t.nodes().map(|n| n.id))
                .collect::<Vec<_>>(),
        );
        self.router.retain(listed);
        // Each node that may send to us holds one share of the replay filter: the
        // nodes of the position before ours (gateways before layer 0, layer l-1 before
        // layer l, the last layer before a gateway), plus one for our own loops.
        if let Some(t) = &topology {
            let me = self.identity.verifying_key().to_bytes();
            let before = match t.node(&me).and_then(|n| n.layer) {
                Some(0) => t.gateways().len(),
                Some(l) => t.layer(usize::from(l) - 1).len(),
                None => t.layer(shoal_packet::MIX_LAYERS - 1).len(),
            };
            self.shared.unwrapper.set_upstream_shares(before + 1);
        }
        self.shared.set_view(View {
            current: topology,
            docs: docs.clone(),
            mix,
        });
    }

    pub(crate) async fn run(mut self) {
        let Some(info) = self.network_info().await else {
            return;
        };
        let schedule = info.schedule;
        let grace = info.params.key_grace_secs;
        let mut docs: BTreeMap<u64, Arc<Topology>> = BTreeMap::new();
        let mut last_publish: Option<Instant> = None;
        // Authorities judge liveness by descriptor age (`descriptor_max_age_secs`,
        // defaulting to a few of these periods past the vote lead), so this cadence must
        // hold even while everything else is in hand.
        let republish = Duration::from_secs(schedule.republish_secs());
        let mut retry = RETRY_MIN;
        let mut applied: Option<u64> = None;
        loop {
            let now = unix_now();
            let current = schedule.epoch_at(now);
            let keys_changed = match self.rotate_keys(&schedule, grace, now) {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "cannot persist Sphinx keys");
                    false
                }
            };
            let mut ok = true;
            if keys_changed || last_publish.is_none_or(|t| t.elapsed() >= republish) {
                if self.publish(&schedule, now).await {
                    last_publish = Some(Instant::now());
                } else {
                    ok = false;
                }
            }

            let mut changed = false;
            let before = docs.len();
            // A document carries keys for its epoch and the next, so when the next one
            // is late the last valid one keeps routing, for one epoch at most; a newer
            // one replaces it as soon as it comes, and an older one is never fetched.
            docs.retain(|&e, _| e + 1 >= current);
            changed |= docs.len() != before;
            for epoch in [current, current + 1] {
                if docs.contains_key(&epoch) {
                    continue;
                }
                match self.fetch_document(epoch, now, &schedule).await {
                    Some(t) => {
                        info!(
                            epoch,
                            nodes = t.nodes().count(),
                            "directory document accepted"
                        );
                        docs.insert(epoch, Arc::new(t));
                        changed = true;
                    }
                    None => ok = false,
                }
            }
            // At an epoch edge the held "next" document becomes the current one.
            if changed || applied != Some(current) {
                self.apply(&docs, current);
                applied = Some(current);
            }

            let wait = if ok {
                retry = RETRY_MIN;
                let to_edge = schedule.end_of(current).saturating_sub(unix_now());
                let to_republish =
                    last_publish.map_or(Duration::ZERO, |t| republish.saturating_sub(t.elapsed()));
                IDLE_CHECK
                    .min(Duration::from_secs(to_edge.max(1)))
                    .min(to_republish.max(RETRY_MIN))
            } else {
                let w = retry;
                retry = (retry * 2).min(RETRY_MAX);
                // A retry never sleeps past the epoch edge or a republish period: with
                // short epochs the doubling would otherwise overshoot the next document's
                // vote and leave the node without a current one.
                let to_edge = schedule.end_of(current).saturating_sub(unix_now());
                w.min(Duration::from_secs(to_edge.max(1)))
                    .min(republish.max(RETRY_MIN))
            };
            if !self.sleep(wait).await {
                return;
            }
        }
    }
}

//! `shoal demo`: a whole mix network on loopback, from scratch, in a temp dir.
//!
//! One authority, 3 layers × 2 relays and 2 gateways run as real `shoal` processes
//! (bench's testnet). The clients are in-process drivers, each with its own QUIC
//! endpoint, account key and redb store, connected to their gateway over real links.
//! Every client sends messages to a client on the other gateway; the demo waits for
//! them and reports delivery, duplicates, latency against the configured mixing delay,
//! and cover vs real packets.
//!
//! `--loss PCT` discards that share of every client's outbound Sphinx frames and of the
//! mailbox items it pulls, inside the client driver (QUIC would hide real link loss):
//! retransmission and redelivery have to make up for it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use ed25519_dalek::SigningKey;
use serde::Serialize;
use shoal_bench::standin::wait_for_topology;
use shoal_bench::testnet::{GatewayOptions, Testnet, TestnetConfig, shoal_binary};
use shoal_client::driver::{self, ClientHandle, DriverConfig, DriverEvent};
use shoal_client::{ClientStore, ContactCard, Identity};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
    /// Clients on each of the two gateways.
    #[arg(long, default_value_t = 3)]
    clients_per_gateway: usize,
    /// Messages each client sends (to a client on the other gateway).
    #[arg(long, default_value_t = 4)]
    messages: usize,
    /// Mean per-hop mixing delay, milliseconds.
    #[arg(long, default_value_t = 20.0)]
    mean_hop_delay_ms: f64,
    /// Client payload rate λP per second (λL and λD are a fifth of it each).
    #[arg(long, default_value_t = 10.0)]
    lambda_p: f64,
    /// Emulated loss, percent, on client↔gateway frames (see the module docs).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Give up waiting for delivery after this many seconds.
    #[arg(long, default_value_t = 40)]
    timeout_secs: u64,
    /// Keep the network's directory (logs, configs) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

/// Hops on a forward route, each with its own Exp(μ) delay: entry gateway, 3 layers,
/// exit gateway.
const ROUTE_HOPS: f64 = shoal_packet::ROUTE_HOPS as f64;
/// Mailbox pull interval of the demo's clients.
const PULL_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Serialize)]
struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct Packets {
    /// λP slots that carried a real fragment (first sends and retransmissions).
    real: u64,
    retransmissions: u64,
    /// λP slots with nothing queued (sent as loops).
    payload_cover: u64,
    loops: u64,
    drops: u64,
    /// All cover: payload_cover + loops + drops.
    cover: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    sent: usize,
    delivered: usize,
    lost: usize,
    duplicates: usize,
    /// Messages that reached a client they were not sent to (should never happen).
    misdelivered: usize,
    /// Messages whose sender saw the SURB-ack (durable in the recipient's mailbox).
    acked: usize,
    latency_ms: Latency,
    /// Mean of the sum of the forward route's sampled delays: 5 hops × mean.
    expected_mixing_delay_ms: f64,
    /// Mean wait for a λP slot (a client queues its messages at once, so the k-th waits
    /// k slots of 1/λP) plus half the pull interval: the rest of the expected latency.
    expected_queueing_ms: f64,
    real_packets: u64,
    cover_packets: u64,
    packets: Packets,
    loops_returned: u64,
    loops_lost: u64,
    clients: usize,
    relays: usize,
    gateways: usize,
    loss_percent: f64,
    elapsed_secs: f64,
}

struct DemoClient {
    gateway: usize,
    card: ContactCard,
    handle: ClientHandle,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !(0.0..50.0).contains(&args.loss) {
        bail!("--loss must be a percentage in [0, 50)");
    }
    if args.clients_per_gateway == 0 || args.messages == 0 {
        bail!("--clients-per-gateway and --messages must be positive");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("shoal-demo")
        .build()
        .context("cannot start the async runtime")?;
    let tmp = tempfile_dir()?;
    let result = runtime.block_on(demo(&args, &tmp));
    if args.keep {
        eprintln!("network directory kept: {}", tmp.display());
    } else {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let mut id = [0u8; 6];
    rand::RngExt::fill(&mut rand::rng(), &mut id);
    let dir = std::env::temp_dir().join(format!("shoal-demo-{}", hex::encode(id)));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn say(args: &DemoArgs, what: &str) {
    if !args.json {
        eprintln!("· {what}");
    }
}

async fn demo(args: &DemoArgs, dir: &Path) -> anyhow::Result<Report> {
    let started = Instant::now();
    let shoal = shoal_binary()?;
    let lambda_p = args.lambda_p;
    let cfg = TestnetConfig {
        relays_per_layer: 2,
        mean_hop_delay_ms: args.mean_hop_delay_ms,
        max_hop_delay_ms: (args.mean_hop_delay_ms * 20.0).max(100.0),
        lambda_m: 1.0,
        bootstrap_secs: 3,
        epoch_secs: 3600,
        workers: Some(1),
        client_rates: Some([lambda_p, lambda_p / 5.0, lambda_p / 5.0]),
        ..TestnetConfig::default()
    };
    say(args, "starting 1 authority and 6 relays (real processes)");
    // Processes spawned from here on are killed when `net` is dropped, also on error.
    let mut net = Testnet::start(&shoal, &dir.join("net"), &cfg)?;

    // Gateways and their accounts must be set up before the authority's bootstrap
    // delay ends, so that the first document lists them.
    say(args, "setting up 2 gateways and their client accounts");
    let mut clients_setup = Vec::new();
    let mut inits = Vec::new();
    for g in 0..2 {
        let init = net.init_gateway(&shoal, g, &GatewayOptions::default())?;
        for c in 0..args.clients_per_gateway {
            let mut rng = rand::rng();
            let account = SigningKey::generate(&mut rng);
            let identity = Identity::generate(&mut rng, init.id);
            Testnet::add_account(
                &shoal,
                &init,
                &account.verifying_key().to_bytes(),
                &identity.mailbox,
            )?;
            clients_setup.push((g, c, account, identity));
        }
        inits.push(init);
    }
    for init in inits.clone() {
        net.run_gateway(&shoal, init)?;
    }

    let mut expect = net.relay_ids();
    expect.extend(inits.iter().map(|g| g.id));
    say(args, "waiting for the first directory document");
    let topology = wait_for_topology(
        net.authority_addr,
        &net.authorities,
        &expect,
        Duration::from_secs(30),
    )
    .await
    .with_context(|| format!("authority log:\n{}", net.log_tail("authority")))?;
    let params = topology.params().clone();

    say(
        args,
        "starting clients (in-process, real QUIC links to their gateways)",
    );
    let mut clients = Vec::new();
    for (g, c, account, identity) in clients_setup {
        let init = &inits[g];
        let mut config = DriverConfig::new(init.client_addr, init.id, net.authorities.clone());
        config.pull_interval = PULL_INTERVAL;
        config.directory_refresh = Duration::from_secs(60);
        config.reconnect_min = Duration::from_millis(100);
        config.reconnect_max = Duration::from_secs(2);
        config.emulated_loss = args.loss / 100.0;
        // Loopback: the margin over the sampled delays covers link, fsync and pull.
        config.client.retransmit.margin = Duration::from_millis(1500);
        config.client.loop_margin = Duration::from_secs(3);
        let cdir = dir.join(format!("client-{g}-{c}"));
        std::fs::create_dir_all(&cdir)?;
        let store = Arc::new(ClientStore::open(cdir.join("client.redb"))?);
        store.save_identity(&identity)?;
        store.save_account_key(&account.to_bytes())?;
        let name = format!("{}{}", ["ana", "bo"][g], c);
        let handle = driver::spawn(config, identity, &account, store)?;
        let card = ContactCard::new(name, handle.contact()).map_err(|e| anyhow::anyhow!("{e}"))?;
        clients.push(DemoClient {
            gateway: g,
            card,
            handle,
        });
    }
    for (i, c) in clients.iter().enumerate() {
        if !c.handle.wait_for_directory(Duration::from_secs(20)).await {
            bail!(
                "client {i} got no directory from its gateway; gateway log:\n{}",
                net.log_tail(&format!("gateway{}", c.gateway))
            );
        }
    }

    // Contact exchange goes through the pasteable text form.
    let per = args.clients_per_gateway;
    let mut receivers = Vec::new();
    for c in &clients {
        receivers.push(c.handle.subscribe());
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, DriverEvent, Instant)>();
    for (i, mut events) in receivers.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(e) => {
                        if tx.send((i, e, Instant::now())).is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        });
    }
    drop(tx);

    say(
        args,
        &format!(
            "sending {} messages across gateways (λP = {lambda_p}/s, mean hop delay {} ms)",
            clients.len() * args.messages,
            params.mean_hop_delay_ms
        ),
    );
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let mut expected_to: HashMap<String, usize> = HashMap::new();
    let mut message_ids: HashMap<[u8; 16], String> = HashMap::new();
    for (i, c) in clients.iter().enumerate() {
        let other = if c.gateway == 0 {
            per + i % per
        } else {
            i % per
        };
        let text = clients[other].card.to_text();
        let card = ContactCard::parse(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
        for m in 0..args.messages {
            let body = format!("hello #{m} from {} to {}", c.card.name, card.name);
            let id = c
                .handle
                .send(card.contact, body.clone().into_bytes())
                .await?;
            sent_at.insert(body.clone(), Instant::now());
            expected_to.insert(body.clone(), other);
            message_ids.insert(id, body);
        }
    }

    let sent = sent_at.len();
    let mut delivered: HashMap<String, Instant> = HashMap::new();
    let mut duplicates = 0usize;
    let mut misdelivered = 0usize;
    let mut acked = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    while delivered.len() < sent || acked < sent {
        let next = tokio::time::timeout_at(deadline, rx.recv()).await;
        let Ok(Some((i, event, at))) = next else {
            break;
        };
        match event {
            DriverEvent::Message { bytes, .. } => {
                let body = String::from_utf8_lossy(&bytes).into_owned();
                if expected_to.get(&body) != Some(&i) {
                    misdelivered += 1;
                    continue;
                }
                if delivered.insert(body, at).is_some() {
                    duplicates += 1;
                }
            }
            DriverEvent::Acked { message_id } if message_ids.contains_key(&message_id) => {
                acked += 1;
            }
            _ => {}
        }
    }
    // A short grace period to catch late duplicates.
    let grace = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some((_, event, _))) = tokio::time::timeout_at(grace, rx.recv()).await {
        if let DriverEvent::Message { bytes, .. } = event
            && delivered.contains_key(String::from_utf8_lossy(&bytes).as_ref())
        {
            duplicates += 1;
        }
    }

    let mut latencies: Vec<f64> = delivered
        .iter()
        .filter_map(|(body, at)| {
            sent_at
                .get(body)
                .map(|s| at.saturating_duration_since(*s).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let idx = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1;
        (latencies[idx] * 10.0).round() / 10.0
    };

    let mut packets = Packets {
        real: 0,
        retransmissions: 0,
        payload_cover: 0,
        loops: 0,
        drops: 0,
        cover: 0,
    };
    let (mut loops_returned, mut loops_lost) = (0, 0);
    for c in &clients {
        let s = c.handle.stats().core;
        packets.real += s.real_sent;
        packets.retransmissions += s.retransmissions;
        packets.payload_cover += s.payload_cover_sent;
        packets.loops += s.loops_sent;
        packets.drops += s.drops_sent;
        loops_returned += s.loops_returned;
        loops_lost += s.loops_lost;
    }
    packets.cover = packets.payload_cover + packets.loops + packets.drops;
    let n_clients = clients.len();
    for c in clients {
        c.handle.shutdown().await;
    }
    let dead: Vec<String> = net
        .gateways
        .iter_mut()
        .filter_map(|g| (!g.proc.alive()).then(|| g.init.name.clone()))
        .collect();
    if let Some(name) = dead.first() {
        bail!("{name} died; log:\n{}", net.log_tail(name));
    }
    let report = Report {
        sent,
        delivered: delivered.len(),
        lost: sent - delivered.len(),
        duplicates,
        misdelivered,
        acked,
        latency_ms: Latency {
            p50: pct(0.50),
            p99: pct(0.99),
            max: pct(1.0),
        },
        expected_mixing_delay_ms: ROUTE_HOPS * params.mean_hop_delay_ms,
        // The k-th of a client's n queued messages waits k λP slots: (n + 1) / 2 on average.
        expected_queueing_ms: (args.messages as f64 + 1.0) / 2.0 * 1000.0
            / params.lambda_p.max(f64::MIN_POSITIVE)
            + PULL_INTERVAL.as_secs_f64() * 500.0,
        real_packets: packets.real,
        cover_packets: packets.cover,
        packets,
        loops_returned,
        loops_lost,
        clients: n_clients,
        relays: net.relays.len(),
        gateways: net.gateways.len(),
        loss_percent: args.loss,
        elapsed_secs: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    };
    drop(net);
    Ok(report)
}

fn print_summary(r: &Report) {
    println!(
        "Shoal demo: {} relays in 3 layers, {} gateways, {} clients, on loopback",
        r.relays, r.gateways, r.clients
    );
    if r.loss_percent > 0.0 {
        println!(
            "  emulated loss        {}% of client↔gateway frames",
            r.loss_percent
        );
    }
    println!("  messages sent        {}", r.sent);
    println!(
        "  delivered            {}  (acked to senders: {})",
        r.delivered, r.acked
    );
    println!("  lost                 {}", r.lost);
    println!("  duplicates           {}", r.duplicates);
    println!(
        "  latency              p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (send call → message stored at the recipient)",
        r.latency_ms.p50, r.latency_ms.p99, r.latency_ms.max
    );
    println!(
        "  expected             {:.0} ms mixing (5 hops × mean) + {:.0} ms waiting for λP slots and a pull",
        r.expected_mixing_delay_ms, r.expected_queueing_ms
    );
    println!(
        "  packets from clients {} real ({} retransmissions), {} cover ({} λP cover loops, {} λL loops, {} λD drops)",
        r.packets.real,
        r.packets.retransmissions,
        r.cover_packets,
        r.packets.payload_cover,
        r.packets.loops,
        r.packets.drops
    );
    println!(
        "  loops                {} returned, {} lost",
        r.loops_returned, r.loops_lost
    );
    println!("  took                 {:.1} s", r.elapsed_secs);
    if r.misdelivered > 0 {
        println!("  MISDELIVERED         {}", r.misdelivered);
    }
    if r.lost == 0 && r.duplicates == 0 && r.misdelivered == 0 {
        println!("every message arrived exactly once.");
    }
}

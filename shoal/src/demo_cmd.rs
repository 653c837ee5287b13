//! `shoal demo`: a whole mix network on loopback, from scratch, in a temp dir.
//!
//! One authority, 3 layers × 2 relays and 2 gateways run as real `shoal` processes
//! (bench's testnet). The clients are in-process drivers, each with its own QUIC
//! endpoint, account key and redb store, connected to their gateway over real links.
//! Every client sends messages to a client on the other gateway; the demo waits for
//! them and reports delivery, duplicates, latency against the configured mixing delay,
//! and cover vs real packets.
//!
//! Then the managed story (issue 4) on the same network: three subnets A, B and C, each
//! with its own admin key and policy; A and B federate, C federates with nobody. Both
//! gateways host all three subnets, and each member sits at the gateway its account key
//! picks (`shoal_topology::gateway_for_member`), so subnets share gateways (the hidden
//! `--legacy-leaks` control puts A on gateway 0 and B, C on gateway 1, as before).
//! Members are managed clients (the messenger on top of the client driver):
//! - one MLS group spans A and B; every member sends one message to it, and every other
//!   member must receive it;
//! - a member of C tries to message a member of A: its own client refuses (the error
//!   names the rule); a modified client sends anyway, and A's client drops and counts it;
//! - A's admin de-provisions one of A's group members: one signed command to the
//!   gateway through the mixnet (sent by the admin's own client to the gateway's admin
//!   endpoint, answered the same way, as `shoal admin` does), and the new
//!   policy version with the revocation, sent to A's members through the mixnet as
//!   ordinary messages. `deprovision_removal_ms` runs from the admin action until every
//!   remaining member has applied the commit that removes the revoked member.
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
use shoal_bench::testnet::{GatewayOptions, Testnet, TestnetConfig, assign_gateway, shoal_binary};
use shoal_client::driver::{self, ClientHandle, DriverConfig, DriverEvent};
use shoal_client::group::{GroupConfig, GroupEvent};
use shoal_client::managed::{self, ManagedHandle};
use shoal_client::messenger::{Messenger, MessengerConfig, MessengerEvent, policy_deliveries};
use shoal_client::{ClientStore, ContactCard, Identity};
use shoal_subnet::{
    AccountAction, AdminRequest, BurnOnRead, CommandBody, CredentialBody, Federation, MemberCard,
    MessageOptions, Policy, PolicyBody, ReplyTo, RoleRule, SignedAnswer, SignedPolicy, SubnetAdmin,
    SubnetId,
};
use shoal_topology::{Hex32, NodeId};

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
    /// How long group members collect concurrent commits before applying the lowest
    /// hash; must exceed the spread of commit delivery times.
    #[arg(long, default_value_t = 1500)]
    commit_settle_ms: u64,
    /// Test-only control: gateways by subnet and the pre-fix cover routing, which leak
    /// membership and who sends to which gateway (`TestnetConfig::legacy_leaks`).
    #[arg(long, hide = true)]
    legacy_leaks: bool,
}

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
    /// λP slots with nothing queued for their drawn gateway (sent as cover to its drop
    /// mailbox).
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
    /// Mean of the sum of the delays a packet is held for: 4 hops × mean (the exit
    /// gateway stores on arrival).
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
    /// Subnets (organisations) in the managed part: A, B federated; C not.
    subnets: usize,
    /// MLS groups formed (one spanning A and B).
    groups: usize,
    /// Policy refusals: sends refused by the sender's own client plus messages dropped
    /// (and counted) by recipients' clients.
    policy_refusals: u64,
    /// From the admin's de-provisioning action until every remaining group member has
    /// applied the commit removing the revoked member.
    deprovision_removal_ms: f64,
    managed_settle_ms: u64,
    managed: ManagedReport,
    elapsed_secs: f64,
}

#[derive(Debug, Serialize)]
struct ManagedReport {
    /// Managed clients: group members, the member of C and A's admin client.
    clients: usize,
    group_members: usize,
    group_messages_sent: usize,
    /// Each group message counted once per other member that received it.
    group_deliveries: usize,
    group_deliveries_expected: usize,
    /// Time from group creation until every invitee has joined by Welcome.
    group_formation_ms: f64,
    /// Refused by the sending client's own policy (C → A).
    sender_refusals: u64,
    /// Dropped and counted by the recipient's client (a modified C client → A).
    recipient_policy_drops: u64,
    /// The error the member of C saw.
    sender_refusal_error: String,
    /// How the de-provisioning command reached the gateway.
    deprovision_path: &'static str,
    /// Members (besides the revoked one) that applied its removal.
    removal_seen_by: usize,
    /// Members the revoked member was removed from the view of, expected.
    removal_expected: usize,
    /// MLS commits applied and lost to concurrent commits, over all members.
    commits_applied: u64,
    commits_lost: u64,
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
        bootstrap_secs: 5,
        epoch_secs: 3600,
        workers: Some(1),
        client_rates: Some([lambda_p, lambda_p / 5.0, lambda_p / 5.0]),
        legacy_leaks: args.legacy_leaks,
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
    let subnets = Subnets::new();
    let mut managed_setup = Vec::new();
    for (g, hosted) in HOSTED.iter().enumerate() {
        let init = net.init_gateway(&shoal, g, &GatewayOptions::default())?;
        // Every gateway hosts every subnet: members are spread over gateways by their
        // keys, not their organisation. (The control: gateway 0 hosts only A, 1 hosts B
        // and C.) Only hosted subnets' admins may command a gateway.
        let hosted: Vec<SubnetId> = if cfg.legacy_leaks {
            hosted.iter().map(|&i| subnets.id(i)).collect()
        } else {
            [A, B, C].iter().map(|&i| subnets.id(i)).collect()
        };
        set_hosted_subnets(&init.config, &hosted)?;
        inits.push(init);
    }
    let gateway_ids: Vec<NodeId> = inits.iter().map(|i| i.id).collect();
    for (m, spec) in MEMBERS.iter().enumerate() {
        let mut rng = rand::rng();
        let account = SigningKey::generate(&mut rng);
        let mut spec = *spec;
        spec.gateway = assign_gateway(
            cfg.legacy_leaks,
            &gateway_ids,
            &account.verifying_key().to_bytes(),
            spec.gateway,
        );
        let init = &inits[spec.gateway];
        let identity = Identity::generate(&mut rng, init.id);
        if spec.subnet == ADMIN {
            // The admin's own client is an ordinary account, outside any subnet.
            Testnet::add_account(
                &shoal,
                init,
                &account.verifying_key().to_bytes(),
                &identity.mailbox,
            )?;
        }
        managed_setup.push((m, spec, account, identity));
    }
    // Plain clients are placed per gateway: the demo measures delivery across gateways.
    for (g, init) in inits.iter().enumerate() {
        for c in 0..args.clients_per_gateway {
            let mut rng = rand::rng();
            let account = SigningKey::generate(&mut rng);
            let identity = Identity::generate(&mut rng, init.id);
            Testnet::add_account(
                &shoal,
                init,
                &account.verifying_key().to_bytes(),
                &identity.mailbox,
            )?;
            clients_setup.push((g, c, account, identity));
        }
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
        let config = client_config(args, init, &net);
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
    // The admin's own client starts first: members' accounts are created by their
    // subnet's admin, a signed command it carries through the mixnet to the gateway.
    let mut managed = Vec::new();
    let (admins, members): (Vec<_>, Vec<_>) =
        managed_setup.into_iter().partition(|s| s.1.subnet == ADMIN);
    for (m, spec, account, identity) in admins.into_iter().chain(members) {
        let init = &inits[spec.gateway];
        let mut config = client_config(args, init, &net);
        let cdir = dir.join(format!("member-{}", spec.name));
        std::fs::create_dir_all(&cdir)?;
        let store = Arc::new(ClientStore::open(cdir.join("client.redb"))?);
        store.save_identity(&identity)?;
        store.save_account_key(&account.to_bytes())?;
        // Plain clients keep the default; the admin's client only sends commands and policy.
        config.client.retransmit.max_timeout = Duration::from_secs(5);
        let member = if spec.subnet == ADMIN {
            None
        } else {
            let via = managed
                .first()
                .map(ManagedClient::client)
                .context("no admin client")?;
            subnets
                .command(
                    spec.subnet,
                    init,
                    AccountAction::CreateAccount {
                        account: Hex32(account.verifying_key().to_bytes()),
                        mailbox: Hex32(identity.mailbox),
                        quota: MEMBER_QUOTA,
                    },
                    via,
                )
                .await
                .with_context(|| format!("creating the account of {}", spec.name))?;
            Some(subnets.messenger(&spec, &identity, args.commit_settle_ms)?)
        };
        let handle = driver::spawn(config, identity, &account, store.clone())?;
        if spec.subnet == ADMIN && !handle.wait_for_directory(Duration::from_secs(20)).await {
            bail!("the admin's client got no directory from its gateway");
        }
        let account_pub = account.verifying_key().to_bytes();
        managed.push(ManagedClient::new(
            m,
            spec,
            handle,
            member,
            store,
            account_pub,
        )?);
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
    // The 1:1 part's clients stop first so the managed part runs on a quieter network.
    for c in &managed {
        if !c.client().wait_for_directory(Duration::from_secs(20)).await {
            bail!("managed client {} got no directory", c.spec.name);
        }
    }
    let story = managed_story(args, &inits, &subnets, &mut managed).await?;
    for c in managed {
        c.shutdown().await;
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
        expected_mixing_delay_ms: shoal_bench::e2e::HOLDING_HOPS * params.mean_hop_delay_ms,
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
        subnets: 3,
        groups: story.groups,
        policy_refusals: story.report.sender_refusals + story.report.recipient_policy_drops,
        deprovision_removal_ms: story.deprovision_removal_ms,
        managed_settle_ms: args.commit_settle_ms,
        managed: story.report,
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
        "  expected             {:.0} ms mixing (4 holding hops × mean) + {:.0} ms waiting for λP slots and a pull",
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
    let m = &r.managed;
    println!(
        "Managed: {} subnets (A and B federated, C not), {} MLS group of {} members across A and B",
        r.subnets, r.groups, m.group_members
    );
    println!(
        "  group messages       {} sent, {} of {} deliveries (every other member)",
        m.group_messages_sent, m.group_deliveries, m.group_deliveries_expected
    );
    println!(
        "  group formation      {:.0} ms (create, one commit adding 4, Welcomes after the {} ms settle window)",
        m.group_formation_ms, r.managed_settle_ms
    );
    println!(
        "  policy refusals      {}: cy (C) → ana (A) refused by cy's own client ({}); {} dropped and counted at the recipient from a modified client",
        r.policy_refusals, m.sender_refusal_error, m.recipient_policy_drops
    );
    println!(
        "  de-provisioning      ax removed from the group at {} of {} remaining members {:.0} ms after the admin action",
        m.removal_seen_by, m.removal_expected, r.deprovision_removal_ms
    );
    println!(
        "                       ({}, then policy v2 with the revocation through the mixnet)",
        m.deprovision_path
    );
    println!(
        "  MLS commits          {} applied, {} lost to a concurrent commit (ranked by author)",
        m.commits_applied, m.commits_lost
    );
    println!("  took                 {:.1} s", r.elapsed_secs);
    if r.misdelivered > 0 {
        println!("  MISDELIVERED         {}", r.misdelivered);
    }
    if r.lost == 0 && r.duplicates == 0 && r.misdelivered == 0 {
        println!("every message arrived exactly once.");
    }
    if m.group_deliveries == m.group_deliveries_expected && m.removal_seen_by == m.removal_expected
    {
        println!("every group message arrived; the de-provisioned member is out of the group.");
    }
}

// ---- The managed story (subnets, groups, policy, de-provisioning) ----

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
/// Marks the client A's admin uses to publish policy through the mixnet.
const ADMIN: usize = usize::MAX;

#[derive(Debug, Clone, Copy)]
struct MemberSpec {
    name: &'static str,
    subnet: usize,
    /// In `MEMBERS`, the gateway of the member's subnet (used only by the `legacy_leaks`
    /// control); at setup it becomes the gateway the member's key picks.
    gateway: usize,
}

const MEMBERS: [MemberSpec; 7] = [
    MemberSpec {
        name: "ana",
        subnet: A,
        gateway: 0,
    },
    MemberSpec {
        name: "al",
        subnet: A,
        gateway: 0,
    },
    MemberSpec {
        name: "ax",
        subnet: A,
        gateway: 0,
    },
    MemberSpec {
        name: "bo",
        subnet: B,
        gateway: 1,
    },
    MemberSpec {
        name: "bea",
        subnet: B,
        gateway: 1,
    },
    MemberSpec {
        name: "cy",
        subnet: C,
        gateway: 1,
    },
    MemberSpec {
        name: "admin-a",
        subnet: ADMIN,
        gateway: 0,
    },
];
/// Subnets each gateway hosted before gateways were shared (the `legacy_leaks` control).
const HOSTED: [&[usize]; 2] = [&[A], &[B, C]];
/// The group: created by the first, spanning A and B.
const GROUP: [&str; 5] = ["ana", "al", "ax", "bo", "bea"];
/// The member of A that is de-provisioned.
const REVOKED: &str = "ax";
const GROUP_OPTIONS: MessageOptions = MessageOptions {
    ttl_secs: 3600,
    burn_on_read: false,
};

/// Sets `subnets = [...]` in a gateway config (replacing the line `init` wrote, if any).
fn set_hosted_subnets(config: &Path, subnets: &[SubnetId]) -> anyhow::Result<()> {
    let list: Vec<String> = subnets
        .iter()
        .map(|s| format!("\"{}\"", hex::encode(s.0)))
        .collect();
    let line = format!("subnets = [{}]", list.join(", "));
    let text = std::fs::read_to_string(config)?;
    let mut out = String::new();
    let mut replaced = false;
    for l in text.lines() {
        if l.split('=').next().unwrap_or("").trim() == "subnets" && !replaced {
            out.push_str(&line);
            replaced = true;
        } else {
            out.push_str(l);
        }
        out.push('\n');
    }
    if !replaced {
        out = format!("{line}\n{out}");
    }
    std::fs::write(config, out)?;
    Ok(())
}

fn client_config(
    args: &DemoArgs,
    init: &shoal_bench::testnet::GatewayInit,
    net: &Testnet,
) -> DriverConfig {
    let mut config = DriverConfig::new(init.client_addr, init.id, net.authorities.clone());
    config.pull_interval = PULL_INTERVAL;
    config.directory_refresh = Duration::from_secs(60);
    config.reconnect_min = Duration::from_millis(100);
    config.reconnect_max = Duration::from_secs(2);
    config.emulated_loss = args.loss / 100.0;
    // Loopback: the margin over the sampled delays covers link, fsync and pull.
    config.client.retransmit.margin = Duration::from_millis(1500);
    config.client.loop_margin = Duration::from_secs(3);
    config.client.legacy_leaks = args.legacy_leaks;
    config
}

fn unix_secs() -> u64 {
    managed::unix_ms() / 1000
}

/// Mailbox items a member's account may hold.
const MEMBER_QUOTA: u32 = 10_000;

/// The three subnets' admin keys and first policies.
struct Subnets {
    keys: [SigningKey; 3],
    /// The last command sequence number used per (subnet, gateway).
    sequences: std::sync::Mutex<HashMap<(usize, [u8; 32]), u64>>,
}

impl Subnets {
    fn new() -> Self {
        let mut rng = rand::rng();
        Subnets {
            keys: std::array::from_fn(|_| SigningKey::generate(&mut rng)),
            sequences: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Signs `action` for `gateway` with the next sequence number and sends it through
    /// the mixnet from the admin's client `via` to the gateway's admin endpoint; returns
    /// once the gateway's signed answer says it is applied durably. (One client carries
    /// all three admins' commands here: a command's authority is its signature, not
    /// who carries it.) Commands to one gateway go one at a time, in sequence order.
    async fn command(
        &self,
        subnet: usize,
        gateway: &shoal_bench::testnet::GatewayInit,
        action: AccountAction,
        via: &ClientHandle,
    ) -> anyhow::Result<()> {
        let sequence = {
            let mut seqs = self.sequences.lock().unwrap_or_else(|e| e.into_inner());
            let s = seqs.entry((subnet, gateway.id)).or_insert(0);
            *s += 1;
            *s
        };
        let command = self.admin(subnet).issue_command(CommandBody {
            subnet: self.id(subnet),
            gateway: Hex32(gateway.id),
            sequence,
            expires_at: unix_secs() + 300,
            action,
        })?;
        let me = via.contact();
        let request = AdminRequest::new(
            &command,
            ReplyTo {
                mailbox: Hex32(me.mailbox),
                gateway: Hex32(me.gateway),
                seal_key: Hex32(me.public_key),
            },
        );
        // Subscribed before sending, so the answer cannot be missed.
        let mut events = via.subscribe();
        via.send(
            crate::admin_cmd::gateway_admin_contact(gateway.id)?,
            request.to_bytes(),
        )
        .await?;
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(DriverEvent::Message { bytes, .. }) if SignedAnswer::looks_like(&bytes) => {
                        let body = SignedAnswer::verify(&bytes, &Hex32(gateway.id))?;
                        if body.subnet != self.id(subnet) || body.sequence != sequence {
                            continue;
                        }
                        return match body.refusal {
                            None => Ok(()),
                            Some(cause) => bail!("the gateway refused ({cause}): {}", body.message),
                        };
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => bail!("the admin's client stopped"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .context("no answer from the gateway within 60 s")?
    }

    fn admin(&self, i: usize) -> SubnetAdmin {
        SubnetAdmin::new(self.keys[i].clone())
    }

    fn id(&self, i: usize) -> SubnetId {
        self.admin(i).subnet()
    }

    /// A and B federate (staff with staff); C federates with nobody.
    fn policy(&self, i: usize, version: u64, revoked: Vec<Hex32>) -> anyhow::Result<SignedPolicy> {
        let federated: &[usize] = match i {
            A => &[B],
            B => &[A],
            _ => &[],
        };
        let body = PolicyBody {
            subnet: self.id(i),
            version,
            issued_at: unix_secs(),
            roles: vec!["staff".into()],
            rules: vec![RoleRule {
                from: "staff".into(),
                to: "staff".into(),
            }],
            federation: federated
                .iter()
                .map(|&f| Federation {
                    subnet: self.id(f),
                    local_roles: vec!["staff".into()],
                    remote_roles: vec!["staff".into()],
                })
                .collect(),
            ttl_min_secs: 60,
            ttl_max_secs: 7 * 86_400,
            burn_on_read: BurnOnRead::Allowed,
            revoked_keys: revoked,
            revoked_handles: vec![],
        };
        Ok(self.admin(i).issue_policy(body)?)
    }

    /// A member's messenger: a fresh signing key, a credential its admin signs, and
    /// its subnet's first policy.
    fn messenger(
        &self,
        spec: &MemberSpec,
        identity: &Identity,
        settle_ms: u64,
    ) -> anyhow::Result<Messenger> {
        let signing = SigningKey::generate(&mut rand::rng());
        let now = unix_secs();
        let cred = self.admin(spec.subnet).issue_credential(CredentialBody {
            subnet: self.id(spec.subnet),
            handle: spec.name.into(),
            role: "staff".into(),
            signing_key: Hex32(signing.verifying_key().to_bytes()),
            seal_key: Hex32(identity.public_key().to_bytes()),
            mailbox: Hex32(identity.mailbox),
            gateway: Hex32(identity.gateway),
            not_before: now.saturating_sub(60),
            not_after: now + 86_400,
        })?;
        let policy = Policy::verify(
            &self.policy(spec.subnet, 1, vec![])?.to_bytes(),
            &self.id(spec.subnet),
        )?;
        let config = MessengerConfig {
            groups: GroupConfig {
                commit_settle_ms: settle_ms,
            },
            ..MessengerConfig::default()
        };
        Ok(Messenger::new(
            signing.to_bytes(),
            identity.contact(),
            &cred,
            policy,
            config,
            managed::unix_ms(),
        )?)
    }
}

enum ManagedKind {
    Member(ManagedHandle),
    Admin(ClientHandle),
}

struct ManagedClient {
    spec: MemberSpec,
    account: [u8; 32],
    kind: ManagedKind,
}

impl ManagedClient {
    fn new(
        _index: usize,
        spec: MemberSpec,
        handle: ClientHandle,
        member: Option<Messenger>,
        store: Arc<ClientStore>,
        account: [u8; 32],
    ) -> anyhow::Result<Self> {
        let kind = match member {
            Some(m) => ManagedKind::Member(managed::spawn(handle, m, store)?),
            None => ManagedKind::Admin(handle),
        };
        Ok(ManagedClient {
            spec,
            account,
            kind,
        })
    }

    fn client(&self) -> &ClientHandle {
        match &self.kind {
            ManagedKind::Member(m) => m.client(),
            ManagedKind::Admin(c) => c,
        }
    }

    fn member(&self) -> anyhow::Result<&ManagedHandle> {
        match &self.kind {
            ManagedKind::Member(m) => Ok(m),
            ManagedKind::Admin(_) => bail!("{} is not a member", self.spec.name),
        }
    }

    async fn shutdown(self) {
        match self.kind {
            ManagedKind::Member(m) => m.shutdown().await,
            ManagedKind::Admin(c) => c.shutdown().await,
        }
    }
}

struct Story {
    groups: usize,
    deprovision_removal_ms: f64,
    report: ManagedReport,
}

/// What the members reported, gathered from their event streams.
#[derive(Default)]
struct Tally {
    joined: std::collections::HashSet<usize>,
    /// (receiver, body) of group messages.
    deliveries: std::collections::HashSet<(usize, String)>,
    policy_drops: HashMap<usize, u64>,
    /// Members that applied the removal of the revoked member.
    removal_seen: std::collections::HashSet<usize>,
}

impl Tally {
    fn absorb(&mut self, i: usize, event: MessengerEvent) {
        match event {
            MessengerEvent::Message {
                group: Some(_),
                body,
                ..
            } => {
                self.deliveries
                    .insert((i, String::from_utf8_lossy(&body).into_owned()));
            }
            MessengerEvent::PolicyDrop { .. } => *self.policy_drops.entry(i).or_default() += 1,
            MessengerEvent::Group(GroupEvent::Joined { .. }) => {
                self.joined.insert(i);
            }
            MessengerEvent::Group(GroupEvent::MemberRemoved { member, .. })
                if member.credential.handle() == REVOKED =>
            {
                self.removal_seen.insert(i);
            }
            _ => {}
        }
    }
}

/// Feeds events into `tally` until `done` holds or `timeout` passes.
async fn wait_until(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(usize, MessengerEvent)>,
    tally: &mut Tally,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Tally) -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(tally) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((i, e))) => tally.absorb(i, e),
            Ok(None) => bail!("member event streams ended while waiting for {what}"),
            Err(_) => bail!("timed out waiting for {what}"),
        }
    }
    Ok(())
}

async fn managed_story(
    args: &DemoArgs,
    inits: &[shoal_bench::testnet::GatewayInit],
    subnets: &Subnets,
    managed: &mut [ManagedClient],
) -> anyhow::Result<Story> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, MessengerEvent)>();
    for (i, c) in managed.iter().enumerate() {
        let Ok(m) = c.member() else { continue };
        let mut events = m.subscribe();
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(e) => {
                        if tx.send((i, e)).is_err() {
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
    let mut tally = Tally::default();
    let result = story_steps(args, inits, subnets, managed, &mut rx, &mut tally, timeout).await;
    if result.is_err() {
        for c in managed.iter() {
            let core = c.client().stats();
            let extra = c
                .member()
                .map(|m| format!("{:?}", m.stats()))
                .unwrap_or_default();
            eprintln!("  {}: {:?} {extra}", c.spec.name, core);
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn story_steps(
    args: &DemoArgs,
    inits: &[shoal_bench::testnet::GatewayInit],
    subnets: &Subnets,
    managed: &mut [ManagedClient],
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(usize, MessengerEvent)>,
    tally: &mut Tally,
    timeout: Duration,
) -> anyhow::Result<Story> {
    let find = |name: &str| -> anyhow::Result<usize> {
        managed
            .iter()
            .position(|c| c.spec.name == name)
            .with_context(|| format!("no managed client {name}"))
    };
    let group_idx: Vec<usize> = GROUP
        .iter()
        .map(|n| find(n))
        .collect::<anyhow::Result<_>>()?;
    let creator = managed[group_idx[0]].member()?;

    say(
        args,
        "managed: subnets A and B federate, C does not; forming one MLS group of ana, al, ax (A) and bo, bea (B)",
    );
    let formed = Instant::now();
    let group = creator.with(|m, now| m.create_group(now)).await??;
    let mut invites = Vec::new();
    for &i in &group_idx[1..] {
        invites.push(managed[i].member()?.with(|m, _| m.invite()).await??);
    }
    let g = group.clone();
    creator
        .with(move |m, now| m.add_members(&g, &invites, now))
        .await??;
    let invitees: Vec<usize> = group_idx[1..].to_vec();
    wait_until(rx, tally, timeout, "every invitee to join the group", |t| {
        invitees.iter().all(|i| t.joined.contains(i))
    })
    .await?;
    let group_formation_ms = ms(formed.elapsed());

    say(
        args,
        "managed: every group member sends one message to the group",
    );
    let mut expected = Vec::new();
    for &i in &group_idx {
        let body = format!("group hello from {}", managed[i].spec.name);
        for &j in &group_idx {
            if j != i {
                expected.push((j, body.clone()));
            }
        }
        let g = group.clone();
        managed[i]
            .member()?
            .with(move |m, now| m.send_group(&g, GROUP_OPTIONS, body.as_bytes(), now))
            .await??;
    }
    let exp = expected.clone();
    wait_until(rx, tally, timeout, "group messages at every member", |t| {
        exp.iter().all(|d| t.deliveries.contains(d))
    })
    .await?;

    say(
        args,
        "managed: cy (subnet C) tries to message ana (subnet A)",
    );
    let (ana, cy) = (find("ana")?, find("cy")?);
    let ana_cred: MemberCard = managed[ana].member()?.with(|m, _| m.card().clone()).await?;
    let to = ana_cred.clone();
    let refused = managed[cy]
        .member()?
        .with(move |m, now| m.send_direct(&to, GROUP_OPTIONS, b"hello from C", now))
        .await?;
    let sender_refusal_error = match refused {
        Err(e) => e.to_string(),
        Ok(_) => bail!("cy's client sent to a subnet its policy does not federate"),
    };
    // A modified client skips its own check; ana's client must still refuse it.
    managed[cy]
        .member()?
        .with(move |m, now| {
            m.dangerously_send_direct_ignoring_policy(
                &ana_cred,
                GROUP_OPTIONS,
                b"hello from a modified C client",
                now,
            )
        })
        .await?;
    wait_until(
        rx,
        tally,
        timeout,
        "ana's client to drop cy's message",
        |t| t.policy_drops.get(&ana).copied().unwrap_or(0) >= 1,
    )
    .await?;

    say(
        args,
        "managed: A's admin de-provisions ax (one signed command to the gateway, policy v2 through the mixnet)",
    );
    let revoked = find(REVOKED)?;
    let revoked_key = managed[revoked]
        .member()?
        .with(|m, _| m.credential().signing_key())
        .await?;
    let started = Instant::now();
    let gw = &inits[managed[revoked].spec.gateway];
    let admin_client = managed[find("admin-a")?].client();
    subnets
        .command(
            A,
            gw,
            AccountAction::Deprovision {
                account: Hex32(managed[revoked].account),
            },
            admin_client,
        )
        .await
        .context("de-provisioning command")?;
    let policy = subnets.policy(A, 2, vec![Hex32(revoked_key)])?;
    let policy = Policy::verify(&policy.to_bytes(), &subnets.id(A))?;
    // The gateway is told what it enforces (TTL bound, the revoked account's link key),
    // never the members' policy or the revoked identity key.
    subnets
        .command(
            A,
            gw,
            AccountAction::publish_policy(&policy, vec![Hex32(managed[revoked].account)]),
            admin_client,
        )
        .await
        .context("publishing policy v2 to the gateway")?;
    // To members the way `shoal admin` does it: from the admin's records (each
    // member's credential), to every member the policy does not revoke, sent by the
    // admin's own client as ordinary messages (`policy_deliveries`).
    let mut records = Vec::new();
    for c in managed.iter().filter(|c| c.spec.subnet == A) {
        records.push(c.member()?.with(|m, _| m.credential().clone()).await?);
    }
    let (deliveries, unreachable) = policy_deliveries(&policy, records.iter());
    if !unreachable.is_empty() {
        bail!("members without a seal key in their credential: {unreachable:?}");
    }
    for d in deliveries {
        admin_client.send(d.to, d.bytes).await?;
    }
    let remaining: Vec<usize> = group_idx
        .iter()
        .copied()
        .filter(|&i| i != revoked)
        .collect();
    let rem = remaining.clone();
    wait_until(
        rx,
        tally,
        timeout,
        "every remaining member to remove ax",
        |t| rem.iter().all(|i| t.removal_seen.contains(i)),
    )
    .await?;
    let deprovision_removal_ms = ms(started.elapsed());

    let (mut sender_refusals, mut recipient_policy_drops) = (0, 0);
    let (mut commits_applied, mut commits_lost) = (0, 0);
    for c in managed.iter() {
        if let Ok(m) = c.member() {
            let s = m.stats();
            sender_refusals += s.messenger.sends_refused;
            recipient_policy_drops += s.messenger.direct_policy_drops + s.groups.policy_drops;
            commits_applied += s.groups.commits_applied;
            commits_lost += s.groups.commits_lost;
        }
    }
    let group_deliveries = expected
        .iter()
        .filter(|d| tally.deliveries.contains(d))
        .count();
    Ok(Story {
        groups: 1,
        deprovision_removal_ms,
        report: ManagedReport {
            clients: managed.len(),
            group_members: group_idx.len(),
            group_messages_sent: group_idx.len(),
            group_deliveries,
            group_deliveries_expected: expected.len(),
            group_formation_ms,
            sender_refusals,
            recipient_policy_drops,
            sender_refusal_error,
            deprovision_path: "signed command through the mixnet, from the admin's client to the gateway's admin endpoint",
            removal_seen_by: remaining
                .iter()
                .filter(|i| tally.removal_seen.contains(i))
                .count(),
            removal_expected: remaining.len(),
            commits_applied,
            commits_lost,
        },
    })
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

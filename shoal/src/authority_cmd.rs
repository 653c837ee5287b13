//! `shoal authority ...`: set up and run a directory authority.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use ed25519_dalek::SigningKey;
use shoal_topology::EpochSchedule;

#[path = "authority_config.rs"]
mod authority_config;
#[path = "authority_server.rs"]
mod authority_server;

use authority_config::{Peer, Template};

const CONFIG_FILE: &str = "authority.toml";
const KEY_FILE: &str = "authority.key";

#[derive(Subcommand, Debug)]
pub enum AuthorityCommand {
    /// Write a commented DIR/authority.toml and a fresh Ed25519 key; print the public key.
    ///
    /// An existing key in DIR is kept, so running init again with the other
    /// authorities' keys (`--peer`, `--force`) rewrites only the config.
    Init {
        /// Directory for authority.toml and authority.key (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Address the HTTP API listens on; also this authority's address in the list.
        #[arg(long)]
        listen: SocketAddr,
        /// Another authority, as ADDR=HEXKEY. Repeat for each.
        #[arg(long = "peer", value_name = "ADDR=HEXKEY")]
        peers: Vec<String>,
        /// Signatures a document needs [default: a majority of all authorities].
        #[arg(long)]
        threshold: Option<usize>,
        /// Epoch length in seconds.
        #[arg(long, default_value_t = 3600)]
        epoch_secs: u64,
        /// Unix second at which epoch 0 starts; all authorities must agree on it.
        #[arg(long, default_value_t = 0)]
        genesis: u64,
        /// Overwrite an existing authority.toml.
        #[arg(long)]
        force: bool,
    },
    /// Run the authority: serve the API and sync with the other authorities.
    Run {
        /// Path of authority.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Manage the authority's signing key.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Admit or remove node operators (operators.toml beside authority.toml). A running
    /// authority picks the change up at its next sync round. Do the same at every
    /// authority: a node is in a document only if k of them admit its operator.
    #[command(subcommand)]
    Operator(OperatorAdminCommand),
    /// Show which nodes are in the current and next documents, and why any is left out.
    Status {
        /// The authority's HTTP API address.
        #[arg(long)]
        addr: SocketAddr,
        /// Print the two rosters as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the network file clients trust: every authority's address and key and the
    /// threshold, with its fingerprint. Publish it (and the fingerprint) for the
    /// network's users; `shoal client init --network FILE` reads it, and a subnet
    /// admin's invite cannot replace it.
    NetworkFile {
        /// Path of authority.toml.
        #[arg(long)]
        config: PathBuf,
        /// Where to write it (default: print it).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum OperatorAdminCommand {
    /// Admit the operator with public key KEY (as `shoal operator keygen` printed it).
    Admit {
        /// Path of authority.toml.
        #[arg(long)]
        config: PathBuf,
        /// The operator's public key, 64 hex digits.
        #[arg(long)]
        key: String,
        /// Who runs it, for people reading the file.
        #[arg(long)]
        name: String,
        /// Most nodes (relays and gateways) it may have in a document.
        #[arg(long, default_value_t = 4)]
        max_nodes: u32,
        /// Most of its relays in one mix layer.
        #[arg(long, default_value_t = 2)]
        max_per_layer: u32,
    },
    /// Remove an operator: its nodes leave the next document voted.
    Remove {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        key: String,
    },
    /// List the admitted operators.
    List {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Replace the signing key (after a suspected compromise, or on schedule) and this
    /// authority's entry in authority.toml; the old key is deleted. The authority must be
    /// stopped. Until the other authorities, relays, gateways and clients list the new
    /// key, its signatures do not count, so this is refused unless the other authorities
    /// alone reach the threshold.
    Rotate {
        /// Path of authority.toml.
        #[arg(long)]
        config: PathBuf,
        /// Rotate even though the other authorities cannot reach the threshold alone: no
        /// node or client accepts a new document until each of them lists the new key.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(cmd: AuthorityCommand) -> anyhow::Result<()> {
    match cmd {
        AuthorityCommand::Init {
            dir,
            listen,
            peers,
            threshold,
            epoch_secs,
            genesis,
            force,
        } => init(&dir, listen, &peers, threshold, epoch_secs, genesis, force),
        AuthorityCommand::Run { config } => {
            let cfg = authority_config::load(&config)?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?
                .block_on(authority_server::run(cfg))
        }
        AuthorityCommand::Keys(KeysCommand::Rotate { config, force }) => rotate(&config, force),
        AuthorityCommand::Status { addr, json } => status(addr, json),
        AuthorityCommand::NetworkFile { config, out } => network_file(&config, out.as_deref()),
        AuthorityCommand::Operator(cmd) => operator(cmd),
    }
}

fn operator(cmd: OperatorAdminCommand) -> anyhow::Result<()> {
    let config = match &cmd {
        OperatorAdminCommand::Admit { config, .. }
        | OperatorAdminCommand::Remove { config, .. }
        | OperatorAdminCommand::List { config } => config.clone(),
    };
    let path = config
        .parent()
        .unwrap_or(Path::new("."))
        .join(authority_config::OPERATORS_FILE);
    let admission = authority_config::load_operators(&path)?;
    let mut ops: Vec<shoal_topology::AdmittedOperator> = admission.operators().cloned().collect();
    match cmd {
        OperatorAdminCommand::Admit {
            key,
            name,
            max_nodes,
            max_per_layer,
            ..
        } => {
            let key = shoal_topology::Hex32(authority_config::parse_key(&key)?);
            ops.retain(|o| o.key != key);
            ops.push(shoal_topology::AdmittedOperator {
                key,
                name,
                max_nodes,
                max_per_layer,
            });
            let admission = shoal_topology::Admission::new(ops)?;
            authority_config::save_operators(&path, &admission)?;
            eprintln!(
                "admitted; {} now lists {} operators. Admit it at every other authority too.",
                path.display(),
                admission.len()
            );
        }
        OperatorAdminCommand::Remove { key, .. } => {
            let key = shoal_topology::Hex32(authority_config::parse_key(&key)?);
            let before = ops.len();
            ops.retain(|o| o.key != key);
            if ops.len() == before {
                bail!("that operator is not in {}", path.display());
            }
            authority_config::save_operators(&path, &shoal_topology::Admission::new(ops)?)?;
            eprintln!("removed; remove it at every other authority too");
        }
        OperatorAdminCommand::List { .. } => {
            if ops.is_empty() {
                println!("no operators admitted ({})", path.display());
            }
            for o in ops {
                println!(
                    "{} max_nodes={} max_per_layer={} {:?}",
                    hex::encode(o.key.0),
                    o.max_nodes,
                    o.max_per_layer,
                    o.name
                );
            }
        }
    }
    Ok(())
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Roster {
    epoch: u64,
    published: bool,
    nodes: Vec<shoal_topology::RosterEntry>,
}

fn status(addr: SocketAddr, json: bool) -> anyhow::Result<()> {
    let rosters = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(async {
            let mut out = Vec::new();
            for which in ["current", "next"] {
                let (status, body) = shoal_link::http::get(addr, &format!("/v1/roster/{which}"))
                    .await
                    .with_context(|| format!("cannot reach the authority at {addr}"))?;
                anyhow::ensure!(
                    status == 200,
                    "the authority answered {status} for its {which} roster"
                );
                let roster: Roster = serde_json::from_slice(&body)
                    .with_context(|| format!("the authority's {which} roster is not valid JSON"))?;
                out.push(roster);
            }
            anyhow::Ok(out)
        })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rosters)?);
        return Ok(());
    }
    let now = authority_server::now_unix();
    for (name, r) in ["current", "next"].iter().zip(&rosters) {
        let state = if r.published {
            "published"
        } else {
            "not yet published; what this authority would vote"
        };
        println!("{name} epoch {} ({state}):", r.epoch);
        if r.nodes.is_empty() {
            println!("  no nodes");
        }
        for n in &r.nodes {
            use shoal_topology::Inclusion;
            let why = match &n.inclusion {
                Inclusion::Included { layer: Some(l) } => format!("in, layer {l}"),
                Inclusion::Included { layer: None } => "in".to_owned(),
                // The next epoch's vote takes only descriptors newer than its cutoff,
                // which can lie in the future: a running node re-publishes before then.
                Inclusion::Stale {
                    oldest_accepted_unix,
                    ..
                } if *oldest_accepted_unix > now => format!(
                    "not yet: this epoch takes descriptors published after {oldest_accepted_unix} ({} s from now); a running node re-publishes before its vote",
                    oldest_accepted_unix - now
                ),
                Inclusion::Stale {
                    published_unix,
                    oldest_accepted_unix,
                } => format!(
                    "left out: descriptor published at {published_unix}, before {oldest_accepted_unix} (node stopped re-publishing, or its clock is behind)"
                ),
                Inclusion::OperatorCap => {
                    "left out: its operator has more nodes (or relays in this layer) than it is admitted for".to_owned()
                }
                Inclusion::NoKeyForEpoch => {
                    "left out: its descriptor has no Sphinx key for this epoch".to_owned()
                }
                Inclusion::NotInPublished => {
                    "left out: arrived after the document was agreed; in a later one".to_owned()
                }
            };
            let role = match n.role {
                shoal_topology::Role::Relay => "relay",
                shoal_topology::Role::Gateway => "gateway",
            };
            println!(
                "  {role:<7} {} {:<21} {:<8} {why}",
                hex::encode(n.identity.0),
                n.link_addr,
                n.version.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(())
}

fn parse_peer(s: &str) -> anyhow::Result<Peer> {
    let (addr, key) = s
        .split_once('=')
        .with_context(|| format!("--peer {s:?} is not ADDR=HEXKEY"))?;
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("--peer {s:?}: {addr:?} is not ip:port"))?;
    let key = authority_config::parse_key(key).with_context(|| format!("--peer {s:?}"))?;
    Ok(Peer { addr, key })
}

fn init(
    dir: &Path,
    listen: SocketAddr,
    peers: &[String],
    threshold: Option<usize>,
    epoch_secs: u64,
    genesis: u64,
    force: bool,
) -> anyhow::Result<()> {
    if epoch_secs < 2 {
        bail!("--epoch-secs must be at least 2");
    }
    let config_path = dir.join(CONFIG_FILE);
    if config_path.exists() && !force {
        bail!(
            "{} exists; pass --force to overwrite it (the key is kept)",
            config_path.display()
        );
    }
    let mut all = Vec::new();
    for p in peers {
        all.push(parse_peer(p)?);
    }
    // Owner-only, like every other role's key directory.
    shoal_relay::keystore::create_private_dir(dir)?;
    let key_path = dir.join(KEY_FILE);
    let key = if key_path.exists() {
        eprintln!("keeping the existing key in {}", key_path.display());
        authority_config::read_key_file(&key_path)?
    } else {
        let key = generate_key()?;
        write_secret(&key_path, &key)?;
        key
    };
    let me = key.verifying_key().to_bytes();
    if all.iter().any(|p| p.key == me) {
        bail!("--peer lists this authority's own key; list only the others");
    }
    all.insert(
        0,
        Peer {
            addr: listen,
            key: me,
        },
    );
    let n = all.len();
    let threshold = threshold.unwrap_or(n / 2 + 1);
    let text = authority_config::render(&Template {
        listen,
        key_file: KEY_FILE,
        authorities: &all,
        threshold,
        schedule: EpochSchedule {
            genesis_unix: genesis,
            length_secs: epoch_secs,
        },
    });
    // Refuse to write a config that `run` would refuse.
    authority_config::RawConfig::parse(&text)
        .and_then(|raw| raw.validate(dir))
        .context("the requested settings do not make a valid config")?;
    std::fs::write(&config_path, text)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let operators = dir.join(authority_config::OPERATORS_FILE);
    if !operators.exists() {
        authority_config::save_operators(&operators, &shoal_topology::Admission::default())?;
    }
    eprintln!(
        "wrote {} ({n} authorities, threshold {threshold})",
        config_path.display()
    );
    println!("{}", hex::encode(me));
    Ok(())
}

fn generate_key() -> anyhow::Result<SigningKey> {
    use rand::TryRng;
    let mut secret = [0u8; 32];
    rand::rngs::SysRng
        .try_fill_bytes(&mut secret)
        .map_err(|e| anyhow::anyhow!("cannot read OS randomness: {e}"))?;
    Ok(SigningKey::from_bytes(&secret))
}

/// Writes the key as hex to a new file that only its owner can read.
fn write_secret(path: &Path, key: &SigningKey) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create key file {}", path.display()))?;
    writeln!(file, "{}", hex::encode(key.to_bytes()))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write key file {}", path.display()))
}

/// Rotates the signing key: a new key in `<key_file>.next`, the config's own entry
/// changed to it, then the new key renamed over the old one. Each step is atomic and a
/// rerun after a crash finishes the same rotation: `.next` is reused, and a config that
/// already names it is left as is.
fn rotate(config_path: &Path, force: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read config {}", config_path.display()))?;
    let raw = authority_config::RawConfig::parse(&text)
        .with_context(|| format!("in config {}", config_path.display()))?;
    let base = config_path.parent().unwrap_or(Path::new("."));
    let key_path = base.join(&raw.key_file);
    let mut next_name = key_path.file_name().unwrap_or_default().to_os_string();
    next_name.push(".next");
    let next_path = key_path.with_file_name(next_name);

    // A running authority signs with the key it loaded; rotating under it would make it
    // sign with a key its config no longer names.
    let listen: SocketAddr = raw
        .listen
        .parse()
        .with_context(|| format!("listen = {:?} is not ip:port", raw.listen))?;
    if let Err(e) = std::net::TcpListener::bind(listen)
        && e.kind() == std::io::ErrorKind::AddrInUse
    {
        bail!("{listen} is in use: stop the authority before rotating its key");
    }

    // Its signatures stop counting wherever the old key is still pinned, so the others
    // must be able to publish alone meanwhile.
    let n = raw.authorities.len();
    let threshold = raw.threshold;
    let others_suffice = n.saturating_sub(1) >= threshold;
    if !others_suffice && !force {
        bail!(
            "the other {} authorities cannot reach the threshold of {threshold} without this one: \
             until every other authority, relay, gateway and client lists the new key, no new \
             directory document would be accepted and the network stops when the current one \
             expires. Pass --force to rotate anyway (after a suspected compromise)",
            n.saturating_sub(1)
        );
    }

    let old = authority_config::read_key_file(&key_path)?;
    let old_pub = old.verifying_key().to_bytes();
    let resuming = next_path.exists();
    let new = if resuming {
        eprintln!(
            "finishing an interrupted rotation with {}",
            next_path.display()
        );
        authority_config::read_key_file(&next_path)?
    } else {
        // The config must be sound before we change anything.
        raw.validate(base)
            .with_context(|| format!("in config {}", config_path.display()))?;
        let key = generate_key()?;
        let hex_key = format!("{}\n", hex::encode(key.to_bytes()));
        shoal_relay::keystore::write_private(&next_path, hex_key.as_bytes(), true)?;
        key
    };
    let new_pub = new.verifying_key().to_bytes();
    let rotated = authority_config::replace_own_key(&text, &old_pub, &new_pub)
        .with_context(|| format!("in config {}", config_path.display()))?;
    if rotated != text {
        shoal_relay::keystore::write_private(config_path, rotated.as_bytes(), false)?;
    }
    std::fs::rename(&next_path, &key_path)
        .with_context(|| format!("cannot move {} into place", next_path.display()))?;
    #[cfg(unix)]
    std::fs::File::open(base)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", base.display()))?;
    // What `run` will load: refuse to report success on a config it would refuse.
    let cfg = authority_config::load(config_path)?;

    let (old_hex, new_hex) = (hex::encode(old_pub), hex::encode(new_pub));
    println!("{new_hex}");
    eprintln!(
        "rotated: {} now holds the key above; the old key {old_hex} is deleted and \
         {} names the new one",
        key_path.display(),
        config_path.display()
    );
    eprintln!(
        "next: replace {old_hex} with {new_hex} (this authority at {listen})\n\
         \x20 - in [[authorities]] of the other authorities' authority.toml, then restart each;\n\
         \x20 - in [directory] authorities of every relay.toml and gateway.toml, then restart it;\n\
         \x20 - in [directory] authority_keys of every client.toml, then restart the client.\n\
         Start this authority now (restart needed). Until each of them has the new key, its \
         signatures do not count there{}. Rotate no other authority's key until all have it.",
        if others_suffice {
            format!(
                "; the other {} authorities (threshold {}) keep publishing documents everyone \
                 accepts, as long as they are up",
                cfg.peers.len(),
                cfg.authority.authorities.threshold
            )
        } else {
            ": with too few other authorities to reach the threshold, nothing they have not \
             updated accepts a new document"
                .to_owned()
        }
    );
    Ok(())
}

/// `shoal authority network-file`: the trust root clients take from the operators.
fn network_file(config: &std::path::Path, out: Option<&std::path::Path>) -> anyhow::Result<()> {
    let c = authority_config::load(config)?;
    let own = shoal_topology::AuthorityAddr {
        addr: c.listen,
        key: c.key.verifying_key().to_bytes(),
    };
    let mut authorities = vec![own];
    authorities.extend(c.peers.iter().map(|p| shoal_topology::AuthorityAddr {
        addr: p.addr,
        key: p.key,
    }));
    let network = crate::network_file::Network::from_flags(
        authorities,
        Some(c.authority.authorities.threshold),
    )?;
    let text = network.render();
    match out {
        Some(path) => {
            std::fs::write(path, &text)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("network file written: {}", path.display());
            println!("network: {}", network.fingerprint());
        }
        None => print!("{text}"),
    }
    Ok(())
}

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
    /// Show which nodes are in the current and next documents, and why any is left out.
    Status {
        /// The authority's HTTP API address.
        #[arg(long)]
        addr: SocketAddr,
        /// Print the two rosters as JSON.
        #[arg(long)]
        json: bool,
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
        AuthorityCommand::Status { addr, json } => status(addr, json),
    }
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
                Inclusion::Stale {
                    published_unix,
                    oldest_accepted_unix,
                } => format!(
                    "left out: descriptor published at {published_unix}, before {oldest_accepted_unix} (node stopped re-publishing, or its clock is behind)"
                ),
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
                "  {role:<7} {} {:<21} {why}",
                hex::encode(n.identity.0),
                n.link_addr
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
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
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

//! `shoal gateway ...`: set up and run a gateway, and manage its accounts.

use crate::parse_hex32;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use shoal_gateway::config::{Config, InitOptions, init_dir};
use shoal_topology::AuthorityAddr;

#[derive(Subcommand, Debug)]
pub enum GatewayCommand {
    /// Write a commented default config (DIR/gateway.toml) and a fresh identity key.
    Init {
        /// Directory to set up; it holds the config, the keys and the mailbox store.
        #[arg(long)]
        dir: PathBuf,
        /// QUIC address for links with other nodes.
        #[arg(long, default_value = "127.0.0.1:7101")]
        listen: SocketAddr,
        /// Address to advertise in the directory (needed when --listen is 0.0.0.0).
        #[arg(long)]
        public_addr: Option<SocketAddr>,
        /// QUIC address clients connect to.
        #[arg(long, default_value = "127.0.0.1:7102")]
        client_listen: SocketAddr,
        /// Serve Prometheus metrics on this address.
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// A directory authority as ADDR=HEXKEY (repeatable).
        #[arg(long = "authority", value_name = "ADDR=HEXKEY")]
        authorities: Vec<AuthorityAddr>,
        /// Authority signatures a document needs (default: a majority).
        #[arg(long)]
        threshold: Option<usize>,
        /// A subnet to host: its admin's public key, as `shoal admin init` prints it
        /// (repeatable; or edit `subnets` in the config later).
        #[arg(long = "subnet", value_name = "HEX", value_parser = parse_hex32)]
        subnets: Vec<[u8; 32]>,
    },
    /// Run a gateway until SIGINT or SIGTERM.
    Run {
        /// The gateway's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print a running gateway's health from its /metrics; exits 1 if it has a problem.
    Status {
        /// The gateway's config file (for its metrics address).
        #[arg(long)]
        config: PathBuf,
    },
    /// Manage accounts (the gateway must be stopped: the store has one writer).
    #[command(subcommand)]
    Account(AccountCommand),
    /// Manage the gateway's keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Replace the identity key and every Sphinx key (after a suspected compromise). The
    /// gateway must be stopped; it joins the next directory document as a new node.
    /// Its clients pin the identity and contact cards name it, so with accounts in the
    /// store this needs --force.
    Rotate {
        /// The gateway's config file.
        #[arg(long)]
        config: PathBuf,
        /// Rotate even though accounts exist: each of their clients must then be given
        /// the new identity, and contact cards naming the old one stop working.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum AccountCommand {
    /// Register a client key and its mailbox address.
    Add {
        #[arg(long)]
        config: PathBuf,
        /// The client's Ed25519 public key (64 hex digits), as its link authenticates.
        #[arg(long, value_parser = parse_hex32)]
        key: [u8; 32],
        /// The mailbox address packets for this client arrive with (64 hex digits).
        #[arg(long, value_parser = parse_hex32)]
        mailbox: [u8; 32],
        /// Items the mailbox may hold (default: the config's `mailbox.default_quota`).
        #[arg(long)]
        quota: Option<u32>,
    },
    /// Remove an account and every item in its mailbox.
    Remove {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_parser = parse_hex32)]
        key: [u8; 32],
    },
}

pub fn run(cmd: GatewayCommand) -> anyhow::Result<()> {
    match cmd {
        GatewayCommand::Init {
            dir,
            listen,
            public_addr,
            client_listen,
            metrics,
            authorities,
            threshold,
            subnets,
        } => {
            if let Some(k) = threshold
                && (k == 0 || k > authorities.len())
            {
                bail!(
                    "--threshold {k} must be between 1 and the number of --authority ({})",
                    authorities.len()
                );
            }
            let no_authorities = authorities.is_empty();
            let opts = InitOptions {
                listen,
                public_addr,
                client_listen,
                metrics_listen: metrics,
                authorities,
                threshold,
                subnets: subnets.into_iter().map(shoal_topology::Hex32).collect(),
            };
            let (path, identity) = init_dir(&dir, &opts)?;
            println!("gateway identity: {}", hex::encode(identity));
            println!("config written: {}", path.display());
            if no_authorities {
                println!("add the directory authorities to [directory] before `shoal gateway run`");
            }
            Ok(())
        }
        GatewayCommand::Status { config } => {
            let config = Config::load(&config)?;
            crate::status::report(config.node.metrics_listen, "gateway")
        }
        GatewayCommand::Run { config: path } => {
            let config = Config::load(&path)?;
            let runtime = crate::runtime::node_runtime("shoal-gateway-io")?;
            runtime.block_on(async move {
                let gateway = shoal_gateway::spawn(config).await?;
                println!("gateway identity: {}", hex::encode(gateway.identity()));
                println!("clients connect to: {}", gateway.client_addr());
                crate::runtime::wait_for_signal_reloading(|| reload_subnets(&path, &gateway))
                    .await?;
                tracing::info!("shutting down");
                gateway.shutdown().await;
                Ok(())
            })
        }
        GatewayCommand::Account(AccountCommand::Add {
            config,
            key,
            mailbox,
            quota,
        }) => {
            let config = Config::load(&config)?;
            shoal_gateway::admin::add_account(&config, key, &mailbox, quota)
                .context("cannot add the account (is the gateway running?)")?;
            println!("account added");
            Ok(())
        }
        GatewayCommand::Keys(KeysCommand::Rotate { config, force }) => rotate(&config, force),
        GatewayCommand::Account(AccountCommand::Remove { config, key }) => {
            let config = Config::load(&config)?;
            shoal_gateway::admin::remove_account(&config, &key)
                .context("cannot remove the account (is the gateway running?)")?;
            println!("account removed");
            Ok(())
        }
    }
}

/// Refuses while `addr` is bound by a running node: rotating under it would leave the
/// keys it serves different from the ones on disk.
fn ensure_stopped(addr: SocketAddr) -> anyhow::Result<()> {
    if let Err(e) = std::net::UdpSocket::bind(addr)
        && e.kind() == std::io::ErrorKind::AddrInUse
    {
        bail!("{addr} is in use: stop the gateway before rotating its keys");
    }
    Ok(())
}

fn rotate(config_path: &std::path::Path, force: bool) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    ensure_stopped(config.node.listen)?;
    ensure_stopped(config.client_listen)?;
    // Accounts are keyed by their clients' keys, not the gateway's, so the store
    // survives; but every one of those clients dials this identity.
    let accounts = if config.store_path().exists() {
        let (store, recovered) =
            shoal_gateway::Store::open(&config.store_path(), &config.store, &mut rand::rng())
                .context("cannot open the mailbox store (is the gateway running?)")?;
        let n = recovered.accounts();
        store.close()?;
        n
    } else {
        0
    };
    if accounts > 0 && !force {
        bail!(
            "this gateway has {accounts} accounts: their clients pin its identity (client.toml \
             [gateway] node_key) and their contact cards name it, so after a rotation none of \
             them can connect or be reached until each gets the new identity and shares a new \
             card. Pass --force to rotate anyway (after a suspected compromise)"
        );
    }
    // Only to name it below; a damaged old key must not block replacing it.
    let old = shoal_relay::keystore::load_identity(&config.node.identity_path()).ok();
    let identity = shoal_relay::keystore::rotate_identity(config.data_dir(), &mut rand::rng())?;
    println!(
        "gateway identity: {}",
        hex::encode(identity.verifying_key().to_bytes())
    );
    if let Some(old) = old {
        println!(
            "old identity {} deleted",
            hex::encode(old.verifying_key().to_bytes())
        );
    }
    println!("old Sphinx keys deleted; mailboxes and accounts kept");
    println!(
        "have your operator certify the new identity (shoal operator certify --node <it> \
         --role gateway --out {}), then start the gateway: it publishes the new identity \
         and is in the next document (the old one ages out of the directory)",
        config.data_dir().join("operator.cert").display()
    );
    if accounts > 0 {
        println!(
            "each of the {accounts} accounts' clients needs the new identity as [gateway] \
             node_key in its client.toml (then restart it) and must share a new contact card"
        );
    }
    Ok(())
}

/// SIGHUP: re-reads the config file and applies its `subnets` (the one setting a running
/// gateway takes up; the rest needs a restart). A config that does not load changes
/// nothing.
fn reload_subnets(path: &std::path::Path, gateway: &shoal_gateway::GatewayHandle) {
    match Config::load(path) {
        Ok(config) => {
            let hosted = config.subnets.len();
            gateway.set_hosted_subnets(config.subnets);
            tracing::info!(hosted, "reloaded the hosted subnets");
        }
        Err(e) => tracing::warn!(error = %e, "config not reloaded; the running one stays"),
    }
}

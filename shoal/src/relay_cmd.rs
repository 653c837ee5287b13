//! `shoal relay ...`: set up and run a mix relay.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::bail;
use clap::Subcommand;
use shoal_relay::config::{Config, InitOptions, init_dir};
use shoal_topology::AuthorityAddr;

#[derive(Subcommand, Debug)]
pub enum RelayCommand {
    /// Write a commented default config (DIR/relay.toml) and a fresh identity key.
    Init {
        /// Directory to set up; it holds the config and the keys.
        #[arg(long)]
        dir: PathBuf,
        /// QUIC link address to listen on.
        #[arg(long, default_value = "127.0.0.1:7001")]
        listen: SocketAddr,
        /// Address to advertise in the directory (needed when --listen is 0.0.0.0).
        #[arg(long)]
        public_addr: Option<SocketAddr>,
        /// Serve Prometheus metrics on this address.
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// A directory authority as ADDR=HEXKEY (repeatable).
        #[arg(long = "authority", value_name = "ADDR=HEXKEY")]
        authorities: Vec<AuthorityAddr>,
        /// Authority signatures a document needs (default: a majority).
        #[arg(long)]
        threshold: Option<usize>,
    },
    /// Run a relay until SIGINT or SIGTERM.
    Run {
        /// The relay's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Manage the relay's keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Print a running relay's health from its /metrics; exits 1 if it has a problem.
    Status {
        /// The relay's config file (for its metrics address).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Replace the identity key and every Sphinx key (after a suspected compromise). The
    /// relay must be stopped; it joins the next directory document as a new node.
    Rotate {
        /// The relay's config file.
        #[arg(long)]
        config: PathBuf,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn run(cmd: RelayCommand) -> anyhow::Result<()> {
    match cmd {
        RelayCommand::Init {
            dir,
            listen,
            public_addr,
            metrics,
            authorities,
            threshold,
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
                metrics_listen: metrics,
                authorities,
                threshold,
            };
            let (path, identity) = init_dir(&dir, &opts)?;
            println!("relay identity: {}", hex(&identity));
            println!("config written: {}", path.display());
            if no_authorities {
                println!("add the directory authorities to [directory] before `shoal relay run`");
            }
            Ok(())
        }
        RelayCommand::Run { config } => {
            let config = Config::load(&config)?;
            let runtime = crate::runtime::node_runtime("shoal-relay-io")?;
            runtime.block_on(async move {
                let relay = shoal_relay::spawn(config).await?;
                println!("relay identity: {}", hex(&relay.identity()));
                crate::runtime::wait_for_signal().await?;
                tracing::info!("shutting down");
                relay.shutdown().await;
                Ok(())
            })
        }
        RelayCommand::Keys(KeysCommand::Rotate { config }) => {
            let config = Config::load(&config)?;
            // A running relay holds its link port; rotating under it would desynchronise
            // the keys it serves from the ones on disk.
            if let Err(e) = std::net::UdpSocket::bind(config.listen)
                && e.kind() == std::io::ErrorKind::AddrInUse
            {
                bail!(
                    "{} is in use: stop the relay before rotating its keys",
                    config.listen
                );
            }
            let identity =
                shoal_relay::keystore::rotate_identity(&config.data_dir, &mut rand::rng())?;
            println!(
                "relay identity: {}",
                hex(&identity.verifying_key().to_bytes())
            );
            println!(
                "old identity and Sphinx keys deleted; start the relay: it publishes the new \
                 identity and is in the next document (the old one ages out of the directory)"
            );
            Ok(())
        }
        RelayCommand::Status { config } => {
            let config = Config::load(&config)?;
            crate::status::report(config.metrics_listen, "relay")
        }
    }
}

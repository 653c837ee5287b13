//! `shoal operator ...`: an operator's key, and the certificates with which it vouches
//! for its own relays and gateways (docs/guides/run-a-node.md, "Operators").

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use shoal_topology::{NodeCertificate, Role};

const KEY_FILE: &str = "operator.key";

#[derive(Subcommand, Debug)]
pub enum OperatorCommand {
    /// Make an operator key in DIR/operator.key (mode 0600) and print its public key,
    /// which the authorities admit with `shoal authority operator admit`.
    Keygen {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Certify that this operator runs the node with public key NODE (as `shoal relay
    /// init` or `shoal gateway init` printed it) in ROLE. Writes the certificate to
    /// --out (put it in the node's directory as operator.cert), or prints it.
    Certify {
        /// The operator's directory (with operator.key).
        #[arg(long)]
        dir: PathBuf,
        /// The node's identity key, 64 hex digits.
        #[arg(long)]
        node: String,
        /// relay or gateway.
        #[arg(long)]
        role: String,
        /// Where to write the certificate, e.g. /var/lib/shoal-relay/operator.cert.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn run(cmd: OperatorCommand) -> anyhow::Result<()> {
    match cmd {
        OperatorCommand::Keygen { dir } => {
            shoal_relay::keystore::create_private_dir(&dir)?;
            let path = dir.join(KEY_FILE);
            if path.exists() {
                bail!("{} exists; refusing to overwrite it", path.display());
            }
            let key = shoal_relay::keystore::create_identity(&dir, &mut rand::rng())?;
            std::fs::rename(dir.join(shoal_relay::keystore::IDENTITY_FILE), &path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
            println!("{}", hex::encode(key.verifying_key().to_bytes()));
            Ok(())
        }
        OperatorCommand::Certify {
            dir,
            node,
            role,
            out,
        } => certify(&dir, &node, &role, out.as_deref()),
    }
}

fn certify(dir: &Path, node: &str, role: &str, out: Option<&Path>) -> anyhow::Result<()> {
    let key = shoal_relay::keystore::load_identity(&dir.join(KEY_FILE))
        .with_context(|| format!("no operator key in {}", dir.display()))?;
    let id = crate::parse_hex32(node).map_err(|e| anyhow::anyhow!("--node: {e}"))?;
    ed25519_dalek::VerifyingKey::from_bytes(&id)
        .with_context(|| format!("--node {node:?} is not an Ed25519 public key"))?;
    let role = match role {
        "relay" => Role::Relay,
        "gateway" => Role::Gateway,
        other => bail!("--role {other:?}: expected relay or gateway"),
    };
    let cert = NodeCertificate::issue(&key, id, role);
    match out {
        Some(path) => {
            std::fs::write(path, cert.to_json())
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => println!("{}", cert.to_json()),
    }
    Ok(())
}

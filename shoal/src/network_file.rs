//! The network's trust root: which directory authorities a client believes, and how
//! many must sign. It comes from the network's own operators (a `network.toml` they
//! publish, with its fingerprint), or from `--authority` flags typed from their
//! announcement; never from a subnet admin's invite. An invite names the network only by
//! fingerprint, and `shoal client init --invite` refuses one that names another network
//! (or carries another authority set), so a rogue admin cannot point members at a
//! private network of its own.
//!
//! ```toml
//! # The directory authorities of a Shoal network, as its operators publish them.
//! threshold = 2
//! authorities = ["203.0.113.5:7000=<HEX KEY>", "203.0.113.6:7000=<HEX KEY>", "..."]
//! ```

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;
use shoal_topology::{AuthorityAddr, AuthoritySet, Hex32};

/// `network.toml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkFile {
    threshold: usize,
    /// `ADDR=HEXKEY`, one per authority.
    authorities: Vec<String>,
}

/// A checked trust root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub authorities: Vec<AuthorityAddr>,
    pub set: AuthoritySet,
}

impl Network {
    /// From `--authority` flags and `--threshold` (default: a majority).
    pub fn from_flags(
        authorities: Vec<AuthorityAddr>,
        threshold: Option<usize>,
    ) -> anyhow::Result<Self> {
        let threshold = threshold.unwrap_or(authorities.len() / 2 + 1);
        if threshold == 0 || threshold > authorities.len() {
            bail!(
                "--threshold {threshold} must be between 1 and the number of --authority ({})",
                authorities.len()
            );
        }
        Self::new(authorities, threshold)
    }

    fn new(authorities: Vec<AuthorityAddr>, threshold: usize) -> anyhow::Result<Self> {
        let set = AuthoritySet {
            threshold,
            keys: authorities.iter().map(|a| Hex32(a.key)).collect(),
        };
        set.validate()
            .map_err(|e| anyhow::anyhow!("the network's authority set: {e}"))?;
        Ok(Network { authorities, set })
    }

    /// Reads a network file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the network file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("the network file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: NetworkFile = toml::from_str(text)?;
        let authorities = file
            .authorities
            .iter()
            .map(|a| {
                a.parse::<AuthorityAddr>()
                    .map_err(|e| anyhow::anyhow!("{a:?}: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Self::new(authorities, file.threshold)
    }

    /// The file's text, for the operators to publish.
    pub fn render(&self) -> String {
        let list: Vec<String> = (self.authorities.iter())
            .map(|a| format!("    \"{}={}\",\n", a.addr, hex::encode(a.key)))
            .collect();
        format!(
            "# The directory authorities of a Shoal network, as its operators publish them.\n\
             # Fingerprint: {}\n\
             threshold = {}\n\
             authorities = [\n{}]\n",
            self.fingerprint(),
            self.set.threshold,
            list.concat()
        )
    }

    pub fn fingerprint(&self) -> String {
        self.set.fingerprint()
    }
}

/// Checks that `invite` (an admin's invite file) is for the network `own` trusts: the
/// network it names by fingerprint, and any authority keys it carries (`--authority
/// ADDR=KEY`, as older invites did), must be `own`'s. An admin can choose the gateway
/// and the subnet, never the authorities.
pub fn check_invite(invite: &str, own: &Network) -> anyhow::Result<()> {
    let theirs = invite.lines().find_map(|l| {
        l.trim()
            .strip_prefix("network:")
            .map(|v| v.trim().to_owned())
    });
    let Some(theirs) = theirs else {
        bail!(
            "the invite names no network (no \"network:\" line), so it cannot be checked against your trust root; ask your admin for an invite made by this version"
        );
    };
    let refuse = |what: &str| {
        anyhow::anyhow!(
            "this invite is for another network: {what}, but your trust root (the network's \
             directory authorities, from its operators) has fingerprint {}. An invite cannot \
             change which authorities you trust: an admin could point you at a private network \
             of its own. Check the fingerprint with the network's operators, and ask your admin \
             for an invite for that network",
            own.fingerprint()
        )
    };
    if theirs != own.fingerprint() {
        return Err(refuse(&format!("it names network {theirs}")));
    }
    let own_keys: BTreeSet<[u8; 32]> = own.authorities.iter().map(|a| a.key).collect();
    let mut words = invite.split_whitespace();
    while let Some(w) = words.next() {
        let value = match w.strip_prefix("--authority=") {
            Some(v) => Some(v),
            None if w == "--authority" => words.next(),
            None => None,
        };
        let Some(value) = value else { continue };
        match value.parse::<AuthorityAddr>() {
            Ok(a) if own_keys.contains(&a.key) => {}
            _ => return Err(refuse(&format!("it names authority {value}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> [u8; 32] {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
            .verifying_key()
            .to_bytes()
    }

    fn network(seeds: &[u8], threshold: usize) -> Network {
        let authorities = seeds
            .iter()
            .enumerate()
            .map(|(i, s)| AuthorityAddr {
                addr: format!("127.0.0.1:{}", 7000 + i).parse().unwrap(),
                key: key(*s),
            })
            .collect();
        Network::new(authorities, threshold).unwrap()
    }

    #[test]
    fn network_file_roundtrip_and_refusals() {
        let n = network(&[1, 2, 3], 2);
        let text = n.render();
        assert!(text.contains(&n.fingerprint()), "{text}");
        assert_eq!(Network::parse(&text).unwrap(), n);
        let one = format!("authorities = [\"127.0.0.1:1={}\"]", hex::encode(key(1)));
        for bad in [
            format!("threshold = 0\n{one}"),
            format!("threshold = 2\n{one}"),
            "threshold = 1\nauthorities = [\"not an authority\"]".to_owned(),
            format!("threshold = 1\n{one}\nextra = 1"),
        ] {
            assert!(Network::parse(&bad).is_err(), "{bad}");
        }
        assert!(Network::parse(&format!("threshold = 1\n{one}")).is_ok());
        assert!(Network::from_flags(n.authorities.clone(), Some(4)).is_err());
        assert_eq!(
            Network::from_flags(n.authorities.clone(), None)
                .unwrap()
                .set
                .threshold,
            2
        );
    }

    /// Hole 8: a rogue admin's invite for its own private network (another authority
    /// set, named by its fingerprint, or its keys written into the `shoal client init`
    /// line) is refused by a client whose trust root came from the network's operators.
    #[test]
    fn rogue_admin_invite_cannot_replace_the_trust_root() {
        let real = network(&[1, 2, 3], 2);
        let rogue = network(&[1, 2, 0xee], 2);
        let invite = |fp: &str, line: &str| {
            format!(
                "# Shoal invite\n#    shoal client init --dir <YOUR_DIR>{line}\nnetwork: {fp}\nsubnet: 00\n"
            )
        };
        // The honest invite passes.
        check_invite(&invite(&real.fingerprint(), ""), &real).unwrap();
        // Another network by fingerprint.
        let err = check_invite(&invite(&rogue.fingerprint(), ""), &real).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("another network"), "{msg}");
        assert!(msg.contains(&real.fingerprint()), "{msg}");
        // The right fingerprint, but the rogue's authority written into the command.
        let evil = format!(" --authority 127.0.0.1:9={}", hex::encode(key(0xee)));
        assert!(check_invite(&invite(&real.fingerprint(), &evil), &real).is_err());
        // The same threshold with one key fewer, or a lower threshold, is another network.
        let fewer = network(&[1, 2], 2);
        assert!(check_invite(&invite(&fewer.fingerprint(), ""), &real).is_err());
        let weaker = network(&[1, 2, 3], 1);
        assert!(check_invite(&invite(&weaker.fingerprint(), ""), &real).is_err());
        // An invite naming no network cannot be checked, so it is refused too.
        assert!(check_invite("subnet: 00\n", &real).is_err());
    }
}

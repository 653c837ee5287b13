//! Separate hosts for a deployment test: one Linux network namespace per host, each
//! with its own address on a veth into a shared bridge (`shoal_bench::netns::Netns`,
//! also behind the lossy-link test), where namespaces can be made (root, `ip`); else
//! every host is 127.0.0.1 and each service gets a free loopback port (also when
//! `SHOAL_TEST_LOOPBACK` is set, to try that path as root). Namespaces and
//! veths are deleted when the [`Hosts`] is dropped, also on panic; processes started
//! here must be dropped (killed) before it.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};

use shoal_bench::netns::{Netns, NsNode};
use shoal_bench::testnet::{Proc, free_port};

pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// One machine of the deployment.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    node: Option<NsNode>,
}

pub struct Hosts {
    netns: Option<Netns>,
    /// Why namespaces could not be used (None when they are).
    pub loopback_because: Option<String>,
}

impl Hosts {
    /// Namespaces if this machine allows them (and `SHOAL_TEST_LOOPBACK` is not set),
    /// else loopback; prints which.
    pub fn create() -> Self {
        let made = match std::env::var_os("SHOAL_TEST_LOOPBACK") {
            Some(_) => Err("SHOAL_TEST_LOOPBACK is set".to_string()),
            None => Netns::create().map_err(|e| e.to_string()),
        };
        match made {
            Ok(n) => {
                println!(
                    "hosts: one network namespace per host, each with its own address on {}/24 over veth",
                    n.host_addr()
                );
                Hosts {
                    netns: Some(n),
                    loopback_because: None,
                }
            }
            Err(why) => {
                println!(
                    "hosts: network namespaces unavailable ({why}); every host is 127.0.0.1 with its own ports"
                );
                Hosts {
                    netns: None,
                    loopback_because: Some(why),
                }
            }
        }
    }

    pub fn namespaced(&self) -> bool {
        self.netns.is_some()
    }

    pub fn add(&mut self, name: &str) -> Host {
        let node = self
            .netns
            .as_mut()
            .map(|n| n.add_node(name).expect("cannot add a namespace"));
        Host {
            name: name.to_string(),
            node,
        }
    }

    fn ip(host: &Host) -> IpAddr {
        IpAddr::V4(host.node.as_ref().map_or(Ipv4Addr::LOCALHOST, |n| n.addr))
    }

    /// Where `host` serves UDP (QUIC) on `port`: its own address, or a free loopback port.
    pub fn udp(&self, host: &Host, port: u16) -> SocketAddr {
        match host.node {
            Some(_) => SocketAddr::new(Self::ip(host), port),
            None => free_port().unwrap(),
        }
    }

    /// Where `host` serves TCP (HTTP) on `port`: its own address, or a free loopback port.
    pub fn tcp(&self, host: &Host, port: u16) -> SocketAddr {
        match host.node {
            Some(_) => SocketAddr::new(Self::ip(host), port),
            None => free_port().unwrap(),
        }
    }

    /// What a node with public address `addr` listens on: every interface, as the guide
    /// does on a real host, or `addr` itself on a shared loopback.
    pub fn listen(&self, addr: SocketAddr) -> SocketAddr {
        match self.netns {
            Some(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port()),
            None => addr,
        }
    }

    /// `shoal` as run on `host`.
    pub fn shoal(&self, host: &Host) -> Command {
        match (&self.netns, &host.node) {
            (Some(n), Some(node)) => n.command(node, Path::new(SHOAL)),
            _ => Command::new(SHOAL),
        }
    }

    /// Runs `shoal ARGS` on `host`; it must succeed. Its stdout.
    pub fn run(&self, host: &Host, args: &[&str]) -> String {
        let out = self
            .shoal(host)
            .args(args)
            .env("SHOAL_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`shoal {}` on {} failed: {}\n{}",
            args.join(" "),
            host.name,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `shoal ARGS` on `host` in the background (stdout to `out`, log to `log`);
    /// killed when the returned [`Proc`] is dropped.
    pub fn spawn(&self, host: &Host, args: &[&str], out: &Path, log: &Path) -> Proc {
        let child = self
            .shoal(host)
            .args(args)
            .env("SHOAL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(out).unwrap())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Proc::from_child(&host.name, child)
    }

    /// Names of this deployment's namespaces (none on loopback).
    pub fn namespace_names(&self) -> Vec<String> {
        self.netns
            .iter()
            .flat_map(|n| n.nodes().iter().map(|n| n.ns.clone()))
            .collect()
    }
}

/// `ip netns list`: every namespace on the machine.
pub fn namespaces() -> String {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

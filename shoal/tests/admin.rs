//! `shoal admin` against a real gateway process: init a subnet, host it, enroll a
//! member (its client then authenticates and pulls), change its quota, preview a policy
//! change, de-provision it (its live link is cut, it can no longer pull, and the new
//! policy revokes its keys).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use shoal_bench::testnet::{GatewayOptions, Testnet, TestnetConfig};
use shoal_gateway::protocol::{ClientMsg, ErrorCode, GatewayMsg};
use shoal_link::{FrameReceiver, FrameSender, Link, LinkEndpoint, PeerSet};
use shoal_packet::{FRAME_SIZE, Frame};

fn shoal(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "shoal {args:?} failed:\n{text}");
    text
}

/// A member's client as the gateway sees it: one link, raw control frames.
struct Member {
    _endpoint: LinkEndpoint,
    link: Link,
    tx: FrameSender,
    rx: Option<FrameReceiver>,
}

impl Member {
    async fn connect(key: &SigningKey, addr: std::net::SocketAddr, gateway: [u8; 32]) -> Self {
        let endpoint =
            LinkEndpoint::bind("127.0.0.1:0".parse().unwrap(), key, PeerSet::new()).unwrap();
        let link = tokio::time::timeout(Duration::from_secs(10), endpoint.connect(addr, gateway))
            .await
            .unwrap()
            .unwrap();
        let tx = link.open_frames(FRAME_SIZE).await.unwrap();
        Member {
            _endpoint: endpoint,
            link,
            tx,
            rx: None,
        }
    }

    async fn recv(&mut self) -> Option<GatewayMsg> {
        if self.rx.is_none() {
            self.rx = Some(
                tokio::time::timeout(Duration::from_secs(10), self.link.accept_frames(FRAME_SIZE))
                    .await
                    .ok()?
                    .ok()?,
            );
        }
        let bytes = tokio::time::timeout(Duration::from_secs(10), self.rx.as_mut()?.recv())
            .await
            .ok()?
            .ok()??;
        assert_eq!(bytes.len(), FRAME_SIZE);
        Some(GatewayMsg::from_frame(&Frame::decode(bytes).unwrap()).unwrap())
    }

    /// One pull; the whole answer (items or dummies, then PullDone) or the refusal.
    async fn pull(&mut self) -> Vec<GatewayMsg> {
        let frame = ClientMsg::Pull.to_frame().unwrap();
        if self.tx.send(frame.as_bytes()).await.is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            let end = matches!(m, GatewayMsg::PullDone { .. } | GatewayMsg::Error { .. });
            out.push(m);
            if end {
                break;
            }
        }
        out
    }
}

fn line_value<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"))
        .trim()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_enrolls_and_deprovisions_a_member_at_a_real_gateway() {
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_shoal"));
    let tmp = tempfile::tempdir().unwrap();
    let admin_dir = tmp.path().join("acme");
    let admin = admin_dir.to_string_lossy().into_owned();

    let out = shoal(&bin, &["admin", "init", "--dir", &admin, "--name", "acme"]);
    let subnet_hex = line_value(&out, "subnet id:").to_owned();
    let mut subnet = [0u8; 32];
    hex::decode_to_slice(&subnet_hex, &mut subnet).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(admin_dir.join("admin.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the admin key is private");
    }
    // A second init must not overwrite the subnet's key.
    assert!(
        !Command::new(&bin)
            .args(["admin", "init", "--dir", &admin, "--name", "again"])
            .status()
            .unwrap()
            .success()
    );

    let cfg = TestnetConfig {
        relays_per_layer: 1,
        bootstrap_secs: 1,
        ..TestnetConfig::default()
    };
    let mut net = Testnet::start(&bin, tmp.path(), &cfg).unwrap();
    let init = net
        .init_gateway(&bin, 0, &GatewayOptions::default())
        .unwrap();
    Testnet::host_subnet(&init, &subnet).unwrap();
    let (gw_addr, gw_key, metrics) = (init.client_addr, init.id, init.metrics_addr);
    net.run_gateway(&bin, init).unwrap();

    let member = SigningKey::from_bytes(&[0x42; 32]);
    let account_hex = hex::encode(member.verifying_key().to_bytes());
    let gw = gw_addr.to_string();
    let gw_key_hex = hex::encode(gw_key);
    let enroll = [
        "admin",
        "enroll",
        "--dir",
        &admin,
        "--gateway",
        &gw,
        "--gateway-key",
        &gw_key_hex,
        "--handle",
        "ana",
        "--role",
        "member",
        "--account-key",
        &account_hex,
        "--mailbox",
        &"ab".repeat(32),
        "--seal-key",
        &"cd".repeat(32),
    ];
    // The gateway process may still be starting: retry until it answers.
    let mut enrolled = None;
    for _ in 0..100 {
        let out = Command::new(&bin).args(enroll).output().unwrap();
        if out.status.success() {
            enrolled = Some(String::from_utf8_lossy(&out.stdout).into_owned());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let enrolled =
        enrolled.unwrap_or_else(|| panic!("enroll never succeeded:\n{}", net.log_tail("gateway0")));
    assert!(enrolled.contains("account created"), "{enrolled}");
    let cred = std::fs::read(admin_dir.join("members/ana.cred")).unwrap();
    let cred = shoal_subnet::MemberCredential::verify(
        &cred,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    assert_eq!(cred.handle(), "ana");
    assert_eq!(cred.subnet().0, subnet);
    // Enrolling the same handle twice is refused before anything is sent.
    assert!(!Command::new(&bin).args(enroll).status().unwrap().success());

    // The enrolled member authenticates and pulls (an empty mailbox: all dummies).
    let mut ana = Member::connect(&member, gw_addr, gw_key).await;
    let answer = ana.pull().await;
    assert!(
        matches!(answer.last(), Some(GatewayMsg::PullDone { .. })),
        "{answer:?}"
    );
    assert!(answer.len() > 1);

    shoal(
        &bin,
        &[
            "admin", "quota", "--dir", &admin, "--handle", "ana", "--quota", "50",
        ],
    );
    let preview = shoal(
        &bin,
        &[
            "admin",
            "policy",
            "set",
            "--dir",
            &admin,
            "--ttl-max",
            "3600",
            "--dry-run",
        ],
    );
    assert!(preview.contains("+   \"ttl_max_secs\": 3600"), "{preview}");
    assert!(preview.contains("dry run"), "{preview}");
    let shown = shoal(&bin, &["admin", "policy", "show", "--dir", &admin]);
    assert!(
        shown.contains("\"version\": 1"),
        "a dry run writes nothing:\n{shown}"
    );

    // De-provision: the live link is cut, a new link is refused, policy v2 revokes.
    let out = shoal(
        &bin,
        &["admin", "deprovision", "--dir", &admin, "--handle", "ana"],
    );
    assert!(out.contains("mailbox access stopped"), "{out}");
    println!("{out}");
    tokio::time::timeout(Duration::from_secs(5), ana.link.connection().closed())
        .await
        .expect("the de-provisioned member's live link is closed");
    let mut again = Member::connect(&member, gw_addr, gw_key).await;
    let refused = again.pull().await;
    assert!(
        matches!(
            refused.first(),
            Some(GatewayMsg::Error {
                code: ErrorCode::Unauthenticated,
                ..
            })
        ),
        "{refused:?}"
    );
    let shown = shoal(&bin, &["admin", "policy", "show", "--dir", &admin]);
    assert!(shown.contains("\"version\": 2"), "{shown}");
    assert!(
        shown.contains(&account_hex),
        "the account key is revoked:\n{shown}"
    );

    // The gateway counted what it applied: create, quota, de-provision, policy.
    let (_, body) = shoal_link::http::get(metrics, "/metrics").await.unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("shoal_gateway_admin_commands_total{outcome=\"applied\"} 4"),
        "{body}"
    );
    assert!(!body.contains(&account_hex) && !body.contains(&subnet_hex));
    let log = net.log_tail("gateway0");
    assert!(
        !log.contains(&account_hex) && !log.contains(&subnet_hex),
        "{log}"
    );
}

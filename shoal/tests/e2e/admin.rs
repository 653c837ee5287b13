//! `shoal admin` against a real gateway process: init a subnet, host it, enroll a
//! member (its client then authenticates and pulls), change its quota, preview a policy
//! change, de-provision it (its live link is cut, it can no longer pull, and the new
//! policy revokes its keys). Every gateway command travels through the mixnet from the
//! admin's own client (`prepare_admin_client`: an account the gateway operator adds,
//! named by `shoal admin use-client`) and waits for the gateway's signed answer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use shoal_bench::testnet::{GatewayOptions, Testnet, TestnetConfig};
use shoal_link::{FrameReceiver, FrameSender, Link, LinkEndpoint, PeerSet};
use shoal_packet::protocol::{ClientMsg, ErrorCode, GatewayMsg};
use shoal_packet::{FRAME_SIZE, Frame};

use crate::support::cli_net::{prepare_admin_client, run_client};

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

    /// One pull; the ids of the items it returned.
    async fn pull_item_ids(&mut self) -> Vec<u64> {
        self.pull()
            .await
            .into_iter()
            .filter_map(|m| match m {
                GatewayMsg::Item { id, .. } => Some(id),
                _ => None,
            })
            .collect()
    }

    /// One pull; the whole answer (items or dummies, then PullDone) or the refusal.
    async fn pull(&mut self) -> Vec<GatewayMsg> {
        let frame = ClientMsg::Pull { acks: vec![] }.to_frame().unwrap();
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

    // The gateway is made before the authority's first document, so routes reach it.
    let cfg = TestnetConfig {
        relays_per_layer: 1,
        bootstrap_secs: 6,
        workers: Some(1),
        lambda_m: 1.0,
        ..TestnetConfig::default()
    };
    let mut net = Testnet::start(&bin, tmp.path(), &cfg).unwrap();
    let init = net
        .init_gateway(&bin, 0, &GatewayOptions::default())
        .unwrap();
    let office = prepare_admin_client(&net, &init, &admin, tmp.path());
    // The gateway starts without the subnet; it is added to the running gateway below.
    let (gw_addr, gw_key, metrics) = (init.client_addr, init.id, init.metrics_addr);
    net.run_gateway(&bin, init.clone()).unwrap();
    net.others.push(run_client(&office));

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
        "--identity-key",
        &"ef".repeat(32),
        "--mailbox",
        &"ab".repeat(32),
        "--seal-key",
        &"cd".repeat(32),
    ];
    // One key for link and identity is refused before anything is sent: the gateway
    // would see the key that signs as the member.
    let mut one_key = enroll;
    one_key[15] = account_hex.as_str();
    assert_eq!(one_key[14], "--identity-key");
    let err = shoal_fails(&bin, &one_key);
    assert!(err.contains("the identity key is the account key"), "{err}");
    // A subnet the gateway does not host: its command is refused, and the gateway says
    // so through the mixnet.
    let out = Command::new(&bin).args(enroll).output().unwrap();
    assert!(
        !out.status.success(),
        "enrolled at a gateway not hosting the subnet"
    );
    let refusal = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        refusal.contains("refused the command (unknown_subnet)"),
        "{refusal}"
    );
    // The operator adds the subnet to `subnets` and sends SIGHUP: no restart.
    Testnet::host_subnet(&init, &subnet).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &net.gateways[0].proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    // SIGHUP is asynchronous: until the gateway re-read its config, it still refuses.
    let mut enrolled = None;
    for _ in 0..10 {
        let out = Command::new(&bin).args(enroll).output().unwrap();
        if out.status.success() {
            enrolled = Some(String::from_utf8_lossy(&out.stdout).into_owned());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
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
    // Members are told the identity key; the account (link) key is the gateway's alone.
    assert!(
        shown.contains(&"ef".repeat(32)) && !shown.contains(&account_hex),
        "the identity key is revoked:\n{shown}"
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

fn shoal_fails(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().unwrap();
    assert!(!out.status.success(), "shoal {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_is_redeemed_once_expires_and_list_shows_account_states() {
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_shoal"));
    let tmp = tempfile::tempdir().unwrap();
    let admin_dir = tmp.path().join("acme");
    let admin = admin_dir.to_string_lossy().into_owned();
    let out = shoal(
        &bin,
        &[
            "admin",
            "init",
            "--dir",
            &admin,
            "--name",
            "acme",
            "--roles",
            "staff,guest",
        ],
    );
    let mut subnet = [0u8; 32];
    hex::decode_to_slice(line_value(&out, "subnet id:"), &mut subnet).unwrap();

    let cfg = TestnetConfig {
        relays_per_layer: 1,
        bootstrap_secs: 6,
        workers: Some(1),
        lambda_m: 1.0,
        ..TestnetConfig::default()
    };
    let mut net = Testnet::start(&bin, tmp.path(), &cfg).unwrap();
    let init = net
        .init_gateway(&bin, 0, &GatewayOptions::default())
        .unwrap();
    Testnet::host_subnet(&init, &subnet).unwrap();
    let office = prepare_admin_client(&net, &init, &admin, tmp.path());
    let (gw_addr, gw_key) = (init.client_addr, init.id);
    net.run_gateway(&bin, init).unwrap();
    net.others.push(run_client(&office));
    let gw = gw_addr.to_string();
    let gw_key_hex = hex::encode(gw_key);

    // The admin writes an invite; the user's client is made with the gateway it names.
    let invite_path = tmp.path().join("ana.invite");
    let invite = invite_path.to_string_lossy().into_owned();
    let out = shoal(
        &bin,
        &[
            "admin",
            "invite",
            "--dir",
            &admin,
            "--gateway",
            &gw,
            "--gateway-key",
            &gw_key_hex,
            "--gateway-node",
            "127.0.0.1:9",
            "--authority",
            &format!("127.0.0.1:8={}", "11".repeat(32)),
            "--threshold",
            "1",
            "--handle",
            "ana",
            "--role",
            "staff",
            "--quota",
            "77",
            "--out",
            &invite,
        ],
    );
    let code = line_value(&out, "invite code:").to_owned();
    let invite_text = std::fs::read_to_string(&invite_path).unwrap();
    assert!(
        invite_text.contains(&format!("invite code: {code}")),
        "{invite_text}"
    );
    assert!(
        invite_text.contains(&format!("127.0.0.1:9={gw_key_hex}")),
        "{invite_text}"
    );
    // The invite names the network by fingerprint only, never its authorities.
    assert!(!invite_text.contains(&"11".repeat(32)), "{invite_text}");
    // The network file Ana got from the network's operators (not from the admin).
    let network_path = tmp.path().join("network.toml");
    std::fs::write(
        &network_path,
        format!(
            "threshold = 1\nauthorities = [\"127.0.0.1:8={}\"]\n",
            "11".repeat(32)
        ),
    )
    .unwrap();
    let network = network_path.to_string_lossy().into_owned();
    // The user runs the invite's `shoal client init` line as written, with a directory.
    let client_dir = tmp.path().join("ana-client");
    let client_dir_s = client_dir.to_string_lossy().into_owned();
    let init_line = invite_text
        .lines()
        .find_map(|l| {
            l.trim_start_matches(['#', ' '])
                .strip_prefix("shoal client init ")
        })
        .unwrap_or_else(|| panic!("no client init line in the invite:\n{invite_text}"));
    let mut init_args = vec!["client", "init"];
    init_args.extend(init_line.split_whitespace().map(|a| match a {
        "<YOUR_DIR>" => client_dir_s.as_str(),
        "<NETWORK_FILE>" => network.as_str(),
        "<THIS_FILE>" => invite.as_str(),
        a => a,
    }));
    init_args.extend(["--name", "ana"]);
    // Hole 8: an invite for another network (a rogue admin's private authorities) is
    // refused by the client, whose trust root is the operators' network file.
    let rogue_path = tmp.path().join("rogue.invite");
    let rogue_network = shoal(
        &bin,
        &[
            "admin",
            "invite",
            "--dir",
            &admin,
            "--gateway",
            &gw,
            "--gateway-key",
            &gw_key_hex,
            "--handle",
            "eve",
            "--role",
            "staff",
            "--out",
            &rogue_path.to_string_lossy(),
            "--authority",
            &format!(
                "127.0.0.1:8={}",
                hex::encode(
                    SigningKey::from_bytes(&[0xee; 32])
                        .verifying_key()
                        .to_bytes()
                )
            ),
        ],
    );
    assert!(rogue_network.contains("invite written"), "{rogue_network}");
    let rogue_dir = tmp.path().join("ana-rogue").to_string_lossy().into_owned();
    let rogue_args: Vec<&str> = init_args
        .iter()
        .map(|a| {
            if *a == invite.as_str() {
                rogue_path.to_str().unwrap()
            } else if *a == client_dir_s.as_str() {
                rogue_dir.as_str()
            } else {
                a
            }
        })
        .collect();
    let err = shoal_fails(&bin, &rogue_args);
    assert!(err.contains("another network"), "{err}");
    assert!(!tmp.path().join("ana-rogue/client.toml").exists());
    let client_out = shoal(&bin, &init_args);
    let client_toml = std::fs::read_to_string(client_dir.join("client.toml")).unwrap();
    assert!(
        client_toml.contains(&"11".repeat(32)) && client_toml.contains("threshold = 1"),
        "{client_toml}"
    );
    let account_hex = line_value(&client_out, "account key:").to_owned();
    let mailbox_hex = line_value(&client_out, "mailbox:").to_owned();
    let redeem_path = tmp.path().join("ana.redeem");
    std::fs::write(&redeem_path, format!("{invite_text}{client_out}")).unwrap();
    let redeem = redeem_path.to_string_lossy().into_owned();

    // Through the admin's client and the mixnet; it waits for the gateway's answer.
    let redeemed = shoal(&bin, &["admin", "redeem", "--dir", &admin, &redeem]);
    assert!(redeemed.contains("redeemed"), "{redeemed}");
    let cred = std::fs::read(admin_dir.join("members/ana.cred")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let cred = shoal_subnet::MemberCredential::verify(&cred, now).unwrap();
    assert_eq!((cred.handle(), cred.role()), ("ana", "staff"));
    // The credential names the identity key, never the account (link) key.
    assert_eq!(
        hex::encode(cred.signing_key()),
        line_value(&client_out, "identity key:")
    );
    assert_ne!(hex::encode(cred.signing_key()), account_hex);
    assert_eq!(hex::encode(cred.body().mailbox.0), mailbox_hex);

    // The same code a second time is refused, clearly, and enrols nothing.
    let err = shoal_fails(&bin, &["admin", "redeem", "--dir", &admin, &redeem]);
    assert!(err.contains("already redeemed"), "{err}");
    // A code this subnet never issued is refused.
    let forged = tmp.path().join("forged.redeem");
    std::fs::write(
        &forged,
        format!("invite code: {}\n{client_out}", "77".repeat(32)),
    )
    .unwrap();
    let err = shoal_fails(
        &bin,
        &[
            "admin",
            "redeem",
            "--dir",
            &admin,
            &forged.to_string_lossy(),
        ],
    );
    assert!(err.contains("not one this subnet issued"), "{err}");

    // An expired invite is refused.
    let bob_invite = tmp.path().join("bob.invite");
    shoal(
        &bin,
        &[
            "admin",
            "invite",
            "--dir",
            &admin,
            "--gateway",
            &gw,
            "--gateway-key",
            &gw_key_hex,
            "--handle",
            "bob",
            "--role",
            "guest",
            "--valid-secs",
            "1",
            "--out",
            &bob_invite.to_string_lossy(),
            "--network",
            &network,
        ],
    );
    let bob_client = shoal(
        &bin,
        &[
            "client",
            "init",
            "--dir",
            &tmp.path().join("bob-client").to_string_lossy(),
            "--gateway",
            &format!("127.0.0.1:9={gw_key_hex}"),
            "--gateway-client-addr",
            &gw,
            "--authority",
            &format!("127.0.0.1:8={}", "11".repeat(32)),
        ],
    );
    let bob_redeem = tmp.path().join("bob.redeem");
    std::fs::write(
        &bob_redeem,
        format!(
            "{}{bob_client}",
            std::fs::read_to_string(&bob_invite).unwrap()
        ),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = shoal_fails(
        &bin,
        &[
            "admin",
            "redeem",
            "--dir",
            &admin,
            &bob_redeem.to_string_lossy(),
        ],
    );
    assert!(err.contains("expired"), "{err}");

    // The list: ana active with its quota, bob's invite expired; no keys or mailboxes.
    let list = shoal(&bin, &["admin", "list", "--dir", &admin]);
    println!("{list}");
    let row = |l: &str, h: &str| {
        l.lines()
            .find(|r| r.starts_with(h))
            .unwrap_or("")
            .to_owned()
    };
    let ana = row(&list, "ana ");
    assert!(
        ana.contains("staff") && ana.contains(&gw) && ana.contains("active"),
        "{list}"
    );
    // Quota 77 as the gateway reports it, and nothing stored yet.
    assert!(
        ana.trim_end().ends_with(" 77           0           0"),
        "{list}"
    );
    assert!(row(&list, "bob ").contains("invite-expired"), "{list}");
    assert!(
        !list.contains(&account_hex) && !list.contains(&mailbox_hex),
        "{list}"
    );

    shoal(
        &bin,
        &["admin", "deprovision", "--dir", &admin, "--handle", "ana"],
    );
    let list = shoal(&bin, &["admin", "list", "--dir", &admin]);
    println!("{list}");
    assert!(row(&list, "ana ").contains("de-provisioned"), "{list}");
    // A de-provisioned handle's used invite still cannot be replayed.
    let err = shoal_fails(&bin, &["admin", "redeem", "--dir", &admin, &redeem]);
    assert!(err.contains("already redeemed"), "{err}");
}

/// Two subnets federate by exchanging signed offers, with files only: A offers, B
/// previews and accepts (its policy lists A) and hands back a counter-offer, A accepts it
/// (its policy lists B). Tampered, expired, own, replayed and misaddressed offers are
/// refused with a clear error and change nothing.
#[test]
fn subnets_federate_by_exchanging_signed_offers() {
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_shoal"));
    let tmp = tempfile::tempdir().unwrap();
    let init = |name: &str, roles: &str| {
        let dir = tmp.path().join(name).to_string_lossy().into_owned();
        let out = shoal(
            &bin,
            &[
                "admin", "init", "--dir", &dir, "--name", name, "--roles", roles,
            ],
        );
        (dir, line_value(&out, "subnet id:").to_owned())
    };
    let (a, a_id) = init("acme", "staff,guest");
    let (b, b_id) = init("bolt", "staff,lead");
    let (c, _) = init("corp", "staff");
    let path = |f: &str| tmp.path().join(f).to_string_lossy().into_owned();
    let policy_of = |dir: &str| shoal(&bin, &["admin", "policy", "show", "--dir", dir]);

    // A offers: A's staff may talk to B's staff and lead.
    let out = shoal(
        &bin,
        &[
            "admin",
            "federate",
            "offer",
            "--dir",
            &a,
            "--roles",
            "staff",
            "--remote-roles",
            "staff,lead",
            "--out",
            &path("a.offer"),
        ],
    );
    assert!(out.contains("offer written"), "{out}");
    let offer = std::fs::read_to_string(path("a.offer")).unwrap();
    assert!(offer.contains(&a_id), "{offer}");
    assert!(
        !policy_of(&a).contains(&b_id),
        "an offer changes nothing at A"
    );
    // Regression: `--out` with a bare file name (its parent is "") used to fail to write.
    let rel = Command::new(&bin)
        .current_dir(tmp.path())
        .args([
            "admin",
            "federate",
            "offer",
            "--dir",
            &a,
            "--roles",
            "staff",
            "--out",
            "rel.offer",
        ])
        .output()
        .unwrap();
    assert!(
        rel.status.success(),
        "{}",
        String::from_utf8_lossy(&rel.stderr)
    );
    assert!(tmp.path().join("rel.offer").exists());

    // Refusals before anything is accepted: A's own offer, a tampered one.
    let err = shoal_fails(
        &bin,
        &["admin", "federate", "accept", "--dir", &a, &path("a.offer")],
    );
    assert!(err.contains("own offer"), "{err}");
    let line = offer
        .lines()
        .find(|l| l.starts_with("shoal-federation-offer1:"))
        .unwrap();
    let (prefix, payload) = line.split_once(':').unwrap();
    let json = String::from_utf8(b64url::decode(payload)).unwrap();
    // A role changed inside the signed body: valid JSON, a valid offer, a bad signature.
    let changed = json.replace("\\\"lead\\\"", "\\\"guest\\\"");
    assert_ne!(changed, json);
    let tampered = format!("{prefix}:{}\n", b64url::encode(changed.as_bytes()));
    std::fs::write(path("tampered.offer"), tampered).unwrap();
    let err = shoal_fails(
        &bin,
        &[
            "admin",
            "federate",
            "accept",
            "--dir",
            &b,
            &path("tampered.offer"),
        ],
    );
    assert!(err.contains("signature does not verify"), "{err}");

    // B previews: the diff shows A entering B's federation list; nothing is written.
    let preview = shoal(
        &bin,
        &[
            "admin",
            "federate",
            "accept",
            "--dir",
            &b,
            &path("a.offer"),
            "--dry-run",
        ],
    );
    assert!(
        preview
            .lines()
            .any(|l| l.starts_with('+') && l.contains(&format!("\"subnet\": \"{a_id}\""))),
        "{preview}"
    );
    assert!(preview.contains("dry run"), "{preview}");
    assert!(!policy_of(&b).contains(&a_id), "a dry run writes nothing");

    // B accepts: policy v2 lists A (B's staff,lead ↔ A's staff); a counter-offer comes out.
    let out = shoal(
        &bin,
        &[
            "admin",
            "federate",
            "accept",
            "--dir",
            &b,
            &path("a.offer"),
            "--out",
            &path("b.counter"),
        ],
    );
    assert!(out.contains("counter-offer written"), "{out}");
    let shown = policy_of(&b);
    assert!(
        shown.contains("\"version\": 2") && shown.contains(&a_id),
        "{shown}"
    );
    // Accepted once: the same offer again is a replay.
    let err = shoal_fails(
        &bin,
        &["admin", "federate", "accept", "--dir", &b, &path("a.offer")],
    );
    assert!(err.contains("replay"), "{err}");
    // The counter-offer is addressed to A: C cannot use it.
    let err = shoal_fails(
        &bin,
        &[
            "admin",
            "federate",
            "accept",
            "--dir",
            &c,
            &path("b.counter"),
        ],
    );
    assert!(err.contains("addressed to"), "{err}");

    // A accepts the counter-offer: federation complete, both policies list each other.
    let out = shoal(
        &bin,
        &[
            "admin",
            "federate",
            "accept",
            "--dir",
            &a,
            &path("b.counter"),
        ],
    );
    assert!(out.contains("federation complete"), "{out}");
    assert!(
        !out.contains("shoal-federation-offer1:"),
        "no counter to the counter: {out}"
    );
    let pa: serde_json::Value = serde_json::from_str(&policy_of(&a)).unwrap();
    let pb: serde_json::Value = serde_json::from_str(&policy_of(&b)).unwrap();
    let fed = |p: &serde_json::Value| p["federation"][0].clone();
    assert_eq!(fed(&pa)["subnet"], b_id.as_str());
    assert_eq!(fed(&pa)["local_roles"], serde_json::json!(["staff"]));
    assert_eq!(
        fed(&pa)["remote_roles"],
        serde_json::json!(["staff", "lead"])
    );
    assert_eq!(fed(&pb)["subnet"], a_id.as_str());
    assert_eq!(
        fed(&pb)["local_roles"],
        serde_json::json!(["staff", "lead"])
    );
    assert_eq!(fed(&pb)["remote_roles"], serde_json::json!(["staff"]));
    let err = shoal_fails(
        &bin,
        &[
            "admin",
            "federate",
            "accept",
            "--dir",
            &a,
            &path("b.counter"),
        ],
    );
    assert!(err.contains("replay"), "{err}");

    // An expired offer is refused.
    shoal(
        &bin,
        &[
            "admin",
            "federate",
            "offer",
            "--dir",
            &c,
            "--roles",
            "staff",
            "--expires",
            "1s",
            "--out",
            &path("c.offer"),
        ],
    );
    std::thread::sleep(Duration::from_millis(2100));
    let err = shoal_fails(
        &bin,
        &["admin", "federate", "accept", "--dir", &a, &path("c.offer")],
    );
    assert!(err.contains("expired"), "{err}");
    assert!(
        !policy_of(&a).contains("\"version\": 3"),
        "refusals change nothing"
    );
}

/// base64url without padding, as offers are written (the test checks the bytes itself).
mod b64url {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let mut n = 0u32;
            for (i, b) in chunk.iter().enumerate() {
                n |= u32::from(*b) << (16 - 8 * i);
            }
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    pub fn decode(text: &str) -> Vec<u8> {
        let vals: Vec<u32> = text
            .bytes()
            .map(|c| ALPHABET.iter().position(|a| *a == c).unwrap() as u32)
            .collect();
        let mut out = Vec::new();
        for chunk in vals.chunks(4) {
            let mut n = 0u32;
            for (i, v) in chunk.iter().enumerate() {
                n |= v << (18 - 6 * i);
            }
            for i in 0..chunk.len() - 1 {
                out.push((n >> (16 - 8 * i)) as u8);
            }
        }
        out
    }

    #[test]
    fn round_trip() {
        for s in ["", "a", "ab", "abc", "abcd", "{\"body\":1}"] {
            assert_eq!(decode(&encode(s.as_bytes())), s.as_bytes());
        }
        assert_eq!(encode(b"hello"), "aGVsbG8");
    }
}

/// Acks `ids` on the member's link.
async fn ack(m: &mut Member, ids: Vec<u64>) {
    let frame = ClientMsg::Ack { ids }.to_frame().unwrap();
    m.tx.send(frame.as_bytes()).await.unwrap();
}

/// `admin list`'s row for `handle`, split into columns.
fn list_row(bin: &Path, admin: &str, handle: &str) -> (Vec<String>, String) {
    list_row_within(bin, admin, handle, "60")
}

/// [`list_row`] waiting at most `secs` for the gateways' reports.
fn list_row_within(bin: &Path, admin: &str, handle: &str, secs: &str) -> (Vec<String>, String) {
    let list = shoal(
        bin,
        &["admin", "list", "--dir", admin, "--timeout-secs", secs],
    );
    let row = list
        .lines()
        .find(|l| l.split_whitespace().next() == Some(handle))
        .unwrap_or_else(|| panic!("no row for {handle}:\n{list}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    (row, list)
}

/// Quota use in `admin list`, asked of a real gateway process by a signed read-only
/// command. The gateway answers coarsely (items in steps of an eighth of the quota) and
/// once per 15 minutes per subnet: asked again after alice's real client has a message
/// durable in bob's mailbox (it crossed the mixnet), it refuses, and `list` says so and
/// still shows the admin's records; with the gateway gone, `list` still works and says
/// the gateway is unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_list_shows_coarse_mailbox_use_once_per_interval() {
    use shoal_client::{Contact, ContactCard};

    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_shoal"));
    let tmp = tempfile::tempdir().unwrap();
    let admin_dir = tmp.path().join("acme");
    let admin = admin_dir.to_string_lossy().into_owned();
    let out = shoal(&bin, &["admin", "init", "--dir", &admin, "--name", "acme"]);
    let mut subnet = [0u8; 32];
    hex::decode_to_slice(line_value(&out, "subnet id:"), &mut subnet).unwrap();

    // The gateway is made before the authority's first document, so routes reach it.
    let cfg = TestnetConfig {
        relays_per_layer: 1,
        bootstrap_secs: 6,
        workers: Some(1),
        lambda_m: 1.0,
        ..TestnetConfig::default()
    };
    let mut net = Testnet::start(&bin, tmp.path(), &cfg).unwrap();
    let init = net
        .init_gateway(&bin, 0, &GatewayOptions::default())
        .unwrap();
    Testnet::host_subnet(&init, &subnet).unwrap();
    let (gw_addr, gw_key) = (init.client_addr, init.id);
    let gw = gw_addr.to_string();
    let gw_key_hex = hex::encode(gw_key);
    let authority = format!(
        "{}={}",
        net.authority_addr,
        hex::encode(net.authorities.keys[0].0)
    );
    let alice_dir = tmp.path().join("alice").to_string_lossy().into_owned();
    let alice_out = shoal(
        &bin,
        &[
            "client",
            "init",
            "--dir",
            &alice_dir,
            "--gateway",
            &format!("{}={gw_key_hex}", init.link_addr),
            "--gateway-client-addr",
            &gw,
            "--authority",
            &authority,
            "--threshold",
            "1",
            "--name",
            "alice",
        ],
    );
    let office = prepare_admin_client(&net, &init, &admin, tmp.path());
    net.run_gateway(&bin, init).unwrap();
    net.others.push(run_client(&office));

    // Bob is the test's own raw client: a link key, a mailbox, a seal key.
    let bob_key = SigningKey::from_bytes(&[0x51; 32]);
    let bob_box = [0x5b; 32];
    let bob_seal = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([0x52; 32]));
    let enroll = |handle: &str, account: &str, identity: &str, mailbox: &str, seal: &str| {
        [
            "admin",
            "enroll",
            "--dir",
            &admin,
            "--gateway",
            &gw,
            "--gateway-key",
            &gw_key_hex,
            "--handle",
            handle,
            "--role",
            "member",
            "--account-key",
            account,
            "--identity-key",
            identity,
            "--mailbox",
            mailbox,
            "--seal-key",
            seal,
        ]
        .map(str::to_owned)
    };
    let alice_args = enroll(
        "alice",
        line_value(&alice_out, "account key:"),
        line_value(&alice_out, "identity key:"),
        line_value(&alice_out, "mailbox:"),
        &"cd".repeat(32),
    );
    // Through the admin's client and the mixnet: it waits for the gateway's answer.
    shoal(&bin, &alice_args.each_ref().map(String::as_str));
    let bob_args = enroll(
        "bob",
        &hex::encode(bob_key.verifying_key().to_bytes()),
        &"b1".repeat(32),
        &hex::encode(bob_box),
        &hex::encode(bob_seal.to_bytes()),
    );
    shoal(&bin, &bob_args.each_ref().map(String::as_str));

    let (row, list) = list_row(&bin, &admin, "bob");
    println!("{list}");
    assert_eq!(
        row[5..],
        ["10000", "0", "0"],
        "quota, stored, bytes:\n{list}"
    );

    // Alice's real client sends to bob's card; `send --wait` returns once the SURB-ack
    // says the message is durable in bob's mailbox.
    let card = ContactCard::new(
        "bob",
        Contact {
            mailbox: bob_box,
            gateway: gw_key,
            public_key: bob_seal.to_bytes(),
        },
    )
    .unwrap()
    .to_text();
    shoal(
        &bin,
        &[
            "client", "contact", "add", "--dir", &alice_dir, "bob", &card,
        ],
    );
    // Only her running client sends; `send --wait` returns with its receipt.
    let alice_bg = crate::support::cli_net::start_background(Path::new(&alice_dir));
    let sent = shoal(
        &bin,
        &[
            "client",
            "send",
            "--dir",
            &alice_dir,
            "--to",
            "bob",
            "--wait",
            "--timeout-secs",
            "60",
            "hello bob",
        ],
    );
    assert!(sent.contains("delivered to bob's mailbox"), "{sent}");
    alice_bg.stop();

    // Asked again within 15 minutes: the gateway refuses, so polling cannot time who
    // gets mail when; the listing still shows the admin's own records.
    let (row, list) = list_row(&bin, &admin, "bob");
    println!("{list}");
    assert_eq!(row[3], "active", "{list}");
    assert_eq!(row[6], "refused", "{list}");
    assert!(
        list.contains(&format!("gateway {gw} refused the usage query")),
        "{list}"
    );
    assert!(
        !list.contains(&hex::encode(bob_box))
            && !list.contains(&hex::encode(bob_key.verifying_key().to_bytes())),
        "no mailbox or key in the listing:\n{list}"
    );

    // The refusal hid nothing from bob: alice's message waits in his mailbox.
    let mut bob = Member::connect(&bob_key, gw_addr, gw_key).await;
    let mut pulled = Vec::new();
    for _ in 0..50 {
        pulled = bob.pull_item_ids().await;
        if !pulled.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!pulled.is_empty(), "alice's message is in bob's mailbox");
    ack(&mut bob, pulled).await;

    // The gateway gone: the listing still works, and says so.
    for g in &mut net.gateways {
        g.proc.kill();
    }
    let started = std::time::Instant::now();
    let (row, list) = list_row_within(&bin, &admin, "bob", "5");
    println!("{list}");
    assert_eq!(row[6], "unreachable", "{list}");
    assert!(
        list.contains(&format!("gateway {gw} unreachable")),
        "{list}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let offline = shoal(&bin, &["admin", "list", "--dir", &admin, "--offline"]);
    assert!(!offline.contains("unreachable"), "{offline}");
}

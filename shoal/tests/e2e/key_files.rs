//! Every `init` leaves its secrets owner-only: key files and stores 0600, and the
//! directories that hold them 0700 where the command creates them. Every `keys rotate`
//! replaces the key atomically, keeps it 0600, refuses what would strand users or stop
//! the network, and leaves a node that starts with the new key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::authorities;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn shoal(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shoal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn every_init_writes_secrets_owner_only() {
    let tmp = tempfile::tempdir().unwrap();
    let d = |name: &str| tmp.path().join(name).to_string_lossy().into_owned();
    let authority_key = shoal(&[
        "authority",
        "init",
        "--dir",
        &d("authority"),
        "--listen",
        "127.0.0.1:8000",
    ]);
    let authority_key = authority_key.lines().next().unwrap().trim().to_owned();
    let authority = format!("127.0.0.1:8000={authority_key}");
    shoal(&[
        "relay",
        "init",
        "--dir",
        &d("relay"),
        "--authority",
        &authority,
    ]);
    shoal(&[
        "gateway",
        "init",
        "--dir",
        &d("gateway"),
        "--authority",
        &authority,
    ]);
    shoal(&["admin", "init", "--dir", &d("admin"), "--name", "acme"]);
    let gateway_id = std::fs::read_to_string(tmp.path().join("gateway/identity.key")).unwrap();
    let gateway_public = ed25519_dalek::SigningKey::from_bytes(
        &hex::decode(gateway_id.trim()).unwrap().try_into().unwrap(),
    )
    .verifying_key();
    shoal(&[
        "client",
        "init",
        "--dir",
        &d("client"),
        "--gateway",
        &format!("127.0.0.1:7101={}", hex::encode(gateway_public.to_bytes())),
        "--gateway-client-addr",
        "127.0.0.1:7102",
        "--authority",
        &authority,
    ]);

    let secrets = [
        "authority/authority.key",
        "relay/identity.key",
        "gateway/identity.key",
        "admin/admin.key",
        "client/client.redb",
    ];
    for s in secrets {
        let p = tmp.path().join(s);
        assert_eq!(mode(&p), 0o600, "{s} is {:o}", mode(&p));
    }
    for dir in ["authority", "relay", "gateway", "admin", "client"] {
        let p = tmp.path().join(dir);
        assert_eq!(mode(&p), 0o700, "{dir}/ is {:o}", mode(&p));
    }
}

/// `shoal ARGS`, success or not.
fn shoal_out(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env("SHOAL_LOG", "warn")
        .output()
        .unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The Ed25519 public key (hex) of a hex secret-key file.
fn public_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let secret: [u8; 32] = hex::decode(text.trim()).unwrap().try_into().unwrap();
    hex::encode(
        ed25519_dalek::SigningKey::from_bytes(&secret)
            .verifying_key()
            .to_bytes(),
    )
}

/// Starts `shoal ARGS` and returns it with the first stdout line that starts with
/// `prefix` (within 30 s). The caller kills it.
fn start_and_read(args: &[&str], prefix: &str) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env("SHOAL_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = prefix.to_owned();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.strip_prefix(&wanted) {
                let _ = tx.send(rest.trim().to_owned());
            }
        }
    });
    match rx.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(value) => (child, value),
        Err(_) => {
            let _ = child.kill();
            panic!("shoal {args:?} printed no {prefix:?} line");
        }
    }
}

#[test]
fn gateway_keys_rotate_replaces_the_identity_and_the_gateway_runs_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gateway");
    let authority = format!(
        "127.0.0.1:9={}",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    );
    shoal(&[
        "gateway",
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--client-listen",
        "127.0.0.1:0",
        "--authority",
        &authority,
    ]);
    let config = dir.join("gateway.toml");
    let config = config.to_str().unwrap();
    let id_file = dir.join("identity.key");
    let first = public_of(&id_file);

    // No accounts yet: nobody pins this identity, so no --force is needed.
    let out = shoal(&["gateway", "keys", "rotate", "--config", config]);
    let second = public_of(&id_file);
    assert_ne!(first, second);
    assert!(
        out.contains(&format!("gateway identity: {second}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("old identity {first} deleted")),
        "{out}"
    );
    assert_eq!(mode(&id_file), 0o600);
    assert!(
        !std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .any(|e| { e.file_name().to_string_lossy().ends_with(".tmp") })
    );

    // With an account, its client pins the identity: refused unless forced.
    let client_key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
    shoal(&[
        "gateway",
        "account",
        "add",
        "--config",
        config,
        "--key",
        &hex::encode(client_key.to_bytes()),
        "--mailbox",
        &"ab".repeat(32),
    ]);
    let refused = shoal_out(&["gateway", "keys", "rotate", "--config", config]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("1 accounts") && stderr(&refused).contains("--force"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(
        public_of(&id_file),
        second,
        "a refused rotation changes nothing"
    );
    let out = shoal(&["gateway", "keys", "rotate", "--config", config, "--force"]);
    let third = public_of(&id_file);
    assert_ne!(second, third);
    assert!(out.contains("client.toml"), "{out}");
    assert_eq!(mode(&id_file), 0o600);

    // The operator certifies the new key, as the output says; then the gateway starts
    // with it (a certificate for the old key would be refused).
    assert!(out.contains("shoal operator certify"), "{out}");
    let operator = tmp.path().join("operator");
    shoal(&["operator", "keygen", "--dir", operator.to_str().unwrap()]);
    shoal(&[
        "operator",
        "certify",
        "--dir",
        operator.to_str().unwrap(),
        "--node",
        &third,
        "--role",
        "gateway",
        "--out",
        dir.join("operator.cert").to_str().unwrap(),
    ]);
    let (mut gateway, identity) = start_and_read(
        &["gateway", "run", "--config", config],
        "gateway identity: ",
    );
    assert_eq!(identity, third);
    let _ = gateway.kill();
    let _ = gateway.wait();
    // The account survived: registering its key again is refused.
    let again = shoal_out(&[
        "gateway",
        "account",
        "add",
        "--config",
        config,
        "--key",
        &hex::encode(client_key.to_bytes()),
        "--mailbox",
        &"cd".repeat(32),
    ]);
    assert!(
        !again.status.success() && stderr(&again).contains("already"),
        "{}",
        stderr(&again)
    );
}

/// A single authority (threshold 1 of 1) cannot rotate without an outage: refused unless
/// forced. An interrupted rotation (a `.next` key left behind) is finished by a rerun.
#[test]
fn authority_keys_rotate_alone_needs_force_and_a_rerun_finishes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("authority");
    let listen = authorities::free_addr().to_string();
    let first = shoal(&[
        "authority",
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--listen",
        &listen,
    ]);
    let first = first.trim();
    let config = dir.join("authority.toml");
    let config = config.to_str().unwrap();
    let key_file = dir.join("authority.key");
    assert_eq!(public_of(&key_file), first);

    let refused = shoal_out(&["authority", "keys", "rotate", "--config", config]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("--force"), "{}", stderr(&refused));
    assert_eq!(
        public_of(&key_file),
        first,
        "a refused rotation changes nothing"
    );

    let out = shoal_out(&["authority", "keys", "rotate", "--config", config, "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let second = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(public_of(&key_file), second);
    assert_ne!(first, second);
    assert_eq!(mode(&key_file), 0o600);
    let text = std::fs::read_to_string(dir.join("authority.toml")).unwrap();
    assert!(text.contains(&second) && !text.contains(first), "{text}");
    assert!(stderr(&out).contains("authority_keys"), "{}", stderr(&out));

    // A crash after the new key was written but before anything else: rerunning
    // finishes with that key rather than making another.
    let pending = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let next = dir.join("authority.key.next");
    std::fs::write(&next, format!("{}\n", hex::encode(pending.to_bytes()))).unwrap();
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = shoal_out(&["authority", "keys", "rotate", "--config", config, "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let third = hex::encode(pending.verifying_key().to_bytes());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), third);
    assert_eq!(public_of(&key_file), third);
    assert!(!next.exists());
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
}

/// One of three authorities (k = 2) rotates. It runs with its new key while the other
/// two still list its old one: they keep publishing, and the documents served are
/// accepted both by parties still pinning the old key and by those with the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authority_keys_rotate_keeps_the_network_publishing() {
    use authorities::{Authorities, descriptor, free_addr, get, now_unix};
    use shoal_topology::{AuthoritySet, Hex32, Role, UncheckedDocument};
    use std::time::{Duration, Instant};

    let tmp = tempfile::tempdir().unwrap();
    let addrs: Vec<_> = (0..3).map(|_| free_addr()).collect();
    let edits = [
        ("sync_interval_secs", "1".to_string()),
        // The descriptors are posted after a rotate subprocess and a GET; a document
        // voted before they arrive would be final without them.
        ("bootstrap_delay_secs", "5".to_string()),
    ];
    let mut procs = Authorities::init(tmp.path(), addrs.clone(), now_unix() - 60, 2, &[], &edits);
    let old_set = procs.set.clone();
    let config = procs.dirs[0].join("authority.toml");
    let config = config.to_str().unwrap().to_owned();
    let key_file = procs.dirs[0].join("authority.key");

    // The other two reach k = 2 alone: no --force needed.
    let out = shoal_out(&["authority", "keys", "rotate", "--config", &config]);
    assert!(out.status.success(), "{}", stderr(&out));
    let new_key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_ne!(new_key, procs.keys[0]);
    assert_eq!(public_of(&key_file), new_key);
    assert_eq!(mode(&key_file), 0o600);
    assert!(stderr(&out).contains("the other 2 authorities (threshold 2) keep publishing"));
    let mut new_keys = old_set.keys.clone();
    hex::decode_to_slice(&new_key, &mut new_keys[0].0).unwrap();
    let new_set = AuthoritySet {
        threshold: 2,
        keys: new_keys,
    };

    for i in 0..3 {
        procs.start(i);
    }
    for i in 0..3 {
        procs.wait_until_up(i).await;
    }
    // Running: a rotation now is refused.
    let refused = shoal_out(&["authority", "keys", "rotate", "--config", &config]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("stop the authority"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(public_of(&key_file), new_key);

    // It announces its new key.
    let (status, network) = get(addrs[0], "/v1/network").await;
    assert_eq!(status, 200);
    let network: serde_json::Value = serde_json::from_slice(&network).unwrap();
    assert_eq!(network["authorities"]["keys"][0], new_key.as_str());

    let now = now_unix();
    for (i, role) in [
        (1, Role::Relay),
        (2, Role::Relay),
        (3, Role::Relay),
        (101, Role::Gateway),
    ] {
        let d = descriptor(i, role, now, 0..2);
        let (status, body) = shoal_link::http::post(addrs[1], "/v1/descriptor", &d.to_json())
            .await
            .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    // A document is published at k = 2 signatures and gains the third at the next sync.
    // Until then one signed by the new key and one other verifies only for the new pins,
    // so poll until every authority serves one that both pin sets accept.
    let verify = |doc: &[u8], set: &AuthoritySet| -> Result<usize, String> {
        let topo = UncheckedDocument::parse(doc)
            .map_err(|e| e.to_string())?
            .check_signatures(set)
            .map_err(|e| e.to_string())?
            .check_valid_at(now_unix())
            .map_err(|e| e.to_string())?;
        Ok(topo.nodes().count())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let docs = loop {
        let mut docs = Vec::new();
        let mut pending = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let (status, doc) = get(*addr, "/v1/document/current").await;
            if status != 200 {
                pending.push(format!("authority {i}: status {status}"));
            }
            for (pins, set) in [("old", &old_set), ("new", &new_set)] {
                if status == 200
                    && let Err(e) = verify(&doc, set)
                {
                    pending.push(format!("authority {i}'s document, {pins} key pinned: {e}"));
                }
            }
            docs.push(doc);
        }
        if pending.is_empty() {
            break docs;
        }
        assert!(
            Instant::now() < deadline,
            "no document both pin sets accept during the rotation: {pending:?}\n{}",
            procs.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for doc in &docs {
        assert_eq!(verify(doc, &old_set), Ok(4));
        assert_eq!(verify(doc, &new_set), Ok(4));
    }
    // The old key signs nothing any more.
    let old0 = Hex32(old_set.keys[0].0);
    for doc in &docs {
        let signed: shoal_topology::SignedDocument = serde_json::from_slice(doc).unwrap();
        assert!(signed.signatures.iter().all(|s| s.authority != old0));
    }
}

/// Regression: a relay initialised but never started could not be rotated ("cannot
/// sync directory .../sphinx").
#[test]
fn relay_keys_rotate_before_the_first_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("relay");
    shoal(&[
        "relay",
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--authority",
        "127.0.0.1:9=d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
    ]);
    let id_file = dir.join("identity.key");
    let before = public_of(&id_file);
    let config = dir.join("relay.toml");
    let out = shoal(&[
        "relay",
        "keys",
        "rotate",
        "--config",
        config.to_str().unwrap(),
    ]);
    let after = public_of(&id_file);
    assert_ne!(before, after);
    assert!(out.contains(&format!("relay identity: {after}")), "{out}");
    assert_eq!(mode(&id_file), 0o600);
}

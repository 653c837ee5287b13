//! Three real `shoal authority` processes on loopback, k = 2 of 3.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use shoal_link::http;
use shoal_topology::{
    AuthoritySet, Descriptor, DocumentBody, Hex32, Role, SignedDescriptor, SphinxKeyEntry,
    UncheckedDocument,
};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// Kills every process it holds when dropped, also when a test panics.
struct Procs(Vec<(Child, PathBuf)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Procs {
    fn start(&mut self, dir: &Path) {
        let log = dir.join("stderr.log");
        let child = Command::new(SHOAL)
            .args(["authority", "run", "--config"])
            .arg(dir.join("authority.toml"))
            .env("SHOAL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.0.push((child, log));
    }

    fn logs(&self) -> String {
        self.0
            .iter()
            .map(|(_, log)| {
                format!(
                    "--- {}\n{}",
                    log.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            })
            .collect()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn shoal(args: &[&str]) -> String {
    let out = Command::new(SHOAL).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "shoal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn descriptor(i: u8, role: Role, now: u64) -> SignedDescriptor {
    let key = SigningKey::from_bytes(&[i; 32]);
    Descriptor {
        identity: Hex32(key.verifying_key().to_bytes()),
        role,
        link_addr: format!("127.0.0.1:{}", 9000 + u16::from(i)),
        sphinx_keys: [0, 1]
            .map(|epoch| SphinxKeyEntry {
                epoch,
                key: Hex32([i.wrapping_add(epoch as u8); 32]),
            })
            .to_vec(),
        published_unix: now,
    }
    .sign(&key)
    .unwrap()
}

async fn get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    http::get(addr, path).await.unwrap_or((0, Vec::new()))
}

async fn wait_until_up(addr: SocketAddr, procs: &Procs) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(addr, "/v1/network").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "{addr} did not come up\n{}",
            procs.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn post_all(addr: SocketAddr, ds: &[SignedDescriptor]) {
    for d in ds {
        let (status, body) = http::post(addr, "/v1/descriptor", &d.to_json())
            .await
            .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_authorities_publish_one_document() {
    let base = std::env::temp_dir().join(format!("shoal-authority-it-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let dirs: Vec<PathBuf> = (0..3).map(|i| base.join(format!("a{i}"))).collect();
    // Genesis a minute ago, hour-long epochs: the whole test runs in epoch 0.
    let genesis = (now_unix() - 60).to_string();

    // First init to learn every key, then init again with the peers; the key is kept.
    let keys: Vec<String> = (0..3)
        .map(|i| {
            let (dir, listen) = (dirs[i].to_str().unwrap(), addrs[i].to_string());
            shoal(&[
                "authority",
                "init",
                "--dir",
                dir,
                "--listen",
                &listen,
                "--genesis",
                &genesis,
            ])
        })
        .collect();
    for i in 0..3 {
        let (dir, listen) = (dirs[i].to_str().unwrap(), addrs[i].to_string());
        let mut args = vec![
            "authority",
            "init",
            "--dir",
            dir,
            "--listen",
            &listen,
            "--genesis",
            &genesis,
        ];
        args.extend(["--threshold", "2", "--force"]);
        let peers: Vec<String> = (0..3)
            .filter(|&j| j != i)
            .map(|j| format!("{}={}", addrs[j], keys[j]))
            .collect();
        for p in &peers {
            args.extend(["--peer", p.as_str()]);
        }
        assert_eq!(shoal(&args), keys[i], "re-init must keep the key");
        // Faster than the defaults, for the test.
        let path = dirs[i].join("authority.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text
            .replace("sync_interval_secs = 10", "sync_interval_secs = 1")
            .replace("bootstrap_delay_secs = 60", "bootstrap_delay_secs = 2");
        std::fs::write(&path, text).unwrap();
    }
    let auths = AuthoritySet {
        threshold: 2,
        keys: keys
            .iter()
            .map(|k| {
                let mut b = [0u8; 32];
                hex::decode_to_slice(k, &mut b).unwrap();
                Hex32(b)
            })
            .collect(),
    };

    let now = now_unix();
    let first: Vec<SignedDescriptor> = (1..=3)
        .map(|i| descriptor(i, Role::Relay, now))
        .chain([descriptor(101, Role::Gateway, now)])
        .collect();
    let second: Vec<SignedDescriptor> = (4..=5)
        .map(|i| descriptor(i, Role::Relay, now))
        .chain([descriptor(102, Role::Gateway, now)])
        .collect();

    let mut procs = Procs(Vec::new());
    // Authority 0 alone: it votes, but one signature of two is never served.
    procs.start(&dirs[0]);
    wait_until_up(addrs[0], &procs).await;
    post_all(addrs[0], &first).await;
    let (status, body) = http::post(addrs[0], "/v1/descriptor", b"{}").await.unwrap();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert_eq!(get(addrs[0], "/v1/nothing").await.0, 404);
    let deadline = Instant::now() + Duration::from_secs(6);
    while get(addrs[0], "/v1/vote/0").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "authority 0 never voted\n{}",
            procs.logs()
        );
        assert_eq!(get(addrs[0], "/v1/document/0").await.0, 404);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..10 {
        assert_eq!(
            get(addrs[0], "/v1/document/0").await.0,
            404,
            "{}",
            procs.logs()
        );
        assert_eq!(get(addrs[0], "/v1/document/current").await.0, 404);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The other two join; one of them gets descriptors authority 0 does not have.
    procs.start(&dirs[1]);
    procs.start(&dirs[2]);
    wait_until_up(addrs[1], &procs).await;
    post_all(addrs[1], &second).await;
    wait_until_up(addrs[2], &procs).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    let served = loop {
        let mut docs = Vec::new();
        for &addr in &addrs {
            docs.push(get(addr, "/v1/document/current").await);
        }
        let complete = docs.iter().all(|(s, d)| *s == 200 && *d == docs[0].1)
            && serde_json::from_slice::<shoal_topology::SignedDocument>(&docs[0].1)
                .ok()
                .and_then(|d| serde_json::from_str::<DocumentBody>(&d.body).ok())
                .is_some_and(|b| b.nodes.len() == 7);
        if complete {
            break docs.swap_remove(0).1;
        }
        assert!(
            Instant::now() < deadline,
            "no common document: {:?}\n{}",
            docs.iter().map(|(s, d)| (*s, d.len())).collect::<Vec<_>>(),
            procs.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let topo = UncheckedDocument::parse(&served)
        .unwrap()
        .check_signatures(&auths)
        .unwrap()
        .check_valid_at(now_unix())
        .unwrap();
    assert_eq!(topo.epoch(), 0);
    assert!(topo.signed().signatures.len() >= 2);
    assert_eq!(topo.gateways().len(), 2);
    assert_eq!((0..3).map(|l| topo.layer(l).len()).sum::<usize>(), 5);
    // The same document under its epoch number, and the network description.
    assert_eq!(get(addrs[2], "/v1/document/0").await, (200, served.clone()));
    let (status, network) = get(addrs[1], "/v1/network").await;
    assert_eq!(status, 200);
    let network: serde_json::Value = serde_json::from_slice(&network).unwrap();
    assert_eq!(network["authorities"]["threshold"], 2);
    assert_eq!(network["schedule"]["length_secs"], 3600);

    // An operator asks why a node is missing: one whose descriptor has no key for epoch 0.
    let keyless = {
        let key = SigningKey::from_bytes(&[77; 32]);
        Descriptor {
            identity: Hex32(key.verifying_key().to_bytes()),
            role: Role::Relay,
            link_addr: "127.0.0.1:9077".into(),
            sphinx_keys: vec![SphinxKeyEntry {
                epoch: 5,
                key: Hex32([77; 32]),
            }],
            published_unix: now,
        }
        .sign(&key)
        .unwrap()
    };
    post_all(addrs[0], &[keyless]).await;
    let status = shoal(&["authority", "status", "--addr", &addrs[0].to_string()]);
    let current: Vec<&str> = status.split("next epoch").next().unwrap().lines().collect();
    assert!(
        current[0].starts_with("current epoch 0 (published)"),
        "{status}"
    );
    let included = current
        .iter()
        .filter(|l| l.starts_with("  ") && !l.contains("left out"))
        .count();
    assert_eq!(included, 7, "{status}");
    let missing: Vec<_> = current
        .iter()
        .filter(|l| l.contains("127.0.0.1:9077"))
        .collect();
    assert_eq!(missing.len(), 1, "{status}");
    assert!(
        missing[0].contains("no Sphinx key for this epoch"),
        "{status}"
    );

    let logs = procs.logs();
    assert!(logs.contains("published directory document"), "{logs}");
    assert!(!logs.contains("WARN") && !logs.contains("ERROR"), "{logs}");

    // SIGTERM stops an authority cleanly.
    let pid = procs.0[2].0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = procs.0[2].0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    drop(procs);
    let _ = std::fs::remove_dir_all(&base);
}

//! Metric names are an interface: `docs/metrics.md` lists exactly what a running gateway
//! (which is also a mixing node) exports, and the shipped Grafana dashboard and Prometheus
//! alert rules use only documented names.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use shoal_bench::testnet::{GatewayOptions, Testnet, TestnetConfig};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Every `shoal_*` identifier in `text`, with a summary's `_sum`/`_count` folded into its
/// family.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("shoal_") {
        let rest = &text[i..];
        let end = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()))
            .unwrap_or(rest.len());
        let name = &rest[..end];
        // Skip substrings of longer identifiers (`x_shoal_...`).
        if i > 0 && text.as_bytes()[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let family = name
            .strip_suffix("_sum")
            .or_else(|| name.strip_suffix("_count"))
            .unwrap_or(name);
        // Dashboard/alert ids like `shoal-nodes` are not metric names.
        if family.len() > "shoal_".len() && family != "shoal_" {
            out.insert(family.to_owned());
        }
    }
    out
}

fn documented() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    doc.lines()
        .filter(|l| l.starts_with("| `shoal_"))
        .filter_map(|l| l.split('`').nth(1).map(str::to_owned))
        .collect()
}

#[test]
fn dashboard_and_alerts_use_only_documented_metrics() {
    let documented = documented();
    for file in [
        "deploy/grafana/shoal-nodes.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        let used = names_in(&text);
        assert!(!used.is_empty(), "{file} uses no metric");
        let unknown: Vec<_> = used.difference(&documented).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses undocumented metrics {unknown:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_gateway_exports_exactly_the_documented_metrics() {
    let shoal = std::path::PathBuf::from(env!("CARGO_BIN_EXE_shoal"));
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TestnetConfig {
        relays_per_layer: 1,
        bootstrap_secs: 1,
        // Relay loop cover, so links open and the status has loops to report.
        lambda_m: 5.0,
        ..TestnetConfig::default()
    };
    let mut net = Testnet::start(&shoal, tmp.path(), &cfg).unwrap();
    let init = net
        .init_gateway(&shoal, 0, &GatewayOptions::default())
        .unwrap();
    let metrics_addr = init.metrics_addr;
    net.run_gateway(&shoal, init).unwrap();

    let mut body = String::new();
    for _ in 0..100 {
        if let Ok((_, b)) = shoal_link::http::get(metrics_addr, "/metrics").await {
            body = String::from_utf8_lossy(&b).into_owned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!body.is_empty(), "gateway never served /metrics");
    let exported: BTreeSet<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next().map(str::to_owned))
        .collect();
    let documented = documented();
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&exported).collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "docs/metrics.md is out of date: exported but undocumented {undocumented:?}, \
         documented but not exported {missing:?}"
    );

    // `shoal relay status` reads the same endpoint: healthy once the relay has a
    // directory and links (exit 0), with the figures an operator looks at.
    let relay_config = tmp.path().join("relay0").join("relay.toml");
    let mut last = None;
    let mut failing = String::new();
    for _ in 0..100 {
        let out = std::process::Command::new(&shoal)
            .args(["relay", "status", "--config"])
            .arg(&relay_config)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            last = Some(text);
            break;
        }
        failing = text;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = last.unwrap_or_else(|| panic!("the relay never reported healthy:\n{failing}"));
    for line in [
        "directory      epoch",
        concat!("version        ", env!("CARGO_PKG_VERSION")),
        "links",
        "loop cover",
        "health         ok",
    ] {
        assert!(status.contains(line), "{status}");
    }
    // The gateway's status adds its mailboxes.
    let out = std::process::Command::new(&shoal)
        .args(["gateway", "status", "--config"])
        .arg(tmp.path().join("gateway0").join("gateway.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mailboxes      0 accounts"), "{text}");

    // Keys are not rotated under a running relay.
    let rotate = |config: &Path| {
        std::process::Command::new(&shoal)
            .args(["relay", "keys", "rotate", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    let refused = rotate(&relay_config);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("stop the relay"));

    // A node that is not running is an error, not a silent "ok".
    drop(net);
    let out = std::process::Command::new(&shoal)
        .args(["relay", "status", "--config"])
        .arg(&relay_config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not answering"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Stopped: the identity is replaced.
    let id_file = tmp.path().join("relay0").join("identity.key");
    let before = std::fs::read_to_string(&id_file).unwrap();
    let rotated = rotate(&relay_config);
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let after = std::fs::read_to_string(&id_file).unwrap();
    assert_ne!(before, after);
    assert!(String::from_utf8_lossy(&rotated.stdout).contains("relay identity: "));
}

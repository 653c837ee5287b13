//! `shoal demo --json` as a user runs it: real processes on loopback, every message
//! delivered exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

fn demo(extra: &[&str]) -> serde_json::Value {
    let out = Command::new(SHOAL)
        .args(["demo", "--json"])
        .args(extra)
        .env("SHOAL_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "shoal demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn check(r: &serde_json::Value) {
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent > 0, "{r}");
    assert_eq!(r["delivered"].as_u64().unwrap(), sent, "{r}");
    assert_eq!(r["lost"].as_u64().unwrap(), 0, "{r}");
    assert_eq!(r["duplicates"].as_u64().unwrap(), 0, "{r}");
    assert_eq!(r["misdelivered"].as_u64().unwrap(), 0, "{r}");
    let p50 = r["latency_ms"]["p50"].as_f64().unwrap();
    let p99 = r["latency_ms"]["p99"].as_f64().unwrap();
    assert!(p50 > 0.0 && p99 >= p50, "{r}");
    assert!(r["expected_mixing_delay_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["real_packets"].as_u64().unwrap() >= sent, "{r}");
    assert!(r["cover_packets"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn demo_delivers_every_message_exactly_once() {
    check(&demo(&[]));
}

#[test]
fn demo_delivers_every_message_with_five_percent_loss() {
    let r = demo(&["--loss", "5"]);
    check(&r);
    assert!(r["packets"]["retransmissions"].as_u64().is_some(), "{r}");
}

//! `shoal demo --json` as a user runs it: real processes on loopback, every message
//! delivered exactly once, and the managed story (subnets, a federated MLS group,
//! policy refusals, de-provisioning) with real values.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::sync::Mutex;

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// One demo at a time: each is a whole network of processes, and two at once on a
/// loaded 2-core CI runner starved each other past the demo's delivery timeout.
static ONE_NETWORK: Mutex<()> = Mutex::new(());

fn demo(extra: &[&str]) -> serde_json::Value {
    let _one = ONE_NETWORK.lock().unwrap_or_else(|e| e.into_inner());
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
    check_managed(r);
}

/// The managed story: three subnets, one group across A and B with every message
/// delivered, C → A refused at the sender and dropped at the recipient, and the
/// de-provisioned member removed from the group by every remaining member.
fn check_managed(r: &serde_json::Value) {
    assert_eq!(r["subnets"].as_u64().unwrap(), 3, "{r}");
    assert_eq!(r["groups"].as_u64().unwrap(), 1, "{r}");
    let m = &r["managed"];
    let expected = m["group_deliveries_expected"].as_u64().unwrap();
    assert_eq!(expected, 20, "5 members, each message to 4 others: {r}");
    assert_eq!(m["group_deliveries"].as_u64().unwrap(), expected, "{r}");
    assert_eq!(m["sender_refusals"].as_u64().unwrap(), 1, "{r}");
    assert_eq!(m["recipient_policy_drops"].as_u64().unwrap(), 1, "{r}");
    assert_eq!(r["policy_refusals"].as_u64().unwrap(), 2, "{r}");
    assert!(
        m["sender_refusal_error"]
            .as_str()
            .unwrap()
            .contains("not federated"),
        "{r}"
    );
    assert_eq!(
        m["removal_seen_by"].as_u64().unwrap(),
        m["removal_expected"].as_u64().unwrap(),
        "{r}"
    );
    assert_eq!(m["removal_expected"].as_u64().unwrap(), 4, "{r}");
    // At least one commit settle window (1.5 s), and it must have happened at all.
    let removal = r["deprovision_removal_ms"].as_f64().unwrap();
    assert!((1500.0..60_000.0).contains(&removal), "{r}");
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

//! `shoal observe --testnet`, shortened: the global passive observer on real captures of
//! a loopback network (4 subnets, two federated and talking in bursts), once with the
//! leaks switched back on (the control: the attacks must find them, or they have no
//! power) and once on the current design (the attacks must be at chance).
//!
//! Needs root, tcpdump and ethtool; otherwise it says so and passes without checking
//! (CI installs both and runs as root).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use serde_json::Value;

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

fn metric<'a>(report: &'a Value, name: &str, metric: &str) -> &'a Value {
    report["attacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name && a["metric"] == metric)
        .unwrap_or_else(|| panic!("no {name}/{metric} in {report:#}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

#[test]
fn observer_finds_the_control_leaks_and_nothing_in_the_current_design() {
    let _alone = crate::loopback_alone();
    let uid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("SKIPPED: capturing needs root (tcpdump on lo)");
        return;
    }
    for tool in ["tcpdump", "ethtool"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("SKIPPED: {tool} is not installed");
            return;
        }
    }
    let keep = tempfile::tempdir().unwrap();
    // One minute of traffic per run: two minutes of network time in all. The tool polls
    // with deadlines for the network to come up; nothing here waits a fixed time.
    let out = Command::new(SHOAL)
        .args(["observe", "--testnet", "--minutes", "1", "--json", "--keep"])
        .arg(keep.path())
        .env("SHOAL_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "shoal observe --testnet failed: {stderr}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let control = &report["control"];
    eprintln!("control: {control:#}\ncurrent: {report:#}");

    // Power: with the leaks on and a gateway per subnet, the observer learns membership
    // from the gateway addresses. (Federation, read from the two gateways whose volumes
    // move against each other, needs more than this minute: at the default 2.5 minutes
    // the control scored AUC 1.0, at one minute 0.8, the federated pair second of six.
    // So its power is shown by the full run and the simulator, not asserted here.)
    let membership = metric(control, "gateway_membership", "nmi");
    assert!(f(membership, "value") >= 0.5, "{membership}");
    assert!(
        f(membership, "ci_low") > f(membership, "chance"),
        "{membership}"
    );

    // The current design: at chance. Only meaningful once the leak fixes (which bring the
    // `legacy_leaks` knob the control sets) are on this branch.
    if !report["control_knob"].as_bool().unwrap() {
        eprintln!(
            "current-design assertions skipped: this build has no [testing] legacy_leaks knob, \
             so the leak fixes are not in it"
        );
        return;
    }
    // Every subnet has the same number of members on each gateway, so the gateway says
    // nothing of the subnet (NMI 0). That layout also gives every subnet pair's client
    // pairs the same gateway pairs, so federation_pairs is 0.5 here by construction:
    // whether gateway volumes follow real traffic in the current design is checked by
    // the simulator (simulations/tests/observer.rs: gateways by key, every attack's
    // interval covers chance), deterministically, rather than on a minute of capture.
    let membership = metric(&report, "gateway_membership", "nmi");
    assert!(f(membership, "value") <= 0.1, "{membership}");
    assert!(
        f(membership, "ci_low") <= f(membership, "chance"),
        "{membership}"
    );
    let federation = metric(&report, "federation_pairs", "auc");
    assert!(f(federation, "value") <= 0.6, "{federation}");
    assert!(
        f(federation, "ci_low") <= 0.5 && 0.5 <= f(federation, "ci_high"),
        "{federation}"
    );
}

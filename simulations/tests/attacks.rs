//! The `[attacks]` table end to end: parsing, every attack at two cover levels, files written,
//! same seed ⇒ same `attacks.json`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use shoal_sim::attacks;
use shoal_sim::model::ModelConfig;

const CONFIG: &str = r#"
[network]
layers = 3
width = 4
mean_hop_delay_ms = 300
link_delay_ms = 50
[traffic]
clients = 40
rate_per_client = 0.2
loop_rate = 1.0
drop_rate = 1.0
[run]
seed = 3
[workload]
orgs = 4
contacts = 3
federated_pairs = 2
groups = 4
online_mean_s = 300
offline_mean_s = 100
[attacks]
enabled = ["disclosure", "organisation", "timing"]
duration_s = 600
checkpoints = 3
timing_packets = 300
"#;

#[test]
fn attacks_table_runs_writes_and_is_deterministic() {
    let cfg = ModelConfig::from_toml_str(CONFIG).unwrap();
    let a = attacks::run(&cfg).unwrap().unwrap();
    let b = attacks::run(&cfg).unwrap().unwrap();
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap()
    );
    // Default cover levels: none, then traffic.loop_rate / drop_rate.
    assert_eq!(a.levels.len(), 2);
    assert_eq!(a.levels[0].cover_packets, 0);
    assert!(a.levels[1].cover_per_real > 5.0);
    assert_eq!(a.levels[0].real_packets, a.levels[1].real_packets);
    for l in &a.levels {
        assert_eq!(l.disclosure.as_ref().unwrap().len(), 3);
        assert_eq!(l.organisation.as_ref().unwrap().len(), 3);
        assert!(l.timing.as_ref().unwrap().positives > 100);
    }
    let dir = tempfile::tempdir().unwrap();
    attacks::write_attacks(dir.path(), &a, true).unwrap();
    for f in [
        "attacks.json",
        "disclosure.csv",
        "organisation.csv",
        "timing.csv",
        "disclosure.png",
        "organisation.png",
        "timing.png",
    ] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    let csv = std::fs::read_to_string(dir.path().join("disclosure.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 3);
}

#[test]
fn attacks_off_by_default_and_bad_names_refused() {
    let cfg = ModelConfig::from_toml_str("").unwrap();
    assert!(attacks::run(&cfg).unwrap().is_none());
    let cfg = ModelConfig::from_toml_str("[attacks]\nenabled = [\"sda\"]\n").unwrap();
    assert!(attacks::run(&cfg).is_err());
    assert!(ModelConfig::from_toml_str("[workload]\norg = 3\n").is_err());
}

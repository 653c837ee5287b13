//! A shortened soak: one real `shoal relay run` process at a steady load across several
//! key epochs, its RSS sampled every 2 s. After the warm-up (the replay filter's
//! generations for the epochs in flight fill once) memory must stay within 8 MiB + 10 %
//! of the first post-warm-up sample. `shoal bench soak --minutes 60` is the long run
//! (BENCHMARKS.md). No timing is asserted: only memory, delivery and that epochs turned.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use shoal_bench::soak::{SoakOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_memory_stays_flat_across_epochs() {
    let shoal = Path::new(env!("CARGO_BIN_EXE_shoal"));
    let dir = tempfile::tempdir().unwrap();
    // Under CI the whole test stays well inside two minutes.
    let secs = if std::env::var("CI").is_ok_and(|v| v == "true") {
        75
    } else {
        90
    };
    let opts = SoakOptions {
        rate: 300.0,
        // The shape verified by hand (15 s epochs, 90 s: 5 epochs, nothing lost).
        epoch_secs: 15,
        key_grace_secs: 15,
        sample_every: Duration::from_secs(2),
        warmup: Duration::from_secs(30),
        ..SoakOptions::minutes(secs as f64 / 60.0)
    };
    let r = run(shoal, dir.path(), &opts).await.unwrap();
    let series: Vec<u64> = r.samples.iter().map(|s| s.rss_kib).collect();
    assert!(
        r.epochs_crossed >= 3,
        "epochs crossed: {}",
        r.epochs_crossed
    );
    assert!(r.offered > 0);
    // A refused descriptor upload drops a stand-in out of the next document.
    assert_eq!(r.registration_failures, 0, "stand-in descriptors refused");
    // Loss would mean the relay dropped packets at an epoch edge; allow none beyond
    // a handful in flight when the last key retired.
    assert!(
        r.lost <= r.offered / 100,
        "lost {} of {}",
        r.lost,
        r.offered
    );
    assert!(
        r.flat,
        "RSS grew {} KiB after warm-up (bound {} KiB): {series:?}",
        r.growth_after_warmup_kib, r.bound_kib
    );
}

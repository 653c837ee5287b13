//! Measures the raw unwrap ceiling twelve times in a row, one second per figure, to show
//! how far the machine's speed drifts between measurements (BENCHMARKS.md § Relay).
//!
//! `cargo run --release -p shoal-bench --example ceiling_drift`

use std::time::Duration;

fn main() {
    println!("run  one-thread/s  per-CPU-s  all-cores/s  all-cores/core");
    for run in 0..12 {
        let c = shoal_bench::ceiling::measure(Duration::from_secs(1));
        println!(
            "{run:>3}  {:>12.0}  {:>9.0}  {:>11.0}  {:>14.0}",
            c.single_core_unwraps_per_sec,
            c.unwraps_per_cpu_sec,
            c.all_cores_unwraps_per_sec,
            c.all_cores_unwraps_per_sec / c.cores as f64
        );
    }
}

//! Runs `shoal bench client` or `shoal bench gateway` without the `shoal` binary (for
//! profiling and for builds where the binary is not at hand): prints the same JSON.
//!
//! `cargo run --release -p shoal-bench --example report -- client|gateway|soak [minutes]`
//! (`soak` needs a `shoal` binary next to this one or in `CARGO_BIN_EXE_shoal`).

fn main() -> anyhow::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_default();
    let json = match which.as_str() {
        "client" => serde_json::to_string_pretty(&shoal_bench::client::run(
            &shoal_bench::client::ClientBenchOptions::default(),
        )?)?,
        "gateway" => {
            let dir = tempfile::tempdir()?;
            serde_json::to_string_pretty(&shoal_bench::gateway::run(
                dir.path(),
                &shoal_bench::gateway::GatewayBenchOptions::default(),
            )?)?
        }
        "soak" => {
            let minutes: f64 = std::env::args()
                .nth(2)
                .and_then(|m| m.parse().ok())
                .unwrap_or(60.0);
            let dir = tempfile::tempdir()?;
            let shoal = shoal_bench::testnet::shoal_binary()?;
            let report = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(shoal_bench::soak::run(
                    &shoal,
                    dir.path(),
                    &shoal_bench::soak::SoakOptions::minutes(minutes),
                ))?;
            serde_json::to_string_pretty(&report)?
        }
        _ => anyhow::bail!("usage: report client|gateway|soak [minutes]"),
    };
    println!("{json}");
    Ok(())
}

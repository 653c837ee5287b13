//! `shoal sim`: model-mode traffic-analysis runs and parameter sweeps, and faithful-mode runs of
//! the production cores (see `simulations/README.md`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use shoal_sim::model::{self, ModelConfig, output, sweep};
use shoal_sim::{attacks, faithful};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SimArgs {
    #[command(subcommand)]
    command: Option<SimCommand>,
    /// Model-mode config (TOML); an empty file runs the defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output directory (created if missing).
    #[arg(long)]
    out: Option<PathBuf>,
    /// "model" or "faithful"; overrides `[sim] mode` in the config.
    #[arg(long)]
    mode: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum SimCommand {
    /// Run a grid of parameter values times seeds on all cores.
    Sweep {
        /// Base config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// `section.key=v1,v2,...`; repeat for a grid.
        #[arg(long = "param")]
        params: Vec<String>,
        /// Seeds per grid point: run.seed, run.seed + 1, ...
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// Output directory for sweep.csv and sweep.json.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(args: SimArgs) -> anyhow::Result<()> {
    match args.command {
        Some(SimCommand::Sweep {
            config,
            params,
            seeds,
            out,
        }) => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let params = params
                .iter()
                .map(|p| sweep::Param::parse(p))
                .collect::<Result<Vec<_>, _>>()?;
            let results = sweep::sweep(&text, &params, seeds)?;
            sweep::write_sweep(&out, &results, true)?;
            eprintln!(
                "shoal sim sweep: {} runs written to {} (sweep.csv, sweep.json, sweep.png)",
                results.len(),
                out.display()
            );
            Ok(())
        }
        None => {
            let (Some(config), Some(out)) = (args.config, args.out) else {
                anyhow::bail!(
                    "usage: shoal sim --config FILE.toml --out DIR (or shoal sim sweep ...)"
                );
            };
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let mut cfg = ModelConfig::from_toml_str(&text)?;
            if let Some(mode) = args.mode {
                cfg.sim.mode = mode;
            }
            match cfg.sim.mode.as_str() {
                "model" => {}
                "faithful" => return run_faithful(&cfg, &out),
                other => anyhow::bail!("sim mode {other:?}: expected \"model\" or \"faithful\""),
            }
            let (summary, raw) = model::run_config(&cfg)?;
            output::write_run(&out, &summary, &raw, cfg.output.plots)?;
            eprintln!(
                "shoal sim: {} measured messages, {} entropy mean {:.3} bits (p5 {:.3}), latency mean {:.3} s; \
                 {} events in {:.2} s ({:.2} M events/s); results in {}",
                summary.traffic.real_measured,
                summary.entropy_metric,
                summary.entropy_bits.mean,
                summary.entropy_bits.p5,
                summary.latency_s.mean,
                raw.counters.events,
                raw.wall_s,
                raw.counters.events as f64 / raw.wall_s.max(1e-9) / 1e6,
                out.display()
            );
            if !summary.corrupt_relays.is_empty() {
                let r = &summary.routes;
                eprintln!(
                    "shoal sim routes ({} selection, {} hostile operators): {:.4} fully hostile, \
                     {:.4} with a corrupt relay; by corrupt relays {:?}",
                    r.selection,
                    r.hostile_operators,
                    r.fully_hostile,
                    r.any_hostile,
                    r.corrupt_hops
                );
            }
            if let Some(report) = attacks::run(&cfg)? {
                attacks::write_attacks(&out, &report, cfg.output.plots)?;
                for l in &report.levels {
                    let mut line = format!(
                        "shoal sim attacks, loop {} drop {} /s:",
                        l.loop_rate, l.drop_rate
                    );
                    if let Some(p) = l.disclosure.as_ref().and_then(|d| d.last()) {
                        line += &format!(
                            " disclosure mean rank {:.1} (top-k {:.2}) after {} s;",
                            p.mean_rank, p.topk_fraction, p.time_s
                        );
                    }
                    if let Some(p) = l.organisation.as_ref().and_then(|o| o.last()) {
                        line += &format!(" organisations NMI {:.2} ARI {:.2};", p.nmi, p.ari);
                    }
                    if let Some(t) = &l.timing {
                        line += &format!(" timing TPR {:.3} at FPR {};", t.tpr_at_fpr, t.fpr);
                    }
                    eprintln!("{line}");
                }
            }
            Ok(())
        }
    }
}

fn run_faithful(cfg: &ModelConfig, out: &std::path::Path) -> anyhow::Result<()> {
    let run = faithful::run_clients(cfg)?;
    faithful::output::write_run(out, &run)?;
    let s = &run.summary;
    eprintln!(
        "shoal sim (faithful): {} of {} measured messages pulled by their recipients, latency mean {:.3} s \
         (p50 {:.3}, p99 {:.3}); cover per real packet {:.2}; {} acks released after commit, {} retransmissions; \
         entropy not tracked in faithful mode; results in {}",
        s.traffic.measured_delivered,
        s.traffic.measured,
        s.latency_s.mean,
        s.latency_s.p50,
        s.latency_s.p99,
        s.overhead.cover_per_real,
        s.acks.released,
        s.acks.retransmissions,
        out.display()
    );
    Ok(())
}

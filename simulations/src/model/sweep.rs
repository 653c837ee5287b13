//! Parameter sweeps: a grid of `section.key=v1,v2,..` assignments times seeds, run on all cores.

use std::path::Path;

use plotters::prelude::*;
use rayon::prelude::*;
use serde::Serialize;

use super::config::ModelConfig;
use super::{run_config, summary::Summary};
use crate::SimError;

/// One `--param section.key=v1,v2,...`.
#[derive(Debug, Clone)]
pub struct Param {
    pub key: String,
    pub values: Vec<toml::Value>,
}

impl Param {
    /// Parses `section.key=v1,v2`; each value is a TOML literal (`5`, `0.5`, `true`, `"on"`),
    /// and a bare word that is not one is taken as a string.
    pub fn parse(s: &str) -> Result<Self, SimError> {
        let (key, vals) = s.split_once('=').ok_or_else(|| SimError::Config {
            what: "--param",
            reason: format!("expected key=v1,v2: {s:?}"),
        })?;
        let values = vals
            .split(',')
            .map(|v| {
                let v = v.trim();
                toml::from_str::<toml::Table>(&format!("x = {v}"))
                    .ok()
                    .and_then(|mut t| t.remove("x"))
                    .unwrap_or_else(|| toml::Value::String(v.to_string()))
            })
            .collect();
        Ok(Self {
            key: key.trim().to_string(),
            values,
        })
    }
}

/// One row of `sweep.csv` / `sweep.json`.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    pub params: Vec<(String, String)>,
    pub seed: u64,
    /// Packets (real and cover) arriving per relay per mean hop delay: Loopix's λ/μ for one mix,
    /// `clients × (rate + loop + drop) / width × mean_hop_delay`.
    pub lambda_over_mu: f64,
    pub entropy_metric: &'static str,
    pub entropy_mean: f64,
    pub entropy_median: f64,
    pub entropy_p5: f64,
    pub entropy_min: f64,
    pub min_entropy_mean: f64,
    pub degree_mean: f64,
    pub receiver_entropy_mean: Option<f64>,
    pub latency_mean_s: f64,
    pub latency_p99_s: f64,
    pub cover_per_real: f64,
    /// Pooled unlinkability ε at `metrics.unlinkability_delta` (`None`: tracking off or infinite).
    pub epsilon: Option<f64>,
    pub measured: u64,
}

/// λ/μ of one relay under `c` (all traffic is spread evenly over a layer's relays).
pub fn lambda_over_mu(c: &ModelConfig) -> f64 {
    let t = &c.traffic;
    f64::from(t.clients) * (t.rate_per_client + t.loop_rate + t.drop_rate)
        / f64::from(c.network.width.max(1))
        * c.network.mean_hop_delay_ms
        / 1e3
}

fn set(cfg: &toml::Value, key: &str, value: &toml::Value) -> Result<toml::Value, SimError> {
    let mut cfg = cfg.clone();
    let mut cur = &mut cfg;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        let table = cur.as_table_mut().ok_or_else(|| SimError::Config {
            what: "--param",
            reason: format!("{key}: not a table"),
        })?;
        if i + 1 == parts.len() {
            table.insert((*p).to_string(), value.clone());
            break;
        }
        cur = table
            .entry((*p).to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    Ok(cfg)
}

/// Runs every combination of `params` for seeds `run.seed .. run.seed + seeds`, in parallel;
/// rows come back in grid order (first parameter slowest, seed fastest), whatever the thread timing.
pub fn sweep(
    base_toml: &str,
    params: &[Param],
    seeds: u64,
) -> Result<Vec<(SweepRow, Summary)>, SimError> {
    let base: toml::Value = toml::from_str(base_toml).map_err(|e| SimError::Config {
        what: "sweep config",
        reason: e.to_string(),
    })?;
    let mut grid: Vec<(toml::Value, Vec<(String, String)>)> = vec![(base, Vec::new())];
    for p in params {
        let mut next = Vec::new();
        for (cfg, labels) in &grid {
            for v in &p.values {
                let mut l = labels.clone();
                l.push((p.key.clone(), v.to_string()));
                next.push((set(cfg, &p.key, v)?, l));
            }
        }
        grid = next;
    }
    let mut jobs = Vec::new();
    for (cfg, labels) in &grid {
        let mut c: ModelConfig =
            cfg.clone()
                .try_into()
                .map_err(|e: toml::de::Error| SimError::Config {
                    what: "sweep config",
                    reason: e.to_string(),
                })?;
        c.output.messages_csv = false;
        c.output.plots = false;
        let base_seed = c.run.seed;
        for s in 0..seeds.max(1) {
            let mut c = c.clone();
            c.run.seed = base_seed + s;
            c.check_model_mode()?;
            c.validate()?;
            jobs.push((c, labels.clone()));
        }
    }
    jobs.into_par_iter()
        .map(|(c, labels)| {
            let (summary, _raw) = run_config(&c)?;
            let row = SweepRow {
                params: labels,
                seed: c.run.seed,
                lambda_over_mu: lambda_over_mu(&c),
                entropy_metric: summary.entropy_metric,
                entropy_mean: summary.entropy_bits.mean,
                entropy_median: summary.entropy_bits.median,
                entropy_p5: summary.entropy_bits.p5,
                entropy_min: summary.entropy_bits.min,
                min_entropy_mean: summary.min_entropy_bits.mean,
                degree_mean: summary.degree_of_anonymity.mean,
                receiver_entropy_mean: summary
                    .receiver_anonymity
                    .as_ref()
                    .map(|r| r.anonymity.entropy_bits.mean),
                latency_mean_s: summary.latency_s.mean,
                latency_p99_s: summary.latency_s.p99,
                cover_per_real: summary.overhead.cover_per_real,
                epsilon: summary
                    .unlinkability_pooled
                    .as_ref()
                    .and_then(|u| u.epsilon),
                measured: summary.traffic.real_measured,
            };
            Ok((row, summary))
        })
        .collect()
}

/// `sweep.csv`: one line per run, parameter columns first.
pub fn sweep_csv(rows: &[SweepRow]) -> String {
    let mut s = String::new();
    if let Some(r) = rows.first() {
        for (k, _) in &r.params {
            s.push_str(k);
            s.push(',');
        }
    }
    s.push_str("seed,lambda_over_mu,entropy_metric,entropy_mean,entropy_median,entropy_p5,entropy_min,min_entropy_mean,degree_mean,receiver_entropy_mean,latency_mean_s,latency_p99_s,cover_per_real,epsilon,measured\n");
    for r in rows {
        for (_, v) in &r.params {
            s.push_str(&v.replace(',', ";"));
            s.push(',');
        }
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.seed,
            r.lambda_over_mu,
            r.entropy_metric,
            r.entropy_mean,
            r.entropy_median,
            r.entropy_p5,
            r.entropy_min,
            r.min_entropy_mean,
            r.degree_mean,
            r.receiver_entropy_mean
                .map_or(String::new(), |x| x.to_string()),
            r.latency_mean_s,
            r.latency_p99_s,
            r.cover_per_real,
            r.epsilon.map_or(String::new(), |x| x.to_string()),
            r.measured
        ));
    }
    s
}

/// Parameters that only move λ/μ: they set the x axis of the sweep plot, the others split series.
const RATE_KEYS: [&str; 6] = [
    "network.mean_hop_delay_ms",
    "network.width",
    "traffic.clients",
    "traffic.rate_per_client",
    "traffic.loop_rate",
    "traffic.drop_rate",
];

/// `sweep.png`: mean entropy (averaged over seeds) against λ/μ per relay on a log axis, one line
/// per combination of the other parameters (e.g. `network.layers`), with Loopix's λ/μ = 2 marked.
pub fn plot_sweep(path: &Path, rows: &[SweepRow]) -> Result<(), SimError> {
    let e = |x: &dyn std::fmt::Display| SimError::Output {
        path: path.to_path_buf(),
        reason: x.to_string(),
    };
    // Per series label, points (λ/μ, entropy sum, runs), both in first-seen order.
    type Points = Vec<(f64, f64, u32)>;
    let mut series: Vec<(String, Points)> = Vec::new();
    for r in rows {
        let label = r
            .params
            .iter()
            .filter(|(k, _)| !RATE_KEYS.contains(&k.as_str()))
            .map(|(k, v)| format!("{} = {v}", k.rsplit('.').next().unwrap_or(k)))
            .collect::<Vec<_>>()
            .join(", ");
        let i = match series.iter().position(|(l, _)| *l == label) {
            Some(i) => i,
            None => {
                series.push((label, Vec::new()));
                series.len() - 1
            }
        };
        let pts = &mut series[i].1;
        match pts.iter_mut().find(|p| p.0 == r.lambda_over_mu) {
            Some(p) => {
                p.1 += r.entropy_mean;
                p.2 += 1;
            }
            None => pts.push((r.lambda_over_mu, r.entropy_mean, 1)),
        }
    }
    let xs = rows.iter().map(|r| r.lambda_over_mu).filter(|x| *x > 0.0);
    let (xmin, xmax) = xs.fold((f64::INFINITY, 0.0f64), |(a, b), x| (a.min(x), b.max(x)));
    if !xmin.is_finite() {
        return Ok(());
    }
    let (xmin, xmax) = ((xmin.min(2.0) / 1.5), (xmax.max(2.0) * 1.5));
    let ymax = rows.iter().map(|r| r.entropy_mean).fold(0.0f64, f64::max) * 1.1 + 0.1;
    let metric = rows.first().map_or("sender", |r| r.entropy_metric);
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("mean {metric} entropy against λ/μ per relay"),
            ("sans-serif", 24),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..ymax)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("λ/μ per relay (packets arriving per mean hop delay)")
        .y_desc("entropy (bits)")
        .draw()
        .map_err(|x| e(&x))?;
    chart
        .draw_series(LineSeries::new(
            [(2.0, 0.0), (2.0, ymax)],
            BLACK.mix(0.5).stroke_width(1),
        ))
        .map_err(|x| e(&x))?
        .label("Loopix: λ/μ = 2")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    for (i, (label, pts)) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let mut p: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| p.0 > 0.0)
            .map(|p| (p.0, p.1 / f64::from(p.2)))
            .collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(p.clone(), colour.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(if label.is_empty() { "all runs" } else { label })
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        chart
            .draw_series(p.into_iter().map(|xy| Circle::new(xy, 4, colour.filled())))
            .map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// Writes `sweep.csv`, `sweep.json` and (when `plots`) `sweep.png` into `dir`.
pub fn write_sweep(
    dir: &Path,
    results: &[(SweepRow, Summary)],
    plots: bool,
) -> Result<(), SimError> {
    let io = |p: &Path, e: std::io::Error| SimError::Output {
        path: p.to_path_buf(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let rows: Vec<SweepRow> = results.iter().map(|(r, _)| r.clone()).collect();
    let csv = dir.join("sweep.csv");
    std::fs::write(&csv, sweep_csv(&rows)).map_err(|e| io(&csv, e))?;
    let json: Vec<_> = results
        .iter()
        .map(|(r, s)| serde_json::json!({ "params": r.params, "seed": r.seed, "summary": s }))
        .collect();
    let jp = dir.join("sweep.json");
    std::fs::write(&jp, format!("{:#}\n", serde_json::Value::Array(json)))
        .map_err(|e| io(&jp, e))?;
    if plots {
        plot_sweep(&dir.join("sweep.png"), &rows)?;
    }
    Ok(())
}

//! Parameter sweeps: a grid of `section.key=v1,v2,..` assignments times seeds, run on all cores.

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
    pub measured: u64,
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
    s.push_str("seed,entropy_metric,entropy_mean,entropy_median,entropy_p5,entropy_min,min_entropy_mean,degree_mean,receiver_entropy_mean,latency_mean_s,latency_p99_s,cover_per_real,measured\n");
    for r in rows {
        for (_, v) in &r.params {
            s.push_str(&v.replace(',', ";"));
            s.push(',');
        }
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.seed,
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
            r.measured
        ));
    }
    s
}

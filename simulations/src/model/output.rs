//! Files a run writes: `summary.json`, `messages.csv`, `targets.csv`, `perf.json`, PNG plots.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::engine::RawRun;
use super::summary::{Summary, gamma_pdf};
use crate::SimError;

pub(crate) fn io_err(path: &Path, e: impl std::fmt::Display) -> SimError {
    SimError::Output {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

pub(crate) fn write(path: PathBuf, bytes: &[u8]) -> Result<(), SimError> {
    fs::write(&path, bytes).map_err(|e| io_err(&path, e))
}

/// Empty for NaN, else the shortest representation that round-trips.
pub(crate) fn num(x: f64) -> String {
    if x.is_nan() {
        String::new()
    } else {
        format!("{x}")
    }
}

/// The bytes of `summary.json`.
pub fn summary_json(summary: &Summary) -> Result<String, SimError> {
    let mut s =
        serde_json::to_string_pretty(summary).map_err(|e| io_err(Path::new("summary.json"), e))?;
    s.push('\n');
    Ok(s)
}

/// Writes every output of a run into `dir` (created if missing).
pub fn write_run(dir: &Path, summary: &Summary, raw: &RawRun, plots: bool) -> Result<(), SimError> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    write(dir.join("summary.json"), summary_json(summary)?.as_bytes())?;
    let mut csv = String::from(
        "id,sender,receiver,sent_s,latency_s,sender_entropy_bits,sender_min_entropy_bits,sender_degree,corrupt_hops,is_target\n",
    );
    let log_n = f64::from(summary.config.traffic.clients).log2();
    for r in &raw.rows {
        let degree = if log_n > 0.0 {
            r.sender_entropy / log_n
        } else {
            f64::NAN
        };
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{}",
            r.id,
            r.sender,
            r.receiver,
            num(r.sent_s),
            num(r.latency_s),
            num(r.sender_entropy),
            num(r.sender_min_entropy),
            num(degree),
            r.corrupt_hops,
            u8::from(r.is_target)
        );
    }
    write(dir.join("messages.csv"), csv.as_bytes())?;
    let mut csv = String::from(
        "id,sender,receiver,sent_s,receiver_entropy_bits,receiver_min_entropy_bits,true_recipient_prob,true_recipient_rank,residual_mass\n",
    );
    for t in &raw.targets {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{}",
            t.id,
            t.sender,
            t.receiver,
            num(t.sent_s),
            num(t.entropy),
            num(t.min_entropy),
            num(t.true_prob),
            t.true_rank,
            num(t.residual)
        );
    }
    write(dir.join("targets.csv"), csv.as_bytes())?;
    let perf = serde_json::json!({
        "wall_s": raw.wall_s,
        "events": raw.counters.events,
        "events_per_s": raw.counters.events as f64 / raw.wall_s.max(1e-9),
        "state_bytes": raw.peak_state_bytes,
    });
    write(dir.join("perf.json"), format!("{perf:#}\n").as_bytes())?;
    if plots {
        let values: Vec<f64> = if summary.entropy_metric == "sender" {
            raw.sender_entropy.clone()
        } else {
            raw.targets.iter().map(|t| t.entropy).collect()
        };
        plot_histogram(
            &dir.join("entropy.png"),
            &format!("{} anonymity (Shannon entropy)", summary.entropy_metric),
            "entropy (bits)",
            &values,
        )?;
        plot_latency(&dir.join("latency.png"), summary, raw)?;
    }
    Ok(())
}

/// A histogram of `values` with 50 bins.
fn plot_histogram(path: &Path, title: &str, xlabel: &str, values: &[f64]) -> Result<(), SimError> {
    let (mut lo, mut hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let bins = Bins::new(lo, hi);
    let mut counts = vec![0u64; BINS];
    for &x in values {
        counts[bins.index(x)] += 1;
    }
    plot_bins(path, title, xlabel, &bins, &counts, None)
}

pub(crate) const BINS: usize = 50;

/// `BINS` equal bins over `[lo, hi]`.
pub(crate) struct Bins {
    lo: f64,
    width: f64,
}

impl Bins {
    pub(crate) fn new(lo: f64, hi: f64) -> Self {
        let hi = if hi - lo < 1e-9 { lo + 1.0 } else { hi };
        Self {
            lo,
            width: (hi - lo) / BINS as f64,
        }
    }

    pub(crate) fn index(&self, x: f64) -> usize {
        (((x - self.lo) / self.width).max(0.0) as usize).min(BINS - 1)
    }
}

/// Draws pre-binned counts and an optional density curve (scaled to counts).
pub(crate) fn plot_bins(
    path: &Path,
    title: &str,
    xlabel: &str,
    bins: &Bins,
    counts: &[u64],
    density: Option<&dyn Fn(f64) -> f64>,
) -> Result<(), SimError> {
    let e = |e: &dyn std::fmt::Display| io_err(path, e);
    let (lo, width) = (bins.lo, bins.width);
    let hi = lo + width * BINS as f64;
    let ymax = counts.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.1;
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(lo..hi, 0.0..ymax)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(xlabel)
        .y_desc("messages")
        .draw()
        .map_err(|x| e(&x))?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let x0 = lo + i as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width, c as f64)], BLUE.mix(0.5).filled())
        }))
        .map_err(|x| e(&x))?;
    if let Some(f) = density {
        let n = counts.iter().sum::<u64>() as f64;
        let pts: Vec<(f64, f64)> = (0..=400)
            .map(|i| lo + (hi - lo) * f64::from(i) / 400.0)
            .map(|x| (x, f(x) * n * width))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, RED.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label("theory: fixed links + Gamma(L, mean hop delay)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

fn plot_latency(path: &Path, summary: &Summary, raw: &RawRun) -> Result<(), SimError> {
    // Bin straight from the histogram's buckets (never one value per message), up to the 99.9th
    // percentile for readability.
    let h = &raw.latency_us;
    let cap = h.value_at_quantile(0.999) as f64 / 1e6;
    let bins = Bins::new(h.min() as f64 / 1e6, cap);
    let mut counts = vec![0u64; BINS];
    for v in h.iter_recorded() {
        let x = v.value_iterated_to() as f64 / 1e6;
        if x <= cap {
            counts[bins.index(x)] += v.count_at_value();
        }
    }
    let l = summary.config.network.layers;
    let theta = summary.config.network.mean_hop_delay_ms / 1e3;
    let fixed = summary.latency_s.fixed_links_s;
    let f = move |x: f64| gamma_pdf(l, theta, x - fixed);
    plot_bins(
        path,
        "end-to-end latency of measured real messages",
        "latency (s)",
        &bins,
        &counts,
        Some(&f),
    )
}

//! Files a faithful run writes: `summary.json`, `messages.csv`, `latency.png`.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use super::clients::{ClientRun, FaithfulSummary};
use crate::SimError;
use crate::model::output::{BINS, Bins, io_err, num, plot_bins, write};

/// The bytes of `summary.json`.
pub fn summary_json(summary: &FaithfulSummary) -> Result<String, SimError> {
    let mut s =
        serde_json::to_string_pretty(summary).map_err(|e| io_err(Path::new("summary.json"), e))?;
    s.push('\n');
    Ok(s)
}

/// The bytes of `messages.csv`: one row per real message in `id` (hand-over) order, at most
/// `max_rows`; empty fields for what did not happen before the end of the run.
pub fn messages_csv(run: &ClientRun, max_rows: u64) -> String {
    let mut csv = String::from(
        "id,sender,receiver,sent_s,measured,attempts,slot_s,stored_s,durable_s,pulled_s,acked_s,\
         latency_s,slot_wait_s,wire_s,commit_wait_s,pull_wait_s\n",
    );
    let o = |x: Option<f64>| num(x.unwrap_or(f64::NAN));
    let d = |a: Option<f64>, b: Option<f64>| num(a.zip(b).map_or(f64::NAN, |(a, b)| a - b));
    for r in run
        .rows
        .iter()
        .take(usize::try_from(max_rows).unwrap_or(usize::MAX))
    {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.id,
            r.sender,
            r.receiver,
            num(r.sent_s),
            u8::from(r.measured),
            r.attempts,
            o(r.slot_s),
            o(r.stored_s),
            o(r.durable_s),
            o(r.pulled_s),
            o(r.acked_s),
            d(r.pulled_s, Some(r.sent_s)),
            d(r.slot_s, Some(r.sent_s)),
            d(r.stored_s, r.slot_s),
            d(r.durable_s, r.stored_s),
            d(r.pulled_s, r.durable_s),
        );
    }
    csv
}

/// Writes `summary.json`, `messages.csv` (if `output.messages_csv`) and `latency.png` (if
/// `output.plots`) into `dir` (created if missing).
pub fn write_run(dir: &Path, run: &ClientRun) -> Result<(), SimError> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let out = &run.summary.config.output;
    write(
        dir.join("summary.json"),
        summary_json(&run.summary)?.as_bytes(),
    )?;
    if out.messages_csv {
        write(
            dir.join("messages.csv"),
            messages_csv(run, out.csv_max_rows).as_bytes(),
        )?;
    }
    if out.plots {
        plot_latency(&dir.join("latency.png"), run)?;
    }
    Ok(())
}

/// Histogram of measured messages' end-to-end latency (`send_message` to the recipient's pull),
/// up to the 99.9th percentile for readability.
fn plot_latency(path: &Path, run: &ClientRun) -> Result<(), SimError> {
    let mut v: Vec<f64> = run
        .rows
        .iter()
        .filter(|r| r.measured)
        .filter_map(|r| Some(r.pulled_s? - r.sent_s))
        .collect();
    v.sort_by(f64::total_cmp);
    let (lo, hi) = match (v.first(), v.len()) {
        (Some(&lo), n) => (lo, v[((0.999 * n as f64).ceil() as usize).clamp(1, n) - 1]),
        (None, _) => (0.0, 1.0),
    };
    let bins = Bins::new(lo, hi);
    let mut counts = vec![0u64; BINS];
    for &x in v.iter().filter(|&&x| x <= hi) {
        counts[bins.index(x)] += 1;
    }
    plot_bins(
        path,
        "faithful mode: send_message to the recipient's pull",
        "latency (s)",
        &bins,
        &counts,
        None,
    )
}

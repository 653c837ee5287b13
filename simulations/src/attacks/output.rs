//! Files the attacks write: `attacks.json`, `disclosure.csv`, `organisation.csv`, `timing.csv`
//! and one PNG per attack.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use plotters::prelude::*;

use super::AttacksReport;
use crate::SimError;

fn io_err(path: &Path, e: impl std::fmt::Display) -> SimError {
    SimError::Output {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), SimError> {
    fs::write(path, bytes).map_err(|e| io_err(path, e))
}

fn opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v}")).unwrap_or_default()
}

fn label(loop_rate: f64, drop_rate: f64) -> String {
    if loop_rate == 0.0 && drop_rate == 0.0 {
        "no cover".into()
    } else {
        format!("cover λL={loop_rate} λD={drop_rate}")
    }
}

/// Writes the attack outputs into `dir` (which must exist).
pub fn write_attacks(dir: &Path, report: &AttacksReport, plots: bool) -> Result<(), SimError> {
    let mut json = serde_json::to_string_pretty(report).map_err(|e| io_err(dir, e))?;
    json.push('\n');
    write(&dir.join("attacks.json"), json.as_bytes())?;
    let mut disc = Vec::new();
    let mut org = Vec::new();
    let mut nmi = Vec::new();
    let mut roc = Vec::new();
    let mut dcsv = String::from(
        "loop_rate,drop_rate,time_s,windows,mean_rank,median_rank,topk_fraction,targets_disclosed\n",
    );
    let mut ocsv = String::from(
        "loop_rate,drop_rate,time_s,windows,edges,clusters,nmi,ari,nmi_chance,ari_chance,federation_auc,federation_precision,federation_auc_known_orgs,federation_precision_known_orgs\n",
    );
    let mut tcsv = String::from("loop_rate,drop_rate,fpr,tpr\n");
    for l in &report.levels {
        let name = label(l.loop_rate, l.drop_rate);
        if let Some(d) = &l.disclosure {
            for p in d {
                let _ = writeln!(
                    dcsv,
                    "{},{},{},{},{},{},{},{}",
                    l.loop_rate,
                    l.drop_rate,
                    p.time_s,
                    p.windows,
                    p.mean_rank,
                    p.median_rank,
                    p.topk_fraction,
                    p.targets_disclosed
                );
            }
            disc.push((
                name.clone(),
                d.iter()
                    .map(|p| (p.time_s, p.mean_rank))
                    .collect::<Vec<_>>(),
            ));
        }
        if let Some(o) = &l.organisation {
            for p in o {
                let _ = writeln!(
                    ocsv,
                    "{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                    l.loop_rate,
                    l.drop_rate,
                    p.time_s,
                    p.windows,
                    p.edges,
                    p.clusters,
                    p.nmi,
                    p.ari,
                    p.nmi_chance,
                    p.ari_chance,
                    opt(p.federation_auc),
                    opt(p.federation_precision),
                    opt(p.federation_auc_known_orgs),
                    opt(p.federation_precision_known_orgs)
                );
            }
            org.push((
                format!("ARI, {name}"),
                o.iter().map(|p| (p.time_s, p.ari)).collect::<Vec<_>>(),
            ));
            nmi.push((
                format!("federation AUC (known subnets), {name}"),
                o.iter()
                    .filter_map(|p| p.federation_auc_known_orgs.map(|a| (p.time_s, a)))
                    .collect::<Vec<_>>(),
            ));
        }
        if let Some(t) = &l.timing {
            for &(f, tpr) in &t.roc {
                let _ = writeln!(tcsv, "{},{},{f},{tpr}", l.loop_rate, l.drop_rate);
            }
            roc.push((
                format!("{name}: TPR {:.3} at FPR {}", t.tpr_at_fpr, t.fpr),
                t.roc.iter().map(|&(f, tpr)| (f.log10(), tpr)).collect(),
            ));
        }
    }
    if !disc.is_empty() {
        write(&dir.join("disclosure.csv"), dcsv.as_bytes())?;
    }
    if !org.is_empty() {
        write(&dir.join("organisation.csv"), ocsv.as_bytes())?;
    }
    if !roc.is_empty() {
        write(&dir.join("timing.csv"), tcsv.as_bytes())?;
    }
    if plots {
        if !disc.is_empty() {
            let chance = f64::from(report.truth.users) / 2.0;
            plot_lines(
                &dir.join("disclosure.png"),
                "statistical disclosure: rank of true partners (1 = best)",
                "observation time (s)",
                "mean rank of true partners",
                &disc,
                Some((chance, "chance")),
                SeriesLabelPosition::UpperRight,
            )?;
        }
        if !org.is_empty() {
            org.extend(nmi);
            plot_lines(
                &dir.join("organisation.png"),
                "organisation inference (ARI) and federation detection (AUC, subnets known)",
                "observation time (s)",
                "score (ARI: 0 = chance; AUC: 0.5 = chance)",
                &org,
                None,
                SeriesLabelPosition::MiddleRight,
            )?;
        }
        if !roc.is_empty() {
            plot_lines(
                &dir.join("timing.png"),
                "timing likelihood-ratio test: ROC",
                "log10 false-positive rate",
                "true-positive rate",
                &roc,
                None,
                SeriesLabelPosition::LowerRight,
            )?;
        }
    }
    Ok(())
}

type Series = (String, Vec<(f64, f64)>);

fn plot_lines(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    hline: Option<(f64, &str)>,
    legend: SeriesLabelPosition,
) -> Result<(), SimError> {
    let e = |x: &dyn std::fmt::Display| io_err(path, x);
    let pts = series.iter().flat_map(|s| s.1.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64, 1.0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if let Some((h, _)) = hline {
        y1 = y1.max(h);
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1 * 1.05)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(xlabel)
        .y_desc(ylabel)
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (name, p)) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(p.clone(), colour.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        chart
            .draw_series(p.iter().map(|&q| Circle::new(q, 3, colour.filled())))
            .map_err(|x| e(&x))?;
    }
    if let Some((h, name)) = hline {
        chart
            .draw_series(LineSeries::new(vec![(x0, h), (x1, h)], BLACK.mix(0.5)))
            .map_err(|x| e(&x))?
            .label(name)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(legend)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

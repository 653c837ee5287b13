//! `shoal relay|gateway status`: a running node's health, read from its own `/metrics`
//! (the same aggregates Prometheus scrapes; nothing per client or per packet).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Context;

/// Samples by metric name, then by label set (`""` when unlabelled).
type Samples = BTreeMap<String, BTreeMap<String, f64>>;

fn parse(text: &str) -> Samples {
    let mut out = Samples::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        out.entry(name.to_owned())
            .or_default()
            .insert(labels.to_owned(), value);
    }
    out
}

fn total(s: &Samples, name: &str) -> Option<f64> {
    s.get(name).map(|m| m.values().sum())
}

/// Prints the node's health; an error (exit status 1) if it has a problem, for scripts
/// and health checks.
pub fn report(metrics: Option<SocketAddr>, role: &str) -> anyhow::Result<()> {
    let problems = print(metrics, role)?;
    anyhow::ensure!(
        problems.is_empty(),
        "the {role} is unhealthy: {}",
        problems.join("; ")
    );
    Ok(())
}

/// Fetches the node's metrics, prints a summary and returns the problems found (empty:
/// healthy).
fn print(metrics: Option<SocketAddr>, role: &str) -> anyhow::Result<Vec<String>> {
    let addr = metrics.with_context(|| {
        format!("metrics_listen is not set in the {role}'s config; status reads /metrics")
    })?;
    let body = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(shoal_link::http::get(addr, "/metrics"))
        .with_context(|| format!("the {role} is not answering on {addr} (is it running?)"))?
        .1;
    let s = parse(&String::from_utf8_lossy(&body));
    let get = |n: &str| total(&s, n).unwrap_or(0.0);
    let mut problems = Vec::new();

    let version = s
        .get("shoal_relay_build_info")
        .and_then(|m| m.keys().next())
        .and_then(|l| l.strip_prefix("version=\""))
        .map(|v| v.trim_end_matches('"').to_owned());
    println!(
        "version        {} (this command: {})",
        version.as_deref().unwrap_or("unknown"),
        env!("CARGO_PKG_VERSION")
    );
    let epoch = total(&s, "shoal_relay_directory_epoch").unwrap_or(-1.0);
    if epoch < 0.0 {
        problems.push("no valid directory document yet".to_owned());
        println!("directory      none");
    } else {
        println!("directory      epoch {epoch}");
    }
    let links = s.get("shoal_relay_links");
    let link = |d: &str| {
        links
            .and_then(|m| m.get(&format!("direction=\"{d}\"")))
            .copied()
            .unwrap_or(0.0)
    };
    // Links open on first use, so an idle node may rightly have none.
    println!(
        "links          {} inbound, {} outbound",
        link("inbound"),
        link("outbound")
    );
    println!(
        "packets        {} processed, {} forwarded",
        get("shoal_relay_packets_processed_total"),
        get("shoal_relay_packets_forwarded_total")
    );
    let drops: Vec<String> = s
        .get("shoal_relay_packets_dropped_total")
        .into_iter()
        .flatten()
        .filter(|(_, v)| **v > 0.0)
        .map(|(l, v)| {
            let reason = l
                .trim_start_matches("reason=\"")
                .trim_end_matches('"')
                .to_owned();
            format!("{reason} {v}")
        })
        .collect();
    println!(
        "dropped        {}",
        if drops.is_empty() {
            "none".to_owned()
        } else {
            drops.join(", ")
        }
    );
    println!(
        "queues         {} waiting for a worker, {} in delay",
        get("shoal_relay_worker_queue_depth"),
        get("shoal_relay_delay_queue_depth")
    );
    let (returned, lost) = (
        get("shoal_relay_loops_returned_total"),
        get("shoal_relay_loops_lost_total"),
    );
    let settled = returned + lost;
    if settled > 0.0 {
        let ratio = returned / settled;
        println!(
            "loop cover     {returned} returned, {lost} lost ({:.1}% back)",
            ratio * 100.0
        );
        if ratio < 0.95 {
            problems.push(format!(
                "{:.1}% of loop cover lost: an outage or an active attack",
                (1.0 - ratio) * 100.0
            ));
        }
    } else {
        println!(
            "loop cover     {} sent, none settled yet",
            get("shoal_relay_loops_sent_total")
        );
    }
    if role == "gateway" {
        println!(
            "mailboxes      {} accounts, {} items stored, {} clients connected",
            get("shoal_gateway_accounts"),
            get("shoal_gateway_mailbox_items"),
            get("shoal_gateway_clients_connected")
        );
        if get("shoal_gateway_store_failures_total") > 0.0 {
            problems.push("mailbox store commits have failed".to_owned());
        }
    }
    if problems.is_empty() {
        println!("health         ok");
    } else {
        for p in &problems {
            println!("health         PROBLEM: {p}");
        }
    }
    Ok(problems)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn parses_labelled_and_plain_samples() {
        let s = parse(
            "# HELP x y\nshoal_relay_links{direction=\"inbound\"} 2\n\
             shoal_relay_links{direction=\"outbound\"} 3\nshoal_relay_directory_epoch -1\nbad line\n",
        );
        assert_eq!(total(&s, "shoal_relay_links"), Some(5.0));
        assert_eq!(total(&s, "shoal_relay_directory_epoch"), Some(-1.0));
        assert_eq!(total(&s, "missing"), None);
    }
}

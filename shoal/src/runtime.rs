//! What every long-running node command shares: its async runtime and waiting for
//! the operator to stop it.

use anyhow::Context;

/// Resolves on SIGINT or SIGTERM (Ctrl-C elsewhere).
pub async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("cannot listen for SIGINT")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("cannot listen for Ctrl-C")?;
    Ok(())
}

/// Like [`wait_for_signal`], calling `reload` on each SIGHUP meanwhile (unix only).
pub async fn wait_for_signal_reloading(mut reload: impl FnMut()) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
        let stop = wait_for_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                r = &mut stop => return r,
                _ = hup.recv() => reload(),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = &mut reload;
        wait_for_signal().await
    }
}

/// The runtime of a relay or gateway process. Unwrapping runs on the node's own worker
/// threads; the async runtime only moves frames (and serves clients), so it gets a small
/// share of the cores.
pub fn node_runtime(thread_name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.div_ceil(4).max(1))
        .thread_name(thread_name)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

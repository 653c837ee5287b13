//! Packet captures of real networks on `lo`. A binary of its own because a capture sees
//! every UDP datagram on loopback and turns off `lo`'s segmentation offload: nothing
//! else may run beside it, so its tests also take [`LOOPBACK`] one at a time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../support/mod.rs"]
mod support;

mod capture;
mod observe;

/// Held for the whole of each capture test.
static LOOPBACK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes [`LOOPBACK`], also after another capture test panicked while holding it.
fn loopback_alone() -> std::sync::MutexGuard<'static, ()> {
    LOOPBACK.lock().unwrap_or_else(|e| e.into_inner())
}

#![doc = include_str!("../README.md")]

pub mod config;
pub mod core;
pub mod driver;
pub mod keys;
pub mod keystore;
pub mod metrics;

mod directory;
mod error;
mod fair;
mod outbound;
mod worker;

pub use crate::config::{Config, InitOptions};
pub use crate::core::{DropReason, Event, MixConfig, MixCore, Stats, Transmit, Unwrapper};
pub use crate::directory::NetworkInfo;
pub use crate::driver::{
    DeliverFn, MetricsFn, NodeHooks, Pipeline, RelayHandle, spawn, spawn_with,
};
pub use crate::error::RelayError;
pub use crate::keys::KeyRing;
pub use crate::metrics::RelayStats;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;

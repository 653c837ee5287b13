//! End-to-end tests with real processes: the `shoal` binary started as a person or an
//! operator starts it, over real QUIC on loopback or in network namespaces. One test
//! binary, so the whole dependency tree is linked once; each module was its own binary
//! before and keeps its own doc comment. Protocol properties that do not need real
//! processes belong in the crates' deterministic tests instead.
//!
//! Run one module with a filter, e.g. `cargo test -p shoal --test e2e faults::`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod authority;
mod chat_tmux;
mod client_cli;
mod client_group;
mod demo;
mod deploy;
mod faults;
mod flood;
mod gateway_kill;
mod key_files;
mod log_privacy;
mod metrics_doc;
mod netns;
mod overload;
mod policy;
mod relay_network;
mod soak;

//! Set-up shared by the end-to-end test binaries (`e2e`, `capture`).
pub mod authorities;
pub mod cli_net;
pub mod duo;
pub mod hosts;

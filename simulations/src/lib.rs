#![doc = include_str!("../README.md")]

pub mod attacks;
pub mod faithful;
pub mod harness;
pub mod model;
pub mod observe;

mod error;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod rogue;

pub use error::SimError;
pub use harness::{Behaviour, ClientPacket, Delivery, LinkConfig, Network, NetworkBuilder};

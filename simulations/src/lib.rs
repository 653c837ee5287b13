#![doc = include_str!("../README.md")]

pub mod attacks;
pub mod faithful;
pub mod harness;
pub mod model;
pub mod observe;

mod error;

pub use error::SimError;
pub use harness::{Behaviour, ClientPacket, Delivery, LinkConfig, Network, NetworkBuilder};

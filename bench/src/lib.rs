#![doc = include_str!("../README.md")]

pub mod ceiling;
pub mod client;
pub mod e2e;
pub mod gateway;
pub mod netns;
pub mod relay;
pub mod soak;
pub mod standin;
pub mod testnet;

#![doc = include_str!("../README.md")]

pub mod ceiling;
pub mod e2e;
pub mod relay;
pub mod standin;
pub mod testnet;

#![doc = include_str!("../README.md")]

pub mod ceiling;
pub mod relay;
pub mod standin;
pub mod testnet;

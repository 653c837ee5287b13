#![doc = include_str!("../README.md")]

pub mod ceiling;
pub mod standin;

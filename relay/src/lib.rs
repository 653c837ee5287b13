#![doc = include_str!("../README.md")]

pub mod core;
pub mod keys;

pub use crate::core::{DropReason, Event, MixConfig, MixCore, Transmit, Unwrapper};
pub use crate::keys::KeyRing;

//! Model mode: a discrete-event simulator of a Loopix-style stratified network with the crypto
//! abstracted away, built to scale (see the crate README's researcher's guide).

pub mod config;
pub mod engine;
pub mod mass;
pub mod output;
pub mod summary;
pub mod sweep;

pub use config::{ModelConfig, Validated};
pub use engine::RawRun;
pub use summary::Summary;

use crate::SimError;

/// Validates `config`, runs it and summarises the result.
pub fn run_config(config: &ModelConfig) -> Result<(Summary, RawRun), SimError> {
    config.check_model_mode()?;
    let v = config.validate()?;
    let raw = engine::run(&v)?;
    Ok((summary::summarize(config, &v, &raw), raw))
}

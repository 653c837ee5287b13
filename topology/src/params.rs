//! Network-wide parameters every node and client reads from the directory.

use serde::{Deserialize, Serialize};

use crate::TopologyError;

/// Loopix parameters and the fixed packet size, published in every document.
///
/// Rates are per second; delays in milliseconds. Cover rates are constants of the
/// network: nodes and clients never change them with load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkParams {
    /// Mean of the exponential per-hop delay (1/μ).
    pub mean_hop_delay_ms: f64,
    /// Cap on any single hop's delay; senders resample or clamp above it.
    pub max_hop_delay_ms: f64,
    /// λP: client payload stream (a real packet if queued, else cover).
    pub lambda_p: f64,
    /// λL: client loop stream.
    pub lambda_l: f64,
    /// λD: client drop stream.
    pub lambda_d: f64,
    /// λM: relay and gateway loop stream.
    pub lambda_m: f64,
    /// Bytes of every frame on every link; must equal the software's frame size.
    pub frame_size: u32,
    /// How long a retired epoch's key keeps unwrapping, in seconds.
    pub key_grace_secs: u64,
}

impl Default for NetworkParams {
    fn default() -> Self {
        NetworkParams {
            mean_hop_delay_ms: 50.0,
            max_hop_delay_ms: 1000.0,
            lambda_p: 2.0,
            lambda_l: 0.5,
            lambda_d: 0.5,
            lambda_m: 0.5,
            frame_size: shoal_packet::FRAME_SIZE as u32,
            key_grace_secs: 60,
        }
    }
}

impl NetworkParams {
    /// Rejects parameters no node could run with.
    pub fn validate(&self) -> Result<(), TopologyError> {
        let bad = |what: &'static str, reason: String| Err(TopologyError::Invalid { what, reason });
        if self.frame_size as usize != shoal_packet::FRAME_SIZE {
            return bad(
                "frame_size",
                format!(
                    "{} (this software uses {})",
                    self.frame_size,
                    shoal_packet::FRAME_SIZE
                ),
            );
        }
        if !(self.mean_hop_delay_ms.is_finite() && self.mean_hop_delay_ms > 0.0) {
            return bad("mean_hop_delay_ms", "must be finite and > 0".into());
        }
        if !(self.max_hop_delay_ms.is_finite() && self.max_hop_delay_ms >= self.mean_hop_delay_ms) {
            return bad("max_hop_delay_ms", "must be finite and >= the mean".into());
        }
        for (what, v) in [
            ("lambda_p", self.lambda_p),
            ("lambda_l", self.lambda_l),
            ("lambda_d", self.lambda_d),
            ("lambda_m", self.lambda_m),
        ] {
            if !(v.is_finite() && (0.0..=10_000.0).contains(&v)) {
                return bad(
                    what,
                    "must be a finite rate in [0, 10000] per second".into(),
                );
            }
        }
        Ok(())
    }
}

//! Key epochs: fixed-length windows of Unix time, numbered from a genesis instant.

use serde::{Deserialize, Serialize};

/// Maps Unix time to epoch numbers and back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochSchedule {
    /// Unix seconds at which epoch 0 starts.
    pub genesis_unix: u64,
    /// Length of every epoch in seconds (at least 1).
    pub length_secs: u64,
}

impl EpochSchedule {
    /// The epoch containing `unix` (epoch 0 before genesis).
    pub fn epoch_at(&self, unix: u64) -> u64 {
        unix.saturating_sub(self.genesis_unix) / self.length_secs.max(1)
    }

    /// Unix second at which `epoch` starts.
    pub fn start_of(&self, epoch: u64) -> u64 {
        self.genesis_unix
            .saturating_add(epoch.saturating_mul(self.length_secs.max(1)))
    }

    /// Unix second at which `epoch` ends (the next one starts).
    pub fn end_of(&self, epoch: u64) -> u64 {
        self.start_of(epoch.saturating_add(1))
    }

    /// How often a node re-uploads its descriptor: a sixteenth of an epoch, at least
    /// one second. Authorities judge liveness by descriptor age, so this cadence and
    /// [`crate::authority::default_descriptor_max_age_secs`] are defined together.
    pub fn republish_secs(&self) -> u64 {
        (self.length_secs / 16).max(1)
    }

    /// The 16-bit epoch label carried in frames.
    pub fn frame_label(epoch: u64) -> u16 {
        epoch as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs() {
        let s = EpochSchedule {
            genesis_unix: 1000,
            length_secs: 60,
        };
        assert_eq!(s.epoch_at(0), 0);
        assert_eq!(s.epoch_at(1059), 0);
        assert_eq!(s.epoch_at(1060), 1);
        assert_eq!(s.start_of(2), 1120);
        assert_eq!(s.end_of(2), 1180);
        assert_eq!(EpochSchedule::frame_label(65537), 1);
        assert_eq!(s.republish_secs(), 3);
        let short = EpochSchedule {
            genesis_unix: 0,
            length_secs: 12,
        };
        assert_eq!(short.republish_secs(), 1);
    }
}

//! Cubic with a floor under the congestion window.
//!
//! Every datagram is padded to one size, so ACK-only packets carry PADDING and count
//! as bytes in flight (RFC 9002 §2), yet they are not ack-eliciting: the peer acks
//! them only when it sends something anyway. A side that mostly acks (a client after
//! a pull answer, the far end of a one-way relay link) can fill Cubic's 10-packet
//! initial window with its own padded ACKs; its next frame then waits until the peer
//! happens to send (a bundled ACK every RTT + 25 ms, or the 5 s keep-alive when the
//! peer is idle). The floor is far above the ACKs one side can have outstanding
//! between the peer's lazy acks (quinn acks non-ack-eliciting packets once more than
//! 10 arrived), so those ACKs never block data. Above the floor Cubic works as usual.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics, CubicConfig};
use quinn_proto::RttEstimator;

/// Smallest congestion window, in datagrams of [`crate::WIRE_DATAGRAM_SIZE`].
pub(crate) const FLOOR_DATAGRAMS: u64 = 128;

/// Builds [`Floor`] controllers around Cubic.
#[derive(Debug)]
pub(crate) struct FloorFactory {
    cubic: Arc<CubicConfig>,
    floor: u64,
}

impl FloorFactory {
    pub(crate) fn new() -> Self {
        let floor = FLOOR_DATAGRAMS * u64::from(crate::WIRE_DATAGRAM_SIZE);
        let mut cubic = CubicConfig::default();
        cubic.initial_window(floor);
        Self {
            cubic: Arc::new(cubic),
            floor,
        }
    }
}

impl ControllerFactory for FloorFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Floor {
            inner: self.cubic.clone().build(now, current_mtu),
            floor: self.floor,
        })
    }
}

/// Cubic whose window never reports less than `floor` bytes.
struct Floor {
    inner: Box<dyn Controller>,
    floor: u64,
}

impl Controller for Floor {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window().max(self.floor)
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Floor {
            inner: self.inner.clone_box(),
            floor: self.floor,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window().max(self.floor)
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

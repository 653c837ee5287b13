//! The observer on a faithful-mode trace: what the simulator recorded of every link
//! ([`Observed`]) turned into the [`View`] a capture would give, and the [`Truth`] it is
//! scored against, so [`run_attacks`](super::run_attacks) runs unchanged on production
//! cores in virtual time, at scales the loopback network cannot reach.
//!
//! Addresses are made up (client `i` is `127.0.0.1:20000+i`, gateway `g`'s front
//! `127.0.1.1:10000+g` and its link `127.0.2.1:10000+g`); times are seconds of virtual
//! time. Each 2400-byte frame is two datagrams 10 µs apart, as it is on a 1500-byte MTU.

use std::net::SocketAddr;

use super::{Truth, TruthClient, TruthSend, View};
use crate::faithful::{MessageRow, Observed};

/// Gap between the two datagrams of one frame.
const DATAGRAM_GAP_S: f64 = 10e-6;

fn client_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16))
}

fn front_addr(g: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 1, 1], 10_000 + g as u16))
}

fn link_addr(g: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 2, 1], 10_000 + g as u16))
}

/// The datagrams of frames sent at `frames`, up to `end` (the drain after the traffic
/// window is not part of the capture).
fn datagrams(frames: impl IntoIterator<Item = f64>, end: f64) -> Vec<f64> {
    let mut out: Vec<f64> = frames
        .into_iter()
        .flat_map(|t| [t, t + DATAGRAM_GAP_S])
        .filter(|t| *t < end)
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

/// The view and truth of a faithful run recorded with `Scenario::observe`. `subnet_of`
/// names each client's subnet (`s0`, `s1`, …); `federated` the subnet pairs that
/// federate; `rows` are the run's messages (its truth of who sent what when).
pub fn view_and_truth(
    seen: &Observed,
    rows: &[MessageRow],
    subnet_of: &[u32],
    federated: &[(u32, u32)],
) -> (View, Truth) {
    let n = seen.client_up.len();
    let end = seen.duration_s;
    let gateways = seen
        .gateway_of
        .iter()
        .copied()
        .max()
        .map_or(0, |g| g + 1)
        .max(
            seen.gateway_inbound
                .iter()
                .chain(&seen.gateway_outbound)
                .map(|x| x.1 + 1)
                .max()
                .unwrap_or(0),
        );
    let mut gw_in = vec![Vec::new(); gateways];
    for &(t, g) in &seen.gateway_inbound {
        gw_in[g].push(t);
    }
    let mut gw_out = vec![Vec::new(); gateways];
    for &(t, g) in &seen.gateway_outbound {
        gw_out[g].push(t);
    }
    let view = View {
        start: 0.0,
        end: seen.duration_s,
        clients: (0..n).map(client_addr).collect(),
        client_front: seen.gateway_of.clone(),
        fronts: (0..gateways).map(front_addr).collect(),
        front_gateway: (0..gateways).map(Some).collect(),
        gateway_links: (0..gateways).map(link_addr).collect(),
        up: seen
            .client_up
            .iter()
            .map(|u| datagrams(u.iter().copied(), end))
            .collect(),
        down: seen
            .client_down
            .iter()
            .map(|d| datagrams(d.iter().copied(), end))
            .collect(),
        gw_in: gw_in.into_iter().map(|g| datagrams(g, end)).collect(),
        gw_out: gw_out.into_iter().map(|g| datagrams(g, end)).collect(),
    };
    let name = |s: u32| format!("s{s}");
    let truth = Truth {
        clients: (0..n)
            .map(|i| TruthClient {
                address: client_addr(i),
                subnet: name(subnet_of.get(i).copied().unwrap_or(0)),
                gateway: link_addr(seen.gateway_of[i]),
            })
            .collect(),
        federated: federated.iter().map(|&(a, b)| (name(a), name(b))).collect(),
        sends: rows
            .iter()
            .filter(|r| r.sent_s < seen.duration_s)
            .map(|r| TruthSend {
                from: client_addr(r.sender as usize),
                to: client_addr(r.receiver as usize),
                at: r.sent_s,
            })
            .collect(),
    };
    (view, truth)
}

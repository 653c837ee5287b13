//! What the observer reads: UDP datagrams from a pcap file (as `tcpdump -w` writes it),
//! the public directory documents (which addresses are relays and gateways), and the
//! [`View`] built from both: one time series per client link and per gateway link.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use pcap_file::pcap::PcapReader;
use pcap_file::{DataLink, TsResolution};
use shoal_topology::{DocumentBody, Role, SignedDocument};

use super::ObserveError;

/// Datagrams kept from one capture; beyond this the capture is refused rather than
/// growing without bound.
pub const MAX_DATAGRAMS: usize = 50_000_000;

/// One captured UDP datagram: arrival time (Unix seconds) and its two ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Datagram {
    pub t: f64,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// Reads every IPv4/IPv6 UDP datagram of a classic pcap stream (Ethernet, Linux cooked
/// v1/v2, BSD loopback or raw IP link types); other packets are skipped.
pub fn read_pcap(input: impl Read) -> Result<Vec<Datagram>, ObserveError> {
    let mut reader = PcapReader::new(input).map_err(|e| ObserveError::Capture(e.to_string()))?;
    let header = reader.header();
    let link = header.datalink;
    let frac = match header.ts_resolution {
        TsResolution::MicroSecond => 1e-6,
        TsResolution::NanoSecond => 1e-9,
    };
    let mut out = Vec::new();
    // Raw records: pcap-file 2.0's checked packets refuse orig_len > snaplen, which is
    // every packet of a capture cut short with `-s` (as headers-only captures are).
    while let Some(packet) = reader.next_raw_packet() {
        let packet = packet.map_err(|e| ObserveError::Capture(e.to_string()))?;
        let Some((src, dst)) = udp_ends(link, &packet.data) else {
            continue;
        };
        if out.len() >= MAX_DATAGRAMS {
            return Err(ObserveError::Capture(format!(
                "more than {MAX_DATAGRAMS} UDP datagrams; cut the capture"
            )));
        }
        out.push(Datagram {
            t: f64::from(packet.ts_sec) + f64::from(packet.ts_frac) * frac,
            src,
            dst,
        });
    }
    Ok(out)
}

fn be16(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

/// The UDP source and destination of one link-layer frame, if it is one.
fn udp_ends(link: DataLink, frame: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    // (ethertype or 0 for "read the IP version", offset of the IP header)
    let (ethertype, ip) = match link {
        DataLink::ETHERNET => (be16(frame, 12)?, 14),
        DataLink::LINUX_SLL => (be16(frame, 14)?, 16),
        DataLink::LINUX_SLL2 => (be16(frame, 0)?, 20),
        DataLink::NULL | DataLink::LOOP => (0, 4),
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => (0, 0),
        _ => return None,
    };
    let ip_bytes = frame.get(ip..)?;
    let version = ip_bytes.first()? >> 4;
    match (ethertype, version) {
        (0x0800 | 0, 4) => {
            let ihl = usize::from(ip_bytes[0] & 0x0f) * 4;
            if *ip_bytes.get(9)? != 17 || ihl < 20 {
                return None;
            }
            let a = |i: usize| -> Option<IpAddr> {
                let b = ip_bytes.get(i..i + 4)?;
                Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
            };
            let udp = ip_bytes.get(ihl..)?;
            Some((
                SocketAddr::new(a(12)?, be16(udp, 0)?),
                SocketAddr::new(a(16)?, be16(udp, 2)?),
            ))
        }
        (0x86dd | 0, 6) => {
            // Only UDP directly after the fixed header (no extension headers).
            if *ip_bytes.get(6)? != 17 {
                return None;
            }
            let a = |i: usize| -> Option<IpAddr> {
                let b: [u8; 16] = ip_bytes.get(i..i + 16)?.try_into().ok()?;
                Some(IpAddr::V6(Ipv6Addr::from(b)))
            };
            let udp = ip_bytes.get(40..)?;
            Some((
                SocketAddr::new(a(8)?, be16(udp, 0)?),
                SocketAddr::new(a(24)?, be16(udp, 2)?),
            ))
        }
        _ => None,
    }
}

/// What the observer knows before looking: the public directory, and the gateways'
/// client-facing addresses (handed to every client, so public too).
#[derive(Debug, Clone, Default)]
pub struct Knowledge {
    pub relays: BTreeSet<SocketAddr>,
    /// Gateway link addresses, as the directory lists them.
    pub gateway_links: Vec<SocketAddr>,
    /// Gateways' client-facing addresses, each with the index (in `gateway_links`) of the
    /// gateway it belongs to if known.
    pub fronts: Vec<(SocketAddr, Option<usize>)>,
}

impl Knowledge {
    /// Adds the relays and gateways of one directory document (a `SignedDocument` as the
    /// authorities serve it). Signatures are not checked: the observer only reads addresses.
    pub fn add_document(&mut self, json: &[u8]) -> Result<(), ObserveError> {
        let signed: SignedDocument = serde_json::from_slice(json)
            .map_err(|e| ObserveError::Directory(format!("not a signed document: {e}")))?;
        let body: DocumentBody = serde_json::from_str(&signed.body)
            .map_err(|e| ObserveError::Directory(format!("document body: {e}")))?;
        for node in &body.nodes {
            let Ok(addr) = node.link_addr.parse::<SocketAddr>() else {
                continue;
            };
            match node.role {
                Role::Relay => {
                    self.relays.insert(addr);
                }
                Role::Gateway => {
                    if !self.gateway_links.contains(&addr) {
                        self.gateway_links.push(addr);
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds a gateway's client-facing address, tied to gateway link address `link` if given.
    pub fn add_front(&mut self, front: SocketAddr, link: Option<SocketAddr>) {
        let idx = link.and_then(|l| self.gateway_links.iter().position(|g| *g == l));
        self.fronts.retain(|f| f.0 != front);
        self.fronts.push((front, idx));
    }

    fn in_directory(&self, a: &SocketAddr) -> bool {
        self.relays.contains(a) || self.gateway_links.contains(a)
    }
}

/// One client's datagram times up and down, and datagrams per front it talked to.
type ClientLink = (Vec<f64>, Vec<f64>, BTreeMap<usize, usize>);

/// The capture cut into the series the attacks read.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// First and last datagram time (Unix seconds).
    pub start: f64,
    pub end: f64,
    pub clients: Vec<SocketAddr>,
    /// The front each client talks to (most of its datagrams), index into `fronts`.
    pub client_front: Vec<usize>,
    pub fronts: Vec<SocketAddr>,
    /// The gateway (index into `gateway_links`) behind each front, if known.
    pub front_gateway: Vec<Option<usize>>,
    pub gateway_links: Vec<SocketAddr>,
    /// Per client, sorted times of its datagrams to its gateway.
    pub up: Vec<Vec<f64>>,
    /// Per client, sorted times of its gateway's datagrams to it.
    pub down: Vec<Vec<f64>>,
    /// Per gateway link, sorted times of datagrams from relays to it.
    pub gw_in: Vec<Vec<f64>>,
    /// Per gateway link, sorted times of datagrams from it to relays.
    pub gw_out: Vec<Vec<f64>>,
}

impl View {
    /// Sorts the capture into client and gateway links. Fronts not given in `knowledge`
    /// are inferred: an address outside the directory that exchanges datagrams with two or
    /// more other addresses outside it (a client talks to its gateway only), or one on a
    /// gateway's (non-loopback) IP.
    pub fn build(datagrams: &[Datagram], knowledge: &Knowledge) -> View {
        let mut fronts: Vec<(SocketAddr, Option<usize>)> = knowledge.fronts.clone();
        let mut peers: BTreeMap<SocketAddr, BTreeSet<SocketAddr>> = BTreeMap::new();
        for d in datagrams {
            if !knowledge.in_directory(&d.src) && !knowledge.in_directory(&d.dst) {
                peers.entry(d.src).or_default().insert(d.dst);
                peers.entry(d.dst).or_default().insert(d.src);
            }
        }
        for (addr, p) in &peers {
            if fronts.iter().any(|f| f.0 == *addr) {
                continue;
            }
            let on_gateway_ip = knowledge
                .gateway_links
                .iter()
                .position(|g| g.ip() == addr.ip() && !g.ip().is_loopback());
            if on_gateway_ip.is_some() || (knowledge.fronts.is_empty() && p.len() >= 2) {
                fronts.push((*addr, on_gateway_ip));
            }
        }
        fronts.sort();
        let front_idx = |a: &SocketAddr| fronts.iter().position(|f| f.0 == *a);
        // Clients: talk to a front, are not one.
        let mut per_client: BTreeMap<SocketAddr, ClientLink> = BTreeMap::new();
        let links = &knowledge.gateway_links;
        let mut gw_in = vec![Vec::new(); links.len()];
        let mut gw_out = vec![Vec::new(); links.len()];
        let (mut start, mut end) = (f64::INFINITY, f64::NEG_INFINITY);
        for d in datagrams {
            let from_front = front_idx(&d.src);
            let to_front = front_idx(&d.dst);
            match (from_front, to_front) {
                (None, Some(f)) if !knowledge.in_directory(&d.src) => {
                    let e = per_client.entry(d.src).or_default();
                    e.0.push(d.t);
                    *e.2.entry(f).or_default() += 1;
                }
                (Some(f), None) if !knowledge.in_directory(&d.dst) => {
                    let e = per_client.entry(d.dst).or_default();
                    e.1.push(d.t);
                    *e.2.entry(f).or_default() += 1;
                }
                _ => {}
            }
            if knowledge.relays.contains(&d.src)
                && let Some(g) = links.iter().position(|g| *g == d.dst)
            {
                gw_in[g].push(d.t);
            }
            if knowledge.relays.contains(&d.dst)
                && let Some(g) = links.iter().position(|g| *g == d.src)
            {
                gw_out[g].push(d.t);
            }
            start = start.min(d.t);
            end = end.max(d.t);
        }
        let mut view = View {
            start: if start.is_finite() { start } else { 0.0 },
            end: if end.is_finite() { end } else { 0.0 },
            fronts: fronts.iter().map(|f| f.0).collect(),
            front_gateway: fronts.iter().map(|f| f.1).collect(),
            gateway_links: links.clone(),
            gw_in,
            gw_out,
            ..View::default()
        };
        for (addr, (mut up, mut down, counts)) in per_client {
            let front = counts
                .iter()
                .max_by_key(|(f, n)| (**n, std::cmp::Reverse(**f)))
                .map_or(0, |(f, _)| *f);
            up.sort_by(f64::total_cmp);
            down.sort_by(f64::total_cmp);
            view.clients.push(addr);
            view.client_front.push(front);
            view.up.push(up);
            view.down.push(down);
        }
        for s in view.gw_in.iter_mut().chain(view.gw_out.iter_mut()) {
            s.sort_by(f64::total_cmp);
        }
        view
    }

    /// Number of windows of `window` seconds the capture spans.
    pub fn windows(&self, window: f64) -> usize {
        if self.end <= self.start || window <= 0.0 {
            return 0;
        }
        ((self.end - self.start) / window).ceil() as usize
    }

    /// Counts of `times` per window.
    pub fn series(&self, times: &[f64], window: f64) -> Vec<f64> {
        let n = self.windows(window);
        let mut s = vec![0.0; n];
        for &t in times {
            let i = ((t - self.start) / window) as usize;
            if let Some(x) = s.get_mut(i.min(n.saturating_sub(1))) {
                *x += 1.0;
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcap::{PcapHeader, PcapWriter, RawPcapPacket};
    use std::time::Duration;

    /// A Linux-cooked-v2 IPv4/UDP frame as `tcpdump -i lo` on a recent kernel writes it.
    fn sll2_udp(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let mut f = vec![0u8; 20];
        f[0..2].copy_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0];
        let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
            panic!("v4 only")
        };
        ip.extend_from_slice(&s.ip().octets());
        ip.extend_from_slice(&d.ip().octets());
        ip.extend_from_slice(&s.port().to_be_bytes());
        ip.extend_from_slice(&d.port().to_be_bytes());
        ip.extend_from_slice(&[0, 8, 0, 0]);
        f.extend(ip);
        f
    }

    #[test]
    fn reads_udp_from_a_linux_cooked_capture_and_sorts_links() {
        let a: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:40002".parse().unwrap();
        let front: SocketAddr = "127.0.0.1:30000".parse().unwrap();
        let link: SocketAddr = "127.0.0.1:30001".parse().unwrap();
        let relay: SocketAddr = "127.0.0.1:20000".parse().unwrap();
        let header = PcapHeader {
            datalink: DataLink::LINUX_SLL2,
            snaplen: 96,
            ..PcapHeader::default()
        };
        let mut w = PcapWriter::with_header(Vec::new(), header).unwrap();
        for (i, (s, d)) in [
            (a, front),
            (front, b),
            (b, front),
            (relay, link),
            (link, relay),
        ]
        .into_iter()
        .enumerate()
        {
            let data = sll2_udp(s, d);
            let t = Duration::from_millis(1_000_000 + 500 * i as u64);
            // Cut short like `tcpdump -s 96`: the datagram was 1200 bytes on the wire.
            w.write_raw_packet(&RawPcapPacket {
                ts_sec: t.as_secs() as u32,
                ts_frac: t.subsec_micros(),
                incl_len: data.len() as u32,
                orig_len: 1248,
                data: data.into(),
            })
            .unwrap();
        }
        let bytes = w.into_writer();
        let dgs = read_pcap(&bytes[..]).unwrap();
        assert_eq!(dgs.len(), 5);
        assert_eq!((dgs[0].src, dgs[0].dst), (a, front));
        assert!((dgs[1].t - 1000.5).abs() < 1e-6);
        let mut k = Knowledge::default();
        k.relays.insert(relay);
        k.gateway_links.push(link);
        // The front is inferred: it talks to two addresses outside the directory.
        let v = View::build(&dgs, &k);
        assert_eq!(v.fronts, vec![front]);
        assert_eq!(v.clients, vec![a, b]);
        assert_eq!((v.up[0].len(), v.down[0].len()), (1, 0));
        assert_eq!((v.up[1].len(), v.down[1].len()), (1, 1));
        assert_eq!((v.gw_in[0].len(), v.gw_out[0].len()), (1, 1));
        assert_eq!(v.windows(1.0), 2);
        assert_eq!(v.series(&v.up[1], 1.0), vec![0.0, 1.0]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(read_pcap(&b"not a capture at all"[..]).is_err());
        assert!(udp_ends(DataLink::ETHERNET, &[0u8; 3]).is_none());
        assert!(udp_ends(DataLink::LINUX_SLL2, &[0x08, 0x00, 0, 0]).is_none());
    }
}

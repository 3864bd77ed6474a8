//! Frames with correct checksums: Ethernet (+ VLAN tag) + IPv4 (+ options) or IPv6 (+ a
//! hop-by-hop header) + TCP, and ICMP errors quoting one; every field a test varies is a field
//! of `Pkt`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{FAMILY_V4, FAMILY_V6, flow::FlowKey};

use super::{ACK, PSH, csum::csum, parse::flow_key};

/// Destination and source MAC: the programs never look at them.
const ETHERNET: [u8; 12] = [0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];

#[derive(Clone, Debug)]
pub struct Pkt {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// TCP options (a multiple of 4 bytes), counted in the data offset.
    pub tcp_options: Vec<u8>,
    pub payload: Vec<u8>,
    /// A VLAN tag: (tag type, VLAN id).
    pub vlan: Option<(u16, u16)>,
    pub ip_id: u16,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// IPv4 flags + fragment offset field.
    pub frag: u16,
    /// An IPv6 hop-by-hop header before TCP.
    pub hop_by_hop: bool,
    /// Overrides the TCP data offset (in 32-bit words).
    pub doff: Option<u8>,
    /// Added to the TCP checksum after computing it (0: valid).
    pub bad_csum: u16,
}

/// A frame's bytes and where its headers start (for field mutations).
pub struct Frame {
    pub bytes: Vec<u8>,
    pub l3: usize,
    pub l4: usize,
    pub v4: bool,
}

impl Pkt {
    /// A segment with fixed sequence numbers, DF set, and an HTTP request as payload when PSH.
    pub fn new(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Pkt {
        Pkt {
            src,
            dst,
            sport,
            dport,
            flags,
            seq: 1000,
            ack: if flags & ACK != 0 { 2000 } else { 0 },
            tcp_options: Vec::new(),
            payload: if flags & PSH != 0 { b"GET / HTTP/1.1\r\n\r\n".to_vec() } else { Vec::new() },
            vlan: None,
            ip_id: 0x1234,
            ip_options: Vec::new(),
            frag: 0x4000, // DF
            hop_by_hop: false,
            doff: None,
            bad_csum: 0,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.frame().bytes
    }

    pub fn frame(&self) -> Frame {
        let mut tcp = Vec::with_capacity(40);
        tcp.extend(self.sport.to_be_bytes());
        tcp.extend(self.dport.to_be_bytes());
        tcp.extend(self.seq.to_be_bytes());
        tcp.extend(self.ack.to_be_bytes());
        tcp.push(self.doff.unwrap_or(5 + self.tcp_options.len() as u8 / 4) << 4);
        tcp.push(self.flags);
        tcp.extend(64240u16.to_be_bytes());
        tcp.extend([0, 0, 0, 0]); // checksum, urgent pointer
        tcp.extend(&self.tcp_options);
        tcp.extend(&self.payload);
        let tcp_len = (tcp.len() as u16).to_be_bytes();
        let check = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => csum(&[&s.octets(), &d.octets(), &[0, 6], &tcp_len, &tcp]),
            (IpAddr::V6(s), IpAddr::V6(d)) => csum(&[&s.octets(), &d.octets(), &[0, 0], &tcp_len, &[0, 0, 0, 6], &tcp]),
            _ => unreachable!(),
        };
        tcp[16..18].copy_from_slice(&check.wrapping_add(self.bad_csum).to_be_bytes());

        let mut out = ETHERNET.to_vec();
        if let Some((tpid, vid)) = self.vlan {
            out.extend(tpid.to_be_bytes());
            out.extend(vid.to_be_bytes());
        }
        let l3 = out.len() + 2;
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.extend([0x08, 0x00]);
                let ihl = 5 + self.ip_options.len() / 4;
                let mut ip = vec![0x40 | ihl as u8, 0];
                ip.extend(((ihl * 4 + tcp.len()) as u16).to_be_bytes());
                ip.extend(self.ip_id.to_be_bytes());
                ip.extend(self.frag.to_be_bytes());
                ip.extend([64, 6, 0, 0]);
                ip.extend(s.octets());
                ip.extend(d.octets());
                ip.extend(&self.ip_options);
                let c = csum(&[&ip]);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                out.extend(ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                out.extend([0x86, 0xdd]);
                let ext_len = if self.hop_by_hop { 8 } else { 0 };
                out.extend([0x60, 0, 0, 0]);
                out.extend(((tcp.len() + ext_len) as u16).to_be_bytes());
                out.push(if self.hop_by_hop { 0 } else { 6 });
                out.push(64);
                out.extend(s.octets());
                out.extend(d.octets());
                if self.hop_by_hop {
                    out.extend([6, 0, 1, 4, 0, 0, 0, 0]); // next=TCP, len 0, PadN
                }
            }
            _ => unreachable!(),
        }
        let l4 = out.len();
        out.extend(tcp);
        Frame { bytes: out, l3, l4, v4: self.src.is_ipv4() }
    }

    pub fn with_dst(&self, dst: IpAddr, dport: u16) -> Pkt {
        Pkt { dst, dport, ..self.clone() }
    }

    pub fn with_src(&self, src: IpAddr, sport: u16) -> Pkt {
        Pkt { src, sport, ..self.clone() }
    }

    /// The flow key the XDP program looks this segment up by.
    pub fn key(&self) -> FlowKey {
        let map = |ip: IpAddr| match ip {
            IpAddr::V4(a) => (lb_common::Addr::v4(a.octets()), FAMILY_V4),
            IpAddr::V6(a) => (lb_common::Addr(a.octets()), FAMILY_V6),
        };
        let ((src_addr, family), (dst_addr, _)) = (map(self.src), map(self.dst));
        flow_key(src_addr, dst_addr, self.sport.to_be_bytes(), self.dport.to_be_bytes(), family)
    }
}

pub fn v4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Pkt {
    Pkt::new(src.into(), sport, dst.into(), dport, flags)
}

pub fn v6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Pkt {
    Pkt::new(src.into(), sport, dst.into(), dport, flags)
}

/// An ICMP error from `from` to `to` quoting the first `quote` bytes (from its IP header on) of
/// `offending`: IPv4 "fragmentation needed" or ICMPv6 "packet too big".
pub fn icmp_error(from: IpAddr, to: IpAddr, offending: &Frame, quote: usize) -> Frame {
    let quoted = &offending.bytes[offending.l3..(offending.l3 + quote).min(offending.bytes.len())];
    let mut icmp = match to {
        IpAddr::V4(_) => vec![3, 4, 0, 0, 0, 0, 0x05, 0x00], // frag needed, MTU 1280
        IpAddr::V6(_) => vec![2, 0, 0, 0, 0, 0, 0x05, 0x00], // packet too big, MTU 1280
    };
    icmp.extend(quoted);
    let mut out = ETHERNET.to_vec();
    match (from, to) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let c = csum(&[&icmp]);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            out.extend([0x08, 0x00]);
            let mut ip = vec![0x45, 0];
            ip.extend(((20 + icmp.len()) as u16).to_be_bytes());
            ip.extend([0, 1, 0, 0, 64, 1, 0, 0]);
            ip.extend(s.octets());
            ip.extend(d.octets());
            let c = csum(&[&ip]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            out.extend(ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = (icmp.len() as u16).to_be_bytes();
            let c = csum(&[&s.octets(), &d.octets(), &[0, 0], &len, &[0, 0, 0, 58], &icmp]);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            out.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
            out.extend(len);
            out.extend([58, 64]);
            out.extend(s.octets());
            out.extend(d.octets());
        }
        _ => unreachable!(),
    }
    let l4 = out.len();
    out.extend(icmp);
    Frame { bytes: out, l3: 14, l4, v4: from.is_ipv4() }
}

//! Parsing as the programs parse (lb-ebpf/src/parse.rs): the same classes, offsets and keys.

use lb_common::{Addr, FAMILY_V4, FAMILY_V6, PROTO_TCP, flow::FlowKey};

use super::csum::{csum, rd16, rd32};

/// A TCP segment: where its IP and TCP headers start, and its flow key.
#[derive(Clone, Debug)]
pub struct Tcp {
    pub ip: usize,
    pub tcp: usize,
    pub v4: bool,
    pub flags: u8,
    pub key: FlowKey,
    pub ip_options: bool,
}

/// An ICMP error quoting a TCP segment; `fwd` is the key of the flow whose reply it quotes.
#[derive(Clone, Debug)]
pub struct Icmp {
    pub ip: usize,
    pub icmp: usize,
    pub inner_ip: usize,
    pub inner_tcp: usize,
    pub v4: bool,
    pub fwd: FlowKey,
}

/// The classes the XDP program tells apart.
#[derive(Clone, Debug)]
pub enum Parsed {
    Tcp(Tcp),
    Other,
    Malformed,
    Fragment,
    Ipv6Ext,
    Icmp(Icmp),
}

/// A TCP flow key; ports as in the packet (network byte order).
pub fn flow_key(src: Addr, dst: Addr, sport: [u8; 2], dport: [u8; 2], family: u8) -> FlowKey {
    FlowKey {
        src_addr: src,
        dst_addr: dst,
        src_port: u16::from_ne_bytes(sport),
        dst_port: u16::from_ne_bytes(dport),
        family,
        proto: PROTO_TCP,
        _pad: [0; 2],
    }
}

fn addr_at(p: &[u8], at: usize, v4: bool) -> Addr {
    if v4 { Addr::v4(rd32(p, at)) } else { Addr(p[at..at + 16].try_into().unwrap()) }
}

fn ports_at(p: &[u8], at: usize) -> ([u8; 2], [u8; 2]) {
    ([p[at], p[at + 1]], [p[at + 2], p[at + 3]])
}

fn parse_icmp(p: &[u8], ip: usize, icmp: usize, v4: bool) -> Parsed {
    let end = p.len();
    let inner = icmp + 8;
    let inner_l4;
    let (src, dst);
    if v4 {
        if inner + 20 > end {
            return Parsed::Malformed;
        }
        if p[inner + 9] != PROTO_TCP {
            return Parsed::Other;
        }
        let ihl = usize::from(p[inner] & 0xf);
        if p[inner] >> 4 != 4 || ihl < 5 {
            return Parsed::Malformed;
        }
        inner_l4 = inner + ihl * 4;
        (src, dst) = (addr_at(p, inner + 12, true), addr_at(p, inner + 16, true));
    } else {
        if inner + 40 > end {
            return Parsed::Malformed;
        }
        if p[inner + 6] != PROTO_TCP {
            return Parsed::Other;
        }
        inner_l4 = inner + 40;
        (src, dst) = (addr_at(p, inner + 8, false), addr_at(p, inner + 24, false));
    }
    if inner_l4 + 8 > end {
        return Parsed::Malformed;
    }
    let (sport, dport) = ports_at(p, inner_l4);
    // The quoted segment went VIP → client; the flow's forward key is its reverse.
    let fwd = flow_key(dst, src, dport, sport, if v4 { FAMILY_V4 } else { FAMILY_V6 });
    Parsed::Icmp(Icmp { ip, icmp, inner_ip: inner, inner_tcp: inner_l4, v4, fwd })
}

pub fn parse(p: &[u8]) -> Parsed {
    let end = p.len();
    if 14 > end {
        return Parsed::Malformed;
    }
    let mut l3 = 14;
    let mut proto = rd16(p, 12);
    if proto == 0x8100 || proto == 0x88a8 {
        if l3 + 4 > end {
            return Parsed::Malformed;
        }
        proto = rd16(p, l3 + 2);
        l3 += 4;
    }
    let (l4, v4, ip_options);
    if proto == 0x0800 {
        if l3 + 20 > end {
            return Parsed::Malformed;
        }
        let (ver_ihl, ip_proto) = (p[l3], p[l3 + 9]);
        if ip_proto != 6 && ip_proto != 1 {
            return Parsed::Other;
        }
        let ihl = usize::from(ver_ihl & 0xf);
        if ver_ihl >> 4 != 4 || ihl < 5 {
            return Parsed::Malformed;
        }
        if rd16(p, l3 + 6) & 0x3fff != 0 {
            return if ip_proto == 6 { Parsed::Fragment } else { Parsed::Other };
        }
        if ip_proto == 1 {
            let icmp = l3 + ihl * 4;
            if icmp + 8 > end {
                return Parsed::Malformed;
            }
            return match p[icmp] {
                3 | 11 | 12 => parse_icmp(p, l3, icmp, true),
                _ => Parsed::Other,
            };
        }
        ip_options = ihl > 5;
        l4 = l3 + ihl * 4;
        v4 = true;
    } else if proto == 0x86dd {
        if l3 + 40 > end {
            return Parsed::Malformed;
        }
        let next = p[l3 + 6];
        if next == 58 {
            let icmp = l3 + 40;
            if icmp + 8 > end {
                return Parsed::Malformed;
            }
            return match p[icmp] {
                1..=4 => parse_icmp(p, l3, icmp, false),
                _ => Parsed::Other,
            };
        }
        if next != 6 {
            return if matches!(next, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254) {
                Parsed::Ipv6Ext
            } else {
                Parsed::Other
            };
        }
        l4 = l3 + 40;
        v4 = false;
        ip_options = false;
    } else {
        return Parsed::Other;
    }
    if l4 + 20 > end {
        return Parsed::Malformed;
    }
    let doff = usize::from(p[l4 + 12] >> 4);
    if doff < 5 || l4 + doff * 4 > end {
        return Parsed::Malformed;
    }
    let (sa, da) = if v4 { (l3 + 12, l3 + 16) } else { (l3 + 8, l3 + 24) };
    let (sport, dport) = ports_at(p, l4);
    let key = flow_key(addr_at(p, sa, v4), addr_at(p, da, v4), sport, dport, if v4 { FAMILY_V4 } else { FAMILY_V6 });
    Parsed::Tcp(Tcp { ip: l3, tcp: l4, v4, flags: p[l4 + 13], key, ip_options })
}


/// The TCP checksum over the segment from its header to the end of the frame.
pub fn tcp_csum(p: &[u8], t: &Tcp) -> u16 {
    let seg = &p[t.tcp..];
    let len = (seg.len() as u16).to_be_bytes();
    if t.v4 {
        csum(&[&p[t.ip + 12..t.ip + 20], &[0, 6], &len, seg])
    } else {
        csum(&[&p[t.ip + 8..t.ip + 40], &[0, 0], &len, &[0, 0, 0, 6], seg])
    }
}

fn tcp_segment(p: &[u8]) -> Tcp {
    match parse(p) {
        Parsed::Tcp(t) => t,
        other => panic!("not a TCP segment ({other:?}): {p:02x?}"),
    }
}

/// Does the TCP checksum of a TCP segment verify?
pub fn tcp_checksum_ok(p: &[u8]) -> bool {
    tcp_csum(p, &tcp_segment(p)) == 0
}

/// Does the IPv4 header checksum of a TCP segment verify?
pub fn ipv4_header_ok(p: &[u8]) -> bool {
    let ip = tcp_segment(p).ip;
    let ihl = usize::from(p[ip] & 0xf) * 4;
    csum(&[&p[ip..ip + ihl]]) == 0
}

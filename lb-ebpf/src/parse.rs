//! Header parsing shared by the XDP and TC programs: Ethernet (+ one 802.1Q/802.1ad tag),
//! IPv4 (options allowed) or IPv6 (no extension headers), TCP.
//!
//! Every read is bounds-checked against `data_end` right before it, in the form the verifier
//! can follow (`ptr + len > end`). Offsets that vary (IPv4 ihl, TCP doff) are masked to 4 bits
//! first so the verifier knows their range.

use lb_common::{Addr, FAMILY_V4, FAMILY_V6, PROTO_TCP, flow::FlowKey};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88A8u16.to_be();
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Offsets inside the TCP header.
pub const TCP_SPORT: usize = 0;
pub const TCP_DPORT: usize = 2;
pub const TCP_CHECK: usize = 16;
/// Offsets inside the IPv4 header.
pub const IP4_CHECK: usize = 10;
pub const IP4_SADDR: usize = 12;
pub const IP4_DADDR: usize = 16;
/// Offsets inside the IPv6 header.
pub const IP6_SADDR: usize = 8;
pub const IP6_DADDR: usize = 24;

/// A TCP segment that can be NATed.
pub struct Tcp {
    /// Packet pointers (checked against data_end by `parse`).
    pub ip: usize,
    pub tcp: usize,
    /// The same, as offsets from the start of the packet (for skb helpers).
    pub ip_off: usize,
    pub tcp_off: usize,
    pub flags: u8,
    /// The packet's own 4-tuple (source → destination).
    pub key: FlowKey,
    pub ip_options: bool,
}

pub enum Parsed {
    Tcp(Tcp),
    /// Not TCP over IP: ARP, UDP, ICMP, … Passed untouched.
    Other,
    /// Truncated headers, IPv4 ihl < 5, TCP doff < 5 or past the end.
    Malformed,
    /// An IPv4 fragment carrying TCP: only the first has ports, so none can be NATed.
    Fragment,
    /// IPv6 with an extension header before TCP.
    Ipv6Ext,
    /// An ICMP or ICMPv6 error quoting a TCP segment.
    IcmpError(IcmpError),
}

/// An ICMP error ("fragmentation needed", "packet too big", unreachable, time exceeded) about a
/// TCP segment. If that segment was a reply we rewrote to come from a VIP, the error names the
/// VIP, and the backend's socket would never hear of it: path MTU discovery would stall.
pub struct IcmpError {
    /// Packet pointers: outer IP header, ICMP header, quoted IP header, quoted TCP header.
    pub ip: usize,
    pub icmp: usize,
    pub inner_ip: usize,
    pub inner_tcp: usize,
    /// The end of the packet: whether the quote reaches the TCP checksum (only the first 8
    /// bytes are guaranteed) is checked against it where the checksum is written.
    pub end: usize,
    /// The `FLOWS` key of the quoted segment's connection: client → VIP.
    pub fwd: FlowKey,
}

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const ICMP_HLEN: usize = 8;

/// Parses the quoted packet of an ICMP error at `icmp` (already known to be an error type).
#[inline(always)]
fn icmp_error(ip: usize, icmp: usize, end: usize, family: u8) -> Parsed {
    let inner = icmp + ICMP_HLEN;
    let mut fwd = FlowKey { proto: PROTO_TCP, family, ..FlowKey::default() };
    let inner_l4;
    if family == FAMILY_V4 {
        if inner + IPV4_HLEN > end {
            return Parsed::Malformed;
        }
        let ver_ihl: u8 = unsafe { load(inner) };
        let ihl = (ver_ihl & 0x0f) as usize;
        if unsafe { load::<u8>(inner + 9) } != PROTO_TCP {
            return Parsed::Other;
        }
        if ver_ihl >> 4 != 4 || ihl < 5 {
            return Parsed::Malformed;
        }
        inner_l4 = inner + ihl * 4;
        // The quoted segment went VIP → client; its connection's forward key is the reverse.
        fwd.dst_addr = Addr::v4(unsafe { load(inner + IP4_SADDR) });
        fwd.src_addr = Addr::v4(unsafe { load(inner + IP4_DADDR) });
    } else {
        if inner + IPV6_HLEN > end {
            return Parsed::Malformed;
        }
        if unsafe { load::<u8>(inner + 6) } != PROTO_TCP {
            return Parsed::Other;
        }
        inner_l4 = inner + IPV6_HLEN;
        fwd.dst_addr = Addr(unsafe { load(inner + IP6_SADDR) });
        fwd.src_addr = Addr(unsafe { load(inner + IP6_DADDR) });
    }
    // RFC 792/4443 guarantee the first 8 bytes of the quoted transport header: the ports.
    if inner_l4 + 8 > end {
        return Parsed::Malformed;
    }
    fwd.dst_port = unsafe { load(inner_l4 + TCP_SPORT) };
    fwd.src_port = unsafe { load(inner_l4 + TCP_DPORT) };
    Parsed::IcmpError(IcmpError {
        ip,
        icmp,
        inner_ip: inner,
        inner_tcp: inner_l4,
        end,
        fwd,
    })
}

#[inline(always)]
unsafe fn load<T: Copy>(addr: usize) -> T {
    unsafe { (addr as *const T).read_unaligned() }
}

#[inline(always)]
fn is_ipv6_ext(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

#[inline(always)]
pub fn parse(data: usize, end: usize) -> Parsed {
    if data + ETH_HLEN > end {
        return Parsed::Malformed;
    }
    let mut l3 = data + ETH_HLEN;
    let mut proto: u16 = unsafe { load(data + 12) };
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        if l3 + VLAN_HLEN > end {
            return Parsed::Malformed;
        }
        proto = unsafe { load(l3 + 2) };
        l3 += VLAN_HLEN;
    }
    let mut key = FlowKey { proto: PROTO_TCP, ..FlowKey::default() };
    let l4;
    let mut ip_options = false;
    if proto == ETH_P_IP {
        if l3 + IPV4_HLEN > end {
            return Parsed::Malformed;
        }
        let ver_ihl: u8 = unsafe { load(l3) };
        let ip_proto: u8 = unsafe { load(l3 + 9) };
        if ip_proto != PROTO_TCP && ip_proto != PROTO_ICMP {
            return Parsed::Other;
        }
        let ihl = (ver_ihl & 0x0f) as usize;
        if ver_ihl >> 4 != 4 || ihl < 5 {
            return Parsed::Malformed;
        }
        // MF set or a non-zero offset.
        if unsafe { load::<u16>(l3 + 6) } & 0x3fffu16.to_be() != 0 {
            return if ip_proto == PROTO_TCP { Parsed::Fragment } else { Parsed::Other };
        }
        if ip_proto == PROTO_ICMP {
            let icmp = l3 + ihl * 4;
            if icmp + ICMP_HLEN > end {
                return Parsed::Malformed;
            }
            // Destination unreachable (incl. fragmentation needed), time exceeded, parameter
            // problem: the errors that quote the offending packet.
            return match unsafe { load::<u8>(icmp) } {
                3 | 11 | 12 => icmp_error(l3, icmp, end, FAMILY_V4),
                _ => Parsed::Other,
            };
        }
        ip_options = ihl > 5;
        l4 = l3 + ihl * 4;
        key.family = FAMILY_V4;
        key.src_addr = Addr::v4(unsafe { load(l3 + IP4_SADDR) });
        key.dst_addr = Addr::v4(unsafe { load(l3 + IP4_DADDR) });
    } else if proto == ETH_P_IPV6 {
        if l3 + IPV6_HLEN > end {
            return Parsed::Malformed;
        }
        let next: u8 = unsafe { load(l3 + 6) };
        if next == PROTO_ICMPV6 {
            let icmp = l3 + IPV6_HLEN;
            if icmp + ICMP_HLEN > end {
                return Parsed::Malformed;
            }
            // Destination unreachable, packet too big, time exceeded, parameter problem.
            return match unsafe { load::<u8>(icmp) } {
                1..=4 => icmp_error(l3, icmp, end, FAMILY_V6),
                _ => Parsed::Other,
            };
        }
        if next != PROTO_TCP {
            return if is_ipv6_ext(next) { Parsed::Ipv6Ext } else { Parsed::Other };
        }
        l4 = l3 + IPV6_HLEN;
        key.family = FAMILY_V6;
        key.src_addr = Addr(unsafe { load(l3 + IP6_SADDR) });
        key.dst_addr = Addr(unsafe { load(l3 + IP6_DADDR) });
    } else {
        return Parsed::Other;
    }
    if l4 + TCP_HLEN > end {
        return Parsed::Malformed;
    }
    let doff = (unsafe { load::<u8>(l4 + 12) } >> 4) as usize;
    if doff < 5 || l4 + doff * 4 > end {
        return Parsed::Malformed;
    }
    key.src_port = unsafe { load(l4 + TCP_SPORT) };
    key.dst_port = unsafe { load(l4 + TCP_DPORT) };
    Parsed::Tcp(Tcp {
        ip: l3,
        tcp: l4,
        ip_off: l3 - data,
        tcp_off: l4 - data,
        flags: unsafe { load(l4 + 13) },
        key,
        ip_options,
    })
}

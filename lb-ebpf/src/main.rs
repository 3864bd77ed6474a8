//! xlb's data path.
//!
//! - `xlb_xdp` (XDP, ingress): a SYN to a VIP picks the least-loaded backend and creates a flow;
//!   every packet of a tracked flow gets its destination rewritten to that backend.
//! - `xlb_tc_egress` (TC, egress): the backend's replies get their source rewritten back to the
//!   VIP.
//! - Both watch new flows' handshakes for passive health (`passive.rs`): TC sees a backend
//!   refuse a SYN with RST, XDP sees a client retransmit a SYN its backend never answered.
//! - Anything that is not a tracked flow or a SYN to a VIP passes byte-for-byte untouched.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "BPF_ATOMIC via core::intrinsics, see conntrack.rs")]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys go by reference: a 40-byte key copied by value costs stack in a 512-byte frame"
)]

mod conntrack;
mod csum;
mod maps;
mod parse;
mod passive;
mod select;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;
use lb_common::{
    Addr, FAMILY_V4, PROTO_TCP,
    flow::{FLOW_OPEN, Flow, HANDSHAKE_ANSWERED, HANDSHAKE_SYN_SENT, ReplyNat},
    service::ServiceKey,
    stats::Stats,
};

use crate::{
    conntrack::Insert,
    passive::Failure,
    maps::{BACKEND_FLOWS, BACKENDS, FLOWS, REPLIES, SERVICES, STATS, VIP_PORTS},
    parse::{
        IP4_CHECK, IP4_DADDR, IP4_SADDR, IP6_DADDR, IP6_SADDR, IcmpError, Parsed, TCP_ACK, TCP_CHECK,
        TCP_DPORT, TCP_FIN, TCP_RST, TCP_SPORT, TCP_SYN, Tcp,
    },
};

#[inline(always)]
fn stats() -> Option<&'static mut Stats> {
    // SAFETY: a per-CPU value, only ever touched by this CPU while the program runs.
    STATS.get_ptr_mut(0).map(|s| unsafe { &mut *s })
}

#[xdp]
pub fn xlb_xdp(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    let Some(stats) = stats() else { return xdp_action::XDP_PASS };
    stats.xdp_packets += 1;
    stats.xdp_bytes += (end - data) as u64;
    let pkt = match parse::parse(data, end) {
        Parsed::Tcp(pkt) => pkt,
        Parsed::Other => return xdp_action::XDP_PASS,
        Parsed::Malformed => {
            stats.malformed += 1;
            return xdp_action::XDP_PASS;
        }
        Parsed::Fragment => {
            stats.fragments += 1;
            return xdp_action::XDP_PASS;
        }
        Parsed::Ipv6Ext => {
            stats.ipv6_ext += 1;
            return xdp_action::XDP_PASS;
        }
        Parsed::IcmpError(err) => {
            if icmp_error(&err) {
                stats.icmp_errors += 1;
            }
            return xdp_action::XDP_PASS;
        }
    };
    let verdict = forward(&ctx, &pkt, stats);
    if verdict == xdp_action::XDP_PASS && pkt.ip_options {
        stats.ip_options += 1;
    }
    verdict
}

/// Client → VIP.
#[inline(always)]
fn forward(ctx: &XdpContext, pkt: &Tcp, stats: &mut Stats) -> u32 {
    let key = pkt.key;
    // Established flows and new ones alike go to a VIP port; everything else leaves here.
    if VIP_PORTS.get(u32::from(u16::from_be(key.dst_port))).is_none_or(|&p| p == 0) {
        return xdp_action::XDP_PASS;
    }
    let syn_only = pkt.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // The backend a retransmitted SYN's first attempt went to, if it never answered.
    let mut avoid = select::AVOID_NONE;
    if let Some(flow) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: a live FLOWS value; concurrent writers only touch `closed` and `handshake`,
        // each with one store.
        let f = unsafe { &*flow };
        let closed = f.closed != FLOW_OPEN;
        let unanswered = syn_only && !closed && unanswered_syn(f);
        if !(syn_only && closed) && !unanswered {
            rewrite_dst(pkt, &f.backend_addr, f.backend_port);
            stats.fwd_packets += 1;
            stats.fwd_bytes += (ctx.data_end() - ctx.data()) as u64;
            if conntrack::on_flags(&key, flow, pkt.flags) {
                stats.closed_flows += 1;
            }
            return xdp_action::XDP_PASS;
        }
        if unanswered {
            // The client sent its SYN again and the backend never answered the first: count a
            // failure and give this SYN another backend (the same one only if no other is up),
            // so the retry the client makes anyway can succeed.
            avoid = f.backend;
            conntrack::close(&key, flow);
        }
        // Otherwise a SYN reusing the 4-tuple of a closed flow is a new connection (TIME-WAIT
        // reuse): forget the old one and balance this one afresh.
        let rev = conntrack::reply_key(&key, f);
        conntrack::remove(&key, &rev);
    }
    let svc_key = ServiceKey {
        addr: key.dst_addr,
        port: key.dst_port,
        family: key.family,
        proto: PROTO_TCP,
    };
    let Some(svc) = (unsafe { SERVICES.get(&svc_key) }) else {
        return xdp_action::XDP_PASS;
    };
    if !syn_only {
        stats.no_flow += 1;
        return xdp_action::XDP_PASS;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(slot) = select::least_conns(svc, now, avoid) else {
        // Dropping (rather than passing to a port nothing listens on) lets the client's SYN
        // retransmission reach a backend that comes back up a second later.
        stats.drop_no_backend += 1;
        if stats.drop_no_backend.is_power_of_two() {
            warn!(ctx, "no backend up for a VIP: {} SYNs dropped on this CPU", stats.drop_no_backend);
        }
        return xdp_action::XDP_DROP;
    };
    let Some(backend) = BACKENDS.get(slot) else { return xdp_action::XDP_PASS };
    let flow = Flow {
        backend_addr: conntrack::copy_addr(&backend.addr),
        backend_port: backend.port,
        family: backend.family,
        _pad: 0,
        backend: slot,
        created_ns: now,
        closed: FLOW_OPEN,
        handshake: HANDSHAKE_SYN_SENT,
    };
    let nat = ReplyNat { vip_addr: key.dst_addr, vip_port: key.dst_port, _pad: 0, backend: slot };
    let (addr, port) = match conntrack::insert(&key, &flow, &nat) {
        Insert::Created => {
            conntrack::add_live(slot, 1);
            if let Some(n) = BACKEND_FLOWS.get_ptr_mut(slot) {
                unsafe { *n += 1 };
            }
            stats.new_flows += 1;
            (flow.backend_addr, flow.backend_port)
        }
        Insert::Exists => match unsafe { FLOWS.get(&key) } {
            Some(f) => (conntrack::copy_addr(&f.backend_addr), f.backend_port),
            None => return xdp_action::XDP_PASS,
        },
        Insert::Full => {
            stats.conntrack_full += 1;
            if stats.conntrack_full.is_power_of_two() {
                warn!(ctx, "conntrack full: {} new flows passed unmodified on this CPU", stats.conntrack_full);
            }
            return xdp_action::XDP_PASS;
        }
    };
    rewrite_dst(pkt, &addr, port);
    stats.fwd_packets += 1;
    stats.fwd_bytes += (ctx.data_end() - ctx.data()) as u64;
    xdp_action::XDP_PASS
}

/// Whether a SYN for the tracked flow `f` is the client's retransmission of a SYN its backend
/// never answered, with passive health on for that backend (the failure is recorded then).
#[inline(always)]
fn unanswered_syn(f: &Flow) -> bool {
    // SAFETY: fields of a live FLOWS value; `handshake` is written by the TC program.
    let handshake = unsafe { core::ptr::read_volatile(&raw const f.handshake) };
    if handshake != HANDSHAKE_SYN_SENT {
        return false;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(f.created_ns) < passive::SYN_RETRY_NS {
        return false;
    }
    passive::record(f.backend, Failure::Unanswered, now) != passive::OFF
}

/// An ICMP error about a segment we sent as the VIP (a reply of a tracked flow) is rewritten to
/// be about the segment the backend really sent, and addressed to the backend: the quoted source
/// address and port become the backend's, and every checksum that covers them is patched (the
/// quoted IPv4 header's, the quoted TCP checksum if quoted, the ICMP checksum, the outer IPv4
/// header's; ICMPv6's also covers the outer destination). The backend's TCP stack then sees
/// "fragmentation needed" / "packet too big" for its own socket and lowers its path MTU.
/// Returns whether it rewrote anything.
#[inline(always)]
fn icmp_error(err: &IcmpError) -> bool {
    // `parse` checked these bounds already, but on paths the verifier cannot tell apart (the
    // family is a byte on the stack to it): say them again where it can see them.
    let hdr = if err.fwd.family == FAMILY_V4 { 20 } else { 40 };
    if err.icmp + 8 > err.end || err.inner_tcp + 8 > err.end {
        return false;
    }
    if hdr == 20 {
        if err.ip + 20 > err.end || err.inner_ip + 20 > err.end {
            return false;
        }
    } else if err.ip + 40 > err.end || err.inner_ip + 40 > err.end {
        return false;
    }
    let Some(flow) = (unsafe { FLOWS.get(&err.fwd) }) else { return false };
    let addr = conntrack::copy_addr(&flow.backend_addr);
    let port = flow.backend_port;
    let icmp_check_at = err.icmp + 2;
    unsafe {
        let mut icmp_check: u16 = rd(icmp_check_at);
        let old_port: u16 = rd(err.inner_tcp + TCP_SPORT);
        if old_port != port {
            wr(err.inner_tcp + TCP_SPORT, port);
            icmp_check = csum::replace16(icmp_check, old_port, port);
            patch_quoted_tcp(err, &mut icmp_check, |c| csum::replace16(c, old_port, port));
        }
        if hdr == 20 {
            let old: u32 = rd(err.inner_ip + IP4_SADDR);
            let new = addr.word(0);
            if old != new {
                wr(err.inner_ip + IP4_SADDR, new);
                icmp_check = csum::replace32(icmp_check, old, new);
                let inner_check: u16 = rd(err.inner_ip + IP4_CHECK);
                let inner_new = csum::replace32(inner_check, old, new);
                wr(err.inner_ip + IP4_CHECK, inner_new);
                icmp_check = csum::replace16(icmp_check, inner_check, inner_new);
                patch_quoted_tcp(err, &mut icmp_check, |c| csum::replace32(c, old, new));
                // The error was sent to the VIP address; deliver it to the backend's.
                if rd::<u32>(err.ip + IP4_DADDR) == old {
                    wr(err.ip + IP4_DADDR, new);
                    let ip_check: u16 = rd(err.ip + IP4_CHECK);
                    wr(err.ip + IP4_CHECK, csum::replace32(ip_check, old, new));
                }
            }
        } else {
            let outer_is_vip = {
                let mut same = true;
                for i in 0..4 {
                    same &= rd::<u32>(err.ip + IP6_DADDR + i * 4) == rd::<u32>(err.inner_ip + IP6_SADDR + i * 4);
                }
                same
            };
            for i in 0..4 {
                let old: u32 = rd(err.inner_ip + IP6_SADDR + i * 4);
                let new = addr.word(i);
                if old != new {
                    wr(err.inner_ip + IP6_SADDR + i * 4, new);
                    icmp_check = csum::replace32(icmp_check, old, new);
                    patch_quoted_tcp(err, &mut icmp_check, |c| csum::replace32(c, old, new));
                    if outer_is_vip {
                        // ICMPv6's checksum covers the outer addresses (pseudo-header).
                        wr(err.ip + IP6_DADDR + i * 4, new);
                        icmp_check = csum::replace32(icmp_check, old, new);
                    }
                }
            }
        }
        wr(icmp_check_at, icmp_check);
    }
    true
}

/// Patches the quoted TCP checksum (when the quote reaches it) with `f`, and the ICMP checksum
/// for the change of that field.
#[inline(always)]
fn patch_quoted_tcp(err: &IcmpError, icmp_check: &mut u16, f: impl Fn(u16) -> u16) {
    let at = err.inner_tcp + TCP_CHECK;
    if at + 2 <= err.end {
        unsafe {
            let old: u16 = rd(at);
            let new = f(old);
            wr(at, new);
            *icmp_check = csum::replace16(*icmp_check, old, new);
        }
    }
}

#[inline(always)]
unsafe fn rd<T: Copy>(addr: usize) -> T {
    unsafe { (addr as *const T).read_unaligned() }
}

#[inline(always)]
unsafe fn wr<T: Copy>(addr: usize, v: T) {
    unsafe { (addr as *mut T).write_unaligned(v) }
}

/// Rewrites the destination of a client → VIP packet to the backend, patching the IPv4 header
/// checksum and the TCP checksum (which covers the addresses through the pseudo-header)
/// incrementally.
///
/// XDP sees what arrived on the wire, so the TCP checksum is complete and an incremental patch
/// is exact. (A veth peer with TX checksum offload on would hand us CHECKSUM_PARTIAL packets
/// whose checksum field holds only the pseudo-header sum; tests and benchmarks turn it off on
/// the sending side, as a real NIC would deliver full checksums.)
#[inline(always)]
fn rewrite_dst(pkt: &Tcp, addr: &Addr, port: u16) {
    let tcp_check = pkt.tcp + TCP_CHECK;
    unsafe {
        let mut check: u16 = rd(tcp_check);
        let old_port: u16 = rd(pkt.tcp + TCP_DPORT);
        if old_port != port {
            wr(pkt.tcp + TCP_DPORT, port);
            check = csum::replace16(check, old_port, port);
        }
        if pkt.key.family == FAMILY_V4 {
            let old: u32 = rd(pkt.ip + IP4_DADDR);
            let new = addr.word(0);
            if old != new {
                wr(pkt.ip + IP4_DADDR, new);
                let ip_check: u16 = rd(pkt.ip + IP4_CHECK);
                wr(pkt.ip + IP4_CHECK, csum::replace32(ip_check, old, new));
                check = csum::replace32(check, old, new);
            }
        } else {
            for i in 0..4 {
                let at = pkt.ip + IP6_DADDR + i * 4;
                let old: u32 = rd(at);
                let new = addr.word(i);
                if old != new {
                    wr(at, new);
                    check = csum::replace32(check, old, new);
                }
            }
        }
        wr(tcp_check, check);
    }
}

/// Passes every packet untouched (see `lb_common::programs::NOOP`).
#[xdp]
pub fn xlb_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn xlb_tc_egress(ctx: TcContext) -> i32 {
    try_tc_egress(&ctx).unwrap_or(TC_ACT_OK)
}

const BPF_F_PSEUDO_HDR: u64 = 0x10;

/// Backend → client: a packet of a tracked flow gets its source rewritten to the VIP.
///
/// Unlike XDP, locally generated packets here usually carry CHECKSUM_PARTIAL (the checksum is
/// finished later by the NIC or the stack), and may be clones shared with the TCP retransmit
/// queue. The skb helpers handle both: `bpf_l4_csum_replace` adjusts only what a partial
/// checksum covers, and `bpf_skb_store_bytes` makes the header private before writing.
#[inline(always)]
fn try_tc_egress(ctx: &TcContext) -> Result<i32, i64> {
    let Some(stats) = stats() else { return Ok(TC_ACT_OK) };
    let mut parsed = parse::parse(ctx.data(), ctx.data_end());
    // The stack builds TCP headers in the linear area, so this is rare: headers cut short by
    // the end of the linear data of a longer packet. Pull them in (at most every header xlb
    // reads: Ethernet + VLAN + IPv4 with options + TCP with options) and look again.
    if matches!(parsed, Parsed::Malformed) && ((ctx.data_end() - ctx.data()) as u32) < ctx.len() {
        ctx.pull_data(ctx.len().min(14 + 4 + 60 + 60))?;
        stats.tc_pull += 1;
        parsed = parse::parse(ctx.data(), ctx.data_end());
    }
    let pkt = match parsed {
        Parsed::Tcp(pkt) => pkt,
        _ => return Ok(TC_ACT_OK),
    };
    let Some(nat) = (unsafe { REPLIES.get(&pkt.key) }) else { return Ok(TC_ACT_OK) };
    let nat = *nat;
    let fwd = pkt.key.forward_of_reply(&nat);
    let flags = pkt.flags;
    let tcp_check = pkt.tcp_off + TCP_CHECK;
    let old_port = pkt.key.src_port;
    // Everything the rewrite needs is read above: helper calls below invalidate packet pointers.
    if old_port != nat.vip_port {
        ctx.l4_csum_replace(tcp_check, u64::from(old_port), u64::from(nat.vip_port), 2)?;
        ctx.store(pkt.tcp_off + TCP_SPORT, &nat.vip_port, 0)?;
    }
    if pkt.key.family == FAMILY_V4 {
        let (old, new) = (pkt.key.src_addr.word(0), nat.vip_addr.word(0));
        if old != new {
            ctx.l3_csum_replace(pkt.ip_off + IP4_CHECK, u64::from(old), u64::from(new), 4)?;
            ctx.l4_csum_replace(tcp_check, u64::from(old), u64::from(new), BPF_F_PSEUDO_HDR | 4)?;
            ctx.store(pkt.ip_off + IP4_SADDR, &new, 0)?;
        }
    } else if pkt.key.src_addr != nat.vip_addr {
        for i in 0..4 {
            let (old, new) = (pkt.key.src_addr.word(i), nat.vip_addr.word(i));
            if old != new {
                ctx.l4_csum_replace(tcp_check, u64::from(old), u64::from(new), BPF_F_PSEUDO_HDR | 4)?;
            }
        }
        ctx.store(pkt.ip_off + IP6_SADDR, &nat.vip_addr, 0)?;
    }
    stats.reply_packets += 1;
    stats.reply_bytes += u64::from(ctx.len());
    if flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
        return Ok(TC_ACT_OK);
    }
    let Some(flow) = FLOWS.get_ptr_mut(&fwd) else { return Ok(TC_ACT_OK) };
    // SAFETY: a live FLOWS value (see `forward`).
    let handshake = unsafe { core::ptr::read_volatile(&raw const (*flow).handshake) };
    if flags & TCP_SYN != 0 {
        // The backend's SYN-ACK: it answered.
        if handshake == HANDSHAKE_SYN_SENT {
            unsafe { core::ptr::write_volatile(&raw mut (*flow).handshake, HANDSHAKE_ANSWERED) };
        }
        return Ok(TC_ACT_OK);
    }
    let refused = flags & TCP_RST != 0
        && handshake == HANDSHAKE_SYN_SENT
        && passive::record(unsafe { (*flow).backend }, Failure::Refused, unsafe { bpf_ktime_get_ns() })
            != passive::OFF;
    if conntrack::on_flags(&fwd, flow, flags) {
        stats.closed_flows += 1;
    }
    // A refused connection is not reported to the client: the flow is forgotten (the RST
    // removed it), the client sends its SYN again a second later as TCP does for a lost SYN,
    // and that SYN is balanced afresh — to another backend, if this one is failed by then. As
    // nginx retries a refused connection on the next upstream, the client sees a delay, not an
    // error.
    Ok(if refused { TC_ACT_SHOT } else { TC_ACT_OK })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

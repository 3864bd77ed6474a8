//! Reliability of the data path under arbitrary packets and a filling conntrack, through the
//! real XDP and TC programs loaded in the kernel (`BPF_PROG_TEST_RUN`). Needs root (CAP_BPF).
//!
//! - `mutated_packets_match_the_model`: valid SYN/ACK/FIN/RST segments (IPv4, IPv6, VLAN, IPv4
//!   options, replies, ICMP errors about replies) mutated by bit flips, truncation and
//!   randomized header fields, each run through the program and through `Model`, a userspace
//!   model of the programs written from their documented behaviour. Verdict, output bytes and
//!   every counter must match the model; independently of it, every packet must keep the
//!   invariants: never `XDP_ABORTED`, a packet that is not TCP to a VIP (or a reply of a tracked
//!   flow, or an ICMP error about one) leaves byte for byte untouched, only addresses, ports and
//!   checksums ever change, and a checksum is valid afterwards iff it was before.
//!   `XLB_FUZZ_PACKETS` sets the number of packets (10 000 by default; `cargo xtask test
//!   --reliability` runs 1 000 000), `XLB_FUZZ_SEED` replays a run: every failure names its seed.
//! - `conntrack_keeps_every_flow_up_to_capacity`: conntrack filled to 50 %, 90 % and 100 % of
//!   `max_flows`; every earlier flow must still be rewritten to its backend at each step, and past
//!   capacity new flows pass unmodified and are counted. Nothing is ever evicted.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::{
    Addr,
    flow::{FLOW_CLOSED, FLOW_OPEN, FlowKey, HANDSHAKE_ANSWERED, HANDSHAKE_SYN_SENT},
    service::MAX_BACKENDS_PER_SERVICE,
};
use xlb::{config::Config, dataplane::Dataplane, status::BackendState};
use xlb_tests::{
    Rng,
    packet::{
        self, ACK, CLIENT, CLIENT6, FIN, Frame, HOST, HOST6, Icmp, PSH, Parsed, Pkt, ROUTER, RST, SERVICES, SYN, TC_ACT_OK, Tcp, VIP, VIP6,
        VLAN_8021AD, VLAN_8021Q, XDP_DROP, XDP_PASS, csum, icmp_error, parse, rd16, rd32, replace16, replace32, tcp_csum, word,
        wr16,
    },
};

/// Service 3 of the fuzzed configuration: every backend down (SYNs dropped).
const DOWN_SERVICE: &str = r#"
[[service]]
name = "down"
listen = "198.18.0.11:80"
backends = ["198.18.0.1:8004"]
"#;

/// The programs loaded with `SERVICES` and `DOWN_SERVICE` (service 3, down), and those services
/// as parsed, with passive health off (`max_fails = 0`).
///
/// What passive health does depends on time (a SYN seen again 200 ms after the first is a
/// retransmission), which a model run beside the kernel cannot know to the microsecond. With it
/// off, the programs still track each flow's handshake, which the model follows; passive health
/// itself has its own packet and scenario tests.
fn load(max_flows: u32) -> (Dataplane, Config) {
    let mut config = packet::config(&format!("{SERVICES}{DOWN_SERVICE}"));
    for svc in &mut config.services {
        svc.max_fails = 0;
    }
    let dp = packet::load(&config, max_flows, |s, _| if s == 3 { BackendState::Down } else { BackendState::Up });
    (dp, config)
}

// ---------------------------------------------------------------------------------------------
// The model: the maps as the programs keep them, and what each program does to a packet.

#[derive(Clone, Copy, Debug, PartialEq)]
struct MBackend {
    addr: Addr,
    /// Network byte order, as in the maps.
    port: u16,
    up: bool,
}

#[derive(Clone, Debug)]
struct MService {
    first: u32,
    backends: Vec<MBackend>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct MFlow {
    backend_addr: Addr,
    backend_port: u16,
    slot: u32,
    closed: bool,
    /// The backend's SYN-ACK went out through the TC program (`HANDSHAKE_ANSWERED`).
    answered: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct MNat {
    vip_addr: Addr,
    vip_port: u16,
    slot: u32,
}

#[derive(Default)]
struct Model {
    services: HashMap<(Addr, u16, u8), MService>,
    vip_ports: HashSet<u16>,
    flows: HashMap<FlowKey, MFlow>,
    replies: HashMap<FlowKey, MNat>,
    closed: HashSet<FlowKey>,
    live: HashMap<u32, i64>,
    counters: BTreeMap<&'static str, u64>,
}

/// What a program run should give: verdict and bytes, and which byte ranges may differ from
/// the input (for the invariant check, independent of the exact bytes).
struct Expect {
    verdict: u32,
    out: Vec<u8>,
    /// Checksum fields the program wrote: the TC helpers may write a zero sum as 0xffff or
    /// 0x0000 (the same value in one's complement; both verify).
    csum_fields: Vec<usize>,
}

impl Model {
    fn new(config: &Config, down_service: usize) -> Model {
        let mut m = Model::default();
        for (s, svc) in config.services.iter().enumerate() {
            let (addr, port, family) = xlb::dataplane::map_addr(svc.listen);
            let backends = svc
                .backends
                .iter()
                .map(|b| {
                    let (addr, port, _) = xlb::dataplane::map_addr(*b);
                    MBackend { addr, port, up: s != down_service }
                })
                .collect();
            m.services.insert((addr, port, family), MService { first: s as u32 * MAX_BACKENDS_PER_SERVICE, backends });
            m.vip_ports.insert(svc.listen.port());
        }
        m
    }

    fn count(&mut self, name: &'static str) {
        *self.counters.entry(name).or_default() += 1;
    }

    fn reply_key(fwd: &FlowKey, f: &MFlow) -> FlowKey {
        FlowKey {
            src_addr: f.backend_addr,
            dst_addr: fwd.src_addr,
            src_port: f.backend_port,
            dst_port: fwd.src_port,
            family: fwd.family,
            proto: fwd.proto,
            _pad: [0; 2],
        }
    }

    fn remove(&mut self, fwd: &FlowKey, rev: &FlowKey) {
        self.replies.remove(rev);
        self.flows.remove(fwd);
        self.closed.remove(fwd);
    }

    /// `conntrack::on_flags`: the first FIN or RST closes (exactly once), an RST forgets.
    fn on_flags(&mut self, fwd: &FlowKey, flags: u8) -> bool {
        if flags & (FIN | RST) == 0 {
            return false;
        }
        let mut closed_now = false;
        if self.closed.insert(*fwd) {
            let f = self.flows.get_mut(fwd).expect("on_flags on a tracked flow");
            f.closed = true;
            *self.live.entry(f.slot).or_default() -= 1;
            closed_now = true;
        }
        if flags & RST != 0 {
            let f = self.flows[fwd];
            self.remove(fwd, &Self::reply_key(fwd, &f));
        }
        closed_now
    }

    /// The XDP program. `stamp(slot)` is `BACKEND_CONNS[slot].last_chosen_ns` as the kernel
    /// holds it (the time a backend was last chosen is the kernel's clock, not ours).
    fn xdp(&mut self, input: &[u8], stamp: &mut dyn FnMut(u32) -> u64) -> Expect {
        let mut out = input.to_vec();
        let mut csum_fields = Vec::new();
        self.count("xdp_packets");
        let pass = |out| Expect { verdict: XDP_PASS, out, csum_fields: Vec::new() };
        let pkt = match parse(input) {
            Parsed::Tcp(t) => t,
            Parsed::Other => return pass(out),
            Parsed::Malformed => {
                self.count("malformed");
                return pass(out);
            }
            Parsed::Fragment => {
                self.count("fragments");
                return pass(out);
            }
            Parsed::Ipv6Ext => {
                self.count("ipv6_ext");
                return pass(out);
            }
            Parsed::Icmp(err) => {
                if self.icmp_error(&err, &mut out) {
                    self.count("icmp_errors");
                }
                return pass(out);
            }
        };
        let verdict = self.forward(&pkt, &mut out, &mut csum_fields, stamp);
        if verdict == XDP_PASS && pkt.ip_options {
            self.count("ip_options");
        }
        Expect { verdict, out, csum_fields }
    }

    fn forward(&mut self, pkt: &Tcp, out: &mut [u8], csums: &mut Vec<usize>, stamp: &mut dyn FnMut(u32) -> u64) -> u32 {
        let key = pkt.key;
        if !self.vip_ports.contains(&u16::from_be(key.dst_port)) {
            return XDP_PASS;
        }
        let syn_only = pkt.flags & (SYN | ACK) == SYN;
        if let Some(f) = self.flows.get(&key).copied() {
            if !(syn_only && f.closed) {
                rewrite_dst(pkt, out, &f.backend_addr, f.backend_port, csums);
                self.count("fwd_packets");
                if self.on_flags(&key, pkt.flags) {
                    self.count("closed_flows");
                }
                return XDP_PASS;
            }
            self.remove(&key, &Self::reply_key(&key, &f));
        }
        let Some(svc) = self.services.get(&(key.dst_addr, key.dst_port, key.family)).cloned() else {
            return XDP_PASS;
        };
        if !syn_only {
            self.count("no_flow");
            return XDP_PASS;
        }
        // select::least_conns: fewest live (clamped to 0..2^23), then longest since chosen
        // (nothing is in slow start and no SYN is a retransmission: passive health is off).
        let mut best: Option<(u64, u32)> = None;
        for (i, b) in svc.backends.iter().enumerate() {
            if !b.up {
                continue;
            }
            let slot = svc.first + i as u32;
            let live = self.live.get(&slot).copied().unwrap_or(0).clamp(0, (1 << 23) - 1) as u64;
            let score = (live << 40) | ((stamp(slot) >> 10) & ((1 << 40) - 1));
            if best.is_none_or(|(s, _)| score < s) {
                best = Some((score, slot));
            }
        }
        let Some((_, slot)) = best else {
            self.count("drop_no_backend");
            return XDP_DROP;
        };
        let b = svc.backends[(slot - svc.first) as usize];
        let flow = MFlow { backend_addr: b.addr, backend_port: b.port, slot, closed: false, answered: false };
        self.flows.insert(key, flow);
        self.replies.insert(Self::reply_key(&key, &flow), MNat { vip_addr: key.dst_addr, vip_port: key.dst_port, slot });
        *self.live.entry(slot).or_default() += 1;
        self.count("new_flows");
        rewrite_dst(pkt, out, &b.addr, b.port, csums);
        self.count("fwd_packets");
        XDP_PASS
    }

    /// `icmp_error` of the XDP program: an error about a reply of a tracked flow is made to be
    /// about the segment the backend sent, and sent to the backend.
    fn icmp_error(&mut self, e: &Icmp, p: &mut [u8]) -> bool {
        let Some(f) = self.flows.get(&e.fwd).copied() else { return false };
        let end = p.len();
        let mut icmp_check = rd16(p, e.icmp + 2);
        let patch_quoted = |p: &mut [u8], icmp_check: &mut u16, f: &dyn Fn(u16) -> u16| {
            let at = e.inner_tcp + 16;
            if at + 2 <= end {
                let old = rd16(p, at);
                let new = f(old);
                wr16(p, at, new);
                *icmp_check = replace16(*icmp_check, old, new);
            }
        };
        let old_port = rd16(p, e.inner_tcp);
        let port = u16::from_be(f.backend_port);
        if old_port != port {
            wr16(p, e.inner_tcp, port);
            icmp_check = replace16(icmp_check, old_port, port);
            patch_quoted(p, &mut icmp_check, &|c| replace16(c, old_port, port));
        }
        if e.v4 {
            let old = rd32(p, e.inner_ip + 12);
            let new: [u8; 4] = word(&f.backend_addr, 0);
            if old != new {
                p[e.inner_ip + 12..e.inner_ip + 16].copy_from_slice(&new);
                icmp_check = replace32(icmp_check, old, new);
                let inner_check = rd16(p, e.inner_ip + 10);
                let inner_new = replace32(inner_check, old, new);
                wr16(p, e.inner_ip + 10, inner_new);
                icmp_check = replace16(icmp_check, inner_check, inner_new);
                patch_quoted(p, &mut icmp_check, &|c| replace32(c, old, new));
                if rd32(p, e.ip + 16) == old {
                    p[e.ip + 16..e.ip + 20].copy_from_slice(&new);
                    let ip_check = rd16(p, e.ip + 10);
                    wr16(p, e.ip + 10, replace32(ip_check, old, new));
                }
            }
        } else {
            let outer_is_vip = p[e.ip + 24..e.ip + 40] == p[e.inner_ip + 8..e.inner_ip + 24];
            for i in 0..4 {
                let at = e.inner_ip + 8 + i * 4;
                let old = rd32(p, at);
                let new: [u8; 4] = word(&f.backend_addr, i);
                if old != new {
                    p[at..at + 4].copy_from_slice(&new);
                    icmp_check = replace32(icmp_check, old, new);
                    patch_quoted(p, &mut icmp_check, &|c| replace32(c, old, new));
                    if outer_is_vip {
                        let outer = e.ip + 24 + i * 4;
                        p[outer..outer + 4].copy_from_slice(&new);
                        icmp_check = replace32(icmp_check, old, new);
                    }
                }
            }
        }
        wr16(p, e.icmp + 2, icmp_check);
        true
    }

    /// The TC egress program: a reply of a tracked flow gets the VIP as its source.
    fn tc(&mut self, input: &[u8]) -> Expect {
        let mut out = input.to_vec();
        let mut csum_fields = Vec::new();
        let untouched = |out| Expect { verdict: TC_ACT_OK, out, csum_fields: Vec::new() };
        let Parsed::Tcp(pkt) = parse(input) else { return untouched(out) };
        let Some(nat) = self.replies.get(&pkt.key).copied() else { return untouched(out) };
        let k = pkt.key;
        let fwd = FlowKey {
            src_addr: k.dst_addr,
            dst_addr: nat.vip_addr,
            src_port: k.dst_port,
            dst_port: nat.vip_port,
            family: k.family,
            proto: k.proto,
            _pad: [0; 2],
        };
        let check_at = pkt.tcp + 16;
        csum_fields.push(check_at);
        if k.src_port != nat.vip_port {
            let (old, new) = (u16::from_be(k.src_port), u16::from_be(nat.vip_port));
            let c = replace16(rd16(&out, check_at), old, new);
            wr16(&mut out, check_at, c);
            wr16(&mut out, pkt.tcp, new);
        }
        if pkt.v4 {
            let (old, new): ([u8; 4], [u8; 4]) = (word(&k.src_addr, 0), word(&nat.vip_addr, 0));
            if old != new {
                csum_fields.push(pkt.ip + 10);
                let c = replace32(rd16(&out, pkt.ip + 10), old, new);
                wr16(&mut out, pkt.ip + 10, c);
                let c = replace32(rd16(&out, check_at), old, new);
                wr16(&mut out, check_at, c);
                out[pkt.ip + 12..pkt.ip + 16].copy_from_slice(&new);
            }
        } else if k.src_addr != nat.vip_addr {
            for i in 0..4 {
                let (old, new): ([u8; 4], [u8; 4]) =
                    (word(&k.src_addr, i), word(&nat.vip_addr, i));
                if old != new {
                    let c = replace32(rd16(&out, check_at), old, new);
                    wr16(&mut out, check_at, c);
                }
            }
            out[pkt.ip + 8..pkt.ip + 24].copy_from_slice(&nat.vip_addr.0);
        }
        self.count("reply_packets");
        let done = Expect { verdict: TC_ACT_OK, out, csum_fields };
        if pkt.flags & (SYN | FIN | RST) == 0 {
            return done;
        }
        let Some(f) = self.flows.get_mut(&fwd) else { return done };
        if pkt.flags & SYN != 0 {
            // The backend's SYN-ACK (any segment with SYN): the handshake was answered. Nothing
            // else is looked at, FIN and RST included.
            f.answered = true;
            return done;
        }
        // A backend's RST before its SYN-ACK is a refused connection, which passive health
        // would count and hide from the client; it is off here, so it closes the flow as any
        // RST does.
        if self.on_flags(&fwd, pkt.flags) {
            self.count("closed_flows");
        }
        done
    }
}

/// `rewrite_dst` of the XDP program: destination port and address, checksums patched.
fn rewrite_dst(pkt: &Tcp, p: &mut [u8], addr: &Addr, port_be: u16, csums: &mut Vec<usize>) {
    let check_at = pkt.tcp + 16;
    csums.push(check_at);
    let mut check = rd16(p, check_at);
    let (old_port, port) = (rd16(p, pkt.tcp + 2), u16::from_be(port_be));
    if old_port != port {
        wr16(p, pkt.tcp + 2, port);
        check = replace16(check, old_port, port);
    }
    if pkt.v4 {
        let (old, new) = (rd32(p, pkt.ip + 16), word(addr, 0));
        if old != new {
            p[pkt.ip + 16..pkt.ip + 20].copy_from_slice(&new);
            let ip_check = rd16(p, pkt.ip + 10);
            wr16(p, pkt.ip + 10, replace32(ip_check, old, new));
            csums.push(pkt.ip + 10);
            check = replace32(check, old, new);
        }
    } else {
        for i in 0..4 {
            let at = pkt.ip + 24 + i * 4;
            let (old, new) = (rd32(p, at), word(addr, i));
            if old != new {
                p[at..at + 4].copy_from_slice(&new);
                check = replace32(check, old, new);
            }
        }
    }
    wr16(p, check_at, check);
}

// ---------------------------------------------------------------------------------------------
// Packets: valid segments to start from, and mutations of them.

const CLIENTS4: [Ipv4Addr; 2] = [CLIENT, Ipv4Addr::new(198, 18, 0, 3)];
/// Service 3's VIP, whose only backend is down.
const DOWN_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
/// Destinations of client segments: the VIPs, and addresses/ports that are not VIPs.
const DSTS4: [(Ipv4Addr, u16); 6] = [(VIP, 80), (HOST, 80), (DOWN_VIP, 80), (HOST, 22), (VIP, 81), (HOST, 8001)];
const DSTS6: [(Ipv6Addr, u16); 3] = [(VIP6, 80), (HOST6, 8001), (VIP6, 443)];
const CLIENT_PORTS: [u16; 6] = [40000, 40001, 40002, 40003, 40004, 40005];
const FLAG_SETS: [u8; 9] = [SYN, SYN, SYN | ACK, ACK, ACK | PSH, FIN | ACK, RST, RST | ACK, ACK];

/// A segment with correct checksums and random sequence numbers, payload, and sometimes an MSS
/// option, a VLAN tag or IPv4 options. (The draws keep their order: a seed replays a run.)
fn segment(rng: &mut Rng, src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Frame {
    let mut p = Pkt::new(src, sport, dst, dport, flags);
    p.seq = rng.next_u64() as u32;
    p.ack = if flags & ACK != 0 { rng.next_u64() as u32 } else { 0 };
    p.tcp_options = if rng.chance(30) { vec![2, 4, 0x05, 0xb4] } else { Vec::new() }; // MSS
    p.payload = Vec::new();
    if flags & PSH != 0 {
        let n = rng.below(64);
        p.payload.extend((0..n).map(|_| rng.byte()));
    }
    if rng.chance(15) {
        let tpid = if rng.chance(50) { VLAN_8021Q } else { VLAN_8021AD };
        p.vlan = Some((tpid, rng.next_u64() as u16 & 0x0fff));
    }
    if src.is_ipv4() {
        if rng.chance(10) {
            p.ip_options = vec![1, 1, 1, 0];
        }
        p.ip_id = rng.next_u64() as u16;
    }
    p.frame()
}

/// An ICMP error about `quoted` (a frame), quoting 8, 20 or 40 bytes of its TCP header.
fn icmp_error_about(rng: &mut Rng, from: IpAddr, to: IpAddr, quoted: &Frame) -> Frame {
    let ip_len = if from.is_ipv4() { 20 } else { 40 };
    icmp_error(from, to, quoted, rng.pick(&[ip_len + 8, ip_len + 20, ip_len + 40]))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Hook {
    Xdp,
    Tc,
}

/// A valid packet to start from: a client segment (to a VIP or not), a backend's reply, or an
/// ICMP error about a reply.
fn base(rng: &mut Rng) -> (Hook, Frame) {
    let v6 = rng.chance(25);
    let flags = rng.pick(&FLAG_SETS);
    let cport = rng.pick(&CLIENT_PORTS);
    let bport = 8001 + rng.below(3) as u16;
    match rng.below(100) {
        0..65 => {
            let f = if v6 {
                let (dst, dport) = rng.pick(&DSTS6);
                segment(rng, CLIENT6.into(), cport, dst.into(), dport, flags)
            } else {
                let (dst, dport) = rng.pick(&DSTS4);
                let client = rng.pick(&CLIENTS4);
                segment(rng, client.into(), cport, dst.into(), dport, flags)
            };
            (Hook::Xdp, f)
        }
        65..92 => {
            let f = if v6 {
                segment(rng, HOST6.into(), bport, CLIENT6.into(), cport, flags)
            } else {
                let client = rng.pick(&CLIENTS4);
                segment(rng, HOST.into(), bport, client.into(), cport, flags)
            };
            (Hook::Tc, f)
        }
        _ => {
            // The reply as the client saw it (from the VIP), quoted by a router or the client.
            let f = if v6 {
                let seen = segment(rng, VIP6.into(), 80, CLIENT6.into(), cport, ACK | PSH);
                icmp_error_about(rng, CLIENT6.into(), VIP6.into(), &seen)
            } else {
                let (vip, _) = rng.pick(&DSTS4[..3]);
                let client = rng.pick(&CLIENTS4);
                let seen = segment(rng, vip.into(), 80, client.into(), cport, ACK | PSH);
                icmp_error_about(rng, ROUTER.into(), vip.into(), &seen)
            };
            (Hook::Xdp, f)
        }
    }
}

/// Recomputes the IPv4 header and TCP checksums of a frame that still parses as TCP, so that
/// mutated fields are also seen with valid checksums (the path real traffic takes).
fn fix_checksums(p: &mut [u8]) {
    let Parsed::Tcp(t) = parse(p) else { return };
    if t.v4 {
        let ihl = usize::from(p[t.ip] & 0xf) * 4;
        wr16(p, t.ip + 10, 0);
        let c = csum(&[&p[t.ip..t.ip + ihl]]);
        wr16(p, t.ip + 10, c);
    }
    wr16(p, t.tcp + 16, 0);
    let c = tcp_csum(p, &t);
    wr16(p, t.tcp + 16, c);
}

fn mutate(rng: &mut Rng, f: &mut Frame) -> Vec<&'static str> {
    let mut done = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let p = &mut f.bytes;
        let len = p.len();
        let (l3, l4) = (f.l3, f.l4);
        fn set(p: &mut [u8], at: usize, v: u8) {
            if at < p.len() {
                p[at] = v;
            }
        }
        let what = match rng.below(12) {
            1 if len > 14 => {
                let n = 14 + rng.below(len - 14);
                p.truncate(n);
                "truncation"
            }
            0 | 1 => {
                let bit = rng.below(len * 8);
                p[bit / 8] ^= 1 << (bit % 8);
                "bit flip"
            }
            2 => {
                set(p, l4 + 13, { let r = rng.byte(); rng.pick(&[SYN, ACK, FIN, RST, SYN | FIN, SYN | RST, FIN | RST, 0, 0xff, r]) });
                "tcp flags"
            }
            3 => {
                let v = rng.below(16) as u8;
                if l4 + 12 < p.len() {
                    p[l4 + 12] = (v << 4) | (p[l4 + 12] & 0xf);
                }
                "tcp doff"
            }
            4 => {
                let v = rng.below(16) as u8;
                if l3 < p.len() {
                    p[l3] = if rng.chance(80) { (p[l3] & 0xf0) | v } else { (v << 4) | (p[l3] & 0xf) };
                }
                "ihl / version"
            }
            5 => {
                let v = { let r = rng.next_u64() as u16; rng.pick(&[0u16, 0x4000, 0x2000, 0x0001, 0x1fff, r]) };
                if f.v4 {
                    set(p, l3 + 6, (v >> 8) as u8);
                    set(p, l3 + 7, v as u8);
                }
                "fragment field"
            }
            6 => {
                let at = if f.v4 { l3 + 2 } else { l3 + 4 };
                set(p, at, rng.byte());
                set(p, at + 1, rng.byte());
                "ip length"
            }
            7 => {
                let v = { let r = rng.byte(); rng.pick(&[6u8, 17, 1, 58, 0, 43, 44, 60, 59, r]) };
                set(p, if f.v4 { l3 + 9 } else { l3 + 6 }, v);
                "ip protocol / next header"
            }
            8 => {
                let port = if rng.chance(50) { rng.pick(&[80u16, 22, 8001, 8002, 8003, 40000, 40001]) } else { rng.next_u64() as u16 };
                let at = l4 + 2 * rng.below(2);
                set(p, at, (port >> 8) as u8);
                set(p, at + 1, port as u8);
                "port"
            }
            9 => {
                let (src, dst, n) = if f.v4 { (l3 + 12, l3 + 16, 4) } else { (l3 + 8, l3 + 24, 16) };
                let at = if rng.chance(50) { src } else { dst };
                if rng.chance(50) {
                    set(p, at + n - 1, { let r = rng.byte(); rng.pick(&[1, 2, 3, 10, 11, 16, r]) });
                } else {
                    set(p, at + rng.below(n), rng.byte());
                }
                "address"
            }
            10 => {
                let v = { let r = rng.next_u64() as u16; rng.pick(&[0x0800u16, 0x86dd, 0x8100, 0x88a8, 0x0806, r]) };
                let at = if rng.chance(70) { 12 } else { 16 };
                set(p, at, (v >> 8) as u8);
                set(p, at + 1, v as u8);
                "ethertype"
            }
            _ => {
                let n = 1 + rng.below(40);
                p.extend((0..n).map(|_| rng.byte()));
                "appended bytes"
            }
        };
        done.push(what);
    }
    if rng.chance(50) {
        fix_checksums(&mut f.bytes);
        done.push("checksums recomputed");
    }
    done
}

// ---------------------------------------------------------------------------------------------
// Invariants, checked on every packet without the model.

/// Byte ranges a program may change in `input` (as parsed): addresses, ports and checksums.
fn mutable_ranges(hook: Hook, input: &[u8]) -> Vec<std::ops::Range<usize>> {
    match (hook, parse(input)) {
        (Hook::Xdp, Parsed::Tcp(t)) => {
            let mut r = vec![t.tcp + 2..t.tcp + 4, t.tcp + 16..t.tcp + 18];
            if t.v4 {
                r.extend([t.ip + 10..t.ip + 12, t.ip + 16..t.ip + 20]);
            } else {
                r.push(t.ip + 24..t.ip + 40);
            }
            r
        }
        (Hook::Tc, Parsed::Tcp(t)) => {
            let mut r = vec![t.tcp..t.tcp + 2, t.tcp + 16..t.tcp + 18];
            if t.v4 {
                r.extend([t.ip + 10..t.ip + 12, t.ip + 12..t.ip + 16]);
            } else {
                r.push(t.ip + 8..t.ip + 24);
            }
            r
        }
        (Hook::Xdp, Parsed::Icmp(e)) => {
            let mut r = vec![e.icmp + 2..e.icmp + 4, e.inner_tcp..e.inner_tcp + 2, e.inner_tcp + 16..e.inner_tcp + 18];
            if e.v4 {
                r.extend([e.ip + 10..e.ip + 12, e.ip + 16..e.ip + 20, e.inner_ip + 10..e.inner_ip + 16]);
            } else {
                r.extend([e.ip + 24..e.ip + 40, e.inner_ip + 8..e.inner_ip + 24]);
            }
            r
        }
        _ => Vec::new(),
    }
}

/// Whether each checksum of the packet (as parsed) verifies: IPv4 header, TCP (over the
/// segment to the end of the frame), or for ICMP errors the ICMP checksum and the quoted IPv4
/// header's.
fn checksums_ok(input: &[u8]) -> Vec<(&'static str, bool)> {
    match parse(input) {
        Parsed::Tcp(t) => {
            let mut v = vec![("tcp", tcp_csum(input, &t) == 0)];
            if t.v4 {
                let ihl = usize::from(input[t.ip] & 0xf) * 4;
                v.push(("ipv4 header", csum(&[&input[t.ip..t.ip + ihl]]) == 0));
            }
            v
        }
        Parsed::Icmp(e) => {
            let icmp = &input[e.icmp..];
            let mut v = vec![];
            if e.v4 {
                v.push(("icmp", csum(&[icmp]) == 0));
                v.push(("ipv4 header", csum(&[&input[e.ip..e.ip + usize::from(input[e.ip] & 0xf) * 4]]) == 0));
                let inner_ihl = usize::from(input[e.inner_ip] & 0xf) * 4;
                if e.inner_ip + inner_ihl <= input.len() {
                    v.push(("quoted ipv4 header", csum(&[&input[e.inner_ip..e.inner_ip + inner_ihl]]) == 0));
                }
            } else {
                let len = (icmp.len() as u16).to_be_bytes();
                v.push(("icmpv6", csum(&[&input[e.ip + 8..e.ip + 40], &[0, 0], &len, &[0, 0, 0, 58], icmp]) == 0));
            }
            v
        }
        _ => Vec::new(),
    }
}

/// Is this TCP to a VIP (address and port of a service), seen by the XDP program?
fn to_vip(model: &Model, input: &[u8]) -> bool {
    match parse(input) {
        Parsed::Tcp(t) => model.services.contains_key(&(t.key.dst_addr, t.key.dst_port, t.key.family)),
        _ => false,
    }
}

/// Frames `BPF_PROG_TEST_RUN` refuses for a TC program (EINVAL): an IPv4 or IPv6 ethertype
/// with less than a whole IP header after the Ethernet header.
fn tc_refuses(p: &[u8]) -> bool {
    match rd16(p, 12) {
        0x0800 => p.len() < 14 + 20,
        0x86dd => p.len() < 14 + 40,
        _ => false,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn fuzz_packets() -> usize {
    std::env::var("XLB_FUZZ_PACKETS")
        .ok()
        .map(|v| v.parse().unwrap_or_else(|e| panic!("XLB_FUZZ_PACKETS={v:?}: {e}; give a number of packets")))
        .unwrap_or(10_000)
}

fn fuzz_seed() -> u64 {
    match std::env::var("XLB_FUZZ_SEED") {
        Ok(v) => v.parse().unwrap_or_else(|e| panic!("XLB_FUZZ_SEED={v:?}: {e}; give a number")),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    }
}

/// Compares the kernel's maps and counters with the model's.
fn compare_state(dp: &Dataplane, config: &Config, model: &Model, seed: u64, at: usize) {
    let ctx = format!("seed {seed} (XLB_FUZZ_SEED={seed} replays it), after {at} packets");
    for (s, svc) in config.services.iter().enumerate() {
        for b in 0..svc.backends.len() {
            let slot = s as u32 * MAX_BACKENDS_PER_SERVICE + b as u32;
            let live = dp.conns(s, b).unwrap().live;
            assert_eq!(live, model.live.get(&slot).copied().unwrap_or(0), "{ctx}: live count of service {s} backend {b}");
        }
    }
    for (k, f) in &model.flows {
        let got = dp.flow(k).unwrap_or_else(|| panic!("{ctx}: flow {k:?} missing from FLOWS"));
        assert_eq!(
            (got.backend_addr, got.backend_port, got.backend, got.closed, got.handshake),
            (
                f.backend_addr,
                f.backend_port,
                f.slot,
                if f.closed { FLOW_CLOSED } else { FLOW_OPEN },
                if f.answered { HANDSHAKE_ANSWERED } else { HANDSHAKE_SYN_SENT }
            ),
            "{ctx}: flow {k:?}"
        );
    }
    let replies = dp.flows().unwrap();
    assert_eq!(replies.len(), model.replies.len(), "{ctx}: REPLIES entries");
    for (rev, nat, _) in &replies {
        let m = model.replies.get(rev).unwrap_or_else(|| panic!("{ctx}: REPLIES has {rev:?}, the model does not"));
        assert_eq!((nat.vip_addr, nat.vip_port, nat.backend), (m.vip_addr, m.vip_port, m.slot), "{ctx}: reply {rev:?}");
    }
    let counters = dp.counters().unwrap();
    for (name, value) in &counters {
        if name.ends_with("_bytes") {
            continue;
        }
        let expected = model.counters.get(name.as_str()).copied().unwrap_or(0);
        assert_eq!(*value, expected, "{ctx}: counter {name}");
    }
}

#[test]
fn mutated_packets_match_the_model() {
    let n = fuzz_packets();
    let seed = fuzz_seed();
    eprintln!("fuzz: {n} packets, seed {seed} (XLB_FUZZ_SEED={seed} XLB_FUZZ_PACKETS={n} replays this run)");
    let (dp, config) = load(1 << 20);
    let mut model = Model::new(&config, 3);
    let mut rng = Rng::new(seed);
    let mut classes: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut verdicts: BTreeMap<(&'static str, &'static str), u64> = BTreeMap::new();
    let started = std::time::Instant::now();
    for i in 0..n {
        let (hook, mut frame) = base(&mut rng);
        let mutations = if rng.chance(20) { Vec::new() } else { mutate(&mut rng, &mut frame) };
        let input = frame.bytes;
        let class = match parse(&input) {
            Parsed::Tcp(_) => "tcp",
            Parsed::Other => "other",
            Parsed::Malformed => "malformed",
            Parsed::Fragment => "fragment",
            Parsed::Ipv6Ext => "ipv6 extension",
            Parsed::Icmp(_) => "icmp error",
        };
        *classes.entry(class).or_default() += 1;
        let was_to_vip = to_vip(&model, &input);
        let before = checksums_ok(&input);
        let (expect, got) = match hook {
            Hook::Xdp => {
                let mut stamp = |slot: u32| {
                    let (s, b) = ((slot / MAX_BACKENDS_PER_SERVICE) as usize, (slot % MAX_BACKENDS_PER_SERVICE) as usize);
                    dp.conns(s, b).unwrap().last_chosen_ns
                };
                let expect = model.xdp(&input, &mut stamp);
                (expect, dp.test_run_xdp(&input, 1).unwrap())
            }
            Hook::Tc => match dp.test_run_tc(&input, 1) {
                Ok(got) => (model.tc(&input), got),
                // The kernel builds no skb whose IP header is cut short (nor would the stack
                // send one): such frames cannot reach the TC program at all.
                Err(e) if tc_refuses(&input) => {
                    let _ = e;
                    *classes.entry("refused by TC test_run (IP header cut short)").or_default() += 1;
                    continue;
                }
                Err(e) => panic!("seed {seed}, packet {i}: {e:#}: {}", hex(&input)),
            },
        };
        let ctx = || {
            format!(
                "seed {seed} (XLB_FUZZ_SEED={seed} XLB_FUZZ_PACKETS={n} replays it), packet {i} ({hook:?}, {class}, \
                 mutations {mutations:?}):\n  in       {}\n  expected {} (verdict {})\n  got      {} (verdict {})",
                hex(&input),
                hex(&expect.out),
                expect.verdict,
                hex(&got.data),
                got.verdict
            )
        };
        // Invariants, independent of the model.
        match hook {
            Hook::Xdp => assert!(got.verdict == XDP_PASS || got.verdict == XDP_DROP, "never XDP_ABORTED: {}", ctx()),
            Hook::Tc => assert_eq!(got.verdict, TC_ACT_OK, "TC always passes: {}", ctx()),
        }
        assert_eq!(got.data.len(), input.len(), "length unchanged: {}", ctx());
        let allowed = mutable_ranges(hook, &input);
        for (at, (a, b)) in input.iter().zip(&got.data).enumerate() {
            assert!(a == b || allowed.iter().any(|r| r.contains(&at)), "byte {at} changed, outside addresses, ports and checksums: {}", ctx());
        }
        if hook == Hook::Xdp && !was_to_vip && !matches!(parse(&input), Parsed::Icmp(_)) {
            assert_eq!(got.data, input, "not TCP to a VIP: untouched: {}", ctx());
        }
        if got.verdict == XDP_DROP && hook == Hook::Xdp {
            assert_eq!(got.data, input, "dropped packets are not modified: {}", ctx());
        }
        let after = checksums_ok(&got.data);
        assert_eq!(before, after, "each checksum valid after iff valid before: {}", ctx());
        // The model.
        assert_eq!(got.verdict, expect.verdict, "verdict: {}", ctx());
        let same = got.data.len() == expect.out.len()
            && got.data.iter().zip(&expect.out).enumerate().all(|(at, (g, e))| {
                g == e || {
                    // 0x0000 and 0xffff are the same one's-complement zero (TC helpers).
                    let field = expect.csum_fields.iter().find(|&&c| at == c || at == c + 1);
                    field.is_some_and(|&c| {
                        let (g, e) = (rd16(&got.data, c), rd16(&expect.out, c));
                        hook == Hook::Tc && matches!((g, e), (0, 0xffff) | (0xffff, 0))
                    })
                }
            });
        assert!(same, "output bytes differ from the model: {}", ctx());
        *verdicts.entry((class, if got.data == input { "untouched" } else { "rewritten" })).or_default() += 1;
        if (i + 1).is_multiple_of(50_000) {
            compare_state(&dp, &config, &model, seed, i + 1);
        }
    }
    compare_state(&dp, &config, &model, seed, n);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "fuzz: {n} packets in {secs:.1} s ({:.0}/s), 0 invariant breaks, 0 differences from the model; seed {seed}",
        n as f64 / secs
    );
    eprintln!("fuzz: packet classes {classes:?}");
    eprintln!("fuzz: outcomes {verdicts:?}");
    eprintln!("fuzz: counters {:?}", model.counters);
    eprintln!("fuzz: {} flows tracked at the end, {} reply entries", model.flows.len(), model.replies.len());
    // The run must have exercised every path it claims to check.
    for c in ["new_flows", "fwd_packets", "reply_packets", "closed_flows", "no_flow", "malformed", "drop_no_backend"] {
        assert!(model.counters.get(c).copied().unwrap_or(0) > 0, "seed {seed}: no packet took the {c} path; the generator is broken");
    }
}

// ---------------------------------------------------------------------------------------------
// Conntrack capacity.

/// Flow `i` of the capacity test: a distinct client address and port towards the VIP on its own
/// address (service 0) or the one on the backends' address (service 1).
fn capacity_flow(rng: &mut Rng, i: u32, flags: u8) -> (Frame, Ipv4Addr, u16) {
    let client = Ipv4Addr::new(198, 18, 1 + (i / 30_000) as u8, (i % 200) as u8);
    let port = 10_000 + (i % 30_000) as u16 / 200 * 200 + (i % 200) as u16;
    let dst = if i.is_multiple_of(2) { VIP } else { HOST };
    (segment(rng, client.into(), port, dst.into(), 80, flags), client, port)
}

/// Whether the XDP program rewrites an ACK of flow `i` to `backend_port` on 198.18.0.1 with
/// valid checksums, and the TC program a reply from that backend back to the VIP.
fn still_translated(dp: &Dataplane, rng: &mut Rng, i: u32, backend_port: u16) -> Result<(), String> {
    let (ack, client, port) = capacity_flow(rng, i, ACK | PSH);
    let out = dp.test_run_xdp(&ack.bytes, 1).map_err(|e| e.to_string())?;
    let Parsed::Tcp(t) = parse(&out.data) else { return Err("unparsable output".into()) };
    if out.verdict != XDP_PASS || rd16(&out.data, t.tcp + 2) != backend_port || rd32(&out.data, t.ip + 16) != HOST.octets() {
        return Err(format!("ACK of flow {i} not rewritten to its backend {backend_port}: {}", hex(&out.data)));
    }
    if tcp_csum(&out.data, &t) != 0 || csum(&[&out.data[t.ip..t.tcp]]) != 0 {
        return Err(format!("flow {i}: bad checksum after rewriting"));
    }
    let reply = segment(rng, HOST.into(), backend_port, client.into(), port, ACK);
    let out = dp.test_run_tc(&reply.bytes, 1).map_err(|e| e.to_string())?;
    let vip = if i.is_multiple_of(2) { VIP } else { HOST };
    let Parsed::Tcp(t) = parse(&out.data) else { return Err("unparsable reply".into()) };
    if rd16(&out.data, t.tcp) != 80 || rd32(&out.data, t.ip + 12) != vip.octets() {
        return Err(format!("reply of flow {i} not rewritten to come from the VIP: {}", hex(&out.data)));
    }
    Ok(())
}

/// R6: conntrack at 50 %, 90 % and 100 % of `max_flows` keeps every flow it admitted; past
/// 100 % new flows pass unmodified (counted in `conntrack_full`) and still no flow is lost;
/// closing flows makes room again. The documented threshold is `max_flows` itself: `FLOWS` and
/// `REPLIES` are plain hash maps, which never evict.
#[test]
fn conntrack_keeps_every_flow_up_to_capacity() {
    const MAX: u32 = 8192;
    let (dp, _) = load(MAX);
    let mut rng = Rng::new(6);
    let mut backend_of: Vec<u16> = Vec::new();
    let open = |dp: &Dataplane, rng: &mut Rng, backend_of: &mut Vec<u16>, upto: u32| {
        while (backend_of.len() as u32) < upto {
            let i = backend_of.len() as u32;
            let (syn, _, _) = capacity_flow(rng, i, SYN);
            let out = dp.test_run_xdp(&syn.bytes, 1).unwrap();
            assert_eq!(out.verdict, XDP_PASS);
            let Parsed::Tcp(t) = parse(&out.data) else { panic!("flow {i}: unparsable output") };
            let port = rd16(&out.data, t.tcp + 2);
            assert!((8001..=8003).contains(&port), "SYN of flow {i} below capacity was not given a backend: {}", hex(&out.data));
            backend_of.push(port);
        }
    };
    for percent in [50u32, 90, 100] {
        let target = MAX * percent / 100;
        open(&dp, &mut rng, &mut backend_of, target);
        let counters = dp.counters().unwrap();
        assert_eq!(counters["new_flows"], u64::from(target), "{percent} %: every SYN below capacity made a flow");
        assert_eq!(counters["conntrack_full"], 0, "{percent} %: nothing refused below capacity");
        assert_eq!(dp.flows().unwrap().len() as u32, target, "{percent} %: REPLIES holds every flow");
        let started = std::time::Instant::now();
        for (i, &port) in backend_of.iter().enumerate() {
            still_translated(&dp, &mut rng, i as u32, port).unwrap_or_else(|e| panic!("at {percent} % of {MAX}: {e}"));
        }
        eprintln!(
            "conntrack at {percent} % ({target} of {MAX} flows): all {target} earlier flows still translated both ways \
             (checked in {} ms), 0 evicted, conntrack_full 0",
            started.elapsed().as_millis()
        );
    }
    // Past capacity: 10 % more new flows are passed unmodified and counted, and evict nothing.
    let over = MAX / 10;
    for i in MAX..MAX + over {
        let (syn, _, _) = capacity_flow(&mut rng, i, SYN);
        let out = dp.test_run_xdp(&syn.bytes, 1).unwrap();
        assert_eq!((out.verdict, &out.data), (XDP_PASS, &syn.bytes), "flow {i} past capacity passes unmodified");
    }
    let counters = dp.counters().unwrap();
    assert_eq!(counters["conntrack_full"], u64::from(over), "every flow past capacity is counted");
    assert_eq!(counters["new_flows"], u64::from(MAX));
    for (i, &port) in backend_of.iter().enumerate() {
        still_translated(&dp, &mut rng, i as u32, port).unwrap_or_else(|e| panic!("past capacity: {e}"));
    }
    eprintln!(
        "conntrack past capacity: {over} more SYNs passed unmodified (conntrack_full {over}); all {MAX} tracked flows still translated; eviction: none"
    );
    // Closing flows (RST) makes room for as many new ones.
    for i in 0..100u32 {
        let (rst, _, _) = capacity_flow(&mut rng, i, RST);
        dp.test_run_xdp(&rst.bytes, 1).unwrap();
    }
    for i in MAX + over..MAX + over + 100 {
        let (syn, _, _) = capacity_flow(&mut rng, i, SYN);
        let out = dp.test_run_xdp(&syn.bytes, 1).unwrap();
        assert_ne!(out.data, syn.bytes, "flow {i}: room made by closed flows is used again");
    }
    let counters = dp.counters().unwrap();
    assert_eq!(counters["new_flows"], u64::from(MAX) + 100);
    assert_eq!(counters["conntrack_full"], u64::from(over), "no refusal once room was made");
    for (i, &port) in backend_of.iter().enumerate().skip(100) {
        still_translated(&dp, &mut rng, i as u32, port).unwrap_or_else(|e| panic!("after closing 100 flows: {e}"));
    }
    eprintln!("conntrack: 100 flows reset at capacity, 100 new flows admitted in their place, the other {} kept", MAX - 100);
}

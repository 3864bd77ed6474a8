//! The only module that loads programs and touches BPF maps.
//!
//! Everything lives under `pin_path`:
//! - `SERVICES`, `BACKENDS`, … — every map, pinned by name (see `lb_common::maps`);
//! - `prog_xdp`, `prog_tc_egress` — the loaded programs;
//! - `link_xdp_<mode>_<ifname>`, `link_tc_<ifname>` — the bpf_links attaching them.
//!
//! Pinned links keep the programs attached after the daemon exits, and pinned maps keep the
//! flows. A new daemon loads its programs against the same maps and swaps them into the
//! existing links atomically (`BPF_LINK_UPDATE`), so traffic never sees a gap.
//!
//! `pins` loads, pins, attaches and detaches; `raw` has the map system calls aya lacks;
//! `testing` (the `testing` feature) runs the programs detached with `BPF_PROG_TEST_RUN` and
//! reads and writes backends in the positional layout, for packet tests and the benchmark.

mod pins;
mod raw;
#[cfg(feature = "testing")]
mod testing;

#[cfg(feature = "testing")]
pub use testing::TestRunOutput;
pub use pins::detach;
use pins::*;
use raw::{dump, take_entry};

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap as _, MapData, PerCpuArray, PerCpuValues},
    programs::{
        SchedClassifier, Xdp,
    },
};
use lb_common::{
    Addr, FAMILY_V4, FAMILY_V6, LAYOUT_VERSION, Meta, PROTO_TCP,
    backend::{Backend, BackendConns, MAX_BACKENDS, Passive, STATE_DOWN, STATE_DRAINING, STATE_EMPTY, STATE_FAILED, STATE_UP},
    flow::{Closed, Flow, FlowKey, ReplyNat},
    maps, programs,
    service::{MAX_BACKENDS_PER_SERVICE, Service, ServiceKey},
    stats::Stats,
};
use tracing::warn;

use crate::{
    config,
    layout::{Layout, Occupancy},
    backends::BackendState,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// How an interface got its XDP program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl AttachedMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }
}

pub struct Dataplane {
    pin_path: PathBuf,
    max_flows: u32,
    // Keeps the programs loaded while we run (the pins keep them after we exit).
    #[cfg_attr(not(feature = "testing"), expect(dead_code, reason = "held for its Drop; only test runs read it"))]
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    conns: Array<MapData, BackendConns>,
    backend_flows: PerCpuArray<MapData, u64>,
    flows: HashMap<MapData, FlowKey, Flow>,
    replies: HashMap<MapData, FlowKey, ReplyNat>,
    closed: HashMap<MapData, FlowKey, Closed>,
    vip_ports: Array<MapData, u8>,
    proxied: Array<MapData, i64>,
    passive: Array<MapData, Passive>,
    stats: PerCpuArray<MapData, Stats>,
    interfaces: Vec<(String, AttachedMode)>,
    /// Backend state updates written by `set_slot_state` since this `Dataplane` was opened: health
    /// transitions and drains. Flapping backends must not turn into a storm of map writes.
    state_writes: u64,
    /// Whether maps pinned by an earlier run were adopted (flows preserved).
    pub adopted: bool,
}

/// Address, port and family of a socket address in map form (network byte order).
pub fn map_addr(addr: SocketAddr) -> (Addr, u16, u8) {
    match addr.ip() {
        IpAddr::V4(ip) => (Addr::v4(ip.octets()), addr.port().to_be(), FAMILY_V4),
        IpAddr::V6(ip) => (Addr(ip.octets()), addr.port().to_be(), FAMILY_V6),
    }
}

/// The socket address behind a map address.
pub fn sock_addr(addr: &Addr, port_be: u16, family: u8) -> SocketAddr {
    let a = &addr.0;
    let ip = if family == FAMILY_V4 { IpAddr::from([a[0], a[1], a[2], a[3]]) } else { IpAddr::from(*a) };
    SocketAddr::new(ip, u16::from_be(port_be))
}

fn state_value(state: BackendState) -> u32 {
    match state {
        BackendState::Up => STATE_UP,
        BackendState::Down => STATE_DOWN,
        BackendState::Draining => STATE_DRAINING,
        BackendState::Failed => STATE_FAILED,
    }
}

fn state_of(value: u32) -> Option<BackendState> {
    match value {
        STATE_UP => Some(BackendState::Up),
        STATE_DOWN => Some(BackendState::Down),
        STATE_DRAINING => Some(BackendState::Draining),
        STATE_FAILED => Some(BackendState::Failed),
        _ => None,
    }
}
impl Dataplane {
    /// Loads the programs and maps and attaches them to every configured interface, or adopts
    /// what an earlier run left pinned (keeping its flows and attachment mode).
    pub fn open(cfg: &config::Dataplane) -> anyhow::Result<Self> {
        let pin_path = cfg.pin_path.clone();
        ensure_bpffs(&pin_path)?;
        let adopted = check_pinned_layout(&pin_path, cfg.max_flows)?;
        fs::create_dir_all(&pin_path).with_context(|| format!("creating pin directory {}", pin_path.display()))?;
        let mut ebpf = load_object(cfg.max_flows, Some(&pin_path))?;

        let xdp: &mut Xdp = ebpf.program_mut(programs::XDP).context("XDP program missing")?.try_into()?;
        repin(&pin_path.join("prog_xdp"), |p| xdp.pin(p))?;
        let mut interfaces = Vec::new();
        for iface in &cfg.interfaces {
            interfaces.push((iface.clone(), attach_xdp(xdp, &pin_path, iface, cfg.xdp_mode)?));
        }
        let tc: &mut SchedClassifier =
            ebpf.program_mut(programs::TC_EGRESS).context("TC program missing")?.try_into()?;
        repin(&pin_path.join("prog_tc_egress"), |p| tc.pin(p))?;
        for iface in &cfg.interfaces {
            attach_tc(tc, &pin_path, iface)?;
        }
        remove_stale_links(&pin_path, &cfg.interfaces)?;
        Self::new(ebpf, pin_path, cfg.max_flows, interfaces, adopted)
    }

    fn new(
        mut ebpf: Ebpf,
        pin_path: PathBuf,
        max_flows: u32,
        interfaces: Vec<(String, AttachedMode)>,
        adopted: bool,
    ) -> anyhow::Result<Self> {
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                warn!("data path log messages will not be shown: {e}");
                None
            }
        };
        let mut meta: Array<MapData, Meta> = take(&mut ebpf, maps::META)?;
        meta.set(0, Meta { layout_version: LAYOUT_VERSION, max_flows }, 0)?;
        Ok(Self {
            pin_path,
            max_flows,
            services: take(&mut ebpf, maps::SERVICES)?,
            backends: take(&mut ebpf, maps::BACKENDS)?,
            conns: take(&mut ebpf, maps::BACKEND_CONNS)?,
            backend_flows: take(&mut ebpf, maps::BACKEND_FLOWS)?,
            flows: take(&mut ebpf, maps::FLOWS)?,
            replies: take(&mut ebpf, maps::REPLIES)?,
            closed: take(&mut ebpf, maps::CLOSED)?,
            vip_ports: take(&mut ebpf, maps::VIP_PORTS)?,
            proxied: take(&mut ebpf, maps::PROXIED)?,
            passive: take(&mut ebpf, maps::PASSIVE)?,
            stats: take(&mut ebpf, maps::STATS)?,
            ebpf,
            logger,
            interfaces,
            state_writes: 0,
            adopted,
        })
    }

    pub fn interfaces(&self) -> &[(String, AttachedMode)] {
        &self.interfaces
    }

    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    pub fn max_flows(&self) -> u32 {
        self.max_flows
    }

    /// The aya-log ring buffer, to be drained into `tracing` whenever it is readable.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// The VIPs' blocks and the occupied backend slots, as the maps hold them now.
    pub fn occupancy(&self) -> anyhow::Result<Occupancy> {
        let mut now = Occupancy::default();
        for entry in self.services.iter() {
            let (key, value) = entry.context("reading SERVICES")?;
            now.vips.insert(sock_addr(&key.addr, key.port, key.family), value.first_backend / MAX_BACKENDS_PER_SERVICE);
        }
        for slot in 0..MAX_BACKENDS {
            let b = self.backends.get(&slot, 0)?;
            if b.state != STATE_EMPTY {
                now.slots.insert(slot, sock_addr(&b.addr, b.port, b.family));
            }
        }
        Ok(now)
    }

    /// The state in the map of every backend of `layout`, or `None` for a slot that holds
    /// another address (or none).
    pub fn layout_states(&self, services: &[config::Service], layout: &Layout) -> Vec<Vec<Option<BackendState>>> {
        services
            .iter()
            .enumerate()
            .map(|(s, svc)| {
                svc.backends
                    .iter()
                    .enumerate()
                    .map(|(b, addr)| {
                        let cur = self.backends.get(&layout.slot(s, b), 0).ok()?;
                        let (a, port, family) = map_addr(*addr);
                        (cur.addr == a && cur.port == port && cur.family == family).then(|| state_of(cur.state)).flatten()
                    })
                    .collect()
            })
            .collect()
    }

    /// Writes services and backends where `layout` puts them. `states[s][b]` is each backend's
    /// state; retiring slots are set draining (no new flows; theirs continue). Backends are
    /// written before the services that point at them, and slots neither used nor retiring are
    /// emptied after, so the data path never sees a service pointing at a half-written backend.
    /// Live/total counts are kept for slots whose backend did not change.
    pub fn apply_layout(&mut self, services: &[config::Service], layout: &Layout, states: &[Vec<BackendState>]) -> anyhow::Result<()> {
        let mut keep = std::collections::HashSet::new();
        // Ports first: a VIP port marked early only costs a hash lookup; one marked late would
        // let the first SYNs through unbalanced.
        // Only L4 services go into the data path's service table: the daemon listens on the
        // address of the others itself. Their backends still get slots, for states and counts.
        let ports: std::collections::HashSet<u16> =
            services.iter().filter(|s| s.mode == config::ServiceMode::L4).map(|s| s.listen.port()).collect();
        for &port in &ports {
            self.vip_ports.set(u32::from(port), 1, 0)?;
        }
        let mut used = std::collections::HashSet::new();
        for r in &layout.retiring {
            let mut b = self.backends.get(&r.slot, 0)?;
            if b.state != STATE_EMPTY {
                b.state = STATE_DRAINING;
                self.backends.set(r.slot, b, 0)?;
            }
            used.insert(r.slot);
        }
        for (s, svc) in services.iter().enumerate() {
            for (b, addr) in svc.backends.iter().enumerate() {
                let slot = layout.slot(s, b);
                used.insert(slot);
                let (a, port, family) = map_addr(*addr);
                let new = Backend { addr: a, port, family, _pad: 0, state: state_value(states[s][b]), service: layout.blocks[s] };
                let old = self.backends.get(&slot, 0)?;
                let same_backend = (old.addr, old.port, old.family) == (new.addr, new.port, new.family);
                if !same_backend {
                    self.reset_counts(slot)?;
                }
                // Passive health settings go in before the backend can be chosen; its failure
                // window and ramp stay unless the slot now holds another backend.
                let before = self.passive.get(&slot, 0)?;
                let passive = Passive {
                    max_fails: svc.max_fails,
                    fail_timeout_ns: svc.fail_timeout.as_nanos() as u64,
                    slow_start_ns: svc.slow_start.as_nanos() as u64,
                    ..if same_backend { before } else { Passive::default() }
                };
                if passive != before {
                    self.passive.set(slot, passive, 0)?;
                }
                self.backends.set(slot, new, 0)?;
            }
            if svc.mode != config::ServiceMode::L4 {
                continue;
            }
            let (addr, port, family) = map_addr(svc.listen);
            let key = ServiceKey { addr, port, family, proto: PROTO_TCP };
            let (first_backend, backend_count) = layout.range(s);
            let value = Service { id: layout.blocks[s], first_backend, backend_count, flags: 0 };
            self.services.insert(key, value, 0)?;
            keep.insert(key);
        }
        let stale: Vec<ServiceKey> = self.services.keys().filter_map(Result::ok).filter(|k| !keep.contains(k)).collect();
        for key in stale {
            self.services.remove(&key)?;
            let port = u16::from_be(key.port);
            if !ports.contains(&port) {
                self.vip_ports.set(u32::from(port), 0, 0)?;
            }
        }
        for slot in 0..MAX_BACKENDS {
            if !used.contains(&slot) && self.backends.get(&slot, 0)?.state != STATE_EMPTY {
                self.clear_slot(slot)?;
            }
        }
        Ok(())
    }

    /// Empties a slot and its counts (its backend left, and no flow refers to it any more).
    pub fn clear_slot(&mut self, slot: u32) -> anyhow::Result<()> {
        self.backends.set(slot, Backend::default(), 0)?;
        self.reset_counts(slot)
    }

    /// The state of the backend in `slot`.
    pub fn set_slot_state(&mut self, slot: u32, state: BackendState) -> anyhow::Result<()> {
        let mut b = self.backends.get(&slot, 0)?;
        b.state = state_value(state);
        self.backends.set(slot, b, 0)?;
        self.state_writes += 1;
        Ok(())
    }

    pub fn slot_conns(&self, slot: u32) -> anyhow::Result<BackendConns> {
        Ok(self.conns.get(&slot, 0)?)
    }

    /// Connections ever sent to the backend in `slot`.
    pub fn slot_total(&self, slot: u32) -> anyhow::Result<u64> {
        self.backend_flows(slot)
    }

    fn reset_counts(&mut self, slot: u32) -> anyhow::Result<()> {
        self.conns.set(slot, BackendConns::default(), 0)?;
        self.passive.set(slot, Passive::default(), 0)?;
        self.proxied.set(slot, 0, 0)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        self.backend_flows.set(slot, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
        Ok(())
    }

    /// The passive health record of the backend in `slot` (see `lb_common::backend::Passive`).
    pub fn slot_passive(&self, slot: u32) -> anyhow::Result<Passive> {
        Ok(self.passive.get(&slot, 0)?)
    }

    /// How many backend states `set_slot_state` has written (see `state_writes`).
    pub fn state_writes(&self) -> u64 {
        self.state_writes
    }

    /// Overwrites a backend's live count. A flow opening or closing between our read and this
    /// write is corrected on the next reconcile.
    pub fn set_live(&mut self, slot: u32, live: i64) -> anyhow::Result<()> {
        let mut c = self.conns.get(&slot, 0)?;
        if c.live != live {
            c.live = live;
            self.conns.set(slot, c, 0)?;
        }
        Ok(())
    }

    /// Sets how many requests the HTTPS proxy has in flight to this slot's backend address; the
    /// XDP path adds it to the slot's live count when choosing. Only the daemon writes it.
    pub fn set_proxied(&mut self, slot: u32, in_flight: i64) -> anyhow::Result<()> {
        if self.proxied.get(&slot, 0)? != in_flight {
            self.proxied.set(slot, in_flight, 0)?;
        }
        Ok(())
    }

    /// A second handle on the live counts, for readers that must not wait for the lock around
    /// the `Dataplane` (the HTTPS proxy reads them for every request).
    pub fn conns_reader(&self) -> anyhow::Result<ConnsReader> {
        use std::os::fd::AsFd as _;
        let fd = self.conns.map().fd().as_fd().try_clone_to_owned().context("duplicating the BACKEND_CONNS fd")?;
        let map = MapData::from_fd(fd).context("opening BACKEND_CONNS again")?;
        Ok(ConnsReader(Array::try_from(aya::maps::Map::Array(map))?))
    }

    fn backend_flows(&self, slot: u32) -> anyhow::Result<u64> {
        let v: PerCpuValues<u64> = self.backend_flows.get(&slot, 0)?;
        Ok(v.iter().sum())
    }

    /// `STATS` summed over CPUs, by field name.
    pub fn counters(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let per_cpu = self.stats.get(&0, 0)?;
        let mut sum = Stats::default();
        for s in per_cpu.iter() {
            let Stats {
                xdp_packets, xdp_bytes, fwd_packets, fwd_bytes, new_flows, reply_packets, reply_bytes,
                closed_flows, conntrack_full, drop_no_backend, no_flow, malformed, fragments, ipv6_ext,
                ip_options, icmp_errors, tc_pull,
            } = *s;
            sum.xdp_packets += xdp_packets;
            sum.xdp_bytes += xdp_bytes;
            sum.fwd_packets += fwd_packets;
            sum.fwd_bytes += fwd_bytes;
            sum.new_flows += new_flows;
            sum.reply_packets += reply_packets;
            sum.reply_bytes += reply_bytes;
            sum.closed_flows += closed_flows;
            sum.conntrack_full += conntrack_full;
            sum.drop_no_backend += drop_no_backend;
            sum.no_flow += no_flow;
            sum.malformed += malformed;
            sum.fragments += fragments;
            sum.ipv6_ext += ipv6_ext;
            sum.ip_options += ip_options;
            sum.icmp_errors += icmp_errors;
            sum.tc_pull += tc_pull;
        }
        let s = sum;
        Ok([
            ("xdp_packets", s.xdp_packets), ("xdp_bytes", s.xdp_bytes), ("fwd_packets", s.fwd_packets),
            ("fwd_bytes", s.fwd_bytes), ("new_flows", s.new_flows), ("reply_packets", s.reply_packets),
            ("reply_bytes", s.reply_bytes), ("closed_flows", s.closed_flows), ("conntrack_full", s.conntrack_full),
            ("drop_no_backend", s.drop_no_backend), ("no_flow", s.no_flow), ("malformed", s.malformed),
            ("fragments", s.fragments), ("ipv6_ext", s.ipv6_ext), ("ip_options", s.ip_options), ("icmp_errors", s.icmp_errors), ("tc_pull", s.tc_pull),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect())
    }

    /// Every tracked flow as (reply key, reply NAT, forward flow if present).
    pub fn flows(&self) -> anyhow::Result<Vec<(FlowKey, ReplyNat, Option<Flow>)>> {
        let replies: Vec<(FlowKey, ReplyNat)> = dump(self.replies.map()).context("reading REPLIES")?;
        let forward: std::collections::HashMap<FlowKey, Flow> =
            dump(self.flows.map()).context("reading FLOWS")?.into_iter().collect();
        Ok(replies
            .into_iter()
            .map(|(rev, nat)| {
                let flow = forward.get(&rev.forward_of_reply(&nat)).copied();
                (rev, nat, flow)
            })
            .collect())
    }

    /// Forgets a flow in both directions, as `flows()` returned it (`seen`). A client may have
    /// reused the 4-tuple for a new connection since (with `tcp_tw_reuse`, a busy client cycles
    /// through its ports in seconds), and the data path then replaced the entries: those belong
    /// to the new connection and are left alone, else its next packets would find no flow and
    /// be answered with a reset. Returns whether the flow was removed.
    ///
    /// The forward entry is taken out with one `BPF_MAP_LOOKUP_AND_DELETE_ELEM`, so what is
    /// removed is known exactly: when a new connection took the 4-tuple after our check, its
    /// entry goes straight back in (`BPF_NOEXIST`: unless the data path has recreated it
    /// meanwhile). Its packets can only miss it for the microseconds between the two calls.
    pub fn remove_flow(&mut self, rev: &FlowKey, nat: &ReplyNat, seen: Option<&Flow>) -> bool {
        let fwd = rev.forward_of_reply(nat);
        let same = |now: &Flow| seen.is_some_and(|seen| seen.created_ns == now.created_ns && seen.backend == now.backend);
        match self.flows.get(&fwd, 0).ok() {
            Some(now) if !same(&now) => return false,
            _ => {}
        }
        match take_entry::<FlowKey, Flow>(self.flows.map(), &fwd) {
            Ok(Some(taken)) if !same(&taken) => {
                // A new connection took the 4-tuple between the check and the removal.
                let _ = self.flows.insert(fwd, taken, 1 /* BPF_NOEXIST */);
                return false;
            }
            _ => {}
        }
        let _ = self.replies.remove(rev);
        let _ = self.closed.remove(&fwd);
        true
    }
}

/// Reads `BACKEND_CONNS` without the `Dataplane`.
pub struct ConnsReader(Array<MapData, BackendConns>);

impl ConnsReader {
    /// The data path's live count of a slot (0 if it cannot be read).
    pub fn live(&self, slot: u32) -> i64 {
        self.0.get(&slot, 0).map_or(0, |c| c.live)
    }
}

/// The backend state machine's and the reconcile's view of the maps.
impl crate::backends::Maps for Dataplane {
    fn state(&self, slot: u32) -> anyhow::Result<Option<BackendState>> {
        Ok(state_of(self.backends.get(&slot, 0)?.state))
    }
    fn set_state(&mut self, slot: u32, state: BackendState) -> anyhow::Result<()> {
        self.set_slot_state(slot, state)
    }
    fn passive(&self, slot: u32) -> anyhow::Result<Passive> {
        self.slot_passive(slot)
    }
    fn set_passive(&mut self, slot: u32, passive: Passive) -> anyhow::Result<()> {
        Ok(self.passive.set(slot, passive, 0)?)
    }
    fn live(&self, slot: u32) -> anyhow::Result<i64> {
        Ok(self.slot_conns(slot)?.live)
    }
    fn set_live(&mut self, slot: u32, live: i64) -> anyhow::Result<()> {
        Dataplane::set_live(self, slot, live)
    }
    fn total(&self, slot: u32) -> anyhow::Result<u64> {
        self.slot_total(slot)
    }
    fn flows(&self) -> anyhow::Result<Vec<(FlowKey, ReplyNat, Option<Flow>)>> {
        Dataplane::flows(self)
    }
    fn remove_flow(&mut self, rev: &FlowKey, nat: &ReplyNat, seen: Option<&Flow>) -> bool {
        Dataplane::remove_flow(self, rev, nat, seen)
    }
    fn clear_slot(&mut self, slot: u32) -> anyhow::Result<()> {
        Dataplane::clear_slot(self, slot)
    }
}

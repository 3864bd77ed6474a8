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

use std::{
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap as _, MapData, MapInfo, PerCpuArray, PerCpuValues},
    TestRunOptions,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, TestRun as _, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
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
use tracing::{info, warn};

use crate::{
    config,
    layout::{Layout, Occupancy},
    status::BackendState,
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

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Debug)]
pub struct TestRunOutput {
    /// The program's return value (XDP action or TC action).
    pub verdict: u32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
    /// Average run time per repetition, as measured by the kernel.
    pub duration: std::time::Duration,
}

pub struct Dataplane {
    pin_path: PathBuf,
    max_flows: u32,
    // Keeps the programs loaded while we run (the pins keep them after we exit).
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

/// Slot of backend `backend` of service `service` in `BACKENDS`.
pub const fn slot(service: usize, backend: usize) -> u32 {
    service as u32 * MAX_BACKENDS_PER_SERVICE + backend as u32
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

/// Mounts bpffs on `/sys/fs/bpf` when the pin path lives there and nothing is mounted yet
/// (systemd mounts it at boot; minimal systems and containers may not).
fn ensure_bpffs(pin_path: &Path) -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !pin_path.starts_with(root) {
        return Ok(());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mounted = mountinfo
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf "));
    if !mounted {
        nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .context("mounting bpffs on /sys/fs/bpf (needs CAP_SYS_ADMIN; or mount it yourself: `mount -t bpf bpf /sys/fs/bpf`)")?;
        info!("mounted bpffs on /sys/fs/bpf");
    }
    Ok(())
}

struct Expected {
    name: &'static str,
    key: u32,
    value: u32,
    max_entries: u32,
}

fn expected_maps(max_flows: u32) -> [Expected; 12] {
    let e = |name, key: usize, value: usize, max_entries| Expected { name, key: key as u32, value: value as u32, max_entries };
    [
        e(maps::SERVICES, size_of::<ServiceKey>(), size_of::<Service>(), lb_common::service::MAX_SERVICES),
        e(maps::BACKENDS, 4, size_of::<Backend>(), MAX_BACKENDS),
        e(maps::BACKEND_CONNS, 4, size_of::<BackendConns>(), MAX_BACKENDS),
        e(maps::BACKEND_FLOWS, 4, 8, MAX_BACKENDS),
        e(maps::FLOWS, size_of::<FlowKey>(), size_of::<Flow>(), max_flows),
        e(maps::REPLIES, size_of::<FlowKey>(), size_of::<ReplyNat>(), max_flows),
        e(maps::CLOSED, size_of::<FlowKey>(), size_of::<Closed>(), max_flows),
        e(maps::STATS, 4, size_of::<Stats>(), 1),
        e(maps::META, 4, size_of::<Meta>(), 1),
        e(maps::VIP_PORTS, 4, 1, lb_common::service::VIP_PORTS_LEN),
        e(maps::PROXIED, 4, 8, MAX_BACKENDS),
        e(maps::PASSIVE, 4, size_of::<Passive>(), MAX_BACKENDS),
    ]
}

/// Refuses pinned maps this build cannot use as they are, before anything is loaded: silently
/// reinterpreting another layout's bytes would corrupt flows.
fn check_pinned_layout(pin_path: &Path, max_flows: u32) -> anyhow::Result<bool> {
    let mut found = 0;
    for Expected { name, key, value, max_entries } in expected_maps(max_flows) {
        let path = pin_path.join(name);
        let info = match MapInfo::from_pin(&path) {
            Ok(info) => info,
            Err(_) if !path.exists() => continue,
            Err(e) => bail!("cannot open pinned map {}: {e}", path.display()),
        };
        found += 1;
        let fix = format!(
            "the state under {} was written by another xlb version or configuration; restore the previous setting, or run `xlb detach --config FILE` to remove it (this drops tracked flows)",
            pin_path.display()
        );
        if info.key_size() != key || info.value_size() != value {
            bail!(
                "pinned map {} has {}-byte keys and {}-byte values, this xlb uses {key} and {value}: {fix}",
                path.display(), info.key_size(), info.value_size()
            );
        }
        if info.max_entries() != max_entries {
            let what = if name == maps::FLOWS || name == maps::REPLIES {
                format!("dataplane.max_flows is {max_flows} but the pinned conntrack holds {}", info.max_entries())
            } else {
                format!("pinned map {} has {} entries, this xlb uses {max_entries}", path.display(), info.max_entries())
            };
            bail!("{what}: {fix}");
        }
    }
    if found > 0 {
        let meta: Array<MapData, Meta> = Array::try_from(aya::maps::Map::Array(
            MapData::from_pin(pin_path.join(maps::META)).context("opening pinned META map")?,
        ))?;
        let Meta { layout_version, .. } = meta.get(&0, 0)?;
        // 0: an earlier start created the maps but failed before finishing (sizes matched above).
        if layout_version != LAYOUT_VERSION && layout_version != 0 {
            bail!(
                "the maps pinned under {} have layout version {layout_version}, this xlb uses {LAYOUT_VERSION}; run `xlb detach --config FILE` to remove them (this drops tracked flows)",
                pin_path.display()
            );
        }
    }
    Ok(found > 0)
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map>,
    <T as TryFrom<aya::maps::Map>>::Error: std::error::Error + Send + Sync + 'static,
{
    let map = ebpf.take_map(name).with_context(|| format!("map {name} missing from the object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// Replaces a pin with a fresh one of `pin` (programs are re-pinned on every start).
fn repin(path: &Path, pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing old pin {}", path.display())),
    }
    pin(path).with_context(|| format!("pinning {}", path.display()))
}

fn open_pinned_link(path: &Path) -> anyhow::Result<Option<FdLink>> {
    if !path.exists() {
        return Ok(None);
    }
    let link = PinnedLink::from_pin(path).with_context(|| format!("opening pinned link {}", path.display()))?;
    Ok(Some(FdLink::from(link)))
}

fn xdp_link_path(pin_path: &Path, mode: AttachedMode, iface: &str) -> PathBuf {
    pin_path.join(format!("link_xdp_{}_{iface}", mode.as_str()))
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

    /// Loads the programs with fresh, unpinned maps and attaches nothing: for running them
    /// with `BPF_PROG_TEST_RUN` (packet tests, benchmarks). Everything is freed on drop.
    pub fn load_detached(max_flows: u32) -> anyhow::Result<Self> {
        let ebpf = load_object(max_flows, None)?;
        Self::new(ebpf, PathBuf::new(), max_flows, Vec::new(), false)
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

    /// Runs the XDP program on `packet` (`repeat` times; map updates persist across repeats).
    pub fn test_run_xdp(&self, packet: &[u8], repeat: u32) -> anyhow::Result<TestRunOutput> {
        self.test_run(programs::XDP, packet, repeat)
    }

    /// Runs the TC egress program on `packet`.
    pub fn test_run_tc(&self, packet: &[u8], repeat: u32) -> anyhow::Result<TestRunOutput> {
        self.test_run(programs::TC_EGRESS, packet, repeat)
    }

    /// Runs the object's no-op XDP program: the baseline program cost is measured against.
    pub fn test_run_noop(&self, packet: &[u8], repeat: u32) -> anyhow::Result<TestRunOutput> {
        self.test_run(programs::NOOP, packet, repeat)
    }

    fn test_run(&self, name: &str, packet: &[u8], repeat: u32) -> anyhow::Result<TestRunOutput> {
        let program = self.ebpf.program(name).with_context(|| format!("program {name} missing"))?;
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions { data_in: Some(packet), data_out: Some(&mut out), repeat, ..Default::default() };
        let result = match program {
            aya::programs::Program::Xdp(p) => p.test_run(opts),
            aya::programs::Program::SchedClassifier(p) => p.test_run(opts),
            _ => bail!("program {name} cannot be test-run"),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput { verdict: result.return_value, data: out, duration: result.duration })
    }

    /// Instructions the verifier processed for each program when loading it (the kernel's
    /// `verified_insns`): what its load time grows with.
    pub fn verified_instructions(&self) -> anyhow::Result<Vec<(&'static str, u32)>> {
        [programs::XDP, programs::TC_EGRESS]
            .into_iter()
            .map(|name| {
                let program = self.ebpf.program(name).with_context(|| format!("program {name} missing"))?;
                let info = match program {
                    aya::programs::Program::Xdp(p) => p.info(),
                    aya::programs::Program::SchedClassifier(p) => p.info(),
                    _ => bail!("unexpected type of program {name}"),
                }
                .with_context(|| format!("reading the info of {name}"))?;
                Ok((name, info.verified_instruction_count().unwrap_or(0)))
            })
            .collect()
    }

    /// The `FLOWS` entry of a client → VIP 4-tuple.
    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.flows.get(key, 0).ok()
    }

    /// The `REPLIES` entry of a backend → client 4-tuple.
    pub fn reply(&self, key: &FlowKey) -> Option<ReplyNat> {
        self.replies.get(key, 0).ok()
    }

    pub fn set_conns(&mut self, service: usize, backend: usize, conns: BackendConns) -> anyhow::Result<()> {
        Ok(self.conns.set(slot(service, backend), conns, 0)?)
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

    /// The backend states currently in the maps for `services` (as laid out by
    /// `apply_services`), or `None` for a backend whose slot holds something else.
    pub fn current_states(&self, services: &[config::Service]) -> Vec<Vec<Option<BackendState>>> {
        self.layout_states(services, &Layout::positional(services))
    }

    /// Writes services and backends in the positional layout of a first start (backend `b` of
    /// service `s` in slot `s * 16 + b`). `states[s][b]` is each backend's state.
    pub fn apply_services(&mut self, services: &[config::Service], states: &[Vec<BackendState>]) -> anyhow::Result<()> {
        self.apply_layout(services, &Layout::positional(services), states)
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

    /// A backend comes (back) up: its passive failure window starts empty, and when the
    /// service has a `slow_start` its share of new connections ramps up from `now_ns`
    /// (CLOCK_MONOTONIC). Call before writing `Up`, so the ramp is in place when it can be
    /// chosen. Failure totals are kept.
    pub fn restart_passive(&mut self, slot: u32, now_ns: u64) -> anyhow::Result<()> {
        let p = self.passive.get(&slot, 0)?;
        let up_since_ns = if p.slow_start_ns > 0 { now_ns } else { 0 };
        self.passive.set(slot, Passive { fails: 0, window_start_ns: 0, up_since_ns, ..p }, 0)?;
        Ok(())
    }

    /// The passive health record of the backend in `slot` (see `lb_common::backend::Passive`).
    pub fn slot_passive(&self, slot: u32) -> anyhow::Result<Passive> {
        Ok(self.passive.get(&slot, 0)?)
    }

    /// A backend's passive health record, in the positional layout (tests).
    pub fn passive(&self, service: usize, backend: usize) -> anyhow::Result<Passive> {
        self.slot_passive(slot(service, backend))
    }

    /// Overwrites a backend's passive health record, in the positional layout (tests set up
    /// ramps and windows with it).
    pub fn set_passive(&mut self, service: usize, backend: usize, passive: Passive) -> anyhow::Result<()> {
        Ok(self.passive.set(slot(service, backend), passive, 0)?)
    }

    /// A backend's state, in the positional layout (tests).
    pub fn set_state(&mut self, service: usize, backend: usize, state: BackendState) -> anyhow::Result<()> {
        self.set_slot_state(slot(service, backend), state)
    }

    /// How many backend states `set_slot_state` has written (see `state_writes`).
    pub fn state_writes(&self) -> u64 {
        self.state_writes
    }

    pub fn conns(&self, service: usize, backend: usize) -> anyhow::Result<BackendConns> {
        Ok(self.conns.get(&slot(service, backend), 0)?)
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

    pub fn proxied(&self, slot: u32) -> anyhow::Result<i64> {
        Ok(self.proxied.get(&slot, 0)?)
    }

    /// A second handle on the live counts, for readers that must not wait for the lock around
    /// the `Dataplane` (the HTTPS proxy reads them for every request).
    pub fn conns_reader(&self) -> anyhow::Result<ConnsReader> {
        use std::os::fd::AsFd as _;
        let fd = self.conns.map().fd().as_fd().try_clone_to_owned().context("duplicating the BACKEND_CONNS fd")?;
        let map = MapData::from_fd(fd).context("opening BACKEND_CONNS again")?;
        Ok(ConnsReader(Array::try_from(aya::maps::Map::Array(map))?))
    }

    /// Connections ever sent to a backend: its new flows, summed over CPUs.
    pub fn total(&self, service: usize, backend: usize) -> anyhow::Result<u64> {
        self.backend_flows(slot(service, backend))
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

/// Removes `key` from a hash map and returns what it held, in one system call
/// (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`); `None` when it was not there. aya 0.14 has no API for it.
fn take_entry<K: bytemuck::Pod, V: bytemuck::Pod>(map: &MapData, key: &K) -> io::Result<Option<V>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    // The `map_elem` member of `union bpf_attr` (include/uapi/linux/bpf.h).
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = V::zeroed();
    let mut attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: &raw mut value as u64,
        flags: 0,
    };
    // SAFETY: attr points at a key and a value buffer of the map's sizes (checked at load by
    // `check_pinned_layout` / the object's BTF), both alive for the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_AND_DELETE_ELEM, &raw mut attr, size_of::<ElemAttr>()) };
    if ret == 0 {
        return Ok(Some(value));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOENT) => Ok(None),
        _ => Err(err),
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

/// Every entry of a hash map, read with `BPF_MAP_LOOKUP_BATCH`: a handful of system calls for
/// thousands of entries, where walking keys one by one costs two per entry (seconds, with the
/// map lock of the daemon held, at a hundred thousand flows). aya 0.14 has no batch API.
fn dump<K: bytemuck::Pod, V: bytemuck::Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    // The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut entries = Vec::new();
    let mut chunk = 4096usize;
    // Hash maps page by bucket; the token is a u32 bucket index.
    let (mut token, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut keys = vec![K::zeroed(); chunk];
        let mut values = vec![V::zeroed(); chunk];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const token) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd,
            ..BatchAttr::default()
        };
        // SAFETY: the attr points at buffers of `count` keys and values that outlive the call.
        let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &raw mut attr, size_of::<BatchAttr>()) };
        let err = (ret < 0).then(io::Error::last_os_error);
        if let Some(e) = &err
            && e.raw_os_error() == Some(libc::ENOSPC)
        {
            // One bucket holds more than `chunk` entries: retry it with room for them.
            chunk *= 2;
            continue;
        }
        let n = attr.count as usize;
        entries.extend(keys.into_iter().zip(values).take(n));
        match err {
            None => {}
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
            Some(e) => return Err(e),
        }
        token = next;
        first = false;
    }
}

/// Parses the object, creating its maps (or opening those pinned under `pin_path`), and loads
/// both programs into the kernel (the verifier runs here).
fn load_object(max_flows: u32, pin_path: Option<&Path>) -> anyhow::Result<Ebpf> {
    if OBJECT.is_empty() {
        bail!("this xlb binary was built without its eBPF object (AYA_BUILD_SKIP was set); rebuild it with `cargo xtask build`");
    }
    let mut loader = EbpfLoader::new();
    let pins: Vec<(&str, PathBuf)> = match pin_path {
        Some(dir) => maps::PINNED.iter().map(|&m| (m, dir.join(m))).collect(),
        None => Vec::new(),
    };
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .map_max_entries(maps::FLOWS, max_flows)
        .map_max_entries(maps::REPLIES, max_flows)
        .map_max_entries(maps::CLOSED, max_flows);
    let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
    for name in [programs::XDP, programs::NOOP] {
        let xdp: &mut Xdp = ebpf.program_mut(name).with_context(|| format!("{name} missing"))?.try_into()?;
        xdp.load().with_context(|| format!("loading {name} (verifier)"))?;
    }
    let tc: &mut SchedClassifier = ebpf.program_mut(programs::TC_EGRESS).context("TC program missing")?.try_into()?;
    tc.load().context("loading the TC egress program (verifier)")?;
    Ok(ebpf)
}

/// Attaches XDP to `iface`, or swaps the program into the link a previous run pinned.
fn attach_xdp(xdp: &mut Xdp, pin_path: &Path, iface: &str, want: config::XdpMode) -> anyhow::Result<AttachedMode> {
    for mode in [AttachedMode::Native, AttachedMode::Generic] {
        let path = xdp_link_path(pin_path, mode, iface);
        if let Some(link) = open_pinned_link(&path)? {
            let wanted = match want {
                config::XdpMode::Auto => true,
                config::XdpMode::Native => mode == AttachedMode::Native,
                config::XdpMode::Generic => mode == AttachedMode::Generic,
            };
            if !wanted {
                bail!(
                    "{iface} already has xlb's XDP program attached in {} mode but xdp_mode asks for another; run `xlb detach --config FILE` first (this drops tracked flows) or set xdp_mode = \"auto\"",
                    mode.as_str()
                );
            }
            match xdp.attach_to_link(XdpLink::try_from(link)?) {
                Ok(id) => {
                    // The pin still refers to this link; drop our handle without detaching.
                    let _ = xdp.take_link(id)?;
                    info!(interface = iface, mode = mode.as_str(), "XDP program replaced in the existing link");
                    return Ok(mode);
                }
                Err(e) if is_defunct(&e) => forget_defunct_link(&path, iface)?,
                Err(e) => return Err(e).with_context(|| format!("replacing the XDP program on {iface}")),
            }
        }
    }
    let tries: &[(XdpMode, AttachedMode)] = match want {
        config::XdpMode::Auto => &[(XdpMode::Driver, AttachedMode::Native), (XdpMode::Skb, AttachedMode::Generic)],
        config::XdpMode::Native => &[(XdpMode::Driver, AttachedMode::Native)],
        config::XdpMode::Generic => &[(XdpMode::Skb, AttachedMode::Generic)],
    };
    let mut last_err = None;
    for &(flags, mode) in tries {
        match xdp.attach(iface, flags) {
            Ok(id) => {
                let link: FdLink = xdp.take_link(id)?.try_into().context("XDP attached without a bpf_link (kernel too old?)")?;
                link.pin(xdp_link_path(pin_path, mode, iface)).context("pinning the XDP link")?;
                info!(interface = iface, mode = mode.as_str(), "XDP program attached");
                return Ok(mode);
            }
            Err(e) => {
                if want == config::XdpMode::Auto {
                    info!(interface = iface, "native XDP unavailable ({e}); trying generic");
                }
                last_err = Some(e);
            }
        }
    }
    Err(last_err.expect("at least one mode tried")).with_context(|| format!("attaching XDP to {iface}"))
}

fn attach_tc(tc: &mut SchedClassifier, pin_path: &Path, iface: &str) -> anyhow::Result<()> {
    let path = pin_path.join(format!("link_tc_{iface}"));
    if let Some(link) = open_pinned_link(&path)? {
        match tc.attach_to_link(SchedClassifierLink::try_from(link)?) {
            Ok(id) => {
                let _ = tc.take_link(id)?;
                return Ok(());
            }
            Err(e) if is_defunct(&e) => forget_defunct_link(&path, iface)?,
            Err(e) => return Err(e).with_context(|| format!("replacing the TC program on {iface}")),
        }
    }
    let id = tc
        .attach_with_options(iface, TcAttachType::Egress, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .with_context(|| format!("attaching TC egress (tcx) to {iface}"))?;
    let link: FdLink = tc.take_link(id)?.try_into()?;
    link.pin(&path).context("pinning the TC link")?;
    Ok(())
}

/// A pinned link whose interface was deleted (and perhaps created again under the same name)
/// is detached for good: the kernel answers ENOLINK to updating it.
fn is_defunct(e: &aya::programs::ProgramError) -> bool {
    matches!(e, aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. })
        if io_error.raw_os_error() == Some(libc::ENOLINK))
}

fn forget_defunct_link(path: &Path, iface: &str) -> anyhow::Result<()> {
    warn!(interface = iface, "the pinned link outlived its interface; attaching afresh");
    fs::remove_file(path).with_context(|| format!("removing defunct link pin {}", path.display()))
}

/// Unpins links to interfaces no longer configured, which detaches them.
fn remove_stale_links(pin_path: &Path, interfaces: &[String]) -> anyhow::Result<()> {
    for entry in fs::read_dir(pin_path)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let iface = name
            .strip_prefix("link_xdp_native_")
            .or_else(|| name.strip_prefix("link_xdp_generic_"))
            .or_else(|| name.strip_prefix("link_tc_"));
        if let Some(iface) = iface
            && !interfaces.iter().any(|i| i == iface)
        {
            detach_link(&pin_path.join(&name))?;
            fs::remove_file(pin_path.join(&name))?;
            info!(interface = iface, "detached from an interface no longer configured");
        }
    }
    Ok(())
}

/// Removes everything `open` created: unpinning the links detaches the programs, unpinning
/// the maps frees them (and every tracked flow) once no program uses them.
pub fn detach(pin_path: &Path) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(pin_path) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).with_context(|| format!("reading {}", pin_path.display())),
    };
    let mut names: Vec<String> = entries.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    // Links first, so no packet runs a program whose maps are being removed.
    names.sort_by_key(|n| !n.starts_with("link_"));
    for name in names {
        let path = pin_path.join(&name);
        if name.starts_with("link_") {
            detach_link(&path)?;
        }
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        removed.push(name);
    }
    fs::remove_dir(pin_path).with_context(|| format!("removing {}", pin_path.display()))?;
    Ok(removed)
}

/// Detaches a pinned link now (`BPF_LINK_DETACH`). Removing the pin alone detaches it only when
/// the kernel gets round to freeing the link, a moment later; `xlb detach` promises that the
/// program is gone when it returns.
fn detach_link(path: &Path) -> anyhow::Result<()> {
    use std::os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let pathname = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // The `obj_get` member of `union bpf_attr`: pathname, bpf_fd, file_flags.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = ObjGet { pathname: pathname.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: `attr` points at a NUL-terminated path that outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &raw const attr, size_of::<ObjGet>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("opening {}", path.display()));
    }
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The `link_detach` member of `union bpf_attr`: the link fd.
    let detach = [fd as u32, 0, 0, 0];
    // SAFETY: a zeroed attr holding a link fd that `link` keeps open during the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, detach.as_ptr(), size_of_val(&detach)) };
    drop(link);
    if ret < 0 {
        let e = io::Error::last_os_error();
        // ENOLINK: already detached (its interface is gone).
        if e.raw_os_error() != Some(libc::ENOLINK) {
            return Err(e).with_context(|| format!("detaching {}", path.display()));
        }
    }
    Ok(())
}

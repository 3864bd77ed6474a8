//! `xlb run`: owns the data plane, keeps its backend states and live counts true, and serves
//! the admin API. Stopping the daemon leaves the data path running (see `dataplane`).
//!
//! A backend's state in the data path comes from two inputs kept apart: the operator's drain
//! flag (`xlb drain`) and the health checks' verdict. Drained wins; otherwise health decides
//! between up and down. So a health transition never undrains a backend, and an undrain puts
//! back whatever health says now.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use crate::{
    admin::{self, ControlError, StatusSource},
    config::Config,
    dataplane::{self, Dataplane},
    health, notify,
    sockdiag::{self, SocketTable},
    status::{BackendState, BackendStatus, DataplaneStatus, DrainResult, InterfaceStatus, ServiceStatus, Status},
};

/// Live counts are reconciled with the kernel's socket table this often (the promise is
/// "within one second").
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);
/// A flow with no socket behind it is kept this long after its SYN before being forgotten: the
/// SYN may still be on its way through the stack.
const NO_SOCKET_GRACE_NS: u64 = 2_000_000_000;

#[derive(Clone, Default)]
struct Probe {
    healthy: Option<bool>,
    latency_ms: Option<f64>,
    error: Option<String>,
}

/// What a backend's state in the data path is decided from.
#[derive(Clone, Copy, Debug)]
struct Control {
    /// Set by `xlb drain`, cleared by `xlb undrain`; kept in the maps as `Draining`, so it
    /// survives a daemon restart.
    drained: bool,
    /// The health checks' verdict after rise/fall.
    up: bool,
}

impl Control {
    fn state(self) -> BackendState {
        match self {
            Control { drained: true, .. } => BackendState::Draining,
            Control { up: true, .. } => BackendState::Up,
            Control { up: false, .. } => BackendState::Down,
        }
    }
}

struct Shared {
    config: Config,
    /// Locked before `dp` when both are: a state is computed and written under this lock, so
    /// a drain and a health transition cannot interleave their writes.
    control: Mutex<Vec<Vec<Control>>>,
    dp: Mutex<Dataplane>,
    probes: Mutex<Vec<Vec<Probe>>>,
    flows: AtomicU64,
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Under systemd (Type=notify) a broken $NOTIFY_SOCKET would make the start time out with
    // no hint why; say so, but serve anyway.
    let notifier = notify::Notifier::from_env()
        .unwrap_or_else(|e| {
            error!("cannot notify systemd: {e}");
            None
        })
        .map(Arc::new);
    // Bound before anything is attached, so that a taken address leaves no data path behind.
    let listen = config.admin.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the admin API to {listen} (admin.listen in the config)"))?;
    // A first start that fails half-way (say, the second interface refuses XDP) must not leave
    // the first one attached and the maps pinned with nobody managing them; a restart that
    // fails leaves the running data path alone.
    let pin_path = config.dataplane.pin_path.clone();
    let first_start = match std::fs::read_dir(&pin_path) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    let (mut dp, states) = match tokio::task::block_in_place(|| open_dataplane(&config)) {
        Ok(opened) => opened,
        Err(e) => {
            if first_start {
                match dataplane::detach(&pin_path) {
                    Ok(removed) if !removed.is_empty() => {
                        warn!(pin_path = %pin_path.display(), "start failed: detached and unpinned what it had set up")
                    }
                    Ok(_) => {}
                    Err(undo) => error!(pin_path = %pin_path.display(), "start failed, and undoing it failed too: {undo:#}"),
                }
            }
            return Err(e);
        }
    };
    let logger = dp.take_logger();
    for (iface, mode) in dp.interfaces() {
        info!(interface = %iface, xdp_mode = mode.as_str(), "data path attached");
    }
    info!(
        pin_path = %dp.pin_path().display(),
        adopted = dp.adopted,
        "{}",
        if dp.adopted { "adopted pinned maps: existing flows kept" } else { "created fresh maps" }
    );

    let probes = config.services.iter().map(|s| vec![Probe::default(); s.backends.len()]).collect();
    // A backend found draining stays drained. Its health is unknown until probed: it starts up,
    // like every backend the maps do not say is down, and the probes correct that.
    let control = states
        .iter()
        .map(|s| s.iter().map(|&st| Control { drained: st == BackendState::Draining, up: st != BackendState::Down }).collect())
        .collect();
    for (svc, states) in config.services.iter().zip(&states) {
        for (addr, _) in svc.backends.iter().zip(states).filter(|(_, st)| **st == BackendState::Draining) {
            info!(service = %svc.name, backend = %addr, "backend draining (kept from before the restart; `xlb undrain` ends it)");
        }
    }
    let shared = Arc::new(Shared {
        config,
        control: Mutex::new(control),
        dp: Mutex::new(dp),
        probes: Mutex::new(probes),
        flows: AtomicU64::new(0),
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    let (results_tx, mut results_rx) = mpsc::unbounded_channel::<health::ProbeResult>();
    let (transitions_tx, mut transitions_rx) = mpsc::unbounded_channel::<health::Transition>();
    let initial_up = states.iter().map(|s| s.iter().map(|&st| st != BackendState::Down).collect()).collect();
    let probers = health::spawn(&shared.config.services, initial_up, results_tx, transitions_tx, shutdown_rx.clone());

    let sh = shared.clone();
    tasks.spawn(async move {
        while let Some(t) = transitions_rx.recv().await {
            let svc = &sh.config.services[t.service];
            let addr = svc.backends[t.backend];
            let mut control = sh.control.lock().unwrap();
            let c = &mut control[t.service][t.backend];
            c.up = t.up;
            if c.drained {
                // The map already says draining; health only matters again after an undrain.
                let health = if t.up { "passing" } else { "failing" };
                info!(service = %svc.name, backend = %addr, "backend health checks {health}; it stays draining");
                continue;
            }
            match sh.dp.lock().unwrap().set_state(t.service, t.backend, c.state()) {
                Ok(()) if t.up => info!(service = %svc.name, backend = %addr, "backend up"),
                Ok(()) => warn!(service = %svc.name, backend = %addr, "backend down: no new connections go to it"),
                Err(e) => error!(service = %svc.name, backend = %addr, "writing backend state: {e:#}"),
            }
        }
    });
    let sh = shared.clone();
    tasks.spawn(async move {
        while let Some(r) = results_rx.recv().await {
            let mut probes = sh.probes.lock().unwrap();
            probes[r.service][r.backend] = Probe {
                healthy: Some(r.ok),
                latency_ms: Some(r.latency.as_secs_f64() * 1e3),
                error: r.error,
            };
        }
    });

    let sh = shared.clone();
    let mut stop = shutdown_rx.clone();
    tasks.spawn(async move {
        let mut ticks = Ticks::new(RECONCILE_INTERVAL);
        while ticks.next(&mut stop).await {
            let sh = sh.clone();
            let done = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let before = Counts::read(&sh.dp.lock().unwrap(), &sh.config)?;
                let table = sockdiag::tcp_sockets().context("reading the socket table (sock_diag)")?;
                let mut dp = sh.dp.lock().unwrap();
                let after = Counts::read(&dp, &sh.config)?;
                let flows = reconcile(&mut dp, &sh.config, &before, &after, &table, monotonic_ns())?;
                sh.flows.store(flows, Ordering::Relaxed);
                Ok(())
            })
            .await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!("reconciling live connection counts: {e:#}"),
                Err(e) => error!("reconcile task failed: {e}"),
            }
        }
    });

    if let Some(logger) = logger {
        let mut stop = shutdown_rx.clone();
        tasks.spawn(async move {
            // SAFETY: the logger owns its ring buffer fd and is moved into the AsyncFd, so the
            // fd stays open for as long as it is registered.
            let Ok(mut fd) = (unsafe { AsyncFd::register(logger) }) else { return };
            loop {
                tokio::select! {
                    guard = fd.readable_mut() => match guard {
                        Ok(mut guard) => {
                            guard.get_inner_mut().flush();
                            guard.clear_ready();
                        }
                        Err(_) => break,
                    },
                    _ = stop.changed() => break,
                }
            }
        });
    }

    let source: Arc<dyn StatusSource> = Arc::new(Source(shared.clone()));
    let admin_stop = shutdown_rx.clone();
    tasks.spawn(async move {
        if let Err(e) = admin::serve(listener, source, admin_stop).await {
            error!("admin API: {e:#}");
        }
    });
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    info!(admin = %listen, "xlb ready");
    if let Some(notifier) = &notifier {
        let services: Vec<&str> = shared.config.services.iter().map(|s| s.name.as_str()).collect();
        let status = format!(
            "balancing {} on {}; admin API on {listen}",
            services.join(", "),
            shared.config.dataplane.interfaces.join(", ")
        );
        if let Err(e) = notifier.notify(&format!("READY=1\nSTATUS={status}")) {
            error!("{e}");
        }
    }
    if let (Some(notifier), Some(timeout)) = (&notifier, notify::watchdog_timeout()) {
        info!(timeout = ?timeout, "sending systemd watchdog keep-alives every {:?}", timeout / 2);
        tasks.spawn(watchdog(shared.clone(), notifier.clone(), timeout / 2, shutdown_rx.clone()));
    }

    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM received"),
        _ = sigint.recv() => info!("SIGINT received"),
    }
    if let Some(notifier) = &notifier
        && let Err(e) = notifier.notify("STOPPING=1\nSTATUS=stopping; the data path stays attached")
    {
        warn!("{e}");
    }
    let _ = shutdown_tx.send(true);
    for p in probers {
        p.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(6), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    info!(
        pin_path = %shared.config.dataplane.pin_path.display(),
        "stopped; the data path stays attached and keeps forwarding (`xlb detach` removes it)"
    );
    Ok(())
}

/// Sends systemd's watchdog keep-alive every `period` (half of `WatchdogSec=`) for as long as
/// the daemon works: each one waits for the runtime to schedule it and for the data-plane lock,
/// so a hung runtime or a lock that is never released stops the keep-alives and systemd
/// restarts the daemon (`Restart=on-failure`), which leaves the data path as it is.
async fn watchdog(sh: Arc<Shared>, notifier: Arc<notify::Notifier>, period: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticks = Ticks::new(period);
    while ticks.next(&mut stop).await {
        let sh = sh.clone();
        // A poisoned lock means a task panicked while holding it: nothing will write the maps
        // again, so no keep-alive either.
        let usable = tokio::task::spawn_blocking(move || sh.dp.lock().is_ok()).await.unwrap_or(false);
        if !usable {
            error!("the data-plane lock is poisoned; stopping watchdog keep-alives so that systemd restarts xlb");
            break;
        }
        if let Err(e) = notifier.notify("WATCHDOG=1") {
            warn!("{e}");
        }
    }
}

/// Loads or adopts the data path and writes the services into it, with the backend states it
/// wrote.
fn open_dataplane(config: &Config) -> anyhow::Result<(Dataplane, Vec<Vec<BackendState>>)> {
    let mut dp = Dataplane::open(&config.dataplane)?;
    // Restore each backend's state from the maps when adopting, so a restart neither floods a
    // backend that was down nor pauses one that was up. New backends start up, as in nginx,
    // and the first probes correct that within `fall` intervals.
    let states: Vec<Vec<BackendState>> = dp
        .current_states(&config.services)
        .into_iter()
        .map(|svc| svc.into_iter().map(|s| s.unwrap_or(BackendState::Up)).collect())
        .collect();
    dp.apply_services(&config.services, &states)?;
    Ok((dp, states))
}

/// A periodic task's clock: a tick every `period` (late ticks delay the next ones rather than
/// bunching up) until the shutdown signal.
struct Ticks(tokio::time::Interval);

impl Ticks {
    fn new(period: Duration) -> Ticks {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticks(interval)
    }

    /// Waits for the next tick; false once `stop` fires (or its sender is gone).
    async fn next(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            _ = self.0.tick() => true,
            _ = stop.changed() => false,
        }
    }
}

fn monotonic_ns() -> u64 {
    // bpf_ktime_get_ns() is CLOCK_MONOTONIC.
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The data path's counts of every backend at one instant: read just before and just after
/// the socket table.
struct Counts {
    /// CLOCK_MONOTONIC just before the counts were read: flows created later are not in them.
    at_ns: u64,
    /// Slot → (live, total).
    conns: HashMap<u32, (i64, u64)>,
}

impl Counts {
    fn read(dp: &Dataplane, config: &Config) -> anyhow::Result<Counts> {
        let at_ns = monotonic_ns();
        let mut conns = HashMap::new();
        for (s, svc) in config.services.iter().enumerate() {
            for b in 0..svc.backends.len() {
                conns.insert(dataplane::slot(s, b), (dp.conns(s, b)?.live, dp.total(s, b)?));
            }
        }
        Ok(Counts { at_ns, conns })
    }

    fn get(&self, slot: u32) -> (i64, u64) {
        self.conns.get(&slot).copied().unwrap_or_default()
    }
}

/// Corrects every backend's live count towards the number of its tracked flows whose socket
/// the kernel holds established or half-open, and forgets flows whose socket is gone (lost
/// FINs, killed clients, RSTs the data path never saw, SYNs that never became a connection).
/// Flows whose socket is winding down (FIN_WAIT, CLOSE_WAIT, LAST_ACK, …) are kept while it
/// does, because their last packets still need rewriting; TIME-WAIT counts as gone (see
/// `sockdiag::tcp_sockets`). Returns the number of flows still tracked.
///
/// The data path keeps counting while we read, and reading the socket table and the flows
/// takes tens of milliseconds with many flows, so the count is never overwritten with what was
/// seen; that froze every short connection that came and went during the reading into the
/// count until the next reconcile, which kept idle backends out of rotation under a steady
/// stream of connections. Instead the count's error at `before` is estimated from the flows
/// that existed then, and the current count is shifted by it. The estimate can only be low,
/// by at most the connections closed while the socket table was read (between `before` and
/// `after`): such a flow was counted at `before` but may be gone from the table. So only the
/// part of the correction that holds whatever those connections were is applied; when nothing
/// moves, that is all of it.
fn reconcile(
    dp: &mut Dataplane,
    config: &Config,
    before: &Counts,
    after: &Counts,
    table: &SocketTable,
    now_ns: u64,
) -> anyhow::Result<u64> {
    let mut live: HashMap<u32, i64> = HashMap::new();
    let mut tracked = 0;
    for (rev, nat, flow) in dp.flows()? {
        let backend = dataplane::sock_addr(&rev.src_addr, rev.src_port, rev.family);
        let client = dataplane::sock_addr(&rev.dst_addr, rev.dst_port, rev.family);
        // Flows opened after `before` are not in its counts, whatever their socket says.
        let existed = flow.is_none_or(|f| f.created_ns <= before.at_ns);
        match table.get(&(backend, client)) {
            Some(&state) => {
                tracked += 1;
                if existed && sockdiag::is_live(state) {
                    *live.entry(nat.backend).or_default() += 1;
                }
            }
            None => {
                let age = flow.map_or(u64::MAX, |f| now_ns.saturating_sub(f.created_ns));
                if age > NO_SOCKET_GRACE_NS && dp.remove_flow(&rev, &nat, flow.as_ref()) {
                    // Forgotten. (Not removed: the 4-tuple carries a new connection now, which
                    // the next reconcile judges on its own.)
                } else {
                    tracked += 1;
                    // Too young to judge: count it as the data path does.
                    if existed && flow.is_some_and(|f| f.closed == lb_common::flow::FLOW_OPEN) {
                        *live.entry(nat.backend).or_default() += 1;
                    }
                }
            }
        }
    }
    for (s, svc) in config.services.iter().enumerate() {
        for b in 0..svc.backends.len() {
            let slot = dataplane::slot(s, b);
            let ((live_before, total_before), (live_after, total_after)) = (before.get(slot), after.get(slot));
            let opened = total_after.wrapping_sub(total_before) as i64;
            let closed_meanwhile = (opened - (live_after - live_before)).max(0);
            let low = live.get(&slot).copied().unwrap_or(0) - live_before;
            let high = low + closed_meanwhile;
            let correction = if low > 0 {
                low
            } else if high < 0 {
                high
            } else {
                0
            };
            // Nothing is written without a correction: a write can lose a change the data path
            // makes between our read and it.
            if correction != 0 {
                let now = dp.conns(s, b)?.live;
                dp.set_live(slot, now + correction)?;
            }
        }
    }
    Ok(tracked)
}

struct Source(Arc<Shared>);

impl StatusSource for Source {
    fn status(&self) -> anyhow::Result<Status> {
        let Shared { config, control: _, dp, probes, flows } = &*self.0;
        let dp = dp.lock().unwrap();
        let probes = probes.lock().unwrap().clone();
        let states = dp.current_states(&config.services);
        let mut services = Vec::new();
        for (s, svc) in config.services.iter().enumerate() {
            let mut backends = Vec::new();
            for (b, addr) in svc.backends.iter().enumerate() {
                let conns = dp.conns(s, b)?;
                let probe = &probes[s][b];
                backends.push(BackendStatus {
                    address: addr.to_string(),
                    state: states[s][b].unwrap_or(BackendState::Down),
                    live_connections: conns.live.max(0) as u64,
                    total_connections: dp.total(s, b)?,
                    healthy: probe.healthy,
                    last_probe_ms: probe.latency_ms,
                    last_error: probe.error.clone(),
                });
            }
            services.push(ServiceStatus {
                name: svc.name.clone(),
                listen: svc.listen.to_string(),
                mode: "l4".into(),
                backends,
            });
        }
        Ok(Status {
            services,
            dataplane: DataplaneStatus {
                interfaces: dp
                    .interfaces()
                    .iter()
                    .map(|(name, mode)| InterfaceStatus { name: name.clone(), xdp_mode: mode.as_str().into() })
                    .collect(),
                pin_path: dp.pin_path().display().to_string(),
                flows: flows.load(Ordering::Relaxed),
                max_flows: u64::from(dp.max_flows()),
                counters: dp.counters()?,
            },
        })
    }

    fn set_drained(&self, service: &str, backend: SocketAddr, drained: bool) -> Result<DrainResult, ControlError> {
        let sh = &*self.0;
        let services = &sh.config.services;
        let s = services.iter().position(|s| s.name == service).ok_or_else(|| ControlError::UnknownService {
            name: service.into(),
            known: services.iter().map(|s| s.name.clone()).collect(),
        })?;
        let svc = &services[s];
        let b = svc.backends.iter().position(|&a| a == backend).ok_or_else(|| ControlError::UnknownBackend {
            service: service.into(),
            backend,
            known: svc.backends.iter().map(ToString::to_string).collect(),
        })?;
        let mut control = sh.control.lock().unwrap();
        let c = &mut control[s][b];
        let before = c.drained;
        c.drained = drained;
        let state = c.state();
        let mut dp = sh.dp.lock().unwrap();
        // Written even when nothing changed: the request then also repairs a map that says
        // otherwise. It is one array update: the next SYN already sees it.
        if let Err(e) = dp.set_state(s, b, state) {
            c.drained = before;
            return Err(e.context("writing the backend state").into());
        }
        let live = dp.conns(s, b).map(|c| c.live.max(0) as u64).unwrap_or_default();
        drop(dp);
        drop(control);
        let changed = before != drained;
        match (drained, changed) {
            (true, true) => info!(service, backend = %backend, live, "backend draining: no new connections go to it; open ones continue"),
            (false, true) => info!(service, backend = %backend, state = ?state, "backend undrained"),
            _ => {}
        }
        let healthy = sh.probes.lock().unwrap()[s][b].healthy;
        Ok(DrainResult {
            service: service.into(),
            backend: backend.to_string(),
            drained,
            changed,
            state,
            healthy,
            live_connections: live,
        })
    }
}

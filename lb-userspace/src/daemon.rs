//! `xlb run`: owns the data plane, keeps its backend states and live counts true, and serves
//! the admin API. Stopping the daemon leaves the data path running (see `dataplane`).

use std::{
    collections::HashMap,
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
    admin::{self, StatusSource},
    config::Config,
    dataplane::{self, Dataplane},
    health,
    sockdiag::{self, SocketTable},
    status::{BackendState, BackendStatus, DataplaneStatus, InterfaceStatus, ServiceStatus, Status},
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

struct Shared {
    config: Config,
    dp: Mutex<Dataplane>,
    probes: Mutex<Vec<Vec<Probe>>>,
    flows: AtomicU64,
}

pub async fn run(config: Config) -> anyhow::Result<()> {
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
    let shared = Arc::new(Shared { config, dp: Mutex::new(dp), probes: Mutex::new(probes), flows: AtomicU64::new(0) });
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
            let state = if t.up { BackendState::Up } else { BackendState::Down };
            match sh.dp.lock().unwrap().set_state(t.service, t.backend, state) {
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
        let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
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
    info!(admin = %listen, "xlb ready");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM received"),
        _ = sigint.recv() => info!("SIGINT received"),
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
/// Flows whose socket is winding down (FIN_WAIT, TIME_WAIT, …) are kept until it is gone,
/// because their last packets still need rewriting. Returns the number of flows still tracked.
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
                if age > NO_SOCKET_GRACE_NS {
                    dp.remove_flow(&rev, &nat);
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
        let Shared { config, dp, probes, flows } = &*self.0;
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
}

//! `xlb run`: owns the data plane, keeps its backend states and live counts true, and serves
//! the admin API. Stopping the daemon leaves the data path running (see `dataplane`).
//!
//! A backend's state in the data path comes from two inputs kept apart: the operator's drain
//! flag (`xlb drain`) and the health checks' verdict. Drained wins; otherwise health decides
//! between up and down. So a health transition never undrains a backend, and an undrain puts
//! back whatever health says now.
//!
//! A reload (`SIGHUP`, `xlb reload`) reads the config file again and applies it whole, or not
//! at all: services and backends that stay keep their slots (`layout`), so their flows and
//! counts are untouched; new ones take free slots; removed backends are drained and their slots
//! cleared once no flow refers to them.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::{Notify, mpsc, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    admin::{self, ControlError, StatusSource},
    acme,
    alert::{Alerts, Event},
    challenges::Challenges,
    config::{Config, ServiceMode, Tls},
    dataplane::{self, ConnsReader, Dataplane},
    health, https,
    layout::{Layout, Retiring},
    notify,
    sockdiag::{self, SocketTable},
    status::{
        AcmeServiceStatus, BackendState, BackendStatus, DataplaneStatus, DrainResult, InterfaceStatus, ReloadResult, RenewResult,
        ServiceStatus, Status,
    },
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
    /// Probes so far, and the latest ones that passed in a row.
    count: u64,
    passed_in_a_row: u64,
}

/// What a backend's state in the data path is decided from.
#[derive(Clone, Copy, Debug)]
struct Control {
    /// Set by `xlb drain`, cleared by `xlb undrain`; kept in the maps as `Draining`, so it
    /// survives a daemon restart.
    drained: bool,
    /// The health checks' verdict after rise/fall.
    up: bool,
    /// The data path's passive health checks took the backend out (it wrote `Failed`), and
    /// the probes have not passed `rise` times since. `up` is false meanwhile.
    failed: bool,
}

impl Control {
    fn state(self) -> BackendState {
        match self {
            Control { drained: true, .. } => BackendState::Draining,
            Control { up: true, .. } => BackendState::Up,
            Control { failed: true, .. } => BackendState::Failed,
            Control { .. } => BackendState::Down,
        }
    }
}

/// What the HTTPS proxy shares with the rest of the daemon (see `https::Backplane`). The
/// `https` and `redirect` services are fixed for the daemon's life (a reload that changes them
/// is refused), so their indices and addresses are too; the L4 slots follow reloads.
struct Backplane {
    /// `usable[service][backend]`: up and not drained, as last written to the data path.
    usable: Vec<Vec<AtomicBool>>,
    /// Requests of the HTTPS path in flight, and sent in all, per backend address.
    in_flight: HashMap<SocketAddr, (AtomicI64, AtomicU64)>,
    /// The L4 slots of each backend address: where the data path counts its connections, and
    /// where the in-flight requests are published for it. Replaced by a reload.
    l4_slots: RwLock<HashMap<SocketAddr, Vec<u32>>>,
    conns: ConnsReader,
    /// Fires when an in-flight count changes.
    changed: Notify,
    failures: mpsc::UnboundedSender<(usize, usize)>,
}

impl Backplane {
    fn new(
        config: &Config,
        layout: &Layout,
        conns: ConnsReader,
        states: &[Vec<BackendState>],
        failures: mpsc::UnboundedSender<(usize, usize)>,
    ) -> Backplane {
        let mut in_flight = HashMap::new();
        for svc in config.services.iter().filter(|s| s.mode != ServiceMode::L4) {
            for &addr in &svc.backends {
                in_flight.entry(addr).or_insert_with(Default::default);
            }
        }
        let usable = states.iter().map(|s| s.iter().map(|&st| AtomicBool::new(st == BackendState::Up)).collect()).collect();
        Backplane {
            usable,
            in_flight,
            l4_slots: RwLock::new(Self::l4_slots(config, layout)),
            conns,
            changed: Notify::new(),
            failures,
        }
    }

    fn l4_slots(config: &Config, layout: &Layout) -> HashMap<SocketAddr, Vec<u32>> {
        let mut l4_slots: HashMap<SocketAddr, Vec<u32>> = HashMap::new();
        for (s, svc) in config.services.iter().enumerate().filter(|(_, s)| s.mode == ServiceMode::L4) {
            for (b, &addr) in svc.backends.iter().enumerate() {
                l4_slots.entry(addr).or_default().push(layout.slot(s, b));
            }
        }
        l4_slots
    }

    /// After a reload: the L4 slots of the new layout (the `https` services are unchanged).
    fn relayout(&self, config: &Config, layout: &Layout) {
        *self.l4_slots.write().unwrap() = Self::l4_slots(config, layout);
        self.changed.notify_one();
    }

    fn set_state(&self, service: usize, backend: usize, state: BackendState) {
        if let Some(u) = self.usable.get(service).and_then(|s| s.get(backend)) {
            u.store(state == BackendState::Up, Ordering::Relaxed);
        }
    }

    /// Writes every address's in-flight count into the `PROXIED` entry of each L4 slot with
    /// that address.
    fn publish(&self, dp: &mut Dataplane) -> anyhow::Result<()> {
        for (addr, slots) in self.l4_slots.read().unwrap().iter() {
            let n = https::Backplane::in_flight(self, *addr);
            for &slot in slots {
                dp.set_proxied(slot, n)?;
            }
        }
        Ok(())
    }
}

impl https::Backplane for Backplane {
    fn usable(&self, service: usize, backend: usize) -> bool {
        self.usable.get(service).and_then(|s| s.get(backend)).is_some_and(|u| u.load(Ordering::Relaxed))
    }

    fn l4_live(&self, addr: SocketAddr) -> i64 {
        self.l4_slots.read().unwrap().get(&addr).map_or(0, |slots| slots.iter().map(|&s| self.conns.live(s).max(0)).sum())
    }

    fn in_flight(&self, addr: SocketAddr) -> i64 {
        self.in_flight.get(&addr).map_or(0, |(n, _)| n.load(Ordering::Relaxed).max(0))
    }

    fn add_in_flight(&self, addr: SocketAddr, delta: i64) {
        if let Some((n, total)) = self.in_flight.get(&addr) {
            n.fetch_add(delta, Ordering::Relaxed);
            if delta > 0 {
                total.fetch_add(delta as u64, Ordering::Relaxed);
            }
            if self.l4_slots.read().unwrap().contains_key(&addr) {
                self.changed.notify_one();
            }
        }
    }

    fn failed(&self, service: usize, backend: usize) {
        let _ = self.failures.send((service, backend));
    }
}

/// How long in-flight changes are gathered before they are written to the data path: one map
/// write per burst of requests rather than two per request.
const PUBLISH_DEBOUNCE: Duration = Duration::from_millis(2);

/// The certificate manager of an `https` service with `[service.tls] acme`.
struct AcmeManaged {
    handle: acme::ManagerHandle,
    domains: Vec<String>,
    challenge: acme::ChallengeKind,
}

impl AcmeManaged {
    fn status(&self) -> AcmeServiceStatus {
        AcmeServiceStatus::new(self.domains.clone(), self.challenge, &self.handle.status())
    }
}

/// How often the ACME managers' outcomes are looked at for alerts.
const ACME_ALERT_POLL: Duration = Duration::from_secs(1);

/// The running config and where its backends sit in the maps; a reload replaces it whole.
struct Current {
    config: Config,
    layout: Layout,
    /// Counts reloads: health reports from the probers of an earlier config are dropped.
    generation: u64,
    /// Tells a backend's prober that the data path failed it (see `passive_tick`).
    passive_failed: health::PassiveFailed,
}

/// Locks are taken in the order of the fields (`reloading`, `control`, `dp`, `retiring`,
/// `probes`, then `current`, only ever held to clone it). A reload replaces `current`,
/// `control` and `probes` while holding all of them, so whoever holds one of those sees them
/// agree.
struct Shared {
    /// Held for the whole of a reload: one at a time.
    reloading: Mutex<()>,
    /// Locked before `dp` when both are: a state is computed and written under this lock, so
    /// a drain and a health transition cannot interleave their writes.
    control: Mutex<Vec<Vec<Control>>>,
    dp: Mutex<Dataplane>,
    /// Slots of backends that left the config: drained, and cleared by the reconcile once no
    /// flow refers to them.
    retiring: Mutex<Vec<Retiring>>,
    probes: Mutex<Vec<Vec<Probe>>>,
    current: Mutex<Arc<Current>>,
    flows: AtomicU64,
    backplane: Arc<Backplane>,
    /// Per service: the HTTPS counters (`None` for L4 services). Fixed for the daemon's life,
    /// like the `https` and `redirect` services.
    https_stats: Vec<Option<Arc<https::Stats>>>,
    /// Certificate reloads of the `https` services (SIGHUP and `xlb reload` fire it).
    certificates: Arc<Notify>,
    /// Per service: its ACME certificate manager, if it has one. Fixed for the daemon's life
    /// like `https_stats`; dropping one stops it.
    acme: Vec<Option<AcmeManaged>>,
    /// The health probers of the current config and the tasks reading their reports.
    probers: Mutex<Vec<JoinHandle<()>>>,
    runtime: tokio::runtime::Handle,
    shutdown: watch::Receiver<bool>,
    alerts: Alerts,
}

impl Shared {
    fn current(&self) -> Arc<Current> {
        self.current.lock().unwrap().clone()
    }
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
    // A socket systemd passed for it (xlb.socket) is used as is; else it is bound here.
    let listener = match crate::listeners::take(listen) {
        Some(inherited) => {
            info!(admin = %listen, "admin API on the socket passed by systemd");
            tokio::net::TcpListener::from_std(inherited).context("using the admin API socket passed by systemd")?
        }
        None => tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the admin API to {listen} (admin.listen in the config)"))?,
    };
    // The HTTPS and redirect listeners and their certificates too (or the sockets systemd
    // holds for them, so that a restart refuses no connection).
    let challenges = Challenges::new();
    let mut https_stats: Vec<Option<Arc<https::Stats>>> = Vec::new();
    let mut acme_managers: Vec<Option<AcmeManaged>> = Vec::new();
    let mut https_listeners = Vec::new();
    let mut watchers = Vec::new();
    for (s, svc) in config.services.iter().enumerate() {
        acme_managers.push(None);
        if svc.mode == ServiceMode::L4 {
            https_stats.push(None);
            continue;
        }
        let stats = Arc::new(https::Stats::default());
        https_stats.push(Some(stats.clone()));
        let std_listener = match crate::listeners::take(svc.listen) {
            Some(inherited) => {
                info!(service = %svc.name, listen = %svc.listen, "listening on the socket passed by systemd");
                inherited
            }
            None => https::bind(svc.listen).with_context(|| {
                format!("service \"{}\": listening on {} (its listen address; is another server using it?)", svc.name, svc.listen)
            })?,
        };
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let acceptor = match svc.https.as_ref().map(|h| &h.tls) {
            Some(Tls::Files(files)) => {
                let certs = files
                    .iter()
                    .map(https::tls::load_pair)
                    .collect::<anyhow::Result<Vec<_>>>()
                    .with_context(|| format!("service \"{}\": loading its certificates ([service.tls])", svc.name))?;
                let resolver = https::tls::Resolver::new(certs, challenges.clone(), stats.clone());
                watchers.push((svc.name.clone(), files.clone(), resolver.clone()));
                Some(tokio_rustls::TlsAcceptor::from(https::tls::server_config(resolver)?))
            }
            Some(Tls::Acme(a)) => {
                // Until the certificate manager has issued one, only TLS-ALPN-01 validations
                // get a handshake.
                let resolver = https::tls::Resolver::new(Vec::new(), challenges.clone(), stats.clone());
                let mut settings = acme::AcmeSettings::new(&svc.name, &a.directory, a.domains.clone(), &config.acme.state_dir);
                settings.contact = a.contact.clone();
                settings.ca = a.ca.clone();
                settings.renew_before = a.renew_before;
                settings.challenge = a.challenge;
                // Each new certificate is swapped in for the next handshakes; connections
                // already open keep the one they started with. The certificate expiry in the
                // status and metrics follows, as for files.
                let (target, name) = (resolver.clone(), svc.name.clone());
                let on_cert: acme::OnCert = Arc::new(move |key, _chain| match https::tls::describe(&key.cert[0]) {
                    Ok((names, not_after)) => target.set(vec![https::tls::Loaded { key, names, not_after }]),
                    Err(e) => error!(service = %name, "acme: cannot serve the new certificate: {e:#}"),
                });
                // A stored certificate is served from here on; ordering one (when there is none,
                // or it is due) starts in the background and needs the listeners, which accept
                // from below on (the CA's connections wait in their backlog until then).
                let handle = acme::Manager::spawn(settings, challenges.clone(), on_cert).with_context(|| {
                    format!("service \"{}\": starting its ACME certificate manager ([service.tls] acme)", svc.name)
                })?;
                acme_managers[s] = Some(AcmeManaged { handle, domains: a.domains.clone(), challenge: a.challenge });
                Some(tokio_rustls::TlsAcceptor::from(https::tls::server_config(resolver)?))
            }
            None => None,
        };
        https_listeners.push((s, listener, acceptor));
    }
    // A first start that fails half-way (say, the second interface refuses XDP) must not leave
    // the first one attached and the maps pinned with nobody managing them; a restart that
    // fails leaves the running data path alone.
    let pin_path = config.dataplane.pin_path.clone();
    let first_start = match std::fs::read_dir(&pin_path) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    let (mut dp, layout, states) = match tokio::task::block_in_place(|| open_dataplane(&config)) {
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
        .map(|s| {
            s.iter()
                .map(|&st| Control {
                    drained: st == BackendState::Draining,
                    up: !matches!(st, BackendState::Down | BackendState::Failed),
                    failed: st == BackendState::Failed,
                })
                .collect()
        })
        .collect();
    for (svc, states) in config.services.iter().zip(&states) {
        for (addr, _) in svc.backends.iter().zip(states).filter(|(_, st)| **st == BackendState::Draining) {
            info!(service = %svc.name, backend = %addr, "backend draining (kept from before the restart; `xlb undrain` ends it)");
        }
    }
    for r in &layout.retiring {
        info!(backend = %r.addr, slot = r.slot, "backend no longer in the config: draining; its slot is freed once its connections end");
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let retiring = layout.retiring.clone();
    let alerts = Alerts::start(config.alerts.clone());
    let (failures_tx, mut failures_rx) = mpsc::unbounded_channel::<(usize, usize)>();
    let backplane = Arc::new(Backplane::new(&config, &layout, dp.conns_reader()?, &states, failures_tx));
    let certificates = Arc::new(Notify::new());
    let shared = Arc::new(Shared {
        reloading: Mutex::new(()),
        control: Mutex::new(control),
        dp: Mutex::new(dp),
        retiring: Mutex::new(retiring),
        probes: Mutex::new(probes),
        current: Mutex::new(Arc::new(Current {
            passive_failed: health::PassiveFailed::new(&config.services),
            config,
            layout,
            generation: 0,
        })),
        flows: AtomicU64::new(0),
        backplane,
        https_stats,
        certificates: certificates.clone(),
        acme: acme_managers,
        probers: Mutex::new(Vec::new()),
        runtime: tokio::runtime::Handle::current(),
        shutdown: shutdown_rx.clone(),
        alerts,
    });
    let mut tasks = tokio::task::JoinSet::new();

    // A backend the data path failed must pass `rise` probes, like one that was down.
    let initial_up =
        states.iter().map(|s| s.iter().map(|&st| !matches!(st, BackendState::Down | BackendState::Failed)).collect()).collect();
    {
        // What is down already was reported by the daemon before this one: only its recovery
        // is news.
        let control = shared.control.lock().unwrap();
        let current = shared.current();
        for (s, svc) in current.config.services.iter().enumerate() {
            for (b, &addr) in svc.backends.iter().enumerate() {
                if matches!(control[s][b].state(), BackendState::Down | BackendState::Failed) {
                    let reason = "down when the daemon started".to_owned();
                    shared.alerts.known_failing(Event::BackendDown { service: svc.name.clone(), backend: addr, reason });
                }
            }
            if !control[s].iter().any(|c| c.state() == BackendState::Up) {
                shared.alerts.known_failing(Event::ServiceDown { service: svc.name.clone() });
            }
        }
    }
    start_health(&shared, &shared.current(), initial_up);

    // Passive health of the HTTPS path: `max_fails` failed requests within `fail_timeout` take
    // a backend out until its probes pass `rise` times.
    let sh = shared.clone();
    let mut stop = shutdown_rx.clone();
    tasks.spawn(async move {
        let mut recent: HashMap<(usize, usize), VecDeque<Instant>> = HashMap::new();
        loop {
            // The sender lives as long as the daemon: stop on shutdown, not on a closed channel.
            let (s, b) = tokio::select! {
                f = failures_rx.recv() => match f {
                    Some(f) => f,
                    None => return,
                },
                _ = stop.changed() => return,
            };
            let mut control = sh.control.lock().unwrap();
            let current = sh.current();
            let svc = &current.config.services[s];
            if svc.max_fails == 0 {
                continue;
            }
            let now = Instant::now();
            let fails = recent.entry((s, b)).or_default();
            fails.push_back(now);
            while fails.front().is_some_and(|&t| now.duration_since(t) > svc.fail_timeout) {
                fails.pop_front();
            }
            if fails.len() < svc.max_fails as usize {
                continue;
            }
            fails.clear();
            let addr = svc.backends[b];
            let c = &mut control[s][b];
            let was_up = c.up;
            c.up = false;
            c.failed = true;
            current.passive_failed.set(s, b);
            if c.drained || !was_up {
                continue;
            }
            let state = c.state();
            match sh.dp.lock().unwrap().set_slot_state(current.layout.slot(s, b), state) {
                Ok(()) => {
                    sh.backplane.set_state(s, b, state);
                    warn!(service = %svc.name, backend = %addr, max_fails = svc.max_fails, fail_timeout = ?svc.fail_timeout,
                        "backend failed (passive): requests to it failed; back after its probes pass");
                    alert_down(&sh, &svc.name, addr, Some("its requests failed; passive health".into()));
                    alert_service(&sh, &current, &control, s);
                }
                Err(e) => error!(service = %svc.name, backend = %addr, "writing backend state: {e:#}"),
            }
        }
    });

    // The HTTPS path's in-flight requests, published to the data path on every change (a
    // burst at a time) and every reconcile period.
    let sh = shared.clone();
    let mut stop = shutdown_rx.clone();
    tasks.spawn(async move {
        if sh.backplane.in_flight.is_empty() {
            return;
        }
        loop {
            tokio::select! {
                _ = sh.backplane.changed.notified() => tokio::time::sleep(PUBLISH_DEBOUNCE).await,
                _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
                _ = stop.changed() => return,
            }
            let sh = sh.clone();
            let done = tokio::task::spawn_blocking(move || sh.backplane.publish(&mut sh.dp.lock().unwrap())).await;
            if let Ok(Err(e)) = done {
                warn!("publishing HTTPS requests in flight to the data path: {e:#}");
            }
        }
    });

    // The HTTPS and redirect listeners.
    for (s, listener, acceptor) in https_listeners {
        let current = shared.current();
        let svc = &current.config.services[s];
        let stats = shared.https_stats[s].clone().expect("https and redirect services have stats");
        let stop = shutdown_rx.clone();
        match acceptor {
            Some(acceptor) => {
                let backplane: Arc<dyn https::Backplane> = shared.backplane.clone();
                let proxy = https::proxy::Proxy::new(s, svc, backplane, stats);
                tasks.spawn(proxy.serve(listener, acceptor, stop));
            }
            None => {
                tasks.spawn(https::redirect::serve(svc.name.clone(), listener, challenges.clone(), stats, stop));
            }
        }
        info!(service = %svc.name, listen = %svc.listen, mode = svc.mode.as_str(), "listening");
    }
    for (name, files, resolver) in watchers {
        tasks.spawn(https::tls::watch_files(name, files, resolver, certificates.clone(), shutdown_rx.clone()));
    }
    if shared.acme.iter().any(Option::is_some) {
        tasks.spawn(acme_alerts(shared.clone(), shutdown_rx.clone()));
    }

    let sh = shared.clone();
    let mut stop = shutdown_rx.clone();
    tasks.spawn(async move {
        let mut ticks = Ticks::new(RECONCILE_INTERVAL);
        while ticks.next(&mut stop).await {
            let sh = sh.clone();
            let done = tokio::task::spawn_blocking(move || -> (anyhow::Result<()>, anyhow::Result<()>) {
                let reconciled = (|| -> anyhow::Result<()> {
                    let slots = |sh: &Shared| -> Vec<u32> {
                        let current = sh.current();
                        let mut slots: Vec<u32> = current.layout.backends().map(|(_, _, slot)| slot).collect();
                        slots.extend(sh.retiring.lock().unwrap().iter().map(|r| r.slot));
                        slots
                    };
                    let before = {
                        let dp = sh.dp.lock().unwrap();
                        Counts::read(&dp, &slots(&sh))?
                    };
                    let table = sockdiag::tcp_sockets().context("reading the socket table (sock_diag)")?;
                    let mut dp = sh.dp.lock().unwrap();
                    let after = Counts::read(&dp, &slots(&sh))?;
                    let (flows, per_slot) = reconcile(&mut dp, &before, &after, &table, monotonic_ns())?;
                    sh.flows.store(flows, Ordering::Relaxed);
                    // A removed backend's slot is freed once no tracked flow refers to it: the data
                    // path would otherwise count that flow's close against the slot's next owner.
                    let mut retiring = sh.retiring.lock().unwrap();
                    let mut kept = Vec::with_capacity(retiring.len());
                    for r in retiring.drain(..) {
                        if per_slot.get(&r.slot).copied().unwrap_or(0) > 0 {
                            kept.push(r);
                            continue;
                        }
                        match dp.clear_slot(r.slot) {
                            Ok(()) => info!(backend = %r.addr, slot = r.slot, "removed backend has no connections left; its slot is free"),
                            Err(e) => {
                                warn!(backend = %r.addr, slot = r.slot, "clearing the slot of a removed backend: {e:#}");
                                kept.push(r);
                            }
                        }
                    }
                    *retiring = kept;
                    Ok(())
                })();
                // Whatever became of the reconcile: a failed backend must be noticed.
                (reconciled, passive_tick(&sh))
            })
            .await;
            match done {
                Ok((reconciled, passive)) => {
                    if let Err(e) = reconciled {
                        warn!("reconciling live connection counts: {e:#}");
                    }
                    if let Err(e) = passive {
                        warn!("reading passive health failures: {e:#}");
                    }
                }
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
    for socket in crate::listeners::untaken() {
        warn!("systemd passed a socket for {socket} that no listener of the config uses; its clients wait unanswered — remove it from xlb.socket or configure a listener on it");
    }
    if let Some(notifier) = &notifier {
        let current = shared.current();
        let services: Vec<&str> = current.config.services.iter().map(|s| s.name.as_str()).collect();
        let status = format!(
            "balancing {} on {}; admin API on {listen}",
            services.join(", "),
            current.config.dataplane.interfaces.join(", ")
        );
        if let Err(e) = notifier.notify(&format!("READY=1\nSTATUS={status}")) {
            error!("{e}");
        }
    }
    if let (Some(notifier), Some(timeout)) = (&notifier, notify::watchdog_timeout()) {
        info!(timeout = ?timeout, "sending systemd watchdog keep-alives every {:?}", timeout / 2);
        tasks.spawn(watchdog(shared.clone(), notifier.clone(), timeout / 2, shutdown_rx.clone()));
    }

    let mut sighup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM received"); break }
            _ = sigint.recv() => { info!("SIGINT received"); break }
            _ = sighup.recv() => {
                info!("SIGHUP received: reloading the config and the certificates");
                shared.certificates.notify_waiters();
                let sh = shared.clone();
                // The outcome is logged by `reload` itself.
                let _ = tokio::task::spawn_blocking(move || reload(&sh)).await;
            }
        }
    }
    if let Some(notifier) = &notifier
        && let Err(e) = notifier.notify("STOPPING=1\nSTATUS=stopping; the data path stays attached")
    {
        warn!("{e}");
    }
    let _ = shutdown_tx.send(true);
    for p in shared.probers.lock().unwrap().drain(..) {
        p.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(6), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    info!(
        pin_path = %shared.current().config.dataplane.pin_path.display(),
        "stopped; the data path stays attached and keeps forwarding (`xlb detach` removes it)"
    );
    Ok(())
}

/// Alerts on the ACME managers' outcomes: each failed attempt reports the certificate failing
/// (the alerts task sends only the first of a run), each success its recovery (sent only after
/// a failure).
async fn acme_alerts(sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut seen: Vec<u64> = vec![0; sh.acme.len()];
    let mut ticks = Ticks::new(ACME_ALERT_POLL);
    while ticks.next(&mut stop).await {
        for (m, seen) in sh.acme.iter().zip(&mut seen) {
            let Some(m) = m else { continue };
            let status = m.handle.status();
            if status.attempts == *seen {
                continue;
            }
            *seen = status.attempts;
            let domain = m.domains.join(", ");
            match status.last_error {
                Some(error) if status.failures > 0 => sh.alerts.notify(Event::CertificateRenewalFailed { domain, error }),
                _ => sh.alerts.notify(Event::CertificateRenewed { domain }),
            }
        }
    }
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

/// Loads or adopts the data path and writes the services into it: where (every backend found
/// in the maps keeps its slot) and with which backend states.
fn open_dataplane(config: &Config) -> anyhow::Result<(Dataplane, Layout, Vec<Vec<BackendState>>)> {
    let mut dp = Dataplane::open(&config.dataplane)?;
    let layout = Layout::plan(&config.services, &dp.occupancy()?).map_err(|e| anyhow::anyhow!("{}: {e}", config.path.display()))?;
    // Restore each backend's state from the maps when adopting, so a restart neither floods a
    // backend that was down nor pauses one that was up. New backends start up, as in nginx,
    // and the first probes correct that within `fall` intervals.
    let states: Vec<Vec<BackendState>> = dp
        .layout_states(&config.services, &layout)
        .into_iter()
        .map(|svc| svc.into_iter().map(|s| s.unwrap_or(BackendState::Up)).collect())
        .collect();
    dp.apply_layout(&config.services, &layout, &states)?;
    // Requests a previous daemon had in flight died with it; and a backend that is no longer
    // behind an https service must not keep what was published for it.
    for slot in 0..lb_common::backend::MAX_BACKENDS {
        dp.set_proxied(slot, 0)?;
    }
    Ok((dp, layout, states))
}

/// Takes note of backends the data path has failed (passive health: it wrote `Failed` itself,
/// see `lb_common::backend::Passive`): they count as down until their probes pass `rise`
/// times, and their prober is told so. The data path stopped choosing them already.
fn passive_tick(sh: &Shared) -> anyhow::Result<()> {
    let mut control = sh.control.lock().unwrap();
    let mut dp = sh.dp.lock().unwrap();
    let current = sh.current();
    let states = dp.layout_states(&current.config.services, &current.layout);
    for (s, svc) in current.config.services.iter().enumerate() {
        for (b, addr) in svc.backends.iter().enumerate() {
            if states[s][b] != Some(BackendState::Failed) || control[s][b].failed {
                continue;
            }
            let slot = current.layout.slot(s, b);
            let c = &mut control[s][b];
            c.failed = true;
            c.up = false;
            current.passive_failed.set(s, b);
            // Only an up backend can be failed; a drain that raced the data path's write wins.
            if c.drained {
                dp.set_slot_state(slot, c.state()).context("writing the backend state")?;
            }
            sh.backplane.set_state(s, b, c.state());
            let p = dp.slot_passive(slot)?;
            warn!(
                service = %svc.name,
                backend = %addr,
                refused = p.refused,
                unanswered = p.unanswered,
                "backend failed (passive): {} failed connection(s) within {}; no new connections go to it until its health checks pass {} time(s)",
                svc.max_fails,
                humantime::format_duration(svc.fail_timeout),
                svc.health.rise,
            );
            alert_down(sh, &svc.name, *addr, Some(format!("{} connection(s) refused or unanswered", p.refused + p.unanswered)));
            alert_service(sh, &current, &control, s);
        }
    }
    Ok(())
}

/// Starts probing the backends of `current` (starting from `initial_up`), and the two tasks
/// that act on the probes' reports. They stop when the daemon does, or when a reload aborts
/// them; a report that arrives after a reload is dropped (`generation`).
fn start_health(sh: &Arc<Shared>, current: &Current, initial_up: Vec<Vec<bool>>) {
    let generation = current.generation;
    let (results_tx, mut results_rx) = mpsc::unbounded_channel::<health::ProbeResult>();
    let (transitions_tx, mut transitions_rx) = mpsc::unbounded_channel::<health::Transition>();
    let _guard = sh.runtime.enter();
    let mut tasks = health::spawn_with_passive(
        &current.config.services,
        initial_up,
        &current.passive_failed,
        results_tx,
        transitions_tx,
        sh.shutdown.clone(),
    );
    let s = sh.clone();
    tasks.push(sh.runtime.spawn(async move {
        while let Some(t) = transitions_rx.recv().await {
            let sh = &s;
            let mut control = sh.control.lock().unwrap();
            let current = sh.current();
            if current.generation != generation {
                continue;
            }
            let svc = &current.config.services[t.service];
            let addr = svc.backends[t.backend];
            let c = &mut control[t.service][t.backend];
            let was_failed = c.failed;
            c.up = t.up;
            c.failed = false;
            if t.up {
                // Sent only if its going down was (see `alert`).
                sh.alerts.notify(Event::BackendUp { service: svc.name.clone(), backend: addr });
            }
            if c.drained {
                // The map already says draining; health only matters again after an undrain.
                // An operator works on a drained backend (`xlb rollout` restarts it): no alert.
                let health = if t.up { "passing" } else { "failing" };
                info!(service = %svc.name, backend = %addr, "backend health checks {health}; it stays draining");
                alert_service(sh, &current, &control, t.service);
                continue;
            }
            let slot = current.layout.slot(t.service, t.backend);
            let mut dp = sh.dp.lock().unwrap();
            // Back up: an empty failure window, and the slow-start ramp from now.
            let written = if t.up { dp.restart_passive(slot, monotonic_ns()) } else { Ok(()) };
            let written = written.and_then(|()| dp.set_slot_state(slot, c.state()));
            drop(dp);
            if written.is_ok() {
                sh.backplane.set_state(t.service, t.backend, c.state());
            }
            match written {
                Ok(()) if t.up && was_failed => {
                    info!(service = %svc.name, backend = %addr, "backend up: health checks pass again after the passive failure")
                }
                Ok(()) if t.up => info!(service = %svc.name, backend = %addr, "backend up"),
                Ok(()) => warn!(service = %svc.name, backend = %addr, "backend down: no new connections go to it"),
                Err(e) => error!(service = %svc.name, backend = %addr, "writing backend state: {e:#}"),
            }
            if !t.up {
                let reason = sh.probes.lock().unwrap()[t.service][t.backend].error.clone();
                alert_down(sh, &svc.name, addr, reason);
            }
            alert_service(sh, &current, &control, t.service);
        }
    }));
    let s = sh.clone();
    tasks.push(sh.runtime.spawn(async move {
        while let Some(r) = results_rx.recv().await {
            let mut probes = s.probes.lock().unwrap();
            if s.current().generation != generation {
                continue;
            }
            let probe = &mut probes[r.service][r.backend];
            *probe = Probe {
                healthy: Some(r.ok),
                latency_ms: Some(r.latency.as_secs_f64() * 1e3),
                error: r.error,
                count: probe.count + 1,
                passed_in_a_row: if r.ok { probe.passed_in_a_row + 1 } else { 0 },
            };
        }
    }));
    *sh.probers.lock().unwrap() = tasks;
}

fn alert_down(sh: &Shared, service: &str, backend: SocketAddr, last_error: Option<String>) {
    let reason = match last_error {
        Some(e) => format!("last probe: {e}"),
        None => "its health checks fail".into(),
    };
    sh.alerts.notify(Event::BackendDown { service: service.to_owned(), backend, reason });
}

/// Reports a service down while none of its backends is up (each down or drained), and up again
/// once one is; the alerts task sends only changes.
fn alert_service(sh: &Shared, current: &Current, control: &[Vec<Control>], service: usize) {
    let name = current.config.services[service].name.clone();
    if control[service].iter().any(|c| c.state() == BackendState::Up) {
        sh.alerts.notify(Event::ServiceUp { service: name });
    } else {
        sh.alerts.notify(Event::ServiceDown { service: name });
    }
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config is not valid, or cannot be applied while running.
    #[error("{0}")]
    Rejected(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Reads the config file again and applies it: all of it, or (when it is invalid, or asks for
/// something only a restart can do) nothing, with the reason. Logs the outcome either way.
fn reload(sh: &Arc<Shared>) -> Result<ReloadResult, ReloadError> {
    let result = try_reload(sh);
    match &result {
        Ok(r) if r.changes.is_empty() => info!(config = %r.config, "config reloaded: nothing changed"),
        Ok(r) => info!(config = %r.config, "config reloaded: {}", r.changes.join("; ")),
        Err(e) => error!("reload refused, the running config stays in force: {e}"),
    }
    result
}

fn try_reload(sh: &Arc<Shared>) -> Result<ReloadResult, ReloadError> {
    let _one_at_a_time = sh.reloading.lock().unwrap();
    let old = sh.current();
    let path = old.config.path.clone();
    let new = Config::load(&path).map_err(|e| ReloadError::Rejected(e.to_string()))?;
    let restart = |what: &str| {
        ReloadError::Rejected(format!(
            "{}: {what} changed; that takes a restart of the daemon (`systemctl restart xlb`, which keeps \
             connections), not a reload",
            path.display()
        ))
    };
    if new.dataplane != old.config.dataplane {
        return Err(restart("[dataplane]"));
    }
    if new.admin != old.config.admin {
        return Err(restart("admin.listen"));
    }
    if new.acme != old.config.acme {
        return Err(restart("[acme]"));
    }
    // The proxy and its listeners are set up once: an `https` or `redirect` service that is
    // added, removed, moved in the file or changed takes a restart (the listening sockets are
    // handed over through xlb.socket, so it refuses no connection). Certificates reload anyway.
    let proxied = |c: &Config| -> Vec<(usize, crate::config::Service)> {
        c.services.iter().cloned().enumerate().filter(|(_, s)| s.mode != ServiceMode::L4).collect()
    };
    if proxied(&new) != proxied(&old.config) {
        return Err(restart("an https or redirect service (or its position in the file)"));
    }
    sh.certificates.notify_waiters();
    let changes = describe_changes(&old.config, &new);
    if changes.is_empty() {
        return Ok(ReloadResult { config: path.display().to_string(), changes });
    }
    let mut control = sh.control.lock().unwrap();
    let mut dp = sh.dp.lock().unwrap();
    let layout = Layout::plan(&new.services, &dp.occupancy()?).map_err(|e| ReloadError::Rejected(format!("{}: {e}", path.display())))?;
    // A backend that stays (same VIP, same address) keeps its drain flag, health verdict and
    // last probe; a new one starts up, as at start.
    let find = |vip: SocketAddr, addr: SocketAddr| {
        old.config.services.iter().enumerate().find(|(_, s)| s.listen == vip).and_then(|(s, svc)| Some((s, svc.backends.iter().position(|&a| a == addr)?)))
    };
    let new_control: Vec<Vec<Control>> = new
        .services
        .iter()
        .map(|svc| {
            svc.backends
                .iter()
                .map(|&addr| find(svc.listen, addr).map_or(Control { drained: false, up: true, failed: false }, |(s, b)| control[s][b]))
                .collect()
        })
        .collect();
    let states: Vec<Vec<BackendState>> = new_control.iter().map(|s| s.iter().map(|c| c.state()).collect()).collect();
    if let Err(e) = dp.apply_layout(&new.services, &layout, &states) {
        // Put back what the running config says, so that the maps match it again.
        let old_states: Vec<Vec<BackendState>> = control.iter().map(|s| s.iter().map(|c| c.state()).collect()).collect();
        if let Err(undo) = dp.apply_layout(&old.config.services, &old.layout, &old_states) {
            error!("restoring the running config in the maps after a failed reload: {undo:#}");
        }
        return Err(ReloadError::Failed(e.context("writing the new config into the maps")));
    }
    let mut retiring = sh.retiring.lock().unwrap();
    for r in layout.retiring.iter().filter(|r| !retiring.contains(r)) {
        let live = dp.slot_conns(r.slot).map(|c| c.live.max(0)).unwrap_or(0);
        info!(backend = %r.addr, live, "backend removed from the config: draining; its open connections continue, and its slot is freed once they end");
    }
    *retiring = layout.retiring.clone();
    drop(retiring);
    let mut probes = sh.probes.lock().unwrap();
    let new_probes: Vec<Vec<Probe>> = new
        .services
        .iter()
        .map(|svc| svc.backends.iter().map(|&addr| find(svc.listen, addr).map_or_else(Probe::default, |(s, b)| probes[s][b].clone())).collect())
        .collect();
    let initial_up: Vec<Vec<bool>> = new_control.iter().map(|s| s.iter().map(|c| c.up).collect()).collect();
    if new.alerts != old.config.alerts {
        sh.alerts.configure(new.alerts.clone());
    }
    let current = Arc::new(Current {
        passive_failed: health::PassiveFailed::new(&new.services),
        config: new,
        layout,
        generation: old.generation + 1,
    });
    *probes = new_probes;
    *control = new_control;
    *sh.current.lock().unwrap() = current.clone();
    sh.backplane.relayout(&current.config, &current.layout);
    drop(probes);
    drop(dp);
    drop(control);
    for p in sh.probers.lock().unwrap().drain(..) {
        p.abort();
    }
    start_health(sh, &current, initial_up);
    Ok(ReloadResult { config: path.display().to_string(), changes })
}

/// What differs between two configs' services, one line each.
fn describe_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut changes = Vec::new();
    // A service is the same one when its name or, renamed, its VIP is (the maps know it by VIP).
    let same = |a: &crate::config::Service, b: &crate::config::Service| {
        a.name == b.name || (a.listen == b.listen && !new.services.iter().any(|n| n.name == a.name))
    };
    for svc in &new.services {
        let Some(before) = old.services.iter().find(|s| same(s, svc)) else {
            let n = svc.backends.len();
            changes.push(format!("service {} added ({}, {n} backend{})", svc.name, svc.listen, if n == 1 { "" } else { "s" }));
            continue;
        };
        if before.name != svc.name {
            changes.push(format!("service {} renamed to {}", before.name, svc.name));
        }
        if before.listen != svc.listen {
            changes.push(format!("service {}: listen {} -> {}", svc.name, before.listen, svc.listen));
        }
        for addr in svc.backends.iter().filter(|a| !before.backends.contains(a)) {
            changes.push(format!("service {}: backend {addr} added", svc.name));
        }
        for addr in before.backends.iter().filter(|a| !svc.backends.contains(a)) {
            changes.push(format!("service {}: backend {addr} removed (draining)", svc.name));
        }
        if before.health != svc.health {
            changes.push(format!("service {}: health checks changed", svc.name));
        }
        if before.backends != svc.backends && changes.iter().all(|c| !c.starts_with(&format!("service {}: backend", svc.name))) {
            changes.push(format!("service {}: backends reordered", svc.name));
        }
    }
    for svc in old.services.iter().filter(|s| !new.services.iter().any(|n| same(s, n))) {
        changes.push(format!("service {} removed (its backends drain)", svc.name));
    }
    if old.alerts != new.alerts {
        changes.push("[alerts] changed".into());
    }
    changes
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
    fn read(dp: &Dataplane, slots: &[u32]) -> anyhow::Result<Counts> {
        let at_ns = monotonic_ns();
        let mut conns = HashMap::new();
        for &slot in slots {
            conns.insert(slot, (dp.slot_conns(slot)?.live, dp.slot_total(slot)?));
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
/// `sockdiag::tcp_sockets`). Returns the number of flows still tracked, and per slot of
/// `before` how many of them refer to it.
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
    before: &Counts,
    after: &Counts,
    table: &SocketTable,
    now_ns: u64,
) -> anyhow::Result<(u64, HashMap<u32, u64>)> {
    let mut live: HashMap<u32, i64> = HashMap::new();
    let mut per_slot: HashMap<u32, u64> = HashMap::new();
    let mut tracked = 0;
    for (rev, nat, flow) in dp.flows()? {
        let backend = dataplane::sock_addr(&rev.src_addr, rev.src_port, rev.family);
        let client = dataplane::sock_addr(&rev.dst_addr, rev.dst_port, rev.family);
        // Flows opened after `before` are not in its counts, whatever their socket says.
        let existed = flow.is_none_or(|f| f.created_ns <= before.at_ns);
        match table.get(&(backend, client)) {
            Some(&state) => {
                tracked += 1;
                *per_slot.entry(nat.backend).or_default() += 1;
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
                    *per_slot.entry(nat.backend).or_default() += 1;
                    // Too young to judge: count it as the data path does.
                    if existed && flow.is_some_and(|f| f.closed == lb_common::flow::FLOW_OPEN) {
                        *live.entry(nat.backend).or_default() += 1;
                    }
                }
            }
        }
    }
    {
        for &slot in before.conns.keys() {
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
                let now = dp.slot_conns(slot)?.live;
                dp.set_live(slot, now + correction)?;
            }
        }
    }
    Ok((tracked, per_slot))
}

struct Source(Arc<Shared>);

impl StatusSource for Source {
    fn status(&self) -> anyhow::Result<Status> {
        let sh = &*self.0;
        // Held to the end: a reload cannot replace the config half-way through this snapshot.
        let control = sh.control.lock().unwrap();
        let dp = sh.dp.lock().unwrap();
        let probes = sh.probes.lock().unwrap().clone();
        let flows = &sh.flows;
        let current = sh.current();
        let (config, layout) = (&current.config, &current.layout);
        let states = dp.layout_states(&config.services, layout);
        let mut services = Vec::new();
        for (s, svc) in config.services.iter().enumerate() {
            let mut backends = Vec::new();
            for (b, addr) in svc.backends.iter().enumerate() {
                let slot = layout.slot(s, b);
                let passive = dp.slot_passive(slot)?;
                let probe = &probes[s][b];
                // An HTTPS backend's connections are the proxy's requests in flight to it.
                let (live, total) = match svc.mode {
                    ServiceMode::L4 => (dp.slot_conns(slot)?.live.max(0) as u64, dp.slot_total(slot)?),
                    _ => sh.backplane.in_flight.get(addr).map_or((0, 0), |(n, t)| {
                        (n.load(Ordering::Relaxed).max(0) as u64, t.load(Ordering::Relaxed))
                    }),
                };
                backends.push(BackendStatus {
                    address: addr.to_string(),
                    state: states[s][b].unwrap_or(BackendState::Down),
                    live_connections: live,
                    total_connections: total,
                    failed_connections: passive.refused + passive.unanswered,
                    healthy: probe.healthy,
                    last_probe_ms: probe.latency_ms,
                    last_error: probe.error.clone(),
                    checks_up: control[s][b].up,
                    probes: probe.count,
                    probes_passed_in_a_row: probe.passed_in_a_row,
                });
            }
            services.push(ServiceStatus {
                name: svc.name.clone(),
                listen: svc.listen.to_string(),
                mode: svc.mode.as_str().into(),
                rise: svc.health.rise,
                backends,
                https: sh.https_stats.get(s).and_then(|st| st.as_ref()).map(|st| st.snapshot()),
                acme: sh.acme.get(s).and_then(Option::as_ref).map(AcmeManaged::status),
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
                counters: {
                    let mut counters = dp.counters()?;
                    // Not a data-path counter, but the daemon's map writes for backend states.
                    counters.insert("backend_state_writes".into(), dp.state_writes());
                    counters
                },
            },
        })
    }

    fn set_drained(&self, service: &str, backend: SocketAddr, drained: bool) -> Result<DrainResult, ControlError> {
        let sh = &*self.0;
        let mut control = sh.control.lock().unwrap();
        let current = sh.current();
        let services = &current.config.services;
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
        let c = &mut control[s][b];
        let before = c.drained;
        c.drained = drained;
        let state = c.state();
        let slot = current.layout.slot(s, b);
        let mut dp = sh.dp.lock().unwrap();
        // Written even when nothing changed: the request then also repairs a map that says
        // otherwise. It is one array update: the next SYN already sees it.
        if let Err(e) = dp.set_slot_state(slot, state) {
            c.drained = before;
            return Err(e.context("writing the backend state").into());
        }
        sh.backplane.set_state(s, b, state);
        let live = dp.slot_conns(slot).map(|c| c.live.max(0) as u64).unwrap_or_default();
        drop(dp);
        if !drained && state == BackendState::Down {
            let error = sh.probes.lock().unwrap()[s][b].error.clone();
            alert_down(sh, service, backend, error);
        }
        alert_service(sh, &current, &control, s);
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

    fn renew(&self, service: &str) -> Result<RenewResult, ControlError> {
        let sh = &*self.0;
        let current = sh.current();
        let services = &current.config.services;
        let s = services.iter().position(|s| s.name == service).ok_or_else(|| ControlError::UnknownService {
            name: service.into(),
            known: services.iter().map(|s| s.name.clone()).collect(),
        })?;
        let Some(m) = sh.acme.get(s).and_then(Option::as_ref) else {
            let with: Vec<&str> =
                services.iter().zip(&sh.acme).filter(|(_, m)| m.is_some()).map(|(s, _)| s.name.as_str()).collect();
            return Err(ControlError::Rejected(format!(
                "service {service:?} does not get its certificate from ACME (no `acme` in its [service.tls]); {}",
                if with.is_empty() { "no service does".to_owned() } else { format!("these do: {}", with.join(", ")) }
            )));
        };
        // Read first: the renewal is done once `attempts` moves past this.
        let before = m.status();
        m.handle.renew_now();
        info!(service, "acme: renewal asked for through the admin API");
        Ok(RenewResult { service: service.into(), acme: before })
    }

    fn reload(&self) -> Result<ReloadResult, ControlError> {
        reload(&self.0).map_err(|e| match e {
            ReloadError::Rejected(message) => ControlError::Rejected(message),
            ReloadError::Failed(e) => ControlError::Failed(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(services: &str) -> Config {
        let text = format!("[dataplane]\ninterfaces = [\"lo\"]\n{services}");
        Config::parse(std::path::Path::new("/etc/xlb/xlb.toml"), &text).unwrap()
    }

    fn service(name: &str, listen: &str, backends: &str) -> String {
        format!("[[service]]\nname = \"{name}\"\nlisten = \"{listen}\"\nbackends = [{backends}]\n")
    }

    #[test]
    fn reload_changes_are_described() {
        let a = "\"127.0.0.1:8001\"";
        let b = "\"127.0.0.1:8002\"";
        let c = "\"127.0.0.1:8003\"";
        let old = config(&(service("web", "127.0.0.1:80", &format!("{a}, {b}")) + &service("api", "127.0.0.1:81", a)));
        assert!(describe_changes(&old, &old.clone()).is_empty());
        let new = config(
            &(service("web", "127.0.0.1:80", &format!("{b}, {c}"))
                + &service("app", "127.0.0.1:81", a)
                + &service("admin", "127.0.0.1:82", c)),
        );
        assert_eq!(
            describe_changes(&old, &new),
            [
                "service web: backend 127.0.0.1:8003 added",
                "service web: backend 127.0.0.1:8001 removed (draining)",
                "service api renamed to app",
                "service admin added (127.0.0.1:82, 1 backend)",
            ]
        );
        let reordered = config(&(service("web", "127.0.0.1:80", &format!("{b}, {a}")) + &service("api", "127.0.0.1:81", a)));
        assert_eq!(describe_changes(&old, &reordered), ["service web: backends reordered"]);
        let gone = config(&service("web", "127.0.0.1:8080", &format!("{a}, {b}")));
        assert_eq!(
            describe_changes(&old, &gone),
            ["service web: listen 127.0.0.1:80 -> 127.0.0.1:8080", "service api removed (its backends drain)"]
        );
    }
}

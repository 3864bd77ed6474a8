//! Every backend's state, in one place. `Backends` is the only writer of a backend's state in the
//! data path (`BACKENDS`), of the HTTPS proxy's view of it (`ProxyView`) and of the backend and
//! service alerts. Every source of a change goes through `Backends::apply`: the health probes'
//! verdicts, the data path's passive health (it marks a backend `Failed` itself), the HTTPS
//! proxy's failed requests, and the operator's drain. A reload builds the next `Backends` from
//! the running one (`Backends::replan`), so what a surviving backend was is carried over.
//!
//! A backend's state comes from three inputs kept apart (`Control`): the operator's drain flag,
//! the health checks' verdict after rise/fall, and whether passive health failed it. Drained
//! wins; otherwise the health verdict decides between up and down, and a passive failure shows
//! as `Failed` until the probes pass `rise` times. So a health transition never undrains a
//! backend, and an undrain puts back whatever health says now.
//!
//! Passive health has one record per backend: the data path's `PASSIVE` entry. The data path
//! counts the connections it sees fail; the proxy's failed requests are counted into the same
//! window by `Backends` (`record_failure`), with the same rule.

mod maps;
#[cfg(test)]
pub(crate) use maps::fake;
#[cfg(test)]
mod tests;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

pub use maps::{AlertSink, Maps, record_failure};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::{
    alert::Event as Alert,
    config::{Config, ServiceMode},
    health::{self, PassiveFailed},
    layout::Layout,
};

/// A backend's state as the data path and the status show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Up,
    Down,
    Draining,
    /// Taken out by passive health (`max_fails` failed connections or requests within
    /// `fail_timeout`); back up once the health probes pass `rise` times.
    Failed,
}

/// What a backend's state is decided from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Control {
    /// Set by `xlb drain`, cleared by `xlb undrain`; kept in the maps as `Draining`, so it
    /// survives a daemon restart.
    drained: bool,
    /// The health checks' verdict after rise/fall.
    up: bool,
    /// Passive health took the backend out, and the probes have not passed `rise` times
    /// since. `up` is false meanwhile.
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

    /// A backend as found in the maps at start or carried over nothing: a drained one stays
    /// drained; its health is unknown until probed, so it starts up unless the maps say it is
    /// down, and the probes correct that.
    fn from_state(state: BackendState) -> Control {
        Control {
            drained: state == BackendState::Draining,
            up: !matches!(state, BackendState::Down | BackendState::Failed),
            failed: state == BackendState::Failed,
        }
    }
}

/// The last probe of a backend, for the status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Probe {
    pub healthy: Option<bool>,
    pub latency_ms: Option<f64>,
    pub error: Option<String>,
    /// Probes so far, and the latest ones that passed in a row.
    pub count: u64,
    pub passed_in_a_row: u64,
}

struct Backend {
    addr: SocketAddr,
    slot: u32,
    control: Control,
    probe: Probe,
    /// A `BackendDown` alert was raised (or found raised at start) and its recovery not yet.
    alerted_down: bool,
}

struct Service {
    name: String,
    vip: SocketAddr,
    mode: ServiceMode,
    max_fails: u32,
    fail_timeout: Duration,
    rise: u32,
    backends: Vec<Backend>,
    /// A `ServiceDown` alert was raised and its recovery not yet.
    alerted_down: bool,
}

impl Service {
    fn any_up(&self) -> bool {
        self.backends.iter().any(|b| b.control.state() == BackendState::Up)
    }
}

/// Whether each backend of each `https` service may get new requests (up, not drained), as the
/// HTTPS proxy reads it for every request: written by `Backends` only, read without a lock.
/// Indexed `[service][backend]` of one config: a reload makes a new one with the new
/// `Backends`, and each proxy takes its service's row (`row`) with the config it serves.
#[derive(Clone)]
pub struct ProxyView(Arc<Vec<Usable>>);

/// One service's row of the `ProxyView`: indexed by its backends.
#[derive(Clone)]
pub struct Usable(Arc<[AtomicBool]>);

impl Usable {
    pub fn get(&self, backend: usize) -> bool {
        self.0.get(backend).is_some_and(|u| u.load(Ordering::Relaxed))
    }
}

impl ProxyView {
    /// `states` by `[service][backend]`: only backends of `https` services that are up may be
    /// used.
    fn new(config: &Config, states: &[Vec<BackendState>]) -> ProxyView {
        ProxyView(Arc::new(
            config
                .services
                .iter()
                .zip(states)
                .map(|(svc, st)| Usable(st.iter().map(|&st| AtomicBool::new(svc.mode != ServiceMode::L4 && st == BackendState::Up)).collect()))
                .collect(),
        ))
    }

    pub fn usable(&self, service: usize, backend: usize) -> bool {
        self.0.get(service).is_some_and(|s| s.get(backend))
    }

    /// Service `service`'s row.
    pub fn row(&self, service: usize) -> Usable {
        self.0.get(service).cloned().unwrap_or_else(|| Usable(Arc::new([])))
    }

    fn set(&self, service: usize, backend: usize, state: BackendState) {
        if let Some(u) = self.0.get(service).and_then(|s| s.0.get(backend)) {
            u.store(state == BackendState::Up, Ordering::Relaxed);
        }
    }
}

/// What a source tells `Backends`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A backend's health checks changed their verdict (after rise/fall).
    Health { generation: u64, service: usize, backend: usize, up: bool },
    /// A request of the HTTPS proxy failed at the backend (connect error or timeout, error or
    /// timeout before the response head), at `now_ns` (CLOCK_MONOTONIC).
    /// `generation` is that of the config the request was sent under.
    ProxyFailed { generation: u64, service: usize, backend: usize, now_ns: u64 },
    /// `xlb drain` (true) or `xlb undrain` (false).
    Drain { service: usize, backend: usize, drained: bool },
}

/// Why an event changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("writing the backend state: {0:#}")]
    Maps(#[from] anyhow::Error),
}

/// The outcome of a drain or undrain.
#[derive(Clone, Debug, PartialEq)]
pub struct Drained {
    pub changed: bool,
    pub state: BackendState,
    pub healthy: Option<bool>,
}

pub struct Backends {
    /// Counts reloads: reports from the probers of an earlier config are dropped.
    generation: u64,
    services: Vec<Service>,
    view: ProxyView,
    /// Tells a backend's prober that passive health failed it, so that it needs `rise` probes.
    passive_failed: PassiveFailed,
    alerts: Arc<dyn AlertSink>,
}

impl Backends {
    /// The backends of `config` placed by `layout`, in the states the maps hold (`states`, as
    /// read at start: a restart keeps drains and failures). What is down already was reported
    /// by the daemon before this one: only its recovery is news.
    pub fn adopt(config: &Config, layout: &Layout, states: &[Vec<BackendState>], alerts: Arc<dyn AlertSink>) -> Backends {
        let view = ProxyView::new(config, states);
        let mut services = build(config, layout, |s, b| Some((Control::from_state(states[s][b]), Probe::default())));
        for svc in &mut services {
            for b in &mut svc.backends {
                if b.control.drained {
                    info!(service = %svc.name, backend = %b.addr, "backend draining (kept from before the restart; `xlb undrain` ends it)");
                }
                if matches!(b.control.state(), BackendState::Down | BackendState::Failed) {
                    let reason = "down when the daemon started".to_owned();
                    alerts.known_failing(Alert::BackendDown { service: svc.name.clone(), backend: b.addr, reason });
                    b.alerted_down = true;
                }
            }
            if !svc.any_up() {
                alerts.known_failing(Alert::ServiceDown { service: svc.name.clone() });
                svc.alerted_down = true;
            }
        }
        Backends { generation: 0, passive_failed: PassiveFailed::new(&config.services), services, view, alerts }
    }

    /// The backends of a new config, placed by its `layout`: a backend that stays (same VIP,
    /// same address) keeps its drain flag, health verdict, last probe and alert state; a new one
    /// starts up, as at start. Nothing is written: the caller writes `states()` into the maps
    /// and then replaces the running `Backends` with this one.
    pub fn replan(&self, config: &Config, layout: &Layout) -> Backends {
        let find = |vip: SocketAddr, addr: SocketAddr| {
            let s = config_vip(self, vip)?;
            self.services[s].backends.iter().find(|b| b.addr == addr)
        };
        let mut services = build(config, layout, |s, b| {
            let svc = &config.services[s];
            find(svc.listen, svc.backends[b]).map(|old| (old.control, old.probe.clone()))
        });
        for (svc, new) in services.iter_mut().zip(&config.services) {
            for b in &mut svc.backends {
                b.alerted_down = find(new.listen, b.addr).is_some_and(|old| old.alerted_down);
            }
            svc.alerted_down = config_vip(self, new.listen).is_some_and(|s| self.services[s].alerted_down);
        }
        let states: Vec<Vec<BackendState>> = services.iter().map(|s| s.backends.iter().map(|b| b.control.state()).collect()).collect();
        Backends {
            generation: self.generation + 1,
            passive_failed: PassiveFailed::new(&config.services),
            view: ProxyView::new(config, &states),
            services,
            alerts: self.alerts.clone(),
        }
    }

    /// Raises the service alerts a reload made due (a service whose new backends are up, or
    /// none of them): call once the replanned `Backends` is in force.
    pub fn settle_alerts(&mut self) {
        for s in 0..self.services.len() {
            self.alert_service(s);
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn view(&self) -> ProxyView {
        self.view.clone()
    }

    pub fn passive_failed(&self) -> &PassiveFailed {
        &self.passive_failed
    }

    /// Every backend's state, `[service][backend]`, as it is to be in the maps.
    pub fn states(&self) -> Vec<Vec<BackendState>> {
        self.services.iter().map(|s| s.backends.iter().map(|b| b.control.state()).collect()).collect()
    }

    /// The health verdict each backend's prober starts from: a backend that is down or failed
    /// must pass `rise` probes.
    pub fn initial_up(&self) -> Vec<Vec<bool>> {
        self.services.iter().map(|s| s.backends.iter().map(|b| b.control.up).collect()).collect()
    }

    /// Backend `backend` of service `service`: its state, health verdict and last probe.
    pub fn get(&self, service: usize, backend: usize) -> Option<(BackendState, bool, &Probe)> {
        let b = self.services.get(service)?.backends.get(backend)?;
        Some((b.control.state(), b.control.up, &b.probe))
    }

    /// Applies one event: the new state goes into the maps, the proxy's view and the alerts, in
    /// that order, and only once the map write succeeded. Returns the drain outcome for `Drain`.
    pub fn apply(&mut self, maps: &mut impl Maps, event: Event) -> Result<Option<Drained>, ApplyError> {
        match event {
            Event::Health { generation, service, backend, up } => {
                if generation == self.generation {
                    self.health(maps, service, backend, up)?;
                }
                Ok(None)
            }
            Event::ProxyFailed { generation, service, backend, now_ns } => {
                if generation == self.generation {
                    self.proxy_failed(maps, service, backend, now_ns)?;
                }
                Ok(None)
            }
            Event::Drain { service, backend, drained } => self.drain(maps, service, backend, drained).map(Some),
        }
    }

    /// Records one probe's outcome, for the status (the verdict comes as `Event::Health`).
    pub fn probed(&mut self, generation: u64, result: health::ProbeResult) {
        if generation != self.generation {
            return;
        }
        if let Some(b) = self.services.get_mut(result.service).and_then(|s| s.backends.get_mut(result.backend)) {
            let p = &b.probe;
            b.probe = Probe {
                healthy: Some(result.ok),
                latency_ms: Some(result.latency.as_secs_f64() * 1e3),
                error: result.error,
                count: p.count + 1,
                passed_in_a_row: if result.ok { p.passed_in_a_row + 1 } else { 0 },
            };
        }
    }

    /// Takes note of backends the data path has failed (passive health: it wrote `Failed`
    /// itself, see `lb_common::backend::Passive`): they count as down until their probes pass
    /// `rise` times, and their prober is told so. The data path stopped choosing them already.
    pub fn poll_data_path(&mut self, maps: &mut impl Maps) -> Result<(), ApplyError> {
        for s in 0..self.services.len() {
            for b in 0..self.services[s].backends.len() {
                let (slot, control) = (self.services[s].backends[b].slot, self.services[s].backends[b].control);
                if control.failed || maps.state(slot)? != Some(BackendState::Failed) {
                    continue;
                }
                let p = maps.passive(slot)?;
                let svc = &self.services[s];
                warn!(
                    service = %svc.name,
                    backend = %svc.backends[b].addr,
                    refused = p.refused,
                    unanswered = p.unanswered,
                    "backend failed (passive): {} failed connection(s) within {}; no new connections go to it until its health checks pass {} time(s)",
                    svc.max_fails,
                    humantime::format_duration(svc.fail_timeout),
                    svc.rise,
                );
                let reason = format!("{} connection(s) refused or unanswered", p.refused + p.unanswered);
                self.fail(maps, s, b, true, reason)?;
            }
        }
        Ok(())
    }

    fn health(&mut self, maps: &mut impl Maps, s: usize, b: usize, up: bool) -> Result<(), ApplyError> {
        let Some(backend) = self.services.get(s).and_then(|svc| svc.backends.get(b)) else { return Ok(()) };
        let (slot, addr, before) = (backend.slot, backend.addr, backend.control);
        let after = Control { up, failed: false, ..before };
        if after.drained {
            // The map already says draining; health only matters again after an undrain. An
            // operator works on a drained backend (`xlb rollout` restarts it): no down alert.
            self.set_control(s, b, after);
            let health = if up { "passing" } else { "failing" };
            info!(service = %self.services[s].name, backend = %addr, "backend health checks {health}; it stays draining");
            if up {
                self.alert_up(s, b);
            }
            self.alert_service(s);
            return Ok(());
        }
        // Back up: an empty failure window, and the slow-start ramp from now.
        let written = if up { maps.restart_passive(slot, monotonic_ns()) } else { Ok(()) };
        if let Err(e) = written.map_err(ApplyError::from).and_then(|()| self.write(maps, s, b, after)) {
            // The verdict stands (the prober has moved on); the map and the proxy's view keep
            // the old state until the next transition or reload writes it.
            self.services[s].backends[b].control = after;
            return Err(e);
        }
        let name = &self.services[s].name;
        if up {
            if before.failed {
                info!(service = %name, backend = %addr, "backend up: health checks pass again after the passive failure");
            } else {
                info!(service = %name, backend = %addr, "backend up");
            }
            self.alert_up(s, b);
        } else {
            warn!(service = %name, backend = %addr, "backend down: no new connections go to it");
            let reason = self.services[s].backends[b].probe.error.clone();
            self.alert_down(s, b, probe_reason(reason));
        }
        self.alert_service(s);
        Ok(())
    }

    fn proxy_failed(&mut self, maps: &mut impl Maps, s: usize, b: usize, now_ns: u64) -> Result<(), ApplyError> {
        let Some(svc) = self.services.get(s) else { return Ok(()) };
        let Some(backend) = svc.backends.get(b) else { return Ok(()) };
        if svc.max_fails == 0 {
            return Ok(());
        }
        let slot = backend.slot;
        let mut passive = maps.passive(slot)?;
        let reached = record_failure(&mut passive, now_ns);
        maps.set_passive(slot, passive)?;
        let control = backend.control;
        if !reached || control.failed || !control.up {
            return Ok(());
        }
        warn!(service = %svc.name, backend = %backend.addr, max_fails = svc.max_fails, fail_timeout = ?svc.fail_timeout,
            "backend failed (passive): requests to it failed; back after its probes pass");
        self.fail(maps, s, b, false, "its requests failed; passive health".into())
    }

    /// Passive health took backend `b` of service `s` out: down until its probes pass `rise`
    /// times. `written`: the data path wrote `Failed` itself already.
    fn fail(&mut self, maps: &mut impl Maps, s: usize, b: usize, written: bool, reason: String) -> Result<(), ApplyError> {
        let before = self.services[s].backends[b].control;
        let after = Control { up: false, failed: true, ..before };
        self.passive_failed.set(s, b);
        if before.drained {
            // A drain that raced the data path's write wins, and is written back.
            if written {
                maps.set_state(self.services[s].backends[b].slot, after.state())?;
            }
            self.set_control(s, b, after);
            return Ok(());
        }
        if written {
            self.set_control(s, b, after);
        } else {
            self.write(maps, s, b, after)?;
        }
        self.alert_down(s, b, reason);
        self.alert_service(s);
        Ok(())
    }

    fn drain(&mut self, maps: &mut impl Maps, s: usize, b: usize, drained: bool) -> Result<Drained, ApplyError> {
        let backend = &self.services[s].backends[b];
        let before = backend.control;
        let after = Control { drained, ..before };
        // Written even when nothing changed: the request then also repairs a map that says
        // otherwise. It is one array update: the next SYN already sees it.
        self.write(maps, s, b, after)?;
        let state = after.state();
        if !drained && state == BackendState::Down {
            let reason = self.services[s].backends[b].probe.error.clone();
            self.alert_down(s, b, probe_reason(reason));
        }
        self.alert_service(s);
        Ok(Drained { changed: before.drained != drained, state, healthy: self.services[s].backends[b].probe.healthy })
    }

    /// Writes `control`'s state into the maps and, once that worked, into the proxy's view.
    fn write(&mut self, maps: &mut impl Maps, s: usize, b: usize, control: Control) -> Result<(), ApplyError> {
        let slot = self.services[s].backends[b].slot;
        maps.set_state(slot, control.state()).inspect_err(|e| {
            error!(service = %self.services[s].name, backend = %self.services[s].backends[b].addr, "writing backend state: {e:#}")
        })?;
        self.set_control(s, b, control);
        Ok(())
    }

    fn set_control(&mut self, s: usize, b: usize, control: Control) {
        self.services[s].backends[b].control = control;
        if self.services[s].mode != ServiceMode::L4 {
            self.view.set(s, b, control.state());
        }
    }

    fn alert_down(&mut self, s: usize, b: usize, reason: String) {
        let svc = &mut self.services[s];
        let backend = &mut svc.backends[b];
        if !backend.alerted_down {
            backend.alerted_down = true;
            self.alerts.notify(Alert::BackendDown { service: svc.name.clone(), backend: backend.addr, reason });
        }
    }

    fn alert_up(&mut self, s: usize, b: usize) {
        let svc = &mut self.services[s];
        let backend = &mut svc.backends[b];
        if backend.alerted_down {
            backend.alerted_down = false;
            self.alerts.notify(Alert::BackendUp { service: svc.name.clone(), backend: backend.addr });
        }
    }

    /// A service is down while none of its backends is up (each down, failed or drained), and
    /// up again once one is.
    fn alert_service(&mut self, s: usize) {
        let up = self.services[s].any_up();
        let svc = &mut self.services[s];
        if up == svc.alerted_down {
            svc.alerted_down = !up;
            let service = svc.name.clone();
            self.alerts.notify(if up { Alert::ServiceUp { service } } else { Alert::ServiceDown { service } });
        }
    }
}

/// The index of the running service with VIP `vip`.
fn config_vip(backends: &Backends, vip: SocketAddr) -> Option<usize> {
    backends.services.iter().position(|s| s.vip == vip)
}

fn build(config: &Config, layout: &Layout, mut old: impl FnMut(usize, usize) -> Option<(Control, Probe)>) -> Vec<Service> {
    config
        .services
        .iter()
        .enumerate()
        .map(|(s, svc)| Service {
            name: svc.name.clone(),
            vip: svc.listen,
            mode: svc.mode,
            max_fails: svc.max_fails,
            fail_timeout: svc.fail_timeout,
            rise: svc.health.rise,
            backends: svc
                .backends
                .iter()
                .enumerate()
                .map(|(b, &addr)| {
                    let (control, probe) = old(s, b).unwrap_or((Control { drained: false, up: true, failed: false }, Probe::default()));
                    Backend { addr, slot: layout.slot(s, b), control, probe, alerted_down: false }
                })
                .collect(),
            alerted_down: false,
        })
        .collect()
}

fn probe_reason(last_error: Option<String>) -> String {
    match last_error {
        Some(e) => format!("last probe: {e}"),
        None => "its health checks fail".into(),
    }
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns()`, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

//! What the admin API reads and asks of the daemon (`admin::StatusSource`): the status of
//! every service and backend, drain and undrain, ACME renewals and reloads.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use tokio::{net::TcpListener, sync::watch};
use tracing::{error, info};

use super::{
    Shared,
    reload::{self, ReloadError},
};
use crate::{
    admin::{self, ControlError, StatusSource},
    backends::{BackendState, Drained, Event},
    config::ServiceMode,
    status::{BackendStatus, DataplaneStatus, DrainResult, InterfaceStatus, ReloadResult, RenewResult, ServiceStatus, Status},
};

/// Serves the admin API on `listener` until the daemon stops.
pub(super) async fn serve(sh: Arc<Shared>, listener: TcpListener, stop: watch::Receiver<bool>) {
    let source: Arc<dyn StatusSource> = Arc::new(Source(sh));
    if let Err(e) = admin::serve(listener, source, stop).await {
        error!("admin API: {e:#}");
    }
}

struct Source(Arc<Shared>);

impl StatusSource for Source {
    fn status(&self) -> anyhow::Result<Status> {
        let sh = &*self.0;
        // Held to the end: a reload cannot replace the config half-way through this snapshot.
        let backends_ = sh.backends.lock().unwrap();
        let dp = sh.dp.lock().unwrap();
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
                let (_, checks_up, probe) = backends_.get(s, b).expect("the state machine has every backend of the config");
                // An HTTPS backend's connections are the proxy's requests in flight to it.
                let (live, total) = match svc.mode {
                    ServiceMode::L4 => (dp.slot_conns(slot)?.live.max(0) as u64, dp.slot_total(slot)?),
                    _ => sh.backplane.requests(*addr),
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
                    checks_up,
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
                https: sh.sites.stats(svc.listen),
                acme: sh.sites.acme_status(svc.listen),
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
        // Held from here: a reload cannot renumber the backends under us.
        let mut backends = sh.backends.lock().unwrap();
        let current = sh.current();
        let services = &current.config.services;
        let s = service_index(services, service)?;
        let svc = &services[s];
        let b = svc.backends.iter().position(|&a| a == backend).ok_or_else(|| ControlError::UnknownBackend {
            service: service.into(),
            backend,
            known: svc.backends.iter().map(ToString::to_string).collect(),
        })?;
        let mut dp = sh.dp.lock().unwrap();
        let outcome = backends
            .apply(&mut *dp, Event::Drain { service: s, backend: b, drained })
            .map_err(|e| ControlError::from(anyhow::Error::from(e)))?
            .expect("a drain has an outcome");
        let live = dp.slot_conns(current.layout.slot(s, b)).map(|c| c.live.max(0) as u64).unwrap_or_default();
        drop(dp);
        drop(backends);
        let Drained { changed, state, healthy } = outcome;
        match (drained, changed) {
            (true, true) => info!(service, backend = %backend, live, "backend draining: no new connections go to it; open ones continue"),
            (false, true) => info!(service, backend = %backend, state = ?state, "backend undrained"),
            _ => {}
        }
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
        let s = service_index(services, service)?;
        // Read first: the renewal is done once `attempts` moves past this.
        let before = sh.sites.with_acme(services[s].listen, |m| {
            let before = m.status();
            m.handle.renew_now();
            before
        });
        let Some(before) = before else {
            let with: Vec<&str> = services.iter().filter(|s| sh.sites.acme_status(s.listen).is_some()).map(|s| s.name.as_str()).collect();
            return Err(ControlError::Rejected(format!(
                "service {service:?} does not get its certificate from ACME (no `acme` in its [service.tls]); {}",
                if with.is_empty() { "no service does".to_owned() } else { format!("these do: {}", with.join(", ")) }
            )));
        };
        info!(service, "acme: renewal asked for through the admin API");
        Ok(RenewResult { service: service.into(), acme: before })
    }

    fn reload(&self) -> Result<ReloadResult, ControlError> {
        reload::reload(&self.0).map_err(|e| match e {
            ReloadError::Rejected(message) => ControlError::Rejected(message),
            ReloadError::Failed(e) => ControlError::Failed(e),
        })
    }
}

/// The index of the service named `name`, or the error naming the services there are.
fn service_index(services: &[crate::config::Service], name: &str) -> Result<usize, ControlError> {
    services.iter().position(|s| s.name == name).ok_or_else(|| ControlError::UnknownService {
        name: name.into(),
        known: services.iter().map(|s| s.name.clone()).collect(),
    })
}

//! The daemon's small periodic jobs: ticks, systemd's readiness and watchdog, ACME alerts, and
//! the data path's log messages.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{error, warn};

use super::Shared;
use crate::{alert::Event, notify};

/// How often the ACME managers' outcomes are looked at for alerts.
const ACME_ALERT_POLL: Duration = Duration::from_secs(1);

/// A periodic task's clock: a tick every `period` (late ticks delay the next ones rather than
/// bunching up) until the shutdown signal.
pub(super) struct Ticks(tokio::time::Interval);

impl Ticks {
    pub(super) fn new(period: Duration) -> Ticks {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticks(interval)
    }

    /// Waits for the next tick; false once `stop` fires (or its sender is gone).
    pub(super) async fn next(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            _ = self.0.tick() => true,
            _ = stop.changed() => false,
        }
    }
}

/// Tells systemd the daemon is ready, with a one-line status.
pub(super) fn notify_ready(sh: &Shared, notifier: &notify::Notifier, listen: SocketAddr) {
    let current = sh.current();
    let services: Vec<&str> = current.config.services.iter().map(|s| s.name.as_str()).collect();
    let status = format!("balancing {} on {}; admin API on {listen}", services.join(", "), current.config.dataplane.interfaces.join(", "));
    if let Err(e) = notifier.notify(&format!("READY=1\nSTATUS={status}")) {
        error!("{e}");
    }
}

/// Drains the data path's aya-log ring buffer into `tracing` whenever it is readable.
pub(super) async fn drain_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>, mut stop: watch::Receiver<bool>) {
    // SAFETY: the logger owns its ring buffer fd and is moved into the AsyncFd, so the fd stays
    // open for as long as it is registered.
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
}

/// Alerts on the ACME managers' outcomes: each failed attempt reports the certificate failing
/// (the alerts task sends only the first of a run), each success its recovery (sent only after
/// a failure).
pub(super) async fn acme_alerts(sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    // Attempts seen, per manager (a reload that changes a service's ACME settings starts a new
    // one, from 0).
    let mut seen: HashMap<u64, u64> = HashMap::new();
    let mut ticks = Ticks::new(ACME_ALERT_POLL);
    while ticks.next(&mut stop).await {
        let managers = sh.sites.acme_managers();
        seen.retain(|number, _| managers.iter().any(|m| m.0 == *number));
        for (number, domains, status) in managers {
            let seen = seen.entry(number).or_default();
            if status.attempts == *seen {
                continue;
            }
            *seen = status.attempts;
            let domain = domains.join(", ");
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
pub(super) async fn watchdog(sh: Arc<Shared>, notifier: Arc<notify::Notifier>, period: Duration, mut stop: watch::Receiver<bool>) {
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

//! `xlb run`: owns the data plane, keeps its backend states and live counts true, serves the
//! HTTPS listeners and the admin API. Stopping the daemon leaves the data path running (see
//! `dataplane`).
//!
//! One module per job: `startup` binds the admin API and opens the data path; `sites` runs the
//! `https` and `redirect` services (their sockets, certificates and proxies); `probes` feeds
//! the health checks into the backend state machine (`crate::backends`); `backplane` is what the
//! HTTPS proxy shares with the data path; `reconcile` keeps live counts equal to the kernel's
//! socket table; `reload` applies a changed config file; `source` answers the admin API;
//! `tasks` has the small periodic ones (watchdog, ACME alerts, the data path's log).

mod backplane;
mod probes;
mod reconcile;
mod reload;
mod sites;
mod source;
mod startup;
mod tasks;

use std::{
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

pub use reload::ReloadError;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    alert::Alerts,
    backends::Backends,
    config::Config,
    dataplane::Dataplane,
    layout::{Layout, Retiring},
    notify,
};

/// Live counts are reconciled with the kernel's socket table this often (the promise is
/// "within one second").
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);

/// The running config and where its backends sit in the maps; a reload replaces it whole.
struct Current {
    config: Config,
    layout: Layout,
}

/// Locks are taken in the order of the fields (`reloading`, `backends`, `dp`, `retiring`, then
/// `current`, only ever held to clone it). A reload replaces `current` and `backends` while
/// holding all of them, so whoever holds one of those sees them agree.
struct Shared {
    /// Held for the whole of a reload: one at a time.
    reloading: Mutex<()>,
    /// Every backend's state; locked before `dp` when both are, so that a state is computed
    /// and written under it and two sources cannot interleave their writes.
    backends: Mutex<Backends>,
    dp: Mutex<Dataplane>,
    /// Slots of backends that left the config: drained, and cleared by the reconcile once no
    /// flow refers to them.
    retiring: Mutex<Vec<Retiring>>,
    current: Mutex<Arc<Current>>,
    /// Flows tracked at the last reconcile.
    flows: AtomicU64,
    backplane: Arc<backplane::Backplane>,
    /// The `https` and `redirect` services; a reload changes them after `backends`.
    sites: sites::Sites,
    /// The health probers of the current config and the tasks reading their reports.
    probers: Mutex<Vec<JoinHandle<()>>>,
    runtime: tokio::runtime::Handle,
    shutdown: watch::Receiver<bool>,
    alerts: Arc<Alerts>,
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
    let admin = startup::bind_admin(&config).await?;
    let sites = sites::Sites::new();
    let plan = sites.prepare(&config)?;
    let (mut dp, layout, states) = startup::open_dataplane(&config)?;
    let logger = dp.take_logger();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let alerts = Arc::new(Alerts::start(config.alerts.clone()));
    let backends = Backends::adopt(&config, &layout, &states, alerts.clone());
    let (backplane, failures) = backplane::Backplane::new(&config, &layout, dp.conns_reader()?);
    let backplane = Arc::new(backplane);
    let proxies: Arc<dyn crate::https::Backplane> = backplane.clone();
    sites.commit(plan, backends.generation(), &backends.view(), &proxies);
    let shared = Arc::new(Shared {
        reloading: Mutex::new(()),
        backends: Mutex::new(backends),
        dp: Mutex::new(dp),
        retiring: Mutex::new(layout.retiring.clone()),
        current: Mutex::new(Arc::new(Current { config, layout })),
        flows: AtomicU64::new(0),
        backplane,
        sites,
        probers: Mutex::new(Vec::new()),
        runtime: tokio::runtime::Handle::current(),
        shutdown: shutdown_rx.clone(),
        alerts,
    });

    let mut tasks = tokio::task::JoinSet::new();
    probes::start(&shared);
    tasks.spawn(backplane::forward_failures(shared.clone(), failures, shutdown_rx.clone()));
    tasks.spawn(backplane::publish(shared.clone(), shutdown_rx.clone()));
    tasks.spawn(reconcile::run(shared.clone(), shutdown_rx.clone()));
    if let Some(logger) = logger {
        tasks.spawn(tasks::drain_log(logger, shutdown_rx.clone()));
    }
    tasks.spawn(tasks::acme_alerts(shared.clone(), shutdown_rx.clone()));
    let listen = shared.current().config.admin.listen;
    tasks.spawn(source::serve(shared.clone(), admin, shutdown_rx.clone()));

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    info!(admin = %listen, "xlb ready");
    for socket in crate::listeners::untaken() {
        warn!("systemd passed a socket for {socket} that no listener of the config uses; its clients wait unanswered — remove it from xlb.socket or configure a listener on it");
    }
    if let Some(notifier) = &notifier {
        tasks::notify_ready(&shared, notifier, listen);
        if let Some(timeout) = notify::watchdog_timeout() {
            info!(timeout = ?timeout, "sending systemd watchdog keep-alives every {:?}", timeout / 2);
            tasks.spawn(tasks::watchdog(shared.clone(), notifier.clone(), timeout / 2, shutdown_rx.clone()));
        }
    }

    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM received"); break }
            _ = sigint.recv() => { info!("SIGINT received"); break }
            _ = sighup.recv() => {
                info!("SIGHUP received: reloading the config and the certificates");
                shared.sites.certificates.notify_waiters();
                let sh = shared.clone();
                // The outcome is logged by `reload` itself.
                let _ = tokio::task::spawn_blocking(move || reload::reload(&sh)).await;
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
        shared.sites.stop().await;
        while tasks.join_next().await.is_some() {}
    })
    .await;
    info!(
        pin_path = %shared.current().config.dataplane.pin_path.display(),
        "stopped; the data path stays attached and keeps forwarding (`xlb detach` removes it)"
    );
    Ok(())
}

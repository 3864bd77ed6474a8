//! Start-up: the admin API's listener, the `https` and `redirect` services' listeners with
//! their certificates and ACME managers, and the data path, loaded or adopted. Everything that
//! can fail because of the config or the host fails here, before the daemon serves.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::Notify, task::JoinSet};
use tracing::{error, info, warn};

use super::Shared;
use crate::{
    acme,
    backends::BackendState,
    certs,
    challenges::Challenges,
    config::{Config, ServiceMode, Tls},
    dataplane::{self, Dataplane},
    https,
    layout::Layout,
    status::AcmeServiceStatus,
};

/// The `https` and `redirect` services: fixed for the daemon's life (a reload that changes them
/// is refused), indexed like the config's services (`None` for L4 services).
pub(super) struct HttpsServices {
    /// The HTTPS counters.
    pub stats: Vec<Option<Arc<https::Stats>>>,
    /// The ACME certificate manager, if the service has one; dropping one stops it.
    pub acme: Vec<Option<AcmeManaged>>,
    /// Certificate reloads of the `https` services (SIGHUP and `xlb reload` fire it).
    pub certificates: Arc<Notify>,
    challenges: Arc<Challenges>,
}

/// What is bound and loaded for the `https` and `redirect` services, ready to serve.
pub(super) struct Listeners {
    /// Per service: its listener and, for `https`, its TLS acceptor.
    sockets: Vec<(usize, TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    /// The certificate files to watch, per `https` service with files.
    watchers: Vec<(String, Vec<crate::config::CertFiles>, Arc<https::tls::Resolver>)>,
}

/// The certificate manager of an `https` service with `[service.tls] acme`.
pub(super) struct AcmeManaged {
    pub handle: acme::ManagerHandle,
    pub domains: Vec<String>,
    challenge: acme::ChallengeKind,
}

impl AcmeManaged {
    pub fn status(&self) -> AcmeServiceStatus {
        AcmeServiceStatus::new(self.domains.clone(), self.challenge, &self.handle.status())
    }
}

/// Binds the admin API's address; a socket systemd passed for it (xlb.socket) is used as is.
pub(super) async fn bind_admin(config: &Config) -> anyhow::Result<TcpListener> {
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
    Ok(listener)
}

/// Binds the `https` and `redirect` services' listeners and loads their certificates (or the
/// sockets systemd holds for them, so that a restart refuses no connection), and starts their
/// ACME managers.
pub(super) fn https_services(config: &Config) -> anyhow::Result<(HttpsServices, Listeners)> {
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
                    .map(|f| certs::load_files(&f.cert, &f.key))
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
                let on_cert: acme::OnCert = Arc::new(move |key, _chain| match certs::describe(&key.cert[0]) {
                    Ok(leaf) => target.set(vec![certs::Loaded { key, names: leaf.names, not_after: leaf.not_after }]),
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
    let certificates = Arc::new(Notify::new());
    Ok((
        HttpsServices { stats: https_stats, acme: acme_managers, certificates, challenges },
        Listeners { sockets: https_listeners, watchers },
    ))
}

/// Loads or adopts the data path. A first start that fails half-way (say, the second interface
/// refuses XDP) must not leave the first one attached and the maps pinned with nobody managing
/// them; a restart that fails leaves the running data path alone.
pub(super) fn open_dataplane(config: &Config) -> anyhow::Result<(Dataplane, Layout, Vec<Vec<BackendState>>)> {
    let pin_path = config.dataplane.pin_path.clone();
    let first_start = match std::fs::read_dir(&pin_path) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    let (dp, layout, states) = match tokio::task::block_in_place(|| load_or_adopt(config)) {
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
    for (iface, mode) in dp.interfaces() {
        info!(interface = %iface, xdp_mode = mode.as_str(), "data path attached");
    }
    info!(
        pin_path = %dp.pin_path().display(),
        adopted = dp.adopted,
        "{}",
        if dp.adopted { "adopted pinned maps: existing flows kept" } else { "created fresh maps" }
    );
    for r in &layout.retiring {
        info!(backend = %r.addr, slot = r.slot, "backend no longer in the config: draining; its slot is freed once its connections end");
    }
    Ok((dp, layout, states))
}

/// Loads or adopts the data path and writes the services into it: where (every backend found
/// in the maps keeps its slot) and with which backend states.
fn load_or_adopt(config: &Config) -> anyhow::Result<(Dataplane, Layout, Vec<Vec<BackendState>>)> {
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

/// Starts serving the `https` and `redirect` listeners, and watching the certificate files.
pub(super) fn serve_https(shared: &Arc<Shared>, listeners: Listeners, tasks: &mut JoinSet<()>) {
    let shutdown_rx = &shared.shutdown;
    let challenges = &shared.https.challenges;
    for (s, listener, acceptor) in listeners.sockets {
        let current = shared.current();
        let svc = &current.config.services[s];
        let stats = shared.https.stats[s].clone().expect("https and redirect services have stats");
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
    for (name, files, resolver) in listeners.watchers {
        tasks.spawn(https::tls::watch_files(name, files, resolver, shared.https.certificates.clone(), shutdown_rx.clone()));
    }
}

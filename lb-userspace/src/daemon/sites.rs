//! The `https` and `redirect` services as they run, one per listen address: its listening
//! socket, its counters, its certificates (files that are watched, or an ACME manager) and the
//! loop that serves it. The start and every reload change them in two steps: `prepare` does
//! all that can fail (binding new addresses, loading certificate files, starting ACME managers)
//! and changes nothing that runs; `commit` puts the result in force and cannot fail.
//!
//! A service that stays at its address keeps its socket, counters and open connections: a
//! changed `https` service gets its new backends, headers, limits and certificates for the
//! next connections and requests (`Proxy::update`). A service whose mode changed gets a new
//! loop on the same socket. A removed one stops accepting; its open connections finish what
//! they are doing and close.

use std::{collections::HashMap, net::SocketAddr, sync::{Arc, Mutex}};

use anyhow::Context as _;
use tokio::{
    net::TcpListener,
    sync::{Notify, watch},
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;
use tracing::{error, info};

use crate::{
    acme::{self, AcmeStatus},
    backends::ProxyView,
    certs,
    challenges::Challenges,
    config::{AcmeSection, CertFiles, Config, Service, ServiceMode, Tls},
    https::{self, Backplane, HttpsStatus, Stats, proxy::{Proxy, Site}, tls::Resolver},
    status::AcmeServiceStatus,
};

pub(super) struct Sites {
    running: Mutex<HashMap<SocketAddr, Running>>,
    /// Certificate reloads of the `https` services with files (SIGHUP and `xlb reload` fire it).
    pub certificates: Arc<Notify>,
    challenges: Arc<Challenges>,
    /// The serving loops and the certificate watchers.
    tasks: Mutex<JoinSet<()>>,
    /// Numbers the ACME managers, so that one replaced by a reload is told from its successor.
    managers_started: std::sync::atomic::AtomicU64,
}

/// One service at its listen address.
struct Running {
    svc: Service,
    /// The `[acme]` section its ACME manager was started with.
    acme_section: AcmeSection,
    listener: Arc<TcpListener>,
    stats: Arc<Stats>,
    /// `https` only.
    tls: Option<Certificates>,
    proxy: Option<Arc<Proxy>>,
    /// Stops the serving loop; an `https` loop also asks its connections to finish.
    stop: watch::Sender<bool>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// An `https` service's certificates and what keeps them current.
struct Certificates {
    acceptor: TlsAcceptor,
    /// Certificate files: stops the task that reloads them when they change.
    watcher: Option<watch::Sender<bool>>,
    /// Or the ACME manager; dropping it stops it.
    acme: Option<AcmeManaged>,
}

impl Drop for Certificates {
    fn drop(&mut self) {
        if let Some(w) = &self.watcher {
            let _ = w.send(true);
        }
    }
}

/// The certificate manager of an `https` service with `[service.tls] acme`.
pub(super) struct AcmeManaged {
    pub handle: acme::ManagerHandle,
    pub domains: Vec<String>,
    challenge: acme::ChallengeKind,
    /// Which manager this is, of all the daemon has started.
    pub number: u64,
}

impl AcmeManaged {
    pub fn status(&self) -> AcmeServiceStatus {
        AcmeServiceStatus::new(self.domains.clone(), self.challenge, &self.handle.status())
    }
}

/// What a start or reload is to put in force, with everything that could fail done. Dropped
/// instead of committed, it undoes itself: new sockets close, new ACME managers stop.
pub(super) struct Plan {
    services: Vec<Planned>,
    acme_section: AcmeSection,
}

/// One `https` or `redirect` service of the new config.
struct Planned {
    /// Its index in the new config.
    index: usize,
    svc: Service,
    /// A socket bound for an address no service had; `None`: the running service's.
    listener: Option<Arc<TcpListener>>,
    /// The counters: the running ones for a service that keeps its address and mode.
    stats: Arc<Stats>,
    /// New certificates: a new `https` service, or one whose TLS settings changed.
    tls: Option<Prepared>,
}

/// Certificates loaded (or an ACME manager started) for an `https` service, not yet watched.
struct Prepared {
    acceptor: TlsAcceptor,
    files: Option<(Vec<CertFiles>, Arc<Resolver>)>,
    acme: Option<AcmeManaged>,
}

impl Sites {
    pub fn new() -> Sites {
        Sites {
            running: Mutex::default(),
            certificates: Arc::new(Notify::new()),
            challenges: Challenges::new(),
            tasks: Mutex::new(JoinSet::new()),
            managers_started: Default::default(),
        }
    }

    /// Binds what `config` adds, loads the certificates it changes and starts the ACME managers
    /// it changes; what runs is untouched. The error names the service and what to fix.
    pub fn prepare(&self, config: &Config) -> anyhow::Result<Plan> {
        let running = self.running.lock().unwrap();
        let mut services = Vec::new();
        for (index, svc) in config.services.iter().enumerate().filter(|(_, s)| s.mode != ServiceMode::L4) {
            let old = running.get(&svc.listen);
            let listener = match old {
                Some(_) => None,
                None => Some(Arc::new(bind(svc)?)),
            };
            let same_mode = old.filter(|o| o.svc.mode == svc.mode);
            let stats = same_mode.map_or_else(|| Arc::new(Stats::default()), |o| o.stats.clone());
            let tls = match &svc.https {
                Some(h) => {
                    let unchanged = same_mode.is_some_and(|o| {
                        o.svc.https.as_ref().map(|o| &o.tls) == Some(&h.tls)
                            && (!matches!(h.tls, Tls::Acme(_)) || o.acme_section == config.acme)
                    });
                    (!unchanged).then(|| self.prepare_tls(svc, &h.tls, &config.acme, &stats)).transpose()?
                }
                None => None,
            };
            services.push(Planned { index, svc: svc.clone(), listener, stats, tls });
        }
        Ok(Plan { services, acme_section: config.acme.clone() })
    }

    fn prepare_tls(&self, svc: &Service, tls: &Tls, section: &AcmeSection, stats: &Arc<Stats>) -> anyhow::Result<Prepared> {
        let challenges = &self.challenges;
        match tls {
            Tls::Files(files) => {
                let certs = files
                    .iter()
                    .map(|f| certs::load_files(&f.cert, &f.key))
                    .collect::<anyhow::Result<Vec<_>>>()
                    .with_context(|| format!("service \"{}\": loading its certificates ([service.tls])", svc.name))?;
                let resolver = Resolver::new(certs, challenges.clone(), stats.clone());
                let acceptor = TlsAcceptor::from(https::tls::server_config(resolver.clone())?);
                Ok(Prepared { acceptor, files: Some((files.clone(), resolver)), acme: None })
            }
            Tls::Acme(a) => {
                // Until the certificate manager has issued one, only TLS-ALPN-01 validations
                // get a handshake.
                let resolver = Resolver::new(Vec::new(), challenges.clone(), stats.clone());
                let mut settings = acme::AcmeSettings::new(&svc.name, &a.directory, a.domains.clone(), &section.state_dir);
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
                // once the plan is committed (the CA's connections wait in their backlog).
                let handle = acme::Manager::spawn(settings, challenges.clone(), on_cert).with_context(|| {
                    format!("service \"{}\": starting its ACME certificate manager ([service.tls] acme)", svc.name)
                })?;
                let number = self.managers_started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let acme = AcmeManaged { handle, domains: a.domains.clone(), challenge: a.challenge, number };
                let acceptor = TlsAcceptor::from(https::tls::server_config(resolver)?);
                Ok(Prepared { acceptor, files: None, acme: Some(acme) })
            }
        }
    }

    /// Puts `plan` in force for config `generation`, whose backend states the proxies read
    /// from `view`; the services `plan` does not have stop.
    pub fn commit(&self, plan: Plan, generation: u64, view: &ProxyView, backplane: &Arc<dyn Backplane>) {
        let mut running = self.running.lock().unwrap();
        let mut tasks = self.tasks.lock().unwrap();
        // Loops and watchers that ended (of services removed earlier) are reaped.
        while tasks.try_join_next().is_some() {}
        let mut next = HashMap::new();
        for p in plan.services {
            let listen = p.svc.listen;
            let old = running.remove(&listen);
            let tls = p.tls.map(|t| self.watch(&mut tasks, &p.svc, t));
            let entry = match old {
                Some(mut o) if o.svc.mode == p.svc.mode && p.svc.mode == ServiceMode::Https => {
                    if let Some(tls) = tls {
                        o.tls = Some(tls);
                    }
                    let proxy = o.proxy.as_ref().expect("a running https service has a proxy");
                    let acceptor = o.tls.as_ref().expect("a running https service has certificates").acceptor.clone();
                    proxy.update(Site::new(generation, p.index, &p.svc, view.row(p.index), acceptor, Some(&proxy.site())));
                    if o.svc != p.svc {
                        info!(service = %p.svc.name, listen = %listen, "https service changed: new connections and requests get the new settings; open ones stay");
                    }
                    o.svc = p.svc;
                    o.acme_section = plan.acme_section.clone();
                    o
                }
                Some(o) if o.svc == p.svc => o,
                old => {
                    // New, or a new loop on the same socket (its mode changed, or a redirect
                    // service was renamed): the old loop stops as `old` is dropped.
                    let listener = p
                        .listener
                        .or_else(|| old.as_ref().map(|o| o.listener.clone()))
                        .expect("a service without a new socket has a running one");
                    drop(old);
                    let (stop, stopped) = watch::channel(false);
                    let proxy = match p.svc.mode {
                        ServiceMode::Https => {
                            let acceptor = tls.as_ref().expect("a new https service has certificates").acceptor.clone();
                            let site = Site::new(generation, p.index, &p.svc, view.row(p.index), acceptor, None);
                            let proxy = Proxy::new(site, backplane.clone(), p.stats.clone());
                            tasks.spawn(proxy.clone().serve(listener.clone(), stopped));
                            Some(proxy)
                        }
                        _ => {
                            tasks.spawn(https::redirect::serve(p.svc.name.clone(), listener.clone(), self.challenges.clone(), p.stats.clone(), stopped));
                            None
                        }
                    };
                    info!(service = %p.svc.name, listen = %listen, mode = p.svc.mode.as_str(), "listening");
                    Running { svc: p.svc, acme_section: plan.acme_section.clone(), listener, stats: p.stats, tls, proxy, stop }
                }
            };
            next.insert(listen, entry);
        }
        for (listen, gone) in running.drain() {
            info!(service = %gone.svc.name, listen = %listen, "service removed: no longer accepting; its open connections finish");
        }
        *running = next;
    }

    /// Starts watching prepared certificate files.
    fn watch(&self, tasks: &mut JoinSet<()>, svc: &Service, prepared: Prepared) -> Certificates {
        let watcher = prepared.files.map(|(files, resolver)| {
            let (stop, stopped) = watch::channel(false);
            tasks.spawn(https::tls::watch_files(svc.name.clone(), files, resolver, self.certificates.clone(), stopped));
            stop
        });
        Certificates { acceptor: prepared.acceptor, watcher, acme: prepared.acme }
    }

    /// Stops every service (the daemon is stopping) and waits for their loops, which wait for
    /// their connections within their own bounds.
    pub async fn stop(&self) {
        let running = std::mem::take(&mut *self.running.lock().unwrap());
        // Dropped: the loops and the certificate watchers are told to stop.
        drop(running);
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        while tasks.join_next().await.is_some() {}
    }

    /// The counters of the service at `listen`, if it is an `https` or `redirect` one.
    pub fn stats(&self, listen: SocketAddr) -> Option<HttpsStatus> {
        self.running.lock().unwrap().get(&listen).map(|r| r.stats.snapshot())
    }

    /// The ACME manager's state of the service at `listen`, if it has one.
    pub fn acme_status(&self, listen: SocketAddr) -> Option<AcmeServiceStatus> {
        self.with_acme(listen, AcmeManaged::status)
    }

    /// Runs `f` on the ACME manager of the service at `listen`, if it has one.
    pub fn with_acme<T>(&self, listen: SocketAddr, f: impl FnOnce(&AcmeManaged) -> T) -> Option<T> {
        let running = self.running.lock().unwrap();
        running.get(&listen)?.tls.as_ref()?.acme.as_ref().map(f)
    }

    /// Every ACME manager's number, domains and state.
    pub fn acme_managers(&self) -> Vec<(u64, Vec<String>, AcmeStatus)> {
        let running = self.running.lock().unwrap();
        running
            .values()
            .filter_map(|r| {
                let m = r.tls.as_ref()?.acme.as_ref()?;
                Some((m.number, m.domains.clone(), m.handle.status()))
            })
            .collect()
    }
}

/// The service's listening socket: one systemd passed for it (xlb.socket), or bound here.
fn bind(svc: &Service) -> anyhow::Result<TcpListener> {
    let std_listener = match crate::listeners::take(svc.listen) {
        Some(inherited) => {
            info!(service = %svc.name, listen = %svc.listen, "listening on the socket passed by systemd");
            inherited
        }
        None => https::bind(svc.listen).with_context(|| {
            format!("service \"{}\": listening on {} (its listen address; is another server using it?)", svc.name, svc.listen)
        })?,
    };
    Ok(TcpListener::from_std(std_listener)?)
}

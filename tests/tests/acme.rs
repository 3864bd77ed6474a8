//! The ACME certificate manager against Pebble, Let's Encrypt's test CA (Debian's `pebble`), in
//! namespaces the test creates:
//!
//! ```text
//!   client ns 198.18.0.2                    lb ns 198.18.0.1
//!   pebble :14000 (ACME) :15000 (roots) ──  the manager (xlb::acme), HTTP-01 on :80,
//!   pebble-challtestsrv :8053 (DNS:         HTTPS + TLS-ALPN-01 on :443
//!     every name is 198.18.0.1)
//! ```
//!
//! Pebble really validates each challenge by connecting to 198.18.0.1 (no "always valid"
//! shortcut), reuses no authorization, and its issuing root is fetched from its management port
//! to check what the lb serves.
//!
//! The first test runs the whole daemon (`xlb run`): its redirect listener answers HTTP-01, its
//! HTTPS listener serves the certificate and proxies to demo backends, `xlb renew` forces a
//! renewal. The others drive the manager alone, behind the smallest challenge servers that
//! serve `Challenges` the way the xlb listeners do, to reach the failure and restart cases.
use std::{
    convert::Infallible,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::aws_lc_rs,
    pki_types::{CertificateDer, ServerName, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{net::TcpListener, runtime::Runtime, task::JoinHandle};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use xlb::{
    acme::{AcmeSettings, AcmeStatus, ChallengeKind, Manager, ManagerHandle},
    challenges::{ACME_TLS_ALPN, Challenges, HTTP01_PREFIX},
};
use xlb_tests::{
    ADMIN, Proc, Topology,
    config::{Alerts, Dur, Health, Service, Tls, TlsAcme, Webhook, XlbConfig},
    demo_backend_bin, http_get, wait_until, xlb_bin,
};

const LB: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CA_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const ACME_PORT: u16 = 14000;
const MANAGEMENT_PORT: u16 = 15000;
const DNS_PORT: u16 = 8053;
const DOMAIN: &str = "app.xlb.test";
/// Bounds each wait for an order: Pebble validates within a second or two here.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The namespaces, Pebble and its DNS server, and a tokio runtime for each side.
struct World {
    topology: Topology,
    dir: PathBuf,
    /// Root of Pebble's own HTTPS certificate (not of what it issues): the `ca` setting.
    pebble_ca: PathBuf,
    pebble: Mutex<Option<Proc>>,
    _dns: Proc,
    lb: Runtime,
    client: Runtime,
}

impl World {
    fn new(tag: &str) -> World {
        // The manager's log lines, shown with a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("xlb=debug")
            .try_init();
        for program in ["pebble", "pebble-challtestsrv"] {
            let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .any(|dir| dir.join(program).is_file());
            assert!(
                found,
                "{program} is not installed: `cargo xtask setup` installs it (Debian package pebble)"
            );
        }
        let topology = Topology::new(tag);
        let dir = std::env::temp_dir().join(format!("xlb-acme-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let pebble_ca = write_pebble_tls(&dir);
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("{CA_HOST}:{ACME_PORT}"),
                "managementListenAddress": format!("{CA_HOST}:{MANAGEMENT_PORT}"),
                "certificate": dir.join("pebble-cert.pem"),
                "privateKey": dir.join("pebble-key.pem"),
                "httpPort": 80,
                "tlsPort": 443,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let dns = topology.spawn_client(
            "pebble-challtestsrv",
            &[
                "-dns01",
                &format!("{CA_HOST}:{DNS_PORT}"),
                "-defaultIPv4",
                &LB.to_string(),
                "-defaultIPv6",
                "",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &format!("{CA_HOST}:8055"),
            ],
        );
        let lb = topology.in_lb(runtime);
        let client = topology.in_client(runtime);
        // The runtimes' tasks really run in the namespaces (no traffic from the host's).
        let netns = || fs::read_link("/proc/thread-self/ns/net").unwrap();
        assert_eq!(on(&lb, async move { netns() }), topology.in_lb(netns));
        assert_eq!(
            on(&client, async move { netns() }),
            topology.in_client(netns)
        );
        assert_ne!(topology.in_lb(netns), netns());
        let world = World {
            topology,
            dir,
            pebble_ca,
            pebble: Mutex::new(None),
            _dns: dns,
            lb,
            client,
        };
        world.start_pebble();
        world
    }

    fn start_pebble(&self) {
        let mut cmd = self.topology.client("pebble");
        cmd.arg("-config")
            .arg(self.dir.join("pebble.json"))
            .args(["-dnsserver", &format!("{CA_HOST}:{DNS_PORT}")])
            // Validate at once instead of after a random sleep of up to 15 s...
            .env("PEBBLE_VA_NOSLEEP", "1")
            // ...every time (no reuse of an earlier order's authorization)...
            .env("PEBBLE_AUTHZREUSE", "0")
            // ...and without rejecting 5 % of nonces on purpose.
            .env("PEBBLE_WFE_NONCEREJECT", "0");
        let proc = self.topology.spawn(cmd, "pebble");
        let addr = SocketAddr::from((CA_HOST, ACME_PORT));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.on_client(async move { tokio::net::TcpStream::connect(addr).await.is_ok() }) {
            assert!(
                proc.is_running() && Instant::now() < deadline,
                "pebble did not listen on {addr}; its output:\n{}",
                proc.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        *self.pebble.lock().unwrap() = Some(proc);
    }

    fn stop_pebble(&self) {
        if let Some(pebble) = self.pebble.lock().unwrap().take() {
            pebble.kill9();
        }
    }

    fn settings(&self, service: &str, challenge: ChallengeKind) -> AcmeSettings {
        let mut settings = AcmeSettings::new(
            service,
            format!("https://{CA_HOST}:{ACME_PORT}/dir"),
            vec![DOMAIN.to_owned()],
            self.dir.join("state"),
        );
        settings.contact = vec!["mailto:ops@xlb.test".into()];
        settings.ca = Some(self.pebble_ca.clone());
        settings.challenge = challenge;
        settings.retry_min = Duration::from_millis(500);
        settings.retry_max = Duration::from_secs(2);
        settings
    }

    /// Runs `f` on the lb side's runtime: sockets it opens live in the lb namespace.
    fn on_lb<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        on(&self.lb, f)
    }

    fn on_client<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        on(&self.client, f)
    }

    /// Pebble's current issuing root (new with every Pebble start), as a client's trust store.
    fn issuing_roots(&self) -> RootCertStore {
        let mut trust = RootCertStore::empty();
        trust.add_parsable_certificates(
            CertificateDer::pem_file_iter(&self.pebble_ca)
                .unwrap()
                .map(Result::unwrap),
        );
        let addr = SocketAddr::from((CA_HOST, MANAGEMENT_PORT));
        let pem = self.on_client(async move {
            let (mut send, _) = tls_http1(addr, &CA_HOST.to_string(), trust).await.unwrap();
            get(&mut send, "/roots/0").await.unwrap().1
        });
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        assert_eq!(
            roots.len(),
            1,
            "pebble's /roots/0 should hold one root: {pem}"
        );
        roots
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A runtime whose worker threads are created on the calling thread, and so share its network
/// namespace.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `f` as a task of `rt` (never on the calling thread, which is in the host namespace).
fn on<T: Send + 'static>(rt: &Runtime, f: impl Future<Output = T> + Send + 'static) -> T {
    rt.block_on(async { tokio::spawn(f).await.unwrap() })
}

/// A CA and a certificate for Pebble's HTTPS endpoints at 198.18.0.2; returns the CA's path.
fn write_pebble_tls(dir: &Path) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "xlb test: Pebble's HTTPS CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::IpAddress(IpAddr::V4(CA_HOST))];
    let cert = params.signed_by(&key, &issuer).unwrap();
    fs::write(dir.join("pebble-cert.pem"), cert.pem()).unwrap();
    fs::write(dir.join("pebble-key.pem"), key.serialize_pem()).unwrap();
    let ca = dir.join("pebble-ca.pem");
    fs::write(&ca, ca_cert.pem()).unwrap();
    ca
}

/// Serves HTTP-01 answers from `challenges` on `addr`, as the redirect listener does; 404 for
/// anything else.
async fn serve_http01(addr: SocketAddr, challenges: Arc<Challenges>) -> JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let challenges = challenges.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let answer = req
                        .uri()
                        .path()
                        .strip_prefix(HTTP01_PREFIX)
                        .and_then(|token| challenges.http01(token));
                    async move {
                        Ok::<_, Infallible>(match answer {
                            Some(key_authorization) => {
                                Response::new(Full::new(Bytes::from(key_authorization)))
                            }
                            None => Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}

/// The certificate an HTTPS listener serves, swapped by the manager's callback.
type Current = Arc<RwLock<Option<Arc<CertifiedKey>>>>;

/// Picks the TLS-ALPN-01 certificate for a ClientHello offering `acme-tls/1`, as the HTTPS
/// listener does, and the current certificate otherwise.
struct Resolver {
    challenges: Arc<Challenges>,
    current: Current,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if acme {
            return self.challenges.tls_alpn01(hello.server_name()?);
        }
        self.current.read().unwrap().clone()
    }
}

/// HTTPS on `addr` with `current`'s certificate (answering every request with 200 "hello"),
/// and TLS-ALPN-01 answers from `challenges`.
async fn serve_https(
    addr: SocketAddr,
    challenges: Arc<Challenges>,
    current: Current,
) -> JoinHandle<()> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver {
            challenges,
            current,
        }));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // A validation handshake ends with the handshake (RFC 8737 §3).
                if tls.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
                    return;
                }
                let service = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    })
}

/// An HTTP/1.1 connection over TLS to `addr` for `server_name`, verified against `roots`;
/// also the serial of the certificate it was shown.
async fn tls_http1(
    addr: SocketAddr,
    server_name: &str,
    roots: RootCertStore,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        Vec<u8>,
    ),
    String,
> {
    let (send, leaf) = tls_http1_leaf(addr, server_name, roots).await?;
    Ok((send, serial(&leaf)))
}

/// [`tls_http1`] with the whole certificate the server showed.
async fn tls_http1_leaf(
    addr: SocketAddr,
    server_name: &str,
    roots: RootCertStore,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        CertificateDer<'static>,
    ),
    String,
> {
    let mut config = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())
    };
    let tls = tokio::time::timeout(IO_TIMEOUT, connect)
        .await
        .map_err(|_| format!("TLS to {addr} timed out"))??;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok((send, leaf))
}

async fn get(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
) -> Result<(StatusCode, String), String> {
    let request = Request::get(path)
        .header("host", DOMAIN)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let exchange = async {
        let response = send
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok((
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        ))
    };
    tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("GET {path} timed out"))?
}

fn serial(cert: &CertificateDer<'_>) -> Vec<u8> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).unwrap();
    parsed.raw_serial().to_vec()
}

/// A certificate handed to `on_cert`: its serial and the chain PEM.
type Swap = (Vec<u8>, Vec<u8>);

/// The lb side: challenge servers, the served certificate, and the manager's swaps.
struct Lb {
    challenges: Arc<Challenges>,
    current: Current,
    /// (serial, chain PEM) of each certificate handed to `on_cert`.
    swaps: Arc<Mutex<Vec<Swap>>>,
}

impl Lb {
    fn new() -> Lb {
        Lb {
            challenges: Challenges::new(),
            current: Current::default(),
            swaps: Arc::default(),
        }
    }

    fn spawn(&self, world: &World, settings: AcmeSettings) -> ManagerHandle {
        let current = self.current.clone();
        let swaps = self.swaps.clone();
        let on_cert = Arc::new(move |key: Arc<CertifiedKey>, chain_pem: Vec<u8>| {
            swaps
                .lock()
                .unwrap()
                .push((serial(&key.cert[0]), chain_pem));
            *current.write().unwrap() = Some(key);
        });
        let challenges = self.challenges.clone();
        world.on_lb(async move { Manager::spawn(settings, challenges, on_cert).unwrap() })
    }

    fn swaps(&self) -> usize {
        self.swaps.lock().unwrap().len()
    }

    fn serial(&self) -> Vec<u8> {
        self.swaps
            .lock()
            .unwrap()
            .last()
            .expect("a certificate")
            .0
            .clone()
    }
}

fn wait_for_swaps(lb: &Lb, manager: &ManagerHandle, n: usize) {
    let start = Instant::now();
    while lb.swaps() < n {
        assert!(
            start.elapsed() < ISSUE_TIMEOUT,
            "no certificate #{n} after {ISSUE_TIMEOUT:?}; status {:?}",
            manager.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn https_addr() -> SocketAddr {
    SocketAddr::from((LB, 443))
}

const BACKENDS: u16 = 3;

/// `xlb run` in the lb namespace of `world`: an `https` service on 198.18.0.1:443 whose
/// certificate comes from Pebble, a `redirect` service on :80 (HTTP-01), three demo backends.
struct Daemon {
    config: PathBuf,
    /// What `config` holds.
    xlb_toml: XlbConfig,
    proc: Option<Proc>,
    _apps: Vec<Proc>,
}

impl Daemon {
    /// `alerts`, if any, go into the config's `[alerts]`.
    fn start(world: &World, challenge: &str, alerts: Option<Alerts>) -> Daemon {
        let apps: Vec<Proc> = (1..=BACKENDS)
            .map(|i| {
                let addr = format!("{LB}:{}", 8000 + i);
                let app = world
                    .topology
                    .spawn_lb(demo_backend_bin(), &["--listen", &addr, "--name", &format!("app-{i}")]);
                app.wait_for_output(&format!("listening on {addr}"), Duration::from_secs(10));
                app
            })
            .collect();
        let config = world.dir.join("xlb.toml");
        let mut xlb_toml = XlbConfig::new([&world.topology.lb_if], &world.topology.pin_path)
            .admin(ADMIN)
            .acme_state_dir(world.dir.join("xlb-state"))
            .service(
                Service::https("site", format!("{LB}:443"))
                    .backends((1..=BACKENDS).map(|i| format!("{LB}:{}", 8000 + i)))
                    .tls(Tls::acme(TlsAcme::new(
                        format!("https://{CA_HOST}:{ACME_PORT}/dir"),
                        "mailto:ops@xlb.test",
                        &[DOMAIN],
                        &world.pebble_ca,
                        challenge,
                    )))
                    .health(Health::http("/health").interval(Duration::from_millis(200)).timeout(Duration::from_millis(100))),
            )
            .service(Service::redirect("site-http", format!("{LB}:80")));
        xlb_toml.alerts = alerts;
        xlb_toml.write(&config);
        let mut daemon = Daemon { config, xlb_toml, proc: None, _apps: apps };
        daemon.run(world);
        daemon
    }

    /// `xlb run`, waiting for `xlb ready`.
    fn run(&mut self, world: &World) {
        let mut cmd = world.topology.lb(xlb_bin());
        cmd.args(["run", "--config"]).arg(&self.config).env("XLB_LOG", "info,xlb=debug");
        let proc = world.topology.spawn(cmd, "xlb run");
        proc.wait_for_output("xlb ready", Duration::from_secs(30));
        self.proc = Some(proc);
    }

    /// SIGTERM, then a new `xlb run` on the same config and state.
    fn restart(&mut self, world: &World) {
        let proc = self.proc.take().unwrap();
        let status = proc.terminate();
        assert!(status.success(), "xlb run exited with {status}:\n{}", proc.output());
        self.run(world);
    }

    fn proc(&self) -> &Proc {
        self.proc.as_ref().expect("the daemon runs")
    }

    /// `xlb ARGS --config FILE` in the lb namespace: exit status and stdout + stderr.
    fn xlb(&self, world: &World, args: &[&str]) -> (std::process::ExitStatus, String) {
        let mut cmd = world.topology.lb(xlb_bin());
        cmd.args(args).arg("--config").arg(&self.config);
        let out = cmd.output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status, text)
    }

    fn get(&self, world: &World, path: &str) -> String {
        let response = world
            .topology
            .in_lb(|| http_get(ADMIN, path, IO_TIMEOUT))
            .unwrap_or_else(|e| panic!("GET http://{ADMIN}{path} in the lb namespace: {e}"));
        assert_eq!(response.status, 200, "{response:?}");
        response.body
    }

    /// The `site` service in `/api/status`.
    fn site(&self, world: &World) -> serde_json::Value {
        let status: serde_json::Value = serde_json::from_str(&self.get(world, "/api/status")).unwrap();
        status["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "site")
            .expect("service site in the status")
            .clone()
    }

    /// Waits until the manager has finished `attempts` attempts; returns the site's status.
    fn wait_attempts(&self, world: &World, attempts: u64) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let site = self.site(world);
            if site["acme"]["attempts"].as_u64() >= Some(attempts) {
                return site;
            }
            assert!(
                start.elapsed() < ISSUE_TIMEOUT && self.proc().is_running(),
                "no ACME attempt #{attempts} after {:?}: {site:#}\n{}",
                start.elapsed(),
                self.proc().output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(mut self, world: &World) {
        let proc = self.proc.take().unwrap();
        let status = proc.terminate();
        assert!(status.success(), "xlb run exited with {status}:\n{}", proc.output());
        let (status, out) = self.xlb(world, &["detach"]);
        assert!(status.success(), "xlb detach: {out}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Killed before the topology goes; the pins go with the topology.
        drop(self.proc.take());
    }
}

/// A webhook receiver in the lb namespace: the `events` of every alert POSTed to it.
struct Hook {
    addr: SocketAddr,
    events: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Hook {
    fn start(world: &World) -> Hook {
        let listener = world
            .topology
            .in_lb(|| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let events: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let store = events.clone();
        world.on_lb(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else { continue };
                    let store = store.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req: Request<Incoming>| {
                            let store = store.clone();
                            async move {
                                let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                                if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) {
                                    store.lock().unwrap().extend(json["events"].as_array().cloned().unwrap_or_default());
                                }
                                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), service)
                            .await;
                    });
                }
            });
        });
        Hook { addr, events }
    }

    /// The event names received so far, in order.
    fn names(&self) -> Vec<String> {
        self.events.lock().unwrap().iter().map(|e| e["event"].as_str().unwrap_or("?").to_owned()).collect()
    }

    fn wait_for(&self, name: &str) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(e) = self.events.lock().unwrap().iter().find(|e| e["event"] == name) {
                return e.clone();
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no {name} alert; received {:?}", self.names());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// notAfter of a certificate, Unix seconds.
fn not_after(cert: &CertificateDer<'_>) -> i64 {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).unwrap();
    parsed.validity().not_after.timestamp()
}

fn rfc3339_unix(text: &serde_json::Value) -> i64 {
    let text = text.as_str().unwrap_or_else(|| panic!("not a time: {text}"));
    let t = humantime::parse_rfc3339(text).unwrap();
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The issue's test: xlb gets its certificate from Pebble through its own listeners, serves it
/// and proxies to the backends; `xlb renew` swaps in a new one while a kept-alive connection
/// stays open and working; status, `xlb status` and the metrics follow.
#[test]
fn daemon_issues_serves_and_renews_through_its_own_listeners() {
    xlb_tests::root_or_skip!();
    let world = World::new("acme-xlb");
    let hook = Hook::start(&world);
    let alerts = Alerts {
        webhook: Some(Webhook::new(format!("http://{}/hook", hook.addr)).timeout(Duration::from_secs(2))),
        ..Alerts::default()
    };
    let mut daemon = Daemon::start(&world, "http-01", Some(alerts));

    // Issued by HTTP-01 through the redirect listener (Pebble fetched the answer from it).
    let site = daemon.wait_attempts(&world, 1);
    let acme = &site["acme"];
    assert_eq!(acme["failures"], 0, "{site:#}");
    assert!(acme["last_error"].is_null(), "{site:#}");
    assert_eq!(acme["challenge"], "http-01");
    assert_eq!(acme["domains"], serde_json::json!([DOMAIN]));
    assert!(acme["last_renewal"].is_string(), "{site:#}");
    let state = world.dir.join("xlb-state");
    assert_eq!(mode(&state.join("site")), 0o700);
    assert_eq!(mode(&state.join("site/key.pem")), 0o600);
    let log = daemon.proc().output();
    assert!(log.contains("acme: new certificate stored"), "{log}");
    // Pebble fetched the key authorization from the redirect listener (from several
    // "perspectives", each one request).
    let status: serde_json::Value = serde_json::from_str(&daemon.get(&world, "/api/status")).unwrap();
    let redirect = status["services"].as_array().unwrap().iter().find(|s| s["name"] == "site-http").unwrap();
    assert!(redirect["https"]["responses"]["2xx"].as_u64() >= Some(1), "{redirect:#}");

    // Served by the HTTPS listener with a chain to Pebble's issuing root, and proxied to a
    // backend. This connection stays open, kept alive, across the renewal below.
    let roots = world.issuing_roots();
    let (mut held, first, body) = world.on_client({
        let roots = roots.clone();
        async move {
            let (mut send, leaf) = tls_http1_leaf(https_addr(), DOMAIN, roots).await.unwrap();
            let (status, body) = get(&mut send, "/").await.unwrap();
            assert_eq!(status, StatusCode::OK, "{body}");
            (send, leaf, body)
        }
    });
    assert!(body.starts_with("served by app-"), "{body}");
    assert_eq!(rfc3339_unix(&acme["not_after"]), not_after(&first));
    assert_eq!(site["https"]["cert_not_after"].as_i64(), Some(not_after(&first)), "{site:#}");
    assert_eq!(
        fs::read(state.join("site/cert.pem")).ok().and_then(|pem| {
            CertificateDer::pem_slice_iter(&pem).next().and_then(Result::ok).map(|c| serial(&c))
        }),
        Some(serial(&first)),
        "the stored certificate is the one served"
    );

    // Forced renewal through the CLI, which waits for the outcome.
    let asked = Instant::now();
    let (status, out) = daemon.xlb(&world, &["renew", "site"]);
    println!("xlb renew site: {status} after {} ms: {out}", asked.elapsed().as_millis());
    assert!(status.success(), "xlb renew: {status}\n{out}\n{}", daemon.proc().output());
    assert!(out.contains("site: renewed: new certificate for app.xlb.test valid until"), "{out}");

    // The held connection keeps working (one TLS session: the certificate it was shown at its
    // handshake), and new connections get the new certificate.
    let (still, second) = world.on_client(async move {
        let still = get(&mut held, "/").await;
        let (mut send, leaf) = tls_http1_leaf(https_addr(), DOMAIN, roots).await.unwrap();
        let (status, body) = get(&mut send, "/").await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.starts_with("served by app-"), "{body}");
        // The held one once more, after the new connection: still the same connection.
        let again = get(&mut held, "/").await;
        ((still, again), leaf)
    });
    let ((still, again), second) = (still, second);
    assert!(matches!(&still, Ok((StatusCode::OK, b)) if b.starts_with("served by app-")), "{still:?}");
    assert!(matches!(&again, Ok((StatusCode::OK, _))), "{again:?}");
    assert_ne!(serial(&second), serial(&first), "a renewal brings a new certificate");

    // Status: the new certificate's end, no error, two attempts; the served expiry followed.
    let site = daemon.site(&world);
    let acme = &site["acme"];
    assert_eq!(acme["attempts"], 2, "{site:#}");
    assert_eq!(acme["failures"], 0, "{site:#}");
    assert!(acme["last_error"].is_null(), "{site:#}");
    assert_eq!(rfc3339_unix(&acme["not_after"]), not_after(&second), "{site:#}");
    assert_eq!(site["https"]["cert_not_after"].as_i64(), Some(not_after(&second)), "{site:#}");
    // Not due again for years (Pebble issues long-lived certificates).
    assert!(rfc3339_unix(&acme["next_attempt"]) > rfc3339_unix(&acme["last_renewal"]) + 86_400, "{site:#}");
    let metrics = daemon.get(&world, "/metrics");
    for line in [
        format!("xlb_certificate_not_after_seconds{{service=\"site\"}} {}", not_after(&second)),
        "xlb_acme_renewal_failures{service=\"site\"} 0".to_owned(),
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing `{line}` in:\n{metrics}");
    }
    let (status, table) = daemon.xlb(&world, &["status"]);
    assert!(status.success(), "{table}");
    let expected = format!("acme (http-01) {DOMAIN}: certificate until {}", acme["not_after"].as_str().unwrap());
    assert!(table.contains(&expected), "{table}");
    assert!(!table.contains("FAILING"), "{table}");

    // Asking for a service without ACME, or an unknown one, is refused with the reason.
    let (status, out) = daemon.xlb(&world, &["renew", "site-http"]);
    assert!(!status.success() && out.contains("\"site-http\" does not get its certificate from ACME") && out.contains("these do: site"), "{out}");
    let (status, out) = daemon.xlb(&world, &["renew", "nope"]);
    assert!(!status.success() && out.contains("no service \"nope\""), "{out}");

    // With the CA down a renewal fails: reported with the reason, the certificate stays.
    world.stop_pebble();
    let (status, out) = daemon.xlb(&world, &["renew", "site"]);
    assert!(!status.success(), "xlb renew with the CA down: {out}");
    assert!(out.contains("site: renewal failed:") && out.contains("the current certificate stays"), "{out}");
    let site = daemon.site(&world);
    assert_eq!(site["acme"]["failures"], 1, "{site:#}");
    assert!(site["acme"]["last_error"].is_string(), "{site:#}");
    assert_eq!(rfc3339_unix(&site["acme"]["not_after"]), not_after(&second), "{site:#}");
    let (_, table) = daemon.xlb(&world, &["status"]);
    assert!(table.contains("acme FAILING (1 attempts in a row)"), "{table}");
    let metrics = daemon.get(&world, "/metrics");
    assert!(metrics.lines().any(|l| l == "xlb_acme_renewal_failures{service=\"site\"} 1"), "{metrics}");
    // Alerted once, with the reason; nothing was sent for the successful issues before.
    let failed = hook.wait_for("certificate_renewal_failed");
    assert_eq!(failed["domain"], DOMAIN, "{failed:#}");
    assert!(failed["error"].as_str().is_some_and(|e| !e.is_empty()), "{failed:#}");
    assert_eq!(hook.names(), ["certificate_renewal_failed"]);

    // The CA back (a fresh Pebble, which forgot the account): the next renewal succeeds.
    world.start_pebble();
    let roots = world.issuing_roots();
    let (status, out) = daemon.xlb(&world, &["renew", "site"]);
    assert!(status.success(), "xlb renew after the CA came back: {out}\n{}", daemon.proc().output());
    let third = world.on_client(async move {
        let (mut send, leaf) = tls_http1_leaf(https_addr(), DOMAIN, roots).await.unwrap();
        assert_eq!(get(&mut send, "/").await.unwrap().0, StatusCode::OK);
        leaf
    });
    assert_ne!(serial(&third), serial(&second));
    let site = daemon.site(&world);
    assert_eq!((site["acme"]["failures"].as_u64(), site["acme"]["attempts"].as_u64()), (Some(0), Some(4)), "{site:#}");
    assert!(site["acme"]["last_error"].is_null(), "{site:#}");
    let renewed = hook.wait_for("certificate_renewed");
    assert_eq!(renewed["domain"], DOMAIN, "{renewed:#}");
    assert_eq!(hook.names(), ["certificate_renewal_failed", "certificate_renewed"]);

    // A reload that changes the ACME settings starts the service's manager again with them:
    // it serves the stored certificate at once, and the site goes on serving it.
    let mut renew_sooner = daemon.xlb_toml.clone();
    let acme = renew_sooner.services[0].tls.as_mut().and_then(|tls| tls.acme.as_mut()).expect("service site has ACME");
    acme.renew_before = Some(Dur(Duration::from_secs(10 * 86_400)));
    renew_sooner.write(&daemon.config);
    let (status, out) = daemon.xlb(&world, &["reload"]);
    assert!(status.success() && out.contains("service site: certificates ([service.tls]) changed"), "{out}");
    let site = daemon.site(&world);
    assert_eq!(rfc3339_unix(&site["acme"]["not_after"]), not_after(&third), "the restarted manager serves the stored certificate: {site:#}");
    let roots = world.issuing_roots();
    let served = world.on_client(async move { tls_http1_leaf(https_addr(), DOMAIN, roots).await.unwrap().1 });
    assert_eq!(serial(&served), serial(&third), "the certificate served after the reload");
    daemon.xlb_toml.write(&daemon.config);
    let (status, out) = daemon.xlb(&world, &["reload"]);
    assert!(status.success(), "{out}");

    // A restarted daemon serves the stored certificate at once and orders nothing.
    daemon.restart(&world);
    let site = daemon.site(&world);
    assert_eq!(site["acme"]["attempts"], 0, "{site:#}");
    assert_eq!(rfc3339_unix(&site["acme"]["not_after"]), not_after(&third), "{site:#}");
    let roots = world.issuing_roots();
    let served = world.on_client(async move {
        let (mut send, leaf) = tls_http1_leaf(https_addr(), DOMAIN, roots).await.unwrap();
        assert_eq!(get(&mut send, "/").await.unwrap().0, StatusCode::OK);
        leaf
    });
    assert_eq!(serial(&served), serial(&third));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(daemon.site(&world)["acme"]["attempts"], 0);
    daemon.stop(&world);
}

#[test]
fn http01_issue_serve_and_renew_without_dropping_a_held_connection() {
    xlb_tests::root_or_skip!();
    let world = World::new("acme-http01");
    let lb = Lb::new();
    let (challenges, current) = (lb.challenges.clone(), lb.current.clone());
    world.on_lb(async move {
        serve_http01(SocketAddr::from((LB, 80)), challenges.clone()).await;
        serve_https(https_addr(), challenges, current).await;
    });
    let settings = world.settings("web", ChallengeKind::Http01);
    let manager = lb.spawn(&world, settings.clone());
    wait_for_swaps(&lb, &manager, 1);
    let status = manager.status();
    assert_eq!(status.last_error, None);
    assert!(status.last_renewal.is_some());
    let not_after = status.not_after.expect("not_after");
    // Pebble issues for years: the next attempt is the renewal, 30 days before the end.
    assert_eq!(
        status.next_attempt,
        Some(not_after - xlb::acme::DEFAULT_RENEW_BEFORE),
        "{status:?}"
    );

    // Files: private, and what was handed to the listener.
    let state = settings.state_dir.clone();
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&settings.service_dir()), 0o700);
    for file in [
        settings.cert_path(),
        settings.key_path(),
        settings.account_path(),
    ] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    assert_eq!(
        fs::read(settings.cert_path()).unwrap(),
        lb.swaps.lock().unwrap()[0].1
    );

    // Served to a client that trusts only Pebble's issuing root: the chain is complete.
    let roots = world.issuing_roots();
    let first = lb.serial();
    let (mut held, held_serial, body) = world.on_client({
        let roots = roots.clone();
        async move {
            let (mut send, serial) = tls_http1(https_addr(), DOMAIN, roots).await.unwrap();
            let (status, body) = get(&mut send, "/").await.unwrap();
            assert_eq!(status, StatusCode::OK);
            (send, serial, body)
        }
    });
    assert_eq!(body, "hello");
    assert_eq!(held_serial, first);

    // Forced renewal: a new certificate, swapped in for new connections only. Asked for twice
    // at once, it is one order.
    manager.renew_now();
    manager.renew_now();
    wait_for_swaps(&lb, &manager, 2);
    let second = lb.serial();
    assert_ne!(second, first, "a renewal must bring a new certificate");
    assert_eq!(manager.status().failures, 0);
    let (still_ok, fresh_serial) = world.on_client(async move {
        // The connection opened before the swap still works...
        let still = get(&mut held, "/").await;
        // ...and a new one gets the new certificate.
        let (mut send, serial) = tls_http1(https_addr(), DOMAIN, roots).await.unwrap();
        assert_eq!(get(&mut send, "/").await.unwrap().0, StatusCode::OK);
        (still, serial)
    });
    assert_eq!(still_ok, Ok((StatusCode::OK, "hello".to_owned())));
    assert_eq!(fresh_serial, second);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(lb.swaps(), 2, "one order for two requests made together");
    assert_eq!(
        serial(
            &CertificateDer::pem_file_iter(settings.cert_path())
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
        ),
        second
    );

    // A restart serves the stored certificate at once and orders nothing.
    drop(manager);
    let before = lb.swaps();
    let manager = lb.spawn(&world, settings.clone());
    assert_eq!(
        lb.swaps(),
        before + 1,
        "the stored certificate is handed over by spawn"
    );
    assert_eq!(lb.serial(), second);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lb.swaps(), before + 1);
    let status = manager.status();
    assert_eq!(status.last_renewal, None, "{status:?}");
    assert!(status.next_attempt.unwrap() > SystemTime::now() + Duration::from_secs(86400));

    // A domain added to the settings: the stored certificate is served until one for both
    // names replaces it, at once.
    drop(manager);
    let mut settings = settings;
    settings.domains.push(format!("www.{DOMAIN}"));
    let manager = lb.spawn(&world, settings);
    assert_eq!(lb.swaps(), before + 2);
    assert_eq!(lb.serial(), second);
    wait_for_swaps(&lb, &manager, before + 3);
    let names = {
        let swaps = lb.swaps.lock().unwrap();
        let chain = &swaps.last().unwrap().1;
        let cert = CertificateDer::pem_slice_iter(chain)
            .next()
            .unwrap()
            .unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
        let mut names: Vec<String> = parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        names,
        [
            format!("DNSName({DOMAIN})"),
            format!("DNSName(www.{DOMAIN})")
        ]
    );
}

#[test]
fn tls_alpn01_issue() {
    xlb_tests::root_or_skip!();
    let world = World::new("acme-alpn");
    let lb = Lb::new();
    let (challenges, current) = (lb.challenges.clone(), lb.current.clone());
    // Only port 443: HTTP-01 could not succeed.
    world.on_lb(async move {
        serve_https(https_addr(), challenges, current).await;
    });
    let manager = lb.spawn(&world, world.settings("api", ChallengeKind::TlsAlpn01));
    wait_for_swaps(&lb, &manager, 1);
    assert_eq!(manager.status().last_error, None);
    assert!(
        lb.challenges.tls_alpn01(DOMAIN).is_none(),
        "the answer is withdrawn after the order"
    );
    let roots = world.issuing_roots();
    let serial = world.on_client(async move {
        let (mut send, serial) = tls_http1(https_addr(), DOMAIN, roots).await.unwrap();
        assert_eq!(get(&mut send, "/").await.unwrap().0, StatusCode::OK);
        serial
    });
    assert_eq!(serial, lb.serial());
}

#[test]
fn failures_keep_the_certificate_are_reported_and_retried() {
    xlb_tests::root_or_skip!();
    let world = World::new("acme-fail");
    let lb = Lb::new();
    let (challenges, current) = (lb.challenges.clone(), lb.current.clone());
    world.on_lb({
        let (challenges, current) = (challenges.clone(), current.clone());
        async move {
            serve_https(https_addr(), challenges, current).await;
        }
    });
    let settings = world.settings("shop", ChallengeKind::Http01);

    // Nothing answers HTTP-01 yet: Pebble's validation fails, and says why.
    let manager = lb.spawn(&world, settings.clone());
    wait_until(ISSUE_TIMEOUT, "a failed validation", || {
        manager.status().failures >= 1
    });
    let status: AcmeStatus = manager.status();
    let error = status.last_error.clone().unwrap();
    assert!(error.starts_with("validating the challenges: "), "{error}");
    assert!(
        error.contains(DOMAIN) && error.to_lowercase().contains("connect"),
        "{error}"
    );
    assert_eq!(lb.swaps(), 0);
    assert!(!settings.cert_path().exists());
    // Retried after the (shortened) backoff, until the challenge can be answered.
    world.on_lb(async move {
        serve_http01(SocketAddr::from((LB, 80)), challenges).await;
    });
    wait_for_swaps(&lb, &manager, 1);
    let status = manager.status();
    assert_eq!(
        (status.last_error.clone(), status.failures),
        (None, 0),
        "{status:?}"
    );
    let issued = lb.serial();
    let stored = fs::read(settings.cert_path()).unwrap();

    // The CA goes away: a forced renewal fails, the certificate stays.
    let roots = world.issuing_roots();
    world.stop_pebble();
    manager.renew_now();
    wait_until(ISSUE_TIMEOUT, "a failed renewal", || {
        manager.status().failures == 1
    });
    let failed = manager.status();
    let error = failed.last_error.clone().unwrap();
    assert!(error.starts_with("placing the order: "), "{error}");
    assert!(error.contains("Connection refused"), "{error}");
    assert_eq!(failed.not_after, status.not_after);
    assert_eq!(lb.swaps(), 1);
    assert_eq!(fs::read(settings.cert_path()).unwrap(), stored);
    // Still served.
    let served = world.on_client(async move {
        let (mut send, serial) = tls_http1(https_addr(), DOMAIN, roots).await.unwrap();
        assert_eq!(get(&mut send, "/").await.unwrap().0, StatusCode::OK);
        serial
    });
    assert_eq!(served, issued);
    // The renewal was forced, not due: it waits for its date rather than hammering the CA.
    assert!(failed.next_attempt.unwrap() > SystemTime::now() + Duration::from_secs(86400));

    // A new Pebble knows nothing of the stored account: a new account, and a new certificate.
    world.start_pebble();
    manager.renew_now();
    wait_for_swaps(&lb, &manager, 2);
    assert_ne!(lb.serial(), issued);
    assert_eq!(manager.status().last_error, None);
}

#[test]
fn a_stored_certificate_near_its_end_is_served_then_renewed() {
    xlb_tests::root_or_skip!();
    let world = World::new("acme-due");
    let lb = Lb::new();
    let (challenges, current) = (lb.challenges.clone(), lb.current.clone());
    world.on_lb(async move {
        serve_http01(SocketAddr::from((LB, 80)), challenges.clone()).await;
        serve_https(https_addr(), challenges, current).await;
    });
    // A 70-day certificate with 10 days left, as an earlier run would have stored it: due,
    // since less than 30 days remain.
    let settings = world.settings("old", ChallengeKind::Http01);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![DOMAIN.to_owned()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(60);
    params.not_after = now + time::Duration::days(10);
    let old = params.self_signed(&key).unwrap();
    fs::create_dir_all(settings.service_dir()).unwrap();
    fs::write(settings.cert_path(), old.pem()).unwrap();
    fs::write(settings.key_path(), key.serialize_pem()).unwrap();
    // Looser than the manager's own modes: it tightens them when it writes.
    fs::set_permissions(settings.cert_path(), fs::Permissions::from_mode(0o644)).unwrap();

    let manager = lb.spawn(&world, settings.clone());
    // Served at once, before the CA is asked...
    assert_eq!(
        lb.swaps(),
        1,
        "the stored certificate is handed over by spawn"
    );
    assert_eq!(lb.serial(), serial(old.der()));
    // ...and replaced without being asked.
    wait_for_swaps(&lb, &manager, 2);
    let renewed = lb.serial();
    assert_ne!(renewed, serial(old.der()));
    let status = manager.status();
    assert_eq!(status.last_error, None);
    assert!(status.not_after.unwrap() > SystemTime::now() + Duration::from_secs(365 * 86400));
    assert_eq!(mode(&settings.cert_path()), 0o600);
    assert_eq!(mode(&settings.service_dir()), 0o700);
    let roots = world.issuing_roots();
    let served = world.on_client(async move {
        let (mut send, serial) = tls_http1(https_addr(), DOMAIN, roots).await.unwrap();
        assert_eq!(get(&mut send, "/").await.unwrap().0, StatusCode::OK);
        serial
    });
    assert_eq!(served, renewed);
}

/// TLS-ALPN-01 through the daemon: Pebble validates on port 443 itself, where the HTTPS
/// listener answers `acme-tls/1` with the challenge certificate and everyone else with the
/// issued one.
#[test]
fn daemon_issues_by_tls_alpn01_on_its_https_listener() {
    xlb_tests::root_or_skip!();
    let world = World::new("acme-xlb-alpn");
    let daemon = Daemon::start(&world, "tls-alpn-01", None);
    let site = daemon.wait_attempts(&world, 1);
    assert_eq!(site["acme"]["failures"], 0, "{site:#}\n{}", daemon.proc().output());
    assert_eq!(site["acme"]["challenge"], "tls-alpn-01");
    let roots = world.issuing_roots();
    let (leaf, body) = world.on_client(async move {
        let (mut send, leaf) = tls_http1_leaf(https_addr(), DOMAIN, roots).await.unwrap();
        let (status, body) = get(&mut send, "/").await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        (leaf, body)
    });
    assert!(body.starts_with("served by app-"), "{body}");
    assert_eq!(rfc3339_unix(&site["acme"]["not_after"]), not_after(&leaf));
    // No HTTP-01 request reached the redirect listener: its counters saw nothing.
    let status: serde_json::Value = serde_json::from_str(&daemon.get(&world, "/api/status")).unwrap();
    let redirect = status["services"].as_array().unwrap().iter().find(|s| s["name"] == "site-http").unwrap();
    assert_eq!(redirect["https"]["responses"]["2xx"], 0, "{redirect:#}");
    daemon.stop(&world);
}

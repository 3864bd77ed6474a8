//! The HTTPS scenarios' world: the topology, the daemon with an L4 service (port 8080), an
//! `https` service (port 443, certificates from a CA made at run time) and a `redirect`
//! service (port 80) over the three backends, and a TLS client trusting the test CA.
use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use serde_json::Value;

use crate::{
    Answer, BACKENDS, Conn, Family, HEALTH_INTERVAL, HEALTH_TIMEOUT, IO_TIMEOUT, Lb, Pki, Proc, app_index, client_config,
    config::{Dur, Limits, Service, Timeouts, XlbConfig},
    probes, run, ADMIN,
};

/// The name the certificate is for, and what requests ask for.
pub const SITE: &str = "site.test";
pub const HTTPS_PORT: u16 = 443;
pub const HTTP_PORT: u16 = 80;
pub const L4_PORT: u16 = 8080;
/// The HTTPS service's timeouts in these tests: short, so that the slow-client cases finish
/// quickly.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
pub const BACKEND_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_HEADER_BYTES: u64 = 16_384;
pub const MAX_BODY: usize = 1 << 20;

/// The topology, the daemon with an L4, an HTTPS and a redirect service, and a TLS client
/// trusting the test CA.
pub struct Site {
    pub lb: Lb,
    pub pki: Pki,
    pub ip: IpAddr,
    pub tls: Arc<rustls::ClientConfig>,
    pub rt: tokio::runtime::Runtime,
}

impl Site {
    pub fn start(tag: &str) -> Site {
        Site::start_with(tag, "")
    }

    /// `start`, with `http` as the HTTPS service's `[service.http]` table body.
    pub fn start_with(tag: &str, http: &str) -> Site {
        Site::start_custom(tag, |s| s.http(http))
    }

    /// `start`, with the HTTPS service as `https` makes it from this module's (which sets the
    /// timeouts and limits above).
    pub fn start_custom(tag: &str, https: impl FnOnce(Service) -> Service) -> Site {
        let mut lb = Site::prepare(tag);
        for i in 0..BACKENDS {
            let app = spawn_app(&lb, i);
            lb.apps.push(Some(app));
        }
        Site::run(lb, https)
    }

    /// The topology with the L4 VIP on port 8080; no backend and no daemon yet (`run` starts
    /// the daemon once the caller's backends listen).
    pub fn prepare(tag: &str) -> Lb {
        let mut lb = Lb::prepare(tag, Family::V4);
        let ip: IpAddr = lb.topo.lb_v4.into();
        lb.vip = SocketAddr::new(ip, L4_PORT);
        lb
    }

    /// Writes the config (the HTTPS service made by `https`), starts the daemon and waits for
    /// every backend to be up and healthy on both services.
    pub fn run(mut lb: Lb, https: impl FnOnce(Service) -> Service) -> Site {
        let ip = lb.vip.ip();
        let pki = Site::pki(&lb);
        write_config(&lb, &pki, https);
        lb.start_daemon();
        lb.wait_healthy();
        let site = Site { tls: client_config(&pki.ca_path()), pki, ip, lb, rt: runtime() };
        site.lb.poll(Duration::from_secs(10), "the HTTPS service's backends up and healthy", |lb| {
            let status = lb.status();
            let site = &status["services"][1];
            let ok = site["name"] == "site"
                && site["mode"] == "https"
                && site["backends"].as_array().is_some_and(|b| {
                    b.len() == BACKENDS && b.iter().all(|b| b["state"] == "up" && b["healthy"] == true)
                });
            ok.then_some(()).ok_or_else(|| format!("{site}"))
        });
        site
    }

    /// The test CA, with a certificate for `SITE` (and the lb address) installed.
    pub fn pki(lb: &Lb) -> Pki {
        let pki = Pki::new(&lb.dir, &[SITE, "198.18.0.1"]);
        pki.install("first");
        pki
    }

    pub fn https(&self) -> SocketAddr {
        SocketAddr::new(self.ip, HTTPS_PORT)
    }

    pub fn http(&self) -> SocketAddr {
        SocketAddr::new(self.ip, HTTP_PORT)
    }

    /// A TCP connection from the client namespace.
    pub fn tcp(&self, to: SocketAddr) -> TcpStream {
        let stream = self
            .lb
            .topo
            .in_client(|| TcpStream::connect_timeout(&to, IO_TIMEOUT))
            .unwrap_or_else(|e| panic!("connecting to {to} from the client namespace: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream
    }

    /// A new HTTPS connection (HTTP/2 when `h2`, else HTTP/1.1, by ALPN).
    pub fn connect(&self, h2: bool) -> Result<Conn, String> {
        let tcp = self.tcp(self.https());
        self.rt.block_on(Conn::open(tcp, self.tls.clone(), SITE, h2))
    }

    /// A new HTTPS connection speaking raw HTTP/2 frames; the TLS handshake is done, the
    /// HTTP/2 one is not.
    pub fn raw_h2(&self, timeout: Duration) -> crate::h2raw::H2 {
        crate::h2raw::H2::open(self.tcp(self.https()), &self.tls, SITE, timeout)
            .unwrap_or_else(|e| panic!("a raw HTTP/2 connection to {}: {e}", self.https()))
    }

    /// One request on a new connection.
    pub fn request(&self, h2: bool, method: &str, path: &str, headers: &[(&str, &str)]) -> Result<Answer, String> {
        let mut conn = self.connect(h2)?;
        self.rt.block_on(conn.send(method, path, headers, Bytes::new()))
    }

    /// `GET /` on a new connection: the index of the backend that answered.
    pub fn get(&self) -> usize {
        let answer = self.request(false, "GET", "/", &[]).unwrap_or_else(|e| panic!("GET https://{SITE}/: {e}"));
        assert_eq!(answer.status, 200, "{answer:?}");
        self.backend_of(&answer)
    }

    /// Which backend answered, by `X-Backend-Server`, checked against the body.
    pub fn backend_of(&self, answer: &Answer) -> usize {
        let server = answer.header("x-backend-server").unwrap_or_else(|| panic!("no X-Backend-Server: {answer:?}"));
        let b = self
            .lb
            .backends
            .iter()
            .position(|a| a.to_string() == server)
            .unwrap_or_else(|| panic!("X-Backend-Server {server} is none of the backends {:?}", self.lb.backends));
        if answer.body.starts_with("served by") {
            assert_eq!(app_index(&answer.body), b, "X-Backend-Server {server} disagrees with the body {:?}", answer.body);
        }
        b
    }

    /// `/api/status`'s view of the HTTPS service.
    pub fn site_status(&self) -> Value {
        let status = self.lb.status();
        let site = status["services"][1].clone();
        assert_eq!(site["name"], "site", "{status:#}");
        site
    }

    /// `curl` in the client namespace, resolving `SITE` to the lb address and trusting the CA.
    pub fn curl(&self, args: &[&str]) -> (std::process::ExitStatus, String) {
        let mut cmd = self.lb.topo.client("curl");
        cmd.args(["-sS", "--max-time", "10", "--cacert"])
            .arg(self.pki.ca_path())
            .args(["--resolve", &format!("{SITE}:{HTTPS_PORT}:{}", self.ip)])
            .args(args);
        run(cmd, "curl")
    }

    pub fn openssl(&self, args: &[&str]) -> (std::process::ExitStatus, String) {
        let mut cmd = self.lb.topo.client("openssl");
        cmd.args(["s_client", "-connect", &self.https().to_string(), "-servername", SITE, "-CAfile"])
            .arg(self.pki.ca_path())
            .args(args);
        run(cmd, "openssl s_client")
    }
}

/// A current-thread runtime for a test thread's client connections.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A demo backend that logs every request, which the tests count.
pub fn spawn_app(lb: &Lb, i: usize) -> Proc {
    lb.spawn_app_with(i, &["--log-requests"])
}

/// Writes the config `site_config` makes.
pub fn write_config(lb: &Lb, pki: &Pki, https: impl FnOnce(Service) -> Service) {
    lb.write(&site_config(lb, pki, https));
}

/// The config: the L4 service, the HTTPS service as `https` makes it from the one with this
/// module's timeouts and limits, and the redirect service.
pub fn site_config(lb: &Lb, pki: &Pki, https: impl FnOnce(Service) -> Service) -> XlbConfig {
    let health = probes(HEALTH_INTERVAL, HEALTH_TIMEOUT);
    let ip = lb.vip.ip();
    let site = Service::https("site", SocketAddr::new(ip, HTTPS_PORT))
        .backends(&lb.backends)
        .max_fails(1)
        .fail_timeout(Duration::from_secs(10))
        .tls(pki.tls())
        .timeouts(Timeouts {
            handshake: Some(Dur(HANDSHAKE_TIMEOUT)),
            request_header: Some(Dur(HEADER_TIMEOUT)),
            idle: Some(Dur(IDLE_TIMEOUT)),
            backend_connect: Some(Dur(Duration::from_secs(1))),
            backend_response: Some(Dur(BACKEND_RESPONSE_TIMEOUT)),
        })
        .limits(Limits {
            max_header_bytes: Some(MAX_HEADER_BYTES),
            max_headers: Some(50),
            max_body_bytes: Some(MAX_BODY as u64),
        })
        .health(health.clone());
    XlbConfig::new([&lb.topo.lb_if], &lb.topo.pin_path)
        .admin(ADMIN)
        .service(Service::l4("web", lb.vip).backends(&lb.backends).health(health))
        .service(https(site))
        .service(Service::redirect("site-http", SocketAddr::new(ip, HTTP_PORT)))
}

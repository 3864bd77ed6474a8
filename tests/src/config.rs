//! xlb.toml from typed values: the tests and `cargo xtask` say what the config holds, and the
//! `toml` serializer does the quoting and escaping that hand-written `format!` text got wrong
//! as soon as a path or a string held a quote or a backslash.
//!
//! Only the keys the scenarios use are here; every one is optional unless xlb requires it, and
//! an unset one is left out of the file (so xlb's default applies, as when the text omitted it).
//! Tables come out as `[dataplane]`, `[admin]`, `[acme]`, `[[service]]` (with `[service.tls]`,
//! `[service.health]`, …) and `[alerts]`, in that order.
use std::{fmt::Display, path::Path, time::Duration};

use serde::{Serialize, Serializer};

/// A duration as xlb's config writes it: whole seconds as `"10s"`, anything else in
/// milliseconds (`"200ms"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ms = self.0.as_millis();
        assert_eq!(Duration::from_millis(ms as u64), self.0, "xlb durations are whole milliseconds: {:?}", self.0);
        if ms.is_multiple_of(1000) { s.serialize_str(&format!("{}s", ms / 1000)) } else { s.serialize_str(&format!("{ms}ms")) }
    }
}

fn strings<T: Display>(items: impl IntoIterator<Item = T>) -> Vec<String> {
    items.into_iter().map(|i| i.to_string()).collect()
}

fn path(p: impl AsRef<Path>) -> String {
    let p = p.as_ref();
    p.to_str().unwrap_or_else(|| panic!("{} is not UTF-8, which TOML cannot hold", p.display())).to_owned()
}

/// A whole xlb.toml.
#[derive(Clone, Debug, Serialize)]
pub struct XlbConfig {
    pub dataplane: Dataplane,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme: Option<Acme>,
    #[serde(rename = "service", skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alerts: Option<Alerts>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Dataplane {
    pub interfaces: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xdp_mode: Option<String>,
    pub pin_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_flows: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Admin {
    pub listen: String,
}

/// The top-level `[acme]` table.
#[derive(Clone, Debug, Serialize)]
pub struct Acme {
    pub state_dir: String,
}

impl XlbConfig {
    /// `[dataplane]` with these interfaces and pins under `pin_path`, and nothing else yet.
    pub fn new<I: Display>(interfaces: impl IntoIterator<Item = I>, pin_path: impl AsRef<Path>) -> XlbConfig {
        XlbConfig {
            dataplane: Dataplane { interfaces: strings(interfaces), xdp_mode: None, pin_path: path(pin_path), max_flows: None },
            admin: None,
            acme: None,
            services: Vec::new(),
            alerts: None,
        }
    }

    pub fn interfaces<I: Display>(mut self, interfaces: impl IntoIterator<Item = I>) -> Self {
        self.dataplane.interfaces = strings(interfaces);
        self
    }

    pub fn xdp_mode(mut self, mode: &str) -> Self {
        self.dataplane.xdp_mode = Some(mode.to_owned());
        self
    }

    pub fn max_flows(mut self, n: u32) -> Self {
        self.dataplane.max_flows = Some(n);
        self
    }

    /// `[admin] listen`.
    pub fn admin(mut self, listen: impl Display) -> Self {
        self.admin = Some(Admin { listen: listen.to_string() });
        self
    }

    /// `[acme] state_dir`.
    pub fn acme_state_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.acme = Some(Acme { state_dir: path(dir) });
        self
    }

    /// Appends a `[[service]]`.
    pub fn service(mut self, service: Service) -> Self {
        self.services.push(service);
        self
    }

    /// Replaces the service named `name` by what `f` makes of it. Panics if there is none.
    pub fn edit_service(mut self, name: &str, f: impl FnOnce(Service) -> Service) -> Self {
        let i = self
            .services
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name:?} in the config"));
        let service = self.services.remove(i);
        self.services.insert(i, f(service));
        self
    }

    pub fn alerts(mut self, alerts: Alerts) -> Self {
        self.alerts = Some(alerts);
        self
    }

    /// The TOML text.
    pub fn render(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| panic!("rendering the config as TOML: {e}\n{self:#?}"))
    }

    /// Writes the TOML text to `file`.
    pub fn write(&self, file: impl AsRef<Path>) {
        let file = file.as_ref();
        std::fs::write(file, self.render()).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
    }
}

/// One `[[service]]`. Plain keys come before the sub-tables, as TOML needs them to.
#[derive(Clone, Debug, Serialize)]
pub struct Service {
    pub name: String,
    pub listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_fails: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_timeout: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// `[service.http]`, as TOML: its keys are many and the tests pass them through as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<toml::Table>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

impl Service {
    /// A service without `mode` (xlb's default applies).
    pub fn new(name: &str, listen: impl Display) -> Service {
        Service {
            name: name.to_owned(),
            listen: listen.to_string(),
            mode: None,
            backends: Vec::new(),
            max_fails: None,
            fail_timeout: None,
            tls: None,
            timeouts: None,
            limits: None,
            http: None,
            health: None,
        }
    }

    pub fn l4(name: &str, listen: impl Display) -> Service {
        Service::new(name, listen).mode("l4")
    }

    pub fn https(name: &str, listen: impl Display) -> Service {
        Service::new(name, listen).mode("https")
    }

    pub fn redirect(name: &str, listen: impl Display) -> Service {
        Service::new(name, listen).mode("redirect")
    }

    pub fn mode(mut self, mode: &str) -> Self {
        self.mode = Some(mode.to_owned());
        self
    }

    pub fn backends<B: Display>(mut self, backends: impl IntoIterator<Item = B>) -> Self {
        self.backends = strings(backends);
        self
    }

    pub fn max_fails(mut self, n: u32) -> Self {
        self.max_fails = Some(n);
        self
    }

    pub fn fail_timeout(mut self, d: Duration) -> Self {
        self.fail_timeout = Some(Dur(d));
        self
    }

    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = Some(timeouts);
        self
    }

    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// `[service.http]` from TOML text (`key = value` lines); panics if it is not TOML.
    pub fn http(mut self, keys: &str) -> Self {
        let table = keys.parse::<toml::Table>().unwrap_or_else(|e| panic!("[service.http] {keys:?} is not TOML: {e}"));
        self.http = Some(table);
        self
    }

    pub fn health(mut self, health: Health) -> Self {
        self.health = Some(health);
        self
    }
}

/// `[service.health]`.
#[derive(Clone, Debug, Serialize)]
pub struct Health {
    pub check: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
}

impl Health {
    /// `check = "http"` on `path`.
    pub fn http(path: &str) -> Health {
        Health { check: "http".into(), path: Some(path.to_owned()), interval: None, timeout: None, rise: None, fall: None }
    }

    /// `check = "tcp"`.
    pub fn tcp() -> Health {
        Health { check: "tcp".into(), path: None, interval: None, timeout: None, rise: None, fall: None }
    }

    pub fn interval(mut self, d: Duration) -> Self {
        self.interval = Some(Dur(d));
        self
    }

    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(Dur(d));
        self
    }

    pub fn rise(mut self, n: u32) -> Self {
        self.rise = Some(n);
        self
    }

    pub fn fall(mut self, n: u32) -> Self {
        self.fall = Some(n);
        self
    }
}

/// `[service.tls]`: certificate files, or ACME.
#[derive(Clone, Debug, Serialize)]
pub struct Tls {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme: Option<TlsAcme>,
}

impl Tls {
    pub fn files(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Tls {
        Tls { cert: Some(path(cert)), key: Some(path(key)), acme: None }
    }

    pub fn acme(acme: TlsAcme) -> Tls {
        Tls { cert: None, key: None, acme: Some(acme) }
    }
}

/// `[service.tls] acme`.
#[derive(Clone, Debug, Serialize)]
pub struct TlsAcme {
    pub directory: String,
    pub contact: String,
    pub domains: Vec<String>,
    /// The ACME server's CA file.
    pub ca: String,
    pub challenge: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renew_before: Option<Dur>,
}

impl TlsAcme {
    pub fn new(directory: impl Display, contact: &str, domains: &[&str], ca: impl AsRef<Path>, challenge: &str) -> TlsAcme {
        TlsAcme {
            directory: directory.to_string(),
            contact: contact.to_owned(),
            domains: strings(domains),
            ca: path(ca),
            challenge: challenge.to_owned(),
            renew_before: None,
        }
    }
}

/// `[service.timeouts]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timeouts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_header: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_connect: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_response: Option<Dur>,
}

/// `[service.limits]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Limits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_header_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_headers: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
}

/// `[alerts]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Alerts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_minute: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<Email>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
}

/// `[alerts.email]`.
#[derive(Clone, Debug, Serialize)]
pub struct Email {
    pub host: String,
    pub port: u16,
    pub tls: String,
    pub from: String,
    pub to: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// `[alerts.webhook]`.
#[derive(Clone, Debug, Serialize)]
pub struct Webhook {
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

impl Webhook {
    pub fn new(url: impl Display) -> Webhook {
        Webhook { url: url.to_string(), timeout: None, ca_file: None }
    }

    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(Dur(d));
        self
    }

    pub fn ca_file(mut self, file: impl AsRef<Path>) -> Self {
        self.ca_file = Some(path(file));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> toml::Table {
        text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// The harness's config, rendered, means what its hand-written text did.
    #[test]
    fn renders_the_l4_harness_config() {
        let config = XlbConfig::new(["xlb0"], "/sys/fs/bpf/xlbt-x-1-0")
            .xdp_mode("auto")
            .admin("127.0.0.1:9100")
            .service(
                Service::l4("web", "198.18.0.1:80")
                    .backends(["198.18.0.1:8001", "198.18.0.1:8002"])
                    .max_fails(0)
                    .health(
                        Health::http("/health")
                            .interval(Duration::from_millis(200))
                            .timeout(Duration::from_millis(100))
                            .rise(2)
                            .fall(2),
                    ),
            );
        let text = config.render();
        let expected = r#"[dataplane]
interfaces = ["xlb0"]
xdp_mode = "auto"
pin_path = "/sys/fs/bpf/xlbt-x-1-0"

[admin]
listen = "127.0.0.1:9100"

[[service]]
name = "web"
listen = "198.18.0.1:80"
mode = "l4"
backends = ["198.18.0.1:8001", "198.18.0.1:8002"]
max_fails = 0

[service.health]
check = "http"
path = "/health"
interval = "200ms"
timeout = "100ms"
rise = 2
fall = 2
"#;
        assert_eq!(parse(&text), parse(expected), "{text}");
        // Tests edit the rendered text by these substrings (reload.rs): they must stay.
        for needle in ["[dataplane]\n", "rise = 2", "xdp_mode = \"auto\"", ", \"198.18.0.1:8002\""] {
            assert!(text.contains(needle), "{needle:?} in\n{text}");
        }
    }

    #[test]
    fn renders_https_acme_and_alerts() {
        let config = XlbConfig::new(["xlb0"], "/p")
            .acme_state_dir("/tmp/st")
            .service(
                Service::https("site", "198.18.0.1:443")
                    .backends(["198.18.0.1:8001"])
                    .fail_timeout(Duration::from_secs(10))
                    .tls(Tls::acme(TlsAcme::new("https://ca:14000/dir", "mailto:ops@xlb.test", &["site.test"], "/ca.pem", "http-01")))
                    .timeouts(Timeouts { handshake: Some(Dur(Duration::from_millis(2000))), ..Timeouts::default() })
                    .limits(Limits { max_body_bytes: Some(1 << 20), ..Limits::default() })
                    .http("backend_header = false"),
            )
            .service(Service::redirect("site-http", "198.18.0.1:80"))
            .service(Service::new("api", "198.18.0.1:81").backends(["198.18.0.1:8001"]))
            .alerts(Alerts {
                max_per_minute: Some(30),
                email: Some(Email {
                    host: "198.18.0.1".into(),
                    port: 2525,
                    tls: "none".into(),
                    from: "xlb <xlb@xlb.test>".into(),
                    to: vec!["ops@xlb.test".into()],
                    timeout: None,
                    ca_file: None,
                }),
                webhook: Some(Webhook::new("http://h/hook").timeout(Duration::from_secs(2)).ca_file("/a \"b\"\\c")),
            });
        let text = config.render();
        let expected = r#"[dataplane]
interfaces = ["xlb0"]
pin_path = "/p"

[acme]
state_dir = "/tmp/st"

[[service]]
name = "site"
listen = "198.18.0.1:443"
mode = "https"
backends = ["198.18.0.1:8001"]
fail_timeout = "10s"
[service.tls]
acme = { directory = "https://ca:14000/dir", contact = "mailto:ops@xlb.test", domains = ["site.test"], ca = "/ca.pem", challenge = "http-01" }
[service.timeouts]
handshake = "2s"
[service.limits]
max_body_bytes = 1048576
[service.http]
backend_header = false

[[service]]
name = "site-http"
listen = "198.18.0.1:80"
mode = "redirect"

[[service]]
name = "api"
listen = "198.18.0.1:81"
backends = ["198.18.0.1:8001"]

[alerts]
max_per_minute = 30

[alerts.email]
host = "198.18.0.1"
port = 2525
tls = "none"
from = "xlb <xlb@xlb.test>"
to = ["ops@xlb.test"]

[alerts.webhook]
url = "http://h/hook"
timeout = "2s"
ca_file = '/a "b"\c'
"#;
        assert_eq!(parse(&text), parse(expected), "{text}");
    }

    #[test]
    fn an_empty_http_table_is_kept() {
        let text = XlbConfig::new(["xlb0"], "/p").service(Service::https("s", "1.2.3.4:443").http("")).render();
        assert!(parse(&text)["service"][0]["http"].as_table().is_some_and(|t| t.is_empty()), "{text}");
    }

    #[test]
    fn durations_are_seconds_or_milliseconds() {
        let ser = |d| toml::Value::try_from(Dur(d)).unwrap();
        assert_eq!(ser(Duration::from_secs(1)), toml::Value::from("1s"));
        assert_eq!(ser(Duration::from_millis(1500)), toml::Value::from("1500ms"));
        assert_eq!(ser(Duration::from_millis(200)), toml::Value::from("200ms"));
    }
}

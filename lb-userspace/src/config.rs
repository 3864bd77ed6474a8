//! `xlb.toml`: parsing and validation.
//!
//! The file is deserialized into `Raw*` types that keep every value's byte span, then validated
//! into the plain public types. Every error names the file, the line, the key, what is wrong and
//! how to fix it, because the person reading it is editing that file.
use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{
    flow::DEFAULT_MAX_FLOWS,
    service::{MAX_BACKENDS_PER_SERVICE, MAX_SERVICES},
};
pub use crate::acme::ChallengeKind;
use serde::Deserialize;
use serde_spanned::Spanned;

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/xlb";
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9100);
const MAX_FLOWS_RANGE: std::ops::RangeInclusive<i64> = 1024..=(1 << 24);
const MAX_NAME_LEN: usize = 64;
/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const MAX_IFNAME_LEN: usize = 15;

#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub dataplane: Dataplane,
    pub admin: Admin,
    pub services: Vec<Service>,
    /// `[alerts]`: where to send alerts about backends and certificates; `None` sends none.
    pub alerts: Option<AlertsConfig>,
    /// `[acme]`: where the ACME accounts and certificates are kept.
    pub acme: AcmeSection,
    /// Where values checked by `check_system` sit in the file, so its errors can name the line.
    lines: Lines,
}

#[derive(Clone, Debug, Default)]
struct Lines {
    interfaces: Vec<usize>,
    backends: Vec<Vec<usize>>,
}

/// Two configs are equal when they mean the same thing; where the values sit in the file (which
/// moves with every comment edited) does not count.
impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        (&self.path, &self.dataplane, &self.admin, &self.services, &self.alerts, &self.acme)
            == (&other.path, &other.dataplane, &other.admin, &other.services, &other.alerts, &other.acme)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataplane {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    pub max_flows: u32,
    pub pin_path: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Native (driver) mode where the driver supports it, generic (skb) mode otherwise.
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admin {
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub listen: SocketAddr,
    pub mode: ServiceMode,
    /// Empty for a `redirect` service, which has none.
    pub backends: Vec<SocketAddr>,
    pub health: Health,
    /// Passive health (nginx semantics): this many failed connections to a backend within
    /// `fail_timeout` take it out until its health checks pass again; 0 disables.
    pub max_fails: u32,
    pub fail_timeout: Duration,
    /// A backend back up after being down ramps its share of new connections up over this
    /// long; zero: at once.
    pub slow_start: Duration,
    /// TLS, headers, timeouts and limits of an `https` service; `None` for the other modes.
    pub https: Option<Https>,
}

pub const DEFAULT_MAX_FAILS: u32 = 1;
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `fail_timeout` and `slow_start` (the data path's arithmetic is sized for it).
pub const MAX_PASSIVE_DURATION: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceMode {
    /// Connections balanced by the XDP data path.
    L4,
    /// TLS terminated and HTTP proxied by the daemon itself.
    Https,
    /// Plain HTTP answered with a 301 to https (and ACME HTTP-01 challenges).
    Redirect,
}

impl ServiceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceMode::L4 => "l4",
            ServiceMode::Https => "https",
            ServiceMode::Redirect => "redirect",
        }
    }
}

/// Everything an `https` service has beyond its backends and health checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Https {
    pub tls: Tls,
    pub http: HttpHeaders,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// Passive health, as nginx's `max_fails`: this many failed requests within `fail_timeout`
    /// take a backend out until its probes pass `rise` times. 0 turns passive health off.
    pub max_fails: u32,
    pub fail_timeout: Duration,
}

/// Where an `https` service's certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tls {
    /// PEM files, one pair per certificate; the ClientHello's SNI picks among them, the first
    /// is the default.
    Files(Vec<CertFiles>),
    /// Issued and renewed by xlb's ACME client.
    Acme(Acme),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acme {
    /// The ACME directory URL.
    pub directory: String,
    /// Account contacts, e.g. `mailto:ops@example.com`.
    pub contact: Vec<String>,
    pub domains: Vec<String>,
    /// An extra trusted root (PEM) for a private ACME server such as Pebble.
    pub ca: Option<PathBuf>,
    /// HTTP-01 (through a `redirect` service on port 80) or TLS-ALPN-01 (on this listener).
    pub challenge: ChallengeKind,
    /// Renew when the certificate has less than this left.
    pub renew_before: Duration,
}

/// The top-level `[acme]` table, shared by every service whose certificate comes from ACME.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcmeSection {
    /// Accounts (`account.json`) and each service's certificate and key (`<service>/`).
    pub state_dir: PathBuf,
}

impl Default for AcmeSection {
    fn default() -> AcmeSection {
        AcmeSection { state_dir: PathBuf::from(DEFAULT_ACME_STATE_DIR) }
    }
}

/// systemd's `StateDirectory=xlb` creates /var/lib/xlb for the unit.
pub const DEFAULT_ACME_STATE_DIR: &str = "/var/lib/xlb/acme";
/// Bounds of `renew_before`: an hour is the least that leaves room for retries; past a year
/// every certificate a public CA issues would be renewed at two thirds of its life anyway.
const RENEW_BEFORE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(3600)..=Duration::from_secs(365 * 24 * 3600);

/// Response headers an `https` service adds (`None`: not added). Set by `[service.http]`; an
/// empty string there turns a header off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpHeaders {
    /// `X-Backend-Server: <address>`.
    pub backend_header: bool,
    pub hsts: Option<String>,
    pub frame_options: Option<String>,
    pub content_type_options: Option<String>,
    pub referrer_policy: Option<String>,
}

impl Default for HttpHeaders {
    fn default() -> Self {
        HttpHeaders {
            backend_header: true,
            hsts: Some("max-age=31536000; includeSubDomains".into()),
            frame_options: Some("SAMEORIGIN".into()),
            content_type_options: Some("nosniff".into()),
            referrer_policy: Some("strict-origin-when-cross-origin".into()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// From accept to a finished TLS handshake.
    pub handshake: Duration,
    /// From the first byte of a request head (or the end of the previous request on a
    /// keep-alive connection) to its last.
    pub request_header: Duration,
    /// A connection with no request in flight and no bytes moving is closed after this.
    pub idle: Duration,
    /// Connecting to a backend.
    pub backend_connect: Duration,
    /// From sending a request to a backend to its response head.
    pub backend_response: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            request_header: Duration::from_secs(30),
            idle: Duration::from_secs(75),
            backend_connect: Duration::from_secs(3),
            backend_response: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one request head (request line and headers); more is answered 431.
    pub max_header_bytes: usize,
    /// Headers in one request; more is answered 431.
    pub max_headers: usize,
    /// Bytes of one request body; more is answered 413. `None`: unlimited.
    pub max_body_bytes: Option<u64>,
    /// Client connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub h2_max_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_body_bytes: None,
            max_connections: 10_000,
            h2_max_streams: 128,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub check: CheckKind,
    /// Request path of HTTP checks; validated to be a valid origin-form request target.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            check: CheckKind::Http,
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckKind {
    Http,
    Tcp,
}

/// `path:line: message`, where the message names the key, the problem and the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based; `None` when the problem is not at one place in the file.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    dataplane: Option<RawDataplane>,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default, rename = "service")]
    services: Vec<Spanned<RawService>>,
    alerts: Option<Spanned<RawAlerts>>,
    acme: Option<Spanned<RawAcmeSection>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcmeSection {
    state_dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    interfaces: Spanned<Vec<Spanned<String>>>,
    xdp_mode: Option<Spanned<String>>,
    max_flows: Option<Spanned<i64>>,
    pin_path: Option<Spanned<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    listen: Spanned<String>,
    mode: Option<Spanned<String>>,
    backends: Option<Spanned<Vec<Spanned<String>>>>,
    health: Option<Spanned<RawHealth>>,
    tls: Option<Spanned<RawTls>>,
    http: Option<Spanned<RawHttp>>,
    timeouts: Option<Spanned<RawTimeouts>>,
    limits: Option<Spanned<RawLimits>>,
    max_fails: Option<Spanned<i64>>,
    fail_timeout: Option<Spanned<String>>,
    slow_start: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    certs: Option<Spanned<Vec<RawCertPair>>>,
    acme: Option<Spanned<RawAcme>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertPair {
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcme {
    directory: Spanned<String>,
    contact: Option<Spanned<StringOrList>>,
    domains: Spanned<Vec<Spanned<String>>>,
    ca: Option<Spanned<String>>,
    challenge: Option<Spanned<String>>,
    renew_before: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    backend_header: Option<bool>,
    hsts: Option<Spanned<String>>,
    frame_options: Option<Spanned<String>>,
    content_type_options: Option<Spanned<String>>,
    referrer_policy: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    handshake: Option<Spanned<String>>,
    request_header: Option<Spanned<String>>,
    idle: Option<Spanned<String>>,
    backend_connect: Option<Spanned<String>>,
    backend_response: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_header_bytes: Option<Spanned<i64>>,
    max_headers: Option<Spanned<i64>>,
    max_body_bytes: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    h2_max_streams: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
}

/// The file being validated: turns byte offsets into line numbers for errors.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn error(&self, line: Option<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.to_owned(),
            line,
            message: message.into(),
        }
    }

    fn at<T>(&self, value: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error(Some(self.line(value.span().start)), message)
    }

    fn toml(&self, err: &toml::de::Error) -> ConfigError {
        // toml's messages span several lines (`expected ..., found ...`); one line reads better
        // after the `path:line:` prefix.
        let mut message = err
            .message()
            .trim()
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("; ");
        message = message.replace("expected i64", "expected an integer");
        let line = err.span().map(|span| self.line(span.start));
        // toml's messages name neither the key nor the table; quoting the line does.
        let code = line
            .and_then(|l| self.text.lines().nth(l - 1))
            .map(str::trim)
            .unwrap_or("");
        if !code.is_empty() {
            let code: String = code.chars().take(80).collect();
            message += &format!(" (at `{code}`)");
        }
        if code.starts_with("[service]") {
            message +=
                "; write [[service]] with double brackets: there is one such table per service";
        }
        self.error(line, message)
    }
}

impl Config {
    /// Parse + validate. Does not touch kernel state (only read-only lookups of interfaces and
    /// addresses).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            line: None,
            message: format!(
                "cannot read the config file: {e}; check the path and its permissions"
            ),
        })?;
        let mut config = Config::parse(path, &text)?;
        config.check_system()?;
        config.read_secrets()?;
        Ok(config)
    }

    /// Syntax and every check that needs no system lookup.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let src = Source { path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| src.toml(&e))?;
        let dataplane = raw.dataplane.ok_or_else(|| {
            src.error(
                None,
                "missing [dataplane] section; add one with at least `interfaces = [\"eth0\"]`",
            )
        })?;
        let (dataplane, interface_lines) = parse_dataplane(&src, dataplane)?;
        let admin = parse_admin(&src, raw.admin)?;
        let (services, backend_lines) = parse_services(&src, raw.services)?;
        let alerts = raw.alerts.map(|a| parse_alerts(&src, a)).transpose()?;
        let acme = raw.acme.map(|a| parse_acme_section(&src, a)).transpose()?.unwrap_or_default();
        Ok(Config {
            path: path.to_owned(),
            dataplane,
            admin,
            services,
            alerts,
            acme,
            lines: Lines {
                interfaces: interface_lines,
                backends: backend_lines,
            },
        })
    }

    /// Every interface exists and every backend address is assigned on this host.
    pub fn check_system(&self) -> Result<(), ConfigError> {
        let error = |line: Option<&usize>, message: String| ConfigError {
            path: self.path.clone(),
            line: line.copied(),
            message,
        };
        for (i, name) in self.dataplane.interfaces.iter().enumerate() {
            if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
                let existing = nix::net::if_::if_nameindex()
                    .map(|list| {
                        list.iter()
                            .map(|i| i.name().to_string_lossy().into_owned())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                return Err(error(
                    self.lines.interfaces.get(i),
                    format!(
                        "dataplane.interfaces: no network interface \"{name}\" on this host; \
                         use one of: {} (see `ip link`)",
                        existing.join(", ")
                    ),
                ));
            }
        }
        for service in &self.services {
            if let Some(Https { tls: Tls::Files(files), .. }) = &service.https {
                for pair in files {
                    if let Err(e) = crate::https::tls::load_pair(pair) {
                        return Err(error(None, format!("service \"{}\" [service.tls]: {e:#}", service.name)));
                    }
                }
            }
        }
        let local = local_addresses().map_err(|e| {
            error(
                None,
                format!("cannot list this host's addresses (getifaddrs): {e}"),
            )
        })?;
        for (s, service) in self.services.iter().enumerate() {
            for (b, backend) in service.backends.iter().enumerate() {
                let ip = backend.ip();
                if ip.is_loopback() || local.contains(&ip) {
                    continue;
                }
                let mut have: Vec<String> = local.iter().map(IpAddr::to_string).collect();
                have.sort();
                return Err(error(
                    self.lines.backends.get(s).and_then(|l| l.get(b)),
                    format!(
                        "service \"{}\" backend \"{backend}\": not an address of this host; xlb \
                         balances to same-host backends only — use an address from `ip addr` \
                         (this host has {})",
                        service.name,
                        have.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Reads the files the config names for credentials and trust (`alerts.email.password_file`,
    /// `alerts.email.ca_file`, `alerts.webhook.ca_file`).
    pub fn read_secrets(&mut self) -> Result<(), ConfigError> {
        let path = self.path.clone();
        let error = |message: String| ConfigError { path: path.clone(), line: None, message };
        let read_ca = |key: &str, file: &Path| -> Result<Vec<u8>, ConfigError> {
            let pem = std::fs::read(file)
                .map_err(|e| error(format!("{key} \"{}\": cannot read it: {e}", file.display())))?;
            use rustls::pki_types::{CertificateDer, pem::PemObject as _};
            let certificates: Result<Vec<CertificateDer>, _> = CertificateDer::pem_slice_iter(&pem).collect();
            match certificates {
                Ok(c) if !c.is_empty() => Ok(pem),
                outcome => {
                    let why = outcome.err().map_or_else(|| "none found".to_owned(), |e| e.to_string());
                    Err(error(format!(
                        "{key} \"{}\": not PEM certificates ({why}); it must hold the CA certificate(s) as -----BEGIN CERTIFICATE----- blocks",
                        file.display()
                    )))
                }
            }
        };
        if let Some(webhook) = self.alerts.as_mut().and_then(|a| a.webhook.as_mut())
            && let Some(file) = &webhook.ca_file
        {
            webhook.ca_pem = Some(read_ca("alerts.webhook.ca_file", file)?);
        }
        let Some(email) = self.alerts.as_mut().and_then(|a| a.email.as_mut()) else {
            return Ok(());
        };
        if let Some(file) = &email.ca_file {
            email.ca_pem = Some(read_ca("alerts.email.ca_file", file)?);
        }
        let Some(credentials) = email.credentials.as_mut() else {
            return Ok(());
        };
        let file = &credentials.password_file;
        let text = std::fs::read_to_string(file).map_err(|e| {
            error(format!(
                "alerts.email.password_file \"{}\": cannot read it: {e}; it must hold the SMTP password (and nothing else)",
                file.display()
            ))
        })?;
        let password = text.trim_end_matches(['\n', '\r']);
        if password.is_empty() {
            return Err(error(format!("alerts.email.password_file \"{}\" is empty; write the SMTP password into it", file.display())));
        }
        credentials.password = Secret(password.to_owned());
        Ok(())
    }
}

fn local_addresses() -> nix::Result<HashSet<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| {
            let addr = ifa.address?;
            addr.as_sockaddr_in()
                .map(|a| IpAddr::V4(a.ip()))
                .or_else(|| addr.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
        })
        .collect())
}

fn parse_dataplane(
    src: &Source,
    raw: RawDataplane,
) -> Result<(Dataplane, Vec<usize>), ConfigError> {
    if raw.interfaces.get_ref().is_empty() {
        return Err(src.at(
            &raw.interfaces,
            "dataplane.interfaces is empty; list the interfaces that receive traffic for the \
             services, e.g. [\"eth0\"]",
        ));
    }
    let mut interfaces: Vec<String> = Vec::new();
    let mut lines = Vec::new();
    for name in raw.interfaces.into_inner() {
        let n = name.get_ref();
        if n.is_empty() || n.len() > MAX_IFNAME_LEN || n.contains(['/', ' ', '\0']) {
            return Err(src.at(
                &name,
                format!(
                    "dataplane.interfaces: \"{n}\" is not a valid interface name (1 to \
                     {MAX_IFNAME_LEN} characters, no '/' or spaces); see `ip link` for the names"
                ),
            ));
        }
        if interfaces.contains(n) {
            return Err(src.at(
                &name,
                format!("dataplane.interfaces: \"{n}\" is listed twice; remove one"),
            ));
        }
        lines.push(src.line(name.span().start));
        interfaces.push(name.into_inner());
    }
    let xdp_mode = match &raw.xdp_mode {
        None => XdpMode::Auto,
        Some(mode) => match mode.get_ref().as_str() {
            "auto" => XdpMode::Auto,
            "native" => XdpMode::Native,
            "generic" => XdpMode::Generic,
            other => {
                return Err(src.at(
                    mode,
                    format!(
                        "dataplane.xdp_mode \"{other}\" is not a mode; use \"auto\" (native where \
                         the driver supports it), \"native\" or \"generic\""
                    ),
                ));
            }
        },
    };
    let max_flows = match &raw.max_flows {
        None => DEFAULT_MAX_FLOWS,
        Some(n) if MAX_FLOWS_RANGE.contains(n.get_ref()) => *n.get_ref() as u32,
        Some(n) => {
            return Err(src.at(
                n,
                format!(
                    "dataplane.max_flows {} is out of range; use {}..={} (default {DEFAULT_MAX_FLOWS})",
                    n.get_ref(),
                    MAX_FLOWS_RANGE.start(),
                    MAX_FLOWS_RANGE.end()
                ),
            ));
        }
    };
    let pin_path = match &raw.pin_path {
        None => PathBuf::from(DEFAULT_PIN_PATH),
        Some(p) if Path::new(p.get_ref()).is_absolute() => PathBuf::from(p.get_ref()),
        Some(p) => {
            return Err(src.at(
                p,
                format!(
                    "dataplane.pin_path \"{}\" is not an absolute path; use a directory on the BPF \
                     filesystem such as \"{DEFAULT_PIN_PATH}\"",
                    p.get_ref()
                ),
            ));
        }
    };
    Ok((
        Dataplane {
            interfaces,
            xdp_mode,
            max_flows,
            pin_path,
        },
        lines,
    ))
}

fn parse_acme_section(src: &Source, raw: Spanned<RawAcmeSection>) -> Result<AcmeSection, ConfigError> {
    let Some(dir) = &raw.get_ref().state_dir else {
        return Ok(AcmeSection::default());
    };
    let path = Path::new(dir.get_ref());
    if !path.is_absolute() || path.as_os_str().len() <= 1 {
        return Err(src.at(
            dir,
            format!(
                "acme.state_dir \"{}\": not an absolute path of a directory; write the full path, e.g. \
                 \"{DEFAULT_ACME_STATE_DIR}\"",
                dir.get_ref()
            ),
        ));
    }
    Ok(AcmeSection { state_dir: path.to_owned() })
}

fn parse_admin(src: &Source, raw: RawAdmin) -> Result<Admin, ConfigError> {
    let Some(listen) = raw.listen else {
        return Ok(Admin {
            listen: DEFAULT_ADMIN_LISTEN,
        });
    };
    let addr = socket_addr(src, &listen, "admin.listen", "127.0.0.1:9100")?;
    if !addr.ip().is_loopback() {
        return Err(src.at(
            &listen,
            format!(
                "admin.listen \"{addr}\" is not a loopback address; the admin API has no \
                 authentication, so it only listens on 127.0.0.1 or [::1] (e.g. \"127.0.0.1:{}\")",
                addr.port()
            ),
        ));
    }
    Ok(Admin { listen: addr })
}

fn parse_services(
    src: &Source,
    raw: Vec<Spanned<RawService>>,
) -> Result<(Vec<Service>, Vec<Vec<usize>>), ConfigError> {
    if raw.is_empty() {
        return Err(src.error(
            None,
            "no services; add at least one [[service]] table with name, listen and backends",
        ));
    }
    if let Some(extra) = raw.get(MAX_SERVICES as usize) {
        return Err(src.at(
            extra,
            format!("too many services: xlb supports at most {MAX_SERVICES}; remove some [[service]] tables"),
        ));
    }
    let mut services = Vec::with_capacity(raw.len());
    let mut lines = Vec::with_capacity(raw.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut vips: HashMap<SocketAddr, String> = HashMap::new();
    let mut service_lines = Vec::with_capacity(raw.len());
    for (i, raw) in raw.into_iter().enumerate() {
        let raw = raw.into_inner();
        let name = raw.name.get_ref();
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
        if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(valid) {
            return Err(src.at(
                &raw.name,
                format!(
                    "service #{} name \"{name}\" is not valid; use 1 to {MAX_NAME_LEN} letters, \
                     digits, '_', '.' or '-'",
                    i + 1
                ),
            ));
        }
        if let Some(first) = names.insert(name.clone(), src.line(raw.name.span().start)) {
            return Err(src.at(
                &raw.name,
                format!("service name \"{name}\" is already used on line {first}; give each service its own name"),
            ));
        }
        let what = format!("service \"{name}\"");
        let listen_line = src.line(raw.listen.span().start);
        service_lines.push(src.line(raw.name.span().start));
        let (service, backend_lines) = parse_service(src, raw, &what)?;
        if let Some(other) = vips.insert(service.listen, service.name.clone()) {
            return Err(src.error(
                Some(listen_line),
                format!(
                    "{what} listen \"{}\": service \"{other}\" already listens there; each \
                     service needs its own address:port",
                    service.listen
                ),
            ));
        }
        services.push(service);
        lines.push(backend_lines);
    }
    // HTTP-01 is answered on port 80 by a redirect service; without one every order would fail
    // at the CA, weeks later at renewal time for a stored certificate.
    let redirects = services.iter().any(|s| s.mode == ServiceMode::Redirect);
    for (svc, &line) in services.iter().zip(&service_lines) {
        if let Some(Https { tls: Tls::Acme(a), .. }) = &svc.https
            && a.challenge == ChallengeKind::Http01
            && !redirects
        {
            return Err(src.error(
                Some(line),
                format!(
                    "service \"{}\" gets its certificate by ACME HTTP-01, which the CA checks on port 80, \
                     but no service has mode = \"redirect\"; add one listening on port 80 (it answers the \
                     challenges), or set challenge = \"tls-alpn-01\" in its tls.acme",
                    svc.name
                ),
            ));
        }
    }
    Ok((services, lines))
}

fn parse_service(
    src: &Source,
    mut raw: RawService,
    what: &str,
) -> Result<(Service, Vec<usize>), ConfigError> {
    let listen = socket_addr(
        src,
        &raw.listen,
        &format!("{what} listen"),
        "203.0.113.10:80",
    )?;
    let mode = match &raw.mode {
        None => ServiceMode::L4,
        Some(mode) => match mode.get_ref().as_str() {
            "l4" => ServiceMode::L4,
            "https" => ServiceMode::Https,
            "redirect" => ServiceMode::Redirect,
            m => {
                return Err(src.at(
                    mode,
                    format!(
                        "{what} mode \"{m}\": not a mode; use \"l4\" (balanced by the data path), \
                         \"https\" (TLS terminated and proxied) or \"redirect\" (HTTP to HTTPS)"
                    ),
                ));
            }
        },
    };
    let https_only: [(&str, Option<usize>); 4] = [
        ("[service.tls]", raw.tls.as_ref().map(|v| v.span().start)),
        ("[service.http]", raw.http.as_ref().map(|v| v.span().start)),
        ("[service.timeouts]", raw.timeouts.as_ref().map(|v| v.span().start)),
        ("[service.limits]", raw.limits.as_ref().map(|v| v.span().start)),
    ];
    if mode != ServiceMode::Https
        && let Some((key, Some(at))) = https_only.iter().find(|(_, at)| at.is_some())
    {
        return Err(src.error(
            Some(src.line(*at)),
            format!(
                "{what}: {key} is only for mode = \"https\" (this service is \"{}\"); remove it",
                mode.as_str()
            ),
        ));
    }
    if mode == ServiceMode::Redirect {
        if let Some(backends) = &raw.backends {
            return Err(src.at(
                backends,
                format!(
                    "{what} backends: a \"redirect\" service answers every request itself (301 to \
                     https); remove backends"
                ),
            ));
        }
        if let Some(health) = &raw.health {
            return Err(src.at(
                health,
                format!("{what}: [service.health] is not for a \"redirect\" service, which has no backends; remove it"),
            ));
        }
        let name = raw.name.into_inner();
        return Ok((
            Service {
                name,
                listen,
                mode,
                backends: Vec::new(),
                health: Health::default(),
                max_fails: DEFAULT_MAX_FAILS,
                fail_timeout: DEFAULT_FAIL_TIMEOUT,
                slow_start: Duration::ZERO,
                https: None,
            },
            Vec::new(),
        ));
    }
    let Some(raw_backends) = &raw.backends else {
        return Err(src.at(
            &raw.name,
            format!("{what}: missing field `backends`; list the backends as \"ip:port\" strings"),
        ));
    };
    let count = raw_backends.get_ref().len();
    if count == 0 || count > MAX_BACKENDS_PER_SERVICE as usize {
        return Err(src.at(
            raw_backends,
            format!(
                "{what} backends: {count} listed; a service needs 1 to {MAX_BACKENDS_PER_SERVICE} \
                 backends (\"ip:port\" strings)"
            ),
        ));
    }
    let mut backends: Vec<SocketAddr> = Vec::with_capacity(count);
    let mut lines = Vec::with_capacity(count);
    for value in raw_backends.get_ref() {
        let addr = socket_addr(src, value, &format!("{what} backend"), "203.0.113.10:8001")?;
        let problem = if backends.contains(&addr) {
            "listed twice; remove one".to_string()
        } else if addr.is_ipv4() != listen.is_ipv4() {
            let (b, l) = if addr.is_ipv4() {
                ("IPv4", "IPv6")
            } else {
                ("IPv6", "IPv4")
            };
            format!(
                "an {b} backend for an {l} listen address; xlb does not translate between IPv4 \
                 and IPv6, so use an {l} backend address"
            )
        } else if addr == listen {
            "is the service's own listen address; run the backend on another port".to_string()
        } else if addr.ip().is_loopback() && !listen.ip().is_loopback() {
            format!(
                "a loopback backend for the non-loopback listen address {listen}; packets from \
                 other hosts cannot be rewritten to a loopback address (the kernel drops them), \
                 so have the backend listen on a host address such as \"{}:{}\"",
                listen.ip().to_canonical(),
                addr.port()
            )
        } else if !addr.ip().is_loopback() && listen.ip().is_loopback() {
            format!(
                "not a loopback address, but the service listens on loopback address {listen}; \
                 use loopback backends or a non-loopback listen address"
            )
        } else {
            lines.push(src.line(value.span().start));
            backends.push(addr);
            continue;
        };
        return Err(src.at(value, format!("{what} backend \"{addr}\": {problem}")));
    }
    let health = parse_health(src, raw.health.take().map(Spanned::into_inner), what)?;
    let max_fails = match &raw.max_fails {
        None => DEFAULT_MAX_FAILS,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(n @ 0..=1000) => n,
            _ => {
                return Err(src.at(
                    v,
                    format!(
                        "{what} max_fails = {}: out of range; use 0 (passive health checks off) \
                         to 1000 failed connections",
                        v.get_ref()
                    ),
                ));
            }
        },
    };
    let passive_duration = |value: &Option<Spanned<String>>, key: &str, default: Duration, zero_ok: bool| {
        let Some(v) = value else { return Ok(default) };
        let d = duration(src, v, &format!("{what} {key}"))?;
        if d.is_zero() && !zero_ok {
            return Err(src.at(v, format!("{what} {key} is zero; use e.g. \"10s\" (or max_fails = 0 to turn passive health checks off)")));
        }
        if d > MAX_PASSIVE_DURATION {
            return Err(src.at(v, format!("{what} {key} \"{}\": too long; use at most \"1h\"", v.get_ref())));
        }
        Ok(d)
    };
    let fail_timeout = passive_duration(&raw.fail_timeout, "fail_timeout", DEFAULT_FAIL_TIMEOUT, false)?;
    let slow_start = passive_duration(&raw.slow_start, "slow_start", Duration::ZERO, true)?;
    let https = match mode {
        ServiceMode::Https => Some(parse_https(src, &raw, what, max_fails, fail_timeout)?),
        _ => None,
    };
    let name = raw.name.into_inner();
    Ok((
        Service {
            name,
            listen,
            mode,
            backends,
            health,
            max_fails,
            fail_timeout,
            slow_start,
            https,
        },
        lines,
    ))
}

/// `max_fails` and `fail_timeout` are the service's (they apply to both the data path's and the
/// proxy's failures).
fn parse_https(
    src: &Source,
    raw: &RawService,
    what: &str,
    max_fails: u32,
    fail_timeout: Duration,
) -> Result<Https, ConfigError> {
    let Some(tls) = &raw.tls else {
        return Err(src.at(
            &raw.name,
            format!(
                "{what}: mode \"https\" needs a [service.tls] table with cert and key (PEM files) \
                 or acme = {{ directory, contact, domains }}"
            ),
        ));
    };
    let tls = parse_tls(src, tls, what)?;
    let mut http = HttpHeaders::default();
    if let Some(raw) = &raw.http {
        let raw = raw.get_ref();
        if let Some(b) = raw.backend_header {
            http.backend_header = b;
        }
        for (value, key, slot) in [
            (&raw.hsts, "hsts", &mut http.hsts),
            (&raw.frame_options, "frame_options", &mut http.frame_options),
            (&raw.content_type_options, "content_type_options", &mut http.content_type_options),
            (&raw.referrer_policy, "referrer_policy", &mut http.referrer_policy),
        ] {
            let Some(value) = value else { continue };
            let v = value.get_ref();
            if v.is_empty() {
                *slot = None;
            } else if hyper::header::HeaderValue::from_str(v).is_err() || !v.is_ascii() {
                return Err(src.at(
                    value,
                    format!(
                        "{what} http.{key} \"{}\": not a valid header value; use printable ASCII \
                         only (\"\" leaves the header out)",
                        v.escape_debug()
                    ),
                ));
            } else {
                *slot = Some(v.clone());
            }
        }
    }
    let mut timeouts = Timeouts::default();
    if let Some(raw) = &raw.timeouts {
        let raw = raw.get_ref();
        for (value, key, slot) in [
            (&raw.handshake, "handshake", &mut timeouts.handshake),
            (&raw.request_header, "request_header", &mut timeouts.request_header),
            (&raw.idle, "idle", &mut timeouts.idle),
            (&raw.backend_connect, "backend_connect", &mut timeouts.backend_connect),
            (&raw.backend_response, "backend_response", &mut timeouts.backend_response),
        ] {
            let Some(value) = value else { continue };
            let key = format!("{what} timeouts.{key}");
            let d = duration(src, value, &key)?;
            if d.is_zero() || d > Duration::from_secs(24 * 3600) {
                return Err(src.at(
                    value,
                    format!("{key} \"{}\": out of range; use more than 0 and at most 24h", value.get_ref()),
                ));
            }
            *slot = d;
        }
    }
    let mut limits = Limits::default();
    if let Some(raw) = &raw.limits {
        let raw = raw.get_ref();
        let int = |value: &Spanned<i64>, key: &str, range: std::ops::RangeInclusive<i64>, unit: &str| {
            let v = *value.get_ref();
            if range.contains(&v) {
                Ok(v)
            } else {
                Err(src.at(
                    value,
                    format!(
                        "{what} limits.{key} = {v}: out of range; use {}..={} {unit}",
                        range.start(),
                        range.end()
                    ),
                ))
            }
        };
        if let Some(v) = &raw.max_header_bytes {
            // hyper's smallest read buffer is 8 KiB.
            limits.max_header_bytes = int(v, "max_header_bytes", 8192..=1 << 20, "bytes")? as usize;
        }
        if let Some(v) = &raw.max_headers {
            limits.max_headers = int(v, "max_headers", 1..=1000, "headers")? as usize;
        }
        if let Some(v) = &raw.max_body_bytes {
            limits.max_body_bytes = Some(int(v, "max_body_bytes", 0..=i64::MAX, "bytes")? as u64);
        }
        if let Some(v) = &raw.max_connections {
            limits.max_connections = int(v, "max_connections", 1..=1_000_000, "connections")? as usize;
        }
        if let Some(v) = &raw.h2_max_streams {
            limits.h2_max_streams = int(v, "h2_max_streams", 1..=10_000, "streams")? as u32;
        }
    }
    Ok(Https { tls, http, timeouts, limits, max_fails, fail_timeout })
}

fn parse_tls(src: &Source, raw: &Spanned<RawTls>, what: &str) -> Result<Tls, ConfigError> {
    let t = raw.get_ref();
    let path = |value: &Spanned<String>, key: &str| -> Result<PathBuf, ConfigError> {
        let p = Path::new(value.get_ref());
        if p.is_absolute() {
            Ok(p.to_owned())
        } else {
            Err(src.at(
                value,
                format!(
                    "{what} tls.{key} \"{}\": not an absolute path; write the full path, e.g. \
                     \"/etc/xlb/site.crt\"",
                    value.get_ref()
                ),
            ))
        }
    };
    let forms = [t.cert.is_some() || t.key.is_some(), t.certs.is_some(), t.acme.is_some()];
    if forms.iter().filter(|&&f| f).count() != 1 {
        return Err(src.at(
            raw,
            format!(
                "{what} [service.tls]: give exactly one of cert + key, certs = [{{ cert, key }}, ...] \
                 or acme = {{ directory, contact, domains }}"
            ),
        ));
    }
    if let Some(acme) = &t.acme {
        let a = acme.get_ref();
        let dir = a.directory.get_ref();
        if !dir.starts_with("https://") || dir.parse::<hyper::Uri>().is_err() {
            return Err(src.at(
                &a.directory,
                format!(
                    "{what} tls.acme.directory \"{dir}\": not an https:// URL; use e.g. \
                     \"https://acme-v02.api.letsencrypt.org/directory\""
                ),
            ));
        }
        let contact = match a.contact.as_ref().map(Spanned::get_ref) {
            None => Vec::new(),
            Some(StringOrList::One(c)) => vec![c.clone()],
            Some(StringOrList::Many(c)) => c.clone(),
        };
        if let Some(bad) = contact.iter().find(|c| !c.starts_with("mailto:") || c.len() < 10) {
            return Err(src.at(
                a.contact.as_ref().expect("contact given"),
                format!("{what} tls.acme.contact \"{bad}\": not a mailto: URL; write e.g. \"mailto:ops@example.com\""),
            ));
        }
        if a.domains.get_ref().is_empty() {
            return Err(src.at(
                &a.domains,
                format!("{what} tls.acme.domains is empty; list the names the certificate is for"),
            ));
        }
        let mut domains = Vec::new();
        for d in a.domains.get_ref() {
            let name = d.get_ref().to_ascii_lowercase();
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            };
            if name.len() > 253 || !name.contains('.') || !name.split('.').all(label_ok) {
                return Err(src.at(
                    d,
                    format!(
                        "{what} tls.acme.domains: \"{}\" is not a DNS name; write e.g. \"example.com\" \
                         (no scheme, port or wildcard: HTTP-01 and TLS-ALPN-01 cannot validate wildcards)",
                        d.get_ref()
                    ),
                ));
            }
            if domains.contains(&name) {
                return Err(src.at(d, format!("{what} tls.acme.domains: \"{name}\" is listed twice; remove one")));
            }
            domains.push(name);
        }
        let ca = a.ca.as_ref().map(|c| path(c, "acme.ca")).transpose()?;
        let challenge = match a.challenge.as_ref().map(|c| (c, c.get_ref().as_str())) {
            None | Some((_, "http-01")) => ChallengeKind::Http01,
            Some((_, "tls-alpn-01")) => ChallengeKind::TlsAlpn01,
            Some((c, other)) => {
                return Err(src.at(
                    c,
                    format!(
                        "{what} tls.acme.challenge \"{other}\": use \"http-01\" (answered by a redirect \
                         service on port 80) or \"tls-alpn-01\" (answered by this service on port 443)"
                    ),
                ));
            }
        };
        let renew_before = match &a.renew_before {
            None => crate::acme::DEFAULT_RENEW_BEFORE,
            Some(v) => {
                let d = duration(src, v, &format!("{what} tls.acme.renew_before"))?;
                if !RENEW_BEFORE_RANGE.contains(&d) {
                    return Err(src.at(
                        v,
                        format!(
                            "{what} tls.acme.renew_before \"{}\": out of range; use 1h..=365d (e.g. \"30d\", \
                             renewing a 90-day certificate after 60 days)",
                            v.get_ref()
                        ),
                    ));
                }
                d
            }
        };
        return Ok(Tls::Acme(Acme { directory: dir.clone(), contact, domains, ca, challenge, renew_before }));
    }
    let mut pairs = Vec::new();
    if let Some(certs) = &t.certs {
        if certs.get_ref().is_empty() {
            return Err(src.at(certs, format!("{what} tls.certs is empty; list at least one {{ cert, key }}")));
        }
        for pair in certs.get_ref() {
            pairs.push(CertFiles { cert: path(&pair.cert, "certs.cert")?, key: path(&pair.key, "certs.key")? });
        }
    } else {
        match (&t.cert, &t.key) {
            (Some(cert), Some(key)) => pairs.push(CertFiles { cert: path(cert, "cert")?, key: path(key, "key")? }),
            (Some(v), None) | (None, Some(v)) => {
                return Err(src.at(
                    v,
                    format!("{what} [service.tls]: cert and key go together; give both (PEM files)"),
                ));
            }
            (None, None) => unreachable!("one form is given"),
        }
    }
    Ok(Tls::Files(pairs))
}

fn parse_health(src: &Source, raw: Option<RawHealth>, what: &str) -> Result<Health, ConfigError> {
    let mut health = Health::default();
    let Some(raw) = raw else { return Ok(health) };
    if let Some(check) = &raw.check {
        health.check = match check.get_ref().as_str() {
            "http" => CheckKind::Http,
            "tcp" => CheckKind::Tcp,
            other => {
                return Err(src.at(
                    check,
                    format!(
                        "{what} health.check \"{other}\": not a check; use \"http\" (GET \
                         health.path answers 2xx or 3xx) or \"tcp\" (a connection is accepted)"
                    ),
                ));
            }
        };
    }
    if let Some(path) = &raw.path {
        let p = path.get_ref();
        let printable = p.bytes().all(|b| b.is_ascii_graphic());
        if !p.starts_with('/') || !printable || p.parse::<hyper::Uri>().is_err() {
            return Err(src.at(
                path,
                format!(
                    "{what} health.path \"{}\": not a request path; it must start with '/' and \
                     contain no spaces, control or non-ASCII characters (percent-encode them), \
                     e.g. \"/health\"",
                    p.escape_debug()
                ),
            ));
        }
        health.path.clone_from(p);
    }
    if let Some(v) = &raw.interval {
        health.interval = duration(src, v, &format!("{what} health.interval"))?;
        if health.interval < Duration::from_millis(100) {
            return Err(src.at(
                v,
                format!(
                    "{what} health.interval \"{}\": too short; use at least \"100ms\"",
                    v.get_ref()
                ),
            ));
        }
    }
    if let Some(v) = &raw.timeout {
        health.timeout = duration(src, v, &format!("{what} health.timeout"))?;
        if health.timeout.is_zero() {
            return Err(src.at(
                v,
                format!("{what} health.timeout is zero; use e.g. \"500ms\""),
            ));
        }
    }
    if health.timeout >= health.interval {
        let line = raw
            .timeout
            .as_ref()
            .or(raw.interval.as_ref())
            .map(|v| src.line(v.span().start));
        return Err(src.error(
            line,
            format!(
                "{what} health.timeout ({}) must be shorter than health.interval ({}) so that a \
                 probe ends before the next starts; lower the timeout or raise the interval",
                humantime::format_duration(health.timeout),
                humantime::format_duration(health.interval)
            ),
        ));
    }
    for (value, key, slot) in [
        (&raw.rise, "rise", &mut health.rise),
        (&raw.fall, "fall", &mut health.fall),
    ] {
        let Some(value) = value else { continue };
        match u32::try_from(*value.get_ref()) {
            Ok(n @ 1..=100) => *slot = n,
            _ => {
                return Err(src.at(
                    value,
                    format!(
                        "{what} health.{key} = {}: out of range; use 1..=100 consecutive probes",
                        value.get_ref()
                    ),
                ));
            }
        }
    }
    Ok(health)
}

/// `[alerts]`: alerts about backends going down and up, whole services down, and certificate
/// renewals that failed, by e-mail and/or webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertsConfig {
    /// At most this many messages per minute on each channel; the rest is sent as one summary
    /// once the minute is over.
    pub max_per_minute: u32,
    pub email: Option<EmailConfig>,
    pub webhook: Option<WebhookConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmailConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// Validated mailboxes (`xlb@example.com` or `xlb <xlb@example.com>`).
    pub from: String,
    pub to: Vec<String>,
    pub credentials: Option<SmtpCredentials>,
    /// Bounds one delivery.
    pub timeout: Duration,
    /// CA certificates (PEM) trusted besides Mozilla's roots, for a relay with a private CA.
    pub ca_file: Option<PathBuf>,
    /// The content of `ca_file`, read by `Config::load`.
    pub ca_pem: Option<Vec<u8>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (port 587); refuses a server without it.
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption: only for a relay on this host.
    None,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmtpCredentials {
    pub username: String,
    pub password_file: PathBuf,
    /// Read from `password_file` by `Config::load`.
    pub password: Secret,
}

/// A credential: compared, never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL that gets a JSON `POST` per alert.
    pub url: String,
    pub timeout: Duration,
    /// CA certificates (PEM) trusted besides Mozilla's roots, for an https hook with a private CA.
    pub ca_file: Option<PathBuf>,
    /// The content of `ca_file`, read by `Config::load`.
    pub ca_pem: Option<Vec<u8>>,
}

pub const DEFAULT_ALERTS_PER_MINUTE: u32 = 10;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    max_per_minute: Option<Spanned<i64>>,
    email: Option<Spanned<RawEmail>>,
    webhook: Option<Spanned<RawWebhook>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmail {
    host: Spanned<String>,
    port: Option<Spanned<i64>>,
    tls: Option<Spanned<String>>,
    from: Spanned<String>,
    to: Spanned<Vec<Spanned<String>>>,
    username: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: Spanned<String>,
    timeout: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
}

fn parse_alerts(src: &Source, raw: Spanned<RawAlerts>) -> Result<AlertsConfig, ConfigError> {
    let span = raw.span();
    let raw = raw.into_inner();
    let max_per_minute = match &raw.max_per_minute {
        None => DEFAULT_ALERTS_PER_MINUTE,
        Some(v) => u32::try_from(*v.get_ref()).ok().filter(|n| (1..=1000).contains(n)).ok_or_else(|| {
            src.at(v, format!("alerts.max_per_minute = {}: out of range; use 1..=1000 messages per minute", v.get_ref()))
        })?,
    };
    let email = raw.email.map(|e| parse_email(src, e.into_inner())).transpose()?;
    let webhook = raw.webhook.map(|w| parse_webhook(src, w.into_inner())).transpose()?;
    if email.is_none() && webhook.is_none() {
        return Err(src.error(
            Some(src.line(span.start)),
            "[alerts] has neither [alerts.email] nor [alerts.webhook]; add one (or remove [alerts] to send no alerts)",
        ));
    }
    Ok(AlertsConfig { max_per_minute, email, webhook })
}

fn parse_email(src: &Source, raw: RawEmail) -> Result<EmailConfig, ConfigError> {
    let host = raw.host.get_ref().trim();
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/' || c == ':') {
        return Err(src.at(
            &raw.host,
            format!("alerts.email.host \"{}\": not a host name or address; write e.g. \"smtp.example.com\" (the port goes in alerts.email.port)", raw.host.get_ref()),
        ));
    }
    let tls = match raw.tls.as_ref().map(|t| t.get_ref().as_str()) {
        None | Some("starttls") => SmtpTls::StartTls,
        Some("tls") => SmtpTls::Tls,
        Some("none") => SmtpTls::None,
        Some(other) => {
            return Err(src.at(
                raw.tls.as_ref().expect("present"),
                format!(
                    "alerts.email.tls \"{other}\": use \"starttls\" (port 587, upgraded to TLS), \"tls\" (port 465, TLS \
                     from the start) or \"none\" (unencrypted: only for a relay on this host)"
                ),
            ));
        }
    };
    let port = match &raw.port {
        None => match tls {
            SmtpTls::StartTls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        },
        Some(v) => u16::try_from(*v.get_ref()).ok().filter(|p| *p != 0).ok_or_else(|| {
            src.at(v, format!("alerts.email.port = {}: not a port; use 1..=65535 (e.g. 587)", v.get_ref()))
        })?,
    };
    let mailbox = |value: &Spanned<String>, key: &str| -> Result<String, ConfigError> {
        value.get_ref().parse::<lettre::message::Mailbox>().map(|m| m.to_string()).map_err(|e| {
            src.at(value, format!("{key} \"{}\": not an e-mail address ({e}); write e.g. \"ops@example.com\" or \"Ops <ops@example.com>\"", value.get_ref()))
        })
    };
    let from = mailbox(&raw.from, "alerts.email.from")?;
    if raw.to.get_ref().is_empty() {
        return Err(src.at(&raw.to, "alerts.email.to is empty; list at least one recipient, e.g. to = [\"ops@example.com\"]"));
    }
    let to = raw.to.get_ref().iter().map(|t| mailbox(t, "alerts.email.to")).collect::<Result<Vec<_>, _>>()?;
    let credentials = match (&raw.username, &raw.password_file) {
        (None, None) => None,
        (Some(username), Some(file)) => Some(SmtpCredentials {
            username: username.get_ref().clone(),
            password_file: PathBuf::from(file.get_ref()),
            password: Secret::default(),
        }),
        (Some(v), None) => {
            return Err(src.at(v, "alerts.email.username is set but password_file is not; add password_file = \"/etc/xlb/smtp-password\" (a file holding only the password)"));
        }
        (None, Some(v)) => {
            return Err(src.at(v, "alerts.email.password_file is set but username is not; add the SMTP user name"));
        }
    };
    if credentials.is_some() && tls == SmtpTls::None {
        return Err(src.at(
            raw.tls.as_ref().expect("\"none\" was given"),
            "alerts.email.tls = \"none\" with a username: the password would cross the network unencrypted; use \"starttls\" or \"tls\"",
        ));
    }
    let timeout = match &raw.timeout {
        None => Duration::from_secs(10),
        Some(v) => duration(src, v, "alerts.email.timeout")?,
    };
    if let (Some(ca), SmtpTls::None) = (&raw.ca_file, tls) {
        return Err(src.at(ca, "alerts.email.ca_file is set but tls = \"none\": a CA is only used with \"starttls\" or \"tls\""));
    }
    let ca_file = raw.ca_file.as_ref().map(|f| PathBuf::from(f.get_ref()));
    Ok(EmailConfig { host: host.to_owned(), port, tls, from, to, credentials, timeout, ca_file, ca_pem: None })
}

fn parse_webhook(src: &Source, raw: RawWebhook) -> Result<WebhookConfig, ConfigError> {
    let text = raw.url.get_ref();
    let uri = text.parse::<hyper::Uri>().ok();
    let ok = uri.as_ref().is_some_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty()));
    if !ok {
        return Err(src.at(
            &raw.url,
            format!("alerts.webhook.url \"{text}\": not an http:// or https:// URL; write e.g. \"https://hooks.example.com/xlb\""),
        ));
    }
    let timeout = match &raw.timeout {
        None => Duration::from_secs(10),
        Some(v) => duration(src, v, "alerts.webhook.timeout")?,
    };
    if let Some(ca) = &raw.ca_file
        && !text.starts_with("https://")
    {
        return Err(src.at(ca, "alerts.webhook.ca_file is set but the url is not https://: a CA is only used for https"));
    }
    let ca_file = raw.ca_file.as_ref().map(|f| PathBuf::from(f.get_ref()));
    Ok(WebhookConfig { url: text.clone(), timeout, ca_file, ca_pem: None })
}

fn duration(src: &Source, value: &Spanned<String>, key: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.get_ref()).map_err(|e| {
        src.at(
            value,
            format!(
                "{key} \"{}\": not a duration ({e}); write e.g. \"1s\" or \"500ms\"",
                value.get_ref()
            ),
        )
    })
}

/// An `ip:port` that can be a destination: unicast IP, non-zero port.
fn socket_addr(
    src: &Source,
    value: &Spanned<String>,
    key: &str,
    example: &str,
) -> Result<SocketAddr, ConfigError> {
    let text = value.get_ref();
    let fail = |problem: String| Err(src.at(value, format!("{key} \"{text}\": {problem}")));
    let Ok(addr) = text.parse::<SocketAddr>() else {
        return fail(format!(
            "not an ip:port address; write e.g. \"{example}\" (IPv6 in brackets: \
             \"[2001:db8::10]:80\"; host names are not resolved)"
        ));
    };
    let ip = addr.ip();
    if addr.port() == 0 {
        fail("port 0 is not a usable port; give the port that is listened on".into())
    } else if ip.is_unspecified()
        || ip.is_multicast()
        || ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST)
    {
        fail(format!(
            "{ip} is not a unicast address; give one specific address of this host, e.g. \"{example}\""
        ))
    } else if let SocketAddr::V6(v6) = addr
        && let Some(v4) = v6.ip().to_ipv4_mapped()
    {
        fail(format!(
            "an IPv4-mapped IPv6 address; write it as IPv4: \"{v4}:{}\"",
            addr.port()
        ))
    } else if let SocketAddr::V6(v6) = addr
        && v6.scope_id() != 0
    {
        fail("IPv6 scope ids (link-local addresses) are not supported; use a global address".into())
    } else {
        Ok(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/etc/xlb/xlb.toml";
    const EXAMPLE: &str = r#"[dataplane]
interfaces = ["eth0"]        # XDP ingress + TC egress
xdp_mode = "auto"            # auto | native | generic
max_flows = 1048576          # conntrack capacity
pin_path = "/sys/fs/bpf/xlb" # optional

[admin]
listen = "127.0.0.1:9100"

[[service]]
name = "web"
listen = "203.0.113.10:80"
mode = "l4"
backends = ["203.0.113.10:8001", "203.0.113.10:8002", "203.0.113.10:8003"]

[service.health]
check = "http"
path = "/health"
interval = "1s"
timeout = "500ms"
rise = 2
fall = 2
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new(PATH), text)
    }

    fn err(text: &str) -> String {
        parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    /// `[dataplane]` on lines 1-2, then a service "web" whose first body line is line 6.
    fn service(body: &str) -> String {
        format!("[dataplane]\ninterfaces = [\"lo\"]\n\n[[service]]\nname = \"web\"\n{body}\n")
    }

    fn web(backends: &str, health: &str) -> String {
        service(&format!(
            "listen = \"203.0.113.10:80\"\nbackends = [{backends}]\n{health}"
        ))
    }

    #[test]
    fn example_parses_to_expected_values() {
        let config = parse(EXAMPLE).unwrap();
        assert_eq!(config.path, Path::new(PATH));
        assert_eq!(
            config.dataplane,
            Dataplane {
                interfaces: vec!["eth0".into()],
                xdp_mode: XdpMode::Auto,
                max_flows: 1_048_576,
                pin_path: "/sys/fs/bpf/xlb".into(),
            }
        );
        assert_eq!(config.admin.listen, "127.0.0.1:9100".parse().unwrap());
        assert_eq!(
            config.services,
            vec![Service {
                name: "web".into(),
                listen: "203.0.113.10:80".parse().unwrap(),
                mode: ServiceMode::L4,
                backends: [
                    "203.0.113.10:8001",
                    "203.0.113.10:8002",
                    "203.0.113.10:8003"
                ]
                .map(|b| b.parse().unwrap())
                .to_vec(),
                health: Health {
                    check: CheckKind::Http,
                    path: "/health".into(),
                    interval: Duration::from_secs(1),
                    timeout: Duration::from_millis(500),
                    rise: 2,
                    fall: 2,
                },
                max_fails: 1,
                fail_timeout: Duration::from_secs(10),
                slow_start: Duration::ZERO,
                https: None,
            }]
        );
        assert_eq!(config.lines.interfaces, vec![2]);
        assert_eq!(config.lines.backends, vec![vec![14, 14, 14]]);
    }

    #[test]
    fn optional_keys_default() {
        let config = parse(&web("\"203.0.113.10:8001\"", "")).unwrap();
        assert_eq!(config.dataplane.xdp_mode, XdpMode::Auto);
        assert_eq!(config.dataplane.max_flows, DEFAULT_MAX_FLOWS);
        assert_eq!(config.dataplane.pin_path, Path::new(DEFAULT_PIN_PATH));
        assert_eq!(config.admin.listen, DEFAULT_ADMIN_LISTEN);
        assert_eq!(config.services[0].mode, ServiceMode::L4);
        assert_eq!(config.services[0].health, Health::default());
        // A partial health table keeps the defaults of the keys it leaves out.
        let config = parse(&web(
            "\"203.0.113.10:8001\"",
            "[service.health]\ncheck = \"tcp\"\nfall = 5",
        ))
        .unwrap();
        assert_eq!(
            config.services[0].health,
            Health {
                check: CheckKind::Tcp,
                fall: 5,
                ..Health::default()
            }
        );
    }

    #[test]
    fn other_values_parse() {
        let text = "[dataplane]\ninterfaces = [\"eth0\", \"eth1\"]\nxdp_mode = \"generic\"\n\
                    max_flows = 1024\npin_path = \"/sys/fs/bpf/other\"\n[admin]\nlisten = \"[::1]:9200\"\n\
                    [[service]]\nname = \"v6.svc-1_a\"\nlisten = \"[2001:db8::10]:443\"\n\
                    backends = [\"[2001:db8::10]:8443\", \"[2001:db8::11]:443\"]\n\
                    [service.health]\ninterval = \"2s 500ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 100\n\
                    [[service]]\nname = \"local\"\nlisten = \"127.0.0.1:80\"\nbackends = [\"127.0.0.2:80\"]\n";
        let config = parse(text).unwrap();
        assert_eq!(config.dataplane.interfaces, ["eth0", "eth1"]);
        assert_eq!(config.dataplane.xdp_mode, XdpMode::Generic);
        assert_eq!(config.dataplane.max_flows, 1024);
        assert_eq!(config.admin.listen, "[::1]:9200".parse().unwrap());
        let v6 = &config.services[0];
        assert_eq!(v6.name, "v6.svc-1_a");
        assert_eq!(v6.backends[1], "[2001:db8::11]:443".parse().unwrap());
        assert_eq!(v6.health.interval, Duration::from_millis(2500));
        assert_eq!((v6.health.rise, v6.health.fall), (1, 100));
        assert_eq!(
            config.services[1].backends,
            ["127.0.0.2:80".parse().unwrap()]
        );
        assert_eq!(config.lines.backends, vec![vec![11, 11], vec![20]]);
        assert_eq!(
            parse(&text.replace("generic", "native"))
                .unwrap()
                .dataplane
                .xdp_mode,
            XdpMode::Native
        );
    }

    #[test]
    fn equality_ignores_layout() {
        let a = parse(EXAMPLE).unwrap();
        let b = parse(&format!("# a comment\n\n{EXAMPLE}")).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, parse(&EXAMPLE.replace("rise = 2", "rise = 3")).unwrap());
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let text = EXAMPLE.replace("xdp_mode = \"auto\"", "xdp_mode = auto");
        let e = err(&text);
        assert!(e.starts_with("/etc/xlb/xlb.toml:3: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = err(&EXAMPLE.replace("[admin]", "[admin"));
        assert!(e.starts_with("/etc/xlb/xlb.toml:7: "), "{e}");
        let e = err(&EXAMPLE.replace("rise = 2", "rise = \"2\""));
        assert!(
            e.starts_with("/etc/xlb/xlb.toml:21: ")
                && e.ends_with("expected an integer (at `rise = \"2\"`)"),
            "{e}"
        );
        let e = err(
            &service("listen = \"127.0.0.1:80\"\nbackends = [\"127.0.0.1:81\"]")
                .replace("[[service]]", "[service]"),
        );
        assert!(
            e.starts_with("/etc/xlb/xlb.toml:4: ")
                && e.ends_with("(at `[service]`); write [[service]] with double brackets: there is one such table per service"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_everywhere() {
        for (from, to, line) in [
            ("pin_path", "pin_pth", 5),
            ("[admin]", "[admn]", 7),
            ("listen = \"127.0.0.1:9100\"", "port = 9100", 8),
            ("mode = \"l4\"", "mode = \"l4\"\nweight = 1", 14),
            ("rise = 2", "rise = 2\nhealthy = 2", 22),
        ] {
            let e = err(&EXAMPLE.replace(from, to));
            assert!(
                e.starts_with(&format!("/etc/xlb/xlb.toml:{line}: unknown field")),
                "{to}: {e}"
            );
        }
        let e = err(&EXAMPLE.replace("pin_path", "pin_pth"));
        assert!(e.contains("`pin_pth`") && e.contains("`pin_path`"), "{e}");
    }

    #[test]
    fn missing_sections_and_keys() {
        assert_eq!(
            err(
                "[[service]]\nname = \"web\"\nlisten = \"203.0.113.10:80\"\nbackends = [\"203.0.113.10:81\"]\n"
            ),
            "/etc/xlb/xlb.toml: missing [dataplane] section; add one with at least `interfaces = [\"eth0\"]`"
        );
        assert_eq!(
            err("[dataplane]\ninterfaces = [\"lo\"]\n"),
            "/etc/xlb/xlb.toml: no services; add at least one [[service]] table with name, listen and backends"
        );
        let e = err(&service("listen = \"203.0.113.10:80\""));
        assert!(e.contains("missing field `backends`"), "{e}");
        let e = err("[dataplane]\nxdp_mode = \"auto\"\n");
        assert!(e.contains("missing field `interfaces`"), "{e}");
    }

    #[test]
    fn dataplane_errors() {
        let e = err(&EXAMPLE.replace("[\"eth0\"]", "[]"));
        assert!(
            e.starts_with("/etc/xlb/xlb.toml:2: dataplane.interfaces is empty;"),
            "{e}"
        );
        assert_eq!(
            err(&EXAMPLE.replace("[\"eth0\"]", "[\"eth0\",\n  \"eth0\"]")),
            "/etc/xlb/xlb.toml:3: dataplane.interfaces: \"eth0\" is listed twice; remove one"
        );
        let e = err(&EXAMPLE.replace("[\"eth0\"]", "[\"a-very-long-interface-name\"]"));
        assert!(e.starts_with("/etc/xlb/xlb.toml:2: dataplane.interfaces: \"a-very-long-interface-name\" is not a valid interface name"), "{e}");
        assert_eq!(
            err(&EXAMPLE.replace("\"auto\" ", "\"fast\" ")),
            "/etc/xlb/xlb.toml:3: dataplane.xdp_mode \"fast\" is not a mode; use \"auto\" (native where the \
             driver supports it), \"native\" or \"generic\""
        );
        assert_eq!(
            err(&EXAMPLE.replace("1048576 ", "1023 ")),
            "/etc/xlb/xlb.toml:4: dataplane.max_flows 1023 is out of range; use 1024..=16777216 (default 1048576)"
        );
        assert!(
            err(&EXAMPLE.replace("1048576 ", "16777217 "))
                .contains("max_flows 16777217 is out of range")
        );
        assert!(parse(&EXAMPLE.replace("1048576 ", "16777216 ")).is_ok());
        assert_eq!(
            err(&EXAMPLE.replace("\"/sys/fs/bpf/xlb\"", "\"xlb\"")),
            "/etc/xlb/xlb.toml:5: dataplane.pin_path \"xlb\" is not an absolute path; use a directory on the \
             BPF filesystem such as \"/sys/fs/bpf/xlb\""
        );
    }

    #[test]
    fn admin_must_be_loopback() {
        assert_eq!(
            err(&EXAMPLE.replace("127.0.0.1:9100", "0.0.0.0:9100")),
            "/etc/xlb/xlb.toml:8: admin.listen \"0.0.0.0:9100\": 0.0.0.0 is not a unicast address; give one \
             specific address of this host, e.g. \"127.0.0.1:9100\""
        );
        assert_eq!(
            err(&EXAMPLE.replace("127.0.0.1:9100", "192.0.2.1:9100")),
            "/etc/xlb/xlb.toml:8: admin.listen \"192.0.2.1:9100\" is not a loopback address; the admin API has \
             no authentication, so it only listens on 127.0.0.1 or [::1] (e.g. \"127.0.0.1:9100\")"
        );
        assert!(
            err(&EXAMPLE.replace("127.0.0.1:9100", "localhost:9100"))
                .contains("host names are not resolved")
        );
    }

    #[test]
    fn address_errors() {
        let e = err(&EXAMPLE.replace("203.0.113.10:80\"", "203.0.113.10\""));
        assert_eq!(
            e,
            "/etc/xlb/xlb.toml:12: service \"web\" listen \"203.0.113.10\": not an ip:port address; write e.g. \
             \"203.0.113.10:80\" (IPv6 in brackets: \"[2001:db8::10]:80\"; host names are not resolved)"
        );
        assert!(
            err(&EXAMPLE.replace("203.0.113.10:80\"", "2001:db8::10:80\""))
                .contains("IPv6 in brackets")
        );
        assert_eq!(
            err(&EXAMPLE.replace("203.0.113.10:80\"", "203.0.113.10:0\"")),
            "/etc/xlb/xlb.toml:12: service \"web\" listen \"203.0.113.10:0\": port 0 is not a usable port; give \
             the port that is listened on"
        );
        assert!(
            err(&EXAMPLE.replace("203.0.113.10:80\"", "224.0.0.1:80\""))
                .contains("224.0.0.1 is not a unicast address")
        );
        assert!(
            err(&EXAMPLE.replace("203.0.113.10:80\"", "255.255.255.255:80\""))
                .contains("not a unicast")
        );
        let e = err(&EXAMPLE.replace("\"203.0.113.10:8002\"", "\"[::ffff:203.0.113.10]:8002\""));
        assert!(e.ends_with("backend \"[::ffff:203.0.113.10]:8002\": an IPv4-mapped IPv6 address; write it as IPv4: \"203.0.113.10:8002\""), "{e}");
        let e = err(&EXAMPLE.replace("\"203.0.113.10:8003\"", "\"203.0.113.10:99999\""));
        assert!(e.starts_with("/etc/xlb/xlb.toml:14: service \"web\" backend \"203.0.113.10:99999\": not an ip:port"), "{e}");
    }

    #[test]
    fn service_name_errors() {
        for bad in ["", "we b", "web/1", &"x".repeat(65)] {
            let e = err(&EXAMPLE.replace("name = \"web\"", &format!("name = \"{bad}\"")));
            assert_eq!(
                e,
                format!(
                    "/etc/xlb/xlb.toml:11: service #1 name \"{bad}\" is not valid; use 1 to 64 letters, digits, \
                     '_', '.' or '-'"
                )
            );
        }
        let second = "\n[[service]]\nname = \"web\"\nlisten = \"203.0.113.10:81\"\nbackends = [\"203.0.113.10:8001\"]\n";
        assert_eq!(
            err(&format!("{EXAMPLE}{second}")),
            "/etc/xlb/xlb.toml:25: service name \"web\" is already used on line 11; give each service its own name"
        );
    }

    #[test]
    fn duplicate_vip_names_both_services() {
        let second = "\n[[service]]\nname = \"api\"\nlisten = \"203.0.113.10:80\"\nbackends = [\"203.0.113.10:9001\"]\n";
        assert_eq!(
            err(&format!("{EXAMPLE}{second}")),
            "/etc/xlb/xlb.toml:26: service \"api\" listen \"203.0.113.10:80\": service \"web\" already listens \
             there; each service needs its own address:port"
        );
        // Same address, other port: a different VIP.
        assert!(parse(&format!("{EXAMPLE}{}", second.replace(":80\"", ":81\""))).is_ok());
    }

    #[test]
    fn service_count_limit() {
        let mut text = String::from("[dataplane]\ninterfaces = [\"lo\"]\n");
        for i in 0..=MAX_SERVICES {
            text += &format!(
                "[[service]]\nname = \"s{i}\"\nlisten = \"203.0.113.10:{}\"\nbackends = [\"203.0.113.10:1\"]\n",
                i + 2
            );
        }
        assert_eq!(
            err(&text),
            format!(
                "/etc/xlb/xlb.toml:{}: too many services: xlb supports at most 64; remove some [[service]] tables",
                3 + 64 * 4
            )
        );
        let (upto_limit, _) = text.rsplit_once("[[service]]").unwrap();
        assert_eq!(parse(upto_limit).unwrap().services.len(), 64);
    }

    #[test]
    fn mode_errors() {
        assert_eq!(
            err(&EXAMPLE.replace("\"l4\"", "\"L4\"")),
            "/etc/xlb/xlb.toml:13: service \"web\" mode \"L4\": not a mode; use \"l4\" (balanced by the data \
             path), \"https\" (TLS terminated and proxied) or \"redirect\" (HTTP to HTTPS)"
        );
        assert_eq!(
            err(&EXAMPLE.replace("\"l4\"", "\"https\"")),
            "/etc/xlb/xlb.toml:11: service \"web\": mode \"https\" needs a [service.tls] table with cert and key \
             (PEM files) or acme = { directory, contact, domains }"
        );
        let e = err(&EXAMPLE.replace("\"l4\"", "\"redirect\""));
        assert!(e.starts_with("/etc/xlb/xlb.toml:14: service \"web\" backends: a \"redirect\" service"), "{e}");
        let e = err(&format!("{EXAMPLE}[service.tls]\ncert = \"/a\"\nkey = \"/b\"\n"));
        assert_eq!(
            e,
            "/etc/xlb/xlb.toml:23: service \"web\": [service.tls] is only for mode = \"https\" (this service is \"l4\"); remove it"
        );
    }

    const HTTPS: &str = r#"[dataplane]
interfaces = ["eth0"]

[[service]]
name = "site"
listen = "203.0.113.10:443"
mode = "https"
backends = ["203.0.113.10:8001", "203.0.113.10:8002", "203.0.113.10:8003"]
[service.tls]
cert = "/etc/xlb/site.crt"
key = "/etc/xlb/site.key"
[service.http]
backend_header = true
hsts = "max-age=31536000; includeSubDomains"

[[service]]
name = "site-http"
listen = "203.0.113.10:80"
mode = "redirect"
"#;

    #[test]
    fn https_and_redirect_parse_with_defaults() {
        let config = parse(HTTPS).unwrap();
        let [site, http] = &config.services[..] else { panic!() };
        assert_eq!(site.mode, ServiceMode::Https);
        let h = site.https.as_ref().unwrap();
        assert_eq!(
            h.tls,
            Tls::Files(vec![CertFiles { cert: "/etc/xlb/site.crt".into(), key: "/etc/xlb/site.key".into() }])
        );
        assert_eq!(h.http, HttpHeaders::default());
        assert_eq!(h.timeouts, Timeouts::default());
        assert_eq!(h.limits, Limits::default());
        assert_eq!((h.max_fails, h.fail_timeout), (1, Duration::from_secs(10)));
        assert_eq!(http.mode, ServiceMode::Redirect);
        assert!(http.backends.is_empty() && http.https.is_none());
    }

    #[test]
    fn https_options_parse() {
        let text = HTTPS
            .replace("[service.tls]\n", "max_fails = 3\nfail_timeout = \"30s\"\n[service.tls]\n")
            .replace(
                "[service.http]\n",
                "[service.timeouts]\nhandshake = \"2s\"\nidle = \"5s\"\n\
                 [service.limits]\nmax_headers = 50\nmax_body_bytes = 1000\n[service.http]\nframe_options = \"\"\n",
            );
        let config = parse(&text).unwrap();
        let h = config.services[0].https.as_ref().unwrap();
        assert_eq!((h.max_fails, h.fail_timeout), (3, Duration::from_secs(30)));
        assert_eq!(h.timeouts.handshake, Duration::from_secs(2));
        assert_eq!(h.timeouts.idle, Duration::from_secs(5));
        assert_eq!(h.timeouts.backend_connect, Timeouts::default().backend_connect);
        assert_eq!((h.limits.max_headers, h.limits.max_body_bytes), (50, Some(1000)));
        assert_eq!(h.http.frame_options, None);
        assert_eq!(h.http.hsts, HttpHeaders::default().hsts);

        let acme = HTTPS.replace(
            "cert = \"/etc/xlb/site.crt\"\nkey = \"/etc/xlb/site.key\"",
            "acme = { directory = \"https://acme.test/dir\", contact = \"mailto:ops@example.com\", domains = [\"Example.com\"], ca = \"/etc/xlb/pebble.pem\" }",
        );
        let config = parse(&acme).unwrap();
        assert_eq!(
            config.services[0].https.as_ref().unwrap().tls,
            Tls::Acme(Acme {
                directory: "https://acme.test/dir".into(),
                contact: vec!["mailto:ops@example.com".into()],
                domains: vec!["example.com".into()],
                ca: Some("/etc/xlb/pebble.pem".into()),
                challenge: ChallengeKind::Http01,
                renew_before: Duration::from_secs(30 * 24 * 3600),
            })
        );
        assert_eq!(config.acme.state_dir, Path::new(DEFAULT_ACME_STATE_DIR));
        let alpn = format!(
            "{}[acme]\nstate_dir = \"/srv/xlb-acme\"\n",
            HTTPS.replace(
                "cert = \"/etc/xlb/site.crt\"\nkey = \"/etc/xlb/site.key\"",
                "acme = { directory = \"https://acme.test/dir\", domains = [\"example.com\"], challenge = \"tls-alpn-01\", renew_before = \"10d\" }",
            )
        );
        let config = parse(&alpn).unwrap();
        let Tls::Acme(a) = &config.services[0].https.as_ref().unwrap().tls else { panic!() };
        assert_eq!((a.challenge, a.renew_before), (ChallengeKind::TlsAlpn01, Duration::from_secs(10 * 24 * 3600)));
        assert_eq!(config.acme.state_dir, Path::new("/srv/xlb-acme"));
        let several = HTTPS.replace(
            "cert = \"/etc/xlb/site.crt\"\nkey = \"/etc/xlb/site.key\"",
            "certs = [{ cert = \"/a.crt\", key = \"/a.key\" }, { cert = \"/b.crt\", key = \"/b.key\" }]",
        );
        let config = parse(&several).unwrap();
        let Tls::Files(files) = &config.services[0].https.as_ref().unwrap().tls else { panic!() };
        assert_eq!(files.len(), 2);
    }

    #[test]
    fn https_errors() {
        let e = err(&HTTPS.replace("key = \"/etc/xlb/site.key\"\n", ""));
        assert_eq!(e, "/etc/xlb/xlb.toml:10: service \"site\" [service.tls]: cert and key go together; give both (PEM files)");
        let e = err(&HTTPS.replace("\"/etc/xlb/site.key\"", "\"site.key\""));
        assert!(e.contains("tls.key \"site.key\": not an absolute path"), "{e}");
        let e = err(&HTTPS.replace("hsts = \"max-age=31536000; includeSubDomains\"", "hsts = \"a\\nb\""));
        assert!(e.contains("http.hsts \"a\\nb\": not a valid header value"), "{e}");
        let e = err(&HTTPS.replace("[service.http]\n", "[service.limits]\nmax_header_bytes = 100\n[service.http]\n"));
        assert!(e.ends_with("limits.max_header_bytes = 100: out of range; use 8192..=1048576 bytes"), "{e}");
        let e = err(&HTTPS.replace("[service.http]\n", "[service.timeouts]\nidle = \"0s\"\n[service.http]\n"));
        assert!(e.contains("timeouts.idle \"0s\": out of range"), "{e}");
        let e = err(&HTTPS.replace(
            "cert = \"/etc/xlb/site.crt\"\nkey = \"/etc/xlb/site.key\"",
            "acme = { directory = \"http://acme.test/dir\", domains = [\"example.com\"] }",
        ));
        assert!(e.contains("tls.acme.directory \"http://acme.test/dir\": not an https:// URL"), "{e}");
        let e = err(&HTTPS.replace(
            "cert = \"/etc/xlb/site.crt\"\nkey = \"/etc/xlb/site.key\"",
            "acme = { directory = \"https://acme.test/dir\", domains = [\"*.example.com\"] }",
        ));
        assert!(e.contains("is not a DNS name"), "{e}");
        let acme = |extra: &str| {
            HTTPS.replace(
                "cert = \"/etc/xlb/site.crt\"\nkey = \"/etc/xlb/site.key\"",
                &format!("acme = {{ directory = \"https://acme.test/dir\", domains = [\"example.com\"]{extra} }}"),
            )
        };
        let e = err(&acme(", challenge = \"dns-01\""));
        assert!(e.contains("tls.acme.challenge \"dns-01\": use \"http-01\""), "{e}");
        let e = err(&acme(", renew_before = \"5m\""));
        assert!(e.contains("tls.acme.renew_before \"5m\": out of range; use 1h..=365d"), "{e}");
        let e = err(&acme(", renew_before = \"soon\""));
        assert!(e.contains("tls.acme.renew_before \"soon\": not a duration"), "{e}");
        let e = err(&acme(", renew = \"30d\""));
        assert!(e.contains("unknown field `renew`"), "{e}");
        let alone = acme("").replace("mode = \"redirect\"", "mode = \"l4\"\nbackends = [\"203.0.113.10:8001\"]");
        let e = err(&alone);
        assert!(e.contains("service \"site\" gets its certificate by ACME HTTP-01"), "{e}");
        assert!(e.contains("add one listening on port 80"), "{e}");
        parse(&alone.replace("domains = [\"example.com\"]", "domains = [\"example.com\"], challenge = \"tls-alpn-01\"")).unwrap();
        let e = err(&format!("{}[acme]\nstate_dir = \"acme\"\n", acme("")));
        assert!(e.contains("acme.state_dir \"acme\": not an absolute path"), "{e}");
        let e = err(&format!("{HTTPS}backends = [\"203.0.113.10:8001\"]\n"));
        assert!(e.contains("\"redirect\" service answers every request itself"), "{e}");
    }

    #[test]
    fn backend_errors() {
        let e = err(&web("", ""));
        assert_eq!(
            e,
            "/etc/xlb/xlb.toml:7: service \"web\" backends: 0 listed; a service needs 1 to 16 backends (\"ip:port\" strings)"
        );
        let many: Vec<String> = (1..=17).map(|p| format!("\"203.0.113.10:{p}\"")).collect();
        assert!(err(&web(&many.join(", "), "")).contains("backends: 17 listed"));
        assert!(parse(&web(&many[..16].join(", "), "")).is_ok());
        let cases = [
            (
                "\"203.0.113.10:81\", \"203.0.113.10:81\"",
                "\"203.0.113.10:81\": listed twice; remove one",
            ),
            (
                "\"[2001:db8::1]:80\"",
                "\"[2001:db8::1]:80\": an IPv6 backend for an IPv4 listen address; xlb does not translate \
                 between IPv4 and IPv6, so use an IPv4 backend address",
            ),
            (
                "\"203.0.113.10:80\"",
                "\"203.0.113.10:80\": is the service's own listen address; run the backend on another port",
            ),
            (
                "\"127.0.0.1:8001\"",
                "\"127.0.0.1:8001\": a loopback backend for the non-loopback listen address 203.0.113.10:80; \
                 packets from other hosts cannot be rewritten to a loopback address (the kernel drops them), \
                 so have the backend listen on a host address such as \"203.0.113.10:8001\"",
            ),
        ];
        for (backends, expected) in cases {
            assert_eq!(
                err(&web(backends, "")),
                format!("/etc/xlb/xlb.toml:7: service \"web\" backend {expected}")
            );
        }
        let e = err(&service(
            "listen = \"[2001:db8::10]:80\"\nbackends = [\"203.0.113.10:80\"]",
        ));
        assert!(
            e.contains("an IPv4 backend for an IPv6 listen address"),
            "{e}"
        );
        let e = err(&service(
            "listen = \"127.0.0.1:80\"\nbackends = [\"203.0.113.10:80\"]",
        ));
        assert!(e.ends_with("not a loopback address, but the service listens on loopback address 127.0.0.1:80; use loopback backends or a non-loopback listen address"), "{e}");
        assert!(parse(&service("listen = \"[::1]:80\"\nbackends = [\"[::1]:81\"]")).is_ok());
    }

    #[test]
    fn health_errors() {
        let backends = "\"203.0.113.10:8001\"";
        let health = |body: &str| err(&web(backends, &format!("[service.health]\n{body}")));
        assert_eq!(
            health("check = \"icmp\""),
            "/etc/xlb/xlb.toml:9: service \"web\" health.check \"icmp\": not a check; use \"http\" (GET \
             health.path answers 2xx or 3xx) or \"tcp\" (a connection is accepted)"
        );
        for path in ["health", "/a b", "/caf\u{e9}", "/x\\ty"] {
            let e = health(&format!("path = \"{path}\""));
            assert!(
                e.starts_with("/etc/xlb/xlb.toml:9: service \"web\" health.path ")
                    && e.contains("not a request path"),
                "{e}"
            );
        }
        let e = health("interval = \"1x\"");
        assert!(
            e.starts_with("/etc/xlb/xlb.toml:9: service \"web\" health.interval \"1x\": not a duration (unknown time unit \"x\"")
                && e.ends_with("); write e.g. \"1s\" or \"500ms\""),
            "{e}"
        );
        assert!(health("timeout = \"soon\"").contains("health.timeout \"soon\": not a duration"));
        assert_eq!(
            health("interval = \"50ms\"\ntimeout = \"10ms\""),
            "/etc/xlb/xlb.toml:9: service \"web\" health.interval \"50ms\": too short; use at least \"100ms\""
        );
        assert_eq!(
            health("timeout = \"0s\""),
            "/etc/xlb/xlb.toml:9: service \"web\" health.timeout is zero; use e.g. \"500ms\""
        );
        assert_eq!(
            health("interval = \"2s\"\ntimeout = \"2s\""),
            "/etc/xlb/xlb.toml:10: service \"web\" health.timeout (2s) must be shorter than health.interval (2s) \
             so that a probe ends before the next starts; lower the timeout or raise the interval"
        );
        // With the default timeout, the interval is the key to blame.
        assert!(
            health("interval = \"300ms\"")
                .starts_with("/etc/xlb/xlb.toml:9: service \"web\" health.timeout (500ms)")
        );
        for (key, value) in [
            ("rise", 0),
            ("rise", 101),
            ("fall", -1),
            ("fall", 1_i64 << 40),
        ] {
            assert_eq!(
                health(&format!("{key} = {value}")),
                format!(
                    "/etc/xlb/xlb.toml:9: service \"web\" health.{key} = {value}: out of range; use 1..=100 consecutive probes"
                )
            );
        }
    }

    #[test]
    fn passive_health_keys() {
        let backends = "\"203.0.113.10:8001\"";
        let svc = |keys: &str| parse(&web(backends, keys)).map(|c| c.services[0].clone());
        let s = svc("").unwrap();
        assert_eq!((s.max_fails, s.fail_timeout, s.slow_start), (1, Duration::from_secs(10), Duration::ZERO));
        let s = svc("max_fails = 3\nfail_timeout = \"2s 500ms\"\nslow_start = \"30s\"").unwrap();
        assert_eq!((s.max_fails, s.fail_timeout, s.slow_start), (3, Duration::from_millis(2500), Duration::from_secs(30)));
        assert_eq!(svc("max_fails = 0").unwrap().max_fails, 0);
        let e = |keys: &str| svc(keys).expect_err("should be rejected").to_string();
        for v in [-1, 1001] {
            assert_eq!(
                e(&format!("max_fails = {v}")),
                format!(
                    "/etc/xlb/xlb.toml:8: service \"web\" max_fails = {v}: out of range; use 0 (passive \
                     health checks off) to 1000 failed connections"
                )
            );
        }
        assert_eq!(
            e("fail_timeout = \"0s\""),
            "/etc/xlb/xlb.toml:8: service \"web\" fail_timeout is zero; use e.g. \"10s\" (or max_fails = 0 \
             to turn passive health checks off)"
        );
        assert!(e("fail_timeout = \"ten\"").starts_with("/etc/xlb/xlb.toml:8: service \"web\" fail_timeout \"ten\": not a duration"));
        assert_eq!(
            e("slow_start = \"2h\""),
            "/etc/xlb/xlb.toml:8: service \"web\" slow_start \"2h\": too long; use at most \"1h\""
        );
        assert!(e("max_fails = \"1\"").contains("max_fails"), "{}", e("max_fails = \"1\""));
    }

    #[test]
    fn check_system_accepts_loopback_and_rejects_foreign() {
        let ok = parse(&service(
            "listen = \"127.0.0.1:80\"\nbackends = [\"127.0.0.1:81\"]",
        ))
        .unwrap();
        ok.check_system().unwrap();

        let e = parse(&EXAMPLE.replace("eth0", "xlb-nonexist0"))
            .unwrap()
            .check_system()
            .unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(
            e.to_string().starts_with(
                "/etc/xlb/xlb.toml:2: dataplane.interfaces: no network interface \"xlb-nonexist0\" on this host; use one of: "
            ),
            "{e}"
        );
        assert!(
            e.message.contains("lo") && e.message.ends_with("(see `ip link`)"),
            "{e}"
        );

        let local = local_addresses().unwrap();
        let foreign = ["192.0.2.9", "198.51.100.9", "203.0.113.9"]
            .map(|a| a.parse::<IpAddr>().unwrap())
            .into_iter()
            .find(|a| !local.contains(a))
            .expect("this host has every documentation address");
        // The VIP itself need not be local; only backends are checked.
        let host = local
            .iter()
            .find(|ip| ip.is_ipv4() && !ip.is_loopback())
            .copied()
            .unwrap_or(foreign);
        let text = format!(
            "[dataplane]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"web\"\nlisten = \"{foreign}:80\"\n\
             backends = [\n  \"{host}:8001\",\n  \"{foreign}:8002\",\n]\n"
        );
        let e = parse(&text)
            .unwrap()
            .check_system()
            .unwrap_err()
            .to_string();
        let (line, bad) = if host == foreign {
            (7, 8001)
        } else {
            (8, 8002)
        };
        assert!(
            e.starts_with(&format!(
                "/etc/xlb/xlb.toml:{line}: service \"web\" backend \"{foreign}:{bad}\": not an address of this \
                 host; xlb balances to same-host backends only — use an address from `ip addr` (this host has "
            )),
            "{e}"
        );
        assert!(e.contains("127.0.0.1"), "{e}");
    }

    #[test]
    fn load_reads_and_checks_the_file() {
        let dir = std::env::temp_dir().join(format!("xlb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("xlb.toml");
        std::fs::write(
            &path,
            service("listen = \"127.0.0.1:80\"\nbackends = [\"127.0.0.1:81\"]"),
        )
        .unwrap();
        assert_eq!(Config::load(&path).unwrap().path, path);
        std::fs::write(&path, EXAMPLE.replace("eth0", "xlb-nonexist0")).unwrap();
        assert!(
            Config::load(&path)
                .unwrap_err()
                .message
                .contains("xlb-nonexist0")
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}: cannot read the config file: No such file or directory",
                path.display()
            )),
            "{e}"
        );
    }

    /// The commented default config that `cargo xtask install` puts in /etc/xlb/xlb.toml.
    #[test]
    fn shipped_default_config_parses() {
        let path = Path::new("/etc/xlb/xlb.toml");
        let config = Config::parse(path, include_str!("../../systemd/xlb.toml")).unwrap();
        assert_eq!(config.dataplane.interfaces, ["eth0"]);
        assert_eq!(config.dataplane.pin_path, Path::new(DEFAULT_PIN_PATH));
        assert_eq!(config.admin.listen, DEFAULT_ADMIN_LISTEN);
        let [web] = &config.services[..] else { panic!("{config:?}") };
        assert_eq!((web.name.as_str(), web.backends.len()), ("web", 3));
    }

    const ALERTS: &str = r#"
[alerts]
max_per_minute = 5

[alerts.email]
host = "smtp.example.com"
tls = "starttls"
from = "xlb <xlb@example.com>"
to = ["ops@example.com", "oncall@example.com"]
username = "xlb"
password_file = "/etc/xlb/smtp-password"

[alerts.webhook]
url = "https://hooks.example.com/xlb"
timeout = "3s"
"#;

    #[test]
    fn alerts_parse() {
        let config = parse(&format!("{EXAMPLE}{ALERTS}")).unwrap();
        let alerts = config.alerts.expect("[alerts]");
        assert_eq!(alerts.max_per_minute, 5);
        let email = alerts.email.expect("[alerts.email]");
        assert_eq!((email.host.as_str(), email.port, email.tls), ("smtp.example.com", 587, SmtpTls::StartTls));
        assert_eq!(email.from, "xlb <xlb@example.com>");
        assert_eq!(email.to, ["ops@example.com", "oncall@example.com"]);
        let credentials = email.credentials.expect("credentials");
        assert_eq!(credentials.username, "xlb");
        assert_eq!(format!("{:?}", credentials.password), "Secret(…)");
        let webhook = alerts.webhook.expect("[alerts.webhook]");
        assert_eq!((webhook.url.as_str(), webhook.timeout), ("https://hooks.example.com/xlb", Duration::from_secs(3)));
        assert_eq!(parse(EXAMPLE).unwrap().alerts, None);
        // The port follows the kind of TLS unless given.
        let tls = parse(&format!("{EXAMPLE}{}", ALERTS.replace("\"starttls\"", "\"tls\""))).unwrap();
        assert_eq!(tls.alerts.unwrap().email.unwrap().port, 465);
    }

    #[test]
    fn alerts_errors() {
        let with = |from: &str, to: &str| err(&format!("{EXAMPLE}{}", ALERTS.replace(from, to)));
        let e = with("tls = \"starttls\"", "tls = \"ssl\"");
        assert!(e.starts_with("/etc/xlb/xlb.toml:29: alerts.email.tls \"ssl\": use \"starttls\""), "{e}");
        let e = with("password_file = \"/etc/xlb/smtp-password\"\n", "");
        assert!(e.contains("alerts.email.username is set but password_file is not"), "{e}");
        let e = with("tls = \"starttls\"", "tls = \"none\"");
        assert!(e.contains("the password would cross the network unencrypted"), "{e}");
        let e = with("\"ops@example.com\", ", "\"ops at example.com\", ");
        assert!(e.contains(":31: alerts.email.to \"ops at example.com\": not an e-mail address"), "{e}");
        let e = with("[\"ops@example.com\", \"oncall@example.com\"]", "[]");
        assert!(e.contains("alerts.email.to is empty"), "{e}");
        let e = with("https://hooks.example.com/xlb", "ftp://hooks.example.com/xlb");
        assert!(e.contains(":36: alerts.webhook.url \"ftp://hooks.example.com/xlb\": not an http:// or https:// URL"), "{e}");
        let e = with("max_per_minute = 5", "max_per_minute = 0");
        assert!(e.contains(":25: alerts.max_per_minute = 0: out of range"), "{e}");
        let e = with("smtp.example.com", "smtp.example.com:587");
        assert!(e.contains("the port goes in alerts.email.port"), "{e}");
        let e = err(&format!("{EXAMPLE}\n[alerts]\nmax_per_minute = 3\n"));
        assert!(e.contains("[alerts] has neither [alerts.email] nor [alerts.webhook]"), "{e}");
        let e = err(&format!(
            "{EXAMPLE}\n[alerts.email]\nhost = \"127.0.0.1\"\ntls = \"none\"\nfrom = \"a@b.c\"\nto = [\"a@b.c\"]\nca_file = \"/x\"\n"
        ));
        assert!(e.contains("alerts.email.ca_file is set but tls = \"none\""), "{e}");
        let e = with("[alerts.webhook]", "[alerts.webhok]");
        assert!(e.contains("unknown field `webhok`"), "{e}");
    }

    #[test]
    fn smtp_password_comes_from_its_file() {
        let dir = std::env::temp_dir().join(format!("xlb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("smtp-password");
        let text = format!("{EXAMPLE}{}", ALERTS.replace("/etc/xlb/smtp-password", &file.display().to_string()));
        let mut config = parse(&text).unwrap();
        let e = config.read_secrets().unwrap_err().to_string();
        assert!(e.contains("alerts.email.password_file") && e.contains("cannot read it"), "{e}");
        std::fs::write(&file, "s3cret\n").unwrap();
        config.read_secrets().unwrap();
        let password = &config.alerts.as_ref().unwrap().email.as_ref().unwrap().credentials.as_ref().unwrap().password;
        assert_eq!(password.0, "s3cret");
        std::fs::write(&file, "\n").unwrap();
        assert!(config.read_secrets().unwrap_err().to_string().contains("is empty"));
        // A CA file must hold certificates.
        let ca = dir.join("ca.pem");
        std::fs::write(&file, "s3cret\n").unwrap();
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let mut config = parse(&text.replace(
            "username = \"xlb\"",
            &format!("username = \"xlb\"\nca_file = \"{}\"", ca.display()),
        ))
        .unwrap();
        let e = config.read_secrets().unwrap_err().to_string();
        assert!(e.contains("alerts.email.ca_file") && e.contains("not PEM certificates"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

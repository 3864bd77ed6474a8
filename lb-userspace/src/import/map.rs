//! From nginx's directives to xlb's typed config: services built from `server` blocks and the
//! `upstream`s they proxy to, and a diagnostic for everything that is carried over differently
//! or not at all.
//!
//! The values built are the config module's own (`Service`, `Https`, …), so what is emitted is
//! what `Config::parse` reads back. Nothing is guessed into a key xlb does not have: where xlb has
//! no equivalent the diagnostic says so, names the directive's file and line, and says what to do
//! instead.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::config::{
    Acme, CertFiles, ChallengeKind, CheckKind, DEFAULT_FAIL_TIMEOUT, DEFAULT_MAX_FAILS, DEFAULT_RENEW_BEFORE, Health,
    HttpHeaders, Https, Limits, Service, ServiceMode, Timeouts, Tls,
};

use super::nginx::{Directive, Origin, ParseError};

/// What the configuration does not say and the user does.
#[derive(Clone, Debug)]
pub struct Options {
    /// The address services listen on where nginx listens on every address (`listen 443`).
    pub address: Option<IpAddr>,
    /// `dataplane.interfaces`: where clients' packets arrive.
    pub interface: String,
    /// The main file's directory: relative certificate paths are relative to it, as nginx's
    /// prefix conf directory.
    pub base: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Carried over, with a difference worth knowing or a step to take outside the file.
    Note,
    /// Not carried over: the imported config behaves differently here.
    Dropped,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub at: Origin,
    pub level: Level,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let level = match self.level {
            Level::Note => "note",
            Level::Dropped => "not carried over",
        };
        write!(f, "{}: {level}: {}", self.at, self.message)
    }
}

/// One service and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imported {
    pub service: Service,
    /// Comment lines naming the nginx file:line of the server (and of its upstream).
    pub origin: Vec<String>,
    /// For certificates certbot keeps under /etc/letsencrypt/live/: the same names from xlb's
    /// own ACME client, offered as a commented alternative.
    pub acme: Option<Acme>,
}

/// The whole import.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Import {
    pub interface: String,
    pub services: Vec<Imported>,
    /// Where a `stub_status` was: the admin API's `/status` replaces it.
    pub status: Option<Origin>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Import {
    pub fn complete(&self) -> bool {
        !self.diagnostics.iter().any(|d| d.level == Level::Dropped)
    }
}

const LETSENCRYPT_LIVE: &str = "/etc/letsencrypt/live/";
const LETSENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// nginx's `client_max_body_size` when none is set.
const NGINX_DEFAULT_BODY: u64 = 1 << 20;

/// nginx's internals with nothing observable to carry over (worker and buffer tuning, MIME
/// types, TLS session caching, which xlb does by itself).
const TUNING: &[&str] = &[
    "user", "worker_processes", "worker_connections", "worker_rlimit_nofile", "worker_cpu_affinity", "pid",
    "multi_accept", "use", "accept_mutex", "load_module", "env", "daemon", "master_process", "pcre_jit",
    "thread_pool", "timer_resolution", "sendfile", "tcp_nopush", "tcp_nodelay", "types", "default_type",
    "types_hash_max_size", "types_hash_bucket_size", "server_names_hash_bucket_size",
    "server_names_hash_max_size", "variables_hash_max_size", "variables_hash_bucket_size",
    "map_hash_bucket_size", "map_hash_max_size", "server_tokens", "log_format", "open_file_cache",
    "open_file_cache_valid", "open_file_cache_min_uses", "open_file_cache_errors", "output_buffers", "aio",
    "directio", "reset_timedout_connection", "client_body_buffer_size", "client_header_buffer_size",
    "proxy_buffering", "proxy_buffers", "proxy_buffer_size", "proxy_busy_buffers_size", "proxy_temp_path",
    "proxy_max_temp_file_size", "client_body_temp_path", "ssl_session_cache", "ssl_session_timeout",
    "ssl_session_tickets", "ssl_prefer_server_ciphers", "ssl_ecdh_curve", "ssl_dhparam", "ssl_buffer_size",
    "proxy_http_version", "keepalive_requests", "zone", "keepalive_time", "ssl_early_data",
    "proxy_request_buffering", "server_name_in_redirect", "port_in_redirect", "absolute_redirect",
    "worker_shutdown_timeout", "lingering_close", "lingering_time", "lingering_timeout",
];

/// The directives inherited from `http` into `server` into `location` that the mapping reads;
/// an inner level that has one replaces the outer level's (nginx's rule, also for the lists
/// `add_header` and `proxy_set_header`).
const INHERITED: &[&str] = &[
    "add_header", "proxy_set_header", "ssl_certificate", "ssl_certificate_key", "ssl_protocols", "ssl_ciphers",
    "client_max_body_size", "keepalive_timeout", "client_header_timeout", "proxy_connect_timeout",
    "proxy_read_timeout", "proxy_send_timeout", "http2", "access_log", "error_log", "ssl_stapling",
    "ssl_stapling_verify", "ssl_trusted_certificate", "resolver", "resolver_timeout", "proxy_next_upstream",
    "proxy_next_upstream_tries", "proxy_next_upstream_timeout", "proxy_redirect", "send_timeout",
    "client_body_timeout",
];

/// What xlb has instead of the handlers and filters it does not carry over.
fn advice(name: &str) -> Option<&'static str> {
    let starts = |p: &str| name.starts_with(p);
    Some(if starts("proxy_cache") || starts("fastcgi_cache") || name == "expires" {
        "xlb caches nothing; have the app send Cache-Control headers, or keep a cache in front of it"
    } else if starts("auth_") || name == "satisfy" {
        "xlb does no authentication; do it in the app"
    } else if starts("limit_req") || starts("limit_conn") || starts("limit_rate") {
        "xlb has no request or connection rate limits per client; limit in the app or with nftables meters"
    } else if name == "allow" || name == "deny" {
        "xlb has no access lists per location; filter client addresses with nftables"
    } else if starts("lua") || name.contains("_by_lua") || starts("js_") || starts("perl") {
        "xlb runs no scripts; move the logic into the app"
    } else if name == "rewrite" || name == "if" || name == "set" || name == "map" || name == "geo" || name == "try_files" {
        "xlb does not rewrite or route requests by path, header or variable; every request goes to the service's backends, so do it in the app"
    } else if name == "root" || name == "alias" || name == "index" || name == "autoindex" {
        "xlb serves no files; serve them from the app"
    } else if starts("gzip") || starts("brotli") {
        "xlb does not compress responses; have the app compress them"
    } else if starts("fastcgi_") || starts("uwsgi_") || starts("scgi_") || starts("grpc_") || name == "memcached_pass" {
        "xlb speaks HTTP to its backends only; have the app listen for HTTP"
    } else if starts("sub_filter") || name == "mirror" || starts("add_trailer") || name == "proxy_hide_header" || name == "proxy_pass_header" {
        "xlb passes responses on unchanged (but for the security headers it adds); change them in the app"
    } else if name == "error_page" || name == "proxy_intercept_errors" {
        "xlb passes the backends' error responses on as they are; make the app render its error pages"
    } else if starts("real_ip") || name == "set_real_ip_from" {
        "xlb takes the client address from the connection; it does not trust a forwarded one"
    } else if name == "ssl_client_certificate" || name == "ssl_verify_client" || name == "ssl_verify_depth" {
        "xlb does not ask clients for certificates; authenticate them in the app"
    } else if starts("proxy_ssl") {
        "xlb speaks plain HTTP to its backends, which are on this host"
    } else if starts("ssl_") {
        "xlb has no such TLS setting; it serves TLS 1.2 and 1.3 with its own settings"
    } else {
        return None;
    })
}

/// How many arguments nginx takes for the settings the mapping reads.
fn setting_arity(name: &str) -> Option<std::ops::RangeInclusive<usize>> {
    Some(match name {
        "add_header" => 2..=3,
        "proxy_set_header" => 2..=2,
        "ssl_protocols" => 1..=6,
        "keepalive_timeout" => 1..=2,
        "ssl_certificate" | "ssl_certificate_key" | "ssl_ciphers" | "client_max_body_size" | "client_header_timeout"
        | "proxy_connect_timeout" | "proxy_read_timeout" | "proxy_send_timeout" | "http2" => 1..=1,
        _ => return None,
    })
}

/// Directives kept through the levels for the mapping.
#[derive(Clone, Default)]
struct Settings<'a> {
    by_name: HashMap<&'static str, Vec<&'a Directive>>,
}

impl<'a> Settings<'a> {
    /// The settings of a level inside this one; the directives it reads are checked for the
    /// arguments nginx requires of them.
    fn inherit(&self, children: &'a [Directive]) -> Result<Settings<'a>, ParseError> {
        let mut next = self.clone();
        for &name in INHERITED {
            let here: Vec<&Directive> = children.iter().filter(|d| d.name == name).collect();
            for d in &here {
                if let Some(range) = setting_arity(name) {
                    arity(d, range)?;
                }
            }
            if !here.is_empty() {
                next.by_name.insert(name, here);
            }
        }
        Ok(next)
    }

    fn all(&self, name: &str) -> &[&'a Directive] {
        self.by_name.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The innermost one (for a directive written once per level).
    fn last(&self, name: &str) -> Option<&'a Directive> {
        self.all(name).last().copied()
    }
}

#[derive(Clone, Debug)]
struct Upstream {
    name: String,
    at: Origin,
    backends: Vec<(SocketAddr, Origin)>,
    max_fails: u32,
    fail_timeout: Duration,
    slow_start: Duration,
}

/// A `listen` of a `server`.
#[derive(Clone, Debug)]
struct Listen {
    addr: SocketAddr,
    ssl: bool,
    http2: bool,
    default: bool,
    at: Origin,
}

/// The servers listening on one address: (address, ssl, (server's index, its listen)…).
type Group<'s> = (SocketAddr, bool, Vec<(usize, &'s Listen)>);

/// Where a proxying location sends requests.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Upstream(String),
    Addr(SocketAddr),
}

struct Mapper<'a> {
    opts: &'a Options,
    diagnostics: Vec<Diagnostic>,
    status: Option<Origin>,
    names: Vec<String>,
}

fn error(d: &Directive, message: impl Into<String>) -> ParseError {
    ParseError { at: d.at.clone(), message: message.into() }
}

/// `invalid number of arguments`, as nginx says it.
fn arity(d: &Directive, range: std::ops::RangeInclusive<usize>) -> Result<(), ParseError> {
    if range.contains(&d.args.len()) {
        return Ok(());
    }
    Err(error(d, format!("invalid number of arguments in \"{}\" directive", d.name)))
}

/// nginx's time syntax: `30s`, `1m`, `500ms`, `1h30m`, a bare number of seconds.
pub fn nginx_time(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = match rest.as_bytes() {
            [b'm', b's', ..] => (Duration::from_millis(1), 2),
            [b's', ..] => (Duration::from_secs(1), 1),
            [b'm', ..] => (Duration::from_secs(60), 1),
            [b'h', ..] => (Duration::from_secs(3600), 1),
            [b'd', ..] => (Duration::from_secs(86400), 1),
            [b'w', ..] => (Duration::from_secs(7 * 86400), 1),
            [b'M', ..] => (Duration::from_secs(30 * 86400), 1),
            [b'y', ..] => (Duration::from_secs(365 * 86400), 1),
            [] => (Duration::from_secs(1), 0),
            _ => return None,
        };
        total = total.checked_add(unit.checked_mul(u32::try_from(n).ok()?)?)?;
        rest = &rest[len..];
    }
    Some(total)
}

/// nginx's size syntax: `1024`, `10k`, `10M`, `1g`.
pub fn nginx_size(text: &str) -> Option<u64> {
    let (digits, scale) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 1 << 10),
        b'm' | b'M' => (&text[..text.len() - 1], 1 << 20),
        b'g' | b'G' => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

fn duration_text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl<'a> Mapper<'a> {
    fn note(&mut self, at: &Origin, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic { at: at.clone(), level: Level::Note, message: message.into() });
    }

    fn dropped(&mut self, at: &Origin, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic { at: at.clone(), level: Level::Dropped, message: message.into() });
    }

    /// A directive the mapping has no use for: silent for nginx's own tuning, else a note or
    /// "not carried over" with what to do instead.
    fn other(&mut self, d: &Directive) {
        let name = d.name.as_str();
        if TUNING.contains(&name) {
            return;
        }
        let text = d.text();
        match name {
            "access_log" | "error_log" => self.note(
                &d.at,
                format!("`{text}`: xlb writes no access log; its log goes to the journal (stderr), and `xlb status` and /metrics count requests by response class"),
            ),
            "ssl_stapling" | "ssl_stapling_verify" | "ssl_trusted_certificate" | "resolver" | "resolver_timeout" => {
                self.note(&d.at, format!("`{text}`: xlb does not staple OCSP responses; nothing to set"))
            }
            "proxy_next_upstream" | "proxy_next_upstream_tries" | "proxy_next_upstream_timeout" => self.note(
                &d.at,
                format!("`{text}`: xlb sends a request to another backend when its backend refuses or fails before answering, for idempotent requests; this is not configurable"),
            ),
            "send_timeout" | "client_body_timeout" => self.note(
                &d.at,
                format!("`{text}`: xlb closes connections where nothing moves for timeouts.idle, and bounds a buffered body by timeouts.request_header"),
            ),
            "proxy_redirect" if matches!(d.args.first().map(String::as_str), Some("off" | "default")) => {}
            _ => match advice(name) {
                Some(instead) => self.dropped(&d.at, format!("`{text}`: {instead}")),
                None => self.dropped(&d.at, format!("`{text}`: xlb has no equivalent; do it in the app, or keep nginx for it")),
            },
        }
    }

    fn unique_name(&mut self, wanted: &str) -> String {
        let clean: String = wanted
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '-' })
            .take(56)
            .collect();
        let base = if clean.is_empty() { "service".to_string() } else { clean };
        let mut name = base.clone();
        let mut n = 2;
        while self.names.contains(&name) {
            name = format!("{base}-{n}");
            n += 1;
        }
        self.names.push(name.clone());
        name
    }

    fn upstream(&mut self, d: &'a Directive) -> Result<Upstream, ParseError> {
        arity(d, 1..=1)?;
        let mut up = Upstream {
            name: d.args[0].clone(),
            at: d.at.clone(),
            backends: Vec::new(),
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
            slow_start: Duration::ZERO,
        };
        let mut method = None;
        let mut passive: Vec<(u32, Duration, Origin)> = Vec::new();
        for c in d.children() {
            match c.name.as_str() {
                "server" => {
                    if c.args.is_empty() {
                        return Err(error(c, "invalid number of arguments in \"server\" directive"));
                    }
                    let mut fails = (DEFAULT_MAX_FAILS, DEFAULT_FAIL_TIMEOUT);
                    let mut keep = true;
                    for p in &c.args[1..] {
                        let (key, value) = p.split_once('=').unwrap_or((p, ""));
                        match key {
                            "max_fails" => {
                                fails.0 = value.parse().ok().filter(|n| *n <= 1000).ok_or_else(|| error(c, format!("invalid parameter \"{p}\"")))?;
                            }
                            "fail_timeout" => fails.1 = nginx_time(value).ok_or_else(|| error(c, format!("invalid parameter \"{p}\"")))?,
                            "weight" => {
                                let w: u32 = value.parse().ok().filter(|w| *w > 0).ok_or_else(|| error(c, format!("invalid parameter \"{p}\"")))?;
                                if w != 1 {
                                    self.dropped(&c.at, format!(
                                        "`{}`: weight={w}: xlb gives every backend an equal share, by least connections; run more instances of the app on the bigger machine, or leave the weight out",
                                        c.text()
                                    ));
                                }
                            }
                            "backup" => {
                                keep = false;
                                self.dropped(&c.at, format!(
                                    "`{}`: xlb has no backup servers, so it is left out; list it in backends to have it serve all the time",
                                    c.text()
                                ));
                            }
                            "down" => {
                                keep = false;
                                self.note(&c.at, format!(
                                    "`{}`: marked down, so left out of backends; to keep it listed but idle, list it and run `xlb drain`",
                                    c.text()
                                ));
                            }
                            "slow_start" => up.slow_start = nginx_time(value).ok_or_else(|| error(c, format!("invalid parameter \"{p}\"")))?,
                            _ => self.dropped(&c.at, format!("`{}`: parameter {p}: xlb has no equivalent; leave it out", c.text())),
                        }
                    }
                    if !keep {
                        continue;
                    }
                    match backend_addr(&c.args[0]) {
                        Ok((addr, note)) => {
                            if let Some(note) = note {
                                self.note(&c.at, note);
                            }
                            passive.push((fails.0, fails.1, c.at.clone()));
                            up.backends.push((addr, c.at.clone()));
                        }
                        Err(why) => self.dropped(&c.at, format!("`{}`: {why}", c.text())),
                    }
                }
                "least_conn" => method = Some(c),
                "ip_hash" | "hash" | "random" | "least_time" | "sticky" | "ntlm" => method = Some(c),
                "keepalive" => self.note(&c.at, format!("`{}`: xlb keeps idle connections to the backends open by itself", c.text())),
                "keepalive_timeout" => {}
                _ => self.other(c),
            }
        }
        match method.map(|m| (m, m.name.as_str())) {
            Some((_, "least_conn")) => {}
            Some((m, "random")) => self.note(&m.at, format!(
                "`{}`: xlb chooses the backend with the fewest connections (least_conn), which spreads as evenly while backends are equally loaded",
                m.text()
            )),
            Some((m, "ip_hash" | "hash" | "sticky")) => self.dropped(&m.at, format!(
                "`{}`: xlb does not pin clients to a backend; it chooses the one with the fewest connections. Keep sessions in a store the app instances share (database, Redis) so that any instance can serve any client",
                m.text()
            )),
            Some((m, _)) => self.dropped(&m.at, format!("`{}`: xlb chooses by least connections only", m.text())),
            None => self.note(&d.at, format!(
                "upstream {}: nginx's round-robin becomes xlb's least connections, which takes turns the same way while backends are equally loaded and avoids a busy one",
                up.name
            )),
        }
        if let Some((first, rest)) = passive.split_first() {
            (up.max_fails, up.fail_timeout) = (first.0, first.1);
            if let Some(other) = rest.iter().find(|p| (p.0, p.1) != (first.0, first.1)) {
                self.note(&other.2, format!(
                    "max_fails/fail_timeout differ between the servers of upstream {}; xlb has one setting per service and uses the first server's (max_fails={} fail_timeout={})",
                    up.name, first.0, duration_text(first.1)
                ));
            }
            if up.fail_timeout.is_zero() || up.fail_timeout > crate::config::MAX_PASSIVE_DURATION {
                self.note(&first.2, "fail_timeout outside xlb's 1ms..=1h; xlb's default of 10s is used");
                up.fail_timeout = DEFAULT_FAIL_TIMEOUT;
            }
            if up.slow_start > crate::config::MAX_PASSIVE_DURATION {
                self.note(&d.at, "slow_start longer than xlb's 1h; 1h is used");
                up.slow_start = crate::config::MAX_PASSIVE_DURATION;
            }
        }
        Ok(up)
    }

    /// The address a service listens on, from a `listen` (or `None` and a diagnostic when it
    /// cannot be carried over).
    fn listen(&mut self, d: &Directive) -> Result<Option<Listen>, ParseError> {
        if d.args.is_empty() {
            return Err(error(d, "invalid number of arguments in \"listen\" directive"));
        }
        let spec = d.args[0].as_str();
        let mut l = Listen {
            addr: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 80),
            ssl: false,
            http2: false,
            default: false,
            at: d.at.clone(),
        };
        for p in &d.args[1..] {
            match p.split_once('=').map_or(p.as_str(), |(k, _)| k) {
                "ssl" => l.ssl = true,
                "http2" => l.http2 = true,
                "default_server" | "default" => l.default = true,
                "quic" | "http3" => {
                    self.dropped(&d.at, format!("`{}`: xlb serves no HTTP/3; clients use HTTP/2 or 1.1 over TCP", d.text()));
                    return Ok(None);
                }
                "udp" => {
                    self.dropped(&d.at, format!("`{}`: xlb balances TCP only", d.text()));
                    return Ok(None);
                }
                "proxy_protocol" => self.dropped(&d.at, format!("`{}`: xlb does not read the PROXY protocol; clients must connect to it directly", d.text())),
                _ => {}
            }
        }
        if spec.starts_with("unix:") {
            self.dropped(&d.at, format!("`{}`: xlb listens on IP addresses only", d.text()));
            return Ok(None);
        }
        let (host, port) = if let Ok(port) = spec.parse::<u16>() {
            (None, port)
        } else if let Ok(addr) = spec.parse::<SocketAddr>() {
            (Some(addr.ip()), addr.port())
        } else if let Some(ip) = spec.strip_prefix("*:").and_then(|p| p.parse::<u16>().ok()) {
            (None, ip)
        } else if let Ok(ip) = spec.parse::<IpAddr>() {
            (Some(ip), 80)
        } else if let Some(ip) = spec.strip_prefix('[').and_then(|s| s.strip_suffix(']')).and_then(|s| s.parse::<IpAddr>().ok()) {
            (Some(ip), 80)
        } else {
            self.dropped(&d.at, format!("`{}`: not an IP address and port; xlb resolves no host names, so write the address", d.text()));
            return Ok(None);
        };
        if port == 0 {
            return Err(error(d, format!("invalid port in \"{spec}\" of the \"listen\" directive")));
        }
        let ip = match host {
            Some(ip) if !ip.is_unspecified() => ip,
            wildcard => {
                let v6 = matches!(wildcard, Some(IpAddr::V6(_)));
                match self.opts.address {
                    Some(a) if a.is_ipv6() == v6 => a,
                    Some(_) if v6 => {
                        self.dropped(&d.at, format!(
                            "`{}`: an xlb service listens on one address, here the IPv4 one of --address; for IPv6 clients add a service with this host's IPv6 address and IPv6 backends",
                            d.text()
                        ));
                        return Ok(None);
                    }
                    _ => {
                        return Err(error(d, format!(
                            "`{}` listens on every address, but an xlb service listens on one; give it with --address IP (this host's public {} address, see `ip addr`)",
                            d.text(),
                            if v6 { "IPv6" } else { "IPv4" }
                        )));
                    }
                }
            }
        };
        l.addr = SocketAddr::new(ip, port);
        Ok(Some(l))
    }

    /// `backends` for a service on `listen`: a loopback backend moves to the service's address
    /// (xlb cannot rewrite a public connection to loopback), with the step that needs.
    fn backends(&mut self, listen: SocketAddr, up: &Upstream) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for (addr, at) in &up.backends {
            let mut addr = *addr;
            if addr.is_ipv4() != listen.is_ipv4() {
                self.dropped(at, format!(
                    "backend {addr} is not of the family of the service's address {listen}; xlb does not translate between IPv4 and IPv6"
                ));
                continue;
            }
            if addr.ip().is_loopback() && !listen.ip().is_loopback() {
                let moved = SocketAddr::new(listen.ip(), addr.port());
                self.note(at, format!(
                    "backend {addr} becomes {moved}: xlb forwards to the backends on this host's own address, not loopback; have the app instance listen on {moved} (or 0.0.0.0:{})",
                    addr.port()
                ));
                addr = moved;
            }
            if addr == listen {
                self.dropped(at, format!("backend {addr} is the service's own address; run it on another port"));
                continue;
            }
            if out.contains(&addr) {
                continue;
            }
            if out.len() == lb_common::service::MAX_BACKENDS_PER_SERVICE as usize {
                self.dropped(at, format!("backend {addr}: xlb takes at most {} backends per service", lb_common::service::MAX_BACKENDS_PER_SERVICE));
                continue;
            }
            out.push(addr);
        }
        out
    }

    fn target(&mut self, d: &Directive, upstreams: &HashMap<String, Upstream>) -> Option<Target> {
        let arg = d.args.first()?;
        let Some(rest) = arg.strip_prefix("http://") else {
            let why = if arg.starts_with("https://") {
                "xlb speaks plain HTTP to its backends, which are on this host; have them listen for HTTP"
            } else {
                "not an http:// address"
            };
            self.dropped(&d.at, format!("`{}`: {why}", d.text()));
            return None;
        };
        let (host, uri) = rest.split_once('/').map_or((rest, None), |(h, u)| (h, Some(u)));
        if arg.contains('$') {
            self.dropped(&d.at, format!("`{}`: xlb chooses no backend by variable; list the backends in an upstream", d.text()));
            return None;
        }
        if uri.is_some_and(|u| !u.is_empty()) {
            self.dropped(&d.at, format!("`{}`: the path after the address rewrites the request path; xlb forwards paths unchanged, so have the app serve them as they come", d.text()));
            return None;
        }
        if upstreams.contains_key(host) {
            return Some(Target::Upstream(host.to_string()));
        }
        match backend_addr(host) {
            Ok((addr, _)) => Some(Target::Addr(addr)),
            Err(why) => {
                self.dropped(&d.at, format!("`{}`: no upstream {host} is defined, and {why}", d.text()));
                None
            }
        }
    }
}

/// An upstream server's address: `ip:port`, `ip` (port 80), `localhost:port`.
fn backend_addr(spec: &str) -> Result<(SocketAddr, Option<String>), String> {
    if spec.starts_with("unix:") {
        return Err("a unix socket; xlb forwards to TCP backends only, so have the app listen on a port".into());
    }
    if let Ok(a) = spec.parse::<SocketAddr>() {
        return Ok((a, None));
    }
    if let Ok(ip) = spec.parse::<IpAddr>() {
        return Ok((SocketAddr::new(ip, 80), None));
    }
    if let Some(port) = spec.strip_prefix("localhost:").and_then(|p| p.parse::<u16>().ok()) {
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        return Ok((addr, Some(format!("{spec} is taken as {addr}: xlb resolves no host names"))));
    }
    Err(format!("{spec} is not an IP address and port; xlb resolves no host names, so write the address"))
}

/// Everything an http `server` proxies and answers.
struct Server<'a> {
    d: &'a Directive,
    names: Vec<String>,
    listens: Vec<Listen>,
    /// The location that takes every request (`/`), else the only proxying one.
    proxy: Option<(Target, Settings<'a>, &'a Directive)>,
    /// `return 30x https://…` answering every request.
    redirect: Option<&'a Directive>,
    settings: Settings<'a>,
    /// Only a status location: nothing to serve but what the admin API serves.
    status_only: bool,
}

impl<'a> Mapper<'a> {
    fn server(&mut self, d: &'a Directive, http: &Settings<'a>, upstreams: &HashMap<String, Upstream>) -> Result<Server<'a>, ParseError> {
        let settings = http.inherit(d.children())?;
        let mut s = Server { d, names: Vec::new(), listens: Vec::new(), proxy: None, redirect: None, settings: settings.clone(), status_only: false };
        let mut proxies: Vec<(String, Target, Settings<'a>, &'a Directive)> = Vec::new();
        let mut handlers = 0;
        let mut statuses = 0;
        for c in d.children() {
            match c.name.as_str() {
                "listen" => {
                    if let Some(l) = self.listen(c)? {
                        s.listens.push(l);
                    }
                }
                "server_name" => s.names.extend(c.args.iter().filter(|n| n.as_str() != "_" && !n.is_empty()).cloned()),
                "location" => {
                    handlers += 1;
                    self.location(c, &settings, upstreams, &mut proxies, &mut statuses, &mut s.redirect)?;
                }
                "return" => {
                    arity(c, 1..=2)?;
                    handlers += 1;
                    if is_https_redirect(c) {
                        s.redirect = Some(c);
                    } else {
                        self.dropped(&c.at, format!("`{}`: xlb answers no request itself but for the redirect to https; have the app answer it", c.text()));
                    }
                }
                "client_max_body_size" => {
                    arity(c, 1..=1)?;
                    if nginx_size(&c.args[0]).is_none() {
                        return Err(error(c, format!("\"{}\" directive invalid value", c.name)));
                    }
                }
                "http2" | "add_header" | "proxy_set_header" | "ssl_certificate" | "ssl_certificate_key" | "ssl_protocols" | "ssl_ciphers"
                | "keepalive_timeout" | "client_header_timeout" | "proxy_connect_timeout" | "proxy_read_timeout"
                | "proxy_send_timeout" | "ssl" => {}
                _ => self.other(c),
            }
        }
        if d.children().iter().all(|c| c.name != "listen") {
            // nginx's default, `listen *:80`.
            let Some(ip) = self.opts.address else {
                return Err(error(d, "this server has no listen, so nginx listens on port 80 of every address, but an xlb service listens on one; give it with --address IP"));
            };
            s.listens.push(Listen { addr: SocketAddr::new(ip, 80), ssl: false, http2: false, default: false, at: d.at.clone() });
        }
        if statuses > 0 && statuses == handlers {
            s.status_only = true;
        }
        let root = proxies.iter().position(|p| p.0 == "/");
        let primary = root.or((proxies.len() == 1).then_some(0));
        if let Some(i) = primary {
            let (path, target, set, at) = proxies[i].clone();
            if path != "/" {
                self.note(&at.at, format!(
                    "only location {path} proxies; xlb sends every request of the service to the backends, not only those under {path}"
                ));
            }
            for (other_path, other, _, loc) in &proxies {
                if *other != target {
                    self.dropped(&loc.at, format!(
                        "location {other_path} proxies to other backends than location {path}; xlb sends every request of a service to one set of backends, so run them as one app or give them their own address"
                    ));
                }
            }
            s.proxy = Some((target, set, at));
        } else if let Some(p) = proxies.first() {
            self.dropped(&p.3.at, "several locations proxy and none is `location /`; xlb sends every request to one set of backends, so give it a `location /`");
        }
        if s.redirect.is_some() && s.proxy.is_some() {
            self.dropped(&s.redirect.expect("checked").at, "`return` beside proxying locations: only the proxying is carried over");
            s.redirect = None;
        }
        Ok(s)
    }

    fn location(
        &mut self,
        d: &'a Directive,
        outer: &Settings<'a>,
        upstreams: &HashMap<String, Upstream>,
        proxies: &mut Vec<(String, Target, Settings<'a>, &'a Directive)>,
        statuses: &mut usize,
        redirect: &mut Option<&'a Directive>,
    ) -> Result<(), ParseError> {
        arity(d, 1..=2)?;
        if d.block.is_none() {
            return Err(error(d, "directive \"location\" has no opening \"{\""));
        }
        let path = d.args.last().expect("checked").clone();
        let exact = d.args.len() == 2;
        let settings = outer.inherit(d.children())?;
        let mut handled = false;
        let mut status = false;
        for c in d.children() {
            match c.name.as_str() {
                "proxy_pass" => {
                    arity(c, 1..=1)?;
                    handled = true;
                    if let Some(t) = self.target(c, upstreams) {
                        proxies.push((if exact { format!("{} {path}", d.args[0]) } else { path.clone() }, t, settings.clone(), c));
                    }
                }
                "stub_status" => {
                    handled = true;
                    status = true;
                    *statuses += 1;
                    self.note(&c.at, format!(
                        "`stub_status` at location {path}: xlb's admin API serves the same counters at http://127.0.0.1:9100/status (admin.listen, loopback only), not on the site"
                    ));
                    self.status = Some(c.at.clone());
                }
                "location" => self.location(c, &settings, upstreams, proxies, statuses, redirect)?,
                "return" => {
                    handled = true;
                    if path == "/" && !exact && is_https_redirect(c) {
                        // The whole server redirects, as with a `return` beside the locations.
                        *redirect = Some(c);
                    } else {
                        self.dropped(&c.at, format!("`{}` in location {path}: xlb answers no request itself; have the app answer it", c.text()));
                    }
                }
                "allow" | "deny" if status => {}
                "allow" | "deny" => {
                    let next_status = d.children().iter().any(|x| x.name == "stub_status");
                    if !next_status {
                        self.other(c);
                    }
                }
                "root" | "alias" | "try_files" | "fastcgi_pass" | "uwsgi_pass" | "scgi_pass" | "grpc_pass" | "memcached_pass" | "autoindex"
                | "content_by_lua" | "content_by_lua_block" | "content_by_lua_file" => {
                    handled = true;
                    if path.contains("/.well-known/acme-challenge") {
                        self.dropped(&c.at, format!(
                            "`{}`: certbot renews the certificates through this location on port 80, which xlb's redirect service takes over; use the commented tls.acme alternative (xlb answers the challenges itself), or renew with `certbot --standalone --http-01-port` behind another port",
                            c.text()
                        ));
                    } else {
                        self.other(c);
                    }
                }
                n if INHERITED.contains(&n) => {}
                _ => self.other(c),
            }
        }
        if !handled {
            self.dropped(&d.at, format!("location {path} serves files from disk (it has no proxy_pass); xlb serves no files, so serve them from the app"));
        }
        Ok(())
    }
}

/// `return 301 https://$host$request_uri` and its spellings: the redirect xlb's `redirect` mode
/// answers.
fn is_https_redirect(d: &Directive) -> bool {
    matches!(&d.args[..], [code, url] if matches!(code.as_str(), "301" | "302" | "307" | "308") && url.starts_with("https://"))
}

/// Everything mapped from the configuration tree.
pub fn map(tree: &[Directive], opts: &Options) -> Result<Import, ParseError> {
    let mut m = Mapper { opts, diagnostics: Vec::new(), status: None, names: Vec::new() };
    let mut services = Vec::new();
    for d in tree {
        match d.name.as_str() {
            "http" => services.extend(m.http(d)?),
            "stream" => services.extend(m.stream(d)?),
            "events" => {}
            "server" | "upstream" | "location" => {
                return Err(error(d, format!("\"{}\" directive is not allowed here; it goes inside http {{ }} (or stream {{ }})", d.name)));
            }
            _ => m.other(d),
        }
    }
    Ok(Import { interface: opts.interface.clone(), services, status: m.status, diagnostics: m.diagnostics })
}

impl<'a> Mapper<'a> {
    fn upstreams(&mut self, block: &'a Directive) -> Result<HashMap<String, Upstream>, ParseError> {
        let mut ups = HashMap::new();
        for d in block.children().iter().filter(|d| d.name == "upstream") {
            if d.block.is_none() {
                return Err(error(d, "directive \"upstream\" has no opening \"{\""));
            }
            let up = self.upstream(d)?;
            if let Some(old) = ups.insert(up.name.clone(), up) {
                return Err(error(d, format!("duplicate upstream \"{}\" (the first is at {})", old.name, old.at)));
            }
        }
        Ok(ups)
    }

    fn http(&mut self, http: &'a Directive) -> Result<Vec<Imported>, ParseError> {
        let upstreams = self.upstreams(http)?;
        let settings = Settings::default().inherit(http.children())?;
        let mut servers = Vec::new();
        for d in http.children() {
            match d.name.as_str() {
                "server" => servers.push(self.server(d, &settings, &upstreams)?),
                "upstream" => {}
                "location" | "proxy_pass" | "listen" => {
                    return Err(error(d, format!("\"{}\" directive is not allowed here; it goes inside a server {{ }}", d.name)));
                }
                n if INHERITED.contains(&n) => {}
                _ => self.other(d),
            }
        }
        // One service per address: servers on the same address are its SNI names.
        let mut groups: Vec<Group> = Vec::new();
        for (i, s) in servers.iter().enumerate() {
            for l in &s.listens {
                match groups.iter_mut().find(|g| g.0 == l.addr) {
                    Some(g) => {
                        if g.1 != l.ssl {
                            self.dropped(&l.at, format!("{} is listened on with and without ssl; xlb's service is one or the other", l.addr));
                            continue;
                        }
                        g.2.push((i, l));
                    }
                    None => groups.push((l.addr, l.ssl, vec![(i, l)])),
                }
            }
        }
        let mut out = Vec::new();
        for (addr, ssl, members) in groups {
            // The default server first: it answers clients without SNI.
            let mut members = members;
            members.sort_by_key(|(_, l)| !l.default);
            let first = &servers[members[0].0];
            if ssl {
                if let Some(s) = self.https(addr, &members, &servers, &upstreams)? {
                    out.push(s);
                }
            } else if members.iter().all(|(i, _)| servers[*i].redirect.is_some() || servers[*i].status_only) {
                if members.iter().all(|(i, _)| servers[*i].status_only) {
                    continue;
                }
                out.push(self.redirect(addr, &members, &servers));
            } else if let Some((target, _, at)) = &first.proxy {
                let up = self.resolve(target, &upstreams, at);
                for (i, _) in &members[1..] {
                    self.dropped(&servers[*i].d.at, "another server on the same plain-HTTP address; xlb's l4 service does not look at Host, so only the first is carried over");
                }
                self.note(&first.d.at, format!(
                    "plain HTTP proxying on {addr} becomes an l4 service: the kernel forwards the connections, so no X-Forwarded-* headers are added and nothing at the HTTP level (headers, timeouts, body size) applies; serve the site over https for those"
                ));
                let backends = self.backends(addr, &up);
                if backends.is_empty() {
                    self.dropped(&first.d.at, format!("the server on {addr} has no backend xlb can use, so it is left out"));
                    continue;
                }
                let wanted = first.names.first().map(|n| format!("{n}-l4")).unwrap_or_else(|| format!("http-{}", addr.port()));
                let name = self.unique_name(&wanted);
                out.push(Imported {
                    service: l4(name, addr, backends, &up),
                    origin: vec![format!("from server at {} (listen {addr})", first.d.at), format!("backends from upstream {} at {}", up.name, up.at)],
                    acme: None,
                });
            } else if !first.status_only {
                self.dropped(&first.d.at, format!(
                    "the server on {addr} neither proxies nor redirects to https; xlb has nothing to carry it over to"
                ));
            }
        }
        Ok(out)
    }

    /// The backends a proxy target means.
    fn resolve(&mut self, target: &Target, upstreams: &HashMap<String, Upstream>, at: &Directive) -> Upstream {
        match target {
            Target::Upstream(name) => upstreams[name].clone(),
            Target::Addr(addr) => Upstream {
                name: addr.to_string(),
                at: at.at.clone(),
                backends: vec![(*addr, at.at.clone())],
                max_fails: DEFAULT_MAX_FAILS,
                fail_timeout: DEFAULT_FAIL_TIMEOUT,
                slow_start: Duration::ZERO,
            },
        }
    }

    fn redirect(&mut self, addr: SocketAddr, members: &[(usize, &Listen)], servers: &[Server<'a>]) -> Imported {
        let first = &servers[members[0].0];
        for (i, _) in members {
            let Some(r) = servers[*i].redirect else { continue };
            let (code, url) = (&r.args[0], &r.args[1]);
            let host_part = url["https://".len()..].split(['/', '$']).next().unwrap_or("");
            let same_host = url.starts_with("https://$host")
                || url.starts_with("https://$http_host")
                || url.starts_with("https://$server_name")
                || servers[*i].names.iter().any(|n| n == host_part);
            if !same_host {
                self.dropped(&r.at, format!(
                    "`{}`: xlb redirects to https on the host the client asked for; to send clients to another name, have that name's certificate on the https service and link to it",
                    r.text()
                ));
            } else if !url.ends_with("$request_uri") {
                self.dropped(&r.at, format!("`{}`: xlb keeps the path and query in the redirect (as $request_uri)", r.text()));
            }
            if code != "301" {
                self.note(&r.at, format!("`{}`: xlb's redirect answers 301", r.text()));
            }
        }
        let wanted = first.names.first().map(|n| format!("{n}-http")).unwrap_or_else(|| format!("redirect-{}", addr.port()));
        let name = self.unique_name(&wanted);
        Imported {
            service: Service::redirect(name, addr),
            origin: vec![format!("from server at {} (listen {addr}, {})", first.d.at, first.redirect.map(Directive::text).unwrap_or_default())],
            acme: None,
        }
    }

    fn https(
        &mut self,
        addr: SocketAddr,
        members: &[(usize, &Listen)],
        servers: &[Server<'a>],
        upstreams: &HashMap<String, Upstream>,
    ) -> Result<Option<Imported>, ParseError> {
        let proxying: Vec<usize> = members.iter().map(|m| m.0).filter(|i| servers[*i].proxy.is_some()).collect();
        for (i, _) in members {
            let s = &servers[*i];
            if s.proxy.is_none() && !s.status_only {
                self.dropped(&s.d.at, format!("the https server {} on {addr} does not proxy; it is not carried over", s.names.join(" ")));
            }
        }
        let Some(&main) = proxying.first() else { return Ok(None) };
        let first = &servers[main];
        let (target, set, at) = first.proxy.clone().expect("proxying");
        let up = self.resolve(&target, upstreams, at);
        let mut certs: Vec<CertFiles> = Vec::new();
        let mut domains: Vec<String> = Vec::new();
        let mut letsencrypt = true;
        for &i in &proxying {
            let s = &servers[i];
            if s.proxy.as_ref().map(|p| &p.0) != Some(&target) {
                self.dropped(&s.d.at, format!(
                    "server {} shares {addr} with server {} but proxies to other backends; xlb sends every request on one address to one set of backends, so give it its own address",
                    s.names.join(" "), first.names.join(" ")
                ));
                continue;
            }
            let (cert, key) = (s.settings.all("ssl_certificate"), s.settings.all("ssl_certificate_key"));
            let (Some(c), Some(k)) = (cert.first(), key.first()) else {
                return Err(error(s.d, format!("no \"ssl_certificate\" is defined for the listen ... ssl directive of server {}", s.names.join(" "))));
            };
            arity(c, 1..=1)?;
            arity(k, 1..=1)?;
            if cert.len() > 1 {
                self.note(&cert[1].at, "a second certificate for the same names (nginx serves RSA and ECDSA side by side); xlb serves one per name, the first");
            }
            if c.args[0].contains('$') || k.args[0].contains('$') {
                self.dropped(&c.at, format!("`{}`: certificates chosen by variable; list each certificate's files", c.text()));
                continue;
            }
            let files = CertFiles { cert: self.opts.base.join(&c.args[0]), key: self.opts.base.join(&k.args[0]) };
            letsencrypt &= files.cert.starts_with(LETSENCRYPT_LIVE);
            if !certs.contains(&files) {
                certs.push(files);
            }
            for n in &s.names {
                let n = n.to_ascii_lowercase();
                if !domains.contains(&n) {
                    domains.push(n);
                }
            }
        }
        if certs.is_empty() {
            return Ok(None);
        }
        if proxying.len() > 1 {
            self.note(&first.d.at, format!(
                "{} servers on {addr} become one service whose certificates the client's SNI picks among; the first is for clients without SNI",
                proxying.len()
            ));
        }
        let listen = members.iter().find(|m| m.0 == main).map(|m| m.1).expect("member");
        if !listen.http2 && !set.all("http2").iter().any(|d| d.args.first().map(String::as_str) == Some("on")) {
            self.note(&listen.at, "xlb offers HTTP/2 besides HTTP/1.1 (by ALPN) on every https service");
        }
        let http = self.headers(&set, &at.at);
        self.proxy_headers(&set, &at.at);
        let timeouts = self.timeouts(&set);
        let limits = self.limits(&set)?;
        self.tls_versions(&set);
        let backends = self.backends(addr, &up);
        if backends.is_empty() {
            self.dropped(&first.d.at, format!("the https server on {addr} has no backend xlb can use, so it is left out"));
            return Ok(None);
        }
        let wanted = first.names.first().cloned().unwrap_or_else(|| format!("https-{}", addr.port()));
        let name = self.unique_name(&wanted);
        let acme_domains: Vec<String> = domains.iter().filter(|d| d.contains('.') && !d.contains(['*', '~'])).cloned().collect();
        let acme = (letsencrypt && !acme_domains.is_empty()).then(|| Acme {
            directory: LETSENCRYPT_DIRECTORY.into(),
            contact: Vec::new(),
            domains: acme_domains,
            ca: None,
            challenge: ChallengeKind::Http01,
            renew_before: DEFAULT_RENEW_BEFORE,
        });
        let health = Health { check: CheckKind::Tcp, ..Health::default() };
        self.note(&up.at, format!(
            "upstream {}: nginx only notices failed backends from the requests it sends; xlb also probes each one every second (check = \"tcp\" here; with a health endpoint, set check = \"http\" and its path)",
            up.name
        ));
        let mut origin = vec![format!("from server at {} (listen {addr} ssl, server_name {})", first.d.at, first.names.join(" "))];
        origin.push(format!("backends from upstream {} at {}", up.name, up.at));
        Ok(Some(Imported {
            service: Service {
                name,
                listen: addr,
                mode: ServiceMode::Https,
                backends,
                health,
                max_fails: up.max_fails,
                fail_timeout: up.fail_timeout,
                slow_start: up.slow_start,
                https: Some(Https { tls: Tls::Files(certs), http, timeouts, limits, max_fails: up.max_fails, fail_timeout: up.fail_timeout }),
            },
            origin,
            acme,
        }))
    }

    /// `add_header`: the security headers and `X-Backend-Server $upstream_addr`; a header nginx
    /// does not add is left out (`""`), so that the responses stay as they were.
    fn headers(&mut self, set: &Settings<'a>, at: &Origin) -> HttpHeaders {
        let mut h = HttpHeaders { backend_header: false, hsts: None, frame_options: None, content_type_options: None, referrer_policy: None };
        for d in set.all("add_header") {
            let (Some(name), Some(value)) = (d.args.first(), d.args.get(1)) else {
                self.dropped(&d.at, format!("`{}`: invalid number of arguments", d.text()));
                continue;
            };
            let always = d.args.get(2).map(String::as_str) == Some("always");
            let lower = name.to_ascii_lowercase();
            if lower == "x-backend-server" {
                if value == "$upstream_addr" {
                    h.backend_header = true;
                } else {
                    self.dropped(&d.at, format!("`{}`: xlb's X-Backend-Server is always the backend's address ($upstream_addr)", d.text()));
                }
                continue;
            }
            let slot = match lower.as_str() {
                "strict-transport-security" => &mut h.hsts,
                "x-frame-options" => &mut h.frame_options,
                "x-content-type-options" => &mut h.content_type_options,
                "referrer-policy" => &mut h.referrer_policy,
                _ => {
                    self.dropped(&d.at, format!(
                        "`{}`: xlb adds only Strict-Transport-Security, X-Frame-Options, X-Content-Type-Options, Referrer-Policy and X-Backend-Server; have the app send {name}",
                        d.text()
                    ));
                    continue;
                }
            };
            if value.contains('$') || !value.is_ascii() || hyper::header::HeaderValue::from_str(value).is_err() || value.is_empty() {
                self.dropped(&d.at, format!("`{}`: xlb adds fixed printable values only", d.text()));
                continue;
            }
            *slot = Some(value.clone());
            if !always {
                self.note(&d.at, format!("`{}`: nginx adds it to 2xx and 3xx responses only (no `always`); xlb adds it to every response that lacks it", d.text()));
            }
        }
        if !h.backend_header && h == (HttpHeaders { backend_header: false, hsts: None, frame_options: None, content_type_options: None, referrer_policy: None }) {
            self.note(at, "nginx adds none of xlb's security headers here, so the import turns them off (\"\"); xlb's defaults are shown in the config reference");
        }
        h
    }

    /// `proxy_set_header`: xlb sends Host, X-Real-IP and X-Forwarded-For/-Proto/-Host itself.
    fn proxy_headers(&mut self, set: &Settings<'a>, at: &Origin) {
        for d in set.all("proxy_set_header") {
            let (Some(name), Some(value)) = (d.args.first(), d.args.get(1)) else { continue };
            let expected: &[&str] = match name.to_ascii_lowercase().as_str() {
                "host" => &["$host", "$http_host"],
                "x-real-ip" => &["$remote_addr"],
                "x-forwarded-for" => &["$proxy_add_x_forwarded_for", "$remote_addr"],
                "x-forwarded-proto" => &["$scheme", "https"],
                "x-forwarded-host" => &["$host", "$http_host"],
                "connection" | "upgrade" => {
                    // Keep-alive to the backends (`""`) and WebSocket upgrades ($http_upgrade)
                    // are what xlb does by itself.
                    continue;
                }
                _ => &[],
            };
            if !expected.contains(&value.as_str()) {
                self.dropped(&d.at, format!(
                    "`{}`: xlb sends Host, X-Real-IP and X-Forwarded-For/-Proto/-Host with their usual values and no other request headers; have the app derive {name} from those",
                    d.text()
                ));
            }
        }
        if !set.all("proxy_set_header").iter().any(|d| d.args[0].eq_ignore_ascii_case("x-forwarded-for")) {
            self.note(at, "xlb sends X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host and X-Real-IP to the backends even where nginx did not set them");
        }
    }

    fn timeout(&mut self, set: &Settings<'a>, name: &str) -> Option<Duration> {
        let d = set.last(name)?;
        match d.args.first().and_then(|a| nginx_time(a)) {
            Some(t) if !t.is_zero() && t <= Duration::from_secs(24 * 3600) => Some(t),
            _ => {
                self.dropped(&d.at, format!("`{}`: xlb's timeouts are more than 0 and at most 24h; its default is used", d.text()));
                None
            }
        }
    }

    fn timeouts(&mut self, set: &Settings<'a>) -> Timeouts {
        let mut t = Timeouts::default();
        if let Some(v) = self.timeout(set, "proxy_connect_timeout") {
            t.backend_connect = v;
        }
        if let Some(v) = self.timeout(set, "proxy_read_timeout") {
            t.backend_response = v;
            let d = set.last("proxy_read_timeout").expect("read");
            self.note(&d.at, format!(
                "`{}` becomes timeouts.backend_response: xlb bounds the wait for the response head; nginx bounds each wait between two reads",
                d.text()
            ));
        }
        if let Some(d) = set.last("proxy_send_timeout") {
            self.note(&d.at, format!("`{}`: xlb bounds sending a request and its response head together, by timeouts.backend_response", d.text()));
        }
        if let Some(v) = self.timeout(set, "client_header_timeout") {
            t.request_header = v;
        }
        if let Some(d) = set.last("keepalive_timeout") {
            if d.args.first().map(String::as_str) == Some("0") {
                self.dropped(&d.at, format!("`{}`: xlb keeps client connections alive; it cannot turn that off", d.text()));
            } else if let Some(v) = self.timeout(set, "keepalive_timeout") {
                t.idle = v;
            }
        }
        t
    }

    fn limits(&mut self, set: &Settings<'a>) -> Result<Limits, ParseError> {
        let max_body_bytes = match set.last("client_max_body_size") {
            None => Some(NGINX_DEFAULT_BODY),
            Some(d) => {
                arity(d, 1..=1)?;
                match nginx_size(&d.args[0]) {
                    Some(0) => None,
                    Some(n) if n <= i64::MAX as u64 => Some(n),
                    _ => return Err(error(d, format!("\"{}\" directive invalid value", d.name))),
                }
            }
        };
        Ok(Limits { max_body_bytes, ..Limits::default() })
    }

    fn tls_versions(&mut self, set: &Settings<'a>) {
        if let Some(d) = set.last("ssl_protocols") {
            let old: Vec<&String> = d.args.iter().filter(|p| !matches!(p.as_str(), "TLSv1.2" | "TLSv1.3")).collect();
            let has = |v: &str| d.args.iter().any(|p| p == v);
            if !old.is_empty() {
                self.note(&d.at, format!(
                    "`{}`: narrowed to TLSv1.2 TLSv1.3, the versions xlb serves",
                    d.text()
                ));
            }
            if !has("TLSv1.2") || !has("TLSv1.3") {
                self.dropped(&d.at, format!("`{}`: xlb always serves both TLS 1.2 and TLS 1.3; it cannot leave one out", d.text()));
            }
        }
        if let Some(d) = set.last("ssl_ciphers") {
            self.note(&d.at, format!(
                "`{}`: narrowed to xlb's own suites: TLS 1.3's, and for TLS 1.2 ECDHE with AES-GCM or ChaCha20-Poly1305",
                d.text()
            ));
        }
    }

    /// `stream { }`: each server that proxies to an upstream becomes an `l4` service.
    fn stream(&mut self, stream: &'a Directive) -> Result<Vec<Imported>, ParseError> {
        let upstreams = self.upstreams(stream)?;
        let mut out = Vec::new();
        for d in stream.children() {
            match d.name.as_str() {
                "upstream" => {}
                "server" => {
                    let mut listens = Vec::new();
                    let mut target = None;
                    for c in d.children() {
                        match c.name.as_str() {
                            "listen" => {
                                if let Some(l) = self.listen(c)? {
                                    if l.ssl {
                                        self.dropped(&c.at, format!("`{}`: TLS termination of a TCP stream; xlb's l4 services forward the connection as it is (the backend terminates TLS)", c.text()));
                                    }
                                    listens.push(l);
                                }
                            }
                            "proxy_pass" => {
                                arity(c, 1..=1)?;
                                let arg = &c.args[0];
                                if upstreams.contains_key(arg) {
                                    target = Some((Target::Upstream(arg.clone()), c));
                                } else {
                                    match backend_addr(arg) {
                                        Ok((a, _)) => target = Some((Target::Addr(a), c)),
                                        Err(why) => self.dropped(&c.at, format!("`{}`: {why}", c.text())),
                                    }
                                }
                            }
                            "proxy_timeout" | "proxy_connect_timeout" => self.note(&c.at, format!(
                                "`{}`: xlb's l4 path forwards packets and keeps no timeouts of its own; connections last as long as client and backend keep them",
                                c.text()
                            )),
                            _ => self.other(c),
                        }
                    }
                    let Some((target, at)) = target else {
                        self.dropped(&d.at, "stream server without proxy_pass: nothing to carry over");
                        continue;
                    };
                    let up = self.resolve(&target, &upstreams, at);
                    for l in listens {
                        let backends = self.backends(l.addr, &up);
                        if backends.is_empty() {
                            self.dropped(&l.at, format!("the stream server on {} has no backend xlb can use, so it is left out", l.addr));
                            continue;
                        }
                        let name = self.unique_name(&format!("{}-{}", up.name, l.addr.port()));
                        let health = Health { check: CheckKind::Tcp, ..Health::default() };
                        let mut service = l4(name, l.addr, backends, &up);
                        service.health = health;
                        out.push(Imported {
                            service,
                            origin: vec![format!("from stream server at {} (listen {})", d.at, l.addr), format!("backends from upstream {} at {}", up.name, up.at)],
                            acme: None,
                        });
                    }
                }
                _ => self.other(d),
            }
        }
        Ok(out)
    }
}

fn l4(name: String, listen: SocketAddr, backends: Vec<SocketAddr>, up: &Upstream) -> Service {
    Service {
        name,
        listen,
        mode: ServiceMode::L4,
        backends,
        health: Health { check: CheckKind::Tcp, ..Health::default() },
        max_fails: up.max_fails,
        fail_timeout: up.fail_timeout,
        slow_start: up.slow_start,
        https: None,
    }
}

/// Certificate paths as nginx reads them: relative ones from its prefix conf directory.
pub fn base_of(main: &Path) -> PathBuf {
    main.parent().map(Path::to_owned).unwrap_or_else(|| PathBuf::from("/"))
}

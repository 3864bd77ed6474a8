//! `[[service]]`: the address, mode, backends and health checks of each service, and the rules
//! across services (unique names and addresses, a redirect service for HTTP-01).
use std::{collections::HashMap, net::SocketAddr, time::Duration};

use lb_common::service::{MAX_BACKENDS_PER_SERVICE, MAX_SERVICES};
use serde::{Deserialize, Deserializer, de::IgnoredAny};
use serde_spanned::Spanned;

use super::{
    ChallengeKind, ConfigError, HttpHeaders, Https, Limits, Source, Timeouts, Tls,
    https::{TlsFile, parse_tls},
    parse_duration, parse_socket_addr, service_error, service_error_at,
};

pub(super) const MAX_NAME_LEN: usize = 64;

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

impl Service {
    /// A `redirect` service: no backends, and the defaults for what it does not use.
    pub fn redirect(name: String, listen: SocketAddr) -> Service {
        Service {
            name,
            listen,
            mode: ServiceMode::Redirect,
            backends: Vec::new(),
            health: Health::default(),
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
            slow_start: Duration::ZERO,
            https: None,
        }
    }
}

pub const DEFAULT_MAX_FAILS: u32 = 1;
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `fail_timeout` and `slow_start` (the data path's arithmetic is sized for it).
pub const MAX_PASSIVE_DURATION: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceMode {
    /// Connections balanced by the XDP data path.
    #[default]
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

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Health {
    pub check: CheckKind,
    /// Request path of HTTP checks; validated to be a valid origin-form request target.
    #[serde(deserialize_with = "health_path")]
    pub path: String,
    #[serde(deserialize_with = "health_interval")]
    pub interval: Duration,
    #[serde(deserialize_with = "health_timeout")]
    pub timeout: Duration,
    #[serde(deserialize_with = "rise")]
    pub rise: u32,
    #[serde(deserialize_with = "fall")]
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

impl<'de> Deserialize<'de> for CheckKind {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<CheckKind, D::Error> {
        match String::deserialize(de)?.as_str() {
            "http" => Ok(CheckKind::Http),
            "tcp" => Ok(CheckKind::Tcp),
            other => Err(service_error(format!(
                "health.check \"{other}\": not a check; use \"http\" (GET health.path answers 2xx or 3xx) \
                 or \"tcp\" (a connection is accepted)"
            ))),
        }
    }
}

fn health_path<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    let p = String::deserialize(de)?;
    let printable = p.bytes().all(|b| b.is_ascii_graphic());
    if !p.starts_with('/') || !printable || p.parse::<hyper::Uri>().is_err() {
        return Err(service_error(format!(
            "health.path \"{}\": not a request path; it must start with '/' and contain no spaces, \
             control or non-ASCII characters (percent-encode them), e.g. \"/health\"",
            p.escape_debug()
        )));
    }
    Ok(p)
}

fn health_interval<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    let d = parse_duration(&text, "health.interval").map_err(service_error)?;
    if d < Duration::from_millis(100) {
        return Err(service_error(format!("health.interval \"{text}\": too short; use at least \"100ms\"")));
    }
    Ok(d)
}

fn health_timeout<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    let d = parse_duration(&text, "health.timeout").map_err(service_error)?;
    if d.is_zero() {
        return Err(service_error("health.timeout is zero; use e.g. \"500ms\""));
    }
    Ok(d)
}

fn probes<'de, D: Deserializer<'de>>(de: D, key: &str) -> Result<u32, D::Error> {
    let v = i64::deserialize(de)?;
    match u32::try_from(v) {
        Ok(n @ 1..=100) => Ok(n),
        _ => Err(service_error(format!("health.{key} = {v}: out of range; use 1..=100 consecutive probes"))),
    }
}

fn rise<'de, D: Deserializer<'de>>(de: D) -> Result<u32, D::Error> {
    probes(de, "rise")
}

fn fall<'de, D: Deserializer<'de>>(de: D) -> Result<u32, D::Error> {
    probes(de, "fall")
}

impl Health {
    /// A probe must end before the next starts. `table` is where `[service.health]` sits.
    fn check_timing(&self, src: &Source, table: Option<&Spanned<Health>>, what: &str) -> Result<(), ConfigError> {
        if self.timeout < self.interval {
            return Ok(());
        }
        Err(src.error(
            table.and_then(|t| timing_line(src, t.span().start)),
            format!(
                "{what} health.timeout ({}) must be shorter than health.interval ({}) so that a \
                 probe ends before the next starts; lower the timeout or raise the interval",
                humantime::format_duration(self.timeout),
                humantime::format_duration(self.interval)
            ),
        ))
    }
}

/// The line of the `timeout` (else the `interval`) of the health table at `table`: the key to
/// change. Read again from the text, as the error is the only use of it.
fn timing_line(src: &Source, table: usize) -> Option<usize> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        service: Vec<Service>,
    }
    #[derive(Deserialize)]
    struct Service {
        health: Option<Spanned<Timing>>,
    }
    #[derive(Deserialize)]
    struct Timing {
        timeout: Option<Spanned<IgnoredAny>>,
        interval: Option<Spanned<IgnoredAny>>,
    }
    let file: File = toml::from_str(src.text).ok()?;
    let health = file.service.into_iter().filter_map(|s| s.health).find(|h| h.span().start == table)?;
    let Timing { timeout, interval } = health.into_inner();
    timeout.or(interval).map(|v| src.line(v.span().start))
}

/// A `[[service]]` as written: the https tables sit flat in it and are allowed by mode, the
/// positions of name, listen and backends go into cross-key errors.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceFile {
    pub(super) name: Spanned<String>,
    #[serde(deserialize_with = "listen")]
    pub(super) listen: Spanned<SocketAddr>,
    #[serde(default)]
    pub(super) mode: ServiceMode,
    #[serde(default, deserialize_with = "backends")]
    pub(super) backends: Option<Backends>,
    pub(super) health: Option<Spanned<Health>>,
    pub(super) tls: Option<Spanned<TlsFile>>,
    pub(super) http: Option<Spanned<HttpHeaders>>,
    pub(super) timeouts: Option<Spanned<Timeouts>>,
    pub(super) limits: Option<Spanned<Limits>>,
    #[serde(default = "default_max_fails", deserialize_with = "max_fails")]
    pub(super) max_fails: u32,
    #[serde(default = "default_fail_timeout", deserialize_with = "fail_timeout")]
    pub(super) fail_timeout: Duration,
    #[serde(default, deserialize_with = "slow_start")]
    pub(super) slow_start: Duration,
}

/// The backends as written: the list and each address with where it sits.
pub(super) type Backends = Spanned<Vec<Spanned<SocketAddr>>>;

fn listen<'de, D: Deserializer<'de>>(de: D) -> Result<Spanned<SocketAddr>, D::Error> {
    let text = Spanned::<String>::deserialize(de)?;
    let addr = parse_socket_addr(text.get_ref(), "listen", "203.0.113.10:80").map_err(service_error)?;
    Ok(Spanned::new(text.span(), addr))
}

/// Each address is checked where it is written, so the error names its line; the checks against
/// the listen address come after deserialization.
fn backends<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Backends>, D::Error> {
    let list = Spanned::<Vec<Spanned<String>>>::deserialize(de)?;
    let span = list.span();
    let addrs = list
        .into_inner()
        .into_iter()
        .map(|text| match parse_socket_addr(text.get_ref(), "backend", "203.0.113.10:8001") {
            Ok(addr) => Ok(Spanned::new(text.span(), addr)),
            Err(message) => Err(service_error_at(&text, message)),
        })
        .collect::<Result<_, _>>()?;
    Ok(Some(Spanned::new(span, addrs)))
}

impl<'de> Deserialize<'de> for ServiceMode {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<ServiceMode, D::Error> {
        match String::deserialize(de)?.as_str() {
            "l4" => Ok(ServiceMode::L4),
            "https" => Ok(ServiceMode::Https),
            "redirect" => Ok(ServiceMode::Redirect),
            m => Err(service_error(format!(
                "mode \"{m}\": not a mode; use \"l4\" (balanced by the data path), \"https\" (TLS \
                 terminated and proxied) or \"redirect\" (HTTP to HTTPS)"
            ))),
        }
    }
}

fn default_max_fails() -> u32 {
    DEFAULT_MAX_FAILS
}

fn max_fails<'de, D: Deserializer<'de>>(de: D) -> Result<u32, D::Error> {
    let v = i64::deserialize(de)?;
    match u32::try_from(v) {
        Ok(n @ 0..=1000) => Ok(n),
        _ => Err(service_error(format!(
            "max_fails = {v}: out of range; use 0 (passive health checks off) to 1000 failed connections"
        ))),
    }
}

fn default_fail_timeout() -> Duration {
    DEFAULT_FAIL_TIMEOUT
}

fn fail_timeout<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    passive_duration(de, "fail_timeout", false)
}

fn slow_start<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    passive_duration(de, "slow_start", true)
}

fn passive_duration<'de, D: Deserializer<'de>>(de: D, key: &str, zero_ok: bool) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    let d = parse_duration(&text, key).map_err(service_error)?;
    if d.is_zero() && !zero_ok {
        return Err(service_error(format!(
            "{key} is zero; use e.g. \"10s\" (or max_fails = 0 to turn passive health checks off)"
        )));
    }
    if d > MAX_PASSIVE_DURATION {
        return Err(service_error(format!("{key} \"{text}\": too long; use at most \"1h\"")));
    }
    Ok(d)
}

pub(super) fn parse_services(
    src: &Source,
    raw: Vec<Spanned<ServiceFile>>,
) -> Result<Vec<Service>, ConfigError> {
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
        let service = parse_service(src, raw, &what)?;
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
    Ok(services)
}

fn parse_service(
    src: &Source,
    raw: ServiceFile,
    what: &str,
) -> Result<Service, ConfigError> {
    let listen = *raw.listen.get_ref();
    let mode = raw.mode;
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
        return Ok(Service::redirect(raw.name.into_inner(), listen));
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
    for value in raw_backends.get_ref() {
        let addr = *value.get_ref();
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
            backends.push(addr);
            continue;
        };
        return Err(src.at(value, format!("{what} backend \"{addr}\": {problem}")));
    }
    let health = raw.health.as_ref().map(Spanned::get_ref).cloned().unwrap_or_default();
    health.check_timing(src, raw.health.as_ref(), what)?;
    let (max_fails, fail_timeout, slow_start) = (raw.max_fails, raw.fail_timeout, raw.slow_start);
    let https = match mode {
        ServiceMode::Https => Some(parse_https(src, &raw, what, max_fails, fail_timeout)?),
        _ => None,
    };
    let name = raw.name.into_inner();
    Ok(Service {
        name,
        listen,
        mode,
        backends,
        health,
        max_fails,
        fail_timeout,
        slow_start,
        https,
    })
}

/// `max_fails` and `fail_timeout` are the service's (they apply to both the data path's and the
/// proxy's failures).
pub(super) fn parse_https(
    src: &Source,
    raw: &ServiceFile,
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
    fn table<T: Clone + Default>(t: &Option<Spanned<T>>) -> T {
        t.as_ref().map(Spanned::get_ref).cloned().unwrap_or_default()
    }
    let (http, timeouts, limits) = (table(&raw.http), table(&raw.timeouts), table(&raw.limits));
    Ok(Https { tls, http, timeouts, limits, max_fails, fail_timeout })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::*;

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
}

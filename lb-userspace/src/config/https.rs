//! The `https` service tables: `[service.tls]` (certificate files or ACME), `[service.http]`,
//! `[service.timeouts]` and `[service.limits]`.
use std::{
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};
use serde_spanned::Spanned;

use super::{
    ChallengeKind, ConfigError, DEFAULT_RENEW_BEFORE, Source, acme::RENEW_BEFORE_RANGE, parse_duration,
    service_error, service_error_at,
};

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

/// Deserialized as an element of `tls.certs`; the single pair is `tls.cert` and `tls.key`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    /// PEM chain, leaf first.
    #[serde(deserialize_with = "certs_cert")]
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(deserialize_with = "certs_key")]
    pub key: PathBuf,
}

/// `tls.acme`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acme {
    /// The ACME directory URL.
    #[serde(deserialize_with = "acme_directory")]
    pub directory: String,
    /// Account contacts, e.g. `mailto:ops@example.com`.
    #[serde(default, deserialize_with = "acme_contact")]
    pub contact: Vec<String>,
    #[serde(deserialize_with = "acme_domains")]
    pub domains: Vec<String>,
    /// An extra trusted root (PEM) for a private ACME server such as Pebble.
    #[serde(default, deserialize_with = "acme_ca")]
    pub ca: Option<PathBuf>,
    /// HTTP-01 (through a `redirect` service on port 80) or TLS-ALPN-01 (on this listener).
    #[serde(default = "default_challenge")]
    pub challenge: ChallengeKind,
    /// Renew when the certificate has less than this left.
    #[serde(default = "default_renew_before", deserialize_with = "acme_renew_before")]
    pub renew_before: Duration,
}

/// A certificate or key file (`tls.<key>`): an absolute path.
fn tls_path<'de, D: Deserializer<'de>>(de: D, key: &str) -> Result<PathBuf, D::Error> {
    absolute(&String::deserialize(de)?, key).map_err(service_error)
}

fn absolute(text: &str, key: &str) -> Result<PathBuf, String> {
    let p = Path::new(text);
    if !p.is_absolute() {
        return Err(format!("tls.{key} \"{text}\": not an absolute path; write the full path, e.g. \"/etc/xlb/site.crt\""));
    }
    Ok(p.to_owned())
}

fn certs_cert<'de, D: Deserializer<'de>>(de: D) -> Result<PathBuf, D::Error> {
    tls_path(de, "certs.cert")
}

fn certs_key<'de, D: Deserializer<'de>>(de: D) -> Result<PathBuf, D::Error> {
    tls_path(de, "certs.key")
}

fn acme_directory<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    let dir = String::deserialize(de)?;
    if !dir.starts_with("https://") || dir.parse::<hyper::Uri>().is_err() {
        return Err(service_error(format!(
            "tls.acme.directory \"{dir}\": not an https:// URL; use e.g. \
             \"https://acme-v02.api.letsencrypt.org/directory\""
        )));
    }
    Ok(dir)
}

/// One contact or a list of them.
fn acme_contact<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StringOrList {
        One(String),
        Many(Vec<String>),
    }
    let contact = match StringOrList::deserialize(de)? {
        StringOrList::One(c) => vec![c],
        StringOrList::Many(c) => c,
    };
    if let Some(bad) = contact.iter().find(|c| !c.starts_with("mailto:") || c.len() < 10) {
        return Err(service_error(format!(
            "tls.acme.contact \"{bad}\": not a mailto: URL; write e.g. \"mailto:ops@example.com\""
        )));
    }
    Ok(contact)
}

/// Lowercased; each name is checked where it is written.
fn acme_domains<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    let list = Vec::<Spanned<String>>::deserialize(de)?;
    if list.is_empty() {
        return Err(service_error("tls.acme.domains is empty; list the names the certificate is for"));
    }
    let mut domains = Vec::new();
    for d in &list {
        let name = d.get_ref().to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if name.len() > 253 || !name.contains('.') || !name.split('.').all(label_ok) {
            return Err(service_error_at(
                d,
                format!(
                    "tls.acme.domains: \"{}\" is not a DNS name; write e.g. \"example.com\" \
                     (no scheme, port or wildcard: HTTP-01 and TLS-ALPN-01 cannot validate wildcards)",
                    d.get_ref()
                ),
            ));
        }
        if domains.contains(&name) {
            return Err(service_error_at(d, format!("tls.acme.domains: \"{name}\" is listed twice; remove one")));
        }
        domains.push(name);
    }
    Ok(domains)
}

fn acme_ca<'de, D: Deserializer<'de>>(de: D) -> Result<Option<PathBuf>, D::Error> {
    tls_path(de, "acme.ca").map(Some)
}

fn default_challenge() -> ChallengeKind {
    ChallengeKind::Http01
}

impl<'de> Deserialize<'de> for ChallengeKind {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<ChallengeKind, D::Error> {
        match String::deserialize(de)?.as_str() {
            "http-01" => Ok(ChallengeKind::Http01),
            "tls-alpn-01" => Ok(ChallengeKind::TlsAlpn01),
            other => Err(service_error(format!(
                "tls.acme.challenge \"{other}\": use \"http-01\" (answered by a redirect service on port 80) \
                 or \"tls-alpn-01\" (answered by this service on port 443)"
            ))),
        }
    }
}

fn default_renew_before() -> Duration {
    DEFAULT_RENEW_BEFORE
}

fn acme_renew_before<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    let d = parse_duration(&text, "tls.acme.renew_before").map_err(service_error)?;
    if !RENEW_BEFORE_RANGE.contains(&d) {
        return Err(service_error(format!(
            "tls.acme.renew_before \"{text}\": out of range; use 1h..=365d (e.g. \"30d\", renewing a \
             90-day certificate after 60 days)"
        )));
    }
    Ok(d)
}

/// Response headers an `https` service adds (`None`: not added). Set by `[service.http]`; an
/// empty string there turns a header off.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpHeaders {
    /// `X-Backend-Server: <address>`.
    pub backend_header: bool,
    #[serde(deserialize_with = "hsts")]
    pub hsts: Option<String>,
    #[serde(deserialize_with = "frame_options")]
    pub frame_options: Option<String>,
    #[serde(deserialize_with = "content_type_options")]
    pub content_type_options: Option<String>,
    #[serde(deserialize_with = "referrer_policy")]
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

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// From accept to a finished TLS handshake.
    #[serde(deserialize_with = "handshake")]
    pub handshake: Duration,
    /// From the first byte of a request head (or the end of the previous request on a
    /// keep-alive connection) to its last.
    #[serde(deserialize_with = "request_header")]
    pub request_header: Duration,
    /// A connection with no request in flight and no bytes moving is closed after this.
    #[serde(deserialize_with = "idle")]
    pub idle: Duration,
    /// Connecting to a backend.
    #[serde(deserialize_with = "backend_connect")]
    pub backend_connect: Duration,
    /// From sending a request to a backend to its response head.
    #[serde(deserialize_with = "backend_response")]
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

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Bytes of one request head (request line and headers); more is answered 431.
    #[serde(deserialize_with = "max_header_bytes")]
    pub max_header_bytes: usize,
    /// Headers in one request; more is answered 431.
    #[serde(deserialize_with = "max_headers")]
    pub max_headers: usize,
    /// Bytes of one request body; more is answered 413. `None`: unlimited.
    #[serde(deserialize_with = "max_body_bytes")]
    pub max_body_bytes: Option<u64>,
    /// Request bodies of at most this many bytes are read whole before the request is sent,
    /// so that an idempotent request whose backend fails before answering can go to another
    /// backend (nginx's `proxy_request_buffering`); larger ones are streamed and never sent
    /// twice. 0: every body is streamed.
    #[serde(deserialize_with = "request_buffer_bytes")]
    pub request_buffer_bytes: usize,
    /// Client connections open at once; more wait in the listen backlog.
    #[serde(deserialize_with = "max_connections")]
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection.
    #[serde(deserialize_with = "h2_max_streams")]
    pub h2_max_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_body_bytes: None,
            request_buffer_bytes: 64 * 1024,
            max_connections: 10_000,
            h2_max_streams: 128,
        }
    }
}

/// A header value, or `None` for "" (the header left out).
fn header<'de, D: Deserializer<'de>>(de: D, key: &str) -> Result<Option<String>, D::Error> {
    let v = String::deserialize(de)?;
    if v.is_empty() {
        Ok(None)
    } else if hyper::header::HeaderValue::from_str(&v).is_err() || !v.is_ascii() {
        Err(service_error(format!(
            "http.{key} \"{}\": not a valid header value; use printable ASCII only (\"\" leaves the header out)",
            v.escape_debug()
        )))
    } else {
        Ok(Some(v))
    }
}

fn timeout<'de, D: Deserializer<'de>>(de: D, key: &str) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    let key = format!("timeouts.{key}");
    let d = parse_duration(&text, &key).map_err(service_error)?;
    if d.is_zero() || d > Duration::from_secs(24 * 3600) {
        return Err(service_error(format!("{key} \"{text}\": out of range; use more than 0 and at most 24h")));
    }
    Ok(d)
}

fn limit<'de, D: Deserializer<'de>>(de: D, key: &str, range: RangeInclusive<i64>, unit: &str) -> Result<i64, D::Error> {
    let v = i64::deserialize(de)?;
    if !range.contains(&v) {
        return Err(service_error(format!(
            "limits.{key} = {v}: out of range; use {}..={} {unit}",
            range.start(),
            range.end()
        )));
    }
    Ok(v)
}

fn hsts<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    header(de, "hsts")
}
fn frame_options<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    header(de, "frame_options")
}
fn content_type_options<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    header(de, "content_type_options")
}
fn referrer_policy<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    header(de, "referrer_policy")
}
fn handshake<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    timeout(de, "handshake")
}
fn request_header<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    timeout(de, "request_header")
}
fn idle<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    timeout(de, "idle")
}
fn backend_connect<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    timeout(de, "backend_connect")
}
fn backend_response<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    timeout(de, "backend_response")
}
fn max_header_bytes<'de, D: Deserializer<'de>>(de: D) -> Result<usize, D::Error> {
    // hyper's smallest read buffer is 8 KiB.
    Ok(limit(de, "max_header_bytes", 8192..=1 << 20, "bytes")? as usize)
}
fn max_headers<'de, D: Deserializer<'de>>(de: D) -> Result<usize, D::Error> {
    Ok(limit(de, "max_headers", 1..=1000, "headers")? as usize)
}
fn max_body_bytes<'de, D: Deserializer<'de>>(de: D) -> Result<Option<u64>, D::Error> {
    Ok(Some(limit(de, "max_body_bytes", 0..=i64::MAX, "bytes")? as u64))
}
fn request_buffer_bytes<'de, D: Deserializer<'de>>(de: D) -> Result<usize, D::Error> {
    Ok(limit(de, "request_buffer_bytes", 0..=16 << 20, "bytes")? as usize)
}
fn max_connections<'de, D: Deserializer<'de>>(de: D) -> Result<usize, D::Error> {
    Ok(limit(de, "max_connections", 1..=1_000_000, "connections")? as usize)
}
fn h2_max_streams<'de, D: Deserializer<'de>>(de: D) -> Result<u32, D::Error> {
    Ok(limit(de, "h2_max_streams", 1..=10_000, "streams")? as u32)
}

/// `[service.tls]` as written: one of three forms, which become one `Tls`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TlsFile {
    #[serde(default, deserialize_with = "single_cert")]
    cert: Option<Spanned<PathBuf>>,
    #[serde(default, deserialize_with = "single_key")]
    key: Option<Spanned<PathBuf>>,
    certs: Option<Spanned<Vec<CertFiles>>>,
    acme: Option<Acme>,
}

fn single_cert<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Spanned<PathBuf>>, D::Error> {
    single(de, "cert")
}

fn single_key<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Spanned<PathBuf>>, D::Error> {
    single(de, "key")
}

/// `tls.cert` or `tls.key`, with where it is written: the other may be missing.
fn single<'de, D: Deserializer<'de>>(de: D, key: &str) -> Result<Option<Spanned<PathBuf>>, D::Error> {
    let text = Spanned::<String>::deserialize(de)?;
    let path = absolute(text.get_ref(), key).map_err(service_error)?;
    Ok(Some(Spanned::new(text.span(), path)))
}

pub(super) fn parse_tls(src: &Source, raw: &Spanned<TlsFile>, what: &str) -> Result<Tls, ConfigError> {
    let t = raw.get_ref();
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
        return Ok(Tls::Acme(acme.clone()));
    }
    if let Some(certs) = &t.certs {
        if certs.get_ref().is_empty() {
            return Err(src.at(certs, format!("{what} tls.certs is empty; list at least one {{ cert, key }}")));
        }
        return Ok(Tls::Files(certs.get_ref().clone()));
    }
    match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => Ok(Tls::Files(vec![CertFiles { cert: cert.get_ref().clone(), key: key.get_ref().clone() }])),
        (Some(v), None) | (None, Some(v)) => {
            Err(src.at(v, format!("{what} [service.tls]: cert and key go together; give both (PEM files)")))
        }
        (None, None) => unreachable!("one form is given"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{fixtures::*, *};

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
                 [service.limits]\nmax_headers = 50\nmax_body_bytes = 1000\nrequest_buffer_bytes = 0\n[service.http]\nframe_options = \"\"\n",
            );
        let config = parse(&text).unwrap();
        let h = config.services[0].https.as_ref().unwrap();
        assert_eq!((h.max_fails, h.fail_timeout), (3, Duration::from_secs(30)));
        assert_eq!(h.timeouts.handshake, Duration::from_secs(2));
        assert_eq!(h.timeouts.idle, Duration::from_secs(5));
        assert_eq!(h.timeouts.backend_connect, Timeouts::default().backend_connect);
        assert_eq!((h.limits.max_headers, h.limits.max_body_bytes), (50, Some(1000)));
        assert_eq!(h.limits.request_buffer_bytes, 0);
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
}

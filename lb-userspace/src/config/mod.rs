//! `xlb.toml`: parsing and validation.
//!
//! Each section deserializes straight into its public type: `deserialize_with` helpers check
//! every value as it is read and raise the finished message (see `OWN_ERROR`), which toml places
//! on the value's line. The rules across keys run after, per section. Where the file's shape is
//! not the type's, a private `*File` form sits in between (the top level, a service, its tls,
//! an alert channel). Every error names the file, the line, the key, what is wrong and how to
//! fix it, because the person reading it is editing that file.
//!
//! One file per section; `system` holds the checks that look at the host. Nothing here depends on
//! the rest of the daemon, so every part of it can use the config.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, de::IgnoredAny};
use serde_spanned::Spanned;

mod acme;
mod admin;
mod alerts;
mod dataplane;
#[cfg(test)]
mod fixtures;
mod https;
mod service;
mod system;

pub use acme::{AcmeSection, ChallengeKind, DEFAULT_ACME_STATE_DIR, DEFAULT_RENEW_BEFORE};
pub use admin::{Admin, DEFAULT_ADMIN_LISTEN};
pub use alerts::{AlertsConfig, DEFAULT_ALERTS_PER_MINUTE, EmailConfig, Secret, SmtpCredentials, SmtpTls, WebhookConfig};
pub use dataplane::{DEFAULT_PIN_PATH, Dataplane, XdpMode};
pub use https::{Acme, CertFiles, HttpHeaders, Https, Limits, Timeouts, Tls};
pub use service::{CheckKind, DEFAULT_FAIL_TIMEOUT, DEFAULT_MAX_FAILS, Health, MAX_PASSIVE_DURATION, Service, ServiceMode};
use {
    service::{ServiceFile, parse_services},
};

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

impl Lines {
    /// A second, lenient read of a text that parsed: only the positions of the values, so the
    /// section types need not carry them.
    fn read(src: &Source) -> Lines {
        #[derive(Default, Deserialize)]
        struct File {
            #[serde(default)]
            dataplane: Dataplane,
            #[serde(default)]
            service: Vec<Service>,
        }
        #[derive(Default, Deserialize)]
        struct Dataplane {
            #[serde(default)]
            interfaces: Vec<Spanned<IgnoredAny>>,
        }
        #[derive(Default, Deserialize)]
        struct Service {
            #[serde(default)]
            backends: Vec<Spanned<IgnoredAny>>,
        }
        let lines = |values: &[Spanned<IgnoredAny>]| values.iter().map(|v| src.line(v.span().start)).collect();
        let file: File = toml::from_str(src.text).unwrap_or_default();
        Lines {
            interfaces: lines(&file.dataplane.interfaces),
            backends: file.service.iter().map(|s| lines(&s.backends)).collect(),
        }
    }
}

/// Two configs are equal when they mean the same thing; where the values sit in the file (which
/// moves with every comment edited) does not count.
impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        (&self.path, &self.dataplane, &self.admin, &self.services, &self.alerts, &self.acme)
            == (&other.path, &other.dataplane, &other.admin, &other.services, &other.alerts, &other.acme)
    }
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

/// The file's top level: `Config` without the path and the line bookkeeping, and with the
/// services as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    dataplane: Option<Dataplane>,
    #[serde(default)]
    admin: Admin,
    #[serde(default, rename = "service")]
    services: Vec<Spanned<ServiceFile>>,
    alerts: Option<Spanned<AlertsConfig>>,
    #[serde(default)]
    acme: AcmeSection,
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

    /// `service "<name>"` of the `[[service]]` table the byte at `offset` belongs to: the last one
    /// that starts before it (a later `[service.health]` still belongs to it). Only used for an
    /// error, so the text is read again rather than the names carried through deserialization.
    fn service_at(&self, offset: usize) -> String {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            service: Vec<Spanned<Named>>,
        }
        #[derive(Deserialize)]
        struct Named {
            name: Option<String>,
        }
        let file = toml::from_str::<File>(self.text).ok();
        let service = file.and_then(|f| f.service.into_iter().rev().find(|s| s.span().start <= offset));
        match service.and_then(|s| s.into_inner().name) {
            Some(name) => format!("service \"{name}\""),
            None => "service".to_owned(),
        }
    }

    fn toml(&self, err: &toml::de::Error) -> ConfigError {
        if let Some((header, message)) = err.message().strip_prefix(OWN_ERROR).and_then(|m| m.split_once(OWN_ERROR))
            && let Some((service, at)) = header.split_once(':')
        {
            let at = at.parse().ok().or(err.span().map(|span| span.start));
            let line = at.map(|at| self.line(at));
            return match at {
                Some(at) if service == "s" => self.error(line, format!("{} {message}", self.service_at(at))),
                _ => self.error(line, message),
            };
        }
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
        let raw: ConfigFile = toml::from_str(text).map_err(|e| src.toml(&e))?;
        let dataplane = raw.dataplane.ok_or_else(|| {
            src.error(
                None,
                "missing [dataplane] section; add one with at least `interfaces = [\"eth0\"]`",
            )
        })?;
        let services = parse_services(&src, raw.services)?;
        if let Some(alerts) = &raw.alerts {
            AlertsConfig::check(alerts, &src)?;
        }
        let alerts = raw.alerts.map(Spanned::into_inner);
        Ok(Config {
            path: path.to_owned(),
            dataplane,
            admin: raw.admin,
            services,
            alerts,
            acme: raw.acme,
            lines: Lines::read(&src),
        })
    }
}

/// A humantime duration such as "1s" or "500ms"; the message names `key`.
fn parse_duration(text: &str, key: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{key} \"{text}\": not a duration ({e}); write e.g. \"1s\" or \"500ms\""))
}

/// An `ip:port` that can be a destination: unicast IP, non-zero port. The message names `key`
/// and shows `example`.
fn parse_socket_addr(text: &str, key: &str, example: &str) -> Result<SocketAddr, String> {
    let fail = |problem: String| Err(format!("{key} \"{text}\": {problem}"));
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

/// Marks an error raised by a `deserialize_with` helper: its message is already a complete config
/// message, which `Source::toml` passes on without toml's decorations. The marker is followed by
/// `<s>:<offset>` and the marker again: `s` when `service "<name>" ` is to go in front (as the
/// checks of whole services write it), and the byte offset when the error is at a part of the
/// value (toml's span is the whole value's).
const OWN_ERROR: char = '\u{1}';

fn own_error_with<E: serde::de::Error>(service: bool, at: Option<usize>, message: impl fmt::Display) -> E {
    E::custom(own_message(service, at, message))
}

/// The text of `own_error_with`, for a `try_from` conversion (which serde turns into an error).
fn own_message(service: bool, at: Option<usize>, message: impl fmt::Display) -> String {
    let service = if service { "s" } else { "" };
    let at = at.map(|a| a.to_string()).unwrap_or_default();
    format!("{OWN_ERROR}{service}:{at}{OWN_ERROR}{message}")
}

/// A complete config message from inside deserialization; toml puts it on the line of the value
/// being deserialized.
fn own_error<E: serde::de::Error>(message: impl fmt::Display) -> E {
    own_error_with(false, None, message)
}

/// `own_error` on the line of `value`, a part of the value being deserialized.
fn own_error_at<E: serde::de::Error, T>(value: &Spanned<T>, message: impl fmt::Display) -> E {
    own_error_with(false, Some(value.span().start), message)
}

/// `own_error` inside a `[[service]]` table.
fn service_error<E: serde::de::Error>(message: impl fmt::Display) -> E {
    own_error_with(true, None, message)
}

/// `own_error_at` inside a `[[service]]` table.
fn service_error_at<E: serde::de::Error, T>(value: &Spanned<T>, message: impl fmt::Display) -> E {
    own_error_with(true, Some(value.span().start), message)
}

/// The value of a key as a string, turned into `T` by `check` (whose error is the whole message).
fn from_str_with<'de, D, T>(de: D, check: impl FnOnce(&str) -> Result<T, String>) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(de)?;
    check(&text).map_err(own_error)
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};
    use lb_common::flow::DEFAULT_MAX_FLOWS;

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
                health: Health::default(),
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
    fn load_reads_and_checks_the_file() {
        let dir = std::env::temp_dir().join(format!("xlb-config-load-{}", std::process::id()));
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
        let config = Config::parse(path, include_str!("../../../systemd/xlb.toml")).unwrap();
        assert_eq!(config.dataplane.interfaces, ["eth0"]);
        assert_eq!(config.dataplane.pin_path, Path::new(DEFAULT_PIN_PATH));
        assert_eq!(config.admin.listen, DEFAULT_ADMIN_LISTEN);
        let [web] = &config.services[..] else { panic!("{config:?}") };
        assert_eq!((web.name.as_str(), web.backends.len()), ("web", 3));
    }
}

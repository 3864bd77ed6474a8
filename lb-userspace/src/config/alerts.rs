//! `[alerts]`: e-mail and webhook alerts.
use std::{fmt, path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer};
use serde_spanned::Spanned;

use super::{ConfigError, Source, own_error, own_error_at, own_message, parse_duration};

/// `[alerts]`: alerts about backends going down and up, whole services down, and certificate
/// renewals that failed, by e-mail and/or webhook.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// At most this many messages per minute on each channel; the rest is sent as one summary
    /// once the minute is over.
    #[serde(default = "default_max_per_minute", deserialize_with = "max_per_minute")]
    pub max_per_minute: u32,
    pub email: Option<EmailConfig>,
    pub webhook: Option<WebhookConfig>,
}

/// Read through `EmailFile`, whose keys lie flat where this nests the credentials, and whose
/// rules across keys name the line of the key to change.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "EmailFile")]
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

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (port 587); refuses a server without it.
    #[default]
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

/// Read through `WebhookFile`: `ca_file` is checked against the url.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "WebhookFile")]
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

/// Bounds one delivery unless `timeout` says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl AlertsConfig {
    /// `[alerts]` must say where to send them; `table` is where it sits.
    pub(super) fn check(table: &Spanned<AlertsConfig>, src: &Source) -> Result<(), ConfigError> {
        let alerts = table.get_ref();
        if alerts.email.is_none() && alerts.webhook.is_none() {
            return Err(src.at(
                table,
                "[alerts] has neither [alerts.email] nor [alerts.webhook]; add one (or remove [alerts] to send no alerts)",
            ));
        }
        Ok(())
    }
}

fn default_max_per_minute() -> u32 {
    DEFAULT_ALERTS_PER_MINUTE
}

fn max_per_minute<'de, D: Deserializer<'de>>(de: D) -> Result<u32, D::Error> {
    let v = i64::deserialize(de)?;
    u32::try_from(v)
        .ok()
        .filter(|n| (1..=1000).contains(n))
        .ok_or_else(|| own_error(format!("alerts.max_per_minute = {v}: out of range; use 1..=1000 messages per minute")))
}

impl<'de> Deserialize<'de> for SmtpTls {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<SmtpTls, D::Error> {
        match String::deserialize(de)?.as_str() {
            "starttls" => Ok(SmtpTls::StartTls),
            "tls" => Ok(SmtpTls::Tls),
            "none" => Ok(SmtpTls::None),
            other => Err(own_error(format!(
                "alerts.email.tls \"{other}\": use \"starttls\" (port 587, upgraded to TLS), \"tls\" (port 465, TLS \
                 from the start) or \"none\" (unencrypted: only for a relay on this host)"
            ))),
        }
    }
}

/// `[alerts.email]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmailFile {
    #[serde(deserialize_with = "host")]
    host: String,
    #[serde(default, deserialize_with = "port")]
    port: Option<u16>,
    tls: Option<Spanned<SmtpTls>>,
    #[serde(deserialize_with = "from")]
    from: String,
    #[serde(deserialize_with = "to")]
    to: Vec<String>,
    username: Option<Spanned<String>>,
    password_file: Option<Spanned<PathBuf>>,
    #[serde(default, deserialize_with = "email_timeout")]
    timeout: Option<Duration>,
    ca_file: Option<Spanned<PathBuf>>,
}

fn host<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    let text = String::deserialize(de)?;
    let host = text.trim();
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/' || c == ':') {
        return Err(own_error(format!(
            "alerts.email.host \"{text}\": not a host name or address; write e.g. \"smtp.example.com\" (the port goes in alerts.email.port)"
        )));
    }
    Ok(host.to_owned())
}

fn port<'de, D: Deserializer<'de>>(de: D) -> Result<Option<u16>, D::Error> {
    let v = i64::deserialize(de)?;
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(Some(p)),
        _ => Err(own_error(format!("alerts.email.port = {v}: not a port; use 1..=65535 (e.g. 587)"))),
    }
}

fn mailbox(text: &str, key: &str) -> Result<String, String> {
    text.parse::<lettre::message::Mailbox>().map(|m| m.to_string()).map_err(|e| {
        format!("{key} \"{text}\": not an e-mail address ({e}); write e.g. \"ops@example.com\" or \"Ops <ops@example.com>\"")
    })
}

fn from<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    mailbox(&String::deserialize(de)?, "alerts.email.from").map_err(own_error)
}

/// Each recipient is checked where it is written.
fn to<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    let list = Vec::<Spanned<String>>::deserialize(de)?;
    if list.is_empty() {
        return Err(own_error("alerts.email.to is empty; list at least one recipient, e.g. to = [\"ops@example.com\"]"));
    }
    list.iter().map(|t| mailbox(t.get_ref(), "alerts.email.to").map_err(|e| own_error_at(t, e))).collect()
}

fn email_timeout<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Duration>, D::Error> {
    parse_duration(&String::deserialize(de)?, "alerts.email.timeout").map(Some).map_err(own_error)
}

impl TryFrom<EmailFile> for EmailConfig {
    type Error = String;

    fn try_from(file: EmailFile) -> Result<EmailConfig, String> {
        fn at<T>(value: &Spanned<T>, message: &str) -> String {
            own_message(false, Some(value.span().start), message)
        }
        let tls = file.tls.as_ref().map_or(SmtpTls::default(), |t| *t.get_ref());
        let port = file.port.unwrap_or(match tls {
            SmtpTls::StartTls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        });
        let credentials = match (file.username, file.password_file) {
            (None, None) => None,
            (Some(username), Some(file)) => Some(SmtpCredentials {
                username: username.into_inner(),
                password_file: file.into_inner(),
                password: Secret::default(),
            }),
            (Some(v), None) => {
                return Err(at(&v, "alerts.email.username is set but password_file is not; add password_file = \"/etc/xlb/smtp-password\" (a file holding only the password)"));
            }
            (None, Some(v)) => {
                return Err(at(&v, "alerts.email.password_file is set but username is not; add the SMTP user name"));
            }
        };
        if let Some(t) = &file.tls
            && credentials.is_some()
            && tls == SmtpTls::None
        {
            return Err(at(
                t,
                "alerts.email.tls = \"none\" with a username: the password would cross the network unencrypted; use \"starttls\" or \"tls\"",
            ));
        }
        if let (Some(ca), SmtpTls::None) = (&file.ca_file, tls) {
            return Err(at(ca, "alerts.email.ca_file is set but tls = \"none\": a CA is only used with \"starttls\" or \"tls\""));
        }
        Ok(EmailConfig {
            host: file.host,
            port,
            tls,
            from: file.from,
            to: file.to,
            credentials,
            timeout: file.timeout.unwrap_or(DEFAULT_TIMEOUT),
            ca_file: file.ca_file.map(Spanned::into_inner),
            ca_pem: None,
        })
    }
}

/// `[alerts.webhook]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookFile {
    #[serde(deserialize_with = "url")]
    url: String,
    #[serde(default, deserialize_with = "webhook_timeout")]
    timeout: Option<Duration>,
    ca_file: Option<Spanned<PathBuf>>,
}

fn url<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    let text = String::deserialize(de)?;
    let uri = text.parse::<hyper::Uri>().ok();
    let ok = uri.as_ref().is_some_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty()));
    if !ok {
        return Err(own_error(format!(
            "alerts.webhook.url \"{text}\": not an http:// or https:// URL; write e.g. \"https://hooks.example.com/xlb\""
        )));
    }
    Ok(text)
}

fn webhook_timeout<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Duration>, D::Error> {
    parse_duration(&String::deserialize(de)?, "alerts.webhook.timeout").map(Some).map_err(own_error)
}

impl TryFrom<WebhookFile> for WebhookConfig {
    type Error = String;

    fn try_from(file: WebhookFile) -> Result<WebhookConfig, String> {
        if let Some(ca) = &file.ca_file
            && !file.url.starts_with("https://")
        {
            return Err(own_message(
                false,
                Some(ca.span().start),
                "alerts.webhook.ca_file is set but the url is not https://: a CA is only used for https",
            ));
        }
        Ok(WebhookConfig {
            url: file.url,
            timeout: file.timeout.unwrap_or(DEFAULT_TIMEOUT),
            ca_file: file.ca_file.map(Spanned::into_inner),
            ca_pem: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::*;

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
}

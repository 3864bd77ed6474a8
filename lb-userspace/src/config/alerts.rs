//! `[alerts]`: e-mail and webhook alerts.
use std::{fmt, path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_spanned::Spanned;

use super::{ConfigError, Source, duration};

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
pub(super) struct RawAlerts {
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

pub(super) fn parse_alerts(src: &Source, raw: Spanned<RawAlerts>) -> Result<AlertsConfig, ConfigError> {
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

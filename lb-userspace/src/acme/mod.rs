//! Certificates from an ACME CA (RFC 8555), one manager task per service.
//!
//! The manager keeps one certificate and key on disk for a service's domains and hands them to
//! the listener through a callback; the listener swaps them in for new handshakes while the
//! connections it already holds keep the key they started with. It reuses one stored account
//! per ACME directory, orders when there is no certificate or the stored one nears its end,
//! answers the CA's challenges through the shared [`Challenges`](crate::challenges::Challenges) store (HTTP-01 on the redirect
//! listener, TLS-ALPN-01 on the HTTPS listener), and retries a failed renewal with exponential
//! backoff while the current certificate keeps serving.
//!
//! Files, under `state_dir` (directories 0700, files 0600, each written to a temporary file and
//! renamed over the old one, so a crash leaves the old file or the new one, never half of one):
//!
//! ```text
//! state_dir/account.json          ACME account keys, one per directory URL
//! state_dir/<service>/cert.pem    the chain, end entity first
//! state_dir/<service>/key.pem     its PKCS#8 private key
//! ```

mod challenge;
mod client;
mod manager;
mod store;

use std::{
    fmt,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use rustls::sign::CertifiedKey;
use tokio::sync::Notify;

pub use self::{challenge::tls_alpn01_key, manager::Manager};
use self::store::{ACCOUNT_FILE, CERT_FILE, KEY_FILE};

pub use crate::config::{ChallengeKind, DEFAULT_RENEW_BEFORE};

/// First wait after a failed attempt; it doubles with each further failure...
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_secs(60);
/// ...up to this, so a CA outage costs a few requests a day, not a request a minute (and
/// stays far below Let's Encrypt's failed-validation limits).
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(6 * 3600);
/// Bound on one whole attempt (account, order, validation, download): a CA that stops
/// answering mid-order turns into a failed attempt and a retry, never a stuck manager.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// What one manager needs; the daemon builds it from a service's `[service.acme]` table.
#[derive(Clone, Debug)]
pub struct AcmeSettings {
    /// The service's name: in log lines, in the status, and as the directory of its files.
    pub service: String,
    /// The ACME directory URL (`https://…/directory`).
    pub directory: String,
    /// Contact URLs for the account, e.g. `mailto:ops@example.com`.
    pub contact: Vec<String>,
    /// The names the certificate is for (its subjectAltName).
    pub domains: Vec<String>,
    /// A PEM file with the root certificate(s) that the ACME server's own HTTPS certificate
    /// chains to; only these are then trusted. Without it, the Mozilla roots (webpki-roots).
    pub ca: Option<PathBuf>,
    /// Where the account and certificates are kept.
    pub state_dir: PathBuf,
    /// Renew when the certificate has less than this left (or a third of its lifetime, if that
    /// is shorter).
    pub renew_before: Duration,
    pub challenge: ChallengeKind,
    /// Backoff after a failed attempt: `retry_min`, doubling with each further failure, at most
    /// `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Bound on one whole attempt.
    pub attempt_timeout: Duration,
}

impl AcmeSettings {
    /// Settings with the defaults for everything but what has none.
    pub fn new(
        service: impl Into<String>,
        directory: impl Into<String>,
        domains: Vec<String>,
        state_dir: impl Into<PathBuf>,
    ) -> AcmeSettings {
        AcmeSettings {
            service: service.into(),
            directory: directory.into(),
            contact: Vec::new(),
            domains,
            ca: None,
            state_dir: state_dir.into(),
            renew_before: DEFAULT_RENEW_BEFORE,
            challenge: ChallengeKind::Http01,
            retry_min: DEFAULT_RETRY_MIN,
            retry_max: DEFAULT_RETRY_MAX,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
        }
    }

    /// The service's directory of files.
    pub fn service_dir(&self) -> PathBuf {
        self.state_dir.join(&self.service)
    }

    pub fn cert_path(&self) -> PathBuf {
        self.service_dir().join(CERT_FILE)
    }

    pub fn key_path(&self) -> PathBuf {
        self.service_dir().join(KEY_FILE)
    }

    pub fn account_path(&self) -> PathBuf {
        self.state_dir.join(ACCOUNT_FILE)
    }

    /// Everything that can be checked before talking to the CA.
    fn validate(&self) -> Result<(), String> {
        let service = &self.service;
        if service.is_empty() || service == "." || service == ".." || service.contains(['/', '\0'])
        {
            return Err(format!(
                "service name {service:?} cannot name its certificate directory: use a name \
                 without '/', other than '.' and '..'"
            ));
        }
        if !self.directory.starts_with("https://") {
            return Err(format!(
                "service {service}: acme directory {:?} is not an https:// URL (e.g. \
                 https://acme-v02.api.letsencrypt.org/directory)",
                self.directory
            ));
        }
        if self.domains.is_empty() {
            return Err(format!(
                "service {service}: acme needs at least one domain in `domains`"
            ));
        }
        for domain in &self.domains {
            let ok = !domain.is_empty()
                && domain.len() <= 253
                && domain.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                });
            if !ok {
                return Err(format!(
                    "service {service}: acme domain {domain:?} is not a DNS name (letters, \
                     digits and '-' in dot-separated labels; no wildcards: HTTP-01 and \
                     TLS-ALPN-01 cannot prove them)"
                ));
            }
        }
        for contact in &self.contact {
            if !contact.starts_with("mailto:") {
                return Err(format!(
                    "service {service}: acme contact {contact:?} is not a mailto: URL (write \
                     \"mailto:{contact}\")"
                ));
            }
        }
        if self.retry_min.is_zero() || self.retry_max < self.retry_min {
            return Err(format!(
                "service {service}: acme retry backoff must satisfy 0 < retry_min <= retry_max"
            ));
        }
        Ok(())
    }
}

/// What the status page and the admin API show for one service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcmeStatus {
    /// End of the certificate being served, if there is one.
    pub not_after: Option<SystemTime>,
    /// The last attempt's error, until an attempt succeeds.
    pub last_error: Option<String>,
    /// When the certificate being served was obtained by this manager.
    pub last_renewal: Option<SystemTime>,
    /// When the manager will next order (earlier if asked to renew now).
    pub next_attempt: Option<SystemTime>,
    /// Failed attempts in a row.
    pub failures: u32,
    /// Attempts finished (either way) since the manager started: one that asked for a renewal
    /// waits for this to move on, then reads the outcome.
    pub attempts: u64,
}

impl AcmeStatus {
    /// For the admin API and the status page: times as RFC 3339 (UTC, seconds), absent ones as
    /// `null`.
    pub fn to_json(&self) -> serde_json::Value {
        let time =
            |t: Option<SystemTime>| t.map(|t| humantime::format_rfc3339_seconds(t).to_string());
        serde_json::json!({
            "not_after": time(self.not_after),
            "last_renewal": time(self.last_renewal),
            "next_attempt": time(self.next_attempt),
            "last_error": self.last_error,
            "failures": self.failures,
            "attempts": self.attempts,
        })
    }
}

/// Called with each new certificate once it is on disk: the key to serve, and the chain as PEM.
pub type OnCert = Arc<dyn Fn(Arc<CertifiedKey>, Vec<u8>) + Send + Sync>;

/// The step of an attempt that failed, for the log line and the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Account,
    Order,
    Challenge,
    Validation,
    Finalize,
    Certificate,
    Store,
    Timeout,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Account => "loading or creating the ACME account",
            Step::Order => "placing the order",
            Step::Challenge => "publishing the challenge answers",
            Step::Validation => "validating the challenges",
            Step::Finalize => "finalizing the order",
            Step::Certificate => "downloading the certificate",
            Step::Store => "storing the certificate",
            Step::Timeout => "waiting for the ACME server",
        })
    }
}

/// A failed attempt: where, and what the ACME server (or the network, or the disk) said.
#[derive(Debug)]
pub struct AttemptError {
    pub step: Step,
    pub message: String,
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.message)
    }
}

fn fail<E: std::error::Error>(step: Step) -> impl Fn(E) -> AttemptError {
    move |e| AttemptError {
        step,
        message: error_chain(&e),
    }
}

/// For a failure that is described by our own message rather than by an error value.
fn failed(step: Step) -> impl Fn(String) -> AttemptError {
    move |message| AttemptError { step, message }
}

/// `e` and its sources: hyper's own message ("client error (Connect)") says little without them.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// When a certificate valid from `not_before` to `not_after` should be renewed: `renew_before`
/// ahead of its end, or after two thirds of its lifetime if that comes later (a short-lived
/// certificate would otherwise be due the moment it is issued, and renewed in a loop).
pub fn renewal_time(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_before: Duration,
) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let lead = renew_before.min(lifetime / 3);
    not_after.checked_sub(lead).unwrap_or(not_before)
}

/// The wait after `failures` (≥ 1) failed attempts in a row: `min`, doubling, at most `max`.
pub fn retry_delay(failures: u32, min: Duration, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    min.checked_mul(1 << doublings).unwrap_or(max).min(max)
}

/// When to attempt next: at the renewal time of the certificate held (`validity`), at once
/// without one, but never before the backoff after the last failure has passed.
pub fn next_attempt(
    validity: Option<(SystemTime, SystemTime)>,
    renew_before: Duration,
    last_failure: Option<(SystemTime, u32)>,
    retry_min: Duration,
    retry_max: Duration,
) -> SystemTime {
    let due = validity
        .map(|(not_before, not_after)| renewal_time(not_before, not_after, renew_before))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    match last_failure {
        Some((at, failures)) => due.max(at + retry_delay(failures, retry_min, retry_max)),
        None => due,
    }
}

struct Shared {
    status: Mutex<AcmeStatus>,
    /// Set by `renew_now`, cleared when an attempt ends: a request made while an order is
    /// under way is answered by that order, not by a second one right after it (the CA's rate
    /// limits count duplicate certificates).
    forced: AtomicBool,
    wake: Notify,
}

/// The running manager of one service. Dropping it stops the manager (an order under way is
/// abandoned and its challenge answers withdrawn); the certificate on disk stays.
pub struct ManagerHandle {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl ManagerHandle {
    pub fn status(&self) -> AcmeStatus {
        self.shared.status.lock().unwrap().clone()
    }

    /// Orders a new certificate now, whatever the current one's expiry (admin API, tests).
    pub fn renew_now(&self) {
        self.shared.forced.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }
}

impl Drop for ManagerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn at(days: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + DAY * days as u32
    }

    #[test]
    fn renews_thirty_days_before_the_end_of_a_90_day_certificate() {
        assert_eq!(
            renewal_time(at(100), at(190), DEFAULT_RENEW_BEFORE),
            at(160)
        );
    }

    #[test]
    fn renews_short_lived_certificates_after_two_thirds_of_their_life() {
        // A 6-day certificate is not "due" the moment it is issued.
        assert_eq!(
            renewal_time(at(100), at(106), DEFAULT_RENEW_BEFORE),
            at(104)
        );
    }

    #[test]
    fn a_missing_certificate_is_due_at_once() {
        let next = next_attempt(
            None,
            DEFAULT_RENEW_BEFORE,
            None,
            DEFAULT_RETRY_MIN,
            DEFAULT_RETRY_MAX,
        );
        assert!(next <= SystemTime::now());
    }

    #[test]
    fn backoff_doubles_from_one_minute_to_six_hours() {
        let delays: Vec<u64> = (1..=11)
            .map(|n| retry_delay(n, DEFAULT_RETRY_MIN, DEFAULT_RETRY_MAX).as_secs() / 60)
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 360, 360]);
        assert_eq!(
            retry_delay(u32::MAX, DEFAULT_RETRY_MIN, DEFAULT_RETRY_MAX),
            DEFAULT_RETRY_MAX
        );
    }

    #[test]
    fn a_failure_delays_a_due_renewal_but_not_a_later_one() {
        let validity = Some((at(100), at(190)));
        let attempt = |failed| next_attempt(validity, DEFAULT_RENEW_BEFORE, failed, DEFAULT_RETRY_MIN, DEFAULT_RETRY_MAX);
        // Due at day 160; failed at day 170 for the third time: 4 minutes later.
        let failed = Some((at(170), 3));
        assert_eq!(
            attempt(failed),
            at(170) + Duration::from_secs(240)
        );
        // A forced renewal failed on day 120: the schedule stays at day 160.
        let failed = Some((at(120), 1));
        assert_eq!(
            attempt(failed),
            at(160)
        );
    }

    #[test]
    fn status_as_json() {
        let status = AcmeStatus {
            not_after: Some(at(20_000)),
            last_error: Some("placing the order: connection refused".into()),
            last_renewal: None,
            next_attempt: Some(at(19_970) + Duration::from_secs(90)),
            failures: 2,
            attempts: 3,
        };
        assert_eq!(
            status.to_json(),
            serde_json::json!({
                "not_after": "2024-10-04T00:00:00Z",
                "last_renewal": null,
                "next_attempt": "2024-09-04T00:01:30Z",
                "last_error": "placing the order: connection refused",
                "failures": 2,
                "attempts": 3,
            })
        );
    }

    #[test]
    fn settings_name_what_is_wrong() {
        let good = AcmeSettings::new(
            "web",
            "https://acme.example/directory",
            vec!["www.example.com".into()],
            "/var/lib/xlb/acme",
        );
        assert_eq!(good.validate(), Ok(()));
        type Break = fn(&mut AcmeSettings);
        let cases: [(&str, Break); 6] = [
            ("cannot name its certificate directory", |s| {
                s.service = "../etc".into()
            }),
            ("not an https:// URL", |s| {
                s.directory = "http://acme.example/dir".into()
            }),
            ("at least one domain", |s| s.domains.clear()),
            ("not a DNS name", |s| {
                s.domains = vec!["*.example.com".into()]
            }),
            ("not a mailto: URL", |s| {
                s.contact = vec!["ops@example.com".into()]
            }),
            ("retry backoff", |s| s.retry_min = Duration::ZERO),
        ];
        for (expected, break_it) in cases {
            let mut settings = good.clone();
            break_it(&mut settings);
            let err = settings.validate().unwrap_err();
            assert!(err.contains(expected), "{err:?} should say {expected:?}");
        }
    }
}

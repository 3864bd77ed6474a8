//! Certificates from an ACME CA (RFC 8555), one manager task per service.
//!
//! The manager keeps one certificate and key on disk for a service's domains and hands them to
//! the listener through a callback; the listener swaps them in for new handshakes while the
//! connections it already holds keep the key they started with. It reuses one stored account
//! per ACME directory, orders when there is no certificate or the stored one nears its end,
//! answers the CA's challenges through the shared [`Challenges`] store (HTTP-01 on the redirect
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

use std::{
    collections::BTreeMap,
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use hyper_util::{
    client::legacy::{Client as HyperClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _},
    sign::CertifiedKey,
};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::{certs, challenges::Challenges};

/// Renew this long before a certificate ends (Let's Encrypt's 90-day certificates are then
/// renewed after 60 days, as certbot does), or after two thirds of a shorter lifetime.
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// First wait after a failed attempt; it doubles with each further failure...
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_secs(60);
/// ...up to this, so a CA outage costs a few requests a day, not a request a minute (and
/// stays far below Let's Encrypt's failed-validation limits).
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(6 * 3600);
/// Bound on one whole attempt (account, order, validation, download): a CA that stops
/// answering mid-order turns into a failed attempt and a retry, never a stuck manager.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long to poll for the CA's validation of the challenges and for the certificate.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(120);
/// TCP connect timeout towards the ACME server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest single sleep; the schedule is checked again after it, so a suspended machine
/// or a clock step cannot push a renewal far past its time.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

const ACCOUNT_FILE: &str = "account.json";
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

/// Which challenge proves control of the domains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChallengeKind {
    /// A file at `http://<domain>/.well-known/acme-challenge/<token>`: needs port 80.
    Http01,
    /// A special certificate on port 443 for the `acme-tls/1` protocol: needs only port 443.
    TlsAlpn01,
}

impl ChallengeKind {
    fn acme(self) -> ChallengeType {
        match self {
            ChallengeKind::Http01 => ChallengeType::Http01,
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

impl fmt::Display for ChallengeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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

fn fail(step: Step) -> impl Fn(&dyn std::error::Error) -> AttemptError {
    move |e| AttemptError {
        step,
        message: error_chain(e),
    }
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

/// The HTTPS client instant-acme talks through. Ours rather than its default one, so that the
/// trusted roots and the crypto provider are chosen here.
#[derive(Clone)]
struct AcmeHttp(HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>);

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        request: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let response = self.0.request(request);
        Box::pin(async move {
            response
                .await
                .map(BytesResponse::from)
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))
        })
    }
}

/// One service's certificate manager; runs as a task, see [`Manager::spawn`].
pub struct Manager {
    settings: AcmeSettings,
    challenges: Arc<Challenges>,
    on_cert: OnCert,
    shared: Arc<Shared>,
    http: AcmeHttp,
    account: Option<Account>,
    /// Validity of the certificate being served.
    validity: Option<(SystemTime, SystemTime)>,
    /// The stored certificate is not for exactly the configured domains: due at once.
    names_changed: bool,
    last_failure: Option<(SystemTime, u32)>,
}

/// A certificate as read from disk or obtained from the CA.
struct Issued {
    key: Arc<CertifiedKey>,
    chain_pem: Vec<u8>,
    validity: (SystemTime, SystemTime),
    /// The DNS names the certificate is for.
    names: Vec<String>,
}

impl Manager {
    /// Checks the settings, then starts the manager on the current tokio runtime. A stored
    /// certificate is handed to `on_cert` before this returns, so a listener can serve it at
    /// once; everything that needs the CA happens in the task.
    pub fn spawn(
        settings: AcmeSettings,
        challenges: Arc<Challenges>,
        on_cert: OnCert,
    ) -> anyhow::Result<ManagerHandle> {
        settings.validate().map_err(anyhow::Error::msg)?;
        let http = http_client(settings.ca.as_deref())?;
        let shared = Arc::new(Shared {
            status: Mutex::default(),
            forced: AtomicBool::new(false),
            wake: Notify::new(),
        });
        let mut manager = Manager {
            settings,
            challenges,
            on_cert,
            shared: shared.clone(),
            http,
            account: None,
            validity: None,
            names_changed: false,
            last_failure: None,
        };
        manager.load_stored();
        let task = tokio::spawn(manager.run());
        Ok(ManagerHandle { shared, task })
    }

    fn load_stored(&mut self) {
        let service = &self.settings.service;
        let (cert_path, key_path) = (self.settings.cert_path(), self.settings.key_path());
        if !cert_path.exists() && !key_path.exists() {
            info!(
                service,
                "acme: no stored certificate in {}: ordering one",
                self.settings.service_dir().display()
            );
            return;
        }
        match load_pair(&cert_path, &key_path) {
            Ok(issued) => {
                self.shared.status.lock().unwrap().not_after = Some(issued.validity.1);
                self.validity = Some(issued.validity);
                info!(
                    service,
                    not_after = %humantime::format_rfc3339_seconds(issued.validity.1),
                    "acme: serving the stored certificate {}",
                    cert_path.display()
                );
                // Served meanwhile all the same: it still covers the names it has.
                if !same_names(&issued.names, &self.settings.domains) {
                    info!(
                        service,
                        "acme: the stored certificate is for {} but the domains are now {}: \
                         ordering a new one",
                        issued.names.join(","),
                        self.settings.domains.join(",")
                    );
                    self.names_changed = true;
                }
                (self.on_cert)(issued.key, issued.chain_pem);
            }
            // Kept as they are (the next successful order replaces them), so nothing is lost
            // that someone may want to look at.
            Err(e) => warn!(
                service,
                "acme: cannot use the stored certificate ({e}); ordering a new one"
            ),
        }
    }

    async fn run(mut self) {
        loop {
            let next = next_attempt(
                self.validity.filter(|_| !self.names_changed),
                self.settings.renew_before,
                self.last_failure,
                self.settings.retry_min,
                self.settings.retry_max,
            );
            self.shared.status.lock().unwrap().next_attempt = Some(next);
            // Sleeps in bounded slices until `next`, or until asked to renew now.
            let forced = loop {
                if self.shared.forced.load(Ordering::SeqCst) {
                    break true;
                }
                let Ok(wait) = next.duration_since(SystemTime::now()) else {
                    break false;
                };
                if wait.is_zero() {
                    break false;
                }
                tokio::select! {
                    () = tokio::time::sleep(wait.min(MAX_SLEEP)) => {}
                    () = self.shared.wake.notified() => {}
                }
            };
            let service = self.settings.service.clone();
            info!(
                service,
                domains = %self.settings.domains.join(","),
                challenge = %self.settings.challenge,
                forced,
                "acme: ordering a certificate"
            );
            let attempt = tokio::time::timeout(self.settings.attempt_timeout, self.attempt()).await;
            let result = attempt.unwrap_or_else(|_| {
                Err(AttemptError {
                    step: Step::Timeout,
                    message: format!(
                        "no certificate after {}",
                        humantime::format_duration(self.settings.attempt_timeout)
                    ),
                })
            });
            self.shared.forced.store(false, Ordering::SeqCst);
            let now = SystemTime::now();
            match result {
                Ok(issued) => {
                    info!(
                        service,
                        not_after = %humantime::format_rfc3339_seconds(issued.validity.1),
                        "acme: new certificate stored in {}; swapping it in",
                        self.settings.service_dir().display()
                    );
                    self.validity = Some(issued.validity);
                    self.names_changed = false;
                    self.last_failure = None;
                    // Served first: whoever sees the status say so can connect and get it.
                    (self.on_cert)(issued.key, issued.chain_pem);
                    let mut status = self.shared.status.lock().unwrap();
                    status.not_after = Some(issued.validity.1);
                    status.last_renewal = Some(now);
                    status.last_error = None;
                    status.failures = 0;
                    status.attempts += 1;
                }
                Err(e) => {
                    let failures = self.last_failure.map_or(0, |(_, n)| n) + 1;
                    self.last_failure = Some((now, failures));
                    let retry = next_attempt(
                        self.validity.filter(|_| !self.names_changed),
                        self.settings.renew_before,
                        self.last_failure,
                        self.settings.retry_min,
                        self.settings.retry_max,
                    );
                    let keeping = match self.validity {
                        Some((_, not_after)) => format!(
                            "keeping the current certificate (valid until {})",
                            humantime::format_rfc3339_seconds(not_after)
                        ),
                        None => "no certificate to serve yet".to_owned(),
                    };
                    error!(
                        service,
                        step = ?e.step,
                        failures,
                        "acme: service {service}: ordering a certificate failed while {e}; \
                         {keeping}; next attempt at {}",
                        humantime::format_rfc3339_seconds(retry)
                    );
                    let mut status = self.shared.status.lock().unwrap();
                    status.last_error = Some(e.to_string());
                    status.failures = failures;
                    status.attempts += 1;
                }
            }
        }
    }

    /// One order from account to stored files.
    async fn attempt(&mut self) -> Result<Issued, AttemptError> {
        let identifiers: Vec<Identifier> = self
            .settings
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let account = self.account(false).await?;
        let mut order = match account.new_order(&NewOrder::new(&identifiers)).await {
            Ok(order) => order,
            // The CA forgot the account (a test CA restarted, an account deactivated by
            // hand): a new one, once.
            Err(instant_acme::Error::Api(problem))
                if problem.r#type.as_deref()
                    == Some("urn:ietf:params:acme:error:accountDoesNotExist") =>
            {
                warn!(
                    service = self.settings.service,
                    "acme: the ACME server does not know the stored account; creating a new one"
                );
                let account = self.account(true).await?;
                account
                    .new_order(&NewOrder::new(&identifiers))
                    .await
                    .map_err(|e| fail(Step::Order)(&e))?
            }
            Err(e) => return Err(fail(Step::Order)(&e)),
        };

        // Withdrawn when this attempt ends, whichever way.
        let mut published = Published {
            challenges: self.challenges.clone(),
            http01: Vec::new(),
            tls_alpn01: Vec::new(),
        };
        let kind = self.settings.challenge;
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| fail(Step::Order)(&e))?;
            let domain = authz.identifier().to_string();
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AttemptError {
                        step: Step::Order,
                        message: format!("the authorization for {domain} is {other:?}"),
                    });
                }
            }
            let mut challenge = authz.challenge(kind.acme()).ok_or_else(|| AttemptError {
                step: Step::Challenge,
                message: format!(
                    "the ACME server offers no {kind} challenge for {domain}: set `challenge` \
                     to the other kind"
                ),
            })?;
            let key_authorization = challenge.key_authorization();
            match kind {
                ChallengeKind::Http01 => {
                    published.http01(&challenge.token, key_authorization.as_str());
                }
                ChallengeKind::TlsAlpn01 => {
                    let key = tls_alpn01_key(&domain, key_authorization.digest().as_ref())
                        .map_err(|message| AttemptError {
                            step: Step::Challenge,
                            message,
                        })?;
                    published.tls_alpn01(&domain, key);
                }
            }
            challenge
                .set_ready()
                .await
                .map_err(|e| fail(Step::Validation)(&e))?;
        }

        let polling = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(VALIDATION_TIMEOUT);
        let status = order
            .poll_ready(&polling)
            .await
            .map_err(|e| fail(Step::Validation)(&e))?;
        if status != OrderStatus::Ready {
            return Err(AttemptError {
                step: Step::Validation,
                message: validation_failure(&mut order, status).await,
            });
        }
        drop(published);

        let key = rcgen::KeyPair::generate().map_err(|e| fail(Step::Finalize)(&e))?;
        let mut params = rcgen::CertificateParams::new(self.settings.domains.clone())
            .map_err(|e| fail(Step::Finalize)(&e))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| fail(Step::Finalize)(&e))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(|e| fail(Step::Finalize)(&e))?;
        let chain_pem = order
            .poll_certificate(&polling)
            .await
            .map_err(|e| fail(Step::Certificate)(&e))?;
        let key_pem = key.serialize_pem();
        let issued = parse_pair(chain_pem.as_bytes(), key_pem.as_bytes()).map_err(|message| {
            AttemptError {
                step: Step::Certificate,
                message,
            }
        })?;
        self.store(chain_pem.as_bytes(), key_pem.as_bytes())
            .map_err(|message| AttemptError {
                step: Step::Store,
                message,
            })?;
        Ok(issued)
    }

    /// The account for the directory: the one held, the stored one, or a new one (stored at
    /// once). `fresh` skips the first two.
    async fn account(&mut self, fresh: bool) -> Result<Account, AttemptError> {
        let err = |message: String| AttemptError {
            step: Step::Account,
            message,
        };
        if !fresh {
            if let Some(account) = &self.account {
                return Ok(account.clone());
            }
            if let Some(credentials) =
                read_account(&self.settings.account_path(), &self.settings.directory)
                    .map_err(err)?
            {
                let account = Account::builder_with_http(Box::new(self.http.clone()))
                    .from_credentials(credentials)
                    .await
                    .map_err(|e| fail(Step::Account)(&e))?;
                self.account = Some(account.clone());
                return Ok(account);
            }
        }
        let contact: Vec<&str> = self.settings.contact.iter().map(String::as_str).collect();
        let (account, credentials) = Account::builder_with_http(Box::new(self.http.clone()))
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.settings.directory.clone(),
                None,
            )
            .await
            .map_err(|e| fail(Step::Account)(&e))?;
        write_account(
            &self.settings.state_dir,
            &self.settings.directory,
            &credentials,
        )
        .map_err(err)?;
        info!(
            service = self.settings.service,
            account = account.id(),
            "acme: created an account at {}",
            self.settings.directory
        );
        self.account = Some(account.clone());
        Ok(account)
    }

    fn store(&self, chain_pem: &[u8], key_pem: &[u8]) -> Result<(), String> {
        let dir = self.settings.service_dir();
        private_dir(&self.settings.state_dir)?;
        private_dir(&dir)?;
        // Key first: a crash between the two renames leaves a new key beside the old
        // certificate, which the next start detects (keys do not match) and re-orders, rather
        // than a certificate whose key was never written.
        write_private(&dir.join(KEY_FILE), key_pem)?;
        write_private(&dir.join(CERT_FILE), chain_pem)
    }
}

/// Challenge answers of one attempt; withdrawn from the store on drop.
struct Published {
    challenges: Arc<Challenges>,
    http01: Vec<String>,
    tls_alpn01: Vec<String>,
}

impl Published {
    fn http01(&mut self, token: &str, key_authorization: &str) {
        self.challenges.set_http01(token, key_authorization);
        self.http01.push(token.to_owned());
    }

    fn tls_alpn01(&mut self, domain: &str, key: Arc<CertifiedKey>) {
        self.challenges.set_tls_alpn01(domain, key);
        self.tls_alpn01.push(domain.to_owned());
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        for token in &self.http01 {
            self.challenges.remove_http01(token);
        }
        for domain in &self.tls_alpn01 {
            self.challenges.remove_tls_alpn01(domain);
        }
    }
}

/// Why an order ended up `status` instead of ready: the CA's word on each failed challenge.
async fn validation_failure(order: &mut instant_acme::Order, status: OrderStatus) -> String {
    let mut reasons = Vec::new();
    if let Some(problem) = &order.state().error {
        reasons.push(problem.to_string());
    }
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        let domain = authz.identifier().to_string();
        if authz.refresh().await.is_err() {
            continue;
        }
        for challenge in &authz.challenges {
            if let Some(problem) = &challenge.error {
                reasons.push(format!("{domain} ({:?}): {problem}", challenge.r#type));
            }
        }
    }
    if reasons.is_empty() {
        reasons.push("no reason given".to_owned());
    }
    format!("the order is {status:?}: {}", reasons.join("; "))
}

/// The self-signed certificate of RFC 8737: the domain as its only name and the SHA-256 of the
/// key authorization in a critical acmeIdentifier extension.
pub fn tls_alpn01_key(domain: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(vec![domain.to_owned()])
        .map_err(|e| format!("certificate for {domain}: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("signing the TLS-ALPN-01 certificate for {domain}: {e}"))?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // Not `CertifiedKey::from_der`: its key check parses the certificate with webpki, which
    // refuses the critical extension this certificate exists to carry.
    let signing_key = certs::provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("TLS-ALPN-01 key for {domain}: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing_key,
    )))
}

/// The HTTPS client towards the ACME server, trusting the roots in `ca` or else the Mozilla
/// roots. Built with an explicit crypto provider, so it does not depend on (or set) the
/// process-wide default.
fn http_client(ca: Option<&Path>) -> anyhow::Result<AcmeHttp> {
    let roots = match ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "acme ca {}: cannot read PEM certificates: {e}; point `ca` at the ACME \
                         server's root certificate in PEM, or remove it to trust the usual roots",
                        path.display()
                    )
                })?;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    anyhow::anyhow!(
                        "acme ca {}: not a usable root certificate: {e}",
                        path.display()
                    )
                })?;
            }
            if roots.is_empty() {
                anyhow::bail!(
                    "acme ca {}: no certificate in it; it should hold the ACME server's root \
                     certificate in PEM",
                    path.display()
                );
            }
            roots
        }
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(certs::provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(tcp);
    Ok(AcmeHttp(
        // No idle connections kept: an order is a dozen requests every two months, and a
        // kept connection that the CA closes just as it is reused fails a request for nothing.
        HyperClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector),
    ))
}

/// Reads a chain and key pair as stored, checking that they belong together.
fn load_pair(cert_path: &Path, key_path: &Path) -> Result<Issued, String> {
    let (loaded, chain_pem) =
        certs::read_files(cert_path, key_path).map_err(|e| format!("{e:#}"))?;
    issued(loaded, chain_pem)
}

/// A chain and key as the CA and rcgen give them.
fn parse_pair(chain_pem: &[u8], key_pem: &[u8]) -> Result<Issued, String> {
    let loaded = certs::load_pem(chain_pem, key_pem).map_err(|e| format!("{e:#}"))?;
    issued(loaded, chain_pem.to_vec())
}

/// Adds what scheduling needs to a loaded pair: its notBefore as well as its notAfter.
fn issued(loaded: certs::Loaded, chain_pem: Vec<u8>) -> Result<Issued, String> {
    let leaf = certs::describe(&loaded.key.cert[0])
        .map_err(|e| format!("the leaf certificate: {e:#}"))?;
    let time = |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    Ok(Issued {
        key: loaded.key,
        chain_pem,
        validity: (time(leaf.not_before), time(leaf.not_after)),
        names: loaded.names,
    })
}

/// Whether a certificate for `names` is one for `domains` (order and case aside).
fn same_names(names: &[String], domains: &[String]) -> bool {
    let set = |list: &[String]| {
        list.iter()
            .map(|n| n.to_ascii_lowercase())
            .collect::<std::collections::BTreeSet<_>>()
    };
    set(names) == set(domains)
}

/// Serializes the read-modify-write of the account file among managers in this process.
static ACCOUNT_FILE_LOCK: Mutex<()> = Mutex::new(());

/// `account.json`: directory URL → the account's credentials.
type AccountFile = BTreeMap<String, serde_json::Value>;

fn read_account_file(path: &Path) -> Result<AccountFile, String> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{} is not an account file ({e}); move it away to have a new account created",
                path.display()
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(AccountFile::new()),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

fn read_account(path: &Path, directory: &str) -> Result<Option<AccountCredentials>, String> {
    let _lock = ACCOUNT_FILE_LOCK.lock().unwrap();
    let Some(value) = read_account_file(path)?.remove(directory) else {
        return Ok(None);
    };
    serde_json::from_value(value).map(Some).map_err(|e| {
        format!(
            "{}: the account for {directory} is unreadable ({e}); remove its entry to have a new \
             account created",
            path.display()
        )
    })
}

fn write_account(
    state_dir: &Path,
    directory: &str,
    credentials: &AccountCredentials,
) -> Result<(), String> {
    let _lock = ACCOUNT_FILE_LOCK.lock().unwrap();
    private_dir(state_dir)?;
    let path = state_dir.join(ACCOUNT_FILE);
    let mut accounts = read_account_file(&path)?;
    let value =
        serde_json::to_value(credentials).map_err(|e| format!("serializing the account: {e}"))?;
    accounts.insert(directory.to_owned(), value);
    let mut text = serde_json::to_vec_pretty(&accounts)
        .map_err(|e| format!("serializing the accounts: {e}"))?;
    text.push(b'\n');
    write_private(&path, &text)
}

/// Creates `dir` if needed and makes it 0700: it holds private keys.
fn private_dir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("making {} private (0700): {e}", dir.display()))
}

/// Writes `bytes` to `path` with mode 0600 through a temporary file renamed over it, synced
/// before and after the rename.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // `mode` applies only to a file that did not exist: a stale temporary file keeps its own.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("writing {}: {e}", path.display())
    })
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
        // Due at day 160; failed at day 170 for the third time: 4 minutes later.
        let failed = Some((at(170), 3));
        assert_eq!(
            next_attempt(
                validity,
                DEFAULT_RENEW_BEFORE,
                failed,
                DEFAULT_RETRY_MIN,
                DEFAULT_RETRY_MAX
            ),
            at(170) + Duration::from_secs(240)
        );
        // A forced renewal failed on day 120: the schedule stays at day 160.
        let failed = Some((at(120), 1));
        assert_eq!(
            next_attempt(
                validity,
                DEFAULT_RENEW_BEFORE,
                failed,
                DEFAULT_RETRY_MIN,
                DEFAULT_RETRY_MAX
            ),
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

    #[test]
    fn a_bad_ca_file_is_named() {
        let missing = Path::new("/nonexistent/xlb-acme-ca.pem");
        let err = http_client(Some(missing)).err().unwrap().to_string();
        assert!(
            err.contains("/nonexistent/xlb-acme-ca.pem: cannot read PEM certificates"),
            "{err}"
        );
        let empty = std::env::temp_dir().join(format!("xlb-acme-ca-{}.pem", std::process::id()));
        fs::write(&empty, "not a certificate\n").unwrap();
        let err = http_client(Some(&empty)).err().unwrap().to_string();
        fs::remove_file(&empty).unwrap();
        assert!(err.contains("no certificate in it"), "{err}");
        assert!(http_client(None).is_ok());
    }

    #[test]
    fn stored_files_are_private_and_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("xlb-acme-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let sub = dir.join("svc");
        private_dir(&sub).unwrap();
        let file = sub.join("key.pem");
        write_private(&file, b"one").unwrap();
        write_private(&file, b"two").unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"two");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&sub), 0o700);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(&sub).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_alpn01_certificate_carries_the_digest_in_a_critical_extension() {
        let digest = [7u8; 32];
        let key = tls_alpn01_key("www.example.com", &digest).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&key.cert[0]).unwrap();
        // id-pe-acmeIdentifier, RFC 8737 §6.1.
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // An OCTET STRING of the 32-byte digest.
        assert_eq!(ext.value, [&[0x04, 32][..], &digest].concat());
        let names = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", names.value.general_names),
            "[DNSName(\"www.example.com\")]"
        );
    }

    #[test]
    fn a_stored_pair_that_does_not_fit_is_refused() {
        let a = rcgen::generate_simple_self_signed(vec!["a.example".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.example".into()]).unwrap();
        let issued = parse_pair(
            a.cert.pem().as_bytes(),
            a.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        assert!(issued.validity.0 < issued.validity.1);
        assert_eq!(issued.names, ["a.example"]);
        assert!(same_names(&issued.names, &["A.example".into()]));
        assert!(!same_names(
            &issued.names,
            &["a.example".into(), "b.example".into()]
        ));
        let err = parse_pair(
            a.cert.pem().as_bytes(),
            b.signing_key.serialize_pem().as_bytes(),
        )
        .err()
        .unwrap();
        assert!(err.contains("do not fit together"), "{err}");
    }
}

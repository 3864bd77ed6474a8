//! The manager task of one service: the renewal schedule, and each attempt from the account to
//! the stored certificate (order, challenges, validation, finalization).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use super::{
    AcmeSettings, AttemptError, ChallengeKind, ManagerHandle, OnCert, Shared, Step,
    challenge::{Published, tls_alpn01_key},
    client::{AcmeHttp, http_client},
    fail, failed, next_attempt,
    store::{Issued, load_pair, parse_pair, read_account, same_names, write_account, write_pair},
};
use crate::challenges::Challenges;

/// How long to poll for the CA's validation of the challenges and for the certificate.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest single sleep; the schedule is checked again after it, so a suspended machine
/// or a clock step cannot push a renewal far past its time.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

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

    /// When to attempt next, from what the manager holds; a certificate for other names counts
    /// as none.
    fn next_attempt(&self) -> SystemTime {
        next_attempt(
            self.validity.filter(|_| !self.names_changed),
            self.settings.renew_before,
            self.last_failure,
            self.settings.retry_min,
            self.settings.retry_max,
        )
    }

    async fn run(mut self) {
        loop {
            let next = self.next_attempt();
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
                    let retry = self.next_attempt();
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
                    .map_err(fail(Step::Order))?
            }
            Err(e) => return Err(fail(Step::Order)(e)),
        };

        // Withdrawn when this attempt ends, whichever way.
        let mut published = Published::new(self.challenges.clone());
        let kind = self.settings.challenge;
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(fail(Step::Order))?;
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
            let mut challenge = authz.challenge(challenge_type(kind)).ok_or_else(|| AttemptError {
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
                        .map_err(failed(Step::Challenge))?;
                    published.tls_alpn01(&domain, key);
                }
            }
            challenge
                .set_ready()
                .await
                .map_err(fail(Step::Validation))?;
        }

        let polling = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(VALIDATION_TIMEOUT);
        let status = order
            .poll_ready(&polling)
            .await
            .map_err(fail(Step::Validation))?;
        if status != OrderStatus::Ready {
            return Err(AttemptError {
                step: Step::Validation,
                message: validation_failure(&mut order, status).await,
            });
        }
        drop(published);

        let key = rcgen::KeyPair::generate().map_err(fail(Step::Finalize))?;
        let mut params = rcgen::CertificateParams::new(self.settings.domains.clone())
            .map_err(fail(Step::Finalize))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(fail(Step::Finalize))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(fail(Step::Finalize))?;
        let chain_pem = order
            .poll_certificate(&polling)
            .await
            .map_err(fail(Step::Certificate))?;
        let key_pem = key.serialize_pem();
        let issued = parse_pair(chain_pem.as_bytes(), key_pem.as_bytes()).map_err(failed(Step::Certificate))?;
        write_pair(&self.settings, chain_pem.as_bytes(), key_pem.as_bytes())
            .map_err(failed(Step::Store))?;
        Ok(issued)
    }

    /// The account for the directory: the one held, the stored one, or a new one (stored at
    /// once). `fresh` skips the first two.
    async fn account(&mut self, fresh: bool) -> Result<Account, AttemptError> {
        if !fresh {
            if let Some(account) = &self.account {
                return Ok(account.clone());
            }
            if let Some(credentials) =
                read_account(&self.settings.account_path(), &self.settings.directory)
                    .map_err(failed(Step::Account))?
            {
                let account = Account::builder_with_http(Box::new(self.http.clone()))
                    .from_credentials(credentials)
                    .await
                    .map_err(fail(Step::Account))?;
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
            .map_err(fail(Step::Account))?;
        write_account(
            &self.settings.state_dir,
            &self.settings.directory,
            &credentials,
        )
        .map_err(failed(Step::Account))?;
        info!(
            service = self.settings.service,
            account = account.id(),
            "acme: created an account at {}",
            self.settings.directory
        );
        self.account = Some(account.clone());
        Ok(account)
    }
}

fn challenge_type(kind: ChallengeKind) -> ChallengeType {
    match kind {
        ChallengeKind::Http01 => ChallengeType::Http01,
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
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

//! Alerts: e-mail (SMTP) and webhook messages when a backend goes down or comes back, when every
//! backend of a service is down (and when one is back), and when a certificate renewal fails
//! (and when one succeeds again).
//!
//! Any part of the daemon calls `Alerts::notify(Event)`; it never blocks. One task decides what
//! is sent, in order:
//! - **deduplicated**: a failure is sent once, however often it is reported, until its recovery;
//!   a recovery is sent only after its failure was. So every failure message is followed by
//!   one recovery message once the thing is well again, and nothing else is.
//! - **rate-limited** per channel: at most `max_per_minute` messages in any minute; what comes
//!   beyond that is held and sent as one summary message as soon as the minute allows, so
//!   nothing is lost and the order stays (a recovery never arrives before its failure).
//!
//! Each channel delivers its messages one at a time in order, retrying a failed delivery twice
//! before logging it as lost.
use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use lettre::{
    AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor,
    message::{Mailbox, header::ContentType},
    transport::smtp::{
        authentication::Credentials,
        client::{Certificate, Tls, TlsParameters},
    },
};
use serde_json::json;
use tokio::{
    net::TcpStream,
    sync::mpsc,
    time::{Instant, sleep_until},
};
use tracing::{error, info, warn};

use crate::config::{AlertsConfig, EmailConfig, SmtpTls, WebhookConfig};

/// Something worth telling a person about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A backend's health checks failed `fall` times in a row: no new connections go to it.
    BackendDown { service: String, backend: SocketAddr, reason: String },
    /// A backend that was reported down passes its health checks again.
    BackendUp { service: String, backend: SocketAddr },
    /// No backend of the service takes new connections (each is down or drained).
    ServiceDown { service: String },
    /// A service reported down has a backend that takes connections again.
    ServiceUp { service: String },
    /// Renewing the certificate of `domain` failed.
    CertificateRenewalFailed { domain: String, error: String },
    /// A certificate whose renewal had failed was renewed.
    CertificateRenewed { domain: String },
}

impl Event {
    /// What the event is about: a failure and its recovery have the same subject.
    fn subject(&self) -> String {
        match self {
            Event::BackendDown { service, backend, .. } | Event::BackendUp { service, backend } => {
                format!("backend {backend} of service {service}")
            }
            Event::ServiceDown { service } | Event::ServiceUp { service } => format!("service {service}"),
            Event::CertificateRenewalFailed { domain, .. } | Event::CertificateRenewed { domain } => {
                format!("certificate for {domain}")
            }
        }
    }

    /// A failure (rather than a recovery).
    fn failing(&self) -> bool {
        matches!(self, Event::BackendDown { .. } | Event::ServiceDown { .. } | Event::CertificateRenewalFailed { .. })
    }

    /// Its name in webhook JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Event::BackendDown { .. } => "backend_down",
            Event::BackendUp { .. } => "backend_recovered",
            Event::ServiceDown { .. } => "service_down",
            Event::ServiceUp { .. } => "service_recovered",
            Event::CertificateRenewalFailed { .. } => "certificate_renewal_failed",
            Event::CertificateRenewed { .. } => "certificate_renewed",
        }
    }

    /// One line for a person.
    fn text(&self) -> String {
        match self {
            Event::BackendDown { service, backend, reason } => {
                format!("DOWN: backend {backend} of service {service} fails its health checks ({reason}); no new connections go to it")
            }
            Event::BackendUp { service, backend } => {
                format!("RECOVERED: backend {backend} of service {service} passes its health checks again")
            }
            Event::ServiceDown { service } => {
                format!("DOWN: service {service} has no backend up; new connections to it wait (SYNs are dropped)")
            }
            Event::ServiceUp { service } => format!("RECOVERED: service {service} has a backend up again"),
            Event::CertificateRenewalFailed { domain, error } => {
                format!("FAILED: renewing the certificate for {domain}: {error}")
            }
            Event::CertificateRenewed { domain } => format!("RECOVERED: the certificate for {domain} was renewed"),
        }
    }

    fn json(&self, at: SystemTime) -> serde_json::Value {
        let mut v = json!({
            "event": self.name(),
            "state": if self.failing() { "failing" } else { "recovered" },
            "subject": self.subject(),
            "message": self.text(),
            "time": humantime::format_rfc3339_seconds(at).to_string(),
        });
        let fields = match self {
            Event::BackendDown { service, backend, reason } => {
                json!({"service": service, "backend": backend.to_string(), "reason": reason})
            }
            Event::BackendUp { service, backend } => json!({"service": service, "backend": backend.to_string()}),
            Event::ServiceDown { service } | Event::ServiceUp { service } => json!({"service": service}),
            Event::CertificateRenewalFailed { domain, error } => json!({"domain": domain, "error": error}),
            Event::CertificateRenewed { domain } => json!({"domain": domain}),
        };
        if let (Some(v), serde_json::Value::Object(fields)) = (v.as_object_mut(), fields) {
            v.extend(fields);
        }
        v
    }
}

/// The handle the daemon's parts notify. Cheap to clone; every clone feeds the same task.
#[derive(Clone, Debug)]
pub struct Alerts {
    tx: mpsc::UnboundedSender<Command>,
}

#[derive(Debug)]
enum Command {
    Event(Event),
    Known(Event),
    Configure(Box<Option<AlertsConfig>>),
}

impl Alerts {
    /// Starts the alerting task on the current tokio runtime. `None`: nothing is sent until a
    /// config with `[alerts]` is applied (`configure`).
    pub fn start(config: Option<AlertsConfig>) -> Alerts {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, config));
        Alerts { tx }
    }

    /// Reports an event; it is sent (or not: see the module doc) in the background.
    pub fn notify(&self, event: Event) {
        let _ = self.tx.send(Command::Event(event));
    }

    /// Records a failure as already reported, without sending it: what a restarted daemon finds
    /// failing was reported by the daemon before it, and its recovery must still be sent.
    pub fn known_failing(&self, event: Event) {
        let _ = self.tx.send(Command::Known(event));
    }

    /// Applies the `[alerts]` of a new config (after a reload). What was reported failing stays
    /// so, and its recovery is sent on the new channels.
    pub fn configure(&self, config: Option<AlertsConfig>) {
        let _ = self.tx.send(Command::Configure(Box::new(config)));
    }
}

/// One message: one event, or the summary of several held back by the rate limit.
#[derive(Clone, Debug)]
struct Message {
    events: Vec<(Event, SystemTime)>,
}

impl Message {
    fn subject(&self, host: &str) -> String {
        match &self.events[..] {
            [(event, _)] => format!("[xlb {host}] {}", headline(event)),
            events => {
                let failing = events.iter().filter(|(e, _)| e.failing()).count();
                format!(
                    "[xlb {host}] {} alerts: {failing} failing, {} recovered",
                    events.len(),
                    events.len() - failing
                )
            }
        }
    }

    fn body(&self, host: &str, max_per_minute: u32) -> String {
        let mut body = String::new();
        if self.events.len() > 1 {
            body += &format!(
                "More alerts came within a minute than alerts.max_per_minute ({max_per_minute}) lets through, so these \
                 were held back and are sent together, in order:\n\n"
            );
        }
        for (event, at) in &self.events {
            body += &format!("{}  {}\n", humantime::format_rfc3339_seconds(*at), event.text());
        }
        body += &format!("\n-- xlb on {host}\n");
        body
    }

    fn json(&self, host: &str) -> serde_json::Value {
        json!({
            "source": "xlb",
            "host": host,
            "held_back": self.events.len() > 1,
            "events": self.events.iter().map(|(e, at)| e.json(*at)).collect::<Vec<_>>(),
        })
    }
}

fn headline(event: &Event) -> String {
    match event {
        Event::BackendDown { service, backend, .. } => format!("DOWN: {service} backend {backend}"),
        Event::BackendUp { service, backend } => format!("RECOVERED: {service} backend {backend}"),
        Event::ServiceDown { service } => format!("DOWN: service {service} has no backend up"),
        Event::ServiceUp { service } => format!("RECOVERED: service {service}"),
        Event::CertificateRenewalFailed { domain, .. } => format!("FAILED: certificate renewal for {domain}"),
        Event::CertificateRenewed { domain } => format!("RECOVERED: certificate for {domain} renewed"),
    }
}

/// Sends a failure once and its recovery once, after it.
#[derive(Debug, Default)]
struct Dedup {
    failing: HashMap<String, bool>,
}

impl Dedup {
    fn admit(&mut self, event: &Event) -> bool {
        let failing = self.failing.entry(event.subject()).or_insert(false);
        if *failing == event.failing() {
            return false;
        }
        *failing = event.failing();
        true
    }
}

const WINDOW: Duration = Duration::from_secs(60);

/// At most `max` messages per `WINDOW`; the rest waits, to go out as one message.
#[derive(Debug)]
struct Limiter {
    max: usize,
    sent: VecDeque<Instant>,
    held: Vec<(Event, SystemTime)>,
}

impl Limiter {
    fn new(max: u32) -> Limiter {
        Limiter { max: max.max(1) as usize, sent: VecDeque::new(), held: Vec::new() }
    }

    fn prune(&mut self, now: Instant) {
        while self.sent.front().is_some_and(|&t| now.duration_since(t) >= WINDOW) {
            self.sent.pop_front();
        }
    }

    /// The message to send now for `event`, if the limit allows one; else it is held.
    fn offer(&mut self, event: Event, at: SystemTime, now: Instant) -> Option<Message> {
        self.prune(now);
        // Behind what is already held, so that the order stays.
        if !self.held.is_empty() || self.sent.len() >= self.max {
            self.held.push((event, at));
            return None;
        }
        self.sent.push_back(now);
        Some(Message { events: vec![(event, at)] })
    }

    /// When the held events can go out.
    fn flush_at(&self) -> Option<Instant> {
        if self.held.is_empty() {
            return None;
        }
        Some(if self.sent.len() < self.max { Instant::now() } else { self.sent[self.sent.len() - self.max] + WINDOW })
    }

    /// Everything held, as one message, if the limit allows one now.
    fn flush(&mut self, now: Instant) -> Option<Message> {
        self.prune(now);
        if self.held.is_empty() || self.sent.len() >= self.max {
            return None;
        }
        self.sent.push_back(now);
        Some(Message { events: std::mem::take(&mut self.held) })
    }
}

/// A destination: its rate limit and the worker delivering to it in order.
struct Channel {
    limiter: Limiter,
    worker: mpsc::UnboundedSender<Message>,
}

fn channels(config: Option<&AlertsConfig>) -> Vec<Channel> {
    let Some(config) = config else { return Vec::new() };
    let host = host_name();
    let mut out = Vec::new();
    if let Some(email) = &config.email {
        match Email::new(email, &host, config.max_per_minute) {
            Ok(sink) => out.push(channel(config.max_per_minute, Sink::Email(Box::new(sink)))),
            Err(e) => error!("alerts: e-mail alerts are off: {e:#}"),
        }
    }
    if let Some(webhook) = &config.webhook {
        match Webhook::new(webhook, &host) {
            Ok(sink) => out.push(channel(config.max_per_minute, Sink::Webhook(Box::new(sink)))),
            Err(e) => error!("alerts: webhook alerts are off: {e:#}"),
        }
    }
    out
}

fn channel(max_per_minute: u32, sink: Sink) -> Channel {
    let (worker, mut rx) = mpsc::unbounded_channel::<Message>();
    tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            sink.deliver(&message).await;
        }
    });
    Channel { limiter: Limiter::new(max_per_minute), worker }
}

async fn run(mut rx: mpsc::UnboundedReceiver<Command>, config: Option<AlertsConfig>) {
    let mut dedup = Dedup::default();
    let mut chans = channels(config.as_ref());
    loop {
        let flush_at = chans.iter().filter_map(|c| c.limiter.flush_at()).min();
        tokio::select! {
            command = rx.recv() => match command {
                None => break,
                Some(Command::Configure(config)) => chans = channels(config.as_ref().as_ref()),
                Some(Command::Known(event)) => {
                    if event.failing() {
                        dedup.admit(&event);
                    }
                }
                Some(Command::Event(event)) => {
                    if !dedup.admit(&event) {
                        continue;
                    }
                    info!(event = event.name(), "alert: {}", event.text());
                    let (at, now) = (SystemTime::now(), Instant::now());
                    for c in &mut chans {
                        if let Some(message) = c.limiter.offer(event.clone(), at, now) {
                            let _ = c.worker.send(message);
                        }
                    }
                }
            },
            () = sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                let now = Instant::now();
                for c in &mut chans {
                    if let Some(message) = c.limiter.flush(now) {
                        let _ = c.worker.send(message);
                    }
                }
            }
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "localhost".into())
}

enum Sink {
    Email(Box<Email>),
    Webhook(Box<Webhook>),
}

impl Sink {
    /// Tries three times (now, after 2 s, after 10 s more), then logs the message as lost.
    async fn deliver(&self, message: &Message) {
        let what = match self {
            Sink::Email(_) => "e-mail",
            Sink::Webhook(_) => "webhook",
        };
        for (attempt, pause) in [(1, 2), (2, 10), (3, 0)] {
            let sent = match self {
                Sink::Email(e) => e.send(message).await,
                Sink::Webhook(w) => w.send(message).await,
            };
            match sent {
                Ok(()) => return,
                Err(e) if pause > 0 => {
                    warn!("alerts: {what} delivery failed (attempt {attempt} of 3, next in {pause} s): {e:#}");
                    tokio::time::sleep(Duration::from_secs(pause)).await;
                }
                Err(e) => error!(
                    "alerts: {what} alert lost after 3 attempts: {e:#}; it said: {}",
                    message.events.iter().map(|(e, _)| e.text()).collect::<Vec<_>>().join(" / ")
                ),
            }
        }
    }
}

struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
    host: String,
    max_per_minute: u32,
}

impl Email {
    fn new(config: &EmailConfig, host: &str, max_per_minute: u32) -> anyhow::Result<Email> {
        let EmailConfig { host: server, port, tls, from, to, credentials, timeout, ca_file: _, ca_pem } = config;
        let parameters = || -> anyhow::Result<TlsParameters> {
            let mut parameters = TlsParameters::builder(server.clone());
            if let Some(pem) = ca_pem {
                parameters = parameters.add_root_certificate(Certificate::from_pem(pem).context("alerts.email.ca_file")?);
            }
            Ok(parameters.build_rustls()?)
        };
        let builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(server);
        let builder = match tls {
            SmtpTls::StartTls => builder.tls(Tls::Required(parameters()?)),
            SmtpTls::Tls => builder.tls(Tls::Wrapper(parameters()?)),
            SmtpTls::None => builder,
        };
        let mut builder = builder.port(*port).timeout(Some(*timeout));
        if let Some(c) = credentials {
            builder = builder.credentials(Credentials::new(c.username.clone(), c.password.0.clone()));
        }
        Ok(Email {
            transport: builder.build(),
            from: from.parse().context("alerts.email.from")?,
            to: to.iter().map(|t| t.parse()).collect::<Result<_, _>>().context("alerts.email.to")?,
            host: host.to_owned(),
            max_per_minute,
        })
    }

    async fn send(&self, message: &Message) -> anyhow::Result<()> {
        let mut builder = lettre::Message::builder().from(self.from.clone()).subject(message.subject(&self.host));
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        let mail = builder.header(ContentType::TEXT_PLAIN).body(message.body(&self.host, self.max_per_minute))?;
        // lettre's message already names its causes; a chain would repeat them.
        self.transport.send(mail).await.map_err(|e| anyhow!("sending over SMTP: {e}"))?;
        Ok(())
    }
}

struct Webhook {
    uri: hyper::Uri,
    tls: Option<tokio_rustls::TlsConnector>,
    timeout: Duration,
    host: String,
}

impl Webhook {
    fn new(config: &WebhookConfig, host: &str) -> anyhow::Result<Webhook> {
        let uri: hyper::Uri = config.url.parse().context("alerts.webhook.url")?;
        let tls = (uri.scheme_str() == Some("https")).then(|| -> anyhow::Result<_> {
            let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            if let Some(pem) = &config.ca_pem {
                use rustls::pki_types::{CertificateDer, pem::PemObject as _};
                for cert in CertificateDer::pem_slice_iter(pem) {
                    roots.add(cert.context("alerts.webhook.ca_file")?).context("alerts.webhook.ca_file")?;
                }
            }
            let provider = Arc::new(crate::certs::provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
        });
        Ok(Webhook { uri, tls: tls.transpose()?, timeout: config.timeout, host: host.to_owned() })
    }

    async fn send(&self, message: &Message) -> anyhow::Result<()> {
        let body = serde_json::to_vec(&message.json(&self.host))?;
        tokio::time::timeout(self.timeout, self.post(body))
            .await
            .map_err(|_| anyhow!("no answer within {}", humantime::format_duration(self.timeout)))?
    }

    async fn post(&self, body: Vec<u8>) -> anyhow::Result<()> {
        let host = self.uri.host().context("URL without host")?;
        let port = self.uri.port_u16().unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        let authority = self.uri.authority().map_or(host, |a| a.as_str()).to_owned();
        let request = Request::post(self.uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, concat!("xlb/", env!("CARGO_PKG_VERSION")))
            .header(header::CONNECTION, "close")
            .body(Full::new(Bytes::from(body)))?;
        let status = match &self.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())
                    .with_context(|| format!("{host} is not a TLS server name"))?;
                let stream = tls.connect(name, tcp).await.context("TLS handshake")?;
                exchange(TokioIo::new(stream), request).await?
            }
            None => exchange(TokioIo::new(tcp), request).await?,
        };
        if !status.is_success() {
            bail!("the webhook answered {status}");
        }
        Ok(())
    }
}

async fn exchange<T>(io: T, request: Request<Full<Bytes>>) -> anyhow::Result<hyper::StatusCode>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let exchange = async {
        let response = sender.send_request(request).await?;
        let status = response.status();
        // Read (and bound) the answer so the connection ends cleanly.
        let _ = http_body_util::Limited::new(response.into_body(), 64 * 1024).collect().await;
        anyhow::Ok(status)
    };
    let (status, _) = tokio::join!(exchange, conn);
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down(n: u16) -> Event {
        Event::BackendDown { service: "web".into(), backend: SocketAddr::from(([10, 0, 0, 1], n)), reason: "HTTP 503".into() }
    }

    fn up(n: u16) -> Event {
        Event::BackendUp { service: "web".into(), backend: SocketAddr::from(([10, 0, 0, 1], n)) }
    }

    #[test]
    fn failures_and_recoveries_are_sent_once_each_in_turn() {
        let mut d = Dedup::default();
        let admitted: Vec<bool> = [up(1), down(1), down(1), down(2), up(1), up(1), down(1), up(2)].iter().map(|e| d.admit(e)).collect();
        assert_eq!(admitted, [false, true, false, true, true, false, true, true]);
        let cert = Event::CertificateRenewalFailed { domain: "example.com".into(), error: "x".into() };
        assert!(d.admit(&cert) && !d.admit(&cert));
        assert!(d.admit(&Event::CertificateRenewed { domain: "example.com".into() }));
    }

    #[test]
    fn the_rate_limit_holds_back_and_summarises_in_order() {
        let mut l = Limiter::new(2);
        let at = SystemTime::UNIX_EPOCH;
        let t0 = Instant::now();
        assert!(l.offer(down(1), at, t0).is_some());
        assert!(l.offer(down(2), at, t0).is_some());
        assert!(l.offer(down(3), at, t0).is_none());
        assert!(l.offer(up(1), at, t0).is_none());
        assert_eq!(l.flush_at(), Some(t0 + WINDOW));
        assert!(l.flush(t0 + Duration::from_secs(59)).is_none());
        let summary = l.flush(t0 + WINDOW).expect("a slot is free after a minute");
        assert_eq!(summary.events.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>(), [down(3), up(1)]);
        assert_eq!(summary.subject("h"), "[xlb h] 2 alerts: 1 failing, 1 recovered");
        assert!(summary.body("h", 2).contains("alerts.max_per_minute (2)"), "{}", summary.body("h", 2));
        // The summary took one of the freed slots; the next event takes the other.
        assert!(l.offer(up(2), at, t0 + WINDOW).is_some());
        assert!(l.offer(up(3), at, t0 + WINDOW).is_none());
        assert_eq!(l.flush_at(), Some(t0 + 2 * WINDOW));
    }

    #[test]
    fn messages_name_what_happened() {
        let m = Message { events: vec![(down(1), SystemTime::UNIX_EPOCH)] };
        assert_eq!(m.subject("vps1"), "[xlb vps1] DOWN: web backend 10.0.0.1:1");
        let body = m.body("vps1", 10);
        assert!(body.starts_with("1970-01-01T00:00:00Z  DOWN: backend 10.0.0.1:1 of service web fails its health checks (HTTP 503)"), "{body}");
        let json = m.json("vps1");
        assert_eq!(json["events"][0]["event"], "backend_down");
        assert_eq!(json["events"][0]["state"], "failing");
        assert_eq!(json["events"][0]["backend"], "10.0.0.1:1");
        assert_eq!(json["events"][0]["reason"], "HTTP 503");
        assert_eq!(json["held_back"], false);
    }
}

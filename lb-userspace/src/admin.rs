//! The admin HTTP API. It has no authentication, so the config only lets it listen on loopback.
//!
//! `GET /api/status` serves the status as JSON (read by `xlb status`), `GET /metrics` the same
//! snapshot as OpenMetrics text, `GET /status` a summary in nginx's `stub_status` layout. Each
//! takes a fresh snapshot per request; nothing is cached. `POST
//! /api/services/{name}/backends/{address}/drain` and `/undrain` (used by `xlb drain` and
//! `xlb undrain`) change a backend's drain flag and answer once the data path has it. `POST
//! /api/reload` (used by `xlb reload`) reads the config file again and applies it, or answers
//! why not. `POST /api/acme/renew?service=NAME` (used by `xlb renew`) has the service's ACME
//! manager order a new certificate now.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};

use crate::status::{BackendState, DrainResult, ReloadResult, RenewResult, Status, render_stub_status};

/// Where the daemon's live state comes from, and what changes it; called once per request,
/// off the async runtime (it may read and write BPF maps).
pub trait StatusSource: Send + Sync + 'static {
    fn status(&self) -> anyhow::Result<Status>;

    /// Sets (`drained`) or clears the drain flag of `backend` of `service`, writing the
    /// resulting state into the data path before returning.
    fn set_drained(
        &self,
        service: &str,
        backend: SocketAddr,
        drained: bool,
    ) -> Result<DrainResult, ControlError>;

    /// Reads the daemon's config file again and applies it; on any error the running config
    /// stays.
    fn reload(&self) -> Result<ReloadResult, ControlError>;

    /// Has the ACME manager of `service` order a new certificate now, whatever the current
    /// one's expiry; returns once asked, the order runs in the background.
    fn renew(&self, service: &str) -> Result<RenewResult, ControlError>;
}

/// Why a drain or undrain request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no service {name:?}; the services are: {}", known.join(", "))]
    UnknownService { name: String, known: Vec<String> },
    #[error("service {service:?} has no backend {backend}; its backends are: {}", known.join(", "))]
    UnknownBackend {
        service: String,
        backend: SocketAddr,
        known: Vec<String>,
    },
    /// A new config that is invalid or cannot be applied while running; the message says why.
    #[error("{0}")]
    Rejected(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// A client that opens a connection and sends nothing must not hold it forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in progress.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Far above any real status (64 services × 16 backends), small enough to not be a hazard.
const MAX_CLIENT_BODY: usize = 16 << 20;
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";
const INDEX: &str = "xlb admin API\n\n\
GET  /api/status  status of services, backends and the data path (JSON)\n\
GET  /metrics     the same as Prometheus/OpenMetrics text\n\
GET  /status      connection totals in nginx stub_status format\n\
POST /api/services/{name}/backends/{address}/drain    no new connections to the backend;\n\
                                                      open ones continue\n\
POST /api/services/{name}/backends/{address}/undrain  new connections again\n\
     ({address} is ip:port as configured; percent-encode [ ] of IPv6 addresses)\n\
POST /api/reload  read the config file again and apply it (422 and the reason when it is\n\
                  invalid; the running config then stays)\n\
POST /api/acme/renew?service={name}  order a new ACME certificate for the service now;\n\
                  the order runs in the background (see acme.attempts in /api/status)\n";

/// Serves until `shutdown` becomes true (or its sender is dropped), then lets requests in
/// progress finish for up to 5 s.
pub async fn serve(
    listener: TcpListener,
    source: Arc<dyn StatusSource>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, source.clone(), shutdown.clone()));
                }
                Err(e) => {
                    // Typically EMFILE: back off rather than spin while descriptors are short.
                    tracing::warn!("admin API: accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "admin API: {} connection(s) still open after {DRAIN_TIMEOUT:?}; closing them",
            connections.len()
        );
    }
    Ok(())
}

/// Resolves once shutdown is requested or can no longer be (the sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // Drop the borrowed value here: it must not be held across an await by the caller.
    let _ = shutdown.wait_for(|&stop| stop).await;
}

/// Serves one admin API connection until the client closes it or shutdown. Any byte stream
/// will do, so the fuzz target (lb-userspace/fuzz/fuzz_targets/admin_request.rs) feeds it
/// arbitrary requests.
pub async fn connection<S>(stream: S, source: Arc<dyn StatusSource>, mut shutdown: watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let source = source.clone();
        async move { Ok::<_, Infallible>(route(&request, source).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stopped(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!("admin API connection: {e}");
    }
}

async fn route(
    request: &Request<Incoming>,
    source: Arc<dyn StatusSource>,
) -> Response<Full<Bytes>> {
    let (method, path) = (request.method(), request.uri().path());
    if let Some(rest) = path.strip_prefix("/api/services/") {
        return control(request, rest, source).await;
    }
    if path == "/api/reload" {
        return reload_route(request, source).await;
    }
    if path == "/api/acme/renew" {
        return renew_route(request, source).await;
    }
    if !matches!(path, "/" | "/api/status" | "/metrics" | "/status") {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no route {method} {path}; try /api/status or /metrics (GET / lists every route)"
            ),
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} not allowed on {path}; use GET"),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    if path == "/" {
        return respond(StatusCode::OK, TEXT, INDEX);
    }
    let status = match tokio::task::spawn_blocking(move || source.status()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the status: {e:#}"),
            );
        }
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the status failed: {e}"),
            );
        }
    };
    let encoded = match path {
        "/metrics" => encode_metrics(&status)
            .map(|text| (OPENMETRICS, text.into_bytes()))
            .map_err(|e| e.to_string()),
        "/status" => Ok((TEXT, render_stub_status(&status).into_bytes())),
        _ => serde_json::to_vec(&status)
            .map(|json| (JSON, json))
            .map_err(|e| e.to_string()),
    };
    match encoded {
        Ok((content_type, body)) => respond(StatusCode::OK, content_type, body),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the status: {e}"),
        ),
    }
}

/// `POST /api/services/{name}/backends/{address}/drain` and `/undrain`; `rest` is the path after
/// `/api/services/`.
async fn control(
    request: &Request<Incoming>,
    rest: &str,
    source: Arc<dyn StatusSource>,
) -> Response<Full<Bytes>> {
    let (method, path) = (request.method(), request.uri().path());
    let segments: Vec<&str> = rest.split('/').collect();
    let [service, "backends", backend, action @ ("drain" | "undrain")] = segments[..] else {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no route {method} {path}; backends are drained with POST \
                 /api/services/{{name}}/backends/{{address}}/drain (and /undrain)"
            ),
        );
    };
    if let Some(refused) = refuse_control(request) {
        return refused;
    }
    let (Some(service), Some(backend)) = (percent_decode(service), percent_decode(backend)) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{path}: bad percent-encoding"),
        );
    };
    let Ok(address) = backend.parse::<SocketAddr>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{backend:?} is not a backend address: expected ip:port as in the config, \
                 e.g. 203.0.113.10:8001 or [2001:db8::10]:8001"
            ),
        );
    };
    let drained = action == "drain";
    match tokio::task::spawn_blocking(move || source.set_drained(&service, address, drained)).await
    {
        Ok(Ok(result)) => match serde_json::to_vec(&result) {
            Ok(json) => respond(StatusCode::OK, JSON, json),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        Ok(Err(
            e @ (ControlError::UnknownService { .. } | ControlError::UnknownBackend { .. }),
        )) => error(StatusCode::NOT_FOUND, e.to_string()),
        Ok(Err(ControlError::Rejected(e))) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
        Ok(Err(ControlError::Failed(e))) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot {action} {address}: {e:#}"),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{action} of {address} failed: {e}"),
        ),
    }
}

/// Refuses what the control routes refuse: other methods than POST, and requests from web
/// pages.
fn refuse_control(request: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let (method, path) = (request.method(), request.uri().path());
    if method != Method::POST {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} not allowed on {path}; use POST"),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return Some(response);
    }
    // Browsers send Origin with their POSTs, curl and `xlb` do not: a web page the operator
    // happens to open must not control xlb through this unauthenticated API.
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        return Some(error(
            StatusCode::FORBIDDEN,
            format!("{path}: refused, the request comes from a web page (Origin: {origin:?})"),
        ));
    }
    None
}

/// `POST /api/reload`.
async fn reload_route(request: &Request<Incoming>, source: Arc<dyn StatusSource>) -> Response<Full<Bytes>> {
    if let Some(refused) = refuse_control(request) {
        return refused;
    }
    match tokio::task::spawn_blocking(move || source.reload()).await {
        Ok(Ok(result)) => match serde_json::to_vec(&result) {
            Ok(json) => respond(StatusCode::OK, JSON, json),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        Ok(Err(ControlError::Failed(e))) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reload failed, the running config stays: {e:#}"),
        ),
        Ok(Err(e)) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload refused, the running config stays: {e}"),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reload failed: {e}"),
        ),
    }
}

/// `POST /api/acme/renew?service=NAME`.
async fn renew_route(request: &Request<Incoming>, source: Arc<dyn StatusSource>) -> Response<Full<Bytes>> {
    if let Some(refused) = refuse_control(request) {
        return refused;
    }
    let service = request
        .uri()
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("service="))
        .and_then(percent_decode);
    let Some(service) = service.filter(|s| !s.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "name the service whose certificate to renew: POST /api/acme/renew?service=NAME".into(),
        );
    };
    match tokio::task::spawn_blocking(move || source.renew(&service)).await {
        Ok(Ok(result)) => match serde_json::to_vec(&result) {
            Ok(json) => respond(StatusCode::OK, JSON, json),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        Ok(Err(e @ ControlError::UnknownService { .. })) => error(StatusCode::NOT_FOUND, e.to_string()),
        Ok(Err(ControlError::Failed(e))) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Ok(Err(e)) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("renewal request failed: {e}")),
    }
}

/// Decodes `%XX` escapes; `None` for a broken escape or a result that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// Escapes everything but RFC 3986's unreserved characters, so any text is one path segment.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn error(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    respond(
        status,
        JSON,
        serde_json::json!({ "error": message }).to_string(),
    )
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    service: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    service: String,
    backend: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    service: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResponseLabels {
    service: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterfaceLabels {
    interface: String,
    xdp_mode: String,
}

/// `xlb_interface_info{interface,xdp_mode} 1` per interface. An info metric carries its labels
/// itself, so a `Family` (one label set per entry, built by a constructor that cannot see it)
/// does not fit; this collector writes one sample per interface under one descriptor.
#[derive(Debug)]
struct InterfaceInfo(Vec<InterfaceLabels>);

impl Collector for InterfaceInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let help = "Interfaces the XDP program is attached to, and in which mode";
        let mut metric =
            encoder.encode_descriptor("xlb_interface", help, None, MetricType::Info)?;
        self.0
            .iter()
            .try_for_each(|labels| metric.encode_info(labels))
    }
}

/// The OpenMetrics exposition of one status snapshot. A fresh registry per scrape keeps the
/// output exactly in step with the snapshot: backends that left the config leave the metrics.
fn encode_metrics(status: &Status) -> Result<String, std::fmt::Error> {
    let live = Family::<BackendLabels, Gauge>::default();
    let total = Family::<BackendLabels, Counter>::default();
    let failed = Family::<BackendLabels, Counter>::default();
    let up = Family::<StateLabels, Gauge>::default();
    let probe = Family::<BackendLabels, Gauge<f64, AtomicU64>>::default();
    let handshakes = Family::<HandshakeLabels, Counter>::default();
    let responses = Family::<ResponseLabels, Counter>::default();
    let retries = Family::<ServiceLabels, Counter>::default();
    let not_after = Family::<ServiceLabels, Gauge>::default();
    let expires_in = Family::<ServiceLabels, Gauge>::default();
    let acme_failures = Family::<ServiceLabels, Gauge>::default();
    let acme_renewed = Family::<ServiceLabels, Gauge>::default();
    for service in &status.services {
        if let Some(a) = &service.acme {
            let labels = ServiceLabels { service: service.name.clone() };
            acme_failures.get_or_create(&labels).set(i64::from(a.failures));
            let renewed = a.last_renewal.as_deref().and_then(|t| humantime::parse_rfc3339(t).ok());
            if let Some(at) = renewed.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()) {
                acme_renewed.get_or_create(&labels).set(saturating_i64(at.as_secs()));
            }
        }
        if let Some(h) = &service.https {
            let s = || service.name.clone();
            for (kind, n) in [("full", h.handshakes_full), ("resumed", h.handshakes_resumed), ("failed", h.handshakes_failed)] {
                handshakes.get_or_create(&HandshakeLabels { service: s(), kind }).inc_by(n);
            }
            let r = &h.responses;
            for (class, n) in [("1xx", r.c1xx), ("2xx", r.c2xx), ("3xx", r.c3xx), ("4xx", r.c4xx), ("5xx", r.c5xx)] {
                responses.get_or_create(&ResponseLabels { service: s(), class }).inc_by(n);
            }
            retries.get_or_create(&ServiceLabels { service: s() }).inc_by(h.retries);
            if let (Some(at), Some(left)) = (h.cert_not_after, h.cert_expires_in_seconds) {
                not_after.get_or_create(&ServiceLabels { service: s() }).set(at);
                expires_in.get_or_create(&ServiceLabels { service: s() }).set(left);
            }
        }
        for backend in &service.backends {
            let labels = BackendLabels {
                service: service.name.clone(),
                backend: backend.address.clone(),
            };
            live.get_or_create(&labels)
                .set(saturating_i64(backend.live_connections));
            total
                .get_or_create(&labels)
                .inc_by(backend.total_connections);
            failed
                .get_or_create(&labels)
                .inc_by(backend.failed_connections);
            for (state, name) in [
                (BackendState::Up, "up"),
                (BackendState::Down, "down"),
                (BackendState::Draining, "draining"),
                (BackendState::Failed, "failed"),
            ] {
                let labels = StateLabels {
                    service: labels.service.clone(),
                    backend: labels.backend.clone(),
                    state: name,
                };
                up.get_or_create(&labels)
                    .set(i64::from(backend.state == state));
            }
            if let Some(ms) = backend.last_probe_ms {
                probe.get_or_create(&labels).set(ms / 1000.0);
            }
        }
    }
    let mut registry = Registry::default();
    registry.register(
        "xlb_backend_live_connections",
        "Connections open to the backend now",
        live,
    );
    registry.register(
        "xlb_backend_connections",
        "Connections sent to the backend by the data path",
        total,
    );
    registry.register(
        "xlb_backend_failed_connections",
        "New connections the backend refused or never answered (passive health)",
        failed,
    );
    registry.register(
        "xlb_backend_up",
        "1 for the backend's current state (up, down, draining or failed), 0 for the others",
        up,
    );
    registry.register_with_unit(
        "xlb_backend_probe_duration",
        "Duration of the last health probe of the backend",
        Unit::Seconds,
        probe,
    );
    registry.register(
        "xlb_tls_handshakes",
        "TLS handshakes of an https service: full, resumed (session ticket or cache) or failed",
        handshakes,
    );
    registry.register(
        "xlb_http_responses",
        "HTTP responses of an https or redirect service, by status class",
        responses,
    );
    registry.register(
        "xlb_http_retries",
        "Requests of an https service sent again to another backend after a failure",
        retries,
    );
    registry.register_with_unit(
        "xlb_certificate_not_after",
        "notAfter of the https service's certificate that expires first (Unix time)",
        Unit::Seconds,
        not_after,
    );
    registry.register_with_unit(
        "xlb_certificate_expiry",
        "Time left until the https service's first certificate expires (negative once expired)",
        Unit::Seconds,
        expires_in,
    );
    registry.register(
        "xlb_acme_renewal_failures",
        "Failed ACME attempts in a row for the service's certificate (0 once one succeeds)",
        acme_failures,
    );
    registry.register_with_unit(
        "xlb_acme_last_renewal",
        "When this daemon last obtained the service's certificate from its ACME CA (Unix time)",
        Unit::Seconds,
        acme_renewed,
    );
    let dataplane = &status.dataplane;
    let interfaces = dataplane
        .interfaces
        .iter()
        .map(|i| InterfaceLabels {
            interface: i.name.clone(),
            xdp_mode: i.xdp_mode.clone(),
        })
        .collect();
    registry.register_collector(Box::new(InterfaceInfo(interfaces)));
    let gauge = |value: u64| {
        let gauge = Gauge::<i64>::default();
        gauge.set(saturating_i64(value));
        gauge
    };
    registry.register(
        "xlb_flows",
        "Flows in the connection-tracking table",
        gauge(dataplane.flows),
    );
    registry.register(
        "xlb_flows_max",
        "Capacity of the connection-tracking table",
        gauge(dataplane.max_flows),
    );
    for (name, &value) in &dataplane.counters {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        let name: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        registry.register(
            format!("xlb_dataplane_{name}"),
            format!("Data-path counter {name}, summed over CPUs"),
            counter,
        );
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// `GET /api/status` from a running daemon; used by `xlb status`.
pub async fn fetch_status(addr: SocketAddr) -> anyhow::Result<Status> {
    let body = call(addr, Method::GET, "/api/status").await?;
    serde_json::from_slice(&body).with_context(|| {
        format!("the xlb admin API at {addr} sent a status this xlb cannot read; are `xlb` and the daemon the same version?")
    })
}

/// Drains (`drained`) or undrains `backend` of `service` in a running daemon; used by
/// `xlb drain` and `xlb undrain`. The daemon checks the names, so any text is passed on.
pub async fn set_drained(
    addr: SocketAddr,
    service: &str,
    backend: &str,
    drained: bool,
) -> anyhow::Result<DrainResult> {
    let action = if drained { "drain" } else { "undrain" };
    let path = format!(
        "/api/services/{}/backends/{}/{action}",
        percent_encode(service),
        percent_encode(backend)
    );
    let body = call(addr, Method::POST, &path).await?;
    serde_json::from_slice(&body).with_context(|| {
        format!("the xlb admin API at {addr} sent an answer this xlb cannot read; are `xlb` and the daemon the same version?")
    })
}

/// Asks a running daemon to reload its config file; used by `xlb reload`. An invalid file is
/// an error carrying the daemon's reason.
pub async fn reload(addr: SocketAddr) -> anyhow::Result<ReloadResult> {
    let body = call(addr, Method::POST, "/api/reload").await?;
    serde_json::from_slice(&body).with_context(|| {
        format!("the xlb admin API at {addr} sent an answer this xlb cannot read; are `xlb` and the daemon the same version?")
    })
}

/// Asks a running daemon to renew the ACME certificate of `service` now; used by `xlb renew`.
pub async fn renew(addr: SocketAddr, service: &str) -> anyhow::Result<RenewResult> {
    let body = call(addr, Method::POST, &format!("/api/acme/renew?service={}", percent_encode(service))).await?;
    serde_json::from_slice(&body).with_context(|| {
        format!("the xlb admin API at {addr} sent an answer this xlb cannot read; are `xlb` and the daemon the same version?")
    })
}

/// One request to the admin API: the body of a 200 answer, else an error with the API's message.
async fn call(addr: SocketAddr, method: Method, path: &str) -> anyhow::Result<Bytes> {
    let response = tokio::time::timeout(CLIENT_TIMEOUT, get(addr, method, path))
        .await
        .map_err(|_| anyhow!("no answer within {CLIENT_TIMEOUT:?}"))
        .and_then(|r| r)
        .map_err(|e| {
            anyhow!("cannot reach the xlb admin API at {addr}: {e:#} — is `xlb run` running?")
        })?;
    let body = response.body();
    if response.status() != StatusCode::OK {
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        return Err(anyhow!(
            "the xlb admin API at {addr} answered {}: {message}",
            response.status()
        ));
    }
    Ok(response.into_body())
}

async fn get(addr: SocketAddr, method: Method, path: &str) -> anyhow::Result<Response<Bytes>> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    let exchange = async {
        let (parts, body) = sender.send_request(request).await?.into_parts();
        let body = Limited::new(body, MAX_CLIENT_BODY)
            .collect()
            .await
            .map_err(|e| anyhow!(e))?
            .to_bytes();
        anyhow::Ok(Response::from_parts(parts, body))
    };
    // The connection must be driven while the exchange runs; with `Connection: close` it ends
    // right after the response, and its own error is also the exchange's.
    let (response, _) = tokio::join!(exchange, conn);
    response
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::status::{BackendStatus, DataplaneStatus, InterfaceStatus, ServiceStatus};

    struct Fixed(anyhow::Result<Status, String>);

    impl StatusSource for Fixed {
        fn status(&self) -> anyhow::Result<Status> {
            self.0
                .clone()
                .map_err(|e| anyhow!(e).context("reading BACKENDS"))
        }

        /// Looks the backend up in the fixed status, as the daemon does in its config.
        fn set_drained(
            &self,
            service: &str,
            backend: SocketAddr,
            drained: bool,
        ) -> Result<DrainResult, ControlError> {
            let status = self.status()?;
            let svc = status
                .services
                .iter()
                .find(|s| s.name == service)
                .ok_or_else(|| ControlError::UnknownService {
                    name: service.into(),
                    known: status.services.iter().map(|s| s.name.clone()).collect(),
                })?;
            let b = svc
                .backends
                .iter()
                .find(|b| b.address.parse() == Ok(backend))
                .ok_or_else(|| ControlError::UnknownBackend {
                    service: service.into(),
                    backend,
                    known: svc.backends.iter().map(|b| b.address.clone()).collect(),
                })?;
            Ok(DrainResult {
                service: service.into(),
                backend: b.address.clone(),
                drained,
                changed: drained != (b.state == BackendState::Draining),
                state: if drained {
                    BackendState::Draining
                } else {
                    BackendState::Up
                },
                healthy: b.healthy,
                live_connections: b.live_connections,
            })
        }

        /// Accepts while the status is readable, as if the file were valid; refuses otherwise.
        fn reload(&self) -> Result<ReloadResult, ControlError> {
            match &self.0 {
                Ok(_) => Ok(ReloadResult {
                    config: "/etc/xlb/xlb.toml".into(),
                    changes: vec!["service web: backend 203.0.113.10:8004 added".into()],
                }),
                Err(e) => Err(ControlError::Rejected(format!("/etc/xlb/xlb.toml:3: {e}"))),
            }
        }

        /// As the daemon: a known service with ACME, a known one without, or an unknown one.
        fn renew(&self, service: &str) -> Result<RenewResult, ControlError> {
            let status = self.status()?;
            let svc = status.services.iter().find(|s| s.name == service).ok_or_else(|| ControlError::UnknownService {
                name: service.into(),
                known: status.services.iter().map(|s| s.name.clone()).collect(),
            })?;
            let acme = svc.acme.clone().ok_or_else(|| {
                ControlError::Rejected(format!("service {service:?} does not get its certificate from ACME"))
            })?;
            Ok(RenewResult { service: service.into(), acme })
        }
    }

    fn sample() -> Status {
        let backend = |address: &str, state, live, total, probe: Option<f64>| BackendStatus {
            address: address.into(),
            state,
            live_connections: live,
            total_connections: total,
            failed_connections: 0,
            healthy: probe.map(|_| state == BackendState::Up),
            last_probe_ms: probe,
            last_error: (state == BackendState::Down)
                .then(|| "HTTP 503 Service Unavailable".into()),
            checks_up: state != BackendState::Down,
            probes: u64::from(probe.is_some()),
            probes_passed_in_a_row: u64::from(probe.is_some() && state == BackendState::Up),
        };
        Status {
            services: vec![ServiceStatus {
                name: "web".into(),
                listen: "203.0.113.10:80".into(),
                mode: "l4".into(),
                rise: 2,
                backends: vec![
                    backend("203.0.113.10:8001", BackendState::Up, 3, 120, Some(1.5)),
                    backend("203.0.113.10:8002", BackendState::Down, 0, 7, Some(250.0)),
                    backend("203.0.113.10:8003", BackendState::Draining, 1, 9, None),
                ],
                https: None,
                acme: None,
            }],
            dataplane: DataplaneStatus {
                interfaces: vec![InterfaceStatus {
                    name: "eth0".into(),
                    xdp_mode: "native".into(),
                }],
                pin_path: "/sys/fs/bpf/xlb".into(),
                flows: 4,
                max_flows: 1 << 20,
                counters: BTreeMap::from([
                    ("new_flows".into(), 136),
                    ("drop_no_backend".into(), 0),
                ]),
            },
        }
    }

    struct Server {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    /// `sample` with an https service too.
    fn sample_with_https() -> Status {
        let mut status = sample();
        let backends = vec![status.services[0].backends[0].clone()];
        status.services.push(ServiceStatus {
            name: "site".into(),
            listen: "203.0.113.10:443".into(),
            mode: "https".into(),
            rise: 2,
            backends,
            https: Some(crate::https::HttpsStatus {
                handshakes_full: 10,
                handshakes_resumed: 4,
                handshakes_failed: 1,
                responses: crate::https::ResponseClasses { c2xx: 40, c5xx: 2, ..Default::default() },
                retries: 3,
                cert_not_after: Some(1_800_000_000),
                cert_expires_in_seconds: Some(86_400),
            }),
            acme: Some(crate::status::AcmeServiceStatus {
                domains: vec!["example.com".into()],
                challenge: "http-01".into(),
                not_after: Some("2027-01-15T08:00:00Z".into()),
                last_renewal: Some("2026-10-17T08:00:00Z".into()),
                next_attempt: Some("2026-12-16T08:00:00Z".into()),
                last_error: None,
                failures: 0,
                attempts: 1,
            }),
        });
        status
    }

    async fn start(source: Fixed) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::new(source), stop_rx));
        Server { addr, stop, task }
    }

    impl Server {
        async fn shutdown(self) {
            self.stop.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(2), self.task)
                .await
                .expect("serve did not stop")
                .unwrap()
                .unwrap();
        }
    }

    fn text(response: &Response<Bytes>) -> &str {
        std::str::from_utf8(response.body()).unwrap()
    }

    #[tokio::test]
    async fn status_round_trips_through_fetch_status() {
        let server = start(Fixed(Ok(sample()))).await;
        assert_eq!(fetch_status(server.addr).await.unwrap(), sample());
        let response = get(server.addr, Method::GET, "/api/status").await.unwrap();
        assert_eq!(response.headers()[header::CONTENT_TYPE], JSON);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn metrics_expose_the_snapshot() {
        let server = start(Fixed(Ok(sample_with_https()))).await;
        let response = get(server.addr, Method::GET, "/metrics").await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], OPENMETRICS);
        let body = text(&response);
        let b1 = r#"service="web",backend="203.0.113.10:8001""#;
        let b2 = r#"service="web",backend="203.0.113.10:8002""#;
        for line in [
            "# TYPE xlb_backend_live_connections gauge".to_string(),
            format!("xlb_backend_live_connections{{{b1}}} 3"),
            "# TYPE xlb_backend_connections counter".into(),
            format!("xlb_backend_connections_total{{{b1}}} 120"),
            format!("xlb_backend_connections_total{{{b2}}} 7"),
            "# TYPE xlb_backend_failed_connections counter".into(),
            format!("xlb_backend_failed_connections_total{{{b1}}} 0"),
            format!("xlb_backend_up{{{b1},state=\"failed\"}} 0"),
            format!("xlb_backend_up{{{b1},state=\"up\"}} 1"),
            format!("xlb_backend_up{{{b1},state=\"down\"}} 0"),
            format!("xlb_backend_up{{{b2},state=\"down\"}} 1"),
            r#"xlb_backend_up{service="web",backend="203.0.113.10:8003",state="draining"} 1"#
                .into(),
            "# UNIT xlb_backend_probe_duration_seconds seconds".into(),
            format!("xlb_backend_probe_duration_seconds{{{b1}}} 0.0015"),
            format!("xlb_backend_probe_duration_seconds{{{b2}}} 0.25"),
            r#"xlb_interface_info{interface="eth0",xdp_mode="native"} 1"#.into(),
            "xlb_flows 4".into(),
            "xlb_flows_max 1048576".into(),
            "# TYPE xlb_dataplane_new_flows counter".into(),
            "xlb_dataplane_new_flows_total 136".into(),
            "xlb_dataplane_drop_no_backend_total 0".into(),
            r#"xlb_tls_handshakes_total{service="site",kind="full"} 10"#.into(),
            r#"xlb_tls_handshakes_total{service="site",kind="resumed"} 4"#.into(),
            r#"xlb_http_responses_total{service="site",class="2xx"} 40"#.into(),
            r#"xlb_http_responses_total{service="site",class="5xx"} 2"#.into(),
            r#"xlb_http_retries_total{service="site"} 3"#.into(),
            r#"xlb_certificate_not_after_seconds{service="site"} 1800000000"#.into(),
            r#"xlb_certificate_expiry_seconds{service="site"} 86400"#.into(),
            r#"xlb_acme_renewal_failures{service="site"} 0"#.into(),
            r#"xlb_acme_last_renewal_seconds{service="site"} 1792224000"#.into(),
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "missing `{line}` in:\n{body}"
            );
        }
        assert!(
            !body.contains("203.0.113.10:8003\"} 0."),
            "no probe yet, so no probe duration:\n{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_get_json_errors() {
        let server = start(Fixed(Ok(sample()))).await;
        let index = get(server.addr, Method::GET, "/").await.unwrap();
        assert_eq!(
            (
                index.status(),
                index.headers()[header::CONTENT_TYPE].to_str().unwrap()
            ),
            (StatusCode::OK, TEXT)
        );
        assert!(
            text(&index).contains("GET  /api/status") && text(&index).contains("GET  /metrics")
        );

        let missing = get(server.addr, Method::GET, "/x?y=1").await.unwrap();
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert_eq!(missing.headers()[header::CONTENT_TYPE], JSON);
        assert_eq!(
            text(&missing),
            r#"{"error":"no route GET /x; try /api/status or /metrics (GET / lists every route)"}"#
        );

        let post = get(server.addr, Method::POST, "/api/status").await.unwrap();
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
        assert_eq!(
            text(&post),
            r#"{"error":"method POST not allowed on /api/status; use GET"}"#
        );

        let head = get(server.addr, Method::HEAD, "/metrics").await.unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        assert!(head.body().is_empty());
        server.shutdown().await;
    }

    #[tokio::test]
    async fn stub_status_has_nginx_layout() {
        let server = start(Fixed(Ok(sample()))).await;
        let response = get(server.addr, Method::GET, "/status").await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], TEXT);
        // Live 3 + 0 + 1, totals 120 + 7 + 9.
        assert_eq!(
            text(&response),
            "Active connections: 4 \nserver accepts handled requests\n 136 136 136 \n\
             Reading: 0 Writing: 0 Waiting: 4 \n"
        );
        let index = get(server.addr, Method::GET, "/").await.unwrap();
        assert!(text(&index).contains("GET  /status"), "{}", text(&index));
        server.shutdown().await;
    }

    #[tokio::test]
    async fn drain_routes() {
        let server = start(Fixed(Ok(sample()))).await;
        let drained = set_drained(server.addr, "web", "203.0.113.10:8001", true)
            .await
            .unwrap();
        assert_eq!(
            drained,
            DrainResult {
                service: "web".into(),
                backend: "203.0.113.10:8001".into(),
                drained: true,
                changed: true,
                state: BackendState::Draining,
                healthy: Some(true),
                live_connections: 3,
            }
        );
        let undrained = set_drained(server.addr, "web", "203.0.113.10:8003", false)
            .await
            .unwrap();
        assert_eq!((undrained.drained, undrained.changed), (false, true));

        let e = set_drained(server.addr, "api", "203.0.113.10:8001", true)
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "the xlb admin API at {} answered 404 Not Found: no service \"api\"; the services are: web",
                server.addr
            )
        );
        let e = set_drained(server.addr, "web", "203.0.113.10:9", true)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with(
                "404 Not Found: service \"web\" has no backend 203.0.113.10:9; its backends are: \
                 203.0.113.10:8001, 203.0.113.10:8002, 203.0.113.10:8003"
            ),
            "{e}"
        );
        let e = set_drained(server.addr, "web", "localhost:8001", true)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("400 Bad Request: \"localhost:8001\" is not a backend address"),
            "{e}"
        );

        // By hand: percent-encoded IPv6-style brackets, the wrong method, a broken escape.
        let path = "/api/services/web/backends/203.0.113.10%3A8002/drain";
        let response = get(server.addr, Method::POST, path).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{}", text(&response));
        let response = get(server.addr, Method::GET, path).await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "POST");
        let response = get(
            server.addr,
            Method::POST,
            "/api/services/web/backends/%5B2001:db8::1%5D:80/drain",
        )
        .await
        .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::NOT_FOUND,
            "{}",
            text(&response)
        );
        assert!(text(&response).contains("no backend [2001:db8::1]:80"));
        let response = get(
            server.addr,
            Method::POST,
            "/api/services/web/backends/%zz/drain",
        )
        .await
        .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let mut browser = TcpStream::connect(server.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut browser,
            format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://example.com\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut browser, &mut answer)
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 403 Forbidden"), "{answer}");
        let response = get(server.addr, Method::POST, "/api/services/web/drain")
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert!(
            text(&response).contains("/backends/{address}/drain"),
            "{}",
            text(&response)
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn reload_route() {
        let server = start(Fixed(Ok(sample()))).await;
        let done = reload(server.addr).await.unwrap();
        assert_eq!(done.changes, ["service web: backend 203.0.113.10:8004 added"]);
        let response = get(server.addr, Method::GET, "/api/reload").await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "POST");
        let index = get(server.addr, Method::GET, "/").await.unwrap();
        assert!(text(&index).contains("POST /api/reload"), "{}", text(&index));
        server.shutdown().await;

        let server = start(Fixed(Err("bad key".into()))).await;
        let e = reload(server.addr).await.unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "the xlb admin API at {} answered 422 Unprocessable Entity: reload refused, the running \
                 config stays: /etc/xlb/xlb.toml:3: bad key",
                server.addr
            )
        );
        server.shutdown().await;
    }

    /// Every query of the shipped Grafana dashboard names only series that /metrics exports,
    /// and every exported series is on the dashboard. The data-path counters are taken from
    /// `lb_common::stats::Stats`, whose fields `Dataplane::counters` exports one each.
    #[test]
    fn grafana_dashboard_matches_the_metrics() {
        let stats = include_str!("../../lb-common/src/stats.rs");
        let counters: BTreeMap<String, u64> = stats
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub ")?.strip_suffix(": u64,"))
            .map(|name| (name.to_owned(), 1))
            .collect();
        assert!(counters.len() >= 17, "{counters:?}");
        let mut status = sample();
        status.dataplane.counters = counters;
        let exported: std::collections::BTreeSet<String> = encode_metrics(&status)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
            .collect();
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../dashboards/xlb-grafana.json"))
                .expect("the dashboard is JSON");
        let mut queries = Vec::new();
        fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(map) => {
                    for (key, value) in map {
                        match (key.as_str(), value) {
                            ("expr" | "definition", serde_json::Value::String(q)) => {
                                out.push(q.clone())
                            }
                            _ => walk(value, out),
                        }
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
                _ => {}
            }
        }
        walk(&dashboard, &mut queries);
        assert!(queries.len() >= 20, "{queries:?}");
        let mut used = std::collections::BTreeSet::new();
        for query in &queries {
            let names: Vec<&str> = query
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("xlb_"))
                .collect();
            assert!(!names.is_empty(), "a query of no xlb series: {query}");
            for name in names {
                assert!(
                    exported.contains(name),
                    "the dashboard queries {name}, which /metrics does not export ({query}); it exports {exported:?}"
                );
                used.insert(name.to_owned());
            }
        }
        let missing: Vec<&String> = exported.difference(&used).collect();
        assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
        let panels = dashboard["panels"].as_array().unwrap();
        let ids: std::collections::BTreeSet<u64> =
            panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
        assert_eq!(ids.len(), panels.len(), "panel ids must be unique");
    }

    #[tokio::test]
    async fn renew_route() {
        let server = start(Fixed(Ok(sample_with_https()))).await;
        let done = renew(server.addr, "site").await.unwrap();
        assert_eq!((done.service.as_str(), done.acme.attempts), ("site", 1));
        let e = renew(server.addr, "web").await.unwrap_err().to_string();
        assert!(e.ends_with("answered 422 Unprocessable Entity: service \"web\" does not get its certificate from ACME"), "{e}");
        let e = renew(server.addr, "nope").await.unwrap_err().to_string();
        assert!(e.contains("404 Not Found: no service \"nope\"; the services are: web, site"), "{e}");
        let response = get(server.addr, Method::POST, "/api/acme/renew").await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert!(text(&response).contains("POST /api/acme/renew?service=NAME"), "{}", text(&response));
        let response = get(server.addr, Method::GET, "/api/acme/renew?service=site").await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        let index = get(server.addr, Method::GET, "/").await.unwrap();
        assert!(text(&index).contains("POST /api/acme/renew?service={name}"), "{}", text(&index));
        server.shutdown().await;
    }

    #[test]
    fn percent_coding_round_trips() {
        for text in ["web", "[2001:db8::10]:8001", "a b%c/d", "ü"] {
            assert_eq!(percent_decode(&percent_encode(text)).as_deref(), Some(text));
        }
        assert_eq!(percent_encode("[::1]:80"), "%5B%3A%3A1%5D%3A80");
        assert_eq!(percent_decode("%5b::1%5D:80").as_deref(), Some("[::1]:80"));
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None);
    }

    #[tokio::test]
    async fn source_errors_are_reported() {
        let server = start(Fixed(Err("map gone".into()))).await;
        let response = get(server.addr, Method::GET, "/metrics").await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            text(&response),
            r#"{"error":"cannot read the status: reading BACKENDS: map gone"}"#
        );
        let e = fetch_status(server.addr).await.unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "the xlb admin API at {} answered 500 Internal Server Error: cannot read the status: reading \
                 BACKENDS: map gone",
                server.addr
            )
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn fetch_status_explains_a_missing_daemon() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let e = fetch_status(addr).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot reach the xlb admin API at {addr}: ")),
            "{e}"
        );
        assert!(
            e.contains("refused") && e.ends_with(" — is `xlb run` running?"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections() {
        let server = start(Fixed(Ok(sample()))).await;
        // A client that connected but sent nothing must not keep the server from stopping.
        let _idle = TcpStream::connect(server.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        server.shutdown().await;
    }
}

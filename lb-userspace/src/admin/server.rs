//! The listener and the routes: `serve` accepts, `connection` runs hyper on one stream, `route`
//! dispatches to the status, metrics and control handlers.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

use super::{ControlError, StatusSource, metrics, percent_decode};
use crate::status::render_stub_status;

/// A client that opens a connection and sends nothing must not hold it forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in progress.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
pub(super) const JSON: &str = "application/json";
pub(super) const TEXT: &str = "text/plain; charset=utf-8";
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
        "/metrics" => metrics::encode(&status)
            .map(|text| (metrics::OPENMETRICS, text.into_bytes()))
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

#[cfg(test)]
mod tests {
    use tokio::net::TcpStream;

    use super::*;
    use crate::{
        admin::{
            client::get,
            fetch_status, reload, renew, set_drained,
            testing::{Fixed, sample, sample_with_https, start, text},
        },
        status::{BackendState, DrainResult},
    };

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
    async fn shutdown_closes_idle_connections() {
        let server = start(Fixed(Ok(sample()))).await;
        // A client that connected but sent nothing must not keep the server from stopping.
        let _idle = TcpStream::connect(server.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        server.shutdown().await;
    }
}

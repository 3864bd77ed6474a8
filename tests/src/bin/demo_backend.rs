//! `xlb-demo-backend`: a small HTTP/1.1 server that says which instance answered, for the demo,
//! the scenario tests and the benchmarks.
//!
//! `GET /` → `served by <name>`; `/health`, `/health/ready`, `/health/live` → JSON status
//! (503 while failing, toggled by SIGUSR1); `/health/detailed` → counters; `/slow?ms=N` waits
//! N ms (≤ 60 s) first, to hold a connection open; `/echo` → JSON of the request as it arrived
//! (method, target, headers, peer, body length), to check what a proxy added; `/abort` closes
//! the connection without an answer, as a crashing handler would (`/abort?except=<name>`: the
//! instance named answers as `/echo` instead); `/upgrade` with `Upgrade:
//! echo` switches protocols (101) and echoes every byte back, like a WebSocket would carry them;
//! `/bytes?n=N` answers N bytes (≤ 64 MiB), a large response for flow-control tests.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

const MAX_SLOW: Duration = Duration::from_secs(60);
const MAX_BYTES: usize = 64 << 20;

#[derive(Parser)]
#[command(about = "Demo HTTP backend that names the instance answering")]
struct Args {
    /// Addresses to listen on, comma separated (e.g. 198.18.0.1:8001,[2001:2::1]:8001).
    #[arg(long, value_delimiter = ',', required = true)]
    listen: Vec<SocketAddr>,
    /// Instance name, returned in every answer.
    #[arg(long)]
    name: String,
    /// Start with the health endpoints answering 503; SIGUSR1 toggles this.
    #[arg(long)]
    fail_health: bool,
    /// Print `request <METHOD> <target>` on stdout as each request (other than a health
    /// probe) arrives, before its body is read.
    #[arg(long)]
    log_requests: bool,
}

struct State {
    log_requests: bool,
    name: String,
    listen: Vec<SocketAddr>,
    started: Instant,
    served: AtomicU64,
    fail_health: AtomicBool,
}

// One thread: the load balancer is what the tests exercise, and benchmarks pin each backend to
// a core anyway.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let Args {
        listen,
        name,
        fail_health,
        log_requests,
    } = Args::parse();
    let mut listeners = Vec::with_capacity(listen.len());
    let mut bound = Vec::with_capacity(listen.len());
    for addr in listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        bound.push(listener.local_addr()?);
        listeners.push(listener);
    }
    let state = Arc::new(State {
        log_requests,
        name,
        listen: bound.clone(),
        started: Instant::now(),
        served: AtomicU64::new(0),
        fail_health: AtomicBool::new(fail_health),
    });
    for (listener, addr) in listeners.into_iter().zip(&bound) {
        // Printed once bound (port 0 resolved): tests wait for this line.
        println!("listening on {addr}");
        tokio::spawn(accept_loop(listener, state.clone()));
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr1.recv() => {
                let failing = !state.fail_health.fetch_xor(true, Ordering::Relaxed);
                println!("fail-health {}", if failing { "on" } else { "off" });
            }
        }
    }
    // Open connections are simply dropped with the runtime: clients see them reset, like a
    // backend going away.
    Ok(())
}

/// What `/abort` fails with.
#[derive(Debug)]
struct Aborted;

impl std::fmt::Display for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("aborted on request")
    }
}

impl std::error::Error for Aborted {}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, peer, state.clone()));
            // Errors are clients going away (resets are routine in the tests): not worth a line.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Aborted> {
    state.served.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_owned();
    if state.log_requests && !path.starts_with("/health") {
        println!("request {} {}", req.method(), req.uri());
    }
    if path == "/upgrade" && req.headers().get("upgrade").is_some_and(|v| v == "echo") {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            }
        });
        let mut response = respond(&state, StatusCode::SWITCHING_PROTOCOLS, "text/plain", String::new());
        response.headers_mut().insert("connection", HeaderValue::from_static("upgrade"));
        response.headers_mut().insert("upgrade", HeaderValue::from_static("echo"));
        return Ok(response);
    }
    let method = req.method().to_string();
    let target = req.uri().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let param = |name: &str| -> Option<String> {
        req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')).map(str::to_owned)
    };
    let slow_ms = param("ms").and_then(|ms| ms.parse::<u64>().ok());
    let bytes = param("n").and_then(|n| n.parse::<u64>().ok());
    let spared = param("except").is_some_and(|name| name == state.name);
    // Read the whole body (POSTs from the tests) so that the connection stays reusable.
    let body_len = req
        .into_body()
        .collect()
        .await
        .map_or(0, |b| b.to_bytes().len());
    let response = match path.as_str() {
        "/" => served_by(&state),
        // hyper closes the connection when the service fails.
        "/abort" if !spared => return Err(Aborted),
        "/echo" | "/abort" => respond(
            &state,
            StatusCode::OK,
            "application/json",
            format!(
                "{}\n",
                serde_json::json!({
                    "instance": state.name,
                    "method": method,
                    "target": target,
                    "headers": headers,
                    "peer": peer.to_string(),
                    "body_length": body_len,
                })
            ),
        ),
        "/bytes" => {
            // Slices of one buffer made once: many large answers at a time cost no copies.
            static BIG: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
            let big = BIG.get_or_init(|| Bytes::from(vec![b'x'; MAX_BYTES]));
            let n = (bytes.unwrap_or(0) as usize).min(MAX_BYTES);
            let mut response = Response::new(Full::new(big.slice(..n)));
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            response
        }
        "/slow" => {
            let wait = Duration::from_millis(slow_ms.unwrap_or(1000)).min(MAX_SLOW);
            tokio::time::sleep(wait).await;
            served_by(&state)
        }
        "/health" | "/health/ready" | "/health/live" => health(
            &state,
            serde_json::json!({ "status": health_word(&state), "instance": state.name }),
        ),
        "/health/detailed" => health(
            &state,
            serde_json::json!({
                "status": health_word(&state),
                "instance": state.name,
                "uptime_seconds": state.started.elapsed().as_secs(),
                "requests_served": state.served.load(Ordering::Relaxed),
                "pid": std::process::id(),
                "listen": state.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
            }),
        ),
        _ => respond(
            &state,
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".into(),
        ),
    };
    Ok(response)
}

fn served_by(state: &State) -> Response<Full<Bytes>> {
    respond(
        state,
        StatusCode::OK,
        "text/plain",
        format!("served by {}\n", state.name),
    )
}

fn health_word(state: &State) -> &'static str {
    if state.fail_health.load(Ordering::Relaxed) {
        "failing"
    } else {
        "ok"
    }
}

fn health(state: &State, body: serde_json::Value) -> Response<Full<Bytes>> {
    let status = if state.fail_health.load(Ordering::Relaxed) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    respond(state, status, "application/json", format!("{body}\n"))
}

fn respond(
    state: &State,
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(name) = HeaderValue::from_str(&state.name) {
        headers.insert("x-served-by", name);
    }
    response
}

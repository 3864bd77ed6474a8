//! The HTTP proxy of an `https` service: accepts TLS connections, serves HTTP/1.1 and HTTP/2
//! with hyper, and forwards each request to the least-loaded usable backend over a pool of
//! kept-alive HTTP/1.1 connections.
//!
//! Failures are handled as nginx's `proxy_next_upstream error timeout`: a backend that cannot
//! be connected to is skipped for any request (nothing was sent); a backend that fails or times
//! out before the response head is skipped for idempotent requests whose body was read whole
//! (none, or at most `limits.request_buffer_bytes`), which can be sent again as they were; any
//! other request that reached a backend is never sent twice and gets a 502 (or 504). Each
//! failure counts against the backend's passive health.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full, Limited, combinators::BoxBody};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, Uri, Version,
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1 as client_http1,
    header::{self, HeaderName, HeaderValue},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{
    Activity, Backplane, InFlight, Stats, Tracked,
    body::{self, RequestBody},
    watch::{Misbehaviour, Watch},
};
use crate::{backends::Usable, challenges::ACME_TLS_ALPN, config};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Idle connections kept per backend.
const POOL_MAX_IDLE: usize = 64;
/// An idle pooled connection older than this is closed instead of reused (backends commonly
/// close idle keep-alive connections after 60-75 s; reusing one they are closing loses the
/// race).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_BACKEND_SERVER: HeaderName = HeaderName::from_static("x-backend-server");
static X_FRAME_OPTIONS: HeaderName = HeaderName::from_static("x-frame-options");
static X_CONTENT_TYPE_OPTIONS: HeaderName = HeaderName::from_static("x-content-type-options");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// One `https` service's proxy. What it serves with (`Site`) is replaced whole by a reload
/// (`update`): a connection takes its timeouts and limits from the site it was accepted under,
/// a request its backends and headers from the site in force when it starts. The listener,
/// the counters and the open connections stay.
pub struct Proxy {
    site: RwLock<Arc<Site>>,
    backplane: Arc<dyn Backplane>,
    pub stats: Arc<Stats>,
    /// One permit per open connection: `limits.max_connections` in all.
    limit: Arc<Semaphore>,
    /// Where the round-robin among equally loaded backends starts next.
    next: AtomicUsize,
}

/// An `https` service as one config has it.
pub struct Site {
    /// The config's generation and the service's index in it: a failure is reported against
    /// the backend it names in that config only.
    generation: u64,
    service: usize,
    name: String,
    backends: Vec<SocketAddr>,
    /// `X-Backend-Server` of each backend, written once.
    backend_header: Vec<HeaderValue>,
    /// Which backends are up and not drained, as the backend state machine has them.
    usable: Usable,
    /// The TLS side: the service's certificates.
    acceptor: TlsAcceptor,
    options: config::Https,
    pool: Arc<Pool>,
}

impl Site {
    /// Service `service` of config `generation`; the idle backend connections of `earlier`
    /// (the site it replaces) to backends that stay are kept.
    pub fn new(generation: u64, service: usize, svc: &config::Service, usable: Usable, acceptor: TlsAcceptor, earlier: Option<&Site>) -> Site {
        let pool = Pool::new(svc.backends.len());
        if let Some(earlier) = earlier {
            pool.carry_over(&earlier.pool, &earlier.backends, &svc.backends);
        }
        Site {
            generation,
            service,
            name: svc.name.clone(),
            backends: svc.backends.clone(),
            backend_header: svc.backends.iter().map(|&a| header_value(a)).collect(),
            usable,
            acceptor,
            options: svc.https.clone().expect("an https service has https options"),
            pool: Arc::new(pool),
        }
    }
}

/// The most response data queued per HTTP/2 stream before the client's flow-control window
/// lets it go.
const H2_MAX_SEND_BUF: usize = 64 * 1024;

/// How long an HTTP/2 client has to answer the proxy's PING (at most; the idle timeout when
/// that is shorter).
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a stopping daemon waits for the first request of a connection it has just
/// accepted before closing it (see `Proxy::connection`).
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

impl Proxy {
    pub fn new(site: Site, backplane: Arc<dyn Backplane>, stats: Arc<Stats>) -> Arc<Proxy> {
        Arc::new(Proxy {
            limit: Arc::new(Semaphore::new(site.options.limits.max_connections)),
            site: RwLock::new(Arc::new(site)),
            backplane,
            stats,
            next: AtomicUsize::new(0),
        })
    }

    /// The site in force.
    pub fn site(&self) -> Arc<Site> {
        self.site.read().unwrap().clone()
    }

    /// Serves `site` from now on: new connections and new requests get it; requests under way
    /// finish with the one they started with.
    pub fn update(&self, site: Site) {
        let mut current = self.site.write().unwrap();
        let (before, after) = (current.options.limits.max_connections, site.options.limits.max_connections);
        if after > before {
            self.limit.add_permits(after - before);
        } else if after < before {
            // Permits in use are taken back as their connections end.
            let owed = (before - after) - self.limit.forget_permits(before - after);
            if owed > 0 {
                let limit = self.limit.clone();
                tokio::spawn(async move {
                    if let Ok(permits) = limit.acquire_many(u32::try_from(owed).unwrap_or(u32::MAX)).await {
                        permits.forget();
                    }
                });
            }
        }
        *current = Arc::new(site);
    }

    /// Accepts connections on `listener` until `stop` fires; then waits (at most the backend
    /// response timeout) for the open connections to finish their requests. Connections not
    /// yet accepted stay in the socket's queue: with socket activation the socket outlives the
    /// daemon, and the next one serves them, so a restart refuses and resets nothing.
    pub async fn serve(self: Arc<Self>, listener: Arc<TcpListener>, mut stop: watch::Receiver<bool>) {
        let limit = self.limit.clone();
        let drained = |limit: Arc<Semaphore>, site: Arc<Site>| async move {
            // Every connection holds a permit until it ends.
            let (max, name, wait) = (site.options.limits.max_connections, &site.name, site.options.timeouts.backend_response);
            let all = u32::try_from(max).unwrap_or(u32::MAX);
            if tokio::time::timeout(wait, limit.acquire_many(all)).await.is_err() {
                warn!(service = %name, open = max - limit.available_permits(), "stopping with connections still open after {wait:?}");
            }
        };
        loop {
            // At the limit, further connections wait in the kernel's backlog.
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => p.expect("never closed"),
                _ = stop.changed() => {
                    drop(listener);
                    return drained(limit, self.site()).await;
                }
            };
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(service = %self.site().name, "accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => {
                    drop((listener, permit));
                    return drained(limit, self.site()).await;
                }
            };
            let proxy = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let linger = super::linger_handle(&tcp);
                let lingering = proxy.connection(tcp, peer, stop).await;
                // Served: a lingering close neither counts against `max_connections` nor holds
                // up a stopping daemon.
                drop(permit);
                if let (Some(fd), true) = (linger, lingering) {
                    super::linger(fd).await;
                }
            });
        }
    }

    /// Serves one client connection; true when its socket is to be closed lingering: not when
    /// it became a tunnel (an upgrade), which lives on in its own task, nor when the client
    /// misbehaved or stopped answering.
    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, mut stop: watch::Receiver<bool>) -> bool {
        let _ = tcp.set_nodelay(true);
        let site = self.site();
        let t = &site.options.timeouts;
        let tls = match tokio::time::timeout(t.handshake, site.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                debug!(service = %site.name, %peer, "TLS handshake failed: {e}");
                return true;
            }
            Err(_) => {
                self.stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                debug!(service = %site.name, %peer, "TLS handshake timed out");
                return true;
            }
        };
        let (_, session) = tls.get_ref();
        match session.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => self.stats.handshakes_resumed.fetch_add(1, Ordering::Relaxed),
            _ => self.stats.handshakes_full.fetch_add(1, Ordering::Relaxed),
        };
        let h2 = session.alpn_protocol() == Some(b"h2");
        if session.alpn_protocol() == Some(ACME_TLS_ALPN) {
            // A TLS-ALPN-01 validation: the handshake was the whole point.
            return true;
        }
        let activity = Activity::new();
        let io = TokioIo::new(Tracked::new(tls, activity.clone()));
        let l = &site.options.limits;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(t.request_header)
            .max_buf_size(l.max_header_bytes)
            .max_headers(l.max_headers)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(l.h2_max_streams)
            .max_header_list_size(l.max_header_bytes as u32)
            // Rapid reset (CVE-2023-44487): streams reset before they are served, and streams
            // we had to reset, are bounded per connection; past either bound the connection
            // ends with GOAWAY. hyper's defaults, written out so that they cannot change unseen.
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(1024))
            // A client that sends no request or body for longer than the idle timeout, yet
            // keeps the connection from being idle, is sent a PING and closed if it does not
            // answer: one that floods PINGs or SETTINGS and reads none of the answers is gone
            // then, although the bytes it sends trickle in (and count as the connection
            // moving). Later than the idle timeout, so that the PING and its answer never keep
            // a quiet connection open.
            .keep_alive_interval(Some(t.idle + Duration::from_secs(1)))
            .keep_alive_timeout(t.idle.min(H2_PING_TIMEOUT))
            // Response data queued per stream beyond the client's window: 128 streams of
            // hyper's 400 KiB default would be 50 MiB for one connection that reads slowly.
            .max_send_buf_size(H2_MAX_SEND_BUF);
        let proxy = self.clone();
        let act = activity.clone();
        let watch = Watch::new();
        let watching = watch.clone();
        // The client's address as a header value, written once per connection.
        let peer_ip = peer_header(peer);
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            let act = act.clone();
            let peer_ip = peer_ip.clone();
            let watch = watching.clone();
            async move {
                let served = watch.request();
                let response = proxy.handle(req, peer_ip, act).await;
                served.answered();
                Ok::<_, Infallible>(response.map(|body| BoxBody::new(watch.response(body))))
            }
        });
        let conn = builder.serve_connection_with_upgrades(io, service);
        let mut conn = std::pin::pin!(conn);
        let mut misbehaved = false;
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(service = %site.name, %peer, "connection ended: {e}");
                    if h2 && is_timeout(&*e) {
                        // Its PING went unanswered: nothing is owed to a client that reads
                        // nothing, not even a lingering close.
                        return false;
                    }
                }
                return !activity.upgraded.load(Ordering::Relaxed);
            }
            () = activity.idle(t.idle) => {}
            m = watch.misbehaving(t.idle) => {
                debug!(service = %site.name, %peer, "ending the connection: {}", match m {
                    Misbehaviour::Resets => "the client reset too many requests before their response",
                    Misbehaviour::Stalled => "the client took nothing of a response for the idle timeout",
                });
                misbehaved = true;
            }
            _ = stop.changed() => {
                // Stopping. A connection that has not sent its first request yet is about to:
                // closing it now would fail that request, so it gets a moment first.
                let first = async {
                    while !activity.served.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                };
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            debug!(service = %site.name, %peer, "connection ended: {e}");
                        }
                        return !activity.upgraded.load(Ordering::Relaxed);
                    }
                    () = first => {}
                    () = tokio::time::sleep(FIRST_REQUEST_GRACE) => {}
                }
            }
        }
        conn.as_mut().graceful_shutdown();
        // The GOAWAY gets a moment of its own before the wait below may count as idle.
        activity.touch();
        // Requests in flight get to finish, within bounds; a client that misbehaved gets no
        // grace, and one with nothing in flight that takes nothing more (not even the GOAWAY:
        // it stopped reading) is not waited for.
        let grace = if misbehaved { super::LINGER } else { t.backend_response };
        let taken = tokio::select! {
            _ = tokio::time::timeout(grace, conn) => true,
            () = activity.idle(super::LINGER) => false,
        };
        // Nor does such a client, or one that misbehaved, get a lingering close.
        taken && !misbehaved && !activity.upgraded.load(Ordering::Relaxed)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: HeaderValue, activity: Arc<Activity>) -> Response<ProxyBody> {
        activity.requests.fetch_add(1, Ordering::Relaxed);
        activity.served.store(true, Ordering::Relaxed);
        let done = RequestDone(activity);
        // A request a backend could read differently is answered here, and its connection
        // closed: what follows it on the connection cannot be trusted either.
        let refused = super::framing::refusal(req.version(), req.headers());
        let site = self.site();
        let result = match refused {
            Some(answer) => Err(answer),
            None => self.forward(&site, req, peer).await,
        };
        let mut response = match result {
            Ok(r) => r,
            Err((status, message)) => local(status, message),
        };
        if refused.is_some() {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        self.stats.count_response(response.status().as_u16());
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            done.0.upgraded.store(true, Ordering::Relaxed);
        }
        let h = &site.options.http;
        let headers = response.headers_mut();
        for (name, value) in [
            (&header::STRICT_TRANSPORT_SECURITY, &h.hsts),
            (&X_FRAME_OPTIONS, &h.frame_options),
            (&X_CONTENT_TYPE_OPTIONS, &h.content_type_options),
            (&header::REFERRER_POLICY, &h.referrer_policy),
        ] {
            if let Some(v) = value
                && !headers.contains_key(name)
                && let Ok(v) = HeaderValue::from_str(v)
            {
                headers.insert(name.clone(), v);
            }
        }
        // The request counts as in flight on this connection until its response body ends.
        response.map(|body| BoxBody::new(Guarded { inner: body, _guard: Box::new(done) }))
    }

    async fn forward(&self, site: &Site, mut req: Request<Incoming>, peer: HeaderValue) -> Result<Response<ProxyBody>, (StatusCode, &'static str)> {
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
            .ok_or((StatusCode::BAD_REQUEST, "no Host header\n"))?;
        let host_value = HeaderValue::from_str(&host).map_err(|_| (StatusCode::BAD_REQUEST, "bad Host header\n"))?;
        let length = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if let (Some(max), Some(len)) = (site.options.limits.max_body_bytes, length)
            && len > max
        {
            return Err((StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"));
        }
        let upgrade = req.version() == Version::HTTP_11 && is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let head = backend_head(&parts, peer, host_value, upgrade);
        let limits = &site.options.limits;
        let mut body = if !upgrade && body.is_end_stream() {
            // No body, as most requests: nothing to read or wait for.
            RequestBody::Buffered(body::Buffered::default())
        } else {
            let buffer = !upgrade && length.is_none_or(|len| len <= limits.request_buffer_bytes as u64);
            let body: ProxyBody = match limits.max_body_bytes {
                Some(max) => BoxBody::new(Limited::new(body, max as usize)),
                None => BoxBody::new(body.map_err(BoxError::from)),
            };
            if buffer {
                match tokio::time::timeout(site.options.timeouts.request_header, body::read(body, limits.request_buffer_bytes)).await {
                    Ok(Ok(body)) => body,
                    Ok(Err(e)) => return Err(body_error(&*e)),
                    Err(_) => return Err((StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time\n")),
                }
            } else {
                RequestBody::Streamed(Some(body))
            }
        };
        let replayable = is_idempotent(&parts.method) && body.is_buffered();
        let mut tried = vec![false; site.backends.len()];
        let mut stale_retries = 0;
        let mut failed_backends = 0;
        loop {
            let Some(b) = self.pick(site, &tried) else {
                return Err(if tried.iter().any(|&t| t) {
                    (StatusCode::BAD_GATEWAY, "no backend could answer\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "no backend available\n")
                });
            };
            // A retry is the request going to another backend after one failed (not a stale
            // pooled connection swapped for a fresh one).
            let failed_now = tried.iter().filter(|&&t| t).count();
            if failed_now > failed_backends {
                failed_backends = failed_now;
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            let addr = site.backends[b];
            let guard = InFlight::new(self.backplane.clone(), addr);
            let t = &site.options.timeouts;
            let (mut sender, pooled) = match site.pool.take(b) {
                Some(s) => (s, true),
                None => match connect(addr, t.backend_connect).await {
                    Ok(s) => (s, false),
                    Err(e) => {
                        // Nothing was sent: any request may go elsewhere.
                        debug!(service = %site.name, backend = %addr, "{e}");
                        self.fail(site, b, &mut tried);
                        continue;
                    }
                },
            };
            let mut request = Request::from_parts(head.clone(), body.for_attempt());
            *request.version_mut() = Version::HTTP_11;
            let sent = tokio::time::timeout(t.backend_response, sender.try_send_request(request)).await;
            let mut response = match sent {
                Ok(Ok(response)) => response,
                Ok(Err(mut e)) => {
                    if let Some(unsent) = e.take_message() {
                        // The connection was gone before the request went out (a pooled
                        // connection the backend had just closed): the request is intact.
                        body.unsent(unsent.into_body());
                        if pooled && stale_retries < POOL_MAX_IDLE {
                            stale_retries += 1;
                            continue;
                        }
                        debug!(service = %site.name, backend = %addr, "{}", e.error());
                        self.fail(site, b, &mut tried);
                        continue;
                    }
                    if let Some(answer) = client_side(e.error()) {
                        // The client's body broke off or ran over the limit: nothing the
                        // backend did, and nothing that can be sent again.
                        return Err(answer);
                    }
                    debug!(service = %site.name, backend = %addr, "request failed: {}", e.error());
                    self.backplane.failed(site.generation, site.service, b);
                    if replayable {
                        self.retry(b, &mut tried);
                        continue;
                    }
                    return Err((StatusCode::BAD_GATEWAY, "the backend failed before answering\n"));
                }
                Err(_) => {
                    debug!(service = %site.name, backend = %addr, "no response within {:?}", t.backend_response);
                    self.backplane.failed(site.generation, site.service, b);
                    if replayable {
                        self.retry(b, &mut tried);
                        continue;
                    }
                    return Err((StatusCode::GATEWAY_TIMEOUT, "the backend did not answer in time\n"));
                }
            };
            let status = response.status();
            if status == StatusCode::SWITCHING_PROTOCOLS {
                let Some(client_upgrade) = client_upgrade else {
                    return Err((StatusCode::BAD_GATEWAY, "the backend switched protocols unasked\n"));
                };
                let backend_upgrade = hyper::upgrade::on(&mut response);
                let name = site.name.clone();
                tokio::spawn(async move {
                    // The tunnel counts as in flight to the backend while it is open.
                    let _guard = guard;
                    let _sender = sender;
                    match tokio::try_join!(client_upgrade, backend_upgrade) {
                        Ok((client, backend)) => {
                            let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                        }
                        Err(e) => debug!(service = %name, "upgrade failed: {e}"),
                    }
                });
                let (mut parts, _) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers, true);
                if site.options.http.backend_header {
                    parts.headers.insert(X_BACKEND_SERVER.clone(), site.backend_header[b].clone());
                }
                return Ok(Response::from_parts(parts, BoxBody::new(Empty::new().map_err(|e| match e {}))));
            }
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers, false);
            if site.options.http.backend_header {
                parts.headers.insert(X_BACKEND_SERVER.clone(), site.backend_header[b].clone());
            }
            let returned = GiveBack { pool: site.pool.clone(), backend: b, sender: Some(sender) };
            let body = Guarded { inner: body.map_err(BoxError::from), _guard: Box::new((returned, guard)) };
            return Ok(Response::from_parts(parts, BoxBody::new(body)));
        }
    }

    fn fail(&self, site: &Site, b: usize, tried: &mut [bool]) {
        self.backplane.failed(site.generation, site.service, b);
        self.retry(b, tried);
    }

    fn retry(&self, b: usize, tried: &mut [bool]) {
        tried[b] = true;
    }

    /// The usable backend not yet tried with the fewest live connections over both paths;
    /// round-robin among equals.
    fn pick(&self, site: &Site, tried: &[bool]) -> Option<usize> {
        let n = site.backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(i64, usize)> = None;
        for i in 0..n {
            let b = (start + i) % n;
            if tried[b] || !site.usable.get(b) {
                continue;
            }
            let addr = site.backends[b];
            let load = self.backplane.l4_live(addr).max(0) + self.backplane.in_flight(addr);
            if best.is_none_or(|(l, _)| load < l) {
                best = Some((load, b));
            }
        }
        best.map(|(_, b)| b)
    }
}

/// Marks the end of a request on its client connection.
struct RequestDone(Arc<Activity>);

impl Drop for RequestDone {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A body that holds something (a count) until it is finished or dropped.
struct Guarded<B> {
    inner: B,
    _guard: Box<dyn Send + Sync>,
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The answer when a request failed because of its own body: past `max_body_bytes` (a body
/// without Content-Length is only measured as it streams), or the client stopped sending it.
fn client_side(e: &hyper::Error) -> Option<(StatusCode, &'static str)> {
    (too_large(e) || e.is_user()).then(|| body_error(e))
}

/// The answer to a request whose body could not be read.
fn body_error(e: &(dyn std::error::Error + 'static)) -> (StatusCode, &'static str) {
    if too_large(e) {
        (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")
    } else {
        (StatusCode::BAD_REQUEST, "the request body broke off\n")
    }
}

/// Whether `e` is (caused by) a body past `max_body_bytes`.
fn too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(cause) = source {
        if cause.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Whether a connection's error is one of hyper's timeouts (for HTTP/2, its PING unanswered).
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout)
}

fn local(status: StatusCode, message: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(BoxBody::new(Full::new(Bytes::from_static(message.as_bytes())).map_err(|e| match e {})));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// The client's IP address (an IPv4 client of a dual-stack socket as IPv4), for X-Real-IP and
/// X-Forwarded-For.
fn peer_header(peer: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.ip().to_canonical().to_string()).expect("an IP is a valid header value")
}

fn header_value(addr: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&addr.to_string()).expect("an address is a valid header value")
}

/// RFC 9110 §9.2.2.
fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes the headers that describe one hop (RFC 9110 §7.6.1), and those the Connection
/// header names. An upgrade keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(&name);
        }
    }
    for name in [&header::CONNECTION, &KEEP_ALIVE, &PROXY_CONNECTION, &header::TE, &header::TRAILER, &header::TRANSFER_ENCODING] {
        headers.remove(name);
    }
    if !upgrade {
        headers.remove(header::UPGRADE);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The request head sent to a backend: origin-form target, HTTP/1.1 headers, and the
/// forwarding headers.
fn backend_head(parts: &hyper::http::request::Parts, peer: HeaderValue, host: HeaderValue, upgrade: bool) -> hyper::http::request::Parts {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = parts.method.clone();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    head.uri = target.parse::<Uri>().unwrap_or_else(|_| Uri::from_static("/"));
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers, upgrade);
    // The client got its 100 Continue from us as soon as its body was asked for; a backend
    // answering one more would confuse the exchange.
    headers.remove(header::EXPECT);
    // HTTP/2 may split cookies into several fields; an HTTP/1.1 server wants one (RFC 9113
    // §8.2.3).
    if headers.get_all(header::COOKIE).iter().count() > 1 {
        let joined: Vec<&[u8]> = headers.get_all(header::COOKIE).iter().map(HeaderValue::as_bytes).collect();
        if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
            headers.insert(header::COOKIE, v);
        }
    }
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(earlier) => HeaderValue::from_str(&format!("{earlier}, {}", peer.to_str().unwrap_or_default())).ok(),
        None => Some(peer.clone()),
    };
    if let Some(v) = forwarded_for {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_REAL_IP.clone(), peer);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
    headers.insert(X_FORWARDED_HOST.clone(), host.clone());
    headers.insert(header::HOST, host);
    head.headers = headers;
    head
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<client_http1::SendRequest<ProxyBody>, String> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Err(_) => return Err(format!("connect: timed out after {timeout:?}")),
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = client_http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// A kept-alive backend connection and when it went idle.
type Idle = (client_http1::SendRequest<ProxyBody>, Instant);

/// Idle kept-alive connections to the backends, by backend index.
struct Pool {
    idle: Vec<Mutex<Vec<Idle>>>,
}

impl Pool {
    fn new(backends: usize) -> Pool {
        Pool { idle: (0..backends).map(|_| Mutex::default()).collect() }
    }

    fn take(&self, backend: usize) -> Option<client_http1::SendRequest<ProxyBody>> {
        let mut list = self.idle[backend].lock().unwrap();
        while let Some((sender, since)) = list.pop() {
            if sender.is_ready() && !sender.is_closed() && since.elapsed() < POOL_IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    /// Moves the idle connections of `earlier` (a pool for `before`) to the same backends here
    /// (a pool for `after`).
    fn carry_over(&self, earlier: &Pool, before: &[SocketAddr], after: &[SocketAddr]) {
        for (b, addr) in after.iter().enumerate() {
            if let Some(old) = before.iter().position(|a| a == addr) {
                let idle = std::mem::take(&mut *earlier.idle[old].lock().unwrap());
                *self.idle[b].lock().unwrap() = idle;
            }
        }
    }

    fn put(&self, backend: usize, sender: client_http1::SendRequest<ProxyBody>) {
        let mut list = self.idle[backend].lock().unwrap();
        if list.len() < POOL_MAX_IDLE {
            list.push((sender, Instant::now()));
        }
    }

    /// Puts the connection back once it can take the next request (an HTTP/1.1 connection
    /// carries one request at a time).
    fn give_back_when_ready(self: &Arc<Pool>, backend: usize, mut sender: client_http1::SendRequest<ProxyBody>) {
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.put(backend, sender);
            }
        });
    }
}

/// Returns a backend connection to the pool when the response body it carried is dropped
/// (read to the end, or abandoned). A connection whose response was read to the end is
/// usually ready at once and goes straight back; only one that is not yet (or never will be:
/// an abandoned body closes it) gets a task that waits for it.
struct GiveBack {
    pool: Arc<Pool>,
    backend: usize,
    sender: Option<client_http1::SendRequest<ProxyBody>>,
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        let Some(sender) = self.sender.take() else { return };
        if sender.is_ready() {
            self.pool.put(self.backend, sender);
        } else if !sender.is_closed() {
            self.pool.give_back_when_ready(self.backend, sender);
        }
    }
}

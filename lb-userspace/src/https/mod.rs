//! The HTTPS path: the daemon itself listens on an `https` service's address, terminates TLS
//! (`tls`), and proxies HTTP/1.1 and HTTP/2 requests to the backends over kept-alive HTTP/1.1
//! connections (`proxy`), small request bodies read whole so that they can be sent again
//! (`body`); a `redirect` service answers plain HTTP with a 301 to https and serves
//! ACME HTTP-01 challenges (`redirect`).
//!
//! Both paths balance as one: the proxy picks the backend with the fewest live connections
//! counting the data path's flows to that address, and the daemon publishes the proxy's
//! requests in flight to the data path (see `Backplane`).

pub mod body;
pub mod framing;
pub mod proxy;
pub mod redirect;
pub mod tls;
pub mod watch;

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the proxy needs from the rest of the daemon: the data path's live counts, and
/// somewhere to report its own load and its failures. (Backend states come with each `Site`.)
pub trait Backplane: Send + Sync + 'static {
    /// Connections open to `addr` through the data path (every L4 backend slot with that
    /// address), as read at most a few milliseconds ago.
    fn l4_live(&self, addr: SocketAddr) -> i64;
    /// Requests of the HTTPS path in flight to `addr` now.
    fn in_flight(&self, addr: SocketAddr) -> i64;
    /// A request to `addr` started (+1) or ended (-1).
    fn add_in_flight(&self, addr: SocketAddr, delta: i64);
    /// A request to backend `backend` of `service` (their indices in config `generation`)
    /// failed at the backend (connect error or timeout, error or timeout before the response
    /// head): passive health.
    fn failed(&self, generation: u64, service: usize, backend: usize);
}

/// Counts a request in flight to a backend for as long as it lives.
pub struct InFlight {
    backplane: Arc<dyn Backplane>,
    addr: SocketAddr,
}

impl InFlight {
    pub fn new(backplane: Arc<dyn Backplane>, addr: SocketAddr) -> InFlight {
        backplane.add_in_flight(addr, 1);
        InFlight { backplane, addr }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backplane.add_in_flight(self.addr, -1);
    }
}

/// Counters of one `https` (or `redirect`) service, for the status and `/metrics`.
#[derive(Default)]
pub struct Stats {
    pub handshakes_full: AtomicU64,
    pub handshakes_resumed: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub handshakes_failed: AtomicU64,
    /// Responses by status class: 1xx..5xx.
    pub responses: [AtomicU64; 5],
    /// Requests sent again to another backend after a failure.
    pub retries: AtomicU64,
    /// The earliest notAfter (Unix seconds) of the certificates served; 0 while there is none.
    pub cert_not_after: AtomicI64,
}

impl Stats {
    pub fn count_response(&self, status: u16) {
        if let Some(class) = (status / 100).checked_sub(1).filter(|c| *c < 5) {
            self.responses[class as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> HttpsStatus {
        let r = |i: usize| self.responses[i].load(Ordering::Relaxed);
        let not_after = self.cert_not_after.load(Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        HttpsStatus {
            handshakes_full: self.handshakes_full.load(Ordering::Relaxed),
            handshakes_resumed: self.handshakes_resumed.load(Ordering::Relaxed),
            handshakes_failed: self.handshakes_failed.load(Ordering::Relaxed),
            responses: ResponseClasses { c1xx: r(0), c2xx: r(1), c3xx: r(2), c4xx: r(3), c5xx: r(4) },
            retries: self.retries.load(Ordering::Relaxed),
            cert_not_after: (not_after != 0).then_some(not_after),
            cert_expires_in_seconds: (not_after != 0).then_some(not_after - now),
        }
    }
}

/// The HTTP side of a service in `/api/status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpsStatus {
    pub handshakes_full: u64,
    pub handshakes_resumed: u64,
    pub handshakes_failed: u64,
    pub responses: ResponseClasses,
    pub retries: u64,
    /// notAfter of the certificate that expires first (Unix seconds); none without a
    /// certificate (a `redirect` service, or ACME before the first issuance).
    pub cert_not_after: Option<i64>,
    /// Seconds from now to `cert_not_after` (negative once expired).
    pub cert_expires_in_seconds: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ResponseClasses {
    #[serde(rename = "1xx")]
    pub c1xx: u64,
    #[serde(rename = "2xx")]
    pub c2xx: u64,
    #[serde(rename = "3xx")]
    pub c3xx: u64,
    #[serde(rename = "4xx")]
    pub c4xx: u64,
    #[serde(rename = "5xx")]
    pub c5xx: u64,
}

/// Binds a listening socket for a service. Every listener the HTTPS path uses comes from here,
/// so that sockets handed over by a service manager can be taken instead in one place.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    // std sets SO_REUSEADDR on Unix listeners: a restart binds while old connections linger in
    // TIME-WAIT.
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// How long a connection we close keeps being read (and what arrives discarded), as nginx's
/// `lingering_close`: a client still sending when we answer and close (a 431 for headers
/// that are too large, a 413 for a body) would otherwise get a reset from the kernel, which
/// can destroy the answer before the client reads it.
pub const LINGER: Duration = Duration::from_secs(2);

/// A second handle on a client socket, taken before the connection is handed over, so that
/// closing the connection's own handle does not close the socket: `linger` closes it.
pub fn linger_handle(tcp: &tokio::net::TcpStream) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd as _;
    tcp.as_fd().try_clone_to_owned().ok()
}

/// Ends the sending side (a FIN after whatever was written) and discards what the client
/// still sends, until it closes too or `LINGER` has passed.
pub async fn linger(fd: std::os::fd::OwnedFd) {
    let std = std::net::TcpStream::from(fd);
    let _ = std.shutdown(std::net::Shutdown::Write);
    if std.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(tcp) = tokio::net::TcpStream::from_std(std) else { return };
    let mut buf = [0u8; 16 * 1024];
    let _ = tokio::time::timeout(LINGER, async {
        loop {
            if tcp.readable().await.is_err() {
                return;
            }
            match tcp.try_read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    })
    .await;
}

/// When a connection last moved a byte, and how many of its requests are in flight: what the
/// idle timeout is decided from.
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    pub requests: AtomicI64,
    /// Whether a request has started on the connection yet.
    pub served: std::sync::atomic::AtomicBool,
    /// The connection became a tunnel (`101 Switching Protocols`): it is no longer ours to
    /// close or linger on.
    pub upgraded: std::sync::atomic::AtomicBool,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            requests: AtomicI64::new(0),
            served: Default::default(),
            upgraded: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub(crate) fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Resolves once the connection has had no request in flight and moved no byte for
    /// `idle`.
    pub async fn idle(&self, idle: Duration) {
        loop {
            let quiet = self.idle_for();
            if quiet >= idle && self.requests.load(Ordering::Relaxed) <= 0 {
                return;
            }
            tokio::time::sleep(idle.saturating_sub(quiet).max(Duration::from_millis(50))).await;
        }
    }
}

/// A stream that records its activity.
pub struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Tracked<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        activity.touch();
        Tracked { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

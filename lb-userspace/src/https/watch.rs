//! What a client does with a connection that hyper and h2 leave unbounded, watched per
//! connection so that the proxy can end it:
//!
//! - requests it resets while they are still being served. h2 ends a connection whose client
//!   resets streams that were not yet accepted (`max_pending_accept_reset_streams`), the
//!   rapid reset of CVE-2023-44487; a client that waits for each stream to be accepted before
//!   resetting it starts a backend request every time and is never seen by that bound.
//! - responses it stops taking: a client that opens no flow-control window (or reads nothing)
//!   holds its streams, and the backend connections behind them, for as long as the
//!   connection lives, since bytes still move (PINGs, WINDOW_UPDATEs of one byte) and
//!   requests are in flight, so the idle timeout never applies.
use std::{
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;

/// Requests a client may reset before they are answered, within `RESET_WINDOW`, before its
/// connection is ended. A browser cancels a few streams when the user navigates away; a rapid
/// reset attack cancels thousands a second.
pub const RESET_LIMIT: u32 = 100;
pub const RESET_WINDOW: Duration = Duration::from_secs(10);

/// Why a connection is ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// More than `RESET_LIMIT` requests reset before their response within `RESET_WINDOW`.
    Resets,
    /// A response the client has taken nothing of for the send timeout.
    Stalled,
}

/// One connection's watch.
pub struct Watch {
    start: Instant,
    /// Resets in the current window: (window start in ms since `start`, count).
    resets: Mutex<(u64, u32)>,
    /// Notified when the resets pass the limit.
    too_many: Notify,
    /// The responses being sent: for each, since when (ms since `start`, plus 1; 0: not
    /// waiting) it has been waiting for the connection to take its next bytes.
    responses: Mutex<Vec<Weak<AtomicU64>>>,
}

impl Watch {
    pub fn new() -> Arc<Watch> {
        Arc::new(Watch {
            start: Instant::now(),
            resets: Mutex::new((0, 0)),
            too_many: Notify::new(),
            responses: Mutex::new(Vec::new()),
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A request starts being served; the guard counts it as reset by the client unless
    /// `answered` is called before it is dropped (hyper drops a request's handler when its
    /// stream is reset).
    pub fn request(self: &Arc<Self>) -> RequestGuard {
        RequestGuard { watch: self.clone(), answered: false }
    }

    fn reset(&self) {
        self.reset_at(self.now_ms());
    }

    fn reset_at(&self, now: u64) {
        let mut resets = self.resets.lock().unwrap();
        if now.saturating_sub(resets.0) > RESET_WINDOW.as_millis() as u64 {
            *resets = (now, 0);
        }
        resets.1 += 1;
        if resets.1 == RESET_LIMIT + 1 {
            self.too_many.notify_one();
        }
    }

    /// `body`, watched for whether the connection keeps taking it.
    pub fn response<B: Body>(&self, body: B) -> Watched<B> {
        // Handed over with the response head: waiting for the connection from now on, unless
        // there is nothing to send (hyper may never poll an empty body).
        let since = if body.is_end_stream() { 0 } else { self.now_ms() + 1 };
        let waiting = Arc::new(AtomicU64::new(since));
        let mut responses = self.responses.lock().unwrap();
        // Finished responses are dropped from the list as it is scanned, and here when it has
        // grown past what a connection has at once.
        if responses.len() >= 1024 {
            responses.retain(|w| w.strong_count() > 0);
        }
        responses.push(Arc::downgrade(&waiting));
        Watched { inner: body, waiting, start: self.start }
    }

    /// The longest that a response has been waiting for the connection to take more of it.
    fn longest_wait(&self) -> Duration {
        let now = self.now_ms();
        let mut longest = 0;
        self.responses.lock().unwrap().retain(|w| match w.upgrade() {
            Some(waiting) => {
                let since = waiting.load(Ordering::Relaxed);
                if since > 0 {
                    longest = longest.max(now.saturating_sub(since - 1));
                }
                true
            }
            None => false,
        });
        Duration::from_millis(longest)
    }

    /// Resolves when the client has reset too many requests, or a response has waited for
    /// the connection to take more of it for `send_timeout`.
    pub async fn misbehaving(&self, send_timeout: Duration) -> Misbehaviour {
        let check = (send_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let stalled = async {
            loop {
                tokio::time::sleep(check).await;
                if self.longest_wait() >= send_timeout {
                    return;
                }
            }
        };
        tokio::select! {
            () = self.too_many.notified() => Misbehaviour::Resets,
            () = stalled => Misbehaviour::Stalled,
        }
    }
}

/// Counts its request as reset by the client if dropped before `answered`.
pub struct RequestGuard {
    watch: Arc<Watch>,
    answered: bool,
}

impl RequestGuard {
    pub fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if !self.answered {
            self.watch.reset();
        }
    }
}

/// A response body that records whether the connection is waiting on it (hyper polls it for
/// more: the backend is what is slow, which the response's own timeouts deal with) or it is
/// waiting on the connection (it handed over data, or its head, and hyper has not come back
/// for more: the client's flow-control window or its socket is full).
pub struct Watched<B> {
    inner: B,
    waiting: Arc<AtomicU64>,
    start: Instant,
}

impl<B: Body + Unpin> Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let waiting = match &polled {
            // Handed over: the next bytes wait for the connection.
            Poll::Ready(Some(Ok(_))) => self.start.elapsed().as_millis() as u64 + 1,
            // The connection waits for the backend, or the response is over.
            _ => 0,
        };
        self.waiting.store(waiting, Ordering::Relaxed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full};

    #[test]
    fn answered_requests_are_not_resets() {
        let watch = Watch::new();
        for _ in 0..=RESET_LIMIT {
            watch.request().answered();
        }
        assert_eq!(watch.resets.lock().unwrap().1, 0);
        for _ in 0..3 {
            drop(watch.request());
        }
        assert_eq!(watch.resets.lock().unwrap().1, 3);
    }

    #[tokio::test]
    async fn too_many_resets_are_misbehaviour() {
        let watch = Watch::new();
        for _ in 0..=RESET_LIMIT {
            drop(watch.request());
        }
        let m = tokio::time::timeout(Duration::from_secs(1), watch.misbehaving(Duration::from_secs(60))).await;
        assert_eq!(m.ok(), Some(Misbehaviour::Resets));
    }

    #[tokio::test]
    async fn resets_spread_over_windows_are_not() {
        let watch = Watch::new();
        let window = RESET_WINDOW.as_millis() as u64;
        for w in 0..3 {
            for _ in 0..RESET_LIMIT {
                watch.reset_at(w * (window + 1));
            }
        }
        let m = tokio::time::timeout(Duration::from_millis(100), watch.misbehaving(Duration::from_secs(60))).await;
        assert!(m.is_err(), "{m:?}");
        // One more in the last window is one too many.
        watch.reset_at(2 * (window + 1) + 1);
        let m = tokio::time::timeout(Duration::from_secs(1), watch.misbehaving(Duration::from_secs(60))).await;
        assert_eq!(m.ok(), Some(Misbehaviour::Resets));
    }

    #[tokio::test]
    async fn a_response_read_to_the_end_is_not_waiting() {
        let watch = Watch::new();
        let body = watch.response(Full::new(Bytes::from_static(b"hello")));
        assert_eq!(watch.responses.lock().unwrap().len(), 1);
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"hello");
        assert_eq!(watch.longest_wait(), Duration::ZERO);
        assert!(watch.responses.lock().unwrap().is_empty(), "the finished response is still listed");
    }

    #[tokio::test]
    async fn a_response_nobody_polls_is_waiting() {
        let watch = Watch::new();
        let _body = watch.response(Full::new(Bytes::from_static(b"hello")));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(watch.longest_wait() >= Duration::from_millis(30));
        let m = tokio::time::timeout(Duration::from_secs(2), watch.misbehaving(Duration::from_millis(100))).await;
        assert_eq!(m.ok(), Some(Misbehaviour::Stalled));
    }
}

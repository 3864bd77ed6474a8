//! A request body as the proxy sends it: read whole when it is small (`limits.
//! request_buffer_bytes`), so that the request can be sent again to another backend when the
//! first fails before answering, as nginx's `proxy_request_buffering`; streamed otherwise, and
//! then sent once at most.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt as _, combinators::BoxBody};
use hyper::{
    HeaderMap,
    body::{Body, Frame, SizeHint},
};

use super::proxy::{BoxError, ProxyBody};

/// A request body, buffered or streamed.
pub enum RequestBody {
    /// Read whole: every attempt sends a copy.
    Buffered(Buffered),
    /// Streamed: the first attempt that sends it consumes it; `None` once it is gone.
    Streamed(Option<ProxyBody>),
}

impl RequestBody {
    /// The body for the next attempt: a copy of a buffered body, the streamed one if it has not
    /// been sent yet, else an empty one.
    pub fn for_attempt(&mut self) -> ProxyBody {
        match self {
            RequestBody::Buffered(b) => b.body(),
            RequestBody::Streamed(s) => s.take().unwrap_or_else(|| Buffered::default().body()),
        }
    }

    /// An attempt that did not send the body hands it back.
    pub fn unsent(&mut self, body: ProxyBody) {
        if let RequestBody::Streamed(s) = self {
            *s = Some(body);
        }
    }

    pub fn is_buffered(&self) -> bool {
        matches!(self, RequestBody::Buffered(_))
    }
}

/// A body read whole, and its trailers.
#[derive(Default)]
pub struct Buffered {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Buffered {
    fn body(&self) -> ProxyBody {
        BoxBody::new(Replay { data: Some(self.data.clone()).filter(|d| !d.is_empty()), trailers: self.trailers.clone() })
    }
}

/// Reads `body` whole if it ends within `limit` bytes. A longer one is streamed: what was
/// read of it first, then the rest as it arrives.
pub async fn read(mut body: ProxyBody, limit: usize) -> Result<RequestBody, BoxError> {
    let mut data = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame?.into_data() {
            Ok(chunk) if data.len() + chunk.len() > limit => {
                data.extend_from_slice(&chunk);
                let rest = Prefixed { prefix: Some(data.freeze()), rest: body };
                return Ok(RequestBody::Streamed(Some(BoxBody::new(rest))));
            }
            Ok(chunk) => {
                data.extend_from_slice(&chunk);
                continue;
            }
            Err(frame) => frame,
        };
        // Trailers end a body.
        if let Ok(trailers) = frame.into_trailers() {
            return Ok(RequestBody::Buffered(Buffered { data: data.freeze(), trailers: Some(trailers) }));
        }
    }
    Ok(RequestBody::Buffered(Buffered { data: data.freeze(), trailers: None }))
}

/// A copy of a buffered body: one data frame, then the trailers.
struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match self.data.take() {
            Some(data) => Frame::data(data),
            None => match self.trailers.take() {
                Some(trailers) => Frame::trailers(trailers),
                None => return Poll::Ready(None),
            },
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // With trailers the length is left open, so that the body goes chunked and the
        // trailers with it.
        match &self.trailers {
            None => SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64)),
            Some(_) => SizeHint::default(),
        }
    }
}

/// A body of which the first bytes were already read.
struct Prefixed {
    prefix: Option<Bytes>,
    rest: ProxyBody,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.prefix.take() {
            Some(prefix) => Poll::Ready(Some(Ok(Frame::data(prefix)))),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.rest.size_hint();
        let n = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        hint.set_lower(hint.lower() + n);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + n);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http_body_util::Full;

    use super::*;

    /// A body that arrives in the given frames.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn chunks(parts: &[&'static str], trailers: Option<HeaderMap>) -> ProxyBody {
        let mut frames: VecDeque<Frame<Bytes>> = parts.iter().map(|p| Frame::data(Bytes::from_static(p.as_bytes()))).collect();
        frames.extend(trailers.map(Frame::trailers));
        BoxBody::new(Frames(frames))
    }

    async fn collect(body: ProxyBody) -> (Bytes, Option<HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn small_bodies_are_read_whole_and_sent_again_alike() {
        let mut trailers = HeaderMap::new();
        trailers.insert("checksum", "abc".parse().unwrap());
        let mut body = read(chunks(&["hello ", "world"], Some(trailers.clone())), 11).await.unwrap();
        assert!(body.is_buffered());
        for _ in 0..3 {
            let copy = body.for_attempt();
            assert_eq!(copy.size_hint().exact(), None, "a body with trailers goes chunked");
            assert_eq!(collect(copy).await, (Bytes::from_static(b"hello world"), Some(trailers.clone())));
        }
        let mut plain = read(BoxBody::new(Full::new(Bytes::from_static(b"abc")).map_err(|e| match e {})), 3).await.unwrap();
        assert_eq!(plain.for_attempt().size_hint().exact(), Some(3));
        let mut empty = read(chunks(&[], None), 0).await.unwrap();
        let copy = empty.for_attempt();
        assert!(copy.is_end_stream());
        assert_eq!(copy.size_hint().exact(), Some(0));
    }

    #[tokio::test]
    async fn larger_bodies_are_streamed_once_with_what_was_read() {
        let mut body = read(chunks(&["hello ", "world", "!"], None), 8).await.unwrap();
        assert!(!body.is_buffered());
        let first = body.for_attempt();
        assert_eq!(collect(first).await.0, Bytes::from_static(b"hello world!"));
        assert!(body.for_attempt().is_end_stream(), "a streamed body is sent once");
    }
}

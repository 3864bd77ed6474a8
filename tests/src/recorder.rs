//! A backend that records every byte it receives, for tests of what the proxy forwards: an
//! HTTP/1.1 server (hyper) in the lb namespace that answers every request `200` (its health
//! checks too) after reading its body, and keeps each connection's bytes as they arrived.
//! `requests_since` parses them back strictly, so that a test can assert that a backend got
//! exactly the requests it should, each framed one way only.
use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::Lb;

/// One connection's bytes, and whether it has ended.
#[derive(Default)]
struct Conn {
    bytes: Vec<u8>,
    closed: bool,
}

type Received = Arc<Mutex<Conn>>;

/// One recording backend; stops when dropped.
pub struct Recorder {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<Received>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where each connection's record stood (`Recorder::mark`).
pub struct Mark(Vec<usize>);

/// What the backends received since a mark.
#[derive(Debug, Default)]
pub struct Forwarded {
    /// Whole requests, health probes left out.
    pub requests: Vec<Recorded>,
    /// Requests cut off, on connections that then closed: a proxy that stopped forwarding a
    /// body it found broken. No backend answers those.
    pub abandoned: Vec<String>,
}

/// A request as the backend received it, parsed strictly.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// The values of every header named `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }
}

impl Recorder {
    /// Listens on `addr` in `lb`'s lb namespace.
    pub fn start(lb: &Lb, addr: SocketAddr) -> Recorder {
        let listener = lb
            .topo
            .in_lb(|| std::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("binding the recording backend on {addr}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let conns: Arc<Mutex<Vec<Received>>> = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let record = conns.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else { continue };
                        let received = Received::default();
                        record.lock().unwrap().push(received.clone());
                        let io = TokioIo::new(Tee { inner: tcp, received: received.clone() });
                        tokio::spawn(async move {
                            let _ = http1::Builder::new().serve_connection(io, service_fn(answer)).await;
                            received.lock().unwrap().closed = true;
                        });
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
        });
        Recorder { addr, conns, stop: Some(stop), thread: Some(thread) }
    }

    pub fn mark(&self) -> Mark {
        Mark(self.conns.lock().unwrap().iter().map(|c| c.lock().unwrap().bytes.len()).collect())
    }

    /// Each connection's bytes received since `mark` (none for connections without new bytes),
    /// the daemon's health probes left out: they come on connections of their own.
    pub fn bytes_since(&self, mark: &Mark) -> Vec<Vec<u8>> {
        self.since(mark).into_iter().map(|(bytes, _)| bytes).collect()
    }

    /// `bytes_since`, with whether each connection has closed.
    fn since(&self, mark: &Mark) -> Vec<(Vec<u8>, bool)> {
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = c.lock().unwrap();
                let from = mark.0.get(i).copied().unwrap_or(0);
                (c.bytes.len() > from && !c.bytes.starts_with(b"GET /health")).then(|| (c.bytes[from..].to_vec(), c.closed))
            })
            .collect()
    }

    /// The requests received since `mark`, health probes left out, once nothing more has
    /// arrived for `quiet` (at most 10 times `quiet`). Err says what a backend received that is not a sequence of whole
    /// requests, each framed one way only.
    pub fn requests_since(&self, mark: &Mark, quiet: Duration) -> Result<Forwarded, String> {
        let mut last = self.bytes_since(mark).iter().map(Vec::len).sum::<usize>();
        let mut since = Instant::now();
        let started = Instant::now();
        while since.elapsed() < quiet && started.elapsed() < 10 * quiet {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.bytes_since(mark).iter().map(Vec::len).sum::<usize>();
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        let mut forwarded = Forwarded::default();
        for (bytes, closed) in self.since(mark) {
            let (requests, rest) = parse_requests(&bytes);
            forwarded.requests.extend(requests.into_iter().filter(|r| !r.target.starts_with("/health")));
            match rest {
                None => {}
                Some(Unparsed::Incomplete(why)) if closed => forwarded.abandoned.push(why),
                Some(Unparsed::Incomplete(why) | Unparsed::Invalid(why)) => return Err(why),
            }
        }
        Ok(forwarded)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let _ = req.into_body().collect().await;
    Ok(Response::new(Full::new(Bytes::from_static(b"recorded\n"))))
}

/// What follows the whole requests in a record.
#[derive(Debug)]
pub enum Unparsed {
    /// The start of a request, cut off.
    Incomplete(String),
    /// Something no strict reading takes as a request.
    Invalid(String),
}

/// Requests back to back in `bytes`, parsed as strictly as HTTP/1.1 allows: CRLF line ends,
/// at most one Content-Length (digits only), Transfer-Encoding only as a lone `chunked` and
/// never with Content-Length, chunk sizes of hex digits. Returns the whole requests and what
/// is left, if anything.
pub fn parse_requests(bytes: &[u8]) -> (Vec<Recorded>, Option<Unparsed>) {
    let mut out = Vec::new();
    match parse_into(bytes, &mut out) {
        Ok(()) => (out, None),
        Err(rest) => (out, Some(rest)),
    }
}

fn parse_into(mut bytes: &[u8], out: &mut Vec<Recorded>) -> Result<(), Unparsed> {
    use Unparsed::{Incomplete, Invalid};
    while !bytes.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        let head = match req.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Err(Incomplete(format!("an incomplete request head: {:?}", String::from_utf8_lossy(bytes)))),
            Err(e) => return Err(Invalid(format!("not a request ({e}): {:?}", String::from_utf8_lossy(bytes)))),
        };
        if bytes[..head].windows(2).filter(|w| w == b"\r\n").count() != bytes[..head].iter().filter(|&&b| b == b'\n').count() {
            return Err(Invalid(format!("a request head with a bare LF: {:?}", String::from_utf8_lossy(&bytes[..head]))));
        }
        let fields: Vec<(String, String)> =
            req.headers.iter().map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned())).collect();
        let recorded = Recorded {
            method: req.method.unwrap_or_default().to_string(),
            target: req.path.unwrap_or_default().to_string(),
            headers: fields,
            body: Vec::new(),
        };
        let lengths = recorded.all("content-length");
        let codings = recorded.all("transfer-encoding");
        let rest = &bytes[head..];
        let (body, used) = match (lengths.as_slice(), codings.as_slice()) {
            ([], []) => (Vec::new(), 0),
            ([len], []) => {
                let len: usize = len.parse().ok().filter(|_| len.bytes().all(|b| b.is_ascii_digit())).ok_or_else(|| Invalid(format!("Content-Length {len:?}")))?;
                if rest.len() < len {
                    return Err(Incomplete(format!("a body shorter than its Content-Length {len}: {} bytes", rest.len())));
                }
                (rest[..len].to_vec(), len)
            }
            ([], ["chunked"]) => dechunk(rest)?,
            _ => return Err(Invalid(format!("ambiguous framing: Content-Length {lengths:?}, Transfer-Encoding {codings:?}"))),
        };
        out.push(Recorded { body, ..recorded });
        bytes = &rest[used..];
    }
    Ok(())
}

/// A chunked body, strictly: (the data, the bytes it took).
fn dechunk(bytes: &[u8]) -> Result<(Vec<u8>, usize), Unparsed> {
    use Unparsed::{Incomplete, Invalid};
    // Bytes `at..at + n`, or Incomplete if the record ends first.
    let take = |at: usize, n: usize, what: &str| bytes.get(at..at + n).ok_or_else(|| Incomplete(format!("cut off in {what}")));
    let mut data = Vec::new();
    let mut at = 0;
    loop {
        let line_end = bytes[at..].windows(2).position(|w| w == b"\r\n").ok_or_else(|| Incomplete("cut off in a chunk size line".into()))? + at;
        let line = &bytes[at..line_end];
        if line.is_empty() || line.len() > 16 || !line.iter().all(u8::is_ascii_hexdigit) {
            return Err(Invalid(format!("chunk size {:?}", String::from_utf8_lossy(line))));
        }
        let size = usize::from_str_radix(std::str::from_utf8(line).unwrap(), 16).map_err(|e| Invalid(format!("chunk size: {e}")))?;
        at = line_end + 2;
        if size == 0 {
            // No trailers from the proxy: the final CRLF.
            if take(at, 2, "the last chunk")? != b"\r\n" {
                return Err(Invalid("no CRLF after the last chunk".into()));
            }
            return Ok((data, at + 2));
        }
        data.extend_from_slice(take(at, size, "a chunk")?);
        at += size;
        if take(at, 2, "a chunk's end")? != b"\r\n" {
            return Err(Invalid("no CRLF after a chunk".into()));
        }
        at += 2;
    }
}

/// A TCP stream that copies what it reads into `received`.
struct Tee {
    inner: tokio::net::TcpStream,
    received: Received,
}

impl AsyncRead for Tee {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.received.lock().unwrap().bytes.extend_from_slice(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Tee {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_parsing_refuses_ambiguous_framing() {
        let ok = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let (parsed, rest) = parse_requests(ok);
        assert!(rest.is_none(), "{rest:?}");
        assert_eq!(parsed.len(), 2);
        assert_eq!((parsed[0].body.as_slice(), parsed[1].body.as_slice()), (&b"hello"[..], &b"hello"[..]));
        for bad in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\nHost: a\r\n\r\n",
        ] {
            assert!(matches!(parse_requests(bad), (_, Some(Unparsed::Invalid(_)))), "{:?}", String::from_utf8_lossy(bad));
        }
        for cut in [&b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel"[..], b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel"] {
            assert!(matches!(parse_requests(cut), (_, Some(Unparsed::Incomplete(_)))), "{:?}", String::from_utf8_lossy(cut));
        }
    }
}

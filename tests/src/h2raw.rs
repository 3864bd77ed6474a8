//! A raw HTTP/2 client for the protocol and abuse tests: it writes any frame, well formed or
//! not, byte by byte as the test says, and reads the server's frames back as events (a frame,
//! the connection closed, nothing within the timeout). A real client library (hyper, `h2`)
//! refuses to send malformed frames, which is what these tests are about.
//!
//! Request headers are encoded as HPACK literals without indexing (RFC 7541 §6.2.2), so that
//! a test controls every byte of a header block; the server's header blocks are decoded with
//! `loona_hpack` (Huffman coding and the dynamic table).
use std::{
    collections::HashMap,
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{ClientConnection, StreamOwned, pki_types::ServerName};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A frame header's length (RFC 9113 §4.1).
pub const FRAME_HEADER_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE's initial value, which the server keeps.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 16_384;

/// Frame types (RFC 9113 §6).
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;

    pub fn name(kind: u8) -> String {
        let known = ["DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING", "GOAWAY", "WINDOW_UPDATE", "CONTINUATION"];
        known.get(usize::from(kind)).map_or_else(|| format!("frame type {kind:#x}"), |n| n.to_string())
    }
}

/// Frame flags.
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// Error codes (RFC 9113 §7).
pub mod code {
    pub const NO_ERROR: u32 = 0x0;
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const INTERNAL_ERROR: u32 = 0x2;
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub const STREAM_CLOSED: u32 = 0x5;
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const COMPRESSION_ERROR: u32 = 0x9;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub fn name(code: u32) -> String {
        let known = [
            "NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT", "STREAM_CLOSED",
            "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM",
            "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED",
        ];
        known.get(code as usize).map_or_else(|| format!("error code {code:#x}"), |n| n.to_string())
    }
}

/// SETTINGS parameters (RFC 9113 §6.5.2).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// One frame from the server; a header block (HEADERS and its CONTINUATIONs) comes as one
/// HEADERS frame with its fields decoded.
#[derive(Clone, Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
    /// The decoded header fields of a HEADERS frame.
    pub headers: Vec<(String, String)>,
}

impl Frame {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// The error code of a RST_STREAM or GOAWAY.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            kind::RST_STREAM => 0,
            kind::GOAWAY => 4,
            _ => return None,
        };
        self.payload.get(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    }

    /// A header's value, for a HEADERS frame.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The response status of a HEADERS frame.
    pub fn status(&self) -> Option<u16> {
        self.header(":status").and_then(|s| s.parse().ok())
    }
}

impl std::fmt::Display for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (length {}, flags {:#04x}, stream {}", kind::name(self.kind), self.payload.len(), self.flags, self.stream)?;
        if let Some(code) = self.error_code() {
            write!(f, ", {}", code::name(code))?;
        }
        if self.kind == kind::GOAWAY && self.payload.len() > 8 {
            write!(f, ", debug {:?}", String::from_utf8_lossy(&self.payload[8..]))?;
        }
        if let Some(status) = self.status() {
            write!(f, ", :status {status}")?;
        }
        write!(f, ")")
    }
}

/// What reading the connection gave.
#[derive(Clone, Debug)]
pub enum Event {
    Frame(Frame),
    /// The server closed the connection (end of stream, or reset).
    Closed,
    /// Nothing arrived within the timeout.
    Timeout,
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Frame(frame) => frame.fmt(f),
            Event::Closed => write!(f, "the connection closed"),
            Event::Timeout => write!(f, "nothing (timed out)"),
        }
    }
}

/// A header block being received: HEADERS without END_HEADERS, until its last CONTINUATION.
struct Partial {
    flags: u8,
    stream: u32,
    block: Vec<u8>,
}

/// A TLS connection speaking HTTP/2 by ALPN, frame by frame.
pub struct H2 {
    tls: StreamOwned<ClientConnection, TcpStream>,
    /// Received plaintext not yet taken as frames.
    buf: Vec<u8>,
    partial: Option<Partial>,
    decoder: loona_hpack::Decoder<'static>,
    /// The server's SETTINGS, as last received.
    pub server_settings: HashMap<u16, u32>,
    /// How long `event` waits for a frame.
    pub timeout: Duration,
    /// Set once the server closed the connection.
    pub closed: bool,
    /// The first write that failed; nothing is written after it.
    pub write_error: Option<std::io::Error>,
}

impl H2 {
    /// A TLS handshake over `tcp` with the server `host`, offering only ALPN `h2`; nothing of
    /// HTTP/2 is sent yet (`handshake` does that).
    pub fn open(tcp: TcpStream, tls: &Arc<rustls::ClientConfig>, host: &str, timeout: Duration) -> Result<H2, String> {
        let mut config = (**tls).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(host.to_string()).map_err(|e| format!("server name {host:?}: {e}"))?;
        let conn = ClientConnection::new(Arc::new(config), name).map_err(|e| format!("TLS client: {e}"))?;
        // Each frame leaves when written, as h2spec's do (Go sets TCP_NODELAY): with Nagle's
        // algorithm a frame after a HEADERS would wait for the server's ACK, i.e. often until
        // after the response, and a test of what the server does with it would test a race.
        tcp.set_nodelay(true).map_err(|e| format!("setting TCP_NODELAY: {e}"))?;
        tcp.set_read_timeout(Some(timeout)).map_err(|e| format!("setting a read timeout: {e}"))?;
        tcp.set_write_timeout(Some(timeout)).map_err(|e| format!("setting a write timeout: {e}"))?;
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).map_err(|e| format!("TLS handshake: {e}"))?;
        }
        if tls.conn.alpn_protocol() != Some(b"h2") {
            return Err(format!("the server did not agree to h2 by ALPN (it chose {:?})", tls.conn.alpn_protocol()));
        }
        Ok(H2 {
            tls,
            buf: Vec::new(),
            partial: None,
            decoder: loona_hpack::Decoder::new(),
            server_settings: HashMap::new(),
            timeout,
            closed: false,
            write_error: None,
        })
    }

    /// Sends the preface and SETTINGS (INITIAL_WINDOW_SIZE 65535, as h2spec does), and
    /// exchanges SETTINGS acknowledgements with the server.
    pub fn handshake(&mut self) -> Result<(), String> {
        self.send(PREFACE).settings(&[(setting::INITIAL_WINDOW_SIZE, 65_535)]);
        if let Some(e) = &self.write_error {
            return Err(format!("sending the preface and SETTINGS: {e}"));
        }
        let (mut acked, mut theirs) = (false, false);
        let deadline = Instant::now() + self.timeout;
        while !(acked && theirs) {
            if Instant::now() >= deadline {
                return Err("no SETTINGS exchange within the timeout".into());
            }
            match self.event() {
                Event::Frame(f) if f.kind == kind::SETTINGS && f.has(flag::ACK) => acked = true,
                Event::Frame(f) if f.kind == kind::SETTINGS => {
                    theirs = true;
                    self.settings_ack();
                }
                Event::Frame(_) => {}
                other => return Err(format!("handshake: {other} before the SETTINGS exchange")),
            }
        }
        Ok(())
    }

    /// Writes `bytes` as they are. After a failed write nothing more is sent: the error is
    /// kept (`write_error`), as the server closing the connection while a test is still
    /// sending is often what the test expects.
    pub fn send(&mut self, bytes: &[u8]) -> &mut H2 {
        if self.write_error.is_none() {
            let _ = self.tls.sock.set_nonblocking(false);
            if let Err(e) = self.tls.write_all(bytes).and_then(|()| self.tls.flush()) {
                self.write_error = Some(e);
            }
        }
        self
    }

    /// Writes what the server takes of `bytes` within the write timeout: how many bytes it
    /// took (0 when it takes nothing: its window or buffers are full), or the error that ended
    /// the connection. For floods that go on while the server has stopped reading.
    pub fn send_some(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let _ = self.tls.sock.set_nonblocking(false);
        let mut done = 0;
        while done < bytes.len() {
            match self.tls.write(&bytes[done..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => break,
                Err(e) => return Err(e),
            }
        }
        match self.tls.flush() {
            Err(e) if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => Err(e),
            _ => Ok(done),
        }
    }

    /// How long a write waits for the server to take bytes.
    pub fn set_write_timeout(&mut self, timeout: Duration) {
        let _ = self.tls.sock.set_write_timeout(Some(timeout));
    }

    /// Writes one frame.
    pub fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> &mut H2 {
        self.send(&frame_bytes(kind, flags, stream, payload))
    }

    /// A HEADERS frame carrying `block`.
    pub fn headers(&mut self, stream: u32, flags: u8, block: &[u8]) -> &mut H2 {
        self.frame(kind::HEADERS, flags, stream, block)
    }

    /// A complete request head on `stream` (END_HEADERS; END_STREAM when `end_stream`).
    pub fn request(&mut self, stream: u32, fields: &[(&str, &str)], end_stream: bool) -> &mut H2 {
        let flags = flag::END_HEADERS | if end_stream { flag::END_STREAM } else { 0 };
        self.headers(stream, flags, &encode(fields))
    }

    pub fn continuation(&mut self, stream: u32, end_headers: bool, block: &[u8]) -> &mut H2 {
        self.frame(kind::CONTINUATION, if end_headers { flag::END_HEADERS } else { 0 }, stream, block)
    }

    pub fn data(&mut self, stream: u32, end_stream: bool, data: &[u8]) -> &mut H2 {
        self.frame(kind::DATA, if end_stream { flag::END_STREAM } else { 0 }, stream, data)
    }

    pub fn rst_stream(&mut self, stream: u32, code: u32) -> &mut H2 {
        self.frame(kind::RST_STREAM, 0, stream, &code.to_be_bytes())
    }

    pub fn settings(&mut self, settings: &[(u16, u32)]) -> &mut H2 {
        let payload: Vec<u8> = settings.iter().flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes())).collect();
        self.frame(kind::SETTINGS, 0, 0, &payload)
    }

    pub fn settings_ack(&mut self) -> &mut H2 {
        self.frame(kind::SETTINGS, flag::ACK, 0, &[])
    }

    pub fn ping(&mut self, ack: bool, data: [u8; 8]) -> &mut H2 {
        self.frame(kind::PING, if ack { flag::ACK } else { 0 }, 0, &data)
    }

    pub fn goaway(&mut self, last_stream: u32, code: u32, debug: &[u8]) -> &mut H2 {
        let payload: Vec<u8> = last_stream.to_be_bytes().into_iter().chain(code.to_be_bytes()).chain(debug.iter().copied()).collect();
        self.frame(kind::GOAWAY, 0, 0, &payload)
    }

    pub fn window_update(&mut self, stream: u32, increment: u32) -> &mut H2 {
        self.frame(kind::WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
    }

    pub fn priority(&mut self, stream: u32, depends_on: u32, exclusive: bool, weight: u8) -> &mut H2 {
        self.frame(kind::PRIORITY, 0, stream, &priority_fields(depends_on, exclusive, weight))
    }

    /// The next frame, or the connection's end, waiting at most `timeout`.
    pub fn event(&mut self) -> Event {
        self.event_within(self.timeout)
    }

    /// The next frame or the connection's end if one is there within `wait` (zero: only what
    /// has already arrived).
    pub fn event_within(&mut self, wait: Duration) -> Event {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(frame) = self.take_frame() {
                return Event::Frame(frame);
            }
            if self.closed {
                return Event::Closed;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.fill(left) {
                Ok(true) => {}
                Ok(false) => return Event::Timeout,
                Err(()) => {
                    self.closed = true;
                }
            }
        }
    }

    /// Reads what arrives within `wait` into the buffer: Ok(false) when nothing did, Err when
    /// the connection ended.
    fn fill(&mut self, wait: Duration) -> Result<bool, ()> {
        let sock = &self.tls.sock;
        let set = if wait.is_zero() {
            sock.set_nonblocking(true)
        } else {
            sock.set_nonblocking(false).and_then(|()| sock.set_read_timeout(Some(wait)))
        };
        set.map_err(|_| ())?;
        let mut chunk = [0u8; 16_384];
        let read = self.tls.read(&mut chunk);
        let _ = self.tls.sock.set_nonblocking(false);
        match read {
            Ok(0) => Err(()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => Ok(false),
            Err(_) => Err(()),
        }
    }

    /// The next whole frame in the buffer; a header block is gathered until END_HEADERS.
    fn take_frame(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() < FRAME_HEADER_LEN {
                return None;
            }
            let len = usize::from(self.buf[0]) << 16 | usize::from(self.buf[1]) << 8 | usize::from(self.buf[2]);
            if self.buf.len() < FRAME_HEADER_LEN + len {
                return None;
            }
            let kind = self.buf[3];
            let flags = self.buf[4];
            let stream = u32::from_be_bytes(self.buf[5..9].try_into().unwrap()) & 0x7fff_ffff;
            let payload = self.buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len].to_vec();
            self.buf.drain(..FRAME_HEADER_LEN + len);
            let frame = Frame { kind, flags, stream, payload, headers: Vec::new() };
            match frame.kind {
                kind::SETTINGS if !frame.has(flag::ACK) => {
                    for s in frame.payload.chunks_exact(6) {
                        self.server_settings.insert(u16::from_be_bytes([s[0], s[1]]), u32::from_be_bytes(s[2..6].try_into().unwrap()));
                    }
                    return Some(frame);
                }
                kind::HEADERS => {
                    let block = header_block(&frame);
                    self.partial = Some(Partial { flags: frame.flags, stream: frame.stream, block });
                }
                kind::CONTINUATION if self.partial.is_some() => {
                    let partial = self.partial.as_mut().unwrap();
                    partial.block.extend_from_slice(&frame.payload);
                    partial.flags |= frame.flags & flag::END_HEADERS;
                }
                _ => return Some(frame),
            }
            if self.partial.as_ref().is_some_and(|p| p.flags & flag::END_HEADERS != 0) {
                let Partial { flags, stream, block } = self.partial.take().unwrap();
                let headers = match self.decoder.decode(&block) {
                    Ok(fields) => fields
                        .into_iter()
                        .map(|(n, v)| (String::from_utf8_lossy(&n).into_owned(), String::from_utf8_lossy(&v).into_owned()))
                        .collect(),
                    Err(e) => vec![("x-h2raw-decoding-error".to_string(), format!("{e:?}"))],
                };
                return Some(Frame { kind: kind::HEADERS, flags, stream, payload: block, headers });
            }
        }
    }

    /// Reads until an event satisfies `want` (returning what it gave), the connection closes or
    /// nothing more comes within the timeout. Err names what came instead: the last frame seen
    /// or the close, as h2spec reports it.
    pub fn wait_for<T>(&mut self, mut want: impl FnMut(&Event) -> Option<T>) -> Result<T, String> {
        let mut seen = Vec::new();
        loop {
            let event = self.event();
            if let Some(t) = want(&event) {
                return Ok(t);
            }
            match event {
                Event::Frame(f) => seen.push(f.to_string()),
                Event::Closed | Event::Timeout => {
                    seen.push(event.to_string());
                    let shown = seen.len().saturating_sub(6);
                    return Err(seen[shown..].join(", then "));
                }
            }
        }
    }

    /// h2spec's `VerifyConnectionError`: a GOAWAY with one of `codes`, or the connection closed.
    pub fn expect_connection_error(&mut self, codes: &[u32]) -> Result<String, String> {
        self.wait_for(|e| match e {
            Event::Closed => Some(e.to_string()),
            Event::Frame(f) if f.kind == kind::GOAWAY && f.error_code().is_some_and(|c| codes.contains(&c)) => Some(f.to_string()),
            _ => None,
        })
        .map_err(|got| format!("expected GOAWAY ({}) or the connection closed; got {got}", names(codes)))
    }

    /// h2spec's `VerifyStreamError`: a RST_STREAM or GOAWAY with one of `codes`, or the
    /// connection closed.
    pub fn expect_stream_error(&mut self, codes: &[u32]) -> Result<String, String> {
        self.wait_for(|e| match e {
            Event::Closed => Some(e.to_string()),
            Event::Frame(f)
                if matches!(f.kind, kind::GOAWAY | kind::RST_STREAM) && f.error_code().is_some_and(|c| codes.contains(&c)) =>
            {
                Some(f.to_string())
            }
            _ => None,
        })
        .map_err(|got| format!("expected RST_STREAM or GOAWAY ({}) or the connection closed; got {got}", names(codes)))
    }

    /// h2spec's `VerifyStreamClose`: a frame ending a stream (or RST_STREAM NO_ERROR).
    pub fn expect_stream_close(&mut self) -> Result<String, String> {
        self.wait_for(|e| match e {
            Event::Frame(f) if matches!(f.kind, kind::DATA | kind::HEADERS) && f.has(flag::END_STREAM) => Some(f.to_string()),
            Event::Frame(f) if f.kind == kind::RST_STREAM && f.error_code() == Some(code::NO_ERROR) => Some(f.to_string()),
            _ => None,
        })
        .map_err(|got| format!("expected the stream to end; got {got}"))
    }

    /// h2spec's `VerifyHeadersFrame`: a HEADERS frame on `stream` (a response).
    pub fn expect_headers(&mut self, stream: u32) -> Result<String, String> {
        self.wait_for(|e| match e {
            Event::Frame(f) if f.kind == kind::HEADERS && f.stream == stream => Some(f.to_string()),
            _ => None,
        })
        .map_err(|got| format!("expected HEADERS on stream {stream}; got {got}"))
    }

    /// h2spec's `VerifyEventType`: a frame of `kind`.
    pub fn expect_kind(&mut self, kind: u8) -> Result<Frame, String> {
        self.wait_for(|e| match e {
            Event::Frame(f) if f.kind == kind => Some(f.clone()),
            _ => None,
        })
        .map_err(|got| format!("expected {}; got {got}", kind::name(kind)))
    }

    /// h2spec's `VerifySettingsFrameWithAck`.
    pub fn expect_settings_ack(&mut self) -> Result<String, String> {
        self.wait_for(|e| match e {
            Event::Frame(f) if f.kind == kind::SETTINGS && f.has(flag::ACK) => Some(f.to_string()),
            _ => None,
        })
        .map_err(|got| format!("expected a SETTINGS ACK; got {got}"))
    }

    /// h2spec's `VerifyPingFrameWithAck` (or, with `or_close`, `VerifyPingFrameOrConnectionClose`).
    pub fn expect_ping_ack(&mut self, data: [u8; 8], or_close: bool) -> Result<String, String> {
        self.wait_for(|e| match e {
            Event::Frame(f) if f.kind == kind::PING && f.has(flag::ACK) && f.payload == data => Some(f.to_string()),
            Event::Closed if or_close => Some(e.to_string()),
            _ => None,
        })
        .map_err(|got| format!("expected a PING ACK with the payload sent; got {got}"))
    }
}

fn names(codes: &[u32]) -> String {
    codes.iter().map(|&c| code::name(c)).collect::<Vec<_>>().join(" or ")
}

/// A HEADERS frame's header block fragment: without its padding and priority fields.
fn header_block(frame: &Frame) -> Vec<u8> {
    let mut p = &frame.payload[..];
    let mut pad = 0;
    if frame.has(flag::PADDED) && !p.is_empty() {
        pad = usize::from(p[0]);
        p = &p[1..];
    }
    if frame.has(flag::PRIORITY) && p.len() >= 5 {
        p = &p[5..];
    }
    p[..p.len().saturating_sub(pad)].to_vec()
}

/// A frame's bytes: the 9-byte header and the payload.
pub fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    assert!(len < 1 << 24, "a frame payload is at most 2^24-1 bytes, not {len}");
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + len);
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The five bytes of a priority (PRIORITY's payload, HEADERS' with the PRIORITY flag): stream
/// dependency, exclusive bit, weight.
pub fn priority_fields(depends_on: u32, exclusive: bool, weight: u8) -> [u8; 5] {
    let dep = depends_on | if exclusive { 0x8000_0000 } else { 0 };
    let b = dep.to_be_bytes();
    [b[0], b[1], b[2], b[3], weight]
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), the prefix's first byte carrying
/// `high` in the bits above it.
pub fn hpack_int(out: &mut Vec<u8>, value: usize, n: u8, high: u8) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// A literal header field without indexing, with a new name, neither string Huffman-coded
/// (RFC 7541 §6.2.2): the server sees exactly these bytes of name and value.
pub fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_int(out, name.len(), 7, 0);
    out.extend_from_slice(name);
    hpack_int(out, value.len(), 7, 0);
    out.extend_from_slice(value);
}

/// A header block of literals, in order.
pub fn encode(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        literal(&mut out, name.as_bytes(), value.as_bytes());
    }
    out
}

/// The pseudo-headers of a request to `https://authority{path}` (h2spec's `CommonHeaders`).
pub fn request_fields<'a>(method: &'a str, path: &'a str, authority: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![(":method", method), (":scheme", "https"), (":path", path), (":authority", authority)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_follow_rfc7541_c1() {
        // C.1.1–C.1.3: 10 in a 5-bit prefix, 1337 in a 5-bit prefix, 42 in an 8-bit prefix.
        let mut out = Vec::new();
        hpack_int(&mut out, 10, 5, 0);
        assert_eq!(out, [0x0a]);
        out.clear();
        hpack_int(&mut out, 1337, 5, 0);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        out.clear();
        hpack_int(&mut out, 42, 8, 0);
        assert_eq!(out, [0x2a]);
    }

    #[test]
    fn literals_decode_to_what_was_encoded() {
        let fields = [(":method", "GET"), ("x-long", &"v".repeat(300)[..])];
        let block = encode(&fields);
        let decoded = loona_hpack::Decoder::new().decode(&block).unwrap();
        let decoded: Vec<(&[u8], &[u8])> = decoded.iter().map(|(n, v)| (&n[..], &v[..])).collect();
        assert_eq!(decoded, fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())).collect::<Vec<_>>());
    }

    #[test]
    fn frames_have_a_nine_byte_header() {
        assert_eq!(frame_bytes(kind::PING, flag::ACK, 0, &[7; 8])[..9], [0, 0, 8, 6, 1, 0, 0, 0, 0]);
        assert_eq!(frame_bytes(kind::HEADERS, 0, 0x8000_0001, &[])[5..9], [0x80, 0, 0, 1]);
    }
}

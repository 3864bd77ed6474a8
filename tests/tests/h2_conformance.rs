//! HTTP/2 conformance of the deployed proxy: h2spec's case list (github.com/summerwind/h2spec:
//! its `http2`, `generic` and `hpack` groups), case by case, against the daemon's `https`
//! service with the three demo backends behind it. Each case is named by h2spec's id
//! (`group/section/n`) and the RFC section it checks, sends what h2spec sends and asserts what
//! h2spec accepts: a GOAWAY or RST_STREAM with the error code given (or the connection closed,
//! which h2spec also accepts), a response, or an acknowledgement.
//!
//! Run as root: `cargo xtask test -- -p xlb-tests --test h2_conformance -- --nocapture`;
//! `XLB_H2SPEC=http2/6.9` runs only the cases whose id starts so.

use std::time::{Duration, Instant};

use xlb_tests::{
    h2raw::{self, H2, code, flag, kind, setting},
    *,
};

/// How long each expectation waits: h2spec's default timeout.
const TIMEOUT: Duration = Duration::from_secs(2);
/// h2spec's `--max-header-length` default: the length of each dummy header's value.
const DUMMY_LEN: usize = 4000;

type Fields = Vec<(String, String)>;
type Run = fn(&mut H2) -> Result<String, String>;

struct Case {
    /// h2spec's id.
    id: &'static str,
    /// The RFC section the case checks (h2spec's numbering is RFC 7540's; RFC 9113 kept it).
    rfc: &'static str,
    desc: &'static str,
    run: Run,
}

fn f(name: &str, value: &str) -> (String, String) {
    (name.to_string(), value.to_string())
}

/// h2spec's `CommonHeaders` with `method`.
fn common(method: &str) -> Fields {
    h2raw::request_fields(method, "/", SITE).into_iter().map(|(n, v)| f(n, v)).collect()
}

fn with(mut fields: Fields, more: &[(&str, &str)]) -> Fields {
    fields.extend(more.iter().map(|(n, v)| f(n, v)));
    fields
}

/// h2spec's `DummyHeaders(n)`: `x-dummy<i>` with values of `DUMMY_LEN` bytes.
fn dummies(n: usize) -> Fields {
    (0..n).map(|i| (format!("x-dummy{i}"), "x".repeat(DUMMY_LEN))).collect()
}

fn enc(fields: &Fields) -> Vec<u8> {
    let borrowed: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    h2raw::encode(&borrowed)
}

fn get() -> Vec<u8> {
    enc(&common("GET"))
}

fn post() -> Vec<u8> {
    enc(&common("POST"))
}

const EH: u8 = flag::END_HEADERS;
const ES: u8 = flag::END_STREAM;

fn hs(c: &mut H2) -> Result<(), String> {
    c.handshake()
}

/// A DATA frame of exactly `len` bytes on stream 1 after the settings exchange (6.5.3/1,
/// 6.9.1/1, 6.9.2/1).
fn data_of_length(c: &mut H2, len: usize) -> Result<String, String> {
    let frame = c.expect_kind(kind::DATA)?;
    if frame.stream == 1 && frame.payload.len() == len { Ok(frame.to_string()) } else { Err(format!("expected DATA of length {len} on stream 1; got {frame}")) }
}

const CASES: &[Case] = &[
    // ---- http2: RFC 7540 ----
    Case { id: "http2/3.5/1", rfc: "RFC 7540 §3.5", desc: "Sends client connection preface", run: |c| {
        c.send(h2raw::PREFACE).settings(&[(setting::INITIAL_WINDOW_SIZE, 65_535)]);
        match c.event() {
            h2raw::Event::Frame(fr) if fr.kind == kind::SETTINGS && !fr.has(flag::ACK) => Ok(fr.to_string()),
            other => Err(format!("expected SETTINGS (not an ACK) first; got {other}")),
        }
    }},
    Case { id: "http2/3.5/2", rfc: "RFC 7540 §3.5", desc: "Sends invalid connection preface", run: |c| {
        c.send(b"INVALID CONNECTION PREFACE\r\n\r\n");
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/4.1/1", rfc: "RFC 7540 §4.1", desc: "Sends a frame with unknown type", run: |c| {
        hs(c)?;
        c.frame(0x16, 0, 0, &[0; 8]).ping(false, [0; 8]);
        c.expect_ping_ack([0; 8], false)
    }},
    Case { id: "http2/4.1/2", rfc: "RFC 7540 §4.1", desc: "Sends a frame with undefined flag", run: |c| {
        hs(c)?;
        c.frame(kind::PING, 0x16, 0, &[0; 8]);
        c.expect_kind(kind::PING).map(|fr| fr.to_string())
    }},
    Case { id: "http2/4.1/3", rfc: "RFC 7540 §4.1", desc: "Sends a frame with reserved field bit", run: |c| {
        hs(c)?;
        c.send(b"\x00\x00\x08\x06\x16\x80\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00");
        c.expect_kind(kind::PING).map(|fr| fr.to_string())
    }},
    Case { id: "http2/4.2/1", rfc: "RFC 7540 §4.2", desc: "Sends a DATA frame with 2^14 octets in length", run: |c| {
        hs(c)?;
        c.headers(1, EH, &post()).data(1, true, &vec![b'x'; h2raw::DEFAULT_MAX_FRAME_SIZE]);
        c.expect_headers(1)
    }},
    Case { id: "http2/4.2/2", rfc: "RFC 7540 §4.2", desc: "Sends a large size DATA frame that exceeds the SETTINGS_MAX_FRAME_SIZE", run: |c| {
        hs(c)?;
        c.headers(1, EH, &post()).data(1, true, &vec![b'x'; h2raw::DEFAULT_MAX_FRAME_SIZE + 1]);
        c.expect_stream_error(&[code::FRAME_SIZE_ERROR])
    }},
    Case { id: "http2/4.2/3", rfc: "RFC 7540 §4.2", desc: "Sends a large size HEADERS frame that exceeds the SETTINGS_MAX_FRAME_SIZE", run: |c| {
        hs(c)?;
        let mut fields = common("GET");
        fields.extend(dummies(5));
        c.headers(1, EH | ES, &enc(&fields));
        c.expect_connection_error(&[code::FRAME_SIZE_ERROR])
    }},
    Case { id: "http2/4.3/1", rfc: "RFC 7540 §4.3", desc: "Sends invalid header block fragment", run: |c| {
        hs(c)?;
        c.send(b"\x00\x00\x01\x01\x05\x00\x00\x00\x01\x40");
        c.expect_connection_error(&[code::COMPRESSION_ERROR])
    }},
    Case { id: "http2/4.3/2", rfc: "RFC 7540 §4.3", desc: "Sends a PRIORITY frame while sending the header blocks", run: |c| {
        hs(c)?;
        c.headers(1, 0, &get()).priority(1, 0, false, 255).continuation(1, true, &enc(&dummies(1)));
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/4.3/3", rfc: "RFC 7540 §4.3", desc: "Sends a HEADERS frame to another stream while sending the header blocks", run: |c| {
        hs(c)?;
        c.headers(1, 0, &get()).headers(3, EH | ES, &get()).continuation(1, true, &enc(&dummies(1)));
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/5.1/1", rfc: "RFC 7540 §5.1", desc: "idle: Sends a DATA frame", run: |c| {
        hs(c)?;
        c.data(1, true, b"test");
        c.expect_stream_error(&[code::PROTOCOL_ERROR, code::STREAM_CLOSED])
    }},
    Case { id: "http2/5.1/2", rfc: "RFC 7540 §5.1", desc: "idle: Sends a RST_STREAM frame", run: |c| {
        hs(c)?;
        c.rst_stream(1, code::CANCEL);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/5.1/3", rfc: "RFC 7540 §5.1", desc: "idle: Sends a WINDOW_UPDATE frame", run: |c| {
        hs(c)?;
        c.window_update(1, 100);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/5.1/4", rfc: "RFC 7540 §5.1", desc: "idle: Sends a CONTINUATION frame", run: |c| {
        hs(c)?;
        c.continuation(1, true, &get());
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/5.1/5", rfc: "RFC 7540 §5.1", desc: "half closed (remote): Sends a DATA frame", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &get()).data(1, true, b"test");
        c.expect_stream_error(&[code::STREAM_CLOSED])
    }},
    Case { id: "http2/5.1/6", rfc: "RFC 7540 §5.1", desc: "half closed (remote): Sends a HEADERS frame", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &get()).headers(1, EH | ES, &get());
        c.expect_stream_error(&[code::STREAM_CLOSED])
    }},
    Case { id: "http2/5.1/7", rfc: "RFC 7540 §5.1", desc: "half closed (remote): Sends a CONTINUATION frame", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &get()).continuation(1, true, &get());
        c.expect_stream_error(&[code::STREAM_CLOSED, code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/5.1/8", rfc: "RFC 7540 §5.1", desc: "closed: Sends a DATA frame after sending RST_STREAM frame", run: |c| {
        hs(c)?;
        c.headers(1, EH, &get()).rst_stream(1, code::CANCEL).data(1, true, b"test");
        c.expect_stream_error(&[code::STREAM_CLOSED])
    }},
    Case { id: "http2/5.1/9", rfc: "RFC 7540 §5.1", desc: "closed: Sends a HEADERS frame after sending RST_STREAM frame", run: |c| {
        hs(c)?;
        c.headers(1, EH, &get()).rst_stream(1, code::CANCEL).headers(1, EH | ES, &get());
        c.expect_stream_error(&[code::STREAM_CLOSED])
    }},
    Case { id: "http2/5.1/10", rfc: "RFC 7540 §5.1", desc: "closed: Sends a CONTINUATION frame after sending RST_STREAM frame", run: |c| {
        hs(c)?;
        c.headers(1, EH, &get()).rst_stream(1, code::CANCEL).continuation(1, true, &enc(&dummies(1)));
        c.expect_stream_error(&[code::STREAM_CLOSED, code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/5.1/11", rfc: "RFC 7540 §5.1", desc: "closed: Sends a DATA frame", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &get());
        c.expect_stream_close()?;
        c.data(1, true, b"test");
        c.expect_stream_error(&[code::STREAM_CLOSED])
    }},
    Case { id: "http2/5.1/12", rfc: "RFC 7540 §5.1", desc: "closed: Sends a HEADERS frame", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &get());
        c.expect_stream_close()?;
        c.headers(1, EH | ES, &get());
        c.expect_connection_error(&[code::STREAM_CLOSED])
    }},
    Case { id: "http2/5.1/13", rfc: "RFC 7540 §5.1", desc: "closed: Sends a CONTINUATION frame", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &get());
        c.expect_stream_close()?;
        c.continuation(1, true, &enc(&dummies(1)));
        c.expect_connection_error(&[code::STREAM_CLOSED, code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/5.1.1/1", rfc: "RFC 7540 §5.1.1", desc: "Sends even-numbered stream identifier", run: |c| {
        hs(c)?;
        c.headers(2, EH | ES, &get());
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/5.1.1/2", rfc: "RFC 7540 §5.1.1", desc: "Sends stream identifier that is numerically smaller than previous", run: |c| {
        hs(c)?;
        c.headers(5, EH | ES, &get()).headers(3, EH | ES, &get());
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/5.1.2/1", rfc: "RFC 7540 §5.1.2", desc: "Sends HEADERS frames that causes their advertised concurrent stream limit to be exceeded", run: |c| {
        hs(c)?;
        let max = *c.server_settings.get(&setting::MAX_CONCURRENT_STREAMS).ok_or("the server advertised no SETTINGS_MAX_CONCURRENT_STREAMS (h2spec skips; xlb always sets it)")?;
        c.settings(&[(setting::INITIAL_WINDOW_SIZE, 0)]);
        let block = get();
        for i in 0..=max {
            c.headers(1 + 2 * i, EH | ES, &block);
        }
        c.expect_stream_error(&[code::PROTOCOL_ERROR, code::REFUSED_STREAM])
    }},
    Case { id: "http2/5.3.1/1", rfc: "RFC 7540 §5.3.1", desc: "Sends HEADERS frame that depends on itself", run: |c| {
        hs(c)?;
        let mut payload = h2raw::priority_fields(1, false, 255).to_vec();
        payload.extend(get());
        c.headers(1, EH | ES | flag::PRIORITY, &payload);
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/5.3.1/2", rfc: "RFC 7540 §5.3.1", desc: "Sends PRIORITY frame that depend on itself", run: |c| {
        hs(c)?;
        c.priority(1, 1, false, 255);
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/5.4.1/1", rfc: "RFC 7540 §5.4.1", desc: "Sends an invalid PING frame for connection close", run: |c| {
        hs(c)?;
        c.frame(kind::PING, 0, 3, &[0; 8]);
        c.wait_for(|e| matches!(e, h2raw::Event::Closed).then(|| e.to_string())).map_err(|got| format!("expected the connection closed; got {got}"))
    }},
    Case { id: "http2/5.4.1/2", rfc: "RFC 7540 §5.4.1 (h2spec --strict)", desc: "Sends an invalid PING frame to receive GOAWAY frame", run: |c| {
        hs(c)?;
        c.frame(kind::PING, 0, 3, &[0; 8]);
        c.expect_kind(kind::GOAWAY).map(|fr| fr.to_string())
    }},
    Case { id: "http2/5.5/1", rfc: "RFC 7540 §5.5", desc: "Sends an unknown extension frame", run: |c| {
        hs(c)?;
        c.frame(0x16, 0, 0, &[0; 8]).ping(false, [0; 8]);
        c.expect_ping_ack([0; 8], false)
    }},
    Case { id: "http2/5.5/2", rfc: "RFC 7540 §5.5", desc: "Sends an unknown extension frame in the middle of a header block", run: |c| {
        hs(c)?;
        c.headers(1, ES, &get()).frame(0x16, 0, 0, &[0; 8]);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.1/1", rfc: "RFC 7540 §6.1", desc: "Sends a DATA frame with 0x0 stream identifier", run: |c| {
        hs(c)?;
        c.data(0, true, b"test");
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.1/2", rfc: "RFC 7540 §6.1", desc: "Sends a DATA frame on the stream that is not in \"open\" or \"half-closed (local)\" state", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &post()).data(1, true, b"test");
        c.expect_stream_error(&[code::STREAM_CLOSED])
    }},
    Case { id: "http2/6.1/3", rfc: "RFC 7540 §6.1", desc: "Sends a DATA frame with invalid pad length", run: |c| {
        hs(c)?;
        c.headers(1, EH, &enc(&with(common("POST"), &[("content-length", "4")])));
        c.send(b"\x00\x00\x05\x00\x09\x00\x00\x00\x01\x06\x54\x65\x73\x74");
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.2/1", rfc: "RFC 7540 §6.2", desc: "Sends a HEADERS frame without the END_HEADERS flag, and a PRIORITY frame", run: |c| {
        hs(c)?;
        c.headers(1, 0, &get()).priority(1, 0, false, 255).continuation(1, true, &enc(&dummies(1)));
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.2/2", rfc: "RFC 7540 §6.2", desc: "Sends a HEADERS frame to another stream while sending a HEADERS frame", run: |c| {
        hs(c)?;
        c.headers(1, 0, &get()).headers(3, EH | ES, &get()).continuation(1, true, &enc(&dummies(1)));
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.2/3", rfc: "RFC 7540 §6.2", desc: "Sends a HEADERS frame with 0x0 stream identifier", run: |c| {
        hs(c)?;
        c.headers(0, EH | ES, &get());
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.2/4", rfc: "RFC 7540 §6.2", desc: "Sends a HEADERS frame with invalid pad length", run: |c| {
        hs(c)?;
        let block = get();
        // Padded, with a pad length longer than what follows it.
        let mut payload = vec![(block.len() + 2) as u8];
        payload.extend(&block);
        c.headers(1, EH | ES | flag::PADDED, &payload);
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.3/1", rfc: "RFC 7540 §6.3", desc: "Sends a PRIORITY frame with 0x0 stream identifier", run: |c| {
        hs(c)?;
        c.priority(0, 0, false, 255);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.3/2", rfc: "RFC 7540 §6.3", desc: "Sends a PRIORITY frame with a length other than 5 octets", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &get()).frame(kind::PRIORITY, 0, 1, b"\x80\x00\x00\x01");
        c.expect_stream_error(&[code::FRAME_SIZE_ERROR])
    }},
    Case { id: "http2/6.4/1", rfc: "RFC 7540 §6.4", desc: "Sends a RST_STREAM frame with 0x0 stream identifier", run: |c| {
        hs(c)?;
        c.rst_stream(0, code::CANCEL);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.4/2", rfc: "RFC 7540 §6.4", desc: "Sends a RST_STREAM frame on a idle stream", run: |c| {
        hs(c)?;
        c.rst_stream(1, code::CANCEL);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.4/3", rfc: "RFC 7540 §6.4", desc: "Sends a RST_STREAM frame with a length other than 4 octets", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &get()).frame(kind::RST_STREAM, 0, 1, b"\x00\x00\x00");
        c.expect_stream_error(&[code::FRAME_SIZE_ERROR])
    }},
    Case { id: "http2/6.5/1", rfc: "RFC 7540 §6.5", desc: "Sends a SETTINGS frame with ACK flag and payload", run: |c| {
        hs(c)?;
        c.frame(kind::SETTINGS, flag::ACK, 0, b"\x00");
        c.expect_connection_error(&[code::FRAME_SIZE_ERROR])
    }},
    Case { id: "http2/6.5/2", rfc: "RFC 7540 §6.5", desc: "Sends a SETTINGS frame with a stream identifier other than 0x0", run: |c| {
        hs(c)?;
        c.frame(kind::SETTINGS, 0, 1, b"\x00\x03\x00\x00\x00\x64");
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.5/3", rfc: "RFC 7540 §6.5", desc: "Sends a SETTINGS frame with a length other than a multiple of 6 octets", run: |c| {
        hs(c)?;
        c.frame(kind::SETTINGS, 0, 0, b"\x00\x03\x00");
        c.expect_stream_error(&[code::PROTOCOL_ERROR, code::FRAME_SIZE_ERROR])
    }},
    Case { id: "http2/6.5.2/1", rfc: "RFC 7540 §6.5.2", desc: "SETTINGS_ENABLE_PUSH (0x2): Sends the value other than 0 or 1", run: |c| {
        hs(c)?;
        c.settings(&[(setting::ENABLE_PUSH, 2)]);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.5.2/2", rfc: "RFC 7540 §6.5.2", desc: "SETTINGS_INITIAL_WINDOW_SIZE (0x4): Sends the value above the maximum flow control window size", run: |c| {
        hs(c)?;
        c.settings(&[(setting::INITIAL_WINDOW_SIZE, 1 << 31)]);
        c.expect_connection_error(&[code::FLOW_CONTROL_ERROR])
    }},
    Case { id: "http2/6.5.2/3", rfc: "RFC 7540 §6.5.2", desc: "SETTINGS_MAX_FRAME_SIZE (0x5): Sends the value below the initial value", run: |c| {
        hs(c)?;
        c.settings(&[(setting::MAX_FRAME_SIZE, 16_383)]);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.5.2/4", rfc: "RFC 7540 §6.5.2", desc: "SETTINGS_MAX_FRAME_SIZE (0x5): Sends the value above the maximum allowed frame size", run: |c| {
        hs(c)?;
        c.settings(&[(setting::MAX_FRAME_SIZE, 16_777_216)]);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.5.2/5", rfc: "RFC 7540 §6.5.2", desc: "Sends a SETTINGS frame with unknown identifier", run: |c| {
        hs(c)?;
        c.settings(&[(0xff, 1)]).ping(false, [0; 8]);
        c.expect_ping_ack([0; 8], false)
    }},
    Case { id: "http2/6.5.3/1", rfc: "RFC 7540 §6.5.3", desc: "Sends multiple values of SETTINGS_INITIAL_WINDOW_SIZE", run: |c| {
        hs(c)?;
        c.settings(&[(setting::INITIAL_WINDOW_SIZE, 100), (setting::INITIAL_WINDOW_SIZE, 1)]);
        c.expect_settings_ack()?;
        c.headers(1, EH | ES, &get());
        data_of_length(c, 1)
    }},
    Case { id: "http2/6.5.3/2", rfc: "RFC 7540 §6.5.3", desc: "Sends a SETTINGS frame without ACK flag", run: |c| {
        hs(c)?;
        c.settings(&[(setting::ENABLE_PUSH, 0)]);
        c.expect_settings_ack()
    }},
    Case { id: "http2/6.7/1", rfc: "RFC 7540 §6.7", desc: "Sends a PING frame", run: |c| {
        hs(c)?;
        c.ping(false, *b"h2spec\0\0");
        c.expect_ping_ack(*b"h2spec\0\0", false)
    }},
    Case { id: "http2/6.7/2", rfc: "RFC 7540 §6.7", desc: "Sends a PING frame with ACK", run: |c| {
        hs(c)?;
        c.ping(true, *b"invalid\0").ping(false, *b"h2spec\0\0");
        c.expect_ping_ack(*b"h2spec\0\0", false)
    }},
    Case { id: "http2/6.7/3", rfc: "RFC 7540 §6.7", desc: "Sends a PING frame with a stream identifier field value other than 0x0", run: |c| {
        hs(c)?;
        c.frame(kind::PING, 0, 1, &[0; 8]);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.7/4", rfc: "RFC 7540 §6.7", desc: "Sends a PING frame with a length field value other than 8", run: |c| {
        hs(c)?;
        c.frame(kind::PING, 0, 0, &[0; 6]);
        c.expect_connection_error(&[code::FRAME_SIZE_ERROR])
    }},
    Case { id: "http2/6.8/1", rfc: "RFC 7540 §6.8", desc: "Sends a GOAWAY frame with a stream identifier other than 0x0", run: |c| {
        hs(c)?;
        c.frame(kind::GOAWAY, 0, 1, &[0; 8]);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.9/1", rfc: "RFC 7540 §6.9", desc: "Sends a WINDOW_UPDATE frame with a flow control window increment of 0", run: |c| {
        hs(c)?;
        c.window_update(0, 0);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.9/2", rfc: "RFC 7540 §6.9", desc: "Sends a WINDOW_UPDATE frame with a flow control window increment of 0 on a stream", run: |c| {
        hs(c)?;
        c.headers(1, EH, &get()).window_update(1, 0);
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.9/3", rfc: "RFC 7540 §6.9", desc: "Sends a WINDOW_UPDATE frame with a length other than 4 octets", run: |c| {
        hs(c)?;
        c.frame(kind::WINDOW_UPDATE, 0, 0, b"\x00\x00\x01");
        c.expect_connection_error(&[code::FRAME_SIZE_ERROR])
    }},
    Case { id: "http2/6.9.1/1", rfc: "RFC 7540 §6.9.1", desc: "Sends SETTINGS frame to set the initial window size to 1 and sends HEADERS frame", run: |c| {
        hs(c)?;
        c.settings(&[(setting::INITIAL_WINDOW_SIZE, 1)]);
        c.expect_settings_ack()?;
        c.headers(1, EH | ES, &get());
        data_of_length(c, 1)
    }},
    Case { id: "http2/6.9.1/2", rfc: "RFC 7540 §6.9.1", desc: "Sends multiple WINDOW_UPDATE frames increasing the flow control window to above 2^31-1", run: |c| {
        hs(c)?;
        c.window_update(0, 0x7fff_ffff).window_update(0, 0x7fff_ffff);
        let goaway = c.expect_kind(kind::GOAWAY)?;
        if goaway.error_code() == Some(code::FLOW_CONTROL_ERROR) { Ok(goaway.to_string()) } else { Err(format!("expected GOAWAY (FLOW_CONTROL_ERROR); got {goaway}")) }
    }},
    Case { id: "http2/6.9.1/3", rfc: "RFC 7540 §6.9.1", desc: "Sends multiple WINDOW_UPDATE frames increasing the flow control window to above 2^31-1 on a stream", run: |c| {
        hs(c)?;
        c.headers(1, EH, &get()).window_update(1, 0x7fff_ffff).window_update(1, 0x7fff_ffff);
        let rst = c.expect_kind(kind::RST_STREAM)?;
        if rst.stream == 1 && rst.error_code() == Some(code::FLOW_CONTROL_ERROR) { Ok(rst.to_string()) } else { Err(format!("expected RST_STREAM (FLOW_CONTROL_ERROR) on stream 1; got {rst}")) }
    }},
    Case { id: "http2/6.9.2/1", rfc: "RFC 7540 §6.9.2", desc: "Changes SETTINGS_INITIAL_WINDOW_SIZE after sending HEADERS frame", run: |c| {
        hs(c)?;
        c.settings(&[(setting::INITIAL_WINDOW_SIZE, 0)]);
        c.expect_settings_ack()?;
        c.headers(1, EH | ES, &get()).settings(&[(setting::INITIAL_WINDOW_SIZE, 1)]);
        data_of_length(c, 1)
    }},
    Case { id: "http2/6.9.2/2", rfc: "RFC 7540 §6.9.2", desc: "Sends a SETTINGS frame for window size to be negative", run: |c| {
        hs(c)?;
        c.settings(&[(setting::INITIAL_WINDOW_SIZE, 3)]);
        c.expect_settings_ack()?;
        c.headers(1, EH | ES, &get());
        c.expect_kind(kind::DATA)?;
        c.settings(&[(setting::INITIAL_WINDOW_SIZE, 2)]);
        c.expect_settings_ack()?;
        c.window_update(1, 2);
        data_of_length(c, 1)
    }},
    Case { id: "http2/6.9.2/3", rfc: "RFC 7540 §6.9.2", desc: "Sends a SETTINGS_INITIAL_WINDOW_SIZE settings with an exceeded maximum window size value", run: |c| {
        hs(c)?;
        c.frame(kind::SETTINGS, 0, 0, b"\x00\x04\x80\x00\x00\x00");
        c.expect_connection_error(&[code::FLOW_CONTROL_ERROR])
    }},
    Case { id: "http2/6.10/1", rfc: "RFC 7540 §6.10", desc: "Sends multiple CONTINUATION frames preceded by a HEADERS frame", run: |c| {
        hs(c)?;
        let dummy = enc(&dummies(1));
        c.headers(1, ES, &get()).continuation(1, false, &dummy).continuation(1, true, &dummy);
        c.expect_headers(1)
    }},
    Case { id: "http2/6.10/2", rfc: "RFC 7540 §6.10", desc: "Sends a CONTINUATION frame followed by any frame other than CONTINUATION", run: |c| {
        hs(c)?;
        c.headers(1, 0, &post()).continuation(1, false, &enc(&dummies(1))).data(1, true, b"test");
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.10/3", rfc: "RFC 7540 §6.10", desc: "Sends a CONTINUATION frame with 0x0 stream identifier", run: |c| {
        hs(c)?;
        c.headers(1, ES, &get()).continuation(0, true, &enc(&dummies(1)));
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.10/4", rfc: "RFC 7540 §6.10", desc: "Sends a CONTINUATION frame preceded by a HEADERS frame with END_HEADERS flag", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &get()).continuation(1, true, &enc(&dummies(1)));
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.10/5", rfc: "RFC 7540 §6.10", desc: "Sends a CONTINUATION frame preceded by a CONTINUATION frame with END_HEADERS flag", run: |c| {
        hs(c)?;
        let dummy = enc(&dummies(1));
        c.headers(1, ES, &get()).continuation(1, true, &dummy).continuation(1, true, &dummy);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/6.10/6", rfc: "RFC 7540 §6.10", desc: "Sends a CONTINUATION frame preceded by a DATA frame", run: |c| {
        hs(c)?;
        let dummy = enc(&dummies(1));
        c.headers(1, 0, &post()).data(1, true, b"test").continuation(1, false, &dummy).continuation(0, true, &dummy);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/7/1", rfc: "RFC 7540 §7", desc: "Sends a GOAWAY frame with unknown error code", run: |c| {
        hs(c)?;
        c.goaway(0, 0xff, &[]).ping(false, *b"h2spec\0\0");
        c.expect_ping_ack(*b"h2spec\0\0", true)
    }},
    Case { id: "http2/7/2", rfc: "RFC 7540 §7", desc: "Sends a RST_STREAM frame with unknown error code", run: |c| {
        hs(c)?;
        c.headers(1, EH, &post()).rst_stream(1, 0xff).ping(false, [0; 8]);
        c.expect_ping_ack([0; 8], true)
    }},
    Case { id: "http2/8.1/1", rfc: "RFC 7540 §8.1", desc: "Sends a second HEADERS frame without the END_STREAM flag", run: |c| {
        hs(c)?;
        c.headers(1, EH, &post()).data(1, false, b"test").headers(1, EH, &enc(&vec![f("x-test", "ok")]));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2/1", rfc: "RFC 7540 §8.1.2", desc: "Sends a HEADERS frame that contains the header field name in uppercase letters", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &enc(&with(common("GET"), &[("X-TEST", "ok")])));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.1/1", rfc: "RFC 7540 §8.1.2.1", desc: "Sends a HEADERS frame that contains a unknown pseudo-header field", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &enc(&with(common("GET"), &[(":test", "ok")])));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.1/2", rfc: "RFC 7540 §8.1.2.1", desc: "Sends a HEADERS frame that contains the pseudo-header field defined for response", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &enc(&with(common("GET"), &[(":status", "200")])));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.1/3", rfc: "RFC 7540 §8.1.2.1", desc: "Sends a HEADERS frame that contains a pseudo-header field as trailers", run: |c| {
        hs(c)?;
        c.headers(1, EH, &post()).data(1, false, b"test").headers(1, EH, &enc(&vec![f(":method", "POST")]));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.1/4", rfc: "RFC 7540 §8.1.2.1", desc: "Sends a HEADERS frame that contains a pseudo-header field that appears in a header block after a regular header field", run: |c| {
        hs(c)?;
        let mut fields = vec![f("x-test", "ok")];
        fields.extend(common("GET"));
        c.headers(1, EH | ES, &enc(&fields));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.2/1", rfc: "RFC 7540 §8.1.2.2", desc: "Sends a HEADERS frame that contains the connection-specific header field", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &enc(&with(common("GET"), &[("connection", "keep-alive")])));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.2/2", rfc: "RFC 7540 §8.1.2.2", desc: "Sends a HEADERS frame that contains the TE header field with any value other than \"trailers\"", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &enc(&with(common("GET"), &[("trailers", "test"), ("te", "trailers, deflate")])));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.3/1", rfc: "RFC 7540 §8.1.2.3", desc: "Sends a HEADERS frame with empty \":path\" pseudo-header field", run: |c| {
        hs(c)?;
        let mut fields = common("GET");
        fields[2].1 = String::new();
        c.headers(1, EH | ES, &enc(&fields));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.3/2", rfc: "RFC 7540 §8.1.2.3", desc: "Sends a HEADERS frame that omits \":method\" pseudo-header field", run: |c| {
        hs(c)?;
        let fields = common("GET");
        c.headers(1, EH | ES, &enc(&fields[1..].to_vec()));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.3/3", rfc: "RFC 7540 §8.1.2.3", desc: "Sends a HEADERS frame that omits \":scheme\" pseudo-header field", run: |c| {
        hs(c)?;
        let mut fields = common("GET");
        fields.remove(1);
        c.headers(1, EH | ES, &enc(&fields));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.3/4", rfc: "RFC 7540 §8.1.2.3", desc: "Sends a HEADERS frame that omits \":path\" pseudo-header field", run: |c| {
        hs(c)?;
        let mut fields = common("GET");
        fields.remove(2);
        c.headers(1, EH | ES, &enc(&fields));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.3/5", rfc: "RFC 7540 §8.1.2.3", desc: "Sends a HEADERS frame with duplicated \":method\" pseudo-header field", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &enc(&with(common("GET"), &[(":method", "GET")])));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.3/6", rfc: "RFC 7540 §8.1.2.3", desc: "Sends a HEADERS frame with duplicated \":scheme\" pseudo-header field", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &enc(&with(common("GET"), &[(":scheme", "https")])));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.3/7", rfc: "RFC 7540 §8.1.2.3", desc: "Sends a HEADERS frame with duplicated \":path\" pseudo-header field", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &enc(&with(common("GET"), &[(":path", "/")])));
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.6/1", rfc: "RFC 7540 §8.1.2.6", desc: "Sends a HEADERS frame with the \"content-length\" header field which does not equal the DATA frame payload length", run: |c| {
        hs(c)?;
        c.headers(1, EH, &enc(&with(common("POST"), &[("content-length", "1")]))).data(1, true, b"test");
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.1.2.6/2", rfc: "RFC 7540 §8.1.2.6", desc: "Sends a HEADERS frame with the \"content-length\" header field which does not equal the sum of the multiple DATA frames payload length", run: |c| {
        hs(c)?;
        c.headers(1, EH, &enc(&with(common("POST"), &[("content-length", "1")]))).data(1, false, b"test").data(1, true, b"test");
        c.expect_stream_error(&[code::PROTOCOL_ERROR])
    }},
    Case { id: "http2/8.2/1", rfc: "RFC 7540 §8.2", desc: "Sends a PUSH_PROMISE frame", run: |c| {
        hs(c)?;
        let mut payload = 3u32.to_be_bytes().to_vec();
        payload.extend(get());
        c.frame(kind::PUSH_PROMISE, EH, 1, &payload);
        c.expect_connection_error(&[code::PROTOCOL_ERROR])
    }},
    // ---- generic: h2spec's tests of a working server ----
    Case { id: "generic/1/1", rfc: "RFC 7540 §3.5", desc: "Sends a client connection preface", run: |c| {
        c.send(h2raw::PREFACE).settings(&[(setting::INITIAL_WINDOW_SIZE, 65_535)]);
        match c.event() {
            h2raw::Event::Frame(fr) if fr.kind == kind::SETTINGS && !fr.has(flag::ACK) => Ok(fr.to_string()),
            other => Err(format!("expected SETTINGS (not an ACK) first; got {other}")),
        }
    }},
    Case { id: "generic/2/1", rfc: "RFC 7540 §5.1", desc: "Sends a PRIORITY frame on idle stream", run: |c| {
        hs(c)?;
        c.priority(1, 0, false, 255).ping(false, [0; 8]);
        c.expect_ping_ack([0; 8], false)
    }},
    Case { id: "generic/2/2", rfc: "RFC 7540 §5.1", desc: "Sends a WINDOW_UPDATE frame on half-closed (remote) stream", run: |c| {
        hs(c)?;
        c.settings(&[(setting::INITIAL_WINDOW_SIZE, 0)]).headers(1, EH | ES, &get()).window_update(1, 1);
        c.expect_kind(kind::DATA).map(|fr| fr.to_string())
    }},
    Case { id: "generic/2/3", rfc: "RFC 7540 §5.1", desc: "Sends a PRIORITY frame on half-closed (remote) stream", run: |c| {
        hs(c)?;
        c.settings(&[(setting::INITIAL_WINDOW_SIZE, 0)]).headers(1, EH | ES, &get()).priority(1, 0, false, 255).window_update(1, 1);
        c.expect_kind(kind::DATA).map(|fr| fr.to_string())
    }},
    Case { id: "generic/2/4", rfc: "RFC 7540 §5.1", desc: "Sends a RST_STREAM frame on half-closed (remote) stream", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &get()).rst_stream(1, code::CANCEL).ping(false, [0; 8]);
        c.expect_ping_ack([0; 8], true)
    }},
    Case { id: "generic/2/5", rfc: "RFC 7540 §5.1", desc: "Sends a PRIORITY frame on closed stream", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &get());
        c.expect_stream_close()?;
        c.priority(1, 0, false, 255).ping(false, [0; 8]);
        c.expect_ping_ack([0; 8], false)
    }},
    Case { id: "generic/3.1/1", rfc: "RFC 7540 §6.1", desc: "Sends a DATA frame", run: |c| {
        hs(c)?;
        c.headers(1, EH, &post()).data(1, true, b"test");
        c.expect_headers(1)
    }},
    Case { id: "generic/3.1/2", rfc: "RFC 7540 §6.1", desc: "Sends multiple DATA frames", run: |c| {
        hs(c)?;
        c.headers(1, EH, &post()).data(1, false, b"test").data(1, true, b"test");
        c.expect_headers(1)
    }},
    Case { id: "generic/3.1/3", rfc: "RFC 7540 §6.1", desc: "Sends a DATA frame with padding", run: |c| {
        hs(c)?;
        c.headers(1, EH, &post()).frame(kind::DATA, ES | flag::PADDED, 1, b"\x05test\x00\x00\x00\x00\x00");
        c.expect_headers(1)
    }},
    Case { id: "generic/3.2/1", rfc: "RFC 7540 §6.2", desc: "Sends a HEADERS frame", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &get());
        c.expect_headers(1)
    }},
    Case { id: "generic/3.2/2", rfc: "RFC 7540 §6.2", desc: "Sends a HEADERS frame with padding", run: |c| {
        hs(c)?;
        let mut payload = vec![8];
        payload.extend(get());
        payload.extend([0; 8]);
        c.headers(1, EH | ES | flag::PADDED, &payload);
        c.expect_headers(1)
    }},
    Case { id: "generic/3.2/3", rfc: "RFC 7540 §6.2", desc: "Sends a HEADERS frame with priority", run: |c| {
        hs(c)?;
        let mut payload = h2raw::priority_fields(0, false, 255).to_vec();
        payload.extend(get());
        c.headers(1, EH | ES | flag::PRIORITY, &payload);
        c.expect_headers(1)
    }},
    Case { id: "generic/3.3/1", rfc: "RFC 7540 §6.3", desc: "Sends a PRIORITY frame with priority 1", run: |c| {
        hs(c)?;
        c.priority(1, 0, false, 0).headers(1, EH | ES, &get());
        c.expect_headers(1)
    }},
    Case { id: "generic/3.3/2", rfc: "RFC 7540 §6.3", desc: "Sends a PRIORITY frame with priority 256", run: |c| {
        hs(c)?;
        c.priority(1, 0, false, 255).headers(1, EH | ES, &get());
        c.expect_headers(1)
    }},
    Case { id: "generic/3.3/3", rfc: "RFC 7540 §6.3", desc: "Sends a PRIORITY frame with stream dependency", run: |c| {
        hs(c)?;
        c.priority(3, 1, false, 0).headers(1, EH | ES, &get());
        c.expect_headers(1)
    }},
    Case { id: "generic/3.3/4", rfc: "RFC 7540 §6.3", desc: "Sends a PRIORITY frame with exclusive", run: |c| {
        hs(c)?;
        c.priority(1, 0, true, 0).headers(1, EH | ES, &get());
        c.expect_headers(1)
    }},
    Case { id: "generic/3.3/5", rfc: "RFC 7540 §6.3", desc: "Sends a PRIORITY frame for an idle stream, then send a HEADER frame for a lower stream ID", run: |c| {
        hs(c)?;
        c.priority(3, 0, false, 255).headers(1, EH | ES, &get());
        c.expect_headers(1)
    }},
    Case { id: "generic/3.4/1", rfc: "RFC 7540 §6.4", desc: "Sends a RST_STREAM frame", run: |c| {
        hs(c)?;
        c.headers(1, EH, &get()).rst_stream(1, code::CANCEL).ping(false, [0; 8]);
        c.expect_ping_ack([0; 8], true)
    }},
    Case { id: "generic/3.5/1", rfc: "RFC 7540 §6.5", desc: "Sends a SETTINGS frame", run: |c| {
        hs(c)?;
        c.settings(&[
            (setting::HEADER_TABLE_SIZE, 4096),
            (setting::ENABLE_PUSH, 1),
            (setting::MAX_CONCURRENT_STREAMS, 100),
            (setting::INITIAL_WINDOW_SIZE, 65_535),
            (setting::MAX_FRAME_SIZE, 16_384),
            (setting::MAX_HEADER_LIST_SIZE, 100),
        ]);
        c.expect_settings_ack()
    }},
    Case { id: "generic/3.7/1", rfc: "RFC 7540 §6.7", desc: "Sends a PING frame", run: |c| {
        hs(c)?;
        c.ping(false, *b"h2spec\0\0");
        c.expect_ping_ack(*b"h2spec\0\0", false)
    }},
    Case { id: "generic/3.8/1", rfc: "RFC 7540 §6.8", desc: "Sends a GOAWAY frame", run: |c| {
        hs(c)?;
        c.goaway(0, code::NO_ERROR, b"h2spec").ping(false, *b"h2spec\0\0");
        c.expect_ping_ack(*b"h2spec\0\0", true)
    }},
    Case { id: "generic/3.9/1", rfc: "RFC 7540 §6.9", desc: "Sends a WINDOW_UPDATE frame with stream ID 0", run: |c| {
        hs(c)?;
        c.window_update(0, 1).ping(false, [0; 8]);
        c.expect_ping_ack([0; 8], false)
    }},
    Case { id: "generic/3.9/2", rfc: "RFC 7540 §6.9", desc: "Sends a WINDOW_UPDATE frame with stream ID 1", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &get()).window_update(1, 1);
        c.expect_headers(1)
    }},
    Case { id: "generic/3.10/1", rfc: "RFC 7540 §6.10", desc: "Sends a CONTINUATION frame", run: |c| {
        hs(c)?;
        let block = get();
        c.headers(1, ES, &block[..5]).continuation(1, true, &block[5..]);
        c.expect_headers(1)
    }},
    Case { id: "generic/3.10/2", rfc: "RFC 7540 §6.10", desc: "Sends multiple CONTINUATION frames", run: |c| {
        hs(c)?;
        let block = get();
        c.headers(1, ES, &block[..5]).continuation(1, false, &block[5..10]).continuation(1, true, &block[10..]);
        c.expect_headers(1)
    }},
    Case { id: "generic/4/1", rfc: "RFC 7540 §8.1", desc: "Sends a GET request", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &get());
        c.expect_headers(1)
    }},
    Case { id: "generic/4/2", rfc: "RFC 7540 §8.1", desc: "Sends a HEAD request", run: |c| {
        hs(c)?;
        c.headers(1, EH | ES, &enc(&common("HEAD")));
        c.expect_headers(1)
    }},
    Case { id: "generic/4/3", rfc: "RFC 7540 §8.1", desc: "Sends a POST request", run: |c| {
        hs(c)?;
        c.headers(1, EH, &post()).data(1, true, b"test");
        c.expect_headers(1)
    }},
    Case { id: "generic/4/4", rfc: "RFC 7540 §8.1", desc: "Sends a POST request with trailers", run: |c| {
        hs(c)?;
        c.headers(1, EH, &enc(&with(common("POST"), &[("trailer", "x-test")])))
            .data(1, false, b"test")
            .headers(1, EH | ES, &enc(&vec![f("x-test", "ok")]));
        c.expect_headers(1)
    }},
    Case { id: "generic/5/1", rfc: "RFC 7541 §6.1", desc: "Sends a indexed header field representation", run: |c| hpack_accepted(c, b"\xba") },
    Case { id: "generic/5/2", rfc: "RFC 7541 §6.2.1", desc: "Sends a literal header field with incremental indexing - indexed name", run: |c| hpack_accepted(c, b"\x40\x87\xb5\x05\xb1\x61\xcc\x5a\x93\x84\x9c\x48\xac\xa4") },
    Case { id: "generic/5/3", rfc: "RFC 7541 §6.2.1", desc: "Sends a literal header field with incremental indexing - indexed name (with Huffman coding)", run: |c| hpack_accepted(c, b"\x40\x0a\x75\x73\x65\x72\x2d\x61\x67\x65\x6e\x74\x06\x68\x32\x73\x70\x65\x63") },
    Case { id: "generic/5/4", rfc: "RFC 7541 §6.2.1", desc: "Sends a literal header field with incremental indexing - new name", run: |c| hpack_accepted(c, b"\x40\x06\x78\x2d\x74\x65\x73\x74\x06\x68\x32\x73\x70\x65\x63") },
    Case { id: "generic/5/5", rfc: "RFC 7541 §6.2.1", desc: "Sends a literal header field with incremental indexing - new name (with Huffman coding)", run: |c| hpack_accepted(c, b"\x40\x85\xf2\xb2\x4a\x84\xff\x84\x9c\x48\xac\xa4") },
    Case { id: "generic/5/6", rfc: "RFC 7541 §6.2.2", desc: "Sends a literal header field without indexing - indexed name", run: |c| hpack_accepted(c, b"\x00\x0a\x75\x73\x65\x72\x2d\x61\x67\x65\x6e\x74\x06\x68\x32\x73\x70\x65\x63") },
    Case { id: "generic/5/7", rfc: "RFC 7541 §6.2.2", desc: "Sends a literal header field without indexing - indexed name (with Huffman coding)", run: |c| hpack_accepted(c, b"\x00\x87\xb5\x05\xb1\x61\xcc\x5a\x93\x84\x9c\x48\xac\xa4") },
    Case { id: "generic/5/8", rfc: "RFC 7541 §6.2.2", desc: "Sends a literal header field without indexing - new name", run: |c| hpack_accepted(c, b"\x00\x06\x78\x2d\x74\x65\x73\x74\x06\x68\x32\x73\x70\x65\x63") },
    Case { id: "generic/5/9", rfc: "RFC 7541 §6.2.2", desc: "Sends a literal header field without indexing - new name (huffman encoded)", run: |c| hpack_accepted(c, b"\x00\x85\xf2\xb2\x4a\x84\xff\x84\x9c\x48\xac\xa4") },
    Case { id: "generic/5/10", rfc: "RFC 7541 §6.2.3", desc: "Sends a literal header field never indexed - indexed name", run: |c| hpack_accepted(c, b"\x10\x0a\x75\x73\x65\x72\x2d\x61\x67\x65\x6e\x74\x06\x68\x32\x73\x70\x65\x63") },
    Case { id: "generic/5/11", rfc: "RFC 7541 §6.2.3", desc: "Sends a literal header field never indexed - indexed name (huffman encoded)", run: |c| hpack_accepted(c, b"\x10\x87\xb5\x05\xb1\x61\xcc\x5a\x93\x84\x9c\x48\xac\xa4") },
    Case { id: "generic/5/12", rfc: "RFC 7541 §6.2.3", desc: "Sends a literal header field never indexed - new name", run: |c| hpack_accepted(c, b"\x10\x85\xf2\xb2\x4a\x84\xff\x84\x9c\x48\xac\xa4") },
    Case { id: "generic/5/13", rfc: "RFC 7541 §6.2.3", desc: "Sends a literal header field never indexed - new name (huffman encoded)", run: |c| hpack_accepted(c, b"\x10\x85\xf2\xb2\x4a\x84\xff\x84\x9c\x48\xac\xa4") },
    Case { id: "generic/5/14", rfc: "RFC 7541 §6.3", desc: "Sends a dynamic table size update", run: |c| {
        hs(c)?;
        // What an encoder told to keep a 128-byte table sends first.
        let mut block = Vec::new();
        h2raw::hpack_int(&mut block, 128, 5, 0x20);
        block.extend(get());
        c.headers(1, EH | ES, &block);
        c.expect_headers(1)
    }},
    Case { id: "generic/5/15", rfc: "RFC 7541 §6.3", desc: "Sends multiple dynamic table size update", run: |c| {
        hs(c)?;
        let mut block = b"\x3f\x61\x3f\xe1\x1f".to_vec();
        block.extend(get());
        c.headers(1, EH | ES, &block);
        c.expect_headers(1)
    }},
    // ---- hpack: RFC 7541 ----
    Case { id: "hpack/2.3.3/1", rfc: "RFC 7541 §2.3.3", desc: "Sends a indexed header field representation with invalid index", run: |c| hpack_rejected(c, b"\xc6", false) },
    Case { id: "hpack/2.3.3/2", rfc: "RFC 7541 §2.3.3", desc: "Sends a literal header field representation with invalid index", run: |c| hpack_rejected(c, b"\x7f\x07\x00", false) },
    Case { id: "hpack/4.2/1", rfc: "RFC 7541 §4.2", desc: "Sends a dynamic table size update at the end of header block", run: |c| hpack_rejected(c, b"\x21", false) },
    Case { id: "hpack/5.2/1", rfc: "RFC 7541 §5.2", desc: "Sends a Huffman-encoded string literal representation with padding longer than 7 bits", run: |c| hpack_rejected(c, b"\x00\x85\xf2\xb2\x4a\x84\xff\x84\x49\x50\x9f\xff", false) },
    Case { id: "hpack/5.2/2", rfc: "RFC 7541 §5.2", desc: "Sends a Huffman-encoded string literal representation padded by zero", run: |c| hpack_rejected(c, b"\x00\x85\xf2\xb2\x4a\x84\xff\x83\x49\x50\x90", false) },
    Case { id: "hpack/5.2/3", rfc: "RFC 7541 §5.2", desc: "Sends a Huffman-encoded string literal representation containing the EOS symbol", run: |c| hpack_rejected(c, b"\x00\x85\xf2\xb2\x4a\x84\xff\x87\x49\x51\xff\xff\xff\xfa\x7f", false) },
    Case { id: "hpack/6.1/1", rfc: "RFC 7541 §6.1", desc: "Sends a indexed header field representation with index 0", run: |c| hpack_rejected(c, b"\x80", false) },
    Case { id: "hpack/6.3/1", rfc: "RFC 7541 §6.3", desc: "Sends a dynamic table size update larger than the value of SETTINGS_HEADER_TABLE_SIZE", run: |c| {
        hs(c)?;
        let max = c.server_settings.get(&setting::HEADER_TABLE_SIZE).copied().unwrap_or(4096);
        let mut update = Vec::new();
        h2raw::hpack_int(&mut update, max as usize + 1, 5, 0x20);
        hpack_rejected(c, &update, true)
    }},
];

/// A GET with `rep` appended to its header block is answered (generic/5).
fn hpack_accepted(c: &mut H2, rep: &[u8]) -> Result<String, String> {
    hs(c)?;
    let mut block = get();
    block.extend(rep);
    c.headers(1, EH | ES, &block);
    c.expect_headers(1)
}

/// A GET whose header block has `rep` appended (or, with `first`, put first, after the
/// handshake was already done) is a COMPRESSION_ERROR (hpack/).
fn hpack_rejected(c: &mut H2, rep: &[u8], first: bool) -> Result<String, String> {
    let mut block = Vec::new();
    if first {
        block.extend(rep);
        block.extend(get());
    } else {
        hs(c)?;
        block.extend(get());
        block.extend(rep);
    }
    c.headers(1, EH | ES, &block);
    c.expect_connection_error(&[code::COMPRESSION_ERROR])
}

/// Every case of h2spec's list against the deployed proxy.
#[test]
fn h2spec_cases_pass_against_the_proxy() {
    xlb_tests::root_or_skip!();
    let site = Site::start("h2spec");
    // The flow-control cases need a response body of at least 5 bytes (h2spec skips them
    // otherwise).
    let answer = site.request(true, "GET", "/", &[]).expect("GET / over HTTP/2");
    assert!(answer.status == 200 && answer.body.len() >= 5, "GET / must answer a body of 5 bytes or more: {answer:?}");
    let started = Instant::now();
    let mut failed = Vec::new();
    let only = std::env::var("XLB_H2SPEC").unwrap_or_default();
    let cases: Vec<&Case> = CASES.iter().filter(|c| c.id.starts_with(&only)).collect();
    assert!(!cases.is_empty(), "XLB_H2SPEC={only:?} selects none of the cases (ids look like \"http2/6.5.3/1\")");
    for case in &cases {
        let mut conn = site.raw_h2(TIMEOUT);
        let t = Instant::now();
        let result = (case.run)(&mut conn);
        let ms = t.elapsed().as_millis();
        match &result {
            Ok(got) => println!("ok    {:<16} {:<22} {} — {got} ({ms} ms)", case.id, case.rfc, case.desc),
            Err(why) => {
                println!("FAIL  {:<16} {:<22} {} — {why} ({ms} ms)", case.id, case.rfc, case.desc);
                failed.push(format!("{} ({}) {}: {why}", case.id, case.rfc, case.desc));
            }
        }
    }
    println!(
        "h2spec cases: {} of {} passed in {:.1} s",
        cases.len() - failed.len(),
        cases.len(),
        started.elapsed().as_secs_f64()
    );
    // The proxy still serves after all of that.
    let answer = site.request(true, "GET", "/", &[]).expect("GET / over HTTP/2 after the cases");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(failed.is_empty(), "{} h2spec cases failed:\n{}", failed.len(), failed.join("\n"));
    site.lb.finish();
}

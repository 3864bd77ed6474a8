//! HTTP/1.1 request smuggling against the HTTPS proxy: raw requests over TLS, each framed or
//! written ambiguously (the cases of PortSwigger's request-smuggling research and of RFC 9112
//! §2.2, §3.2, §5, §6.1, §6.3 and §7.1), to a site whose three backends record every byte they
//! receive. For each, the proxy answers `400` (or `501` for a transfer coding it does not
//! know) and forwards nothing, or it answers the request after reading it one way only (as
//! RFC 9112 lets a recipient normalise it), and then the backends received exactly one
//! request, framed one way only, with the body the client meant. Never a request that a
//! backend could read differently.
//!
//! Run as root: `cargo xtask test -- -p xlb-tests --test h1_smuggling -- --nocapture`.

use std::{
    io::{ErrorKind, Read, Write},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{ClientConnection, StreamOwned, pki_types::ServerName};
use xlb_tests::*;

/// How long a response may take, and how long the backends must have been quiet before what
/// they received is read.
const WAIT: Duration = Duration::from_secs(2);
const QUIET: Duration = Duration::from_millis(300);

/// What the proxy must do with a case.
enum Expect {
    /// Answer one of these statuses, and forward nothing.
    Refused(&'static [u16]),
    /// Refuse with `400` (forwarding nothing), or answer `200` after forwarding exactly one
    /// request; with `Some`, that request's body.
    RefusedOr(Option<&'static [u8]>),
    /// As `RefusedOr`, and a request answered must also close the connection: what follows it
    /// on the connection is not read as another request.
    RefusedOrClosed(&'static [u8]),
    /// Answer `200` after forwarding exactly one request, with this body, that `check` accepts.
    Forwarded(&'static [u8], fn(&Recorded) -> Result<(), String>),
}

struct Case {
    name: &'static str,
    /// Where the case comes from.
    source: &'static str,
    request: &'static [u8],
    expect: Expect,
}

const BAD: &[u16] = &[400];
const BAD_OR_UNKNOWN_CODING: &[u16] = &[400, 501];

fn any(_: &Recorded) -> Result<(), String> {
    Ok(())
}

/// The backend got an origin-form target and one Host: the absolute form's authority.
fn origin_form_and_host(r: &Recorded) -> Result<(), String> {
    let hosts = r.all("host");
    if r.target == "/path?q=1" && hosts == [SITE] { Ok(()) } else { Err(format!("target {:?}, Host {hosts:?}", r.target)) }
}

const CASES: &[Case] = &[
    Case {
        name: "cl_te",
        source: "PortSwigger CL.TE; RFC 9112 §6.3 ¶3",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        expect: Expect::RefusedOrClosed(b""),
    },
    Case {
        name: "te_cl",
        source: "PortSwigger TE.CL; RFC 9112 §6.3 ¶3",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        expect: Expect::RefusedOrClosed(b"SMUGGLED"),
    },
    Case {
        name: "two_different_content_lengths",
        source: "PortSwigger CL.CL; RFC 9112 §6.3 ¶5",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "two_equal_content_lengths",
        source: "RFC 9110 §8.6 (identical values may be taken as one)",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        expect: Expect::RefusedOr(Some(b"hello")),
    },
    Case {
        name: "content_length_list",
        source: "RFC 9110 §8.6; RFC 9112 §6.3 ¶5",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nContent-Length: 5, 6\r\n\r\nhello!",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "content_length_list_of_equal_values",
        source: "RFC 9110 §8.6",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nContent-Length: 5, 5\r\n\r\nhello",
        expect: Expect::RefusedOr(Some(b"hello")),
    },
    Case {
        name: "content_length_plus_sign",
        source: "RFC 9110 §8.6 (1*DIGIT)",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nContent-Length: +5\r\n\r\nhello",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "content_length_negative",
        source: "RFC 9110 §8.6 (1*DIGIT)",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nContent-Length: -1\r\n\r\nhello",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "content_length_overflow",
        source: "RFC 9112 §6.3 ¶5",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nContent-Length: 184467440737095516160\r\n\r\nhello",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "content_length_space_before_colon",
        source: "RFC 9112 §5.1 ¶2",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nContent-Length : 5\r\n\r\nhello",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "transfer_encoding_chunked_not_last",
        source: "RFC 9112 §6.3 ¶4",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "transfer_encoding_chunked_twice",
        source: "RFC 9112 §7 ¶3",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "transfer_encoding_xchunked",
        source: "PortSwigger TE.TE obfuscation; RFC 9112 §6.1 ¶9",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        expect: Expect::Refused(BAD_OR_UNKNOWN_CODING),
    },
    Case {
        name: "transfer_encoding_space_before_colon",
        source: "PortSwigger TE.TE obfuscation; RFC 9112 §5.1 ¶2",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "transfer_encoding_tab_before_value",
        source: "PortSwigger TE.TE obfuscation (a tab is OWS: valid)",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        expect: Expect::RefusedOr(Some(b"hello")),
    },
    Case {
        name: "transfer_encoding_uppercase",
        source: "RFC 9112 §7 (codings are case-insensitive)",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        expect: Expect::RefusedOr(Some(b"hello")),
    },
    Case {
        name: "transfer_encoding_obs_fold",
        source: "PortSwigger TE.TE obfuscation; RFC 9112 §5.2",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding:\r\n chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        expect: Expect::RefusedOr(Some(b"hello")),
    },
    Case {
        name: "transfer_encoding_obs_fold_with_content_length",
        source: "PortSwigger TE.TE obfuscation; RFC 9112 §5.2, §6.3 ¶3",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nContent-Length: 3\r\nTransfer-Encoding:\r\n chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "transfer_encoding_in_http10",
        source: "RFC 9112 §6.1 ¶15",
        request: b"POST / HTTP/1.0\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "obs_fold_in_another_header",
        source: "RFC 9112 §5.2",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nX-Folded: a\r\n b\r\nContent-Length: 5\r\n\r\nhello",
        expect: Expect::RefusedOr(Some(b"hello")),
    },
    Case {
        name: "bare_lf_line_endings",
        source: "RFC 9112 §2.2 ¶3",
        request: b"POST / HTTP/1.1\nHost: site.test\nContent-Length: 5\n\nhello",
        expect: Expect::RefusedOr(Some(b"hello")),
    },
    Case {
        name: "bare_lf_before_content_length",
        source: "RFC 9112 §2.2 ¶3",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nX-A: a\nContent-Length: 5\r\n\r\nhello",
        expect: Expect::RefusedOr(None),
    },
    Case {
        name: "bare_cr_in_header",
        source: "RFC 9112 §2.2 ¶4",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nX-A: a\rContent-Length: 5\r\n\r\nhello",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "nul_in_header_value",
        source: "RFC 9110 §5.5",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nX-A: a\0b\r\nContent-Length: 5\r\n\r\nhello",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "chunk_size_overflow",
        source: "RFC 9112 §7.1; CVE-2015-3183 class",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "chunk_size_invalid_hex",
        source: "RFC 9112 §7.1",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n5g\r\nhello\r\n0\r\n\r\n",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "chunk_size_0x_prefix",
        source: "RFC 9112 §7.1",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "chunk_longer_than_its_size",
        source: "RFC 9112 §7.1",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "chunk_extensions",
        source: "RFC 9112 §7.1.1 (valid; not forwarded)",
        request: b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value;quoted=\"a b\"\r\nhello\r\n0;last\r\n\r\n",
        expect: Expect::Forwarded(b"hello", any),
    },
    Case {
        name: "absolute_form",
        source: "RFC 9112 §3.2.2",
        request: b"GET https://site.test/path?q=1 HTTP/1.1\r\nHost: site.test\r\n\r\n",
        expect: Expect::Forwarded(b"", origin_form_and_host),
    },
    Case {
        name: "absolute_form_with_another_host",
        source: "RFC 9112 §3.2.2 ¶5 (the target's authority wins)",
        request: b"GET https://site.test/path?q=1 HTTP/1.1\r\nHost: other.test\r\n\r\n",
        expect: Expect::Forwarded(b"", origin_form_and_host),
    },
    Case {
        name: "duplicate_host",
        source: "RFC 9112 §3.2 ¶5",
        request: b"GET / HTTP/1.1\r\nHost: site.test\r\nHost: other.test\r\n\r\n",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "missing_host",
        source: "RFC 9112 §3.2 ¶5",
        request: b"GET / HTTP/1.1\r\nX-A: a\r\n\r\n",
        expect: Expect::Refused(BAD),
    },
    Case {
        name: "request_line_double_space",
        source: "RFC 9112 §3 ¶4",
        request: b"GET  / HTTP/1.1\r\nHost: site.test\r\n\r\n",
        expect: Expect::Refused(BAD),
    },
];

/// What came back for a request.
struct Exchange {
    statuses: Vec<u16>,
    /// The proxy closed the connection after its answers.
    closed: bool,
}

/// One TLS connection (ALPN http/1.1) that writes `request` and reads what comes back until
/// the connection closes or nothing more arrives for a while.
fn exchange(site: &Site, request: &[u8]) -> Result<Exchange, String> {
    let tcp = site.tcp(site.https());
    let mut config = (*site.tls).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let conn = ClientConnection::new(Arc::new(config), ServerName::try_from(SITE).unwrap()).map_err(|e| e.to_string())?;
    let mut tls = StreamOwned::new(conn, tcp);
    tls.write_all(request).and_then(|()| tls.flush()).map_err(|e| format!("writing: {e}"))?;
    tls.sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut got = Vec::new();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let mut closed = false;
    let mut quiet_since = None::<Instant>;
    while started.elapsed() < WAIT {
        match tls.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                quiet_since = None;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                // Once answered, a second of nothing more: the connection stays open.
                if !got.is_empty() && quiet_since.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(1) {
                    break;
                }
            }
            // A reset after the answer, or no answer at all.
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    Ok(Exchange { statuses: statuses(&got)?, closed })
}

/// The statuses of the responses in `bytes` (each with a Content-Length, as the proxy's are).
fn statuses(mut bytes: &[u8]) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let head = match response.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            other => return Err(format!("not a response ({other:?}): {:?}", String::from_utf8_lossy(bytes))),
        };
        let length = response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        out.push(response.code.unwrap_or(0));
        bytes = bytes.get(head + length..).unwrap_or_default();
    }
    Ok(out)
}

/// Runs one case: what the proxy did, as Ok when it is what `case.expect` allows.
fn run_case(site: &Site, recorders: &[Recorder], case: &Case) -> Result<String, String> {
    let marks: Vec<Mark> = recorders.iter().map(Recorder::mark).collect();
    let Exchange { statuses, closed } = exchange(site, case.request)?;
    let mut forwarded = Vec::new();
    let mut abandoned = Vec::new();
    for (recorder, mark) in recorders.iter().zip(&marks) {
        let got = recorder.requests_since(mark, QUIET).map_err(|e| format!("answered {statuses:?}; a backend received something ambiguous: {e}"))?;
        forwarded.extend(got.requests);
        abandoned.extend(got.abandoned);
    }
    let first = statuses.first().copied();
    let mut seen = format!("answered {statuses:?}{}, {} request(s) forwarded", if closed { " and closed" } else { "" }, forwarded.len());
    if !abandoned.is_empty() {
        // The proxy found the body broken while streaming it, and closed the backend
        // connection: a backend never gets a whole request to answer.
        seen += &format!(", {} cut off and abandoned ({})", abandoned.len(), abandoned.join("; "));
    }
    if forwarded.len() > 1 {
        return Err(format!("{seen}: more than one request reached the backends: {forwarded:?}"));
    }
    let refused = |codes: &[u16]| first.is_some_and(|s| codes.contains(&s)) && forwarded.is_empty();
    let answered = |body: Option<&[u8]>| {
        first == Some(200) && forwarded.len() == 1 && body.is_none_or(|b| forwarded[0].body == b)
    };
    let ok = match &case.expect {
        Expect::Refused(codes) => refused(codes),
        Expect::RefusedOr(body) => refused(BAD) || answered(*body),
        Expect::RefusedOrClosed(body) => refused(BAD) || (answered(Some(body)) && closed && statuses.len() == 1),
        Expect::Forwarded(body, check) => {
            if answered(Some(body)) {
                check(&forwarded[0]).map_err(|e| format!("{seen}: the forwarded request: {e}"))?;
                true
            } else {
                false
            }
        }
    };
    if ok { Ok(seen) } else { Err(format!("{seen}: {:?}", forwarded.first())) }
}

#[test]
fn ambiguous_requests_are_refused_or_forwarded_one_way_only() {
    xlb_tests::root_or_skip!();
    let lb = Site::prepare("h1-smuggle");
    let recorders: Vec<Recorder> = lb.backends.iter().map(|&a| Recorder::start(&lb, a)).collect();
    let site = Site::run(lb, |s| s);
    let mut failed = Vec::new();
    for case in CASES {
        match run_case(&site, &recorders, case) {
            Ok(seen) => println!("ok    {:<48} {:<58} {seen}", case.name, case.source),
            Err(why) => {
                println!("FAIL  {:<48} {:<58} {why}", case.name, case.source);
                failed.push(format!("{} ({}): {why}", case.name, case.source));
            }
        }
    }
    println!("request smuggling cases: {} of {} passed", CASES.len() - failed.len(), CASES.len());
    // The proxy and its backend connections still serve.
    let answer = site.request(false, "GET", "/", &[]).expect("GET / after the cases");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(failed.is_empty(), "{} smuggling cases failed:\n{}", failed.len(), failed.join("\n"));
    site.lb.finish();
}

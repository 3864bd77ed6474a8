//! HTTP/1.1 requests that hyper accepts but that a backend could read differently, refused
//! before anything is forwarded (request smuggling, RFC 9112 §6.3 and §3.2):
//!
//! - both Content-Length and Transfer-Encoding: hyper frames the body by Transfer-Encoding (as
//!   RFC 9112 lets it), but such a request is how a front end and a back end are made to
//!   disagree, and no client needs to send one;
//! - a Transfer-Encoding other than a single `chunked`: `chunked, chunked` is chunked twice,
//!   which RFC 9112 §7 forbids (hyper takes it as once), and the proxy decodes no other
//!   coding (`501`, as RFC 9112 §6.1 says);
//! - more than one Host (RFC 9112 §3.2: a server must answer `400`); hyper keeps both and the
//!   proxy would pick the first.
//!
//! HTTP/2 requests have none of these: h2 refuses Transfer-Encoding, and the authority is a
//! pseudo-header.
use hyper::{HeaderMap, StatusCode, Version, header};

/// The answer to a request of `version` with `headers` that must be refused, if it must.
pub fn refusal(version: Version, headers: &HeaderMap) -> Option<(StatusCode, &'static str)> {
    if version >= Version::HTTP_2 {
        return None;
    }
    let bad = |why| Some((StatusCode::BAD_REQUEST, why));
    if headers.get_all(header::HOST).iter().count() > 1 {
        return bad("more than one Host header\n");
    }
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return None;
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        return bad("both Content-Length and Transfer-Encoding\n");
    }
    let codings: Vec<&[u8]> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .collect();
    let chunked = |c: &&[u8]| c.eq_ignore_ascii_case(b"chunked");
    match codings.as_slice() {
        [one] if chunked(one) => None,
        [.., last] if !chunked(last) => bad("Transfer-Encoding must end with chunked\n"),
        all if all.iter().all(chunked) => bad("Transfer-Encoding chunked more than once\n"),
        _ => Some((StatusCode::NOT_IMPLEMENTED, "only the chunked transfer coding is supported\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in fields {
            map.append(header::HeaderName::from_bytes(n.as_bytes()).unwrap(), v.parse().unwrap());
        }
        map
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for fields in [
            &[("host", "a"), ("host", "b")][..],
            &[("content-length", "3"), ("transfer-encoding", "chunked")],
            &[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")],
            &[("transfer-encoding", "chunked, chunked")],
            &[("transfer-encoding", "chunked, gzip")],
            &[("transfer-encoding", "")],
        ] {
            assert_eq!(refusal(Version::HTTP_11, &headers(fields)).map(|r| r.0), Some(StatusCode::BAD_REQUEST), "{fields:?}");
        }
        let gzip = headers(&[("transfer-encoding", "gzip, chunked")]);
        assert_eq!(refusal(Version::HTTP_11, &gzip).map(|r| r.0), Some(StatusCode::NOT_IMPLEMENTED));
    }

    #[test]
    fn one_framing_passes() {
        for fields in [
            &[("host", "a"), ("content-length", "3")][..],
            &[("host", "a"), ("transfer-encoding", "chunked")],
            &[("transfer-encoding", " Chunked ")],
            &[],
        ] {
            assert_eq!(refusal(Version::HTTP_11, &headers(fields)), None, "{fields:?}");
        }
        // HTTP/2 has no such framing (and `host` beside `:authority` is the proxy's to ignore).
        assert_eq!(refusal(Version::HTTP_2, &headers(&[("host", "a"), ("host", "b")])), None);
    }
}

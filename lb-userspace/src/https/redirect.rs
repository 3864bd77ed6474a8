//! A `redirect` service: plain HTTP answered with `301 Location: https://<host><path>?<query>`,
//! except ACME HTTP-01 challenges, answered from the shared challenge store.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore, sync::watch};
use tracing::warn;

use super::{Activity, Stats, Tracked};
use crate::challenges::{Challenges, HTTP01_PREFIX};

/// Limits of the redirect listener: every answer is a few hundred bytes, so these are tight.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_CONNECTIONS: usize = 10_000;
const MAX_HEADER_BYTES: usize = 16 * 1024;

pub async fn serve(name: String, listener: Arc<TcpListener>, challenges: Arc<Challenges>, stats: Arc<Stats>, mut stop: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("never closed"),
            _ = stop.changed() => return,
        };
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    warn!(service = %name, "accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let (challenges, stats) = (challenges.clone(), stats.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let linger = super::linger_handle(&tcp);
            connection(tcp, &challenges, &stats).await;
            if let Some(fd) = linger {
                super::linger(fd).await;
            }
        });
    }
}

async fn connection(tcp: tokio::net::TcpStream, challenges: &Arc<Challenges>, stats: &Arc<Stats>) {
    let (challenges, stats) = (challenges.clone(), stats.clone());
    let activity = Activity::new();
    let io = TokioIo::new(Tracked::new(tcp, activity.clone()));
    let service = service_fn(move |req| {
        let response = answer(&req, &challenges);
        stats.count_response(response.status().as_u16());
        async move { Ok::<_, Infallible>(response) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = activity.idle(IDLE_TIMEOUT) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
}

/// The answer to one request.
pub fn answer<B>(req: &Request<B>, challenges: &Challenges) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if let Some(token) = path.strip_prefix(HTTP01_PREFIX) {
        return match challenges.http01(token) {
            Some(key_authorization) => text(StatusCode::OK, key_authorization),
            None => text(StatusCode::NOT_FOUND, "no such challenge\n".into()),
        };
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .map(strip_port)
        .filter(|h| valid_host(h));
    let Some(host) = host else {
        return text(StatusCode::BAD_REQUEST, "a Host header is needed to redirect to https\n".into());
    };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{target}");
    let mut response = text(StatusCode::MOVED_PERMANENTLY, format!("moved to {location}\n"));
    match header::HeaderValue::from_str(&location) {
        Ok(v) => {
            response.headers_mut().insert(header::LOCATION, v);
            response
        }
        Err(_) => text(StatusCode::BAD_REQUEST, "the request target cannot be redirected\n".into()),
    }
}

/// `example.com:80` → `example.com`; `[2001:db8::1]:80` → `[2001:db8::1]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h)
}

/// A DNS name or an address literal: nothing that could change the meaning of the URL.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':'))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(uri: &str, host: Option<&str>) -> Response<Full<Bytes>> {
        let mut req = Request::get(uri);
        if let Some(h) = host {
            req = req.header(header::HOST, h);
        }
        answer(&req.body(()).unwrap(), &Challenges::new())
    }

    #[test]
    fn redirects_keep_path_and_query() {
        let r = get("/a/b?x=1&y=%20", Some("example.com:80"));
        assert_eq!(r.status(), 301);
        assert_eq!(r.headers()[header::LOCATION], "https://example.com/a/b?x=1&y=%20");
        let r = get("/", Some("[2001:db8::1]:80"));
        assert_eq!(r.headers()[header::LOCATION], "https://[2001:db8::1]/");
        assert_eq!(get("/", None).status(), 400);
        assert_eq!(get("/", Some("evil.com/x")).status(), 400);
    }

    #[test]
    fn challenges_are_answered() {
        let c = Challenges::new();
        c.set_http01("tok", "tok.thumb");
        let req = |p: &str| Request::get(p).header(header::HOST, "example.com").body(()).unwrap();
        let r = answer(&req("/.well-known/acme-challenge/tok"), &c);
        assert_eq!(r.status(), 200);
        assert_eq!(answer(&req("/.well-known/acme-challenge/other"), &c).status(), 404);
    }
}

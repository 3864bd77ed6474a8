//! The CLI's side of the admin API: what `xlb status`, `drain`, `undrain`, `reload`, `renew`
//! and `rollout` send to a running daemon.
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::percent_encode;
use crate::status::{DrainResult, ReloadResult, RenewResult, Status};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Far above any real status (64 services × 16 backends), small enough to not be a hazard.
const MAX_CLIENT_BODY: usize = 16 << 20;

/// `GET /api/status` from a running daemon; used by `xlb status`.
pub async fn fetch_status(addr: SocketAddr) -> anyhow::Result<Status> {
    let body = call(addr, Method::GET, "/api/status").await?;
    serde_json::from_slice(&body).with_context(|| {
        format!("the xlb admin API at {addr} sent a status this xlb cannot read; are `xlb` and the daemon the same version?")
    })
}

/// Drains (`drained`) or undrains `backend` of `service` in a running daemon; used by
/// `xlb drain` and `xlb undrain`. The daemon checks the names, so any text is passed on.
pub async fn set_drained(
    addr: SocketAddr,
    service: &str,
    backend: &str,
    drained: bool,
) -> anyhow::Result<DrainResult> {
    let action = if drained { "drain" } else { "undrain" };
    let path = format!(
        "/api/services/{}/backends/{}/{action}",
        percent_encode(service),
        percent_encode(backend)
    );
    let body = call(addr, Method::POST, &path).await?;
    serde_json::from_slice(&body).with_context(|| {
        format!("the xlb admin API at {addr} sent an answer this xlb cannot read; are `xlb` and the daemon the same version?")
    })
}

/// Asks a running daemon to reload its config file; used by `xlb reload`. An invalid file is
/// an error carrying the daemon's reason.
pub async fn reload(addr: SocketAddr) -> anyhow::Result<ReloadResult> {
    let body = call(addr, Method::POST, "/api/reload").await?;
    serde_json::from_slice(&body).with_context(|| {
        format!("the xlb admin API at {addr} sent an answer this xlb cannot read; are `xlb` and the daemon the same version?")
    })
}

/// Asks a running daemon to renew the ACME certificate of `service` now; used by `xlb renew`.
pub async fn renew(addr: SocketAddr, service: &str) -> anyhow::Result<RenewResult> {
    let body = call(addr, Method::POST, &format!("/api/acme/renew?service={}", percent_encode(service))).await?;
    serde_json::from_slice(&body).with_context(|| {
        format!("the xlb admin API at {addr} sent an answer this xlb cannot read; are `xlb` and the daemon the same version?")
    })
}

/// One request to the admin API: the body of a 200 answer, else an error with the API's message.
async fn call(addr: SocketAddr, method: Method, path: &str) -> anyhow::Result<Bytes> {
    let response = tokio::time::timeout(CLIENT_TIMEOUT, get(addr, method, path))
        .await
        .map_err(|_| anyhow!("no answer within {CLIENT_TIMEOUT:?}"))
        .and_then(|r| r)
        .map_err(|e| {
            anyhow!("cannot reach the xlb admin API at {addr}: {e:#} — is `xlb run` running?")
        })?;
    let body = response.body();
    if response.status() != StatusCode::OK {
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        return Err(anyhow!(
            "the xlb admin API at {addr} answered {}: {message}",
            response.status()
        ));
    }
    Ok(response.into_body())
}

pub(super) async fn get(addr: SocketAddr, method: Method, path: &str) -> anyhow::Result<Response<Bytes>> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    let exchange = async {
        let (parts, body) = sender.send_request(request).await?.into_parts();
        let body = Limited::new(body, MAX_CLIENT_BODY)
            .collect()
            .await
            .map_err(|e| anyhow!(e))?
            .to_bytes();
        anyhow::Ok(Response::from_parts(parts, body))
    };
    // The connection must be driven while the exchange runs; with `Connection: close` it ends
    // right after the response, and its own error is also the exchange's.
    let (response, _) = tokio::join!(exchange, conn);
    response
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::admin::{
        server::JSON,
        testing::{Fixed, sample, start},
    };

    #[tokio::test]
    async fn status_round_trips_through_fetch_status() {
        let server = start(Fixed(Ok(sample()))).await;
        assert_eq!(fetch_status(server.addr).await.unwrap(), sample());
        let response = get(server.addr, Method::GET, "/api/status").await.unwrap();
        assert_eq!(response.headers()[header::CONTENT_TYPE], JSON);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn fetch_status_explains_a_missing_daemon() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let e = fetch_status(addr).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot reach the xlb admin API at {addr}: ")),
            "{e}"
        );
        assert!(
            e.contains("refused") && e.ends_with(" — is `xlb run` running?"),
            "{e}"
        );
    }

}

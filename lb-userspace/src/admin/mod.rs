//! The admin HTTP API. It has no authentication, so the config only lets it listen on loopback.
//!
//! `GET /api/status` serves the status as JSON (read by `xlb status`), `GET /metrics` the same
//! snapshot as OpenMetrics text, `GET /status` a summary in nginx's `stub_status` layout. Each
//! takes a fresh snapshot per request; nothing is cached. `POST
//! /api/services/{name}/backends/{address}/drain` and `/undrain` (used by `xlb drain` and
//! `xlb undrain`) change a backend's drain flag and answer once the data path has it. `POST
//! /api/reload` (used by `xlb reload`) reads the config file again and applies it, or answers
//! why not. `POST /api/acme/renew?service=NAME` (used by `xlb renew`) has the service's ACME
//! manager order a new certificate now.
//!
//! `server` answers those routes, `metrics` encodes `/metrics`, `client` is what the CLI sends;
//! this module holds what the daemon implements and what both ends of the wire agree on.
mod client;
mod metrics;
mod server;

use std::net::SocketAddr;

pub use client::{fetch_status, reload, renew, set_drained};
pub use server::{connection, serve};

use crate::status::{DrainResult, ReloadResult, RenewResult, Status};

/// Where the daemon's live state comes from, and what changes it; called once per request,
/// off the async runtime (it may read and write BPF maps).
pub trait StatusSource: Send + Sync + 'static {
    fn status(&self) -> anyhow::Result<Status>;

    /// Sets (`drained`) or clears the drain flag of `backend` of `service`, writing the
    /// resulting state into the data path before returning.
    fn set_drained(
        &self,
        service: &str,
        backend: SocketAddr,
        drained: bool,
    ) -> Result<DrainResult, ControlError>;

    /// Reads the daemon's config file again and applies it; on any error the running config
    /// stays.
    fn reload(&self) -> Result<ReloadResult, ControlError>;

    /// Has the ACME manager of `service` order a new certificate now, whatever the current
    /// one's expiry; returns once asked, the order runs in the background.
    fn renew(&self, service: &str) -> Result<RenewResult, ControlError>;
}

/// Why a drain or undrain request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no service {name:?}; the services are: {}", known.join(", "))]
    UnknownService { name: String, known: Vec<String> },
    #[error("service {service:?} has no backend {backend}; its backends are: {}", known.join(", "))]
    UnknownBackend {
        service: String,
        backend: SocketAddr,
        known: Vec<String>,
    },
    /// A new config that is invalid or cannot be applied while running; the message says why.
    #[error("{0}")]
    Rejected(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

// The client percent-encodes the names it puts into paths and the server decodes them; both
// halves of that coding stay here, side by side.

/// Decodes `%XX` escapes; `None` for a broken escape or a result that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// Escapes everything but RFC 3986's unreserved characters, so any text is one path segment.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// What the server, metrics and client tests share: a daemon stand-in, status snapshots, and a
/// server on an ephemeral port.
#[cfg(test)]
mod testing {
    use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

    use anyhow::anyhow;
    use bytes::Bytes;
    use hyper::Response;
    use tokio::{net::TcpListener, sync::watch};

    use super::{ControlError, StatusSource, serve};
    use crate::status::{
        BackendState, BackendStatus, DataplaneStatus, DrainResult, InterfaceStatus, ReloadResult, RenewResult,
        ServiceStatus, Status,
    };

    pub(super) struct Fixed(pub(super) anyhow::Result<Status, String>);

    impl StatusSource for Fixed {
        fn status(&self) -> anyhow::Result<Status> {
            self.0
                .clone()
                .map_err(|e| anyhow!(e).context("reading BACKENDS"))
        }

        /// Looks the backend up in the fixed status, as the daemon does in its config.
        fn set_drained(
            &self,
            service: &str,
            backend: SocketAddr,
            drained: bool,
        ) -> Result<DrainResult, ControlError> {
            let status = self.status()?;
            let svc = status
                .services
                .iter()
                .find(|s| s.name == service)
                .ok_or_else(|| ControlError::UnknownService {
                    name: service.into(),
                    known: status.services.iter().map(|s| s.name.clone()).collect(),
                })?;
            let b = svc
                .backends
                .iter()
                .find(|b| b.address.parse() == Ok(backend))
                .ok_or_else(|| ControlError::UnknownBackend {
                    service: service.into(),
                    backend,
                    known: svc.backends.iter().map(|b| b.address.clone()).collect(),
                })?;
            Ok(DrainResult {
                service: service.into(),
                backend: b.address.clone(),
                drained,
                changed: drained != (b.state == BackendState::Draining),
                state: if drained {
                    BackendState::Draining
                } else {
                    BackendState::Up
                },
                healthy: b.healthy,
                live_connections: b.live_connections,
            })
        }

        /// Accepts while the status is readable, as if the file were valid; refuses otherwise.
        fn reload(&self) -> Result<ReloadResult, ControlError> {
            match &self.0 {
                Ok(_) => Ok(ReloadResult {
                    config: "/etc/xlb/xlb.toml".into(),
                    changes: vec!["service web: backend 203.0.113.10:8004 added".into()],
                }),
                Err(e) => Err(ControlError::Rejected(format!("/etc/xlb/xlb.toml:3: {e}"))),
            }
        }

        /// As the daemon: a known service with ACME, a known one without, or an unknown one.
        fn renew(&self, service: &str) -> Result<RenewResult, ControlError> {
            let status = self.status()?;
            let svc = status.services.iter().find(|s| s.name == service).ok_or_else(|| ControlError::UnknownService {
                name: service.into(),
                known: status.services.iter().map(|s| s.name.clone()).collect(),
            })?;
            let acme = svc.acme.clone().ok_or_else(|| {
                ControlError::Rejected(format!("service {service:?} does not get its certificate from ACME"))
            })?;
            Ok(RenewResult { service: service.into(), acme })
        }
    }

    pub(super) fn sample() -> Status {
        let backend = |address: &str, state, live, total, probe: Option<f64>| BackendStatus {
            address: address.into(),
            state,
            live_connections: live,
            total_connections: total,
            failed_connections: 0,
            healthy: probe.map(|_| state == BackendState::Up),
            last_probe_ms: probe,
            last_error: (state == BackendState::Down)
                .then(|| "HTTP 503 Service Unavailable".into()),
            checks_up: state != BackendState::Down,
            probes: u64::from(probe.is_some()),
            probes_passed_in_a_row: u64::from(probe.is_some() && state == BackendState::Up),
        };
        Status {
            services: vec![ServiceStatus {
                name: "web".into(),
                listen: "203.0.113.10:80".into(),
                mode: "l4".into(),
                rise: 2,
                backends: vec![
                    backend("203.0.113.10:8001", BackendState::Up, 3, 120, Some(1.5)),
                    backend("203.0.113.10:8002", BackendState::Down, 0, 7, Some(250.0)),
                    backend("203.0.113.10:8003", BackendState::Draining, 1, 9, None),
                ],
                https: None,
                acme: None,
            }],
            dataplane: DataplaneStatus {
                interfaces: vec![InterfaceStatus {
                    name: "eth0".into(),
                    xdp_mode: "native".into(),
                }],
                pin_path: "/sys/fs/bpf/xlb".into(),
                flows: 4,
                max_flows: 1 << 20,
                counters: BTreeMap::from([
                    ("new_flows".into(), 136),
                    ("drop_no_backend".into(), 0),
                ]),
            },
        }
    }

    pub(super) struct Server {
        pub(super) addr: SocketAddr,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    /// `sample` with an https service too.
    pub(super) fn sample_with_https() -> Status {
        let mut status = sample();
        let backends = vec![status.services[0].backends[0].clone()];
        status.services.push(ServiceStatus {
            name: "site".into(),
            listen: "203.0.113.10:443".into(),
            mode: "https".into(),
            rise: 2,
            backends,
            https: Some(crate::https::HttpsStatus {
                handshakes_full: 10,
                handshakes_resumed: 4,
                handshakes_failed: 1,
                responses: crate::https::ResponseClasses { c2xx: 40, c5xx: 2, ..Default::default() },
                retries: 3,
                cert_not_after: Some(1_800_000_000),
                cert_expires_in_seconds: Some(86_400),
            }),
            acme: Some(crate::status::AcmeServiceStatus {
                domains: vec!["example.com".into()],
                challenge: "http-01".into(),
                not_after: Some("2027-01-15T08:00:00Z".into()),
                last_renewal: Some("2026-10-17T08:00:00Z".into()),
                next_attempt: Some("2026-12-16T08:00:00Z".into()),
                last_error: None,
                failures: 0,
                attempts: 1,
            }),
        });
        status
    }

    pub(super) async fn start(source: Fixed) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::new(source), stop_rx));
        Server { addr, stop, task }
    }

    impl Server {
        pub(super) async fn shutdown(self) {
            self.stop.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(2), self.task)
                .await
                .expect("serve did not stop")
                .unwrap()
                .unwrap();
        }
    }

    pub(super) fn text(response: &Response<Bytes>) -> &str {
        std::str::from_utf8(response.body()).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_coding_round_trips() {
        for text in ["web", "[2001:db8::10]:8001", "a b%c/d", "ü"] {
            assert_eq!(percent_decode(&percent_encode(text)).as_deref(), Some(text));
        }
        assert_eq!(percent_encode("[::1]:80"), "%5B%3A%3A1%5D%3A80");
        assert_eq!(percent_decode("%5b::1%5D:80").as_deref(), Some("[::1]:80"));
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}

//! The admin API's connection handling (`xlb::admin::connection`, the hyper service the daemon
//! runs) on an arbitrary byte stream from a client: it must never panic or hang, must answer
//! only with well-formed HTTP responses, and may change a drain flag (or reload the config) only
//! for a `POST` (to an existing backend of an existing service).
#![no_main]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use xlb::{
    admin::{self, ControlError, StatusSource},
    status::{BackendState, BackendStatus, DataplaneStatus, DrainResult, ReloadResult, RenewResult, ServiceStatus, Status},
};

/// One service with two backends; drains and reloads are recorded.
struct Fixed {
    drains: Mutex<Vec<(String, SocketAddr, bool)>>,
    reloads: Mutex<u32>,
}

fn status() -> Status {
    let backend = |address: &str| BackendStatus {
        address: address.into(),
        state: BackendState::Up,
        live_connections: 3,
        total_connections: 120,
        failed_connections: 0,
        healthy: Some(true),
        last_probe_ms: Some(0.4),
        last_error: None,
        checks_up: true,
        probes: 10,
        probes_passed_in_a_row: 10,
    };
    Status {
        services: vec![ServiceStatus {
            name: "web".into(),
            listen: "198.18.0.1:80".into(),
            mode: "l4".into(),
            rise: 2,
            backends: vec![backend("198.18.0.1:8001"), backend("[2001:2::1]:8002")],
            https: None,
            acme: None,
        }],
        dataplane: DataplaneStatus {
            interfaces: Vec::new(),
            pin_path: "/sys/fs/bpf/xlb".into(),
            flows: 9,
            max_flows: 1024,
            counters: [("new_flows".to_owned(), 120)].into(),
        },
    }
}

impl StatusSource for Fixed {
    fn status(&self) -> anyhow::Result<Status> {
        Ok(status())
    }

    fn set_drained(&self, service: &str, backend: SocketAddr, drained: bool) -> Result<DrainResult, ControlError> {
        let status = status();
        let svc = status.services.iter().find(|s| s.name == service).ok_or_else(|| ControlError::UnknownService {
            name: service.into(),
            known: vec!["web".into()],
        })?;
        if !svc.backends.iter().any(|b| b.address.parse() == Ok(backend)) {
            return Err(ControlError::UnknownBackend {
                service: service.into(),
                backend,
                known: svc.backends.iter().map(|b| b.address.clone()).collect(),
            });
        }
        self.drains.lock().unwrap().push((service.into(), backend, drained));
        Ok(DrainResult {
            service: service.into(),
            backend: backend.to_string(),
            drained,
            changed: true,
            state: if drained { BackendState::Draining } else { BackendState::Up },
            healthy: Some(true),
            live_connections: 3,
        })
    }

    fn reload(&self) -> Result<ReloadResult, ControlError> {
        *self.reloads.lock().unwrap() += 1;
        Ok(ReloadResult { config: "/etc/xlb/xlb.toml".into(), changes: Vec::new() })
    }

    fn renew(&self, service: &str) -> Result<RenewResult, ControlError> {
        // No service here gets its certificate from ACME.
        match service {
            "web" => Err(ControlError::Rejected(format!("service {service:?} does not get its certificate from ACME"))),
            _ => Err(ControlError::UnknownService { name: service.into(), known: vec!["web".into()] }),
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let source = Arc::new(Fixed { drains: Mutex::default(), reloads: Mutex::default() });
    let out = runtime().block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (_stop, stop) = tokio::sync::watch::channel(false);
        let served = tokio::spawn(admin::connection(server, source.clone(), stop));
        let (mut reader, mut writer) = tokio::io::split(client);
        let exchange = async {
            let write = async {
                let _ = writer.write_all(data).await;
                let _ = writer.shutdown().await;
            };
            let read = async {
                let mut out = Vec::new();
                let _ = reader.read_to_end(&mut out).await;
                out
            };
            tokio::join!(write, read).1
        };
        let out = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .expect("the admin API neither answered nor closed the connection within 5 s");
        served.await.expect("the connection task panicked");
        out
    });
    // Every answer is an HTTP/1.x response with a status the API uses.
    let mut rest = &out[..];
    while !rest.is_empty() {
        let text = String::from_utf8_lossy(rest);
        assert!(text.starts_with("HTTP/1.1 ") || text.starts_with("HTTP/1.0 "), "not an HTTP response: {text:?}");
        let code: u16 = text[9..12].parse().unwrap_or_else(|_| panic!("no status code: {text:?}"));
        assert!(
            [200, 400, 403, 404, 405, 408, 413, 414, 422, 431, 500, 501, 505].contains(&code),
            "unexpected status {code}: {text:?}"
        );
        // Skip to the next response, if any (keep-alive): after the head and its body.
        let Some(head_end) = text.find("\r\n\r\n") else { panic!("response head never ends: {text:?}") };
        let length = text[..head_end]
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
            .unwrap_or(0);
        // A response to HEAD has a Content-Length but no body: the next response (or the end)
        // follows the head directly.
        let after_head = &rest[head_end + 4..];
        let length = if after_head.is_empty() || after_head.starts_with(b"HTTP/1.") { 0 } else { length };
        let end = head_end + 4 + length;
        assert!(end <= rest.len(), "response shorter than its Content-Length: {text:?}");
        rest = &rest[end..];
    }
    // A drain or a reload happens only through POST; drains only of real backends.
    if *source.reloads.lock().unwrap() > 0 {
        let input = String::from_utf8_lossy(data);
        assert!(input.contains("POST"), "reloaded without a POST: {input:?}");
    }
    for (service, backend, _) in source.drains.lock().unwrap().iter() {
        assert_eq!(service, "web");
        assert!(["198.18.0.1:8001", "[2001:2::1]:8002"].contains(&backend.to_string().as_str()));
        let input = String::from_utf8_lossy(data);
        assert!(input.contains("POST"), "drained {backend} without a POST: {input:?}");
    }
});

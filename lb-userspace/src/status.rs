//! The status model served by `GET /api/status`, rendered by `xlb status` and `GET /metrics`.
use serde::{Deserialize, Serialize};

pub use crate::backends::BackendState;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// `ip:port` as configured.
    pub address: String,
    pub state: BackendState,
    /// Flows open to this backend now (reconciled with the kernel socket table every second).
    pub live_connections: u64,
    /// Flows ever sent to this backend through the data path.
    pub total_connections: u64,
    /// New connections the backend refused (RST) or never answered, as the data path saw
    /// them; with passive health on, each one was retried on the next backend.
    #[serde(default)]
    pub failed_connections: u64,
    /// Result of the last health probe; `None` before the first one.
    pub healthy: Option<bool>,
    /// Duration of the last probe in milliseconds.
    pub last_probe_ms: Option<f64>,
    /// Why the last probe failed, if it did.
    pub last_error: Option<String>,
    /// The health checks' verdict after rise/fall, whatever a drain says: the state an undrain
    /// gives it.
    #[serde(default)]
    pub checks_up: bool,
    /// Health probes of this backend so far (since the daemon started or the backend was
    /// added), and how many of the latest passed in a row: `xlb rollout` waits for passes that
    /// all came after its restart command.
    #[serde(default)]
    pub probes: u64,
    #[serde(default)]
    pub probes_passed_in_a_row: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub listen: String,
    pub mode: String,
    /// Consecutive passing probes that mark a backend up (`health.rise`).
    #[serde(default)]
    pub rise: u32,
    pub backends: Vec<BackendStatus>,
    /// TLS and HTTP counters of an `https` or `redirect` service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https: Option<crate::https::HttpsStatus>,
    /// The certificate manager of an `https` service whose certificate comes from ACME.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeServiceStatus>,
}

/// An ACME-managed certificate in `/api/status`; times are RFC 3339 (UTC, seconds).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AcmeServiceStatus {
    pub domains: Vec<String>,
    /// `http-01` or `tls-alpn-01`.
    pub challenge: String,
    /// End of the certificate being served; `None` until one is issued.
    pub not_after: Option<String>,
    /// When this daemon last obtained a certificate for the service.
    pub last_renewal: Option<String>,
    /// When the manager orders next (at once after `xlb renew`).
    pub next_attempt: Option<String>,
    /// The last attempt's error, until an attempt succeeds.
    pub last_error: Option<String>,
    /// Failed attempts in a row.
    pub failures: u32,
    /// Attempts finished since the daemon started (`xlb renew` waits for it to move on).
    pub attempts: u64,
}

impl AcmeServiceStatus {
    pub fn new(domains: Vec<String>, challenge: crate::acme::ChallengeKind, s: &crate::acme::AcmeStatus) -> AcmeServiceStatus {
        let time = |t: Option<std::time::SystemTime>| t.map(|t| humantime::format_rfc3339_seconds(t).to_string());
        AcmeServiceStatus {
            domains,
            challenge: challenge.as_str().into(),
            not_after: time(s.not_after),
            last_renewal: time(s.last_renewal),
            next_attempt: time(s.next_attempt),
            last_error: s.last_error.clone(),
            failures: s.failures,
            attempts: s.attempts,
        }
    }
}

/// The answer to `POST /api/acme/renew?service=NAME`: the renewal was asked for; it runs in the
/// background.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RenewResult {
    pub service: String,
    /// The manager's status when the renewal was asked for: the renewal is done once
    /// `attempts` has moved past the one here.
    pub acme: AcmeServiceStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    /// "native" or "generic".
    pub xdp_mode: String,
}

/// Data-path counters summed over CPUs (see `lb_common::stats::Stats`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataplaneStatus {
    pub interfaces: Vec<InterfaceStatus>,
    pub pin_path: String,
    pub flows: u64,
    pub max_flows: u64,
    pub counters: std::collections::BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    #[serde(default)]
    pub dataplane: DataplaneStatus,
}

/// The answer to `POST /api/services/{name}/backends/{address}/drain` (or `/undrain`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrainResult {
    pub service: String,
    /// `ip:port` as configured.
    pub backend: String,
    /// Whether the backend is drained now (the operator's flag, kept across daemon restarts).
    pub drained: bool,
    /// Whether this request changed the flag (false: it already was as asked).
    pub changed: bool,
    /// The state now in the data path: `draining` while drained, else what health checks say.
    pub state: BackendState,
    /// Result of the last health probe; `None` before the first one.
    pub healthy: Option<bool>,
    /// Connections still open to the backend.
    pub live_connections: u64,
}

/// The answer to `POST /api/reload` when the new config was applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReloadResult {
    /// The file read (the one the daemon was started with).
    pub config: String,
    /// What changed, one line each (`service web: backend 198.18.0.1:8004 added`); empty when
    /// the file says what was already running.
    pub changes: Vec<String>,
}

/// `GET /status`: the layout of nginx's `stub_status`, so that scripts and monitoring written
/// for it keep working. Mapped from what an L4 balancer knows: active = live connections over
/// every backend; accepts = handled = connections sent to backends; requests repeats that
/// number, because xlb never sees HTTP requests; reading and writing are 0 and every active
/// connection counts as waiting, because xlb cannot tell what a connection is doing. Trailing
/// spaces as nginx prints them.
pub fn render_stub_status(status: &Status) -> String {
    let backends = status.services.iter().flat_map(|s| &s.backends);
    let active: u64 = backends.clone().map(|b| b.live_connections).sum();
    let total: u64 = backends.map(|b| b.total_connections).sum();
    format!(
        "Active connections: {active} \nserver accepts handled requests\n {total} {total} {total} \n\
         Reading: 0 Writing: 0 Waiting: {active} \n"
    )
}

/// The text `xlb status` prints: one table per service, then the data path.
pub fn render_table(status: &Status) -> String {
    let mut out = String::new();
    for service in &status.services {
        out += &format!(
            "service {}  listen {}  mode {}\n",
            service.name, service.listen, service.mode
        );
        let mut rows = vec![
            [
                "BACKEND",
                "STATE",
                "LIVE",
                "TOTAL",
                "HEALTHY",
                "PROBE",
                "LAST ERROR",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for b in &service.backends {
            let state = match b.state {
                BackendState::Up => "up",
                BackendState::Down => "down",
                BackendState::Draining => "draining",
                BackendState::Failed => "failed (passive)",
            };
            let healthy = match b.healthy {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            };
            rows.push(vec![
                b.address.clone(),
                state.into(),
                b.live_connections.to_string(),
                b.total_connections.to_string(),
                healthy.into(),
                b.last_probe_ms
                    .map_or_else(|| "-".into(), |ms| format!("{ms:.1}ms")),
                // Errors come from the network; keep one backend on one line whatever they hold.
                b.last_error
                    .as_deref()
                    .map_or_else(|| "-".into(), |e| e.replace(char::is_control, " ")),
            ]);
        }
        if service.backends.is_empty() {
            if service.https.is_none() {
                out += "  (no backends)\n";
            }
        } else {
            out += &align(&rows, &[false, false, true, true, false, true, false]);
        }
        if let Some(h) = &service.https {
            let r = &h.responses;
            if service.mode == "https" {
                let cert = match h.cert_expires_in_seconds {
                    Some(s) if s < 0 => "EXPIRED".to_string(),
                    Some(s) => format!("expires in {}d {}h", s / 86_400, s % 86_400 / 3600),
                    None => "none yet".into(),
                };
                out += &format!(
                    "  tls handshakes: {} full, {} resumed, {} failed  certificate: {cert}\n",
                    h.handshakes_full, h.handshakes_resumed, h.handshakes_failed
                );
            }
            out += &format!(
                "  responses: 1xx {} 2xx {} 3xx {} 4xx {} 5xx {}  retries {}\n",
                r.c1xx, r.c2xx, r.c3xx, r.c4xx, r.c5xx, h.retries
            );
        }
        if let Some(a) = &service.acme {
            out += &format!(
                "  acme ({}) {}: certificate until {}  renewed {}  next attempt {}\n",
                a.challenge,
                a.domains.join(","),
                a.not_after.as_deref().unwrap_or("(none yet)"),
                a.last_renewal.as_deref().unwrap_or("-"),
                a.next_attempt.as_deref().unwrap_or("-"),
            );
            if let Some(e) = &a.last_error {
                out += &format!(
                    "  acme FAILING ({} attempts in a row): {}\n",
                    a.failures,
                    e.replace(char::is_control, " ")
                );
            }
        }
        out.push('\n');
    }
    let dp = &status.dataplane;
    let interfaces: Vec<String> = dp
        .interfaces
        .iter()
        .map(|i| format!("{} ({})", i.name, i.xdp_mode))
        .collect();
    let interfaces = if interfaces.is_empty() {
        "-".into()
    } else {
        interfaces.join(", ")
    };
    out += &format!(
        "dataplane  interfaces {interfaces}  flows {}/{}\n",
        dp.flows, dp.max_flows
    );
    let counters: Vec<Vec<String>> = dp
        .counters
        .iter()
        .filter(|&(_, &v)| v != 0)
        .map(|(k, v)| vec![k.clone(), v.to_string()])
        .collect();
    out += &align(&counters, &[false, true]);
    out
}

/// Two-space-indented columns two spaces apart; `right[i]` right-aligns column `i`.
fn align(rows: &[Vec<String>], right: &[bool]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        widths.resize(widths.len().max(row.len()), 0);
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for ((cell, &width), &right) in row
            .iter()
            .zip(&widths)
            .zip(right.iter().chain(std::iter::repeat(&false)))
        {
            line += &if right {
                format!("  {cell:>width$}")
            } else {
                format!("  {cell:<width$}")
            };
        }
        out += line.trim_end();
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(address: &str, state: BackendState) -> BackendStatus {
        BackendStatus {
            address: address.into(),
            state,
            live_connections: 0,
            total_connections: 0,
            failed_connections: 0,
            healthy: None,
            last_probe_ms: None,
            last_error: None,
            checks_up: state != BackendState::Down,
            probes: 0,
            probes_passed_in_a_row: 0,
        }
    }

    #[test]
    fn table_aligns_backends_and_lists_nonzero_counters() {
        let status = Status {
            services: vec![
                ServiceStatus {
                    name: "web".into(),
                    listen: "203.0.113.10:80".into(),
                    mode: "l4".into(),
                    rise: 2,
                    backends: vec![
                        BackendStatus {
                            live_connections: 3,
                            total_connections: 12045,
                            healthy: Some(true),
                            last_probe_ms: Some(1.25),
                            ..backend("203.0.113.10:8001", BackendState::Up)
                        },
                        BackendStatus {
                            total_connections: 7,
                            healthy: Some(false),
                            last_probe_ms: Some(500.0),
                            last_error: Some("invalid HTTP response:\nx".into()),
                            ..backend("203.0.113.10:8002", BackendState::Down)
                        },
                        backend("[2001:db8::10]:8003", BackendState::Draining),
                    ],
                    https: None,
                    acme: None,
                },
                ServiceStatus {
                    name: "empty".into(),
                    listen: "[::1]:80".into(),
                    mode: "l4".into(),
                    rise: 2,
                    backends: vec![],
                    https: None,
                    acme: None,
                },
            ],
            dataplane: DataplaneStatus {
                interfaces: vec![
                    InterfaceStatus {
                        name: "eth0".into(),
                        xdp_mode: "native".into(),
                    },
                    InterfaceStatus {
                        name: "eth1".into(),
                        xdp_mode: "generic".into(),
                    },
                ],
                pin_path: "/sys/fs/bpf/xlb".into(),
                flows: 3,
                max_flows: 1048576,
                counters: [
                    ("new_flows", 12052),
                    ("drop_no_backend", 0),
                    ("malformed", 2),
                ]
                .map(|(k, v)| (k.to_string(), v))
                .into(),
            },
        };
        let expected = "\
service web  listen 203.0.113.10:80  mode l4
  BACKEND              STATE     LIVE  TOTAL  HEALTHY    PROBE  LAST ERROR
  203.0.113.10:8001    up           3  12045  yes        1.2ms  -
  203.0.113.10:8002    down         0      7  no       500.0ms  invalid HTTP response: x
  [2001:db8::10]:8003  draining     0      0  -              -  -

service empty  listen [::1]:80  mode l4
  (no backends)

dataplane  interfaces eth0 (native), eth1 (generic)  flows 3/1048576
  malformed      2
  new_flows  12052
";
        assert_eq!(render_table(&status), expected);
    }

    #[test]
    fn table_says_who_failed_a_backend() {
        let status = Status {
            services: vec![ServiceStatus {
                name: "web".into(),
                listen: "203.0.113.10:80".into(),
                mode: "l4".into(),
                rise: 2,
                backends: vec![BackendStatus {
                    total_connections: 40,
                    failed_connections: 1,
                    healthy: Some(true),
                    last_probe_ms: Some(0.5),
                    ..backend("203.0.113.10:8001", BackendState::Failed)
                }],
                https: None,
                acme: None,
            }],
            dataplane: DataplaneStatus::default(),
        };
        let table = render_table(&status);
        assert!(
            table.contains("  203.0.113.10:8001  failed (passive)     0     40  yes      0.5ms  -\n"),
            "{table}"
        );
        // The JSON says `failed`, with the count of failed connections.
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["services"][0]["backends"][0]["state"], "failed");
        assert_eq!(json["services"][0]["backends"][0]["failed_connections"], 1);
    }

    #[test]
    fn table_shows_the_acme_manager_and_its_failure() {
        let mut acme = AcmeServiceStatus {
            domains: vec!["example.com".into(), "www.example.com".into()],
            challenge: "http-01".into(),
            not_after: Some("2027-03-01T12:00:00Z".into()),
            last_renewal: Some("2026-12-01T12:00:01Z".into()),
            next_attempt: Some("2027-01-30T12:00:00Z".into()),
            last_error: None,
            failures: 0,
            attempts: 1,
        };
        let status = |acme: &AcmeServiceStatus| Status {
            services: vec![ServiceStatus {
                name: "site".into(),
                listen: "203.0.113.10:443".into(),
                mode: "https".into(),
                rise: 2,
                backends: vec![],
                https: None,
                acme: Some(acme.clone()),
            }],
            dataplane: DataplaneStatus::default(),
        };
        let line = "  acme (http-01) example.com,www.example.com: certificate until 2027-03-01T12:00:00Z  \
                    renewed 2026-12-01T12:00:01Z  next attempt 2027-01-30T12:00:00Z\n";
        let table = render_table(&status(&acme));
        assert!(table.contains(line), "{table}");
        assert!(!table.contains("FAILING"), "{table}");
        acme.last_error = Some("placing the order:\nconnection refused".into());
        acme.failures = 3;
        let table = render_table(&status(&acme));
        assert!(table.contains("  acme FAILING (3 attempts in a row): placing the order: connection refused\n"), "{table}");
        // Round trip through the JSON `xlb status` reads.
        let json = serde_json::to_string(&status(&acme)).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), status(&acme));
    }
}

//! `GET /metrics`: one status snapshot as OpenMetrics text.
use std::sync::atomic::AtomicU64;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge},
    registry::{Metric, Registry, Unit},
};

use crate::status::{BackendState, Status};

pub(super) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    service: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    service: String,
    backend: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    service: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResponseLabels {
    service: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterfaceLabels {
    interface: String,
    xdp_mode: String,
}

/// `xlb_interface_info{interface,xdp_mode} 1` per interface. An info metric carries its labels
/// itself, so a `Family` (one label set per entry, built by a constructor that cannot see it)
/// does not fit; this collector writes one sample per interface under one descriptor.
#[derive(Debug)]
struct InterfaceInfo(Vec<InterfaceLabels>);

impl Collector for InterfaceInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let help = "Interfaces the XDP program is attached to, and in which mode";
        let mut metric =
            encoder.encode_descriptor("xlb_interface", help, None, MetricType::Info)?;
        self.0
            .iter()
            .try_for_each(|labels| metric.encode_info(labels))
    }
}

/// The OpenMetrics exposition of one status snapshot. A fresh registry per scrape keeps the
/// output exactly in step with the snapshot: backends that left the config leave the metrics.
pub(super) fn encode(status: &Status) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    // Exported in this order; the names, labels and HELP texts are what dashboards and alert
    // rules query.
    let live: Family<BackendLabels, Gauge> = register(&mut registry, "xlb_backend_live_connections", "Connections open to the backend now", None);
    let total: Family<BackendLabels, Counter> = register(&mut registry, "xlb_backend_connections", "Connections sent to the backend by the data path", None);
    let failed: Family<BackendLabels, Counter> = register(&mut registry, "xlb_backend_failed_connections", "New connections the backend refused or never answered (passive health)", None);
    let up: Family<StateLabels, Gauge> = register(&mut registry, "xlb_backend_up", "1 for the backend's current state (up, down, draining or failed), 0 for the others", None);
    let probe: Family<BackendLabels, Gauge<f64, AtomicU64>> = register(&mut registry, "xlb_backend_probe_duration", "Duration of the last health probe of the backend", Some(Unit::Seconds));
    let handshakes: Family<HandshakeLabels, Counter> = register(&mut registry, "xlb_tls_handshakes", "TLS handshakes of an https service: full, resumed (session ticket or cache) or failed", None);
    let responses: Family<ResponseLabels, Counter> = register(&mut registry, "xlb_http_responses", "HTTP responses of an https or redirect service, by status class", None);
    let retries: Family<ServiceLabels, Counter> = register(&mut registry, "xlb_http_retries", "Requests of an https service sent again to another backend after a failure", None);
    let not_after: Family<ServiceLabels, Gauge> = register(&mut registry, "xlb_certificate_not_after", "notAfter of the https service's certificate that expires first (Unix time)", Some(Unit::Seconds));
    let expires_in: Family<ServiceLabels, Gauge> = register(&mut registry, "xlb_certificate_expiry", "Time left until the https service's first certificate expires (negative once expired)", Some(Unit::Seconds));
    let acme_failures: Family<ServiceLabels, Gauge> = register(&mut registry, "xlb_acme_renewal_failures", "Failed ACME attempts in a row for the service's certificate (0 once one succeeds)", None);
    let acme_renewed: Family<ServiceLabels, Gauge> = register(&mut registry, "xlb_acme_last_renewal", "When this daemon last obtained the service's certificate from its ACME CA (Unix time)", Some(Unit::Seconds));
    for service in &status.services {
        let service_labels = ServiceLabels { service: service.name.clone() };
        if let Some(a) = &service.acme {
            acme_failures.get_or_create(&service_labels).set(i64::from(a.failures));
            let renewed = a.last_renewal.as_deref().and_then(|t| humantime::parse_rfc3339(t).ok());
            if let Some(at) = renewed.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()) {
                acme_renewed.get_or_create(&service_labels).set(saturating_i64(at.as_secs()));
            }
        }
        if let Some(h) = &service.https {
            let s = || service.name.clone();
            for (kind, n) in [("full", h.handshakes_full), ("resumed", h.handshakes_resumed), ("failed", h.handshakes_failed)] {
                handshakes.get_or_create(&HandshakeLabels { service: s(), kind }).inc_by(n);
            }
            let r = &h.responses;
            for (class, n) in [("1xx", r.c1xx), ("2xx", r.c2xx), ("3xx", r.c3xx), ("4xx", r.c4xx), ("5xx", r.c5xx)] {
                responses.get_or_create(&ResponseLabels { service: s(), class }).inc_by(n);
            }
            retries.get_or_create(&service_labels).inc_by(h.retries);
            if let (Some(at), Some(left)) = (h.cert_not_after, h.cert_expires_in_seconds) {
                not_after.get_or_create(&service_labels).set(at);
                expires_in.get_or_create(&service_labels).set(left);
            }
        }
        for backend in &service.backends {
            let labels = BackendLabels {
                service: service.name.clone(),
                backend: backend.address.clone(),
            };
            live.get_or_create(&labels).set(saturating_i64(backend.live_connections));
            total.get_or_create(&labels).inc_by(backend.total_connections);
            failed.get_or_create(&labels).inc_by(backend.failed_connections);
            for (state, name) in [
                (BackendState::Up, "up"),
                (BackendState::Down, "down"),
                (BackendState::Draining, "draining"),
                (BackendState::Failed, "failed"),
            ] {
                let labels = StateLabels {
                    service: labels.service.clone(),
                    backend: labels.backend.clone(),
                    state: name,
                };
                up.get_or_create(&labels).set(i64::from(backend.state == state));
            }
            if let Some(ms) = backend.last_probe_ms {
                probe.get_or_create(&labels).set(ms / 1000.0);
            }
        }
    }
    let dataplane = &status.dataplane;
    let interfaces = dataplane
        .interfaces
        .iter()
        .map(|i| InterfaceLabels {
            interface: i.name.clone(),
            xdp_mode: i.xdp_mode.clone(),
        })
        .collect();
    registry.register_collector(Box::new(InterfaceInfo(interfaces)));
    register::<Gauge>(&mut registry, "xlb_flows", "Flows in the connection-tracking table", None).set(saturating_i64(dataplane.flows));
    register::<Gauge>(&mut registry, "xlb_flows_max", "Capacity of the connection-tracking table", None).set(saturating_i64(dataplane.max_flows));
    for (name, &value) in &dataplane.counters {
        let name: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        register::<Counter>(&mut registry, format!("xlb_dataplane_{name}"), format!("Data-path counter {name}, summed over CPUs"), None).inc_by(value);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// Registers an empty metric and hands back a clone to fill: clones of a `Family`, `Gauge` or
/// `Counter` share their values, so what is set through it is what gets encoded (and a family
/// left without entries is not exported at all).
fn register<M: Metric + Clone + Default>(registry: &mut Registry, name: impl Into<String>, help: impl Into<String>, unit: Option<Unit>) -> M {
    let metric = M::default();
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric.clone()),
        None => registry.register(name, help, metric.clone()),
    }
    metric
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hyper::{Method, StatusCode, header};

    use super::*;
    use crate::admin::{
        client::get,
        testing::{Fixed, sample, sample_with_https, start, text},
    };

    #[tokio::test]
    async fn metrics_expose_the_snapshot() {
        let server = start(Fixed(Ok(sample_with_https()))).await;
        let response = get(server.addr, Method::GET, "/metrics").await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], OPENMETRICS);
        let body = text(&response);
        let b1 = r#"service="web",backend="203.0.113.10:8001""#;
        let b2 = r#"service="web",backend="203.0.113.10:8002""#;
        for line in [
            "# TYPE xlb_backend_live_connections gauge".to_string(),
            format!("xlb_backend_live_connections{{{b1}}} 3"),
            "# TYPE xlb_backend_connections counter".into(),
            format!("xlb_backend_connections_total{{{b1}}} 120"),
            format!("xlb_backend_connections_total{{{b2}}} 7"),
            "# TYPE xlb_backend_failed_connections counter".into(),
            format!("xlb_backend_failed_connections_total{{{b1}}} 0"),
            format!("xlb_backend_up{{{b1},state=\"failed\"}} 0"),
            format!("xlb_backend_up{{{b1},state=\"up\"}} 1"),
            format!("xlb_backend_up{{{b1},state=\"down\"}} 0"),
            format!("xlb_backend_up{{{b2},state=\"down\"}} 1"),
            r#"xlb_backend_up{service="web",backend="203.0.113.10:8003",state="draining"} 1"#
                .into(),
            "# UNIT xlb_backend_probe_duration_seconds seconds".into(),
            format!("xlb_backend_probe_duration_seconds{{{b1}}} 0.0015"),
            format!("xlb_backend_probe_duration_seconds{{{b2}}} 0.25"),
            r#"xlb_interface_info{interface="eth0",xdp_mode="native"} 1"#.into(),
            "xlb_flows 4".into(),
            "xlb_flows_max 1048576".into(),
            "# TYPE xlb_dataplane_new_flows counter".into(),
            "xlb_dataplane_new_flows_total 136".into(),
            "xlb_dataplane_drop_no_backend_total 0".into(),
            r#"xlb_tls_handshakes_total{service="site",kind="full"} 10"#.into(),
            r#"xlb_tls_handshakes_total{service="site",kind="resumed"} 4"#.into(),
            r#"xlb_http_responses_total{service="site",class="2xx"} 40"#.into(),
            r#"xlb_http_responses_total{service="site",class="5xx"} 2"#.into(),
            r#"xlb_http_retries_total{service="site"} 3"#.into(),
            r#"xlb_certificate_not_after_seconds{service="site"} 1800000000"#.into(),
            r#"xlb_certificate_expiry_seconds{service="site"} 86400"#.into(),
            r#"xlb_acme_renewal_failures{service="site"} 0"#.into(),
            r#"xlb_acme_last_renewal_seconds{service="site"} 1792224000"#.into(),
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "missing `{line}` in:\n{body}"
            );
        }
        assert!(
            !body.contains("203.0.113.10:8003\"} 0."),
            "no probe yet, so no probe duration:\n{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        server.shutdown().await;
    }

    #[test]
    fn grafana_dashboard_matches_the_metrics() {
        let stats = include_str!("../../../lb-common/src/stats.rs");
        let counters: BTreeMap<String, u64> = stats
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub ")?.strip_suffix(": u64,"))
            .map(|name| (name.to_owned(), 1))
            .collect();
        assert!(counters.len() >= 17, "{counters:?}");
        let mut status = sample();
        status.dataplane.counters = counters;
        let exported: std::collections::BTreeSet<String> = encode(&status)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
            .collect();
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../dashboards/xlb-grafana.json"))
                .expect("the dashboard is JSON");
        let mut queries = Vec::new();
        fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(map) => {
                    for (key, value) in map {
                        match (key.as_str(), value) {
                            ("expr" | "definition", serde_json::Value::String(q)) => {
                                out.push(q.clone())
                            }
                            _ => walk(value, out),
                        }
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
                _ => {}
            }
        }
        walk(&dashboard, &mut queries);
        assert!(queries.len() >= 20, "{queries:?}");
        let mut used = std::collections::BTreeSet::new();
        for query in &queries {
            let names: Vec<&str> = query
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("xlb_"))
                .collect();
            assert!(!names.is_empty(), "a query of no xlb series: {query}");
            for name in names {
                assert!(
                    exported.contains(name),
                    "the dashboard queries {name}, which /metrics does not export ({query}); it exports {exported:?}"
                );
                used.insert(name.to_owned());
            }
        }
        let missing: Vec<&String> = exported.difference(&used).collect();
        assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
        let panels = dashboard["panels"].as_array().unwrap();
        let ids: std::collections::BTreeSet<u64> =
            panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
        assert_eq!(ids.len(), panels.len(), "panel ids must be unique");
    }

}

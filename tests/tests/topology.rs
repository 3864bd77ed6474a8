//! Smoke test of the test fixtures themselves: the topology carries IPv4 and IPv6 between its
//! namespaces, the demo backend answers, and everything disappears on drop.
use std::{net::SocketAddr, process::Command, time::Duration};

use xlb_tests::{Topology, demo_backend_bin, http_get};

#[test]
fn topology_carries_v4_and_v6_and_cleans_up() {
    xlb_tests::root_or_skip!();
    let topology = Topology::new("topology");
    let v4 = SocketAddr::from((topology.lb_v4, 8001));
    let v6 = SocketAddr::from((topology.lb_v6, 8001));
    let listen = format!("{v4},{v6}");
    let backend = topology.spawn_lb(
        demo_backend_bin(),
        &["--listen", &listen, "--name", "smoke-1"],
    );
    backend.wait_for_output(&format!("listening on {v6}"), Duration::from_secs(10));

    for addr in [v4, v6] {
        let response = topology
            .in_client(|| http_get(addr, "/", Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("GET http://{addr}/ from the client namespace: {e}"));
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.body, "served by smoke-1\n");
        assert_eq!(response.header("X-Served-By"), Some("smoke-1"));
    }
    let health = topology
        .in_client(|| http_get(v4, "/health", Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        health.body.trim(),
        r#"{"instance":"smoke-1","status":"ok"}"#
    );
    // The backend is only reachable through the veth: the host namespace has no such address.
    assert!(topology.ss_lb(&["-Htln"]).contains(":8001"));

    let names = [topology.lb_ns.clone(), topology.client_ns.clone()];
    drop(backend);
    drop(topology);
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let list = String::from_utf8_lossy(&list.stdout);
    for name in names {
        assert!(
            !list.contains(&name),
            "namespace {name} still present after drop:\n{list}"
        );
    }
}

//! Reloading the config of a running daemon (`xlb reload`, SIGHUP): an invalid file changes
//! nothing; removing a backend drains it (its connections continue, no new ones reach it) and
//! frees its slot once they end; adding it back brings it into rotation; backends that stay
//! keep their slots, counts and connections throughout.
//!
//! Run as root after `cargo build`:
//! `cargo test -p xlb-tests --test reload -- --test-threads=1 --nocapture`.

use std::time::Duration;

use serde_json::Value;
use xlb_tests::{config::Service, *};

/// The backends of service "web" in a status document: (address, state, live).
fn listed(status: &Value) -> Vec<(String, String, u64)> {
    status["services"][0]["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no backends in {status:#}"))
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_owned(),
                b["state"].as_str().unwrap().to_owned(),
                b["live_connections"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn log_count(lb: &Lb, needle: &str) -> usize {
    lb.daemon().output().matches(needle).count()
}

fn wait_log(lb: &Lb, needle: &str, n: usize, timeout: Duration) {
    wait_until(timeout, &format!("{n}× {needle:?} in the daemon's log"), || {
        log_count(lb, needle) >= n
    });
}

#[test]
fn reload_rejects_bad_files_and_drains_removed_backends() {
    xlb_tests::root_or_skip!();
    let lb = Lb::start("reload", Family::V4);
    let original = std::fs::read_to_string(&lb.config).unwrap();
    // One keep-alive connection on every backend (idle backends take turns).
    let mut held: Vec<Held> = (0..BACKENDS).map(|_| lb.hold()).collect();
    let mut on: Vec<usize> = held.iter().map(|h| h.backend).collect();
    on.sort();
    assert_eq!(on, [0, 1, 2], "three held connections over three idle backends");
    lb.await_live([1, 1, 1], "one held connection per backend");

    // 1. An invalid file: refused with the file, line and key; nothing changes. Raw text: no
    // typed config can hold an unknown key.
    let broken = original.replace("rise = 2", "rise = 2\nrisee = 3");
    std::fs::write(&lb.config, &broken).unwrap();
    let (status, out) = run(lb.xlb(&["reload"]), "xlb reload (invalid file)");
    println!("xlb reload with an invalid file: {status}: {}", out.trim());
    assert!(!status.success(), "an invalid config was accepted: {out}");
    assert!(
        out.contains("422 Unprocessable Entity: reload refused, the running config stays")
            && out.contains(&format!("{}:", lb.config.display()))
            && out.contains("risee"),
        "{out}"
    );
    wait_log(&lb, "reload refused, the running config stays in force", 1, COMMAND_TIMEOUT);
    // A change that only a restart can make is refused too.
    lb.write(&lb.config().xdp_mode("generic"));
    let (status, out) = run(lb.xlb(&["reload"]), "xlb reload ([dataplane] changed)");
    assert!(!status.success() && out.contains("[dataplane] changed; that takes a restart"), "{out}");
    // Still serving, evenly, with every held connection on its backend.
    assert_eq!(lb.spread(9), [3, 3, 3], "after refused reloads");
    for h in &mut held {
        assert_eq!(h.request(), h.backend, "a held connection changed backend");
    }

    // 2. Remove app-3 (by SIGHUP, as systemctl reload does): it drains.
    let app3 = lb.backends[2].to_string();
    let without = lb.config().edit_service("web", |web| web.backends(&lb.backends[..2])).render();
    assert_ne!(without, original, "the config lists {app3}");
    std::fs::write(&lb.config, &without).unwrap();
    let chosen_before_removal = lb.raw_conns(2).1;
    assert!(lb.daemon().signal(Signal::SIGHUP));
    wait_log(&lb, "config reloaded", 1, COMMAND_TIMEOUT);
    let log = lb.daemon().output();
    assert!(
        log.contains(&format!("service web: backend {app3} removed (draining)")),
        "{log}"
    );
    assert!(log.contains("backend removed from the config: draining"), "{log}");
    let status = lb.status();
    let backends = listed(&status);
    assert_eq!(backends.len(), 2, "{status:#}");
    assert!(backends.iter().all(|(a, state, live)| *a != app3 && state == "up" && *live == 1), "{backends:?}");
    let served = lb.spread(30);
    println!("30 new connections after removing app-3: {served:?}");
    assert_eq!(served[2], 0, "a removed backend got new connections: {served:?}");
    assert_eq!(served[0] + served[1], 30);
    for h in &mut held {
        assert_eq!(h.request(), h.backend, "a held connection broke or moved after the reload");
    }
    // The backends that stayed kept their slots and counts; app-3's slot still counts its one
    // connection while it drains, and no new flow has chosen it since the reload.
    for slot in 0..2 {
        assert_eq!(lb.raw_conns(slot).0, 1, "slot {slot}");
    }
    let (live3, chosen3) = lb.raw_conns(2);
    assert_eq!(live3, 1, "app-3's slot while it drains");
    assert_eq!(chosen3, chosen_before_removal, "a new flow chose the removed backend's slot");
    assert_eq!(log_count(&lb, "removed backend has no connections left"), 0);

    // Its last connection ends: the slot is freed.
    let i3 = held.iter().position(|h| h.backend == 2).unwrap();
    drop(held.remove(i3));
    wait_log(&lb, "removed backend has no connections left; its slot is free", 1, Duration::from_secs(10));
    assert_eq!(lb.raw_conns(2), (0, 0), "app-3's slot after it was freed");

    // 3. Add it back (`xlb reload`): it is in rotation again, in its old slot (the free one).
    std::fs::write(&lb.config, &original).unwrap();
    let out = run_ok(lb.xlb(&["reload"]), "xlb reload (backend added)");
    println!("xlb reload:\n{out}");
    assert!(out.contains(&format!("service web: backend {app3} added")), "{out}");
    lb.wait_healthy();
    let served = lb.spread(9);
    println!("9 new connections after adding app-3 back: {served:?}");
    assert!(served[2] >= 3, "the re-added backend gets its share first: {served:?}");
    for h in &mut held {
        assert_eq!(h.request(), h.backend, "a held connection broke or moved after the reload");
    }
    // Nothing changed: nothing to do.
    let out = run_ok(lb.xlb(&["reload"]), "xlb reload (same file)");
    assert!(out.contains("nothing changed"), "{out}");

    // 4. A second service on a VIP port of its own, then removed again.
    let api = std::net::SocketAddr::new(lb.vip.ip(), 81);
    lb.write(&lb.config().service(Service::new("api", api).backends(&lb.backends[..2])));
    let out = run_ok(lb.xlb(&["reload"]), "xlb reload (service added)");
    assert!(out.contains(&format!("service api added ({api}, 2 backends)")), "{out}");
    let mut answered = [0; BACKENDS];
    for _ in 0..4 {
        let response = lb
            .topo
            .in_client(|| xlb_tests::http_get(api, "/", IO_TIMEOUT))
            .unwrap_or_else(|e| panic!("GET http://{api}/ after adding service api: {e}"));
        answered[app_index(&response.body)] += 1;
    }
    assert_eq!(answered, [2, 2, 0], "service api spreads over its two backends");
    let status = lb.status();
    assert_eq!(status["services"][1]["name"], "api", "{status:#}");
    let freed = log_count(&lb, "removed backend has no connections left");
    std::fs::write(&lb.config, &original).unwrap();
    let out = run_ok(lb.xlb(&["reload"]), "xlb reload (service removed)");
    assert!(out.contains("service api removed"), "{out}");
    // Its VIP is no longer balanced: nothing listens on port 81 itself.
    let refused = lb.topo.in_client(|| xlb_tests::http_get(api, "/", IO_TIMEOUT));
    assert!(refused.is_err(), "{api} still answered after its service was removed: {refused:?}");
    // Its backends held no connections: their slots are freed at the next reconcile.
    wait_log(&lb, "removed backend has no connections left", freed + 2, Duration::from_secs(10));
    // Service web is unaffected: its held connections keep their backends, and new ones go
    // to the least loaded (app-3, the one without a held connection).
    for h in &mut held {
        assert_eq!(h.request(), h.backend, "a held connection broke or moved after the reload");
    }
    assert_eq!(lb.spread(6)[2], 6, "service web after service api came and went");
    drop(held);
    lb.finish();
}

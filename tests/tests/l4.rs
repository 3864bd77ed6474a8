//! Scenario tests of the L4 least-connections path with real processes: the `xlb` daemon, three
//! demo backends and clients in a private two-namespace topology (see `Topology`; the harness,
//! `Lb`, is in `support/`).
//!
//! Every test asserts what a client sees (which backend answered, that every request was
//! answered) and what the daemon reports (`/api/status`), and checks the live counts against
//! the kernel's own socket table (`ss`) where that is the point. Timings that the daemon
//! promises (health transitions, reconciliation) are measured and printed.
//!
//! Run as root after `cargo build`:
//! `cargo test -p xlb-tests --test l4 -- --test-threads=1 --nocapture`.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use xlb_tests::*;

fn assert_even(served: &[usize; BACKENDS], n: usize) {
    let fair = n / BACKENDS;
    let (low, high) = (fair / 2, fair + fair / 2);
    for (b, &count) in served.iter().enumerate() {
        assert!(
            (low..=high).contains(&count),
            "app-{} answered {count} of {n} connections, outside {low}..={high}: {served:?}",
            b + 1
        );
    }
}

/// Idle backends share new connections evenly: 60 sequential connections, each closed before
/// the next, land 20 ± 50 % on each backend, and the daemon's per-backend totals count exactly
/// what the clients saw.
fn spread_evenly(tag: &str, family: Family) {
    const N: usize = 60;
    let lb = Lb::start(tag, family);
    assert_eq!(
        lb.totals(),
        [0, 0, 0],
        "a fresh daemon has counted nothing yet"
    );
    let start = Instant::now();
    let served = lb.spread(N);
    println!(
        "{N} connections to {} in {} ms: {served:?} per backend",
        lb.vip,
        start.elapsed().as_millis()
    );
    assert_eq!(served.iter().sum::<usize>(), N);
    assert_even(&served, N);

    let status = lb.cli_status();
    let view = lb.backends_of(&status);
    let totals: Vec<u64> = view.iter().map(|b| b.total).collect();
    let expected: Vec<u64> = served.iter().map(|&n| n as u64).collect();
    assert_eq!(
        totals, expected,
        "total_connections per backend should be what the clients saw: {status:#}"
    );
    assert_eq!(
        status["dataplane"]["counters"]["new_flows"], N as u64,
        "{status:#}"
    );
    assert!(view.iter().all(|b| b.state == "up"), "{view:?}");
    // Every connection was closed: nothing stays live.
    let (_, took) = lb.poll(RECONCILE_DEADLINE, "live counts back to 0", |lb| {
        let live = lb.live();
        (live == [0, 0, 0])
            .then_some(())
            .ok_or_else(|| format!("{live:?}"))
    });
    println!(
        "live counts 0 again {} ms after the last connection",
        took.as_millis()
    );

    // Held connections outlive the daemon's grace for flows without a socket: it finds their
    // sockets (in this address family) and keeps both the flows and the counts.
    let mut held: Vec<Held> = (0..BACKENDS).map(|_| lb.hold()).collect();
    let mut landed: Vec<usize> = held.iter().map(|h| h.backend).collect();
    landed.sort();
    assert_eq!(
        landed,
        [0, 1, 2],
        "three held connections to three idle backends should land one on each"
    );
    lb.assert_live_stable(
        &[1, 1, 1],
        Instant::now() + NO_SOCKET_GRACE + RECONCILE_INTERVAL * 2,
    );
    for h in &mut held {
        assert_eq!(h.request(), h.backend, "a held connection changed backend");
    }
    drop(held);
    lb.finish();
}

#[test]
fn spread_idle_backends_evenly() {
    xlb_tests::root_or_skip!();
    spread_evenly("spread", Family::V4);
}

#[test]
fn spread_to_a_vip_on_its_own_address() {
    xlb_tests::root_or_skip!();
    spread_evenly("ownvip", Family::V4OwnVip);
}

#[test]
fn spread_over_ipv6() {
    xlb_tests::root_or_skip!();
    spread_evenly("spread6", Family::V6);
}

/// nginx's upstream_least_conn.t: a backend holding connections gets no new ones while the
/// others are idle.
#[test]
fn held_connections_steer_new_ones_elsewhere() {
    xlb_tests::root_or_skip!();
    let lb = Lb::start("held", Family::V4);
    // With every backend at the same count, each round of three connections puts one on each
    // backend, so app-1 has two after at most six; the bound only stops a broken balancer.
    let (mut on_app1, mut elsewhere) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        if on_app1.len() == 2 {
            break;
        }
        let held = lb.hold();
        if held.backend == 0 {
            on_app1.push(held)
        } else {
            elsewhere.push(held)
        }
    }
    assert_eq!(
        on_app1.len(),
        2,
        "could not get two connections onto app-1 in 30 tries"
    );
    let opened = on_app1.len() + elsewhere.len();
    assert!(
        opened <= 6,
        "least-connections should put 2 on app-1 within 6 connections, took {opened}"
    );
    drop(elsewhere);
    let took = lb.await_live([2, 0, 0], "live counts [2, 0, 0]");
    println!(
        "app-1 holds 2 connections, the others 0 ({} ms after closing the rest)",
        took.as_millis()
    );

    let served = lb.spread(10);
    println!("10 new connections: {served:?} per backend");
    assert_eq!(served.iter().sum::<usize>(), 10);
    assert_eq!(
        served[0], 0,
        "a new connection went to app-1, which holds 2 while the others hold 0"
    );
    assert!(
        served[1] > 0 && served[2] > 0,
        "both idle backends should get some: {served:?}"
    );

    // The held connections still work and still count.
    for held in &mut on_app1 {
        assert_eq!(held.request(), 0, "a held connection changed backend");
    }
    lb.poll(
        RECONCILE_DEADLINE,
        "live counts [2, 0, 0] after the short connections",
        |lb| {
            let live = lb.live();
            (live == [2, 0, 0])
                .then_some(())
                .ok_or_else(|| format!("{live:?}"))
        },
    );
    drop(on_app1);
    lb.finish();
}

#[test]
fn killed_backend_is_marked_down_and_refilled_first() {
    xlb_tests::root_or_skip!();
    let mut lb = Lb::start("killed", Family::V4);
    // Every backend serves before the failure.
    let warmup: Vec<Held> = (0..BACKENDS).map(|_| lb.hold()).collect();
    let mut landed: Vec<usize> = warmup.iter().map(|h| h.backend).collect();
    landed.sort();
    assert_eq!(
        landed,
        [0, 1, 2],
        "three connections to three idle backends should land one on each"
    );
    drop(warmup);
    lb.poll(RECONCILE_DEADLINE, "live counts [0, 0, 0]", |lb| {
        let live = lb.live();
        (live == [0, 0, 0])
            .then_some(())
            .ok_or_else(|| format!("{live:?}"))
    });

    let app1 = lb.apps[0].take().expect("app-1 runs");
    let killed = Instant::now();
    app1.kill9();
    drop(app1);
    let deadline = HEALTH_INTERVAL * FALL + HEALTH_INTERVAL;
    let (view, took) = lb.poll(Duration::from_secs(5), "app-1 marked down", |lb| {
        let view = lb.view();
        (view[0].state == "down")
            .then(|| view.clone())
            .ok_or_else(|| format!("{view:?}"))
    });
    println!(
        "app-1 marked down {} ms after kill -9 (interval {} ms × fall {FALL}, deadline {} ms); last error: {:?}",
        took.as_millis(),
        HEALTH_INTERVAL.as_millis(),
        deadline.as_millis(),
        view[0].last_error
    );
    assert!(
        took <= deadline,
        "app-1 took {took:?} to be marked down, more than {deadline:?}"
    );
    assert_eq!(view[0].healthy, Some(false), "{view:?}");
    assert!(
        view[0].last_error.is_some(),
        "a failed probe should say why: {view:?}"
    );
    assert!(view[1..].iter().all(|b| b.state == "up"), "{view:?}");
    assert!(killed.elapsed() < Duration::from_secs(5));

    let served = lb.spread(30);
    println!("30 connections with app-1 down: {served:?}");
    assert_eq!(served.iter().sum::<usize>(), 30);
    assert_eq!(served[0], 0, "a connection reached app-1, which is down");
    assert!(served[1] > 0 && served[2] > 0, "{served:?}");

    // Four connections held on each of the others while app-1 is down.
    let held: Vec<Held> = (0..8).map(|_| lb.hold()).collect();
    let mut per = [0; BACKENDS];
    held.iter().for_each(|h| per[h.backend] += 1);
    assert_eq!(
        per,
        [0, 4, 4],
        "least-connections over two backends should hold 4 on each"
    );

    let app1 = lb.spawn_app(0);
    lb.apps[0] = Some(app1);
    let restarted = Instant::now();
    let (_, took) = lb.poll(Duration::from_secs(5), "app-1 up and healthy again", |lb| {
        let view = lb.view();
        (view[0].state == "up" && view[0].healthy == Some(true))
            .then_some(())
            .ok_or_else(|| format!("{view:?}"))
    });
    let deadline = HEALTH_INTERVAL * RISE + HEALTH_INTERVAL;
    println!(
        "app-1 up again {} ms after it listened (interval × rise {RISE}, deadline {} ms)",
        took.as_millis(),
        deadline.as_millis()
    );
    assert!(
        took <= deadline,
        "app-1 took {:?} to come back up, more than {deadline:?}",
        restarted.elapsed()
    );
    lb.poll(RECONCILE_DEADLINE, "live counts [0, 4, 4]", |lb| {
        let live = lb.live();
        (live == [0, 4, 4])
            .then_some(())
            .ok_or_else(|| format!("{live:?}"))
    });

    // The returning backend is the least loaded: the next four connections all go to it.
    let refill: Vec<Held> = (0..4).map(|_| lb.hold()).collect();
    let landed: Vec<usize> = refill.iter().map(|h| h.backend).collect();
    println!(
        "4 new connections after app-1 came back landed on {:?}",
        landed.iter().map(|b| b + 1).collect::<Vec<_>>()
    );
    assert_eq!(
        landed,
        [0, 0, 0, 0],
        "app-1 (0 live) should get every new connection before the others (4 live each)"
    );
    lb.await_live([4, 4, 4], "live counts [4, 4, 4]");
    drop(refill);
    drop(held);
    lb.finish();
}

#[test]
fn live_counts_match_the_socket_table_after_chaos() {
    xlb_tests::root_or_skip!();
    const HELD: usize = 6;
    const BY_HOLDER: usize = 6;
    const HALF_OPEN: u16 = 3;
    let lb = Lb::start("chaos", Family::V4);
    let mut held: Vec<Held> = (0..HELD).map(|_| lb.hold()).collect();
    let holder = lb.topo.spawn_client(
        env!("CARGO_BIN_EXE_xlb-conn-holder"),
        &[
            "--connect",
            &lb.vip.to_string(),
            "--count",
            &BY_HOLDER.to_string(),
            "--hold-secs",
            "60",
        ],
    );
    holder.wait_for_output(&format!("holding {BY_HOLDER}"), Duration::from_secs(10));
    let spoofed = Ipv4Addr::new(198, 18, 0, 77);
    let syns_sent = Instant::now();
    for i in 0..HALF_OPEN {
        lb.spoofed_syn(SocketAddrV4::new(spoofed, 40000 + i));
    }
    // Before the chaos: 6 + 6 + 3 connections, least-connections keeps them 5 per backend,
    // and the status, the socket table and the map all agree.
    let took = lb.await_live([5, 5, 5], "5 live connections per backend before the chaos");
    println!(
        "before the chaos: 5 live per backend (agreed after {} ms)",
        took.as_millis()
    );
    let syn_recv = lb
        .topo
        .ss_lb(&["-Htn", "state", "syn-recv", "dst", &spoofed.to_string()]);
    assert_eq!(
        syn_recv.lines().count(),
        HALF_OPEN as usize,
        "half-open connections from {spoofed}:\n{syn_recv}"
    );

    // The chaos: a client process dies holding 6 connections, 2 connections are reset, 1 is
    // closed normally, and one backend's live count drifts by +7 (as after lost FINs).
    let killed_ports: Vec<u16> = holder
        .output()
        .lines()
        .filter_map(|l| l.strip_prefix("held ")?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(killed_ports.len(), BY_HOLDER, "{}", holder.output());
    holder.kill9();
    held.remove(0).reset();
    held.remove(0).reset();
    drop(held.remove(0));
    let drifted = 2;
    let (before, _) = lb.raw_conns(drifted);
    lb.set_raw_live(drifted, before + 7);
    println!("after the drift: status says {:?}", lb.live());

    let expected_total = (held.len() + HALF_OPEN as usize) as u64;
    let mut samples = 0;
    let (agreed, took) = lb.poll(
        RECONCILE_DEADLINE,
        "status live counts equal to the socket table",
        |lb| {
            samples += 1;
            let ss_before = lb.ss_live();
            let live = lb.live();
            let ss_after = lb.ss_live();
            let raw: Vec<i64> = (0..BACKENDS as u32).map(|s| lb.raw_conns(s).0).collect();
            assert!(
                raw.iter().all(|&l| l >= 0),
                "a live count went negative: {raw:?}"
            );
            let settled = ss_before == ss_after && ss_after.iter().sum::<u64>() == expected_total;
            (settled && live == ss_after)
                .then(|| live.clone())
                .ok_or_else(|| {
                    format!("status {live:?}, ss {ss_before:?} then {ss_after:?}, map {raw:?}")
                })
        },
    );
    println!(
        "status agreed with ss ({agreed:?}) {} ms after the chaos ({samples} samples; reconcile every {} ms)",
        took.as_millis(),
        RECONCILE_INTERVAL.as_millis()
    );

    // ... and keeps agreeing, with the map itself, until well after the daemon's grace for
    // flows without a socket: it does find the half-open ones.
    let until = (syns_sent + NO_SOCKET_GRACE + RECONCILE_INTERVAL * 2)
        .max(Instant::now() + RECONCILE_INTERVAL * 2);
    lb.assert_live_stable(&agreed, until);
    let syn_recv = lb
        .topo
        .ss_lb(&["-Htn", "state", "syn-recv", "dst", &spoofed.to_string()]);
    assert_eq!(
        syn_recv.lines().count(),
        HALF_OPEN as usize,
        "half-open connections from {spoofed}:\n{syn_recv}"
    );
    // The corrected counts are what the balancer uses: a new connection lands on a backend
    // with the fewest live connections.
    let min = *agreed.iter().min().unwrap();
    let mut next = lb.hold();
    assert_eq!(
        agreed[next.backend],
        min,
        "a new connection went to app-{} though live counts are {agreed:?}",
        next.backend + 1
    );
    assert_eq!(next.request(), next.backend);
    // The survivors are intact.
    for h in &mut held {
        assert_eq!(
            h.request(),
            h.backend,
            "held connection from port {} changed backend",
            h.local_port()
        );
    }
    drop(next);
    drop(held);
    lb.finish();
}

#[test]
fn daemon_restart_keeps_connections_and_counts() {
    xlb_tests::root_or_skip!();
    let mut lb = Lb::start("restart", Family::V4);
    let mut held = lb.hold();
    let b = held.backend;
    let mut expect_live = vec![0; BACKENDS];
    expect_live[b] = 1;
    lb.poll(RECONCILE_DEADLINE, "one live connection", |lb| {
        let live = lb.live();
        (live == expect_live)
            .then_some(())
            .ok_or_else(|| format!("{live:?}"))
    });
    let total_before = lb.totals();

    let daemon = lb.daemon.take().expect("daemon runs");
    let stopping = Instant::now();
    daemon.terminate();
    let (status, log) = daemon.wait_with_output(COMMAND_TIMEOUT);
    println!(
        "xlb run exited {} ms after SIGTERM: {status}",
        stopping.elapsed().as_millis()
    );
    assert!(
        status.success(),
        "xlb run exited with {status} on SIGTERM:\n{log}"
    );
    assert!(
        log.contains("the data path stays attached"),
        "the daemon should say it leaves the data path running:\n{log}"
    );
    drop(daemon);
    assert!(
        lb.xdp_attached(),
        "the XDP program should stay attached after SIGTERM:\n{}",
        link_show(&lb.topo)
    );
    assert!(
        lb.topo.pin_path.join("FLOWS").exists(),
        "the maps should stay pinned"
    );

    // Without a daemon, the held connection and new ones still work.
    assert_eq!(
        held.request(),
        b,
        "the held connection changed backend without the daemon"
    );
    let served_meanwhile = lb.spread(3);
    println!(
        "with the daemon stopped: held connection answered by app-{}, 3 new ones {served_meanwhile:?}",
        b + 1
    );

    lb.start_daemon();
    let log = lb.daemon().output();
    assert!(
        log.contains("adopted pinned maps"),
        "the restarted daemon should adopt the maps:\n{log}"
    );
    assert_eq!(
        held.request(),
        b,
        "the held connection changed backend across the restart"
    );
    let (view, took) = lb.poll(RECONCILE_DEADLINE, "live counts after the restart", |lb| {
        let view = lb.view();
        let live: Vec<u64> = view.iter().map(|v| v.live).collect();
        (live == expect_live)
            .then(|| view.clone())
            .ok_or_else(|| format!("{view:?}"))
    });
    println!(
        "after the restart: live {:?} ({} ms)",
        view.iter().map(|v| v.live).collect::<Vec<_>>(),
        took.as_millis()
    );
    for (i, v) in view.iter().enumerate() {
        let expected = total_before[i] + served_meanwhile[i] as u64;
        assert_eq!(
            v.total,
            expected,
            "total_connections of app-{} not preserved across the restart: {view:?}",
            i + 1
        );
        assert_eq!(v.state, "up", "{view:?}");
    }
    assert_eq!(held.request(), b);
    drop(held);
    lb.finish();
}

/// Starts `xlb run` with `lb`'s config, which must fail fast: exits non-zero naming `needle`,
/// and leaves no pins and no XDP program on the lb interface.
fn assert_start_fails_cleanly(lb: &Lb, needle: &str) {
    let (status, output) = run(lb.xlb(&["run"]), "xlb run (bad config)");
    println!("xlb run: {status}: {}", output.trim());
    assert!(!status.success(), "xlb run succeeded:\n{output}");
    assert!(
        output.contains(needle),
        "the error should mention {needle:?}:\n{output}"
    );
    let pins: Vec<_> = std::fs::read_dir(&lb.topo.pin_path)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !lb.topo.pin_path.exists(),
        "{} was left behind, holding {pins:?}:\n{output}",
        lb.topo.pin_path.display()
    );
    assert!(
        !lb.xdp_attached(),
        "xlb0 was left with an XDP program:\n{}",
        link_show(&lb.topo)
    );
}

/// A config naming an interface the lb namespace does not have is refused by `xlb check` and
/// by `xlb run` before anything is loaded, although the first interface exists.
#[test]
fn bad_config_attaches_nothing() {
    xlb_tests::root_or_skip!();
    let lb = Lb::prepare("badcfg", Family::V4);
    lb.write_config(&["xlb0", "nosuch0"], "auto");
    let (status, check) = run(lb.xlb(&["check"]), "xlb check");
    assert!(
        !status.success(),
        "xlb check accepted a missing interface: {check}"
    );
    assert!(
        check.contains("nosuch0"),
        "xlb check should name the interface: {check}"
    );
    assert_start_fails_cleanly(&lb, "nosuch0");
}

/// A start that fails half-way (XDP attached to the first interface, then refused by the
/// second: `lo` has no native XDP) takes back what it attached and pinned.
#[test]
fn failed_attach_leaves_nothing_attached() {
    xlb_tests::root_or_skip!();
    let lb = Lb::prepare("badattach", Family::V4);
    lb.write_config(&["xlb0", "lo"], "native");
    run_ok(lb.xlb(&["check"]), "xlb check");
    assert_start_fails_cleanly(&lb, "attaching XDP to lo");
}

/// A daemon that cannot serve its admin API (the address is taken) fails without leaving a
/// data path behind that nobody manages.
#[test]
fn admin_address_in_use_attaches_nothing() {
    xlb_tests::root_or_skip!();
    let lb = Lb::prepare("badadmin", Family::V4);
    let squatter = lb
        .topo
        .in_lb(|| std::net::TcpListener::bind(ADMIN))
        .expect("binding the admin address first");
    assert_start_fails_cleanly(&lb, "admin");
    drop(squatter);
}

/// Least-connections stays even under a steady stream of short connections, across many
/// reconciles: the daemon's corrections must not leave a backend with phantom connections
/// that keep it out of rotation until the next reconcile.
#[test]
fn steady_short_connections_stay_even_across_reconciles() {
    xlb_tests::root_or_skip!();
    const RUN: Duration = Duration::from_secs(3);
    const MAX_CONNECTIONS: usize = 20_000;
    const WINDOW_MS: u128 = 250;
    let lb = Lb::start("steady", Family::V4);
    let start = Instant::now();
    let mut log: Vec<(u128, usize)> = Vec::new();
    // Meanwhile the counts in the map are sampled: one connection at a time means every
    // backend holds 0 or 1, whatever the reconciles do.
    let samples = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            while start.elapsed() < RUN {
                samples.push(
                    (0..BACKENDS as u32)
                        .map(|s| lb.raw_conns(s).0)
                        .collect::<Vec<_>>(),
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        });
        while start.elapsed() < RUN && log.len() < MAX_CONNECTIONS {
            let backend = lb.get();
            log.push((start.elapsed().as_millis() / WINDOW_MS, backend));
        }
        sampler.join().expect("the sampler panicked")
    });
    let odd: Vec<&Vec<i64>> = samples
        .iter()
        .filter(|s| s.iter().any(|&l| !(0..=1).contains(&l)))
        .collect();
    println!(
        "{} samples of the live counts in the map, {} outside 0..=1",
        samples.len(),
        odd.len()
    );
    assert!(
        odd.is_empty(),
        "live counts outside 0..=1 with one connection at a time: {odd:?}"
    );
    let windows = (RUN.as_millis() / WINDOW_MS) as usize;
    let mut per = vec![[0usize; BACKENDS]; windows];
    let mut served = [0; BACKENDS];
    for &(w, b) in &log {
        served[b] += 1;
        if let Some(counts) = per.get_mut(w as usize) {
            counts[b] += 1;
        }
    }
    println!(
        "{} connections in {} ms ({served:?}); per {WINDOW_MS} ms: {per:?}",
        log.len(),
        start.elapsed().as_millis()
    );
    assert!(
        log.len() >= 300,
        "too few connections to judge: {}",
        log.len()
    );
    // Reconciles run every 500 ms, so each window overlaps one. A backend that got less than a
    // tenth of a window's connections (a third is fair) was kept out of rotation.
    let starved: Vec<(usize, [usize; BACKENDS])> = per
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, counts)| {
            let n: usize = counts.iter().sum();
            n >= 60 && counts.iter().any(|&c| c * 10 < n)
        })
        .collect();
    assert!(
        starved.is_empty(),
        "backends starved in {} of {windows} windows of {WINDOW_MS} ms (window, per backend): {starved:?}",
        starved.len()
    );
    let totals = lb.totals();
    let expected: Vec<u64> = served.iter().map(|&n| n as u64).collect();
    assert_eq!(
        totals, expected,
        "total_connections per backend should be what the clients saw"
    );
    lb.finish();
}

/// A load generator closing thousands of connections a second (`Connection: close`) with
/// `tcp_tw_reuse`, as load generators and busy clients do, cycles through its ports in
/// seconds: a port comes back while the daemon is forgetting the previous connection on it.
/// The new connection must keep its flow (it did not: its next packets met no flow and were
/// answered with a reset, a few per 50,000 connections).
#[test]
fn reused_client_ports_never_meet_a_reset() {
    xlb_tests::root_or_skip!();
    const SECONDS: u64 = 10;
    // 15,000 ports: at the 2,000-8,000 connections a second this machine manages, a port comes
    // back every 2 to 8 seconds, around the daemon's 2 s grace for flows without a socket.
    const PORTS: (u32, u32) = (10_000, 24_999);
    let lb = Lb::start("twreuse", Family::V4);
    let mut tune = lb.topo.client("sysctl");
    tune.args([
        "-q",
        "-w",
        &format!("net.ipv4.ip_local_port_range={} {}", PORTS.0, PORTS.1),
        "net.ipv4.tcp_tw_reuse=1",
    ]);
    run_ok(tune, "tuning the client's ports");
    let mut wrk = lb.topo.client("wrk");
    wrk.args([
        "-t1",
        "-c32",
        &format!("-d{SECONDS}s"),
        "-H",
        "Connection: close",
    ])
    .arg(format!("http://{}/", lb.vip));
    let out = run_ok(wrk, "wrk");
    println!("{out}");
    let requests: u64 = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{out}"));
    // wrk reports errors on a line of their own only when there are any.
    let errors = out
        .lines()
        .find(|l| l.trim_start().starts_with("Socket errors:") || l.contains("Non-2xx"));
    let counters = lb.status()["dataplane"]["counters"].clone();
    println!("data path counters: {counters}");
    let ports = u64::from(PORTS.1 - PORTS.0 + 1);
    assert!(
        requests > ports,
        "{requests} connections over {ports} ports: too few to have reused ports, the machine \
         is too loaded to judge"
    );
    assert!(
        errors.is_none(),
        "{requests} requests, but: {}",
        errors.unwrap_or_default()
    );
    lb.finish();
}

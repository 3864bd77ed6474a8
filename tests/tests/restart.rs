//! The daemon and its programs can be replaced under load without a single failed request:
//! `kill -9` of the daemon and a restart, and 20 program upgrades in a row (each daemon start
//! loads fresh programs and swaps them into the pinned links with `BPF_LINK_UPDATE`). Needs
//! root; run with `--test-threads=1`.


use std::{
    io::Write as _,
    net::IpAddr,
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;
use xlb_tests::*;

/// Keep-alive connections held open through the VIP, each sending requests back to back.
const HELD: usize = 6;
/// New connections per second, each `GET /` and closed.
const NEW_RATE: u64 = 100;
const NEW_WORKERS: usize = 4;

/// Requests over held connections and new connections, from the client namespace, until
/// stopped; counts every success and keeps every failure.
struct Load {
    stop: Arc<AtomicBool>,
    ok_held: Arc<AtomicU64>,
    ok_new: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
    /// Per held connection: its client port and the backend that answered its first request.
    held: Vec<(u16, usize)>,
}

impl Load {
    fn start(lb: &Lb) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok_held, ok_new) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        let mut held = Vec::new();
        for _ in 0..HELD {
            // Connected in the client namespace; the socket works from any thread.
            let mut conn = lb.hold();
            let (port, backend) = (conn.local_port(), conn.backend);
            held.push((port, backend));
            let (stop, ok, errors) = (stop.clone(), ok_held.clone(), errors.clone());
            threads.push(std::thread::spawn(move || {
                let peer = conn.stream.peer_addr().expect("connected");
                while !stop.load(Ordering::Relaxed) {
                    let answer = conn
                        .stream
                        .write_all(format!("GET / HTTP/1.1\r\nHost: {peer}\r\n\r\n").as_bytes())
                        .and_then(|()| read_response(&conn.stream));
                    match answer.map(|body| app_index(&body)) {
                        Ok(b) if b == backend => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(b) => {
                            errors.lock().unwrap().push(format!(
                                "held connection from port {port} moved from app-{} to app-{}",
                                backend + 1,
                                b + 1
                            ));
                            return;
                        }
                        Err(e) => {
                            errors.lock().unwrap().push(format!("held connection from port {port}: {e}"));
                            return;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }));
        }
        let netns = format!("/run/netns/{}", lb.topo.client_ns);
        let vip = lb.vip;
        let next = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        for _ in 0..NEW_WORKERS {
            let (stop, ok, errors, next, netns) = (stop.clone(), ok_new.clone(), errors.clone(), next.clone(), netns.clone());
            threads.push(std::thread::spawn(move || {
                // This thread only (`Topology::in_client` does the same on a scoped thread).
                let fd = std::fs::File::open(&netns).unwrap_or_else(|e| panic!("opening {netns}: {e}"));
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns({netns}): {e}"));
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let due = Duration::from_millis(i * 1000 / NEW_RATE);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    match http_get(vip, "/", IO_TIMEOUT) {
                        Ok(r) if r.status == 200 => {
                            app_index(&r.body);
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => errors.lock().unwrap().push(format!("new connection: HTTP {}", r.status)),
                        Err(e) => errors.lock().unwrap().push(format!("new connection: {e}")),
                    }
                }
            }));
        }
        Load { stop, ok_held, ok_new, errors, threads, held }
    }

    fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    fn counts(&self) -> (u64, u64) {
        (self.ok_held.load(Ordering::Relaxed), self.ok_new.load(Ordering::Relaxed))
    }

    /// Stops and joins every client; (requests on held connections, new connections), all
    /// successful, and the failures.
    fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a load thread panicked");
        }
        let errors = self.errors.lock().unwrap().clone();
        (self.ok_held.load(Ordering::Relaxed), self.ok_new.load(Ordering::Relaxed), errors)
    }
}

/// `bpftool -j <args>` as JSON.
fn bpftool(args: &[&str]) -> Value {
    let mut cmd = Command::new("bpftool");
    cmd.arg("-j").args(args);
    let out = run_ok(cmd, "bpftool");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bpftool -j {args:?} printed no JSON ({e}): {out}"))
}

/// The program ids the pinned XDP and TC links of xlb0 run now.
fn attached_prog_ids(pin_path: &Path) -> (u64, u64) {
    let link = |prefix: &str| {
        let entry = std::fs::read_dir(pin_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", pin_path.display()))
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}* pin under {}", pin_path.display()));
        let info = bpftool(&["link", "show", "pinned", &entry.path().display().to_string()]);
        info["prog_id"].as_u64().unwrap_or_else(|| panic!("no prog_id in {info}"))
    };
    (link("link_xdp_"), link("link_tc_"))
}

/// The backend slot the pinned `FLOWS` map holds for the client → VIP 4-tuple, if any.
fn flow_backend(lb: &Lb, client_port: u16) -> Option<u32> {
    let (IpAddr::V4(vip), IpAddr::V4(client)) = (lb.vip.ip(), IpAddr::V4(lb.topo.client_v4)) else {
        panic!("IPv4 only")
    };
    let mut key = Vec::with_capacity(40);
    key.extend(client.octets());
    key.extend([0; 12]);
    key.extend(vip.octets());
    key.extend([0; 12]);
    key.extend(client_port.to_be_bytes());
    key.extend(lb.vip.port().to_be_bytes());
    key.extend([4, 6, 0, 0]);
    let path = lb.topo.pin_path.join("FLOWS");
    let mut cmd = Command::new("bpftool");
    cmd.args(["-j", "map", "lookup", "pinned"]).arg(&path).arg("key").args(key.iter().map(u8::to_string));
    let (status, out) = run(cmd, "bpftool map lookup FLOWS");
    if !status.success() {
        assert!(out.contains("No such file or directory") || out.contains("not found"), "bpftool: {out}");
        return None;
    }
    let json: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("bpftool printed no JSON ({e}): {out}"));
    let value: Vec<u8> = json["value"]
        .as_array()
        .unwrap_or_else(|| panic!("unexpected bpftool output: {json}"))
        .iter()
        .map(|b| u8::from_str_radix(b.as_str().expect("hex").trim_start_matches("0x"), 16).expect("hex byte"))
        .collect();
    // Flow: backend_addr (16), backend_port (2), family, pad, backend (u32 at 20), …
    Some(u32::from_ne_bytes(value[20..24].try_into().unwrap()))
}

/// Every held connection's flow is still in `FLOWS`, on the backend it started on.
fn assert_flows_intact(lb: &Lb, held: &[(u16, usize)], when: &str) {
    for &(port, backend) in held {
        assert_eq!(
            flow_backend(lb, port),
            Some(backend as u32),
            "{when}: the flow of the held connection from port {port} (app-{}) is not in FLOWS as it was",
            backend + 1
        );
    }
}

/// Starts `xlb run` and returns (time to `xlb ready` in its log, time until the admin API
/// answers), both from the process start.
fn timed_start(lb: &mut Lb) -> (Duration, Duration) {
    let started = Instant::now();
    lb.start_daemon();
    let ready = started.elapsed();
    loop {
        if lb.topo.in_lb(|| http_get(ADMIN, "/api/status", IO_TIMEOUT)).is_ok_and(|r| r.status == 200) {
            return (ready, started.elapsed());
        }
        assert!(started.elapsed() < STARTUP_TIMEOUT, "the admin API never answered");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn daemon_kill_9_under_load_fails_no_request() {
    xlb_tests::root_or_skip!();
    let mut lb = Lb::start("kill9", Family::V4);
    let load = Load::start(&lb);
    std::thread::sleep(Duration::from_millis(500));
    assert_flows_intact(&lb, &load.held, "before the kill");
    let before = load.counts();

    let daemon = lb.daemon.take().expect("the daemon runs");
    let status = daemon.kill9();
    drop(daemon);
    println!("xlb run killed: {status}");
    // Without a daemon for a second: the pinned programs keep forwarding.
    std::thread::sleep(Duration::from_secs(1));
    let without = load.counts();
    assert!(
        without.0 > before.0 && without.1 > before.1,
        "requests stopped without the daemon: {before:?} → {without:?}"
    );
    assert_flows_intact(&lb, &load.held, "without the daemon");

    let (ready, answering) = timed_start(&mut lb);
    let log = lb.daemon().output();
    assert!(log.contains("adopted pinned maps"), "the restarted daemon should adopt the maps:\n{log}");
    std::thread::sleep(Duration::from_millis(500));
    assert_flows_intact(&lb, &load.held, "after the restart");
    let (held_requests, new_connections, errors) = load.finish();
    println!(
        "daemon restart after kill -9: `xlb ready` {} ms and admin API answering {} ms after the process started; \
         under load: {held_requests} requests on {HELD} held connections, {new_connections} new connections, {} failed",
        ready.as_millis(),
        answering.as_millis(),
        errors.len()
    );
    assert!(errors.is_empty(), "requests failed across the kill -9 and restart: {errors:#?}");
    // The figure is printed, not held to a number here: speed is `cargo xtask bench`'s job,
    // and on a busy machine the verifier alone takes most of a second.
    assert!(answering < Duration::from_secs(5), "the restarted daemon took {answering:?} to answer");

    // Counts reconciled: every new connection and every held one counted once in the totals,
    // and the live counts are the kernel's (the held connections were closed by `finish`).
    let expected_total = new_connections + HELD as u64;
    let (totals, took) = lb.poll(RECONCILE_DEADLINE, "totals counting every connection", |lb| {
        let totals = lb.totals();
        (totals.iter().sum::<u64>() == expected_total).then_some(totals.clone()).ok_or_else(|| format!("{totals:?}"))
    });
    println!("totals after the restart {totals:?} = {expected_total} connections ({} ms)", took.as_millis());
    lb.await_live([0, 0, 0], "live counts back to 0 after the load");
    lb.finish();
}

#[test]
fn twenty_program_upgrades_under_load_fail_no_request() {
    xlb_tests::root_or_skip!();
    const UPGRADES: usize = 20;
    let mut lb = Lb::start("upgrade", Family::V4);
    let load = Load::start(&lb);
    let held = load.held.clone();
    let mut ids = vec![attached_prog_ids(&lb.topo.pin_path)];
    let mut stops = Vec::new();
    let mut starts = Vec::new();
    for i in 0..UPGRADES {
        std::thread::sleep(Duration::from_millis(100));
        let daemon = lb.daemon.take().expect("the daemon runs");
        let stopping = Instant::now();
        let status = daemon.terminate();
        stops.push(stopping.elapsed());
        assert!(status.success(), "upgrade {i}: xlb run exited with {status}:\n{}", daemon.output());
        drop(daemon);
        let (ready, _) = timed_start(&mut lb);
        starts.push(ready);
        let now = attached_prog_ids(&lb.topo.pin_path);
        let last = *ids.last().unwrap();
        assert!(
            now.0 != last.0 && now.1 != last.1,
            "upgrade {i}: the links still run programs {last:?} (now {now:?}): the new programs were not swapped in"
        );
        ids.push(now);
        assert_flows_intact(&lb, &held, &format!("after upgrade {}", i + 1));
        let errors = load.errors();
        assert!(errors.is_empty(), "requests failed by upgrade {}: {errors:#?}", i + 1);
    }
    std::thread::sleep(Duration::from_millis(200));
    let (held_requests, new_connections, errors) = load.finish();
    let ms = |d: &[Duration]| {
        let mut v: Vec<u128> = d.iter().map(Duration::as_millis).collect();
        v.sort();
        format!("median {} ms, max {} ms", v[v.len() / 2], v[v.len() - 1])
    };
    println!(
        "{UPGRADES} program upgrades under load: {held_requests} requests on {HELD} held connections and {new_connections} \
         new connections, {} failed; XDP/TC program ids {:?}; stop {}, start to `xlb ready` {}",
        errors.len(),
        ids,
        ms(&stops),
        ms(&starts)
    );
    assert!(errors.is_empty(), "requests failed during the upgrades: {errors:#?}");
    let distinct: std::collections::HashSet<u64> = ids.iter().map(|&(x, _)| x).collect();
    assert_eq!(distinct.len(), UPGRADES + 1, "every upgrade attached a new XDP program: {ids:?}");
    let log = lb.daemon().output();
    assert!(log.contains("XDP program replaced in the existing link"), "{log}");
    lb.finish();
}

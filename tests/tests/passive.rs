//! Passive health in the data path: a backend killed under a stream of new connections is
//! taken out by the XDP/TC programs themselves, within milliseconds, long before a health probe
//! could notice; compared with the probes alone. Needs root; run with `--test-threads=1`.


use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use xlb_tests::*;

/// New connections per second in the stream, and how long it runs.
const RATE: u32 = 200;
const STREAM: Duration = Duration::from_secs(2);
/// When app-1 is killed, from the start of the stream.
const KILL_AT: Duration = Duration::from_millis(700);
/// Clients working through the schedule: one waiting for a SYN retransmission (1 s) must not
/// hold up the others.
const WORKERS: usize = 16;
/// A connection this slow had its first SYN refused or unanswered and got through on the
/// client's retransmission (Linux retransmits a SYN after 1 s).
const RETRIED: Duration = Duration::from_millis(800);
/// The promise: the data path stops choosing a dead backend this soon.
const PASSIVE_DEADLINE: Duration = Duration::from_millis(100);

/// One new connection of the stream: when it was due (from the start of the stream), how long
/// `GET /` took, and which backend answered or why it failed.
#[derive(Debug)]
struct Attempt {
    due: Duration,
    took: Duration,
    outcome: Result<usize, String>,
}

/// `RATE` new connections per second for `STREAM` from the client namespace, each `GET /` on
/// its own connection; kills app-1 at `KILL_AT`. Returns every attempt and when app-1 was
/// killed (from the start of the stream).
fn stream_and_kill(lb: &mut Lb) -> (Vec<Attempt>, Duration) {
    let app1 = lb.apps[0].take().expect("app-1 runs");
    let (topo, vip) = (&lb.topo, lb.vip);
    let total = u64::from(RATE) * STREAM.as_millis() as u64 / 1000;
    let next = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        let clients = scope.spawn(|| {
            topo.in_client(|| {
                // Threads started here inherit the client namespace.
                std::thread::scope(|workers| {
                    let handles: Vec<_> = (0..WORKERS)
                        .map(|_| {
                            workers.spawn(|| {
                                let mut mine = Vec::new();
                                loop {
                                    let i = next.fetch_add(1, Ordering::Relaxed);
                                    if i >= total {
                                        return mine;
                                    }
                                    let due = Duration::from_secs(i) / RATE;
                                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                                        std::thread::sleep(wait);
                                    }
                                    let begun = Instant::now();
                                    let outcome = http_get(vip, "/", Duration::from_secs(3))
                                        .map_err(|e| e.to_string())
                                        .and_then(|r| {
                                            if r.status == 200 {
                                                Ok(app_index(&r.body))
                                            } else {
                                                Err(format!("HTTP {}", r.status))
                                            }
                                        });
                                    mine.push(Attempt { due, took: begun.elapsed(), outcome });
                                }
                            })
                        })
                        .collect();
                    let mut all: Vec<Attempt> =
                        handles.into_iter().flat_map(|h| h.join().expect("client thread")).collect();
                    all.sort_by_key(|a| a.due);
                    all
                })
            })
        });
        if let Some(wait) = KILL_AT.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let killed_at = start.elapsed();
        app1.kill9();
        (clients.join().expect("the client stream"), killed_at)
    })
}

/// The backend states and failed-connection counts of the status.
fn failed_connections(lb: &Lb) -> Vec<u64> {
    let status = lb.status();
    status["services"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["failed_connections"].as_u64().expect("failed_connections"))
        .collect()
}

#[test]
fn killed_backend_is_taken_out_by_the_data_path_within_milliseconds() {
    xlb_tests::root_or_skip!();
    // Probes every 2 s (fall 2): they need 2 s or more to notice anything, so whatever reacts
    // within 100 ms is the data path.
    let lb = Lb::prepare("passive", Family::V4);
    let interval = Duration::from_secs(2);
    let web = lb.web().health(probes(interval, Duration::from_secs(1))).max_fails(1).fail_timeout(Duration::from_secs(10));
    lb.write(&lb.config().edit_service("web", |_| web));
    let mut lb = lb.start_all();
    assert_eq!(failed_connections(&lb), [0, 0, 0]);

    let (attempts, killed_at) = stream_and_kill(&mut lb);
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.due >= killed_at).collect();
    // New connections the data path sent to app-1 after the kill: refused, then (the RST kept
    // from the client) retried on another backend by the client's SYN retransmission.
    let retried: Vec<&&Attempt> = after.iter().filter(|a| a.took >= RETRIED).collect();
    let errors: Vec<&Attempt> = attempts.iter().filter(|a| a.outcome.is_err()).collect();
    let detection = retried.iter().map(|a| a.due - killed_at).max().unwrap_or_default();
    let mut served = [0; BACKENDS];
    attempts.iter().filter_map(|a| a.outcome.as_ref().ok()).for_each(|&b| served[b] += 1);
    let (state, _) = lb.poll(Duration::from_secs(1), "app-1 failed (passive) in the status", |lb| {
        let view = lb.view();
        (view[0].state == "failed").then(|| view.clone()).ok_or_else(|| format!("{view:?}"))
    });
    let failed = failed_connections(&lb);
    println!(
        "passive: app-1 killed {} ms into a stream of {RATE} new connections/s; the last new connection sent to it was \
         due {:.1} ms after the kill; {} sent to it after the kill (retried by the client 1 s later), {} client errors \
         {:?}; data path: {failed:?} failed connections; served {served:?}",
        killed_at.as_millis(),
        detection.as_secs_f64() * 1e3,
        retried.len(),
        errors.len(),
        errors.iter().map(|a| (a.due.as_millis(), a.outcome.clone().unwrap_err())).collect::<Vec<_>>(),
    );
    assert_eq!(attempts.len() as u64, u64::from(RATE) * STREAM.as_millis() as u64 / 1000);
    assert!(
        detection <= PASSIVE_DEADLINE,
        "the data path sent new connections to the killed app-1 for {detection:?}, more than {PASSIVE_DEADLINE:?}"
    );
    let bound = (f64::from(RATE) * detection.as_secs_f64()).ceil() as usize + 2;
    assert!(retried.len() <= bound, "{} connections went to the dead app-1, more than rate × detection + 2 = {bound}", retried.len());
    assert_eq!(
        failed[0],
        retried.len() as u64,
        "the data path's count of connections app-1 refused should equal the retried connections the client saw"
    );
    assert_eq!(&failed[1..], [0, 0], "the live backends had no failures");
    // Only connections app-1 had already accepted can fail: those in flight at the kill.
    for a in &errors {
        assert!(
            a.due <= killed_at + Duration::from_millis(50),
            "a connection due {} ms after the kill failed: {a:?}",
            a.due.as_millis()
        );
    }
    assert!(errors.len() <= WORKERS, "{} errors", errors.len());
    assert!(served[1] > 0 && served[2] > 0, "{served:?}");
    assert_eq!(state[0].state, "failed");
    assert!(state[1..].iter().all(|b| b.state == "up"), "{state:?}");
    let table = run_ok(lb.xlb(&["status"]), "xlb status");
    assert!(table.contains("failed (passive)"), "xlb status should say who took app-1 out:\n{table}");
    lb.poll(Duration::from_secs(2), "the daemon's log of the passive failure", |lb| {
        let log = lb.daemon().output();
        log.contains("backend failed (passive)").then_some(()).ok_or(log)
    });

    // Nothing goes to it while it is failed, even though it is the least loaded.
    assert_eq!(lb.spread(9)[0], 0, "a failed backend got a new connection");

    // A restarted daemon keeps it failed (it is in the maps) until its probes pass.
    let daemon = lb.daemon.take().expect("the daemon runs");
    assert!(daemon.terminate().success(), "{}", daemon.output());
    drop(daemon);
    lb.start_daemon();
    let view = lb.view();
    assert_eq!(view[0].state, "failed", "the restart forgot the passive failure: {view:?}");
    assert_eq!(lb.spread(6)[0], 0, "a failed backend got a new connection after the restart");

    // The probes bring it back: `rise` (2) successes at the 2 s interval.
    let app1 = lb.spawn_app(0);
    lb.apps[0] = Some(app1);
    let (_, took) = lb.poll(interval * 4, "app-1 up again", |lb| {
        let view = lb.view();
        (view[0].state == "up").then_some(()).ok_or_else(|| format!("{view:?}"))
    });
    println!("passive: app-1 up again {} ms after it listened (probe interval 2 s × rise 2)", took.as_millis());
    let served = lb.spread(9);
    assert!(served[0] > 0, "app-1 is back but gets nothing: {served:?}");
    lb.finish();
}

#[test]
fn probes_alone_take_longer() {
    xlb_tests::root_or_skip!();
    // The same kill with passive health off (max_fails = 0) and probes every 200 ms, fall 2.
    let lb = Lb::prepare("probeonly", Family::V4);
    lb.write(&lb.config().edit_service("web", |web| web.max_fails(0)));
    let mut lb = lb.start_all();
    let (attempts, killed_at) = stream_and_kill(&mut lb);
    let refused: Vec<&Attempt> = attempts.iter().filter(|a| a.due >= killed_at && a.outcome.is_err()).collect();
    let detection = refused.iter().map(|a| a.due - killed_at).max().unwrap_or_default();
    println!(
        "probes only (interval {} ms, fall {FALL}, max_fails 0): new connections refused by the killed app-1 until {:.1} ms \
         after the kill; {} refused connections reached clients",
        HEALTH_INTERVAL.as_millis(),
        detection.as_secs_f64() * 1e3,
        refused.len()
    );
    let view = lb.view();
    assert_eq!(view[0].state, "down", "the probes mark it down, not the data path: {view:?}");
    assert!(!refused.is_empty(), "with passive health off the clients see the refusals");
    let deadline = HEALTH_INTERVAL * (FALL + 1);
    assert!(detection <= deadline, "probes took {detection:?}, more than {deadline:?}");
    lb.finish();
}

#[test]
fn backend_ignoring_new_connections_is_taken_out_and_its_syns_go_elsewhere() {
    xlb_tests::root_or_skip!();
    // app-1 hangs: its listening socket is there but drops every packet (a socket filter that
    // accepts nothing), as a stalled host or a firewall mistake would. Clients' SYNs to it get
    // no answer at all; probes every 2 s would need 2 timeouts to notice.
    let lb = Lb::prepare("silent", Family::V4);
    let interval = Duration::from_secs(2);
    let web = lb.web().health(probes(interval, Duration::from_secs(1))).max_fails(1);
    lb.write(&lb.config().edit_service("web", |_| web));
    let mut lb = lb.start_all();
    let app1 = lb.apps[0].take().expect("app-1 runs");
    app1.kill9();
    drop(app1);
    let addr = lb.backends[0];
    let silent = lb.topo.in_lb(|| -> std::io::Result<socket2::Socket> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        // Classic BPF `ret #0`: keep nothing. TCP runs a listener's filter on every SYN.
        socket.attach_filter(&[socket2::SockFilter::new(0x06, 0, 0, 0)])?;
        socket.listen(128)?;
        Ok(socket)
    });
    let silent = silent.unwrap_or_else(|e| panic!("a silent listener on {addr}: {e}"));

    let vip = lb.vip;
    let mut attempts = Vec::new();
    for _ in 0..6 {
        let begun = Instant::now();
        let served = lb
            .topo
            .in_client(|| http_get(vip, "/", Duration::from_secs(5)))
            .map(|r| app_index(&r.body))
            .unwrap_or_else(|e| panic!("a new connection failed: {e}; so far {attempts:?}"));
        attempts.push((served, begun.elapsed()));
    }
    let slow: Vec<_> = attempts.iter().filter(|(_, took)| *took >= RETRIED).collect();
    let (view, _) = lb.poll(Duration::from_secs(1), "app-1 failed (passive)", |lb| {
        let view = lb.view();
        (view[0].state == "failed").then(|| view.clone()).ok_or_else(|| format!("{view:?}"))
    });
    let failed = failed_connections(&lb);
    println!(
        "silent app-1: 6 new connections {:?}; data path failed connections {failed:?}; states {:?}",
        attempts.iter().map(|(b, took)| format!("app-{} in {} ms", b + 1, took.as_millis())).collect::<Vec<_>>(),
        view.iter().map(|v| v.state.clone()).collect::<Vec<_>>()
    );
    assert!(attempts.iter().all(|&(b, _)| b != 0), "the silent app-1 answered: {attempts:?}");
    assert_eq!(slow.len(), 1, "exactly one connection should have waited for its SYN retransmission: {attempts:?}");
    assert_eq!(failed, [1, 0, 0], "one unanswered SYN counted for app-1");
    // The daemon takes note on its next tick (every 500 ms) and says why.
    lb.poll(Duration::from_secs(2), "the daemon's log of the passive failure", |lb| {
        let log = lb.daemon().output();
        log.contains("backend failed (passive)").then_some(()).ok_or(log)
    });

    // Answering again: the probes bring it back (rise 2 at 2 s) and it gets connections.
    drop(silent);
    let app1 = lb.spawn_app(0);
    lb.apps[0] = Some(app1);
    lb.poll(interval * 4, "app-1 up again", |lb| {
        let view = lb.view();
        (view[0].state == "up").then_some(()).ok_or_else(|| format!("{view:?}"))
    });
    let served = lb.spread(9);
    assert!(served[0] > 0, "app-1 is back but gets nothing: {served:?}");
    lb.finish();
}

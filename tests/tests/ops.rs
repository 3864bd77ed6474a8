//! Operating xlb: draining a backend under long-lived connections and under load (RELIABILITY
//! R12), the nginx-compatible `/status` page, the shipped systemd units, systemd's notify
//! protocol, the daemon under the units' restrictions, and `cargo xtask install`.
//!
//! Run as root after `cargo build`:
//! `cargo test -p xlb-tests --test ops -- --test-threads=1 --nocapture`.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::TcpStream,
    os::{
        fd::AsRawFd as _,
        unix::{fs::PermissionsExt as _, net::UnixDatagram, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use nix::libc;
use xlb_tests::*;

/// Long enough for `fall` (or `rise`) probes plus the scheduling of a loaded machine.
const HEALTH_DEADLINE: Duration = Duration::from_secs(5);

/// `xlb <verb> web <backend>` against the running daemon; must succeed; its output.
fn drain(lb: &Lb, verb: &str, backend: usize) -> String {
    let addr = lb.backends[backend].to_string();
    let out = run_ok(
        lb.xlb(&[verb, "web", &addr]),
        &format!("xlb {verb} web {addr}"),
    );
    println!("xlb {verb} web {addr}: {}", out.trim());
    out
}

/// How often `needle` appears in the daemon's log so far.
fn log_count(lb: &Lb, needle: &str) -> usize {
    lb.daemon().output().matches(needle).count()
}

/// Waits until `needle` appears `n` times in the daemon's log.
fn wait_log(lb: &Lb, needle: &str, n: usize) {
    let what = format!("{n}× {needle:?} in the daemon's log");
    wait_until(HEALTH_DEADLINE, &what, || log_count(lb, needle) >= n);
}

fn app(lb: &Lb, i: usize) -> &xlb_tests::Proc {
    lb.apps[i].as_ref().expect("the backend runs")
}

/// Flips a demo backend's /health between 200 and 503 and waits until it says so.
fn toggle_health(lb: &Lb, i: usize, failing: bool) {
    let app = app(lb, i);
    let word = if failing { "on" } else { "off" };
    let before = app.output().matches(&format!("fail-health {word}")).count();
    assert!(app.signal(Signal::SIGUSR1), "app-{} is not running", i + 1);
    wait_until(
        Duration::from_secs(5),
        "the backend to flip its health",
        || app.output().matches(&format!("fail-health {word}")).count() > before,
    );
}

/// RELIABILITY R12: a drained backend gets no new connection from the next SYN on, while the
/// connections it holds keep working; health checks failing and passing meanwhile do not end
/// the drain; an undrain restores whatever health says.
#[test]
fn drain_keeps_held_connections_and_sends_new_ones_elsewhere() {
    xlb_tests::root_or_skip!();
    const FAILING: &str = "backend health checks failing; it stays draining";
    const PASSING: &str = "backend health checks passing; it stays draining";
    let lb = Lb::start("drain", Family::V4);
    // Two keep-alive connections on every backend (idle backends take turns).
    let mut held: Vec<Held> = (0..2 * BACKENDS).map(|_| lb.hold()).collect();
    let mut per = [0; BACKENDS];
    for h in &held {
        per[h.backend] += 1;
    }
    assert_eq!(
        per,
        [2, 2, 2],
        "six held connections over three idle backends"
    );
    lb.poll(RECONCILE_DEADLINE, "live counts [2, 2, 2]", |lb| {
        let live = lb.live();
        (live == [2, 2, 2])
            .then_some(())
            .ok_or_else(|| format!("{live:?}"))
    });

    let out = drain(&lb, "drain", 0);
    let app1 = lb.backends[0];
    assert!(
        out.contains(&format!("web {app1}: draining"))
            && out.contains("its 2 open connections continue"),
        "{out}"
    );
    // The state is in the map before the command returns: no grace period for new flows.
    let served = lb.spread(30);
    println!("30 new connections while app-1 drains: {served:?}");
    assert_eq!(
        served[0], 0,
        "a draining backend got new connections: {served:?}"
    );
    for h in &mut held {
        assert_eq!(h.request(), h.backend, "a held connection changed backend");
    }
    let (view, _) = lb.poll(
        RECONCILE_DEADLINE,
        "app-1 draining and still counting its 2 held connections",
        |lb| {
            let view = lb.view();
            let live: Vec<u64> = view.iter().map(|b| b.live).collect();
            (view[0].state == "draining" && view[1].state == "up" && live == [2, 2, 2])
                .then(|| view.clone())
                .ok_or_else(|| format!("{view:?}"))
        },
    );
    assert_eq!(
        view[0].healthy,
        Some(true),
        "health is reported apart from the drain: {view:?}"
    );
    let table = run_ok(lb.xlb(&["status"]), "xlb status");
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.contains(&app1.to_string()))
        .unwrap_or_else(|| panic!("no row for {app1}:\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[1..3], ["draining", "2"], "xlb status:\n{table}");
    let ss = lb.ss_live();
    assert_eq!(ss, [2, 2, 2], "the socket table");

    // Health fails and recovers during the drain: the transitions happen, the drain stays.
    toggle_health(&lb, 0, true);
    wait_log(&lb, FAILING, 1);
    let view = lb.view();
    assert_eq!(
        (view[0].state.as_str(), view[0].healthy),
        ("draining", Some(false)),
        "{view:?}"
    );
    assert_eq!(
        lb.spread(9)[0],
        0,
        "new connections to a draining, failing backend"
    );
    toggle_health(&lb, 0, false);
    wait_log(&lb, PASSING, 1);
    let view = lb.view();
    assert_eq!(
        (view[0].state.as_str(), view[0].healthy),
        ("draining", Some(true)),
        "{view:?}"
    );
    assert_eq!(
        lb.spread(9)[0],
        0,
        "new connections to a draining backend after it recovered"
    );
    for h in &mut held {
        assert_eq!(h.request(), h.backend, "a held connection changed backend");
    }

    let out = drain(&lb, "undrain", 0);
    assert!(out.contains(&format!("web {app1}: undrained: up")), "{out}");
    assert_eq!(lb.view()[0].state, "up");
    let served = lb.spread(9);
    println!("9 new connections after the undrain: {served:?}");
    assert!(
        served[0] > 0,
        "app-1 got nothing after the undrain: {served:?}"
    );

    // An undrain puts back what health says: drained, then failing, then undrained → down,
    // until health passes again.
    drain(&lb, "drain", 0);
    toggle_health(&lb, 0, true);
    wait_log(&lb, FAILING, 2);
    let out = drain(&lb, "undrain", 0);
    assert!(out.contains("undrained, but down"), "{out}");
    assert_eq!(lb.view()[0].state, "down");
    assert_eq!(
        lb.spread(6)[0],
        0,
        "new connections to a failing backend after its undrain"
    );
    toggle_health(&lb, 0, false);
    lb.poll(
        HEALTH_DEADLINE,
        "app-1 up after its health recovered",
        |lb| {
            let view = lb.view();
            (view[0].state == "up")
                .then_some(())
                .ok_or_else(|| format!("{view:?}"))
        },
    );

    for h in &mut held {
        assert_eq!(h.request(), h.backend, "a held connection changed backend");
    }
    drop(held);
    lb.finish();
}

/// The drain is kept in the data path: it holds while no daemon runs, and a restarted daemon
/// keeps it (and its health probes do not end it) until `xlb undrain`.
#[test]
fn drain_survives_a_daemon_restart() {
    xlb_tests::root_or_skip!();
    let mut lb = Lb::start("drainrestart", Family::V4);
    drain(&lb, "drain", 1);
    let daemon = lb.daemon.take().expect("the daemon runs");
    let status = daemon.terminate();
    assert!(
        status.success(),
        "xlb run exited with {status}:\n{}",
        daemon.output()
    );
    drop(daemon);
    let served = lb.spread(6);
    println!("6 connections without a daemon: {served:?}");
    assert_eq!(
        served[1], 0,
        "app-2 got connections while drained and no daemon ran"
    );

    lb.start_daemon();
    let log = lb.daemon().output();
    assert!(log.contains("adopted pinned maps"), "{log}");
    assert!(
        log.contains("kept from before the restart"),
        "the restarted daemon should say app-2 stays drained:\n{log}"
    );
    // Probes run on the new daemon; after a few of them app-2 is still draining.
    lb.poll(HEALTH_DEADLINE, "app-2 probed healthy", |lb| {
        let view = lb.view();
        (view[1].healthy == Some(true))
            .then_some(())
            .ok_or_else(|| format!("{view:?}"))
    });
    std::thread::sleep(HEALTH_INTERVAL * (RISE + FALL));
    let view = lb.view();
    assert_eq!(view[1].state, "draining", "{view:?}");
    assert_eq!(
        lb.spread(12)[1],
        0,
        "app-2 got connections after the restart"
    );
    let cli = lb.cli_status();
    assert_eq!(
        cli["services"][0]["backends"][1]["state"], "draining",
        "{cli:#}"
    );

    let out = drain(&lb, "undrain", 1);
    assert!(out.contains("undrained: up"), "{out}");
    let served = lb.spread(6);
    assert!(
        served[1] > 0,
        "app-2 got nothing after the undrain: {served:?}"
    );
    lb.finish();
}

/// Unknown services and backends and bad addresses are refused by name, listing what exists,
/// by the CLI (non-zero exit) and by the API (404/400, JSON); nothing changes.
#[test]
fn drain_refuses_unknown_names() {
    xlb_tests::root_or_skip!();
    let lb = Lb::start("drainerr", Family::V4);
    let ip = lb.vip.ip();
    let all = format!("{ip}:8001, {ip}:8002, {ip}:8003");
    let cases = [
        (
            vec!["drain", "api", "198.18.0.1:8001"],
            "no service \"api\"; the services are: web".to_string(),
        ),
        (
            vec!["drain", "web", "198.18.0.1:9999"],
            format!("service \"web\" has no backend 198.18.0.1:9999; its backends are: {all}"),
        ),
        (
            vec!["undrain", "web", "[2001:2::1]:8001"],
            format!("service \"web\" has no backend [2001:2::1]:8001; its backends are: {all}"),
        ),
        (
            vec!["drain", "web", "app-1"],
            "\"app-1\" is not a backend address: expected ip:port".to_string(),
        ),
    ];
    for (args, needle) in cases {
        let (status, out) = run(lb.xlb(&args), "xlb drain (bad name)");
        println!("xlb {}: {status}: {}", args.join(" "), out.trim());
        assert_eq!(status.code(), Some(1), "{out}");
        assert!(
            out.starts_with("xlb: ") && out.contains(&needle),
            "expected {needle:?} in: {out}"
        );
    }
    for (path, code) in [
        ("/api/services/api/backends/198.18.0.1:8001/drain", "404"),
        ("/api/services/web/backends/198.18.0.1:1/undrain", "404"),
        ("/api/services/web/backends/nope/drain", "400"),
    ] {
        let answer = lb.topo.in_lb(|| post(ADMIN, path));
        let head = answer.lines().next().unwrap_or_default();
        assert!(
            head.starts_with("HTTP/1.") && head.split(' ').nth(1) == Some(code),
            "POST {path}: {answer}"
        );
        assert!(
            answer.contains("content-type: application/json") && answer.contains("{\"error\":"),
            "{answer}"
        );
    }
    let view = lb.view();
    assert!(view.iter().all(|b| b.state == "up"), "{view:?}");
    lb.finish();
}

/// `POST path` with an empty body over HTTP/1.0; the raw answer.
fn post(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connecting to the admin API");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("reading the answer");
    answer
}

/// `GET /status` in nginx's stub_status layout, exactly, with numbers equal to `/api/status`:
/// active = live connections, accepts = handled = requests = total connections.
#[test]
fn status_page_matches_nginx_stub_status() {
    xlb_tests::root_or_skip!();
    let lb = Lb::start("stubstatus", Family::V4);
    let held: Vec<Held> = (0..4).map(|_| lb.hold()).collect();
    lb.spread(5);
    lb.poll(RECONCILE_DEADLINE, "4 live connections", |lb| {
        let live = lb.live();
        (live.iter().sum::<u64>() == 4)
            .then_some(())
            .ok_or_else(|| format!("{live:?}"))
    });
    // Compare against API snapshots taken just before and after, equal to each other.
    let ((page, content_type), (live, total)) = lb
        .poll(RECONCILE_DEADLINE, "a quiet moment", |lb| {
            let before = lb.view();
            let response = lb
                .topo
                .in_lb(|| http_get(ADMIN, "/status", IO_TIMEOUT))
                .unwrap_or_else(|e| panic!("GET /status: {e}"));
            let after = lb.view();
            assert_eq!(response.status, 200, "{response:?}");
            let sums = |v: &[BackendView]| {
                (
                    v.iter().map(|b| b.live).sum::<u64>(),
                    v.iter().map(|b| b.total).sum::<u64>(),
                )
            };
            (before == after)
                .then(|| {
                    (
                        (
                            response.body.clone(),
                            response
                                .header("content-type")
                                .unwrap_or_default()
                                .to_owned(),
                        ),
                        sums(&after),
                    )
                })
                .ok_or_else(|| format!("{before:?} then {after:?}"))
        })
        .0;
    println!("GET /status ({content_type}):\n{page}");
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert_eq!((live, total), (4, 9), "4 held, 9 connections in all");
    let stub =
        parse_stub_status(&page).unwrap_or_else(|e| panic!("not stub_status ({e}):\n{page:?}"));
    assert_eq!(stub, [live, total, total, total, 0, 0, live], "{page:?}");
    drop(held);
    lb.finish();
}

/// The seven numbers of an nginx stub_status page, insisting on its exact layout (nginx ends
/// each number line with a space).
fn parse_stub_status(page: &str) -> Result<[u64; 7], String> {
    let lines: Vec<&str> = page.split('\n').collect();
    let [active, header, counts, states, ""] = lines[..] else {
        return Err(format!("{} lines, or no final newline", lines.len()));
    };
    let number = |s: &str| s.parse::<u64>().map_err(|e| format!("{s:?}: {e}"));
    let active = number(
        active
            .strip_prefix("Active connections: ")
            .and_then(|s| s.strip_suffix(' '))
            .ok_or("line 1")?,
    )?;
    if header != "server accepts handled requests" {
        return Err("line 2".into());
    }
    let counts: Vec<u64> = counts
        .strip_prefix(' ')
        .and_then(|s| s.strip_suffix(' '))
        .ok_or("line 3")?
        .split(' ')
        .map(number)
        .collect::<Result<_, _>>()?;
    let [accepts, handled, requests] = counts[..] else {
        return Err("line 3 needs 3 numbers".into());
    };
    let states: Vec<&str> = states
        .strip_suffix(' ')
        .ok_or("line 4")?
        .split(' ')
        .collect();
    let [
        "Reading:",
        reading,
        "Writing:",
        writing,
        "Waiting:",
        waiting,
    ] = states[..]
    else {
        return Err("line 4".into());
    };
    Ok([
        active,
        accepts,
        handled,
        requests,
        number(reading)?,
        number(writing)?,
        number(waiting)?,
    ])
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("xlb-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `text` with its one `ExecStart=` line replaced by `exec_start`.
fn with_exec_start(text: &str, exec_start: &str) -> String {
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ExecStart=")).count(),
        1,
        "{text}"
    );
    text.lines()
        .map(|l| {
            if l.starts_with("ExecStart=") {
                format!("ExecStart={exec_start}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// The units pass `systemd-analyze verify` without a single warning. Verify insists that
/// ExecStart's program exists, so the copies it checks differ from the shipped files in that
/// line only: xlb.service runs the built xlb, app@.service the demo backend in place of the
/// user's app.
#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("systemd-analyze not found: `cargo xtask setup` installs it (Debian package systemd)")
        });
    let shipped = systemd_dir();
    let xlb_unit = read(&shipped.join("xlb.service"));
    let app_unit = read(&shipped.join("app@.service"));
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/xlb run --config /etc/xlb/xlb.toml",
        "Restart=on-failure",
        "WatchdogSec=10s",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/sys/fs/bpf",
        "StateDirectory=xlb",
        "MemoryDenyWriteExecute=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    ] {
        assert!(
            xlb_unit.lines().any(|l| l == line),
            "xlb.service lacks {line:?}"
        );
    }
    for line in [
        "ExecReload=/usr/local/bin/xlb reload --config /etc/xlb/xlb.toml",
        "Wants=xlb.socket",
        "After=xlb.socket",
    ] {
        assert!(
            xlb_unit.lines().any(|l| l == line),
            "xlb.service lacks {line:?}"
        );
    }
    let socket_unit = read(&shipped.join("xlb.socket"));
    for line in [
        "ListenStream=203.0.113.10:443",
        "ListenStream=203.0.113.10:80",
        "FileDescriptorName=xlb",
        "Service=xlb.service",
    ] {
        assert!(
            socket_unit.lines().any(|l| l == line),
            "xlb.socket lacks {line:?}"
        );
    }
    for line in [
        "Restart=on-failure",
        "MemoryMax=1G",
        "CPUQuota=50%",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=30",
    ] {
        assert!(
            app_unit.lines().any(|l| l == line),
            "app@.service lacks {line:?}"
        );
    }

    let dir = TempDir::new("units");
    let xlb = format!("{} run --config /etc/xlb/xlb.toml", xlb_bin().display());
    let app = format!(
        "{} --listen 127.0.0.1:800%i --name app-%i",
        demo_backend_bin().display()
    );
    let xlb_unit = with_exec_start(&xlb_unit, &xlb).replace(
        "ExecReload=/usr/local/bin/xlb",
        &format!("ExecReload={}", xlb_bin().display()),
    );
    std::fs::write(dir.0.join("xlb.service"), xlb_unit).unwrap();
    std::fs::write(dir.0.join("xlb.socket"), &socket_unit).unwrap();
    std::fs::write(dir.0.join("app@.service"), with_exec_start(&app_unit, &app)).unwrap();
    let mut cmd = Command::new(&analyze);
    cmd.arg("verify")
        .arg(dir.0.join("xlb.service"))
        .arg(dir.0.join("xlb.socket"))
        .arg(dir.0.join("app@.service"));
    let (status, out) = run(cmd, "systemd-analyze verify");
    println!("systemd-analyze verify xlb.service xlb.socket app@.service: {status} {out:?}");
    assert!(
        status.success() && out.trim().is_empty(),
        "systemd-analyze verify: {status}\n{out}"
    );

    // The check itself catches mistakes (it only warns about most, hence the empty output).
    std::fs::write(
        dir.0.join("app@.service"),
        app_unit.replace("CPUQuota=50%", "CPUQuota=half"),
    )
    .unwrap();
    let mut cmd = Command::new(&analyze);
    cmd.arg("verify").arg(dir.0.join("app@.service"));
    let (_, out) = run(cmd, "systemd-analyze verify (broken)");
    assert!(
        out.contains("Invalid CPU quota 'half'"),
        "a bad CPUQuota went unnoticed: {out}"
    );
}

/// sd_notify against a real notify socket: `READY=1` once the admin API answers, `WATCHDOG=1`
/// every `WATCHDOG_USEC`/2, `STOPPING=1` on SIGTERM.
#[test]
fn notify_protocol_ready_watchdog_stopping() {
    xlb_tests::root_or_skip!();
    const WATCHDOG: Duration = Duration::from_millis(400);
    let mut lb = Lb::prepare("notify", Family::V4);
    lb.spawn_apps();
    let path = lb.dir.join("notify.sock");
    let socket =
        UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
    let mut cmd = lb.xlb(&["run"]);
    cmd.env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string());
    let started = Instant::now();
    lb.daemon = Some(lb.topo.spawn(cmd, "xlb run (notify)"));
    let recv = |timeout: Duration| -> Option<String> {
        socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        match socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("receiving on {}: {e}", path.display()),
        }
    };

    let ready = recv(STARTUP_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "no notification within {STARTUP_TIMEOUT:?}:\n{}",
            lb.daemon().output()
        )
    });
    println!(
        "{} ms after the start: {ready:?}",
        started.elapsed().as_millis()
    );
    assert!(
        ready.starts_with("READY=1\nSTATUS="),
        "the first notification: {ready:?}"
    );
    assert!(ready.contains("admin API on 127.0.0.1:9100"), "{ready:?}");
    // Readiness means the API serves: ask it right away.
    let status = lb.status();
    assert_eq!(status["services"][0]["name"], "web", "{status:#}");

    let watching = Instant::now();
    let mut keepalives = Vec::new();
    while watching.elapsed() < Duration::from_millis(1200) {
        if let Some(message) = recv(Duration::from_millis(100)) {
            assert_eq!(
                message, "WATCHDOG=1",
                "unexpected notification while running"
            );
            keepalives.push(watching.elapsed());
        }
    }
    let gaps: Vec<Duration> = keepalives.windows(2).map(|w| w[1] - w[0]).collect();
    println!("{} keep-alives in 1.2 s, gaps {gaps:?}", keepalives.len());
    assert!(
        keepalives.len() >= 2,
        "at least 2 WATCHDOG=1 within ~1 s: {keepalives:?}"
    );
    // Every WATCHDOG_USEC/2 on average (single gaps also carry this test's own scheduling).
    let mean = (keepalives[keepalives.len() - 1] - keepalives[0]) / (gaps.len() as u32);
    assert!(
        (WATCHDOG * 3 / 8..=WATCHDOG * 5 / 8).contains(&mean),
        "keep-alives every {mean:?} on average, not WATCHDOG_USEC/2: {gaps:?}"
    );

    let daemon = lb.daemon.take().expect("the daemon runs");
    let status = daemon.terminate();
    assert!(status.success(), "{status}:\n{}", daemon.output());
    let mut after = Vec::new();
    while let Some(message) = recv(Duration::from_millis(50)) {
        after.push(message);
    }
    println!("after SIGTERM: {after:?}");
    assert!(
        after.iter().any(|m| m.starts_with("STOPPING=1")),
        "no STOPPING=1 after SIGTERM: {after:?}"
    );
    // Drop detaches.
}

/// The capabilities xlb.service leaves the daemon.
const UNIT_CAPS: [u32; 4] = [
    10, /* CAP_NET_BIND_SERVICE */
    12, /* CAP_NET_ADMIN */
    38, /* CAP_PERFMON */
    39, /* CAP_BPF */
];
const PROBE_ENV: &str = "XLB_HARDENING_PROBE";

/// Makes `cmd` start in network namespace `netns` under what xlb.service imposes, as far as it
/// is a property of the process rather than of its mount namespace: only the unit's
/// capabilities (CapabilityBoundingSet=, applied to root), NoNewPrivileges=, W^X memory
/// refused by the kernel (PR_SET_MDWE, what MemoryDenyWriteExecute= asks for), and a seccomp
/// filter for RestrictAddressFamilies=, RestrictNamespaces= (clone3 → ENOSYS, as systemd does,
/// so that threads fall back to clone), LockPersonality=, RestrictRealtime= (stricter: every
/// scheduling policy change is refused) and SystemCallArchitectures=native.
fn harden(cmd: &mut Command, netns: &str) {
    let netns = File::open(format!("/run/netns/{netns}"))
        .unwrap_or_else(|e| panic!("opening netns {netns}: {e}"));
    let last_cap: u32 = read(Path::new("/proc/sys/kernel/cap_last_cap"))
        .trim()
        .parse()
        .unwrap();
    let filter = seccomp_filter();
    let check = |ret: libc::c_int| {
        if ret == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: only system calls between fork and exec; nothing allocates or locks.
    unsafe {
        cmd.pre_exec(move || {
            check(libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET))?;
            for cap in (0..=last_cap).filter(|c| !UNIT_CAPS.contains(c)) {
                check(libc::prctl(
                    libc::PR_CAPBSET_DROP,
                    libc::c_ulong::from(cap),
                    0,
                    0,
                    0,
                ))?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            check(libc::prctl(
                libc::PR_SET_MDWE,
                libc::c_ulong::from(libc::PR_MDWE_REFUSE_EXEC_GAIN),
                0,
                0,
                0,
            ))?;
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            check(libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::c_ulong::from(libc::SECCOMP_MODE_FILTER),
                (&raw const program) as libc::c_ulong,
                0,
                0,
            ))
        });
    }
}

fn seccomp_filter() -> Vec<libc::sock_filter> {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W};
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64
    const NR: u32 = 0; // offsets in struct seccomp_data
    const ARCH_OFFSET: u32 = 4;
    const ARG0: u32 = 16; // low 32 bits on a little-endian machine
    let ld = |k| libc::sock_filter {
        code: (BPF_LD | BPF_W | BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k, jt, jf| libc::sock_filter {
        code: (BPF_JMP | BPF_JEQ | BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let jset = |k, jt, jf| libc::sock_filter {
        code: (BPF_JMP | BPF_JSET | BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let ret = |k| libc::sock_filter {
        code: (BPF_RET | BPF_K) as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let allow = ret(libc::SECCOMP_RET_ALLOW);
    let errno = |e: libc::c_int| ret(libc::SECCOMP_RET_ERRNO | e as u32);
    let nr = |n: libc::c_long| n as u32;
    let new_namespaces = (libc::CLONE_NEWNS
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWTIME) as u32;
    let mut f = vec![
        ld(ARCH_OFFSET),
        jeq(ARCH, 1, 0),
        ret(libc::SECCOMP_RET_KILL_PROCESS),
        ld(NR),
        // socket(): AF_UNIX, AF_INET, AF_INET6, AF_NETLINK only.
        jeq(nr(libc::SYS_socket), 0, 7),
        ld(ARG0),
        jeq(libc::AF_UNIX as u32, 4, 0),
        jeq(libc::AF_INET as u32, 3, 0),
        jeq(libc::AF_INET6 as u32, 2, 0),
        jeq(libc::AF_NETLINK as u32, 1, 0),
        errno(libc::EAFNOSUPPORT),
        allow,
        // clone() without namespace flags; clone3() hides its flags in memory.
        jeq(nr(libc::SYS_clone), 0, 4),
        ld(ARG0),
        jset(new_namespaces, 0, 1),
        errno(libc::EPERM),
        allow,
        jeq(nr(libc::SYS_clone3), 0, 1),
        errno(libc::ENOSYS),
        // personality(): only querying it or PER_LINUX.
        jeq(nr(libc::SYS_personality), 0, 5),
        ld(ARG0),
        jeq(0, 2, 0),
        jeq(0xffff_ffff, 1, 0),
        errno(libc::EPERM),
        allow,
    ];
    for call in [
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_sched_setscheduler,
        libc::SYS_sched_setattr,
    ] {
        f.extend([jeq(nr(call), 0, 1), errno(libc::EPERM)]);
    }
    f.push(allow);
    f
}

/// Not a test by itself: run by `daemon_works_under_the_units_restrictions` in the restricted
/// environment (with `XLB_HARDENING_PROBE=1`) to show that the restrictions are in force. It
/// only reports what it sees; the parent asserts on the report, since outside the restrictions
/// the same calls rightly succeed. Ignored, so that a plain run does not count it as a pass.
#[test]
#[ignore = "run by daemon_works_under_the_units_restrictions in a restricted child process"]
fn hardening_probe() {
    if std::env::var_os(PROBE_ENV).is_none() {
        return;
    }
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    // SAFETY: plain system calls; the mapping, if any, is never used.
    let (mdwe, rwx, packet) = unsafe {
        let mdwe = libc::prctl(libc::PR_GET_MDWE, 0, 0, 0, 0);
        let prot = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        let map = libc::mmap(
            std::ptr::null_mut(),
            4096,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        let rwx = if map == libc::MAP_FAILED { errno() } else { 0 };
        let packet = if libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) < 0 {
            errno()
        } else {
            0
        };
        (mdwe, rwx, packet)
    };
    println!("probe: mdwe={mdwe} rwx_mmap_errno={rwx} af_packet_errno={packet}");
}

/// The daemon works under the restrictions of xlb.service that apply to a process (see
/// `harden`): it loads, attaches, probes, reconciles (sock_diag), serves, drains, and adopts
/// its pins after a restart. The mount-namespace settings (ProtectSystem=, ReadWritePaths=,
/// PrivateTmp=, …) need systemd; the daemon writes nothing but its pins.
#[test]
fn daemon_works_under_the_units_restrictions() {
    xlb_tests::root_or_skip!();
    // First, that the restrictions bite: the same setup around a probe.
    let mut lb = Lb::prepare("hardened", Family::V4);
    let mut probe = Command::new(std::env::current_exe().unwrap());
    probe
        .args([
            "--exact",
            "hardening_probe",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE_ENV, "1");
    harden(&mut probe, &lb.topo.lb_ns);
    let (status, out) = run(probe, "hardening probe");
    assert!(status.success(), "{out}");
    let expected = format!(
        "probe: mdwe=1 rwx_mmap_errno={} af_packet_errno={}",
        libc::EACCES,
        libc::EAFNOSUPPORT
    );
    assert!(out.contains(&expected), "expected {expected:?}:\n{out}");

    let hardened_daemon = |lb: &Lb| {
        let mut cmd = Command::new(xlb_bin());
        cmd.arg("run").arg("--config").arg(&lb.config);
        harden(&mut cmd, &lb.topo.lb_ns);
        cmd
    };
    lb.spawn_apps();
    lb.start_daemon_with(hardened_daemon(&lb));
    lb.wait_healthy();
    let proc_status = read(Path::new(&format!("/proc/{}/status", lb.daemon().pid())));
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in:\n{proc_status}"))
            .trim()
            .to_owned()
    };
    let caps = format!("{:016x}", UNIT_CAPS.iter().fold(0u64, |m, &c| m | 1 << c));
    for name in ["CapPrm", "CapEff", "CapBnd"] {
        assert_eq!(field(name), caps, "{name} of the daemon");
    }
    assert_eq!(
        (field("NoNewPrivs").as_str(), field("Seccomp").as_str()),
        ("1", "2")
    );

    let served = lb.spread(30);
    println!("30 connections through the restricted daemon: {served:?}");
    assert!(served.iter().all(|&n| n > 0), "{served:?}");
    let mut held: Vec<Held> = (0..BACKENDS).map(|_| lb.hold()).collect();
    lb.await_live([1, 1, 1], "live counts [1, 1, 1] as in the socket table");
    drain(&lb, "drain", 0);
    assert_eq!(lb.spread(6)[0], 0);
    drain(&lb, "undrain", 0);

    let daemon = lb.daemon.take().expect("the daemon runs");
    assert!(daemon.terminate().success(), "{}", daemon.output());
    drop(daemon);
    lb.start_daemon_with(hardened_daemon(&lb));
    assert!(
        lb.daemon().output().contains("adopted pinned maps"),
        "{}",
        lb.daemon().output()
    );
    for h in &mut held {
        assert_eq!(
            h.request(),
            h.backend,
            "a held connection changed backend across the restart"
        );
    }
    lb.wait_healthy();
    drop(held);
    lb.finish();
}

/// `cargo xtask install --destdir D --prefix /usr/local` (the built xtask binary, with the
/// built xlb): the files land in place with their modes, a second run keeps the config and the
/// app template the user edited, `--prefix` reaches ExecStart=, `--dry-run` touches nothing.
#[test]
fn xtask_install_puts_files_in_place_and_keeps_config() {
    let xtask = xlb_bin().with_file_name("xtask");
    assert!(
        xtask.is_file(),
        "{} not found: `cargo build` builds it",
        xtask.display()
    );
    let dest = TempDir::new("install");
    let install = |dest: &Path, extra: &[&str]| {
        let mut cmd = Command::new(&xtask);
        cmd.arg("install")
            .arg("--destdir")
            .arg(dest)
            .arg("--binary")
            .arg(xlb_bin())
            .args(extra);
        let out = run_ok(cmd, "xtask install");
        println!("{}", out.trim());
        out
    };
    let shipped = systemd_dir();
    let out = install(&dest.0, &["--prefix", "/usr/local"]);
    let files = [
        ("usr/local/bin/xlb", 0o755),
        ("etc/systemd/system/xlb.service", 0o644),
        ("etc/systemd/system/xlb.socket", 0o644),
        ("etc/systemd/system/app@.service", 0o644),
        ("etc/xlb/xlb.toml", 0o644),
    ];
    for (file, mode) in files {
        let path = dest.0.join(file);
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "mode of {file}");
        assert!(
            out.contains(&path.display().to_string()),
            "the output should name {}: {out}",
            path.display()
        );
    }
    assert_eq!(
        std::fs::metadata(dest.0.join("usr/local/bin/xlb"))
            .unwrap()
            .len(),
        std::fs::metadata(xlb_bin()).unwrap().len()
    );
    for (installed, source) in [
        ("etc/systemd/system/xlb.service", "xlb.service"),
        ("etc/systemd/system/xlb.socket", "xlb.socket"),
        ("etc/systemd/system/app@.service", "app@.service"),
        ("etc/xlb/xlb.toml", "xlb.toml"),
    ] {
        assert_eq!(
            read(&dest.0.join(installed)),
            read(&shipped.join(source)),
            "{installed}"
        );
    }

    let config = dest.0.join("etc/xlb/xlb.toml");
    let template = dest.0.join("etc/systemd/system/app@.service");
    std::fs::write(&config, "# mine\n").unwrap();
    std::fs::write(&template, "# my app\n").unwrap();
    std::fs::write(dest.0.join("etc/systemd/system/xlb.service"), "# stale\n").unwrap();
    let out = install(&dest.0, &["--prefix", "/usr/local"]);
    assert_eq!(read(&config), "# mine\n", "the config was overwritten");
    assert_eq!(
        read(&template),
        "# my app\n",
        "app@.service was overwritten"
    );
    assert!(
        out.contains(&format!("{} exists; kept", config.display())),
        "{out}"
    );
    assert_eq!(
        read(&dest.0.join("etc/systemd/system/xlb.service")),
        read(&shipped.join("xlb.service"))
    );

    let other = TempDir::new("install-opt");
    install(&other.0, &["--prefix", "/opt/xlb"]);
    let unit = read(&other.0.join("etc/systemd/system/xlb.service"));
    assert!(
        unit.lines()
            .any(|l| l == "ExecStart=/opt/xlb/bin/xlb run --config /etc/xlb/xlb.toml")
            && unit
                .lines()
                .any(|l| l == "ExecReload=/opt/xlb/bin/xlb reload --config /etc/xlb/xlb.toml"),
        "{unit}"
    );
    assert!(other.0.join("opt/xlb/bin/xlb").is_file());

    let dry = TempDir::new("install-dry");
    let out = install(&dry.0, &["--dry-run"]);
    assert!(out.contains("would install"), "{out}");
    let left: Vec<_> = std::fs::read_dir(&dry.0).unwrap().collect();
    assert!(left.is_empty(), "--dry-run wrote {left:?}");
}

/// The client namespace's TCP counters (`nstat -a`): every connection there is a client's.
fn client_tcp_counters(lb: &Lb) -> std::collections::HashMap<String, u64> {
    let mut cmd = lb.topo.client("nstat");
    cmd.args(["-asz"]);
    run_ok(cmd, "nstat")
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            Some((fields.next()?.to_owned(), fields.next()?.parse().ok()?))
        })
        .collect()
}

/// RELIABILITY R12 under load: a backend drained while it holds keep-alive connections, one of
/// them with a request in flight, and while a steady stream of new connections arrives. No
/// connection is reset or refused, the request in flight and later ones on the held
/// connections are answered, and no new connection reaches the backend once the drain returns.
#[test]
fn drain_under_load_resets_nothing() {
    xlb_tests::root_or_skip!();
    let lb = Lb::start("drain-load", Family::V4);
    let mut held: Vec<Held> = (0..2 * BACKENDS).map(|_| lb.hold()).collect();
    let before = client_tcp_counters(&lb);
    let app1 = lb.backends[0].to_string();
    let ((total_at_drain, in_flight), load) = under_load(&lb, || {
        // A request that is still being answered when the drain happens.
        let slow = held.iter_mut().find(|h| h.backend == 0).expect("app-1 holds two");
        let peer = slow.stream.peer_addr().unwrap();
        slow.stream
            .write_all(format!("GET /slow?ms=1500 HTTP/1.1\r\nHost: {peer}\r\n\r\n").as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let out = drain(&lb, "drain", 0);
        assert!(out.contains(&format!("web {app1}: draining")), "{out}");
        let total_at_drain = lb.view()[0].total;
        let in_flight = read_response(&slow.stream).map(|body| app_index(&body));
        // Keep the load going a while after the drain.
        std::thread::sleep(Duration::from_secs(1));
        (total_at_drain, in_flight)
    });
    println!(
        "load during the drain: {} requests, per backend {:?}, {} failed",
        load.ok,
        load.served,
        load.failures.len()
    );
    assert_eq!(in_flight.expect("the request in flight during the drain"), 0);
    assert!(load.failures.is_empty(), "failed requests: {:?}", load.failures);
    assert!(load.ok >= 100, "too little load to show anything: {load:?}");
    let view = lb.view();
    assert_eq!(
        view[0].total, total_at_drain,
        "new connections reached app-1 after its drain returned: {view:?}"
    );
    for h in &mut held {
        assert_eq!(h.request(), h.backend, "a held connection changed backend");
    }
    // The held connections end normally: app-1's count goes to zero.
    drop(held);
    lb.poll(RECONCILE_DEADLINE, "app-1 with no connections left", |lb| {
        let view = lb.view();
        (view[0].live == 0 && view[0].state == "draining")
            .then_some(())
            .ok_or_else(|| format!("{view:?}"))
    });
    let after = client_tcp_counters(&lb);
    for counter in ["TcpEstabResets", "TcpAttemptFails"] {
        assert!(before.contains_key(counter), "nstat shows no {counter}: {before:?}");
        let delta = after.get(counter).copied().unwrap_or(0) - before.get(counter).copied().unwrap_or(0);
        println!("{counter}: +{delta} in the client namespace");
        assert_eq!(delta, 0, "{counter} rose by {delta}: connections were reset or refused");
    }
    drain(&lb, "undrain", 0);
    lb.finish();
}

/// Socket activation as `xlb.socket` does it: the daemon, started with listening sockets as
/// descriptors 3 and 4 and `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` set, serves its admin API
/// on the passed socket (a client that connected before the daemon started is answered) and
/// warns about the socket no listener uses.
#[test]
fn daemon_serves_on_sockets_passed_by_systemd() {
    xlb_tests::root_or_skip!();
    let mut lb = Lb::prepare("sockets", Family::V4);
    lb.spawn_apps();
    let (admin, extra) = lb.topo.in_lb(|| {
        (
            std::net::TcpListener::bind(ADMIN).expect("binding the admin address"),
            std::net::TcpListener::bind("127.0.0.1:9200").expect("binding 127.0.0.1:9200"),
        )
    });
    let sockets = [admin, extra];
    let cmd = socket_activated(&lb, &sockets, "admin:extra");
    // Connected before the daemon runs: it waits in the passed socket's queue.
    let mut early = lb
        .topo
        .in_lb(|| TcpStream::connect(ADMIN))
        .expect("connecting to the passed admin socket");
    lb.start_daemon_with(cmd);
    drop(sockets);
    let log = lb.daemon().output();
    assert!(log.contains("admin API on the socket passed by systemd"), "{log}");
    // Logged just after `xlb ready`.
    lb.daemon().wait_for_output(
        "systemd passed a socket for 127.0.0.1:9200 (extra) that no listener of the config uses",
        Duration::from_secs(5),
    );
    early
        .write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    early.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut answer = String::new();
    early.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("Active connections:"),
        "{answer}"
    );
    lb.wait_healthy();
    lb.finish();
}

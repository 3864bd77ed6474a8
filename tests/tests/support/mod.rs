//! The scenario tests' harness: `Lb`, a topology with three demo backends, a config and the
//! daemon, and helpers to drive it (clients through the VIP, status, the socket table, the maps).
#![allow(
    dead_code,
    reason = "each test binary uses its own part of the harness"
)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    sync::atomic::{AtomicBool, Ordering},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use xlb_tests::{Proc, Topology, demo_backend_bin, http_get, xlb_bin};

/// The daemon's admin API, inside the lb namespace (each namespace has its own loopback).
pub const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9100);
/// Bounds every connect, read and write of a client.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(200);
pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(100);
pub const RISE: u32 = 2;
pub const FALL: u32 = 2;
/// `xlb::daemon::RECONCILE_INTERVAL`.
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);
/// How long live counts may take to agree with the socket table: one reconcile period plus
/// slack for the reconcile itself and our polling.
pub const RECONCILE_DEADLINE: Duration = Duration::from_millis(1500);
/// `xlb::daemon::NO_SOCKET_GRACE_NS`: a flow whose socket the daemon cannot find is forgotten
/// this long after its SYN. Checks that outlast it prove the daemon does find the sockets.
pub const NO_SOCKET_GRACE: Duration = Duration::from_secs(2);
pub const BACKENDS: usize = 3;
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds every short command (`xlb status`, `xlb check`, `xlb detach`, `bpftool`, `ip`).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
    /// IPv4 with the VIP on an address of its own (198.18.0.10), so the data path rewrites the
    /// destination address as well as the port.
    V4OwnVip,
}

/// The VIP address of `Family::V4OwnVip`.
pub const OWN_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 10);

/// One backend as `/api/status` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendView {
    pub state: String,
    pub live: u64,
    pub total: u64,
    pub healthy: Option<bool>,
    pub last_error: Option<String>,
}

/// A topology with three demo backends (`app-1..3` on ports 8001..8003 of the lb address), a
/// config file, and (once started) the daemon. Dropping it kills the processes, detaches xlb
/// and removes the namespaces, pins and config directory, also when a test panics.
pub struct Lb {
    pub vip: SocketAddr,
    pub backends: Vec<SocketAddr>,
    pub config: PathBuf,
    pub dir: PathBuf,
    pub daemon: Option<Proc>,
    pub apps: Vec<Option<Proc>>,
    // Last: dropped after the processes above.
    pub topo: Topology,
}

impl Lb {
    /// Topology, config, backends and daemon, with every backend up and healthy.
    pub fn start(tag: &str, family: Family) -> Lb {
        let lb = Lb::prepare(tag, family);
        lb.start_all()
    }

    /// Topology and config file only.
    pub fn prepare(tag: &str, family: Family) -> Lb {
        let topo = Topology::new(tag);
        let ip: IpAddr = match family {
            Family::V4 | Family::V4OwnVip => topo.lb_v4.into(),
            Family::V6 => topo.lb_v6.into(),
        };
        let vip_ip: IpAddr = match family {
            Family::V4OwnVip => {
                let mut add = topo.lb("ip");
                add.args(["addr", "add", &format!("{OWN_VIP}/24"), "dev", &topo.lb_if]);
                run_ok(add, "adding the VIP address");
                OWN_VIP.into()
            }
            _ => ip,
        };
        let dir =
            std::env::temp_dir().join(topo.pin_path.file_name().expect("pin path has a name"));
        let lb = Lb {
            vip: SocketAddr::new(vip_ip, 80),
            backends: (1..=BACKENDS as u16)
                .map(|i| SocketAddr::new(ip, 8000 + i))
                .collect(),
            config: dir.join("xlb.toml"),
            dir,
            daemon: None,
            apps: Vec::new(),
            topo,
        };
        std::fs::create_dir_all(&lb.dir)
            .unwrap_or_else(|e| panic!("creating {}: {e}", lb.dir.display()));
        lb.write_config(&["xlb0"], "auto");
        lb
    }

    pub fn start_all(mut self) -> Lb {
        self.spawn_apps();
        self.start_daemon();
        self.wait_healthy();
        self
    }

    /// Starts every backend (`apps[i]` is `app-<i+1>`).
    pub fn spawn_apps(&mut self) {
        for i in 0..BACKENDS {
            let app = self.spawn_app(i);
            self.apps.push(Some(app));
        }
    }

    /// Waits until the daemon reports every backend up and healthy.
    pub fn wait_healthy(&self) {
        let (_, took) = self.poll(
            Duration::from_secs(10),
            "every backend up and healthy",
            |lb| {
                let view = lb.view();
                view.iter()
                    .all(|b| b.state == "up" && b.healthy == Some(true))
                    .then_some(())
                    .ok_or_else(|| format!("{view:?}"))
            },
        );
        println!(
            "all {BACKENDS} backends healthy {} ms after `xlb ready`",
            took.as_millis()
        );
    }

    pub fn write_config(&self, interfaces: &[&str], xdp_mode: &str) {
        self.write_config_with(interfaces, xdp_mode, HEALTH_INTERVAL, HEALTH_TIMEOUT, "");
    }

    /// The config with other health probe timing, and `service_keys` (TOML lines such as
    /// `max_fails = 0`) added to the service.
    pub fn write_config_with(
        &self,
        interfaces: &[&str],
        xdp_mode: &str,
        interval: Duration,
        timeout: Duration,
        service_keys: &str,
    ) {
        let list = |items: Vec<String>| {
            items
                .iter()
                .map(|i| format!("\"{i}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let text = format!(
            r#"[dataplane]
interfaces = [{interfaces}]
xdp_mode = "{xdp_mode}"
pin_path = "{pin_path}"

[admin]
listen = "{ADMIN}"

[[service]]
name = "web"
listen = "{vip}"
mode = "l4"
backends = [{backends}]
{service_keys}

[service.health]
check = "http"
path = "/health"
interval = "{interval}ms"
timeout = "{timeout}ms"
rise = {RISE}
fall = {FALL}
"#,
            interfaces = list(interfaces.iter().map(ToString::to_string).collect()),
            pin_path = self.topo.pin_path.display(),
            vip = self.vip,
            backends = list(self.backends.iter().map(ToString::to_string).collect()),
            interval = interval.as_millis(),
            timeout = timeout.as_millis(),
        );
        std::fs::write(&self.config, text)
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.config.display()));
    }

    /// Starts `app-<i+1>` on its port and waits until it listens.
    pub fn spawn_app(&self, i: usize) -> Proc {
        let addr = self.backends[i].to_string();
        let name = format!("app-{}", i + 1);
        let app = self
            .topo
            .spawn_lb(demo_backend_bin(), &["--listen", &addr, "--name", &name]);
        app.wait_for_output(&format!("listening on {addr}"), Duration::from_secs(10));
        app
    }

    pub fn xlb(&self, args: &[&str]) -> Command {
        let mut cmd = self.topo.lb(xlb_bin());
        cmd.args(args).arg("--config").arg(&self.config);
        cmd
    }

    /// `xlb run` in the lb namespace, waiting for `xlb ready`.
    pub fn start_daemon(&mut self) {
        self.start_daemon_with(self.xlb(&["run"]));
    }

    /// Spawns `cmd` (an `xlb run` prepared differently, e.g. with extra environment) as the
    /// daemon, waiting for `xlb ready`.
    pub fn start_daemon_with(&mut self, cmd: Command) {
        assert!(self.daemon.is_none(), "a daemon is already running");
        let daemon = self.topo.spawn(cmd, "xlb run");
        daemon.wait_for_output("xlb ready", STARTUP_TIMEOUT);
        self.daemon = Some(daemon);
    }

    pub fn daemon(&self) -> &Proc {
        self.daemon.as_ref().expect("the daemon is running")
    }

    /// `GET /api/status` from inside the lb namespace.
    pub fn status(&self) -> Value {
        let response = self
            .topo
            .in_lb(|| http_get(ADMIN, "/api/status", IO_TIMEOUT))
            .unwrap_or_else(|e| panic!("GET http://{ADMIN}/api/status in the lb namespace: {e}"));
        assert_eq!(response.status, 200, "{response:?}");
        serde_json::from_str(&response.body)
            .unwrap_or_else(|e| panic!("status is not JSON ({e}): {}", response.body))
    }

    /// `xlb status --json --config FILE`, the CLI view of the same.
    pub fn cli_status(&self) -> Value {
        // Nothing but the JSON on stdout, and nothing on stderr when it succeeds.
        let out = run_ok(self.xlb(&["status", "--json"]), "xlb status --json");
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("xlb status --json is not JSON ({e}): {out}"))
    }

    /// The backends of the (only) service in config order, from a status document.
    pub fn backends_of(&self, status: &Value) -> Vec<BackendView> {
        let service = &status["services"][0];
        assert_eq!(service["name"], "web", "{status:#}");
        assert_eq!(service["listen"], self.vip.to_string(), "{status:#}");
        self.backends
            .iter()
            .map(|addr| {
                let b = service["backends"]
                    .as_array()
                    .and_then(|all| all.iter().find(|b| b["address"] == addr.to_string()))
                    .unwrap_or_else(|| {
                        panic!("backend {addr} missing from the status: {status:#}")
                    });
                let number = |key: &str| {
                    b[key]
                        .as_u64()
                        .unwrap_or_else(|| panic!("{key} of {addr} is not a count: {b}"))
                };
                BackendView {
                    state: b["state"]
                        .as_str()
                        .unwrap_or_else(|| panic!("state of {addr}: {b}"))
                        .to_owned(),
                    live: number("live_connections"),
                    total: number("total_connections"),
                    healthy: b["healthy"].as_bool(),
                    last_error: b["last_error"].as_str().map(str::to_owned),
                }
            })
            .collect()
    }

    pub fn view(&self) -> Vec<BackendView> {
        self.backends_of(&self.status())
    }

    pub fn live(&self) -> Vec<u64> {
        self.view().iter().map(|b| b.live).collect()
    }

    pub fn totals(&self) -> Vec<u64> {
        self.view().iter().map(|b| b.total).collect()
    }

    /// Calls `f` every 20 ms until it returns `Ok`; returns that and how long it took. Panics
    /// after `timeout` with the last `Err`, which should say what was seen instead.
    pub fn poll<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&Lb) -> Result<T, String>,
    ) -> (T, Duration) {
        let start = Instant::now();
        loop {
            match f(self) {
                Ok(v) => return (v, start.elapsed()),
                Err(last) if start.elapsed() >= timeout => {
                    panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Waits (one reconcile period and some) until both the status and the kernel's socket
    /// table show `expected` live connections per backend; returns how long that took.
    pub fn await_live(&self, expected: [u64; BACKENDS], what: &str) -> Duration {
        let (_, took) = self.poll(RECONCILE_DEADLINE, what, |lb| {
            let (live, ss) = (lb.live(), lb.ss_live());
            (live == expected && ss == expected)
                .then_some(())
                .ok_or_else(|| format!("status {live:?}, ss {ss:?}"))
        });
        took
    }

    /// One new connection through the VIP: `GET /` (HTTP/1.0, closed by the server), returning
    /// the index of the backend that answered.
    pub fn get(&self) -> usize {
        let vip = self.vip;
        let response = self
            .topo
            .in_client(|| http_get(vip, "/", IO_TIMEOUT))
            .unwrap_or_else(|e| panic!("GET http://{vip}/ from the client namespace: {e}"));
        assert_eq!(response.status, 200, "{response:?}");
        app_index(&response.body)
    }

    /// `n` new short connections, one after the other; how many each backend answered.
    pub fn spread(&self, n: usize) -> [usize; BACKENDS] {
        let mut served = [0; BACKENDS];
        for _ in 0..n {
            served[self.get()] += 1;
        }
        served
    }

    /// A new connection through the VIP that stays open after one keep-alive request.
    pub fn hold(&self) -> Held {
        let vip = self.vip;
        let stream = self
            .topo
            .in_client(|| TcpStream::connect_timeout(&vip, IO_TIMEOUT))
            .unwrap_or_else(|e| panic!("connecting to {vip} from the client namespace: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut held = Held {
            stream,
            backend: usize::MAX,
        };
        held.backend = held.request();
        held
    }

    /// Established and half-open connections per backend in the lb namespace's socket table,
    /// from clients (peers other than the lb address, which is where health probes come from).
    pub fn ss_live(&self) -> Vec<u64> {
        let out = self
            .topo
            .ss_lb(&["-Htn", "state", "established", "state", "syn-recv"]);
        let mut live = vec![0; BACKENDS];
        for line in out.lines() {
            // [State] Recv-Q Send-Q Local:Port Peer:Port
            let addrs: Vec<SocketAddr> = line
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            let [local, peer] = addrs[..] else {
                panic!("unexpected ss line {line:?} in:\n{out}")
            };
            // Health probes come from the lb namespace's own addresses (the backends' or, when
            // it has its own, the VIP's): not client connections.
            if peer.ip() == self.vip.ip() || self.backends.iter().any(|b| b.ip() == peer.ip()) {
                continue;
            }
            if let Some(b) = self.backends.iter().position(|&a| a == local) {
                live[b] += 1;
            }
        }
        live
    }

    /// `(live, total)` of a backend slot straight from the pinned `BACKEND_CONNS` map: the
    /// signed value the data path uses (the status clamps it at zero).
    pub fn raw_conns(&self, slot: u32) -> (i64, u64) {
        let path = self.topo.pin_path.join("BACKEND_CONNS");
        let key: Vec<String> = slot.to_ne_bytes().iter().map(u8::to_string).collect();
        let mut cmd = Command::new("bpftool");
        cmd.args(["-j", "map", "lookup", "pinned"])
            .arg(&path)
            .arg("key")
            .args(&key);
        let out = run_ok(cmd, "bpftool map lookup");
        let json: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("bpftool -j printed no JSON ({e}): {out}"));
        let bytes: Vec<u8> = json["value"]
            .as_array()
            .unwrap_or_else(|| panic!("unexpected bpftool output: {json}"))
            .iter()
            .map(|b| {
                let b = b.as_str().expect("bytes as strings");
                u8::from_str_radix(b.trim_start_matches("0x"), 16).expect("hex byte")
            })
            .collect();
        assert_eq!(bytes.len(), 16, "BackendConns is 16 bytes: {json}");
        (
            i64::from_ne_bytes(bytes[..8].try_into().unwrap()),
            u64::from_ne_bytes(bytes[8..].try_into().unwrap()),
        )
    }

    /// Asserts until `until` that the status, the socket table and the map agree on every
    /// backend's live count, and that the count is `expected`.
    pub fn assert_live_stable(&self, expected: &[u64], until: Instant) {
        let mut samples = 0;
        loop {
            let live = self.live();
            let ss = self.ss_live();
            let raw: Vec<i64> = (0..BACKENDS as u32).map(|s| self.raw_conns(s).0).collect();
            assert_eq!(
                live, ss,
                "status and socket table disagree (map {raw:?}) after {samples} good samples"
            );
            assert_eq!(
                live, expected,
                "live counts changed (map {raw:?}) after {samples} good samples"
            );
            assert_eq!(
                raw,
                live.iter().map(|&l| l as i64).collect::<Vec<_>>(),
                "the map differs from the status"
            );
            samples += 1;
            if Instant::now() >= until {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Overwrites a backend's live count in the pinned map (keeping the rest of the value), as
    /// a lost FIN or a bug would leave it.
    pub fn set_raw_live(&self, slot: u32, live: i64) {
        let (_, total) = self.raw_conns(slot);
        let path = self.topo.pin_path.join("BACKEND_CONNS");
        let hex = |bytes: &[u8]| bytes.iter().map(u8::to_string).collect::<Vec<_>>();
        let mut value = live.to_ne_bytes().to_vec();
        value.extend(total.to_ne_bytes());
        let mut cmd = Command::new("bpftool");
        cmd.args(["map", "update", "pinned"])
            .arg(&path)
            .arg("key")
            .args(hex(&slot.to_ne_bytes()))
            .arg("value")
            .args(hex(&value));
        run_ok(cmd, "bpftool map update");
    }

    /// Sends one hand-made SYN to the VIP from `src`, an address nobody owns: the backend's
    /// SYN-ACKs go into the void, so its socket stays SYN_RECV (for a minute, until its SYN-ACK
    /// retries run out).
    ///
    /// The lb namespace gets a permanent neighbour entry for `src` with a MAC nobody has, so the
    /// SYN-ACKs leave through the veth and the client namespace discards them (not its MAC).
    /// Without it, ARP resolution fails after about 3 s, the kernel reports "host unreachable"
    /// to itself and that drops the half-open socket (`tcp_req_err`).
    pub fn spoofed_syn(&self, src: SocketAddrV4) {
        let SocketAddr::V4(vip) = self.vip else {
            panic!("spoofed SYNs are IPv4 only")
        };
        let mut neigh = Command::new("ip");
        neigh
            .args(["-n", &self.topo.lb_ns, "neigh", "replace"])
            .arg(src.ip().to_string())
            .args(["lladdr", "02:78:6c:62:de:ad", "dev", &self.topo.lb_if])
            .args(["nud", "permanent"]);
        run_ok(neigh, "ip neigh replace");
        let packet = syn_packet(src, vip, 0x1234_5678 ^ u32::from(src.port()));
        self.topo
            .in_client(|| -> std::io::Result<usize> {
                // IPPROTO_RAW: we write the IP header ourselves (IP_HDRINCL).
                let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
                socket.send_to(&packet, &SockAddr::from(SocketAddrV4::new(*vip.ip(), 0)))
            })
            .unwrap_or_else(|e| panic!("sending a SYN from {src} to {vip}: {e}"));
    }

    pub fn xdp_attached(&self) -> bool {
        xdp_attached(&self.topo)
    }

    /// Stops the daemon (it must exit 0), detaches xlb, and checks that nothing is left.
    pub fn finish(mut self) {
        let daemon = self.daemon.take().expect("the daemon is running");
        let status = daemon.terminate();
        assert!(
            status.success(),
            "xlb run exited with {status} on SIGTERM:\n{}",
            daemon.output()
        );
        drop(daemon);
        let out = run_ok(self.xlb(&["detach"]), "xlb detach");
        assert!(
            out.contains("detached xlb"),
            "xlb detach found nothing to detach: {out}"
        );
        assert!(
            !self.topo.pin_path.exists(),
            "{} still exists after detach",
            self.topo.pin_path.display()
        );
        assert!(
            !self.xdp_attached(),
            "xlb0 still has an XDP program after detach:\n{}",
            link_show(&self.topo)
        );
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        // Kill first, so the detach below cannot race a daemon re-pinning.
        drop(self.daemon.take());
        // Nothing here may panic (a panic while unwinding aborts): a hung detach is killed,
        // and the topology removes the pins anyway, which detaches too.
        if self.topo.pin_path.exists() {
            let spawned = self
                .xlb(&["detach"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            match spawned {
                Ok(mut child) => {
                    let deadline = Instant::now() + COMMAND_TIMEOUT;
                    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let _ = child.kill();
                    match child.wait() {
                        Ok(status) if status.success() => {}
                        other => eprintln!("l4: xlb detach: {other:?}"),
                    }
                }
                Err(e) => eprintln!("l4: running xlb detach: {e}"),
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("l4: removing {}: {e}", self.dir.display());
        }
        // Then the backends (Proc drops) and the topology (namespaces, leftover pins).
    }
}

/// Bounds the background load of `under_load`, whatever happens to the test.
pub const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// Results of the background load: requests that succeeded, per backend, and the failures.
#[derive(Debug, Default)]
pub struct Load {
    pub ok: usize,
    pub served: [usize; BACKENDS],
    pub failures: Vec<String>,
}

/// Runs `during` while two client threads send one short connection (`GET /`, HTTP/1.0) after
/// another through the VIP; returns its result and what the load saw.
pub fn under_load<T: Send>(lb: &Lb, during: impl FnOnce() -> T + Send) -> (T, Load) {
    let stop = AtomicBool::new(false);
    let vip = lb.vip;
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let stop = &stop;
                scope.spawn(move || {
                    lb.topo.in_client(|| {
                        let mut load = Load::default();
                        let start = Instant::now();
                        while !stop.load(Ordering::Relaxed) && start.elapsed() < LOAD_LIMIT {
                            match http_get(vip, "/", IO_TIMEOUT) {
                                Ok(r) if r.status == 200 => {
                                    load.ok += 1;
                                    load.served[app_index(&r.body)] += 1;
                                }
                                Ok(r) => load.failures.push(format!("HTTP {}", r.status)),
                                Err(e) => load.failures.push(e.to_string()),
                            }
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        load
                    })
                })
            })
            .collect();
        // Some load before, so that every backend carries connections when the rollout starts.
        std::thread::sleep(Duration::from_millis(300));
        let result = during();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let mut total = Load::default();
        for c in clients {
            let load = c.join().expect("a load thread panicked");
            total.ok += load.ok;
            for i in 0..BACKENDS {
                total.served[i] += load.served[i];
            }
            total.failures.extend(load.failures);
        }
        (result, total)
    })
}

/// A connection through the VIP kept open between keep-alive requests.
pub struct Held {
    pub stream: TcpStream,
    /// Index of the backend that answered the first request.
    pub backend: usize,
}

impl Held {
    /// `GET /` (HTTP/1.1, keep-alive) on this connection; the index of the backend answering.
    pub fn request(&mut self) -> usize {
        let peer = self.stream.peer_addr().expect("connected");
        self.stream
            .write_all(format!("GET / HTTP/1.1\r\nHost: {peer}\r\n\r\n").as_bytes())
            .unwrap_or_else(|e| panic!("sending a request on a held connection to {peer}: {e}"));
        let body = read_response(&self.stream)
            .unwrap_or_else(|e| panic!("reading on a held connection to {peer}: {e}"));
        app_index(&body)
    }

    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().unwrap().port()
    }

    /// Closes with an RST instead of a FIN (SO_LINGER 0).
    pub fn reset(self) {
        SockRef::from(&self.stream)
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER 0");
    }
}

/// Reads one keep-alive response (Content-Length framed); returns its body.
pub fn read_response(stream: &TcpStream) -> std::io::Result<String> {
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    if !status_line.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "unexpected status line {status_line:?}"
        )));
    }
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other(
                "connection closed inside the response head",
            ));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse::<usize>().ok();
        }
        if name.eq_ignore_ascii_case("connection") && value.trim().eq_ignore_ascii_case("close") {
            return Err(std::io::Error::other(
                "the server closes a keep-alive connection",
            ));
        }
    }
    let length = length.ok_or_else(|| std::io::Error::other("response without Content-Length"))?;
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    // Nothing else is in flight on this connection, so the reader buffered nothing more.
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `served by app-N` → N-1.
pub fn app_index(body: &str) -> usize {
    body.trim()
        .strip_prefix("served by app-")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| (1..=BACKENDS).contains(n))
        .map(|n| n - 1)
        .unwrap_or_else(|| panic!("unexpected body {body:?}"))
}

/// Runs a command that must finish within `COMMAND_TIMEOUT`, owned by a `Proc` (killed if
/// the test fails first); its exit status and output (stdout and stderr, interleaved).
pub fn run(cmd: Command, label: &str) -> (ExitStatus, String) {
    Proc::spawn(cmd, label).wait_with_output(COMMAND_TIMEOUT)
}

/// `run`, asserting that the command succeeds; its output.
pub fn run_ok(cmd: Command, label: &str) -> String {
    let (status, output) = run(cmd, label);
    assert!(status.success(), "{label} failed ({status}): {output}");
    output
}

pub fn link_show(topo: &Topology) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", &topo.lb_ns, "link", "show", &topo.lb_if]);
    run_ok(cmd, "ip link show")
}

/// Whether the lb end of the veth has an XDP program (native `xdp` or generic `xdpgeneric`).
pub fn xdp_attached(topo: &Topology) -> bool {
    link_show(topo).contains("xdp")
}

/// An IPv4 TCP SYN with correct IP and TCP checksums and no options.
pub fn syn_packet(src: SocketAddrV4, dst: SocketAddrV4, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45; // version 4, 5-word header
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[4..6].copy_from_slice(&src.port().to_be_bytes()); // identification
    p[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let ip_check = checksum(&p[..20]);
    p[10..12].copy_from_slice(&ip_check.to_be_bytes());
    {
        let tcp = &mut p[20..];
        tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
        tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[12] = 5 << 4; // data offset
        tcp[13] = 0x02; // SYN
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    }
    let mut pseudo = Vec::with_capacity(12 + 20);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&p[20..]);
    let tcp_check = checksum(&pseudo);
    p[36..38].copy_from_slice(&tcp_check.to_be_bytes());
    p
}

/// The Internet checksum (RFC 1071) of `data`, with the checksum field zeroed.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Backends started by the restart script, killed when the test ends (they are not `Proc`s).
pub struct Restarted(pub PathBuf);

impl Drop for Restarted {
    fn drop(&mut self) {
        for i in 1..=BACKENDS {
            let Ok(pid) = std::fs::read_to_string(self.0.join(format!("app-{i}.pid"))) else { continue };
            let Ok(pid) = pid.trim().parse::<i32>() else { continue };
            // Only if it still is one of ours: the pid may be a reaped `Proc`'s, reused since.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("xlb-demo-backend") {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// `restart.sh N` in `lb.dir`: restarts app-N on port 800N in the lb namespace, like
/// `systemctl restart app@N`: SIGTERM to the pid in `app-N.pid`, wait until the port is free,
/// start a new demo backend there and wait until it listens. Writes the current pids first.
pub fn write_restart_script(lb: &Lb) -> PathBuf {
    let script = lb.dir.join("restart.sh");
    let ip = lb.backends[0].ip();
    let text = format!(
        r#"#!/bin/sh
# restart.sh N: restart app-N on port 800N, like `systemctl restart app@N`.
set -eu
i=$1
dir={dir}
pid=$(cat "$dir/app-$i.pid")
kill -TERM "$pid"
n=0
while ss -Htln "sport = :800$i" | grep -q .; do
    n=$((n + 1)); [ $n -lt 200 ] || {{ echo "app-$i did not stop" >&2; exit 1; }}
    sleep 0.05
done
setsid {demo} --listen {ip}:800$i --name app-$i >"$dir/app-$i.log" 2>&1 </dev/null &
echo $! >"$dir/app-$i.pid"
n=0
until grep -qs "listening on" "$dir/app-$i.log"; do
    n=$((n + 1)); [ $n -lt 200 ] || {{ echo "app-$i did not start" >&2; exit 1; }}
    sleep 0.05
done
echo "app-$i restarted as pid $(cat "$dir/app-$i.pid")"
"#,
        dir = lb.dir.display(),
        demo = demo_backend_bin().display(),
    );
    std::fs::write(&script, text).unwrap();
    let mut chmod = Command::new("chmod");
    chmod.arg("755").arg(&script);
    run_ok(chmod, "chmod");
    for (i, app) in lb.apps.iter().enumerate() {
        let pid = app.as_ref().expect("the backend runs").pid();
        std::fs::write(lb.dir.join(format!("app-{}.pid", i + 1)), pid.to_string()).unwrap();
    }
    script
}

pub fn app_pids(dir: &std::path::Path) -> Vec<String> {
    (1..=BACKENDS)
        .map(|i| std::fs::read_to_string(dir.join(format!("app-{i}.pid"))).unwrap().trim().to_owned())
        .collect()
}

/// `xlb run` on listening sockets passed the way systemd passes them (`LISTEN_FDS`,
/// `LISTEN_PID`, `LISTEN_FDNAMES` = `names`), as fds 3, 4, … in the order of `sockets`. The
/// sockets stay open in the test, as systemd holds them for xlb.socket.
pub fn socket_activated(lb: &Lb, sockets: &[std::net::TcpListener], names: &str) -> Command {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let fds: Vec<i32> = sockets.iter().map(|s| s.as_raw_fd()).collect();
    let mut cmd = lb.topo.lb("sh");
    // systemd sets LISTEN_PID to the pid it execs; `exec` keeps the shell's.
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(xlb_bin())
        .args(["run", "--config"])
        .arg(&lb.config)
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names);
    assert!(fds.len() <= 8, "at most 8 passed sockets");
    // SAFETY: only fcntl and dup2 (async-signal-safe) between fork and exec; the fds are
    // first moved above 100, so that placing them at 3, 4, … overwrites none still to come.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = [0; 8];
            for (h, &fd) in high.iter_mut().zip(&fds) {
                *h = nix::libc::fcntl(fd, nix::libc::F_DUPFD_CLOEXEC, 100);
                if *h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &h) in high.iter().take(fds.len()).enumerate() {
                if nix::libc::dup2(h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

//! Scenario tests of the L4 least-connections path with real processes: the `xlb` daemon, three
//! demo backends and clients in a private two-namespace topology (see `Topology`).
//!
//! Every test asserts what a client sees (which backend answered, that every request was
//! answered) and what the daemon reports (`/api/status`), and checks the live counts against
//! the kernel's own socket table (`ss`) where that is the point. Timings that the daemon
//! promises (health transitions, reconciliation) are measured and printed.
//!
//! Run as root after `cargo build`:
//! `cargo test -p xlb-tests --test l4 -- --test-threads=1 --nocapture`.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use xlb_tests::{Proc, Topology, demo_backend_bin, http_get, xlb_bin};

/// The daemon's admin API, inside the lb namespace (each namespace has its own loopback).
const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9100);
/// Bounds every connect, read and write of a client.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const HEALTH_INTERVAL: Duration = Duration::from_millis(200);
const HEALTH_TIMEOUT: Duration = Duration::from_millis(100);
const RISE: u32 = 2;
const FALL: u32 = 2;
/// `xlb::daemon::RECONCILE_INTERVAL`.
const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);
/// How long live counts may take to agree with the socket table: one reconcile period plus
/// slack for the reconcile itself and our polling.
const RECONCILE_DEADLINE: Duration = Duration::from_millis(1500);
/// `xlb::daemon::NO_SOCKET_GRACE_NS`: a flow whose socket the daemon cannot find is forgotten
/// this long after its SYN. Checks that outlast it prove the daemon does find the sockets.
const NO_SOCKET_GRACE: Duration = Duration::from_secs(2);
const BACKENDS: usize = 3;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds every short command (`xlb status`, `xlb check`, `xlb detach`, `bpftool`, `ip`).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// One backend as `/api/status` reports it.
#[derive(Clone, Debug, PartialEq)]
struct BackendView {
    state: String,
    live: u64,
    total: u64,
    healthy: Option<bool>,
    last_error: Option<String>,
}

/// A topology with three demo backends (`app-1..3` on ports 8001..8003 of the lb address), a
/// config file, and (once started) the daemon. Dropping it kills the processes, detaches xlb
/// and removes the namespaces, pins and config directory, also when a test panics.
struct Lb {
    vip: SocketAddr,
    backends: Vec<SocketAddr>,
    config: PathBuf,
    dir: PathBuf,
    daemon: Option<Proc>,
    apps: Vec<Option<Proc>>,
    // Last: dropped after the processes above.
    topo: Topology,
}

impl Lb {
    /// Topology, config, backends and daemon, with every backend up and healthy.
    fn start(tag: &str, family: Family) -> Lb {
        let lb = Lb::prepare(tag, family);
        lb.start_all()
    }

    /// Topology and config file only.
    fn prepare(tag: &str, family: Family) -> Lb {
        let topo = Topology::new(tag);
        let ip: IpAddr = match family {
            Family::V4 => topo.lb_v4.into(),
            Family::V6 => topo.lb_v6.into(),
        };
        let dir =
            std::env::temp_dir().join(topo.pin_path.file_name().expect("pin path has a name"));
        let lb = Lb {
            vip: SocketAddr::new(ip, 80),
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

    fn start_all(mut self) -> Lb {
        for i in 0..BACKENDS {
            let app = self.spawn_app(i);
            self.apps.push(Some(app));
        }
        self.start_daemon();
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
        self
    }

    fn write_config(&self, interfaces: &[&str], xdp_mode: &str) {
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
            interval = HEALTH_INTERVAL.as_millis(),
            timeout = HEALTH_TIMEOUT.as_millis(),
        );
        std::fs::write(&self.config, text)
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.config.display()));
    }

    /// Starts `app-<i+1>` on its port and waits until it listens.
    fn spawn_app(&self, i: usize) -> Proc {
        let addr = self.backends[i].to_string();
        let name = format!("app-{}", i + 1);
        let app = self
            .topo
            .spawn_lb(demo_backend_bin(), &["--listen", &addr, "--name", &name]);
        app.wait_for_output(&format!("listening on {addr}"), Duration::from_secs(10));
        app
    }

    fn xlb(&self, args: &[&str]) -> Command {
        let mut cmd = self.topo.lb(xlb_bin());
        cmd.args(args).arg("--config").arg(&self.config);
        cmd
    }

    /// `xlb run` in the lb namespace, waiting for `xlb ready`.
    fn start_daemon(&mut self) {
        assert!(self.daemon.is_none(), "a daemon is already running");
        let daemon = self.topo.spawn(self.xlb(&["run"]), "xlb run");
        daemon.wait_for_output("xlb ready", STARTUP_TIMEOUT);
        self.daemon = Some(daemon);
    }

    fn daemon(&self) -> &Proc {
        self.daemon.as_ref().expect("the daemon is running")
    }

    /// `GET /api/status` from inside the lb namespace.
    fn status(&self) -> Value {
        let response = self
            .topo
            .in_lb(|| http_get(ADMIN, "/api/status", IO_TIMEOUT))
            .unwrap_or_else(|e| panic!("GET http://{ADMIN}/api/status in the lb namespace: {e}"));
        assert_eq!(response.status, 200, "{response:?}");
        serde_json::from_str(&response.body)
            .unwrap_or_else(|e| panic!("status is not JSON ({e}): {}", response.body))
    }

    /// `xlb status --json --config FILE`, the CLI view of the same.
    fn cli_status(&self) -> Value {
        // Nothing but the JSON on stdout, and nothing on stderr when it succeeds.
        let out = run_ok(self.xlb(&["status", "--json"]), "xlb status --json");
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("xlb status --json is not JSON ({e}): {out}"))
    }

    /// The backends of the (only) service in config order, from a status document.
    fn backends_of(&self, status: &Value) -> Vec<BackendView> {
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

    fn view(&self) -> Vec<BackendView> {
        self.backends_of(&self.status())
    }

    fn live(&self) -> Vec<u64> {
        self.view().iter().map(|b| b.live).collect()
    }

    fn totals(&self) -> Vec<u64> {
        self.view().iter().map(|b| b.total).collect()
    }

    /// Calls `f` every 20 ms until it returns `Ok`; returns that and how long it took. Panics
    /// after `timeout` with the last `Err`, which should say what was seen instead.
    fn poll<T>(
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

    /// One new connection through the VIP: `GET /` (HTTP/1.0, closed by the server), returning
    /// the index of the backend that answered.
    fn get(&self) -> usize {
        let vip = self.vip;
        let response = self
            .topo
            .in_client(|| http_get(vip, "/", IO_TIMEOUT))
            .unwrap_or_else(|e| panic!("GET http://{vip}/ from the client namespace: {e}"));
        assert_eq!(response.status, 200, "{response:?}");
        app_index(&response.body)
    }

    /// `n` new short connections, one after the other; how many each backend answered.
    fn spread(&self, n: usize) -> [usize; BACKENDS] {
        let mut served = [0; BACKENDS];
        for _ in 0..n {
            served[self.get()] += 1;
        }
        served
    }

    /// A new connection through the VIP that stays open after one keep-alive request.
    fn hold(&self) -> Held {
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
    fn ss_live(&self) -> Vec<u64> {
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
            if peer.ip() == self.vip.ip() {
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
    fn raw_conns(&self, slot: u32) -> (i64, u64) {
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
    fn assert_live_stable(&self, expected: &[u64], until: Instant) {
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
    fn set_raw_live(&self, slot: u32, live: i64) {
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
    fn spoofed_syn(&self, src: SocketAddrV4) {
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

    fn xdp_attached(&self) -> bool {
        xdp_attached(&self.topo)
    }

    /// Stops the daemon (it must exit 0), detaches xlb, and checks that nothing is left.
    fn finish(mut self) {
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

/// A connection through the VIP kept open between keep-alive requests.
struct Held {
    stream: TcpStream,
    /// Index of the backend that answered the first request.
    backend: usize,
}

impl Held {
    /// `GET /` (HTTP/1.1, keep-alive) on this connection; the index of the backend answering.
    fn request(&mut self) -> usize {
        let peer = self.stream.peer_addr().expect("connected");
        self.stream
            .write_all(format!("GET / HTTP/1.1\r\nHost: {peer}\r\n\r\n").as_bytes())
            .unwrap_or_else(|e| panic!("sending a request on a held connection to {peer}: {e}"));
        let body = read_response(&self.stream)
            .unwrap_or_else(|e| panic!("reading on a held connection to {peer}: {e}"));
        app_index(&body)
    }

    fn local_port(&self) -> u16 {
        self.stream.local_addr().unwrap().port()
    }

    /// Closes with an RST instead of a FIN (SO_LINGER 0).
    fn reset(self) {
        SockRef::from(&self.stream)
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER 0");
    }
}

/// Reads one keep-alive response (Content-Length framed); returns its body.
fn read_response(stream: &TcpStream) -> std::io::Result<String> {
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
fn app_index(body: &str) -> usize {
    body.trim()
        .strip_prefix("served by app-")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| (1..=BACKENDS).contains(n))
        .map(|n| n - 1)
        .unwrap_or_else(|| panic!("unexpected body {body:?}"))
}

/// Runs a command that must finish within `COMMAND_TIMEOUT`, owned by a `Proc` (killed if
/// the test fails first); its exit status and output (stdout and stderr, interleaved).
fn run(cmd: Command, label: &str) -> (ExitStatus, String) {
    Proc::spawn(cmd, label).wait_with_output(COMMAND_TIMEOUT)
}

/// `run`, asserting that the command succeeds; its output.
fn run_ok(cmd: Command, label: &str) -> String {
    let (status, output) = run(cmd, label);
    assert!(status.success(), "{label} failed ({status}): {output}");
    output
}

fn link_show(topo: &Topology) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", &topo.lb_ns, "link", "show", &topo.lb_if]);
    run_ok(cmd, "ip link show")
}

/// Whether the lb end of the veth has an XDP program (native `xdp` or generic `xdpgeneric`).
fn xdp_attached(topo: &Topology) -> bool {
    link_show(topo).contains("xdp")
}

/// An IPv4 TCP SYN with correct IP and TCP checksums and no options.
fn syn_packet(src: SocketAddrV4, dst: SocketAddrV4, seq: u32) -> [u8; 40] {
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
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

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
    spread_evenly("spread", Family::V4);
}

#[test]
fn spread_over_ipv6() {
    spread_evenly("spread6", Family::V6);
}

/// nginx's upstream_least_conn.t: a backend holding connections gets no new ones while the
/// others are idle.
#[test]
fn held_connections_steer_new_ones_elsewhere() {
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
    let (_, took) = lb.poll(RECONCILE_DEADLINE, "live counts [2, 0, 0]", |lb| {
        let live = lb.live();
        let ss = lb.ss_live();
        (live == [2, 0, 0] && ss == [2, 0, 0])
            .then_some(())
            .ok_or_else(|| format!("status {live:?}, ss {ss:?}"))
    });
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
    lb.poll(RECONCILE_DEADLINE, "live counts [4, 4, 4]", |lb| {
        let live = lb.live();
        let ss = lb.ss_live();
        (live == [4, 4, 4] && ss == [4, 4, 4])
            .then_some(())
            .ok_or_else(|| format!("status {live:?}, ss {ss:?}"))
    });
    drop(refill);
    drop(held);
    lb.finish();
}

#[test]
fn live_counts_match_the_socket_table_after_chaos() {
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
    let (_, took) = lb.poll(
        RECONCILE_DEADLINE,
        "5 live connections per backend before the chaos",
        |lb| {
            let (live, ss) = (lb.live(), lb.ss_live());
            (live == [5, 5, 5] && ss == [5, 5, 5])
                .then_some(())
                .ok_or_else(|| format!("status {live:?}, ss {ss:?}"))
        },
    );
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
    let lb = Lb::prepare("badattach", Family::V4);
    lb.write_config(&["xlb0", "lo"], "native");
    run_ok(lb.xlb(&["check"]), "xlb check");
    assert_start_fails_cleanly(&lb, "attaching XDP to lo");
}

/// A daemon that cannot serve its admin API (the address is taken) fails without leaving a
/// data path behind that nobody manages.
#[test]
fn admin_address_in_use_attaches_nothing() {
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

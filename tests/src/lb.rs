//! `Lb`, the scenario tests' usual world: a topology with three demo backends, a config and
//! the daemon, and what the tests ask of it (the status, the socket table, the pinned maps).
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{
    Proc, Topology, demo_backend_bin, http_get, xlb_bin,
    config::{Health, Service, XlbConfig},
    cmd::{link_show, run_ok, xdp_attached},
    load::{Held, app_index},
    syn::syn_packet,
};

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

/// The harness's health probes: `GET /health` every `interval`, `RISE` and `FALL`.
pub fn probes(interval: Duration, timeout: Duration) -> Health {
    Health::http("/health").interval(interval).timeout(timeout).rise(RISE).fall(FALL)
}

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

    /// The harness's config: the data path on the lb end of the veth (`xdp_mode = "auto"`), the
    /// admin API on `ADMIN`, and service `web` (`Lb::web`).
    pub fn config(&self) -> XlbConfig {
        XlbConfig::new([&self.topo.lb_if], &self.topo.pin_path)
            .xdp_mode("auto")
            .admin(ADMIN)
            .service(self.web())
    }

    /// Service `web`: L4 on the VIP over every backend, probed by `probes(HEALTH_INTERVAL,
    /// HEALTH_TIMEOUT)`.
    pub fn web(&self) -> Service {
        Service::l4("web", self.vip)
            .backends(&self.backends)
            .health(probes(HEALTH_INTERVAL, HEALTH_TIMEOUT))
    }

    /// Writes `config` as the daemon's config file.
    pub fn write(&self, config: &XlbConfig) {
        config.write(&self.config);
    }

    /// The harness's config on other interfaces or in another XDP mode.
    pub fn write_config(&self, interfaces: &[&str], xdp_mode: &str) {
        self.write(&self.config().interfaces(interfaces).xdp_mode(xdp_mode));
    }

    /// Starts `app-<i+1>` on its port and waits until it listens.
    pub fn spawn_app(&self, i: usize) -> Proc {
        self.spawn_app_with(i, &[])
    }

    /// `spawn_app` with more arguments for the demo backend (e.g. `--log-requests`).
    pub fn spawn_app_with(&self, i: usize, extra: &[&str]) -> Proc {
        let addr = self.backends[i].to_string();
        let name = format!("app-{}", i + 1);
        let mut args = vec!["--listen", &addr, "--name", &name];
        args.extend(extra);
        let app = self.topo.spawn_lb(demo_backend_bin(), &args);
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
                        other => eprintln!("xlb-tests: xlb detach: {other:?}"),
                    }
                }
                Err(e) => eprintln!("xlb-tests: running xlb detach: {e}"),
            }
        }
        crate::remove_tree(&self.dir);
        // Then the backends (Proc drops) and the topology (namespaces, leftover pins).
    }
}

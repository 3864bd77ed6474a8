//! The systems under test besides xlb (backends, nginx, HAProxy), their provisioning, and the
//! XDP program on the lb interface.
use std::{
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use xlb_tests::{
    NoopXdp, Proc, Topology,
    config::{Health, Service, Tls, XlbConfig},
    http_get, wait_until,
};

use super::{Arm, BACKEND_PORTS, DIRECT_PORT, Tax, target};
use crate::{find_in_path, run};

const ADMIN: &str = "127.0.0.1:9100";
/// Debian packages of the peers: (package, binary that shows it is installed).
const PACKAGES: &[(&str, &str)] = &[
    ("nginx-light", "nginx"),
    ("haproxy", "haproxy"),
    ("wrk", "wrk"),
    // `perf stat`: system calls and context switches per request of the HTTPS servers.
    ("linux-perf", "perf"),
];
/// Debian starts a service on install unless this says no (exit 101: "action forbidden").
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Installs nginx, haproxy and wrk when missing, without letting Debian start the system's own
/// nginx and haproxy services: the bench runs its own instances, with their own config and pid
/// files, inside its namespace.
pub fn provision() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, bin)| find_in_path(bin).is_none())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        println!("bench: nginx, haproxy, wrk: ok");
        return Ok(());
    }
    if find_in_path("apt-get").is_none() {
        bail!(
            "missing {}, and no apt-get here: install them by hand",
            missing.join(" ")
        );
    }
    // Only ours if there was none: a machine's own policy stays as it is.
    let policy = (!Path::new(POLICY_RC_D).exists())
        .then(PolicyGuard::install)
        .transpose()?;
    let apt = || {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run(apt().args(["update", "-q"]))?;
    let install = |packages: &[&str]| {
        run(apt()
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages))
    };
    if install(&missing).is_err() && missing.contains(&"nginx-light") {
        // Newer Debian and Ubuntu have no nginx-light; plain nginx is the same binary.
        let others: Vec<&str> = missing
            .iter()
            .map(|p| if *p == "nginx-light" { "nginx" } else { p })
            .collect();
        install(&others)?;
    }
    drop(policy);
    // Should a service have started all the same (a policy-rc.d we did not write allowing
    // it), stop it, and keep systemd from starting it at boot: this machine did not ask for it.
    if Path::new("/run/systemd/system").exists() {
        for unit in ["nginx", "haproxy"] {
            let _ = Command::new("systemctl")
                .args(["disable", "--now", unit])
                .status();
        }
    }
    Ok(())
}

struct PolicyGuard;

impl PolicyGuard {
    fn install() -> anyhow::Result<PolicyGuard> {
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# cargo xtask bench: no service starts while it installs.\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))?;
        Ok(PolicyGuard)
    }
}

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(POLICY_RC_D);
    }
}

/// Config files, pid files and logs of this run, in a directory removed on drop.
pub struct TempFiles {
    pub dir: PathBuf,
}

impl TempFiles {
    pub fn new() -> anyhow::Result<TempFiles> {
        let dir = std::env::temp_dir().join(format!("xlb-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempFiles { dir })
    }

    fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    pub fn write_xlb_config(
        &self,
        topology: &Topology,
        cert: &super::tls::Cert,
    ) -> anyhow::Result<PathBuf> {
        let health = Health::tcp().interval(Duration::from_secs(1)).timeout(Duration::from_millis(500));
        let config = XlbConfig::new([&topology.lb_if], &topology.pin_path)
            .xdp_mode("native")
            .admin(ADMIN)
            .service(
                Service::l4("bench", target(topology, arm("C")))
                    .backends(backends(topology, |a| a))
                    .health(health.clone()),
            )
            .service(
                Service::https("bench-https", target(topology, super::tls_arm("E")))
                    .backends(backends(topology, |a| a))
                    .tls(Tls::files(&cert.cert, &cert.key))
                    .health(health),
            );
        let text = format!("# Written by `cargo xtask bench`; removed when it ends.\n{}", config.render());
        self.write("xlb.toml", &text)
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn arm(id: &str) -> &'static Arm {
    super::ARMS
        .iter()
        .find(|a| a.id == id)
        .expect("a known arm")
}

fn backends(topology: &Topology, f: impl Fn(String) -> String) -> Vec<String> {
    BACKEND_PORTS
        .iter()
        .map(|p| f(format!("{}:{p}", topology.lb_v4)))
        .collect()
}

/// Namespace-local settings, the same for every arm. Short connections (`Connection: close`
/// at thousands per second) would otherwise run through the default 28 000 ephemeral ports in
/// seconds: the range is widened (starting above every port the bench listens on), and the
/// load generator may reuse its own TIME_WAIT ports (`tcp_tw_reuse`, the usual load-generator
/// setting). Without it wrk, which closes first when HAProxy forwards the backend's FIN a
/// moment after the response, piled up TIME_WAIT sockets until every connect() searched the
/// whole port range: HAProxy's new connections fell from 7 000/s to 300/s in the round after
/// another. The system under test keeps the kernel's defaults.
pub fn tune(topology: &Topology) -> anyhow::Result<()> {
    let ports = "net.ipv4.ip_local_port_range=10000 65535";
    run(topology.lb("sysctl").args(["-q", "-w", ports]))?;
    run(topology
        .client("sysctl")
        .args(["-q", "-w", ports, "net.ipv4.tcp_tw_reuse=1"]))?;
    Ok(())
}

/// `program args` in the lb namespace on CPU 0, in a process group of its own (Ctrl-C reaches
/// only xtask, which stops everything in order), tracked by the topology for cleanup.
fn spawn_sut(topology: &Topology, program: &Path, args: &[&str], label: &str) -> Proc {
    let mut cmd = topology.lb("taskset");
    cmd.args(["-c", "0"])
        .arg(program)
        .args(args)
        .process_group(0);
    topology.spawn(cmd, label)
}

/// The three backends, on CPU 0 like everything under test; the first also listens on the
/// direct arm's port (see `DIRECT_PORT`).
pub fn start_backends(topology: &Topology, backend: &Path) -> Vec<Proc> {
    let procs: Vec<Proc> = backends(topology, |a| a)
        .into_iter()
        .enumerate()
        .map(|(i, mut listen)| {
            if i == 0 {
                listen += &format!(",{}:{DIRECT_PORT}", topology.lb_v4);
            }
            let name = format!("app-{}", i + 1);
            spawn_sut(
                topology,
                backend,
                &["--listen", &listen, "--name", &name],
                &name,
            )
        })
        .collect();
    for p in &procs {
        p.wait_for_output("listening on", Duration::from_secs(10));
    }
    procs
}

/// nginx (arm B) and HAProxy (arm B2), each with its own config, pid file and logs in `files`,
/// in the foreground so that they are our children.
pub fn start_proxies(
    topology: &Topology,
    files: &TempFiles,
    cert: &super::tls::Cert,
) -> anyhow::Result<Vec<Proc>> {
    let dir = files.dir.display().to_string();
    let servers = backends(topology, |a| format!("        server {a};")).join("\n");
    let nginx = files.write(
        "nginx.conf",
        &format!(
            r#"# Written by `cargo xtask bench`; removed when it ends.
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;
    upstream backends {{
        least_conn;
{servers}
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen};
        # Like the other arms, never closes a client's keep-alive connection (default: 1000).
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#,
            listen = target(topology, arm("B")),
        ),
    )?;
    let servers: String = backends(topology, |a| a)
        .iter()
        .enumerate()
        .map(|(i, a)| format!("    server app-{} {a}\n", i + 1))
        .collect();
    let haproxy = files.write(
        "haproxy.cfg",
        &format!(
            r#"# Written by `cargo xtask bench`; removed when it ends.
global
    nbthread 1
    maxconn 4096
    pidfile {dir}/haproxy.pid

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend bench
    bind {listen}
    default_backend apps

backend apps
    balance leastconn
{servers}"#,
            listen = target(topology, arm("B2")),
        ),
    )?;
    let nginx_tls = files.write(
        "nginx-tls.conf",
        &super::tls::nginx_config(
            files,
            cert,
            &target(topology, super::tls_arm("D")).to_string(),
            &backends(topology, |a| format!("        server {a};")).join("\n"),
        ),
    )?;
    let nginx_bin = find_in_path("nginx").context("nginx not installed")?;
    let haproxy_bin = find_in_path("haproxy").context("haproxy not installed")?;
    let procs = vec![
        spawn_sut(
            topology,
            &nginx_bin,
            &[
                "-p",
                &dir,
                "-e",
                &format!("{dir}/nginx-error.log"),
                "-c",
                &path(&nginx),
            ],
            "nginx",
        ),
        spawn_sut(
            topology,
            &nginx_bin,
            &[
                "-p",
                &dir,
                "-e",
                &format!("{dir}/nginx-tls-error.log"),
                "-c",
                &path(&nginx_tls),
            ],
            "nginx (TLS)",
        ),
        // -db: foreground, no daemon.
        spawn_sut(
            topology,
            &haproxy_bin,
            &["-db", "-f", &path(&haproxy)],
            "haproxy",
        ),
    ];
    for (p, arm) in procs.iter().zip([arm("B"), super::tls_arm("D"), arm("B2")]) {
        let addr = target(topology, arm);
        wait_until(
            Duration::from_secs(10),
            &format!("{} on {addr}", p.label()),
            || {
                assert!(p.is_running(), "{} exited:\n{}", p.label(), p.output());
                topology.in_client(|| std::net::TcpStream::connect(addr).is_ok())
            },
        );
    }
    Ok(procs)
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// One request from the client namespace: the arm answers with a backend's page.
pub fn check_answers(topology: &Topology, arm: &Arm) -> anyhow::Result<()> {
    let addr = target(topology, arm);
    let response = topology
        .in_client(|| http_get(addr, "/", Duration::from_secs(2)))
        .with_context(|| format!("arm {}: GET http://{addr}/", arm.id))?;
    if response.status != 200 || !response.body.starts_with("served by") {
        bail!("arm {}: GET http://{addr}/ answered {response:?}", arm.id);
    }
    Ok(())
}

/// The XDP program on the lb interface: exactly one of the no-op program (arms that bypass
/// xlb) and xlb's own (the xlb arm), swapped as the arms take turns.
///
/// xlb is not left attached during the other arms: its TC egress program would then also run
/// on every reply of theirs, and the "XDP tax" would stop meaning one no-op XDP program
/// (BENCHMARKS.md). So the daemon runs only for xlb's turn: started, and afterwards stopped
/// with SIGTERM and removed with `xlb detach` (which also empties its conntrack, so every round
/// of xlb starts from the same state).
pub struct Xdp<'a> {
    topology: &'a Topology,
    xlb: &'a Path,
    config: &'a Path,
    noop: Option<NoopXdp>,
    daemon: Option<Proc>,
}

impl<'a> Xdp<'a> {
    pub fn new(topology: &'a Topology, xlb: &'a Path, config: &'a Path) -> Xdp<'a> {
        Xdp {
            topology,
            xlb,
            config,
            noop: None,
            daemon: None,
        }
    }

    pub fn set(&mut self, tax: Tax) -> anyhow::Result<()> {
        match tax {
            Tax::Noop if self.noop.is_none() => {
                self.stop_xlb()?;
                self.noop = Some(self.topology.attach_noop_xdp());
            }
            Tax::Xlb if self.daemon.is_none() => {
                self.noop = None;
                let config = path(self.config);
                let daemon = spawn_sut(
                    self.topology,
                    self.xlb,
                    &["run", "--config", &config],
                    "xlb run",
                );
                daemon.wait_for_output("xlb ready", Duration::from_secs(30));
                self.daemon = Some(daemon);
            }
            _ => {}
        }
        Ok(())
    }

    /// Nothing attached.
    pub fn set_none(&mut self) -> anyhow::Result<()> {
        self.noop = None;
        self.stop_xlb()
    }

    fn stop_xlb(&mut self) -> anyhow::Result<()> {
        let Some(daemon) = self.daemon.take() else {
            return Ok(());
        };
        let status = daemon.terminate();
        if !status.success() {
            bail!(
                "xlb run exited with {status}; its output:\n{}",
                daemon.output()
            );
        }
        self.detach()
    }

    fn detach(&self) -> anyhow::Result<()> {
        let out = self
            .topology
            .lb(self.xlb)
            .arg("detach")
            .arg("--config")
            .arg(self.config)
            .output()
            .context("running xlb detach")?;
        if !out.status.success() {
            bail!(
                "xlb detach failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for Xdp<'_> {
    fn drop(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            drop(daemon); // SIGKILL: on an error path there is no point in waiting.
            if let Err(e) = self.detach() {
                eprintln!("bench: {e}");
            }
        }
    }
}

//! The demo of `cargo xtask run` without arguments: xlb in front of three demo backends, all
//! inside private network namespaces, on both of its paths (an L4 service balanced in the
//! kernel, and an HTTPS service with its HTTP→HTTPS redirect, TLS terminated by the daemon with
//! a certificate made for the run), a burst of client traffic on each, and then a live
//! `xlb status` view. Here rather than in xtask so that a scenario test runs it as users do.
use std::{
    collections::BTreeMap,
    io::Write,
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    Answer, Conn, IO_TIMEOUT, Pki, Proc, Topology, client_config,
    config::{Health, Service, XlbConfig},
    demo_backend_bin, http_get, wait_until, xlb_bin,
};

/// The L4 service's port: plain HTTP, placed and DNATed by the XDP program.
const L4_PORT: u16 = 8080;
/// The HTTPS service's port, and the redirect's, as a site would have them.
const HTTPS_PORT: u16 = 443;
const HTTP_PORT: u16 = 80;
pub const BACKEND_PORTS: [u16; 3] = [8001, 8002, 8003];
/// The site's name, on its certificate; the client sends it as SNI and Host.
pub const SITE: &str = "demo.xlb.test";
const ADMIN: &str = "127.0.0.1:9100";
const L4_REQUESTS: usize = 30;
const HTTPS_REQUESTS: usize = 3;

/// Runs the demo, writing what it shows to `out`, until `done()`; removes everything it
/// created on the way out, also on error or panic. `xlb` and `xlb-demo-backend` must be built.
pub fn run(out: &mut dyn Write, done: &(dyn Fn() -> bool + Sync)) -> anyhow::Result<()> {
    let (xlb, backend) = (xlb_bin(), demo_backend_bin());
    // Declared in this order so that they drop in reverse, also on error or panic: daemon,
    // backends, `xlb detach`, files, topology.
    let topology = Topology::new("demo");
    let files = DemoFiles::write(&topology)?;
    let _detach = Detach { topology: &topology, xlb: &xlb, config: &files.config };
    let backends: Vec<Proc> = BACKEND_PORTS
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let listen = format!("{}:{port}", topology.lb_v4);
            spawn(&topology, &backend, &["--listen", &listen, "--name", &format!("app-{}", i + 1)])
        })
        .collect();
    for b in &backends {
        b.wait_for_output("listening on", Duration::from_secs(10));
    }

    let config_arg = files.config.to_str().context("temporary path is not UTF-8")?;
    let daemon = spawn(&topology, &xlb, &["run", "--config", config_arg]);
    let admin: SocketAddr = ADMIN.parse().unwrap();
    wait_until(Duration::from_secs(20), "the xlb admin API to answer", || {
        assert!(daemon.is_running(), "xlb run exited; its output:\n{}", daemon.output());
        done() || topology.in_lb(|| http_get(admin, "/api/status", Duration::from_secs(1)).is_ok())
    });
    if !done() {
        let lb = topology.lb_v4;
        writeln!(out, "xlb is up, in front of app-1..app-3 on {lb} ports {BACKEND_PORTS:?}:")?;
        writeln!(out, "  l4    http://{lb}:{L4_PORT}/   placed by the XDP program, least live connections")?;
        writeln!(out, "  https https://{SITE}/ ({lb}:{HTTPS_PORT})   TLS terminated by the daemon, certificate made for this run")?;
        writeln!(out, "  redirect http://{lb}:{HTTP_PORT}/   to https\n")?;
        out.write_all(l4_traffic(&topology, done).as_bytes())?;
        out.write_all(https_traffic(&topology, &files.pki.ca_path(), done).as_bytes())?;
        // Time to read the above before the status view clears the screen.
        std::thread::sleep(Duration::from_secs(2));
    }
    while !done() {
        if !daemon.is_running() {
            bail!("xlb run exited; its output:\n{}", daemon.output());
        }
        let status = topology.lb(&xlb).args(["status", "--config", config_arg]).output()?;
        // Clear the screen and home the cursor: a `watch`-style view.
        write!(out, "\x1b[2J\x1b[H")?;
        writeln!(out, "xlb demo: live `xlb status` every second (Ctrl-C to stop and clean up)\n")?;
        out.write_all(&status.stdout)?;
        out.write_all(&status.stderr)?;
        out.flush()?;
        let next = Instant::now() + Duration::from_secs(1);
        while Instant::now() < next && !done() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    writeln!(out, "\nstopping xlb (SIGTERM), then the backends, `xlb detach` and the namespaces")?;
    let status = daemon.terminate();
    if !status.success() {
        bail!("xlb run exited with {status}; its output:\n{}", daemon.output());
    }
    Ok(())
}

/// A burst of one-request connections to the L4 service from the client namespace, each a new
/// flow for the XDP program to place: who served each, and the split.
fn l4_traffic(topology: &Topology, done: &(dyn Fn() -> bool + Sync)) -> String {
    let vip = SocketAddr::from((topology.lb_v4, L4_PORT));
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    let mut text = String::new();
    topology.in_client(|| {
        for i in (1..=L4_REQUESTS).take_while(|_| !done()) {
            let by = match http_get(vip, "/", Duration::from_secs(2)) {
                Ok(r) => r.header("X-Served-By").unwrap_or("(no X-Served-By header)").to_owned(),
                Err(e) => format!("error: {e}"),
            };
            text += &format!("GET http://{vip}/ #{i:<2} → {by}\n");
            *served.entry(by).or_default() += 1;
        }
    });
    let split: Vec<String> = served.iter().map(|(by, n)| format!("{by}: {n}")).collect();
    text += &format!("l4: {} requests: {}\n\n", served.values().sum::<usize>(), split.join(", "));
    text
}

/// HTTPS requests over HTTP/1.1 and HTTP/2, each on a new connection, printing which backend
/// served each (and, for the first of each protocol, the headers the proxy added); then a
/// plain-HTTP request to the redirect.
fn https_traffic(topology: &Topology, ca: &Path, done: &(dyn Fn() -> bool + Sync)) -> String {
    let https = SocketAddr::from((topology.lb_v4, HTTPS_PORT));
    let tls = client_config(ca);
    let mut text = String::new();
    topology.in_client(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        for h2 in [false, true] {
            let proto = if h2 { "HTTP/2" } else { "HTTP/1.1" };
            for i in (1..=HTTPS_REQUESTS).take_while(|_| !done()) {
                let answer = TcpStream::connect_timeout(&https, IO_TIMEOUT)
                    .map_err(|e| format!("connecting to {https}: {e}"))
                    .and_then(|tcp| {
                        rt.block_on(async {
                            let mut conn = Conn::open(tcp, tls.clone(), SITE, h2).await?;
                            conn.send("GET", "/echo", &[], bytes::Bytes::new()).await
                        })
                    });
                text += &format!("GET https://{SITE}/echo {proto} #{i} → ");
                match answer {
                    Ok(answer) => text += &describe(&answer, i == 1),
                    Err(e) => text += &format!("error: {e}\n"),
                }
            }
        }
        let http = SocketAddr::from((topology.lb_v4, HTTP_PORT));
        text += &match http_get(http, "/login?next=/", Duration::from_secs(2)) {
            Ok(r) => format!(
                "GET http://{http}/login?next=/ → {} Location: {}\n",
                r.status,
                r.header("Location").unwrap_or("(no Location header)")
            ),
            Err(e) => format!("GET http://{http}/login?next=/ → error: {e}\n"),
        };
    });
    text
}

/// An HTTPS answer from `/echo`: its status, protocol and `X-Backend-Server`; with `headers`,
/// also the response headers the proxy added and the forwarding headers the backend saw.
fn describe(answer: &Answer, headers: bool) -> String {
    let by = answer.header("x-backend-server").unwrap_or("(no X-Backend-Server header)");
    let mut text = format!("{} {:?}, X-Backend-Server: {by}\n", answer.status, answer.version);
    if !headers {
        return text;
    }
    text += "    added to the response:";
    for name in ["strict-transport-security", "x-frame-options", "x-content-type-options", "referrer-policy"] {
        text += &format!(" {name}: {};", answer.header(name).unwrap_or("(missing)"));
    }
    text += "\n    the backend saw:";
    // The demo backend's `/echo` lists the request's headers as [name, value] pairs.
    let echo = serde_json::from_str::<serde_json::Value>(&answer.body).unwrap_or_default();
    let seen = echo["headers"].as_array().cloned().unwrap_or_default();
    for name in ["x-forwarded-for", "x-real-ip", "x-forwarded-proto", "host"] {
        let values: Vec<&str> = seen
            .iter()
            .filter(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
            .filter_map(|h| h[1].as_str())
            .collect();
        text += &format!(" {name}: {};", if values.is_empty() { "(missing)".into() } else { values.join(", ") });
    }
    text + "\n"
}

/// The demo's config file, CA and certificate, in a directory of their own removed on drop.
struct DemoFiles {
    config: PathBuf,
    pki: Pki,
}

impl DemoFiles {
    fn write(topology: &Topology) -> anyhow::Result<DemoFiles> {
        let dir = std::env::temp_dir().join(format!("xlb-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Pki::new(&dir, &[SITE, &topology.lb_v4.to_string()]);
        pki.install("demo");
        let files = DemoFiles { config: dir.join("xlb.toml"), pki };
        let lb = topology.lb_v4;
        let backends: Vec<String> = BACKEND_PORTS.iter().map(|p| format!("{lb}:{p}")).collect();
        let health = Health::http("/health").interval(Duration::from_secs(1));
        let config = XlbConfig::new([&topology.lb_if], &topology.pin_path)
            .admin(ADMIN)
            .service(Service::l4("demo", format!("{lb}:{L4_PORT}")).backends(&backends).health(health.clone()))
            .service(Service::https("site", format!("{lb}:{HTTPS_PORT}")).backends(&backends).tls(files.pki.tls()).health(health))
            .service(Service::redirect("site-http", format!("{lb}:{HTTP_PORT}")));
        let text = format!("# Written by `cargo xtask run` for its demo; removed when it ends.\n{}", config.render());
        std::fs::write(&files.config, text).with_context(|| format!("writing {}", files.config.display()))?;
        Ok(files)
    }
}

impl Drop for DemoFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pki.dir);
    }
}

/// Runs `xlb detach` when dropped, so the programs come off even when the demo fails half-way
/// (the topology's drop would take the interface away anyway; this exercises the real command).
struct Detach<'a> {
    topology: &'a Topology,
    xlb: &'a Path,
    config: &'a Path,
}

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        match self.topology.lb(self.xlb).arg("detach").arg("--config").arg(self.config).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("xlb detach failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
            Err(e) => eprintln!("running xlb detach: {e}"),
        }
    }
}

/// Like `Topology::spawn_lb`, but in a process group of its own: Ctrl-C then reaches only the
/// demo, which stops everything in order instead of racing the children's own SIGINT handling.
fn spawn(topology: &Topology, program: &Path, args: &[&str]) -> Proc {
    let mut cmd = topology.lb(program);
    cmd.args(args).process_group(0);
    let name = program.file_name().unwrap_or_default().to_string_lossy();
    topology.spawn(cmd, format!("{name} {}", args.join(" ")))
}

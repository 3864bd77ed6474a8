//! The HTTPS arms: nginx terminating TLS 1.3 (D) against xlb's HTTPS listener (E), with the
//! same ECDSA P-256 certificate, the same backends, and each server on CPU 0.
//!
//! - Keep-alive HTTPS requests per second: `wrk` over TLS (OpenSSL, TLS 1.3, HTTP/1.1).
//! - Server CPU per full and per resumed handshake: a handshake client (Python's `ssl`, one
//!   process on CPU 1) opens connections as fast as it can, completes the handshake, takes the
//!   session ticket when resuming, and closes. The server's own CPU time (nginx's processes or
//!   the xlb daemon, from /proc/<pid>/stat) over the run, less its idle rate, divided by the
//!   handshakes done, is the cost. The client is the slower side, which does not matter: what
//!   is compared is CPU time per handshake, not handshakes per second.
//! - Memory: the server's resident set size idle and holding 1,000 idle TLS connections.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use xlb_tests::{Proc, Topology, wait_until};

use super::peers::TempFiles;
use crate::run;

/// The certificate's name; the clients connect by address and send it as SNI.
pub const SERVER_NAME: &str = "bench.xlb.test";
/// Idle TLS connections held for the memory measurement.
pub const HELD: u32 = 1000;

pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// An ECDSA P-256 certificate for `SERVER_NAME` and the lb address, made with `openssl`.
pub fn make_cert(files: &TempFiles, topology: &Topology) -> anyhow::Result<Cert> {
    let cert = files.dir.join("bench.crt");
    let key = files.dir.join("bench.key");
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-nodes", "-days", "7", "-subj", &format!("/CN={SERVER_NAME}")])
        .arg("-addext")
        .arg(format!("subjectAltName=DNS:{SERVER_NAME},IP:{}", topology.lb_v4))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert))
    .context("making the bench certificate with openssl")?;
    Ok(Cert { cert, key })
}

/// The handshake and connection-holding client, run by `python3` from the client namespace.
const CLIENT: &str = r#"
import resource, select, socket, ssl, sys, time
mode, host, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
NAME = "bench.xlb.test"

def handshake(session):
    s = socket.create_connection((host, port), timeout=5)
    t = ctx.wrap_socket(s, server_hostname=NAME, session=session)
    if mode == "resumed":
        # TLS 1.3 tickets follow the handshake: wait for them, read them, no request.
        select.select([t], [], [], 1.0)
        t.setblocking(False)
        try:
            t.recv(1)
        except ssl.SSLWantReadError:
            pass
    reused, session = t.session_reused, t.session
    t.close()
    return session, reused

if mode in ("full", "resumed"):
    n = reused = errors = 0
    session = None
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            s, r = handshake(session if mode == "resumed" else None)
            n += 1
            reused += r
            session = s
        except Exception as e:
            errors += 1
            session = None
    print(f"handshakes {n} resumed {reused} errors {errors}", flush=True)
elif mode == "hold":
    count = int(sys.argv[5])
    resource.setrlimit(resource.RLIMIT_NOFILE, (count + 100, count + 100))
    held = []
    for _ in range(count):
        s = socket.create_connection((host, port), timeout=5)
        held.append(ctx.wrap_socket(s, server_hostname=NAME))
    print(f"holding {len(held)}", flush=True)
    time.sleep(seconds)
"#;

pub fn write_client(files: &TempFiles) -> anyhow::Result<PathBuf> {
    let path = files.dir.join("tls_client.py");
    std::fs::write(&path, CLIENT).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// What the handshake client reported.
#[derive(Debug, PartialEq)]
pub struct Handshakes {
    pub done: u64,
    pub resumed: u64,
    pub errors: u64,
}

pub fn parse_handshakes(out: &str) -> Option<Handshakes> {
    let line = out.lines().find(|l| l.starts_with("handshakes "))?;
    let w: Vec<&str> = line.split_whitespace().collect();
    Some(Handshakes {
        done: w.get(1)?.parse().ok()?,
        resumed: w.get(3)?.parse().ok()?,
        errors: w.get(5)?.parse().ok()?,
    })
}

/// The handshake client on CPU 1 in `mode` ("full" or "resumed") for `seconds`.
pub fn handshake_command(
    topology: &Topology,
    client: &Path,
    port: u16,
    mode: &str,
    seconds: u64,
) -> Command {
    let mut cmd = topology.client("taskset");
    cmd.args(["-c", "1", "python3"])
        .arg(client)
        .args([mode, &topology.lb_v4.to_string(), &port.to_string(), &seconds.to_string()]);
    cmd
}

/// Holds `HELD` idle TLS connections to `port` until dropped.
pub fn hold(topology: &Topology, client: &Path, port: u16) -> anyhow::Result<Proc> {
    let mut cmd = topology.client("taskset");
    cmd.args(["-c", "1", "python3"]).arg(client).args([
        "hold",
        &topology.lb_v4.to_string(),
        &port.to_string(),
        "120",
        &HELD.to_string(),
    ]);
    let proc = topology.spawn(cmd, "tls holder");
    wait_until(Duration::from_secs(60), "1,000 TLS connections held", || {
        if !proc.is_running() {
            return true;
        }
        proc.output().contains("holding ")
    });
    if !proc.is_running() {
        bail!("the TLS connection holder exited:\n{}", proc.output());
    }
    Ok(proc)
}

/// Resident set size in KiB of `pids` together.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// The nginx of arm D: one worker, TLS 1.3 only, session tickets and a session cache (nginx's
/// usual production settings), proxying to the backends like arm B.
pub fn nginx_config(files: &TempFiles, cert: &Cert, listen: &str, servers: &str) -> String {
    let dir = files.dir.display();
    format!(
        r#"# Written by `cargo xtask bench`; removed when it ends.
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx-tls.pid;
error_log {dir}/nginx-tls-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-tls-body;
    proxy_temp_path {dir}/nginx-tls-proxy;
    upstream backends {{
        least_conn;
{servers}
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#,
        cert = cert.cert.display(),
        key = cert.key.display(),
    )
}

/// The pids of processes named `comm` in the lb namespace.
pub fn pids_named(topology: &Topology, comm: &str) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(lb_ns) = std::fs::metadata(format!("/run/netns/{}", topology.lb_ns)).map(|m| m.ino())
    else {
        return Vec::new();
    };
    let ns_link = format!("net:[{lb_ns}]");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|l| l.to_string_lossy() == ns_link)
        })
        .collect()
}

/// One request over HTTPS from the client namespace: the arm answers with a backend's page.
pub fn check_answers(topology: &Topology, arm: &super::Arm) -> anyhow::Result<()> {
    let url = format!("https://{}:{}/", topology.lb_v4, arm.port);
    let out = topology
        .client("curl")
        .args(["-sS", "-k", "--max-time", "5", "--tlsv1.3", &url])
        .output()
        .context("running curl")?;
    let body = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !body.starts_with("served by") {
        bail!(
            "arm {}: GET {url} answered {body:?} ({}: {})",
            arm.id,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// An HTTPS arm's server: its memory idle and holding `HELD` TLS connections, and its CPU use
/// while idle (health checks, the reconcile; subtracted from the handshake runs).
#[derive(Clone, Debug)]
pub struct Memory {
    pub arm: &'static str,
    pub idle_kib: u64,
    pub held_kib: u64,
    /// Fraction of one CPU.
    pub idle_busy: f64,
}

pub fn memory(topology: &Topology, client: &Path, arm: &super::Arm) -> anyhow::Result<Memory> {
    let comm = match arm.tax {
        super::Tax::Xlb => "xlb",
        super::Tax::Noop => "nginx",
    };
    let pids = pids_named(topology, comm);
    if pids.is_empty() {
        bail!("arm {}: no {comm} process in the lb namespace", arm.id);
    }
    // Settle, then idle CPU over a few seconds.
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu_ticks(&pids);
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let idle_busy = (cpu_ticks(&pids) - ticks) as f64 / super::measure::clock_ticks() / t0.elapsed().as_secs_f64();
    let idle_kib = rss_kib(&pids);
    let holder = hold(topology, client, arm.port)?;
    std::thread::sleep(Duration::from_secs(2));
    let held_kib = rss_kib(&pids);
    drop(holder);
    Ok(Memory { arm: arm.id, idle_kib, held_kib, idle_busy })
}

/// utime + stime of `pids`, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            let f: Vec<&str> = rest.split_whitespace().collect();
            // Fields 14 and 15 of stat(5), counted from the state field (3).
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_handshake_client() {
        assert_eq!(
            parse_handshakes("handshakes 857 resumed 0 errors 2\n"),
            Some(Handshakes { done: 857, resumed: 0, errors: 2 })
        );
        assert_eq!(parse_handshakes("Traceback ..."), None);
    }
}

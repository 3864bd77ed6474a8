//! The measurements: wrk (closed loop, maximum rate), the fixed-rate client (latency), CPU
//! time from /proc/stat, and xlb's program cost from its `BPF_PROG_TEST_RUN` report.
use std::{
    collections::HashMap,
    os::unix::process::CommandExt as _,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use xlb_tests::Topology;

use super::{Arm, Bins, CONNECTIONS, Mode, report::thousands, target};

/// One measured run of one arm.
#[derive(Clone, Debug)]
pub struct Run {
    pub round: usize,
    pub arm: &'static str,
    pub mode: Mode,
    pub requests: u64,
    pub seconds: f64,
    /// Requests per second (wrk's count; for the fixed-rate client, the achieved rate).
    pub rps: f64,
    /// Socket errors + non-2xx answers (wrk), or failed and unfinished requests (fixed rate).
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Only the fixed-rate client reports it.
    pub p999_us: Option<f64>,
    /// Busy CPU time of the whole machine (both CPUs: system under test and load generator)
    /// per request.
    pub cpu_us_per_req: f64,
    /// Busy fraction of CPU 0 (system under test) and CPU 1 (load generator): which one was
    /// the bottleneck.
    pub cpu0_busy: f64,
    pub cpu1_busy: f64,
    /// CPU time of processes outside the bench (another build, say), as a fraction of the
    /// machine: noise this run suffered (a lower bound, see `Namespaces::others`).
    pub other_busy: f64,
    /// SYNs retransmitted (both namespaces): each is a connection that waited a second or more.
    pub syn_retrans: u64,
    /// CPU time of the xlb daemon, as a fraction of one CPU (its own, CPU 0).
    pub xlb_busy: f64,
    /// CPU time of nginx (master and workers of every nginx), as a fraction of one CPU.
    pub nginx_busy: f64,
    /// Wall time the CPU figures cover (from /proc/stat), seconds.
    pub elapsed: f64,
    /// xlb's XDP and TC programs: average ns per packet in this run, from the kernel's BPF
    /// run-time statistics (`bpftool prog show`: run_time_ns / run_cnt).
    pub xdp_ns: Option<f64>,
    pub tc_ns: Option<f64>,
}

/// `run_time_ns` and `run_cnt` of one program.
#[derive(Clone, Copy, Default)]
pub struct RunTime {
    ns: u64,
    count: u64,
}

impl RunTime {
    fn ns_per_run(&self, before: &RunTime) -> Option<f64> {
        let count = self.count.checked_sub(before.count).filter(|&c| c > 0)?;
        Some(self.ns.saturating_sub(before.ns) as f64 / count as f64)
    }
}

/// The run-time statistics of xlb's pinned programs.
pub struct ProgramStats {
    xdp: RunTime,
    tc: RunTime,
}

impl ProgramStats {
    pub fn read(topology: &Topology) -> ProgramStats {
        let one = |pin: &str| -> RunTime {
            let path = topology.pin_path.join(pin);
            let Ok(out) = Command::new("bpftool")
                .args(["-j", "prog", "show", "pinned"])
                .arg(&path)
                .output()
            else {
                return RunTime::default();
            };
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            RunTime {
                ns: v["run_time_ns"].as_u64().unwrap_or(0),
                count: v["run_cnt"].as_u64().unwrap_or(0),
            }
        };
        ProgramStats {
            xdp: one("prog_xdp"),
            tc: one("prog_tc_egress"),
        }
    }
}

/// Turns on the kernel's BPF run-time statistics (`kernel.bpf_stats_enabled`) while alive,
/// restoring the previous setting after. They cost two clock reads per program run, the same
/// for every xlb run; the no-op program of the other arms pays them too.
pub struct BpfStats(Option<String>);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> BpfStats {
        let previous = std::fs::read_to_string(BPF_STATS).ok();
        if std::fs::write(BPF_STATS, "1").is_err() {
            eprintln!("bench: could not enable {BPF_STATS}: no per-program run times");
        }
        BpfStats(previous)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(previous) = &self.0 {
            let _ = std::fs::write(BPF_STATS, previous.trim());
        }
    }
}

impl Run {
    /// µs of the serving process's CPU time per request or handshake: the xlb daemon for xlb's
    /// arms, nginx for nginx's.
    pub fn server_us_per_op(&self) -> f64 {
        let busy = match self.arm {
            "C" | "E" => self.xlb_busy,
            _ => self.nginx_busy,
        };
        busy * self.elapsed * 1e6 / (self.requests.max(1) as f64)
    }
}

impl Run {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{:>9} req/s  cpu {:>5.1} µs/req  cpu0 {:>3.0} %  cpu1 {:>3.0} %",
            thousands(self.rps),
            self.cpu_us_per_req,
            self.cpu0_busy * 100.0,
            self.cpu1_busy * 100.0
        );
        if let Some(p999) = self.p999_us {
            s += &format!(
                "  p50 {:.0} µs  p99 {:.0} µs  p99.9 {:.0} µs",
                self.p50_us, self.p99_us, p999
            );
        }
        if self.errors > 0 {
            s += &format!("  ERRORS {}", self.errors);
        }
        if self.xlb_busy > 0.0 {
            s += &format!("  xlb daemon {:.0} % of cpu0", self.xlb_busy * 100.0);
        }
        if self.syn_retrans > 0 {
            s += &format!("  SYN retransmits {}", self.syn_retrans);
        }
        if self.other_busy > OTHERS_NOTED {
            s += &format!(
                "  (other processes: {:.0} % of the machine)",
                self.other_busy * 100.0
            );
        }
        s
    }
}

/// Other processes' CPU share above which a run is flagged as disturbed.
pub const OTHERS_NOTED: f64 = 0.05;

/// `wrk -t1 -c32 -d<seconds>s --latency` from the client namespace on CPU 1.
pub fn wrk(
    topology: &Topology,
    arm: &Arm,
    mode: Mode,
    seconds: u64,
    stop: &AtomicBool,
) -> anyhow::Result<Run> {
    let mut cmd = topology.client("taskset");
    cmd.args(["-c", "1", "wrk", "-t1"])
        .arg(format!("-c{CONNECTIONS}"))
        .arg(format!("-d{seconds}s"))
        .arg("--latency");
    if mode == Mode::NewConn {
        cmd.args(["-H", "Connection: close"]);
    }
    let scheme = if mode == Mode::TlsKeepAlive { "https" } else { "http" };
    cmd.arg(format!("{scheme}://{}/", target(topology, arm)));
    // xlb's programs' own run time in this traffic (kernel.bpf_stats_enabled, set by `run`).
    let programs = arm.tax == super::Tax::Xlb && mode != Mode::TlsKeepAlive;
    let before = programs.then(|| ProgramStats::read(topology));
    let (out, cpu) = measured(topology, cmd, "wrk", seconds, stop)?;
    let parsed = parse_wrk(&out).with_context(|| format!("unexpected wrk output:\n{out}"))?;
    let mut run = cpu.run(arm, mode, parsed);
    if let Some(before) = before {
        let after = ProgramStats::read(topology);
        run.xdp_ns = after.xdp.ns_per_run(&before.xdp);
        run.tc_ns = after.tc.ns_per_run(&before.tc);
    }
    Ok(run)
}

/// The open-loop client (`xlb-rate-client`) at `rate` req/s over 32 keep-alive connections.
pub fn fixed_rate(
    topology: &Topology,
    bins: &Bins,
    arm: &Arm,
    rate: f64,
    seconds: u64,
    stop: &AtomicBool,
) -> anyhow::Result<Run> {
    let mut cmd = topology.client("taskset");
    cmd.args(["-c", "1"])
        .arg(&bins.rate_client)
        .arg("--target")
        .arg(target(topology, arm).to_string())
        .arg("--rate")
        .arg(rate.to_string())
        .arg("--connections")
        .arg(CONNECTIONS.to_string())
        .arg("--duration")
        .arg(seconds.to_string());
    let (out, cpu) = measured(topology, cmd, "xlb-rate-client", seconds, stop)?;
    let parsed = parse_rate_client(&out)
        .with_context(|| format!("unexpected xlb-rate-client output:\n{out}"))?;
    Ok(cpu.run(arm, Mode::FixedRate, parsed))
}

/// The TLS handshake client (`tls::CLIENT`) in `mode` (`FullHandshake` or `ResumedHandshake`):
/// one handshake counts as one request.
pub fn handshakes(
    topology: &Topology,
    client: &std::path::Path,
    arm: &Arm,
    mode: Mode,
    seconds: u64,
    stop: &AtomicBool,
) -> anyhow::Result<Run> {
    let which = match mode {
        Mode::FullHandshake => "full",
        Mode::ResumedHandshake => "resumed",
        _ => bail!("{} is not a handshake mode", mode.name()),
    };
    let cmd = super::tls::handshake_command(topology, client, arm.port, which, seconds);
    let (out, cpu) = measured(topology, cmd, "tls client", seconds, stop)?;
    let h = super::tls::parse_handshakes(&out)
        .with_context(|| format!("unexpected TLS client output:\n{out}"))?;
    if mode == Mode::ResumedHandshake && h.resumed * 10 < h.done * 9 {
        bail!(
            "arm {}: only {} of {} handshakes resumed a session: the server does not resume",
            arm.id,
            h.resumed,
            h.done
        );
    }
    let parsed = Parsed {
        requests: h.done,
        seconds: seconds as f64,
        rps: h.done as f64 / seconds as f64,
        errors: h.errors,
        ..Parsed::default()
    };
    Ok(cpu.run(arm, mode, parsed))
}

/// What a load generator reported.
#[derive(Default, Debug, PartialEq)]
struct Parsed {
    requests: u64,
    seconds: f64,
    rps: f64,
    errors: u64,
    p50_us: f64,
    p99_us: f64,
    p999_us: Option<f64>,
}

/// Runs a load generator to completion in its own process group (Ctrl-C reaches only xtask,
/// which then kills it), with /proc/stat read around it. Returns its output.
fn measured(
    topology: &Topology,
    mut cmd: Command,
    label: &str,
    seconds: u64,
    stop: &AtomicBool,
) -> anyhow::Result<(String, CpuDelta)> {
    cmd.process_group(0);
    let deadline = Instant::now() + Duration::from_secs(seconds + 30);
    let ours = Namespaces::of(topology)?;
    let (before, procs_before) = (CpuStat::read()?, ours.processes());
    let syn_before = syn_retransmits(topology);
    let proc = topology.spawn(cmd, label);
    while proc.is_running() {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if Instant::now() > deadline {
            bail!(
                "{label} still running 30 s after its duration; its output:\n{}",
                proc.output()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (after, procs_after) = (CpuStat::read()?, ours.processes());
    let syn_after = syn_retransmits(topology);
    let (status, out) = proc.wait_with_output(Duration::from_secs(5));
    if !status.success() {
        bail!("{label} failed ({status}):\n{out}");
    }
    let mut delta = before.delta(&after);
    delta.others = used(&procs_before, &procs_after, Owner::Other);
    delta.xlb = used(&procs_before, &procs_after, Owner::Xlb);
    delta.nginx = used(&procs_before, &procs_after, Owner::Nginx);
    delta.syn_retrans = syn_after.saturating_sub(syn_before);
    Ok((out, delta))
}

/// `TcpExt: TCPSynRetrans` of both namespaces, added up.
fn syn_retransmits(topology: &Topology) -> u64 {
    let read = || {
        // The calling thread's namespace (`in_lb`/`in_client` move only that thread).
        let text = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default();
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (names, values) = (
            lines.next().unwrap_or_default(),
            lines.next().unwrap_or_default(),
        );
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "TCPSynRetrans")
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    topology.in_lb(read) + topology.in_client(read)
}

/// The bench's two network namespaces: every process in them is ours.
struct Namespaces([u64; 2]);

impl Namespaces {
    fn of(topology: &Topology) -> anyhow::Result<Namespaces> {
        use std::os::unix::fs::MetadataExt as _;
        let inode = |ns: &str| -> anyhow::Result<u64> {
            let path = format!("/run/netns/{ns}");
            Ok(std::fs::metadata(&path)
                .with_context(|| format!("stat {path}"))?
                .ino())
        };
        Ok(Namespaces([
            inode(&topology.lb_ns)?,
            inode(&topology.client_ns)?,
        ]))
    }

    /// CPU jiffies (utime + stime) of every user process, by pid, with whose it is. Kernel
    /// threads (packet processing among them) and xtask itself are left out. Reaped children's
    /// time is left out too (a shell reaping a long build would add all of it at once), so
    /// other processes that start and end within one run are missed: a lower bound.
    fn processes(&self) -> HashMap<u32, (Owner, u64)> {
        const PF_KTHREAD: u64 = 0x0020_0000;
        let me = std::process::id();
        let netns = |pid: u32| {
            let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
            let link = link.to_string_lossy().into_owned();
            link.strip_prefix("net:[")?
                .strip_suffix(']')?
                .parse::<u64>()
                .ok()
        };
        let dirs = std::fs::read_dir("/proc").into_iter().flatten().flatten();
        dirs.filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != me)
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let (name, rest) = stat.rsplit_once(')')?;
                // Fields after the parenthesised name, from field 3 (state) on.
                let fields: Vec<u64> = rest
                    .split_whitespace()
                    .map(|f| f.parse().unwrap_or(0))
                    .collect();
                let at = |n: usize| fields.get(n - 3).copied().unwrap_or(0);
                // flags (9); utime, stime (14, 15).
                if at(9) & PF_KTHREAD != 0 {
                    return None;
                }
                let owner = match netns(pid) {
                    Some(ino) if self.0.contains(&ino) && name.ends_with("(xlb") => Owner::Xlb,
                    Some(ino) if self.0.contains(&ino) && name.ends_with("(nginx") => {
                        Owner::Nginx
                    }
                    Some(ino) if self.0.contains(&ino) => Owner::Bench,
                    _ => Owner::Other,
                };
                Some((pid, (owner, at(14) + at(15))))
            })
            .collect()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The xlb daemon.
    Xlb,
    /// nginx, master and workers.
    Nginx,
    /// Anything else of the bench's (backends, proxies, load generators).
    Bench,
    /// Not ours: noise.
    Other,
}

/// Jiffies `owner`'s processes used between two `Namespaces::processes` snapshots; per
/// process, so that processes exiting meanwhile do not subtract, and new ones count whole.
fn used(
    before: &HashMap<u32, (Owner, u64)>,
    after: &HashMap<u32, (Owner, u64)>,
    owner: Owner,
) -> u64 {
    after
        .iter()
        .filter(|(_, (o, _))| *o == owner)
        .map(|(pid, (_, t))| t.saturating_sub(before.get(pid).map_or(0, |(_, t0)| *t0)))
        .sum()
}

fn parse_wrk(out: &str) -> Option<Parsed> {
    let mut p = Parsed::default();
    let mut have_total = false;
    for line in out.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        if line.contains(" requests in ") {
            // "123456 requests in 10.00s, 15.00MB read"
            p.requests = words.next()?.parse().ok()?;
            p.seconds = duration_us(words.nth(2)?.trim_end_matches(','))? / 1e6;
            have_total = true;
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            p.rps = v.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "Socket errors: connect 0, read 0, write 0, timeout 0"
            p.errors += v
                .split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            p.errors += v.trim().parse::<u64>().ok()?;
        } else if let Some(v) = line.strip_prefix("50%") {
            p.p50_us = duration_us(v.trim())?;
        } else if let Some(v) = line.strip_prefix("99%") {
            p.p99_us = duration_us(v.trim())?;
        }
    }
    (have_total && p.rps > 0.0).then_some(p)
}

/// wrk's durations: "812.00us", "1.23ms", "10.00s", "1.50m".
fn duration_us(s: &str) -> Option<f64> {
    let units = [
        ("us", 1.0),
        ("ms", 1e3),
        ("s", 1e6),
        ("m", 60e6),
        ("h", 3600e6),
    ];
    let (number, scale) = units
        .iter()
        .find_map(|(unit, scale)| Some((s.strip_suffix(unit)?, scale)))?;
    Some(number.parse::<f64>().ok()? * scale)
}

/// `scheduled=N ok=N errors=N rate=R p50_us=X p99_us=X p999_us=X max_us=X`
fn parse_rate_client(out: &str) -> Option<Parsed> {
    let line = out.lines().find(|l| l.starts_with("scheduled="))?;
    let field = |key: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    let requests = field("ok")? as u64;
    let rps = field("rate")?;
    Some(Parsed {
        requests,
        seconds: requests as f64 / rps.max(1e-9),
        rps,
        errors: field("errors")? as u64,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
        p999_us: Some(field("p999_us")?),
    })
}

/// Busy and total jiffies of one CPU line of /proc/stat.
#[derive(Clone, Copy, Default, Debug)]
struct Jiffies {
    busy: u64,
    total: u64,
}

impl Jiffies {
    fn parse(fields: &[u64]) -> Jiffies {
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let at = |i: usize| fields.get(i).copied().unwrap_or(0);
        let busy = at(0) + at(1) + at(2) + at(5) + at(6);
        // Steal is time the hypervisor took: neither our work nor idle, so it is left out.
        Jiffies {
            busy,
            total: busy + at(3) + at(4),
        }
    }
}

struct CpuStat {
    all: Jiffies,
    cpus: Vec<Jiffies>,
}

impl CpuStat {
    fn read() -> anyhow::Result<CpuStat> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let mut stat = CpuStat {
            all: Jiffies::default(),
            cpus: Vec::new(),
        };
        for line in text.lines().filter(|l| l.starts_with("cpu")) {
            let mut words = line.split_whitespace();
            let name = words.next().unwrap_or_default();
            let fields: Vec<u64> = words.filter_map(|w| w.parse().ok()).collect();
            match name {
                "cpu" => stat.all = Jiffies::parse(&fields),
                _ => stat.cpus.push(Jiffies::parse(&fields)),
            }
        }
        Ok(stat)
    }

    fn delta(&self, later: &CpuStat) -> CpuDelta {
        let d = |a: Jiffies, b: Jiffies| Jiffies {
            busy: b.busy.saturating_sub(a.busy),
            total: b.total.saturating_sub(a.total),
        };
        CpuDelta {
            all: d(self.all, later.all),
            cpus: self
                .cpus
                .iter()
                .zip(&later.cpus)
                .map(|(a, b)| d(*a, *b))
                .collect(),
            others: 0,
            xlb: 0,
            nginx: 0,
            syn_retrans: 0,
        }
    }
}

struct CpuDelta {
    all: Jiffies,
    cpus: Vec<Jiffies>,
    /// Jiffies of processes that are not ours (see `Namespaces::others`).
    others: u64,
    /// Jiffies of the xlb daemon.
    xlb: u64,
    /// Jiffies of nginx.
    nginx: u64,
    syn_retrans: u64,
}

impl CpuDelta {
    fn busy_fraction(j: Jiffies) -> f64 {
        j.busy as f64 / (j.total as f64).max(1.0)
    }

    fn run(&self, arm: &Arm, mode: Mode, p: Parsed) -> Run {
        let cpu = |i: usize| {
            self.cpus
                .get(i)
                .map_or(f64::NAN, |j| Self::busy_fraction(*j))
        };
        Run {
            round: 0,
            arm: arm.id,
            mode,
            requests: p.requests,
            seconds: p.seconds,
            rps: p.rps,
            errors: p.errors,
            p50_us: p.p50_us,
            p99_us: p.p99_us,
            p999_us: p.p999_us,
            cpu_us_per_req: self.all.busy as f64 * 1e6 / clock_ticks() / p.requests.max(1) as f64,
            cpu0_busy: cpu(0),
            cpu1_busy: cpu(1),
            other_busy: self.others as f64 / (self.all.total as f64).max(1.0),
            syn_retrans: self.syn_retrans,
            xlb_busy: self.xlb as f64 / (self.all.total as f64).max(1.0) * self.cpus.len() as f64,
            nginx_busy: self.nginx as f64 / (self.all.total as f64).max(1.0)
                * self.cpus.len() as f64,
            elapsed: self.all.total as f64 / clock_ticks() / self.cpus.len().max(1) as f64,
            xdp_ns: None,
            tc_ns: None,
        }
    }
}

pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Busy fraction of the whole machine over one second with nothing of ours running: shows
/// whether something else (a build) shares the machine.
pub fn background_load() -> f64 {
    let Ok(before) = CpuStat::read() else {
        return f64::NAN;
    };
    std::thread::sleep(Duration::from_secs(1));
    let Ok(after) = CpuStat::read() else {
        return f64::NAN;
    };
    CpuDelta::busy_fraction(before.delta(&after).all)
}

/// xlb's own program cost (`BPF_PROG_TEST_RUN`), from `xlb-test-run-cost`
/// (tests/src/bin/test_run_cost.rs): `(packet, ns/packet)` in the order it prints them.
pub fn program_cost() -> Result<Vec<(String, String)>, String> {
    let mut cmd = crate::cargo();
    cmd.args([
        "run",
        "--release",
        "-p",
        "xlb-tests",
        "--features",
        "packet",
        "--bin",
        "xlb-test-run-cost",
    ]);
    println!("xtask: $ {}", crate::shown(&cmd));
    let out = cmd
        .output()
        .map_err(|e| format!("running cargo run: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    let tail = || {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    if !out.status.success() {
        return Err(format!(
            "the cost measurement failed ({}):\n{}",
            out.status,
            tail()
        ));
    }
    parse_cost(&text).ok_or_else(|| format!("no `test_run cost` line in:\n{}", tail()))
}

/// "test_run cost (ns/packet): no-op XDP 21 | new-flow SYN 1505 (no-op run the same way: 100)
/// | established 77 | non-VIP 36 | TC reply 178" → [("no-op XDP", "21"), ...].
fn parse_cost(text: &str) -> Option<Vec<(String, String)>> {
    let line = text.lines().find_map(|l| {
        l.split_once("test_run cost (ns/packet):")
            .map(|(_, rest)| rest)
    })?;
    let rows: Vec<(String, String)> = line
        .split('|')
        .filter_map(|part| {
            let words: Vec<&str> = part.split_whitespace().collect();
            let at = words.iter().position(|w| w.parse::<f64>().is_ok())?;
            Some((words[..at].join(" "), words[at..].join(" ")))
        })
        .collect();
    (!rows.is_empty()).then_some(rows)
}

pub struct Machine {
    pub cpus: usize,
    pub model: String,
    pub kernel: String,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Machine {
            cpus: cpuinfo
                .lines()
                .filter(|l| l.starts_with("processor"))
                .count(),
            model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map_or("unknown".into(), |(_, m)| m.trim().to_owned()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or("unknown".into(), |k| k.trim().to_owned()),
        }
    }
}

/// The commit measured: "9790690", with "+ uncommitted changes" when the tree differs.
pub fn revision() -> String {
    let git = |args: &[&str]| {
        crate::output(
            Command::new("git")
                .current_dir(crate::workspace_root())
                .args(args),
        )
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown revision".into();
    };
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.trim().is_empty());
    format!(
        "{}{}",
        head.trim(),
        if dirty { " + uncommitted changes" } else { "" }
    )
}

/// "2026-11-28 15:04 UTC".
pub fn now_utc() -> String {
    crate::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map_or_else(|| "unknown date".into(), |d| d.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk() {
        let out = "Running 3s test @ http://198.18.0.1:80/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   710.53us  120.15us   3.51ms   80.00%
    Req/Sec    45.01k     1.20k   47.00k    70.00%
  Latency Distribution
     50%  698.00us
     75%  760.00us
     90%  840.00us
     99%    1.10ms
  134321 requests in 3.00s, 18.06MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  44773.50
Transfer/sec:      6.02MB
";
        let p = parse_wrk(out).unwrap();
        assert_eq!(p.requests, 134321);
        assert_eq!(p.seconds, 3.0);
        assert_eq!(p.rps, 44773.5);
        assert_eq!(p.errors, 7);
        assert_eq!(p.p50_us, 698.0);
        assert_eq!(p.p99_us, 1100.0);
        assert_eq!(parse_wrk("garbage"), None);
    }

    #[test]
    fn parses_rate_client_and_cost() {
        let p = parse_rate_client(
            "scheduled=30000 ok=29990 errors=10 rate=9996.7 p50_us=80.5 p99_us=200.0 \
             p999_us=900.1 max_us=2000.0\n",
        )
        .unwrap();
        assert_eq!((p.requests, p.errors, p.p999_us), (29990, 10, Some(900.1)));
        let rows = parse_cost(
            "test_run cost (ns/packet): no-op XDP 21 | new-flow SYN 1505 (no-op run the same \
             way: 100) | established 77",
        )
        .unwrap();
        assert_eq!(rows[0], ("no-op XDP".into(), "21".into()));
        assert_eq!(
            rows[1],
            (
                "new-flow SYN".into(),
                "1505 (no-op run the same way: 100)".into()
            )
        );
        assert_eq!(rows.len(), 3);
    }
}

//! `cargo xtask bench`: xlb's L4 path against a direct baseline, nginx and HAProxy, measured
//! the way /work/shared/docs/BENCHMARKS.md asks (its rules are summarised where they matter).
//!
//! - **Ratios, interleaved.** On a 2-core shared machine an absolute req/s figure drifts by
//!   ±15 % from minute to minute. Every round runs every arm once, in an order rotated by one
//!   each round, so slow drift (another build, thermal or host noise) hits all arms alike; ratios
//!   are then taken *within* a round and summarised by their median and IQR over the rounds.
//! - **Pinning.** Everything under test (backends, proxies, the xlb daemon) runs on CPU 0 and
//!   the load generator on CPU 1, so the two never steal each other's core and "req/s" means the
//!   same amount of CPU in every arm.
//! - **Same XDP tax.** Attaching any XDP program to a veth disables GSO on its peer, so arms that
//!   bypass xlb get a no-op XDP program on the same interface (see `peers::Xdp`).
//!
//! Arms are a list (`ARMS`); a new arm is an entry there plus whatever starts its server.
mod measure;
pub(crate) mod peers;
mod profile;
mod report;
mod tls;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use xlb_tests::Topology;

use measure::Run;

/// Backends: three `xlb-demo-backend` instances, identical in every arm.
pub const BACKEND_PORTS: [u16; 3] = [8001, 8002, 8003];
/// A second listening port of the first backend, for the direct arm. xlb rewrites its flows to
/// 198.18.0.1:8001, so direct connections to that same port would share 4-tuples with them:
/// a client port reused across the two arms then meets the other arm's TIME_WAIT socket, and
/// the kernel answers the SYN with an ACK instead of accepting it (PAWS), costing a 1 s SYN
/// retransmit each time (measured: direct new connections fell from 16 000/s to 100/s right
/// after an xlb run). A port of its own keeps the arms' connections apart.
pub const DIRECT_PORT: u16 = 9001;
/// wrk's and the fixed-rate client's connection count.
pub const CONNECTIONS: u32 = 32;

/// Which XDP program sits on the lb end of the veth while an arm runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tax {
    /// The no-op program: arms that bypass xlb.
    Noop,
    /// xlb's own programs (XDP ingress + TC egress), driven by a running `xlb run`.
    Xlb,
}

pub struct Arm {
    pub id: &'static str,
    pub what: &'static str,
    /// Port on the lb address (198.18.0.1) that the load generator targets.
    pub port: u16,
    pub tax: Tax,
}

/// The L4 arms. A1 targets one backend: see the report's method note for why.
pub const ARMS: &[Arm] = &[
    Arm {
        id: "A1",
        what: "direct to one backend (app-1, on its second port), no-op XDP",
        port: DIRECT_PORT,
        tax: Tax::Noop,
    },
    Arm {
        id: "B",
        what: "nginx least_conn, 1 worker, keepalive 32 to backends",
        port: 8080,
        tax: Tax::Noop,
    },
    Arm {
        id: "B2",
        what: "HAProxy mode tcp, balance leastconn, nbthread 1",
        port: 8081,
        tax: Tax::Noop,
    },
    Arm {
        id: "C",
        what: "xlb L4: XDP DNAT + TC reverse NAT",
        port: 80,
        tax: Tax::Xlb,
    },
];

/// The HTTPS arms, measured in rounds of their own after the L4 ones (see `tls`).
pub const TLS_ARMS: &[Arm] = &[
    Arm {
        id: "D",
        what: "nginx TLS 1.3 (ECDSA P-256), 1 worker, least_conn, keepalive 32 to backends",
        port: 8443,
        tax: Tax::Noop,
    },
    Arm {
        id: "E",
        what: "xlb HTTPS (rustls, same certificate), the daemon on one core",
        port: 443,
        tax: Tax::Xlb,
    },
];

pub fn tls_arm(id: &str) -> &'static Arm {
    TLS_ARMS.iter().find(|a| a.id == id).expect("a known HTTPS arm")
}

/// Ratios reported, numerator / denominator, each computed per round.
pub const RATIOS: &[(&str, &str)] = &[
    ("C", "A1"),
    ("C", "B"),
    ("C", "B2"),
    ("B", "A1"),
    ("B2", "A1"),
];

/// What a run measures.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// `wrk -t1 -c32`: keep-alive requests per second.
    KeepAlive,
    /// The same with `Connection: close`: new connections per second.
    NewConn,
    /// The open-loop client at a fixed rate: latency.
    FixedRate,
    /// `wrk` over TLS: keep-alive HTTPS requests per second.
    TlsKeepAlive,
    /// New TLS connections without resumption: server CPU per full handshake.
    FullHandshake,
    /// New TLS connections resuming the previous one's session (TLS 1.3 ticket).
    ResumedHandshake,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::NewConn => "new-conn",
            Mode::FixedRate => "fixed-rate",
            Mode::TlsKeepAlive => "https-keep-alive",
            Mode::FullHandshake => "full-handshake",
            Mode::ResumedHandshake => "resumed-handshake",
        }
    }
}

/// Targets from the project brief: (numerator, denominator, mode, minimum median ratio).
pub const TARGETS: &[(&str, &str, Mode, f64)] = &[
    ("C", "A1", Mode::KeepAlive, 0.95),
    ("C", "B", Mode::KeepAlive, 2.3),
    ("C", "A1", Mode::NewConn, 0.90),
    ("C", "B", Mode::NewConn, 1.5),
];

pub struct Options {
    pub quick: bool,
    /// Only the HTTPS arms (D, E): the L4 rounds and the latency rounds are left out.
    pub https_only: bool,
    pub rounds: Option<usize>,
    pub seconds: Option<u64>,
}

/// Everything a report needs besides the samples.
pub struct Context {
    pub quick: bool,
    pub revision: String,
    pub rounds: usize,
    pub seconds: u64,
    pub latency_rounds: usize,
    pub fixed_rate: f64,
    pub command: String,
    pub started: String,
    pub machine: measure::Machine,
    pub background_before: f64,
    pub background_after: f64,
    pub cost: Result<Vec<(String, String)>, String>,
    /// Per HTTPS arm: the server's memory and idle CPU.
    pub memory: Vec<tls::Memory>,
    /// Per HTTPS arm: its server's system calls and context switches per request.
    pub profiles: Vec<profile::Profile>,
    pub https_only: bool,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "`cargo xtask bench` creates network namespaces, attaches XDP programs and installs \
             its peers (nginx, haproxy, wrk) with apt: run it as root"
        );
    }
    let (rounds, seconds) = match options.quick {
        // Sized to the bounds: about 17 minutes by default, under 3 with --quick (after the
        // build), the HTTPS arms included.
        true => (options.rounds.unwrap_or(2), options.seconds.unwrap_or(3)),
        false => (options.rounds.unwrap_or(6), options.seconds.unwrap_or(10)),
    };
    if rounds == 0 || seconds == 0 {
        bail!("--rounds and --seconds must be at least 1");
    }
    let latency_rounds = rounds.div_ceil(3);
    // Installed before anything starts: Ctrl-C then ends a run early and unwinds through the
    // same cleanup as an error (every child runs in its own process group, so Ctrl-C reaches
    // only us).
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        eprintln!("\nbench: interrupted; cleaning up");
        flag.store(true, Ordering::SeqCst);
    })
    .context("installing the Ctrl-C handler")?;

    let started_at = Instant::now();
    let started = measure::now_utc();
    let eta = estimate(rounds, latency_rounds, seconds);
    println!(
        "bench: {rounds} rounds × {} arms × 2 modes × {seconds} s, then {latency_rounds} \
         latency round(s): about {} after setup (build, program cost: under a minute when \
         already built)",
        ARMS.len(),
        minutes(eta)
    );
    peers::provision()?;
    crate::build(true)?;
    let bins = Bins::locate()?;
    // What was built is what is measured.
    let revision = measure::revision();
    check_stop(&stop)?;

    let machine = measure::Machine::read();
    // Program cost first, while nothing else of ours runs.
    let cost = measure::program_cost();
    match &cost {
        Ok(rows) => {
            let shown: Vec<String> = rows.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("bench: program cost (ns/packet): {}", shown.join(" | "));
        }
        Err(e) => println!("bench: program cost not measured: {e}"),
    }
    check_stop(&stop)?;
    let background_before = measure::background_load();
    println!(
        "bench: background CPU load before: {:.1} % of the machine",
        background_before * 100.0
    );

    // Drop order (reverse of declaration) is the cleanup order, on success, error and panic
    // alike: XDP programs and the daemon (`xlb detach`), proxies, backends, namespaces, files.
    let _bpf_stats = measure::BpfStats::enable();
    let files = peers::TempFiles::new()?;
    let topology = Topology::new("bench");
    peers::tune(&topology)?;
    let cert = tls::make_cert(&files, &topology)?;
    let tls_client = tls::write_client(&files)?;
    let _backends = peers::start_backends(&topology, &bins.backend);
    let _proxies = peers::start_proxies(&topology, &files, &cert)?;
    let config = files.write_xlb_config(&topology, &cert)?;
    let mut xdp = peers::Xdp::new(&topology, &bins.xlb, &config);

    // One short unrecorded run per arm: caches, allocators and the proxies' pools warm up, and
    // every arm is shown to answer before anything is recorded.
    let l4_arms: &[Arm] = if options.https_only { &[] } else { ARMS };
    for arm in l4_arms {
        xdp.set(arm.tax)?;
        peers::check_answers(&topology, arm)?;
        let warm = measure::wrk(&topology, arm, Mode::KeepAlive, 1, &stop)?;
        println!(
            "bench: warm-up {:<3} {:>9} req/s",
            arm.id,
            report::thousands(warm.rps)
        );
    }
    for arm in TLS_ARMS {
        xdp.set(arm.tax)?;
        tls::check_answers(&topology, arm)?;
        let warm = measure::wrk(&topology, arm, Mode::TlsKeepAlive, 1, &stop)?;
        println!(
            "bench: warm-up {:<3} {:>9} req/s (HTTPS)",
            arm.id,
            report::thousands(warm.rps)
        );
    }
    let mut progress = Progress::new(estimate(rounds, latency_rounds, seconds) - WARM_UP);
    println!("bench: measuring; about {} left", minutes(progress.planned));

    let mut samples: Vec<Run> = Vec::new();
    for round in (0..rounds).filter(|_| !options.https_only) {
        for arm in rotated(round) {
            xdp.set(arm.tax)?;
            // The two modes alternate their order too.
            let modes = match round % 2 {
                0 => [Mode::KeepAlive, Mode::NewConn],
                _ => [Mode::NewConn, Mode::KeepAlive],
            };
            for mode in modes {
                let run = measure::wrk(&topology, arm, mode, seconds, &stop)?;
                progress.show(round, rounds, arm, &run, "");
                samples.push(Run { round, ..run });
            }
        }
    }

    // Latency at a fixed rate: half of the slowest arm's keep-alive maximum, so that every arm
    // runs well below saturation (latency at saturation only measures queue length).
    let slowest = ARMS
        .iter()
        .map(|arm| report::median(&report::values(&samples, arm.id, Mode::KeepAlive)))
        .fold(f64::INFINITY, f64::min);
    let fixed_rate = ((slowest * 0.5) / 100.0).floor().max(1.0) * 100.0;
    if !options.https_only {
        println!("bench: latency at a fixed {fixed_rate} req/s (50 % of the slowest arm's maximum)");
    }
    for round in (0..latency_rounds).filter(|_| !options.https_only) {
        for arm in rotated(round) {
            xdp.set(arm.tax)?;
            let run = measure::fixed_rate(&topology, &bins, arm, fixed_rate, seconds, &stop)?;
            progress.show(round, latency_rounds, arm, &run, "latency ");
            samples.push(Run { round, ..run });
        }
    }

    // The HTTPS arms, in rounds of their own: each arm runs its three modes in a row (their
    // order rotating by round) so that the daemon or nginx is swapped once per arm and round.
    println!("bench: HTTPS arms (D nginx, E xlb)");
    for round in 0..rounds {
        for arm in tls_rotated(round) {
            xdp.set(arm.tax)?;
            for i in 0..TLS_MODES.len() {
                let mode = TLS_MODES[(i + round) % TLS_MODES.len()];
                let run = match mode {
                    Mode::TlsKeepAlive => measure::wrk(&topology, arm, mode, seconds, &stop)?,
                    _ => measure::handshakes(&topology, &tls_client, arm, mode, seconds, &stop)?,
                };
                progress.show(round, rounds, arm, &run, "https ");
                samples.push(Run { round, ..run });
            }
        }
    }
    let mut memory = Vec::new();
    for arm in TLS_ARMS {
        xdp.set(arm.tax)?;
        let m = tls::memory(&topology, &tls_client, arm)?;
        println!(
            "bench: {} RSS idle {} KiB, holding {} TLS connections {} KiB; idle CPU {:.2} %",
            arm.id,
            m.idle_kib,
            tls::HELD,
            m.held_kib,
            m.idle_busy * 100.0
        );
        memory.push(m);
    }
    // System calls and context switches per request, in runs of their own (see `profile`).
    let mut profiles = Vec::new();
    for arm in TLS_ARMS {
        xdp.set(arm.tax)?;
        match profile::profile(&topology, arm, seconds, &stop) {
            Ok(p) => {
                println!(
                    "bench: {} per keep-alive HTTPS request: {:.1} system calls, {:.2} context switches",
                    p.arm, p.syscalls, p.context_switches
                );
                profiles.push(p);
            }
            Err(e) => println!("bench: {}: system calls not counted: {e:#}", arm.id),
        }
    }
    xdp.set_none()?;
    let background_after = measure::background_load();

    let context = Context {
        quick: options.quick,
        revision,
        rounds,
        seconds,
        latency_rounds,
        fixed_rate,
        command: std::env::args()
            .skip(1)
            .fold("cargo xtask".to_owned(), |s, a| s + " " + &a),
        started,
        machine,
        background_before,
        background_after,
        cost,
        memory,
        profiles,
        https_only: options.https_only,
    };
    let written = report::write(&context, &samples)?;
    println!(
        "\nbench: done in {}; wrote {}\n",
        minutes(started_at.elapsed()),
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("{}", std::fs::read_to_string(&written[0])?);
    Ok(())
}

/// The built binaries the bench runs: release builds, whatever profile xtask itself is.
pub struct Bins {
    pub xlb: PathBuf,
    pub backend: PathBuf,
    pub rate_client: PathBuf,
}

impl Bins {
    fn locate() -> anyhow::Result<Bins> {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::workspace_root().join("target"));
        let dir = target.join("release");
        let bin = |name: &str| {
            let path = dir.join(name);
            match path.is_file() {
                true => Ok(path),
                false => Err(anyhow::anyhow!(
                    "{} missing after `cargo build --release`",
                    path.display()
                )),
            }
        };
        Ok(Bins {
            xlb: bin("xlb")?,
            backend: bin("xlb-demo-backend")?,
            rate_client: bin("xlb-rate-client")?,
        })
    }
}

/// Where the arms are reached from the client namespace.
pub fn target(topology: &Topology, arm: &Arm) -> SocketAddr {
    SocketAddr::from((topology.lb_v4, arm.port))
}

/// The arms in round `round`'s order: rotated by one each round, so that no arm always runs
/// first (after the daemon restart, say) or always right after a particular other arm.
fn rotated(round: usize) -> impl Iterator<Item = &'static Arm> {
    (0..ARMS.len()).map(move |i| &ARMS[(i + round) % ARMS.len()])
}

/// The HTTPS arms in round `round`'s order.
fn tls_rotated(round: usize) -> impl Iterator<Item = &'static Arm> {
    (0..TLS_ARMS.len()).map(move |i| &TLS_ARMS[(i + round) % TLS_ARMS.len()])
}

/// What each HTTPS arm measures, every round.
const TLS_MODES: [Mode; 3] = [
    Mode::TlsKeepAlive,
    Mode::FullHandshake,
    Mode::ResumedHandshake,
];

/// Progress lines with the time left, extrapolated from the pace so far.
struct Progress {
    planned: Duration,
    done: Duration,
    since: Instant,
}

impl Progress {
    fn new(planned: Duration) -> Progress {
        Progress {
            planned,
            done: Duration::ZERO,
            since: Instant::now(),
        }
    }

    fn show(&mut self, round: usize, rounds: usize, arm: &Arm, run: &Run, what: &str) {
        self.done += Duration::from_secs_f64(run.seconds) + PER_RUN_OVERHEAD;
        let pace = self.since.elapsed().as_secs_f64() / self.done.as_secs_f64().max(1e-9);
        let left = self.planned.saturating_sub(self.done).mul_f64(pace);
        println!(
            "[{what}round {}/{rounds}] {:<3} {:<10} {} (left ≈ {})",
            round + 1,
            arm.id,
            run.mode.name(),
            run.summary(),
            minutes(left)
        );
    }
}

/// Spawning a load generator, its connects and the gap between runs.
const PER_RUN_OVERHEAD: Duration = Duration::from_millis(400);
/// Starting `xlb run` and stopping it (SIGTERM, `xlb detach`), once per round.
const XLB_SWAP: Duration = Duration::from_secs(2);
/// Each HTTPS arm's memory and idle CPU (`tls::memory`).
const MEMORY: Duration = Duration::from_secs(2 * 12);
/// One second of wrk per arm, plus overheads.
const WARM_UP: Duration =
    Duration::from_millis(1400 * (ARMS.len() + TLS_ARMS.len()) as u64 + 4000);

/// Time from the warm-up to the report, from the plan.
fn estimate(rounds: usize, latency_rounds: usize, seconds: u64) -> Duration {
    let run = Duration::from_secs(seconds) + PER_RUN_OVERHEAD;
    let arms = ARMS.len() as u32;
    let tls_runs = (rounds * TLS_ARMS.len() * TLS_MODES.len()) as u32;
    let runs = (rounds as u32) * arms * 2 + (latency_rounds as u32) * arms + tls_runs;
    WARM_UP + run * runs + XLB_SWAP * (2 * rounds + latency_rounds + 2) as u32 + MEMORY
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

fn check_stop(stop: &AtomicBool) -> anyhow::Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

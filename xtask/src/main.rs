//! Developer tasks: `cargo xtask setup | build | test | soak | fuzz | run | install | bench` (alias in
//! .cargo/config.toml).
mod bench;
mod demo;
mod fuzz;
mod install;
mod setup;

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for xlb"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (nightly rust-src, bpf-linker, test tools).
    Setup,
    /// Set up, then build (the eBPF object is built by lb-userspace's build.rs).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run every test one at a time (the scenario tests need root). The
    /// reliability suite runs in its CI size: 10⁴ fuzzed packets, a 2-minute soak, short SYN
    /// flood and flapping runs, 20 s per cargo-fuzz target.
    Test {
        /// Only the reliability suite, at full size: 10⁶ fuzzed packets, the SYN flood and
        /// flapping at full length, a 10-minute soak, 5 minutes per cargo-fuzz target.
        #[arg(long)]
        reliability: bool,
        /// Passed to `cargo test`; after a further `--`, to the test binaries.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the cargo-fuzz targets (config parser, admin API requests, health responses) for N
    /// seconds each on the corpus in lb-userspace/fuzz/corpus (nightly; installs cargo-fuzz).
    Fuzz {
        #[arg(long, value_name = "N", default_value_t = 60)]
        seconds: u64,
    },
    /// Soak: mixed L4 load with a backend killed and restarted every 10 s for N minutes, the
    /// daemon's RSS, file descriptors and the conntrack occupancy sampled throughout; they must
    /// stay flat (±5 % after warm-up) with no unexplained errors (root).
    Soak {
        #[arg(long, value_name = "N", default_value_t = 60)]
        minutes: u64,
    },
    /// Without arguments after `--`: a self-contained demo in private network namespaces (root),
    /// L4 and HTTPS, until Ctrl-C or `--demo-seconds N`. With arguments after `--`: build and
    /// run the daemon, `xlb run <args>` (e.g. `cargo xtask run -- --config /etc/xlb/xlb.toml`).
    Run {
        /// The demo's only flag (before any `--`): stop by itself after N seconds, e.g.
        /// `cargo xtask run --demo-seconds 20`.
        #[arg(long, value_name = "N")]
        demo_seconds: Option<u64>,
        /// Everything after `--` goes to `xlb run` (see `xlb run --help`), and runs the daemon
        /// instead of the demo.
        #[arg(last = true, value_name = "XLB_RUN_ARGS")]
        args: Vec<String>,
    },
    /// Install the release binary to <prefix>/bin/xlb, the systemd units (xlb.service,
    /// app@.service) to /etc/systemd/system/ and the default config to /etc/xlb/xlb.toml.
    /// Never overwrites an existing config or app@.service; prints every step.
    Install {
        #[arg(long, value_name = "DIR", default_value = "/usr/local")]
        prefix: PathBuf,
        /// Install under this staging root instead of / (for packaging and tests).
        #[arg(long, value_name = "DIR")]
        destdir: Option<PathBuf>,
        /// Print what would be installed; touch nothing.
        #[arg(long)]
        dry_run: bool,
        /// Install this xlb binary instead of building the release one.
        #[arg(long, value_name = "FILE")]
        binary: Option<PathBuf>,
    },
    /// Benchmark xlb's L4 path against a direct baseline, nginx and HAProxy, and its HTTPS path
    /// against nginx terminating TLS, in private network namespaces (root; installs nginx,
    /// haproxy and wrk when missing). Writes bench/results/<date>.{md,csv,svg}
    /// (`<date>-quick.*` with --quick). About 17 minutes; `--quick` under 3.
    Bench {
        /// 2 rounds of 3 s instead of 6 of 10 s: a smoke run, not a measurement.
        #[arg(long)]
        quick: bool,
        /// Rounds (default 6, or 2 with --quick).
        #[arg(long, value_name = "N")]
        rounds: Option<usize>,
        /// Seconds per run (default 10, or 3 with --quick).
        #[arg(long, value_name = "S")]
        seconds: Option<u64>,
        /// Only the HTTPS arms (nginx and xlb terminating TLS); writes <date>-https.*.
        #[arg(long)]
        https: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Build { release } => build(release).map(drop),
        Task::Test { reliability, args } => test(&args, reliability),
        Task::Soak { minutes } => soak(minutes),
        Task::Fuzz { seconds } => {
            setup::setup()?;
            let mut totals = Totals::default();
            let result = fuzz::run_all(Duration::from_secs(seconds), &mut totals);
            println!("fuzz: {} passed, {} failed", totals.passed, totals.failed);
            result
        }
        Task::Install { prefix, destdir, dry_run, binary } => install::install(install::Options {
            prefix,
            destdir,
            dry_run,
            binary,
        }),
        Task::Bench {
            quick,
            rounds,
            seconds,
            https,
        } => bench::run(bench::Options {
            quick,
            https_only: https,
            rounds,
            seconds,
        }),
        Task::Run { demo_seconds, args } if args.is_empty() => {
            demo::run(demo_seconds.map(Duration::from_secs))
        }
        Task::Run {
            demo_seconds: Some(_),
            ..
        } => {
            bail!(
                "--demo-seconds is for the demo, and arguments after `--` run the daemon instead: \
                 use `cargo xtask run --demo-seconds N` alone for the demo"
            )
        }
        Task::Run { args, .. } if args.iter().any(|a| a == "--demo-seconds" || a.starts_with("--demo-seconds=")) => {
            bail!(
                "--demo-seconds is a flag of the demo, not of `xlb run`: put it before `--`, \
                 as in `cargo xtask run --demo-seconds 8` (everything after `--` goes to the daemon)"
            )
        }
        Task::Run { args, .. } => {
            build(false)?;
            let xlb = xlb_tests::xlb_bin();
            // Replace this process: signals (Ctrl-C, SIGTERM) then go straight to the daemon.
            use std::os::unix::process::CommandExt as _;
            Err(Command::new(&xlb).arg("run").args(&args).exec())
                .with_context(|| format!("executing {}", xlb.display()))
        }
    }
}

/// Setup + `cargo build` of the default members; returns how long the build took.
///
/// Never `--workspace`: that would include lb-ebpf, which only builds for the BPF target (from
/// lb-userspace's build.rs); the workspace's `default-members` leave it out.
fn build(release: bool) -> anyhow::Result<Duration> {
    setup::setup()?;
    let start = Instant::now();
    let mut cmd = cargo();
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(start.elapsed())
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "`cargo xtask {what}` must run as root: the scenario tests create network namespaces \
             and load XDP programs (CAP_NET_ADMIN, CAP_BPF). CI runs it as root; locally use \
             `sudo -E cargo xtask {what}`"
        );
    }
    Ok(())
}

/// `cargo test` of `selection` (package/target arguments), one test at a time, with `env`.
fn cargo_test(selection: &[impl AsRef<std::ffi::OsStr>], env: &[(&str, String)], harness_args: &[String]) -> Command {
    let mut cmd = cargo();
    cmd.args(["test", "--no-fail-fast"]).args(selection);
    // One test at a time: they share kernel state (bpffs, XDP attachment, CPU for timing).
    cmd.args(["--", "--test-threads=1"]).env("RUST_BACKTRACE", "1");
    // Root-only scenario tests skip when not root; here, where they are the point, a skip
    // would hide that they never ran, so it fails instead.
    cmd.env(xlb_tests::root::REQUIRE_ROOT_ENV, "1");
    cmd.args(harness_args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn test(args: &[String], reliability: bool) -> anyhow::Result<()> {
    require_root("test")?;
    let (cargo_args, harness_args) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    // Built first, separately: integration tests find the `xlb` and `xlb-demo-backend`
    // binaries next to themselves, and `cargo test` alone does not build other packages' bins.
    let build_time = build(cargo_args.iter().any(|a| a == "--release"))?;
    let start = Instant::now();
    let mut totals = Totals::default();
    let mut results = Vec::new();
    if reliability {
        let env = [
            ("XLB_FUZZ_PACKETS", "1000000".to_owned()),
            ("XLB_RELIABILITY", "full".to_owned()),
            ("XLB_SOAK_MINUTES", "10".to_owned()),
        ];
        let mut harness: Vec<String> = vec!["--nocapture".into()];
        harness.extend(harness_args.iter().cloned());
        for selection in [&["-p", "xlb-tests", "--test", "fuzz_packets"][..], &["-p", "xlb-tests", "--test", "reliability"]] {
            let mut cmd = cargo_test(selection, &env, &harness);
            cmd.args(cargo_args.iter().filter(|a| *a != "--release"));
            results.push(run_counting(&mut cmd, &mut totals));
        }
        results.push(fuzz::run_all(Duration::from_secs(300), &mut totals));
    } else {
        let mut cmd = cargo_test(cargo_args, &[], harness_args);
        results.push(run_counting(&mut cmd, &mut totals));
        // A selection of tests means just those; the whole suite includes the fuzz targets.
        if cargo_args.is_empty() && harness_args.is_empty() {
            results.push(fuzz::run_all(Duration::from_secs(20), &mut totals));
        }
    }
    let test_time = start.elapsed();
    println!(
        "xtask: build took {:.1} s, tests took {:.1} s",
        build_time.as_secs_f64(),
        test_time.as_secs_f64()
    );
    // One closing line for the whole run (cargo's own last line is some binary's doc tests).
    let Totals { passed, failed, ignored } = totals;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    results.into_iter().collect()
}

/// `cargo xtask soak --minutes N`: the soak scenario of tests/tests/reliability.rs at length N.
fn soak(minutes: u64) -> anyhow::Result<()> {
    require_root("soak")?;
    if minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    build(false)?;
    let mut totals = Totals::default();
    let mut cmd = cargo_test(
        &["-p", "xlb-tests", "--test", "reliability"],
        &[("XLB_SOAK_MINUTES", minutes.to_string())],
        &["--exact".into(), "soak_mixed_load_with_backend_churn".into(), "--nocapture".into()],
    );
    let result = run_counting(&mut cmd, &mut totals);
    if totals.passed == 0 && result.is_ok() {
        bail!("the soak test did not run (renamed?)");
    }
    result
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs `cmd` like `run`, echoing its stdout line by line and adding up the libtest summaries
/// (`test result: ok. 12 passed; 0 failed; 0 ignored; …`) into `totals`.
fn run_counting(cmd: &mut Command, totals: &mut Totals) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    println!("xtask: $ {}", shown(cmd));
    let mut child = match cmd.stdout(std::process::Stdio::piped()).spawn() {
        Ok(child) => child,
        Err(e) => return Err(e).with_context(|| format!("starting {}", shown(cmd))),
    };
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            for part in summary.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else { continue };
                let Ok(n) = n.parse::<u64>() else { continue };
                match what {
                    "passed" => totals.passed += n,
                    "failed" => totals.failed += n,
                    "ignored" => totals.ignored += n,
                    _ => {}
                }
            }
        }
    }
    match child.wait() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(anyhow::anyhow!("`{}` failed ({status})", shown(cmd))),
        Err(e) => Err(e).with_context(|| format!("waiting for {}", shown(cmd))),
    }
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
}

/// The cargo that started us (`$CARGO`), run from the workspace root.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd`, echoing it first; an error names it if it fails.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    println!("xtask: $ {}", shown(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", shown(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", shown(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout, or `None` if it cannot start or fails.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn shown(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let program = program.file_name().map_or(program.as_os_str(), OsStr::new);
    std::iter::once(program)
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `name` on `$PATH` (or in the sbin directories, which a non-login root shell may lack).
fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

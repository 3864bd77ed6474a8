use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use xlb::{
    admin,
    config::Config,
    daemon, dataplane, rollout,
    status::{self, BackendState},
};

/// xlb: an XDP least-connections load balancer for same-host backends.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load (or adopt) the data path, apply the config, probe backends and serve the admin API.
    /// SIGINT/SIGTERM stop the daemon but leave the data path attached; see `detach`.
    Run {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file without touching the kernel.
    Check {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show services, backends, live connections and data-path counters of a running daemon.
    Status {
        /// The daemon's config (its admin.listen is queried).
        #[arg(long, short, value_name = "FILE", required_unless_present = "admin")]
        config: Option<PathBuf>,
        /// Admin API address, instead of reading it from the config.
        #[arg(long, value_name = "ADDR", conflicts_with = "config")]
        admin: Option<SocketAddr>,
        /// Print the JSON of GET /api/status instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop sending new connections to a backend; its open connections continue. The backend
    /// stays drained, also across daemon restarts, until `undrain`.
    Drain {
        /// Service name, as in the config.
        service: String,
        /// Backend address `ip:port`, as in the service's `backends`.
        backend: String,
        #[command(flatten)]
        daemon: Daemon,
    },
    /// End a drain: the backend gets new connections again once its health checks pass.
    Undrain {
        service: String,
        backend: String,
        #[command(flatten)]
        daemon: Daemon,
    },
    /// Make the running daemon read its config file again and apply it (as SIGHUP does):
    /// services and backends added, removed or changed, without touching connections that
    /// keep their backend. An invalid file changes nothing; the reason is printed.
    Reload {
        #[command(flatten)]
        daemon: Daemon,
    },
    /// Have the running daemon order a new ACME certificate for an https service now, whatever
    /// the current one's expiry, and wait for the outcome. The new certificate is served to new
    /// connections; open ones keep theirs. A failure keeps the current certificate (exit
    /// status 1, with the CA's error).
    Renew {
        /// Service name, as in the config.
        service: String,
        /// Return once the daemon has the request, without waiting for the certificate.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the outcome.
        #[arg(long, value_name = "DURATION", default_value = "11m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[command(flatten)]
        daemon: Daemon,
    },
    /// Restart a service's backends one at a time without failing requests: drain one, wait
    /// for its connections to end, run --exec, wait for its health checks to pass, undrain it,
    /// next. Any failure stops: what it drained is undrained, --rollback runs, exit status 1.
    Rollout {
        /// Service name, as in the config.
        service: String,
        /// Restart command per backend, run with `sh -c`: `{index}` is the backend's 1-based
        /// position in the service's `backends`, `{backend}` its ip:port, `{port}` its port,
        /// `{service}` the service name. E.g. 'systemctl restart app@{index}'.
        #[arg(long, value_name = "CMD")]
        exec: String,
        /// Run once before the first backend (e.g. fetch and build the new version).
        #[arg(long, value_name = "CMD")]
        before: Option<String>,
        /// Run once after the last backend is back.
        #[arg(long, value_name = "CMD")]
        after: Option<String>,
        /// Run once if the rollout fails, after the drained backends are undrained; the
        /// placeholders name the backend it stopped at.
        #[arg(long, value_name = "CMD")]
        rollback: Option<String>,
        /// How long to wait for a drained backend's connections to end.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
        drain_timeout: std::time::Duration,
        /// Restart a backend even when connections are still open after --drain-timeout
        /// (cutting them); without it the rollout stops there.
        #[arg(long)]
        proceed_on_drain_timeout: bool,
        /// How long a restarted backend may take to pass its health checks.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
        health_timeout: std::time::Duration,
        #[command(flatten)]
        daemon: Daemon,
    },
    /// Write an xlb.toml from another load balancer's configuration, listing on stderr what it
    /// does not carry over. Exit status 0: complete; 3: partial; 1: nothing to import or bad input
    /// (then nothing is written).
    Import {
        #[command(subcommand)]
        from: ImportFrom,
    },
    /// Detach the programs and remove every pinned map and link (drops all tracked flows).
    Detach {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ImportFrom {
    /// nginx.conf and the files it includes (as `nginx -T` shows them), or `nginx -T` output on
    /// standard input with PATH `-`.
    Nginx {
        /// The main configuration file, or `-` for `nginx -T` output on standard input.
        #[arg(default_value = "/etc/nginx/nginx.conf")]
        path: PathBuf,
        /// Write the config here instead of to standard output (only when something was
        /// imported).
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// This host's address, for the services of servers that nginx listens on every address
        /// with (`listen 443`): an xlb service listens on one.
        #[arg(long, value_name = "IP")]
        address: Option<std::net::IpAddr>,
        /// The interface clients' packets arrive on (`dataplane.interfaces`).
        #[arg(long, value_name = "NAME", default_value = "eth0")]
        interface: String,
    },
}

/// `xlb import nginx`: the diagnostics on stderr, the file on stdout or `output`.
fn import_nginx(path: &std::path::Path, output: Option<PathBuf>, address: Option<std::net::IpAddr>, interface: String) -> anyhow::Result<u8> {
    use std::io::Read as _;
    use xlb::import::{self, Completeness, Files};
    let (main, files) = if path == std::path::Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading nginx -T output from standard input")?;
        import::nginx::split_dump(&text)?
    } else {
        (path.to_owned(), Files::Disk)
    };
    let opts = import::Options { address, interface, base: import::map::base_of(&main) };
    let outcome = import::nginx(&main, &files, &opts)?;
    for d in &outcome.import.diagnostics {
        eprintln!("xlb import: {d}");
    }
    let dropped = outcome.import.diagnostics.iter().filter(|d| d.level == import::Level::Dropped).count();
    let services = outcome.import.services.len();
    match outcome.completeness {
        Completeness::Impossible => {
            eprintln!("xlb import: nothing to import: no server in {} proxies to backends or redirects to https; nothing written", main.display());
            return Ok(outcome.completeness.exit_code());
        }
        Completeness::Partial => eprintln!(
            "xlb import: partial: {services} service(s); {dropped} thing(s) not carried over, listed above"
        ),
        Completeness::Complete => eprintln!("xlb import: complete: {services} service(s)"),
    }
    match output {
        Some(file) => {
            // Written whole or not at all: a new name, then renamed over the target.
            let tmp = file.with_extension("xlb-import-tmp");
            std::fs::write(&tmp, &outcome.toml).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &file).with_context(|| format!("renaming {} to {}", tmp.display(), file.display()))?;
            eprintln!("xlb import: wrote {}; check it with `xlb check --config {}`", file.display(), file.display());
        }
        None => print!("{}", outcome.toml),
    }
    Ok(outcome.completeness.exit_code())
}

/// `xlb renew`: asks for the renewal, then follows the service's `acme.attempts` in the status
/// until the attempt under way ends.
async fn renew(addr: SocketAddr, service: &str, no_wait: bool, timeout: std::time::Duration) -> anyhow::Result<()> {
    let asked = admin::renew(addr, service).await?;
    if no_wait {
        println!("{service}: renewal asked for; `xlb status` shows its outcome");
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let status = admin::fetch_status(addr).await?;
        let acme = status
            .services
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| s.acme.clone())
            .with_context(|| format!("service {service} is no longer in the daemon's status (restarted with another config?)"))?;
        if acme.attempts < asked.acme.attempts {
            anyhow::bail!("{service}: the daemon restarted while renewing; see `xlb status` for the certificate it serves");
        }
        if acme.attempts > asked.acme.attempts {
            if let Some(e) = acme.last_error.filter(|_| acme.failures > 0) {
                anyhow::bail!(
                    "{service}: renewal failed: {e}; the current certificate stays (valid until {}); next attempt at {}",
                    acme.not_after.as_deref().unwrap_or("-, none yet"),
                    acme.next_attempt.as_deref().unwrap_or("-")
                );
            }
            println!(
                "{service}: renewed: new certificate for {} valid until {}; served to new connections",
                acme.domains.join(","),
                acme.not_after.as_deref().unwrap_or("?")
            );
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "{service}: no outcome within {}; the order goes on in the daemon, `xlb status` shows how it ends",
                humantime::format_duration(timeout)
            );
        }
    }
}

/// Which running daemon to ask.
#[derive(Args)]
struct Daemon {
    /// The daemon's config (its admin.listen is used).
    #[arg(long, short, value_name = "FILE", required_unless_present = "admin")]
    config: Option<PathBuf>,
    /// Admin API address, instead of reading it from the config.
    #[arg(long, value_name = "ADDR", conflicts_with = "config")]
    admin: Option<SocketAddr>,
}

/// The admin API address: given, or `admin.listen` of the config.
fn admin_addr(admin: Option<SocketAddr>, config: Option<PathBuf>) -> anyhow::Result<SocketAddr> {
    Ok(match (admin, config) {
        (Some(a), _) => a,
        (None, Some(path)) => Config::parse(&path, &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?)?.admin.listen,
        (None, None) => unreachable!("clap requires one"),
    })
}

/// The admin address for `xlb reload`: the file being reloaded may be the invalid one, and the
/// daemon is the one to say so (and log it), so only `admin.listen` has to be readable here.
fn reload_admin_addr(path: &std::path::Path) -> anyhow::Result<SocketAddr> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if let Ok(config) = Config::parse(path, &text) {
        return Ok(config.admin.listen);
    }
    let listen = toml::from_str::<toml::Table>(&text)
        .ok()
        .and_then(|t| t.get("admin")?.get("listen")?.as_str()?.parse::<SocketAddr>().ok());
    Ok(listen.unwrap_or(xlb::config::DEFAULT_ADMIN_LISTEN))
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("XLB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // `init` also routes the `log` records of aya and aya-log into tracing.
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Import { from: ImportFrom::Nginx { path, output, address, interface } } = cli.command {
        return match import_nginx(&path, output, address, interface) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("xlb: {e:#}; nothing written");
                ExitCode::FAILURE
            }
        };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            // Before any thread starts: it edits the environment.
            let problems = xlb::listeners::init();
            init_tracing();
            for problem in problems {
                tracing::warn!("{problem}");
            }
            let config = Config::load(&config)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(daemon::run(config))
        }
        Command::Check { config } => {
            let config = Config::load(&config)?;
            let backends: usize = config.services.iter().map(|s| s.backends.len()).sum();
            println!(
                "{}: ok ({} service(s), {backends} backend(s), interfaces {})",
                config.path.display(),
                config.services.len(),
                config.dataplane.interfaces.join(", ")
            );
            Ok(())
        }
        Command::Status { config, admin: addr, json } => {
            let addr = admin_addr(addr, config)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let status = rt.block_on(admin::fetch_status(addr))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status::render_table(&status));
            }
            Ok(())
        }
        Command::Drain { service, backend, daemon } => set_drained(&service, &backend, daemon, true),
        Command::Undrain { service, backend, daemon } => set_drained(&service, &backend, daemon, false),
        Command::Reload { daemon: Daemon { config, admin } } => {
            let addr = match (admin, config) {
                (Some(a), _) => a,
                (None, Some(path)) => reload_admin_addr(&path)?,
                (None, None) => unreachable!("clap requires one"),
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let r = rt.block_on(admin::reload(addr))?;
            if r.changes.is_empty() {
                println!("reloaded {}: nothing changed", r.config);
            } else {
                println!("reloaded {}:", r.config);
                for change in &r.changes {
                    println!("  {change}");
                }
            }
            Ok(())
        }
        Command::Renew { service, no_wait, timeout, daemon: Daemon { config, admin } } => {
            let addr = admin_addr(admin, config)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(renew(addr, &service, no_wait, timeout))
        }
        Command::Rollout {
            service,
            exec,
            before,
            after,
            rollback,
            drain_timeout,
            proceed_on_drain_timeout,
            health_timeout,
            daemon: Daemon { config, admin },
        } => {
            let addr = admin_addr(admin, config)?;
            let plan = rollout::Plan {
                service,
                exec,
                before,
                after,
                rollback,
                drain_timeout,
                proceed_on_drain_timeout,
                health_timeout,
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(rollout::run(addr, &plan))
        }
        Command::Import { .. } => unreachable!("handled in main, for its exit status"),
        Command::Detach { config } => {
            let text = std::fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
            let config = Config::parse(&config, &text)?;
            let pin_path = &config.dataplane.pin_path;
            let removed = dataplane::detach(pin_path)?;
            if removed.is_empty() {
                println!("nothing pinned under {}; nothing to detach", pin_path.display());
            } else {
                println!("detached xlb: removed {} from {}", removed.join(", "), pin_path.display());
            }
            Ok(())
        }
    }
}

fn set_drained(service: &str, backend: &str, Daemon { config, admin }: Daemon, drained: bool) -> anyhow::Result<()> {
    let addr = admin_addr(admin, config)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let r = rt.block_on(admin::set_drained(addr, service, backend, drained))?;
    let open = match r.live_connections {
        0 => "it has no open connections".to_string(),
        1 => "its 1 open connection continues".to_string(),
        n => format!("its {n} open connections continue"),
    };
    let already = if r.changed { "" } else { "already " };
    let what = match (r.drained, r.state) {
        (true, _) => format!("{already}draining: no new connections; {open}"),
        (false, BackendState::Up) => format!("{already}undrained: up, new connections go to it again"),
        (false, _) => format!(
            "{already}undrained, but down: its health checks fail, so it gets new connections only once they pass"
        ),
    };
    println!("{} {}: {what}", r.service, r.backend);
    Ok(())
}

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use xlb::{
    admin,
    config::Config,
    daemon, dataplane,
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
    /// Detach the programs and remove every pinned map and link (drops all tracked flows).
    Detach {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
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
            init_tracing();
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

//! `cargo xtask run` without arguments: xlb in front of three demo backends, all inside private
//! network namespaces, with a burst of client traffic and then a live `xlb status` view.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use xlb_tests::{
    Proc, Topology,
    config::{Health, Service, XlbConfig},
    demo_backend_bin, http_get, wait_until, xlb_bin,
};

const VIP_PORT: u16 = 80;
const BACKEND_PORTS: [u16; 3] = [8001, 8002, 8003];
const ADMIN: &str = "127.0.0.1:9100";
const REQUESTS: usize = 30;

pub fn run(duration: Option<Duration>) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces and attaches XDP programs: run it as root");
    }
    // Installed first so that Ctrl-C at any point ends in the cleanup below, not mid-way.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;

    crate::build(false)?;
    let deadline = duration.map(|d| Instant::now() + d);
    let result =
        demo(&|| stop.load(Ordering::SeqCst) || deadline.is_some_and(|d| Instant::now() >= d));
    println!("demo stopped; everything it created is removed");
    result
}

fn demo(done: &(dyn Fn() -> bool + Sync)) -> anyhow::Result<()> {
    let (xlb, backend) = (xlb_bin(), demo_backend_bin());
    // Declared in this order so that they drop in reverse, also on error or panic: daemon,
    // backends, `xlb detach`, config file, topology.
    let topology = Topology::new("demo");
    let config = DemoConfig::write(&topology)?;
    let _detach = Detach {
        topology: &topology,
        xlb: &xlb,
        config: &config.path,
    };
    let backends: Vec<Proc> = BACKEND_PORTS
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let listen = format!("{}:{port}", topology.lb_v4);
            spawn(
                &topology,
                &backend,
                &["--listen", &listen, "--name", &format!("app-{}", i + 1)],
            )
        })
        .collect();
    for b in &backends {
        b.wait_for_output("listening on", Duration::from_secs(10));
    }

    let config_arg = config
        .path
        .to_str()
        .context("temporary path is not UTF-8")?;
    let daemon = spawn(&topology, &xlb, &["run", "--config", config_arg]);
    let admin: SocketAddr = ADMIN.parse().unwrap();
    wait_until(
        Duration::from_secs(20),
        "the xlb admin API to answer",
        || {
            assert!(
                daemon.is_running(),
                "xlb run exited; its output:\n{}",
                daemon.output()
            );
            done()
                || topology.in_lb(|| http_get(admin, "/api/status", Duration::from_secs(1)).is_ok())
        },
    );
    if !done() {
        println!(
            "xlb is up: VIP {}:{VIP_PORT} → app-1..app-3 on ports {BACKEND_PORTS:?}",
            topology.lb_v4
        );
        traffic(&topology, done);
    }
    while !done() {
        if !daemon.is_running() {
            bail!("xlb run exited; its output:\n{}", daemon.output());
        }
        let status = topology
            .lb(&xlb)
            .args(["status", "--config", config_arg])
            .output()?;
        // Clear the screen and home the cursor: a `watch`-style view.
        print!("\x1b[2J\x1b[H");
        println!("xlb demo: live `xlb status` every second (Ctrl-C to stop and clean up)\n");
        print!("{}", String::from_utf8_lossy(&status.stdout));
        eprint!("{}", String::from_utf8_lossy(&status.stderr));
        let next = Instant::now() + Duration::from_secs(1);
        while Instant::now() < next && !done() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    println!("\nstopping xlb (SIGTERM), then the backends, `xlb detach` and the namespaces");
    let status = daemon.terminate();
    if !status.success() {
        eprintln!(
            "xlb run exited with {status}; its output:\n{}",
            daemon.output()
        );
    }
    Ok(())
}

/// A burst of one-request connections from the client namespace, each a new flow for xlb to
/// place; prints who served it and the split.
fn traffic(topology: &Topology, done: &(dyn Fn() -> bool + Sync)) {
    let vip = SocketAddr::from((topology.lb_v4, VIP_PORT));
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    topology.in_client(|| {
        for i in (1..=REQUESTS).take_while(|_| !done()) {
            let by = match http_get(vip, "/", Duration::from_secs(2)) {
                Ok(r) => r
                    .header("X-Served-By")
                    .unwrap_or("(no X-Served-By header)")
                    .to_owned(),
                Err(e) => format!("error: {e}"),
            };
            println!("GET http://{vip}/ #{i:<2} → {by}");
            *served.entry(by).or_default() += 1;
        }
    });
    let split: Vec<String> = served.iter().map(|(by, n)| format!("{by}: {n}")).collect();
    println!(
        "{} requests: {}",
        served.values().sum::<usize>(),
        split.join(", ")
    );
    // Time to read the split before the status view clears the screen.
    std::thread::sleep(Duration::from_secs(2));
}

/// The demo's config file, removed on drop.
struct DemoConfig {
    path: PathBuf,
}

impl DemoConfig {
    fn write(topology: &Topology) -> anyhow::Result<DemoConfig> {
        let path = std::env::temp_dir().join(format!("xlb-demo-{}.toml", std::process::id()));
        let config = XlbConfig::new([&topology.lb_if], &topology.pin_path)
            .admin(ADMIN)
            .service(
                Service::l4("demo", format!("{}:{VIP_PORT}", topology.lb_v4))
                    .backends(BACKEND_PORTS.iter().map(|p| format!("{}:{p}", topology.lb_v4)))
                    .health(Health::http("/health").interval(Duration::from_secs(1))),
            );
        let text = format!("# Written by `cargo xtask run` for its demo; removed when it ends.\n{}", config.render());
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(DemoConfig { path })
    }
}

impl Drop for DemoConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
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
        let result = self
            .topology
            .lb(self.xlb)
            .arg("detach")
            .arg("--config")
            .arg(self.config)
            .output();
        match result {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "xlb detach failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("running xlb detach: {e}"),
        }
    }
}

/// Like `Topology::spawn_lb`, but in a process group of its own: Ctrl-C then reaches only us,
/// and we stop everything in order instead of racing the children's own SIGINT handling.
fn spawn(topology: &Topology, program: &Path, args: &[&str]) -> Proc {
    let mut cmd = topology.lb(program);
    cmd.args(args).process_group(0);
    let name = program.file_name().unwrap_or_default().to_string_lossy();
    topology.spawn(cmd, format!("{name} {}", args.join(" ")))
}

//! Support for xlb's scenario tests and `cargo xtask run`: a private two-namespace topology
//! joined by a veth pair, child processes that are cleaned up on drop, the `Lb` harness most
//! tests build on (three demo backends, a config and the daemon), and a few helpers.
//!
//! Everything here panics with a message instead of returning errors: a test that cannot build
//! its world has nothing better to do, and the message should say what to fix.
//!
//! A test file takes it all with `use xlb_tests::*;`.
mod cmd;
pub mod config;
pub mod demo;
pub mod h2raw;
mod http;
mod lb;
mod load;
/// Needs the data plane (lb-userspace), hence the feature: see Cargo.toml.
#[cfg(feature = "packet")]
pub mod packet;
mod probe;
mod proc;
mod recorder;
pub mod root;
mod syn;
mod systemd;
mod rng;
mod site;
mod tls;
mod topology;
mod xdp;

pub use cmd::{link_show, run, run_ok, xdp_attached};
pub use http::{HttpResponse, http_get};
pub use lb::*;
pub use load::{Held, LOAD_LIMIT, Load, app_index, read_response, under_load};
pub use nix::sys::signal::Signal;
pub use probe::{Probe, ProbeResult};
pub use recorder::{Forwarded, Mark, Recorded, Recorder, Unparsed, parse_requests};
pub use proc::{Proc, cpu_time, rss_kib};
pub use syn::{csum, syn_packet};
pub use rng::Rng;
pub use site::*;
pub use systemd::{Restarted, app_pids, socket_activated, write_restart_script};
pub use tls::{Answer, Conn, Pki, client_config, replace_file};
pub use topology::Topology;
pub use xdp::NoopXdp;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Where bpffs must be mounted for the daemon's pins (and our `Topology::pin_path`).
pub const BPFFS: &str = "/sys/fs/bpf";

/// Panics unless we run as root: every scenario test creates namespaces and loads programs.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("these tests need root (CAP_NET_ADMIN, CAP_BPF): run `cargo xtask test` as root");
    }
}

/// Mounts bpffs on /sys/fs/bpf unless it already is (containers and minimal VMs often lack it).
pub fn ensure_bpffs() {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_else(|e| panic!("reading /proc/self/mountinfo: {e}"));
    // Fields: id parent major:minor root mountpoint options [optional...] - fstype source ...
    let mounted = mountinfo.lines().any(|line| {
        let mut fields = line.split(' ');
        let mount_point = fields.nth(4);
        let fstype = fields.skip_while(|f| *f != "-").nth(1);
        mount_point == Some(BPFFS) && fstype == Some("bpf")
    });
    if mounted {
        return;
    }
    std::fs::create_dir_all(BPFFS).unwrap_or_else(|e| panic!("creating {BPFFS}: {e}"));
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap_or_else(|e| panic!("mount -t bpf bpf {BPFFS}: {e} (needs root)"));
}

/// Polls `f` every 20 ms until it returns true; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The built `xlb` binary: `$XLB_BIN`, else next to the running test or xtask binary.
pub fn xlb_bin() -> PathBuf {
    built_bin("xlb", "XLB_BIN")
}

/// The built `xlb-demo-backend` binary: `$XLB_DEMO_BACKEND_BIN`, else next to the running binary.
pub fn demo_backend_bin() -> PathBuf {
    built_bin("xlb-demo-backend", "XLB_DEMO_BACKEND_BIN")
}

fn built_bin(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    // Integration tests live in target/<profile>/deps, xtask and the binaries in target/<profile>.
    let mut dir = exe.parent().expect("the executable has a directory");
    if matches!(
        dir.file_name().and_then(|n| n.to_str()),
        Some("deps" | "examples")
    ) {
        dir = dir.parent().expect("deps/ has a parent");
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build the workspace first (`cargo xtask test` does; by hand: \
         `cargo build`), or point {env} at the binary",
        path.display()
    );
    path
}

/// Removes a directory tree, ignoring a missing one. Works on bpffs, where unlinking a pin
/// drops its reference (a program stays attached only through its link or interface).
pub(crate) fn remove_tree(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => eprintln!("xlb-tests: removing {}: {e}", path.display()),
    }
}

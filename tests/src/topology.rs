//! Two private network namespaces joined by a veth pair:
//!
//! ```text
//!   client ns                          lb ns
//!   xcl0 198.18.0.2/24, 2001:2::2/64 ── xlb0 198.18.0.1/24, 2001:2::1/64  (VIP, backends, daemon)
//! ```
//!
//! The host namespace never sees the veth, so nothing here can disturb the machine's own
//! networking, and the addresses come from the benchmarking range (RFC 2544, RFC 5180).
use std::{
    ffi::OsStr,
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use nix::sched::{CloneFlags, setns};

use crate::{BPFFS, Proc, ensure_bpffs, remove_tree, require_root};

const NETNS_DIR: &str = "/run/netns";
/// Prefix of every namespace and pin directory we create; `Topology::new` sweeps leftovers
/// of dead processes by it.
const PREFIX: &str = "xlbt-";
// Fixed, locally administered MACs: each pair lives in its own namespaces, and fixed values let
// us install the neighbour entries without asking the kernel first.
const LB_MAC: &str = "02:78:6c:62:00:01";
const CLIENT_MAC: &str = "02:78:6c:62:00:02";

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Topology {
    pub lb_ns: String,
    pub client_ns: String,
    /// The veth end inside the lb namespace (where XDP attaches).
    pub lb_if: String,
    /// The veth end inside the client namespace.
    pub client_if: String,
    pub lb_v4: Ipv4Addr,
    pub client_v4: Ipv4Addr,
    pub lb_v6: Ipv6Addr,
    pub client_v6: Ipv6Addr,
    /// A bpffs directory for the daemon's pins. Not created here (the daemon does); removed on
    /// drop.
    pub pin_path: PathBuf,
    procs: Mutex<Vec<Arc<Mutex<Child>>>>,
}

impl Topology {
    /// Creates the namespaces and the veth pair. `tag` (e.g. the test name) only makes the
    /// names readable; uniqueness comes from the pid and a counter.
    pub fn new(tag: &str) -> Topology {
        require_root();
        ensure_bpffs();
        sweep_leftovers();
        let tag: String = tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(16)
            .collect();
        let base = format!(
            "{PREFIX}{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // Built before anything exists, so a failure half-way through cleans up through Drop.
        let topology = Topology {
            lb_ns: format!("{base}-lb"),
            client_ns: format!("{base}-cl"),
            lb_if: "xlb0".into(),
            client_if: "xcl0".into(),
            lb_v4: Ipv4Addr::new(198, 18, 0, 1),
            client_v4: Ipv4Addr::new(198, 18, 0, 2),
            lb_v6: "2001:2::1".parse().unwrap(),
            client_v6: "2001:2::2".parse().unwrap(),
            pin_path: Path::new(BPFFS).join(&base),
            procs: Mutex::default(),
        };
        if let Err(e) = topology.create() {
            panic!("creating test topology {base}: {e}");
        }
        topology
    }

    fn create(&self) -> Result<(), String> {
        let (lb, cl) = (self.lb_ns.as_str(), self.client_ns.as_str());
        run(Command::new("ip").args(["netns", "add", lb]))?;
        run(Command::new("ip").args(["netns", "add", cl]))?;
        for ns in [lb, cl] {
            // Before the veth exists, so that it inherits the defaults: no DAD means the IPv6
            // addresses are usable at once instead of "tentative" for a second or two.
            in_ns(ns, || -> Result<(), String> {
                for (key, value) in [
                    ("ipv6/conf/all/disable_ipv6", "0"),
                    ("ipv6/conf/default/disable_ipv6", "0"),
                    ("ipv6/conf/all/accept_dad", "0"),
                    ("ipv6/conf/default/accept_dad", "0"),
                ] {
                    // /proc/sys/net follows the netns of the calling thread.
                    let path = format!("/proc/sys/net/{key}");
                    std::fs::write(&path, value).map_err(|e| format!("writing {path}: {e}"))?;
                }
                Ok(())
            })?;
        }
        // Created inside the lb ns with its peer moved straight into the client ns: the host
        // namespace never holds either end. Equal queue counts on both ends, as veth XDP wants.
        let link_add = format!(
            "link add {} address {LB_MAC} numtxqueues 2 numrxqueues 2 type veth \
             peer name {} address {CLIENT_MAC} netns {cl} numtxqueues 2 numrxqueues 2",
            self.lb_if, self.client_if
        );
        run(Command::new("ip")
            .args(["-n", lb])
            .args(link_add.split_whitespace()))?;
        let ends = [
            (
                lb,
                &self.lb_if,
                self.lb_v4,
                self.lb_v6,
                self.client_v4,
                self.client_v6,
                CLIENT_MAC,
            ),
            (
                cl,
                &self.client_if,
                self.client_v4,
                self.client_v6,
                self.lb_v4,
                self.lb_v6,
                LB_MAC,
            ),
        ];
        for (ns, dev, v4, v6, peer_v4, peer_v6, peer_mac) in ends {
            let ip = |args: &[&str]| run(Command::new("ip").args(["-n", ns]).args(args));
            ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
            ip(&["link", "set", "lo", "up"])?;
            ip(&["link", "set", dev, "up"])?;
            // Permanent neighbour entries: resolution can then never be what a test trips on,
            // even while an XDP program under test mishandles ARP or NDP.
            for peer in [peer_v4.to_string(), peer_v6.to_string()] {
                ip(&[
                    "neigh",
                    "replace",
                    &peer,
                    "lladdr",
                    peer_mac,
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ])?;
            }
        }
        // Locally generated packets carry CHECKSUM_PARTIAL on a veth (the checksum is left for
        // an offload that never happens); an XDP program patching the checksum incrementally on
        // the lb side would then compute garbage. Real NICs deliver full checksums: so does this.
        run(self
            .client("ethtool")
            .args(["-K", &self.client_if, "tx", "off"]))?;
        Ok(())
    }

    /// `program` to be run inside the lb namespace (only the network namespace changes).
    pub fn lb(&self, program: impl AsRef<OsStr>) -> Command {
        ns_command(&self.lb_ns, program.as_ref())
    }

    /// `program` to be run inside the client namespace.
    pub fn client(&self, program: impl AsRef<OsStr>) -> Command {
        ns_command(&self.client_ns, program.as_ref())
    }

    /// Runs `f` on a thread inside the lb namespace: sockets it opens live there.
    pub fn in_lb<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_ns(&self.lb_ns, f)
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_ns(&self.client_ns, f)
    }

    /// Starts `program args...` in the lb namespace; killed when the `Proc` or the topology
    /// is dropped, whichever comes first.
    pub fn spawn_lb(&self, program: impl AsRef<OsStr>, args: &[&str]) -> Proc {
        let mut cmd = self.lb(program.as_ref());
        cmd.args(args);
        self.spawn(cmd, label(program.as_ref(), args))
    }

    /// Starts `program args...` in the client namespace, like `spawn_lb`.
    pub fn spawn_client(&self, program: impl AsRef<OsStr>, args: &[&str]) -> Proc {
        let mut cmd = self.client(program.as_ref());
        cmd.args(args);
        self.spawn(cmd, label(program.as_ref(), args))
    }

    /// Spawns a prepared command (e.g. `topology.lb(xlb_bin())` with extra env) and tracks it
    /// for cleanup like `spawn_lb`.
    pub fn spawn(&self, cmd: Command, label: impl Into<String>) -> Proc {
        let proc = Proc::spawn(cmd, label);
        self.procs.lock().unwrap().push(proc.child.clone());
        proc
    }

    /// `ss args...` in the lb namespace; returns its stdout. Panics if it fails.
    pub fn ss_lb(&self, args: &[&str]) -> String {
        run(self.lb("ss").args(args)).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for child in self
            .procs
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = crate::proc::kill_and_reap(&child);
        }
        remove_tree(&self.pin_path);
        for ns in [&self.lb_ns, &self.client_ns] {
            remove_ns(ns);
        }
    }
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("lb_ns", &self.lb_ns)
            .field("client_ns", &self.client_ns)
            .field("pin_path", &self.pin_path)
            .finish_non_exhaustive()
    }
}

fn ns_command(ns: &str, program: &OsStr) -> Command {
    // nsenter, not `ip netns exec`: the latter also unshares the mount namespace and remounts
    // /sys, hiding /sys/fs/bpf, and pins must outlive the process that made them.
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={NETNS_DIR}/{ns}"))
        .arg("--")
        .arg(program);
    cmd
}

fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("{NETNS_DIR}/{ns}");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let fd = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                // Only this thread moves; the rest of the process stays where it was.
                setns(&fd, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns({path}, CLONE_NEWNET): {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn label(program: &OsStr, args: &[&str]) -> String {
    let name = Path::new(program)
        .file_name()
        .unwrap_or(program)
        .to_string_lossy();
    std::iter::once(&*name)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion; its stdout, or an error with the command line and its stderr.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {cmd:?}: {e} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Kills whatever still runs in `ns` (e.g. something a test spawned without `spawn_lb`, or a
/// daemon's child) and deletes it. The namespace itself goes once its last user is gone.
fn remove_ns(ns: &str) {
    if !Path::new(NETNS_DIR).join(ns).exists() {
        return;
    }
    let me = std::process::id();
    if let Ok(pids) = run(Command::new("ip").args(["netns", "pids", ns])) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            if pid != me {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    if let Err(e) = run(Command::new("ip").args(["netns", "del", ns])) {
        eprintln!("xlb-tests: {e}");
    }
}

/// Removes namespaces and pin directories left by test processes that died without running
/// their destructors (SIGKILL, abort, a CI timeout). Names end in `-<pid>-<n>[-lb|-cl]`; only
/// those whose pid is gone are touched, so concurrent test runs are safe.
fn sweep_leftovers() {
    let dead = |name: &str, tail_fields: usize| {
        let pid = name.rsplit('-').nth(tail_fields);
        pid.and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let entries = |dir: &str| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(PREFIX))
            .collect::<Vec<_>>()
    };
    for name in entries(NETNS_DIR).into_iter().filter(|n| dead(n, 2)) {
        eprintln!("xlb-tests: removing namespace {name} left by a dead test process");
        remove_ns(&name);
    }
    for name in entries(BPFFS).into_iter().filter(|n| dead(n, 1)) {
        eprintln!("xlb-tests: removing pins {BPFFS}/{name} left by a dead test process");
        remove_tree(&Path::new(BPFFS).join(name));
    }
}

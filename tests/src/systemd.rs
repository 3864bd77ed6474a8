//! What systemd does for xlb and its backends, imitated without systemd: `systemctl restart
//! app@N` by a script, and listening sockets passed by socket activation.
use std::{path::PathBuf, process::Command};

use crate::{BACKENDS, Lb, cmd::run_ok, demo_backend_bin, xlb_bin};

/// Backends started by the restart script, killed when the test ends (they are not `Proc`s).
pub struct Restarted(pub PathBuf);

impl Drop for Restarted {
    fn drop(&mut self) {
        for i in 1..=BACKENDS {
            let Ok(pid) = std::fs::read_to_string(self.0.join(format!("app-{i}.pid"))) else { continue };
            let Ok(pid) = pid.trim().parse::<i32>() else { continue };
            // Only if it still is one of ours: the pid may be a reaped `Proc`'s, reused since.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("xlb-demo-backend") {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// `restart.sh N` in `lb.dir`: restarts app-N on port 800N in the lb namespace, like
/// `systemctl restart app@N`: SIGTERM to the pid in `app-N.pid`, wait until the port is free,
/// start a new demo backend there and wait until it listens. Writes the current pids first.
pub fn write_restart_script(lb: &Lb) -> PathBuf {
    let script = lb.dir.join("restart.sh");
    let ip = lb.backends[0].ip();
    let text = format!(
        r#"#!/bin/sh
# restart.sh N: restart app-N on port 800N, like `systemctl restart app@N`.
set -eu
i=$1
dir={dir}
pid=$(cat "$dir/app-$i.pid")
kill -TERM "$pid"
n=0
while ss -Htln "sport = :800$i" | grep -q .; do
    n=$((n + 1)); [ $n -lt 200 ] || {{ echo "app-$i did not stop" >&2; exit 1; }}
    sleep 0.05
done
setsid {demo} --listen {ip}:800$i --name app-$i >"$dir/app-$i.log" 2>&1 </dev/null &
echo $! >"$dir/app-$i.pid"
n=0
until grep -qs "listening on" "$dir/app-$i.log"; do
    n=$((n + 1)); [ $n -lt 200 ] || {{ echo "app-$i did not start" >&2; exit 1; }}
    sleep 0.05
done
echo "app-$i restarted as pid $(cat "$dir/app-$i.pid")"
"#,
        dir = lb.dir.display(),
        demo = demo_backend_bin().display(),
    );
    std::fs::write(&script, text).unwrap();
    let mut chmod = Command::new("chmod");
    chmod.arg("755").arg(&script);
    run_ok(chmod, "chmod");
    for (i, app) in lb.apps.iter().enumerate() {
        let pid = app.as_ref().expect("the backend runs").pid();
        std::fs::write(lb.dir.join(format!("app-{}.pid", i + 1)), pid.to_string()).unwrap();
    }
    script
}

pub fn app_pids(dir: &std::path::Path) -> Vec<String> {
    (1..=BACKENDS)
        .map(|i| std::fs::read_to_string(dir.join(format!("app-{i}.pid"))).unwrap().trim().to_owned())
        .collect()
}

/// `xlb run` on listening sockets passed the way systemd passes them (`LISTEN_FDS`,
/// `LISTEN_PID`, `LISTEN_FDNAMES` = `names`), as fds 3, 4, … in the order of `sockets`. The
/// sockets stay open in the test, as systemd holds them for xlb.socket.
pub fn socket_activated(lb: &Lb, sockets: &[std::net::TcpListener], names: &str) -> Command {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    let fds: Vec<i32> = sockets.iter().map(|s| s.as_raw_fd()).collect();
    let mut cmd = lb.topo.lb("sh");
    // systemd sets LISTEN_PID to the pid it execs; `exec` keeps the shell's.
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(xlb_bin())
        .args(["run", "--config"])
        .arg(&lb.config)
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names);
    assert!(fds.len() <= 8, "at most 8 passed sockets");
    // SAFETY: only fcntl and dup2 (async-signal-safe) between fork and exec; the fds are
    // first moved above 100, so that placing them at 3, 4, … overwrites none still to come.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = [0; 8];
            for (h, &fd) in high.iter_mut().zip(&fds) {
                *h = nix::libc::fcntl(fd, nix::libc::F_DUPFD_CLOEXEC, 100);
                if *h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &h) in high.iter().take(fds.len()).enumerate() {
                if nix::libc::dup2(h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

//! Listening sockets passed in by systemd socket activation (`xlb.socket`), with the semantics
//! of `sd_listen_fds(3)`: `LISTEN_PID` names this process, `LISTEN_FDS` counts the sockets,
//! which are file descriptors 3, 4, …, and `LISTEN_FDNAMES` names them (colon-separated).
//!
//! Why: systemd keeps such sockets open while the daemon restarts, so clients connecting during
//! a restart wait in the listen queue instead of being refused, and the daemon needs no
//! privilege to bind ports below 1024.
//!
//! `init()` runs first thing in `main`, while the process has one thread: it takes the
//! descriptors (close-on-exec, so that health probes or hook commands do not inherit them) and
//! removes the variables from the environment. A listener then asks `take(addr)` for the socket
//! bound to its address and binds one itself when there is none.
use std::{
    net::{SocketAddr, TcpListener},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{Mutex, OnceLock},
};

use nix::sys::socket::{SockaddrLike as _, SockaddrStorage, getsockname, getsockopt, sockopt};

/// `SD_LISTEN_FDS_START`: the first passed descriptor.
const FIRST_FD: RawFd = 3;

/// A passed socket and what is known about it.
#[derive(Debug)]
pub struct Inherited {
    pub fd: OwnedFd,
    /// Its `FileDescriptorName=`, if systemd passed names.
    pub name: Option<String>,
    /// Its local address, when it is a listening TCP socket.
    pub addr: Option<SocketAddr>,
}

static INHERITED: OnceLock<Mutex<Vec<Inherited>>> = OnceLock::new();

/// Why the passed sockets were not usable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListenFdsError {
    #[error("LISTEN_FDS={0:?} is not a number of file descriptors")]
    Count(String),
    #[error("LISTEN_FDNAMES has {names} names for LISTEN_FDS={fds} sockets")]
    Names { names: usize, fds: usize },
}

/// Which descriptors `LISTEN_*` pass to process `own_pid`, with their names: none when
/// `LISTEN_PID` is absent or names another process (the variables were inherited from a
/// parent that got them).
pub fn parse(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    own_pid: u32,
) -> Result<Vec<(RawFd, Option<String>)>, ListenFdsError> {
    if listen_pid.and_then(|p| p.trim().parse::<u32>().ok()) != Some(own_pid) {
        return Ok(Vec::new());
    }
    let Some(count) = listen_fds else { return Ok(Vec::new()) };
    let n: usize = count.trim().parse().map_err(|_| ListenFdsError::Count(count.to_owned()))?;
    if n > 4096 {
        return Err(ListenFdsError::Count(count.to_owned()));
    }
    let names: Vec<Option<String>> = match listen_fdnames {
        None => vec![None; n],
        Some(names) => {
            let names: Vec<Option<String>> = names.split(':').map(|s| Some(s.to_owned())).collect();
            if names.len() != n {
                return Err(ListenFdsError::Names { names: names.len(), fds: n });
            }
            names
        }
    };
    Ok(names.into_iter().enumerate().map(|(i, name)| (FIRST_FD + i as RawFd, name)).collect())
}

/// Takes the sockets systemd passed to this process. Call it once, first thing in `main`,
/// before any thread starts (it edits the environment). Problems are returned for logging;
/// the sockets that could be taken are kept either way.
pub fn init() -> Vec<String> {
    let mut problems = Vec::new();
    let var = |name: &str| std::env::var(name).ok();
    let passed = match parse(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    ) {
        Ok(passed) => passed,
        Err(e) => {
            problems.push(format!("ignoring the sockets passed by systemd: {e}"));
            Vec::new()
        }
    };
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: called at the start of `main`, before any other thread exists.
        unsafe { std::env::remove_var(name) };
    }
    let mut inherited = Vec::new();
    for (fd, name) in passed {
        // SAFETY: F_GETFD only asks whether `fd` is open; it touches nothing.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            problems.push(format!("LISTEN_FDS names descriptor {fd}, which is not open"));
            continue;
        }
        // SAFETY: systemd passed `fd` to this process to own; nothing else in it uses it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sets a flag on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        let addr = listening_tcp_addr(&fd);
        if addr.is_none() {
            problems.push(format!(
                "descriptor {} ({}) passed by systemd is not a listening TCP socket; ListenStream= makes those",
                fd.as_raw_fd(),
                name.as_deref().unwrap_or("unnamed")
            ));
        }
        inherited.push(Inherited { fd, name, addr });
    }
    let _ = INHERITED.set(Mutex::new(inherited));
    problems
}

/// The address of a listening TCP socket; `None` for anything else.
fn listening_tcp_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    let raw = fd.as_raw_fd();
    if getsockopt(fd, sockopt::SockType).ok()? != nix::sys::socket::SockType::Stream || !getsockopt(fd, sockopt::AcceptConn).ok()? {
        return None;
    }
    let addr: SockaddrStorage = getsockname(raw).ok()?;
    match addr.family()? {
        nix::sys::socket::AddressFamily::Inet => addr.as_sockaddr_in().map(|a| SocketAddr::V4((*a).into())),
        nix::sys::socket::AddressFamily::Inet6 => addr.as_sockaddr_in6().map(|a| SocketAddr::V6((*a).into())),
        _ => None,
    }
}

/// The passed listening socket bound to `addr`, once (a second call gets `None`); `None` when
/// systemd passed none for it, and the caller binds one itself.
pub fn take(addr: SocketAddr) -> Option<TcpListener> {
    let mut inherited = INHERITED.get()?.lock().unwrap();
    let i = inherited.iter().position(|s| s.addr == Some(addr))?;
    let socket = inherited.remove(i);
    let listener = TcpListener::from(socket.fd);
    // tokio wants it non-blocking; so does anything that polls it.
    listener.set_nonblocking(true).ok()?;
    Some(listener)
}

/// What was passed and not taken (for a warning: a socket nobody accepts on leaves its clients
/// waiting).
pub fn untaken() -> Vec<String> {
    let Some(inherited) = INHERITED.get() else { return Vec::new() };
    inherited
        .lock()
        .unwrap()
        .iter()
        .map(|s| {
            let name = s.name.as_deref().unwrap_or("unnamed");
            match s.addr {
                Some(addr) => format!("{addr} ({name})"),
                None => format!("descriptor {} ({name})", s.fd.as_raw_fd()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
        os::unix::process::CommandExt as _,
        process::{Command, Stdio},
    };

    use super::*;

    #[test]
    fn parses_like_sd_listen_fds() {
        assert_eq!(parse(Some("42"), Some("2"), None, 42), Ok(vec![(3, None), (4, None)]));
        assert_eq!(
            parse(Some("42"), Some("2"), Some("http:https"), 42),
            Ok(vec![(3, Some("http".into())), (4, Some("https".into()))])
        );
        // Meant for another process (inherited from a parent): not ours.
        assert_eq!(parse(Some("41"), Some("2"), None, 42), Ok(vec![]));
        assert_eq!(parse(None, Some("2"), None, 42), Ok(vec![]));
        assert_eq!(parse(Some("42"), None, None, 42), Ok(vec![]));
        assert_eq!(parse(Some("42"), Some("0"), None, 42), Ok(vec![]));
        assert_eq!(parse(Some("42"), Some("two"), None, 42), Err(ListenFdsError::Count("two".into())));
        assert_eq!(
            parse(Some("42"), Some("2"), Some("http"), 42),
            Err(ListenFdsError::Names { names: 1, fds: 2 })
        );
    }

    /// The child's half of `takes_sockets_a_parent_passed`: run in a process that got two
    /// listening sockets as fds 3 and 4 (and a UDP socket as fd 5), the way systemd passes them.
    #[test]
    #[ignore = "run by takes_sockets_a_parent_passed in a child process"]
    fn socket_activation_child() {
        let expect: Vec<SocketAddr> =
            std::env::var("XLB_EXPECT").unwrap().split(',').map(|a| a.parse().unwrap()).collect();
        let problems = init();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("descriptor 5 (udp) passed by systemd is not a listening TCP socket"), "{problems:?}");
        assert!(std::env::var_os("LISTEN_FDS").is_none() && std::env::var_os("LISTEN_PID").is_none());
        let unrelated: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(take(unrelated).is_none());
        let first = take(expect[0]).expect("the first passed socket");
        assert_eq!(first.local_addr().unwrap(), expect[0]);
        assert!(take(expect[0]).is_none(), "taken twice");
        assert_eq!(untaken(), [format!("{} (https)", expect[1]), "descriptor 5 (udp)".to_string()]);
        // It is the parent's socket: the parent's client connects to it and is answered.
        first.set_nonblocking(false).unwrap();
        let (mut conn, _) = first.accept().unwrap();
        conn.write_all(b"from the child").unwrap();
        println!("child: served");
    }

    #[test]
    fn takes_sockets_a_parent_passed() {
        let http = TcpListener::bind("127.0.0.1:0").unwrap();
        let https = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addrs = [http.local_addr().unwrap(), https.local_addr().unwrap()];
        let fds = [http.as_raw_fd(), https.as_raw_fd(), udp.as_raw_fd()];
        let mut cmd = Command::new("sh");
        // systemd sets LISTEN_PID to the pid of the process it execs; `exec` keeps the shell's.
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "listeners::tests::socket_activation_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env("LISTEN_FDS", "3")
            .env("LISTEN_FDNAMES", "http:https:udp")
            .env("XLB_EXPECT", format!("{},{}", addrs[0], addrs[1]))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only dup/dup2 (async-signal-safe) between fork and exec. The sockets go to
        // 3, 4, 5 without the close-on-exec flag, after moving them out of that range first.
        unsafe {
            cmd.pre_exec(move || {
                let mut high = [0; 3];
                for (h, &fd) in high.iter_mut().zip(&fds) {
                    *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                    if *h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, &h) in high.iter().enumerate() {
                    if libc::dup2(h, FIRST_FD + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        // The child accepts on the first socket, which is still ours too: a connection made
        // before it even started waits in the listen queue.
        let mut client = TcpStream::connect(addrs[0]).unwrap();
        client.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        let mut answer = String::new();
        let read = client.read_to_string(&mut answer);
        let out = child.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "the child failed:\n{text}");
        assert!(text.contains("child: served") && text.contains("1 passed"), "the child test did not run:\n{text}");
        read.unwrap();
        assert_eq!(answer, "from the child");
    }
}

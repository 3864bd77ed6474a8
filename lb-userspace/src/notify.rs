//! systemd's service notification protocol (sd_notify(3)): newline-separated `KEY=value`
//! datagrams such as `READY=1` sent to the unix socket named by `$NOTIFY_SOCKET`. systemd sets
//! it for `Type=notify` services; without it every call here is a no-op, so `xlb run` behaves
//! the same under any supervisor.
use std::{
    ffi::OsStr,
    io,
    os::unix::{
        ffi::OsStrExt as _,
        net::{SocketAddr, UnixDatagram},
    },
    time::Duration,
};

pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `$NOTIFY_SOCKET`, for messages.
    name: String,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` asks for, `None` when it is unset. It is a path, or
    /// `@name` for an abstract socket.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(name) => Notifier::new(&name).map(Some),
            None => Ok(None),
        }
    }

    pub fn new(name: &OsStr) -> io::Result<Notifier> {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = match name.as_bytes() {
            [b'@', abstract_name @ ..] => SocketAddr::from_abstract_name(abstract_name)?,
            [b'/', ..] => SocketAddr::from_pathname(name)?,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "NOTIFY_SOCKET={name:?} is neither an absolute path nor an @abstract socket name"
                    ),
                ));
            }
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            addr,
            name: name.to_string_lossy().into_owned(),
        })
    }

    /// Sends one message, e.g. `READY=1\nSTATUS=serving`.
    pub fn notify(&self, message: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(message.as_bytes(), &self.addr)
            .map(drop)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("notifying systemd through {}: {e}", self.name),
                )
            })
    }
}

/// The watchdog timeout systemd set for this process (`WatchdogSec=`, passed as
/// `$WATCHDOG_USEC`), or `None` when there is none or it is meant for another process
/// (`$WATCHDOG_PID`). Keep-alives (`WATCHDOG=1`) are due at least this often.
pub fn watchdog_timeout() -> Option<Duration> {
    let var = |name| std::env::var(name).ok();
    parse_watchdog(
        var("WATCHDOG_USEC").as_deref(),
        var("WATCHDOG_PID").as_deref(),
        std::process::id(),
    )
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_only_for_this_process() {
        let us = Some(Duration::from_millis(400));
        assert_eq!(parse_watchdog(Some("400000"), None, 7), us);
        assert_eq!(parse_watchdog(Some("400000"), Some("7"), 7), us);
        assert_eq!(parse_watchdog(Some("400000"), Some("8"), 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("soon"), None, 7), None);
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
    }

    #[test]
    fn sends_to_path_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("xlb-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        Notifier::new(path.as_os_str())
            .unwrap()
            .notify("READY=1\nSTATUS=ok")
            .unwrap();
        let mut buf = [0; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=ok");
        drop(receiver);
        std::fs::remove_dir_all(&dir).unwrap();

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("xlb-notify-test-{}", std::process::id());
        let receiver =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        Notifier::new(OsStr::new(&format!("@{name}")))
            .unwrap()
            .notify("WATCHDOG=1")
            .unwrap();
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn rejects_relative_names() {
        let e = Notifier::new(OsStr::new("notify.sock"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("neither an absolute path"), "{e}");
    }
}

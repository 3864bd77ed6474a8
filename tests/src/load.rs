//! Client load through the VIP: short connections in the background while a test acts, and
//! kept-alive connections whose backend must not change.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use socket2::SockRef;

use crate::{BACKENDS, IO_TIMEOUT, Lb, http_get};

/// Bounds the background load of `under_load`, whatever happens to the test.
pub const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// Results of the background load: requests that succeeded, per backend, and the failures.
#[derive(Debug, Default)]
pub struct Load {
    pub ok: usize,
    pub served: [usize; BACKENDS],
    pub failures: Vec<String>,
}

/// Runs `during` while two client threads send one short connection (`GET /`, HTTP/1.0) after
/// another through the VIP; returns its result and what the load saw.
pub fn under_load<T: Send>(lb: &Lb, during: impl FnOnce() -> T + Send) -> (T, Load) {
    let stop = AtomicBool::new(false);
    let vip = lb.vip;
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let stop = &stop;
                scope.spawn(move || {
                    lb.topo.in_client(|| {
                        let mut load = Load::default();
                        let start = Instant::now();
                        while !stop.load(Ordering::Relaxed) && start.elapsed() < LOAD_LIMIT {
                            match http_get(vip, "/", IO_TIMEOUT) {
                                Ok(r) if r.status == 200 => {
                                    load.ok += 1;
                                    load.served[app_index(&r.body)] += 1;
                                }
                                Ok(r) => load.failures.push(format!("HTTP {}", r.status)),
                                Err(e) => load.failures.push(e.to_string()),
                            }
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        load
                    })
                })
            })
            .collect();
        // Some load before, so that every backend carries connections when the rollout starts.
        std::thread::sleep(Duration::from_millis(300));
        let result = during();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let mut total = Load::default();
        for c in clients {
            let load = c.join().expect("a load thread panicked");
            total.ok += load.ok;
            for i in 0..BACKENDS {
                total.served[i] += load.served[i];
            }
            total.failures.extend(load.failures);
        }
        (result, total)
    })
}

/// A connection through the VIP kept open between keep-alive requests.
pub struct Held {
    pub stream: TcpStream,
    /// Index of the backend that answered the first request.
    pub backend: usize,
}

impl Held {
    /// `GET /` (HTTP/1.1, keep-alive) on this connection; the index of the backend answering.
    pub fn request(&mut self) -> usize {
        let peer = self.stream.peer_addr().expect("connected");
        self.stream
            .write_all(format!("GET / HTTP/1.1\r\nHost: {peer}\r\n\r\n").as_bytes())
            .unwrap_or_else(|e| panic!("sending a request on a held connection to {peer}: {e}"));
        let body = read_response(&self.stream)
            .unwrap_or_else(|e| panic!("reading on a held connection to {peer}: {e}"));
        app_index(&body)
    }

    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().unwrap().port()
    }

    /// Closes with an RST instead of a FIN (SO_LINGER 0).
    pub fn reset(self) {
        SockRef::from(&self.stream)
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER 0");
    }
}

/// Reads one keep-alive response (Content-Length framed); returns its body.
pub fn read_response(stream: &TcpStream) -> std::io::Result<String> {
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    if !status_line.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "unexpected status line {status_line:?}"
        )));
    }
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other(
                "connection closed inside the response head",
            ));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse::<usize>().ok();
        }
        if name.eq_ignore_ascii_case("connection") && value.trim().eq_ignore_ascii_case("close") {
            return Err(std::io::Error::other(
                "the server closes a keep-alive connection",
            ));
        }
    }
    let length = length.ok_or_else(|| std::io::Error::other("response without Content-Length"))?;
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    // Nothing else is in flight on this connection, so the reader buffered nothing more.
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `served by app-N` → N-1.
pub fn app_index(body: &str) -> usize {
    body.trim()
        .strip_prefix("served by app-")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| (1..=BACKENDS).contains(n))
        .map(|n| n - 1)
        .unwrap_or_else(|| panic!("unexpected body {body:?}"))
}

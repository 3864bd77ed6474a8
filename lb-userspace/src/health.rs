//! Active health probes, nginx/HAProxy style: every backend is probed on its own schedule, and
//! its up/down state only flips after `rise` consecutive successes or `fall` consecutive
//! failures, so one lost probe does not pull a backend out of rotation.
use std::{
    error::Error as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpStream,
    sync::{mpsc::UnboundedSender, watch},
    task::JoinHandle,
    time::MissedTickBehavior,
};

use crate::config::{CheckKind, Health, Service};

/// Bounds the memory one probe can take: a health endpoint's status line and headers are small,
/// and anything bigger (or a peer that never ends its headers) is treated as a broken backend.
/// 8 KiB is the smallest buffer hyper accepts.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq)]
pub struct ProbeResult {
    pub service: usize,
    pub backend: usize,
    pub ok: bool,
    /// From the start of the connect to the response head (or the failure).
    pub latency: Duration,
    /// Why the probe failed; `None` when it succeeded.
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub service: usize,
    pub backend: usize,
    pub up: bool,
}

/// The rise/fall state of one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hysteresis {
    up: bool,
    /// Consecutive probes that disagreed with `up`.
    streak: u32,
    rise: u32,
    fall: u32,
}

impl Hysteresis {
    pub fn new(up: bool, rise: u32, fall: u32) -> Self {
        Hysteresis {
            up,
            streak: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Marks the backend down without probing: the data path's passive health checks took it
    /// out, and it comes back after `rise` successful probes, like any backend that was down.
    pub fn force_down(&mut self) {
        self.up = false;
        self.streak = 0;
    }

    /// Records one probe; returns the new state when this probe changed it.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        if self.streak < if self.up { self.fall } else { self.rise } {
            return None;
        }
        self.up = ok;
        self.streak = 0;
        Some(ok)
    }
}

/// Spawns one task per backend of every service, probing every `health.interval` with
/// `health.timeout`; the first probe runs at once.
///
/// `initial_up[service][backend]` is the state to start from; a missing entry starts down, so a
/// backend nobody vouched for must pass `rise` probes before it gets traffic. For each probe the
/// transition (if any) is sent before the result, so a receiver that has seen a result can
/// `try_recv` the transition it caused. The tasks end when `shutdown` becomes true, when its
/// sender is dropped, or when a receiver is dropped.
pub fn spawn(
    services: &[Service],
    initial_up: Vec<Vec<bool>>,
    results: UnboundedSender<ProbeResult>,
    transitions: UnboundedSender<Transition>,
    shutdown: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let failed = PassiveFailed::new(services);
    spawn_with_passive(services, initial_up, &failed, results, transitions, shutdown)
}

/// One flag per backend (`[service][backend]`): set when the data path's passive health checks
/// took the backend out. Its prober then counts it down (`Hysteresis::force_down`) before its
/// next probe, so it needs `rise` successful probes to come back.
#[derive(Clone)]
pub struct PassiveFailed(std::sync::Arc<Vec<Vec<std::sync::atomic::AtomicBool>>>);

impl PassiveFailed {
    pub fn new(services: &[Service]) -> Self {
        PassiveFailed(std::sync::Arc::new(
            services.iter().map(|s| s.backends.iter().map(|_| Default::default()).collect()).collect(),
        ))
    }

    pub fn set(&self, service: usize, backend: usize) {
        self.0[service][backend].store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn take(&self, service: usize, backend: usize) -> bool {
        self.0[service][backend].swap(false, std::sync::atomic::Ordering::Relaxed)
    }
}

/// `spawn`, with the flags through which passive health failures reach the probers.
pub fn spawn_with_passive(
    services: &[Service],
    initial_up: Vec<Vec<bool>>,
    failed: &PassiveFailed,
    results: UnboundedSender<ProbeResult>,
    transitions: UnboundedSender<Transition>,
    shutdown: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (s, service) in services.iter().enumerate() {
        for (b, &addr) in service.backends.iter().enumerate() {
            let up = initial_up
                .get(s)
                .and_then(|v| v.get(b))
                .copied()
                .unwrap_or(false);
            let prober = Prober {
                service: s,
                backend: b,
                addr,
                health: service.health.clone(),
                state: Hysteresis::new(up, service.health.rise, service.health.fall),
                failed: failed.clone(),
            };
            let (results, transitions, shutdown) =
                (results.clone(), transitions.clone(), shutdown.clone());
            tasks.push(tokio::spawn(prober.run(results, transitions, shutdown)));
        }
    }
    tasks
}

struct Prober {
    service: usize,
    backend: usize,
    addr: SocketAddr,
    health: Health,
    state: Hysteresis,
    failed: PassiveFailed,
}

impl Prober {
    async fn run(
        mut self,
        results: UnboundedSender<ProbeResult>,
        transitions: UnboundedSender<Transition>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(self.health.interval);
        // After a stall (suspended host, overloaded runtime) probe once, not in a burst.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let probes = async {
            loop {
                ticker.tick().await;
                if self.failed.take(self.service, self.backend) {
                    self.state.force_down();
                }
                let start = Instant::now();
                let outcome =
                    tokio::time::timeout(self.health.timeout, probe(self.addr, &self.health))
                        .await
                        .unwrap_or_else(|_| {
                            Err(format!(
                                "timed out after {}",
                                humantime::format_duration(self.health.timeout)
                            ))
                        });
                let latency = start.elapsed();
                let (service, backend) = (self.service, self.backend);
                // Marked while this probe ran: the failure is newer than the probe's answer.
                if self.failed.take(service, backend) {
                    self.state.force_down();
                }
                if let Some(up) = self.state.record(outcome.is_ok())
                    && transitions
                        .send(Transition {
                            service,
                            backend,
                            up,
                        })
                        .is_err()
                {
                    return;
                }
                let result = ProbeResult {
                    service,
                    backend,
                    ok: outcome.is_ok(),
                    latency,
                    error: outcome.err(),
                };
                if results.send(result).is_err() {
                    return;
                }
            }
        };
        // Cancelling mid-probe is fine: dropping the probe closes its socket.
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|&stop| stop) => {}
            () = probes => {}
        }
    }
}

async fn probe(addr: SocketAddr, health: &Health) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match health.check {
        CheckKind::Tcp => Ok(()),
        CheckKind::Http => {
            let _ = stream.set_nodelay(true);
            http_get(stream, addr, &health.path).await
        }
    }
}

/// `GET path` over `stream` (a connection to `addr`); healthy iff the response status is 2xx or
/// 3xx. The body is never read: the request says `Connection: close`, and dropping the
/// connection discards it. Any byte stream will do, so the fuzz target
/// (lb-userspace/fuzz/fuzz_targets/health_response.rs) feeds it arbitrary responses.
pub async fn http_get<S>(stream: S, addr: SocketAddr, path: &str) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_RESPONSE_HEAD)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(describe)?;
    let request = Request::get(path)
        .header(header::HOST, addr.to_string())
        .header(header::CONNECTION, "close")
        .header(
            header::USER_AGENT,
            concat!("xlb-health/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::new())
        .map_err(|e| format!("cannot build a request for path {path:?}: {e}"))?;
    let mut conn = std::pin::pin!(conn);
    let mut send = std::pin::pin!(sender.send_request(request));
    let response = tokio::select! {
        response = send.as_mut() => response,
        // The connection can finish in the same poll that hands the response over, so the
        // request's own outcome is still the one to report.
        _ = conn.as_mut() => send.await,
    }
    .map_err(describe)?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

fn describe(e: hyper::Error) -> String {
    if e.is_parse() {
        format!("invalid HTTP response: {e}")
    } else if e.is_incomplete_message() || e.is_canceled() {
        "connection closed before a complete response".into()
    } else {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            message = format!("{message}: {cause}");
            source = cause.source();
        }
        message
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
        sync::mpsc::{UnboundedReceiver, unbounded_channel},
    };

    use super::*;
    use crate::config::ServiceMode;

    #[test]
    fn hysteresis_rises_and_falls_after_streaks() {
        let mut h = Hysteresis::new(false, 2, 3);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None, "a failure resets the rise streak");
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
        assert!(h.is_up());
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None, "a success resets the fall streak");
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(false));
        assert!(!h.is_up());
        assert_eq!(h.record(false), None);
    }

    #[test]
    fn hysteresis_of_one_follows_every_probe() {
        let mut h = Hysteresis::new(true, 1, 1);
        assert_eq!(h.record(false), Some(false));
        assert_eq!(h.record(true), Some(true));
        // Zero would mean "never change"; it is treated as one.
        let mut h = Hysteresis::new(true, 0, 0);
        assert_eq!(h.record(false), Some(false));
    }

    #[derive(Clone, Copy, Debug)]
    enum Reply {
        Status(u16),
        /// Read the request, then close without answering.
        Close,
        Garbage,
        /// A response head larger than `MAX_RESPONSE_HEAD`.
        HugeHead,
        /// Never answer.
        Hang,
    }

    /// A backend on 127.0.0.1 that answers every connection with the current `reply` and keeps
    /// the request heads it received.
    struct FakeBackend {
        addr: SocketAddr,
        reply: Arc<Mutex<Reply>>,
        requests: Arc<Mutex<Vec<String>>>,
    }

    impl FakeBackend {
        async fn start(reply: Reply) -> FakeBackend {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let backend = FakeBackend {
                addr: listener.local_addr().unwrap(),
                reply: Arc::new(Mutex::new(reply)),
                requests: Arc::default(),
            };
            let (reply, requests) = (backend.reply.clone(), backend.requests.clone());
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let reply = *reply.lock().unwrap();
                    tokio::spawn(answer(stream, reply, requests.clone()));
                }
            });
            backend
        }

        fn set(&self, reply: Reply) {
            *self.reply.lock().unwrap() = reply;
        }
    }

    async fn answer(mut stream: TcpStream, reply: Reply, requests: Arc<Mutex<Vec<String>>>) {
        let mut head = Vec::new();
        let mut buf = [0; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        requests
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(&head).into_owned());
        let response = match reply {
            Reply::Status(code) => format!(
                "HTTP/1.1 {code} Whatever\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
            )
            .into_bytes(),
            Reply::Close => return,
            Reply::Garbage => b"\x00\xff\xfeSSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec(),
            Reply::HugeHead => format!(
                "HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n",
                "a".repeat(64 * 1024)
            )
            .into_bytes(),
            Reply::Hang => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
        };
        let _ = stream.write_all(&response).await;
    }

    fn service(backends: Vec<SocketAddr>, check: CheckKind, rise: u32, fall: u32) -> Service {
        Service {
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            slow_start: Duration::ZERO,
            name: "web".into(),
            listen: "203.0.113.10:80".parse().unwrap(),
            mode: ServiceMode::L4,
            backends,
            https: None,
            health: Health {
                check,
                path: "/healthz?full=1".into(),
                // Below the config minimum to keep the test fast; the prober does not care.
                interval: Duration::from_millis(30),
                timeout: Duration::from_millis(300),
                rise,
                fall,
            },
        }
    }

    struct Probes {
        results: UnboundedReceiver<ProbeResult>,
        transitions: UnboundedReceiver<Transition>,
        stop: watch::Sender<bool>,
        tasks: Vec<JoinHandle<()>>,
    }

    impl Probes {
        fn spawn(services: &[Service], initial_up: Vec<Vec<bool>>) -> Probes {
            let (results_tx, results) = unbounded_channel();
            let (transitions_tx, transitions) = unbounded_channel();
            let (stop, stop_rx) = watch::channel(false);
            let tasks = spawn(services, initial_up, results_tx, transitions_tx, stop_rx);
            Probes {
                results,
                transitions,
                stop,
                tasks,
            }
        }

        /// The next probe result and the transition it caused, if any.
        async fn next(&mut self) -> (ProbeResult, Option<Transition>) {
            let result = tokio::time::timeout(Duration::from_secs(5), self.results.recv())
                .await
                .expect("no probe result within 5s")
                .expect("probe tasks ended");
            (result, self.transitions.try_recv().ok())
        }
    }

    #[tokio::test]
    async fn http_transitions_after_exactly_rise_and_fall_probes() {
        let backend = FakeBackend::start(Reply::Status(200)).await;
        let mut probes = Probes::spawn(
            &[service(vec![backend.addr], CheckKind::Http, 2, 3)],
            vec![vec![false]],
        );
        let up = Some(Transition {
            service: 0,
            backend: 0,
            up: true,
        });
        let down = Some(Transition {
            service: 0,
            backend: 0,
            up: false,
        });

        let (first, transition) = probes.next().await;
        assert!(
            first.ok && first.error.is_none() && (first.service, first.backend) == (0, 0),
            "{first:?}"
        );
        assert_eq!(transition, None);
        assert_eq!(probes.next().await.1, up, "up after rise = 2 successes");

        backend.set(Reply::Status(500));
        for n in 1..=3 {
            let (result, transition) = probes.next().await;
            assert_eq!(
                result.error.as_deref(),
                Some("HTTP 500 Internal Server Error")
            );
            assert_eq!(
                transition,
                if n == 3 { down } else { None },
                "probe {n} of fall = 3"
            );
        }

        backend.set(Reply::Close);
        let (result, transition) = probes.next().await;
        assert_eq!(
            result.error.as_deref(),
            Some("connection closed before a complete response")
        );
        assert_eq!(transition, None);
        backend.set(Reply::Status(302));
        let (result, transition) = probes.next().await;
        assert!(
            result.ok && transition.is_none(),
            "3xx is healthy: {result:?}"
        );
        backend.set(Reply::Garbage);
        let (result, transition) = probes.next().await;
        let error = result.error.unwrap();
        assert!(error.starts_with("invalid HTTP response"), "{error}");
        assert_eq!(transition, None, "the failure reset the rise streak");
        backend.set(Reply::Status(204));
        assert_eq!(probes.next().await.1, None);
        assert_eq!(probes.next().await.1, up);

        let requests = backend.requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 10);
        let request = requests[0].to_ascii_lowercase();
        assert!(
            request.starts_with("get /healthz?full=1 http/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains(&format!("\r\nhost: {}\r\n", backend.addr)),
            "{request}"
        );
        assert!(request.contains("\r\nconnection: close\r\n"), "{request}");
    }

    #[tokio::test]
    async fn http_failures_are_bounded_and_described() {
        let backend = FakeBackend::start(Reply::HugeHead).await;
        let mut probes = Probes::spawn(
            &[service(vec![backend.addr], CheckKind::Http, 1, 1)],
            vec![vec![true]],
        );
        let (result, transition) = probes.next().await;
        let error = result.error.unwrap();
        assert!(error.starts_with("invalid HTTP response"), "{error}");
        assert_eq!(
            transition,
            Some(Transition {
                service: 0,
                backend: 0,
                up: false
            })
        );

        backend.set(Reply::Hang);
        let (result, _) = probes.next().await;
        assert_eq!(result.error.as_deref(), Some("timed out after 300ms"));
        assert!(
            result.latency >= Duration::from_millis(300),
            "{:?}",
            result.latency
        );
    }

    #[tokio::test]
    async fn tcp_check_and_several_backends() {
        let listening = FakeBackend::start(Reply::Close).await;
        // A port that was just free: connecting to it is refused.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let services = [
            service(vec![listening.addr], CheckKind::Http, 1, 1),
            service(vec![closed, listening.addr], CheckKind::Tcp, 1, 1),
        ];
        let mut probes = Probes::spawn(&services, vec![vec![true], vec![true, false]]);
        assert_eq!(probes.tasks.len(), 3);
        let mut seen = std::collections::BTreeMap::new();
        while seen.len() < 3 {
            let (result, transition) = probes.next().await;
            if let Some(t) = transition {
                assert_eq!((t.service, t.backend), (result.service, result.backend));
            }
            seen.entry((result.service, result.backend)).or_insert((
                result.ok,
                result.error,
                transition.map(|t| t.up),
            ));
        }
        let refused = &seen[&(1, 0)];
        assert!(
            !refused.0 && refused.1.as_deref().unwrap().starts_with("connect: "),
            "{refused:?}"
        );
        assert_eq!(refused.2, Some(false));
        // The TCP check passes where the HTTP check of the same server fails.
        assert_eq!(seen[&(1, 1)], (true, None, Some(true)));
        assert_eq!(seen[&(0, 0)].2, Some(false));
    }

    #[tokio::test]
    async fn shutdown_stops_every_task_mid_probe() {
        let backend = FakeBackend::start(Reply::Hang).await;
        let mut hanging = service(vec![backend.addr; 2], CheckKind::Http, 1, 1);
        hanging.health.interval = Duration::from_secs(60);
        hanging.health.timeout = Duration::from_secs(30);
        // Backends missing from `initial_up` start down.
        let mut probes = Probes::spawn(&[hanging], vec![]);
        while backend.requests.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        probes.stop.send(true).unwrap();
        for task in probes.tasks.drain(..) {
            tokio::time::timeout(Duration::from_secs(1), task)
                .await
                .expect("task did not stop")
                .unwrap();
        }
        assert!(
            probes.results.try_recv().is_err(),
            "the hanging probes were cancelled, not completed"
        );
    }
}

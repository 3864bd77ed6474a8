//! `xlb-rate-client`: an open-loop HTTP/1.1 load generator for `cargo xtask bench`. It sends
//! `GET /` at a fixed rate over a fixed set of keep-alive connections and prints latency
//! percentiles in one line of `key=value` pairs.
//!
//! Open loop, with coordinated-omission correction: request `i` is *due* at `start + i/rate`,
//! whether or not the server kept up, and its latency is measured from that due time, not from
//! when a connection got round to sending it. A server that stalls for 100 ms therefore shows
//! the stall in every request that was due during it (as users would see), instead of in the
//! one request that happened to be in flight (what closed-loop tools like wrk report).
//!
//! Timing: tokio's timer has millisecond granularity, far coarser than the latencies measured
//! here, so requests are released by a pacer thread of its own sleeping with `nanosleep` (timer
//! slack 1 µs) until each due time; the connections run on a single-threaded tokio runtime.
//! Neither spins: a busy client would compete with the kernel's packet processing on its CPU.
use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, client::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::Notify};

#[derive(Parser)]
#[command(about = "Open-loop fixed-rate HTTP/1.1 client with coordinated-omission correction")]
struct Args {
    /// Server address (ip:port); requests are `GET /`.
    #[arg(long)]
    target: SocketAddr,
    /// Requests per second, scheduled evenly.
    #[arg(long)]
    rate: f64,
    /// Keep-alive connections the requests are spread over.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds of scheduled requests.
    #[arg(long)]
    duration: f64,
    /// Per-request timeout in milliseconds; a request that times out is an error.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

/// Shared by the pacer and the connections. One runtime thread, so the locks never contend.
struct Shared {
    start: Instant,
    interval: Duration,
    /// Indices of requests that are due and not yet taken by a connection.
    due: Mutex<VecDeque<u64>>,
    ready: Notify,
    pacing_done: AtomicBool,
    latencies_ns: Mutex<Vec<u64>>,
}

impl Shared {
    fn due_at(&self, i: u64) -> Instant {
        self.start + self.interval.mul_f64(i as f64)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(args.rate > 0.0 && args.duration > 0.0 && args.connections > 0) {
        bail!("--rate, --duration and --connections must be positive");
    }
    let total = (args.rate * args.duration).round() as u64;
    // Connected (and warmed with one request each) before the clock starts.
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let mut conn = Conn::open(args.target).await?;
        conn.get(args.target).await.context("warm-up request")?;
        conns.push(conn);
    }
    let shared = Arc::new(Shared {
        start: Instant::now() + Duration::from_millis(5),
        interval: Duration::from_secs_f64(1.0 / args.rate),
        due: Mutex::default(),
        ready: Notify::new(),
        pacing_done: AtomicBool::new(false),
        latencies_ns: Mutex::new(Vec::with_capacity(total as usize)),
    });
    let timeout = Duration::from_millis(args.timeout_ms);
    let workers: Vec<_> = conns
        .into_iter()
        .map(|conn| tokio::spawn(worker(conn, args.target, shared.clone(), timeout)))
        .collect();
    let pacer = {
        let shared = shared.clone();
        std::thread::spawn(move || pace(&shared, total))
    };
    // The pacer's end is awaited without blocking the runtime the connections run on.
    while !pacer.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Bounded drain: whatever is still queued or in flight after this counts as an error.
    let drain = tokio::time::sleep(timeout + Duration::from_secs(1));
    tokio::pin!(drain);
    for w in workers {
        tokio::select! {
            _ = w => {}
            _ = &mut drain => break,
        }
    }
    let elapsed = shared.start.elapsed().as_secs_f64();
    let mut lat = std::mem::take(&mut *shared.latencies_ns.lock().unwrap());
    let ok = lat.len() as u64;
    // Failed, timed out, or still queued or in flight when the drain ended.
    let errors = total - ok;
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[rank.clamp(1, lat.len()) - 1] as f64 / 1000.0
    };
    println!(
        "scheduled={total} ok={ok} errors={errors} rate={:.1} p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1}",
        ok as f64 / elapsed,
        pct(50.0),
        pct(99.0),
        pct(99.9),
        pct(100.0),
    );
    Ok(())
}

/// Releases request `i` at its due time (all those already due at once, when late).
fn pace(shared: &Shared, total: u64) {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe { nix::libc::prctl(nix::libc::PR_SET_TIMERSLACK, 1000u64, 0, 0, 0) };
    let mut i = 0;
    while i < total {
        let now = Instant::now();
        let due_at = shared.due_at(i);
        if due_at > now {
            std::thread::sleep(due_at - now);
            continue;
        }
        let mut due = shared.due.lock().unwrap();
        while i < total && shared.due_at(i) <= now {
            due.push_back(i);
            i += 1;
        }
        let released = due.len();
        drop(due);
        for _ in 0..released {
            shared.ready.notify_one();
        }
    }
    shared.pacing_done.store(true, Ordering::SeqCst);
    // Wake every idle connection so that it sees pacing is over.
    shared.ready.notify_waiters();
}

async fn worker(mut conn: Conn, target: SocketAddr, shared: Arc<Shared>, timeout: Duration) {
    loop {
        // Registered before the queue is looked at, so that a wake-up in between is not lost.
        let notified = shared.ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = shared.due.lock().unwrap().pop_front();
        let Some(i) = next else {
            if shared.pacing_done.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
            continue;
        };
        let due_at = shared.due_at(i);
        // A connection the server closed (e.g. after its keep-alive request limit) is replaced
        // first; the time that takes counts in this request's latency.
        if conn.sender.ready().await.is_err() {
            match Conn::open(target).await {
                Ok(fresh) => conn = fresh,
                Err(_) => return, // This request, and the ones it leaves queued, are errors.
            }
        }
        match tokio::time::timeout(timeout, conn.get(target)).await {
            // From the due time, not the send time: see the module comment.
            Ok(Ok(())) => {
                let ns = due_at.elapsed().as_nanos() as u64;
                shared.latencies_ns.lock().unwrap().push(ns);
            }
            // Counted as an error by its missing latency.
            _ => {
                // A failed connection is replaced; if that fails too, this one stops.
                match Conn::open(target).await {
                    Ok(fresh) => conn = fresh,
                    Err(_) => return,
                }
            }
        }
    }
}

struct Conn {
    sender: http1::SendRequest<Empty<Bytes>>,
}

impl Conn {
    async fn open(target: SocketAddr) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(target)
            .await
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn { sender })
    }

    /// `GET /`, reading the whole body; an error unless the status is 2xx.
    async fn get(&mut self, target: SocketAddr) -> anyhow::Result<()> {
        self.sender.ready().await?;
        let request = Request::get("/")
            .header(hyper::header::HOST, target.to_string())
            .body(Empty::new())?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        if !status.is_success() {
            bail!("status {status}");
        }
        Ok(())
    }
}

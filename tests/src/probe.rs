//! A probe client for the abuse scenarios: ordinary `GET /` requests at a steady rate over an
//! HTTP/2 and an HTTP/1.1 connection in turn (each kept alive, and replaced every
//! `NEW_CONNECTION_EVERY` requests so that new connections are tried too), counting what was
//! answered while a test attacks the server on other connections.
use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;

use crate::{Conn, SITE, Site};

/// Requests on one connection before the probe opens a new one.
const NEW_CONNECTION_EVERY: usize = 25;
/// Errors kept for the report.
const ERRORS_KEPT: usize = 20;

#[derive(Default)]
pub struct Probe {
    ok: AtomicUsize,
    failed: AtomicUsize,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// What the probe saw.
#[derive(Debug)]
pub struct ProbeResult {
    pub ok: usize,
    pub failed: usize,
    /// The first errors, with when they happened.
    pub errors: Vec<String>,
}

impl Probe {
    /// Requests every `interval` until `stop` (run it on a thread of its own, in a scope
    /// whose other thread calls `stop`, e.g. through `stop_on_drop`).
    pub fn run(&self, site: &Site, interval: Duration) {
        let rt = crate::runtime();
        let started = Instant::now();
        let mut conns: [Option<Conn>; 2] = [None, None];
        let mut n = 0usize;
        while !self.stop.load(Ordering::Relaxed) {
            let next = Instant::now() + interval;
            let h2 = n.is_multiple_of(2);
            let slot = &mut conns[usize::from(h2)];
            if n % (2 * NEW_CONNECTION_EVERY) < 2 {
                *slot = None;
            }
            if slot.is_none() {
                // Opened on this thread's runtime, which drives the connection's task.
                let tcp = site.tcp(site.https());
                *slot = rt.block_on(Conn::open(tcp, site.tls.clone(), SITE, h2)).map_err(|e| self.failure(started, h2, format!("connecting: {e}"))).ok();
            }
            let Some(conn) = slot else {
                n += 1;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                continue;
            };
            let answer = rt.block_on(conn.send("GET", "/", &[], Bytes::new()));
            match answer {
                Ok(a) if a.status == 200 => {
                    self.ok.fetch_add(1, Ordering::Relaxed);
                }
                other => {
                    // The connection is given up; the next request opens a new one.
                    *slot = None;
                    self.failure(started, h2, format!("{other:?}"));
                }
            }
            n += 1;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    }

    fn failure(&self, started: Instant, h2: bool, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < ERRORS_KEPT {
            let proto = if h2 { "HTTP/2" } else { "HTTP/1.1" };
            errors.push(format!("{:.2} s, {proto}: {what}", started.elapsed().as_secs_f64()));
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops the probe when dropped: a failed assertion in the scope must still end it, or the
    /// scope waits forever.
    pub fn stop_on_drop(&self) -> impl Drop + '_ {
        struct Stop<'a>(&'a Probe);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.stop();
            }
        }
        Stop(self)
    }

    pub fn result(&self) -> ProbeResult {
        ProbeResult {
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            errors: self.errors.lock().unwrap().clone(),
        }
    }
}

impl ProbeResult {
    pub fn total(&self) -> usize {
        self.ok + self.failed
    }

    /// Answered 200, in percent.
    pub fn success_percent(&self) -> f64 {
        100.0 * self.ok as f64 / self.total().max(1) as f64
    }

    /// Panics unless at least `min_requests` were made and at least `percent` of them answered.
    pub fn assert_success(&self, percent: f64, min_requests: usize, during: &str) {
        assert!(self.total() >= min_requests, "the probe client made {} requests during {during}; a check needs {min_requests}", self.total());
        assert!(
            self.success_percent() >= percent,
            "the probe client got {:.2} % answered during {during} ({} of {}), under {percent} %: {:#?}",
            self.success_percent(),
            self.ok,
            self.total(),
            self.errors
        );
    }
}

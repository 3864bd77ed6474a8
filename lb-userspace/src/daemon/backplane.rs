//! What the HTTPS proxy shares with the rest of the daemon (see `https::Backplane`): the data
//! path's live counts, its own requests in flight, published to the data path so that both paths balance one load, and its
//! failed requests, which go to the state machine as passive health.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, mpsc, watch};
use tracing::warn;

use super::{RECONCILE_INTERVAL, Shared};
use crate::{
    backends::{Event, monotonic_ns},
    config::{Config, ServiceMode},
    dataplane::{ConnsReader, Dataplane},
    https,
    layout::Layout,
};

/// How long in-flight changes are gathered before they are written to the data path: one map
/// write per burst of requests rather than two per request.
const PUBLISH_DEBOUNCE: Duration = Duration::from_millis(2);

/// How old the data path's live counts may be when the proxy picks a backend. Reading them is
/// one map lookup (a system call) per L4 slot: done for every request, that was the largest
/// cost of a keep-alive request after TLS itself. Flows come and go far slower than requests,
/// so the proxy reads a snapshot, and whichever request finds it older than this refreshes it.
const L4_SNAPSHOT_MAX_AGE_NS: u64 = 5_000_000;

/// A failed request: (config generation, service, backend).
type Failure = (u64, usize, usize);
pub(super) type Failures = mpsc::UnboundedReceiver<Failure>;

pub(super) struct Backplane {
    /// The counts of every backend address an `https` service has had: one kept by a reload
    /// keeps its counts, and requests still under way to one that left end against its own.
    counts: RwLock<HashMap<SocketAddr, Arc<Counts>>>,
    /// The L4 slots of each backend address: where the data path counts its connections, and
    /// where the in-flight requests are published for it. Replaced by a reload.
    l4_slots: RwLock<HashMap<SocketAddr, Vec<u32>>>,
    conns: ConnsReader,
    /// When the live counts were last read (monotonic ns; 0: never, or invalidated by a
    /// reload).
    l4_read_at: AtomicU64,
    /// Fires when an in-flight count changes.
    changed: Notify,
    failures: mpsc::UnboundedSender<Failure>,
}

/// The HTTPS path's counts of one backend address.
#[derive(Default)]
struct Counts {
    /// Requests in flight now, and sent in all.
    in_flight: AtomicI64,
    sent: AtomicU64,
    /// The data path's live connections to it, as last read.
    l4_live: AtomicI64,
}

impl Backplane {
    pub(super) fn new(config: &Config, layout: &Layout, conns: ConnsReader) -> (Backplane, Failures) {
        let (failures, failed) = mpsc::unbounded_channel();
        let backplane = Backplane {
            counts: RwLock::default(),
            l4_read_at: AtomicU64::new(0),
            l4_slots: RwLock::default(),
            conns,
            changed: Notify::new(),
            failures,
        };
        backplane.relayout(config, layout);
        (backplane, failed)
    }

    fn l4_slots(config: &Config, layout: &Layout) -> HashMap<SocketAddr, Vec<u32>> {
        let mut l4_slots: HashMap<SocketAddr, Vec<u32>> = HashMap::new();
        for (s, svc) in config.services.iter().enumerate().filter(|(_, s)| s.mode == ServiceMode::L4) {
            for (b, &addr) in svc.backends.iter().enumerate() {
                l4_slots.entry(addr).or_default().push(layout.slot(s, b));
            }
        }
        l4_slots
    }

    /// At start and after a reload: the `https` backend addresses of `config`, and the L4
    /// slots of `layout`.
    pub(super) fn relayout(&self, config: &Config, layout: &Layout) {
        {
            let mut counts = self.counts.write().unwrap();
            for svc in config.services.iter().filter(|s| s.mode != ServiceMode::L4) {
                for &addr in &svc.backends {
                    counts.entry(addr).or_default();
                }
            }
        }
        *self.l4_slots.write().unwrap() = Self::l4_slots(config, layout);
        self.l4_read_at.store(0, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// The proxy's requests to `addr`: in flight now, and sent in all.
    pub(super) fn requests(&self, addr: SocketAddr) -> (u64, u64) {
        self.counts_of(addr).map_or((0, 0), |c| (c.in_flight.load(Ordering::Relaxed).max(0) as u64, c.sent.load(Ordering::Relaxed)))
    }

    fn counts_of(&self, addr: SocketAddr) -> Option<Arc<Counts>> {
        self.counts.read().unwrap().get(&addr).cloned()
    }

    /// Reads the data path's live counts of every `https` backend address into the snapshot
    /// if it is older than `L4_SNAPSHOT_MAX_AGE_NS`; one caller at a time does the reading.
    fn refresh_l4_snapshot(&self) {
        let now = monotonic_ns();
        let read_at = self.l4_read_at.load(Ordering::Relaxed);
        if now.saturating_sub(read_at) < L4_SNAPSHOT_MAX_AGE_NS
            || self.l4_read_at.compare_exchange(read_at, now, Ordering::AcqRel, Ordering::Relaxed).is_err()
        {
            return;
        }
        let slots = self.l4_slots.read().unwrap();
        for (addr, counts) in self.counts.read().unwrap().iter() {
            let n = slots.get(addr).map_or(0, |slots| slots.iter().map(|&s| self.conns.live(s).max(0)).sum());
            counts.l4_live.store(n, Ordering::Relaxed);
        }
    }

    /// Writes the in-flight count of every address the HTTPS path has had into the `PROXIED`
    /// entry of each L4 slot with that address (nothing, when no `https` backend is also an L4
    /// one).
    fn publish(&self, dp: &mut Dataplane) -> anyhow::Result<()> {
        let counts = self.counts.read().unwrap();
        for (addr, slots) in self.l4_slots.read().unwrap().iter() {
            let Some(c) = counts.get(addr) else { continue };
            let n = c.in_flight.load(Ordering::Relaxed).max(0);
            for &slot in slots {
                dp.set_proxied(slot, n)?;
            }
        }
        Ok(())
    }
}

impl https::Backplane for Backplane {
    fn l4_live(&self, addr: SocketAddr) -> i64 {
        self.refresh_l4_snapshot();
        self.counts.read().unwrap().get(&addr).map_or(0, |c| c.l4_live.load(Ordering::Relaxed))
    }

    fn in_flight(&self, addr: SocketAddr) -> i64 {
        self.counts.read().unwrap().get(&addr).map_or(0, |c| c.in_flight.load(Ordering::Relaxed).max(0))
    }

    fn add_in_flight(&self, addr: SocketAddr, delta: i64) {
        if let Some(c) = self.counts.read().unwrap().get(&addr) {
            c.in_flight.fetch_add(delta, Ordering::Relaxed);
            if delta > 0 {
                c.sent.fetch_add(delta as u64, Ordering::Relaxed);
            }
            if self.l4_slots.read().unwrap().contains_key(&addr) {
                self.changed.notify_one();
            }
        }
    }

    fn failed(&self, generation: u64, service: usize, backend: usize) {
        let _ = self.failures.send((generation, service, backend));
    }
}

/// Passive health of the HTTPS path: each failed request goes to the state machine, which
/// counts it in the backend's one passive health record.
pub(super) async fn forward_failures(sh: Arc<Shared>, mut failures: Failures, mut stop: watch::Receiver<bool>) {
    loop {
        // The sender lives as long as the daemon: stop on shutdown, not on a closed channel.
        let (generation, service, backend) = tokio::select! {
            f = failures.recv() => match f {
                Some(f) => f,
                None => return,
            },
            _ = stop.changed() => return,
        };
        let mut backends = sh.backends.lock().unwrap();
        let mut dp = sh.dp.lock().unwrap();
        // A failed write is logged where it happened; the next failure tries again.
        let _ = backends.apply(&mut *dp, Event::ProxyFailed { generation, service, backend, now_ns: monotonic_ns() });
    }
}

/// The HTTPS path's in-flight requests, published to the data path on every change (a burst at
/// a time) and every reconcile period.
pub(super) async fn publish(sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = sh.backplane.changed.notified() => tokio::time::sleep(PUBLISH_DEBOUNCE).await,
            _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        if sh.backplane.counts.read().unwrap().is_empty() {
            // No `https` service has had a backend yet.
            continue;
        }
        let sh = sh.clone();
        let done = tokio::task::spawn_blocking(move || sh.backplane.publish(&mut sh.dp.lock().unwrap())).await;
        if let Ok(Err(e)) = done {
            warn!("publishing HTTPS requests in flight to the data path: {e:#}");
        }
    }
}

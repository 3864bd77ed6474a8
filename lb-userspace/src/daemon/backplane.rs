//! What the HTTPS proxy shares with the rest of the daemon (see `https::Backplane`): which
//! backends it may use (the state machine's `ProxyView`), the data path's live counts, its own
//! requests in flight, published to the data path so that both paths balance one load, and its
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
    backends::{Event, ProxyView, monotonic_ns},
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

/// A failed request: (service, backend).
pub(super) type Failures = mpsc::UnboundedReceiver<(usize, usize)>;

pub(super) struct Backplane {
    view: ProxyView,
    /// Requests of the HTTPS path in flight, and sent in all, per backend address.
    in_flight: HashMap<SocketAddr, (AtomicI64, AtomicU64)>,
    /// The L4 slots of each backend address: where the data path counts its connections, and
    /// where the in-flight requests are published for it. Replaced by a reload.
    l4_slots: RwLock<HashMap<SocketAddr, Vec<u32>>>,
    conns: ConnsReader,
    /// The data path's live connections per `https` backend address, as last read, and when
    /// (monotonic ns; 0: never, or invalidated by a reload).
    l4_snapshot: HashMap<SocketAddr, AtomicI64>,
    l4_read_at: AtomicU64,
    /// Fires when an in-flight count changes.
    changed: Notify,
    failures: mpsc::UnboundedSender<(usize, usize)>,
}

impl Backplane {
    pub(super) fn new(config: &Config, layout: &Layout, conns: ConnsReader, view: ProxyView) -> (Backplane, Failures) {
        let mut in_flight = HashMap::new();
        for svc in config.services.iter().filter(|s| s.mode != ServiceMode::L4) {
            for &addr in &svc.backends {
                in_flight.entry(addr).or_insert_with(Default::default);
            }
        }
        let (failures, failed) = mpsc::unbounded_channel();
        let l4_snapshot = in_flight.keys().map(|&addr| (addr, AtomicI64::new(0))).collect();
        let backplane = Backplane {
            view,
            in_flight,
            l4_snapshot,
            l4_read_at: AtomicU64::new(0),
            l4_slots: RwLock::new(Self::l4_slots(config, layout)),
            conns,
            changed: Notify::new(),
            failures,
        };
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

    /// After a reload: the L4 slots of the new layout (the `https` services are unchanged).
    pub(super) fn relayout(&self, config: &Config, layout: &Layout) {
        *self.l4_slots.write().unwrap() = Self::l4_slots(config, layout);
        self.l4_read_at.store(0, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// The proxy's requests to `addr`: in flight now, and sent in all.
    pub(super) fn requests(&self, addr: SocketAddr) -> (u64, u64) {
        self.in_flight.get(&addr).map_or((0, 0), |(n, t)| (n.load(Ordering::Relaxed).max(0) as u64, t.load(Ordering::Relaxed)))
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
        for (addr, live) in &self.l4_snapshot {
            let n = slots.get(addr).map_or(0, |slots| slots.iter().map(|&s| self.conns.live(s).max(0)).sum());
            live.store(n, Ordering::Relaxed);
        }
    }

    /// Writes every address's in-flight count into the `PROXIED` entry of each L4 slot with
    /// that address.
    fn publish(&self, dp: &mut Dataplane) -> anyhow::Result<()> {
        for (addr, slots) in self.l4_slots.read().unwrap().iter() {
            let n = https::Backplane::in_flight(self, *addr);
            for &slot in slots {
                dp.set_proxied(slot, n)?;
            }
        }
        Ok(())
    }
}

impl https::Backplane for Backplane {
    fn usable(&self, service: usize, backend: usize) -> bool {
        self.view.usable(service, backend)
    }

    fn l4_live(&self, addr: SocketAddr) -> i64 {
        self.refresh_l4_snapshot();
        self.l4_snapshot.get(&addr).map_or(0, |n| n.load(Ordering::Relaxed))
    }

    fn in_flight(&self, addr: SocketAddr) -> i64 {
        self.in_flight.get(&addr).map_or(0, |(n, _)| n.load(Ordering::Relaxed).max(0))
    }

    fn add_in_flight(&self, addr: SocketAddr, delta: i64) {
        if let Some((n, total)) = self.in_flight.get(&addr) {
            n.fetch_add(delta, Ordering::Relaxed);
            if delta > 0 {
                total.fetch_add(delta as u64, Ordering::Relaxed);
            }
            if self.l4_slots.read().unwrap().contains_key(&addr) {
                self.changed.notify_one();
            }
        }
    }

    fn failed(&self, service: usize, backend: usize) {
        let _ = self.failures.send((service, backend));
    }
}

/// Passive health of the HTTPS path: each failed request goes to the state machine, which
/// counts it in the backend's one passive health record.
pub(super) async fn forward_failures(sh: Arc<Shared>, mut failures: Failures, mut stop: watch::Receiver<bool>) {
    loop {
        // The sender lives as long as the daemon: stop on shutdown, not on a closed channel.
        let (service, backend) = tokio::select! {
            f = failures.recv() => match f {
                Some(f) => f,
                None => return,
            },
            _ = stop.changed() => return,
        };
        let mut backends = sh.backends.lock().unwrap();
        let mut dp = sh.dp.lock().unwrap();
        // A failed write is logged where it happened; the next failure tries again.
        let _ = backends.apply(&mut *dp, Event::ProxyFailed { service, backend, now_ns: monotonic_ns() });
    }
}

/// The HTTPS path's in-flight requests, published to the data path on every change (a burst at
/// a time) and every reconcile period.
pub(super) async fn publish(sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    if sh.backplane.in_flight.is_empty() {
        return;
    }
    loop {
        tokio::select! {
            _ = sh.backplane.changed.notified() => tokio::time::sleep(PUBLISH_DEBOUNCE).await,
            _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        let sh = sh.clone();
        let done = tokio::task::spawn_blocking(move || sh.backplane.publish(&mut sh.dp.lock().unwrap())).await;
        if let Ok(Err(e)) = done {
            warn!("publishing HTTPS requests in flight to the data path: {e:#}");
        }
    }
}

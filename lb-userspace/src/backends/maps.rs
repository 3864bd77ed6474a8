//! What `Backends` and the reconcile need from the data path's maps, and from the alerts: two
//! traits, so that both can be driven by an in-memory implementation in unit tests. The real
//! ones are `dataplane::Dataplane` and `alert::Alerts`.

use lb_common::{
    backend::Passive,
    flow::{Flow, FlowKey, ReplyNat},
};

use super::BackendState;
use crate::alert::{Alerts, Event};

/// The backend slots of the data path (`BACKENDS`, `BACKEND_CONNS`, `BACKEND_FLOWS`, `PASSIVE`)
/// and its flow table, addressed by slot.
pub trait Maps {
    /// The state in `BACKENDS`; `None` for an empty slot.
    fn state(&self, slot: u32) -> anyhow::Result<Option<BackendState>>;
    fn set_state(&mut self, slot: u32, state: BackendState) -> anyhow::Result<()>;
    /// The passive health record (see `lb_common::backend::Passive`).
    fn passive(&self, slot: u32) -> anyhow::Result<Passive>;
    fn set_passive(&mut self, slot: u32, passive: Passive) -> anyhow::Result<()>;
    /// A backend comes (back) up: its failure window starts empty, and its slow-start ramp (if
    /// the service has one) from `now_ns`. Failure totals are kept.
    fn restart_passive(&mut self, slot: u32, now_ns: u64) -> anyhow::Result<()> {
        let p = self.passive(slot)?;
        let up_since_ns = if p.slow_start_ns > 0 { now_ns } else { 0 };
        self.set_passive(slot, Passive { fails: 0, window_start_ns: 0, up_since_ns, ..p })
    }
    /// Live connections (`BACKEND_CONNS.live`, which the data path updates atomically).
    fn live(&self, slot: u32) -> anyhow::Result<i64>;
    fn set_live(&mut self, slot: u32, live: i64) -> anyhow::Result<()>;
    /// Connections ever sent to the slot's backend.
    fn total(&self, slot: u32) -> anyhow::Result<u64>;
    /// Every tracked flow: its reply key (backend → client), reply NAT and, when present, the
    /// forward entry.
    fn flows(&self) -> anyhow::Result<Vec<(FlowKey, ReplyNat, Option<Flow>)>>;
    /// Forgets a flow whose socket is gone, unless the 4-tuple now carries a new connection
    /// (then its entry is put back); true when it was forgotten.
    fn remove_flow(&mut self, rev: &FlowKey, nat: &ReplyNat, seen: Option<&Flow>) -> bool;
    /// Empties a slot whose backend left the config and has no flow left.
    fn clear_slot(&mut self, slot: u32) -> anyhow::Result<()>;
}

/// Where backend and service alerts go.
pub trait AlertSink: Send + Sync {
    fn notify(&self, event: Event);
    /// A failure found at start, already reported by the daemon before this one.
    fn known_failing(&self, event: Event);
}

impl AlertSink for Alerts {
    fn notify(&self, event: Event) {
        Alerts::notify(self, event);
    }

    fn known_failing(&self, event: Event) {
        Alerts::known_failing(self, event);
    }
}

/// Counts one failure at `now_ns` into a passive health record, by the data path's rule
/// (`lb-ebpf/src/passive.rs`: nginx's `max_fails` within `fail_timeout`): the first failure
/// more than `fail_timeout` after the window opened opens a new one. True when the failures in
/// the window reach `max_fails`; never with `max_fails` 0.
pub fn record_failure(p: &mut Passive, now_ns: u64) -> bool {
    if p.max_fails == 0 {
        return false;
    }
    if p.window_start_ns == 0 || now_ns.wrapping_sub(p.window_start_ns) > p.fail_timeout_ns {
        p.window_start_ns = now_ns;
        p.fails = 0;
    }
    p.fails += 1;
    p.fails >= p.max_fails
}

#[cfg(test)]
pub mod fake {
    //! An in-memory data path: the maps as plain collections, and alerts recorded in order.

    use std::{
        collections::{BTreeMap, HashMap},
        sync::Mutex,
    };

    use super::*;

    #[derive(Default)]
    pub struct FakeMaps {
        pub states: BTreeMap<u32, BackendState>,
        pub passive: BTreeMap<u32, Passive>,
        pub live: BTreeMap<u32, i64>,
        pub total: BTreeMap<u32, u64>,
        pub flows: HashMap<FlowKey, (ReplyNat, Option<Flow>)>,
        /// `set_state` calls, in order.
        pub writes: Vec<(u32, BackendState)>,
        /// Makes every write fail, as a full or vanished map would.
        pub broken: bool,
    }

    impl FakeMaps {
        fn check(&self) -> anyhow::Result<()> {
            if self.broken { Err(anyhow::anyhow!("the map is gone")) } else { Ok(()) }
        }
    }

    impl Maps for FakeMaps {
        fn state(&self, slot: u32) -> anyhow::Result<Option<BackendState>> {
            Ok(self.states.get(&slot).copied())
        }
        fn set_state(&mut self, slot: u32, state: BackendState) -> anyhow::Result<()> {
            self.check()?;
            self.states.insert(slot, state);
            self.writes.push((slot, state));
            Ok(())
        }
        fn passive(&self, slot: u32) -> anyhow::Result<Passive> {
            Ok(self.passive.get(&slot).copied().unwrap_or_default())
        }
        fn set_passive(&mut self, slot: u32, passive: Passive) -> anyhow::Result<()> {
            self.check()?;
            self.passive.insert(slot, passive);
            Ok(())
        }
        fn live(&self, slot: u32) -> anyhow::Result<i64> {
            Ok(self.live.get(&slot).copied().unwrap_or(0))
        }
        fn set_live(&mut self, slot: u32, live: i64) -> anyhow::Result<()> {
            self.check()?;
            self.live.insert(slot, live);
            Ok(())
        }
        fn total(&self, slot: u32) -> anyhow::Result<u64> {
            Ok(self.total.get(&slot).copied().unwrap_or(0))
        }
        fn flows(&self) -> anyhow::Result<Vec<(FlowKey, ReplyNat, Option<Flow>)>> {
            Ok(self.flows.iter().map(|(k, (nat, f))| (*k, *nat, *f)).collect())
        }
        fn remove_flow(&mut self, rev: &FlowKey, _nat: &ReplyNat, _seen: Option<&Flow>) -> bool {
            self.flows.remove(rev).is_some()
        }
        fn clear_slot(&mut self, slot: u32) -> anyhow::Result<()> {
            self.check()?;
            self.states.remove(&slot);
            self.passive.remove(&slot);
            self.live.remove(&slot);
            self.total.remove(&slot);
            Ok(())
        }
    }

    /// Alerts as they were raised; `true` for `known_failing`.
    #[derive(Default)]
    pub struct Recorded(pub Mutex<Vec<(Event, bool)>>);

    impl Recorded {
        /// The alerts raised (not the known ones) since the last call, by name and subject.
        pub fn take(&self) -> Vec<String> {
            self.0.lock().unwrap().drain(..).filter(|(_, known)| !known).map(|(e, _)| describe(&e)).collect()
        }
    }

    pub fn describe(e: &Event) -> String {
        match e {
            Event::BackendDown { service, backend, .. } => format!("down {service} {backend}"),
            Event::BackendUp { service, backend } => format!("up {service} {backend}"),
            Event::ServiceDown { service } => format!("service down {service}"),
            Event::ServiceUp { service } => format!("service up {service}"),
            other => format!("{other:?}"),
        }
    }

    impl AlertSink for Recorded {
        fn notify(&self, event: Event) {
            self.0.lock().unwrap().push((event, false));
        }
        fn known_failing(&self, event: Event) {
            self.0.lock().unwrap().push((event, true));
        }
    }
}

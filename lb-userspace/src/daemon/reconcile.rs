//! Keeps every backend's live count equal to what the kernel's socket table says, forgets
//! flows whose connection is gone, frees the slots of removed backends once no flow refers to
//! them, and hands the data path's passive-health verdicts to the state machine. Twice a second.

use std::{collections::HashMap, sync::{Arc, atomic::Ordering}};

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{RECONCILE_INTERVAL, Shared, tasks::Ticks};
use crate::{
    backends::{Maps, monotonic_ns},
    dataplane,
    layout::Retiring,
    sockdiag::{self, SocketTable},
};

/// A flow with no socket behind it is kept this long after its SYN before being forgotten: the
/// SYN may still be on its way through the stack.
const NO_SOCKET_GRACE_NS: u64 = 2_000_000_000;

pub(super) async fn run(sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut ticks = Ticks::new(RECONCILE_INTERVAL);
    while ticks.next(&mut stop).await {
        let sh = sh.clone();
        let done = tokio::task::spawn_blocking(move || {
            // Whatever became of the reconcile: a failed backend must be noticed.
            let reconciled = tick(&sh);
            let passive = sh.backends.lock().unwrap().poll_data_path(&mut *sh.dp.lock().unwrap());
            (reconciled, passive)
        })
        .await;
        match done {
            Ok((reconciled, passive)) => {
                if let Err(e) = reconciled {
                    warn!("reconciling live connection counts: {e:#}");
                }
                if let Err(e) = passive {
                    warn!("reading passive health failures: {e:#}");
                }
            }
            Err(e) => error!("reconcile task failed: {e}"),
        }
    }
}

fn tick(sh: &Shared) -> anyhow::Result<()> {
    let slots = |sh: &Shared| -> Vec<u32> {
        let current = sh.current();
        let mut slots: Vec<u32> = current.layout.backends().map(|(_, _, slot)| slot).collect();
        slots.extend(sh.retiring.lock().unwrap().iter().map(|r| r.slot));
        slots
    };
    let before = {
        let dp = sh.dp.lock().unwrap();
        Counts::read(&*dp, &slots(sh))?
    };
    let table = sockdiag::tcp_sockets().context("reading the socket table (sock_diag)")?;
    let mut dp = sh.dp.lock().unwrap();
    let after = Counts::read(&*dp, &slots(sh))?;
    let (flows, per_slot) = reconcile(&mut *dp, &before, &after, &table, monotonic_ns())?;
    sh.flows.store(flows, Ordering::Relaxed);
    let mut retiring = sh.retiring.lock().unwrap();
    free_retired(&mut *dp, &mut retiring, &per_slot);
    Ok(())
}

/// A removed backend's slot is freed once no tracked flow refers to it: the data path would
/// otherwise count that flow's close against the slot's next owner.
fn free_retired(maps: &mut impl Maps, retiring: &mut Vec<Retiring>, per_slot: &HashMap<u32, u64>) {
    retiring.retain(|r| {
        if per_slot.get(&r.slot).copied().unwrap_or(0) > 0 {
            return true;
        }
        match maps.clear_slot(r.slot) {
            Ok(()) => {
                info!(backend = %r.addr, slot = r.slot, "removed backend has no connections left; its slot is free");
                false
            }
            Err(e) => {
                warn!(backend = %r.addr, slot = r.slot, "clearing the slot of a removed backend: {e:#}");
                true
            }
        }
    });
}

/// The data path's counts of every backend at one instant: read just before and just after
/// the socket table.
struct Counts {
    /// CLOCK_MONOTONIC just before the counts were read: flows created later are not in them.
    at_ns: u64,
    /// Slot → (live, total).
    conns: HashMap<u32, (i64, u64)>,
}

impl Counts {
    fn read(maps: &impl Maps, slots: &[u32]) -> anyhow::Result<Counts> {
        let at_ns = monotonic_ns();
        let mut conns = HashMap::new();
        for &slot in slots {
            conns.insert(slot, (maps.live(slot)?, maps.total(slot)?));
        }
        Ok(Counts { at_ns, conns })
    }

    fn get(&self, slot: u32) -> (i64, u64) {
        self.conns.get(&slot).copied().unwrap_or_default()
    }
}

/// Corrects every backend's live count towards the number of its tracked flows whose socket
/// the kernel holds established or half-open, and forgets flows whose socket is gone (lost
/// FINs, killed clients, RSTs the data path never saw, SYNs that never became a connection).
/// Flows whose socket is winding down (FIN_WAIT, CLOSE_WAIT, LAST_ACK, …) are kept while it
/// does, because their last packets still need rewriting; TIME-WAIT counts as gone (see
/// `sockdiag::tcp_sockets`). Returns the number of flows still tracked, and per slot of
/// `before` how many of them refer to it.
///
/// The data path keeps counting while we read, and reading the socket table and the flows
/// takes tens of milliseconds with many flows, so the count is never overwritten with what was
/// seen; that froze every short connection that came and went during the reading into the
/// count until the next reconcile, which kept idle backends out of rotation under a steady
/// stream of connections. Instead the count's error at `before` is estimated from the flows
/// that existed then, and the current count is shifted by it. The estimate can only be low,
/// by at most the connections closed while the socket table was read (between `before` and
/// `after`): such a flow was counted at `before` but may be gone from the table. So only the
/// part of the correction that holds whatever those connections were is applied; when nothing
/// moves, that is all of it.
fn reconcile(
    maps: &mut impl Maps,
    before: &Counts,
    after: &Counts,
    table: &SocketTable,
    now_ns: u64,
) -> anyhow::Result<(u64, HashMap<u32, u64>)> {
    let mut live: HashMap<u32, i64> = HashMap::new();
    let mut per_slot: HashMap<u32, u64> = HashMap::new();
    let mut tracked = 0;
    for (rev, nat, flow) in maps.flows()? {
        let backend = dataplane::sock_addr(&rev.src_addr, rev.src_port, rev.family);
        let client = dataplane::sock_addr(&rev.dst_addr, rev.dst_port, rev.family);
        // Flows opened after `before` are not in its counts, whatever their socket says.
        let existed = flow.is_none_or(|f| f.created_ns <= before.at_ns);
        match table.get(&(backend, client)) {
            Some(&state) => {
                tracked += 1;
                *per_slot.entry(nat.backend).or_default() += 1;
                if existed && sockdiag::is_live(state) {
                    *live.entry(nat.backend).or_default() += 1;
                }
            }
            None => {
                let age = flow.map_or(u64::MAX, |f| now_ns.saturating_sub(f.created_ns));
                if age > NO_SOCKET_GRACE_NS && maps.remove_flow(&rev, &nat, flow.as_ref()) {
                    // Forgotten. (Not removed: the 4-tuple carries a new connection now, which
                    // the next reconcile judges on its own.)
                } else {
                    tracked += 1;
                    *per_slot.entry(nat.backend).or_default() += 1;
                    // Too young to judge: count it as the data path does.
                    if existed && flow.is_some_and(|f| f.closed == lb_common::flow::FLOW_OPEN) {
                        *live.entry(nat.backend).or_default() += 1;
                    }
                }
            }
        }
    }
    {
        for &slot in before.conns.keys() {
            let ((live_before, total_before), (live_after, total_after)) = (before.get(slot), after.get(slot));
            let opened = total_after.wrapping_sub(total_before) as i64;
            let closed_meanwhile = (opened - (live_after - live_before)).max(0);
            let low = live.get(&slot).copied().unwrap_or(0) - live_before;
            let high = low + closed_meanwhile;
            let correction = if low > 0 {
                low
            } else if high < 0 {
                high
            } else {
                0
            };
            // Nothing is written without a correction: a write can lose a change the data path
            // makes between our read and it.
            if correction != 0 {
                let now = maps.live(slot)?;
                maps.set_live(slot, now + correction)?;
            }
        }
    }
    Ok((tracked, per_slot))
}


#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use lb_common::flow::{FLOW_CLOSED, FLOW_OPEN, Flow, FlowKey, ReplyNat};

    use super::*;
    use crate::{backends::fake::FakeMaps, dataplane::map_addr, sockdiag::TCP_ESTABLISHED};

    const SLOT: u32 = 3;
    const SEC: u64 = 1_000_000_000;

    /// The reply key (backend → client) of connection `i` to the backend in `SLOT`.
    fn reply_key(i: u16) -> (FlowKey, SocketAddr, SocketAddr) {
        let backend: SocketAddr = "127.0.0.1:8001".parse().unwrap();
        let client: SocketAddr = format!("198.18.0.2:{}", 40000 + i).parse().unwrap();
        let (src_addr, src_port, family) = map_addr(backend);
        let (dst_addr, dst_port, _) = map_addr(client);
        (FlowKey { src_addr, dst_addr, src_port, dst_port, family, proto: 6, _pad: [0; 2] }, backend, client)
    }

    /// A data path tracking connections `0..n` to `SLOT`, opened at `created_ns`, with `live`
    /// as its count; and a socket table in which `established` of them are.
    fn world(n: u16, created_ns: u64, live: i64, established: impl Fn(u16) -> bool) -> (FakeMaps, SocketTable) {
        let mut maps = FakeMaps::default();
        let mut table = SocketTable::new();
        for i in 0..n {
            let (key, backend, client) = reply_key(i);
            let flow = Flow { backend: SLOT, created_ns, closed: FLOW_OPEN, ..Flow::default() };
            maps.flows.insert(key, (ReplyNat { backend: SLOT, ..ReplyNat::default() }, Some(flow)));
            if established(i) {
                table.insert((backend, client), TCP_ESTABLISHED);
            }
        }
        maps.live.insert(SLOT, live);
        maps.total.insert(SLOT, u64::from(n));
        (maps, table)
    }

    fn counts(maps: &FakeMaps, at_ns: u64) -> Counts {
        Counts::read(maps, &[SLOT]).map(|c| Counts { at_ns, ..c }).unwrap()
    }

    #[test]
    fn a_count_that_lost_closes_is_corrected_down_and_gone_flows_are_forgotten() {
        // 10 flows, 4 still established, and a count of 10: six FINs the data path never saw.
        let (mut maps, table) = world(10, SEC, 10, |i| i < 4);
        let (before, after) = (counts(&maps, 5 * SEC), counts(&maps, 5 * SEC));
        let (tracked, per_slot) = reconcile(&mut maps, &before, &after, &table, 5 * SEC).unwrap();
        assert_eq!(maps.live[&SLOT], 4);
        assert_eq!((tracked, per_slot[&SLOT]), (4, 4));
        assert_eq!(maps.flows.len(), 4, "the six without a socket are forgotten");
    }

    #[test]
    fn a_count_that_missed_opens_is_corrected_up() {
        let (mut maps, table) = world(5, SEC, 2, |_| true);
        let (before, after) = (counts(&maps, 2 * SEC), counts(&maps, 2 * SEC));
        reconcile(&mut maps, &before, &after, &table, 2 * SEC).unwrap();
        assert_eq!(maps.live[&SLOT], 5);
    }

    #[test]
    fn young_flows_without_a_socket_are_kept_and_counted_as_the_data_path_does() {
        // SYNs still on their way through the stack: within the grace period.
        let (mut maps, table) = world(3, SEC, 3, |_| false);
        let (before, after) = (counts(&maps, SEC + 1), counts(&maps, SEC + 1));
        let (tracked, _) = reconcile(&mut maps, &before, &after, &table, SEC + NO_SOCKET_GRACE_NS / 2).unwrap();
        assert_eq!((tracked, maps.flows.len(), maps.live[&SLOT]), (3, 3, 3));
        // A closed one is not live, though it is still tracked.
        let (key, _, _) = reply_key(0);
        maps.flows.get_mut(&key).unwrap().1.as_mut().unwrap().closed = FLOW_CLOSED;
        let (before, after) = (counts(&maps, SEC + 1), counts(&maps, SEC + 1));
        reconcile(&mut maps, &before, &after, &table, SEC + NO_SOCKET_GRACE_NS / 2).unwrap();
        assert_eq!(maps.live[&SLOT], 2);
    }

    #[test]
    fn flows_opened_after_the_first_reading_do_not_count_towards_the_correction() {
        // All 4 flows are established, but opened after `before` was read: its count (0) did
        // not include them, so there is nothing to correct.
        let (mut maps, table) = world(4, 10 * SEC, 0, |_| true);
        let before = counts(&maps, 9 * SEC);
        maps.live.insert(SLOT, 4);
        let after = counts(&maps, 11 * SEC);
        reconcile(&mut maps, &before, &after, &table, 11 * SEC).unwrap();
        assert_eq!(maps.live[&SLOT], 4);
    }

    #[test]
    fn only_the_part_of_a_correction_that_holds_whatever_closed_meanwhile_is_applied() {
        // `before` says 10 live; 6 sockets are established. While the table was read, 3
        // connections opened and 3 closed (live unchanged, total +3): those 3 closes may be
        // among the 4 missing, so the count moves down by 4 - 3 = 1 only.
        let (mut maps, table) = world(10, SEC, 10, |i| i < 6);
        let before = counts(&maps, 5 * SEC);
        maps.total.insert(SLOT, 13);
        let after = counts(&maps, 5 * SEC);
        reconcile(&mut maps, &before, &after, &table, 5 * SEC).unwrap();
        assert_eq!(maps.live[&SLOT], 9);
        // Nothing written when there is nothing to correct.
        let (mut maps, table) = world(4, SEC, 4, |_| true);
        maps.broken = true;
        let (before, after) = (counts(&maps, 5 * SEC), counts(&maps, 5 * SEC));
        reconcile(&mut maps, &before, &after, &table, 5 * SEC).unwrap();
    }

    #[test]
    fn a_removed_backends_slot_is_freed_once_no_flow_refers_to_it() {
        let mut maps = FakeMaps::default();
        maps.live.insert(7, 1);
        maps.live.insert(8, 0);
        let addr: SocketAddr = "127.0.0.1:8009".parse().unwrap();
        let mut retiring = vec![Retiring { slot: 7, addr, vip: None }, Retiring { slot: 8, addr, vip: None }];
        free_retired(&mut maps, &mut retiring, &HashMap::from([(7, 1)]));
        assert_eq!(retiring.iter().map(|r| r.slot).collect::<Vec<_>>(), [7]);
        assert!(!maps.live.contains_key(&8), "slot 8 cleared");
        // A clear that fails keeps the slot for the next reconcile.
        maps.broken = true;
        free_retired(&mut maps, &mut retiring, &HashMap::new());
        assert_eq!(retiring.len(), 1);
    }
}

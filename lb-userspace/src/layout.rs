//! Where each configured service and backend sits in the maps, kept stable across reloads and
//! restarts.
//!
//! `BACKENDS` is an array of slots, `MAX_BACKENDS_PER_SERVICE` per service (a block), and every
//! tracked flow records its backend's slot: the data path decrements that slot's live count when
//! the flow closes, and the reconcile counts flows per slot. So a backend must keep its slot for
//! as long as flows may refer to it, whatever the order of the backends in a new config:
//! backends are matched to slots by address, services to blocks by VIP, and only backends that
//! are new take free slots. A backend that left the config keeps its slot, drained, until no
//! flow refers to it (`retiring`); only then is the slot cleared and free again.
//!
//! The data path chooses among slots `first_backend .. first_backend + backend_count` of a
//! service and only picks `up` ones, so holes (empty or retiring slots) in that range are fine.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
};

use lb_common::service::{MAX_BACKENDS_PER_SERVICE, MAX_SERVICES};

use crate::config;

/// A slot whose backend left the config: drained until no flow refers to it, then cleared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retiring {
    pub slot: u32,
    pub addr: SocketAddr,
    /// The VIP of the service it belonged to, for messages.
    pub vip: Option<SocketAddr>,
}

/// The slots of a config's services and backends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Per service (config order): its block, `0 .. MAX_SERVICES`; its slots are
    /// `block * MAX_BACKENDS_PER_SERVICE ..`.
    pub blocks: Vec<u32>,
    /// Per service, per backend (config order): its slot.
    pub slots: Vec<Vec<u32>>,
    /// Occupied slots no backend of the config uses.
    pub retiring: Vec<Retiring>,
}

/// What the maps hold now: the block of every VIP and the address in every occupied slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub vips: HashMap<SocketAddr, u32>,
    pub slots: BTreeMap<u32, SocketAddr>,
}

impl Layout {
    /// Backend `b` of service `s` in slot `s * 16 + b`: the layout of a first start.
    pub fn positional(services: &[config::Service]) -> Layout {
        Layout {
            blocks: (0..services.len() as u32).collect(),
            slots: services
                .iter()
                .enumerate()
                .map(|(s, svc)| (0..svc.backends.len()).map(|b| Self::positional_slot(s, b)).collect())
                .collect(),
            retiring: Vec::new(),
        }
    }

    /// Places `services` so that every backend already in the maps keeps its slot.
    ///
    /// A service keeps the block of its VIP; a new one takes a block nothing occupies. A backend
    /// keeps the slot holding its address in its service's block; a new one takes the lowest
    /// free slot there. Every other occupied slot is retiring. Fails (naming the service and
    /// why) when a service finds no free block or backend slot because retiring backends still
    /// hold them.
    pub fn plan(services: &[config::Service], now: &Occupancy) -> Result<Layout, String> {
        let per = MAX_BACKENDS_PER_SERVICE;
        let mut blocks: Vec<Option<u32>> = Vec::with_capacity(services.len());
        let mut taken = HashSet::new();
        for svc in services {
            let block = now.vips.get(&svc.listen).copied().filter(|b| *b < MAX_SERVICES && taken.insert(*b));
            blocks.push(block);
        }
        let occupied_blocks: HashSet<u32> = now.slots.keys().map(|slot| slot / per).collect();
        // An `https` or `redirect` service has no VIP in the data path's table: it finds its
        // block again by its backends, the block (held by no VIP) whose slots hold exactly its
        // addresses. Else a restart would move it, and forget its drains and counts.
        for (svc, block) in services.iter().zip(&mut blocks) {
            if block.is_some() || svc.mode == config::ServiceMode::L4 || svc.backends.is_empty() {
                continue;
            }
            let wanted: HashSet<&SocketAddr> = svc.backends.iter().collect();
            let mut candidates: Vec<u32> = occupied_blocks.iter().copied().filter(|b| !taken.contains(b)).collect();
            candidates.sort_unstable();
            let found = candidates.into_iter().find(|b| {
                let held: HashSet<&SocketAddr> = now.slots.range(b * per..(b + 1) * per).map(|(_, a)| a).collect();
                held == wanted && !now.vips.values().any(|v| v == b)
            });
            if let Some(b) = found {
                taken.insert(b);
                *block = Some(b);
            }
        }
        for (svc, block) in services.iter().zip(&mut blocks) {
            if block.is_none() {
                let free = (0..MAX_SERVICES).find(|b| !taken.contains(b) && !occupied_blocks.contains(b)).ok_or_else(|| {
                    format!(
                        "service \"{}\": every one of the {MAX_SERVICES} service slots is in use or held by removed backends \
                         whose connections are still open; reload again once they have ended",
                        svc.name
                    )
                })?;
                taken.insert(free);
                *block = Some(free);
            }
        }
        let blocks: Vec<u32> = blocks.into_iter().map(|b| b.expect("every service got a block")).collect();
        let mut used = HashSet::new();
        let mut slots = Vec::with_capacity(services.len());
        for (svc, &block) in services.iter().zip(&blocks) {
            let range = block * per..(block + 1) * per;
            let mut mine: Vec<Option<u32>> = svc
                .backends
                .iter()
                .map(|addr| {
                    let slot = now.slots.range(range.clone()).find(|(slot, a)| *a == addr && !used.contains(*slot)).map(|(s, _)| *s)?;
                    used.insert(slot);
                    Some(slot)
                })
                .collect();
            for (addr, slot) in svc.backends.iter().zip(&mut mine) {
                if slot.is_none() {
                    let free = range.clone().find(|s| !used.contains(s) && !now.slots.contains_key(s)).ok_or_else(|| {
                        let held: Vec<String> = now
                            .slots
                            .range(range.clone())
                            .filter(|(s, _)| !used.contains(*s))
                            .map(|(_, a)| a.to_string())
                            .collect();
                        format!(
                            "service \"{}\": no free slot for new backend {addr}: removed backends {} still have open \
                             connections (at most {per} backends per service, removed ones included until their \
                             connections end); reload again once they have ended",
                            svc.name,
                            held.join(", ")
                        )
                    })?;
                    used.insert(free);
                    *slot = Some(free);
                }
            }
            slots.push(mine.into_iter().map(|s| s.expect("every backend got a slot")).collect());
        }
        let block_vip: HashMap<u32, SocketAddr> = now.vips.iter().map(|(vip, block)| (*block, *vip)).collect();
        let retiring = now
            .slots
            .iter()
            .filter(|(slot, _)| !used.contains(*slot))
            .map(|(&slot, &addr)| Retiring { slot, addr, vip: block_vip.get(&(slot / per)).copied() })
            .collect();
        Ok(Layout { blocks, slots, retiring })
    }

    /// Where a first start puts backend `backend` of service `service` (`positional`).
    pub const fn positional_slot(service: usize, backend: usize) -> u32 {
        service as u32 * MAX_BACKENDS_PER_SERVICE + backend as u32
    }

    pub fn slot(&self, service: usize, backend: usize) -> u32 {
        self.slots[service][backend]
    }

    /// The first slot of a service and how many slots its range spans (up to its last backend).
    pub fn range(&self, service: usize) -> (u32, u32) {
        let first = self.blocks[service] * MAX_BACKENDS_PER_SERVICE;
        let count = self.slots[service].iter().map(|s| s - first + 1).max().unwrap_or(0);
        (first, count)
    }

    /// Every slot the config uses, with its service and backend index.
    pub fn backends(&self) -> impl Iterator<Item = (usize, usize, u32)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .flat_map(|(s, slots)| slots.iter().enumerate().map(move |(b, &slot)| (s, b, slot)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, vip: &str, backends: &[&str]) -> config::Service {
        config::Service {
            name: name.into(),
            listen: vip.parse().unwrap(),
            mode: config::ServiceMode::L4,
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
            health: config::Health::default(),
            max_fails: 1,
            fail_timeout: std::time::Duration::from_secs(10),
            slow_start: std::time::Duration::ZERO,
            https: None,
        }
    }

    fn occupancy(layout: &Layout, services: &[config::Service]) -> Occupancy {
        let mut now = Occupancy::default();
        for (s, svc) in services.iter().enumerate() {
            // As the maps hold it: only L4 services have a VIP entry.
            if svc.mode == config::ServiceMode::L4 {
                now.vips.insert(svc.listen, layout.blocks[s]);
            }
            for (b, addr) in svc.backends.iter().enumerate() {
                now.slots.insert(layout.slot(s, b), *addr);
            }
        }
        for r in &layout.retiring {
            now.slots.insert(r.slot, r.addr);
        }
        now
    }

    const A: &str = "10.0.0.1:8001";
    const B: &str = "10.0.0.1:8002";
    const C: &str = "10.0.0.1:8003";
    const D: &str = "10.0.0.1:8004";

    #[test]
    fn backends_keep_their_slots_whatever_the_order() {
        let old = vec![service("web", "10.0.0.1:80", &[A, B, C])];
        let first = Layout::positional(&old);
        assert_eq!(first.slots, [[0, 1, 2]]);
        // B removed, D added, order changed: A and C stay, D takes B's slot only once B is gone.
        let new = vec![service("web", "10.0.0.1:80", &[C, D, A])];
        let plan = Layout::plan(&new, &occupancy(&first, &old)).unwrap();
        assert_eq!(plan.slots, [[2, 3, 0]]);
        assert_eq!(plan.retiring, [Retiring { slot: 1, addr: B.parse().unwrap(), vip: Some("10.0.0.1:80".parse().unwrap()) }]);
        assert_eq!(plan.range(0), (0, 4));
        // Once B's slot is cleared, a reload with the same config keeps everything and frees it.
        let mut now = occupancy(&plan, &new);
        now.slots.remove(&1);
        let again = Layout::plan(&new, &now).unwrap();
        assert_eq!((again.slots.clone(), again.retiring.clone()), (plan.slots.clone(), vec![]));
        let added = vec![service("web", "10.0.0.1:80", &[C, D, A, B])];
        assert_eq!(Layout::plan(&added, &now).unwrap().slots, [[2, 3, 0, 1]]);
    }

    #[test]
    fn services_keep_their_blocks_and_new_ones_take_free_blocks() {
        let old = vec![service("a", "10.0.0.1:80", &[A]), service("b", "10.0.0.1:81", &[B])];
        let first = Layout::positional(&old);
        let new = vec![service("c", "10.0.0.1:82", &[C]), service("b", "10.0.0.1:81", &[B, D])];
        let plan = Layout::plan(&new, &occupancy(&first, &old)).unwrap();
        // Service a's block still holds A (retiring), so c takes block 2.
        assert_eq!(plan.blocks, [2, 1]);
        assert_eq!(plan.slots, [vec![32], vec![16, 17]]);
        assert_eq!(plan.retiring.iter().map(|r| r.slot).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn a_full_block_is_refused_by_name() {
        let all: Vec<String> = (0..16).map(|i| format!("10.0.0.1:{}", 9000 + i)).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let old = vec![service("web", "10.0.0.1:80", &refs)];
        let first = Layout::positional(&old);
        let mut swapped = refs.clone();
        swapped[3] = D;
        let e = Layout::plan(&[service("web", "10.0.0.1:80", &swapped)], &occupancy(&first, &old)).unwrap_err();
        assert!(e.contains("service \"web\": no free slot for new backend 10.0.0.1:8004: removed backends 10.0.0.1:9003"), "{e}");
    }

    #[test]
    fn an_https_service_finds_its_block_by_its_backends() {
        let mut site = service("site", "10.0.0.1:443", &[A, B, C]);
        site.mode = config::ServiceMode::Https;
        let old = vec![service("web", "10.0.0.1:80", &[A, B, C]), site];
        let first = Layout::positional(&old);
        // A restart: the https service has no VIP in the maps, yet keeps block 1 and its slots.
        let plan = Layout::plan(&old, &occupancy(&first, &old)).unwrap();
        assert_eq!(plan.blocks, [0, 1]);
        assert_eq!(plan.slots, [vec![0, 1, 2], vec![16, 17, 18]]);
        assert!(plan.retiring.is_empty(), "{:?}", plan.retiring);
    }
}

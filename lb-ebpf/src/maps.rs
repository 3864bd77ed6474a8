//! Every map the programs use. BTF-defined, so `bpftool map dump` prints named fields; the daemon
//! pins each under `pin_path/<NAME>` and a restarted daemon adopts them.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    Meta,
    backend::{Backend, BackendConns, MAX_BACKENDS, Passive},
    flow::{Closed, DEFAULT_MAX_FLOWS, Flow, FlowKey, ReplyNat},
    service::{MAX_SERVICES, Service, ServiceKey, VIP_PORTS_LEN},
    stats::Stats,
};

const MAX_SERVICES_: usize = MAX_SERVICES as usize;
const MAX_BACKENDS_: usize = MAX_BACKENDS as usize;
const MAX_FLOWS_: usize = DEFAULT_MAX_FLOWS as usize;
// Conntrack is allocated on demand rather than preallocated: a VPS should not pay for a million
// entries it never uses. A full map makes inserts fail with E2BIG, which we count; nothing is
// ever evicted, so an established flow cannot lose its backend.
const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map]
pub static SERVICES: HashMap<ServiceKey, Service, MAX_SERVICES_> = HashMap::new();

#[btf_map]
pub static BACKENDS: Array<Backend, MAX_BACKENDS_> = Array::new();

#[btf_map]
pub static BACKEND_CONNS: Array<BackendConns, MAX_BACKENDS_> = Array::new();

/// In-flight HTTPS requests to each slot's backend address (see `lb_common::backend`).
#[btf_map]
pub static PROXIED: Array<i64, MAX_BACKENDS_> = Array::new();

/// Passive health and slow start of each slot (see `lb_common::backend::Passive`).
#[btf_map]
pub static PASSIVE: Array<Passive, MAX_BACKENDS_> = Array::new();

#[btf_map]
pub static BACKEND_FLOWS: PerCpuArray<u64, MAX_BACKENDS_> = PerCpuArray::new();

#[btf_map]
pub static FLOWS: HashMap<FlowKey, Flow, MAX_FLOWS_, NO_PREALLOC> = HashMap::new();

#[btf_map]
pub static REPLIES: HashMap<FlowKey, ReplyNat, MAX_FLOWS_, NO_PREALLOC> = HashMap::new();

#[btf_map]
pub static CLOSED: HashMap<FlowKey, Closed, MAX_FLOWS_, NO_PREALLOC> = HashMap::new();

#[btf_map]
pub static STATS: PerCpuArray<Stats, 1> = PerCpuArray::new();

#[btf_map]
pub static META: Array<Meta, 1> = Array::new();

#[btf_map]
pub static VIP_PORTS: Array<u8, { VIP_PORTS_LEN as usize }> = Array::new();

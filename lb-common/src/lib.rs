//! Types shared by the XDP/TC programs and the xlb daemon.
//!
//! Everything here is `#[repr(C)]` plain old data: the kernel copies these bytes in and out of
//! BPF maps, so both sides must agree on every byte. `bytemuck::Pod` makes implicit padding a
//! compile error; each type also asserts its size. Ports and addresses are kept in network byte
//! order, exactly as they appear in packets, so the data path never swaps bytes.
#![no_std]

pub mod backend;
pub mod flow;
pub mod service;
pub mod stats;

/// Bumped whenever the layout of any pinned map changes. A daemon refuses to adopt pinned maps
/// written with another layout instead of silently reinterpreting their bytes.
///
/// Passive health kept version 1 on purpose, so that upgrading keeps every tracked flow: its
/// `PASSIVE` map is new (created on adoption; a slot of zeros means "no failures, no ramp"),
/// `Flow::handshake` took the always-zero upper half of the former `u64` `closed` (zero reads
/// "answered"), and `STATE_FAILED` is a new value in an existing field.
pub const LAYOUT_VERSION: u32 = 1;

/// `Meta::family` / key `family` values.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;

/// Contents of the single-entry `META` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Meta {
    pub layout_version: u32,
    pub max_flows: u32,
}
const _: () = assert!(size_of::<Meta>() == 8);

/// Map names, as the kernel and `bpftool` show them (at most 15 characters).
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const BACKEND_CONNS: &str = "BACKEND_CONNS";
    pub const BACKEND_FLOWS: &str = "BACKEND_FLOWS";
    pub const FLOWS: &str = "FLOWS";
    pub const REPLIES: &str = "REPLIES";
    pub const CLOSED: &str = "CLOSED";
    pub const STATS: &str = "STATS";
    pub const META: &str = "META";
    pub const VIP_PORTS: &str = "VIP_PORTS";
    pub const PROXIED: &str = "PROXIED";
    pub const PASSIVE: &str = "PASSIVE";
    /// Every map that is pinned under `pin_path` and adopted by a restarted daemon.
    pub const PINNED: [&str; 12] = [
        SERVICES, BACKENDS, BACKEND_CONNS, BACKEND_FLOWS, FLOWS, REPLIES, CLOSED, STATS, META,
        VIP_PORTS, PROXIED, PASSIVE,
    ];
}

/// Program names in the object file.
pub mod programs {
    pub const XDP: &str = "xlb_xdp";
    pub const TC_EGRESS: &str = "xlb_tc_egress";
    /// Passes every packet: the baseline for program cost, and the "same XDP tax" program of
    /// benchmark arms that bypass xlb.
    pub const NOOP: &str = "xlb_noop";
}

/// An IPv4 or IPv6 address as it appears in packets; IPv4 in the first four bytes, the rest
/// zero. Four-byte aligned so that copying one compiles to four word moves: byte-aligned
/// 16-byte copies become calls to `memcpy` in BPF code, which the verifier rejects.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Addr(pub [u8; 16]);
const _: () = assert!(size_of::<Addr>() == 16);

impl Addr {
    #[inline(always)]
    pub const fn v4(o: [u8; 4]) -> Addr {
        Addr([o[0], o[1], o[2], o[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    }

    #[inline(always)]
    pub const fn from_words(w: [u32; 4]) -> Addr {
        let (a, b, c, d) = (w[0].to_ne_bytes(), w[1].to_ne_bytes(), w[2].to_ne_bytes(), w[3].to_ne_bytes());
        Addr([a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]])
    }

    /// The `i`th 32-bit word, as raw bytes in memory order.
    #[inline(always)]
    pub const fn word(&self, i: usize) -> u32 {
        let b = &self.0;
        u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]])
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `bytemuck::Pod`, which is stronger than `aya::Pod`.
    unsafe impl aya::Pod for crate::Meta {}
    unsafe impl aya::Pod for crate::Addr {}
    unsafe impl aya::Pod for crate::service::ServiceKey {}
    unsafe impl aya::Pod for crate::service::Service {}
    unsafe impl aya::Pod for crate::backend::Backend {}
    unsafe impl aya::Pod for crate::backend::BackendConns {}
    unsafe impl aya::Pod for crate::backend::Passive {}
    unsafe impl aya::Pod for crate::flow::FlowKey {}
    unsafe impl aya::Pod for crate::flow::Flow {}
    unsafe impl aya::Pod for crate::flow::ReplyNat {}
    unsafe impl aya::Pod for crate::stats::Stats {}
}

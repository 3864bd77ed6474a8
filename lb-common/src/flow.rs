//! Connection tracking. `FLOWS` maps the client's 4-tuple towards the VIP to the chosen
//! backend; `REPLIES` maps the backend's 4-tuple towards the client back to the VIP. Both are
//! plain (non-LRU) hash maps: a live flow is never evicted; when they are full a new flow
//! passes unmodified and is counted in `Stats::conntrack_full`.

/// Default conntrack capacity (entries in each of `FLOWS` and `REPLIES`).
pub const DEFAULT_MAX_FLOWS: u32 = 1 << 20;

/// Key of `FLOWS` (client → VIP) and `REPLIES` (backend → client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FlowKey {
    pub src_addr: crate::Addr,
    pub dst_addr: crate::Addr,
    /// Network byte order.
    pub src_port: u16,
    /// Network byte order.
    pub dst_port: u16,
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// `Flow::closed` values.
pub const FLOW_OPEN: u32 = 0;
/// A FIN or RST was seen and the backend's live count was decremented for this flow.
pub const FLOW_CLOSED: u32 = 1;

/// `Flow::handshake` values. Zero is "answered" so that flows recorded before this field
/// existed (it took the upper half of what was a `u64` `closed`, always zero) read as answered.
pub const HANDSHAKE_ANSWERED: u32 = 0;
/// The client's SYN went to the backend and no SYN-ACK has come back yet. An RST from the
/// backend now is a refused connection; the client's SYN again, some time later, means the
/// backend ignored it. Both count as passive health failures (see `backend::Passive`).
pub const HANDSHAKE_SYN_SENT: u32 = 1;

/// Value of `FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Flow {
    pub backend_addr: crate::Addr,
    /// Network byte order.
    pub backend_port: u16,
    pub family: u8,
    pub _pad: u8,
    /// Slot in `BACKENDS` / `BACKEND_CONNS`.
    pub backend: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the SYN was seen. Packets of established
    /// flows do not touch the entry: the daemon judges flows by the kernel's socket table.
    pub created_ns: u64,
    /// `FLOW_OPEN` or `FLOW_CLOSED`. Written by whichever CPU won the flow's `CLOSED` entry
    /// (see there); informational for readers.
    pub closed: u32,
    /// `HANDSHAKE_SYN_SENT` from the SYN until the TC program sees the backend's SYN-ACK, then
    /// `HANDSHAKE_ANSWERED`.
    pub handshake: u32,
}
const _: () = assert!(size_of::<Flow>() == 40);

/// Value of `CLOSED`, keyed by the flow's `FLOWS` key. The first FIN or RST of a flow inserts it
/// with `BPF_NOEXIST`; the kernel lets exactly one insert succeed even when the client's and the
/// backend's FINs are processed on two CPUs at once, and only that CPU decrements the backend's
/// live count. (A compare-and-swap on the flow would need BPF ISA v3 atomics; this works on
/// every ISA level.) Removed together with the flow.
pub type Closed = u8;

/// Value of `REPLIES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ReplyNat {
    pub vip_addr: crate::Addr,
    /// Network byte order.
    pub vip_port: u16,
    pub _pad: u16,
    /// Slot in `BACKENDS`.
    pub backend: u32,
}
const _: () = assert!(size_of::<ReplyNat>() == 24);

impl FlowKey {
    /// The `FLOWS` key (client → VIP) of the flow a `REPLIES` entry belongs to.
    #[inline(always)]
    pub fn forward_of_reply(&self, nat: &ReplyNat) -> FlowKey {
        FlowKey {
            src_addr: self.dst_addr,
            dst_addr: nat.vip_addr,
            src_port: self.dst_port,
            dst_port: nat.vip_port,
            family: self.family,
            proto: self.proto,
            _pad: [0; 2],
        }
    }
}

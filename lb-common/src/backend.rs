//! Backends: `BACKENDS` (address and state), `BACKEND_CONNS` (live connections, updated
//! atomically from every CPU), `BACKEND_FLOWS` (per-CPU new-flow counters: the total) and
//! `PROXIED` (an `i64` per slot: requests the daemon's HTTPS proxy has in flight to the slot's
//! backend address, written only by the daemon and added to `live` when choosing, so the XDP
//! path and the HTTPS path balance one shared load) and `PASSIVE` (passive health: connection
//! failures the data path saw, and the slow-start ramp).

use crate::service::{MAX_BACKENDS_PER_SERVICE, MAX_SERVICES};

pub const MAX_BACKENDS: u32 = MAX_SERVICES * MAX_BACKENDS_PER_SERVICE;

/// `Backend::state` values. Only `STATE_UP` is chosen for new flows; existing flows keep
/// their backend whatever its state.
pub const STATE_EMPTY: u32 = 0;
pub const STATE_UP: u32 = 1;
pub const STATE_DOWN: u32 = 2;
pub const STATE_DRAINING: u32 = 3;
/// Set by the data path itself (from `STATE_UP` only) when a backend refused or ignored
/// `max_fails` new connections within `fail_timeout` (see `Passive`). Kept apart from
/// `STATE_DOWN` so that the daemon can tell who decided and say so; it treats the backend as
/// down until its health checks pass `rise` times, then writes `STATE_UP`.
pub const STATE_FAILED: u32 = 4;

/// Value of `BACKENDS` (an array indexed by slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Backend {
    /// Backend address; IPv4 in the first four bytes.
    pub addr: crate::Addr,
    /// Backend port, network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
    /// One of the `STATE_*` values.
    pub state: u32,
    /// Owning service id.
    pub service: u32,
}
const _: () = assert!(size_of::<Backend>() == 28);

/// Value of `BACKEND_CONNS` (an array indexed by slot).
///
/// `live` is incremented when a new flow picks the backend and decremented exactly once when
/// the flow closes; the daemon also corrects it against the kernel's socket table twice a
/// second. It is signed so that a decrement racing a correction can never wrap; readers clamp
/// it at zero. `last_chosen_ns` is when a new flow last picked the backend: among equally
/// loaded backends the one chosen longest ago goes first (round-robin, as nginx's `least_conn`
/// does), so idle backends share new flows exactly evenly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BackendConns {
    pub live: i64,
    pub last_chosen_ns: u64,
}
const _: () = assert!(size_of::<BackendConns>() == 16);

/// Value of `PASSIVE` (an array indexed by slot): passive health, nginx's `max_fails` /
/// `fail_timeout`, and the slow-start ramp.
///
/// A failure is a new flow the backend answered with RST (connection refused) or never
/// answered (the client retransmitted its SYN). `fails` counts failures in the window that
/// began at `window_start_ns`; the first failure more than `fail_timeout_ns` after it starts a
/// new window. Reaching `max_fails` moves the backend from `STATE_UP` to `STATE_FAILED`.
/// `max_fails == 0` disables counting. The counters are updated by several CPUs at once
/// without a lock: a window restarting on two CPUs together may lose one failure, which only
/// delays the verdict by one more failed connection.
///
/// The daemon writes `max_fails`, `fail_timeout_ns` and `slow_start_ns` from the service's
/// configuration, and `up_since_ns` (with the window cleared) when the backend comes back up.
/// While `now - up_since_ns < slow_start_ns` the backend takes part in a choice only with
/// probability `(now - up_since_ns) / slow_start_ns` (otherwise it is chosen only when no
/// other backend is up), so its share of new flows ramps up linearly from zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Passive {
    /// Failures within `fail_timeout_ns` that mark the backend failed; 0: never.
    pub max_fails: u32,
    /// Failures in the current window.
    pub fails: u32,
    pub fail_timeout_ns: u64,
    pub window_start_ns: u64,
    /// 0: no ramp.
    pub slow_start_ns: u64,
    /// `bpf_ktime_get_ns()` when the backend last came back up; 0: it never went down.
    pub up_since_ns: u64,
    /// New flows the backend answered with RST, ever (counted also when `max_fails` is 0).
    pub refused: u64,
    /// New flows whose SYN the backend never answered (the client retransmitted it), ever.
    pub unanswered: u64,
}
const _: () = assert!(size_of::<Passive>() == 56);

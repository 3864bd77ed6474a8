//! Backends: `BACKENDS` (address and state), `BACKEND_CONNS` (live connections, updated
//! atomically from every CPU), `BACKEND_FLOWS` (per-CPU new-flow counters: the total) and
//! `PROXIED` (an `i64` per slot: requests the daemon's HTTPS proxy has in flight to the slot's
//! backend address, written only by the daemon and added to `live` when choosing, so the XDP
//! path and the HTTPS path balance one shared load).

use crate::service::{MAX_BACKENDS_PER_SERVICE, MAX_SERVICES};

pub const MAX_BACKENDS: u32 = MAX_SERVICES * MAX_BACKENDS_PER_SERVICE;

/// `Backend::state` values. Only `STATE_UP` is chosen for new flows; existing flows keep
/// their backend whatever its state.
pub const STATE_EMPTY: u32 = 0;
pub const STATE_UP: u32 = 1;
pub const STATE_DOWN: u32 = 2;
pub const STATE_DRAINING: u32 = 3;

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

//! Passive health: the data path notices a backend that refuses new connections (answers the
//! SYN with RST) or ignores them (the client has to send its SYN again), counts the failures
//! per backend and, past `max_fails` within `fail_timeout`, stops choosing it at once — before
//! any health probe could notice. See `lb_common::backend::Passive`.

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};

use lb_common::backend::{STATE_FAILED, STATE_UP};

use crate::maps::{BACKENDS, PASSIVE};

/// A client's SYN seen again this long after the first one, with no SYN-ACK from the backend
/// in between, is a retransmission: the backend ignored the first. Linux clients retransmit
/// after 1 s (RFC 6298's initial RTO), others after up to 3 s; duplicates the network makes
/// arrive within microseconds.
pub const SYN_RETRY_NS: u64 = 200_000_000;

pub enum Failure {
    /// The backend answered the SYN with RST.
    Refused,
    /// The backend never answered the SYN.
    Unanswered,
}

/// `record`'s answers (integers rather than an enum with data: see `select.rs`).
/// Passive health is off for the backend (`max_fails` 0): the failure was only counted in the
/// totals, and the flow is to be left as it is.
pub const OFF: u32 = 0;
/// The failure counts towards `max_fails`.
pub const COUNTED: u32 = 1;
/// The failure reached `max_fails`: the backend is failed now.
pub const MARKED_FAILED: u32 = 2;

/// Records a failed new flow on `slot`: `OFF`, `COUNTED` or `MARKED_FAILED`.
#[inline(always)]
pub fn record(slot: u32, failure: Failure, now: u64) -> u32 {
    let Some(p) = PASSIVE.get_ptr_mut(slot) else { return OFF };
    // Several CPUs update these at once; each field is read and written on its own (volatile,
    // so nothing is cached across another CPU's store) and counters are added atomically.
    unsafe {
        let total = match failure {
            Failure::Refused => &raw mut (*p).refused,
            Failure::Unanswered => &raw mut (*p).unanswered,
        };
        atomic_xadd::<u64, u64, { Relaxed }>(total, 1);
        let max_fails = core::ptr::read_volatile(&raw const (*p).max_fails);
        if max_fails == 0 {
            return OFF;
        }
        let start = core::ptr::read_volatile(&raw const (*p).window_start_ns);
        let timeout = core::ptr::read_volatile(&raw const (*p).fail_timeout_ns);
        if start == 0 || now.wrapping_sub(start) > timeout {
            // This failure opens a new window (nginx: failures older than fail_timeout no
            // longer count).
            core::ptr::write_volatile(&raw mut (*p).window_start_ns, now);
            core::ptr::write_volatile(&raw mut (*p).fails, 0);
        }
        // The sum is read back rather than returned: a fetching atomic add needs BPF ISA v3.
        atomic_xadd::<u32, u32, { Relaxed }>(&raw mut (*p).fails, 1);
        if core::ptr::read_volatile(&raw const (*p).fails) < max_fails {
            return COUNTED;
        }
        let Some(b) = BACKENDS.get_ptr_mut(slot) else { return COUNTED };
        // Only an up backend becomes failed: a down, draining or emptied one stays as the daemon
        // set it.
        if core::ptr::read_volatile(&raw const (*b).state) != STATE_UP {
            return COUNTED;
        }
        core::ptr::write_volatile(&raw mut (*b).state, STATE_FAILED);
    }
    MARKED_FAILED
}

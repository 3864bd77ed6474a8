//! Least-connections backend choice for a new flow.

use lb_common::{
    backend::STATE_UP,
    service::{MAX_BACKENDS_PER_SERVICE, Service},
};

use crate::maps::{BACKEND_CONNS, BACKENDS, PROXIED};

/// Each backend's score is its live count above the time it was last chosen (in µs, 40 bits:
/// wraps every 12.7 days, which at worst misorders one tie). Lowest wins: fewest connections,
/// and among equals the one chosen longest ago, so ties go round-robin. Counts saturate at 2²³.
const STAMP_BITS: u32 = 40;
const MAX_LIVE: u64 = (1 << (64 - STAMP_BITS)) - 1;

/// The slot of the `STATE_UP` backend of `svc` with the fewest live connections, or `None`
/// when none is up.
///
/// Written for the verifier: one comparison of two unknown values per iteration and no
/// constants that branches depend on, so it can prune the states of equivalent paths instead of
/// walking every combination of 16 iterations.
#[inline(always)]
pub fn least_conns(svc: &Service, now_ns: u64) -> Option<u32> {
    // Sentinels rather than `Option`: `None` leaves a payload undefined, and LLVM may spill that
    // undefined register, which the verifier rejects ("!read_ok").
    let mut best = u32::MAX;
    let mut best_score = u64::MAX;
    for i in 0..MAX_BACKENDS_PER_SERVICE {
        // Re-read the service on every iteration (volatile: not hoisted), so a comparison with
        // `i` narrows a fresh value instead of one register's range path by path.
        let (count, first) = unsafe {
            (
                core::ptr::read_volatile(&raw const svc.backend_count),
                core::ptr::read_volatile(&raw const svc.first_backend),
            )
        };
        if i >= count {
            break;
        }
        let slot = first + i;
        let Some(backend) = BACKENDS.get(slot) else { continue };
        if backend.state != STATE_UP {
            continue;
        }
        // Written concurrently by other CPUs with atomic adds; a stale read only makes the
        // choice slightly less optimal, never wrong. Negative means a decrement raced a
        // reconcile: treat as zero.
        let Some(c) = BACKEND_CONNS.get_ptr(slot) else { continue };
        let (live, stamp) =
            unsafe { (core::ptr::read_volatile(&raw const (*c).live), core::ptr::read_volatile(&raw const (*c).last_chosen_ns)) };
        // The daemon's HTTPS requests in flight to the same backend count as connections too.
        let proxied = match PROXIED.get_ptr(slot) {
            Some(p) => unsafe { core::ptr::read_volatile(p) },
            None => 0,
        };
        let live = live.saturating_add(if proxied < 0 { 0 } else { proxied });
        let live = if live < 0 { 0 } else { (live as u64).min(MAX_LIVE) };
        let score = (live << STAMP_BITS) | ((stamp >> 10) & ((1 << STAMP_BITS) - 1));
        if score < best_score {
            best_score = score;
            best = slot;
        }
    }
    if best == u32::MAX {
        return None;
    }
    if let Some(c) = BACKEND_CONNS.get_ptr_mut(best) {
        // A plain store: two CPUs choosing at once may both pick this backend, which the live
        // count then reflects for the next choice.
        unsafe { (*c).last_chosen_ns = now_ns };
    }
    Some(best)
}

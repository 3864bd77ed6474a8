//! Least-connections backend choice for a new flow.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    backend::STATE_UP,
    service::{MAX_BACKENDS_PER_SERVICE, Service},
};

use crate::maps::{BACKEND_CONNS, BACKENDS};

/// Random low bits under the live count in each backend's score: equal counts are broken
/// uniformly at random, so idle backends share new flows evenly instead of the first taking all.
const TIE_BITS: u32 = 20;

/// The slot of the `STATE_UP` backend of `svc` with the fewest live connections, or `None`
/// when none is up.
///
/// Written for the verifier: one comparison of two unknown values per iteration and no
/// constants that branches depend on, so it can prune the states of equivalent paths instead of
/// walking every combination of 16 iterations.
#[inline(always)]
pub fn least_conns(svc: &Service) -> Option<u32> {
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
        let live = match BACKEND_CONNS.get_ptr(slot) {
            Some(c) => unsafe { core::ptr::read_volatile(&raw const (*c).live) },
            None => 0,
        };
        let live = if live < 0 { 0 } else { live as u64 };
        let tie = u64::from(unsafe { bpf_get_prandom_u32() } & ((1 << TIE_BITS) - 1));
        let score = (live << TIE_BITS) | tie;
        if score < best_score {
            best_score = score;
            best = slot;
        }
    }
    (best != u32::MAX).then_some(best)
}

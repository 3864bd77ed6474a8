//! Least-connections backend choice for a new flow.

use lb_common::{
    backend::STATE_UP,
    service::{MAX_BACKENDS_PER_SERVICE, Service},
};

use aya_ebpf::helpers::bpf_get_prandom_u32;

use crate::maps::{BACKEND_CONNS, BACKENDS, PASSIVE, PROXIED};

/// Each backend's score is its live count above the time it was last chosen (in µs, 40 bits:
/// wraps every 12.7 days, which at worst misorders one tie). Lowest wins: fewest connections,
/// and among equals the one chosen longest ago, so ties go round-robin. Counts saturate at 2²³;
/// the top bit is `LAST_RESORT_BIT`.
const STAMP_BITS: u32 = 40;
const MAX_LIVE: u64 = (1 << (63 - STAMP_BITS)) - 1;
/// Set in the score of a backend that should be chosen only when no other is up: the one a
/// retransmitted SYN's first attempt went to, and one in slow start that this flow's draw left
/// out.
const LAST_RESORT_BIT: u32 = 63;

/// No slot to avoid.
pub const AVOID_NONE: u32 = u32::MAX;

/// The slot of the `STATE_UP` backend of `svc` with the fewest live connections, or `None`
/// when none is up. `avoid` (or `AVOID_NONE`) and backends in slow start that lose their draw
/// are chosen only if nothing else is up.
///
/// Written for the verifier: one comparison of two unknown values per iteration and no
/// constants that branches depend on, so it can prune the states of equivalent paths instead of
/// walking every combination of 16 iterations. The last-resort conditions are therefore
/// computed with arithmetic, not branches (see `is_zero`): as branches they made the verifier
/// walk 256 000 instructions instead of 157 000 (106 000 without them), and every daemon start
/// waits for the verifier.
#[inline(always)]
pub fn least_conns(svc: &Service, now_ns: u64, avoid: u32) -> Option<u32> {
    // Sentinels rather than `Option`: `None` leaves a payload undefined, and LLVM may spill that
    // undefined register, which the verifier rejects ("!read_ok").
    let mut best = u32::MAX;
    let mut best_score = u64::MAX;
    // One draw per choice, shared by the backends in slow start (see `left_out_by_slow_start`).
    let draw = u64::from(unsafe { bpf_get_prandom_u32() }) & 0xffff;
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
        let mut score = (live << STAMP_BITS) | ((stamp >> 10) & ((1 << STAMP_BITS) - 1));
        score |= (is_zero(u64::from(slot ^ avoid)) | left_out_by_slow_start(slot, now_ns, draw)) << LAST_RESORT_BIT;
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

/// 1 if `x` is 0, else 0, for `x < 2⁶³`, without a branch (BPF has no set-on-condition; LLVM
/// lowers a comparison to a jump).
#[inline(always)]
fn is_zero(x: u64) -> u64 {
    x.wrapping_sub(1) >> 63
}

/// 1 if `a < b`, else 0, for `a, b < 2⁶³`, without a branch.
#[inline(always)]
fn less(a: u64, b: u64) -> u64 {
    a.wrapping_sub(b) >> 63
}

/// 1 if a backend in slow start sits this choice out, else 0: while it ramps up it takes part
/// with probability (time since it came back up) / `slow_start`, so its share of new flows
/// grows linearly from zero, whatever the load. `draw` is uniform in 0..2¹⁶.
#[inline(always)]
fn left_out_by_slow_start(slot: u32, now_ns: u64, draw: u64) -> u64 {
    let (len, since) = match PASSIVE.get_ptr(slot) {
        Some(p) => unsafe {
            (core::ptr::read_volatile(&raw const (*p).slow_start_ns), core::ptr::read_volatile(&raw const (*p).up_since_ns))
        },
        None => (0, 0),
    };
    let elapsed = now_ns.wrapping_sub(since);
    // Ramping: it came back up (`since` set) less than `len` ago; with `len` 0, never.
    let ramping = less(elapsed, len) & (is_zero(since) ^ 1);
    // Taking part iff draw / 2¹⁶ < elapsed / len. No overflow while ramping: the configuration
    // caps slow_start at an hour (< 2⁴² ns), and elapsed < len; otherwise the product is
    // masked out anyway.
    ramping & (less(draw * len, elapsed << 16) ^ 1)
}

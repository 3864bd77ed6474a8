//! Flow lifecycle: creation on SYN, exactly-once close on FIN/RST, removal on RST.

// The BPF target has no `core::sync::atomic` read-modify-write methods (they are gated on
// compare-and-swap support the target spec does not declare). An atomic add whose result is
// unused lowers to BPF's XADD, which every ISA level has.
use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};

use lb_common::{
    Addr,
    flow::{FLOW_CLOSED, Flow, FlowKey, ReplyNat},
};

use crate::{
    maps::{BACKEND_CONNS, CLOSED, FLOWS, REPLIES},
    parse::{TCP_FIN, TCP_RST},
};

const E2BIG: i32 = 7;
const ENOMEM: i32 = 12;
const EEXIST: i32 = 17;

/// Copies an address out of a map value word by word. A plain struct copy can be lowered to a
/// call to `memmove`, which the verifier rejects (it clobbers registers the caller still uses);
/// volatile loads cannot be merged back into one.
#[inline(always)]
pub fn copy_addr(a: &Addr) -> Addr {
    let p = (a as *const Addr).cast::<u32>();
    // SAFETY: `Addr` is four aligned u32s worth of bytes.
    let w = unsafe {
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    };
    Addr::from_words(w)
}

/// The `REPLIES` key of a flow: the backend's packets towards the client.
#[inline(always)]
pub fn reply_key(fwd: &FlowKey, flow: &Flow) -> FlowKey {
    FlowKey {
        src_addr: copy_addr(&flow.backend_addr),
        dst_addr: fwd.src_addr,
        src_port: flow.backend_port,
        dst_port: fwd.src_port,
        family: fwd.family,
        proto: fwd.proto,
        _pad: [0; 2],
    }
}

#[inline(always)]
pub fn add_live(slot: u32, delta: i64) {
    if let Some(c) = BACKEND_CONNS.get_ptr_mut(slot) {
        // SAFETY: an aligned i64 inside a map value; every CPU updates it atomically.
        unsafe { atomic_xadd::<i64, i64, { Relaxed }>(&raw mut (*c).live, delta) };
    }
}

/// Closes the flow if nobody has yet, decrementing its backend's live count. Returns whether
/// this call did it: exactly one insert into `CLOSED` succeeds (see `lb_common::flow::Closed`).
#[inline(always)]
pub fn close(fwd: &FlowKey, flow: *mut Flow) -> bool {
    match CLOSED.insert(fwd, &1, 1 /* BPF_NOEXIST */) {
        Ok(()) => {}
        Err(e) if -e == EEXIST => return false,
        // Full (it is as large as FLOWS, so only when nearly every flow is closing): count the
        // close anyway; the daemon's reconcile corrects a double decrement within a second.
        Err(_) => {}
    }
    unsafe { (*flow).closed = FLOW_CLOSED };
    add_live(unsafe { (*flow).backend }, -1);
    true
}

/// Forgets a flow: both NAT entries and its close marker.
#[inline(always)]
pub fn remove(fwd: &FlowKey, rev: &FlowKey) {
    let _ = REPLIES.remove(rev);
    let _ = FLOWS.remove(fwd);
    let _ = CLOSED.remove(fwd);
}

/// What a FIN or RST does to a tracked flow, given its forward key. Returns whether it closed
/// the flow now. After an RST everything goes: nothing more will come on this 4-tuple. After a
/// FIN the entries stay, because the rest of the teardown (the peer's FIN, the last ACKs) must
/// still be rewritten; the daemon removes them once the kernel's socket is gone.
#[inline(always)]
pub fn on_flags(fwd: &FlowKey, flow: *mut Flow, flags: u8) -> bool {
    if flags & (TCP_FIN | TCP_RST) == 0 {
        return false;
    }
    let closed_now = close(fwd, flow);
    if flags & TCP_RST != 0 {
        let rev = reply_key(fwd, unsafe { &*flow });
        remove(fwd, &rev);
    }
    closed_now
}

pub enum Insert {
    Created,
    /// Another CPU created the same flow first (a retransmitted SYN); use theirs.
    Exists,
    /// Conntrack is full.
    Full,
}

/// Records a new flow in both directions. If the reverse entry cannot be stored, the forward
/// one is removed again, so a flow is either fully tracked or not at all.
#[inline(always)]
pub fn insert(fwd: &FlowKey, flow: &Flow, nat: &ReplyNat) -> Insert {
    match FLOWS.insert(fwd, flow, 1 /* BPF_NOEXIST */) {
        Ok(()) => {}
        Err(e) if -e == EEXIST => return Insert::Exists,
        Err(e) if -e == E2BIG || -e == ENOMEM => return Insert::Full,
        Err(_) => return Insert::Full,
    }
    let rev = reply_key(fwd, flow);
    if REPLIES.insert(&rev, nat, 0 /* BPF_ANY */).is_err() {
        let _ = FLOWS.remove(fwd);
        return Insert::Full;
    }
    Insert::Created
}

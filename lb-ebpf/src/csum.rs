//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Values are the raw 16-bit words as they sit in the packet; the one's-complement sum is
//! byte-order independent, so no swapping is needed. An incremental update carries an existing
//! error through unchanged: a packet with a bad checksum still has a bad one after rewriting,
//! and the receiver drops it as it would have without us.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after one 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}

/// The checksum after a 32-bit field (an IPv4 address or an IPv6 address word) changed.
#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    !fold(sum)
}

//! Internet checksums, their incremental update, and big-endian field access.

use lb_common::Addr;

pub use crate::syn::csum;
use crate::syn::fold;

/// RFC 1624 eqn. 3 for one 16-bit word, on big-endian values (the sum is byte-order independent).
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}

pub fn replace32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let w = |b: [u8; 4], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    !fold(
        u32::from(!check) + u32::from(!w(old, 0)) + u32::from(!w(old, 2)) + u32::from(w(new, 0)) + u32::from(w(new, 2)),
    )
}

pub fn rd16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

pub fn wr16(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

pub fn rd32(p: &[u8], at: usize) -> [u8; 4] {
    p[at..at + 4].try_into().unwrap()
}

/// Word `i` of an address (IPv4: word 0).
pub fn word(a: &Addr, i: usize) -> [u8; 4] {
    a.0[i * 4..i * 4 + 4].try_into().unwrap()
}

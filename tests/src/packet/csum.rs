//! Internet checksums, their incremental update, and big-endian field access.

use lb_common::Addr;

/// One's-complement sum of big-endian 16-bit words (odd tail padded), not yet folded.
fn sum_words(data: &[u8]) -> u32 {
    data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum over `chunks` as one sequence of words (each chunk but the last of even length).
pub fn csum(chunks: &[&[u8]]) -> u16 {
    !fold(chunks.iter().map(|c| sum_words(c)).sum())
}

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

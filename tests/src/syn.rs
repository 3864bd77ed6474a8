//! A hand-made TCP SYN, for the flows no real client can make (spoofed sources that never
//! answer the SYN-ACK), and the Internet checksum (RFC 1071) every test packet uses.
use std::net::SocketAddrV4;

/// An IPv4 TCP SYN with correct IP and TCP checksums and no options.
pub fn syn_packet(src: SocketAddrV4, dst: SocketAddrV4, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45; // version 4, 5-word header
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[4..6].copy_from_slice(&src.port().to_be_bytes()); // identification
    p[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let ip_check = csum(&[&p[..20]]);
    p[10..12].copy_from_slice(&ip_check.to_be_bytes());
    {
        let tcp = &mut p[20..];
        tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
        tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[12] = 5 << 4; // data offset
        tcp[13] = 0x02; // SYN
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    }
    let mut pseudo = Vec::with_capacity(12 + 20);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&p[20..]);
    let tcp_check = csum(&[&pseudo]);
    p[36..38].copy_from_slice(&tcp_check.to_be_bytes());
    p
}

/// One's-complement sum of big-endian 16-bit words (odd tail padded), not yet folded.
fn sum_words(data: &[u8]) -> u32 {
    data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

pub(crate) fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum over `chunks` as one sequence of words (each chunk but the last of even length).
pub fn csum(chunks: &[&[u8]]) -> u16 {
    !fold(chunks.iter().map(|c| sum_words(c)).sum())
}

//! Packet-test support: frames built with correct checksums (and the malformed variations),
//! parsed as the programs parse them, and the real XDP and TC programs loaded detached
//! (`Dataplane::load_detached`) to run them through with `BPF_PROG_TEST_RUN`. Shared by the
//! packet table (`tests/packets.rs`), the fuzzer (`tests/fuzz_packets.rs`) and the program-cost
//! measurement of `cargo xtask bench` (`xlb-test-run-cost`).

mod build;
mod csum;
mod load;
mod parse;

use std::net::{Ipv4Addr, Ipv6Addr};

pub use build::{Frame, Pkt, icmp_error, v4, v6};
pub use csum::{csum, rd16, rd32, replace16, replace32, word, wr16};
pub use load::{config, counter, live, load, set_live, tc, xdp, xdp_bytes};
pub use parse::{Icmp, Parsed, Tcp, flow_key, ipv4_header_ok, parse, tcp_checksum_ok, tcp_csum};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// 802.1Q and 802.1ad (QinQ outer) tag types.
pub const VLAN_8021Q: u16 = 0x8100;
pub const VLAN_8021AD: u16 = 0x88a8;

/// The addresses of the test configurations: a client, the host (the backends' address, and a
/// VIP's on a one-address VPS), a VIP of its own, and a router that sends ICMP errors.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
pub const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x10);

/// Service 0: a VIP on its own address (address and port rewritten); service 1: a VIP on the
/// backends' address, as on a one-address VPS (port rewritten only); service 2: IPv6.
pub const SERVICES: &str = r#"
[dataplane]
interfaces = ["lo"]
[[service]]
name = "vip"
listen = "198.18.0.10:80"
backends = ["198.18.0.1:8001", "198.18.0.1:8002", "198.18.0.1:8003"]
[[service]]
name = "same-address"
listen = "198.18.0.1:80"
backends = ["198.18.0.1:8001", "198.18.0.1:8002", "198.18.0.1:8003"]
[[service]]
name = "v6"
listen = "[2001:2::10]:80"
backends = ["[2001:2::1]:8001", "[2001:2::1]:8002"]
"#;

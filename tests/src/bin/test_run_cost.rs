//! xlb's program cost through `BPF_PROG_TEST_RUN`, for `cargo xtask bench`, which runs this
//! release-built and parses the `test_run cost` line: ns per packet for the no-op program, a
//! new flow's SYN, an established flow's packet, a non-VIP packet and a TC reply; then the
//! kernel's verified instruction counts. Needs root (CAP_BPF).

use std::time::Duration;

use xlb_tests::packet::{ACK, CLIENT, HOST, PSH, SYN, VIP, XDP_PASS, config, counter, load, v4, xdp};

/// Two services that are each other's backend. With repeat > 1, `BPF_PROG_TEST_RUN` runs every
/// repetition on the packet the previous one left, so a rewritten packet would otherwise measure
/// the non-VIP path from the second run on. Here the rewrite of flow A yields a packet of flow
/// B and back: every repetition is a real established-flow (or reply) rewrite of address, port
/// and both checksums.
const PING_PONG: &str = r#"
[dataplane]
interfaces = ["lo"]
[[service]]
name = "a"
listen = "198.18.0.10:80"
backends = ["198.18.0.1:8001"]
[[service]]
name = "b"
listen = "198.18.0.1:8001"
backends = ["198.18.0.10:80"]
"#;

/// The checks make sure that every figure is of the path it is named after.
fn main() {
    let dp = load(&config(PING_PONG), lb_common::flow::DEFAULT_MAX_FLOWS, |_, _| xlb::status::BackendState::Up);
    const REPEAT: u32 = 1_000_000;
    let a = v4(CLIENT, 45000, VIP, 80, SYN);
    let b = v4(CLIENT, 45000, HOST, 8001, SYN);
    assert_eq!(xdp(&dp, &a).1, a.with_dst(HOST.into(), 8001).bytes());
    assert_eq!(xdp(&dp, &b).1, b.with_dst(VIP.into(), 80).bytes());
    let ack = v4(CLIENT, 45000, VIP, 80, ACK | PSH);

    let noop = dp.test_run_noop(&ack.bytes(), REPEAT).unwrap();
    assert_eq!(noop.verdict, XDP_PASS);
    let est = dp.test_run_xdp(&ack.bytes(), REPEAT).unwrap();
    // An even number of rewrites brings the packet back to where it started.
    assert_eq!(est.data, ack.bytes(), "every repetition rewrote the packet");
    let reply = v4(HOST, 8001, CLIENT, 45000, ACK | PSH);
    let rep = dp.test_run_tc(&reply.bytes(), REPEAT).unwrap();
    assert_eq!(rep.data, reply.bytes(), "every repetition rewrote the reply");
    let non_vip = v4(CLIENT, 45000, HOST, 22, ACK);
    let other = dp.test_run_xdp(&non_vip.bytes(), REPEAT).unwrap();
    assert_eq!(other.data, non_vip.bytes());
    // A new flow each time: distinct source ports, one run each, averaged. One run per call
    // carries a fixed cost of its own (the kernel's timer around a single run); the no-op
    // program measured the same way is the baseline for the new-flow figure.
    let n = 4_000u32;
    let (mut total, mut noop_single) = (Duration::ZERO, Duration::ZERO);
    for i in 0..n {
        let syn = v4(CLIENT, 1024 + i as u16, VIP, 80, SYN);
        let out = dp.test_run_xdp(&syn.bytes(), 1).unwrap();
        assert_eq!(out.data, syn.with_dst(HOST.into(), 8001).bytes());
        total += out.duration;
        noop_single += dp.test_run_noop(&syn.bytes(), 1).unwrap().duration;
    }
    let ns = |d: Duration| d.as_nanos();
    eprintln!(
        "test_run cost (ns/packet): no-op XDP {} | new-flow SYN {} (no-op run the same way: {}) | established {} | non-VIP {} | TC reply {}",
        ns(noop.duration),
        ns(total / n),
        ns(noop_single / n),
        ns(est.duration),
        ns(other.duration),
        ns(rep.duration)
    );
    assert_eq!(counter(&dp, "new_flows"), u64::from(n) + 2);
    let verified = dp.verified_instructions().unwrap();
    eprintln!("verified instructions: {verified:?}");
    assert!(verified.iter().all(|&(_, n)| n > 0), "the kernel reports verified_insns: {verified:?}");
}

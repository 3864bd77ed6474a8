//! Packet table: bytes in → verdict and exact bytes out, through the real XDP and TC programs
//! loaded in the kernel (`BPF_PROG_TEST_RUN`), with maps preset through the daemon's own
//! `Dataplane` API. Also backend selection and conntrack capacity. Needs root (CAP_BPF).

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{
    Addr,
    backend::Passive,
    flow::{FLOW_CLOSED, FLOW_OPEN, FlowKey, HANDSHAKE_ANSWERED, HANDSHAKE_SYN_SENT},
};
use xlb::{
    backends::{Maps as _, monotonic_ns},
    dataplane::Dataplane,
    layout::Layout,
    status::BackendState,
};
use xlb_tests::packet::{
    ACK, CLIENT, CLIENT6, FIN, HOST, HOST6, PSH, Pkt, ROUTER, RST, SERVICES, SYN, TC_ACT_OK, TC_ACT_SHOT, VIP, VIP6, VLAN_8021Q, XDP_DROP,
    XDP_PASS, config, counter, icmp_error, ipv4_header_ok, live, load, rd16, set_live, tc, tcp_checksum_ok, v4, v6, xdp,
    xdp_bytes,
};

/// The programs loaded with `SERVICES`; `states[s][b]` where given, else up.
fn setup(states: &[&[BackendState]]) -> Dataplane {
    setup_with(SERVICES, 4096, states)
}

/// The programs loaded with conntrack for `max_flows` and the services of `config_text`.
fn setup_with(config_text: &str, max_flows: u32, states: &[&[BackendState]]) -> Dataplane {
    load(&config(config_text), max_flows, |s, b| states.get(s).and_then(|v| v.get(b)).copied().unwrap_or(BackendState::Up))
}

// ---------------------------------------------------------------------------------------------
// The flow lifecycle.

#[test]
fn syn_to_vip_is_dnated_to_the_least_loaded_backend() {
    let mut dp = setup(&[]);
    set_live(&mut dp, 0, &[3, 1, 2]);
    let syn = v4(CLIENT, 40000, VIP, 80, SYN);
    let (verdict, out) = xdp(&dp, &syn);
    assert_eq!(verdict, XDP_PASS);
    let expected = syn.with_dst(HOST.into(), 8002).bytes();
    assert_eq!(out, expected, "destination rewritten to 198.18.0.1:8002 with both checksums patched");
    assert!(tcp_checksum_ok(&out) && ipv4_header_ok(&out));
    let flow = dp.flow(&syn.key()).expect("flow recorded");
    assert_eq!((flow.backend, flow.closed), (1, FLOW_OPEN));
    assert_eq!(live(&dp, 0, 1), 2, "live count incremented");
    assert_eq!(dp.total(0, 1).unwrap(), 1);
    assert_eq!(counter(&dp, "new_flows"), 1);
    let reply_key = syn.with_dst(HOST.into(), 8002).key();
    let rev = FlowKey { src_addr: reply_key.dst_addr, dst_addr: reply_key.src_addr, src_port: reply_key.dst_port, dst_port: reply_key.src_port, ..reply_key };
    let nat = dp.reply(&rev).expect("reverse entry recorded");
    assert_eq!((nat.vip_addr, u16::from_be(nat.vip_port)), (Addr::v4(VIP.octets()), 80));
}

#[test]
fn https_requests_in_flight_count_as_connections() {
    let mut dp = setup(&[]);
    set_live(&mut dp, 0, &[1, 1, 1]);
    // The HTTPS proxy has 2 requests in flight to app-1 and 1 to app-3: app-2 is least loaded.
    dp.set_proxied(Layout::positional_slot(0, 0), 2).unwrap();
    dp.set_proxied(Layout::positional_slot(0, 2), 1).unwrap();
    let (_, out) = xdp(&dp, &v4(CLIENT, 40001, VIP, 80, SYN));
    assert_eq!(out, v4(CLIENT, 40001, VIP, 80, SYN).with_dst(HOST.into(), 8002).bytes());
    // Now app-2 has 2 live and app-3 1 live + 1 proxied: app-3 (chosen longer ago than app-2).
    let (_, out) = xdp(&dp, &v4(CLIENT, 40002, VIP, 80, SYN));
    assert_eq!(out, v4(CLIENT, 40002, VIP, 80, SYN).with_dst(HOST.into(), 8003).bytes());
    assert_eq!(live(&dp, 0, 2), 2, "proxied requests are not added to the map's live count");
    // A negative value (never written by the daemon) is treated as zero, not as a bonus.
    dp.set_proxied(Layout::positional_slot(0, 0), -100).unwrap();
    let (_, out) = xdp(&dp, &v4(CLIENT, 40003, VIP, 80, SYN));
    assert_eq!(out, v4(CLIENT, 40003, VIP, 80, SYN).with_dst(HOST.into(), 8001).bytes());
}

#[test]
fn established_packets_follow_their_flow_and_replies_come_back_from_the_vip() {
    let mut dp = setup(&[]);
    set_live(&mut dp, 1, &[5, 5, 0]);
    let syn = v4(CLIENT, 40001, HOST, 80, SYN);
    let (_, out) = xdp(&dp, &syn);
    assert_eq!(out, syn.with_dst(HOST.into(), 8003).bytes(), "same-address VIP: only the port changes");
    // Loads change, the flow stays.
    set_live(&mut dp, 1, &[0, 0, 9]);
    let data = v4(CLIENT, 40001, HOST, 80, ACK | PSH);
    let (verdict, out) = xdp(&dp, &data);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, data.with_dst(HOST.into(), 8003).bytes());
    assert_eq!(live(&dp, 1, 2), 9, "an established packet does not count again");

    let reply = v4(HOST, 8003, CLIENT, 40001, ACK | PSH);
    let (verdict, out) = tc(&dp, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, reply.with_src(HOST.into(), 80).bytes(), "reply source rewritten to the VIP port");
    assert_eq!(counter(&dp, "reply_packets"), 1);

    // A VIP on another address: the reply's source address changes too.
    set_live(&mut dp, 0, &[0, 1, 1]);
    let syn = v4(CLIENT, 40002, VIP, 80, SYN);
    xdp(&dp, &syn);
    let reply = v4(HOST, 8001, CLIENT, 40002, SYN | ACK);
    let (_, out) = tc(&dp, &reply);
    assert_eq!(out, reply.with_src(VIP.into(), 80).bytes());
    assert!(tcp_checksum_ok(&out) && ipv4_header_ok(&out));
}

#[test]
fn fin_closes_a_flow_once_and_keeps_it_for_the_teardown() {
    let mut dp = setup(&[]);
    set_live(&mut dp, 0, &[0, 4, 4]);
    let syn = v4(CLIENT, 40010, VIP, 80, SYN);
    xdp(&dp, &syn);
    assert_eq!(live(&dp, 0, 0), 1);
    let fin = v4(CLIENT, 40010, VIP, 80, FIN | ACK);
    let (verdict, out) = xdp(&dp, &fin);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, fin.with_dst(HOST.into(), 8001).bytes(), "the FIN itself is rewritten");
    assert_eq!(live(&dp, 0, 0), 0, "decremented on the first FIN");
    assert_eq!(dp.flow(&syn.key()).unwrap().closed, FLOW_CLOSED);
    // The backend's FIN and the last ACK still need NAT, and must not decrement again.
    let back_fin = v4(HOST, 8001, CLIENT, 40010, FIN | ACK);
    let (_, out) = tc(&dp, &back_fin);
    assert_eq!(out, back_fin.with_src(VIP.into(), 80).bytes());
    let last_ack = v4(CLIENT, 40010, VIP, 80, ACK);
    let (_, out) = xdp(&dp, &last_ack);
    assert_eq!(out, last_ack.with_dst(HOST.into(), 8001).bytes());
    assert_eq!(live(&dp, 0, 0), 0, "exactly once");
    assert_eq!(counter(&dp, "closed_flows"), 1);
    // The same 4-tuple reused for a new connection is balanced afresh and counted.
    set_live(&mut dp, 0, &[4, 0, 4]);
    let (_, out) = xdp(&dp, &syn);
    assert_eq!(out, syn.with_dst(HOST.into(), 8002).bytes());
    assert_eq!(dp.flow(&syn.key()).unwrap().closed, FLOW_OPEN);
    assert_eq!(live(&dp, 0, 1), 1);
}

#[test]
fn forgetting_a_flow_spares_a_new_connection_on_the_same_4_tuple() {
    let mut dp = setup(&[]);
    set_live(&mut dp, 0, &[0, 4, 4]);
    let syn = v4(CLIENT, 40015, VIP, 80, SYN);
    xdp(&dp, &syn);
    xdp(&dp, &v4(CLIENT, 40015, VIP, 80, FIN | ACK));
    // The daemon's snapshot of the old, closed flow ...
    let snapshot = dp.flows().unwrap();
    let (rev, nat, seen) = snapshot.iter().find(|(_, _, f)| f.is_some()).copied().unwrap();
    // ... then the client reuses the port; this time app-2 is least loaded.
    set_live(&mut dp, 0, &[4, 0, 4]);
    let (_, out) = xdp(&dp, &syn);
    assert_eq!(out, syn.with_dst(HOST.into(), 8002).bytes());
    assert!(!dp.remove_flow(&rev, &nat, seen.as_ref()), "the snapshot is stale: nothing removed");
    let flow = dp.flow(&syn.key()).expect("the new connection keeps its flow");
    assert_eq!((flow.backend, flow.closed), (1, FLOW_OPEN));
    let ack = v4(CLIENT, 40015, VIP, 80, ACK);
    assert_eq!(xdp(&dp, &ack).1, ack.with_dst(HOST.into(), 8002).bytes());
    // A current snapshot is removed in both directions.
    let (rev, nat, seen) = dp.flows().unwrap()[0];
    assert!(dp.remove_flow(&rev, &nat, seen.as_ref()));
    assert!(dp.flow(&syn.key()).is_none() && dp.reply(&rev).is_none() && dp.flows().unwrap().is_empty());
}

#[test]
fn rst_in_either_direction_removes_the_flow() {
    let mut dp = setup(&[]);
    set_live(&mut dp, 0, &[0, 4, 4]);
    let syn = v4(CLIENT, 40020, VIP, 80, SYN);
    xdp(&dp, &syn);
    let rst = v4(CLIENT, 40020, VIP, 80, RST);
    let (_, out) = xdp(&dp, &rst);
    assert_eq!(out, rst.with_dst(HOST.into(), 8001).bytes(), "the RST reaches the backend");
    assert!(dp.flow(&syn.key()).is_none(), "forward entry removed");
    assert_eq!(live(&dp, 0, 0), 0);

    let syn = v4(CLIENT, 40021, VIP, 80, SYN);
    xdp(&dp, &syn);
    assert_eq!(live(&dp, 0, 0), 1);
    // (After the backend's SYN-ACK: an RST in answer to the SYN is a refused connection, see
    // the passive health rows.)
    tc(&dp, &v4(HOST, 8001, CLIENT, 40021, SYN | ACK));
    let rst = v4(HOST, 8001, CLIENT, 40021, RST | ACK);
    let (_, out) = tc(&dp, &rst);
    assert_eq!(out, rst.with_src(VIP.into(), 80).bytes());
    assert!(dp.flow(&syn.key()).is_none());
    assert_eq!(live(&dp, 0, 0), 0, "backend RST decrements");
    // Nothing is left to rewrite: a late reply passes untouched.
    let late = v4(HOST, 8001, CLIENT, 40021, ACK);
    assert_eq!(tc(&dp, &late).1, late.bytes());
}

#[test]
fn ipv6_flows_are_dnated_and_reverse_natted() {
    let mut dp = setup(&[]);
    set_live(&mut dp, 2, &[1, 0]);
    let syn = v6(CLIENT6, 50000, VIP6, 80, SYN);
    let (verdict, out) = xdp(&dp, &syn);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, syn.with_dst(HOST6.into(), 8002).bytes());
    assert!(tcp_checksum_ok(&out));
    let reply = v6(HOST6, 8002, CLIENT6, 50000, SYN | ACK);
    let (_, out) = tc(&dp, &reply);
    assert_eq!(out, reply.with_src(VIP6.into(), 80).bytes());
    assert!(tcp_checksum_ok(&out));
    let fin = v6(CLIENT6, 50000, VIP6, 80, FIN | ACK);
    xdp(&dp, &fin);
    assert_eq!(live(&dp, 2, 1), 0);
}

// ---------------------------------------------------------------------------------------------
// Everything that is not ours, or is malformed: a documented verdict, a counter, bytes untouched.

#[test]
fn non_vip_and_malformed_packets_pass_untouched_and_are_counted() {
    let dp = setup(&[]);
    let syn = v4(CLIENT, 40100, VIP, 80, SYN);
    let truncate = |n: usize| {
        let mut b = syn.bytes();
        b.truncate(n);
        b
    };
    let ihl4 = {
        let mut b = syn.bytes();
        b[14] = 0x44;
        b
    };
    let arp = {
        let mut b = vec![0xff; 6];
        b.extend([0x02, 0, 0, 0, 0, 2, 0x08, 0x06]);
        b.extend([0, 1, 8, 0, 6, 4, 0, 1]);
        b.extend([0u8; 20]);
        b
    };
    let udp = {
        let mut b = syn.bytes();
        b[23] = 17;
        b
    };
    let rows: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("not a VIP (other port)", v4(CLIENT, 40100, HOST, 22, SYN).bytes(), None),
        ("not a VIP (other address)", v4(CLIENT, 40100, Ipv4Addr::new(198, 18, 0, 99), 80, SYN).bytes(), None),
        ("non-SYN to a VIP without a flow", v4(CLIENT, 40101, VIP, 80, ACK).bytes(), Some("no_flow")),
        ("ARP", arp, None),
        ("UDP to the VIP", udp, None),
        // (Frames shorter than an Ethernet header cannot be fed to BPF_PROG_TEST_RUN; the
        // program's first bounds check covers them.)
        ("truncated IPv4 header", truncate(14 + 12), Some("malformed")),
        ("truncated TCP header", truncate(14 + 20 + 10), Some("malformed")),
        ("IPv4 ihl < 5", ihl4, Some("malformed")),
        ("TCP doff < 5", Pkt { doff: Some(4), ..syn.clone() }.bytes(), Some("malformed")),
        ("TCP doff past the end", Pkt { doff: Some(15), ..syn.clone() }.bytes(), Some("malformed")),
        ("IPv4 fragment (MF)", Pkt { frag: 0x2000, ..syn.clone() }.bytes(), Some("fragments")),
        ("IPv4 fragment (offset)", Pkt { frag: 0x0010, ..syn.clone() }.bytes(), Some("fragments")),
        ("IPv6 extension header", Pkt { hop_by_hop: true, ..v6(CLIENT6, 50100, VIP6, 80, SYN) }.bytes(), Some("ipv6_ext")),
        ("truncated IPv6 header", v6(CLIENT6, 50100, VIP6, 80, SYN).bytes()[..14 + 30].to_vec(), Some("malformed")),
    ];
    for (name, bytes, counter_name) in rows {
        let before = counter_name.map(|c| counter(&dp, c));
        let out = dp.test_run_xdp(&bytes, 1).unwrap();
        assert_eq!(out.verdict, XDP_PASS, "{name}: XDP_PASS");
        assert_eq!(out.data, bytes, "{name}: bytes untouched");
        if let (Some(c), Some(before)) = (counter_name, before) {
            assert_eq!(counter(&dp, c), before + 1, "{name}: counted in {c}");
        }
        let tc_out = dp.test_run_tc(&bytes, 1);
        if let Ok(out) = tc_out {
            assert_eq!(out.verdict, TC_ACT_OK, "{name}: TC passes");
            assert_eq!(out.data, bytes, "{name}: TC leaves bytes untouched");
        }
    }
    assert_eq!(counter(&dp, "new_flows"), 0, "none of these created a flow");
}

#[test]
fn vlan_tags_and_ipv4_options_are_handled() {
    let mut dp = setup(&[]);
    set_live(&mut dp, 0, &[1, 0, 1]);
    let tagged = Pkt { vlan: Some((VLAN_8021Q, 42)), ..v4(CLIENT, 40200, VIP, 80, SYN) };
    let (_, out) = xdp(&dp, &tagged);
    assert_eq!(out, tagged.with_dst(HOST.into(), 8002).bytes(), "VLAN tag kept, inner packet rewritten");
    let reply = Pkt { vlan: Some((VLAN_8021Q, 42)), ..v4(HOST, 8002, CLIENT, 40200, SYN | ACK) };
    assert_eq!(tc(&dp, &reply).1, reply.with_src(VIP.into(), 80).bytes());

    set_live(&mut dp, 0, &[1, 1, 0]);
    // NOP NOP NOP EOL: a 24-byte IPv4 header.
    let opts = Pkt { ip_options: vec![1, 1, 1, 0], ..v4(CLIENT, 40201, VIP, 80, SYN) };
    let (verdict, out) = xdp(&dp, &opts);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, opts.with_dst(HOST.into(), 8003).bytes(), "TCP found after the options and rewritten");
    assert!(tcp_checksum_ok(&out) && ipv4_header_ok(&out));
    assert_eq!(counter(&dp, "ip_options"), 1);
}

#[test]
fn a_bad_checksum_stays_bad_after_rewriting() {
    let mut dp = setup(&[]);
    set_live(&mut dp, 0, &[0, 1, 1]);
    let bad = Pkt { bad_csum: 0x1111, ..v4(CLIENT, 40300, VIP, 80, SYN) };
    assert!(!tcp_checksum_ok(&bad.bytes()));
    let (verdict, out) = xdp(&dp, &bad);
    assert_eq!(verdict, XDP_PASS);
    assert!(!tcp_checksum_ok(&out), "the receiver must still see a bad checksum and drop it");
    assert_eq!(out, bad.with_dst(HOST.into(), 8001).bytes(), "the error is carried over unchanged");
    let bad_reply = Pkt { bad_csum: 0x2222, ..v4(HOST, 8001, CLIENT, 40300, SYN | ACK) };
    let (_, out) = tc(&dp, &bad_reply);
    assert!(!tcp_checksum_ok(&out));
    assert_eq!(out, bad_reply.with_src(VIP.into(), 80).bytes());
}

// ---------------------------------------------------------------------------------------------
// Selection.

#[test]
fn selection_follows_counts_and_states() {
    use BackendState::{Down, Draining, Up};
    // Preset counts → the least loaded.
    let mut dp = setup(&[]);
    for (live, expected) in [([5, 2, 7], 8002), ([0, 3, 3], 8001), ([9, 9, 8], 8003), ([-3, 1, 1], 8001)] {
        set_live(&mut dp, 0, &live);
        let syn = v4(CLIENT, 41000 + expected, VIP, 80, SYN);
        assert_eq!(xdp(&dp, &syn).1, syn.with_dst(HOST.into(), expected).bytes(), "counts {live:?}");
    }
    // Draining and down backends are never chosen, however idle.
    let mut dp = setup(&[&[Up, Draining, Down]]);
    for port in 0..50 {
        set_live(&mut dp, 0, &[100, 0, 0]);
        let syn = v4(CLIENT, 42000 + port, VIP, 80, SYN);
        assert_eq!(xdp(&dp, &syn).1, syn.with_dst(HOST.into(), 8001).bytes());
    }
    // Existing flows keep their backend when it goes down or drains.
    let syn = v4(CLIENT, 42000, VIP, 80, SYN);
    let dp = {
        let mut dp = dp;
        let config = config(SERVICES);
        let states: Vec<Vec<BackendState>> = config.services.iter().map(|s| vec![Down; s.backends.len()]).collect();
        dp.apply_services(&config.services, &states).unwrap();
        dp
    };
    let ack = v4(CLIENT, 42000, VIP, 80, ACK);
    assert_eq!(xdp(&dp, &ack).1, ack.with_dst(HOST.into(), 8001).bytes(), "established flow kept");
    // All down: new SYNs are dropped (the client retransmits) and counted.
    let new = v4(CLIENT, 43000, VIP, 80, SYN);
    let (verdict, out) = xdp(&dp, &new);
    assert_eq!((verdict, out), (XDP_DROP, new.bytes()));
    assert_eq!(counter(&dp, "drop_no_backend"), 1);
    let _ = syn;
}

#[test]
fn ties_are_broken_evenly() {
    let mut dp = setup(&[]);
    let mut hits = [0u32; 3];
    for port in 0..600u16 {
        set_live(&mut dp, 0, &[7, 7, 7]);
        let syn = v4(CLIENT, 20000 + port, VIP, 80, SYN);
        let (_, out) = xdp(&dp, &syn);
        let dport = rd16(&out, 36);
        hits[usize::from(dport - 8001)] += 1;
    }
    // Round-robin among equals: exactly even.
    assert_eq!(hits, [200, 200, 200], "tied backends share new flows evenly");
}

// ---------------------------------------------------------------------------------------------
// Passive health: refused and unanswered new flows, max_fails within fail_timeout, slow start.

/// Service 0 with `max_fails = 2`, service 1 with passive health off, service 2 with a
/// 100-second slow start.
const PASSIVE_CONFIG: &str = r#"
[dataplane]
interfaces = ["lo"]
[[service]]
name = "vip"
listen = "198.18.0.10:80"
backends = ["198.18.0.1:8001", "198.18.0.1:8002", "198.18.0.1:8003"]
max_fails = 2
fail_timeout = "10s"
[[service]]
name = "off"
listen = "198.18.0.1:80"
backends = ["198.18.0.1:8001", "198.18.0.1:8002"]
max_fails = 0
[[service]]
name = "ramp"
listen = "198.18.0.10:81"
backends = ["198.18.0.1:8001", "198.18.0.1:8002"]
slow_start = "100s"
"#;

fn state(dp: &Dataplane, config_text: &str, service: usize, backend: usize) -> BackendState {
    let config = config(config_text);
    dp.current_states(&config.services)[service][backend].expect("a known state")
}

/// The backend port a SYN was sent to.
fn dport(out: &[u8]) -> u16 {
    rd16(out, 36)
}

#[test]
fn a_backend_refusing_max_fails_new_flows_is_failed_at_once() {
    let mut dp = setup_with(PASSIVE_CONFIG, 4096, &[]);
    let passive = dp.passive(0, 0).unwrap();
    assert_eq!((passive.max_fails, passive.fail_timeout_ns), (2, 10_000_000_000), "settings written per slot");

    // The backend answered: an RST later is an ordinary close, not a failure.
    set_live(&mut dp, 0, &[0, 4, 4]);
    let syn = v4(CLIENT, 46000, VIP, 80, SYN);
    xdp(&dp, &syn);
    assert_eq!(dp.flow(&syn.key()).unwrap().handshake, HANDSHAKE_SYN_SENT);
    let syn_ack = v4(HOST, 8001, CLIENT, 46000, SYN | ACK);
    assert_eq!(tc(&dp, &syn_ack), (TC_ACT_OK, syn_ack.with_src(VIP.into(), 80).bytes()));
    assert_eq!(dp.flow(&syn.key()).unwrap().handshake, HANDSHAKE_ANSWERED, "the SYN-ACK marks the flow answered");
    let rst = v4(HOST, 8001, CLIENT, 46000, RST | ACK);
    assert_eq!(tc(&dp, &rst), (TC_ACT_OK, rst.with_src(VIP.into(), 80).bytes()));
    assert_eq!(dp.passive(0, 0).unwrap().refused, 0);

    // Refused: the RST answering the SYN counts a failure, is kept from the client (whose SYN
    // retransmission is balanced afresh) and removes the flow.
    for (i, port) in [46001u16, 46002].into_iter().enumerate() {
        set_live(&mut dp, 0, &[0, 4, 4]);
        let syn = v4(CLIENT, port, VIP, 80, SYN);
        assert_eq!(xdp(&dp, &syn).1, syn.with_dst(HOST.into(), 8001).bytes());
        let rst = v4(HOST, 8001, CLIENT, port, RST | ACK);
        let (verdict, _) = tc(&dp, &rst);
        assert_eq!(verdict, TC_ACT_SHOT, "the refusal does not reach the client");
        assert!(dp.flow(&syn.key()).is_none(), "the refused flow is forgotten");
        assert_eq!(live(&dp, 0, 0), 0, "and no longer counted");
        let p = dp.passive(0, 0).unwrap();
        assert_eq!((p.refused, p.fails), (i as u64 + 1, i as u32 + 1));
        let expected = if i == 0 { BackendState::Up } else { BackendState::Failed };
        assert_eq!(state(&dp, PASSIVE_CONFIG, 0, 0), expected, "after {} refusals (max_fails 2)", i + 1);
    }
    // Failed: never chosen, however idle; the client's retransmitted SYN goes elsewhere.
    for port in 0..20 {
        set_live(&mut dp, 0, &[0, 4, 4]);
        let syn = v4(CLIENT, 46001 + port, VIP, 80, SYN);
        assert_ne!(dport(&xdp(&dp, &syn).1), 8001, "a failed backend was chosen");
    }
    // Others' failures do not touch it; the daemon brings it back.
    dp.restart_passive(Layout::positional_slot(0, 0), monotonic_ns()).unwrap();
    dp.set_state(0, 0, BackendState::Up).unwrap();
    let p = dp.passive(0, 0).unwrap();
    assert_eq!((p.fails, p.window_start_ns, p.up_since_ns, p.refused), (0, 0, 0, 2), "window cleared, totals kept");
    set_live(&mut dp, 0, &[0, 4, 4]);
    assert_eq!(dport(&xdp(&dp, &v4(CLIENT, 47000, VIP, 80, SYN)).1), 8001);
}

#[test]
fn ipv6_backends_are_failed_the_same_way() {
    // `SERVICES`' service 2 (IPv6) has the default max_fails = 1.
    let mut dp = setup(&[]);
    set_live(&mut dp, 2, &[0, 3]);
    let syn = v6(CLIENT6, 46500, VIP6, 80, SYN);
    assert_eq!(xdp(&dp, &syn).1, syn.with_dst(HOST6.into(), 8001).bytes());
    let rst = v6(HOST6, 8001, CLIENT6, 46500, RST | ACK);
    assert_eq!(tc(&dp, &rst).0, TC_ACT_SHOT);
    assert!(dp.flow(&syn.key()).is_none());
    let config = config(SERVICES);
    assert_eq!(dp.current_states(&config.services)[2][0], Some(BackendState::Failed));
    assert_eq!(dp.passive(2, 0).unwrap().refused, 1);
    // The client's retransmission goes to the other backend, however loaded.
    assert_eq!(xdp(&dp, &syn).1, syn.with_dst(HOST6.into(), 8002).bytes());
}

#[test]
fn failures_older_than_fail_timeout_do_not_count() {
    let mut dp = setup_with(PASSIVE_CONFIG, 4096, &[]);
    // One failure 11 s ago (fail_timeout 10 s): a new one starts a fresh window.
    let p = dp.passive(0, 0).unwrap();
    dp.set_passive(0, 0, Passive { fails: 1, window_start_ns: monotonic_ns() - 11_000_000_000, ..p }).unwrap();
    set_live(&mut dp, 0, &[0, 4, 4]);
    xdp(&dp, &v4(CLIENT, 46100, VIP, 80, SYN));
    assert_eq!(tc(&dp, &v4(HOST, 8001, CLIENT, 46100, RST | ACK)).0, TC_ACT_SHOT);
    assert_eq!(dp.passive(0, 0).unwrap().fails, 1);
    assert_eq!(state(&dp, PASSIVE_CONFIG, 0, 0), BackendState::Up);
    // The same within the window: failed.
    dp.set_passive(0, 0, Passive { fails: 1, window_start_ns: monotonic_ns() - 9_000_000_000, ..p }).unwrap();
    xdp(&dp, &v4(CLIENT, 46101, VIP, 80, SYN));
    tc(&dp, &v4(HOST, 8001, CLIENT, 46101, RST | ACK));
    assert_eq!(state(&dp, PASSIVE_CONFIG, 0, 0), BackendState::Failed);
    // Only an up backend is failed: a draining one stays draining.
    dp.set_state(0, 1, BackendState::Draining).unwrap();
    dp.set_passive(0, 1, Passive { fails: 5, window_start_ns: monotonic_ns(), ..p }).unwrap();
    set_live(&mut dp, 0, &[0, 0, 4]);
    dp.set_state(0, 1, BackendState::Up).unwrap();
    xdp(&dp, &v4(CLIENT, 46102, VIP, 80, SYN));
    dp.set_state(0, 1, BackendState::Draining).unwrap();
    tc(&dp, &v4(HOST, 8002, CLIENT, 46102, RST | ACK));
    assert_eq!(state(&dp, PASSIVE_CONFIG, 0, 1), BackendState::Draining);
}

#[test]
fn max_fails_zero_turns_passive_health_off() {
    let mut dp = setup_with(PASSIVE_CONFIG, 4096, &[]);
    for port in 0..5 {
        set_live(&mut dp, 1, &[0, 4]);
        let syn = v4(CLIENT, 46200 + port, HOST, 80, SYN);
        assert_eq!(dport(&xdp(&dp, &syn).1), 8001);
        let rst = v4(HOST, 8001, CLIENT, 46200 + port, RST | ACK);
        assert_eq!(tc(&dp, &rst), (TC_ACT_OK, rst.with_src(HOST.into(), 80).bytes()), "the refusal reaches the client");
    }
    let p = dp.passive(1, 0).unwrap();
    assert_eq!((p.refused, p.fails), (5, 0), "counted in the total only");
    assert_eq!(state(&dp, PASSIVE_CONFIG, 1, 0), BackendState::Up);
    // A retransmitted SYN stays with its backend.
    let syn = v4(CLIENT, 46300, HOST, 80, SYN);
    set_live(&mut dp, 1, &[0, 4]);
    xdp(&dp, &syn);
    std::thread::sleep(std::time::Duration::from_millis(250));
    set_live(&mut dp, 1, &[9, 0]);
    assert_eq!(dport(&xdp(&dp, &syn).1), 8001);
}

#[test]
fn a_retransmitted_syn_to_a_silent_backend_is_balanced_again() {
    let mut dp = setup_with(PASSIVE_CONFIG, 4096, &[]);
    set_live(&mut dp, 0, &[0, 4, 5]);
    let syn = v4(CLIENT, 46400, VIP, 80, SYN);
    assert_eq!(dport(&xdp(&dp, &syn).1), 8001);
    // A duplicate within 200 ms is no retransmission: same backend, nothing counted.
    assert_eq!(xdp(&dp, &syn).1, syn.with_dst(HOST.into(), 8001).bytes());
    assert_eq!(dp.passive(0, 0).unwrap().unanswered, 0);
    assert_eq!(live(&dp, 0, 0), 1);
    std::thread::sleep(std::time::Duration::from_millis(250));
    // The client's retransmission: the backend never answered; the SYN goes to the next one.
    let (verdict, out) = xdp(&dp, &syn);
    assert_eq!((verdict, out), (XDP_PASS, syn.with_dst(HOST.into(), 8002).bytes()));
    let flow = dp.flow(&syn.key()).unwrap();
    assert_eq!((flow.backend, flow.closed, flow.handshake), (1, FLOW_OPEN, HANDSHAKE_SYN_SENT));
    assert_eq!((live(&dp, 0, 0), live(&dp, 0, 1)), (0, 5), "the count moved with the flow");
    let p = dp.passive(0, 0).unwrap();
    assert_eq!((p.unanswered, p.fails), (1, 1));
    assert_eq!(state(&dp, PASSIVE_CONFIG, 0, 0), BackendState::Up, "one failure of max_fails 2");
    // Replies come from the new backend as the VIP; the old one's are no longer rewritten.
    let syn_ack = v4(HOST, 8002, CLIENT, 46400, SYN | ACK);
    assert_eq!(tc(&dp, &syn_ack).1, syn_ack.with_src(VIP.into(), 80).bytes());
    let late = v4(HOST, 8001, CLIENT, 46400, SYN | ACK);
    assert_eq!(tc(&dp, &late).1, late.bytes());
    // Answered: a late duplicate SYN stays.
    std::thread::sleep(std::time::Duration::from_millis(250));
    assert_eq!(dport(&xdp(&dp, &syn).1), 8002);
    assert_eq!(dp.passive(0, 1).unwrap().unanswered, 0);

    // The only backend up: the retransmission goes to it again rather than nowhere.
    let dp = setup_with(PASSIVE_CONFIG, 4096, &[&[BackendState::Up, BackendState::Down, BackendState::Down]]);
    let syn = v4(CLIENT, 46401, VIP, 80, SYN);
    xdp(&dp, &syn);
    std::thread::sleep(std::time::Duration::from_millis(250));
    assert_eq!(xdp(&dp, &syn).1, syn.with_dst(HOST.into(), 8001).bytes());
    assert_eq!(live(&dp, 0, 0), 1);
}

#[test]
fn slow_start_ramps_a_recovered_backends_share_linearly() {
    let mut dp = setup_with(PASSIVE_CONFIG, 4096, &[]);
    const SLOW_START_NS: u64 = 100_000_000_000;
    assert_eq!(dp.passive(2, 0).unwrap().slow_start_ns, SLOW_START_NS);
    // app-1 came back up `elapsed` of its 100 s ago; app-2 is up all along. Every flow is reset
    // right away, so both stay idle and only the ramp decides. Without a ramp they alternate.
    let share = |dp: &mut Dataplane, elapsed_ns: u64, base: u16| -> f64 {
        let p = dp.passive(2, 0).unwrap();
        dp.set_passive(2, 0, Passive { up_since_ns: monotonic_ns() - elapsed_ns, ..p }).unwrap();
        let n = 1000u16;
        let mut to_app1 = 0;
        for i in 0..n {
            let syn = v4(CLIENT, base + i, VIP, 81, SYN);
            if dport(&xdp(dp, &syn).1) == 8001 {
                to_app1 += 1;
            }
            xdp(dp, &v4(CLIENT, base + i, VIP, 81, RST));
        }
        f64::from(to_app1) / f64::from(n)
    };
    // It takes part in a choice with probability p = elapsed / slow_start; alternating with an
    // idle peer that gives it p / (1 + p) of the flows.
    let mut shares = Vec::new();
    for (frac, base) in [(0.0, 10000), (0.25, 12000), (0.75, 14000), (2.0, 16000)] {
        let got = share(&mut dp, (frac * SLOW_START_NS as f64) as u64, base);
        let p: f64 = f64::min(frac, 1.0);
        let expected = p / (1.0 + p);
        println!("slow start at {:.0} % of the ramp: share {got:.3} (expected {expected:.3})", frac * 100.0);
        assert!((got - expected).abs() < 0.06, "share {got} at {frac} of the ramp, expected about {expected}");
        shares.push(got);
    }
    assert!(shares.windows(2).all(|w| w[0] < w[1]), "the share grows: {shares:?}");
    // Alone, a ramping backend still gets every flow.
    dp.set_state(2, 1, BackendState::Down).unwrap();
    let p = dp.passive(2, 0).unwrap();
    dp.set_passive(2, 0, Passive { up_since_ns: monotonic_ns(), ..p }).unwrap();
    for i in 0..20 {
        assert_eq!(dport(&xdp(&dp, &v4(CLIENT, 18000 + i, VIP, 81, SYN)).1), 8001);
    }
    // The daemon starts the ramp when a backend comes back up (only with slow_start set).
    let before = monotonic_ns();
    dp.restart_passive(Layout::positional_slot(2, 0), before).unwrap();
    assert_eq!(dp.passive(2, 0).unwrap().up_since_ns, before);
    dp.restart_passive(Layout::positional_slot(0, 0), before).unwrap();
    assert_eq!(dp.passive(0, 0).unwrap().up_since_ns, 0, "no ramp without slow_start");
}

// ---------------------------------------------------------------------------------------------
// Conntrack capacity.

#[test]
fn a_full_conntrack_passes_new_flows_and_keeps_existing_ones() {
    let dp = setup_with(SERVICES, 1024, &[]);
    for port in 0..1024u16 {
        let (verdict, _) = xdp(&dp, &v4(CLIENT, 10000 + port, VIP, 80, SYN));
        assert_eq!(verdict, XDP_PASS);
    }
    assert_eq!(counter(&dp, "new_flows"), 1024, "every flow up to capacity is tracked");
    assert_eq!(counter(&dp, "conntrack_full"), 0);
    let over = v4(CLIENT, 30000, VIP, 80, SYN);
    let (verdict, out) = xdp(&dp, &over);
    assert_eq!((verdict, out), (XDP_PASS, over.bytes()), "the flow past capacity passes unmodified");
    assert_eq!(counter(&dp, "conntrack_full"), 1);
    assert!(dp.flow(&over.key()).is_none());
    let total: i64 = (0..3).map(|b| live(&dp, 0, b)).sum();
    assert_eq!(total, 1024, "the untracked flow is not counted");
    for port in [0u16, 511, 1023] {
        let ack = v4(CLIENT, 10000 + port, VIP, 80, ACK);
        let (_, out) = xdp(&dp, &ack);
        assert_ne!(out, ack.bytes(), "existing flow {port} still rewritten");
        assert!(tcp_checksum_ok(&out));
    }
}

// ---------------------------------------------------------------------------------------------
// ICMP errors about replies of tracked flows.

#[test]
fn icmp_errors_about_replies_reach_the_backend() {
    let mut dp = setup(&[]);
    set_live(&mut dp, 0, &[0, 5, 5]);
    set_live(&mut dp, 1, &[5, 0, 5]);
    set_live(&mut dp, 2, &[0, 5]);
    // (flow's SYN, the reply as the client saw it, the same reply as the backend sent it)
    let cases = [
        (v4(CLIENT, 46000, VIP, 80, SYN), v4(VIP, 80, CLIENT, 46000, ACK | PSH), v4(HOST, 8001, CLIENT, 46000, ACK | PSH), IpAddr::from(ROUTER)),
        (v4(CLIENT, 46001, HOST, 80, SYN), v4(HOST, 80, CLIENT, 46001, ACK | PSH), v4(HOST, 8002, CLIENT, 46001, ACK | PSH), IpAddr::from(ROUTER)),
        (v6(CLIENT6, 46002, VIP6, 80, SYN), v6(VIP6, 80, CLIENT6, 46002, ACK | PSH), v6(HOST6, 8001, CLIENT6, 46002, ACK | PSH), IpAddr::from(CLIENT6)),
    ];
    for (syn, seen, sent, from) in cases {
        xdp(&dp, &syn);
        // A full quote (checksum included) and a minimal one (8 bytes of TCP).
        let ip_len = if seen.src.is_ipv4() { 20 } else { 40 };
        for quote in [ip_len + 20 + 18, ip_len + 8] {
            let before = counter(&dp, "icmp_errors");
            let err = icmp_error(from, seen.src, &seen.frame(), quote).bytes;
            let (verdict, out) = xdp_bytes(&dp, &err);
            assert_eq!(verdict, XDP_PASS);
            let expected = icmp_error(from, sent.src, &sent.frame(), quote).bytes;
            assert_eq!(out, expected, "ICMP error about {seen:?} (quote {quote}) names the backend's segment and goes to the backend");
            assert_eq!(counter(&dp, "icmp_errors"), before + 1);
        }
    }
    // Errors about anything else pass untouched and uncounted.
    let stranger = v4(HOST, 22, CLIENT, 46100, ACK);
    let err = icmp_error(ROUTER.into(), HOST.into(), &stranger.frame(), 48).bytes;
    let before = counter(&dp, "icmp_errors");
    assert_eq!(xdp_bytes(&dp, &err), (XDP_PASS, err.clone()));
    assert_eq!(counter(&dp, "icmp_errors"), before);
    let truncated = err[..14 + 20 + 8 + 10].to_vec();
    assert_eq!(xdp_bytes(&dp, &truncated), (XDP_PASS, truncated.clone()), "a quote too short to hold the ports");
}

/// The daemon reads conntrack in batches (`BPF_MAP_LOOKUP_BATCH`); every flow must come back,
/// joined with its forward entry, across several batches.
#[test]
fn the_daemon_reads_every_tracked_flow() {
    let dp = setup_with(SERVICES, 16384, &[]);
    const N: u16 = 10_000;
    for port in 0..N {
        xdp(&dp, &v4(CLIENT, 20000 + port, VIP, 80, SYN));
    }
    let flows = dp.flows().unwrap();
    assert_eq!(flows.len(), usize::from(N));
    let mut ports: Vec<u16> = flows
        .iter()
        .map(|(rev, nat, flow)| {
            let flow = flow.expect("every reply entry has its forward entry");
            assert_eq!((nat.vip_addr, u16::from_be(nat.vip_port)), (Addr::v4(VIP.octets()), 80));
            assert_eq!((rev.src_addr, rev.src_port), (flow.backend_addr, flow.backend_port));
            u16::from_be(rev.dst_port)
        })
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, (20000..20000 + N).collect::<Vec<_>>());
}

//! The programs loaded detached with a test configuration's services, and runs through them.

use lb_common::backend::BackendConns;
use xlb::{config::Config, dataplane::Dataplane, status::BackendState};

use super::{Pkt, XDP_DROP, XDP_PASS};

/// A test configuration, parsed.
pub fn config(text: &str) -> Config {
    Config::parse("packets.toml".as_ref(), text).expect("test config parses")
}

/// The programs loaded with conntrack for `max_flows` and the services of `config`, backend `b`
/// of service `s` in `state(s, b)`.
pub fn load(config: &Config, max_flows: u32, state: impl Fn(usize, usize) -> BackendState) -> Dataplane {
    assert!(nix::unistd::geteuid().is_root(), "packet tests load BPF programs: run them as root (`cargo xtask test`)");
    let mut dp = Dataplane::load_detached(max_flows).expect("programs load and pass the verifier");
    let states: Vec<Vec<BackendState>> =
        config.services.iter().enumerate().map(|(s, svc)| (0..svc.backends.len()).map(|b| state(s, b)).collect()).collect();
    dp.apply_services(&config.services, &states).expect("services written");
    dp
}

/// Presets the live connection counts of `service`'s backends.
pub fn set_live(dp: &mut Dataplane, service: usize, live: &[i64]) {
    for (b, &l) in live.iter().enumerate() {
        let c = dp.conns(service, b).unwrap();
        dp.set_conns(service, b, BackendConns { live: l, ..c }).unwrap();
    }
}

pub fn live(dp: &Dataplane, service: usize, backend: usize) -> i64 {
    dp.conns(service, backend).unwrap().live
}

pub fn counter(dp: &Dataplane, name: &str) -> u64 {
    dp.counters().unwrap()[name]
}

/// One run of the XDP program: verdict and output bytes.
pub fn xdp(dp: &Dataplane, p: &Pkt) -> (u32, Vec<u8>) {
    xdp_bytes(dp, &p.bytes())
}

pub fn xdp_bytes(dp: &Dataplane, bytes: &[u8]) -> (u32, Vec<u8>) {
    let out = dp.test_run_xdp(bytes, 1).expect("XDP test run");
    assert!(out.verdict == XDP_PASS || out.verdict == XDP_DROP, "verdict {} for {bytes:?}: never XDP_ABORTED", out.verdict);
    (out.verdict, out.data)
}

/// One run of the TC egress program: verdict and output bytes.
pub fn tc(dp: &Dataplane, p: &Pkt) -> (u32, Vec<u8>) {
    let out = dp.test_run_tc(&p.bytes(), 1).expect("TC test run");
    (out.verdict, out.data)
}

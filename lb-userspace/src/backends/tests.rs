//! The state machine driven through the in-memory maps: every transition, every source, each
//! alert exactly once, and a drain that survives a restart.

use std::{path::Path, sync::Arc, time::Duration};

use lb_common::backend::Passive;

use super::{
    maps::fake::{FakeMaps, Recorded},
    *,
};
use crate::health::ProbeResult;

const A: &str = "127.0.0.1:8001";
const B: &str = "127.0.0.1:8002";

fn config(mode: &str, max_fails: u32) -> Config {
    let https = if mode == "https" {
        "[service.tls]\ncert = \"/etc/xlb/cert.pem\"\nkey = \"/etc/xlb/key.pem\"\n"
    } else {
        ""
    };
    let text = format!(
        "[dataplane]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:443\"\nmode = \"{mode}\"\n\
         backends = [\"{A}\", \"{B}\"]\nmax_fails = {max_fails}\nfail_timeout = \"10s\"\n{https}"
    );
    Config::parse(Path::new("/etc/xlb/xlb.toml"), &text).unwrap()
}

struct World {
    backends: Backends,
    maps: FakeMaps,
    alerts: Arc<Recorded>,
    layout: Layout,
}

/// A first start: every backend up in the maps, as `open_dataplane` writes them.
fn start(config: &Config) -> World {
    start_from(config, FakeMaps::default(), &[BackendState::Up, BackendState::Up])
}

fn start_from(config: &Config, mut maps: FakeMaps, states: &[BackendState]) -> World {
    let layout = Layout::positional(&config.services);
    for (b, &st) in states.iter().enumerate() {
        maps.states.insert(layout.slot(0, b), st);
        maps.passive.insert(layout.slot(0, b), Passive { max_fails: config.services[0].max_fails, fail_timeout_ns: 10_000_000_000, ..Passive::default() });
    }
    let alerts = Arc::new(Recorded::default());
    let backends = Backends::adopt(config, &layout, &[states.to_vec()], alerts.clone());
    maps.writes.clear();
    World { backends, maps, alerts, layout }
}

impl World {
    fn health(&mut self, b: usize, up: bool) {
        let generation = self.backends.generation();
        self.backends.apply(&mut self.maps, Event::Health { generation, service: 0, backend: b, up }).unwrap();
    }
    fn drain(&mut self, b: usize, drained: bool) -> Drained {
        self.backends.apply(&mut self.maps, Event::Drain { service: 0, backend: b, drained }).unwrap().unwrap()
    }
    fn proxy_failed(&mut self, b: usize, now_ns: u64) {
        self.backends.apply(&mut self.maps, Event::ProxyFailed { generation: self.backends.generation(), service: 0, backend: b, now_ns }).unwrap();
    }
    fn state(&self, b: usize) -> BackendState {
        self.backends.get(0, b).unwrap().0
    }
    fn map_state(&self, b: usize) -> BackendState {
        self.maps.states[&self.layout.slot(0, b)]
    }
}

#[test]
fn probes_take_a_backend_down_and_back_up_with_one_write_and_one_alert_each() {
    let mut w = start(&config("l4", 1));
    w.health(0, false);
    assert_eq!((w.state(0), w.map_state(0)), (BackendState::Down, BackendState::Down));
    assert_eq!(w.alerts.take(), ["down web 127.0.0.1:8001"]);
    w.health(0, true);
    assert_eq!((w.state(0), w.map_state(0)), (BackendState::Up, BackendState::Up));
    assert_eq!(w.alerts.take(), ["up web 127.0.0.1:8001"]);
    assert_eq!(w.maps.writes, [(0, BackendState::Down), (0, BackendState::Up)]);
}

#[test]
fn a_service_alert_is_raised_once_when_its_last_backend_goes_and_once_when_one_returns() {
    let mut w = start(&config("l4", 1));
    w.health(0, false);
    w.health(1, false);
    assert_eq!(w.alerts.take(), ["down web 127.0.0.1:8001", "down web 127.0.0.1:8002", "service down web"]);
    // A second verdict that changes nothing, and a drain of a down backend: no alert again.
    w.health(1, false);
    w.drain(1, true);
    assert_eq!(w.alerts.take(), Vec::<String>::new());
    w.health(0, true);
    assert_eq!(w.alerts.take(), ["up web 127.0.0.1:8001", "service up web"]);
}

#[test]
fn a_drained_backend_stays_drained_whatever_its_health_and_undrain_restores_health() {
    let mut w = start(&config("l4", 1));
    let d = w.drain(0, true);
    assert_eq!(d, Drained { changed: true, state: BackendState::Draining, healthy: None });
    w.health(0, false);
    assert_eq!((w.state(0), w.map_state(0)), (BackendState::Draining, BackendState::Draining));
    // An operator works on a drained backend: its failing checks raise no alert.
    assert_eq!(w.alerts.take(), Vec::<String>::new());
    let d = w.drain(0, false);
    assert_eq!(d.state, BackendState::Down);
    assert_eq!(w.map_state(0), BackendState::Down);
    assert_eq!(w.alerts.take(), ["down web 127.0.0.1:8001"]);
    // Draining again changes nothing in health; the repeated request is written (it repairs a
    // map that says otherwise) but reports no change.
    assert!(w.drain(0, true).changed);
    assert!(!w.drain(0, true).changed);
}

#[test]
fn a_drain_survives_a_restart() {
    let mut w = start(&config("l4", 1));
    w.drain(1, true);
    let maps = std::mem::take(&mut w.maps);
    let states: Vec<BackendState> = (0..2).map(|b| maps.states[&w.layout.slot(0, b)]).collect();
    assert_eq!(states, [BackendState::Up, BackendState::Draining]);
    let mut again = start_from(&config("l4", 1), maps, &states);
    assert_eq!(again.state(1), BackendState::Draining);
    assert_eq!(again.backends.initial_up(), [[true, true]]);
    // Health after the restart does not undrain it.
    again.health(1, true);
    assert_eq!(again.map_state(1), BackendState::Draining);
}

#[test]
fn what_is_down_at_start_was_reported_before_and_only_its_recovery_is_news() {
    let mut w = start_from(&config("l4", 1), FakeMaps::default(), &[BackendState::Down, BackendState::Failed]);
    let known: Vec<String> = w.alerts.0.lock().unwrap().iter().filter(|(_, k)| *k).map(|(e, _)| maps::fake::describe(e)).collect();
    assert_eq!(known, ["down web 127.0.0.1:8001", "down web 127.0.0.1:8002", "service down web"]);
    assert_eq!(w.alerts.take(), Vec::<String>::new());
    // Both must pass `rise` probes: their probers start down.
    assert_eq!(w.backends.initial_up(), [[false, false]]);
    w.health(1, true);
    assert_eq!(w.alerts.take(), ["up web 127.0.0.1:8002", "service up web"]);
}

#[test]
fn the_data_path_failing_a_backend_is_taken_note_of_once_without_a_second_write() {
    let mut w = start(&config("l4", 2));
    // What lb-ebpf/src/passive.rs does past max_fails.
    w.maps.states.insert(w.layout.slot(0, 0), BackendState::Failed);
    w.backends.poll_data_path(&mut w.maps).unwrap();
    assert_eq!(w.state(0), BackendState::Failed);
    assert!(w.maps.writes.is_empty(), "the data path wrote it already");
    assert_eq!(w.alerts.take(), ["down web 127.0.0.1:8001"]);
    assert_eq!(w.backends.initial_up(), [[false, true]]);
    w.backends.poll_data_path(&mut w.maps).unwrap();
    assert_eq!(w.alerts.take(), Vec::<String>::new());
    // Back once the probes pass: the failure window is emptied before it is written up.
    w.maps.passive.get_mut(&0).unwrap().fails = 2;
    w.health(0, true);
    assert_eq!((w.state(0), w.map_state(0)), (BackendState::Up, BackendState::Up));
    assert_eq!(w.maps.passive[&0].fails, 0);
    assert_eq!(w.alerts.take(), ["up web 127.0.0.1:8001"]);
}

#[test]
fn a_drain_that_raced_the_data_paths_failure_is_written_back() {
    let mut w = start(&config("l4", 2));
    w.drain(0, true);
    w.maps.writes.clear();
    w.maps.states.insert(w.layout.slot(0, 0), BackendState::Failed);
    w.backends.poll_data_path(&mut w.maps).unwrap();
    assert_eq!(w.maps.writes, [(0, BackendState::Draining)]);
    assert_eq!(w.state(0), BackendState::Draining);
    assert_eq!(w.alerts.take(), Vec::<String>::new());
}

#[test]
fn proxy_failures_count_in_the_data_paths_passive_record_and_fail_the_backend_at_max_fails() {
    let mut w = start(&config("https", 3));
    let view = w.backends.view();
    assert!(view.usable(0, 0));
    let s = 1_000_000_000;
    w.proxy_failed(0, 100 * s);
    w.proxy_failed(0, 101 * s);
    assert_eq!(w.maps.passive[&0].fails, 2);
    assert_eq!(w.state(0), BackendState::Up);
    // Older than fail_timeout (10 s): a new window.
    w.proxy_failed(0, 120 * s);
    assert_eq!((w.maps.passive[&0].fails, w.maps.passive[&0].window_start_ns), (1, 120 * s));
    w.proxy_failed(0, 121 * s);
    w.proxy_failed(0, 122 * s);
    assert_eq!((w.state(0), w.map_state(0)), (BackendState::Failed, BackendState::Failed));
    assert!(!view.usable(0, 0));
    assert!(view.usable(0, 1));
    assert_eq!(w.alerts.take(), ["down web 127.0.0.1:8001"]);
    // Further failures change nothing.
    w.proxy_failed(0, 123 * s);
    assert_eq!(w.alerts.take(), Vec::<String>::new());
    w.health(0, true);
    assert!(view.usable(0, 0));
}

#[test]
fn proxy_failures_are_ignored_with_max_fails_zero() {
    let mut w = start(&config("https", 0));
    for i in 1..10 {
        w.proxy_failed(0, i);
    }
    assert_eq!(w.state(0), BackendState::Up);
    assert_eq!(w.maps.passive[&0].fails, 0);
}

#[test]
fn the_proxys_view_follows_every_source() {
    let mut w = start(&config("https", 1));
    let view = w.backends.view();
    w.health(1, false);
    assert!(!view.usable(0, 1));
    w.health(1, true);
    w.drain(1, true);
    assert!(!view.usable(0, 1));
    w.drain(1, false);
    assert!(view.usable(0, 1));
}

#[test]
fn a_failed_map_write_changes_neither_the_view_nor_the_alerts() {
    let mut w = start(&config("https", 1));
    let view = w.backends.view();
    w.maps.broken = true;
    let drained = w.backends.apply(&mut w.maps, Event::Drain { service: 0, backend: 0, drained: true });
    assert!(drained.is_err());
    assert_eq!(w.state(0), BackendState::Up);
    assert!(view.usable(0, 0));
    assert_eq!(w.alerts.take(), Vec::<String>::new());
}

#[test]
fn reports_of_an_earlier_config_are_dropped() {
    let config = config("l4", 1);
    let mut w = start(&config);
    let next = w.backends.replan(&config, &w.layout);
    let old_generation = w.backends.generation();
    w.backends = next;
    w.backends.apply(&mut w.maps, Event::Health { generation: old_generation, service: 0, backend: 0, up: false }).unwrap();
    let result = ProbeResult { service: 0, backend: 0, ok: false, latency: Duration::from_millis(1), error: Some("refused".into()) };
    w.backends.probed(old_generation, result.clone());
    assert_eq!(w.state(0), BackendState::Up);
    assert_eq!(w.backends.get(0, 0).unwrap().2.count, 0);
    w.backends.probed(w.backends.generation(), result);
    assert_eq!(w.backends.get(0, 0).unwrap().2, &Probe { healthy: Some(false), latency_ms: Some(1.0), error: Some("refused".into()), count: 1, passed_in_a_row: 0 });
}

#[test]
fn a_reload_carries_over_what_surviving_backends_were_and_starts_new_ones_up() {
    let mut w = start(&config("l4", 1));
    w.drain(0, true);
    w.health(1, false);
    w.alerts.take();
    let text = "[dataplane]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:443\"\n\
                backends = [\"127.0.0.1:8003\", \"127.0.0.1:8002\", \"127.0.0.1:8001\"]\n";
    let new = Config::parse(Path::new("/etc/xlb/xlb.toml"), text).unwrap();
    let layout = Layout::positional(&new.services);
    let mut next = w.backends.replan(&new, &layout);
    assert_eq!(next.states(), [[BackendState::Up, BackendState::Down, BackendState::Draining]]);
    assert_eq!(next.initial_up(), [[true, false, true]]);
    // The service has an up backend again (the new one): its recovery is due now.
    next.settle_alerts();
    assert_eq!(w.alerts.take(), ["service up web"]);
    // The surviving down backend's alert state came along: its recovery is news, once.
    let generation = next.generation();
    next.apply(&mut w.maps, Event::Health { generation, service: 0, backend: 1, up: true }).unwrap();
    assert_eq!(w.alerts.take(), ["up web 127.0.0.1:8002"]);
}

#[test]
fn record_failure_follows_the_data_paths_window_rule() {
    let mut p = Passive { max_fails: 2, fail_timeout_ns: 10, ..Passive::default() };
    assert!(!record_failure(&mut p, 100));
    assert!(record_failure(&mut p, 105));
    assert!(!record_failure(&mut p, 200), "a failure past fail_timeout opens a new window");
    assert_eq!((p.fails, p.window_start_ns), (1, 200));
    let mut off = Passive::default();
    assert!(!record_failure(&mut off, 1));
    assert_eq!(off, Passive::default());
}

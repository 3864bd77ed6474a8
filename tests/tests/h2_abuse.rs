//! HTTP/2 abuse against the HTTPS proxy (RELIABILITY.md R14: "bounded CPU, GOAWAY"), one test
//! per attack, each in a site of its own with the three demo backends: rapid reset,
//! CONTINUATION flood, stream exhaustion (and streams held idle), flow-control window
//! exhaustion, SETTINGS and PING floods. In each, a probe client on other connections keeps
//! making ordinary requests and must get ≥ 99.9 % of them answered; the attacking connection
//! must be closed by the daemon within a bound measured here; and the daemon's CPU time
//! during the attack and its resident memory stay under bounds. Each prints what it measured.
//!
//! The CPU bounds are several times what a run on an idle 2-CPU machine measures, for runs on
//! a shared, loaded one: they catch an attack that costs without bound (a loop per frame that
//! never ends, a queue that grows), not a slower machine.
//!
//! Run as root: `cargo xtask test -- -p xlb-tests --test h2_abuse -- --nocapture`.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use xlb_tests::{
    h2raw::{self, Event, H2, code, flag, kind, setting},
    *,
};

/// Every attack stops by itself after this, closed or not.
const ATTACK_LIMIT: Duration = Duration::from_secs(20);
/// The probe client's pace: 50 requests a second.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// What the probe client must get answered.
const PROBE_SUCCESS_PERCENT: f64 = 99.9;

/// How an attack ended.
struct Attack {
    /// From the first attacking byte to the server's GOAWAY, if it sent one.
    goaway_after: Option<Duration>,
    goaway: Option<String>,
    /// From the first attacking byte to the connection's end (EOF, reset, or a write that
    /// failed), if it ended within `ATTACK_LIMIT`.
    closed_after: Option<Duration>,
    /// What was sent, for the report.
    sent: String,
    /// Rounds `flood` wrote before the GOAWAY came back.
    rounds: u64,
    /// Other frames the server sent, by kind, for the report and the checks.
    frames: Vec<(u8, Option<u32>)>,
    /// The statuses of the responses it sent.
    statuses: Vec<u16>,
}

impl Attack {
    fn count(&self, kind: u8, code: Option<u32>) -> usize {
        self.frames.iter().filter(|(k, c)| *k == kind && (code.is_none() || *c == code)).count()
    }

    fn closed_within(&self, bound: Duration, what: &str) -> Duration {
        let closed = self.closed_after.unwrap_or_else(|| panic!("{what}: the attacking connection was still open after {ATTACK_LIMIT:?} ({})", self.sent));
        assert!(closed <= bound, "{what}: the attacking connection was closed only after {closed:?}, more than {bound:?}");
        closed
    }
}

/// What the daemon spent while an attack ran.
struct Cost {
    /// CPU time over the attack, the probe client's requests included.
    cpu: Duration,
    /// What the probe client alone cost in a second just before.
    probe_cpu_per_second: Duration,
    rss_before_kib: u64,
    rss_peak_kib: u64,
}

/// Runs `attack` with the probe client going on other connections from before it starts to
/// after it ends; measures the daemon's CPU time over the attack and its peak RSS.
fn under_attack(site: &Site, attack: impl FnOnce() -> Attack) -> (Attack, Cost, ProbeResult) {
    let daemon = site.lb.daemon();
    let probe = Probe::default();
    let sampling = AtomicBool::new(true);
    let rss_peak = AtomicU64::new(0);
    let (attack, cost) = std::thread::scope(|scope| {
        let _stop = probe.stop_on_drop();
        scope.spawn(|| probe.run(site, PROBE_INTERVAL));
        let (sampling, rss_peak) = (&sampling, &rss_peak);
        scope.spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                rss_peak.fetch_max(daemon.rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        // The probe's own connections are up before the attack starts, and what it costs
        // alone is measured for the report.
        std::thread::sleep(Duration::from_millis(500));
        let cpu_quiet = daemon.cpu_time();
        std::thread::sleep(Duration::from_secs(1));
        let rss_before_kib = daemon.rss_kib();
        let cpu_before = daemon.cpu_time();
        let probe_cpu_per_second = cpu_before - cpu_quiet;
        let attack = attack();
        let cpu = daemon.cpu_time() - cpu_before;
        // And it keeps being served after.
        std::thread::sleep(Duration::from_millis(500));
        sampling.store(false, Ordering::Relaxed);
        (attack, Cost { cpu, probe_cpu_per_second, rss_before_kib, rss_peak_kib: 0 })
    });
    let cost = Cost { rss_peak_kib: rss_peak.into_inner(), ..cost };
    (attack, cost, probe.result())
}

/// Writes `round(i)` for i = 0, 1, … every `pace` (zero: back to back) and reads whatever the
/// server sends meanwhile, until the server closes the connection or `ATTACK_LIMIT` passes.
fn flood(conn: &mut H2, pace: Duration, sent: impl Fn(u64) -> String, mut round: impl FnMut(u64) -> Vec<u8>) -> Attack {
    let started = Instant::now();
    let mut attack = Attack { goaway_after: None, goaway: None, closed_after: None, sent: String::new(), rounds: 0, frames: Vec::new(), statuses: Vec::new() };
    let mut rounds = 0u64;
    while started.elapsed() < ATTACK_LIMIT {
        let next = Instant::now() + pace;
        if attack.goaway.is_none() {
            let bytes = round(rounds);
            conn.send(&bytes);
            rounds += 1;
        }
        if conn.write_error.is_some() {
            attack.closed_after = Some(started.elapsed());
            break;
        }
        if drain(conn, &mut attack, started, next, false) {
            break;
        }
    }
    attack.sent = sent(rounds);
    attack.rounds = rounds;
    attack
}

/// Writes `round` (whole frames of `frame_len` bytes) over and over without reading anything,
/// until a write fails (the server closed the connection) or `ATTACK_LIMIT` passes. A server
/// that stops reading stalls the writes; they are retried from where they stopped, so the
/// frames stay whole.
fn flood_unread(conn: &mut H2, round: &[u8], frame_len: usize, what: &str) -> Attack {
    conn.set_write_timeout(Duration::from_millis(100));
    let started = Instant::now();
    let mut attack = Attack { goaway_after: None, goaway: None, closed_after: None, sent: String::new(), rounds: 0, frames: Vec::new(), statuses: Vec::new() };
    let (mut sent, mut at, mut stalled_since) = (0usize, 0usize, None::<Instant>);
    while started.elapsed() < ATTACK_LIMIT {
        match conn.send_some(&round[at..]) {
            Ok(n) => {
                sent += n;
                at = (at + n) % round.len();
                if n == 0 {
                    stalled_since.get_or_insert_with(Instant::now);
                } else {
                    stalled_since = None;
                }
            }
            Err(_) => {
                attack.closed_after = Some(started.elapsed());
                break;
            }
        }
    }
    let stalled = stalled_since.map_or(String::new(), |t| format!(", the server taking nothing for the last {} ms", t.elapsed().as_millis()));
    attack.sent = format!("{} {what} frames without reading a byte{stalled}", sent / frame_len);
    attack
}

/// Reads what the server sent until `until`, acknowledging its PINGs when `polite`; true once
/// the connection has ended.
fn drain(conn: &mut H2, attack: &mut Attack, started: Instant, until: Instant, polite: bool) -> bool {
    loop {
        match conn.event_within(until.saturating_duration_since(Instant::now())) {
            Event::Frame(f) => {
                if polite && f.kind == kind::PING && !f.has(flag::ACK) {
                    conn.ping(true, f.payload.clone().try_into().unwrap_or_default());
                }
                if f.kind == kind::GOAWAY && attack.goaway.is_none() {
                    attack.goaway_after = Some(started.elapsed());
                    attack.goaway = Some(f.to_string());
                }
                attack.frames.push((f.kind, f.error_code()));
                attack.statuses.extend(f.status());
            }
            Event::Closed => {
                attack.closed_after = Some(started.elapsed());
                return true;
            }
            Event::Timeout => return false,
        }
        if Instant::now() >= until {
            return false;
        }
    }
}

/// Opens `count` streams at once with `block` as their HEADERS (`flags`), then holds on.
fn open_and_hold(conn: &mut H2, count: u32, block: &[u8], flags: u8, what: &str) -> Attack {
    let started = Instant::now();
    let mut bytes = Vec::new();
    for i in 0..count {
        bytes.extend(h2raw::frame_bytes(kind::HEADERS, flags, 1 + 2 * i, block));
    }
    conn.send(&bytes);
    let mut attack = Attack { goaway_after: None, goaway: None, closed_after: None, sent: format!("{count} {what}"), rounds: 0, frames: Vec::new(), statuses: Vec::new() };
    hold(conn, &mut attack, started);
    attack
}

/// Reads (and acknowledges PINGs) until the connection ends or `ATTACK_LIMIT` passes: an
/// attacker that only holds on.
fn hold(conn: &mut H2, attack: &mut Attack, started: Instant) {
    let until = started + ATTACK_LIMIT;
    while Instant::now() < until && attack.closed_after.is_none() {
        drain(conn, attack, started, until.min(Instant::now() + Duration::from_millis(100)), true);
    }
}

fn report(what: &str, attack: &Attack, cost: &Cost, probe: &ProbeResult) {
    let ms = |d: Option<Duration>| d.map_or("never".to_string(), |d| format!("{} ms", d.as_millis()));
    println!(
        "{what}: sent {}; GOAWAY after {} ({}); closed after {}; daemon CPU {} ms during the attack (the probe client alone: {} ms/s); RSS {} → peak {} KiB; probe {}/{} answered ({:.2} %)",
        attack.sent,
        ms(attack.goaway_after),
        attack.goaway.as_deref().unwrap_or("none"),
        ms(attack.closed_after),
        cost.cpu.as_millis(),
        cost.probe_cpu_per_second.as_millis(),
        cost.rss_before_kib,
        cost.rss_peak_kib,
        probe.ok,
        probe.total(),
        probe.success_percent(),
    );
}

fn assert_cost(what: &str, cost: &Cost, cpu: Duration, rss_growth_kib: u64) {
    assert!(cost.cpu <= cpu, "{what}: the daemon used {:?} of CPU during the attack, more than {cpu:?}", cost.cpu);
    let grew = cost.rss_peak_kib.saturating_sub(cost.rss_before_kib);
    assert!(grew <= rss_growth_kib, "{what}: the daemon's RSS grew by {grew} KiB ({} → {}), more than {rss_growth_kib} KiB", cost.rss_before_kib, cost.rss_peak_kib);
}

/// What an attack must stay within.
struct Bounds {
    /// From the first attacking byte to the connection's end.
    closed: Duration,
    /// The daemon's CPU time over the attack, the probe client's included.
    cpu: Duration,
    /// The daemon's RSS above what it was before.
    rss_growth_kib: u64,
}

/// Reports the attack and checks it against `bounds`; the probe client must have been
/// answered throughout.
fn judge(what: &str, attack: &Attack, cost: &Cost, probe: &ProbeResult, bounds: Bounds) {
    report(what, attack, cost, probe);
    attack.closed_within(bounds.closed, what);
    assert_cost(what, cost, bounds.cpu, bounds.rss_growth_kib);
    probe.assert_success(PROBE_SUCCESS_PERCENT, 50, what);
}

fn get_block() -> Vec<u8> {
    h2raw::encode(&h2raw::request_fields("GET", "/", SITE))
}

fn attacker(site: &Site) -> H2 {
    let mut conn = site.raw_h2(Duration::from_secs(5));
    conn.handshake().unwrap_or_else(|e| panic!("the attacking connection's HTTP/2 handshake: {e}"));
    conn
}

/// The HTTPS service's requests in flight to its backends, once they are back to 0 (within
/// `within`): the attacker's streams let go of their backend connections.
fn backends_released(site: &Site, within: Duration, what: &str) {
    site.lb.poll(within, &format!("{what}: the requests in flight to the backends back to 0"), |lb| {
        let status = lb.status();
        let live: u64 = status["services"][1]["backends"].as_array().unwrap().iter().map(|b| b["live_connections"].as_u64().unwrap_or(0)).sum();
        (live == 0).then_some(()).ok_or_else(|| format!("{live} in flight"))
    });
}

fn goaway_code(attack: &Attack) -> Option<u32> {
    attack.frames.iter().find(|(k, _)| *k == kind::GOAWAY).and_then(|(_, c)| *c)
}

/// Rapid reset (CVE-2023-44487): HEADERS and RST_STREAM pairs, a hundred at a time, ten
/// thousand a second. The streams are reset before they are served; past
/// `max_pending_accept_reset_streams` (20) the connection gets GOAWAY ENHANCE_YOUR_CALM.
#[test]
fn rapid_reset_is_cut_off() {
    xlb_tests::root_or_skip!();
    let what = "rapid reset";
    let site = Site::start("h2-reset");
    let mut conn = attacker(&site);
    let block = get_block();
    let (attack, cost, probe) = under_attack(&site, || {
        flood(&mut conn, Duration::from_millis(10), |r| format!("{} HEADERS+RST_STREAM pairs", r * 100), |r| {
            let mut bytes = Vec::new();
            for i in 0..100 {
                let stream = 1 + 2 * (r * 100 + i) as u32;
                bytes.extend(h2raw::frame_bytes(kind::HEADERS, flag::END_HEADERS | flag::END_STREAM, stream, &block));
                bytes.extend(h2raw::frame_bytes(kind::RST_STREAM, 0, stream, &code::CANCEL.to_be_bytes()));
            }
            bytes
        })
    });
    judge(what, &attack, &cost, &probe, Bounds { closed: Duration::from_secs(1), cpu: Duration::from_millis(500), rss_growth_kib: 8 << 10 });
    assert_eq!(goaway_code(&attack), Some(code::ENHANCE_YOUR_CALM), "{what}: {:?}", attack.goaway);
    site.lb.finish();
}

/// Rapid reset one pair at a time, a thousand a second at most: each stream is accepted (and
/// its request sent to a backend) before its reset arrives, which the pending-accept bound
/// does not see. The proxy counts the requests reset before their response: past
/// `RESET_LIMIT` (100) within 10 s, GOAWAY and a close.
#[test]
fn paced_rapid_reset_is_cut_off() {
    xlb_tests::root_or_skip!();
    let what = "paced rapid reset";
    let site = Site::start("h2-reset2");
    let mut conn = attacker(&site);
    let block = get_block();
    let (attack, cost, probe) = under_attack(&site, || {
        flood(&mut conn, Duration::from_millis(1), |r| format!("{r} HEADERS+RST_STREAM pairs, one per write"), |r| {
            let stream = 1 + 2 * r as u32;
            let mut bytes = h2raw::frame_bytes(kind::HEADERS, flag::END_HEADERS | flag::END_STREAM, stream, &block);
            bytes.extend(h2raw::frame_bytes(kind::RST_STREAM, 0, stream, &code::CANCEL.to_be_bytes()));
            bytes
        })
    });
    let goaway = attack.goaway_after.unwrap_or(ATTACK_LIMIT);
    // The GOAWAY, then at most the lingering close's 2 s for what is in flight.
    judge(what, &attack, &cost, &probe, Bounds { closed: goaway + Duration::from_secs(3), cpu: Duration::from_secs(2), rss_growth_kib: 8 << 10 });
    assert!(goaway <= Duration::from_secs(5), "{what}: GOAWAY only after {goaway:?}");
    backends_released(&site, Duration::from_secs(3), what);
    site.lb.finish();
}

/// CONTINUATION flood (CVE-2024-27316 class): a HEADERS without END_HEADERS, then
/// CONTINUATION frames without end, one a millisecond so that what was sent before the GOAWAY
/// came back tells where the server cut: full of header fields (cut when the header list
/// passes `max_header_bytes`, 16 KiB here: COMPRESSION_ERROR), and empty (cut at h2's count of
/// CONTINUATION frames for that list size: ENHANCE_YOUR_CALM).
#[test]
fn continuation_flood_is_cut_at_the_header_list_limit() {
    xlb_tests::root_or_skip!();
    let site = Site::start("h2-cont");
    let block = get_block();
    let mut field = Vec::new();
    h2raw::literal(&mut field, b"x-flood", &[b'a'; 1000]);
    let full: Vec<u8> = field.iter().copied().cycle().take(h2raw::DEFAULT_MAX_FRAME_SIZE).collect();
    let frames_to_limit = (MAX_HEADER_BYTES as usize).div_ceil(h2raw::DEFAULT_MAX_FRAME_SIZE);
    for (what, fragment, expected) in [
        ("CONTINUATION flood, 16 KiB frames", &full[..], code::COMPRESSION_ERROR),
        ("CONTINUATION flood, empty frames", &[][..], code::ENHANCE_YOUR_CALM),
    ] {
        let mut conn = attacker(&site);
        let (attack, cost, probe) = under_attack(&site, || {
            flood(&mut conn, Duration::from_millis(1), |r| format!("HEADERS and {} CONTINUATION frames", r.saturating_sub(1)), |r| {
                if r == 0 {
                    h2raw::frame_bytes(kind::HEADERS, flag::END_STREAM, 1, &block)
                } else {
                    h2raw::frame_bytes(kind::CONTINUATION, 0, 1, fragment)
                }
            })
        });
        judge(what, &attack, &cost, &probe, Bounds { closed: Duration::from_secs(1), cpu: Duration::from_millis(500), rss_growth_kib: 8 << 10 });
        assert_eq!(goaway_code(&attack), Some(expected), "{what}: {:?}", attack.goaway);
        // Frames written before the GOAWAY was read: the server's cut (16 KiB of fields, or
        // h2's five empty frames), plus those in flight meanwhile.
        let sent = attack.rounds.saturating_sub(1) as usize;
        assert!(sent <= frames_to_limit + 5 + 20, "{what}: {sent} CONTINUATION frames went out before the GOAWAY came back");
    }
    site.lb.finish();
}

/// Stream exhaustion: far more streams than SETTINGS_MAX_CONCURRENT_STREAMS at once, none
/// finished (POST heads whose bodies never come). Those past the limit are refused
/// (RST_STREAM REFUSED_STREAM); past `max_local_error_reset_streams` (1024) refusals the
/// connection gets GOAWAY ENHANCE_YOUR_CALM.
#[test]
fn too_many_streams_are_refused() {
    xlb_tests::root_or_skip!();
    let what = "too many streams";
    let site = Site::start("h2-streams");
    let mut conn = attacker(&site);
    let max = conn.server_settings[&setting::MAX_CONCURRENT_STREAMS];
    let post = h2raw::encode(&h2raw::request_fields("POST", "/echo", SITE));
    let opened = max + 2000;
    let (attack, cost, probe) = under_attack(&site, || open_and_hold(&mut conn, opened, &post, flag::END_HEADERS, "POST heads without bodies"));
    judge(what, &attack, &cost, &probe, Bounds { closed: Duration::from_secs(1), cpu: Duration::from_millis(500), rss_growth_kib: 8 << 10 });
    let refused = attack.count(kind::RST_STREAM, Some(code::REFUSED_STREAM));
    println!("{what}: {refused} RST_STREAM REFUSED_STREAM");
    assert!(refused >= 1000, "{what}: only {refused} streams refused of {opened} over a limit of {max}");
    assert_eq!(goaway_code(&attack), Some(code::ENHANCE_YOUR_CALM), "{what}: {:?}", attack.goaway);
    backends_released(&site, Duration::from_secs(3), what);
    site.lb.finish();
}

/// Streams held open: as many POST heads as SETTINGS_MAX_CONCURRENT_STREAMS allows, whose
/// bodies never come, on a connection that otherwise behaves (it answers PINGs). A body of
/// unknown length is read whole before a backend is chosen (`request_buffer_bytes`), so each
/// stream is answered `408` after the request-header timeout without having reached a
/// backend, and the connection, then idle, is closed after the idle timeout (checked every
/// second at most) and the 2 s given to what is in flight. Passive health
/// is on (`max_fails = 1`): the client's stall is not blamed on any backend.
#[test]
fn held_streams_are_timed_out() {
    xlb_tests::root_or_skip!();
    let what = "held streams";
    let site = Site::start("h2-held");
    let mut conn = attacker(&site);
    let max = conn.server_settings[&setting::MAX_CONCURRENT_STREAMS];
    let post = h2raw::encode(&h2raw::request_fields("POST", "/echo", SITE));
    let (attack, cost, probe) = under_attack(&site, || open_and_hold(&mut conn, max, &post, flag::END_HEADERS, "POST heads without bodies"));
    judge(what, &attack, &cost, &probe, Bounds { closed: HEADER_TIMEOUT + IDLE_TIMEOUT + Duration::from_secs(4), cpu: Duration::from_secs(6), rss_growth_kib: 16 << 10 });
    let timed_out = attack.statuses.iter().filter(|&&s| s == 408).count();
    println!("{what}: {} streams answered, {timed_out} of them 408, before the close", attack.statuses.len());
    assert_eq!((attack.statuses.len(), timed_out), (max as usize, max as usize), "{what}: every held stream gets its 408: {:?}", attack.statuses);
    assert_eq!(attack.count(kind::RST_STREAM, Some(code::REFUSED_STREAM)), 0, "{what}: streams within the limit were refused");
    backends_released(&site, Duration::from_secs(3), what);
    let states: Vec<String> = site.lb.status()["services"][1]["backends"].as_array().unwrap().iter().map(|b| b["state"].as_str().unwrap_or("?").to_owned()).collect();
    assert!(states.iter().all(|s| s == "up"), "{what}: a backend was marked down for the client's stall: {states:?}");
    site.lb.finish();
}

/// Flow-control window exhaustion: a client that opens no window (SETTINGS_INITIAL_WINDOW_SIZE
/// 0) asks for a 1 MiB response on every stream it may open, and otherwise behaves (it reads
/// and answers PINGs). Nothing of those 128 MiB is buffered in the proxy beyond a chunk per
/// stream (the backends are left waiting to write); the responses that the client takes
/// nothing of for the idle timeout end the connection, and with it the backend connections.
#[test]
fn zero_window_clients_are_closed() {
    xlb_tests::root_or_skip!();
    let what = "zero window";
    let site = Site::start("h2-window");
    let mut conn = attacker(&site);
    let max = conn.server_settings[&setting::MAX_CONCURRENT_STREAMS];
    let big = h2raw::encode(&h2raw::request_fields("GET", "/bytes?n=1048576", SITE));
    let (attack, cost, probe) = under_attack(&site, || {
        conn.settings(&[(setting::INITIAL_WINDOW_SIZE, 0)]);
        open_and_hold(&mut conn, max, &big, flag::END_HEADERS | flag::END_STREAM, "GETs of 1 MiB with a zero window")
    });
    // The idle timeout, the watch's check (every second at most), the 2 s given to what is in
    // flight.
    judge(what, &attack, &cost, &probe, Bounds { closed: IDLE_TIMEOUT + Duration::from_secs(4), cpu: Duration::from_secs(4), rss_growth_kib: 24 << 10 });
    assert_eq!(attack.count(kind::DATA, None), 0, "{what}: DATA went out beyond a window of 0");
    backends_released(&site, Duration::from_secs(3), what);
    site.lb.finish();
}

/// The bound on a flooding client that reads nothing: the idle timeout (its bytes trickling
/// in keep the connection from looking idle, but no request comes), a second, the PING's
/// timeout (the idle timeout here), and slack.
const UNREAD_FLOOD_BOUND: Duration = Duration::from_secs(2 * IDLE_TIMEOUT.as_secs() + 4);

/// SETTINGS flood: SETTINGS frames back to back, their ACKs never read. h2 acknowledges one
/// at a time and stops reading while an acknowledgement cannot be written, so the flood
/// stalls on TCP; the proxy's PING goes unanswered and the connection is closed.
#[test]
fn settings_flood_is_cut_off() {
    xlb_tests::root_or_skip!();
    let what = "SETTINGS flood";
    let site = Site::start("h2-settings");
    let mut conn = attacker(&site);
    let settings = h2raw::frame_bytes(kind::SETTINGS, 0, 0, &[0, setting::ENABLE_PUSH as u8, 0, 0, 0, 0]);
    let round: Vec<u8> = settings.iter().copied().cycle().take(settings.len() * 1000).collect();
    let (attack, cost, probe) = under_attack(&site, || flood_unread(&mut conn, &round, settings.len(), "SETTINGS"));
    judge(what, &attack, &cost, &probe, Bounds { closed: UNREAD_FLOOD_BOUND, cpu: Duration::from_secs(4), rss_growth_kib: 8 << 10 });
    site.lb.finish();
}

/// PING flood: PING frames back to back, their ACKs never read; as the SETTINGS flood.
#[test]
fn ping_flood_is_cut_off() {
    xlb_tests::root_or_skip!();
    let what = "PING flood";
    let site = Site::start("h2-ping");
    let mut conn = attacker(&site);
    let ping = h2raw::frame_bytes(kind::PING, 0, 0, b"flooding");
    let round: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 1000).collect();
    let (attack, cost, probe) = under_attack(&site, || flood_unread(&mut conn, &round, ping.len(), "PING"));
    judge(what, &attack, &cost, &probe, Bounds { closed: UNREAD_FLOOD_BOUND, cpu: Duration::from_secs(4), rss_growth_kib: 8 << 10 });
    site.lb.finish();
}

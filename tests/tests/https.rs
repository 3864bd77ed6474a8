//! The HTTPS path in namespaces with real processes: TLS terminated by the daemon on the lb
//! address (port 443) with certificates from a CA made at test time, requests proxied to the
//! three demo backends, a redirect listener on port 80, and an L4 service on port 8080 over the
//! same backends so that both paths can be seen balancing one load.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::Version;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde_json::Value;
use xlb_tests::*;

const HSTS: &str = "max-age=31536000; includeSubDomains";

/// Test 1: HTTPS through the VIP over HTTP/1.1 and HTTP/2: every backend answers, with every
/// header the proxy adds, and the backend sees the client's address.
#[test]
fn proxies_http1_and_http2_with_headers() {
    xlb_tests::root_or_skip!();
    let site = Site::start("https1");
    for h2 in [false, true] {
        let proto = if h2 { "HTTP/2" } else { "HTTP/1.1" };
        let mut seen = BTreeSet::new();
        for _ in 0..9 {
            let answer = site
                .request(h2, "GET", "/echo?q=1", &[("x-forwarded-for", "192.0.2.7")])
                .unwrap_or_else(|e| panic!("{proto} GET /echo: {e}"));
            assert_eq!(answer.status, 200, "{answer:?}");
            assert_eq!(answer.version, if h2 { Version::HTTP_2 } else { Version::HTTP_11 });
            let b = site.backend_of(&answer);
            seen.insert(b);
            for (name, value) in [
                ("strict-transport-security", HSTS),
                ("x-frame-options", "SAMEORIGIN"),
                ("x-content-type-options", "nosniff"),
                ("referrer-policy", "strict-origin-when-cross-origin"),
            ] {
                assert_eq!(answer.header(name), Some(value), "{proto}: {name} in {answer:?}");
            }
            let echo = answer.json();
            assert_eq!(echo["instance"], format!("app-{}", b + 1), "{echo}");
            assert_eq!(echo["method"], "GET");
            assert_eq!(echo["target"], "/echo?q=1");
            let got = |name: &str| -> Vec<String> {
                echo["headers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|h| h[0] == name)
                    .map(|h| h[1].as_str().unwrap().to_string())
                    .collect()
            };
            let client = site.lb.topo.client_v4.to_string();
            assert_eq!(got("x-forwarded-for"), [format!("192.0.2.7, {client}")], "{echo}");
            assert_eq!(got("x-real-ip"), std::slice::from_ref(&client), "{echo}");
            assert_eq!(got("x-forwarded-proto"), ["https"], "{echo}");
            assert_eq!(got("x-forwarded-host"), [SITE], "{echo}");
            assert_eq!(got("host"), [SITE], "{echo}");
            // The backend's peer is the daemon, on the lb address; the client is only in the
            // headers.
            assert!(echo["peer"].as_str().unwrap().starts_with(&format!("{}:", site.ip)), "{echo}");
        }
        println!("{proto}: answered by backends {seen:?}");
        assert_eq!(seen.len(), BACKENDS, "{proto}: every backend should answer some of 9 requests: {seen:?}");
    }
    // The same from curl, which negotiates h2 by ALPN by itself.
    let (status, out) = site.curl(&["-o", "/dev/null", "-w", "%{http_version} %{http_code}", &format!("https://{SITE}/")]);
    assert!(status.success(), "curl: {out}");
    assert_eq!(out.trim(), "2 200", "curl over h2");
    let (status, out) =
        site.curl(&["--http1.1", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", &format!("https://{SITE}/")]);
    assert!(status.success(), "curl: {out}");
    assert_eq!(out.trim(), "1.1 200", "curl over http/1.1");
    let https = &site.site_status()["https"];
    assert!(https["responses"]["2xx"].as_u64().unwrap() >= 20, "{https}");
    // The client keeps its session tickets, so its later connections resume.
    let (full, resumed) = (https["handshakes_full"].as_u64().unwrap(), https["handshakes_resumed"].as_u64().unwrap());
    println!("TLS handshakes: {full} full, {resumed} resumed");
    assert!(resumed >= 10, "sessions should be resumed: {https}");
    let days = https["cert_expires_in_seconds"].as_i64().unwrap() / 86_400;
    assert!((88..=89).contains(&days), "the certificate expires in 89 days, not {days}: {https}");
    let metrics = site.lb.topo.in_lb(|| http_get(ADMIN, "/metrics", IO_TIMEOUT)).unwrap().body;
    for line in [
        format!("xlb_tls_handshakes_total{{service=\"site\",kind=\"resumed\"}} {resumed}"),
        "xlb_http_retries_total{service=\"site\"} 0".into(),
        "xlb_http_responses_total{service=\"site\",class=\"5xx\"} 0".into(),
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing `{line}` in /metrics:\n{metrics}");
    }
    assert!(metrics.contains("xlb_certificate_expiry_seconds{service=\"site\"} "), "{metrics}");
    let table = run_ok(site.lb.xlb(&["status"]), "xlb status");
    assert!(table.contains("service site  listen 198.18.0.1:443  mode https"), "{table}");
    assert!(table.contains(&format!("tls handshakes: {full} full, {resumed} resumed, 0 failed")), "{table}");
    assert!(table.contains("certificate: expires in 8"), "{table}");

    // A drained backend gets no new HTTPS requests; undrained, it does again.
    let first = site.lb.backends[0].to_string();
    run_ok(site.lb.xlb(&["drain", "site", &first]), "xlb drain");
    let mut served = [0; BACKENDS];
    for _ in 0..6 {
        served[site.get()] += 1;
    }
    assert_eq!(served[0], 0, "a drained backend got HTTPS requests: {served:?}");
    run_ok(site.lb.xlb(&["undrain", "site", &first]), "xlb undrain");
    let mut served = [0; BACKENDS];
    for _ in 0..6 {
        served[site.get()] += 1;
    }
    assert!(served[0] > 0, "an undrained backend got no HTTPS requests: {served:?}");
    site.lb.finish();
}

/// An `Upgrade` (HTTP/1.1, as WebSockets use it) passes through both ways, and the tunnel counts
/// as a request in flight to its backend while it is open.
#[test]
fn upgrades_pass_through() {
    xlb_tests::root_or_skip!();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let site = Site::start("https-upgrade");
    let tcp = site.tcp(site.https());
    let (head, mut tls) = site.rt.block_on(async {
        tcp.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
        let mut config = (*site.tls).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(SITE).unwrap(), tcp)
            .await
            .unwrap();
        let request = format!("GET /upgrade HTTP/1.1\r\nHost: {SITE}\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let n = tokio::time::timeout(IO_TIMEOUT, tls.read(&mut byte)).await.expect("the 101 in time").unwrap();
            assert_eq!(n, 1, "closed inside the response head: {}", String::from_utf8_lossy(&head));
            head.push(byte[0]);
        }
        (String::from_utf8(head).unwrap(), tls)
    });
    println!("{}", head.trim());
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("\r\nupgrade: echo\r\n") && lower.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(lower.contains("\r\nx-backend-server: 198.18.0.1:800"), "{head}");
    let in_flight = |site: &Site| -> u64 {
        site.site_status()["backends"].as_array().unwrap().iter().map(|b| b["live_connections"].as_u64().unwrap()).sum()
    };
    for message in ["hello", "through the tunnel"] {
        let echoed = site.rt.block_on(async {
            tls.write_all(message.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; message.len()];
            tokio::time::timeout(IO_TIMEOUT, tls.read_exact(&mut buf)).await.expect("the echo in time").unwrap();
            String::from_utf8(buf).unwrap()
        });
        assert_eq!(echoed, message);
    }
    assert_eq!(in_flight(&site), 1, "the open tunnel counts as a request in flight");
    drop(tls);
    site.lb.poll(Duration::from_secs(3), "the closed tunnel to stop counting", |_| {
        let n = in_flight(&site);
        (n == 0).then_some(()).ok_or_else(|| format!("{n} in flight"))
    });
    site.lb.finish();
}

/// Test 2: port 80 answers with a redirect keeping path and query (and serves no unknown ACME
/// challenge); TLS 1.0 and 1.1 handshakes are refused, 1.2 and 1.3 accepted.
#[test]
fn redirects_and_refuses_old_tls() {
    xlb_tests::root_or_skip!();
    let site = Site::start("https2");
    let http = site.http();
    let answer = site
        .lb
        .topo
        .in_client(|| http_get(http, "/a/b?x=1&y=two%20words", IO_TIMEOUT))
        .unwrap_or_else(|e| panic!("GET http://{http}/a/b: {e}"));
    assert_eq!(answer.status, 301, "{answer:?}");
    // `http_get` sends `Host: <ip>:80`; the port is dropped.
    assert_eq!(answer.header("location"), Some(format!("https://{}/a/b?x=1&y=two%20words", site.ip).as_str()));
    // curl's --resolve covers port 443 only: the address with a Host header instead.
    let (status, out) = site.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "-H",
        &format!("Host: {SITE}"),
        &format!("http://{}/p/q?r=s", site.ip),
    ]);
    assert!(status.success(), "curl: {out}");
    assert_eq!(out.trim(), format!("301 https://{SITE}/p/q?r=s"));
    let answer = site
        .lb
        .topo
        .in_client(|| http_get(http, "/.well-known/acme-challenge/unknown-token", IO_TIMEOUT))
        .unwrap();
    assert_eq!(answer.status, 404, "{answer:?}");

    // The client is allowed every version (SECLEVEL=0), so a refusal is the server's.
    for old in ["-tls1", "-tls1_1"] {
        let (status, out) = site.openssl(&[old, "-cipher", "DEFAULT:@SECLEVEL=0"]);
        assert!(!status.success(), "openssl s_client {old} succeeded:\n{out}");
        // rustls answers a ClientHello that offers nothing above TLS 1.1 with a fatal alert
        // (handshake_failure or protocol_version) before any certificate.
        let alert = ["alert protocol version", "alert handshake failure"].into_iter().find(|a| out.contains(a));
        assert!(
            alert.is_some() && out.contains("no peer certificate available"),
            "openssl s_client {old} should be refused with an alert before any certificate:\n{out}"
        );
        println!("{old}: refused ({})", alert.unwrap());
    }
    for (new, name) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (status, out) = site.openssl(&[new]);
        assert!(status.success(), "openssl s_client {new} failed:\n{out}");
        assert!(out.contains(&format!("Protocol  : {name}")) || out.contains(&format!(", {name},")), "{new}:\n{out}");
        assert!(out.contains("Verify return code: 0 (ok)"), "{new}:\n{out}");
    }
    let redirects = &site.lb.status()["services"][2];
    assert_eq!(redirects["mode"], "redirect", "{redirects}");
    assert!(redirects["https"]["responses"]["3xx"].as_u64().unwrap() >= 2, "{redirects}");
    site.lb.finish();
}

/// Test 6: two long connections held on backend 1 through the L4 path steer the next HTTPS
/// requests to the other backends; and HTTPS requests in flight steer new L4 connections.
#[test]
fn both_paths_balance_one_load() {
    xlb_tests::root_or_skip!();
    let site = Site::start("https6");
    let lb = &site.lb;
    let (mut on_app1, mut elsewhere) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        if on_app1.len() == 2 {
            break;
        }
        let held = lb.hold();
        if held.backend == 0 { on_app1.push(held) } else { elsewhere.push(held) }
    }
    assert_eq!(on_app1.len(), 2, "could not get two L4 connections onto app-1 in 30 tries");
    drop(elsewhere);
    lb.await_live([2, 0, 0], "L4 live counts [2, 0, 0]");
    let mut served = [0; BACKENDS];
    for _ in 0..10 {
        served[site.get()] += 1;
    }
    println!("10 HTTPS requests with 2 L4 connections held on app-1: {served:?}");
    assert_eq!(served[0], 0, "an HTTPS request went to app-1, which holds 2 L4 connections: {served:?}");
    assert!(served[1] > 0 && served[2] > 0, "both idle backends should get some: {served:?}");
    drop(on_app1);
    lb.await_live([0, 0, 0], "L4 live counts back to 0");

    // Two slow HTTPS requests in flight take two backends; new L4 connections go to the third.
    let busy: Vec<usize> = std::thread::scope(|scope| {
        let slow: Vec<_> = (0..2)
            .map(|_| {
                let site = &site;
                let handle = scope.spawn(move || {
                    let rt = runtime();
                    let tcp = site.tcp(site.https());
                    rt.block_on(async {
                        let mut conn = Conn::open(tcp, site.tls.clone(), SITE, false).await.unwrap();
                        conn.send("GET", "/slow?ms=3000", &[], Bytes::new()).await.unwrap()
                    })
                });
                std::thread::sleep(Duration::from_millis(300));
                handle
            })
            .collect();
        // Both are in flight now (each waits 3 s at its backend).
        site.lb.poll(Duration::from_secs(2), "two HTTPS requests in flight", |lb| {
            let status = lb.status();
            let live: u64 = status["services"][1]["backends"].as_array().unwrap().iter().map(|b| b["live_connections"].as_u64().unwrap()).sum();
            (live == 2).then_some(()).ok_or_else(|| format!("{}", status["services"][1]))
        });
        let l4 = lb.spread(6);
        let answers: Vec<Answer> = slow.into_iter().map(|h| h.join().unwrap()).collect();
        let busy: Vec<usize> = answers.iter().map(|a| site.backend_of(a)).collect();
        println!("HTTPS requests in flight on {busy:?}; 6 new L4 connections meanwhile: {l4:?}");
        assert_ne!(busy[0], busy[1], "two concurrent requests should go to two backends");
        for b in &busy {
            assert_eq!(l4[*b], 0, "an L4 connection went to backend {b}, busy with an HTTPS request: {l4:?}");
        }
        busy
    });
    assert_eq!(busy.len(), 2);
    site.lb.finish();
}

/// Test 5: `kill -9` of a backend during a stream of GETs fails none of them; a POST that
/// reached the dying backend is answered 502 and sent to no other backend.
#[test]
fn backend_killed_mid_stream() {
    xlb_tests::root_or_skip!();
    let mut site = Site::start("https5");
    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let errors = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            let (site, stop, ok, failed, errors) = (&site, &stop, &ok, &failed, &errors);
            scope.spawn(move || {
                let rt = runtime();
                // Kept-alive connections, and a new one now and then.
                let mut conn = None;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    if conn.is_none() || n % 10 == 0 {
                        let tcp = site.tcp(site.https());
                        conn = Some(rt.block_on(Conn::open(tcp, site.tls.clone(), SITE, n % 20 == 0)).unwrap());
                    }
                    n += 1;
                    match rt.block_on(conn.as_mut().unwrap().send("GET", "/", &[], Bytes::new())) {
                        Ok(a) if a.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            errors.lock().unwrap().push(format!("{other:?}"));
                            conn = None;
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            });
        }
        let _stop = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_millis(700));
        let app = site.lb.apps[1].as_ref().unwrap();
        app.kill9();
        println!("killed app-2 after {} requests", ok.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    println!("{ok} GETs answered 200, {failed} failed; {} retries", site.site_status()["https"]["retries"]);
    assert_eq!(failed, 0, "GETs failed while a backend died: {:?}", errors.into_inner().unwrap());
    assert!(ok > 100, "too few requests to show anything: {ok}");
    // Passive health ("failed") or the probes ("down") took app-2 out.
    let b2 = &site.site_status()["backends"][1];
    assert!(b2["state"] == "failed" || b2["state"] == "down", "{b2}");

    // Bring app-2 back, then send a slow POST; kill whichever backend got it.
    site.lb.apps[1] = Some(spawn_app(&site.lb, 1));
    site.lb.poll(Duration::from_secs(10), "app-2 back up for HTTPS", |lb| {
        let s = &lb.status()["services"][1]["backends"][1];
        (s["state"] == "up").then_some(()).ok_or_else(|| format!("{s}"))
    });
    let before: Vec<usize> = site.lb.apps.iter().map(|a| posts(a.as_ref().unwrap())).collect();
    std::thread::scope(|scope| {
        let site = &site;
        let post = scope.spawn(move || {
            let rt = runtime();
            let tcp = site.tcp(site.https());
            rt.block_on(async {
                let mut conn = Conn::open(tcp, site.tls.clone(), SITE, false).await.unwrap();
                conn.send("POST", "/slow?ms=5000", &[("content-type", "text/plain")], Bytes::from_static(b"order #1")).await
            })
        });
        let (victim, _) = site.lb.poll(Duration::from_secs(5), "a backend to receive the POST", |lb| {
            lb.apps
                .iter()
                .enumerate()
                .find(|(i, a)| posts(a.as_ref().unwrap()) > before[*i])
                .map(|(i, _)| i)
                .ok_or_else(|| "no backend logged the POST yet".to_string())
        });
        site.lb.apps[victim].as_ref().unwrap().kill9();
        let answer = post.join().unwrap().expect("the POST gets an answer");
        println!("POST reached app-{} which was killed: answered {}", victim + 1, answer.status);
        assert_eq!(answer.status, 502, "{answer:?}");
        // Give a replay every chance to show up.
        std::thread::sleep(Duration::from_millis(500));
        for (i, app) in site.lb.apps.iter().enumerate() {
            if i != victim {
                assert_eq!(posts(app.as_ref().unwrap()), before[i], "app-{} got the POST too: it was replayed", i + 1);
            }
        }
        assert_eq!(posts(site.lb.apps[victim].as_ref().unwrap()), before[victim] + 1);
    });
    site.lb.finish();
}

/// Passive health: a backend that fails requests (closes without answering) is taken out at
/// once by the proxy, before its probes (which pass) could notice anything; an idempotent
/// request goes on to the next backend, a POST is not sent again.
#[test]
fn failing_requests_take_backends_out() {
    xlb_tests::root_or_skip!();
    let site = Site::start("https-passive");
    let before: Vec<usize> = site.lb.apps.iter().map(|a| aborts(a.as_ref().unwrap(), "POST")).collect();
    let answer = site.request(false, "POST", "/abort", &[]).unwrap();
    assert_eq!(answer.status, 502, "{answer:?}");
    let after = logged_aborts(&site, "POST", &before, 1);
    let reached: usize = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    assert_eq!(reached, 1, "the POST reached {reached} backends: {before:?} -> {after:?}");
    const MARK: &str = "backend failed (passive): requests to it failed";
    let marks = || site.lb.daemon().output().matches(MARK).count();
    site.lb.daemon().wait_for_output(MARK, Duration::from_secs(2));
    assert_eq!(marks(), 1, "{}", site.lb.daemon().output());
    let victim = (0..BACKENDS).find(|&i| after[i] > before[i]).unwrap();
    assert_eq!(site.site_status()["backends"][victim]["state"], "failed");
    // Its probes pass, so it comes back after `rise` probes.
    let all_up = |what: &str| {
        site.lb.poll(Duration::from_secs(5), what, |lb| {
            let s = lb.status();
            let b = s["services"][1]["backends"].as_array().unwrap().clone();
            b.iter().all(|b| b["state"] == "up").then_some(()).ok_or_else(|| format!("{b:?}"))
        })
    };
    let (_, took) = all_up("the backend back after its probes");
    println!("app-{} back up {} ms after passive health took it out", victim + 1, took.as_millis());

    // Every backend fails a GET: each is tried once and taken out, the client gets 502.
    let answer = site.request(false, "GET", "/abort", &[]).unwrap();
    assert_eq!(answer.status, 502, "{answer:?}");
    let gets = logged_aborts(&site, "GET", &[0; BACKENDS], BACKENDS);
    println!("GET /abort reached the backends {gets:?} times");
    assert_eq!(gets, [1; BACKENDS], "each backend should get the GET exactly once");
    site.lb.poll(Duration::from_secs(2), "every backend taken out", |_| {
        (marks() == 1 + BACKENDS).then_some(()).ok_or_else(|| format!("{} taken out", marks()))
    });
    assert_eq!(site.site_status()["https"]["retries"].as_u64(), Some(BACKENDS as u64 - 1));
    all_up("the backends back after their probes");
    assert!(site.get() < BACKENDS);
    site.lb.finish();
}

/// Request buffering: an idempotent request whose body fits `limits.request_buffer_bytes`
/// (64 KiB by default) goes, body and all, to another backend when one fails before answering;
/// a larger body is streamed and sent once, and a POST is never sent twice, over HTTP/1.1 and
/// HTTP/2 alike.
#[test]
fn buffered_bodies_go_to_another_backend() {
    xlb_tests::root_or_skip!();
    let site = Site::start("https-buffer");
    let send = |h2: bool, method: &str, path: &str, len: usize| {
        let mut conn = site.connect(h2).unwrap();
        site.rt.block_on(conn.send(method, path, &[], Bytes::from(vec![b'x'; len]))).unwrap()
    };
    let total = |method: &str| -> usize { site.lb.apps.iter().map(|a| aborts(a.as_ref().unwrap(), method)).sum() };
    // The backends' log lines can reach the test after the answer: wait for `at_least`, then a
    // little longer so that a surplus would show too.
    let reached = |method: &str, before: usize, at_least: usize| -> usize {
        site.lb.poll(Duration::from_secs(2), &format!("{at_least} {method} /abort in the logs"), |_| {
            (total(method) - before >= at_least).then_some(()).ok_or_else(|| format!("{}", total(method) - before))
        });
        std::thread::sleep(Duration::from_millis(200));
        total(method) - before
    };
    let all_up = || {
        site.lb.poll(Duration::from_secs(5), "the failed backends back after their probes", |lb| {
            let s = lb.status();
            let b = s["services"][1]["backends"].as_array().unwrap().clone();
            b.iter().all(|b| b["state"] == "up").then_some(()).ok_or_else(|| format!("{b:?}"))
        });
    };
    let spared = BACKENDS - 1;
    let except = format!("/abort?except=app-{}", spared + 1);
    for h2 in [false, true] {
        // Only the last backend answers: a PUT reaches it whichever backend it went to first.
        // Round-robin among equals moves the first choice on, so within a few PUTs one goes
        // to a failing backend first and is sent again.
        let mut sent_again = 0;
        for _ in 0..BACKENDS + 1 {
            let (before, retries) = (total("PUT"), site.site_status()["https"]["retries"].as_u64().unwrap());
            let answer = send(h2, "PUT", &except, 1000);
            assert_eq!(answer.status, 200, "h2={h2}: {answer:?}");
            assert_eq!(site.backend_of(&answer), spared, "{answer:?}");
            assert_eq!(answer.json()["body_length"].as_u64(), Some(1000), "the body sent again was not whole: {answer:?}");
            let retried = site.site_status()["https"]["retries"].as_u64().unwrap() - retries;
            let n = reached("PUT", before, 1 + retried as usize);
            assert_eq!(n, 1 + retried as usize, "h2={h2}: the PUT reached {n} backends, {retried} retries counted");
            sent_again += retried;
            all_up();
        }
        println!("h2={h2}: {} buffered PUTs, {sent_again} sent again to another backend", BACKENDS + 1);
        assert!(sent_again >= 1, "h2={h2}: no PUT went to a failing backend first");

        // Over the buffer: streamed, sent once, 502.
        let before = total("PUT");
        let answer = send(h2, "PUT", "/abort", 100 * 1024);
        assert_eq!(answer.status, 502, "h2={h2}: {answer:?}");
        assert_eq!(reached("PUT", before, 1), 1, "h2={h2}: a streamed PUT body was sent more than once");
        all_up();

        // A POST with a small body is buffered, but not idempotent: sent once.
        for _ in 0..BACKENDS {
            let before = total("POST");
            let answer = send(h2, "POST", &except, 1000);
            assert!(answer.status == 502 || (answer.status == 200 && site.backend_of(&answer) == spared), "h2={h2}: {answer:?}");
            assert_eq!(reached("POST", before, 1), 1, "h2={h2}: a POST was sent more than once");
            all_up();
        }
    }
    site.lb.finish();
}

/// The `/abort` requests with `method` each backend has logged, read once `expected` more than
/// `before` have arrived: a backend's log line can reach the test after the proxy's answer
/// does. A little longer is waited so that a surplus would show too.
fn logged_aborts(site: &Site, method: &str, before: &[usize], expected: usize) -> Vec<usize> {
    let counts = || -> Vec<usize> { site.lb.apps.iter().map(|a| aborts(a.as_ref().unwrap(), method)).collect() };
    site.lb.poll(Duration::from_secs(2), &format!("{expected} {method} /abort in the backends' logs"), |_| {
        let now = counts();
        let arrived: usize = now.iter().zip(before).map(|(a, b)| a - b).sum();
        (arrived >= expected).then_some(()).ok_or_else(|| format!("{before:?} -> {now:?}"))
    });
    std::thread::sleep(Duration::from_millis(200));
    counts()
}

/// How many `/abort` requests with `method` a demo backend has logged.
fn aborts(app: &xlb_tests::Proc, method: &str) -> usize {
    app.output().matches(&format!("request {method} /abort")).count()
}

/// Tells the client threads of a scope to stop when dropped, also by a failed assertion.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// How many POSTs a demo backend has logged.
fn posts(app: &xlb_tests::Proc) -> usize {
    app.output().matches("request POST ").count()
}

/// Test 7: slow clients are closed by the timeouts while a probe client keeps being served;
/// oversize headers get 431.
#[test]
fn slow_clients_are_timed_out() {
    xlb_tests::root_or_skip!();
    let site = Site::start("https7");
    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|scope| {
        let (site_ref, stop_ref, ok_ref, failed_ref) = (&site, &stop, &ok, &failed);
        scope.spawn(move || {
            while !stop_ref.load(Ordering::Relaxed) {
                match site_ref.request(false, "GET", "/", &[]) {
                    Ok(a) if a.status == 200 => ok_ref.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("probe client: {other:?}");
                        failed_ref.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        // A failed check below must still stop the probe client, or the scope waits forever.
        let _stop = StopOnDrop(&stop);
        let https = site.https();
        // Says nothing after connecting.
        let silent = site.tcp(https);
        // Starts a TLS record and stops.
        let mut stalled = site.tcp(https);
        stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
        let slow_handshakes = [("silent connection", silent), ("stalled TLS handshake", stalled)];
        let started = Instant::now();
        for (what, mut stream) in slow_handshakes {
            let closed = closed_within(&mut stream, HANDSHAKE_TIMEOUT + Duration::from_secs(2));
            let took = started.elapsed();
            assert!(closed, "{what} still open after {took:?}");
            assert!(took >= HANDSHAKE_TIMEOUT - Duration::from_millis(200), "{what} closed too early: {took:?}");
            println!("{what}: closed after {} ms", took.as_millis());
        }

        // Headers dribbled one byte a second after a good handshake.
        let rt = runtime();
        let tcp = site.tcp(https);
        let dribble = rt.block_on(async {
            tcp.set_nonblocking(true).unwrap();
            let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
            let mut config = (*site.tls).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from(SITE).unwrap(), tcp)
                .await
                .unwrap();
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let start = Instant::now();
            let request = b"GET / HTTP/1.1\r\nHost: site.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
            for byte in request {
                if tls.write_all(&[*byte]).await.is_err() || tls.flush().await.is_err() {
                    return (start.elapsed(), "write failed".to_string());
                }
                let mut buf = [0u8; 256];
                match tokio::time::timeout(Duration::from_secs(1), tls.read(&mut buf)).await {
                    Err(_) => {}
                    Ok(Ok(0)) | Ok(Err(_)) => return (start.elapsed(), "closed".to_string()),
                    Ok(Ok(n)) => return (start.elapsed(), String::from_utf8_lossy(&buf[..n]).into_owned()),
                }
            }
            (start.elapsed(), "the whole request went through".to_string())
        });
        println!("dribbled headers: {:?} after {} ms", dribble.1, dribble.0.as_millis());
        assert!(
            dribble.0 <= HEADER_TIMEOUT + Duration::from_secs(2),
            "dribbled headers were not cut off by the 2 s header timeout: {dribble:?}"
        );
        assert!(dribble.1 == "closed" || dribble.1.starts_with("HTTP/1.1 408") || dribble.1 == "write failed", "{dribble:?}");

        // A keep-alive connection left idle is closed after the idle timeout.
        let mut conn = site.connect(false).unwrap();
        assert_eq!(rt.block_on(conn.send("GET", "/", &[], Bytes::new())).unwrap().status, 200);
        std::thread::sleep(IDLE_TIMEOUT + Duration::from_secs(1));
        let after_idle = rt.block_on(conn.send("GET", "/", &[], Bytes::new()));
        assert!(after_idle.is_err(), "an idle connection survived the idle timeout: {after_idle:?}");

        // Oversize headers: one huge header, and too many headers.
        let big = "x".repeat(20_000);
        let answer = site.request(false, "GET", "/", &[("x-big", &big)]).unwrap();
        assert_eq!(answer.status, 431, "{answer:?}");
        let names: Vec<String> = (0..60).map(|i| format!("x-h{i}")).collect();
        let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
        let answer = site.request(false, "GET", "/", &many).unwrap();
        assert_eq!(answer.status, 431, "{answer:?}");

        // Bodies over max_body_bytes: refused by Content-Length before anything is sent, and
        // cut off when chunked. Neither counts against the backend.
        let mut conn = site.connect(false).unwrap();
        let big = Bytes::from(vec![b'x'; MAX_BODY + 1]);
        let answer = rt.block_on(conn.send("POST", "/echo", &[], big)).unwrap();
        assert_eq!(answer.status, 413, "{answer:?}");
        let fits = Bytes::from(vec![b'x'; MAX_BODY]);
        let answer = rt.block_on(site.connect(false).unwrap().send("POST", "/echo", &[], fits)).unwrap();
        assert_eq!((answer.status, answer.json()["body_length"].as_u64()), (200, Some(MAX_BODY as u64)), "{answer:?}");
        let chunked = rt.block_on(chunked_post(site.tcp(https), site.tls.clone(), 2 * MAX_BODY));
        assert!(chunked.starts_with("HTTP/1.1 413"), "a chunked body over the limit: {chunked:?}");
        let states: Vec<Value> = site.site_status()["backends"].as_array().unwrap().iter().map(|b| b["state"].clone()).collect();
        assert!(states.iter().all(|s| s == "up"), "an oversize body counted against a backend: {states:?}");
        stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    println!("probe client: {ok} answered, {failed} failed");
    assert_eq!(failed, 0, "the probe client failed while slow clients were being timed out");
    assert!(ok > 50, "the probe client made too few requests: {ok}");
    site.lb.finish();
}

/// A chunked `POST /echo` of `size` bytes written by hand; the start of what comes back.
async fn chunked_post(tcp: TcpStream, tls: Arc<rustls::ClientConfig>, size: usize) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tcp.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
    let mut config = (*tls).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(SITE).unwrap(), tcp)
        .await
        .unwrap();
    let head = format!("POST /echo HTTP/1.1\r\nHost: {SITE}\r\nTransfer-Encoding: chunked\r\n\r\n");
    let _ = tls.write_all(head.as_bytes()).await;
    let chunk = vec![b'x'; 16 * 1024];
    let (reader, mut writer) = tokio::io::split(tls);
    let write = async move {
        let mut sent = 0;
        while sent < size {
            let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
            if writer.write_all(&frame).await.is_err() {
                return;
            }
            sent += chunk.len();
        }
        let _ = writer.write_all(b"0\r\n\r\n").await;
        // Keep the write half open until the answer is read.
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let read = async move {
        let mut reader = reader;
        let mut buf = vec![0; 4096];
        match tokio::time::timeout(Duration::from_secs(10), reader.read(&mut buf)).await {
            Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            other => format!("no answer: {other:?}"),
        }
    };
    tokio::select! {
        answer = read => answer,
        () = async { write.await; std::future::pending::<()>().await } => unreachable!(),
    }
}

/// Whether the peer closes (EOF or reset) `stream` within `limit`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Test 4: a certificate replaced on disk is served to new connections within the reload
/// period, while a connection opened before keeps working.
#[test]
fn certificate_reload_keeps_connections() {
    xlb_tests::root_or_skip!();
    let site = Site::start("https4");
    let first = std::fs::read(site.pki.cert_path()).unwrap();
    let first_der = CertificateDer::from_pem_slice(&first).unwrap().to_vec();
    let mut old = site.connect(false).unwrap();
    assert_eq!(old.peer_cert, first_der);
    assert_eq!(site.rt.block_on(old.send("GET", "/", &[], Bytes::new())).unwrap().status, 200);

    let second = site.pki.install("second");
    let (conn, took) = site.lb.poll(Duration::from_secs(5), "new connections to get the new certificate", |_| {
        let conn = site.connect(false).map_err(|e| e.to_string())?;
        if conn.peer_cert == second { Ok(conn) } else { Err("still the old certificate".into()) }
    });
    println!("new certificate served {} ms after the files were replaced", took.as_millis());
    let mut new = conn;
    assert_eq!(site.rt.block_on(new.send("GET", "/", &[], Bytes::new())).unwrap().status, 200);
    // The connection from before continues on its session.
    for _ in 0..3 {
        let answer = site.rt.block_on(old.send("GET", "/", &[], Bytes::new())).expect("the old connection still works");
        assert_eq!(answer.status, 200);
    }
    // A broken replacement (key of another certificate) is refused; the second stays.
    let (_, other_key, _) = site.pki.leaf("third");
    replace_file(&site.pki.key_path(), other_key);
    std::thread::sleep(Duration::from_secs(2));
    let conn = site.connect(false).unwrap();
    assert_eq!(conn.peer_cert, second, "a mismatched key must not replace the working certificate");
    site.lb.daemon().wait_for_output("certificates not reloaded, still serving the previous ones", Duration::from_secs(5));
    // SIGHUP reloads at once.
    let third = site.pki.install("fourth");
    site.lb.daemon().signal(xlb_tests::Signal::SIGHUP);
    let (_, took) = site.lb.poll(Duration::from_secs(3), "the certificate after SIGHUP", |_| {
        let conn = site.connect(false).map_err(|e| e.to_string())?;
        (conn.peer_cert == third).then_some(()).ok_or_else(|| "old certificate".into())
    });
    println!("SIGHUP: new certificate served after {} ms", took.as_millis());
    let expiry = &site.site_status()["https"];
    assert!(expiry["cert_expires_in_seconds"].as_i64().unwrap() > 0, "{expiry}");
    assert!(expiry["handshakes_full"].as_u64().unwrap() >= 4, "{expiry}");
    site.lb.finish();
}

/// Test 8: testssl.sh finds nothing of severity MEDIUM or higher, except that it does not
/// trust the test CA.
///
/// `X-Backend-Server` is off here: testssl.sh rates any IPv4 address in a response header
/// MEDIUM (`ipv4_in_header`), and that header's whole point is a backend address. The README
/// says so where it documents `backend_header`.
#[test]
fn testssl_finds_nothing_medium_or_worse() {
    xlb_tests::root_or_skip!();
    let testssl = ["testssl", "testssl.sh"]
        .into_iter()
        .find(|b| Command::new("sh").args(["-c", &format!("command -v {b}")]).output().is_ok_and(|o| o.status.success()))
        .expect("testssl.sh is not installed: `cargo xtask setup` installs it (Debian package testssl.sh)");
    let site = Site::start_with("https8", "backend_header = false");
    let json = site.lb.dir.join("testssl.json");
    let mut cmd = site.lb.topo.client("timeout");
    cmd.args(["300", testssl, "--quiet", "--warnings", "off", "--color", "0", "--severity", "MEDIUM", "--ip"])
        .arg(site.ip.to_string())
        .arg("--jsonfile")
        .arg(&json)
        .arg(format!("https://{SITE}/"));
    let proc = xlb_tests::Proc::spawn(cmd, "testssl.sh");
    let (status, out) = proc.wait_with_output(Duration::from_secs(320));
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("testssl.sh wrote no JSON ({e}); exit {status}:\n{out}"));
    let findings: Vec<Value> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("testssl.sh JSON ({e}): {text}"));
    let serious: Vec<&Value> = findings
        .iter()
        .filter(|f| matches!(f["severity"].as_str(), Some("MEDIUM" | "HIGH" | "CRITICAL")))
        // The test CA is not in testssl.sh's trust stores, by design.
        .filter(|f| !matches!(f["id"].as_str(), Some(id) if id.starts_with("cert_chain_of_trust") || id.starts_with("cert_trust")))
        .collect();
    println!("testssl.sh: {} findings, {} of severity MEDIUM or higher besides the test CA", findings.len(), serious.len());
    assert!(serious.is_empty(), "testssl.sh findings:\n{serious:#?}");
    assert!(!findings.is_empty(), "testssl.sh reported nothing at all; exit {status}:\n{out}");
    site.lb.finish();
}

/// Operations test 3: the daemon restarted 20 times (SIGTERM, then a new one) on the sockets
/// systemd holds for it, under a stream of HTTPS requests on new connections: not one is
/// refused, reset or failed. A stopping daemon stops accepting and finishes what it has; the
/// connections that arrive meanwhile wait in the socket's queue for the next daemon.
#[test]
fn https_listener_handover_across_20_restarts() {
    xlb_tests::root_or_skip!();
    const RESTARTS: usize = 20;
    const CLIENTS: usize = 4;
    let mut lb = Site::prepare("handover");
    let ip = lb.vip.ip();
    let pki = Site::pki(&lb);
    write_config(&lb, &pki, |s| s);
    for i in 0..BACKENDS {
        let app = spawn_app(&lb, i);
        lb.apps.push(Some(app));
    }
    let sockets = lb.topo.in_lb(|| {
        [ADMIN, SocketAddr::new(ip, HTTPS_PORT), SocketAddr::new(ip, HTTP_PORT)]
            .map(|a| std::net::TcpListener::bind(a).unwrap_or_else(|e| panic!("binding {a}: {e}")))
    });
    lb.start_daemon_with(socket_activated(&lb, &sockets, "admin:https:http"));
    lb.wait_healthy();
    let site = Site { tls: client_config(&pki.ca_path()), pki, ip, lb, rt: runtime() };
    assert!(site.lb.daemon().output().contains("listening on the socket passed by systemd"));
    let site = std::sync::Mutex::new(site);
    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let errors = std::sync::Mutex::new(Vec::new());
    let (tls, https) = {
        let s = site.lock().unwrap();
        (s.tls.clone(), s.https())
    };
    let topo_ns = site.lock().unwrap().lb.topo.client_ns.clone();
    let mut restart_ms = Vec::new();
    std::thread::scope(|scope| {
        for _ in 0..CLIENTS {
            let (stop, ok, failed, errors, tls, topo_ns) = (&stop, &ok, &failed, &errors, tls.clone(), topo_ns.clone());
            scope.spawn(move || {
                let rt = runtime();
                // This thread's connections come from the client namespace (setns moves only
                // the calling thread).
                let ns = std::fs::File::open(format!("/run/netns/{topo_ns}")).expect("the client namespace");
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("entering the client namespace");
                while !stop.load(Ordering::Relaxed) {
                    let result = TcpStream::connect_timeout(&https, IO_TIMEOUT)
                        .map_err(|e| format!("connect: {e}"))
                        .and_then(|tcp| {
                            tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                            rt.block_on(async {
                                let mut conn = Conn::open(tcp, tls.clone(), SITE, false).await?;
                                conn.send("GET", "/", &[], Bytes::new()).await
                            })
                        });
                    match result {
                        Ok(a) if a.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            errors.lock().unwrap().push(format!("{other:?}"));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            });
        }
        std::thread::sleep(Duration::from_millis(500));
        for _ in 0..RESTARTS {
            let mut s = site.lock().unwrap();
            let old = s.lb.daemon.take().expect("a daemon runs");
            let started = Instant::now();
            let status = old.terminate();
            assert!(status.success(), "xlb run exited with {status}:\n{}", old.output());
            if std::env::var_os("XLB_DEBUG_HANDOVER").is_some() {
                let out = old.output();
                let tail: Vec<&str> = out.lines().rev().take(8).collect();
                eprintln!("stopped in {} ms: {:?}", started.elapsed().as_millis(), tail);
            }
            let cmd = socket_activated(&s.lb, &sockets, "admin:https:http");
            s.lb.start_daemon_with(cmd);
            restart_ms.push(started.elapsed().as_millis());
            drop(s);
            std::thread::sleep(Duration::from_millis(300));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    restart_ms.sort_unstable();
    println!(
        "{RESTARTS} restarts (SIGTERM to `xlb ready` of the next: median {} ms, max {} ms) under {CLIENTS} clients: {ok} requests answered 200, {failed} failed",
        restart_ms[restart_ms.len() / 2],
        restart_ms[restart_ms.len() - 1]
    );
    assert_eq!(failed, 0, "requests failed across restarts: {:?}", errors.into_inner().unwrap());
    assert!(ok > 200, "too few requests to show anything: {ok}");
    let site = site.into_inner().unwrap();
    site.lb.finish();
}


/// Operations test 4, HTTPS half: `xlb rollout site` restarts the three backends one at a time
/// while clients stream requests (GETs, and POSTs with a body) over kept-alive HTTP/1.1 and
/// HTTP/2 connections and new ones; not one request fails. The proxy's pooled connections to a restarted backend are the hard
/// part: each restart closes them, and a request must never be lost on one.
#[test]
fn rollout_restarts_https_backends_without_a_failed_request() {
    xlb_tests::root_or_skip!();
    let site = Site::start("https-rollout");
    let _restarted = Restarted(site.lb.dir.clone());
    let script = write_restart_script(&site.lb);
    let old_pids = app_pids(&site.lb.dir);
    let exec = format!("{} {{index}}", script.display());
    let stop = AtomicBool::new(false);
    let (ok, failed, fresh) = (AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
    let errors = std::sync::Mutex::new(Vec::new());
    let started = Instant::now();
    let (status, out) = std::thread::scope(|scope| {
        for t in 0..4 {
            let (site, stop, ok, failed, fresh, errors) = (&site, &stop, &ok, &failed, &fresh, &errors);
            scope.spawn(move || {
                let rt = runtime();
                // Thread 0 speaks HTTP/2, the others HTTP/1.1; each keeps its connection alive
                // and opens a new one every 10 requests.
                let h2 = t == 0;
                let mut conn = None;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    if conn.is_none() || n % 10 == 0 {
                        let tcp = site.tcp(site.https());
                        match rt.block_on(Conn::open(tcp, site.tls.clone(), SITE, h2)) {
                            Ok(c) => conn = Some(c),
                            Err(e) => {
                                errors.lock().unwrap().push(format!("connecting: {e}"));
                                failed.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(20));
                                continue;
                            }
                        }
                        fresh.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                    // Thread 1 sends every other request as a POST with a body: one that met a
                    // closing backend connection could not be sent again, so it shows any
                    // request lost on a stale pooled connection as a failure.
                    let sent = if t == 1 && n % 2 == 0 {
                        let headers = [("content-type", "text/plain")];
                        rt.block_on(conn.as_mut().unwrap().send("POST", "/", &headers, Bytes::from_static(b"order")))
                    } else {
                        rt.block_on(conn.as_mut().unwrap().send("GET", "/", &[], Bytes::new()))
                    };
                    match sent {
                        Ok(a) if a.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            errors.lock().unwrap().push(format!("{other:?}"));
                            conn = None;
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            });
        }
        let _stop = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_millis(500));
        let proc = site.lb.topo.spawn(
            site.lb.xlb(&["rollout", "site", "--exec", &exec, "--drain-timeout", "10s", "--health-timeout", "20s"]),
            "xlb rollout",
        );
        let result = proc.wait_with_output(Duration::from_secs(90));
        // The restarted backends serve a while before the load stops.
        std::thread::sleep(Duration::from_millis(500));
        result
    });
    let took = started.elapsed();
    let (ok, failed, fresh) = (ok.into_inner(), failed.into_inner(), fresh.into_inner());
    println!("xlb rollout site:\n{out}");
    println!(
        "during the rollout ({:.1}s): {ok} GETs and POSTs answered 200 over {fresh} connections (HTTP/1.1 and HTTP/2), {failed} failed; {} retries",
        took.as_secs_f64(),
        site.site_status()["https"]["retries"]
    );
    assert!(status.success(), "xlb rollout failed ({status}):\n{out}");
    assert!(out.contains("rollout of site complete: 3 backends restarted"), "{out}");
    let new_pids = app_pids(&site.lb.dir);
    for i in 0..BACKENDS {
        assert_ne!(old_pids[i], new_pids[i], "app-{} was not restarted", i + 1);
    }
    assert_eq!(failed, 0, "requests failed during the rollout: {:?}", errors.into_inner().unwrap());
    assert!(ok > 100, "too few requests to show anything: {ok}");
    // A drained backend's restart is no failure: no request reached it while it went down (none
    // was sent again elsewhere), and passive health took nothing out.
    assert_eq!(site.site_status()["https"]["retries"].as_u64(), Some(0), "requests were retried during the rollout");
    let daemon = site.lb.daemon().output();
    assert!(!daemon.contains("backend failed (passive)"), "passive health took a backend out during the rollout:\n{daemon}");
    // Every restarted backend is back in rotation for HTTPS.
    let seen: BTreeSet<usize> = (0..12).map(|_| site.get()).collect();
    assert_eq!(seen.len(), BACKENDS, "not every backend answers after the rollout: {seen:?}");
    site.lb.finish();
}

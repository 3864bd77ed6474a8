//! Alerts reach a real SMTP server (aiosmtpd, in the lb namespace) and a webhook receiver (a
//! tokio HTTP server in this test): a killed backend is reported down once, however long it
//! stays down, and recovered once when it is back; all backends down is reported once for the
//! service, and its recovery once.
//!
//! Run as root after `cargo build` (needs `aiosmtpd`, Debian's python3-aiosmtpd):
//! `cargo test -p xlb-tests --test alerts -- --test-threads=1 --nocapture`.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use xlb_tests::{
    config::{Alerts, Dur, Email, Webhook},
    *,
};

const SMTP_PORT: u16 = 2525;
/// Long enough for `fall` probes, the alert and its delivery on a loaded machine.
const ALERT_DEADLINE: Duration = Duration::from_secs(10);

/// A webhook receiver: every JSON body POSTed to it, in arrival order. It runs until the test
/// process ends (its runtime lives on a thread of its own).
struct Receiver {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    /// Listens on `ip` (port chosen by the kernel) in the lb namespace; with `tls`, https.
    fn start(lb: &Lb, ip: std::net::IpAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> Receiver {
        let listener = lb
            .topo
            .in_lb(|| std::net::TcpListener::bind((ip, 0)))
            .expect("binding the webhook receiver in the lb namespace");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let store = bodies.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    let store = store.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |request: Request<Incoming>| {
                            let store = store.clone();
                            async move {
                                let ok = request.method() == hyper::Method::POST
                                    && request.uri().path() == "/hook"
                                    && request.headers().get("content-type").is_some_and(|v| v == "application/json");
                                let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                                match (ok, serde_json::from_slice::<Value>(&body)) {
                                    (true, Ok(json)) => {
                                        store.lock().unwrap().push(json);
                                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                                    }
                                    _ => {
                                        let mut r = Response::new(Full::new(Bytes::from_static(b"bad request")));
                                        *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
                                        Ok(r)
                                    }
                                }
                            }
                        });
                        match tls {
                            None => {
                                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                            }
                            Some(tls) => {
                                // A failed handshake (an untrusting client) just ends the connection.
                                if let Ok(stream) = tls.accept(stream).await {
                                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                                }
                            }
                        }
                    });
                }
            });
        });
        Receiver { addr, bodies }
    }

    /// Every event received so far as (event, backend or service), in order.
    fn events(&self) -> Vec<(String, String)> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .flat_map(|body| {
                assert_eq!(body["source"], "xlb", "{body}");
                body["events"].as_array().cloned().unwrap_or_default()
            })
            .map(|e| {
                let what = e["backend"].as_str().or(e["service"].as_str()).unwrap_or("").to_owned();
                (e["event"].as_str().unwrap_or("").to_owned(), what)
            })
            .collect()
    }

    fn count(&self, event: &str, what: &str) -> usize {
        self.events().iter().filter(|(e, w)| e == event && w == what).count()
    }
}

/// Mail subjects the SMTP server printed, in order.
fn subjects(smtp: &Proc) -> Vec<String> {
    smtp.output()
        .lines()
        .filter_map(|l| l.strip_prefix("Subject: "))
        .map(str::to_owned)
        .collect()
}

fn mails(smtp: &Proc, needle: &str) -> usize {
    subjects(smtp).iter().filter(|s| s.contains(needle)).count()
}

/// Waits until the webhook has `n` × `event` about `what` and the SMTP server as many mails
/// whose subject contains `subject`.
fn await_alert(hook: &Receiver, smtp: &Proc, event: &str, what: &str, subject: &str, n: usize) {
    wait_until(ALERT_DEADLINE, &format!("{n}× {event} {what} by webhook and mail ({subject:?})"), || {
        hook.count(event, what) >= n && mails(smtp, subject) >= n
    });
}

#[test]
fn alerts_reach_smtp_and_webhook_once_per_event() {
    xlb_tests::root_or_skip!();
    let mut lb = Lb::prepare("alerts", Family::V4);
    let ip = lb.backends[0].ip();
    let hook = Receiver::start(&lb, ip, None);
    let mut aiosmtpd = lb.topo.lb("aiosmtpd");
    aiosmtpd.args(["-n", "-l", &format!("{ip}:{SMTP_PORT}")]).env("PYTHONUNBUFFERED", "1");
    let smtp = lb.topo.spawn(aiosmtpd, "aiosmtpd");
    wait_until(Duration::from_secs(10), "aiosmtpd to listen", || {
        lb.topo.ss_lb(&["-Htln", &format!("sport = :{SMTP_PORT}")]).contains(&SMTP_PORT.to_string())
    });
    lb.write(&lb.config().alerts(Alerts {
        max_per_minute: Some(30),
        email: Some(Email {
            host: ip.to_string(),
            port: SMTP_PORT,
            tls: "none".into(),
            from: "xlb <xlb@xlb.test>".into(),
            to: vec!["ops@xlb.test".into()],
            timeout: None,
            ca_file: None,
        }),
        webhook: Some(Webhook::new(format!("http://{}/hook", hook.addr)).timeout(Duration::from_secs(2))),
    }));
    lb.spawn_apps();
    lb.start_daemon();
    lb.wait_healthy();
    assert!(hook.events().is_empty() && subjects(&smtp).is_empty(), "alerts while everything was up");

    // One backend killed: "down" once, however long it stays down.
    let app2 = lb.backends[1].to_string();
    drop(lb.apps[1].take());
    await_alert(&hook, &smtp, "backend_down", &app2, &format!("DOWN: web backend {app2}"), 1);
    std::thread::sleep(HEALTH_INTERVAL * 10);
    assert_eq!(hook.count("backend_down", &app2), 1, "{:?}", hook.events());
    assert_eq!(mails(&smtp, "DOWN: web backend"), 1, "{:?}", subjects(&smtp));
    // The body is quoted-printable: undo its soft line breaks.
    let mail = smtp.output().replace("=\n", "");
    assert!(
        mail.contains("From: xlb <xlb@xlb.test>") && mail.contains("To: ops@xlb.test"),
        "the mail as aiosmtpd received it:\n{mail}"
    );
    assert!(mail.contains(&format!("DOWN: backend {app2} of service web fails its health checks (last probe: connect:")), "{mail}");

    // Back: "recovered" once.
    lb.apps[1] = Some(lb.spawn_app(1));
    await_alert(&hook, &smtp, "backend_recovered", &app2, &format!("RECOVERED: web backend {app2}"), 1);
    std::thread::sleep(HEALTH_INTERVAL * 10);
    assert_eq!(hook.count("backend_recovered", &app2), 1, "{:?}", hook.events());
    assert_eq!(hook.events().len(), 2, "nothing else was reported: {:?}", hook.events());
    assert_eq!(subjects(&smtp).len(), 2, "{:?}", subjects(&smtp));

    // Every backend down: the service too, once; all back: each recovery once.
    for app in &mut lb.apps {
        drop(app.take());
    }
    await_alert(&hook, &smtp, "service_down", "web", "DOWN: service web has no backend up", 1);
    for addr in &lb.backends {
        let n = if addr.to_string() == app2 { 2 } else { 1 };
        await_alert(&hook, &smtp, "backend_down", &addr.to_string(), &format!("DOWN: web backend {addr}"), n);
    }
    for i in 0..BACKENDS {
        lb.apps[i] = Some(lb.spawn_app(i));
    }
    await_alert(&hook, &smtp, "service_recovered", "web", "RECOVERED: service web", 1);
    for addr in &lb.backends {
        let n = if addr.to_string() == app2 { 2 } else { 1 };
        await_alert(&hook, &smtp, "backend_recovered", &addr.to_string(), &format!("RECOVERED: web backend {addr}"), n);
    }
    std::thread::sleep(HEALTH_INTERVAL * 10);
    let events = hook.events();
    println!("webhook events: {events:?}");
    println!("mail subjects: {:?}", subjects(&smtp));
    // 2 + 3 down + 1 service down + 3 recovered + 1 service recovered.
    assert_eq!(events.len(), 10, "{events:?}");
    assert_eq!(subjects(&smtp).len(), 10, "{:?}", subjects(&smtp));
    let service_down = events.iter().position(|(e, _)| e == "service_down").unwrap();
    let service_up = events.iter().position(|(e, _)| e == "service_recovered").unwrap();
    assert!(service_down < service_up, "{events:?}");

    // Down across a daemon restart: the new daemon does not repeat the failure, and sends the
    // recovery.
    drop(lb.apps[1].take());
    await_alert(&hook, &smtp, "backend_down", &app2, &format!("DOWN: web backend {app2}"), 3);
    let old = lb.daemon.take().expect("the daemon runs");
    assert!(old.terminate().success(), "{}", old.output());
    lb.start_daemon();
    std::thread::sleep(HEALTH_INTERVAL * 10);
    assert_eq!(hook.count("backend_down", &app2), 3, "{:?}", hook.events());
    lb.apps[1] = Some(lb.spawn_app(1));
    await_alert(&hook, &smtp, "backend_recovered", &app2, &format!("RECOVERED: web backend {app2}"), 3);
    assert_eq!(hook.events().len(), 12, "{:?}", hook.events());
    drop(smtp);
    lb.finish();
}

/// `openssl` with `args`; panics with its output unless it succeeds.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let mut cmd = std::process::Command::new("openssl");
    cmd.current_dir(dir).args(args);
    run_ok(cmd, &format!("openssl {}", args.join(" ")));
}

/// E-mail over STARTTLS to a relay, and an https webhook, whose certificate a private CA signed:
/// untrusted without `ca_file` (deliveries fail, and say why), delivered once `ca_file` names
/// the CA (applied by `xlb reload`). aiosmtpd refuses mail before STARTTLS, so a delivered mail
/// went over TLS.
#[test]
fn alerts_use_tls_and_a_private_ca() {
    xlb_tests::root_or_skip!();
    let mut lb = Lb::prepare("alerts-tls", Family::V4);
    let ip = lb.backends[0].ip();
    let dir = lb.dir.clone();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=xlb test CA", "-keyout", "ca.key", "-out", "ca.pem"];
    ca.extend(ec);
    ca.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"]);
    openssl(&dir, &ca);
    let mut csr = vec!["req", "-subj", "/CN=smtp.xlb.test", "-keyout", "smtp.key", "-out", "smtp.csr"];
    csr.extend(ec);
    openssl(&dir, &csr);
    std::fs::write(
        dir.join("smtp.ext"),
        format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    openssl(
        &dir,
        &["x509", "-req", "-days", "2", "-in", "smtp.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "smtp.ext", "-out", "smtp.pem"],
    );
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> = {
        use rustls::pki_types::pem::PemObject as _;
        rustls::pki_types::CertificateDer::pem_file_iter(dir.join("smtp.pem")).unwrap().map(Result::unwrap).collect()
    };
    let key = {
        use rustls::pki_types::pem::PemObject as _;
        rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("smtp.key")).unwrap()
    };
    let server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let hook = Receiver::start(&lb, ip, Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server))));
    let mut aiosmtpd = lb.topo.lb("aiosmtpd");
    aiosmtpd
        .args(["-n", "-l", &format!("{ip}:{SMTP_PORT}"), "--tlscert"])
        .arg(dir.join("smtp.pem"))
        .arg("--tlskey")
        .arg(dir.join("smtp.key"))
        .env("PYTHONUNBUFFERED", "1");
    let smtp = lb.topo.spawn(aiosmtpd, "aiosmtpd");
    wait_until(Duration::from_secs(10), "aiosmtpd to listen", || {
        lb.topo.ss_lb(&["-Htln", &format!("sport = :{SMTP_PORT}")]).contains(&SMTP_PORT.to_string())
    });
    let alerts = Alerts {
        max_per_minute: None,
        email: Some(Email {
            host: ip.to_string(),
            port: SMTP_PORT,
            tls: "starttls".into(),
            from: "xlb@xlb.test".into(),
            to: vec!["ops@xlb.test".into()],
            timeout: Some(Dur(Duration::from_secs(3))),
            ca_file: None,
        }),
        webhook: Some(Webhook::new(format!("https://{ip}:{}/hook", hook.addr.port())).timeout(Duration::from_secs(2))),
    };
    lb.write(&lb.config().alerts(alerts.clone()));
    lb.spawn_apps();
    lb.start_daemon();
    lb.wait_healthy();

    // Only Mozilla's roots: the relay's certificate is not trusted, nothing is delivered.
    let app2 = lb.backends[1];
    drop(lb.apps[1].take());
    lb.daemon().wait_for_output("alerts: e-mail delivery failed (attempt 1 of 3", ALERT_DEADLINE);
    lb.daemon().wait_for_output("alerts: webhook delivery failed (attempt 1 of 3", ALERT_DEADLINE);
    let log = lb.daemon().output();
    for channel in ["e-mail", "webhook"] {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("alerts: {channel} delivery failed")))
            .unwrap_or_else(|| panic!("no {channel} failure in:\n{log}"));
        assert!(line.contains("invalid peer certificate: UnknownIssuer"), "{line}");
    }
    assert!(subjects(&smtp).is_empty() && hook.events().is_empty(), "{:?} {:?}", subjects(&smtp), hook.events());

    // Trust the CA (a reload applies it); the recovery then arrives, over STARTTLS.
    let ca_file = dir.join("ca.pem");
    let mut with_ca = alerts;
    with_ca.email.as_mut().unwrap().ca_file = Some(ca_file.display().to_string());
    with_ca.webhook = with_ca.webhook.map(|w| w.ca_file(&ca_file));
    lb.write(&lb.config().alerts(with_ca));
    let out = run_ok(lb.xlb(&["reload"]), "xlb reload");
    assert!(out.contains("[alerts] changed"), "{out}");
    lb.apps[1] = Some(lb.spawn_app(1));
    wait_until(ALERT_DEADLINE, "the recovery by mail over STARTTLS and by https webhook", || {
        mails(&smtp, &format!("RECOVERED: web backend {app2}")) == 1
            && hook.count("backend_recovered", &app2.to_string()) == 1
    });
    println!("mail subjects: {:?}", subjects(&smtp));
    drop(smtp);
    lb.finish();
}

//! `xlb reload` of the `https` and `redirect` services, with no restart and no failed request:
//! a service changed (backends, headers, certificates), one added, one removed while a request
//! of its is under way, a redirect removed and added back, and a reload that cannot bind
//! refused with nothing changed. A probe client (kept-alive HTTP/1.1 and HTTP/2, new
//! connections now and then) runs throughout and must see every request answered.
//!
//! Run as root: `cargo xtask test -- -p xlb-tests --test https_reload -- --nocapture`.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use bytes::Bytes;
use xlb_tests::{
    config::{Service, Tls},
    *,
};

/// The added `https` service's port.
const API_PORT: u16 = 8443;

/// `GET path` on `conn`, which must be answered `200`.
fn get(site: &Site, conn: &mut Conn, path: &str, what: &str) -> Answer {
    let answer = site.rt.block_on(conn.send("GET", path, &[], Bytes::new())).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(answer.status, 200, "{what}: {answer:?}");
    answer
}

/// A kept-alive HTTPS connection from the client namespace to `to`.
fn connect(site: &Site, to: SocketAddr, h2: bool) -> Conn {
    site.rt.block_on(Conn::open(site.tcp(to), site.tls.clone(), SITE, h2)).unwrap_or_else(|e| panic!("connecting to {to}: {e}"))
}

/// Whether anything accepts TCP connections at `addr`.
fn accepts(site: &Site, addr: SocketAddr) -> bool {
    site.lb.topo.in_client(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1))).is_ok()
}

/// Writes `config` and reloads: the changes the daemon listed.
fn reload(site: &Site, config: &config::XlbConfig, what: &str) -> String {
    site.lb.write(config);
    let (status, out) = run(site.lb.xlb(&["reload"]), what);
    println!("{what}: {}", out.trim());
    assert!(status.success(), "{what}: {out}\n{}", site.lb.daemon().output());
    out
}

/// The service named `name` in the status.
fn service(site: &Site, name: &str) -> Option<serde_json::Value> {
    site.lb.status()["services"].as_array().unwrap().iter().find(|s| s["name"] == name).cloned()
}

#[test]
fn https_and_redirect_services_reload_without_a_restart() {
    xlb_tests::root_or_skip!();
    let site = Site::start("https-reload");
    let lb = &site.lb;
    let api = SocketAddr::new(site.ip, API_PORT);
    let daemon_pid = lb.daemon().pid();
    let base = site_config(lb, &site.pki, |s| s);
    // Connections held open across every reload, one per protocol.
    let mut held = [connect(&site, site.https(), false), connect(&site, site.https(), true)];
    for c in &mut held {
        get(&site, c, "/", "a held connection before the reloads");
    }
    let probe = Probe::default();
    std::thread::scope(|scope| {
        let _stop = probe.stop_on_drop();
        scope.spawn(|| probe.run(&site, Duration::from_millis(20)));
        std::thread::sleep(Duration::from_millis(500));

        // 1. The https service changed (app-3 taken out, another HSTS), another one added.
        let mut one = base.clone();
        one.services[1] = one.services[1].clone().backends(&lb.backends[..2]).http("hsts = \"max-age=60\"");
        one.services.push(Service::https("api", api).backends(&lb.backends[2..]).tls(site.pki.tls()));
        let out = reload(&site, &one, "xlb reload (site changed, api added)");
        assert!(
            out.contains("service site: backend") && out.contains("service site: HTTP settings changed") && out.contains("service api added"),
            "{out}"
        );
        for c in &mut held {
            for _ in 0..6 {
                let answer = get(&site, c, "/", "a held connection after the change");
                assert_ne!(site.backend_of(&answer), 2, "a request after the reload went to the backend taken out: {answer:?}");
                assert_eq!(answer.header("strict-transport-security"), Some("max-age=60"), "the new HSTS: {answer:?}");
            }
        }
        let mut api_conn = connect(&site, api, false);
        let answer = get(&site, &mut api_conn, "/", "the added service");
        assert_eq!(site.backend_of(&answer), 2, "the added service's one backend: {answer:?}");
        let status = service(&site, "api").expect("the added service in the status");
        assert_eq!((status["mode"].as_str(), status["https"]["responses"]["2xx"].as_u64()), (Some("https"), Some(1)), "{status:#}");

        // 2. The added service and the redirect removed, while a request of the added
        // service's is under way: it is answered, then nothing listens there.
        let mut two = one.clone();
        two.services.retain(|s| s.name != "api" && s.name != "site-http");
        let (slow, out) = std::thread::scope(|inner| {
            let slow = inner.spawn(|| {
                let started = Instant::now();
                let answer = site.rt.block_on(api_conn.send("GET", "/slow?ms=1500", &[], Bytes::new()));
                (answer, started.elapsed())
            });
            std::thread::sleep(Duration::from_millis(300));
            let out = reload(&site, &two, "xlb reload (api and site-http removed)");
            (slow.join().unwrap(), out)
        });
        assert!(out.contains("service api removed") && out.contains("service site-http removed"), "{out}");
        let (answer, took) = slow;
        let answer = answer.unwrap_or_else(|e| panic!("the request under way when its service was removed: {e}"));
        assert_eq!(answer.status, 200, "the request under way when its service was removed: {answer:?}");
        println!("a request under way on a removed service: answered {} after {took:?}", answer.status);
        assert!(!accepts(&site, api), "something still accepts on the removed service's {api}");
        assert!(!accepts(&site, site.http()), "something still accepts on the removed redirect's {}", site.http());
        assert!(service(&site, "api").is_none() && service(&site, "site-http").is_none());

        // 3. The certificates changed (other files): new connections get the new certificate,
        // held ones go on.
        let (cert, key, der) = site.pki.leaf("second");
        let (cert_path, key_path) = (site.pki.dir.join("other.crt"), site.pki.dir.join("other.key"));
        replace_file(&key_path, key);
        replace_file(&cert_path, cert);
        let mut three = two.clone();
        three.services[1] = three.services[1].clone().tls(Tls::files(&cert_path, &key_path));
        let out = reload(&site, &three, "xlb reload (site's certificates changed)");
        assert!(out.contains("service site: certificates ([service.tls]) changed"), "{out}");
        assert_eq!(connect(&site, site.https(), false).peer_cert, der, "a new connection after the reload got the old certificate");
        for c in &mut held {
            get(&site, c, "/", "a held connection after the certificate change");
        }

        // 4. The redirect back, on its old address.
        let four = { let mut c = three.clone(); c.services.push(base.services[2].clone()); c };
        let out = reload(&site, &four, "xlb reload (site-http added back)");
        assert!(out.contains("service site-http added"), "{out}");
        let mut curl = site.lb.topo.client("curl");
        curl.args(["-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "--max-time", "5", "-H", &format!("Host: {SITE}")])
            .arg(format!("http://{}/a?b=c", site.http()));
        let (status, out) = run(curl, "curl to the redirect added back");
        assert!(status.success() && out.trim() == format!("301 https://{SITE}/a?b=c"), "{out}");

        // 5. A service that cannot listen (app-1 has that address) is refused whole: the
        // running config stays, and serves.
        let mut taken = four.clone();
        taken.services.push(Service::https("taken", lb.backends[0]).backends(&lb.backends[1..2]).tls(site.pki.tls()));
        taken.services[1] = taken.services[1].clone().backends(&lb.backends);
        lb.write(&taken);
        let (status, out) = run(lb.xlb(&["reload"]), "xlb reload (an address in use)");
        println!("xlb reload with an address in use: {}", out.trim());
        assert!(!status.success() && out.contains(&format!("service \"taken\": listening on {}", lb.backends[0])), "{out}");
        assert!(service(&site, "taken").is_none(), "a refused reload added a service");
        for c in &mut held {
            for _ in 0..4 {
                let answer = get(&site, c, "/", "a held connection after the refused reload");
                assert_ne!(site.backend_of(&answer), 2, "a refused reload put app-3 back: {answer:?}");
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    });
    assert_eq!(lb.daemon().pid(), daemon_pid, "the daemon restarted");
    let result = probe.result();
    println!("probe client over the reloads: {} of {} answered", result.ok, result.total());
    result.assert_success(100.0, 100, "the reloads of https and redirect services");
    site.lb.finish();
}

//! `xlb import nginx` against the real nginx: the incumbent setup (INCUMBENT-NGINX-SETUP.md, as
//! the nginx files in lb-userspace/src/import/incumbent) is imported, and nginx with those files
//! and xlb with the imported config run side by side in the lb namespace against the same three
//! backends. From the client namespace both must answer alike: the redirect and its target, the
//! status codes, the security and X-Backend-Server headers, the headers the backends see, the
//! body limit, and the spread over the backends.
//!
//! Both need ports 80 and 443, so each gets an address of its own: xlb the lb address
//! (198.18.0.1, given to the import as `--address`), nginx 198.18.0.3, written into its copy's
//! `listen`s (the only directive values changed besides paths, which move into the test's
//! directory, and the certificate, which is the test CA's). The backends listen on 0.0.0.0, as
//! the import asks: nginx reaches them on 127.0.0.1, xlb on the lb address.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use bytes::Bytes;
use xlb_tests::*;

const NGINX: &str = "/usr/sbin/nginx";
const NGINX_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const HOST: &str = "myhibachi.com";
const REQUESTS: usize = 30;

/// The incumbent's files, copied under `to` with `edit` applied to each.
fn copy_incumbent(to: &Path, edit: &dyn Fn(&str) -> String) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-userspace/src/import/incumbent");
    for file in ["nginx.conf", "conf.d/myhibachi-upstream.conf", "vhosts/myhibachi.com/conf/vhost_nginx.conf"] {
        let target = to.join(file);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let text = std::fs::read_to_string(from.join(file)).unwrap_or_else(|e| panic!("reading the incumbent's {file}: {e}"));
        std::fs::write(&target, edit(&text)).unwrap();
    }
}

/// What one load balancer answered.
#[derive(Debug)]
struct Seen {
    redirect: (u16, Option<String>),
    statuses: Vec<u16>,
    headers: BTreeMap<String, String>,
    /// Requests per backend port, by X-Backend-Server.
    spread: BTreeMap<u16, usize>,
    /// What the backend saw of X-Forwarded-For, X-Forwarded-Proto, X-Real-IP and Host.
    forwarded: Vec<(String, String)>,
    too_large: u16,
}

fn redirect_of(lb: &Lb, ip: IpAddr) -> (u16, Option<String>) {
    let to = SocketAddr::new(ip, 80);
    let raw = lb.topo.in_client(|| {
        let mut s = TcpStream::connect_timeout(&to, IO_TIMEOUT).unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.write_all(format!("GET /menu/today?lang=en HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw
    });
    let status = raw.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status line from {to}: {raw:?}"));
    let location = raw
        .split("\r\n")
        .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("location")).map(|(_, v)| v.trim().to_string()));
    (status, location)
}

fn observe(lb: &Lb, tls: &std::sync::Arc<rustls::ClientConfig>, rt: &tokio::runtime::Runtime, ip: IpAddr) -> Seen {
    let https = SocketAddr::new(ip, 443);
    let connect = |h2: bool| {
        let tcp = lb.topo.in_client(|| TcpStream::connect_timeout(&https, IO_TIMEOUT)).unwrap_or_else(|e| panic!("connecting to {https}: {e}"));
        rt.block_on(Conn::open(tcp, tls.clone(), HOST, h2)).unwrap_or_else(|e| panic!("TLS to {https}: {e}"))
    };
    let mut seen = Seen {
        redirect: redirect_of(lb, ip),
        statuses: Vec::new(),
        headers: BTreeMap::new(),
        spread: BTreeMap::new(),
        forwarded: Vec::new(),
        too_large: 0,
    };
    // As the setup's own check does: one new connection per request, X-Backend-Server counted.
    for i in 0..REQUESTS {
        let mut conn = connect(i % 2 == 1);
        let answer = rt.block_on(conn.send("GET", "/", &[], Bytes::new())).unwrap_or_else(|e| panic!("GET https://{https}/: {e}"));
        seen.statuses.push(answer.status);
        let backend = answer.header("x-backend-server").unwrap_or_else(|| panic!("no X-Backend-Server from {https}: {answer:?}"));
        let port: u16 = backend.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("X-Backend-Server {backend}"));
        *seen.spread.entry(port).or_default() += 1;
        for name in ["strict-transport-security", "x-frame-options", "x-content-type-options", "referrer-policy"] {
            let value = answer.header(name).unwrap_or_else(|| panic!("no {name} from {https}: {answer:?}")).to_string();
            seen.headers.insert(name.to_string(), value);
        }
    }
    let mut conn = connect(false);
    let echo = rt.block_on(conn.send("GET", "/echo", &[], Bytes::new())).unwrap_or_else(|e| panic!("GET /echo: {e}"));
    assert_eq!(echo.status, 200, "{echo:?}");
    let echo = echo.json();
    for name in ["x-forwarded-for", "x-forwarded-proto", "x-real-ip", "host"] {
        let values: Vec<String> = echo["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h[0] == name)
            .map(|h| h[1].as_str().unwrap().to_string())
            .collect();
        seen.forwarded.push((name.to_string(), values.join(", ")));
    }
    // client_max_body_size 10M: one byte more is refused before it reaches a backend.
    let mut conn = connect(false);
    let body = Bytes::from(vec![b'x'; (10 << 20) + 1]);
    seen.too_large = match rt.block_on(conn.send("POST", "/echo", &[], body)) {
        Ok(answer) => answer.status,
        Err(e) => panic!("POST of 10 MiB + 1 to {https}: {e}"),
    };
    seen
}

#[test]
fn imported_incumbent_setup_behaves_as_nginx() {
    xlb_tests::root_or_skip!();
    assert!(Path::new(NGINX).exists(), "{NGINX} is missing; `cargo xtask setup` installs it");
    let mut lb = Site::prepare("import");
    let dir = lb.dir.clone();
    // The certificates certbot would keep, made by the test CA.
    let pki = Pki::new(&dir, &[HOST, "www.myhibachi.com"]);
    pki.install("myhibachi");
    let live = dir.join("letsencrypt/live/myhibachi.com");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::copy(pki.cert_path(), live.join("fullchain.pem")).unwrap();
    std::fs::copy(pki.key_path(), live.join("privkey.pem")).unwrap();
    let at = |p: &str| format!("{}/{p}", dir.display());
    let paths = |text: &str| {
        text.replace("/etc/nginx/", &at("nginx/"))
            .replace("/etc/letsencrypt/", &at("letsencrypt/"))
            .replace("/var/log/nginx/", &at("nginx/"))
            .replace("/run/nginx.pid", &at("nginx/nginx.pid"))
    };
    let import_dir = dir.join("import");
    copy_incumbent(&import_dir, &|t| paths(t).replace(&at("nginx/"), &at("import/")));
    let nginx_dir = dir.join("nginx");
    copy_incumbent(&nginx_dir, &|t| {
        paths(t).replace("listen 80;", &format!("listen {NGINX_IP}:80;")).replace("listen 443 ssl", &format!("listen {NGINX_IP}:443 ssl"))
    });

    // The import: complete, and what it wrote is what `xlb check` accepts in the lb namespace.
    let imported = dir.join("imported.toml");
    let mut cmd = lb.topo.lb(xlb_bin());
    cmd.args(["import", "nginx"])
        .arg(import_dir.join("nginx.conf"))
        .args(["--address", &lb.topo.lb_v4.to_string(), "--interface", &lb.topo.lb_if, "--output"])
        .arg(&imported);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("xlb import nginx:\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "the incumbent setup imports completely:\n{stderr}");
    assert!(stderr.contains("xlb import: complete: 2 service(s)"), "{stderr}");
    let text = std::fs::read_to_string(&imported).unwrap();
    assert!(text.contains(&format!("# from server at {}:9 (listen", import_dir.join("vhosts/myhibachi.com/conf/vhost_nginx.conf").display())), "{text}");
    // The test's own pins, not the host's.
    let text = text.replacen("[dataplane]\n", &format!("[dataplane]\npin_path = \"{}\"\n", lb.topo.pin_path.display()), 1);
    std::fs::write(&lb.config, &text).unwrap();
    println!("{text}");
    let (status, check) = run(lb.xlb(&["check"]), "xlb check");
    assert!(status.success(), "xlb check refuses the imported config: {check}");

    // The backends, on every address: 127.0.0.1 for nginx, the lb address for xlb.
    for i in 0..BACKENDS {
        let listen = format!("0.0.0.0:{}", lb.backends[i].port());
        let name = format!("app-{}", i + 1);
        let app = lb.topo.spawn_lb(demo_backend_bin(), &["--listen", &listen, "--name", &name]);
        app.wait_for_output(&format!("listening on {listen}"), Duration::from_secs(10));
        lb.apps.push(Some(app));
    }
    let mut add = lb.topo.lb("ip");
    add.args(["addr", "add", &format!("{NGINX_IP}/24"), "dev", &lb.topo.lb_if]);
    run_ok(add, "adding nginx's address");

    // nginx with the incumbent's files, as `nginx -t` accepts them.
    let conf = nginx_dir.join("nginx.conf");
    let mut t = lb.topo.lb(NGINX);
    t.args(["-t", "-e", "stderr", "-p"]).arg(&nginx_dir).arg("-c").arg(&conf);
    let (ok, said) = run(t, "nginx -t");
    assert!(ok.success(), "nginx -t refuses the incumbent's files: {said}");
    let nginx = lb.topo.spawn_lb(NGINX, &["-e", "stderr", "-p", &nginx_dir.to_string_lossy(), "-c", &conf.to_string_lossy(), "-g", "daemon off;"]);
    let nginx_https = SocketAddr::new(NGINX_IP.into(), 443);
    wait_until(Duration::from_secs(10), "nginx listening", || lb.topo.in_client(|| TcpStream::connect_timeout(&nginx_https, IO_TIMEOUT).is_ok()));
    lb.start_daemon();
    lb.poll(Duration::from_secs(15), "the imported https service's backends up", |lb| {
        let status = lb.status();
        let site = status["services"].as_array().and_then(|s| s.iter().find(|s| s["mode"] == "https")).cloned().unwrap_or_default();
        let up = site["backends"].as_array().is_some_and(|b| b.len() == BACKENDS && b.iter().all(|b| b["state"] == "up"));
        up.then_some(()).ok_or_else(|| format!("{site}"))
    });

    let tls = client_config(&pki.ca_path());
    let rt = runtime();
    let from_nginx = observe(&lb, &tls, &rt, NGINX_IP.into());
    let from_xlb = observe(&lb, &tls, &rt, lb.topo.lb_v4.into());
    println!("nginx: {from_nginx:?}\nxlb:   {from_xlb:?}");
    // SIGTERM: nginx's master stops its workers (a SIGKILL, as on a panic, leaves that to the
    // namespace's teardown).
    nginx.terminate();

    let target = format!("https://{HOST}/menu/today?lang=en");
    assert_eq!(from_nginx.redirect, (301, Some(target.clone())), "nginx's redirect");
    assert_eq!(from_xlb.redirect, from_nginx.redirect, "xlb's redirect is nginx's");
    assert_eq!(from_nginx.statuses, vec![200; REQUESTS]);
    assert_eq!(from_xlb.statuses, from_nginx.statuses);
    assert_eq!(from_nginx.headers.len(), 4, "{from_nginx:?}");
    assert_eq!(from_xlb.headers, from_nginx.headers, "the security headers");
    let client = lb.topo.client_v4.to_string();
    assert_eq!(
        from_nginx.forwarded,
        [("x-forwarded-for", client.as_str()), ("x-forwarded-proto", "https"), ("x-real-ip", client.as_str()), ("host", HOST)]
            .map(|(n, v)| (n.to_string(), v.to_string()))
    );
    assert_eq!(from_xlb.forwarded, from_nginx.forwarded, "what the backends see");
    assert_eq!((from_nginx.too_large, from_xlb.too_large), (413, 413), "client_max_body_size 10M");
    // Sequential requests on idle backends: least_conn takes turns, so each of the three gets
    // a third, within the same bounds for both.
    let ports: Vec<u16> = lb.backends.iter().map(SocketAddr::port).collect();
    for (who, seen) in [("nginx", &from_nginx), ("xlb", &from_xlb)] {
        assert_eq!(seen.spread.keys().copied().collect::<Vec<_>>(), ports, "{who} used every backend: {:?}", seen.spread);
        for (port, n) in &seen.spread {
            assert!((7..=13).contains(n), "{who} sent {n} of {REQUESTS} requests to :{port}: {:?}", seen.spread);
        }
    }
    // stub_status's counters, on the admin API.
    let status = lb.topo.in_lb(|| http_get(ADMIN, "/status", IO_TIMEOUT)).unwrap();
    assert_eq!(status.status, 200);
    let lines: Vec<&str> = status.body.lines().collect();
    assert!(lines[0].starts_with("Active connections: ") && lines[1].trim() == "server accepts handled requests", "{}", status.body);
    assert!(lines.last().is_some_and(|l| l.starts_with("Reading: ") && l.contains(" Writing: ") && l.contains(" Waiting: ")), "{}", status.body);
}

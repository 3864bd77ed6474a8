//! The import as a table: one nginx snippet per mapped directive and per unsupported one, with
//! the TOML lines it must give or the diagnostic it must print. Every row's output is read back
//! by `Config::parse` and must give the very services the mapping built.
use std::path::Path;

use super::*;
use crate::config::Config;

const MAIN: &str = "/etc/nginx/nginx.conf";

/// Where a row's snippet goes in the base configuration.
#[derive(Clone, Copy)]
enum At {
    /// Replaces `least_conn;` in `upstream app`.
    Upstream,
    /// Replaces the upstream's two `server` lines.
    Servers,
    /// Inside the https server.
    Server,
    /// Inside its `location /`.
    Location,
    /// Inside `http`, after the https server.
    Http,
    /// At the top level, after `http`.
    Top,
}

/// An https site proxying to two backends: what every row changes one thing of.
fn base(at: At, snippet: &str) -> String {
    let put = |here: At, default: &str| -> String {
        if std::mem::discriminant(&here) == std::mem::discriminant(&at) { snippet.to_string() } else { default.to_string() }
    };
    format!(
        "http {{\n\
         upstream app {{\n{}\n{}\n}}\n\
         server {{\n\
         listen 443 ssl;\n\
         server_name example.com;\n\
         ssl_certificate /etc/ssl/site.pem;\n\
         ssl_certificate_key /etc/ssl/site.key;\n\
         add_header Strict-Transport-Security \"max-age=31536000\" always;\n\
         location / {{\n\
         proxy_pass http://app;\n\
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n{}\n}}\n{}\n}}\n{}\n}}\n{}\n",
        put(At::Upstream, "least_conn;"),
        put(At::Servers, "server 127.0.0.1:8001;\nserver 127.0.0.1:8002;"),
        put(At::Location, ""),
        put(At::Server, ""),
        put(At::Http, ""),
        put(At::Top, ""),
    )
}

fn options() -> Options {
    Options { address: Some("203.0.113.10".parse().unwrap()), interface: "eth0".into(), base: "/etc/nginx".into() }
}

fn run(text: &str) -> Result<Outcome, ParseError> {
    let tree = nginx::parse_text(Path::new(MAIN), text, &[])?;
    from_tree(Path::new(MAIN), &tree, &options())
}

/// The row's output, checked to read back as the services the mapping built.
fn outcome(text: &str) -> Outcome {
    let out = run(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    if out.completeness != Completeness::Impossible {
        let config = Config::parse(Path::new("xlb.toml"), &out.toml).unwrap_or_else(|e| panic!("{e}\n{}", out.toml));
        let built: Vec<_> = out.import.services.iter().map(|s| s.service.clone()).collect();
        assert_eq!(config.services, built, "{}", out.toml);
        assert_eq!(config.dataplane.interfaces, ["eth0"]);
    }
    out
}

fn messages(out: &Outcome) -> Vec<String> {
    out.import.diagnostics.iter().map(|d| d.to_string()).collect()
}

/// The diagnostics of `out` that the base configuration does not give too (wherever the row's
/// lines moved them).
fn added(out: &Outcome, base: &Outcome) -> Vec<String> {
    let seen: Vec<(Level, &str)> = base.import.diagnostics.iter().map(|d| (d.level, d.message.as_str())).collect();
    out.import.diagnostics.iter().filter(|d| !seen.contains(&(d.level, d.message.as_str()))).map(|d| d.to_string()).collect()
}

/// The line of `text` on which `snippet` starts.
fn line_of(text: &str, snippet: &str) -> usize {
    let at = text.find(&format!("\n{snippet}\n")).unwrap_or_else(|| panic!("{snippet:?} not in\n{text}"));
    2 + text[..at].matches('\n').count()
}

#[test]
fn base_imports_completely() {
    let out = outcome(&base(At::Top, ""));
    assert_eq!(out.completeness, Completeness::Complete, "{:?}", messages(&out));
    for line in [
        "name = \"example.com\"",
        "listen = \"203.0.113.10:443\"",
        "mode = \"https\"",
        "backends = [\"203.0.113.10:8001\", \"203.0.113.10:8002\"]",
        "max_fails = 1",
        "fail_timeout = \"10s\"",
        "check = \"tcp\"",
        "cert = \"/etc/ssl/site.pem\"",
        "key = \"/etc/ssl/site.key\"",
        "backend_header = false",
        "hsts = \"max-age=31536000\"",
        "frame_options = \"\"",
        "max_body_bytes = 1048576  # client_max_body_size",
    ] {
        assert!(out.toml.lines().any(|l| l == line), "{line}\n{}", out.toml);
    }
    assert!(out.toml.contains(&format!("# from server at {MAIN}:7 (listen 203.0.113.10:443 ssl, server_name example.com)")), "{}", out.toml);
    assert!(out.toml.contains(&format!("# backends from upstream app at {MAIN}:2")), "{}", out.toml);
}

/// Rows: where the snippet goes, the snippet, TOML lines the output must have, the diagnostics
/// it adds to the base's (`{line}` is the snippet's first line), and whether the import stays
/// complete.
type Row = (&'static str, At, &'static str, &'static [&'static str], &'static [&'static str], bool);

const ROWS: &[Row] = &[
    ("least_conn", At::Upstream, "least_conn;", &["backends = [\"203.0.113.10:8001\", \"203.0.113.10:8002\"]"], &[], true),
    ("round-robin", At::Upstream, "", &[], &["{main}:2: note: upstream app: nginx's round-robin becomes xlb's least connections, which takes turns the same way while backends are equally loaded and avoids a busy one"], true),
    ("random", At::Upstream, "random two least_conn;", &[], &["{main}:{line}: note: `random two least_conn`: xlb chooses the backend with the fewest connections (least_conn), which spreads as evenly while backends are equally loaded"], true),
    ("ip_hash", At::Upstream, "ip_hash;", &[], &["{main}:{line}: not carried over: `ip_hash`: xlb does not pin clients to a backend; it chooses the one with the fewest connections. Keep sessions in a store the app instances share (database, Redis) so that any instance can serve any client"], false),
    ("hash", At::Upstream, "hash $remote_addr consistent;", &[], &["{main}:{line}: not carried over: `hash $remote_addr consistent`: xlb does not pin clients to a backend; it chooses the one with the fewest connections. Keep sessions in a store the app instances share (database, Redis) so that any instance can serve any client"], false),
    ("keepalive", At::Upstream, "least_conn; keepalive 32;", &[], &["{main}:{line}: note: `keepalive 32`: xlb keeps idle connections to the backends open by itself"], true),
    ("max_fails fail_timeout", At::Servers, "server 127.0.0.1:8001 max_fails=3 fail_timeout=20s;\nserver 127.0.0.1:8002 max_fails=3 fail_timeout=20s;", &["max_fails = 3", "fail_timeout = \"20s\""], &[], true),
    ("max_fails=0", At::Servers, "server 127.0.0.1:8001 max_fails=0;", &["max_fails = 0", "backends = [\"203.0.113.10:8001\"]"], &[], true),
    ("slow_start", At::Servers, "server 127.0.0.1:8001 slow_start=30s;", &["slow_start = \"30s\""], &[], true),
    ("down", At::Servers, "server 127.0.0.1:8001;\nserver 127.0.0.1:8002 down;", &["backends = [\"203.0.113.10:8001\"]"], &["{main}:{line+1}: note: `server 127.0.0.1:8002 down`: marked down, so left out of backends; to keep it listed but idle, list it and run `xlb drain`"], true),
    ("backup", At::Servers, "server 127.0.0.1:8001;\nserver 127.0.0.1:8002 backup;", &["backends = [\"203.0.113.10:8001\"]"], &["{main}:{line+1}: not carried over: `server 127.0.0.1:8002 backup`: xlb has no backup servers, so it is left out; list it in backends to have it serve all the time"], false),
    ("weight", At::Servers, "server 127.0.0.1:8001 weight=3;\nserver 127.0.0.1:8002;", &["backends = [\"203.0.113.10:8001\", \"203.0.113.10:8002\"]"], &["{main}:{line}: not carried over: `server 127.0.0.1:8001 weight=3`: weight=3: xlb gives every backend an equal share, by least connections; run more instances of the app on the bigger machine, or leave the weight out"], false),
    ("localhost", At::Servers, "server localhost:8001;", &["backends = [\"203.0.113.10:8001\"]"], &["{main}:{line}: note: localhost:8001 is taken as 127.0.0.1:8001: xlb resolves no host names"], true),
    ("host name", At::Servers, "server 127.0.0.1:8001;\nserver app2.internal:8002;", &["backends = [\"203.0.113.10:8001\"]"], &["{main}:{line+1}: not carried over: `server app2.internal:8002`: app2.internal:8002 is not an IP address and port; xlb resolves no host names, so write the address"], false),
    ("unix socket", At::Servers, "server 127.0.0.1:8001;\nserver unix:/run/app.sock;", &[], &["{main}:{line+1}: not carried over: `server unix:/run/app.sock`: a unix socket; xlb forwards to TCP backends only, so have the app listen on a port"], false),
    ("http2", At::Server, "http2 on;", &[], &[], true),
    ("ssl_protocols narrowed", At::Server, "ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;", &[], &["{main}:{line}: note: `ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3`: narrowed to TLSv1.2 TLSv1.3, the versions xlb serves"], true),
    ("ssl_protocols 1.3 only", At::Server, "ssl_protocols TLSv1.3;", &[], &["{main}:{line}: not carried over: `ssl_protocols TLSv1.3`: xlb always serves both TLS 1.2 and TLS 1.3; it cannot leave one out"], false),
    ("ssl_ciphers", At::Server, "ssl_ciphers HIGH:!aNULL:!MD5;", &[], &["{main}:{line}: note: `ssl_ciphers HIGH:!aNULL:!MD5`: narrowed to xlb's own suites: TLS 1.3's, and for TLS 1.2 ECDHE with AES-GCM or ChaCha20-Poly1305"], true),
    ("X-Frame-Options", At::Server, "add_header Strict-Transport-Security \"max-age=31536000\" always;\nadd_header X-Frame-Options DENY always;", &["frame_options = \"DENY\"", "hsts = \"max-age=31536000\""], &[], true),
    ("add_header without always", At::Server, "add_header X-Content-Type-Options nosniff;", &["content_type_options = \"nosniff\"", "hsts = \"max-age=31536000\""], &["{main}:{line}: note: `add_header X-Content-Type-Options nosniff`: nginx adds it to 2xx and 3xx responses only (no `always`); xlb adds it to every response that lacks it"], true),
    ("Referrer-Policy", At::Location, "add_header Referrer-Policy no-referrer always;", &["referrer_policy = \"no-referrer\"", "hsts = \"\""], &[], true),
    ("X-Backend-Server", At::Server, "add_header X-Backend-Server $upstream_addr always;", &["backend_header = true", "hsts = \"max-age=31536000\""], &[], true),
    ("other header", At::Server, "add_header Content-Security-Policy \"default-src 'self'\" always;", &[], &["{main}:{line}: not carried over: `add_header Content-Security-Policy \"default-src 'self'\" always`: xlb adds only Strict-Transport-Security, X-Frame-Options, X-Content-Type-Options, Referrer-Policy and X-Backend-Server; have the app send Content-Security-Policy"], false),
    ("X-Forwarded-*", At::Location, "proxy_set_header Host $host;\nproxy_set_header X-Real-IP $remote_addr;\nproxy_set_header X-Forwarded-Proto $scheme;", &[], &[], true),
    ("other request header", At::Location, "proxy_set_header X-Tenant blue;", &[], &["{main}:{line}: not carried over: `proxy_set_header X-Tenant blue`: xlb sends Host, X-Real-IP and X-Forwarded-For/-Proto/-Host with their usual values and no other request headers; have the app derive X-Tenant from those"], false),
    ("proxy_connect_timeout", At::Location, "proxy_connect_timeout 7s;", &["[service.timeouts]", "backend_connect = \"7s\""], &[], true),
    ("proxy_read_timeout", At::Location, "proxy_read_timeout 90;", &["backend_response = \"1m 30s\""], &["{main}:{line}: note: `proxy_read_timeout 90` becomes timeouts.backend_response: xlb bounds the wait for the response head; nginx bounds each wait between two reads"], true),
    ("proxy_send_timeout", At::Location, "proxy_send_timeout 30s;", &[], &["{main}:{line}: note: `proxy_send_timeout 30s`: xlb bounds sending a request and its response head together, by timeouts.backend_response"], true),
    ("keepalive_timeout", At::Server, "keepalive_timeout 30s;", &["idle = \"30s\""], &[], true),
    ("client_header_timeout", At::Server, "client_header_timeout 15s;", &["request_header = \"15s\""], &[], true),
    ("client_max_body_size", At::Server, "client_max_body_size 10M;", &["max_body_bytes = 10485760  # client_max_body_size"], &[], true),
    ("client_max_body_size 0", At::Http, "client_max_body_size 0;", &[], &[], true),
    ("stub_status", At::Server, "location /nginx_status {\nstub_status;\nallow 127.0.0.1;\ndeny all;\n}", &["# stub_status at {main}:{line+1}: `curl http://127.0.0.1:9100/status` shows the same counters."], &["{main}:{line+1}: note: `stub_status` at location /nginx_status: xlb's admin API serves the same counters at http://127.0.0.1:9100/status (admin.listen, loopback only), not on the site"], true),
    ("same backends elsewhere", At::Server, "location = /health {\nproxy_pass http://app;\n}", &[], &[], true),
    ("redirect", At::Http, "server {\nlisten 80;\nserver_name example.com;\nreturn 301 https://$host$request_uri;\n}", &["name = \"example.com-http\"", "listen = \"203.0.113.10:80\"", "mode = \"redirect\""], &[], true),
    ("redirect 308", At::Http, "server {\nlisten 80;\nreturn 308 https://$server_name$request_uri;\n}", &["name = \"redirect-80\"", "mode = \"redirect\""], &["{main}:{line+2}: note: `return 308 https://$server_name$request_uri`: xlb's redirect answers 301"], true),
    ("redirect elsewhere", At::Http, "server {\nlisten 80;\nreturn 301 https://www.example.org$request_uri;\n}", &["mode = \"redirect\""], &["{main}:{line+2}: not carried over: `return 301 https://www.example.org$request_uri`: xlb redirects to https on the host the client asked for; to send clients to another name, have that name's certificate on the https service and link to it"], false),
    ("SNI", At::Http, "server {\nlisten 443 ssl;\nserver_name api.example.com;\nssl_certificate /etc/ssl/api.pem;\nssl_certificate_key /etc/ssl/api.key;\nlocation / {\nproxy_pass http://app;\nproxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n}\n}", &["certs = [{ cert = \"/etc/ssl/site.pem\", key = \"/etc/ssl/site.key\" }, { cert = \"/etc/ssl/api.pem\", key = \"/etc/ssl/api.key\" }]"], &["{main}:7: note: 2 servers on 203.0.113.10:443 become one service whose certificates the client's SNI picks among; the first is for clients without SNI"], true),
    ("Let's Encrypt", At::Http, "server {\nlisten 8443 ssl;\nserver_name shop.example.com www.shop.example.com;\nssl_certificate /etc/letsencrypt/live/shop.example.com/fullchain.pem;\nssl_certificate_key /etc/letsencrypt/live/shop.example.com/privkey.pem;\nadd_header X-Frame-Options DENY always;\nlocation / {\nproxy_pass http://app;\nproxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n}\n}", &["cert = \"/etc/letsencrypt/live/shop.example.com/fullchain.pem\"", "# acme = { directory = \"https://acme-v02.api.letsencrypt.org/directory\", contact = \"mailto:you@example.com\", domains = [\"shop.example.com\", \"www.shop.example.com\"], challenge = \"tls-alpn-01\" }"], &[], true),
    ("stream l4", At::Top, "stream {\nupstream db {\nserver 127.0.0.1:6432;\n}\nserver {\nlisten 5432;\nproxy_pass db;\nproxy_timeout 10m;\n}\n}", &["name = \"db-5432\"", "mode = \"l4\"", "backends = [\"203.0.113.10:6432\"]", "max_fails = 1"], &["{main}:{line+1}: note: upstream db: nginx's round-robin becomes xlb's least connections, which takes turns the same way while backends are equally loaded and avoids a busy one", "{main}:{line+2}: note: backend 127.0.0.1:6432 becomes 203.0.113.10:6432: xlb forwards to the backends on this host's own address, not loopback; have the app instance listen on 203.0.113.10:6432 (or 0.0.0.0:6432)", "{main}:{line+7}: note: `proxy_timeout 10m`: xlb's l4 path forwards packets and keeps no timeouts of its own; connections last as long as client and backend keep them"], true),
    ("plain http proxy", At::Http, "server {\nlisten 8080;\nlocation / {\nproxy_pass http://app;\n}\n}", &["name = \"http-8080\"", "listen = \"203.0.113.10:8080\"", "mode = \"l4\""], &["{main}:{line}: note: plain HTTP proxying on 203.0.113.10:8080 becomes an l4 service: the kernel forwards the connections, so no X-Forwarded-* headers are added and nothing at the HTTP level (headers, timeouts, body size) applies; serve the site over https for those"], true),
    ("access_log", At::Server, "access_log /var/log/nginx/site.log;", &[], &["{main}:{line}: note: `access_log /var/log/nginx/site.log`: xlb writes no access log; its log goes to the journal (stderr), and `xlb status` and /metrics count requests by response class"], true),
    // What is not carried over, each with what to do instead.
    ("static files", At::Server, "location /static/ {\nroot /srv/www;\n}", &[], &["{main}:{line+1}: not carried over: `root /srv/www`: xlb serves no files; serve them from the app"], false),
    ("rewrite", At::Server, "rewrite ^/old/(.*)$ /new/$1 permanent;", &[], &["{main}:{line}: not carried over: `rewrite ^/old/(.*)$ /new/$1 permanent`: xlb does not rewrite or route requests by path, header or variable; every request goes to the service's backends, so do it in the app"], false),
    ("if", At::Location, "if ($http_user_agent ~ bot) {\nreturn 403;\n}", &[], &["{main}:{line}: not carried over: `if ($http_user_agent ~ bot)`: xlb does not rewrite or route requests by path, header or variable; every request goes to the service's backends, so do it in the app"], false),
    ("proxy_cache", At::Location, "proxy_cache site;", &[], &["{main}:{line}: not carried over: `proxy_cache site`: xlb caches nothing; have the app send Cache-Control headers, or keep a cache in front of it"], false),
    ("auth_basic", At::Location, "auth_basic \"staff only\";", &[], &["{main}:{line}: not carried over: `auth_basic \"staff only\"`: xlb does no authentication; do it in the app"], false),
    ("auth_request", At::Location, "auth_request /auth;", &[], &["{main}:{line}: not carried over: `auth_request /auth`: xlb does no authentication; do it in the app"], false),
    ("limit_req", At::Location, "limit_req zone=one burst=5;", &[], &["{main}:{line}: not carried over: `limit_req zone=one burst=5`: xlb has no request or connection rate limits per client; limit in the app or with nftables meters"], false),
    ("lua", At::Location, "access_by_lua_block {\nngx.exit(403)\n}", &[], &["{main}:{line}: not carried over: `access_by_lua_block`: xlb runs no scripts; move the logic into the app"], false),
    ("gzip", At::Http, "gzip on;", &[], &["{main}:{line}: not carried over: `gzip on`: xlb does not compress responses; have the app compress them"], false),
    ("allow/deny", At::Location, "deny 192.0.2.0/24;", &[], &["{main}:{line}: not carried over: `deny 192.0.2.0/24`: xlb has no access lists per location; filter client addresses with nftables"], false),
    ("error_page", At::Server, "error_page 502 /502.html;", &[], &["{main}:{line}: not carried over: `error_page 502 /502.html`: xlb passes the backends' error responses on as they are; make the app render its error pages"], false),
    ("fastcgi", At::Server, "location ~ \\.php$ {\nfastcgi_pass 127.0.0.1:9000;\n}", &[], &["{main}:{line+1}: not carried over: `fastcgi_pass 127.0.0.1:9000`: xlb speaks HTTP to its backends only; have the app listen for HTTP"], false),
    ("other backends", At::Server, "location /api/ {\nproxy_pass http://127.0.0.1:9000;\n}", &[], &["{main}:{line+1}: not carried over: location /api/ proxies to other backends than location /; xlb sends every request of a service to one set of backends, so run them as one app or give them their own address"], false),
    ("proxy_pass with a path", At::Server, "location /v1/ {\nproxy_pass http://app/api/;\n}", &[], &["{main}:{line+1}: not carried over: `proxy_pass http://app/api/`: the path after the address rewrites the request path; xlb forwards paths unchanged, so have the app serve them as they come"], false),
    ("https backend", At::Server, "location /x/ {\nproxy_pass https://app;\n}", &[], &["{main}:{line+1}: not carried over: `proxy_pass https://app`: xlb speaks plain HTTP to its backends, which are on this host; have them listen for HTTP"], false),
    ("http3", At::Server, "listen 443 quic;", &[], &["{main}:{line}: not carried over: `listen 443 quic`: xlb serves no HTTP/3; clients use HTTP/2 or 1.1 over TCP"], false),
    ("IPv6 listen", At::Server, "listen [::]:443 ssl;", &[], &["{main}:{line}: not carried over: `listen [::]:443 ssl`: an xlb service listens on one address, here the IPv4 one of --address; for IPv6 clients add a service with this host's IPv6 address and IPv6 backends"], false),
    ("acme webroot", At::Http, "server {\nlisten 80;\nlocation /.well-known/acme-challenge/ {\nroot /var/www/letsencrypt;\n}\nlocation / {\nreturn 301 https://$host$request_uri;\n}\n}", &["mode = \"redirect\""], &["{main}:{line+3}: not carried over: `root /var/www/letsencrypt`: certbot renews the certificates through this location on port 80, which xlb's redirect service takes over; use the commented tls.acme alternative (xlb answers the challenges itself), or renew with `certbot --standalone --http-01-port` behind another port"], false),
    ("unknown directive", At::Location, "mirror /copy;", &[], &["{main}:{line}: not carried over: `mirror /copy`: xlb passes responses on unchanged (but for the security headers it adds); change them in the app"], false),
];

#[test]
fn snippet_table() {
    let base_outcome = outcome(&base(At::Top, ""));
    let mut failures = Vec::new();
    for &(name, at, snippet, lines, expected, complete) in ROWS {
        let text = base(at, snippet);
        let out = outcome(&text);
        let line = if snippet.is_empty() { 0 } else { line_of(&text, snippet) };
        let fill = |s: &str| {
            let mut s = s.replace("{main}", MAIN);
            for k in (1..8).rev() {
                s = s.replace(&format!("{{line+{k}}}"), &(line + k).to_string());
            }
            s.replace("{line}", &line.to_string())
        };
        for l in lines {
            let l = fill(l);
            if !out.toml.lines().any(|t| t == l) {
                failures.push(format!("{name}: no line {l:?} in\n{}", out.toml));
            }
        }
        let got = added(&out, &base_outcome);
        let want: Vec<String> = expected.iter().map(|e| fill(e)).collect();
        let (mut g, mut w) = (got.clone(), want.clone());
        g.sort();
        w.sort();
        if g != w {
            failures.push(format!("{name}: diagnostics\n  got  {got:#?}\n  want {want:#?}"));
        }
        let is_complete = out.completeness == Completeness::Complete;
        if is_complete != complete {
            failures.push(format!("{name}: completeness {:?}", out.completeness));
        }
    }
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), ROWS.len(), failures.join("\n"));
}

#[test]
fn the_acme_alternative_parses_when_uncommented() {
    let text = base(At::Http, "server {\nlisten 80;\nreturn 301 https://$host$request_uri;\n}")
        .replace("/etc/ssl/site.pem", "/etc/letsencrypt/live/example.com/fullchain.pem")
        .replace("/etc/ssl/site.key", "/etc/letsencrypt/live/example.com/privkey.pem");
    let out = outcome(&text);
    let uncommented: String = out
        .toml
        .lines()
        .filter(|l| !l.starts_with("cert = ") && !l.starts_with("key = "))
        .map(|l| l.strip_prefix("# acme = ").map(|a| format!("acme = {a}")).unwrap_or(l.to_string()))
        .collect::<Vec<_>>()
        .join("\n");
    let config = Config::parse(Path::new("xlb.toml"), &uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    let Some(crate::config::Https { tls: crate::config::Tls::Acme(a), .. }) = &config.services[0].https else { panic!("{uncommented}") };
    assert_eq!(a.domains, ["example.com"]);
    assert_eq!(a.challenge, crate::config::ChallengeKind::Http01);
}

/// Whether `nginx -t` accepts `text` as its http/stream part; `None` without nginx installed or
/// root (nginx -t creates its temporary directories under /var/lib/nginx).
fn nginx_accepts(text: &str) -> Option<bool> {
    let nginx = Path::new("/usr/sbin/nginx");
    if !nginx.exists() || !nix::unistd::geteuid().is_root() {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("xlb-import-t-{}-{:?}", std::process::id(), std::thread::current().id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, format!("error_log stderr;\npid {}/nginx.pid;\nevents {{}}\n{text}", dir.display())).unwrap();
    let out = std::process::Command::new(nginx).args(["-t", "-q", "-e", "stderr", "-p"]).arg(&dir).arg("-c").arg(&conf).output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    Some(out.status.success())
}

/// Input nginx refuses (checked with `nginx -t` where nginx is installed) is refused with the
/// file, the line and the reason, and nothing is imported.
#[test]
fn bad_input_is_refused_with_its_line() {
    let rows: &[(&str, &str)] = &[
        ("http {\nserver {\nlisten;\n}\n}\n", "/etc/nginx/nginx.conf:3: invalid number of arguments in \"listen\" directive"),
        ("http {\nupstream {\nserver 127.0.0.1:1;\n}\n}\n", "/etc/nginx/nginx.conf:2: invalid number of arguments in \"upstream\" directive"),
        ("http {\nupstream a {\nserver;\n}\n}\n", "/etc/nginx/nginx.conf:3: invalid number of arguments in \"server\" directive"),
        ("http {\nupstream a {\nserver 127.0.0.1:1 max_fails=x;\n}\n}\n", "/etc/nginx/nginx.conf:3: invalid parameter \"max_fails=x\""),
        ("http {\nupstream a { server 127.0.0.1:1; }\nupstream a { server 127.0.0.1:2; }\n}\n", "/etc/nginx/nginx.conf:3: duplicate upstream \"a\" (the first is at /etc/nginx/nginx.conf:2)"),
        ("server {\nlisten 80;\n}\n", "/etc/nginx/nginx.conf:1: \"server\" directive is not allowed here; it goes inside http { } (or stream { })"),
        ("http {\nlocation / {\n}\n}\n", "/etc/nginx/nginx.conf:2: \"location\" directive is not allowed here; it goes inside a server { }"),
        ("http {\nserver {\nlisten 80;\nclient_max_body_size 10X;\nlocation / { proxy_pass http://127.0.0.1:1; }\n}\n}\n", "/etc/nginx/nginx.conf:4: \"client_max_body_size\" directive invalid value"),
        ("http {\nserver {\nlisten 80\n}\n", "/etc/nginx/nginx.conf:4: unexpected \"}\": the directive before it has no \";\"; add one"),
        ("http {\nserver {\nlisten 80;\n}\n", "/etc/nginx/nginx.conf:1: \"http\" block has no closing \"}\" before the end of the file; add it"),
    ];
    // The control: nginx -t accepts a good file in the same frame, so its refusals are the rows'.
    assert_ne!(nginx_accepts("http {\nserver {\nlisten 8080;\nlocation / { proxy_pass http://127.0.0.1:1; }\n}\n}\n"), Some(false));
    for (text, expected) in rows {
        assert_eq!(run(text).map(|o| o.toml).unwrap_err().to_string(), *expected, "{text}");
        assert_ne!(nginx_accepts(text), Some(true), "nginx -t accepts what the import refuses:\n{text}");
    }
    // Every address of a wildcard listen needs --address.
    let tree = nginx::parse_text(Path::new(MAIN), &base(At::Top, ""), &[]).unwrap();
    let e = from_tree(Path::new(MAIN), &tree, &Options { address: None, ..options() }).unwrap_err().to_string();
    assert_eq!(e, "/etc/nginx/nginx.conf:8: `listen 443 ssl` listens on every address, but an xlb service listens on one; give it with --address IP (this host's public IPv4 address, see `ip addr`)");
    // Nothing to import: exit status 1, nothing written.
    let out = run("http {\nserver {\nlisten 80;\nroot /srv/www;\n}\n}\n").unwrap();
    assert_eq!((out.completeness, out.toml.as_str()), (Completeness::Impossible, ""));
    assert_eq!(out.completeness.exit_code(), 1);
}

/// The incumbent setup (INCUMBENT-NGINX-SETUP.md) as its nginx files: complete, with the
/// redirect and the https service as the setup describes them.
#[test]
fn incumbent_setup_imports_completely() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/import/incumbent");
    let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap();
    let (up, vhost) = (read("conf.d/myhibachi-upstream.conf"), read("vhosts/myhibachi.com/conf/vhost_nginx.conf"));
    let tree = nginx::parse_text(
        Path::new(MAIN),
        &read("nginx.conf"),
        &[("/etc/nginx/conf.d/myhibachi-upstream.conf", &up), ("/etc/nginx/vhosts/myhibachi.com/conf/vhost_nginx.conf", &vhost)],
    )
    .unwrap();
    let out = from_tree(Path::new(MAIN), &tree, &options()).unwrap();
    assert_eq!(out.completeness, Completeness::Complete, "{:#?}", messages(&out));
    let config = Config::parse(Path::new("xlb.toml"), &out.toml).unwrap();
    let [redirect, site] = &config.services[..] else { panic!("{}", out.toml) };
    assert_eq!((redirect.mode, redirect.listen.port()), (crate::config::ServiceMode::Redirect, 80));
    assert_eq!(site.backends.iter().map(|b| b.port()).collect::<Vec<_>>(), [8001, 8002, 8003]);
    assert_eq!((site.max_fails, site.fail_timeout), (2, std::time::Duration::from_secs(30)));
    let h = site.https.as_ref().unwrap();
    assert!(h.http.backend_header);
    assert_eq!(h.http, crate::config::HttpHeaders::default());
    assert_eq!(h.limits.max_body_bytes, Some(10 << 20));
    assert_eq!(h.timeouts.backend_connect, std::time::Duration::from_secs(5));
    assert!(out.toml.contains("# from server at /etc/nginx/vhosts/myhibachi.com/conf/vhost_nginx.conf:9 (listen 203.0.113.10:443 ssl"), "{}", out.toml);
    assert!(out.toml.contains("# backends from upstream myhibachi_backend at /etc/nginx/conf.d/myhibachi-upstream.conf:2"));
}

#[test]
fn nginx_time_and_size() {
    assert_eq!(map::nginx_time("30s"), Some(std::time::Duration::from_secs(30)));
    assert_eq!(map::nginx_time("1h30m"), Some(std::time::Duration::from_secs(5400)));
    assert_eq!(map::nginx_time("500ms"), Some(std::time::Duration::from_millis(500)));
    assert_eq!(map::nginx_time("60"), Some(std::time::Duration::from_secs(60)));
    assert_eq!(map::nginx_time("1x"), None);
    assert_eq!(map::nginx_size("10M"), Some(10 << 20));
    assert_eq!(map::nginx_size("8k"), Some(8 << 10));
    assert_eq!(map::nginx_size("M"), None);
}

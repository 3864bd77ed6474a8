//! The imported services as `xlb.toml` text, in the config reference's layout, with a comment
//! above each service naming the nginx file:line it came from.
//!
//! Every key written is one `Config::parse` reads back to the same value (the tests check that
//! on every row); defaults are written out where nginx's own default differs from xlb's, so that
//! the file says what it does.
use std::fmt::Write as _;

use crate::config::{Acme, DEFAULT_ADMIN_LISTEN, Health, HttpHeaders, Https, Limits, Service, ServiceMode, Timeouts, Tls};

use super::map::Import;

/// A TOML string literal.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn duration(d: std::time::Duration) -> String {
    quote(&humantime::format_duration(d).to_string())
}

pub fn toml(import: &Import, source: &str) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "# xlb.toml imported from the nginx configuration {source} by `xlb import nginx`.");
    let _ = writeln!(w, "# What was not carried over was listed when it ran; `xlb check --config FILE` checks this file.");
    let _ = writeln!(w);
    let _ = writeln!(w, "[dataplane]");
    let _ = writeln!(w, "interfaces = [{}]  # where clients' packets arrive (see `ip link`)", quote(&import.interface));
    let _ = writeln!(w);
    let _ = writeln!(w, "[admin]");
    if let Some(at) = &import.status {
        let _ = writeln!(w, "# stub_status at {at}: `curl http://{DEFAULT_ADMIN_LISTEN}/status` shows the same counters.");
    }
    let _ = writeln!(w, "listen = {}", quote(&DEFAULT_ADMIN_LISTEN.to_string()));
    for s in &import.services {
        let _ = writeln!(w);
        for line in &s.origin {
            let _ = writeln!(w, "# {line}");
        }
        service(w, &s.service, s.acme.as_ref());
    }
    out
}

fn service(w: &mut String, s: &Service, acme: Option<&Acme>) {
    let Service { name, listen, mode, backends, health, max_fails, fail_timeout, slow_start, https } = s;
    let _ = writeln!(w, "[[service]]");
    let _ = writeln!(w, "name = {}", quote(name));
    let _ = writeln!(w, "listen = {}", quote(&listen.to_string()));
    let _ = writeln!(w, "mode = {}", quote(mode.as_str()));
    if *mode == ServiceMode::Redirect {
        let _ = writeln!(w, "# 301 to https://host/path?query; also answers ACME HTTP-01 challenges");
        return;
    }
    let list: Vec<String> = backends.iter().map(|b| quote(&b.to_string())).collect();
    let _ = writeln!(w, "backends = [{}]", list.join(", "));
    let _ = writeln!(w, "max_fails = {max_fails}");
    let _ = writeln!(w, "fail_timeout = {}", duration(*fail_timeout));
    if !slow_start.is_zero() {
        let _ = writeln!(w, "slow_start = {}", duration(*slow_start));
    }
    let Health { check, path, interval, timeout, rise, fall } = health;
    let _ = writeln!(w, "[service.health]");
    let _ = writeln!(w, "check = {}", quote(match check {
        crate::config::CheckKind::Http => "http",
        crate::config::CheckKind::Tcp => "tcp",
    }));
    let defaults = Health::default();
    if *path != defaults.path {
        let _ = writeln!(w, "path = {}", quote(path));
    }
    if (*interval, *timeout, *rise, *fall) != (defaults.interval, defaults.timeout, defaults.rise, defaults.fall) {
        let _ = writeln!(w, "interval = {}\ntimeout = {}\nrise = {rise}\nfall = {fall}", duration(*interval), duration(*timeout));
    }
    if let Some(h) = https {
        https_tables(w, h, acme);
    }
}

fn https_tables(w: &mut String, h: &Https, acme: Option<&Acme>) {
    let Https { tls, http, timeouts, limits, max_fails: _, fail_timeout: _ } = h;
    let _ = writeln!(w, "[service.tls]");
    match tls {
        Tls::Files(files) if files.len() == 1 => {
            let _ = writeln!(w, "cert = {}", quote(&files[0].cert.to_string_lossy()));
            let _ = writeln!(w, "key = {}", quote(&files[0].key.to_string_lossy()));
        }
        Tls::Files(files) => {
            let _ = writeln!(w, "# picked by the client's SNI; the first is for clients without SNI");
            let pairs: Vec<String> = files
                .iter()
                .map(|f| format!("{{ cert = {}, key = {} }}", quote(&f.cert.to_string_lossy()), quote(&f.key.to_string_lossy())))
                .collect();
            let _ = writeln!(w, "certs = [{}]", pairs.join(", "));
        }
        Tls::Acme(a) => {
            let _ = writeln!(w, "acme = {}", acme_table(a));
        }
    }
    if let Some(a) = acme {
        let _ = writeln!(w, "# These are certbot's Let's Encrypt files: they keep working while certbot renews them.");
        let _ = writeln!(w, "# Or have xlb get and renew them itself (then disable certbot's timer), instead of cert/key:");
        let _ = writeln!(w, "# acme = {}", acme_table(a).replacen("domains", "contact = \"mailto:you@example.com\", domains", 1));
        let _ = writeln!(w, "# and, at the top level, where xlb keeps the account and certificates:");
        let _ = writeln!(w, "# [acme]");
        let _ = writeln!(w, "# state_dir = {}", quote(crate::config::DEFAULT_ACME_STATE_DIR));
    }
    let HttpHeaders { backend_header, hsts, frame_options, content_type_options, referrer_policy } = http;
    let header = |v: &Option<String>| quote(v.as_deref().unwrap_or(""));
    let _ = writeln!(w, "[service.http]  # \"\" leaves a header out, as nginx did");
    let _ = writeln!(w, "backend_header = {backend_header}");
    let _ = writeln!(w, "hsts = {}", header(hsts));
    let _ = writeln!(w, "frame_options = {}", header(frame_options));
    let _ = writeln!(w, "content_type_options = {}", header(content_type_options));
    let _ = writeln!(w, "referrer_policy = {}", header(referrer_policy));
    if timeouts != &Timeouts::default() {
        let d = Timeouts::default();
        let _ = writeln!(w, "[service.timeouts]");
        let Timeouts { handshake, request_header, idle, backend_connect, backend_response } = timeouts;
        for (key, v, default) in [
            ("handshake", handshake, d.handshake),
            ("request_header", request_header, d.request_header),
            ("idle", idle, d.idle),
            ("backend_connect", backend_connect, d.backend_connect),
            ("backend_response", backend_response, d.backend_response),
        ] {
            if *v != default {
                let _ = writeln!(w, "{key} = {}", duration(*v));
            }
        }
    }
    if limits != &Limits::default() {
        let _ = writeln!(w, "[service.limits]");
        match limits.max_body_bytes {
            Some(n) => {
                let _ = writeln!(w, "max_body_bytes = {n}  # client_max_body_size");
            }
            None => {
                let _ = writeln!(w, "# no max_body_bytes: client_max_body_size 0, unlimited");
            }
        }
    }
}

fn acme_table(a: &Acme) -> String {
    let domains: Vec<String> = a.domains.iter().map(|d| quote(d)).collect();
    let mut t = format!("{{ directory = {}", quote(&a.directory));
    if !a.contact.is_empty() {
        let c: Vec<String> = a.contact.iter().map(|c| quote(c)).collect();
        t += &format!(", contact = [{}]", c.join(", "));
    }
    t += &format!(", domains = [{}]", domains.join(", "));
    if a.challenge != crate::config::ChallengeKind::Http01 {
        t += &format!(", challenge = {}", quote(a.challenge.as_str()));
    }
    t += " }";
    t
}

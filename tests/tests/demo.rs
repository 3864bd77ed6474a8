//! The demo of `cargo xtask run`, run as users run it (the same function, with its output
//! captured): both paths answer, the HTTPS requests over HTTP/1.1 and HTTP/2 name their
//! backend and carry the headers the proxy adds, the redirect points at https, the status view
//! shows the HTTPS service's lines, and nothing it created is left behind.

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use xlb_tests::demo::{BACKEND_PORTS, SITE};

/// The demo's output, shared with the `done` callback that watches it.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn demo_shows_both_paths_and_cleans_up() {
    xlb_tests::root_or_skip!();
    const VIEW: &str = "live `xlb status` every second";
    let out = Captured::default();
    let start = Instant::now();
    // Stops after two status views (or at 90 s, which fails below).
    let watched = out.clone();
    let done = move || watched.text().matches(VIEW).count() >= 2 || start.elapsed() > Duration::from_secs(90);
    xlb_tests::demo::run(&mut out.clone(), &done).unwrap_or_else(|e| panic!("the demo failed: {e:#}\n{}", out.text()));
    let text = out.text();
    eprintln!("{text}");
    assert!(text.matches(VIEW).count() >= 2, "the demo never reached its status view within 90 s:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    let backends: Vec<String> = BACKEND_PORTS.iter().map(|p| format!("198.18.0.1:{p}")).collect();

    // The L4 burst: every request answered, by every instance.
    let l4: Vec<&&str> = lines.iter().filter(|l| l.starts_with("GET http://198.18.0.1:8080/")).collect();
    assert_eq!(l4.len(), 30, "L4 requests:\n{text}");
    for app in ["app-1", "app-2", "app-3"] {
        assert!(l4.iter().any(|l| l.ends_with(&format!("→ {app}"))), "{app} served no L4 request:\n{text}");
    }
    assert!(!l4.iter().any(|l| l.contains("error")), "L4 request failed:\n{text}");

    // HTTPS over both protocols: 200 from a named backend, with the proxy's headers.
    for (proto, version) in [("HTTP/1.1", "HTTP/1.1"), ("HTTP/2", "HTTP/2.0")] {
        let prefix = format!("GET https://{SITE}/echo {proto} #");
        let answered: Vec<&&str> = lines.iter().filter(|l| l.starts_with(&prefix)).collect();
        assert_eq!(answered.len(), 3, "{proto} requests:\n{text}");
        for line in &answered {
            assert!(line.contains(&format!("→ 200 {version}, X-Backend-Server: ")), "{proto}: {line}");
            let server = line.rsplit(' ').next().unwrap();
            assert!(backends.iter().any(|b| b == server), "{proto}: X-Backend-Server {server} is no backend: {line}");
        }
        let first = lines.iter().position(|l| l.starts_with(&format!("{prefix}1 "))).unwrap();
        let (added, seen) = (lines[first + 1], lines[first + 2]);
        for header in [
            "strict-transport-security: max-age=31536000; includeSubDomains;",
            "x-frame-options: SAMEORIGIN;",
            "x-content-type-options: nosniff;",
            "referrer-policy: strict-origin-when-cross-origin;",
        ] {
            assert!(added.contains(header), "{proto}: {header} not added: {added}");
        }
        for header in ["x-forwarded-for: 198.18.0.2;", "x-real-ip: 198.18.0.2;", "x-forwarded-proto: https;", &format!("host: {SITE};")] {
            assert!(seen.contains(header), "{proto}: the backend did not see {header}: {seen}");
        }
    }
    assert!(
        text.contains("GET http://198.18.0.1:80/login?next=/ → 301 Location: https://198.18.0.1/login?next=/"),
        "the redirect:\n{text}"
    );

    // The status view's HTTPS lines, after the requests above.
    let view = &text[text.rfind(VIEW).unwrap()..];
    for want in ["mode https", "tls handshakes: ", "2xx 6 ", "mode redirect", "3xx 1 "] {
        assert!(view.contains(want), "status view lacks {want:?}:\n{view}");
    }

    // Nothing left behind: namespaces, pins, files.
    let mut list = std::process::Command::new("ip");
    list.args(["netns", "list"]);
    let netns = xlb_tests::run_ok(list, "ip netns list");
    let ours = format!("demo-{}-", std::process::id());
    assert!(!netns.contains(&ours), "the demo left namespaces: {netns}");
    let files = std::env::temp_dir().join(format!("xlb-demo-{}", std::process::id()));
    assert!(!files.exists(), "the demo left its files in {}", files.display());
}

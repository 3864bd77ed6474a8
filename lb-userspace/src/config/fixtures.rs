//! Config texts and helpers shared by the tests of every section.
use std::path::Path;

use super::{Config, ConfigError};

pub(super) const PATH: &str = "/etc/xlb/xlb.toml";
pub(super) const EXAMPLE: &str = r#"[dataplane]
interfaces = ["eth0"]        # XDP ingress + TC egress
xdp_mode = "auto"            # auto | native | generic
max_flows = 1048576          # conntrack capacity
pin_path = "/sys/fs/bpf/xlb" # optional

[admin]
listen = "127.0.0.1:9100"

[[service]]
name = "web"
listen = "203.0.113.10:80"
mode = "l4"
backends = ["203.0.113.10:8001", "203.0.113.10:8002", "203.0.113.10:8003"]

[service.health]
check = "http"
path = "/health"
interval = "1s"
timeout = "500ms"
rise = 2
fall = 2
"#;

pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new(PATH), text)
}

pub(super) fn err(text: &str) -> String {
    parse(text)
        .expect_err("config should be rejected")
        .to_string()
}

/// `[dataplane]` on lines 1-2, then a service "web" whose first body line is line 6.
pub(super) fn service(body: &str) -> String {
    format!("[dataplane]\ninterfaces = [\"lo\"]\n\n[[service]]\nname = \"web\"\n{body}\n")
}

pub(super) fn web(backends: &str, health: &str) -> String {
    service(&format!(
        "listen = \"203.0.113.10:80\"\nbackends = [{backends}]\n{health}"
    ))
}

pub(super) const HTTPS: &str = r#"[dataplane]
interfaces = ["eth0"]

[[service]]
name = "site"
listen = "203.0.113.10:443"
mode = "https"
backends = ["203.0.113.10:8001", "203.0.113.10:8002", "203.0.113.10:8003"]
[service.tls]
cert = "/etc/xlb/site.crt"
key = "/etc/xlb/site.key"
[service.http]
backend_header = true
hsts = "max-age=31536000; includeSubDomains"

[[service]]
name = "site-http"
listen = "203.0.113.10:80"
mode = "redirect"
"#;

pub(super) const ALERTS: &str = r#"
[alerts]
max_per_minute = 5

[alerts.email]
host = "smtp.example.com"
tls = "starttls"
from = "xlb <xlb@example.com>"
to = ["ops@example.com", "oncall@example.com"]
username = "xlb"
password_file = "/etc/xlb/smtp-password"

[alerts.webhook]
url = "https://hooks.example.com/xlb"
timeout = "3s"
"#;

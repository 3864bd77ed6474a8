//! `[admin]`: where the admin API listens.
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Deserializer};

use super::{from_str_with, parse_socket_addr};

pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9100);

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admin {
    #[serde(deserialize_with = "listen")]
    pub listen: SocketAddr,
}

impl Default for Admin {
    fn default() -> Admin {
        Admin { listen: DEFAULT_ADMIN_LISTEN }
    }
}

/// The admin API has no authentication: loopback only.
fn listen<'de, D: Deserializer<'de>>(de: D) -> Result<SocketAddr, D::Error> {
    from_str_with(de, |text| {
        let addr = parse_socket_addr(text, "admin.listen", "127.0.0.1:9100")?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "admin.listen \"{addr}\" is not a loopback address; the admin API has no \
                 authentication, so it only listens on 127.0.0.1 or [::1] (e.g. \"127.0.0.1:{}\")",
                addr.port()
            ));
        }
        Ok(addr)
    })
}

#[cfg(test)]
mod tests {
    use crate::config::fixtures::*;

    #[test]
    fn admin_must_be_loopback() {
        assert_eq!(
            err(&EXAMPLE.replace("127.0.0.1:9100", "0.0.0.0:9100")),
            "/etc/xlb/xlb.toml:8: admin.listen \"0.0.0.0:9100\": 0.0.0.0 is not a unicast address; give one \
             specific address of this host, e.g. \"127.0.0.1:9100\""
        );
        assert_eq!(
            err(&EXAMPLE.replace("127.0.0.1:9100", "192.0.2.1:9100")),
            "/etc/xlb/xlb.toml:8: admin.listen \"192.0.2.1:9100\" is not a loopback address; the admin API has \
             no authentication, so it only listens on 127.0.0.1 or [::1] (e.g. \"127.0.0.1:9100\")"
        );
        assert!(
            err(&EXAMPLE.replace("127.0.0.1:9100", "localhost:9100"))
                .contains("host names are not resolved")
        );
    }
}

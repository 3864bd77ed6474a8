//! The checks that look at the host: the interfaces exist, the backends are local addresses, the
//! certificate files load; and the files read for secrets and trust.
use std::{collections::HashSet, net::IpAddr, path::Path};

use super::{Config, ConfigError, Https, Secret, Tls};

impl Config {
    /// Every interface exists and every backend address is assigned on this host.
    pub fn check_system(&self) -> Result<(), ConfigError> {
        let error = |line: Option<&usize>, message: String| ConfigError {
            path: self.path.clone(),
            line: line.copied(),
            message,
        };
        for (i, name) in self.dataplane.interfaces.iter().enumerate() {
            if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
                let existing = nix::net::if_::if_nameindex()
                    .map(|list| {
                        list.iter()
                            .map(|i| i.name().to_string_lossy().into_owned())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                return Err(error(
                    self.lines.interfaces.get(i),
                    format!(
                        "dataplane.interfaces: no network interface \"{name}\" on this host; \
                         use one of: {} (see `ip link`)",
                        existing.join(", ")
                    ),
                ));
            }
        }
        for service in &self.services {
            if let Some(Https { tls: Tls::Files(files), .. }) = &service.https {
                for pair in files {
                    // Loaded exactly as serving loads them (`certs` is a leaf module).
                    if let Err(e) = crate::certs::load_files(&pair.cert, &pair.key) {
                        return Err(error(None, format!("service \"{}\" [service.tls]: {e:#}", service.name)));
                    }
                }
            }
        }
        let local = local_addresses().map_err(|e| {
            error(
                None,
                format!("cannot list this host's addresses (getifaddrs): {e}"),
            )
        })?;
        for (s, service) in self.services.iter().enumerate() {
            for (b, backend) in service.backends.iter().enumerate() {
                let ip = backend.ip();
                if ip.is_loopback() || local.contains(&ip) {
                    continue;
                }
                let mut have: Vec<String> = local.iter().map(IpAddr::to_string).collect();
                have.sort();
                return Err(error(
                    self.lines.backends.get(s).and_then(|l| l.get(b)),
                    format!(
                        "service \"{}\" backend \"{backend}\": not an address of this host; xlb \
                         balances to same-host backends only — use an address from `ip addr` \
                         (this host has {})",
                        service.name,
                        have.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Reads the files the config names for credentials and trust (`alerts.email.password_file`,
    /// `alerts.email.ca_file`, `alerts.webhook.ca_file`).
    pub fn read_secrets(&mut self) -> Result<(), ConfigError> {
        let path = self.path.clone();
        let error = |message: String| ConfigError { path: path.clone(), line: None, message };
        let read_ca = |key: &str, file: &Path| -> Result<Vec<u8>, ConfigError> {
            let pem = std::fs::read(file)
                .map_err(|e| error(format!("{key} \"{}\": cannot read it: {e}", file.display())))?;
            use rustls::pki_types::{CertificateDer, pem::PemObject as _};
            let certificates: Result<Vec<CertificateDer>, _> = CertificateDer::pem_slice_iter(&pem).collect();
            match certificates {
                Ok(c) if !c.is_empty() => Ok(pem),
                outcome => {
                    let why = outcome.err().map_or_else(|| "none found".to_owned(), |e| e.to_string());
                    Err(error(format!(
                        "{key} \"{}\": not PEM certificates ({why}); it must hold the CA certificate(s) as -----BEGIN CERTIFICATE----- blocks",
                        file.display()
                    )))
                }
            }
        };
        if let Some(webhook) = self.alerts.as_mut().and_then(|a| a.webhook.as_mut())
            && let Some(file) = &webhook.ca_file
        {
            webhook.ca_pem = Some(read_ca("alerts.webhook.ca_file", file)?);
        }
        let Some(email) = self.alerts.as_mut().and_then(|a| a.email.as_mut()) else {
            return Ok(());
        };
        if let Some(file) = &email.ca_file {
            email.ca_pem = Some(read_ca("alerts.email.ca_file", file)?);
        }
        let Some(credentials) = email.credentials.as_mut() else {
            return Ok(());
        };
        let file = &credentials.password_file;
        let text = std::fs::read_to_string(file).map_err(|e| {
            error(format!(
                "alerts.email.password_file \"{}\": cannot read it: {e}; it must hold the SMTP password (and nothing else)",
                file.display()
            ))
        })?;
        let password = text.trim_end_matches(['\n', '\r']);
        if password.is_empty() {
            return Err(error(format!("alerts.email.password_file \"{}\" is empty; write the SMTP password into it", file.display())));
        }
        credentials.password = Secret(password.to_owned());
        Ok(())
    }
}

fn local_addresses() -> nix::Result<HashSet<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| {
            let addr = ifa.address?;
            addr.as_sockaddr_in()
                .map(|a| IpAddr::V4(a.ip()))
                .or_else(|| addr.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::*;

    #[test]
    fn check_system_accepts_loopback_and_rejects_foreign() {
        let ok = parse(&service(
            "listen = \"127.0.0.1:80\"\nbackends = [\"127.0.0.1:81\"]",
        ))
        .unwrap();
        ok.check_system().unwrap();

        let e = parse(&EXAMPLE.replace("eth0", "xlb-nonexist0"))
            .unwrap()
            .check_system()
            .unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(
            e.to_string().starts_with(
                "/etc/xlb/xlb.toml:2: dataplane.interfaces: no network interface \"xlb-nonexist0\" on this host; use one of: "
            ),
            "{e}"
        );
        assert!(
            e.message.contains("lo") && e.message.ends_with("(see `ip link`)"),
            "{e}"
        );

        let local = local_addresses().unwrap();
        let foreign = ["192.0.2.9", "198.51.100.9", "203.0.113.9"]
            .map(|a| a.parse::<IpAddr>().unwrap())
            .into_iter()
            .find(|a| !local.contains(a))
            .expect("this host has every documentation address");
        // The VIP itself need not be local; only backends are checked.
        let host = local
            .iter()
            .find(|ip| ip.is_ipv4() && !ip.is_loopback())
            .copied()
            .unwrap_or(foreign);
        let text = format!(
            "[dataplane]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"web\"\nlisten = \"{foreign}:80\"\n\
             backends = [\n  \"{host}:8001\",\n  \"{foreign}:8002\",\n]\n"
        );
        let e = parse(&text)
            .unwrap()
            .check_system()
            .unwrap_err()
            .to_string();
        let (line, bad) = if host == foreign {
            (7, 8001)
        } else {
            (8, 8002)
        };
        assert!(
            e.starts_with(&format!(
                "/etc/xlb/xlb.toml:{line}: service \"web\" backend \"{foreign}:{bad}\": not an address of this \
                 host; xlb balances to same-host backends only — use an address from `ip addr` (this host has "
            )),
            "{e}"
        );
        assert!(e.contains("127.0.0.1"), "{e}");
    }

    #[test]
    fn smtp_password_comes_from_its_file() {
        let dir = std::env::temp_dir().join(format!("xlb-config-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("smtp-password");
        let text = format!("{EXAMPLE}{}", ALERTS.replace("/etc/xlb/smtp-password", &file.display().to_string()));
        let mut config = parse(&text).unwrap();
        let e = config.read_secrets().unwrap_err().to_string();
        assert!(e.contains("alerts.email.password_file") && e.contains("cannot read it"), "{e}");
        std::fs::write(&file, "s3cret\n").unwrap();
        config.read_secrets().unwrap();
        let password = &config.alerts.as_ref().unwrap().email.as_ref().unwrap().credentials.as_ref().unwrap().password;
        assert_eq!(password.0, "s3cret");
        std::fs::write(&file, "\n").unwrap();
        assert!(config.read_secrets().unwrap_err().to_string().contains("is empty"));
        // A CA file must hold certificates.
        let ca = dir.join("ca.pem");
        std::fs::write(&file, "s3cret\n").unwrap();
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let mut config = parse(&text.replace(
            "username = \"xlb\"",
            &format!("username = \"xlb\"\nca_file = \"{}\"", ca.display()),
        ))
        .unwrap();
        let e = config.read_secrets().unwrap_err().to_string();
        assert!(e.contains("alerts.email.ca_file") && e.contains("not PEM certificates"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

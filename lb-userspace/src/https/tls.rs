//! TLS for `https` services: the server configuration (TLS 1.2 and 1.3 only, forward-secret
//! AEAD suites only, ALPN h2 and http/1.1, session tickets and a session cache), and the
//! certificate store that picks a certificate by SNI and reloads the files when they change.
//!
//! A reload swaps the set of certificates used by the next handshakes; connections already
//! established keep the keys they negotiated, so nothing is dropped.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock, atomic::Ordering},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use super::Stats;
pub use crate::certs::Loaded;
use crate::{
    certs,
    challenges::{ACME_TLS_ALPN, Challenges},
    config::CertFiles,
};

/// Offered to clients in this order of preference.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// How often certificate files are checked for changes (SIGHUP checks at once).
pub const RELOAD_POLL: Duration = Duration::from_secs(1);
/// Sessions the server-side cache keeps (for clients that resume by session id, TLS 1.2).
const SESSION_CACHE: usize = 16 * 1024;

/// The process's one provider (see [`certs::provider`]) with the suites a server offers.
/// aws-lc-rs's default suites are exactly the TLS 1.3 suites and the TLS 1.2 ECDHE suites with
/// AES-GCM or ChaCha20-Poly1305: every one forward-secret and AEAD. Kept explicit so that a
/// future default cannot widen it unnoticed.
pub fn provider() -> CryptoProvider {
    let mut provider = certs::provider();
    provider.cipher_suites.retain(|s| match s {
        rustls::SupportedCipherSuite::Tls13(_) => true,
        rustls::SupportedCipherSuite::Tls12(s) => {
            let name = format!("{:?}", s.common.suite);
            name.starts_with("TLS_ECDHE_") && (name.contains("_GCM_") || name.contains("CHACHA20_POLY1305"))
        }
    });
    provider
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

/// The certificates of one service, chosen by SNI; the first is the default for clients that
/// send no SNI or a name none of them has.
pub struct Resolver {
    certs: RwLock<Arc<Vec<Loaded>>>,
    challenges: Arc<Challenges>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl Resolver {
    pub fn new(certs: Vec<Loaded>, challenges: Arc<Challenges>, stats: Arc<Stats>) -> Arc<Resolver> {
        let r = Arc::new(Resolver { certs: RwLock::new(Arc::new(Vec::new())), challenges, stats });
        r.set(certs);
        r
    }

    /// Serves `certs` from the next handshake on (a reload, or a certificate from ACME).
    pub fn set(&self, certs: Vec<Loaded>) {
        let not_after = certs.iter().map(|c| c.not_after).min().unwrap_or(0);
        self.stats.cert_not_after.store(not_after, Ordering::Relaxed);
        *self.certs.write().unwrap() = Arc::new(certs);
    }

    pub fn has_certificates(&self) -> bool {
        !self.certs.read().unwrap().is_empty()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(str::to_ascii_lowercase);
        // TLS-ALPN-01 (RFC 8737): the validator offers only acme-tls/1 and must get the
        // challenge certificate, never the real one.
        if hello.alpn().is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN)) {
            return sni.and_then(|name| self.challenges.tls_alpn01(&name));
        }
        let certs = self.certs.read().unwrap().clone();
        let chosen = sni
            .as_deref()
            .and_then(|name| certs.iter().find(|c| c.names.iter().any(|p| matches(p, name))))
            .or_else(|| certs.first());
        chosen.map(|c| c.key.clone())
    }
}

/// The server configuration of one service around its resolver.
pub fn server_config(resolver: Arc<Resolver>) -> anyhow::Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("building the TLS configuration")?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec(), ACME_TLS_ALPN.to_vec()];
    // Our suites are all strong; choosing among them ourselves keeps TLS 1.2 clients on the
    // ones we prefer (AES-GCM first, as in the provider's order).
    config.ignore_client_order = true;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    // Tickets with a key rotated every 6 hours (the previous key still decrypts).
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().context("creating the session ticket key")?;
    Ok(Arc::new(config))
}

/// What identifies a file's content without reading it: a replaced file (new inode) or one
/// rewritten in place (new mtime or length) both change it.
type Stamp = Option<(u64, u64, SystemTime)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

/// Reloads the certificates of `files` into `resolver` whenever one of the files changes, and
/// whenever `hup` fires (SIGHUP). A set that fails to load (a key written after its
/// certificate, say) leaves the current certificates in place and is retried on the next
/// check.
pub async fn watch_files(
    service: String,
    files: Vec<CertFiles>,
    resolver: Arc<Resolver>,
    hup: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let paths: Vec<PathBuf> = files.iter().flat_map(|f| [f.cert.clone(), f.key.clone()]).collect();
    let mut seen: Vec<Stamp> = paths.iter().map(|p| stamp(p)).collect();
    let mut last_error = String::new();
    loop {
        let forced = tokio::select! {
            _ = tokio::time::sleep(RELOAD_POLL) => false,
            _ = hup.notified() => true,
            _ = stop.changed() => return,
        };
        let now: Vec<Stamp> = paths.iter().map(|p| stamp(p)).collect();
        if now == seen && !forced {
            continue;
        }
        match files.iter().map(|f| certs::load_files(&f.cert, &f.key)).collect::<anyhow::Result<Vec<_>>>() {
            Ok(certs) => {
                let names: Vec<String> = certs.iter().flat_map(|c| c.names.clone()).collect();
                resolver.set(certs);
                seen = now;
                last_error.clear();
                info!(service, names = names.join(", "), "certificates reloaded; new connections get them");
            }
            Err(e) => {
                let e = format!("{e:#}");
                if e != last_error {
                    error!(service, "certificates not reloaded, still serving the previous ones: {e}");
                    last_error = e;
                } else if forced {
                    warn!(service, "certificates not reloaded: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_pair(files: &CertFiles) -> anyhow::Result<Loaded> {
        certs::load_files(&files.cert, &files.key)
    }

    #[test]
    fn wildcards_cover_one_label() {
        assert!(matches("*.example.com", "a.example.com"));
        assert!(!matches("*.example.com", "a.b.example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(matches("example.com", "example.com"));
        assert!(!matches("example.com", "www.example.com"));
    }

    /// A CA, and leaves it signs written as PEM files.
    struct Pki {
        dir: PathBuf,
        ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    }

    impl Pki {
        fn new(tag: &str) -> Pki {
            let dir = std::env::temp_dir().join(format!("xlb-tls-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
            Pki { dir, ca }
        }

        fn leaf(&self, file: &str, names: &[&str]) -> (CertFiles, Vec<u8>) {
            let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.ca).unwrap();
            let files = CertFiles { cert: self.dir.join(format!("{file}.crt")), key: self.dir.join(format!("{file}.key")) };
            std::fs::write(&files.cert, cert.pem()).unwrap();
            std::fs::write(&files.key, key.serialize_pem()).unwrap();
            (files, cert.der().to_vec())
        }

        /// A handshake with `sni` offering `alpn`, in memory: the leaf the server sent.
        fn handshake(&self, server: &Arc<ServerConfig>, sni: &str, alpn: &[u8]) -> Result<Vec<u8>, rustls::Error> {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.der().clone()).unwrap();
            let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![alpn.to_vec()];
            let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
            let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
            let mut server = rustls::ServerConnection::new(server.clone()).unwrap();
            for _ in 0..10 {
                let mut buf = Vec::new();
                while client.wants_write() {
                    client.write_tls(&mut buf).unwrap();
                }
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    server.read_tls(&mut rd).unwrap();
                }
                server.process_new_packets()?;
                let mut buf = Vec::new();
                while server.wants_write() {
                    server.write_tls(&mut buf).unwrap();
                }
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    client.read_tls(&mut rd).unwrap();
                }
                client.process_new_packets()?;
                if !client.is_handshaking() && !server.is_handshaking() {
                    let leaf = client.peer_certificates().unwrap()[0].to_vec();
                    return Ok(leaf);
                }
            }
            panic!("handshake with {sni} did not finish");
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn sni_picks_the_certificate_and_acme_tls_alpn_gets_the_challenge() {
        let pki = Pki::new("sni");
        let (a, a_der) = pki.leaf("a", &["a.example"]);
        let (b, b_der) = pki.leaf("b", &["*.b.example", "b.example"]);
        let (c, c_der) = pki.leaf("challenge", &["c.example"]);
        let challenges = Challenges::new();
        challenges.set_tls_alpn01("c.example", load_pair(&c).unwrap().key);
        let stats = Arc::new(Stats::default());
        let resolver = Resolver::new(vec![load_pair(&a).unwrap(), load_pair(&b).unwrap()], challenges, stats.clone());
        let config = server_config(resolver.clone()).unwrap();
        assert_eq!(pki.handshake(&config, "a.example", ALPN_H2).unwrap(), a_der);
        assert_eq!(pki.handshake(&config, "x.b.example", ALPN_HTTP11).unwrap(), b_der);
        assert_eq!(pki.handshake(&config, "B.Example", ALPN_H2).unwrap(), b_der);
        // No match: the first certificate (the client then rejects the name).
        assert!(pki.handshake(&config, "other.example", ALPN_H2).is_err());
        // TLS-ALPN-01 gets the challenge certificate, never the real one...
        assert_eq!(pki.handshake(&config, "c.example", ACME_TLS_ALPN).unwrap(), c_der);
        // ...and nothing for a name without a pending challenge.
        assert!(pki.handshake(&config, "a.example", ACME_TLS_ALPN).is_err());
        // A reload replaces what new handshakes get; the expiry follows.
        let (a2, a2_der) = pki.leaf("a2", &["a.example"]);
        let loaded = load_pair(&a2).unwrap();
        let not_after = loaded.not_after;
        resolver.set(vec![loaded]);
        assert_eq!(pki.handshake(&config, "a.example", ALPN_H2).unwrap(), a2_der);
        assert_eq!(stats.cert_not_after.load(Ordering::Relaxed), not_after);
    }

    #[test]
    fn mismatched_or_missing_files_are_explained() {
        let pki = Pki::new("bad");
        let (a, _) = pki.leaf("a", &["a.example"]);
        let (b, _) = pki.leaf("b", &["b.example"]);
        let crossed = CertFiles { cert: a.cert.clone(), key: b.key.clone() };
        let e = format!("{:#}", load_pair(&crossed).err().unwrap());
        assert!(e.contains("do not go together") && e.contains("give the key the certificate was issued for"), "{e}");
        let swapped = CertFiles { cert: a.key.clone(), key: a.cert.clone() };
        let e = format!("{:#}", load_pair(&swapped).err().unwrap());
        assert!(e.contains("no CERTIFICATE block"), "{e}");
        let missing = CertFiles { cert: pki.dir.join("nope.crt"), key: a.key.clone() };
        let e = format!("{:#}", load_pair(&missing).err().unwrap());
        assert!(e.starts_with(&format!("reading certificate file {}", missing.cert.display())), "{e}");
    }

    #[test]
    fn only_forward_secret_aead_suites() {
        let names: Vec<String> = provider().cipher_suites.iter().map(|s| format!("{:?}", s.suite())).collect();
        assert!(!names.is_empty());
        for name in &names {
            assert!(
                name.starts_with("TLS13_") || (name.starts_with("TLS_ECDHE_") && (name.contains("GCM") || name.contains("CHACHA20"))),
                "{name}"
            );
        }
    }
}

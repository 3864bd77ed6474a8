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

use anyhow::{Context as _, bail};
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use super::Stats;
use crate::{
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

/// ring's suites are exactly the TLS 1.3 suites and the TLS 1.2 ECDHE suites with AES-GCM or
/// ChaCha20-Poly1305: every one forward-secret and AEAD. Kept explicit so that a future default
/// cannot widen it unnoticed.
pub fn provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.retain(|s| match s {
        rustls::SupportedCipherSuite::Tls13(_) => true,
        rustls::SupportedCipherSuite::Tls12(s) => {
            let name = format!("{:?}", s.common.suite);
            name.starts_with("TLS_ECDHE_") && (name.contains("_GCM_") || name.contains("CHACHA20_POLY1305"))
        }
    });
    provider
}

/// One certificate as loaded: the key the handshake uses and what it is for.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// Lower-case DNS names from subjectAltName (with `*.` wildcards as written).
    pub names: Vec<String>,
    /// Unix seconds.
    pub not_after: i64,
}

/// Reads a PEM chain and key and checks that they belong together.
pub fn load_pair(files: &CertFiles) -> anyhow::Result<Loaded> {
    let CertFiles { cert, key } = files;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificate file {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not a PEM certificate chain", cert.display()))?;
    if chain.is_empty() {
        bail!("{}: no CERTIFICATE block; give the PEM chain, leaf certificate first", cert.display());
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => anyhow::anyhow!(
            "{}: no PRIVATE KEY block (PKCS#8, RSA or EC) found; give the PEM private key of the certificate",
            key.display()
        ),
        e => anyhow::anyhow!("reading private key file {}: {e}", key.display()),
    })?;
    let (names, not_after) = describe(&chain[0]).with_context(|| format!("{}: the leaf certificate", cert.display()))?;
    let certified = CertifiedKey::from_der(chain, der, &provider()).map_err(|e| {
        anyhow::anyhow!(
            "{} and {} do not go together ({e}); give the key the certificate was issued for",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Loaded { key: Arc::new(certified), names, not_after })
}

/// The DNS names (subjectAltName, else the subject CN) and notAfter of a certificate.
pub fn describe(cert: &CertificateDer<'_>) -> anyhow::Result<(Vec<String>, i64)> {
    use x509_parser::prelude::*;
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).map_err(|e| anyhow::anyhow!("not a valid X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(n) = name {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in x509.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.to_ascii_lowercase());
            }
        }
    }
    Ok((names, x509.validity().not_after.timestamp()))
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
    config.ticketer = rustls::crypto::ring::Ticketer::new().context("creating the session ticket key")?;
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
        match files.iter().map(load_pair).collect::<anyhow::Result<Vec<_>>>() {
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

    #[test]
    fn wildcards_cover_one_label() {
        assert!(matches("*.example.com", "a.example.com"));
        assert!(!matches("*.example.com", "a.b.example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(matches("example.com", "example.com"));
        assert!(!matches("example.com", "www.example.com"));
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

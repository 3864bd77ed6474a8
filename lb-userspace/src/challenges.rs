//! Answers to ACME challenges, shared by the certificate manager (which puts them here while an
//! order is being validated) and the listeners that serve them: the redirect listener answers
//! HTTP-01 at `/.well-known/acme-challenge/<token>`, the HTTPS listener answers TLS-ALPN-01 to a
//! ClientHello that offers only the `acme-tls/1` protocol.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use rustls::sign::CertifiedKey;

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// The path prefix of HTTP-01 (RFC 8555 §8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

#[derive(Default)]
pub struct Challenges {
    /// Token → key authorization.
    http01: RwLock<HashMap<String, String>>,
    /// Domain (lower case) → the self-signed certificate carrying the acmeIdentifier extension.
    tls_alpn01: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    pub fn new() -> Arc<Challenges> {
        Arc::default()
    }

    pub fn http01(&self, token: &str) -> Option<String> {
        self.http01.read().unwrap().get(token).cloned()
    }

    pub fn set_http01(&self, token: &str, key_authorization: &str) {
        self.http01.write().unwrap().insert(token.to_owned(), key_authorization.to_owned());
    }

    pub fn remove_http01(&self, token: &str) {
        self.http01.write().unwrap().remove(token);
    }

    pub fn tls_alpn01(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        self.tls_alpn01.read().unwrap().get(&domain.to_ascii_lowercase()).cloned()
    }

    pub fn set_tls_alpn01(&self, domain: &str, key: Arc<CertifiedKey>) {
        self.tls_alpn01.write().unwrap().insert(domain.to_ascii_lowercase(), key);
    }

    pub fn remove_tls_alpn01(&self, domain: &str) {
        self.tls_alpn01.write().unwrap().remove(&domain.to_ascii_lowercase());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http01_tokens_come_and_go() {
        let c = Challenges::new();
        assert_eq!(c.http01("t"), None);
        c.set_http01("t", "t.thumb");
        assert_eq!(c.http01("t").as_deref(), Some("t.thumb"));
        c.remove_http01("t");
        assert_eq!(c.http01("t"), None);
    }
}

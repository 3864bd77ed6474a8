//! Answers to the CA's challenges: published in the shared [`Challenges`] store for one
//! attempt, and the TLS-ALPN-01 certificate.

use std::sync::Arc;

use rustls::{
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};

use crate::{certs, challenges::Challenges};

/// Challenge answers of one attempt; withdrawn from the store on drop.
pub(super) struct Published {
    challenges: Arc<Challenges>,
    http01: Vec<String>,
    tls_alpn01: Vec<String>,
}

impl Published {
    pub(super) fn new(challenges: Arc<Challenges>) -> Published {
        Published {
            challenges,
            http01: Vec::new(),
            tls_alpn01: Vec::new(),
        }
    }

    pub(super) fn http01(&mut self, token: &str, key_authorization: &str) {
        self.challenges.set_http01(token, key_authorization);
        self.http01.push(token.to_owned());
    }

    pub(super) fn tls_alpn01(&mut self, domain: &str, key: Arc<CertifiedKey>) {
        self.challenges.set_tls_alpn01(domain, key);
        self.tls_alpn01.push(domain.to_owned());
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        for token in &self.http01 {
            self.challenges.remove_http01(token);
        }
        for domain in &self.tls_alpn01 {
            self.challenges.remove_tls_alpn01(domain);
        }
    }
}

/// The self-signed certificate of RFC 8737: the domain as its only name and the SHA-256 of the
/// key authorization in a critical acmeIdentifier extension.
pub fn tls_alpn01_key(domain: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(vec![domain.to_owned()])
        .map_err(|e| format!("certificate for {domain}: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("signing the TLS-ALPN-01 certificate for {domain}: {e}"))?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // Not `CertifiedKey::from_der`: its key check parses the certificate with webpki, which
    // refuses the critical extension this certificate exists to carry.
    let signing_key = certs::provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("TLS-ALPN-01 key for {domain}: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing_key,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_alpn01_certificate_carries_the_digest_in_a_critical_extension() {
        let digest = [7u8; 32];
        let key = tls_alpn01_key("www.example.com", &digest).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&key.cert[0]).unwrap();
        // id-pe-acmeIdentifier, RFC 8737 §6.1.
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // An OCTET STRING of the 32-byte digest.
        assert_eq!(ext.value, [&[0x04, 32][..], &digest].concat());
        let names = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", names.value.general_names),
            "[DNSName(\"www.example.com\")]"
        );
    }
}

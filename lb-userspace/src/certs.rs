//! Certificates to serve: a PEM chain and private key, from files (`[service.tls]`, `xlb
//! check`, the ACME manager's stored pair) or from memory (what an ACME CA sends), turned into
//! the key a TLS handshake uses, after checking that the key belongs to the leaf certificate.
//!
//! Every user reads certificates through here, so the names a certificate is taken to be for
//! are the same everywhere: the DNS names of its subjectAltName, lowercased, or its subject's
//! common name when it has no DNS name in a subjectAltName (as clients did before SANs).
//!
//! Also the one crypto provider of the process, aws-lc-rs: several times faster than ring at
//! the ECDSA P-256 signatures a full handshake spends most of its time on.

use std::{path::Path, sync::Arc};

use anyhow::{Context as _, anyhow};
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    sign::CertifiedKey,
};

/// aws-lc-rs with its default suites and key types. TLS servers narrow the suites further
/// (see `https::tls::provider`); clients and key loading take it as it is.
pub fn provider() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

/// One certificate as loaded: the key the handshake uses and what it is for.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// Lower-case DNS names from subjectAltName (with `*.` wildcards as written), else the CN.
    pub names: Vec<String>,
    /// Unix seconds.
    pub not_after: i64,
}

/// What a leaf certificate says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// As in [`Loaded::names`].
    pub names: Vec<String>,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// The names (subjectAltName DNS names lowercased, else the subject CN) and validity of a
/// certificate.
pub fn describe(cert: &CertificateDer<'_>) -> anyhow::Result<Leaf> {
    use x509_parser::prelude::*;
    let (_, x509) = X509Certificate::from_der(cert.as_ref()).map_err(|e| anyhow!("not a valid X.509 certificate: {e}"))?;
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
    let validity = x509.validity();
    Ok(Leaf { names, not_before: validity.not_before.timestamp(), not_after: validity.not_after.timestamp() })
}

/// Reads a PEM chain (leaf first) and its private key from files, and checks that they belong
/// together. Every error names the file it is about.
pub fn load_files(cert: &Path, key: &Path) -> anyhow::Result<Loaded> {
    read_files(cert, key).map(|(loaded, _)| loaded)
}

/// [`load_files`], also giving back the chain's PEM as read, for whoever passes it on.
pub fn read_files(cert: &Path, key: &Path) -> anyhow::Result<(Loaded, Vec<u8>)> {
    let chain_pem = std::fs::read(cert).with_context(|| format!("reading certificate file {}", cert.display()))?;
    let chain = pem_chain(&chain_pem).map_err(|e| match e {
        Chain::NotPem(e) => anyhow!(e).context(format!("{}: not a PEM certificate chain", cert.display())),
        Chain::Empty => anyhow!("{}: no CERTIFICATE block; give the PEM chain, leaf certificate first", cert.display()),
    })?;
    let key_pem = std::fs::read(key).with_context(|| format!("reading private key file {}", key.display()))?;
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => anyhow!(
            "{}: no PRIVATE KEY block (PKCS#8, RSA or EC) found; give the PEM private key of the certificate",
            key.display()
        ),
        e => anyhow!("reading private key file {}: {e}", key.display()),
    })?;
    let loaded = from_der(chain, der).map_err(|e| match e {
        Mismatch::Leaf(e) => e.context(format!("{}: the leaf certificate", cert.display())),
        Mismatch::Key(e) => anyhow!(
            "{} and {} do not go together ({e}); give the key the certificate was issued for",
            cert.display(),
            key.display()
        ),
    })?;
    Ok((loaded, chain_pem))
}

/// A PEM chain (leaf first) and private key held in memory, as an ACME client gets them.
pub fn load_pem(chain: &[u8], key: &[u8]) -> anyhow::Result<Loaded> {
    let chain = pem_chain(chain).map_err(|e| match e {
        Chain::NotPem(e) => anyhow!(e).context("not a PEM certificate chain"),
        Chain::Empty => anyhow!("no CERTIFICATE block in the chain"),
    })?;
    let key = PrivateKeyDer::from_pem_slice(key).context("no usable PEM private key")?;
    from_der(chain, key).map_err(|e| match e {
        Mismatch::Leaf(e) => e.context("the leaf certificate"),
        Mismatch::Key(e) => {
            anyhow!("the key does not belong to the certificate: the two do not fit together ({e}); give the key the certificate was issued for")
        }
    })
}

enum Chain {
    NotPem(rustls::pki_types::pem::Error),
    Empty,
}

fn pem_chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Chain> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(Chain::NotPem)?;
    if chain.is_empty() {
        return Err(Chain::Empty);
    }
    Ok(chain)
}

/// Why a chain and key that both parsed cannot be served; each caller says it in its own terms.
enum Mismatch {
    Leaf(anyhow::Error),
    Key(rustls::Error),
}

fn from_der(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Loaded, Mismatch> {
    let Leaf { names, not_after, .. } = describe(&chain[0]).map_err(Mismatch::Leaf)?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(Mismatch::Key)?;
    Ok(Loaded { key: Arc::new(certified), names, not_after })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// PEM files in a directory of their own, removed afterwards.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let dir = std::env::temp_dir().join(format!("xlb-certs-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn write(&self, file: &str, content: impl AsRef<[u8]>) -> PathBuf {
            let path = self.0.join(file);
            std::fs::write(&path, content).unwrap();
            path
        }

        /// A self-signed certificate for `params` and its key, as `<name>.crt` and `<name>.key`.
        fn pair(&self, name: &str, params: rcgen::CertificateParams) -> (PathBuf, PathBuf, rcgen::Certificate) {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let cert_path = self.write(&format!("{name}.crt"), cert.pem());
            let key_path = self.write(&format!("{name}.key"), key.serialize_pem());
            (cert_path, key_path, cert)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn params(names: &[&str]) -> rcgen::CertificateParams {
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn a_good_pair_loads_with_its_names_and_end() {
        let dir = Dir::new("good");
        let mut p = params(&["a.example", "*.b.example"]);
        p.not_before = rcgen::date_time_ymd(2025, 1, 1);
        p.not_after = rcgen::date_time_ymd(2030, 6, 1);
        let (cert, key, issued) = dir.pair("good", p);
        let loaded = load_files(&cert, &key).unwrap();
        assert_eq!(loaded.names, ["a.example", "*.b.example"]);
        // 2030-06-01T00:00:00Z
        assert_eq!(loaded.not_after, 1_906_502_400);
        assert_eq!(loaded.key.cert, [issued.der().clone()]);
        let (again, pem) = read_files(&cert, &key).unwrap();
        assert_eq!(pem, std::fs::read(&cert).unwrap());
        assert_eq!(again.names, loaded.names);
        let leaf = describe(issued.der()).unwrap();
        // 2025-01-01T00:00:00Z
        assert_eq!((leaf.not_before, leaf.not_after), (1_735_689_600, 1_906_502_400));
        let from_memory = load_pem(issued.pem().as_bytes(), &std::fs::read(&key).unwrap()).unwrap();
        assert_eq!((from_memory.names, from_memory.not_after), (loaded.names, loaded.not_after));
    }

    #[test]
    fn san_names_are_lowercased() {
        let dir = Dir::new("case");
        let (cert, key, _) = dir.pair("case", params(&["WWW.Example.COM", "*.Api.example.com"]));
        assert_eq!(load_files(&cert, &key).unwrap().names, ["www.example.com", "*.api.example.com"]);
    }

    #[test]
    fn the_common_name_only_without_a_subject_alt_name() {
        let dir = Dir::new("cn");
        let mut p = params(&[]);
        p.distinguished_name.push(rcgen::DnType::CommonName, "Legacy.Example");
        let (cert, key, _) = dir.pair("cn", p);
        assert_eq!(load_files(&cert, &key).unwrap().names, ["legacy.example"]);
        // With a subjectAltName, the CN is not a name the certificate is for.
        let mut p = params(&["san.example"]);
        p.distinguished_name.push(rcgen::DnType::CommonName, "cn.example");
        let (cert, key, _) = dir.pair("both", p);
        assert_eq!(load_files(&cert, &key).unwrap().names, ["san.example"]);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = Dir::new("mismatch");
        let (a_cert, a_key, a) = dir.pair("a", params(&["a.example"]));
        let (_, b_key, _) = dir.pair("b", params(&["b.example"]));
        let e = format!("{:#}", load_files(&a_cert, &b_key).err().unwrap());
        assert!(
            e.starts_with(&format!("{} and {} do not go together (", a_cert.display(), b_key.display()))
                && e.ends_with("); give the key the certificate was issued for"),
            "{e}"
        );
        let pem = |p: &PathBuf| std::fs::read(p).unwrap();
        assert_eq!(load_pem(&pem(&a_cert), &pem(&a_key)).unwrap().names, ["a.example"]);
        let e = format!("{:#}", load_pem(a.pem().as_bytes(), &pem(&b_key)).err().unwrap());
        assert!(e.starts_with("the key does not belong to the certificate"), "{e}");
        assert!(e.contains("do not fit together") && e.contains("give the key the certificate was issued for"), "{e}");
    }

    #[test]
    fn files_that_are_not_pem_or_are_empty_are_named() {
        let dir = Dir::new("notpem");
        let (cert, key, _) = dir.pair("good", params(&["a.example"]));
        let empty = dir.write("empty.pem", "");
        let text = dir.write("text.pem", "this is not a certificate\n");
        for bad in [&empty, &text] {
            let e = format!("{:#}", load_files(bad, &key).err().unwrap());
            assert_eq!(e, format!("{}: no CERTIFICATE block; give the PEM chain, leaf certificate first", bad.display()));
            let e = format!("{:#}", load_files(&cert, bad).err().unwrap());
            assert_eq!(
                e,
                format!("{}: no PRIVATE KEY block (PKCS#8, RSA or EC) found; give the PEM private key of the certificate", bad.display())
            );
        }
        // A CERTIFICATE block that is not base64.
        let broken = dir.write("broken.pem", "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n");
        let e = format!("{:#}", load_files(&broken, &key).err().unwrap());
        assert!(e.starts_with(&format!("{}: not a PEM certificate chain: ", broken.display())), "{e}");
        // The certificate and key given the wrong way round.
        let e = format!("{:#}", load_files(&key, &cert).err().unwrap());
        assert!(e.starts_with(&format!("{}: no CERTIFICATE block", key.display())), "{e}");
        let missing = dir.0.join("missing.key");
        let e = format!("{:#}", load_files(&cert, &missing).err().unwrap());
        assert!(e.starts_with(&format!("reading private key file {}: ", missing.display())), "{e}");
        assert_eq!(format!("{:#}", load_pem(b"", b"").err().unwrap()), "no CERTIFICATE block in the chain");
    }
}

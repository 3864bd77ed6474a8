//! TLS clients and certificates for the HTTPS scenarios and the demo: a CA made at run time
//! with the leaf certificates it signs, and an HTTP/1.1 or HTTP/2 client connection over TLS.
use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Version};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde_json::Value;

use crate::{IO_TIMEOUT, config::Tls};

/// A CA made at run time, and certificates it signs for `names` (DNS names or addresses).
pub struct Pki {
    pub dir: PathBuf,
    names: Vec<String>,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    /// A new CA, its certificate written to `dir/ca.pem`.
    pub fn new(dir: &Path, names: &[&str]) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "xlb test CA");
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { dir: dir.to_owned(), names: names.iter().map(|n| n.to_string()).collect(), ca }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A leaf certificate for the names with subject CN `cn`: (cert PEM, key PEM, cert DER).
    pub fn leaf(&self, cn: &str) -> (String, String, Vec<u8>) {
        let mut params = rcgen::CertificateParams::new(self.names.clone()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        // Like a certificate from a public CA: valid for 90 days from yesterday, with a CRL
        // to check it against (testssl.sh rates longer lives and no revocation info HIGH).
        let (y, m, d) = civil_date(-1);
        params.not_before = rcgen::date_time_ymd(y, m, d);
        let (y, m, d) = civil_date(89);
        params.not_after = rcgen::date_time_ymd(y, m, d);
        params.crl_distribution_points =
            vec![rcgen::CrlDistributionPoint { uris: vec![format!("http://{}/test-ca.crl", self.names[0])] }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    /// Writes a leaf to `cert_path`/`key_path` the way a renewal tool does: new files renamed
    /// over the old ones, key first. Returns the certificate's DER.
    pub fn install(&self, cn: &str) -> Vec<u8> {
        let (cert, key, der) = self.leaf(cn);
        replace_file(&self.key_path(), key);
        replace_file(&self.cert_path(), cert);
        der
    }

    /// Where `install` puts the certificate.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("site.crt")
    }

    /// Where `install` puts the private key.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("site.key")
    }

    /// A service's `[service.tls]` naming the installed certificate and key.
    pub fn tls(&self) -> Tls {
        Tls::files(self.cert_path(), self.key_path())
    }
}

/// Replaces `path` with `text` as a renewal tool does: written to `<path>.new`, renamed over it.
pub fn replace_file(path: &Path, text: impl AsRef<[u8]>) {
    let tmp = PathBuf::from(format!("{}.new", path.display()));
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming {} to {}: {e}", tmp.display(), path.display()));
}

/// The date `offset_days` from today (UTC) as (year, month, day): Howard Hinnant's
/// `civil_from_days`.
fn civil_date(offset_days: i64) -> (i32, u8, u8) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let z = now / 86_400 + offset_days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

/// A TLS client configuration trusting the CA certificates in the PEM file `ca`.
pub fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A response, read to the end.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub version: Version,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// A client connection over TLS, kept open between requests.
pub struct Conn {
    sender: Sender,
    /// The server name it was opened for (SNI, and `Host`/`:authority` of its requests).
    host: String,
    /// The leaf certificate the server sent.
    pub peer_cert: Vec<u8>,
}

impl Conn {
    /// A TLS connection over `tcp` to the server `host`, speaking HTTP/2 when `h2`, else
    /// HTTP/1.1 (by ALPN).
    pub async fn open(tcp: TcpStream, tls: Arc<rustls::ClientConfig>, host: &str, h2: bool) -> Result<Conn, String> {
        tcp.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
        let mut config = (*tls).clone();
        config.alpn_protocols = vec![if h2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from(host.to_string()).map_err(|e| format!("server name {host:?}: {e}"))?;
        let stream = tokio::time::timeout(IO_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (_, session) = stream.get_ref();
        let peer_cert = session.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let io = TokioIo::new(stream);
        let sender = if h2 {
            assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "the server did not agree to h2 by ALPN");
            let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(conn);
            Sender::H2(sender)
        } else {
            let (sender, conn) =
                hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("http/1.1 handshake: {e}"))?;
            tokio::spawn(conn);
            Sender::H1(sender)
        };
        Ok(Conn { sender, host: host.to_string(), peer_cert })
    }

    /// One request, its response read to the end (15 s at most).
    pub async fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: Bytes) -> Result<Answer, String> {
        let uri = match self.sender {
            Sender::H1(_) => path.to_string(),
            Sender::H2(_) => format!("https://{}{path}", self.host),
        };
        let mut req = Request::builder().method(method).uri(uri);
        if let Sender::H1(_) = self.sender {
            req = req.header("host", &self.host);
        }
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req.body(Full::new(body)).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(15), async {
            match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await.map_err(|e| format!("connection not ready: {e}"))?;
                    s.send_request(req).await
                }
                Sender::H2(s) => {
                    s.ready().await.map_err(|e| format!("connection not ready: {e}"))?;
                    s.send_request(req).await
                }
            }
            .map_err(|e| format!("request failed: {e}"))
        })
        .await
        .map_err(|_| "no response in 15 s".to_string())??;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| format!("reading the body: {e}"))?.to_bytes();
        Ok(Answer {
            status: parts.status.as_u16(),
            version: parts.version,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}


//! The HTTPS client that instant-acme reaches the CA through.

use std::{path::Path, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use hyper_util::{
    client::legacy::{Client as HyperClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject as _},
};

use crate::certs;

/// TCP connect timeout towards the ACME server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTPS client instant-acme talks through. Ours rather than its default one, so that the
/// trusted roots and the crypto provider are chosen here.
#[derive(Clone)]
pub(super) struct AcmeHttp(HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>);

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        request: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let response = self.0.request(request);
        Box::pin(async move {
            response
                .await
                .map(BytesResponse::from)
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))
        })
    }
}

/// The HTTPS client towards the ACME server, trusting the roots in `ca` or else the Mozilla
/// roots. Built with an explicit crypto provider, so it does not depend on (or set) the
/// process-wide default.
pub(super) fn http_client(ca: Option<&Path>) -> anyhow::Result<AcmeHttp> {
    let roots = match ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "acme ca {}: cannot read PEM certificates: {e}; point `ca` at the ACME \
                         server's root certificate in PEM, or remove it to trust the usual roots",
                        path.display()
                    )
                })?;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    anyhow::anyhow!(
                        "acme ca {}: not a usable root certificate: {e}",
                        path.display()
                    )
                })?;
            }
            if roots.is_empty() {
                anyhow::bail!(
                    "acme ca {}: no certificate in it; it should hold the ACME server's root \
                     certificate in PEM",
                    path.display()
                );
            }
            roots
        }
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(certs::provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(tcp);
    Ok(AcmeHttp(
        // No idle connections kept: an order is a dozen requests every two months, and a
        // kept connection that the CA closes just as it is reused fails a request for nothing.
        HyperClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector),
    ))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn a_bad_ca_file_is_named() {
        let missing = Path::new("/nonexistent/xlb-acme-ca.pem");
        let err = http_client(Some(missing)).err().unwrap().to_string();
        assert!(
            err.contains("/nonexistent/xlb-acme-ca.pem: cannot read PEM certificates"),
            "{err}"
        );
        let empty = std::env::temp_dir().join(format!("xlb-acme-ca-{}.pem", std::process::id()));
        fs::write(&empty, "not a certificate\n").unwrap();
        let err = http_client(Some(&empty)).err().unwrap().to_string();
        fs::remove_file(&empty).unwrap();
        assert!(err.contains("no certificate in it"), "{err}");
        assert!(http_client(None).is_ok());
    }
}

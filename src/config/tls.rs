//! The proxy listeners' TLS configuration, from PEM certificate and key files.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::file::TlsFile;
use super::validate::Problems;

/// Load the certificate chain and key, or report why they cannot serve.
pub(super) fn server_config(tls: &TlsFile, p: &mut Problems) -> Option<Arc<ServerConfig>> {
    let certs: Result<Vec<CertificateDer<'static>>, _> =
        CertificateDer::pem_file_iter(&tls.cert_file).and_then(|certs| certs.collect());
    let certs = match certs {
        Ok(certs) if certs.is_empty() => {
            p.push("tls.cert_file", format!("{} holds no PEM certificate", tls.cert_file));
            None
        }
        Ok(certs) => Some(certs),
        Err(e) => {
            p.push("tls.cert_file", format!("cannot read certificates from {}: {e}", tls.cert_file));
            None
        }
    };
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| p.push("tls.key_file", format!("cannot read a private key from {}: {e}", tls.key_file)))
        .ok();
    let (certs, key) = (certs?, key?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| p.push("tls", e))
        .ok()?
        .with_no_client_auth()
        .with_single_cert(certs, key);
    match config {
        Ok(mut config) => {
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Some(Arc::new(config))
        }
        Err(e) => {
            p.push("tls", format!("the certificate and key do not make a TLS configuration: {e}"));
            None
        }
    }
}

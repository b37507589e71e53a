//! The proxy listener's certificate (`--tls`): self-signed for `127.0.0.1`
//! and `localhost`, made afresh for each run and written with its key to
//! the soak's temporary directory for `[tls]`; the clients trust exactly it.

use std::path::{Path, PathBuf};

/// The files `[tls]` names, and the certificate the clients trust (PEM).
pub struct SelfSigned {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub cert_pem: String,
}

pub fn self_signed(dir: &Path) -> Result<SelfSigned, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("TLS key: {e}"))?;
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .map_err(|e| format!("TLS names: {e}"))?;
    let cert = params.self_signed(&key).map_err(|e| format!("TLS certificate: {e}"))?;
    let (cert_file, key_file) = (dir.join("tls-cert.pem"), dir.join("tls-key.pem"));
    std::fs::write(&cert_file, cert.pem()).map_err(|e| format!("write the certificate: {e}"))?;
    std::fs::write(&key_file, key.serialize_pem()).map_err(|e| format!("write the key: {e}"))?;
    Ok(SelfSigned { cert_file, key_file, cert_pem: cert.pem() })
}

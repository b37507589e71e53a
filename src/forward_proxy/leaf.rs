//! Leaf certificates for intercepted hosts, minted from the local CA and cached.
//!
//! Only hosts of the upstream table get a leaf: the cache is indexed by
//! upstream, so it is bounded by the configuration and no client can make
//! the gateway mint a certificate for any other name. A slot keeps the host
//! its leaf names, so a reload that gives an upstream another host mints a
//! leaf for the new one. A leaf is valid for
//! [`VALIDITY`] and re-minted after [`REMINT_AFTER`], so a gateway that runs
//! for months never serves an expired one. Each entry is a ready rustls
//! server config, shared by every worker.
//!
//! ALPN offers `http/1.1` only. Over HTTP/2, a request the gateway answers
//! before the client has closed its upload (a local 429 or 401) ends with
//! `RST_STREAM(NO_ERROR)`, which curl 7.x reports as a framing error instead
//! of showing the answer; a loopback hop gains nothing from HTTP/2.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

use super::ca::LocalCa;

/// How long a minted leaf is valid.
const VALIDITY: Duration = Duration::from_secs(30 * 86_400);
/// Age at which a cached leaf is replaced by a new one.
const REMINT_AFTER: Duration = Duration::from_secs(7 * 86_400);

/// Why a leaf could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    #[error("cannot mint a certificate: {0}")]
    Mint(#[from] rcgen::Error),
    #[error("cannot build a TLS server config: {0}")]
    Tls(#[from] rustls::Error),
}

/// Minted server configs, one slot per upstream.
pub struct LeafCerts {
    ca: Arc<LocalCa>,
    slots: Vec<Mutex<Option<Minted>>>,
}

/// A leaf's server config, the host it names, and when it was minted.
type Minted = (Instant, String, Arc<ServerConfig>);

impl LeafCerts {
    pub fn new(ca: Arc<LocalCa>, upstreams: usize) -> Self {
        LeafCerts { ca, slots: (0..upstreams).map(|_| Mutex::new(None)).collect() }
    }

    /// The TLS server config presenting a leaf for `host`, the name of upstream `index`.
    pub fn server_config(&self, index: usize, host: &str) -> Result<Arc<ServerConfig>, LeafError> {
        let slot = &self.slots[index];
        if let Some((minted, named, config)) = &*slot.lock().unwrap_or_else(|e| e.into_inner()) {
            if minted.elapsed() < REMINT_AFTER && named.eq_ignore_ascii_case(host) {
                return Ok(config.clone());
            }
        }
        // Minting takes about a millisecond; two racing first CONNECTs both
        // mint, and the last one stays. No lock is held while minting.
        let config = Arc::new(self.mint(host)?);
        *slot.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), host.to_string(), config.clone()));
        tracing::debug!(host, "minted a leaf certificate");
        Ok(config)
    }

    fn mint(&self, host: &str) -> Result<ServerConfig, LeafError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        // OpenSSL's strict mode (Python 3.13 and later) wants the issuer's key id.
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + VALIDITY;
        let cert = self.ca.sign(params, &key)?;
        let chain = vec![CertificateDer::from(cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaf_is_minted_once_per_upstream_and_then_served_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::load_or_create(dir.path()).unwrap());
        let leaves = LeafCerts::new(ca, 2);
        let first = leaves.server_config(0, "api.security.microsoft.com").unwrap();
        let again = leaves.server_config(0, "api.security.microsoft.com").unwrap();
        assert!(Arc::ptr_eq(&first, &again), "cached");
        let other = leaves.server_config(1, "graph.microsoft.com").unwrap();
        assert!(!Arc::ptr_eq(&first, &other), "one leaf per upstream");
        assert_eq!(first.alpn_protocols, vec![b"http/1.1".to_vec()]);
        // A reload gave upstream 0 another host: its leaf names the new one.
        let moved = leaves.server_config(0, "eu.api.security.microsoft.com").unwrap();
        assert!(!Arc::ptr_eq(&first, &moved), "a leaf for the new host");
        let moved_again = leaves.server_config(0, "EU.api.security.microsoft.com").unwrap();
        assert!(Arc::ptr_eq(&moved, &moved_again), "cached under the new host, in any case");
    }
}

//! The local certificate authority of the forward proxy.
//!
//! Generated on first use in its directory (created 0700: `ca.pem`, the
//! certificate that clients trust, and `ca.key`, its private key, created
//! with mode 0600 and never sent anywhere), then loaded from there on every
//! start. A directory with a certificate but no key gets a new CA. It signs the
//! leaf certificates of [`super::leaf`]; `quotagate ca export` prints
//! `ca.pem`. It does not rotate itself, revoke, or constrain names: whoever
//! can read `ca.key` can impersonate any host to a client that trusts it.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// File names inside the CA directory.
pub const CERT_FILE: &str = "ca.pem";
pub const KEY_FILE: &str = "ca.key";

/// Why the CA could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("local CA in {dir}: {source}")]
    Io { dir: String, source: io::Error },
    #[error("local CA in {dir}: {detail}")]
    Invalid { dir: String, detail: String },
}

/// A loaded CA: its certificate as clients see it, and what signs leaves.
pub struct LocalCa {
    cert_pem: String,
    /// The CA's parameters re-signed in memory: the issuer name and key
    /// identifier that leaves carry, identical to those of `cert_pem`.
    issuer: Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").finish_non_exhaustive()
    }
}

/// The CA's subject; the same on every load, so leaves name the stored certificate as issuer.
fn params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "quotagate local CA");
    dn.push(DnType::OrganizationName, "quotagate forward proxy");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

impl LocalCa {
    /// Load the CA from `dir`, creating the directory and a new CA there if it has none.
    pub fn load_or_create(dir: &Path) -> Result<LocalCa, CaError> {
        let io_err = |source| CaError::Io { dir: dir.display().to_string(), source };
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if !key_path.exists() {
            let mut mkdir = std::fs::DirBuilder::new();
            mkdir.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut mkdir, 0o700);
            mkdir.create(dir).map_err(io_err)?;
            let key = KeyPair::generate().map_err(|e| invalid(dir, e))?;
            let mut first = params();
            // Validity: from a day ago (clock skew) for ten years.
            let now = time::OffsetDateTime::now_utc();
            first.not_before = now - time::Duration::days(1);
            first.not_after = now + time::Duration::days(3650);
            let cert = first.self_signed(&key).map_err(|e| invalid(dir, e))?;
            write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io_err)?;
            std::fs::write(&cert_path, cert.pem()).map_err(io_err)?;
            tracing::info!(dir = %dir.display(), "created the forward proxy's local CA");
        }
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err)?;
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(dir, format!("{KEY_FILE}: {e}")))?;
        let issuer = params().self_signed(&key).map_err(|e| invalid(dir, e))?;
        Ok(LocalCa { cert_pem, issuer, key })
    }

    /// The CA certificate, PEM: what clients add to their trust store.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Sign a leaf with the CA's key.
    pub(super) fn sign(
        &self,
        leaf: CertificateParams,
        leaf_key: &KeyPair,
    ) -> Result<Certificate, rcgen::Error> {
        leaf.signed_by(leaf_key, &self.issuer, &self.key)
    }
}

/// The default CA directory: `$STATE_DIRECTORY/ca` under systemd (and in the
/// image, which sets it), else `quotagate-ca` in the working directory.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY") {
        // systemd may list several directories, separated by colons.
        Some(dirs) if !dirs.is_empty() => {
            let first = dirs.to_string_lossy().split(':').next().unwrap_or_default().to_string();
            PathBuf::from(first).join("ca")
        }
        _ => PathBuf::from("quotagate-ca"),
    }
}

fn invalid(dir: &Path, e: impl std::fmt::Display) -> CaError {
    CaError::Invalid { dir: dir.display().to_string(), detail: e.to_string() }
}

/// Create `path` readable by its owner only (0600 on Unix), failing if it exists.
fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_created_once_with_a_private_key_file_and_loaded_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/ca");
        let first = LocalCa::load_or_create(&path).unwrap();
        assert!(first.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path.join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the CA key is readable by its owner only");
            let dir_mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(dir_mode & 0o777, 0o700, "so is its directory");
        }
        let again = LocalCa::load_or_create(&path).unwrap();
        assert_eq!(first.cert_pem(), again.cert_pem(), "a second start reuses the stored CA");
    }
}

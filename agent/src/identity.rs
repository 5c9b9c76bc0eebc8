//! The agent's identity: a private key and a self-signed certificate in the
//! state directory; peers trust it by the SHA-256 of the certificate.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::{Error, Place};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

const KEY: &str = "key.pem";
const CERT: &str = "cert.pem";

/// A loaded identity.
#[derive(Debug)]
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

/// A new key and certificate, with their PEM forms.
fn generate_pem() -> Result<(Identity, String, String), Error> {
    let ck = rcgen::generate_simple_self_signed(vec!["diskferry".to_string()])
        .map_err(|e| Error::new(ErrorCode::Internal, format!("generating a key: {e}")))?;
    let id = Identity { cert: ck.cert.der().clone(), key: PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()) };
    Ok((id, ck.signing_key.serialize_pem(), ck.cert.pem()))
}

impl Identity {
    /// A fresh identity, not saved anywhere (the demo's throw-away agents).
    pub fn generate() -> Result<Identity, Error> {
        Ok(generate_pem()?.0)
    }

    /// Hex SHA-256 of the certificate.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    /// Fails unless the key is the one the certificate was made for.
    fn check_pair(&self, key_path: &Path, cert_path: &Path) -> Result<(), Error> {
        let provider = crate::crypto::provider();
        rustls::sign::CertifiedKey::from_der(vec![self.cert.clone()], self.private_key(), &provider).map(|_| ()).map_err(
            |e| {
                tracing::debug!("identity check: {e}");
                Error::new(
                    ErrorCode::Identity,
                    format!(
                        "the agent's identity is inconsistent: {} does not belong to {}",
                        key_path.display(),
                        cert_path.display()
                    ),
                )
                .hint("restore both files of the identity from the same backup, or make a new identity with `diskferry init` and give its fingerprint to the peers")
            },
        )
    }

    /// The key in the form rustls takes.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// Hex SHA-256 of a certificate's DER bytes.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// Normalizes a fingerprint as written by a person (case, colons).
pub fn normalize_fingerprint(s: &str) -> Option<String> {
    let clean: String = s.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect::<String>().to_ascii_lowercase();
    (clean.len() == 64 && clean.chars().all(|c| c.is_ascii_hexdigit())).then_some(clean)
}

fn dir(state: &Path) -> PathBuf {
    state.join("identity")
}

/// Creates the identity in `state`; refuses to overwrite an existing one.
pub fn init(state: &Path) -> Result<Identity, Error> {
    let d = dir(state);
    if d.join(KEY).exists() || d.join(CERT).exists() {
        return Err(Error::new(ErrorCode::InvalidInput, format!("{} already holds an identity", d.display()))
            .hint("`diskferry id` prints its fingerprint; remove it by hand only if you mean to change identity"));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)
        .map_err(|e| Error::io(Place::State, "creating", &d, e))?;
    let (id, key_pem, cert_pem) = generate_pem()?;
    write_new(&d.join(KEY), key_pem.as_bytes())?;
    write_new(&d.join(CERT), cert_pem.as_bytes())?;
    id.check_pair(&d.join(KEY), &d.join(CERT))?;
    Ok(id)
}

/// Loads the identity from `state`.
pub fn load(state: &Path) -> Result<Identity, Error> {
    let d = dir(state);
    let bad = |p: &Path, what: &str| {
        Error::new(ErrorCode::Identity, format!("{} is not a PEM {what}", p.display()))
            .hint("restore the identity from a backup, or make a new one with `diskferry init` in an empty directory")
    };
    let (kp, cp) = (d.join(KEY), d.join(CERT));
    for p in [&kp, &cp] {
        if !p.exists() {
            return Err(Error::new(ErrorCode::Identity, format!("{} does not exist", p.display()))
                .hint(format!("run `diskferry init --state-dir {}` first", state.display())));
        }
    }
    // Like ssh: a key others can read is not a secret any more.
    let mode = fs::metadata(&kp).map_err(|e| Error::io(Place::State, "reading", &kp, e))?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(Error::new(
            ErrorCode::Identity,
            format!(
                "{} is readable by others (mode {:o}): the agent's private key must be private",
                kp.display(),
                mode & 0o777
            ),
        )
        .hint(format!(
            "run `chmod 600 {}`, and make a new identity with `diskferry init` if others may have read it",
            kp.display()
        )));
    }
    let key = PrivatePkcs8KeyDer::from_pem_file(&kp).map_err(|_| bad(&kp, "private key"))?;
    let cert = CertificateDer::from_pem_file(&cp).map_err(|_| bad(&cp, "certificate"))?;
    let id = Identity { cert, key };
    id.check_pair(&kp, &cp)?;
    Ok(id)
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(Place::State, "creating", path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(Place::State, "writing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_world_readable_or_foreign_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        init(&a).unwrap();
        assert!(load(&a).is_ok());
        let key = a.join("identity").join(KEY);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&a).unwrap_err();
        assert_eq!(e.code, ErrorCode::Identity);
        assert!(e.hint.as_deref().is_some_and(|h| h.contains("chmod 600")), "{e:?}");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        // Another identity's key beside this certificate.
        let b = dir.path().join("b");
        init(&b).unwrap();
        fs::copy(b.join("identity").join(KEY), &key).unwrap();
        let e = load(&a).unwrap_err();
        assert_eq!(e.code, ErrorCode::Identity);
        assert!(e.message.contains("does not belong to"), "{e:?}");
    }

    #[test]
    fn fingerprints_normalize() {
        let f = "AB".repeat(32);
        assert_eq!(normalize_fingerprint(&f), Some("ab".repeat(32)));
        let colons: Vec<String> = (0..32).map(|_| "AB".to_string()).collect();
        assert_eq!(normalize_fingerprint(&colons.join(":")), Some("ab".repeat(32)));
        assert_eq!(normalize_fingerprint("abc"), None);
    }
}

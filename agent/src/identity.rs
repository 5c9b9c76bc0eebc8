//! The agent's identity: a private key and a self-signed certificate in the
//! state directory; peers trust it by the SHA-256 of the certificate.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
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
    let key = PrivatePkcs8KeyDer::from_pem_file(&kp).map_err(|_| bad(&kp, "private key"))?;
    let cert = CertificateDer::from_pem_file(&cp).map_err(|_| bad(&cp, "certificate"))?;
    Ok(Identity { cert, key })
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
    fn fingerprints_normalize() {
        let f = "AB".repeat(32);
        assert_eq!(normalize_fingerprint(&f), Some("ab".repeat(32)));
        let colons: Vec<String> = (0..32).map(|_| "AB".to_string()).collect();
        assert_eq!(normalize_fingerprint(&colons.join(":")), Some("ab".repeat(32)));
        assert_eq!(normalize_fingerprint("abc"), None);
    }
}

//! Mutual TLS by pinned fingerprints: each side presents its self-signed
//! certificate and accepts only peers whose certificate hash it was given.
//! The handshake signature is still checked, so holding a certificate is not
//! enough: the peer must hold its key.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use crate::identity::{fingerprint, Identity};

fn algorithms() -> WebPkiSupportedAlgorithms {
    crate::crypto::provider().signature_verification_algorithms
}

/// The handshake-signature half of a verifier, the same for both sides:
/// pinning decides which certificate, this proves the peer holds its key.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// Accepts exactly one server certificate (the `--peer-fingerprint`).
#[derive(Debug)]
pub struct PinnedServer {
    fingerprint: String,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedServer {
    pub fn new(fingerprint: String) -> Self {
        PinnedServer { fingerprint, algs: algorithms() }
    }
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let got = fingerprint(end_entity);
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            tracing::warn!(expected = %self.fingerprint, got = %got, "peer certificate does not match --peer-fingerprint");
            Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    signature_checks!();
}

/// Accepts client certificates whose fingerprints are listed (fingerprint → peer name).
#[derive(Debug)]
pub struct AllowedClients {
    peers: BTreeMap<String, String>,
    algs: WebPkiSupportedAlgorithms,
}

impl AllowedClients {
    pub fn new(peers: BTreeMap<String, String>) -> Self {
        AllowedClients { peers, algs: algorithms() }
    }
}

impl ClientCertVerifier for AllowedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let got = fingerprint(end_entity);
        if self.peers.contains_key(&got) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(fingerprint = %got, "refused a peer whose certificate is not trusted (add it as a [[peer]])");
            Err(Error::InvalidCertificate(CertificateError::UnknownIssuer))
        }
    }

    signature_checks!();
}

/// TLS config of a source: our identity, the target pinned.
pub fn client_config(id: &Identity, peer_fingerprint: &str) -> Result<rustls::ClientConfig, Error> {
    let mut c = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer::new(peer_fingerprint.to_string())))
        .with_client_auth_cert(vec![id.cert.clone()], id.private_key())?;
    c.alpn_protocols = vec![diskferry_protocol::ALPN.to_vec()];
    Ok(c)
}

/// TLS config of a target: our identity, clients from the allow list.
pub fn server_config(id: &Identity, peers: BTreeMap<String, String>) -> Result<rustls::ServerConfig, Error> {
    let mut c = rustls::ServerConfig::builder_with_provider(crate::crypto::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AllowedClients::new(peers)))
        .with_single_cert(vec![id.cert.clone()], id.private_key())?;
    c.alpn_protocols = vec![diskferry_protocol::ALPN.to_vec()];
    c.max_early_data_size = 0;
    Ok(c)
}

/// The peer's certificate fingerprint on an established connection.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<String> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(fingerprint)
}

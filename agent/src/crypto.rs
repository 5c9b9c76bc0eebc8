//! Which cryptography the agent uses for TLS.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider: aws-lc-rs for the bulk cipher (its AES-GCM is the
/// fastest with large packets), AES-128 first (fewer rounds than AES-256);
/// ring for the handshake, whose randomness needs no aws-lc entropy seeding
/// (which costs about 30 ms of CPU jitter sampling per process).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::{aws_lc_rs, ring};
    let mut p = ring::default_provider();
    p.cipher_suites =
        vec![aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256, aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384];
    Arc::new(p)
}

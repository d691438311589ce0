//! The TLS path's parsing: arbitrary bytes as the first records a client
//! sends to a proxy port with `[tls]` (fed to rustls as the worker feeds
//! them after the 0x16 sniff), whole and in two pieces, must never panic
//! and must fail or not the same way; and the certificate's `notAfter`
//! reader (our own DER walk) on arbitrary bytes.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use splicegate_tls::rustls::pki_types::pem::PemObject;
use splicegate_tls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use splicegate_tls::rustls::{self, ServerConfig, ServerConnection};

/// A fixed self-signed P-256 certificate (a fuzz fixture, no secret).
const CERT: &str = include_str!("tls_cert.pem");
const KEY: &str = include_str!("tls_key.pem");

fn config() -> Arc<ServerConfig> {
    static CONFIG: OnceLock<Arc<ServerConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let cert = CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap();
            let key = PrivateKeyDer::from_pem_slice(KEY.as_bytes()).unwrap();
            let mut c = ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(c)
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let _ = splicegate_tls::cert::not_after(data);
    if data.first() != Some(&0x16) {
        return;
    }
    let whole = {
        let mut conn = ServerConnection::new(config()).unwrap();
        splicegate_tls::feed(&mut conn, data).is_ok()
    };
    let cut = data.len() / 2;
    let split = {
        let mut conn = ServerConnection::new(config()).unwrap();
        splicegate_tls::feed(&mut conn, &data[..cut]).is_ok()
            && splicegate_tls::feed(&mut conn, &data[cut..]).is_ok()
    };
    assert_eq!(
        whole, split,
        "fed whole: ok={whole}; in two pieces: ok={split}"
    );
});

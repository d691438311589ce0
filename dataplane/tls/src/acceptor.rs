//! The server side's configuration: the certificate and key from PEM files,
//! ALPN `http/1.1`, TLS 1.2 and 1.3, session resumption by tickets (keys
//! rotated) and by session id, reloadable while connections run.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use splicegate_uring::TcpStream;

use crate::stream::TlsStream;

/// A server connection over a ring socket.
pub type ServerStream = TlsStream<rustls::ServerConnection>;

/// Why a certificate and key could not be used; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read or holds no PEM object of its kind.
    #[error("{path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// rustls refused the pair (the key does not match the certificate, an
    /// unsupported key type, …).
    #[error("{cert} with {key}: {why}")]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's words.
        why: String,
    },
}

/// A TLS record with a fatal `handshake_failure` alert: the answer of a
/// port without `[tls]` to a ClientHello.
pub const HANDSHAKE_FAILURE_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];

/// Sessions remembered for TLS 1.2 resumption by session id, per process.
const SESSION_CACHE: usize = 16_384;

/// What a proxy port (or the agent listener) accepts TLS with. Shared by
/// every worker; [`Acceptor::reload`] swaps the certificate for new
/// connections while open ones keep theirs.
pub struct Acceptor {
    alpn: Vec<Vec<u8>>,
    tls13_only: bool,
    config: ArcSwap<ServerConfig>,
    not_after: AtomicI64,
    /// Kept across reloads, so a reload does not end resumption.
    ticketer: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("not_after", &self.not_after())
            .finish_non_exhaustive()
    }
}

/// Reads the certificate chain and the private key.
fn read_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), LoadError> {
    let file = |path: &Path, why: String| LoadError::File {
        path: path.to_path_buf(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(file(cert, "no CERTIFICATE in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file(key, e.to_string()))?;
    Ok((certs, key_der))
}

/// A server configuration for `cert` and `key` that resumes with
/// `ticketer` and `sessions`, and the certificate's `notAfter`.
fn server_config(
    cert: &Path,
    key: &Path,
    alpn: &[Vec<u8>],
    tls13_only: bool,
    ticketer: &Arc<dyn ProducesTickets>,
    sessions: &Arc<dyn StoresServerSessions>,
) -> Result<(ServerConfig, Option<i64>), LoadError> {
    let (certs, key_der) = read_pair(cert, key)?;
    let not_after = crate::cert::not_after(&certs[0]);
    let builder =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()));
    let versions = if tls13_only {
        builder.with_protocol_versions(&[&rustls::version::TLS13])
    } else {
        builder.with_safe_default_protocol_versions()
    };
    let mut config = versions
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key_der))
        .map_err(|e| LoadError::Pair {
            cert: cert.into(),
            key: key.into(),
            why: e.to_string(),
        })?;
    config.alpn_protocols = alpn.to_vec();
    config.ticketer = ticketer.clone();
    config.session_storage = sessions.clone();
    // Two tickets per TLS 1.3 handshake (rustls's default): a browser
    // opening parallel connections resumes each of the next two.
    config.send_tls13_tickets = 2;
    Ok((config, not_after))
}

impl Acceptor {
    /// Loads `cert` (PEM chain, leaf first) and `key` (PEM, PKCS#8, PKCS#1
    /// or SEC1); `alpn` lists the protocols offered (`http/1.1` for the proxy
    /// port: a ClientHello without ALPN is accepted, one offering only
    /// others gets `no_application_protocol`).
    pub fn load(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<Acceptor, LoadError> {
        Acceptor::load_with(cert, key, alpn, false)
    }

    /// Like [`Acceptor::load`], TLS 1.3 only (the agent listener).
    pub fn load_tls13(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<Acceptor, LoadError> {
        Acceptor::load_with(cert, key, alpn, true)
    }

    fn load_with(
        cert: &Path,
        key: &Path,
        alpn: &[&[u8]],
        tls13_only: bool,
    ) -> Result<Acceptor, LoadError> {
        // Ticket keys rotate every 6 hours; a ticket lives 12.
        let ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| LoadError::Pair {
            cert: cert.into(),
            key: key.into(),
            why: format!("session tickets: {e}"),
        })?;
        let sessions: Arc<dyn StoresServerSessions> = ServerSessionMemoryCache::new(SESSION_CACHE);
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let (config, not_after) =
            server_config(cert, key, &alpn, tls13_only, &ticketer, &sessions)?;
        Ok(Acceptor {
            alpn,
            tls13_only,
            config: ArcSwap::from_pointee(config),
            not_after: AtomicI64::new(not_after.unwrap_or(i64::MIN)),
            ticketer,
            sessions,
        })
    }

    /// Reads `cert` and `key` again; new connections use them, open ones
    /// keep what they started with. On an error nothing changes.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), LoadError> {
        let (config, not_after) = server_config(
            cert,
            key,
            &self.alpn,
            self.tls13_only,
            &self.ticketer,
            &self.sessions,
        )?;
        self.config.store(Arc::new(config));
        self.not_after
            .store(not_after.unwrap_or(i64::MIN), Ordering::Relaxed);
        Ok(())
    }

    /// The certificate's `notAfter` (seconds since the epoch), if it could
    /// be read.
    pub fn not_after(&self) -> Option<i64> {
        Some(self.not_after.load(Ordering::Relaxed)).filter(|&t| t != i64::MIN)
    }

    /// The configuration new connections get.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// A server connection over `tcp`. Bytes a protocol sniff already read
    /// go in with [`TlsStream::feed`]; the handshake is the caller's to run
    /// ([`TlsStream::handshake`], under its deadline).
    pub fn accept(&self, tcp: TcpStream) -> io::Result<ServerStream> {
        let conn =
            rustls::ServerConnection::new(self.config()).map_err(crate::stream::tls_error)?;
        Ok(TlsStream::new(tcp, conn))
    }
}

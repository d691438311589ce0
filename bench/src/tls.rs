//! TLS to the proxy, as a client sees it: a certificate made at run time
//! (ECDSA P-256, self-signed for `localhost`) that every peer serves, and a
//! rustls client (ring provider, TLS 1.3 only, ALPN `http/1.1`) that opens
//! TLS to the proxy and speaks the proxy's protocol inside it (CONNECT for
//! splicegate; nothing for an L4 relay terminating TLS, whose frontend is
//! already bound to one target).

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore, StreamOwned};

use crate::client::{Auth, Proto, Route, connect_handshake, dial, l4_frontend};

/// The name the certificate is for, and the client's SNI.
pub(crate) const SERVER_NAME: &str = "localhost";

/// The certificate and its key as files: `cert` and `key` for splicegate's
/// `[tls]`, `combined` (certificate then key) for HAProxy's `crt`.
#[derive(Debug, Clone)]
pub(crate) struct Pki {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub combined: PathBuf,
    der: CertificateDer<'static>,
}

impl Pki {
    /// A fresh ECDSA P-256 key and a self-signed certificate for
    /// `localhost` and 127.0.0.1, written into `dir`.
    pub(crate) fn make(dir: &Path) -> Result<Pki> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating the P-256 key")?;
        let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.into(), "127.0.0.1".into()])
            .context("certificate parameters")?
            .self_signed(&key)
            .context("signing the certificate")?;
        let (c, k, both) = (
            dir.join("bench-cert.pem"),
            dir.join("bench-key.pem"),
            dir.join("bench-combined.pem"),
        );
        std::fs::write(&c, cert.pem())?;
        std::fs::write(&k, key.serialize_pem())?;
        std::fs::write(&both, format!("{}{}", cert.pem(), key.serialize_pem()))?;
        Ok(Pki {
            cert: c,
            key: k,
            combined: both,
            der: cert.der().clone(),
        })
    }

    /// A client configuration of its own for one run: TLS 1.3 only, ALPN
    /// `http/1.1`, trusting only this certificate; `resume`: an in-memory
    /// session cache (TLS 1.3 tickets), else no resumption at all.
    pub(crate) fn client(&self, resume: bool) -> Result<Arc<ClientConfig>> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone())?;
        let mut c =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(roots)
                .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        c.resumption = if resume {
            Resumption::in_memory_sessions(256)
        } else {
            Resumption::disabled()
        };
        Ok(Arc::new(c))
    }
}

/// A TLS connection to the proxy.
pub(crate) type TlsConn = StreamOwned<ClientConnection, TcpStream>;

/// What a handshake settled, for the report: cipher suite and key exchange
/// group.
pub(crate) fn params(c: &ClientConnection) -> String {
    let suite = c
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    let group = c
        .negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()))
        .unwrap_or_default();
    format!("{suite}, {group}")
}

/// Dial `addr` (from `src`), then the whole TLS handshake.
fn handshake(
    addr: SocketAddr,
    src: Option<Ipv4Addr>,
    config: &Arc<ClientConfig>,
    io: Duration,
) -> Result<TlsConn> {
    let sock = dial(addr, src, io)?;
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| anyhow!("{e}"))?;
    let conn = ClientConnection::new(config.clone(), name)?;
    let mut s = StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).context("TLS handshake")?;
    }
    Ok(s)
}

/// A tunnel inside TLS to `target`, the kind of handshake it took, and how
/// many target bytes came with the proxy's reply.
pub(crate) struct TlsTunnel {
    pub stream: TlsConn,
    pub kind: Option<HandshakeKind>,
    pub early: usize,
}

/// Open TLS to the proxy on `route` and a tunnel inside it to `target`:
/// CONNECT with `auth` for a proxy, nothing more for an L4 relay (its
/// frontend for `target` terminates TLS).
pub(crate) fn open(
    route: &Route,
    target: SocketAddr,
    src: Option<Ipv4Addr>,
    auth: Option<&Auth>,
    config: &Arc<ClientConfig>,
    io: Duration,
) -> Result<TlsTunnel> {
    let (mut stream, connect) = match route {
        Route::L4(map) => (
            handshake(l4_frontend(map, target)?, src, config, io)?,
            false,
        ),
        Route::Proxy {
            proto: Proto::Connect,
            addr,
            ..
        } => (handshake(*addr, src, config, io)?, true),
        Route::Proxy { proto, .. } => bail!("TLS cells use CONNECT, not {}", proto.label()),
        Route::Direct => bail!("no TLS without a proxy"),
    };
    let kind = stream.conn.handshake_kind();
    let early = if connect {
        connect_handshake(&mut stream, target, auth)?
    } else {
        0
    };
    Ok(TlsTunnel {
        stream,
        kind,
        early,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};

    /// The generated pair serves a rustls server that the bench client
    /// trusts; the second connection resumes, and a client without
    /// resumption never does.
    #[test]
    fn client_trusts_the_certificate_and_resumes() {
        let dir = std::env::temp_dir().join(format!("sgbench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki::make(&dir).unwrap();
        let combined = std::fs::read_to_string(&pki.combined).unwrap();
        assert!(combined.contains("BEGIN CERTIFICATE") && combined.contains("PRIVATE KEY"));
        let certs = CertificateDer::pem_file_iter(&pki.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&pki.key).unwrap();
        let server = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
        );
        let listener = crate::targets::listener(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let serve = std::thread::spawn(move || {
            for _ in 0..4 {
                let (sock, _) = listener.accept().unwrap();
                let conn = rustls::ServerConnection::new(server.clone()).unwrap();
                let mut s = StreamOwned::new(conn, sock);
                let mut b = [0u8; 5];
                s.read_exact(&mut b).unwrap();
                s.write_all(&b).unwrap();
                s.conn.send_close_notify();
                let _ = s.flush();
            }
        });
        let route = Route::L4(vec![(addr, addr)]);
        let io = Duration::from_secs(5);
        let mut kinds = Vec::new();
        for resume in [true, true, false, false] {
            let config = if resume {
                static CFG: std::sync::OnceLock<Arc<ClientConfig>> = std::sync::OnceLock::new();
                CFG.get_or_init(|| pki.client(true).unwrap()).clone()
            } else {
                pki.client(false).unwrap()
            };
            let mut t = open(&route, addr, None, None, &config, io).unwrap();
            t.stream.write_all(b"hello").unwrap();
            let mut b = Vec::new();
            t.stream.read_to_end(&mut b).unwrap();
            assert_eq!(b, b"hello");
            assert!(params(&t.stream.conn).starts_with("TLS13_"));
            kinds.push(t.kind);
        }
        serve.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            kinds,
            [
                Some(HandshakeKind::Full),
                Some(HandshakeKind::Resumed),
                Some(HandshakeKind::Full),
                Some(HandshakeKind::Full)
            ]
        );
    }
}

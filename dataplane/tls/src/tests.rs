//! The driver against rustls's own blocking client on a thread: handshake,
//! ALPN, resumption, reload, bad records, and the relay's bytes, counters
//! and half-close.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use splicegate_uring::{RelayCtl, RelayEnd, Runtime, RuntimeConfig, TcpListener, TcpStream};

use crate::{Acceptor, ServerStream};

/// A self-signed certificate for `gw.test` in PEM files in a fresh
/// directory; (cert path, key path, DER).
fn cert_files(tag: &str) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let dir = std::env::temp_dir().join(format!(
        "splicegate-tls-{tag}-{}-{:?}",
        std::process::id(),
        thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["gw.test".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k, cert.der().clone())
}

fn client_config(trust: &CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(trust.clone()).unwrap();
    let mut c =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

fn connect(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
) -> StreamOwned<ClientConnection, StdStream> {
    let conn =
        ClientConnection::new(config.clone(), ServerName::try_from("gw.test").unwrap()).unwrap();
    let sock = StdStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    StreamOwned::new(conn, sock)
}

/// Runs `server` on a ring with a listener; `client` on a thread with its
/// address. Returns what each returned.
fn with_server<S, C, RS, RC>(server: S, client: C) -> (RS, RC)
where
    S: AsyncFnOnce(TcpListener) -> RS,
    C: FnOnce(SocketAddr) -> RC + Send + 'static,
    RC: Send + 'static,
{
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap(), 64).unwrap();
    let addr = listener.local_addr().unwrap();
    let client = thread::spawn(move || client(addr));
    let rs = rt.block_on(server(listener)).unwrap();
    (rs, client.join().unwrap())
}

/// Accept one connection and start TLS on it (after sniffing its first
/// bytes, as the worker does).
async fn accept_tls(listener: &TcpListener, acceptor: &Acceptor) -> std::io::Result<ServerStream> {
    let (tcp, _) = listener.accept().await?;
    let mut first = [0u8; 5];
    let n = tcp.read(&mut first).await?;
    assert_eq!(
        first[0], 0x16,
        "a ClientHello starts with a handshake record"
    );
    let tls = acceptor.accept(tcp)?;
    tls.feed(&first[..n])?;
    if let Err(e) = tls.handshake().await {
        tls.linger(Duration::from_secs(1)).await;
        return Err(e);
    }
    Ok(tls)
}

#[test]
fn handshake_alpn_and_echo() {
    let (c, k, der) = cert_files("echo");
    let acceptor = Acceptor::load(&c, &k, &[b"http/1.1"]).unwrap();
    assert!(acceptor.not_after().is_some());
    let config = client_config(&der, &[b"h2", b"http/1.1"]);
    let ((alpn, echoed), same) = with_server(
        async |l| {
            let tls = accept_tls(&l, &acceptor).await.unwrap();
            let mut buf = vec![0u8; 100_000];
            let mut total = 0;
            loop {
                let n = tls.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                tls.write_all(&buf[..n]).await.unwrap();
                total += n;
            }
            tls.shutdown().await.unwrap();
            (
                tls.with_conn(|c| c.alpn_protocol().map(<[u8]>::to_vec)),
                total,
            )
        },
        move |addr| {
            let mut s = connect(addr, &config);
            let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            s.write_all(&data).unwrap();
            s.conn.send_close_notify();
            s.flush().unwrap();
            let mut got = Vec::new();
            // Everything echoed, then the server's close_notify ends the read.
            s.read_to_end(&mut got).unwrap();
            got == data
        },
    );
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(echoed, 300_000);
    assert!(same, "the echoed bytes differ");
}

#[test]
fn only_h2_gets_no_application_protocol() {
    let (c, k, der) = cert_files("alpn");
    let acceptor = Acceptor::load(&c, &k, &[b"http/1.1"]).unwrap();
    let config = client_config(&der, &[b"h2"]);
    let (server, client) = with_server(
        async |l| accept_tls(&l, &acceptor).await.map(drop),
        move |addr| {
            let mut s = connect(addr, &config);
            s.write_all(b"x")
                .and_then(|()| s.flush())
                .err()
                .map(|e| e.to_string())
        },
    );
    let e = server.expect_err("no common protocol");
    assert!(format!("{e:?}").contains("NoApplicationProtocol"), "{e:?}");
    let client = client.expect("the client saw the alert");
    assert!(client.contains("NoApplicationProtocol"), "{client}");
}

#[test]
fn garbage_after_the_record_type_is_an_error() {
    let (c, k, _) = cert_files("garbage");
    let acceptor = Acceptor::load(&c, &k, &[b"http/1.1"]).unwrap();
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0".parse().unwrap(), 4).unwrap();
        let addr = l.local_addr().unwrap();
        let _c = StdStream::connect(addr).unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let e = acceptor
            .accept(tcp)
            .unwrap()
            .feed(b"\x16\x03\x01\xff\xff garbage that is no ClientHello")
            .expect_err("not a record");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    })
    .unwrap();
}

#[test]
fn resumption_and_reload() {
    let (c, k, der) = cert_files("resume");
    let acceptor = Acceptor::load(&c, &k, &[b"http/1.1"]).unwrap();
    let config = client_config(&der, &[]);
    let (c2, k2, der2) = cert_files("resume-next");
    let config2 = client_config(&der2, &[]);
    let (kinds, ()) = with_server(
        async |l| {
            let mut kinds = Vec::new();
            for i in 0..3 {
                if i == 2 {
                    acceptor.reload(&c2, &k2).unwrap();
                }
                let tls = accept_tls(&l, &acceptor).await.unwrap();
                let mut b = [0u8; 4];
                let n = tls.read(&mut b).await.unwrap();
                tls.write_all(&b[..n]).await.unwrap();
                kinds.push(tls.with_conn(|c| c.handshake_kind()));
            }
            kinds
        },
        move |addr| {
            for cfg in [&config, &config, &config2] {
                let mut s = connect(addr, cfg);
                s.write_all(b"ping").unwrap();
                let mut b = [0u8; 4];
                s.read_exact(&mut b).unwrap();
                assert_eq!(&b, b"ping");
            }
        },
    );
    use rustls::HandshakeKind::{Full, Resumed};
    assert_eq!(kinds[0], Some(Full));
    assert_eq!(
        kinds[1],
        Some(Resumed),
        "the second connection resumes by ticket"
    );
    // After the reload, a client that trusts only the new certificate
    // connects (it would fail on the old one).
    assert!(kinds[2].is_some());
}

/// The relay: 4 MB up and 4 MB down at once through an echo-less node
/// (a sink that also sends), counters exact, half-close both ways.
#[test]
fn relay_moves_both_ways_and_half_closes() {
    const UP: usize = 4_000_000;
    const DOWN: usize = 3_000_000;
    let (c, k, der) = cert_files("relay");
    let acceptor = Acceptor::load(&c, &k, &[b"http/1.1"]).unwrap();
    let config = client_config(&der, &[]);
    // The node: reads everything until EOF (counting), meanwhile sends DOWN
    // bytes, then closes.
    let node = StdListener::bind("127.0.0.1:0").unwrap();
    let node_addr = node.local_addr().unwrap();
    let node_thread = thread::spawn(move || {
        let (mut s, _) = node.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        let sender = thread::spawn(move || {
            let chunk: Vec<u8> = (0..DOWN).map(|i| (i % 239) as u8).collect();
            w.write_all(&chunk).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        sender.join().unwrap();
        got
    });
    let (outcome, down) = with_server(
        async |l| {
            let tls = accept_tls(&l, &acceptor).await.unwrap();
            let up = TcpStream::connect(node_addr, None).await.unwrap();
            let ctl = RelayCtl::new();
            ctl.set_idle_timeout(Some(Duration::from_secs(10)));
            let o = crate::relay(&tls, &up, &ctl).await;
            (o, ctl.a_to_b(), ctl.b_to_a())
        },
        move |addr| {
            let mut s = connect(addr, &config);
            let data: Vec<u8> = (0..UP).map(|i| (i % 251) as u8).collect();
            // One thread of the client: write everything, then close_notify,
            // reading as it goes (the node sends at the same time).
            let mut down = Vec::new();
            let mut sent = 0;
            s.sock.set_nonblocking(true).unwrap();
            let mut buf = vec![0u8; 65536];
            let mut notified = false;
            loop {
                if sent < data.len() {
                    let end = (sent + 16384).min(data.len());
                    // rustls takes what its buffer limit allows.
                    sent += s.conn.writer().write(&data[sent..end]).unwrap();
                } else if !notified {
                    s.conn.send_close_notify();
                    notified = true;
                }
                while s.conn.wants_write() {
                    match s.conn.write_tls(&mut s.sock) {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                match s.conn.read_tls(&mut s.sock) {
                    Ok(0) => break,
                    Ok(_) => {
                        s.conn.process_new_packets().unwrap();
                        loop {
                            match s.conn.reader().read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => down.extend_from_slice(&buf[..n]),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_micros(200));
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            down
        },
    );
    let got_up = node_thread.join().unwrap();
    let (o, a_to_b, b_to_a) = outcome;
    assert!(matches!(o.end, RelayEnd::Closed), "{:?}", o.end);
    assert_eq!((o.a_to_b, o.b_to_a), (UP as u64, DOWN as u64));
    assert_eq!((a_to_b, b_to_a), (UP as u64, DOWN as u64));
    assert_eq!(got_up.len(), UP);
    assert!(
        got_up
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i % 251) as u8)
    );
    assert_eq!(down.len(), DOWN);
    assert!(down.iter().enumerate().all(|(i, &b)| b == (i % 239) as u8));
}

/// Stop ends an idle TLS tunnel at once; the idle timeout ends it too.
#[test]
fn relay_stops_and_idles_out() {
    let (c, k, der) = cert_files("idle");
    let acceptor = Acceptor::load(&c, &k, &[]).unwrap();
    let config = client_config(&der, &[]);
    let node = StdListener::bind("127.0.0.1:0").unwrap();
    let node_addr = node.local_addr().unwrap();
    let keep = thread::spawn(move || {
        let a = node.accept().unwrap();
        let b = node.accept().unwrap();
        thread::sleep(Duration::from_secs(2));
        drop((a, b));
    });
    let (ends, ()) = with_server(
        async |l| {
            let mut ends = Vec::new();
            for stop in [true, false] {
                let tls = accept_tls(&l, &acceptor).await.unwrap();
                let up = TcpStream::connect(node_addr, None).await.unwrap();
                let ctl = RelayCtl::new();
                ctl.set_idle_timeout(Some(Duration::from_millis(300)));
                if stop {
                    let c2 = ctl.clone();
                    splicegate_uring::spawn(async move {
                        splicegate_uring::sleep(Duration::from_millis(50)).await;
                        c2.stop();
                    });
                }
                let t = std::time::Instant::now();
                let o = crate::relay(&tls, &up, &ctl).await;
                ends.push((o.end, t.elapsed()));
            }
            ends
        },
        move |addr| {
            let mut held = Vec::new();
            for _ in 0..2 {
                let mut s = connect(addr, &config);
                s.write_all(b"").unwrap();
                s.flush().unwrap();
                // Finish the handshake.
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock).unwrap();
                }
                held.push(s);
            }
            thread::sleep(Duration::from_secs(1));
        },
    );
    keep.join().unwrap();
    assert!(matches!(ends[0].0, RelayEnd::Stopped), "{:?}", ends[0]);
    assert!(ends[0].1 < Duration::from_millis(250), "{:?}", ends[0]);
    assert!(matches!(ends[1].0, RelayEnd::Idle), "{:?}", ends[1]);
    assert!(ends[1].1 >= Duration::from_millis(300), "{:?}", ends[1]);
}

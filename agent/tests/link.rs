//! The link driver end to end in one process: a gateway end and a device
//! end over an in-memory pipe (the TLS layer is not what is under test
//! here), with real TCP targets on loopback.

use std::time::{Duration, Instant};

use splicegate_agent::link::{self, Config, Link, Opened, Role};
use splicegate_proto::agent::OpenError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

fn config(role: Role) -> Config {
    Config {
        role,
        heartbeat: Duration::from_secs(5),
        max_streams: 4,
        rate: None,
    }
}

/// A gateway end and a device end whose device connects each stream to
/// its target (refusing port 1 as "disallowed").
fn pair() -> Link {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let (gw, _, _) = link::spawn(a, Vec::new(), config(Role::Gateway));
    let (dev, mut incoming, _) = link::spawn(b, Vec::new(), config(Role::Device));
    tokio::spawn(async move {
        while let Some(inc) = incoming.recv().await {
            let dev = dev.clone();
            tokio::spawn(async move {
                if inc.target.ends_with(":1") {
                    dev.refuse(inc.stream, OpenError::Disallowed, "private".into())
                        .await;
                    return;
                }
                match TcpStream::connect(&inc.target).await {
                    Ok(tcp) => {
                        let (r, w) = tcp.into_split();
                        dev.accept(inc.stream, inc.window, r, w).await;
                    }
                    Err(e) => {
                        dev.refuse(inc.stream, OpenError::Refused, e.to_string())
                            .await
                    }
                }
            });
        }
    });
    gw
}

/// Opens a stream through `gw`; the test holds the client's end.
async fn open(gw: &Link, target: &str) -> Result<UnixStream, Opened> {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let (r, w) = theirs.into_split();
    match gw.open(target, r, w).await {
        Opened::Ok => Ok(ours),
        other => Err(other),
    }
}

async fn echo_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn bytes_arrive_in_order_and_half_close_works_both_ways() {
    let gw = pair();
    let target = echo_server().await;
    let mut s = open(&gw, &target).await.expect("opened");
    let sent: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.split();
    let writer = async {
        w.write_all(&sent).await.unwrap();
        // Half-close: the echo server sees EOF, echoes the rest and closes.
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let reader = r.read_to_end(&mut got);
    let (_, n) = tokio::join!(writer, reader);
    n.unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the echo differs");
    assert!(
        gw.stats()
            .bytes_out
            .load(std::sync::atomic::Ordering::Relaxed)
            >= sent.len() as u64
    );
}

#[tokio::test]
async fn refusals_carry_the_devices_reason() {
    let gw = pair();
    match open(&gw, "127.0.0.1:1").await {
        Err(Opened::Failed(OpenError::Disallowed, text)) => assert_eq!(text, "private"),
        other => panic!("{other:?}"),
    }
    // A closed port: refused by the target.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = l.local_addr().unwrap().to_string();
    drop(l);
    assert!(matches!(
        open(&gw, &closed).await,
        Err(Opened::Failed(OpenError::Refused, _))
    ));
}

#[tokio::test]
async fn a_stalled_stream_never_holds_up_another() {
    let gw = pair();
    // A target that accepts and never reads.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stall = l.local_addr().unwrap().to_string();
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        loop {
            let (s, _) = l.accept().await.unwrap();
            kept.push(s);
        }
    });
    let mut stuck = open(&gw, &stall).await.expect("opened");
    // Fill the stalled stream until it pushes back.
    let chunk = vec![7u8; 64 * 1024];
    let mut pushed = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_millis(300), stuck.write_all(&chunk)).await {
            Ok(Ok(())) => pushed += chunk.len(),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => break,
        }
        assert!(pushed < 64 << 20, "the stalled stream never pushed back");
    }
    // Another stream on the same link still moves 20 MB both ways.
    let target = echo_server().await;
    let mut s = open(&gw, &target).await.expect("opened");
    let (mut r, mut w) = s.split();
    let total = 20 << 20;
    let t0 = Instant::now();
    let writer = async {
        let block = vec![1u8; 256 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(block.len());
            w.write_all(&block[..n]).await.unwrap();
            left -= n;
        }
        w.shutdown().await.unwrap();
    };
    let mut got = 0usize;
    let reader = async {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(writer, reader)
    })
    .await
    .expect("the second stream finished while the first stalled");
    assert_eq!(got, total);
    eprintln!(
        "stalled stream held {pushed} bytes; the other moved {} MB in {:?}",
        total >> 20,
        t0.elapsed()
    );
    held.abort();
}

#[tokio::test]
async fn streams_past_the_devices_limit_are_refused_for_capacity() {
    let gw = pair();
    let target = echo_server().await;
    let mut open_ones = Vec::new();
    for _ in 0..4 {
        open_ones.push(open(&gw, &target).await.expect("within the limit"));
    }
    match open(&gw, &target).await {
        Err(Opened::Failed(OpenError::Capacity, _)) => {}
        other => panic!("{other:?}"),
    }
    // Closing one frees its slot.
    let s = open_ones.pop().unwrap();
    drop(s);
    let t0 = Instant::now();
    loop {
        match open(&gw, &target).await {
            Ok(_) => break,
            Err(Opened::Failed(OpenError::Capacity, _))
                if t0.elapsed() < Duration::from_secs(5) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("{other:?}"),
        }
    }
}

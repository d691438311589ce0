//! 1,000 idle relays on one runtime cost no kernel threads and hold no pipes.
//!
//! Its own test binary (one test, so one test thread): the process thread
//! count from /proc/self/status then only moves if io_uring spawns io-wq
//! workers, which a splice submitted to the ring would do per blocked tunnel.

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use splicegate_uring::{
    PipePool, RelayCtl, RelayEnd, Runtime, RuntimeConfig, TcpListener, TcpStream, relay, sleep,
    spawn, timeout,
};

const RELAYS: usize = 1000;

fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads: line in /proc/self/status")
}

async fn connected(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let outer = TcpStream::connect(listener.local_addr().unwrap(), None)
        .await
        .unwrap();
    let (inner, _) = listener.accept().await.unwrap();
    (outer, inner)
}

#[test]
fn thousand_idle_relays_spawn_no_kernel_threads_and_hold_no_pipes() {
    let rt = Runtime::new(RuntimeConfig {
        entries: 512,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let baseline = threads();
    rt.block_on(async {
        timeout(Duration::from_secs(120), async {
            let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
            let front = TcpListener::bind(any, 1024).unwrap();
            let back = TcpListener::bind(any, 1024).unwrap();
            let pipes = Rc::new(PipePool::new(64));
            let ended = Rc::new(Cell::new(0usize));
            let mut clients = Vec::with_capacity(RELAYS);
            let mut sinks = Vec::with_capacity(RELAYS);
            let mut ctls = Vec::with_capacity(RELAYS);

            // 1. Build 1,000 tunnels client ⇄ a ==relay== b ⇄ sink.
            for _ in 0..RELAYS {
                let (client, a) = connected(&front).await;
                let (b, sink) = connected(&back).await;
                let ctl = RelayCtl::new();
                ctls.push(ctl.clone());
                let (pipes, ended) = (pipes.clone(), ended.clone());
                spawn(async move {
                    let outcome = relay(&a, &b, &pipes, &ctl).await;
                    assert!(
                        matches!(outcome.end, RelayEnd::Stopped),
                        "{:?}",
                        outcome.end
                    );
                    ended.set(ended.get() + 1);
                });
                clients.push(client);
                sinks.push(sink);
            }

            // 2. Let every relay block on its polls.
            sleep(Duration::from_millis(200)).await;
            // Each relay waits on two POLL_ADDs (readable a, readable b).
            assert!(
                rt.ops_in_flight() >= 2 * RELAYS,
                "{} ops",
                rt.ops_in_flight()
            );
            eprintln!(
                "{RELAYS} idle relays: threads {baseline} -> {}, ops in flight {}, pipes in use {}",
                threads(),
                rt.ops_in_flight(),
                pipes.in_use()
            );
            assert!(
                rt_threads_ok(baseline),
                "threads grew: {} -> {}",
                baseline,
                threads()
            );
            assert_eq!(pipes.in_use(), 0, "idle relays hold pipes");

            // 3. Some traffic: pipes are borrowed and all come back.
            let mut buf = [0u8; 8];
            for (client, sink) in clients.iter().zip(&sinks).step_by(100) {
                client.write_all(b"ping").await.unwrap();
                assert_eq!(sink.read(&mut buf).await.unwrap(), 4);
                sink.write_all(b"pong").await.unwrap();
                assert_eq!(client.read(&mut buf).await.unwrap(), 4);
            }
            sleep(Duration::from_millis(50)).await;
            assert_eq!(pipes.in_use(), 0, "drained relays still hold pipes");
            assert!(pipes.cached() <= 64);
            assert!(
                rt_threads_ok(baseline),
                "threads grew: {} -> {}",
                baseline,
                threads()
            );

            // 4. Stop them all; each ends promptly.
            for ctl in &ctls {
                ctl.stop();
            }
            for _ in 0..200 {
                if ended.get() == RELAYS {
                    break;
                }
                sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(ended.get(), RELAYS);
        })
        .await
        .expect("test timed out");
    })
    .expect("the ring failed");
}

fn rt_threads_ok(baseline: usize) -> bool {
    threads() <= baseline + 4
}

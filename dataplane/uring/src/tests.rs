//! Runtime, socket, timer and relay tests on real sockets over 127.0.0.1.
//! Every test runs under an overall timeout and every loop is bounded.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::*;

const LOCALHOST: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// Runs `f` on a fresh runtime, failing the test after 60 s.
fn run<F: Future>(f: F) -> F::Output {
    let rt = Runtime::new(RuntimeConfig::default()).expect("io_uring runtime");
    rt.block_on(async {
        timeout(Duration::from_secs(60), f)
            .await
            .expect("test timed out")
    })
    .expect("the ring failed")
}

/// A connected pair: (the end the test drives, the end the code under test gets).
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind(LOCALHOST, 16).unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap(), None)
        .await
        .unwrap();
    let (server, peer) = listener.accept().await.unwrap();
    assert_eq!(peer, client.local_addr().unwrap());
    (client, server)
}

/// client ⇄ a ==relay== b ⇄ sink
struct Tunnel {
    client: TcpStream,
    a: TcpStream,
    b: TcpStream,
    sink: TcpStream,
}

async fn tunnel() -> Tunnel {
    let (client, a) = pair().await;
    let (b, sink) = pair().await;
    Tunnel { client, a, b, sink }
}

/// Deterministic bytes whose period (a prime) does not divide any chunk size,
/// so a lost, duplicated or reordered chunk shows as a mismatch.
struct Pattern {
    /// The period twice over, so any window of up to one period is contiguous.
    doubled: Vec<u8>,
}

const PERIOD: usize = 1_000_003;

impl Pattern {
    fn new(seed: u64) -> Pattern {
        let mut x = seed | 1;
        let block: Vec<u8> = (0..PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut doubled = block.clone();
        doubled.extend_from_slice(&block);
        Pattern { doubled }
    }

    fn window(&self, pos: u64, len: usize) -> &[u8] {
        let start = (pos % PERIOD as u64) as usize;
        &self.doubled[start..start + len.min(PERIOD)]
    }
}

/// Writes `total` bytes of `pattern`, then shuts down writing.
async fn send_pattern(stream: &TcpStream, pattern: &Pattern, total: u64) {
    let mut pos = 0;
    while pos < total {
        let len = (total - pos).min(256 * 1024) as usize;
        let chunk = pattern.window(pos, len);
        stream.write_all(chunk).await.unwrap();
        pos += chunk.len() as u64;
    }
    stream.shutdown_write().unwrap();
}

/// Reads to EOF, checking every byte against `pattern`; returns the count.
async fn check_pattern(stream: &TcpStream, pattern: &Pattern) -> u64 {
    let mut buf = vec![0u8; 128 * 1024];
    let mut pos = 0u64;
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            return pos;
        }
        let mut checked = 0;
        while checked < n {
            let want = pattern.window(pos, n - checked);
            assert!(
                buf[checked..checked + want.len()] == *want,
                "corrupt stream at byte {pos}"
            );
            checked += want.len();
            pos += want.len() as u64;
        }
    }
}

#[test]
fn echo_through_accept_connect_read_write_all() {
    run(async {
        let listener = TcpListener::bind(LOCALHOST, 16).unwrap();
        let addr = listener.local_addr().unwrap();
        spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            for _ in 0..1000 {
                let n = stream.read(&mut buf).await.unwrap();
                if n == 0 {
                    stream.shutdown_write().unwrap();
                    return;
                }
                stream.write_all(&buf[..n]).await.unwrap();
            }
        });
        let client = TcpStream::connect(addr, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)))
            .await
            .unwrap();
        assert_eq!(client.peer_addr().unwrap(), addr);
        client.write_all(b"hello, uring").await.unwrap();
        client.shutdown_write().unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..100 {
            let n = client.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"hello, uring");
    });
}

#[test]
fn multishot_accept_of_200_connections() {
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    rt.block_on(async {
        let listener = TcpListener::bind(LOCALHOST, 512).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..200 {
            clients.push(TcpStream::connect(addr, None).await.unwrap());
        }
        let mut peers = std::collections::HashSet::new();
        for _ in 0..200 {
            let (_stream, peer) = timeout(Duration::from_secs(10), listener.accept())
                .await
                .expect("accept timed out")
                .unwrap();
            peers.insert(peer);
        }
        let expected: std::collections::HashSet<_> =
            clients.iter().map(|c| c.local_addr().unwrap()).collect();
        assert_eq!(peers, expected);
        // One multishot op served all 200 connections.
        assert_eq!(rt.ops_in_flight(), 1);
    })
    .expect("the ring failed");
}

/// Relays `total` bytes each way at once and checks every byte; gives the
/// pool back for further checks.
fn bulk_both_ways(use_splice: bool, total: u64, pipes: PipePool) -> PipePool {
    run(async move {
        let t = tunnel().await;
        let ctl = RelayCtl::new();
        let (up, down) = (Pattern::new(1), Pattern::new(2));
        let chunks = Rc::new(RefCell::new([0u64; 2]));
        let hook_chunks = chunks.clone();
        // After every transfer, the pipes holding bytes under the pool's limit.
        let limit = pipes.limit().clone();
        let most_in_use = Rc::new(std::cell::Cell::new(0usize));
        let hook_most = most_in_use.clone();
        ctl.on_chunk(move |dir, n| {
            hook_chunks.borrow_mut()[dir as usize] += n as u64;
            hook_most.set(hook_most.get().max(limit.in_use()));
        });

        let relay_fut = async {
            let outcome = if use_splice {
                relay(&t.a, &t.b, &pipes, &ctl).await
            } else {
                copy_relay(&t.a, &t.b, 32 * 1024, &ctl).await
            };
            // Fail fast rather than leave the peers waiting for bytes.
            assert!(
                matches!(outcome.end, RelayEnd::Closed),
                "relay ended early: {:?}",
                outcome.end
            );
            outcome
        };
        let client = async {
            let (_, got) = join(
                send_pattern(&t.client, &up, total),
                check_pattern(&t.client, &down),
            )
            .await;
            got
        };
        let sink = async {
            let (_, got) = join(
                send_pattern(&t.sink, &down, total),
                check_pattern(&t.sink, &up),
            )
            .await;
            got
        };
        let (outcome, (at_client, at_sink)) = join(relay_fut, join(client, sink)).await;

        assert_eq!((at_client, at_sink), (total, total));
        assert_eq!((outcome.a_to_b, outcome.b_to_a), (total, total));
        assert_eq!((ctl.a_to_b(), ctl.b_to_a()), (total, total));
        assert_eq!(*chunks.borrow(), [total, total]);
        assert_eq!(pipes.in_use(), 0);
        assert!(pipes.cached() <= 8);
        assert!(most_in_use.get() <= pipes.limit().max());
        pipes
    })
}

#[test]
fn splice_relay_64_mib_each_way_exact() {
    bulk_both_ways(true, 64 << 20, PipePool::new(8));
}

#[test]
fn copy_relay_8_mib_each_way_exact() {
    bulk_both_ways(false, 8 << 20, PipePool::new(8));
}

/// A process out of descriptors (`pipe2` fails with `EMFILE`) keeps its
/// tunnels: a direction that cannot get a pipe copies through its buffer,
/// and every byte arrives. Before, the relay ended with `RelayEnd::Local`.
#[test]
fn relay_copies_when_no_pipe_can_be_created() {
    let pipes = PipePool::new(8);
    pipes.fail_pipe_creation_after(0);
    let pipes = bulk_both_ways(true, 4 << 20, pipes);
    assert_eq!(pipes.cached(), 0, "no pipe was ever created");
    let stats = pipes.stats();
    assert!(stats.pipe_failures >= 1 && stats.copy_fallbacks >= stats.pipe_failures);
}

/// A cap of 0 pipes: every read is copied, every byte still arrives, and
/// the fallbacks are counted for the worker to export.
#[test]
fn relay_copies_everything_under_a_pipe_cap_of_zero() {
    let limit = PipeLimit::new(0);
    let pipes = bulk_both_ways(true, 4 << 20, PipePool::new(8).with_limit(limit.clone()));
    let stats = pipes.stats();
    assert_eq!(stats.cached, 0, "no pipe was ever created");
    assert!(stats.copy_fallbacks > 0, "{stats:?}");
    assert_eq!(stats.pipe_failures, 0, "{stats:?}");
    assert_eq!((limit.in_use(), stats.limit_max), (0, 0));
}

/// A cap of 1 shared by two pools: two tunnels moving bulk both ways at once
/// (four directions wanting pipes) never hold more than one pipe between
/// them, and deliver every byte.
#[test]
fn pipe_cap_bounds_pipes_in_use_across_pools() {
    let limit = PipeLimit::new(1);
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let limit = limit.clone();
            std::thread::spawn(move || {
                bulk_both_ways(true, 4 << 20, PipePool::new(8).with_limit(limit)).stats()
            })
        })
        .collect();
    let stats: Vec<PipeStats> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(limit.in_use(), 0);
    // The per-transfer samples in `bulk_both_ways` checked `in_use <= 1`.
    assert!(stats.iter().all(|s| s.limit_max == 1 && s.in_use == 0));

    // The bookkeeping itself, step by step.
    let (p, q) = (
        PipePool::new(2).with_limit(limit.clone()),
        PipePool::new(2).with_limit(limit.clone()),
    );
    let held = p.take().expect("under the cap");
    assert_eq!(limit.in_use(), 1);
    assert!(q.take().is_none(), "over the cap");
    assert_eq!(q.copy_fallbacks(), 1);
    p.give(held);
    assert_eq!(limit.in_use(), 0);
    let held = q.take().expect("under the cap again");
    q.give(held);
    assert_eq!((p.cached(), q.cached(), limit.in_use()), (1, 1, 0));
}

/// The same once a tunnel is established and splicing: one pipe could be
/// created, and every later `pipe2` fails mid-transfer. The pool caches
/// nothing, so the pipe is closed once drained and the next splice must
/// create another.
#[test]
fn relay_survives_pipe_creation_failing_mid_transfer() {
    let pipes = PipePool::new(0);
    pipes.fail_pipe_creation_after(1);
    let pipes = bulk_both_ways(true, 8 << 20, pipes);
    let stats = pipes.stats();
    assert!(stats.pipe_failures >= 1, "{stats:?}");
    assert_eq!(stats.cached, 0, "{stats:?}");
}

/// Polls two futures concurrently (test helper; no extra crates).
async fn join<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    let (mut ra, mut rb) = (None, None);
    std::future::poll_fn(|cx| {
        if ra.is_none()
            && let std::task::Poll::Ready(v) = a.as_mut().poll(cx)
        {
            ra = Some(v);
        }
        if rb.is_none()
            && let std::task::Poll::Ready(v) = b.as_mut().poll(cx)
        {
            rb = Some(v);
        }
        if ra.is_some() && rb.is_some() {
            std::task::Poll::Ready((ra.take().unwrap(), rb.take().unwrap()))
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

async fn read_to_end(stream: &TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    for _ in 0..1000 {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
    panic!("no EOF after 1000 reads");
}

#[test]
fn half_close_is_propagated_both_ways() {
    run(async {
        let t = tunnel().await;
        let pipes = PipePool::new(4);
        let ctl = RelayCtl::new();
        let script = async {
            // 1. The client says hello and half-closes.
            t.client.write_all(b"hello").await.unwrap();
            t.client.shutdown_write().unwrap();
            // 2. The sink sees the bytes, then EOF (a's FIN forwarded to b).
            assert_eq!(read_to_end(&t.sink).await, b"hello");
            // 3. The sink can still answer over the open direction, then closes.
            t.sink.write_all(b"world!").await.unwrap();
            t.sink.shutdown_write().unwrap();
            // 4. The client gets the answer, then EOF.
            assert_eq!(read_to_end(&t.client).await, b"world!");
        };
        let (outcome, ()) = join(relay(&t.a, &t.b, &pipes, &ctl), script).await;
        assert!(matches!(outcome.end, RelayEnd::Closed), "{:?}", outcome.end);
        assert_eq!((outcome.a_to_b, outcome.b_to_a), (5, 6));
        assert_eq!(pipes.in_use(), 0);
    });
}

#[test]
fn relay_stop_ends_it_promptly() {
    run(async {
        let t = tunnel().await;
        let pipes = PipePool::new(4);
        let ctl = RelayCtl::new();
        let stopper = ctl.clone();
        spawn(async move {
            sleep(Duration::from_millis(30)).await;
            stopper.stop();
        });
        t.client.write_all(b"abc").await.unwrap();
        let started = Instant::now();
        let outcome = relay(&t.a, &t.b, &pipes, &ctl).await;
        assert!(
            matches!(outcome.end, RelayEnd::Stopped),
            "{:?}",
            outcome.end
        );
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!(outcome.a_to_b, 3);
        let mut buf = [0u8; 8];
        assert_eq!(t.sink.read(&mut buf).await.unwrap(), 3);
        assert_eq!(pipes.in_use(), 0);
    });
}

#[test]
fn relay_idle_timeout_ends_it_after_silence() {
    run(async {
        let t = tunnel().await;
        let pipes = PipePool::new(4);
        let ctl = RelayCtl::new();
        let idle = Duration::from_millis(250);
        ctl.set_idle_timeout(Some(idle));
        let last_byte = Rc::new(RefCell::new(Instant::now()));
        let last = last_byte.clone();
        let client = async {
            // Traffic every 40 ms keeps the 250 ms idle timer from firing (a stall
            // of over 200 ms on a loaded machine would be silence too).
            for _ in 0..6 {
                t.client.write_all(b"x").await.unwrap();
                *last.borrow_mut() = Instant::now();
                sleep(Duration::from_millis(40)).await;
            }
        };
        let (outcome, ()) = join(relay(&t.a, &t.b, &pipes, &ctl), client).await;
        assert!(matches!(outcome.end, RelayEnd::Idle), "{:?}", outcome.end);
        assert_eq!(outcome.a_to_b, 6);
        let silent = last_byte.borrow().elapsed();
        assert!(silent >= idle, "ended after only {silent:?} of silence");
        assert!(silent < idle * 5, "ended late: {silent:?}");
    });
}

#[test]
fn relay_reports_reset_side() {
    run(async {
        let t = tunnel().await;
        let pipes = PipePool::new(4);
        let ctl = RelayCtl::new();
        // SO_LINGER 0: close sends RST instead of FIN.
        t.client.socket().set_linger(Some(Duration::ZERO)).unwrap();
        let client = t.client;
        let killer = async move {
            sleep(Duration::from_millis(20)).await;
            drop(client);
        };
        let (outcome, ()) = join(relay(&t.a, &t.b, &pipes, &ctl), killer).await;
        match outcome.end {
            RelayEnd::Error { side, error } => {
                assert_eq!(side, Side::A);
                assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
            }
            other => panic!("expected a reset, got {other:?}"),
        }
    });
}

#[test]
fn sleeps_complete_in_deadline_order_and_timeouts_fire() {
    run(async {
        let order = Rc::new(RefCell::new(Vec::new()));
        for ms in [30u64, 10, 20, 0] {
            let order = order.clone();
            spawn(async move {
                sleep(Duration::from_millis(ms)).await;
                order.borrow_mut().push(ms);
            });
        }
        let start = Instant::now();
        sleep(Duration::from_millis(50)).await;
        assert!(start.elapsed() >= Duration::from_millis(50));
        // A stalled process fires every timer in one turn, and this task
        // may run before the others woken with it: let them run first.
        yield_now().await;
        assert_eq!(*order.borrow(), [0, 10, 20, 30]);

        let start = Instant::now();
        let res = timeout(Duration::from_millis(10), sleep(Duration::from_secs(10))).await;
        assert_eq!(res, Err(Elapsed(())));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(10) && took < Duration::from_millis(500),
            "{took:?}"
        );

        assert_eq!(timeout(Duration::from_secs(1), async { 7 }).await, Ok(7));
        let past = sleep_until(Instant::now() - Duration::from_millis(1));
        assert_eq!(timeout(Duration::from_millis(1), past).await, Ok(()));
    });
}

#[test]
fn dropping_in_flight_ops_is_sound() {
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    rt.block_on(async {
        let baseline = rt.ops_in_flight();
        // 1. A poll op dropped mid-flight, then the same socket still works.
        let (client, server) = pair().await;
        let mut buf = [0u8; 16];
        for _ in 0..10 {
            assert!(
                timeout(Duration::from_millis(5), server.readable())
                    .await
                    .is_err()
            );
        }
        client.write_all(b"ping").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 4);

        // 2. An accept dropped mid-flight: the listener keeps its multishot op,
        //    and a connection that arrives afterwards is not lost.
        let listener = TcpListener::bind(LOCALHOST, 16).unwrap();
        assert!(
            timeout(Duration::from_millis(10), listener.accept())
                .await
                .is_err()
        );
        let late = TcpStream::connect(listener.local_addr().unwrap(), None)
            .await
            .unwrap();
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, late.local_addr().unwrap());
        // A connection queued in the op when the listener drops is closed.
        let _queued = TcpStream::connect(listener.local_addr().unwrap(), None)
            .await
            .unwrap();
        sleep(Duration::from_millis(10)).await;
        drop(listener);

        // 3. A connect to a peer that never answers: a listener with a full
        //    accept queue drops SYNs, so the connect hangs until dropped.
        let full =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        full.bind(&LOCALHOST.into()).unwrap();
        full.listen(0).unwrap();
        let full_addr = full.local_addr().unwrap().as_socket().unwrap();
        let mut held = Vec::new();
        let mut hung = 0;
        for _ in 0..4 {
            match timeout(
                Duration::from_millis(50),
                TcpStream::connect(full_addr, None),
            )
            .await
            {
                Ok(stream) => held.push(stream),
                Err(_) => hung += 1,
            }
        }
        assert!(
            hung >= 1,
            "every connect completed; none was dropped in flight"
        );

        // 4. Every cancelled op reaches its final CQE and frees its slot.
        for _ in 0..100 {
            if rt.ops_in_flight() == baseline {
                break;
            }
            sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(rt.ops_in_flight(), baseline);

        // 5. And the runtime keeps working.
        let (c, s) = pair().await;
        c.write_all(b"still fine").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 10);
    })
    .expect("the ring failed");
}

#[test]
fn dropping_a_runtime_with_pending_tasks_is_sound() {
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let listener = Rc::new(TcpListener::bind(LOCALHOST, 16).unwrap());
    let l = listener.clone();
    rt.spawn(async move {
        let _ = l.accept().await;
    });
    rt.block_on(async move {
        spawn(sleep(Duration::from_secs(3600)));
        yield_now().await;
    })
    .expect("the ring failed");
    assert_eq!(rt.tasks(), 2);
    drop(rt);
    // The listener outlived its runtime; dropping it still cancels its op.
    drop(listener);
}

/// Fails the whole test binary if `deadline` passes first: the waits below
/// must not have a timer, so they cannot use `timeout`.
fn watchdog(what: &'static str, limit: Duration) -> std::sync::mpsc::Sender<()> {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
            eprintln!("watchdog: {what} did not finish within {limit:?}");
            std::process::exit(101);
        }
    });
    done
}

#[test]
fn channel_wakes_an_idle_runtime_from_another_thread() {
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let done = watchdog("channel wake", Duration::from_secs(10));
    let (tx, mut rx) = channel::<(u32, Instant)>();
    let sender = std::thread::spawn(move || {
        for i in 0..5 {
            std::thread::sleep(Duration::from_millis(30));
            tx.send((i, Instant::now())).unwrap();
        }
    });
    let worst = rt
        .block_on(async {
            let mut worst = Duration::ZERO;
            for i in 0..5 {
                let (n, sent) = rx.recv().await.expect("message");
                assert_eq!(n, i);
                worst = worst.max(sent.elapsed());
            }
            // All senders gone: the channel reports the end.
            assert!(rx.recv().await.is_none());
            worst
        })
        .expect("the ring failed");
    sender.join().unwrap();
    let _ = done.send(());
    assert!(
        worst < Duration::from_millis(100),
        "slowest wake took {worst:?}"
    );
}

#[test]
fn notifier_wakes_an_idle_runtime_from_another_thread() {
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let done = watchdog("notifier wake", Duration::from_secs(10));
    let notifier = Notifier::new();
    let remote = notifier.clone();
    let stamp = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));
    let remote_stamp = stamp.clone();
    let thread = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        *remote_stamp.lock().unwrap() = Instant::now();
        remote.notify();
    });
    rt.block_on(notifier.notified()).expect("the ring failed");
    let latency = stamp.lock().unwrap().elapsed();
    thread.join().unwrap();
    let _ = done.send(());
    assert!(
        latency < Duration::from_millis(100),
        "wake took {latency:?}"
    );
    // A notification given while nobody waits is kept for the next wait.
    notifier.notify();
    rt.block_on(notifier.notified()).expect("the ring failed");
}

#[test]
fn pin_current_thread_accepts_cpu_zero() {
    std::thread::spawn(|| pin_current_thread(0).unwrap())
        .join()
        .unwrap();
    assert!(pin_current_thread(usize::MAX).is_err());
}

/// A task whose sockets stay ready must not starve the rest of its worker.
///
/// The hog forwards through a loopback pair with a standing 16 KiB backlog:
/// every `write_all` finds room and every `read` finds bytes, so without an
/// operation budget it never returns `Pending`. Beside it, a ping-pong runs
/// through a relay (client ⇄ a ==relay== b ⇄ echo). The hog stops once the
/// ping-pong made its round trips, or gives up after 300,000 iterations (or
/// 30 s); the assertion is on progress, not on latency.
#[test]
fn a_task_whose_sockets_stay_ready_does_not_starve_another_tunnel() {
    const ROUND_TRIPS: u32 = 50;
    run(async {
        let (p, q) = pair().await;
        let Tunnel { client, a, b, sink } = tunnel().await;
        let round_trips = Rc::new(std::cell::Cell::new(0u32));

        spawn(async move {
            let pipes = PipePool::new(4);
            let _ = relay(&a, &b, &pipes, &RelayCtl::new()).await;
        });
        spawn(async move {
            let mut buf = [0u8; 64];
            for _ in 0..10 * ROUND_TRIPS {
                let n = sink.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                sink.write_all(&buf[..n]).await.unwrap();
            }
        });
        let counter = round_trips.clone();
        spawn(async move {
            let mut buf = [0u8; 1];
            for _ in 0..ROUND_TRIPS {
                client.write_all(b"?").await.unwrap();
                assert_eq!(client.read(&mut buf).await.unwrap(), 1);
                counter.set(counter.get() + 1);
            }
        });

        // The hog: forward p -> q with 16 KiB always queued in q.
        p.write_all(&[7u8; 16 * 1024]).await.unwrap();
        q.readable().await.unwrap();
        let chunk = [7u8; 1024];
        let mut buf = [0u8; 1024];
        let started = Instant::now();
        let mut iterations = 0u64;
        // Bounded by the hog's own work (about 400 iterations a round trip
        // with the budget, whatever share of the CPU this test gets), and
        // by time as a backstop.
        while round_trips.get() < ROUND_TRIPS
            && iterations < 300_000
            && started.elapsed() < Duration::from_secs(30)
        {
            p.write_all(&chunk).await.unwrap();
            let n = q.read(&mut buf).await.unwrap();
            assert!(n > 0);
            iterations += 1;
        }
        assert_eq!(
            round_trips.get(),
            ROUND_TRIPS,
            "the ping-pong was starved: {} round trips while the hog ran \
             {iterations} iterations in {:?}",
            round_trips.get(),
            started.elapsed()
        );
        assert!(iterations > 0);
        eprintln!("{ROUND_TRIPS} round trips during {iterations} hog iterations");
    });
}

/// A remote wake whose eventfd completion is reaped while a push finds the
/// submission queue full (outside a turn) must still wake its task: the
/// next turn may not block. The runtime has no timer and nothing else in
/// flight, so before the fix it slept until the watchdog's rescue (a wake
/// of another task) after 10 s, and the test fails on `rescued`.
#[test]
fn a_remote_wake_reaped_while_the_queue_is_full_is_not_lost() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let (tx, mut rx) = channel::<&'static str>();
    let (rescue, mut rescue_rx) = channel::<()>();
    let rescued = std::sync::Arc::new(AtomicBool::new(false));
    let flag = rescued.clone();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if finished.recv_timeout(Duration::from_secs(10)).is_err() {
            flag.store(true, Ordering::SeqCst);
            let _ = rescue.send(());
        }
    });
    let got = rt
        .block_on(async {
            spawn(async move {
                let _ = rescue_rx.recv().await;
            });
            spawn(async move {
                let listener = TcpListener::bind(LOCALHOST, 16).unwrap();
                let client = TcpStream::connect(listener.local_addr().unwrap(), None)
                    .await
                    .unwrap();
                let (_server, _) = listener.accept().await.unwrap();
                // Another thread wakes the main task: its key goes to the
                // remote queue and the eventfd's poll completes.
                std::thread::spawn(move || tx.send("sent").unwrap())
                    .join()
                    .unwrap();
                // The next op's push finds the queue full: the driver reaps
                // inside the push and sees the eventfd completion there. The
                // task then stays blocked on that op, and nothing else in flight
                // completes: only the eventfd could end the ring wait.
                crate::runtime::with_current(|cx| cx.driver.borrow_mut().refuse_pushes(1));
                let _ = client.readable().await;
                drop(listener);
            });
            rx.recv().await
        })
        .expect("the ring failed");
    let _ = done.send(());
    watchdog.join().unwrap();
    assert_eq!(got, Some("sent"));
    assert!(
        !rescued.load(Ordering::SeqCst),
        "the wake-up was lost: the main task ran only after the watchdog's rescue"
    );
}

/// A dropped op whose cancel cannot be queued (the submission queue stays
/// full) is cancelled at a later turn. Before, the cancel was dropped: the
/// poll stayed in the kernel, holding its slot, until its socket became
/// ready, which for an idle tunnel may be never.
#[test]
fn a_cancel_that_cannot_be_queued_is_retried() {
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    rt.block_on(async {
        let listener = TcpListener::bind(LOCALHOST, 16).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap(), None)
            .await
            .unwrap();
        let (_server, _) = listener.accept().await.unwrap();
        // The listener's multishot accept stays in flight throughout.
        let baseline = rt.ops_in_flight();
        let mut readable = Box::pin(client.readable());
        std::future::poll_fn(|cx| {
            assert!(readable.as_mut().poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await;
        yield_now().await; // a turn: the poll reaches the kernel
        assert_eq!(rt.ops_in_flight(), baseline + 1);
        // Every attempt to queue the cancel finds the queue full.
        crate::runtime::with_current(|cx| {
            cx.driver
                .borrow_mut()
                .refuse_pushes(crate::driver::PUSH_ATTEMPTS)
        });
        drop(readable);
        for _ in 0..100 {
            if rt.ops_in_flight() == baseline {
                break;
            }
            yield_now().await;
        }
        assert_eq!(
            rt.ops_in_flight(),
            baseline,
            "the dropped poll is still in the kernel: its cancel was lost"
        );
    })
    .expect("the ring failed");
}

/// More completions at once than the CQ holds: the kernel buffers them, the
/// runtime counts the backlog for export, and no completion is lost.
#[test]
fn a_cq_overflow_is_counted_and_loses_no_completion() {
    let rt = Runtime::new(RuntimeConfig {
        entries: 8,
        cq_entries: 16,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let stats = rt.stats();
    assert_eq!((stats.sq_entries, stats.cq_entries), (8, 16));
    rt.block_on(async {
        let (client, _server) = pair().await;
        // 100 waits for writability of a writable socket, all submitted in
        // one poll: each completes as it is submitted.
        let mut waits: Vec<_> = (0..100)
            .map(|_| Some(Box::pin(client.writable())))
            .collect();
        std::future::poll_fn(|cx| {
            for slot in &mut waits {
                if let Some(wait) = slot
                    && let std::task::Poll::Ready(res) = wait.as_mut().poll(cx)
                {
                    res.unwrap();
                    *slot = None;
                }
            }
            if waits.iter().all(Option::is_none) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        assert!(runtime_stats().cq_backlogs > 0, "{:?}", runtime_stats());
    })
    .expect("the ring failed");
    let stats = rt.stats();
    assert_eq!(stats.cq_dropped, 0, "{stats:?}");
    assert_eq!(stats.pending_cancels, 0, "{stats:?}");
}

/// A ring whose `io_uring_enter` fails is reported by `block_on` as an
/// error the caller can act on (exit loudly), not a panic on the worker
/// thread; the runtime then refuses to run again, and dropping it is sound.
#[test]
fn a_failing_ring_is_an_error_from_block_on_not_a_panic() {
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    assert_eq!(rt.block_on(async { 7 }).unwrap(), 7);
    rt.spawn(sleep(Duration::from_secs(3600)));
    let fd = rt.cx_for_tests().driver.borrow().ring_fd();
    crate::sys::clobber_fd(fd).unwrap();
    let err = rt
        .block_on(sleep(Duration::from_millis(1)))
        .expect_err("the ring cannot work");
    assert!(err.to_string().contains("io_uring_enter failed"), "{err}");
    let again = rt.block_on(async { 7 }).expect_err("stays failed");
    assert_eq!(again.to_string(), err.to_string());
    drop(rt);
}

/// When the kernel ends the eventfd's multishot poll, the next turn arms it
/// again, and a later wake from another thread still reaches an idle
/// runtime (one with no timer, blocked in the ring).
#[test]
fn remote_wakes_survive_the_end_of_the_eventfd_poll() {
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let done = watchdog("wake after the eventfd poll ended", Duration::from_secs(10));
    let (tx, mut rx) = channel::<u32>();
    let got = rt
        .block_on(async {
            crate::runtime::with_current(|cx| cx.driver.borrow_mut().cancel_wake_poll()).unwrap();
            // Turns until the poll's final completion is seen and it is re-armed.
            let mut seen_unarmed = false;
            for _ in 0..100 {
                yield_now().await;
                let armed = crate::runtime::with_current(|cx| cx.driver.borrow().wake_armed());
                seen_unarmed |= !armed;
                if seen_unarmed && armed {
                    break;
                }
            }
            assert!(seen_unarmed, "the cancel did not end the eventfd poll");
            let sender = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                tx.send(42).unwrap();
            });
            let got = rx.recv().await;
            sender.join().unwrap();
            got
        })
        .expect("the ring failed");
    let _ = done.send(());
    assert_eq!(got, Some(42));
}

#[test]
fn udp_datagrams_go_out_and_come_in_by_the_batch() {
    let a = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let b = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let c = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let (a_addr, b_addr, c_addr) = (
        a.local_addr().unwrap(),
        b.local_addr().unwrap(),
        c.local_addr().unwrap(),
    );
    // Distinct bytes for each datagram, side by side in one buffer.
    let sizes = [100usize, 100, 100, 50, 2000, 100];
    let to = [b_addr, b_addr, b_addr, b_addr, c_addr, b_addr];
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for (i, (&len, &to)) in sizes.iter().zip(&to).enumerate() {
        out.push((buf.len(), len, to));
        buf.extend((0..len).map(|j| (i * 31 + j) as u8));
    }
    // A run of three of one size to one address (one GSO send), then the
    // rest one by one: all six are queued.
    let mut queued = 0;
    while queued < out.len() {
        queued += a.try_send_many(&buf, &out[queued..]).unwrap();
    }
    // Loopback takes GSO (Linux 4.18 on): the run did not fall back.
    assert!(!a.no_gso.load(std::sync::atomic::Ordering::Relaxed));
    let unspecified: std::net::SocketAddr = "0.0.0.0:0".parse().unwrap();
    let stride = 4096;
    let mut slots = vec![0u8; 8 * stride];
    let mut got = [(0usize, unspecified); 8];
    // b sees the five of its own, whole and in order, from a, each behind
    // the offset asked for.
    let n = b.try_recv_many(&mut slots, stride, 22, &mut got).unwrap();
    assert_eq!(n, 5);
    for (k, i) in [0usize, 1, 2, 3, 5].into_iter().enumerate() {
        let (len, from) = got[k];
        assert_eq!((len, from), (sizes[i], a_addr));
        let (start, _, _) = out[i];
        assert_eq!(
            &slots[k * stride + 22..k * stride + 22 + len],
            &buf[start..start + len]
        );
    }
    let n = c.try_recv_many(&mut slots, stride, 0, &mut got).unwrap();
    assert_eq!((n, got[0]), (1, (2000, a_addr)));
    let e = b
        .try_recv_many(&mut slots, stride, 0, &mut got)
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    // IPv6 addresses come back as sent (where the host has IPv6).
    if let (Ok(x), Ok(y)) = (
        UdpSocket::bind("[::1]:0".parse().unwrap()),
        UdpSocket::bind("[::1]:0".parse().unwrap()),
    ) {
        let y_addr = y.local_addr().unwrap();
        let run = [(0, 10, y_addr), (10, 10, y_addr)];
        assert_eq!(x.try_send_many(&[7u8; 20], &run).unwrap(), 2);
        let n = y.try_recv_many(&mut slots, stride, 0, &mut got).unwrap();
        assert_eq!(n, 2);
        assert_eq!(got[0], (10, x.local_addr().unwrap()));
        assert_eq!(got[1], (10, x.local_addr().unwrap()));
    }
}

#[test]
fn gso_runs_are_one_size_to_one_address_and_bounded() {
    let (x, y): (SocketAddr, SocketAddr) = (
        "127.0.0.1:1000".parse().unwrap(),
        "127.0.0.1:1001".parse().unwrap(),
    );
    let run = |items: &[(usize, SocketAddr)]| {
        let out: Vec<_> = items.iter().map(|&(len, to)| (0, len, to)).collect();
        crate::sys::gso_run(&out)
    };
    assert_eq!(run(&[]), 0);
    assert_eq!(run(&[(100, x), (100, x), (100, x), (100, y)]), 3);
    assert_eq!(run(&[(100, x), (99, x)]), 1);
    // Too long to be cut (it must fit a path whole), or empty: alone.
    assert_eq!(run(&[(1453, x), (1453, x)]), 1);
    assert_eq!(run(&[(0, x), (0, x)]), 1);
    // At most 64 datagrams and 65,000 bytes in one.
    assert_eq!(run(&[(10, x); 100]), 64);
    assert_eq!(run(&[(1400, x); 60]), 46);
}

/// Every task work mode, forced from the top of the ladder down, serves the
/// same work: an accept, an echo through two polled sockets, a timer, and a
/// wake from another thread. A mode that lost completions (DEFER_TASKRUN
/// runs them only when the worker enters the ring asking for them) would
/// hang here until the watchdog fires.
#[test]
fn every_ring_setup_tier_serves_io_timers_and_remote_wakes() {
    for setup in [
        RingSetup::DeferTaskrun,
        RingSetup::CoopSingleIssuer,
        RingSetup::Coop,
        RingSetup::Plain,
    ] {
        let done = watchdog("ring setup tier", Duration::from_secs(20));
        let rt = Runtime::new(RuntimeConfig {
            setup,
            ..RuntimeConfig::default()
        })
        .expect("io_uring runtime");
        // This kernel (6.1 or later, which the CI machine runs) has every
        // tier: none may fall back.
        assert_eq!(rt.ring_setup(), setup, "the kernel refused {setup:?}");
        let (tx, mut rx) = channel::<u32>();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(7).unwrap();
        });
        let echoed = rt
            .block_on(async {
                let (client, server) = pair().await;
                spawn(async move {
                    let mut buf = [0u8; 64];
                    for _ in 0..100 {
                        let n = server.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        server.write_all(&buf[..n]).await.unwrap();
                    }
                });
                let mut got = Vec::new();
                for i in 0..50u8 {
                    client.write_all(&[i; 3]).await.unwrap();
                    let mut buf = [0u8; 3];
                    let mut have = 0;
                    while have < 3 {
                        have += client.read(&mut buf[have..]).await.unwrap();
                    }
                    got.extend_from_slice(&buf);
                }
                let before = Instant::now();
                sleep(Duration::from_millis(5)).await;
                assert!(before.elapsed() >= Duration::from_millis(5));
                assert_eq!(rx.recv().await, Some(7));
                assert_eq!(runtime_stats().ring_setup, setup);
                got
            })
            .expect("the ring failed");
        sender.join().unwrap();
        let _ = done.send(());
        let want: Vec<u8> = (0..50u8).flat_map(|i| [i; 3]).collect();
        assert_eq!(echoed, want, "{setup:?}");
    }
}

/// A finished task's future memory and waker serve the next tasks; a waker
/// that outlives its task (a clone kept elsewhere) is not handed on, so a
/// late wake meant for the finished task never polls the next one.
#[test]
fn finished_tasks_memory_and_wakers_are_reused_safely() {
    use std::cell::Cell;
    let rt = Runtime::new(RuntimeConfig::default()).expect("io_uring runtime");
    // Tasks of one layout, one after another: the first box is kept and
    // served to each next one.
    let ran = Rc::new(Cell::new(0u32));
    for _ in 0..50 {
        let ran = ran.clone();
        rt.spawn(async move {
            let big = [1u8; 512]; // a future with memory of its own
            yield_now().await;
            ran.set(ran.get() + u32::from(big[511]));
        });
        rt.block_on(yield_now()).expect("ring");
        rt.block_on(yield_now()).expect("ring");
    }
    assert_eq!(ran.get(), 50, "every task ran to its end");
    assert_eq!(rt.tasks(), 0);
    assert_eq!(
        rt.cx_for_tests().kept_blocks(),
        1,
        "one block of that layout is kept and reused, not one per task"
    );
    // A task that leaves a clone of its waker behind.
    let left: Rc<RefCell<Option<std::task::Waker>>> = Rc::new(RefCell::new(None));
    let l = left.clone();
    rt.spawn(std::future::poll_fn(move |cx| {
        *l.borrow_mut() = Some(cx.waker().clone());
        std::task::Poll::Ready(())
    }));
    rt.block_on(yield_now()).expect("ring");
    // The next task pends until woken; count its polls.
    let polls = Rc::new(Cell::new(0u32));
    let p = polls.clone();
    rt.spawn(std::future::poll_fn(move |_| {
        p.set(p.get() + 1);
        std::task::Poll::<()>::Pending
    }));
    rt.block_on(yield_now()).expect("ring");
    assert_eq!(polls.get(), 1);
    // The finished task's waker, woken late: it must not reach the new task.
    left.borrow_mut().take().expect("the waker left").wake();
    rt.block_on(yield_now()).expect("ring");
    rt.block_on(yield_now()).expect("ring");
    assert_eq!(polls.get(), 1, "a stale waker polled another task");
}

/// An ended relay's control block is reused by the next `RelayCtl::new` on
/// the thread: it comes back as new (not stopped, no hook, no timeout), and
/// the hook it held is dropped when the last handle goes, not kept.
#[test]
fn a_reused_relay_control_starts_fresh() {
    let held = Rc::new(());
    let ctl = RelayCtl::new();
    let h = held.clone();
    ctl.on_chunk(move |_, _| {
        let _ = &h;
    });
    ctl.set_idle_timeout(Some(Duration::from_secs(1)));
    ctl.stop();
    let clone = ctl.clone();
    drop(ctl);
    assert!(
        clone.is_stopped(),
        "a live clone still sees its relay's state"
    );
    assert_eq!(
        Rc::strong_count(&held),
        2,
        "the hook lives while a handle does"
    );
    drop(clone);
    assert_eq!(
        Rc::strong_count(&held),
        1,
        "the hook went with the last handle"
    );
    let fresh = RelayCtl::new();
    assert!(!fresh.is_stopped());
    assert_eq!((fresh.a_to_b(), fresh.b_to_a()), (0, 0));
    assert_eq!(fresh.idle_timeout(), None);
}

/// A task's request to gather makes the next wait last until the gathering
/// time has passed, although a completion came at once (one of three ops
/// in flight); it applies to that one wait only, is counted, never
/// outlasts the nearest timer, and is refused for a few turns after an
/// urgent completion. On a kernel without
/// `IORING_FEAT_MIN_TIMEOUT` the request is ignored.
#[test]
fn a_wait_asked_to_gather_waits_past_the_first_completion() {
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let a = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let quiet = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let quiet2 = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let a_addr = a.local_addr().unwrap();
    let done = watchdog("gathered wait", Duration::from_secs(10));
    let (can, gathered_took, vetoed, again_took, gathered) = rt
        .block_on(async {
            // Ops that stay in flight: two silent sockets' polls.
            for q in [quiet, quiet2] {
                spawn(async move {
                    let _ = q.readable().await;
                });
            }
            yield_now().await;
            // `a` is readable before its poll is armed.
            a.try_send_to(b"x", a_addr).unwrap();
            let can = gather_next_wait(Duration::from_millis(150));
            let t = Instant::now();
            a.readable().await.unwrap();
            let took = t.elapsed();
            // No request: the next wait ends at its first completion.
            a.readable().await.unwrap();
            // A timer due before the gathering would end ends the wait.
            gather_next_wait(Duration::from_millis(150));
            let t = Instant::now();
            sleep(Duration::from_millis(10)).await;
            let timer_took = t.elapsed();
            assert!(
                timer_took < Duration::from_millis(120),
                "a gathered wait outlived the nearest timer: {timer_took:?}"
            );
            let before_urgent = runtime_stats().gathered_waits;
            // An urgent completion (any op but waiting for a datagram to
            // read; here a poll for room to send) stops the next waits
            // from gathering, whatever is asked ...
            a.writable().await.unwrap();
            gather_next_wait(Duration::from_millis(150));
            a.readable().await.unwrap();
            let vetoed = runtime_stats().gathered_waits - before_urgent;
            // ... until a quiet while has passed.
            sleep(crate::driver::QUIET + Duration::from_millis(1)).await;
            gather_next_wait(Duration::from_millis(150));
            let t = Instant::now();
            a.readable().await.unwrap();
            let again_took = t.elapsed();
            (
                can,
                took,
                vetoed,
                again_took,
                runtime_stats().gathered_waits,
            )
        })
        .expect("the ring failed");
    let _ = done.send(());
    if can {
        assert!(
            gathered_took >= Duration::from_millis(140),
            "the wait ended at the first completion: {gathered_took:?}"
        );
        assert_eq!(
            vetoed, 0,
            "a wait gathered right after an urgent completion"
        );
        assert!(
            again_took >= Duration::from_millis(140),
            "no gathering after the quiet turns: {again_took:?}"
        );
        assert_eq!(gathered, 3);
    } else {
        assert_eq!(gathered, 0);
    }
}

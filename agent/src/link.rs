//! The link driver: one TLS connection between the gateway and a device,
//! carrying many streams ([`splicegate_proto::agent`] frames), on tokio. The
//! gateway's agent thread and the device run this same code; only who
//! opens streams differs ([`Role`]).
//!
//! Tasks of a link:
//! - the **link task** reads frames, keeps the stream table, answers and
//!   sends pings, and watches liveness (three heartbeats without a byte from
//!   the peer end the link);
//! - the **writer task** writes every frame, gathering what is queued into
//!   one write;
//! - two **pumps** per open stream: *up* reads the local socket while the
//!   peer's window allows and sends `DATA`; *down* writes the peer's `DATA`
//!   to the local socket and grants window as the socket takes it.
//!
//! A stream never waits for another: its pumps block only on its own socket
//! and window, and the link task only queues (a peer that sends past the
//! window it was granted gets the stream reset, so what is queued for a
//! stream is bounded by its window).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use splicegate_proto::agent::{
    self, FieldsBuf, Frame, INITIAL_WINDOW, MAX_PAYLOAD, OpenError, RecvWindow, SendWindow,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, oneshot};

/// Which end of the link this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opens streams.
    Gateway,
    /// Takes streams and connects to their targets.
    Device,
}

/// How a link runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which end.
    pub role: Role,
    /// Ping interval; three without a byte from the peer end the link.
    pub heartbeat: Duration,
    /// Streams the device takes at once (a device's `--max-streams`); more
    /// are refused with `OPEN_FAILED` capacity.
    pub max_streams: usize,
    /// A cap on bytes per second each way, over every stream (a device's
    /// `--max-mbps`).
    pub rate: Option<Arc<RateLimit>>,
}

/// Live figures of a link, readable from any thread.
#[derive(Debug)]
pub struct LinkStats {
    /// When the link started (the clock of `last_rx_us`).
    pub epoch: Instant,
    /// When the peer's last bytes arrived, in microseconds since `epoch`.
    pub last_rx_us: AtomicU64,
    /// Open streams.
    pub streams: AtomicU64,
    /// Stream bytes received from the peer.
    pub bytes_in: AtomicU64,
    /// Stream bytes sent to the peer.
    pub bytes_out: AtomicU64,
    /// The last ping's round trip, in microseconds (0 before the first).
    pub rtt_us: AtomicU64,
}

impl LinkStats {
    fn new() -> LinkStats {
        LinkStats {
            epoch: Instant::now(),
            last_rx_us: AtomicU64::new(0),
            streams: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            rtt_us: AtomicU64::new(0),
        }
    }

    /// Whether the peer sent anything after `t`.
    pub fn heard_since(&self, t: Instant) -> bool {
        let at = self.epoch + Duration::from_micros(self.last_rx_us.load(Ordering::Relaxed));
        at >= t
    }
}

/// How opening a stream ended (the gateway's side).
#[derive(Debug)]
pub enum Opened {
    /// The device connected; the stream runs on the socket given to
    /// [`Link::open`].
    Ok,
    /// The device answered that it could not connect.
    Failed(OpenError, String),
    /// The link ended before the device answered.
    Gone(String),
}

/// A stream the peer asks for (the device's side).
#[derive(Debug)]
pub struct Incoming {
    /// Its id, for [`Link::accept`] or [`Link::refuse`].
    pub stream: u32,
    /// `host:port`.
    pub target: String,
    /// The gateway's receive window.
    pub window: u32,
    /// A UDP association (`target` is empty): answer with [`Link::accept_udp`].
    pub udp: bool,
}

/// An open UDP association: datagrams from the peer arrive on `rx` as
/// `DATAGRAM` payloads (see `splicegate_proto::agent::split_datagram`);
/// [`Link::send_datagram`] sends; [`Link::close_udp`] ends it.
#[derive(Debug)]
pub struct UdpAssociation {
    /// Its id on the link.
    pub stream: u32,
    /// Datagrams from the peer.
    pub rx: mpsc::Receiver<Vec<u8>>,
}

/// Datagrams queued for an association before new ones are dropped.
const UDP_QUEUE: usize = 1024;

type BoxRead = Box<dyn AsyncRead + Send + Sync + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Sync + Unpin>;

enum Cmd {
    Open {
        target: String,
        read: BoxRead,
        write: BoxWrite,
        reply: oneshot::Sender<Opened>,
    },
    Accept {
        stream: u32,
        window: u32,
        read: BoxRead,
        write: BoxWrite,
    },
    Refuse {
        stream: u32,
        reason: OpenError,
        text: String,
    },
    Close(String),
    OpenUdp {
        reply: oneshot::Sender<Result<UdpAssociation, Opened>>,
    },
    AcceptUdp {
        stream: u32,
        reply: oneshot::Sender<UdpAssociation>,
    },
    CloseUdp(u32),
}

/// A handle on a running link; cheap to clone.
#[derive(Clone)]
pub struct Link {
    cmds: mpsc::Sender<Cmd>,
    out: mpsc::Sender<Vec<u8>>,
    stats: Arc<LinkStats>,
    closed: Arc<Closed>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("stats", &self.stats).finish()
    }
}

#[derive(Default)]
struct Closed {
    why: Mutex<Option<String>>,
    notify: Notify,
}

impl Link {
    /// The link's live figures.
    pub fn stats(&self) -> &Arc<LinkStats> {
        &self.stats
    }

    /// Opens a stream to `target` (`host:port`) whose local end is
    /// `read`/`write`; completes when the device answered (after its own
    /// connect) or the link ended.
    pub async fn open(
        &self,
        target: &str,
        read: impl AsyncRead + Send + Sync + Unpin + 'static,
        write: impl AsyncWrite + Send + Sync + Unpin + 'static,
    ) -> Opened {
        let (reply, answer) = oneshot::channel();
        let cmd = Cmd::Open {
            target: target.to_string(),
            read: Box::new(read),
            write: Box::new(write),
            reply,
        };
        if self.cmds.send(cmd).await.is_err() {
            return Opened::Gone(self.why_closed());
        }
        answer
            .await
            .unwrap_or_else(|_| Opened::Gone(self.why_closed()))
    }

    /// Takes stream `stream` (the device connected): relays it over
    /// `read`/`write`. `window` is the gateway's window from `OPEN`.
    pub async fn accept(
        &self,
        stream: u32,
        window: u32,
        read: impl AsyncRead + Send + Sync + Unpin + 'static,
        write: impl AsyncWrite + Send + Sync + Unpin + 'static,
    ) {
        let _ = self
            .cmds
            .send(Cmd::Accept {
                stream,
                window,
                read: Box::new(read),
                write: Box::new(write),
            })
            .await;
    }

    /// Refuses stream `stream` with a reason the gateway maps to the client's answer.
    pub async fn refuse(&self, stream: u32, reason: OpenError, text: String) {
        let _ = self
            .cmds
            .send(Cmd::Refuse {
                stream,
                reason,
                text,
            })
            .await;
    }

    /// Opens a UDP association on the device (the gateway's side).
    pub async fn open_udp(&self) -> Result<UdpAssociation, Opened> {
        let (reply, answer) = oneshot::channel();
        if self.cmds.send(Cmd::OpenUdp { reply }).await.is_err() {
            return Err(Opened::Gone(self.why_closed()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Opened::Gone(self.why_closed())))
    }

    /// Takes UDP association `stream` (the device's side, after its socket
    /// is ready); `None` when the link or the stream is gone.
    pub async fn accept_udp(&self, stream: u32) -> Option<UdpAssociation> {
        let (reply, answer) = oneshot::channel();
        self.cmds
            .send(Cmd::AcceptUdp { stream, reply })
            .await
            .ok()?;
        answer.await.ok()
    }

    /// Sends one datagram (`payload` as `write_datagram_payload` makes it)
    /// on association `stream`. Never waits: a datagram the link cannot
    /// take now is dropped (UDP's own promise), and `false` says so.
    pub fn send_datagram(&self, stream: u32, payload: &[u8]) -> bool {
        let mut out = Vec::with_capacity(agent::HEADER + payload.len());
        if !agent::encode_datagram_frame(stream, payload, &mut out) {
            return false;
        }
        let ok = self.out.try_send(out).is_ok();
        if ok {
            self.stats
                .bytes_out
                .fetch_add(payload.len() as u64, Ordering::Relaxed);
        }
        ok
    }

    /// Ends UDP association `stream`.
    pub async fn close_udp(&self, stream: u32) {
        let _ = self.cmds.send(Cmd::CloseUdp(stream)).await;
    }

    /// Ends the link (its streams are reset), saying why in the log.
    pub async fn close(&self, why: &str) {
        let _ = self.cmds.send(Cmd::Close(why.to_string())).await;
    }

    /// Whether the link has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.why.lock().map(|w| w.is_some()).unwrap_or(true)
    }

    /// Completes when the link has ended, with why.
    pub async fn closed(&self) -> String {
        loop {
            let notified = self.closed.notify.notified();
            if let Some(why) = self.closed.why.lock().ok().and_then(|w| w.clone()) {
                return why;
            }
            notified.await;
        }
    }

    fn why_closed(&self) -> String {
        self.closed
            .why
            .lock()
            .ok()
            .and_then(|w| w.clone())
            .unwrap_or_else(|| "the link ended".into())
    }
}

/// A token bucket shared by every stream of a device, one per direction.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: f64,
    state: [Mutex<(f64, Instant)>; 2],
}

impl RateLimit {
    /// A cap of `mbps` megabits per second each way.
    pub fn mbps(mbps: f64) -> RateLimit {
        let bytes_per_sec = mbps * 1_000_000.0 / 8.0;
        let full = || Mutex::new((bytes_per_sec / 10.0, Instant::now()));
        RateLimit {
            bytes_per_sec,
            state: [full(), full()],
        }
    }

    /// Waits until `n` bytes may pass in direction `dir` (0 up, 1 down).
    pub(crate) async fn take(&self, dir: usize, n: usize) {
        let wait = {
            let mut s = self.state[dir].lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let burst = self.bytes_per_sec / 10.0;
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.bytes_per_sec).min(burst);
            s.1 = now;
            s.0 -= n as f64;
            (s.0 < 0.0).then(|| Duration::from_secs_f64(-s.0 / self.bytes_per_sec))
        };
        if let Some(d) = wait {
            tokio::time::sleep(d).await;
        }
    }
}

/// What the down pump gets from the link task.
enum Down {
    Data(Vec<u8>),
    Fin,
}

/// The up pump's view of the peer's window, and the stream's reset flag.
struct Up {
    window: Mutex<SendWindow>,
    /// More window (the up pump waits on it).
    more: Notify,
    /// The stream was reset (both pumps wait on it).
    gone: Notify,
    reset: AtomicBool,
}

impl Up {
    fn reset(&self) {
        self.reset.store(true, Ordering::Release);
        self.gone.notify_waiters();
        self.more.notify_one();
    }
}

enum Entry {
    /// The gateway sent `OPEN`; the device has not answered.
    Opening {
        read: BoxRead,
        write: BoxWrite,
        reply: oneshot::Sender<Opened>,
    },
    /// The device got `OPEN` and is connecting.
    Connecting,
    /// The gateway sent `OPEN_UDP`; the device has not answered.
    OpeningUdp {
        reply: oneshot::Sender<Result<UdpAssociation, Opened>>,
    },
    /// A UDP association: datagrams from the peer go to `tx`.
    Udp { tx: mpsc::Sender<Vec<u8>> },
    /// Relaying.
    Open {
        down: mpsc::UnboundedSender<Down>,
        credit: Arc<AtomicI64>,
        up: Arc<Up>,
    },
}

/// What every pump needs.
#[derive(Clone)]
struct PumpCtx {
    out: mpsc::Sender<Vec<u8>>,
    done: mpsc::UnboundedSender<u32>,
    stats: Arc<LinkStats>,
    rate: Option<Arc<RateLimit>>,
    epoch: Instant,
}

fn frame(f: Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    f.encode(&mut out);
    out
}

/// Reads one whole frame's bytes from `io` (for the hello exchange, before
/// [`spawn`]); `buf` keeps what follows it.
pub async fn read_frame<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<Vec<u8>> {
    loop {
        match agent::decode(buf) {
            Ok(Some((_, n))) => return Ok(buf.drain(..n).collect()),
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Writes one frame (for the hello exchange).
pub async fn write_frame<S: AsyncWrite + Unpin>(io: &mut S, f: Frame<'_>) -> io::Result<()> {
    io.write_all(&frame(f)).await?;
    io.flush().await
}

/// Fields for a `HELLO` or `WELCOME`.
pub fn fields(pairs: &[(&str, &str)]) -> FieldsBuf {
    let mut f = FieldsBuf::new();
    for (k, v) in pairs {
        f.push(k, v);
    }
    f
}

/// Runs a link over `io` (after the hello exchange; `leftover` holds bytes
/// read past it). Returns the handle, the streams the peer asks for (the
/// device's side; nothing arrives there on the gateway's), and the link
/// task, which ends with why the link ended.
pub fn spawn<S>(
    io: S,
    leftover: Vec<u8>,
    config: Config,
) -> (
    Link,
    mpsc::Receiver<Incoming>,
    tokio::task::JoinHandle<String>,
)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(io);
    let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(1024);
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (in_tx, in_rx) = mpsc::channel(256);
    let stats = Arc::new(LinkStats::new());
    let closed = Arc::new(Closed::default());
    let link = Link {
        cmds: cmd_tx,
        out: out_tx.clone(),
        stats: stats.clone(),
        closed: closed.clone(),
    };
    let writer = tokio::spawn(write_loop(wr, out_rx));
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let ctx = PumpCtx {
        out: out_tx,
        done: done_tx,
        stats: stats.clone(),
        rate: config.rate.clone(),
        epoch: stats.epoch,
    };
    let task = tokio::spawn(async move {
        let mut state = LinkTask {
            config,
            streams: HashMap::new(),
            next_id: 1,
            ctx,
            incoming: in_tx,
        };
        let why = state.run(rd, leftover, cmd_rx, done_rx).await;
        for (_, e) in state.streams.drain() {
            match e {
                Entry::Opening { reply, .. } => {
                    let _ = reply.send(Opened::Gone(why.clone()));
                }
                Entry::Open { up, .. } => up.reset(),
                Entry::OpeningUdp { reply } => {
                    let _ = reply.send(Err(Opened::Gone(why.clone())));
                }
                Entry::Connecting | Entry::Udp { .. } => {}
            }
        }
        state.ctx.stats.streams.store(0, Ordering::Relaxed);
        writer.abort();
        *closed.why.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
        closed.notify.notify_waiters();
        why
    });
    (link, in_rx, task)
}

/// How long the writer keeps its batch buffer after its last use: an idle
/// link (a heartbeat now and then) holds none.
const BATCH_KEEP: Duration = Duration::from_secs(1);

async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Vec<u8>>) {
    // Frames queued together go out in one write; a frame alone (a
    // heartbeat) is written as it is, without a batch buffer, so thousands
    // of idle links hold none.
    let mut batch = Vec::new();
    let mut batch_used = Instant::now();
    while let Some(first) = rx.recv().await {
        let out: &[u8] = match rx.try_recv() {
            Err(_) => {
                if batch.capacity() > 0 && batch_used.elapsed() > BATCH_KEEP {
                    batch = Vec::new();
                }
                &first
            }
            Ok(second) => {
                batch.clear();
                batch.extend_from_slice(&first);
                batch.extend_from_slice(&second);
                while batch.len() < 256 * 1024 {
                    match rx.try_recv() {
                        Ok(more) => batch.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                batch_used = Instant::now();
                &batch
            }
        };
        if wr.write_all(out).await.is_err() || wr.flush().await.is_err() {
            return;
        }
        if batch.capacity() > 512 * 1024 {
            batch = Vec::new();
        }
    }
}

/// Room of the link task's reads: a TLS record's plaintext while bytes
/// stream in, a heartbeat's worth while the link is idle (thousands of
/// idle links then hold no 16 KiB each).
const READ_BUSY: usize = 16 * 1024;
const READ_IDLE: usize = 512;

struct LinkTask {
    config: Config,
    streams: HashMap<u32, Entry>,
    next_id: u32,
    ctx: PumpCtx,
    incoming: mpsc::Sender<Incoming>,
}

impl LinkTask {
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        mut rd: R,
        mut buf: Vec<u8>,
        mut cmds: mpsc::Receiver<Cmd>,
        mut done: mpsc::UnboundedReceiver<u32>,
    ) -> String {
        let hb = self.config.heartbeat;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + hb / 5, hb);
        let mut last_rx = Instant::now();
        let mut chunk = vec![0u8; READ_IDLE];
        // Bytes already read with the hello.
        if let Err(why) = self.frames(&mut buf).await {
            return why;
        }
        loop {
            tokio::select! {
                r = rd.read(&mut chunk) => match r {
                    Ok(0) => return "the peer closed the connection".into(),
                    Ok(n) => {
                        last_rx = Instant::now();
                        let at = last_rx.duration_since(self.ctx.epoch).as_micros() as u64;
                        self.ctx.stats.last_rx_us.store(at, Ordering::Relaxed);
                        buf.extend_from_slice(&chunk[..n]);
                        // A read that filled the room had more behind it;
                        // a small one (a heartbeat) gives the big room back.
                        if n == chunk.len() && n < READ_BUSY {
                            chunk = vec![0u8; READ_BUSY];
                        } else if n < READ_IDLE && chunk.len() > READ_IDLE {
                            chunk = vec![0u8; READ_IDLE];
                        }
                        if let Err(why) = self.frames(&mut buf).await {
                            return why;
                        }
                        if buf.is_empty() && buf.capacity() > 2 * agent::HEADER + MAX_PAYLOAD {
                            buf = Vec::new();
                        }
                    }
                    Err(e) => return format!("read: {e}"),
                },
                Some(cmd) = cmds.recv() => {
                    if let Err(why) = self.command(cmd).await {
                        return why;
                    }
                }
                Some(id) = done.recv() => {
                    if matches!(self.streams.get(&id), Some(Entry::Open { .. })) {
                        self.streams.remove(&id);
                        self.ctx.stats.streams.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                _ = ticker.tick() => {
                    if last_rx.elapsed() > 3 * hb {
                        return format!("no heartbeat for {:.1} s", last_rx.elapsed().as_secs_f64());
                    }
                    let opaque = self.ctx.epoch.elapsed().as_micros() as u64;
                    let _ = self.ctx.out.try_send(frame(Frame::Ping { ack: false, opaque }));
                }
            }
        }
    }

    async fn send(&self, f: Frame<'_>) -> Result<(), String> {
        self.ctx
            .out
            .send(frame(f))
            .await
            .map_err(|_| "the connection's writer ended".to_string())
    }

    async fn command(&mut self, cmd: Cmd) -> Result<(), String> {
        match cmd {
            Cmd::Open {
                target,
                read,
                write,
                reply,
            } => {
                let stream = self.next_id;
                self.next_id = self.next_id.wrapping_add(2).max(1);
                if target.len() + 4 > agent::MAX_CONTROL {
                    let _ = reply.send(Opened::Failed(OpenError::Fault, "target too long".into()));
                    return Ok(());
                }
                self.send(Frame::Open {
                    stream,
                    window: INITIAL_WINDOW,
                    target: &target,
                })
                .await?;
                self.streams
                    .insert(stream, Entry::Opening { read, write, reply });
            }
            Cmd::Accept {
                stream,
                window,
                read,
                write,
            } => {
                if !matches!(self.streams.get(&stream), Some(Entry::Connecting)) {
                    return Ok(());
                }
                self.send(Frame::Opened {
                    stream,
                    window: INITIAL_WINDOW,
                })
                .await?;
                self.start(stream, window, read, write);
            }
            Cmd::Close(why) => return Err(why),
            Cmd::OpenUdp { reply } => {
                let stream = self.next_id;
                self.next_id = self.next_id.wrapping_add(2).max(1);
                self.send(Frame::OpenUdp { stream }).await?;
                let opaque = self.ctx.epoch.elapsed().as_micros() as u64;
                let _ = self
                    .ctx
                    .out
                    .try_send(frame(Frame::Ping { ack: false, opaque }));
                self.streams.insert(stream, Entry::OpeningUdp { reply });
            }
            Cmd::AcceptUdp { stream, reply } => {
                if !matches!(self.streams.get(&stream), Some(Entry::Connecting)) {
                    return Ok(());
                }
                self.send(Frame::Opened { stream, window: 0 }).await?;
                let (tx, rx) = mpsc::channel(UDP_QUEUE);
                self.streams.insert(stream, Entry::Udp { tx });
                self.ctx.stats.streams.fetch_add(1, Ordering::Relaxed);
                let _ = reply.send(UdpAssociation { stream, rx });
            }
            Cmd::CloseUdp(stream) => {
                if matches!(self.streams.get(&stream), Some(Entry::Udp { .. })) {
                    self.streams.remove(&stream);
                    self.ctx.stats.streams.fetch_sub(1, Ordering::Relaxed);
                    self.send(Frame::Reset {
                        stream,
                        text: "the association ended",
                    })
                    .await?;
                }
            }
            Cmd::Refuse {
                stream,
                reason,
                text,
            } => {
                if matches!(self.streams.get(&stream), Some(Entry::Connecting)) {
                    self.streams.remove(&stream);
                }
                self.send(Frame::OpenFailed {
                    stream,
                    reason,
                    text: &text,
                })
                .await?;
            }
        }
        Ok(())
    }

    /// Starts the pumps of an open stream.
    fn start(&mut self, stream: u32, peer_window: u32, read: BoxRead, write: BoxWrite) {
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let credit = Arc::new(AtomicI64::new(i64::from(INITIAL_WINDOW)));
        let up = Arc::new(Up {
            window: Mutex::new(SendWindow::new(peer_window)),
            more: Notify::new(),
            gone: Notify::new(),
            reset: AtomicBool::new(false),
        });
        let guard = Arc::new(DoneGuard {
            stream,
            done: self.ctx.done.clone(),
        });
        tokio::spawn(pump_up(
            stream,
            read,
            up.clone(),
            self.ctx.clone(),
            guard.clone(),
        ));
        tokio::spawn(pump_down(
            stream,
            write,
            down_rx,
            credit.clone(),
            up.clone(),
            self.ctx.clone(),
            guard,
        ));
        self.ctx.stats.streams.fetch_add(1, Ordering::Relaxed);
        self.streams.insert(
            stream,
            Entry::Open {
                down: down_tx,
                credit,
                up,
            },
        );
    }

    async fn reset(&mut self, stream: u32, why: &str) -> Result<(), String> {
        if let Some(Entry::Open { up, .. }) = self.streams.get(&stream) {
            up.reset();
        }
        self.send(Frame::Reset { stream, text: why }).await
    }

    /// Handles every whole frame in `buf`.
    async fn frames(&mut self, buf: &mut Vec<u8>) -> Result<(), String> {
        let mut at = 0;
        let result = loop {
            let (f, n) = match agent::decode(&buf[at..]) {
                Ok(Some(x)) => x,
                Ok(None) => break Ok(()),
                Err(e) => break Err(format!("protocol error: {e}")),
            };
            // Copy what outlives the buffer, then act.
            let owned = Owned::from(f);
            at += n;
            if let Err(why) = self.frame(owned).await {
                break Err(why);
            }
        };
        buf.drain(..at);
        result
    }

    /// The gateway asks for a stream (or, `udp`, an association): refused
    /// for capacity past `max_streams`, else handed to the device's owner.
    async fn offer(
        &mut self,
        stream: u32,
        target: String,
        window: u32,
        udp: bool,
    ) -> Result<(), String> {
        if self.config.role == Role::Gateway {
            return Err("protocol error: a device opened a stream".into());
        }
        if self.streams.contains_key(&stream) {
            return Err(format!("protocol error: stream {stream} opened twice"));
        }
        if self.streams.len() >= self.config.max_streams {
            let text = format!("the device is at its {} streams", self.config.max_streams);
            return self
                .send(Frame::OpenFailed {
                    stream,
                    reason: OpenError::Capacity,
                    text: &text,
                })
                .await;
        }
        self.streams.insert(stream, Entry::Connecting);
        let _ = self
            .incoming
            .send(Incoming {
                stream,
                target,
                window,
                udp,
            })
            .await;
        Ok(())
    }

    async fn frame(&mut self, f: Owned) -> Result<(), String> {
        match f {
            Owned::Data { stream, fin, bytes } => {
                let n = bytes.len();
                let Some(Entry::Open { down, credit, .. }) = self.streams.get(&stream) else {
                    // A stream reset or ended here whose peer had bytes in flight.
                    return Ok(());
                };
                if credit.fetch_sub(n as i64, Ordering::AcqRel) < n as i64 {
                    return self
                        .reset(stream, "flow control: data past the window")
                        .await;
                }
                self.ctx
                    .stats
                    .bytes_in
                    .fetch_add(n as u64, Ordering::Relaxed);
                if n > 0 {
                    let _ = down.send(Down::Data(bytes));
                }
                if fin {
                    let _ = down.send(Down::Fin);
                }
            }
            Owned::Window { stream, increment } => {
                if let Some(Entry::Open { up, .. }) = self.streams.get(&stream) {
                    let ok = up
                        .window
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .grant(increment);
                    up.more.notify_one();
                    if !ok {
                        return self.reset(stream, "flow control: window overflow").await;
                    }
                }
            }
            Owned::Reset { stream } => {
                if let Some(e) = self.streams.remove(&stream) {
                    match e {
                        Entry::Open { up, .. } => {
                            up.reset();
                            self.ctx.stats.streams.fetch_sub(1, Ordering::Relaxed);
                        }
                        Entry::Opening { reply, .. } => {
                            let _ = reply.send(Opened::Failed(OpenError::Fault, "reset".into()));
                        }
                        Entry::OpeningUdp { reply } => {
                            let _ =
                                reply.send(Err(Opened::Failed(OpenError::Fault, "reset".into())));
                        }
                        Entry::Udp { .. } => {
                            self.ctx.stats.streams.fetch_sub(1, Ordering::Relaxed);
                        }
                        Entry::Connecting => {}
                    }
                }
            }
            Owned::Ping { ack, opaque } => {
                if ack {
                    let now = self.ctx.epoch.elapsed().as_micros() as u64;
                    self.ctx
                        .stats
                        .rtt_us
                        .store(now.saturating_sub(opaque).max(1), Ordering::Relaxed);
                } else {
                    // Answers are dropped, not queued, when the writer is behind
                    // (a ping flood never grows memory).
                    let _ = self
                        .ctx
                        .out
                        .try_send(frame(Frame::Ping { ack: true, opaque }));
                }
            }
            Owned::Open {
                stream,
                window,
                target,
            } => return self.offer(stream, target, window, false).await,
            Owned::Opened { stream, window } => match self.streams.remove(&stream) {
                Some(Entry::Opening { read, write, reply }) => {
                    if reply.send(Opened::Ok).is_ok() {
                        self.start(stream, window, read, write);
                    } else {
                        // The client gave up while the device connected.
                        self.send(Frame::Reset {
                            stream,
                            text: "the client left",
                        })
                        .await?;
                    }
                }
                Some(Entry::OpeningUdp { reply }) => {
                    let (tx, rx) = mpsc::channel(UDP_QUEUE);
                    if reply.send(Ok(UdpAssociation { stream, rx })).is_ok() {
                        self.streams.insert(stream, Entry::Udp { tx });
                        self.ctx.stats.streams.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.send(Frame::Reset {
                            stream,
                            text: "the client left",
                        })
                        .await?;
                    }
                }
                Some(other) => {
                    self.streams.insert(stream, other);
                    return Err(format!("protocol error: stream {stream} opened twice"));
                }
                None => {}
            },
            Owned::OpenFailed {
                stream,
                reason,
                text,
            } => match self.streams.remove(&stream) {
                Some(Entry::Opening { reply, .. }) => {
                    let _ = reply.send(Opened::Failed(reason, text));
                }
                Some(Entry::OpeningUdp { reply }) => {
                    let _ = reply.send(Err(Opened::Failed(reason, text)));
                }
                Some(other) => {
                    self.streams.insert(stream, other);
                }
                None => {}
            },
            Owned::OpenUdp { stream } => {
                return self.offer(stream, String::new(), 0, true).await;
            }
            Owned::Datagram { stream, payload } => {
                if let Some(Entry::Udp { tx }) = self.streams.get(&stream) {
                    self.ctx
                        .stats
                        .bytes_in
                        .fetch_add(payload.len() as u64, Ordering::Relaxed);
                    // A full queue drops the datagram: a slow association
                    // never holds up the link.
                    let _ = tx.try_send(payload);
                }
            }
            Owned::GoAway => {}
            Owned::Link => return Err("protocol error: a hello after the hello".into()),
        }
        Ok(())
    }
}

/// A frame copied out of the read buffer.
enum Owned {
    Data {
        stream: u32,
        fin: bool,
        bytes: Vec<u8>,
    },
    Window {
        stream: u32,
        increment: u32,
    },
    Reset {
        stream: u32,
    },
    Ping {
        ack: bool,
        opaque: u64,
    },
    Open {
        stream: u32,
        window: u32,
        target: String,
    },
    Opened {
        stream: u32,
        window: u32,
    },
    OpenFailed {
        stream: u32,
        reason: OpenError,
        text: String,
    },
    OpenUdp {
        stream: u32,
    },
    Datagram {
        stream: u32,
        payload: Vec<u8>,
    },
    GoAway,
    Link,
}

impl From<Frame<'_>> for Owned {
    fn from(f: Frame<'_>) -> Owned {
        match f {
            Frame::Data { stream, fin, bytes } => Owned::Data {
                stream,
                fin,
                bytes: bytes.to_vec(),
            },
            Frame::Window { stream, increment } => Owned::Window { stream, increment },
            Frame::Reset { stream, .. } => Owned::Reset { stream },
            Frame::Ping { ack, opaque } => Owned::Ping { ack, opaque },
            Frame::Open {
                stream,
                window,
                target,
            } => Owned::Open {
                stream,
                window,
                target: target.to_string(),
            },
            Frame::Opened { stream, window } => Owned::Opened { stream, window },
            Frame::OpenFailed {
                stream,
                reason,
                text,
            } => Owned::OpenFailed {
                stream,
                reason,
                text: text.to_string(),
            },
            Frame::GoAway { .. } => Owned::GoAway,
            Frame::OpenUdp { stream } => Owned::OpenUdp { stream },
            Frame::Datagram {
                stream,
                addr,
                bytes,
            } => {
                let mut payload = Vec::with_capacity(1 + addr.len() + bytes.len());
                agent::write_datagram_payload(addr, bytes, &mut payload);
                Owned::Datagram { stream, payload }
            }
            Frame::Hello { .. } | Frame::Welcome { .. } | Frame::Refuse { .. } => Owned::Link,
        }
    }
}

/// Tells the link task a stream is over once both its pumps have ended.
struct DoneGuard {
    stream: u32,
    done: mpsc::UnboundedSender<u32>,
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        let _ = self.done.send(self.stream);
    }
}

/// Local socket → `DATA` frames, within the peer's window.
async fn pump_up(
    stream: u32,
    mut read: BoxRead,
    up: Arc<Up>,
    ctx: PumpCtx,
    _guard: Arc<DoneGuard>,
) {
    let mut buf = Vec::new();
    loop {
        // Wait for window (or a reset).
        let avail = loop {
            let notified = up.more.notified();
            if up.reset.load(Ordering::Acquire) {
                return;
            }
            let avail = up
                .window
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .available();
            if avail > 0 {
                break avail;
            }
            notified.await;
        };
        let want = (avail as usize).min(MAX_PAYLOAD);
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let n = tokio::select! {
            r = read.read(&mut buf[..want]) => r,
            _ = wait_reset(&up) => return,
        };
        match n {
            Ok(0) => {
                let _ = ctx
                    .out
                    .send(frame(Frame::Data {
                        stream,
                        fin: true,
                        bytes: &[],
                    }))
                    .await;
                return;
            }
            Ok(n) => {
                if let Some(rate) = &ctx.rate {
                    rate.take(0, n).await;
                }
                up.window.lock().unwrap_or_else(|e| e.into_inner()).spend(n);
                ctx.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                let data = frame(Frame::Data {
                    stream,
                    fin: false,
                    bytes: &buf[..n],
                });
                if ctx.out.send(data).await.is_err() {
                    return;
                }
                // An idle stream holds no big buffer.
                if n < 4096 && buf.len() > 16 * 1024 {
                    buf = Vec::new();
                }
            }
            Err(e) => return abort(stream, &up, &ctx, &format!("read: {e}")).await,
        }
    }
}

/// A pump's socket failed: the stream is reset both here and at the peer.
async fn abort(stream: u32, up: &Up, ctx: &PumpCtx, why: &str) {
    up.reset();
    let _ = ctx
        .out
        .send(frame(Frame::Reset { stream, text: why }))
        .await;
}

/// The peer's `DATA` → the local socket; window granted as it drains.
async fn pump_down(
    stream: u32,
    mut write: BoxWrite,
    mut rx: mpsc::UnboundedReceiver<Down>,
    credit: Arc<AtomicI64>,
    up: Arc<Up>,
    ctx: PumpCtx,
    _guard: Arc<DoneGuard>,
) {
    let mut window = RecvWindow::new(INITIAL_WINDOW);
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            _ = wait_reset(&up) => None,
        };
        match msg {
            Some(Down::Data(bytes)) => {
                if let Some(rate) = &ctx.rate {
                    rate.take(1, bytes.len()).await;
                }
                let written = tokio::select! {
                    r = write.write_all(&bytes) => r,
                    _ = wait_reset(&up) => return,
                };
                if let Err(e) = written {
                    return abort(stream, &up, &ctx, &format!("write: {e}")).await;
                }
                window.receive(bytes.len());
                let now = ctx.epoch.elapsed().as_micros() as u64;
                let rtt = ctx.stats.rtt_us.load(Ordering::Relaxed);
                if let Some(inc) = window.consume(bytes.len(), now, rtt) {
                    credit.fetch_add(i64::from(inc), Ordering::AcqRel);
                    let f = frame(Frame::Window {
                        stream,
                        increment: inc,
                    });
                    if ctx.out.send(f).await.is_err() {
                        return;
                    }
                }
            }
            Some(Down::Fin) => {
                let _ = write.shutdown().await;
                return;
            }
            // Reset, or the link ended: drop the socket.
            None => return,
        }
    }
}

async fn wait_reset(up: &Up) {
    loop {
        let notified = up.gone.notified();
        if up.reset.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }
}

//! The admin thread: one OS thread running a current-thread tokio runtime
//! with the API server, the once-a-second usage flush and the health checker
//! as tasks. Stopping it is a message; the final flush is the caller's (after
//! the workers drained).

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use splicegate_control::stats::WorkerStats;
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::control::Control;
use crate::fleet::FleetView;
use crate::health::{self, HealthOptions, HealthStats};
pub use crate::metrics::VerdictFn;
use crate::metrics::{Metrics, ProcessCounter};

/// What the admin thread serves and checks.
#[derive(Clone)]
pub struct AdminOptions {
    /// The API's address.
    pub listen: SocketAddr,
    /// Bearer token every endpoint but `/healthz` and `/` needs, when set.
    pub token: Option<String>,
    /// The workers' counters, in worker order (the `worker` label).
    pub workers: Vec<Arc<WorkerStats>>,
    /// Node health checks.
    pub health: HealthOptions,
    /// How often usage goes to the store.
    pub flush_interval: Duration,
    /// The eBPF verdict counters, when the kernel programs run.
    pub ebpf_verdicts: Option<VerdictFn>,
    /// The binary's own counters.
    pub process_counters: Vec<ProcessCounter>,
    /// This gateway's fleet (`[fleet]`), for `GET /v1/gateways` and the
    /// `gateway` label on `/metrics`.
    pub fleet: Option<Arc<FleetView>>,
}

impl std::fmt::Debug for AdminOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminOptions")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("workers", &self.workers.len())
            .field("health", &self.health)
            .field("flush_interval", &self.flush_interval)
            .field("ebpf_verdicts", &self.ebpf_verdicts.is_some())
            .field("process_counters", &self.process_counters)
            .field("fleet", &self.fleet.as_ref().map(|f| f.id()))
            .finish()
    }
}

impl AdminOptions {
    /// Options with defaults for everything but the address.
    pub fn new(listen: SocketAddr) -> Self {
        AdminOptions {
            listen,
            token: None,
            workers: Vec::new(),
            health: HealthOptions::default(),
            flush_interval: Duration::from_secs(1),
            ebpf_verdicts: None,
            process_counters: Vec::new(),
            fleet: None,
        }
    }
}

/// Starts the admin thread.
#[derive(Debug)]
pub struct AdminServer;

/// The running admin thread.
#[derive(Debug)]
pub struct AdminHandle {
    thread: ThreadHandle,
    /// The address the API listens on (the real port when 0 was asked).
    pub addr: SocketAddr,
}

impl AdminServer {
    /// Bind the API's address (so a port in use fails the start) and start
    /// the admin thread.
    pub fn start(control: Arc<Control>, opts: AdminOptions) -> std::io::Result<AdminHandle> {
        let listener = std::net::TcpListener::bind(opts.listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || run(control, opts, listener, stop_rx))?;
        Ok(AdminHandle {
            thread: ThreadHandle::new(thread, stop),
            addr,
        })
    }
}

impl AdminHandle {
    /// Stop serving and wait for the thread (at most a few seconds: open API
    /// connections get 2 s to finish).
    pub fn stop(mut self) {
        self.thread.stop();
    }
}

/// A thread of this crate's that runs until told to stop (the admin
/// thread, the fleet thread): `stop` tells it and waits for it, and so
/// does dropping the handle.
#[derive(Debug)]
pub(crate) struct ThreadHandle {
    thread: Option<JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

impl ThreadHandle {
    pub(crate) fn new(thread: JoinHandle<()>, stop: watch::Sender<bool>) -> ThreadHandle {
        ThreadHandle {
            thread: Some(thread),
            stop,
        }
    }

    /// Tell the thread to stop and wait for it (once).
    pub(crate) fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ThreadHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    control: Arc<Control>,
    opts: AdminOptions,
    listener: std::net::TcpListener,
    stop: watch::Receiver<bool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(
                "admin: no runtime: {e}; the admin API, flush and health checks are off"
            );
            return;
        }
    };
    rt.block_on(serve(control, opts, listener, stop));
}

async fn serve(
    control: Arc<Control>,
    opts: AdminOptions,
    listener: std::net::TcpListener,
    stop: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("admin: listener: {e}");
            return;
        }
    };
    let health_stats = HealthStats::default();
    let metrics = Arc::new(Metrics::new(
        control.clone(),
        opts.workers.clone(),
        &health_stats,
        opts.ebpf_verdicts.clone(),
        opts.process_counters.clone(),
        opts.fleet.clone(),
    ));
    let state = AppState {
        control: control.clone(),
        token: opts.token.clone().map(Arc::from),
        metrics,
        fleet: opts.fleet.clone(),
    };
    tokio::spawn(flush_loop(
        control.clone(),
        opts.flush_interval,
        stop.clone(),
    ));
    tokio::spawn(health::run(
        control.clone(),
        opts.health.clone(),
        health_stats,
        stop.clone(),
    ));
    let bound = listener.local_addr().map_or(opts.listen, |a| a);
    tracing::info!(listen = %bound, token = opts.token.is_some(), "admin API serving");
    let mut shutdown = stop.clone();
    let server = axum::serve(listener, api::router(state)).with_graceful_shutdown(async move {
        let _ = shutdown.wait_for(|s| *s).await;
    });
    let mut grace = stop;
    tokio::select! {
        r = server => {
            if let Err(e) = r {
                tracing::error!("admin API: {e}");
            }
        }
        _ = async {
            let _ = grace.wait_for(|s| *s).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        } => {}
    }
}

async fn flush_loop(control: Arc<Control>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        match control.flush() {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("usage flush works again");
            }
            Ok(_) => {}
            Err(e) => {
                if !failing {
                    tracing::error!("usage flush failed, retrying every interval: {e}");
                }
                failing = true;
            }
        }
    }
}

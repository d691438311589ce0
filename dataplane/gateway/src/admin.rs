//! The binary's operations side: with an `[admin]` section, the policy is
//! built through the control object (the store at `[store] path`, the API's
//! objects, usage and balances restored from the ledger), and the admin
//! thread serves the API, flushes usage every second and checks node health.
//! Without one, the policy is built from the file alone, as before: no API,
//! no store, no extra thread.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use splicegate_admin::{
    AdminHandle, AdminOptions, AdminServer, Control, ControlOptions, Fleet, FleetOptions,
    HealthOptions, ProcessCounter, VerdictFn,
};
use splicegate_control::engine::Engine;
use splicegate_control::policy::Policy;
use splicegate_worker::WorkerHandle;

use crate::config::Config;

/// The engine the workers share and, with `[admin]`, the control object that
/// owns it.
pub(crate) fn engine(cfg: &Config) -> Result<(Arc<Engine>, Option<Arc<Control>>)> {
    let decls = cfg.declarations().clone();
    let capacity = cfg.limits.session_capacity.max(1);
    if cfg.admin.is_none() {
        if cfg.store.is_some() {
            tracing::warn!("[store] is used with [admin] only; without it nothing is stored");
        }
        let policy = Policy::build(&decls, None).map_err(anyhow::Error::msg)?;
        return Ok((Arc::new(Engine::new(policy, capacity)), None));
    }
    let control = Control::open(
        ControlOptions {
            gateway_id: match &cfg.fleet {
                Some(f) => f.id()?,
                None => "local".into(),
            },
            snapshot: cfg.store_snapshot(),
            store: cfg.store_location(),
            session_capacity: capacity,
            clock: splicegate_worker::now,
        },
        decls,
    )
    .with_context(|| format!("opening the store {}", cfg.store_location()))?;
    Ok((control.engine().clone(), Some(Arc::new(control))))
}

/// With `[fleet]`: claim this gateway's id and join the fleet's registry
/// and change channel, before the workers accept anything. `proxy` is the
/// main proxy address as bound.
pub(crate) fn join_fleet(
    cfg: &Config,
    control: Option<&Arc<Control>>,
    proxy: SocketAddr,
) -> Result<Option<Fleet>> {
    let (Some(f), Some(control)) = (&cfg.fleet, control) else {
        return Ok(None);
    };
    let opts = FleetOptions {
        id: f.id()?,
        redis: f.redis.clone(),
        prefix: f.prefix.clone(),
        proxy: f.advertise.unwrap_or(proxy),
        admin: None,
        reload_every: Duration::from_secs(f.reload_s.max(1)),
        lease_bytes: f.lease_bytes,
    };
    tracing::info!(id = %opts.id, redis = %splicegate_admin::fleet::redact(&opts.redis), "joining the fleet");
    let fleet = Fleet::join(control.clone(), opts)?;
    Ok(Some(fleet))
}

/// Start the admin thread (API, flush, health checks) once the workers serve.
/// `ebpf_verdicts` feeds `splicegate_ebpf_verdicts_total` when the kernel
/// programs run.
pub(crate) fn start(
    cfg: &Config,
    control: Option<&Arc<Control>>,
    workers: &[WorkerHandle],
    ebpf_verdicts: Option<VerdictFn>,
    process_counters: Vec<ProcessCounter>,
    fleet: Option<&Fleet>,
) -> Result<Option<AdminHandle>> {
    let (Some(control), Some(section)) = (control, &cfg.admin) else {
        return Ok(None);
    };
    let listen = section.listen();
    let mut opts = AdminOptions::new(listen);
    opts.token = section.token.clone();
    opts.workers = workers.iter().map(|w| w.stats.clone()).collect();
    opts.health = health_options(cfg);
    opts.ebpf_verdicts = ebpf_verdicts;
    opts.process_counters = process_counters;
    opts.fleet = fleet.map(Fleet::view);
    let handle = AdminServer::start(control.clone(), opts)
        .with_context(|| format!("the admin API on {listen}"))?;
    Ok(Some(handle))
}

fn health_options(cfg: &Config) -> HealthOptions {
    let h = &cfg.health;
    // Resolved once, here: the admin thread resolves no names.
    let probe_addr: Option<SocketAddr> = h.probe_target.as_deref().and_then(|t| {
        match t.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(a)) => Some(a),
            _ => {
                tracing::warn!(
                    probe_target = t,
                    "the probe target does not resolve: direct nodes are checked by binding their address only"
                );
                None
            }
        }
    });
    HealthOptions {
        probe_target: h.probe_target.clone(),
        probe_addr,
        interval: Duration::from_secs(h.interval_s.max(1)),
        failures: h.failures.max(1),
        timeout: Duration::from_millis(cfg.timeouts.node_connect_ms.max(1)),
    }
}

/// SIGHUP with `[admin]`: the file's new objects, merged with the API's.
pub(crate) fn reload(control: &Control, cfg: &Config) -> Result<()> {
    let decls = cfg.declarations().clone();
    control.reload_file(decls).map_err(anyhow::Error::from)
}

/// After the drain: stop the admin thread, then the final flush of usage.
pub(crate) fn stop(handle: Option<AdminHandle>, control: Option<&Arc<Control>>) {
    if let Some(h) = handle {
        h.stop();
    }
    if let Some(c) = control {
        match c.flush() {
            Ok(f) => tracing::info!(rows = f.rows, "usage flushed to the store"),
            Err(e) => tracing::error!("the final usage flush failed: {e}"),
        }
    }
}

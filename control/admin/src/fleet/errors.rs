//! The fleet's recent errors (SPEC section 11: each gateway's API shows
//! them): every [`HEARTBEAT`](super::HEARTBEAT) the errors this gateway
//! answered since the last look go to `{prefix}:errors` and, per package,
//! `{prefix}:errors:{package}`, each a list of the newest [`KEPT`] as the
//! API shows them, with the answering gateway's id. Nothing on a request's
//! path: the workers write the local rings as before.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde_json::Value;
use tokio::sync::watch;

use super::FleetView;
use crate::control::Control;

/// Errors each list keeps.
const KEPT: isize = 1000;

fn list_of(prefix: &str, package: Option<u64>) -> String {
    match package {
        Some(p) => format!("{prefix}:errors:{p}"),
        None => format!("{prefix}:errors"),
    }
}

/// Copy this gateway's new errors to the fleet's lists until told to stop.
pub(super) async fn serve(
    control: Arc<Control>,
    mut conn: ConnectionManager,
    prefix: String,
    view: Arc<FleetView>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let id = view.id();
    let mut seen = control.engine().errors.since(0).1;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let (new, pushed) = control.engine().errors.since(seen);
        if new.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        let mut lists = std::collections::BTreeSet::new();
        for e in &new {
            let mut v = crate::api::error_json(e);
            v["gateway"] = Value::from(id.as_str());
            let text = v.to_string();
            for list in [list_of(&prefix, None)]
                .into_iter()
                .chain(e.package.map(|p| list_of(&prefix, Some(p))))
            {
                pipe.lpush(&list, &text).ignore();
                lists.insert(list);
            }
        }
        for list in &lists {
            pipe.ltrim(list, 0, KEPT - 1).ignore();
        }
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => seen = pushed,
            // They wait for the next look (the ring keeps the newest).
            Err(e) => view.set_redis_up(false, &e),
        }
    }
}

impl FleetView {
    /// The fleet's newest errors (of `package`, or all), at most `limit`,
    /// newest first.
    pub async fn errors(
        &self,
        package: Option<u64>,
        limit: usize,
    ) -> redis::RedisResult<Vec<Value>> {
        let mut conn = self.conn()?;
        let last = isize::try_from(limit).unwrap_or(KEPT).min(KEPT) - 1;
        if last < 0 {
            return Ok(Vec::new());
        }
        let texts: Vec<String> = redis::cmd("LRANGE")
            .arg(list_of(&self.prefix, package))
            .arg(0)
            .arg(last)
            .query_async(&mut conn)
            .await?;
        let mut out: Vec<Value> = texts
            .iter()
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect();
        // Each gateway pushes in batches: order by time across them.
        out.sort_by_key(|v| std::cmp::Reverse(v["unix_ms"].as_u64().unwrap_or(0)));
        Ok(out)
    }
}

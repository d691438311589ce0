//! A fleet of gateways for a test (SPEC section 11): one real PostgreSQL
//! store ([`crate::pg`]) and one real `redis-server` ([`crate::redis`]),
//! each gateway a process with a directory of its own, started by
//! [`Fleet::gateway`]; an account made through one gateway's API
//! ([`account`]); and [`within`], to wait for what the fleet promises.

use std::time::{Duration, Instant};

use crate::gateway::Gateway;
use crate::ops::{Setup, head};
use crate::pg::Postgres;
use crate::redis::Redis;

/// One shared store and Redis; each gateway a directory of its own.
#[derive(Debug)]
pub struct Fleet {
    /// The store every gateway shares.
    pub pg: Postgres,
    /// The registry and change channel every gateway shares.
    pub redis: Redis,
}

impl Fleet {
    /// Start the store and Redis (no gateway yet).
    pub fn start() -> Fleet {
        Fleet {
            pg: Postgres::start(),
            redis: Redis::start(),
        }
    }

    /// The config of gateway `id`: [`crate::ops::head`] on the shared
    /// store (`workers = 1`, as three fit on two cores; placeholders for
    /// its own ports and directory) and the `[fleet]` table.
    pub fn toml(&self, id: &str) -> String {
        format!(
            "{}\n[fleet]\nid = {id:?}\nredis = {:?}\n",
            head(&self.pg.store_table(), "interval_s = 3600"),
            self.redis.url()
        )
    }

    /// Start gateway `id` in a directory of its own; the setup starts it
    /// again there, on the same ports, with [`Fleet::toml`] of the same id.
    pub fn gateway(&self, id: &str) -> (Setup, Gateway) {
        let s = Setup::new(&format!("fleet-{id}"));
        let gw = s.start(&self.toml(id));
        (s, gw)
    }

    /// Start gateways `gw1` … `gwN`, each as [`Fleet::gateway`].
    pub fn gateways<const N: usize>(&self) -> [(Setup, Gateway); N] {
        std::array::from_fn(|i| self.gateway(&format!("gw{}", i + 1)))
    }
}

/// Poll `f` every 20 ms until it holds or `limit` passes; how long it took.
pub fn within(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    crate::eventually(limit, Duration::from_millis(20), || {
        f().then(|| started.elapsed())
    })
}

/// Through `gw`'s API: org `acme`, a `direct` node `n-a` in the US on
/// `bind`, and `package` (JSON, for org `acme`).
pub fn account(gw: &Gateway, bind: &str, package: &str) {
    gw.created("/v1/orgs", r#"{"id": "acme", "credits": 100}"#);
    gw.created(
        "/v1/nodes",
        &format!(r#"{{"id": "n-a", "kind": "direct", "bind": "{bind}", "country": "us"}}"#),
    );
    gw.created("/v1/packages", package);
}

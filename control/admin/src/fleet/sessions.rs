//! Sticky sessions shared by the fleet (SPEC section 11): a session's
//! exit, its rotation counts and its lifetime are the same on every
//! gateway.
//!
//! `{prefix}:sess:{package}:{id}` is a hash holding what the session's
//! first request fixed (`rules`, canonical), its node's id (`node`), when
//! its period started (`start`, the Redis server's clock in Unix ms) and
//! for how long (`len`, seconds), when its node took over (`since`), and
//! the requests on that node (`n`). It outlives the period by ten minutes,
//! so that the session's next period avoids the node, as on one gateway.
//!
//! A worker asks ([`SessionSync::claim`]) only for a session its gateway
//! has not seen, one whose timed rotation is due, and every request of a
//! `rotate-requests_N` session; one script starts the session, or counts
//! the request and rotates it when due, in one round trip. A session that
//! moved to a replacement after its node failed moves in Redis too (only
//! if no other gateway moved it first), and the move is announced on the
//! change channel so every gateway follows at once. The clock is Redis's,
//! so gateways' clocks need not agree.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use splicegate_control::rules::{Rotate, SessionId};
use splicegate_control::session::{
    ClaimReply, SessionClaim, SessionKey, SessionSync, SharedSession,
};
use tokio::sync::{mpsc, watch};

use super::{Event, FleetView, lock};
use crate::control::Control;

/// How long the fleet thread waits for Redis on a claim (the worker gives
/// up a little later and serves the request on its own table).
const CLAIM_TIMEOUT: Duration = Duration::from_millis(400);

/// Start the session (or a new period of it) with the first of ARGV's
/// nodes, or count the request and rotate it when due: to the first node,
/// or the second when the session is on the first. Without nodes (none
/// matches on the asking gateway) nothing starts or rotates: nil when
/// there is no session. ARGV[8], when not empty, is the node the asking
/// gateway found offline: a session still on it moves to the first node. An ended period's entry
/// lives on for [`GRACE_MS`], so that the next period avoids its node as on
/// one gateway. Returns the session, with Redis's clock, and 1 when this
/// call moved it off ARGV[8] (0 otherwise: another gateway may have moved
/// it first, and announced it).
const CLAIM_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('HMGET', KEYS[1], 'rules', 'node', 'start', 'len', 'since', 'n')
local function other(node)
  if ARGV[2] == '' then return node end
  if ARGV[2] ~= node then return ARGV[2] end
  return ARGV[3]
end
if not s[1] or not s[2] or now >= tonumber(s[3]) + tonumber(s[4]) * 1000 then
  if ARGV[2] == '' then return false end
  local len = tonumber(ARGV[4])
  local node = other(s[2])
  redis.call('HSET', KEYS[1], 'rules', ARGV[1], 'node', node, 'start', now, 'len', len, 'since', now, 'n', 1)
  redis.call('PEXPIREAT', KEYS[1], now + len * 1000 + tonumber(ARGV[7]))
  return {ARGV[1], node, now, len, now, 1, now, 0}
end
local node, since, n, moved = s[2], tonumber(s[5]), tonumber(s[6]), 0
if s[1] == ARGV[1] then
  local kind, every = tonumber(ARGV[5]), tonumber(ARGV[6])
  if ARGV[8] ~= '' and node == ARGV[8] and ARGV[2] ~= '' then
    node, since, n, moved = other(node), now, 1, 1
    redis.call('HSET', KEYS[1], 'node', node, 'since', since, 'n', n)
  elseif (kind == 1 and now - since >= every * 1000) or (kind == 2 and n >= every) then
    node, since, n = other(node), now, 1
    redis.call('HSET', KEYS[1], 'node', node, 'since', since, 'n', n)
  else
    n = n + 1
    redis.call('HSET', KEYS[1], 'n', n)
  end
end
return {s[1], node, tonumber(s[3]), tonumber(s[4]), since, n, now, moved}
";

/// How long a session's entry outlives its period.
const GRACE_MS: u64 = 600_000;

/// End a live session (1); 0 when there is none or its period ended.
const END_SCRIPT: &str = r"
local s = redis.call('HMGET', KEYS[1], 'start', 'len')
redis.call('DEL', KEYS[1])
if not s[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < tonumber(s[1]) + tonumber(s[2]) * 1000 then return 1 end
return 0
";

/// [`CLAIM_SCRIPT`] with its SHA-1 computed once, not per request.
static CLAIM: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(CLAIM_SCRIPT));
/// [`MOVE_SCRIPT`], likewise.
static MOVE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(MOVE_SCRIPT));

/// Move the session from ARGV[1] to ARGV[2], unless another gateway moved
/// it first (0).
const MOVE_SCRIPT: &str = r"
if redis.call('HGET', KEYS[1], 'node') == ARGV[1] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[1], 'node', ARGV[2], 'since', now, 'n', 1)
  return 1
end
return 0
";

/// What a worker asked of the fleet thread.
pub(super) enum Op {
    Claim(SessionClaim, ClaimReply),
    Moved {
        key: SessionKey,
        from: String,
        to: String,
    },
}

/// What a gateway tells the others about a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "session")]
pub enum SessionEvent {
    /// It left its node for `node` after its node failed.
    Moved {
        /// The package.
        package: u64,
        /// The session id.
        id: String,
        /// The node it is on now.
        node: String,
    },
    /// It was ended through the API.
    Ended {
        /// The package.
        package: u64,
        /// The session id.
        id: String,
    },
}

impl SessionSync for FleetView {
    fn claim(&self, claim: SessionClaim, reply: ClaimReply) {
        if !self.redis_up() {
            reply(None);
            return;
        }
        if let Err(mpsc::error::SendError(Op::Claim(_, reply))) =
            self.sessions.send(Op::Claim(claim, reply))
        {
            reply(None);
        }
    }

    fn moved(&self, key: SessionKey, from: &str, to: &str) {
        let _ = self.sessions.send(Op::Moved {
            key,
            from: from.to_string(),
            to: to.to_string(),
        });
    }
}

/// The Redis key of a session.
pub(super) fn key_of(prefix: &str, key: &SessionKey) -> String {
    format!("{prefix}:sess:{}:{}", key.package, key.id.as_str())
}

/// Serve the workers' session requests until told to stop; claims run
/// concurrently on the one multiplexed connection.
pub(super) async fn serve(
    conn: ConnectionManager,
    prefix: String,
    view: Arc<FleetView>,
    mut ops: mpsc::UnboundedReceiver<Op>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let op = tokio::select! {
            op = ops.recv() => op,
            _ = stop.changed() => return,
        };
        let Some(op) = op else { return };
        let (mut conn, prefix, view) = (conn.clone(), prefix.clone(), view.clone());
        tokio::spawn(async move {
            match op {
                Op::Claim(claim, reply) => {
                    let answer =
                        tokio::time::timeout(CLAIM_TIMEOUT, run_claim(&mut conn, &prefix, &claim))
                            .await;
                    match answer {
                        Ok(Ok(s)) => {
                            // Moved off the node this gateway found offline,
                            // by this claim: every gateway holding it follows
                            // at once. (Moved by another gateway first: that
                            // one announced it.)
                            if let Some((session, true)) = &s {
                                view.announce(Event::Session(SessionEvent::Moved {
                                    package: claim.key.package,
                                    id: claim.key.id.as_str().to_string(),
                                    node: session.node.clone(),
                                }));
                            }
                            reply(s.map(|(session, _)| session))
                        }
                        Ok(Err(e)) => {
                            view.set_redis_up(false, &e);
                            reply(None);
                        }
                        Err(_) => {
                            view.set_redis_up(false, &"no answer to a session claim within 400 ms");
                            reply(None);
                        }
                    }
                }
                Op::Moved { key, from, to } => {
                    let moved = MOVE
                        .key(key_of(&prefix, &key))
                        .arg(&from)
                        .arg(&to)
                        .invoke_async::<i64>(&mut conn)
                        .await;
                    match moved {
                        Ok(1) => view.announce(Event::Session(SessionEvent::Moved {
                            package: key.package,
                            id: key.id.as_str().to_string(),
                            node: to,
                        })),
                        Ok(_) => {}
                        Err(e) => view.set_redis_up(false, &e),
                    }
                }
            }
        });
    }
}

/// What [`CLAIM_SCRIPT`] returns: rules, node, start, length, since,
/// requests on the node, Redis's clock, whether this call moved it.
type ClaimAnswer = (String, String, u64, u32, u64, u32, u64, u8);

async fn run_claim(
    conn: &mut ConnectionManager,
    prefix: &str,
    claim: &SessionClaim,
) -> redis::RedisResult<Option<(SharedSession, bool)>> {
    let (kind, every) = match claim.rotate {
        None => (0, 0),
        Some(Rotate::Timed(n)) => (1, n),
        Some(Rotate::Requests(n)) => (2, n),
    };
    let answer: Option<ClaimAnswer> = CLAIM
        .key(key_of(prefix, &claim.key))
        .arg(&claim.rules)
        .arg(&claim.nodes[0])
        .arg(&claim.nodes[1])
        .arg(claim.length_s)
        .arg(kind)
        .arg(every)
        .arg(GRACE_MS)
        .arg(claim.replace.as_deref().unwrap_or(""))
        .invoke_async(conn)
        .await?;
    Ok(
        answer.map(|(rules, node, start, len, since, n, now, moved)| {
            (
                SharedSession {
                    rules,
                    node,
                    started_ms: start,
                    length_s: len,
                    node_since_ms: since,
                    requests_on_node: n,
                    now_ms: now,
                },
                moved == 1,
            )
        }),
    )
}

/// Follow what another gateway did to a session.
pub(super) fn apply(control: &Control, event: SessionEvent) {
    let engine = control.engine();
    let key = |package: u64, id: &str| SessionId::parse(id).map(|id| SessionKey { package, id });
    match event {
        SessionEvent::Moved { package, id, node } => {
            if let Some(k) = key(package, &id) {
                engine.session_moved(k, &node, control.now());
            }
        }
        SessionEvent::Ended { package, id } => {
            if let Some(k) = key(package, &id) {
                engine.sessions.remove(&k);
            }
        }
    }
}

impl FleetView {
    /// Queue `event` for the change channel.
    fn announce(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// The Redis connection, once the fleet thread made it.
    pub(super) fn set_conn(&self, conn: ConnectionManager) {
        *lock(&self.conn) = Some(conn);
    }
}

/// A session as Redis holds it, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSession {
    /// The package.
    pub package: u64,
    /// The session id.
    pub id: String,
    /// What its first request fixed (canonical).
    pub rules: String,
    /// Its node's id.
    pub node: String,
    /// Its length.
    pub length_s: u32,
    /// When it ends (Unix ms, Redis's clock).
    pub expires_ms: u64,
    /// Requests on its node, as far as the fleet counts them (every
    /// request of a `rotate-requests_N` session; the first request of
    /// each gateway otherwise).
    pub requests_on_node: u32,
}

/// A session's `rules`, `node`, `start`, `len` and `n`, as `HMGET` reads them.
type Row = (
    Option<String>,
    Option<String>,
    Option<u64>,
    Option<u32>,
    Option<u32>,
);

impl FleetView {
    pub(super) fn conn(&self) -> redis::RedisResult<ConnectionManager> {
        lock(&self.conn).clone().ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::Io,
                "the fleet has no Redis connection yet",
            ))
        })
    }

    /// The fleet's live sessions (of `package`, or all), at most `limit`,
    /// sorted by package and id.
    pub async fn sessions(
        &self,
        package: Option<u64>,
        limit: usize,
    ) -> redis::RedisResult<Vec<FleetSession>> {
        let mut conn = self.conn()?;
        let pattern = match package {
            Some(p) => format!("{}:sess:{p}:*", self.prefix),
            None => format!("{}:sess:*", self.prefix),
        };
        let mut keys: Vec<String> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        keys.sort();
        keys.dedup();
        let head = format!("{}:sess:", self.prefix);
        let mut out = Vec::new();
        for chunk in keys.chunks(500) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.cmd("HMGET")
                    .arg(k)
                    .arg(&["rules", "node", "start", "len", "n"]);
            }
            let rows: Vec<Row> = pipe.query_async(&mut conn).await?;
            for (k, row) in chunk.iter().zip(rows) {
                let (Some(rules), Some(node), Some(start), Some(len), n) = row else {
                    continue;
                };
                let Some((package, id)) = k
                    .strip_prefix(&head)
                    .and_then(|rest| rest.split_once(':'))
                    .and_then(|(p, id)| Some((p.parse().ok()?, id.to_string())))
                else {
                    continue;
                };
                out.push(FleetSession {
                    package,
                    id,
                    rules,
                    node,
                    length_s: len,
                    expires_ms: start + u64::from(len) * 1000,
                    requests_on_node: n.unwrap_or(0),
                });
            }
        }
        // Ended periods wait out their grace in Redis; they are not live.
        let now = crate::control::unix_ms();
        out.retain(|s| s.expires_ms > now);
        out.sort_by(|a, b| (a.package, &a.id).cmp(&(b.package, &b.id)));
        out.truncate(limit);
        Ok(out)
    }

    /// End a session on every gateway; whether the fleet held it.
    pub async fn end_session(&self, key: SessionKey) -> redis::RedisResult<bool> {
        let mut conn = self.conn()?;
        let gone: i64 = redis::Script::new(END_SCRIPT)
            .key(key_of(&self.prefix, &key))
            .invoke_async(&mut conn)
            .await?;
        self.announce(Event::Session(SessionEvent::Ended {
            package: key.package,
            id: key.id.as_str().to_string(),
        }));
        Ok(gone > 0)
    }
}

//! The admin API: HTTP/1.1 + JSON (axum). Reads come from the published
//! policy snapshot and the engine; changes go through [`Control`], which
//! publishes a new snapshot, so they hold from the next request on.
//!
//! Errors are `{"error": "<kind>", "message": "<what and what to do>"}` with
//! 400 (unreadable JSON or query), 401 (token), 404 (no such object or
//! route), 405, 409 (exists, or declared in the config file), 422 (a value
//! that does not make a valid policy), 500 (the store failed).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use splicegate_control::geo::{Country, GeoKind};
use splicegate_control::limits::credits_to_micro;
use splicegate_control::nodes::{NodeIdx, NodeKind};
use splicegate_control::policy::{Org, Package, Policy};
use splicegate_control::recent::ErrorRecord;
use splicegate_control::rules::{CountryRule, NetworkRule, OnError, Rotate, Rules, SessionId};
use splicegate_control::session::{SessionInfo, SessionKey};
use subtle::ConstantTimeEq;

use crate::control::{Control, FileObject, unix_ms};
use crate::error::{ControlError, StoreError};
use crate::metrics::{CONTENT_TYPE, Metrics};
use crate::time::rfc3339;
use splicegate_control::decl::{NodeFields, PackageFields};
use splicegate_control::limits::micro_to_credits as credits;

/// The dashboard page, with the vendored chart library (uPlot, MIT,
/// `vendor/`) put in place of its two markers: one response that needs
/// nothing else, so `/` stays the only open route besides `/healthz`.
static DASHBOARD: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    include_str!("dashboard.html")
        .replacen("/*uPlot.min.css*/", include_str!("vendor/uPlot.min.css"), 1)
        .replacen(
            "/*uPlot.iife.min.js*/",
            include_str!("vendor/uPlot.iife.min.js"),
            1,
        )
});

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The control object.
    pub control: Arc<Control>,
    /// The bearer token, when configured.
    pub token: Option<Arc<str>>,
    /// `/metrics`.
    pub metrics: Arc<Metrics>,
    /// This gateway's fleet, with `[fleet]`.
    pub fleet: Option<Arc<crate::fleet::FleetView>>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }
    fn bad_request(m: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m)
    }
    fn not_found(m: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", m)
    }
    fn invalid(m: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({"error": self.kind, "message": self.message})),
        )
            .into_response()
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::NotFound(m) => ApiError::not_found(m),
            ControlError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            ControlError::Invalid(m) => ApiError::invalid(m),
            ControlError::Store(StoreError::Unavailable(m)) => {
                tracing::warn!("admin API: the store is unavailable: {m}");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!("the store cannot be reached now; nothing was changed ({m})"),
                )
            }
            ControlError::Store(e) => {
                tracing::error!("admin API: {e}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store",
                    format!("the store failed: {e}"),
                )
            }
        }
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok(v: Value) -> ApiResult {
    Ok(axum::Json(v).into_response())
}

fn created(v: Value) -> ApiResult {
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

/// Read a JSON body: unreadable JSON is 400, JSON of the wrong shape
/// (unknown field, wrong type) is 422.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        if e.is_data() {
            ApiError::invalid(e.to_string())
        } else {
            ApiError::bad_request(format!("the body is not JSON: {e}"))
        }
    })
}

/// The router: `/healthz` and `/` (the dashboard page, which asks for the
/// token itself) are open; everything else needs the token when one is set.
pub fn router(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/orgs", get(list_orgs).post(create_org))
        .route("/v1/orgs/{id}", get(get_org))
        .route("/v1/orgs/{id}/credits", post(add_credits))
        .route("/v1/packages", get(list_packages).post(create_package))
        .route("/v1/packages/{id}", get(get_package).patch(patch_package))
        .route("/v1/packages/{id}/key", post(new_key))
        .route("/v1/packages/{id}/usage", get(usage_history))
        .route("/v1/packages/{id}/usage/reset", post(reset_usage))
        .route("/v1/packages/{id}/errors", get(package_errors))
        .route("/v1/errors", get(all_errors))
        .route("/v1/nodes", get(list_nodes).post(create_node))
        .route(
            "/v1/nodes/{id}",
            get(get_node).patch(patch_node).delete(delete_node),
        )
        .route("/v1/nodes/{id}/key", post(new_node_key))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{package}/{id}", delete(delete_session))
        .route("/v1/geo/countries", get(geo_countries))
        .route("/v1/geo/regions", get(geo_regions))
        .route("/v1/geo/cities", get(geo_cities))
        .route("/v1/geo/isps", get(geo_isps))
        .route("/v1/explain", get(explain))
        .route("/v1/gateways", get(list_gateways))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/", get(dashboard))
        .merge(guarded)
        .fallback(|| async { ApiError::not_found("no such endpoint; see docs/admin-api.md") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .with_state(state)
}

async fn auth(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let good =
            given.len() == token.len() && bool::from(given.as_bytes().ct_eq(token.as_bytes()));
        if !good {
            let mut r = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send Authorization: Bearer <admin.token>",
            )
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"splicegate-admin\""),
            );
            return r;
        }
    }
    next.run(req).await
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "serving"})).into_response()
}

async fn dashboard() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        DASHBOARD.as_str(),
    )
        .into_response()
}

/// `GET /v1/gateways`: the fleet's live gateways, this one marked `self`.
async fn list_gateways(State(s): State<AppState>) -> ApiResult {
    let Some(f) = &s.fleet else {
        return Err(ApiError::not_found(
            "this gateway is not in a fleet ([fleet] is not configured)",
        ));
    };
    let me = f.id();
    let redis_up = f.redis_up();
    ok(Value::Array(
        f.gateways()
            .into_iter()
            .map(|g| {
                json!({
                    "id": g.id,
                    "self": g.id == me,
                    "boot": g.boot,
                    "proxy": g.proxy,
                    "admin": g.admin,
                    "up_since": crate::time::rfc3339(g.up_since_ms),
                    "seen": crate::time::rfc3339(g.seen_ms),
                    "load": g.load,
                    "connections": g.connections,
                    "shares": g.shares,
                    "demand": g.demand,
                    "rps_shares": g.rps_shares,
                    "redis": if g.id == me { Some(redis_up) } else { None },
                })
            })
            .collect(),
    ))
}

async fn metrics(State(s): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], s.metrics.render()).into_response()
}

// ---- organisations ----

/// In a fleet, usage as the whole fleet relayed it (see
/// [`Control::fleet_usage`]); `None` on one gateway, or while the store
/// cannot be read (the API then shows this gateway's counters).
fn fleet_usage(s: &AppState) -> Option<crate::control::FleetUsage> {
    s.fleet.as_ref().and_then(|_| s.control.fleet_usage())
}

/// An organisation's spending and balance (micro-credits): the fleet's in
/// a fleet.
fn spent_and_balance(s: &AppState, org: &Org) -> (i64, i64) {
    let a = &org.account;
    match fleet_usage(s) {
        Some(f) => {
            let spent = f.spent(&org.decl.id);
            (spent, a.granted() - spent)
        }
        None => (a.spent(), a.balance()),
    }
}

fn org_json(s: &AppState, policy: &Policy, org: &Org) -> Value {
    let a = &org.account;
    let (spent, balance) = spent_and_balance(s, org);
    let mut packages: Vec<u64> = policy
        .packages
        .values()
        .filter(|p| p.decl.org.as_deref() == Some(org.decl.id.as_str()))
        .map(|p| p.id())
        .collect();
    packages.sort_unstable();
    json!({
        "id": org.decl.id,
        "balance": credits(balance),
        "granted": credits(a.granted()),
        "spent": credits(spent),
        "balance_micro": balance,
        "packages": packages,
        "from_file": s.control.declared_in_file(FileObject::Org(&org.decl.id)),
    })
}

async fn list_orgs(State(s): State<AppState>) -> ApiResult {
    let policy = s.control.engine().policy();
    let mut orgs: Vec<&Arc<Org>> = policy.orgs.values().collect();
    orgs.sort_by(|a, b| a.decl.id.cmp(&b.decl.id));
    ok(Value::Array(
        orgs.iter().map(|o| org_json(&s, &policy, o)).collect(),
    ))
}

async fn get_org(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    org_reply(&s, &id)
}

/// An organisation as the API shows it, or 404.
fn org_reply(s: &AppState, id: &str) -> ApiResult {
    let policy = s.control.engine().policy();
    let org = policy
        .orgs
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no org {id}")))?;
    ok(org_json(s, &policy, org))
}

fn micro(what: &str, amount: f64) -> Result<i64, ApiError> {
    credits_to_micro(amount)
        .ok_or_else(|| ApiError::invalid(format!("{what} {amount} is not a credit amount")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrg {
    id: String,
    #[serde(default)]
    credits: f64,
}

async fn create_org(State(s): State<AppState>, bytes: Bytes) -> ApiResult {
    let b: NewOrg = body(&bytes)?;
    let m = micro("credits", b.credits)?;
    if m < 0 {
        return Err(ApiError::invalid("credits: an opening grant is 0 or more"));
    }
    s.control.create_org(&b.id, m)?;
    let policy = s.control.engine().policy();
    let org = policy
        .orgs
        .get(&b.id)
        .ok_or_else(|| ApiError::not_found(format!("no org {}", b.id)))?;
    created(org_json(&s, &policy, org))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Amount {
    amount: f64,
}

async fn add_credits(State(s): State<AppState>, Path(id): Path<String>, bytes: Bytes) -> ApiResult {
    let b: Amount = body(&bytes)?;
    let m = micro("amount", b.amount)?;
    if m == 0 {
        return Err(ApiError::invalid(
            "amount: give a non-zero amount (negative corrects)",
        ));
    }
    s.control.add_credits(&id, m)?;
    org_reply(&s, &id)
}

// ---- packages ----

fn package_json(s: &AppState, p: &Package) -> Value {
    let d = &p.decl;
    let u = match fleet_usage(s) {
        Some(f) => f.package(p.id(), p.usage.totals()),
        None => p.usage.totals(),
    };
    json!({
        "id": d.id,
        "org": d.org,
        "status": d.status.as_str(),
        "protocols": d.protocols.iter().map(|x| x.as_str()).collect::<Vec<_>>(),
        "networks": d.networks.iter().map(|x| x.as_str()).collect::<Vec<_>>(),
        "features": d.features.iter().map(|x| x.as_str()).collect::<Vec<_>>(),
        "auth": d.auth.as_str(),
        "ip_allowlist": d.ip_allowlist,
        "default_rules": d.default_rules,
        "rps_limit": d.rps_limit,
        "max_connections": d.max_connections,
        "traffic_limit_bytes": d.traffic_limit_bytes,
        "price_per_gb": credits(d.price_per_gb as i64),
        "bytes_up": u.bytes_up,
        "bytes_down": u.bytes_down,
        "bytes": u.bytes(),
        "requests": u.requests,
        "charged": credits(u.charged as i64),
        "connections": p.usage.connections(),
        "balance": p.org.as_ref().map(|o| credits(spent_and_balance(s, o).1)),
        "from_file": s.control.declared_in_file(FileObject::Package(d.id)),
    })
}

fn package_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::not_found(format!("no package {raw}")))
}

fn with_package(s: &AppState, id: u64) -> Result<Value, ApiError> {
    let policy = s.control.engine().policy();
    let p = policy
        .packages
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("no package {id}")))?;
    Ok(package_json(s, p))
}

async fn list_packages(State(s): State<AppState>) -> ApiResult {
    let policy = s.control.engine().policy();
    let mut ids: Vec<u64> = policy.packages.keys().copied().collect();
    ids.sort_unstable();
    ok(Value::Array(
        ids.iter()
            .map(|id| package_json(&s, &policy.packages[id]))
            .collect(),
    ))
}

async fn get_package(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(with_package(&s, package_id(&id)?)?)
}

async fn create_package(State(s): State<AppState>, bytes: Bytes) -> ApiResult {
    let fields: PackageFields = body(&bytes)?;
    let (id, key) = s.control.create_package(fields)?;
    let mut v = with_package(&s, id)?;
    v["key"] = Value::String(key);
    created(v)
}

async fn patch_package(
    State(s): State<AppState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult {
    let id = package_id(&id)?;
    let fields: PackageFields = body(&bytes)?;
    s.control.patch_package(id, &fields)?;
    ok(with_package(&s, id)?)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    key: Option<String>,
}

async fn new_key(State(s): State<AppState>, Path(id): Path<String>, bytes: Bytes) -> ApiResult {
    let id = package_id(&id)?;
    let b: KeyBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        KeyBody::default()
    } else {
        body(&bytes)?
    };
    let key = s.control.set_key(id, b.key)?;
    ok(json!({"id": id, "key": key}))
}

async fn reset_usage(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let id = package_id(&id)?;
    let left = s.control.reset_usage(id)?;
    let mut v = with_package(&s, id)?;
    v["reset"] = json!({
        "bytes_up": left.bytes_up,
        "bytes_down": left.bytes_down,
        "requests": left.requests,
        "charged": credits(left.charged as i64),
    });
    ok(v)
}

/// Buckets one answer may hold.
const MAX_BUCKETS: u64 = 10_000;

/// `GET /v1/packages/{id}/usage?from=&to=&step=hour|day`: billing history
/// from the ledger, every usage epoch included (a reset starts the cap
/// over, not the bill). `from` and `to` are RFC 3339 (`…Z`), a date, or
/// seconds since the epoch; default: the last 24 hours (hour) or 30 days
/// (day) up to now. Buckets are aligned to UTC; empty ones are left out.
async fn usage_history(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let id = package_id(&id)?;
    if !s.control.engine().policy().packages.contains_key(&id) {
        return Err(ApiError::not_found(format!("no package {id}")));
    }
    let (step, step_ms) = match q.get("step").map(String::as_str) {
        None | Some("hour") => ("hour", 3_600_000u64),
        Some("day") => ("day", 86_400_000),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "step: {other:?} is not hour or day"
            )));
        }
    };
    let time = |key: &str| -> Result<Option<u64>, ApiError> {
        q.get(key)
            .map(|v| {
                crate::time::parse_time(v).ok_or_else(|| {
                    ApiError::invalid(format!(
                        "{key}: {v:?} is not an RFC 3339 time (2026-12-01T10:00:00Z), a date or seconds since the epoch"
                    ))
                })
            })
            .transpose()
    };
    let to = time("to")?.unwrap_or_else(unix_ms);
    let from = time("from")?.unwrap_or(to.saturating_sub(if step == "hour" {
        24 * 3_600_000
    } else {
        30 * 86_400_000
    }));
    if from >= to {
        return Err(ApiError::invalid("from must be before to"));
    }
    if (to - from) / step_ms > MAX_BUCKETS {
        return Err(ApiError::invalid(format!(
            "at most {MAX_BUCKETS} buckets per answer: narrow from..to or use step=day"
        )));
    }
    let buckets = s
        .control
        .usage_history(id, from, to, (step_ms / 60_000) as i64)?;
    ok(json!({
        "package": id,
        "step": step,
        "from": rfc3339(from),
        "to": rfc3339(to),
        "buckets": buckets.iter().map(|(minute, t)| json!({
            "start": rfc3339(*minute as u64 * 60_000),
            "bytes_up": t.bytes_up,
            "bytes_down": t.bytes_down,
            "bytes": t.bytes(),
            "requests": t.requests,
            "charged": credits(t.charged as i64),
        })).collect::<Vec<_>>(),
    }))
}

/// One recent error as the API shows it.
pub(crate) fn error_json(e: &ErrorRecord) -> Value {
    json!({
        "time": rfc3339(e.unix_ms),
        "unix_ms": e.unix_ms,
        "package": e.package,
        "protocol": e.protocol.map(|p| p.as_str()),
        "code": e.code.as_str(),
        "status": e.code.status(),
        "detail": e.detail,
    })
}

fn errors_json(records: &[ErrorRecord], limit: usize) -> Value {
    Value::Array(records.iter().take(limit).map(error_json).collect())
}

/// In a fleet, the fleet's recent errors (of `package`, or all), each
/// with the gateway that answered it.
async fn fleet_errors(s: &AppState, package: Option<u64>, limit: usize) -> Option<ApiResult> {
    let f = s.fleet.as_ref()?;
    Some(match f.errors(package, limit).await {
        Ok(list) => ok(Value::Array(list)),
        Err(e) => Err(fleet_unavailable(&e)),
    })
}

fn limit(q: &HashMap<String, String>, default: usize) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::bad_request(format!("limit {v:?} is not a number"))),
    }
}

async fn package_errors(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let id = package_id(&id)?;
    let limit = limit(&q, 100)?;
    let errors = {
        let policy = s.control.engine().policy();
        let p = policy
            .packages
            .get(&id)
            .ok_or_else(|| ApiError::not_found(format!("no package {id}")))?;
        p.errors.recent()
    };
    if let Some(answer) = fleet_errors(&s, Some(id), limit).await {
        return answer;
    }
    ok(errors_json(&errors, limit))
}

async fn all_errors(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let limit = limit(&q, 100)?;
    if let Some(answer) = fleet_errors(&s, None, limit).await {
        return answer;
    }
    ok(errors_json(&s.control.engine().errors.recent(), limit))
}

// ---- nodes ----

/// A node as the API shows it: never its key nor the key's hash. `state`
/// is the effective state (an agent node is offline while its device is not
/// connected), `admin_state` the operator's; an agent node adds `connected`
/// and `agent` (its connection's figures, or null).
/// In a fleet, what each gateway reported of the nodes: node id →
/// (gateways whose health checks judge it unhealthy, gateways its agent is
/// connected to).
type FleetNodes = HashMap<String, (Vec<String>, Vec<String>)>;

fn fleet_nodes(s: &AppState) -> Option<FleetNodes> {
    let f = s.fleet.as_ref()?;
    let mut out = FleetNodes::new();
    for g in f.gateways() {
        for n in g.unhealthy {
            out.entry(n).or_default().0.push(g.id.clone());
        }
        for n in g.agents {
            out.entry(n).or_default().1.push(g.id.clone());
        }
    }
    Some(out)
}

fn node_json(s: &AppState, policy: &Policy, idx: NodeIdx, fleet: Option<&FleetNodes>) -> Value {
    let n = policy.nodes.node(idx);
    let name = |id: Option<u32>| id.map(|i| policy.geo.name(i).to_string());
    let agent = (n.kind == NodeKind::Agent).then(|| n.runtime.agent().snapshot());
    let mut v = json!({
        "id": &*n.id,
        "kind": n.kind.as_str(),
        "addr": n.addr,
        "bind": n.bind,
        "username": n.credentials.as_ref().map(|c| &*c.0),
        "country": n.country.map(|c| c.as_str().to_string()),
        "region": name(n.region),
        "city": name(n.city),
        "isp": name(n.isp),
        "asn": n.asn,
        "network": n.network.as_str(),
        "state": n.state().as_str(),
        "admin_state": n.admin_state().as_str(),
        // An agent's health is its presence.
        "healthy": match &agent {
            Some(a) => a.is_some(),
            None => !n.runtime.is_unhealthy(),
        },
        "active_tunnels": n.runtime.active(),
        "recent_failures": n.runtime.recent_failures(),
        "from_file": s.control.declared_in_file(FileObject::Node(&n.id)),
    });
    if let Some(fleet) = fleet {
        let (unhealthy, connected) = fleet.get(&*n.id).cloned().unwrap_or_default();
        if n.kind == NodeKind::Agent {
            v["connected_on"] = json!(connected);
        } else {
            v["unhealthy_on"] = json!(unhealthy);
        }
    }
    if let Some(a) = agent {
        v["connected"] = Value::Bool(a.is_some());
        v["agent"] = match a {
            Some(a) => json!({
                "since": rfc3339(a.since_unix_ms),
                "since_unix_ms": a.since_unix_ms,
                "addr": a.addr.to_string(),
                "streams": a.streams,
                "bytes_up": a.bytes_up,
                "bytes_down": a.bytes_down,
                "rtt_ms": a.rtt_ms,
                "version": a.version,
            }),
            None => Value::Null,
        };
    }
    v
}

async fn list_nodes(State(s): State<AppState>) -> ApiResult {
    let policy = s.control.engine().policy();
    let mut nodes: Vec<(NodeIdx, &str)> = policy.nodes.iter().map(|(i, n)| (i, &*n.id)).collect();
    nodes.sort_by(|a, b| a.1.cmp(b.1));
    let fleet = fleet_nodes(&s);
    ok(Value::Array(
        nodes
            .iter()
            .map(|(i, _)| node_json(&s, &policy, *i, fleet.as_ref()))
            .collect(),
    ))
}

fn with_node(s: &AppState, id: &str) -> Result<Value, ApiError> {
    let policy = s.control.engine().policy();
    let (idx, _) = policy
        .nodes
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no node {id}")))?;
    Ok(node_json(s, &policy, idx, fleet_nodes(s).as_ref()))
}

async fn get_node(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(with_node(&s, &id)?)
}

async fn create_node(State(s): State<AppState>, bytes: Bytes) -> ApiResult {
    let fields: NodeFields = body(&bytes)?;
    let (id, key) = s.control.create_node(&fields)?;
    let mut v = with_node(&s, &id)?;
    // A generated agent key, shown this once.
    if let Some(key) = key {
        v["key"] = Value::String(key);
    }
    created(v)
}

/// `POST /v1/nodes/{id}/key`: a new agent key (`{"key": "..."}` to choose
/// it, or no body), returned once.
async fn new_node_key(
    State(s): State<AppState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult {
    let b: KeyBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        KeyBody::default()
    } else {
        body(&bytes)?
    };
    let key = s.control.new_agent_key(&id, b.key)?;
    ok(json!({"id": id, "key": key}))
}

async fn patch_node(State(s): State<AppState>, Path(id): Path<String>, bytes: Bytes) -> ApiResult {
    let fields: NodeFields = body(&bytes)?;
    s.control.patch_node(&id, &fields)?;
    ok(with_node(&s, &id)?)
}

async fn delete_node(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    s.control.delete_node(&id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- sessions ----

fn session_json(policy: &Policy, info: &SessionInfo, now_ns: u64, now_ms: u64) -> Value {
    let s = &info.session;
    let left_ms = s.expires().0.saturating_sub(now_ns) / 1_000_000;
    let node = s.away.as_deref().unwrap_or(&policy.nodes.node(s.node).id);
    json!({
        "package": info.key.package,
        "id": info.key.id.as_str(),
        "node": node,
        "rules": s.fingerprint.to_listed_rules(info.key.package).to_username(&policy.geo),
        "length_s": s.length_s,
        "expires_in_s": left_ms.div_ceil(1000),
        "expires_at": rfc3339(now_ms + left_ms),
        "requests": s.requests,
        "requests_on_node": s.requests_on_node,
    })
}

/// A session of the fleet, in the shape of [`session_json`] (`requests`,
/// counted per gateway, is left out).
fn fleet_session_json(s: &crate::fleet::FleetSession, now_ms: u64) -> Value {
    let left_ms = s.expires_ms.saturating_sub(now_ms);
    json!({
        "package": s.package,
        "id": s.id,
        "node": s.node,
        "rules": s.rules,
        "length_s": s.length_s,
        "expires_in_s": left_ms.div_ceil(1000),
        "expires_at": rfc3339(s.expires_ms),
        "requests_on_node": s.requests_on_node,
    })
}

fn fleet_unavailable(e: &redis::RedisError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "fleet_unavailable",
        format!("the fleet's sessions are in Redis, which cannot be reached now ({e})"),
    )
}

/// `GET /v1/sessions`: the live sessions; in a fleet, every gateway's (as
/// Redis holds them).
async fn list_sessions(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let package = match q.get("package") {
        None => None,
        Some(p) => Some(
            p.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("package {p:?} is not a number")))?,
        ),
    };
    let limit = limit(&q, 1000)?;
    let now_ms = unix_ms();
    if let Some(f) = &s.fleet {
        let list = f
            .sessions(package, limit)
            .await
            .map_err(|e| fleet_unavailable(&e))?;
        return ok(Value::Array(
            list.iter().map(|x| fleet_session_json(x, now_ms)).collect(),
        ));
    }
    let now = s.control.now();
    let policy = s.control.engine().policy();
    let list = s.control.engine().sessions.list(package, now);
    ok(Value::Array(
        list.iter()
            .take(limit)
            .map(|i| session_json(&policy, i, now.0, now_ms))
            .collect(),
    ))
}

/// `DELETE /v1/sessions/{package}/{id}`: end a session now (in a fleet, on
/// every gateway).
async fn delete_session(
    State(s): State<AppState>,
    Path((package, id)): Path<(String, String)>,
) -> ApiResult {
    let package = package_id(&package)?;
    let sid = SessionId::parse(&id)
        .ok_or_else(|| ApiError::not_found(format!("no session {id} of package {package}")))?;
    let key = SessionKey { package, id: sid };
    let here = s.control.engine().sessions.remove(&key);
    let held = match &s.fleet {
        Some(f) => f
            .end_session(key)
            .await
            .map_err(|e| fleet_unavailable(&e))?,
        None => here,
    };
    if held {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found(format!(
            "no live session {id} of package {package}"
        )))
    }
}

// ---- geo ----

fn country_param(q: &HashMap<String, String>) -> Result<Option<Country>, ApiError> {
    match q.get("country") {
        None => Ok(None),
        Some(c) => Country::parse(c).map(Some).ok_or_else(|| {
            ApiError::bad_request(format!(
                "country {c:?} is not a lowercase ISO 3166-1 alpha-2 code"
            ))
        }),
    }
}

async fn geo_countries(State(s): State<AppState>) -> ApiResult {
    let policy = s.control.engine().policy();
    let mut counts: std::collections::BTreeMap<Country, u64> =
        policy.nodes.country_counts().into_iter().collect();
    for kind in [GeoKind::Region, GeoKind::City, GeoKind::Isp] {
        for (c, _) in policy.geo.entries(kind) {
            counts.entry(c).or_insert(0);
        }
    }
    ok(Value::Array(
        counts
            .iter()
            .map(|(c, n)| json!({"country": c.as_str(), "online_nodes": n}))
            .collect(),
    ))
}

fn geo_names(s: &AppState, kind: GeoKind, q: &HashMap<String, String>) -> ApiResult {
    let only = country_param(q)?;
    let policy = s.control.engine().policy();
    let mut per_country: HashMap<Country, HashMap<&str, u64>> = HashMap::new();
    let mut out = Vec::new();
    for (c, name) in policy.geo.entries(kind) {
        if only.is_some_and(|o| o != c) {
            continue;
        }
        let counts = per_country.entry(c).or_insert_with(|| {
            policy
                .nodes
                .name_counts(c, kind)
                .into_iter()
                .map(|(id, n)| (policy.geo.name(id), n))
                .collect()
        });
        out.push(json!({
            "country": c.as_str(),
            "name": name,
            "online_nodes": counts.get(name).copied().unwrap_or(0),
        }));
    }
    ok(Value::Array(out))
}

async fn geo_regions(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    geo_names(&s, GeoKind::Region, &q)
}

async fn geo_cities(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    geo_names(&s, GeoKind::City, &q)
}

async fn geo_isps(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    geo_names(&s, GeoKind::Isp, &q)
}

// ---- explain ----

fn rules_json(r: &Rules, policy: &Policy) -> Value {
    let name = |id: Option<u32>| id.map(|i| policy.geo.name(i).to_string());
    json!({
        "package": r.package,
        "country": match r.country.unwrap_or_default() {
            CountryRule::Any => "any".to_string(),
            CountryRule::Is(c) => c.as_str().to_string(),
        },
        "region": name(r.region),
        "city": name(r.city),
        "isp": name(r.isp),
        "asn": r.asn,
        "network": match r.network {
            None | Some(NetworkRule::Any) => "any",
            Some(NetworkRule::Is(n)) => n.as_str(),
        },
        "session": r.session.as_ref().map(|s| s.as_str().to_string()),
        "sessionlength": r.session.map(|_| r.session_length()),
        "bind": r.bind_node.then_some("node"),
        "rotate": r.rotate.map(|x| match x {
            Rotate::Timed(n) => format!("timed_{n}"),
            Rotate::Requests(n) => format!("requests_{n}"),
        }),
        "onerror": match r.on_error() {
            OnError::Replace => "replace".to_string(),
            OnError::Fail => "fail".to_string(),
            OnError::Retry(n) => format!("retry_{n}"),
        },
        "prefer": r.prefer_lookalike.then_some("lookalike"),
    })
}

async fn explain(State(s): State<AppState>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let username = q
        .get("username")
        .ok_or_else(|| ApiError::bad_request("give ?username=package-<id>-<rules>"))?;
    let ex = s.control.engine().explain(username);
    let policy = s.control.engine().policy();
    let answer = match &ex.rejection {
        Some(r) => json!({"code": r.code.as_str(), "status": r.code.status(), "detail": r.detail}),
        None => json!({"code": "OK", "status": 200, "detail": "these rules would be routed now"}),
    };
    ok(json!({
        "username": username,
        "canonical": ex.canonical,
        "rules": ex.rules.as_ref().map(|r| rules_json(r, &policy)),
        "answer": answer,
        "matching_nodes": ex.matching_nodes,
    }))
}

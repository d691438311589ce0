//! A minimal client of the admin API (SPEC 6), for tests that read usage:
//! one request per connection, `Authorization: Bearer` with the token
//! [`crate::Conf`] writes.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::client::Conn;
use crate::gateway::Gateway;

/// The token [`crate::Conf::toml`] configures.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// One admin request; the status and the body parsed as JSON (`Null` when
/// the body is not JSON).
pub fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> io::Result<(u16, serde_json::Value)> {
    let mut c = Conn::open(Ipv4Addr::LOCALHOST, addr)?;
    c.set_timeout(Duration::from_secs(5));
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n"
    );
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    c.send(req.as_bytes())?;
    let r = c.read_response(method)?;
    let v = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
    Ok((r.status, v))
}

/// Usage of one package as the admin API reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes from clients towards targets.
    pub bytes_up: u64,
    /// Bytes from targets towards clients.
    pub bytes_down: u64,
    /// Requests counted.
    pub requests: u64,
}

impl Usage {
    /// Both directions.
    pub fn total(&self) -> u64 {
        self.bytes_up + self.bytes_down
    }
}

/// Find a `u64` named `key` anywhere in `v` (the API may nest usage).
fn find_u64(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(x) = m.get(key).and_then(|x| x.as_u64()) {
                return Some(x);
            }
            m.values().find_map(|x| find_u64(x, key))
        }
        _ => None,
    }
}

impl Gateway {
    /// The admin API's address (`[admin] listen`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.addr("ADMIN")
    }

    /// `GET /v1/packages/{id}`: its usage, or why not.
    pub fn package_usage(&self, id: u32) -> Result<Usage, String> {
        let (status, v) = admin_request(
            self.admin_addr(),
            "GET",
            &format!("/v1/packages/{id}"),
            None,
        )
        .map_err(|e| format!("GET /v1/packages/{id}: {e}"))?;
        if status != 200 {
            return Err(format!("GET /v1/packages/{id}: {status} {v}"));
        }
        Ok(Usage {
            bytes_up: find_u64(&v, "bytes_up").ok_or_else(|| format!("no bytes_up in {v}"))?,
            bytes_down: find_u64(&v, "bytes_down")
                .ok_or_else(|| format!("no bytes_down in {v}"))?,
            requests: find_u64(&v, "requests").unwrap_or(0),
        })
    }

    /// What the store's ledger holds for package `id`: the buckets of
    /// `GET /v1/packages/{id}/usage` (the last 24 hours, every usage epoch)
    /// summed. In a fleet that is every gateway's flushes (this gateway
    /// flushes its own first), where `GET /v1/packages/{id}` is this
    /// gateway's view.
    pub fn ledger_usage(&self, id: u32) -> Result<Usage, String> {
        let path = format!("/v1/packages/{id}/usage");
        let (status, v) = admin_request(self.admin_addr(), "GET", &path, None)
            .map_err(|e| format!("GET {path}: {e}"))?;
        let buckets = match (status, v["buckets"].as_array()) {
            (200, Some(b)) => b,
            _ => return Err(format!("GET {path}: {status} {v}")),
        };
        let sum = |key: &str| buckets.iter().filter_map(|b| b[key].as_u64()).sum();
        Ok(Usage {
            bytes_up: sum("bytes_up"),
            bytes_down: sum("bytes_down"),
            requests: sum("requests"),
        })
    }
}

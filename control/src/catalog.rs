//! The error catalogue: every rejection the gateway can answer, in one table.
//!
//! Each [`Code`] maps, here and nowhere else, to its HTTP status, the reason
//! phrase (the code itself, because many clients show only the status line of a
//! CONNECT answer), the RFC 9209 `Proxy-Status` error type and the SOCKS5 answer.
//! [`write_http_error`] and [`write_http_ok`] are the only writers of an HTTP
//! status line in the gateway.

use std::fmt;

/// Every code a client can receive. The first 21 are the commercial networks'
/// (`X-SOAX-Error`) set; the last five are splicegate's own, in the same format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Code {
    /// 407: no credentials, and the client's address is on no `ip`-auth allowlist.
    ErrAuthRequired,
    /// 407: unknown package, wrong key, key in the username, malformed Basic value.
    AuthFailed,
    /// 407: the package authenticates by address and this one is not allowed.
    IpNotAllowed,
    /// 407: the package is suspended by the operator.
    PackageSuspended,
    /// 407: the package is paused.
    PackagePaused,
    /// 407: the organisation's credit balance is zero or less.
    PackageNoCredits,
    /// 400: no targeting rule at all.
    ErrMissingParams,
    /// 400: a key that is not in the grammar.
    ErrUnknownParam,
    /// 400: a key given twice.
    ErrDuplicateParam,
    /// 400: a value of the wrong form, not in the catalogue, or missing.
    ErrInvalidValue,
    /// 400: rules that contradict each other.
    ErrInvalidCombination,
    /// 400: a network or plan feature the package has not enabled.
    ErrParamNotAllowed,
    /// 403: protocol not allowed for the package, or a blocked target.
    Disallowed,
    /// 429: the package's traffic cap is reached.
    TrafficLimitExceeded,
    /// 429: over the package's RPS or concurrent-connection limit.
    RateLimitExceeded,
    /// 409: a live session asked for with different rules.
    SessionParamsMismatch,
    /// 502: no online node matches the rules.
    NodeNotFound,
    /// 502: the node (and its replacements) failed.
    NodeUnavailable,
    /// 502: `onerror-retry_N` retried, then the replacement failed too.
    RetriesExhausted,
    /// 503: a `bind-node` session's node failed.
    BoundNodeFailed,
    /// 504: the node accepted but the target did not answer in time.
    GatewayTimeout,
    /// 502: the node reached the target's network but the target refused or does not exist.
    TargetUnreachable,
    /// 400: malformed HTTP head, bad framing, bad CONNECT authority.
    BadRequest,
    /// 408: the client did not finish its request in time.
    ClientTimeout,
    /// 431: request line or head over the limit.
    HeadersTooLarge,
    /// 503: out of file descriptors, or the session table is full.
    Overloaded,
}

/// How a code is answered on a SOCKS5 connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socks5Answer {
    /// RFC 1929 sub-negotiation status 0x01 (failure), then close. When the
    /// client offered no username/password method at all, the method reply is
    /// 0xFF instead.
    AuthFailure,
    /// RFC 1928 reply field of the CONNECT answer.
    Reply(u8),
}

impl Code {
    /// Every code, in catalogue order.
    pub const ALL: [Code; 26] = [
        Code::ErrAuthRequired,
        Code::AuthFailed,
        Code::IpNotAllowed,
        Code::PackageSuspended,
        Code::PackagePaused,
        Code::PackageNoCredits,
        Code::ErrMissingParams,
        Code::ErrUnknownParam,
        Code::ErrDuplicateParam,
        Code::ErrInvalidValue,
        Code::ErrInvalidCombination,
        Code::ErrParamNotAllowed,
        Code::Disallowed,
        Code::TrafficLimitExceeded,
        Code::RateLimitExceeded,
        Code::SessionParamsMismatch,
        Code::NodeNotFound,
        Code::NodeUnavailable,
        Code::RetriesExhausted,
        Code::BoundNodeFailed,
        Code::GatewayTimeout,
        Code::TargetUnreachable,
        Code::BadRequest,
        Code::ClientTimeout,
        Code::HeadersTooLarge,
        Code::Overloaded,
    ];

    /// Position in [`Code::ALL`] (for per-code counters).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The code as clients see it (`X-SOAX-Error`, reason phrase, logs).
    pub const fn as_str(self) -> &'static str {
        self.row().0
    }

    /// HTTP status code.
    pub const fn status(self) -> u16 {
        self.row().1
    }

    /// RFC 9209 `Proxy-Status` error type.
    pub const fn proxy_status(self) -> &'static str {
        self.row().2
    }

    /// The SOCKS5 answer for this code.
    pub const fn socks5(self) -> Socks5Answer {
        self.row().3
    }

    /// Whether the code is one of the six 400 rule-validation codes.
    pub const fn is_rule_error(self) -> bool {
        self.status() == 400 && !matches!(self, Code::BadRequest)
    }

    /// Parse a code from its wire name.
    pub fn from_name(name: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// The one table.
    const fn row(self) -> (&'static str, u16, &'static str, Socks5Answer) {
        use Socks5Answer::{AuthFailure as AF, Reply as R};
        match self {
            Code::ErrAuthRequired => ("ERR_AUTH_REQUIRED", 407, "http_request_denied", AF),
            Code::AuthFailed => ("AUTH_FAILED", 407, "http_request_denied", AF),
            Code::IpNotAllowed => ("IP_NOT_ALLOWED", 407, "http_request_denied", AF),
            Code::PackageSuspended => ("PACKAGE_SUSPENDED", 407, "http_request_denied", AF),
            Code::PackagePaused => ("PACKAGE_PAUSED", 407, "http_request_denied", AF),
            Code::PackageNoCredits => ("PACKAGE_NO_CREDITS", 407, "http_request_denied", AF),
            Code::ErrMissingParams => ("ERR_MISSING_PARAMS", 400, "http_request_error", R(0x02)),
            Code::ErrUnknownParam => ("ERR_UNKNOWN_PARAM", 400, "http_request_error", R(0x02)),
            Code::ErrDuplicateParam => ("ERR_DUPLICATE_PARAM", 400, "http_request_error", R(0x02)),
            Code::ErrInvalidValue => ("ERR_INVALID_VALUE", 400, "http_request_error", R(0x02)),
            Code::ErrInvalidCombination => (
                "ERR_INVALID_COMBINATION",
                400,
                "http_request_error",
                R(0x02),
            ),
            Code::ErrParamNotAllowed => {
                ("ERR_PARAM_NOT_ALLOWED", 400, "http_request_denied", R(0x02))
            }
            Code::Disallowed => ("DISALLOWED", 403, "destination_ip_prohibited", R(0x02)),
            Code::TrafficLimitExceeded => (
                "TRAFFIC_LIMIT_EXCEEDED",
                429,
                "http_request_denied",
                R(0x02),
            ),
            Code::RateLimitExceeded => (
                "RATE_LIMIT_EXCEEDED",
                429,
                "connection_limit_reached",
                R(0x02),
            ),
            Code::SessionParamsMismatch => (
                "SESSION_PARAMS_MISMATCH",
                409,
                "http_request_error",
                R(0x02),
            ),
            Code::NodeNotFound => ("NODE_NOT_FOUND", 502, "destination_unavailable", R(0x03)),
            Code::NodeUnavailable => ("NODE_UNAVAILABLE", 502, "destination_unavailable", R(0x04)),
            Code::RetriesExhausted => {
                ("RETRIES_EXHAUSTED", 502, "destination_unavailable", R(0x04))
            }
            Code::BoundNodeFailed => ("BOUND_NODE_FAILED", 503, "destination_unavailable", R(0x04)),
            Code::GatewayTimeout => ("GATEWAY_TIMEOUT", 504, "connection_timeout", R(0x06)),
            Code::TargetUnreachable => ("TARGET_UNREACHABLE", 502, "connection_refused", R(0x05)),
            Code::BadRequest => ("BAD_REQUEST", 400, "http_request_error", R(0x01)),
            Code::ClientTimeout => ("CLIENT_TIMEOUT", 408, "http_request_error", R(0x01)),
            Code::HeadersTooLarge => ("HEADERS_TOO_LARGE", 431, "http_request_error", R(0x01)),
            Code::Overloaded => ("OVERLOADED", 503, "connection_limit_reached", R(0x01)),
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejection: the code and a one-line, human-readable detail saying which
/// rule, which filter, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// What went wrong, as the catalogue names it.
    pub code: Code,
    /// One line for `X-SOAX-Detail`, the body, the access log and the admin API.
    pub detail: String,
}

impl Rejection {
    /// A rejection with a detail.
    pub fn new(code: Code, detail: impl Into<String>) -> Self {
        Rejection {
            code,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

impl std::error::Error for Rejection {}

/// Make a detail safe for one header line: printable ASCII only, bounded.
fn header_safe(detail: &str) -> String {
    let mut s: String = detail
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(400)
        .collect();
    if s.is_empty() {
        s.push('-');
    }
    s
}

/// Write the full HTTP error answer for `rej`: status line with the code as
/// reason, `X-SOAX-Error`, `X-SOAX-Detail`, `Proxy-Status`, a plain-text body,
/// `Proxy-Authenticate` on 407, and `Connection: close` unless `keep_alive`.
pub fn write_http_error(rej: &Rejection, keep_alive: bool, out: &mut Vec<u8>) {
    use std::io::Write;
    let code = rej.code;
    let detail = header_safe(&rej.detail);
    let body = format!("{} {}\n{}\n", code.status(), code.as_str(), detail);
    let _ = write!(
        out,
        "HTTP/1.1 {status} {name}\r\n\
         X-SOAX-Error: {name}\r\n\
         X-SOAX-Detail: {detail}\r\n\
         Proxy-Status: splicegate; error={ps}; details=\"{name}\"\r\n",
        status = code.status(),
        name = code.as_str(),
        ps = code.proxy_status(),
    );
    if code.status() == 407 {
        out.extend_from_slice(b"Proxy-Authenticate: Basic realm=\"splicegate\"\r\n");
    }
    if code == Code::RateLimitExceeded || code == Code::Overloaded {
        out.extend_from_slice(b"Retry-After: 1\r\n");
    }
    let _ = write!(
        out,
        "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{}\r\n\r\n{}",
        body.len(),
        if keep_alive {
            "Connection: keep-alive"
        } else {
            "Connection: close"
        },
        body
    );
}

/// Write the `200 Connection established` answer to a CONNECT, with extra
/// headers (the `Respond-With` facts).
pub fn write_http_ok(extra: &[(&str, &str)], out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 200 Connection established\r\n");
    for (k, v) in extra {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(header_safe(v).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row per code: name, status, SOCKS5 answer, exactly as the contract's tables.
    #[test]
    fn every_code_matches_the_contract() {
        use Socks5Answer::*;
        let table: [(Code, &str, u16, Socks5Answer); 26] = [
            (Code::ErrAuthRequired, "ERR_AUTH_REQUIRED", 407, AuthFailure),
            (Code::AuthFailed, "AUTH_FAILED", 407, AuthFailure),
            (Code::IpNotAllowed, "IP_NOT_ALLOWED", 407, AuthFailure),
            (
                Code::PackageSuspended,
                "PACKAGE_SUSPENDED",
                407,
                AuthFailure,
            ),
            (Code::PackagePaused, "PACKAGE_PAUSED", 407, AuthFailure),
            (
                Code::PackageNoCredits,
                "PACKAGE_NO_CREDITS",
                407,
                AuthFailure,
            ),
            (Code::ErrMissingParams, "ERR_MISSING_PARAMS", 400, Reply(2)),
            (Code::ErrUnknownParam, "ERR_UNKNOWN_PARAM", 400, Reply(2)),
            (
                Code::ErrDuplicateParam,
                "ERR_DUPLICATE_PARAM",
                400,
                Reply(2),
            ),
            (Code::ErrInvalidValue, "ERR_INVALID_VALUE", 400, Reply(2)),
            (
                Code::ErrInvalidCombination,
                "ERR_INVALID_COMBINATION",
                400,
                Reply(2),
            ),
            (
                Code::ErrParamNotAllowed,
                "ERR_PARAM_NOT_ALLOWED",
                400,
                Reply(2),
            ),
            (Code::Disallowed, "DISALLOWED", 403, Reply(2)),
            (
                Code::TrafficLimitExceeded,
                "TRAFFIC_LIMIT_EXCEEDED",
                429,
                Reply(2),
            ),
            (
                Code::RateLimitExceeded,
                "RATE_LIMIT_EXCEEDED",
                429,
                Reply(2),
            ),
            (
                Code::SessionParamsMismatch,
                "SESSION_PARAMS_MISMATCH",
                409,
                Reply(2),
            ),
            (Code::NodeNotFound, "NODE_NOT_FOUND", 502, Reply(3)),
            (Code::NodeUnavailable, "NODE_UNAVAILABLE", 502, Reply(4)),
            (Code::RetriesExhausted, "RETRIES_EXHAUSTED", 502, Reply(4)),
            (Code::BoundNodeFailed, "BOUND_NODE_FAILED", 503, Reply(4)),
            (Code::GatewayTimeout, "GATEWAY_TIMEOUT", 504, Reply(6)),
            (Code::TargetUnreachable, "TARGET_UNREACHABLE", 502, Reply(5)),
            (Code::BadRequest, "BAD_REQUEST", 400, Reply(1)),
            (Code::ClientTimeout, "CLIENT_TIMEOUT", 408, Reply(1)),
            (Code::HeadersTooLarge, "HEADERS_TOO_LARGE", 431, Reply(1)),
            (Code::Overloaded, "OVERLOADED", 503, Reply(1)),
        ];
        for (code, name, status, socks) in table {
            assert_eq!(code.as_str(), name);
            assert_eq!(code.status(), status, "{name}");
            assert_eq!(code.socks5(), socks, "{name}");
            assert_eq!(Code::from_name(name), Some(code));
        }
        for (i, c) in Code::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
        let names: std::collections::HashSet<_> = Code::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), 26);
        assert_eq!(Code::ALL.iter().filter(|c| c.is_rule_error()).count(), 6);
    }

    #[test]
    fn error_response_carries_code_detail_and_proxy_status() {
        let mut out = Vec::new();
        let rej = Rejection::new(
            Code::NodeNotFound,
            "no online node for city=paris; 12 online for country=fr",
        );
        write_http_error(&rej, false, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 502 NODE_NOT_FOUND\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nX-SOAX-Error: NODE_NOT_FOUND\r\n"));
        assert!(text.contains(
            "\r\nX-SOAX-Detail: no online node for city=paris; 12 online for country=fr\r\n"
        ));
        assert!(text.contains("\r\nProxy-Status: splicegate; error=destination_unavailable; details=\"NODE_NOT_FOUND\"\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(!text.contains("Proxy-Authenticate"));
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body.contains("NODE_NOT_FOUND"));
    }

    #[test]
    fn auth_answers_ask_for_credentials_and_details_cannot_inject_headers() {
        let mut out = Vec::new();
        write_http_error(
            &Rejection::new(Code::AuthFailed, "bad\r\nX-Evil: 1"),
            true,
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 407 AUTH_FAILED\r\n"));
        assert!(text.contains("Proxy-Authenticate: Basic realm=\"splicegate\"\r\n"));
        assert!(!text.contains("\r\nX-Evil"));
        assert!(text.contains("Connection: keep-alive"));
    }
}

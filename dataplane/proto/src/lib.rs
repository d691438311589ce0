//! Wire codecs of the splicegate data plane: HTTP/1 request and response heads,
//! HTTP body framing, `Proxy-Authorization: Basic`, the upstream HTTP `CONNECT`
//! exchange, SOCKS5 (RFC 1928 / RFC 1929) for both the server side (clients
//! of the gateway) and the client side (the gateway talking to SOCKS5 nodes),
//! and the PROXY protocol v1/v2 header a load balancer puts before a client.
//!
//! Responsibility: turn bytes into typed decisions and typed decisions into
//! bytes. Nothing else.
//!
//! Invariants:
//! - **Sans-IO.** No sockets, no clock, no globals, no environment. Every parser
//!   takes a byte slice and returns `Ok(None)` when it needs more bytes; that is
//!   a normal outcome, not an error.
//! - **Split-invariant.** A parser fed any prefix of an input returns either
//!   `Ok(None)` or exactly what it returns for the whole input, so one-byte TCP
//!   segments give the same decision as one big read. [`http::BodyTracker`]
//!   gives the same result fed byte by byte as fed a whole buffer.
//! - **Strict and bounded.** Every input that could be read two ways (request
//!   smuggling shapes, bare LF, obs-fold, duplicate framing headers, odd
//!   authorities) is rejected with a fixed human-readable reason; every length
//!   is bounded before anything is allocated for it.
//! - **Never panics** on any input (property-tested), and contains no `unsafe`.
//!
//! The mapping from these errors to product error codes, HTTP statuses and
//! SOCKS5 replies lives in the control plane's catalogue, not here.
#![forbid(unsafe_code)]

pub mod agent;
pub mod http;
pub mod node;
pub mod pool;
pub mod proxy_protocol;
pub mod socks5;

pub use splicegate_addr::{Host, InvalidHost, Target, parse_host};

#[cfg(test)]
mod test_support {
    /// Feeding growing prefixes: each gives `Ok(None)` or exactly the result
    /// for the whole input (one-byte segments decide the same).
    pub(crate) fn assert_split_invariant<T, E>(
        input: &[u8],
        parse: impl Fn(&[u8]) -> Result<Option<T>, E>,
    ) where
        T: PartialEq + std::fmt::Debug,
        E: PartialEq + std::fmt::Debug,
    {
        let full = parse(input);
        for k in 0..input.len() {
            let part = parse(&input[..k]);
            if !matches!(part, Ok(None)) {
                assert_eq!(
                    part,
                    full,
                    "prefix {k} of {:?}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }
}

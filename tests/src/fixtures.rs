//! Short forms the tests share: the package key, usernames, and one request
//! through the gateway.

use std::net::{Ipv4Addr, SocketAddr};

use crate::client::{Conn, Resp};
use crate::gateway::Gateway;

/// The key of package 7 in most tests: distinctive, so a log line that leaks
/// it is found.
pub const KEY: &str = "pk_E2E_s3cret_Q7f9";

/// `package-7-<rules>` (or `package-7` for empty rules).
pub fn user(rules: &str) -> String {
    if rules.is_empty() {
        "package-7".into()
    } else {
        format!("package-7-{rules}")
    }
}

impl Gateway {
    /// A gateway with package 7 (`KEY`) and one direct node `d1` exiting
    /// from `bind`.
    pub fn with_direct(bind: Ipv4Addr) -> Gateway {
        Gateway::start_conf(
            &crate::Conf::with_package(KEY).node(crate::NodeDecl::direct("d1", bind)),
        )
    }

    /// A raw connection to the proxy port from `src`.
    pub fn conn_from(&self, src: Ipv4Addr) -> Conn {
        Conn::open(src, self.proxy)
            .unwrap_or_else(|e| panic!("connect to the gateway {} from {src}: {e}", self.proxy))
    }

    /// A SOCKS5 CONNECT (with username/password `user`:`key`) to `target`
    /// from `src`: the connection and how the handshake ended.
    pub fn socks_as(
        &self,
        src: Ipv4Addr,
        user: &str,
        key: &str,
        target: impl Into<crate::SocksAddr>,
    ) -> (Conn, crate::SocksOutcome) {
        let target = target.into();
        let mut c = self.conn_from(src);
        let s = crate::socks5(&mut c, Some((user, key)), 1, &target)
            .unwrap_or_else(|e| panic!("SOCKS5 to {target:?} as {user}: {e}"));
        (c, s)
    }

    /// A raw connection to the proxy port from a fresh source address.
    pub fn conn(&self) -> Conn {
        self.conn_from(crate::addr::client_ip())
    }

    /// curl from a fresh source address through the proxy port as an HTTP
    /// proxy.
    pub fn curl(&self) -> crate::Curl {
        crate::Curl::new(crate::addr::client_ip()).proxy(self.proxy)
    }

    /// `CONNECT target` as package 7 with `rules`, from a fresh address;
    /// the connection and the answer's head.
    pub fn connect_rules(&self, target: std::net::SocketAddr, rules: &str) -> (Conn, Resp) {
        let user = user(rules);
        self.connect_as(
            crate::addr::client_ip(),
            &target.to_string(),
            &user,
            KEY,
            &[],
        )
    }

    /// `CONNECT target` with `user`:`key` from `src`; the connection and the
    /// answer's head.
    pub fn connect_as(
        &self,
        src: Ipv4Addr,
        target: &str,
        user: &str,
        key: &str,
        extra: &[&str],
    ) -> (Conn, Resp) {
        let mut c = self.conn_from(src);
        let r = c
            .connect(target, Some((user, key)), extra)
            .unwrap_or_else(|e| panic!("CONNECT {target} as {user}: {e}"));
        (c, r)
    }

    /// `CONNECT target` as package 7 with [`KEY`], asserting `200`.
    #[track_caller]
    pub fn tunnel(&self, src: Ipv4Addr, target: SocketAddr, rules: &str) -> Conn {
        let (c, r) = self.connect_as(src, &target.to_string(), &user(rules), KEY, &[]);
        assert_eq!(
            r.status,
            200,
            "CONNECT {target} as {}: {}{}",
            user(rules),
            r.raw_head,
            r.text()
        );
        c
    }

    /// A forwarded `GET url` as `user`:`key` on a new connection from `src`.
    pub fn forward(&self, src: Ipv4Addr, url: &str, user: &str, key: &str) -> Resp {
        let mut c = self.conn_from(src);
        c.get(url, Some((user, key)), &["Connection: close"])
            .unwrap_or_else(|e| panic!("GET {url} as {user}: {e}"))
    }

    /// The exit address an [`crate::HttpTarget`] `url` (path `/ip`) reports
    /// for one forwarded request as package 7 with `rules`; the error answer
    /// otherwise.
    pub fn exit_ip(&self, src: Ipv4Addr, url: &str, rules: &str) -> Result<String, Resp> {
        let r = self.forward(src, url, &user(rules), KEY);
        if r.status == 200 {
            Ok(r.text().trim().to_string())
        } else {
            Err(r)
        }
    }

    /// [`Gateway::exit_ip`], asserting success.
    #[track_caller]
    pub fn exit_ok(&self, src: Ipv4Addr, url: &str, rules: &str) -> String {
        match self.exit_ip(src, url, rules) {
            Ok(ip) => ip,
            Err(r) => panic!(
                "GET {url} as {} failed: {}{}",
                user(rules),
                r.raw_head,
                r.text()
            ),
        }
    }
}

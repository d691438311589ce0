//! The gateway's TOML configuration, built by tests.
//!
//! [`Conf::toml`] writes placeholders that [`crate::Gateway`] fills in:
//! `@PROXY@` and `@ADMIN@` (`127.0.0.1:0`), `@DIR@` (the test's temporary
//! directory) and `@PORT_<NAME>@` (0). The gateway binds port 0 and names
//! the ports it got in its ready file; the harness keeps them for every
//! reload and restart of one gateway (`Gateway::addr("NAME")`).

use std::fmt::Write as _;
use std::net::SocketAddr;

/// A `[[package]]` declaration: id, org, key, plus any other fields as raw
/// TOML values.
#[derive(Debug, Clone)]
pub struct PkgDecl {
    /// Package id.
    pub id: u32,
    /// Organisation id.
    pub org: String,
    /// Package key (the password).
    pub key: String,
    /// Other fields, `name = <TOML value>`.
    pub fields: Vec<(String, String)>,
}

impl PkgDecl {
    /// A package with only the required fields (the rest default per SPEC 3).
    pub fn new(id: u32, org: &str, key: &str) -> PkgDecl {
        PkgDecl {
            id,
            org: org.into(),
            key: key.into(),
            fields: Vec::new(),
        }
    }

    /// Set a field to a raw TOML value (`"paused"`, `["res"]`, `5`).
    pub fn set(mut self, name: &str, toml_value: &str) -> PkgDecl {
        self.fields.retain(|(k, _)| k != name);
        self.fields.push((name.into(), toml_value.into()));
        self
    }
}

/// A `[[node]]` declaration.
#[derive(Debug, Clone)]
pub struct NodeDecl {
    /// Node id.
    pub id: String,
    /// Fields in order, `name = <TOML value>`.
    pub fields: Vec<(String, String)>,
}

impl NodeDecl {
    fn base(id: &str, kind: &str) -> NodeDecl {
        NodeDecl {
            id: id.into(),
            fields: vec![
                ("kind".into(), q(kind)),
                ("country".into(), q("us")),
                ("city".into(), q("new_york")),
                ("isp".into(), q("verizon_wireless")),
                ("asn".into(), "701".into()),
                ("network".into(), q("res")),
            ],
        }
    }

    /// A `direct` node exiting from `bind`; us/new_york/verizon_wireless/701/res.
    pub fn direct(id: &str, bind: impl std::fmt::Display) -> NodeDecl {
        NodeDecl::base(id, "direct").set("bind", &q(&bind.to_string()))
    }

    /// An `http` node (an upstream proxy at `addr`).
    pub fn http(id: &str, addr: SocketAddr) -> NodeDecl {
        NodeDecl::base(id, "http").set("addr", &q(&addr.to_string()))
    }

    /// A `socks5` node (an upstream proxy at `addr`).
    pub fn socks5(id: &str, addr: SocketAddr) -> NodeDecl {
        NodeDecl::base(id, "socks5").set("addr", &q(&addr.to_string()))
    }

    /// An `agent` node (a device that dials in with `key`).
    pub fn agent(id: &str, key: &str) -> NodeDecl {
        NodeDecl::base(id, "agent").set("key", &q(key))
    }

    /// Set a field to a raw TOML value.
    pub fn set(mut self, name: &str, toml_value: &str) -> NodeDecl {
        if let Some(f) = self.fields.iter_mut().find(|(k, _)| k == name) {
            f.1 = toml_value.into();
        } else {
            self.fields.push((name.into(), toml_value.into()));
        }
        self
    }

    /// Set a string field.
    pub fn s(self, name: &str, value: &str) -> NodeDecl {
        self.set(name, &q(value))
    }

    /// Upstream credentials of an `http`/`socks5` node.
    pub fn creds(self, user: &str, pass: &str) -> NodeDecl {
        self.s("username", user).s("password", pass)
    }
}

/// TOML string literal.
pub fn q(s: &str) -> String {
    format!("{s:?}")
}

/// A whole configuration. Defaults are small timeouts so that the suite is
/// fast, loopback and `::1` targets allowed, port 25 blocked.
#[derive(Debug, Clone)]
pub struct Conf {
    /// `[proxy] workers`.
    pub workers: String,
    /// `[timeouts]`.
    pub node_connect_ms: u64,
    /// `[timeouts]`.
    pub target_ms: u64,
    /// `[timeouts]`.
    pub idle_s: u64,
    /// `[timeouts]`.
    pub handshake_ms: u64,
    /// `[timeouts]`.
    pub resolve_ms: u64,
    /// `[timeouts]`.
    pub drain_grace_s: u64,
    /// `[timeouts] udp_idle_s`.
    pub udp_idle_s: u64,
    /// `[limits]`.
    pub max_head_bytes: u64,
    /// `[limits]`.
    pub max_headers: u64,
    /// `[limits]`.
    pub session_capacity: u64,
    /// `[safety] allow_targets`.
    pub allow_targets: Vec<String>,
    /// `[geo]` lines (`cities = { us = [...] }`).
    pub geo: Vec<String>,
    /// `[demo] echo_listen` on `@PORT_ECHO@`.
    pub demo_echo: bool,
    /// `[[org]]` (id, credits).
    pub orgs: Vec<(String, f64)>,
    /// `[[package]]`.
    pub packages: Vec<PkgDecl>,
    /// `[[node]]`.
    pub nodes: Vec<NodeDecl>,
    /// Raw TOML appended at the end (`[[listener]]` tables, …).
    pub extra: String,
    /// `[tls]` cert and key.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// `[proxy] tls_only`.
    pub tls_only: bool,
    /// `[proxy] udp_gather_us` (unset: the gateway's default).
    pub udp_gather_us: Option<u64>,
}

impl Default for Conf {
    fn default() -> Self {
        Conf::new()
    }
}

impl Conf {
    /// The defaults, no org, package or node.
    pub fn new() -> Conf {
        Conf {
            workers: "2".into(),
            node_connect_ms: 1000,
            target_ms: 2000,
            idle_s: 30,
            handshake_ms: 3000,
            resolve_ms: 1000,
            drain_grace_s: 2,
            udp_idle_s: 300,
            max_head_bytes: 16384,
            max_headers: 100,
            session_capacity: 100_000,
            allow_targets: vec!["127.0.0.0/8".into(), "::1/128".into()],
            geo: vec![r#"cities = { us = ["new_york", "chicago"] }"#.into()],
            demo_echo: false,
            orgs: Vec::new(),
            packages: Vec::new(),
            nodes: Vec::new(),
            extra: String::new(),
            tls: None,
            tls_only: false,
            udp_gather_us: None,
        }
    }

    /// The usual start: org `acme` with 100 credits and package 7 with `key`.
    pub fn with_package(key: &str) -> Conf {
        Conf::new()
            .org("acme", 100.0)
            .package(PkgDecl::new(7, "acme", key))
    }

    /// Add an organisation.
    pub fn org(mut self, id: &str, credits: f64) -> Conf {
        self.orgs.push((id.into(), credits));
        self
    }

    /// Add a package.
    pub fn package(mut self, p: PkgDecl) -> Conf {
        self.packages.push(p);
        self
    }

    /// Replace package `id` (for reload tests).
    pub fn map_package(mut self, id: u32, f: impl FnOnce(PkgDecl) -> PkgDecl) -> Conf {
        if let Some(pos) = self.packages.iter().position(|p| p.id == id) {
            let p = self.packages.remove(pos);
            self.packages.insert(pos, f(p));
        }
        self
    }

    /// Add a node.
    pub fn node(mut self, n: NodeDecl) -> Conf {
        self.nodes.push(n);
        self
    }

    /// Append raw TOML.
    pub fn raw(mut self, s: &str) -> Conf {
        self.extra.push_str(s);
        self.extra.push('\n');
        self
    }

    /// The TOML text, with placeholders.
    pub fn toml(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "[proxy]\nlisten = \"@PROXY@\"\nworkers = {}\n",
            if self.workers == "auto" {
                q("auto")
            } else {
                self.workers.clone()
            }
        );
        if self.tls_only {
            t.insert_str(t.len() - 1, "tls_only = true\n");
        }
        if let Some(us) = self.udp_gather_us {
            t.insert_str(t.len() - 1, &format!("udp_gather_us = {us}\n"));
        }
        if let Some((cert, key)) = &self.tls {
            let _ = writeln!(
                t,
                "[tls]\ncert = {}\nkey = {}\n",
                q(&cert.display().to_string()),
                q(&key.display().to_string())
            );
        }
        let _ = writeln!(
            t,
            "[admin]\nlisten = \"@ADMIN@\"\ntoken = \"test-admin-token\"\n"
        );
        let _ = writeln!(t, "[store]\npath = \"@DIR@/splicegate.db\"\n");
        let allow: Vec<String> = self.allow_targets.iter().map(|a| q(a)).collect();
        let _ = writeln!(
            t,
            "[safety]\nallow_targets = [{}]\nblocked_ports = [25]\n",
            allow.join(", ")
        );
        let _ = writeln!(
            t,
            "[timeouts]\nnode_connect_ms = {}\ntarget_ms = {}\nidle_s = {}\nhandshake_ms = {}\nresolve_ms = {}\ndrain_grace_s = {}\nudp_idle_s = {}\n",
            self.node_connect_ms,
            self.target_ms,
            self.idle_s,
            self.handshake_ms,
            self.resolve_ms,
            self.drain_grace_s,
            self.udp_idle_s
        );
        let _ = writeln!(
            t,
            "[limits]\nmax_head_bytes = {}\nmax_headers = {}\nsession_capacity = {}\n",
            self.max_head_bytes, self.max_headers, self.session_capacity
        );
        if !self.geo.is_empty() {
            let _ = writeln!(t, "[geo]\n{}\n", self.geo.join("\n"));
        }
        if self.demo_echo {
            let _ = writeln!(t, "[demo]\necho_listen = \"127.0.0.1:@PORT_ECHO@\"\n");
        }
        for (id, credits) in &self.orgs {
            let _ = writeln!(t, "[[org]]\nid = {}\ncredits = {credits:?}\n", q(id));
        }
        for p in &self.packages {
            let _ = writeln!(
                t,
                "[[package]]\nid = {}\norg = {}\nkey = {}",
                p.id,
                q(&p.org),
                q(&p.key)
            );
            for (k, v) in &p.fields {
                let _ = writeln!(t, "{k} = {v}");
            }
            t.push('\n');
        }
        for n in &self.nodes {
            let _ = writeln!(t, "[[node]]\nid = {}", q(&n.id));
            for (k, v) in &n.fields {
                let _ = writeln!(t, "{k} = {v}");
            }
            t.push('\n');
        }
        t.push_str(&self.extra);
        t
    }
}

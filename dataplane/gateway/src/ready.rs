//! `serve --ready-file PATH`: once the gateway serves, every address it
//! bound, as one JSON object written atomically (a temporary file renamed
//! over PATH), so that a supervisor or a test can configure port 0 and read
//! the ports the kernel gave instead of guessing free ones.
//!
//! ```json
//! {"pid": 123,
//!  "proxy": ["127.0.0.1:40123"],
//!  "listeners": [{"addr": "127.0.0.1:40125", "package": 15, "ip_only": true, "tls_only": false, "proxy_protocol": false}],
//!  "admin": "127.0.0.1:40124",
//!  "demo_echo": null}
//! ```
//!
//! Each kind of listening socket has its own top-level key, so a new kind
//! (an agents listener, UDP) is a new key and no reader breaks. `proxy` is a
//! list although there is one `[proxy] listen` today. Absent services are
//! `null` (`admin`, `demo_echo`) or `[]` (`listeners`).

use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// Every address the gateway serves on, as bound (real ports, never 0).
#[derive(Debug, Default)]
pub(crate) struct Bound {
    /// `[proxy] listen`.
    pub proxy: Vec<SocketAddr>,
    /// `[[listener]]` tables in file order, with what each admits.
    pub listeners: Vec<(SocketAddr, splicegate_worker::Binding)>,
    /// `[admin] listen`, when the admin API runs.
    pub admin: Option<SocketAddr>,
    /// `[demo] echo_listen`, when the built-in target runs.
    pub demo_echo: Option<SocketAddr>,
    pub agents: Option<SocketAddr>,
}

impl Bound {
    /// The JSON object of the ready file.
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "pid": std::process::id(),
            "proxy": self.proxy.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "listeners": self
                .listeners
                .iter()
                .map(|(addr, b)| json!({
                    "addr": addr.to_string(),
                    "package": b.package,
                    "ip_only": b.ip_only,
                    "tls_only": b.tls_only,
                    "proxy_protocol": b.proxy_protocol,
                }))
                .collect::<Vec<_>>(),
            "admin": self.admin.map(|a| a.to_string()),
            "demo_echo": self.demo_echo.map(|a| a.to_string()),
            "agents": self.agents.map(|a| a.to_string()),
        })
    }
}

/// Write `bound` to `path` atomically: `path.tmp-PID`, fsync, rename.
pub(crate) fn write(path: &Path, bound: &Bound) -> Result<()> {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = std::path::PathBuf::from(name);
    let text = format!("{}\n", bound.to_json());
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing the ready file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_file_names_every_address() {
        let b = Bound {
            proxy: vec!["127.0.0.1:40123".parse().unwrap()],
            listeners: vec![(
                "[::1]:40125".parse().unwrap(),
                splicegate_worker::Binding {
                    package: Some(15),
                    ip_only: true,
                    tls_only: false,
                    proxy_protocol: true,
                },
            )],
            admin: Some("127.0.0.1:40124".parse().unwrap()),
            demo_echo: None,
            agents: None,
        };
        let dir = std::env::temp_dir().join(format!("sg-ready-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ready.json");
        write(&path, &b).unwrap();
        let v: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["proxy"], json!(["127.0.0.1:40123"]));
        assert_eq!(v["listeners"][0]["addr"], "[::1]:40125");
        assert_eq!(v["listeners"][0]["package"], 15);
        assert_eq!(v["listeners"][0]["ip_only"], true);
        assert_eq!(v["listeners"][0]["tls_only"], false);
        assert_eq!(v["listeners"][0]["proxy_protocol"], true);
        assert_eq!(v["admin"], "127.0.0.1:40124");
        assert!(v["demo_echo"].is_null());
        assert_eq!(v["pid"], std::process::id());
        // Nothing but the file itself is left in the directory.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}

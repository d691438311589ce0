//! `curl` as the client: the tool users actually point at a proxy.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::client::Resp;
use crate::gateway::wait_child;
use crate::tools::require_tool;

/// A curl command line being built.
#[derive(Debug, Clone)]
pub struct Curl {
    args: Vec<String>,
}

/// What curl printed: every head (`-D -`: the proxy's CONNECT answer first,
/// then the target's), the body, its exit code and stderr.
#[derive(Debug, Clone)]
pub struct CurlOut {
    /// curl's exit code (0 = success; 56 = proxy CONNECT refused, 97 = SOCKS).
    pub code: i32,
    /// Response heads in order.
    pub heads: Vec<Resp>,
    /// The body bytes after the last head.
    pub body: Vec<u8>,
    /// curl's stderr.
    pub stderr: String,
}

impl CurlOut {
    /// The last head (the target's answer, or the proxy's error).
    pub fn last(&self) -> &Resp {
        self.heads
            .last()
            .unwrap_or_else(|| panic!("curl printed no response head; {self:?}"))
    }

    /// The first head (the proxy's CONNECT answer in tunnel mode).
    pub fn first(&self) -> &Resp {
        self.heads
            .first()
            .unwrap_or_else(|| panic!("curl printed no response head; {self:?}"))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    /// Assert curl succeeded with 200 and return the body text.
    #[track_caller]
    pub fn ok_body(&self) -> String {
        assert_eq!(self.code, 0, "curl failed: {self:#?}");
        assert_eq!(self.last().status, 200, "{self:#?}");
        self.text()
    }
}

impl Curl {
    /// `curl -s -S -D - --max-time 15` from source address `src`.
    pub fn new(src: Ipv4Addr) -> Curl {
        Curl {
            args: vec![
                "-s".into(),
                "-S".into(),
                "-D".into(),
                "-".into(),
                "--max-time".into(),
                "15".into(),
                "--interface".into(),
                src.to_string(),
            ],
        }
    }

    /// Any argument.
    pub fn arg(mut self, a: &str) -> Curl {
        self.args.push(a.into());
        self
    }

    /// `-x http://proxy`.
    pub fn proxy(self, proxy: SocketAddr) -> Curl {
        self.arg("-x").arg(&format!("http://{proxy}"))
    }

    /// `--socks5-hostname proxy` (the gateway resolves names).
    pub fn socks5h(self, proxy: SocketAddr) -> Curl {
        self.arg("--socks5-hostname").arg(&proxy.to_string())
    }

    /// `--socks5 proxy` (curl resolves names).
    pub fn socks5(self, proxy: SocketAddr) -> Curl {
        self.arg("--socks5").arg(&proxy.to_string())
    }

    /// `--proxy-user user:pass`.
    pub fn user(self, user: &str, pass: &str) -> Curl {
        self.arg("--proxy-user").arg(&format!("{user}:{pass}"))
    }

    /// `-p`: CONNECT even for `http://` URLs.
    pub fn tunnel(self) -> Curl {
        self.arg("-p")
    }

    /// `--proxy-header h` (sent to the proxy only: the CONNECT).
    pub fn proxy_header(self, h: &str) -> Curl {
        self.arg("--proxy-header").arg(h)
    }

    /// `-H h`.
    pub fn header(self, h: &str) -> Curl {
        self.arg("-H").arg(h)
    }

    /// Start it against `url` in the background, its output discarded (to
    /// hold a connection open); the caller stops the child.
    pub fn spawn(self, url: &str) -> std::process::Child {
        Command::new(require_tool("curl", "curl"))
            .args(&self.args)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn curl")
    }

    /// Run against `url`.
    pub fn get(self, url: &str) -> CurlOut {
        let bin = require_tool("curl", "curl");
        let out_path = crate::gateway::temp_dir("curl").join("out");
        let err_path = out_path.with_file_name("err");
        let mut child = Command::new(bin)
            .args(&self.args)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&out_path).expect("out")))
            .stderr(Stdio::from(std::fs::File::create(&err_path).expect("err")))
            .spawn()
            .expect("spawn curl");
        let status = match wait_child(&mut child, Duration::from_secs(20)) {
            Some(s) => s,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("curl {:?} {url} did not finish in 20 s", self.args);
            }
        };
        let stdout = std::fs::read(&out_path).unwrap_or_default();
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        if let Some(d) = out_path.parent() {
            let _ = std::fs::remove_dir_all(d);
        }
        let (heads, body) = split_heads(&stdout);
        CurlOut {
            code: status.code().unwrap_or(-1),
            heads,
            body,
            stderr,
        }
    }
}

/// Split `-D -` output: heads (each starting `HTTP/`) then the body.
fn split_heads(out: &[u8]) -> (Vec<Resp>, Vec<u8>) {
    let mut heads = Vec::new();
    let mut rest = out;
    for _ in 0..10 {
        if !rest.starts_with(b"HTTP/") {
            break;
        }
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            break;
        };
        match Resp::parse_head(&rest[..end + 4]) {
            Ok(r) => heads.push(r),
            Err(_) => break,
        }
        rest = &rest[end + 4..];
    }
    (heads, rest.to_vec())
}

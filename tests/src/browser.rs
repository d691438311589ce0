//! Headless Chromium for the tests that look at the dashboard: Debian's
//! `chromium` (`scripts/install-test-deps` installs it), or `$CHROMIUM`.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::gateway::temp_dir;

/// Headless Chromium, or a failed test that says how to install it.
pub fn chromium() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("CHROMIUM") {
        candidates.push(PathBuf::from(p));
    } else {
        candidates.push(PathBuf::from("/usr/bin/chromium"));
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("chromium")));
        }
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "headless Chromium is missing: apt-get install -y chromium \
                 (scripts/install-test-deps does it; $CHROMIUM names another binary)"
            )
        })
}

pub const CHROMIUM_FLAGS: [&str; 10] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1400,1000",
];

/// End a Chromium started in a process group of its own (its helpers share
/// the group), by that group's id.
pub fn kill_group(pid: u32) {
    let _ = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
}

/// Run Chromium once on `url` with `mode` (`--dump-dom`, `--screenshot=…`),
/// in a fresh profile, at most 90 s; its standard output.
pub fn browse(mode: &str, url: &str) -> String {
    let dir = temp_dir("chromium");
    let out_path = dir.join("stdout");
    let err_path = dir.join("stderr");
    let mut child = Command::new(chromium())
        .args(CHROMIUM_FLAGS)
        .arg("--virtual-time-budget=8000")
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg(mode)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("create stdout"))
        .stderr(fs::File::create(&err_path).expect("create stderr"))
        .process_group(0)
        .spawn()
        .expect("start chromium");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for chromium") {
            break Some(st);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    kill_group(pid);
    let _ = child.wait();
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    let _ = fs::remove_dir_all(&dir);
    match status {
        None => panic!("chromium did not finish within 90 s on {url}:\n{stderr}"),
        Some(st) if !st.success() => panic!("chromium failed ({st}) on {url}:\n{stderr}"),
        Some(_) => stdout,
    }
}

/// The page without the inlined chart library, for failure messages.
pub fn excerpt(dom: &str) -> String {
    let body = dom.find("<main").map_or(dom, |i| &dom[i..]);
    let end = body.find("<script").unwrap_or(body.len());
    body[..end.min(12_000)].to_string()
}

//! The proxy's cost, read from outside through /proc: CPU seconds, resident
//! memory and threads of a process and all its descendants (nginx's workers,
//! Squid's auth helpers and Dante's children count as the proxy too).

use std::collections::HashMap;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use serde::Serialize;

/// One reading of a process tree.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Sample {
    /// User + system CPU seconds of the live processes, plus what they have
    /// reaped from children that already exited.
    pub cpu_s: f64,
    /// Sum of VmRSS, KiB.
    pub rss_kib: u64,
    /// Sum of VmHWM (each process's peak RSS), KiB.
    pub hwm_kib: u64,
    /// Sum of threads.
    pub threads: u64,
    /// Processes in the tree.
    pub procs: u64,
}

/// A process and its descendants.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcTree {
    pub root: u32,
}

struct Stat {
    ppid: u32,
    /// Own and reaped children's CPU.
    ticks: u64,
    /// Own CPU only.
    own: u64,
    threads: u64,
}

fn clock_ticks() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'.
    let rest = text.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        ppid: n(1)? as u32,
        // utime, stime, cutime, cstime
        ticks: n(11)? + n(12)? + n(13)? + n(14)?,
        own: n(11)? + n(12)?,
        threads: n(17)?,
    })
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The command name of a process (to make sure a PID still names the
/// process we started before signalling it).
pub(crate) fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

impl ProcTree {
    /// The root and every live descendant.
    pub(crate) fn pids(&self) -> Vec<u32> {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some(s) = stat(pid) {
                    children.entry(s.ppid).or_default().push(pid);
                }
            }
        }
        let mut out = vec![self.root];
        let mut i = 0;
        while i < out.len() {
            if let Some(c) = children.get(&out[i]) {
                out.extend_from_slice(c);
            }
            i += 1;
        }
        out
    }

    /// Read the whole tree now.
    pub(crate) fn sample(&self) -> Result<Sample> {
        let mut root =
            Some(stat(self.root).with_context(|| format!("process {} is gone", self.root))?);
        let mut s = Sample::default();
        let mut ticks = 0u64;
        for pid in self.pids() {
            let Some(st) = (if pid == self.root {
                root.take()
            } else {
                stat(pid)
            }) else {
                continue;
            };
            ticks += st.ticks;
            s.threads += st.threads;
            s.procs += 1;
            s.rss_kib += status_kib(pid, "VmRSS:");
            s.hwm_kib += status_kib(pid, "VmHWM:");
        }
        s.cpu_s = ticks as f64 / clock_ticks();
        Ok(s)
    }
}

/// CPU ticks of every program outside this process's tree (the load
/// generator, its targets and the proxy under test), by PID: two of these
/// around a window tell whether something else ran on the machine
/// meanwhile (a build, another benchmark). Kernel threads are left out
/// (ksoftirqd carries this run's own loopback traffic), and so are reaped
/// children's times (a build's parent reaps compilers that ran mostly
/// before the window): a program that ended within the window is missed,
/// so this is a lower bound.
#[derive(Debug, Clone, Default)]
pub(crate) struct Others(HashMap<u32, u64>);

impl Others {
    pub(crate) fn now() -> Others {
        let mine: std::collections::HashSet<u32> = ProcTree {
            root: std::process::id(),
        }
        .pids()
        .into_iter()
        .collect();
        let mut out = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if mine.contains(&pid) || pid == 2 {
                    continue;
                }
                if let Some(st) = stat(pid)
                    && st.ppid != 2
                {
                    out.insert(pid, st.own);
                }
            }
        }
        Others(out)
    }

    /// CPU seconds the others used since `before` (a process that started
    /// meanwhile counts from zero).
    pub(crate) fn since(&self, before: &Others) -> f64 {
        let ticks: u64 = self
            .0
            .iter()
            .map(|(pid, &t)| t.saturating_sub(before.0.get(pid).copied().unwrap_or(0)))
            .sum();
        ticks as f64 / clock_ticks()
    }
}

/// Ticks the hypervisor stole from this machine's CPUs so far, all CPUs
/// summed (the `steal` column of the `cpu` line of `/proc/stat`); `None`
/// where the kernel does not say.
pub(crate) fn steal_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    line.split_whitespace().nth(8)?.parse().ok()
}

/// CPU seconds stolen between two [`steal_ticks`] readings.
pub(crate) fn steal_s(before: Option<u64>, after: Option<u64>) -> Option<f64> {
    Some(after?.saturating_sub(before?) as f64 / clock_ticks())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_reads() {
        let t = ProcTree {
            root: std::process::id(),
        };
        let s = t.sample().unwrap();
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib && s.threads >= 1 && s.procs >= 1);
    }

    #[test]
    fn others_leave_this_tree_and_kernel_threads_out() {
        let o = Others::now();
        assert!(!o.0.contains_key(&std::process::id()));
        assert!(!o.0.contains_key(&2));
        assert!(o.since(&o) == 0.0);
    }
}

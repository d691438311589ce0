//! `splicegate doctor` against machines that lack something: a copy of
//! `/proc` and `/sys` written by the test (`--proc-root`, `--sys-root`),
//! so that each problem is shown without changing this machine. Each
//! problem is named with its fix, and the exit status says ready or not.

use std::fs;
use std::path::Path;
use std::process::Command;

use splicegate_tests::gateway::{binary, temp_dir};

/// A machine as files: every value doctor reads, healthy unless changed.
struct Fixture {
    root: std::path::PathBuf,
}

impl Fixture {
    fn healthy() -> Fixture {
        let root = temp_dir("doctor");
        let f = Fixture { root };
        f.set("proc/sys/kernel/osrelease", "6.12.9-amd64");
        f.set("proc/sys/kernel/io_uring_disabled", "0");
        f.set(
            "proc/self/limits",
            "Limit                     Soft Limit           Hard Limit           Units     \n\
             Max locked memory         8388608              8388608              bytes     \n\
             Max open files            1048576              1048576              files     \n",
        );
        // CapEff: CAP_NET_ADMIN, CAP_SYS_RESOURCE, CAP_PERFMON, CAP_BPF.
        let caps: u64 = (1 << 12) | (1 << 24) | (1 << 38) | (1 << 39);
        f.set(
            "proc/self/status",
            &format!("Name:\tsplicegate\nCapEff:\t{caps:016x}\nCpus_allowed_list:\t0-3\n"),
        );
        f.set("proc/sys/net/core/somaxconn", "4096");
        f.set("proc/sys/net/ipv4/ip_local_port_range", "1024\t65535");
        f.set("proc/sys/net/ipv4/tcp_tw_reuse", "1");
        f.set("proc/sys/fs/pipe-user-pages-soft", "16384");
        f.set("proc/sys/fs/nr_open", "1048576");
        f.set("sys/kernel/btf/vmlinux", "BTF");
        f.set("sys/devices/system/node/node0/cpulist", "0-3");
        f
    }

    fn set(&self, rel: &str, text: &str) {
        let p = self.root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    fn remove(&self, rel: &str) {
        fs::remove_file(self.root.join(rel)).unwrap();
    }

    /// Runs doctor on the fixture: (exit code, output).
    fn doctor(&self, extra: &[&str]) -> (i32, String) {
        let out = Command::new(binary())
            .arg("doctor")
            .arg("--proc-root")
            .arg(self.root.join("proc"))
            .arg("--sys-root")
            .arg(self.root.join("sys"))
            .args(extra)
            .output()
            .expect("run splicegate doctor");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

/// The FAIL or WARN line that contains `needle`, and the fix after it.
fn finding<'a>(out: &'a str, level: &str, needle: &str) -> (&'a str, &'a str) {
    let lines: Vec<&str> = out.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.trim_start().starts_with(level) && l.contains(needle))
        .unwrap_or_else(|| panic!("no {level} line about {needle:?} in:\n{out}"));
    let fix = lines
        .get(i + 1)
        .and_then(|l| l.trim_start().strip_prefix("fix: "))
        .unwrap_or_else(|| panic!("no fix after {:?} in:\n{out}", lines[i]));
    (lines[i], fix)
}

#[test]
fn a_ready_machine_exits_0() {
    let f = Fixture::healthy();
    let (code, out) = f.doctor(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ready: 0 problem(s)"), "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    // The workers' placement is named.
    assert!(out.contains("4 workers pinned to CPUs 0,1,2,3"), "{out}");
}

/// (what, the change to a healthy machine, FAIL or WARN, the finding, its fix)
type Case<'a> = (&'a str, &'a dyn Fn(&Fixture), &'a str, &'a str, &'a str);

#[test]
fn each_missing_piece_is_named_with_its_fix() {
    let cases: [Case<'_>; 8] = [
        (
            "a low ulimit -n",
            &|f| {
                f.set(
                    "proc/self/limits",
                    "Max locked memory         8388608              8388608              bytes\n\
                     Max open files            1024                 4096                 files\n",
                )
            },
            "FAIL",
            "open files: soft limit 1024",
            "LimitNOFILE=",
        ),
        (
            "io_uring disabled",
            &|f| f.set("proc/sys/kernel/io_uring_disabled", "2"),
            "FAIL",
            "kernel.io_uring_disabled = 2",
            "sysctl -w kernel.io_uring_disabled=0",
        ),
        (
            "io_uring for a group only",
            &|f| f.set("proc/sys/kernel/io_uring_disabled", "1"),
            "FAIL",
            "kernel.io_uring_disabled = 1",
            "kernel.io_uring_group",
        ),
        (
            "an old kernel",
            &|f| f.set("proc/sys/kernel/osrelease", "5.10.0-30-amd64"),
            "FAIL",
            "older than 5.19",
            "5.19 or later",
        ),
        (
            "a kernel whose waits cannot gather",
            &|f| f.set("proc/sys/kernel/osrelease", "6.1.0-28-amd64"),
            "WARN",
            "ring waits cannot gather completions",
            "Linux 6.12 or later",
        ),
        (
            "no BTF",
            &|f| f.remove("sys/kernel/btf/vmlinux"),
            "WARN",
            "BTF: /sys/kernel/btf/vmlinux is missing",
            "CONFIG_DEBUG_INFO_BTF",
        ),
        (
            "no privileges for BPF",
            &|f| {
                f.set(
                    "proc/self/status",
                    "Name:\tsplicegate\nCapEff:\t0000000000000000\nCpus_allowed_list:\t0-3\n",
                )
            },
            "WARN",
            "BPF privileges: missing CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON",
            "AmbientCapabilities=",
        ),
        (
            "few local ports without TIME_WAIT reuse",
            &|f| {
                f.set("proc/sys/net/ipv4/ip_local_port_range", "32768\t60999");
                f.set("proc/sys/net/ipv4/tcp_tw_reuse", "2");
            },
            "FAIL",
            "ip_local_port_range 32768–60999",
            "ip_local_port_range",
        ),
    ];
    for (what, change, level, needle, fix) in cases {
        let f = Fixture::healthy();
        change(&f);
        let (code, out) = f.doctor(&[]);
        let (line, got_fix) = finding(&out, level, needle);
        assert!(got_fix.contains(fix), "{what}: {line}\n  fix: {got_fix}");
        let want_code = if level == "FAIL" { 1 } else { 0 };
        assert_eq!(code, want_code, "{what}:\n{out}");
    }
}

/// With `[ebpf] enabled = true` in the configuration, missing BPF pieces
/// are failures, not warnings; a mask across NUMA nodes and a low
/// pipe-page limit without CAP_SYS_RESOURCE are named.
#[test]
fn the_configuration_decides_what_is_required() {
    let f = Fixture::healthy();
    f.remove("sys/kernel/btf/vmlinux");
    f.set(
        "proc/self/status",
        "Name:\tsplicegate\nCapEff:\t0000000000000000\nCpus_allowed_list:\t0-7\n",
    );
    f.set("sys/devices/system/node/node1/cpulist", "4-7");
    let config = f.root.join("splicegate.toml");
    fs::write(
        &config,
        "[proxy]\nlisten = \"127.0.0.1:0\"\nworkers = 8\n[ebpf]\nenabled = true\n",
    )
    .unwrap();
    let (code, out) = f.doctor(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    finding(&out, "FAIL", "BTF: /sys/kernel/btf/vmlinux is missing");
    finding(&out, "FAIL", "BPF privileges: missing");
    let (_, fix) = finding(&out, "WARN", "NUMA: the mask spans nodes [0, 1]");
    assert!(fix.contains("one gateway per NUMA node"), "{fix}");
    let (_, fix) = finding(&out, "WARN", "fs.pipe-user-pages-soft 16384");
    assert!(fix.contains("CAP_SYS_RESOURCE"), "{fix}");
    assert!(Path::new(&config).exists());
}

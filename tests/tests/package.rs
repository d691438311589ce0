//! The Debian package (packaging/deb/build.sh), built from the binary under
//! test and unpacked into a temporary root (`dpkg-deb -x`): its files and
//! conffiles, the packaged binary serving a request with the unit's command
//! line, the unit checked by `systemd-analyze verify` (which must also
//! catch a broken unit) and `security --offline`, and lintian on the .deb.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use splicegate_tests::gateway::{binary, temp_dir, wait_ready};
use splicegate_tests::*;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// Runs `cmd`; (success, stdout + stderr).
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The package built from the binary under test (once for all the tests
/// here: it takes seconds), and a fresh root it unpacks to.
fn build_and_unpack() -> (PathBuf, PathBuf) {
    static DEB: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let deb = DEB
        .get_or_init(|| {
            let out = Command::new(workspace().join("packaging/deb/build.sh"))
                .arg("--binary")
                .arg(binary())
                .arg("--out")
                .arg(temp_dir("deb"))
                .output()
                .expect("run packaging/deb/build.sh");
            let (stdout, stderr) = (
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
            assert!(out.status.success(), "build.sh failed:\n{stdout}{stderr}");
            // The script prints the .deb's path on stdout, alone.
            PathBuf::from(stdout.trim())
        })
        .clone();
    assert!(deb.is_file(), "{}", deb.display());
    let root = temp_dir("deb-root");
    let (ok, text) = run(Command::new(require_tool("dpkg-deb", "dpkg"))
        .arg("-x")
        .arg(&deb)
        .arg(&root));
    assert!(ok, "dpkg-deb -x: {text}");
    (deb, root)
}

#[test]
fn the_package_installs_a_gateway_that_serves() {
    let (deb, root) = build_and_unpack();
    // What the package holds.
    for f in [
        "usr/bin/splicegate",
        "etc/splicegate/splicegate.toml",
        "lib/systemd/system/splicegate.service",
        "lib/systemd/system/splicegate-agent.service",
        "etc/splicegate/agent.env",
        "usr/share/doc/splicegate/agents.md",
        "usr/share/man/man1/splicegate.1.gz",
        "usr/share/bash-completion/completions/splicegate",
        "usr/share/zsh/vendor-completions/_splicegate",
        "usr/share/fish/vendor_completions.d/splicegate.fish",
        "usr/share/doc/splicegate/copyright",
        "usr/share/doc/splicegate/changelog.Debian.gz",
    ] {
        assert!(root.join(f).is_file(), "{f} is missing from the package");
    }
    let dpkg = require_tool("dpkg-deb", "dpkg");
    let (ok, conffiles) = run(Command::new(&dpkg).args(["-I"]).arg(&deb).arg("conffiles"));
    assert!(
        ok && conffiles.trim() == "/etc/splicegate/splicegate.toml\n/etc/splicegate/agent.env",
        "{conffiles}"
    );
    let (_, control) = run(Command::new(&dpkg).arg("-f").arg(&deb));
    assert!(control.contains("Package: splicegate"), "{control}");
    for script in ["postinst", "postrm"] {
        let (ok, text) = run(Command::new("sh")
            .arg("-n")
            .arg(workspace().join("packaging/deb").join(script)));
        assert!(ok, "{script}: {text}");
    }
    let bin = root.join("usr/bin/splicegate");
    let (ok, version) = run(Command::new(&bin).arg("--version"));
    assert!(ok && version.contains("(commit "), "{version}");
    // The installed configuration is valid (the unit's ExecStartPre).
    let (ok, text) = run(Command::new(&bin)
        .arg("check-config")
        .arg(root.join("etc/splicegate/splicegate.toml")));
    assert!(ok, "{text}");

    // The unit's ExecStart, with a test configuration in place of
    // /etc/splicegate/splicegate.toml (port 0, a package, a direct node)
    // and --ready-file to learn the port.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/splicegate.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut args: Vec<String> = exec.split_whitespace().map(str::to_string).collect();
    assert_eq!(args[0], "/usr/bin/splicegate");
    let state = temp_dir("deb-state");
    let bind = node_ip();
    let config = state.join("splicegate.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nworkers = 1\n[safety]\nallow_targets = [\"127.0.0.0/8\"]\n\
             [[org]]\nid = \"acme\"\ncredits = 10.0\n[[package]]\nid = 7\norg = \"acme\"\nkey = \"{KEY}\"\n\
             [[node]]\nid = \"d1\"\nkind = \"direct\"\nbind = \"{bind}\"\ncountry = \"us\"\n"
        ),
    )
    .unwrap();
    for a in args.iter_mut() {
        if a == "/etc/splicegate/splicegate.toml" {
            *a = config.display().to_string();
        }
    }
    let ready_path = state.join("ready.json");
    let mut child = Command::new(&bin)
        .args(&args[1..])
        .arg("--ready-file")
        .arg(&ready_path)
        .current_dir(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the packaged binary");
    let ready = wait_ready(&ready_path, Duration::from_secs(15), || {
        child.try_wait().ok().flatten()
    });
    let ready = match ready {
        Ok(r) => r,
        Err(e) => {
            let _ = child.kill();
            panic!("the packaged binary did not serve: {e}");
        }
    };
    let proxy: std::net::SocketAddr = ready["proxy"][0].as_str().unwrap().parse().unwrap();
    let web = HttpTarget::start();
    let out = Curl::new(client_ip())
        .proxy(proxy)
        .user(&user("country-us"), KEY)
        .get(&web.url("/ip"));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(out.ok_body().trim(), bind.to_string());
}

/// `systemd-analyze verify` on the unit in the unpacked root (with the
/// host's targets and /bin/kill beside it), which must fail on a broken
/// copy; `security --offline` rates its exposure.
#[test]
fn the_unit_passes_systemd_analyze() {
    let (_, root) = build_and_unpack();
    let analyze = require_tool("systemd-analyze", "systemd");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/kill", root.join("bin/kill")).expect("/bin/kill");
    let units = root.join("lib/systemd/system");
    for e in std::fs::read_dir("/lib/systemd/system").unwrap().flatten() {
        let name = e.file_name();
        if name.to_string_lossy().ends_with(".target") && !units.join(&name).exists() {
            let _ = std::fs::copy(e.path(), units.join(&name));
        }
    }
    let verify = |unit: &str| {
        run(Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", root.display()))
            .arg(format!("/lib/systemd/system/{unit}")))
    };
    for unit in ["splicegate.service", "splicegate-agent.service"] {
        let (ok, text) = verify(unit);
        assert!(ok, "systemd-analyze verify {unit}:\n{text}");
    }
    // A broken copy fails: the check can see a mistake.
    let broken = std::fs::read_to_string(units.join("splicegate.service"))
        .unwrap()
        .replace("Type=notify", "Type=notifyy")
        .replace(
            "ExecStart=/usr/bin/splicegate",
            "ExecStart=/usr/bin/splicegatex",
        );
    std::fs::write(units.join("broken.service"), broken).unwrap();
    let (ok, text) = verify("broken.service");
    assert!(!ok, "a broken unit passed verify:\n{text}");
    std::fs::remove_file(units.join("broken.service")).unwrap();

    // systemd rates 0–10; ≤ 3 is "OK" (a default unit is 9.6 UNSAFE). The
    // agent, which needs no privilege, must do better than the gateway.
    for (unit, most) in [
        ("splicegate.service", 3.0),
        ("splicegate-agent.service", 2.0),
    ] {
        let (ok, text) = run(Command::new(&analyze)
            .args(["security", "--offline=true"])
            .arg(format!("--root={}", root.display()))
            .arg(unit));
        assert!(ok, "{text}");
        let level: f64 = text
            .lines()
            .find_map(|l| l.split(&format!("{unit}: ")).nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        eprintln!("FIGURE {unit} exposure {level}");
        assert!(level <= most, "{unit}: exposure {level}:\n{text}");
    }
}

#[test]
fn lintian_finds_no_error() {
    let (deb, _) = build_and_unpack();
    let lintian = require_tool("lintian", "lintian");
    let (_, text) = run(Command::new(lintian)
        .arg("--tag-display-limit")
        .arg("0")
        .arg(&deb));
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E: ")).collect();
    let warnings: Vec<&str> = text.lines().filter(|l| l.starts_with("W: ")).collect();
    assert!(errors.is_empty() && warnings.is_empty(), "lintian:\n{text}");
}

/// `dpkg -i` and `dpkg --purge` for real, on a machine that is thrown away
/// afterwards (CI sets `SPLICEGATE_DISPOSABLE_MACHINE=1`; elsewhere this
/// test says so and checks nothing): the maintainer scripts create the
/// system user, the state directory and the configuration's permissions,
/// and a purge removes the state.
#[test]
fn dpkg_installs_and_purges_on_a_disposable_machine() {
    if std::env::var_os("SPLICEGATE_DISPOSABLE_MACHINE").is_none_or(|v| v != "1") {
        eprintln!("skipped: set SPLICEGATE_DISPOSABLE_MACHINE=1 on a machine that may be changed");
        return;
    }
    let (deb, _) = build_and_unpack();
    let dpkg = require_tool("dpkg", "dpkg");
    let (ok, text) = run(Command::new(&dpkg).arg("-i").arg(&deb));
    assert!(ok, "dpkg -i:\n{text}");
    let (ok, user) = run(Command::new("getent").args(["passwd", "splicegate"]));
    assert!(ok && user.contains("/var/lib/splicegate"), "{user}");
    let (_, state) = run(Command::new("stat").args(["-c", "%U:%G %a", "/var/lib/splicegate"]));
    assert_eq!(state.trim(), "splicegate:splicegate 750");
    let (_, conf) =
        run(Command::new("stat").args(["-c", "%U:%G %a", "/etc/splicegate/splicegate.toml"]));
    assert_eq!(conf.trim(), "root:splicegate 640");
    let (_, env) = run(Command::new("stat").args(["-c", "%U:%G %a", "/etc/splicegate/agent.env"]));
    assert_eq!(
        env.trim(),
        "root:root 600",
        "the agent's settings hold its key"
    );
    let (ok, version) = run(Command::new("/usr/bin/splicegate").arg("--version"));
    assert!(ok && version.starts_with("splicegate "), "{version}");
    let (ok, text) = run(Command::new(&dpkg).args(["--purge", "splicegate"]));
    assert!(ok, "dpkg --purge:\n{text}");
    assert!(!Path::new("/usr/bin/splicegate").exists());
    assert!(!Path::new("/var/lib/splicegate").exists());
    assert!(!Path::new("/etc/splicegate/splicegate.toml").exists());
}

/// The agent unit's ExecStart, as systemd would run it (`%S` and
/// `$SPLICEGATE_AGENT_ARGS` expanded, the key in the environment), from the
/// packaged binary as an unprivileged user (`nobody` when the tests run as
/// root): it dials a test gateway and carries a request.
#[test]
fn the_agent_units_command_line_serves_unprivileged() {
    let (_, root) = build_and_unpack();
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/splicegate-agent.service")).unwrap();
    assert!(
        unit.contains("RestartPreventExitStatus=2"),
        "a refused key is final"
    );
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    // A gateway with [agents] and agent node dev-pkg.
    let pki = splicegate_tests::pki::TestCa::new(&temp_dir("deb-agent-pki"));
    let leaf = pki.leaf("gw", (2031, 7, 15));
    let mut conf =
        Conf::with_package(KEY).node(NodeDecl::agent("dev-pkg", "ak_pkg_test_key_0123456789"));
    conf.tls = Some((leaf.cert.clone(), leaf.key.clone()));
    conf.extra
        .push_str("[agents]\nlisten = \"127.0.0.1:@PORT_AGENTS@\"\nheartbeat_s = 1\n");
    let gw = Gateway::start_conf(&conf);
    // What /etc/splicegate/agent.env would say; the CA readable by anyone.
    let state = temp_dir("deb-agent-state");
    let ca = state.join("ca.pem");
    std::fs::copy(pki.ca_pem(), &ca).unwrap();
    let agent_args = format!(
        "--gateway {} --server-name localhost --id dev-pkg --ca {} --allow-private",
        gw.addr("AGENTS"),
        ca.display()
    );
    let state_root = state.join("lib");
    std::fs::create_dir_all(state_root.join("splicegate-agent")).unwrap();
    let cmdline = exec
        .replace("%S", &state_root.display().to_string())
        .replace("$SPLICEGATE_AGENT_ARGS", &agent_args);
    let mut args: Vec<String> = cmdline.split_whitespace().map(str::to_string).collect();
    assert_eq!(args[0], "/usr/bin/splicegate");
    args[0] = root.join("usr/bin/splicegate").display().to_string();
    let mut cmd = if is_root() {
        // The unit runs with DynamicUser=: no privilege, no home.
        for p in [&state, &state_root, &state_root.join("splicegate-agent")] {
            let _ = Command::new("chmod").arg("0777").arg(p).status();
        }
        let _ = Command::new("chmod").arg("0755").arg(&root).status();
        // setpriv execs the agent itself (runuser would stay as its parent
        // and die of the signal the test sends).
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .args(&args);
        c
    } else {
        let mut c = Command::new(&args[0]);
        c.args(&args[1..]);
        c
    };
    let log = state.join("agent.log");
    let mut child = cmd
        .env("SPLICEGATE_AGENT_KEY", "ak_pkg_test_key_0123456789")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the packaged agent");
    let connected = eventually(Duration::from_secs(15), Duration::from_millis(50), || {
        let (_, n) = splicegate_tests::admin::admin_request(
            gw.admin_addr(),
            "GET",
            "/v1/nodes/dev-pkg",
            None,
        )
        .ok()?;
        (n["connected"] == true).then_some(())
    });
    let web = HttpTarget::start();
    let out = connected.map(|()| {
        Curl::new(client_ip())
            .proxy(gw.proxy)
            .user(&user("country-us"), KEY)
            .get(&web.url("/ip"))
    });
    splicegate_tests::gateway::signal(child.id(), "TERM");
    let status = splicegate_tests::gateway::wait_child(&mut child, Duration::from_secs(10));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        connected.is_some(),
        "the packaged agent never connected:\n{text}"
    );
    let out = out.unwrap();
    assert_eq!(out.last().status, 200, "{out:#?}");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "SIGTERM stops it cleanly:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&state);
}

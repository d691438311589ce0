//! The dashboard page (`GET /` on the admin address) in headless Chromium
//! against the real binary carrying traffic: curl pushes requests through a
//! `direct` node (successes, a wrong key, a country nobody serves) and holds
//! one tunnel open; then Chromium loads the page with the token in the URL
//! fragment, lets it poll for 8 s of virtual time, and dumps the DOM. The
//! cards, charts and tables must show that traffic. Without a token, or with
//! a wrong one, the page asks for it and shows nothing else. Driven over
//! the DevTools pipe in real time, the token form signs in and the key
//! regeneration shows a new key once, which works at once while the old one
//! fails.
//!
//! Chromium is Debian's `chromium` (`scripts/install-test-deps` installs it);
//! `$CHROMIUM` names another binary. A missing browser fails the tests.
//! Addresses: nodes bind `127.0.1.231`–`232`, clients `127.0.2.231`–`233`.

use std::fs;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use splicegate_tests::agent::{AgentProc, AgentSpec};
use splicegate_tests::browser::{CHROMIUM_FLAGS, browse, chromium, excerpt, kill_group};
use splicegate_tests::gateway::temp_dir;
use splicegate_tests::ops::*;
use splicegate_tests::pki::TestCa;
use splicegate_tests::{Curl, Gateway, Source, eventually};

const KEY: &str = "pk_dash_42";
const NODE_US: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 231);
const NODE_GB: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 232);
const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 231);
const CLIENT_BAD: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 232);
const CLIENT_HOLD: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 233);

/// Two workers, org `dash`, package 42 with caps, a node in the US and one
/// in Great Britain; no health probes.
fn conf(s: &Setup, pki: &TestCa) -> String {
    let head = s
        .head("interval_s = 3600")
        .replace("workers = 1", "workers = 2");
    // One agent device, connected, and one node whose agent never comes.
    let leaf = pki.leaf("gw", (2031, 7, 15));
    let agents = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n\n[agents]\nlisten = \"127.0.0.1:@PORT_AGENTS@\"\nheartbeat_s = 1\n\n\
         [[node]]\nid = \"dash-dev-1\"\nkind = \"agent\"\nkey = {AGENT_KEY:?}\ncountry = \"de\"\n\n\
         [[node]]\nid = \"dash-dev-2\"\nkind = \"agent\"\nkey = {AGENT_KEY:?}\ncountry = \"de\"\n\n",
        leaf.cert.display().to_string(),
        leaf.key.display().to_string()
    );
    let caps = "traffic_limit_bytes = 100000000\nmax_connections = 50\nprice_per_gb = 1.0\n";
    [
        head,
        org_and_package("dash", 50.0, 42, KEY, caps),
        direct_node(
            "dash-us-1",
            NODE_US,
            "country = \"us\"\nregion = \"new_york\"\ncity = \"new_york\"",
        ),
        direct_node(
            "dash-gb-1",
            NODE_GB,
            "country = \"gb\"\nregion = \"england\"\ncity = \"london\"",
        ),
        agents,
    ]
    .concat()
}

const AGENT_KEY: &str = "ak_dash_device_key_0123456789";

/// A setup named `tag` and a gateway on [`conf`], once Chromium is there,
/// with agent `dash-dev-1` connected.
fn start(tag: &str) -> (Setup, Gateway, AgentProc) {
    let _browser = chromium();
    let s = Setup::new(tag);
    let pki = TestCa::new(&temp_dir("dash-pki"));
    let gw = s.start(&conf(&s, &pki));
    let agent = AgentProc::start(AgentSpec::new(
        "dash-dev-1",
        AGENT_KEY,
        gw.addr("AGENTS"),
        &pki.ca_pem(),
    ));
    let connected = eventually(Duration::from_secs(10), Duration::from_millis(50), || {
        let (_, n) = gw.get("/v1/nodes/dash-dev-1");
        (n["connected"] == true).then_some(())
    });
    assert!(
        connected.is_some(),
        "the agent never connected\n{}",
        agent.log()
    );
    (s, gw, agent)
}

/// Chromium driven over its DevTools pipe (fds 3 and 4, JSON messages ended
/// by NUL), with one page, in real time. The pipes are FIFOs opened
/// read-write here, so no open blocks; bash puts them on fds 3 and 4.
struct Cdp {
    child: Child,
    to: fs::File,
    from: mpsc::Receiver<Value>,
    next: u64,
    session: String,
    dir: PathBuf,
}

impl Cdp {
    fn open(url: &str) -> Cdp {
        let dir = temp_dir("cdp");
        let (fin, fout) = (dir.join("in"), dir.join("out"));
        let st = Command::new("mkfifo")
            .arg(&fin)
            .arg(&fout)
            .status()
            .expect("run mkfifo");
        assert!(st.success(), "mkfifo");
        let rw = |p: &Path| {
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .expect("open a fifo")
        };
        let (to, mut from_file) = (rw(&fin), rw(&fout));
        let child = Command::new("bash")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<"$CDP_IN" 4>"$CDP_OUT""#)
            .arg(chromium())
            .args(CHROMIUM_FLAGS)
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .args(["--remote-debugging-pipe", "about:blank"])
            .env("CDP_IN", &fin)
            .env("CDP_OUT", &fout)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr")).expect("create stderr"))
            .process_group(0)
            .spawn()
            .expect("start chromium");
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 64 * 1024];
            while let Ok(n) = from_file.read(&mut chunk) {
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.iter().position(|b| *b == 0) {
                    let msg: Vec<u8> = buf.drain(..=end).collect();
                    let v = serde_json::from_slice(&msg[..end]).unwrap_or(Value::Null);
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        let mut cdp = Cdp {
            child,
            to,
            from,
            next: 0,
            session: String::new(),
            dir,
        };
        let target = cdp.call("Target.createTarget", json!({"url": "about:blank"}));
        let target = target["targetId"].as_str().expect("targetId").to_string();
        let attached = cdp.call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        cdp.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        cdp.call("Page.navigate", json!({ "url": url }));
        cdp
    }

    /// One command (on the page once attached); its result, within 30 s.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from.recv_timeout(left) {
                Ok(v) if v["id"] == id => {
                    assert!(v.get("error").is_none(), "{method}: {v}");
                    return v["result"].clone();
                }
                Ok(_) => {}
                Err(_) => panic!(
                    "chromium did not answer {method} within 30 s:\n{}",
                    fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
                ),
            }
        }
    }

    /// Evaluate `expr` in the page (promises awaited): its value, or `Err`
    /// with what it threw.
    fn try_eval(&mut self, expr: &str) -> Result<Value, Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        match r.get("exceptionDetails") {
            Some(e) => Err(e.clone()),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    /// Evaluate `expr` in the page; its value.
    fn eval(&mut self, expr: &str) -> Value {
        self.try_eval(expr)
            .unwrap_or_else(|e| panic!("{expr} threw: {e}"))
    }

    /// Wait (at most `secs`) until `expr` is truthy in the page.
    fn wait_for(&mut self, expr: &str, secs: u64) {
        let expr = format!("Boolean({expr})");
        let ok = eventually(Duration::from_secs(secs), Duration::from_millis(50), || {
            // Before the page is there (or while it reloads) it may throw.
            (self.try_eval(&expr) == Ok(Value::Bool(true))).then_some(())
        });
        if ok.is_none() {
            let main = self.try_eval("document.querySelector('main').innerText.slice(0, 3000)");
            panic!("the page never showed {expr} within {secs} s:\n{main:?}");
        }
    }
}

impl Drop for Cdp {
    fn drop(&mut self) {
        kill_group(self.child.id());
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The opening tag of the element whose attributes contain `needle`.
fn tag<'a>(dom: &'a str, needle: &str) -> &'a str {
    let at = dom
        .find(needle)
        .unwrap_or_else(|| panic!("the page shows no {needle}:\n{}", excerpt(dom)));
    let start = dom[..at].rfind('<').unwrap_or(0);
    let end = at + dom[at..].find('>').unwrap_or(dom.len() - at);
    &dom[start..end]
}

/// A numeric attribute of an opening tag.
fn num(tag: &str, attr: &str) -> f64 {
    let key = format!("{attr}=\"");
    tag.find(&key)
        .and_then(|i| tag[i + key.len()..].split('"').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {attr} in {tag}"))
}

/// A forwarded (not tunnelled) request with curl from `src`: the status.
fn curl_forward(proxy: std::net::SocketAddr, src: Ipv4Addr, target: &str, user: &str) -> u16 {
    let out = Curl::new(src).proxy(proxy).user(user, KEY).get(target);
    out.heads.last().map_or(0, |h| h.status)
}

/// A curl that holds a tunnel open (reading a slow stream), killed by PID.
struct Held(Child);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hold_tunnel(proxy: std::net::SocketAddr, src: Ipv4Addr, target: std::net::SocketAddr) -> Held {
    let curl = Curl::new(src)
        .proxy(proxy)
        .user("package-42-country-us", KEY)
        .tunnel()
        .arg("--http0.9")
        .arg("-o")
        .arg("/dev/null")
        .arg("--max-time")
        .arg("60");
    Held(curl.spawn(&format!("http://{target}/")))
}

fn is_png(path: &Path) -> bool {
    fs::read(path).is_ok_and(|b| b.len() > 10_000 && b.starts_with(b"\x89PNG\r\n\x1a\n"))
}

#[test]
fn the_dashboard_shows_the_traffic() {
    let (_s, gw, _agent) = start("dashboard");
    let target = IpEcho::start(local(0)).unwrap();
    let stream = Source::start(16 * 1024, Duration::from_millis(50), None);

    // The page itself: served open, with the chart library inlined and
    // nothing fetched from anywhere else.
    let page = http(gw.admin_addr(), "GET", "/", None, None);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("var uPlot="), "uPlot is inlined");
    assert!(!page.body.contains("/*uPlot.iife.min.js*/"));
    for external in ["src=\"http", "href=\"http", "url(http", "@import"] {
        assert!(!page.body.contains(external), "the page loads {external}…");
    }

    // Traffic: tunnels and forwarded requests that succeed, a wrong key, a
    // country no node serves, and one tunnel held open.
    let mut ok = 0;
    for i in 0..6 {
        let (status, body) = curl_connect(
            gw.proxy,
            CLIENT,
            target.addr,
            &format!("package-42-country-us-session-s{i}"),
            KEY,
        );
        assert_eq!(status, 200, "CONNECT {i}: {body}\n{}", gw.log_tail(20));
        assert_eq!(body, NODE_US.to_string());
        ok += 1;
    }
    for _ in 0..2 {
        let url = format!("http://{}/", target.addr);
        assert_eq!(
            curl_forward(gw.proxy, CLIENT, &url, "package-42-country-gb"),
            200
        );
        ok += 1;
    }
    let (status, _) = curl_connect(gw.proxy, CLIENT_BAD, target.addr, "package-42", "pk_wrong");
    assert_eq!(status, 407, "a wrong key");
    let (status, _) = curl_connect(gw.proxy, CLIENT, target.addr, "package-42-country-fr", KEY);
    assert_eq!(status, 502, "no node in fr");
    let _held = hold_tunnel(gw.proxy, CLIENT_HOLD, stream.addr());
    let settled = eventually(Duration::from_secs(10), Duration::from_millis(50), || {
        let (_, p) = gw.get("/v1/packages/42");
        let (_, n) = gw.get("/v1/nodes/dash-us-1");
        let m = gw.metrics();
        let tunnels = sample(&m, "splicegate_open_tunnels{worker=\"0\"}")
            + sample(&m, "splicegate_open_tunnels{worker=\"1\"}");
        (p["requests"].as_u64().unwrap_or(0) > ok
            && n["active_tunnels"] == 1
            && tunnels == 1.0
            && stream.sent() > 0)
            .then_some(p)
    })
    .unwrap_or_else(|| panic!("the traffic never showed in the API\n{}", gw.log_tail(30)));
    let requests = settled["requests"].as_u64().unwrap();

    // The page, with the token taken from the fragment.
    let url = format!("http://{}/#token={TOKEN}", gw.admin_addr());
    let dom = browse("--dump-dom", &url);
    assert!(
        dom.contains("<body data-auth=\"token\""),
        "the page did not sign in with the fragment's token:\n{}",
        excerpt(&dom)
    );
    assert!(!dom.contains(TOKEN), "the token shows in the page");
    assert!(!dom.contains(KEY), "a GET showed a package key");
    // Every call answered (a gateway outside a fleet has no /v1/gateways,
    // and that is no failure: its panel stays hidden).
    assert!(
        dom.contains("<span id=\"live\" class=\"pill live\""),
        "the page says a call failed:\n{}",
        excerpt(&dom)
    );
    assert!(dom.contains("<section class=\"panel\" id=\"panel-gateways\" hidden"));

    // Cards.
    assert!(num(tag(&dom, "id=\"card-rps\""), "data-total") >= (ok + 2) as f64);
    assert_eq!(
        num(tag(&dom, "id=\"card-tun\""), "data-open"),
        1.0,
        "open tunnels"
    );
    // Two direct nodes and the connected agent.
    assert_eq!(num(tag(&dom, "id=\"card-nodes\""), "data-online"), 3.0);
    let card = "id=\"v-credits\">";
    let credits = &dom[dom.find(card).expect("the credits card") + card.len()..];
    assert!(
        credits.starts_with("49.") || credits.starts_with("50.00<"),
        "{}",
        &credits[..20]
    );

    // Charts: uPlot drew them from several polls; the totals and the codes.
    assert!(dom.contains("class=\"uplot"), "no chart was drawn");
    assert!(num(tag(&dom, "id=\"ch-tp\""), "data-points") >= 2.0);
    assert!(num(tag(&dom, "id=\"tp-total\""), "data-bytes") > 0.0);
    for code in ["AUTH_FAILED", "NODE_NOT_FOUND"] {
        tag(&dom, &format!("class=\"it\" data-code=\"{code}\""));
    }
    let accepted: f64 = ["0", "1"]
        .iter()
        .map(|w| {
            dom.find(&format!("data-worker=\"{w}\"")).map_or(0.0, |_| {
                num(tag(&dom, &format!("data-worker=\"{w}\"")), "data-accepted")
            })
        })
        .sum();
    assert!(
        accepted >= (ok + 2) as f64,
        "accepted per worker: {accepted}"
    );

    // Tables: the package with its requests, the caps, the nodes by
    // country, the node with its open tunnel, the errors' tail, and the
    // rule tester's first answer.
    let row = tag(&dom, "id=\"pkg-42\"");
    assert_eq!(num(row, "data-requests") as u64, requests, "{row}");
    assert!(num(row, "data-bytes") > 0.0, "{row}");
    tag(&dom, "class=\"cap\" data-package=\"42\"");
    assert_eq!(num(tag(&dom, "data-country=\"us\""), "data-online"), 1.0);
    assert_eq!(num(tag(&dom, "data-country=\"gb\""), "data-online"), 1.0);
    assert_eq!(num(tag(&dom, "id=\"node-dash-us-1\""), "data-tunnels"), 1.0);
    tag(&dom, "id=\"node-dash-gb-1\"");
    // Agents: presence is their health.
    let dev = &dom[dom.find("id=\"node-dash-dev-1\"").expect("the agent's row")..];
    let dev = &dev[..dev.find("</tr>").unwrap_or(dev.len())];
    assert!(dev.contains("data-agent=\"connected\""), "{dev}");
    assert!(
        dev.contains("127.0.0.1:"),
        "the address it connected from: {dev}"
    );
    let absent = &dom[dom
        .find("id=\"node-dash-dev-2\"")
        .expect("the other agent's row")..];
    let absent = &absent[..absent.find("</tr>").unwrap_or(absent.len())];
    assert!(absent.contains("data-agent=\"absent\""), "{absent}");
    let tail = &dom[dom.find("id=\"errors\"").expect("the errors table")..];
    for code in ["AUTH_FAILED", "NODE_NOT_FOUND"] {
        assert!(
            tail.contains(&format!("<tr class=\"\" data-code=\"{code}\""))
                || tail.contains(&format!("<tr class=\"fresh\" data-code=\"{code}\"")),
            "{code} is not in the errors' tail:\n{}",
            excerpt(&dom)
        );
    }
    tag(&dom, "class=\"verdict\" data-code=\"OK\"");

    // The screenshot the README's command takes.
    let dir = temp_dir("shot");
    let png = dir.join("dashboard.png");
    browse(&format!("--screenshot={}", png.display()), &url);
    assert!(is_png(&png), "no screenshot at {}", png.display());
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn without_its_token_the_dashboard_asks_for_it() {
    let (_s, gw, _agent) = start("dashboard-token");

    // No token: the form, and no data.
    let dom = browse("--dump-dom", &format!("http://{}/", gw.admin_addr()));
    assert!(
        dom.contains("<body data-auth=\"needed\""),
        "{}",
        excerpt(&dom)
    );
    let form = tag(&dom, "id=\"login-overlay\"");
    assert!(!form.contains("hidden"), "the token form is hidden: {form}");
    assert!(!dom.contains("id=\"pkg-42\""), "data without a token");

    // A wrong token: refused, asked again.
    let dom = browse(
        "--dump-dom",
        &format!("http://{}/#token=wrong", gw.admin_addr()),
    );
    assert!(
        dom.contains("<body data-auth=\"refused\""),
        "{}",
        excerpt(&dom)
    );
    assert!(!tag(&dom, "id=\"login-overlay\"").contains("hidden"));
    assert!(dom.contains("That token was refused"));
    assert!(!dom.contains("id=\"pkg-42\""), "data with a wrong token");
}

#[test]
fn the_token_form_signs_in_and_a_new_key_is_shown_once() {
    let (_s, gw, _agent) = start("dashboard-key");
    let target = IpEcho::start(local(0)).unwrap();
    let old = gw.expect(
        "POST",
        "/v1/packages",
        Some(r#"{"id": 43, "org": "dash"}"#),
        201,
    )["key"]
        .as_str()
        .unwrap()
        .to_string();
    let works =
        |key: &str| curl_connect(gw.proxy, CLIENT, target.addr, "package-43-country-us", key).0;
    assert_eq!(works(&old), 200);

    // No token yet: the form; typed in, the page signs in and keeps it in
    // the tab.
    let mut page = Cdp::open(&format!("http://{}/", gw.admin_addr()));
    page.wait_for("document.body.dataset.auth === 'needed'", 20);
    page.eval(&format!(
        "document.getElementById('login-token').value = '{TOKEN}'; \
         document.getElementById('login').requestSubmit()"
    ));
    page.wait_for("document.getElementById('pkg-43')", 20);
    assert_eq!(page.eval("document.body.dataset.auth"), "token");
    assert_eq!(
        page.eval("sessionStorage.getItem('splicegate.admin.token')"),
        TOKEN
    );
    assert_eq!(
        page.eval("document.getElementById('login-overlay').hidden"),
        true
    );
    // A file package's key belongs to the file: no button for it.
    assert_eq!(
        page.eval("document.querySelector('button[data-key=\"42\"]') === null"),
        true
    );

    // New key: one click asks to confirm, the second replaces the key and
    // shows it.
    page.eval("document.querySelector('button[data-key=\"43\"]').click()");
    page.wait_for(
        "document.querySelector('button[data-key=\"43\"]').textContent.startsWith('Confirm')",
        5,
    );
    page.eval("document.querySelector('button[data-key=\"43\"]').click()");
    page.wait_for(
        "!document.getElementById('key-overlay').hidden && document.getElementById('key-value').value",
        10,
    );
    let new = page
        .eval("document.getElementById('key-value').value")
        .as_str()
        .unwrap()
        .to_string();
    assert!(new.starts_with("pk_") && new != old, "{new}");
    assert_eq!(works(&new), 200, "the new key works at once");
    assert_eq!(works(&old), 407, "the old key fails at once");

    // Done: the key is gone from the page.
    page.eval("document.getElementById('key-close').click()");
    assert_eq!(
        page.eval(&format!(
            "document.documentElement.outerHTML.includes('{new}') || document.getElementById('key-value').value !== ''"
        )),
        false
    );

    // A reload keeps the tab's token; the rule tester answers.
    page.call("Page.reload", json!({}));
    page.wait_for(
        "document.getElementById('pkg-43') && document.body.dataset.auth === 'token'",
        20,
    );
    page.eval(
        "document.getElementById('explain-user').value = 'package-43-country-fr'; \
         document.getElementById('explain-form').requestSubmit()",
    );
    page.wait_for(
        "document.querySelector('.verdict[data-code=\"NODE_NOT_FOUND\"]')",
        10,
    );
    drop(page);
}

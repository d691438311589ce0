//! Criterion benchmarks of the control plane's per-request work: parsing a
//! connection string, picking a node among a million, a sticky-session hit,
//! and the whole check order of one CONNECT.
//!
//! Run: `cargo bench -p splicegate-control --bench control` (about a minute;
//! the 1M-node policy is built once, outside every timed loop). Each bench
//! prints its median after criterion's own report, and a table of medians
//! against the goals closes the run.
//!
//! Medians of `cargo bench -p splicegate-control --bench control`, 2026-11-25,
//! 2 shared vCPUs (Intel Xeon), rustc 1.95.0, release profile:
//!
//! | bench                                               | median   | goal     |
//! |-----------------------------------------------------|----------|----------|
//! | rules/parse 6-rule username                         | 281 ns   | ≤ 300 ns |
//! | nodes/pick us+city+isp (1,477 online match)         | 28.3 µs  | ≤ 2 µs — missed |
//! | nodes/pick us (285k online match)                   | 14.0 µs  |          |
//! | nodes/set_admin_state toggle                        | 3.0 µs   |          |
//! | session/acquire hit (10k live sessions)             | 75.8 ns  | ≤ 150 ns |
//! | connect/check order, session hit                    | 894 ns   |          |
//! | connect/check order, pick                           | 29.2 µs  |          |
//!
//! The pick is all `NodePool::candidates` (callgrind: 99 % of its
//! instructions): roaring intersections whose cost follows the smallest
//! attribute set (city, ~15k ids), not the ~1.5k result. Sampling the smallest
//! set and testing the others with `contains` (falling back to the
//! intersection when few samples match) measured ~0.8 µs in a scratch model.
#![forbid(unsafe_code)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};

use splicegate_control::engine::Engine;
use splicegate_control::geo::{Country, GeoCatalog, GeoKind};
use splicegate_control::nodes::{Filter, NodeDecl, NodeIdx, NodeKind, NodeState, Rng};
use splicegate_control::policy::{
    Credentials, Declarations, Hello, OrgDecl, PackageDecl, Policy, Protocol,
};
use splicegate_control::rules::{self, Network, Rules};
use splicegate_control::session::{NodePicker, SessionKey, SessionTable};
use splicegate_control::{Now, Rejection};

/// A target as a client would send it.
fn target(host: &str, port: u16) -> splicegate_addr::Target {
    let h = splicegate_addr::parse_host(host.as_bytes()).expect("host parses");
    splicegate_addr::Target::new(h, port)
}

/// A typical 6-rule connection string (country, city, isp, session,
/// sessionlength, onerror).
const USERNAME: &str = "package-7-country-us-city-new_york-isp-verizon_wireless-session-abc123-sessionlength-600-onerror-retry_3";
/// The same targeting without a session: every request picks a node.
const USERNAME_ROTATING: &str = "package-7-country-us-city-new_york-isp-verizon_wireless";
const PASSWORD: &str = "pk_7";

/// Samples per bench; criterion's median is the median of these samples'
/// per-iteration times.
const SAMPLES: usize = 50;

// ---------------------------------------------------------------------------
// The node population.
//
// 1,000,000 nodes, attributes drawn independently with a fixed seed:
// - country: 50 ISO countries, Zipf-ish — us 30 %, the other 49 share 70 % in
//   proportion to 1/k (gb 15.6 %, de 7.8 %, … pk 0.3 %);
// - city: 20 per country, uniform (us: new_york … boston; others `<cc>_city_<k>`);
// - isp: 10 per country, uniform (us: verizon_wireless … optimum), one ASN each;
// - network: res, mob, dc, uniform;
// - state: 5 % offline (not selectable), the rest online.
// So country-us ≈ 300k nodes, city-new_york ≈ 15k, isp-verizon_wireless ≈ 30k,
// and all three ≈ 1.5k, of which ≈ 1.4k online.
// ---------------------------------------------------------------------------

const NODES: u32 = 1_000_000;
/// Nodes when criterion only smoke-tests the benches (`cargo test --benches`,
/// `--test`, `--list`): each runs once, unoptimised, so 1M would only be slow.
const SMOKE_NODES: u32 = 10_000;

/// Whether criterion runs in a mode other than benchmarking (its own rule:
/// benchmarks need `--bench` and no `--test`).
static SMOKE: LazyLock<bool> = LazyLock::new(|| {
    let has = |flag: &str| std::env::args().any(|a| a == flag);
    !has("--bench") || has("--test") || has("--list")
});
/// The distribution, for bench names (criterion keeps titles under 100 bytes).
const POPULATION: &str = "1M: 50c zipf us30%, 20 city+10 isp/c, 3 net, 5% off";

const COUNTRIES: [&str; 50] = [
    "us", "gb", "de", "fr", "br", "in", "ca", "jp", "it", "es", "mx", "au", "nl", "pl", "tr", "id",
    "ru", "kr", "ar", "za", "se", "ch", "be", "at", "ua", "ro", "cz", "pt", "gr", "hu", "ie", "dk",
    "fi", "no", "il", "sg", "my", "th", "vn", "ph", "eg", "ng", "ke", "co", "cl", "pe", "nz", "sa",
    "ae", "pk",
];
const US_CITIES: [&str; 20] = [
    "new_york",
    "los_angeles",
    "chicago",
    "houston",
    "phoenix",
    "philadelphia",
    "san_antonio",
    "san_diego",
    "dallas",
    "san_jose",
    "austin",
    "jacksonville",
    "fort_worth",
    "columbus",
    "charlotte",
    "indianapolis",
    "san_francisco",
    "seattle",
    "denver",
    "boston",
];
const US_ISPS: [&str; 10] = [
    "verizon_wireless",
    "att",
    "comcast",
    "charter",
    "cox",
    "t_mobile",
    "centurylink",
    "frontier",
    "windstream",
    "optimum",
];

fn country(i: usize) -> Country {
    Country::parse(COUNTRIES[i]).expect("an ISO code")
}

/// City `k` of country `c`.
fn city_name(c: usize, k: usize) -> String {
    if c == 0 {
        US_CITIES[k].to_string()
    } else {
        format!("{}_city_{k}", COUNTRIES[c])
    }
}

/// ISP `k` of country `c`.
fn isp_name(c: usize, k: usize) -> String {
    if c == 0 {
        US_ISPS[k].to_string()
    } else {
        format!("{}_isp_{k}", COUNTRIES[c])
    }
}

/// Every city and ISP name of every country (what the pool's catalogue holds).
fn catalogue() -> GeoCatalog {
    let mut geo = GeoCatalog::new();
    for c in 0..COUNTRIES.len() {
        for k in 0..US_CITIES.len() {
            geo.add(country(c), GeoKind::City, &city_name(c, k));
        }
        for k in 0..US_ISPS.len() {
            geo.add(country(c), GeoKind::Isp, &isp_name(c, k));
        }
    }
    geo
}

/// Cumulative country weights in parts per million.
fn country_cdf() -> Vec<u64> {
    let harmonic: f64 = (1..COUNTRIES.len()).map(|k| 1.0 / k as f64).sum();
    let mut cdf = Vec::with_capacity(COUNTRIES.len());
    let mut acc = 0.30;
    cdf.push((acc * 1e6) as u64);
    for k in 1..COUNTRIES.len() {
        acc += 0.70 / (k as f64 * harmonic);
        cdf.push((acc * 1e6) as u64);
    }
    *cdf.last_mut().expect("50 countries") = 1_000_000;
    cdf
}

fn node_decls() -> Vec<NodeDecl> {
    let cdf = country_cdf();
    let mut rng = Rng::new(0x5eed);
    let count = if *SMOKE { SMOKE_NODES } else { NODES };
    (0..count)
        .map(|i| {
            let draw = rng.below(1_000_000);
            let c = cdf.partition_point(|&t| t <= draw);
            let city = rng.below(20) as usize;
            let isp = rng.below(10) as usize;
            NodeDecl {
                id: format!("n{i}"),
                kind: NodeKind::Direct,
                addr: None,
                bind: Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))),
                credentials: None,
                country: Some(country(c)),
                region: None,
                city: Some(city_name(c, city)),
                isp: Some(isp_name(c, isp)),
                asn: Some(64_512 + (c * 10 + isp) as u32),
                network: Network::ALL[rng.below(3) as usize],
                state: if rng.below(20) == 0 {
                    NodeState::Offline
                } else {
                    NodeState::Online
                },
                from_file: false,
                key_hash: None,
                udp: false,
            }
        })
        .collect()
}

/// Everything the pool and CONNECT benches share, built once.
struct Fixture {
    engine: Engine,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let t = Instant::now();
    let mut package = PackageDecl::new(7, PASSWORD);
    package.org = Some("acme".into());
    let decls = Declarations {
        orgs: vec![OrgDecl {
            id: "acme".into(),
            credits: 1_000_000_000_000,
            from_file: false,
        }],
        packages: vec![package],
        nodes: node_decls(),
        geo: Vec::new(),
        targets: Default::default(),
    };
    // Policy::build interns the names into its GeoCatalog and calls
    // NodePool::build on the declarations.
    let policy = Policy::build(&decls, None).expect("a valid policy");
    drop(decls);
    eprintln!(
        "fixture: {} nodes ({} online) built in {:.1} s (not timed)",
        policy.nodes.len(),
        policy.nodes.online_count(),
        t.elapsed().as_secs_f64()
    );
    Fixture {
        engine: Engine::new(policy, 100_000),
    }
});

// ---------------------------------------------------------------------------
// Medians: criterion reports the mean; these benches time their own
// iterations (`iter_custom`) and keep the per-iteration time of each call. The
// last `SAMPLES` calls are the measurement samples (warm-up comes first), so
// their median is the median criterion computes.
// ---------------------------------------------------------------------------

struct Row {
    name: String,
    median_ns: f64,
    goal_ns: Option<f64>,
}

static ROWS: Mutex<Vec<Row>> = Mutex::new(Vec::new());

/// A criterion group that remembers its name for the summary.
struct Group<'a> {
    name: String,
    inner: BenchmarkGroup<'a, WallTime>,
}

fn bench<R>(g: &mut Group<'_>, name: &str, goal_ns: Option<f64>, mut f: impl FnMut() -> R) {
    let mut per_iter: Vec<f64> = Vec::new();
    g.inner.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(f());
            }
            let took = start.elapsed();
            per_iter.push(took.as_nanos() as f64 / iters as f64);
            took
        });
    });
    if per_iter.is_empty() || *SMOKE {
        return; // filtered out, or not measured
    }
    let mut samples = per_iter.split_off(per_iter.len().saturating_sub(SAMPLES));
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let median = if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    };
    let verdict = match goal_ns {
        Some(goal) if median <= goal => format!(" (goal ≤ {} met)", fmt_ns(goal)),
        Some(goal) => format!(" (goal ≤ {} MISSED)", fmt_ns(goal)),
        None => String::new(),
    };
    println!(
        "                        median {}{verdict}\n",
        fmt_ns(median)
    );
    ROWS.lock().unwrap_or_else(|e| e.into_inner()).push(Row {
        name: format!("{}/{name}", g.name),
        median_ns: median,
        goal_ns,
    });
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1_000.0 {
        format!("{:.2} µs", ns / 1_000.0)
    } else {
        format!("{ns:.1} ns")
    }
}

fn group<'a>(c: &'a mut Criterion, name: &str) -> Group<'a> {
    let mut inner = c.benchmark_group(name);
    inner
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    Group {
        name: name.to_string(),
        inner,
    }
}

// ---------------------------------------------------------------------------
// The benches.
// ---------------------------------------------------------------------------

fn parse(c: &mut Criterion) {
    let geo = catalogue();
    assert!(rules::parse(USERNAME, &geo).is_ok());
    let mut g = group(c, "rules");
    bench(&mut g, "parse 6-rule username", Some(300.0), || {
        rules::parse(black_box(USERNAME), &geo)
    });
    g.inner.finish();
}

fn pool(c: &mut Criterion) {
    let fx = &*FIXTURE;
    let policy = fx.engine.policy_arc();
    let (nodes, geo) = (&policy.nodes, &policy.geo);
    let us = Country::parse("us");
    let id = |kind, name| geo.lookup(us, kind, name).expect("a catalogue name");
    let filter = Filter {
        country: us,
        city: Some(id(GeoKind::City, "new_york")),
        isp: Some(id(GeoKind::Isp, "verizon_wireless")),
        ..Filter::default()
    };
    eprintln!(
        "pool: country-us matches {}, +city-new_york+isp-verizon_wireless {} (online)",
        nodes.count(&Filter {
            country: us,
            ..Filter::default()
        }),
        nodes.count(&filter)
    );
    let mut g = group(c, "nodes");
    let mut rng = Rng::new(1);
    bench(
        &mut g,
        &format!("pick us+city+isp [{POPULATION}]"),
        Some(2_000.0),
        || nodes.pick(black_box(&filter), &[], &mut rng, geo),
    );
    let country_only = Filter {
        country: us,
        ..Filter::default()
    };
    bench(&mut g, &format!("pick us [{POPULATION}]"), None, || {
        nodes.pick(black_box(&country_only), &[], &mut rng, geo)
    });
    // One node flips offline and back: each call changes the selectable
    // bitmap (copy-on-write), never the attribute index.
    let node: NodeIdx = nodes
        .iter()
        .find(|(_, n)| n.state() == NodeState::Online)
        .map(|(i, _)| i)
        .expect("an online node");
    let mut offline = false;
    bench(
        &mut g,
        &format!("set_admin_state toggle [{POPULATION}]"),
        None,
        || {
            offline = !offline;
            let to = if offline {
                NodeState::Offline
            } else {
                NodeState::Online
            };
            nodes.set_admin_state(black_box(node), to)
        },
    );
    nodes.set_admin_state(node, NodeState::Online);
    g.inner.finish();
}

/// A session hit never asks for a node; this one answers node 0 if asked.
struct FixedPicker;

impl NodePicker for FixedPicker {
    fn pick(&mut self, _avoid: Option<NodeIdx>) -> Result<NodeIdx, Rejection> {
        Ok(0)
    }
    fn usable(&self, _node: NodeIdx) -> bool {
        true
    }
}

fn session(c: &mut Criterion) {
    let geo = catalogue();
    let table = SessionTable::new(100_000);
    let start = Now::from_secs(1);
    // 10,000 other live sessions around the one looked up.
    for i in 0..10_000 {
        let r: Rules = rules::parse(
            &format!("package-7-country-us-session-s{i}-sessionlength-600"),
            &geo,
        )
        .expect("valid rules");
        let key = SessionKey {
            package: 7,
            id: r.session.expect("a session"),
        };
        table
            .acquire(key, &r, start, &mut FixedPicker)
            .expect("room");
    }
    let r = rules::parse(USERNAME, &geo).expect("valid rules");
    let key = SessionKey {
        package: r.package,
        id: r.session.expect("a session"),
    };
    table
        .acquire(key, &r, start, &mut FixedPicker)
        .expect("room");
    let now = Now::from_secs(2);
    let mut g = group(c, "session");
    bench(
        &mut g,
        "acquire hit (10k live sessions)",
        Some(150.0),
        || table.acquire(black_box(key), &r, now, &mut FixedPicker),
    );
    g.inner.finish();
}

fn connect(c: &mut Criterion) {
    let fx = &*FIXTURE;
    let engine = &fx.engine;
    let client_ip: IpAddr = "203.0.113.9".parse().expect("an address");
    let now = Now::from_secs(1);
    let mut rng = Rng::new(2);
    // authenticate (1-5), admit (6-9: rules, protocol and target, cap, rate
    // and connections for a new client connection), route (10-11).
    let mut check = |username: &str| {
        let policy = engine.policy();
        let hello = Hello {
            client_ip,
            credentials: Credentials::Present {
                username,
                password: PASSWORD,
            },
            listener_package: None,
        };
        let auth = policy.authenticate(&hello)?;
        let adm = policy.admit(
            &auth,
            Protocol::Https,
            &target("example.com", 443),
            &mut None,
            now,
        )?;
        engine.route(&policy, &adm, now, &mut rng)
    };
    check(USERNAME).expect("the check order passes");
    check(USERNAME_ROTATING).expect("the check order passes");
    let mut g = group(c, "connect");
    bench(
        &mut g,
        &format!("check order, session hit [{POPULATION}]"),
        None,
        || check(black_box(USERNAME)),
    );
    bench(
        &mut g,
        &format!("check order, pick [{POPULATION}]"),
        None,
        || check(black_box(USERNAME_ROTATING)),
    );
    g.inner.finish();
}

/// Closes the run with every median against its goal.
fn summary(_c: &mut Criterion) {
    let rows = ROWS.lock().unwrap_or_else(|e| e.into_inner());
    if rows.is_empty() {
        return;
    }
    println!("medians ({SAMPLES} samples each):");
    for r in rows.iter() {
        let goal = match r.goal_ns {
            Some(g) if r.median_ns <= g => format!("goal ≤ {} met", fmt_ns(g)),
            Some(g) => format!("goal ≤ {} MISSED", fmt_ns(g)),
            None => String::new(),
        };
        println!("  {:<88} {:>10}  {goal}", r.name, fmt_ns(r.median_ns));
    }
}

criterion_group!(benches, parse, pool, session, connect, summary);
criterion_main!(benches);

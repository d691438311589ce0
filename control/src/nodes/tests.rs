use super::*;

pub(crate) fn decl(
    id: &str,
    country: &str,
    city: &str,
    isp: &str,
    asn: u32,
    net: Network,
    ip: &str,
) -> NodeDecl {
    NodeDecl {
        id: id.into(),
        kind: NodeKind::Direct,
        addr: None,
        bind: Some(ip.parse().unwrap()),
        credentials: None,
        country: Country::parse(country),
        region: None,
        city: Some(city.into()),
        isp: Some(isp.into()),
        asn: Some(asn),
        network: net,
        state: NodeState::Online,
        from_file: false,
        key_hash: None,
        udp: false,
    }
}

/// Paris, Orange (AS3215), residential.
fn paris1() -> NodeDecl {
    decl(
        "pa1",
        "fr",
        "paris",
        "orange",
        3215,
        Network::Res,
        "10.1.0.1",
    )
}

fn pool() -> (NodePool, GeoCatalog) {
    let mut geo = GeoCatalog::new();
    let decls = vec![
        decl(
            "ny1",
            "us",
            "new_york",
            "verizon",
            701,
            Network::Res,
            "10.0.1.1",
        ),
        decl(
            "ny2",
            "us",
            "new_york",
            "verizon",
            701,
            Network::Res,
            "10.0.1.2",
        ),
        decl(
            "ny3",
            "us",
            "new_york",
            "comcast",
            7922,
            Network::Res,
            "10.0.2.1",
        ),
        decl(
            "la1",
            "us",
            "los_angeles",
            "verizon",
            701,
            Network::Mob,
            "10.0.3.1",
        ),
        paris1(),
        decl("pa2", "fr", "paris", "free", 12322, Network::Dc, "10.1.1.1"),
    ];
    let p = NodePool::build(&decls, None, &mut geo);
    (p, geo)
}

fn f(geo: &GeoCatalog, country: &str, city: Option<&str>, isp: Option<&str>) -> Filter {
    let c = Country::parse(country);
    Filter {
        country: c,
        city: city.map(|x| geo.lookup(c, GeoKind::City, x).unwrap()),
        isp: isp.map(|x| geo.lookup(c, GeoKind::Isp, x).unwrap()),
        ..Filter::default()
    }
}

#[test]
fn picks_only_matching_online_nodes() {
    let (p, geo) = pool();
    let mut rng = Rng::new(1);
    let filter = f(&geo, "us", Some("new_york"), Some("verizon"));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let i = p.pick(&filter, &[], &mut rng, &geo).unwrap();
        seen.insert(p.node(i).id.to_string());
    }
    assert_eq!(seen, ["ny1", "ny2"].iter().map(|s| s.to_string()).collect());
    // Offline and draining nodes leave selection without a rebuild; back online returns.
    let (ny1, _) = p.get("ny1").unwrap();
    let (ny2, _) = p.get("ny2").unwrap();
    p.set_admin_state(ny1, NodeState::Offline);
    p.set_admin_state(ny2, NodeState::Draining);
    let e = p.pick(&filter, &[], &mut rng, &geo).unwrap_err();
    assert_eq!(e.code, Code::NodeNotFound);
    p.set_healthy(ny2, false);
    p.set_admin_state(ny2, NodeState::Online);
    assert!(
        p.pick(&filter, &[], &mut rng, &geo).is_err(),
        "unhealthy stays out"
    );
    p.set_healthy(ny2, true);
    assert_eq!(p.pick(&filter, &[], &mut rng, &geo).unwrap(), ny2);
    assert!(p.node(ny1).state() == NodeState::Offline);
    assert!(!p.node(ny1).serves_sessions());
    // Exclusion.
    assert!(p.pick(&filter, &[ny2], &mut rng, &geo).is_err());
}

#[test]
fn not_found_names_the_filter_that_emptied_the_set() {
    let (p, geo) = pool();
    let mut rng = Rng::new(2);
    let e = p.pick(
        &f(&geo, "fr", Some("paris"), Some("free")),
        &[],
        &mut rng,
        &geo,
    );
    assert!(e.is_ok());
    let mut g2 = geo.clone();
    let orange_us = g2.add(Country::parse("us").unwrap(), GeoKind::Isp, "orange");
    let filter = Filter {
        isp: Some(orange_us),
        ..f(&g2, "us", Some("new_york"), None)
    };
    let e = p.pick(&filter, &[], &mut rng, &g2).unwrap_err();
    assert_eq!(e.code, Code::NodeNotFound);
    assert_eq!(
        e.detail,
        "no online node for country=us city=new_york isp=orange; 3 online for country=us city=new_york"
    );
    let e = p
        .pick(
            &Filter {
                country: Country::parse("de"),
                ..Filter::default()
            },
            &[],
            &mut rng,
            &geo,
        )
        .unwrap_err();
    assert_eq!(
        e.detail,
        "no online node for country=de; 6 online in the pool"
    );
    let nets = Filter {
        networks: Some(NetworkSet::of([Network::Dc])),
        ..f(&geo, "us", None, None)
    };
    let e = p.pick(&nets, &[], &mut rng, &geo).unwrap_err();
    assert_eq!(
        e.detail,
        "no online node for country=us network=dc; 4 online for country=us"
    );
}

#[test]
fn selection_prefers_less_loaded_nodes() {
    let (p, geo) = pool();
    let mut rng = Rng::new(3);
    let filter = f(&geo, "us", Some("new_york"), None);
    let (ny1, n1) = p.get("ny1").unwrap();
    let _busy: Vec<_> = (0..50).map(|_| n1.runtime.open_tunnel()).collect();
    let picks = (0..3000)
        .filter(|_| p.pick(&filter, &[], &mut rng, &geo).unwrap() == ny1)
        .count();
    // Uniform would give ~1000 of 3000; two choices give ny1 only when both draws hit it (~1/9).
    assert!(picks < 500, "busy node picked {picks} times");
    assert!(picks > 150, "busy node still picked sometimes: {picks}");
    drop(_busy);
    assert_eq!(n1.runtime.active(), 0);
}

#[test]
fn lookalike_prefers_same_city_isp_asn_subnet() {
    let (p, geo) = pool();
    let mut rng = Rng::new(4);
    let (ny1, _) = p.get("ny1").unwrap();
    let (ny2, _) = p.get("ny2").unwrap();
    let filter = f(&geo, "us", None, None);
    for _ in 0..100 {
        assert_eq!(
            p.pick_lookalike(&filter, ny1, &[], &mut rng, &geo).unwrap(),
            ny2
        );
    }
    // Without ny2, the closest is ny3 (same city, other ISP), never the other city.
    let mut saw = std::collections::HashSet::new();
    for _ in 0..100 {
        saw.insert(
            p.pick_lookalike(&filter, ny1, &[ny2], &mut rng, &geo)
                .unwrap(),
        );
    }
    assert_eq!(saw.len(), 1);
    assert_eq!(p.node(*saw.iter().next().unwrap()).id.as_ref(), "ny3");
}

#[test]
fn rebuild_keeps_runtime_and_catalogue_counts() {
    let (p, mut geo) = pool();
    let (_, n) = p.get("pa1").unwrap();
    let _t = n.runtime.open_tunnel();
    let mut decls = vec![paris1()];
    decls.push(decl(
        "de1",
        "de",
        "berlin",
        "dtag",
        3320,
        Network::Res,
        "10.2.0.1",
    ));
    let p2 = NodePool::build(&decls, Some(&p), &mut geo);
    assert_eq!(p2.get("pa1").unwrap().1.runtime.active(), 1);
    assert_eq!(
        p2.get("pa1").unwrap().0,
        p.get("pa1").unwrap().0,
        "indices are stable"
    );
    assert_eq!(p2.get("de1").unwrap().0, 6, "new nodes are appended");
    assert!(p2.get("ny1").is_none(), "undeclared nodes are gone");
    assert_eq!(p2.iter().count(), 2);
    assert_eq!(p2.online_count(), 2);
    assert!(
        geo.lookup(Country::parse("de"), GeoKind::City, "berlin")
            .is_some()
    );
    assert!(
        geo.lookup(Country::parse("us"), GeoKind::City, "new_york")
            .is_some(),
        "names stay in the catalogue"
    );
    let (p, _) = pool();
    let counts = p.country_counts();
    assert_eq!(
        counts,
        vec![
            (Country::parse("fr").unwrap(), 2),
            (Country::parse("us").unwrap(), 4)
        ]
    );
    let (la, _) = p.get("la1").unwrap();
    p.set_admin_state(la, NodeState::Offline);
    let cities = p.name_counts(Country::parse("us").unwrap(), GeoKind::City);
    let la_id = geo
        .lookup(Country::parse("us"), GeoKind::City, "los_angeles")
        .unwrap();
    assert!(cities.contains(&(la_id, 0)), "{cities:?}");
    p.remove(la);
    assert!(p.get("la1").is_none());
    assert_eq!(p.iter().count(), 5);
}

#[test]
fn nodes_that_just_failed_are_avoided_while_others_match() {
    let (p, geo) = pool();
    let mut rng = Rng::new(5);
    let filter = f(&geo, "us", Some("new_york"), Some("verizon"));
    let (ny1, n1) = p.get("ny1").unwrap();
    n1.runtime.record_failure(crate::Now::from_secs(1));
    let hits = (0..2000)
        .filter(|_| p.pick(&filter, &[], &mut rng, &geo).unwrap() == ny1)
        .count();
    // Two draws plus six more: the failed node wins only when all eight hit it (1/256).
    assert!(hits < 40, "{hits}");
    n1.runtime.record_success();
    let hits = (0..2000)
        .filter(|_| p.pick(&filter, &[], &mut rng, &geo).unwrap() == ny1)
        .count();
    assert!(hits > 700, "recovered: {hits}");
}

#[test]
fn a_node_that_failed_once_gets_its_share_again() {
    // 1. Two nodes match; one fails once and is never tried again.
    // 2. While its failure is fresh it loses nearly every draw.
    // 3. Once the failure is older than FAILURE_MEMORY with none after it,
    //    the node is chosen about half the time again.
    let (p, geo) = pool();
    let mut rng = Rng::new(11);
    let filter = f(&geo, "us", Some("new_york"), Some("verizon"));
    assert_eq!(
        p.count(&filter),
        2,
        "the fixture has two Verizon nodes in New York"
    );
    let (ny1, n1) = p.get("ny1").unwrap();
    let failed_at = crate::Now::from_secs(100);
    n1.runtime.record_failure(failed_at);
    let share = |rng: &mut Rng| {
        (0..1000)
            .filter(|_| p.pick(&filter, &[], rng, &geo).unwrap() == ny1)
            .count()
    };
    assert!(share(&mut rng) < 50, "a fresh failure weighs on selection");
    let within = failed_at.0 + FAILURE_MEMORY.as_nanos() as u64 - 1;
    assert_eq!(p.forget_failures(crate::Now(within)), 0);
    assert!(share(&mut rng) < 50);
    let after = failed_at.0 + FAILURE_MEMORY.as_nanos() as u64;
    assert_eq!(p.forget_failures(crate::Now(after)), 1);
    let hits = share(&mut rng);
    assert!(
        (430..=570).contains(&hits),
        "recovered share: {hits} of 1000"
    );
}

/// An agent node in Paris on Orange, with the key `key`.
fn agent(id: &str, key: &str) -> NodeDecl {
    NodeDecl {
        kind: NodeKind::Agent,
        bind: None,
        key_hash: Some(hash_agent_key(key)),
        ..decl(id, "fr", "paris", "orange", 3215, Network::Res, "0.0.0.0")
    }
}

fn paris(geo: &GeoCatalog) -> Filter {
    f(geo, "fr", Some("paris"), Some("orange"))
}

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn an_agent_node_is_selectable_only_while_its_device_is_connected() {
    let mut geo = GeoCatalog::new();
    let p = NodePool::build(&[agent("dev-1", "k")], None, &mut geo);
    let mut rng = Rng::new(21);
    let (idx, n) = p.get("dev-1").unwrap();
    assert_eq!(
        n.state(),
        NodeState::Offline,
        "a new agent node starts absent"
    );
    assert_eq!(n.admin_state(), NodeState::Online);
    assert!(n.runtime.agent().snapshot().is_none());
    assert!(n.exit_ip().is_none());
    assert!(p.pick(&paris(&geo), &[], &mut rng, &geo).is_err());
    assert_eq!(p.online_count(), 0);

    let g1 = p.agent_up(idx, sock("203.0.113.7:40000"), "1.2.3", 1_000);
    assert_ne!(g1, 0);
    assert_eq!(n.state(), NodeState::Online);
    assert_eq!(p.pick(&paris(&geo), &[], &mut rng, &geo).unwrap(), idx);
    assert_eq!(n.exit_ip(), Some("203.0.113.7".parse().unwrap()));
    assert_eq!(p.agents_connected(), 1);

    // A reconnect on a new connection replaces the old one; the old
    // connection's late end changes nothing.
    let g2 = p.agent_up(idx, sock("203.0.113.8:40001"), "1.2.4", 2_000);
    assert_ne!(g1, g2, "each connection has its own generation");
    p.agent_down(idx, g1);
    assert_eq!(
        n.state(),
        NodeState::Online,
        "a stale generation does nothing"
    );
    assert_eq!(p.pick(&paris(&geo), &[], &mut rng, &geo).unwrap(), idx);
    assert_eq!(n.exit_ip(), Some("203.0.113.8".parse().unwrap()));

    // The current connection's end takes it out.
    p.agent_down(idx, g2);
    assert_eq!(n.state(), NodeState::Offline);
    assert!(!n.serves_sessions());
    assert!(p.pick(&paris(&geo), &[], &mut rng, &geo).is_err());
    assert!(n.runtime.agent().snapshot().is_none());
    assert!(n.exit_ip().is_none());
    assert_eq!(p.agents_connected(), 0);
    p.agent_down(idx, g2);
    assert_eq!(n.state(), NodeState::Offline, "a second end is harmless");
}

#[test]
fn operator_states_win_over_an_agents_presence() {
    let mut geo = GeoCatalog::new();
    let p = NodePool::build(&[agent("dev-1", "k")], None, &mut geo);
    let mut rng = Rng::new(22);
    let (idx, n) = p.get("dev-1").unwrap();
    p.set_admin_state(idx, NodeState::Offline);
    let g = p.agent_up(idx, sock("198.51.100.1:1"), "v", 1);
    assert_eq!(
        n.state(),
        NodeState::Offline,
        "operator offline stays offline"
    );
    assert_eq!(n.admin_state(), NodeState::Offline);
    assert!(
        n.runtime.agent().snapshot().is_some(),
        "but it is connected"
    );
    assert!(p.pick(&paris(&geo), &[], &mut rng, &geo).is_err());

    p.set_admin_state(idx, NodeState::Draining);
    assert_eq!(n.state(), NodeState::Draining, "draining stays draining");
    assert!(n.serves_sessions());
    assert!(p.pick(&paris(&geo), &[], &mut rng, &geo).is_err());

    p.set_admin_state(idx, NodeState::Online);
    assert_eq!(p.pick(&paris(&geo), &[], &mut rng, &geo).unwrap(), idx);

    p.agent_down(idx, g);
    p.set_admin_state(idx, NodeState::Draining);
    assert_eq!(
        n.state(),
        NodeState::Offline,
        "a draining agent without its device serves nothing"
    );

    // Health flags do not apply to agents: presence is their health.
    let g = p.agent_up(idx, sock("198.51.100.1:2"), "v", 2);
    p.set_admin_state(idx, NodeState::Online);
    p.set_healthy(idx, false);
    assert_eq!(n.state(), NodeState::Online);
    p.agent_down(idx, g);
    p.agent_up(idx, sock("198.51.100.1:3"), "v", 3);
    p.remove(idx);
    assert!(
        n.runtime.agent().snapshot().is_none(),
        "a deleted node's connection no longer counts"
    );
    assert_eq!(
        p.agent_up(idx, sock("198.51.100.1:4"), "v", 4),
        0,
        "a deleted node takes no connection"
    );
    assert_eq!(n.state(), NodeState::Offline, "a deleted node stays out");
    assert!(p.get("dev-1").is_none());

    // Created again under its id (same slot, same runtime): absent until
    // its device connects again.
    let p2 = NodePool::build(&[agent("dev-1", "k")], Some(&p), &mut geo);
    let (_, n2) = p2.get("dev-1").unwrap();
    assert!(Arc::ptr_eq(&n.runtime, &n2.runtime));
    assert_eq!(n2.state(), NodeState::Offline);
    // A file reload that drops it clears its presence too.
    let g = p2.agent_up(idx, sock("198.51.100.1:5"), "v", 5);
    assert_ne!(g, 0);
    let p3 = NodePool::build(&[], Some(&p2), &mut geo);
    assert!(p3.get("dev-1").is_none());
    assert!(n2.runtime.agent().snapshot().is_none());
}

#[test]
fn presence_survives_a_rebuild_and_a_late_snapshot_is_brought_in_line() {
    let (p, mut geo) = pool();
    let decls = |extra: bool| {
        let mut d = vec![agent("dev-1", "k")];
        if extra {
            d.push(agent("dev-2", "k2"));
        }
        d
    };
    let p1 = NodePool::build(&decls(false), Some(&p), &mut geo);
    let (idx, _) = p1.get("dev-1").unwrap();
    p1.agent_up(idx, sock("192.0.2.1:5"), "v", 5);
    let p2 = NodePool::build(&decls(true), Some(&p1), &mut geo);
    assert_eq!(p2.get("dev-1").unwrap().0, idx, "same index");
    assert_eq!(p2.node(idx).state(), NodeState::Online, "still connected");
    assert_eq!(p2.count(&paris(&geo)), 1, "selectable in the new pool");
    let (idx2, n2) = p2.get("dev-2").unwrap();
    assert_eq!(
        n2.state(),
        NodeState::Offline,
        "a new agent node starts absent"
    );

    // A device that connects after the next pool was built but before it
    // is published marks the old pool only; sync_agents catches the new one up.
    let p3 = NodePool::build(&decls(true), Some(&p2), &mut geo);
    let g = p2.agent_up(idx2, sock("192.0.2.2:6"), "v", 6);
    assert_eq!(p2.count(&paris(&geo)), 2);
    assert_eq!(p3.count(&paris(&geo)), 1, "built before the device came");
    assert_eq!(p3.sync_agents(), 1);
    assert_eq!(p3.count(&paris(&geo)), 2);
    assert_eq!(p3.sync_agents(), 0, "nothing more to do");
    p3.agent_down(idx2, g);
    assert_eq!(p3.count(&paris(&geo)), 1);
    assert_eq!(p2.sync_agents(), 1, "the old pool follows too");
}

#[test]
fn agent_keys_are_kept_hashed_and_compared_as_hashes() {
    // SHA-256("abc"), FIPS 180-2.
    assert_eq!(
        hash_to_hex(&hash_agent_key("abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let h = hash_agent_key("ak_secret");
    assert_eq!(hash_from_hex(&hash_to_hex(&h)), Some(h));
    assert_eq!(hash_from_hex(&hash_to_hex(&h).to_uppercase()), Some(h));
    assert_eq!(hash_from_hex("ab"), None);
    assert_eq!(hash_from_hex(&"g".repeat(64)), None);

    let mut geo = GeoCatalog::new();
    let mut keyless = agent("dev-2", "x");
    keyless.key_hash = None;
    let p = NodePool::build(
        &[agent("dev-1", "ak_secret"), keyless, paris1()],
        None,
        &mut geo,
    );
    let (idx, n) = p.get("dev-1").unwrap();
    assert!(n.agent_key_matches("ak_secret"));
    assert!(!n.agent_key_matches("ak_secreT"));
    assert!(!n.agent_key_matches(""));
    assert!(!n.agent_key_matches("ak_secret "));
    assert!(!p.get("dev-2").unwrap().1.agent_key_matches("x"), "no key");
    let direct = p.get("pa1").unwrap().1;
    assert!(!direct.agent_key_matches(""), "not an agent");
    let debug = format!("{n:?} {:?}", agent("dev-1", "ak_secret"));
    assert!(!debug.contains(&hash_to_hex(&h)), "{debug}");
    assert!(
        !debug.contains(&format!("{h:?}")),
        "no hash bytes either: {debug}"
    );
    assert!(debug.contains("key_hash: Some(\"***\")"), "{debug}");
    p.remove(idx);
    assert!(
        !n.agent_key_matches("ak_secret"),
        "a deleted node takes no key"
    );
}

#[test]
fn agent_figures_count_per_connection_without_locks() {
    let mut geo = GeoCatalog::new();
    let p = NodePool::build(&[agent("dev-1", "k")], None, &mut geo);
    let (idx, n) = p.get("dev-1").unwrap();
    let a = n.runtime.agent();
    a.add_bytes(5, 7);
    assert!(a.snapshot().is_none(), "nothing shows while absent");
    let g = p.agent_up(idx, sock("[::ffff:203.0.113.9]:7000"), "1.0\n\u{7}x", 1_700);
    a.add_bytes(10, 20);
    a.add_bytes(1, 0);
    a.stream_opened();
    a.stream_opened();
    a.stream_closed();
    a.set_rtt_us(12_500);
    let s = a.snapshot().unwrap();
    assert_eq!(
        s,
        AgentSnapshot {
            since_unix_ms: 1_700,
            addr: sock("203.0.113.9:7000"),
            streams: 1,
            bytes_up: 11,
            bytes_down: 20,
            rtt_ms: 12.5,
            version: "1.0x".into(),
        },
        "bytes of this connection only; the mapped address as IPv4; no control characters"
    );
    // A reconnect starts bytes and round trip over; open streams stay
    // until they close.
    p.agent_up(idx, sock("203.0.113.9:7001"), &"v".repeat(500), 1_800);
    let s = a.snapshot().unwrap();
    assert_eq!(
        (s.bytes_up, s.bytes_down, s.rtt_ms, s.streams),
        (0, 0, 0.0, 1)
    );
    assert_eq!(s.version.len(), MAX_AGENT_VERSION);
    a.stream_closed();
    a.stream_closed();
    assert_eq!(a.snapshot().unwrap().streams, 0, "never below zero");
    p.agent_down(idx, g);
    assert!(
        a.snapshot().is_some(),
        "the old generation's end is ignored"
    );

    // From many threads at once.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..1000 {
                    a.add_bytes(1, 2);
                    a.stream_opened();
                    a.stream_closed();
                }
            });
        }
    });
    let s = a.snapshot().unwrap();
    assert_eq!((s.bytes_up, s.bytes_down, s.streams), (4000, 8000, 0));
}

#[test]
fn a_lookalike_of_an_agent_prefers_agents_in_its_subnet_now() {
    let mut geo = GeoCatalog::new();
    let decls = [agent("a1", "k"), agent("a2", "k"), agent("a3", "k")];
    let p = NodePool::build(&decls, None, &mut geo);
    let mut rng = Rng::new(23);
    let idx = |id| p.get(id).unwrap().0;
    p.agent_up(idx("a1"), sock("203.0.113.10:1"), "v", 1);
    p.agent_up(idx("a2"), sock("198.51.100.20:1"), "v", 1);
    p.agent_up(idx("a3"), sock("203.0.113.30:1"), "v", 1);
    for _ in 0..50 {
        assert_eq!(
            p.pick_lookalike(&paris(&geo), idx("a1"), &[], &mut rng, &geo)
                .unwrap(),
            idx("a3"),
            "same /24 as a1 now"
        );
    }
    // a3's device moves to another network: no subnet match any more.
    p.agent_up(idx("a3"), sock("192.0.2.30:1"), "v", 2);
    let mut saw = std::collections::HashSet::new();
    for _ in 0..100 {
        saw.insert(
            p.pick_lookalike(&paris(&geo), idx("a1"), &[], &mut rng, &geo)
                .unwrap(),
        );
    }
    assert_eq!(saw.len(), 2, "{saw:?}");
}

// ---- incremental changes (with_node / without_node) ----

/// Everything a pool holds, names resolved through its catalogue, so two
/// pools built on different catalogues compare.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    len: usize,
    nodes: Vec<String>,
    by_id: Vec<(String, NodeIdx)>,
    attrs: Vec<(String, Vec<u32>)>,
    subnet: Vec<(u64, Vec<u32>)>,
    networks: Vec<Vec<u32>>,
    agents: Vec<u32>,
    udp: Vec<u32>,
    selectable: Vec<u32>,
    geo: Vec<Vec<(Country, String)>>,
}

fn fingerprint(p: &NodePool, geo: &GeoCatalog) -> Fingerprint {
    let name = |v: Option<NameId>| v.map(|v| geo.name(v).to_string());
    let bits = |b: &RoaringBitmap| b.iter().collect::<Vec<u32>>();
    let nodes = p
        .nodes
        .iter()
        .map(|n| {
            format!(
                "{} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {} {} {:?} {:?} {:?} {}",
                n.id,
                n.kind,
                n.addr,
                n.bind,
                n.credentials,
                n.country,
                name(n.region),
                name(n.city),
                name(n.isp),
                n.asn,
                n.network,
                n.from_file,
                n.udp,
                n.key_hash,
                n.state(),
                n.admin_state(),
                n.is_removed(),
            )
        })
        .collect();
    let mut by_id: Vec<_> = p.by_id.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    by_id.sort();
    let mut attrs = Vec::new();
    for (c, b) in &p.country {
        attrs.push((format!("country {c}"), bits(b)));
    }
    for (kind, map) in [("region", &p.region), ("city", &p.city), ("isp", &p.isp)] {
        for (v, b) in map {
            attrs.push((format!("{kind} {}", geo.name(*v)), bits(b)));
        }
    }
    for (a, b) in &p.asn {
        attrs.push((format!("asn {a}"), bits(b)));
    }
    attrs.sort();
    let mut subnet: Vec<_> = p.subnet.iter().map(|(k, b)| (*k, bits(b))).collect();
    subnet.sort();
    let geo = [GeoKind::Region, GeoKind::City, GeoKind::Isp]
        .into_iter()
        .map(|k| {
            let mut v: Vec<_> = geo
                .entries(k)
                .into_iter()
                .map(|(c, n)| (c, n.to_string()))
                .collect();
            v.sort();
            v
        })
        .collect();
    Fingerprint {
        len: p.len(),
        nodes,
        by_id,
        attrs,
        subnet,
        networks: p.networks.iter().map(bits).collect(),
        agents: bits(&p.agents),
        udp: bits(&p.udp),
        selectable: bits(&p.selectable.load()),
        geo,
    }
}

/// A random declaration of node `id` from small sets of values, so
/// changes share and empty attribute values and subnets.
fn random_decl(id: &str, rng: &mut Rng) -> NodeDecl {
    let pick = |rng: &mut Rng, v: &[&str]| v[rng.below(v.len() as u64) as usize].to_string();
    let country = pick(rng, &["us", "fr", "de", "br"]);
    let mut d = decl(
        id,
        &country,
        &pick(rng, &["alpha", "beta", "gamma", "delta", "epsilon"]),
        &pick(rng, &["isp_a", "isp_b", "isp_c"]),
        [701, 3215, 7922, 12322][rng.below(4) as usize],
        [Network::Res, Network::Mob, Network::Dc][rng.below(3) as usize],
        &format!("10.{}.{}.{}", rng.below(3), rng.below(40), rng.below(250)),
    );
    if rng.below(3) == 0 {
        d.region = Some(pick(rng, &["north", "south"]));
    }
    if rng.below(5) == 0 {
        d.city = None;
    }
    if rng.below(6) == 0 {
        d.country = None;
    }
    d.state = [
        NodeState::Online,
        NodeState::Online,
        NodeState::Draining,
        NodeState::Offline,
    ][rng.below(4) as usize];
    match rng.below(6) {
        0 => {
            d.kind = NodeKind::Agent;
            d.bind = None;
            d.key_hash = Some(hash_agent_key(id));
        }
        1 => {
            d.kind = NodeKind::Socks5;
            d.addr = d.bind.map(|ip| SocketAddr::new(ip, 1080));
            d.bind = None;
            d.udp = rng.below(2) == 0;
        }
        2 => {
            d.kind = NodeKind::Http;
            d.addr = d.bind.map(|ip| SocketAddr::new(ip, 3128));
            d.bind = None;
            d.credentials = Some(("u".into(), "p".into()));
        }
        _ => {}
    }
    d
}

/// Random creates, patches (every field, state too), deletes and
/// re-creations of deleted ids, with health and agent events between
/// them: a pool changed one node at a time stays, at every step, the pool
/// a full build of the same declarations on the previous pool gives (same
/// indices, index, selection and catalogue), and at the end selects what
/// a build from nothing of those declarations selects.
#[test]
fn incremental_changes_give_the_pool_a_full_build_gives() {
    let mut rng = Rng::new(4242);
    // Just under two segments, four id shards: creates cross a segment.
    let initial = 2 * SEGMENT - 2;
    let mut decls: Vec<NodeDecl> = (0..initial)
        .map(|i| random_decl(&format!("n{i}"), &mut rng))
        .collect();
    let (mut geo_a, mut geo_b) = (GeoCatalog::new(), GeoCatalog::new());
    let mut a = NodePool::build(&decls, None, &mut geo_a);
    let mut b = NodePool::build(&decls, None, &mut geo_b);
    assert!(a.by_id.shards.len() > 1 && a.nodes.segments.len() == 2);
    assert_eq!(fingerprint(&a, &geo_a), fingerprint(&b, &geo_b));
    let mut deleted: Vec<String> = Vec::new();
    let mut next_id = initial;
    for step in 0..160 {
        // Runtime events, the same on both (indices are the same).
        for _ in 0..3 {
            let i = rng.below(a.len() as u64) as NodeIdx;
            match rng.below(3) {
                0 => {
                    let healthy = rng.below(2) == 0;
                    a.set_healthy(i, healthy);
                    b.set_healthy(i, healthy);
                }
                _ => {
                    let addr = sock(&format!("10.9.{}.7:1", rng.below(3)));
                    a.agent_up(i, addr, "v", 1);
                    b.agent_up(i, addr, "v", 1);
                }
            }
        }
        let op = rng.below(10);
        if op < 3 || decls.is_empty() {
            // Create: a new id, or one deleted before (its tombstone's slot).
            let id = if op == 0 && !deleted.is_empty() {
                deleted.swap_remove(rng.below(deleted.len() as u64) as usize)
            } else {
                next_id += 1;
                format!("n{next_id}")
            };
            let d = random_decl(&id, &mut rng);
            let (next, idx) = a.with_node(&d, &mut geo_a);
            assert!(
                !next.selectable.load().contains(idx),
                "not before the commit"
            );
            next.set_admin_state(idx, d.state);
            assert_eq!(next.get(&id).unwrap().0, idx);
            a = next;
            decls.push(d);
        } else if op < 7 {
            let k = rng.below(decls.len() as u64) as usize;
            let mut d = random_decl(&decls[k].id, &mut rng);
            if rng.below(3) == 0 {
                // A patch of the state alone, or of one field.
                d = NodeDecl {
                    state: d.state,
                    ..decls[k].clone()
                };
            }
            let (next, idx) = a.with_node(&d, &mut geo_a);
            next.set_admin_state(idx, d.state);
            a = next;
            decls[k] = d;
        } else {
            let k = rng.below(decls.len() as u64) as usize;
            let d = decls.remove(k);
            let (next, idx) = a.without_node(&d.id).unwrap();
            assert!(
                !next.selectable.load().contains(idx),
                "out of the new pool's selection before the commit"
            );
            a.remove(idx);
            next.remove(idx);
            a = next;
            deleted.push(d.id);
        }
        b = NodePool::build(&decls, Some(&b), &mut geo_b);
        b.sync_agents();
        assert_eq!(
            fingerprint(&a, &geo_a),
            fingerprint(&b, &geo_b),
            "step {step}"
        );
    }
    // A build from nothing (fresh runtimes): bring the runtime state of
    // `a` to a fresh one's, then compare by id.
    for (i, n) in a.iter() {
        a.set_healthy(i, true);
        n.runtime.agent.clear();
    }
    a.sync_agents();
    let mut geo_c = GeoCatalog::new();
    let c = NodePool::build(&decls, None, &mut geo_c);
    let ids = |p: &NodePool, set: &RoaringBitmap| {
        let mut v: Vec<String> = set.iter().map(|i| p.node(i).id.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(a.iter().count(), c.iter().count());
    assert_eq!(a.online_count(), c.online_count());
    for d in &decls {
        let (ia, na) = a.get(&d.id).unwrap();
        let (_, nc) = c.get(&d.id).unwrap();
        assert_eq!(
            format!("{na:?}"),
            format!("{nc:?}").replace(&format!("{:?}", nc.runtime), &format!("{:?}", na.runtime))
        );
        assert_eq!(a.node(ia).state(), nc.state(), "{}", d.id);
    }
    let mut filters = vec![Filter::default()];
    for country in ["us", "fr", "de", "br"] {
        let cc = Country::parse(country);
        filters.push(Filter {
            country: cc,
            ..Filter::default()
        });
        for (kind, names) in [
            (
                GeoKind::City,
                &["alpha", "beta", "gamma", "delta", "epsilon"][..],
            ),
            (GeoKind::Isp, &["isp_a", "isp_b", "isp_c"][..]),
        ] {
            for name in names {
                let (va, vc) = (geo_a.lookup(cc, kind, name), geo_c.lookup(cc, kind, name));
                if va.is_none() || vc.is_none() {
                    continue;
                }
                let mut fa = Filter {
                    country: cc,
                    ..Filter::default()
                };
                let mut fc = fa;
                match kind {
                    GeoKind::City => (fa.city, fc.city) = (va, vc),
                    _ => (fa.isp, fc.isp) = (va, vc),
                }
                assert_eq!(ids(&a, &a.candidates(&fa)), ids(&c, &c.candidates(&fc)));
            }
        }
    }
    for asn in [701, 3215, 7922, 12322] {
        filters.push(Filter {
            asn: Some(asn),
            ..Filter::default()
        });
    }
    for set in 0..8u8 {
        filters.push(Filter {
            networks: Some(NetworkSet(set)),
            udp: set % 2 == 0,
            ..Filter::default()
        });
    }
    for f in &filters {
        assert_eq!(
            ids(&a, &a.candidates(f)),
            ids(&c, &c.candidates(f)),
            "{f:?}"
        );
        assert_eq!(a.count(f), c.count(f));
    }
    assert_eq!(a.country_counts(), c.country_counts());
}

#[test]
fn a_derived_pool_shares_what_the_change_does_not_touch() {
    let mut geo = GeoCatalog::new();
    let decls: Vec<NodeDecl> = (0..3 * SEGMENT)
        .map(|i| {
            decl(
                &format!("n{i}"),
                "us",
                "new_york",
                "verizon",
                701,
                Network::Res,
                &format!("10.{}.{}.1", i / 250, i % 250),
            )
        })
        .collect();
    let p = NodePool::build(&decls, None, &mut geo);
    let mut d = decls[5].clone();
    d.city = Some("boston".into());
    let (q, idx) = p.with_node(&d, &mut geo);
    assert_eq!(idx, 5);
    // The touched segment and id shard are copies, the others shared.
    assert!(!Arc::ptr_eq(&p.nodes.segments[0], &q.nodes.segments[0]));
    assert!(Arc::ptr_eq(&p.nodes.segments[1], &q.nodes.segments[1]));
    let shared = p
        .by_id
        .shards
        .iter()
        .zip(&q.by_id.shards)
        .filter(|(x, y)| Arc::ptr_eq(x, y))
        .count();
    assert_eq!(shared, p.by_id.shards.len(), "a patch adds no id");
    let us = Country::parse("us").unwrap();
    let verizon = geo.lookup(Some(us), GeoKind::Isp, "verizon").unwrap();
    let new_york = geo.lookup(Some(us), GeoKind::City, "new_york").unwrap();
    assert!(Arc::ptr_eq(&p.isp[&verizon], &q.isp[&verizon]));
    assert!(Arc::ptr_eq(&p.country[&us], &q.country[&us]));
    assert!(!Arc::ptr_eq(&p.city[&new_york], &q.city[&new_york]));
    // Nothing live changed on the pool before; the runtime is shared.
    assert_eq!(p.node(5).city, Some(new_york));
    assert!(Arc::ptr_eq(&p.node(5).runtime, &q.node(5).runtime));
    // The new name is in the catalogue, for rules to name.
    let boston = geo.lookup(Some(us), GeoKind::City, "boston").unwrap();
    let f = Filter {
        country: Some(us),
        city: Some(boston),
        ..Filter::default()
    };
    assert_eq!(q.count(&f), 1);
    assert_eq!(p.count(&f), 0);
    // A create appends; a delete leaves a tombstone out of selection.
    let (r, new) = q.with_node(
        &decl(
            "x",
            "us",
            "boston",
            "verizon",
            701,
            Network::Res,
            "10.200.0.1",
        ),
        &mut geo,
    );
    assert_eq!(new as usize, 3 * SEGMENT);
    assert_eq!(r.count(&f), 1, "not selectable before its state is set");
    r.set_admin_state(new, NodeState::Online);
    assert_eq!(r.count(&f), 2);
    assert_eq!(q.count(&f), 1);
    let (s, gone) = r.without_node("n5").unwrap();
    assert_eq!(gone, 5);
    assert_eq!(s.count(&f), 1);
    assert!(r.get("n5").is_some(), "not removed before the commit");
    s.remove(gone);
    assert!(s.get("n5").is_none() && r.get("n5").is_none());
    assert_eq!(s.len(), r.len());
    assert!(s.without_node("nope").is_none());
}

#[test]
fn a_derived_pool_catches_up_with_what_changed_on_the_one_before() {
    let (p, mut geo) = pool();
    let (ny1, _) = p.get("ny1").unwrap();
    let (ny3, _) = p.get("ny3").unwrap();
    let mut d = paris1();
    d.isp = Some("sfr".into());
    let (q, pa1) = p.with_node(&d, &mut geo);
    // Meanwhile a health check takes ny1 out, and ny3 goes offline, on
    // the pool still published.
    p.set_healthy(ny1, false);
    p.set_admin_state(ny3, NodeState::Offline);
    q.set_admin_state(pa1, NodeState::Online);
    let us = f(&geo, "us", None, None);
    assert_eq!(q.count(&us), 4, "not seen yet");
    assert_eq!(q.catch_up(&p), 2);
    assert_eq!(q.count(&us), 2);
    assert_eq!(q.catch_up(&p), 0, "once");
    assert_eq!(p.catch_up(&q), 0, "a built pool has nothing to catch up");
}

/// A filter that names every attribute a pick can intersect (country,
/// region, city, ISP, ASN, networks and UDP) gets the one node that has
/// them all, by the sampling path and by the full intersection.
#[test]
fn a_filter_naming_every_attribute_picks_the_node_with_them_all() {
    let mut geo = GeoCatalog::new();
    let mut full = decl(
        "all",
        "us",
        "new_york",
        "verizon",
        701,
        Network::Mob,
        "10.0.9.1",
    );
    full.region = Some("ny".into());
    // A direct node always carries UDP; a socks5 node only when it says so.
    let mut no_udp = full.clone();
    no_udp.id = "no_udp".into();
    no_udp.kind = NodeKind::Socks5;
    no_udp.addr = Some(sock("10.0.9.2:1080"));
    no_udp.bind = None;
    no_udp.udp = false;
    let mut other_net = full.clone();
    other_net.id = "other_net".into();
    other_net.network = Network::Res;
    other_net.bind = Some("10.0.9.3".parse().unwrap());
    let p = NodePool::build(&[full, no_udp, other_net], None, &mut geo);
    let c = Country::parse("us");
    let filter = Filter {
        country: c,
        region: geo.lookup(c, GeoKind::Region, "ny"),
        city: geo.lookup(c, GeoKind::City, "new_york"),
        isp: geo.lookup(c, GeoKind::Isp, "verizon"),
        asn: Some(701),
        networks: Some(NetworkSet::of([Network::Mob])),
        udp: true,
    };
    assert!(filter.region.is_some() && filter.city.is_some() && filter.isp.is_some());
    let mut rng = Rng::new(7);
    for _ in 0..50 {
        let i = p.pick(&filter, &[], &mut rng, &geo).expect("the node");
        assert_eq!(&*p.node(i).id, "all");
    }
    assert_eq!(p.count(&filter), 1);
}

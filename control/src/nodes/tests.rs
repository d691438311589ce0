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

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

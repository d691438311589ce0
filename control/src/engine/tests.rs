use super::*;
use crate::policy::tests::{decls, node};
use crate::policy::{Credentials, Hello, Protocol};

/// A target as a client would send it.
fn target(host: &str, port: u16) -> splicegate_addr::Target {
    let h = splicegate_addr::parse_host(host.as_bytes()).expect("host parses");
    splicegate_addr::Target::new(h, port)
}

fn engine() -> Engine {
    Engine::new(Policy::build(&decls(), None).unwrap(), 10_000)
}

fn admitted(e: &Engine, username: &str) -> Admitted {
    let p = e.policy();
    let hello = Hello {
        client_ip: "1.1.1.1".parse().unwrap(),
        credentials: Credentials::Present {
            username,
            password: "pk_7",
        },
        listener_package: None,
    };
    let auth = p.authenticate(&hello).unwrap();
    p.admit(
        &auth,
        Protocol::Https,
        &target("93.184.216.34", 443),
        &mut None,
        Now::from_secs(1),
    )
    .unwrap()
}

#[test]
fn sessions_stick_and_rotating_spreads() {
    let e = engine();
    let p = e.policy_arc();
    let mut rng = Rng::new(9);
    let adm = admitted(&e, "package-7-country-us-session-s1");
    let first = e
        .route(&p, &adm, Now::from_secs(1), &mut rng)
        .unwrap()
        .node();
    for i in 0..50 {
        assert_eq!(
            e.route(&p, &adm, Now::from_secs(2 + i), &mut rng)
                .unwrap()
                .node(),
            first
        );
    }
    let rot = admitted(&e, "package-7-country-us");
    let spread: std::collections::HashSet<_> = (0..100)
        .map(|i| {
            e.route(&p, &rot, Now::from_secs(i), &mut rng)
                .unwrap()
                .node()
        })
        .collect();
    assert_eq!(spread.len(), 3);
    assert_eq!(p.packages[&7].usage.totals().requests, 151);
}

#[test]
fn a_failed_session_node_is_replaced_and_the_session_follows() {
    let e = engine();
    let p = e.policy_arc();
    let mut rng = Rng::new(10);
    let adm = admitted(&e, "package-7-country-us-city-new_york-session-s2");
    let mut route = e.route(&p, &adm, Now::from_secs(1), &mut rng).unwrap();
    let first = route.node();
    let Step::Dial(next) = e.after_failure(&mut route, &mut rng, Now::from_secs(1)) else {
        panic!()
    };
    assert_ne!(next, first);
    e.established(&route, Now::from_secs(1));
    assert_eq!(
        e.route(&p, &adm, Now::from_secs(2), &mut rng)
            .unwrap()
            .node(),
        next
    );
    // Both new_york nodes failing: no third matches, so NODE_NOT_FOUND names it.
    let mut route = e.route(&p, &adm, Now::from_secs(3), &mut rng).unwrap();
    let _ = e.after_failure(&mut route, &mut rng, Now::from_secs(1));
    match e.after_failure(&mut route, &mut rng, Now::from_secs(1)) {
        Step::Fail(r) => {
            assert_eq!(r.code, Code::NodeNotFound);
            assert!(r.detail.contains("failed"), "{}", r.detail);
        }
        s => panic!("{s:?}"),
    }
}

#[test]
fn an_offline_bound_node_fails_without_a_dial() {
    let e = engine();
    let p = e.policy_arc();
    let mut rng = Rng::new(11);
    let adm = admitted(&e, "package-7-country-us-session-b1-bind-node");
    let route = e.route(&p, &adm, Now::from_secs(1), &mut rng).unwrap();
    p.nodes
        .set_admin_state(route.node(), crate::nodes::NodeState::Offline);
    let mut route = e.route(&p, &adm, Now::from_secs(2), &mut rng).unwrap();
    match e.first_step(&mut route, &mut rng) {
        Step::Fail(r) => assert_eq!(r.code, Code::BoundNodeFailed),
        s => panic!("{s:?}"),
    }
    // A draining node keeps its sessions.
    let adm = admitted(&e, "package-7-country-us-session-d1");
    let route = e.route(&p, &adm, Now::from_secs(1), &mut rng).unwrap();
    p.nodes
        .set_admin_state(route.node(), crate::nodes::NodeState::Draining);
    let mut again = e.route(&p, &adm, Now::from_secs(2), &mut rng).unwrap();
    assert_eq!(e.first_step(&mut again, &mut rng), Step::Dial(route.node()));
}

#[test]
fn explain_reports_rules_code_and_matches() {
    let e = engine();
    let x = e.explain("package-7-country-us-city-new_york-session-abc");
    assert!(x.rejection.is_none(), "{:?}", x.rejection);
    assert_eq!(x.matching_nodes, 2);
    assert_eq!(x.rules.as_ref().unwrap().session_length(), 360);
    assert_eq!(
        x.canonical.as_deref(),
        Some("package-7-country-us-city-new_york-session-abc")
    );
    assert_eq!(
        e.explain("package-7-contry-us").rejection.unwrap().code,
        Code::ErrUnknownParam
    );
    assert_eq!(
        e.explain("package-10-country-us").rejection.unwrap().code,
        Code::PackagePaused
    );
    assert_eq!(
        e.explain("package-99-country-us").rejection.unwrap().code,
        Code::AuthFailed
    );
    assert_eq!(
        e.explain("package-7-country-gb").rejection.unwrap().code,
        Code::NodeNotFound
    );
    assert_eq!(
        e.explain("package-15-country-us").rejection,
        None,
        "usage below cap here"
    );
}

#[test]
fn publishing_a_policy_keeps_sessions_and_nodes() {
    let e = engine();
    let mut rng = Rng::new(12);
    let adm = admitted(&e, "package-7-country-us-session-k");
    let n = e
        .route(&e.policy_arc(), &adm, Now::from_secs(1), &mut rng)
        .unwrap()
        .node();
    let mut d = decls();
    d.nodes.push(node("ny3", "new_york", "10.0.0.3"));
    e.publish(Policy::build(&d, Some(&e.policy())).unwrap());
    let p = e.policy_arc();
    assert_eq!(p.nodes.len(), 4);
    assert_eq!(
        e.route(&p, &adm, Now::from_secs(2), &mut rng)
            .unwrap()
            .node(),
        n,
        "indices are stable across rebuilds"
    );
}

#[test]
fn a_device_that_connects_while_a_snapshot_is_built_is_selectable_once_published() {
    use crate::nodes::{NodeKind, hash_agent_key};
    let e = engine();
    let mut d = decls();
    let mut dev = node("dev-1", "boston", "0.0.0.0");
    dev.kind = NodeKind::Agent;
    dev.bind = None;
    dev.key_hash = Some(hash_agent_key("k"));
    d.nodes.push(dev);
    e.publish(Policy::build(&d, Some(&e.policy())).unwrap());
    let city = |p: &Policy| crate::nodes::Filter {
        city: p.geo.lookup(
            crate::geo::Country::parse("us"),
            crate::geo::GeoKind::City,
            "boston",
        ),
        ..crate::nodes::Filter::default()
    };
    let p1 = e.policy_arc();
    assert_eq!(p1.nodes.count(&city(&p1)), 0, "absent until it connects");

    // The next snapshot is built, then the device connects on the current
    // one, then the new one is published.
    let next = Policy::build(&d, Some(&p1)).unwrap();
    let (idx, _) = p1.nodes.get("dev-1").unwrap();
    let g = p1
        .nodes
        .agent_up(idx, "192.0.2.1:9".parse().unwrap(), "v", 1);
    assert_eq!(next.nodes.count(&city(&next)), 0, "built before it came");
    e.publish(next);
    let p2 = e.policy_arc();
    assert_eq!(p2.nodes.count(&city(&p2)), 1, "in line once published");

    // The same the other way, caught by the once-a-second upkeep.
    let next = Policy::build(&d, Some(&p2)).unwrap();
    e.publish(next);
    p2.nodes.agent_down(idx, g);
    let p3 = e.policy_arc();
    assert_eq!(p3.nodes.count(&city(&p3)), 1, "the old snapshot was told");
    e.housekeeping(Now::from_secs(10));
    assert_eq!(p3.nodes.count(&city(&p3)), 0, "the upkeep catches up");
}

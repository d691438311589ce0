use super::*;
use crate::geo::GeoKind;
use crate::rules::{Feature, Network};

/// A target as a client would send it.
fn target(host: &str, port: u16) -> splicegate_addr::Target {
    let h = splicegate_addr::parse_host(host.as_bytes()).expect("host parses");
    splicegate_addr::Target::new(h, port)
}

/// A direct node in the US on Verizon (AS701), residential.
pub(crate) fn node(id: &str, city: &str, ip: &str) -> NodeDecl {
    crate::nodes::tests::decl(id, "us", city, "verizon", 701, Network::Res, ip)
}

/// Packages 7..=17, each failing one check when asked to.
pub(crate) fn decls() -> Declarations {
    let org = |id: &str, credits| OrgDecl {
        id: id.into(),
        credits,
        from_file: false,
    };
    let pkg = |id: u64, f: &dyn Fn(&mut PackageDecl)| {
        let mut p = PackageDecl::new(id, &format!("pk_{id}"));
        p.org = Some("acme".into());
        f(&mut p);
        p
    };
    Declarations {
        orgs: vec![org("acme", 100_000_000), org("broke", 0)],
        packages: vec![
            pkg(7, &|_| {}),
            pkg(8, &|p| {
                p.auth = AuthMode::Ip;
                p.ip_allowlist = vec!["10.8.0.0/16".parse().unwrap()];
                p.default_rules = "country-us-city-new_york".into();
            }),
            pkg(9, &|p| {
                p.auth = AuthMode::PasswordIp;
                p.ip_allowlist = vec!["10.9.0.0/16".parse().unwrap(), "fd09::/32".parse().unwrap()];
            }),
            pkg(10, &|p| p.status = PackageStatus::Paused),
            pkg(11, &|p| p.status = PackageStatus::Suspended),
            pkg(12, &|p| p.org = Some("broke".into())),
            pkg(13, &|p| {
                p.networks = NetworkSet::of([Network::Res]);
                p.features = FeatureSet::of([Feature::Isp]);
            }),
            pkg(14, &|p| p.protocols = ProtocolSet::of([Protocol::Https])),
            pkg(15, &|p| p.traffic_limit_bytes = 1000),
            pkg(16, &|p| p.rps_limit = 1),
            pkg(17, &|p| p.max_connections = 1),
        ],
        nodes: vec![
            node("ny1", "new_york", "10.0.0.1"),
            node("ny2", "new_york", "10.0.0.2"),
            node("la1", "los_angeles", "10.0.1.1"),
        ],
        geo: vec![],
        targets: TargetPolicy::default(),
    }
}

pub(crate) fn policy() -> Policy {
    let p = Policy::build(&decls(), None).unwrap();
    let acme = &p.orgs["acme"].account;
    p.packages[&15].usage.add_traffic(600, 400, 0, Some(acme));
    p
}

/// (client address, credentials, protocol, target host, expected).
type Case<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Protocol,
    &'a str,
    Result<(), Code>,
);
/// (client address, credentials, protocol, target host, expected code).
type OrderRow<'a> = (&'a str, (&'a str, &'a str), Protocol, &'a str, Code);

const PUBLIC: &str = "93.184.216.34";

fn run(
    p: &Policy,
    ip: &str,
    user: Option<(&str, &str)>,
    proto: Protocol,
    host: &str,
) -> Result<Admitted, Code> {
    let credentials = match user {
        None => Credentials::Absent,
        Some(("<malformed>", _)) => Credentials::Malformed,
        Some((username, password)) => Credentials::Present { username, password },
    };
    let hello = Hello {
        client_ip: ip.parse().unwrap(),
        credentials,
        listener_package: None,
    };
    let auth = p.authenticate(&hello).map_err(|r| r.code)?;
    let mut conn = None;
    p.admit(
        &auth,
        proto,
        &target(host, 443),
        &mut conn,
        Now::from_secs(1),
    )
    .map_err(|r| r.code)
}

#[test]
fn every_check_of_the_table_fires() {
    use Code::*;
    let p = policy();
    let h = Protocol::Https;
    // One row per case: client address, username and key ("" for none),
    // and the expected answer; rx() names the protocol and target too.
    let rx = |ip, u, k, proto, host, want| (ip, u, k, proto, host, want);
    let r = |ip, u, k, want| rx(ip, u, k, h, PUBLIC, want);
    #[rustfmt::skip]
    let rows: Vec<Case<'_>> = vec![
        r("1.2.3.4", "package-7-country-us", "pk_7", Ok(())),
        // 1
        r("1.2.3.4", "", "", Err(ErrAuthRequired)),
        // 2
        r("1.2.3.4", "package-7-country-us", "wrong", Err(AuthFailed)),
        r("1.2.3.4", "package-99-country-us", "pk_7", Err(AuthFailed)),
        r("1.2.3.4", "user-country-us", "pk_7", Err(AuthFailed)),
        r("1.2.3.4", "package-7-pk_7", "", Err(AuthFailed)),
        r("1.2.3.4", "package-7-country-us-pk_7", "pk_7", Err(AuthFailed)),
        r("1.2.3.4", "<malformed>", "", Err(AuthFailed)),
        r("1.2.3.4", "package-7-country-us", "pk_7 ", Err(AuthFailed)),
        // 3
        r("10.9.1.1", "package-9-country-us", "pk_9", Ok(())),
        r("10.10.1.1", "package-9-country-us", "pk_9", Err(IpNotAllowed)),
        r("10.9.1.1", "package-9-country-us", "bad", Err(AuthFailed)),
        r("fd09::5", "package-9-country-us", "pk_9", Ok(())),
        r("::ffff:10.9.0.1", "package-9-country-us", "pk_9", Ok(())),
        r("10.8.1.1", "", "", Ok(())),
        r("10.8.1.1", "package-8-country-us", "anything", Ok(())),
        r("10.7.1.1", "package-8-country-us", "anything", Err(IpNotAllowed)),
        // 4
        r("1.2.3.4", "package-10-country-us", "pk_10", Err(PackagePaused)),
        r("1.2.3.4", "package-11-country-us", "pk_11", Err(PackageSuspended)),
        // 5
        r("1.2.3.4", "package-12-country-us", "pk_12", Err(PackageNoCredits)),
        // 6
        r("1.2.3.4", "package-7", "pk_7", Err(ErrMissingParams)),
        r("1.2.3.4", "package-13-country-us-network-mob", "pk_13", Err(ErrParamNotAllowed)),
        r("1.2.3.4", "package-13-country-us-city-new_york", "pk_13", Err(ErrParamNotAllowed)),
        r("1.2.3.4", "package-13-country-us-isp-verizon", "pk_13", Ok(())),
        // 7
        rx("1.2.3.4", "package-14-country-us", "pk_14", Protocol::Socks5, PUBLIC, Err(Disallowed)),
        r("1.2.3.4", "package-14-country-us", "pk_14", Ok(())),
        rx("1.2.3.4", "package-7-country-us", "pk_7", h, "127.0.0.1", Err(Disallowed)),
        rx("1.2.3.4", "package-7-country-us", "pk_7", h, "169.254.169.254", Err(Disallowed)),
        // 8
        r("1.2.3.4", "package-15-country-us", "pk_15", Err(TrafficLimitExceeded)),
    ];
    for (ip, u, k, proto, host, want) in rows {
        let user = (!u.is_empty()).then_some((u, k));
        let got = run(&p, ip, user, proto, host).map(|_| ());
        assert_eq!(got, want, "{ip} {user:?} {proto:?} {host}");
    }
}

#[test]
fn the_earlier_check_wins() {
    use Code::*;
    let p = policy();
    let h = Protocol::Https;
    let rows: &[OrderRow<'_>] = &[
        (
            "1.2.3.4",
            ("package-10-contry-us", "wrong"),
            h,
            "127.0.0.1",
            AuthFailed,
        ),
        (
            "10.10.0.1",
            ("package-9-contry-us", "pk_9"),
            h,
            PUBLIC,
            IpNotAllowed,
        ),
        (
            "1.2.3.4",
            ("package-10-contry-us", "pk_10"),
            h,
            "127.0.0.1",
            PackagePaused,
        ),
        (
            "1.2.3.4",
            ("package-12-contry-us", "pk_12"),
            h,
            PUBLIC,
            PackageNoCredits,
        ),
        (
            "1.2.3.4",
            ("package-14-contry-us", "pk_14"),
            Protocol::Socks5,
            PUBLIC,
            ErrUnknownParam,
        ),
        (
            "1.2.3.4",
            ("package-15-country-us", "pk_15"),
            h,
            "10.0.0.1",
            Disallowed,
        ),
    ];
    for (ip, user, proto, host, want) in rows {
        assert_eq!(
            run(&p, ip, Some(*user), *proto, host).unwrap_err(),
            *want,
            "{user:?}"
        );
    }
}

#[test]
fn rate_and_connection_limits() {
    let p = policy();
    let auth16 = p
        .authenticate(&Hello {
            client_ip: "1.1.1.1".parse().unwrap(),
            credentials: Credentials::Present {
                username: "package-16-country-us",
                password: "pk_16",
            },
            listener_package: None,
        })
        .unwrap();
    let mut conn = None;
    assert!(
        p.admit(
            &auth16,
            Protocol::Https,
            &target(PUBLIC, 443),
            &mut conn,
            Now::from_secs(5)
        )
        .is_ok()
    );
    let e = p
        .admit(
            &auth16,
            Protocol::Https,
            &target(PUBLIC, 443),
            &mut conn,
            Now::from_secs(5),
        )
        .unwrap_err();
    assert_eq!(e.code, Code::RateLimitExceeded);
    assert!(
        p.admit(
            &auth16,
            Protocol::Https,
            &target(PUBLIC, 443),
            &mut conn,
            Now::from_secs(6)
        )
        .is_ok()
    );

    let auth17 = p
        .authenticate(&Hello {
            client_ip: "1.1.1.1".parse().unwrap(),
            credentials: Credentials::Present {
                username: "package-17-country-us",
                password: "pk_17",
            },
            listener_package: None,
        })
        .unwrap();
    let mut c1 = None;
    let mut c2 = None;
    assert!(
        p.admit(
            &auth17,
            Protocol::Https,
            &target(PUBLIC, 443),
            &mut c1,
            Now::from_secs(5)
        )
        .is_ok()
    );
    assert!(
        p.admit(
            &auth17,
            Protocol::Https,
            &target(PUBLIC, 443),
            &mut c1,
            Now::from_secs(5)
        )
        .is_ok(),
        "same connection, same slot"
    );
    let e = p
        .admit(
            &auth17,
            Protocol::Https,
            &target(PUBLIC, 443),
            &mut c2,
            Now::from_secs(5),
        )
        .unwrap_err();
    assert_eq!(e.code, Code::RateLimitExceeded);
    assert!(e.detail.contains("open connections"));
    drop(c1);
    assert!(
        p.admit(
            &auth17,
            Protocol::Https,
            &target(PUBLIC, 443),
            &mut c2,
            Now::from_secs(5)
        )
        .is_ok()
    );
}

#[test]
fn ip_auth_without_username_uses_default_rules_and_listeners_name_packages() {
    let p = policy();
    let a = run(&p, "10.8.3.3", None, Protocol::Https, PUBLIC).unwrap();
    assert_eq!(a.package.id(), 8);
    assert!(
        a.rules.city.is_some(),
        "default rules country-us-city-new_york"
    );
    // A listener bound to package 9 (password+ip) still wants the key.
    let hello = Hello {
        client_ip: "10.9.0.1".parse().unwrap(),
        credentials: Credentials::Absent,
        listener_package: Some(9),
    };
    assert_eq!(
        p.authenticate(&hello).unwrap_err().code,
        Code::ErrAuthRequired
    );
    // A listener bound to package 8 admits its allowlist without credentials, and refuses other packages.
    let hello = Hello {
        client_ip: "10.8.0.1".parse().unwrap(),
        credentials: Credentials::Absent,
        listener_package: Some(8),
    };
    assert_eq!(p.authenticate(&hello).unwrap().package.id(), 8);
    let hello = Hello {
        client_ip: "10.8.0.1".parse().unwrap(),
        credentials: Credentials::Present {
            username: "package-7-country-us",
            password: "pk_7",
        },
        listener_package: Some(8),
    };
    assert_eq!(p.authenticate(&hello).unwrap_err().code, Code::AuthFailed);
}

#[test]
fn build_refuses_bad_declarations_and_keeps_live_state() {
    let mut d = decls();
    d.packages[1]
        .ip_allowlist
        .push("10.0.0.0/8".parse().unwrap());
    let mut other = PackageDecl::new(50, "k");
    other.auth = AuthMode::Ip;
    other.ip_allowlist = vec!["10.8.5.0/24".parse().unwrap()];
    d.packages.push(other);
    assert!(
        Policy::build(&d, None)
            .unwrap_err()
            .to_string()
            .contains("overlaps")
    );

    let mut d = decls();
    d.packages[0].org = Some("nobody".into());
    assert!(
        Policy::build(&d, None)
            .unwrap_err()
            .to_string()
            .contains("no organisation nobody")
    );
    let mut d = decls();
    d.packages[0].default_rules = "contry-us".into();
    assert!(
        Policy::build(&d, None)
            .unwrap_err()
            .to_string()
            .contains("default_rules")
    );
    let mut d = decls();
    d.packages[0].key = String::new();
    assert!(Policy::build(&d, None).is_err());

    let p1 = policy();
    p1.packages[&7]
        .usage
        .add_traffic(5, 5, 0, Some(&p1.orgs["acme"].account));
    let mut d = decls();
    d.packages[0].key = "rotated".into();
    let p2 = Policy::build(&d, Some(&p1)).unwrap();
    assert_eq!(
        p2.packages[&7].usage.totals().bytes(),
        10,
        "usage survives a rebuild"
    );
    assert!(p2.packages[&7].key.matches("rotated"));
    assert!(
        !p2.packages[&7].key.matches("pk_7"),
        "the old key fails at once"
    );
}

#[test]
fn keys_compare_exactly_and_never_print() {
    let k = Key::new("pk_demo").unwrap();
    assert!(k.matches("pk_demo"));
    for bad in [
        "",
        "pk_dem",
        "pk_demo ",
        "PK_DEMO",
        "pk_demo\0",
        &"x".repeat(300),
    ] {
        assert!(!k.matches(bad), "{bad:?}");
    }
    assert_eq!(format!("{k:?}"), "Key(***)");
    assert!(Key::new(&"k".repeat(256)).is_none());
    // The longest key, and a candidate one byte off at every position (so
    // at every place in every 64-bit word the comparison is made of).
    let long: String = (0..MAX_KEY)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let k = Key::new(&long).unwrap();
    assert!(k.matches(&long));
    for at in 0..MAX_KEY {
        let mut off = long.clone().into_bytes();
        off[at] = b'Z';
        let off = String::from_utf8(off).unwrap();
        assert!(!k.matches(&off), "differs at {at}");
    }
    assert!(!k.matches(&long[..MAX_KEY - 1]));
    assert!(!k.matches(&format!("{long}a")));
}

#[test]
fn refusals_after_the_key_belong_to_their_package() {
    let p = policy();
    let hello = |username, password| Hello {
        client_ip: "1.2.3.4".parse().unwrap(),
        credentials: Credentials::Present { username, password },
        listener_package: None,
    };
    let paused = hello("package-10-country-us", "pk_10");
    let rej = p.authenticate(&paused).unwrap_err();
    assert_eq!(p.refused_package(&paused, &rej), Some(10));
    let wrong = hello("package-10-country-us", "nope");
    let rej = p.authenticate(&wrong).unwrap_err();
    assert_eq!(rej.code, Code::AuthFailed);
    assert_eq!(
        p.refused_package(&wrong, &rej),
        None,
        "a wrong key is not the package's error"
    );
    let stranger = Hello {
        client_ip: "10.7.0.1".parse().unwrap(),
        credentials: Credentials::Present {
            username: "package-8-country-us",
            password: "x",
        },
        listener_package: None,
    };
    let rej = p.authenticate(&stranger).unwrap_err();
    assert_eq!(rej.code, Code::IpNotAllowed);
    assert_eq!(p.refused_package(&stranger, &rej), Some(8));
}

#[test]
fn a_change_of_packages_keeps_the_node_pool_and_the_usage() {
    let p1 = policy();
    p1.packages[&7].usage.add_traffic(5, 5, 0, None);
    let mut d = decls();
    d.packages[0].key = "rotated".into();
    // The nodes of `d` are not read: the previous pool is shared.
    d.nodes.clear();
    let p2 = Policy::build_keeping_nodes(&d, &p1).unwrap();
    assert!(Arc::ptr_eq(&p1.nodes, &p2.nodes));
    assert_eq!(p2.nodes.len(), p1.nodes.len());
    assert!(p2.packages[&7].key.matches("rotated"));
    assert_eq!(p2.packages[&7].usage.totals().bytes(), 10);
    // A package change is still checked.
    let mut bad = decls();
    bad.packages[0].default_rules = "country-nowhere".into();
    assert!(Policy::build_keeping_nodes(&bad, &p1).is_err());
}

#[test]
fn a_change_of_one_node_shares_the_rest_and_matches_a_build() {
    let p1 = policy();
    p1.packages[&7].usage.add_traffic(5, 5, 0, None);
    let mut accounts = decls();
    accounts.nodes.clear();
    // A create: the new node's names reach the catalogue, so rules name them.
    let mut created = node("bos1", "boston", "10.7.0.1");
    created.isp = Some("brand_new_isp".into());
    let (p2, idx) = Policy::build_changing_node(&accounts, &p1, NodeChange::Put(&created)).unwrap();
    let idx = idx.unwrap();
    assert_eq!(idx as usize, p1.nodes.len());
    p2.nodes.set_admin_state(idx, created.state);
    assert_eq!(p2.packages[&7].usage.totals().bytes(), 10);
    let mut all = decls();
    all.nodes.push(created.clone());
    let full = Policy::build(&all, Some(&p1)).unwrap();
    let us = crate::geo::Country::parse("us");
    for p in [&p2, &full] {
        let boston = p.geo.lookup(us, GeoKind::City, "boston").unwrap();
        assert!(p.geo.lookup(us, GeoKind::Isp, "brand_new_isp").is_some());
        let f = Filter {
            country: us,
            city: Some(boston),
            ..Filter::default()
        };
        assert_eq!(p.nodes.count(&f), 1);
        assert_eq!(p.nodes.get("bos1").unwrap().0, idx);
    }
    assert_eq!(p2.nodes.online_count(), full.nodes.online_count());
    // An invalid node is refused as a build refuses it; nothing changed.
    let mut bad = node("bad", "boston", "10.7.0.2");
    bad.bind = None;
    let e = Policy::build_changing_node(&accounts, &p2, NodeChange::Put(&bad)).unwrap_err();
    let mut all_bad = all.clone();
    all_bad.nodes.push(bad);
    assert_eq!(
        e.to_string(),
        Policy::build(&all_bad, Some(&p2)).unwrap_err().to_string()
    );
    // A removal leaves a tombstone at the same index.
    let (p3, gone) =
        Policy::build_changing_node(&accounts, &p2, NodeChange::Remove("bos1")).unwrap();
    assert_eq!(gone, Some(idx));
    assert!(p3.nodes.get("bos1").is_some(), "not before the commit");
    p2.nodes.remove(idx);
    p3.nodes.remove(idx);
    assert!(p3.nodes.get("bos1").is_none());
    assert_eq!(p3.nodes.len(), p2.nodes.len());
    assert_eq!(p3.nodes.online_count(), p1.nodes.online_count());
    // An id the pool does not have: the pool is shared as it is.
    let (p4, none) =
        Policy::build_changing_node(&accounts, &p3, NodeChange::Remove("nope")).unwrap();
    assert!(none.is_none() && Arc::ptr_eq(&p3.nodes, &p4.nodes));
}

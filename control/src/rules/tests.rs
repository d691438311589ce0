use super::*;
use crate::geo::{Country, GeoCatalog, GeoKind};
use proptest::prelude::*;

fn geo() -> GeoCatalog {
    let mut g = GeoCatalog::new();
    let us = Country::parse("us").unwrap();
    let fr = Country::parse("fr").unwrap();
    g.add(us, GeoKind::City, "new_york");
    g.add(us, GeoKind::City, "los_angeles");
    g.add(us, GeoKind::Region, "california");
    g.add(us, GeoKind::Isp, "verizon_wireless");
    g.add(fr, GeoKind::City, "paris");
    g.add(fr, GeoKind::Isp, "orange");
    g
}

fn code_of(username: &str) -> Result<Rules, (Code, String)> {
    parse(username, &geo()).map_err(|r| (r.code, r.detail))
}

#[track_caller]
fn rejects(username: &str, code: Code, detail_has: &str) {
    match code_of(username) {
        Ok(r) => panic!("{username} parsed to {r:?}, expected {code}"),
        Err((c, d)) => {
            assert_eq!(c, code, "{username}: {d}");
            assert!(
                d.contains(detail_has),
                "{username}: detail {d:?} lacks {detail_has:?}"
            );
        }
    }
}

#[test]
fn the_contract_rows() {
    use Code::*;
    let rows: &[(&str, Code, &str)] = &[
        ("package-7", ErrMissingParams, "country-any"),
        ("package-7-session-abc", ErrMissingParams, "country-any"),
        (
            "package-7-contry-us",
            ErrUnknownParam,
            "did you mean country",
        ),
        (
            "package-7-country-us-city-los-angeles",
            ErrUnknownParam,
            "city-los_angeles",
        ),
        (
            "package-7-country-us-country-gb",
            ErrDuplicateParam,
            "country is given twice",
        ),
        (
            "package-7-country-us-session-a-sessionid-b",
            ErrDuplicateParam,
            "session",
        ),
        ("package-7-country-US", ErrInvalidValue, "use country-us"),
        ("package-7-country-usa", ErrInvalidValue, "ISO 3166-1"),
        ("package-7-country-xx", ErrInvalidValue, "ISO 3166-1"),
        ("package-7-country-us-asn-x", ErrInvalidValue, "asn-x"),
        (
            "package-7-country-us-session-a-rotate-timed_0",
            ErrInvalidValue,
            "rotate-timed_N",
        ),
        (
            "package-7-country-us-city-atlantis",
            ErrInvalidValue,
            "no such city in country us",
        ),
        (
            "package-7-country-fr-city-new_york",
            ErrInvalidValue,
            "no such city in country fr",
        ),
        (
            "package-7-country-us-city-New_York",
            ErrInvalidValue,
            "lowercase; use city-new_york",
        ),
        ("package-7-country", ErrInvalidValue, "country has no value"),
        ("package-7-country-", ErrInvalidValue, "empty value"),
        (
            "package-7-country-us-network-wifi",
            ErrInvalidValue,
            "res, mob, dc or any",
        ),
        (
            "package-7-country-us-sessionlength-0-session-a",
            ErrInvalidValue,
            "1 to 86400",
        ),
        (
            "package-7-country-us-sessionlength-86401-session-a",
            ErrInvalidValue,
            "1 to 86400",
        ),
        (
            "package-7-country-us-onerror-retry_11",
            ErrInvalidValue,
            "N 1-10",
        ),
        (
            "package-7-country-us-onerror-retry_0",
            ErrInvalidValue,
            "N 1-10",
        ),
        (
            "package-7-country-us-bind-nodes-session-a",
            ErrInvalidValue,
            "bind-node",
        ),
        (
            "package-7-country-us-prefer-cheap",
            ErrInvalidValue,
            "prefer-lookalike",
        ),
        (
            "package-7-country-us-session-a-b-c",
            ErrUnknownParam,
            "unknown key \"b\"",
        ),
        (
            "package-7-country-us-isp-comcast",
            ErrInvalidValue,
            "no such isp",
        ),
        (
            "package-7-isp-comcast",
            ErrInvalidValue,
            "no such isp in any country",
        ),
        (
            "package-7-country-us-session-a-bind-node-rotate-requests_5",
            ErrInvalidCombination,
            "rotate",
        ),
        (
            "package-7-country-us-session-a-bind-node-rotate-timed_5",
            ErrInvalidCombination,
            "rotate",
        ),
        (
            "package-7-country-us-session-a-bind-node-onerror-replace",
            ErrInvalidCombination,
            "onerror-fail",
        ),
        (
            "package-7-country-us-session-a-bind-node-prefer-lookalike",
            ErrInvalidCombination,
            "prefer-lookalike",
        ),
        (
            "package-7-country-us-bind-node",
            ErrInvalidCombination,
            "needs a session",
        ),
        (
            "package-7-country-us-rotate-timed_5",
            ErrInvalidCombination,
            "needs a session",
        ),
        (
            "package-7-country-us-sessionlength-60",
            ErrInvalidCombination,
            "needs a session",
        ),
        (
            "package-7-city-new_york",
            ErrInvalidCombination,
            "needs a specific country",
        ),
        (
            "package-7-country-any-region-california",
            ErrInvalidCombination,
            "needs a specific country",
        ),
        ("package-7--country-us", ErrUnknownParam, "empty key"),
        ("package-7-country-us-", ErrUnknownParam, "empty key"),
    ];
    for (u, c, d) in rows {
        rejects(u, *c, d);
    }
}

#[test]
fn faults_are_answered_in_the_contract_order() {
    // Left to right among token faults.
    rejects(
        "package-7-contry-us-country-US",
        Code::ErrUnknownParam,
        "contry",
    );
    rejects(
        "package-7-country-US-contry-us",
        Code::ErrInvalidValue,
        "country-US",
    );
    rejects(
        "package-7-country-us-country-us-foo-x",
        Code::ErrDuplicateParam,
        "country",
    );
    // Catalogue names are looked up only once every token reads well.
    rejects(
        "package-7-country-us-city-atlantis-foo-x",
        Code::ErrUnknownParam,
        "foo",
    );
    rejects(
        "package-7-country-us-foo-x-city-atlantis",
        Code::ErrUnknownParam,
        "foo",
    );
    // A city before its country is still checked against that country.
    rejects(
        "package-7-city-paris-country-us",
        Code::ErrInvalidValue,
        "no such city in country us",
    );
    // Token faults before combination faults before missing.
    rejects("package-7-bind-node-asn-x", Code::ErrInvalidValue, "asn-x");
    rejects(
        "package-7-bind-node",
        Code::ErrInvalidCombination,
        "session",
    );
    rejects(
        "package-7-session-a-sessionlength-30",
        Code::ErrMissingParams,
        "country-any",
    );
    // Too long beats everything.
    let long = format!("package-7-country-us-session-{}", "a".repeat(240));
    rejects(&long, Code::ErrInvalidValue, "at most 255");
}

#[test]
fn every_key_and_form_parses() {
    let g = geo();
    let r = parse(
        "package-7-country-us-region-california-city-new_york-isp-verizon_wireless-asn-701-network-res-session-Ab_9-sessionlength-600-rotate-requests_5-onerror-retry_3-prefer-lookalike",
        &g,
    )
    .unwrap();
    assert_eq!(r.package, 7);
    assert_eq!(
        r.country,
        Some(CountryRule::Is(Country::parse("us").unwrap()))
    );
    assert_eq!(g.name(r.city.unwrap()), "new_york");
    assert_eq!(g.name(r.region.unwrap()), "california");
    assert_eq!(g.name(r.isp.unwrap()), "verizon_wireless");
    assert_eq!(r.asn, Some(701));
    assert_eq!(r.network, Some(NetworkRule::Is(Network::Res)));
    assert_eq!(r.session.unwrap().as_str(), "Ab_9");
    assert_eq!(r.session_length(), 600);
    assert_eq!(r.rotate, Some(Rotate::Requests(5)));
    assert_eq!(r.on_error(), OnError::Retry(3));
    assert!(r.prefer_lookalike);

    let d = parse("package-12-country-any-sessionid-x", &g).unwrap();
    assert_eq!(d.session.unwrap().as_str(), "x");
    assert_eq!(d.session_length(), DEFAULT_SESSION_LENGTH);
    assert_eq!(d.on_error(), OnError::Replace);
    let b = parse("package-1-network-any-session-s-bind-node", &g).unwrap();
    assert_eq!(b.on_error(), OnError::Fail, "bind-node defaults to fail");
    assert!(
        parse("package-1-isp-orange", &g).is_ok(),
        "isp without country looks in every country"
    );
    assert!(
        parse(
            "package-1-country-us-session-s-rotate-timed_30-sessionlength-86400",
            &g
        )
        .is_ok()
    );
}

#[test]
fn usernames_not_starting_with_a_package_are_auth_failures() {
    for u in [
        "",
        "pkg-7-country-us",
        "package-",
        "package-x-country-us",
        "package-7x-country-us",
        "Package-7",
    ] {
        assert_eq!(split_package(u), None, "{u}");
        assert_eq!(code_of(u).unwrap_err().0, Code::AuthFailed, "{u}");
    }
    assert_eq!(split_package("package-7"), Some((7, "")));
    assert_eq!(split_package("package-007-a"), Some((7, "-a")));
    assert_eq!(
        split_package("package-99999999999999999999"),
        None,
        "overflow"
    );
}

#[test]
fn plan_checks() {
    let g = geo();
    let r = parse("package-7-country-us-network-mob", &g).unwrap();
    let e = r
        .check_plan(NetworkSet::of([Network::Res]), FeatureSet::ALL)
        .unwrap_err();
    assert_eq!(e.code, Code::ErrParamNotAllowed);
    assert!(
        e.detail
            .contains("network-mob is not enabled for package 7 (enabled: res)"),
        "{}",
        e.detail
    );
    assert!(r.check_plan(NetworkSet::ALL, FeatureSet::ALL).is_ok());
    let any = parse("package-7-country-us-network-any", &g).unwrap();
    assert!(
        any.check_plan(NetworkSet::of([Network::Res]), FeatureSet::of([]))
            .is_ok()
    );
    for (u, f) in [
        ("package-7-country-us-city-new_york", Feature::City),
        ("package-7-country-us-region-california", Feature::Region),
        ("package-7-isp-orange", Feature::Isp),
        ("package-7-asn-701", Feature::Asn),
        ("package-7-country-us-session-a-bind-node", Feature::Bind),
        (
            "package-7-country-us-session-a-prefer-lookalike",
            Feature::Prefer,
        ),
    ] {
        let r = parse(u, &g).unwrap();
        let without = FeatureSet::of(Feature::ALL.into_iter().filter(|x| *x != f));
        let e = r.check_plan(NetworkSet::ALL, without).unwrap_err();
        assert_eq!(e.code, Code::ErrParamNotAllowed, "{u}");
        assert!(e.detail.contains(f.as_str()), "{u}: {}", e.detail);
        assert!(
            r.check_plan(NetworkSet::ALL, FeatureSet::of([f])).is_ok(),
            "{u}"
        );
    }
}

#[test]
fn fingerprint_ignores_only_session_and_length() {
    let g = geo();
    let a = parse("package-7-country-us-session-a-sessionlength-60", &g).unwrap();
    let b = parse("package-7-country-us-session-b-sessionlength-600", &g).unwrap();
    let c = parse("package-7-country-us-session-a-onerror-fail", &g).unwrap();
    let d = parse("package-7-country-any-session-a", &g).unwrap();
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_ne!(a.fingerprint(), c.fingerprint());
    assert_ne!(a.fingerprint(), d.fingerprint());
    // Spelling out a default is the same session.
    let e = parse("package-7-isp-orange-session-a", &g).unwrap();
    let f = parse(
        "package-7-isp-orange-country-any-network-any-onerror-replace-session-a",
        &g,
    )
    .unwrap();
    assert_eq!(e.fingerprint(), f.fingerprint());
    let bound = parse("package-7-country-us-session-a-bind-node", &g).unwrap();
    let bound_fail = parse("package-7-country-us-session-a-bind-node-onerror-fail", &g).unwrap();
    assert_eq!(bound.fingerprint(), bound_fail.fingerprint());
}

fn arb_rules() -> impl Strategy<Value = Rules> {
    let g = geo();
    let ny = g
        .lookup(Country::parse("us"), GeoKind::City, "new_york")
        .unwrap();
    let ca = g
        .lookup(Country::parse("us"), GeoKind::Region, "california")
        .unwrap();
    let vz = g
        .lookup(Country::parse("us"), GeoKind::Isp, "verizon_wireless")
        .unwrap();
    (
        1u64..100_000,
        prop::option::of(prop_oneof![
            Just(CountryRule::Any),
            Just(CountryRule::Is(Country::parse("us").unwrap()))
        ]),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(1u32..=u32::MAX),
        prop::option::of(prop_oneof![
            Just(NetworkRule::Any),
            Just(NetworkRule::Is(Network::Res)),
            Just(NetworkRule::Is(Network::Dc))
        ]),
        prop::option::of("[A-Za-z0-9_]{1,20}"),
        prop::option::of(1u32..=86_400),
        (
            0u8..4,
            prop::option::of(prop_oneof![
                (1u32..1000).prop_map(Rotate::Timed),
                (1u32..1000).prop_map(Rotate::Requests)
            ]),
        ),
        prop::option::of(prop_oneof![
            Just(OnError::Replace),
            Just(OnError::Fail),
            (1u8..=10).prop_map(OnError::Retry)
        ]),
    )
        .prop_map(
            move |(
                package,
                country,
                region,
                city,
                isp,
                asn,
                network,
                session,
                len,
                (flags, rotate),
                onerror,
            )| {
                let us = matches!(country, Some(CountryRule::Is(_)));
                Rules {
                    package,
                    country,
                    region: (region && us).then_some(ca),
                    city: (city && us).then_some(ny),
                    isp: isp.then_some(vz),
                    asn,
                    network,
                    session: session.as_deref().and_then(SessionId::parse),
                    session_length: len,
                    bind_node: flags & 1 == 1,
                    rotate,
                    onerror,
                    prefer_lookalike: flags & 2 == 2,
                }
            },
        )
}

proptest! {
    #[test]
    fn never_panics_on_arbitrary_input(s in "\\PC{0,300}") {
        let _ = parse(&s, &geo());
        let with_prefix = format!("package-7-{s}");
        let _ = parse(&with_prefix, &geo());
    }

    #[test]
    fn never_panics_on_grammar_like_input(s in "(package-[0-9]{1,3})?(-(country|city|isp|asn|session|bind|rotate|onerror|prefer|x|)(-[a-zA-Z0-9_]{0,6})?){0,8}") {
        let _ = parse(&s, &geo());
    }

    #[test]
    fn display_then_parse_round_trips(r in arb_rules()) {
        let g = geo();
        let username = r.to_username(&g);
        match parse(&username, &g) {
            Ok(back) => prop_assert_eq!(back, r),
            // Rules that break a combination or missing rule must say so, never parse differently.
            Err(e) => prop_assert!(
                matches!(e.code, Code::ErrInvalidCombination | Code::ErrMissingParams)
                    || (username.len() > MAX_USERNAME && e.code == Code::ErrInvalidValue),
                "{} -> {}", username, e
            ),
        }
    }

    #[test]
    fn fingerprint_changes_with_any_rule_but_session(r in arb_rules(), sid in "[a-z]{1,8}", len in 1u32..=86_400) {
        let mut other = r.clone();
        other.session = SessionId::parse(&sid);
        other.session_length = Some(len);
        prop_assert_eq!(other.fingerprint(), r.fingerprint());
        let mut changed = r.clone();
        changed.prefer_lookalike = !r.prefer_lookalike;
        prop_assert_ne!(changed.fingerprint(), r.fingerprint());
        let mut changed = r.clone();
        changed.asn = Some(r.asn.map_or(1, |a| a.wrapping_add(1).max(1)));
        prop_assert_ne!(changed.fingerprint(), r.fingerprint());
        let mut changed = r.clone();
        changed.bind_node = !r.bind_node;
        prop_assert_ne!(changed.fingerprint(), r.fingerprint());
    }
}

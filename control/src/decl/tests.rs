use super::*;

/// The first error reading `json` as fields and converting them.
fn error_of<T: serde::de::DeserializeOwned, D>(
    json: &str,
    convert: impl Fn(&T) -> Result<D, DeclError>,
) -> String {
    match serde_json::from_str::<T>(json) {
        Err(e) => e.to_string(),
        Ok(f) => match convert(&f) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{json} was accepted"),
        },
    }
}

#[test]
fn packages_round_trip_through_the_store_form() {
    let body: PackageFields = serde_json::from_str(
        r#"{"id": 7, "org": "acme", "key": "k1", "status": "paused", "protocols": ["https"],
            "networks": ["res"], "features": ["city"], "auth": "password+ip",
            "ip_allowlist": ["10.0.0.0/8"], "default_rules": "country-us", "rps_limit": 5,
            "max_connections": 6, "traffic_limit_bytes": 7, "price_per_gb": 1.25}"#,
    )
    .unwrap();
    let d = body.to_decl().unwrap();
    assert_eq!(d.price_per_gb, 1_250_000);
    assert_eq!(d.status, PackageStatus::Paused);
    assert_eq!(d.auth, AuthMode::PasswordIp);
    let stored = serde_json::to_string(&PackageFields::from_decl(&d)).unwrap();
    assert!(stored.contains(r#""status":"paused""#), "{stored}");
    let back: PackageFields = serde_json::from_str(&stored).unwrap();
    assert_eq!(back.to_decl().unwrap(), d);
}

#[test]
fn bad_values_are_messages_that_name_the_field() {
    for (json, needle) in [
        (
            r#"{"id": 1, "key": "k", "status": "on"}"#,
            r#"status "on" is not active, paused or suspended"#,
        ),
        (
            r#"{"id": 1, "key": "k", "protocols": ["ftp"]}"#,
            r#"protocol "ftp" is not http, https or socks5"#,
        ),
        (
            r#"{"id": 1, "key": "k", "price_per_gb": -1}"#,
            "package 1: price_per_gb",
        ),
        (r#"{"id": 1, "key": "a:b"}"#, "package 1: key"),
        (r#"{"id": 1}"#, "package 1: key is missing"),
        (r#"{"key": "k"}"#, "id is missing"),
        (r#"{"id": 1, "key": "k", "org": ""}"#, "package 1: org"),
    ] {
        let e = error_of(json, PackageFields::to_decl);
        assert!(e.contains(needle), "{json}: {e}");
    }
    assert!(serde_json::from_str::<PackageFields>(r#"{"rps": 1}"#).is_err());
    let long = format!(
        r#"{{"id": "n", "kind": "direct", "bind": "127.0.0.1", "city": "{}"}}"#,
        "a".repeat(MAX_NAME + 1)
    );
    let long_id = format!(
        r#"{{"id": "{}", "kind": "direct", "bind": "127.0.0.1"}}"#,
        "a".repeat(MAX_NAME + 1)
    );
    for (json, needle) in [
        (
            r#"{"id": "n", "kind": "http"}"#,
            "node n: addr: a http node needs addr",
        ),
        (r#"{"id": "n", "kind": "direct"}"#, "node n: bind"),
        (
            r#"{"id": "n", "kind": "ftp"}"#,
            r#"kind "ftp" is not http, socks5 or direct"#,
        ),
        (r#"{"id": "n"}"#, "node n: kind is missing"),
        (
            r#"{"id": "n", "kind": "direct", "bind": "127.0.0.1", "country": "USA"}"#,
            "ISO",
        ),
        (
            r#"{"id": "n", "kind": "direct", "bind": "127.0.0.1", "city": "New York"}"#,
            "node n: city",
        ),
        (&long, "catalogue name"),
        (&long_id, "a node id is 1 to 128 bytes"),
        (
            r#"{"id": "n", "kind": "http", "addr": "127.0.0.1:1", "username": "u"}"#,
            "together",
        ),
        (
            r#"{"id": "n", "kind": "direct", "bind": "127.0.0.1", "state": "up"}"#,
            "state",
        ),
    ] {
        let e = error_of(json, NodeFields::to_decl);
        assert!(e.contains(needle), "{json}: {e}");
    }
}

#[test]
fn nodes_round_trip_and_patches_clear_with_null() {
    let f: NodeFields = serde_json::from_str(
        r#"{"id": "n1", "kind": "http", "addr": "127.0.1.1:8001", "country": "us",
            "city": "new_york", "isp": "verizon_wireless", "asn": 701, "network": "mob",
            "username": "u", "password": "p"}"#,
    )
    .unwrap();
    let mut d = f.to_decl().unwrap();
    assert_eq!(d.network, Network::Mob);
    let back: NodeFields =
        serde_json::from_str(&serde_json::to_string(&NodeFields::from_decl(&d)).unwrap()).unwrap();
    assert_eq!(back.to_decl().unwrap(), d);
    let patch: NodeFields = serde_json::from_str(r#"{"city": null, "state": "draining"}"#).unwrap();
    assert!(!patch.only_state());
    patch.apply(&mut d).unwrap();
    assert_eq!(d.city, None);
    assert_eq!(d.state, NodeState::Draining);
    let only: NodeFields = serde_json::from_str(r#"{"state": "offline"}"#).unwrap();
    assert!(only.only_state());
    assert!(!NodeFields::default().only_state());
}

#[test]
fn the_file_reads_the_same_schema() {
    let p: PackageFields = toml::from_str(
        "id = 7\nkey = \"k\"\nstatus = \"paused\"\nprotocols = [\"socks5\"]\nprice_per_gb = 2.0\n",
    )
    .unwrap();
    let d = p.to_decl().unwrap();
    assert_eq!(d.status, PackageStatus::Paused);
    assert_eq!(d.price_per_gb, 2_000_000);
    let e = toml::from_str::<PackageFields>("id = 7\nkey = \"k\"\nstatus = \"on\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not active, paused or suspended"), "{e}");
    let n: NodeFields =
        toml::from_str("id = \"a\"\nkind = \"socks5\"\naddr = \"127.0.0.1:1080\"\n").unwrap();
    assert_eq!(n.to_decl().unwrap().kind, NodeKind::Socks5);
}

#[test]
fn announced_names_take_the_catalogue_form() {
    for (raw, want) in [
        ("New York", "new_york"),
        ("new_york", "new_york"),
        ("Saint-Étienne", "saint_etienne"),
        ("  São Paulo  ", "sao_paulo"),
        ("Zürich", "zurich"),
        ("Land's End", "lands_end"),
        ("AT&T Services, Inc.", "at_t_services_inc"),
        ("Deutsche Telekom AG", "deutsche_telekom_ag"),
        ("Łódź", "lodz"),
        ("Straße", "strasse"),
        ("東京", ""),
        ("--", ""),
    ] {
        let got = normalise_name(raw);
        assert_eq!(got, want, "{raw:?}");
        if !got.is_empty() {
            catalogue_name("city", &got).unwrap();
        }
    }
}

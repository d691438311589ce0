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
            r#"kind "ftp" is not http, socks5, direct or agent"#,
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
fn agent_nodes_keep_their_key_hashed_and_never_write_it_out() {
    let body: NodeFields = serde_json::from_str(
        r#"{"id": "dev-1", "kind": "agent", "key": "ak_plain", "country": "us", "city": "new_york"}"#,
    )
    .unwrap();
    let debug = format!("{body:?}");
    assert!(!debug.contains("ak_plain"), "{debug}");
    let d = body.to_decl().unwrap();
    assert_eq!(d.kind, NodeKind::Agent);
    assert_eq!(d.key_hash, Some(hash_agent_key("ak_plain")));
    let stored = serde_json::to_string(&NodeFields::from_decl(&d)).unwrap();
    assert!(!stored.contains("ak_plain"), "{stored}");
    assert!(
        stored.contains(&format!(
            r#""key_hash":"{}""#,
            hash_to_hex(&hash_agent_key("ak_plain"))
        )),
        "{stored}"
    );
    let back: NodeFields = serde_json::from_str(&stored).unwrap();
    assert_eq!(back.to_decl().unwrap(), d, "the store's form reads back");
    // Fields that carry a key are never serialised with it.
    let with_key = NodeFields {
        key: Some("ak_plain".into()),
        ..NodeFields::default()
    };
    assert_eq!(serde_json::to_string(&with_key).unwrap(), "{}");

    // A key given as its hash (so a file need not hold the key).
    let hashed: NodeFields = serde_json::from_str(&format!(
        r#"{{"id": "dev-2", "kind": "agent", "key_hash": "{}"}}"#,
        hash_to_hex(&hash_agent_key("k2")).to_uppercase()
    ))
    .unwrap();
    assert_eq!(
        hashed.to_decl().unwrap().key_hash,
        Some(hash_agent_key("k2"))
    );

    // A node that stops being an agent forgets its key.
    let mut d2 = d.clone();
    let to_http: NodeFields =
        serde_json::from_str(r#"{"kind": "http", "addr": "127.0.0.1:8080"}"#).unwrap();
    to_http.apply(&mut d2).unwrap();
    assert_eq!(d2.key_hash, None);
    // A new key replaces the old hash.
    let mut d3 = d.clone();
    let rekey: NodeFields = serde_json::from_str(r#"{"key": "ak_new"}"#).unwrap();
    rekey.apply(&mut d3).unwrap();
    assert_eq!(d3.key_hash, Some(hash_agent_key("ak_new")));
}

#[test]
fn agent_nodes_are_refused_with_what_they_lack_or_must_not_have() {
    for (json, needle) in [
        (
            r#"{"id": "d", "kind": "agent"}"#,
            "node d: key: an agent node needs a key",
        ),
        (
            r#"{"id": "d", "kind": "agent", "key": "k", "addr": "127.0.0.1:1"}"#,
            "node d: addr: an agent node has no addr",
        ),
        (
            r#"{"id": "d", "kind": "agent", "key": "k", "bind": "127.0.0.1"}"#,
            "node d: bind: an agent node has no bind",
        ),
        (
            r#"{"id": "d", "kind": "agent", "key": "k", "username": "u", "password": "p"}"#,
            "node d: username: an agent node has no upstream credentials",
        ),
        (
            r#"{"id": "d", "kind": "agent", "key": "k", "key_hash": "00"}"#,
            "node d: key: give key or key_hash, not both",
        ),
        (
            r#"{"id": "d", "kind": "agent", "key_hash": "00"}"#,
            "node d: key_hash: 64 hex digits",
        ),
        (
            r#"{"id": "d", "kind": "agent", "key": "a:b"}"#,
            "node d: key: no control characters and no ':'",
        ),
        (
            r#"{"id": "d", "kind": "direct", "bind": "127.0.0.1", "key": "k"}"#,
            "node d: key: only an agent node has a key",
        ),
        (
            r#"{"id": "d", "kind": "robot"}"#,
            "http, socks5, direct or agent",
        ),
    ] {
        let e = error_of(json, NodeFields::to_decl);
        assert!(e.contains(needle), "{json}: {e}");
    }
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

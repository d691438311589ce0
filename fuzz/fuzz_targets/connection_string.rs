//! `rules::parse` on arbitrary text (UTF-8, lossily decoded) with a small
//! fixed catalogue; whenever it parses, the canonical username parses back to
//! equal rules.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use splicegate_control::geo::{Country, GeoCatalog, GeoKind};
use splicegate_control::rules;

static GEO: LazyLock<GeoCatalog> = LazyLock::new(|| {
    let mut geo = GeoCatalog::new();
    let names: &[(&str, GeoKind, &str)] = &[
        ("us", GeoKind::Region, "new_york"),
        ("us", GeoKind::Region, "california"),
        ("us", GeoKind::City, "new_york"),
        ("us", GeoKind::City, "los_angeles"),
        ("us", GeoKind::Isp, "verizon_wireless"),
        ("us", GeoKind::Isp, "comcast"),
        ("gb", GeoKind::City, "london"),
        ("gb", GeoKind::Isp, "bt"),
        ("fr", GeoKind::Isp, "orange"),
        ("de", GeoKind::City, "berlin"),
    ];
    for &(c, kind, name) in names {
        geo.add(Country::parse(c).expect("ISO code"), kind, name);
    }
    geo
});

fuzz_target!(|data: &[u8]| {
    let username = String::from_utf8_lossy(data);
    let Ok(parsed) = rules::parse(&username, &GEO) else {
        return;
    };
    let canonical = parsed.to_username(&GEO);
    match rules::parse(&canonical, &GEO) {
        Ok(again) => assert_eq!(
            again, parsed,
            "{username:?} → {canonical:?} parses to other rules"
        ),
        Err(e) => {
            panic!("{username:?} parses but its canonical form {canonical:?} does not: {e:?}")
        }
    }
});

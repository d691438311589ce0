//! `[agents] geoip`: MaxMind-format databases (GeoIP2/GeoLite2 City,
//! Country, ASN, ISP) that give an enrolling device the attributes of the
//! public address it connected from.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use maxminddb::{Reader, geoip2};

/// What a database answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Country, region (first subdivision), city.
    City,
    /// Country only.
    Country,
    /// AS number and its organisation (taken as the ISP).
    Asn,
    /// ISP and AS number.
    Isp,
}

/// The databases, opened once (re-read on restart).
pub(crate) struct GeoIp {
    dbs: Vec<(PathBuf, Kind, Reader<Vec<u8>>)>,
}

impl std::fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.dbs.iter().map(|(p, k, _)| (p, k)))
            .finish()
    }
}

fn kind_of(database_type: &str) -> Option<Kind> {
    let t = database_type.to_ascii_lowercase();
    Some(if t.contains("city") {
        Kind::City
    } else if t.contains("country") {
        Kind::Country
    } else if t.contains("asn") {
        Kind::Asn
    } else if t.contains("isp") {
        Kind::Isp
    } else {
        return None;
    })
}

impl GeoIp {
    /// Opens each file; one the gateway cannot read or use is an error that
    /// names it.
    pub(crate) fn open(paths: &[PathBuf]) -> Result<GeoIp> {
        let mut dbs = Vec::with_capacity(paths.len());
        for p in paths {
            let reader = Reader::open_readfile(p)
                .with_context(|| format!("[agents] geoip {}", p.display()))?;
            let t = reader.metadata.database_type.clone();
            let Some(kind) = kind_of(&t) else {
                bail!(
                    "[agents] geoip {}: a {t:?} database gives no country, city, ASN or ISP",
                    p.display()
                );
            };
            dbs.push((p.clone(), kind, reader));
        }
        Ok(GeoIp { dbs })
    }

    /// The attributes of `ip` (`country`, `region`, `city`, `isp`, `asn`),
    /// as the databases give them (names as they spell them; the store
    /// puts them in catalogue form). The first database that answers a
    /// field gives it.
    pub(crate) fn lookup(&self, ip: IpAddr) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v.filter(|v| !v.is_empty())
                && !out.iter().any(|(have, _)| have == k)
            {
                out.push((k.to_string(), v));
            }
        };
        let en = |names: Option<&std::collections::BTreeMap<&str, &str>>| {
            names.and_then(|n| n.get("en")).map(|s| s.to_string())
        };
        for (path, kind, reader) in &self.dbs {
            let found = match kind {
                Kind::City => reader.lookup::<geoip2::City<'_>>(ip).map(|c| {
                    c.map(|c| {
                        put(
                            "country",
                            c.country.and_then(|c| c.iso_code).map(str::to_string),
                        );
                        let region = c.subdivisions.as_ref().and_then(|s| s.first());
                        put("region", region.and_then(|r| en(r.names.as_ref())));
                        put("city", c.city.and_then(|c| en(c.names.as_ref())));
                    })
                }),
                Kind::Country => reader.lookup::<geoip2::Country<'_>>(ip).map(|c| {
                    c.map(|c| {
                        put(
                            "country",
                            c.country.and_then(|c| c.iso_code).map(str::to_string),
                        );
                    })
                }),
                Kind::Asn => reader.lookup::<geoip2::Asn<'_>>(ip).map(|a| {
                    a.map(|a| {
                        put("asn", a.autonomous_system_number.map(|n| n.to_string()));
                        put("isp", a.autonomous_system_organization.map(str::to_string));
                    })
                }),
                Kind::Isp => reader.lookup::<geoip2::Isp<'_>>(ip).map(|a| {
                    a.map(|a| {
                        put("isp", a.isp.map(str::to_string));
                        put("asn", a.autonomous_system_number.map(|n| n.to_string()));
                    })
                }),
            };
            if let Err(e) = found {
                tracing::warn!(db = %path.display(), %ip, error = %e, "geoip lookup failed");
            }
        }
        out
    }
}

/// Announced attributes with the looked-up ones winning (they are facts
/// about the address; a device may announce what the databases lack, such
/// as its network type).
pub(crate) fn merge(
    looked_up: Vec<(String, String)>,
    announced: Vec<(String, String)>,
) -> Vec<(String, String)> {
    let mut out = looked_up;
    for (k, v) in announced {
        if !out.iter().any(|(have, _)| *have == k) {
            out.push((k, v));
        }
    }
    out
}

/// The test databases' directory (MaxMind's published test data).
#[cfg(test)]
fn testdata() -> &'static std::path::Path {
    std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/maxmind"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> GeoIp {
        GeoIp::open(&[
            testdata().join("GeoIP2-City-Test.mmdb"),
            testdata().join("GeoLite2-ASN-Test.mmdb"),
        ])
        .expect("the test databases open")
    }

    fn get<'a>(attrs: &'a [(String, String)], k: &str) -> Option<&'a str> {
        attrs
            .iter()
            .find(|(have, _)| have == k)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn an_address_gets_its_country_region_city_and_asn() {
        let g = db();
        let london = g.lookup("81.2.69.142".parse().unwrap());
        assert_eq!(get(&london, "country"), Some("GB"), "{london:?}");
        assert_eq!(get(&london, "region"), Some("England"));
        assert_eq!(get(&london, "city"), Some("London"));
        let telstra = g.lookup("1.128.0.1".parse().unwrap());
        assert_eq!(get(&telstra, "asn"), Some("1221"), "{telstra:?}");
        assert_eq!(get(&telstra, "isp"), Some("Telstra Pty Ltd"));
        // Non-ASCII names come as the database spells them; the store
        // folds them (Linköping → linkoping).
        let se = g.lookup("89.160.20.112".parse().unwrap());
        assert_eq!(get(&se, "city"), Some("Linköping"), "{se:?}");
        // An address no database knows gives nothing.
        assert!(g.lookup("127.0.0.1".parse().unwrap()).is_empty());
    }

    #[test]
    fn looked_up_attributes_win_over_announced_ones() {
        let m = merge(
            vec![("country".into(), "GB".into())],
            vec![
                ("country".into(), "us".into()),
                ("network".into(), "mobile".into()),
            ],
        );
        assert_eq!(get(&m, "country"), Some("GB"));
        assert_eq!(get(&m, "network"), Some("mobile"));
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused_with_its_name() {
        let e = GeoIp::open(&[testdata().join("README.md")]).unwrap_err();
        assert!(format!("{e:#}").contains("README.md"), "{e:#}");
    }
}

//! Declarations as JSON: what the API accepts and what the store keeps for
//! packages and nodes, read into the policy crate's declarations with every
//! value checked (a bad value is a message for a 422, never a panic).

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};
use splicegate_control::geo::Country;
use splicegate_control::limits::{MICRO, credits_to_micro};
use splicegate_control::nodes::{NodeDecl, NodeKind, NodeState};
use splicegate_control::policy::{AuthMode, PackageDecl, PackageStatus, Protocol, ProtocolSet};
use splicegate_control::rules::{Feature, FeatureSet, Network, NetworkSet};

/// `null` → `Some(None)`, absent → `None` (for fields a PATCH may clear).
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A package's fields; every one optional (create fills defaults, PATCH
/// changes what is given). The store keeps the full set with
/// `price_micro_per_gb`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageFields {
    /// Numeric id (create only; generated when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// The organisation, or `null` for none.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub org: Option<Option<String>>,
    /// The key (generated on create when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `active`, `paused`, `suspended`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `http`, `https`, `socks5`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<String>>,
    /// `res`, `mob`, `dc`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    /// Plan features.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<String>>,
    /// `password`, `ip`, `password+ip`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// Client CIDRs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_allowlist: Option<Vec<IpNet>>,
    /// Rules without `package-<id>-`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_rules: Option<String>,
    /// 0 = unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rps_limit: Option<u32>,
    /// 0 = unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// 0 = unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_limit_bytes: Option<u64>,
    /// Credits per GB, a decimal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_per_gb: Option<f64>,
    /// Micro-credits per GB, exact (what the store keeps).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_micro_per_gb: Option<u64>,
}

fn names<T>(
    what: &str,
    items: &[String],
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Vec<T>, String> {
    items
        .iter()
        .map(|s| parse(s).ok_or_else(|| format!("unknown {what} {s:?}")))
        .collect()
}

impl PackageFields {
    /// The full set of a declaration, for the store.
    pub fn from_decl(d: &PackageDecl) -> Self {
        PackageFields {
            id: Some(d.id),
            org: Some(d.org.clone()),
            key: Some(d.key.clone()),
            status: Some(d.status.as_str().into()),
            protocols: Some(d.protocols.iter().map(|p| p.as_str().into()).collect()),
            networks: Some(d.networks.iter().map(|n| n.as_str().into()).collect()),
            features: Some(d.features.iter().map(|f| f.as_str().into()).collect()),
            auth: Some(d.auth.as_str().into()),
            ip_allowlist: Some(d.ip_allowlist.clone()),
            default_rules: Some(d.default_rules.clone()),
            rps_limit: Some(d.rps_limit),
            max_connections: Some(d.max_connections),
            traffic_limit_bytes: Some(d.traffic_limit_bytes),
            price_per_gb: None,
            price_micro_per_gb: Some(d.price_per_gb),
        }
    }

    /// Apply the given fields to `d` (the id is not changed here).
    pub fn apply(&self, d: &mut PackageDecl) -> Result<(), String> {
        if let Some(org) = &self.org {
            if org.as_deref() == Some("") {
                return Err("org: an empty id; use null for no organisation".into());
            }
            d.org = org.clone();
        }
        if let Some(k) = &self.key {
            if k.is_empty() || k.len() > splicegate_control::policy::MAX_KEY {
                return Err(format!(
                    "key: 1 to {} bytes",
                    splicegate_control::policy::MAX_KEY
                ));
            }
            if k.chars().any(|c| c.is_control() || c == ':') {
                return Err("key: no control characters and no ':'".into());
            }
            d.key = k.clone();
        }
        if let Some(s) = &self.status {
            d.status = PackageStatus::parse(s)
                .ok_or_else(|| format!("status {s:?} is not active, paused or suspended"))?;
        }
        if let Some(v) = &self.protocols {
            d.protocols = ProtocolSet::of(names("protocol", v, Protocol::parse)?);
        }
        if let Some(v) = &self.networks {
            d.networks = NetworkSet::of(names("network", v, Network::parse)?);
        }
        if let Some(v) = &self.features {
            d.features = FeatureSet::of(names("feature", v, Feature::parse)?);
        }
        if let Some(a) = &self.auth {
            d.auth = AuthMode::parse(a)
                .ok_or_else(|| format!("auth {a:?} is not password, ip or password+ip"))?;
        }
        if let Some(v) = &self.ip_allowlist {
            d.ip_allowlist = v.clone();
        }
        if let Some(r) = &self.default_rules {
            d.default_rules = r.clone();
        }
        if let Some(v) = self.rps_limit {
            d.rps_limit = v;
        }
        if let Some(v) = self.max_connections {
            d.max_connections = v;
        }
        if let Some(v) = self.traffic_limit_bytes {
            d.traffic_limit_bytes = v;
        }
        match (self.price_per_gb, self.price_micro_per_gb) {
            (Some(_), Some(_)) => {
                return Err("give price_per_gb or price_micro_per_gb, not both".into());
            }
            (Some(p), None) => {
                let micro = credits_to_micro(p).filter(|m| *m >= 0).ok_or_else(|| {
                    format!("price_per_gb {p} is not a credit amount of 0 or more")
                })?;
                d.price_per_gb = micro as u64;
            }
            (None, Some(m)) => d.price_per_gb = m,
            (None, None) => {}
        }
        Ok(())
    }

    /// A declaration from the store's full set.
    pub fn to_decl(&self) -> Result<PackageDecl, String> {
        let id = self.id.ok_or("no id")?;
        let key = self.key.as_deref().ok_or("no key")?;
        let mut d = PackageDecl::new(id, key);
        self.apply(&mut d)?;
        Ok(d)
    }
}

/// A node's fields; every one optional (create needs `id` and `kind`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFields {
    /// The operator's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `http`, `socks5`, `direct`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Upstream proxy address (`http`, `socks5`).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub addr: Option<Option<SocketAddr>>,
    /// Source address (`direct`).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub bind: Option<Option<IpAddr>>,
    /// Upstream proxy username (with `password`).
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub username: Option<Option<String>>,
    /// Upstream proxy password.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub password: Option<Option<String>>,
    /// ISO 3166-1 alpha-2, lowercase.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub country: Option<Option<String>>,
    /// Catalogue name.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub region: Option<Option<String>>,
    /// Catalogue name.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub city: Option<Option<String>>,
    /// Catalogue name.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub isp: Option<Option<String>>,
    /// AS number.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub asn: Option<Option<u32>>,
    /// `res` (default), `mob`, `dc`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// `online` (default), `draining`, `offline`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

fn catalogue_name(what: &str, n: &str) -> Result<(), String> {
    if n.is_empty()
        || n.len() > 128
        || !n
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
    {
        return Err(format!(
            "{what} {n:?} is not a catalogue name (lowercase letters, digits, _)"
        ));
    }
    Ok(())
}

/// Parse a node kind.
pub fn node_kind(s: &str) -> Option<NodeKind> {
    match s {
        "http" => Some(NodeKind::Http),
        "socks5" => Some(NodeKind::Socks5),
        "direct" => Some(NodeKind::Direct),
        _ => None,
    }
}

impl NodeFields {
    /// The full set of a declaration, for the store.
    pub fn from_decl(d: &NodeDecl) -> Self {
        NodeFields {
            id: Some(d.id.clone()),
            kind: Some(d.kind.as_str().into()),
            addr: Some(d.addr),
            bind: Some(d.bind),
            username: Some(d.credentials.as_ref().map(|c| c.0.clone())),
            password: Some(d.credentials.as_ref().map(|c| c.1.clone())),
            country: Some(d.country.map(|c| c.as_str().to_string())),
            region: Some(d.region.clone()),
            city: Some(d.city.clone()),
            isp: Some(d.isp.clone()),
            asn: Some(d.asn),
            network: Some(d.network.as_str().into()),
            state: Some(d.state.as_str().into()),
        }
    }

    /// Whether only `state` is given (a PATCH that needs no rebuild).
    pub fn only_state(&self) -> bool {
        let NodeFields {
            id,
            kind,
            addr,
            bind,
            username,
            password,
            country,
            region,
            city,
            isp,
            asn,
            network,
            state,
        } = self;
        state.is_some()
            && id.is_none()
            && kind.is_none()
            && addr.is_none()
            && bind.is_none()
            && username.is_none()
            && password.is_none()
            && country.is_none()
            && region.is_none()
            && city.is_none()
            && isp.is_none()
            && asn.is_none()
            && network.is_none()
    }

    /// Apply the given fields to `d` (not the id), then check what its kind needs.
    pub fn apply(&self, d: &mut NodeDecl) -> Result<(), String> {
        if let Some(k) = &self.kind {
            d.kind =
                node_kind(k).ok_or_else(|| format!("kind {k:?} is not http, socks5 or direct"))?;
        }
        if let Some(a) = self.addr {
            d.addr = a;
        }
        if let Some(b) = self.bind {
            d.bind = b;
        }
        let user = self
            .username
            .clone()
            .unwrap_or_else(|| d.credentials.as_ref().map(|c| c.0.clone()));
        let pass = self
            .password
            .clone()
            .unwrap_or_else(|| d.credentials.as_ref().map(|c| c.1.clone()));
        d.credentials = match (user, pass) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            _ => return Err("username and password go together".into()),
        };
        if let Some(c) = &self.country {
            d.country = match c {
                Some(c) => Some(Country::parse(c).ok_or_else(|| {
                    format!("country {c:?} is not a lowercase ISO 3166-1 alpha-2 code")
                })?),
                None => None,
            };
        }
        for (what, given, field) in [
            ("region", &self.region, &mut d.region),
            ("city", &self.city, &mut d.city),
            ("isp", &self.isp, &mut d.isp),
        ] {
            if let Some(v) = given {
                if let Some(n) = v {
                    catalogue_name(what, n)?;
                }
                *field = v.clone();
            }
        }
        if let Some(a) = self.asn {
            d.asn = a;
        }
        if let Some(n) = &self.network {
            d.network =
                Network::parse(n).ok_or_else(|| format!("network {n:?} is not res, mob or dc"))?;
        }
        if let Some(s) = &self.state {
            d.state = NodeState::parse(s)
                .ok_or_else(|| format!("state {s:?} is not online, draining or offline"))?;
        }
        d.validate()
    }

    /// A new declaration (create, or the store's full set).
    pub fn to_decl(&self) -> Result<NodeDecl, String> {
        let id = self.id.clone().ok_or("a node needs an id")?;
        let kind = self.kind.as_deref().ok_or("a node needs a kind")?;
        let mut d = NodeDecl {
            id,
            kind: node_kind(kind)
                .ok_or_else(|| format!("kind {kind:?} is not http, socks5 or direct"))?,
            addr: None,
            bind: None,
            credentials: None,
            country: None,
            region: None,
            city: None,
            isp: None,
            asn: None,
            network: Network::Res,
            state: NodeState::Online,
            from_file: false,
        };
        self.apply(&mut d)?;
        Ok(d)
    }
}

/// A decimal credit amount from micro-credits, for JSON.
pub fn credits(micro: i64) -> f64 {
    micro as f64 / MICRO as f64
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let stored = serde_json::to_string(&PackageFields::from_decl(&d)).unwrap();
        let back: PackageFields = serde_json::from_str(&stored).unwrap();
        assert_eq!(back.to_decl().unwrap(), d);
    }

    #[test]
    fn bad_values_are_messages() {
        for (json, needle) in [
            (r#"{"id": 1, "key": "k", "status": "on"}"#, "status"),
            (r#"{"id": 1, "key": "k", "protocols": ["ftp"]}"#, "ftp"),
            (
                r#"{"id": 1, "key": "k", "price_per_gb": -1}"#,
                "price_per_gb",
            ),
            (r#"{"id": 1, "key": "a:b"}"#, "key"),
        ] {
            let f: PackageFields = serde_json::from_str(json).unwrap();
            let e = f.to_decl().unwrap_err();
            assert!(e.contains(needle), "{json}: {e}");
        }
        assert!(serde_json::from_str::<PackageFields>(r#"{"rps": 1}"#).is_err());
        for (json, needle) in [
            (r#"{"id": "n", "kind": "http"}"#, "needs addr"),
            (r#"{"id": "n", "kind": "ftp"}"#, "kind"),
            (
                r#"{"id": "n", "kind": "direct", "bind": "127.0.0.1", "country": "USA"}"#,
                "ISO",
            ),
            (
                r#"{"id": "n", "kind": "direct", "bind": "127.0.0.1", "city": "New York"}"#,
                "catalogue",
            ),
            (
                r#"{"id": "n", "kind": "http", "addr": "127.0.0.1:1", "username": "u"}"#,
                "together",
            ),
        ] {
            let f: NodeFields = serde_json::from_str(json).unwrap();
            let e = f.to_decl().unwrap_err();
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
        let back: NodeFields =
            serde_json::from_str(&serde_json::to_string(&NodeFields::from_decl(&d)).unwrap())
                .unwrap();
        assert_eq!(back.to_decl().unwrap(), d);
        let patch: NodeFields =
            serde_json::from_str(r#"{"city": null, "state": "draining"}"#).unwrap();
        assert!(!patch.only_state());
        patch.apply(&mut d).unwrap();
        assert_eq!(d.city, None);
        assert_eq!(d.state, NodeState::Draining);
        let only: NodeFields = serde_json::from_str(r#"{"state": "offline"}"#).unwrap();
        assert!(only.only_state());
    }
}

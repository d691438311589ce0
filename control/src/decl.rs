//! The one declaration schema of packages and nodes: what the configuration
//! file (`[[package]]`, `[[node]]`), the admin API (JSON, with PATCH) and the
//! store read and write, converted into the policy's [`PackageDecl`] and
//! [`NodeDecl`] under one set of rules, with a [`DeclError`] that names the
//! object and the field.
//!
//! Every field is optional: a create fills defaults, a PATCH changes what it
//! gives, and `null` clears a field that may be absent (JSON only; TOML has
//! no null). The value types are the policy's own enums, read by name
//! (`"paused"`, `"socks5"`), so a bad name is refused where it is read.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::geo::Country;
use crate::limits::credits_to_micro;
use crate::nodes::{NodeDecl, NodeKind, NodeState, hash_agent_key, hash_from_hex, hash_to_hex};
use crate::policy::{AuthMode, MAX_KEY, PackageDecl, PackageStatus, Protocol, ProtocolSet};
use crate::rules::{Feature, FeatureSet, Network, NetworkSet};

/// Longest node id, and longest catalogue name, in bytes.
pub const MAX_NAME: usize = 128;

/// Why a declaration was refused. Messages name the object and the field,
/// fit for a 422 answer or a `check-config` line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeclError {
    /// A field's value is not allowed.
    #[error("{field}: {why}")]
    Field {
        /// The field, as the file and the API spell it.
        field: &'static str,
        /// What is wrong, and what is allowed.
        why: String,
    },
    /// A field the object needs is absent.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// Two objects of one kind share an id.
    #[error("{0} is declared twice")]
    Duplicate(String),
    /// An error within one object (`package 7`, `node us-1`).
    #[error("{owner}: {error}")]
    In {
        /// The object.
        owner: String,
        /// What is wrong with it.
        error: Box<DeclError>,
    },
}

impl DeclError {
    /// A field's value is not allowed.
    pub fn field(field: &'static str, why: impl Into<String>) -> Self {
        DeclError::Field {
            field,
            why: why.into(),
        }
    }

    /// The same error, said of `owner`.
    pub fn within(self, owner: impl fmt::Display) -> Self {
        DeclError::In {
            owner: owner.to_string(),
            error: Box::new(self),
        }
    }
}

/// An error a name-parsing `FromStr` gives: the value and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{noun} {value:?} is not {allowed}")]
pub struct UnknownName {
    noun: &'static str,
    value: String,
    allowed: &'static str,
}

/// Names in files and the API for an enum that has `as_str` and `parse`:
/// `Display`, `FromStr` and serde by name.
macro_rules! named {
    ($t:ty, $noun:literal, $allowed:literal) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        named!(@parse $t, $noun, $allowed);
    };
    (@parse $t:ty, $noun:literal, $allowed:literal) => {
        impl FromStr for $t {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                <$t>::parse(s).ok_or_else(|| UnknownName {
                    noun: $noun,
                    value: s.to_owned(),
                    allowed: $allowed,
                })
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

named!(PackageStatus, "status", "active, paused or suspended");
named!(Protocol, "protocol", "http, https or socks5");
named!(Network, "network", "res, mob or dc");
named!(Feature, "feature", "city, region, isp, asn, bind or prefer");
named!(AuthMode, "auth", "password, ip or password+ip");
named!(NodeKind, "kind", "http, socks5, direct or agent");
named!(NodeState, "state", "online, draining or offline");
named!(@parse Country, "country", "a lowercase ISO 3166-1 alpha-2 code");

/// `null` → `Some(None)`, absent → `None` (for fields a PATCH may clear).
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Check a catalogue name (region, city, ISP): lowercase letters, digits and
/// `_`, 1 to [`MAX_NAME`] bytes.
pub fn catalogue_name(field: &'static str, n: &str) -> Result<(), DeclError> {
    let ok = !n.is_empty()
        && n.len() <= MAX_NAME
        && n.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
    if ok {
        Ok(())
    } else {
        Err(DeclError::field(
            field,
            format!(
                "{n:?} is not a catalogue name (lowercase letters, digits, _; at most {MAX_NAME} bytes)"
            ),
        ))
    }
}

/// The catalogue form of a name a device announces or a lookup gives
/// (`"New York"`, `"Saint-Étienne"`, `"Comcast Cable"`): ASCII lowercase,
/// common Latin accents folded (`é` → `e`, `ß` → `ss`), apostrophes dropped,
/// every other run of characters that are not letters or digits one `_`,
/// none at either end (`new_york`, `saint_etienne`, `comcast_cable`). The
/// result may still be refused by [`catalogue_name`] (empty, too long).
pub fn normalise_name(raw: &str) -> String {
    fn push(out: &mut String, s: &str, gap: &mut bool) {
        if *gap && !out.is_empty() {
            out.push('_');
        }
        *gap = false;
        out.push_str(s);
    }
    let mut out = String::with_capacity(raw.len());
    let mut gap = false;
    for c in raw.chars() {
        let lower = c.to_ascii_lowercase();
        if lower.is_ascii_lowercase() || lower.is_ascii_digit() {
            let mut b = [0u8; 4];
            push(&mut out, lower.encode_utf8(&mut b), &mut gap);
        } else if matches!(c, '\'' | '\u{2019}' | '`') {
            // "Land's End" → lands_end
        } else if let Some(folded) = fold_accent(c) {
            push(&mut out, folded, &mut gap);
        } else {
            gap = true;
        }
    }
    out
}

/// A Latin letter with a diacritic (or a ligature) as ASCII.
fn fold_accent(c: char) -> Option<&'static str> {
    Some(match c.to_lowercase().next().unwrap_or(c) {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' => "a",
        'æ' => "ae",
        'ç' | 'ć' | 'ĉ' | 'ċ' | 'č' => "c",
        'ď' | 'đ' | 'ð' => "d",
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ĕ' | 'ė' | 'ę' | 'ě' => "e",
        'ĝ' | 'ğ' | 'ġ' | 'ģ' => "g",
        'ĥ' | 'ħ' => "h",
        'ì' | 'í' | 'î' | 'ï' | 'ĩ' | 'ī' | 'ĭ' | 'į' | 'ı' => "i",
        'ĵ' => "j",
        'ķ' => "k",
        'ĺ' | 'ļ' | 'ľ' | 'ŀ' | 'ł' => "l",
        'ñ' | 'ń' | 'ņ' | 'ň' => "n",
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ŏ' | 'ő' => "o",
        'œ' => "oe",
        'ŕ' | 'ŗ' | 'ř' => "r",
        'ś' | 'ŝ' | 'ş' | 'š' | 'ș' => "s",
        'ß' => "ss",
        'ţ' | 'ť' | 'ŧ' | 'ț' => "t",
        'þ' => "th",
        'ù' | 'ú' | 'û' | 'ü' | 'ũ' | 'ū' | 'ŭ' | 'ů' | 'ű' | 'ų' => "u",
        'ŵ' => "w",
        'ý' | 'ÿ' | 'ŷ' => "y",
        'ź' | 'ż' | 'ž' => "z",
        _ => return None,
    })
}

/// A package's fields; every one optional (create fills defaults, PATCH
/// changes what is given). The store keeps the full set with
/// `price_micro_per_gb`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageFields {
    /// Numeric id (generated on an API create when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// The organisation, or `null` for none.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub org: Option<Option<String>>,
    /// The key (generated on an API create when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `active`, `paused`, `suspended`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<PackageStatus>,
    /// `http`, `https`, `socks5`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<Protocol>>,
    /// `res`, `mob`, `dc`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<Network>>,
    /// Plan features.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<Feature>>,
    /// `password`, `ip`, `password+ip`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthMode>,
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

impl PackageFields {
    /// The full set of a declaration, for the store.
    pub fn from_decl(d: &PackageDecl) -> Self {
        PackageFields {
            id: Some(d.id),
            org: Some(d.org.clone()),
            key: Some(d.key.clone()),
            status: Some(d.status),
            protocols: Some(d.protocols.iter().collect()),
            networks: Some(d.networks.iter().collect()),
            features: Some(d.features.iter().collect()),
            auth: Some(d.auth),
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
    pub fn apply(&self, d: &mut PackageDecl) -> Result<(), DeclError> {
        if let Some(org) = &self.org {
            if org.as_deref() == Some("") {
                return Err(DeclError::field(
                    "org",
                    "an empty id; use null for no organisation",
                ));
            }
            d.org = org.clone();
        }
        if let Some(k) = &self.key {
            check_key(k)?;
            d.key = k.clone();
        }
        if let Some(s) = self.status {
            d.status = s;
        }
        if let Some(v) = &self.protocols {
            d.protocols = ProtocolSet::of(v.iter().copied());
        }
        if let Some(v) = &self.networks {
            d.networks = NetworkSet::of(v.iter().copied());
        }
        if let Some(v) = &self.features {
            d.features = FeatureSet::of(v.iter().copied());
        }
        if let Some(a) = self.auth {
            d.auth = a;
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
                return Err(DeclError::field(
                    "price_per_gb",
                    "give price_per_gb or price_micro_per_gb, not both",
                ));
            }
            (Some(p), None) => {
                let micro = credits_to_micro(p).filter(|m| *m >= 0).ok_or_else(|| {
                    DeclError::field(
                        "price_per_gb",
                        format!("{p} is not a credit amount of 0 or more"),
                    )
                })?;
                d.price_per_gb = micro as u64;
            }
            (None, Some(m)) => d.price_per_gb = m,
            (None, None) => {}
        }
        Ok(())
    }

    /// A declaration of the given fields over the defaults; needs `id` and
    /// `key`.
    pub fn to_decl(&self) -> Result<PackageDecl, DeclError> {
        let id = self.id.ok_or(DeclError::Missing("id"))?;
        let within = |e: DeclError| e.within(format_args!("package {id}"));
        let key = self
            .key
            .as_deref()
            .ok_or(DeclError::Missing("key"))
            .map_err(within)?;
        let mut d = PackageDecl::new(id, key);
        self.apply(&mut d).map_err(within)?;
        Ok(d)
    }
}

/// A package key: 1 to [`MAX_KEY`] bytes, no control characters, no `:`
/// (it is a Basic password).
pub fn check_key(k: &str) -> Result<(), DeclError> {
    if k.is_empty() || k.len() > MAX_KEY {
        return Err(DeclError::field("key", format!("1 to {MAX_KEY} bytes")));
    }
    if k.chars().any(|c| c.is_control() || c == ':') {
        return Err(DeclError::field("key", "no control characters and no ':'"));
    }
    Ok(())
}

/// A node's fields; every one optional (create needs `id` and `kind`).
/// `Debug` shows neither the password nor the key.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFields {
    /// The operator's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `http`, `socks5`, `direct`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<NodeKind>,
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
    pub country: Option<Option<Country>>,
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
    pub network: Option<Network>,
    /// `online` (default), `draining`, `offline`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<NodeState>,
    /// An agent node's key, as the file and the API give it: hashed into the
    /// declaration at once and never written out (not serialised).
    #[serde(default, skip_serializing)]
    pub key: Option<String>,
    /// The hex SHA-256 of an agent node's key: what the store keeps; the
    /// file and the API may give it instead of `key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_hash: Option<String>,
    /// A `socks5` node whose upstream serves UDP ASSOCIATE (`direct` and
    /// `agent` nodes always carry UDP, `http` nodes never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp: Option<bool>,
}

impl fmt::Debug for NodeFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |v: bool| v.then_some("***");
        f.debug_struct("NodeFields")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("addr", &self.addr)
            .field("bind", &self.bind)
            .field("username", &self.username)
            .field(
                "password",
                &self.password.as_ref().map(|p| hidden(p.is_some())),
            )
            .field("country", &self.country)
            .field("region", &self.region)
            .field("city", &self.city)
            .field("isp", &self.isp)
            .field("asn", &self.asn)
            .field("network", &self.network)
            .field("state", &self.state)
            .field("key", &hidden(self.key.is_some()))
            .field("key_hash", &hidden(self.key_hash.is_some()))
            .field("udp", &self.udp)
            .finish()
    }
}

impl NodeFields {
    /// The full set of a declaration, for the store.
    pub fn from_decl(d: &NodeDecl) -> Self {
        NodeFields {
            id: Some(d.id.clone()),
            kind: Some(d.kind),
            addr: Some(d.addr),
            bind: Some(d.bind),
            username: Some(d.credentials.as_ref().map(|c| c.0.clone())),
            password: Some(d.credentials.as_ref().map(|c| c.1.clone())),
            country: Some(d.country),
            region: Some(d.region.clone()),
            city: Some(d.city.clone()),
            isp: Some(d.isp.clone()),
            asn: Some(d.asn),
            network: Some(d.network),
            state: Some(d.state),
            key: None,
            key_hash: d.key_hash.as_ref().map(hash_to_hex),
            udp: d.udp.then_some(true),
        }
    }

    /// Whether only `state` is given (a PATCH that needs no rebuild).
    pub fn only_state(&self) -> bool {
        let only = NodeFields {
            state: self.state,
            ..NodeFields::default()
        };
        self.state.is_some() && *self == only
    }

    /// Apply the given fields to `d` (not the id), then check what its kind
    /// needs.
    pub fn apply(&self, d: &mut NodeDecl) -> Result<(), DeclError> {
        if let Some(k) = self.kind {
            d.kind = k;
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
            _ => {
                return Err(DeclError::field(
                    "username",
                    "username and password go together",
                ));
            }
        };
        if let Some(c) = self.country {
            d.country = c;
        }
        for (field, given, slot) in [
            ("region", &self.region, &mut d.region),
            ("city", &self.city, &mut d.city),
            ("isp", &self.isp, &mut d.isp),
        ] {
            if let Some(v) = given {
                if let Some(n) = v {
                    catalogue_name(field, n)?;
                }
                *slot = v.clone();
            }
        }
        if let Some(a) = self.asn {
            d.asn = a;
        }
        if let Some(n) = self.network {
            d.network = n;
        }
        if let Some(s) = self.state {
            d.state = s;
        }
        if let Some(u) = self.udp {
            d.udp = u;
        }
        match (&self.key, &self.key_hash) {
            (Some(_), Some(_)) => {
                return Err(DeclError::field("key", "give key or key_hash, not both"));
            }
            (Some(k), None) => {
                check_key(k)?;
                d.key_hash = Some(hash_agent_key(k));
            }
            (None, Some(h)) => {
                d.key_hash = Some(hash_from_hex(h).ok_or_else(|| {
                    DeclError::field("key_hash", "64 hex digits: the SHA-256 of the key")
                })?);
            }
            (None, None) => {}
        }
        if d.kind != NodeKind::Agent {
            if self.key.is_some() || self.key_hash.is_some() {
                return Err(DeclError::field("key", "only an agent node has a key"));
            }
            // A node that stops being an agent forgets its key.
            d.key_hash = None;
        }
        d.validate()
    }

    /// A declaration of the given fields over the defaults; needs `id` and
    /// `kind`.
    pub fn to_decl(&self) -> Result<NodeDecl, DeclError> {
        let id = self.id.clone().ok_or(DeclError::Missing("id"))?;
        let within = |e: DeclError| e.within(format_args!("node {id}"));
        let kind = self
            .kind
            .ok_or(DeclError::Missing("kind"))
            .map_err(within)?;
        let mut d = NodeDecl {
            id: id.clone(),
            kind,
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
            key_hash: None,
            udp: false,
        };
        self.apply(&mut d).map_err(within)?;
        Ok(d)
    }
}

#[cfg(test)]
mod tests;

//! The connection-string grammar: `package-<ID>(-key-value)*` → typed [`Rules`],
//! or the 400 code of the first fault, with a detail that names the rule and
//! the fix.
//!
//! Order of faults (the contract): tokens left to right (`ERR_UNKNOWN_PARAM`,
//! `ERR_DUPLICATE_PARAM`, `ERR_INVALID_VALUE` as met), then
//! `ERR_INVALID_COMBINATION`, then `ERR_MISSING_PARAMS`; `ERR_PARAM_NOT_ALLOWED`
//! needs the package and is [`Rules::check_plan`].

use std::fmt::{self, Write as _};

use crate::catalog::{Code, Rejection};
use crate::geo::{Country, GeoCatalog, GeoKind, NameId};

/// Usernames are at most this long (as in SOCKS5).
pub const MAX_USERNAME: usize = 255;
/// Default `sessionlength`, seconds.
pub const DEFAULT_SESSION_LENGTH: u32 = 360;
/// Longest session id.
pub const MAX_SESSION_ID: usize = 64;

/// The keys of the grammar, in canonical order.
pub const KEYS: [&str; 13] = [
    "country",
    "region",
    "city",
    "isp",
    "asn",
    "network",
    "session",
    "sessionid",
    "sessionlength",
    "bind",
    "rotate",
    "onerror",
    "prefer",
];

/// Exit network type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Network {
    /// Residential.
    Res,
    /// Mobile.
    Mob,
    /// Datacenter.
    Dc,
}

names!(Network {
    Res => "res",
    Mob => "mob",
    Dc => "dc",
});

impl Network {
    /// Bit for sets of networks.
    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// `country-…`: one country or any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CountryRule {
    /// `country-any`
    #[default]
    Any,
    /// `country-us`
    Is(Country),
}

/// `network-…`: one network or any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetworkRule {
    /// `network-any`
    Any,
    /// `network-res` etc.
    Is(Network),
}

/// `rotate-…`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rotate {
    /// A new node every N seconds.
    Timed(u32),
    /// A new node every N requests.
    Requests(u32),
}

/// `onerror-…`: what a node failure does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OnError {
    /// Choose another node (default).
    Replace,
    /// Answer at once.
    Fail,
    /// Try the same node N more times first.
    Retry(u8),
}

/// A sticky session id: 1–64 of `[A-Za-z0-9_]`, stored inline (no allocation).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId {
    len: u8,
    bytes: [u8; MAX_SESSION_ID],
}

impl SessionId {
    /// Parse a session id value.
    pub fn parse(s: &str) -> Option<SessionId> {
        let b = s.as_bytes();
        if b.is_empty()
            || b.len() > MAX_SESSION_ID
            || !b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_')
        {
            return None;
        }
        let mut bytes = [0u8; MAX_SESSION_ID];
        bytes[..b.len()].copy_from_slice(b);
        Some(SessionId {
            len: b.len() as u8,
            bytes,
        })
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// The targeting and session rules of one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rules {
    /// The package id from `package-<ID>`.
    pub package: u64,
    /// `country-`
    pub country: Option<CountryRule>,
    /// `region-` (needs a country).
    pub region: Option<NameId>,
    /// `city-` (needs a country).
    pub city: Option<NameId>,
    /// `isp-`
    pub isp: Option<NameId>,
    /// `asn-`
    pub asn: Option<u32>,
    /// `network-`
    pub network: Option<NetworkRule>,
    /// `session-` / `sessionid-`
    pub session: Option<SessionId>,
    /// `sessionlength-` as given; [`Rules::session_length`] applies the default.
    pub session_length: Option<u32>,
    /// `bind-node`
    pub bind_node: bool,
    /// `rotate-`
    pub rotate: Option<Rotate>,
    /// `onerror-` as given; [`Rules::on_error`] applies the default.
    pub onerror: Option<OnError>,
    /// `prefer-lookalike`
    pub prefer_lookalike: bool,
}

/// Everything of the rules but `session` and `sessionlength`: a session's
/// rules are fixed by its first request, and a request with the same id but a
/// different fingerprint is `SESSION_PARAMS_MISMATCH`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    country: Option<CountryRule>,
    region: Option<NameId>,
    city: Option<NameId>,
    isp: Option<NameId>,
    asn: Option<u32>,
    network: Option<NetworkRule>,
    bind_node: bool,
    rotate: Option<Rotate>,
    onerror: Option<OnError>,
    prefer_lookalike: bool,
}

impl Fingerprint {
    /// The rules a fingerprint fixes, as [`Rules`] of `package` with no
    /// session id (for listings of live sessions: [`Rules::to_username`]).
    pub fn to_rules(&self, package: u64) -> Rules {
        Rules {
            package,
            country: self.country,
            region: self.region,
            city: self.city,
            isp: self.isp,
            asn: self.asn,
            network: self.network,
            session: None,
            session_length: None,
            bind_node: self.bind_node,
            rotate: self.rotate,
            onerror: self.onerror,
            prefer_lookalike: self.prefer_lookalike,
        }
    }

    /// The rules as listings show them: [`Fingerprint::to_rules`] with the
    /// defaults it spells out (`network-any`, the default `onerror`) left
    /// implicit again.
    pub fn to_listed_rules(&self, package: u64) -> Rules {
        let mut rules = self.to_rules(package);
        if rules.network == Some(NetworkRule::Any) {
            rules.network = None;
        }
        let default_onerror = if rules.bind_node {
            OnError::Fail
        } else {
            OnError::Replace
        };
        if rules.onerror == Some(default_onerror) {
            rules.onerror = None;
        }
        rules
    }
}

impl Rules {
    /// Session length in seconds, with the default applied.
    pub fn session_length(&self) -> u32 {
        self.session_length.unwrap_or(DEFAULT_SESSION_LENGTH)
    }

    /// The `onerror` policy with its default: `fail` for `bind-node`, else `replace`.
    pub fn on_error(&self) -> OnError {
        self.onerror.unwrap_or(if self.bind_node {
            OnError::Fail
        } else {
            OnError::Replace
        })
    }

    /// The rules that identify a session's targeting, with defaults made
    /// explicit (no country = `country-any`, no network = `network-any`,
    /// the effective `onerror`), so spelling out a default is no mismatch.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint {
            country: Some(self.country.unwrap_or(CountryRule::Any)),
            region: self.region,
            city: self.city,
            isp: self.isp,
            asn: self.asn,
            network: Some(self.network.unwrap_or(NetworkRule::Any)),
            bind_node: self.bind_node,
            rotate: self.rotate,
            onerror: Some(self.on_error()),
            prefer_lookalike: self.prefer_lookalike,
        }
    }

    /// The specific country, if any.
    pub fn country_code(&self) -> Option<Country> {
        match self.country {
            Some(CountryRule::Is(c)) => Some(c),
            _ => None,
        }
    }

    /// `ERR_PARAM_NOT_ALLOWED`: a network the package has not enabled, or a
    /// plan feature it lacks.
    pub fn check_plan(&self, networks: NetworkSet, features: FeatureSet) -> Result<(), Rejection> {
        if let Some(NetworkRule::Is(n)) = self.network
            && !networks.contains(n)
        {
            return Err(Rejection::new(
                Code::ErrParamNotAllowed,
                format!(
                    "network-{} is not enabled for package {} (enabled: {}); use one of those or network-any",
                    n.as_str(),
                    self.package,
                    networks
                ),
            ));
        }
        let used = [
            (Feature::City, self.city.is_some()),
            (Feature::Region, self.region.is_some()),
            (Feature::Isp, self.isp.is_some()),
            (Feature::Asn, self.asn.is_some()),
            (Feature::Bind, self.bind_node),
            (Feature::Prefer, self.prefer_lookalike),
        ];
        for (feature, on) in used {
            if on && !features.contains(feature) {
                return Err(Rejection::new(
                    Code::ErrParamNotAllowed,
                    format!(
                        "{} targeting is not in package {}'s plan; remove the {}- rule or upgrade the plan",
                        feature.as_str(),
                        self.package,
                        feature.key()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The canonical connection string of these rules (keys in grammar order,
    /// `session` for the alias). Parsing it gives these rules back.
    pub fn to_username(&self, geo: &GeoCatalog) -> String {
        let mut s = format!("package-{}", self.package);
        match self.country {
            Some(CountryRule::Any) => s.push_str("-country-any"),
            Some(CountryRule::Is(c)) => {
                let _ = write!(s, "-country-{c}");
            }
            None => {}
        }
        for (key, id) in [
            ("region", self.region),
            ("city", self.city),
            ("isp", self.isp),
        ] {
            if let Some(id) = id {
                let _ = write!(s, "-{key}-{}", geo.name(id));
            }
        }
        if let Some(asn) = self.asn {
            let _ = write!(s, "-asn-{asn}");
        }
        match self.network {
            Some(NetworkRule::Any) => s.push_str("-network-any"),
            Some(NetworkRule::Is(n)) => {
                let _ = write!(s, "-network-{}", n.as_str());
            }
            None => {}
        }
        if let Some(id) = &self.session {
            let _ = write!(s, "-session-{}", id.as_str());
        }
        if let Some(len) = self.session_length {
            let _ = write!(s, "-sessionlength-{len}");
        }
        if self.bind_node {
            s.push_str("-bind-node");
        }
        match self.rotate {
            Some(Rotate::Timed(n)) => {
                let _ = write!(s, "-rotate-timed_{n}");
            }
            Some(Rotate::Requests(n)) => {
                let _ = write!(s, "-rotate-requests_{n}");
            }
            None => {}
        }
        match self.onerror {
            Some(OnError::Replace) => s.push_str("-onerror-replace"),
            Some(OnError::Fail) => s.push_str("-onerror-fail"),
            Some(OnError::Retry(n)) => {
                let _ = write!(s, "-onerror-retry_{n}");
            }
            None => {}
        }
        if self.prefer_lookalike {
            s.push_str("-prefer-lookalike");
        }
        s
    }
}

/// A set of networks (a package's enabled networks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetworkSet(pub u8);

impl NetworkSet {
    /// Every network.
    pub const ALL: NetworkSet = NetworkSet(0b111);

    /// Whether `n` is in the set.
    pub fn contains(self, n: Network) -> bool {
        self.0 & n.bit() != 0
    }

    /// The set of the given networks.
    pub fn of(nets: impl IntoIterator<Item = Network>) -> Self {
        NetworkSet(nets.into_iter().fold(0, |acc, n| acc | n.bit()))
    }

    /// The networks in the set.
    pub fn iter(self) -> impl Iterator<Item = Network> {
        Network::ALL.into_iter().filter(move |n| self.contains(*n))
    }
}

impl fmt::Display for NetworkSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.iter().map(Network::as_str).collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(", "))
        }
    }
}

/// A plan feature a package may lack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feature {
    /// `city-`
    City,
    /// `region-`
    Region,
    /// `isp-`
    Isp,
    /// `asn-`
    Asn,
    /// `bind-node`
    Bind,
    /// `prefer-lookalike`
    Prefer,
}

names!(Feature {
    City => "city",
    Region => "region",
    Isp => "isp",
    Asn => "asn",
    Bind => "bind",
    Prefer => "prefer",
});

impl Feature {
    /// The rule key the feature governs.
    pub fn key(self) -> &'static str {
        self.as_str()
    }
}

/// A set of plan features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FeatureSet(pub u8);

impl FeatureSet {
    /// Every feature.
    pub const ALL: FeatureSet = FeatureSet(0b11_1111);

    /// Whether `f` is in the set.
    pub fn contains(self, f: Feature) -> bool {
        self.0 & (1 << f as u8) != 0
    }

    /// The set of the given features.
    pub fn of(fs: impl IntoIterator<Item = Feature>) -> Self {
        FeatureSet(fs.into_iter().fold(0, |acc, f| acc | (1 << f as u8)))
    }

    /// The features in the set.
    pub fn iter(self) -> impl Iterator<Item = Feature> {
        Feature::ALL.into_iter().filter(move |f| self.contains(*f))
    }
}

/// Split `package-<ID>` off a username: the package id and the rest (starting
/// at the `-` after the id, or empty). `None` when the username does not start
/// so — which is `AUTH_FAILED`, not a rule error.
pub fn split_package(username: &str) -> Option<(u64, &str)> {
    let rest = username.strip_prefix("package-")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let id: u64 = rest[..digits].parse().ok()?;
    let tail = &rest[digits..];
    if !(tail.is_empty() || tail.starts_with('-')) {
        return None;
    }
    Some((id, tail))
}

fn invalid(detail: String) -> Rejection {
    Rejection::new(Code::ErrInvalidValue, detail)
}

fn combination(detail: &str) -> Rejection {
    Rejection::new(Code::ErrInvalidCombination, detail.to_string())
}

/// Values: lowercase letters, digits, `_`.
fn is_value(v: &str) -> bool {
    !v.is_empty()
        && v.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

fn form_error(key: &str, value: &str, expected: &str) -> Rejection {
    if value.bytes().any(|c| c.is_ascii_uppercase()) && is_value(&value.to_ascii_lowercase()) {
        return invalid(format!(
            "{key}-{value}: values are lowercase; use {key}-{}",
            value.to_ascii_lowercase()
        ));
    }
    invalid(format!("{key}-{value}: {expected}"))
}

fn parse_num(value: &str, min: u64, max: u64) -> Option<u64> {
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n: u64 = value.parse().ok()?;
    (min..=max).contains(&n).then_some(n)
}

fn suffix_num<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    value.strip_prefix(prefix)
}

/// The position of a key in [`KEYS`] (a `match`, not a scan).
fn key_slot(key: &str) -> Option<usize> {
    Some(match key {
        "country" => 0,
        "region" => 1,
        "city" => 2,
        "isp" => 3,
        "asn" => 4,
        "network" => 5,
        "session" => 6,
        "sessionid" => 7,
        "sessionlength" => 8,
        "bind" => 9,
        "rotate" => 10,
        "onerror" => 11,
        "prefer" => 12,
        _ => return None,
    })
}

/// Nearest key by edit distance ≤ 2, for the "did you mean" hint.
fn near_key(word: &str) -> Option<&'static str> {
    fn dist(a: &str, b: &str) -> usize {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for i in 1..=a.len() {
            let mut cur = vec![i; b.len() + 1];
            for j in 1..=b.len() {
                let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
                cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
            }
            prev = cur;
        }
        prev[b.len()]
    }
    if word.len() > 32 {
        return None;
    }
    KEYS.iter()
        .map(|k| (dist(word, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

/// A catalogue name met while reading tokens, checked once the country is known.
struct Pending<'a> {
    kind: GeoKind,
    value: &'a str,
}

/// Parse the rules of a username whose `package-<ID>` prefix was already
/// verified. `geo` validates region, city and ISP names per country.
pub fn parse(username: &str, geo: &GeoCatalog) -> Result<Rules, Rejection> {
    if username.len() > MAX_USERNAME {
        return Err(invalid(format!(
            "the username is {} bytes; at most {MAX_USERNAME} are allowed",
            username.len()
        )));
    }
    let Some((package, tail)) = split_package(username) else {
        return Err(Rejection::new(
            Code::AuthFailed,
            "the username must start with package-<id>",
        ));
    };
    let mut rules = Rules {
        package,
        ..Rules::default()
    };
    let mut seen: u16 = 0;
    let mut pending: [Option<Pending<'_>>; 3] = [None, None, None];
    let mut syntax: Option<Rejection> = None;

    // Tokens after "package-<ID>": key, value, key, value, …
    let mut tokens = if tail.is_empty() {
        None
    } else {
        Some(tail[1..].split('-'))
    };
    let mut prev: Option<(&str, &str)> = None;
    while let Some(key) = tokens.as_mut().and_then(Iterator::next) {
        let Some(slot) = key_slot(key) else {
            let detail = unknown_key_detail(key, prev);
            syntax = Some(Rejection::new(Code::ErrUnknownParam, detail));
            break;
        };
        // session and sessionid are one key.
        let bit = if slot == 7 { 1 << 6 } else { 1u16 << slot };
        if seen & bit != 0 {
            let canonical = if slot == 7 { "session" } else { key };
            syntax = Some(Rejection::new(
                Code::ErrDuplicateParam,
                format!("{canonical} is given twice; give each key once"),
            ));
            break;
        }
        seen |= bit;
        let Some(value) = tokens.as_mut().and_then(Iterator::next) else {
            syntax = Some(invalid(format!("{key} has no value; write {key}-<value>")));
            break;
        };
        if value.is_empty() {
            syntax = Some(invalid(format!(
                "{key} has an empty value; write {key}-<value>"
            )));
            break;
        }
        if let Err(e) = read_value(&mut rules, key, value, &mut pending) {
            syntax = Some(e);
            break;
        }
        prev = Some((key, value));
    }

    // Token faults first: a catalogue name is only looked up once every token
    // reads well (so `city-los-angeles` gets the underscore hint, not "no such city").
    if let Some(e) = syntax {
        return Err(e);
    }
    let country = rules.country_code();
    for p in pending.iter().flatten() {
        if p.kind != GeoKind::Isp && country.is_none() {
            continue; // a combination fault, reported below
        }
        let Some(id) = geo.lookup(country, p.kind, p.value) else {
            let key = p.kind.key();
            let plural = match p.kind {
                GeoKind::Region => "regions",
                GeoKind::City => "cities",
                GeoKind::Isp => "isps",
            };
            let (place, list) = match country {
                Some(c) => (
                    format!("country {c}"),
                    format!("GET /v1/geo/{plural}?country={c} lists them"),
                ),
                None => (
                    "any country".to_string(),
                    format!("GET /v1/geo/{plural} lists them"),
                ),
            };
            return Err(invalid(format!(
                "{key}-{}: no such {key} in {place}; {list}",
                p.value
            )));
        };
        match p.kind {
            GeoKind::Region => rules.region = Some(id),
            GeoKind::City => rules.city = Some(id),
            GeoKind::Isp => rules.isp = Some(id),
        }
    }
    check_combination(&rules, &pending)?;
    if rules.country.is_none()
        && rules.region.is_none()
        && rules.city.is_none()
        && rules.isp.is_none()
        && rules.asn.is_none()
        && rules.network.is_none()
    {
        return Err(Rejection::new(
            Code::ErrMissingParams,
            "no targeting rule; add at least one of country, region, city, isp, asn, network (e.g. country-any)",
        ));
    }
    Ok(rules)
}

fn unknown_key_detail(key: &str, prev: Option<(&str, &str)>) -> String {
    let shown: String = key.chars().take(40).collect();
    if key.is_empty() {
        return "empty key (two dashes in a row, or a trailing dash?); tokens are key-value pairs"
            .into();
    }
    if let Some((pk, pv)) = prev
        && matches!(pk, "region" | "city" | "isp")
    {
        return format!(
            "unknown key \"{shown}\" after {pk}-{pv}: values never contain '-'; write spaces as underscores, e.g. {pk}-{pv}_{shown}"
        );
    }
    match near_key(key) {
        Some(k) => format!("unknown key \"{shown}\"; did you mean {k}?"),
        None => format!("unknown key \"{shown}\"; keys are {}", KEYS.join(", ")),
    }
}

fn read_value<'a>(
    rules: &mut Rules,
    key: &str,
    value: &'a str,
    pending: &mut [Option<Pending<'a>>; 3],
) -> Result<(), Rejection> {
    match key {
        "country" => {
            rules.country = Some(if value == "any" {
                CountryRule::Any
            } else if let Some(c) = Country::parse(value) {
                CountryRule::Is(c)
            } else if Country::parse(&value.to_ascii_lowercase()).is_some() {
                return Err(invalid(format!(
                    "country-{value}: country codes are lowercase; use country-{}",
                    value.to_ascii_lowercase()
                )));
            } else {
                return Err(invalid(format!(
                    "country-{value}: not an ISO 3166-1 alpha-2 code; use two lowercase letters (country-us, country-gb) or country-any"
                )));
            });
        }
        "region" | "city" | "isp" => {
            if !is_value(value) {
                return Err(form_error(
                    key,
                    value,
                    "names use lowercase letters, digits and _ (for spaces)",
                ));
            }
            let (slot, kind) = match key {
                "region" => (0, GeoKind::Region),
                "city" => (1, GeoKind::City),
                _ => (2, GeoKind::Isp),
            };
            pending[slot] = Some(Pending { kind, value });
        }
        "asn" => {
            rules.asn = Some(parse_num(value, 1, u32::MAX as u64).ok_or_else(|| {
                invalid(format!(
                    "asn-{value}: an AS number is decimal digits, e.g. asn-701"
                ))
            })? as u32);
        }
        "network" => {
            rules.network =
                Some(if value == "any" {
                    NetworkRule::Any
                } else {
                    NetworkRule::Is(Network::parse(value).ok_or_else(|| {
                        form_error(key, value, "networks are res, mob, dc or any")
                    })?)
                });
        }
        "session" | "sessionid" => {
            rules.session = Some(SessionId::parse(value).ok_or_else(|| {
                invalid(format!(
                    "{key}: a session id is 1 to {MAX_SESSION_ID} letters, digits or _"
                ))
            })?);
        }
        "sessionlength" => {
            rules.session_length =
                Some(parse_num(value, 1, 86_400).ok_or_else(|| {
                    invalid(format!("sessionlength-{value}: seconds from 1 to 86400"))
                })? as u32);
        }
        "bind" => {
            if value != "node" {
                return Err(form_error(key, value, "the only binding is bind-node"));
            }
            rules.bind_node = true;
        }
        "rotate" => {
            let rotate = if let Some(n) = suffix_num(value, "timed_") {
                parse_num(n, 1, 86_400).map(|n| Rotate::Timed(n as u32))
            } else if let Some(n) = suffix_num(value, "requests_") {
                parse_num(n, 1, 1_000_000).map(|n| Rotate::Requests(n as u32))
            } else {
                None
            };
            rules.rotate = Some(rotate.ok_or_else(|| {
                form_error(key, value, "use rotate-timed_N (N seconds, 1-86400) or rotate-requests_N (N requests, 1-1000000)")
            })?);
        }
        "onerror" => {
            let policy = match value {
                "replace" => Some(OnError::Replace),
                "fail" => Some(OnError::Fail),
                v => suffix_num(v, "retry_")
                    .and_then(|n| parse_num(n, 1, 10))
                    .map(|n| OnError::Retry(n as u8)),
            };
            rules.onerror = Some(policy.ok_or_else(|| {
                form_error(
                    key,
                    value,
                    "use onerror-replace, onerror-fail or onerror-retry_N (N 1-10)",
                )
            })?);
        }
        "prefer" => {
            if value != "lookalike" {
                return Err(form_error(
                    key,
                    value,
                    "the only preference is prefer-lookalike",
                ));
            }
            rules.prefer_lookalike = true;
        }
        _ => unreachable!("keys are matched against KEYS first"),
    }
    Ok(())
}

fn check_combination(rules: &Rules, pending: &[Option<Pending<'_>>; 3]) -> Result<(), Rejection> {
    if rules.bind_node {
        if rules.rotate.is_some() {
            return Err(combination(
                "bind-node keeps one node; it cannot be combined with rotate-",
            ));
        }
        if rules.onerror == Some(OnError::Replace) {
            return Err(combination(
                "bind-node never replaces its node; use onerror-fail or onerror-retry_N with it",
            ));
        }
        if rules.prefer_lookalike {
            return Err(combination(
                "bind-node never replaces its node, so prefer-lookalike has no effect; remove one",
            ));
        }
    }
    if rules.session.is_none() {
        for (on, what) in [
            (rules.bind_node, "bind-node"),
            (rules.rotate.is_some(), "rotate-"),
            (rules.session_length.is_some(), "sessionlength-"),
        ] {
            if on {
                return Err(combination(&format!(
                    "{what} needs a session; add session-<id>"
                )));
            }
        }
    }
    if rules.country_code().is_none() {
        for (slot, key) in [(0, "region"), (1, "city")] {
            if pending[slot].is_some() {
                return Err(combination(&format!(
                    "{key}- needs a specific country; add country-<code> (e.g. country-us)"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
#[test]
fn key_slots_match_the_key_list() {
    for (i, k) in KEYS.iter().enumerate() {
        assert_eq!(key_slot(k), Some(i));
    }
    assert_eq!(key_slot("Country"), None);
}

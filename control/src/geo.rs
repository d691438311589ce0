//! The geo catalogue: the names a rule may use for regions, cities and ISPs,
//! per country, and the ISO 3166-1 alpha-2 country codes.
//!
//! Names are interned once into [`NameId`]s that never change for the life of
//! the process, so rules, sessions and the node index compare integers, and a
//! new policy snapshot can extend the catalogue without invalidating sessions.

use std::collections::{HashMap, HashSet};
use std::fmt;

/// Every ISO 3166-1 alpha-2 code, lowercase, concatenated.
const ISO_3166_ALPHA2: &str = "adaeafagaialamaoaqarasatauawaxazbabbbdbebfbgbhbibjblbmbnbobqbrbsbtbvbwbybzcacccdcfcgchcickclcmcncocrcucvcwcxcyczdedjdkdmdodzeceeegeheresetfifjfkfmfofrgagbgdgegfggghgiglgmgngpgqgrgsgtgugwgyhkhmhnhrhthuidieiliminioiqirisitjejmjojpkekgkhkikmknkpkrkwkykzlalblclilklrlsltlulvlymamcmdmemfmgmhmkmlmmmnmompmqmrmsmtmumvmwmxmymznancnenfngninlnonpnrnunzompapepfpgphpkplpmpnprpsptpwpyqarerorsrurwsasbscsdsesgshsisjskslsmsnsosrssstsvsxsysztctdtftgthtjtktltmtntotrtttvtwtzuaugumusuyuzvavcvevgvivnvuwfwsyeytzazmzw";

/// A country: an ISO 3166-1 alpha-2 code in lowercase.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Country([u8; 2]);

impl Country {
    /// The country for a lowercase two-letter code, if ISO 3166-1 assigns it.
    pub fn parse(code: &str) -> Option<Country> {
        let b = code.as_bytes();
        if b.len() != 2 || !b.iter().all(u8::is_ascii_lowercase) {
            return None;
        }
        let known = ISO_3166_ALPHA2.as_bytes().chunks_exact(2).any(|c| c == b);
        known.then_some(Country([b[0], b[1]]))
    }

    /// The lowercase code.
    pub fn as_str(&self) -> &str {
        // Built only from ASCII lowercase letters.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Debug for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An interned catalogue name (`new_york`, `verizon_wireless`).
pub type NameId = u32;

/// Which catalogue a name belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GeoKind {
    /// `region-…`
    Region,
    /// `city-…`
    City,
    /// `isp-…`
    Isp,
}

impl GeoKind {
    /// The rule key.
    pub fn key(self) -> &'static str {
        match self {
            GeoKind::Region => "region",
            GeoKind::City => "city",
            GeoKind::Isp => "isp",
        }
    }
}

/// The names every node ever registered carried, plus the operator's `[geo]`
/// names, per country. Append-only.
#[derive(Debug, Clone, Default)]
pub struct GeoCatalog {
    ids: HashMap<Box<str>, NameId>,
    names: Vec<Box<str>>,
    known: HashSet<(Country, GeoKind, NameId)>,
    isps_anywhere: HashSet<NameId>,
}

impl GeoCatalog {
    /// An empty catalogue.
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of `name`, interning it if new.
    pub fn intern(&mut self, name: &str) -> NameId {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = NameId::try_from(self.names.len()).expect("fewer than 2^32 catalogue names");
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        id
    }

    /// Record that `name` is a `kind` of `country`; returns its id.
    pub fn add(&mut self, country: Country, kind: GeoKind, name: &str) -> NameId {
        let id = self.intern(name);
        self.known.insert((country, kind, id));
        if kind == GeoKind::Isp {
            self.isps_anywhere.insert(id);
        }
        id
    }

    /// The id of a name if it is in the catalogue for `country` (for ISPs with
    /// no country: in any country).
    pub fn lookup(&self, country: Option<Country>, kind: GeoKind, name: &str) -> Option<NameId> {
        let id = *self.ids.get(name)?;
        let found = match country {
            Some(c) => self.known.contains(&(c, kind, id)),
            None => kind == GeoKind::Isp && self.isps_anywhere.contains(&id),
        };
        found.then_some(id)
    }

    /// The text of an interned name.
    pub fn name(&self, id: NameId) -> &str {
        self.names.get(id as usize).map_or("?", |s| s)
    }

    /// Every (country, name) of one kind, sorted, for listings.
    pub fn entries(&self, kind: GeoKind) -> Vec<(Country, &str)> {
        let mut v: Vec<_> = self
            .known
            .iter()
            .filter(|(_, k, _)| *k == kind)
            .map(|&(c, _, id)| (c, self.name(id)))
            .collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn countries_are_iso_and_lowercase() {
        assert_eq!(ISO_3166_ALPHA2.len() % 2, 0);
        assert_eq!(ISO_3166_ALPHA2.len() / 2, 249);
        assert!(Country::parse("us").is_some());
        assert!(Country::parse("gb").is_some());
        assert!(Country::parse("US").is_none());
        assert!(Country::parse("usa").is_none());
        assert!(Country::parse("xx").is_none());
        assert!(Country::parse("uk").is_none(), "uk is not ISO (gb is)");
    }

    #[test]
    fn names_are_per_country_and_ids_stable() {
        let mut g = GeoCatalog::new();
        let us = Country::parse("us").unwrap();
        let fr = Country::parse("fr").unwrap();
        let ny = g.add(us, GeoKind::City, "new_york");
        let orange = g.add(fr, GeoKind::Isp, "orange");
        assert_eq!(g.lookup(Some(us), GeoKind::City, "new_york"), Some(ny));
        assert_eq!(g.lookup(Some(fr), GeoKind::City, "new_york"), None);
        assert_eq!(g.lookup(Some(us), GeoKind::Region, "new_york"), None);
        assert_eq!(g.lookup(None, GeoKind::Isp, "orange"), Some(orange));
        assert_eq!(g.lookup(None, GeoKind::City, "new_york"), None);
        let mut g2 = g.clone();
        assert_eq!(
            g2.add(fr, GeoKind::City, "new_york"),
            ny,
            "ids survive extension"
        );
        assert_eq!(g2.name(ny), "new_york");
    }
}

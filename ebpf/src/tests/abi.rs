//! `abi.rs` against `bpf/abi.h` (a parse of the header) and against the maps
//! the committed object declares. Needs no privileges.

use std::{collections::BTreeMap, mem::offset_of};

use aya::maps::lpm_trie::Key;

use crate::abi::{self, SgAllowData, SgBan, SgBucket, SgConfig, SgCounter, SgSrcKey};

const HEADER: &str = include_str!("../../bpf/abi.h");

#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    name: String,
    offset: usize,
    size: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Struct {
    size: usize,
    align: usize,
    fields: Vec<Field>,
}

#[derive(Debug, Default)]
struct Header {
    defines: BTreeMap<String, u64>,
    structs: BTreeMap<String, Struct>,
}

fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("*/")
            .expect("unterminated comment in abi.h");
        rest = &rest[start + end + 2..];
        out.push(' ');
    }
    out.push_str(rest);
    out
}

fn parse_int(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// The tiny parser the header promises to stay within.
fn parse_header(src: &str) -> Header {
    let src = strip_comments(src);
    let mut h = Header::default();
    for line in src.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("#define ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().unwrap();
            // The include guard has no value.
            if let Some(value) = parts.next() {
                let v = parse_int(value)
                    .unwrap_or_else(|| panic!("abi.h: #define {name} {value}: not an integer"));
                h.defines.insert(name.to_owned(), v);
            }
        }
    }
    let mut rest = src.as_str();
    while let Some(at) = rest.find("struct ") {
        let after = &rest[at + "struct ".len()..];
        let Some(brace) = after.find('{') else { break };
        let name = after[..brace].trim();
        let close = after.find("};").expect("abi.h: struct without `};`");
        if name.contains(char::is_whitespace) || name.is_empty() {
            rest = &after[brace..];
            continue;
        }
        let body = &after[brace + 1..close];
        let mut fields = Vec::new();
        let (mut offset, mut align) = (0usize, 1usize);
        for decl in body.split(';').map(str::trim).filter(|d| !d.is_empty()) {
            let (ty, declarator) = decl
                .rsplit_once(char::is_whitespace)
                .expect("abi.h: field without type");
            let ty = ty.trim();
            let (fname, count) = match declarator.split_once('[') {
                Some((n, c)) => {
                    let c = c.trim_end_matches(']');
                    let count = parse_int(c)
                        .or_else(|| h.defines.get(c).copied())
                        .unwrap_or_else(|| panic!("abi.h: array size {c}"));
                    (n, usize::try_from(count).unwrap())
                }
                None => (declarator, 1),
            };
            let (esize, ealign) = match ty {
                "__u8" => (1, 1),
                "__u16" => (2, 2),
                "__u32" => (4, 4),
                "__u64" => (8, 8),
                other => {
                    let inner = other
                        .strip_prefix("struct ")
                        .and_then(|s| h.structs.get(s.trim()));
                    let inner = inner.unwrap_or_else(|| panic!("abi.h: unknown type {other}"));
                    (inner.size, inner.align)
                }
            };
            offset = offset.next_multiple_of(ealign);
            fields.push(Field {
                name: fname.to_owned(),
                offset,
                size: esize * count,
            });
            offset += esize * count;
            align = align.max(ealign);
        }
        h.structs.insert(
            name.to_owned(),
            Struct {
                size: offset.next_multiple_of(align),
                align,
                fields,
            },
        );
        rest = &after[close + 2..];
    }
    h
}

fn rust_struct(size: usize, align: usize, fields: &[(&str, usize, usize)]) -> Struct {
    Struct {
        size,
        align,
        fields: fields
            .iter()
            .map(|&(n, o, s)| Field {
                name: n.to_owned(),
                offset: o,
                size: s,
            })
            .collect(),
    }
}

#[test]
fn abi_defines_match_header() {
    let h = parse_header(HEADER);
    let rust: BTreeMap<&str, u64> = [
        ("SG_ABI_VERSION", u64::from(abi::ABI_VERSION)),
        ("SG_VERDICT_PASS", u64::from(abi::VERDICT_PASS)),
        ("SG_VERDICT_DROP_RATE", u64::from(abi::VERDICT_DROP_RATE)),
        (
            "SG_VERDICT_DROP_NOT_ALLOWED",
            u64::from(abi::VERDICT_DROP_NOT_ALLOWED),
        ),
        (
            "SG_VERDICT_DROP_BANNED",
            u64::from(abi::VERDICT_DROP_BANNED),
        ),
        ("SG_VERDICT_COUNT", u64::from(abi::VERDICT_COUNT)),
        ("SG_PORT_SYN_LIMIT", u64::from(abi::PORT_SYN_LIMIT)),
        ("SG_PORT_IP_ONLY", u64::from(abi::PORT_IP_ONLY)),
        ("SG_FAMILY_IPV4", u64::from(abi::FAMILY_IPV4)),
        ("SG_FAMILY_IPV6", u64::from(abi::FAMILY_IPV6)),
        ("SG_IPV6_SOURCE_PREFIX", u64::from(abi::IPV6_SOURCE_PREFIX)),
        ("SG_PORTS_MAX", u64::from(abi::PORTS_MAX)),
        ("SG_CONFIG_MAX", u64::from(abi::CONFIG_MAX)),
        ("SG_BUCKETS_MAX", u64::from(abi::BUCKETS_MAX)),
        ("SG_ALLOW_MAX", u64::from(abi::ALLOW_MAX)),
        ("SG_BANS_MAX", u64::from(abi::BANS_MAX)),
        (
            "SG_ALLOW_KEY_FIXED_BITS",
            u64::from(abi::ALLOW_KEY_FIXED_BITS),
        ),
    ]
    .into_iter()
    .collect();
    let header: BTreeMap<&str, u64> = h.defines.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(
        rust, header,
        "abi.rs constants (left) differ from abi.h #defines (right)"
    );

    // The verdict enum follows the codes.
    for (i, v) in crate::Verdict::ALL.iter().enumerate() {
        assert_eq!(v.code() as usize, i);
    }
    assert_eq!(crate::Verdict::ALL.len() as u64, header["SG_VERDICT_COUNT"]);
}

#[test]
fn abi_structs_match_header() {
    use std::mem::{align_of, size_of};
    let h = parse_header(HEADER);
    let key = size_of::<Key<SgAllowData>>();
    // aya's lpm_trie::Key is repr(C, packed) { u32 prefix_len, data }.
    let d = 4;
    let rust: BTreeMap<&str, Struct> = [
        (
            "sg_config",
            rust_struct(
                size_of::<SgConfig>(),
                align_of::<SgConfig>(),
                &[
                    ("syn_interval_ns", offset_of!(SgConfig, syn_interval_ns), 8),
                    (
                        "syn_tolerance_ns",
                        offset_of!(SgConfig, syn_tolerance_ns),
                        8,
                    ),
                ],
            ),
        ),
        (
            "sg_src_key",
            rust_struct(
                size_of::<SgSrcKey>(),
                align_of::<SgSrcKey>(),
                &[("addr", offset_of!(SgSrcKey, addr), 16)],
            ),
        ),
        (
            "sg_bucket",
            rust_struct(
                size_of::<SgBucket>(),
                align_of::<SgBucket>(),
                &[("tat_ns", offset_of!(SgBucket, tat_ns), 8)],
            ),
        ),
        (
            "sg_ban",
            rust_struct(
                size_of::<SgBan>(),
                align_of::<SgBan>(),
                &[("expires_ns", offset_of!(SgBan, expires_ns), 8)],
            ),
        ),
        (
            "sg_allow_key",
            rust_struct(
                key,
                4,
                &[
                    ("prefixlen", 0, 4),
                    ("port", d + offset_of!(SgAllowData, port), 2),
                    ("family", d + offset_of!(SgAllowData, family), 1),
                    ("reserved", d + offset_of!(SgAllowData, reserved), 1),
                    ("addr", d + offset_of!(SgAllowData, addr), 16),
                ],
            ),
        ),
        (
            "sg_counter",
            rust_struct(
                size_of::<SgCounter>(),
                align_of::<SgCounter>(),
                &[
                    ("packets", offset_of!(SgCounter, packets), 8),
                    ("bytes", offset_of!(SgCounter, bytes), 8),
                ],
            ),
        ),
    ]
    .into_iter()
    .collect();
    let header: BTreeMap<&str, Struct> = h
        .structs
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    assert_eq!(
        rust.keys().collect::<Vec<_>>(),
        header.keys().collect::<Vec<_>>(),
        "struct sets differ"
    );
    for (name, r) in &rust {
        let c = &header[name];
        assert_eq!(
            r.fields, c.fields,
            "struct {name}: abi.rs fields (left) vs abi.h (right)"
        );
        assert_eq!(r.size, c.size, "struct {name}: size");
        // The packed LPM key has alignment 1 in Rust; its layout is what matters.
        if *name != "sg_allow_key" {
            assert_eq!(r.align, c.align, "struct {name}: alignment");
        }
    }
}

#[test]
fn abi_object_maps_match_header() {
    use std::mem::size_of;
    let obj = aya_obj::Object::parse(crate::OBJECT).expect("the committed object parses");
    // BPF_MAP_TYPE_*.
    const HASH: u32 = 1;
    const ARRAY: u32 = 2;
    const PERCPU_ARRAY: u32 = 6;
    const LRU_HASH: u32 = 9;
    const LPM_TRIE: u32 = 11;
    /// A map's name, type, key and value sizes, and max entries.
    fn map<K, V>(name: &str, kind: u32, max: u32) -> (&str, u32, usize, usize, u32) {
        (name, kind, size_of::<K>(), size_of::<V>(), max)
    }
    let expect = [
        map::<u16, u32>(abi::MAP_PORTS, HASH, abi::PORTS_MAX),
        map::<u32, SgConfig>(abi::MAP_CONFIG, ARRAY, abi::CONFIG_MAX),
        map::<SgSrcKey, SgBucket>(abi::MAP_BUCKETS, LRU_HASH, abi::BUCKETS_MAX),
        map::<Key<SgAllowData>, u32>(abi::MAP_ALLOW, LPM_TRIE, abi::ALLOW_MAX),
        map::<SgSrcKey, SgBan>(abi::MAP_BANS, LRU_HASH, abi::BANS_MAX),
        map::<u32, SgCounter>(abi::MAP_COUNTERS, PERCPU_ARRAY, abi::VERDICT_COUNT),
    ];
    let mut names: Vec<&str> = obj
        .maps
        .keys()
        .map(String::as_str)
        .filter(|n| n.starts_with("sg_"))
        .collect();
    names.sort_unstable();
    let mut want: Vec<&str> = expect.iter().map(|e| e.0).collect();
    want.sort_unstable();
    assert_eq!(names, want, "maps in the object");
    for (name, ty, k, v, max) in expect {
        let m = &obj.maps[name];
        assert_eq!(m.map_type(), ty, "{name}: type");
        assert_eq!(m.key_size() as usize, k, "{name}: key size");
        assert_eq!(m.value_size() as usize, v, "{name}: value size");
        assert_eq!(m.max_entries(), max, "{name}: max_entries");
    }
    for prog in [abi::PROG_XDP, abi::PROG_TC] {
        assert!(
            obj.programs.contains_key(prog),
            "program {prog} in the object"
        );
    }
}

#[test]
fn object_carries_no_build_path() {
    // build.sh maps the source directory to "."; a checkout path would make
    // the object depend on where it was built.
    let text = String::from_utf8_lossy(crate::OBJECT);
    let dir = env!("CARGO_MANIFEST_DIR");
    assert!(!text.contains(dir), "the object names {dir}");
    for needle in ["/home/", "/work/", "/tmp/", "/builds/", "/runner/"] {
        assert!(
            !text.contains(needle),
            "the object names a path containing {needle}"
        );
    }
}

#[test]
fn header_parser_reads_what_it_claims() {
    let h = parse_header(
        "#define SG_X 0x10 /* c */\nstruct sg_a { __u8 a; __u32 b; __u16 c[SG_X]; };\nstruct sg_b { struct sg_a a; __u8 z; };",
    );
    assert_eq!(h.defines["SG_X"], 16);
    let a = &h.structs["sg_a"];
    assert_eq!(
        a.fields.iter().map(|f| f.offset).collect::<Vec<_>>(),
        [0, 4, 8]
    );
    assert_eq!(a.size, 40);
    assert_eq!(h.structs["sg_b"].size, 44);
}

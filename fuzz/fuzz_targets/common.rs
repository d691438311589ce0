//! Checks shared by the targets.

/// Prefix lengths worth checking for an input: the one-byte-short prefix and
/// one more derived from the bytes (deterministic, so crashes reproduce).
pub fn prefixes(data: &[u8]) -> [usize; 2] {
    let n = data.len();
    if n == 0 {
        return [0, 0];
    }
    let mix = data
        .iter()
        .fold(n, |h, &b| h.wrapping_mul(31).wrapping_add(usize::from(b)));
    [n - 1, mix % n]
}

/// The proto crate's split invariant: a parser fed a prefix of the input
/// returns `Ok(None)` or exactly what it returns for the whole input. Checks
/// the prefixes of [`prefixes`] plus `extra` (such as a parsed message's
/// length and one less).
pub fn assert_split_invariant<T, E>(
    data: &[u8],
    extra: &[usize],
    parse: impl Fn(&[u8]) -> Result<Option<T>, E>,
) -> Result<Option<T>, E>
where
    T: PartialEq + std::fmt::Debug,
    E: PartialEq + std::fmt::Debug,
{
    let full = parse(data);
    for &k in prefixes(data).iter().chain(extra) {
        if k > data.len() {
            continue;
        }
        let part = parse(&data[..k]);
        if !matches!(part, Ok(None)) {
            assert_eq!(part, full, "prefix {k} of {} bytes", data.len());
        }
    }
    full
}

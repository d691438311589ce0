//! Wall-clock formatting for JSON answers (RFC 3339, UTC, milliseconds).

/// `2026-11-25T15:18:20.123Z` for milliseconds since the Unix epoch.
pub(crate) fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// Milliseconds since the epoch of `2026-12-01T10:00:00Z` (fraction
/// allowed), `2026-12-01` (midnight UTC), or a number of seconds since
/// the epoch; `None` for anything else (time zones other than `Z` too).
pub(crate) fn parse_time(text: &str) -> Option<u64> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return secs.checked_mul(1000);
    }
    let b = t.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = t.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut ms = days_from_civil(y, m, d) * 86_400_000;
    if b.len() > 10 {
        let rest = t[10..].strip_prefix('T')?.strip_suffix('Z')?;
        let (hms, frac) = rest.split_once('.').unwrap_or((rest, ""));
        let p: Vec<&str> = hms.split(':').collect();
        if p.len() != 3 || p.iter().any(|x| x.len() != 2) {
            return None;
        }
        let (h, mi, se) = (
            p[0].parse::<i64>().ok()?,
            p[1].parse::<i64>().ok()?,
            p[2].parse::<i64>().ok()?,
        );
        if h > 23 || mi > 59 || se > 60 || !frac.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let frac_ms = format!("{frac:0<3}")[..3].parse::<i64>().ok()?;
        ms += ((h * 60 + mi) * 60 + se) * 1000 + frac_ms;
    }
    u64::try_from(ms).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_what_it_formats() {
        use super::{parse_time, rfc3339};
        for ms in [0u64, 951_782_400_001, 1_764_083_900_123] {
            assert_eq!(parse_time(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(parse_time("2026-12-01"), Some(1_796_083_200_000));
        assert_eq!(parse_time("1796083200"), Some(1_796_083_200_000));
        assert_eq!(parse_time("2026-12-01T10:00:00Z"), Some(1_796_119_200_000));
        for bad in [
            "",
            "2026-13-01",
            "2026-12-01T10:00:00+01:00",
            "2026-12-01 10:00",
            "yesterday",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(951_782_400_001), "2000-02-29T00:00:00.001Z");
        assert_eq!(
            super::rfc3339(1_764_083_900_123),
            "2025-11-25T15:18:20.123Z"
        );
    }
}

//! The one field of an X.509 certificate the gateway reports: when it
//! expires (`notAfter`), for the `/metrics` gauge and the start-up log.
//!
//! A small DER walk of `Certificate → tbsCertificate → validity`: rustls
//! checks nothing of the server's own certificate, and a full X.509 parser
//! would be a large dependency for one date.

/// A DER element: its tag and contents.
struct Tlv<'a> {
    tag: u8,
    body: &'a [u8],
}

/// The first element of `der` and what follows it.
fn next(der: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((
        Tlv {
            tag,
            body: &rest[..len],
        },
        &rest[len..],
    ))
}

/// The element of `der` that must be there with tag `tag`.
fn expect(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (tlv, rest) = next(der)?;
    (tlv.tag == tag).then_some((tlv.body, rest))
}

/// `notAfter` of the DER certificate `der`, in seconds since the Unix
/// epoch; `None` if it cannot be read.
pub fn not_after(der: &[u8]) -> Option<i64> {
    const SEQUENCE: u8 = 0x30;
    let (cert, _) = expect(der, SEQUENCE)?;
    let (mut tbs, _) = expect(cert, SEQUENCE)?;
    // [0] EXPLICIT version, present in v2 and v3 certificates.
    if tbs.first() == Some(&0xa0) {
        tbs = next(tbs)?.1;
    }
    let (_serial, rest) = expect(tbs, 0x02)?;
    let (_signature, rest) = expect(rest, SEQUENCE)?;
    let (_issuer, rest) = expect(rest, SEQUENCE)?;
    let (validity, _) = expect(rest, SEQUENCE)?;
    let (_not_before, rest) = next(validity)?;
    let (not_after, _) = next(rest)?;
    time(not_after.tag, not_after.body)
}

/// UTCTime (`YYMMDDHHMMSSZ`, tag 0x17) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`, tag 0x18), as DER requires them (UTC, seconds).
fn time(tag: u8, text: &[u8]) -> Option<i64> {
    let digits = text.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let num = |s: &[u8]| {
        s.iter()
            .fold(0i64, |acc, &d| acc * 10 + i64::from(d - b'0'))
    };
    let (year, rest) = match (tag, digits.len()) {
        // RFC 5280: YY ≥ 50 is 19YY, else 20YY.
        (0x17, 12) => {
            let yy = num(&digits[..2]);
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (0x18, 14) => (num(&digits[..4]), &digits[4..]),
        _ => return None,
    };
    let (month, day) = (num(&rest[0..2]), num(&rest[2..4]));
    let (h, m, s) = (num(&rest[4..6]), num(&rest[6..8]), num(&rest[8..10]));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(time(0x18, b"20261203000000Z"), Some(1_796_256_000));
        assert_eq!(time(0x17, b"261303000000Z"), None);
        assert_eq!(time(0x18, b"2026120300000Z"), None);
    }

    #[test]
    fn a_generated_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["gw.test".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 7, 15);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        // 2031-07-15T00:00:00Z
        assert_eq!(not_after(cert.der()), Some(1_941_840_000));
        // Garbage and truncations never panic and read nothing.
        let der = cert.der().to_vec();
        for cut in 0..der.len() {
            assert_eq!(not_after(&der[..cut]), None, "cut at {cut}");
        }
        assert_eq!(not_after(b"\x30\x84\xff\xff\xff\xff"), None);
    }
}

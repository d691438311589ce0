//! Credentials and usernames (catalogue 2.3).

use splicegate_tests::catalog::*;
use splicegate_tests::*;

pub(crate) fn cases(lab: &Lab) -> Vec<Case> {
    let e = lab.e();
    let with = |auth: &str| format!("CONNECT {e} HTTP/1.1\r\nHost: {e}\r\n{auth}\r\n");
    let creds = |u: &str, p: &str| with(&format!("Proxy-Authorization: {}\r\n", basic(u, p)));
    let raw = |decoded: &[u8]| with(&auth_raw(decoded));
    let rule = |rules: &str| creds(&format!("package-7-{rules}"), KEY);
    let blob = b64(format!("{USER}:{KEY}").as_bytes());
    let mut v = Vec::new();
    v.push(case(
        "A-01 no credentials",
        with(""),
        Expect::Error(407, "ERR_AUTH_REQUIRED"),
    ));
    for (id, value) in [
        ("A-03 Bearer", "Bearer abc"),
        ("A-03b Digest", "Digest username=\"x\""),
        ("A-03c Negotiate", "Negotiate YII="),
    ] {
        v.push(
            case(
                &format!("{id}: a scheme other than Basic"),
                with(&format!("Proxy-Authorization: {value}\r\n")),
                Expect::Error(407, "ERR_AUTH_REQUIRED"),
            )
            .bug(BUG_SCHEME),
        );
    }
    v.push(case(
        "A-23 only an origin Authorization",
        with(&format!("Authorization: Basic {blob}\r\n")),
        Expect::Error(407, "ERR_AUTH_REQUIRED"),
    ));
    for (id, value) in [
        ("A-04 Basic !!!!", "Basic !!!!".to_string()),
        (
            "A-04b base64 without padding",
            "Basic cGFja2FnZQ".to_string(),
        ),
        (
            "A-04c base64 with an inner space",
            "Basic cGFj a2Fn".to_string(),
        ),
        (
            "A-04d URL-safe base64",
            "Basic cGFja2FnZS0xMjM_LWE-".to_string(),
        ),
        ("A-04e Basic and nothing", "Basic".to_string()),
        ("A-04f Basic and spaces", "Basic    ".to_string()),
        ("A-22b a tab after Basic", format!("Basic\t{blob}")),
    ] {
        v.push(case(
            id,
            with(&format!("Proxy-Authorization: {value}\r\n")),
            auth_failed(),
        ));
    }
    v.push(case(
        "A-05 no colon",
        raw(b"package-7-country-us"),
        auth_failed(),
    ));
    // The key is right, so the rules are read: "us\0" is not a country.
    v.push(case(
        "A-06 NUL before the colon",
        raw(format!("{USER}\0:{KEY}").as_bytes()),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-07 the key and a newline",
        raw(format!("{USER}:{KEY}\n").as_bytes()),
        auth_failed(),
    ));
    v.push(case(
        "A-08 credentials that are not UTF-8",
        raw(b"\xff\xfe:\xff"),
        auth_failed(),
    ));
    v.push(case(
        "A-09 wrong key",
        creds(USER, "wrong-key"),
        auth_failed(),
    ));
    v.push(case(
        "A-10 a package id of 23 digits",
        creds("package-99999999999999999999999-country-us", KEY),
        auth_failed(),
    ));
    v.push(case(
        "A-10b empty username",
        raw(format!(":{KEY}").as_bytes()),
        auth_failed(),
    ));
    v.push(case(
        "A-11 a username of 1000 dashes",
        creds(&"-".repeat(1000), KEY),
        auth_failed(),
    ));
    v.push(case(
        "A-11b package-7- and 1000 dashes, right key",
        creds(&format!("package-7-{}", "-".repeat(1000)), KEY),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-11c package-7- and 1000 dashes, wrong key",
        creds(&format!("package-7-{}", "-".repeat(1000)), "wrong-key"),
        auth_failed(),
    ));
    v.push(case(
        "A-11d a password of 1000 bytes",
        creds(USER, &"k".repeat(1000)),
        auth_failed(),
    ));
    v.push(case(
        "A-12 a Basic value of 64 kB",
        with(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            "QUFB".repeat(16_384)
        )),
        too_large(),
    ));
    v.push(case(
        "A-13 country twice",
        rule("country-us-country-gb"),
        Expect::Error(400, "ERR_DUPLICATE_PARAM"),
    ));
    v.push(case(
        "A-14 country-US",
        rule("country-US"),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-16 bind-node with onerror-replace",
        rule("country-us-session-x-bind-node-onerror-replace"),
        Expect::Error(400, "ERR_INVALID_COMBINATION"),
    ));
    v.push(case(
        "A-17 session id ☃",
        rule("country-us-session-\u{2603}"),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-18 session id with a Cyrillic а",
        rule("country-us-session-\u{430}bc"),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-18b a non-ASCII value",
        rule("country-\u{fc}s"),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-18c a non-ASCII username",
        creds("\u{43f}\u{430}\u{43a}\u{435}\u{442}-7-country-us", KEY),
        auth_failed(),
    ));
    v.push(case(
        "A-19 city-new%20york",
        rule("country-us-city-new%20york"),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-19b a key with no value",
        rule("country-"),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-19c no targeting rule",
        creds("package-7", KEY),
        Expect::Error(400, "ERR_MISSING_PARAMS"),
    ));
    v.push(case(
        "A-19d a username of 256 bytes",
        rule(&format!("country-us-session-{}", "s".repeat(228))),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v.push(case(
        "A-21 lowercase field name and scheme",
        with(&format!("proxy-authorization: basic {blob}\r\n")),
        Expect::Tunnel(After::RoundTrip),
    ));
    v.push(case(
        "A-22 two spaces after Basic",
        with(&format!("Proxy-Authorization: Basic  {blob}\r\n")),
        Expect::Tunnel(After::RoundTrip),
    ));
    v.push(case(
        "A-26 the key as the username",
        creds(KEY, KEY),
        auth_failed(),
    ));
    v.push(
        case(
            "A-27 the key inside the rules",
            creds(&format!("package-7-country-us-{KEY}"), KEY),
            auth_failed(),
        )
        .bug(BUG_KEY_IN_RULES),
    );
    v.push(case(
        "A-28 CR LF and ESC in the rules (log injection)",
        raw(
            format!("package-7-country-us-session-x\r\nINJECTED fake log line \x1b[31m:{KEY}")
                .as_bytes(),
        ),
        Expect::Error(400, "ERR_INVALID_VALUE"),
    ));
    v
}

#[test]
fn credentials_catalogue() {
    let lab = Lab::start();
    let cases = fixed(cases(&lab));
    run_table(&lab, &cases, "credentials");
    // an unknown package and a wrong key get the same bytes (no
    // oracle for which package ids exist).
    let e = lab.e();
    let answer = |user: &str, key: &str| {
        let mut c = lab.gw.conn_from(lab.src.next());
        let r = c.connect(&e, Some((user, key)), &[]).expect("answer");
        (r.raw_head, r.body)
    };
    assert_eq!(
        answer(USER, "wrong-key"),
        answer("package-99999-country-us", KEY),
        "a wrong key and an unknown package are told apart"
    );
}

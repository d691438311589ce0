//! Targets: CONNECT authorities and the egress policy (catalogue 2.2,
//! SPEC 7).

use splicegate_tests::catalog::*;

pub(crate) fn cases(lab: &Lab) -> Vec<Case> {
    let a = auth_line();
    let e = lab.e();
    let connect = |auth: &str| format!("CONNECT {auth} HTTP/1.1\r\nHost: {auth}\r\n{a}\r\n");
    let connect_nohost = |auth: &str| format!("CONNECT {auth} HTTP/1.1\r\n{a}\r\n");
    let mut v = Vec::new();
    v.push(case(
        "C-01 baseline CONNECT",
        connect(&e),
        Expect::Tunnel(After::RoundTrip),
    ));
    v.push(case(
        "C-02 CONNECT without a port",
        connect_nohost(&TARGET_IP.to_string()),
        bad(),
    ));
    for t in [
        format!("http://{e}"),
        "/".to_string(),
        format!("{e}/x"),
        format!("{TARGET_IP}:"),
        format!("{TARGET_IP}:0"),
        format!("{TARGET_IP}:65536"),
        format!("{TARGET_IP}:99999"),
        format!("{TARGET_IP}:+443"),
        format!("{TARGET_IP}:443abc"),
        format!("{TARGET_IP}: 443"),
        format!("user:pw@{e}"),
        "::1:443".to_string(),
        "[::1:443".to_string(),
        "[fe80::1%25eth0]:443".to_string(),
        "[%3A%3A1]:443".to_string(),
        "example%2Ecom:443".to_string(),
        "127.0.0.1%00.example.com:443".to_string(),
        "[blocked.example]:443".to_string(),
        format!("{}.com:443", "a".repeat(64)),
        format!("{}:443", vec!["a".repeat(59); 5].join(".")),
        ":80".to_string(),
        "nohostport".to_string(),
    ] {
        v.push(case(
            &format!("C-03 CONNECT {t}"),
            connect_nohost(&t),
            bad(),
        ));
    }
    v.push(case(
        "C-18 CONNECT to raw UTF-8 exämple.com",
        cat(&[
            b"CONNECT ex",
            b"\xc3\xa4",
            format!("mple.com:443 HTTP/1.1\r\n{a}\r\n").as_bytes(),
        ]),
        bad(),
    ));
    v.push(case(
        "C-06 Host differs from the CONNECT authority",
        format!("CONNECT {e} HTTP/1.1\r\nHost: other.example:443\r\n{a}\r\n"),
        bad(),
    ));
    v.push(case(
        "C-19 CONNECT with a Content-Length",
        format!("CONNECT {e} HTTP/1.1\r\nHost: {e}\r\n{a}Content-Length: 5\r\n\r\nhello"),
        bad(),
    ));
    // Blocked ports and non-public addresses (no allow_targets covers them).
    for t in [
        format!("{TARGET_IP}:25"),
        "smtp.example.com:25".to_string(),
        "127.0.0.1:443".into(),
        "10.0.0.1:443".into(),
        "172.16.0.1:443".into(),
        "192.168.1.1:443".into(),
        "169.254.169.254:80".into(),
        "100.64.0.1:443".into(),
        "0.0.0.0:443".into(),
        "255.255.255.255:443".into(),
        "224.0.0.1:443".into(),
        "198.18.0.1:443".into(),
        "[::1]:443".into(),
        "[::]:443".into(),
        "[fc00::1]:443".into(),
        "[fe80::1]:443".into(),
        "[::ffff:127.0.0.1]:443".into(),
        "[::ffff:a9fe:a9fe]:80".into(),
        "[64:ff9b::7f00:1]:443".into(),
        "[2002:7f00:1::]:443".into(),
        "2130706433:80".into(),
        "0x7f000001:80".into(),
        "0177.0.0.1:80".into(),
        "127.1:80".into(),
        "127.000.000.001:80".into(),
        "0x7f.1:80".into(),
        "017700000001:80".into(),
        "localhost:443".into(),
        "LOCALHOST.:443".into(),
        "foo.localhost:443".into(),
    ] {
        v.push(case(
            &format!("C-08 CONNECT {t} is DISALLOWED"),
            connect(&t),
            disallowed(),
        ));
    }
    for t in [
        "127.0.0.1:80",
        "[::1]:80",
        "127.1:80",
        "169.254.169.254:80",
        "0x7f000001:80",
    ] {
        v.push(case(
            &format!("C-08b GET http://{t}/ is DISALLOWED"),
            format!("GET http://{t}/ HTTP/1.1\r\nHost: {t}\r\n{a}\r\n"),
            disallowed(),
        ));
    }
    v.push(case(
        "C-08c GET to a blocked port",
        format!("GET http://{TARGET_IP}:25/ HTTP/1.1\r\nHost: {TARGET_IP}:25\r\n{a}\r\n"),
        disallowed(),
    ));
    v.push(case(
        // The test node answers a target off the machine as unreachable
        // without dialing it: nothing leaves the machine.
        "C-10 a public IPv6 literal is not a bad request",
        connect("[2606:4700:4700::1111]:443"),
        Expect::NotBadRequest,
    ));
    let early: Vec<u8> = cat(&[
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc],
        &(0..508u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>(),
    ]);
    v.push(case(
        "C-20 a ClientHello right behind the CONNECT is tunnel payload",
        cat(&[connect(&e).as_bytes(), &early]),
        Expect::Tunnel(After::EchoBack(early.clone())),
    ));
    let second = format!("CONNECT other.example:443 HTTP/1.1\r\n{a}\r\n");
    v.push(case(
        "C-21 a second CONNECT before the 200 is tunnel payload",
        cat(&[connect(&e).as_bytes(), second.as_bytes()]),
        Expect::Tunnel(After::EchoBack(second.clone().into_bytes())),
    ));
    v
}

#[test]
fn targets_and_egress_catalogue() {
    let lab = Lab::start();
    let cases = fixed(cases(&lab));
    run_table(&lab, &cases, "targets and egress");
}

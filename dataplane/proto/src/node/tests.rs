use proptest::prelude::*;
use splicegate_addr::{Host, Target};

use super::*;

fn target() -> Target {
    Target::new(Host::Domain("example.com".into()), 443)
}

/// Drive a handshake with a scripted node: each entry is what the node
/// sends after reading our next message. Returns what we sent, the outcome
/// and the leftover tunnel bytes.
fn run(mut hs: Handshake, answers: &[&[u8]]) -> (Vec<Vec<u8>>, Option<Outcome>, Vec<u8>) {
    let mut sent = Vec::new();
    let mut input = Vec::new();
    let mut answers = answers.iter();
    loop {
        let mut out = Vec::new();
        hs.poll_transmit(&mut out);
        if !out.is_empty() {
            sent.push(out);
        }
        let event = loop {
            if let Some(e) = hs.handle_input(&input) {
                break Some(e);
            }
            match answers.next() {
                Some(a) => input.extend_from_slice(a),
                None => break None,
            }
        };
        match event {
            None => return (sent, None, input),
            Some(Event::Continue { consumed }) => {
                input.drain(..consumed);
            }
            Some(Event::Done { outcome, consumed }) => {
                input.drain(..consumed.min(input.len()));
                return (sent, Some(outcome), input);
            }
        }
    }
}

#[test]
fn http_node_answers_mean_what_the_node_table_says() {
    let cases: &[(&[u8], Outcome)] = &[
        (
            b"HTTP/1.1 200 Connection established\r\n\r\n",
            Outcome::Established,
        ),
        (b"HTTP/1.0 204 OK\r\n\r\n", Outcome::Established),
        (
            b"HTTP/1.1 502 Bad Gateway\r\n\r\n",
            Outcome::TargetRefused(Answer::Status(502)),
        ),
        (
            b"HTTP/1.1 500 Oops\r\n\r\n",
            Outcome::TargetRefused(Answer::Status(500)),
        ),
        (
            b"HTTP/1.1 503 No\r\n\r\n",
            Outcome::TargetRefused(Answer::Status(503)),
        ),
        (
            b"HTTP/1.1 504 Gateway Timeout\r\n\r\n",
            Outcome::TargetTimeout(Some(Answer::Status(504))),
        ),
        (
            b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
            Outcome::NodeFault("answered CONNECT with 407".into()),
        ),
        (
            b"HTTP/1.1 403 Forbidden\r\n\r\n",
            Outcome::NodeFault("answered CONNECT with 403".into()),
        ),
    ];
    for (answer, want) in cases {
        let (sent, outcome, _) = run(Handshake::http(&target(), None), &[answer]);
        assert_eq!(
            outcome.as_ref(),
            Some(want),
            "{}",
            String::from_utf8_lossy(answer)
        );
        assert_eq!(sent.len(), 1);
        assert!(sent[0].starts_with(b"CONNECT example.com:443 HTTP/1.1\r\n"));
    }
}

#[test]
fn http_node_garbage_is_a_node_fault_and_bytes_after_the_head_are_kept() {
    let (_, outcome, _) = run(
        Handshake::http(&target(), None),
        &[b"SSH-2.0-OpenSSH\r\n\r\n"],
    );
    assert!(matches!(outcome, Some(Outcome::NodeFault(w)) if w.starts_with("malformed answer")));
    let (_, outcome, left) = run(
        Handshake::http(&target(), None),
        &[b"HTTP/1.1 200 OK\r\n\r\nhello"],
    );
    assert_eq!(outcome, Some(Outcome::Established));
    assert_eq!(left, b"hello");
    let huge = [
        b"HTTP/1.1 200 OK\r\nX: ".as_slice(),
        &[b'a'; MAX_ANSWER_HEAD],
    ]
    .concat();
    let (_, outcome, _) = run(Handshake::http(&target(), None), &[&huge]);
    assert!(
        matches!(outcome, Some(Outcome::NodeFault(_))),
        "{outcome:?}"
    );
}

#[test]
fn http_node_gets_ipv6_in_brackets_and_credentials() {
    let v6 = Target::new(Host::Ip("2001:db8::1".parse().unwrap()), 8443);
    let (sent, _, _) = run(Handshake::http(&v6, Some(("u", "p"))), &[]);
    let text = String::from_utf8(sent[0].clone()).unwrap();
    assert!(
        text.starts_with("CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n"),
        "{text}"
    );
    assert!(
        text.contains("Proxy-Authorization: Basic dTpw\r\n"),
        "{text}"
    );
}

#[test]
fn socks5_node_without_credentials() {
    let (sent, outcome, left) = run(
        Handshake::socks5(&target(), None),
        &[b"\x05\x00", b"\x05\x00\x00\x01\x7f\x00\x00\x01\x1f\x90tail"],
    );
    assert_eq!(outcome, Some(Outcome::Established));
    assert_eq!(left, b"tail");
    assert_eq!(sent[0], b"\x05\x01\x00");
    assert_eq!(sent[1], b"\x05\x01\x00\x03\x0bexample.com\x01\xbb");
}

#[test]
fn socks5_node_with_credentials_and_its_verdicts() {
    let ok = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x1f\x90";
    let (sent, outcome, _) = run(
        Handshake::socks5(&target(), Some(("user", "pw"))),
        &[b"\x05\x02", b"\x01\x00", ok],
    );
    assert_eq!(outcome, Some(Outcome::Established));
    assert_eq!(sent[0], b"\x05\x01\x02");
    assert_eq!(sent[1], b"\x01\x04user\x02pw");
    let (_, outcome, _) = run(
        Handshake::socks5(&target(), Some(("user", "pw"))),
        &[b"\x05\x02", b"\x01\x01"],
    );
    assert_eq!(
        outcome,
        Some(Outcome::NodeFault("rejected our credentials".into()))
    );
    // A node asking for a password we do not have, or refusing every method.
    let (_, outcome, _) = run(Handshake::socks5(&target(), None), &[b"\x05\x02"]);
    assert_eq!(
        outcome,
        Some(Outcome::NodeFault("chose method 0x02".into()))
    );
    let (_, outcome, _) = run(Handshake::socks5(&target(), None), &[b"\x05\xff"]);
    assert_eq!(
        outcome,
        Some(Outcome::NodeFault("chose method 0xff".into()))
    );
}

#[test]
fn socks5_node_replies_mean_what_the_node_table_says() {
    let reply = |code: u8| [&b"\x05"[..], &[code], b"\x00\x01\x00\x00\x00\x00\x00\x00"].concat();
    let cases = [
        (0x00, Outcome::Established),
        (0x03, Outcome::TargetRefused(Answer::Reply(0x03))),
        (0x04, Outcome::TargetRefused(Answer::Reply(0x04))),
        (0x05, Outcome::TargetRefused(Answer::Reply(0x05))),
        (0x06, Outcome::TargetTimeout(Some(Answer::Reply(0x06)))),
        (0x01, Outcome::NodeFault("replied 0x01".into())),
        (0x02, Outcome::NodeFault("replied 0x02".into())),
        (0x07, Outcome::NodeFault("replied 0x07".into())),
    ];
    for (code, want) in cases {
        let r = reply(code);
        let (_, outcome, _) = run(Handshake::socks5(&target(), None), &[b"\x05\x00", &r]);
        assert_eq!(outcome, Some(want), "reply {code:#04x}");
    }
}

#[test]
fn timeouts_and_closes_by_phase() {
    let hs = Handshake::socks5(&target(), None);
    assert_eq!(hs.phase(), Phase::Node);
    assert_eq!(
        hs.on_timeout(),
        Outcome::NodeFault("no answer in time".into())
    );
    let mut hs = Handshake::socks5(&target(), None);
    let mut out = Vec::new();
    hs.poll_transmit(&mut out);
    assert_eq!(
        hs.handle_input(b"\x05\x00"),
        Some(Event::Continue { consumed: 2 })
    );
    assert_eq!(hs.phase(), Phase::Target);
    assert_eq!(hs.on_timeout(), Outcome::TargetTimeout(None));
    assert!(matches!(hs.on_closed(), Outcome::NodeFault(_)));
    let hs = Handshake::http(&target(), None);
    assert_eq!(hs.phase(), Phase::Target);
    assert_eq!(hs.on_timeout(), Outcome::TargetTimeout(None));
    assert_eq!(
        hs.on_closed(),
        Outcome::NodeFault("closed before answering CONNECT".into())
    );
}

proptest! {
    /// Fed any bytes, one at a time or at once, a handshake never panics and
    /// reaches the same outcome.
    #[test]
    fn split_invariant(bytes in proptest::collection::vec(any::<u8>(), 0..64), socks in any::<bool>(), creds in any::<bool>()) {
        let make = || {
            let c = creds.then_some(("u", "p"));
            if socks { Handshake::socks5(&target(), c) } else { Handshake::http(&target(), c) }
        };
        let whole = run(make(), &[&bytes]).1;
        let pieces: Vec<&[u8]> = bytes.chunks(1).collect();
        let split = run(make(), &pieces).1;
        prop_assert_eq!(whole, split);
    }
}

use proptest::prelude::*;

use super::*;
use crate::test_support::assert_split_invariant;

fn bytes(f: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    f.encode(&mut out);
    out
}

fn shown(
    r: Result<Option<(Frame<'_>, usize)>, FrameError>,
) -> Result<Option<(String, usize)>, FrameError> {
    r.map(|o| o.map(|(f, n)| (format!("{f:?}"), n)))
}

fn round_trip(f: Frame<'_>) {
    let b = bytes(&f);
    assert_eq!(decode(&b), Ok(Some((f.clone(), b.len()))), "{f:?}");
    assert_split_invariant(&b, |p| shown(decode(p)));
}

#[test]
fn every_frame_round_trips_and_decodes_split() {
    let mut fields = FieldsBuf::new();
    assert!(fields.push("id", "dev-8f3a"));
    assert!(fields.push("key", "k_secret"));
    assert!(fields.push("country", "us"));
    round_trip(Frame::Hello {
        version: VERSION,
        fields: fields.fields(),
    });
    round_trip(Frame::Welcome {
        version: VERSION,
        fields: FieldsBuf::new().fields(),
    });
    round_trip(Frame::Refuse {
        reason: Refusal::Key,
        text: "wrong key",
    });
    round_trip(Frame::Open {
        stream: 7,
        window: INITIAL_WINDOW,
        target: "[2001:db8::1]:443",
    });
    round_trip(Frame::Opened {
        stream: 7,
        window: 1,
    });
    round_trip(Frame::OpenFailed {
        stream: 7,
        reason: OpenError::Disallowed,
        text: "10.0.0.1 is on the device's network",
    });
    round_trip(Frame::Data {
        stream: u32::MAX,
        fin: true,
        bytes: &[0u8; MAX_PAYLOAD],
    });
    round_trip(Frame::Data {
        stream: 1,
        fin: false,
        bytes: b"",
    });
    round_trip(Frame::Window {
        stream: 3,
        increment: 5,
    });
    round_trip(Frame::Reset {
        stream: 3,
        text: "",
    });
    round_trip(Frame::Ping {
        ack: true,
        opaque: u64::MAX - 3,
    });
    round_trip(Frame::GoAway { text: "draining" });
    round_trip(Frame::OpenUdp { stream: 9 });
    round_trip(Frame::Datagram {
        stream: 9,
        addr: "example.com:443",
        bytes: &[7u8; MAX_UDP_PAYLOAD],
    });
}

#[test]
fn a_datagram_without_an_address_is_refused() {
    let mut f = vec![Kind::Datagram as u8, 0, 0, 0, 0, 9];
    f.extend_from_slice(&1u32.to_be_bytes());
    f.push(0);
    assert!(matches!(decode(&f), Err(FrameError::Malformed { .. })));
    assert_eq!(
        split_datagram(&[3, b'a', b':']),
        None,
        "shorter than its address"
    );
    assert_eq!(
        split_datagram(&[2, b'a', b':', 9]),
        Some(("a:", &[9u8][..]))
    );
    assert_eq!(datagram_len(&"x".repeat(256), b""), None);
    // A pre-encoded payload makes the same frame as the parts do.
    let mut payload = Vec::new();
    write_datagram_payload("a:1", b"xy", &mut payload);
    let mut raw = Vec::new();
    assert!(encode_datagram_frame(9, &payload, &mut raw));
    let mut parts = Vec::new();
    Frame::Datagram {
        stream: 9,
        addr: "a:1",
        bytes: b"xy",
    }
    .encode(&mut parts);
    assert_eq!(raw, parts);
    assert!(!encode_datagram_frame(9, &[], &mut raw));
}

#[test]
fn hostile_headers_are_refused_before_the_payload_arrives() {
    // An oversized length is refused from the header alone.
    let mut h = bytes(&Frame::Data {
        stream: 1,
        fin: false,
        bytes: b"",
    });
    h[6..10].copy_from_slice(&((MAX_PAYLOAD as u32) + 1).to_be_bytes());
    assert!(matches!(decode(&h), Err(FrameError::TooLong { .. })));
    // A control frame is small.
    let mut g = bytes(&Frame::GoAway { text: "" });
    g[6..10].copy_from_slice(&((MAX_CONTROL as u32) + 1).to_be_bytes());
    assert!(matches!(decode(&g), Err(FrameError::TooLong { .. })));
    // Unknown kinds, from the first byte.
    assert_eq!(decode(&[0]), Err(FrameError::UnknownKind(0)));
    assert_eq!(decode(&[200, 0, 0]), Err(FrameError::UnknownKind(200)));
    // Stream frames never on stream 0, link frames only there.
    let mut d = bytes(&Frame::Window {
        stream: 1,
        increment: 1,
    });
    d[2..6].copy_from_slice(&0u32.to_be_bytes());
    assert!(matches!(decode(&d), Err(FrameError::WrongStream { .. })));
    let mut p = bytes(&Frame::Ping {
        ack: false,
        opaque: 1,
    });
    p[5] = 1;
    assert!(matches!(decode(&p), Err(FrameError::WrongStream { .. })));
    // Undefined flags.
    let mut w = bytes(&Frame::Window {
        stream: 1,
        increment: 1,
    });
    w[1] = FIN;
    assert!(matches!(decode(&w), Err(FrameError::BadFlags { .. })));
    // A zero increment and a forged field line.
    let mut z = bytes(&Frame::Window {
        stream: 1,
        increment: 1,
    });
    z[10..].copy_from_slice(&0u32.to_be_bytes());
    assert!(matches!(decode(&z), Err(FrameError::Malformed { .. })));
    let mut hello = vec![Kind::Hello as u8, 0, 0, 0, 0, 0];
    let payload = b"\x00\x01id=a\nKEY=b\n";
    hello.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    hello.extend_from_slice(payload);
    assert!(matches!(decode(&hello), Err(FrameError::Malformed { .. })));
}

#[test]
fn fields_cannot_forge_each_other_and_secrets_stay_out_of_logs() {
    let mut f = FieldsBuf::new();
    assert!(!f.push("city", "x\nkey=forged"));
    assert!(!f.push("Key", "v"));
    assert!(f.push("key", "hunter2"));
    assert!(f.push("enrol_key", "s3cret"));
    assert_eq!(f.fields().get("key"), Some("hunter2"));
    assert_eq!(f.fields().get("city"), None);
    let shown = format!("{:?}", f.fields());
    assert!(
        !shown.contains("hunter2") && !shown.contains("s3cret"),
        "{shown}"
    );
}

#[test]
fn texts_are_clipped_on_a_char_boundary() {
    let long = "é".repeat(MAX_CONTROL);
    let b = bytes(&Frame::Reset {
        stream: 1,
        text: &long,
    });
    match decode(&b) {
        Ok(Some((Frame::Reset { text, .. }, n))) => {
            assert_eq!(n, b.len());
            assert!(text.len() <= MAX_CONTROL && text.chars().all(|c| c == 'é'));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_sender_past_its_window_is_caught() {
    let mut w = RecvWindow::new(100);
    assert!(w.receive(60));
    assert!(w.receive(40));
    assert!(!w.receive(1), "one byte past the window");
    let mut s = SendWindow::new(10);
    s.spend(10);
    assert_eq!(s.available(), 0);
    assert!(s.grant(5));
    assert_eq!(s.available(), 5);
    assert!(!s.grant(u32::MAX), "a window flood is refused");
}

#[test]
fn the_window_grows_while_the_reader_keeps_up_and_not_when_it_lags() {
    let rtt = 100_000; // 100 ms
    // A fast reader: half the window drained well within two round trips,
    // every time. The window doubles up to its maximum.
    let mut w = RecvWindow::new(INITIAL_WINDOW);
    let mut now = 0;
    let mut granted = u64::from(INITIAL_WINDOW);
    let mut received = 0u64;
    for _ in 0..200 {
        let half = (w.size() / 2) as usize;
        assert!(w.receive(half));
        received += half as u64;
        now += 10_000;
        if let Some(inc) = w.consume(half, now, rtt) {
            granted += u64::from(inc);
        }
        assert!(
            granted - received <= u64::from(w.size()),
            "never more in flight than the window"
        );
    }
    assert_eq!(w.size(), MAX_WINDOW);
    // A slow reader: grants come seconds apart. The window stays put.
    let mut w = RecvWindow::new(INITIAL_WINDOW);
    let mut now = 0;
    for _ in 0..50 {
        let half = (w.size() / 2) as usize;
        assert!(w.receive(half));
        now += 5_000_000;
        w.consume(half, now, rtt);
    }
    assert_eq!(w.size(), INITIAL_WINDOW);
}

proptest! {
    #[test]
    fn decode_never_panics_and_stays_within_its_input(input in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(Some((_, n))) = decode(&input) {
            prop_assert!(n <= input.len() && n >= HEADER);
        }
        assert_split_invariant(&input, |p| shown(decode(p)));
    }
}

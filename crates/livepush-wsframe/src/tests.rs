use super::*;
use proptest::prelude::*;
use proptest::sample::Index;

mod client;
mod roundtrip;

/// The mask of RFC 6455 section 5.7's examples.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONT: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;
const FIN: u8 = 0x80;

/// An owned [`Event`] of either role, for comparing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Text(String),
    /// A binary message in the server role: its length.
    Binary(usize),
    /// A binary message in the client role: its bytes.
    Bytes(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>, String),
}

impl From<Event<'_>> for Ev {
    fn from(e: Event<'_>) -> Ev {
        match e {
            Event::Text(t) => Ev::Text(t.to_owned()),
            Event::Binary(n) => Ev::Binary(n),
            Event::Ping(p) => Ev::Ping(p.to_vec()),
            Event::Pong => Ev::Pong,
            Event::Close { code, reason } => Ev::Close(code, reason.to_owned()),
        }
    }
}

/// A client frame: `first` is the raw first byte (FIN | RSV | opcode); `len_bytes` forces
/// a length encoding (0, 2 or 8 extra bytes), `None` picks the minimal one.
fn raw_frame(
    first: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
    len_bytes: Option<usize>,
) -> Vec<u8> {
    let len = payload.len();
    let len_bytes = len_bytes.unwrap_or(match len {
        0..=125 => 0,
        126..=0xFFFF => 2,
        _ => 8,
    });
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut out = vec![first];
    match len_bytes {
        0 => out.push(mask_bit | len as u8),
        2 => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked client frame with minimal length encoding.
fn masked(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
    raw_frame(if fin { FIN | op } else { op }, payload, Some(MASK), None)
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// Feeds `chunks` in order; all events, or the first error.
fn feed_chunks<'a, R: Role>(
    dec: &mut Decoder<R>,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<Ev>, DecodeError>
where
    Ev: for<'e> From<Event<'e, R>>,
{
    let mut events = Vec::new();
    for chunk in chunks {
        let mut chunk = chunk.to_vec();
        dec.feed(&mut chunk, |e| {
            events.push(Ev::from(e));
            ControlFlow::Continue(())
        })?;
    }
    Ok(events)
}

fn decode(max: usize, bytes: &[u8]) -> Result<Vec<Ev>, DecodeError> {
    let mut dec = Decoder::new(max);
    let events = feed_chunks(&mut dec, [bytes])?;
    assert!(dec.is_idle(), "not idle after complete input");
    Ok(events)
}

fn text(s: &str) -> Ev {
    Ev::Text(s.to_owned())
}

// ---- basics -------------------------------------------------------------------------

#[test]
fn rfc_example_hello() {
    let bytes = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    assert_eq!(decode(100, &bytes), Ok(vec![text("Hello")]));
}

#[test]
fn small_text_frame() {
    assert_eq!(
        decode(100, &masked(true, TEXT, b"hi")),
        Ok(vec![text("hi")])
    );
    assert_eq!(decode(100, &masked(true, TEXT, b"")), Ok(vec![text("")]));
    let s = "x".repeat(125);
    let bytes = masked(true, TEXT, s.as_bytes());
    assert_eq!(bytes.len(), 2 + 4 + 125);
    assert_eq!(decode(1000, &bytes), Ok(vec![text(&s)]));
}

#[test]
fn sixteen_bit_lengths() {
    for len in [126, 127, 300, 0xFFFF] {
        let s: String = (0..len)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let bytes = masked(true, TEXT, s.as_bytes());
        assert_eq!(bytes[1], 0x80 | 126);
        assert_eq!(bytes.len(), 2 + 2 + 4 + len);
        assert_eq!(decode(1 << 20, &bytes), Ok(vec![text(&s)]), "len {len}");
    }
}

#[test]
fn sixty_four_bit_lengths() {
    for len in [0x1_0000, 70_000] {
        let s: String = (0..len)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let bytes = masked(true, TEXT, s.as_bytes());
        assert_eq!(bytes[1], 0x80 | 127);
        assert_eq!(decode(1 << 20, &bytes), Ok(vec![text(&s)]), "len {len}");
        let bytes = masked(true, BINARY, s.as_bytes());
        assert_eq!(decode(1 << 20, &bytes), Ok(vec![Ev::Binary(len)]));
    }
}

#[test]
fn non_minimal_length_encoding_is_accepted() {
    for len_bytes in [2, 8] {
        let bytes = raw_frame(FIN | TEXT, b"abc", Some(MASK), Some(len_bytes));
        assert_eq!(decode(100, &bytes), Ok(vec![text("abc")]));
    }
}

#[test]
fn binary_reports_length_and_never_allocates() {
    let payload = vec![7u8; 1000];
    let mut bytes = masked(false, BINARY, &payload[..400]);
    bytes.extend(masked(true, PING, b"p"));
    bytes.extend(masked(true, CONT, &payload[400..]));
    let mut dec = Decoder::new(1000);
    for chunk in bytes.chunks(7) {
        let mut chunk = chunk.to_vec();
        dec.feed(&mut chunk, |_| ControlFlow::Continue(())).unwrap();
        // A straddling ping may be held briefly, never the binary payload.
        assert!(dec.heap_capacity() <= MAX_CONTROL_PAYLOAD);
    }
    assert!(dec.is_idle());
    let events = feed_chunks(&mut Decoder::new(1000), bytes.chunks(7)).unwrap();
    assert_eq!(events, vec![Ev::Ping(b"p".to_vec()), Ev::Binary(1000)]);
}

#[test]
fn ping_pong_events() {
    let mut bytes = masked(true, PING, b"are you there");
    bytes.extend(masked(true, PING, b""));
    bytes.extend(masked(true, PONG, b"whatever"));
    assert_eq!(
        decode(10, &bytes),
        Ok(vec![
            Ev::Ping(b"are you there".to_vec()),
            Ev::Ping(vec![]),
            Ev::Pong
        ])
    );
}

#[test]
fn control_frames_are_not_bound_by_max_message() {
    let bytes = masked(true, PING, &[1; 125]);
    assert_eq!(decode(0, &bytes), Ok(vec![Ev::Ping(vec![1; 125])]));
}

#[test]
fn fragmented_text_with_ping_between_fragments() {
    let mut bytes = masked(false, TEXT, b"Hel");
    bytes.extend(masked(true, PING, b"ping!"));
    bytes.extend(masked(false, CONT, b""));
    bytes.extend(masked(true, PONG, b""));
    bytes.extend(masked(true, CONT, b"lo"));
    bytes.extend(masked(true, TEXT, b"next"));
    let want = vec![
        Ev::Ping(b"ping!".to_vec()),
        Ev::Pong,
        text("Hello"),
        text("next"),
    ];
    assert_eq!(decode(100, &bytes), Ok(want.clone()));
    // Same, byte by byte: the ping straddles reads while text bytes sit in the buffer.
    let mut dec = Decoder::new(100);
    assert_eq!(feed_chunks(&mut dec, bytes.chunks(1)), Ok(want));
    assert!(dec.is_idle());
}

#[test]
fn close_between_fragments() {
    let mut bytes = masked(false, TEXT, b"a");
    bytes.extend(masked(true, CLOSE, &close_payload(1000, "bye")));
    assert_eq!(
        decode_partial(100, &bytes),
        Ok(vec![Ev::Close(Some(1000), "bye".into())])
    );
}

/// Like `decode` without requiring idleness at the end.
fn decode_partial(max: usize, bytes: &[u8]) -> Result<Vec<Ev>, DecodeError> {
    feed_chunks(&mut Decoder::new(max), [bytes])
}

#[test]
fn utf8_code_point_split_across_fragments() {
    let s = "héllo €𝄞";
    let b = s.as_bytes();
    // Cut inside the 2-byte é and inside the 4-byte clef.
    let (a, rest) = b.split_at(2);
    let (m, z) = rest.split_at(rest.len() - 2);
    let mut bytes = masked(false, TEXT, a);
    bytes.extend(masked(false, CONT, m));
    bytes.extend(masked(true, CONT, z));
    assert_eq!(decode(100, &bytes), Ok(vec![text(s)]));
}

#[test]
fn invalid_utf8_is_bad_utf8() {
    assert_eq!(
        decode(100, &masked(true, TEXT, &[b'a', 0xff])),
        Err(DecodeError::BadUtf8)
    );
    // Truncated code point at the end of a message.
    assert_eq!(
        decode(100, &masked(true, TEXT, &"é".as_bytes()[..1])),
        Err(DecodeError::BadUtf8)
    );
    // Fragmented: the error shows only when the message is complete.
    let mut dec = Decoder::new(100);
    let mut first = masked(false, TEXT, &[0xC3]);
    assert_eq!(dec.feed(&mut first, |_| ControlFlow::Continue(())), Ok(()));
    let mut last = masked(true, CONT, b"x");
    assert_eq!(
        dec.feed(&mut last, |_| ControlFlow::Continue(())),
        Err(DecodeError::BadUtf8)
    );
    assert_eq!(DecodeError::BadUtf8.close_code(), 1007);
}

// ---- rule violations ----------------------------------------------------------------

fn protocol(max: usize, bytes: &[u8]) {
    match decode_partial(max, bytes) {
        Err(DecodeError::Protocol(_)) => {}
        other => panic!("expected a protocol error for {bytes:02x?}, got {other:?}"),
    }
}

/// After `prefix` (decoded fine), the first two bytes of `frame` alone are refused: a bad
/// frame is rejected without waiting for the rest of its header or its payload.
fn protocol_early(prefix: &[u8], frame: &[u8]) {
    let mut dec = Decoder::new(1000);
    let mut prefix = prefix.to_vec();
    assert_eq!(dec.feed(&mut prefix, |_| ControlFlow::Continue(())), Ok(()));
    let mut two = frame[..2].to_vec();
    match dec.feed(&mut two, |_| ControlFlow::Continue(())) {
        Err(DecodeError::Protocol(_)) => {}
        other => panic!("expected an early protocol error for {frame:02x?}, got {other:?}"),
    }
}

#[test]
fn unmasked_frame_is_protocol_error() {
    protocol(100, &raw_frame(FIN | TEXT, b"hi", None, None));
    protocol(100, &raw_frame(FIN | PING, b"", None, None));
    protocol_early(b"", &raw_frame(FIN | TEXT, &[b'a'; 300], None, None));
    // Detected from the first two bytes, without the rest of the frame.
    let mut dec = Decoder::new(100);
    let mut two = [FIN | TEXT, 2];
    assert!(matches!(
        dec.feed(&mut two, |_| ControlFlow::Continue(())),
        Err(DecodeError::Protocol(_))
    ));
}

#[test]
fn reserved_bits_are_protocol_error() {
    for rsv in [0x40, 0x20, 0x10, 0x70] {
        protocol(100, &raw_frame(FIN | rsv | TEXT, b"hi", Some(MASK), None));
        protocol(100, &raw_frame(FIN | rsv | PING, b"", Some(MASK), None));
        protocol_early(b"", &raw_frame(FIN | rsv | TEXT, b"hi", Some(MASK), None));
    }
}

#[test]
fn reserved_opcodes_are_protocol_error() {
    for op in (3..=7).chain(11..=15) {
        protocol(100, &raw_frame(FIN | op, b"x", Some(MASK), None));
        protocol_early(b"", &raw_frame(FIN | op, b"x", Some(MASK), None));
    }
}

#[test]
fn control_frame_longer_than_125_is_protocol_error() {
    protocol(1000, &masked(true, PING, &[0; 126]));
    protocol_early(b"", &masked(true, PING, &[0; 126]));
    protocol(1000, &masked(true, CLOSE, &[0x03; 200]));
    // 16-bit length encoding of a short control payload is refused as well.
    protocol(1000, &raw_frame(FIN | PONG, b"x", Some(MASK), Some(2)));
}

#[test]
fn fragmented_control_frame_is_protocol_error() {
    protocol(100, &masked(false, PING, b"x"));
    protocol_early(b"", &masked(false, PING, b"x"));
    protocol(100, &masked(false, CLOSE, b""));
    protocol(100, &masked(false, PONG, b""));
}

#[test]
fn continuation_without_message_is_protocol_error() {
    protocol(100, &masked(true, CONT, b"x"));
    protocol(100, &masked(false, CONT, b"x"));
    // After a complete message too.
    let mut bytes = masked(false, TEXT, b"a");
    bytes.extend(masked(true, CONT, b"b"));
    bytes.extend(masked(true, CONT, b"c"));
    protocol(100, &bytes);
    // From the header alone: no payload byte of the bad frame is needed.
    protocol_early(b"", &masked(true, CONT, b"payload"));
    let mut done = masked(false, TEXT, b"a");
    done.extend(masked(true, CONT, b"b"));
    protocol_early(&done, &masked(false, CONT, b"payload"));
}

#[test]
fn new_message_inside_fragmented_message_is_protocol_error() {
    for (first, second) in [
        (TEXT, TEXT),
        (TEXT, BINARY),
        (BINARY, TEXT),
        (BINARY, BINARY),
    ] {
        let mut bytes = masked(false, first, b"a");
        bytes.extend(masked(true, second, b"b"));
        protocol(100, &bytes);
        protocol_early(&masked(false, first, b"a"), &masked(true, second, b"b"));
    }
}

#[test]
fn sixty_four_bit_length_with_top_bit_is_protocol_error() {
    let mut bytes = vec![FIN | TEXT, 0x80 | 127];
    bytes.extend_from_slice(&(1u64 << 63).to_be_bytes());
    bytes.extend_from_slice(&MASK);
    protocol(usize::MAX, &bytes);
    let mut bytes = vec![FIN | BINARY, 0x80 | 127];
    bytes.extend_from_slice(&u64::MAX.to_be_bytes());
    bytes.extend_from_slice(&MASK);
    protocol(usize::MAX, &bytes);
}

#[test]
fn frame_larger_than_max_is_too_big_before_payload() {
    // Only the header: the declared length alone is refused, nothing is buffered.
    for len in [101usize, 300, 70_000] {
        let full = masked(true, TEXT, &vec![b'a'; len]);
        let header = &full[..header_len(full[1])];
        let mut dec = Decoder::new(100);
        let mut h = header.to_vec();
        assert_eq!(
            dec.feed(&mut h, |_| ControlFlow::Continue(())),
            Err(DecodeError::TooBig { limit: 100 })
        );
        assert_eq!(dec.heap_capacity(), 0);
    }
    let mut huge = vec![FIN | BINARY, 0x80 | 127];
    huge.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
    huge.extend_from_slice(&MASK);
    assert_eq!(
        decode_partial(1 << 20, &huge),
        Err(DecodeError::TooBig { limit: 1 << 20 })
    );
    assert_eq!(DecodeError::TooBig { limit: 1 }.close_code(), 1009);
}

#[test]
fn message_exactly_max_is_accepted() {
    let mut bytes = masked(false, TEXT, &[b'a'; 60]);
    bytes.extend(masked(true, CONT, &[b'b'; 40]));
    let want = format!("{}{}", "a".repeat(60), "b".repeat(40));
    assert_eq!(decode(100, &bytes), Ok(vec![Ev::Text(want)]));
    assert_eq!(
        decode(100, &masked(true, BINARY, &[0; 100])),
        Ok(vec![Ev::Binary(100)])
    );
}

#[test]
fn fragmented_message_larger_than_max_is_too_big() {
    for op in [TEXT, BINARY] {
        let mut bytes = masked(false, op, &[b'a'; 60]);
        bytes.extend(masked(false, CONT, &[b'b'; 40]));
        bytes.extend(masked(true, CONT, b"c"));
        assert_eq!(
            decode_partial(100, &bytes),
            Err(DecodeError::TooBig { limit: 100 })
        );
    }
}

#[test]
fn decoder_is_unusable_after_an_error() {
    let mut dec = Decoder::new(100);
    let mut bad = raw_frame(FIN | TEXT, b"hi", None, None);
    assert!(dec.feed(&mut bad, |_| ControlFlow::Continue(())).is_err());
    let mut good = masked(true, TEXT, b"hi");
    let mut called = false;
    assert!(
        dec.feed(&mut good, |_| {
            called = true;
            ControlFlow::Continue(())
        })
        .is_err()
    );
    assert!(!called);
    assert_eq!(dec.heap_capacity(), 0);
}

#[test]
fn error_frees_the_buffer() {
    let mut dec = Decoder::new(100);
    let mut part = masked(false, TEXT, b"abc");
    dec.feed(&mut part, |_| ControlFlow::Continue(())).unwrap();
    assert!(dec.heap_capacity() > 0);
    let mut bad = masked(true, TEXT, b"x");
    assert!(dec.feed(&mut bad, |_| ControlFlow::Continue(())).is_err());
    assert_eq!(dec.heap_capacity(), 0);
    assert_eq!(DecodeError::Protocol("x").close_code(), 1002);
}

// ---- close frames -------------------------------------------------------------------

#[test]
fn close_empty_payload_has_no_code() {
    assert_eq!(
        decode(100, &masked(true, CLOSE, b"")),
        Ok(vec![Ev::Close(None, String::new())])
    );
}

#[test]
fn close_one_byte_payload_is_protocol_error() {
    protocol(100, &masked(true, CLOSE, &[0x03]));
}

#[test]
fn close_code_and_reason() {
    assert_eq!(
        decode(
            100,
            &masked(true, CLOSE, &close_payload(1001, "going away ✓"))
        ),
        Ok(vec![Ev::Close(Some(1001), "going away ✓".into())])
    );
    assert_eq!(
        decode(100, &masked(true, CLOSE, &close_payload(4000, ""))),
        Ok(vec![Ev::Close(Some(4000), String::new())])
    );
}

#[test]
fn close_codes_valid_and_invalid() {
    for code in [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
    ] {
        assert_eq!(
            decode(100, &masked(true, CLOSE, &close_payload(code, "r"))),
            Ok(vec![Ev::Close(Some(code), "r".into())]),
            "code {code}"
        );
    }
    for code in [3000, 3999, 4000, 4999] {
        assert!(decode(100, &masked(true, CLOSE, &close_payload(code, ""))).is_ok());
    }
    for code in [
        0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        assert_eq!(
            decode_partial(100, &masked(true, CLOSE, &close_payload(code, ""))),
            Err(DecodeError::Protocol("invalid close code")),
            "code {code}"
        );
    }
}

#[test]
fn close_reason_invalid_utf8_is_bad_utf8() {
    let mut p = 1000u16.to_be_bytes().to_vec();
    p.extend_from_slice(&[0xce, 0xba, 0xe1, 0xbd]);
    assert_eq!(
        decode_partial(100, &masked(true, CLOSE, &p)),
        Err(DecodeError::BadUtf8)
    );
}

// ---- reads --------------------------------------------------------------------------

/// Several kinds of frames, with all three length encodings.
fn mixed_stream() -> (Vec<u8>, Vec<Ev>) {
    let long: String = "ab€".repeat(50); // 250 bytes: 16-bit length
    let huge = "z".repeat(70_000); // 64-bit length
    let mut b = masked(true, TEXT, b"first");
    b.extend(masked(false, TEXT, &long.as_bytes()[..101]));
    b.extend(masked(true, PING, b"in between"));
    b.extend(masked(true, CONT, &long.as_bytes()[101..]));
    b.extend(masked(true, BINARY, &[9; 300]));
    b.extend(masked(true, PONG, b"p"));
    b.extend(masked(true, TEXT, b""));
    b.extend(masked(true, TEXT, huge.as_bytes()));
    b.extend(masked(true, CLOSE, &close_payload(1000, "done")));
    let want = vec![
        text("first"),
        Ev::Ping(b"in between".to_vec()),
        Ev::Text(long),
        Ev::Binary(300),
        Ev::Pong,
        text(""),
        Ev::Text(huge),
        Ev::Close(Some(1000), "done".into()),
    ];
    (b, want)
}

#[test]
fn split_at_every_byte_boundary() {
    // A smaller stream than mixed_stream so that every split point stays cheap.
    let long: String = "ab€".repeat(50);
    let mut b = masked(true, TEXT, b"first");
    b.extend(masked(false, TEXT, &long.as_bytes()[..101]));
    b.extend(masked(true, PING, b"in between"));
    b.extend(masked(true, CONT, &long.as_bytes()[101..]));
    b.extend(masked(true, BINARY, &[9; 130]));
    b.extend(masked(true, CLOSE, &close_payload(1000, "done")));
    let want = vec![
        text("first"),
        Ev::Ping(b"in between".to_vec()),
        Ev::Text(long),
        Ev::Binary(130),
        Ev::Close(Some(1000), "done".into()),
    ];
    for i in 0..=b.len() {
        let (x, y) = b.split_at(i);
        let mut dec = Decoder::new(1000);
        assert_eq!(
            feed_chunks(&mut dec, [x, y]),
            Ok(want.clone()),
            "split at {i}"
        );
        assert!(dec.is_idle(), "split at {i}");
        for j in i..=b.len() {
            let (y, z) = b[i..].split_at(j - i);
            let mut dec = Decoder::new(1000);
            assert_eq!(
                feed_chunks(&mut dec, [x, y, z]),
                Ok(want.clone()),
                "{i}/{j}"
            );
        }
    }
    let mut dec = Decoder::new(1000);
    assert_eq!(feed_chunks(&mut dec, b.chunks(1)), Ok(want));
    assert!(dec.is_idle());
}

#[test]
fn mixed_stream_in_one_read_and_in_pieces() {
    let (bytes, want) = mixed_stream();
    assert_eq!(decode(1 << 20, &bytes), Ok(want.clone()));
    for size in [1, 2, 3, 5, 13, 4096] {
        let mut dec = Decoder::new(1 << 20);
        assert_eq!(feed_chunks(&mut dec, bytes.chunks(size)), Ok(want.clone()));
        assert!(dec.is_idle());
    }
}

#[test]
fn many_frames_in_one_read() {
    let mut bytes = Vec::new();
    let mut want = Vec::new();
    for i in 0..2000 {
        let s = format!("message {i}");
        bytes.extend(masked(true, TEXT, s.as_bytes()));
        want.push(Ev::Text(s));
        if i % 100 == 0 {
            bytes.extend(masked(true, PING, &[i as u8]));
            want.push(Ev::Ping(vec![i as u8]));
        }
    }
    let mut dec = Decoder::new(100);
    let mut events = Vec::new();
    dec.feed(&mut bytes, |e| {
        events.push(Ev::from(e));
        // Nothing straddles: complete frames are decoded from the input, no allocation.
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(events, want);
    assert!(dec.is_idle());
}

#[test]
fn break_stops_early() {
    let mut bytes = masked(true, TEXT, b"a");
    bytes.extend(masked(true, CLOSE, &close_payload(1000, "")));
    bytes.extend(masked(true, TEXT, b"after close"));
    let mut dec = Decoder::new(100);
    let mut events = Vec::new();
    let r = dec.feed(&mut bytes, |e| {
        let close = matches!(e, Event::Close { .. });
        events.push(Ev::from(e));
        if close {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    assert_eq!(r, Ok(()));
    assert_eq!(
        events,
        vec![text("a"), Ev::Close(Some(1000), String::new())]
    );
    assert!(dec.is_idle());
}

#[test]
fn idle_only_between_messages_and_buffer_is_freed() {
    let mut dec = Decoder::new(1000);
    assert!(dec.is_idle());
    let mut nothing = [];
    dec.feed(&mut nothing, |_| ControlFlow::Continue(()))
        .unwrap();
    assert!(dec.is_idle());

    // Partial header: not idle, no heap.
    let frame = masked(true, TEXT, b"hello");
    let mut a = frame[..3].to_vec();
    dec.feed(&mut a, |_| ControlFlow::Continue(())).unwrap();
    assert!(!dec.is_idle());
    assert_eq!(dec.heap_capacity(), 0);
    // Partial payload: one allocation of exactly the frame's size.
    let mut b = frame[3..8].to_vec();
    dec.feed(&mut b, |_| ControlFlow::Continue(())).unwrap();
    assert!(!dec.is_idle());
    assert_eq!(dec.heap_capacity(), 5);
    let mut c = frame[8..].to_vec();
    let mut got = Vec::new();
    dec.feed(&mut c, |e| {
        got.push(Ev::from(e));
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(got, vec![text("hello")]);
    assert!(dec.is_idle());
    assert_eq!(dec.heap_capacity(), 0);

    // Open fragmented message: not idle until its last fragment.
    let mut f = masked(false, TEXT, b"");
    dec.feed(&mut f, |_| ControlFlow::Continue(())).unwrap();
    assert!(!dec.is_idle());
    let mut f = masked(false, CONT, b"abc");
    dec.feed(&mut f, |_| ControlFlow::Continue(())).unwrap();
    assert!(dec.heap_capacity() >= 3);
    let mut f = masked(true, CONT, b"d");
    dec.feed(&mut f, |_| ControlFlow::Continue(())).unwrap();
    assert!(dec.is_idle());

    // A straddling ping with no message open is freed once delivered.
    let ping = masked(true, PING, b"0123456789");
    let mut p1 = ping[..9].to_vec();
    dec.feed(&mut p1, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(dec.heap_capacity(), 10);
    let mut p2 = ping[9..].to_vec();
    dec.feed(&mut p2, |_| ControlFlow::Continue(())).unwrap();
    assert!(dec.is_idle());
}

#[test]
fn buffer_is_reused_while_reads_end_inside_frames_then_freed() {
    let texts = ["0123456789", "abcdefghij", "ABCDE", "0123456789abcdefghij"];
    let frames: Vec<Vec<u8>> = texts
        .iter()
        .map(|t| masked(true, TEXT, t.as_bytes()))
        .collect();
    let stream = frames.concat();
    let mut dec = Decoder::new(100);
    let mut got = Vec::new();
    let mut feed = |dec: &mut Decoder, bytes: &[u8]| {
        dec.feed(&mut bytes.to_vec(), |e| {
            got.push(Ev::from(e));
            ControlFlow::Continue(())
        })
        .unwrap();
    };
    // Reads 1 to 3 end 3 bytes into the payload of frames 1 to 3 (header: 2 + 4 bytes).
    let ends: Vec<usize> = (1..=3).map(|k| frames[..k].concat().len() + 9).collect();
    feed(&mut dec, &stream[..ends[0]]);
    assert_eq!(dec.heap_capacity(), 10);
    // The 5-byte frame that straddles next goes into the same buffer (allocated anew, it
    // would have 5 bytes).
    feed(&mut dec, &stream[ends[0]..ends[1]]);
    assert_eq!(dec.heap_capacity(), 10);
    assert!(!dec.is_idle());
    // A longer one needs more.
    feed(&mut dec, &stream[ends[1]..ends[2]]);
    assert_eq!(dec.heap_capacity(), 20);
    // A read that ends between frames leaves nothing buffered, and nothing held.
    feed(&mut dec, &stream[ends[2]..]);
    assert!(dec.is_idle());
    assert_eq!(dec.heap_capacity(), 0);
    assert_eq!(got, texts.into_iter().map(text).collect::<Vec<_>>());
}

#[test]
fn decoder_is_small() {
    assert!(
        std::mem::size_of::<Decoder>() <= 96,
        "{}",
        std::mem::size_of::<Decoder>()
    );
}

#[test]
fn apply_mask_any_offset_matches_bytewise() {
    let data: Vec<u8> = (0..=255u8).collect();
    for offset in 0..8 {
        for len in [0, 1, 7, 8, 9, 31, 200] {
            let mut fast = data[..len].to_vec();
            apply_mask(&mut fast, MASK, offset);
            let slow: Vec<u8> = data[..len]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ MASK[(i + offset) % 4])
                .collect();
            assert_eq!(fast, slow, "offset {offset} len {len}");
        }
    }
}

// ---- writers ------------------------------------------------------------------------

#[test]
fn write_header_lengths() {
    let cases: [(usize, &[u8]); 6] = [
        (0, &[0x81, 0]),
        (125, &[0x81, 125]),
        (126, &[0x81, 126, 0, 126]),
        (0xFFFF, &[0x81, 126, 0xFF, 0xFF]),
        (0x1_0000, &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        (
            usize::MAX,
            &[0x81, 127, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
        ),
    ];
    for (len, want) in cases {
        let mut out = Vec::new();
        write_header(&mut out, OpCode::Text, len);
        assert_eq!(out, want, "len {len}");
        assert_eq!(header_size(len), want.len());
        assert!(out.len() <= MAX_HEADER);
    }
    let mut out = Vec::new();
    for op in [
        OpCode::Text,
        OpCode::Binary,
        OpCode::Close,
        OpCode::Ping,
        OpCode::Pong,
    ] {
        write_header(&mut out, op, 0);
    }
    assert_eq!(out, [0x81, 0, 0x82, 0, 0x88, 0, 0x89, 0, 0x8A, 0]);
}

#[test]
fn text_frame_is_header_and_payload() {
    assert_eq!(text_frame(b"hi"), [0x81, 2, b'h', b'i']);
    let payload = vec![b'x'; 300];
    let f = text_frame(&payload);
    assert_eq!(&f[..4], &[0x81, 126, 1, 44]);
    assert_eq!(&f[4..], &payload[..]);
    assert_eq!(f.capacity(), f.len());
}

#[test]
fn control_frame_truncates_to_125() {
    assert_eq!(
        control_frame(OpCode::Pong, b"abc"),
        [0x8A, 3, b'a', b'b', b'c']
    );
    let f = control_frame(OpCode::Ping, &[7; 200]);
    assert_eq!(f.len(), 2 + 125);
    assert_eq!(&f[..2], &[0x89, 125]);
}

#[test]
fn close_frame_truncates_reason_on_char_boundary() {
    assert_eq!(close_frame(1000, ""), [0x88, 2, 0x03, 0xE8]);
    assert_eq!(
        close_frame(1001, "bye"),
        [0x88, 5, 0x03, 0xE9, b'b', b'y', b'e']
    );
    let ascii = "a".repeat(200);
    let f = close_frame(1000, &ascii);
    assert_eq!(f.len(), 2 + 125);
    assert_eq!(&f[4..], "a".repeat(123).as_bytes());
    // 122 ASCII bytes then a 3-byte char: byte 123 falls inside it, so it is dropped.
    let reason = format!("{}€tail", "a".repeat(122));
    let f = close_frame(1000, &reason);
    assert_eq!(f[1], 2 + 122);
    assert_eq!(&f[4..], "a".repeat(122).as_bytes());
    let reason = format!("{}€", "a".repeat(120));
    let f = close_frame(1000, &reason);
    assert_eq!(&f[4..], reason.as_bytes());
}

// ---- cross-check with tungstenite (a real client implementation) -------------------

mod tung {
    pub use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
    pub use tungstenite::protocol::frame::{CloseFrame, Frame, FrameHeader};
}

/// A frame encoded by tungstenite, masked the way its client does.
fn tung_bytes(mut frame: tung::Frame, mask: [u8; 4]) -> Vec<u8> {
    frame.header_mut().mask = Some(mask);
    let mut out = Vec::new();
    frame.format(&mut out).unwrap();
    out
}

#[test]
fn decodes_tungstenite_client_frames() {
    let m = [0xA1, 0x02, 0xF3, 0x44];
    let long = "ü".repeat(40_000); // 80,000 bytes: 64-bit length
    let mut bytes = tung_bytes(
        tung::Frame::message(
            b"hello".to_vec(),
            tung::OpCode::Data(tung::Data::Text),
            true,
        ),
        m,
    );
    bytes.extend(tung_bytes(
        tung::Frame::message(
            long.as_bytes()[..1001].to_vec(),
            tung::OpCode::Data(tung::Data::Text),
            false,
        ),
        m,
    ));
    bytes.extend(tung_bytes(tung::Frame::ping(b"tick".to_vec()), m));
    bytes.extend(tung_bytes(
        tung::Frame::message(
            long.as_bytes()[1001..].to_vec(),
            tung::OpCode::Data(tung::Data::Continue),
            true,
        ),
        m,
    ));
    bytes.extend(tung_bytes(
        tung::Frame::message(vec![0; 200], tung::OpCode::Data(tung::Data::Binary), true),
        m,
    ));
    bytes.extend(tung_bytes(tung::Frame::pong(b"tock".to_vec()), m));
    bytes.extend(tung_bytes(
        tung::Frame::close(Some(tung::CloseFrame {
            code: tung::CloseCode::Away,
            reason: "leaving ✈".into(),
        })),
        m,
    ));
    let want = vec![
        text("hello"),
        Ev::Ping(b"tick".to_vec()),
        Ev::Text(long),
        Ev::Binary(200),
        Ev::Pong,
        Ev::Close(Some(1001), "leaving ✈".into()),
    ];
    assert_eq!(decode(1 << 20, &bytes), Ok(want.clone()));
    let mut dec = Decoder::new(1 << 20);
    assert_eq!(feed_chunks(&mut dec, bytes.chunks(777)), Ok(want));
    assert!(dec.is_idle());
}

/// Parses one server frame with tungstenite: (header, payload length, payload).
fn tung_parse(bytes: &[u8]) -> (tung::FrameHeader, u64, Vec<u8>) {
    let mut cursor = std::io::Cursor::new(bytes);
    let (header, len) = tung::FrameHeader::parse(&mut cursor)
        .expect("tungstenite rejects our frame")
        .expect("tungstenite wants more bytes");
    let start = cursor.position() as usize;
    assert_eq!(start, header_size(len as usize));
    (header, len, bytes[start..].to_vec())
}

#[test]
fn our_frames_parse_with_tungstenite() {
    for len in [0, 1, 125, 126, 0xFFFF, 0x1_0000, 100_000] {
        let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        let (h, n, p) = tung_parse(&text_frame(&payload));
        assert!(h.is_final && !h.rsv1 && !h.rsv2 && !h.rsv3);
        assert_eq!(h.opcode, tung::OpCode::Data(tung::Data::Text));
        assert_eq!(h.mask, None);
        assert_eq!(n, len as u64);
        assert_eq!(p, payload);
    }
    for (op, want) in [
        (OpCode::Ping, tung::Control::Ping),
        (OpCode::Pong, tung::Control::Pong),
    ] {
        let (h, n, p) = tung_parse(&control_frame(op, &[5; 300]));
        assert_eq!(h.opcode, tung::OpCode::Control(want));
        assert!(h.is_final && h.mask.is_none());
        assert_eq!((n, p), (125, vec![5; 125]));
    }
    let reason = "ω".repeat(100); // 200 bytes, truncated to 61 chars = 122 bytes
    let (h, n, p) = tung_parse(&close_frame(1008, &reason));
    assert_eq!(h.opcode, tung::OpCode::Control(tung::Control::Close));
    assert!(h.is_final && h.mask.is_none());
    assert_eq!(n, 124);
    assert_eq!(
        tung::CloseCode::from(u16::from_be_bytes([p[0], p[1]])),
        tung::CloseCode::Policy
    );
    assert_eq!(std::str::from_utf8(&p[2..]).unwrap(), "ω".repeat(61));
}

// ---- property tests -----------------------------------------------------------------

/// One client message, and the control frames to put after each of its fragments.
#[derive(Debug, Clone)]
enum Item {
    Message {
        binary: bool,
        data: Vec<u8>,
        cuts: Vec<Index>,
        between: Vec<Option<Control>>,
    },
    Control(Control),
}

#[derive(Debug, Clone)]
enum Control {
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

fn arb_control() -> impl Strategy<Value = Control> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..=125).prop_map(Control::Ping),
        prop::collection::vec(any::<u8>(), 0..=125).prop_map(Control::Pong),
    ]
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,40}",
        2 => any::<String>(),
        1 => "[a-zé€𝄞]{100,400}",
    ]
}

fn arb_item() -> impl Strategy<Value = Item> {
    let message = (
        any::<bool>(),
        arb_text(),
        prop::collection::vec(any::<u8>(), 0..300),
        prop::collection::vec(any::<Index>(), 0..5),
        prop::collection::vec(prop::option::of(arb_control()), 0..5),
    )
        .prop_map(|(binary, text, bytes, cuts, between)| Item::Message {
            binary,
            data: if binary { bytes } else { text.into_bytes() },
            cuts,
            between,
        });
    prop_oneof![4 => message, 1 => arb_control().prop_map(Item::Control)]
}

fn control_frame_bytes(c: &Control, mask: [u8; 4]) -> (Vec<u8>, Ev) {
    match c {
        Control::Ping(p) => (
            raw_frame(FIN | PING, p, Some(mask), None),
            Ev::Ping(p.clone()),
        ),
        Control::Pong(p) => (raw_frame(FIN | PONG, p, Some(mask), None), Ev::Pong),
    }
}

/// Serializes items as a client would (masked, fragmented as asked); the events a correct
/// decoder emits.
fn serialize(
    items: &[Item],
    masks: &[[u8; 4]],
    close: Option<&(u16, String)>,
) -> (Vec<u8>, Vec<Ev>) {
    let mut masks = masks.iter().copied().cycle();
    let mut bytes = Vec::new();
    let mut events = Vec::new();
    for item in items {
        match item {
            Item::Control(c) => {
                let (b, e) = control_frame_bytes(c, masks.next().unwrap());
                bytes.extend(b);
                events.push(e);
            }
            Item::Message {
                binary,
                data,
                cuts,
                between,
            } => {
                let mut points: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
                points.sort_unstable();
                points.push(data.len());
                let mut start = 0;
                let last = points.len() - 1;
                for (k, &end) in points.iter().enumerate() {
                    let op = match (k, binary) {
                        (0, false) => TEXT,
                        (0, true) => BINARY,
                        _ => CONT,
                    };
                    let fin = if k == last { FIN } else { 0 };
                    bytes.extend(raw_frame(
                        fin | op,
                        &data[start..end],
                        Some(masks.next().unwrap()),
                        None,
                    ));
                    start = end;
                    if k < last
                        && let Some(Some(c)) = between.get(k)
                    {
                        let (b, e) = control_frame_bytes(c, masks.next().unwrap());
                        bytes.extend(b);
                        events.push(e);
                    }
                }
                events.push(if *binary {
                    Ev::Binary(data.len())
                } else {
                    Ev::Text(String::from_utf8(data.clone()).unwrap())
                });
            }
        }
    }
    if let Some((code, reason)) = close {
        bytes.extend(raw_frame(
            FIN | CLOSE,
            &close_payload(*code, reason),
            Some(masks.next().unwrap()),
            None,
        ));
        events.push(Ev::Close(Some(*code), reason.clone()));
    }
    (bytes, events)
}

fn chunks_at<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    points.sort_unstable();
    points.push(bytes.len());
    let mut start = 0;
    points
        .into_iter()
        .map(|end| {
            let c = &bytes[start..end];
            start = end;
            c
        })
        .collect()
}

/// `bytes` with each `(at, x)` of `flips` XORed into it.
fn corrupt(mut bytes: Vec<u8>, flips: &[(Index, u8)]) -> Vec<u8> {
    if !bytes.is_empty() {
        for (i, x) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= x;
        }
    }
    bytes
}

/// `text` as tungstenite writes it (`encode` formats one frame), fragmented at `cuts`, with
/// `ping` after every fragment but the last; the events a decoder must emit.
fn tung_fragmented(
    text: &str,
    cuts: &[Index],
    ping: Option<&Vec<u8>>,
    encode: impl Fn(tung::Frame) -> Vec<u8>,
) -> (Vec<u8>, Vec<Ev>) {
    let data = text.as_bytes();
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
    points.sort_unstable();
    points.push(data.len());
    let mut bytes = Vec::new();
    let mut want = Vec::new();
    let mut start = 0;
    for (k, &end) in points.iter().enumerate() {
        let op = if k == 0 {
            tung::Data::Text
        } else {
            tung::Data::Continue
        };
        let fin = k == points.len() - 1;
        bytes.extend(encode(tung::Frame::message(
            data[start..end].to_vec(),
            tung::OpCode::Data(op),
            fin,
        )));
        start = end;
        if !fin && let Some(p) = ping {
            bytes.extend(encode(tung::Frame::ping(p.clone())));
            want.push(Ev::Ping(p.clone()));
        }
    }
    want.push(Ev::Text(text.to_owned()));
    (bytes, want)
}

/// Feeds `input` cut at `cuts` to `dec` (limit `max`): no panic, no message over `max`, the
/// buffer within `max` + one control frame, and after an error, no buffer and only errors.
fn check_garbage<R: Role>(
    mut dec: Decoder<R>,
    max: usize,
    input: &[u8],
    cuts: &[Index],
) -> Result<(), TestCaseError>
where
    Ev: for<'e> From<Event<'e, R>>,
{
    let mut failed = false;
    for chunk in chunks_at(input, cuts) {
        let mut chunk = chunk.to_vec();
        let r = dec.feed(&mut chunk, |e| {
            match Ev::from(e) {
                Ev::Text(t) => assert!(t.len() <= max),
                Ev::Binary(n) => assert!(n <= max),
                Ev::Bytes(b) => assert!(b.len() <= max),
                _ => {}
            }
            ControlFlow::Continue(())
        });
        prop_assert!(
            dec.heap_capacity() <= max + MAX_CONTROL_PAYLOAD,
            "capacity {} with max {}",
            dec.heap_capacity(),
            max
        );
        if failed {
            prop_assert!(r.is_err());
        }
        if r.is_err() {
            failed = true;
            prop_assert_eq!(dec.heap_capacity(), 0);
        }
    }
    Ok(())
}

fn arb_close() -> impl Strategy<Value = Option<(u16, String)>> {
    prop::option::of((
        prop_oneof![1000..=1003u16, 1007..=1014u16, 3000..=4999u16],
        "\\PC{0,30}",
    ))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn prop_valid_stream_in_any_chunks_decodes_exactly(
        items in prop::collection::vec(arb_item(), 0..8),
        masks in prop::collection::vec(any::<[u8; 4]>(), 1..6),
        close in arb_close(),
        cuts in prop::collection::vec(any::<Index>(), 0..20),
    ) {
        let (bytes, want) = serialize(&items, &masks, close.as_ref());
        let mut dec = Decoder::new(1 << 16);
        let got = feed_chunks(&mut dec, chunks_at(&bytes, &cuts));
        prop_assert_eq!(got, Ok(want));
        prop_assert!(dec.is_idle());
        prop_assert_eq!(dec.heap_capacity(), 0);
    }

    #[test]
    fn prop_garbage_never_panics_or_overallocates(
        max in 0usize..400,
        input in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..600),
            // Valid streams with some bytes corrupted get much deeper into the decoder.
            (
                prop::collection::vec(arb_item(), 1..5),
                prop::collection::vec(any::<[u8; 4]>(), 1..3),
                prop::collection::vec((any::<Index>(), any::<u8>()), 0..4),
            ).prop_map(|(items, masks, flips)| corrupt(serialize(&items, &masks, None).0, &flips)),
        ],
        cuts in prop::collection::vec(any::<Index>(), 0..20),
    ) {
        check_garbage(Decoder::new(max), max, &input, &cuts)?;
    }

    #[test]
    fn prop_tungstenite_client_frames_decode(
        text in arb_text(),
        cuts in prop::collection::vec(any::<Index>(), 0..4),
        ping in prop::option::of(prop::collection::vec(any::<u8>(), 0..=125)),
        mask in any::<[u8; 4]>(),
        read_cuts in prop::collection::vec(any::<Index>(), 0..10),
    ) {
        let (bytes, want) = tung_fragmented(&text, &cuts, ping.as_ref(), |f| tung_bytes(f, mask));
        let mut dec = Decoder::new(1 << 16);
        prop_assert_eq!(feed_chunks(&mut dec, chunks_at(&bytes, &read_cuts)), Ok(want));
        prop_assert!(dec.is_idle());
    }
}

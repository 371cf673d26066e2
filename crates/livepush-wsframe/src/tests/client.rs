//! The client role: server frames in (never masked), masked frames out; checked against
//! hand-made frames and against tungstenite.

use super::*;

/// An unmasked (server) frame with minimal length encoding.
fn unmasked(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
    raw_frame(if fin { FIN | op } else { op }, payload, None, None)
}

impl From<Event<'_, Client>> for Ev {
    fn from(e: Event<'_, Client>) -> Ev {
        match e {
            Event::Text(t) => Ev::Text(t.to_owned()),
            Event::Binary(b) => Ev::Bytes(b.to_vec()),
            Event::Ping(p) => Ev::Ping(p.to_vec()),
            Event::Pong => Ev::Pong,
            Event::Close { code, reason } => Ev::Close(code, reason.to_owned()),
        }
    }
}

fn client_decode(max: usize, bytes: &[u8]) -> Result<Vec<Ev>, DecodeError> {
    feed_chunks(&mut ClientDecoder::new_client(max), [bytes])
}

/// `len` bytes of text with multi-byte characters (ASCII at the end to hit `len` exactly).
fn text_of_len(len: usize) -> String {
    let mut s: String = "aé€𝄞".chars().cycle().take(len / 3).collect();
    while s.len() > len {
        s.pop();
    }
    s.extend(std::iter::repeat_n('.', len - s.len()));
    s
}

#[test]
fn role_costs_no_space() {
    assert_eq!(
        std::mem::size_of::<Decoder<Server>>(),
        std::mem::size_of::<Decoder<Client>>()
    );
    assert_eq!(std::mem::size_of::<Server>(), 0);
    // What the server's connections were measured with (see Decoder's docs).
    #[cfg(target_pointer_width = "64")]
    assert_eq!(std::mem::size_of::<Decoder>(), 56);
}

#[test]
fn decodes_server_frames_of_every_length_form() {
    for len in [0, 1, 125, 126, 127, 0xFFFF, 0x1_0000, 70_000] {
        let text = text_of_len(len);
        assert_eq!(text.len(), len);
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut stream = unmasked(true, TEXT, text.as_bytes());
        stream.extend(unmasked(true, BINARY, &bytes));
        let want = vec![Ev::Text(text), Ev::Bytes(bytes)];
        assert_eq!(
            client_decode(1 << 20, &stream),
            Ok(want.clone()),
            "len {len}"
        );
        let mut dec = ClientDecoder::new_client(1 << 20);
        assert_eq!(feed_chunks(&mut dec, stream.chunks(1000)), Ok(want));
        assert!(dec.is_idle());
        assert_eq!(dec.heap_capacity(), 0);
    }
}

/// What a server sends: fragments with control frames between them, both kinds of message.
fn server_stream() -> (Vec<u8>, Vec<Ev>) {
    let long = "ab€".repeat(50);
    let blob: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
    let mut b = unmasked(true, TEXT, b"first");
    b.extend(unmasked(false, TEXT, &long.as_bytes()[..101]));
    b.extend(unmasked(true, PING, b"in between"));
    b.extend(unmasked(true, CONT, &long.as_bytes()[101..]));
    b.extend(unmasked(false, BINARY, &blob[..7]));
    b.extend(unmasked(true, PONG, b"p"));
    b.extend(unmasked(false, CONT, &blob[7..200]));
    b.extend(unmasked(true, CONT, &blob[200..]));
    b.extend(unmasked(true, BINARY, b""));
    b.extend(unmasked(true, CLOSE, &close_payload(4001, "slow")));
    let want = vec![
        text("first"),
        Ev::Ping(b"in between".to_vec()),
        Ev::Text(long),
        Ev::Pong,
        Ev::Bytes(blob),
        Ev::Bytes(vec![]),
        Ev::Close(Some(4001), "slow".into()),
    ];
    (b, want)
}

#[test]
fn server_stream_split_anywhere_decodes_the_same() {
    let (bytes, want) = server_stream();
    for i in 0..=bytes.len() {
        let (x, y) = bytes.split_at(i);
        let mut dec = ClientDecoder::new_client(1000);
        assert_eq!(
            feed_chunks(&mut dec, [x, y]),
            Ok(want.clone()),
            "split at {i}"
        );
        assert!(dec.is_idle(), "split at {i}");
    }
    let mut dec = ClientDecoder::new_client(1000);
    assert_eq!(feed_chunks(&mut dec, bytes.chunks(1)), Ok(want));
    assert_eq!(dec.heap_capacity(), 0);
}

#[test]
fn binary_is_kept_only_while_it_is_open() {
    let blob = vec![7u8; 1000];
    let mut bytes = unmasked(false, BINARY, &blob[..400]);
    bytes.extend(unmasked(true, PING, b"p"));
    bytes.extend(unmasked(true, CONT, &blob[400..]));
    let mut dec = ClientDecoder::new_client(1000);
    let mut events = Vec::new();
    for chunk in bytes.chunks(7) {
        let mut chunk = chunk.to_vec();
        dec.feed(&mut chunk, |e| {
            events.push(Ev::from(e));
            ControlFlow::Continue(())
        })
        .unwrap();
        assert!(dec.heap_capacity() <= 1000 + MAX_CONTROL_PAYLOAD);
    }
    assert_eq!(events, vec![Ev::Ping(b"p".to_vec()), Ev::Bytes(blob)]);
    assert!(dec.is_idle());
    assert_eq!(dec.heap_capacity(), 0);
}

#[test]
fn complete_frames_in_one_read_are_decoded_in_place() {
    let mut bytes = Vec::new();
    for i in 0..500 {
        bytes.extend(unmasked(true, TEXT, format!("message {i}").as_bytes()));
    }
    let mut dec = ClientDecoder::new_client(100);
    let mut n = 0;
    let input = bytes.clone();
    dec.feed(&mut bytes, |e| {
        assert_eq!(Ev::from(e), Ev::Text(format!("message {n}")));
        n += 1;
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(n, 500);
    // Nothing straddles, so nothing was copied, and the input is left as it was.
    assert_eq!(dec.heap_capacity(), 0);
    assert_eq!(bytes, input);
}

fn client_protocol(bytes: &[u8], why: &str) {
    match client_decode(1000, bytes) {
        Err(DecodeError::Protocol(_)) => {}
        other => panic!("{why}: expected a protocol error, got {other:?}"),
    }
}

#[test]
fn masked_server_frame_is_refused_from_its_first_two_bytes() {
    let frame = raw_frame(FIN | TEXT, &[b'a'; 300], Some(MASK), None);
    let mut dec = ClientDecoder::new_client(1000);
    let mut two = frame[..2].to_vec();
    assert_eq!(
        dec.feed(&mut two, |_| ControlFlow::Continue(())),
        Err(DecodeError::Protocol("server frame masked"))
    );
    assert_eq!(
        client_decode(1000, &raw_frame(FIN | PING, b"", Some(MASK), None)),
        Err(DecodeError::Protocol("server frame masked"))
    );
    assert_eq!(
        DecodeError::Protocol("server frame masked").close_code(),
        1002
    );
}

#[test]
fn client_role_keeps_the_other_rules() {
    client_protocol(&raw_frame(FIN | 0x40 | TEXT, b"hi", None, None), "rsv1");
    client_protocol(&raw_frame(FIN | 0x3, b"x", None, None), "opcode 3");
    client_protocol(&raw_frame(FIN | 0xB, b"x", None, None), "opcode 11");
    client_protocol(&unmasked(false, PING, b"x"), "fragmented ping");
    client_protocol(&unmasked(true, PONG, &[0; 126]), "long pong");
    client_protocol(&unmasked(true, CONT, b"x"), "continuation first");
    let mut two_messages = unmasked(false, BINARY, b"a");
    two_messages.extend(unmasked(true, TEXT, b"b"));
    client_protocol(&two_messages, "new message inside a fragmented one");
    client_protocol(&unmasked(true, CLOSE, &[3]), "one-byte close");
    client_protocol(
        &unmasked(true, CLOSE, &close_payload(1005, "")),
        "close 1005",
    );
    let mut top_bit = vec![FIN | BINARY, 127];
    top_bit.extend_from_slice(&(1u64 << 63).to_be_bytes());
    client_protocol(&top_bit, "64-bit length with the top bit");
    assert_eq!(
        client_decode(100, &unmasked(true, TEXT, &[b'a', 0xff])),
        Err(DecodeError::BadUtf8)
    );
    assert_eq!(
        client_decode(100, &unmasked(true, CLOSE, &[0x03, 0xe8, 0xff])),
        Err(DecodeError::BadUtf8)
    );
}

#[test]
fn too_big_is_refused_from_the_header_alone() {
    for (op, len) in [(TEXT, 101), (BINARY, 70_000)] {
        let frame = unmasked(true, op, &vec![b'a'; len]);
        let mut dec = ClientDecoder::new_client(100);
        let mut header = frame[..header_len(frame[1])].to_vec();
        assert_eq!(
            dec.feed(&mut header, |_| ControlFlow::Continue(())),
            Err(DecodeError::TooBig { limit: 100 })
        );
        assert_eq!(dec.heap_capacity(), 0);
    }
    let mut bytes = unmasked(false, BINARY, &[1; 60]);
    bytes.extend(unmasked(true, CONT, &[2; 41]));
    assert_eq!(
        client_decode(100, &bytes),
        Err(DecodeError::TooBig { limit: 100 })
    );
}

// ---- writers --------------------------------------------------------------------------

const KEY: [u8; 4] = [0x9c, 0x01, 0x5e, 0xf3];

/// Parses one masked frame with tungstenite: (header, payload unmasked).
fn tung_parse_masked(bytes: &[u8]) -> (tung::FrameHeader, Vec<u8>) {
    let mut cursor = std::io::Cursor::new(bytes);
    let (header, len) = tung::FrameHeader::parse(&mut cursor)
        .expect("tungstenite rejects our frame")
        .expect("tungstenite wants more bytes");
    let start = cursor.position() as usize;
    assert_eq!(start, header_size(len as usize) + 4);
    assert!(start <= MAX_CLIENT_HEADER);
    assert_eq!(bytes.len(), start + len as usize);
    let key = header.mask.expect("the frame is not masked");
    let payload = bytes[start..]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ key[i % 4])
        .collect();
    (header, payload)
}

#[test]
fn client_frames_are_masked_in_every_length_form_and_parse_with_tungstenite() {
    for len in [0, 1, 125, 126, 0xFFFF, 0x1_0000, 70_000] {
        let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        let mut out = vec![0xEE];
        write_frame(&mut out, true, OpCode::Text, &payload, Some(KEY));
        let frame = &out[1..];
        let (h, p) = tung_parse_masked(frame);
        assert!(h.is_final && !h.rsv1 && !h.rsv2 && !h.rsv3);
        assert_eq!(h.opcode, tung::OpCode::Data(tung::Data::Text));
        assert_eq!(h.mask, Some(KEY));
        assert_eq!(p, payload, "len {len}");
        // The payload on the wire is not the plain text.
        assert!(len < 4 || !frame.ends_with(&payload), "len {len}");
    }
}

#[test]
fn fragments_and_control_rules_when_writing() {
    let mut out = Vec::new();
    write_frame(&mut out, false, OpCode::Binary, b"ab", Some(KEY));
    write_frame(&mut out, false, OpCode::Continuation, b"", Some(KEY));
    write_frame(&mut out, true, OpCode::Continuation, b"c", Some(KEY));
    assert_eq!(&out[..2], &[0x02, 0x80 | 2]);
    assert_eq!(&out[8..10], &[0x00, 0x80]);
    assert_eq!(&out[14..16], &[0x80, 0x80 | 1]);
    assert_eq!(
        feed_chunks(&mut Decoder::new(100), [&out[..]]),
        Ok(vec![Ev::Binary(3)])
    );
    // A control frame is never fragmented and never longer than 125 bytes.
    let mut out = Vec::new();
    write_frame(&mut out, false, OpCode::Ping, &[5; 300], Some(KEY));
    let (h, p) = tung_parse_masked(&out);
    assert!(h.is_final);
    assert_eq!(h.opcode, tung::OpCode::Control(tung::Control::Ping));
    assert_eq!(p, vec![5; 125]);
    let mut out = Vec::new();
    write_frame(&mut out, false, OpCode::Pong, &[6; 300], None);
    assert_eq!(out, control_frame(OpCode::Pong, &[6; 125]));
}

#[test]
fn client_close_is_masked_and_truncated_like_the_servers() {
    let reason = format!("{}€tail", "a".repeat(122));
    let mut out = Vec::new();
    write_close(&mut out, 1001, &reason, Some(KEY));
    let (h, p) = tung_parse_masked(&out);
    assert_eq!(h.opcode, tung::OpCode::Control(tung::Control::Close));
    assert_eq!(p[..2], 1001u16.to_be_bytes());
    assert_eq!(&p[2..], "a".repeat(122).as_bytes());
    let mut unmasked_close = Vec::new();
    write_close(&mut unmasked_close, 1001, &reason, None);
    assert_eq!(unmasked_close, close_frame(1001, &reason));
    assert_eq!(
        feed_chunks(&mut Decoder::new(10), [&out[..]]),
        Ok(vec![Ev::Close(Some(1001), "a".repeat(122))])
    );
}

// ---- tungstenite as the server --------------------------------------------------------

/// A frame encoded by tungstenite as its server does (unmasked).
fn tung_server_bytes(frame: tung::Frame) -> Vec<u8> {
    let mut out = Vec::new();
    frame.format(&mut out).unwrap();
    out
}

#[test]
fn decodes_tungstenite_server_frames() {
    let long = "ü".repeat(40_000);
    let data = |bytes: &[u8], op, fin| {
        tung_server_bytes(tung::Frame::message(
            bytes.to_vec(),
            tung::OpCode::Data(op),
            fin,
        ))
    };
    let mut bytes = data(b"hello", tung::Data::Text, true);
    bytes.extend(data(&long.as_bytes()[..1001], tung::Data::Text, false));
    bytes.extend(tung_server_bytes(tung::Frame::ping(b"tick".to_vec())));
    bytes.extend(data(&long.as_bytes()[1001..], tung::Data::Continue, true));
    bytes.extend(data(&[3; 200], tung::Data::Binary, true));
    bytes.extend(tung_server_bytes(tung::Frame::close(Some(
        tung::CloseFrame {
            code: tung::CloseCode::Again,
            reason: "busy".into(),
        },
    ))));
    let want = vec![
        text("hello"),
        Ev::Ping(b"tick".to_vec()),
        Ev::Text(long),
        Ev::Bytes(vec![3; 200]),
        Ev::Close(Some(1013), "busy".into()),
    ];
    assert_eq!(client_decode(1 << 20, &bytes), Ok(want.clone()));
    let mut dec = ClientDecoder::new_client(1 << 20);
    assert_eq!(feed_chunks(&mut dec, bytes.chunks(777)), Ok(want));
    assert!(dec.is_idle());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn prop_tungstenite_server_frames_decode(
        text in arb_text(),
        cuts in prop::collection::vec(any::<Index>(), 0..4),
        ping in prop::option::of(prop::collection::vec(any::<u8>(), 0..=125)),
        read_cuts in prop::collection::vec(any::<Index>(), 0..10),
    ) {
        let (bytes, want) = tung_fragmented(&text, &cuts, ping.as_ref(), tung_server_bytes);
        let mut dec = ClientDecoder::new_client(1 << 16);
        prop_assert_eq!(feed_chunks(&mut dec, chunks_at(&bytes, &read_cuts)), Ok(want));
        prop_assert!(dec.is_idle());
    }
}

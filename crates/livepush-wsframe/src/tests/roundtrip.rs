//! The two roles against each other: whatever one writes, the other decodes exactly, for
//! payloads on both sides of the 7/16/64-bit length steps, fragmented messages with control
//! frames between the fragments, and reads cut at arbitrary points.

use super::*;

/// Payload lengths around the steps of the length encoding: 125 | 126 (7 to 16 bits) and
/// 65,535 | 65,536 (16 to 64 bits).
fn arb_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..=130,
        2 => 131usize..=1_000,
        1 => 0xFFF8usize..=0x1_0008,
        1 => 0x1_0009usize..=90_000,
    ]
}

/// `len` bytes of a message: text with characters of every UTF-8 width, or binary.
fn payload(binary: bool, len: usize, seed: u8) -> Vec<u8> {
    if binary {
        return (0..len)
            .map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(seed))
            .collect();
    }
    let chars = ['a', 'é', '€', '𝄞', 'z'];
    let mut s = String::with_capacity(len);
    let mut k = usize::from(seed);
    while s.len() + 4 <= len {
        s.push(chars[k % chars.len()]);
        k = k.wrapping_mul(7).wrapping_add(3);
    }
    s.extend(std::iter::repeat_n('.', len - s.len()));
    s.into_bytes()
}

/// A message of any length, fragmented at `cuts` (possibly inside a character: only the
/// whole message must be UTF-8), with control frames between fragments; or a control frame.
fn arb_sized_item() -> impl Strategy<Value = Item> {
    let message = (
        any::<bool>(),
        arb_len(),
        any::<u8>(),
        prop::collection::vec(any::<Index>(), 0..4),
        prop::collection::vec(prop::option::of(arb_control()), 0..4),
    )
        .prop_map(|(binary, len, seed, cuts, between)| Item::Message {
            binary,
            data: payload(binary, len, seed),
            cuts,
            between,
        });
    prop_oneof![4 => message, 1 => arb_control().prop_map(Item::Control)]
}

/// Writes `items` (and a close) with this crate's writers, masked with `keys` in turn (a
/// client) or unmasked if there are none (a server); the events the other role's decoder
/// must emit, binary messages as bytes if `keeps_binary` else as lengths.
fn write_items(
    items: &[Item],
    close: Option<&(u16, String)>,
    keys: &[[u8; 4]],
    keeps_binary: bool,
) -> (Vec<u8>, Vec<Ev>) {
    let mut keys = keys.iter().copied().cycle();
    let mut mask = move || keys.next();
    let mut out = Vec::new();
    let mut events = Vec::new();
    for item in items {
        match item {
            Item::Control(c) => control(&mut out, &mut events, c, mask()),
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
                for (k, &end) in points.iter().enumerate() {
                    let op = match (k, binary) {
                        (0, false) => OpCode::Text,
                        (0, true) => OpCode::Binary,
                        _ => OpCode::Continuation,
                    };
                    let fin = k == points.len() - 1;
                    write_frame(&mut out, fin, op, &data[start..end], mask());
                    start = end;
                    if !fin && let Some(Some(c)) = between.get(k) {
                        control(&mut out, &mut events, c, mask());
                    }
                }
                events.push(match (binary, keeps_binary) {
                    (false, _) => Ev::Text(String::from_utf8(data.clone()).unwrap()),
                    (true, true) => Ev::Bytes(data.clone()),
                    (true, false) => Ev::Binary(data.len()),
                });
            }
        }
    }
    if let Some((code, reason)) = close {
        write_close(&mut out, *code, reason, mask());
        events.push(Ev::Close(Some(*code), reason.clone()));
    }
    (out, events)
}

fn control(out: &mut Vec<u8>, events: &mut Vec<Ev>, c: &Control, key: Option<[u8; 4]>) {
    match c {
        Control::Ping(p) => {
            write_frame(out, true, OpCode::Ping, p, key);
            events.push(Ev::Ping(p.clone()));
        }
        Control::Pong(p) => {
            write_frame(out, true, OpCode::Pong, p, key);
            events.push(Ev::Pong);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn prop_client_writes_server_decodes_exactly(
        items in prop::collection::vec(arb_sized_item(), 0..6),
        keys in prop::collection::vec(any::<[u8; 4]>(), 1..6),
        close in arb_close(),
        cuts in prop::collection::vec(any::<Index>(), 0..20),
    ) {
        let (bytes, want) = write_items(&items, close.as_ref(), &keys, false);
        let mut dec = Decoder::new(1 << 20);
        prop_assert_eq!(feed_chunks(&mut dec, chunks_at(&bytes, &cuts)), Ok(want));
        prop_assert!(dec.is_idle());
        prop_assert_eq!(dec.heap_capacity(), 0);
    }

    #[test]
    fn prop_server_writes_client_decodes_exactly(
        items in prop::collection::vec(arb_sized_item(), 0..6),
        close in arb_close(),
        cuts in prop::collection::vec(any::<Index>(), 0..20),
    ) {
        let (bytes, want) = write_items(&items, close.as_ref(), &[], true);
        let mut dec = ClientDecoder::new_client(1 << 20);
        prop_assert_eq!(feed_chunks(&mut dec, chunks_at(&bytes, &cuts)), Ok(want));
        prop_assert!(dec.is_idle());
        prop_assert_eq!(dec.heap_capacity(), 0);
    }

    #[test]
    fn prop_client_garbage_never_panics_or_overallocates(
        max in 0usize..400,
        input in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..600),
            (
                prop::collection::vec(arb_item(), 1..5),
                prop::collection::vec((any::<Index>(), any::<u8>()), 0..4),
            ).prop_map(|(items, flips)| corrupt(write_items(&items, None, &[], true).0, &flips)),
        ],
        cuts in prop::collection::vec(any::<Index>(), 0..20),
    ) {
        check_garbage(ClientDecoder::new_client(max), max, &input, &cuts)?;
    }
}

//! Batching: several frames travel in one WebSocket text frame (or SSE event), one JSON object
//! per line. Writing a burst as one batch is what turns N write syscalls into one.

use bytes::{BufMut, Bytes, BytesMut};

/// The frames of one batch: the non-blank lines of `text`, in order.
pub fn split_frames(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty())
}

/// Join encoded frames into one batch, newline-separated. One frame is returned as is.
pub fn join_frames(frames: &[Bytes]) -> Bytes {
    match frames {
        [] => Bytes::new(),
        [one] => one.clone(),
        many => {
            let len = many.iter().map(|f| f.len() + 1).sum::<usize>() - 1;
            let mut out = BytesMut::with_capacity(len);
            for (i, f) in many.iter().enumerate() {
                if i > 0 {
                    out.put_u8(b'\n');
                }
                out.put_slice(f);
            }
            out.freeze()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn blank_lines_and_crlf_are_ignored() {
        let v: Vec<_> = split_frames("{\"op\":\"ping\"}\r\n\n  \n{\"op\":\"ping\"}").collect();
        assert_eq!(v, vec!["{\"op\":\"ping\"}", "{\"op\":\"ping\"}"]);
    }

    proptest! {
        // Encoded frames never contain a raw newline (JSON escapes it), so join then split
        // gives back exactly the frames.
        #[test]
        fn join_split_round_trip(texts in proptest::collection::vec(".{1,40}", 0..20)) {
            let frames: Vec<Bytes> = texts
                .iter()
                .map(|t| Bytes::from(serde_json::to_string(t).unwrap()))
                .collect();
            let joined = join_frames(&frames);
            let text = std::str::from_utf8(&joined).unwrap();
            let back: Vec<&str> = split_frames(text).collect();
            let expected: Vec<&str> = frames.iter().map(|f| std::str::from_utf8(f).unwrap()).collect();
            prop_assert_eq!(back, expected);
        }
    }
}

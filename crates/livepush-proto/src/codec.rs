//! Batching: several frames travel in one WebSocket text frame (or SSE event), one JSON object
//! per line. Writing a burst as one batch is what turns N write syscalls into one. The server
//! writes batches (`livepush_server::frame::join_into`); clients read them with
//! [`split_frames`].

/// The frames of one batch: the non-blank lines of `text`, in order.
pub fn split_frames(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty())
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
        // Encoded frames never contain a raw newline (JSON escapes it), so frames joined by
        // newlines split back into exactly the frames.
        #[test]
        fn join_split_round_trip(texts in proptest::collection::vec(".{1,40}", 0..20)) {
            let frames: Vec<String> = texts
                .iter()
                .map(|t| serde_json::to_string(t).unwrap())
                .collect();
            let joined = frames.join("\n");
            let back: Vec<&str> = split_frames(&joined).collect();
            prop_assert_eq!(back, frames.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}

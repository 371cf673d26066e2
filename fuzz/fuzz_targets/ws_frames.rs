//! The WebSocket frame decoder (server role) on arbitrary bytes, cut into arbitrary reads:
//! it never panics, and whatever it yields is well-formed (text is UTF-8 by type; a close
//! code, when present, is one a peer may send).
#![no_main]

use std::ops::ControlFlow;

use libfuzzer_sys::fuzz_target;
use livepush_wsframe::{Decoder, Event};

fuzz_target!(|data: &[u8]| {
    // First byte: where the reads are cut (every `cut`th byte ends a read).
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut % 64) + 1;
    let mut input = bytes.to_vec();
    let mut decoder = Decoder::new(1 << 16);
    for chunk in input.chunks_mut(cut) {
        let fed = decoder.feed(chunk, |e| {
            if let Event::Close { code: Some(c), .. } = e {
                assert!(c >= 1000, "close code {c}");
            }
            ControlFlow::Continue(())
        });
        if let Err(e) = fed {
            let _ = e.close_code();
            assert!(decoder.is_idle(), "a failed decoder holds nothing");
            break;
        }
    }
});

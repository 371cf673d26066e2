//! Client frames (WebSocket text, long-poll ops): a batch is split into lines and each line
//! parsed; every refusal is a `bad_frame`, and what parses encodes back to an equal frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livepush_proto::{ClientEnvelope, ErrorCode, split_frames};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in split_frames(text) {
        match ClientEnvelope::parse_limited(line, 8) {
            Ok(env) => {
                let again = ClientEnvelope::parse_limited(&env.to_json(), 8)
                    .expect("an encoded frame parses");
                assert_eq!(again, env);
            }
            Err(e) => assert_eq!(e.code, ErrorCode::BadFrame),
        }
    }
});

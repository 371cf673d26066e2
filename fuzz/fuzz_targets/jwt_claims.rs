//! Terminal tokens: arbitrary text as a token, and arbitrary bytes as the claims of a token
//! correctly signed with the server's secret (so the claims, not the signature, are what is
//! tested). Never a panic; an accepted token always names a valid terminal id.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use livepush_server::auth::{TokenKeys, valid_terminal_id};
use sha2::Sha256;

const SECRET: &str = "fuzz-token-secret-0123456789";

fn signed(claims: &[u8]) -> String {
    let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims);
    let input = format!("{head}.{body}");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key length");
    mac.update(input.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{input}.{sig}")
}

fuzz_target!(|data: &[u8]| {
    let keys = TokenKeys::new(SECRET);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = keys.verify(text);
    }
    if let Ok(t) = keys.verify(&signed(data)) {
        assert!(valid_terminal_id(&t.id), "{:?}", t.id);
    }
});

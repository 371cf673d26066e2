//! UDP keepalive datagrams (server side) and wake datagrams (terminal side): parsing never
//! panics, and a keepalive that verifies re-encodes to one that verifies too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livepush_proto::wake::{Keepalive, Wake, WakeKey};

fuzz_target!(|data: &[u8]| {
    let key = WakeKey::from_bytes(b"fuzz-wake-key-0123456789abcdef!!".to_vec());
    if let Ok(ka) = Keepalive::parse(data) {
        if ka.verify(&key, ka.ts, 0).is_ok() {
            let again = Keepalive::parse(&Keepalive::encode(&ka.terminal, ka.ts, &key, 256))
                .expect("an encoded keepalive parses");
            assert_eq!(again.verify(&key, ka.ts, 0), Ok(()));
        }
    }
    let _ = Wake::verify(data, &key);
});

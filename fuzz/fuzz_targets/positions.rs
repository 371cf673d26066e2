//! SSE positions (`since=` and `Last-Event-ID`): parsing never panics, and what parses
//! prints back to a string that parses to the same positions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livepush_proto::Positions;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = Positions::parse(text) {
        let printed = p.to_string();
        assert_eq!(Positions::parse(&printed).expect("printed positions parse"), p);
    }
});

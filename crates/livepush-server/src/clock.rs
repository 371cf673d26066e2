//! Clocks: wall-clock time for what goes on the wire and into the store, and a cheap
//! monotonic clock for deadlines kept in compact per-connection state.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (message `ts`, token expiry, keepalive freshness).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

/// Milliseconds since the first call in this process, plus one (so that 0 can mean "never"):
/// a monotonic clock for the deadlines the reactor's tick checks (heartbeats, stalled writes).
/// Stored in `u64` atomics instead of `Instant`s to keep per-connection state small.
pub fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

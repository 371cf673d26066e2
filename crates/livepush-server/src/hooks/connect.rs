//! The connect hook (`--connect-hook URL`, docs/protocol.md "Connect hook"): a terminal that
//! connects without a token is admitted if the app's backend says so, from what its request
//! carries (cookies, a session header), under the id and room grants the backend gives.
//!
//! Invariants:
//! - Only a request without a token is asked about; a token goes through JWT verification
//!   alone, whatever the hook would say.
//! - Requests are signed like the send hook's ([`signature`](super::signature)), and forward
//!   only an allowlisted set of headers ([`FORWARDED_HEADERS`]).
//! - At most `concurrency` requests are in flight per node; past that, and on any failure
//!   (no answer within `timeout`, an error status, an answer that is not a valid `allow` or
//!   `reject`), the terminal is refused with `unavailable` (HTTP 503): without the backend
//!   nobody can tell who it is (fail closed, like an unverifiable token).
//! - An `allow` is checked as a token would be: a valid terminal id, well-formed room
//!   patterns, `expires_in` no longer than `max_token_ttl`.
//! - An `allow` for a request carrying credentials (`cookie` or `authorization`) is reused
//!   for requests with the same forwarded headers for at most `cache_ttl` (and never past its
//!   `expires_in`), so that long-poll, one HTTP request per poll, asks the backend once per
//!   `cache_ttl` rather than on every poll. The cache holds at most `cache_size` answers and
//!   keys them by a SHA-256 of the headers (it keeps no cookie). A `reject` is never reused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use livepush_proto::{ErrorCode, Transport};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::Backend;
use crate::auth::{Grants, Terminal, valid_terminal_id};
use crate::clock::{now_ms, now_secs};
use crate::config::ConnectHookSettings;
use crate::error::ApiError;
use crate::metrics::HookStats;

/// The request headers forwarded to the backend (when present), lowercase.
pub const FORWARDED_HEADERS: [&str; 6] = [
    "cookie",
    "authorization",
    "user-agent",
    "origin",
    "x-forwarded-for",
    "x-real-ip",
];

/// Headers that make a request's answer reusable: they say who it is.
const CREDENTIALS: [&str; 2] = ["cookie", "authorization"];

/// What livepush tells the backend about a request that connects without a token.
#[derive(Debug, Clone)]
pub struct Caller {
    transport: &'static str,
    remote: Option<SocketAddr>,
    /// The forwarded headers present, in [`FORWARDED_HEADERS`] order; repeated ones joined.
    headers: Vec<(&'static str, String)>,
}

impl Caller {
    /// The caller of a request over `transport` from `remote` with `headers`.
    pub fn of(transport: Transport, remote: Option<SocketAddr>, headers: &HeaderMap) -> Caller {
        let mut forwarded = Vec::new();
        for name in FORWARDED_HEADERS {
            let values: Vec<&str> = headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if values.is_empty() {
                continue;
            }
            let sep = if name == "cookie" { "; " } else { ", " };
            forwarded.push((name, values.join(sep)));
        }
        Caller {
            transport: match transport {
                Transport::Ws => "websocket",
                Transport::Longpoll => "longpoll",
                Transport::Sse => "sse",
            },
            remote,
            headers: forwarded,
        }
    }

    /// The cache key: a hash of the forwarded headers, if they carry credentials.
    fn key(&self) -> Option<[u8; 32]> {
        if !self.headers.iter().any(|(n, _)| CREDENTIALS.contains(n)) {
            return None;
        }
        let mut h = Sha256::new();
        for (name, value) in &self.headers {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(value.as_bytes());
            h.update([0]);
        }
        Some(h.finalize().into())
    }

    fn body(&self) -> String {
        let headers: serde_json::Map<String, serde_json::Value> = self
            .headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), json!(v)))
            .collect();
        json!({
            "transport": self.transport,
            "remote": self.remote.map(|r| r.to_string()),
            "headers": headers,
            "ts": now_ms(),
        })
        .to_string()
    }
}

/// A terminal the backend admitted.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub terminal: Terminal,
    /// When its session ends (Unix seconds), as a token's `exp` would: from `expires_in`.
    pub expires: Option<u64>,
}

/// The backend's answer: `allow` (with `terminal`, `rooms`, `send`, `expires_in`) or
/// `reject` (with `code` and `message`).
#[derive(Debug, Deserialize)]
struct Answer {
    action: String,
    terminal: Option<String>,
    #[serde(default)]
    rooms: Vec<String>,
    #[serde(default)]
    send: bool,
    expires_in: Option<u64>,
    code: Option<String>,
    message: Option<String>,
}

/// An `allow` kept for reuse.
#[derive(Debug)]
struct Cached {
    admitted: Admitted,
    until: Instant,
}

/// The connect hook of this node.
#[derive(Debug)]
pub struct ConnectHook {
    settings: ConnectHookSettings,
    backend: Backend,
    permits: Arc<Semaphore>,
    stats: HookStats,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

impl ConnectHook {
    pub fn new(settings: ConnectHookSettings, stats: HookStats) -> ConnectHook {
        ConnectHook {
            permits: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            backend: Backend::new("connect hook", &settings.url, &settings.secret),
            settings,
            stats,
            cache: Mutex::default(),
        }
    }

    /// Ask the backend who `caller` is (see the module documentation). `max_ttl`: the
    /// longest a session may last (`max_token_ttl`). A refusal is the error to answer with.
    pub async fn admit(&self, caller: &Caller, max_ttl: Duration) -> Result<Admitted, ApiError> {
        let key = caller.key();
        if let Some(hit) = key.and_then(|k| self.cached(&k)) {
            return Ok(hit);
        }
        let Ok(_permit) = self.permits.clone().try_acquire_owned() else {
            return Err(self.failed("busy", "too many connect hook requests in flight"));
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(
            self.settings.timeout,
            self.backend.ask::<Answer>(caller.body()),
        )
        .await;
        self.stats.seconds.observe(started.elapsed().as_secs_f64());
        let answer = match answer {
            Err(_) => return Err(self.failed("timeout", "the connect hook did not answer in time")),
            Ok(Err(why)) => return Err(self.failed("error", &why)),
            Ok(Ok(a)) => a,
        };
        match answer.action.as_str() {
            "allow" => {
                let admitted =
                    allowed(answer, max_ttl).map_err(|why| self.failed("bad_answer", &why))?;
                if let Some(k) = key {
                    self.keep(k, &admitted);
                }
                Ok(admitted)
            }
            "reject" => Err(rejected(answer)),
            other => Err(self.failed(
                "bad_answer",
                &format!("the connect hook answered {other:?}, not allow or reject"),
            )),
        }
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Admitted> {
        let cache = self.cache.lock();
        let hit = cache.get(key).filter(|c| c.until > Instant::now())?;
        Some(hit.admitted.clone())
    }

    /// Keep an `allow` for `cache_ttl` (less if it expires sooner). A full cache drops what
    /// has run out first, and keeps nothing new if that frees no room.
    fn keep(&self, key: [u8; 32], admitted: &Admitted) {
        let mut ttl = self.settings.cache_ttl;
        if let Some(exp) = admitted.expires {
            ttl = ttl.min(Duration::from_secs(exp.saturating_sub(now_secs())));
        }
        if ttl.is_zero() || self.settings.cache_size == 0 {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock();
        if cache.len() >= self.settings.cache_size {
            cache.retain(|_, c| c.until > now);
            if cache.len() >= self.settings.cache_size {
                return;
            }
        }
        cache.insert(
            key,
            Cached {
                admitted: admitted.clone(),
                until: now + ttl,
            },
        );
    }

    fn failed(&self, reason: &'static str, why: &str) -> ApiError {
        self.stats.failure(reason);
        tracing::debug!(reason, why, "connect hook failure");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            format!("{why}; cannot admit a terminal without a token now, retry later"),
        )
    }
}

/// Check an `allow` as a token's claims are checked.
fn allowed(answer: Answer, max_ttl: Duration) -> Result<Admitted, String> {
    let id = answer
        .terminal
        .filter(|t| valid_terminal_id(t))
        .ok_or("the connect hook's `terminal` is missing or not a terminal id")?;
    if let Some(bad) = answer.rooms.iter().find(|p| !valid_pattern(p)) {
        return Err(format!(
            "the connect hook's room pattern {:?} is not a room or a prefix ending in `*`",
            bad.chars().take(40).collect::<String>()
        ));
    }
    let expires = match answer.expires_in {
        Some(0) => return Err("the connect hook's `expires_in` is 0".to_owned()),
        Some(s) if s > max_ttl.as_secs() => {
            return Err(format!(
                "the connect hook's `expires_in` is more than max_token_ttl ({} s)",
                max_ttl.as_secs()
            ));
        }
        Some(s) => Some(now_secs() + s),
        None => None,
    };
    Ok(Admitted {
        terminal: Terminal {
            id: Arc::from(id),
            grants: Grants::new(answer.rooms, answer.send),
        },
        expires,
    })
}

/// A room id, or a prefix of one followed by `*` (`*` alone: every room).
fn valid_pattern(p: &str) -> bool {
    match p.strip_suffix('*') {
        Some("") => true,
        Some(prefix) => livepush_proto::validate_room(prefix).is_ok(),
        None => livepush_proto::validate_room(p).is_ok(),
    }
}

/// A `reject`: its code if the contract has it and it refuses a connection (`unauthorized`,
/// `forbidden`, `rate_limited`, `unavailable`), `unauthorized` otherwise; with the backend's
/// message.
fn rejected(answer: Answer) -> ApiError {
    let code = answer
        .code
        .and_then(|c| serde_json::from_value::<ErrorCode>(json!(c)).ok());
    let (status, code) = match code {
        Some(ErrorCode::Forbidden) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
        Some(ErrorCode::RateLimited) => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited),
        Some(ErrorCode::Unavailable) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
        _ => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
    };
    let message = answer
        .message
        .unwrap_or_else(|| "refused by the connect hook".to_owned());
    ApiError::new(status, code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_patterns_are_rooms_or_prefixes() {
        for ok in ["*", "live:*", "lobby", "a.b-c_d:1"] {
            assert!(valid_pattern(ok), "{ok}");
        }
        for bad in ["", "**", "a*b", "a b", "live:*x", "é"] {
            assert!(!valid_pattern(bad), "{bad}");
        }
    }

    #[test]
    fn only_requests_with_credentials_are_cached_and_by_all_their_headers() {
        let mut h = HeaderMap::new();
        h.insert("user-agent", "ua".parse().unwrap());
        let anon = Caller::of(Transport::Longpoll, None, &h);
        assert!(anon.key().is_none(), "no credentials: never reused");
        h.insert("cookie", "s=1".parse().unwrap());
        let a = Caller::of(Transport::Longpoll, None, &h).key().unwrap();
        h.insert("cookie", "s=2".parse().unwrap());
        let b = Caller::of(Transport::Sse, None, &h).key().unwrap();
        assert_ne!(a, b);
        h.insert("x-other", "ignored".parse().unwrap());
        assert_eq!(Caller::of(Transport::Ws, None, &h).key().unwrap(), b);
    }
}

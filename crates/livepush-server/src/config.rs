//! Server settings. Every limit the server enforces is a named field here, documented with its
//! default; the `livepush serve` flags map onto these one to one (see `docs/protocol.md` §15
//! and `livepush serve --help`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use livepush_proto::Class;

/// Longest merge window accepted (`Limits::merge_window`).
pub const MAX_MERGE_WINDOW: Duration = Duration::from_secs(1);

/// Shortest API key accepted (bytes), as for the token secret: a short key can be guessed.
pub const MIN_API_KEY_LEN: usize = 16;

/// Highest `Limits::max_json_depth` accepted. serde_json (and so the Rust SDK, and any client
/// built on it) refuses documents nested deeper than 128 levels, and a `data` value reaches a
/// client inside up to 3 levels of frame (`pulled.messages[i].data`): 100 leaves room.
pub const MAX_JSON_DEPTH: usize = 100;

/// Everything `livepush serve` can be told.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address of the HTTP/WebSocket listener. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Bearer key for the HTTP API. `None` is only accepted in dev mode, where the API is open.
    pub api_key: Option<String>,
    /// HS256 secret that terminal tokens are signed with.
    pub token_secret: String,
    /// Accept terminals without a token (random terminal id, every room, may send). Only on a
    /// loopback listen address.
    pub dev: bool,
    /// Interval of the server's WebSocket pings; also told to clients in `connected`.
    pub heartbeat: Duration,
    /// How long after a ping without any traffic from the peer the connection is closed.
    /// Defaults to one more heartbeat interval.
    pub heartbeat_timeout: Duration,
    /// Reliable messages kept per room.
    pub history_size: usize,
    /// Age after which a reliable message leaves the history.
    pub history_ttl: Duration,
    /// Delivery class of each message type; unknown types are reliable.
    pub classes: ClassMap,
    /// WebSocket interruptions (ends without a close frame) tolerated within `flap_window`;
    /// one more moves the terminal to long-polling.
    pub flap_threshold: u32,
    /// Sliding window in which interruptions are counted.
    pub flap_window: Duration,
    /// How long a flapping terminal is kept on long-polling (`retry_ws_after_ms`).
    pub flap_longpoll_for: Duration,
    /// How long a long-poll terminal counts as online after its last poll ended. Default:
    /// twice `poll_max_wait`.
    pub poll_grace: Duration,
    /// How long an offline terminal stays on the service list.
    pub terminal_retention: Duration,
    /// How long a room with no member on this node stays open here (its history cache kept,
    /// and on several nodes its channel subscribed) before it is closed.
    pub room_idle: Duration,
    /// Single node: most rooms kept in memory (idle ones leave after `room_idle` anyway; past
    /// this many, the least recently used idle for 10 s leave too). A room that left is loaded
    /// from the store again on its next use, so clients notice nothing.
    pub max_rooms: usize,
    /// Single node: stored rooms not in memory looked at per upkeep tick, to forget those with
    /// nothing retained (see "Rooms leaving the store" in [`crate::engine::local`]); 0: none.
    pub store_sweep_rooms: usize,
    /// The send hook (`--send-hook`): terminal sends go to the backend first (see
    /// [`crate::hooks`]). `None`: sends go out as they are.
    pub send_hook: Option<SendHookSettings>,
    /// The connect hook (`--connect-hook`): a terminal without a token is admitted if the
    /// backend says so (see [`crate::hooks::connect::ConnectHook`]). `None`: a token is required
    /// (outside `dev`).
    pub connect_hook: Option<ConnectHookSettings>,
    /// The process's log filter, when whoever installed the logger lets it change
    /// (`PUT /v1/admin/log-level`). `None`: the endpoint answers 404.
    pub log_level: Option<Arc<dyn LogLevelControl>>,
    /// Where the UDP wake listener binds.
    pub wake_listen: WakeListen,
    /// How far a keepalive's `ts` may be from the server's clock.
    pub wake_max_skew: Duration,
    /// Wake datagrams repeated per episode after the first one.
    pub wake_retries: u32,
    /// Delay before the first repeat; it doubles up to `wake_retry_max`.
    pub wake_retry_first: Duration,
    pub wake_retry_max: Duration,
    /// Wake datagrams per minute per terminal, and their burst.
    pub wake_rate_per_minute: u32,
    pub wake_burst: u32,
    /// How long a graceful shutdown may take in all. Terminals are told to reconnect and
    /// requests in flight may finish until a quarter of it (at most 2 s) is left; then
    /// whatever is still open is dropped, and the rest is the store's flush.
    pub shutdown_timeout: Duration,
    /// Unacknowledged inbox messages kept per terminal.
    pub inbox_size: usize,
    /// Age after which an unacknowledged inbox message is dropped.
    pub inbox_ttl: Duration,
    /// Serve `https://` and `wss://` with this certificate and key (PEM), reloaded by
    /// [`crate::Running::reload_tls`]. `None`: plain HTTP.
    pub tls: Option<crate::tls::TlsFiles>,
    pub limits: Limits,
}

/// Where the UDP wake listener binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeListen {
    /// The HTTP listener's address and port, on UDP (the contract's default).
    SameAsHttp,
    Addr(SocketAddr),
    /// No wake-up over UDP.
    Off,
}

impl std::str::FromStr for WakeListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "same" => Ok(WakeListen::SameAsHttp),
            "off" => Ok(WakeListen::Off),
            addr => addr
                .parse()
                .map(WakeListen::Addr)
                .map_err(|_| format!("expected ADDR:PORT, `same` or `off`, got {addr:?}")),
        }
    }
}

/// The limits a terminal or the API can run into. Each is answered with a clear error.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest WebSocket message a client may send (bytes). Larger: `too_large`; more than four
    /// times larger: the connection is closed (code 1009) since it cannot be read.
    pub max_frame_bytes: usize,
    /// Largest HTTP request body for publish (bytes). Larger: 413 `too_large`.
    pub max_publish_bytes: usize,
    /// Largest batch publish request body (`POST /v1/publish`, bytes). Larger: 413
    /// `too_large` for the whole request.
    pub max_batch_bytes: usize,
    /// Most messages in one batch publish. More: 413 `too_large` for the whole request.
    pub max_batch_messages: usize,
    /// Largest `data` of a terminal `send` (bytes, as JSON). Larger: `too_large`.
    pub max_send_bytes: usize,
    /// Terminal `send`s allowed per second per terminal (token bucket refill).
    pub send_rate: u32,
    /// Burst of terminal `send`s allowed at once per terminal.
    pub send_burst: u32,
    /// Rooms a terminal may open on this node per second (token bucket refill): a join or
    /// pull of a room not open here brings it into memory (with `--redis`, a subscription).
    /// Beyond: `rate_limited`. Rooms already open cost nothing and are not counted.
    pub room_open_rate: u32,
    /// Burst of rooms a terminal may open at once (a client resuming many rooms).
    pub room_open_burst: u32,
    /// Client frames per second allowed per connection (any op); beyond: `rate_limited`.
    pub frame_rate: u32,
    /// Burst of client frames allowed per connection.
    pub frame_burst: u32,
    /// Frames a connection's outgoing queue holds, and frames a room keeps for members that
    /// are behind, before transient messages are dropped and reliable ones are replaced by a
    /// `prompt` (the soft limit).
    pub outbox_frames: usize,
    /// Bytes a connection may have waiting in all (its queue, and what its rooms delivered
    /// that it has not read while its socket is backed up); past it the connection is
    /// closed with reason `slow_consumer` (the hard limit) and the client resumes. A room
    /// keeps no more than this of what its members have not read.
    pub outbox_max_bytes: usize,
    /// Bytes written to a connection in one batch (one WebSocket frame) at most.
    pub write_batch_bytes: usize,
    /// A write that does not complete in this time closes the connection (`slow_consumer`).
    pub write_timeout: Duration,
    /// A room's merge window. Zero (the default): every message a room delivers is queued to
    /// each member at once. Otherwise the messages a room delivers within this window are
    /// joined (frames separated by `\n`, at most `write_batch_bytes` per chunk) and queued to
    /// each member as one shared chunk: one outbox push per member per window instead of one
    /// per message, for very busy rooms. Trades up to this much added latency for fewer
    /// pushes and writes. At most one second.
    pub merge_window: Duration,
    /// Largest `limit` of a `pull` and of the history API; callers page with `since`.
    pub max_pull: u32,
    /// Rooms one connection may be joined to at once.
    pub max_rooms_per_connection: usize,
    /// Time a new WebSocket has to send its `connect` frame.
    pub connect_timeout: Duration,
    /// Time a client has to send a whole HTTP request head (request line and headers), on a
    /// new connection or between keep-alive requests: a client trickling headers cannot
    /// hold a connection forever.
    pub header_timeout: Duration,
    /// Interval of the online-count broadcast (the contract allows at most one per second).
    pub online_interval: Duration,
    /// Longest a long-poll request is parked (its `wait_ms` is capped to this).
    pub poll_max_wait: Duration,
    /// Largest long-poll request body (bytes).
    pub max_poll_bytes: usize,
    /// Accept queue of the HTTP listener (the kernel caps it at `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// Time a client has to send a whole request body, from the end of its head; past it
    /// the request is answered 408 and the connection closed. A body declared larger than
    /// the route's limit is answered 413 at once, without reading it.
    pub body_timeout: Duration,
    /// HTTP connections one source address may hold open at once: requests, long-polls, SSE
    /// streams and WebSocket handshakes (an open WebSocket session no longer counts; it is
    /// bounded by `max_sessions_per_terminal`). Past it a new connection is answered 429
    /// `rate_limited` and closed.
    pub max_connections_per_address: usize,
    /// Sessions one terminal may hold open at once, over any mix of transports (a
    /// WebSocket, an SSE stream, a poll in progress). Past it a WebSocket `connect` is
    /// answered `rate_limited` and closed with 4029; a poll or SSE stream gets HTTP 429.
    pub max_sessions_per_terminal: usize,
    /// Deepest nesting of arrays and objects in a message's `data` (a publish, an inbox post, a
    /// terminal `send`; `{}` is 1, a number 0). Deeper: HTTP 400 `bad_request`, or a
    /// `bad_frame` error frame. Keeps every message decodable by clients with a recursion
    /// limit (serde_json's is 128). At most [`MAX_JSON_DEPTH`].
    pub max_json_depth: usize,
    /// Longest a terminal token may still be valid: a token whose `exp` is further from now is
    /// refused (`unauthorized`), so no token lives forever whatever `exp` it was signed with.
    pub max_token_ttl: Duration,
    /// The admin page's cadence ([`crate::admin`]): how often a node sends its stats to the
    /// admin room while someone watches there, and, with several nodes, shares its stats
    /// record through the engine (a record lives [`crate::admin::RECORD_LIFETIME_INTERVALS`]
    /// intervals).
    pub admin_interval: Duration,
    /// Most rooms an admin stats snapshot lists (the busiest by online count), and the
    /// default and bound of `GET /v1/admin/stats?limit=`.
    pub admin_rooms: usize,
    /// How long a token minted by `POST /v1/admin/token` for the admin room is valid (the
    /// page mints a new one before it expires).
    pub admin_token_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 * 1024,
            max_publish_bytes: 64 * 1024,
            max_batch_bytes: 1024 * 1024,
            max_batch_messages: 1000,
            max_send_bytes: 4 * 1024,
            send_rate: 5,
            send_burst: 10,
            room_open_rate: 10,
            room_open_burst: 50,
            frame_rate: 50,
            frame_burst: 200,
            outbox_frames: 1024,
            outbox_max_bytes: 8 * 1024 * 1024,
            write_batch_bytes: 64 * 1024,
            write_timeout: Duration::from_secs(30),
            merge_window: Duration::ZERO,
            max_pull: 1000,
            max_rooms_per_connection: 64,
            connect_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            online_interval: Duration::from_secs(1),
            poll_max_wait: Duration::from_secs(30),
            max_poll_bytes: 256 * 1024,
            listen_backlog: 4096,
            body_timeout: Duration::from_secs(30),
            max_connections_per_address: 4096,
            max_sessions_per_terminal: 16,
            max_json_depth: 32,
            max_token_ttl: crate::auth::DEFAULT_MAX_TOKEN_TTL,
            admin_interval: Duration::from_secs(1),
            admin_rooms: 100,
            admin_token_ttl: Duration::from_secs(600),
        }
    }
}

/// Default of [`Config::max_rooms`] (about 60 MB of rooms at ~600 bytes each).
pub const DEFAULT_MAX_ROOMS: usize = 100_000;

impl Config {
    /// A configuration for tests and embedding: loopback on a free port, dev mode off, fixed
    /// key and secret, defaults for everything else.
    pub fn for_tests(api_key: &str, token_secret: &str) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key: Some(api_key.to_owned()),
            token_secret: token_secret.to_owned(),
            dev: false,
            heartbeat: Duration::from_secs(25),
            heartbeat_timeout: Duration::from_secs(25),
            history_size: 1000,
            history_ttl: Duration::from_secs(3600),
            classes: ClassMap::default(),
            flap_threshold: 3,
            flap_window: Duration::from_secs(60),
            flap_longpoll_for: Duration::from_secs(120),
            poll_grace: Duration::from_secs(60),
            terminal_retention: Duration::from_secs(24 * 3600),
            room_idle: Duration::from_secs(60),
            max_rooms: DEFAULT_MAX_ROOMS,
            store_sweep_rooms: crate::engine::local::DEFAULT_SWEEP_ROOMS,
            send_hook: None,
            connect_hook: None,
            log_level: None,
            wake_listen: WakeListen::SameAsHttp,
            wake_max_skew: Duration::from_secs(300),
            wake_retries: 8,
            wake_retry_first: Duration::from_secs(1),
            wake_retry_max: Duration::from_secs(60),
            wake_rate_per_minute: 20,
            wake_burst: 5,
            shutdown_timeout: Duration::from_secs(10),
            inbox_size: 100,
            inbox_ttl: Duration::from_secs(24 * 3600),
            tls: None,
            limits: Limits::default(),
        }
    }

    /// How long connections may drain at shutdown: [`Config::shutdown_timeout`] less what
    /// is kept for the store's flush (a quarter, at most 2 s).
    pub fn shutdown_drain(&self) -> Duration {
        let reserve = (self.shutdown_timeout / 4).min(Duration::from_secs(2));
        self.shutdown_timeout - reserve
    }

    /// Refuse settings that cannot work, with a message that says which one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(h) = &self.send_hook {
            check_hook(
                &h.url,
                &h.secret,
                (h.timeout, h.concurrency),
                SEND_HOOK_FLAGS,
            )?;
        }
        if let Some(h) = &self.connect_hook {
            check_hook(
                &h.url,
                &h.secret,
                (h.timeout, h.concurrency),
                CONNECT_HOOK_FLAGS,
            )?;
        }
        if self.dev && !self.listen.ip().is_loopback() {
            return Err(ConfigError::DevNotOnLoopback(self.listen));
        }
        if self.api_key.is_none() && !self.dev {
            return Err(ConfigError::NoApiKey);
        }
        if self.api_key.as_deref() == Some(self.token_secret.as_str()) {
            return Err(ConfigError::KeyIsSecret);
        }
        if self.token_secret.len() < 16 {
            return Err(ConfigError::ShortSecret);
        }
        if self
            .api_key
            .as_ref()
            .is_some_and(|k| k.len() < MIN_API_KEY_LEN)
        {
            return Err(ConfigError::ShortApiKey);
        }
        if self.limits.max_json_depth > MAX_JSON_DEPTH {
            return Err(ConfigError::JsonTooDeep);
        }
        let nonzero = [
            ("--heartbeat-ms", self.heartbeat.as_millis() as usize),
            ("--history-size", self.history_size),
            ("--max-frame-bytes", self.limits.max_frame_bytes),
            ("--outbox-frames", self.limits.outbox_frames),
            ("--max-pull", self.limits.max_pull as usize),
            ("--send-rate", self.limits.send_rate as usize),
            ("--inbox-size", self.inbox_size),
            ("--wake-rate", self.wake_rate_per_minute as usize),
            ("--frame-rate", self.limits.frame_rate as usize),
            (
                "--max-connections-per-address",
                self.limits.max_connections_per_address,
            ),
            (
                "--max-sessions-per-terminal",
                self.limits.max_sessions_per_terminal,
            ),
            ("--max-json-depth", self.limits.max_json_depth),
            (
                "--max-token-ttl",
                self.limits.max_token_ttl.as_secs() as usize,
            ),
            (
                "--admin-interval",
                self.limits.admin_interval.as_millis() as usize,
            ),
            ("--admin-rooms", self.limits.admin_rooms),
            (
                "--admin-token-ttl",
                self.limits.admin_token_ttl.as_secs() as usize,
            ),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Zero(name));
        }
        if self.limits.outbox_max_bytes < self.limits.write_batch_bytes {
            return Err(ConfigError::OutboxBelowBatch);
        }
        if self.limits.merge_window > MAX_MERGE_WINDOW {
            return Err(ConfigError::MergeTooLong);
        }
        Ok(())
    }
}

/// The timeout and concurrency flags of each hook, for error messages.
const SEND_HOOK_FLAGS: [&str; 2] = ["--send-hook-timeout", "--send-hook-concurrency"];
const CONNECT_HOOK_FLAGS: [&str; 2] = ["--connect-hook-timeout", "--connect-hook-concurrency"];

/// A hook's settings: a signing key of at least 16 bytes, an `http://` URL, a timeout and a
/// concurrency above zero (`flags` name these two).
fn check_hook(
    url: &str,
    secret: &str,
    (timeout, concurrency): (Duration, usize),
    flags: [&'static str; 2],
) -> Result<(), ConfigError> {
    if secret.len() < 16 {
        return Err(ConfigError::HookSecret);
    }
    if !url.starts_with("http://") {
        return Err(ConfigError::HookUrl(url.to_owned()));
    }
    if timeout.is_zero() {
        return Err(ConfigError::Zero(flags[0]));
    }
    if concurrency == 0 {
        return Err(ConfigError::Zero(flags[1]));
    }
    Ok(())
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--dev accepts terminals without a token and is only allowed on a loopback address, not {0}"
    )]
    DevNotOnLoopback(SocketAddr),
    #[error("an API key is required outside --dev")]
    NoApiKey,
    #[error("the API key and the token secret must differ")]
    KeyIsSecret,
    #[error("the token secret must be at least 16 bytes")]
    ShortSecret,
    #[error("the API key (--api-key) must be at least {MIN_API_KEY_LEN} bytes")]
    ShortApiKey,
    #[error(
        "--max-json-depth must be at most {MAX_JSON_DEPTH} (clients decode at most 128 levels)"
    )]
    JsonTooDeep,
    #[error("{0} must be greater than 0")]
    Zero(&'static str),
    #[error(
        "--send-hook and --connect-hook need --hook-secret of at least 16 bytes (their requests are signed)"
    )]
    HookSecret,
    #[error("a hook must be an http:// URL (the backend next to livepush), not {0:?}")]
    HookUrl(String),
    #[error("--outbox-max-bytes must be at least --write-batch-bytes")]
    OutboxBelowBatch,
    #[error(
        "--merge-ms must be at most {} (a merge window adds its length to every message's latency)",
        MAX_MERGE_WINDOW.as_millis()
    )]
    MergeTooLong,
}

/// The send hook's settings (see [`crate::hooks`]).
#[derive(Debug, Clone)]
pub struct SendHookSettings {
    /// Where a terminal's `send` is POSTed first.
    pub url: String,
    /// Key of the requests' HMAC-SHA256 signature (`X-Livepush-Signature`).
    pub secret: String,
    /// Longest the backend may take; past it the send counts as a hook failure.
    pub timeout: Duration,
    /// What a hook failure does to the send.
    pub failure: HookFailure,
    /// Hook requests in flight at once on this node; past it a send counts as a failure.
    pub concurrency: usize,
}

/// Reads and changes the log filter of the process (the binary installs the logger; the
/// library only calls this).
pub trait LogLevelControl: Send + Sync + std::fmt::Debug {
    /// The filter directive in force, e.g. `info,livepush_server=debug`.
    fn current(&self) -> String;
    /// Apply `directive`; why not, if it is not a valid filter (nothing changes then).
    fn set(&self, directive: &str) -> Result<(), String>;
}

/// The connect hook's settings (see [`crate::hooks::connect::ConnectHook`]).
#[derive(Debug, Clone)]
pub struct ConnectHookSettings {
    /// Where a connecting terminal without a token is POSTed.
    pub url: String,
    /// Key of the requests' HMAC-SHA256 signature (`X-Livepush-Signature`).
    pub secret: String,
    /// Longest the backend may take; past it the terminal is refused with `unavailable`.
    pub timeout: Duration,
    /// Hook requests in flight at once on this node; past it a terminal is refused at once
    /// with `unavailable` (503).
    pub concurrency: usize,
    /// How long an `allow` is reused for a request with the same credentials (`cookie`,
    /// `authorization`), so that polls do not each ask the backend; zero: never reused.
    pub cache_ttl: Duration,
    /// Most `allow` answers kept for reuse at once.
    pub cache_size: usize,
}

/// What a send hook failure (no answer in time, an error, an answer that is none of
/// allow, reject, rewrite) does to the send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookFailure {
    /// Refused: the sender gets `error{code:"unavailable"}` (the default).
    Closed,
    /// Sent as it was.
    Open,
}

/// A `--class` setting that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassError {
    #[error("expected TYPE=reliable|transient, got {0:?}")]
    Syntax(String),
    #[error("unknown class {0:?} (reliable|transient)")]
    UnknownClass(String),
    #[error(transparent)]
    Type(#[from] livepush_proto::InvalidId),
    #[error("type `control` is always reliable")]
    ControlIsReliable,
}

/// Which message types are reliable and which transient.
#[derive(Debug, Clone)]
pub struct ClassMap(HashMap<String, Class>);

impl Default for ClassMap {
    fn default() -> Self {
        let mut m = HashMap::new();
        for t in ["gift", "red_envelope", "quiz", "control"] {
            m.insert(t.to_owned(), Class::Reliable);
        }
        for t in ["chat", "enter", "online"] {
            m.insert(t.to_owned(), Class::Transient);
        }
        ClassMap(m)
    }
}

impl ClassMap {
    /// The class of a type: configured, or reliable for unknown types (losing a message
    /// nobody classified is the worse mistake).
    pub fn class_of(&self, ty: &str) -> Class {
        self.0.get(ty).copied().unwrap_or(Class::Reliable)
    }

    /// Set a type's class. `control` is always reliable: a lost `close` or `mute` would leave
    /// terminals in the wrong state.
    pub fn set(&mut self, ty: &str, class: Class) -> Result<(), ClassError> {
        livepush_proto::validate_type(ty)?;
        if ty == "control" && class != Class::Reliable {
            return Err(ClassError::ControlIsReliable);
        }
        self.0.insert(ty.to_owned(), class);
        Ok(())
    }

    /// Parse `TYPE=reliable|transient`, the syntax of `--class`.
    pub fn apply(&mut self, spec: &str) -> Result<(), ClassError> {
        let (ty, class) = spec
            .split_once('=')
            .ok_or_else(|| ClassError::Syntax(spec.to_owned()))?;
        let class = match class {
            "reliable" => Class::Reliable,
            "transient" => Class::Transient,
            other => return Err(ClassError::UnknownClass(other.to_owned())),
        };
        self.set(ty, class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_classes_follow_the_contract() {
        let m = ClassMap::default();
        for t in ["gift", "red_envelope", "quiz", "control", "anything_else"] {
            assert_eq!(m.class_of(t), Class::Reliable, "{t}");
        }
        for t in ["chat", "enter", "online"] {
            assert_eq!(m.class_of(t), Class::Transient, "{t}");
        }
    }

    #[test]
    fn class_overrides() {
        let mut m = ClassMap::default();
        m.apply("like=transient").unwrap();
        assert_eq!(m.class_of("like"), Class::Transient);
        assert!(m.apply("control=transient").is_err());
        assert!(m.apply("x=maybe").is_err());
        assert!(m.apply("nonsense").is_err());
    }

    #[test]
    fn a_connect_hook_needs_a_secret_an_http_url_and_nonzero_bounds() {
        let mut c = Config::for_tests("key-key-key-key-key", "secret-secret-secret");
        let hook = ConnectHookSettings {
            url: "http://127.0.0.1:9/connect".into(),
            secret: "hook-secret-0123456789".into(),
            timeout: Duration::from_secs(2),
            concurrency: 8,
            cache_ttl: Duration::ZERO,
            cache_size: 0,
        };
        c.connect_hook = Some(hook.clone());
        assert_eq!(c.validate(), Ok(()));
        type Spoil = fn(&mut ConnectHookSettings);
        let cases: [(Spoil, ConfigError); 4] = [
            (|h| h.secret = "short".into(), ConfigError::HookSecret),
            (
                |h| h.url = "https://x/".into(),
                ConfigError::HookUrl("https://x/".into()),
            ),
            (
                |h| h.timeout = Duration::ZERO,
                ConfigError::Zero("--connect-hook-timeout"),
            ),
            (
                |h| h.concurrency = 0,
                ConfigError::Zero("--connect-hook-concurrency"),
            ),
        ];
        for (spoil, want) in cases {
            let mut h = hook.clone();
            spoil(&mut h);
            c.connect_hook = Some(h);
            assert_eq!(c.validate(), Err(want));
        }
    }

    #[test]
    fn dev_only_on_loopback() {
        let mut c = Config::for_tests("key-key-key-key-key", "secret-secret-secret");
        c.dev = true;
        assert!(c.validate().is_ok());
        c.listen = "0.0.0.0:8080".parse().unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("loopback"));
    }

    #[test]
    fn short_api_keys_are_refused() {
        for key in ["", "k", "fifteen-bytes!!"] {
            let c = Config::for_tests(key, "secret-secret-secret");
            let e = c.validate().unwrap_err();
            assert_eq!(e, ConfigError::ShortApiKey, "{key:?}");
            assert!(e.to_string().contains("--api-key"), "{e}");
        }
        assert!(
            Config::for_tests("sixteen-bytes!!!", "secret-secret-secret")
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn json_depth_is_bounded_by_what_clients_decode() {
        let mut c = Config::for_tests("key-key-key-key-key", "secret-secret-secret");
        assert_eq!(c.limits.max_json_depth, 32);
        c.limits.max_json_depth = MAX_JSON_DEPTH + 1;
        assert_eq!(c.validate(), Err(ConfigError::JsonTooDeep));
        c.limits.max_json_depth = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--max-json-depth")
        );
    }

    #[test]
    fn merge_window_is_off_by_default_and_bounded() {
        let mut c = Config::for_tests("key-key-key-key-key", "secret-secret-secret");
        assert_eq!(c.limits.merge_window, Duration::ZERO);
        c.limits.merge_window = Duration::from_millis(20);
        assert!(c.validate().is_ok());
        c.limits.merge_window = MAX_MERGE_WINDOW + Duration::from_millis(1);
        assert!(c.validate().unwrap_err().to_string().contains("--merge-ms"));
    }
}

//! `livepush serve`.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use std::sync::Arc;

use livepush_server::config::{ConnectHookSettings, HookFailure, SendHookSettings};
use livepush_server::engine::Retention;
use livepush_server::engine::redis::{RedisEngine, RedisSettings};
use livepush_server::store::{DurabilityPolicy, MemoryStore, RedbStore, Store, StoreOptions};
use livepush_server::tls::TlsFiles;
use livepush_server::{ClassMap, Config, Limits, WakeListen};
use rand::Rng;
use rand::distr::Alphanumeric;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 1h)"))
}

/// Every flag is also read from `LIVEPUSH_<FLAG>` (dashes become underscores).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Read settings from this TOML file: each key is a flag without its dashes
    /// (`history-size = 500`); flags and the environment win over it. `livepush config
    /// defaults` prints a complete one, `livepush config check FILE` checks one.
    #[arg(long, env = "LIVEPUSH_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Log format on stderr: `text` (one readable line per event) or `json` (one object per
    /// line, for log collectors).
    #[arg(long, env = "LIVEPUSH_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: crate::logging::LogFormat,
    /// What to log: a tracing filter directive, e.g. `info` or
    /// `warn,livepush_server::inbox=debug`. SIGHUP re-reads it from the --config file, so it
    /// changes without a restart. [default: warn,livepush=info,livepush_client=warn]
    #[arg(long, env = "LIVEPUSH_LOG", value_parser = log_directive)]
    pub log_level: Option<String>,
    /// Address to listen on (HTTP and WebSocket). Port 0 picks a free port.
    #[arg(long, env = "LIVEPUSH_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Serve `https://` and `wss://` with this certificate chain (PEM, leaf first). Needs
    /// --tls-key. Both files are read again on SIGHUP: new connections get the new
    /// certificate, open ones keep theirs, and a bad file is logged and changes nothing.
    #[arg(long, env = "LIVEPUSH_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "LIVEPUSH_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// API key for the HTTP API (`Authorization: Bearer KEY`), at least 16 bytes. Generated
    /// and printed if absent.
    #[arg(long, env = "LIVEPUSH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Secret that terminal tokens are signed with (HS256). Generated and printed if absent.
    #[arg(long, env = "LIVEPUSH_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// Accept terminals without a token (random id, all rooms, may send) and leave the API
    /// open when no key is given. Only allowed on a loopback address.
    #[arg(long, env = "LIVEPUSH_DEV")]
    dev: bool,
    /// Directory of the embedded store (created if missing). `:memory:` keeps nothing: every
    /// restart starts with empty histories and new epochs.
    #[arg(long, env = "LIVEPUSH_DATA_DIR", default_value = "./livepush-data")]
    data_dir: String,
    /// Run as one node of several sharing this Redis (`redis://HOST:PORT/DB`): rooms,
    /// sequences, histories and inboxes live there, and any node serves any terminal. The
    /// embedded store (--data-dir) is then not used. See README "Several nodes".
    #[arg(long, env = "LIVEPUSH_REDIS")]
    redis: Option<String>,
    /// Prefix of every Redis key and channel, so that several deployments can share a Redis.
    #[arg(long, env = "LIVEPUSH_REDIS_PREFIX", default_value = "livepush")]
    redis_prefix: String,
    /// Longest any Redis call may take (also the connection timeout); a publish that cannot
    /// reach Redis in time is answered 503.
    #[arg(long, env = "LIVEPUSH_REDIS_TIMEOUT", default_value = "2s", value_parser = duration)]
    redis_timeout: Duration,
    /// When a reliable publish is answered: `sync` (own fsync each), `batch` (group commit,
    /// one fsync per few ms), `none` (at once; fsync every second). See README "Data and
    /// durability" for what each can lose.
    #[arg(long, env = "LIVEPUSH_DURABILITY", default_value = "batch")]
    durability: DurabilityPolicy,
    /// `batch`: how long the store keeps collecting writes into one commit after the first
    /// arrived. 0 commits what arrived while the previous fsync ran.
    #[arg(long, env = "LIVEPUSH_BATCH_WINDOW", default_value = "0s", value_parser = duration)]
    batch_window: Duration,
    /// Interval of WebSocket pings to terminals, in milliseconds.
    #[arg(long, env = "LIVEPUSH_HEARTBEAT_MS", default_value_t = 25_000)]
    heartbeat_ms: u64,
    /// Close a connection silent for this long after a ping (ms). Default: --heartbeat-ms.
    #[arg(long, env = "LIVEPUSH_HEARTBEAT_TIMEOUT_MS")]
    heartbeat_timeout_ms: Option<u64>,
    /// Reliable messages kept per room.
    #[arg(long, env = "LIVEPUSH_HISTORY_SIZE", default_value_t = 1000)]
    history_size: usize,
    /// Age after which reliable messages leave the history.
    #[arg(long, env = "LIVEPUSH_HISTORY_TTL", default_value = "1h", value_parser = duration)]
    history_ttl: Duration,
    /// Delivery class of a message type, TYPE=reliable|transient (repeatable; env: comma list).
    #[arg(long = "class", env = "LIVEPUSH_CLASS", value_delimiter = ',')]
    classes: Vec<String>,
    /// Largest WebSocket message a terminal may send (bytes).
    #[arg(long, env = "LIVEPUSH_MAX_FRAME_BYTES", default_value_t = Limits::default().max_frame_bytes)]
    max_frame_bytes: usize,
    /// Largest publish request body (bytes).
    #[arg(long, env = "LIVEPUSH_MAX_PUBLISH_BYTES", default_value_t = Limits::default().max_publish_bytes)]
    max_publish_bytes: usize,
    /// Largest batch publish body (`POST /v1/publish`, bytes); each message's `data` is also
    /// bounded by --max-publish-bytes.
    #[arg(long, env = "LIVEPUSH_MAX_BATCH_BYTES", default_value_t = Limits::default().max_batch_bytes)]
    max_batch_bytes: usize,
    /// Most messages in one batch publish.
    #[arg(long, env = "LIVEPUSH_MAX_BATCH_MESSAGES", default_value_t = Limits::default().max_batch_messages)]
    max_batch_messages: usize,
    /// Largest `data` of a terminal `send` (bytes).
    #[arg(long, env = "LIVEPUSH_MAX_SEND_BYTES", default_value_t = Limits::default().max_send_bytes)]
    max_send_bytes: usize,
    /// Terminal sends per second per terminal.
    #[arg(long, env = "LIVEPUSH_SEND_RATE", default_value_t = Limits::default().send_rate)]
    send_rate: u32,
    /// Burst of terminal sends per terminal.
    #[arg(long, env = "LIVEPUSH_SEND_BURST", default_value_t = Limits::default().send_burst)]
    send_burst: u32,
    /// Rooms a terminal may open per second on this node (joins or pulls of rooms not open
    /// here; rooms already open are not counted).
    #[arg(long, env = "LIVEPUSH_ROOM_OPEN_RATE", default_value_t = Limits::default().room_open_rate)]
    room_open_rate: u32,
    /// Burst of rooms a terminal may open at once.
    #[arg(long, env = "LIVEPUSH_ROOM_OPEN_BURST", default_value_t = Limits::default().room_open_burst)]
    room_open_burst: u32,
    /// Client frames per second per connection.
    #[arg(long, env = "LIVEPUSH_FRAME_RATE", default_value_t = Limits::default().frame_rate)]
    frame_rate: u32,
    /// Burst of client frames per connection.
    #[arg(long, env = "LIVEPUSH_FRAME_BURST", default_value_t = Limits::default().frame_burst)]
    frame_burst: u32,
    /// Frames a connection's queue holds, and a room keeps for members that are behind,
    /// before transient messages are dropped and reliable ones become a `prompt`.
    #[arg(long, env = "LIVEPUSH_OUTBOX_FRAMES", default_value_t = Limits::default().outbox_frames)]
    outbox_frames: usize,
    /// Bytes a connection may have waiting before it is closed as a slow consumer (also the
    /// most a room keeps for members that are behind).
    #[arg(long, env = "LIVEPUSH_OUTBOX_MAX_BYTES", default_value_t = Limits::default().outbox_max_bytes)]
    outbox_max_bytes: usize,
    /// Most bytes written to a connection in one batch.
    #[arg(long, env = "LIVEPUSH_WRITE_BATCH_BYTES", default_value_t = Limits::default().write_batch_bytes)]
    write_batch_bytes: usize,
    /// A write that takes longer closes the connection as a slow consumer.
    #[arg(long, env = "LIVEPUSH_WRITE_TIMEOUT", default_value = "30s", value_parser = duration)]
    write_timeout: Duration,
    /// Merge window of a room (ms): the messages a room delivers within it go to each member
    /// as one chunk (frames joined by newlines). Adds up to this much latency for far fewer
    /// pushes and writes in very busy rooms. 0 = off: every message goes out at once.
    #[arg(long, env = "LIVEPUSH_MERGE_MS", default_value_t = Limits::default().merge_window.as_millis() as u64)]
    merge_ms: u64,
    /// Largest `limit` of a pull or history request.
    #[arg(long, env = "LIVEPUSH_MAX_PULL", default_value_t = Limits::default().max_pull)]
    max_pull: u32,
    /// Rooms one connection may join.
    #[arg(long, env = "LIVEPUSH_MAX_ROOMS_PER_CONNECTION", default_value_t = Limits::default().max_rooms_per_connection)]
    max_rooms_per_connection: usize,
    /// Time a new WebSocket has to send `connect`.
    #[arg(long, env = "LIVEPUSH_CONNECT_TIMEOUT", default_value = "10s", value_parser = duration)]
    connect_timeout: Duration,
    /// Time a client has to send a whole HTTP request head.
    #[arg(long, env = "LIVEPUSH_HEADER_TIMEOUT", default_value = "30s", value_parser = duration)]
    header_timeout: Duration,
    /// WebSocket interruptions tolerated within --flap-window before a terminal is moved to
    /// long-polling.
    #[arg(long, env = "LIVEPUSH_FLAP_THRESHOLD", default_value_t = 3)]
    flap_threshold: u32,
    /// Sliding window in which WebSocket interruptions are counted.
    #[arg(long, env = "LIVEPUSH_FLAP_WINDOW", default_value = "60s", value_parser = duration)]
    flap_window: Duration,
    /// How long a flapping terminal stays on long-polling before it may retry WebSocket.
    #[arg(long, env = "LIVEPUSH_FLAP_RETRY_WS_AFTER", default_value = "2m", value_parser = duration)]
    flap_retry_ws_after: Duration,
    /// Longest a long-poll request is parked.
    #[arg(long, env = "LIVEPUSH_POLL_MAX_WAIT", default_value = "30s", value_parser = duration)]
    poll_max_wait: Duration,
    /// How long a long-poll terminal counts as online after its last poll. Default: twice
    /// --poll-max-wait.
    #[arg(long, env = "LIVEPUSH_POLL_GRACE", value_parser = duration)]
    poll_grace: Option<Duration>,
    /// Largest long-poll request body (bytes).
    #[arg(long, env = "LIVEPUSH_MAX_POLL_BYTES", default_value_t = Limits::default().max_poll_bytes)]
    max_poll_bytes: usize,
    /// Deepest nesting of arrays and objects in a message's `data` (publish, inbox post,
    /// terminal send): deeper is refused (HTTP 400, or a `bad_frame` error). At most 100.
    #[arg(long, env = "LIVEPUSH_MAX_JSON_DEPTH", default_value_t = Limits::default().max_json_depth)]
    max_json_depth: usize,
    /// Longest a terminal token may still be valid: a token whose `exp` is further from now
    /// is refused as unauthorized.
    #[arg(long, env = "LIVEPUSH_MAX_TOKEN_TTL", default_value = "7d", value_parser = duration)]
    max_token_ttl: Duration,
    /// The admin page's cadence: how often a node sends its stats to the admin page while one
    /// watches it, and (with --redis) shares them with the other nodes.
    #[arg(long, env = "LIVEPUSH_ADMIN_INTERVAL", default_value = "1s", value_parser = duration)]
    admin_interval: Duration,
    /// Most rooms the admin page and `GET /v1/admin/stats` list (the busiest).
    #[arg(long, env = "LIVEPUSH_ADMIN_ROOMS", default_value_t = Limits::default().admin_rooms)]
    admin_rooms: usize,
    /// How long the admin page's token for its live feed is valid (it renews it).
    #[arg(long, env = "LIVEPUSH_ADMIN_TOKEN_TTL", default_value = "10m", value_parser = duration)]
    admin_token_ttl: Duration,
    /// How long an offline terminal stays on the service list.
    #[arg(long, env = "LIVEPUSH_TERMINAL_RETENTION", default_value = "24h", value_parser = duration)]
    terminal_retention: Duration,
    /// How long a room with no member on this node stays open here (history cache kept; with
    /// --redis, its channel subscribed) before it is closed.
    #[arg(long, env = "LIVEPUSH_ROOM_IDLE", default_value = "60s", value_parser = duration)]
    room_idle: Duration,
    /// Single node: most rooms kept in memory; past it the least recently used idle ones
    /// leave (and are loaded from the store again when used).
    #[arg(long, env = "LIVEPUSH_MAX_ROOMS", default_value_t = livepush_server::config::DEFAULT_MAX_ROOMS)]
    max_rooms: usize,
    /// Single node: stored rooms not in memory looked at per second, to delete those whose
    /// history expired (and that are neither muted nor closed); 0 turns the sweep off.
    #[arg(long, env = "LIVEPUSH_STORE_SWEEP_ROOMS", default_value_t = livepush_server::engine::local::DEFAULT_SWEEP_ROOMS)]
    store_sweep_rooms: usize,
    /// UDP address of the wake listener: `same` (the HTTP address and port, on UDP), an
    /// ADDR:PORT, or `off`.
    #[arg(long, env = "LIVEPUSH_WAKE_LISTEN", default_value = "same")]
    wake_listen: WakeListen,
    /// How far a keepalive's timestamp may be from the server's clock.
    #[arg(long, env = "LIVEPUSH_WAKE_MAX_SKEW", default_value = "5m", value_parser = duration)]
    wake_max_skew: Duration,
    /// Wake datagrams repeated after the first while the terminal stays away.
    #[arg(long, env = "LIVEPUSH_WAKE_RETRIES", default_value_t = 8)]
    wake_retries: u32,
    /// Delay before the first repeat; it doubles each time up to --wake-retry-max.
    #[arg(long, env = "LIVEPUSH_WAKE_RETRY_FIRST", default_value = "1s", value_parser = duration)]
    wake_retry_first: Duration,
    /// Longest delay between two wake datagrams.
    #[arg(long, env = "LIVEPUSH_WAKE_RETRY_MAX", default_value = "60s", value_parser = duration)]
    wake_retry_max: Duration,
    /// Wake datagrams per minute per terminal.
    #[arg(long, env = "LIVEPUSH_WAKE_RATE", default_value_t = 20)]
    wake_rate: u32,
    /// Burst of wake datagrams per terminal.
    #[arg(long, env = "LIVEPUSH_WAKE_BURST", default_value_t = 5)]
    wake_burst: u32,
    /// Unacknowledged inbox messages kept per terminal (the oldest is dropped past it).
    #[arg(long, env = "LIVEPUSH_INBOX_SIZE", default_value_t = 100)]
    inbox_size: usize,
    /// Age after which an unacknowledged inbox message is dropped.
    #[arg(long, env = "LIVEPUSH_INBOX_TTL", default_value = "24h", value_parser = duration)]
    inbox_ttl: Duration,
    /// How long a graceful stop (SIGTERM, Ctrl-C) may take: terminals are told to
    /// reconnect, requests in flight may finish, then the rest is dropped and the store
    /// flushed; the process exits within this time whatever clients do.
    #[arg(long, env = "LIVEPUSH_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = duration)]
    shutdown_timeout: Duration,
    /// POST every terminal `send` to this URL first: the backend allows it, rejects it (the
    /// sender gets an error) or rewrites its data (docs/protocol.md, "Send hook").
    #[arg(long, env = "LIVEPUSH_SEND_HOOK")]
    send_hook: Option<String>,
    /// Key of the hook requests' signature (`X-Livepush-Signature: sha256=HMAC`), at least
    /// 16 bytes; required with --send-hook and --connect-hook.
    #[arg(long, env = "LIVEPUSH_HOOK_SECRET", hide_env_values = true)]
    hook_secret: Option<String>,
    /// Longest the send hook may take; past it the send counts as a hook failure.
    #[arg(long, env = "LIVEPUSH_SEND_HOOK_TIMEOUT", default_value = "2s", value_parser = duration)]
    send_hook_timeout: Duration,
    /// What a send hook failure does: `closed` refuses the send (`unavailable`), `open` sends
    /// it as it was.
    #[arg(
        long,
        env = "LIVEPUSH_SEND_HOOK_FAILURE",
        value_enum,
        default_value = "closed"
    )]
    send_hook_failure: HookFailureArg,
    /// Send hook requests in flight at once on this node; past it a send counts as a failure
    /// (a slow backend never builds a queue).
    #[arg(long, env = "LIVEPUSH_SEND_HOOK_CONCURRENCY", default_value_t = 256)]
    send_hook_concurrency: usize,
    /// POST every terminal that connects without a token to this URL: the backend admits it
    /// (its id and room grants, from the request's cookies or session header) or refuses it
    /// (docs/protocol.md, "Connect hook"). A token still goes through JWT verification alone.
    #[arg(long, env = "LIVEPUSH_CONNECT_HOOK")]
    connect_hook: Option<String>,
    /// Longest the connect hook may take; past it the terminal is refused (503 `unavailable`).
    #[arg(long, env = "LIVEPUSH_CONNECT_HOOK_TIMEOUT", default_value = "2s", value_parser = duration)]
    connect_hook_timeout: Duration,
    /// Connect hook requests in flight at once on this node; past it a terminal without a
    /// token is refused at once (503 `unavailable`).
    #[arg(long, env = "LIVEPUSH_CONNECT_HOOK_CONCURRENCY", default_value_t = 256)]
    connect_hook_concurrency: usize,
    /// How long the connect hook's `allow` is reused for requests with the same cookies and
    /// headers (each long-poll is a request); 0s: ask on every request.
    #[arg(long, env = "LIVEPUSH_CONNECT_HOOK_CACHE_TTL", default_value = "30s", value_parser = duration)]
    connect_hook_cache_ttl: Duration,
    /// Most connect hook answers kept for reuse at once.
    #[arg(
        long,
        env = "LIVEPUSH_CONNECT_HOOK_CACHE_SIZE",
        default_value_t = 10_000
    )]
    connect_hook_cache_size: usize,
    /// Accept queue of the HTTP listener (capped by the kernel's net.core.somaxconn).
    #[arg(long, env = "LIVEPUSH_LISTEN_BACKLOG", default_value_t = Limits::default().listen_backlog)]
    listen_backlog: u32,
    /// Time a client has to send a whole request body (after its head); past it: 408.
    #[arg(long, env = "LIVEPUSH_BODY_TIMEOUT", default_value = "30s", value_parser = duration)]
    body_timeout: Duration,
    /// HTTP connections one source address may hold open at once (requests, long-polls, SSE
    /// streams, WebSocket handshakes; open WebSocket sessions do not count); past it: 429.
    /// Default: 4096, or a quarter of the process's open-files limit if that is lower, so
    /// that one address cannot take every file descriptor and lock other clients out.
    #[arg(long, env = "LIVEPUSH_MAX_CONNECTIONS_PER_ADDRESS")]
    max_connections_per_address: Option<usize>,
    /// Sessions (WebSocket, SSE stream, poll in progress) one terminal may hold open at once;
    /// past it a WebSocket gets `rate_limited` and close 4029, a poll or SSE stream 429.
    #[arg(long, env = "LIVEPUSH_MAX_SESSIONS_PER_TERMINAL", default_value_t = Limits::default().max_sessions_per_terminal)]
    max_sessions_per_terminal: usize,
    /// Rooms of the viewer token for the demo page (`/`): when `serve` generated its own
    /// token secret it prints `open URL/#token=…` after its `listening` line; a trailing `*`
    /// matches a prefix. Comma-separated or repeated.
    #[arg(long, env = "LIVEPUSH_DEMO_ROOMS", value_delimiter = ',', default_values = ["live:demo", "demo:*"])]
    demo_rooms: Vec<String>,
    /// Lifetime of that viewer token (at most --max-token-ttl); 0s prints none.
    #[arg(long, env = "LIVEPUSH_DEMO_TOKEN_TTL", default_value = "24h", value_parser = duration)]
    demo_token_ttl: Duration,
}

fn generated(what: &str, notes: &mut Vec<String>) -> String {
    let v: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    notes.push(format!(
        "livepush: no {what} given; generated one for this run: {v}"
    ));
    v
}

/// The store `--data-dir` names, opened before anything listens.
enum DataStore {
    Memory,
    Redb(Arc<RedbStore>),
}

impl DataStore {
    async fn open(data_dir: &str, options: StoreOptions) -> anyhow::Result<DataStore> {
        if data_dir == ":memory:" {
            return Ok(DataStore::Memory);
        }
        let dir = std::path::PathBuf::from(data_dir);
        // Opening verifies checksums and compacts: blocking work.
        let store = tokio::task::spawn_blocking(move || RedbStore::open_with(&dir, options))
            .await
            .context("opening the store")?
            .context("cannot start: the data directory is unusable")?;
        Ok(DataStore::Redb(Arc::new(store)))
    }

    fn as_dyn(&self) -> Arc<dyn Store> {
        match self {
            DataStore::Memory => Arc::new(MemoryStore::default()),
            DataStore::Redb(s) => s.clone(),
        }
    }
}

/// Compact the store file when trimming has freed at least half of it (and 64 MiB).
fn spawn_compaction(store: Arc<RedbStore>) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs(600));
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let freed = store.trimmed_bytes_since_compaction();
            if freed >= 64 * 1024 * 1024 && freed >= store.file_len() / 2 {
                match store.compact().await {
                    Ok(_) => tracing::info!(freed, "store compacted"),
                    Err(e) => tracing::warn!(error = %e, "store compaction failed"),
                }
            }
        }
    });
}

/// `--max-connections-per-address` when not given: the library's default, or a quarter of
/// the open-files limit if lower (at least 1).
fn default_connections_per_address() -> usize {
    let default = Limits::default().max_connections_per_address;
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _)) => default.min(usize::try_from(soft / 4).unwrap_or(usize::MAX).max(1)),
        Err(_) => default,
    }
}

impl ServeArgs {
    /// The configuration, and notes to print once it is known to be valid.
    fn into_config(self) -> anyhow::Result<(Config, Vec<String>)> {
        let mut notes = Vec::new();
        let mut classes = ClassMap::default();
        for c in &self.classes {
            classes.apply(c).context("--class")?;
        }
        let api_key = match self.api_key {
            Some(k) => Some(k),
            None if self.dev => None,
            None => Some(generated("API key (--api-key)", &mut notes)),
        };
        let token_secret = match self.token_secret {
            Some(s) => s,
            None => generated("token secret (--token-secret)", &mut notes),
        };
        let heartbeat = Duration::from_millis(self.heartbeat_ms);
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => anyhow::bail!("--tls-cert needs --tls-key (the certificate's key)"),
            (None, Some(_)) => anyhow::bail!("--tls-key needs --tls-cert (the certificate)"),
        };
        let config = Config {
            listen: self.listen,
            api_key,
            token_secret,
            dev: self.dev,
            heartbeat,
            heartbeat_timeout: self
                .heartbeat_timeout_ms
                .map_or(heartbeat, Duration::from_millis),
            history_size: self.history_size,
            history_ttl: self.history_ttl,
            classes,
            flap_threshold: self.flap_threshold,
            flap_window: self.flap_window,
            flap_longpoll_for: self.flap_retry_ws_after,
            poll_grace: self.poll_grace.unwrap_or(self.poll_max_wait * 2),
            terminal_retention: self.terminal_retention,
            room_idle: self.room_idle,
            max_rooms: self.max_rooms,
            store_sweep_rooms: self.store_sweep_rooms,
            wake_listen: self.wake_listen,
            wake_max_skew: self.wake_max_skew,
            wake_retries: self.wake_retries,
            wake_retry_first: self.wake_retry_first,
            wake_retry_max: self.wake_retry_max,
            wake_rate_per_minute: self.wake_rate,
            wake_burst: self.wake_burst,
            shutdown_timeout: self.shutdown_timeout,
            // The logger's, set by `run` (it is not a setting).
            log_level: None,
            connect_hook: self.connect_hook.map(|url| ConnectHookSettings {
                url,
                secret: self.hook_secret.clone().unwrap_or_default(),
                timeout: self.connect_hook_timeout,
                concurrency: self.connect_hook_concurrency,
                cache_ttl: self.connect_hook_cache_ttl,
                cache_size: self.connect_hook_cache_size,
            }),
            send_hook: self.send_hook.map(|url| SendHookSettings {
                url,
                secret: self.hook_secret.unwrap_or_default(),
                timeout: self.send_hook_timeout,
                failure: match self.send_hook_failure {
                    HookFailureArg::Closed => HookFailure::Closed,
                    HookFailureArg::Open => HookFailure::Open,
                },
                concurrency: self.send_hook_concurrency,
            }),
            inbox_size: self.inbox_size,
            inbox_ttl: self.inbox_ttl,
            tls,
            limits: Limits {
                max_frame_bytes: self.max_frame_bytes,
                max_publish_bytes: self.max_publish_bytes,
                max_batch_bytes: self.max_batch_bytes,
                max_batch_messages: self.max_batch_messages,
                max_send_bytes: self.max_send_bytes,
                send_rate: self.send_rate,
                send_burst: self.send_burst,
                room_open_rate: self.room_open_rate,
                room_open_burst: self.room_open_burst,
                frame_rate: self.frame_rate,
                frame_burst: self.frame_burst,
                outbox_frames: self.outbox_frames,
                outbox_max_bytes: self.outbox_max_bytes,
                write_batch_bytes: self.write_batch_bytes,
                write_timeout: self.write_timeout,
                merge_window: Duration::from_millis(self.merge_ms),
                max_pull: self.max_pull,
                max_rooms_per_connection: self.max_rooms_per_connection,
                connect_timeout: self.connect_timeout,
                header_timeout: self.header_timeout,
                poll_max_wait: self.poll_max_wait,
                max_poll_bytes: self.max_poll_bytes,
                listen_backlog: self.listen_backlog,
                body_timeout: self.body_timeout,
                max_connections_per_address: self
                    .max_connections_per_address
                    .unwrap_or_else(default_connections_per_address),
                max_sessions_per_terminal: self.max_sessions_per_terminal,
                max_json_depth: self.max_json_depth,
                max_token_ttl: self.max_token_ttl,
                admin_interval: self.admin_interval,
                admin_rooms: self.admin_rooms,
                admin_token_ttl: self.admin_token_ttl,
                ..Limits::default()
            },
        };
        Ok((config, notes))
    }
}

/// SIGHUP: read the TLS certificate and key again. A bad file is logged and changes nothing.
fn reload_tls(running: &livepush_server::Running) {
    match running.reload_tls() {
        Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: TLS certificate not reloaded; the previous one stays")
        }
    }
}

/// `--send-hook-failure`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum HookFailureArg {
    Closed,
    Open,
}

fn log_directive(s: &str) -> Result<String, String> {
    crate::logging::parse(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

pub async fn run(args: ServeArgs, log_level: crate::logging::LogLevel) -> anyhow::Result<()> {
    if let Some(file) = args.config.clone() {
        spawn_log_reload(file, log_level.clone())?;
    }
    if let Some(file) = &args.config {
        tracing::info!(file = %file.display(), "settings from a configuration file");
    }
    let mut store_options = StoreOptions::new(args.durability);
    store_options.batch_window = args.batch_window;
    // The store sweeps messages older than the history TTL, also of rooms nobody uses.
    store_options.history_ttl = Some(args.history_ttl);
    let data_dir = args.data_dir.clone();
    let demo = crate::firstrun::DemoPage {
        rooms: args.demo_rooms.clone(),
        ttl: args.demo_token_ttl,
        secret_generated: args.token_secret.is_none(),
    };
    let redis = args
        .redis
        .clone()
        .map(|url| (url, args.redis_prefix.clone(), args.redis_timeout));
    let (mut config, notes) = args.into_config()?;
    config.log_level = Some(Arc::new(log_level.clone()));
    config.validate().context("invalid configuration")?;
    let demo = demo.prepare(&config)?;
    for n in notes {
        eprintln!("{n}");
    }
    let dev = config.dev;
    let (running, store) = match redis {
        Some((url, prefix, timeout)) => {
            let engine = RedisEngine::connect(RedisSettings {
                url,
                prefix,
                timeout,
                retention: Retention {
                    max_messages: config.history_size,
                    ttl: config.history_ttl,
                },
                inbox_size: config.inbox_size,
            })
            .await
            .context("cannot start on Redis")?;
            eprintln!("livepush: one node of several, on Redis (--data-dir is not used)");
            (
                livepush_server::start_with_engine(config, engine).await?,
                None,
            )
        }
        None => {
            let store = DataStore::open(&data_dir, store_options).await?;
            let running = livepush_server::start_with(config, store.as_dyn()).await?;
            (running, Some(store))
        }
    };
    if let Some(DataStore::Redb(s)) = &store {
        spawn_compaction(s.clone());
    }
    if dev {
        eprintln!("livepush: --dev: terminals may connect without a token");
    }
    // Handlers first: a SIGINT or SIGTERM right after the line below stops gracefully.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // SIGHUP reloads the certificate; without TLS it keeps its default action.
    let mut hup = match running.is_tls() {
        true => Some(signal(SignalKind::hangup())?),
        false => None,
    };
    println!("livepush listening on {}", running.url());
    demo.print(&running.url());
    std::io::stdout().flush()?;
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            Some(_) = async { hup.as_mut()?.recv().await } => reload_tls(&running),
        }
    }
    eprintln!("livepush: shutting down");
    running.shutdown().await;
    if let Some(DataStore::Redb(s)) = store {
        s.close().context("closing the store")?;
    }
    Ok(())
}

/// On SIGHUP, apply the `log-level` of the configuration file again (or the default when the
/// file has none): a running server's logging changes without a restart.
fn spawn_log_reload(
    file: std::path::PathBuf,
    log_level: crate::logging::LogLevel,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let applied = crate::config_file::log_level(&file).and_then(|level| {
                let level = level.unwrap_or_else(|| crate::logging::DEFAULT_LEVEL.to_owned());
                log_level.set(&level).map(|()| level)
            });
            match applied {
                Ok(level) => {
                    tracing::warn!(%level, file = %file.display(), "SIGHUP: log level reloaded")
                }
                Err(e) => tracing::warn!(error = %e, "SIGHUP: the log level stays as it was"),
            }
        }
    });
    Ok(())
}

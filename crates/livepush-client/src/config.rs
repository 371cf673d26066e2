//! Client settings. Every delay and limit the SDK uses lives here, with a default that suits a
//! live-room app on a mobile network.

use std::time::Duration;

/// The `client` name sent in the `connect` frame by default.
pub const DEFAULT_CLIENT_NAME: &str = "livepush-rust/0.1";

/// Which transports the client may use (see the crate documentation, "Transports").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TransportMode {
    /// WebSocket first. The client moves to long-polling when the WebSocket upgrade is
    /// refused at the HTTP level (any non-`101` answer other than a `5xx`, or an answer
    /// without the upgrade headers: a proxy that strips the upgrade) and then tries
    /// WebSocket again after [`ClientConfig::ws_retry_after`]; or when the server answers
    /// `connect` with `{"op":"transport","use":"longpoll","retry_ws_after_ms":X}`, and then
    /// tries WebSocket again after `X`. Network errors (refused, reset, timeout) are not a
    /// reason to switch: they take the usual reconnect path with back-off.
    #[default]
    Auto,
    /// WebSocket only. A `transport` answer is honoured by waiting `retry_ws_after_ms`.
    WebSocket,
    /// Long-polling only (`POST /v1/poll`).
    LongPoll,
    /// Server-Sent Events only (`GET /v1/sse`): receive-only. [`Client::send`] and
    /// [`Client::ack_inbox`] fail with [`ClientError::Unsupported`].
    ///
    /// [`Client::send`]: crate::Client::send
    /// [`Client::ack_inbox`]: crate::Client::ack_inbox
    /// [`ClientError::Unsupported`]: crate::ClientError::Unsupported
    Sse,
}

/// Settings of a [`Client`](crate::Client). Build one with struct update syntax:
///
/// ```
/// use std::time::Duration;
/// use livepush_client::ClientConfig;
///
/// let config = ClientConfig {
///     server: "http://127.0.0.1:8080".into(),
///     token: Some("eyJ...".into()),
///     backoff_max: Duration::from_secs(10),
///     ..ClientConfig::default()
/// };
/// # let _ = config;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Base URL of the server: `http://host:port` (→ `ws://host:port/v1/connect`) or
    /// `https://…` (→ `wss://…`; needs a TLS feature of `tokio-tungstenite`, which this crate
    /// does not enable). A `ws://`/`wss://` URL is used as is, with `/v1/connect` appended to
    /// its path unless the path already ends with it. Default `http://127.0.0.1:8080`.
    pub server: String,
    /// The terminal's token (a JWT), sent in the `connect` frame. `None` connects
    /// anonymously, which only a `--dev` server accepts. Change it later with
    /// [`Client::set_token`](crate::Client::set_token). Default `None`.
    pub token: Option<String>,
    /// The `client` field of the `connect` frame. Default [`DEFAULT_CLIENT_NAME`].
    pub client_name: String,
    /// Longest time from the start of a connection attempt (TCP, WebSocket handshake,
    /// `connect` frame) to the server's `connected` answer. Default 10 s.
    pub connect_timeout: Duration,
    /// How long the connection may go without any incoming traffic (frames, WebSocket pings
    /// or pongs) before the client probes it with `{"op":"ping"}`. `None` (the default) uses
    /// the server's `heartbeat_ms` from the `connected` frame plus [`idle_grace`](Self::idle_grace).
    pub idle_timeout: Option<Duration>,
    /// Added to the server's `heartbeat_ms` when [`idle_timeout`](Self::idle_timeout) is
    /// `None`. Default 5 s.
    pub idle_grace: Duration,
    /// After a probe, how long to wait for any traffic before the connection is declared dead
    /// and dropped. Default 5 s.
    pub ping_timeout: Duration,
    /// Longest time one write to the socket may take before the connection is declared dead.
    /// Default 10 s.
    pub write_timeout: Duration,
    /// Reconnect back-off: the delay before attempt `n` (counting from 0 after the last
    /// successful connect) is uniformly random in `[0, min(backoff_max, backoff_base * 2^n)]`
    /// ("full jitter"). Default 500 ms.
    pub backoff_base: Duration,
    /// Upper bound of the reconnect back-off. Default 30 s.
    pub backoff_max: Duration,
    /// Consecutive connect attempts refused with `unauthorized` or `forbidden` after which the
    /// client stops reconnecting until [`Client::set_token`](crate::Client::set_token) is
    /// called. Every refusal is reported as [`Event::Error`](crate::Event::Error) and is
    /// followed by the usual back-off. `None` keeps retrying (with back-off) forever.
    /// Default `Some(3)`.
    pub auth_failure_limit: Option<u32>,
    /// `limit` of each `pull` the client sends to fill a gap. The server may cap it (its
    /// default cap is 1000); the client keeps pulling until the gap is filled. Default 1000.
    pub pull_limit: u32,
    /// Reliable messages held per room while waiting for a gap to be filled. When more
    /// arrive, the held ones are dropped and the pull brings them back. Default 1024.
    pub max_buffered_per_room: usize,
    /// Events held for the application before the client stops reading from the socket
    /// (back-pressure; reliable messages are recovered later, transient ones may then be
    /// dropped by the server). Default 1024.
    pub event_capacity: usize,
    /// Capacity of the command channel from [`Client`](crate::Client) handles to the
    /// connection task. Default 64.
    pub command_capacity: usize,
    /// The transports the client may use. Default [`TransportMode::Auto`].
    pub transport: TransportMode,
    /// In [`TransportMode::Auto`], after the WebSocket upgrade was refused at the HTTP level:
    /// how long to long-poll before trying WebSocket again. (After a server's `transport`
    /// answer the client uses the `retry_ws_after_ms` it names instead.) Default 60 s.
    pub ws_retry_after: Duration,
    /// `wait_ms` of each long-poll: how long the server may park a poll when it has nothing
    /// to send (the server caps it, by default at 30 s). A poll that has not been answered
    /// `poll_wait` + [`connect_timeout`](Self::connect_timeout) after it was sent is given up
    /// (the long-poll watchdog) and reported as
    /// [`DisconnectReason::HeartbeatTimeout`](crate::DisconnectReason::HeartbeatTimeout).
    /// Default 25 s.
    pub poll_wait: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            server: "http://127.0.0.1:8080".to_owned(),
            token: None,
            client_name: DEFAULT_CLIENT_NAME.to_owned(),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: None,
            idle_grace: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            auth_failure_limit: Some(3),
            pull_limit: 1000,
            max_buffered_per_room: 1024,
            event_capacity: 1024,
            command_capacity: 64,
            transport: TransportMode::Auto,
            ws_retry_after: Duration::from_secs(60),
            poll_wait: Duration::from_secs(25),
        }
    }
}

/// Used when the server announces `heartbeat_ms: 0` and no `idle_timeout` is configured.
pub(crate) const FALLBACK_HEARTBEAT: Duration = Duration::from_secs(25);

impl ClientConfig {
    /// The idle timeout for a connection whose server announced `heartbeat_ms`.
    pub fn effective_idle_timeout(&self, heartbeat_ms: u64) -> Duration {
        match self.idle_timeout {
            Some(d) => d,
            None => {
                let hb = if heartbeat_ms == 0 {
                    FALLBACK_HEARTBEAT
                } else {
                    Duration::from_millis(heartbeat_ms)
                };
                hb.saturating_add(self.idle_grace)
            }
        }
    }

    /// The WebSocket URL derived from [`server`](Self::server).
    pub fn ws_url(&self) -> Result<url::Url, crate::ClientError> {
        self.endpoint(true, "/v1/connect")
    }

    /// The long-poll URL (`POST`) derived from [`server`](Self::server):
    /// `http://host:port/v1/poll` (a `ws://`/`wss://` server maps to `http`/`https`).
    pub fn poll_url(&self) -> Result<url::Url, crate::ClientError> {
        self.endpoint(false, "/v1/poll")
    }

    /// The Server-Sent Events URL derived from [`server`](Self::server), without its query:
    /// `http://host:port/v1/sse`.
    pub fn sse_url(&self) -> Result<url::Url, crate::ClientError> {
        self.endpoint(false, "/v1/sse")
    }

    fn endpoint(&self, ws: bool, endpoint: &str) -> Result<url::Url, crate::ClientError> {
        let bad = |why: String| crate::ClientError::InvalidUrl(format!("{}: {why}", self.server));
        let mut url = url::Url::parse(self.server.trim()).map_err(|e| bad(e.to_string()))?;
        let scheme = match (url.scheme(), ws) {
            ("http" | "ws", true) => "ws",
            ("https" | "wss", true) => "wss",
            ("http" | "ws", false) => "http",
            ("https" | "wss", false) => "https",
            (other, _) => return Err(bad(format!("unsupported scheme {other:?}"))),
        };
        url.set_scheme(scheme)
            .map_err(|()| bad("cannot change the scheme".to_owned()))?;
        if url.host_str().is_none() {
            return Err(bad("no host".to_owned()));
        }
        // A server URL may name the WebSocket endpoint itself: its base is what precedes it.
        let path = url.path().trim_end_matches('/');
        let base = path.strip_suffix("/v1/connect").unwrap_or(path).to_owned();
        url.set_path(&format!("{base}{endpoint}"));
        url.set_query(None);
        url.set_fragment(None);
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(server: &str) -> Result<String, crate::ClientError> {
        ClientConfig {
            server: server.to_owned(),
            ..ClientConfig::default()
        }
        .ws_url()
        .map(|u| u.to_string())
    }

    #[test]
    fn derives_the_websocket_url() {
        assert_eq!(
            url("http://127.0.0.1:8080").unwrap(),
            "ws://127.0.0.1:8080/v1/connect"
        );
        assert_eq!(
            url("https://push.example/").unwrap(),
            "wss://push.example/v1/connect"
        );
        assert_eq!(
            url("http://h:1/prefix/").unwrap(),
            "ws://h:1/prefix/v1/connect"
        );
        assert_eq!(url("ws://h:1/v1/connect").unwrap(), "ws://h:1/v1/connect");
        assert!(url("ftp://h").is_err());
        assert!(url("not a url").is_err());
    }

    #[test]
    fn derives_the_http_urls() {
        let urls = |server: &str| {
            let c = ClientConfig {
                server: server.to_owned(),
                ..ClientConfig::default()
            };
            (
                c.poll_url().unwrap().to_string(),
                c.sse_url().unwrap().to_string(),
            )
        };
        assert_eq!(
            urls("http://127.0.0.1:8080"),
            (
                "http://127.0.0.1:8080/v1/poll".to_owned(),
                "http://127.0.0.1:8080/v1/sse".to_owned()
            )
        );
        assert_eq!(
            urls("wss://push.example/p/v1/connect").0,
            "https://push.example/p/v1/poll"
        );
        assert_eq!(urls("ws://h:1/x/").1, "http://h:1/x/v1/sse");
    }

    #[test]
    fn idle_timeout_follows_the_server_heartbeat() {
        let c = ClientConfig::default();
        assert_eq!(c.effective_idle_timeout(10_000), Duration::from_secs(15));
        assert_eq!(
            c.effective_idle_timeout(0),
            FALLBACK_HEARTBEAT + Duration::from_secs(5)
        );
        let c = ClientConfig {
            idle_timeout: Some(Duration::from_millis(300)),
            ..c
        };
        assert_eq!(c.effective_idle_timeout(10_000), Duration::from_millis(300));
    }
}

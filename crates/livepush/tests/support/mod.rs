//! Test fixtures shared by the `livepush` integration tests: the test key and secret, a
//! server in this process and its HTTP API, waits with a deadline, and (in submodules) a
//! proxy that breaks connections, the real binary, and a sleeping terminal's UDP socket.

// Each test file is its own crate and uses only some of these helpers.
#![allow(dead_code)]

pub mod process;
// The proxy of `livepush bench chaos`, shared with the tests.
#[path = "../../src/proxy.rs"]
pub mod proxy;
// One fixture for both crates' Redis tests.
#[path = "../../../livepush-server/tests/it/redis_server.rs"]
pub mod redis;
pub mod wake;

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Duration;

use livepush_client::{ClientConfig, Event, Events};
use livepush_server::auth::{Claims, TokenKeys, now_secs};
use livepush_server::{Config, Running};
use serde_json::{Value, json};
use tokio::time::{Instant, timeout_at};

/// The API key of every server under test (the backend's `Authorization: Bearer`).
pub const KEY: &str = "livepush-test-key";
/// The token secret of every server under test: [`token`] signs with it.
pub const SECRET: &str = "livepush-test-secret-0123456789";
/// Longest wait for anything that should happen promptly on loopback (a failure, not a pace).
pub const PATIENCE: Duration = Duration::from_secs(5);

/// A terminal token for `sub`, signed with [`SECRET`], valid for 10 minutes.
pub fn token(sub: &str, rooms: &[&str], send: bool) -> String {
    TokenKeys::new(SECRET)
        .mint(&Claims {
            sub: sub.into(),
            exp: now_secs() + 600,
            rooms: rooms.iter().map(|r| r.to_string()).collect(),
            send,
        })
        .expect("token")
}

/// A server in this process on 127.0.0.1:0 with the test key and secret, and its HTTP API.
pub struct TestServer {
    pub running: Running,
    pub api: Api,
}

impl TestServer {
    /// Starts a server with [`Config::for_tests`] as it is.
    pub async fn start() -> TestServer {
        TestServer::with(|_| {}).await
    }

    /// Starts a server with `tweak` applied to [`Config::for_tests`].
    pub async fn with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config::for_tests(KEY, SECRET);
        tweak(&mut config);
        let running = livepush_server::start(config).await.expect("server");
        let api = Api::new(running.url());
        TestServer { running, api }
    }

    /// `http://127.0.0.1:port`, what an SDK client is given as its server.
    pub fn url(&self) -> String {
        self.running.url()
    }

    /// The listening address, what a proxy forwards to.
    pub fn addr(&self) -> SocketAddr {
        self.running.addr()
    }

    /// Stops the server gracefully.
    pub async fn shutdown(self) {
        self.running.shutdown().await;
    }
}

/// A server's HTTP API, called with [`KEY`] (in-process or a spawned `livepush serve`).
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    /// `http://host:port`, without a trailing slash.
    pub url: String,
}

impl Api {
    /// The API at `url`, through a client with the default connection pool.
    pub fn new(url: String) -> Api {
        Api {
            http: reqwest::Client::new(),
            url,
        }
    }

    /// Publishes `{type, data}` to `room`; the test fails unless it is accepted. Returns the
    /// answer (`seq`, `epoch`).
    pub async fn publish(&self, room: &str, ty: &str, data: Value) -> Value {
        let r = self
            .post_message(&format!("/v1/rooms/{room}"), ty, data)
            .await;
        let status = r.status();
        let body = r.text().await.expect("publish answer");
        assert!(status.is_success(), "publish: {status} {body}");
        serde_json::from_str(&body).expect("publish answer is JSON")
    }

    /// Posts `{type, data}` to `terminal`'s inbox; the test fails unless it is answered 200.
    /// Returns the answer (`seq`, `online`, `wake`).
    pub async fn post_inbox(&self, terminal: &str, ty: &str, data: Value) -> Value {
        let r = self
            .post_message(&format!("/v1/terminals/{terminal}"), ty, data)
            .await;
        assert_eq!(r.status(), 200);
        r.json().await.expect("json")
    }

    /// `POST {to}/messages` with `{type, data}`.
    async fn post_message(&self, to: &str, ty: &str, data: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{to}/messages", self.url))
            .bearer_auth(KEY)
            .json(&json!({"type": ty, "data": data}))
            .send()
            .await
            .expect("POST")
    }

    /// `GET path` as JSON, whatever the status (an unknown terminal is JSON too).
    pub async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("JSON")
    }

    /// `GET /v1/rooms/{room}`: its epoch, seq, online count and state.
    pub async fn room(&self, room: &str) -> Value {
        self.get(&format!("/v1/rooms/{room}")).await
    }

    /// `GET /v1/terminals/{id}`: whether it is online, its inbox and its wake registration.
    pub async fn terminal(&self, id: &str) -> Value {
        self.get(&format!("/v1/terminals/{id}")).await
    }
}

/// Polls `probe` every `every` until `done` accepts what it gives, and returns that: for
/// what another task or process brings about. Fails at `deadline`, showing the last value.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    deadline: Instant,
    every: Duration,
    mut probe: F,
    done: impl Fn(&T) -> bool,
) -> T
where
    T: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    loop {
        let last = probe().await;
        if done(&last) {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {last}"
        );
        tokio::time::sleep(every).await;
    }
}

/// [`wait_for`] a condition that `check` tells true or false.
pub async fn wait_until<F, Fut>(what: &str, deadline: Instant, every: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, deadline, every, check, |ok| *ok).await;
}

/// An SDK client's next event; fails at `deadline`, also when events keep coming.
pub async fn next_event(events: &mut Events, deadline: Instant, what: &str) -> Event {
    assert!(Instant::now() < deadline, "timed out waiting for {what}");
    timeout_at(deadline, events.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("event stream open")
}

/// An SDK client for `sub` (rooms `live:*`) that notices a dead path and reconnects within
/// a second: short back-off and watchdog.
pub fn fast_client(server: String, sub: &str) -> ClientConfig {
    ClientConfig {
        server,
        token: Some(token(sub, &["live:*"], false)),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(300),
        idle_timeout: Some(Duration::from_millis(400)),
        ping_timeout: Duration::from_millis(300),
        ..ClientConfig::default()
    }
}

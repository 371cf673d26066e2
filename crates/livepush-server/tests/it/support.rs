//! Test fixtures: a real server on 127.0.0.1:0 and raw WebSocket / HTTP clients.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use livepush_proto::{Message as Msg, ServerFrame, split_frames};
use livepush_server::auth::{Claims, TokenKeys, now_secs};
use livepush_server::{Config, Running};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const KEY: &str = "test-api-key-0123456789";
pub const SECRET: &str = "test-token-secret-0123456789";
/// How long a test waits for something that should happen promptly on loopback.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn config() -> Config {
    Config::for_tests(KEY, SECRET)
}

pub struct TestServer {
    pub running: Running,
    pub http: reqwest::Client,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::with(config()).await
    }

    pub async fn with(config: Config) -> TestServer {
        TestServer::of(livepush_server::start(config).await.expect("server starts"))
    }

    /// A server on `store` (a durable or a failing one) with the test settings.
    pub async fn with_store(
        store: std::sync::Arc<dyn livepush_server::store::Store>,
    ) -> TestServer {
        TestServer::of(
            livepush_server::start_with(config(), store)
                .await
                .expect("server starts"),
        )
    }

    /// The test handle of a server already started.
    pub fn of(running: Running) -> TestServer {
        TestServer {
            running,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self) -> String {
        self.running.url()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/connect", self.running.addr())
    }

    pub fn token(&self, sub: &str, rooms: &[&str], send: bool) -> String {
        TokenKeys::new(SECRET)
            .mint(&Claims {
                sub: sub.into(),
                exp: now_secs() + 600,
                rooms: rooms.iter().map(|s| s.to_string()).collect(),
                send,
            })
            .expect("mint")
    }

    /// Connect and authenticate; returns after `connected`.
    pub async fn terminal(&self, sub: &str, rooms: &[&str], send: bool) -> Ws {
        let mut ws = Ws::open(&self.ws_url()).await;
        let token = self.token(sub, rooms, send);
        ws.send(json!({"op":"connect","token":token,"client":"test/1"}))
            .await;
        match ws.next().await {
            ServerFrame::Connected { terminal, .. } => assert_eq!(terminal, sub),
            other => panic!("expected connected, got {other:?}"),
        }
        ws
    }

    pub async fn publish(&self, room: &str, ty: &str, data: Value) -> Value {
        let (status, body) = self
            .post(
                &format!("/v1/rooms/{room}/messages"),
                json!({"type": ty, "data": data}),
            )
            .await;
        assert_eq!(status, 200, "publish failed: {body}");
        body
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url()))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .expect("http");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.url()))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("http");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `GET path` without the API key, as a raw response.
    pub async fn get_raw(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.url()))
            .send()
            .await
            .expect("http")
    }

    /// `GET path` with the API key, as text (`/metrics`).
    pub async fn get_raw_with_key(&self, path: &str) -> String {
        self.http
            .get(format!("{}{path}", self.url()))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("http")
            .text()
            .await
            .expect("text")
    }

    pub async fn room(&self, room: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/rooms/{room}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Poll `check` until it returns true or [`WAIT`] passes.
    pub async fn eventually<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for: {what}");
    }
}

/// A raw WebSocket client that splits batched frames.
pub struct Ws {
    pub inner: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pending: VecDeque<ServerFrame>,
    pub closed: Option<(u16, String)>,
}

impl Ws {
    pub async fn open(url: &str) -> Ws {
        let (inner, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        Ws::over(inner)
    }

    /// A client over a connection opened by the test (a TLS one).
    pub fn over(inner: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Ws {
        Ws {
            inner,
            pending: VecDeque::new(),
            closed: None,
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, s: &str) {
        self.inner
            .send(Message::Text(s.to_owned().into()))
            .await
            .expect("ws send");
    }

    /// The next frame, or `None` when the connection ended.
    pub async fn try_next(&mut self) -> Option<ServerFrame> {
        loop {
            if let Some(f) = self.pending.pop_front() {
                return Some(f);
            }
            let m = tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("timed out waiting for a frame");
            match m {
                Some(Ok(Message::Text(t))) => {
                    for line in split_frames(t.as_str()) {
                        let f = ServerFrame::parse(line)
                            .unwrap_or_else(|e| panic!("bad server frame {line}: {e}"));
                        self.pending.push_back(f);
                    }
                }
                Some(Ok(Message::Close(c))) => {
                    self.closed = c.map(|c| (u16::from(c.code), c.reason.to_string()));
                    return None;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn next(&mut self) -> ServerFrame {
        self.try_next().await.expect("connection ended")
    }

    /// Skip `online` frames (they arrive on their own schedule).
    pub async fn next_significant(&mut self) -> ServerFrame {
        loop {
            match self.next().await {
                ServerFrame::Online { .. } => continue,
                f => return f,
            }
        }
    }

    pub async fn join(&mut self, room: &str, since: Option<(&str, u64)>) -> ServerFrame {
        let mut f = json!({"op":"join","room":room});
        if let Some((epoch, seq)) = since {
            f["since"] = json!({"epoch": epoch, "seq": seq});
        }
        self.send(f).await;
        self.next_significant().await
    }

    /// Read reliable messages until `n` have arrived; returns their seqs.
    pub async fn reliable(&mut self, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        while out.len() < n {
            if let ServerFrame::Msg(Msg { seq: Some(s), .. }) = self.next().await {
                out.push(s);
            }
        }
        out
    }

    pub async fn expect_error(&mut self, code: &str) -> String {
        loop {
            match self.next().await {
                ServerFrame::Error {
                    code: c, message, ..
                } => {
                    assert_eq!(c.as_str(), code, "wrong error code: {message}");
                    return message;
                }
                ServerFrame::Online { .. } | ServerFrame::Msg(_) => continue,
                other => panic!("expected error {code}, got {other:?}"),
            }
        }
    }
}

pub fn joined(f: &ServerFrame) -> (String, u64, bool) {
    match f {
        ServerFrame::Joined {
            epoch,
            seq,
            recovered,
            ..
        } => (epoch.clone(), *seq, *recovered),
        other => panic!("expected joined, got {other:?}"),
    }
}

/// The seqs of the reliable messages among `frames`, in order.
pub fn seqs(frames: &[ServerFrame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Msg(m) => m.seq,
            _ => None,
        })
        .collect()
}

//! Scripted fake livepush servers for the SDK's integration tests, on 127.0.0.1:0: one for
//! WebSocket ([`FakeServer`]: each test reads the client's frames and writes the server's,
//! one step at a time) and one for long-polling ([`FakePolls`]: each test reads the client's
//! poll bodies and answers them when it wants).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use livepush_client::{ClientConfig, Event, Position, Transport, TransportMode};
use livepush_proto::{ClientEnvelope, ClientFrame, split_frames};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Upper bound of every wait in the tests: a step that takes longer has failed.
pub const STEP: Duration = Duration::from_secs(3);

pub struct FakeServer {
    listener: TcpListener,
    pub url: String,
}

impl FakeServer {
    pub async fn start() -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        FakeServer {
            listener,
            url: format!("http://{addr}"),
        }
    }

    /// A config for this server with short back-off, suited to tests.
    pub fn config(&self) -> ClientConfig {
        ClientConfig {
            server: self.url.clone(),
            connect_timeout: Duration::from_secs(2),
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            ..ClientConfig::default()
        }
    }

    /// The next WebSocket connection.
    pub async fn accept(&self) -> Conn {
        self.accept_within(STEP)
            .await
            .expect("the client did not connect")
    }

    pub async fn accept_within(&self, d: Duration) -> Option<Conn> {
        let (tcp, _) = timeout(d, self.listener.accept()).await.ok()?.ok()?;
        let ws = tokio_tungstenite::accept_async(tcp).await.ok()?;
        Some(Conn {
            ws,
            queue: VecDeque::new(),
        })
    }
}

/// One client connection as the server sees it.
pub struct Conn {
    pub ws: WebSocketStream<TcpStream>,
    queue: VecDeque<ClientEnvelope>,
}

impl Conn {
    /// The client's next frame (fails the test after [`STEP`]).
    pub async fn recv(&mut self) -> ClientEnvelope {
        match self.recv_within(STEP).await {
            Ok(Some(f)) => f,
            Ok(None) => panic!("no frame from the client within {STEP:?}"),
            Err(why) => panic!("connection ended: {why}"),
        }
    }

    /// The client's next frame within `d`: `Ok(None)` if none came, `Err` if the connection
    /// ended. WebSocket pings and pongs are skipped (and answered by tungstenite).
    pub async fn recv_within(&mut self, d: Duration) -> Result<Option<ClientEnvelope>, String> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            if let Some(f) = self.queue.pop_front() {
                return Ok(Some(f));
            }
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Ok(None),
                Ok(n) => n,
            };
            match next {
                Some(Ok(WsMessage::Text(t))) => {
                    for line in split_frames(t.as_str()) {
                        let env = ClientEnvelope::parse(line)
                            .unwrap_or_else(|e| panic!("client sent a bad frame {line}: {e}"));
                        self.queue.push_back(env);
                    }
                }
                Some(Ok(WsMessage::Close(f))) => return Err(format!("close frame {f:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("end of stream".to_owned()),
            }
        }
    }

    /// Send frames in one WebSocket text message, newline-separated.
    pub async fn send(&mut self, frames: &[Value]) {
        let text = frames
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        self.ws
            .send(WsMessage::text(text))
            .await
            .expect("server send");
    }

    /// Expect `connect`, answer `connected`. Returns the token the client sent.
    pub async fn handshake(&mut self, terminal: &str) -> Option<String> {
        let env = self.recv().await;
        let ClientFrame::Connect { token, client } = env.frame else {
            panic!("expected connect, got {env:?}");
        };
        assert_eq!(client.as_deref(), Some("livepush-rust/0.1"));
        self.send(&[json!({
            "op": "connected", "terminal": terminal, "transport": "ws", "heartbeat_ms": 10_000,
            "inbox": {"seq": 0, "acked": 0}, "wake_key": "AAAA"
        })])
        .await;
        token
    }

    /// Complete the handshake, expect the join of `room` (without `since`) and answer it at
    /// `seq` 0 of epoch e1; then read `Connected` and `Joined` from `events`.
    pub async fn join_fresh(&mut self, events: &mut livepush_client::Events, room: &str) {
        self.handshake("t1").await;
        let (joining, since, id) = self.expect_join().await;
        assert_eq!((joining.as_str(), since), (room, None));
        self.send(&[joined(id, room, "e1", 0, true)]).await;
        assert!(matches!(next_event(events).await, Event::Connected { .. }));
        assert!(matches!(next_event(events).await, Event::Joined { .. }));
    }

    /// Complete the handshake and expect the join of `room` resuming from `since`; returns
    /// the join's id (to answer it with).
    pub async fn join_resuming(&mut self, room: &str, since: Position) -> Option<u64> {
        self.handshake("t1").await;
        let (joining, got, id) = self.expect_join().await;
        assert_eq!((joining.as_str(), got), (room, Some(since)));
        id
    }

    /// Expect a `join`; returns (room, since, id).
    pub async fn expect_join(&mut self) -> (String, Option<Position>, Option<u64>) {
        let env = self.recv().await;
        match env.frame {
            ClientFrame::Join { room, since } => (room, since, env.id),
            other => panic!("expected join, got {other:?}"),
        }
    }

    /// Expect a `pull`; returns (room, since, limit, id).
    pub async fn expect_pull(&mut self) -> (String, u64, Option<u32>, Option<u64>) {
        let env = self.recv().await;
        match env.frame {
            ClientFrame::Pull { room, since, limit } => (room, since, limit, env.id),
            other => panic!("expected pull, got {other:?}"),
        }
    }
}

/// A WebSocket client of a fresh [`FakeServer`], joined to `room` (fresh, at e1:0): the
/// server (for reconnects), the client, its events and the server's side of the connection.
pub async fn joined_ws_client(
    room: &str,
) -> (
    FakeServer,
    livepush_client::Client,
    livepush_client::Events,
    Conn,
) {
    let server = FakeServer::start().await;
    let (client, mut events) = livepush_client::Client::connect(server.config()).unwrap();
    client.join(room, None).await.unwrap();
    let mut conn = server.accept().await;
    conn.join_fresh(&mut events, room).await;
    (server, client, events, conn)
}

/// A scripted long-poll endpoint: every HTTP request (any path, any connection, keep-alive
/// included) is handed to the test as a [`PollRequest`], and answered `200` with the JSON the
/// test gives. A request the test drops is answered by closing its connection.
pub struct FakePolls {
    pub url: String,
    polls: mpsc::UnboundedReceiver<PollRequest>,
}

/// One poll as the server sees it.
pub struct PollRequest {
    /// The request body (a poll is JSON).
    pub body: Value,
    reply: oneshot::Sender<Value>,
}

impl PollRequest {
    /// Answer `200` with `answer` as the body.
    pub fn answer(self, answer: Value) {
        let _ = self.reply.send(answer);
    }

    /// The position the poll carries for `room`: `None` for a fresh join (`{}`) or a room it
    /// does not carry.
    pub fn position(&self, room: &str) -> Option<Position> {
        let entry = &self.body["rooms"][room];
        Some(pos(entry["epoch"].as_str()?, entry["seq"].as_u64()?))
    }
}

impl FakePolls {
    pub async fn start() -> FakePolls {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, polls) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve_polls(tcp, tx.clone()));
            }
        });
        FakePolls {
            url: format!("http://{addr}"),
            polls,
        }
    }

    /// A long-poll-only config for this endpoint with short back-off, suited to tests.
    pub fn config(&self) -> ClientConfig {
        ClientConfig {
            server: self.url.clone(),
            transport: TransportMode::LongPoll,
            connect_timeout: Duration::from_secs(2),
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            ..ClientConfig::default()
        }
    }

    /// The next poll (fails the test after [`STEP`]).
    pub async fn next(&mut self) -> PollRequest {
        self.next_within(STEP)
            .await
            .expect("no poll from the client")
    }

    pub async fn next_within(&mut self, d: Duration) -> Option<PollRequest> {
        timeout(d, self.polls.recv()).await.ok().flatten()
    }
}

/// Serve the HTTP/1.1 requests of one connection, one at a time.
async fn serve_polls(mut tcp: TcpStream, polls: mpsc::UnboundedSender<PollRequest>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = serde_json::from_slice(&buf[head_end..head_end + len])
            .unwrap_or_else(|e| panic!("the client sent a poll that is not JSON: {e}"));
        buf.drain(..head_end + len);
        let (reply, answer) = oneshot::channel();
        if polls.send(PollRequest { body, reply }).is_err() {
            return;
        }
        let Ok(answer) = answer.await else {
            return;
        };
        let text = answer.to_string();
        let out = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if tcp.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Answer the hello poll with `connected`, and the poll that carries room first (the hello
/// poll or the next) with the fresh join at e1:`seq` and `more`; read `Connected` and `Joined`.
pub async fn hello_lp(
    polls: &mut FakePolls,
    events: &mut livepush_client::Events,
    room: &str,
    seq: u64,
    more: &[Value],
) {
    let mut poll = polls.next().await;
    assert_eq!(poll.body["hello"], true);
    let mut frames = vec![connected_lp(
        "t1",
        json!({"seq": 0, "acked": 0, "pending": 0}),
    )];
    if poll.body["rooms"] == json!({}) {
        // The hello poll went out before the join was registered.
        poll.answer(json!({"frames": frames}));
        frames = Vec::new();
        poll = polls.next().await;
    }
    assert_eq!(poll.body["rooms"], json!({ room: {} }));
    frames.push(joined(None, room, "e1", seq, true));
    frames.extend_from_slice(more);
    poll.answer(json!({"frames": frames}));
    assert!(matches!(
        next_event(events).await,
        Event::Connected {
            transport: Transport::Longpoll,
            ..
        }
    ));
    assert!(matches!(next_event(events).await, Event::Joined { .. }));
}

/// A long-polling client with a token, joined to `room` through [`hello_lp`].
pub async fn polling_client(
    room: &str,
    seq: u64,
    more: &[Value],
) -> (FakePolls, livepush_client::Client, livepush_client::Events) {
    let mut polls = FakePolls::start().await;
    let config = ClientConfig {
        token: Some("tok".into()),
        ..polls.config()
    };
    let (client, mut events) = livepush_client::Client::connect(config).unwrap();
    client.join(room, None).await.unwrap();
    hello_lp(&mut polls, &mut events, room, seq, more).await;
    (polls, client, events)
}

/// A `connected` frame as a long-poll answer carries it.
pub fn connected_lp(terminal: &str, inbox: Value) -> Value {
    json!({"op": "connected", "terminal": terminal, "transport": "longpoll",
           "heartbeat_ms": 10_000, "inbox": inbox, "wake_key": "AAAA"})
}

pub fn joined(id: Option<u64>, room: &str, epoch: &str, seq: u64, recovered: bool) -> Value {
    json!({"op": "joined", "id": id, "room": room, "epoch": epoch, "seq": seq,
           "recovered": recovered, "online": 1})
}

pub fn msg(room: &str, seq: u64) -> Value {
    json!({"op": "msg", "room": room, "type": "gift", "data": {"n": seq}, "seq": seq, "ts": 1000 + seq})
}

pub fn chat(room: &str, text: &str) -> Value {
    json!({"op": "msg", "room": room, "type": "chat", "data": {"text": text}, "ts": 1})
}

pub fn pulled(
    id: Option<u64>,
    room: &str,
    epoch: &str,
    latest: u64,
    seqs: impl IntoIterator<Item = u64>,
) -> Value {
    let messages: Vec<Value> = seqs.into_iter().map(|s| msg(room, s)).collect();
    json!({"op": "pulled", "id": id, "room": room, "epoch": epoch, "seq": latest,
           "recovered": true, "messages": messages})
}

pub fn pos(epoch: &str, seq: u64) -> Position {
    Position {
        epoch: epoch.to_owned(),
        seq,
    }
}

/// The next event (fails the test after [`STEP`]).
pub async fn next_event(events: &mut livepush_client::Events) -> Event {
    timeout(STEP, events.recv())
        .await
        .expect("no event in time")
        .expect("event stream ended")
}

/// The seqs of the next `n` events, which must all be reliable messages of `room`.
pub async fn next_seqs(events: &mut livepush_client::Events, room: &str, n: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        match next_event(events).await {
            Event::Message(m) => {
                assert_eq!(m.room, room);
                assert_eq!(m.data, json!({"n": m.seq}), "payload travels with its seq");
                out.push(m.seq);
            }
            other => panic!("expected a message, got {other:?} after {out:?}"),
        }
    }
    out
}

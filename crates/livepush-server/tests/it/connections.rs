//! Connection-level bounds: what a client that floods, stops reading or holds a request open
//! gets, and that the server stays bounded meanwhile.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use livepush_proto::{ServerFrame, split_frames};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// The frames that arrive on `ws` until the WebSocket pong carrying `marker`.
async fn frames_until_pong(ws: &mut Ws, marker: &[u8]) -> Vec<ServerFrame> {
    ws.inner
        .send(Message::Ping(marker.to_vec().into()))
        .await
        .expect("ping");
    let mut frames = Vec::new();
    loop {
        let m = tokio::time::timeout(WAIT, ws.inner.next())
            .await
            .expect("the pong in time")
            .expect("connection open")
            .expect("a message");
        match m {
            Message::Pong(p) if p.as_ref() == marker => return frames,
            Message::Text(t) => frames.extend(
                split_frames(t.as_str()).map(|l| ServerFrame::parse(l).expect("a server frame")),
            ),
            _ => {}
        }
    }
}

/// A burst far past the frame rate earns one `rate_limited` for the whole episode, not one
/// per refused message.
#[tokio::test]
async fn a_frame_flood_earns_one_rate_limited_per_episode() {
    let mut c = config();
    c.limits.frame_rate = 1;
    c.limits.frame_burst = 5;
    let s = TestServer::with(c).await;
    let mut t = s.terminal("t", &["r"], false).await;
    for i in 0..50 {
        t.send(json!({"op":"ping","id":i})).await;
    }
    // Two round trips: the second pong leaves after everything the flood caused.
    let mut frames = frames_until_pong(&mut t, b"1").await;
    frames.extend(frames_until_pong(&mut t, b"2").await);
    let pongs = frames
        .iter()
        .filter(|f| matches!(f, ServerFrame::Pong { .. }))
        .count();
    let errors: Vec<_> = frames
        .iter()
        .filter(|f| matches!(f, ServerFrame::Error { .. }))
        .collect();
    assert_eq!(pongs, 5, "{frames:?}");
    assert_eq!(errors.len(), 1, "one rate_limited per episode: {errors:?}");
    assert!(
        matches!(errors[0], ServerFrame::Error { code, .. } if code.as_str() == "rate_limited")
    );
}

/// A peer that sends WebSocket pings and reads nothing is closed as a slow consumer once the
/// pongs waiting for it pass `outbox_max_bytes`, instead of having them buffered without
/// bound until the write timeout.
#[tokio::test]
async fn pings_without_reading_make_a_slow_consumer() {
    let mut c = config();
    c.limits.outbox_max_bytes = 64 * 1024;
    c.limits.write_batch_bytes = 16 * 1024;
    c.limits.write_timeout = Duration::from_secs(120);
    let s = TestServer::with(c).await;
    // A small receive buffer, so that little of what the server writes fits on the way.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = socket.connect(s.running.addr()).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(s.ws_url(), tcp)
        .await
        .expect("upgrade");
    let token = s.token("t", &["r"], false);
    ws.send(Message::Text(
        json!({"op":"connect","token":token}).to_string().into(),
    ))
    .await
    .expect("connect");
    let flood = tokio::spawn(async move {
        // Enough pongs to fill both sockets' buffers many times over; the server ends the
        // connection long before, and then a send fails.
        for _ in 0..200_000 {
            if ws
                .send(Message::Ping(vec![b'x'; 125].into()))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    s.eventually("the pinging peer closed as a slow consumer", || async {
        s.get_raw_with_key("/metrics")
            .await
            .contains("livepush_disconnects_total{reason=\"slow_consumer\"} 1")
    })
    .await;
    flood.abort();
}

/// A connection that sent `head` (and nothing after it).
async fn sent(addr: SocketAddr, head: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp
}

/// The HTTP answer on `tcp`: its status and JSON body (read up to its `content-length`).
async fn answer(tcp: &mut TcpStream) -> (u16, Value) {
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("a content-length");
                if buf.len() >= end + 4 + len {
                    let status = head[9..12].parse().expect("a status");
                    let body = serde_json::from_slice(&buf[end + 4..end + 4 + len]);
                    return (status, body.expect("a JSON body"));
                }
            }
            let mut chunk = [0u8; 4096];
            let n = tcp.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "closed before a whole answer: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("an answer in time")
}

/// A request whose body does not arrive within `body_timeout` is answered 408 with a JSON
/// error, on the terminal transports and on the API alike.
#[tokio::test]
async fn a_body_that_never_arrives_is_answered_408() {
    let mut c = config();
    c.limits.body_timeout = Duration::from_millis(300);
    let s = TestServer::with(c).await;
    for head in [
        "POST /v1/poll HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"tok".to_owned(),
        format!(
            "POST /v1/rooms/r/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
             Content-Length: 100\r\n\r\n"
        ),
    ] {
        let mut tcp = sent(s.running.addr(), &head).await;
        let (status, body) = answer(&mut tcp).await;
        assert_eq!(status, 408, "{body}");
        assert_eq!(body["error"], "bad_request", "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("body_timeout"),
            "{body}"
        );
    }
}

/// A body cut short by `body_timeout` is an error, never a shorter body: a publish whose
/// first bytes already form valid JSON is not published when the rest never comes.
#[tokio::test]
async fn a_body_cut_by_the_timeout_is_not_acted_on() {
    let mut c = config();
    c.limits.body_timeout = Duration::from_millis(300);
    let s = TestServer::with(c).await;
    let body = r#"{"type":"gift","data":{"n":1}}"#;
    let head = format!(
        "POST /v1/rooms/cut/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len() + 10
    );
    let mut tcp = sent(s.running.addr(), &head).await;
    let (status, answer) = answer(&mut tcp).await;
    assert_eq!(status, 408, "{answer}");
    let (status, room) = s.get("/v1/rooms/cut").await;
    assert_eq!(status, 404, "nothing was published: {room}");
}

/// A body declared larger than the route's limit is refused with 413 before any of it is
/// read (the body timeout is far away here).
#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_at_once() {
    let mut c = config();
    c.limits.body_timeout = Duration::from_secs(600);
    let s = TestServer::with(c).await;
    for (head, setting) in [
        (
            format!(
                "POST /v1/rooms/r/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
                 Content-Length: 10000000000\r\n\r\n"
            ),
            "max_publish_bytes",
        ),
        (
            "POST /v1/poll HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n".to_owned(),
            "max_poll_bytes",
        ),
    ] {
        let mut tcp = sent(s.running.addr(), &head).await;
        let (status, body) = answer(&mut tcp).await;
        assert_eq!(status, 413, "{body}");
        assert_eq!(body["error"], "too_large", "{body}");
        assert!(
            body["message"].as_str().unwrap().contains(setting),
            "{body}"
        );
    }
}

/// `GET /healthz` on a fresh connection.
async fn healthz(addr: SocketAddr) -> (u16, Value) {
    let head = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    answer(&mut sent(addr, head).await).await
}

/// An address holding `max_connections_per_address` connections gets a JSON 429 for the
/// next one, a WebSocket upgrade included; once one closes, it is served again.
#[tokio::test]
async fn connections_per_address_are_capped_with_a_429() {
    let mut c = config();
    c.limits.max_connections_per_address = 2;
    let s = TestServer::with(c).await;
    let addr = s.running.addr();
    let first = TcpStream::connect(addr).await.expect("connect");
    let _second = TcpStream::connect(addr).await.expect("connect");
    let (status, body) = healthz(addr).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("max_connections_per_address"),
        "{body}"
    );
    match tokio_tungstenite::connect_async(s.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 429),
        other => panic!("expected a refused upgrade, got {:?}", other.map(|_| ())),
    }
    drop(first);
    s.eventually("a connection is admitted again", || async {
        healthz(addr).await.0 == 200
    })
    .await;
}

/// A terminal holding `max_sessions_per_terminal` sessions is refused another one: over
/// WebSocket with `rate_limited` and close 4029, over long-poll and SSE with a JSON 429.
/// Other terminals are not affected, and a session that ends makes room.
#[tokio::test]
async fn sessions_per_terminal_are_capped() {
    let mut c = config();
    c.limits.max_sessions_per_terminal = 2;
    let s = TestServer::with(c).await;
    let mut first = s.terminal("t", &["r"], false).await;
    let _second = s.terminal("t", &["r"], false).await;
    let _other = s.terminal("u", &["r"], false).await;

    let mut third = Ws::open(&s.ws_url()).await;
    third
        .send(json!({"op":"connect","token":s.token("t", &["r"], false)}))
        .await;
    let message = third.expect_error("rate_limited").await;
    assert!(message.contains("max_sessions_per_terminal"), "{message}");
    assert!(third.try_next().await.is_none());
    assert_eq!(third.closed.as_ref().map(|c| c.0), Some(4029));

    let token = s.token("t", &["r"], false);
    let (status, body) = s
        .post("/v1/poll", json!({"token": token, "wait_ms": 0}))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited")),
        "{body}"
    );
    let r = s.get_raw(&format!("/v1/sse?token={token}&rooms=r")).await;
    assert_eq!(r.status().as_u16(), 429);

    first.inner.close(None).await.expect("close");
    s.eventually("a session of t opens again", || async {
        let mut ws = Ws::open(&s.ws_url()).await;
        ws.send(json!({"op":"connect","token":s.token("t", &["r"], false)}))
            .await;
        matches!(ws.next().await, ServerFrame::Connected { .. })
    })
    .await;
}

/// A token for `sub` (room `r`) that the server accepts for about two more seconds: `exp`
/// three seconds ago, within the five seconds of leeway.
fn expiring_token(sub: &str) -> String {
    use livepush_server::auth::{Claims, TokenKeys, now_secs};
    TokenKeys::new(SECRET)
        .mint(&Claims {
            sub: sub.into(),
            exp: now_secs() - 3,
            rooms: vec!["r".into()],
            send: false,
        })
        .expect("mint")
}

/// A session does not outlive its token: a WebSocket gets `unauthorized` ("token expired")
/// and close 4003, an SSE stream gets the same `error` and ends, and a parked poll is
/// answered (the next poll with that token is refused 401).
#[tokio::test]
async fn sessions_end_when_their_token_expires() {
    let s = TestServer::start().await;
    let mut ws = Ws::open(&s.ws_url()).await;
    let token = expiring_token("t");
    ws.send(json!({"op":"connect","token":token})).await;
    assert!(matches!(ws.next().await, ServerFrame::Connected { .. }));
    let sse = s.get_raw(&format!("/v1/sse?token={token}&rooms=r")).await;
    assert_eq!(sse.status().as_u16(), 200);
    let poll = s.post("/v1/poll", json!({"token": token, "wait_ms": 25_000}));

    let (status, body) = tokio::time::timeout(WAIT, poll)
        .await
        .expect("the parked poll is answered when its token expires");
    assert_eq!(status, 200, "{body}");
    let message = ws.expect_error("unauthorized").await;
    assert!(message.contains("token expired"), "{message}");
    assert!(ws.try_next().await.is_none());
    assert_eq!(ws.closed.as_ref().map(|c| c.0), Some(4003));
    let stream = tokio::time::timeout(WAIT, async {
        let mut sse = sse;
        let mut text = String::new();
        while let Some(chunk) = sse.chunk().await.expect("sse chunk") {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    })
    .await
    .expect("the SSE stream ends");
    assert!(stream.contains("\"code\":\"unauthorized\""), "{stream}");
    assert!(stream.contains("token expired"), "{stream}");
    let (status, _) = s
        .post("/v1/poll", json!({"token": token, "wait_ms": 0}))
        .await;
    assert_eq!(status, 401);
}

/// A terminal with a `*` grant may not fill the node with rooms: opening rooms that are not
/// open here is rate limited per terminal (`room_open_rate`), while joining a room already
/// open costs nothing and is never refused for it.
#[tokio::test]
async fn a_terminal_may_open_only_so_many_rooms_a_second() {
    let mut c = config();
    c.limits.room_open_rate = 1;
    c.limits.room_open_burst = 3;
    let s = TestServer::with(c).await;
    let mut other = s.terminal("other", &["busy"], false).await;
    joined(&other.join("busy", None).await);
    let mut t = s.terminal("greedy", &["*"], false).await;
    for k in 0..3 {
        joined(&t.join(&format!("new-{k}"), None).await);
    }
    match t.join("new-3", None).await {
        ServerFrame::Error { code, message, .. } => {
            assert_eq!(code.as_str(), "rate_limited", "{message}");
            assert!(message.contains("room_open_rate"), "{message}");
        }
        other => panic!("expected rate_limited, got {other:?}"),
    }
    joined(&t.join("busy", None).await);
}

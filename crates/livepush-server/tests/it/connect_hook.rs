//! The connect hook: a terminal without a token is admitted (or refused) by the backend, from
//! its request's cookies, on every transport.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use livepush_proto::ServerFrame;
use livepush_server::config::ConnectHookSettings;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

const HOOK_SECRET: &str = "hook-secret-0123456789";

/// What the backend saw.
#[derive(Default)]
struct Seen {
    calls: u32,
    bad_signatures: u32,
    last: Value,
}

/// A backend that checks each request's signature and answers by the `s` cookie.
async fn backend(seen: Arc<Mutex<Seen>>) -> String {
    let app = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            async move {
                let want = livepush_server::hooks::signature(HOOK_SECRET.as_bytes(), &body);
                let req: Value = serde_json::from_slice(&body).unwrap_or_default();
                {
                    let mut seen = seen.lock();
                    seen.calls += 1;
                    if headers
                        .get("x-livepush-signature")
                        .and_then(|v| v.to_str().ok())
                        != Some(want.as_str())
                    {
                        seen.bad_signatures += 1;
                    }
                    seen.last = req.clone();
                }
                let cookie = req["headers"]["cookie"].as_str().unwrap_or_default();
                let who = cookie.strip_prefix("s=").unwrap_or_default();
                let answer = match who {
                    "alice" => {
                        json!({"action":"allow","terminal":"alice","rooms":["live:*"],"send":true})
                    }
                    "banned" => {
                        json!({"action":"reject","code":"forbidden","message":"banned here"})
                    }
                    "odd" => json!({"action":"reject","code":"nope"}),
                    "bad_id" => json!({"action":"allow","terminal":"","rooms":["live:*"]}),
                    "bad_room" => json!({"action":"allow","terminal":"bob","rooms":["a b"]}),
                    "long" => json!({"action":"allow","terminal":"bob","expires_in":999_999_999}),
                    "brief" => json!({"action":"allow","terminal":"carol","rooms":["live:*"],"expires_in":1}),
                    "slow" => {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        json!({"action":"allow","terminal":"slow"})
                    }
                    _ => json!({"action":"maybe"}),
                };
                answer.to_string()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn settings(url: String) -> ConnectHookSettings {
    ConnectHookSettings {
        url,
        secret: HOOK_SECRET.into(),
        timeout: Duration::from_millis(500),
        concurrency: 8,
        cache_ttl: Duration::ZERO,
        cache_size: 100,
    }
}

async fn server_with(f: impl FnOnce(&mut ConnectHookSettings)) -> (TestServer, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut hook = settings(backend(seen.clone()).await);
    f(&mut hook);
    let mut c = config();
    c.connect_hook = Some(hook);
    (TestServer::with(c).await, seen)
}

/// A WebSocket with `cookie` on its upgrade request, `connect` sent without a token.
async fn ws_with_cookie(s: &TestServer, cookie: &str) -> Ws {
    let mut req = s.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    req.headers_mut()
        .insert("user-agent", "hook-test/1".parse().unwrap());
    let (inner, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect");
    let mut ws = Ws::over(inner);
    ws.send(json!({"op":"connect","client":"test/1","id":1}))
        .await;
    ws
}

/// One poll with `cookie` and no token: the status and the JSON answer.
async fn poll_with_cookie(s: &TestServer, cookie: &str, room: &str) -> (u16, Value) {
    let r = s
        .http
        .post(format!("{}/v1/poll", s.url()))
        .header("cookie", cookie)
        .json(&json!({"hello":true,"rooms":{room:{}},"wait_ms":0}))
        .send()
        .await
        .expect("poll");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn sse_with_cookie(s: &TestServer, cookie: &str, room: &str) -> reqwest::Response {
    s.http
        .get(format!("{}/v1/sse?rooms={room}", s.url()))
        .header("cookie", cookie)
        .send()
        .await
        .expect("sse")
}

fn codes(answer: &Value) -> Vec<String> {
    answer["frames"]
        .as_array()
        .into_iter()
        .flatten()
        .map(
            |f| match ServerFrame::parse(&f.to_string()).expect("frame") {
                ServerFrame::Joined { room, .. } => format!("joined {room}"),
                ServerFrame::Error { code, .. } => format!("error {}", code.as_str()),
                ServerFrame::Connected { terminal, .. } => format!("connected {terminal}"),
                other => format!("{other:?}"),
            },
        )
        .filter(|f| !f.starts_with("Online"))
        .collect()
}

#[tokio::test]
async fn an_allowed_websocket_gets_the_backends_id_and_grants() {
    let (s, seen) = server_with(|_| {}).await;
    let mut ws = ws_with_cookie(&s, "s=alice").await;
    match ws.next().await {
        ServerFrame::Connected { terminal, .. } => assert_eq!(terminal, "alice"),
        other => panic!("expected connected, got {other:?}"),
    }
    joined(&ws.join("live:1", None).await);
    ws.send(json!({"op":"join","room":"other"})).await;
    ws.expect_error("forbidden").await;
    {
        let seen = seen.lock();
        assert_eq!(seen.calls, 1);
        assert_eq!(seen.bad_signatures, 0, "the request was signed");
        assert_eq!(seen.last["transport"], "websocket");
        assert_eq!(seen.last["headers"]["cookie"], "s=alice");
        assert_eq!(seen.last["headers"]["user-agent"], "hook-test/1");
        assert!(
            seen.last["remote"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:")
        );
        assert!(seen.last["ts"].as_u64().is_some());
    }
    // A token goes through JWT verification alone: the backend is not asked.
    let t = s.terminal("viewer", &["x"], false).await;
    drop(t);
    assert_eq!(seen.lock().calls, 1);
}

#[tokio::test]
async fn a_rejected_terminal_gets_the_backends_code_and_message() {
    let (s, _) = server_with(|_| {}).await;
    let mut ws = ws_with_cookie(&s, "s=banned").await;
    assert_eq!(ws.expect_error("forbidden").await, "banned here");
    assert!(ws.try_next().await.is_none());
    assert_eq!(ws.closed.as_ref().map(|c| c.0), Some(4003));
    // An unknown code refuses as `unauthorized`.
    let mut ws = ws_with_cookie(&s, "s=odd").await;
    ws.expect_error("unauthorized").await;

    let (status, body) = poll_with_cookie(&s, "s=banned", "live:1").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body, json!({"error":"forbidden","message":"banned here"}));
    let r = sse_with_cookie(&s, "s=banned", "live:1").await;
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "forbidden");
}

#[tokio::test]
async fn long_poll_and_sse_are_admitted_with_the_backends_grants() {
    let (s, seen) = server_with(|_| {}).await;
    let (status, answer) = poll_with_cookie(&s, "s=alice", "live:2").await;
    assert_eq!(status, 200, "{answer}");
    let got = codes(&answer);
    assert!(got.contains(&"connected alice".to_owned()), "{got:?}");
    assert!(got.contains(&"joined live:2".to_owned()), "{got:?}");
    let (_, answer) = poll_with_cookie(&s, "s=alice", "other").await;
    assert!(codes(&answer).contains(&"error forbidden".to_owned()));
    assert_eq!(seen.lock().last["transport"], "longpoll");
    // A `terminal` in the body (dev mode's anonymous id) names nobody: the backend decides.
    let r = s
        .http
        .post(format!("{}/v1/poll", s.url()))
        .header("cookie", "s=alice")
        .json(&json!({"terminal":"mallory","hello":true,"rooms":{},"wait_ms":0}))
        .send()
        .await
        .expect("poll");
    let answer: Value = r.json().await.unwrap();
    assert!(
        codes(&answer).contains(&"connected alice".to_owned()),
        "{answer}"
    );

    let mut r = sse_with_cookie(&s, "s=alice", "live:3").await;
    assert_eq!(r.status(), 200);
    let chunk = tokio::time::timeout(WAIT, r.chunk())
        .await
        .expect("an event")
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&chunk);
    assert!(text.contains(r#""terminal":"alice""#), "{text}");
    assert_eq!(seen.lock().last["transport"], "sse");
}

#[tokio::test]
async fn polls_reuse_an_allow_within_the_cache_ttl() {
    let (s, seen) = server_with(|h| h.cache_ttl = Duration::from_secs(60)).await;
    for _ in 0..3 {
        let (status, _) = poll_with_cookie(&s, "s=alice", "live:1").await;
        assert_eq!(status, 200);
    }
    assert_eq!(seen.lock().calls, 1, "asked once, reused twice");
    // A reject is not reused; neither is a request without credentials.
    for _ in 0..2 {
        poll_with_cookie(&s, "s=banned", "live:1").await;
    }
    assert_eq!(seen.lock().calls, 3);
    // Without a cache, every poll asks.
    let (s, seen) = server_with(|_| {}).await;
    for _ in 0..2 {
        poll_with_cookie(&s, "s=alice", "live:1").await;
    }
    assert_eq!(seen.lock().calls, 2);
}

#[tokio::test]
async fn no_valid_answer_refuses_with_unavailable() {
    let (s, _) = server_with(|_| {}).await;
    for (cookie, reason) in [
        ("s=slow", "timeout"),
        ("s=garbage", "bad_answer"),
        ("s=bad_id", "bad_answer"),
        ("s=bad_room", "bad_answer"),
        ("s=long", "bad_answer"),
    ] {
        let (status, body) = poll_with_cookie(&s, cookie, "live:1").await;
        assert_eq!(status, 503, "{cookie}: {body}");
        assert_eq!(body["error"], "unavailable", "{cookie}: {body}");
        let metrics = s.get_raw_with_key("/metrics").await;
        assert!(
            metrics.contains(&format!(
                r#"livepush_connect_hook_failures_total{{reason="{reason}"}}"#
            )),
            "{cookie}: {metrics}"
        );
    }
    // Over WebSocket: an `unavailable` error and close 1013 (try again later), not 4003.
    let mut ws = ws_with_cookie(&s, "s=garbage").await;
    ws.expect_error("unavailable").await;
    assert!(ws.try_next().await.is_none());
    assert_eq!(ws.closed.as_ref().map(|c| c.0), Some(1013));
}

#[tokio::test]
async fn a_backend_that_is_down_refuses_with_unavailable() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let mut c = config();
    c.connect_hook = Some(settings(url));
    let s = TestServer::with(c).await;
    let (status, body) = poll_with_cookie(&s, "s=alice", "live:1").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("cannot be reached"),
        "{body}"
    );
    let r = sse_with_cookie(&s, "s=alice", "live:1").await;
    assert_eq!(r.status(), 503);
    let metrics = s.get_raw_with_key("/metrics").await;
    assert!(
        metrics.contains(r#"livepush_connect_hook_failures_total{reason="error"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn past_the_concurrency_bound_a_terminal_is_refused_at_once() {
    let (s, _) = server_with(|h| {
        h.concurrency = 1;
        h.timeout = Duration::from_secs(5);
    })
    .await;
    let slow = {
        let http = s.http.clone();
        let url = format!("{}/v1/poll", s.url());
        tokio::spawn(async move {
            http.post(url)
                .header("cookie", "s=slow")
                .json(&json!({"rooms":{},"wait_ms":0}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    // Wait until the slow request holds the one permit.
    let deadline = Instant::now() + WAIT;
    loop {
        let started = Instant::now();
        let (status, body) = poll_with_cookie(&s, "s=alice", "live:1").await;
        if status == 503 {
            assert_eq!(body["error"], "unavailable");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "refused at once"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the bound never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = s.get_raw_with_key("/metrics").await;
    assert!(
        metrics.contains(r#"livepush_connect_hook_failures_total{reason="busy"}"#),
        "{metrics}"
    );
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "the slow one is admitted"
    );
}

/// `expires_in` ends the session as a token's `exp` does: a poll parked for 20 s answers
/// once it has passed.
#[tokio::test]
async fn expires_in_ends_the_session_like_a_tokens_exp() {
    let (s, _) = server_with(|_| {}).await;
    let started = Instant::now();
    let r = s
        .http
        .post(format!("{}/v1/poll", s.url()))
        .header("cookie", "s=brief")
        .json(&json!({"rooms":{},"wait_ms":20_000}))
        .send()
        .await
        .expect("poll");
    assert_eq!(r.status(), 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(5),
        "answered after {waited:?}"
    );
}

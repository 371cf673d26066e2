//! The send hook (contract v1.1): a terminal's `send` goes to the backend first, signed.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use livepush_proto::ServerFrame;
use livepush_server::config::{HookFailure, SendHookSettings};
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::support::*;

const HOOK_SECRET: &str = "hook-secret-0123456789";

/// A backend that checks each request's signature and answers by `data.k`.
async fn backend(bad_signatures: Arc<Mutex<u32>>) -> String {
    let app = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: Bytes| {
            let bad = bad_signatures.clone();
            async move {
                let want = livepush_server::hooks::signature(HOOK_SECRET.as_bytes(), &body);
                if headers
                    .get("x-livepush-signature")
                    .and_then(|v| v.to_str().ok())
                    != Some(want.as_str())
                {
                    *bad.lock() += 1;
                }
                let req: Value = serde_json::from_slice(&body).unwrap_or_default();
                assert_eq!(req["terminal"], "talker");
                assert_eq!(req["room"], "chat");
                match req["data"]["k"].as_str().unwrap_or_default() {
                    "allow" => json!({"action":"allow"}).to_string(),
                    "rude" => json!({"action":"rewrite","data":{"k":"***"}}).to_string(),
                    "reject" => json!({"action":"reject","code":"forbidden","message":"no spam"})
                        .to_string(),
                    "odd_code" => json!({"action":"reject","code":"nope"}).to_string(),
                    "slow" => {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        json!({"action":"allow"}).to_string()
                    }
                    _ => json!({"action":"maybe"}).to_string(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

async fn server_with_hook(failure: HookFailure) -> (TestServer, Arc<Mutex<u32>>) {
    let bad = Arc::new(Mutex::new(0));
    let mut c = config();
    c.send_hook = Some(SendHookSettings {
        url: backend(bad.clone()).await,
        secret: HOOK_SECRET.into(),
        timeout: Duration::from_millis(300),
        failure,
        concurrency: 8,
    });
    (TestServer::with(c).await, bad)
}

/// What the other member of the room receives next (its chat data).
async fn heard(t: &mut Ws) -> Value {
    loop {
        if let ServerFrame::Msg(m) = t.next().await {
            return m.data;
        }
    }
}

#[tokio::test]
async fn the_backend_allows_rewrites_or_rejects_each_send() {
    let (s, bad) = server_with_hook(HookFailure::Closed).await;
    let mut listener = s.terminal("listener", &["chat"], false).await;
    joined(&listener.join("chat", None).await);
    let mut talker = s.terminal("talker", &["chat"], true).await;
    joined(&talker.join("chat", None).await);
    let say = |k: &str| json!({"op":"send","room":"chat","type":"chat","data":{"k":k},"id":7});

    talker.send(say("allow")).await;
    assert_eq!(heard(&mut listener).await, json!({"k":"allow"}));
    talker.send(say("rude")).await;
    assert_eq!(heard(&mut listener).await, json!({"k":"***"}));
    talker.send(say("reject")).await;
    assert_eq!(talker.expect_error("forbidden").await, "no spam");
    talker.send(say("odd_code")).await;
    talker.expect_error("forbidden").await;
    // No answer in time, or an answer that is none of the three: refused (closed).
    talker.send(say("slow")).await;
    talker.expect_error("unavailable").await;
    talker.send(say("garbage")).await;
    talker.expect_error("unavailable").await;
    // The listener heard nothing of the refused ones: the next thing it hears is this.
    talker.send(say("allow")).await;
    assert_eq!(heard(&mut listener).await, json!({"k":"allow"}));
    assert_eq!(*bad.lock(), 0, "every hook request was signed");
    let metrics = s.get_raw_with_key("/metrics").await;
    assert!(
        metrics.contains(r#"livepush_send_hook_failures_total{reason="timeout"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_failing_hook_lets_sends_through_when_open() {
    let (s, _) = server_with_hook(HookFailure::Open).await;
    let mut listener = s.terminal("listener", &["chat"], false).await;
    joined(&listener.join("chat", None).await);
    let mut talker = s.terminal("talker", &["chat"], true).await;
    joined(&talker.join("chat", None).await);
    talker
        .send(json!({"op":"send","room":"chat","type":"chat","data":{"k":"slow"}}))
        .await;
    assert_eq!(heard(&mut listener).await, json!({"k":"slow"}));
}

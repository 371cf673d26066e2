//! Every error code of the contract, mute and close.

use std::sync::Arc;

use livepush_proto::ServerFrame;
use serde_json::json;

use crate::faulty::FaultyStore;
use crate::support::*;

#[tokio::test]
async fn bad_frame() {
    let s = TestServer::start().await;
    let mut t = s.terminal("t", &["r"], false).await;
    t.send_text("this is not json").await;
    t.expect_error("bad_frame").await;
    t.send(json!({"op":"teleport","id":3})).await;
    match t.next().await {
        ServerFrame::Error {
            id, code, message, ..
        } => {
            assert_eq!(id, Some(3));
            assert_eq!(code.as_str(), "bad_frame");
            assert!(message.contains("unknown op"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    t.send(json!({"op":"join","room":"no spaces allowed"}))
        .await;
    t.expect_error("bad_frame").await;
    // The connection survives bad frames.
    t.send(json!({"op":"ping","id":9})).await;
    assert_eq!(t.next().await, ServerFrame::Pong { id: Some(9) });
    // Several frames in one WebSocket message, one bad.
    t.send_text("{\"op\":\"ping\",\"id\":1}\n{oops\n{\"op\":\"ping\",\"id\":2}")
        .await;
    assert_eq!(t.next().await, ServerFrame::Pong { id: Some(1) });
    t.expect_error("bad_frame").await;
    assert_eq!(t.next().await, ServerFrame::Pong { id: Some(2) });
}

#[tokio::test]
async fn unauthorized() {
    let s = TestServer::start().await;
    // A bad token.
    let mut t = Ws::open(&s.ws_url()).await;
    t.send(json!({"op":"connect","token":"garbage"})).await;
    t.expect_error("unauthorized").await;
    assert!(t.try_next().await.is_none(), "closed after unauthorized");
    assert_eq!(t.closed.as_ref().map(|c| c.0), Some(4003));
    // No token outside dev mode.
    let mut t = Ws::open(&s.ws_url()).await;
    t.send(json!({"op":"connect"})).await;
    t.expect_error("unauthorized").await;
    // The API key is not a token.
    let mut t = Ws::open(&s.ws_url()).await;
    t.send(json!({"op":"connect","token":KEY})).await;
    t.expect_error("unauthorized").await;
    // A first frame that is not connect.
    let mut t = Ws::open(&s.ws_url()).await;
    t.send(json!({"op":"join","room":"r"})).await;
    t.expect_error("unauthorized").await;
    // An expired token.
    let old = livepush_server::auth::TokenKeys::new(SECRET)
        .mint(&livepush_server::auth::Claims {
            sub: "t".into(),
            exp: 1,
            rooms: vec!["*".into()],
            send: false,
        })
        .unwrap();
    let mut t = Ws::open(&s.ws_url()).await;
    t.send(json!({"op":"connect","token":old})).await;
    let m = t.expect_error("unauthorized").await;
    assert!(m.contains("expired"), "{m}");
}

#[tokio::test]
async fn dev_mode_accepts_anonymous_terminals() {
    let mut c = config();
    c.dev = true;
    let s = TestServer::with(c).await;
    let mut t = Ws::open(&s.ws_url()).await;
    t.send(json!({"op":"connect"})).await;
    match t.next().await {
        ServerFrame::Connected { terminal, .. } => assert!(terminal.starts_with("anon-")),
        other => panic!("{other:?}"),
    }
    let (_, _, recovered) = joined(&t.join("any:room", None).await);
    assert!(recovered);
}

#[tokio::test]
async fn forbidden() {
    let s = TestServer::start().await;
    let mut t = s.terminal("t", &["live:*"], false).await;
    t.send(json!({"op":"join","room":"other"})).await;
    t.expect_error("forbidden").await;
    t.send(json!({"op":"pull","room":"other","since":0})).await;
    t.expect_error("forbidden").await;
    t.join("live:1", None).await;
    // No send grant.
    t.send(json!({"op":"send","room":"live:1","type":"chat","data":{"text":"x"}}))
        .await;
    t.expect_error("forbidden").await;
    // With the grant, but not joined.
    let mut u = s.terminal("u", &["live:*"], true).await;
    u.send(json!({"op":"send","room":"live:1","data":{"text":"x"}}))
        .await;
    u.expect_error("forbidden").await;
    // Joined, but a reliable type.
    u.join("live:1", None).await;
    u.send(json!({"op":"send","room":"live:1","type":"gift","data":{}}))
        .await;
    u.expect_error("forbidden").await;
}

#[tokio::test]
async fn send_is_delivered_rate_limited_and_capped() {
    let mut c = config();
    c.limits.send_rate = 1;
    c.limits.send_burst = 3;
    c.limits.max_send_bytes = 100;
    let s = TestServer::with(c).await;
    let mut a = s.terminal("a", &["r"], true).await;
    let mut b = s.terminal("b", &["r"], false).await;
    a.join("r", None).await;
    b.join("r", None).await;
    a.send(json!({"op":"send","room":"r","type":"chat","data":{"text":"hello"}}))
        .await;
    match b.next_significant().await {
        ServerFrame::Msg(m) => {
            assert_eq!(m.data, json!({"text":"hello"}));
            assert_eq!(m.seq, None);
        }
        other => panic!("{other:?}"),
    }
    a.send(json!({"op":"send","room":"r","data":{"text":"x".repeat(200)}}))
        .await;
    a.expect_error("too_large").await;
    for _ in 0..3 {
        a.send(json!({"op":"send","room":"r","data":{"text":"spam"}}))
            .await;
    }
    a.expect_error("rate_limited").await;
}

#[tokio::test]
async fn too_large_frame() {
    let mut c = config();
    c.limits.max_frame_bytes = 1024;
    let s = TestServer::with(c).await;
    let mut t = s.terminal("t", &["r"], true).await;
    t.send_text(&format!(
        "{{\"op\":\"ping\",\"pad\":\"{}\"}}",
        "x".repeat(2000)
    ))
    .await;
    t.expect_error("too_large").await;
    // Still usable.
    t.send(json!({"op":"ping"})).await;
    assert_eq!(t.next().await, ServerFrame::Pong { id: None });
    // Far beyond: it cannot even be read, so the server says why and ends the connection
    // (tungstenite refuses to write a close frame after a read error, so the end may come
    // without one).
    t.send_text(&"y".repeat(10_000)).await;
    t.expect_error("too_large").await;
    assert!(t.try_next().await.is_none());
    assert!(
        t.closed.as_ref().is_none_or(|c| c.0 == 1009),
        "{:?}",
        t.closed
    );
}

#[tokio::test]
async fn frame_rate_limit() {
    let mut c = config();
    c.limits.frame_rate = 1;
    c.limits.frame_burst = 5;
    let s = TestServer::with(c).await;
    let mut t = s.terminal("t", &["r"], false).await;
    let batch: Vec<String> = (0..10)
        .map(|i| format!("{{\"op\":\"ping\",\"id\":{i}}}"))
        .collect();
    t.send_text(&batch.join("\n")).await;
    for i in 0..5 {
        assert_eq!(t.next().await, ServerFrame::Pong { id: Some(i) });
    }
    t.expect_error("rate_limited").await;
}

#[tokio::test]
async fn mute_and_unmute() {
    let s = TestServer::start().await;
    let mut a = s.terminal("a", &["r"], true).await;
    a.join("r", None).await;
    s.publish("r", "control", json!({"action":"mute"})).await;
    match a.next_significant().await {
        ServerFrame::Msg(m) => assert_eq!((m.ty.as_str(), m.seq), ("control", Some(1))),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.room("r").await["muted"], true);
    a.send(json!({"op":"send","room":"r","data":{"text":"hi"}}))
        .await;
    a.expect_error("muted").await;
    s.publish("r", "control", json!({"action":"unmute"})).await;
    a.reliable(1).await;
    a.send(json!({"op":"send","room":"r","data":{"text":"hi"}}))
        .await;
    match a.next_significant().await {
        ServerFrame::Msg(m) => assert_eq!(m.data, json!({"text":"hi"})),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn close_and_open() {
    let s = TestServer::start().await;
    let mut a = s.terminal("a", &["r"], false).await;
    a.join("r", None).await;
    s.publish(
        "r",
        "control",
        json!({"action":"close","reason":"show over"}),
    )
    .await;
    match a.next_significant().await {
        ServerFrame::Msg(m) => assert_eq!(m.data["action"], "close"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        a.next_significant().await,
        ServerFrame::Left {
            id: None,
            room: "r".into()
        }
    );
    let info = s.room("r").await;
    assert_eq!(
        (info["closed"].clone(), info["online"].clone()),
        (json!(true), json!(0))
    );
    a.send(json!({"op":"join","room":"r"})).await;
    a.expect_error("room_closed").await;
    s.publish("r", "control", json!({"action":"open"})).await;
    let (_, seq, _) = joined(&a.join("r", None).await);
    assert_eq!(seq, 2);
    // A stream switch is just delivered.
    s.publish(
        "r",
        "control",
        json!({"action":"stream_switch","url":"rtmp://x"}),
    )
    .await;
    match a.next_significant().await {
        ServerFrame::Msg(m) => assert_eq!(m.data["action"], "stream_switch"),
        other => panic!("{other:?}"),
    }
    // Unknown actions are refused at publish.
    let (status, body) = s
        .post(
            "/v1/rooms/r/messages",
            json!({"type":"control","data":{"action":"explode"}}),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
}

#[tokio::test]
async fn internal() {
    let s = TestServer::with_store(Arc::new(FaultyStore::unreadable("broken"))).await;
    let mut t = s.terminal("t", &["*"], false).await;
    t.send(json!({"op":"join","room":"broken","id":1})).await;
    match t.next().await {
        ServerFrame::Error {
            id, code, message, ..
        } => {
            assert_eq!((id, code.as_str()), (Some(1), "internal"));
            assert!(
                !message.contains("fire"),
                "internals are not leaked: {message}"
            );
        }
        other => panic!("{other:?}"),
    }
    let (status, body) = s
        .post(
            "/v1/rooms/broken/messages",
            json!({"type":"gift","data":{}}),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (500, Some("internal")));
}

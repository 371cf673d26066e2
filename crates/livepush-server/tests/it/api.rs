//! The HTTP API: auth, validation, JSON errors, history paging, room info.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn api_key_is_required() {
    let s = TestServer::start().await;
    let url = format!("{}/v1/rooms/r/messages", s.url());
    let r = s
        .http
        .post(&url)
        .json(&json!({"type":"gift","data":{}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
    let r = s
        .http
        .post(&url)
        .bearer_auth("wrong")
        .json(&json!({"type":"gift","data":{}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A terminal token is not an API key.
    let token = s.token("t", &["*"], true);
    let r = s
        .http
        .post(&url)
        .bearer_auth(token)
        .json(&json!({"type":"gift","data":{}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Health needs no key.
    let r = s.get_raw("/healthz").await;
    assert_eq!(r.status(), 200);
}

/// RFC 7235 §2.1: the auth scheme is case-insensitive, and one or more spaces separate it
/// from the credentials.
#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let s = TestServer::start().await;
    let url = format!("{}/v1/rooms/r/messages", s.url());
    let with = |auth: String| {
        s.http
            .post(&url)
            .header("authorization", auth)
            .json(&json!({"type":"gift","data":{}}))
            .send()
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        for gap in [" ", "  "] {
            let r = with(format!("{scheme}{gap}{KEY}")).await.unwrap();
            assert_eq!(r.status(), 200, "{scheme:?}{gap:?}");
        }
    }
    for wrong in [
        format!("Basic {KEY}"),
        format!("Bearer{KEY}"),
        format!("Bearer {KEY}x"),
        KEY.to_owned(),
    ] {
        let r = with(wrong.clone()).await.unwrap();
        assert_eq!(r.status(), 401, "{wrong:?}");
    }
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let mut c = config();
    c.limits.max_publish_bytes = 1000;
    let s = TestServer::with(c).await;
    let cases = [
        (
            "/v1/rooms/r/messages",
            json!({"data":{}}),
            400,
            "bad_request",
        ),
        (
            "/v1/rooms/r/messages",
            json!({"type":"bad type","data":{}}),
            400,
            "bad_request",
        ),
        (
            "/v1/rooms/r/messages",
            json!({"type":"gift"}),
            400,
            "bad_request",
        ),
        (
            "/v1/rooms/r/messages",
            json!({"type":"gift","data":{},"class":"sometimes"}),
            400,
            "bad_request",
        ),
        (
            "/v1/rooms/r/messages",
            json!({"type":"control","data":{"action":"close"},"class":"transient"}),
            400,
            "bad_request",
        ),
        (
            "/v1/rooms/bad%20room/messages",
            json!({"type":"gift","data":{}}),
            400,
            "bad_request",
        ),
        (
            "/v1/rooms/r/messages",
            json!({"type":"gift","data":{"x":"y".repeat(2000)}}),
            413,
            "too_large",
        ),
    ];
    for (path, body, status, code) in cases {
        let (st, b) = s.post(path, body.clone()).await;
        assert_eq!(
            (st, b["error"].as_str()),
            (status, Some(code)),
            "{path} {body}: {b}"
        );
        assert!(b["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Not JSON at all.
    let r = s
        .http
        .post(format!("{}/v1/rooms/r/messages", s.url()))
        .bearer_auth(KEY)
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["error"], "bad_request");
    // Unknown endpoints and methods.
    let (st, b) = s.get("/v1/nothing").await;
    assert_eq!((st, b["error"].as_str()), (404, Some("not_found")));
    let (st, b) = s.get("/v1/rooms/r/messages").await;
    assert_eq!(st, 405, "{b}");
    // /v1/connect without an upgrade.
    let (st, b) = s.get("/v1/connect").await;
    assert_eq!((st, b["error"].as_str()), (400, Some("bad_request")));
}

#[tokio::test]
async fn room_info_and_history() {
    let s = TestServer::start().await;
    let (st, b) = s.get("/v1/rooms/never").await;
    assert_eq!((st, b["error"].as_str()), (404, Some("unknown_room")));
    let (st, _) = s.get("/v1/rooms/never/history").await;
    assert_eq!(st, 404);
    let first = s.publish("h", "gift", json!({"n": 1})).await;
    let epoch = first["epoch"].as_str().unwrap().to_owned();
    assert_eq!(first["seq"], 1);
    for n in 2..=10 {
        s.publish("h", "quiz", json!({"n": n})).await;
    }
    let info = s.room("h").await;
    assert_eq!(
        info,
        json!({"room":"h","epoch":epoch,"seq":10,"online":0,"muted":false,"closed":false})
    );
    let (_, h) = s.get("/v1/rooms/h/history?since=3&limit=4").await;
    assert_eq!(h["epoch"], epoch);
    assert_eq!(h["seq"], 10);
    let seqs: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![4, 5, 6, 7]);
    assert_eq!(h["messages"][0]["data"], json!({"n": 4}));
    assert_eq!(h["messages"][0]["op"], "msg");
    let (st, b) = s.get("/v1/rooms/h/history?since=-1").await;
    assert_eq!((st, b["error"].as_str()), (400, Some("bad_request")));
    // A room only joined also exists.
    let mut t = s.terminal("t", &["joined-only"], false).await;
    t.join("joined-only", None).await;
    assert_eq!(s.room("joined-only").await["online"], 1);
}

#[tokio::test]
async fn metrics_are_exported() {
    let s = TestServer::start().await;
    s.publish("m", "gift", json!({})).await;
    let r = s
        .http
        .get(format!("{}/metrics", s.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("livepush_published_total{class=\"reliable\"} 1"),
        "{text}"
    );
    // Latencies: publish to answer (the store's share) and publish to fan-out.
    assert!(
        text.contains("livepush_publish_seconds_count{class=\"reliable\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("livepush_fanout_delay_seconds_count 1"),
        "{text}"
    );
    assert!(
        !text.contains("livepush_engine_calls"),
        "no shared backend on one node"
    );
}

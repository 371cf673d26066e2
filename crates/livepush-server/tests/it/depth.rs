//! `max_json_depth`: a `data` value nested deeper than the limit is refused wherever it comes
//! in (publish and inbox post: HTTP 400; terminal `send` over WebSocket and long-poll:
//! `bad_frame`), so no message reaches clients that they cannot decode.

use livepush_proto::ServerFrame;
use serde_json::{Value, json};

use crate::support::*;

/// An array nested `levels` deep.
fn nested(levels: usize) -> Value {
    (0..levels).fold(json!(1), |v, _| json!([v]))
}

#[tokio::test]
async fn data_nested_deeper_than_max_json_depth_is_refused_everywhere() {
    let s = TestServer::start().await;
    let max = config().limits.max_json_depth;
    assert_eq!(max, 32);

    // HTTP: publish and inbox post.
    for path in ["/v1/rooms/r/messages", "/v1/terminals/offline/messages"] {
        let (st, b) = s
            .post(path, json!({"type":"gift","data":nested(max + 1)}))
            .await;
        assert_eq!(
            (st, b["error"].as_str()),
            (400, Some("bad_request")),
            "{path}"
        );
        assert!(
            b["message"].as_str().unwrap().contains("max_json_depth"),
            "{b}"
        );
        let (st, b) = s
            .post(path, json!({"type":"gift","data":nested(max)}))
            .await;
        assert_eq!(st, 200, "{path}: {b}");
    }

    // WebSocket send: a bad_frame with the request's id, the connection stays usable.
    let mut t = s.terminal("t", &["*"], true).await;
    t.join("chat:1", None).await;
    t.send(json!({"op":"send","id":7,"room":"chat:1","type":"chat","data":nested(200)}))
        .await;
    let m = t.expect_error("bad_frame").await;
    assert!(m.contains("max_json_depth"), "{m}");
    t.send(json!({"op":"send","room":"chat:1","type":"chat","data":nested(max)}))
        .await;
    loop {
        match t.next().await {
            ServerFrame::Msg(m) => {
                assert_eq!(m.data, nested(max));
                break;
            }
            ServerFrame::Online { .. } => continue,
            other => panic!("expected the chat message, got {other:?}"),
        }
    }

    // Long-poll op: the same error frame in the answer, nothing sent to the room.
    let token = s.token("lp", &["*"], true);
    let frames = s
        .poll(
            "/v1/poll",
            json!({"token":token,"rooms":{"chat:1":{}},"wait_ms":0,
                   "ops":[{"op":"send","id":3,"room":"chat:1","type":"chat","data":nested(200)}]}),
        )
        .await;
    let errors: Vec<_> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Error { id, code, .. } => Some((*id, code.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(errors, vec![(Some(3), "bad_frame")], "{frames:?}");
    assert!(
        !frames.iter().any(|f| matches!(f, ServerFrame::Msg(_))),
        "{frames:?}"
    );
}

/// The limit is the configured one on every way in, not the default.
#[tokio::test]
async fn max_json_depth_is_the_configured_value() {
    let mut c = config();
    c.limits.max_json_depth = 40;
    let s = TestServer::with(c).await;
    let (st, b) = s
        .post(
            "/v1/rooms/r/messages",
            json!({"type":"gift","data":nested(40)}),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let mut t = s.terminal("t", &["*"], true).await;
    t.join("chat:1", None).await;
    t.send(json!({"op":"send","room":"chat:1","type":"chat","data":nested(40)}))
        .await;
    loop {
        match t.next().await {
            ServerFrame::Msg(m) => break assert_eq!(m.data, nested(40)),
            ServerFrame::Online { .. } => continue,
            other => panic!("expected the chat message, got {other:?}"),
        }
    }
    t.send(json!({"op":"send","room":"chat:1","type":"chat","data":nested(41)}))
        .await;
    t.expect_error("bad_frame").await;
}

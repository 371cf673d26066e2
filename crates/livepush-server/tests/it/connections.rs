//! Connection-level bounds: what a client that floods, stops reading or holds a request open
//! gets, and that the server stays bounded meanwhile.

use futures_util::{SinkExt, StreamExt};
use livepush_proto::{ServerFrame, split_frames};
use serde_json::json;
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

//! Connection-level bounds: what a client that floods, stops reading or holds a request open
//! gets, and that the server stays bounded meanwhile.

use std::time::Duration;

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

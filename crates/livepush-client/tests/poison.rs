//! Frames whose `data` the SDK cannot decode (nested deeper than serde_json's recursion
//! limit, as a server without a nesting limit lets through): each is reported as an
//! [`Event::Error`] and skipped, its seq still counts (no gap, no pull, no replay loop), and
//! the frames around it in the same batch are delivered.

mod common;

use common::*;
use livepush_client::{Client, ErrorCode, Event};
use serde_json::{Value, json};

const ROOM: &str = "live:1";

/// A `data` value nested 200 levels deep.
fn deep() -> Value {
    (0..200).fold(json!(1), |v, _| json!([v]))
}

fn deep_msg(seq: u64) -> Value {
    json!({"op": "msg", "room": ROOM, "type": "gift", "data": deep(), "seq": seq, "ts": 1})
}

/// The next event is the report of an undecodable message of ROOM with `seq`.
async fn expect_skipped(events: &mut livepush_client::Events, seq: Option<u64>) {
    match next_event(events).await {
        Event::Error {
            code: ErrorCode::BadFrame,
            message,
            room,
        } => {
            assert_eq!(room.as_deref(), Some(ROOM), "{message}");
            assert!(message.contains("skipped"), "{message}");
            if let Some(seq) = seq {
                assert!(message.contains(&format!("seq {seq}")), "{message}");
            }
        }
        other => panic!("expected the report of an undecodable message, got {other:?}"),
    }
}

#[tokio::test]
async fn over_websocket_an_undecodable_message_is_reported_and_skipped() {
    let (_server, client, mut events, mut conn) = joined_ws_client(ROOM).await;
    let deep_chat = json!({"op": "msg", "room": ROOM, "type": "chat", "data": deep(), "ts": 1});
    conn.send(&[
        msg(ROOM, 1),
        deep_msg(2),
        msg(ROOM, 3),
        deep_chat,
        chat(ROOM, "after"),
    ])
    .await;
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![1]);
    expect_skipped(&mut events, Some(2)).await;
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![3]);
    expect_skipped(&mut events, None).await;
    assert!(
        matches!(next_event(&mut events).await, Event::Transient(m) if m.data["text"] == "after")
    );
    // A pulled answer with an undecodable message in it: the others are delivered.
    conn.send(&[json!({"op": "prompt", "room": ROOM, "seq": 6})])
        .await;
    let (_, since, _, id) = conn.expect_pull().await;
    assert_eq!(since, 3);
    let mut answer = pulled(id, ROOM, "e1", 6, [4, 6]);
    answer["messages"]
        .as_array_mut()
        .unwrap()
        .insert(1, deep_msg(5));
    conn.send(&[answer, msg(ROOM, 7)]).await;
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![4]);
    expect_skipped(&mut events, Some(5)).await;
    assert_eq!(next_seqs(&mut events, ROOM, 2).await, vec![6, 7]);
    assert_eq!(client.position(ROOM), Some(pos("e1", 7)));
}

#[tokio::test]
async fn over_long_poll_an_undecodable_message_moves_the_position_on() {
    let (mut polls, _client, mut events) =
        polling_client(ROOM, 0, &[msg(ROOM, 1), deep_msg(2), msg(ROOM, 3)]).await;
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![1]);
    expect_skipped(&mut events, Some(2)).await;
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![3]);
    // The next poll goes on from seq 3: the undecodable message is not asked for again.
    let next = polls.next().await;
    assert_eq!(next.position(ROOM), Some(pos("e1", 3)));
}

/// Over SSE: the undecodable message in the middle of an event is reported and skipped, the
/// ones around it are delivered, and the stream is not reopened for it (a reopen would replay
/// it: the hot loop this guards against).
#[tokio::test]
async fn over_sse_an_undecodable_message_is_reported_and_skipped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = livepush_client::ClientConfig {
        server: format!("http://{}", listener.local_addr().unwrap()),
        transport: livepush_client::TransportMode::Sse,
        token: Some("tok".into()),
        ..livepush_client::ClientConfig::default()
    };
    let (client, mut events) = Client::connect(config).unwrap();
    client.join(ROOM, None).await.unwrap();
    let (mut stream, _) = tokio::time::timeout(STEP, listener.accept())
        .await
        .expect("the SSE request")
        .unwrap();
    let mut head = vec![0u8; 4096];
    let n = stream.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("GET /v1/sse?"));
    let mut connected = connected_lp("t1", json!({"seq": 0, "acked": 0, "pending": 0}));
    connected["transport"] = json!("sse");
    let event = |frames: &[Value]| {
        let lines: Vec<String> = frames.iter().map(|f| format!("data: {f}\n")).collect();
        format!("{}\n", lines.concat())
    };
    let body = format!(
        "{}{}",
        event(&[connected, joined(None, ROOM, "e1", 0, true)]),
        event(&[msg(ROOM, 1), deep_msg(2), msg(ROOM, 3)])
    );
    stream
        .write_all(
            format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n{body}").as_bytes(),
        )
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut events).await,
        Event::Connected { .. }
    ));
    assert!(matches!(
        next_event(&mut events).await,
        Event::Joined { .. }
    ));
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![1]);
    expect_skipped(&mut events, Some(2)).await;
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![3]);
    assert_eq!(client.position(ROOM), Some(pos("e1", 3)));
    let reopened = tokio::time::timeout(std::time::Duration::from_millis(500), listener.accept());
    assert!(reopened.await.is_err(), "the stream was reopened");
    drop(stream);
}

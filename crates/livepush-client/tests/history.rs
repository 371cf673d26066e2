//! The SDK against a scripted WebSocket server whose history changes under a live room
//! (contract v1.1): a new history pushed with `joined` (decision 8), and a pull from beyond
//! the server's latest seq (decision 7).

mod common;

use std::time::Duration;

use common::*;
use livepush_client::{Client, Event};
use serde_json::json;

const ROOM: &str = "live:1";

/// Nothing more from the client for a while: no join, no pull.
async fn quiet(conn: &mut Conn) {
    let got = conn.recv_within(Duration::from_millis(300)).await;
    assert!(matches!(got, Ok(None)), "the client sent {got:?}");
}

#[tokio::test]
async fn a_history_pushed_while_live_is_adopted_without_rejoin_or_pull() {
    let (server, client, mut events, mut conn) = joined_ws_client(ROOM).await;
    conn.send(&[msg(ROOM, 1), msg(ROOM, 2), msg(ROOM, 5)]).await;
    assert_eq!(next_seqs(&mut events, ROOM, 2).await, vec![1, 2]);
    let (_, since, _, pull_id) = conn.expect_pull().await;
    assert_eq!(since, 2, "the gap before 5 is being pulled");

    // The server's store lost the room: it pushes the new history (no id: not an answer).
    conn.send(&[joined(None, ROOM, "e2", 0, false)]).await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Joined {
            room: ROOM.into(),
            epoch: "e2".into(),
            seq: 0,
            recovered: false,
            resumed: true,
            online: 1
        }
    );
    assert_eq!(client.position(ROOM), Some(pos("e2", 0)));
    // The old history's pull answer crossed the push; then the new history goes on live.
    conn.send(&[
        pulled(pull_id, ROOM, "e1", 5, 3..=5),
        msg(ROOM, 1),
        msg(ROOM, 2),
    ])
    .await;
    for seq in 1..=2 {
        match next_event(&mut events).await {
            Event::Message(m) => assert_eq!((m.epoch.as_str(), m.seq), ("e2", seq)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(client.position(ROOM), Some(pos("e2", 2)));
    quiet(&mut conn).await;

    // A new history that continues after seq 7: the client continues from there too,
    // expecting nothing before it.
    conn.send(&[joined(None, ROOM, "e3", 7, false), msg(ROOM, 8)])
        .await;
    assert!(matches!(
        next_event(&mut events).await,
        Event::Joined { ref epoch, seq: 7, recovered: false, .. } if epoch == "e3"
    ));
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![8]);
    quiet(&mut conn).await;

    // After a reconnect the room resumes in the new history.
    drop(conn);
    assert!(matches!(
        next_event(&mut events).await,
        Event::Disconnected { .. }
    ));
    let mut conn = server.accept().await;
    conn.handshake("t1").await;
    let (_, since, _) = conn.expect_join().await;
    assert_eq!(since, Some(pos("e3", 8)));
}

#[tokio::test]
async fn a_joined_without_id_while_a_join_is_pending_waits_for_its_answer() {
    let server = FakeServer::start().await;
    let (client, mut events) = Client::connect(server.config()).unwrap();
    client.join(ROOM, Some(pos("e1", 2))).await.unwrap();
    let mut conn = server.accept().await;
    let id = conn.join_resuming(ROOM, pos("e1", 2)).await;
    assert!(matches!(
        next_event(&mut events).await,
        Event::Connected { .. }
    ));
    // Not the answer to the join in flight, and the room is not live yet: ignored.
    conn.send(&[joined(None, ROOM, "e9", 0, false)]).await;
    conn.send(&[joined(id, ROOM, "e1", 3, true), msg(ROOM, 3)])
        .await;
    assert!(matches!(
        next_event(&mut events).await,
        Event::Joined { ref epoch, seq: 3, recovered: true, .. } if epoch == "e1"
    ));
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![3]);
    assert_eq!(client.position(ROOM), Some(pos("e1", 3)));
}

#[tokio::test]
async fn a_pull_from_beyond_the_latest_seq_moves_the_position_back_once() {
    let (_server, client, mut events, mut conn) = joined_ws_client(ROOM).await;
    let live: Vec<_> = (1..=10).map(|s| msg(ROOM, s)).collect();
    conn.send(&live).await;
    assert_eq!(next_seqs(&mut events, ROOM, 10).await.len(), 10);
    conn.send(&[json!({"op": "online", "room": ROOM, "count": 4})])
        .await;
    assert!(matches!(
        next_event(&mut events).await,
        Event::Online { count: 4, .. }
    ));

    // The server lost 5..=10 after delivering them: a pull from 10 is beyond its latest.
    conn.send(&[json!({"op": "prompt", "room": ROOM, "seq": 12})])
        .await;
    let (_, since, _, id) = conn.expect_pull().await;
    assert_eq!(since, 10);
    conn.send(&[
        json!({"op": "pulled", "id": id, "room": ROOM, "epoch": "e1", "seq": 4,
                       "recovered": false, "messages": []}),
    ])
    .await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Joined {
            room: ROOM.into(),
            epoch: "e1".into(),
            seq: 4,
            recovered: false,
            resumed: true,
            online: 4
        }
    );
    assert_eq!(client.position(ROOM), Some(pos("e1", 4)));
    quiet(&mut conn).await;
    // The server's new messages reuse the seqs after 4.
    conn.send(&[msg(ROOM, 5)]).await;
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![5]);
}

//! The SDK against a scripted fake server: connect, resume, gap filling, prompts, the
//! watchdog, auth refusals and back-pressure.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use livepush_client::{Client, ClientConfig, DisconnectReason, ErrorCode, Event, Transport};
use livepush_proto::ClientFrame;
use serde_json::json;

const ROOM: &str = "live:1";

#[tokio::test]
async fn connects_joins_and_receives_reliable_and_transient() {
    let server = FakeServer::start().await;
    let (client, mut events) = Client::connect(ClientConfig {
        token: Some("tok".into()),
        ..server.config()
    })
    .unwrap();
    // Registered before the connection is up; joined once it is.
    client.join(ROOM, None).await.unwrap();
    assert_eq!(client.position(ROOM), None);

    let mut conn = server.accept().await;
    assert_eq!(conn.handshake("t1").await.as_deref(), Some("tok"));
    let (room, since, id) = conn.expect_join().await;
    assert_eq!(room, ROOM);
    assert_eq!(since, None);
    assert!(id.is_some(), "joins carry an id");
    // Several frames in one WebSocket message.
    conn.send(&[
        joined(id, ROOM, "e1", 0, true),
        msg(ROOM, 1),
        chat(ROOM, "hello"),
        json!({"op": "online", "room": ROOM, "count": 2}),
        msg(ROOM, 2),
    ])
    .await;

    assert_eq!(
        next_event(&mut events).await,
        Event::Connected {
            terminal: "t1".into(),
            transport: Transport::Ws
        }
    );
    assert_eq!(
        next_event(&mut events).await,
        Event::Joined {
            room: ROOM.into(),
            epoch: "e1".into(),
            seq: 0,
            recovered: true,
            resumed: false,
            online: 1
        }
    );
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![1]);
    match next_event(&mut events).await {
        Event::Transient(m) => {
            assert_eq!(
                (m.room.as_str(), m.ty.as_str(), m.seq),
                (ROOM, "chat", None)
            );
            assert_eq!(m.data, json!({"text": "hello"}));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        next_event(&mut events).await,
        Event::Online {
            room: ROOM.into(),
            count: 2
        }
    );
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![2]);
    assert_eq!(client.position(ROOM), Some(pos("e1", 2)));
    assert!(client.is_connected());

    client
        .send(ROOM, "chat", json!({"text": "hi"}))
        .await
        .unwrap();
    match conn.recv().await.frame {
        ClientFrame::Send { room, ty, data } => {
            assert_eq!((room.as_str(), ty.as_str()), (ROOM, "chat"));
            assert_eq!(data.get(), r#"{"text":"hi"}"#);
        }
        other => panic!("{other:?}"),
    }

    // A clean close: the server sees a close frame, then the event stream ends.
    client.close().await;
    let end = conn.recv_within(STEP).await;
    assert!(
        matches!(&end, Err(why) if why.starts_with("close frame")),
        "{end:?}"
    );
    assert_eq!(
        tokio::time::timeout(STEP, events.recv()).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn reconnects_and_resumes_with_the_last_delivered_seq() {
    let (server, client, mut events, mut conn) = joined_ws_client(ROOM).await;
    conn.send(&[msg(ROOM, 1), msg(ROOM, 2), msg(ROOM, 3)]).await;
    assert_eq!(next_seqs(&mut events, ROOM, 3).await, vec![1, 2, 3]);

    // The TCP connection ends without a close frame.
    drop(conn);
    match next_event(&mut events).await {
        Event::Disconnected {
            reason: DisconnectReason::ConnectionLost(_),
            retry_in,
        } => assert!(retry_in <= Duration::from_millis(10), "first retry ≤ base"),
        other => panic!("{other:?}"),
    }
    assert!(!client.is_connected());

    let mut conn = server.accept().await;
    conn.handshake("t1").await;
    let (room, since, id) = conn.expect_join().await;
    assert_eq!(room, ROOM);
    assert_eq!(
        since,
        Some(pos("e1", 3)),
        "resumes after the last delivered seq"
    );
    // A replay overlapping what was delivered, with duplicates, then live traffic that
    // repeats the replay's tail.
    conn.send(&[
        joined(id, ROOM, "e1", 6, true),
        msg(ROOM, 2),
        msg(ROOM, 3),
        msg(ROOM, 4),
        msg(ROOM, 4),
        msg(ROOM, 5),
        msg(ROOM, 3),
        msg(ROOM, 6),
    ])
    .await;
    conn.send(&[msg(ROOM, 6), msg(ROOM, 7), chat(ROOM, "end")])
        .await;

    assert!(matches!(
        next_event(&mut events).await,
        Event::Connected { .. }
    ));
    assert_eq!(
        next_event(&mut events).await,
        Event::Joined {
            room: ROOM.into(),
            epoch: "e1".into(),
            seq: 6,
            recovered: true,
            resumed: true,
            online: 1
        }
    );
    assert_eq!(next_seqs(&mut events, ROOM, 4).await, vec![4, 5, 6, 7]);
    assert!(matches!(next_event(&mut events).await, Event::Transient(_)));
    assert_eq!(client.position(ROOM), Some(pos("e1", 7)));
}

#[tokio::test]
async fn a_gap_while_connected_is_pulled_once_and_filled_in_order() {
    let server = FakeServer::start().await;
    let (client, mut events) = Client::connect(ClientConfig {
        pull_limit: 500,
        ..server.config()
    })
    .unwrap();
    client.join(ROOM, None).await.unwrap();
    let mut conn = server.accept().await;
    conn.join_fresh(&mut events, ROOM).await;

    conn.send(&[msg(ROOM, 1), msg(ROOM, 2), msg(ROOM, 5)]).await;
    conn.send(&[msg(ROOM, 6)]).await;
    assert_eq!(next_seqs(&mut events, ROOM, 2).await, vec![1, 2]);

    let (room, since, limit, id) = conn.expect_pull().await;
    assert_eq!((room.as_str(), since, limit), (ROOM, 2, Some(500)));
    assert!(id.is_some());
    conn.send(&[pulled(id, ROOM, "e1", 6, [3, 4, 5]), msg(ROOM, 7)])
        .await;
    assert_eq!(next_seqs(&mut events, ROOM, 5).await, vec![3, 4, 5, 6, 7]);

    // Exactly one pull: the client's next frame is this send, not another pull.
    client.send(ROOM, "chat", json!({})).await.unwrap();
    assert!(matches!(conn.recv().await.frame, ClientFrame::Send { .. }));
}

#[tokio::test]
async fn a_prompt_is_pulled_page_by_page_up_to_its_seq() {
    const SERVER_CAP: u64 = 60;
    let server = FakeServer::start().await;
    let (client, mut events) = Client::connect(ClientConfig {
        pull_limit: 100,
        ..server.config()
    })
    .unwrap();
    client.join(ROOM, Some(pos("e1", 0))).await.unwrap();
    assert_eq!(client.position(ROOM), Some(pos("e1", 0)));
    let mut conn = server.accept().await;
    let id = conn.join_resuming(ROOM, pos("e1", 0)).await;
    // The replay did not fit the server's queue: three messages, then a prompt, then live.
    conn.send(&[
        joined(id, ROOM, "e1", 250, true),
        msg(ROOM, 1),
        msg(ROOM, 2),
        msg(ROOM, 3),
        json!({"op": "prompt", "room": ROOM, "seq": 250}),
        msg(ROOM, 251),
    ])
    .await;

    // The server side answers pulls (capping them at SERVER_CAP) until the client's next
    // non-pull frame, and reports the pulls it served.
    let server_side = tokio::spawn(async move {
        let mut pulls = Vec::new();
        loop {
            let env = conn.recv().await;
            match env.frame {
                ClientFrame::Pull { room, since, limit } => {
                    pulls.push((since, limit));
                    let n = u64::from(limit.unwrap_or(1000)).min(SERVER_CAP);
                    let upto = (since + n).min(251);
                    conn.send(&[pulled(env.id, &room, "e1", 251, since + 1..=upto)])
                        .await;
                }
                ClientFrame::Send { .. } => return pulls,
                other => panic!("{other:?}"),
            }
        }
    });

    assert!(matches!(
        next_event(&mut events).await,
        Event::Connected { .. }
    ));
    assert!(matches!(
        next_event(&mut events).await,
        Event::Joined {
            resumed: true,
            recovered: true,
            ..
        }
    ));
    let seqs = next_seqs(&mut events, ROOM, 251).await;
    assert_eq!(seqs, (1..=251).collect::<Vec<_>>());
    client.send(ROOM, "chat", json!({})).await.unwrap();
    let pulls = server_side.await.unwrap();
    assert_eq!(
        pulls,
        vec![
            (3, Some(100)),
            (63, Some(100)),
            (123, Some(100)),
            (183, Some(100)),
            (243, Some(100))
        ]
    );
}

#[tokio::test]
async fn a_silent_server_is_detected_by_the_watchdog() {
    let server = FakeServer::start().await;
    let idle = Duration::from_millis(200);
    let ping_timeout = Duration::from_millis(200);
    let (client, mut events) = Client::connect(ClientConfig {
        idle_timeout: Some(idle),
        ping_timeout,
        ..server.config()
    })
    .unwrap();
    client.join(ROOM, None).await.unwrap();
    let mut silent = server.accept().await;
    silent.join_fresh(&mut events, ROOM).await;
    silent.send(&[msg(ROOM, 1)]).await;
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![1]);
    let quiet_since = Instant::now();

    // From now on the first connection neither reads nor writes (no pings either).
    match next_event(&mut events).await {
        Event::Disconnected {
            reason: DisconnectReason::HeartbeatTimeout,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    let waited = quiet_since.elapsed();
    // Not before the idle period and the ping timeout have (nearly) passed.
    assert!(
        waited >= idle + ping_timeout - Duration::from_millis(100),
        "{waited:?}"
    );

    let mut conn = server.accept().await;
    conn.handshake("t1").await;
    let (_, since, _) = conn.expect_join().await;
    assert_eq!(since, Some(pos("e1", 1)));

    // The silent connection did get the application-level probe before being dropped.
    let probe = silent.recv().await;
    assert_eq!(probe.frame, ClientFrame::Ping);
}

#[tokio::test]
async fn websocket_pings_keep_the_connection_alive() {
    let server = FakeServer::start().await;
    let (client, mut events) = Client::connect(ClientConfig {
        idle_timeout: Some(Duration::from_millis(500)),
        ping_timeout: Duration::from_millis(500),
        ..server.config()
    })
    .unwrap();
    client.join(ROOM, None).await.unwrap();
    let mut conn = server.accept().await;
    conn.join_fresh(&mut events, ROOM).await;

    // Only WebSocket pings (every 100 ms) for two idle periods: the client must not probe.
    let until = Instant::now() + Duration::from_millis(1000);
    while Instant::now() < until {
        conn.ws
            .send(tokio_tungstenite::tungstenite::Message::Ping(
                bytes::Bytes::from_static(b"hb"),
            ))
            .await
            .unwrap();
        let got = conn.recv_within(Duration::from_millis(100)).await;
        assert!(matches!(got, Ok(None)), "unexpected {got:?}");
    }
    assert!(
        events.try_recv().is_none(),
        "still connected, nothing happened"
    );

    // Then silence: the client probes, and a pong keeps it alive.
    let probe = conn.recv().await;
    assert_eq!(probe.frame, ClientFrame::Ping);
    conn.send(&[json!({"op": "pong"})]).await;
    let probe = conn.recv().await;
    assert_eq!(
        probe.frame,
        ClientFrame::Ping,
        "probes again after the next idle period"
    );
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn refused_tokens_stop_reconnecting_until_set_token() {
    let server = FakeServer::start().await;
    let (client, mut events) = Client::connect(ClientConfig {
        token: Some("expired".into()),
        auth_failure_limit: Some(2),
        ..server.config()
    })
    .unwrap();
    for _ in 0..2 {
        let mut conn = server.accept().await;
        let env = conn.recv().await;
        assert!(
            matches!(env.frame, ClientFrame::Connect { token: Some(ref t), .. } if t == "expired")
        );
        conn.send(&[json!({"op": "error", "code": "unauthorized", "message": "token expired"})])
            .await;
        drop(conn);
        match next_event(&mut events).await {
            Event::Error { code, room, .. } => {
                assert_eq!((code, room), (ErrorCode::Unauthorized, None));
            }
            other => panic!("{other:?}"),
        }
    }
    // Parked: no third attempt (the back-off is at most 50 ms here).
    assert!(
        server
            .accept_within(Duration::from_millis(300))
            .await
            .is_none()
    );

    client.set_token(Some("fresh".into())).await.unwrap();
    let mut conn = server.accept().await;
    assert_eq!(conn.handshake("t1").await.as_deref(), Some("fresh"));
    assert!(matches!(
        next_event(&mut events).await,
        Event::Connected { .. }
    ));
}

#[tokio::test]
async fn closed_rooms_are_not_rejoined() {
    let server = FakeServer::start().await;
    let (client, mut events) = Client::connect(server.config()).unwrap();
    client.join("a", None).await.unwrap();
    client.join("b", None).await.unwrap();
    let mut conn = server.accept().await;
    conn.handshake("t1").await;
    let (ra, _, ida) = conn.expect_join().await;
    let (rb, _, idb) = conn.expect_join().await;
    assert_eq!((ra.as_str(), rb.as_str()), ("a", "b"));
    conn.send(&[
        joined(ida, "a", "e1", 0, true),
        json!({"op": "error", "id": idb, "code": "room_closed", "message": "closed"}),
    ])
    .await;
    assert!(matches!(
        next_event(&mut events).await,
        Event::Connected { .. }
    ));
    assert!(matches!(next_event(&mut events).await, Event::Joined { ref room, .. } if room == "a"));
    assert_eq!(
        next_event(&mut events).await,
        Event::Error {
            code: ErrorCode::RoomClosed,
            message: "closed".into(),
            room: Some("b".into())
        }
    );
    // A control command closes "a": the message, then an unsolicited `left`.
    conn.send(&[
        json!({"op": "msg", "room": "a", "type": "control", "data": {"action": "close"}, "seq": 1, "ts": 5}),
        json!({"op": "left", "room": "a"}),
    ])
    .await;
    match next_event(&mut events).await {
        Event::Message(m) => assert_eq!((m.ty.as_str(), m.seq), ("control", 1)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        next_event(&mut events).await,
        Event::Left { room: "a".into() }
    );
    assert_eq!(client.position("a"), None);

    // After a reconnect neither room is joined again.
    drop(conn);
    assert!(matches!(
        next_event(&mut events).await,
        Event::Disconnected { .. }
    ));
    let mut conn = server.accept().await;
    conn.handshake("t1").await;
    client.join("c", None).await.unwrap();
    let (room, _, _) = conn.expect_join().await;
    assert_eq!(room, "c");
}

#[tokio::test]
async fn a_new_epoch_resets_the_position_and_reports_the_loss() {
    let server = FakeServer::start().await;
    let (client, mut events) = Client::connect(server.config()).unwrap();
    client.join(ROOM, Some(pos("e1", 10))).await.unwrap();
    let mut conn = server.accept().await;
    let id = conn.join_resuming(ROOM, pos("e1", 10)).await;
    // The server's history restarted: it keeps seqs 2..=3 of epoch e2.
    conn.send(&[joined(id, ROOM, "e2", 3, false), msg(ROOM, 2), msg(ROOM, 3)])
        .await;
    assert!(matches!(
        next_event(&mut events).await,
        Event::Connected { .. }
    ));
    assert!(matches!(
        next_event(&mut events).await,
        Event::Joined { ref epoch, recovered: false, resumed: true, .. } if epoch == "e2"
    ));
    assert_eq!(
        next_event(&mut events).await,
        Event::Lost {
            room: ROOM.into(),
            first: 1,
            last: 1
        }
    );
    assert_eq!(next_seqs(&mut events, ROOM, 2).await, vec![2, 3]);
    assert_eq!(client.position(ROOM), Some(pos("e2", 3)));
}

#[tokio::test]
async fn a_slow_application_does_not_block_commands() {
    let server = FakeServer::start().await;
    let (client, mut events) = Client::connect(ClientConfig {
        event_capacity: 4,
        ..server.config()
    })
    .unwrap();
    client.join(ROOM, None).await.unwrap();
    let mut conn = server.accept().await;
    conn.handshake("t1").await;
    let (_, _, id) = conn.expect_join().await;
    let mut frames = vec![joined(id, ROOM, "e1", 0, true)];
    frames.extend((1..=200).map(|s| msg(ROOM, s)));
    conn.send(&frames).await;

    // Nobody reads events, yet commands are served.
    tokio::time::timeout(STEP, client.join("other", None))
        .await
        .expect("join blocked by a full event queue")
        .unwrap();
    let (room, _, _) = conn.expect_join().await;
    assert_eq!(room, "other");

    assert!(matches!(
        next_event(&mut events).await,
        Event::Connected { .. }
    ));
    assert!(matches!(
        next_event(&mut events).await,
        Event::Joined { .. }
    ));
    let seqs = next_seqs(&mut events, ROOM, 200).await;
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
}

#[tokio::test]
async fn bad_input_is_refused_without_a_connection() {
    assert!(matches!(
        Client::connect(ClientConfig {
            server: "ftp://x".into(),
            ..ClientConfig::default()
        }),
        Err(livepush_client::ClientError::InvalidUrl(_))
    ));
    let server = FakeServer::start().await;
    let (client, _events) = Client::connect(server.config()).unwrap();
    assert!(client.join("bad room", None).await.is_err());
    assert_eq!(
        client.send(ROOM, "chat", json!({})).await,
        Err(livepush_client::ClientError::NotConnected)
    );
}

#[test]
fn connect_needs_a_runtime() {
    assert_eq!(
        Client::connect(ClientConfig::default()).err(),
        Some(livepush_client::ClientError::NoRuntime)
    );
}

#[tokio::test]
async fn garbage_from_the_server_is_skipped() {
    let (_server, _client, mut events, mut conn) = joined_ws_client(ROOM).await;
    conn.ws
        .send(tokio_tungstenite::tungstenite::Message::text(
            "not json\n{\"op\":\"warp\"}\n{\"op\":\"msg\",\"room\":1}\n[]",
        ))
        .await
        .unwrap();
    conn.send(&[
        json!({"op": "msg", "room": "unknown", "type": "gift", "data": {}, "seq": 1, "ts": 1}),
        msg(ROOM, 1),
    ])
    .await;
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![1]);
}

#[tokio::test]
async fn rate_limited_joins_are_retried() {
    let server = FakeServer::start().await;
    let (client, mut events) = Client::connect(server.config()).unwrap();
    client.join(ROOM, None).await.unwrap();
    let mut conn = server.accept().await;
    conn.handshake("t1").await;
    let (_, _, id) = conn.expect_join().await;
    conn.send(&[json!({"op": "error", "id": id, "code": "rate_limited", "message": "slow down"})])
        .await;
    // Retried after the (short) back-off, with a new id.
    let (room, since, id2) = conn.expect_join().await;
    assert_eq!((room.as_str(), since), (ROOM, None));
    assert_ne!(id, id2);
    // An error without an id (a dropped frame) also gets an outstanding join re-sent.
    conn.send(&[json!({"op": "error", "code": "rate_limited", "message": "too many frames"})])
        .await;
    let (_, _, id3) = conn.expect_join().await;
    conn.send(&[joined(id3, ROOM, "e1", 0, true), msg(ROOM, 1)])
        .await;

    assert!(matches!(
        next_event(&mut events).await,
        Event::Connected { .. }
    ));
    for _ in 0..2 {
        assert!(matches!(
            next_event(&mut events).await,
            Event::Error {
                code: ErrorCode::RateLimited,
                ..
            }
        ));
    }
    assert!(matches!(
        next_event(&mut events).await,
        Event::Joined { .. }
    ));
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![1]);
}

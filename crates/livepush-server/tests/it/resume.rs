//! Resume, replay, history bounds, and the publish/join race.

use std::sync::Arc;

use livepush_proto::ServerFrame;
use serde_json::{Value, json};

use crate::support::*;

#[tokio::test]
async fn replay_after_abrupt_disconnect_is_exactly_once_in_order() {
    let s = TestServer::start().await;
    let mut a = s.terminal("viewer", &["live:*"], false).await;
    let (epoch, seq, recovered) = joined(&a.join("live:1", None).await);
    assert_eq!((seq, recovered), (0, true));
    for n in 1..=3 {
        s.publish("live:1", "gift", json!({"n": n})).await;
    }
    assert_eq!(a.reliable(3).await, vec![1, 2, 3]);
    // Abrupt: drop the TCP connection without a close frame.
    drop(a);
    for n in 4..=8 {
        s.publish("live:1", "gift", json!({"n": n})).await;
    }
    // Transient messages published while away are never replayed.
    s.publish("live:1", "chat", json!({"text": "missed"})).await;
    let mut b = s.terminal("viewer", &["live:*"], false).await;
    let (e2, latest, recovered) = joined(&b.join("live:1", Some((&epoch, 3))).await);
    assert_eq!(e2, epoch);
    assert_eq!(latest, 8);
    assert!(recovered);
    assert_eq!(b.reliable(5).await, vec![4, 5, 6, 7, 8]);
    s.publish("live:1", "gift", json!({"n": 9})).await;
    // The next frame of substance is the live message 9: nothing doubled, no chat replayed.
    match b.next_significant().await {
        ServerFrame::Msg(m) => assert_eq!((m.seq, m.data), (Some(9), json!({"n": 9}))),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn history_overflow_and_epoch_mismatch_are_not_recovered() {
    let mut c = config();
    c.history_size = 5;
    let s = TestServer::with(c).await;
    for n in 1..=20 {
        s.publish("r", "gift", json!({"n": n})).await;
    }
    let epoch = s.room("r").await["epoch"].as_str().unwrap().to_owned();
    let mut a = s.terminal("t", &["r"], false).await;
    let (_, latest, recovered) = joined(&a.join("r", Some((&epoch, 2))).await);
    assert_eq!(latest, 20);
    assert!(!recovered);
    assert_eq!(a.reliable(5).await, vec![16, 17, 18, 19, 20]);

    let mut b = s.terminal("t2", &["r"], false).await;
    let (e, _, recovered) = joined(&b.join("r", Some(("another-epoch", 19))).await);
    assert_eq!(e, epoch);
    assert!(!recovered);
    assert_eq!(b.reliable(5).await, vec![16, 17, 18, 19, 20]);

    // At the edge of what is kept: complete.
    let mut c = s.terminal("t3", &["r"], false).await;
    let (_, _, recovered) = joined(&c.join("r", Some((&epoch, 15))).await);
    assert!(recovered);
    assert_eq!(c.reliable(5).await, vec![16, 17, 18, 19, 20]);
}

#[tokio::test]
async fn history_ttl_expires_messages() {
    let mut c = config();
    c.history_ttl = std::time::Duration::from_millis(300);
    c.limits.online_interval = std::time::Duration::from_millis(50);
    let s = TestServer::with(c).await;
    s.publish("r", "gift", json!({})).await;
    let epoch = s.room("r").await["epoch"].as_str().unwrap().to_owned();
    s.eventually("history to expire", || async {
        let (_, h) = s.get("/v1/rooms/r/history").await;
        h["messages"].as_array().is_some_and(|m| m.is_empty())
    })
    .await;
    let mut a = s.terminal("t", &["r"], false).await;
    let (_, latest, recovered) = joined(&a.join("r", Some((&epoch, 0))).await);
    assert_eq!(latest, 1);
    assert!(
        !recovered,
        "message 1 expired, so a resume from 0 is incomplete"
    );
}

#[tokio::test]
async fn publish_racing_joins_never_gaps_or_doubles() {
    let s = Arc::new(TestServer::start().await);
    s.publish("race", "gift", json!({"n": 0})).await;
    let epoch = s.room("race").await["epoch"].as_str().unwrap().to_owned();
    const TOTAL: u64 = 300;
    let publisher = {
        let s = s.clone();
        tokio::spawn(async move {
            for n in 1..TOTAL {
                s.publish("race", "gift", json!({"n": n})).await;
            }
        })
    };
    let mut joiners = Vec::new();
    for i in 0..12u64 {
        let s = s.clone();
        let epoch = epoch.clone();
        joiners.push(tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(i * 15)).await;
            let mut t = s.terminal(&format!("j{i}"), &["race"], false).await;
            // Half resume from seq 1, half join fresh.
            let since = (i % 2 == 0).then_some((epoch.as_str(), 1));
            let (_, latest, recovered) = joined(&t.join("race", since).await);
            assert!(recovered);
            let first = if since.is_some() { 2 } else { latest + 1 };
            let want: Vec<u64> = (first..=TOTAL).collect();
            let got = t.reliable(want.len()).await;
            assert_eq!(got, want, "joiner {i} (latest at join {latest})");
        }));
    }
    publisher.await.unwrap();
    for j in joiners {
        j.await.unwrap();
    }
}

#[tokio::test]
async fn oversized_replay_is_cut_and_prompted_then_pulled() {
    let mut c = config();
    c.limits.outbox_frames = 10;
    let s = TestServer::with(c).await;
    for n in 1..=50 {
        s.publish("big", "gift", json!({"n": n})).await;
    }
    let epoch = s.room("big").await["epoch"].as_str().unwrap().to_owned();
    let mut t = s.terminal("t", &["big"], false).await;
    let (_, _, recovered) = joined(&t.join("big", Some((&epoch, 0))).await);
    assert!(recovered);
    let mut got = Vec::new();
    let prompt = loop {
        match t.next_significant().await {
            ServerFrame::Msg(m) => got.push(m.seq.unwrap()),
            ServerFrame::Prompt { seq, .. } => break seq,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(prompt, 50);
    assert!(!got.is_empty() && got.len() < 50);
    assert_eq!(got, (1..=got.len() as u64).collect::<Vec<_>>());
    let last = *got.last().unwrap();
    t.send(json!({"op":"pull","room":"big","since":last,"limit":1000,"id":5}))
        .await;
    match t.next_significant().await {
        ServerFrame::Pulled {
            id,
            seq,
            recovered,
            messages,
            ..
        } => {
            assert_eq!(id, Some(5));
            assert_eq!(seq, 50);
            assert!(recovered);
            let seqs: Vec<u64> = messages.iter().map(|m| m.seq.unwrap()).collect();
            assert_eq!(seqs, (last + 1..=50).collect::<Vec<_>>());
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn pull_is_capped_and_pages() {
    let mut c = config();
    c.limits.max_pull = 7;
    let s = TestServer::with(c).await;
    for n in 1..=20 {
        s.publish("p", "gift", json!({"n": n})).await;
    }
    let mut t = s.terminal("t", &["p"], false).await;
    t.send(json!({"op":"pull","room":"p","since":0,"limit":100}))
        .await;
    match t.next_significant().await {
        ServerFrame::Pulled { messages, seq, .. } => {
            assert_eq!(seq, 20);
            assert_eq!(messages.len(), 7);
            assert_eq!(messages[0].seq, Some(1));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn online_count_is_pushed_when_it_changes() {
    let mut c = config();
    c.limits.online_interval = std::time::Duration::from_millis(100);
    let s = TestServer::with(c).await;
    let mut a = s.terminal("a", &["o"], false).await;
    a.join("o", None).await;
    let mut b = s.terminal("b", &["o"], false).await;
    let f = b.join("o", None).await;
    assert!(matches!(f, ServerFrame::Joined { online: 2, .. }), "{f:?}");
    // a sees the count reach 2.
    loop {
        if let ServerFrame::Online { count: 2, .. } = a.next().await {
            break;
        }
    }
    drop(b);
    loop {
        if let ServerFrame::Online { count: 1, .. } = a.next().await {
            break;
        }
    }
    assert_eq!(s.room("o").await["online"], 1);
}

#[tokio::test]
async fn transient_messages_are_live_only() {
    let s = TestServer::start().await;
    let mut a = s.terminal("a", &["c"], false).await;
    a.join("c", None).await;
    let body = s.publish("c", "chat", json!({"text": "hi"})).await;
    assert!(body.get("seq").is_none(), "{body}");
    match a.next_significant().await {
        ServerFrame::Msg(m) => {
            assert_eq!(m.seq, None);
            assert_eq!(m.ty, "chat");
        }
        other => panic!("{other:?}"),
    }
    // A per-publish override makes a chat reliable.
    let (status, body) = s
        .post(
            "/v1/rooms/c/messages",
            json!({"type":"chat","data":{},"class":"reliable"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["seq"], 1);
}

#[tokio::test]
async fn frames_batched_with_connect_are_handled() {
    let s = TestServer::start().await;
    let mut ws = Ws::open(&s.ws_url()).await;
    let token = s.token("batcher", &["b"], false);
    ws.send_text(&format!(
        "{}\n{}",
        json!({"op":"connect","token":token}),
        json!({"op":"join","room":"b","id":2})
    ))
    .await;
    assert!(matches!(ws.next().await, ServerFrame::Connected { .. }));
    assert!(matches!(
        ws.next().await,
        ServerFrame::Joined { id: Some(2), .. }
    ));
}

#[tokio::test]
async fn replays_and_pulls_are_bounded_in_bytes() {
    let mut c = config();
    c.limits.outbox_max_bytes = 64 * 1024;
    c.limits.max_publish_bytes = 16 * 1024;
    let s = TestServer::with(c).await;
    let big = "x".repeat(8 * 1024);
    for n in 1..=20 {
        s.publish("big", "gift", json!({"n": n, "pad": big})).await;
    }
    let epoch = s.room("big").await["epoch"].as_str().unwrap().to_owned();
    let mut t = s.terminal("t", &["big"], false).await;
    let (_, _, recovered) = joined(&t.join("big", Some((&epoch, 0))).await);
    assert!(recovered);
    let mut got = Vec::new();
    loop {
        match t.next_significant().await {
            ServerFrame::Msg(m) => got.push(m.seq.unwrap()),
            ServerFrame::Prompt { seq, .. } => {
                assert_eq!(seq, 20);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    // Half of the 64 KiB budget: about four 8 KiB messages, never the connection's end.
    assert!(!got.is_empty() && got.len() <= 4, "{got:?}");
    let mut last = *got.last().unwrap();
    while last < 20 {
        t.send(json!({"op":"pull","room":"big","since":last})).await;
        match t.next_significant().await {
            ServerFrame::Pulled { messages, .. } => {
                assert!(
                    !messages.is_empty() && messages.len() <= 3,
                    "a quarter of the budget"
                );
                for m in &messages {
                    last += 1;
                    assert_eq!(m.seq, Some(last));
                }
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn pull_from_beyond_the_latest_seq_is_not_recovered() {
    let s = TestServer::start().await;
    s.publish("p", "gift", json!({})).await;
    let mut t = s.terminal("t", &["p"], false).await;
    t.send(json!({"op":"pull","room":"p","since":1})).await;
    assert!(matches!(
        t.next_significant().await,
        ServerFrame::Pulled {
            recovered: true,
            ..
        }
    ));
    t.send(json!({"op":"pull","room":"p","since":5})).await;
    assert!(matches!(
        t.next_significant().await,
        ServerFrame::Pulled {
            recovered: false,
            seq: 1,
            ..
        }
    ));
}

/// Contract v1.1, decision 8: when a room's history is lost or reset while terminals are
/// connected, every member is pushed `joined{recovered:false}` with the new epoch and goes on
/// from its seq, over WebSocket, long-poll and SSE. `DELETE /v1/rooms/{room}/history` resets.
#[tokio::test]
async fn an_epoch_change_is_pushed_to_every_member() {
    let s = TestServer::start().await;
    s.publish("ep8", "gift", json!({"n": 1})).await;
    let old = s.room("ep8").await["epoch"].as_str().unwrap().to_owned();
    let mut ws = s.terminal("w", &["ep8"], false).await;
    let (_, seq, _) = joined(&ws.join("ep8", None).await);
    assert_eq!(seq, 1);
    // SSE, joined at the live edge.
    let token = s.token("s", &["ep8"], false);
    let mut sse = s
        .http
        .get(format!("{}/v1/sse?token={token}&rooms=ep8", s.url()))
        .send()
        .await
        .unwrap();
    let mut sse_buf = String::new();
    let mut sse_id = None;
    while sse_id.is_none() {
        let chunk = tokio::time::timeout(WAIT, sse.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        sse_buf.push_str(std::str::from_utf8(&chunk).unwrap());
        sse_id = sse_buf
            .lines()
            .find_map(|l| l.strip_prefix("id:").map(|i| i.trim().to_owned()));
    }
    assert_eq!(sse_id.unwrap(), format!("ep8:{old}:1"));
    sse_buf.clear();
    // A long-poll terminal parked at the latest position.
    let lp_token = s.token("p", &["ep8"], false);
    let parked = {
        let http = s.http.clone();
        let url = format!("{}/v1/poll", s.url());
        let body = json!({"token":lp_token,"rooms":{"ep8":{"epoch":old,"seq":1}},"wait_ms":20_000});
        tokio::spawn(async move {
            http.post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    s.eventually("the poll to park", || async {
        s.room("ep8").await["online"] == 3
    })
    .await;

    let (status, body) = {
        let r = s
            .http
            .delete(format!("{}/v1/rooms/ep8/history", s.url()))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 200, "{body}");
    let new = body["epoch"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(body["seq"], 0);
    s.publish("ep8", "gift", json!({"n": 2})).await;

    // WebSocket: the push, then the new epoch's first message.
    match ws.next_significant().await {
        ServerFrame::Joined {
            epoch,
            seq,
            recovered,
            id,
            ..
        } => assert_eq!(
            (epoch.as_str(), seq, recovered, id),
            (new.as_str(), 0, false, None)
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(ws.reliable(1).await, [1]);
    // Long-poll: the parked poll is answered with it.
    let answer = parked.await.unwrap();
    let frames = answer["frames"].as_array().unwrap();
    assert!(
        frames
            .iter()
            .any(|f| f["op"] == "joined" && f["epoch"] == new.as_str() && f["recovered"] == false),
        "{answer}"
    );
    // SSE: the event carries the new position in its id.
    let mut id = None;
    while id.as_deref() != Some(format!("ep8:{new}:1").as_str()) {
        let chunk = tokio::time::timeout(WAIT, sse.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        sse_buf.push_str(std::str::from_utf8(&chunk).unwrap());
        if let Some(last) = sse_buf
            .lines()
            .filter_map(|l| l.strip_prefix("id:"))
            .next_back()
        {
            id = Some(last.trim().to_owned());
        }
    }
    assert!(sse_buf.contains(r#""recovered":false"#), "{sse_buf}");
    // A resume from the old epoch is told it lost messages; the history starts again.
    let (_, h) = s.get("/v1/rooms/ep8/history?since=0").await;
    assert_eq!(
        (h["epoch"].as_str(), h["seq"].as_u64()),
        (Some(new.as_str()), Some(1))
    );
    let (status, _) = s
        .http
        .delete(format!("{}/v1/rooms/nope/history", s.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 404, "unknown rooms are not created by a reset");
}

//! The SDK's long-polling against a scripted endpoint (contract v1.1): the `bye` poll that
//! ends a session (decision 5), the inbox block of poll answers (decision 6), and a history
//! replaced while polling (decision 8).

mod common;

use std::time::Duration;

use common::*;
use livepush_client::{Client, ClientConfig, Event, InboxPosition};
use serde_json::{Value, json};

const ROOM: &str = "live:1";

fn inbox_frame(seq: u64) -> Value {
    json!({"op": "inbox", "seq": seq, "type": "notice", "data": {"n": seq}, "ts": 1})
}

fn position(seq: u64, acked: u64, pending: u64) -> InboxPosition {
    InboxPosition {
        seq,
        acked,
        pending,
    }
}

/// [`hello_lp`] for ROOM.
async fn hello(
    polls: &mut FakePolls,
    events: &mut livepush_client::Events,
    seq: u64,
    more: &[Value],
) {
    hello_lp(polls, events, ROOM, seq, more).await;
}

#[tokio::test]
async fn closing_sends_one_bye_poll_with_the_queued_ops_and_waits_for_its_answer() {
    let mut polls = FakePolls::start().await;
    let (client, mut events) = Client::connect(ClientConfig {
        token: Some("tok".into()),
        ..polls.config()
    })
    .unwrap();
    client.join(ROOM, None).await.unwrap();
    hello(
        &mut polls,
        &mut events,
        4,
        &[inbox_frame(1), inbox_frame(2)],
    )
    .await;
    for seq in 1..=2 {
        assert!(matches!(next_event(&mut events).await, Event::Inbox(m) if m.seq == seq));
    }
    let parked = polls.next().await;
    assert_eq!(parked.position(ROOM), Some(pos("e1", 4)));
    assert_eq!(parked.body["wait_ms"], 25_000);

    // An ack goes out at once in a short poll, whose answer the server holds.
    let c = client.clone();
    let ack1 = tokio::spawn(async move { c.ack_inbox(1).await });
    let short = polls.next().await;
    assert_eq!(short.body["ops"][0]["op"], "ack");
    assert_eq!(short.body["ops"][0]["inbox"], 1);
    // A second ack waits for it to be answered; the application closes meanwhile.
    let c = client.clone();
    let mut ack2 = Box::pin(async move { c.ack_inbox(2).await });
    tokio::select! {
        biased;
        r = &mut ack2 => panic!("the ack cannot be done yet: {r:?}"),
        () = std::future::ready(()) => {}
    }
    let close = tokio::spawn(client.close());
    // The short poll in flight is answered first; then comes the bye, with the second ack.
    assert!(
        polls
            .next_within(Duration::from_millis(200))
            .await
            .is_none()
    );
    short.answer(json!({"frames": [], "inbox": {"seq": 2, "acked": 1, "pending": 1}}));
    let bye = polls.next().await;
    assert_eq!(bye.body["bye"], true);
    assert_eq!(bye.body["hello"], false);
    assert_eq!(bye.body["wait_ms"], 0);
    assert_eq!(bye.body["token"], "tok");
    assert_eq!(bye.position(ROOM), Some(pos("e1", 4)), "names its rooms");
    let ops = bye.body["ops"].as_array().expect("ops");
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert_eq!(
        (&ops[0]["op"], &ops[0]["inbox"]),
        (&json!("ack"), &json!(2))
    );
    assert!(!close.is_finished(), "close waits for the bye's answer");
    let left = json!({"op": "left", "room": ROOM});
    bye.answer(json!({"frames": [left.clone()], "ops": [left]}));
    close.await.unwrap();
    assert_eq!(ack1.await.unwrap(), Ok(()));
    assert_eq!(ack2.await, Ok(()));
    assert!(
        polls
            .next_within(Duration::from_millis(300))
            .await
            .is_none(),
        "nothing after the bye"
    );
    while let Some(e) = tokio::time::timeout(STEP, events.recv()).await.unwrap() {
        assert!(
            !matches!(e, Event::Left { .. }),
            "the bye's `left` is no event"
        );
    }
}

#[tokio::test]
async fn a_bye_that_is_not_answered_does_not_hold_close_for_long() {
    let mut polls = FakePolls::start().await;
    let (client, mut events) = Client::connect(polls.config()).unwrap();
    client.join(ROOM, None).await.unwrap();
    hello(&mut polls, &mut events, 0, &[]).await;
    let _parked = polls.next().await;
    let close = tokio::spawn(client.close());
    let bye = polls.next().await;
    assert_eq!(bye.body["bye"], true);
    // Never answered: close gives up after its bound (2 s).
    tokio::time::timeout(Duration::from_secs(4), close)
        .await
        .expect("close returned")
        .unwrap();
    drop(bye);
}

#[tokio::test]
async fn the_inbox_block_of_every_answer_reaches_the_application() {
    let mut polls = FakePolls::start().await;
    let (client, mut events) = Client::connect(polls.config()).unwrap();
    let hello = polls.next().await;
    let at_connect = json!({"seq": 3, "acked": 1, "pending": 1});
    hello.answer(json!({
        "frames": [connected_lp("t1", at_connect.clone()), inbox_frame(3)],
        "inbox": at_connect,
    }));
    assert!(matches!(
        next_event(&mut events).await,
        Event::Connected { .. }
    ));
    assert_eq!(client.inbox(), Some(position(3, 1, 1)));
    assert_eq!(client.session().unwrap().inbox, position(3, 1, 1));
    let c = client.clone();
    let ack = tokio::spawn(async move { c.ack_inbox(3).await });
    // The parked poll and the short poll that carries the ack, in either order.
    let (a, b) = (polls.next().await, polls.next().await);
    let (short, parked) = if a.body["ops"].is_array() {
        (a, b)
    } else {
        (b, a)
    };
    short.answer(json!({"frames": [], "inbox": {"seq": 3, "acked": 3, "pending": 0}}));
    assert_eq!(ack.await.unwrap(), Ok(()));
    assert_eq!(client.inbox(), Some(position(3, 3, 0)), "drained");
    assert_eq!(
        client.session().unwrap().inbox,
        position(3, 1, 1),
        "the session keeps the position at connect"
    );
    // An answer without the block (an older server) leaves the last one.
    parked.answer(json!({"frames": []}));
    let _next = polls.next().await;
    assert_eq!(client.inbox(), Some(position(3, 3, 0)));
}

#[tokio::test]
async fn a_history_replaced_while_polling_ends_at_the_new_epoch() {
    let mut polls = FakePolls::start().await;
    let (client, mut events) = Client::connect(polls.config()).unwrap();
    client.join(ROOM, None).await.unwrap();
    hello(&mut polls, &mut events, 0, &[]).await;
    let p = polls.next().await;
    assert_eq!(p.position(ROOM), Some(pos("e1", 0)));
    p.answer(json!({"frames": [msg(ROOM, 1)]}));
    assert_eq!(next_seqs(&mut events, ROOM, 1).await, vec![1]);

    // The server's store lost the room while the poll was parked: the answer is the usual
    // `joined{recovered:false}` of the new history, with nothing to replay.
    let p = polls.next().await;
    assert_eq!(p.position(ROOM), Some(pos("e1", 1)));
    p.answer(json!({"frames": [joined(None, ROOM, "e2", 0, false)]}));
    assert!(matches!(
        next_event(&mut events).await,
        Event::Joined { ref epoch, seq: 0, recovered: false, resumed: true, .. } if epoch == "e2"
    ));
    let p = polls.next().await;
    assert_eq!(
        p.position(ROOM),
        Some(pos("e2", 0)),
        "continues in the new history"
    );
    p.answer(json!({"frames": [msg(ROOM, 1)]}));
    match next_event(&mut events).await {
        Event::Message(m) => assert_eq!((m.epoch.as_str(), m.seq), ("e2", 1)),
        other => panic!("{other:?}"),
    }

    // A new history that already holds 1..=5 but replays none: the position ends at 5.
    let p = polls.next().await;
    assert_eq!(p.position(ROOM), Some(pos("e2", 1)));
    p.answer(json!({"frames": [joined(None, ROOM, "e3", 5, false)]}));
    assert!(matches!(
        next_event(&mut events).await,
        Event::Joined { ref epoch, seq: 5, recovered: false, .. } if epoch == "e3"
    ));
    assert_eq!(
        next_event(&mut events).await,
        Event::Lost {
            room: ROOM.into(),
            first: 1,
            last: 5
        }
    );
    for _ in 0..2 {
        let p = polls.next().await;
        assert_eq!(p.position(ROOM), Some(pos("e3", 5)));
        p.answer(json!({"frames": []}));
    }
    assert_eq!(client.position(ROOM), Some(pos("e3", 5)));
    assert!(events.try_recv().is_none(), "nothing reported twice");
}

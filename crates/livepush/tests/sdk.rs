//! The Rust SDK against a real server, through a proxy that keeps breaking the connection.

mod support;

use std::time::Duration;

use livepush_client::{Client, ClientConfig, Event, Events, TransportMode};
use serde_json::{Value, json};
use support::process::{Lines, livepush};
use support::proxy::Proxy;
use support::{KEY, PATIENCE, TestServer, fast_client, next_event, token};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_survives_a_proxy_that_keeps_cutting_it() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr()).await.expect("proxy");
    let (client, mut events) = Client::connect(fast_client(proxy.url(), "viewer")).expect("client");
    client.join("live:cut", None).await.expect("join");
    // Wait for the first join so that every message below is owed to this client.
    loop {
        if let Some(Event::Joined { .. }) = events.recv().await {
            break;
        }
    }

    const TOTAL: u64 = 400;
    let api = server.api.clone();
    let publisher = tokio::spawn(async move {
        for n in 1..=TOTAL {
            api.publish("live:cut", "gift", json!({"n": n})).await;
            // Spread the messages over a few seconds so that cuts land mid-stream.
            tokio::time::sleep(Duration::from_millis(6)).await;
        }
    });
    let cutter = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            for i in 0.. {
                tokio::time::sleep(Duration::from_millis(120)).await;
                if i == 2 {
                    // Once, the path goes dead instead of breaking: only the client's watchdog
                    // can notice.
                    proxy.freeze(true);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    proxy.freeze(false);
                    tokio::time::sleep(Duration::from_millis(900)).await;
                } else {
                    proxy.cut();
                }
            }
        })
    };

    let mut seqs = Vec::new();
    let mut disconnects = 0;
    let mut heartbeat_timeouts = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seqs.len() < TOTAL as usize {
        match next_event(&mut events, deadline, "all messages (60 s)").await {
            Event::Message(m) => {
                assert_eq!(m.data, json!({"n": m.seq}));
                seqs.push(m.seq);
            }
            Event::Disconnected { reason, .. } => {
                disconnects += 1;
                if reason == livepush_client::DisconnectReason::HeartbeatTimeout {
                    heartbeat_timeouts += 1;
                }
            }
            Event::Joined { recovered, .. } => {
                assert!(recovered, "history is large enough: nothing may be lost")
            }
            Event::Lost { .. } => panic!("nothing may be lost"),
            _ => {}
        }
    }
    cutter.abort();
    publisher.await.expect("publisher");
    assert_eq!(seqs, (1..=TOTAL).collect::<Vec<_>>(), "each once, in order");
    assert!(
        disconnects >= 3,
        "the proxy really cut the client ({disconnects} disconnects)"
    );
    assert!(
        heartbeat_timeouts >= 1,
        "the watchdog found the frozen path"
    );
    client.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn tail_prints_events_as_json_lines() {
    for transport in ["ws", "longpoll", "sse"] {
        tail_over(transport).await;
    }
}

async fn tail_over(transport: &str) {
    let server = TestServer::start().await;
    let mut child = livepush()
        .args(["tail", "--server", &server.url(), "--room", "live:tail"])
        .args(["--transport", transport])
        .env("LIVEPUSH_TOKEN", token("tailer", &["live:*"], false))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tail");
    let mut lines = Lines::new(child.stdout.take().expect("stdout"));
    let connected = lines.next_json().await;
    assert_eq!(connected["event"], "connected");
    assert_eq!(
        connected["transport"],
        match transport {
            "ws" => "ws",
            other => other,
        }
    );
    let joined = lines.next_json().await;
    assert_eq!(
        (joined["event"].as_str(), joined["room"].as_str()),
        (Some("joined"), Some("live:tail"))
    );
    server
        .api
        .publish("live:tail", "gift", json!({"n": 7}))
        .await;
    // The room's online count is broadcast on its own clock and may come first.
    let mut m = lines.next_json().await;
    while m["event"] == "online" {
        m = lines.next_json().await;
    }
    assert_eq!(m["event"], "message");
    assert_eq!(m["seq"], 1);
    assert_eq!(m["type"], "gift");
    assert_eq!(m["data"], json!({"n": 7}));
    server.shutdown().await;
}

/// A room joined while the long-poll's main poll is parked (without it) is attached by a
/// short poll. Its messages must not wait for the parked poll to come back (`poll_wait`,
/// 30 s here): the main poll is sent again with the room. Before the fix, nothing carried the
/// room until then; the reset test below failed whenever its join lost that race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_joined_while_a_poll_is_parked_gets_its_messages_at_once() {
    let server = TestServer::start().await;
    let (api, url) = (&server.api, server.url());
    let config = ClientConfig {
        transport: TransportMode::LongPoll,
        poll_wait: Duration::from_secs(30),
        ..fast_client(url, "late-joiner")
    };
    let (client, mut events) = Client::connect(config).expect("client");
    let deadline = Instant::now() + PATIENCE;
    while !matches!(
        next_event(&mut events, deadline, "connected").await,
        Event::Connected { .. }
    ) {}
    // Let the main poll (no rooms yet) be sent and parked.
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.join("live:late", None).await.expect("join");
    match next_joined_or_message(&mut events, TransportMode::LongPoll).await {
        Event::Joined { room, .. } => assert_eq!(room, "live:late"),
        other => panic!("{other:?}"),
    }
    let published = Instant::now();
    api.publish("live:late", "gift", json!({"n": 1})).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Event::Message(m) = next_event(&mut events, deadline, "the message").await {
            assert_eq!((m.room.as_str(), m.seq), ("live:late", 1));
            break;
        }
    }
    assert!(published.elapsed() < PATIENCE);
    client.close().await;
    server.shutdown().await;
}

/// Contract v1.1, decision 8, against the real server: when the backend resets a room's
/// history (`DELETE /v1/rooms/{room}/history`), an SDK client on each transport is told
/// `Joined{recovered:false}` with the new epoch, goes on from it without rejoining, and gets
/// the new epoch's messages once, from seq 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_history_reaches_the_sdk_as_a_failed_resume_on_every_transport() {
    let server = TestServer::start().await;
    let (api, url) = (&server.api, server.url());
    api.publish("live:reset", "gift", json!({"n": 1})).await;
    for (i, mode) in [
        TransportMode::WebSocket,
        TransportMode::LongPoll,
        TransportMode::Sse,
    ]
    .into_iter()
    .enumerate()
    {
        let config = ClientConfig {
            transport: mode,
            ..fast_client(url.clone(), &format!("reset-{i}"))
        };
        let (client, mut events) = Client::connect(config).expect("client");
        client.join("live:reset", None).await.expect("join");
        let old = match next_joined_or_message(&mut events, mode).await {
            Event::Joined { epoch, seq, .. } => {
                assert!(seq >= 1, "{mode:?}");
                epoch
            }
            other => panic!("{mode:?}: {other:?}"),
        };
        let r = api
            .http
            .delete(format!("{url}/v1/rooms/live:reset/history"))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("reset");
        assert!(r.status().is_success());
        let new = r.json::<Value>().await.expect("json")["epoch"]
            .as_str()
            .expect("epoch")
            .to_owned();
        assert_ne!(new, old);
        match next_joined_or_message(&mut events, mode).await {
            Event::Joined {
                epoch, recovered, ..
            } => {
                assert_eq!(
                    (epoch.as_str(), recovered),
                    (new.as_str(), false),
                    "{mode:?}"
                );
            }
            other => panic!("{mode:?}: {other:?}"),
        }
        api.publish("live:reset", "gift", json!({"n": 100 + i as u64}))
            .await;
        match next_joined_or_message(&mut events, mode).await {
            Event::Message(m) => {
                assert_eq!((m.seq, m.epoch.as_str()), (1, new.as_str()), "{mode:?}")
            }
            other => panic!("{mode:?}: {other:?}"),
        }
        assert_eq!(
            client.position("live:reset").map(|p| (p.epoch, p.seq)),
            Some((new.clone(), 1)),
            "{mode:?}"
        );
        client.close().await;
        // The next client starts from a history with one message again.
        api.publish("live:reset", "gift", json!({"n": 200 + i as u64}))
            .await;
    }
    server.shutdown().await;
}

/// The next `Joined` or `Message` event, within 10 s.
async fn next_joined_or_message(events: &mut Events, mode: TransportMode) -> Event {
    let deadline = Instant::now() + Duration::from_secs(10);
    let what = format!("{mode:?}: a joined or a message");
    loop {
        if let e @ (Event::Joined { .. } | Event::Message(_)) =
            next_event(events, deadline, &what).await
        {
            return e;
        }
    }
}

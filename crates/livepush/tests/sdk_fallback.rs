//! The Rust SDK's transport fallback against a real server: WebSocket refused by a proxy →
//! long-polling; a flapping WebSocket moved to long-polling by the server and back; SSE.
//! And long-polling as contract v1.1 has it: a client behind the history skips what is gone
//! once (decision 4), and a closing client leaves at once with `bye` (decision 5).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use livepush_client::{
    Client, ClientConfig, ClientError, Event, Events, Position, Transport, TransportMode,
};
use serde_json::{Value, json};
use support::proxy::Proxy;
use support::{Api, TestServer, next_event, token, wait_until};
use tokio::time::{Instant, timeout_at};

/// The epoch of `room`.
async fn room_epoch(api: &Api, room: &str) -> String {
    let info = api.room(room).await;
    info["epoch"].as_str().expect("epoch").to_owned()
}

fn client_config(server: String, sub: &str, transport: TransportMode) -> ClientConfig {
    ClientConfig {
        server,
        token: Some(token(sub, &["live:*"], true)),
        transport,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    }
}

/// What a test saw on a client's event stream.
#[derive(Default, Debug)]
struct Seen {
    seqs: Vec<u64>,
    connected: Vec<Transport>,
    disconnects: usize,
    transients: Vec<Value>,
}

impl Seen {
    /// Record one event; reliable messages must carry `{"n": seq}` and nothing may be lost.
    fn record(&mut self, e: &Event) {
        match e {
            Event::Message(m) => {
                assert_eq!(m.data, json!({"n": m.seq}), "{m:?}");
                self.seqs.push(m.seq);
            }
            Event::Connected { transport, .. } => self.connected.push(*transport),
            Event::Disconnected { .. } => self.disconnects += 1,
            Event::Transient(m) => self.transients.push(m.data.clone()),
            Event::Lost { .. } => panic!("nothing may be lost: {e:?}"),
            Event::Joined { recovered, .. } => {
                assert!(recovered, "history is large enough: {e:?}")
            }
            Event::Error { .. } | Event::Left { .. } => panic!("unexpected {e:?}"),
            _ => {}
        }
    }
}

/// (1) A proxy that refuses WebSocket: the SDK long-polls, keeps every reliable message once
/// and in order across a cut poll and a 502, gets transient messages, sends promptly, and
/// keeps trying WebSocket every `ws_retry_after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_websocket_falls_back_to_long_polling() {
    const ROOM: &str = "live:lp";
    const TOTAL: u64 = 200;
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr()).await.expect("proxy");
    proxy.refuse_websocket();
    let deadline = Instant::now() + Duration::from_secs(20);

    // Another terminal, on WebSocket straight to the server, to see the long-poller's chat.
    let (watcher, mut watcher_events) = Client::connect(client_config(
        server.url(),
        "watcher",
        TransportMode::WebSocket,
    ))
    .expect("watcher");
    watcher.join(ROOM, None).await.expect("join");

    let (client, mut events) = Client::connect(ClientConfig {
        ws_retry_after: Duration::from_millis(700),
        poll_wait: Duration::from_secs(5),
        ..client_config(proxy.url(), "poller", TransportMode::Auto)
    })
    .expect("client");
    client.join(ROOM, None).await.expect("join");
    let mut seen = Seen::default();
    loop {
        let e = next_event(&mut events, deadline, "the long-poll join").await;
        seen.record(&e);
        if matches!(e, Event::Joined { .. }) {
            break;
        }
    }
    assert_eq!(seen.connected, vec![Transport::Longpoll]);
    assert_eq!(client.transport(), Some(Transport::Longpoll));
    assert!(proxy.refused() >= 1);
    loop {
        if let Event::Joined { .. } = next_event(&mut watcher_events, deadline, "the watcher").await
        {
            break;
        }
    }

    // A send while the poll is parked goes out at once; the WebSocket terminal sees it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    client
        .send(ROOM, "chat", json!({"text": "from a long-poller"}))
        .await
        .expect("send over long-poll");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "send took {:?}",
        started.elapsed()
    );
    loop {
        match next_event(&mut watcher_events, deadline, "the chat").await {
            Event::Transient(m) => {
                assert_eq!(m.data, json!({"text": "from a long-poller"}));
                break;
            }
            Event::Message(_) | Event::Online { .. } => {}
            other => panic!("{other:?}"),
        }
    }

    // 200 reliable messages; one poll is cut mid-way, then the reconnect gets a 502.
    let publisher = {
        let (api, proxy) = (server.api.clone(), proxy.clone());
        tokio::spawn(async move {
            for n in 1..=TOTAL {
                api.publish(ROOM, "gift", json!({"n": n})).await;
                if n == 60 {
                    proxy.cut();
                }
                if n == 130 {
                    proxy.fail_next_request();
                    proxy.cut();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    while seen.seqs.len() < TOTAL as usize {
        let e = next_event(&mut events, deadline, "all reliable messages").await;
        seen.record(&e);
    }
    publisher.await.expect("publisher");
    assert_eq!(
        seen.seqs,
        (1..=TOTAL).collect::<Vec<_>>(),
        "each once, in order"
    );
    assert!(seen.disconnects >= 1, "the cut ended a poll: {seen:?}");
    assert_eq!(proxy.failed(), 1, "one request got 502");
    assert!(
        seen.connected.iter().all(|t| *t == Transport::Longpoll) && seen.connected.len() >= 2,
        "{:?}",
        seen.connected
    );
    assert!(
        proxy.refused() >= 2,
        "WebSocket is tried again after ws_retry_after"
    );

    // Transient messages arrive while long-polling (published until one is seen: a transient
    // published between two polls is legitimately missed).
    let mut i = 0;
    let published_seen = |seen: &Seen| seen.transients.iter().any(|t| t["i"].is_u64());
    while !published_seen(&seen) {
        i += 1;
        server.api.publish(ROOM, "chat", json!({"i": i})).await;
        let until = (Instant::now() + Duration::from_millis(300)).min(deadline);
        while let Ok(Some(e)) = timeout_at(until, events.recv()).await {
            seen.record(&e);
        }
        assert!(Instant::now() < deadline, "no transient message arrived");
    }
    // The sender is a member of the room too: its own chat comes back to it (once; or twice
    // if it was published while the short poll that carried it was attached beside the
    // parked one, the documented window).
    let own = seen
        .transients
        .iter()
        .filter(|t| t["text"] == "from a long-poller")
        .count();
    assert!((1..=2).contains(&own), "{:?}", seen.transients);
    assert_eq!(seen.seqs.len(), TOTAL as usize, "nothing doubled");

    client.close().await;
    watcher.close().await;
    server.shutdown().await;
}

/// (2) A WebSocket cut again and again: the server answers `transport`, the SDK long-polls,
/// then returns to WebSocket after `retry_ws_after_ms`, with every message once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_websocket_moves_to_long_polling_and_back() {
    const ROOM: &str = "live:flap";
    let server = TestServer::with(|c| {
        c.flap_threshold = 1;
        c.flap_longpoll_for = Duration::from_secs(2);
    })
    .await;
    let proxy = Proxy::start(server.addr()).await.expect("proxy");
    let deadline = Instant::now() + Duration::from_secs(20);

    let (client, mut events) =
        Client::connect(client_config(proxy.url(), "flappy", TransportMode::Auto)).expect("client");
    client.join(ROOM, None).await.expect("join");
    let mut seen = Seen::default();
    loop {
        let e = next_event(&mut events, deadline, "the join").await;
        seen.record(&e);
        if matches!(e, Event::Joined { .. }) {
            break;
        }
    }
    assert_eq!(seen.connected, vec![Transport::Ws]);

    // Publish all along: before, during and after the long-poll period.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (stop, published, api) = (stop.clone(), published.clone(), server.api.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                api.publish(ROOM, "gift", json!({"n": n})).await;
                published.store(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // Cut the WebSocket each time it is up, until the server moves the terminal.
    let cut_soon = |proxy: &Proxy| {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            proxy.cut();
        })
    };
    cut_soon(&proxy);
    let mut moved_at = None;
    let mut back_at = None;
    while back_at.is_none() {
        let e = next_event(&mut events, deadline, "the move to long-polling and back").await;
        seen.record(&e);
        if let Event::Connected { transport, .. } = e {
            match (transport, moved_at) {
                (Transport::Ws, None) => {
                    cut_soon(&proxy);
                }
                (Transport::Longpoll, None) => moved_at = Some(Instant::now()),
                (Transport::Ws, Some(_)) => back_at = Some(Instant::now()),
                (other, _) => panic!("unexpected transport {other:?}"),
            }
        }
    }
    let (moved_at, back_at) = (moved_at.expect("moved"), back_at.expect("back"));
    let lp_period = back_at - moved_at;
    assert!(
        lp_period >= Duration::from_millis(1500) && lp_period < Duration::from_secs(5),
        "long-polled for {lp_period:?}, the server said ~2 s"
    );
    // Keep going a little on the WebSocket, then stop and collect everything.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    publisher.await.expect("publisher");
    let total = published.load(Ordering::SeqCst);
    while seen.seqs.len() < total as usize {
        let e = next_event(&mut events, deadline, "all reliable messages").await;
        seen.record(&e);
    }
    assert_eq!(
        seen.seqs,
        (1..=total).collect::<Vec<_>>(),
        "each once, in order"
    );
    assert!(
        seen.connected.contains(&Transport::Longpoll),
        "{:?}",
        seen.connected
    );
    assert_eq!(seen.connected.last(), Some(&Transport::Ws));
    assert_eq!(client.transport(), Some(Transport::Ws));

    client.close().await;
    server.shutdown().await;
}

/// (3) SSE: receive-only; a replay bigger than the server's queue comes over several streams
/// (each ended by the server after its `prompt`), and a cut stream resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_receives_in_order_and_resumes() {
    const ROOM: &str = "live:sse";
    // Small queues: a 100-message replay does not fit in one stream.
    let server = TestServer::with(|c| c.limits.outbox_frames = 16).await;
    let proxy = Proxy::start(server.addr()).await.expect("proxy");
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in 1..=100 {
        server.api.publish(ROOM, "gift", json!({"n": n})).await;
    }
    let epoch = room_epoch(&server.api, ROOM).await;

    let (client, mut events) =
        Client::connect(client_config(proxy.url(), "sse", TransportMode::Sse)).expect("client");
    assert!(matches!(
        client.send(ROOM, "chat", json!({})).await,
        Err(ClientError::Unsupported(_))
    ));
    assert!(matches!(
        client.ack_inbox(1).await,
        Err(ClientError::Unsupported(_))
    ));
    client
        .join(ROOM, Some(Position { epoch, seq: 0 }))
        .await
        .expect("join");
    let mut seen = Seen::default();
    while seen.seqs.len() < 100 {
        let e = next_event(&mut events, deadline, "the replay").await;
        seen.record(&e);
    }
    assert!(
        seen.connected.len() >= 3,
        "the replay took several streams: {:?}",
        seen.connected
    );
    assert!(seen.connected.iter().all(|t| *t == Transport::Sse));

    let publisher = {
        let (api, proxy) = (server.api.clone(), proxy.clone());
        tokio::spawn(async move {
            for n in 101..=200 {
                api.publish(ROOM, "gift", json!({"n": n})).await;
                if n == 150 {
                    proxy.cut();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    while seen.seqs.len() < 200 {
        let e = next_event(&mut events, deadline, "the live messages").await;
        seen.record(&e);
    }
    publisher.await.expect("publisher");
    assert_eq!(
        seen.seqs,
        (1..=200).collect::<Vec<_>>(),
        "each once, in order"
    );
    assert!(seen.disconnects >= 1, "the cut ended the stream");
    assert_eq!(client.transport(), Some(Transport::Sse));

    client.close().await;
    server.shutdown().await;
}

/// (4) Long-poll specifics: a dev-mode server's anonymous terminal id is sent back, so the
/// terminal keeps its id across polls and reconnects; a refused token (HTTP 401) is reported
/// like a refused WebSocket `connect` and stops the client after `auth_failure_limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_keeps_the_dev_terminal_and_reports_refused_tokens() {
    let server = TestServer::with(|c| c.dev = true).await;
    let proxy = Proxy::start(server.addr()).await.expect("proxy");
    let deadline = Instant::now() + Duration::from_secs(10);

    let (client, mut events) = Client::connect(ClientConfig {
        token: None,
        ..client_config(proxy.url(), "unused", TransportMode::LongPoll)
    })
    .expect("client");
    client.join("live:dev", None).await.expect("join");
    let mut terminals = Vec::new();
    let mut joined = 0;
    while terminals.len() < 2 || joined < 2 {
        match next_event(&mut events, deadline, "two long-poll sessions").await {
            Event::Connected {
                terminal,
                transport,
            } => {
                assert_eq!(transport, Transport::Longpoll);
                terminals.push(terminal);
            }
            Event::Joined { recovered, .. } => {
                assert!(recovered);
                joined += 1;
                if joined == 1 {
                    // Let the poll park, then break it.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    proxy.cut();
                }
            }
            Event::Disconnected { .. } | Event::Online { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(terminals[0].starts_with("anon-"), "{terminals:?}");
    assert_eq!(terminals[0], terminals[1], "the anonymous id is kept");
    let list = server.api.get("/v1/terminals").await;
    let anon = list["terminals"]
        .as_array()
        .expect("terminals")
        .iter()
        .filter(|t| {
            t["terminal"]
                .as_str()
                .is_some_and(|id| id.starts_with("anon-"))
        })
        .count();
    assert_eq!(anon, 1, "{list}");
    client.close().await;

    let (client, mut events) = Client::connect(ClientConfig {
        token: Some("not-a-token".into()),
        auth_failure_limit: Some(2),
        ..client_config(proxy.url(), "unused", TransportMode::LongPoll)
    })
    .expect("client");
    for _ in 0..2 {
        match next_event(&mut events, deadline, "the refusal").await {
            Event::Error { code, room, .. } => {
                assert_eq!(
                    (code, room),
                    (livepush_client::ErrorCode::Unauthorized, None)
                )
            }
            other => panic!("{other:?}"),
        }
    }
    // Stopped: no third attempt (the back-off is at most 200 ms here).
    let quiet = tokio::time::timeout(Duration::from_millis(600), events.recv()).await;
    assert!(quiet.is_err(), "{quiet:?}");
    assert!(!client.is_connected());
    client.close().await;
    server.shutdown().await;
}

/// Events up to the delivery of reliable message `seq` of `room`, which must come in order
/// after `from`; what else came, except `Online` counts, is returned.
async fn until_seq(
    events: &mut Events,
    room: &str,
    from: u64,
    seq: u64,
    deadline: Instant,
) -> Vec<Event> {
    let mut next_seq = from;
    let mut other = Vec::new();
    while next_seq <= seq {
        match next_event(events, deadline, "the messages").await {
            Event::Message(m) => {
                assert_eq!((m.room.as_str(), m.seq), (room, next_seq), "{m:?}");
                assert_eq!(m.data, json!({"n": m.seq}));
                next_seq += 1;
            }
            Event::Online { .. } => {}
            e => other.push(e),
        }
    }
    other
}

/// Events up to the first that `done` accepts (included), except `Online` counts.
async fn until_event(
    events: &mut Events,
    deadline: Instant,
    what: &str,
    done: impl Fn(&Event) -> bool,
) -> Vec<Event> {
    let mut seen = Vec::new();
    while !seen.last().is_some_and(&done) {
        let e = next_event(events, deadline, what).await;
        if !matches!(e, Event::Online { .. }) {
            seen.push(e);
        }
    }
    seen
}

/// A long-poll client of `server` as `sub` that polls every 300 ms when idle, following
/// `room` from `since`.
async fn polling_from(server: &str, sub: &str, room: &str, since: Position) -> (Client, Events) {
    let (client, events) = Client::connect(ClientConfig {
        poll_wait: Duration::from_millis(300),
        ..client_config(server.to_owned(), sub, TransportMode::LongPoll)
    })
    .expect("client");
    client.join(room, Some(since)).await.expect("join");
    (client, events)
}

/// `room` stays at `at` over several polls (quiet resumes: no event), then the next
/// message, `at.seq + 1`, is delivered and nothing else happens.
async fn stays_at(
    (client, events): (&Client, &mut Events),
    api: &Api,
    room: &str,
    at: Position,
    deadline: Instant,
) {
    assert_eq!(client.position(room), Some(at.clone()));
    let until = Instant::now() + Duration::from_millis(1200);
    while let Ok(Some(e)) = timeout_at(until, events.recv()).await {
        assert!(matches!(e, Event::Online { .. }), "{e:?}");
    }
    assert_eq!(client.position(room), Some(at.clone()));
    let n = at.seq + 1;
    api.publish(room, "gift", json!({"n": n})).await;
    let seen = until_seq(events, room, n, n, deadline).await;
    assert!(seen.is_empty(), "{seen:?}");
}

fn position(epoch: &str, seq: u64) -> Position {
    Position {
        epoch: epoch.to_owned(),
        seq,
    }
}

/// (5) Contract v1.1, decision 4: a long-poll client whose position is behind what the
/// history keeps is answered `recovered:false` once and the replay moves its position past
/// what is gone; one whose position is beyond the room's latest seq (the server lost
/// messages it had delivered) gets no replay and moves back to `joined.seq`. The following
/// polls are resumed quietly: no second `recovered:false`, nothing lost twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_behind_the_history_skips_what_is_gone_once() {
    const ROOM: &str = "live:behind";
    const AHEAD: &str = "live:ahead";
    let server = TestServer::with(|c| c.history_size = 5).await;
    let (url, api) = (server.url(), &server.api);
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in 1..=20 {
        api.publish(ROOM, "gift", json!({"n": n})).await;
    }
    for n in 1..=3 {
        api.publish(AHEAD, "gift", json!({"n": n})).await;
    }
    let epoch = room_epoch(api, ROOM).await;
    let (client, mut events) = polling_from(&url, "behind", ROOM, position(&epoch, 3)).await;
    let seen = until_seq(&mut events, ROOM, 16, 20, deadline).await;
    assert!(
        matches!(
            seen.as_slice(),
            [
                Event::Connected {
                    transport: Transport::Longpoll,
                    ..
                },
                Event::Joined {
                    seq: 20,
                    recovered: false,
                    resumed: true,
                    ..
                },
                Event::Lost {
                    first: 4,
                    last: 15,
                    ..
                },
            ]
        ),
        "{seen:?}"
    );
    let polling = (&client, &mut events);
    stays_at(polling, api, ROOM, position(&epoch, 20), deadline).await;

    client.leave(ROOM).await.expect("leave");
    let epoch = room_epoch(api, AHEAD).await;
    client
        .join(AHEAD, Some(position(&epoch, 10)))
        .await
        .expect("join");
    let seen = until_event(&mut events, deadline, "the join from ahead", |e| {
        matches!(e, Event::Joined { .. })
    })
    .await;
    assert!(
        matches!(
            seen.as_slice(),
            [Event::Joined {
                seq: 3,
                recovered: false,
                resumed: true,
                ..
            }]
        ),
        "nothing lost: {seen:?}"
    );
    let polling = (&client, &mut events);
    stays_at(polling, api, AHEAD, position(&epoch, 3), deadline).await;
    client.close().await;
    server.shutdown().await;
}

/// (6) Contract v1.1, decision 4, with no replay at all: the room's history expired, so the
/// `joined{recovered:false}` is followed by nothing; the position moves to `joined.seq`
/// (the seqs after the old one are reported lost) and the following polls resume quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_after_the_history_expired_moves_to_the_latest_seq_once() {
    const ROOM: &str = "live:expired";
    let server = TestServer::with(|c| {
        c.history_ttl = Duration::from_millis(300);
        c.limits.online_interval = Duration::from_millis(50);
    })
    .await;
    let (url, api) = (server.url(), &server.api);
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in 1..=3 {
        api.publish(ROOM, "gift", json!({"n": n})).await;
    }
    let epoch = room_epoch(api, ROOM).await;
    let history = format!("/v1/rooms/{ROOM}/history?since=0");
    let every = Duration::from_millis(50);
    wait_until("the history to expire", deadline, every, || async {
        api.get(&history).await["messages"] == json!([])
    })
    .await;
    let (client, mut events) = polling_from(&url, "expired", ROOM, position(&epoch, 1)).await;
    let seen = until_event(&mut events, deadline, "the loss", |e| {
        matches!(e, Event::Lost { .. })
    })
    .await;
    assert!(
        matches!(
            seen.as_slice(),
            [
                Event::Connected { .. },
                Event::Joined {
                    seq: 3,
                    recovered: false,
                    ..
                },
                Event::Lost {
                    first: 2,
                    last: 3,
                    ..
                },
            ]
        ),
        "{seen:?}"
    );
    let polling = (&client, &mut events);
    stays_at(polling, api, ROOM, position(&epoch, 3), deadline).await;
    client.close().await;
    server.shutdown().await;
}

/// (7) Contract v1.1, decision 5: a long-poll client that closes (or whose every handle is
/// dropped) says `bye`: the server shows it offline, and out of its room, at once, though
/// its poll grace period is 10 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_client_that_closes_is_offline_at_once() {
    const ROOM: &str = "live:bye";
    let server = TestServer::with(|c| c.poll_grace = Duration::from_secs(600)).await;
    let (url, api) = (server.url(), &server.api);
    let deadline = Instant::now() + Duration::from_secs(10);
    let online = async |who: &str| api.terminal(who).await["online"].clone();
    let room_online = async || api.room(ROOM).await["online"].clone();

    for who in ["leaver", "dropper"] {
        let (client, mut events) = Client::connect(ClientConfig {
            poll_wait: Duration::from_secs(5),
            ..client_config(url.clone(), who, TransportMode::LongPoll)
        })
        .expect("client");
        client.join(ROOM, None).await.expect("join");
        while !matches!(
            next_event(&mut events, deadline, "the join").await,
            Event::Joined { .. }
        ) {}
        // Let the next poll park.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(online(who).await, json!(true));
        assert_eq!(room_online().await, json!(1));
        if who == "leaver" {
            client.close().await;
            assert_eq!(
                online(who).await,
                json!(false),
                "offline once close returns"
            );
        } else {
            // Every handle dropped: the client leaves in the background.
            drop(client);
            let every = Duration::from_millis(20);
            wait_until("it to be offline", deadline, every, || async {
                online(who).await == json!(false)
            })
            .await;
        }
        assert_eq!(room_online().await, json!(0), "{who} left the room");
    }
    server.shutdown().await;
}

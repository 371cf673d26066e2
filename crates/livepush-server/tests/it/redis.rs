//! Several nodes on one Redis: each test starts its own `redis-server` on a free port (no
//! persistence), so killing or flushing it harms nobody, and several in-process servers, each
//! with its own Redis engine (its own connections): separate nodes.

use std::time::Duration;

use livepush_proto::ServerFrame;
use livepush_server::engine::Retention;
use livepush_server::engine::redis::{RedisEngine, RedisSettings};
use serde_json::{Value, json};

use crate::redis_server::Redis;
use crate::support::*;

/// A node: a server on its own Redis engine.
async fn node(redis: &Redis, prefix: &str) -> TestServer {
    node_with(redis, prefix, config()).await
}

/// A node with its own settings.
pub(crate) async fn node_with(
    redis: &Redis,
    prefix: &str,
    c: livepush_server::Config,
) -> TestServer {
    let engine = RedisEngine::connect(RedisSettings {
        url: redis.url(),
        prefix: prefix.to_owned(),
        timeout: Duration::from_secs(2),
        retention: Retention {
            max_messages: c.history_size,
            ttl: c.history_ttl,
        },
        inbox_size: c.inbox_size,
    })
    .await
    .expect("redis engine");
    TestServer::of(
        livepush_server::start_with_engine(c, engine)
            .await
            .expect("node starts"),
    )
}

/// Three nodes, a terminal on each, publishers on every node: every terminal gets every
/// reliable message once, in order, and a transient one from another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_every_message_once_in_order() {
    let redis = Redis::start();
    let nodes = [
        node(&redis, "t3").await,
        node(&redis, "t3").await,
        node(&redis, "t3").await,
    ];
    let mut terminals = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut t = n.terminal(&format!("v{i}"), &["r3"], false).await;
        let (_, seq, recovered) = joined(&t.join("r3", None).await);
        assert_eq!((seq, recovered), (0, true));
        terminals.push(t);
    }
    const N: u64 = 60;
    for k in 0..N {
        let (status, body) = nodes[(k % 3) as usize]
            .post(
                "/v1/rooms/r3/messages",
                json!({"type":"gift","data":{"k":k}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["seq"], k + 1, "one sequence across nodes");
    }
    for t in &mut terminals {
        assert_eq!(t.reliable(N as usize).await, (1..=N).collect::<Vec<_>>());
    }
    // A transient message from node 2 reaches the terminals of nodes 0 and 1 once.
    nodes[2]
        .post(
            "/v1/rooms/r3/messages",
            json!({"type":"chat","data":{"hi":1}}),
        )
        .await;
    for t in &mut terminals {
        loop {
            match t.next().await {
                ServerFrame::Msg(m) if m.seq.is_none() => break,
                ServerFrame::Online { .. } => {}
                other => panic!("{other:?}"),
            }
        }
    }
    // Every node answers the same about the room.
    for n in &nodes {
        let room = n.room("r3").await;
        assert_eq!(room["seq"], N);
    }
}

/// A terminal that reconnects to another node resumes exactly as on the same node, and
/// long-polls may land on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_and_long_poll_anywhere() {
    let redis = Redis::start();
    let a = node(&redis, "anywhere").await;
    let b = node(&redis, "anywhere").await;
    let mut t = a.terminal("t", &["ra"], false).await;
    let (epoch, _, _) = joined(&t.join("ra", None).await);
    for k in 1..=3 {
        a.post("/v1/rooms/ra/messages", json!({"type":"gift","data":k}))
            .await;
    }
    assert_eq!(t.reliable(3).await, [1, 2, 3]);
    drop(t);
    for k in 4..=6 {
        b.post("/v1/rooms/ra/messages", json!({"type":"gift","data":k}))
            .await;
    }
    let mut t = b.terminal("t", &["ra"], false).await;
    let (e2, seq, recovered) = joined(&t.join("ra", Some((&epoch, 3))).await);
    assert_eq!((e2.as_str(), seq, recovered), (epoch.as_str(), 6, true));
    assert_eq!(t.reliable(3).await, [4, 5, 6]);

    // Long-poll: consecutive polls on different nodes.
    let token = a.token("p", &["ra"], false);
    let poll = |s: &TestServer, body: Value| {
        let http = s.http.clone();
        let url = format!("{}/v1/poll", s.url());
        async move {
            let v: Value = http
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["frames"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| ServerFrame::parse(&f.to_string()).unwrap())
                .collect::<Vec<_>>()
        }
    };
    let first = poll(
        &a,
        json!({"token":token,"rooms":{"ra":{"epoch":epoch,"seq":4}},"wait_ms":0}),
    )
    .await;
    assert_eq!(seqs(&first), [5, 6]);
    let parked = tokio::spawn(poll(
        &b,
        json!({"token":token,"rooms":{"ra":{"epoch":epoch,"seq":6}},"wait_ms":10_000}),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.post("/v1/rooms/ra/messages", json!({"type":"gift","data":7}))
        .await;
    assert_eq!(seqs(&parked.await.unwrap()), [7]);
}

/// Redis lost its data (FLUSHALL): the rooms get a new epoch and their members are told
/// `joined{recovered:false}`; never a repeated seq under the old epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_redis_moves_rooms_to_a_new_epoch() {
    let redis = Redis::start();
    let a = node(&redis, "flush").await;
    let b = node(&redis, "flush").await;
    let mut t = b.terminal("t", &["rf"], false).await;
    let (old, _, _) = joined(&t.join("rf", None).await);
    a.post("/v1/rooms/rf/messages", json!({"type":"gift","data":1}))
        .await;
    assert_eq!(t.reliable(1).await, [1]);
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    // The nodes notice at their next upkeep (once a second), or at the next publish.
    let (status, body) = a
        .post("/v1/rooms/rf/messages", json!({"type":"gift","data":2}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(
        body["epoch"],
        old.as_str(),
        "a new history, not seq 1 again under the old one"
    );
    match t.next_significant().await {
        ServerFrame::Joined {
            epoch, recovered, ..
        } => {
            assert_ne!(epoch, old);
            assert!(!recovered);
        }
        other => panic!("expected the epoch change before any message: {other:?}"),
    }
    assert_eq!(t.reliable(1).await, [1], "seq 1 of the new epoch");
}

/// The subscription connection is killed mid-stream: delivery resumes by itself, nothing is
/// lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscription_connection_loses_nothing() {
    let redis = Redis::start();
    let a = node(&redis, "kill").await;
    let b = node(&redis, "kill").await;
    let mut t = b.terminal("t", &["rk"], false).await;
    joined(&t.join("rk", None).await);
    let publisher = {
        let http = a.http.clone();
        let url = a.url();
        tokio::spawn(async move {
            for k in 1..=200u64 {
                let r = http
                    .post(format!("{url}/v1/rooms/rk/messages"))
                    .bearer_auth(KEY)
                    .json(&json!({"type":"gift","data":k}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    }
    publisher.await.unwrap();
    assert_eq!(t.reliable(200).await, (1..=200).collect::<Vec<_>>());
}

/// Redis unreachable: reliable publishes answer 503 (never a seq that is not stored), and
/// Redis must not evict keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_answers_unavailable() {
    let mut redis = Redis::start();
    let a = node(&redis, "down").await;
    let mut t = a.terminal("t", &["rd"], false).await;
    joined(&t.join("rd", None).await);
    a.post("/v1/rooms/rd/messages", json!({"type":"gift","data":1}))
        .await;
    assert_eq!(t.reliable(1).await, [1]);
    redis.kill();
    let (status, body) = a
        .post("/v1/rooms/rd/messages", json!({"type":"gift","data":2}))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    let (status, health) = a.get("/healthz").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("degraded")));
    // Transient messages still reach this node's members.
    let (status, _) = a
        .post(
            "/v1/rooms/rd/messages",
            json!({"type":"chat","data":{"x":1}}),
        )
        .await;
    assert_eq!(status, 200);
    loop {
        match t.next().await {
            ServerFrame::Msg(m) if m.seq.is_none() => break,
            ServerFrame::Msg(m) => panic!("a reliable message that Redis never stored: {m:?}"),
            _ => {}
        }
    }

    let other = Redis::start();
    other.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let refused = RedisEngine::connect(RedisSettings {
        url: other.url(),
        prefix: "x".into(),
        timeout: Duration::from_secs(2),
        retention: Retention {
            max_messages: 10,
            ttl: Duration::from_secs(60),
        },
        inbox_size: 10,
    })
    .await;
    let e = refused
        .expect_err("an evicting Redis is refused")
        .to_string();
    assert!(e.contains("noeviction"), "{e}");
}

/// A direct message posted to one node reaches the terminal's session on another node, and
/// what it did not acknowledge comes again when it connects to a third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inboxes_are_shared_between_nodes() {
    let redis = Redis::start();
    let a = node(&redis, "inbox").await;
    let b = node(&redis, "inbox").await;
    let c = node(&redis, "inbox").await;
    let mut t = b.terminal("box", &[], false).await;
    let (status, body) = a
        .post(
            "/v1/terminals/box/messages",
            json!({"type":"notice","data":{"n":1}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["seq"], 1);
    loop {
        match t.next().await {
            ServerFrame::Inbox { seq, data, .. } => {
                assert_eq!((seq, data), (1, json!({"n":1})));
                break;
            }
            ServerFrame::Online { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    drop(t);
    a.post(
        "/v1/terminals/box/messages",
        json!({"type":"notice","data":{"n":2}}),
    )
    .await;
    let mut ws = Ws::open(&c.ws_url()).await;
    ws.send(json!({"op":"connect","token":c.token("box", &[], false)}))
        .await;
    match ws.next().await {
        ServerFrame::Connected { inbox, .. } => {
            assert_eq!((inbox.seq, inbox.acked, inbox.pending), (2, 0, 2));
        }
        other => panic!("{other:?}"),
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        if let ServerFrame::Inbox { seq, .. } = ws.next().await {
            got.push(seq);
        }
    }
    assert_eq!(got, [1, 2]);
}

/// Presence across nodes: a room's online count counts each terminal once across all nodes,
/// every node answers the same, and members on every node are told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_counts_each_terminal_once_across_nodes() {
    let redis = Redis::start();
    let a = node(&redis, "pres").await;
    let b = node(&redis, "pres").await;
    let mut t1a = a.terminal("t1", &["rp"], false).await;
    joined(&t1a.join("rp", None).await);
    let mut t1b = b.terminal("t1", &["rp"], false).await;
    joined(&t1b.join("rp", None).await);
    let mut t2 = b.terminal("t2", &["rp"], false).await;
    joined(&t2.join("rp", None).await);
    for n in [&a, &b] {
        n.eventually(
            "two terminals, counted once each, on every node",
            || async { n.room("rp").await["online"] == 2 },
        )
        .await;
    }
    // Members on node a are told the count (t1 twice, t2 once: 2).
    loop {
        if let ServerFrame::Online { count: 2, .. } = t1a.next().await {
            break;
        }
    }
    drop(t1b);
    drop(t2);
    for n in [&a, &b] {
        n.eventually("t2 gone; t1 still there on node a", || async {
            n.room("rp").await["online"] == 1
        })
        .await;
    }
}

/// The wake datagram leaves from the node whose socket received the terminal's keepalive
/// (that socket holds the NAT mapping), whichever node the message was posted to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_leaves_from_the_node_that_received_the_keepalive() {
    let redis = Redis::start();
    let a = node(&redis, "wake").await;
    let b = node(&redis, "wake").await;
    let sleeper = crate::inbox::Sleeper::new(&a, "sleepy").await;
    sleeper.keepalive().await;
    b.eventually("node b to know the registration", || async {
        b.get("/v1/terminals/sleepy").await.1["wake"]["registered"] == json!(true)
    })
    .await;
    let (wake, from) = post_and_wake(&b, &sleeper).await;
    assert_eq!(wake.inbox, 1);
    assert_eq!(Some(from), a.running.wake_addr(), "from node a's socket");
}

/// Post a notice to the sleeping terminal through `node`: a wake is sent, and reaches it.
async fn post_and_wake(
    node: &TestServer,
    sleeper: &crate::inbox::Sleeper,
) -> (livepush_proto::wake::Wake, std::net::SocketAddr) {
    let (status, body) = node
        .post(
            "/v1/terminals/sleepy/messages",
            json!({"type":"notice","data":{}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["wake"], "sent");
    sleeper
        .wake_from(Duration::from_secs(5))
        .await
        .expect("a wake datagram reaches the terminal")
}

/// A room nobody on a node uses any more is closed there after `room_idle`: the node forgets
/// it and unsubscribes from its channel. The next join opens it again, resumes from Redis and
/// receives what other nodes publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_room_is_closed_and_reopened_on_the_next_join() {
    let redis = Redis::start();
    let mut c = config();
    c.room_idle = Duration::from_millis(300);
    c.limits.online_interval = Duration::from_millis(100);
    let a = node_with(&redis, "idle", c).await;
    let b = node(&redis, "idle").await;
    let subscribers = || {
        redis
            .cli(&["PUBSUB", "NUMSUB", "idle:ch:{ri}"])
            .lines()
            .nth(1)
            .unwrap_or("")
            .to_owned()
    };
    let rooms_on_a = || a.running.app().hub.room_count();
    let until = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + WAIT;
        while !f() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    let mut t = a.terminal("t", &["ri"], false).await;
    let (epoch, _, _) = joined(&t.join("ri", None).await);
    until("the joined room is subscribed", &|| subscribers() == "1");
    drop(t);
    until("the idle room is closed on a", &|| rooms_on_a() == 0);
    until("and unsubscribed", &|| subscribers() == "0");

    b.publish("ri", "gift", json!(1)).await;
    let mut t = a.terminal("t", &["ri"], false).await;
    let (again, seq, recovered) = joined(&t.join("ri", Some((&epoch, 0))).await);
    assert_eq!((again.as_str(), seq, recovered), (epoch.as_str(), 1, true));
    assert_eq!(t.reliable(1).await, [1], "what it missed, from Redis");
    assert_eq!(subscribers(), "1", "subscribed again");
    b.publish("ri", "gift", json!(2)).await;
    assert_eq!(t.reliable(1).await, [2], "and live from the other node");
    assert_eq!(rooms_on_a(), 1);
}

/// A keepalive captured on the path and replayed from another address to another node is
/// refused there (its registration is not newer than the one Redis holds), so it cannot
/// redirect the terminal's wakes: before the fix Redis held only the first registration of
/// an address, and node b accepted the replay of a later keepalive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_keepalive_is_refused_on_every_node() {
    let redis = Redis::start();
    let a = node(&redis, "ka").await;
    let b = node(&redis, "ka").await;
    let sleeper = crate::inbox::Sleeper::new(&a, "sleepy").await;
    let a_wake = a.running.wake_addr().expect("wake listener");
    sleeper.keepalive().await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let captured = sleeper.keepalive_datagram();
    sleeper.send(&captured, a_wake).await;
    let ts = livepush_proto::wake::Keepalive::parse(&captured)
        .unwrap()
        .ts;
    let deadline = std::time::Instant::now() + WAIT;
    while !redis
        .cli(&["HGET", "ka:term:{sleepy}", "wake"])
        .contains(&format!(" {ts} "))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the second keepalive's registration in Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b_wake = b.running.wake_addr().expect("wake listener");
    attacker.send_to(&captured, b_wake).await.unwrap();
    let replayed = r#"livepush_wake_keepalives_total{reason="replayed"} 1"#;
    b.eventually("node b to count the replay", || async {
        b.get_raw_with_key("/metrics").await.contains(replayed)
    })
    .await;

    let (wake, _) = post_and_wake(&b, &sleeper).await;
    assert_eq!(wake.inbox, 1);
    let mut buf = [0u8; 512];
    let stolen =
        tokio::time::timeout(Duration::from_millis(500), attacker.recv_from(&mut buf)).await;
    assert!(stolen.is_err(), "no wake went to the replaying address");
}

/// The service list answers the same on every node: a terminal connected to node a is online
/// over WebSocket on node b's `GET /v1/terminals/{id}` and in its `?online=true` list, and
/// offline on both once it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_list_is_the_same_on_every_node() {
    let redis = Redis::start();
    let a = node(&redis, "svc").await;
    let b = node(&redis, "svc").await;
    let t = a.terminal("viewer", &["r"], false).await;
    let seen = viewer_online("b", &b, true).await;
    assert_eq!(seen["transports"], json!(["ws"]));
    assert!(seen["last_seen_ms"].as_u64().unwrap() > 0);
    viewer_online("a", &a, true).await;
    drop(t);
    viewer_online("b", &b, false).await;
    viewer_online("a", &a, false).await;
}

/// Waits until `node` says terminal `viewer` is online (or not) in both its answers; returns
/// its `GET /v1/terminals/viewer`.
async fn viewer_online(node: &str, s: &TestServer, want: bool) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, one) = s.get("/v1/terminals/viewer").await;
        let (_, list) = s.get("/v1/terminals?online=true").await;
        let listed = list["terminals"]
            .as_array()
            .is_some_and(|l| l.iter().any(|t| t["terminal"] == "viewer"));
        if one["online"] == want && listed == want {
            return one;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {node}: online {want}: {one} {list}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Redis restarted mid-stream (SIGKILL, then started again on the same port). With an
/// append-only file every answered message survives and members notice nothing: the same
/// epoch, the next seq, no `joined` in between. Without persistence the room moves to a new
/// epoch and its members are told `joined{recovered:false}` before its seq 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_loses_nothing_it_kept_and_says_so_when_it_did_not() {
    for persistent in [true, false] {
        let mut redis = if persistent {
            Redis::start_persistent()
        } else {
            Redis::start()
        };
        let a = node(&redis, "restart").await;
        let b = node(&redis, "restart").await;
        let mut t = b.terminal("t", &["rr"], false).await;
        let (epoch, _, _) = joined(&t.join("rr", None).await);
        for k in 1..=20 {
            a.publish("rr", "gift", json!(k)).await;
        }
        assert_eq!(t.reliable(20).await, (1..=20).collect::<Vec<_>>());
        redis.restart();
        // The nodes reconnect by themselves; until then a publish is refused, never sequenced.
        let deadline = std::time::Instant::now() + WAIT;
        let body = loop {
            let (status, body) = a
                .post("/v1/rooms/rr/messages", json!({"type":"gift","data":21}))
                .await;
            if status == 200 {
                break body;
            }
            assert_eq!(status, 503, "{body}");
            assert!(std::time::Instant::now() < deadline, "no node came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if persistent {
            assert_eq!(
                (body["epoch"].as_str(), body["seq"].as_u64()),
                (Some(epoch.as_str()), Some(21))
            );
            match t.next_significant().await {
                ServerFrame::Msg(m) => assert_eq!(m.seq, Some(21)),
                other => panic!("persistent Redis: expected seq 21 and nothing else: {other:?}"),
            }
        } else {
            assert_ne!(body["epoch"], epoch.as_str());
            assert_eq!(body["seq"], 1);
            match t.next_significant().await {
                ServerFrame::Joined {
                    epoch: e,
                    recovered,
                    ..
                } => {
                    assert_ne!(e, epoch);
                    assert!(!recovered);
                }
                other => panic!("empty Redis: expected the new epoch first: {other:?}"),
            }
            assert_eq!(t.reliable(1).await, [1]);
        }
    }
}

/// The next direct message of `t`: its seq and data (other frames skipped).
async fn next_inbox(t: &mut Ws) -> (u64, Value) {
    loop {
        if let ServerFrame::Inbox { seq, data, .. } = t.next().await {
            return (seq, data);
        }
    }
}

/// A node follows the inboxes of its terminals on its own channel: connected terminals add
/// no subscription (one each cost memory on the node and in Redis), and a direct message
/// posted on another node still reaches each of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inboxes_reach_their_node_without_a_subscription_per_terminal() {
    let redis = Redis::start();
    let a = node(&redis, "hold").await;
    let b = node(&redis, "hold").await;
    let channels = || redis.cli(&["PUBSUB", "CHANNELS", "hold:*"]).lines().count();
    let before = channels();
    let mut held = Vec::new();
    for k in 0..10 {
        held.push(a.terminal(&format!("h{k}"), &[], false).await);
    }
    assert_eq!(channels(), before, "a subscription per terminal");
    for (k, t) in held.iter_mut().enumerate() {
        let (status, body) = b
            .post(
                &format!("/v1/terminals/h{k}/messages"),
                json!({"type":"notice","data":k}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(next_inbox(t).await, (1, json!(k)));
    }
}

/// A hand-over lost on the way (here: a post made while Redis did not list the node as the
/// terminal's holder, as after a lost subscription) shows as a seq past the next one: the
/// node reads the inbox again, and the terminal gets what it missed, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_inbox_hand_over_is_read_again() {
    let redis = Redis::start();
    let a = node(&redis, "gap").await;
    let b = node(&redis, "gap").await;
    let mut t = a.terminal("g", &[], false).await;
    let post = |n: u64| {
        b.post(
            "/v1/terminals/g/messages",
            json!({"type":"notice","data":n}),
        )
    };
    assert_eq!(post(1).await.0, 200);
    assert_eq!(next_inbox(&mut t).await, (1, json!(1)));
    // Both nodes hold it now: a for the session, b since it posted (to wake it if need be).
    let holders = redis.cli(&["SMEMBERS", "gap:at:{g}"]);
    assert_eq!(holders.lines().count(), 2, "{holders}");
    redis.cli(&["DEL", "gap:at:{g}"]);
    assert_eq!(post(2).await.0, 200);
    for holder in holders.lines() {
        redis.cli(&["SADD", "gap:at:{g}", holder]);
    }
    assert_eq!(post(3).await.0, 200);
    assert_eq!(next_inbox(&mut t).await, (2, json!(2)));
    assert_eq!(next_inbox(&mut t).await, (3, json!(3)));
}

/// Behind a balancer a flapping terminal's WebSocket sessions are spread over the nodes, so
/// no node alone may see more than the threshold: the nodes add up what each saw, and the
/// terminal is moved to long-polling as on one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_flapping_across_nodes_is_moved_to_long_polling() {
    let redis = Redis::start();
    let c = livepush_server::Config {
        flap_threshold: 2,
        ..config()
    };
    let a = node_with(&redis, "flap", c.clone()).await;
    let b = node_with(&redis, "flap", c).await;
    // Three abrupt ends (> threshold 2): two on a, one on b.
    for (i, n) in [&a, &b, &a].into_iter().enumerate() {
        drop(n.terminal("flip", &[], false).await);
        b.eventually("every node's interruptions to add up", || async {
            b.get("/v1/terminals/flip").await.1["interruptions"]["count"] == json!(i + 1)
        })
        .await;
    }
    let mut ws = Ws::open(&b.ws_url()).await;
    ws.send(json!({"op":"connect","token":b.token("flip", &[], false)}))
        .await;
    match ws.next().await {
        ServerFrame::Transport { use_, .. } => {
            assert_eq!(use_, livepush_proto::Transport::Longpoll);
        }
        other => panic!("expected transport, got {other:?}"),
    }
}

/// Redis keeps every accepted keepalive's `ts`, so a node that just started needs no replay
/// floor of its own (the single node's guard against keepalives captured before a restart,
/// which holds back address changes for `--wake-max-skew`): a terminal that moved to another
/// address is followed there at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_follows_a_terminal_that_moved_at_once() {
    let redis = Redis::start();
    let a = node(&redis, "moved").await;
    let before = crate::inbox::Sleeper::new(&a, "sleepy").await;
    before.keepalive().await;
    let deadline = std::time::Instant::now() + WAIT;
    while redis
        .cli(&["HGET", "moved:term:{sleepy}", "wake"])
        .is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "the registration");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = node(&redis, "moved").await;
    let after = crate::inbox::Sleeper::new(&b, "sleepy").await;
    after.keepalive().await;
    let accepted = r#"livepush_wake_keepalives_total{reason="accepted"} 1"#;
    b.eventually(
        "node b to accept the moved terminal's keepalive",
        || async { b.get_raw_with_key("/metrics").await.contains(accepted) },
    )
    .await;
    let (wake, _) = post_and_wake(&b, &after).await;
    assert_eq!(wake.inbox, 1);
}

/// A batch publish through Redis (one pipeline): each message sequenced in Redis, in order,
/// one answer each, and delivered on another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_publish_is_sequenced_in_redis() {
    let redis = Redis::start();
    let a = node(&redis, "batch").await;
    let b = node(&redis, "batch").await;
    let mut t = b.terminal("t", &["x"], false).await;
    joined(&t.join("x", None).await);
    let messages: Vec<Value> = (1..=5)
        .map(|k| json!({"room": if k % 2 == 0 { "y" } else { "x" }, "type":"gift","data":k}))
        .collect();
    let (status, body) = a.post("/v1/publish", json!({ "messages": messages })).await;
    assert_eq!(status, 200, "{body}");
    let seqs: Vec<u64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().expect("a seq"))
        .collect();
    assert_eq!(seqs, [1, 1, 2, 2, 3]);
    assert_eq!(t.reliable(3).await, [1, 2, 3]);
    let metrics = a.get_raw_with_key("/metrics").await;
    assert!(metrics.contains("livepush_engine_calls_total"), "{metrics}");
    assert!(
        metrics.contains("livepush_engine_errors_total 0"),
        "{metrics}"
    );
}

/// A room's keys expire once its history's retention (plus a margin) has passed since its last
/// write, so unused rooms leave Redis; a room with flags keeps its hash, only its stream expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_keys_expire_after_the_history_retention() {
    use livepush_server::engine::redis::ROOM_KEY_MARGIN;
    let redis = Redis::start();
    let mut c = config();
    c.history_ttl = Duration::from_secs(5);
    let most = (c.history_ttl + ROOM_KEY_MARGIN).as_millis() as i64;
    let a = node_with(&redis, "exp", c).await;
    let pttl = |key: &str| -> i64 { redis.cli(&["PTTL", key]).parse().expect("an integer") };
    let publish = async |room: &str, body: Value| {
        let (status, answer) = a.post(&format!("/v1/rooms/{room}/messages"), body).await;
        assert_eq!(status, 200, "{answer}");
    };
    publish("rx", json!({"type":"gift","data":1})).await;
    for key in ["exp:room:{rx}", "exp:hist:{rx}"] {
        let ttl = pttl(key);
        assert!(ttl > 0 && ttl <= most, "{key}: {ttl}");
    }
    let control = |action| json!({"type":"control","data":{"action":action}});
    publish("rc", control("close")).await;
    assert_eq!(pttl("exp:room:{rc}"), -1, "a closed room stays closed");
    assert!(pttl("exp:hist:{rc}") > 0);
    // Opened again, it expires again.
    publish("rc", control("open")).await;
    assert!(pttl("exp:room:{rc}") > 0);
}

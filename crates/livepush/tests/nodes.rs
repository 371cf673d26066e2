//! Several real `livepush serve --redis` processes behind a load balancer without sticky
//! sessions (a round-robin TCP proxy), with SDK clients on every transport: publishers on
//! every node reach every client once, in order; a node killed with SIGKILL mid-stream costs
//! its terminals nothing reliable; a wake leaves from the node that holds the terminal's
//! keepalive mapping, and from another once that node is gone.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use livepush_client::{Client, ClientConfig, Event, Events, TransportMode};
use serde_json::json;
use support::process::ServerProcess;
use support::proxy::Proxy;
use support::redis::Redis;
use support::wake::WakeSocket;
use support::{PATIENCE, SECRET, fast_client, next_event};
use tokio::time::Instant;

const ROOM: &str = "live:nodes";

fn node(redis: &Redis) -> ServerProcess {
    ServerProcess::spawn(&["--redis", &redis.url(), "--redis-prefix", "nodes"])
}

fn client(url: String, sub: &str, transport: TransportMode) -> ClientConfig {
    ClientConfig {
        transport,
        ..fast_client(url, sub)
    }
}

/// Three nodes, one SDK client per transport through the round-robin proxy (so each
/// connection and each poll may land on any node); the node the WebSocket client landed on
/// is killed with SIGKILL while a publisher on a surviving node keeps going. Every client
/// ends with every reliable message once, in order, from one epoch, and never a failed
/// resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_stream_costs_its_terminals_nothing() {
    let redis = Redis::start();
    let mut nodes: Vec<Option<ServerProcess>> = (0..3).map(|_| Some(node(&redis))).collect();
    let addrs = nodes.iter().flatten().map(|n| n.addr()).collect();
    let proxy = Proxy::round_robin(addrs).await.expect("proxy");

    let clients = one_client_per_transport(&proxy, ROOM).await;
    // The WebSocket client holds one connection: the first the proxy made, to node 0.
    // The publisher uses node 2, which survives.
    let publisher = nodes[2].as_ref().expect("node 2").api.clone();
    const TOTAL: u64 = 300;
    let stream = tokio::spawn(async move {
        let mut epochs = BTreeMap::new();
        for k in 1..=TOTAL {
            let body = publisher.publish(ROOM, "gift", json!({ "k": k })).await;
            assert_eq!(body["seq"], k, "one sequence across nodes");
            *epochs.entry(body["epoch"].to_string()).or_insert(0) += 1;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        epochs
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes[0].take().expect("node 0").kill9();
    // Then every connection is cut twice: each client reconnects, to whichever node the
    // proxy picks next (a long-poll client's keep-alive connection too).
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        proxy.cut();
    }
    let epochs = stream.await.expect("publisher");
    assert_eq!(epochs.len(), 1, "one epoch throughout: {epochs:?}");

    for (mode, c, events) in clients {
        let resumed = all_once_in_order(mode, events, TOTAL).await;
        if mode != TransportMode::LongPoll {
            // Long-poll re-attaches quietly (no `joined` for a complete resume).
            assert!(resumed >= 1, "{mode:?} resumed after the kill and the cuts");
        }
        c.close().await;
    }
    for n in nodes.into_iter().flatten() {
        n.stop();
    }
}

type Clients = Vec<(TransportMode, Client, Events)>;

/// One SDK client per transport through `proxy`, each in `room` (joined, live).
async fn one_client_per_transport(proxy: &Proxy, room: &str) -> Clients {
    let modes = [
        TransportMode::WebSocket,
        TransportMode::LongPoll,
        TransportMode::Sse,
    ];
    let mut clients = Vec::new();
    for (i, mode) in modes.into_iter().enumerate() {
        let (c, mut events) =
            Client::connect(client(proxy.url(), &format!("n{i}"), mode)).expect("client");
        c.join(room, None).await.expect("join");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Event::Joined { recovered, .. } =
                next_event(&mut events, deadline, "joined").await
            {
                assert!(recovered, "{mode:?}");
                break;
            }
        }
        clients.push((mode, c, events));
    }
    clients
}

/// Reads a client's events until `total` messages came: they must be seqs 1..=total, each
/// once, in order, with no failed resume and nothing lost. Returns how many times it resumed.
async fn all_once_in_order(mode: TransportMode, mut events: Events, total: u64) -> usize {
    let deadline = Instant::now() + 4 * PATIENCE;
    let mut seqs = Vec::new();
    let mut resumed = 0;
    while seqs.len() < total as usize {
        let what = format!("{mode:?}: message {}", seqs.len() + 1);
        match next_event(&mut events, deadline, &what).await {
            Event::Message(m) => seqs.push(m.seq),
            Event::Joined {
                recovered,
                resumed: r,
                ..
            } => {
                assert!(recovered, "{mode:?}: a failed resume");
                resumed += usize::from(r);
            }
            Event::Lost { first, last, .. } => panic!("{mode:?}: lost {first}..={last}"),
            _ => {}
        }
    }
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "{mode:?}: each once, in order"
    );
    resumed
}

/// Three nodes behind the round-robin proxy, a client on each transport, and three
/// publishers at once, one per node: every client gets every reliable message once, in order
/// (one sequence across the nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_publishers_on_three_nodes_reach_every_transport_once_in_order() {
    let redis = Redis::start();
    let nodes: Vec<ServerProcess> = (0..3).map(|_| node(&redis)).collect();
    let proxy = Proxy::round_robin(nodes.iter().map(|n| n.addr()).collect())
        .await
        .expect("proxy");
    let clients = one_client_per_transport(&proxy, "live:three").await;
    const EACH: u64 = 100;
    let publishers: Vec<_> = nodes
        .iter()
        .map(|n| {
            let api = n.api.clone();
            tokio::spawn(async move {
                for k in 0..EACH {
                    api.publish("live:three", "gift", json!({ "k": k })).await;
                }
            })
        })
        .collect();
    // Polls and streams move between nodes meanwhile.
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.cut();
    for p in publishers {
        p.await.expect("publisher");
    }
    for (mode, c, events) in clients {
        all_once_in_order(mode, events, 3 * EACH).await;
        c.close().await;
    }
    for n in nodes {
        n.stop();
    }
}

/// A sleeping terminal's keepalives reach node 1; a direct message posted to node 3 wakes it
/// from node 1's socket (that holds the NAT mapping). Once node 1 is killed, the next post
/// wakes it from node 3 itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_leaves_from_the_keepalive_node_and_from_another_once_it_is_gone() {
    let redis = Redis::start();
    let n1 = node(&redis);
    let n3 = node(&redis);
    let key = livepush_proto::wake::WakeKey::derive(SECRET.as_bytes(), "settop");
    let udp = WakeSocket::bind(key).await;
    udp.keepalive(n1.addr(), "settop").await;
    let deadline = Instant::now() + PATIENCE;
    while n3.api.terminal("settop").await["wake"]["registered"] != true {
        assert!(
            Instant::now() < deadline,
            "node 3 never saw the registration"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let post = |n: &ServerProcess, k: u64| {
        let api = n.api.clone();
        async move {
            let body = api.post_inbox("settop", "notice", json!({ "k": k })).await;
            assert_eq!(body["wake"], "sent", "{body}");
        }
    };
    post(&n3, 1).await;
    let (wake, from) = udp.wake_from(PATIENCE).await.expect("a wake");
    assert_eq!((wake.inbox, from), (1, n1.addr()), "from node 1's socket");

    n1.kill9();
    post(&n3, 2).await;
    // A repeat of the first wake that node 1 sent before it died may still be on its way;
    // the wake for the new message is node 3's.
    let deadline = Instant::now() + PATIENCE;
    let (wake, from) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (wake, from) = udp.wake_from(left).await.expect("a wake after the kill");
        if wake.inbox >= 2 {
            break (wake, from);
        }
    };
    assert_eq!((wake.inbox, from), (2, n3.addr()), "from node 3");
    n3.stop();
}

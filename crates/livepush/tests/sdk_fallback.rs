//! The Rust SDK's transport fallback against a real server: WebSocket refused by a proxy →
//! long-polling; a flapping WebSocket moved to long-polling by the server and back; SSE.
//! And long-polling as contract v1.1 has it: a client behind the history skips what is gone
//! once (decision 4), and a closing client leaves at once with `bye` (decision 5).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use livepush_client::{
    Client, ClientConfig, ClientError, Event, Events, Position, Transport, TransportMode,
};
use livepush_server::Config;
use livepush_server::auth::{Claims, TokenKeys, now_secs};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

const KEY: &str = "sdk-fallback-key";
const SECRET: &str = "sdk-fallback-secret-0123456789";

/// A TCP proxy that looks at the first request of each connection: it can refuse WebSocket
/// upgrades with `400` (as a proxy that does not do WebSocket), answer the next connection's
/// request with `502`, and cut every live connection (no close frame, no HTTP answer).
#[derive(Clone, Default)]
struct Proxy {
    conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    refuse_ws: Arc<AtomicBool>,
    /// Upgrades refused so far.
    refused: Arc<AtomicUsize>,
    fail_next: Arc<AtomicBool>,
    /// Requests answered with 502 so far.
    failed: Arc<AtomicUsize>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr, refuse_ws: bool) -> (Proxy, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let proxy = Proxy::default();
        proxy.refuse_ws.store(refuse_ws, Ordering::SeqCst);
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let task = tokio::spawn(p.clone().serve(down, upstream));
                let mut conns = p.conns.lock().expect("lock");
                conns.retain(|t| !t.is_finished());
                conns.push(task);
            }
        });
        (proxy, format!("http://{addr}"))
    }

    async fn serve(self, mut down: TcpStream, upstream: std::net::SocketAddr) {
        // The request head (and whatever body bytes came with it).
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match down.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            if head.len() > 64 * 1024 {
                return;
            }
        }
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        if self.refuse_ws.load(Ordering::SeqCst) && text.contains("upgrade: websocket") {
            self.refused.fetch_add(1, Ordering::SeqCst);
            let body = r#"{"error":"bad_request","message":"no websockets here"}"#;
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = down.write_all(answer.as_bytes()).await;
            return;
        }
        if self.fail_next.swap(false, Ordering::SeqCst) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            let _ = down
                .write_all(
                    b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
            return;
        }
        let Ok(mut up) = TcpStream::connect(upstream).await else {
            return;
        };
        if up.write_all(&head).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
    }

    /// Drop every live connection abruptly.
    fn cut(&self) {
        for t in self.conns.lock().expect("lock").drain(..) {
            t.abort();
        }
    }
}

fn token(sub: &str, send: bool) -> String {
    TokenKeys::new(SECRET)
        .mint(&Claims {
            sub: sub.into(),
            exp: now_secs() + 600,
            rooms: vec!["live:*".into()],
            send,
        })
        .expect("token")
}

async fn publish(http: &reqwest::Client, url: &str, room: &str, ty: &str, data: Value) {
    let r = http
        .post(format!("{url}/v1/rooms/{room}/messages"))
        .bearer_auth(KEY)
        .json(&json!({"type": ty, "data": data}))
        .send()
        .await
        .expect("publish");
    assert!(r.status().is_success(), "{:?}", r.text().await);
}

/// `GET url` with the API key, as JSON.
async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url)
        .bearer_auth(KEY)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON")
}

/// The epoch of `room`.
async fn room_epoch(http: &reqwest::Client, url: &str, room: &str) -> String {
    let info = get_json(http, &format!("{url}/v1/rooms/{room}")).await;
    info["epoch"].as_str().expect("epoch").to_owned()
}

fn client_config(server: String, sub: &str, transport: TransportMode) -> ClientConfig {
    ClientConfig {
        server,
        token: Some(token(sub, true)),
        transport,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    }
}

/// The next event, failing the test at `deadline` (also when events keep coming).
async fn next(events: &mut Events, deadline: Instant, what: &str) -> Event {
    assert!(Instant::now() < deadline, "timed out waiting for {what}");
    timeout_at(deadline, events.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("event stream open")
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
    let server = livepush_server::start(Config::for_tests(KEY, SECRET))
        .await
        .expect("server");
    let (proxy, proxy_url) = Proxy::start(server.addr(), true).await;
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
        ..client_config(proxy_url, "poller", TransportMode::Auto)
    })
    .expect("client");
    client.join(ROOM, None).await.expect("join");
    let mut seen = Seen::default();
    loop {
        let e = next(&mut events, deadline, "the long-poll join").await;
        seen.record(&e);
        if matches!(e, Event::Joined { .. }) {
            break;
        }
    }
    assert_eq!(seen.connected, vec![Transport::Longpoll]);
    assert_eq!(client.transport(), Some(Transport::Longpoll));
    assert!(proxy.refused.load(Ordering::SeqCst) >= 1);
    loop {
        if let Event::Joined { .. } = next(&mut watcher_events, deadline, "the watcher").await {
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
        match next(&mut watcher_events, deadline, "the chat").await {
            Event::Transient(m) => {
                assert_eq!(m.data, json!({"text": "from a long-poller"}));
                break;
            }
            Event::Message(_) | Event::Online { .. } => {}
            other => panic!("{other:?}"),
        }
    }

    // 200 reliable messages; one poll is cut mid-way, then the reconnect gets a 502.
    let http = reqwest::Client::new();
    let url = server.url();
    let publisher = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            for n in 1..=TOTAL {
                publish(&http, &url, ROOM, "gift", json!({"n": n})).await;
                if n == 60 {
                    proxy.cut();
                }
                if n == 130 {
                    proxy.fail_next.store(true, Ordering::SeqCst);
                    proxy.cut();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    while seen.seqs.len() < TOTAL as usize {
        let e = next(&mut events, deadline, "all reliable messages").await;
        seen.record(&e);
    }
    publisher.await.expect("publisher");
    assert_eq!(
        seen.seqs,
        (1..=TOTAL).collect::<Vec<_>>(),
        "each once, in order"
    );
    assert!(seen.disconnects >= 1, "the cut ended a poll: {seen:?}");
    assert_eq!(
        proxy.failed.load(Ordering::SeqCst),
        1,
        "one request got 502"
    );
    assert!(
        seen.connected.iter().all(|t| *t == Transport::Longpoll) && seen.connected.len() >= 2,
        "{:?}",
        seen.connected
    );
    assert!(
        proxy.refused.load(Ordering::SeqCst) >= 2,
        "WebSocket is tried again after ws_retry_after"
    );

    // Transient messages arrive while long-polling (published until one is seen: a transient
    // published between two polls is legitimately missed).
    let http = reqwest::Client::new();
    let mut i = 0;
    let published_seen = |seen: &Seen| seen.transients.iter().any(|t| t["i"].is_u64());
    while !published_seen(&seen) {
        i += 1;
        publish(&http, &server.url(), ROOM, "chat", json!({"i": i})).await;
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
    let mut config = Config::for_tests(KEY, SECRET);
    config.flap_threshold = 1;
    config.flap_longpoll_for = Duration::from_secs(2);
    let server = livepush_server::start(config).await.expect("server");
    let (proxy, proxy_url) = Proxy::start(server.addr(), false).await;
    let deadline = Instant::now() + Duration::from_secs(20);

    let (client, mut events) =
        Client::connect(client_config(proxy_url, "flappy", TransportMode::Auto)).expect("client");
    client.join(ROOM, None).await.expect("join");
    let mut seen = Seen::default();
    loop {
        let e = next(&mut events, deadline, "the join").await;
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
        let (stop, published) = (stop.clone(), published.clone());
        let http = reqwest::Client::new();
        let url = server.url();
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                publish(&http, &url, ROOM, "gift", json!({"n": n})).await;
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
        let e = next(&mut events, deadline, "the move to long-polling and back").await;
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
        let e = next(&mut events, deadline, "all reliable messages").await;
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
    let mut config = Config::for_tests(KEY, SECRET);
    // Small queues: a 100-message replay does not fit in one stream.
    config.limits.outbox_frames = 16;
    let server = livepush_server::start(config).await.expect("server");
    let (proxy, proxy_url) = Proxy::start(server.addr(), false).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let http = reqwest::Client::new();
    for n in 1..=100 {
        publish(&http, &server.url(), ROOM, "gift", json!({"n": n})).await;
    }
    let epoch = room_epoch(&http, &server.url(), ROOM).await;

    let (client, mut events) =
        Client::connect(client_config(proxy_url, "sse", TransportMode::Sse)).expect("client");
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
        let e = next(&mut events, deadline, "the replay").await;
        seen.record(&e);
    }
    assert!(
        seen.connected.len() >= 3,
        "the replay took several streams: {:?}",
        seen.connected
    );
    assert!(seen.connected.iter().all(|t| *t == Transport::Sse));

    let url = server.url();
    let publisher = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            for n in 101..=200 {
                publish(&http, &url, ROOM, "gift", json!({"n": n})).await;
                if n == 150 {
                    proxy.cut();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    while seen.seqs.len() < 200 {
        let e = next(&mut events, deadline, "the live messages").await;
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
    let mut config = Config::for_tests(KEY, SECRET);
    config.dev = true;
    let server = livepush_server::start(config).await.expect("server");
    let (proxy, proxy_url) = Proxy::start(server.addr(), false).await;
    let deadline = Instant::now() + Duration::from_secs(10);

    let (client, mut events) = Client::connect(ClientConfig {
        token: None,
        ..client_config(proxy_url.clone(), "unused", TransportMode::LongPoll)
    })
    .expect("client");
    client.join("live:dev", None).await.expect("join");
    let mut terminals = Vec::new();
    let mut joined = 0;
    while terminals.len() < 2 || joined < 2 {
        match next(&mut events, deadline, "two long-poll sessions").await {
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
    let list = get_json(
        &reqwest::Client::new(),
        &format!("{}/v1/terminals", server.url()),
    )
    .await;
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
        ..client_config(proxy_url, "unused", TransportMode::LongPoll)
    })
    .expect("client");
    for _ in 0..2 {
        match next(&mut events, deadline, "the refusal").await {
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
        match next(events, deadline, "the messages").await {
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
        let e = next(events, deadline, what).await;
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
    http: &reqwest::Client,
    url: &str,
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
    publish(http, url, room, "gift", json!({"n": n})).await;
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
    let mut config = Config::for_tests(KEY, SECRET);
    config.history_size = 5;
    let server = livepush_server::start(config).await.expect("server");
    let (url, http) = (server.url(), reqwest::Client::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in 1..=20 {
        publish(&http, &url, ROOM, "gift", json!({"n": n})).await;
    }
    for n in 1..=3 {
        publish(&http, &url, AHEAD, "gift", json!({"n": n})).await;
    }
    let epoch = room_epoch(&http, &url, ROOM).await;
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
    stays_at(polling, &http, &url, ROOM, position(&epoch, 20), deadline).await;

    client.leave(ROOM).await.expect("leave");
    let epoch = room_epoch(&http, &url, AHEAD).await;
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
    stays_at(polling, &http, &url, AHEAD, position(&epoch, 3), deadline).await;
    client.close().await;
    server.shutdown().await;
}

/// (6) Contract v1.1, decision 4, with no replay at all: the room's history expired, so the
/// `joined{recovered:false}` is followed by nothing; the position moves to `joined.seq`
/// (the seqs after the old one are reported lost) and the following polls resume quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_after_the_history_expired_moves_to_the_latest_seq_once() {
    const ROOM: &str = "live:expired";
    let mut config = Config::for_tests(KEY, SECRET);
    config.history_ttl = Duration::from_millis(300);
    config.limits.online_interval = Duration::from_millis(50);
    let server = livepush_server::start(config).await.expect("server");
    let (url, http) = (server.url(), reqwest::Client::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in 1..=3 {
        publish(&http, &url, ROOM, "gift", json!({"n": n})).await;
    }
    let epoch = room_epoch(&http, &url, ROOM).await;
    let history = format!("{url}/v1/rooms/{ROOM}/history?since=0");
    while get_json(&http, &history).await["messages"] != json!([]) {
        assert!(Instant::now() < deadline, "the history did not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    stays_at(polling, &http, &url, ROOM, position(&epoch, 3), deadline).await;
    client.close().await;
    server.shutdown().await;
}

/// (7) Contract v1.1, decision 5: a long-poll client that closes (or whose every handle is
/// dropped) says `bye`: the server shows it offline, and out of its room, at once, though
/// its poll grace period is 10 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_client_that_closes_is_offline_at_once() {
    const ROOM: &str = "live:bye";
    let mut config = Config::for_tests(KEY, SECRET);
    config.poll_grace = Duration::from_secs(600);
    let server = livepush_server::start(config).await.expect("server");
    let (url, http) = (server.url(), reqwest::Client::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    let online = |who: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move { get_json(&http, &format!("{url}/v1/terminals/{who}")).await["online"].clone() }
    };
    let room_online = || {
        let (http, url) = (http.clone(), url.clone());
        async move { get_json(&http, &format!("{url}/v1/rooms/{ROOM}")).await["online"].clone() }
    };

    for who in ["leaver", "dropper"] {
        let (client, mut events) = Client::connect(ClientConfig {
            poll_wait: Duration::from_secs(5),
            ..client_config(url.clone(), who, TransportMode::LongPoll)
        })
        .expect("client");
        client.join(ROOM, None).await.expect("join");
        while !matches!(
            next(&mut events, deadline, "the join").await,
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
            while online(who).await != json!(false) {
                assert!(Instant::now() < deadline, "still online");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert_eq!(room_online().await, json!(0), "{who} left the room");
    }
    server.shutdown().await;
}

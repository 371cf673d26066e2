//! Inboxes, the service list, and UDP wake-up of terminals that hold no connection.

use std::time::Duration;

use livepush_proto::ServerFrame;
use livepush_proto::wake::{KEEPALIVE_PAD_TO, Keepalive, Wake, WakeKey};
use livepush_server::auth::now_ms;
use serde_json::{Value, json};
use tokio::net::UdpSocket;

use crate::support::*;

impl TestServer {
    async fn post_inbox(&self, terminal: &str, data: Value) -> Value {
        let (status, body) = self
            .post(
                &format!("/v1/terminals/{terminal}/messages"),
                json!({"type":"notice","data":data}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// Connect as `sub` and return the `connected` frame's inbox position and wake key.
async fn connect(s: &TestServer, sub: &str) -> (Ws, u64, u64, WakeKey) {
    let mut ws = Ws::open(&s.ws_url()).await;
    ws.send(json!({"op":"connect","token":s.token(sub, &["*"], false)}))
        .await;
    match ws.next().await {
        ServerFrame::Connected {
            inbox, wake_key, ..
        } => {
            let key = WakeKey::from_base64(&wake_key).expect("wake_key is base64");
            (ws, inbox.seq, inbox.acked, key)
        }
        other => panic!("{other:?}"),
    }
}

fn inbox_seqs(frames: &[ServerFrame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Inbox { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect()
}

async fn next_inbox(ws: &mut Ws) -> (u64, Value) {
    loop {
        if let ServerFrame::Inbox { seq, data, .. } = ws.next().await {
            return (seq, data);
        }
    }
}

#[tokio::test]
async fn online_terminals_get_inbox_messages_at_once_and_ack_them() {
    let s = TestServer::start().await;
    let (mut ws, seq, acked, _) = connect(&s, "box").await;
    assert_eq!((seq, acked), (0, 0));
    let answer = s.post_inbox("box", json!({"n":1})).await;
    assert_eq!(answer, json!({"seq":1,"online":true,"wake":"none"}));
    assert_eq!(next_inbox(&mut ws).await, (1, json!({"n":1})));
    ws.send(json!({"op":"ack","inbox":1})).await;
    s.eventually("the ack to land", || async {
        // (`pending`, added by contract v1.1, is checked in transports.rs)
        let inbox = s.get("/v1/terminals/box").await.1["inbox"].clone();
        inbox["seq"] == 1 && inbox["acked"] == 1
    })
    .await;
    let (_, t) = s.get("/v1/terminals/box").await;
    assert_eq!(t["online"], true);
    assert_eq!(t["wake"]["registered"], false);
}

#[tokio::test]
async fn unacked_messages_come_again_on_the_next_connect() {
    let s = TestServer::start().await;
    for n in 1..=3 {
        let a = s.post_inbox("late", json!({"n":n})).await;
        assert_eq!(
            (a["online"].clone(), a["wake"].clone()),
            (json!(false), json!("none"))
        );
    }
    let (mut ws, seq, acked, _) = connect(&s, "late").await;
    assert_eq!((seq, acked), (3, 0));
    for n in 1..=3 {
        assert_eq!(next_inbox(&mut ws).await.0, n);
    }
    // Drops before acking: everything comes again.
    drop(ws);
    let (mut ws, _, _, _) = connect(&s, "late").await;
    assert_eq!(next_inbox(&mut ws).await.0, 1);
    ws.send(json!({"op":"ack","inbox":2})).await;
    drop(ws);
    s.eventually("the ack to land", || async {
        s.get("/v1/terminals/late").await.1["inbox"]["acked"] == json!(2)
    })
    .await;
    let (mut ws, _, acked, _) = connect(&s, "late").await;
    assert_eq!(acked, 2);
    assert_eq!(next_inbox(&mut ws).await.0, 3);
}

#[tokio::test]
async fn inbox_size_is_bounded_and_the_gap_is_visible() {
    let mut c = config();
    c.inbox_size = 2;
    let s = TestServer::with(c).await;
    for n in 1..=5 {
        s.post_inbox("small", json!({"n":n})).await;
    }
    let (mut ws, seq, _, _) = connect(&s, "small").await;
    assert_eq!(seq, 5);
    assert_eq!(
        next_inbox(&mut ws).await.0,
        4,
        "1..=3 were dropped: the gap shows"
    );
    assert_eq!(next_inbox(&mut ws).await.0, 5);
    let r = s
        .http
        .get(format!("{}/metrics", s.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(
        text.contains("livepush_inbox_dropped_total{reason=\"overflow\"} 3"),
        "{text}"
    );
}

#[tokio::test]
async fn long_poll_takes_the_inbox_after_the_given_position() {
    let s = TestServer::start().await;
    for n in 1..=3 {
        s.post_inbox("lp", json!({"n":n})).await;
    }
    let token = s.token("lp", &["*"], false);
    let frames = s
        .poll(
            "/v1/poll",
            json!({"token":token,"hello":true,"rooms":{},"wait_ms":100}),
        )
        .await;
    assert!(matches!(&frames[0], ServerFrame::Connected { inbox, .. } if inbox.seq == 3));
    assert_eq!(inbox_seqs(&frames), vec![1, 2, 3]);
    let frames = s
        .poll(
            "/v1/poll",
            json!({"token":token,"inbox":2,"rooms":{},"wait_ms":100}),
        )
        .await;
    assert_eq!(inbox_seqs(&frames), vec![3]);
    let frames = s
        .poll(
            "/v1/poll",
            json!({"token":token,"rooms":{},"wait_ms":100,"ops":[{"op":"ack","inbox":3}]}),
        )
        .await;
    // Sent before the ack in the same poll was applied; the next poll has nothing.
    assert_eq!(inbox_seqs(&frames), vec![1, 2, 3]);
    let frames = s
        .poll("/v1/poll", json!({"token":token,"rooms":{},"wait_ms":100}))
        .await;
    assert!(inbox_seqs(&frames).is_empty(), "{frames:?}");
}

/// A sleeping terminal: only a UDP socket.
pub struct Sleeper {
    udp: UdpSocket,
    key: WakeKey,
    id: String,
    server: std::net::SocketAddr,
}

impl Sleeper {
    pub async fn new(s: &TestServer, id: &str) -> Sleeper {
        let (ws, _, _, key) = connect(s, id).await;
        drop(ws);
        Sleeper {
            udp: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            key,
            id: id.into(),
            server: s.running.wake_addr().expect("wake listener"),
        }
    }

    pub async fn keepalive(&self) {
        self.send(&self.keepalive_datagram(), self.server).await;
    }

    /// A keepalive stamped now, as sent (and as someone on the path could capture it).
    pub fn keepalive_datagram(&self) -> Vec<u8> {
        Keepalive::encode(&self.id, now_ms(), &self.key, KEEPALIVE_PAD_TO)
    }

    /// Send `datagram` from this terminal's socket.
    pub async fn send(&self, datagram: &[u8], to: std::net::SocketAddr) {
        self.udp.send_to(datagram, to).await.unwrap();
    }

    /// The next verified wake datagram, or None within `wait`.
    async fn wake(&self, wait: Duration) -> Option<Wake> {
        self.wake_from(wait).await.map(|(w, _)| w)
    }

    /// The next verified wake datagram and where it came from, or None within `wait`.
    pub async fn wake_from(&self, wait: Duration) -> Option<(Wake, std::net::SocketAddr)> {
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let (n, from) = tokio::time::timeout_at(deadline, self.udp.recv_from(&mut buf))
                .await
                .ok()?
                .unwrap();
            assert!(n <= 256);
            if let Ok(w) = Wake::verify(&buf[..n], &self.key) {
                return Some((w, from));
            }
        }
    }
}

#[tokio::test]
async fn an_idle_terminal_is_woken_connects_takes_its_inbox_and_retries_stop() {
    let mut c = config();
    c.wake_retry_first = Duration::from_millis(150);
    c.wake_retries = 20;
    let s = TestServer::with(c).await;
    let sleeper = Sleeper::new(&s, "tv").await;
    sleeper.keepalive().await;
    s.eventually("the keepalive to register", || async {
        s.get("/v1/terminals/tv").await.1["wake"]["registered"] == json!(true)
    })
    .await;
    let (_, t) = s.get("/v1/terminals/tv").await;
    assert_eq!(t["online"], false, "idle: no connection");
    let posted_at = std::time::Instant::now();
    let answer = s.post_inbox("tv", json!({"cmd":"record"})).await;
    assert_eq!(answer, json!({"seq":1,"online":false,"wake":"sent"}));
    let w = sleeper
        .wake(Duration::from_secs(1))
        .await
        .expect("woken within a second");
    assert_eq!((w.terminal.as_str(), w.inbox), ("tv", 1));
    assert!(posted_at.elapsed() < Duration::from_secs(1));
    // It connects, takes the message, acks, and leaves.
    let (mut ws, _, _, _) = connect(&s, "tv").await;
    assert_eq!(next_inbox(&mut ws).await, (1, json!({"cmd":"record"})));
    ws.send(json!({"op":"ack","inbox":1})).await;
    ws.inner.close(None).await.unwrap();
    s.eventually("the ack to land", || async {
        s.get("/v1/terminals/tv").await.1["inbox"]["acked"] == json!(1)
    })
    .await;
    // No more wakes: drain what was in flight, then silence.
    while sleeper.wake(Duration::from_millis(400)).await.is_some() {}
    assert!(sleeper.wake(Duration::from_millis(800)).await.is_none());
}

#[tokio::test]
async fn wakes_repeat_with_back_off_and_stop_when_messages_expire() {
    let mut c = config();
    c.wake_retry_first = Duration::from_millis(100);
    c.wake_retry_max = Duration::from_millis(200);
    c.wake_retries = 50;
    c.inbox_ttl = Duration::from_millis(900);
    c.limits.online_interval = Duration::from_millis(50);
    c.wake_rate_per_minute = 6000;
    c.wake_burst = 100;
    let s = TestServer::with(c).await;
    let sleeper = Sleeper::new(&s, "deaf").await;
    sleeper.keepalive().await;
    s.eventually("the keepalive to register", || async {
        s.get("/v1/terminals/deaf").await.1["wake"]["registered"] == json!(true)
    })
    .await;
    s.post_inbox("deaf", json!({})).await;
    let mut got = 0;
    while sleeper.wake(Duration::from_millis(600)).await.is_some() {
        got += 1;
        assert!(got < 30, "retries must stop");
    }
    assert!(got >= 3, "repeated: {got}");
}

#[tokio::test]
async fn a_terminal_that_leaves_with_unacked_messages_is_woken() {
    let mut c = config();
    c.limits.online_interval = Duration::from_millis(50);
    let s = TestServer::with(c).await;
    let sleeper = Sleeper::new(&s, "quitter").await;
    let (mut ws, _, _, _) = connect(&s, "quitter").await;
    s.post_inbox("quitter", json!({"n":1})).await;
    next_inbox(&mut ws).await;
    ws.inner.close(None).await.unwrap();
    sleeper.keepalive().await;
    let w = sleeper
        .wake(Duration::from_secs(3))
        .await
        .expect("woken after leaving");
    assert_eq!(w.inbox, 1);
}

#[tokio::test]
async fn forged_and_replayed_keepalives_change_nothing() {
    let s = TestServer::start().await;
    let sleeper = Sleeper::new(&s, "victim").await;
    // Forged: someone without the key.
    let forger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let wrong = WakeKey::from_bytes(b"guessed".to_vec());
    let d = Keepalive::encode("victim", now_ms(), &wrong, KEEPALIVE_PAD_TO);
    forger.send_to(&d, sleeper.server).await.unwrap();
    // Stale.
    let d = Keepalive::encode(
        "victim",
        now_ms() - 3_600_000,
        &sleeper.key,
        KEEPALIVE_PAD_TO,
    );
    forger.send_to(&d, sleeper.server).await.unwrap();
    // Garbage.
    forger
        .send_to(b"\x00\x01garbage", sleeper.server)
        .await
        .unwrap();
    let metrics = || async {
        s.http
            .get(format!("{}/metrics", s.url()))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    s.eventually("the forgeries to be counted", || async {
        let m = metrics().await;
        m.contains("livepush_wake_keepalives_total{reason=\"bad_mac\"} 1")
            && m.contains("livepush_wake_keepalives_total{reason=\"stale\"} 1")
            && m.contains("livepush_wake_keepalives_total{reason=\"malformed\"} 1")
    })
    .await;
    assert_eq!(
        s.get("/v1/terminals/victim").await.1["wake"]["registered"],
        false
    );
    // A real keepalive registers; the same datagram replayed from elsewhere does not move it.
    let real = Keepalive::encode("victim", now_ms(), &sleeper.key, KEEPALIVE_PAD_TO);
    sleeper.udp.send_to(&real, sleeper.server).await.unwrap();
    s.eventually("registered", || async {
        s.get("/v1/terminals/victim").await.1["wake"]["registered"] == json!(true)
    })
    .await;
    forger.send_to(&real, sleeper.server).await.unwrap();
    s.eventually("the replay to be counted", || async {
        metrics()
            .await
            .contains("livepush_wake_keepalives_total{reason=\"replayed\"} 1")
    })
    .await;
    s.post_inbox("victim", json!({})).await;
    assert!(
        sleeper.wake(Duration::from_secs(1)).await.is_some(),
        "the real address is woken"
    );
    let mut buf = [0u8; 512];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), forger.recv_from(&mut buf))
            .await
            .is_err(),
        "the forger gets nothing"
    );
}

#[tokio::test]
async fn inbox_api_errors() {
    let s = TestServer::start().await;
    let (st, b) = s.post("/v1/terminals/t/messages", json!({"data":{}})).await;
    assert_eq!((st, b["error"].as_str()), (400, Some("bad_request")));
    let (st, b) = s.get("/v1/terminals/nobody").await;
    assert_eq!((st, b["error"].as_str()), (404, Some("not_found")));
    let long = "x".repeat(200);
    let (st, _) = s
        .post(
            &format!("/v1/terminals/{long}/messages"),
            json!({"type":"n","data":{}}),
        )
        .await;
    assert_eq!(st, 400);
}

#[tokio::test]
async fn a_woken_terminal_that_leaves_without_acking_is_woken_again() {
    let mut c = config();
    c.limits.online_interval = Duration::from_millis(50);
    c.wake_retries = 0;
    let s = TestServer::with(c).await;
    let sleeper = Sleeper::new(&s, "flaky").await;
    sleeper.keepalive().await;
    s.eventually("registered", || async {
        s.get("/v1/terminals/flaky").await.1["wake"]["registered"] == json!(true)
    })
    .await;
    s.post_inbox("flaky", json!({})).await;
    assert!(sleeper.wake(Duration::from_secs(2)).await.is_some());
    let (mut ws, _, _, _) = connect(&s, "flaky").await;
    next_inbox(&mut ws).await;
    ws.inner.close(None).await.unwrap();
    let w = sleeper
        .wake(Duration::from_secs(3))
        .await
        .expect("woken again for the unacknowledged message");
    assert_eq!(w.inbox, 1);
}

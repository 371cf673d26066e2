//! Offline terminals woken over UDP: the SDK's `WakeAgent` and the `livepush agent` CLI
//! against a real in-process server.

use std::time::Duration;

use livepush_client::{
    AgentEvent, AgentEvents, AgentState, Client, ClientConfig, ConnectReason, Event, IgnoreReason,
    TransportMode, WakeAgent, WakeAgentConfig,
};
use livepush_proto::wake::{Wake, WakeKey};
use livepush_server::auth::{Claims, TokenKeys, now_ms, now_secs};
use livepush_server::{Config, Running};
use serde_json::{Value, json};
use tokio::time::Instant;

const KEY: &str = "agent-test-key";
const SECRET: &str = "agent-test-secret-0123456789";
/// Longest wait for anything that should happen promptly (a failure, not a pace).
const PATIENCE: Duration = Duration::from_secs(5);

fn token(sub: &str) -> String {
    TokenKeys::new(SECRET)
        .mint(&Claims {
            sub: sub.into(),
            exp: now_secs() + 600,
            rooms: vec![],
            send: false,
        })
        .expect("token")
}

struct Server {
    running: Running,
    /// No idle connections kept: the test counts the server's TCP connections.
    http: reqwest::Client,
}

impl Server {
    async fn start() -> Server {
        Server::with(|_| {}).await
    }

    async fn with(tweak: impl FnOnce(&mut Config)) -> Server {
        let mut c = Config::for_tests(KEY, SECRET);
        // Upkeep (wakes for terminals that left with unacked messages) every 100 ms.
        c.limits.online_interval = Duration::from_millis(100);
        c.wake_retry_first = Duration::from_millis(200);
        tweak(&mut c);
        Server {
            running: livepush_server::start(c).await.expect("server"),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("http"),
        }
    }

    fn url(&self) -> String {
        self.running.url()
    }

    async fn post_inbox(&self, terminal: &str, data: Value) -> Value {
        let r = self
            .http
            .post(format!("{}/v1/terminals/{terminal}/messages", self.url()))
            .bearer_auth(KEY)
            .json(&json!({"type":"notice","data":data}))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 200);
        r.json().await.expect("json")
    }

    async fn terminal(&self, id: &str) -> Value {
        self.http
            .get(format!("{}/v1/terminals/{id}", self.url()))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json")
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url()))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// `livepush_connections_open{transport="ws"}` (absent = 0).
    async fn ws_connections_open(&self) -> u64 {
        let m = self.metrics().await;
        m.lines()
            .find(|l| l.starts_with("livepush_connections_open{") && l.contains("transport=\"ws\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    /// Poll `check` until it holds (a failure after `PATIENCE`).
    async fn eventually<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + PATIENCE;
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Wait until the server has a wake registration for `id` that is offline.
    async fn registered_and_offline(&self, id: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let t = self.terminal(id).await;
            if t["wake"]["registered"] == json!(true) && t["online"] == json!(false) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for a wake registration, offline: {t}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// ESTABLISHED TCP sockets with `port` at either end (both ends are in this process), from
/// /proc/net/tcp and tcp6.
fn established(port: u16) -> usize {
    let mut n = 0;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[3] != "01" {
                continue;
            }
            let port_of = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if port_of(f[1]) == Some(port) || port_of(f[2]) == Some(port) {
                n += 1;
            }
        }
    }
    n
}

fn config(s: &Server, sub: &str) -> WakeAgentConfig {
    WakeAgentConfig {
        client: ClientConfig {
            server: s.url(),
            token: Some(token(sub)),
            transport: TransportMode::WebSocket,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            ..ClientConfig::default()
        },
        udp_bind: Some("127.0.0.1:0".parse().expect("addr")),
        safety_net: None,
        drain_timeout: Duration::from_secs(2),
        ..WakeAgentConfig::default()
    }
}

/// The next event that `pick` accepts (others are skipped), within `PATIENCE`.
async fn next<T>(events: &mut AgentEvents, mut pick: impl FnMut(&AgentEvent) -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let e = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("the event in time")
            .expect("agent running");
        if let Some(t) = pick(&e) {
            return t;
        }
    }
}

async fn state(events: &mut AgentEvents, want: AgentState) {
    next(events, |e| (*e == AgentEvent::State(want)).then_some(())).await
}

/// Every event up to (and including) the next `State(want)`.
async fn until_state(events: &mut AgentEvents, want: AgentState) -> Vec<AgentEvent> {
    let mut seen = Vec::new();
    next(events, |e| {
        seen.push(e.clone());
        (*e == AgentEvent::State(want)).then_some(())
    })
    .await;
    seen
}

fn inbox_seqs(events: &[AgentEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Inbox(m) => Some(m.seq),
            _ => None,
        })
        .collect()
}

/// Start an agent and wait until it is idle with a registration on the server.
async fn idle_agent(s: &Server, c: WakeAgentConfig) -> (WakeAgent, AgentEvents, String) {
    let (agent, mut events) = WakeAgent::start(c).await.expect("agent");
    let seen = until_state(&mut events, AgentState::Idle).await;
    assert_eq!(
        seen.first(),
        Some(&AgentEvent::State(AgentState::Connecting(
            ConnectReason::Start
        )))
    );
    let creds = agent
        .credentials()
        .expect("learned its wake key at the first connect");
    assert!(
        seen.contains(&AgentEvent::Credentials(creds.clone())),
        "{seen:?}"
    );
    s.registered_and_offline(&creds.terminal).await;
    (agent, events, creds.terminal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_holds_no_connection_and_is_woken_within_a_second() {
    let s = Server::start().await;
    let (agent, mut events, id) = idle_agent(&s, config(&s, "settop")).await;
    assert_eq!(agent.state(), AgentState::Idle);
    assert!(agent.stats().keepalives_sent >= 1);

    // Idle: no TCP connection to the server at all (the test's own HTTP requests are closed
    // after each answer).
    assert_eq!(s.ws_connections_open().await, 0);
    let port = s.running.addr().port();
    s.eventually("no established TCP connection to the server", || async {
        established(port) == 0
    })
    .await;
    assert_eq!(s.terminal(&id).await["online"], false);

    let posted = Instant::now();
    let answer = s.post_inbox(&id, json!({"cmd":"record"})).await;
    assert_eq!(answer, json!({"seq":1,"online":false,"wake":"sent"}));
    let seen = until_state(&mut events, AgentState::Idle).await;
    let m = seen
        .iter()
        .find_map(|e| match e {
            AgentEvent::Inbox(m) => Some(m.clone()),
            _ => None,
        })
        .expect("the message was handed over");
    let states: Vec<AgentState> = seen
        .iter()
        .filter_map(|e| match e {
            AgentEvent::State(s) => Some(*s),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        vec![
            AgentState::Connecting(ConnectReason::Wake { inbox: 1 }),
            AgentState::Draining,
            // Linger 0: straight back to idle.
            AgentState::Idle,
        ]
    );
    assert!(seen.contains(&AgentEvent::Acked { seq: 1 }), "{seen:?}");
    assert_eq!((m.seq, m.ty.as_str()), (1, "notice"));
    assert_eq!(m.data, json!({"cmd":"record"}));
    assert!(
        posted.elapsed() < Duration::from_secs(1),
        "woken and delivered in {:?}",
        posted.elapsed()
    );
    s.eventually("the ack to land, and the terminal to leave", || async {
        let t = s.terminal(&id).await;
        t["inbox"] == json!({"seq":1,"acked":1,"pending":0}) && t["online"] == json!(false)
    })
    .await;
    assert_eq!(s.ws_connections_open().await, 0);
    let st = agent.stats();
    assert_eq!((st.wakes, st.sessions, st.acked), (1, 2, 1));
    agent.shutdown().await;
    s.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_agent_takes_new_messages_without_a_wake_then_leaves() {
    let s = Server::start().await;
    let linger = Duration::from_millis(1500);
    let (agent, mut events, id) = idle_agent(
        &s,
        WakeAgentConfig {
            linger,
            ..config(&s, "linger")
        },
    )
    .await;
    s.post_inbox(&id, json!({"n":1})).await;
    let seen = until_state(&mut events, AgentState::Lingering).await;
    let lingering_since = Instant::now();
    assert_eq!(inbox_seqs(&seen), vec![1]);
    assert!(seen.contains(&AgentEvent::Acked { seq: 1 }), "{seen:?}");
    // Online while lingering: a second message goes straight over the session.
    assert_eq!(s.terminal(&id).await["online"], true);
    let answer = s.post_inbox(&id, json!({"n":2})).await;
    assert_eq!(answer, json!({"seq":2,"online":true,"wake":"none"}));
    let seen = until_state(&mut events, AgentState::Idle).await;
    let lingered = lingering_since.elapsed();
    assert_eq!(inbox_seqs(&seen), vec![2]);
    assert!(seen.contains(&AgentEvent::Acked { seq: 2 }), "{seen:?}");
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, AgentEvent::State(AgentState::Connecting(_)))),
        "no new session for the second message: {seen:?}"
    );
    assert!(
        lingered >= linger - Duration::from_millis(100),
        "stayed for the linger period: {lingered:?}"
    );
    assert!(lingered < linger + Duration::from_secs(2), "{lingered:?}");
    assert_eq!(agent.stats().wakes, 1);
    s.eventually("the terminal to leave, everything acked", || async {
        let t = s.terminal(&id).await;
        t["online"] == json!(false) && t["inbox"] == json!({"seq":2,"acked":2,"pending":0})
    })
    .await;
    assert_eq!(s.ws_connections_open().await, 0);
    agent.shutdown().await;
    s.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_polling_agent_is_woken_too() {
    // A long-poll terminal counts as online for the poll grace after its last poll, and is
    // not woken meanwhile, unless it said `bye` (contract v1.1, decision 5), as the agent
    // does at the end of each session: a grace period of 10 minutes changes nothing.
    let s = Server::with(|c| c.poll_grace = Duration::from_secs(600)).await;
    let mut c = config(&s, "poller");
    c.client.transport = TransportMode::LongPoll;
    c.client.poll_wait = Duration::from_secs(2);
    let (agent, mut events, id) = idle_agent(&s, c).await;
    assert_eq!(s.post_inbox(&id, json!({"n":1})).await["wake"], "sent");
    let seen = until_state(&mut events, AgentState::Idle).await;
    assert_eq!(inbox_seqs(&seen), vec![1]);
    assert!(seen.contains(&AgentEvent::Acked { seq: 1 }), "{seen:?}");
    s.eventually("the ack to land", || async {
        s.terminal(&id).await["inbox"] == json!({"seq":1,"acked":1,"pending":0})
    })
    .await;
    assert_eq!(s.terminal(&id).await["online"], false);
    // Woken again at once for the next message.
    assert_eq!(s.post_inbox(&id, json!({"n":2})).await["wake"], "sent");
    let seen = until_state(&mut events, AgentState::Idle).await;
    assert_eq!(inbox_seqs(&seen), vec![2]);
    agent.shutdown().await;
    s.running.shutdown().await;
}

/// Contract v1.1, decision 6: `connected` says how many unacknowledged messages the server
/// still keeps. Messages that expired unacknowledged leave the newest seq above the acked
/// one with nothing to take: the agent sees `pending: 0` and leaves at once rather than
/// waiting out its drain timeout (30 s here) for messages that will never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_inbox_expired_leaves_at_once() {
    let s = Server::with(|c| c.inbox_ttl = Duration::from_millis(200)).await;
    for n in 1..=2 {
        s.post_inbox("late", json!({"n":n})).await;
    }
    s.eventually("the messages to expire", || async {
        s.terminal("late").await["inbox"] == json!({"seq":2,"acked":0,"pending":0})
    })
    .await;
    let (agent, mut events) = WakeAgent::start(WakeAgentConfig {
        drain_timeout: Duration::from_secs(30),
        ..config(&s, "late")
    })
    .await
    .expect("agent");
    let seen = until_state(&mut events, AgentState::Idle).await;
    assert!(
        seen.contains(&AgentEvent::State(AgentState::Draining)),
        "{seen:?}"
    );
    assert_eq!(inbox_seqs(&seen), Vec::<u64>::new());
    agent.shutdown().await;
    s.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_wake_datagrams_are_ignored_and_counted() {
    let s = Server::start().await;
    let (agent, mut events, id) = idle_agent(&s, config(&s, "guarded")).await;
    let creds = agent.credentials().expect("credentials");
    let key = WakeKey::from_base64(&creds.wake_key).expect("key");
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp");
    let to = agent.local_addr();
    let wake = |terminal: &str, inbox: u64| Wake {
        terminal: terminal.into(),
        inbox,
        ts: now_ms(),
    };
    // A guessed key; the right key but another terminal; garbage.
    let wrong = WakeKey::from_bytes(b"guessed-key".to_vec());
    let forged = [
        (wake(&id, 1).encode(&wrong), IgnoreReason::BadMac),
        (
            wake("someone-else", 1).encode(&key),
            IgnoreReason::WrongTerminal,
        ),
        (b"\x00not json".to_vec(), IgnoreReason::Malformed),
    ];
    for (datagram, reason) in &forged {
        attacker.send_to(datagram, to).await.expect("send");
        // The decision for each datagram is reported before anything else happens: an
        // agent that acted on it would report `Connecting` first.
        let e = next(&mut events, |e| Some(e.clone())).await;
        assert_eq!(
            e,
            AgentEvent::Ignored {
                from: attacker.local_addr().expect("addr"),
                reason: *reason
            }
        );
    }
    assert_eq!(agent.state(), AgentState::Idle);
    let st = agent.stats();
    assert_eq!((st.forged, st.wrong_terminal, st.sessions), (2, 1, 1));
    assert_eq!(s.terminal(&id).await["online"], false);

    // The real thing still works.
    s.post_inbox(&id, json!({"n":1})).await;
    let seen = until_state(&mut events, AgentState::Idle).await;
    assert_eq!(inbox_seqs(&seen), vec![1]);

    // Valid wakes for what was just handled: a replay (not newer than a wake already seen)
    // and a late repeat right after the session. Neither starts a session.
    let me = attacker.local_addr().expect("addr");
    let handled = [
        (
            Wake {
                terminal: id.clone(),
                inbox: 1,
                ts: 1,
            }
            .encode(&key),
            IgnoreReason::Replayed,
        ),
        (wake(&id, 1).encode(&key), IgnoreReason::AlreadyHandled),
    ];
    for (datagram, reason) in &handled {
        attacker.send_to(datagram, to).await.expect("send");
        let got = next(&mut events, |e| match e {
            AgentEvent::Ignored { from, reason } if *from == me => Some(*reason),
            AgentEvent::State(s) => panic!("acted on a handled wake: {s:?}"),
            _ => None,
        })
        .await;
        assert_eq!(got, *reason);
    }
    // A valid wake for something new is acted on.
    attacker
        .send_to(&wake(&id, 2).encode(&key), to)
        .await
        .expect("send");
    let seen = until_state(&mut events, AgentState::Idle).await;
    assert!(
        seen.contains(&AgentEvent::State(AgentState::Connecting(
            ConnectReason::Wake { inbox: 2 }
        ))),
        "{seen:?}"
    );
    agent.shutdown().await;
    s.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_terminal_received_but_did_not_ack_come_again() {
    let s = Server::start().await;
    let (agent, mut events, id) = idle_agent(&s, config(&s, "crashy")).await;
    // The same terminal connects with a plain client (the app in the foreground, say),
    // receives two messages, and goes away without acknowledging them.
    let (client, mut client_events) = Client::connect(config(&s, "crashy").client).expect("client");
    loop {
        let e = tokio::time::timeout(PATIENCE, client_events.recv())
            .await
            .expect("connected in time");
        if let Some(Event::Connected { .. }) = e {
            break;
        }
    }
    for n in 1..=2 {
        let a = s.post_inbox(&id, json!({"n":n})).await;
        assert_eq!(a["online"], true);
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Some(Event::Inbox(m)) = tokio::time::timeout(PATIENCE, client_events.recv())
            .await
            .expect("inbox in time")
        {
            got.push(m.seq);
        }
    }
    assert_eq!(got, vec![1, 2]);
    client.close().await;
    // The server wakes the sleeping agent for the unacknowledged messages, which it takes
    // again.
    let seen = until_state(&mut events, AgentState::Idle).await;
    assert!(
        seen.contains(&AgentEvent::State(AgentState::Connecting(
            ConnectReason::Wake { inbox: 2 }
        ))),
        "{seen:?}"
    );
    assert_eq!(inbox_seqs(&seen), vec![1, 2]);
    assert!(seen.contains(&AgentEvent::Acked { seq: 2 }), "{seen:?}");
    s.eventually("the ack to land", || async {
        s.terminal(&id).await["inbox"] == json!({"seq":2,"acked":2,"pending":0})
    })
    .await;
    agent.shutdown().await;

    // A terminal that was not running at all finds them at its first connect.
    for n in 3..=4 {
        s.post_inbox(&id, json!({"n":n})).await;
    }
    let (agent, mut events) = WakeAgent::start(config(&s, "crashy")).await.expect("agent");
    let seen = until_state(&mut events, AgentState::Idle).await;
    assert_eq!(inbox_seqs(&seen), vec![3, 4]);
    agent.shutdown().await;
    s.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_safety_net_connects_when_no_wake_can_come() {
    let s = Server::start().await;
    // Keepalives go to a port nobody listens on: the server never learns the address.
    let nowhere = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let (agent, mut events) = WakeAgent::start(WakeAgentConfig {
        wake_addr: Some(nowhere.local_addr().expect("addr")),
        safety_net: Some(Duration::from_millis(600)),
        ..config(&s, "unreachable")
    })
    .await
    .expect("agent");
    state(&mut events, AgentState::Idle).await;
    let answer = s.post_inbox("unreachable", json!({"n":1})).await;
    assert_eq!(answer["wake"], "none");
    let seen = until_state(&mut events, AgentState::Idle).await;
    assert_eq!(
        seen.first(),
        Some(&AgentEvent::State(AgentState::Connecting(
            ConnectReason::SafetyNet
        )))
    );
    assert_eq!(inbox_seqs(&seen), vec![1]);
    drop(nowhere);
    agent.shutdown().await;
    s.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_credentials_let_an_agent_sleep_from_the_start() {
    let s = Server::start().await;
    let (agent, _events, id) = idle_agent(&s, config(&s, "cached")).await;
    let creds = agent.credentials().expect("credentials");
    agent.shutdown().await;
    let before = s.terminal(&id).await["wake"]["last_keepalive_ms"]
        .as_u64()
        .expect("a keepalive on record");
    let (agent, mut events) = WakeAgent::start(WakeAgentConfig {
        credentials: Some(creds),
        connect_at_start: false,
        ..config(&s, "cached")
    })
    .await
    .expect("agent");
    let seen = until_state(&mut events, AgentState::Idle).await;
    assert_eq!(
        seen,
        vec![AgentEvent::State(AgentState::Idle)],
        "no connect"
    );
    // The new socket's keepalive moves the registration, without a connect.
    s.eventually("the new keepalive to be recorded", || async {
        s.terminal(&id).await["wake"]["last_keepalive_ms"]
            .as_u64()
            .is_some_and(|t| t > before)
    })
    .await;
    assert_eq!(agent.stats().sessions, 0);
    s.post_inbox(&id, json!({"n":1})).await;
    let seen = until_state(&mut events, AgentState::Idle).await;
    assert_eq!(inbox_seqs(&seen), vec![1]);
    agent.shutdown().await;
    s.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_cli_prints_inbox_messages_as_json_lines() {
    use tokio::io::AsyncBufReadExt;
    let s = Server::start().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_livepush"))
        .args(["agent", "--server", &s.url(), "--linger", "0s"])
        .env("LIVEPUSH_TOKEN", token("cli-agent"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn agent");
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut err = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut states = Vec::new();
    let mut next_state = async || -> String {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(10), err.next_line())
                .await
                .expect("stderr line in time")
                .expect("read")
                .expect("a line");
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["event"] == "state" {
                return v["state"].as_str().unwrap_or_default().to_owned();
            }
        }
    };
    while states.last().map(String::as_str) != Some("idle") {
        states.push(next_state().await);
    }
    assert_eq!(states, vec!["connecting", "draining", "idle"]);
    s.registered_and_offline("cli-agent").await;
    for n in 1..=2 {
        s.post_inbox("cli-agent", json!({"n":n})).await;
    }
    let mut seqs = Vec::new();
    while seqs.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(10), out.next_line())
            .await
            .expect("stdout line in time")
            .expect("read")
            .expect("a line");
        let v: Value = serde_json::from_str(&line).expect("one JSON object per line");
        assert_eq!(v["event"], "inbox");
        assert_eq!(v["type"], "notice");
        let seq = v["seq"].as_u64().expect("seq");
        assert_eq!(v["data"], json!({"n": seq}));
        assert!(v["ts"].as_u64().is_some());
        seqs.push(seq);
    }
    assert_eq!(seqs, vec![1, 2]);
    s.eventually("the acks to land", || async {
        s.terminal("cli-agent").await["inbox"]["acked"] == json!(2)
    })
    .await;
    let _ = child.kill().await;
    s.running.shutdown().await;
}

/// A raw sleeping terminal (UDP only) to probe the server's wake schedule directly.
struct RawSleeper {
    udp: tokio::net::UdpSocket,
    key: WakeKey,
}

impl RawSleeper {
    async fn new(s: &Server, id: &str) -> RawSleeper {
        let (client, mut events) = Client::connect(config(s, id).client).expect("client");
        loop {
            let e = tokio::time::timeout(PATIENCE, events.recv())
                .await
                .expect("connected in time");
            if let Some(Event::Connected { .. }) = e {
                break;
            }
        }
        let key = WakeKey::from_base64(&client.session().expect("session").wake_key).expect("key");
        client.close().await;
        RawSleeper {
            udp: tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("udp"),
            key,
        }
    }

    async fn keepalive(&self, s: &Server, id: &str) {
        let d = livepush_proto::wake::Keepalive::encode(
            id,
            now_ms(),
            &self.key,
            livepush_proto::wake::KEEPALIVE_PAD_TO,
        );
        self.udp
            .send_to(&d, s.running.wake_addr().expect("wake listener"))
            .await
            .expect("send");
    }

    async fn wake(&self, wait: Duration) -> Option<Wake> {
        let mut buf = [0u8; 512];
        let deadline = Instant::now() + wait;
        loop {
            let (n, _) = tokio::time::timeout_at(deadline, self.udp.recv_from(&mut buf))
                .await
                .ok()?
                .expect("recv");
            if let Ok(w) = Wake::verify(&buf[..n], &self.key) {
                return Some(w);
            }
        }
    }
}

/// Contract: "A terminal that goes offline while inbox messages are still unacked is woken
/// the same way." Here the terminal was woken for message 1, connected, received it, stayed
/// past the first wake retry (so the wake episode ended while it was there), and dropped
/// before acking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_terminal_that_drops_before_acking_is_woken_again() {
    let s = Server::start().await;
    let sleeper = RawSleeper::new(&s, "dropper").await;
    sleeper.keepalive(&s, "dropper").await;
    s.registered_and_offline("dropper").await;
    assert_eq!(
        s.post_inbox("dropper", json!({"n":1})).await["wake"],
        "sent"
    );
    assert!(sleeper.wake(PATIENCE).await.is_some());
    let (client, mut events) = Client::connect(config(&s, "dropper").client).expect("client");
    loop {
        let e = tokio::time::timeout(PATIENCE, events.recv())
            .await
            .expect("inbox in time");
        if let Some(Event::Inbox(m)) = e {
            assert_eq!(m.seq, 1);
            break;
        }
    }
    // Stay connected until the server's wake episode has seen the session and ended.
    s.eventually("the wake episode to end", || async {
        sleeper.wake(Duration::from_millis(300)).await.is_none()
    })
    .await;
    client.close().await;
    assert_eq!(s.terminal("dropper").await["inbox"]["acked"], 0);
    let w = sleeper.wake(Duration::from_secs(3)).await;
    assert!(w.is_some(), "not woken again for the unacked message 1");
}

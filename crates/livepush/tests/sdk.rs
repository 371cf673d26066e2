//! The Rust SDK against a real server, through a proxy that keeps breaking the connection.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use livepush_client::{Client, ClientConfig, Event};
use livepush_server::Config;
use livepush_server::auth::{Claims, TokenKeys, now_secs};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const KEY: &str = "sdk-test-key";
const SECRET: &str = "sdk-test-secret-0123456789";

/// A TCP proxy whose live connections can be cut (both sockets dropped, no close frame) or
/// frozen (sockets kept open, nothing forwarded: a dead network path).
#[derive(Clone, Default)]
struct Proxy {
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    frozen: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
    freeze_next: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> (Proxy, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let proxy = Proxy::default();
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let Ok(mut up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let p2 = p.clone();
                let task = tokio::spawn(async move {
                    // Forward until cut; when asked to freeze, park both sockets unread.
                    let mut a = [0u8; 16 * 1024];
                    let mut b = [0u8; 16 * 1024];
                    loop {
                        if p2.freeze_next.load(std::sync::atomic::Ordering::SeqCst) {
                            p2.frozen.lock().expect("lock").push((down, up));
                            return;
                        }
                        tokio::select! {
                            r = down.read(&mut a) => match r {
                                Ok(0) | Err(_) => return,
                                Ok(n) => if tokio::io::AsyncWriteExt::write_all(&mut up, &a[..n]).await.is_err() { return },
                            },
                            r = up.read(&mut b) => match r {
                                Ok(0) | Err(_) => return,
                                Ok(n) => if tokio::io::AsyncWriteExt::write_all(&mut down, &b[..n]).await.is_err() { return },
                            },
                            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                        }
                    }
                });
                p.conns.lock().expect("lock").push(task);
            }
        });
        (proxy, addr)
    }

    /// Drop every live connection abruptly.
    fn cut(&self) {
        for t in self.conns.lock().expect("lock").drain(..) {
            t.abort();
        }
    }
}

fn token(sub: &str) -> String {
    TokenKeys::new(SECRET)
        .mint(&Claims {
            sub: sub.into(),
            exp: now_secs() + 600,
            rooms: vec!["live:*".into()],
            send: false,
        })
        .expect("token")
}

async fn publish(http: &reqwest::Client, url: &str, room: &str, n: u64) {
    let r = http
        .post(format!("{url}/v1/rooms/{room}/messages"))
        .bearer_auth(KEY)
        .json(&json!({"type":"gift","data":{"n":n}}))
        .send()
        .await
        .expect("publish");
    assert!(r.status().is_success());
}

fn fast_client(server: String, sub: &str) -> ClientConfig {
    ClientConfig {
        server,
        token: Some(token(sub)),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(300),
        idle_timeout: Some(Duration::from_millis(400)),
        ping_timeout: Duration::from_millis(300),
        ..ClientConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_survives_a_proxy_that_keeps_cutting_it() {
    let server = livepush_server::start(Config::for_tests(KEY, SECRET))
        .await
        .expect("server");
    let (proxy, proxy_addr) = Proxy::start(server.addr()).await;
    let (client, mut events) =
        Client::connect(fast_client(format!("http://{proxy_addr}"), "viewer")).expect("client");
    client.join("live:cut", None).await.expect("join");
    // Wait for the first join so that every message below is owed to this client.
    loop {
        if let Some(Event::Joined { .. }) = events.recv().await {
            break;
        }
    }

    const TOTAL: u64 = 400;
    let http = reqwest::Client::new();
    let url = server.url();
    let publisher = tokio::spawn(async move {
        for n in 1..=TOTAL {
            publish(&http, &url, "live:cut", n).await;
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
                    proxy
                        .freeze_next
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    proxy
                        .freeze_next
                        .store(false, std::sync::atomic::Ordering::SeqCst);
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seqs.len() < TOTAL as usize {
        let e = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("all messages within 60 s")
            .expect("events open");
        match e {
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
    let server = livepush_server::start(Config::for_tests(KEY, SECRET))
        .await
        .expect("server");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_livepush"))
        .args(["tail", "--server", &server.url(), "--room", "live:tail"])
        .args(["--transport", transport])
        .env("LIVEPUSH_TOKEN", token("tailer"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tail");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        child.stdout.take().expect("stdout"),
    ));
    let mut next = async || -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("line in time")
            .expect("read")
            .expect("a line");
        serde_json::from_str(&line).expect("one JSON object per line")
    };
    let connected = next().await;
    assert_eq!(connected["event"], "connected");
    assert_eq!(
        connected["transport"],
        match transport {
            "ws" => "ws",
            other => other,
        }
    );
    let joined = next().await;
    assert_eq!(
        (joined["event"].as_str(), joined["room"].as_str()),
        (Some("joined"), Some("live:tail"))
    );
    publish(&reqwest::Client::new(), &server.url(), "live:tail", 7).await;
    // The room's online count is broadcast on its own clock and may come first.
    let mut m = next().await;
    while m["event"] == "online" {
        m = next().await;
    }
    assert_eq!(m["event"], "message");
    assert_eq!(m["seq"], 1);
    assert_eq!(m["type"], "gift");
    assert_eq!(m["data"], json!({"n": 7}));
    server.shutdown().await;
}

/// Contract v1.1, decision 8, against the real server: when the backend resets a room's
/// history (`DELETE /v1/rooms/{room}/history`), an SDK client on each transport is told
/// `Joined{recovered:false}` with the new epoch, goes on from it without rejoining, and gets
/// the new epoch's messages once, from seq 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_history_reaches_the_sdk_as_a_failed_resume_on_every_transport() {
    use livepush_client::TransportMode;
    let server = livepush_server::start(Config::for_tests(KEY, SECRET))
        .await
        .expect("server");
    let http = reqwest::Client::new();
    let url = server.url();
    publish(&http, &url, "live:reset", 1).await;
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
        let r = http
            .delete(format!("{url}/v1/rooms/live:reset/history"))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("reset");
        assert!(r.status().is_success());
        let new = r.json::<serde_json::Value>().await.expect("json")["epoch"]
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
        publish(&http, &url, "live:reset", 100 + i as u64).await;
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
        publish(&http, &url, "live:reset", 200 + i as u64).await;
    }
    server.shutdown().await;
}

/// The next `Joined` or `Message` event, within 10 s.
async fn next_joined_or_message(
    events: &mut livepush_client::Events,
    mode: livepush_client::TransportMode,
) -> Event {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(e @ (Event::Joined { .. } | Event::Message(_)))) => return e,
            Ok(Some(_)) => continue,
            other => panic!("{mode:?}: no event in time: {other:?}"),
        }
    }
}

//! The real `livepush serve` process with a data directory: restarts, `kill -9` during a
//! publish storm, and a corrupt store.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use livepush_proto::wake::WakeKey;
use livepush_proto::{ServerFrame, split_frames};
use serde_json::{Value, json};
use support::process::ServerProcess;
use support::wake::WakeSocket;
use support::{Api, KEY, PATIENCE, SECRET, token, wait_for};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A `livepush serve` process on 127.0.0.1:0 with a data directory and `extra` arguments.
fn spawn(data_dir: &Path, extra: &[&str]) -> ServerProcess {
    let dir = data_dir.to_str().expect("a UTF-8 temporary path");
    let mut args = vec!["--data-dir", dir, "--history-size", "100000"];
    args.extend_from_slice(extra);
    ServerProcess::spawn(&args)
}

/// Publishes `body` to `room`; `None` when it was not accepted (the server may be dying).
async fn try_publish(api: &Api, room: &str, body: Value) -> Option<Value> {
    let r = api
        .http
        .post(format!("{}/v1/rooms/{room}/messages", api.url))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

async fn publish_gifts(api: &Api, room: &str, ns: std::ops::RangeInclusive<u64>) {
    for n in ns {
        api.publish(room, "gift", json!({"n":n})).await;
    }
}

/// The whole of `room`'s history, page by page: its epoch, latest seq and messages.
async fn history(api: &Api, room: &str) -> (String, u64, Vec<Value>) {
    let mut since = 0;
    let mut all = Vec::new();
    loop {
        let h = api
            .get(&format!(
                "/v1/rooms/{room}/history?since={since}&limit=1000"
            ))
            .await;
        let msgs = h["messages"].as_array().cloned().unwrap_or_default();
        let latest = h["seq"].as_u64().expect("seq");
        if msgs.is_empty() {
            return (h["epoch"].as_str().expect("epoch").to_owned(), latest, all);
        }
        since = msgs.last().and_then(|m| m["seq"].as_u64()).expect("seq");
        all.extend(msgs);
    }
}

/// A raw WebSocket terminal of a spawned server: frames as the server sends them, no SDK.
struct Ws(WebSocketStream<MaybeTlsStream<TcpStream>>);

impl Ws {
    /// Connects to the server at `url` and sends `connect` with a token for `sub`.
    async fn connect(url: &str, sub: &str) -> Ws {
        let ws_url = format!("{}/v1/connect", url.replacen("http", "ws", 1));
        let (ws, _) = tokio_tungstenite::connect_async(ws_url).await.expect("ws");
        let mut ws = Ws(ws);
        ws.send(json!({"op":"connect","token":token(sub, &["*"], false)}))
            .await;
        ws
    }

    async fn send(&mut self, frame: Value) {
        self.0
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send");
    }

    async fn close(mut self) {
        let _ = self.0.close(None).await;
    }

    /// The frames of the next text message (a batch), within 10 s.
    async fn frames(&mut self) -> Vec<ServerFrame> {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.0.next())
                .await
                .expect("frame in time")
                .expect("open")
                .expect("ok");
            let Message::Text(t) = m else { continue };
            return split_frames(t.as_str())
                .map(|line| ServerFrame::parse(line).expect("frame"))
                .collect();
        }
    }
}

/// Join `room` from `(epoch, seq)` and collect `joined` plus the replayed seqs.
async fn resume(url: &str, room: &str, epoch: &str, seq: u64, expect: usize) -> (bool, Vec<u64>) {
    let mut ws = Ws::connect(url, "resumer").await;
    ws.send(json!({"op":"join","room":room,"since":{"epoch":epoch,"seq":seq}}))
        .await;
    let mut recovered = None;
    let mut seqs = Vec::new();
    while recovered.is_none() || seqs.len() < expect {
        for frame in ws.frames().await {
            match frame {
                ServerFrame::Joined {
                    recovered: r,
                    epoch: e,
                    ..
                } => {
                    assert_eq!(e, epoch, "epoch survives the restart");
                    recovered = Some(r);
                }
                ServerFrame::Msg(m) => seqs.extend(m.seq),
                // A replay larger than the outbox ends in a prompt: pull the rest, page by
                // page, as a client does.
                ServerFrame::Prompt { .. } => {
                    let since = seqs.last().copied().unwrap_or(seq);
                    ws.send(json!({"op":"pull","room":room,"since":since}))
                        .await;
                }
                ServerFrame::Pulled {
                    messages,
                    seq: latest,
                    ..
                } => {
                    seqs.extend(messages.iter().filter_map(|m| m.seq));
                    let last = seqs.last().copied().unwrap_or(seq);
                    if last < latest {
                        ws.send(json!({"op":"pull","room":room,"since":last})).await;
                    }
                }
                _ => {}
            }
        }
    }
    (recovered.unwrap_or(false), seqs)
}

/// An answered publish: room, seq, epoch, publisher task, its counter.
type Answered = (String, u64, String, u64, u64);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_publish_storm_loses_no_answered_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = spawn(dir.path(), &["--durability", "batch"]);
    let answered: Arc<Mutex<Vec<Answered>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for task in 0..6u64 {
        let (api, answered, stop) = (server.api.clone(), answered.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let room = format!("storm{}", n % 2);
                let body = json!({"type":"gift","data":{"task":task,"n":n}});
                match try_publish(&api, &room, body).await {
                    Some(a) => answered.lock().expect("lock").push((
                        room,
                        a["seq"].as_u64().expect("seq"),
                        a["epoch"].as_str().expect("epoch").to_owned(),
                        task,
                        n,
                    )),
                    // The server died under us: this publish was never answered.
                    None => return,
                }
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    server.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.expect("publisher");
    }
    let answered = answered.lock().expect("lock").clone();
    eprintln!(
        "storm: {} publishes answered before kill -9",
        answered.len()
    );
    assert!(
        answered.len() > 50,
        "the storm published something: {}",
        answered.len()
    );

    let server = spawn(dir.path(), &["--durability", "batch"]);
    for room in ["storm0", "storm1"] {
        let (epoch, latest, msgs) = history(&server.api, room).await;
        let seqs: Vec<u64> = msgs
            .iter()
            .map(|m| m["seq"].as_u64().expect("seq"))
            .collect();
        assert_eq!(
            seqs,
            (1..=latest).collect::<Vec<_>>(),
            "{room}: no gap, no duplicate"
        );
        let mine: Vec<_> = answered.iter().filter(|a| a.0 == room).collect();
        for (_, seq, e, task, n) in &mine {
            assert_eq!(e, &epoch, "{room}: epoch unchanged");
            let m = &msgs[(*seq - 1) as usize];
            assert_eq!(m["data"], json!({"task":task,"n":n}), "{room} seq {seq}");
        }
        // A terminal that had seen up to some answered seq resumes with exactly the rest.
        let from = mine.iter().map(|a| a.1).min().expect("some answered") + 3;
        let missing = (latest - from) as usize;
        let (recovered, replay) = resume(server.url(), room, &epoch, from, missing).await;
        assert!(recovered);
        assert_eq!(replay, (from + 1..=latest).collect::<Vec<_>>());
    }
    server.stop();
}

#[tokio::test]
async fn restart_keeps_seq_epoch_history_and_room_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = spawn(dir.path(), &[]);
    let first = server.api.publish("keep", "gift", json!({"n":1})).await;
    let (mute, close) = (json!({"action":"mute"}), json!({"action":"close"}));
    server.api.publish("keep", "control", mute).await;
    server.api.publish("shut", "control", close).await;
    server.stop();

    let server = spawn(dir.path(), &[]);
    let info = server.api.room("keep").await;
    assert_eq!(info["epoch"], first["epoch"]);
    assert_eq!(info["seq"], 2);
    assert_eq!(info["muted"], true);
    let shut = server.api.room("shut").await;
    assert_eq!(shut["closed"], true);
    let next = server.api.publish("keep", "gift", json!({"n":3})).await;
    assert_eq!(next["seq"], 3);
    let (_, _, msgs) = history(&server.api, "keep").await;
    assert_eq!(msgs.len(), 3);
    assert_eq!(msgs[0]["data"], json!({"n":1}));
    server.stop();

    // A brand-new data directory is a new history: new epochs.
    let other = tempfile::tempdir().expect("tempdir");
    let server = spawn(other.path(), &[]);
    let fresh = server.api.publish("keep", "gift", json!({})).await;
    assert_ne!(fresh["epoch"], first["epoch"]);
    assert_eq!(fresh["seq"], 1);
}

#[test]
fn corrupt_store_stops_the_server_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("livepush.redb");
    std::fs::write(&file, vec![0x5au8; 64 * 1024]).expect("write garbage");
    let out = Command::new(env!("CARGO_BIN_EXE_livepush"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--api-key", KEY, "--token-secret", SECRET])
        .output()
        .expect("run");
    assert!(!out.status.success(), "a corrupt store must not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("livepush.redb"), "names the file: {stderr}");
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "never says it is listening"
    );
    // And the garbage is still there: no silent fresh start.
    assert_eq!(std::fs::read(&file).expect("read").len(), 64 * 1024);
}

/// One `POST /v1/poll` (no API key: the terminal's token is in `body`); its frames.
async fn poll(api: &Api, body: Value) -> Vec<Value> {
    let v: Value = api
        .http
        .post(format!("{}/v1/poll", api.url))
        .json(&body)
        .send()
        .await
        .expect("poll")
        .json()
        .await
        .expect("json");
    v["frames"].as_array().cloned().expect("frames")
}

/// A long-poll terminal needs no session held by one process: its polls go on, against a
/// restarted server (another port, like another node), from the positions they carry.
#[tokio::test]
async fn long_polls_continue_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = spawn(dir.path(), &[]);
    let token = token("poller", &["*"], false);
    let hello = poll(
        &server.api,
        json!({"token":token,"hello":true,"rooms":{"live:lp":{}},"wait_ms":1000}),
    )
    .await;
    assert_eq!(hello[0]["op"], "connected");
    assert_eq!(hello[1]["op"], "joined");
    let epoch = hello[1]["epoch"].as_str().expect("epoch").to_owned();
    publish_gifts(&server.api, "live:lp", 1..=3).await;
    let got = poll(
        &server.api,
        json!({"token":token,"rooms":{"live:lp":{"epoch":epoch,"seq":0}},"wait_ms":1000}),
    )
    .await;
    let seqs: Vec<u64> = got.iter().filter_map(|f| f["seq"].as_u64()).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    server.kill9();

    let server = spawn(dir.path(), &[]);
    publish_gifts(&server.api, "live:lp", 4..=5).await;
    let got = poll(
        &server.api,
        json!({"token":token,"rooms":{"live:lp":{"epoch":epoch,"seq":3}},"wait_ms":1000}),
    )
    .await;
    assert!(
        got.iter().all(|f| f["op"] == "msg"),
        "same epoch, complete: no joined, just the messages: {got:?}"
    );
    let seqs: Vec<u64> = got.iter().filter_map(|f| f["seq"].as_u64()).collect();
    assert_eq!(seqs, vec![4, 5]);
}

/// Connect once over WebSocket to learn the terminal's wake key.
async fn wake_key(url: &str, sub: &str) -> WakeKey {
    let mut ws = Ws::connect(url, sub).await;
    loop {
        for frame in ws.frames().await {
            if let ServerFrame::Connected { wake_key, .. } = frame {
                ws.close().await;
                return WakeKey::from_base64(&wake_key).expect("key");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inboxes_and_wake_registrations_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = spawn(dir.path(), &[]);
    let key = wake_key(server.url(), "settop").await;
    let udp = WakeSocket::bind(key).await;
    udp.keepalive(server.addr(), "settop").await;
    wait_for(
        "the wake registration",
        Instant::now() + PATIENCE,
        Duration::from_millis(20),
        || server.api.terminal("settop"),
        |t| t["wake"]["registered"] == json!(true),
    )
    .await;
    let mut answered = Vec::new();
    for n in 1..=5 {
        let r = server.api.post_inbox("settop", "cmd", json!({"n":n})).await;
        assert_eq!(r["wake"], "sent", "{r}");
        answered.push(r["seq"].as_u64().expect("seq"));
    }
    server.kill9();
    // Forget the wakes the first server sent.
    while udp.wake(Duration::from_millis(200)).await.is_some() {}

    // After the restart the server still knows where to wake the terminal, and does so for
    // the messages waiting, without a new post.
    let server = spawn(dir.path(), &[]);
    let w = udp.wake(PATIENCE).await.expect("a wake datagram in time");
    assert_eq!((w.terminal.as_str(), w.inbox), ("settop", 5));
    // The terminal connects and finds every answered message.
    let mut ws = Ws::connect(server.url(), "settop").await;
    let mut got = Vec::new();
    while got.len() < answered.len() {
        for frame in ws.frames().await {
            if let ServerFrame::Inbox { seq, data, .. } = frame {
                assert_eq!(data, json!({"n": seq}));
                got.push(seq);
            }
        }
    }
    assert_eq!(got, answered);
    server.stop();
}

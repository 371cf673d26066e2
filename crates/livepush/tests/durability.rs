//! The real `livepush serve` process with a data directory: restarts, `kill -9` during a
//! publish storm, and a corrupt store.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use livepush_proto::{ServerFrame, split_frames};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "durability-test-key";
const SECRET: &str = "durability-test-secret-0123456789";

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn spawn(data_dir: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_livepush"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args([
                "--api-key",
                KEY,
                "--token-secret",
                SECRET,
                "--history-size",
                "100000",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn livepush");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read listening line");
        let url = line
            .trim()
            .strip_prefix("livepush listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_owned();
        Server { child, url }
    }

    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill -INT");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "graceful stop exits 0: {status}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn publish(http: &reqwest::Client, url: &str, room: &str, body: Value) -> Option<Value> {
    let r = http
        .post(format!("{url}/v1/rooms/{room}/messages"))
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

/// `GET url` with the API key, as JSON.
async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url)
        .bearer_auth(KEY)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

async fn publish_gifts(
    http: &reqwest::Client,
    url: &str,
    room: &str,
    ns: std::ops::RangeInclusive<u64>,
) {
    for n in ns {
        publish(http, url, room, json!({"type":"gift","data":{"n":n}}))
            .await
            .expect("publish");
    }
}

async fn history(http: &reqwest::Client, url: &str, room: &str) -> (String, u64, Vec<Value>) {
    let mut since = 0;
    let mut all = Vec::new();
    loop {
        let h: Value = get_json(
            http,
            &format!("{url}/v1/rooms/{room}/history?since={since}&limit=1000"),
        )
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

fn token(sub: &str) -> String {
    livepush_server::auth::TokenKeys::new(SECRET)
        .mint(&livepush_server::auth::Claims {
            sub: sub.into(),
            exp: livepush_server::auth::now_secs() + 600,
            rooms: vec!["*".into()],
            send: false,
        })
        .expect("token")
}

/// Join `room` from `(epoch, seq)` and collect `joined` plus the replayed seqs.
async fn resume(url: &str, room: &str, epoch: &str, seq: u64, expect: usize) -> (bool, Vec<u64>) {
    let ws_url = format!("{}/v1/connect", url.replacen("http", "ws", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.expect("ws");
    let hello = json!({"op":"connect","token":token("resumer")});
    ws.send(Message::Text(hello.to_string().into()))
        .await
        .expect("send");
    let join = json!({"op":"join","room":room,"since":{"epoch":epoch,"seq":seq}});
    ws.send(Message::Text(join.to_string().into()))
        .await
        .expect("send");
    let mut recovered = None;
    let mut seqs = Vec::new();
    while recovered.is_none() || seqs.len() < expect {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frame in time")
            .expect("open")
            .expect("ok");
        let Message::Text(t) = m else { continue };
        for line in split_frames(t.as_str()) {
            match ServerFrame::parse(line).expect("frame") {
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
                    let pull = json!({"op":"pull","room":room,"since":since});
                    ws.send(Message::Text(pull.to_string().into()))
                        .await
                        .expect("send");
                }
                ServerFrame::Pulled {
                    messages,
                    seq: latest,
                    ..
                } => {
                    seqs.extend(messages.iter().filter_map(|m| m.seq));
                    let last = seqs.last().copied().unwrap_or(seq);
                    if last < latest {
                        let pull = json!({"op":"pull","room":room,"since":last});
                        ws.send(Message::Text(pull.to_string().into()))
                            .await
                            .expect("send");
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
    let server = Server::spawn(dir.path(), &["--durability", "batch"]);
    let url = server.url.clone();
    let http = reqwest::Client::new();
    let answered: Arc<Mutex<Vec<Answered>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for task in 0..6u64 {
        let (http, url, answered, stop) =
            (http.clone(), url.clone(), answered.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let room = format!("storm{}", n % 2);
                let body = json!({"type":"gift","data":{"task":task,"n":n}});
                match publish(&http, &url, &room, body).await {
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

    let server = Server::spawn(dir.path(), &["--durability", "batch"]);
    for room in ["storm0", "storm1"] {
        let (epoch, latest, msgs) = history(&http, &server.url, room).await;
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
        let (recovered, replay) = resume(&server.url, room, &epoch, from, missing).await;
        assert!(recovered);
        assert_eq!(replay, (from + 1..=latest).collect::<Vec<_>>());
    }
    server.stop();
}

#[tokio::test]
async fn restart_keeps_seq_epoch_history_and_room_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let http = reqwest::Client::new();
    let server = Server::spawn(dir.path(), &[]);
    let first = publish(
        &http,
        &server.url,
        "keep",
        json!({"type":"gift","data":{"n":1}}),
    )
    .await
    .expect("publish");
    publish(
        &http,
        &server.url,
        "keep",
        json!({"type":"control","data":{"action":"mute"}}),
    )
    .await
    .expect("mute");
    publish(
        &http,
        &server.url,
        "shut",
        json!({"type":"control","data":{"action":"close"}}),
    )
    .await
    .expect("close");
    server.stop();

    let server = Server::spawn(dir.path(), &[]);
    let info: Value = get_json(&http, &format!("{}/v1/rooms/keep", server.url)).await;
    assert_eq!(info["epoch"], first["epoch"]);
    assert_eq!(info["seq"], 2);
    assert_eq!(info["muted"], true);
    let shut: Value = get_json(&http, &format!("{}/v1/rooms/shut", server.url)).await;
    assert_eq!(shut["closed"], true);
    let next = publish(
        &http,
        &server.url,
        "keep",
        json!({"type":"gift","data":{"n":3}}),
    )
    .await
    .expect("publish");
    assert_eq!(next["seq"], 3);
    let (_, _, msgs) = history(&http, &server.url, "keep").await;
    assert_eq!(msgs.len(), 3);
    assert_eq!(msgs[0]["data"], json!({"n":1}));
    server.stop();

    // A brand-new data directory is a new history: new epochs.
    let other = tempfile::tempdir().expect("tempdir");
    let server = Server::spawn(other.path(), &[]);
    let fresh = publish(&http, &server.url, "keep", json!({"type":"gift","data":{}}))
        .await
        .expect("publish");
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

async fn poll(http: &reqwest::Client, url: &str, body: Value) -> Vec<Value> {
    let v: Value = http
        .post(format!("{url}/v1/poll"))
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
    let http = reqwest::Client::new();
    let server = Server::spawn(dir.path(), &[]);
    let token = token("poller");
    let hello = poll(
        &http,
        &server.url,
        json!({"token":token,"hello":true,"rooms":{"live:lp":{}},"wait_ms":1000}),
    )
    .await;
    assert_eq!(hello[0]["op"], "connected");
    assert_eq!(hello[1]["op"], "joined");
    let epoch = hello[1]["epoch"].as_str().expect("epoch").to_owned();
    publish_gifts(&http, &server.url, "live:lp", 1..=3).await;
    let got = poll(
        &http,
        &server.url,
        json!({"token":token,"rooms":{"live:lp":{"epoch":epoch,"seq":0}},"wait_ms":1000}),
    )
    .await;
    let seqs: Vec<u64> = got.iter().filter_map(|f| f["seq"].as_u64()).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    server.kill9();

    let server = Server::spawn(dir.path(), &[]);
    publish_gifts(&http, &server.url, "live:lp", 4..=5).await;
    let got = poll(
        &http,
        &server.url,
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
async fn wake_key(url: &str, sub: &str) -> livepush_proto::wake::WakeKey {
    let ws_url = format!("{}/v1/connect", url.replacen("http", "ws", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.expect("ws");
    let hello = json!({"op":"connect","token":token(sub)});
    ws.send(Message::Text(hello.to_string().into()))
        .await
        .expect("send");
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frame in time")
            .expect("open")
            .expect("ok");
        let Message::Text(t) = m else { continue };
        for line in split_frames(t.as_str()) {
            if let ServerFrame::Connected { wake_key, .. } =
                ServerFrame::parse(line).expect("frame")
            {
                let _ = ws.close(None).await;
                return livepush_proto::wake::WakeKey::from_base64(&wake_key).expect("key");
            }
        }
    }
}

fn udp_addr(url: &str) -> std::net::SocketAddr {
    url.trim_start_matches("http://").parse().expect("addr")
}

async fn wait_wake(
    udp: &tokio::net::UdpSocket,
    key: &livepush_proto::wake::WakeKey,
) -> livepush_proto::wake::Wake {
    let mut buf = [0u8; 512];
    loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), udp.recv_from(&mut buf))
            .await
            .expect("a wake datagram in time")
            .expect("recv");
        if let Ok(w) = livepush_proto::wake::Wake::verify(&buf[..n], key) {
            return w;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inboxes_and_wake_registrations_survive_kill_9() {
    use livepush_proto::wake::{KEEPALIVE_PAD_TO, Keepalive};
    let dir = tempfile::tempdir().expect("tempdir");
    let http = reqwest::Client::new();
    let server = Server::spawn(dir.path(), &[]);
    let key = wake_key(&server.url, "settop").await;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp");
    let ka = Keepalive::encode(
        "settop",
        livepush_server::auth::now_ms(),
        &key,
        KEEPALIVE_PAD_TO,
    );
    udp.send_to(&ka, udp_addr(&server.url))
        .await
        .expect("keepalive");
    let mut registered = false;
    for _ in 0..200 {
        let t: Value = get_json(&http, &format!("{}/v1/terminals/settop", server.url)).await;
        if t["wake"]["registered"] == json!(true) {
            registered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(registered);
    let mut answered = Vec::new();
    for n in 1..=5 {
        let r: Value = http
            .post(format!("{}/v1/terminals/settop/messages", server.url))
            .bearer_auth(KEY)
            .json(&json!({"type":"cmd","data":{"n":n}}))
            .send()
            .await
            .expect("post")
            .json()
            .await
            .expect("json");
        assert_eq!(r["wake"], "sent", "{r}");
        answered.push(r["seq"].as_u64().expect("seq"));
    }
    server.kill9();
    // Forget the wakes the first server sent.
    let mut buf = [0u8; 512];
    while tokio::time::timeout(Duration::from_millis(200), udp.recv_from(&mut buf))
        .await
        .is_ok()
    {}

    // After the restart the server still knows where to wake the terminal, and does so for
    // the messages waiting, without a new post.
    let server = Server::spawn(dir.path(), &[]);
    let w = wait_wake(&udp, &key).await;
    assert_eq!((w.terminal.as_str(), w.inbox), ("settop", 5));
    // The terminal connects and finds every answered message.
    let ws_url = format!("{}/v1/connect", server.url.replacen("http", "ws", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.expect("ws");
    let hello = json!({"op":"connect","token":token("settop")});
    ws.send(Message::Text(hello.to_string().into()))
        .await
        .expect("send");
    let mut got = Vec::new();
    while got.len() < answered.len() {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frame in time")
            .expect("open")
            .expect("ok");
        let Message::Text(t) = m else { continue };
        for line in split_frames(t.as_str()) {
            if let ServerFrame::Inbox { seq, data, .. } = ServerFrame::parse(line).expect("frame") {
                assert_eq!(data, json!({"n": seq}));
                got.push(seq);
            }
        }
    }
    assert_eq!(got, answered);
    server.stop();
}

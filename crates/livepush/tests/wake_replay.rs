//! A captured keepalive replayed after a restart (even `kill -9`) of the real process does not
//! move the terminal's wakes to the replayer.

mod support;

use std::time::Duration;

use livepush_proto::wake::WakeKey;
use serde_json::{Value, json};
use support::process::ServerProcess;
use support::wake::WakeSocket;
use support::{KEY, PATIENCE, SECRET, wait_for};
use tokio::net::UdpSocket;
use tokio::time::Instant;

fn spawn(dir: &std::path::Path) -> ServerProcess {
    ServerProcess::spawn(&["--data-dir", dir.to_str().expect("a UTF-8 temporary path")])
}

/// The terminal's `last_keepalive_ms` once it is past `after`.
async fn keepalive_after(server: &ServerProcess, after: u64) -> u64 {
    let t = wait_for(
        "the keepalive to be accepted",
        Instant::now() + PATIENCE,
        Duration::from_millis(20),
        || server.api.terminal("settop"),
        |t: &Value| t["wake"]["last_keepalive_ms"].as_u64() > Some(after),
    )
    .await;
    t["wake"]["last_keepalive_ms"].as_u64().expect("ts")
}

async fn metrics(server: &ServerProcess) -> String {
    server
        .api
        .http
        .get(format!("{}/metrics", server.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keepalive_captured_before_a_kill_9_is_refused_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = spawn(dir.path());
    let terminal = WakeSocket::bind(WakeKey::derive(SECRET.as_bytes(), "settop")).await;
    // The first keepalive registers the terminal's address, written in the background: a
    // clean stop makes sure it is on disk.
    terminal.keepalive(server.addr(), "settop").await;
    let first = keepalive_after(&server, 0).await;
    server.stop();
    // The next one, from the same address, is only remembered in memory. An eavesdropper
    // captures it.
    let server = spawn(dir.path());
    let captured = terminal.keepalive(server.addr(), "settop").await;
    keepalive_after(&server, first).await;
    server.kill9();

    let server = spawn(dir.path());
    let attacker = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    attacker
        .send_to(&captured, server.addr())
        .await
        .expect("replay");
    wait_for(
        "the replay to be refused",
        Instant::now() + PATIENCE,
        Duration::from_millis(20),
        || metrics(&server),
        |m: &String| m.contains(r#"livepush_wake_keepalives_total{reason="replayed"} 1"#),
    )
    .await;
    // The next wake goes to the terminal, not to the replayer.
    let posted = server
        .api
        .post_inbox("settop", "cmd", json!({"n": 1}))
        .await;
    assert_eq!(posted["wake"], "sent", "{posted}");
    let w = terminal
        .wake(PATIENCE)
        .await
        .expect("the terminal is woken");
    assert_eq!((w.terminal.as_str(), w.inbox), ("settop", 1));
    let mut buf = [0u8; 512];
    let stolen =
        tokio::time::timeout(Duration::from_millis(300), attacker.recv_from(&mut buf)).await;
    assert!(stolen.is_err(), "the replayer got a datagram");
    server.stop();
}

//! The real `livepush serve` process against clients that hold on: a graceful stop tells
//! every terminal to reconnect, flushes the store and exits 0 within `--shutdown-timeout`
//! whatever its clients do, and under a low open-files limit one address cannot lock other
//! clients out.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::process::ServerProcess;
use support::{KEY, PATIENCE, token};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// A TCP connection to `server` that reads almost nothing: a receive buffer of 4 KiB.
async fn tight_connection(server: &ServerProcess) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(server.addr()).await.expect("connect")
}

/// A connection that sent `head` and nothing after it.
async fn stuck(server: &ServerProcess, head: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(server.addr()).await.expect("connect");
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp
}

/// SIGTERM with a body-less request, a trickled publish, an SSE stream that stopped reading
/// and a WebSocket terminal: the process exits 0 within the deadline, the terminal gets
/// close 1001, and a message published just before is there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_deadline_whatever_clients_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().to_str().expect("a UTF-8 path").to_owned();
    let timeout = Duration::from_secs(3);
    // `none` makes the store durable only every second, or at the shutdown's flush.
    let args = ["--data-dir", &data_dir, "--durability", "none"];
    let mut server = ServerProcess::spawn(&[&args[..], &["--shutdown-timeout", "3s"]].concat());
    let room = "live:stop";

    // An SSE stream that reads nothing while 6 MB of messages are published to its room:
    // the server's writes to it block.
    let mut sse = tight_connection(&server).await;
    let sse_token = token("reader", &[room], false);
    sse.write_all(
        format!("GET /v1/sse?token={sse_token}&rooms={room} HTTP/1.1\r\nHost: x\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("sse request");
    let big = "x".repeat(60_000);
    for n in 0..100 {
        server
            .api
            .publish(room, "gift", json!({"n": n, "pad": big}))
            .await;
    }
    let _no_body = stuck(
        &server,
        "POST /v1/poll HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
    )
    .await;
    let _trickle = stuck(
        &server,
        &format!(
            "POST /v1/rooms/{room}/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
             Content-Length: 1000\r\n\r\n{{\"type\":"
        ),
    )
    .await;
    let ws_url = format!("{}/v1/connect", server.url().replacen("http", "ws", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.expect("ws");
    let ws_token = token("viewer", &[room], false);
    ws.send(Message::Text(
        json!({"op":"connect","token":ws_token}).to_string().into(),
    ))
    .await
    .expect("connect");
    let last = server.api.publish(room, "gift", json!({"n": "last"})).await;

    let (status, took) = server
        .terminate(timeout + Duration::from_secs(2))
        .expect("the process exits within the shutdown timeout");
    assert!(status.success(), "exit status {status}");
    assert!(took <= timeout + Duration::from_secs(1), "took {took:?}");
    let close = tokio::time::timeout(PATIENCE, async {
        while let Some(m) = ws.next().await {
            if let Ok(Message::Close(c)) = m {
                return c;
            }
        }
        None
    })
    .await
    .expect("the WebSocket ends")
    .expect("with a close frame");
    assert_eq!(close.code, CloseCode::Away, "{close:?}");
    drop(sse);

    let again = ServerProcess::spawn(&args);
    let h = again
        .api
        .get(&format!("/v1/rooms/{room}/history?since=100&limit=10"))
        .await;
    assert_eq!(h["seq"], last["seq"], "{h}");
    assert_eq!(h["messages"][0]["data"], json!({"n": "last"}), "{h}");
}

/// Under a low open-files limit, one address holding idle connections cannot lock other
/// clients out: by default it may hold a quarter of the limit, and is answered 429 past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_file_under_a_low_limit() {
    let server = ServerProcess::spawn_with_open_files(128, &["--data-dir", ":memory:"]);
    let mut idle = Vec::new();
    for _ in 0..200 {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind 127.0.0.2");
        if let Ok(tcp) = socket.connect(server.addr()).await {
            idle.push(tcp);
        }
    }
    let health = tokio::time::timeout(
        PATIENCE,
        server
            .api
            .http
            .get(format!("{}/healthz", server.url()))
            .send(),
    )
    .await
    .expect("another address is served at once")
    .expect("GET /healthz");
    assert_eq!(health.status(), 200);
}

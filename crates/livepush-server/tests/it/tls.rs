//! TLS: `https://` and `wss://` with a self-signed certificate, reloaded while running.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use livepush_proto::{Message as Msg, ServerFrame};
use livepush_server::tls::TlsFiles;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::MaybeTlsStream;

use crate::support::{KEY, TestServer, WAIT, Ws, config};

/// A new self-signed certificate for `localhost`: (certificate PEM, key PEM, certificate).
fn self_signed() -> (String, String, CertificateDer<'static>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    (
        made.cert.pem(),
        made.signing_key.serialize_pem(),
        made.cert.der().clone(),
    )
}

fn write(files: &TlsFiles, (cert, key, _): &(String, String, CertificateDer<'static>)) {
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
}

/// A client that trusts exactly `certs`.
fn client(certs: &[&CertificateDer<'static>]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add((*c).clone()).unwrap();
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn connect(tls: &tokio_rustls::TlsConnector, addr: SocketAddr) -> TlsStream<TcpStream> {
    connect_with(tls, addr, None).await
}

/// `recv_buffer`: a fixed receive buffer (no autotuning), so that a client that does not
/// read backs the server's socket up soon.
async fn connect_with(
    tls: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    recv_buffer: Option<u32>,
) -> TlsStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let tcp = socket.connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(WAIT, tls.connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake")
}

/// The certificate a connection was given.
fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate")[0]
        .clone()
}

/// One HTTP/1.1 request over a new TLS connection; the status and the JSON body.
async fn https(
    tls: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut stream = connect(tls, addr).await;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("answer in time")
        .expect("read the answer");
    let answer = String::from_utf8(answer).expect("utf-8 answer");
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A terminal over `wss://`, after `connected`.
async fn terminal(server: &TestServer, tls: &tokio_rustls::TlsConnector, sub: &str) -> Ws {
    terminal_with(server, tls, sub, None).await
}

async fn terminal_with(
    server: &TestServer,
    tls: &tokio_rustls::TlsConnector,
    sub: &str,
    recv_buffer: Option<u32>,
) -> Ws {
    let stream = connect_with(tls, server.running.addr(), recv_buffer).await;
    let (inner, _) = tokio_tungstenite::client_async(
        "wss://localhost/v1/connect",
        MaybeTlsStream::Rustls(stream),
    )
    .await
    .expect("wss handshake");
    let mut ws = Ws::over(inner);
    let token = server.token(sub, &["tls"], false);
    ws.send(json!({"op":"connect","token":token,"client":"test/1"}))
        .await;
    match ws.next().await {
        ServerFrame::Connected { terminal, .. } => assert_eq!(terminal, sub),
        other => panic!("expected connected, got {other:?}"),
    }
    ws
}

async fn publish(tls: &tokio_rustls::TlsConnector, addr: SocketAddr, n: u64) {
    let (status, body) = https(
        tls,
        addr,
        "POST",
        "/v1/rooms/tls/messages",
        Some(json!({"type": "chat", "data": {"n": n}})),
    )
    .await;
    assert_eq!(status, 200, "publish over https: {body}");
}

async fn received(ws: &mut Ws) -> Value {
    loop {
        if let ServerFrame::Msg(Msg { data, .. }) = ws.next().await {
            return data;
        }
    }
}

async fn tls_server(dir: &Path, first: &(String, String, CertificateDer<'static>)) -> TestServer {
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    write(&files, first);
    TestServer::with(livepush_server::Config {
        tls: Some(files),
        ..config()
    })
    .await
}

/// Publish over https, receive over wss; reload to a second certificate: a new connection
/// gets it, the open one carries on; a bad file on reload changes nothing.
#[tokio::test]
async fn https_and_wss_with_a_certificate_reloaded_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (self_signed(), self_signed());
    let server = tls_server(dir.path(), &a).await;
    let addr = server.running.addr();
    assert_eq!(server.url(), format!("https://{addr}"));
    let trusts_a = client(&[&a.2]);
    let trusts_both = client(&[&a.2, &b.2]);

    let (status, _) = https(&trusts_a, addr, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    let mut ws = terminal(&server, &trusts_a, "viewer").await;
    assert!(matches!(
        ws.join("tls", None).await,
        ServerFrame::Joined { .. }
    ));
    publish(&trusts_a, addr, 1).await;
    assert_eq!(received(&mut ws).await, json!({"n": 1}));

    // The second certificate, on disk and reloaded.
    let files = TlsFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    write(&files, &b);
    server.running.reload_tls().expect("reload");
    let fresh = connect(&trusts_both, addr).await;
    assert_eq!(
        presented(&fresh),
        b.2,
        "a new connection gets the new certificate"
    );
    drop(fresh);
    publish(&trusts_both, addr, 2).await;
    assert_eq!(
        received(&mut ws).await,
        json!({"n": 2}),
        "the connection opened before the reload still works"
    );

    // A broken file: the reload fails, and the certificate in use stays.
    std::fs::write(&files.cert, "not a certificate").unwrap();
    let err = server.running.reload_tls().expect_err("a bad certificate");
    assert!(err.to_string().contains("cert.pem"), "{err}");
    let after = connect(&trusts_both, addr).await;
    assert_eq!(presented(&after), b.2);
    drop(after);

    // Long frames over wss (several TLS records) come through whole.
    let big = "x".repeat(40_000);
    let (status, _) = https(
        &trusts_both,
        addr,
        "POST",
        "/v1/rooms/tls/messages",
        Some(json!({"type": "chat", "data": {"big": big}})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(received(&mut ws).await, json!({"big": big}));
    server.running.shutdown().await;
}

/// A plain-HTTP client on the TLS port gets no answer it could take for HTTP, at once (no
/// hang), and the server carries on.
#[tokio::test]
async fn a_plain_client_on_the_tls_port_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let a = self_signed();
    let server = tls_server(dir.path(), &a).await;
    let addr = server.running.addr();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("the server closes at once");
    assert!(
        read.is_err() || !answer.starts_with(b"HTTP/"),
        "plain HTTP answered on a TLS port: {answer:?}"
    );
    let (status, _) = https(&client(&[&a.2]), addr, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    server.running.shutdown().await;
}

/// A certificate file that cannot be used stops the start with an error naming it.
#[tokio::test]
async fn a_bad_certificate_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles {
        cert: dir.path().join("missing.pem"),
        key: dir.path().join("key.pem"),
    };
    let err = livepush_server::start(livepush_server::Config {
        tls: Some(files),
        ..config()
    })
    .await
    .expect_err("no certificate file");
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

/// A wss client that stops reading backs the server's socket up (writes find it full, and
/// rustls holds ciphertext); once it reads again, each message arrives whole.
#[tokio::test]
async fn a_backed_up_wss_connection_gets_everything_once_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let a = self_signed();
    let files = TlsFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    write(&files, &a);
    let mut c = config();
    c.tls = Some(files);
    c.limits.max_publish_bytes = 8 << 20;
    c.limits.outbox_max_bytes = 16 << 20;
    c.history_size = 2;
    let server = TestServer::with(c).await;
    let addr = server.running.addr();
    let tls = client(&[&a.2]);
    let mut ws = terminal_with(&server, &tls, "slow", Some(64 << 10)).await;
    assert!(matches!(
        ws.join("tls", None).await,
        ServerFrame::Joined { .. }
    ));
    // Each message is more than the socket buffers hold (the server's send buffer grows to
    // 4 MiB at most with Linux's defaults): the server's writes stop at a full socket until
    // the client reads.
    let pad = "y".repeat(6 << 20);
    for i in 0..10 {
        let (status, body) = https(
            &tls,
            addr,
            "POST",
            "/v1/rooms/tls/messages",
            Some(json!({"type": "chat", "data": {"i": i, "pad": pad}})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(received(&mut ws).await["i"], json!(i));
    }
    server.running.shutdown().await;
}

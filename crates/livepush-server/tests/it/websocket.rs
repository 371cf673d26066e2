//! The WebSocket transport over real sockets: livepush's own RFC 6455 handshake and framing
//! (`transport/ws.rs` and the `livepush-wsframe` crate) seen from the wire, and the
//! connection's life around it (pipelining, heartbeats, slow consumers, shutdown).
//!
//! Most tests use [`Raw`], a hand-written client over a plain `TcpStream`, because a WebSocket
//! library would hide exactly what is tested here (masking, fragmentation, how frames fall
//! into TCP segments, what the server does with broken frames). The tungstenite-based
//! [`Ws`] of `support.rs` is used where a well-behaved library client is the point (it answers
//! pings by itself).

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::StreamExt;
use livepush_proto::{Message as Msg, ServerFrame, split_frames};
use livepush_server::metrics::ReasonLabel;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

// ---------------------------------------------------------------------------------------
// A raw client: HTTP upgrade and RFC 6455 frames written and read by hand.
// ---------------------------------------------------------------------------------------

const CONT: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// The example key of RFC 6455 §1.3 and the accept value it must give.
const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A mask with four different bytes, so a wrong unmasking offset shows.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A client frame header: FIN/RSV/opcode byte, then the length, masked or not.
fn header(b0: u8, len: u64, mask: Option<[u8; 4]>) -> Vec<u8> {
    let m = if mask.is_some() { 0x80 } else { 0 };
    let mut out = vec![b0];
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(k) = mask {
        out.extend_from_slice(&k);
    }
    out
}

/// A client frame with the first byte given as is (FIN, RSV bits, opcode).
fn raw_frame(b0: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = header(b0, payload.len() as u64, mask);
    match mask {
        Some(k) => out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4])),
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked client frame.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    raw_frame((u8::from(fin) << 7) | opcode, payload, Some(MASK))
}

/// A masked, unfragmented text frame.
fn text(s: &str) -> Vec<u8> {
    frame(true, TEXT, s.as_bytes())
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

fn connect_op(s: &TestServer, sub: &str, rooms: &[&str]) -> String {
    json!({"op":"connect","token":s.token(sub, rooms, false),"client":"raw/1"}).to_string()
}

fn join_op(room: &str, id: u64) -> String {
    json!({"op":"join","room":room,"id":id}).to_string()
}

/// One frame from the server, or the end of the TCP connection.
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
    /// EOF or a reset, with no (complete) frame before it.
    End,
}

/// An HTTP answer to an upgrade request.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// The headers of a correct upgrade request.
fn good_headers() -> Headers {
    vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", RFC_KEY),
        ("Sec-WebSocket-Version", "13"),
    ]
}

type Headers = Vec<(&'static str, &'static str)>;

/// [`good_headers`] with one header replaced, or removed (`None`).
fn with_header(name: &str, value: Option<&'static str>) -> Headers {
    good_headers()
        .into_iter()
        .filter_map(|(n, v)| {
            if n == name {
                value.map(|value| (n, value))
            } else {
                Some((n, v))
            }
        })
        .collect()
}

/// Send `GET /v1/connect` with these headers and read the answer's head (and body, unless it
/// is a 101). Returns whatever was read past the head.
async fn upgrade_request(
    tcp: &mut TcpStream,
    s: &TestServer,
    headers: &[(&str, &str)],
) -> (Answer, Vec<u8>) {
    request(tcp, s, "GET", headers).await
}

/// `METHOD /v1/connect` with these headers; see [`upgrade_request`].
async fn request(
    tcp: &mut TcpStream,
    s: &TestServer,
    method: &str,
    headers: &[(&str, &str)],
) -> (Answer, Vec<u8>) {
    request_then(tcp, s, method, headers, &[]).await
}

/// [`request`], with `then` written in the same TCP write right behind the request.
async fn request_then(
    tcp: &mut TcpStream,
    s: &TestServer,
    method: &str,
    headers: &[(&str, &str)],
    then: &[u8],
) -> (Answer, Vec<u8>) {
    let mut req = format!(
        "{method} /v1/connect HTTP/1.1\r\nHost: {}\r\n",
        s.running.addr()
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(then);
    tcp.write_all(&bytes).await.expect("write request");
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
            .await
            .expect("timed out waiting for the HTTP answer")
            .expect("read HTTP answer");
        assert!(n > 0, "connection closed before the HTTP answer");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..end].to_vec()).expect("HTTP head is text");
    let mut rest = buf[end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut answer = Answer {
        status,
        headers,
        body: Vec::new(),
    };
    if status != 101 {
        let len: usize = answer
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .expect("a content-length on an error answer");
        while rest.len() < len {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
                .await
                .expect("timed out reading the body")
                .expect("read body");
            assert!(n > 0, "connection closed inside the body");
            rest.extend_from_slice(&chunk[..n]);
        }
        answer.body = rest.drain(..len).collect();
    }
    (answer, rest)
}

/// A WebSocket client written by hand: what it sends is exactly what the test wrote, in the
/// TCP writes the test chose.
#[derive(Debug)]
struct Raw {
    tcp: TcpStream,
    /// Bytes read but not yet parsed into a frame.
    buf: Vec<u8>,
    /// Protocol frames of text messages already read, not yet returned.
    frames: VecDeque<ServerFrame>,
}

impl Raw {
    /// Upgrade a fresh connection (101 expected).
    async fn open(s: &TestServer) -> Raw {
        let tcp = TcpStream::connect(s.running.addr()).await.expect("tcp");
        Raw::open_on(tcp, s).await
    }

    async fn open_on(mut tcp: TcpStream, s: &TestServer) -> Raw {
        let (answer, rest) = upgrade_request(&mut tcp, s, &good_headers()).await;
        assert_eq!(answer.status, 101, "{answer:?}");
        Raw {
            tcp,
            buf: rest,
            frames: VecDeque::new(),
        }
    }

    /// Upgrade and authenticate; returns after `connected`.
    async fn connect(s: &TestServer, sub: &str, rooms: &[&str]) -> Raw {
        let mut raw = Raw::open(s).await;
        raw.write(&text(&connect_op(s, sub, rooms))).await;
        raw.expect_connected(sub).await;
        raw
    }

    async fn expect_connected(&mut self, sub: &str) {
        match self.frame().await {
            ServerFrame::Connected { terminal, .. } => assert_eq!(terminal, sub),
            other => panic!("expected connected, got {other:?}"),
        }
    }

    async fn expect_joined(&mut self, room: &str, id: u64) {
        match self.frame().await {
            ServerFrame::Joined { room: r, id: i, .. } => {
                assert_eq!(r, room);
                assert_eq!(i, Some(id));
            }
            other => panic!("expected joined {room}, got {other:?}"),
        }
    }

    /// Write these bytes at once (one `write_all`, flushed): on loopback they reach the server
    /// together. Separate calls with a sleep between reach it in separate reads.
    async fn write(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.expect("write");
        self.tcp.flush().await.expect("flush");
    }

    /// Parse one server frame from the front of `buf`, if it is complete.
    fn parse(&mut self) -> Option<Got> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        assert_eq!(b[1] & 0x80, 0, "a server frame must not be masked");
        assert_eq!(b[0] & 0x70, 0, "no RSV bits without an extension");
        assert_ne!(b[0] & 0x80, 0, "livepush writes every frame with FIN");
        let (len, at) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => {
                let mut l = [0u8; 8];
                l.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(l) as usize, 10)
            }
            126 | 127 => return None,
            n => (usize::from(n), 2),
        };
        if b.len() < at + len {
            return None;
        }
        let opcode = b[0] & 0x0F;
        let payload: Vec<u8> = self.buf.drain(..at + len).skip(at).collect();
        Some(match opcode {
            TEXT => Got::Text(String::from_utf8(payload).expect("server text is UTF-8")),
            BINARY => Got::Binary(payload),
            PING => Got::Ping(payload),
            PONG => Got::Pong(payload),
            CLOSE => match payload.as_slice() {
                [] => Got::Close(None, String::new()),
                [hi, lo, reason @ ..] => Got::Close(
                    Some(u16::from_be_bytes([*hi, *lo])),
                    String::from_utf8(reason.to_vec()).expect("close reason is UTF-8"),
                ),
                [_] => panic!("a close payload of one byte"),
            },
            other => panic!("unexpected opcode {other:#x} from the server"),
        })
    }

    /// The next server frame, or `None` if nothing arrives within `within`.
    async fn got_within(&mut self, within: Duration) -> Option<Got> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(g) = self.parse() {
                return Some(g);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0) | Err(_)) => return Some(Got::End),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next server frame (or the end), within [`WAIT`].
    async fn got(&mut self) -> Got {
        self.got_within(WAIT)
            .await
            .expect("timed out waiting for a WebSocket frame")
    }

    /// The next protocol frame: pings and `online` frames are skipped; anything else that
    /// is not a text message fails the test.
    async fn frame(&mut self) -> ServerFrame {
        loop {
            if let Some(f) = self.frames.pop_front() {
                if matches!(f, ServerFrame::Online { .. }) {
                    continue;
                }
                return f;
            }
            match self.got().await {
                Got::Text(t) => self.push_text(&t),
                Got::Ping(_) => {}
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    fn push_text(&mut self, t: &str) {
        for line in split_frames(t) {
            let f = ServerFrame::parse(line).unwrap_or_else(|e| panic!("bad frame {line}: {e}"));
            self.frames.push_back(f);
        }
    }

    /// Skip text messages and pings until a close frame; fails if the connection ends first.
    /// Protocol frames skipped are kept (see [`Raw::frames`]).
    async fn close(&mut self) -> (Option<u16>, String) {
        loop {
            match self.got().await {
                Got::Close(code, reason) => return (code, reason),
                Got::Text(t) => self.push_text(&t),
                Got::Ping(_) | Got::Pong(_) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// After a close: the TCP connection ends (EOF or reset) within [`WAIT`], with nothing
    /// more from the server.
    async fn ends(&mut self) {
        match self.got().await {
            Got::End => {}
            other => panic!("expected the TCP connection to end, got {other:?}"),
        }
    }
}

fn disconnects(s: &TestServer, reason: &'static str) -> u64 {
    s.running
        .app()
        .metrics
        .disconnects
        .get_or_create(&ReasonLabel { reason })
        .get()
}

// ---------------------------------------------------------------------------------------
// 1. The HTTP upgrade.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn upgrade_answers_101_with_the_rfc_accept_key() {
    let s = TestServer::start().await;
    let mut tcp = TcpStream::connect(s.running.addr()).await.unwrap();
    let (answer, rest) = upgrade_request(&mut tcp, &s, &good_headers()).await;
    assert_eq!(answer.status, 101, "{answer:?}");
    assert_eq!(answer.header("sec-websocket-accept"), Some(RFC_ACCEPT));
    assert!(
        answer
            .header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "{answer:?}"
    );
    assert!(
        answer
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
        "{answer:?}"
    );
    // No extension or subprotocol was asked for, so none is claimed.
    assert_eq!(answer.header("sec-websocket-extensions"), None);
    assert!(rest.is_empty(), "nothing is sent before the client speaks");
    // The socket now speaks WebSocket.
    let mut raw = Raw {
        tcp,
        buf: rest,
        frames: VecDeque::new(),
    };
    raw.write(&text(&connect_op(&s, "t", &["r"]))).await;
    raw.expect_connected("t").await;
}

#[tokio::test]
async fn upgrade_refuses_other_versions_with_426() {
    let s = TestServer::start().await;
    let headers = with_header("Sec-WebSocket-Version", Some("8"));
    let mut tcp = TcpStream::connect(s.running.addr()).await.unwrap();
    let (answer, _) = upgrade_request(&mut tcp, &s, &headers).await;
    assert_eq!(answer.status, 426, "{answer:?}");
    assert_eq!(answer.header("sec-websocket-version"), Some("13"));
    assert!(
        answer
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{answer:?}"
    );
    let body = answer.json();
    assert_eq!(body["error"], "bad_request", "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("13")),
        "{body}"
    );
    assert_eq!(answer.header("sec-websocket-accept"), None);
}

#[tokio::test]
async fn upgrade_without_a_key_or_connection_upgrade_is_a_json_400() {
    let s = TestServer::start().await;
    let cases = [
        (
            "no Sec-WebSocket-Key",
            with_header("Sec-WebSocket-Key", None),
            "Sec-WebSocket-Key",
        ),
        (
            "empty Sec-WebSocket-Key",
            with_header("Sec-WebSocket-Key", Some("")),
            "Sec-WebSocket-Key",
        ),
        (
            "a Sec-WebSocket-Key that is not 16 bytes of base64",
            with_header("Sec-WebSocket-Key", Some("x")),
            "Sec-WebSocket-Key",
        ),
        (
            "Connection without upgrade",
            with_header("Connection", Some("keep-alive")),
            "Connection",
        ),
    ];
    for (what, headers, mentions) in cases {
        let mut tcp = TcpStream::connect(s.running.addr()).await.unwrap();
        let (answer, _) = upgrade_request(&mut tcp, &s, &headers).await;
        assert_eq!(answer.status, 400, "{what}: {answer:?}");
        assert_eq!(answer.header("sec-websocket-accept"), None, "{what}");
        let body = answer.json();
        assert_eq!(body["error"], "bad_request", "{what}: {body}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains(mentions)),
            "{what}: {body}"
        );
    }
    // A correct upgrade, but as a POST.
    let mut tcp = TcpStream::connect(s.running.addr()).await.unwrap();
    let (answer, _) = request(&mut tcp, &s, "POST", &good_headers()).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert_eq!(answer.json()["error"], "bad_request");
    assert_eq!(answer.header("sec-websocket-accept"), None);
}

#[tokio::test]
async fn upgrade_accepts_token_lists_and_any_case() {
    let s = TestServer::start().await;
    let variants: [Vec<(&str, &str)>; 3] = [
        // Browsers send `keep-alive, Upgrade`.
        vec![
            ("Upgrade", "websocket"),
            ("Connection", "keep-alive, Upgrade"),
            ("Sec-WebSocket-Key", RFC_KEY),
            ("Sec-WebSocket-Version", "13"),
        ],
        // Header values are case-insensitive tokens.
        vec![
            ("Upgrade", "WebSocket"),
            ("Connection", "UPGRADE"),
            ("Sec-WebSocket-Key", RFC_KEY),
            ("Sec-WebSocket-Version", "13"),
        ],
        // The token in a second `Connection` line.
        vec![
            ("Upgrade", "websocket"),
            ("Connection", "keep-alive"),
            ("Connection", "upgrade"),
            ("Sec-WebSocket-Key", RFC_KEY),
            ("Sec-WebSocket-Version", "13"),
        ],
    ];
    for (i, headers) in variants.iter().enumerate() {
        let mut tcp = TcpStream::connect(s.running.addr()).await.unwrap();
        let (answer, rest) = upgrade_request(&mut tcp, &s, headers).await;
        assert_eq!(answer.status, 101, "variant {i}: {answer:?}");
        assert_eq!(
            answer.header("sec-websocket-accept"),
            Some(RFC_ACCEPT),
            "variant {i}"
        );
        let mut raw = Raw {
            tcp,
            buf: rest,
            frames: VecDeque::new(),
        };
        let sub = format!("t{i}");
        raw.write(&text(&connect_op(&s, &sub, &["r"]))).await;
        raw.expect_connected(&sub).await;
    }
}

// ---------------------------------------------------------------------------------------
// 2. Pings.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_ping_is_answered_with_a_pong_carrying_its_payload() {
    let s = TestServer::start().await;
    let mut raw = Raw::connect(&s, "t", &["r"]).await;
    // Idle for a moment: the driver is asleep when the ping comes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let payload = b"hello\x00\xff ping";
    raw.write(&frame(true, PING, payload)).await;
    assert_eq!(raw.got().await, Got::Pong(payload.to_vec()));
    // Empty and maximal (125 bytes) payloads, in one write.
    let big: Vec<u8> = (0..125u8).collect();
    let mut both = frame(true, PING, b"");
    both.extend_from_slice(&frame(true, PING, &big));
    raw.write(&both).await;
    assert_eq!(raw.got().await, Got::Pong(Vec::new()));
    assert_eq!(raw.got().await, Got::Pong(big));
    // A pong from the client is simply ignored.
    raw.write(&frame(true, PONG, b"unsolicited")).await;
    raw.write(&text(r#"{"op":"ping","id":5}"#)).await;
    assert_eq!(raw.frame().await, ServerFrame::Pong { id: Some(5) });
}

#[tokio::test]
async fn a_ping_before_connect_is_answered() {
    let s = TestServer::start().await;
    let mut raw = Raw::open(&s).await;
    raw.write(&frame(true, PING, b"early")).await;
    // Answered at once, before any `connect`.
    assert_eq!(raw.got().await, Got::Pong(b"early".to_vec()));
    raw.write(&text(&connect_op(&s, "t", &["r"]))).await;
    raw.expect_connected("t").await;
}

// ---------------------------------------------------------------------------------------
// 3. Pipelining: several frames per TCP segment, frames cut across segments.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn connect_and_join_in_one_tcp_write() {
    let s = TestServer::start().await;
    let mut raw = Raw::open(&s).await;
    let mut bytes = text(&connect_op(&s, "t", &["r", "r2", "r3"]));
    bytes.extend_from_slice(&text(&join_op("r", 7)));
    raw.write(&bytes).await;
    raw.expect_connected("t").await;
    raw.expect_joined("r", 7).await;
    // And after the handshake: two joins and a ping in one write.
    let mut bytes = text(&join_op("r2", 8));
    bytes.extend_from_slice(&frame(true, PING, b"p"));
    bytes.extend_from_slice(&text(&join_op("r3", 9)));
    raw.write(&bytes).await;
    let mut pong = false;
    let mut joined = Vec::new();
    while joined.len() < 2 {
        match raw.got().await {
            Got::Pong(p) => {
                assert_eq!(p, b"p");
                pong = true;
            }
            Got::Text(t) => {
                raw.push_text(&t);
                while let Some(f) = raw.frames.pop_front() {
                    match f {
                        ServerFrame::Joined { id, .. } => joined.push(id),
                        ServerFrame::Online { .. } => {}
                        other => panic!("{other:?}"),
                    }
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(joined, vec![Some(8), Some(9)]);
    if !pong {
        assert_eq!(raw.got().await, Got::Pong(b"p".to_vec()));
    }
}

/// A client that does not wait for the 101 (RFC 6455 says it must, some do not): frames
/// behind the upgrade request reach the server in hyper's read buffer, and none is lost.
#[tokio::test]
async fn frames_sent_with_the_upgrade_request_are_not_lost() {
    let s = TestServer::start().await;
    let mut tcp = TcpStream::connect(s.running.addr()).await.expect("tcp");
    let mut then = text(&connect_op(&s, "t", &["r", "r2"]));
    then.extend_from_slice(&text(&join_op("r", 7)));
    // Bigger than one read chunk of the server, so the frames behind it are in a later part
    // of what hyper hands over.
    let big = format!("[{}]", vec!["1"; 3000].join(","));
    let pull = format!(r#"{{"op":"ping","id":8,"pad":{big}}}"#);
    then.extend_from_slice(&text(&pull));
    then.extend_from_slice(&text(&join_op("r2", 9)));
    let (answer, rest) = request_then(&mut tcp, &s, "GET", &good_headers(), &then).await;
    assert_eq!(answer.status, 101, "{answer:?}");
    let mut raw = Raw {
        tcp,
        buf: rest,
        frames: VecDeque::new(),
    };
    raw.expect_connected("t").await;
    raw.expect_joined("r", 7).await;
    let mut ids = Vec::new();
    while ids.len() < 2 {
        match raw.frame().await {
            ServerFrame::Pong { id } => ids.push(id),
            ServerFrame::Joined { id, .. } => ids.push(id),
            ServerFrame::Online { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ids, vec![Some(8), Some(9)]);
}

#[tokio::test]
async fn frames_cut_across_tcp_writes_are_reassembled() {
    let s = TestServer::start().await;
    let join = text(&join_op("r", 3));
    // Cut inside the 2-byte header, inside the mask, right after the header, inside the
    // payload, one byte before the end.
    for cut in [1, 2, 4, 6, 20, join.len() - 1] {
        // `connect` plus the first part of `join` in one write: the handshake reads both and
        // must hand the half frame over to the session.
        // (A fresh terminal each time: dropping a socket counts as an interruption.)
        let sub = format!("t{cut}");
        let mut raw = Raw::open(&s).await;
        let mut first = text(&connect_op(&s, &sub, &["r", "r2"]));
        first.extend_from_slice(&join[..cut]);
        raw.write(&first).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        raw.write(&join[cut..]).await;
        raw.expect_connected(&sub).await;
        raw.expect_joined("r", 3).await;
        // The same after the handshake.
        let again = text(&join_op("r2", 4));
        raw.write(&again[..cut.min(again.len() - 1)]).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        raw.write(&again[cut.min(again.len() - 1)..]).await;
        raw.expect_joined("r2", 4).await;
    }
    // The `connect` frame itself cut in two.
    for cut in [1, 3, 40] {
        let sub = format!("u{cut}");
        let connect = text(&connect_op(&s, &sub, &["r"]));
        let mut raw = Raw::open(&s).await;
        raw.write(&connect[..cut]).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        let mut rest = connect[cut..].to_vec();
        rest.extend_from_slice(&join);
        raw.write(&rest).await;
        raw.expect_connected(&sub).await;
        raw.expect_joined("r", 3).await;
    }
}

#[tokio::test]
async fn messages_larger_than_one_read_are_assembled() {
    let s = TestServer::start().await;
    // A `connect` of ~20 KB (an ignored padding field) spans several 4 KiB reads.
    let pad = "p".repeat(20_000);
    let mut raw = Raw::open(&s).await;
    let connect = json!({"op":"connect","token":s.token("t", &["r"], false),"pad":pad});
    raw.write(&text(&connect.to_string())).await;
    raw.expect_connected("t").await;
    // And a 20 KB `join` afterwards, written in pieces.
    let join = text(&json!({"op":"join","room":"r","id":2,"pad":pad}).to_string());
    for piece in join.chunks(7000) {
        raw.write(piece).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    raw.expect_joined("r", 2).await;
}

#[tokio::test]
async fn connect_and_join_in_one_text_message() {
    let s = TestServer::start().await;
    let mut raw = Raw::open(&s).await;
    let message = format!(
        "{}\n{}\n{}",
        connect_op(&s, "t", &["a", "b"]),
        join_op("a", 1),
        join_op("b", 2)
    );
    raw.write(&text(&message)).await;
    raw.expect_connected("t").await;
    raw.expect_joined("a", 1).await;
    raw.expect_joined("b", 2).await;
}

// ---------------------------------------------------------------------------------------
// 4. Fragmentation.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_fragmented_message_with_a_ping_between_fragments() {
    let s = TestServer::start().await;
    let mut raw = Raw::open(&s).await;
    // `connect` in two fragments.
    let connect = connect_op(&s, "t", &["r"]);
    let (a, b) = connect.split_at(10);
    let mut bytes = frame(false, TEXT, a.as_bytes());
    bytes.extend_from_slice(&frame(true, CONT, b.as_bytes()));
    raw.write(&bytes).await;
    raw.expect_connected("t").await;

    // `join` in three fragments, each its own write, a ping between the second and third.
    let join = join_op("r", 11);
    let (a, rest) = join.split_at(5);
    let (b, c) = rest.split_at(10);
    raw.write(&frame(false, TEXT, a.as_bytes())).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    raw.write(&frame(false, CONT, b.as_bytes())).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    raw.write(&frame(true, PING, b"between")).await;
    // The ping is answered at once, while the message is still open.
    assert_eq!(raw.got().await, Got::Pong(b"between".to_vec()));
    tokio::time::sleep(Duration::from_millis(20)).await;
    raw.write(&frame(true, CONT, c.as_bytes())).await;
    raw.expect_joined("r", 11).await;

    // A multi-byte UTF-8 character split between two fragments is fine: UTF-8 is checked on
    // the whole message.
    let ping = r#"{"op":"ping","id":12,"note":"é"}"#.as_bytes();
    let split = ping.iter().position(|&b| b == 0xC3).unwrap() + 1;
    let mut bytes = frame(false, TEXT, &ping[..split]);
    bytes.extend_from_slice(&frame(true, CONT, &ping[split..]));
    raw.write(&bytes).await;
    assert_eq!(raw.frame().await, ServerFrame::Pong { id: Some(12) });

    // Empty fragments are allowed too.
    let mut bytes = frame(false, TEXT, b"");
    bytes.extend_from_slice(&frame(false, CONT, br#"{"op":"ping","id":13}"#));
    bytes.extend_from_slice(&frame(true, CONT, b""));
    raw.write(&bytes).await;
    assert_eq!(raw.frame().await, ServerFrame::Pong { id: Some(13) });
}

// ---------------------------------------------------------------------------------------
// 5. Protocol errors.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_unmasked_frame_closes_with_1002() {
    let s = TestServer::start().await;
    // During the session.
    let mut raw = Raw::connect(&s, "t", &["r"]).await;
    raw.write(&raw_frame(0x81, br#"{"op":"ping","id":1}"#, None))
        .await;
    assert_eq!(raw.close().await.0, Some(1002));
    assert!(raw.frames.is_empty(), "the unmasked frame was not handled");
    raw.ends().await;
    // And as the very first frame.
    let mut raw = Raw::open(&s).await;
    raw.write(&raw_frame(
        0x81,
        connect_op(&s, "t", &["r"]).as_bytes(),
        None,
    ))
    .await;
    assert_eq!(raw.close().await.0, Some(1002));
    assert!(raw.frames.is_empty(), "{:?}", raw.frames);
    raw.ends().await;
    let s2 = &s;
    s2.eventually("both sessions to end as protocol errors", || async {
        disconnects(s2, "protocol_error") == 2
    })
    .await;
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let s = TestServer::start().await;
    let mut raw = Raw::connect(&s, "t", &["r"]).await;
    raw.write(&frame(true, TEXT, b"{\"op\":\"ping\",\"x\":\"\xff\xfe\"}"))
        .await;
    assert_eq!(raw.close().await.0, Some(1007));
    raw.ends().await;
    // Also when the bad byte is in the last fragment of a fragmented message.
    let mut raw = Raw::connect(&s, "u", &["r"]).await;
    let mut bytes = frame(false, TEXT, br#"{"op":"ping","#);
    bytes.extend_from_slice(&frame(true, CONT, b"\"id\":1,\"x\":\"\xc3\x28\"}"));
    raw.write(&bytes).await;
    assert_eq!(raw.close().await.0, Some(1007));
    raw.ends().await;
    // And in a close frame's reason.
    let mut raw = Raw::connect(&s, "v", &["r"]).await;
    let mut p = close_payload(1000, "");
    p.extend_from_slice(b"\xff");
    raw.write(&frame(true, CLOSE, &p)).await;
    assert_eq!(raw.close().await.0, Some(1007));
    raw.ends().await;
}

#[tokio::test]
async fn rfc_violations_close_with_1002() {
    let s = TestServer::start().await;
    let ping = br#"{"op":"ping","id":1}"#;
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("RSV1 set", raw_frame(0xC1, ping, Some(MASK))),
        ("reserved data opcode 0x3", frame(true, 0x3, ping)),
        ("reserved control opcode 0xB", frame(true, 0xB, b"")),
        ("continuation with nothing open", frame(true, CONT, ping)),
        ("fragmented ping", frame(false, PING, b"x")),
        ("ping of 126 bytes", frame(true, PING, &[b'x'; 126])),
        ("close payload of one byte", frame(true, CLOSE, &[3])),
        (
            "close code 1005 on the wire",
            frame(true, CLOSE, &close_payload(1005, "")),
        ),
        (
            "close code 999",
            frame(true, CLOSE, &close_payload(999, "")),
        ),
    ];
    let mut interleaved = frame(false, TEXT, b"{\"op\":");
    interleaved.extend_from_slice(&frame(true, TEXT, ping));
    cases.push(("new text frame inside a fragmented message", interleaved));
    let mut huge = header(0x81, 1 << 63, Some(MASK));
    huge.truncate(14);
    cases.push(("64-bit length with the top bit set", huge));
    for (what, bytes) in cases {
        let mut raw = Raw::connect(&s, "t", &["r"]).await;
        raw.write(&bytes).await;
        assert_eq!(raw.close().await.0, Some(1002), "{what}");
        assert!(raw.frames.is_empty(), "{what}: {:?}", raw.frames);
        raw.ends().await;
    }
}

#[tokio::test]
async fn messages_over_the_frame_limit() {
    let mut c = config();
    c.limits.max_frame_bytes = 1024;
    let s = TestServer::with(c).await;
    let mut raw = Raw::connect(&s, "t", &["r"]).await;

    // Between 1× and 4× the limit: a `too_large` error, the session goes on. 4× exactly is
    // still read.
    for len in [1025, 2048, 4096] {
        let pad = "x".repeat(len - r#"{"op":"ping","id":1,"pad":""}"#.len());
        let msg = format!(r#"{{"op":"ping","id":1,"pad":"{pad}"}}"#);
        assert_eq!(msg.len(), len);
        raw.write(&text(&msg)).await;
        match raw.frame().await {
            ServerFrame::Error { code, .. } => assert_eq!(code.as_str(), "too_large", "{len}"),
            other => panic!("{len}: {other:?}"),
        }
        raw.write(&text(r#"{"op":"ping","id":2}"#)).await;
        assert_eq!(
            raw.frame().await,
            ServerFrame::Pong { id: Some(2) },
            "{len}"
        );
    }

    // A header declaring 4× + 1: `too_large`, then close 1009, before the payload is sent.
    raw.write(&header(0x81, 4097, Some(MASK))).await;
    match raw.frame().await {
        ServerFrame::Error { code, .. } => assert_eq!(code.as_str(), "too_large"),
        other => panic!("{other:?}"),
    }
    let (code, reason) = raw.close().await;
    assert_eq!(code, Some(1009));
    assert_eq!(reason, "too_large");
    raw.ends().await;

    // Fragments that are each small but add up to more than 4×.
    let mut raw = Raw::connect(&s, "u", &["r"]).await;
    // (Only the header of the fragment that goes past: bytes the server never reads could
    // make its close a TCP reset.)
    let chunk = vec![b'x'; 1000];
    let mut bytes = frame(false, TEXT, &chunk);
    for _ in 0..3 {
        bytes.extend_from_slice(&frame(false, CONT, &chunk));
    }
    bytes.extend_from_slice(&header(CONT, 1000, Some(MASK)));
    raw.write(&bytes).await;
    match raw.frame().await {
        ServerFrame::Error { code, .. } => assert_eq!(code.as_str(), "too_large"),
        other => panic!("{other:?}"),
    }
    assert_eq!(raw.close().await.0, Some(1009));
    raw.ends().await;

    // In the handshake: a `connect` between 1× and 4× is refused (4003, documented).
    let mut raw = Raw::open(&s).await;
    let connect =
        json!({"op":"connect","token":s.token("v", &["r"], false),"pad":"x".repeat(1500)});
    raw.write(&text(&connect.to_string())).await;
    match raw.frame().await {
        ServerFrame::Error { code, .. } => assert_eq!(code.as_str(), "unauthorized"),
        other => panic!("{other:?}"),
    }
    assert_eq!(raw.close().await.0, Some(4003));
    raw.ends().await;
    // Past 4× in the handshake: close 1009.
    let mut raw = Raw::open(&s).await;
    raw.write(&header(0x81, 100_000, Some(MASK))).await;
    assert_eq!(raw.close().await.0, Some(1009));
    raw.ends().await;
}

#[tokio::test]
async fn a_binary_frame_gets_bad_frame_and_the_connection_stays_open() {
    let s = TestServer::start().await;
    let mut raw = Raw::connect(&s, "t", &["r"]).await;
    raw.write(&frame(true, BINARY, br#"{"op":"ping","id":1}"#))
        .await;
    match raw.frame().await {
        ServerFrame::Error { code, .. } => assert_eq!(code.as_str(), "bad_frame"),
        other => panic!("{other:?}"),
    }
    // Fragmented binary too.
    let mut bytes = frame(false, BINARY, b"\x00\x01");
    bytes.extend_from_slice(&frame(true, CONT, b"\x02"));
    raw.write(&bytes).await;
    match raw.frame().await {
        ServerFrame::Error { code, .. } => assert_eq!(code.as_str(), "bad_frame"),
        other => panic!("{other:?}"),
    }
    raw.write(&text(r#"{"op":"ping","id":2}"#)).await;
    assert_eq!(raw.frame().await, ServerFrame::Pong { id: Some(2) });
    raw.write(&text(&join_op("r", 3))).await;
    raw.expect_joined("r", 3).await;
    // As the first frame, it is a failed handshake.
    let mut raw = Raw::open(&s).await;
    raw.write(&frame(true, BINARY, connect_op(&s, "t", &["r"]).as_bytes()))
        .await;
    match raw.frame().await {
        ServerFrame::Error { code, .. } => assert_eq!(code.as_str(), "unauthorized"),
        other => panic!("{other:?}"),
    }
    assert_eq!(raw.close().await.0, Some(4003));
}

#[tokio::test]
async fn no_connect_in_time_is_refused_with_4003() {
    let mut c = config();
    c.limits.connect_timeout = Duration::from_millis(300);
    let s = TestServer::with(c).await;
    let started = Instant::now();
    let mut raw = Raw::open(&s).await;
    match raw.frame().await {
        ServerFrame::Error { code, .. } => assert_eq!(code.as_str(), "unauthorized"),
        other => panic!("{other:?}"),
    }
    assert_eq!(raw.close().await, (Some(4003), "unauthorized".into()));
    raw.ends().await;
    assert!(started.elapsed() >= Duration::from_millis(250));
}

// ---------------------------------------------------------------------------------------
// 6. Closing.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_client_close_is_answered_and_the_connection_ends() {
    let s = TestServer::start().await;
    let mut raw = Raw::connect(&s, "t", &["r"]).await;
    raw.write(&text(&join_op("r", 1))).await;
    raw.expect_joined("r", 1).await;
    assert_eq!(s.running.connections().len(), 1);
    raw.write(&frame(true, CLOSE, &close_payload(1000, "bye")))
        .await;
    let (code, _) = raw.close().await;
    assert_eq!(code, Some(1000));
    raw.ends().await;
    let s2 = &s;
    s2.eventually("the session to end as a client close", || async {
        disconnects(s2, "client_close") == 1 && s2.running.connections().is_empty()
    })
    .await;
    assert_eq!(s.room("r").await["online"], 0);

    // A close without a payload is answered too.
    let mut raw = Raw::connect(&s, "u", &["r"]).await;
    raw.write(&frame(true, CLOSE, b"")).await;
    let (code, _) = raw.close().await;
    assert_eq!(code, Some(1000));
    raw.ends().await;
    // Frames after the close frame are ignored.
    let mut raw = Raw::connect(&s, "v", &["r"]).await;
    let mut bytes = frame(true, CLOSE, &close_payload(1001, ""));
    bytes.extend_from_slice(&text(&join_op("r", 5)));
    raw.write(&bytes).await;
    let (code, _) = raw.close().await;
    assert_eq!(code, Some(1000));
    assert!(raw.frames.is_empty(), "{:?}", raw.frames);
    raw.ends().await;
}

#[tokio::test]
async fn a_close_before_connect_is_answered() {
    let s = TestServer::start().await;
    let mut raw = Raw::open(&s).await;
    raw.write(&frame(true, CLOSE, &close_payload(1000, "")))
        .await;
    assert_eq!(raw.close().await.0, Some(1000));
    raw.ends().await;
}

#[tokio::test]
async fn connect_then_close_in_one_write_is_answered() {
    let s = TestServer::start().await;
    let mut raw = Raw::open(&s).await;
    let mut bytes = text(&connect_op(&s, "t", &["r"]));
    bytes.extend_from_slice(&frame(true, CLOSE, &close_payload(1000, "")));
    raw.write(&bytes).await;
    assert_eq!(raw.close().await.0, Some(1000));
    raw.ends().await;
}

// ---------------------------------------------------------------------------------------
// 7. Slow consumers.
// ---------------------------------------------------------------------------------------

/// A raw terminal whose socket takes little: a small receive buffer (no autotuning), so the
/// server's writes block soon after it stops reading.
async fn small_window_terminal(s: &TestServer, sub: &str, room: &str) -> Raw {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(s.running.addr()).await.unwrap();
    let mut raw = Raw::open_on(tcp, s).await;
    raw.write(&text(&connect_op(s, sub, &[room]))).await;
    raw.expect_connected(sub).await;
    raw.write(&text(&join_op(room, 1))).await;
    raw.expect_joined(room, 1).await;
    raw
}

/// Read what a dropped slow consumer still gets: its messages' seqs (checked contiguous from
/// 1) and how it ended.
async fn drain_slow(raw: &mut Raw) -> (Vec<u64>, Got) {
    let mut seqs = Vec::new();
    let end = loop {
        while let Some(f) = raw.frames.pop_front() {
            if let ServerFrame::Msg(Msg { seq: Some(seq), .. }) = f {
                seqs.push(seq);
            }
        }
        match raw.got().await {
            Got::Text(t) => raw.push_text(&t),
            Got::Ping(_) => {}
            end => break end,
        }
    };
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(
        seqs, expected,
        "what the slow consumer got is a contiguous prefix"
    );
    (seqs, end)
}

#[tokio::test]
async fn a_reader_whose_writes_stall_is_dropped_while_the_room_goes_on() {
    let mut c = config();
    c.limits.write_timeout = Duration::from_millis(500);
    // Far more than is published here: only the stalled write can end the connection.
    c.limits.outbox_max_bytes = 64 * 1024 * 1024;
    let s = TestServer::with(c).await;
    let started = Instant::now();
    let mut slow = small_window_terminal(&s, "slow", "sc").await;
    let mut reader = s.terminal("reader", &["sc"], false).await;
    reader.join("sc", None).await;
    assert_eq!(s.running.connections().len(), 2);

    // `slow` stops reading. Publish in lockstep with `reader` (so the reader never lags)
    // until the server has dropped `slow`.
    let pad = "x".repeat(32 * 1024);
    let mut published = 0u64;
    while s.running.connections().len() == 2 {
        assert!(published < 300, "slow consumer still connected");
        published += 1;
        s.publish("sc", "gift", json!({"i": published, "pad": pad}))
            .await;
        assert_eq!(reader.reliable(1).await, vec![published]);
        if published > 64 {
            // Past the socket buffers: give the reactor's tick its write_timeout.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(disconnects(&s, "slow_consumer"), 1);
    // (Less than 10 MB was published: the queue's 64 MiB hard limit cannot have been it.)
    // The reader got everything and still does.
    published += 1;
    s.publish("sc", "gift", json!({"i": published})).await;
    assert_eq!(reader.reliable(1).await, vec![published]);
    assert_eq!(s.running.connections().len(), 1);

    // `slow` reads again: a prefix of the messages, then the end of the connection (the
    // close frame could not be written), or close 4001 if it could.
    let (seqs, end) = drain_slow(&mut slow).await;
    assert!((seqs.len() as u64) < published, "{} messages", seqs.len());
    match end {
        Got::End => {}
        Got::Close(code, _) => {
            assert_eq!(code, Some(4001));
            slow.ends().await;
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_outbox_past_its_hard_limit_ends_the_connection_at_once() {
    let mut c = config();
    c.limits.outbox_max_bytes = 256 * 1024;
    // Long enough that only the hard limit can be what ends the connection here.
    c.limits.write_timeout = Duration::from_secs(30);
    let s = TestServer::with(c).await;
    let started = Instant::now();
    let mut slow = small_window_terminal(&s, "slow", "sc").await;
    let mut reader = s.terminal("reader", &["sc"], false).await;
    reader.join("sc", None).await;
    let closes = || s.running.app().metrics.outbox.slow_consumer_closes.get();

    // `slow` stops reading; publish in lockstep with `reader` until more than the hard limit
    // waits for `slow` behind its blocked write (what the room's ring holds for it, checked
    // at the heartbeat sweep).
    let pad = "x".repeat(32 * 1024);
    let mut published = 0u64;
    while closes() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the slow consumer was never closed ({published} published)"
        );
        published += 1;
        s.publish("sc", "gift", json!({"i": published, "pad": pad}))
            .await;
        assert_eq!(reader.reliable(1).await, vec![published]);
        if published > 100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(closes(), 1, "only the slow consumer overflowed");
    // The server ends it without waiting for the socket to drain (or for write_timeout).
    let s2 = &s;
    s2.eventually("the slow consumer to be gone", || async {
        s2.running.connections().len() == 1 && disconnects(s2, "slow_consumer") == 1
    })
    .await;

    // When `slow` reads again it gets a prefix of the messages, then close 4001 if the close
    // frame could be written, or else the end of the connection.
    let (seqs, end) = drain_slow(&mut slow).await;
    assert!((seqs.len() as u64) < published);
    match end {
        Got::End => {}
        Got::Close(code, reason) => {
            assert_eq!((code, reason.as_str()), (Some(4001), "slow_consumer"));
            slow.ends().await;
        }
        other => panic!("{other:?}"),
    }
    // The reader is unaffected.
    published += 1;
    s.publish("sc", "gift", json!({"i": published})).await;
    assert_eq!(reader.reliable(1).await, vec![published]);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// 8. Shutdown.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn shutdown_closes_sessions_with_1001() {
    let s = TestServer::start().await;
    let mut ws = s.terminal("lib", &["r"], false).await;
    ws.join("r", None).await;
    let mut raw = Raw::connect(&s, "raw", &["r"]).await;
    let TestServer { running, .. } = s;
    tokio::time::timeout(WAIT, running.shutdown())
        .await
        .expect("shutdown finishes");
    while let Some(f) = ws.try_next().await {
        assert!(matches!(f, ServerFrame::Online { .. }), "{f:?}");
    }
    assert_eq!(ws.closed, Some((1001, "shutdown".into())));
    assert_eq!(raw.close().await, (Some(1001), "shutdown".into()));
    raw.ends().await;
}

#[tokio::test]
async fn a_handshake_in_flight_at_shutdown_is_closed_too() {
    let s = TestServer::start().await;
    let mut raw = Raw::open(&s).await;
    let connect = text(&connect_op(&s, "late", &["r"]));
    let TestServer { running, .. } = s;
    tokio::time::timeout(WAIT, running.shutdown())
        .await
        .expect("shutdown finishes");
    raw.write(&connect).await;
    // Refused or served, the session must end with "going away" (or at least end).
    let end = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match raw.got().await {
                Got::Text(t) => raw.push_text(&t),
                Got::Ping(_) => {}
                end => return end,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("still open 3 s after shutdown; got {:?}", raw.frames));
    assert!(
        matches!(end, Got::Close(Some(1001 | 4003), _) | Got::End),
        "{end:?}"
    );
}

#[tokio::test]
async fn a_blocked_session_is_ended_at_shutdown() {
    let mut c = config();
    c.limits.write_timeout = Duration::from_secs(2);
    let s = TestServer::with(c).await;
    let connections = s.running.connections().clone();
    let mut slow = small_window_terminal(&s, "slow", "sd").await;
    // ~4 MB to a client that does not read: more than the socket buffers hold, less than
    // the outbox's hard limit, and published faster than write_timeout.
    let pad = "x".repeat(32 * 1024);
    let started = Instant::now();
    for i in 0..128 {
        s.publish("sd", "gift", json!({"i": i, "pad": pad})).await;
    }
    assert_eq!(connections.len(), 1, "still connected before the shutdown");
    assert!(started.elapsed() < Duration::from_secs(2));
    let TestServer { running, .. } = s;
    tokio::time::timeout(WAIT, running.shutdown())
        .await
        .expect("shutdown finishes");
    // Not reading: the server must give up on it by itself, at the latest once write_timeout
    // has passed.
    let deadline = started + Duration::from_secs(4);
    while !connections.is_empty() {
        assert!(
            Instant::now() < deadline,
            "a blocked session outlived the shutdown and write_timeout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, end) = drain_slow(&mut slow).await;
    assert!(
        matches!(end, Got::End | Got::Close(Some(1001), _)),
        "{end:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 9. Heartbeat.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn heartbeat_closes_only_silent_peers() {
    let mut c = config();
    c.heartbeat = Duration::from_millis(200);
    c.heartbeat_timeout = Duration::from_millis(200);
    let s = TestServer::with(c).await;

    let mut silent = Raw::connect(&s, "silent", &["h"]).await;
    let watch_for = Duration::from_millis(1500);
    let mut live = Vec::new();
    for i in 0..3 {
        let ws = s.terminal(&format!("live{i}"), &["h"], false).await;
        // Read (and so answer pings) until `watch_for` has passed; count the pings.
        live.push(tokio::spawn(async move {
            let mut ws = ws;
            let mut pings = 0;
            let until = Instant::now() + watch_for;
            loop {
                match tokio::time::timeout_at(until, ws.inner.next()).await {
                    Err(_) => return (ws, pings),
                    Ok(Some(Ok(Message::Ping(p)))) => {
                        assert!(p.is_empty());
                        pings += 1;
                    }
                    Ok(Some(Ok(Message::Close(c)))) => panic!("live peer closed: {c:?}"),
                    Ok(Some(Ok(_))) => {}
                    Ok(other) => panic!("live peer ended: {other:?}"),
                }
            }
        }));
    }
    let mut answering = Vec::new();
    for task in live {
        let (ws, pings) = task.await.expect("live peer task");
        // ~7 pings in 1.5 s; a few are enough to show the heartbeat runs.
        assert!(pings >= 3, "only {pings} pings in {watch_for:?}");
        answering.push(ws);
    }
    // Still served.
    for (i, ws) in answering.iter_mut().enumerate() {
        ws.send(json!({"op":"ping","id":i})).await;
        loop {
            match ws.next().await {
                ServerFrame::Pong { id } => {
                    assert_eq!(id, Some(i as u64));
                    break;
                }
                ServerFrame::Online { .. } => {}
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(s.running.connections().len(), 3);
    assert_eq!(disconnects(&s, "heartbeat_timeout"), 1);
    // The silent peer got pings it never answered, then 4000.
    assert_eq!(
        silent.close().await,
        (Some(4000), "heartbeat_timeout".into())
    );
    silent.ends().await;
}

// ---------------------------------------------------------------------------------------
// 10. After a burst.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_connection_works_after_a_burst() {
    let s = TestServer::start().await;
    let mut t = s.terminal("t", &["b"], false).await;
    t.join("b", None).await;
    let pad = "y".repeat(4096);
    for round in 0..2u64 {
        // 200 messages while the client is not reading: the server's writes block and its
        // batches pile up, then everything goes out once the client reads.
        for i in 1..=200u64 {
            s.publish("b", "gift", json!({"i": i, "pad": pad})).await;
        }
        let first = round * 201 + 1;
        let expected: Vec<u64> = (first..first + 200).collect();
        assert_eq!(t.reliable(200).await, expected);
        // Idle, then more: the buffers given back after the burst are not missed.
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.publish("b", "gift", json!({"after": round})).await;
        assert_eq!(t.reliable(1).await, vec![first + 200]);
        t.send(json!({"op":"ping","id":round})).await;
        assert_eq!(
            t.next_significant().await,
            ServerFrame::Pong { id: Some(round) }
        );
    }
    assert_eq!(s.running.connections().len(), 1);
}

/// A client that trickles its request head is cut off at `header_timeout`; one that sends
/// it whole in time is served.
#[tokio::test]
async fn a_request_head_not_finished_in_time_is_cut_off() {
    let mut config = crate::support::config();
    config.limits.header_timeout = Duration::from_millis(300);
    let s = TestServer::with(config).await;
    let mut slow = TcpStream::connect(s.running.addr()).await.expect("tcp");
    slow.write_all(b"GET /v1/connect HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(WAIT, slow.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "expected the connection closed, got {read:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Within the limit: a normal upgrade still works.
    let mut raw = Raw::open(&s).await;
    raw.write(&text(&connect_op(&s, "t", &["r"]))).await;
    raw.expect_connected("t").await;
}

//! A TCP proxy between an SDK client and the server, to break the path the ways networks and
//! middleboxes do.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP proxy that looks at the first request of each connection, then forwards both ways.
/// Its live connections can be cut (both sockets dropped: no close frame, no HTTP answer) or
/// frozen (sockets kept open, nothing forwarded: a dead path); it can refuse WebSocket
/// upgrades with `400` (a proxy that does not do WebSocket) and answer a request with `502`.
#[derive(Clone)]
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    conns: Mutex<Vec<JoinHandle<()>>>,
    /// Frozen connections (client side, server side), kept open until the test ends.
    frozen: Mutex<Vec<(TcpStream, TcpStream)>>,
    freeze: AtomicBool,
    refuse_ws: AtomicBool,
    /// Upgrades refused so far.
    refused: AtomicUsize,
    fail_next: AtomicBool,
    /// Requests answered with 502 so far.
    failed: AtomicUsize,
}

impl Proxy {
    /// A proxy on 127.0.0.1:0 to `upstream`, forwarding everything until told otherwise.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        Proxy::round_robin(vec![upstream]).await
    }

    /// A load balancer without sticky sessions in front of several nodes: each new connection
    /// goes to the next upstream in turn, skipping one that refuses it (a node that is gone).
    pub async fn round_robin(upstreams: Vec<SocketAddr>) -> Proxy {
        assert!(!upstreams.is_empty());
        let upstreams: Arc<[SocketAddr]> = upstreams.into();
        let turn = Arc::new(AtomicUsize::new(0));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let first = turn.fetch_add(1, Ordering::SeqCst);
                let task = tokio::spawn(serve(s.clone(), down, upstreams.clone(), first));
                let mut conns = s.conns.lock().expect("lock");
                conns.retain(|t| !t.is_finished());
                conns.push(task);
            }
        });
        Proxy { addr, state }
    }

    /// `http://` and the proxy's address: the server an SDK client is given.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every live connection abruptly.
    pub fn cut(&self) {
        for t in self.state.conns.lock().expect("lock").drain(..) {
            t.abort();
        }
    }

    /// While on, each connection stops forwarding within 20 ms and is parked open, unread:
    /// only a client's watchdog can notice.
    pub fn freeze(&self, on: bool) {
        self.state.freeze.store(on, Ordering::SeqCst);
    }

    /// From now on, answers WebSocket upgrades with `400`.
    pub fn refuse_websocket(&self) {
        self.state.refuse_ws.store(true, Ordering::SeqCst);
    }

    /// Answers the next request (of a new connection) with `502`.
    pub fn fail_next_request(&self) {
        self.state.fail_next.store(true, Ordering::SeqCst);
    }

    /// WebSocket upgrades refused so far.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Requests answered with `502` so far.
    pub fn failed(&self) -> usize {
        self.state.failed.load(Ordering::SeqCst)
    }
}

/// One connection: read the request head, answer it here or forward it, then forward both
/// ways until either side closes, the connection is cut, or frozen.
async fn serve(state: Arc<State>, mut down: TcpStream, upstreams: Arc<[SocketAddr]>, first: usize) {
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
    if state.refuse_ws.load(Ordering::SeqCst) && text.contains("upgrade: websocket") {
        state.refused.fetch_add(1, Ordering::SeqCst);
        let body = r#"{"error":"bad_request","message":"no websockets here"}"#;
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = down.write_all(answer.as_bytes()).await;
        return;
    }
    if state.fail_next.swap(false, Ordering::SeqCst) {
        state.failed.fetch_add(1, Ordering::SeqCst);
        let _ = down
            .write_all(
                b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await;
        return;
    }
    let mut up = None;
    for i in 0..upstreams.len() {
        if let Ok(s) = TcpStream::connect(upstreams[(first + i) % upstreams.len()]).await {
            up = Some(s);
            break;
        }
    }
    let Some(mut up) = up else {
        return;
    };
    // Frozen already: the server has the connection but never the request.
    if !state.freeze.load(Ordering::SeqCst) {
        if up.write_all(&head).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => return,
            () = state.frozen() => {}
        }
    }
    state.frozen.lock().expect("lock").push((down, up));
}

impl State {
    /// Resolves once [`Proxy::freeze`] is on, looking every 20 ms.
    async fn frozen(&self) {
        while !self.freeze.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

//! Idle-memory-per-connection benchmark of WebSocket server implementations for livepush.
//!
//! `wslib-bench server MODE PORT` runs one server (single-threaded tokio runtime unless
//! `WS_MT=1`), `wslib-bench client PORT N SERVER_PID IP_BASE` opens N connections and
//! reports the server's memory delta. See README.md.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `--features count`: a counting wrapper over the system allocator: live bytes, live
/// allocations, and live allocations by requested size (16-byte classes below 64 KiB).
#[cfg(feature = "count")]
mod count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
    pub static BYTES: AtomicIsize = AtomicIsize::new(0);
    pub static ALLOCS: AtomicIsize = AtomicIsize::new(0);
    pub static HIST: [AtomicIsize; 4097] = [const { AtomicIsize::new(0) }; 4097];
    fn class(n: usize) -> usize {
        (n.div_ceil(16)).min(4096)
    }
    pub struct Counting;
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            BYTES.fetch_add(l.size() as isize, Relaxed);
            ALLOCS.fetch_add(1, Relaxed);
            HIST[class(l.size())].fetch_add(1, Relaxed);
            unsafe { System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            BYTES.fetch_sub(l.size() as isize, Relaxed);
            ALLOCS.fetch_sub(1, Relaxed);
            HIST[class(l.size())].fetch_sub(1, Relaxed);
            unsafe { System.dealloc(p, l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            BYTES.fetch_add(new as isize - l.size() as isize, Relaxed);
            HIST[class(l.size())].fetch_sub(1, Relaxed);
            HIST[class(new)].fetch_add(1, Relaxed);
            unsafe { System.realloc(p, l, new) }
        }
    }
    #[global_allocator]
    static GLOBAL: Counting = Counting;
    /// One line: live heap, and the size classes holding >= `min` live allocations.
    pub fn report(min: isize) -> String {
        let mut s = format!("live heap {} B in {} allocs;", BYTES.load(Relaxed), ALLOCS.load(Relaxed));
        for (i, h) in HIST.iter().enumerate() {
            let c = h.load(Relaxed);
            if c >= min {
                s += &format!(" [{}..{}B]x{c}", i.saturating_sub(1) * 16 + 1, i * 16);
            }
        }
        s
    }
}

// ---------------------------------------------------------------------------------------
// What every mode shares: a per-connection outbox signal (Arc<Notify>, registered in a global
// list as a push hub would), and a shared ping tick (one global interval, fanned out through a
// watch channel, so a connection holds no timer of its own).
// ---------------------------------------------------------------------------------------

static HUB: Mutex<Vec<Arc<Notify>>> = Mutex::new(Vec::new());
static CONNS: AtomicUsize = AtomicUsize::new(0);
static PRINTED: AtomicBool = AtomicBool::new(false);

const REPLY: &str = r#"{"op":"connected","session":"0123456789abcdef"}"#;

fn register() -> Arc<Notify> {
    let n = Arc::new(Notify::new());
    HUB.lock().unwrap().push(n.clone());
    CONNS.fetch_add(1, Ordering::Relaxed);
    n
}

fn start_ticker() {
    let secs: u64 = std::env::var("PING_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let (tx, _rx) = watch::channel(0u64);
    TICK.set(tx).ok();
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_secs(secs));
        iv.tick().await;
        loop {
            iv.tick().await;
            TICK.get().unwrap().send_modify(|v| *v += 1);
        }
    });
}
static TICK: std::sync::OnceLock<watch::Sender<u64>> = std::sync::OnceLock::new();
fn tick() -> watch::Receiver<u64> {
    TICK.get().unwrap().subscribe()
}

/// Print the size of a connection future (once per process), then run it.
fn sized<F: Future>(what: &str, f: F) -> F {
    if !PRINTED.swap(true, Ordering::Relaxed) {
        eprintln!("[{what}] connection future: {} bytes", std::mem::size_of_val(&f));
    }
    f
}

// ---------------------------------------------------------------------------------------
// Modes 1-3: axum (tokio-tungstenite)
// ---------------------------------------------------------------------------------------
mod axum_mode {
    use super::*;
    use axum::extract::State;
    use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
    use axum::response::Response;
    use axum::routing::get;
    use futures_util::{SinkExt, StreamExt};

    #[derive(Clone, Copy)]
    pub enum Bufs {
        Default,
        Small,
        Tiny,
    }

    async fn handler(State(b): State<(Bufs, bool)>, ws: WebSocketUpgrade) -> Response {
        let (bufs, split) = b;
        let ws = match bufs {
            Bufs::Default => ws,
            Bufs::Small => ws.read_buffer_size(4096).write_buffer_size(0),
            Bufs::Tiny => ws.read_buffer_size(tiny()).write_buffer_size(0),
        };
        ws.on_upgrade(move |s| async move {
            if split {
                sized("axum split", conn_split(s)).await
            } else {
                sized("axum nosplit", conn_nosplit(s)).await
            }
        })
    }

    fn tiny() -> usize {
        std::env::var("TINY").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
    }

    async fn first(socket: &mut WebSocket) -> bool {
        match socket.recv().await {
            Some(Ok(Message::Text(_))) => socket.send(Message::Text(REPLY.into())).await.is_ok(),
            _ => false,
        }
    }

    /// livepush's shape: split into sink + stream, one select! loop.
    async fn conn_split(mut socket: WebSocket) {
        if !first(&mut socket).await {
            return;
        }
        let notify = register();
        let mut tick = tick();
        let (mut tx, mut rx) = socket.split();
        loop {
            tokio::select! {
                m = rx.next() => match m {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
                _ = notify.notified() => {
                    if tx.send(Message::Text("{\"op\":\"push\"}".into())).await.is_err() { break; }
                }
                r = tick.changed() => {
                    if r.is_err() || tx.send(Message::Ping(Default::default())).await.is_err() { break; }
                }
            }
        }
    }

    /// No split: WebSocket::recv is cancel-safe, so select! on it directly.
    async fn conn_nosplit(mut socket: WebSocket) {
        if !first(&mut socket).await {
            return;
        }
        let notify = register();
        let mut tick = tick();
        loop {
            tokio::select! {
                m = socket.recv() => match m {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
                _ = notify.notified() => {
                    if socket.send(Message::Text("{\"op\":\"push\"}".into())).await.is_err() { break; }
                }
                r = tick.changed() => {
                    if r.is_err() || socket.send(Message::Ping(Default::default())).await.is_err() { break; }
                }
            }
        }
    }

    pub async fn serve(l: TcpListener, bufs: Bufs) {
        let split = std::env::var("NOSPLIT").is_err();
        let app = axum::Router::new().route("/ws", get(handler)).with_state((bufs, split));
        axum::serve(l, app).await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Mode 4: tokio-websockets, raw TcpListener + its own handshake
// ---------------------------------------------------------------------------------------
mod tws_mode {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_websockets::{Message, ServerBuilder};

    async fn conn(stream: TcpStream) {
        let Ok((req, mut ws)) = ServerBuilder::new().accept(stream).await else { return };
        drop(req);
        match ws.next().await {
            Some(Ok(m)) if m.is_text() => {}
            _ => return,
        }
        if ws.send(Message::text(REPLY)).await.is_err() {
            return;
        }
        let notify = register();
        let mut tick = tick();
        loop {
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(m)) if m.is_close() => break,
                    None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
                _ = notify.notified() => {
                    if ws.send(Message::text("{\"op\":\"push\"}")).await.is_err() { break; }
                }
                r = tick.changed() => {
                    if r.is_err() || ws.send(Message::ping(bytes::Bytes::new())).await.is_err() { break; }
                }
            }
        }
    }

    pub async fn serve(l: TcpListener) {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(sized("tokio-websockets", conn(s)));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Mode 5: fastwebsockets; raw handshake (shared with mode 6) or its hyper upgrade helper
// ---------------------------------------------------------------------------------------
mod fws_mode {
    use super::*;
    use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};

    async fn idle<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut ws: WebSocket<S>) {
        ws.set_auto_pong(true);
        ws.set_auto_close(true);
        match ws.read_frame().await {
            Ok(f) if f.opcode == OpCode::Text => {}
            _ => return,
        }
        if ws.write_frame(Frame::text(Payload::Borrowed(REPLY.as_bytes()))).await.is_err() {
            return;
        }
        let notify = register();
        let mut tick = tick();
        loop {
            // read_frame keeps partial input in its own buffer, so dropping it between
            // frame headers loses nothing; an auto-pong in flight could be lost (bench only).
            tokio::select! {
                f = ws.read_frame() => match f {
                    Ok(f) if f.opcode == OpCode::Close => break,
                    Err(_) => break,
                    Ok(_) => {}
                },
                _ = notify.notified() => {
                    if ws.write_frame(Frame::text(Payload::Borrowed(b"{\"op\":\"push\"}"))).await.is_err() { break; }
                }
                r = tick.changed() => {
                    if r.is_err() || ws.write_frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b""))).await.is_err() { break; }
                }
            }
        }
    }

    async fn conn_raw(mut s: TcpStream) {
        if !super::raw_mode::handshake(&mut s).await {
            return;
        }
        idle(WebSocket::after_handshake(s, Role::Server)).await
    }

    pub async fn serve_raw(l: TcpListener) {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(sized("fastwebsockets raw", conn_raw(s)));
        }
    }

    pub async fn serve_hyper(l: TcpListener) {
        use http_body_util::Empty;
        use hyper::body::{Bytes, Incoming};
        use hyper::{Request, Response};
        async fn h(mut req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, fastwebsockets::WebSocketError> {
            let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req)?;
            tokio::spawn(sized("fastwebsockets hyper", async move {
                if let Ok(ws) = fut.await {
                    idle(ws).await
                }
            }));
            Ok(resp)
        }
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(s);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, hyper::service::service_fn(h))
                    .with_upgrades()
                    .await;
            });
        }
    }
}

// ---------------------------------------------------------------------------------------
// Mode 6: the floor. Raw TcpStream, handshake by hand, no per-connection buffer while idle:
// wait for readiness, then read into a stack buffer in a *synchronous* function (so the
// buffer is not part of the future's state).
// ---------------------------------------------------------------------------------------
mod raw_mode {
    use super::*;
    use base64::Engine;

    /// Read the HTTP upgrade request (heap buffer, freed afterwards), answer 101.
    pub async fn handshake(s: &mut TcpStream) -> bool {
        let mut buf = Vec::with_capacity(1024);
        loop {
            if buf.len() >= 8192 {
                return false;
            }
            match s.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
            buf.reserve(1024);
        }
        let text = String::from_utf8_lossy(&buf);
        let Some(key) = text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case("sec-websocket-key").then(|| v.trim().to_owned())
        }) else {
            return false;
        };
        let mut sha = sha1_smol::Sha1::new();
        sha.update(key.as_bytes());
        sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        let accept = base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes());
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        drop(text);
        drop(buf);
        s.write_all(resp.as_bytes()).await.is_ok()
    }

    pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(payload.len() + 4);
        v.push(0x80 | opcode);
        if payload.len() < 126 {
            v.push(payload.len() as u8);
        } else {
            v.push(126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    pub enum Got {
        Nothing,
        Text,
        Close,
    }

    /// Drain what is readable into a stack buffer; parse whole frames (a frame split across
    /// reads would need a small per-connection partial buffer, allocated only then; omitted).
    pub fn drain(s: &TcpStream) -> Got {
        let mut buf = [0u8; 4096];
        let mut got = Got::Nothing;
        loop {
            match s.try_read(&mut buf) {
                Ok(0) => return Got::Close,
                Ok(n) => {
                    let mut p = &buf[..n];
                    while p.len() >= 2 {
                        let op = p[0] & 0x0f;
                        let mut len = (p[1] & 0x7f) as usize;
                        let mut h = 2;
                        if len == 126 && p.len() >= 4 {
                            len = u16::from_be_bytes([p[2], p[3]]) as usize;
                            h = 4;
                        }
                        if p[1] & 0x80 != 0 {
                            h += 4;
                        }
                        match op {
                            0x8 => return Got::Close,
                            0x1 => got = Got::Text,
                            _ => {}
                        }
                        p = &p[(h + len).min(p.len())..];
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return got,
                Err(_) => return Got::Close,
            }
        }
    }

    async fn conn(mut s: TcpStream) {
        if !handshake(&mut s).await {
            return;
        }
        // first frame
        loop {
            if s.readable().await.is_err() {
                return;
            }
            match drain(&s) {
                Got::Nothing => continue,
                Got::Close => return,
                Got::Text => break,
            }
        }
        if s.write_all(&frame(0x1, REPLY.as_bytes())).await.is_err() {
            return;
        }
        let notify = register();
        let mut tick = tick();
        loop {
            tokio::select! {
                r = s.readable() => {
                    if r.is_err() { break; }
                    if let Got::Close = drain(&s) { break; }
                }
                _ = notify.notified() => {
                    if s.write_all(&frame(0x1, b"{\"op\":\"push\"}")).await.is_err() { break; }
                }
                r = tick.changed() => {
                    if r.is_err() || s.write_all(&frame(0x9, b"")).await.is_err() { break; }
                }
            }
        }
    }

    pub async fn serve(l: TcpListener) {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(sized("raw", conn(s)));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Mode 7: raw-lean. As raw, but the idle state holds no futures at all: one shared
// per-connection struct (flags + AtomicWaker) that the hub and the ping ticker poke, and a
// poll_fn over TcpStream::poll_read_ready (whose waker lives in tokio's ScheduledIo). The
// handshake runs in a boxed (temporary) future so it does not size the task.
// ---------------------------------------------------------------------------------------
mod lean_mode {
    use super::*;
    use futures_util::task::AtomicWaker;
    use std::sync::atomic::AtomicU8;
    use std::task::Poll;

    pub const PUSH: u8 = 1;
    pub const PING: u8 = 2;

    pub struct Conn {
        pub flags: AtomicU8,
        pub waker: AtomicWaker,
    }
    impl Conn {
        pub fn poke(&self, f: u8) {
            self.flags.fetch_or(f, Ordering::Release);
            self.waker.wake();
        }
    }

    pub static LEAN_HUB: Mutex<Vec<Arc<Conn>>> = Mutex::new(Vec::new());

    fn frame_into(buf: &mut [u8; 64], opcode: u8, payload: &[u8]) -> usize {
        buf[0] = 0x80 | opcode;
        buf[1] = payload.len() as u8;
        buf[2..2 + payload.len()].copy_from_slice(payload);
        2 + payload.len()
    }

    /// Send a small frame: try_write from the stack; only a partial write (full socket
    /// buffer) allocates, for the remainder.
    async fn send(s: &mut TcpStream, opcode: u8, payload: &[u8]) -> bool {
        let mut b = [0u8; 64];
        let n = frame_into(&mut b, opcode, payload);
        match s.try_write(&b[..n]) {
            Ok(w) if w == n => true,
            Ok(w) => {
                let rest = b[w..n].to_vec();
                Box::pin(s.write_all(&rest)).await.is_ok()
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let rest = b[..n].to_vec();
                Box::pin(s.write_all(&rest)).await.is_ok()
            }
            Err(_) => false,
        }
    }

    async fn setup(mut s: TcpStream) -> Option<TcpStream> {
        if !super::raw_mode::handshake(&mut s).await {
            return None;
        }
        loop {
            s.readable().await.ok()?;
            match super::raw_mode::drain(&s) {
                super::raw_mode::Got::Nothing => continue,
                super::raw_mode::Got::Close => return None,
                super::raw_mode::Got::Text => break,
            }
        }
        s.write_all(&super::raw_mode::frame(0x1, REPLY.as_bytes())).await.ok()?;
        Some(s)
    }

    enum Ev {
        Readable,
        Flags(u8),
    }

    async fn conn(s: TcpStream) {
        let Some(mut s) = Box::pin(setup(s)).await else { return };
        let c = Arc::new(Conn { flags: AtomicU8::new(0), waker: AtomicWaker::new() });
        LEAN_HUB.lock().unwrap().push(c.clone());
        CONNS.fetch_add(1, Ordering::Relaxed);
        loop {
            let ev = std::future::poll_fn(|cx| {
                c.waker.register(cx.waker());
                let f = c.flags.swap(0, Ordering::Acquire);
                if f != 0 {
                    return Poll::Ready(Ev::Flags(f));
                }
                match s.poll_read_ready(cx) {
                    Poll::Ready(_) => Poll::Ready(Ev::Readable),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            match ev {
                Ev::Readable => {
                    if let super::raw_mode::Got::Close = super::raw_mode::drain(&s) {
                        break;
                    }
                }
                Ev::Flags(f) => {
                    if f & PUSH != 0 && !send(&mut s, 0x1, b"{\"op\":\"push\"}").await {
                        break;
                    }
                    if f & PING != 0 && !send(&mut s, 0x9, b"").await {
                        break;
                    }
                }
            }
        }
    }

    pub async fn serve(l: TcpListener) {
        // the shared ping timer pokes every connection
        let secs: u64 = std::env::var("PING_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_secs(secs));
            iv.tick().await;
            loop {
                iv.tick().await;
                for c in LEAN_HUB.lock().unwrap().iter() {
                    c.poke(PING);
                }
            }
        });
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(sized("raw-lean", conn(s)));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Memory readings of a process
// ---------------------------------------------------------------------------------------
#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    rss: i64,
    rss_anon: i64,
    private_dirty: i64,
    anonymous: i64,
}

fn field(text: &str, name: &str) -> i64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1)
}

fn mem(pid: u32) -> Mem {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let sm = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Mem {
        rss: field(&st, "VmRSS:"),
        rss_anon: field(&st, "RssAnon:"),
        private_dirty: field(&sm, "Private_Dirty:"),
        anonymous: field(&sm, "Anonymous:"),
    }
}

// ---------------------------------------------------------------------------------------
// Client: raw WebSocket client (the client's own memory does not matter)
// ---------------------------------------------------------------------------------------
async fn client_conn(port: u16, src: Ipv4Addr) -> std::io::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))?;
    let mut s = sock.connect(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))).await?;
    s.set_nodelay(true)?;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await?;
    let mut buf = Vec::with_capacity(512);
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if s.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    if !buf.starts_with(b"HTTP/1.1 101") {
        return Err(std::io::Error::other("not 101"));
    }
    // masked text frame: {"op":"connect","token":"dev"}
    let payload = br#"{"op":"connect","token":"dev","id":1}"#;
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![0x81, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&f).await?;
    // reply: unmasked text frame, short
    let mut hdr = [0u8; 2];
    s.read_exact(&mut hdr).await?;
    let len = (hdr[1] & 0x7f) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    if hdr[0] & 0x0f != 1 {
        return Err(std::io::Error::other("not text"));
    }
    Ok(s)
}

async fn client(port: u16, n: usize, pid: u32, ip_base: u8, settle: u64, hold: u64) {
    let before = mem(pid);
    let sem = Arc::new(tokio::sync::Semaphore::new(200));
    let t0 = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        // 5000 connections per source IP: 127.IP_BASE.x.y
        let k = (i / 5000) as u16 + 2;
        let src = Ipv4Addr::new(127, ip_base, (k >> 8) as u8, k as u8);
        let permit = sem.clone().acquire_owned().await.unwrap();
        handles.push(tokio::spawn(async move {
            let r = client_conn(port, src).await;
            drop(permit);
            r
        }));
    }
    let mut held = Vec::with_capacity(n);
    let mut errs = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(s) => held.push(s),
            Err(e) => {
                if errs < 3 {
                    eprintln!("connect error: {e}");
                }
                errs += 1;
            }
        }
    }
    let dt = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let after = mem(pid);
    let ok = held.len() as f64;
    let per = |a: i64, b: i64| (a - b) as f64 / ok;
    println!(
        "n={n} ok={} errs={errs} connect_secs={:.2} rate={:.0}/s | before KiB rss={} anon={} pd={} | after rss={} anon={} pd={} | per-conn KiB: rss={:.3} rss_anon={:.3} private_dirty={:.3} anonymous={:.3}",
        held.len(),
        dt.as_secs_f64(),
        ok / dt.as_secs_f64(),
        before.rss,
        before.rss_anon,
        before.private_dirty,
        after.rss,
        after.rss_anon,
        after.private_dirty,
        per(after.rss, before.rss),
        per(after.rss_anon, before.rss_anon),
        per(after.private_dirty, before.private_dirty),
        per(after.anonymous, before.anonymous),
    );
    tokio::time::sleep(Duration::from_secs(hold)).await;
    drop(held);
}

fn raise_nofile() {
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
}

fn main() {
    raise_nofile();
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: wslib-bench server MODE PORT | client PORT N SERVER_PID IP_BASE [SETTLE_SECS] [HOLD_SECS]\n modes: axum-default axum-small axum-tiny tokio-websockets fastwebsockets fastwebsockets-hyper raw raw-lean";
    match args.get(1).map(String::as_str) {
        Some("server") => {
            let mode = args.get(2).expect(usage).clone();
            let port: u16 = args.get(3).expect(usage).parse().unwrap();
            let rt = if std::env::var("WS_MT").is_ok() {
                tokio::runtime::Builder::new_multi_thread().enable_all().build()
            } else {
                tokio::runtime::Builder::new_current_thread().enable_all().build()
            }
            .unwrap();
            rt.block_on(async move {
                start_ticker();
                let l = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
                eprintln!("server {mode} pid={} listening on {port}", std::process::id());
                tokio::spawn(async {
                    let mut last = 0;
                    loop {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        let c = CONNS.load(Ordering::Relaxed);
                        if c != last {
                            eprintln!("registered connections: {c}");
                            #[cfg(feature = "count")]
                            eprintln!("{}", count::report((c as isize / 2).max(500)));
                            last = c;
                        }
                    }
                });
                match mode.as_str() {
                    "axum-default" => axum_mode::serve(l, axum_mode::Bufs::Default).await,
                    "axum-small" => axum_mode::serve(l, axum_mode::Bufs::Small).await,
                    "axum-tiny" => axum_mode::serve(l, axum_mode::Bufs::Tiny).await,
                    "tokio-websockets" => tws_mode::serve(l).await,
                    "fastwebsockets" => fws_mode::serve_raw(l).await,
                    "fastwebsockets-hyper" => fws_mode::serve_hyper(l).await,
                    "raw" => raw_mode::serve(l).await,
                    "raw-lean" => lean_mode::serve(l).await,
                    _ => panic!("{usage}"),
                }
            });
        }
        Some("client") => {
            let port: u16 = args[2].parse().unwrap();
            let n: usize = args[3].parse().unwrap();
            let pid: u32 = args[4].parse().unwrap();
            let ip_base: u8 = args[5].parse().unwrap();
            let settle: u64 = args.get(6).map(|s| s.parse().unwrap()).unwrap_or(3);
            let hold: u64 = args.get(7).map(|s| s.parse().unwrap()).unwrap_or(0);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(client(port, n, pid, ip_base, settle, hold));
        }
        _ => eprintln!("{usage}"),
    }
}

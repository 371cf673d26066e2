//! A TCP proxy between clients and the server that breaks the path the ways networks and
//! middleboxes do: `livepush bench chaos` cuts its connections at random, and the
//! integration tests (which include this file as `support::proxy`) cut, freeze and refuse
//! them on cue.
//!
//! Invariant: what the proxy forwards, it forwards unchanged and in order. A connection
//! ends in one of a few visible ways only: it is cut (both sockets closed at once, mid-way
//! through whatever was in flight), frozen (kept open, nothing forwarded), or answered by the
//! proxy itself (`400`, `502`) before anything reached the server. The one exception is
//! [`Proxy::discard_to_client`], a fault that exists to show that a check can fail.

// The tests use some of these, the bench others.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::seq::IteratorRandom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::WriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Which way bytes flow through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the server (requests, client frames).
    ToServer,
    /// From the server to the client (answers, pushed frames).
    ToClient,
}

/// When an armed connection is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Once this many more bytes went this way: the cut may fall in the middle of a frame,
    /// an HTTP answer or a request. If they do not come within [`BYTES_WAIT`], it is cut
    /// then (and counted as timed), so that no armed connection waits forever.
    AfterBytes(Direction, u64),
    /// After this long, whatever is in flight.
    After(Duration),
    /// The path goes dead at once, as a network that vanished: nothing is read from either
    /// side any more (their writes pile up, then block), the sockets stay open; cut after
    /// this long. Only a client's watchdog can notice before.
    Stall(Duration),
}

/// How long a [`Cut::AfterBytes`] waits for its bytes.
pub const BYTES_WAIT: Duration = Duration::from_secs(2);

/// Cuts done so far, by what triggered them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Cuts {
    pub after_bytes_to_server: u64,
    pub after_bytes_to_client: u64,
    pub after_time: u64,
    /// Connections stalled ([`Cut::Stall`]), however they ended.
    pub stalled: u64,
    /// Connections dropped by [`Proxy::cut`] (all at once).
    pub all_at_once: u64,
}

impl Cuts {
    pub fn total(&self) -> u64 {
        self.after_bytes_to_server
            + self.after_bytes_to_client
            + self.after_time
            + self.stalled
            + self.all_at_once
    }
}

/// A TCP proxy that reads the request head of each connection, then forwards both ways.
#[derive(Clone)]
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    /// Live connections by id.
    conns: Mutex<HashMap<u64, Live>>,
    next_id: AtomicU64,
    /// Frozen connections (client side, server side), kept open until the proxy is dropped.
    frozen: Mutex<Vec<(TcpStream, TcpStream)>>,
    freeze: watch::Sender<bool>,
    refuse_ws: AtomicBool,
    /// Upgrades refused so far.
    refused: AtomicUsize,
    fail_next: AtomicBool,
    /// Requests answered with 502 so far.
    failed: AtomicUsize,
    discard: AtomicBool,
    /// Bytes from the server thrown away by [`Proxy::discard_to_client`].
    discarded: AtomicU64,
    cut_to_server: AtomicU64,
    cut_to_client: AtomicU64,
    cut_time: AtomicU64,
    stalled: AtomicU64,
    cut_all: AtomicU64,
    accepted: AtomicU64,
}

/// A live connection: how to drop it, and how to tell it when to cut itself.
struct Live {
    abort: AbortHandle,
    ctl: Arc<Ctl>,
}

#[derive(Default)]
struct Ctl {
    cut: Mutex<Option<Cut>>,
    armed: AtomicBool,
    /// A stall began (counted already, the connection lives on).
    stalled: AtomicBool,
    notify: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Proxy {
    /// A proxy on 127.0.0.1:0 to `upstream`, forwarding everything until told otherwise.
    pub async fn start(upstream: SocketAddr) -> io::Result<Proxy> {
        Proxy::round_robin(vec![upstream]).await
    }

    /// A load balancer without sticky sessions in front of several nodes: each new connection
    /// goes to the next upstream in turn, skipping one that refuses it (a node that is gone).
    pub async fn round_robin(upstreams: Vec<SocketAddr>) -> io::Result<Proxy> {
        if upstreams.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no upstream"));
        }
        let upstreams: Arc<[SocketAddr]> = upstreams.into();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let weak = Arc::downgrade(&state);
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                // The proxy was dropped: stop accepting.
                let Some(s) = weak.upgrade() else { break };
                let id = s.next_id.fetch_add(1, Ordering::Relaxed);
                let first = s.accepted.fetch_add(1, Ordering::Relaxed) as usize;
                let ctl = Arc::new(Ctl::default());
                // Registered before the task runs, so that its removal comes after.
                let mut conns = lock(&s.conns);
                let task = tokio::spawn(serve(
                    s.clone(),
                    id,
                    ctl.clone(),
                    down,
                    upstreams.clone(),
                    first,
                ));
                conns.insert(
                    id,
                    Live {
                        abort: task.abort_handle(),
                        ctl,
                    },
                );
            }
        });
        Ok(Proxy { addr, state })
    }

    /// `http://` and the proxy's address: the server a client is given.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every live connection abruptly (no close frame, no HTTP answer).
    pub fn cut(&self) {
        let mut conns = lock(&self.state.conns);
        for (_, live) in conns.drain() {
            live.abort.abort();
            self.state.cut_all.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Arms one live connection, chosen at random among those not armed yet, to cut itself
    /// as `how` says. False when there is none.
    pub fn cut_one(&self, how: Cut) -> bool {
        let conns = lock(&self.state.conns);
        let Some(live) = conns
            .values()
            .filter(|l| !l.ctl.armed.load(Ordering::Relaxed))
            .choose(&mut rand::rng())
        else {
            return false;
        };
        live.ctl.armed.store(true, Ordering::Relaxed);
        *lock(&live.ctl.cut) = Some(how);
        live.ctl.notify.notify_one();
        true
    }

    /// Live connections armed to cut themselves that have not yet (nor begun a stall).
    pub fn armed(&self) -> u64 {
        let conns = lock(&self.state.conns);
        conns
            .values()
            .filter(|l| {
                l.ctl.armed.load(Ordering::Relaxed) && !l.ctl.stalled.load(Ordering::Relaxed)
            })
            .count() as u64
    }

    /// Cuts done so far.
    pub fn cuts(&self) -> Cuts {
        let s = &self.state;
        Cuts {
            after_bytes_to_server: s.cut_to_server.load(Ordering::Relaxed),
            after_bytes_to_client: s.cut_to_client.load(Ordering::Relaxed),
            after_time: s.cut_time.load(Ordering::Relaxed),
            stalled: s.stalled.load(Ordering::Relaxed),
            all_at_once: s.cut_all.load(Ordering::Relaxed),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// While on, each connection stops forwarding at once and is parked open, unread:
    /// only a client's watchdog can notice.
    pub fn freeze(&self, on: bool) {
        self.state.freeze.send_replace(on);
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

    /// While on, what the server sends is silently thrown away (connections stay open, the
    /// clients' bytes still go through): a fault no client can repair, for checking that a
    /// check notices.
    pub fn discard_to_client(&self, on: bool) {
        self.state.discard.store(on, Ordering::SeqCst);
    }

    /// Bytes thrown away by [`Proxy::discard_to_client`].
    pub fn discarded(&self) -> u64 {
        self.state.discarded.load(Ordering::Relaxed)
    }
}

/// How forwarding ended.
enum Ended {
    /// One side closed or failed.
    Closed,
    /// An armed cut fired.
    Cut,
    Frozen,
}

/// One connection: read the request head, answer it here or forward it, then forward both
/// ways until either side closes, the connection is cut, or frozen.
async fn serve(
    state: Arc<State>,
    id: u64,
    ctl: Arc<Ctl>,
    mut down: TcpStream,
    upstreams: Arc<[SocketAddr]>,
    first: usize,
) {
    struct Unregister<'a>(&'a State, u64);
    impl Drop for Unregister<'_> {
        fn drop(&mut self) {
            lock(&self.0.conns).remove(&self.1);
        }
    }
    let _unregister = Unregister(&state, id);
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
    if !*state.freeze.borrow() {
        if up.write_all(&head).await.is_err() {
            return;
        }
        match forward(&state, &ctl, &mut down, &mut up).await {
            Ended::Closed => return,
            Ended::Cut => {
                // Half the cuts are resets, half orderly ends: both happen out there.
                if rand::random::<bool>() {
                    let _ = down.set_zero_linger();
                    let _ = up.set_zero_linger();
                }
                return;
            }
            Ended::Frozen => {}
        }
    }
    lock(&state.frozen).push((down, up));
}

/// Forward both ways until a side closes, an armed cut fires, or the proxy freezes.
async fn forward(state: &State, ctl: &Ctl, down: &mut TcpStream, up: &mut TcpStream) -> Ended {
    let (mut down_r, mut down_w) = down.split();
    let (mut up_r, mut up_w) = up.split();
    let mut to_server = vec![0u8; 16 * 1024];
    let mut to_client = vec![0u8; 16 * 1024];
    // Bytes left before the cut, per direction, once armed that way.
    let mut budget_to_server: Option<u64> = None;
    let mut budget_to_client: Option<u64> = None;
    let mut deadline: Option<Instant> = None;
    let mut stalled = false;
    loop {
        tokio::select! {
            r = down_r.read(&mut to_server), if !stalled => {
                let n = match r { Ok(0) | Err(_) => return Ended::Closed, Ok(n) => n };
                let cuts = &state.cut_to_server;
                if let Some(end) = pass(&to_server[..n], &mut up_w, &mut budget_to_server, cuts).await {
                    return end;
                }
            }
            r = up_r.read(&mut to_client), if !stalled => {
                let n = match r { Ok(0) | Err(_) => return Ended::Closed, Ok(n) => n };
                if state.discard.load(Ordering::Relaxed) {
                    state.discarded.fetch_add(n as u64, Ordering::Relaxed);
                    continue;
                }
                let cuts = &state.cut_to_client;
                if let Some(end) = pass(&to_client[..n], &mut down_w, &mut budget_to_client, cuts).await {
                    return end;
                }
            }
            () = ctl.notify.notified() => match lock(&ctl.cut).take() {
                Some(Cut::AfterBytes(direction, n)) => {
                    match direction {
                        Direction::ToServer => budget_to_server = Some(n),
                        Direction::ToClient => budget_to_client = Some(n),
                    }
                    deadline = Some(Instant::now() + BYTES_WAIT);
                }
                Some(Cut::After(d)) => deadline = Some(Instant::now() + d),
                Some(Cut::Stall(d)) => {
                    state.stalled.fetch_add(1, Ordering::Relaxed);
                    ctl.stalled.store(true, Ordering::Relaxed);
                    stalled = true;
                    deadline = Some(Instant::now() + d);
                }
                None => {}
            },
            () = sleep_until(deadline), if deadline.is_some() => {
                if !stalled {
                    state.cut_time.fetch_add(1, Ordering::Relaxed);
                }
                return Ended::Cut;
            }
            () = state.frozen() => return Ended::Frozen,
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d).await;
    }
}

/// Write `bytes` on, or only as many as `budget` still allows. `None` to go on; else how
/// forwarding ends: a failed write, or the budget ran out (counted in `cuts`).
async fn pass(
    bytes: &[u8],
    to: &mut WriteHalf<'_>,
    budget: &mut Option<u64>,
    cuts: &AtomicU64,
) -> Option<Ended> {
    let allowed = match *budget {
        Some(left) if (bytes.len() as u64) > left => left as usize,
        _ => bytes.len(),
    };
    if to.write_all(&bytes[..allowed]).await.is_err() {
        return Some(Ended::Closed);
    }
    if allowed < bytes.len() {
        cuts.fetch_add(1, Ordering::Relaxed);
        return Some(Ended::Cut);
    }
    if let Some(left) = budget {
        *left -= allowed as u64;
    }
    None
}

impl State {
    /// Resolves once [`Proxy::freeze`] is on.
    async fn frozen(&self) {
        let _ = self.freeze.subscribe().wait_for(|on| *on).await;
    }
}

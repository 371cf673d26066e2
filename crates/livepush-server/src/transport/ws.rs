//! The WebSocket transport: framing only. Everything a frame means lives in the session.
//!
//! livepush does its own RFC 6455 framing ([`livepush_wsframe`]) instead of using a WebSocket
//! library, because every library measured keeps a read buffer and a large task per
//! connection (bench/wslib/README.md: 3.3–6 KiB per idle connection against ~1 KiB without).
//! An idle connection here is: the socket, a small boxed [`Driver`] in a slot of the
//! server's [`Reactor`] (no tokio task or tokio socket registration of its own), the session
//! and its [`Outbox`](crate::outbox::Outbox). There is no read buffer (reads go to a stack
//! buffer, and the decoder holds bytes only while a frame is split across reads), no write
//! buffer (a batch is built when there is something to write, and kept only while the
//! socket cannot take it), and no timer (the reactor's shard ticks its connections:
//! heartbeat, dead peer, stalled write).
//!
//! Whatever the outbox holds when the driver runs goes out as one WebSocket text frame
//! (frames joined by `\n`) and one write, so a burst costs one write per connection.
//!
//! Over TLS (`wss://`) the same driver reads and writes through a [`crate::tls::Stream`]
//! (rustls driven on the raw socket) instead of the bare [`Socket`], and the reactor keeps it
//! boxed ([`Connection::Tls`]), so a plain connection's state is the same size as without
//! TLS.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use livepush_proto::{ClientEnvelope, ClientFrame, ErrorCode, ServerFrame, Transport};
use livepush_wsframe::{self as wsframe, DecodeError, Decoder, Event, OpCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::Instrument;

use crate::app::App;
use crate::clock::clock_ms;
use crate::error::ApiError;
use crate::frame::{self, Frame};
use crate::hooks::connect::Caller;
use crate::logctx::conn_span;
use crate::outbox::{
    CloseReason, ConnId, SIGNAL_DEAD, SIGNAL_EXPIRED, SIGNAL_PING, SIGNAL_SHUTDOWN, SIGNAL_STALLED,
};
use crate::ratelimit::Admission;
use crate::reactor::{Conn, Reactor, Socket, Tick, Wire};
use crate::session::{self, Ending, Session};
use crate::transport::authenticate;

/// WebSocket close codes livepush uses (4000-4999 is the application range).
pub mod close_code {
    /// The peer stopped answering pings.
    pub const HEARTBEAT_TIMEOUT: u16 = 4000;
    /// The outgoing queue passed its hard limit or a write stalled.
    pub const SLOW_CONSUMER: u16 = 4001;
    /// No valid `connect` frame (missing, late, or a bad token).
    pub const UNAUTHORIZED: u16 = 4003;
    /// The terminal already holds `max_sessions_per_terminal` sessions.
    pub const TOO_MANY_SESSIONS: u16 = 4029;
    /// A normal close (the terminal was told to use another transport).
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The server could not serve the connection (it could not watch its socket).
    pub const INTERNAL_ERROR: u16 = 1011;
    /// Something the server depends on is unavailable (the connect hook); retry later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Bytes read from the socket per read call, into a buffer on the stack.
const READ_CHUNK: usize = 4096;

/// Rounds of read/write work a driver does before it yields to other tasks.
const ROUNDS_PER_POLL: u32 = 64;

/// The connection during the handshake: taken back from hyper after the upgrade (see
/// `server::serve`), still tokio's: the `TcpStream`, or the `TlsStream` over it. The open
/// connection moves it into the [`Reactor`] as a [`Wire`].
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Wire: Wire + std::fmt::Debug;
    /// Take the socket (and TLS state) from tokio.
    fn into_wire(self) -> std::io::Result<Self::Wire>;
    /// The open connection, as the reactor keeps it.
    fn connection(driver: Driver<Self::Wire>) -> Connection;
}

impl Io for TcpStream {
    type Wire = Socket;

    fn into_wire(self) -> std::io::Result<Socket> {
        Socket::from_tokio(self)
    }

    fn connection(driver: Driver) -> Connection {
        Connection::Plain(driver)
    }
}

impl Io for TlsStream<TcpStream> {
    type Wire = crate::tls::Stream;

    fn into_wire(self) -> std::io::Result<crate::tls::Stream> {
        let (tcp, conn) = self.into_inner();
        Ok(crate::tls::Stream::new(Socket::from_tokio(tcp)?, conn))
    }

    fn connection(driver: Driver<crate::tls::Stream>) -> Connection {
        Connection::Tls(Box::new(driver))
    }
}

/// An open WebSocket connection in the reactor. A plain one is its [`Driver`] in place; a
/// TLS one (rustls's state is tens of KiB anyway) sits behind a box, so that it costs a
/// plain connection nothing: the enum is no larger than a plain `Driver` (a size test says
/// so).
// Deliberately unboxed: the plain variant is the common case, and boxing it would add an
// allocation and a pointer to every plain connection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Connection {
    Plain(Driver),
    Tls(Box<Driver<crate::tls::Stream>>),
}

impl Conn for Connection {
    fn socket(&mut self) -> &mut Socket {
        match self {
            Connection::Plain(d) => d.socket(),
            Connection::Tls(d) => d.socket(),
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Connection::Plain(d) => d.poll(cx),
            Connection::Tls(d) => d.poll(cx),
        }
    }

    fn tick(&mut self, tick: &Tick) -> bool {
        match self {
            Connection::Plain(d) => d.tick(tick),
            Connection::Tls(d) => d.tick(tick),
        }
    }

    fn abandon(&mut self, stopping: bool) {
        match self {
            Connection::Plain(d) => d.abandon(stopping),
            Connection::Tls(d) => d.abandon(stopping),
        }
    }

    fn id(&self) -> Option<u64> {
        match self {
            Connection::Plain(d) => Some(d.session.conn()),
            Connection::Tls(d) => Some(d.session.conn()),
        }
    }
}

/// The server's WebSocket connections, driven by one task per core.
pub type Connections = Reactor<Connection>;

/// Answer a WebSocket upgrade request (RFC 6455 §4.2) and run the connection once hyper
/// hands over the socket.
pub fn upgrade(app: Arc<App>, connections: Arc<Connections>, mut req: Request) -> Response {
    let key = match check_upgrade(req.method(), req.headers()) {
        Ok(key) => key,
        Err(e) => {
            let version_refused = e.status == StatusCode::UPGRADE_REQUIRED;
            let mut res = e.into_response();
            if version_refused {
                res.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            return res;
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    // The source address stays counted until the handshake is over.
    let admission = req.extensions().get::<Admission>().cloned();
    // What the connect hook is told if `connect` comes without a token: the upgrade request
    // is all there is to go by.
    let caller = app.connect_hook.as_ref().map(|_| {
        Caller::of(
            Transport::Ws,
            super::remote(req.extensions()),
            req.headers(),
        )
    });
    drop(req);
    let arrival = Arrival {
        conn: app.hub.next_conn_id(),
        caller,
    };
    // The handshake runs in the connection's span (inside the request's); the open
    // connection logs its ids as fields (see `crate::logctx`).
    let span = conn_span(arrival.conn, Transport::Ws);
    let task = async move {
        let _admission = admission;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade failed");
                return;
            }
        };
        let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let io = parts.io.into_inner();
                return start(app, &connections, io, parts.read_buf, arrival).await;
            }
            Err(upgraded) => upgraded,
        };
        match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
            Ok(parts) => {
                let io = parts.io.into_inner();
                start(app, &connections, io, parts.read_buf, arrival).await;
            }
            Err(_) => tracing::error!("websocket upgrade of a connection that is not TCP"),
        }
    };
    tokio::spawn(task.instrument(span));
    let mut res = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = res.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&tungstenite::handshake::derive_accept_key(&key)) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    res
}

/// What the upgrade request leaves to the handshake.
struct Arrival {
    /// The connection's id (its session's, once it opens).
    conn: ConnId,
    /// What the connect hook is told, when there is one.
    caller: Option<Caller>,
}

/// Check the handshake headers; the `Sec-WebSocket-Key` on success, a clear error otherwise.
fn check_upgrade(method: &axum::http::Method, h: &HeaderMap) -> Result<Vec<u8>, ApiError> {
    let has_token = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if method != axum::http::Method::GET {
        return Err(ApiError::bad_request("a WebSocket upgrade must be a GET"));
    }
    if !has_token(header::CONNECTION, "upgrade") {
        return Err(ApiError::bad_request(
            "a WebSocket upgrade needs `Connection: upgrade`",
        ));
    }
    if h.get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            ErrorCode::BadRequest,
            "only WebSocket version 13 is supported (`Sec-WebSocket-Version: 13`)",
        ));
    }
    // The key is 16 random bytes in base64 (RFC 6455 §4.1).
    let decodes_to_16 = |k: &HeaderValue| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(k.as_bytes())
            .is_ok_and(|b| b.len() == 16)
    };
    match h.get(header::SEC_WEBSOCKET_KEY) {
        Some(k) if decodes_to_16(k) => Ok(k.as_bytes().to_vec()),
        _ => Err(ApiError::bad_request(
            "a WebSocket upgrade needs a `Sec-WebSocket-Key` (16 bytes in base64)",
        )),
    }
}

/// Run the handshake in this (upgrade) task, then hand the connection's [`Driver`] to the
/// server's [`Reactor`].
///
/// The handshake's state (read buffer, timeout, the frames that came with `connect`) lives
/// in this task and is freed when it ends; what every open connection keeps is exactly a
/// `Driver` in a reactor slot.
async fn start<I: Io>(
    app: Arc<App>,
    connections: &Connections,
    io: I,
    early: Bytes,
    arrival: Arrival,
) {
    match open(&app, io, early, arrival).await {
        Ok(driver) => connections.adopt(I::connection(driver)),
        Err(ending) => session::refused(&app, Transport::Ws, ending),
    }
}

/// Handshake, open the session, handle what the client sent along with `connect`, and count
/// the terminal online.
async fn open<I: Io>(
    app: &Arc<App>,
    io: I,
    early: Bytes,
    arrival: Arrival,
) -> Result<Driver<I::Wire>, Ending> {
    let Handshake {
        io,
        mut session,
        connect_id,
        texts,
        decoder,
    } = Box::pin(handshake(app, io, early, arrival)).await?;
    let io = io.into_wire().map_err(|e| {
        tracing::debug!(error = %e, "cannot take the websocket's socket from tokio");
        Ending::Reset
    })?;
    session.open(connect_id, None, true).await;
    for line in texts {
        session.handle_text(&line);
    }
    let now = clock_ms();
    let signals = session.outbox().signals();
    signals.heard(now);
    signals.ping_at(now + app.config.heartbeat.as_millis() as u64);
    Ok(Driver {
        io,
        decoder,
        session,
        out: Unsent::default(),
        closing: None,
    })
}

/// What a successful handshake yields.
struct Handshake<I> {
    io: I,
    session: Session,
    connect_id: Option<u64>,
    /// Frames the client sent after `connect`, in the same or later messages.
    texts: Vec<String>,
    /// The decoder, which may hold the start of a frame cut by the read.
    decoder: Decoder,
}

/// Wait for the `connect` frame (within `connect_timeout`), check its token (or, without one,
/// ask the connect hook about the upgrade request), and tell a flapping terminal to
/// use long-polling. `early`: bytes the client sent right behind its upgrade request, which
/// hyper had already read.
async fn handshake<I: Io>(
    app: &Arc<App>,
    mut io: I,
    early: Bytes,
    Arrival { conn, caller }: Arrival,
) -> Result<Handshake<I>, Ending> {
    let limits = &app.config.limits;
    let write_timeout = limits.write_timeout;
    let mut decoder = Decoder::new(max_message(app));
    let mut first: Option<String> = None;
    let mut texts: Vec<String> = Vec::new();
    let mut pings: Vec<Vec<u8>> = Vec::new();
    let mut closed = false;
    let mut protocol_error = None;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut early = early;
    let deadline = tokio::time::Instant::now() + limits.connect_timeout;
    let mut shutdown = app.shutdown.clone();
    while first.is_none() {
        let n = if early.is_empty() {
            let read = tokio::select! {
                read = tokio::time::timeout_at(deadline, io.read(&mut buf)) => Some(read),
                _ = shutdown.wait_for(|s| *s) => None,
            };
            let Some(read) = read else {
                let close = wsframe::close_frame(close_code::GOING_AWAY, "shutdown");
                let _ = write_within(&mut io, write_timeout, &close).await;
                return Err(Ending::Shutdown);
            };
            match read {
                Err(_) => {
                    refuse(
                        &mut io,
                        None,
                        "no connect frame in time (connect_timeout)",
                        write_timeout,
                    )
                    .await;
                    return Err(Ending::Unauthorized);
                }
                Ok(Ok(0) | Err(_)) => return Err(Ending::Reset),
                Ok(Ok(n)) => n,
            }
        } else {
            // Bytes hyper read past the upgrade request come first, all at once (the loop
            // ends with the read that holds `connect`; nothing after it may stay behind).
            let n = early.len();
            if n > buf.len() {
                buf.resize(n, 0);
            }
            buf[..n].copy_from_slice(&std::mem::take(&mut early));
            n
        };
        let fed = decoder.feed(&mut buf[..n], |event| {
            match event {
                Event::Text(t) if first.is_none() => first = Some(t.to_owned()),
                Event::Text(t) => texts.push(t.to_owned()),
                Event::Binary(_) if first.is_none() => {
                    protocol_error = Some("the first frame must be a text `connect` frame")
                }
                Event::Binary(_) | Event::Pong => {}
                Event::Ping(p) => pings.push(p.to_vec()),
                Event::Close { .. } => {
                    closed = true;
                    return std::ops::ControlFlow::Break(());
                }
            }
            std::ops::ControlFlow::Continue(())
        });
        if let Err(e) = fed {
            let _ = write_within(&mut io, write_timeout, &close_for(&e)).await;
            return Err(ending_for(&e));
        }
        if let Some(message) = protocol_error {
            refuse(&mut io, None, message, write_timeout).await;
            return Err(Ending::Unauthorized);
        }
        if closed && first.is_none() {
            answer_close(&mut io, write_timeout).await;
            return Err(Ending::ClientClose);
        }
        // Pings are answered as soon as they arrive, `connect` or not.
        if !pings.is_empty() {
            let pongs: Vec<u8> = pings
                .drain(..)
                .flat_map(|p| wsframe::control_frame(OpCode::Pong, &p))
                .collect();
            write_within(&mut io, write_timeout, &pongs).await?;
        }
    }
    let first = first.unwrap_or_default();
    if first.len() > limits.max_frame_bytes {
        refuse(&mut io, None, "connect frame too large", write_timeout).await;
        return Err(Ending::TooLarge);
    }
    let mut lines = livepush_proto::split_frames(&first);
    let line = lines.next().unwrap_or("");
    let batched: Vec<String> = lines.map(str::to_owned).collect();
    texts.splice(0..0, batched);
    let env = match ClientEnvelope::parse(line) {
        Ok(env) => env,
        Err(e) => {
            let message = format!("expected a connect frame: {}", e.message);
            refuse(&mut io, e.id, &message, write_timeout).await;
            return Err(Ending::Unauthorized);
        }
    };
    let ClientFrame::Connect { token, .. } = env.frame else {
        refuse(
            &mut io,
            env.id,
            "the first frame must be `connect`",
            write_timeout,
        )
        .await;
        return Err(Ending::Unauthorized);
    };
    let no_caller = || Caller::of(Transport::Ws, None, &HeaderMap::new());
    let admitted = match authenticate(app, token.as_deref(), None, || {
        caller.unwrap_or_else(no_caller)
    })
    .await
    {
        Ok(a) => a,
        // The backend is out of reach: not the terminal's fault, so not a 4003 (which a
        // client counts as its credentials refused).
        Err(e) if e.code == ErrorCode::Unavailable => {
            let close = (close_code::TRY_AGAIN_LATER, "unavailable");
            refuse_with(&mut io, env.id, (e.code, e.message), close, write_timeout).await;
            return Err(Ending::Unauthorized);
        }
        Err(e) => {
            let close = (close_code::UNAUTHORIZED, "unauthorized");
            refuse_with(&mut io, env.id, (e.code, e.message), close, write_timeout).await;
            return Err(Ending::Unauthorized);
        }
    };
    let terminal = admitted.terminal.clone();
    tracing::Span::current().record("terminal", &*terminal.id);
    let elsewhere = app.inboxes.interruptions_elsewhere(&terminal.id).await;
    if let Some(wait) = app.terminals.longpoll_for(&terminal.id, elsewhere) {
        let frame = livepush_proto::encode_frame(&ServerFrame::Transport {
            use_: Transport::Longpoll,
            retry_ws_after_ms: wait.as_millis() as u64,
        });
        let mut out = wsframe::text_frame(&frame);
        out.extend_from_slice(&wsframe::close_frame(close_code::NORMAL, "use longpoll"));
        let _ = write_within(&mut io, write_timeout, &out).await;
        return Err(Ending::MovedToLongpoll);
    }
    if closed {
        // `connect` then close in one read: nothing to serve.
        answer_close(&mut io, write_timeout).await;
        return Err(Ending::ClientClose);
    }
    let mut session = match Session::start(app, terminal, Transport::Ws, conn) {
        Ok(session) => session,
        Err(e) => {
            let close = (close_code::TOO_MANY_SESSIONS, "too_many_sessions");
            let refusal = (ErrorCode::RateLimited, e.to_string());
            refuse_with(&mut io, env.id, refusal, close, write_timeout).await;
            return Err(Ending::TooManySessions);
        }
    };
    session.expires_with(token.as_deref(), &admitted);
    Ok(Handshake {
        io,
        session,
        connect_id: env.id,
        texts,
        decoder,
    })
}

/// Answer the client's close frame (RFC 6455 §5.5.1) and end the TCP connection.
async fn answer_close<I: Io>(io: &mut I, limit: Duration) {
    let _ = write_within(io, limit, &wsframe::close_frame(close_code::NORMAL, "")).await;
    let _ = io.shutdown().await;
}

/// Send an `unauthorized` error and close with 4003.
async fn refuse<I: Io>(io: &mut I, id: Option<u64>, message: &str, limit: Duration) {
    let refusal = (ErrorCode::Unauthorized, message.to_owned());
    let close = (close_code::UNAUTHORIZED, "unauthorized");
    refuse_with(io, id, refusal, close, limit).await;
}

/// Refuse a handshake: an `error` frame with `code` and `message`, then a close frame.
async fn refuse_with<I: Io>(
    io: &mut I,
    id: Option<u64>,
    (code, message): (ErrorCode, String),
    (close, reason): (u16, &str),
    limit: Duration,
) {
    let frame = livepush_proto::encode_frame(&ServerFrame::error(id, code, message));
    let mut out = wsframe::text_frame(&frame);
    out.extend_from_slice(&wsframe::close_frame(close, reason));
    let _ = write_within(io, limit, &out).await;
}

/// Write and flush within a time limit; errors only matter as "it did not go out".
async fn write_within<I: Io>(io: &mut I, limit: Duration, bytes: &[u8]) -> Result<(), Ending> {
    let write = async {
        io.write_all(bytes).await?;
        io.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Ending::Reset),
        Err(_) => Err(Ending::SlowConsumer),
    }
}

fn max_message(app: &App) -> usize {
    // Messages up to 4× the frame limit are read and answered with a `too_large` error frame
    // by the session; beyond that the connection is closed with 1009.
    app.config.limits.max_frame_bytes.saturating_mul(4)
}

fn close_for(e: &DecodeError) -> Vec<u8> {
    let reason = match e {
        DecodeError::TooBig { .. } => "too_large",
        DecodeError::BadUtf8 => "invalid utf-8",
        DecodeError::Protocol(_) => "protocol error",
    };
    wsframe::close_frame(e.close_code(), reason)
}

fn ending_for(e: &DecodeError) -> Ending {
    match e {
        DecodeError::TooBig { .. } => Ending::TooLarge,
        DecodeError::BadUtf8 | DecodeError::Protocol(_) => Ending::ProtocolError,
    }
}

/// A connection's state between wake-ups: everything an idle connection costs besides its
/// reactor slot and waker, and the session's outbox.
#[derive(Debug)]
pub struct Driver<W = Socket> {
    io: W,
    decoder: Decoder,
    session: Session,
    /// Bytes taken from the outbox (or control frames) that the socket has not accepted yet.
    /// Nothing at all (a null pointer) whenever the socket keeps up.
    out: Unsent,
    /// Set once a close frame is queued: finish writing, then end like this.
    closing: Option<Ending>,
}

impl<W: Wire + std::fmt::Debug> Conn for Driver<W> {
    fn socket(&mut self) -> &mut Socket {
        self.io.socket()
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let ending = std::task::ready!(self.drive(cx));
        self.finish(ending);
        Poll::Ready(())
    }

    /// Raise what is due: a ping every `heartbeat` from the connection's start, "dead" when
    /// nothing was heard for
    /// `heartbeat + heartbeat_timeout`, "stalled" when a write has been blocked for
    /// `write_timeout` or while more than the hard limit waits for it, "expired" once the
    /// session's token has, and the shutdown. Two atomic reads when nothing is due.
    fn tick(&mut self, tick: &Tick) -> bool {
        let config = &self.session.app().config;
        let signals = self.session.outbox().signals();
        let mut bits = 0;
        if tick.stopping {
            bits |= SIGNAL_SHUTDOWN;
        }
        if self.session.expired(tick.unix_secs) {
            bits |= SIGNAL_EXPIRED;
        }
        let dead_after = (config.heartbeat + config.heartbeat_timeout).as_millis() as u64;
        if tick.now_ms.saturating_sub(signals.last_heard()) >= dead_after {
            bits |= SIGNAL_DEAD;
        } else if signals.ping_due(tick.now_ms, config.heartbeat.as_millis() as u64) {
            bits |= SIGNAL_PING;
        }
        if let Some(t) = signals.blocked_since() {
            // Blocked too long, or blocked while its rooms delivered more than the hard limit
            // that it has not read (they stay in the rooms' rings, not in its queue).
            if tick.now_ms.saturating_sub(t) >= config.limits.write_timeout.as_millis() as u64
                || self.session.outbox().over_hard_limit()
            {
                bits |= SIGNAL_STALLED;
            }
        }
        if bits != 0 {
            signals.raise(bits);
        }
        bits != 0
    }

    fn abandon(&mut self, stopping: bool) {
        let (code, reason, ending) = if stopping {
            // The server stopped between this handshake and the reactor taking it.
            (close_code::GOING_AWAY, "shutdown", Ending::Shutdown)
        } else {
            (close_code::INTERNAL_ERROR, "internal error", Ending::Reset)
        };
        let mut last = self.out.take();
        last.extend_from_slice(&wsframe::close_frame(code, reason));
        self.io.write_now(&last);
        self.io.shutdown_write();
        self.finish(ending);
    }
}

impl<W: Wire> Driver<W> {
    /// What its log lines say the connection is (see `crate::logctx`).
    fn ids(&self) -> (ConnId, &str) {
        (self.session.conn(), &self.session.terminal().id)
    }

    /// The connection ended: leave rooms and detach from the inbox before the terminal
    /// counts as gone (a terminal seen offline has no live session anywhere).
    fn finish(&mut self, ending: Ending) {
        self.session.end(ending);
    }

    /// Do everything that can be done without waiting: act on signals, write what is
    /// pending, read and handle what arrived, take the next batch from the outbox.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<Ending> {
        let outbox = self.session.outbox().clone();
        let batch_bytes = self.session.app().config.limits.write_batch_bytes;
        for _ in 0..ROUNDS_PER_POLL {
            let signals = outbox.signals().take();
            if signals & SIGNAL_STALLED != 0 {
                outbox.close(CloseReason::SlowConsumer);
                return Poll::Ready(Ending::SlowConsumer);
            }
            if signals & SIGNAL_SHUTDOWN != 0 {
                self.close(close_code::GOING_AWAY, "shutdown", Ending::Shutdown);
            } else if signals & SIGNAL_EXPIRED != 0 && self.closing.is_none() {
                // Ahead of whatever is still queued: the session ends here.
                self.session.app().metrics.client_errors.inc();
                let frame = session::token_expired().to_frame();
                let text = wsframe::text_frame(&livepush_proto::encode_frame(&frame));
                self.out.buf().extend_from_slice(&text);
                self.close(
                    close_code::UNAUTHORIZED,
                    "token_expired",
                    Ending::Unauthorized,
                );
            } else if signals & SIGNAL_DEAD != 0 {
                self.close(
                    close_code::HEARTBEAT_TIMEOUT,
                    "heartbeat_timeout",
                    Ending::HeartbeatTimeout,
                );
            } else if signals & SIGNAL_PING != 0 && self.closing.is_none() {
                self.out
                    .buf()
                    .extend_from_slice(&wsframe::control_frame(OpCode::Ping, b""));
            }

            // 1. Write what is pending.
            let write_blocked = match self.poll_flush() {
                // Shutting down behind a backed-up socket: the close frame cannot get through.
                Poll::Pending if self.closing == Some(Ending::Shutdown) => {
                    return Poll::Ready(Ending::Shutdown);
                }
                Poll::Ready(Ok(())) => false,
                Poll::Ready(Err(_)) => return Poll::Ready(self.closing.unwrap_or(Ending::Reset)),
                Poll::Pending => true,
            };
            if !write_blocked {
                if let Some(ending) = self.closing {
                    // Best effort FIN after the close frame; the peer may already be gone.
                    self.io.shutdown_write();
                    return Poll::Ready(ending);
                }
                // 2. Take the next batch.
                // Each run (the queue, one room's ring) becomes one text frame, copied
                // straight from the shared frames.
                let out = self.out.buf();
                let before = out.len();
                match outbox.take_into(batch_bytes, &mut |a: &[Frame], b: &[Frame]| {
                    let len = frame::run_len(a, b);
                    out.reserve(len + wsframe::MAX_HEADER);
                    wsframe::write_header(out, OpCode::Text, len);
                    frame::join_run_into(a, b, b'\n', out);
                }) {
                    Ok(()) if out.len() == before => {}
                    Ok(()) => continue,
                    Err(reason) => {
                        let (code, ending) = match reason {
                            CloseReason::SlowConsumer => {
                                (close_code::SLOW_CONSUMER, Ending::SlowConsumer)
                            }
                            CloseReason::Shutdown => (close_code::GOING_AWAY, Ending::Shutdown),
                        };
                        self.close(code, reason.as_str(), ending);
                        continue;
                    }
                }
            }

            // 3. Read and handle whatever arrived. This step runs after every write and mostly
            // finds nothing: the socket's readiness says so without a system call (and
            // without zeroing the buffer).
            if self.io.may_read() {
                let mut chunk = [0u8; READ_CHUNK];
                match self.io.poll_read(&mut chunk) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(self.closing.unwrap_or(Ending::Reset));
                    }
                    Poll::Ready(Ok(n)) => {
                        if let Some(ending) = self.received(&mut chunk[..n]) {
                            return Poll::Ready(ending);
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => {
                        let (conn, terminal) = self.ids();
                        tracing::debug!(error = %e, conn, terminal, "websocket read error");
                        return Poll::Ready(Ending::Reset);
                    }
                    Poll::Pending => {}
                }
            }

            // 4. Nothing readable. Sleep unless the outbox has work (registering first, so
            // a push racing this check still wakes us). While a write is blocked the
            // socket's writability wakes us; the outbox must wait.
            if write_blocked {
                // The queue passed its hard limit while the socket was backed up: there is no
                // getting a close frame through, so end now rather than at `write_timeout`.
                outbox.register(cx);
                if self.closing.is_none() && outbox.is_closed() {
                    return Poll::Ready(Ending::SlowConsumer);
                }
                return Poll::Pending;
            }
            if outbox.poll_work(cx).is_pending() {
                return Poll::Pending;
            }
        }
        // A busy connection: let other tasks run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Write pending bytes until done or the socket is full. Notes when a write starts and
    /// stops blocking (the reactor's tick closes connections whose writes stay blocked).
    fn poll_flush(&mut self) -> Poll<std::io::Result<()>> {
        let signals = self.session.outbox().signals();
        while let Some(unsent) = self.out.unsent() {
            match self.io.poll_write(unsent) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => self.out.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    signals.blocked(Some(clock_ms()));
                    return Poll::Pending;
                }
            }
        }
        // What a layer over the socket (TLS) still holds goes out too.
        let held = match self.io.poll_flush() {
            Poll::Ready(Ok(held)) => held,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                signals.blocked(Some(clock_ms()));
                return Poll::Pending;
            }
        };
        if self.out.clear() | held {
            // The batch's memory went back: an idle connection holds no write buffer.
            signals.blocked(None);
        }
        Poll::Ready(Ok(()))
    }

    /// Queue a close frame; the connection ends once it is written.
    fn close(&mut self, code: u16, reason: &str, ending: Ending) {
        if self.closing.is_none() {
            self.out
                .buf()
                .extend_from_slice(&wsframe::close_frame(code, reason));
            self.closing = Some(ending);
        }
    }

    /// Decode and handle bytes just read. Returns how the connection ends, if it does.
    fn received(&mut self, bytes: &mut [u8]) -> Option<Ending> {
        self.session.outbox().signals().heard(clock_ms());
        if self.closing.is_some() {
            // Waiting for our close frame to go out; the client's frames no longer matter.
            return None;
        }
        let Self {
            decoder,
            session,
            out,
            ..
        } = self;
        let mut peer_closed = false;
        let fed = decoder.feed(bytes, |event| {
            match event {
                Event::Text(t) => session.handle_text(t),
                Event::Binary(_) => session.error(livepush_proto::FrameError::bad_frame(
                    "binary frames are not part of the protocol; send JSON text",
                )),
                Event::Ping(p) => out
                    .buf()
                    .extend_from_slice(&wsframe::control_frame(OpCode::Pong, p)),
                Event::Pong => {}
                Event::Close { .. } => {
                    peer_closed = true;
                    return std::ops::ControlFlow::Break(());
                }
            }
            std::ops::ControlFlow::Continue(())
        });
        // Pongs wait in the driver's buffer, not the outbox, but count against its hard
        // limit: a peer that pings without reading is closed as a slow consumer.
        if let Some(unsent) = self.out.unsent()
            && self.session.outbox().hold(unsent.len())
        {
            return Some(Ending::SlowConsumer);
        }
        match fed {
            Err(e) => {
                let (conn, terminal) = self.ids();
                tracing::debug!(error = %e, conn, terminal, "websocket protocol error");
                if matches!(e, DecodeError::TooBig { .. }) {
                    let frame = livepush_proto::encode_frame(&ServerFrame::error(
                        None,
                        ErrorCode::TooLarge,
                        "message exceeds the readable size; closing",
                    ));
                    self.out
                        .buf()
                        .extend_from_slice(&wsframe::text_frame(&frame));
                }
                self.out.buf().extend_from_slice(&close_for(&e));
                self.closing = Some(ending_for(&e));
                None
            }
            Ok(()) if peer_closed => {
                // Answer the close handshake; the connection ends once it is written.
                self.close(close_code::NORMAL, "", Ending::ClientClose);
                None
            }
            Ok(()) => None,
        }
    }
}

/// Bytes waiting for the socket, kept out of line: most connections have none most of the
/// time, and then this is one null pointer instead of a `Vec` and an offset.
#[derive(Debug, Default)]
struct Unsent(Option<Box<UnsentBytes>>);

#[derive(Debug, Default)]
struct UnsentBytes {
    bytes: Vec<u8>,
    /// How much of `bytes` the socket has taken.
    written: usize,
}

impl Unsent {
    /// The buffer to append to.
    fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.0.get_or_insert_default().bytes
    }

    /// What the socket has not taken yet, if anything.
    fn unsent(&self) -> Option<&[u8]> {
        let u = self.0.as_deref()?;
        Some(&u.bytes[u.written..]).filter(|rest| !rest.is_empty())
    }

    fn advance(&mut self, n: usize) {
        if let Some(u) = self.0.as_deref_mut() {
            u.written = (u.written + n).min(u.bytes.len());
        }
    }

    /// Take what the socket has not taken yet.
    fn take(&mut self) -> Vec<u8> {
        match self.0.take() {
            Some(mut u) => u.bytes.split_off(u.written),
            None => Vec::new(),
        }
    }

    /// Free the buffer once everything went out. Returns whether there was one.
    fn clear(&mut self) -> bool {
        self.0.take().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle connection costs is mostly these; keep an eye on them.
    #[test]
    fn idle_state_is_small() {
        let driver = std::mem::size_of::<Driver>();
        let socket = std::mem::size_of::<Socket>();
        let session = std::mem::size_of::<Session>();
        eprintln!(
            "Driver {driver} B (Socket {socket}, Session {session}, Decoder {}, Unsent {})",
            std::mem::size_of::<Decoder>(),
            std::mem::size_of::<Unsent>(),
        );
        // An open connection's driver sits in a box in a reactor slot, next to its 8-byte
        // waker pointer: at most 224 bytes together keeps it in jemalloc's 224-byte class
        // (the next is 256). mio's socket carries 8 more bytes under debug assertions.
        let limit = if cfg!(debug_assertions) { 232 } else { 216 };
        assert!(driver <= limit, "Driver grew to {driver} bytes");
        // What the reactor keeps is a `Connection`: TLS must not cost a plain one a byte.
        assert_eq!(std::mem::size_of::<Connection>(), driver);
    }
}

#[cfg(test)]
mod tls_tests;

//! The connection task: an explicit state machine around one session at a time, over
//! WebSocket (here), long-polling ([`longpoll`]) or Server-Sent Events ([`sse`]).
//!
//! ```text
//!            ┌──────────── set_token ─────────────┐
//!            v                                    │
//!   ┌──> Connecting ──ok──> (session) ──ends───> Waiting ──delay──┐
//!   │     │  ^  │                                 ^               │
//!   │     │  │  ├──refused / failed / timeout ────┘               │
//!   │     │  │  └──auth refused `auth_failure_limit` times──> Parked
//!   │     │  └── Auto: WebSocket refused over HTTP / `transport` ──> long-poll
//!   └─────┴──────────────────────────────────────────────────────────┘
//!   any state ──close / every handle dropped──> Closed
//! ```
//!
//! `Connecting` picks the transport ([`Worker::pick`]): the configured one, or in
//! [`TransportMode::Auto`] WebSocket unless the client is in a long-poll period
//! (`Worker::lp_until`). A long-poll session tries WebSocket again when that period ends and
//! goes straight to a WebSocket session once the server said `connected` on it.
//!
//! Per-room ordering lives in [`RoomTracker`]; this module does the IO, the watchdog and the
//! bookkeeping of request ids.
//!
//! A `joined` frame either answers a join (WebSocket: the one in flight, matched by its id;
//! SSE: the stream's own join of the room; long-poll: the attach of the poll whose answer
//! holds it) or, over WebSocket and SSE, was pushed by the server for a room that is live
//! and has no join in flight, because it replaced the room's history ([`joined_kind`]).
//! Either way [`Event::Joined`] reports it and the shared position (what
//! [`Client::position`](crate::Client::position) reads) follows the tracker's: every
//! delivered message, every [`Effect::Lost`] and every move back moves it.

mod longpoll;
mod sse;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use livepush_proto::{
    ClientEnvelope, ClientFrame, ErrorCode, InboxPosition, Position, ServerFrame, Transport,
    split_frames,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

type Reply = oneshot::Sender<Result<(), ClientError>>;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::config::{ClientConfig, TransportMode};
use crate::skipped::Skipped;
use crate::tracker::{Effect, RoomTracker};
use crate::wire;
use crate::{ClientError, Command, DisconnectReason, Event, InboxMessage, SessionInfo, Shared};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Requests awaiting an answer are remembered by id up to this many (sends are never
/// answered on success, so the oldest are forgotten).
const MAX_PENDING_REQUESTS: usize = 1024;

/// How long a clean close waits for the server's close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Where the transports live.
#[derive(Debug, Clone)]
pub(crate) struct Urls {
    pub ws: url::Url,
    pub poll: url::Url,
    pub sse: url::Url,
}

/// The states of the connection task.
enum State {
    /// A connection attempt is due now, over the transport [`Worker::pick`] chooses.
    Connecting,
    /// A WebSocket session is up.
    Connected(Box<Handshake>),
    /// Waiting before the next attempt.
    Waiting { until: Instant },
    /// Stopped after repeated auth refusals, until `set_token`.
    Parked,
    /// Closed for good.
    Closed,
}

/// What the server said in its `connected` frame, and what came with it.
struct Handshake {
    ws: Ws,
    terminal: String,
    transport: Transport,
    heartbeat_ms: u64,
    inbox: InboxPosition,
    wake_key: String,
    /// Frames that arrived in the same WebSocket message after `connected`.
    leftover: Vec<String>,
}

/// Why a connection attempt failed.
#[derive(Debug)]
enum ConnectError {
    /// `unauthorized` or `forbidden`: the token is not accepted.
    Auth { code: ErrorCode, message: String },
    /// Another `error` answer.
    Refused { code: ErrorCode, message: String },
    /// `transport`: use long-poll for a while.
    TransportSwitch { retry_ws_after: Duration },
    /// The WebSocket upgrade was refused at the HTTP level (see [`wire::ws_refusal`]).
    WsRefused(String),
    /// Network, handshake, or the server closed before `connected`.
    Failed(String),
}

/// What the task should do after handling an input.
enum Flow {
    Continue,
    /// Leave the current state for this one.
    Go(State),
}

/// A request sent with an `id`, remembered until answered (or forgotten).
#[derive(Debug, Clone)]
enum Request {
    Join(String),
    Leave(String),
    Pull(String),
    Send(String),
    Ack,
}

impl Request {
    fn room(&self) -> Option<&str> {
        match self {
            Request::Join(r) | Request::Leave(r) | Request::Pull(r) | Request::Send(r) => Some(r),
            Request::Ack => None,
        }
    }
}

/// A registered room.
struct Room {
    tracker: RoomTracker,
    /// The room's online count, as last said by the server (0: not known yet).
    online: u64,
    /// The id of the outstanding `join` on this connection.
    join_id: Option<u64>,
    /// Back-off of join retries after `rate_limited` / `internal`.
    retry: Backoff,
    retry_at: Option<Instant>,
}

/// The connection watchdog: any traffic puts it back to `Idle`.
#[derive(Debug, Clone, Copy)]
enum Watch {
    /// Nothing to do before `deadline`; then probe.
    Idle { deadline: Instant },
    /// Probe sent; the connection is dead if nothing arrives before `deadline`.
    Probing { deadline: Instant },
}

impl Watch {
    fn deadline(self) -> Instant {
        match self {
            Watch::Idle { deadline } | Watch::Probing { deadline } => deadline,
        }
    }
}

/// The transport of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Ws,
    Longpoll,
    Sse,
}

/// The WebSocket of a session and its watchdog.
struct WsConn {
    ws: Ws,
    idle: Duration,
    watch: Watch,
}

impl WsConn {
    fn traffic(&mut self) {
        self.watch = Watch::Idle {
            deadline: Instant::now() + self.idle,
        };
    }
}

/// Per-session state, whatever the transport.
struct Session {
    link: Link,
    /// Requests awaiting an answer, by id.
    requests: BTreeMap<u64, Request>,
    /// Rooms with a `leave` in flight, counted, so that its `left` answer is not taken for
    /// the server closing the room.
    leaving: HashMap<String, u32>,
    /// Frames to write at the next flush (long-poll: the ops of the next short poll).
    out: Vec<ClientEnvelope>,
    /// Callers waiting for the next flush to succeed.
    replies: Vec<Reply>,
    /// SSE: the stream must be reopened (the room set changed, or a gap or `prompt` that
    /// only a new stream from the current positions can fill).
    reopen: bool,
}

impl Session {
    fn new(link: Link) -> Session {
        Session {
            link,
            requests: BTreeMap::new(),
            leaving: HashMap::new(),
            out: Vec::new(),
            replies: Vec::new(),
            reopen: false,
        }
    }

    /// Tell every caller still waiting that its command did not go out.
    fn fail_replies(&mut self) {
        for r in self.replies.drain(..) {
            let _ = r.send(Err(ClientError::NotConnected));
        }
    }

    fn request(&mut self, id: u64, req: Request) {
        self.requests.insert(id, req);
        while self.requests.len() > MAX_PENDING_REQUESTS {
            self.requests.pop_first();
        }
    }
}

/// Events waiting for room in the application's channel. Never blocks the task: when the
/// application is slow, events queue here and the session stops reading the socket.
struct Outbox {
    tx: mpsc::Sender<Event>,
    queue: VecDeque<Event>,
    cap: usize,
    closed: bool,
}

impl Outbox {
    fn push(&mut self, ev: Event) {
        if self.closed {
            return;
        }
        self.queue.push_back(ev);
        self.flush();
    }

    fn flush(&mut self) {
        while let Some(ev) = self.queue.pop_front() {
            match self.tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.queue.push_front(ev);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // Nobody listens any more: drop events from now on.
                    self.closed = true;
                    self.queue.clear();
                    break;
                }
            }
        }
    }

    fn backlogged(&self) -> bool {
        self.queue.len() >= self.cap
    }
}

pub(crate) struct Worker {
    config: ClientConfig,
    urls: Urls,
    /// For long-polling and SSE.
    http: reqwest::Client,
    token: Option<String>,
    /// The terminal id of the last `connected`; sent back in polls and SSE requests when
    /// there is no token (a dev-mode server's anonymous terminal).
    terminal: Option<String>,
    /// [`TransportMode::Auto`]: long-poll until then, then try WebSocket again.
    lp_until: Option<Instant>,
    cmds: mpsc::Receiver<Command>,
    outbox: Outbox,
    shared: Arc<Shared>,
    rooms: BTreeMap<String, Room>,
    backoff: Backoff,
    rng: StdRng,
    auth_failures: u32,
    /// Highest inbox seq handed to the application.
    inbox_delivered: u64,
    /// Messages whose `data` could not be decoded, reported instead of delivered.
    skipped: Skipped,
    next_id: u64,
    /// The caller of [`Client::close`](crate::Client::close), answered when the task ends.
    close_reply: Option<Reply>,
}

impl Worker {
    pub(crate) fn new(
        config: ClientConfig,
        urls: Urls,
        cmds: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
        shared: Arc<Shared>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .user_agent(config.client_name.clone())
            .build()
            .unwrap_or_else(|e| {
                warn!(error = %e, "livepush: HTTP client settings refused; using the defaults");
                reqwest::Client::new()
            });
        Worker {
            http,
            terminal: None,
            lp_until: None,
            token: config.token.clone(),
            backoff: Backoff::new(config.backoff_base, config.backoff_max),
            outbox: Outbox {
                tx: events,
                queue: VecDeque::new(),
                cap: config.event_capacity.max(1),
                closed: false,
            },
            config,
            urls,
            cmds,
            shared,
            rooms: BTreeMap::new(),
            rng: StdRng::from_os_rng(),
            auth_failures: 0,
            inbox_delivered: 0,
            skipped: Skipped::default(),
            next_id: 0,
            close_reply: None,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut state = State::Connecting;
        loop {
            state = match state {
                State::Connecting => match self.pick() {
                    Transport::Ws => self.connecting().await,
                    Transport::Longpoll => self.longpoll().await,
                    Transport::Sse => self.sse().await,
                },
                State::Connected(hs) => self.connected(*hs).await,
                State::Waiting { until } => self.waiting(Some(until)).await,
                State::Parked => self.waiting(None).await,
                State::Closed => break,
            };
        }
        self.shared.set_transport(None);
        // Best effort: hand over what is queued without waiting for the application.
        self.outbox.flush();
        if let Some(reply) = self.close_reply.take() {
            let _ = reply.send(Ok(()));
        }
        debug!("livepush client task ended");
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn emit(&mut self, ev: Event) {
        self.outbox.push(ev);
    }

    /// Read one server frame, tolerating `data` that cannot be decoded (see
    /// [`crate::skipped`]); `None` when there is nothing to handle.
    fn decode(&mut self, line: &str) -> Option<ServerFrame> {
        match ServerFrame::parse_tolerant(line) {
            Ok((frame, bad)) => self.admit(frame, bad),
            Err(e) => {
                warn!(error = %e, frame = %truncate(line), "livepush: unreadable frame skipped");
                None
            }
        }
    }

    /// A frame with the `data` values it could not decode: report what must be, and
    /// return the frame to handle.
    fn admit(
        &mut self,
        frame: ServerFrame,
        bad: Vec<livepush_proto::Undecodable>,
    ) -> Option<ServerFrame> {
        let (frame, report) = self.skipped.admit(frame, bad);
        if let Some(ev) = report {
            warn!(?ev, "livepush: undecodable message skipped");
            self.emit(ev);
        }
        frame
    }

    // ---- states without a session ----------------------------------------------------

    /// The transport of the next connection attempt.
    fn pick(&mut self) -> Transport {
        match self.config.transport {
            TransportMode::WebSocket => Transport::Ws,
            TransportMode::LongPoll => Transport::Longpoll,
            TransportMode::Sse => Transport::Sse,
            TransportMode::Auto => {
                if self.lp_until.is_some_and(|t| t > Instant::now()) {
                    Transport::Longpoll
                } else {
                    self.lp_until = None;
                    Transport::Ws
                }
            }
        }
    }

    /// A WebSocket handshake (TCP, upgrade, `connect`, `connected`) within the connect
    /// timeout; owns what it needs, so it can run beside a long-poll session.
    fn ws_attempt(&self) -> impl Future<Output = Result<Handshake, ConnectError>> + Send + use<> {
        let attempt = timeout(
            self.config.connect_timeout,
            handshake(
                self.urls.ws.clone(),
                self.token.clone(),
                self.config.client_name.clone(),
            ),
        );
        async move {
            match attempt.await {
                Ok(res) => res,
                Err(_) => Err(ConnectError::Failed("connect timeout".to_owned())),
            }
        }
    }

    async fn connecting(&mut self) -> State {
        let attempt = self.ws_attempt();
        tokio::pin!(attempt);
        loop {
            tokio::select! {
                res = &mut attempt => {
                    return match res {
                        Ok(hs) => State::Connected(Box::new(hs)),
                        Err(e) => self.connect_failed(e),
                    };
                }
                cmd = self.cmds.recv() => {
                    if let Flow::Go(next) = self.offline_command(cmd) {
                        return next;
                    }
                }
                open = has_room(&self.outbox.tx), if !self.outbox.queue.is_empty() => {
                    self.outbox_ready(open);
                }
            }
        }
    }

    fn connect_failed(&mut self, err: ConnectError) -> State {
        if self.config.transport == TransportMode::Auto {
            // Reasons to long-poll for a while rather than to wait.
            let now = Instant::now();
            match err {
                ConnectError::TransportSwitch { retry_ws_after } => {
                    info!(
                        ?retry_ws_after,
                        "livepush server asked for long-poll; switching now, WebSocket again later"
                    );
                    self.lp_until = Some(now + retry_ws_after);
                    return State::Connecting;
                }
                ConnectError::WsRefused(why) => {
                    info!(
                        %why,
                        retry_ws_after = ?self.config.ws_retry_after,
                        "livepush: WebSocket refused; continuing on long-polling"
                    );
                    self.lp_until = Some(now + self.config.ws_retry_after);
                    return State::Connecting;
                }
                _ => {}
            }
        }
        let mut delay = self.backoff.next_delay(&mut self.rng);
        match err {
            ConnectError::Auth { code, message } => {
                warn!(%code, %message, "livepush connect refused");
                self.auth_failures = self.auth_failures.saturating_add(1);
                self.emit(Event::Error {
                    code,
                    message,
                    room: None,
                });
                if let Some(limit) = self.config.auth_failure_limit
                    && self.auth_failures >= limit
                {
                    info!(
                        failures = self.auth_failures,
                        "livepush: token refused repeatedly; waiting for set_token"
                    );
                    return State::Parked;
                }
            }
            ConnectError::Refused { code, message } => {
                warn!(%code, %message, "livepush connect refused");
                self.emit(Event::Error {
                    code,
                    message,
                    room: None,
                });
            }
            ConnectError::TransportSwitch { retry_ws_after } => {
                info!(
                    ?retry_ws_after,
                    "livepush server asked for long-poll; retrying WebSocket later"
                );
                delay = delay.max(retry_ws_after);
            }
            ConnectError::WsRefused(why) | ConnectError::Failed(why) => {
                debug!(%why, ?delay, "livepush connect failed");
            }
        }
        State::Waiting {
            until: Instant::now() + delay,
        }
    }

    /// `Waiting` (with a deadline) and `Parked` (without).
    async fn waiting(&mut self, until: Option<Instant>) -> State {
        let deadline = until.unwrap_or_else(Instant::now);
        loop {
            tokio::select! {
                () = sleep_until(deadline), if until.is_some() => return State::Connecting,
                cmd = self.cmds.recv() => {
                    if let Flow::Go(next) = self.offline_command(cmd) {
                        return next;
                    }
                }
                open = has_room(&self.outbox.tx), if !self.outbox.queue.is_empty() => {
                    self.outbox_ready(open);
                }
            }
        }
    }

    fn outbox_ready(&mut self, open: bool) {
        if open {
            self.outbox.flush();
        } else {
            self.outbox.closed = true;
            self.outbox.queue.clear();
        }
    }

    /// A command while there is no session.
    fn offline_command(&mut self, cmd: Option<Command>) -> Flow {
        let Some(cmd) = cmd else {
            return Flow::Go(State::Closed);
        };
        match cmd {
            Command::Join { room, since, reply } => {
                self.register(room, since);
                let _ = reply.send(Ok(()));
            }
            Command::Leave { room, reply } => {
                self.unregister(&room);
                let _ = reply.send(Ok(()));
            }
            Command::Send { reply, .. } | Command::Ack { reply, .. } => {
                let _ = reply.send(Err(ClientError::NotConnected));
            }
            Command::SetToken { token, reply } => {
                self.token = token;
                self.auth_failures = 0;
                self.backoff.reset();
                let _ = reply.send(Ok(()));
                return Flow::Go(State::Connecting);
            }
            Command::Close { reply } => {
                // Answered once the session has ended (see `Worker::run`).
                self.close_reply = Some(reply);
                return Flow::Go(State::Closed);
            }
        }
        Flow::Continue
    }

    /// Register a room; `false` when it already was.
    fn register(&mut self, room: String, since: Option<Position>) -> bool {
        if self.rooms.contains_key(&room) {
            return false;
        }
        self.shared.set_position(&room, since.clone());
        let tracker = RoomTracker::new(room.clone(), since, self.config.max_buffered_per_room);
        self.rooms.insert(
            room,
            Room {
                tracker,
                online: 0,
                join_id: None,
                retry: Backoff::new(self.config.backoff_base, self.config.backoff_max),
                retry_at: None,
            },
        );
        true
    }

    fn unregister(&mut self, room: &str) -> bool {
        self.shared.set_position(room, None);
        self.rooms.remove(room).is_some()
    }

    // ---- the session -----------------------------------------------------------------

    /// The server said `connected`: the session is up.
    fn on_connected(
        &mut self,
        terminal: String,
        transport: Transport,
        inbox: InboxPosition,
        wake_key: String,
    ) {
        info!(%terminal, ?transport, "livepush connected");
        self.shared.set_session(SessionInfo {
            terminal: terminal.clone(),
            transport,
            inbox,
            wake_key,
        });
        self.backoff.reset();
        self.auth_failures = 0;
        if inbox.seq < self.inbox_delivered {
            // The server's inbox restarted: follow it.
            self.inbox_delivered = inbox.acked;
        }
        self.terminal = Some(terminal.clone());
        self.shared.set_transport(Some(transport));
        self.emit(Event::Connected {
            terminal,
            transport,
        });
    }

    /// A session that was up ended: report it and wait before the next attempt (in
    /// [`TransportMode::Auto`], a `transport` answer moves to long-polling at once).
    fn disconnected(&mut self, reason: DisconnectReason) -> State {
        self.end_session();
        let mut delay = self.backoff.next_delay(&mut self.rng);
        if let DisconnectReason::TransportSwitch { retry_ws_after } = &reason {
            if self.config.transport == TransportMode::Auto {
                self.lp_until = Some(Instant::now() + *retry_ws_after);
                delay = Duration::ZERO;
            } else {
                delay = delay.max(*retry_ws_after);
            }
        }
        info!(%reason, ?delay, "livepush disconnected");
        self.emit(Event::Disconnected {
            reason,
            retry_in: delay,
        });
        State::Waiting {
            until: Instant::now() + delay,
        }
    }

    async fn connected(&mut self, hs: Handshake) -> State {
        let Handshake {
            ws,
            terminal,
            transport,
            heartbeat_ms,
            inbox,
            wake_key,
            leftover,
        } = hs;
        self.on_connected(terminal, transport, inbox, wake_key);
        let idle = self.config.effective_idle_timeout(heartbeat_ms);
        let mut conn = WsConn {
            ws,
            idle,
            watch: Watch::Idle {
                deadline: Instant::now() + idle,
            },
        };
        let mut s = Session::new(Link::Ws);
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        for room in rooms {
            self.queue_join(&mut s, &room);
        }
        let mut ended = self.flush_out(&mut s, &mut conn).await.err();
        if ended.is_none() {
            for text in leftover {
                if let Err(reason) = self.on_text(&mut s, &text) {
                    ended = Some(reason);
                    break;
                }
            }
        }
        let reason = match ended {
            Some(r) => r,
            None => match self.session_loop(&mut s, &mut conn).await {
                Ok(next) => {
                    // Closed on purpose: close cleanly.
                    close_cleanly(&mut conn.ws, self.config.write_timeout).await;
                    self.end_session();
                    return next;
                }
                Err(reason) => reason,
            },
        };
        self.disconnected(reason)
    }

    fn end_session(&mut self) {
        self.shared.set_transport(None);
        for room in self.rooms.values_mut() {
            room.tracker.on_disconnect();
            room.join_id = None;
            room.retry_at = None;
            room.retry.reset();
        }
    }

    /// Runs until the session ends: `Ok(state)` when the application closed the client,
    /// `Err(reason)` when the connection was lost.
    async fn session_loop(
        &mut self,
        s: &mut Session,
        c: &mut WsConn,
    ) -> Result<State, DisconnectReason> {
        let mut reading = true;
        loop {
            let was_reading = reading;
            reading = !self.outbox.backlogged();
            if reading && !was_reading {
                // We could not observe the socket while the application was behind.
                c.traffic();
            }
            let deadline = c.watch.deadline();
            let retry_at = self.rooms.values().filter_map(|r| r.retry_at).min();
            tokio::select! {
                open = has_room(&self.outbox.tx), if !self.outbox.queue.is_empty() => {
                    self.outbox_ready(open);
                }
                cmd = self.cmds.recv() => {
                    if let Flow::Go(next) = self.online_command(s, cmd) {
                        return Ok(next);
                    }
                }
                frame = c.ws.next(), if reading => {
                    c.traffic();
                    match frame {
                        Some(Ok(WsMessage::Text(text))) => self.on_text(s, text.as_str())?,
                        Some(Ok(WsMessage::Binary(_))) => debug!("livepush: binary frame ignored"),
                        Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
                        Some(Ok(WsMessage::Close(frame))) => {
                            let (code, reason) = match frame {
                                Some(f) => (Some(u16::from(f.code)), f.reason.as_str().to_owned()),
                                None => (None, String::new()),
                            };
                            return Err(DisconnectReason::ServerClosed { code, reason });
                        }
                        Some(Err(e)) => return Err(DisconnectReason::ConnectionLost(e.to_string())),
                        None => return Err(DisconnectReason::ConnectionLost("connection ended".to_owned())),
                    }
                }
                () = sleep_until(deadline), if reading => {
                    match c.watch {
                        Watch::Idle { .. } => {
                            debug!("livepush: idle, probing with ping");
                            s.out.push(ClientEnvelope::new(ClientFrame::Ping));
                            c.watch = Watch::Probing {
                                deadline: Instant::now() + self.config.ping_timeout,
                            };
                        }
                        Watch::Probing { .. } => return Err(DisconnectReason::HeartbeatTimeout),
                    }
                }
                () = sleep_until(retry_at.unwrap_or(deadline)), if retry_at.is_some() => {
                    let now = Instant::now();
                    let due: Vec<String> = self
                        .rooms
                        .iter()
                        .filter(|(_, r)| r.retry_at.is_some_and(|t| t <= now))
                        .map(|(name, _)| name.clone())
                        .collect();
                    for room in due {
                        self.queue_join(s, &room);
                    }
                }
            }
            self.flush_out(s, c).await?;
        }
    }

    /// Write the queued frames, all in one flush.
    async fn flush_out(&mut self, s: &mut Session, c: &mut WsConn) -> Result<(), DisconnectReason> {
        let frames = std::mem::take(&mut s.out);
        let replies = std::mem::take(&mut s.replies);
        if frames.is_empty() {
            for r in replies {
                let _ = r.send(Ok(()));
            }
            return Ok(());
        }
        let ws = &mut c.ws;
        let write = async move {
            for f in frames {
                ws.feed(WsMessage::text(f.to_json())).await?;
            }
            ws.flush().await
        };
        let res = match timeout(self.config.write_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DisconnectReason::ConnectionLost(e.to_string())),
            Err(_) => Err(DisconnectReason::ConnectionLost("write timeout".to_owned())),
        };
        for r in replies {
            let _ = r.send(
                res.as_ref()
                    .map(|_| ())
                    .map_err(|_| ClientError::NotConnected),
            );
        }
        res
    }

    /// Send `join` for `room` (WebSocket; the HTTP transports attach rooms otherwise).
    fn queue_join(&mut self, s: &mut Session, room: &str) {
        if s.link != Link::Ws {
            return;
        }
        let id = self.id();
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        r.join_id = Some(id);
        r.retry_at = None;
        let since = r.tracker.resume_from();
        s.out.push(ClientEnvelope::with_id(
            ClientFrame::Join {
                room: room.to_owned(),
                since,
            },
            id,
        ));
        s.request(id, Request::Join(room.to_owned()));
    }

    /// A command while a session is up.
    fn online_command(&mut self, s: &mut Session, cmd: Option<Command>) -> Flow {
        let Some(cmd) = cmd else {
            return Flow::Go(State::Closed);
        };
        match cmd {
            Command::Join { room, since, reply } => {
                if self.register(room.clone(), since) {
                    match s.link {
                        Link::Ws => self.queue_join(s, &room),
                        // The next poll (a short one, if one is parked) attaches it.
                        Link::Longpoll => {}
                        Link::Sse => s.reopen = true,
                    }
                }
                let _ = reply.send(Ok(()));
            }
            Command::Leave { room, reply } => {
                if !self.unregister(&room) {
                    // Not registered: nothing to do.
                } else if s.link == Link::Sse {
                    s.reopen = true;
                } else {
                    let id = self.id();
                    s.out.push(ClientEnvelope::with_id(
                        ClientFrame::Leave { room: room.clone() },
                        id,
                    ));
                    s.request(id, Request::Leave(room.clone()));
                    *s.leaving.entry(room).or_insert(0) += 1;
                }
                let _ = reply.send(Ok(()));
            }
            Command::Send { reply, .. } | Command::Ack { reply, .. } if s.link == Link::Sse => {
                let _ = reply.send(Err(ClientError::Unsupported(
                    "Server-Sent Events are receive-only".to_owned(),
                )));
            }
            Command::Send {
                room,
                ty,
                data,
                reply,
            } => {
                let id = self.id();
                s.out.push(ClientEnvelope::with_id(
                    ClientFrame::Send {
                        room: room.clone(),
                        ty,
                        data,
                    },
                    id,
                ));
                s.request(id, Request::Send(room));
                s.replies.push(reply);
            }
            Command::Ack { inbox, reply } => {
                let id = self.id();
                s.out
                    .push(ClientEnvelope::with_id(ClientFrame::Ack { inbox }, id));
                s.request(id, Request::Ack);
                s.replies.push(reply);
            }
            Command::SetToken { token, reply } => {
                self.token = token;
                self.auth_failures = 0;
                let _ = reply.send(Ok(()));
            }
            Command::Close { reply } => {
                // Answered once the session has ended (see `Worker::run`).
                self.close_reply = Some(reply);
                return Flow::Go(State::Closed);
            }
        }
        Flow::Continue
    }

    /// One WebSocket text message: one or more frames.
    fn on_text(&mut self, s: &mut Session, text: &str) -> Result<(), DisconnectReason> {
        for line in split_frames(text) {
            if let Some(frame) = self.decode(line) {
                self.on_frame(s, frame)?;
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, s: &mut Session, frame: ServerFrame) -> Result<(), DisconnectReason> {
        match frame {
            ServerFrame::Joined {
                id,
                room,
                epoch,
                seq,
                recovered,
                online,
            } => {
                if let Some(id) = id {
                    s.requests.remove(&id);
                }
                let Some(r) = self.rooms.get_mut(&room) else {
                    debug!(%room, "livepush: joined for a room not followed");
                    return Ok(());
                };
                if id.is_some() && id != r.join_id {
                    debug!(%room, "livepush: stale joined ignored");
                    return Ok(());
                }
                let resumed = r.tracker.resume_from().is_some();
                r.online = online;
                match joined_kind(s.link, id, r) {
                    JoinedKind::Answer => r.tracker.on_joined(&epoch, seq, recovered),
                    JoinedKind::Pushed => {
                        warn!(%room, %epoch, seq, "livepush: the room's history was replaced");
                        r.tracker.on_history_reset(&epoch, seq);
                    }
                    JoinedKind::Ignored => {
                        debug!(%room, "livepush: joined without id ignored (a join is pending, or the room is not live)");
                        return Ok(());
                    }
                }
                r.join_id = None;
                r.retry_at = None;
                r.retry.reset();
                let pos = r.tracker.resume_from();
                self.shared.set_position(&room, pos);
                self.emit(Event::Joined {
                    room,
                    epoch,
                    seq,
                    recovered,
                    resumed,
                    online,
                });
            }
            ServerFrame::Msg(m) => {
                let Some(r) = self.rooms.get_mut(&m.room) else {
                    return Ok(());
                };
                if !r.tracker.is_live() {
                    return Ok(());
                }
                if m.seq.is_none() {
                    self.emit(Event::Transient(m));
                } else {
                    let room = m.room.clone();
                    let effects = r.tracker.on_message(m);
                    self.apply(s, &room, effects);
                }
            }
            ServerFrame::Prompt { room, seq } => {
                if let Some(r) = self.rooms.get_mut(&room) {
                    let effects = r.tracker.on_prompt(seq);
                    self.apply(s, &room, effects);
                }
            }
            ServerFrame::Pulled {
                id,
                room,
                epoch,
                seq,
                recovered,
                messages,
            } => {
                if let Some(id) = id {
                    s.requests.remove(&id);
                }
                if let Some(r) = self.rooms.get_mut(&room) {
                    let effects = r.tracker.on_pulled(&epoch, seq, recovered, messages);
                    self.apply(s, &room, effects);
                }
            }
            ServerFrame::Online { room, count } => {
                if let Some(r) = self.rooms.get_mut(&room)
                    && r.tracker.is_live()
                {
                    r.online = count;
                    self.emit(Event::Online { room, count });
                }
            }
            ServerFrame::Inbox { seq, ty, data, ts } => {
                if seq > self.inbox_delivered {
                    self.inbox_delivered = seq;
                    let ev = self.skipped.take_inbox(seq);
                    self.emit(ev.unwrap_or(Event::Inbox(InboxMessage { seq, ty, data, ts })));
                }
            }
            ServerFrame::Transport {
                use_,
                retry_ws_after_ms,
            } => {
                info!(
                    ?use_,
                    retry_ws_after_ms, "livepush: server asks to switch transport"
                );
                return Err(DisconnectReason::TransportSwitch {
                    retry_ws_after: Duration::from_millis(retry_ws_after_ms),
                });
            }
            ServerFrame::Left { id, room } => {
                let answered = id.and_then(|id| s.requests.remove(&id));
                if let Some(n) = s.leaving.get_mut(&room) {
                    // The answer to our own `leave` (with or without the id echoed).
                    *n -= 1;
                    if *n == 0 {
                        s.leaving.remove(&room);
                    }
                } else if answered.is_none() && self.unregister(&room) {
                    info!(%room, "livepush: removed from the room by the server");
                    self.emit(Event::Left { room });
                }
            }
            ServerFrame::Pong { id } => {
                if let Some(id) = id {
                    s.requests.remove(&id);
                }
            }
            ServerFrame::Connected { .. } => debug!("livepush: extra connected frame ignored"),
            ServerFrame::Error {
                id, code, message, ..
            } => self.on_error(s, id, code, message),
        }
        Ok(())
    }

    fn on_error(&mut self, s: &mut Session, id: Option<u64>, code: ErrorCode, message: String) {
        let req = id.and_then(|id| s.requests.remove(&id));
        warn!(%code, %message, ?req, "livepush: error from the server");
        let room = req.as_ref().and_then(|r| r.room()).map(str::to_owned);
        match (&req, id) {
            (Some(Request::Join(room)), Some(id)) => {
                if let Some(r) = self.rooms.get_mut(room)
                    && r.join_id == Some(id)
                {
                    r.join_id = None;
                    match code {
                        ErrorCode::RateLimited | ErrorCode::Internal | ErrorCode::Unavailable => {
                            let delay = r.retry.next_delay(&mut self.rng);
                            r.retry_at = Some(Instant::now() + delay);
                        }
                        _ => {
                            // room_closed, forbidden, …: retrying would not help.
                            let room = room.clone();
                            self.unregister(&room);
                        }
                    }
                }
            }
            (Some(Request::Pull(room)), _) => {
                if let Some(r) = self.rooms.get_mut(room) {
                    r.tracker.on_pull_failed();
                }
            }
            (Some(Request::Leave(room)), _) => {
                if let Some(n) = s.leaving.get_mut(room) {
                    *n -= 1;
                    if *n == 0 {
                        s.leaving.remove(room);
                    }
                }
            }
            (None, None) => {
                // Not tied to a request (no id echoed, e.g. a frame-rate refusal that drops
                // frames): it may concern any outstanding pull or join. Pulls are retried by
                // the next gap; joins are re-sent after a back-off unless answered meanwhile.
                let now = Instant::now();
                for r in self.rooms.values_mut() {
                    r.tracker.on_pull_failed();
                    if r.join_id.is_some() && r.retry_at.is_none() {
                        r.retry_at = Some(now + r.retry.next_delay(&mut self.rng));
                    }
                }
            }
            _ => {}
        }
        self.emit(Event::Error {
            code,
            message,
            room,
        });
    }

    /// A room the server refused to attach (an `error` without `id` that names it, from a
    /// long-poll room entry or an SSE stream's room list). `forbidden`, `room_closed`, … are
    /// final: the room is unregistered, as for a refused `join`. Returns whether it was;
    /// `rate_limited` and `internal` are not (the caller tries again later).
    fn on_room_refused(&mut self, room: &str, code: ErrorCode, message: String) -> bool {
        warn!(%room, %code, %message, "livepush: room refused");
        let last = !matches!(
            code,
            ErrorCode::RateLimited | ErrorCode::Internal | ErrorCode::Unavailable
        );
        if last {
            self.unregister(room);
        }
        self.emit(Event::Error {
            code,
            message,
            room: Some(room.to_owned()),
        });
        last
    }

    fn apply(&mut self, s: &mut Session, room: &str, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Deliver(m) => {
                    self.shared.set_position(room, Some(m.position()));
                    let ev = self.skipped.take_room(room, m.seq);
                    self.emit(ev.unwrap_or(Event::Message(m)));
                }
                Effect::Lost { first, last } => {
                    warn!(%room, first, last, "livepush: reliable messages lost");
                    // The position moves past what is gone, even when nothing follows.
                    if let Some(epoch) = self.rooms.get(room).and_then(|r| r.tracker.epoch()) {
                        let pos = Position {
                            epoch: epoch.to_owned(),
                            seq: last,
                        };
                        self.shared.set_position(room, Some(pos));
                    }
                    self.emit(Event::Lost {
                        room: room.to_owned(),
                        first,
                        last,
                    });
                }
                Effect::Pull { .. } if s.link == Link::Longpoll => {
                    // The next poll replays from the position: no pull needed.
                }
                Effect::Pull { .. } if s.link == Link::Sse => {
                    // SSE cannot pull: a new stream from the position replays the gap.
                    s.reopen = true;
                }
                Effect::Pull { since } => {
                    let id = self.id();
                    s.out.push(ClientEnvelope::with_id(
                        ClientFrame::Pull {
                            room: room.to_owned(),
                            since,
                            limit: Some(self.config.pull_limit.max(1)),
                        },
                        id,
                    ));
                    s.request(id, Request::Pull(room.to_owned()));
                }
                Effect::Rewound { seq } => {
                    warn!(%room, seq, "livepush: the server's history ends before the position; following it back");
                    let Some(r) = self.rooms.get(room) else {
                        continue;
                    };
                    let pos = r.tracker.resume_from();
                    let online = r.online;
                    self.shared.set_position(room, pos.clone());
                    self.emit(Event::Joined {
                        room: room.to_owned(),
                        epoch: pos.map(|p| p.epoch).unwrap_or_default(),
                        seq,
                        recovered: false,
                        resumed: true,
                        online,
                    });
                }
                Effect::Rejoin => {
                    warn!(%room, "livepush: history changed under the subscription; rejoining");
                    match s.link {
                        Link::Ws => self.queue_join(s, room),
                        // The next poll attaches the room at its position again.
                        Link::Longpoll => {}
                        Link::Sse => s.reopen = true,
                    }
                }
            }
        }
    }
}

/// What a `joined` frame is to the room it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JoinedKind {
    /// The answer to a join (WebSocket: the `join` in flight; SSE: the stream's join of the
    /// room; long-poll: the poll's attach, which is every `joined` a poll answer holds).
    Answer,
    /// Pushed by the server for a room that is live and has no join in flight: the room's
    /// history was replaced (contract v1.1, decision 8).
    Pushed,
    /// Without `id` while a join is in flight (its answer settles the position), or for a
    /// room that is not live: nothing to act on.
    Ignored,
}

/// Tell a `joined` that answers a join from one the server pushed. Over long-polling every
/// `joined` answers the attach of the poll that carried the room (a history replaced while a
/// poll is parked comes as the usual `joined{recovered:false}`, which the tracker's replay
/// rules end at the new epoch); over WebSocket and SSE a `joined` without an `id` for a room
/// that is live and has no join in flight was pushed.
fn joined_kind(link: Link, id: Option<u64>, r: &Room) -> JoinedKind {
    match (link, id) {
        (Link::Longpoll, _) | (_, Some(_)) => JoinedKind::Answer,
        (Link::Ws, None) if r.join_id.is_some() => JoinedKind::Ignored,
        (Link::Ws | Link::Sse, None) if r.tracker.is_live() => JoinedKind::Pushed,
        (Link::Sse, None) => JoinedKind::Answer,
        (Link::Ws, None) => JoinedKind::Ignored,
    }
}

/// Resolves when the application's channel has room again (`false`: it is closed).
async fn has_room(tx: &mpsc::Sender<Event>) -> bool {
    // The permit is dropped at once: `Outbox::flush` then fills the slot it freed (the task
    // is the only sender).
    tx.reserve().await.is_ok()
}

/// Open the WebSocket, send `connect` and wait for `connected`.
async fn handshake(
    url: url::Url,
    token: Option<String>,
    client_name: String,
) -> Result<Handshake, ConnectError> {
    let (mut ws, _response) =
        tokio_tungstenite::connect_async_with_config(url.as_str(), None, true)
            .await
            .map_err(|e| match wire::ws_refusal(&e) {
                Some(why) => ConnectError::WsRefused(why),
                None => ConnectError::Failed(e.to_string()),
            })?;
    let connect = ClientEnvelope::new(ClientFrame::Connect {
        token,
        client: Some(client_name),
    });
    ws.send(WsMessage::text(connect.to_json()))
        .await
        .map_err(|e| ConnectError::Failed(e.to_string()))?;
    loop {
        let msg = match ws.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(ConnectError::Failed(e.to_string())),
            None => return Err(ConnectError::Failed("closed before connected".to_owned())),
        };
        let text = match msg {
            WsMessage::Text(t) => t,
            WsMessage::Close(f) => {
                let why = f.map(|f| format!("{}: {}", f.code, f.reason));
                return Err(ConnectError::Failed(format!(
                    "closed before connected ({})",
                    why.unwrap_or_default()
                )));
            }
            _ => continue,
        };
        let mut lines = split_frames(text.as_str());
        while let Some(line) = lines.next() {
            let frame = match ServerFrame::parse(line) {
                Ok(f) => f,
                Err(e) => {
                    warn!(error = %e, frame = %truncate(line), "livepush: unreadable frame skipped");
                    continue;
                }
            };
            match frame {
                ServerFrame::Connected {
                    terminal,
                    transport,
                    heartbeat_ms,
                    inbox,
                    wake_key,
                    ..
                } => {
                    return Ok(Handshake {
                        ws,
                        terminal,
                        transport,
                        heartbeat_ms,
                        inbox,
                        wake_key,
                        leftover: lines.map(str::to_owned).collect(),
                    });
                }
                ServerFrame::Error { code, message, .. } => {
                    return Err(match code {
                        ErrorCode::Unauthorized | ErrorCode::Forbidden => {
                            ConnectError::Auth { code, message }
                        }
                        _ => ConnectError::Refused { code, message },
                    });
                }
                ServerFrame::Transport {
                    retry_ws_after_ms, ..
                } => {
                    return Err(ConnectError::TransportSwitch {
                        retry_ws_after: Duration::from_millis(retry_ws_after_ms),
                    });
                }
                other => debug!(?other, "livepush: frame before connected ignored"),
            }
        }
    }
}

/// Send a close frame and wait briefly for the server's.
async fn close_cleanly(ws: &mut Ws, write_timeout: Duration) {
    if timeout(write_timeout, ws.close(None)).await.is_err() {
        return;
    }
    let _ = timeout(CLOSE_LINGER, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

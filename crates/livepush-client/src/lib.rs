//! Rust client SDK for livepush, the real-time push gateway for live-streaming rooms.
//!
//! [`Client::connect`] starts a background task that holds one session to the server (over
//! WebSocket, long-polling or Server-Sent Events, see below) and returns at once with a cheap
//! [`Client`] handle and the [`Events`] stream. The task:
//!
//! - joins every room registered with [`Client::join`], and re-joins each one after every
//!   reconnect with `since` = the last reliable message it handed to the event stream, so the
//!   server replays what was missed;
//! - delivers each reliable message of a room exactly once and in `seq` order, whatever the
//!   server sends (duplicates from a replay, a gap while connected, which it fills with a
//!   `pull`, a `prompt` to pull a replay that did not fit), and whatever transport it uses:
//!   one event stream and one position per room across transport switches;
//! - never asks twice for what the server no longer has: a resume the server answers with
//!   `recovered: false` moves the position past what is gone ([`Event::Lost`]), and when the
//!   server's history changes under a live room (a new history pushed after its store lost
//!   the room's, or a pull that finds the server behind the position) the client follows it
//!   without a rejoin and reports it as [`Event::Joined`] with `recovered: false`;
//! - watches the connection: any incoming traffic (frames, and the server's WebSocket pings)
//!   resets an idle timer; when it expires the client probes with `{"op":"ping"}`, and a
//!   connection that stays silent for [`ClientConfig::ping_timeout`] after that is dropped;
//! - reconnects with exponential back-off and full jitter
//!   (`random(0, min(backoff_max, backoff_base * 2^attempt))`), reset after each successful
//!   connect.
//!
//! ```no_run
//! use livepush_client::{Client, ClientConfig, Event};
//!
//! # async fn demo() -> Result<(), livepush_client::ClientError> {
//! let (client, mut events) = Client::connect(ClientConfig {
//!     server: "http://127.0.0.1:8080".into(),
//!     token: Some("eyJhbGciOi...".into()),
//!     ..ClientConfig::default()
//! })?;
//! client.join("live:42", None).await?;
//! while let Some(event) = events.recv().await {
//!     match event {
//!         Event::Message(m) => println!("{} #{} {}: {}", m.room, m.seq, m.ty, m.data),
//!         Event::Transient(m) => println!("{} {}: {}", m.room, m.ty, m.data),
//!         Event::Joined { room, recovered: false, .. } => println!("{room}: messages were lost"),
//!         Event::Disconnected { reason, retry_in } => println!("{reason}, retry in {retry_in:?}"),
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Transports
//!
//! [`ClientConfig::transport`] picks them ([`TransportMode`]). In the default
//! [`TransportMode::Auto`] the client tries WebSocket; when the upgrade is refused at the
//! HTTP level (a server or proxy answering `400`/`404`/`426`…, or stripping the upgrade) it
//! continues on long-polling and tries WebSocket again after [`ClientConfig::ws_retry_after`];
//! when the server answers `connect` with `{"op":"transport","use":"longpoll",
//! "retry_ws_after_ms":X}` (a terminal whose WebSocket keeps breaking) it long-polls and
//! tries WebSocket again after `X`. The attempt to return to WebSocket runs while the polls
//! go on; only once the server has said `connected` on the WebSocket are the polls stopped.
//! Each session start, including every switch, is reported as [`Event::Connected`] with the
//! transport in use. Switching never loses or doubles a reliable message: every transport
//! resumes each room from the position of the last message handed to the application.
//!
//! Long-polling (`POST /v1/poll`) keeps one poll parked at the server (`wait_ms` =
//! [`ClientConfig::poll_wait`]); each poll carries every room with its position, so the
//! server's answer holds exactly what is new. A command ([`Client::send`],
//! [`Client::ack_inbox`], [`Client::leave`], or a [`Client::join`] of a room the parked poll
//! does not carry) does not wait for the parked poll: it goes out at once in a second, short
//! poll (`wait_ms: 0`) that carries the ops and the rooms they need, while the parked poll
//! stays in place. (A transient message published during the few milliseconds that short
//! poll is attached to a room the parked poll also carries can therefore arrive twice;
//! reliable messages never do.) The watchdog of a poll is its HTTP timeout, `poll_wait` +
//! [`ClientConfig::connect_timeout`]. A `prompt` needs no `pull`: the next poll replays from
//! the updated position. Every answer says where the inbox stands ([`Client::inbox`]).
//! [`Client::close`] ends a long-poll session with a `"bye":true` poll, so the server shows
//! the terminal offline at once rather than after its poll grace period.
//!
//! Server-Sent Events (`GET /v1/sse`, [`TransportMode::Sse`]) are receive-only:
//! [`Client::send`] and [`Client::ack_inbox`] fail with [`ClientError::Unsupported`]. The
//! stream names its rooms, so joining or leaving a room reopens it; a stream the server ends
//! after a `prompt`, or a gap the client cannot `pull`, reopens it too, from the positions
//! of the last delivered messages (sent as `since` and as `Last-Event-ID`).

//!
//! # Terminals that sleep
//!
//! [`WakeAgent`] runs a terminal that holds no connection while idle, only a UDP socket that
//! sends signed keepalives; a wake datagram from the server makes it connect briefly (with a
//! [`Client`]), take and acknowledge its inbox (the `connected` frame's `pending` count says
//! when there is nothing left to take), and leave again. See the [`WakeAgent`]
//! documentation for its states.

#![forbid(unsafe_code)]

mod agent;
mod backoff;
mod config;
mod connection;
mod skipped;
mod tracker;
mod wire;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use agent::{
    AgentError, AgentEvent, AgentEvents, AgentState, AgentStats, ConnectReason, IgnoreReason,
    WakeAgent, WakeAgentConfig, WakeCredentials,
};
pub use backoff::{Backoff, jitter};
pub use config::{ClientConfig, DEFAULT_CLIENT_NAME, TransportMode};
pub use livepush_proto::{ErrorCode, InboxPosition, Message, Position, Transport};
pub use tracker::{Effect, RoomMessage, RoomTracker};

/// Errors of the [`Client`] API. Connection problems are not errors of the API: the client
/// reconnects on its own and reports them as [`Event`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// [`ClientConfig::server`] is not a usable URL.
    #[error("invalid server URL {0}")]
    InvalidUrl(String),
    /// A room id does not match `[A-Za-z0-9_.:-]{1,128}`.
    #[error("{0}")]
    InvalidRoom(String),
    /// A `since` epoch does not match `[A-Za-z0-9_-]{1,64}`.
    #[error("{0}")]
    InvalidEpoch(String),
    /// A message type is not a valid type name.
    #[error("{0}")]
    InvalidType(String),
    /// The message data could not be encoded as JSON.
    #[error("invalid message data: {0}")]
    InvalidData(String),
    /// [`Client::connect`] was called outside a Tokio runtime.
    #[error("livepush client needs a Tokio runtime")]
    NoRuntime,
    /// The operation needs a live connection and there is none right now (it is not queued).
    #[error("not connected")]
    NotConnected,
    /// The operation is not possible over the configured transport (sending or acking over
    /// Server-Sent Events, which are receive-only).
    #[error("{0}")]
    Unsupported(String),
    /// The client was closed.
    #[error("client closed")]
    Closed,
}

/// Why a connection ended. The client reconnects after every one of them (unless closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// No traffic for the idle timeout, then none for the ping timeout after a probe.
    HeartbeatTimeout,
    /// The server closed the WebSocket with a close frame.
    ServerClosed { code: Option<u16>, reason: String },
    /// The connection broke (TCP reset or end without a close frame, read or write error,
    /// write timeout).
    ConnectionLost(String),
    /// The server asked this terminal to use long-polling for a while. In
    /// [`TransportMode::Auto`] the client continues on long-polling at once and retries
    /// WebSocket after the given delay; in [`TransportMode::WebSocket`] it waits that long.
    TransportSwitch { retry_ws_after: Duration },
    /// A long-poll or SSE request was answered with an HTTP error status (`401` also comes
    /// as [`Event::Error`] with `unauthorized`).
    HttpStatus { status: u16, message: String },
}

impl std::fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DisconnectReason::HeartbeatTimeout => f.write_str("heartbeat timeout"),
            DisconnectReason::ServerClosed { code, reason } => {
                write!(f, "closed by the server (code {code:?}, {reason:?})")
            }
            DisconnectReason::ConnectionLost(why) => write!(f, "connection lost: {why}"),
            DisconnectReason::TransportSwitch { retry_ws_after } => {
                write!(
                    f,
                    "server asked for long-poll, WebSocket again in {retry_ws_after:?}"
                )
            }
            DisconnectReason::HttpStatus { status, message } => {
                write!(f, "HTTP {status}: {message}")
            }
        }
    }
}

/// A direct message from the terminal's inbox. Acknowledge it with [`Client::ack_inbox`].
#[derive(Debug, Clone, PartialEq)]
pub struct InboxMessage {
    pub seq: u64,
    pub ty: String,
    pub data: serde_json::Value,
    pub ts: u64,
}

/// What the client reports to the application, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A session is established (after the first connect and after every reconnect), over
    /// `transport`. Also after every transport switch: a move from long-polling back to
    /// WebSocket (and an SSE stream reopened by the client) is seamless and comes without a
    /// [`Event::Disconnected`] before it.
    Connected {
        terminal: String,
        transport: Transport,
    },
    /// The session ended; the next attempt starts in `retry_in`.
    Disconnected {
        reason: DisconnectReason,
        retry_in: Duration,
    },
    /// The server confirmed a join (again after every reconnect). `resumed`: the join carried
    /// a `since` position. Over long-polling a complete resume is confirmed by the server
    /// without a `joined` frame; the client then reports it once per session with
    /// `recovered: true`, `seq` = the resume position and `online` = the count if the same
    /// answer carried one, else 0 (unknown; an [`Event::Online`] follows).
    ///
    /// `recovered: false`: messages after that position were lost (history window exceeded,
    /// or the room's history changed: then `epoch` is new and the room's position restarts
    /// in it); the replay that follows holds what is still kept, and [`Event::Lost`] names
    /// the seqs skipped. The client does not ask again for what is gone: its position moves
    /// past it (with the replay, or to `seq` when nothing is replayed).
    ///
    /// Show a reload hint on `recovered: false`. It also comes without a join of the
    /// application's, with `resumed: true`, when the server's history changed under a room
    /// that is live (contract v1.1):
    /// - the server pushed a new history (its store lost the room's, decision 8): the
    ///   position becomes `(epoch, seq)` and the room continues live from there, with no
    ///   replay and no rejoin;
    /// - a pull found the server's history ending at `seq`, before the position (it lost
    ///   messages it had delivered, decision 7): the position moves back to `seq`, so the
    ///   seqs after it will be new messages.
    Joined {
        room: String,
        epoch: String,
        /// The room's latest seq when it was joined (after a history change without a join:
        /// where the room continues from).
        seq: u64,
        recovered: bool,
        resumed: bool,
        /// Terminals in the room.
        online: u64,
    },
    /// A reliable message: each `seq` of a room exactly once, in increasing order.
    Message(RoomMessage),
    /// A transient message (chat, entry notice): live only, may be dropped, never replayed.
    Transient(Message),
    /// The number of terminals in a room changed.
    Online { room: String, count: u64 },
    /// Reliable seqs `first..=last` of the room's current epoch are no longer kept by the
    /// server and will never be delivered.
    Lost { room: String, first: u64, last: u64 },
    /// The server took the terminal out of the room (the room was closed). The client will
    /// not rejoin it; call [`Client::join`] again to do so. Not sent for [`Client::leave`].
    Left { room: String },
    /// A direct message for this terminal.
    Inbox(InboxMessage),
    /// The server refused something. `room` names the room of the refused request when known.
    /// A refused `connect` (`unauthorized`, `forbidden`) comes here too; see
    /// [`ClientConfig::auth_failure_limit`]. A join refused with `room_closed`, `forbidden`,
    /// `bad_frame`, `too_large` or `unauthorized` unregisters the room (it is not retried);
    /// one refused with `rate_limited` or `internal` is retried with back-off.
    ///
    /// Also reports, with `bad_frame` and a message ending in "skipped", a message whose
    /// `data` could not be decoded (nested deeper than serde_json reads): it comes where the
    /// message would have been delivered, and the message's seq counts as handled (no gap,
    /// not asked for again).
    Error {
        code: ErrorCode,
        message: String,
        room: Option<String>,
    },
}

#[derive(Debug)]
pub(crate) enum Command {
    Join {
        room: String,
        since: Option<Position>,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    Leave {
        room: String,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    Send {
        room: String,
        ty: String,
        data: Box<serde_json::value::RawValue>,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    Ack {
        inbox: u64,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    SetToken {
        token: Option<String>,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    Close {
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
}

/// State shared between the handles and the connection task.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Per room: the position the client resumes from.
    positions: Mutex<HashMap<String, Position>>,
    /// The transport of the current session: 0 none, then [`transport_code`].
    transport: AtomicU8,
    /// What the server said in the last `connected` frame.
    session: Mutex<Option<SessionInfo>>,
    /// The inbox position the server reported last (`connected`, long-poll answers).
    inbox: Mutex<Option<InboxPosition>>,
}

/// What the server said in its last `connected` frame (see [`Client::session`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The terminal id (the token's `sub`).
    pub terminal: String,
    pub transport: Transport,
    /// The inbox position at connect: `seq` = the newest inbox message, `acked` = the
    /// acknowledged position, `pending` = how many unacknowledged messages the server still
    /// keeps (they follow the `connected` frame; fewer than `seq - acked` when some expired
    /// or were dropped, and 0 when there is nothing to take: contract v1.1, decision 6).
    /// [`Client::inbox`] has the latest position.
    pub inbox: InboxPosition,
    /// The terminal's wake key (standard base64) for UDP wake-up keepalives (see
    /// [`WakeAgent`]); empty if the server sent none.
    pub wake_key: String,
}

fn transport_code(t: Option<Transport>) -> u8 {
    match t {
        None => 0,
        Some(Transport::Ws) => 1,
        Some(Transport::Longpoll) => 2,
        Some(Transport::Sse) => 3,
    }
}

impl Shared {
    pub(crate) fn set_position(&self, room: &str, pos: Option<Position>) {
        let mut map = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        match pos {
            Some(p) => {
                map.insert(room.to_owned(), p);
            }
            None => {
                map.remove(room);
            }
        }
    }

    pub(crate) fn set_session(&self, info: SessionInfo) {
        self.set_inbox(info.inbox);
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(info);
    }

    pub(crate) fn set_inbox(&self, inbox: InboxPosition) {
        *self.inbox.lock().unwrap_or_else(|e| e.into_inner()) = Some(inbox);
    }

    pub(crate) fn set_transport(&self, t: Option<Transport>) {
        self.transport.store(transport_code(t), Ordering::Relaxed);
    }
}

/// A handle to the client. Cheap to clone; every clone drives the same connection. The
/// connection task ends when [`close`](Client::close) is called or every handle is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    cmds: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    mode: TransportMode,
}

impl Client {
    /// Validate `config`, start the connection task and return at once. Must be called
    /// inside a Tokio runtime. Connection progress arrives as [`Event`]s.
    pub fn connect(config: ClientConfig) -> Result<(Client, Events), ClientError> {
        let urls = connection::Urls {
            ws: config.ws_url()?,
            poll: config.poll_url()?,
            sse: config.sse_url()?,
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ClientError::NoRuntime)?;
        let (cmd_tx, cmd_rx) = mpsc::channel(config.command_capacity.max(1));
        let (ev_tx, ev_rx) = mpsc::channel(config.event_capacity.max(1));
        let shared = Arc::new(Shared::default());
        let mode = config.transport;
        let worker = connection::Worker::new(config, urls, cmd_rx, ev_tx, Arc::clone(&shared));
        runtime.spawn(worker.run());
        Ok((
            Client {
                cmds: cmd_tx,
                shared,
                mode,
            },
            EventStream::new(ev_rx),
        ))
    }

    async fn request<F>(&self, make: F) -> Result<(), ClientError>
    where
        F: FnOnce(oneshot::Sender<Result<(), ClientError>>) -> Command,
    {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(make(tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Follow `room`. Registered at once, even while disconnected; the room is joined now if
    /// connected and on every (re)connect, and [`Event::Joined`] confirms each join.
    /// `since` resumes from a position persisted earlier (see [`RoomMessage::position`]);
    /// `None` starts at the live edge. Joining a room that is already registered does nothing.
    pub async fn join(&self, room: &str, since: Option<Position>) -> Result<(), ClientError> {
        livepush_proto::validate_room(room).map_err(|e| ClientError::InvalidRoom(e.to_string()))?;
        if let Some(p) = &since {
            livepush_proto::validate_epoch(&p.epoch)
                .map_err(|e| ClientError::InvalidEpoch(e.to_string()))?;
        }
        let room = room.to_owned();
        self.request(|reply| Command::Join { room, since, reply })
            .await
    }

    /// Stop following `room` (sends `leave` when connected). Leaving a room that is not
    /// registered does nothing.
    pub async fn leave(&self, room: &str) -> Result<(), ClientError> {
        livepush_proto::validate_room(room).map_err(|e| ClientError::InvalidRoom(e.to_string()))?;
        let room = room.to_owned();
        self.request(|reply| Command::Leave { room, reply }).await
    }

    /// Send a transient message (chat) to `room`. Returns once the frame is written (over
    /// long-polling: once the poll that carried it was answered); a refusal by the server
    /// (`muted`, `forbidden`, `rate_limited`, …) arrives as [`Event::Error`] with the room.
    /// Fails with [`ClientError::NotConnected`] while disconnected: chat is not queued; and
    /// with [`ClientError::Unsupported`] over [`TransportMode::Sse`].
    pub async fn send(
        &self,
        room: &str,
        ty: &str,
        data: serde_json::Value,
    ) -> Result<(), ClientError> {
        self.can_send("send")?;
        livepush_proto::validate_room(room).map_err(|e| ClientError::InvalidRoom(e.to_string()))?;
        livepush_proto::validate_type(ty).map_err(|e| ClientError::InvalidType(e.to_string()))?;
        let data = serde_json::value::to_raw_value(&data)
            .map_err(|e| ClientError::InvalidData(e.to_string()))?;
        let (room, ty) = (room.to_owned(), ty.to_owned());
        self.request(|reply| Command::Send {
            room,
            ty,
            data,
            reply,
        })
        .await
    }

    /// Acknowledge inbox messages up to `seq`. Fails with [`ClientError::NotConnected`]
    /// while disconnected (unacked messages are delivered again on the next connect), and
    /// with [`ClientError::Unsupported`] over [`TransportMode::Sse`].
    pub async fn ack_inbox(&self, seq: u64) -> Result<(), ClientError> {
        self.can_send("ack")?;
        self.request(|reply| Command::Ack { inbox: seq, reply })
            .await
    }

    fn can_send(&self, what: &str) -> Result<(), ClientError> {
        if self.mode == TransportMode::Sse {
            return Err(ClientError::Unsupported(format!(
                "{what} is not possible over Server-Sent Events, which are receive-only"
            )));
        }
        Ok(())
    }

    /// Replace the token used by the next connects. When the client is waiting to
    /// reconnect, or has stopped after [`ClientConfig::auth_failure_limit`] refused
    /// connects, it connects again at once. A live session is not interrupted.
    pub async fn set_token(&self, token: Option<String>) -> Result<(), ClientError> {
        self.request(|reply| Command::SetToken { token, reply })
            .await
    }

    /// The position `room` resumes from: the epoch and the seq of the last reliable message
    /// handed to the event stream (or the join position). `None` for an unknown room or
    /// before the first `joined` of a join without `since`.
    pub fn position(&self, room: &str) -> Option<Position> {
        let map = self
            .shared
            .positions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.get(room).cloned()
    }

    /// What the server said in the last `connected` frame (kept after the session ends):
    /// the terminal id, the inbox position at that connect, and the terminal's wake key.
    /// `None` before the first session. Read it on [`Event::Connected`]: it is updated just
    /// before that event is queued.
    pub fn session(&self) -> Option<SessionInfo> {
        self.shared
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Where the terminal's inbox stands, as the server said last: the `connected` frame's
    /// position, then, over long-polling, the `inbox` block of every poll answer (a terminal
    /// that has acknowledged everything it was sent sees `pending: 0` there). WebSocket and
    /// SSE sessions report it only at connect. `None` before the first session (or from a
    /// server that reports none). Kept after the session ends.
    pub fn inbox(&self) -> Option<InboxPosition> {
        *self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a session is established right now.
    pub fn is_connected(&self) -> bool {
        self.transport().is_some()
    }

    /// The transport of the current session; `None` while there is none.
    pub fn transport(&self) -> Option<Transport> {
        match self.shared.transport.load(Ordering::Relaxed) {
            1 => Some(Transport::Ws),
            2 => Some(Transport::Longpoll),
            3 => Some(Transport::Sse),
            _ => None,
        }
    }

    /// Close the connection cleanly and stop the task, for every handle; returns once the
    /// session has ended. Over WebSocket: a close frame, which the server does not count as
    /// an interruption, and a short wait for the server's (at most
    /// [`ClientConfig::write_timeout`] + 1 s). Over long-polling: the parked poll is dropped
    /// and one last poll says `"bye":true` (contract v1.1, decision 5), carrying the queued
    /// ops (an [`ack_inbox`](Client::ack_inbox) among them) and every followed room; the
    /// server takes the terminal out of its rooms and shows it offline at once instead of
    /// after its poll grace period. Its answer is awaited for at most 2 s. Over SSE the
    /// stream just stops. Events already queued stay readable; then the stream ends.
    ///
    /// Dropping every handle closes the client the same way, in the background.
    pub async fn close(self) {
        let _ = self.request(|reply| Command::Close { reply }).await;
    }
}

/// The stream of [`Event`]s. Read it promptly: when [`ClientConfig::event_capacity`] events
/// are waiting, the client stops reading the socket. Also a [`futures_util::Stream`]. `None`
/// once the client is closed (or every handle dropped) and every queued event has been read.
pub type Events = EventStream<Event>;

/// A stream of events from a [`Client`] or a [`WakeAgent`](agent::WakeAgent): read it with
/// [`recv`](EventStream::recv), or as a [`futures_util::Stream`].
#[derive(Debug)]
pub struct EventStream<T> {
    rx: mpsc::Receiver<T>,
}

impl<T> EventStream<T> {
    pub(crate) fn new(rx: mpsc::Receiver<T>) -> EventStream<T> {
        EventStream { rx }
    }

    /// The next event; `None` once its source has stopped and every event was read.
    pub async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<T> {
        self.rx.try_recv().ok()
    }
}

impl<T> futures_util::Stream for EventStream<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.rx.poll_recv(cx)
    }
}

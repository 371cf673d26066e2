//! A terminal's session: its lifecycle, what it may do, and what each client frame does.
//!
//! This is the one place where client frames turn into hub operations, and the one place a
//! session opens and ends. Transports only move bytes: they identify the terminal with
//! [`crate::transport::authenticate`], [`start`](Session::start) a session (which counts it on the
//! service list and in the connection metrics), feed text to [`Session::handle_text`], write
//! out what the session's [`Outbox`] holds, and [`end`](Session::end) it saying how it ended
//! (leaving its rooms, detaching its inbox, and counting it offline, in that order: a terminal
//! seen offline has no live session anywhere). A long-poll session is one poll: when it ends,
//! its terminal lingers in its rooms' online counts for the poll grace period, unless it
//! said `bye`.

use std::sync::Arc;

use futures_util::FutureExt;
use governor::RateLimiter;
use governor::clock::MonotonicClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use livepush_proto::{
    Class, ClientEnvelope, ClientFrame, ErrorCode, FrameError, InboxPosition, Position,
    ServerFrame, Transport, split_frames,
};
use serde_json::value::RawValue;

use crate::app::App;
use crate::auth::Terminal;
use crate::clock::now_ms;
use crate::hooks::connect::Admitted;
use crate::hooks::{SendHook, Verdict};
use crate::hub::{Announce, JoinError, Member, Room};
use crate::inbox::Inbox;
use crate::metrics::{ReasonLabel, TransportLabel};
use crate::outbox::{CloseReason, ConnId, Outbox, OutboxLimits};

/// How a session ended. Interruptions (a WebSocket without a close frame from the client)
/// feed the flapping detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client closed (a WebSocket close frame, an SSE stream it dropped).
    ClientClose,
    /// The TCP connection ended or failed without a close frame.
    Reset,
    HeartbeatTimeout,
    SlowConsumer,
    Unauthorized,
    TooLarge,
    /// The client broke RFC 6455 (unmasked frame, bad opcode, invalid UTF-8, ...).
    ProtocolError,
    Shutdown,
    /// Told to use long-polling (a flapping terminal).
    MovedToLongpoll,
    /// A poll was answered (or its client went away): the terminal lingers for the grace.
    Answered,
    /// A poll said `bye`: the terminal leaves at once.
    Bye,
    /// A poll that began before its terminal's `bye` ended: no grace period either (the
    /// `bye` is not repeated).
    AfterBye,
    /// An SSE stream ended after a `prompt` (the client cannot pull; it reconnects).
    Prompted,
    /// Refused: the terminal already held `max_sessions_per_terminal` sessions.
    TooManySessions,
}

impl Ending {
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::ClientClose => "client_close",
            Ending::Reset => "reset",
            Ending::HeartbeatTimeout => "heartbeat_timeout",
            Ending::SlowConsumer => "slow_consumer",
            Ending::Unauthorized => "unauthorized",
            Ending::TooLarge => "too_large",
            Ending::ProtocolError => "protocol_error",
            Ending::Shutdown => "shutdown",
            Ending::MovedToLongpoll => "moved_to_longpoll",
            Ending::Answered => "answered",
            Ending::Bye => "bye",
            Ending::AfterBye => "after_bye",
            Ending::Prompted => "prompted",
            Ending::TooManySessions => "too_many_sessions",
        }
    }

    /// Whether this ending is an interruption of the terminal: the connection ended without
    /// a close frame (TCP reset or end) or stopped answering. These feed the flap detector.
    pub fn is_interruption(self) -> bool {
        matches!(self, Ending::Reset | Ending::HeartbeatTimeout)
    }
}

fn label(transport: Transport) -> TransportLabel {
    TransportLabel {
        transport: transport.as_str(),
    }
}

/// A connection refused before it became a session (a failed WebSocket handshake): counted
/// like a session that opened and ended at once.
///
/// Logged in the connection's span ([`crate::logctx::conn_span`]), which says which one.
pub fn refused(app: &App, transport: Transport, ending: Ending) {
    app.metrics
        .connections_total
        .get_or_create(&label(transport))
        .inc();
    count_ending(app, ending);
    tracing::debug!(
        transport = label(transport).transport,
        ending = ending.as_str(),
        "connection refused"
    );
}

fn count_ending(app: &App, ending: Ending) {
    app.metrics
        .disconnects
        .get_or_create(&ReasonLabel {
            reason: ending.as_str(),
        })
        .inc();
}

/// A connection's frame-rate limiter. The std monotonic clock keeps it at 40 bytes (the
/// default quanta clock carries its calibration in every limiter: 72 bytes).
type FrameLimiter =
    RateLimiter<NotKeyed, InMemoryState, MonotonicClock, NoOpMiddleware<std::time::Instant>>;

/// One connected terminal.
///
/// Every open connection keeps one of these for its whole life, so it holds only what
/// differs per connection (the server's shared parts are one `Arc<App>`), and the joined
/// rooms are a plain list: a connection joins a handful of rooms at most.
#[derive(Debug)]
pub struct Session {
    app: Arc<App>,
    conn: ConnId,
    terminal: Terminal,
    outbox: Arc<Outbox>,
    /// The joined rooms: a boxed slice of exactly as many as there are (most connections
    /// join one room; a `Vec` would cost 8 bytes more in every connection).
    rooms: Box<[Arc<Room>]>,
    /// The terminal's inbox, once the session is open.
    inbox: Option<Arc<Inbox>>,
    frames: FrameLimiter,
    transport: Transport,
    /// [`Session::end`] ran.
    ended: bool,
    /// A join waits for its room to open in the background ([`Hub::adopt_later`]).
    joins_in_background: bool,
    /// In a frame-rate episode: a frame was refused and none accepted since. The episode's
    /// first refusal is answered with one `rate_limited`, the rest are dropped silently.
    throttled: bool,
    /// When the session's token stops being accepted (its `exp` plus the leeway), in Unix
    /// seconds; 0: never (a dev terminal without a token). 32 bits fit in the padding next
    /// to the flags, so the session does not grow.
    expires: u32,
}

impl Session {
    /// A session of `terminal` over `transport` begins: it is counted on the service list,
    /// in the connection metrics and against `max_sessions_per_terminal` until
    /// [`Session::end`]. Refused (nothing counted) when the terminal already holds that many.
    ///
    /// `conn`: the connection's id, from [`crate::hub::Hub::next_conn_id`] (taken when the
    /// request came in, so that its log lines carry it from the start).
    pub fn start(
        app: &Arc<App>,
        terminal: Terminal,
        transport: Transport,
        conn: ConnId,
    ) -> Result<Session, TooManySessions> {
        if !app.limiters.sessions.take(&terminal.id) {
            return Err(TooManySessions(app.limiters.sessions.max()));
        }
        let limits = &app.config.limits;
        let outbox = Arc::new(Outbox::new(
            OutboxLimits {
                soft_frames: limits.outbox_frames,
                hard_bytes: limits.outbox_max_bytes,
            },
            app.metrics.outbox.clone(),
        ));
        let frames = RateLimiter::direct_with_clock(app.limiters.frame_quota, MonotonicClock);
        let l = label(transport);
        app.metrics.connections_total.get_or_create(&l).inc();
        app.metrics.connections_open.get_or_create(&l).inc();
        app.terminals.opened(&terminal.id, transport);
        tracing::debug!(conn, terminal = &*terminal.id, "session started");
        Ok(Session {
            conn,
            app: app.clone(),
            terminal,
            outbox,
            rooms: Box::default(),
            inbox: None,
            frames,
            transport,
            ended: false,
            joins_in_background: false,
            throttled: false,
            expires: 0,
        })
    }

    /// The session lives as long as `token` (the one [`crate::auth::identify`] accepted for
    /// it): once its `exp` plus the verification leeway has passed, the transport ends the
    /// session ([`Session::expired`]) and the client reconnects with a fresh token.
    ///
    /// `admitted`: a terminal admitted without a token (the connect hook): its `expires`
    /// plays the token's `exp`, without the leeway (it was computed by this server's clock).
    pub fn expires_with(&mut self, token: Option<&str>, admitted: &Admitted) {
        let token_exp = token.filter(|t| !t.is_empty()).and_then(token_exp);
        self.expires = token_exp
            .map(|exp| exp.saturating_add(TOKEN_LEEWAY_SECS))
            .or(admitted.expires)
            .map_or(0, |exp| u32::try_from(exp).unwrap_or(u32::MAX));
    }

    /// When the token expires, in Unix seconds, if it does.
    pub fn expires_at(&self) -> Option<u64> {
        (self.expires != 0).then_some(u64::from(self.expires))
    }

    /// How long until the token has expired (rounded up to the next second), if it does.
    pub fn expires_in(&self) -> Option<std::time::Duration> {
        let now = crate::clock::now_secs();
        self.expires_at()
            .map(|t| std::time::Duration::from_secs(t.saturating_sub(now) + 1))
    }

    /// Whether the token has expired at `now_secs`.
    pub fn expired(&self, now_secs: u64) -> bool {
        self.expires_at().is_some_and(|t| now_secs > t)
    }

    /// The session ends: it leaves its rooms (a long-poll session lingers in them for the
    /// poll grace period, unless it said `bye`), detaches from the inbox, and then its
    /// terminal is counted offline on this transport. Nothing reaches the session after
    /// this. Dropping a session ends it as [`Ending::Reset`] (long-poll: [`Ending::Answered`],
    /// SSE: [`Ending::ClientClose`]).
    pub fn end(&mut self, ending: Ending) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        // Whatever is still queued will not be written: free it, and let a join finishing in
        // the background see that the session is gone (before the rooms are counted).
        self.outbox.close(CloseReason::Shutdown);
        let mut rooms = std::mem::take(&mut self.rooms).into_vec();
        if self.joins_in_background {
            rooms.extend(self.app.hub.take_adoptions(self.conn));
        }
        let linger = self.transport == Transport::Longpoll
            && !matches!(ending, Ending::Bye | Ending::AfterBye);
        let until = now_ms() + self.app.config.poll_grace.as_millis() as u64;
        for r in rooms {
            r.leave_until(self.conn, linger.then_some(until));
        }
        if let Some(i) = self.inbox.take() {
            self.app.inboxes.detach(&i, self.conn);
        }
        self.app
            .terminals
            .closed(&self.terminal.id, self.transport, ending.is_interruption());
        self.app.limiters.sessions.give_back(&self.terminal.id);
        match ending {
            Ending::Bye => self.app.terminals.bye(&self.terminal.id),
            Ending::AfterBye => self.app.terminals.after_bye(&self.terminal.id),
            _ => {}
        }
        self.app
            .metrics
            .connections_open
            .get_or_create(&label(self.transport))
            .dec();
        count_ending(&self.app, ending);
        // With its ids as fields: an open WebSocket ends outside any span.
        tracing::debug!(
            conn = self.conn,
            terminal = &*self.terminal.id,
            transport = label(self.transport).transport,
            ending = ending.as_str(),
            "session ended"
        );
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    pub fn conn(&self) -> ConnId {
        self.conn
    }

    pub fn terminal(&self) -> &Terminal {
        &self.terminal
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    fn room_index(&self, room: &str) -> Option<usize> {
        self.rooms.iter().position(|r| &*r.id == room)
    }

    fn joined(&self, room: &str) -> Option<&Arc<Room>> {
        self.room_index(room).map(|i| &self.rooms[i])
    }

    fn forget_room(&mut self, room: &str) -> Option<Arc<Room>> {
        let i = self.room_index(room)?;
        let mut rooms = std::mem::take(&mut self.rooms).into_vec();
        let r = rooms.swap_remove(i);
        self.rooms = rooms.into_boxed_slice();
        Some(r)
    }

    /// Open the session: queue `connected` (when `greet`), then the inbox messages after
    /// `inbox_after` (default: the acknowledged position), and deliver later inbox messages
    /// live.
    pub async fn open(&mut self, id: Option<u64>, inbox_after: Option<u64>, greet: bool) {
        let inbox = match self.app.inboxes.get_shared(&self.terminal.id).await {
            Ok(i) => i,
            Err(e) => {
                self.error(internal(e, self.conn, &self.terminal.id).with_id(id));
                return;
            }
        };
        let terminal = self.terminal.id.to_string();
        let heartbeat_ms = self.app.config.heartbeat.as_millis() as u64;
        let wake_key = self.app.wake_keys.key(&terminal).to_base64();
        let transport = self.transport;
        let connected = move |inbox: InboxPosition| ServerFrame::Connected {
            id,
            terminal: terminal.clone(),
            transport,
            heartbeat_ms,
            inbox,
            wake_key: wake_key.clone(),
        };
        let greet: Option<&dyn Fn(InboxPosition) -> ServerFrame> =
            if greet { Some(&connected) } else { None };
        self.app
            .inboxes
            .attach(&inbox, self.conn, &self.outbox, inbox_after, greet);
        self.inbox = Some(inbox);
    }

    /// Load the terminal's inbox without opening it (nothing is delivered to the session),
    /// so that `ack` works: a `bye` poll acknowledges on its way out.
    pub async fn load_inbox(&mut self) {
        match self.app.inboxes.get_shared(&self.terminal.id).await {
            Ok(i) => self.inbox = Some(i),
            Err(e) => self.error(internal(e, self.conn, &self.terminal.id)),
        }
    }

    /// Handle one transport message: one or more frames, newline-separated.
    pub fn handle_text(&mut self, text: &str) {
        let max = self.app.config.limits.max_frame_bytes;
        if text.len() > max {
            self.error(FrameError::new(
                ErrorCode::TooLarge,
                format!(
                    "message of {} bytes exceeds max_frame_bytes {max}",
                    text.len()
                ),
            ));
            return;
        }
        for line in split_frames(text) {
            if !self.handle_frame(line) {
                return;
            }
        }
    }

    /// Handle exactly one frame (one JSON value, which may span lines: long-poll `ops`).
    /// Returns false when the frame rate limit refused it. One `rate_limited` answers a
    /// whole episode of refused frames (until a frame is accepted again): a client that
    /// floods is not answered with a flood.
    pub fn handle_frame(&mut self, text: &str) -> bool {
        if self.frames.check().is_err() {
            if !std::mem::replace(&mut self.throttled, true) {
                self.error(FrameError::new(
                    ErrorCode::RateLimited,
                    "too many frames; slow down (frames are dropped until the rate allows)",
                ));
            }
            return false;
        }
        self.throttled = false;
        match ClientEnvelope::parse_limited(text, self.app.config.limits.max_json_depth) {
            Ok(env) => self.handle(env),
            Err(e) => self.error(e),
        }
        true
    }

    /// Handle one parsed frame; replies and errors go to the outbox.
    pub fn handle(&mut self, env: ClientEnvelope) {
        let id = env.id;
        if let Err(e) = self.dispatch(env) {
            self.error(e.with_id(id));
        }
    }

    fn dispatch(&mut self, env: ClientEnvelope) -> Result<(), FrameError> {
        let id = env.id;
        if self.joins_in_background {
            self.adopt();
        }
        match env.frame {
            ClientFrame::Connect { .. } => Err(FrameError::bad_frame("already connected")),
            ClientFrame::Join { room, since } => self
                .join_now(&room, since.as_ref(), id, Announce::Always)
                .map_err(|e| e.with_room(&room)),
            ClientFrame::Leave { room } => {
                if let Some(r) = self.forget_room(&room) {
                    r.leave(self.conn);
                }
                self.outbox.reply(&ServerFrame::Left { id, room });
                Ok(())
            }
            ClientFrame::Pull { room, since, limit } => self
                .pull(&room, since, limit, id)
                .map_err(|e| e.with_room(&room)),
            ClientFrame::Send { room, ty, data } => self
                .send(&room, &ty, &data, id)
                .map_err(|e| e.with_room(&room)),
            ClientFrame::Ack { inbox } => {
                // Every transport opens (or, for a `bye` poll, loads) the inbox first.
                if let Some(i) = &self.inbox {
                    self.app.inboxes.ack(i, inbox);
                }
                Ok(())
            }
            ClientFrame::Ping => {
                self.outbox.reply(&ServerFrame::Pong { id });
                Ok(())
            }
        }
    }

    fn granted(&self, room: &str) -> Result<(), FrameError> {
        if self.terminal.grants.may_join(room) {
            Ok(())
        } else {
            Err(FrameError::new(
                ErrorCode::Forbidden,
                format!("the token does not grant room {room:?}"),
            ))
        }
    }

    /// Join a room, answering refusals with `error` frames (SSE, which has no ops).
    pub async fn join_room(&mut self, room: &str, since: Option<&Position>) {
        if let Err(e) = self.join(room, since, None, Announce::Always).await {
            self.error(e.with_room(room));
        }
    }

    /// Re-attach a long-poll terminal to a room at its position: a fresh join for `None`,
    /// and for a complete resume in the same epoch only the messages after it (no `joined`).
    pub async fn attach(&mut self, room: &str, since: Option<&Position>) {
        let joined = match livepush_proto::validate_room(room) {
            Ok(()) => self.join(room, since, None, Announce::UnlessResumed).await,
            Err(e) => Err(FrameError::bad_frame(e.to_string())),
        };
        if let Err(e) = joined {
            self.error(e.with_room(room));
        }
    }

    /// Leave every room now; the names of the rooms left.
    pub fn leave_all(&mut self) -> Vec<String> {
        std::mem::take(&mut self.rooms)
            .into_vec()
            .into_iter()
            .map(|r| {
                r.leave(self.conn);
                r.id.to_string()
            })
            .collect()
    }

    /// Where the terminal's inbox stands, once the session has opened it.
    pub fn inbox_position(&self) -> Option<InboxPosition> {
        self.inbox.as_ref().map(|i| i.position())
    }

    /// Check a join before the room is needed: granted, and within the rooms limit.
    /// A room not open on this node costs memory (and with `--redis` a subscription) once a
    /// terminal uses it: a terminal may open at most `room_open_rate` a second (burst
    /// `room_open_burst`), or a `*` grant would let it fill the node with rooms.
    fn may_open(&self, room: &str) -> Result<(), FrameError> {
        if self.app.hub.open_room(room).is_some()
            || self
                .app
                .limiters
                .room_opens
                .check_key(&self.terminal.id)
                .is_ok()
        {
            return Ok(());
        }
        Err(FrameError::new(
            ErrorCode::RateLimited,
            format!("opening rooms too fast (room_open_rate); retry {room:?} later"),
        ))
    }

    fn may_join(&mut self, room: &str) -> Result<(), FrameError> {
        self.granted(room)?;
        let max = self.app.config.limits.max_rooms_per_connection;
        if self.joined(room).is_none() {
            // Rooms closed under us are no longer joined; do not count them.
            let conn = self.conn;
            if self.rooms.iter().any(|r| !r.is_member(conn)) {
                let mut rooms = std::mem::take(&mut self.rooms).into_vec();
                rooms.retain(|r| r.is_member(conn));
                self.rooms = rooms.into_boxed_slice();
            }
            if self.rooms.len() >= max {
                return Err(FrameError::new(
                    ErrorCode::Forbidden,
                    format!("at most {max} rooms per connection (max_rooms_per_connection)"),
                ));
            }
            self.may_open(room)?;
        }
        Ok(())
    }

    /// Join (transports that can wait for a room to open).
    async fn join(
        &mut self,
        room: &str,
        since: Option<&Position>,
        id: Option<u64>,
        announce: Announce,
    ) -> Result<(), FrameError> {
        self.may_join(room)?;
        loop {
            let r = self.app.hub.room(room).await;
            let r = r.map_err(|e| engine_error(e, self.conn, &self.terminal.id))?;
            match self.join_opened(r, since, id, announce) {
                // The hub closed that room object as idle meanwhile: it has a new one.
                Err(Retired) => continue,
                Err(Refused(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Join from a client frame, which is handled where waiting is not possible (inside the
    /// WebSocket reactor). A room already open here (always, on the single-node engine) is
    /// joined at once; otherwise it opens in the background, the join happens there (its
    /// `joined` and replay go to the outbox as usual), and the session takes the room at its
    /// next frame or at its end.
    fn join_now(
        &mut self,
        room: &str,
        since: Option<&Position>,
        id: Option<u64>,
        announce: Announce,
    ) -> Result<(), FrameError> {
        self.may_join(room)?;
        for _ in 0..2 {
            let Some(r) = self.app.hub.room(room).now_or_never() else {
                break;
            };
            let r = r.map_err(|e| internal(e, self.conn, &self.terminal.id))?;
            match self.join_opened(r, since, id, announce) {
                Err(Retired) => continue,
                Err(Refused(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
        self.joins_in_background = true;
        let hub = self.app.hub.clone();
        let conn = self.conn;
        let outbox = self.outbox.clone();
        let member = Member {
            terminal: self.terminal.id.clone(),
            outbox: outbox.clone(),
        };
        let since = since.cloned();
        let room = room.to_owned();
        tokio::spawn(async move {
            let refused = loop {
                match hub.room(&room).await {
                    Ok(r) => match r.join(conn, member.clone(), since.as_ref(), id, announce) {
                        Ok(_) => {
                            hub.adopt_later(conn, r, &outbox);
                            return;
                        }
                        Err(JoinError::Retired) => continue,
                        Err(JoinError::Closed) => {
                            break FrameError::new(
                                ErrorCode::RoomClosed,
                                format!("room {room:?} is closed"),
                            );
                        }
                    },
                    Err(e) => break engine_error(e, conn, &member.terminal),
                }
            };
            outbox.reply(&refused.with_id(id).with_room(&room).to_frame());
        });
        Ok(())
    }

    /// Take the rooms joined in the background.
    fn adopt(&mut self) {
        for r in self.app.hub.take_adoptions(self.conn) {
            if self.room_index(&r.id).is_none() {
                let mut rooms = std::mem::take(&mut self.rooms).into_vec();
                rooms.push(r);
                self.rooms = rooms.into_boxed_slice();
            }
        }
    }

    fn join_opened(
        &mut self,
        r: Arc<Room>,
        since: Option<&Position>,
        id: Option<u64>,
        announce: Announce,
    ) -> Result<(), JoinRefused> {
        let member = Member {
            terminal: self.terminal.id.clone(),
            outbox: self.outbox.clone(),
        };
        let room = r.id.clone();
        match r.join(self.conn, member, since, id, announce) {
            Ok(_) => {
                match self.room_index(&room) {
                    Some(i) => self.rooms[i] = r,
                    None => {
                        let mut rooms = std::mem::take(&mut self.rooms).into_vec();
                        rooms.reserve_exact(1);
                        rooms.push(r);
                        self.rooms = rooms.into_boxed_slice();
                    }
                }
                Ok(())
            }
            Err(JoinError::Closed) => {
                self.forget_room(&room);
                Err(Refused(FrameError::new(
                    ErrorCode::RoomClosed,
                    format!("room {room:?} is closed"),
                )))
            }
            Err(JoinError::Retired) => Err(Retired),
        }
    }

    fn pull(
        &mut self,
        room: &str,
        since: u64,
        limit: Option<u32>,
        id: Option<u64>,
    ) -> Result<(), FrameError> {
        self.granted(room)?;
        let cap = self.app.config.limits.max_pull;
        let limit = limit.unwrap_or(cap).min(cap) as usize;
        let r = match self.joined(room) {
            Some(r) => r.clone(),
            None => match self
                .may_open(room)
                .map(|()| self.app.hub.room(room).now_or_never())?
            {
                Some(r) => r.map_err(|e| internal(e, self.conn, &self.terminal.id))?,
                None => {
                    return Err(FrameError::new(
                        ErrorCode::Internal,
                        format!("room {room:?} is not ready yet; retry the pull"),
                    ));
                }
            },
        };
        // A pull answer takes at most a quarter of the outbox's byte budget; the caller
        // pages on from the last seq it got.
        let max_bytes = self.app.config.limits.outbox_max_bytes / 4;
        self.outbox.push(r.pulled(since, limit, max_bytes, id));
        Ok(())
    }

    fn send(
        &mut self,
        room: &str,
        ty: &str,
        data: &RawValue,
        id: Option<u64>,
    ) -> Result<(), FrameError> {
        if !self.terminal.grants.may_send() {
            return Err(FrameError::new(
                ErrorCode::Forbidden,
                "the token does not allow sending (claim `send`)",
            ));
        }
        let Some(r) = self.joined(room).filter(|r| r.is_member(self.conn)) else {
            return Err(FrameError::new(
                ErrorCode::Forbidden,
                format!("join room {room:?} before sending to it"),
            ));
        };
        if self.app.config.classes.class_of(ty) != Class::Transient {
            return Err(FrameError::new(
                ErrorCode::Forbidden,
                format!("terminals may only send transient types; {ty:?} is reliable"),
            ));
        }
        let max = self.app.config.limits.max_send_bytes;
        if data.get().len() > max {
            return Err(FrameError::new(
                ErrorCode::TooLarge,
                format!(
                    "`data` of {} bytes exceeds max_send_bytes {max}",
                    data.get().len()
                ),
            ));
        }
        if r.flags().muted {
            return Err(FrameError::new(
                ErrorCode::Muted,
                format!("room {room:?} is muted"),
            ));
        }
        if self.app.limiters.send.check_key(&self.terminal.id).is_err() {
            return Err(FrameError::new(
                ErrorCode::RateLimited,
                "sending too fast (send_rate)",
            ));
        }
        match &self.app.send_hook {
            None => {
                self.app.hub.send_transient(r, ty, data);
            }
            Some(hook) => self.send_through_hook(hook.clone(), r.clone(), ty, data, id),
        }
        Ok(())
    }

    /// The backend decides first (see [`crate::hooks`]), in a task of its own: the session,
    /// and every other room, go on meanwhile. A room muted while the hook ran gets nothing.
    fn send_through_hook(
        &self,
        hook: Arc<SendHook>,
        room: Arc<Room>,
        ty: &str,
        data: &RawValue,
        id: Option<u64>,
    ) {
        let (app, outbox) = (self.app.clone(), self.outbox.clone());
        let terminal = self.terminal.id.clone();
        let (ty, data) = (ty.to_owned(), data.to_owned());
        let limits = (
            app.config.limits.max_send_bytes,
            app.config.limits.max_json_depth,
        );
        tokio::spawn(async move {
            let refused = match hook.check(&terminal, &room.id, &ty, &data, limits).await {
                _ if room.flags().muted => {
                    FrameError::new(ErrorCode::Muted, format!("room {:?} is muted", &*room.id))
                }
                Verdict::Allow => {
                    app.hub.send_transient(&room, &ty, &data);
                    return;
                }
                Verdict::Rewrite(data) => {
                    app.hub.send_transient(&room, &ty, &data);
                    return;
                }
                Verdict::Reject(e) => e,
            };
            app.metrics.client_errors.inc();
            outbox.reply(&refused.with_id(id).with_room(&room.id).to_frame());
        });
    }

    /// Queue an `error` frame.
    pub fn error(&self, e: FrameError) {
        self.app.metrics.client_errors.inc();
        self.outbox.reply(&e.to_frame());
    }
}

/// The `exp` leeway of [`crate::auth::TokenKeys::verify`]: a token is accepted until
/// `exp + 5`.
const TOKEN_LEEWAY_SECS: u64 = 5;

/// The `exp` claim of a token that was verified already: read back from its payload, since
/// [`crate::auth::Terminal`] does not carry it.
fn token_exp(token: &str) -> Option<u64> {
    use base64::Engine;
    #[derive(serde::Deserialize)]
    struct Exp {
        exp: u64,
    }
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Exp>(&json).ok().map(|e| e.exp)
}

/// The `error` frame that ends a session whose token expired.
pub fn token_expired() -> FrameError {
    FrameError::new(
        ErrorCode::Unauthorized,
        "token expired; reconnect with a fresh token",
    )
}

/// A session refused because its terminal already holds `max_sessions_per_terminal` (the
/// number given) sessions.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("this terminal already holds {0} sessions (max_sessions_per_terminal); close one first")]
pub struct TooManySessions(pub usize);

impl From<TooManySessions> for crate::error::ApiError {
    fn from(e: TooManySessions) -> Self {
        crate::error::ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            e.to_string(),
        )
    }
}

/// Why [`Session::join_opened`] did not join.
enum JoinRefused {
    /// Answered to the client.
    Refused(FrameError),
    /// The room object was retired as idle: look the room up again.
    Retired,
}

use JoinRefused::{Refused, Retired};

/// An engine that cannot be reached is `unavailable` (retry later); anything else internal.
/// Logged with the connection (`conn`, `terminal`) it fails.
fn engine_error(e: crate::engine::EngineError, conn: ConnId, terminal: &str) -> FrameError {
    match e {
        crate::engine::EngineError::Unavailable(_) => {
            tracing::warn!(error = %e, conn, terminal, "engine unavailable");
            FrameError::new(
                ErrorCode::Unavailable,
                "the shared store is unreachable; retry later",
            )
        }
        other => internal(other, conn, terminal),
    }
}

fn internal(e: impl std::fmt::Display, conn: ConnId, terminal: &str) -> FrameError {
    tracing::error!(error = %e, conn, terminal, "internal error");
    FrameError::new(ErrorCode::Internal, "internal error; retry later")
}

impl Drop for Session {
    fn drop(&mut self) {
        let ending = match self.transport {
            Transport::Longpoll => Ending::Answered,
            Transport::Sse => Ending::ClientClose,
            Transport::Ws => Ending::Reset,
        };
        self.end(ending);
    }
}

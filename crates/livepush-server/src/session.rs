//! A terminal's session: what it may do and what each client frame does.
//!
//! This is the one place where client frames turn into hub operations. Transports only move
//! bytes: they authenticate the first frame with [`authenticate`], feed text to
//! [`Session::handle_text`], and write out what the session's [`Outbox`] holds.

use std::sync::Arc;

use governor::RateLimiter;
use governor::clock::MonotonicClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use livepush_proto::{
    Class, ClientEnvelope, ClientFrame, ErrorCode, FrameError, InboxPosition, Position,
    ServerFrame, Transport, split_frames,
};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::value::RawValue;

use crate::app::App;
use crate::auth::{AuthError, Grants, Terminal, TokenKeys};
use crate::hub::{Announce, Hub, JoinError, Member, Room};
use crate::inbox::Inbox;
use crate::outbox::{ConnId, Kind, Outbox, OutboxLimits};

/// Check a `connect` frame's token. Dev mode accepts no token and makes up a terminal id.
pub fn authenticate(
    keys: &TokenKeys,
    dev: bool,
    token: Option<&str>,
) -> Result<Terminal, FrameError> {
    match token.filter(|t| !t.is_empty()) {
        None if dev => {
            let id: String = rand::rng()
                .sample_iter(&Alphanumeric)
                .take(12)
                .map(char::from)
                .collect();
            Ok(Terminal {
                id: Arc::from(format!("anon-{id}")),
                grants: Grants::everything(),
            })
        }
        None => Err(FrameError::new(
            ErrorCode::Unauthorized,
            AuthError::Missing.to_string(),
        )),
        Some(t) => keys
            .verify(t)
            .map_err(|e| FrameError::new(ErrorCode::Unauthorized, e.to_string())),
    }
}

/// Dev mode only: take back the anonymous terminal id a client was given in `connected`
/// (long-poll and SSE reconnect as the same terminal).
pub fn dev_terminal(id: &str) -> Result<Terminal, String> {
    if id.is_empty() || id.len() > crate::auth::MAX_TERMINAL_LEN || id.chars().any(char::is_control)
    {
        return Err("`terminal` is not a valid terminal id".into());
    }
    Ok(Terminal {
        id: Arc::from(id),
        grants: Grants::everything(),
    })
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
    rooms: Vec<Arc<Room>>,
    /// The terminal's inbox, once the session is open.
    inbox: Option<Arc<Inbox>>,
    frames: FrameLimiter,
}

impl Session {
    pub fn new(app: &Arc<App>, terminal: Terminal) -> Session {
        let hub = &app.hub;
        let limits = &hub.config().limits;
        let outbox = Arc::new(Outbox::new(
            OutboxLimits {
                soft_frames: limits.outbox_frames,
                hard_bytes: limits.outbox_max_bytes,
            },
            hub.metrics().outbox.clone(),
        ));
        let frames = RateLimiter::direct_with_clock(app.limiters.frame_quota, MonotonicClock);
        Session {
            conn: hub.next_conn_id(),
            app: app.clone(),
            terminal,
            outbox,
            rooms: Vec::new(),
            inbox: None,
            frames,
        }
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Leave every room and detach from the inbox: after this nothing reaches the session.
    /// Dropping the session does the same; call it when the order matters (before the
    /// terminal is counted offline).
    pub fn close(&mut self) {
        for r in std::mem::take(&mut self.rooms) {
            r.leave(self.conn);
        }
        if let Some(i) = self.inbox.take() {
            self.app.inboxes.detach(&i, self.conn);
        }
    }

    fn room_index(&self, room: &str) -> Option<usize> {
        self.rooms.iter().position(|r| &*r.id == room)
    }

    fn joined(&self, room: &str) -> Option<&Arc<Room>> {
        self.room_index(room).map(|i| &self.rooms[i])
    }

    fn forget_room(&mut self, room: &str) -> Option<Arc<Room>> {
        let r = self.rooms.swap_remove(self.room_index(room)?);
        if self.rooms.is_empty() {
            self.rooms = Vec::new();
        }
        Some(r)
    }

    pub fn terminal(&self) -> &Terminal {
        &self.terminal
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.app.hub
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Open the session: queue `connected` (when `greet`), then the inbox messages after
    /// `inbox_after` (default: the acknowledged position), and deliver later inbox messages
    /// live.
    pub fn open(
        &mut self,
        transport: Transport,
        id: Option<u64>,
        inbox_after: Option<u64>,
        greet: bool,
    ) {
        let inbox = match self.app.inboxes.get_shared(&self.terminal.id) {
            Ok(i) => i,
            Err(e) => {
                self.error(internal(e).with_id(id));
                return;
            }
        };
        let terminal = self.terminal.id.to_string();
        let heartbeat_ms = self.app.config.heartbeat.as_millis() as u64;
        let wake_key = self.app.wake_keys.key(&terminal).to_base64();
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
    /// Returns false when the frame rate limit refused it.
    pub fn handle_frame(&mut self, text: &str) -> bool {
        if self.frames.check().is_err() {
            self.error(FrameError::new(
                ErrorCode::RateLimited,
                "too many frames; slow down",
            ));
            return false;
        }
        match ClientEnvelope::parse(text) {
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
        match env.frame {
            ClientFrame::Connect { .. } => Err(FrameError::bad_frame("already connected")),
            ClientFrame::Join { room, since } => self
                .join(&room, since.as_ref(), id, Announce::Always)
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
            ClientFrame::Send { room, ty, data } => {
                self.send(&room, &ty, &data).map_err(|e| e.with_room(&room))
            }
            ClientFrame::Ack { inbox } => {
                // A session that did not open the inbox (a `bye` poll) may still acknowledge.
                let i = match &self.inbox {
                    Some(i) => i.clone(),
                    None => self
                        .app
                        .inboxes
                        .get_shared(&self.terminal.id)
                        .map_err(internal)?,
                };
                self.app.inboxes.ack(&i, inbox);
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

    /// Join a room, answering refusals with `error` frames (used by SSE, which has no ops).
    pub fn join_room(&mut self, room: &str, since: Option<&Position>) {
        if let Err(e) = self.join(room, since, None, Announce::Always) {
            self.error(e.with_room(room));
        }
    }

    /// Re-attach a long-poll terminal to a room at its position: a fresh join for `None`,
    /// and for a complete resume in the same epoch only the messages after it (no `joined`).
    pub fn attach(&mut self, room: &str, since: Option<&Position>) {
        if let Err(e) = livepush_proto::validate_room(room)
            .map_err(FrameError::bad_frame)
            .and_then(|()| self.join(room, since, None, Announce::UnlessResumed))
        {
            self.error(e.with_room(room));
        }
    }

    /// Where the terminal's inbox stands, once the session has opened it.
    pub fn inbox_position(&self) -> Option<InboxPosition> {
        self.inbox.as_ref().map(|i| i.position())
    }

    /// Leave every room now; the names of the rooms left.
    pub fn leave_all(&mut self) -> Vec<String> {
        std::mem::take(&mut self.rooms)
            .into_iter()
            .map(|r| {
                r.leave(self.conn);
                r.id.to_string()
            })
            .collect()
    }

    /// Leave every room, keeping the terminal in their online counts until `until_ms`.
    pub fn leave_all_until(&mut self, until_ms: u64) {
        for r in std::mem::take(&mut self.rooms) {
            r.leave_until(self.conn, Some(until_ms));
        }
    }

    fn join(
        &mut self,
        room: &str,
        since: Option<&Position>,
        id: Option<u64>,
        announce: Announce,
    ) -> Result<(), FrameError> {
        self.granted(room)?;
        let max = self.app.config.limits.max_rooms_per_connection;
        if self.joined(room).is_none() {
            // Rooms closed under us are no longer joined; do not count them.
            let conn = self.conn;
            self.rooms.retain(|r| r.is_member(conn));
            if self.rooms.len() >= max {
                return Err(FrameError::new(
                    ErrorCode::Forbidden,
                    format!("at most {max} rooms per connection (max_rooms_per_connection)"),
                ));
            }
        }
        let r = self.app.hub.room(room).map_err(internal)?;
        let member = Member {
            terminal: self.terminal.id.clone(),
            outbox: self.outbox.clone(),
        };
        match r.join(self.conn, member, since, id, announce) {
            Ok(_) => {
                match self.room_index(room) {
                    Some(i) => self.rooms[i] = r,
                    None => {
                        // Exactly as long as needed: most connections stay in one room.
                        self.rooms.reserve_exact(1);
                        self.rooms.push(r);
                    }
                }
                Ok(())
            }
            Err(JoinError::Closed) => {
                self.forget_room(room);
                Err(FrameError::new(
                    ErrorCode::RoomClosed,
                    format!("room {room:?} is closed"),
                ))
            }
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
            None => self.app.hub.room(room).map_err(internal)?,
        };
        // A pull answer takes at most a quarter of the outbox's byte budget; the caller
        // pages on from the last seq it got.
        let max_bytes = self.app.config.limits.outbox_max_bytes / 4;
        self.outbox
            .push(r.pulled(since, limit, max_bytes, id), Kind::Reply);
        Ok(())
    }

    fn send(&mut self, room: &str, ty: &str, data: &RawValue) -> Result<(), FrameError> {
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
        self.app.hub.send_transient(r, ty, data);
        Ok(())
    }

    /// Queue an `error` frame.
    pub fn error(&self, e: FrameError) {
        self.app.metrics.client_errors.inc();
        self.outbox.reply(&e.to_frame());
    }
}

fn internal(e: impl std::fmt::Display) -> FrameError {
    tracing::error!(error = %e, "internal error");
    FrameError::new(ErrorCode::Internal, "internal error; retry later")
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

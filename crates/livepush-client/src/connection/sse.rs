//! The Server-Sent Events session: `GET /v1/sse?token=…&rooms=R1,R2&since=POSITIONS`,
//! receive-only.
//!
//! The stream names its rooms, so a join or leave reopens it, and so does anything that would
//! need a `pull` on the other transports (a gap, a `prompt`, after which the server ends the
//! stream anyway): the new stream joins every room from the position of the last message
//! handed to the application. Those positions are sent as `since` and as `Last-Event-ID`.
//! The client computes them itself rather than echoing the server's event `id`s: an id says
//! where the *stream* is, the client's positions say what the *application* got, which is
//! what a resume must start from. (The server derives an id from `joined`'s `seq`, the
//! room's latest, so the id of an event that holds a replay cut short by a `prompt` is ahead
//! of the messages actually sent; resuming from it would skip the rest of the replay.)

use livepush_proto::Positions;
use reqwest::header::{ACCEPT, CACHE_CONTROL};

use super::*;
use crate::wire::SseParser;

impl Worker {
    /// One SSE stream, from the request until it ends or is reopened.
    pub(super) async fn sse(&mut self) -> State {
        // The stream needs at least one room: wait for one.
        while self.rooms.is_empty() {
            tokio::select! {
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
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        let since = Positions(
            self.rooms
                .iter()
                .filter_map(|(room, r)| Some((room.clone(), r.tracker.resume_from()?)))
                .collect(),
        );
        let names: Vec<&str> = rooms.iter().map(String::as_str).collect();
        let url = wire::sse_url(
            &self.urls.sse,
            self.token.as_deref(),
            self.terminal.as_deref(),
            &names,
            &since,
        );
        let mut req = self
            .http
            .get(url)
            .header(ACCEPT, "text/event-stream")
            .header(CACHE_CONTROL, "no-cache");
        if !since.0.is_empty() {
            req = req.header("Last-Event-ID", since.to_string());
        }
        debug!(rooms = rooms.len(), since = %since, "livepush: opening SSE stream");
        // The response head within the connect timeout, serving commands meanwhile.
        let open = timeout(self.config.connect_timeout, req.send());
        tokio::pin!(open);
        let mut changed = false;
        let res = loop {
            tokio::select! {
                res = &mut open => break res,
                cmd = self.cmds.recv() => {
                    let before = self.rooms.len();
                    if let Flow::Go(next) = self.offline_command(cmd) {
                        return next;
                    }
                    changed |= self.rooms.len() != before;
                }
                open = has_room(&self.outbox.tx), if !self.outbox.queue.is_empty() => {
                    self.outbox_ready(open);
                }
            }
        };
        let mut resp = match res {
            Err(_) => return self.connect_failed(ConnectError::Failed("connect timeout".into())),
            Ok(Err(e)) => return self.connect_failed(ConnectError::Failed(wire::error_chain(&e))),
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp.bytes().await.unwrap_or_default();
            return self.connect_failed(if status == 401 {
                ConnectError::Auth {
                    code: ErrorCode::Unauthorized,
                    message: wire::error_text(status, &body),
                }
            } else {
                ConnectError::Failed(wire::error_message(status, &body))
            });
        }

        let mut s = Session::new(Link::Sse);
        // A room was joined or left while the request was on its way.
        s.reopen = changed;
        let mut parser = SseParser::default();
        let mut connected = false;
        // Until `connected` names the heartbeat: the connect timeout.
        let mut idle = self.config.connect_timeout;
        let mut deadline = Instant::now() + idle;
        let mut reading = true;
        loop {
            if s.reopen {
                debug!("livepush: reopening the SSE stream");
                self.end_session();
                return State::Connecting;
            }
            let was_reading = reading;
            reading = !self.outbox.backlogged();
            if reading && !was_reading {
                deadline = Instant::now() + idle;
            }
            tokio::select! {
                open = has_room(&self.outbox.tx), if !self.outbox.queue.is_empty() => {
                    self.outbox_ready(open);
                }
                cmd = self.cmds.recv() => {
                    if let Flow::Go(next) = self.online_command(&mut s, cmd) {
                        self.end_session();
                        return next;
                    }
                }
                chunk = resp.chunk(), if reading => {
                    let bytes = match chunk {
                        Ok(Some(b)) => b,
                        Ok(None) => {
                            return self.sse_ended(connected, DisconnectReason::ServerClosed {
                                code: None,
                                reason: "the server ended the event stream".to_owned(),
                            });
                        }
                        Err(e) => {
                            return self.sse_ended(
                                connected,
                                DisconnectReason::ConnectionLost(wire::error_chain(&e)),
                            );
                        }
                    };
                    deadline = Instant::now() + idle;
                    for event in parser.feed(&bytes) {
                        for line in split_frames(&event.data) {
                            let Some(frame) = self.decode(line) else {
                                continue;
                            };
                            match frame {
                                ServerFrame::Connected { terminal, transport, heartbeat_ms, inbox, wake_key, .. } if !connected => {
                                    connected = true;
                                    // No probe is possible: silence past the idle timeout and
                                    // the ping timeout ends the stream.
                                    idle = self
                                        .config
                                        .effective_idle_timeout(heartbeat_ms)
                                        .saturating_add(self.config.ping_timeout);
                                    deadline = Instant::now() + idle;
                                    self.on_connected(terminal, transport, inbox, wake_key);
                                }
                                ServerFrame::Error {
                                    id: None,
                                    code,
                                    message,
                                    room,
                                } => {
                                    match wire::refused_room(
                                        room.as_deref(),
                                        &message,
                                        names.iter().copied(),
                                    ) {
                                        Some(room) => {
                                            let room = room.to_owned();
                                            self.on_room_refused(&room, code, message);
                                        }
                                        None => self.on_error(&mut s, None, code, message),
                                    }
                                }
                                other => {
                                    if matches!(other, ServerFrame::Prompt { .. }) {
                                        // The server ends the stream after a prompt.
                                        s.reopen = true;
                                    }
                                    if let Err(reason) = self.on_frame(&mut s, other) {
                                        return self.sse_ended(connected, reason);
                                    }
                                }
                            }
                        }
                    }
                }
                () = sleep_until(deadline), if reading => {
                    return self.sse_ended(connected, DisconnectReason::HeartbeatTimeout);
                }
            }
        }
    }

    fn sse_ended(&mut self, connected: bool, reason: DisconnectReason) -> State {
        if connected {
            self.disconnected(reason)
        } else {
            self.end_session();
            self.connect_failed(ConnectError::Failed(reason.to_string()))
        }
    }
}

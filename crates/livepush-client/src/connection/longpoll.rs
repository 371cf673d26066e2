//! The long-poll session: `POST /v1/poll`, one parked poll plus, when commands come, one short
//! poll beside it.
//!
//! - The *main* poll carries every registered room at its position (`{}` for a fresh one)
//!   and no ops, with `wait_ms` = [`ClientConfig::poll_wait`]; the first of a session says
//!   `hello: true`. As soon as it is answered the next one starts.
//! - A *short* poll (`wait_ms: 0`) starts at once when ops are queued (send, ack, leave) or a
//!   room is registered that the main poll does not carry; it carries the ops, the rooms of
//!   its `send`s (the server wants the sender in the room) and the rooms the main poll lacks.
//!   One at a time; its callers are answered when it is. Once it has attached rooms the
//!   main poll lacks, the parked main poll is dropped and sent again with every room, so
//!   that their messages do not wait for it to come back.
//!
//! - When the client closes, the parked poll is dropped and a last poll says `"bye":true`
//!   (contract v1.1, decision 5): it carries every room and the queued ops (after a short
//!   poll still in flight has been answered), so the server runs them, takes the terminal
//!   out of its rooms and shows it offline at once rather than after its poll grace period.
//!   All of it takes at most [`BYE_TIMEOUT`].
//!
//! Each poll attaches its rooms at the positions the trackers had when it was sent. A server
//! answers a complete resume without `joined` ([`RoomTracker::on_attached`] makes the tracker
//! live for that), and with `joined` when the epoch changed or messages were lost. Two polls
//! can be in flight for one room (a send while the main poll is parked), so an answer's
//! `joined` is only applied when the room's position has not moved since the poll was sent,
//! and its reliable messages only when they belong to the epoch the tracker follows: the
//! tracker drops what the other answer already delivered.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;

use reqwest::header::CONTENT_TYPE;
use tokio::time::timeout_at;

use super::*;
use crate::wire::PollAnswer;

type PollFuture = Pin<Box<dyn Future<Output = Result<PollAnswer, PollError>> + Send>>;
type WsFuture = Pin<Box<dyn Future<Output = Result<Handshake, ConnectError>> + Send>>;

/// Longest time [`Client::close`](crate::Client::close) waits over long-polling: for a short
/// poll still in flight, then for the answer to the `bye` poll.
const BYE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a poll failed.
#[derive(Debug)]
pub(super) enum PollError {
    /// `401`: the token is not accepted.
    Auth(String),
    /// Another HTTP status than `200`.
    Status {
        status: u16,
        message: String,
    },
    /// No answer within `wait_ms` + the connect timeout: the watchdog.
    Timeout,
    Network(String),
    /// A `200` whose body is not `{"frames":[…]}`.
    BadAnswer(String),
}

impl PollError {
    fn from_reqwest(e: &reqwest::Error) -> PollError {
        if e.is_timeout() {
            PollError::Timeout
        } else {
            PollError::Network(wire::error_chain(e))
        }
    }

    pub(super) fn reason(self) -> DisconnectReason {
        match self {
            PollError::Auth(message) => DisconnectReason::HttpStatus {
                status: 401,
                message,
            },
            PollError::Status { status, message } => {
                DisconnectReason::HttpStatus { status, message }
            }
            PollError::Timeout => DisconnectReason::HeartbeatTimeout,
            PollError::Network(why) | PollError::BadAnswer(why) => {
                DisconnectReason::ConnectionLost(why)
            }
        }
    }
}

/// What a poll is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PollKind {
    /// The parked poll, `hello` on the first of a session.
    Main { hello: bool },
    /// A short poll beside it, for the queued ops and the rooms the parked one lacks.
    Short,
    /// The last poll of a session: `bye`, with the queued ops.
    Bye,
}

/// One poll in flight.
struct InFlight {
    fut: PollFuture,
    hello: bool,
    /// The rooms it carries, each with the position it was attached at.
    rooms: BTreeMap<String, Option<Position>>,
    /// Callers of the ops it carries.
    replies: Vec<Reply>,
}

impl InFlight {
    fn fail(self) {
        for r in self.replies {
            let _ = r.send(Err(ClientError::NotConnected));
        }
    }
}

/// Long-poll state of one session.
struct Lp {
    /// Rooms whose attach was confirmed in this session (by `joined`, or by an answer that
    /// carried neither `joined` nor a refusal for them).
    announced: HashSet<String>,
    /// Errors the client cannot tie to a room: the next main poll waits this back-off, so
    /// that a refusal answered at once does not turn into a busy loop.
    errors: Backoff,
    hold_until: Option<Instant>,
}

async fn in_flight(p: &mut Option<InFlight>) -> Result<PollAnswer, PollError> {
    match p {
        Some(p) => (&mut p.fut).await,
        None => std::future::pending().await,
    }
}

async fn ws_in_flight(w: &mut Option<WsFuture>) -> Result<Handshake, ConnectError> {
    match w {
        Some(w) => w.await,
        None => std::future::pending().await,
    }
}

async fn send_poll(req: reqwest::RequestBuilder) -> Result<PollAnswer, PollError> {
    let resp = req.send().await.map_err(|e| PollError::from_reqwest(&e))?;
    let status = resp.status().as_u16();
    let body = resp
        .bytes()
        .await
        .map_err(|e| PollError::from_reqwest(&e))?;
    match status {
        200 => wire::parse_answer(&body).map_err(PollError::BadAnswer),
        401 => Err(PollError::Auth(wire::error_text(401, &body))),
        _ => Err(PollError::Status {
            status,
            message: wire::error_message(status, &body),
        }),
    }
}

impl Worker {
    /// A long-poll session: from the `hello` poll until it fails, the client closes, or (in
    /// [`TransportMode::Auto`]) a WebSocket is up again.
    pub(super) async fn longpoll(&mut self) -> State {
        let mut s = Session::new(Link::Longpoll);
        let mut lp = Lp {
            announced: HashSet::new(),
            errors: Backoff::new(self.config.backoff_base, self.config.backoff_max),
            hold_until: None,
        };
        let mut connected = false;
        let mut main: Option<InFlight> = None;
        let mut side: Option<InFlight> = None;
        let mut ws_try: Option<WsFuture> = None;
        let mut switch_to: Option<Handshake> = None;
        // Rooms the main poll lacks that a short poll has attached since it started.
        let mut side_covered: HashSet<String> = HashSet::new();
        let auto = self.config.transport == TransportMode::Auto;

        loop {
            if switch_to.is_some() && side.is_none() && s.out.is_empty() {
                // Every command handed over: continue on the WebSocket.
                if let Some(hs) = switch_to.take() {
                    info!("livepush: back on WebSocket");
                    self.end_session();
                    return State::Connected(Box::new(hs));
                }
            }
            let now = Instant::now();
            if main.is_none()
                && switch_to.is_none()
                && !self.outbox.backlogged()
                && lp.hold_until.is_none_or(|t| t <= now)
            {
                lp.hold_until = None;
                side_covered.clear();
                let rooms: Vec<String> = self.rooms.keys().cloned().collect();
                let kind = PollKind::Main { hello: !connected };
                main = Some(self.start_poll(&mut s, kind, rooms));
            }
            if connected && side.is_none() {
                let mut rooms: Vec<String> = match &main {
                    Some(m) => self
                        .rooms
                        .keys()
                        .filter(|r| !m.rooms.contains_key(*r) && !side_covered.contains(*r))
                        .cloned()
                        .collect(),
                    None => Vec::new(),
                };
                if !s.out.is_empty() || !rooms.is_empty() {
                    for op in &s.out {
                        if let ClientFrame::Send { room, .. } = &op.frame
                            && self.rooms.contains_key(room)
                            && !rooms.contains(room)
                        {
                            rooms.push(room.clone());
                        }
                    }
                    side_covered.extend(rooms.iter().cloned());
                    side = Some(self.start_poll(&mut s, PollKind::Short, rooms));
                }
            }
            let ws_due = auto && connected && ws_try.is_none() && switch_to.is_none();
            let ws_at = self.lp_until.unwrap_or_else(Instant::now);
            let hold_at = lp.hold_until.unwrap_or_else(Instant::now);
            tokio::select! {
                res = in_flight(&mut main), if main.is_some() => {
                    let Some(poll) = main.take() else { continue };
                    let res = match res {
                        Ok(answer) => self.on_answer(&mut s, &mut lp, &poll, answer, &mut connected),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = res {
                        return self.poll_failed(&mut s, connected, e, [Some(poll), side.take()]);
                    }
                }
                res = in_flight(&mut side), if side.is_some() => {
                    let Some(mut poll) = side.take() else { continue };
                    let res = match res {
                        Ok(answer) => {
                            for r in poll.replies.drain(..) {
                                let _ = r.send(Ok(()));
                            }
                            self.on_answer(&mut s, &mut lp, &poll, answer, &mut connected)
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = res {
                        return self.poll_failed(&mut s, connected, e, [Some(poll), main.take()]);
                    }
                    // The short poll attached rooms the parked main poll lacks: nothing would
                    // carry them until it comes back (up to `poll_wait`). Send the main poll
                    // again with every room. The parked one carries no ops; what an answer
                    // to it held is replayed from the positions.
                    if !side_covered.is_empty()
                        && let Some(p) = main.take()
                    {
                        p.fail();
                    }
                }
                cmd = self.cmds.recv(), if switch_to.is_none() => {
                    let flow = if connected {
                        self.online_command(&mut s, cmd)
                    } else {
                        self.offline_command(cmd)
                    };
                    if let Flow::Go(next) = flow {
                        if matches!(next, State::Closed) {
                            self.bye(&mut s, main.take(), side.take()).await;
                        }
                        for p in [main.take(), side.take()].into_iter().flatten() {
                            p.fail();
                        }
                        s.fail_replies();
                        self.end_session();
                        return next;
                    }
                }
                open = has_room(&self.outbox.tx), if !self.outbox.queue.is_empty() => {
                    self.outbox_ready(open);
                }
                () = sleep_until(hold_at), if main.is_none() && lp.hold_until.is_some() => {}
                () = sleep_until(ws_at), if ws_due => {
                    debug!("livepush: trying WebSocket again");
                    ws_try = Some(Box::pin(self.ws_attempt()));
                }
                res = ws_in_flight(&mut ws_try), if ws_try.is_some() => {
                    ws_try = None;
                    let now = Instant::now();
                    match res {
                        Ok(hs) => {
                            self.lp_until = None;
                            // The parked poll is dropped (it carries no ops: nothing is lost,
                            // the WebSocket joins resume from the positions).
                            if let Some(p) = main.take() {
                                p.fail();
                            }
                            switch_to = Some(hs);
                        }
                        Err(ConnectError::TransportSwitch { retry_ws_after }) => {
                            debug!(?retry_ws_after, "livepush: still asked to long-poll");
                            self.lp_until = Some(now + retry_ws_after);
                        }
                        Err(e) => {
                            debug!(error = ?e, "livepush: WebSocket still not possible");
                            self.lp_until = Some(now + self.config.ws_retry_after);
                        }
                    }
                }
            }
        }
    }

    /// Start a poll carrying `rooms` (at their current positions, attached again unless it
    /// says `bye`) and, unless it is the parked one, the queued ops and their callers.
    fn start_poll(&mut self, s: &mut Session, kind: PollKind, rooms: Vec<String>) -> InFlight {
        let mut sent = BTreeMap::new();
        for room in rooms {
            if let Some(r) = self.rooms.get_mut(&room) {
                let pos = r.tracker.resume_from();
                if kind != PollKind::Bye {
                    r.tracker.on_attached();
                }
                sent.insert(room, pos);
            }
        }
        let (hello, wait) = match kind {
            PollKind::Main { hello } => (hello, self.config.poll_wait),
            PollKind::Short | PollKind::Bye => (false, Duration::ZERO),
        };
        let (ops, replies) = match kind {
            PollKind::Main { .. } => (Vec::new(), Vec::new()),
            PollKind::Short | PollKind::Bye => {
                (std::mem::take(&mut s.out), std::mem::take(&mut s.replies))
            }
        };
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let mut body = wire::PollBody::new(
            self.token.as_deref(),
            self.terminal.as_deref(),
            hello,
            sent.iter().map(|(r, p)| (r.as_str(), p.as_ref())),
            self.inbox_delivered,
            wait_ms,
            &ops,
        );
        body.bye = kind == PollKind::Bye;
        let body = body.to_json();
        debug!(
            ?kind,
            wait_ms,
            rooms = sent.len(),
            ops = ops.len(),
            "livepush: poll"
        );
        let req = self
            .http
            .post(self.urls.poll.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .timeout(wait.saturating_add(self.config.connect_timeout));
        InFlight {
            fut: Box::pin(send_poll(req)),
            hello,
            rooms: sent,
            replies,
        }
    }

    /// Leave over long-polling (see the module documentation): drop the parked poll (it
    /// carries no ops; the server ends a poll that began before the terminal's `bye` without
    /// the grace period, whenever it notices the poll's connection end), let a short poll in
    /// flight be answered (its callers wait for it), then send the `bye` poll and wait for
    /// its answer, all within [`BYE_TIMEOUT`]. Callers of the ops are told
    /// whether the `bye` was answered; its frames are not read (the session is over).
    async fn bye(&mut self, s: &mut Session, main: Option<InFlight>, side: Option<InFlight>) {
        let deadline = Instant::now() + BYE_TIMEOUT;
        if let Some(p) = main {
            p.fail();
        }
        if let Some(p) = side {
            let answered = Self::await_poll(p, deadline).await;
            debug!(answered, "livepush: short poll before bye");
        }
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        let bye = self.start_poll(s, PollKind::Bye, rooms);
        let answered = Self::await_poll(bye, deadline).await;
        info!(answered, "livepush: left over long-polling (bye)");
    }

    /// Wait for a poll's answer until `deadline` and tell its callers how it went.
    async fn await_poll(mut p: InFlight, deadline: Instant) -> bool {
        let answered = matches!(timeout_at(deadline, &mut p.fut).await, Ok(Ok(_)));
        for r in p.replies.drain(..) {
            let _ = r.send(if answered {
                Ok(())
            } else {
                Err(ClientError::NotConnected)
            });
        }
        answered
    }

    /// A poll failed: the session ends (or never started).
    fn poll_failed(
        &mut self,
        s: &mut Session,
        connected: bool,
        err: PollError,
        polls: [Option<InFlight>; 2],
    ) -> State {
        for p in polls.into_iter().flatten() {
            p.fail();
        }
        s.fail_replies();
        if !connected {
            self.end_session();
            return self.connect_failed(match err {
                PollError::Auth(message) => ConnectError::Auth {
                    code: ErrorCode::Unauthorized,
                    message,
                },
                other => ConnectError::Failed(other.reason().to_string()),
            });
        }
        let auth = match &err {
            PollError::Auth(message) => Some(message.clone()),
            _ => None,
        };
        let next = self.disconnected(err.reason());
        if let Some(message) = auth {
            // The token stopped being accepted mid-session (expired): as a refused connect.
            warn!(%message, "livepush poll refused");
            self.auth_failures = self.auth_failures.saturating_add(1);
            self.emit(Event::Error {
                code: ErrorCode::Unauthorized,
                message,
                room: None,
            });
            if let Some(limit) = self.config.auth_failure_limit
                && self.auth_failures >= limit
            {
                return State::Parked;
            }
        }
        next
    }

    /// Handle one poll answer (see the module documentation for the rules).
    fn on_answer(
        &mut self,
        s: &mut Session,
        lp: &mut Lp,
        poll: &InFlight,
        answer: PollAnswer,
        connected: &mut bool,
    ) -> Result<(), PollError> {
        let PollAnswer {
            frames,
            undecodable,
            inbox,
        } = answer;
        let frames: Vec<ServerFrame> = frames
            .into_iter()
            .zip(undecodable)
            .filter_map(|(frame, bad)| self.admit(frame, bad))
            .collect();
        // Rooms whose position moved since the poll was sent (another answer came between),
        // or that are no longer followed.
        let changed: HashSet<&str> = poll
            .rooms
            .iter()
            .filter(|(room, sent)| {
                self.rooms
                    .get(room.as_str())
                    .is_none_or(|r| r.tracker.resume_from() != **sent)
            })
            .map(|(room, _)| room.as_str())
            .collect();
        let mut joined_in_answer = HashSet::new();
        let mut refused = HashSet::new();
        let mut prompted = HashSet::new();
        let mut online = HashMap::new();
        for f in &frames {
            match f {
                ServerFrame::Joined { room, .. } => {
                    joined_in_answer.insert(room.clone());
                }
                ServerFrame::Prompt { room, .. } => {
                    prompted.insert(room.clone());
                }
                ServerFrame::Online { room, count } => {
                    online.insert(room.clone(), *count);
                }
                ServerFrame::Error {
                    id: None,
                    message,
                    room,
                    ..
                } => {
                    if let Some(room) = wire::refused_room(
                        room.as_deref(),
                        message,
                        poll.rooms.keys().map(String::as_str),
                    ) {
                        refused.insert(room.to_owned());
                    }
                }
                _ => {}
            }
        }
        // Rooms resumed quietly (no `joined`): confirmed once per session.
        let mut quiet: Vec<(String, Position)> = poll
            .rooms
            .iter()
            .filter_map(|(room, sent)| {
                let pos = sent.as_ref()?;
                let fresh = !changed.contains(room.as_str())
                    && !joined_in_answer.contains(room)
                    && !refused.contains(room)
                    && !lp.announced.contains(room);
                fresh.then(|| (room.clone(), pos.clone()))
            })
            .collect();
        // The epoch each room's reliable messages in this answer belong to.
        let mut context: HashMap<String, String> = poll
            .rooms
            .iter()
            .filter_map(|(room, sent)| Some((room.clone(), sent.as_ref()?.epoch.clone())))
            .collect();
        let mut joined_seq: HashMap<String, u64> = HashMap::new();
        let mut retry_later = false;
        for frame in frames {
            if !matches!(frame, ServerFrame::Connected { .. }) {
                self.announce_quiet(lp, &mut quiet, &online);
            }
            match frame {
                ServerFrame::Connected {
                    terminal,
                    transport,
                    inbox,
                    wake_key,
                    ..
                } => {
                    if poll.hello && !*connected {
                        self.on_connected(terminal, transport, inbox, wake_key);
                        *connected = true;
                    } else {
                        debug!("livepush: extra connected frame ignored");
                    }
                }
                ServerFrame::Joined {
                    ref room,
                    ref epoch,
                    seq,
                    ..
                } => {
                    if changed.contains(room.as_str()) || !poll.rooms.contains_key(room) {
                        debug!(%room, "livepush: stale joined ignored");
                        continue;
                    }
                    context.insert(room.clone(), epoch.clone());
                    joined_seq.insert(room.clone(), seq);
                    lp.announced.insert(room.clone());
                    self.poll_frame(s, frame);
                }
                ServerFrame::Msg(ref m) if m.seq.is_some() => {
                    if self.in_context(&context, &m.room) {
                        self.poll_frame(s, frame);
                    }
                }
                ServerFrame::Prompt { ref room, .. } => {
                    if self.in_context(&context, room) {
                        self.poll_frame(s, frame);
                    }
                }
                ServerFrame::Error {
                    id: None,
                    code,
                    message,
                    room,
                } => {
                    let room = wire::refused_room(
                        room.as_deref(),
                        &message,
                        poll.rooms.keys().map(String::as_str),
                    )
                    .map(str::to_owned);
                    match room {
                        Some(room) => {
                            lp.announced.remove(&room);
                            if !self.on_room_refused(&room, code, message) {
                                // Temporary (rate_limited, internal): poll again later.
                                retry_later = true;
                            }
                        }
                        None => {
                            retry_later = true;
                            self.on_error(s, None, code, message);
                        }
                    }
                }
                other => {
                    self.poll_frame(s, other);
                }
            }
        }
        if poll.hello && !*connected {
            return Err(PollError::BadAnswer(
                "the hello poll was answered without `connected`".to_owned(),
            ));
        }
        if let Some(inbox) = inbox {
            self.shared.set_inbox(inbox);
        }
        self.announce_quiet(lp, &mut quiet, &online);
        for (room, seq) in joined_seq {
            if prompted.contains(&room) {
                continue;
            }
            if let Some(r) = self.rooms.get_mut(&room) {
                let effects = r.tracker.on_replay_complete(seq);
                self.apply(s, &room, effects);
            }
        }
        if retry_later {
            let delay = lp.errors.next_delay(&mut self.rng);
            lp.hold_until = Some(Instant::now() + delay);
        } else {
            lp.errors.reset();
        }
        Ok(())
    }

    /// A frame of a poll answer. (A `transport` frame, the only one that ends a session,
    /// means nothing here: the client already long-polls.)
    fn poll_frame(&mut self, s: &mut Session, frame: ServerFrame) {
        if let Err(reason) = self.on_frame(s, frame) {
            debug!(%reason, "livepush: ignored in a poll answer");
        }
    }

    /// Whether the reliable messages of `room` in an answer whose epoch for it is
    /// `context[room]` belong to the history its tracker follows.
    fn in_context(&self, context: &HashMap<String, String>, room: &str) -> bool {
        match (context.get(room), self.rooms.get(room)) {
            (Some(epoch), Some(r)) => r.tracker.epoch() == Some(epoch.as_str()),
            _ => false,
        }
    }

    /// Report quietly resumed rooms as joined (once per session), before anything else of
    /// the answer that concerns them.
    fn announce_quiet(
        &mut self,
        lp: &mut Lp,
        quiet: &mut Vec<(String, Position)>,
        online: &HashMap<String, u64>,
    ) {
        for (room, pos) in quiet.drain(..) {
            if !self.rooms.contains_key(&room) {
                continue;
            }
            lp.announced.insert(room.clone());
            self.emit(Event::Joined {
                online: online.get(&room).copied().unwrap_or(0),
                room,
                epoch: pos.epoch,
                seq: pos.seq,
                recovered: true,
                resumed: true,
            });
        }
    }
}

//! The long-poll transport: `POST /v1/poll` (and `POST /v1/connect` without an upgrade).
//!
//! A poll carries everything the server needs: the token, every room with the terminal's
//! position in it, and the ops to run. The server holds no session between polls, so any node
//! can answer any poll and a restart loses nothing: reliable messages come from history past
//! the given positions, so an answer lost on the way is simply answered again by the next
//! poll with the same positions.
//!
//! Each poll is a short-lived [`Session`]: it authenticates, attaches to every room at its
//! position (which replays what is missing), runs the ops, and then waits, as a member of its
//! rooms, until its outbox has something or `wait_ms` passes. Transient messages published
//! while it waits are therefore included. When it ends, the terminal stays in its rooms'
//! online counts for the poll grace period.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use livepush_proto::{ErrorCode, Position, Transport, validate_epoch};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::app::App;
use crate::auth::Terminal;
use crate::clock::now_ms;
use crate::error::ApiError;
use crate::outbox::Batch;
use crate::session::{Session, authenticate, dev_terminal};

/// A room's entry in a poll: `{}` for a fresh join, `{epoch, seq}` to continue.
#[derive(Debug, Default, Deserialize)]
struct RoomEntry {
    epoch: Option<String>,
    seq: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct PollBody {
    token: Option<String>,
    /// Dev mode only: the anonymous terminal id the server gave in `connected`.
    terminal: Option<String>,
    #[serde(default)]
    hello: bool,
    #[serde(default)]
    rooms: BTreeMap<String, RoomEntry>,
    /// Inbox messages after this seq are sent; absent: after the acknowledged position.
    inbox: Option<u64>,
    wait_ms: Option<u64>,
    #[serde(default)]
    ops: Vec<Box<RawValue>>,
    /// The terminal is leaving (contract v1.1, decision 5): run the ops, leave the rooms, end
    /// its long-poll presence at once (no grace period), answer at once.
    #[serde(default)]
    bye: bool,
}

fn unauthorized(message: String) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

fn poll_terminal(app: &App, body: &PollBody) -> Result<Terminal, ApiError> {
    let dev = app.config.dev;
    if let (true, None | Some(""), Some(id)) =
        (dev, body.token.as_deref(), body.terminal.as_deref())
    {
        return dev_terminal(id).map_err(ApiError::bad_request);
    }
    authenticate(&app.keys, dev, body.token.as_deref()).map_err(|e| unauthorized(e.message))
}

/// Handle one poll.
pub async fn poll(app: Arc<App>, req: Request) -> Response {
    match run(app, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(app: Arc<App>, req: Request) -> Result<Response, ApiError> {
    let limits = &app.config.limits;
    let bytes = axum::body::to_bytes(req.into_body(), limits.max_poll_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("poll body exceeds max_poll_bytes {}", limits.max_poll_bytes),
            )
        })?;
    let body: PollBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid poll body: {e}")))?;
    let terminal = poll_terminal(&app, &body)?;
    let id = terminal.id.clone();
    let mut poll = Poll {
        session: Session::new(&app, terminal),
        app: app.clone(),
        terminal: id,
        bye: body.bye,
    };
    app.terminals.opened(&poll.terminal, Transport::Longpoll);
    Ok(exchange(&app, &mut poll.session, body).await)
}

/// One poll in progress. Its end is handled on drop, because a client that goes away while
/// its poll is parked makes the server drop the poll's future mid-way.
struct Poll {
    session: Session,
    app: Arc<App>,
    terminal: Arc<str>,
    /// The poll said `bye`: no grace period.
    bye: bool,
}

impl Drop for Poll {
    fn drop(&mut self) {
        if self.bye {
            self.session.close();
        } else {
            // The terminal stays in its rooms' online counts for the grace period.
            let grace = self.app.config.poll_grace;
            self.session
                .leave_all_until(now_ms() + grace.as_millis() as u64);
        }
        self.app
            .terminals
            .closed(&self.terminal, Transport::Longpoll, false);
        if self.bye {
            self.app.terminals.bye(&self.terminal);
        }
    }
}

/// A `bye` poll: run the ops, leave every room the poll names (and any its ops joined),
/// stop lingering in their online counts, and answer at once with the replies and `left`s.
fn bye(app: &App, session: &mut Session, body: &PollBody) -> Response {
    for op in &body.ops {
        session.handle_frame(op.get());
    }
    let mut rooms: Vec<String> = body.rooms.keys().cloned().collect();
    for room in session.leave_all() {
        if !rooms.contains(&room) {
            rooms.push(room);
        }
    }
    let mut left = Vec::new();
    for room in rooms {
        if let Err(e) = livepush_proto::validate_room(&room) {
            session.error(livepush_proto::FrameError::bad_frame(e).with_room(&room));
            continue;
        }
        match app.hub.existing_room(&room) {
            Ok(Some(r)) => r.stop_lingering(&session.terminal().id),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "bye: cannot load a room"),
        }
        left.push(livepush_proto::encode_frame(
            &livepush_proto::ServerFrame::Left { id: None, room },
        ));
    }
    let mut frames = match session.outbox().take(usize::MAX) {
        Batch::Frames(f) => f,
        Batch::Closed(_) => Vec::new(),
    };
    frames.extend(left.iter().cloned());
    let mut out = BytesMut::new();
    out.put_slice(b"{\"frames\":");
    put_array(&mut out, &frames);
    // The contract writes this answer as `{"ops":[left, ...]}`; every other answer is
    // `{"frames":[...]}`. Both keys are sent (docs/protocol.md §16.2).
    out.put_slice(b",\"ops\":");
    put_array(&mut out, &left);
    out.put_u8(b'}');
    json_answer(out)
}

/// A JSON array of the frames of `batch`.
fn put_array(out: &mut BytesMut, batch: &[bytes::Bytes]) {
    out.put_u8(b'[');
    for (i, frame) in crate::outbox::frames_of(batch).enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(frame.as_bytes());
    }
    out.put_u8(b']');
}

fn json_answer(out: BytesMut) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        out.freeze(),
    )
        .into_response()
}

async fn exchange(app: &App, session: &mut Session, body: PollBody) -> Response {
    let limits = &app.config.limits;
    if body.bye {
        return bye(app, session, &body);
    }
    session.open(Transport::Longpoll, None, body.inbox, body.hello);
    for (room, entry) in &body.rooms {
        let since = match (&entry.epoch, entry.seq) {
            (None, None) => None,
            (Some(epoch), Some(seq)) => {
                if let Err(e) = validate_epoch(epoch) {
                    session.error(livepush_proto::FrameError::bad_frame(format!(
                        "{room}: {e}"
                    )));
                    continue;
                }
                Some(Position {
                    epoch: epoch.clone(),
                    seq,
                })
            }
            _ => {
                session.error(
                    livepush_proto::FrameError::new(
                        ErrorCode::BadFrame,
                        format!("room {room:?}: give both `epoch` and `seq`, or neither"),
                    )
                    .with_room(room),
                );
                continue;
            }
        };
        session.attach(room, since.as_ref());
    }
    // Ops after the rooms: a `send` needs the room joined, a `leave` undoes its attach.
    for op in &body.ops {
        // One JSON value each (possibly pretty-printed): not newline-separated batches.
        session.handle_frame(op.get());
    }
    let wait = Duration::from_millis(body.wait_ms.unwrap_or(25_000)).min(limits.poll_max_wait);
    let outbox = session.outbox().clone();
    let mut shutdown = app.shutdown.clone();
    tokio::select! {
        _ = outbox.significant() => {}
        _ = tokio::time::sleep(wait) => {}
        _ = shutdown.wait_for(|s| *s) => {}
    }
    let frames = match outbox.take(usize::MAX) {
        Batch::Frames(f) => f,
        // The answer grew past --outbox-max-bytes (several large pulls in one poll): say so
        // rather than answering with nothing.
        Batch::Closed(_) => vec![livepush_proto::encode_frame(
            &livepush_proto::ServerFrame::error(
                None,
                ErrorCode::TooLarge,
                "this poll's answer exceeds outbox_max_bytes; pull less per poll",
            ),
        )],
    };
    let mut out = BytesMut::with_capacity(frames.iter().map(|f| f.len() + 1).sum::<usize>() + 96);
    out.put_slice(b"{\"frames\":");
    put_array(&mut out, &frames);
    // Where the inbox stands after this answer (contract v1.1, decision 6): a woken terminal
    // that acknowledged everything sees `pending: 0`.
    if let Some(p) = session.inbox_position() {
        out.put_slice(
            format!(
                r#","inbox":{{"seq":{},"acked":{},"pending":{}}}"#,
                p.seq, p.acked, p.pending
            )
            .as_bytes(),
        );
    }
    out.put_u8(b'}');
    json_answer(out)
}

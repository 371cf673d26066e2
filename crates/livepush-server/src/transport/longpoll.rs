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
use livepush_proto::{ErrorCode, FrameError, Position, ServerFrame, Transport, validate_epoch};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::app::App;
use crate::error::ApiError;
use crate::frame::{self, Frame};
use crate::hooks::connect::Caller;
use crate::outbox::Batch;
use crate::outbox::ConnId;
use crate::session::{Ending, Session};
use crate::transport::{authenticate, in_conn_span, remote};

/// A room's entry in a poll: `{}` for a fresh join, `{epoch, seq}` to continue.
#[derive(Debug, Default, Deserialize)]
struct RoomEntry {
    epoch: Option<String>,
    #[serde(default, deserialize_with = "crate::api::schema::integral_u64")]
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
    #[serde(default, deserialize_with = "crate::api::schema::integral_u64")]
    inbox: Option<u64>,
    #[serde(default, deserialize_with = "crate::api::schema::integral_u64")]
    wait_ms: Option<u64>,
    #[serde(default)]
    ops: Vec<Box<RawValue>>,
    /// The terminal is leaving (contract v1.1, decision 5): run the ops, leave the rooms, end
    /// its long-poll presence at once (no grace period), answer at once.
    #[serde(default)]
    bye: bool,
}

/// Handle one poll. (Plain functions returning futures down to the park, not `async fn`s,
/// which would each keep the request in their state for as long as the poll is parked: see
/// [`run`].)
pub fn poll(app: Arc<App>, req: Request) -> impl Future<Output = Response> {
    let conn = app.hub.next_conn_id();
    in_conn_span(conn, Transport::Longpoll, run(app, req, conn))
}

/// `conn`: the connection's id (its session's).
///
/// A poll that parks holds only what the wait needs: the session, its outbox and the wait's
/// timer. Everything before the park (the body as read, its parsed form, the request head,
/// and the state of the authentication, open and attach steps) lives in [`prepare`]'s own
/// heap future, which is freed when the poll parks. Measured on 2,000 parked polls (heaptrack,
/// docs/performance.md, issue 18): the body's `Bytes` alone kept hyper's first 8 KiB read
/// buffer alive beside the one hyper reads the next request into, and the unboxed handler
/// future was 4.6 KiB, most of it the union of the steps before the park.
///
/// Not an `async fn` either: its arguments would stay in its state (rustc does not overlap an
/// `async fn`'s arguments with the rest of it), the request among them.
fn run(
    app: Arc<App>,
    req: Request,
    conn: ConnId,
) -> impl Future<Output = Result<Response, ApiError>> {
    let prepared = Box::pin(prepare(app.clone(), req, conn));
    async move {
        match prepared.await? {
            Prepared::Answered(answer) => Ok(answer),
            Prepared::Parked { mut poll, wait } => Ok(park(&app, &mut poll.session, wait).await),
        }
    }
}

/// A poll after [`prepare`]: answered already (a `bye`), or to park for at most `wait`.
enum Prepared {
    Answered(Response),
    Parked { poll: Poll, wait: Duration },
}

/// Read, parse and authenticate a poll, start its session, and run it up to the park:
/// attach its rooms, run its ops. A `bye` is answered here.
async fn prepare(app: Arc<App>, req: Request, conn: ConnId) -> Result<Prepared, ApiError> {
    let limits = &app.config.limits;
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, limits.max_poll_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                format!("poll body exceeds max_poll_bytes {}", limits.max_poll_bytes),
            )
        })?;
    let body: PollBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid poll body: {e}")))?;
    // The parsed body owns its strings: the bytes (a slice of hyper's read buffer, which they
    // keep alive) are not needed past here.
    drop(bytes);
    let admitted = authenticate(
        &app,
        body.token.as_deref(),
        body.terminal.as_deref(),
        || {
            Caller::of(
                Transport::Longpoll,
                remote(&parts.extensions),
                &parts.headers,
            )
        },
    )
    .await?;
    drop(parts);
    tracing::Span::current().record("terminal", &*admitted.terminal.id);
    let mut poll = Poll {
        started: app.terminals.stamp(),
        session: Session::start(&app, admitted.terminal.clone(), Transport::Longpoll, conn)?,
    };
    poll.session.expires_with(body.token.as_deref(), &admitted);
    if body.bye {
        poll.session.load_inbox().await;
        let answer = bye(&app, &mut poll.session, &body);
        poll.session.end(Ending::Bye);
        return Ok(Prepared::Answered(answer));
    }
    let wait = exchange(&app, &mut poll.session, body).await;
    Ok(Prepared::Parked { poll, wait })
}

/// One poll in progress. It ends on drop, because a client that goes away while its poll is
/// parked makes the server drop the poll's future mid-way: the terminal lingers in its
/// rooms' online counts for the grace period either way, unless it said `bye` meanwhile (a
/// client that leaves abandons its parked poll and says bye at once; the server may notice
/// the abandoned poll only after the bye).
struct Poll {
    session: Session,
    /// When the poll began ([`crate::terminals::Terminals::stamp`]).
    started: u32,
}

impl Drop for Poll {
    fn drop(&mut self) {
        let app = self.session.app().clone();
        let id = self.session.terminal().id.clone();
        let ending = if app.terminals.said_bye_since(&id, self.started) {
            Ending::AfterBye
        } else {
            Ending::Answered
        };
        self.session.end(ending);
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
            session.error(FrameError::bad_frame(e.to_string()).with_room(&room));
            continue;
        }
        if let Some(r) = app.hub.open_room(&room) {
            r.stop_lingering(&session.terminal().id);
        }
        left.push(Frame::of(&ServerFrame::Left { id: None, room }));
    }
    let mut frames = match session.outbox().take(usize::MAX) {
        Batch::Frames(f) => f,
        Batch::Closed(_) => Vec::new(),
    };
    frames.extend(left.iter().cloned());
    let mut out = Vec::new();
    out.extend_from_slice(b"{\"frames\":");
    put_array(&mut out, &frames);
    // The contract writes this answer as `{"ops":[left, ...]}`; every other answer is
    // `{"frames":[...]}`. Both keys are sent (docs/protocol.md §16.2).
    out.extend_from_slice(b",\"ops\":");
    put_array(&mut out, &left);
    out.push(b'}');
    json_answer(out)
}

/// A JSON array of the frames of a batch.
fn put_array(out: &mut Vec<u8>, batch: &[Frame]) {
    out.push(b'[');
    frame::join_into(batch, b',', out);
    out.push(b']');
}

fn json_answer(out: Vec<u8>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        out,
    )
        .into_response()
}

/// Open the poll's session, attach its rooms at their positions and run its ops; how long
/// it may then wait.
async fn exchange(app: &App, session: &mut Session, body: PollBody) -> Duration {
    let limits = &app.config.limits;
    session.open(None, body.inbox, body.hello).await;
    for (room, entry) in &body.rooms {
        let since = match (&entry.epoch, entry.seq) {
            (None, None) => None,
            (Some(epoch), Some(seq)) => {
                if let Err(e) = validate_epoch(epoch) {
                    session.error(FrameError::bad_frame(format!("{room}: {e}")).with_room(room));
                    continue;
                }
                Some(Position {
                    epoch: epoch.clone(),
                    seq,
                })
            }
            _ => {
                session.error(
                    FrameError::new(
                        ErrorCode::BadFrame,
                        format!("room {room:?}: give both `epoch` and `seq`, or neither"),
                    )
                    .with_room(room),
                );
                continue;
            }
        };
        session.attach(room, since.as_ref()).await;
    }
    // Ops after the rooms: a `send` needs the room joined, a `leave` undoes its attach.
    for op in &body.ops {
        // One JSON value each (possibly pretty-printed): not newline-separated batches.
        session.handle_frame(op.get());
    }
    let mut wait = Duration::from_millis(body.wait_ms.unwrap_or(25_000)).min(limits.poll_max_wait);
    // A poll does not outlive its token: it answers when the token expires, and the next
    // poll needs a fresh one.
    if let Some(left) = session.expires_in() {
        wait = wait.min(left);
    }
    wait
}

/// Wait until the outbox has something significant, `wait` passes or the server shuts down;
/// answer with what the outbox holds.
async fn park(app: &App, session: &mut Session, wait: Duration) -> Response {
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
        Batch::Closed(_) => vec![Frame::of(&ServerFrame::error(
            None,
            ErrorCode::TooLarge,
            "this poll's answer exceeds outbox_max_bytes; pull less per poll",
        ))],
    };
    let mut out = Vec::with_capacity(frame::joined_len(&frames) + 96);
    out.extend_from_slice(b"{\"frames\":");
    put_array(&mut out, &frames);
    // Where the inbox stands after this answer (contract v1.1, decision 6): a woken terminal
    // that acknowledged everything sees `pending: 0`.
    if let Some(p) = session.inbox_position() {
        out.extend_from_slice(
            format!(
                r#","inbox":{{"seq":{},"acked":{},"pending":{}}}"#,
                p.seq, p.acked, p.pending
            )
            .as_bytes(),
        );
    }
    out.push(b'}');
    json_answer(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Bytes a parked poll's handler future may take: what the wait needs (the session, its
    /// outbox, the timer, the shutdown watch) and the connection's span. Before issue 18's
    /// cut it was 4,152 bytes in a test build (84bbd60; 2,616 with the steps before the park
    /// boxed but the `async fn` layers kept; 4,664 for the whole route future in a release
    /// build, heaptrack): every step before the park, and the request held once per `async
    /// fn` on the way.
    const MAX_PARKED_FUTURE: usize = 1024;

    #[tokio::test]
    async fn a_parked_poll_holds_only_the_wait() {
        let config = Config::for_tests(&"k".repeat(24), &"s".repeat(32));
        let running = crate::server::start(config).await.expect("server starts");
        let poll = poll(
            running.app().clone(),
            Request::new(axum::body::Body::empty()),
        );
        let size = std::mem::size_of_val(&poll);
        assert!(
            size <= MAX_PARKED_FUTURE,
            "a poll's future is {size} bytes, over {MAX_PARKED_FUTURE}"
        );
        drop(poll);
        running.shutdown().await;
    }
}

//! The Server-Sent Events transport: `GET /v1/sse?token=…&rooms=R1,R2&since=POSITIONS`.
//!
//! Receive-only. Each event carries one or more frames, one per `data:` line. An event that
//! carries a reliable message (or a `joined`) gets `id:` = the positions of every room of the
//! stream after it, so a browser's `EventSource` resumes all rooms by itself with
//! `Last-Event-ID` (which wins over `since`). A position never runs ahead of what the stream
//! sent: after a replay cut short by a `prompt` it is the last replayed seq, not the latest. An SSE client cannot `pull`, so when its queue overflows the server
//! sends the `prompt` and ends the stream; `EventSource` reconnects with `Last-Event-ID` and
//! the join replays the rest from history.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::Request;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use livepush_proto::{Position, Positions, Transport, validate_room};
use serde::Deserialize;

use crate::app::App;
use crate::error::ApiError;
use crate::frame::{self, What};
use crate::hooks::connect::Caller;
use crate::outbox::ConnId;
use crate::outbox::{Batch, Outbox};
use crate::session::{Ending, Session};
use crate::transport::{authenticate, in_conn_span, remote};

#[derive(Debug, Deserialize)]
struct SseQuery {
    token: Option<String>,
    /// Dev mode only: reuse an anonymous terminal id.
    terminal: Option<String>,
    rooms: Option<String>,
    since: Option<String>,
}

struct StreamState {
    // Ended when the stream ends (or dropped with it: the client went away).
    session: Session,
    outbox: Arc<Outbox>,
    /// Where each room of the stream stands after the events sent so far.
    positions: BTreeMap<String, Position>,
    /// The positions the stream was opened from (`Last-Event-ID` or `since`).
    resumed_from: BTreeMap<String, Position>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    done: bool,
}

pub async fn sse(app: Arc<App>, req: Request) -> Response {
    let conn = app.hub.next_conn_id();
    in_conn_span(conn, Transport::Sse, open(app, req, conn)).await
}

/// `conn`: the connection's id (its session's).
async fn open(app: Arc<App>, req: Request, conn: ConnId) -> Result<Response, ApiError> {
    // The body is not read; the head is kept (not the `Request`, which is not `Sync`) while
    // the connect hook is asked.
    let (req, _) = req.into_parts();
    let q: SseQuery = serde_urlencoded_query(req.uri.query().unwrap_or(""))?;
    let rooms: Vec<String> = q
        .rooms
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect();
    if rooms.is_empty() {
        return Err(ApiError::bad_request("`rooms` is required: rooms=R1,R2"));
    }
    for r in &rooms {
        validate_room(r).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let last_event_id = req
        .headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let positions = match last_event_id.or(q.since.as_deref()) {
        Some(p) => Positions::parse(p).map_err(|e| ApiError::bad_request(e.to_string()))?,
        None => Positions::default(),
    };
    let admitted = authenticate(&app, q.token.as_deref(), q.terminal.as_deref(), || {
        Caller::of(Transport::Sse, remote(&req.extensions), &req.headers)
    })
    .await?;
    tracing::Span::current().record("terminal", &*admitted.terminal.id);
    let mut session = Session::start(&app, admitted.terminal.clone(), Transport::Sse, conn)?;
    session.expires_with(q.token.as_deref(), &admitted);
    session.open(None, None, true).await;
    for room in &rooms {
        let since = positions
            .0
            .iter()
            .find(|(r, _)| r == room)
            .map(|(_, p)| p.clone());
        session.join_room(room, since.as_ref()).await;
    }
    let state = StreamState {
        outbox: session.outbox().clone(),
        session,
        positions: BTreeMap::new(),
        resumed_from: positions.0.into_iter().collect(),
        shutdown: app.shutdown.clone(),
        done: false,
    };
    let heartbeat = app.config.heartbeat;
    Ok(Sse::new(events(state))
        .keep_alive(KeepAlive::new().interval(heartbeat).text("keepalive"))
        .into_response())
}

fn serde_urlencoded_query(q: &str) -> Result<SseQuery, ApiError> {
    axum::extract::Query::<SseQuery>::try_from_uri(
        &format!("/?{q}")
            .parse()
            .map_err(|_| ApiError::bad_request("bad query string"))?,
    )
    .map(|axum::extract::Query(q)| q)
    .map_err(|e| ApiError::bad_request(e.body_text()))
}

fn events(state: StreamState) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(state, |mut st| async move {
        if st.done {
            st.session.end(Ending::Prompted);
            return None;
        }
        let expiry = st.session.expires_in();
        let expired = async move {
            match expiry {
                Some(left) => tokio::time::sleep(left).await,
                None => std::future::pending().await,
            }
        };
        let mut expired = std::pin::pin!(expired);
        let frames = loop {
            let token_expired = tokio::select! {
                _ = st.outbox.ready() => false,
                _ = st.shutdown.wait_for(|s| *s) => {
                    st.session.end(Ending::Shutdown);
                    return None;
                }
                () = &mut expired => true,
            };
            if token_expired {
                // The stream does not outlive its token: say so, and end.
                st.session.app().metrics.client_errors.inc();
                st.session.end(Ending::Unauthorized);
                st.done = true;
                let frame = crate::session::token_expired().to_frame();
                let data = livepush_proto::encode_frame(&frame);
                let event = Event::default().data(String::from_utf8_lossy(&data));
                return Some((Ok(event), st));
            }
            match st.outbox.take(usize::MAX) {
                Batch::Frames(f) if f.is_empty() => continue,
                Batch::Frames(f) => break f,
                Batch::Closed(_) => {
                    st.session.end(Ending::SlowConsumer);
                    return None;
                }
            }
        };
        let mut reliable = false;
        // Rooms joined in this batch: (room, latest seq at the join), and rooms prompted.
        let mut joined: Vec<(Arc<str>, u64)> = Vec::new();
        let mut prompted: Vec<Arc<str>> = Vec::new();
        // Each frame says what it is: positions are kept without reading the JSON back.
        for f in &frames {
            match f.what() {
                What::Joined {
                    room,
                    epoch,
                    seq: latest,
                    recovered,
                } => {
                    // A position must never run ahead of what was sent: start from where
                    // the stream resumed (when that history is complete), or from before
                    // the replay, and let the replayed messages move it.
                    let start = match st.resumed_from.get(&**room) {
                        Some(from) if *from.epoch == **epoch && *recovered => from.seq,
                        Some(_) => 0,
                        None => *latest,
                    };
                    st.positions.insert(
                        room.to_string(),
                        Position {
                            epoch: epoch.to_string(),
                            seq: start,
                        },
                    );
                    joined.push((room.clone(), *latest));
                    // Positions changed: the event gets an id, so that a reconnect
                    // resumes from here rather than joining afresh.
                    reliable = true;
                }
                What::Reliable { room, seq } => {
                    if let Some(pos) = st.positions.get_mut(&**room) {
                        pos.seq = pos.seq.max(*seq);
                    }
                    reliable = true;
                }
                // The client cannot pull: end the stream so it reconnects and resumes.
                What::Prompt { room, .. } => {
                    prompted.push(room.clone());
                    st.done = true;
                }
                What::Reply | What::Transient | What::Ambient => {}
            }
        }
        let mut data = Vec::with_capacity(frame::joined_len(&frames));
        frame::join_into(&frames, b'\n', &mut data);
        // A join whose replay was sent whole stands at the latest seq of its join.
        for (room, latest) in joined {
            if let Some(pos) = st
                .positions
                .get_mut(&*room)
                .filter(|_| !prompted.contains(&room))
            {
                pos.seq = pos.seq.max(latest);
            }
        }
        let mut event = Event::default().data(String::from_utf8_lossy(&data));
        if reliable {
            let id = Positions(
                st.positions
                    .iter()
                    .map(|(r, p)| (r.clone(), p.clone()))
                    .collect(),
            );
            event = event.id(id.to_string());
        }
        Some((Ok(event), st))
    })
}

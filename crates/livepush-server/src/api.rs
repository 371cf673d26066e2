//! The HTTP API for the app's backend: publish, history, room info, health and metrics.
//!
//! Every error is JSON `{"error":CODE,"message":TEXT}` with the contract's status codes; no
//! request, however malformed, gets a plain-text or empty error.

pub mod admin;
pub mod batch;
pub mod loglevel;

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use livepush_proto::{Class, Transport, validate_room};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::app::App;
use crate::clock::now_ms;
use crate::engine::{EngineError, TerminalPresence};
use crate::error::ApiError;
use crate::hub::PublishError;
use crate::inbox::InboxView;
use crate::terminals::TerminalView;
use livepush_proto::ErrorCode;

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::Engine(e) => e.into(),
            refused => ApiError::bad_request(refused.to_string()),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Unavailable(_) => {
                tracing::warn!(error = %e, "engine unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unavailable,
                    "the shared store is unreachable; retry later",
                )
            }
            EngineError::Store(e) => ApiError::internal(e),
        }
    }
}

/// A JSON body read under the configured size limit, with JSON errors for every failure.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: serde::de::DeserializeOwned> FromRequest<Arc<App>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<App>) -> Result<Self, ApiError> {
        let limit = state.config.limits.max_publish_bytes;
        let body = read_body(req, limit, "max_publish_bytes").await?;
        serde_json::from_slice(&body)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// A request body of at most `limit` bytes; past it 413 `too_large` naming `setting`.
pub(crate) async fn read_body(
    req: Request,
    limit: usize,
    setting: &str,
) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                format!("request body exceeds {setting} {limit}"),
            )
        })
}

/// Check `Authorization: Bearer API_KEY` (the whole API except `/healthz`).
pub async fn require_api_key(
    State(app): State<Arc<App>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(key) = app.config.api_key.as_deref() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_credentials);
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => {}
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::Unauthorized,
                    "wrong API key",
                ));
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::Unauthorized,
                    "missing `Authorization: Bearer API_KEY`",
                ));
            }
        }
    }
    Ok(next.run(req).await)
}

/// The credentials of an `Authorization: Bearer KEY` value. The scheme is case-insensitive
/// and followed by one or more spaces (RFC 7235 §2.1).
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start_matches(' '))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuse a `data` value nested deeper than `max_json_depth` (400 `bad_request`).
pub(crate) fn data_depth(app: &App, data: &RawValue) -> Result<(), ApiError> {
    let max = app.config.limits.max_json_depth;
    if livepush_proto::nesting_exceeds(data.get(), max) {
        return Err(ApiError::bad_request(format!(
            "`data` nests more than max_json_depth ({max}) levels"
        )));
    }
    Ok(())
}

fn room_param(room: &str) -> Result<(), ApiError> {
    validate_room(room).map_err(|e| ApiError::bad_request(e.to_string()))
}

#[derive(Debug, Deserialize)]
pub struct PublishBody {
    #[serde(rename = "type")]
    ty: String,
    data: Box<RawValue>,
    #[serde(default)]
    class: Option<Class>,
}

/// `POST /v1/rooms/{room}/messages`
pub async fn publish(
    State(app): State<Arc<App>>,
    Path(room): Path<String>,
    JsonBody(body): JsonBody<PublishBody>,
) -> Result<Response, ApiError> {
    room_param(&room)?;
    data_depth(&app, &body.data)?;
    let p = app
        .hub
        .publish(&room, &body.ty, &body.data, body.class)
        .await?;
    let mut answer = json!({"epoch": &*p.epoch});
    if let Some(seq) = p.seq {
        answer["seq"] = json!(seq);
    }
    if let Some(d) = p.delivered {
        answer["delivered"] = json!(d);
    }
    Ok(Json(answer).into_response())
}

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    #[serde(default)]
    since: u64,
    limit: Option<u32>,
}

/// `GET /v1/rooms/{room}/history?since=N&limit=L`
pub async fn history(
    State(app): State<Arc<App>>,
    Path(room): Path<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    room_param(&room)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let cap = app.config.limits.max_pull;
    let max_bytes = app.config.limits.outbox_max_bytes / 4;
    let limit = q.limit.unwrap_or(cap).min(cap) as usize;
    let page = app
        .hub
        .history(&room, q.since, limit, max_bytes)
        .await?
        .ok_or_else(|| unknown_room(&room))?;
    let mut out = BytesMut::new();
    out.put_slice(
        json!({"epoch": &*page.epoch, "seq": page.latest, "recovered": page.recovered})
            .to_string()
            .trim_end_matches('}')
            .as_bytes(),
    );
    out.put_slice(b",\"messages\":[");
    for (i, m) in page.messages.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(m);
    }
    out.put_slice(b"]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], out.freeze()).into_response())
}

/// `DELETE /v1/rooms/{room}/history`: start a new history of the room (a new epoch, seq 0,
/// nothing kept). Its members are told `joined{recovered:false}` with the new epoch (contract
/// v1.1, decision 8), as after a lost history. For a room that begins a new show under the
/// same id, or an operator clearing what a room would replay.
pub async fn reset_history(
    State(app): State<Arc<App>>,
    Path(room): Path<String>,
) -> Result<Response, ApiError> {
    room_param(&room)?;
    if app.hub.info(&room).await?.is_none() {
        return Err(unknown_room(&room));
    }
    let epoch = app.hub.reset(&room).await?;
    Ok(Json(json!({"epoch": &*epoch, "seq": 0})).into_response())
}

fn unknown_room(room: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownRoom,
        format!("room {room:?} was never published to or joined"),
    )
}

/// `GET /v1/rooms/{room}`
pub async fn room_info(
    State(app): State<Arc<App>>,
    Path(room): Path<String>,
) -> Result<Response, ApiError> {
    room_param(&room)?;
    let info = app
        .hub
        .info(&room)
        .await?
        .ok_or_else(|| unknown_room(&room))?;
    Ok(Json(json!({
        "room": room,
        "epoch": &*info.epoch,
        "seq": info.seq,
        "online": info.online,
        "muted": info.flags.muted,
        "closed": info.flags.closed,
    }))
    .into_response())
}

/// `GET /healthz`
///
/// `{"status":"ok"}`, or `{"status":"degraded"}` while the engine's shared store (Redis) does
/// not answer: the node still serves its terminals and transient messages, but reliable
/// publishes and inbox posts are answered 503. Always 200: every node shares the same store,
/// so a load balancer gains nothing by taking one out.
pub async fn healthz(State(app): State<Arc<App>>) -> Response {
    let status = if app.hub.engine().healthy() {
        "ok"
    } else {
        "degraded"
    };
    Json(json!({ "status": status })).into_response()
}

/// `GET /metrics`
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response()
}

/// Unknown paths.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

/// Known path, wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::BadRequest,
        "method not allowed on this endpoint",
    )
}

#[derive(Debug, Deserialize)]
pub struct TerminalsQuery {
    #[serde(default)]
    online: bool,
}

/// `GET /v1/terminals?online=true`: the service list; with several nodes, what every node
/// knows (each node's own list, and what the others shared through the engine).
pub async fn terminals(
    State(app): State<Arc<App>>,
    query: Result<Query<TerminalsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut local: std::collections::BTreeMap<String, TerminalView> = app
        .terminals
        .list(false)
        .into_iter()
        .map(|v| (v.terminal.clone(), v))
        .collect();
    let mut ids: Vec<String> = local.keys().cloned().collect();
    ids.extend(app.inboxes.known_terminals().await?);
    ids.sort_unstable();
    ids.dedup();
    let elsewhere = app.inboxes.presence_elsewhere(&ids).await?;
    let now = now_ms();
    let mut list = Vec::new();
    for (id, others) in ids.iter().zip(elsewhere) {
        let view = local.remove(id);
        let online =
            view.as_ref().is_some_and(|v| v.online) || others.iter().any(|p| p.online(now));
        if q.online && !online {
            continue;
        }
        let inbox = app.inboxes.view(id).await.ok().flatten();
        list.push(terminal_json(&app, id, view, inbox, &others));
    }
    Ok(Json(json!({ "terminals": list })).into_response())
}

/// `GET /v1/terminals/{id}`: the same on every node.
pub async fn terminal(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let view = app.terminals.view(&id);
    let inbox = app.inboxes.view(&id).await?;
    let others = app
        .inboxes
        .presence_elsewhere(std::slice::from_ref(&id))
        .await?
        .pop()
        .unwrap_or_default();
    if view.is_none() && inbox.is_none() && others.is_empty() {
        return Err(ApiError::not_found(format!(
            "terminal {id:?} was never seen"
        )));
    }
    Ok(Json(terminal_json(&app, &id, view, inbox, &others)).into_response())
}

/// One terminal as the API shows it: this node's view merged with the other nodes' (online
/// on any node; every transport in use anywhere; the latest sighting; interruptions summed,
/// while the move to long-polling is each node's own decision).
fn terminal_json(
    app: &App,
    id: &str,
    v: Option<TerminalView>,
    inbox: Option<InboxView>,
    others: &[TerminalPresence],
) -> serde_json::Value {
    let now = now_ms();
    let inbox = inbox.unwrap_or_default();
    let mut interruptions = v
        .as_ref()
        .map(|v| v.interruptions.clone())
        .unwrap_or_else(|| app.terminals.empty_interruptions());
    interruptions.count += others.iter().map(|p| p.interruptions).sum::<u32>();
    let mut transports = v.as_ref().map(|v| v.transports.clone()).unwrap_or_default();
    for p in others {
        let used = [
            (p.ws > 0, Transport::Ws),
            (p.polls > 0 || p.grace_until_ms > now, Transport::Longpoll),
            (p.sse > 0, Transport::Sse),
        ];
        for (on, t) in used {
            if on && !transports.contains(&t) {
                transports.push(t);
            }
        }
    }
    transports.sort_by_key(|t| match t {
        Transport::Ws => 0,
        Transport::Longpoll => 1,
        Transport::Sse => 2,
    });
    let online = v.as_ref().is_some_and(|v| v.online) || others.iter().any(|p| p.online(now));
    // Seen by a node, or else the last keepalive on record.
    let last_seen_ms = v
        .as_ref()
        .map(|v| v.last_seen_ms)
        .into_iter()
        .chain(others.iter().map(|p| p.last_seen_ms))
        .max()
        .or(inbox.last_keepalive_ms)
        .unwrap_or(0);
    json!({
        "terminal": id,
        "online": online,
        "transports": transports,
        "last_seen_ms": last_seen_ms,
        "inbox": {
            "seq": inbox.position.seq,
            "acked": inbox.position.acked,
            "pending": inbox.position.pending,
        },
        "wake": {
            "registered": inbox.wake_registered,
            "last_keepalive_ms": inbox.last_keepalive_ms,
        },
        "interruptions": interruptions,
    })
}

#[derive(Debug, Deserialize)]
pub struct InboxPostBody {
    #[serde(rename = "type")]
    ty: String,
    data: Box<RawValue>,
}

/// `POST /v1/terminals/{id}/messages`: a direct message to one terminal's inbox.
pub async fn post_inbox(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<InboxPostBody>,
) -> Result<Response, ApiError> {
    if !crate::auth::valid_terminal_id(&id) {
        return Err(ApiError::bad_request(format!(
            "terminal id must be 1 to {} printable characters",
            crate::auth::MAX_TERMINAL_LEN
        )));
    }
    livepush_proto::validate_type(&body.ty).map_err(|e| ApiError::bad_request(e.to_string()))?;
    data_depth(&app, &body.data)?;
    let posted = app.inboxes.post(&id, &body.ty, &body.data).await?;
    Ok(Json(json!({
        "seq": posted.seq,
        "online": posted.online,
        "wake": if posted.wake_sent { "sent" } else { "none" },
    }))
    .into_response())
}

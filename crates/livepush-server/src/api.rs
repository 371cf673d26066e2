//! The HTTP API for the app's backend: publish, history, room info, health and metrics.
//!
//! Every error is JSON `{"error":CODE,"message":TEXT}` with the contract's status codes; no
//! request, however malformed, gets a plain-text or empty error.

pub mod admin;
pub mod batch;
pub mod loglevel;
pub mod openapi;
pub mod schema;

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use livepush_proto::{Class, Transport, validate_room};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use crate::app::App;
use crate::clock::now_ms;
use crate::engine::{EngineError, TerminalPresence};
use crate::error::{ApiError, ErrorBody};
use crate::hub::PublishError;
use crate::inbox::InboxView;
use crate::terminals::{Interruptions, TerminalView};
use livepush_proto::{ErrorCode, InboxPosition};
use schema::{AnyJson, Epoch, MessageType, RoomId, TerminalId};

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

/// A message to publish to a room. Fields other than these are ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PublishBody {
    #[serde(rename = "type")]
    #[schema(value_type = MessageType)]
    ty: String,
    #[schema(value_type = AnyJson)]
    data: Box<RawValue>,
    /// Overrides the class the server gives the type.
    #[serde(default)]
    class: Option<Class>,
}

/// A reliable message, stored: its room's epoch and its seq.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    #[schema(value_type = Epoch)]
    pub epoch: String,
    #[schema(minimum = 1)]
    pub seq: u64,
}

/// A transient message, delivered live: how many connections of this node it was delivered to (the room's members here).
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Delivered {
    #[schema(value_type = Epoch)]
    pub epoch: String,
    pub delivered: u64,
}

/// The answer to a publish: `seq` for a reliable message, `delivered` for a transient one.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PublishAnswer {
    Reliable(Stored),
    Transient(Delivered),
}

impl From<crate::hub::Published> for PublishAnswer {
    fn from(p: crate::hub::Published) -> PublishAnswer {
        let epoch = p.epoch.to_string();
        match p.seq {
            Some(seq) => PublishAnswer::Reliable(Stored { epoch, seq }),
            None => PublishAnswer::Transient(Delivered {
                epoch,
                delivered: p.delivered.unwrap_or(0) as u64,
            }),
        }
    }
}

/// `POST /v1/rooms/{room}/messages`
#[utoipa::path(
    post,
    path = "/v1/rooms/{room}/messages",
    tag = "rooms",
    summary = "Publish a message to a room",
    params(("room" = RoomId, Path, description = "The room; created by the publish if new.")),
    request_body = PublishBody,
    responses(
        (status = 200, description = "Published: stored (reliable) or delivered (transient).", body = PublishAnswer),
        (status = 400, description = "Bad room id, type, class, `data` nesting or JSON body.", body = ErrorBody),
        (status = 500, description = "Storage failure; the message was neither stored nor delivered.", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
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
    Ok(Json(PublishAnswer::from(p)).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Messages after this seq (default 0: from the oldest kept).
    #[serde(default)]
    since: u64,
    /// At most this many messages; default and cap: `--max-pull` (1000).
    limit: Option<u32>,
}

/// A page of a room's history (`recovered` and paging as for a terminal's `pull`).
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HistoryPage {
    #[schema(value_type = Epoch)]
    pub epoch: String,
    /// The room's latest seq.
    pub seq: u64,
    /// False when messages after `since` are no longer kept (or `since` is of another epoch).
    pub recovered: bool,
    /// Complete `msg` frames, oldest first.
    pub messages: Vec<MsgFrame>,
}

/// A reliable room message as a terminal receives it.
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MsgFrame {
    #[schema(pattern = "^msg$")]
    pub op: String,
    #[schema(value_type = RoomId)]
    pub room: String,
    #[serde(rename = "type")]
    #[schema(value_type = MessageType)]
    pub ty: String,
    pub data: AnyJson,
    #[schema(minimum = 1)]
    pub seq: u64,
    /// Server time of the publish (ms since the Unix epoch).
    pub ts: u64,
}

/// `GET /v1/rooms/{room}/history?since=N&limit=L`
#[utoipa::path(
    get,
    path = "/v1/rooms/{room}/history",
    tag = "rooms",
    summary = "Read a room's history",
    params(("room" = RoomId, Path, description = "The room."), HistoryQuery),
    responses(
        (status = 200, description = "A page of the history.", body = HistoryPage),
        (status = 400, description = "Bad room id or query parameter.", body = ErrorBody),
        (status = 404, description = "`unknown_room`: never published to or joined.", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
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
#[utoipa::path(
    delete,
    path = "/v1/rooms/{room}/history",
    tag = "rooms",
    summary = "Start a new history of a room (new epoch, seq 0)",
    params(("room" = RoomId, Path, description = "The room.")),
    responses(
        (status = 200, description = "The new epoch, and seq 0.", body = Reset),
        (status = 400, description = "Bad room id.", body = ErrorBody),
        (status = 404, description = "`unknown_room`: never published to or joined.", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub async fn reset_history(
    State(app): State<Arc<App>>,
    Path(room): Path<String>,
) -> Result<Response, ApiError> {
    room_param(&room)?;
    if app.hub.info(&room).await?.is_none() {
        return Err(unknown_room(&room));
    }
    let epoch = app.hub.reset(&room).await?;
    Ok(Json(Reset {
        epoch: epoch.to_string(),
        seq: 0,
    })
    .into_response())
}

/// A room's new history: its epoch, and seq 0.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reset {
    #[schema(value_type = Epoch)]
    pub epoch: String,
    #[schema(minimum = 0, maximum = 0)]
    pub seq: u64,
}

fn unknown_room(room: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownRoom,
        format!("room {room:?} was never published to or joined"),
    )
}

/// A room as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoomInfo {
    #[schema(value_type = RoomId)]
    pub room: String,
    #[schema(value_type = Epoch)]
    pub epoch: String,
    /// The latest seq.
    pub seq: u64,
    /// Terminals in the room now.
    pub online: u64,
    pub muted: bool,
    pub closed: bool,
}

/// `GET /v1/rooms/{room}`
#[utoipa::path(
    get,
    path = "/v1/rooms/{room}",
    tag = "rooms",
    summary = "A room's epoch, seq, online count and flags",
    params(("room" = RoomId, Path, description = "The room.")),
    responses(
        (status = 200, description = "The room.", body = RoomInfo),
        (status = 400, description = "Bad room id.", body = ErrorBody),
        (status = 404, description = "`unknown_room`: never published to or joined.", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
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
    Ok(Json(RoomInfo {
        epoch: info.epoch.to_string(),
        room,
        seq: info.seq,
        online: info.online,
        muted: info.flags.muted,
        closed: info.flags.closed,
    })
    .into_response())
}

/// `GET /healthz`
///
/// `{"status":"ok"}`, or `{"status":"degraded"}` while the engine's shared store (Redis) does
/// not answer: the node still serves its terminals and transient messages, but reliable
/// publishes and inbox posts are answered 503. Always 200: every node shares the same store,
/// so a load balancer gains nothing by taking one out.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    summary = "Health (no key needed)",
    responses((status = 200, description = "Always 200.", body = Health)),
)]
pub async fn healthz(State(app): State<Arc<App>>) -> Response {
    let status = if app.hub.engine().healthy() {
        HealthStatus::Ok
    } else {
        HealthStatus::Degraded
    };
    Json(Health { status }).into_response()
}

/// `GET /healthz`'s answer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub status: HealthStatus,
}

/// `degraded`: the shared store (Redis) does not answer; reliable publishes and inbox posts
/// get 503 meanwhile.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Ok,
    Degraded,
}

/// The media type of `GET /metrics`.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `GET /metrics`
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus/OpenMetrics text",
    responses((
        status = 200,
        description = "The metrics (docs/protocol.md §14.4).",
        body = String,
        content_type = "application/openmetrics-text",
    )),
    security(("api_key" = [])),
)]
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
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

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TerminalsQuery {
    /// Only the terminals online now.
    #[serde(default)]
    online: bool,
}

/// The service list.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TerminalList {
    /// Sorted by id.
    pub terminals: Vec<TerminalAnswer>,
}

/// One terminal as the API shows it (docs/protocol.md §14.5).
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Terminal)]
pub struct TerminalAnswer {
    #[schema(value_type = TerminalId)]
    pub terminal: String,
    pub online: bool,
    /// The transports it is online over now.
    pub transports: Vec<Transport>,
    pub last_seen_ms: u64,
    pub inbox: InboxPosition,
    pub wake: WakeState,
    pub interruptions: Interruptions,
}

/// Whether a terminal can be woken over UDP.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WakeState {
    /// An accepted keepalive is on record.
    pub registered: bool,
    /// The `ts` of the last one (the terminal's clock), or null.
    pub last_keepalive_ms: Option<u64>,
}

/// `GET /v1/terminals?online=true`: the service list; with several nodes, what every node
/// knows (each node's own list, and what the others shared through the engine).
#[utoipa::path(
    get,
    path = "/v1/terminals",
    tag = "terminals",
    summary = "The service list",
    params(TerminalsQuery),
    responses(
        (status = 200, description = "Every terminal seen (or only those online).", body = TerminalList),
        (status = 400, description = "Bad query parameter.", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
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
    Ok(Json(TerminalList { terminals: list }).into_response())
}

/// `GET /v1/terminals/{id}`: the same on every node.
#[utoipa::path(
    get,
    path = "/v1/terminals/{id}",
    tag = "terminals",
    summary = "One terminal",
    params(("id" = TerminalId, Path, description = "The terminal id.")),
    responses(
        (status = 200, description = "The terminal.", body = TerminalAnswer),
        (status = 404, description = "`not_found`: never seen by this server nor known to the store.", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
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
) -> TerminalAnswer {
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
    TerminalAnswer {
        terminal: id.to_owned(),
        online,
        transports,
        last_seen_ms,
        inbox: inbox.position,
        wake: WakeState {
            registered: inbox.wake_registered,
            last_keepalive_ms: inbox.last_keepalive_ms,
        },
        interruptions,
    }
}

/// A direct message to a terminal. Fields other than these are ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct InboxPostBody {
    #[serde(rename = "type")]
    #[schema(value_type = MessageType)]
    ty: String,
    #[schema(value_type = AnyJson)]
    data: Box<RawValue>,
}

/// The answer to an inbox post.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InboxPosted {
    /// The message's inbox seq.
    #[schema(minimum = 1)]
    pub seq: u64,
    /// The terminal has a session open, or is within its long-poll grace.
    pub online: bool,
    pub wake: WakeSent,
}

/// `sent`: a wake datagram went out for this post (or a running wake episode carries it).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WakeSent {
    Sent,
    None,
}

/// `POST /v1/terminals/{id}/messages`: a direct message to one terminal's inbox.
#[utoipa::path(
    post,
    path = "/v1/terminals/{id}/messages",
    tag = "terminals",
    summary = "Post a direct message to a terminal's inbox",
    params(("id" = TerminalId, Path, description = "The terminal id, seen or not.")),
    request_body = InboxPostBody,
    responses(
        (status = 200, description = "Stored in the inbox.", body = InboxPosted),
        (status = 400, description = "Bad terminal id, type, `data` nesting or JSON body.", body = ErrorBody),
        (status = 500, description = "Storage failure; it may still have reached open sessions.", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
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
    Ok(Json(InboxPosted {
        seq: posted.seq,
        online: posted.online,
        wake: if posted.wake_sent {
            WakeSent::Sent
        } else {
            WakeSent::None
        },
    })
    .into_response())
}

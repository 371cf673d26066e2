//! The OpenAPI 3.1 document of the whole HTTP API, served at `GET /v1/openapi.json` (no key
//! needed) and kept in `docs/openapi.json`.
//!
//! It is generated from the code: the backend API's handlers carry `#[utoipa::path]`, and
//! their request and answer types derive `ToSchema` (the answers are the types the handlers
//! serialize, the identifiers' schemas come from the server's own checks, [`super::schema`]).
//! The terminal-facing endpoints (long-poll, SSE, the WebSocket upgrade) and this document
//! itself are described here, on stubs, and the browser assets in a table.
//!
//! Invariants:
//! - every route of `server::router` is an operation of [`ApiDoc`] (adding one is one line in
//!   its `paths(...)`);
//! - the responses every operation shares are added by [`Common`], not per handler: 401 to
//!   those behind the API key, 408 and 413 to those with a body, 500 and 503 to those that
//!   wait on the engine, 429 to all;
//! - configurable limits that a schema can state (`maxItems` of a batch) are those of the
//!   serving configuration: the document is built once per server from its `Limits`, and
//!   `docs/openapi.json` is the one of the default `Limits` (a test keeps them equal).

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, get};
use bytes::Bytes;
use serde::Deserialize;
use utoipa::openapi::path::{HttpMethod, Operation};
use utoipa::openapi::schema::Schema;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, OpenApi as Document, PathItem, RefOr, Response, ResponseBuilder,
};
use utoipa::{Modify, OpenApi, ToSchema};

use super::schema::AnyJson;
use crate::app::App;
use crate::config::Limits;
use crate::error::ErrorBody;
use livepush_proto::InboxPosition;

/// The document, as derived; [`document`] completes it.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "livepush HTTP API",
        description = "The backend API (behind `Authorization: Bearer API_KEY`), health and \
            metrics, and the HTTP side of the terminal transports. Every error is JSON \
            `{\"error\":CODE,\"message\":TEXT}`. docs/protocol.md is the full account.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        super::publish,
        super::batch::publish,
        super::history,
        super::reset_history,
        super::room_info,
        super::terminals,
        super::terminal,
        super::post_inbox,
        super::healthz,
        super::metrics,
        super::admin::stats,
        super::admin::token,
        super::loglevel::get,
        super::loglevel::put,
        poll,
        connect_ws,
        sse,
        openapi_json,
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "rooms", description = "Publish to rooms and read them (API key)."),
        (name = "terminals", description = "The service list and terminals' inboxes (API key)."),
        (name = "operations", description = "Health, metrics and this document."),
        (name = "transports", description = "What terminals use: terminal tokens, not the API key."),
        (name = "admin", description = "The admin page's API (API key)."),
        (name = "assets", description = "The browser client, the demo page and the admin page."),
    ),
)]
#[derive(Debug)]
pub struct ApiDoc;

/// The browser assets: path, operation id, summary, media type.
const ASSETS: &[(&str, &str, &str, &str)] = &[
    ("/", "demo_html", "The demo page", "text/html"),
    (
        "/livepush.js",
        "client_js",
        "The browser client",
        "text/javascript",
    ),
    (
        "/demo/app.js",
        "demo_js",
        "The demo page's script",
        "text/javascript",
    ),
    (
        "/demo/style.css",
        "demo_css",
        "The demo page's style sheet",
        "text/css",
    ),
    ("/admin", "admin_html", "The admin page", "text/html"),
    (
        "/admin/app.js",
        "admin_js",
        "The admin page's script",
        "text/javascript",
    ),
    (
        "/admin/style.css",
        "admin_css",
        "The admin page's style sheet",
        "text/css",
    ),
];

/// The operations that wait on the engine (the store, or Redis), so may answer 500 or 503.
const ENGINE_BACKED: &[&str] = &[
    "publish",
    "history",
    "reset_history",
    "room_info",
    "terminals",
    "terminal",
    "post_inbox",
];

/// The document for a server with these limits.
pub fn document(limits: &Limits) -> Document {
    let mut doc = ApiDoc::openapi();
    // `POST /v1/connect` without an upgrade is a long-poll: the operation of `POST /v1/poll`.
    if let Some(mut poll) = doc.paths.paths.get("/v1/poll").and_then(|p| p.post.clone()) {
        poll.operation_id = Some("connect_poll".into());
        poll.summary = Some("A long-poll exchange (the same as `POST /v1/poll`)".into());
        if let Some(connect) = doc.paths.paths.get_mut("/v1/connect") {
            connect.post = Some(poll);
        }
    }
    for (path, id, summary, media_type) in ASSETS {
        let content = ContentBuilder::new()
            .schema(Some(utoipa::openapi::schema::Object::with_type(
                utoipa::openapi::schema::Type::String,
            )))
            .build();
        let op = utoipa::openapi::path::OperationBuilder::new()
            .tag("assets")
            .summary(Some(*summary))
            .operation_id(Some(*id))
            .response(
                "200",
                ResponseBuilder::new()
                    .description(*summary)
                    .content(*media_type, content),
            )
            .build();
        doc.paths
            .add_path_operation(*path, vec![HttpMethod::Get], op);
    }
    Common.modify(&mut doc);
    // `messages` of a batch: at most `max_batch_messages`.
    if let Some(components) = doc.components.as_mut()
        && let Some(RefOr::T(Schema::Object(batch))) = components.schemas.get_mut("BatchRequest")
        && let Some(RefOr::T(Schema::Array(messages))) = batch.properties.get_mut("messages")
    {
        messages.max_items = Some(limits.max_batch_messages);
    }
    doc
}

/// The document as served: pretty JSON, with a final newline. Every unsigned integer is
/// bounded by its type's maximum, as the server's parsing bounds it.
pub fn json(limits: &Limits) -> String {
    let mut doc = serde_json::to_value(document(limits)).unwrap_or_default();
    bound_unsigned(&mut doc);
    let mut out = serde_json::to_string_pretty(&doc).unwrap_or_default();
    out.push('\n');
    out
}

/// `maximum` for every unsigned integer schema (JSON Schema knows no unsigned format), and
/// the format named as usual (utoipa writes `u-int64`).
fn bound_unsigned(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let unsigned = match map.get("format").and_then(|f| f.as_str()) {
                Some("u-int64" | "uint64") => Some(("uint64", u64::MAX)),
                Some("u-int32" | "uint32") => Some(("uint32", u64::from(u32::MAX))),
                _ => None,
            };
            if let Some((format, max)) = unsigned {
                map.insert("format".into(), format.into());
                map.entry("maximum").or_insert(max.into());
            }
            map.values_mut().for_each(bound_unsigned);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(bound_unsigned),
        _ => {}
    }
}

/// `GET /v1/openapi.json`, built once.
pub fn route(limits: &Limits) -> MethodRouter<Arc<App>> {
    let body = Bytes::from(json(limits));
    get(move || async move { ([(header::CONTENT_TYPE, "application/json")], body).into_response() })
}

/// The responses every operation shares, and the security schemes.
#[derive(Debug)]
struct Common;

impl Modify for Common {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The server's API key (`--api-key`), as `Authorization: Bearer KEY`.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "terminal_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "token",
                "A terminal token (JWT HS256 signed with `--token-secret`; `livepush token` \
                 mints one). A long-poll carries it in its body instead.",
            ))),
        );
        for item in doc.paths.paths.values_mut() {
            for op in operations(item) {
                let keyed = op.security.as_ref().is_some_and(|s| {
                    serde_json::to_value(s).is_ok_and(|v| v.to_string().contains("\"api_key\""))
                });
                if keyed {
                    add(op, 401, "`unauthorized`: missing or wrong API key.");
                }
                if op.request_body.is_some() {
                    add(
                        op,
                        408,
                        "The body did not arrive within `--body-timeout`; the connection is \
                         closed.",
                    );
                    add(
                        op,
                        413,
                        "`too_large`: the body exceeds its limit (`--max-publish-bytes`, \
                         `--max-batch-bytes` or `--max-batch-messages`, `--max-poll-bytes`).",
                    );
                }
                if ENGINE_BACKED.contains(&op.operation_id.as_deref().unwrap_or_default()) {
                    add(op, 500, "`internal`: storage failure.");
                    add(
                        op,
                        503,
                        "`unavailable`: the shared store (Redis) is unreachable.",
                    );
                }
                add(
                    op,
                    429,
                    "`rate_limited`: the source address holds `--max-connections-per-address` \
                     connections (the connection is closed).",
                );
            }
        }
    }
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.post.as_mut(),
        item.put.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// Add an error answer, unless the operation describes that status itself.
fn add(op: &mut Operation, status: u16, description: &str) {
    op.responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| RefOr::T(error_response(description)));
}

fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    "ErrorBody",
                ))))
                .build(),
        )
        .build()
}

// The terminal-facing endpoints, described on stubs (their handlers are the transports').

/// A long-poll request: everything the server needs, since it keeps no session between
/// polls (docs/protocol.md §3.1). Fields other than these are ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct PollRequest {
    /// A terminal token; without one, 401 (except in dev mode).
    token: Option<String>,
    /// Dev mode only: the anonymous terminal id the server gave in `connected` (a terminal
    /// id; ignored with a token).
    terminal: Option<String>,
    /// Answer with `connected` first.
    #[serde(default)]
    hello: bool,
    /// The rooms, each with `{}` for a fresh join or `{epoch, seq}` to continue. A bad room
    /// or position is answered with an `error` frame, not refused.
    #[serde(default)]
    rooms: std::collections::BTreeMap<String, PollRoom>,
    /// Inbox messages after this seq are sent; absent: after the acknowledged position.
    inbox: Option<u64>,
    /// How long the poll may be parked; capped at `--poll-max-wait` (default 25000).
    wait_ms: Option<u64>,
    /// Client frames to run (`join`, `send`, `ack`, …); a bad one is answered with an
    /// `error` frame.
    #[serde(default)]
    #[schema(value_type = Vec<AnyJson>)]
    ops: Vec<serde_json::Value>,
    /// The terminal is leaving: run the ops, leave the rooms, answer at once.
    #[serde(default)]
    bye: bool,
}

/// A room of a poll: `{}`, or `{epoch, seq}` (both, or an `error` frame answers it).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct PollRoom {
    epoch: Option<String>,
    seq: Option<u64>,
}

/// A long-poll answer: the frames, and where the inbox stands. A `bye` poll's answer also
/// lists its `left` frames as `ops`.
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct PollAnswer {
    frames: Vec<ServerFrame>,
    inbox: Option<InboxPosition>,
    ops: Option<Vec<ServerFrame>>,
}

/// An event of an SSE stream.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct SseEvent {
    /// One server frame (JSON) per line.
    data: String,
    /// The positions of every room of the stream after this event (`ROOM:EPOCH:SEQ,…`), on
    /// events that carry a reliable message or a `joined`.
    id: Option<String>,
}

/// A server frame (docs/protocol.md §6), named by `op`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ServerFrame {
    op: String,
}

#[utoipa::path(
    post,
    path = "/v1/poll",
    tag = "transports",
    summary = "A long-poll exchange",
    description = "Authenticates with the body's `token`, attaches to every room at its \
        position (replaying what is missing), runs the ops, and waits until something is to \
        be sent or `wait_ms` passes.",
    request_body = PollRequest,
    responses(
        (status = 200, description = "The frames (possibly none).", body = PollAnswer),
        (status = 400, description = "The body is not a poll.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token, or a bad or expired one.", body = ErrorBody),
        (status = 429, description = "`rate_limited`: the terminal holds `--max-sessions-per-terminal` sessions, or the address too many connections.", body = ErrorBody),
    ),
)]
#[allow(dead_code)]
fn poll() {}

#[utoipa::path(
    get,
    path = "/v1/connect",
    tag = "transports",
    summary = "Open a WebSocket session",
    description = "An RFC 6455 upgrade; the terminal then sends `connect` with its token \
        (docs/protocol.md §4).",
    params(
        ("Connection" = String, Header, pattern = r"^([^,]*,)*[ \t]*[Uu][Pp][Gg][Rr][Aa][Dd][Ee][ \t]*(,[^,]*)*$",
            description = "A comma-separated list that names `upgrade`."),
        ("Upgrade" = String, Header, pattern = "^[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt]$", description = "`websocket`."),
        ("Sec-WebSocket-Version" = String, Header, pattern = "^13$", description = "13."),
        ("Sec-WebSocket-Key" = String, Header, pattern = "^[A-Za-z0-9+/]{21}[AQgw]==$", description = "16 random bytes in base64."),
    ),
    responses(
        (status = 101, description = "Switched to WebSocket."),
        (status = 400, description = "Not a WebSocket upgrade (or a malformed one).", body = ErrorBody),
        (status = 426, description = "An unsupported `Sec-WebSocket-Version` (13 is).", body = ErrorBody),
    ),
)]
#[allow(dead_code)]
fn connect_ws() {}

#[utoipa::path(
    get,
    path = "/v1/sse",
    tag = "transports",
    summary = "A Server-Sent Events stream",
    params(
        ("rooms" = String, Query, pattern = r"^[A-Za-z0-9_.:,-]*[A-Za-z0-9_.:-][A-Za-z0-9_.:,-]*$",
            description = "Room ids separated by commas (each a room id, empty entries ignored)."),
        ("terminal" = Option<String>, Query, description = "Dev mode only: reuse an anonymous terminal id (a terminal id; ignored with a token)."),
        ("since" = Option<String>, Query, pattern = r"^,*([A-Za-z0-9_.:-]{1,128}:[A-Za-z0-9_-]{1,64}:\+?[0-9]{1,19}(,+[A-Za-z0-9_.:-]{1,128}:[A-Za-z0-9_-]{1,64}:\+?[0-9]{1,19})*)?,*$",
            description = "Where to resume: `ROOM:EPOCH:SEQ` entries separated by commas. \
            `Last-Event-ID` wins over it."),
        ("Last-Event-ID" = Option<String>, Header, nullable = false, pattern = r"^,*([A-Za-z0-9_.:-]{1,128}:[A-Za-z0-9_-]{1,64}:\+?[0-9]{1,19}(,+[A-Za-z0-9_.:-]{1,128}:[A-Za-z0-9_-]{1,64}:\+?[0-9]{1,19})*)?,*$",
            description = "The `id` of the last event received (the same syntax as `since`)."),
    ),
    responses(
        (status = 200, description = "The stream: each event carries one frame per `data:` line.", body = SseEvent, content_type = "text/event-stream"),
        (status = 400, description = "`rooms` missing or bad, or a bad position.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token, or a bad or expired one.", body = ErrorBody),
        (status = 429, description = "`rate_limited`: the terminal holds `--max-sessions-per-terminal` sessions, or the address too many connections.", body = ErrorBody),
    ),
    security(("terminal_token" = [])),
)]
#[allow(dead_code)]
fn sse() {}

#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    summary = "This document (no key needed)",
    responses((status = 200, description = "OpenAPI 3.1.", body = Object)),
)]
#[allow(dead_code)]
fn openapi_json() {}

//! The admin API, behind the API key like the rest: `GET /v1/admin/stats` (every node's
//! figures and the busiest rooms, see [`crate::admin`]) and `POST /v1/admin/token` (a token
//! for the admin room only, with which the admin page joins it for live snapshots).
//!
//! A minted token grants exactly [`ADMIN_ROOM`], without `send`, for `admin_token_ttl` (never
//! past `max_token_ttl`); its terminal id is `admin-` and a random suffix.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::ApiError;
use crate::admin::{ADMIN_ROOM, STATS_TYPE, Snapshot};
use crate::app::App;
use crate::auth::{Claims, now_secs};
use crate::error::ErrorBody;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StatsQuery {
    /// Rooms listed at most: 1 or more; larger than `--admin-rooms` (and absent) means
    /// `--admin-rooms`.
    #[param(minimum = 1)]
    limit: Option<u32>,
}

/// `GET /v1/admin/stats?limit=N`: `limit` rooms at most (1 to `admin_rooms`; default and
/// larger values: `admin_rooms`).
#[utoipa::path(
    get,
    path = "/v1/admin/stats",
    tag = "admin",
    summary = "Every node's figures and the busiest rooms",
    params(StatsQuery),
    responses(
        (status = 200, description = "A snapshot; `complete: false` when the other nodes' figures could not be read.", body = Snapshot),
        (status = 400, description = "Bad or unknown query parameter.", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub async fn stats(
    State(app): State<Arc<App>>,
    query: Result<Query<StatsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let max = app.config.limits.admin_rooms;
    let limit = match q.limit {
        None => max,
        Some(0) => {
            return Err(ApiError::bad_request(format!(
                "`limit` must be 1 or more (at most admin_rooms {max})"
            )));
        }
        Some(n) => (n as usize).min(max),
    };
    Ok(Json(app.admin.snapshot(limit).await).into_response())
}

/// A token for the admin room, and how to use it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    /// A terminal token granting the admin room only, without `send`.
    pub token: String,
    /// Its terminal id (`admin-` and a random suffix).
    pub terminal: String,
    /// The admin room.
    pub room: String,
    /// The message type of the snapshots the room carries.
    #[serde(rename = "type")]
    pub type_: String,
    /// When the token expires (Unix seconds).
    pub exp: u64,
    /// Its lifetime in seconds (`--admin-token-ttl`, at most `--max-token-ttl`).
    pub ttl_s: u64,
    /// How often the room gets a snapshot (`--admin-interval`), in ms.
    pub interval_ms: u64,
    /// The node that minted it.
    pub node: String,
}

/// `POST /v1/admin/token`: a terminal token for the admin room only (no body).
#[utoipa::path(
    post,
    path = "/v1/admin/token",
    tag = "admin",
    summary = "A short-lived token for the admin room (live snapshots)",
    responses((status = 200, description = "The token.", body = AdminToken)),
    security(("api_key" = [])),
)]
pub async fn token(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let limits = &app.config.limits;
    let ttl = limits.admin_token_ttl.min(limits.max_token_ttl).as_secs();
    let terminal = format!(
        "admin-{}",
        crate::store::new_epoch()
            .chars()
            .take(10)
            .collect::<String>()
    );
    let exp = now_secs() + ttl;
    let token = app
        .keys
        .mint(&Claims {
            sub: terminal.clone(),
            exp,
            rooms: vec![ADMIN_ROOM.to_owned()],
            send: false,
        })
        .map_err(ApiError::internal)?;
    Ok(Json(AdminToken {
        token,
        terminal,
        room: ADMIN_ROOM.to_owned(),
        type_: STATS_TYPE.to_owned(),
        exp,
        ttl_s: ttl,
        interval_ms: limits.admin_interval.as_millis() as u64,
        node: app.admin.id().to_owned(),
    })
    .into_response())
}

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
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use crate::admin::{ADMIN_ROOM, STATS_TYPE};
use crate::app::App;
use crate::auth::{Claims, now_secs};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    limit: Option<usize>,
}

/// `GET /v1/admin/stats?limit=N`: `limit` rooms at most (1 to `admin_rooms`; default and
/// larger values: `admin_rooms`).
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
        Some(n) => n.min(max),
    };
    Ok(Json(app.admin.snapshot(limit).await).into_response())
}

/// `POST /v1/admin/token`: a terminal token for the admin room only (no body).
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
    Ok(Json(json!({
        "token": token,
        "terminal": terminal,
        "room": ADMIN_ROOM,
        "type": STATS_TYPE,
        "exp": exp,
        "ttl_s": ttl,
        "interval_ms": limits.admin_interval.as_millis() as u64,
        "node": app.admin.id(),
    }))
    .into_response())
}

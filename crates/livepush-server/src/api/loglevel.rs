//! `GET` and `PUT /v1/admin/log-level` (API key): the log filter in force, and changing it
//! while the server runs, as `SIGHUP` does from the configuration file.
//!
//! Invariant: the library never touches the logger itself. The binary, which installs it,
//! hands over a [`LogLevelControl`] in [`crate::Config::log_level`]; without one the endpoint
//! answers 404. A directive the filter refuses changes nothing and is a 400 `bad_request`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::App;
use crate::config::LogLevelControl;
use crate::error::{ApiError, ErrorBody};

/// A log filter, as `--log-level` takes it (`info`, `info,livepush_server=debug`).
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Level {
    pub level: String,
}

fn control(app: &App) -> Result<&Arc<dyn LogLevelControl>, ApiError> {
    app.config
        .log_level
        .as_ref()
        .ok_or_else(|| ApiError::not_found("this server's log level cannot be changed"))
}

/// `GET /v1/admin/log-level`: `{"level": DIRECTIVE}`.
#[utoipa::path(
    get,
    path = "/v1/admin/log-level",
    tag = "operations",
    operation_id = "get_log_level",
    summary = "The log filter in force",
    responses(
        (status = 200, description = "The filter.", body = Level),
        (status = 404, description = "This server's log level cannot be changed (no reloadable logger).", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub async fn get(State(app): State<Arc<App>>) -> Result<Json<Level>, ApiError> {
    Ok(Json(Level {
        level: control(&app)?.current(),
    }))
}

/// `PUT /v1/admin/log-level` with `{"level": DIRECTIVE}`: applies it, answers the level now
/// in force.
#[utoipa::path(
    put,
    path = "/v1/admin/log-level",
    tag = "operations",
    operation_id = "set_log_level",
    summary = "Change the log filter while the server runs",
    request_body = Level,
    responses(
        (status = 200, description = "The filter now in force.", body = Level),
        (status = 400, description = "Not a filter, or not a JSON `{\"level\": …}` body.", body = ErrorBody),
        (status = 404, description = "This server's log level cannot be changed (no reloadable logger).", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub async fn put(State(app): State<Arc<App>>, body: Bytes) -> Result<Json<Level>, ApiError> {
    let control = control(&app)?;
    let body: Level = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "expected {{\"level\": \"a filter such as info,livepush_server=debug\"}}: {e}"
        ))
    })?;
    control
        .set(body.level.trim())
        .map_err(ApiError::bad_request)?;
    let level = control.current();
    tracing::warn!(%level, "log level changed through the API");
    Ok(Json(Level { level }))
}

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
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::App;
use crate::config::LogLevelControl;
use crate::error::ApiError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelBody {
    level: String,
}

fn control(app: &App) -> Result<&Arc<dyn LogLevelControl>, ApiError> {
    app.config
        .log_level
        .as_ref()
        .ok_or_else(|| ApiError::not_found("this server's log level cannot be changed"))
}

/// `GET /v1/admin/log-level`: `{"level": DIRECTIVE}`.
pub async fn get(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"level": control(&app)?.current()})))
}

/// `PUT /v1/admin/log-level` with `{"level": DIRECTIVE}`: applies it, answers the level now
/// in force.
pub async fn put(State(app): State<Arc<App>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let control = control(&app)?;
    let body: LevelBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "expected {{\"level\": \"a filter such as info,livepush_server=debug\"}}: {e}"
        ))
    })?;
    control
        .set(body.level.trim())
        .map_err(ApiError::bad_request)?;
    let level = control.current();
    tracing::warn!(%level, "log level changed through the API");
    Ok(Json(json!({"level": level})))
}

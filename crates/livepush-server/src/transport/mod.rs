//! Transports: how frames travel between a terminal and its session. Each transport is only
//! framing; the session (`crate::session`) decides what every frame means, and
//! [`authenticate`] who the terminal is, the same way on every transport.

pub mod longpoll;
pub mod sse;
pub mod ws;

use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::http::Extensions;

use crate::app::App;
use crate::auth::{AuthError, identify};
use crate::error::ApiError;
use crate::hooks::connect::{Admitted, Caller};

/// Who a connecting terminal is. A token (non-empty) goes through JWT verification alone.
/// Without one, the connect hook decides when there is one (`caller` says what the request
/// carries; it is only built then), else `dev` mode's anonymous terminal, else 401.
pub async fn authenticate(
    app: &App,
    token: Option<&str>,
    dev_id: Option<&str>,
    caller: impl FnOnce() -> Caller,
) -> Result<Admitted, ApiError> {
    let token = token.filter(|t| !t.is_empty());
    if let (None, Some(hook)) = (token, &app.connect_hook) {
        return hook.admit(&caller(), app.config.limits.max_token_ttl).await;
    }
    identify(&app.keys, app.config.dev, token, dev_id)
        .map(|terminal| Admitted {
            terminal,
            expires: None,
        })
        .map_err(|e| match e {
            AuthError::BadTerminalId => ApiError::bad_request(e.to_string()),
            _ => ApiError::unauthorized(e.to_string()),
        })
}

/// The client's address, as the server put it on the request.
pub fn remote(extensions: &Extensions) -> Option<SocketAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| *a)
}

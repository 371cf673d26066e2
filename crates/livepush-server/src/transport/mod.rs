//! Transports: how frames travel between a terminal and its session. Each transport is only
//! framing; the session (`crate::session`) decides what every frame means, and
//! [`authenticate`] who the terminal is, the same way on every transport.

pub mod longpoll;
pub mod sse;
pub mod ws;

use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::http::Extensions;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use livepush_proto::Transport;
use tracing::Instrument;

use crate::app::App;
use crate::auth::{AuthError, identify};
use crate::error::ApiError;
use crate::hooks::connect::{Admitted, Caller};
use crate::logctx::conn_span;
use crate::outbox::ConnId;

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

/// Run an HTTP transport's request (a poll, the opening of an SSE stream) in the span of its
/// connection `conn`; a refusal is answered as JSON and logged there.
///
/// A plain function returning a future, not an `async fn`: an `async fn` keeps its
/// arguments in its state beside the futures made of them, so `request` would be held twice
/// for as long as a poll is parked (rustc does not overlap an `async fn`'s arguments with
/// its other state; measured in `longpoll`'s tests).
pub fn in_conn_span<F>(
    conn: ConnId,
    transport: Transport,
    request: F,
) -> impl Future<Output = Response>
where
    F: Future<Output = Result<Response, ApiError>>,
{
    let span = conn_span(conn, transport);
    request
        .instrument(span.clone())
        .map(move |answer| match answer {
            Ok(r) => r,
            Err(e) => {
                span.in_scope(|| {
                    tracing::debug!(
                        status = e.status.as_u16(),
                        code = e.code.as_str(),
                        "refused"
                    );
                });
                e.into_response()
            }
        })
}

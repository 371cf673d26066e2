//! Log context: which request and which connection a log line is about.
//!
//! Invariants:
//! - Every HTTP request runs in a `http{req=ID}` span, and its answer carries the id in
//!   `X-Request-Id`: the client's own if it sent a well-formed one ([`valid_request_id`]),
//!   else a new one. The span is at `ERROR` level, so that it is there whatever the filter
//!   lets through.
//! - A terminal's connection (a WebSocket, a poll, an SSE stream) gets a connection id, the
//!   same as its session's [`ConnId`], and runs in a `conn{conn=N transport=T terminal=ID}`
//!   span ([`conn_span`]) from the start of its request; `terminal` is recorded once the
//!   terminal is known.
//! - An open WebSocket is driven by the reactor, outside any span (entering one on every
//!   poll of a hundred thousand idle connections would cost time, and keeping one per
//!   connection memory): its log lines carry `conn` and `terminal` as fields of each event,
//!   read from its session, which costs nothing until a line is written.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use livepush_proto::Transport;
use tracing::Instrument;

use crate::outbox::ConnId;

/// The request id header, in and out.
pub const REQUEST_ID: &str = "x-request-id";

/// Longest request id taken from a client.
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// Whether a client's `X-Request-Id` is used as is: 1 to [`MAX_REQUEST_ID_LEN`] characters
/// of `A-Z a-z 0-9 . _ : -` (nothing a log line or a header could be confused by).
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A new request id: 16 random hex digits.
fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Middleware: run the request in its `http{req=ID}` span and answer with `X-Request-Id`.
///
/// A plain function returning a future, not an `async fn`, which would keep the request in
/// its state beside the future made of it for as long as a long-poll is parked (issue 18,
/// docs/performance.md).
pub fn request_id(req: Request, next: Next) -> impl Future<Output = Response> {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_request_id(v))
        .map_or_else(new_request_id, str::to_owned);
    let span = tracing::error_span!("http", req = %id);
    let answer = next.run(req).instrument(span);
    async move {
        let mut res = answer.await;
        if let Ok(v) = HeaderValue::from_str(&id) {
            res.headers_mut().insert(REQUEST_ID, v);
        }
        res
    }
}

/// The span of connection `conn` over `transport`; record `terminal` in it once known
/// ([`tracing::Span::record`]).
pub fn conn_span(conn: ConnId, transport: Transport) -> tracing::Span {
    let transport = transport.as_str();
    tracing::error_span!("conn", conn, transport, terminal = tracing::field::Empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_short_and_plain() {
        for ok in ["a", "4bf92f3577b34da6", "req-1.2_3:x", &"x".repeat(64)] {
            assert!(valid_request_id(ok), "{ok}");
        }
        for bad in ["", "a b", "a\nb", "a\"b", "é", &"x".repeat(65)] {
            assert!(!valid_request_id(bad), "{bad:?}");
        }
        let id = new_request_id();
        assert!(valid_request_id(&id) && id.len() == 16, "{id}");
    }
}

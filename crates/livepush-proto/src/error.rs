//! Error codes: of `error` frames, and of the HTTP API's JSON errors (one set, so that a code
//! means the same wherever it appears).

use serde::{Deserialize, Serialize};

/// The `code` of an `error` frame or of an HTTP API error. The set is fixed by the contract:
/// the frame codes, the HTTP API's codes, and `unavailable` (contract v1.1: a send refused
/// because the backend's hook failed; livepush also answers it, with HTTP 503, when the store
/// that nodes share cannot be reached).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ErrorCode {
    /// The frame is not valid JSON, has an unknown `op` or a missing/ill-typed field.
    BadFrame,
    /// No valid `connect` yet, or the token is invalid or expired.
    Unauthorized,
    /// The token does not grant this room, or the terminal may not `send`.
    Forbidden,
    /// Too many frames of this kind in too short a time.
    RateLimited,
    /// The room is muted: terminals may not `send`.
    Muted,
    /// The frame or its `data` exceeds a configured size.
    TooLarge,
    /// The room is closed: joins are refused until it is opened again.
    RoomClosed,
    /// The server failed; the client may retry.
    Internal,
    /// HTTP API: the request is malformed (400).
    BadRequest,
    /// HTTP API: the room was never published to or joined (404).
    UnknownRoom,
    /// HTTP API: no such endpoint or terminal (404).
    NotFound,
    /// Something the server depends on is unreachable for now; retry later (HTTP 503).
    Unavailable,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Muted => "muted",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RoomClosed => "room_closed",
            ErrorCode::Internal => "internal",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownRoom => "unknown_room",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A frame the server refuses, with everything needed to build the `error` frame that answers
/// it: the code, a human-readable message, and the request `id` when one could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct FrameError {
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
    /// The room the refused request named, if any.
    pub room: Option<String>,
}

impl FrameError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        FrameError {
            id: None,
            code,
            message: message.into(),
            room: None,
        }
    }

    pub fn bad_frame(message: impl Into<String>) -> Self {
        FrameError::new(ErrorCode::BadFrame, message)
    }

    /// Attach the `id` of the request this error answers.
    pub fn with_id(mut self, id: Option<u64>) -> Self {
        self.id = id;
        self
    }

    /// Name the room the refused request was about.
    pub fn with_room(mut self, room: &str) -> Self {
        self.room = Some(room.to_owned());
        self
    }

    /// The `error` frame that answers this.
    pub fn to_frame(&self) -> crate::ServerFrame {
        crate::ServerFrame::Error {
            id: self.id,
            code: self.code,
            message: self.message.clone(),
            room: self.room.clone(),
        }
    }
}

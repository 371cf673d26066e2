//! The livepush wire contract, version 1, as types and pure functions.
//!
//! This crate does no IO. It knows what a frame looks like, how several frames share one
//! WebSocket text frame (or one long-poll answer), how to validate room ids, epochs and message
//! types, and how to encode the server's frames once so that the same bytes can be handed to
//! every subscriber. The server, the Rust SDK and the tests all speak through it, so the
//! contract is written down in exactly one place in code. `docs/protocol.md` is the prose.

#![forbid(unsafe_code)]

mod client;
mod codec;
mod error;
mod ids;
mod json;
mod server;
pub mod wake;

pub use client::{ClientEnvelope, ClientFrame};
pub use codec::split_frames;
pub use error::{ErrorCode, FrameError};
pub use ids::{
    Class, InvalidId, MAX_EPOCH_LEN, MAX_ROOM_LEN, MAX_TYPE_LEN, Position, Positions,
    PositionsError, validate_epoch, validate_room, validate_type,
};
pub use json::{DEFAULT_MAX_JSON_DEPTH, nesting_exceeds};
pub use server::{
    InboxPosition, Message, SeqTemplate, ServerFrame, Transport, Undecodable, encode_frame,
    encode_msg, encode_pulled,
};

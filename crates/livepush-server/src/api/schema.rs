//! The schemas of the HTTP API's identifiers, for the OpenAPI document
//! ([`super::openapi`]).
//!
//! Invariant: each identifier's schema is built from the same constants as the check the
//! server runs on it (`livepush_proto::validate_room`, `validate_type`, `validate_epoch`,
//! [`crate::auth::valid_terminal_id`]), so that what the document allows is what the server
//! accepts. A leaf: it uses nothing of the API's handlers.

use std::borrow::Cow;

use livepush_proto::{MAX_EPOCH_LEN, MAX_ROOM_LEN, MAX_TYPE_LEN};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::auth::MAX_TERMINAL_LEN;

/// The room alphabet (rooms and message types), as `validate_room` checks it.
const ROOM_CHARS: &str = "[A-Za-z0-9_.:-]";
/// The epoch alphabet, as `validate_epoch` checks it.
const EPOCH_CHARS: &str = "[A-Za-z0-9_-]";

fn string(pattern: String, max: usize, description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
        .min_length(Some(1))
        .max_length(Some(max))
        .description(Some(description))
        .into()
}

/// Declares a string schema named after the type.
macro_rules! id_schema {
    ($name:ident, $schema:expr) => {
        #[derive(Debug)]
        pub struct $name;
        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                $schema
            }
        }
        impl ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    };
}

id_schema!(
    RoomId,
    string(
        format!("^{ROOM_CHARS}{{1,{MAX_ROOM_LEN}}}$"),
        MAX_ROOM_LEN,
        "A room id."
    )
);
id_schema!(
    MessageType,
    string(
        format!("^{ROOM_CHARS}{{1,{MAX_TYPE_LEN}}}$"),
        MAX_TYPE_LEN,
        "A message type: the room alphabet, at most 64 bytes. Its class is the server's \
         `--class` setting for it unless the request names one."
    )
);
id_schema!(
    Epoch,
    string(
        format!("^{EPOCH_CHARS}{{1,{MAX_EPOCH_LEN}}}$"),
        MAX_EPOCH_LEN,
        "The history a room's seqs belong to; a new epoch starts seqs again at 1."
    )
);
id_schema!(
    TerminalId,
    ObjectBuilder::new()
        .schema_type(Type::String)
        // No control character (Unicode Cc: C0, DEL and C1).
        .pattern(Some("^[^\\u0000-\\u001f\\u007f-\\u009f]+$"))
        .min_length(Some(1))
        .max_length(Some(MAX_TERMINAL_LEN))
        .description(Some(format!(
            "A terminal id: 1 to {MAX_TERMINAL_LEN} bytes (UTF-8) without control characters."
        )))
        .into()
);
id_schema!(
    AnyJson,
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::AnyValue)
        .description(Some(
            "Any JSON value, nested at most `--max-json-depth` (32) levels, within \
             `--max-publish-bytes` (64 KiB); passed on to terminals as sent.",
        ))
        .into()
);

/// An optional unsigned integer read as JSON Schema's `integer` reads one: any number without
/// a fractional part (`5`, `5.0`, `5e0`), not only digits. For the request fields that the
/// document types `integer` (use with `#[serde(default, deserialize_with = …)]`).
pub fn integral_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::Deserialize;
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(u) = n.as_u64() {
        return Ok(Some(u));
    }
    match n.as_f64() {
        // 2^64: the first value past u64::MAX that an f64 can hold.
        Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 18_446_744_073_709_551_616.0 => {
            Ok(Some(f as u64))
        }
        _ => Err(D::Error::custom(format!(
            "invalid value: {n}, expected a non-negative integer of at most 64 bits"
        ))),
    }
}

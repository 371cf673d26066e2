//! `POST /v1/publish`: batch publish (contract v1.1, "Integration surface").
//!
//! A backend announcing a notice to 2,000 rooms, or flushing a queue, sends one request:
//! `{"messages":[{"room","type","data","class"?}, …]}`. The answer has one entry per message,
//! in order: `{"epoch","seq"}` for a reliable one, `{}` for a transient one, or
//! `{"error","message"}` for one refused (the others still go). A message whose shape is
//! wrong is refused alone, not the request. The reliable messages go to the engine together
//! ([`crate::hub::Hub::publish_batch`]: one store commit, or one Redis round trip). Bounded by
//! `max_batch_messages` and `max_batch_bytes` (413 `too_large` for the whole request).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use livepush_proto::{Class, ErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::schema::{AnyJson, MessageType, RoomId};
use super::{ApiError, Stored};
use crate::App;
use crate::error::ErrorBody;
use crate::hub::BatchMessage;

/// Messages to publish, each to its room. Fields other than `messages` are ignored; at most
/// `--max-batch-messages` messages (`maxItems`) and `--max-batch-bytes` of body.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = BatchRequest)]
pub struct Batch {
    /// Each message is checked on its own: one that does not match refuses only itself (an
    /// `error` entry in `results`).
    #[schema(value_type = Vec<Item>)]
    messages: Vec<Box<RawValue>>,
}

/// One message as sent; checked on its own so that a bad one refuses only itself.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = BatchMessage)]
pub struct Item {
    #[schema(value_type = RoomId)]
    room: String,
    #[serde(rename = "type")]
    #[schema(value_type = MessageType)]
    ty: String,
    #[schema(value_type = AnyJson)]
    data: Box<RawValue>,
    /// Overrides the class the server gives the type.
    #[serde(default)]
    class: Option<Class>,
}

/// The answer to a batch: one result per message, in order.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchAnswer {
    results: Vec<BatchResult>,
}

/// A message of a batch: stored (reliable), `{}` (transient, delivered), or refused.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum BatchResult {
    Stored(Stored),
    Delivered(Empty),
    Refused(ErrorBody),
}

/// `{}`: a transient message of a batch, delivered.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// `POST /v1/publish`
#[utoipa::path(
    post,
    path = "/v1/publish",
    operation_id = "publish_batch",
    tag = "rooms",
    summary = "Publish a batch of messages",
    request_body = Batch,
    responses(
        (status = 200, description = "One result per message, in order, whenever the body was read.", body = BatchAnswer),
        (status = 400, description = "The body is not `{\"messages\":[…]}`.", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub async fn publish(State(app): State<Arc<App>>, req: Request) -> Result<Response, ApiError> {
    let limits = &app.config.limits;
    let body = super::read_body(req, limits.max_batch_bytes, "max_batch_bytes").await?;
    let batch: Batch = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid JSON body (expected {{\"messages\":[…]}}): {e}"
        ))
    })?;
    let max = limits.max_batch_messages;
    if batch.messages.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            format!(
                "{} messages exceed max_batch_messages {max}",
                batch.messages.len()
            ),
        ));
    }
    let items: Vec<Result<Item, ApiError>> = batch
        .messages
        .iter()
        .map(|m| {
            let item: Item = serde_json::from_str(m.get())
                .map_err(|e| ApiError::bad_request(format!("invalid message: {e}")))?;
            let max = limits.max_publish_bytes;
            if item.data.get().len() > max {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::TooLarge,
                    format!("`data` exceeds max_publish_bytes {max}"),
                ));
            }
            super::data_depth(&app, &item.data)?;
            Ok(item)
        })
        .collect();
    let accepted: Vec<BatchMessage<'_>> = items
        .iter()
        .filter_map(|i| i.as_ref().ok())
        .map(|i| BatchMessage {
            room: &i.room,
            ty: &i.ty,
            data: &i.data,
            class: i.class,
        })
        .collect();
    let mut published = app.hub.publish_batch(&accepted).await.into_iter();
    let results: Vec<BatchResult> = items
        .iter()
        .map(|i| {
            let answer = match i {
                Err(e) => Err(e.clone()),
                Ok(_) => match published.next() {
                    Some(p) => p.map_err(ApiError::from),
                    None => Err(ApiError::internal("a message of the batch got no answer")),
                },
            };
            match answer {
                Ok(p) => match p.seq {
                    Some(seq) => BatchResult::Stored(Stored {
                        epoch: p.epoch.to_string(),
                        seq,
                    }),
                    None => BatchResult::Delivered(Empty {}),
                },
                Err(e) => BatchResult::Refused(ErrorBody {
                    error: e.code,
                    message: e.message,
                }),
            }
        })
        .collect();
    Ok(Json(BatchAnswer { results }).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_with_an_unknown_field_is_refused_alone() {
        assert!(serde_json::from_str::<Item>(r#"{"room":"r","type":"t","data":1}"#).is_ok());
        assert!(serde_json::from_str::<Item>(r#"{"room":"r","type":"t","data":1,"x":2}"#).is_err());
    }
}

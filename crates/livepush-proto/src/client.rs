//! Frames a client sends to the server.
//!
//! Parsing goes through a flat struct rather than serde's internally tagged enums: those buffer
//! the whole object (which breaks `RawValue`, so `data` would be parsed twice) and give error
//! messages that do not say which field is wrong. The flat struct keeps `data` as raw JSON and
//! lets every refusal name its field.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::FrameError;
use crate::ids::{Position, validate_epoch, validate_room, validate_type};
use crate::json::{DEFAULT_MAX_JSON_DEPTH, nesting_exceeds};

/// One client frame with its optional request `id`, which the reply or error echoes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientEnvelope {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(flatten)]
    pub frame: ClientFrame,
}

/// The client → server operations of the contract.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ClientFrame {
    /// First frame on a WebSocket. `token` may be absent only on a `--dev` server.
    Connect {
        #[serde(skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client: Option<String>,
    },
    /// Join a room, optionally resuming from a position.
    Join {
        room: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<Position>,
    },
    Leave {
        room: String,
    },
    /// Ask for reliable messages with `seq > since`.
    Pull {
        room: String,
        since: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// A terminal-sent transient message (chat).
    Send {
        room: String,
        #[serde(rename = "type")]
        ty: String,
        data: Box<RawValue>,
    },
    /// Inbox messages up to `inbox` are handled.
    Ack {
        inbox: u64,
    },
    Ping,
}

impl PartialEq for ClientFrame {
    fn eq(&self, other: &Self) -> bool {
        // RawValue has no PartialEq; compare the canonical serialization instead.
        serde_json::to_string(self).ok() == serde_json::to_string(other).ok()
    }
}

#[derive(Deserialize)]
struct Flat<'a> {
    #[serde(borrow)]
    op: Option<std::borrow::Cow<'a, str>>,
    id: Option<serde_json::Value>,
    token: Option<String>,
    client: Option<String>,
    room: Option<String>,
    since: Option<Box<RawValue>>,
    limit: Option<serde_json::Value>,
    #[serde(rename = "type")]
    ty: Option<String>,
    data: Option<Box<RawValue>>,
    inbox: Option<serde_json::Value>,
}

fn need<T>(v: Option<T>, op: &str, field: &str) -> Result<T, FrameError> {
    v.ok_or_else(|| FrameError::bad_frame(format!("`{op}` needs `{field}`")))
}

fn room_field(v: Option<String>, op: &str) -> Result<String, FrameError> {
    let room = need(v, op, "room")?;
    validate_room(&room).map_err(|e| FrameError::bad_frame(e.to_string()))?;
    Ok(room)
}

fn u64_field(v: &serde_json::Value, op: &str, field: &str) -> Result<u64, FrameError> {
    v.as_u64().ok_or_else(|| {
        FrameError::bad_frame(format!("`{op}`: `{field}` must be a non-negative integer"))
    })
}

impl ClientEnvelope {
    pub fn new(frame: ClientFrame) -> Self {
        ClientEnvelope { id: None, frame }
    }

    pub fn with_id(frame: ClientFrame, id: u64) -> Self {
        ClientEnvelope {
            id: Some(id),
            frame,
        }
    }

    /// Parse one frame (one JSON object), with a `send`'s `data` nested at most
    /// [`DEFAULT_MAX_JSON_DEPTH`] levels deep (see [`ClientEnvelope::parse_limited`]).
    pub fn parse(text: &str) -> Result<ClientEnvelope, FrameError> {
        Self::parse_limited(text, DEFAULT_MAX_JSON_DEPTH)
    }

    /// Parse one frame (one JSON object). Every refusal is a `bad_frame` error that carries
    /// the request `id` when the object had a readable one; a `send` whose `data` nests
    /// arrays and objects more than `max_json_depth` levels deep is refused too.
    pub fn parse_limited(text: &str, max_json_depth: usize) -> Result<ClientEnvelope, FrameError> {
        let flat: Flat<'_> = serde_json::from_str(text)
            .map_err(|e| FrameError::bad_frame(format!("not a JSON frame object: {e}")))?;
        let id = match &flat.id {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| FrameError::bad_frame("`id` must be a non-negative integer"))?,
            ),
        };
        Self::from_flat(flat, max_json_depth)
            .map(|frame| ClientEnvelope { id, frame })
            .map_err(|e| e.with_id(id))
    }

    fn from_flat(f: Flat<'_>, max_json_depth: usize) -> Result<ClientFrame, FrameError> {
        let op =
            f.op.ok_or_else(|| FrameError::bad_frame("frame has no `op`"))?;
        let op: &str = &op;
        Ok(match op {
            "connect" => ClientFrame::Connect {
                token: f.token,
                client: f.client,
            },
            "join" => {
                let room = room_field(f.room, op)?;
                let since = match f.since {
                    None => None,
                    Some(raw) if raw.get() == "null" => None,
                    Some(raw) => {
                        let pos: Position = serde_json::from_str(raw.get()).map_err(|_| {
                            FrameError::bad_frame(
                                "`join`: `since` must be {\"epoch\":STRING,\"seq\":INTEGER}",
                            )
                        })?;
                        validate_epoch(&pos.epoch)
                            .map_err(|e| FrameError::bad_frame(e.to_string()))?;
                        Some(pos)
                    }
                };
                ClientFrame::Join { room, since }
            }
            "leave" => ClientFrame::Leave {
                room: room_field(f.room, op)?,
            },
            "pull" => {
                let room = room_field(f.room, op)?;
                let since = need(f.since, op, "since")?;
                let since: u64 = serde_json::from_str(since.get()).map_err(|_| {
                    FrameError::bad_frame("`pull`: `since` must be a non-negative integer")
                })?;
                let limit = match f.limit {
                    None | Some(serde_json::Value::Null) => None,
                    Some(v) => {
                        let l = u64_field(&v, op, "limit")?;
                        Some(u32::try_from(l).unwrap_or(u32::MAX))
                    }
                };
                ClientFrame::Pull { room, since, limit }
            }
            "send" => {
                let room = room_field(f.room, op)?;
                let ty = f.ty.unwrap_or_else(|| "chat".to_owned());
                validate_type(&ty).map_err(|e| FrameError::bad_frame(e.to_string()))?;
                let data = need(f.data, op, "data")?;
                if nesting_exceeds(data.get(), max_json_depth) {
                    return Err(FrameError::bad_frame(format!(
                        "`send`: `data` nests more than max_json_depth ({max_json_depth}) levels"
                    )));
                }
                ClientFrame::Send { room, ty, data }
            }
            "ack" => {
                let inbox = need(f.inbox, op, "inbox")?;
                ClientFrame::Ack {
                    inbox: u64_field(&inbox, op, "inbox")?,
                }
            }
            "ping" => ClientFrame::Ping,
            other => {
                return Err(FrameError::bad_frame(format!(
                    "unknown op {:?}",
                    other.chars().take(32).collect::<String>()
                )));
            }
        })
    }

    /// Serialize for the wire.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| r#"{"op":"ping"}"#.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use proptest::prelude::*;

    #[test]
    fn parses_every_op() {
        let cases = [
            r#"{"op":"connect","token":"t","client":"x/1"}"#,
            r#"{"op":"join","room":"live:1"}"#,
            r#"{"op":"join","room":"live:1","since":{"epoch":"e1","seq":4},"id":7}"#,
            r#"{"op":"leave","room":"r"}"#,
            r#"{"op":"pull","room":"r","since":3,"limit":10}"#,
            r#"{"op":"send","room":"r","type":"chat","data":{"text":"hi"}}"#,
            r#"{"op":"ack","inbox":9}"#,
            r#"{"op":"ping"}"#,
        ];
        for c in cases {
            let env = ClientEnvelope::parse(c).unwrap_or_else(|e| panic!("{c}: {e}"));
            let again = ClientEnvelope::parse(&env.to_json()).unwrap();
            assert_eq!(env, again, "{c}");
        }
    }

    #[test]
    fn send_keeps_data_raw_and_defaults_type() {
        let env =
            ClientEnvelope::parse(r#"{"op":"send","room":"r","data":{"a": [1, 2]}}"#).unwrap();
        match env.frame {
            ClientFrame::Send { ty, data, .. } => {
                assert_eq!(ty, "chat");
                assert_eq!(data.get(), r#"{"a": [1, 2]}"#);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_problem_and_keep_the_id() {
        let e = ClientEnvelope::parse(r#"{"op":"join","id":3}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
        assert_eq!(e.id, Some(3));
        assert!(e.message.contains("room"), "{}", e.message);

        let e = ClientEnvelope::parse(r#"{"op":"fly"}"#).unwrap_err();
        assert!(e.message.contains("unknown op"));
        let e = ClientEnvelope::parse("not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
        let e = ClientEnvelope::parse(r#"{"op":"join","room":"bad room"}"#).unwrap_err();
        assert!(e.message.contains("room id"));
        let e = ClientEnvelope::parse(r#"{"op":"pull","room":"r","since":-1}"#).unwrap_err();
        assert!(e.message.contains("since"));
        let e =
            ClientEnvelope::parse(r#"{"op":"join","room":"r","since":{"epoch":"a:b","seq":1}}"#)
                .unwrap_err();
        assert!(e.message.contains("epoch"));
        let e = ClientEnvelope::parse(r#"[1,2]"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadFrame);
    }

    #[test]
    fn send_data_nested_too_deep_is_a_bad_frame() {
        let send = |levels: usize| {
            format!(
                r#"{{"op":"send","room":"r","id":4,"data":{}{}}}"#,
                "[".repeat(levels),
                "]".repeat(levels)
            )
        };
        assert!(ClientEnvelope::parse(&send(DEFAULT_MAX_JSON_DEPTH)).is_ok());
        let e = ClientEnvelope::parse(&send(DEFAULT_MAX_JSON_DEPTH + 1)).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadFrame, Some(4)));
        assert!(e.message.contains("max_json_depth"), "{}", e.message);
        // The limit is the caller's.
        assert!(ClientEnvelope::parse_limited(&send(3), 2).is_err());
        assert!(ClientEnvelope::parse_limited(&send(200), 200).is_ok());
    }

    proptest! {
        // Arbitrary input never panics: it parses or yields a bad_frame error.
        #[test]
        fn never_panics(s in ".{0,200}") {
            if let Err(e) = ClientEnvelope::parse(&s) {
                prop_assert_eq!(e.code, ErrorCode::BadFrame);
            }
        }

        #[test]
        fn join_round_trips(room in "[A-Za-z0-9_.:-]{1,128}", epoch in "[A-Za-z0-9_-]{1,64}", seq in any::<u64>(), id in proptest::option::of(any::<u64>())) {
            let env = ClientEnvelope { id, frame: ClientFrame::Join { room, since: Some(Position { epoch, seq }) } };
            prop_assert_eq!(ClientEnvelope::parse(&env.to_json()).unwrap(), env);
        }
    }
}

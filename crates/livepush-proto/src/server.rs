//! Frames the server sends to clients.
//!
//! [`ServerFrame`] is the typed view a client parses. The server encodes the frames of its hot
//! path (`msg`, `pulled`) with [`encode_msg`] and [`encode_pulled`] instead: a message is
//! serialized once, when it is published, and the resulting bytes are shared by every
//! subscriber, every replay and every `pulled` answer without being parsed again.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::ErrorCode;

/// The transport a session runs over, as named in the `connected` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Transport {
    Ws,
    Longpoll,
    Sse,
}

impl Transport {
    /// The contract's name of the transport, as in its frames (`ws`, `longpoll`, `sse`).
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Longpoll => "longpoll",
            Transport::Sse => "sse",
        }
    }
}

/// A terminal's inbox: the newest inbox `seq`, the newest one it acked, and how many
/// unacknowledged messages are still kept (contract v1.1, decision 6: a woken terminal knows it
/// has drained its inbox when `pending` is 0, even across gaps left by expired messages).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InboxPosition {
    pub seq: u64,
    pub acked: u64,
    #[serde(default)]
    pub pending: u64,
}

/// A room message as a client sees it. `seq` is present exactly for reliable messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub room: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub data: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub ts: u64,
}

/// Every server → client frame of the contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ServerFrame {
    Connected {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        terminal: String,
        transport: Transport,
        heartbeat_ms: u64,
        #[serde(default)]
        inbox: InboxPosition,
        #[serde(default)]
        wake_key: String,
    },
    Joined {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        room: String,
        epoch: String,
        seq: u64,
        recovered: bool,
        online: u64,
    },
    Msg(Message),
    Prompt {
        room: String,
        seq: u64,
    },
    Pulled {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        room: String,
        epoch: String,
        seq: u64,
        recovered: bool,
        messages: Vec<Message>,
    },
    Online {
        room: String,
        count: u64,
    },
    Inbox {
        seq: u64,
        #[serde(rename = "type")]
        ty: String,
        data: serde_json::Value,
        ts: u64,
    },
    Transport {
        #[serde(rename = "use")]
        use_: Transport,
        retry_ws_after_ms: u64,
    },
    Left {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        room: String,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        code: ErrorCode,
        message: String,
        /// The room the refused request named, when there is one (a livepush addition: a
        /// long-poll answer can refuse several rooms at once, none with a request id).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room: Option<String>,
    },
}

/// A `data` value of a frame that [`ServerFrame::parse_tolerant`] could not decode (most
/// likely nested deeper than serde_json's recursion limit of 128 levels, envelope included,
/// which a server without a nesting limit lets through).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    /// The `room` of the message, `None` for an `inbox` message.
    pub room: Option<String>,
    /// The message's `seq` (room or inbox), `None` for a transient message.
    pub seq: Option<u64>,
    /// Why it could not be decoded.
    pub error: String,
}

/// A JSON object's members, each kept as raw JSON. `RawValue` skips a value without
/// recursing, so this reads objects of any depth.
type RawMembers = std::collections::BTreeMap<String, Box<RawValue>>;

impl ServerFrame {
    /// Parse one server frame (used by clients and tests).
    pub fn parse(text: &str) -> Result<ServerFrame, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Parse one server frame, tolerating `data` values that cannot be decoded: each (the
    /// `data` of a `msg` or an `inbox`, or of a message inside `pulled`) becomes `null` and
    /// is named in the list returned with the frame, so that a client still learns the
    /// frame's position (room, seq) and keeps the rest of it (the other messages of a
    /// `pulled`). Fails as [`ServerFrame::parse`] does when anything else is wrong.
    pub fn parse_tolerant(
        text: &str,
    ) -> Result<(ServerFrame, Vec<Undecodable>), serde_json::Error> {
        let strict = match ServerFrame::parse(text) {
            Ok(frame) => return Ok((frame, Vec::new())),
            Err(e) => e,
        };
        let Ok(mut top) = serde_json::from_str::<RawMembers>(text) else {
            return Err(strict);
        };
        let mut bad = Vec::new();
        null_undecodable_data(&mut top, &mut bad);
        if let Some(raw) = top.get("messages") {
            let Ok(mut messages) = serde_json::from_str::<Vec<RawMembers>>(raw.get()) else {
                return Err(strict);
            };
            for m in &mut messages {
                null_undecodable_data(m, &mut bad);
            }
            top.insert(
                "messages".to_owned(),
                serde_json::value::to_raw_value(&messages)?,
            );
        }
        if bad.is_empty() {
            return Err(strict);
        }
        let frame = serde_json::from_str(&serde_json::to_string(&top)?)?;
        Ok((frame, bad))
    }

    pub fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
        ServerFrame::Error {
            id,
            code,
            message: message.into(),
            room: None,
        }
    }
}

/// Replace the `data` member of `m` by `null` if it cannot be decoded, and say so in `bad`.
fn null_undecodable_data(m: &mut RawMembers, bad: &mut Vec<Undecodable>) {
    let Some(data) = m.get("data") else { return };
    let Err(e) = serde_json::from_str::<serde_json::Value>(data.get()) else {
        return;
    };
    let field = |name: &str| m.get(name).map(|raw| raw.get());
    bad.push(Undecodable {
        room: field("room").and_then(|r| serde_json::from_str(r).ok()),
        seq: field("seq").and_then(|s| serde_json::from_str(s).ok()),
        error: e.to_string(),
    });
    if let Ok(null) = RawValue::from_string("null".to_owned()) {
        m.insert("data".to_owned(), null);
    }
}

/// Encode any server frame. Serializing these types cannot fail (string keys, no maps with
/// non-string keys), so a failure is a bug; it still yields a valid `internal` error frame
/// rather than a panic.
pub fn encode_frame(frame: &ServerFrame) -> Bytes {
    match serde_json::to_vec(frame) {
        Ok(v) => Bytes::from(v),
        Err(_) => Bytes::from_static(
            br#"{"op":"error","code":"internal","message":"frame encoding failed"}"#,
        ),
    }
}

#[derive(Serialize)]
struct MsgRef<'a> {
    op: &'static str,
    room: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    data: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    ts: u64,
}

/// Encode a `msg` frame once; `data` is copied through as raw JSON.
pub fn encode_msg(room: &str, ty: &str, data: &RawValue, seq: Option<u64>, ts: u64) -> Bytes {
    let frame = MsgRef {
        op: "msg",
        room,
        ty,
        data,
        seq,
        ts,
    };
    match serde_json::to_vec(&frame) {
        Ok(v) => Bytes::from(v),
        Err(_) => Bytes::from_static(
            br#"{"op":"error","code":"internal","message":"frame encoding failed"}"#,
        ),
    }
}

/// A frame encoded once up to its `seq`, which whoever sequences it fills in: the bytes before
/// the seq's digits and the bytes after them. The hub encodes a reliable message (or an inbox
/// message) before it has a seq; the engine that sequences it, in memory or in a Redis script,
/// only concatenates. `with_seq(n)` is byte for byte what [`encode_msg`] gives with `Some(n)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqTemplate {
    pub head: Bytes,
    pub tail: Bytes,
}

impl SeqTemplate {
    /// A reliable `msg` frame of `room`.
    pub fn msg(room: &str, ty: &str, data: &RawValue, ts: u64) -> SeqTemplate {
        // `{"op":"msg","room":R,"type":T,"data":D,"seq":` + N + `,"ts":MS}`
        let head = encode_msg(room, ty, data, Some(0), ts);
        let cut = format!(r#","ts":{ts}}}"#);
        SeqTemplate::split(&head, b"0".len() + cut.len())
    }

    /// An `inbox` frame: `{"op":"inbox","seq":` + N + `,"type":T,"data":D,"ts":MS}`.
    pub fn inbox(ty: &str, data: &RawValue, ts: u64) -> SeqTemplate {
        #[derive(Serialize)]
        struct Rest<'a> {
            #[serde(rename = "type")]
            ty: &'a str,
            data: &'a RawValue,
            ts: u64,
        }
        let rest = serde_json::to_vec(&Rest { ty, data, ts }).unwrap_or_else(|_| b"{}".to_vec());
        let mut tail = BytesMut::with_capacity(rest.len());
        tail.put_u8(b',');
        tail.put_slice(rest.get(1..).unwrap_or(b"}"));
        SeqTemplate {
            head: Bytes::from_static(br#"{"op":"inbox","seq":"#),
            tail: tail.freeze(),
        }
    }

    /// `encoded` ends with the digit `0` (the placeholder seq) and then `tail_len - 1` bytes.
    fn split(encoded: &[u8], tail_len: usize) -> SeqTemplate {
        let at = encoded.len().saturating_sub(tail_len);
        SeqTemplate {
            head: Bytes::copy_from_slice(&encoded[..at]),
            tail: Bytes::copy_from_slice(&encoded[(at + 1).min(encoded.len())..]),
        }
    }

    /// The frame with its seq.
    pub fn with_seq(&self, seq: u64) -> Bytes {
        let digits = seq.to_string();
        let mut out = BytesMut::with_capacity(self.head.len() + digits.len() + self.tail.len());
        out.put_slice(&self.head);
        out.put_slice(digits.as_bytes());
        out.put_slice(&self.tail);
        out.freeze()
    }
}

/// Encode a `pulled` frame around already-encoded `msg` frames, without re-serializing them.
pub fn encode_pulled(
    id: Option<u64>,
    room: &str,
    epoch: &str,
    latest: u64,
    recovered: bool,
    messages: &[&[u8]],
) -> Bytes {
    let body: usize = messages.iter().map(|m| m.len() + 1).sum();
    let mut out = BytesMut::with_capacity(body + room.len() + epoch.len() + 96);
    out.put_slice(br#"{"op":"pulled""#);
    if let Some(id) = id {
        out.put_slice(format!(r#","id":{id}"#).as_bytes());
    }
    // Room ids and epochs are validated to an alphabet that needs no JSON escaping, but go
    // through serde anyway so that this function is correct for any input.
    let room = serde_json::to_string(room).unwrap_or_else(|_| "\"\"".to_owned());
    let epoch = serde_json::to_string(epoch).unwrap_or_else(|_| "\"\"".to_owned());
    out.put_slice(
        format!(
            r#","room":{room},"epoch":{epoch},"seq":{latest},"recovered":{recovered},"messages":["#
        )
        .as_bytes(),
    );
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(m);
    }
    out.put_slice(b"]}");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        format!("{}{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn tolerant_parsing_keeps_the_frame_around_undecodable_data() {
        let deep = nested(200);
        assert!(
            ServerFrame::parse(&format!(
                r#"{{"op":"msg","room":"r","type":"t","data":{deep},"seq":3,"ts":1}}"#
            ))
            .is_err()
        );
        let (f, bad) = ServerFrame::parse_tolerant(&format!(
            r#"{{"op":"msg","room":"r","type":"t","data":{deep},"seq":3,"ts":1}}"#
        ))
        .unwrap();
        assert!(
            matches!(f, ServerFrame::Msg(Message { seq: Some(3), ref data, .. }) if data.is_null())
        );
        assert_eq!((bad[0].room.as_deref(), bad[0].seq), (Some("r"), Some(3)));
        assert!(bad[0].error.contains("recursion"), "{}", bad[0].error);
        let (f, bad) = ServerFrame::parse_tolerant(&format!(
            r#"{{"op":"pulled","room":"r","epoch":"e","seq":3,"recovered":true,"messages":[
                {{"op":"msg","room":"r","type":"t","data":1,"seq":2,"ts":1}},
                {{"op":"msg","room":"r","type":"t","data":{deep},"seq":3,"ts":1}}]}}"#
        ))
        .unwrap();
        let ServerFrame::Pulled { messages, .. } = f else {
            panic!("{f:?}")
        };
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].data, serde_json::json!(1));
        assert!(messages[1].data.is_null());
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].seq, Some(3));
        let (f, bad) = ServerFrame::parse_tolerant(&format!(
            r#"{{"op":"inbox","seq":4,"type":"t","data":{deep},"ts":1}}"#
        ))
        .unwrap();
        assert!(matches!(f, ServerFrame::Inbox { seq: 4, .. }));
        assert_eq!((bad[0].room.as_deref(), bad[0].seq), (None, Some(4)));
        // Anything else wrong is still an error, and good frames have nothing to report.
        assert!(ServerFrame::parse_tolerant(r#"{"op":"msg","room":"r"}"#).is_err());
        assert!(ServerFrame::parse_tolerant("nope").is_err());
        assert!(
            ServerFrame::parse_tolerant(r#"{"op":"pong"}"#)
                .unwrap()
                .1
                .is_empty()
        );
    }

    #[test]
    fn msg_round_trips() {
        let data = RawValue::from_string(r#"{"n":1}"#.to_owned()).unwrap();
        let b = encode_msg("live:1", "gift", &data, Some(5), 99);
        let f = ServerFrame::parse(std::str::from_utf8(&b).unwrap()).unwrap();
        assert_eq!(
            f,
            ServerFrame::Msg(Message {
                room: "live:1".into(),
                ty: "gift".into(),
                data: serde_json::json!({"n":1}),
                seq: Some(5),
                ts: 99
            })
        );
        let t = encode_msg("r", "chat", &data, None, 1);
        assert!(!std::str::from_utf8(&t).unwrap().contains("seq"));
    }

    #[test]
    fn pulled_wraps_encoded_messages() {
        let data = RawValue::from_string("[1]".to_owned()).unwrap();
        let m1 = encode_msg("r", "gift", &data, Some(1), 1);
        let m2 = encode_msg("r", "gift", &data, Some(2), 2);
        let b = encode_pulled(Some(4), "r", "ep", 2, true, &[&m1, &m2]);
        match ServerFrame::parse(std::str::from_utf8(&b).unwrap()).unwrap() {
            ServerFrame::Pulled {
                id,
                messages,
                recovered,
                seq,
                ..
            } => {
                assert_eq!(id, Some(4));
                assert_eq!(messages.len(), 2);
                assert!(recovered);
                assert_eq!(seq, 2);
            }
            other => panic!("{other:?}"),
        }
        let empty = encode_pulled(None, "r", "ep", 0, true, &[]);
        assert!(ServerFrame::parse(std::str::from_utf8(&empty).unwrap()).is_ok());
    }

    #[test]
    fn templates_are_the_encoded_frames_with_their_seq() {
        let data = RawValue::from_string(r#"{"n":"x\"y","seq":1}"#.to_owned()).unwrap();
        for seq in [0, 1, 9, 10, 12345, u64::MAX] {
            let t = SeqTemplate::msg("live:1", "gift", &data, 1_700_000_000_000);
            assert_eq!(
                t.with_seq(seq),
                encode_msg("live:1", "gift", &data, Some(seq), 1_700_000_000_000)
            );
            let i = SeqTemplate::inbox("notice", &data, 42).with_seq(seq);
            match ServerFrame::parse(std::str::from_utf8(&i).unwrap()).unwrap() {
                ServerFrame::Inbox { seq: s, ty, ts, .. } => {
                    assert_eq!((s, ty.as_str(), ts), (seq, "notice", 42));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn frames_match_the_contract_field_names() {
        let f = encode_frame(&ServerFrame::Transport {
            use_: Transport::Longpoll,
            retry_ws_after_ms: 5,
        });
        assert_eq!(
            &f[..],
            br#"{"op":"transport","use":"longpoll","retry_ws_after_ms":5}"#
        );
        let e = encode_frame(&ServerFrame::error(
            Some(1),
            ErrorCode::RoomClosed,
            "closed",
        ));
        assert_eq!(
            &e[..],
            br#"{"op":"error","id":1,"code":"room_closed","message":"closed"}"#
        );
        let p = encode_frame(&ServerFrame::Pong { id: None });
        assert_eq!(&p[..], br#"{"op":"pong"}"#);
    }
}

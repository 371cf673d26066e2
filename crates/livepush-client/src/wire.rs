//! Pure pieces of the HTTP transports, with no IO: the long-poll request body and answer, the
//! SSE request URL and event parser, and how a refused WebSocket upgrade is recognised.

use std::collections::BTreeMap;

use livepush_proto::{
    ClientEnvelope, InboxPosition, Position, Positions, ServerFrame, Undecodable,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite;
use tracing::warn;

/// A room's entry in a poll: `{}` for a fresh join, `{"epoch":E,"seq":N}` to continue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct RoomEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl RoomEntry {
    pub fn new(pos: Option<&Position>) -> RoomEntry {
        RoomEntry {
            epoch: pos.map(|p| p.epoch.clone()),
            seq: pos.map(|p| p.seq),
        }
    }
}

/// The body of `POST /v1/poll`.
#[derive(Debug, Serialize)]
pub(crate) struct PollBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<&'a str>,
    /// Dev mode: the anonymous terminal id the server gave, sent back when there is no token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terminal: Option<&'a str>,
    pub hello: bool,
    pub rooms: BTreeMap<&'a str, RoomEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbox: Option<u64>,
    pub wait_ms: u64,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub ops: &'a [ClientEnvelope],
    /// The terminal is leaving (contract v1.1, decision 5): the server runs the ops, takes
    /// it out of the rooms named and ends its long-poll presence at once.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub bye: bool,
}

impl<'a> PollBody<'a> {
    /// A poll body. `terminal` is only sent when there is no token (dev mode), `inbox` only
    /// once an inbox message was delivered.
    pub fn new(
        token: Option<&'a str>,
        terminal: Option<&'a str>,
        hello: bool,
        rooms: impl IntoIterator<Item = (&'a str, Option<&'a Position>)>,
        inbox: u64,
        wait_ms: u64,
        ops: &'a [ClientEnvelope],
    ) -> PollBody<'a> {
        let token = token.filter(|t| !t.is_empty());
        PollBody {
            token,
            terminal: if token.is_none() { terminal } else { None },
            hello,
            rooms: rooms
                .into_iter()
                .map(|(r, p)| (r, RoomEntry::new(p)))
                .collect(),
            inbox: (inbox > 0).then_some(inbox),
            wait_ms,
            ops,
            bye: false,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Plain data (strings, numbers, already-valid raw JSON): cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[derive(Deserialize)]
struct Answer {
    frames: Option<Vec<Box<RawValue>>>,
    /// The contract writes the answer to a `bye` poll as `{"ops":[…]}`.
    ops: Option<Vec<Box<RawValue>>>,
    inbox: Option<InboxPosition>,
}

/// A poll answer: its frames, and where the inbox stands after it (contract v1.1, decision
/// 6: every answer of a poll that opened the inbox says so; older servers do not).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PollAnswer {
    pub frames: Vec<ServerFrame>,
    /// For each of `frames`, the `data` values it carried that could not be decoded (see
    /// [`crate::skipped`]).
    pub undecodable: Vec<Vec<Undecodable>>,
    pub inbox: Option<InboxPosition>,
}

/// Parse a poll answer `{"frames":[…],"inbox":{…}}` (or a `bye` answer written
/// `{"ops":[…]}`). Unreadable frames are skipped (with a warning), as on WebSocket; an
/// unreadable answer, or one with neither list, is an error.
pub(crate) fn parse_answer(body: &[u8]) -> Result<PollAnswer, String> {
    let answer: Answer =
        serde_json::from_slice(body).map_err(|e| format!("unreadable poll answer: {e}"))?;
    let raw = answer
        .frames
        .or(answer.ops)
        .ok_or_else(|| "poll answer without `frames`".to_owned())?;
    let (frames, undecodable) = raw
        .iter()
        .filter_map(|raw| match ServerFrame::parse_tolerant(raw.get()) {
            Ok(f) => Some(f),
            Err(e) => {
                warn!(error = %e, "livepush: unreadable frame skipped");
                None
            }
        })
        .unzip();
    Ok(PollAnswer {
        frames,
        undecodable,
        inbox: answer.inbox,
    })
}

#[derive(Deserialize)]
struct ApiErrorBody {
    error: Option<String>,
    message: Option<String>,
}

/// The text of an HTTP error answer `{"error":CODE,"message":TEXT}` (or its first bytes).
pub(crate) fn error_message(status: u16, body: &[u8]) -> String {
    match serde_json::from_slice::<ApiErrorBody>(body) {
        Ok(ApiErrorBody {
            error: Some(code),
            message: Some(m),
        }) => format!("{code}: {m}"),
        Ok(ApiErrorBody {
            error: Some(code), ..
        }) => code,
        _ => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            if text.trim().is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {}", text.trim())
            }
        }
    }
}

/// The `message` of an HTTP error answer (or what [`error_message`] makes of the body).
pub(crate) fn error_text(status: u16, body: &[u8]) -> String {
    match serde_json::from_slice::<ApiErrorBody>(body) {
        Ok(ApiErrorBody {
            message: Some(m), ..
        }) => m,
        _ => error_message(status, body),
    }
}

/// The room a refused request was about: the frame's `room` field when the server names it
/// (and it is one of `rooms`), else read from the message as [`error_room`] does.
pub(crate) fn refused_room<'a>(
    field: Option<&str>,
    message: &str,
    rooms: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let rooms: Vec<&'a str> = rooms.into_iter().collect();
    if let Some(r) = field.and_then(|f| rooms.iter().find(|r| **r == f)) {
        return Some(r);
    }
    error_room(message, rooms)
}

/// The room an `error` frame without `id` is about, when its message names one of `rooms`.
///
/// Room entries of a poll have no request id, so the server's refusals of them (`forbidden`,
/// `room_closed`, `bad_frame`) carry neither `id` nor `room`; the livepush server names the
/// room in the message, quoted (`room "x" is closed`) or as a prefix (`x: …`). The longest
/// match wins (a room may be a prefix of another).
pub(crate) fn error_room<'a>(
    message: &str,
    rooms: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    rooms
        .into_iter()
        .filter(|r| message.contains(&format!("\"{r}\"")) || message.starts_with(&format!("{r}: ")))
        .max_by_key(|r| r.len())
}

/// The `GET /v1/sse` URL: `rooms` comma-separated, `since` = every known position, the
/// token (or, without one, the dev-mode terminal id).
pub(crate) fn sse_url(
    base: &url::Url,
    token: Option<&str>,
    terminal: Option<&str>,
    rooms: &[&str],
    since: &Positions,
) -> url::Url {
    let mut url = base.clone();
    {
        let mut q = url.query_pairs_mut();
        match (token.filter(|t| !t.is_empty()), terminal) {
            (Some(t), _) => {
                q.append_pair("token", t);
            }
            (None, Some(t)) => {
                q.append_pair("terminal", t);
            }
            (None, None) => {}
        }
        q.append_pair("rooms", &rooms.join(","));
        if !since.0.is_empty() {
            q.append_pair("since", &since.to_string());
        }
    }
    url
}

/// One Server-Sent Event: its `id` field (if any) and its data lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub id: Option<String>,
    pub data: String,
}

/// An incremental `text/event-stream` parser: feed it chunks as they arrive (they may split
/// lines and UTF-8 sequences anywhere), take complete events. Lines end with `\n`, `\r\n` or
/// `\r`; `:` lines are comments (keep-alives); `event` and `retry` fields are ignored.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    data: String,
    has_data: bool,
    id: Option<String>,
    /// The last chunk ended with `\r`: a `\n` starting the next one belongs to it.
    after_cr: bool,
}

impl SseParser {
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        let mut chunk = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        let mut i = 0;
        while i < self.buf.len() {
            let b = self.buf[i];
            if b == b'\n' || b == b'\r' {
                let line = String::from_utf8_lossy(&self.buf[start..i]).into_owned();
                if b == b'\r' {
                    if i + 1 < self.buf.len() {
                        if self.buf[i + 1] == b'\n' {
                            i += 1;
                        }
                    } else {
                        self.after_cr = true;
                    }
                }
                self.line(&line, &mut out);
                start = i + 1;
            }
            i += 1;
        }
        self.buf.drain(..start);
        out
    }

    fn line(&mut self, line: &str, out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if self.has_data {
                out.push(SseEvent {
                    id: self.id.take(),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.has_data = false;
            self.data.clear();
            self.id = None;
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {}
        }
    }
}

/// Whether a failed WebSocket handshake was refused at the HTTP level (a server or proxy
/// that answered, but not with an upgrade) rather than broken by the network. `Some(why)`
/// for a refusal: any non-`101` status except `5xx` (a gateway whose upstream is down is a
/// network problem), or a `101`-less answer without the upgrade headers.
pub(crate) fn ws_refusal(e: &tungstenite::Error) -> Option<String> {
    use tungstenite::error::ProtocolError as P;
    match e {
        tungstenite::Error::Http(resp) if !resp.status().is_server_error() => {
            Some(format!("WebSocket upgrade refused: HTTP {}", resp.status()))
        }
        tungstenite::Error::Protocol(
            P::MissingConnectionUpgradeHeader
            | P::MissingUpgradeWebSocketHeader
            | P::SecWebSocketAcceptKeyMismatch
            | P::WrongHttpVersion,
        ) => Some(format!("WebSocket upgrade refused: {e}")),
        _ => None,
    }
}

/// An error and its sources, on one line (reqwest's own message is terse).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use livepush_proto::ClientFrame;
    use serde_json::json;

    fn pos(epoch: &str, seq: u64) -> Position {
        Position {
            epoch: epoch.to_owned(),
            seq,
        }
    }

    #[test]
    fn poll_body_from_positions() {
        let p = pos("e1", 7);
        let ops = vec![ClientEnvelope::with_id(
            ClientFrame::Send {
                room: "a".into(),
                ty: "chat".into(),
                data: serde_json::value::to_raw_value(&json!({"t": 1})).unwrap(),
            },
            3,
        )];
        let body = PollBody::new(
            Some("TOK"),
            Some("anon-1"),
            true,
            [("a", Some(&p)), ("b:1", None)],
            0,
            25_000,
            &ops,
        );
        let v: serde_json::Value = serde_json::from_slice(&body.to_json()).unwrap();
        assert_eq!(
            v,
            json!({
                "token": "TOK", "hello": true,
                "rooms": {"a": {"epoch": "e1", "seq": 7}, "b:1": {}},
                "wait_ms": 25000,
                "ops": [{"id": 3, "op": "send", "room": "a", "type": "chat", "data": {"t": 1}}]
            })
        );
        // Dev mode: no token, the terminal id instead; no ops; the inbox position once known.
        let body = PollBody::new(None, Some("anon-1"), false, [], 4, 0, &[]);
        let v: serde_json::Value = serde_json::from_slice(&body.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"terminal": "anon-1", "hello": false, "rooms": {}, "inbox": 4, "wait_ms": 0})
        );
    }

    #[test]
    fn poll_answer_skips_unreadable_frames() {
        let answer = parse_answer(
            br#"{"frames":[{"op":"pong"},{"op":"nope"},{"op":"prompt","room":"r","seq":3}]}"#,
        )
        .unwrap();
        assert_eq!(
            answer.frames,
            vec![
                ServerFrame::Pong { id: None },
                ServerFrame::Prompt {
                    room: "r".into(),
                    seq: 3
                }
            ]
        );
        assert_eq!(answer.inbox, None, "a v1.0 answer has no inbox block");
        assert!(parse_answer(b"<html>").is_err());
        assert!(parse_answer(br#"{"inbox":{"seq":1,"acked":1}}"#).is_err());
        assert!(parse_answer(br#"{"frames":[]}"#).unwrap().frames.is_empty());
    }

    #[test]
    fn poll_answer_inbox_block_and_bye_answers() {
        let answer =
            parse_answer(br#"{"frames":[],"inbox":{"seq":5,"acked":2,"pending":1}}"#).unwrap();
        assert_eq!(
            answer.inbox,
            Some(InboxPosition {
                seq: 5,
                acked: 2,
                pending: 1
            })
        );
        // A `bye` answer as the contract writes it, and as the livepush server sends it.
        let left = ServerFrame::Left {
            id: None,
            room: "r".into(),
        };
        let contract = parse_answer(br#"{"ops":[{"op":"left","room":"r"}]}"#).unwrap();
        assert_eq!(contract.frames, vec![left.clone()]);
        let both = parse_answer(
            br#"{"frames":[{"op":"pong"},{"op":"left","room":"r"}],"ops":[{"op":"left","room":"r"}]}"#,
        )
        .unwrap();
        assert_eq!(both.frames, vec![ServerFrame::Pong { id: None }, left]);
    }

    #[test]
    fn bye_poll_body() {
        let p = pos("e1", 7);
        let ops = vec![ClientEnvelope::with_id(ClientFrame::Ack { inbox: 4 }, 9)];
        let mut body = PollBody::new(Some("T"), None, false, [("a", Some(&p))], 4, 0, &ops);
        body.bye = true;
        let v: serde_json::Value = serde_json::from_slice(&body.to_json()).unwrap();
        assert_eq!(
            v,
            json!({
                "token": "T", "hello": false, "rooms": {"a": {"epoch": "e1", "seq": 7}},
                "inbox": 4, "wait_ms": 0, "bye": true,
                "ops": [{"id": 9, "op": "ack", "inbox": 4}]
            })
        );
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(
                401,
                br#"{"error":"unauthorized","message":"token expired"}"#
            ),
            "unauthorized: token expired"
        );
        assert_eq!(
            error_text(
                401,
                br#"{"error":"unauthorized","message":"token expired"}"#
            ),
            "token expired"
        );
        assert_eq!(error_message(502, b""), "HTTP 502");
        assert_eq!(error_message(404, b"not here"), "HTTP 404: not here");
    }

    #[test]
    fn errors_are_attributed_to_the_room_they_name() {
        let rooms = ["a", "a:1", "b"];
        assert_eq!(error_room("room \"a:1\" is closed", rooms), Some("a:1"));
        assert_eq!(
            error_room("the token does not grant room \"b\"", rooms),
            Some("b")
        );
        assert_eq!(error_room("a: invalid epoch", rooms), Some("a"));
        assert_eq!(error_room("at most 64 rooms per connection", rooms), None);
        assert_eq!(error_room("room \"c\" is closed", rooms), None);
    }

    #[test]
    fn sse_url_carries_rooms_positions_and_credentials() {
        let base = url::Url::parse("http://h:1/v1/sse").unwrap();
        let since = Positions(vec![("b:1".into(), pos("E", 4))]);
        let u = sse_url(&base, Some("T"), Some("anon"), &["a", "b:1"], &since);
        let q: Vec<(String, String)> = u.query_pairs().into_owned().collect();
        assert_eq!(
            q,
            vec![
                ("token".into(), "T".into()),
                ("rooms".into(), "a,b:1".into()),
                ("since".into(), "b:1:E:4".into())
            ]
        );
        let u = sse_url(&base, None, Some("anon-x"), &["a"], &Positions::default());
        assert_eq!(u.query(), Some("terminal=anon-x&rooms=a"));
    }

    #[test]
    fn sse_parser_handles_split_chunks_comments_and_ids() {
        let stream = "data: {\"op\":\"connected\"}\n\n:keepalive\n\nid: a:E:1\ndata: {\"n\":1}\ndata: {\"n\":2}\n\ndata:x\r\n\r\n";
        let want = vec![
            SseEvent {
                id: None,
                data: "{\"op\":\"connected\"}".into(),
            },
            SseEvent {
                id: Some("a:E:1".into()),
                data: "{\"n\":1}\n{\"n\":2}".into(),
            },
            SseEvent {
                id: None,
                data: "x".into(),
            },
        ];
        // Whole, and cut at every possible byte.
        let mut p = SseParser::default();
        assert_eq!(p.feed(stream.as_bytes()), want);
        for cut in 0..stream.len() {
            let mut p = SseParser::default();
            let mut got = p.feed(&stream.as_bytes()[..cut]);
            got.extend(p.feed(&stream.as_bytes()[cut..]));
            assert_eq!(got, want, "cut at {cut}");
        }
        // A lone CR ends a line too, even at the end of a chunk; UTF-8 split across chunks.
        let mut p = SseParser::default();
        let bytes = "data: é\r\r".as_bytes();
        let mut got = p.feed(&bytes[..7]);
        got.extend(p.feed(&bytes[7..9]));
        got.extend(p.feed(&bytes[9..]));
        got.extend(p.feed(b"\ndata: y\n\n"));
        assert_eq!(
            got.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(),
            vec!["é", "y"]
        );
    }

    #[test]
    fn http_refusals_of_the_upgrade_are_told_from_network_errors() {
        let http = |status: u16| {
            let resp = tungstenite::http::Response::builder()
                .status(status)
                .body(None)
                .unwrap();
            tungstenite::Error::Http(Box::new(resp))
        };
        for s in [400, 404, 426, 403, 200, 302] {
            assert!(ws_refusal(&http(s)).is_some(), "{s}");
        }
        for s in [500, 502, 503] {
            assert!(ws_refusal(&http(s)).is_none(), "{s}");
        }
        assert!(
            ws_refusal(&tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::MissingUpgradeWebSocketHeader
            ))
            .is_some()
        );
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(ws_refusal(&tungstenite::Error::Io(io)).is_none());
        assert!(ws_refusal(&tungstenite::Error::ConnectionClosed).is_none());
    }
}

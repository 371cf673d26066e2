//! The servers a bench can drive, and the client side of their protocols as pure state
//! machines: text frames in, deliveries and frames to send back out. No IO here, so every
//! protocol detail is unit-tested.
//!
//! - `livepush`: the wire contract v1 (`connect`, `join` with optional `since`, `msg`,
//!   `prompt` answered with `pull`, `pulled`).
//! - `ws`: a plain WebSocket broadcast server: `ws://HOST/`, every text frame is one payload.
//! - `socketio`: Socket.IO v4 over WebSocket only: `0{…}` open, `40` connect, `2`/`3`
//!   engine.io ping/pong, events `42["msg",PAYLOAD]`.
//! - `nchan`: nginx nchan websocket subscriber `ws://HOST/sub/ROOM`: every text frame is one
//!   payload as published.
//!
//! Every payload is `{"t":MICROS_SINCE_EPOCH,"n":INDEX,"pad":"…"}`.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::value::RawValue;

/// Which server is under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// livepush itself (token, join, reliable seqs).
    Livepush,
    /// A plain WebSocket broadcast server.
    Ws,
    /// Socket.IO v4 (WebSocket transport only).
    Socketio,
    /// nginx with nchan.
    Nchan,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Livepush => "livepush",
            Target::Ws => "ws",
            Target::Socketio => "socketio",
            Target::Nchan => "nchan",
        }
    }

    /// The WebSocket URL a subscriber of `room` opens, from the server's `HOST:PORT`.
    pub fn ws_url(self, host: &str, room: &str) -> String {
        match self {
            Target::Livepush => format!("ws://{host}/v1/connect"),
            Target::Ws => format!("ws://{host}/"),
            Target::Socketio => format!("ws://{host}/socket.io/?EIO=4&transport=websocket"),
            Target::Nchan => format!("ws://{host}/sub/{room}"),
        }
    }

    /// Whether the target numbers reliable messages (`seq`) and can replay them on resume.
    pub fn has_seq(self) -> bool {
        self == Target::Livepush
    }
}

/// Delivery class of the messages a bench publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Reliable,
    Transient,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Reliable => "reliable",
            Class::Transient => "transient",
        }
    }
}

/// Microseconds since the Unix epoch (the clock every payload is stamped with).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The payload of message `n` published at `t` (µs), padded so that the JSON text is `size`
/// bytes long (or as short as it can be when `size` is smaller than the fields need).
pub fn payload(t: u64, n: u64, size: usize) -> String {
    let mut s = String::with_capacity(size.max(48));
    let _ = write!(s, r#"{{"t":{t},"n":{n},"pad":""#);
    let fixed = s.len() + 2; // the closing `"}`
    s.extend(std::iter::repeat_n('x', size.saturating_sub(fixed)));
    s.push_str("\"}");
    s
}

/// The figures a payload carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Stamp {
    pub t: u64,
    pub n: u64,
}

impl Stamp {
    pub fn parse(json: &str) -> Option<Stamp> {
        match fast_stamp(json) {
            Some((stamp, _)) => Some(stamp),
            None => serde_json::from_str(json).ok(),
        }
    }
}

/// A number at the start of `s`, and what follows it.
fn leading_u64(s: &str) -> Option<(u64, &str)> {
    let end = s
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    Some((s[..end].parse().ok()?, &s[end..]))
}

/// The payload exactly as [`payload`] writes it, `{"t":T,"n":N,"pad":"x…"}`, read without a
/// JSON parser (the subscriber's hot path); what follows the payload is returned. Anything
/// else is `None`, and the caller falls back to a real parse.
fn fast_stamp(s: &str) -> Option<(Stamp, &str)> {
    let (t, s) = leading_u64(s.strip_prefix(r#"{"t":"#)?)?;
    let (n, s) = leading_u64(s.strip_prefix(r#","n":"#)?)?;
    let s = s.strip_prefix(r#","pad":""#)?;
    let pad_end = s.find('"')?;
    if s.as_bytes()[..pad_end].contains(&b'\\') {
        return None;
    }
    let rest = s[pad_end..].strip_prefix("\"}")?;
    Some((Stamp { t, n }, rest))
}

/// A livepush `msg` frame carrying a bench payload, read without a JSON parser: the seq (if
/// any) and the payload's figures. Room ids and types cannot hold quotes, so `"seq":` outside
/// the payload is the frame's own field. `None` for anything else (then serde reads it).
fn fast_msg(line: &str) -> Option<(Option<u64>, Stamp)> {
    let rest = line.strip_prefix(r#"{"op":"msg","#)?;
    let at = rest.find(r#""data":"#)?;
    let (stamp, tail) = fast_stamp(&rest[at + 7..])?;
    let seq_in = |s: &str| -> Option<Option<u64>> {
        match s.find(r#""seq":"#) {
            Some(i) => Some(Some(leading_u64(&s[i + 6..])?.0)),
            None => Some(None),
        }
    };
    let seq = match seq_in(&rest[..at])? {
        Some(seq) => Some(seq),
        None => seq_in(tail)?,
    };
    Some((seq, stamp))
}

/// One message received by a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The room seq (livepush reliable messages only).
    pub seq: Option<u64>,
    pub stamp: Stamp,
}

/// What the protocol reports besides deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The subscriber is in the room and receives live messages from now on. For livepush:
    /// the `joined` frame's epoch, seq and `recovered`.
    Ready {
        epoch: Option<String>,
        seq: u64,
        recovered: bool,
    },
    Msg(Delivery),
    /// An `error` frame, a refused handshake, or a frame that makes no sense.
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the handshake answer (`connected`, or Socket.IO's `0{…}`).
    Opening,
    /// Waiting to be in the room (`joined`, or Socket.IO's `40`).
    Joining,
    Ready,
}

/// Where a livepush terminal resumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub epoch: String,
    pub seq: u64,
}

/// The client side of one connection's protocol.
#[derive(Debug)]
pub struct Proto {
    target: Target,
    room: String,
    token: Option<String>,
    since: Option<Since>,
    state: State,
    /// Highest seq received or covered by a pending pull.
    last_seq: u64,
    /// Ranges `(after, upto]` of seqs announced by a `prompt`, still to pull, oldest first.
    gaps: VecDeque<(u64, u64)>,
    pulling: bool,
}

/// Largest `limit` asked of a pull (the server's default cap).
const PULL_LIMIT: u64 = 1000;

#[derive(Deserialize)]
struct InFrame<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    seq: Option<u64>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    epoch: Option<String>,
    recovered: Option<bool>,
    #[serde(borrow)]
    messages: Option<Vec<InMsg<'a>>>,
    code: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct InMsg<'a> {
    seq: Option<u64>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

impl Proto {
    pub fn new(target: Target, room: &str, token: Option<String>, since: Option<Since>) -> Proto {
        Proto {
            target,
            room: room.to_owned(),
            token,
            since,
            state: State::Opening,
            last_seq: 0,
            gaps: VecDeque::new(),
            pulling: false,
        }
    }

    #[cfg(test)]
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    /// Frames to send as soon as the WebSocket is open; for targets without a handshake the
    /// subscriber is ready at once (reported as an `Event::Ready` in `out`).
    pub fn opening(&mut self, out: &mut Vec<Event>) -> Vec<String> {
        match self.target {
            Target::Livepush => {
                let mut f = serde_json::json!({"op":"connect","client":"livepush-bench"});
                if let Some(t) = &self.token {
                    f["token"] = t.clone().into();
                }
                vec![f.to_string()]
            }
            Target::Socketio => Vec::new(),
            Target::Ws | Target::Nchan => {
                self.state = State::Ready;
                out.push(Event::Ready {
                    epoch: None,
                    seq: 0,
                    recovered: true,
                });
                Vec::new()
            }
        }
    }

    /// Read one WebSocket text message; deliveries and events go to `out`, frames to send back
    /// to `replies`.
    pub fn feed(&mut self, text: &str, out: &mut Vec<Event>, replies: &mut Vec<String>) {
        match self.target {
            Target::Livepush => {
                for line in text.split('\n').filter(|l| !l.trim().is_empty()) {
                    self.livepush_frame(line, out, replies);
                }
            }
            Target::Socketio => self.socketio_packet(text, out, replies),
            Target::Ws | Target::Nchan => match Stamp::parse(text) {
                Some(stamp) => out.push(Event::Msg(Delivery { seq: None, stamp })),
                None => out.push(Event::Error(format!("not a bench payload: {}", clip(text)))),
            },
        }
    }

    /// Read one livepush frame (a long-poll answer's frame, an SSE `data:` line).
    pub fn feed_frame(&mut self, line: &str, out: &mut Vec<Event>, replies: &mut Vec<String>) {
        self.livepush_frame(line, out, replies);
    }

    fn livepush_frame(&mut self, line: &str, out: &mut Vec<Event>, replies: &mut Vec<String>) {
        if let Some((seq, stamp)) = fast_msg(line) {
            if let Some(s) = seq {
                self.last_seq = self.last_seq.max(s);
            }
            out.push(Event::Msg(Delivery { seq, stamp }));
            return;
        }
        let f: InFrame<'_> = match serde_json::from_str(line) {
            Ok(f) => f,
            Err(e) => {
                out.push(Event::Error(format!("bad frame ({e}): {}", clip(line))));
                return;
            }
        };
        match &*f.op {
            "connected" => {
                self.state = State::Joining;
                let mut join = serde_json::json!({"op":"join","room":self.room});
                if let Some(s) = &self.since {
                    join["since"] = serde_json::json!({"epoch":s.epoch,"seq":s.seq});
                }
                replies.push(join.to_string());
            }
            "joined" => {
                let seq = f.seq.unwrap_or(0);
                // Without `since` the join starts at the room's latest seq; with it the
                // replay follows from the given position.
                self.last_seq = self.since.as_ref().map_or(seq, |s| s.seq);
                self.state = State::Ready;
                out.push(Event::Ready {
                    epoch: f.epoch,
                    seq,
                    recovered: f.recovered.unwrap_or(true),
                });
            }
            "msg" => self.message(f.seq, f.data, out),
            "prompt" => {
                let upto = f.seq.unwrap_or(0);
                if upto > self.last_seq {
                    self.gaps.push_back((self.last_seq, upto));
                    self.last_seq = upto;
                }
                self.pull_next(replies);
            }
            "pulled" => {
                let mut top = None;
                for m in f.messages.unwrap_or_default() {
                    top = top.max(m.seq);
                    self.deliver(m.seq, m.data, out);
                }
                self.pulling = false;
                if let Some(front) = self.gaps.front_mut() {
                    // Pulled past the gap's start: what is left of it, if anything.
                    let got = top.unwrap_or(front.1).max(front.0);
                    // Nothing more exists in the history: the gap cannot be filled.
                    let latest = f.seq.unwrap_or(u64::MAX);
                    if got >= front.1 || top.is_none() || latest <= got {
                        self.gaps.pop_front();
                    } else {
                        front.0 = got;
                    }
                }
                self.pull_next(replies);
            }
            "error" => out.push(Event::Error(format!(
                "{}: {}",
                f.code.as_deref().unwrap_or("error"),
                f.message.as_deref().unwrap_or("")
            ))),
            "transport" => out.push(Event::Error(
                "moved to long-polling (flapping terminal)".into(),
            )),
            // `online`, `pong`, `left`, `inbox`: not what a bench counts.
            _ => {}
        }
    }

    /// A live `msg`: reliable ones advance the position.
    fn message(&mut self, seq: Option<u64>, data: Option<&RawValue>, out: &mut Vec<Event>) {
        if let Some(s) = seq {
            self.last_seq = self.last_seq.max(s);
        }
        self.deliver(seq, data, out);
    }

    fn deliver(&self, seq: Option<u64>, data: Option<&RawValue>, out: &mut Vec<Event>) {
        match data.and_then(|d| Stamp::parse(d.get())) {
            Some(stamp) => out.push(Event::Msg(Delivery { seq, stamp })),
            None => out.push(Event::Error("a message without a bench payload".into())),
        }
    }

    fn pull_next(&mut self, replies: &mut Vec<String>) {
        if self.pulling {
            return;
        }
        if let Some(&(after, upto)) = self.gaps.front() {
            self.pulling = true;
            replies.push(
                serde_json::json!({
                    "op":"pull","room":self.room,"since":after,
                    "limit":(upto - after).min(PULL_LIMIT)
                })
                .to_string(),
            );
        }
    }

    fn socketio_packet(&mut self, text: &str, out: &mut Vec<Event>, replies: &mut Vec<String>) {
        match parse_sio(text) {
            Sio::Open => {
                self.state = State::Joining;
                replies.push("40".into());
            }
            Sio::Ping => replies.push("3".into()),
            Sio::Connected => {
                self.state = State::Ready;
                out.push(Event::Ready {
                    epoch: None,
                    seq: 0,
                    recovered: true,
                });
            }
            Sio::Event(Some(stamp)) => out.push(Event::Msg(Delivery { seq: None, stamp })),
            Sio::Event(None) => {
                out.push(Event::Error(format!("unexpected event: {}", clip(text))));
            }
            Sio::ConnectError | Sio::Close => {
                out.push(Event::Error(format!("socket.io refused: {}", clip(text))));
            }
            Sio::Other => {}
        }
    }
}

/// A Socket.IO v4 / engine.io v4 packet, as far as a subscriber cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sio {
    /// engine.io `0{"sid":…,"pingInterval":…}`.
    Open,
    /// engine.io `2` (answer `3`).
    Ping,
    /// Socket.IO `40{…}`: connected to the main namespace.
    Connected,
    /// Socket.IO `44{…}`: connect error.
    ConnectError,
    /// engine.io `1` or Socket.IO `41`.
    Close,
    /// Socket.IO `42["msg",PAYLOAD]` (with an optional namespace and ack id); the payload may
    /// be an object or a JSON string. `None` when it is not a bench payload.
    Event(Option<Stamp>),
    Other,
}

pub fn parse_sio(text: &str) -> Sio {
    let b = text.as_bytes();
    match b.first() {
        Some(b'0') => Sio::Open,
        Some(b'1') => Sio::Close,
        Some(b'2') => Sio::Ping,
        Some(b'4') => match b.get(1) {
            Some(b'0') => Sio::Connected,
            Some(b'1') => Sio::Close,
            Some(b'4') => Sio::ConnectError,
            Some(b'2') => Sio::Event(sio_event(&text[2..])),
            _ => Sio::Other,
        },
        _ => Sio::Other,
    }
}

/// The payload of a `msg` event: `[/ns,][ACKID]["msg",PAYLOAD]`.
fn sio_event(rest: &str) -> Option<Stamp> {
    let rest = match rest.strip_prefix('/') {
        Some(ns) => &ns[ns.find(',')? + 1..],
        None => rest,
    };
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
    let (name, value): (Cow<'_, str>, &RawValue) = serde_json::from_str(rest).ok()?;
    if name != "msg" {
        return None;
    }
    let v = value.get();
    if v.starts_with('"') {
        let inner: String = serde_json::from_str(v).ok()?;
        Stamp::parse(&inner)
    } else {
        Stamp::parse(v)
    }
}

pub fn clip(s: &str) -> &str {
    match s.char_indices().nth(120) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// How a message is published to each target: the path below the server's base URL and the
/// request body. livepush publishes through its HTTP API (`Authorization: Bearer KEY`).
pub fn publish_request(
    target: Target,
    room: &str,
    class: Class,
    payload: &str,
) -> (String, String) {
    match target {
        Target::Livepush => {
            let ty = match class {
                Class::Reliable => "gift",
                Class::Transient => "chat",
            };
            (
                format!("/v1/rooms/{room}/messages"),
                format!(
                    r#"{{"type":"{ty}","class":"{}","data":{payload}}}"#,
                    class.name()
                ),
            )
        }
        Target::Ws | Target::Socketio => ("/publish".into(), payload.to_owned()),
        Target::Nchan => (format!("/pub/{room}"), payload.to_owned()),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn jsons(frames: &[String]) -> Vec<Value> {
        frames
            .iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect()
    }

    fn pull(since: u64, limit: u64) -> Value {
        json!({"op":"pull","room":"r","since":since,"limit":limit})
    }

    fn feed(p: &mut Proto, text: &str) -> (Vec<Event>, Vec<String>) {
        let (mut out, mut replies) = (Vec::new(), Vec::new());
        p.feed(text, &mut out, &mut replies);
        (out, replies)
    }

    /// The deliveries among `events`: (seq, payload index).
    pub fn msgs(events: &[Event]) -> Vec<(Option<u64>, u64)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Msg(d) => Some((d.seq, d.stamp.n)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn payload_has_the_asked_size_and_parses() {
        for size in [0, 10, 40, 41, 64, 100, 1000, 4096] {
            let p = payload(1_712_345_678_901_234, 42, size);
            if size >= 41 {
                assert_eq!(p.len(), size, "{p}");
            }
            assert_eq!(
                Stamp::parse(&p),
                Some(Stamp {
                    t: 1_712_345_678_901_234,
                    n: 42
                })
            );
        }
        assert_eq!(payload(1, 2, 0), r#"{"t":1,"n":2,"pad":""}"#);
    }

    #[test]
    fn fast_paths_agree_with_serde() {
        let p = payload(1_712_345_678_901_234, 77, 200);
        assert_eq!(
            fast_stamp(&p),
            Some((
                Stamp {
                    t: 1_712_345_678_901_234,
                    n: 77
                },
                ""
            ))
        );
        // Other shapes go to serde.
        assert_eq!(fast_stamp(r#"{"n":1,"t":2}"#), None);
        assert_eq!(Stamp::parse(r#"{"n":1,"t":2}"#), Some(Stamp { t: 2, n: 1 }));
        assert_eq!(fast_stamp(r#"{"t":1,"n":2,"pad":"a\"b"}"#), None);
        assert_eq!(
            Stamp::parse(r#"{"t":1,"n":2,"pad":"a\"b"}"#),
            Some(Stamp { t: 1, n: 2 })
        );
        let st = Stamp { t: 5, n: 6 };
        let data = r#"{"t":5,"n":6,"pad":"xx"}"#;
        for (line, seq) in [
            (
                format!(r#"{{"op":"msg","room":"r","type":"gift","data":{data},"seq":12,"ts":1}}"#),
                Some(12),
            ),
            (
                format!(r#"{{"op":"msg","room":"r","seq":13,"type":"gift","data":{data},"ts":1}}"#),
                Some(13),
            ),
            (
                format!(r#"{{"op":"msg","room":"r","type":"chat","data":{data},"ts":1}}"#),
                None,
            ),
        ] {
            assert_eq!(fast_msg(&line), Some((seq, st)), "{line}");
            let mut p = Proto::new(Target::Livepush, "r", None, None);
            let (out, _) = feed(&mut p, &line);
            assert_eq!(msgs(&out), vec![(seq, 6)]);
        }
        assert_eq!(fast_msg(r#"{"op":"msg","data":{"a":1},"seq":1}"#), None);
        assert_eq!(fast_msg(r#"{"op":"pulled","messages":[]}"#), None);
    }

    #[test]
    fn livepush_handshake_join_and_messages() {
        let mut p = Proto::new(Target::Livepush, "r1", Some("TOK".into()), None);
        let mut out = Vec::new();
        let open = p.opening(&mut out);
        assert!(out.is_empty());
        let v: serde_json::Value = serde_json::from_str(&open[0]).unwrap();
        assert_eq!(v["op"], "connect");
        assert_eq!(v["token"], "TOK");
        let (out, replies) = feed(
            &mut p,
            r#"{"op":"connected","terminal":"t","transport":"ws","heartbeat_ms":25000,"inbox":{"seq":0,"acked":0},"wake_key":"AA=="}"#,
        );
        assert!(out.is_empty());
        assert_eq!(jsons(&replies), vec![json!({"op":"join","room":"r1"})]);
        assert!(!p.is_ready());
        let (out, _) = feed(
            &mut p,
            "{\"op\":\"joined\",\"room\":\"r1\",\"epoch\":\"E1\",\"seq\":7,\"recovered\":true,\"online\":1}\n{\"op\":\"online\",\"room\":\"r1\",\"count\":2}\n{\"op\":\"msg\",\"room\":\"r1\",\"type\":\"gift\",\"data\":{\"t\":5,\"n\":0,\"pad\":\"x\"},\"seq\":8,\"ts\":1}\n{\"op\":\"msg\",\"room\":\"r1\",\"type\":\"chat\",\"data\":{\"t\":6,\"n\":1},\"ts\":1}",
        );
        assert!(p.is_ready());
        assert_eq!(
            out[0],
            Event::Ready {
                epoch: Some("E1".into()),
                seq: 7,
                recovered: true
            }
        );
        assert_eq!(msgs(&out), vec![(Some(8), 0), (None, 1)]);
        let (out, _) = feed(
            &mut p,
            r#"{"op":"error","code":"forbidden","message":"no"}"#,
        );
        assert_eq!(out, vec![Event::Error("forbidden: no".into())]);
    }

    #[test]
    fn livepush_resume_sends_since() {
        let since = Since {
            epoch: "E1".into(),
            seq: 3,
        };
        let mut p = Proto::new(Target::Livepush, "r", None, Some(since));
        let open = p.opening(&mut Vec::new());
        assert_eq!(
            jsons(&open),
            vec![json!({"op":"connect","client":"livepush-bench"})]
        );
        let (_, replies) = feed(&mut p, r#"{"op":"connected"}"#);
        assert_eq!(jsons(&replies)[0]["since"], json!({"epoch":"E1","seq":3}));
        let (out, _) = feed(
            &mut p,
            "{\"op\":\"joined\",\"room\":\"r\",\"epoch\":\"E1\",\"seq\":5,\"recovered\":true}\n{\"op\":\"msg\",\"seq\":4,\"data\":{\"t\":1,\"n\":3}}\n{\"op\":\"msg\",\"seq\":5,\"data\":{\"t\":1,\"n\":4}}",
        );
        assert_eq!(msgs(&out), vec![(Some(4), 3), (Some(5), 4)]);
    }

    #[test]
    fn livepush_prompt_is_pulled_in_pages_and_gaps_in_order() {
        let mut p = Proto::new(Target::Livepush, "r", None, None);
        p.opening(&mut Vec::new());
        feed(&mut p, r#"{"op":"connected"}"#);
        feed(&mut p, r#"{"op":"joined","epoch":"E","seq":0}"#);
        feed(&mut p, r#"{"op":"msg","seq":1,"data":{"t":1,"n":0}}"#);
        // Messages 2..=1500 folded into a prompt; 1501 arrives live after it.
        let (_, replies) = feed(
            &mut p,
            "{\"op\":\"prompt\",\"room\":\"r\",\"seq\":1500}\n{\"op\":\"msg\",\"seq\":1501,\"data\":{\"t\":1,\"n\":1500}}\n{\"op\":\"prompt\",\"room\":\"r\",\"seq\":1600}",
        );
        // One pull at a time, for the first gap only.
        assert_eq!(jsons(&replies), vec![pull(1, 1000)]);
        let page = |from: u64, to: u64| {
            let m: Vec<String> = (from..=to)
                .map(|s| format!(r#"{{"op":"msg","seq":{s},"data":{{"t":1,"n":{}}}}}"#, s - 1))
                .collect();
            format!(
                r#"{{"op":"pulled","room":"r","epoch":"E","seq":1600,"recovered":true,"messages":[{}]}}"#,
                m.join(",")
            )
        };
        let (out, replies) = feed(&mut p, &page(2, 1001));
        assert_eq!(out.len(), 1000);
        assert_eq!(jsons(&replies), vec![pull(1001, 499)]);
        let (out, replies) = feed(&mut p, &page(1002, 1500));
        assert_eq!(out.len(), 499);
        assert_eq!(jsons(&replies), vec![pull(1501, 99)]);
        let (out, replies) = feed(&mut p, &page(1502, 1600));
        assert_eq!(out.len(), 99);
        assert!(replies.is_empty());
        // An empty answer (history exhausted) ends the gap instead of looping.
        feed(&mut p, r#"{"op":"prompt","room":"r","seq":1700}"#);
        let (_, replies) = feed(&mut p, r#"{"op":"pulled","seq":1600,"messages":[]}"#);
        assert!(replies.is_empty());
    }

    #[test]
    fn plain_ws_and_nchan_frames_are_payloads() {
        for target in [Target::Ws, Target::Nchan] {
            let mut p = Proto::new(target, "r", None, None);
            let mut out = Vec::new();
            assert!(p.opening(&mut out).is_empty());
            assert!(p.is_ready());
            assert!(matches!(out[0], Event::Ready { .. }));
            let (out, _) = feed(&mut p, &payload(10, 3, 100));
            assert_eq!(msgs(&out), vec![(None, 3)]);
            let (out, _) = feed(&mut p, "hello");
            assert!(matches!(out[0], Event::Error(_)));
        }
        assert_eq!(Target::Nchan.ws_url("h:1", "r"), "ws://h:1/sub/r");
        assert_eq!(
            Target::Socketio.ws_url("h:1", "r"),
            "ws://h:1/socket.io/?EIO=4&transport=websocket"
        );
    }

    #[test]
    fn socketio_packets() {
        assert_eq!(
            parse_sio(
                r#"0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#
            ),
            Sio::Open
        );
        assert_eq!(parse_sio("2"), Sio::Ping);
        assert_eq!(parse_sio(r#"40{"sid":"xyz"}"#), Sio::Connected);
        assert_eq!(parse_sio(r#"44{"message":"no"}"#), Sio::ConnectError);
        assert_eq!(parse_sio("41"), Sio::Close);
        assert_eq!(parse_sio("6"), Sio::Other);
        let st = Some(Stamp { t: 9, n: 4 });
        assert_eq!(
            parse_sio(r#"42["msg",{"t":9,"n":4,"pad":"xx"}]"#),
            Sio::Event(st)
        );
        assert_eq!(
            parse_sio(r#"42["msg","{\"t\":9,\"n\":4}"]"#),
            Sio::Event(st)
        );
        assert_eq!(
            parse_sio(r#"42/live,17["msg",{"t":9,"n":4}]"#),
            Sio::Event(st)
        );
        assert_eq!(parse_sio(r#"4212["msg",{"t":9,"n":4}]"#), Sio::Event(st));
        assert_eq!(parse_sio(r#"42["other",{"t":9,"n":4}]"#), Sio::Event(None));
        assert_eq!(parse_sio("42garbage"), Sio::Event(None));
        assert_eq!(parse_sio(""), Sio::Other);
    }

    #[test]
    fn socketio_session() {
        let mut p = Proto::new(Target::Socketio, "r", None, None);
        assert!(p.opening(&mut Vec::new()).is_empty());
        let (_, replies) = feed(&mut p, r#"0{"sid":"a","pingInterval":25000}"#);
        assert_eq!(replies, vec!["40"]);
        assert!(!p.is_ready());
        let (out, _) = feed(&mut p, r#"40{"sid":"b"}"#);
        assert!(p.is_ready());
        assert!(matches!(out[0], Event::Ready { .. }));
        let (_, replies) = feed(&mut p, "2");
        assert_eq!(replies, vec!["3"]);
        let (out, _) = feed(&mut p, r#"42["msg",{"t":1,"n":2}]"#);
        assert_eq!(msgs(&out), vec![(None, 2)]);
    }

    #[test]
    fn publish_requests() {
        let p = payload(1, 2, 0);
        let (path, body) = publish_request(Target::Livepush, "room:1", Class::Reliable, &p);
        assert_eq!(path, "/v1/rooms/room:1/messages");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["type"], "gift");
        assert_eq!(v["class"], "reliable");
        assert_eq!(v["data"]["n"], 2);
        let (_, body) = publish_request(Target::Livepush, "r", Class::Transient, &p);
        assert!(body.contains(r#""class":"transient""#));
        assert_eq!(
            publish_request(Target::Ws, "r", Class::Reliable, &p),
            ("/publish".into(), p.clone())
        );
        assert_eq!(
            publish_request(Target::Socketio, "r", Class::Reliable, &p).0,
            "/publish"
        );
        assert_eq!(
            publish_request(Target::Nchan, "r", Class::Reliable, &p).0,
            "/pub/r"
        );
    }
}

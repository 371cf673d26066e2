//! Long-poll subscribers: one keep-alive HTTP/1.1 connection per terminal with one poll
//! parked at a time, the next sent as soon as an answer arrives (as the JS client's main
//! poll does; a bench terminal sends no ops, so it needs no second, short poll).
//!
//! - `livepush`: `POST /v1/poll` (docs/protocol.md §3.1) with the token, `hello` on the
//!   first poll, the room at its position (`{}` until `joined`, then `{"epoch","seq"}`
//!   advanced with every reliable message), `wait_ms`. Frames are read by the WebSocket
//!   path's [`Proto`], so loss, duplicates and strays count the same way.
//! - `nchan`: `GET /lp/ROOM` (`nchan_subscriber longpoll`), one message per answer; its id
//!   (`Last-Modified` and `Etag`) goes back as `If-Modified-Since` and `If-None-Match`.
//!
//! [`LpProto`] is the pure part (requests out, answers in); [`LongPoll`] the thin IO.

use anyhow::{Context as _, bail};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::client::Dialer;
use super::http_client::{Handout, Head, HttpConn};
use super::targets::{Delivery, Event, Proto, Stamp, Target, clip};

/// How long a livepush poll may be parked (the JS client's default).
pub const WAIT_MS: u64 = 25_000;

/// The client side of one long-polling terminal, without IO.
#[derive(Debug)]
pub struct LpProto {
    room: String,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Livepush {
        /// `"token":"…",` (JSON, written once).
        token_field: String,
        /// The room id as a JSON string.
        room_json: String,
        /// Reads the frames (`connected`, `joined`, `msg`, `error`, …).
        frames: Box<Proto>,
        /// The next poll says `hello` (until one is answered).
        hello: bool,
        /// The room's position: `None` until a `joined` gave the epoch (as JSON too).
        epoch: Option<String>,
        epoch_json: String,
        seq: u64,
        /// A `joined` came in the answer being read: its seq, the position unless a
        /// reliable message follows it (contract v1.1, decision 4).
        joined_seq: Option<u64>,
    },
    Nchan {
        /// The last message's `Last-Modified` and `Etag`.
        last_modified: Option<String>,
        etag: Option<String>,
    },
}

#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow)]
    frames: Vec<&'a RawValue>,
}

impl LpProto {
    pub fn new(target: Target, room: &str, token: Option<String>) -> anyhow::Result<LpProto> {
        let kind = match target {
            Target::Livepush => Kind::Livepush {
                token_field: token
                    .map(|t| format!(r#""token":{},"#, json_str(&t)))
                    .unwrap_or_default(),
                room_json: json_str(room),
                frames: Box::new(Proto::new(Target::Livepush, room, None, None)),
                hello: true,
                epoch: None,
                epoch_json: String::new(),
                seq: 0,
                joined_seq: None,
            },
            Target::Nchan => Kind::Nchan {
                last_modified: None,
                etag: None,
            },
            t => bail!(
                "{} has no long-poll subscriber in this bench (livepush, nchan)",
                t.name()
            ),
        };
        Ok(LpProto {
            room: room.to_owned(),
            kind,
        })
    }

    /// Events to report as soon as the first poll is sent: nchan has no handshake, so the
    /// subscriber is ready then (a fresh channel delivers its oldest message first, so
    /// nothing published after this is missed).
    pub fn opening(&self, out: &mut Vec<Event>) {
        if matches!(self.kind, Kind::Nchan { .. }) {
            out.push(Event::Ready {
                epoch: None,
                seq: 0,
                recovered: true,
            });
        }
    }

    /// The next poll, written to `out` (cleared first), for the server at `host`. Allocates
    /// nothing once `out` has grown to a request's size.
    pub fn request(&self, host: &str, out: &mut Vec<u8>) {
        use std::io::Write as _;
        out.clear();
        match &self.kind {
            Kind::Livepush {
                token_field,
                room_json,
                hello,
                epoch,
                epoch_json,
                seq,
                ..
            } => {
                let hello = if *hello { r#""hello":true,"# } else { "" };
                // {TOKEN HELLO "rooms":{ROOM:POSITION},"wait_ms":W}
                let position = match epoch {
                    Some(_) => 9 + epoch_json.len() + 7 + digits(*seq) + 1,
                    None => 2,
                };
                let len = 1
                    + token_field.len()
                    + hello.len()
                    + r#""rooms":{"#.len()
                    + room_json.len()
                    + 1
                    + position
                    + r#"},"wait_ms":"#.len()
                    + digits(WAIT_MS)
                    + 1;
                let _ = write!(
                    out,
                    "POST /v1/poll HTTP/1.1\r\nHost: {host}\r\n\
                     Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n\
                     {{{token_field}{hello}\"rooms\":{{{room_json}:"
                );
                let _ = match epoch {
                    Some(_) => write!(out, r#"{{"epoch":{epoch_json},"seq":{seq}}}"#),
                    None => write!(out, "{{}}"),
                };
                let _ = write!(out, r#"}},"wait_ms":{WAIT_MS}}}"#);
            }
            Kind::Nchan {
                last_modified,
                etag,
            } => {
                let _ = write!(out, "GET /lp/{} HTTP/1.1\r\nHost: {host}\r\n", self.room);
                if let Some(v) = last_modified {
                    let _ = write!(out, "If-Modified-Since: {v}\r\n");
                }
                if let Some(v) = etag {
                    let _ = write!(out, "If-None-Match: {v}\r\n");
                }
                out.extend_from_slice(b"\r\n");
            }
        }
    }

    /// Read one answer: deliveries and events to `out`, the position advanced.
    pub fn answer(&mut self, head: &Head, body: &[u8], out: &mut Vec<Event>) {
        match &mut self.kind {
            Kind::Livepush {
                frames,
                hello,
                epoch,
                epoch_json,
                seq,
                joined_seq,
                ..
            } => {
                if head.status != 200 {
                    out.push(refused(head.status, body));
                    return;
                }
                let answer: Answer<'_> = match serde_json::from_slice(body) {
                    Ok(a) => a,
                    Err(e) => {
                        let text = String::from_utf8_lossy(body);
                        out.push(Event::Error(format!(
                            "unreadable poll answer ({e}): {}",
                            clip(&text)
                        )));
                        return;
                    }
                };
                *hello = false;
                let from = out.len();
                let mut replies = Vec::new();
                for f in answer.frames {
                    frames.feed_frame(f.get(), out, &mut replies);
                }
                // A `prompt` needs no `pull`: the next poll replays from the position.
                for e in &out[from..] {
                    match e {
                        Event::Ready {
                            epoch: e, seq: s, ..
                        } => {
                            if *epoch != *e {
                                epoch.clone_from(e);
                                *epoch_json = e.as_deref().map(json_str).unwrap_or_default();
                            }
                            *joined_seq = Some(*s);
                        }
                        Event::Msg(Delivery { seq: Some(s), .. }) => {
                            *seq = match joined_seq.take() {
                                // The first reliable message after a `joined` is the base.
                                Some(_) => *s,
                                None => (*seq).max(*s),
                            };
                        }
                        _ => {}
                    }
                }
                if let Some(s) = joined_seq.take() {
                    *seq = s;
                }
            }
            Kind::Nchan {
                last_modified,
                etag,
            } => match head.status {
                200 => {
                    if head.last_modified.is_some() || head.etag.is_some() {
                        last_modified.clone_from(&head.last_modified);
                        etag.clone_from(&head.etag);
                    }
                    let text = String::from_utf8_lossy(body);
                    match Stamp::parse(&text) {
                        Some(stamp) => out.push(Event::Msg(Delivery { seq: None, stamp })),
                        None => out.push(Event::Error(format!(
                            "not a bench payload: {}",
                            clip(&text)
                        ))),
                    }
                }
                // Timed out with nothing new: poll again from the same message.
                304 | 408 => {}
                s => out.push(refused(s, body)),
            },
        }
    }

    /// The room's position (livepush): `(epoch, seq)` once joined.
    #[cfg(test)]
    fn position(&self) -> Option<(&str, u64)> {
        match &self.kind {
            Kind::Livepush { epoch, seq, .. } => epoch.as_deref().map(|e| (e, *seq)),
            Kind::Nchan { .. } => None,
        }
    }
}

fn refused(status: u16, body: &[u8]) -> Event {
    Event::Error(format!(
        "answered {status}: {}",
        clip(&String::from_utf8_lossy(body))
    ))
}

/// Decimal digits of `n`.
fn digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// How many times in a row a connection may end before an answer before the terminal gives
/// up.
const MAX_RETRIES: u32 = 3;

/// One long-polling terminal.
#[derive(Debug)]
pub struct LongPoll {
    dialer: Dialer,
    i: u64,
    /// `None` between a connection the server ended and the next.
    pub(super) conn: Option<HttpConn>,
    proto: LpProto,
    /// A poll was sent and its answer not read yet.
    in_flight: bool,
    /// The request being sent, then the answer's body (kept for the next poll).
    buf: Vec<u8>,
    /// The events of the last step.
    pub(super) events: Handout,
    /// Connections opened again after the server ended one.
    pub reconnects: u64,
}

impl LongPoll {
    /// Connect and send the first poll.
    pub async fn open(
        dialer: &Dialer,
        i: u64,
        room: &str,
        token: Option<String>,
    ) -> anyhow::Result<LongPoll> {
        let proto = LpProto::new(dialer.target, room, token)?;
        let mut events = Vec::new();
        proto.opening(&mut events);
        let mut lp = LongPoll {
            dialer: dialer.clone(),
            i,
            conn: Some(HttpConn::new(dialer.connect(i).await?)),
            proto,
            in_flight: false,
            buf: Vec::new(),
            events: Handout::opened(events),
            reconnects: 0,
        };
        lp.send().await?;
        Ok(lp)
    }

    async fn send(&mut self) -> anyhow::Result<()> {
        if self.conn.is_none() {
            self.conn = Some(HttpConn::new(self.dialer.connect(self.i).await?));
            self.reconnects += 1;
        }
        self.proto.request(&self.dialer.host, &mut self.buf);
        let conn = self.conn.as_mut().context("no connection")?;
        conn.send(&self.buf).await.context("sending a poll")?;
        self.in_flight = true;
        Ok(())
    }

    /// Wait for the parked poll's answer, read it, and send the next poll; `Ok(true)` with
    /// the answer's events in [`LongPoll::events`]. Polls again (on a new connection if the
    /// server closed one) until an answer has events. Cancel it only to end the terminal.
    pub async fn step(&mut self) -> anyhow::Result<bool> {
        self.events.start();
        let mut retries = 0;
        loop {
            if !self.in_flight {
                self.send().await?;
            }
            let conn = self.conn.as_mut().context("no connection")?;
            let head = match conn.read_head().await {
                Ok(h) => h,
                Err(e) if conn.buf.is_empty() && retries < MAX_RETRIES => {
                    // Closed before answering (a keep-alive connection the server ended):
                    // the poll carries its position, so sending it again loses nothing.
                    tracing::debug!("poll: {e:#}; again on a new connection");
                    retries += 1;
                    self.conn = None;
                    self.in_flight = false;
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.buf.clear();
            conn.read_body(&head, &mut self.buf).await?;
            self.in_flight = false;
            if head.close {
                self.conn = None;
            }
            self.proto.answer(&head, &self.buf, &mut self.events.list);
            if self.buf.capacity() > 64 << 10 {
                self.buf = Vec::new();
            }
            if self.events.ready() {
                return Ok(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::http_client::{Framing, parse_head};
    use crate::bench::targets::payload;
    use crate::bench::targets::tests::msgs as seqs;
    use serde_json::{Value, json};

    fn ok() -> Head {
        Head {
            status: 200,
            framing: Framing::Length(0),
            close: false,
            last_modified: None,
            etag: None,
        }
    }

    /// The JSON body of a livepush poll request.
    fn body(p: &LpProto) -> Value {
        let mut out = Vec::new();
        p.request("h:1", &mut out);
        let at = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let (head, n) = (String::from_utf8(out[..at].to_vec()).unwrap(), at + 4);
        assert!(
            head.starts_with("POST /v1/poll HTTP/1.1\r\nHost: h:1\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", out.len() - n)),
            "{head}"
        );
        serde_json::from_slice(&out[n..]).unwrap()
    }

    fn answer(p: &mut LpProto, frames: &[Value]) -> Vec<Event> {
        let body = json!({"frames": frames, "inbox": {"seq":0,"acked":0,"pending":0}});
        let mut out = Vec::new();
        p.answer(&ok(), body.to_string().as_bytes(), &mut out);
        out
    }

    fn msg(seq: Option<u64>, n: u64) -> Value {
        let mut m =
            json!({"op":"msg","room":"r","type":"gift","data":{"t":5,"n":n,"pad":"x"},"ts":1});
        if let Some(s) = seq {
            m["seq"] = s.into();
        }
        m
    }

    #[test]
    fn livepush_polls_carry_the_position() {
        let mut p = LpProto::new(Target::Livepush, "r:1", Some("TOK".into())).unwrap();
        let mut out = Vec::new();
        p.opening(&mut out);
        assert!(out.is_empty(), "ready only at `joined`");
        assert_eq!(
            body(&p),
            json!({"token":"TOK","hello":true,"rooms":{"r:1":{}},"wait_ms":WAIT_MS})
        );
        let ev = answer(
            &mut p,
            &[
                json!({"op":"connected","terminal":"t","transport":"longpoll"}),
                json!({"op":"joined","room":"r:1","epoch":"E1","seq":7,"recovered":true,"online":1}),
            ],
        );
        assert_eq!(
            ev,
            vec![Event::Ready {
                epoch: Some("E1".into()),
                seq: 7,
                recovered: true
            }]
        );
        assert_eq!(p.position(), Some(("E1", 7)));
        assert_eq!(
            body(&p),
            json!({"token":"TOK","rooms":{"r:1":{"epoch":"E1","seq":7}},"wait_ms":WAIT_MS})
        );
        // Reliable messages advance it, transient ones and online counts do not.
        let ev = answer(
            &mut p,
            &[
                msg(Some(8), 0),
                json!({"op":"online","room":"r:1","count":3}),
                msg(None, 100),
                msg(Some(9), 1),
            ],
        );
        assert_eq!(seqs(&ev), vec![(Some(8), 0), (None, 100), (Some(9), 1)]);
        assert_eq!(p.position(), Some(("E1", 9)));
        // A prompt needs no pull: the position stays where the messages are.
        let ev = answer(&mut p, &[json!({"op":"prompt","room":"r:1","seq":2000})]);
        assert!(seqs(&ev).is_empty());
        assert_eq!(p.position(), Some(("E1", 9)));
        // An empty answer (the park timed out) changes nothing.
        assert!(answer(&mut p, &[]).is_empty());
        assert_eq!(p.position(), Some(("E1", 9)));
    }

    #[test]
    fn livepush_joined_not_recovered() {
        let mut p = LpProto::new(Target::Livepush, "r", None).unwrap();
        answer(&mut p, &[json!({"op":"joined","epoch":"E1","seq":3})]);
        // A new epoch with a replay: the first reliable message after `joined` is the base.
        let ev = answer(
            &mut p,
            &[
                json!({"op":"joined","epoch":"E2","seq":2,"recovered":false}),
                msg(Some(1), 0),
                msg(Some(2), 1),
            ],
        );
        assert_eq!(seqs(&ev), vec![(Some(1), 0), (Some(2), 1)]);
        assert_eq!(p.position(), Some(("E2", 2)));
        // Nothing kept after the position: the position becomes `joined.seq`.
        answer(
            &mut p,
            &[json!({"op":"joined","epoch":"E3","seq":40,"recovered":false})],
        );
        assert_eq!(p.position(), Some(("E3", 40)));
        assert!(body(&p).get("token").is_none());
    }

    #[test]
    fn livepush_refusals_and_garbage_are_errors() {
        let mut p = LpProto::new(Target::Livepush, "r", None).unwrap();
        let mut out = Vec::new();
        let h = Head {
            status: 401,
            ..ok()
        };
        p.answer(&h, br#"{"error":"unauthorized"}"#, &mut out);
        assert!(matches!(&out[0], Event::Error(e) if e.contains("401")));
        out.clear();
        p.answer(&ok(), b"<html>", &mut out);
        assert!(matches!(&out[0], Event::Error(e) if e.contains("unreadable")));
        let ev = answer(
            &mut p,
            &[json!({"op":"error","code":"forbidden","message":"no","room":"r"})],
        );
        assert_eq!(ev, vec![Event::Error("forbidden: no".into())]);
        // The hello is sent again until a poll is answered.
        let mut p = LpProto::new(Target::Livepush, "r", None).unwrap();
        p.answer(&h, b"", &mut Vec::new());
        assert_eq!(body(&p)["hello"], true);
    }

    #[test]
    fn nchan_echoes_the_message_id() {
        let mut p = LpProto::new(Target::Nchan, "room1", None).unwrap();
        let mut out = Vec::new();
        p.opening(&mut out);
        assert!(matches!(out[0], Event::Ready { .. }));
        let req = |p: &LpProto| {
            let mut out = Vec::new();
            p.request("h:2", &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(req(&p), "GET /lp/room1 HTTP/1.1\r\nHost: h:2\r\n\r\n");
        let raw = format!(
            "HTTP/1.1 200 OK\r\nLast-Modified: Sun, 06 Dec 2026 12:00:01 GMT\r\nEtag: 2\r\nContent-Length: 100\r\n\r\n{}",
            payload(11, 4, 100)
        );
        let (head, n) = parse_head(raw.as_bytes()).unwrap().unwrap();
        let mut out = Vec::new();
        p.answer(&head, &raw.as_bytes()[n..], &mut out);
        assert_eq!(seqs(&out), vec![(None, 4)]);
        assert_eq!(
            req(&p),
            "GET /lp/room1 HTTP/1.1\r\nHost: h:2\r\n\
             If-Modified-Since: Sun, 06 Dec 2026 12:00:01 GMT\r\nIf-None-Match: 2\r\n\r\n"
        );
        // A timeout keeps the id; a refusal is an error.
        let mut out = Vec::new();
        p.answer(
            &Head {
                status: 304,
                ..ok()
            },
            b"",
            &mut out,
        );
        p.answer(
            &Head {
                status: 408,
                ..ok()
            },
            b"",
            &mut out,
        );
        assert!(out.is_empty());
        assert!(req(&p).contains("If-None-Match: 2\r\n"));
        p.answer(
            &Head {
                status: 403,
                ..ok()
            },
            b"no",
            &mut out,
        );
        assert!(matches!(&out[0], Event::Error(e) if e.contains("403")));
        out.clear();
        p.answer(&ok(), b"hello", &mut out);
        assert!(matches!(&out[0], Event::Error(_)));
        assert!(LpProto::new(Target::Ws, "r", None).is_err());
    }
}

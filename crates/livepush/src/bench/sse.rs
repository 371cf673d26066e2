//! Server-Sent Events subscribers: one streaming HTTP/1.1 answer per terminal, read as an
//! `EventSource` reads it, and opened again with `Last-Event-ID` when the server ends it.
//!
//! - `livepush`: `GET /v1/sse?token=…&rooms=ROOM` (docs/protocol.md §3.2): one frame per
//!   `data:` line, read by the WebSocket path's [`Proto`]; the `id:` (every room's position)
//!   is sent back as `Last-Event-ID` when the stream is opened again (after a `prompt`, the
//!   server ends the stream and the new one replays).
//! - `nchan`: `GET /es/ROOM` (`nchan_subscriber eventsource`): every `data:` line is a
//!   payload; its `id:` is nchan's message id, sent back the same way.
//!
//! [`SseParser`] and [`SseProto`] are pure; [`SseStream`] is the thin IO.

use std::fmt::Write as _;

use anyhow::{Context as _, bail};

use super::client::Dialer;
use super::http_client::{Chunked, Framing, Handout, Head, HttpConn, query_escape};
use super::targets::{Delivery, Event, Proto, Stamp, Target, clip};

/// The longest line of an event stream accepted.
const MAX_LINE: usize = 16 << 20;

/// What an event stream's lines say, as far as a subscriber cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseItem<'a> {
    /// A `data:` line's value.
    Data(&'a str),
    /// An `id:` line's value.
    Id(&'a str),
    /// An empty line: the event ends.
    Dispatch,
}

/// Splits a decoded event stream into lines; keeps only a line cut short by a read.
#[derive(Debug, Default)]
pub struct SseParser {
    partial: Vec<u8>,
}

impl SseParser {
    /// Read `input`, calling `f` for every `data:` and `id:` line and every event's end
    /// (comments, `event:` and `retry:` are skipped).
    pub fn feed(&mut self, input: &[u8], f: &mut dyn FnMut(SseItem<'_>)) -> anyhow::Result<()> {
        let mut rest = input;
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = (&rest[..at], &rest[at + 1..]);
            if self.partial.is_empty() {
                line_item(line, f)?;
            } else {
                self.partial.extend_from_slice(line);
                let whole = std::mem::take(&mut self.partial);
                line_item(&whole, f)?;
            }
            rest = tail;
        }
        if !rest.is_empty() {
            if self.partial.len() + rest.len() > MAX_LINE {
                bail!("event stream line over {MAX_LINE} bytes");
            }
            self.partial.extend_from_slice(rest);
        }
        Ok(())
    }
}

fn line_item(line: &[u8], f: &mut dyn FnMut(SseItem<'_>)) -> anyhow::Result<()> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        f(SseItem::Dispatch);
        return Ok(());
    }
    let line = std::str::from_utf8(line).context("event stream line is not UTF-8")?;
    let (field, value) = match line.split_once(':') {
        Some((k, v)) => (k, v.strip_prefix(' ').unwrap_or(v)),
        None => (line, ""),
    };
    match field {
        "data" => f(SseItem::Data(value)),
        "id" => f(SseItem::Id(value)),
        // "" (a comment), "event", "retry", anything else.
        _ => {}
    }
    Ok(())
}

/// The client side of one SSE terminal, without IO.
#[derive(Debug)]
pub struct SseProto {
    target: Target,
    room: String,
    token: Option<String>,
    /// Reads livepush frames.
    frames: Proto,
    /// The `id:` of the event being read, and of the last event read (sent back as
    /// `Last-Event-ID`).
    pending_id: Option<String>,
    last_id: Option<String>,
}

impl SseProto {
    pub fn new(target: Target, room: &str, token: Option<String>) -> anyhow::Result<SseProto> {
        if !matches!(target, Target::Livepush | Target::Nchan) {
            bail!(
                "{} has no SSE subscriber in this bench (livepush, nchan)",
                target.name()
            );
        }
        Ok(SseProto {
            target,
            room: room.to_owned(),
            token,
            frames: Proto::new(Target::Livepush, room, None, None),
            pending_id: None,
            last_id: None,
        })
    }

    /// The request that opens the stream (again), for the server at `host`.
    pub fn request(&self, host: &str) -> String {
        let mut s = String::with_capacity(512);
        match self.target {
            Target::Livepush => {
                s.push_str("GET /v1/sse?rooms=");
                query_escape(&self.room, &mut s);
                if let Some(t) = &self.token {
                    s.push_str("&token=");
                    query_escape(t, &mut s);
                }
            }
            _ => {
                let _ = write!(s, "GET /es/{}", self.room);
            }
        }
        let _ = write!(
            s,
            " HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
        );
        if let Some(id) = &self.last_id {
            let _ = write!(s, "Last-Event-ID: {id}\r\n");
        }
        s.push_str("\r\n");
        s
    }

    /// The answer's head came: a refusal is an error; nchan's subscriber is ready now (it
    /// has no handshake), livepush's at its `joined`.
    pub fn opened(&mut self, head: &Head, out: &mut Vec<Event>) -> anyhow::Result<()> {
        if head.status != 200 {
            bail!("the event stream was answered {}", head.status);
        }
        self.pending_id = None;
        if self.target == Target::Nchan {
            out.push(Event::Ready {
                epoch: None,
                seq: 0,
                recovered: true,
            });
        }
        Ok(())
    }

    /// Read one line's item.
    pub fn item(&mut self, item: SseItem<'_>, out: &mut Vec<Event>) {
        match item {
            SseItem::Data(line) => match self.target {
                Target::Livepush => self.frames.feed_frame(line, out, &mut Vec::new()),
                _ => match Stamp::parse(line) {
                    Some(stamp) => out.push(Event::Msg(Delivery { seq: None, stamp })),
                    None => out.push(Event::Error(format!("not a bench payload: {}", clip(line)))),
                },
            },
            SseItem::Id(id) => self.pending_id = Some(id.to_owned()),
            SseItem::Dispatch => {
                if let Some(id) = self.pending_id.take() {
                    self.last_id = Some(id);
                }
            }
        }
    }
}

/// How many times in a row a stream may fail to open before the terminal gives up.
const MAX_RETRIES: u32 = 3;

/// One SSE terminal.
#[derive(Debug)]
pub struct SseStream {
    dialer: Dialer,
    i: u64,
    /// `None` between a connection the server ended and the next.
    pub(super) conn: Option<HttpConn>,
    /// The head of the current stream was read.
    open: bool,
    /// The body's chunked decoder (`None`: not chunked).
    chunked: Option<Chunked>,
    /// Decoded body bytes to parse.
    body: Vec<u8>,
    parser: SseParser,
    proto: SseProto,
    /// The events of the last step.
    pub(super) events: Handout,
    /// Streams opened again after the server ended one.
    pub reconnects: u64,
}

impl SseStream {
    /// Connect and send the request (the answer is read by the first step).
    pub async fn open(
        dialer: &Dialer,
        i: u64,
        room: &str,
        token: Option<String>,
    ) -> anyhow::Result<SseStream> {
        let mut s = SseStream {
            dialer: dialer.clone(),
            i,
            conn: None,
            open: false,
            chunked: None,
            body: Vec::new(),
            parser: SseParser::default(),
            proto: SseProto::new(dialer.target, room, token)?,
            events: Handout::default(),
            reconnects: 0,
        };
        s.connect().await?;
        Ok(s)
    }

    async fn connect(&mut self) -> anyhow::Result<()> {
        let mut conn = HttpConn::new(self.dialer.connect(self.i).await?);
        conn.send(self.proto.request(&self.dialer.host).as_bytes())
            .await
            .context("sending the event stream request")?;
        self.conn = Some(conn);
        self.open = false;
        self.parser = SseParser::default();
        Ok(())
    }

    /// Read what has arrived of the stream and parse it; `Ok(true)` with events in
    /// [`SseStream::events`]. A stream the server ends is opened again with `Last-Event-ID`.
    /// Cancel it only to end the terminal.
    pub async fn step(&mut self) -> anyhow::Result<bool> {
        self.events.start();
        let mut retries = 0;
        loop {
            if self.conn.is_none() {
                if retries >= MAX_RETRIES {
                    bail!("the event stream ended {MAX_RETRIES} times in a row");
                }
                retries += 1;
                self.reconnects += 1;
                self.connect().await?;
            }
            let conn = self.conn.as_mut().context("no connection")?;
            let ended = if !self.open {
                let head = match conn.read_head().await {
                    Ok(h) => h,
                    Err(e) if retries < MAX_RETRIES => {
                        tracing::debug!("event stream: {e:#}; opening again");
                        self.conn = None;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                self.proto.opened(&head, &mut self.events.list)?;
                self.chunked = (head.framing == Framing::Chunked).then(Chunked::default);
                self.open = true;
                false
            } else {
                conn.read_more().await? == 0
            };
            match &mut self.chunked {
                Some(dec) => {
                    let n = dec.feed(&conn.buf, &mut self.body)?;
                    conn.buf.drain(..n);
                }
                None => self.body.append(&mut conn.buf),
            }
            let done = ended || self.chunked.as_ref().is_some_and(Chunked::done);
            let (proto, events) = (&mut self.proto, &mut self.events.list);
            self.parser
                .feed(&self.body, &mut |item| proto.item(item, events))?;
            self.body.clear();
            if done {
                // EventSource opens the stream again from the last id.
                self.conn = None;
            } else {
                retries = 0;
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
    use crate::bench::http_client::parse_head;
    use crate::bench::targets::payload;
    use crate::bench::targets::tests::msgs;

    fn items(p: &mut SseParser, input: &[u8]) -> Vec<String> {
        let mut got = Vec::new();
        p.feed(input, &mut |i| {
            got.push(match i {
                SseItem::Data(d) => format!("data={d}"),
                SseItem::Id(d) => format!("id={d}"),
                SseItem::Dispatch => "end".into(),
            })
        })
        .unwrap();
        got
    }

    #[test]
    fn parser_reads_lines_in_any_cut() {
        let stream = b": hi\n\ndata: {\"a\":1}\r\ndata:{\"b\":2}\nid: r:E:3\nevent: x\nretry: 10\n\n: keepalive\n\ndata\n\n";
        let want = vec![
            "end",
            "data={\"a\":1}",
            "data={\"b\":2}",
            "id=r:E:3",
            "end",
            "end",
            "data=",
            "end",
        ];
        for cut in [1, 2, 3, 7, stream.len()] {
            let mut p = SseParser::default();
            let mut got = Vec::new();
            for piece in stream.chunks(cut) {
                got.extend(items(&mut p, piece));
            }
            assert_eq!(got, want, "cut {cut}");
            assert!(p.partial.is_empty());
        }
        let mut p = SseParser::default();
        assert!(p.feed(b"data: \xff\n", &mut |_| {}).is_err());
    }

    #[test]
    fn livepush_stream() {
        let mut p = SseProto::new(Target::Livepush, "r:1", Some("a.b+c".into())).unwrap();
        assert_eq!(
            p.request("h:1"),
            "GET /v1/sse?rooms=r%3A1&token=a.b%2Bc HTTP/1.1\r\nHost: h:1\r\nAccept: text/event-stream\r\n\r\n"
        );
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let (head, _) = parse_head(raw).unwrap().unwrap();
        let mut out = Vec::new();
        p.opened(&head, &mut out).unwrap();
        assert!(out.is_empty(), "ready only at `joined`");
        let stream = "data: {\"op\":\"connected\",\"transport\":\"sse\"}\n\
             data: {\"op\":\"joined\",\"room\":\"r:1\",\"epoch\":\"E\",\"seq\":4,\"recovered\":true}\n\
             id: r:1:E:4\n\n\
             data: {\"op\":\"online\",\"room\":\"r:1\",\"count\":1}\n\n\
             data: {\"op\":\"msg\",\"room\":\"r:1\",\"type\":\"gift\",\"data\":{\"t\":9,\"n\":0,\"pad\":\"x\"},\"seq\":5,\"ts\":1}\n\
             id: r:1:E:5\n\n\
             data: {\"op\":\"msg\",\"room\":\"r:1\",\"type\":\"chat\",\"data\":{\"t\":9,\"n\":1},\"ts\":1}\n\n\
             data: {\"op\":\"prompt\",\"room\":\"r:1\",\"seq\":90}\n\
             id: r:1:E:6\n";
        let mut parser = SseParser::default();
        parser
            .feed(stream.as_bytes(), &mut |i| p.item(i, &mut out))
            .unwrap();
        assert_eq!(
            out[0],
            Event::Ready {
                epoch: Some("E".into()),
                seq: 4,
                recovered: true
            }
        );
        assert_eq!(msgs(&out), vec![(Some(5), 0), (None, 1)]);
        // The id of an event not yet ended does not count.
        assert!(p.request("h").contains("Last-Event-ID: r:1:E:5\r\n"));
        let mut bad = Head {
            status: 401,
            ..head
        };
        assert!(p.opened(&bad, &mut out).is_err());
        bad.status = 200;
        p.opened(&bad, &mut out).unwrap();
    }

    #[test]
    fn nchan_stream() {
        let mut p = SseProto::new(Target::Nchan, "room1", None).unwrap();
        assert_eq!(
            p.request("h:2"),
            "GET /es/room1 HTTP/1.1\r\nHost: h:2\r\nAccept: text/event-stream\r\n\r\n"
        );
        let (head, _) = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        p.opened(&head, &mut out).unwrap();
        assert!(matches!(out[0], Event::Ready { .. }));
        let stream = format!(
            ": hi\n\nid: 1796543066:0\ndata: {}\n\nid: 1796543066:1\ndata: nope\n\n",
            payload(3, 7, 80)
        );
        out.clear();
        SseParser::default()
            .feed(stream.as_bytes(), &mut |i| p.item(i, &mut out))
            .unwrap();
        assert!(matches!(out[0], Event::Msg(Delivery { seq: None, stamp }) if stamp.n == 7));
        assert!(matches!(&out[1], Event::Error(_)));
        assert!(p.request("h").contains("Last-Event-ID: 1796543066:1\r\n"));
        assert!(SseProto::new(Target::Socketio, "r", None).is_err());
    }
}

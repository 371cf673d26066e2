//! Server-side RFC 6455 WebSocket framing: an incremental, no-IO decoder for client frames and
//! writers for server frames.
//!
//! Why this exists: WebSocket libraries keep a read buffer per connection for as long as the
//! connection lives (tungstenite: 128 KiB by default, still 4 KiB when tuned down), and a push
//! gateway's connections are idle nearly all of the time (bench/wslib/README.md measures the
//! per-connection cost). Here the connection reads into a stack buffer when the socket is
//! readable and hands the bytes to [`Decoder::feed`] synchronously. The decoder is a few words
//! inline and holds heap memory only while a frame straddles two reads or a text message is
//! fragmented; it frees that memory (not just clears it) as soon as the message or control
//! frame is complete, so an idle connection holds zero buffered bytes.
//!
//! What it does not do:
//! - extensions are never negotiated (no permessage-deflate), so any RSV bit is an error;
//! - it decodes client frames only (they must be masked) and writes server frames only
//!   (never masked, always FIN);
//! - binary messages are counted, not kept: the protocol is text-only, so [`Event::Binary`]
//!   carries only the length (the size limit still applies to them);
//! - non-minimal length encodings (e.g. a 16-bit length for 5 bytes) are accepted, as most
//!   implementations do; the RFC's "minimal encoding" rule binds the sender.

#![forbid(unsafe_code)]

use std::fmt;
use std::ops::ControlFlow;

/// Largest header of a server frame (no mask): 2 bytes + 64-bit length.
pub const MAX_HEADER: usize = 10;
/// Largest payload of a control frame (close, ping, pong).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Largest close reason: the control payload minus the 2-byte code.
const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;
/// Largest header of a client frame: 2 bytes + 64-bit length + 4-byte mask.
const MAX_CLIENT_HEADER: usize = 14;

/// Opcodes we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    const fn bits(self) -> u8 {
        match self {
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong.
    pub const fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// One decoded event, borrowed from the input or the decoder's assembly buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete text message: unmasked, fragments joined, UTF-8 checked.
    Text(&'a str),
    /// A complete binary message; only its length (the protocol is text-only).
    Binary(usize),
    /// The caller answers with a pong carrying the same payload.
    Ping(&'a [u8]),
    Pong,
    /// `code` is `None` for an empty close payload (then `reason` is empty).
    Close {
        code: Option<u16>,
        reason: &'a str,
    },
}

/// Why the client's bytes were rejected; the connection is then closed with
/// [`DecodeError::close_code`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Protocol(&'static str),
    TooBig { limit: usize },
    BadUtf8,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Protocol(what) => write!(f, "WebSocket protocol violation: {what}"),
            DecodeError::TooBig { limit } => {
                write!(f, "WebSocket message or frame larger than {limit} bytes")
            }
            DecodeError::BadUtf8 => f.write_str("WebSocket text is not valid UTF-8"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl DecodeError {
    /// The close code to send: 1002 (protocol error), 1009 (message too big) or 1007
    /// (invalid payload data).
    pub fn close_code(&self) -> u16 {
        match self {
            DecodeError::Protocol(_) => 1002,
            DecodeError::TooBig { .. } => 1009,
            DecodeError::BadUtf8 => 1007,
        }
    }
}

/// Opcode of a client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

/// The data message being assembled (between its first frame's header and its FIN frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Text,
    Binary,
}

/// A frame whose header is parsed and whose payload is (partly) still to come.
#[derive(Debug, Clone, Copy)]
struct Frame {
    op: Op,
    fin: bool,
    mask: [u8; 4],
    /// Declared payload length (≤ max_message for data, ≤ 125 for control frames).
    len: u32,
    /// Payload bytes not yet seen.
    remaining: u32,
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Between frames or inside a header: the first `got` header bytes are in `head`.
    Header {
        head: [u8; MAX_CLIENT_HEADER],
        got: u8,
    },
    /// Inside a frame's payload.
    Payload(Frame),
    /// A [`DecodeError`] was returned; every later feed fails.
    Failed,
}

const NEXT_FRAME: Stage = Stage::Header {
    head: [0; MAX_CLIENT_HEADER],
    got: 0,
};

/// Incremental decoder of client frames; see the module docs.
///
/// Heap use: `buf` holds the unmasked bytes of the open text message (only when it is
/// fragmented or its frame straddles reads), followed by the bytes of a control frame that
/// straddles reads. Its capacity never exceeds `max_message + 125`, and it is freed when the
/// message / control frame completes.
///
/// Every connection keeps one, so lengths are `u32` (messages are capped far below 4 GiB):
/// 56 bytes instead of 72.
#[derive(Debug)]
pub struct Decoder {
    max_message: u32,
    /// Declared bytes of the open data message so far (including the frame in progress).
    msg_len: u32,
    buf: Vec<u8>,
    open: Open,
    stage: Stage,
}

impl Decoder {
    /// `max_message`: the largest frame payload and the largest assembled message accepted.
    /// Limits above `u32::MAX` are taken as `u32::MAX`.
    pub fn new(max_message: usize) -> Decoder {
        Decoder {
            max_message: u32::try_from(max_message).unwrap_or(u32::MAX),
            buf: Vec::new(),
            open: Open::None,
            msg_len: 0,
            stage: NEXT_FRAME,
        }
    }

    /// Feed bytes just read from the socket (mutable so masked payloads can be unmasked in
    /// place without copying). Calls `on_event` for every complete message / control frame in
    /// order. Stops early (returning Ok) if `on_event` returns `ControlFlow::Break(())`, e.g.
    /// after a Close; bytes after that point are ignored (the decoder stays consistent and
    /// would continue at the next frame). Returns Err on a protocol violation; the decoder is
    /// then unusable (every later call fails) and has freed its buffer.
    pub fn feed(
        &mut self,
        input: &mut [u8],
        mut on_event: impl FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<(), DecodeError> {
        let result = self.run(input, &mut on_event);
        if result.is_err() {
            self.stage = Stage::Failed;
            self.open = Open::None;
            self.msg_len = 0;
            self.buf = Vec::new();
        }
        result
    }

    /// True when nothing is buffered (no partial frame, no partial message) — holds no heap
    /// memory. Also true after an error (everything was dropped).
    pub fn is_idle(&self) -> bool {
        let between_frames = match self.stage {
            Stage::Header { got, .. } => got == 0,
            Stage::Payload(_) => false,
            Stage::Failed => true,
        };
        between_frames && self.open == Open::None && self.buf.capacity() == 0
    }

    /// Heap bytes held right now (capacity of the assembly buffer); 0 when idle.
    pub fn heap_capacity(&self) -> usize {
        self.buf.capacity()
    }

    fn run<F>(&mut self, input: &mut [u8], on_event: &mut F) -> Result<(), DecodeError>
    where
        F: FnMut(Event<'_>) -> ControlFlow<()>,
    {
        let mut pos = 0;
        loop {
            let frame = match self.stage {
                Stage::Failed => return Err(DecodeError::Protocol("decoder used after an error")),
                Stage::Payload(frame) => frame,
                Stage::Header { mut head, got } => {
                    let mut got = usize::from(got);
                    loop {
                        let need = if got < 2 { 2 } else { header_len(head[1]) };
                        if got == need {
                            break;
                        }
                        if pos == input.len() {
                            if got >= 2 {
                                // Fail fast instead of waiting for the rest of a bad header.
                                self.check_start(head[0], head[1])?;
                            }
                            // got < need <= MAX_CLIENT_HEADER, so it fits a u8.
                            self.stage = Stage::Header {
                                head,
                                got: got as u8,
                            };
                            return Ok(());
                        }
                        let take = (need - got).min(input.len() - pos);
                        head[got..got + take].copy_from_slice(&input[pos..pos + take]);
                        got += take;
                        pos += take;
                    }
                    let frame = self.start_frame(&head[..got])?;
                    self.stage = Stage::Payload(frame);
                    frame
                }
            };

            let remaining = frame.remaining as usize;
            let n = remaining.min(input.len() - pos);
            let chunk = &mut input[pos..pos + n];
            pos += n;
            unmask(chunk, frame.mask, (frame.len - frame.remaining) as usize);
            if n < remaining {
                // The frame straddles this read: keep what the rest of it will need.
                if n > 0 && self.keeps_payload(frame.op) {
                    self.append(chunk, remaining);
                }
                self.stage = Stage::Payload(Frame {
                    // n < remaining, which is a u32.
                    remaining: frame.remaining - n as u32,
                    ..frame
                });
                return Ok(());
            }
            self.stage = NEXT_FRAME;
            let whole = n == frame.len as usize;
            if self.complete(frame, chunk, whole, on_event)?.is_break() {
                return Ok(());
            }
        }
    }

    /// Checks what the first two header bytes alone decide.
    fn check_start(&self, b0: u8, b1: u8) -> Result<Op, DecodeError> {
        if b0 & 0x70 != 0 {
            return Err(DecodeError::Protocol(
                "reserved bits set (no extension negotiated)",
            ));
        }
        let op = match b0 & 0x0F {
            0x0 => Op::Continuation,
            0x1 => Op::Text,
            0x2 => Op::Binary,
            0x8 => Op::Close,
            0x9 => Op::Ping,
            0xA => Op::Pong,
            _ => return Err(DecodeError::Protocol("reserved opcode")),
        };
        if b1 & 0x80 == 0 {
            return Err(DecodeError::Protocol("client frame not masked"));
        }
        match op {
            Op::Close | Op::Ping | Op::Pong => {
                if b0 & 0x80 == 0 {
                    return Err(DecodeError::Protocol("fragmented control frame"));
                }
                if usize::from(b1 & 0x7F) > MAX_CONTROL_PAYLOAD {
                    return Err(DecodeError::Protocol(
                        "control frame payload longer than 125 bytes",
                    ));
                }
            }
            Op::Continuation if self.open == Open::None => {
                return Err(DecodeError::Protocol(
                    "continuation frame without a message to continue",
                ));
            }
            Op::Text | Op::Binary if self.open != Open::None => {
                return Err(DecodeError::Protocol(
                    "new data frame while a fragmented message is open",
                ));
            }
            _ => {}
        }
        Ok(op)
    }

    /// Validates a complete header (`head.len() == header_len(head[1])`) and opens the data
    /// message it starts. Checks the declared length before anything is buffered.
    fn start_frame(&mut self, head: &[u8]) -> Result<Frame, DecodeError> {
        let op = self.check_start(head[0], head[1])?;
        let (len, mask_bytes) = match head[1] & 0x7F {
            126 => (
                u64::from(u16::from_be_bytes([head[2], head[3]])),
                &head[4..],
            ),
            127 => {
                let mut b = [0; 8];
                b.copy_from_slice(&head[2..10]);
                (u64::from_be_bytes(b), &head[10..])
            }
            n => (u64::from(n), &head[2..]),
        };
        if len >> 63 != 0 {
            return Err(DecodeError::Protocol(
                "64-bit payload length with the most significant bit set",
            ));
        }
        let mut mask = [0; 4];
        mask.copy_from_slice(mask_bytes);
        let len = match op {
            // check_start bounded these to 125.
            Op::Close | Op::Ping | Op::Pong => u32::from(head[1] & 0x7F),
            Op::Continuation | Op::Text | Op::Binary => {
                let room = self.max_message - self.msg_len;
                let len = u32::try_from(len).ok().filter(|&len| len <= room).ok_or(
                    DecodeError::TooBig {
                        limit: self.max_message as usize,
                    },
                )?;
                match op {
                    Op::Text => self.open = Open::Text,
                    Op::Binary => self.open = Open::Binary,
                    _ => {}
                }
                self.msg_len += len;
                len
            }
        };
        Ok(Frame {
            op,
            fin: head[0] & 0x80 != 0,
            mask,
            len,
            remaining: len,
        })
    }

    /// Whether a frame's payload must be kept when it straddles reads.
    fn keeps_payload(&self, op: Op) -> bool {
        match op {
            Op::Close | Op::Ping | Op::Pong => true,
            Op::Continuation | Op::Text | Op::Binary => self.open == Open::Text,
        }
    }

    /// Appends unmasked payload bytes; `frame_rest` (≥ `chunk.len()`) is how many bytes of the
    /// current frame are still to be appended, so a straddling frame allocates once.
    /// Fragmented messages grow geometrically, capped at `max_message`; data bytes never pass
    /// `max_message` (checked in `start_frame`), control bytes add at most 125.
    fn append(&mut self, chunk: &[u8], frame_rest: usize) {
        let need = self.buf.len() + frame_rest;
        if need > self.buf.capacity() {
            let doubled = (self.buf.capacity().saturating_mul(2)).min(self.max_message as usize);
            self.buf.reserve_exact(need.max(doubled) - self.buf.len());
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Ends the open data message and frees its buffer.
    fn end_message(&mut self) {
        self.open = Open::None;
        self.msg_len = 0;
        self.buf = Vec::new();
    }

    /// A frame's payload is complete: `chunk` is its last part (all of it if `whole`),
    /// already unmasked. Emits the event it completes, if any.
    fn complete<F>(
        &mut self,
        frame: Frame,
        chunk: &[u8],
        whole: bool,
        on_event: &mut F,
    ) -> Result<ControlFlow<()>, DecodeError>
    where
        F: FnMut(Event<'_>) -> ControlFlow<()>,
    {
        match frame.op {
            Op::Close | Op::Ping | Op::Pong => {
                if whole {
                    return Ok(on_event(control_event(frame.op, chunk)?));
                }
                // The open text message's bytes come first in `buf`, then this frame's.
                let start = if self.open == Open::Text {
                    self.msg_len as usize
                } else {
                    0
                };
                self.append(chunk, chunk.len());
                let flow = on_event(control_event(frame.op, &self.buf[start..])?);
                if start > 0 {
                    self.buf.truncate(start);
                } else {
                    self.buf = Vec::new();
                }
                Ok(flow)
            }
            Op::Continuation | Op::Text | Op::Binary => match self.open {
                Open::Binary => {
                    if !frame.fin {
                        return Ok(ControlFlow::Continue(()));
                    }
                    let len = self.msg_len as usize;
                    self.end_message();
                    Ok(on_event(Event::Binary(len)))
                }
                Open::Text => {
                    if whole && frame.fin && frame.op == Op::Text {
                        // One frame, one read: straight from the input, no copy.
                        self.end_message();
                        let text = std::str::from_utf8(chunk).map_err(|_| DecodeError::BadUtf8)?;
                        return Ok(on_event(Event::Text(text)));
                    }
                    self.append(chunk, chunk.len());
                    if !frame.fin {
                        return Ok(ControlFlow::Continue(()));
                    }
                    let text = std::str::from_utf8(&self.buf).map_err(|_| DecodeError::BadUtf8)?;
                    let flow = on_event(Event::Text(text));
                    self.end_message();
                    Ok(flow)
                }
                Open::None => Err(DecodeError::Protocol("data frame without a message")),
            },
        }
    }
}

/// Total header length of a client frame, from its second byte.
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// XORs `buf` with `mask`, where `buf` starts at payload offset `offset`.
fn unmask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut m = mask;
    m.rotate_left(offset % 4);
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let (words, tail) = buf.as_chunks_mut::<8>();
    for w in words {
        *w = (u64::from_ne_bytes(*w) ^ word).to_ne_bytes();
    }
    for (b, k) in tail.iter_mut().zip(m.iter().cycle()) {
        *b ^= k;
    }
}

fn control_event(op: Op, payload: &[u8]) -> Result<Event<'_>, DecodeError> {
    Ok(match op {
        Op::Ping => Event::Ping(payload),
        Op::Pong => Event::Pong,
        _ => {
            let (code, reason) = parse_close(payload)?;
            Event::Close { code, reason }
        }
    })
}

fn parse_close(payload: &[u8]) -> Result<(Option<u16>, &str), DecodeError> {
    match payload {
        [] => Ok((None, "")),
        [_] => Err(DecodeError::Protocol("close payload of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_allowed(code) {
                return Err(DecodeError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| DecodeError::BadUtf8)?;
            Ok((Some(code), reason))
        }
    }
}

/// Close codes a peer may send: 1000-1003, 1007-1014 (defined or IANA-registered),
/// 3000-4999 (registered / private). Not < 1000, not 1004 (reserved), 1005/1006/1015 (never
/// on the wire), 1016-2999 (reserved), nor ≥ 5000 (undefined).
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Header length of a server frame with this payload length (2, 4 or 10).
pub const fn header_size(payload_len: usize) -> usize {
    if payload_len < 126 {
        2
    } else if payload_len <= 0xFFFF {
        4
    } else {
        MAX_HEADER
    }
}

/// Server-to-client frame header (never masked, FIN set). Appends to `out`.
pub fn write_header(out: &mut Vec<u8>, opcode: OpCode, payload_len: usize) {
    out.push(0x80 | opcode.bits());
    match payload_len {
        0..=125 => out.push(payload_len as u8),
        126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(payload_len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(payload_len as u64).to_be_bytes());
        }
    }
}

fn frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header_size(payload.len()) + payload.len());
    write_header(&mut out, opcode, payload.len());
    out.extend_from_slice(payload);
    out
}

/// A text frame: header + payload in one Vec.
pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    frame(OpCode::Text, payload)
}

/// A ping or pong frame; the payload is truncated to 125 bytes.
pub fn control_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    debug_assert!(opcode.is_control(), "control_frame({opcode:?})");
    frame(opcode, &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)])
}

/// A close frame; the reason is truncated to 123 bytes on a char boundary.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut out = Vec::with_capacity(2 + 2 + reason.len());
    write_header(&mut out, OpCode::Close, 2 + reason.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    /// The mask of RFC 6455 section 5.7's examples.
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    const TEXT: u8 = 0x1;
    const BINARY: u8 = 0x2;
    const CONT: u8 = 0x0;
    const CLOSE: u8 = 0x8;
    const PING: u8 = 0x9;
    const PONG: u8 = 0xA;
    const FIN: u8 = 0x80;

    /// An owned [`Event`], for comparing.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        Text(String),
        Binary(usize),
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>, String),
    }

    impl From<Event<'_>> for Ev {
        fn from(e: Event<'_>) -> Ev {
            match e {
                Event::Text(t) => Ev::Text(t.to_owned()),
                Event::Binary(n) => Ev::Binary(n),
                Event::Ping(p) => Ev::Ping(p.to_vec()),
                Event::Pong => Ev::Pong,
                Event::Close { code, reason } => Ev::Close(code, reason.to_owned()),
            }
        }
    }

    /// A client frame: `first` is the raw first byte (FIN | RSV | opcode); `len_bytes` forces
    /// a length encoding (0, 2 or 8 extra bytes), `None` picks the minimal one.
    fn raw_frame(
        first: u8,
        payload: &[u8],
        mask: Option<[u8; 4]>,
        len_bytes: Option<usize>,
    ) -> Vec<u8> {
        let len = payload.len();
        let len_bytes = len_bytes.unwrap_or(match len {
            0..=125 => 0,
            126..=0xFFFF => 2,
            _ => 8,
        });
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        let mut out = vec![first];
        match len_bytes {
            0 => out.push(mask_bit | len as u8),
            2 => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        match mask {
            Some(m) => {
                out.extend_from_slice(&m);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
            }
            None => out.extend_from_slice(payload),
        }
        out
    }

    /// A masked client frame with minimal length encoding.
    fn masked(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        raw_frame(if fin { FIN | op } else { op }, payload, Some(MASK), None)
    }

    fn close_payload(code: u16, reason: &str) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason.as_bytes());
        p
    }

    /// Feeds `chunks` in order; all events, or the first error.
    fn feed_chunks<'a>(
        dec: &mut Decoder,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<Ev>, DecodeError> {
        let mut events = Vec::new();
        for chunk in chunks {
            let mut chunk = chunk.to_vec();
            dec.feed(&mut chunk, |e| {
                events.push(Ev::from(e));
                ControlFlow::Continue(())
            })?;
        }
        Ok(events)
    }

    fn decode(max: usize, bytes: &[u8]) -> Result<Vec<Ev>, DecodeError> {
        let mut dec = Decoder::new(max);
        let events = feed_chunks(&mut dec, [bytes])?;
        assert!(dec.is_idle(), "not idle after complete input");
        Ok(events)
    }

    fn text(s: &str) -> Ev {
        Ev::Text(s.to_owned())
    }

    // ---- basics -------------------------------------------------------------------------

    #[test]
    fn rfc_example_hello() {
        let bytes = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(decode(100, &bytes), Ok(vec![text("Hello")]));
    }

    #[test]
    fn small_text_frame() {
        assert_eq!(
            decode(100, &masked(true, TEXT, b"hi")),
            Ok(vec![text("hi")])
        );
        assert_eq!(decode(100, &masked(true, TEXT, b"")), Ok(vec![text("")]));
        let s = "x".repeat(125);
        let bytes = masked(true, TEXT, s.as_bytes());
        assert_eq!(bytes.len(), 2 + 4 + 125);
        assert_eq!(decode(1000, &bytes), Ok(vec![text(&s)]));
    }

    #[test]
    fn sixteen_bit_lengths() {
        for len in [126, 127, 300, 0xFFFF] {
            let s: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            let bytes = masked(true, TEXT, s.as_bytes());
            assert_eq!(bytes[1], 0x80 | 126);
            assert_eq!(bytes.len(), 2 + 2 + 4 + len);
            assert_eq!(decode(1 << 20, &bytes), Ok(vec![text(&s)]), "len {len}");
        }
    }

    #[test]
    fn sixty_four_bit_lengths() {
        for len in [0x1_0000, 70_000] {
            let s: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            let bytes = masked(true, TEXT, s.as_bytes());
            assert_eq!(bytes[1], 0x80 | 127);
            assert_eq!(decode(1 << 20, &bytes), Ok(vec![text(&s)]), "len {len}");
            let bytes = masked(true, BINARY, s.as_bytes());
            assert_eq!(decode(1 << 20, &bytes), Ok(vec![Ev::Binary(len)]));
        }
    }

    #[test]
    fn non_minimal_length_encoding_is_accepted() {
        for len_bytes in [2, 8] {
            let bytes = raw_frame(FIN | TEXT, b"abc", Some(MASK), Some(len_bytes));
            assert_eq!(decode(100, &bytes), Ok(vec![text("abc")]));
        }
    }

    #[test]
    fn binary_reports_length_and_never_allocates() {
        let payload = vec![7u8; 1000];
        let mut bytes = masked(false, BINARY, &payload[..400]);
        bytes.extend(masked(true, PING, b"p"));
        bytes.extend(masked(true, CONT, &payload[400..]));
        let mut dec = Decoder::new(1000);
        for chunk in bytes.chunks(7) {
            let mut chunk = chunk.to_vec();
            dec.feed(&mut chunk, |_| ControlFlow::Continue(())).unwrap();
            // A straddling ping may be held briefly, never the binary payload.
            assert!(dec.heap_capacity() <= MAX_CONTROL_PAYLOAD);
        }
        assert!(dec.is_idle());
        let events = feed_chunks(&mut Decoder::new(1000), bytes.chunks(7)).unwrap();
        assert_eq!(events, vec![Ev::Ping(b"p".to_vec()), Ev::Binary(1000)]);
    }

    #[test]
    fn ping_pong_events() {
        let mut bytes = masked(true, PING, b"are you there");
        bytes.extend(masked(true, PING, b""));
        bytes.extend(masked(true, PONG, b"whatever"));
        assert_eq!(
            decode(10, &bytes),
            Ok(vec![
                Ev::Ping(b"are you there".to_vec()),
                Ev::Ping(vec![]),
                Ev::Pong
            ])
        );
    }

    #[test]
    fn control_frames_are_not_bound_by_max_message() {
        let bytes = masked(true, PING, &[1; 125]);
        assert_eq!(decode(0, &bytes), Ok(vec![Ev::Ping(vec![1; 125])]));
    }

    #[test]
    fn fragmented_text_with_ping_between_fragments() {
        let mut bytes = masked(false, TEXT, b"Hel");
        bytes.extend(masked(true, PING, b"ping!"));
        bytes.extend(masked(false, CONT, b""));
        bytes.extend(masked(true, PONG, b""));
        bytes.extend(masked(true, CONT, b"lo"));
        bytes.extend(masked(true, TEXT, b"next"));
        let want = vec![
            Ev::Ping(b"ping!".to_vec()),
            Ev::Pong,
            text("Hello"),
            text("next"),
        ];
        assert_eq!(decode(100, &bytes), Ok(want.clone()));
        // Same, byte by byte: the ping straddles reads while text bytes sit in the buffer.
        let mut dec = Decoder::new(100);
        assert_eq!(feed_chunks(&mut dec, bytes.chunks(1)), Ok(want));
        assert!(dec.is_idle());
    }

    #[test]
    fn close_between_fragments() {
        let mut bytes = masked(false, TEXT, b"a");
        bytes.extend(masked(true, CLOSE, &close_payload(1000, "bye")));
        assert_eq!(
            decode_partial(100, &bytes),
            Ok(vec![Ev::Close(Some(1000), "bye".into())])
        );
    }

    /// Like `decode` without requiring idleness at the end.
    fn decode_partial(max: usize, bytes: &[u8]) -> Result<Vec<Ev>, DecodeError> {
        feed_chunks(&mut Decoder::new(max), [bytes])
    }

    #[test]
    fn utf8_code_point_split_across_fragments() {
        let s = "héllo €𝄞";
        let b = s.as_bytes();
        // Cut inside the 2-byte é and inside the 4-byte clef.
        let (a, rest) = b.split_at(2);
        let (m, z) = rest.split_at(rest.len() - 2);
        let mut bytes = masked(false, TEXT, a);
        bytes.extend(masked(false, CONT, m));
        bytes.extend(masked(true, CONT, z));
        assert_eq!(decode(100, &bytes), Ok(vec![text(s)]));
    }

    #[test]
    fn invalid_utf8_is_bad_utf8() {
        assert_eq!(
            decode(100, &masked(true, TEXT, &[b'a', 0xff])),
            Err(DecodeError::BadUtf8)
        );
        // Truncated code point at the end of a message.
        assert_eq!(
            decode(100, &masked(true, TEXT, &"é".as_bytes()[..1])),
            Err(DecodeError::BadUtf8)
        );
        // Fragmented: the error shows only when the message is complete.
        let mut dec = Decoder::new(100);
        let mut first = masked(false, TEXT, &[0xC3]);
        assert_eq!(dec.feed(&mut first, |_| ControlFlow::Continue(())), Ok(()));
        let mut last = masked(true, CONT, b"x");
        assert_eq!(
            dec.feed(&mut last, |_| ControlFlow::Continue(())),
            Err(DecodeError::BadUtf8)
        );
        assert_eq!(DecodeError::BadUtf8.close_code(), 1007);
    }

    // ---- rule violations ----------------------------------------------------------------

    fn protocol(max: usize, bytes: &[u8]) {
        match decode_partial(max, bytes) {
            Err(DecodeError::Protocol(_)) => {}
            other => panic!("expected a protocol error for {bytes:02x?}, got {other:?}"),
        }
    }

    /// After `prefix` (decoded fine), the first two bytes of `frame` alone are refused: a bad
    /// frame is rejected without waiting for the rest of its header or its payload.
    fn protocol_early(prefix: &[u8], frame: &[u8]) {
        let mut dec = Decoder::new(1000);
        let mut prefix = prefix.to_vec();
        assert_eq!(dec.feed(&mut prefix, |_| ControlFlow::Continue(())), Ok(()));
        let mut two = frame[..2].to_vec();
        match dec.feed(&mut two, |_| ControlFlow::Continue(())) {
            Err(DecodeError::Protocol(_)) => {}
            other => panic!("expected an early protocol error for {frame:02x?}, got {other:?}"),
        }
    }

    #[test]
    fn unmasked_frame_is_protocol_error() {
        protocol(100, &raw_frame(FIN | TEXT, b"hi", None, None));
        protocol(100, &raw_frame(FIN | PING, b"", None, None));
        protocol_early(b"", &raw_frame(FIN | TEXT, &[b'a'; 300], None, None));
        // Detected from the first two bytes, without the rest of the frame.
        let mut dec = Decoder::new(100);
        let mut two = [FIN | TEXT, 2];
        assert!(matches!(
            dec.feed(&mut two, |_| ControlFlow::Continue(())),
            Err(DecodeError::Protocol(_))
        ));
    }

    #[test]
    fn reserved_bits_are_protocol_error() {
        for rsv in [0x40, 0x20, 0x10, 0x70] {
            protocol(100, &raw_frame(FIN | rsv | TEXT, b"hi", Some(MASK), None));
            protocol(100, &raw_frame(FIN | rsv | PING, b"", Some(MASK), None));
            protocol_early(b"", &raw_frame(FIN | rsv | TEXT, b"hi", Some(MASK), None));
        }
    }

    #[test]
    fn reserved_opcodes_are_protocol_error() {
        for op in (3..=7).chain(11..=15) {
            protocol(100, &raw_frame(FIN | op, b"x", Some(MASK), None));
            protocol_early(b"", &raw_frame(FIN | op, b"x", Some(MASK), None));
        }
    }

    #[test]
    fn control_frame_longer_than_125_is_protocol_error() {
        protocol(1000, &masked(true, PING, &[0; 126]));
        protocol_early(b"", &masked(true, PING, &[0; 126]));
        protocol(1000, &masked(true, CLOSE, &[0x03; 200]));
        // 16-bit length encoding of a short control payload is refused as well.
        protocol(1000, &raw_frame(FIN | PONG, b"x", Some(MASK), Some(2)));
    }

    #[test]
    fn fragmented_control_frame_is_protocol_error() {
        protocol(100, &masked(false, PING, b"x"));
        protocol_early(b"", &masked(false, PING, b"x"));
        protocol(100, &masked(false, CLOSE, b""));
        protocol(100, &masked(false, PONG, b""));
    }

    #[test]
    fn continuation_without_message_is_protocol_error() {
        protocol(100, &masked(true, CONT, b"x"));
        protocol(100, &masked(false, CONT, b"x"));
        // After a complete message too.
        let mut bytes = masked(false, TEXT, b"a");
        bytes.extend(masked(true, CONT, b"b"));
        bytes.extend(masked(true, CONT, b"c"));
        protocol(100, &bytes);
        // From the header alone: no payload byte of the bad frame is needed.
        protocol_early(b"", &masked(true, CONT, b"payload"));
        let mut done = masked(false, TEXT, b"a");
        done.extend(masked(true, CONT, b"b"));
        protocol_early(&done, &masked(false, CONT, b"payload"));
    }

    #[test]
    fn new_message_inside_fragmented_message_is_protocol_error() {
        for (first, second) in [
            (TEXT, TEXT),
            (TEXT, BINARY),
            (BINARY, TEXT),
            (BINARY, BINARY),
        ] {
            let mut bytes = masked(false, first, b"a");
            bytes.extend(masked(true, second, b"b"));
            protocol(100, &bytes);
            protocol_early(&masked(false, first, b"a"), &masked(true, second, b"b"));
        }
    }

    #[test]
    fn sixty_four_bit_length_with_top_bit_is_protocol_error() {
        let mut bytes = vec![FIN | TEXT, 0x80 | 127];
        bytes.extend_from_slice(&(1u64 << 63).to_be_bytes());
        bytes.extend_from_slice(&MASK);
        protocol(usize::MAX, &bytes);
        let mut bytes = vec![FIN | BINARY, 0x80 | 127];
        bytes.extend_from_slice(&u64::MAX.to_be_bytes());
        bytes.extend_from_slice(&MASK);
        protocol(usize::MAX, &bytes);
    }

    #[test]
    fn frame_larger_than_max_is_too_big_before_payload() {
        // Only the header: the declared length alone is refused, nothing is buffered.
        for len in [101usize, 300, 70_000] {
            let full = masked(true, TEXT, &vec![b'a'; len]);
            let header = &full[..header_len(full[1])];
            let mut dec = Decoder::new(100);
            let mut h = header.to_vec();
            assert_eq!(
                dec.feed(&mut h, |_| ControlFlow::Continue(())),
                Err(DecodeError::TooBig { limit: 100 })
            );
            assert_eq!(dec.heap_capacity(), 0);
        }
        let mut huge = vec![FIN | BINARY, 0x80 | 127];
        huge.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
        huge.extend_from_slice(&MASK);
        assert_eq!(
            decode_partial(1 << 20, &huge),
            Err(DecodeError::TooBig { limit: 1 << 20 })
        );
        assert_eq!(DecodeError::TooBig { limit: 1 }.close_code(), 1009);
    }

    #[test]
    fn message_exactly_max_is_accepted() {
        let mut bytes = masked(false, TEXT, &[b'a'; 60]);
        bytes.extend(masked(true, CONT, &[b'b'; 40]));
        let want = format!("{}{}", "a".repeat(60), "b".repeat(40));
        assert_eq!(decode(100, &bytes), Ok(vec![Ev::Text(want)]));
        assert_eq!(
            decode(100, &masked(true, BINARY, &[0; 100])),
            Ok(vec![Ev::Binary(100)])
        );
    }

    #[test]
    fn fragmented_message_larger_than_max_is_too_big() {
        for op in [TEXT, BINARY] {
            let mut bytes = masked(false, op, &[b'a'; 60]);
            bytes.extend(masked(false, CONT, &[b'b'; 40]));
            bytes.extend(masked(true, CONT, b"c"));
            assert_eq!(
                decode_partial(100, &bytes),
                Err(DecodeError::TooBig { limit: 100 })
            );
        }
    }

    #[test]
    fn decoder_is_unusable_after_an_error() {
        let mut dec = Decoder::new(100);
        let mut bad = raw_frame(FIN | TEXT, b"hi", None, None);
        assert!(dec.feed(&mut bad, |_| ControlFlow::Continue(())).is_err());
        let mut good = masked(true, TEXT, b"hi");
        let mut called = false;
        assert!(
            dec.feed(&mut good, |_| {
                called = true;
                ControlFlow::Continue(())
            })
            .is_err()
        );
        assert!(!called);
        assert_eq!(dec.heap_capacity(), 0);
    }

    #[test]
    fn error_frees_the_buffer() {
        let mut dec = Decoder::new(100);
        let mut part = masked(false, TEXT, b"abc");
        dec.feed(&mut part, |_| ControlFlow::Continue(())).unwrap();
        assert!(dec.heap_capacity() > 0);
        let mut bad = masked(true, TEXT, b"x");
        assert!(dec.feed(&mut bad, |_| ControlFlow::Continue(())).is_err());
        assert_eq!(dec.heap_capacity(), 0);
        assert_eq!(DecodeError::Protocol("x").close_code(), 1002);
    }

    // ---- close frames -------------------------------------------------------------------

    #[test]
    fn close_empty_payload_has_no_code() {
        assert_eq!(
            decode(100, &masked(true, CLOSE, b"")),
            Ok(vec![Ev::Close(None, String::new())])
        );
    }

    #[test]
    fn close_one_byte_payload_is_protocol_error() {
        protocol(100, &masked(true, CLOSE, &[0x03]));
    }

    #[test]
    fn close_code_and_reason() {
        assert_eq!(
            decode(
                100,
                &masked(true, CLOSE, &close_payload(1001, "going away ✓"))
            ),
            Ok(vec![Ev::Close(Some(1001), "going away ✓".into())])
        );
        assert_eq!(
            decode(100, &masked(true, CLOSE, &close_payload(4000, ""))),
            Ok(vec![Ev::Close(Some(4000), String::new())])
        );
    }

    #[test]
    fn close_codes_valid_and_invalid() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
        ] {
            assert_eq!(
                decode(100, &masked(true, CLOSE, &close_payload(code, "r"))),
                Ok(vec![Ev::Close(Some(code), "r".into())]),
                "code {code}"
            );
        }
        for code in [3000, 3999, 4000, 4999] {
            assert!(decode(100, &masked(true, CLOSE, &close_payload(code, ""))).is_ok());
        }
        for code in [
            0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert_eq!(
                decode_partial(100, &masked(true, CLOSE, &close_payload(code, ""))),
                Err(DecodeError::Protocol("invalid close code")),
                "code {code}"
            );
        }
    }

    #[test]
    fn close_reason_invalid_utf8_is_bad_utf8() {
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(&[0xce, 0xba, 0xe1, 0xbd]);
        assert_eq!(
            decode_partial(100, &masked(true, CLOSE, &p)),
            Err(DecodeError::BadUtf8)
        );
    }

    // ---- reads --------------------------------------------------------------------------

    /// Several kinds of frames, with all three length encodings.
    fn mixed_stream() -> (Vec<u8>, Vec<Ev>) {
        let long: String = "ab€".repeat(50); // 250 bytes: 16-bit length
        let huge = "z".repeat(70_000); // 64-bit length
        let mut b = masked(true, TEXT, b"first");
        b.extend(masked(false, TEXT, &long.as_bytes()[..101]));
        b.extend(masked(true, PING, b"in between"));
        b.extend(masked(true, CONT, &long.as_bytes()[101..]));
        b.extend(masked(true, BINARY, &[9; 300]));
        b.extend(masked(true, PONG, b"p"));
        b.extend(masked(true, TEXT, b""));
        b.extend(masked(true, TEXT, huge.as_bytes()));
        b.extend(masked(true, CLOSE, &close_payload(1000, "done")));
        let want = vec![
            text("first"),
            Ev::Ping(b"in between".to_vec()),
            Ev::Text(long),
            Ev::Binary(300),
            Ev::Pong,
            text(""),
            Ev::Text(huge),
            Ev::Close(Some(1000), "done".into()),
        ];
        (b, want)
    }

    #[test]
    fn split_at_every_byte_boundary() {
        // A smaller stream than mixed_stream so that every split point stays cheap.
        let long: String = "ab€".repeat(50);
        let mut b = masked(true, TEXT, b"first");
        b.extend(masked(false, TEXT, &long.as_bytes()[..101]));
        b.extend(masked(true, PING, b"in between"));
        b.extend(masked(true, CONT, &long.as_bytes()[101..]));
        b.extend(masked(true, BINARY, &[9; 130]));
        b.extend(masked(true, CLOSE, &close_payload(1000, "done")));
        let want = vec![
            text("first"),
            Ev::Ping(b"in between".to_vec()),
            Ev::Text(long),
            Ev::Binary(130),
            Ev::Close(Some(1000), "done".into()),
        ];
        for i in 0..=b.len() {
            let (x, y) = b.split_at(i);
            let mut dec = Decoder::new(1000);
            assert_eq!(
                feed_chunks(&mut dec, [x, y]),
                Ok(want.clone()),
                "split at {i}"
            );
            assert!(dec.is_idle(), "split at {i}");
            for j in i..=b.len() {
                let (y, z) = b[i..].split_at(j - i);
                let mut dec = Decoder::new(1000);
                assert_eq!(
                    feed_chunks(&mut dec, [x, y, z]),
                    Ok(want.clone()),
                    "{i}/{j}"
                );
            }
        }
        let mut dec = Decoder::new(1000);
        assert_eq!(feed_chunks(&mut dec, b.chunks(1)), Ok(want));
        assert!(dec.is_idle());
    }

    #[test]
    fn mixed_stream_in_one_read_and_in_pieces() {
        let (bytes, want) = mixed_stream();
        assert_eq!(decode(1 << 20, &bytes), Ok(want.clone()));
        for size in [1, 2, 3, 5, 13, 4096] {
            let mut dec = Decoder::new(1 << 20);
            assert_eq!(feed_chunks(&mut dec, bytes.chunks(size)), Ok(want.clone()));
            assert!(dec.is_idle());
        }
    }

    #[test]
    fn many_frames_in_one_read() {
        let mut bytes = Vec::new();
        let mut want = Vec::new();
        for i in 0..2000 {
            let s = format!("message {i}");
            bytes.extend(masked(true, TEXT, s.as_bytes()));
            want.push(Ev::Text(s));
            if i % 100 == 0 {
                bytes.extend(masked(true, PING, &[i as u8]));
                want.push(Ev::Ping(vec![i as u8]));
            }
        }
        let mut dec = Decoder::new(100);
        let mut events = Vec::new();
        dec.feed(&mut bytes, |e| {
            events.push(Ev::from(e));
            // Nothing straddles: complete frames are decoded from the input, no allocation.
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(events, want);
        assert!(dec.is_idle());
    }

    #[test]
    fn break_stops_early() {
        let mut bytes = masked(true, TEXT, b"a");
        bytes.extend(masked(true, CLOSE, &close_payload(1000, "")));
        bytes.extend(masked(true, TEXT, b"after close"));
        let mut dec = Decoder::new(100);
        let mut events = Vec::new();
        let r = dec.feed(&mut bytes, |e| {
            let close = matches!(e, Event::Close { .. });
            events.push(Ev::from(e));
            if close {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(r, Ok(()));
        assert_eq!(
            events,
            vec![text("a"), Ev::Close(Some(1000), String::new())]
        );
        assert!(dec.is_idle());
    }

    #[test]
    fn idle_only_between_messages_and_buffer_is_freed() {
        let mut dec = Decoder::new(1000);
        assert!(dec.is_idle());
        let mut nothing = [];
        dec.feed(&mut nothing, |_| ControlFlow::Continue(()))
            .unwrap();
        assert!(dec.is_idle());

        // Partial header: not idle, no heap.
        let frame = masked(true, TEXT, b"hello");
        let mut a = frame[..3].to_vec();
        dec.feed(&mut a, |_| ControlFlow::Continue(())).unwrap();
        assert!(!dec.is_idle());
        assert_eq!(dec.heap_capacity(), 0);
        // Partial payload: one allocation of exactly the frame's size.
        let mut b = frame[3..8].to_vec();
        dec.feed(&mut b, |_| ControlFlow::Continue(())).unwrap();
        assert!(!dec.is_idle());
        assert_eq!(dec.heap_capacity(), 5);
        let mut c = frame[8..].to_vec();
        let mut got = Vec::new();
        dec.feed(&mut c, |e| {
            got.push(Ev::from(e));
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(got, vec![text("hello")]);
        assert!(dec.is_idle());
        assert_eq!(dec.heap_capacity(), 0);

        // Open fragmented message: not idle until its last fragment.
        let mut f = masked(false, TEXT, b"");
        dec.feed(&mut f, |_| ControlFlow::Continue(())).unwrap();
        assert!(!dec.is_idle());
        let mut f = masked(false, CONT, b"abc");
        dec.feed(&mut f, |_| ControlFlow::Continue(())).unwrap();
        assert!(dec.heap_capacity() >= 3);
        let mut f = masked(true, CONT, b"d");
        dec.feed(&mut f, |_| ControlFlow::Continue(())).unwrap();
        assert!(dec.is_idle());

        // A straddling ping with no message open is freed once delivered.
        let ping = masked(true, PING, b"0123456789");
        let mut p1 = ping[..9].to_vec();
        dec.feed(&mut p1, |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(dec.heap_capacity(), 10);
        let mut p2 = ping[9..].to_vec();
        dec.feed(&mut p2, |_| ControlFlow::Continue(())).unwrap();
        assert!(dec.is_idle());
    }

    #[test]
    fn decoder_is_small() {
        assert!(
            std::mem::size_of::<Decoder>() <= 96,
            "{}",
            std::mem::size_of::<Decoder>()
        );
    }

    #[test]
    fn unmask_any_offset_matches_bytewise() {
        let data: Vec<u8> = (0..=255u8).collect();
        for offset in 0..8 {
            for len in [0, 1, 7, 8, 9, 31, 200] {
                let mut fast = data[..len].to_vec();
                unmask(&mut fast, MASK, offset);
                let slow: Vec<u8> = data[..len]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ MASK[(i + offset) % 4])
                    .collect();
                assert_eq!(fast, slow, "offset {offset} len {len}");
            }
        }
    }

    // ---- writers ------------------------------------------------------------------------

    #[test]
    fn write_header_lengths() {
        let cases: [(usize, &[u8]); 6] = [
            (0, &[0x81, 0]),
            (125, &[0x81, 125]),
            (126, &[0x81, 126, 0, 126]),
            (0xFFFF, &[0x81, 126, 0xFF, 0xFF]),
            (0x1_0000, &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
            (
                usize::MAX,
                &[0x81, 127, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
            ),
        ];
        for (len, want) in cases {
            let mut out = Vec::new();
            write_header(&mut out, OpCode::Text, len);
            assert_eq!(out, want, "len {len}");
            assert_eq!(header_size(len), want.len());
            assert!(out.len() <= MAX_HEADER);
        }
        let mut out = Vec::new();
        for op in [
            OpCode::Text,
            OpCode::Binary,
            OpCode::Close,
            OpCode::Ping,
            OpCode::Pong,
        ] {
            write_header(&mut out, op, 0);
        }
        assert_eq!(out, [0x81, 0, 0x82, 0, 0x88, 0, 0x89, 0, 0x8A, 0]);
    }

    #[test]
    fn text_frame_is_header_and_payload() {
        assert_eq!(text_frame(b"hi"), [0x81, 2, b'h', b'i']);
        let payload = vec![b'x'; 300];
        let f = text_frame(&payload);
        assert_eq!(&f[..4], &[0x81, 126, 1, 44]);
        assert_eq!(&f[4..], &payload[..]);
        assert_eq!(f.capacity(), f.len());
    }

    #[test]
    fn control_frame_truncates_to_125() {
        assert_eq!(
            control_frame(OpCode::Pong, b"abc"),
            [0x8A, 3, b'a', b'b', b'c']
        );
        let f = control_frame(OpCode::Ping, &[7; 200]);
        assert_eq!(f.len(), 2 + 125);
        assert_eq!(&f[..2], &[0x89, 125]);
    }

    #[test]
    fn close_frame_truncates_reason_on_char_boundary() {
        assert_eq!(close_frame(1000, ""), [0x88, 2, 0x03, 0xE8]);
        assert_eq!(
            close_frame(1001, "bye"),
            [0x88, 5, 0x03, 0xE9, b'b', b'y', b'e']
        );
        let ascii = "a".repeat(200);
        let f = close_frame(1000, &ascii);
        assert_eq!(f.len(), 2 + 125);
        assert_eq!(&f[4..], "a".repeat(123).as_bytes());
        // 122 ASCII bytes then a 3-byte char: byte 123 falls inside it, so it is dropped.
        let reason = format!("{}€tail", "a".repeat(122));
        let f = close_frame(1000, &reason);
        assert_eq!(f[1], 2 + 122);
        assert_eq!(&f[4..], "a".repeat(122).as_bytes());
        let reason = format!("{}€", "a".repeat(120));
        let f = close_frame(1000, &reason);
        assert_eq!(&f[4..], reason.as_bytes());
    }

    // ---- cross-check with tungstenite (a real client implementation) -------------------

    mod tung {
        pub use tungstenite::protocol::frame::coding::{
            CloseCode, Control, Data, OpCode,
        };
        pub use tungstenite::protocol::frame::{CloseFrame, Frame, FrameHeader};
    }

    /// A frame encoded by tungstenite, masked the way its client does.
    fn tung_bytes(mut frame: tung::Frame, mask: [u8; 4]) -> Vec<u8> {
        frame.header_mut().mask = Some(mask);
        let mut out = Vec::new();
        frame.format(&mut out).unwrap();
        out
    }

    #[test]
    fn decodes_tungstenite_client_frames() {
        let m = [0xA1, 0x02, 0xF3, 0x44];
        let long = "ü".repeat(40_000); // 80,000 bytes: 64-bit length
        let mut bytes = tung_bytes(
            tung::Frame::message(
                b"hello".to_vec(),
                tung::OpCode::Data(tung::Data::Text),
                true,
            ),
            m,
        );
        bytes.extend(tung_bytes(
            tung::Frame::message(
                long.as_bytes()[..1001].to_vec(),
                tung::OpCode::Data(tung::Data::Text),
                false,
            ),
            m,
        ));
        bytes.extend(tung_bytes(tung::Frame::ping(b"tick".to_vec()), m));
        bytes.extend(tung_bytes(
            tung::Frame::message(
                long.as_bytes()[1001..].to_vec(),
                tung::OpCode::Data(tung::Data::Continue),
                true,
            ),
            m,
        ));
        bytes.extend(tung_bytes(
            tung::Frame::message(vec![0; 200], tung::OpCode::Data(tung::Data::Binary), true),
            m,
        ));
        bytes.extend(tung_bytes(tung::Frame::pong(b"tock".to_vec()), m));
        bytes.extend(tung_bytes(
            tung::Frame::close(Some(tung::CloseFrame {
                code: tung::CloseCode::Away,
                reason: "leaving ✈".into(),
            })),
            m,
        ));
        let want = vec![
            text("hello"),
            Ev::Ping(b"tick".to_vec()),
            Ev::Text(long),
            Ev::Binary(200),
            Ev::Pong,
            Ev::Close(Some(1001), "leaving ✈".into()),
        ];
        assert_eq!(decode(1 << 20, &bytes), Ok(want.clone()));
        let mut dec = Decoder::new(1 << 20);
        assert_eq!(feed_chunks(&mut dec, bytes.chunks(777)), Ok(want));
        assert!(dec.is_idle());
    }

    /// Parses one server frame with tungstenite: (header, payload length, payload).
    fn tung_parse(bytes: &[u8]) -> (tung::FrameHeader, u64, Vec<u8>) {
        let mut cursor = std::io::Cursor::new(bytes);
        let (header, len) = tung::FrameHeader::parse(&mut cursor)
            .expect("tungstenite rejects our frame")
            .expect("tungstenite wants more bytes");
        let start = cursor.position() as usize;
        assert_eq!(start, header_size(len as usize));
        (header, len, bytes[start..].to_vec())
    }

    #[test]
    fn our_frames_parse_with_tungstenite() {
        for len in [0, 1, 125, 126, 0xFFFF, 0x1_0000, 100_000] {
            let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let (h, n, p) = tung_parse(&text_frame(&payload));
            assert!(h.is_final && !h.rsv1 && !h.rsv2 && !h.rsv3);
            assert_eq!(h.opcode, tung::OpCode::Data(tung::Data::Text));
            assert_eq!(h.mask, None);
            assert_eq!(n, len as u64);
            assert_eq!(p, payload);
        }
        for (op, want) in [
            (OpCode::Ping, tung::Control::Ping),
            (OpCode::Pong, tung::Control::Pong),
        ] {
            let (h, n, p) = tung_parse(&control_frame(op, &[5; 300]));
            assert_eq!(h.opcode, tung::OpCode::Control(want));
            assert!(h.is_final && h.mask.is_none());
            assert_eq!((n, p), (125, vec![5; 125]));
        }
        let reason = "ω".repeat(100); // 200 bytes, truncated to 61 chars = 122 bytes
        let (h, n, p) = tung_parse(&close_frame(1008, &reason));
        assert_eq!(h.opcode, tung::OpCode::Control(tung::Control::Close));
        assert!(h.is_final && h.mask.is_none());
        assert_eq!(n, 124);
        assert_eq!(
            tung::CloseCode::from(u16::from_be_bytes([p[0], p[1]])),
            tung::CloseCode::Policy
        );
        assert_eq!(std::str::from_utf8(&p[2..]).unwrap(), "ω".repeat(61));
    }

    // ---- property tests -----------------------------------------------------------------

    /// One client message, and the control frames to put after each of its fragments.
    #[derive(Debug, Clone)]
    enum Item {
        Message {
            binary: bool,
            data: Vec<u8>,
            cuts: Vec<Index>,
            between: Vec<Option<Control>>,
        },
        Control(Control),
    }

    #[derive(Debug, Clone)]
    enum Control {
        Ping(Vec<u8>),
        Pong(Vec<u8>),
    }

    fn arb_control() -> impl Strategy<Value = Control> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..=125).prop_map(Control::Ping),
            prop::collection::vec(any::<u8>(), 0..=125).prop_map(Control::Pong),
        ]
    }

    fn arb_text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "\\PC{0,40}",
            2 => any::<String>(),
            1 => "[a-zé€𝄞]{100,400}",
        ]
    }

    fn arb_item() -> impl Strategy<Value = Item> {
        let message = (
            any::<bool>(),
            arb_text(),
            prop::collection::vec(any::<u8>(), 0..300),
            prop::collection::vec(any::<Index>(), 0..5),
            prop::collection::vec(prop::option::of(arb_control()), 0..5),
        )
            .prop_map(|(binary, text, bytes, cuts, between)| Item::Message {
                binary,
                data: if binary { bytes } else { text.into_bytes() },
                cuts,
                between,
            });
        prop_oneof![4 => message, 1 => arb_control().prop_map(Item::Control)]
    }

    fn control_frame_bytes(c: &Control, mask: [u8; 4]) -> (Vec<u8>, Ev) {
        match c {
            Control::Ping(p) => (
                raw_frame(FIN | PING, p, Some(mask), None),
                Ev::Ping(p.clone()),
            ),
            Control::Pong(p) => (raw_frame(FIN | PONG, p, Some(mask), None), Ev::Pong),
        }
    }

    /// Serializes items as a client would (masked, fragmented as asked); the events a correct
    /// decoder emits.
    fn serialize(
        items: &[Item],
        masks: &[[u8; 4]],
        close: Option<&(u16, String)>,
    ) -> (Vec<u8>, Vec<Ev>) {
        let mut masks = masks.iter().copied().cycle();
        let mut bytes = Vec::new();
        let mut events = Vec::new();
        for item in items {
            match item {
                Item::Control(c) => {
                    let (b, e) = control_frame_bytes(c, masks.next().unwrap());
                    bytes.extend(b);
                    events.push(e);
                }
                Item::Message {
                    binary,
                    data,
                    cuts,
                    between,
                } => {
                    let mut points: Vec<usize> =
                        cuts.iter().map(|i| i.index(data.len() + 1)).collect();
                    points.sort_unstable();
                    points.push(data.len());
                    let mut start = 0;
                    let last = points.len() - 1;
                    for (k, &end) in points.iter().enumerate() {
                        let op = match (k, binary) {
                            (0, false) => TEXT,
                            (0, true) => BINARY,
                            _ => CONT,
                        };
                        let fin = if k == last { FIN } else { 0 };
                        bytes.extend(raw_frame(
                            fin | op,
                            &data[start..end],
                            Some(masks.next().unwrap()),
                            None,
                        ));
                        start = end;
                        if k < last
                            && let Some(Some(c)) = between.get(k)
                        {
                            let (b, e) = control_frame_bytes(c, masks.next().unwrap());
                            bytes.extend(b);
                            events.push(e);
                        }
                    }
                    events.push(if *binary {
                        Ev::Binary(data.len())
                    } else {
                        Ev::Text(String::from_utf8(data.clone()).unwrap())
                    });
                }
            }
        }
        if let Some((code, reason)) = close {
            bytes.extend(raw_frame(
                FIN | CLOSE,
                &close_payload(*code, reason),
                Some(masks.next().unwrap()),
                None,
            ));
            events.push(Ev::Close(Some(*code), reason.clone()));
        }
        (bytes, events)
    }

    fn chunks_at<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        points.push(bytes.len());
        let mut start = 0;
        points
            .into_iter()
            .map(|end| {
                let c = &bytes[start..end];
                start = end;
                c
            })
            .collect()
    }

    fn arb_close() -> impl Strategy<Value = Option<(u16, String)>> {
        prop::option::of((
            prop_oneof![1000..=1003u16, 1007..=1014u16, 3000..=4999u16],
            "\\PC{0,30}",
        ))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prop_valid_stream_in_any_chunks_decodes_exactly(
            items in prop::collection::vec(arb_item(), 0..8),
            masks in prop::collection::vec(any::<[u8; 4]>(), 1..6),
            close in arb_close(),
            cuts in prop::collection::vec(any::<Index>(), 0..20),
        ) {
            let (bytes, want) = serialize(&items, &masks, close.as_ref());
            let mut dec = Decoder::new(1 << 16);
            let got = feed_chunks(&mut dec, chunks_at(&bytes, &cuts));
            prop_assert_eq!(got, Ok(want));
            prop_assert!(dec.is_idle());
            prop_assert_eq!(dec.heap_capacity(), 0);
        }

        #[test]
        fn prop_garbage_never_panics_or_overallocates(
            max in 0usize..400,
            input in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..600),
                // Valid streams with some bytes corrupted get much deeper into the decoder.
                (
                    prop::collection::vec(arb_item(), 1..5),
                    prop::collection::vec(any::<[u8; 4]>(), 1..3),
                    prop::collection::vec((any::<Index>(), any::<u8>()), 0..4),
                ).prop_map(|(items, masks, flips)| {
                    let (mut bytes, _) = serialize(&items, &masks, None);
                    if !bytes.is_empty() {
                        for (i, x) in flips {
                            let i = i.index(bytes.len());
                            bytes[i] ^= x;
                        }
                    }
                    bytes
                }),
            ],
            cuts in prop::collection::vec(any::<Index>(), 0..20),
        ) {
            let mut dec = Decoder::new(max);
            let mut failed = false;
            for chunk in chunks_at(&input, &cuts) {
                let mut chunk = chunk.to_vec();
                let r = dec.feed(&mut chunk, |e| {
                    if let Event::Text(t) = e {
                        assert!(t.len() <= max);
                    }
                    if let Event::Binary(n) = e {
                        assert!(n <= max);
                    }
                    ControlFlow::Continue(())
                });
                prop_assert!(dec.heap_capacity() <= max + MAX_CONTROL_PAYLOAD,
                    "capacity {} with max {}", dec.heap_capacity(), max);
                if failed {
                    prop_assert!(r.is_err());
                }
                if r.is_err() {
                    failed = true;
                    prop_assert_eq!(dec.heap_capacity(), 0);
                }
            }
        }

        #[test]
        fn prop_tungstenite_client_frames_decode(
            text in arb_text(),
            cuts in prop::collection::vec(any::<Index>(), 0..4),
            ping in prop::option::of(prop::collection::vec(any::<u8>(), 0..=125)),
            mask in any::<[u8; 4]>(),
            read_cuts in prop::collection::vec(any::<Index>(), 0..10),
        ) {
            let data = text.as_bytes();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
            points.sort_unstable();
            points.push(data.len());
            let mut bytes = Vec::new();
            let mut want = Vec::new();
            let mut start = 0;
            for (k, &end) in points.iter().enumerate() {
                let op = if k == 0 { tung::Data::Text } else { tung::Data::Continue };
                let fin = k == points.len() - 1;
                bytes.extend(tung_bytes(
                    tung::Frame::message(data[start..end].to_vec(), tung::OpCode::Data(op), fin),
                    mask,
                ));
                start = end;
                if !fin && let Some(p) = &ping {
                    bytes.extend(tung_bytes(tung::Frame::ping(p.clone()), mask));
                    want.push(Ev::Ping(p.clone()));
                }
            }
            want.push(Ev::Text(text.clone()));
            let mut dec = Decoder::new(1 << 16);
            prop_assert_eq!(feed_chunks(&mut dec, chunks_at(&bytes, &read_cuts)), Ok(want));
            prop_assert!(dec.is_idle());
        }
    }
}

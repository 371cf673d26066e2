//! RFC 6455 WebSocket framing without IO, for both ends of a connection: an incremental
//! decoder and frame writers, shared by livepush's server (`livepush-server`,
//! `transport/ws.rs`) and the subscribers of its load generator (`livepush bench`).
//!
//! Two roles, chosen by the decoder's type parameter ([`Server`], the default, or [`Client`]):
//! - the server role decodes client frames, which must be masked, and writes unmasked frames
//!   ([`write_header`], [`text_frame`], [`control_frame`], [`close_frame`]);
//! - the client role ([`ClientDecoder`]) decodes server frames, which must not be masked, and
//!   writes frames masked with a key the caller supplies ([`write_frame`] and [`write_close`]
//!   with `Some(key)`). The crate has no random number generator: RFC 6455 §5.3 wants a fresh,
//!   unpredictable key per frame, which is the caller's RNG's job (the bench uses `rand`).
//!
//! Why this exists: WebSocket libraries keep a read buffer per connection for as long as the
//! connection lives (tungstenite: 128 KiB by default, still 4 KiB when tuned down), and a push
//! gateway's connections are idle nearly all of the time (bench/wslib/README.md measures the
//! per-connection cost). Here the connection reads into a stack buffer when the socket is
//! readable and hands the bytes to [`Decoder::feed`] synchronously. The decoder is a few words
//! inline and holds heap memory only while a frame straddles two reads or a kept message is
//! fragmented; it frees that memory (not just clears it) as soon as a read leaves nothing
//! buffered, so an idle connection holds zero buffered bytes. The bench's
//! subscribers use the client role for the same properties: the bench must cost far less per
//! delivery than the servers it measures, so a read lands in one buffer per thread, every
//! complete frame in it is decoded in place (no copy; one UTF-8 check per text message) and a
//! connection keeps nothing while idle.
//!
//! Invariants the server relies on:
//! - the role is a zero-sized type and everything that depends on it is a `const` of
//!   [`Role`], so the server's decoder is exactly as large as before the crate had two roles
//!   (56 bytes on 64-bit targets: an idle connection keeps one; checked here and by the
//!   server's `idle_state_is_small`) and its monomorphised code has no role test at run time;
//! - the decoder's methods are generic (over the role and the event callback) and the small
//!   writers are `#[inline]`, so the server's hot paths still inline across the crate
//!   boundary as they did when this was a module of the server.
//!
//! What it does not do:
//! - extensions are never negotiated (no permessage-deflate), so any RSV bit is an error;
//! - the server role keeps no binary bytes: the protocol is text-only, so [`Event::Binary`]
//!   carries only the length (the size limit still applies); the client role hands the bytes
//!   over, since a server under test may send binary messages;
//! - non-minimal length encodings (e.g. a 16-bit length for 5 bytes) are accepted, as most
//!   implementations do; the RFC's "minimal encoding" rule binds the sender (the writers here
//!   always use the minimal one).

#![forbid(unsafe_code)]

use std::fmt;
use std::marker::PhantomData;
use std::ops::ControlFlow;

/// Largest header of a server frame (no mask): 2 bytes + 64-bit length.
pub const MAX_HEADER: usize = 10;
/// Largest header of a client frame: 2 bytes + 64-bit length + 4-byte mask key.
pub const MAX_CLIENT_HEADER: usize = 14;
/// Largest payload of a control frame (close, ping, pong).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Largest close reason: the control payload minus the 2-byte code.
const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// Frame opcodes (RFC 6455 §5.2), both decoded and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// A later fragment of a text or binary message.
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    const fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
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

/// Which end of the connection the codec serves: whether the frames it receives are masked,
/// and what a binary message yields. Sealed: [`Server`] and [`Client`] are the only roles.
pub trait Role: sealed::Sealed + Copy + fmt::Debug + 'static {
    /// Whether received frames must be masked: client frames always are, server frames never.
    const RECEIVES_MASKED: bool;
    /// Whether a binary message's bytes are kept (and handed over) or only counted.
    const KEEPS_BINARY: bool;
    /// What [`Event::Binary`] carries: the length (server role) or the bytes (client role).
    type Binary<'a>: Copy + fmt::Debug + Eq;

    /// The [`Event::Binary`] payload of a complete binary message of `len` bytes, which are
    /// `bytes` when [`Role::KEEPS_BINARY`] (else `bytes` is empty).
    fn binary(len: usize, bytes: &[u8]) -> Self::Binary<'_>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Server {}
    impl Sealed for super::Client {}
}

/// The server's end: decodes client frames (masked), keeps no binary bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Server;

impl Role for Server {
    const RECEIVES_MASKED: bool = true;
    const KEEPS_BINARY: bool = false;
    type Binary<'a> = usize;

    #[inline]
    fn binary(len: usize, _: &[u8]) -> usize {
        len
    }
}

/// The client's end: decodes server frames (unmasked), hands binary messages over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Client;

impl Role for Client {
    const RECEIVES_MASKED: bool = false;
    const KEEPS_BINARY: bool = true;
    type Binary<'a> = &'a [u8];

    #[inline]
    fn binary(_: usize, bytes: &[u8]) -> &[u8] {
        bytes
    }
}

/// One decoded event, borrowed from the input or the decoder's assembly buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a, R: Role = Server> {
    /// A complete text message: unmasked, fragments joined, UTF-8 checked.
    Text(&'a str),
    /// A complete binary message: its length in the server role (the protocol is text-only),
    /// its bytes in the client role.
    Binary(R::Binary<'a>),
    /// The caller answers with a pong carrying the same payload.
    Ping(&'a [u8]),
    Pong,
    /// `code` is `None` for an empty close payload (then `reason` is empty).
    Close {
        code: Option<u16>,
        reason: &'a str,
    },
}

/// Why the peer's bytes were rejected; the connection is then closed with
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
    op: OpCode,
    fin: bool,
    /// The key to unmask with (zero in the client role: server frames are not masked).
    mask: [u8; 4],
    /// Declared payload length (≤ max_message for data, ≤ 125 for control frames).
    len: u32,
    /// Payload bytes not yet seen.
    remaining: u32,
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Between frames or inside a header: the first `got` header bytes are in `head` (sized
    /// for the longest header, a masked frame's; one array for both roles keeps the role a
    /// zero-sized type).
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

/// Incremental decoder of the frames one end receives: client frames in the server role (the
/// default), server frames in the client role ([`ClientDecoder`]); see the crate docs.
///
/// Heap use: `buf` holds the unmasked bytes of the open message if it is kept (text in both
/// roles, binary in the client role; only when it is fragmented or its frame straddles
/// reads), followed by the bytes of a control frame that straddles reads. Its capacity never
/// exceeds `max_message + 125`. It is freed when a feed ends with nothing buffered, so an
/// idle decoder holds no heap memory; while reads keep ending inside frames, it is reused
/// from one straddling frame to the next instead of allocated and freed for each (measured
/// with 155-byte text frames read 200 bytes at a time, so that nearly every frame
/// straddles: the allocation was a sixth of the client role's cost per frame).
///
/// Every server connection keeps one, so lengths are `u32` (messages are capped far below
/// 4 GiB): 56 bytes instead of 72. The role costs no space.
#[derive(Debug)]
pub struct Decoder<R: Role = Server> {
    max_message: u32,
    /// Declared bytes of the open data message so far (including the frame in progress).
    msg_len: u32,
    buf: Vec<u8>,
    open: Open,
    stage: Stage,
    role: PhantomData<R>,
}

/// The client role's decoder: server frames in, which must not be masked.
pub type ClientDecoder = Decoder<Client>;

impl Decoder<Server> {
    /// A server's decoder of client frames. `max_message`: the largest frame payload and the
    /// largest assembled message accepted. Limits above `u32::MAX` are taken as `u32::MAX`.
    #[inline]
    pub fn new(max_message: usize) -> Decoder {
        Decoder::with_limit(max_message)
    }
}

impl Decoder<Client> {
    /// A client's decoder of server frames; `max_message` as for [`Decoder::new`].
    #[inline]
    pub fn new_client(max_message: usize) -> ClientDecoder {
        Decoder::with_limit(max_message)
    }
}

impl<R: Role> Decoder<R> {
    fn with_limit(max_message: usize) -> Decoder<R> {
        Decoder {
            max_message: u32::try_from(max_message).unwrap_or(u32::MAX),
            buf: Vec::new(),
            open: Open::None,
            msg_len: 0,
            stage: NEXT_FRAME,
            role: PhantomData,
        }
    }

    /// Feed bytes just read from the socket (mutable so masked payloads can be unmasked in
    /// place without copying; the client role leaves them as they are). Calls `on_event` for every complete message / control frame in
    /// order. Stops early (returning Ok) if `on_event` returns `ControlFlow::Break(())`, e.g.
    /// after a Close; bytes after that point are ignored (the decoder stays consistent and
    /// would continue at the next frame). Returns Err on a protocol violation; the decoder is
    /// then unusable (every later call fails) and has freed its buffer.
    pub fn feed(
        &mut self,
        input: &mut [u8],
        mut on_event: impl FnMut(Event<'_, R>) -> ControlFlow<()>,
    ) -> Result<(), DecodeError> {
        let result = self.run(input, &mut on_event);
        if result.is_err() {
            self.stage = Stage::Failed;
            self.open = Open::None;
            self.msg_len = 0;
            self.buf = Vec::new();
        } else if self.buf.is_empty() && self.buf.capacity() > 0 {
            // Nothing is buffered: hold no memory until a frame straddles reads again.
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
        F: FnMut(Event<'_, R>) -> ControlFlow<()>,
    {
        let mut pos = 0;
        loop {
            let frame = match self.stage {
                Stage::Failed => return Err(DecodeError::Protocol("decoder used after an error")),
                Stage::Payload(frame) => {
                    self.stage = NEXT_FRAME;
                    frame
                }
                Stage::Header { got: 0, .. } if whole_header_at(input, pos) => {
                    // The usual case: the whole header is in this read. It is parsed where it
                    // is, not copied into `head` first, and `stage` stays as it is.
                    let end = pos + header_len(input[pos + 1]);
                    let frame = self.start_frame(&input[pos..end])?;
                    pos = end;
                    frame
                }
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
                    self.stage = NEXT_FRAME;
                    self.start_frame(&head[..got])?
                }
            };
            // `stage` is between frames now: set again if the frame straddles this read.

            let remaining = frame.remaining as usize;
            let n = remaining.min(input.len() - pos);
            let chunk = &mut input[pos..pos + n];
            pos += n;
            if R::RECEIVES_MASKED {
                apply_mask(chunk, frame.mask, (frame.len - frame.remaining) as usize);
            }
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
            let whole = n == frame.len as usize;
            if self.complete(frame, chunk, whole, on_event)?.is_break() {
                return Ok(());
            }
        }
    }

    /// Checks what the first two header bytes alone decide.
    fn check_start(&self, b0: u8, b1: u8) -> Result<OpCode, DecodeError> {
        if b0 & 0x70 != 0 {
            return Err(DecodeError::Protocol(
                "reserved bits set (no extension negotiated)",
            ));
        }
        let op = match b0 & 0x0F {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return Err(DecodeError::Protocol("reserved opcode")),
        };
        if (b1 & 0x80 != 0) != R::RECEIVES_MASKED {
            return Err(DecodeError::Protocol(if R::RECEIVES_MASKED {
                "client frame not masked"
            } else {
                "server frame masked"
            }));
        }
        match op {
            OpCode::Close | OpCode::Ping | OpCode::Pong => {
                if b0 & 0x80 == 0 {
                    return Err(DecodeError::Protocol("fragmented control frame"));
                }
                if usize::from(b1 & 0x7F) > MAX_CONTROL_PAYLOAD {
                    return Err(DecodeError::Protocol(
                        "control frame payload longer than 125 bytes",
                    ));
                }
            }
            OpCode::Continuation if self.open == Open::None => {
                return Err(DecodeError::Protocol(
                    "continuation frame without a message to continue",
                ));
            }
            OpCode::Text | OpCode::Binary if self.open != Open::None => {
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
        if R::RECEIVES_MASKED {
            // check_start saw the mask bit, so header_len counted the key.
            mask.copy_from_slice(mask_bytes);
        }
        let len = match op {
            // check_start bounded these to 125.
            OpCode::Close | OpCode::Ping | OpCode::Pong => u32::from(head[1] & 0x7F),
            OpCode::Continuation | OpCode::Text | OpCode::Binary => {
                let room = self.max_message - self.msg_len;
                let len = u32::try_from(len).ok().filter(|&len| len <= room).ok_or(
                    DecodeError::TooBig {
                        limit: self.max_message as usize,
                    },
                )?;
                match op {
                    OpCode::Text => self.open = Open::Text,
                    OpCode::Binary => self.open = Open::Binary,
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
    fn keeps_payload(&self, op: OpCode) -> bool {
        match op {
            OpCode::Close | OpCode::Ping | OpCode::Pong => true,
            OpCode::Continuation | OpCode::Text | OpCode::Binary => self.keeps_message(),
        }
    }

    /// Whether the open data message's bytes are kept (in `buf` when not decoded in place).
    fn keeps_message(&self) -> bool {
        match self.open {
            Open::Text => true,
            Open::Binary => R::KEEPS_BINARY,
            Open::None => false,
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

    /// Ends the open data message and empties its buffer (freed when the feed ends, unless a
    /// frame straddles into the next read: see [`Decoder`]).
    fn end_message(&mut self) {
        self.open = Open::None;
        self.msg_len = 0;
        self.buf.clear();
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
        F: FnMut(Event<'_, R>) -> ControlFlow<()>,
    {
        match frame.op {
            OpCode::Close | OpCode::Ping | OpCode::Pong => {
                if whole {
                    return Ok(on_event(control_event(frame.op, chunk)?));
                }
                // The open kept message's bytes come first in `buf`, then this frame's.
                let start = if self.keeps_message() {
                    self.msg_len as usize
                } else {
                    0
                };
                self.append(chunk, chunk.len());
                let flow = on_event(control_event(frame.op, &self.buf[start..])?);
                self.buf.truncate(start);
                Ok(flow)
            }
            OpCode::Continuation | OpCode::Text | OpCode::Binary => match self.open {
                Open::Binary if !R::KEEPS_BINARY => {
                    if !frame.fin {
                        return Ok(ControlFlow::Continue(()));
                    }
                    let len = self.msg_len as usize;
                    self.end_message();
                    Ok(on_event(Event::Binary(R::binary(len, &[]))))
                }
                Open::Text => self.complete_message(frame, chunk, whole, on_event, text_event),
                Open::Binary => self.complete_message(frame, chunk, whole, on_event, binary_event),
                Open::None => Err(DecodeError::Protocol("data frame without a message")),
            },
        }
    }

    /// A data frame of a kept message is complete: `chunk` as in [`Decoder::complete`].
    /// Emits `event` of the whole message if this was its last frame.
    fn complete_message<F>(
        &mut self,
        frame: Frame,
        chunk: &[u8],
        whole: bool,
        on_event: &mut F,
        event: impl for<'b> Fn(&'b [u8]) -> Result<Event<'b, R>, DecodeError>,
    ) -> Result<ControlFlow<()>, DecodeError>
    where
        F: FnMut(Event<'_, R>) -> ControlFlow<()>,
    {
        if whole && frame.fin && frame.op != OpCode::Continuation {
            // One frame, one read: straight from the input, no copy.
            self.end_message();
            return Ok(on_event(event(chunk)?));
        }
        self.append(chunk, chunk.len());
        if !frame.fin {
            return Ok(ControlFlow::Continue(()));
        }
        let flow = on_event(event(&self.buf)?);
        self.end_message();
        Ok(flow)
    }
}

/// The event of a complete text message.
fn text_event<R: Role>(bytes: &[u8]) -> Result<Event<'_, R>, DecodeError> {
    std::str::from_utf8(bytes)
        .map(Event::Text)
        .map_err(|_| DecodeError::BadUtf8)
}

/// The event of a complete binary message that was kept.
fn binary_event<R: Role>(bytes: &[u8]) -> Result<Event<'_, R>, DecodeError> {
    Ok(Event::Binary(R::binary(bytes.len(), bytes)))
}

/// Whether `input` holds a frame's whole header from `pos` on.
#[inline]
fn whole_header_at(input: &[u8], pos: usize) -> bool {
    input
        .get(pos + 1)
        .is_some_and(|&b1| input.len() - pos >= header_len(b1))
}

/// Total header length of a frame, from its second byte (whether or not it is masked).
#[inline]
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// XORs `buf` with `mask`, where `buf` starts at payload offset `offset`: masks a client
/// frame's payload, and unmasks it (the same operation).
#[inline]
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
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

fn control_event<R: Role>(op: OpCode, payload: &[u8]) -> Result<Event<'_, R>, DecodeError> {
    Ok(match op {
        OpCode::Ping => Event::Ping(payload),
        OpCode::Pong => Event::Pong,
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

// ---- writers ----------------------------------------------------------------------------
//
// One header writer and one frame writer serve both roles: `mask` is `Some(key)` for a client
// frame and `None` for a server frame. The server's shorthands below pass constants, and all
// of them are `#[inline]`, so the server's per-batch `write_header` compiles to the same
// pushes as before.

/// Header length of a server frame with this payload length (2, 4 or 10); a client frame's
/// is 4 more (the mask key).
#[inline]
pub const fn header_size(payload_len: usize) -> usize {
    if payload_len < 126 {
        2
    } else if payload_len <= 0xFFFF {
        4
    } else {
        MAX_HEADER
    }
}

/// Appends a frame header: FIN bit, opcode, the payload length in its minimal encoding, and
/// the mask key if `mask` is `Some` (a client frame; a server frame is never masked). The
/// payload that follows must be masked with the same key ([`apply_mask`]); [`write_frame`]
/// does both. The caller keeps the rules this cannot see: a control frame is FIN and carries
/// at most 125 bytes.
#[inline]
pub fn write_frame_header(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: OpCode,
    payload_len: usize,
    mask: Option<[u8; 4]>,
) {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    out.push(if fin { 0x80 } else { 0 } | opcode.bits());
    match payload_len {
        0..=125 => out.push(mask_bit | payload_len as u8),
        126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(payload_len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(payload_len as u64).to_be_bytes());
        }
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
}

/// Server-to-client frame header (never masked, FIN set). Appends to `out`.
#[inline]
pub fn write_header(out: &mut Vec<u8>, opcode: OpCode, payload_len: usize) {
    write_frame_header(out, true, opcode, payload_len, None);
}

/// Appends one frame: its header, then `payload`, masked with `mask`'s key if it is `Some`
/// (every frame a client sends must be, each with a fresh key), as it is if `None` (a server
/// frame). `fin: false` and [`OpCode::Continuation`] write the fragments of a message. A
/// control frame cannot be fragmented or longer than 125 bytes (RFC 6455 §5.5): for one, FIN
/// is always set and the payload is truncated to 125 bytes, as [`control_frame`] does.
#[inline]
pub fn write_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    let (fin, payload) = if opcode.is_control() {
        (true, &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)])
    } else {
        (fin, payload)
    };
    let key_len = if mask.is_some() { 4 } else { 0 };
    out.reserve(header_size(payload.len()) + key_len + payload.len());
    write_frame_header(out, fin, opcode, payload.len(), mask);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
}

/// Appends a close frame with `code` and `reason`, masked as [`write_frame`] does; the reason
/// is truncated to 123 bytes on a char boundary.
pub fn write_close(out: &mut Vec<u8>, code: u16, reason: &str, mask: Option<[u8; 4]>) {
    let reason = close_reason(reason).as_bytes();
    let mut payload = [0; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + reason.len()].copy_from_slice(reason);
    write_frame(out, true, OpCode::Close, &payload[..2 + reason.len()], mask);
}

/// The longest start of `reason` that fits a close frame and ends on a char boundary.
fn close_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A server frame alone in an exactly sized Vec.
fn server_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header_size(payload.len()) + payload.len());
    write_frame(&mut out, true, opcode, payload, None);
    out
}

/// A text frame: header + payload in one Vec.
#[inline]
pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    server_frame(OpCode::Text, payload)
}

/// A ping or pong frame; the payload is truncated to 125 bytes.
#[inline]
pub fn control_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    debug_assert!(opcode.is_control(), "control_frame({opcode:?})");
    server_frame(opcode, payload)
}

/// A close frame; the reason is truncated to 123 bytes on a char boundary.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + 2 + close_reason(reason).len());
    write_close(&mut out, code, reason, None);
    out
}

#[cfg(test)]
mod tests;

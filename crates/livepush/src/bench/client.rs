//! Light subscribers: one tokio task per connection, a TCP socket bound to one of several
//! loopback source addresses (so that more connections than one address has ephemeral ports
//! can be opened), a minimal client-side WebSocket (RFC 6455) over it, and a [`Proto`] that
//! speaks the target's protocol.
//!
//! The WebSocket is not a library's because the bench must cost far less per delivery than
//! the servers it measures: a read lands in one buffer per thread that is never zero-filled
//! again, every complete frame of a read is handled at once, and a connection keeps only the
//! bytes of a frame cut short by a read (nothing while idle). Its framing is the client role
//! of `livepush-wsframe`, the codec the server uses for the other end, which decodes a
//! complete frame in place in that buffer (one UTF-8 check per message, the one the
//! protocol's parser needs anyway) and holds only the payload of a frame that straddles
//! reads. Server frames are unmasked; the frames the bench sends are masked, each with a
//! fresh key from `rand`. Here: the upgrade handshake, the reads and the writes.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::ControlFlow;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use livepush_wsframe::{ClientDecoder, Event as WsEvent, OpCode, write_frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use super::targets::{Delivery, Event, Proto, Since, Target};

/// Where subscribers connect, and from which source addresses.
#[derive(Debug, Clone)]
pub struct Dialer {
    pub target: Target,
    /// The server's `HOST:PORT` as written in URLs.
    pub host: String,
    /// The server's address.
    pub addr: SocketAddr,
    /// How many loopback source addresses to spread over (0: let the kernel choose).
    pub source_ips: u32,
    /// Index of the first source address (so that shards use different ones).
    pub source_offset: u32,
}

/// The `n`-th source address: 127.0.0.2, 127.0.0.3, … (carrying into the higher octets).
pub fn source_ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + (n % 0x00ff_fff0))
}

impl Dialer {
    /// The source address connection `i` binds to, if any.
    pub fn source_for(&self, i: u64) -> Option<Ipv4Addr> {
        let loopback_v4 = matches!(self.addr.ip(), IpAddr::V4(ip) if ip.is_loopback());
        if self.source_ips == 0 || !loopback_v4 {
            return None;
        }
        Some(source_ip(
            self.source_offset + (i % self.source_ips as u64) as u32,
        ))
    }

    /// Open connection number `i`: TCP from its source address, then the WebSocket handshake
    /// to the target's URL for `room`.
    pub async fn open(&self, i: u64, room: &str) -> anyhow::Result<Ws> {
        let tcp = self.connect(i).await?;
        let url = self.target.ws_url(&self.host, room);
        Ws::handshake(tcp, &url)
            .await
            .with_context(|| format!("WebSocket handshake with {url}"))
    }

    /// Open TCP connection number `i` from its source address (no delay).
    pub async fn connect(&self, i: u64) -> anyhow::Result<TcpStream> {
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .context("socket")?;
        if let Some(ip) = self.source_for(i) {
            socket
                .bind(SocketAddr::new(IpAddr::V4(ip), 0))
                .with_context(|| format!("bind to {ip}"))?;
        }
        let tcp = socket
            .connect(self.addr)
            .await
            .with_context(|| format!("connect to {}", self.addr))?;
        tcp.set_nodelay(true).ok();
        Ok(tcp)
    }
}

/// The largest frame, and the largest reassembled message, a subscriber accepts.
const MAX_MESSAGE: usize = 16 << 20;
/// The largest HTTP answer to the upgrade request.
const MAX_HEADER: usize = 16 << 10;
/// Bytes asked of one read (into the buffer all connections of a thread share).
const READ_CHUNK: usize = 64 << 10;

thread_local! {
    /// Where every connection of this thread reads into: zero-filled once, then reused (a
    /// read only overwrites what it returns).
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

/// A client WebSocket over TCP.
#[derive(Debug)]
pub struct Ws {
    tcp: TcpStream,
    /// What came right after the handshake answer, decoded by the first read (the codec
    /// keeps what is cut short by a read).
    early: Vec<u8>,
    codec: Codec,
    /// How much of `codec.out` is sent.
    sent: usize,
}

impl Ws {
    /// The opening handshake over `tcp` for `url` (`ws://HOST[:PORT]/PATH`).
    pub async fn handshake(mut tcp: TcpStream, url: &str) -> anyhow::Result<Ws> {
        let (host, path) = split_url(url)?;
        let key = base64(&rand::random::<[u8; 16]>());
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        tcp.write_all(request.as_bytes())
            .await
            .context("send the upgrade request")?;
        let mut buf = Vec::with_capacity(1024);
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if buf.len() > MAX_HEADER {
                bail!("the answer to the upgrade request is too long");
            }
            buf.reserve(1024);
            if tcp.read_buf(&mut buf).await? == 0 {
                bail!("closed before answering the upgrade request");
            }
        };
        check_upgrade(&buf[..end])?;
        // What follows the header is the start of the frame stream (a server may send its
        // first frames in the same segment).
        buf.drain(..end);
        if buf.is_empty() {
            buf = Vec::new();
        } else {
            buf.shrink_to_fit();
        }
        Ok(Ws {
            tcp,
            early: buf,
            codec: Codec::new(),
            sent: 0,
        })
    }

    /// Queue a text frame.
    pub fn queue_text(&mut self, text: &str) {
        queue(&mut self.codec.out, OpCode::Text, text.as_bytes());
    }

    /// Send what is queued. Cancel-safe: what was sent is remembered.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        while self.sent < self.codec.out.len() {
            let n = self.tcp.write(&self.codec.out[self.sent..]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.sent += n;
        }
        if self.sent > 0 {
            // Frames to send are rare (handshakes, pongs, pulls): keep no buffer for them.
            self.codec.out = Vec::new();
            self.sent = 0;
        }
        Ok(())
    }

    /// Whether the server closed.
    pub fn closed(&self) -> bool {
        self.codec.closed
    }

    /// Read what has arrived and decode every complete frame in it: each data message goes
    /// to `on_msg`, pings are answered with pongs and a close with a close (queued, see
    /// [`Ws::flush`]); returns how many messages there were (0: only control frames or part
    /// of a frame; see [`Ws::closed`] for the end). Pending until something was read. Once
    /// ready, nothing else is awaited, so dropping this between polls loses nothing.
    fn poll_frames(
        &mut self,
        cx: &mut Context<'_>,
        on_msg: &mut dyn FnMut(&str),
    ) -> Poll<anyhow::Result<usize>> {
        if self.codec.closed {
            return Poll::Ready(Ok(0));
        }
        if !self.early.is_empty() {
            let n = self
                .codec
                .decode(&mut std::mem::take(&mut self.early), on_msg)?;
            if n > 0 || self.codec.closed {
                return Poll::Ready(Ok(n));
            }
        }
        READ_BUF.with_borrow_mut(|chunk| {
            let mut rb = ReadBuf::new(chunk);
            ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                self.codec.closed = true;
                return Poll::Ready(Ok(0));
            }
            Poll::Ready(self.codec.decode(rb.filled_mut(), on_msg))
        })
    }
}

/// The frame layer without IO: server frames in (through the codec's client role), masked
/// frames out.
#[derive(Debug)]
struct Codec {
    /// Holds bytes only while a frame straddles reads.
    decoder: ClientDecoder,
    /// Encoded frames to send.
    out: Vec<u8>,
    /// A close frame came (or the stream ended).
    closed: bool,
}

impl Codec {
    fn new() -> Codec {
        Codec {
            decoder: ClientDecoder::new_client(MAX_MESSAGE),
            out: Vec::new(),
            closed: false,
        }
    }

    /// Decode what was just read: every data message goes to `on_msg` (a binary one read
    /// lossily), a ping is answered with a pong and a close with a close (queued). Returns
    /// how many messages there were; stops at a close frame.
    fn decode(&mut self, input: &mut [u8], on_msg: &mut dyn FnMut(&str)) -> anyhow::Result<usize> {
        let Codec {
            decoder,
            out,
            closed,
        } = self;
        let mut messages = 0;
        decoder.feed(input, |event| {
            match event {
                WsEvent::Text(text) => on_msg(text),
                WsEvent::Binary(bytes) => on_msg(&String::from_utf8_lossy(bytes)),
                WsEvent::Ping(payload) => {
                    queue(out, OpCode::Pong, payload);
                    return ControlFlow::Continue(());
                }
                WsEvent::Pong => return ControlFlow::Continue(()),
                WsEvent::Close { code, .. } => {
                    // Answer with the same status code (RFC 6455 §5.5.1).
                    let code = code.map(u16::to_be_bytes);
                    let payload = code.as_ref().map_or(&[][..], |c| &c[..]);
                    queue(out, OpCode::Close, payload);
                    *closed = true;
                    return ControlFlow::Break(());
                }
            }
            messages += 1;
            ControlFlow::Continue(())
        })?;
        Ok(messages)
    }
}

/// Queue a masked frame (with a fresh mask key) in `out`.
fn queue(out: &mut Vec<u8>, op: OpCode, payload: &[u8]) {
    write_frame(out, true, op, payload, Some(rand::random()));
}

/// `ws://HOST[:PORT]/PATH` as the `Host` header and the request target.
fn split_url(url: &str) -> anyhow::Result<(&str, &str)> {
    let Some(rest) = url.strip_prefix("ws://") else {
        bail!("not a ws:// URL: {url}");
    };
    Ok(match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    })
}

/// The answer to the upgrade request must be `101 Switching Protocols` to a WebSocket.
fn check_upgrade(header: &[u8]) -> anyhow::Result<()> {
    let text = String::from_utf8_lossy(header);
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let mut parts = status.split(' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next());
    if !version.starts_with("HTTP/1.") || code != Some("101") {
        bail!("HTTP answer {status:?} to the upgrade request");
    }
    let upgrade = lines.filter_map(|l| l.split_once(':')).any(|(k, v)| {
        k.trim().eq_ignore_ascii_case("upgrade") && v.trim().eq_ignore_ascii_case("websocket")
    });
    if !upgrade {
        bail!("the 101 answer does not upgrade to websocket");
    }
    Ok(())
}

/// Standard base64 with padding (for `Sec-WebSocket-Key`).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let byte = |i: usize| u32::from(c.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for k in 0..4 {
            if k <= c.len() {
                s.push(char::from(ABC[(n >> (18 - 6 * k)) as usize & 63]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// One subscriber connection and its protocol state.
#[derive(Debug)]
pub struct Session {
    ws: Ws,
    proto: Proto,
    events: Vec<Event>,
    replies: Vec<String>,
    /// `events` were handed out (by the last step, or by `open`): the next step clears them.
    handed_out: bool,
    /// Messages were read and fed (their events are in `events`) by a step that was dropped
    /// before it returned (while sending replies): the next step returns them.
    gathered: bool,
}

/// What `joined` said (or what a target without rooms implies).
#[derive(Debug, Clone, Default)]
pub struct Joined {
    pub epoch: Option<String>,
    pub seq: u64,
    pub recovered: bool,
}

impl Session {
    /// Open the connection and send the protocol's first frames.
    pub async fn open(
        dialer: &Dialer,
        i: u64,
        room: &str,
        token: Option<String>,
        since: Option<Since>,
    ) -> anyhow::Result<Session> {
        let ws = dialer.open(i, room).await?;
        let mut proto = Proto::new(dialer.target, room, token, since);
        let mut events = Vec::new();
        let opening = proto.opening(&mut events);
        let mut s = Session {
            ws,
            proto,
            events,
            replies: opening,
            handed_out: true,
            gathered: false,
        };
        s.queue_replies();
        s.ws.flush().await?;
        Ok(s)
    }

    fn queue_replies(&mut self) {
        for r in self.replies.drain(..) {
            self.ws.queue_text(&r);
        }
    }

    /// Wait for WebSocket messages, feed every one that has arrived to the protocol and
    /// answer what it asks. Returns `false` when the connection has ended. Events are in
    /// [`Session::events`]. Cancel-safe: messages read by a step that is dropped are the
    /// next step's.
    pub async fn step(&mut self) -> anyhow::Result<bool> {
        if std::mem::take(&mut self.handed_out) {
            self.events.clear();
        }
        loop {
            // Replies first (also those of a step that was dropped while sending them).
            let flushed = self.ws.flush().await;
            if std::mem::take(&mut self.gathered) {
                self.handed_out = true;
                return Ok(true);
            }
            if self.ws.closed() {
                return Ok(false);
            }
            flushed?;
            let Session {
                ws,
                proto,
                events,
                replies,
                ..
            } = self;
            let mut feed = |text: &str| proto.feed(text, events, replies);
            let n = std::future::poll_fn(|cx| ws.poll_frames(cx, &mut feed)).await?;
            self.queue_replies();
            if n > 0 {
                self.gathered = true;
            }
        }
    }

    /// Events of the last [`Session::step`] (and those of [`Session::open`] until the first).
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Read until the protocol is ready (joined); deliveries that came in the same messages
    /// (a replay) are returned with it.
    pub async fn until_ready(
        &mut self,
        limit: Duration,
    ) -> anyhow::Result<(Joined, Vec<Delivery>)> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut joined = None;
        let mut early = Vec::new();
        let mut first = true;
        loop {
            if !first || self.events.is_empty() {
                let more = tokio::time::timeout_at(deadline, self.step())
                    .await
                    .context("no answer to the handshake in time")??;
                if !more {
                    bail!("closed during the handshake");
                }
            }
            first = false;
            scan_ready(&self.events, &mut joined, &mut early)?;
            if let Some(j) = joined {
                return Ok((j, early));
            }
        }
    }

    /// End with a close frame (a clean end, not an interruption).
    pub async fn close(mut self) {
        if !self.ws.closed() {
            queue(
                &mut self.ws.codec.out,
                OpCode::Close,
                &1000u16.to_be_bytes(),
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.flush()).await;
    }

    /// End abruptly: a TCP reset, no close frame.
    pub fn abort(self) {
        let _ = self.ws.tcp.set_zero_linger();
        drop(self);
    }
}

/// Read the events of a subscriber that is not ready yet: the `Ready` to `joined`,
/// deliveries (a replay that came with it) to `early`; an error ends the handshake.
pub fn scan_ready(
    events: &[Event],
    joined: &mut Option<Joined>,
    early: &mut Vec<Delivery>,
) -> anyhow::Result<()> {
    for e in events {
        match e {
            Event::Ready {
                epoch,
                seq,
                recovered,
            } => {
                *joined = Some(Joined {
                    epoch: epoch.clone(),
                    seq: *seq,
                    recovered: *recovered,
                })
            }
            Event::Msg(d) => early.push(*d),
            Event::Error(e) => bail!("{e}"),
        }
    }
    Ok(())
}

/// What one subscriber received of the `expected` messages, keyed by index 0..expected
/// (a seq minus the position it joined at, or the payload's `n`).
#[derive(Debug, Clone)]
pub struct Tracker {
    seen: Vec<u64>,
    expected: u64,
    pub distinct: u64,
    pub duplicates: u64,
    /// Deliveries whose key lies outside 0..expected.
    pub stray: u64,
}

impl Tracker {
    pub fn new(expected: u64) -> Tracker {
        Tracker {
            seen: vec![0; expected.div_ceil(64) as usize],
            expected,
            distinct: 0,
            duplicates: 0,
            stray: 0,
        }
    }

    /// Record a delivery by key; true if it is new.
    pub fn record(&mut self, key: Option<u64>) -> bool {
        let Some(k) = key.filter(|&k| k < self.expected) else {
            self.stray += 1;
            return false;
        };
        let (w, b) = ((k / 64) as usize, 1u64 << (k % 64));
        if self.seen[w] & b != 0 {
            self.duplicates += 1;
            return false;
        }
        self.seen[w] |= b;
        self.distinct += 1;
        true
    }

    pub fn complete(&self) -> bool {
        self.distinct == self.expected
    }

    pub fn missing(&self) -> u64 {
        self.expected - self.distinct
    }
}

/// The key of a delivery: for livepush reliable messages the seq after `base` (seqs must be
/// `base+1..=base+M`), else the payload's index.
pub fn key_of(d: &Delivery, by_seq: bool, base: u64) -> Option<u64> {
    if by_seq {
        d.seq.and_then(|s| s.checked_sub(base + 1))
    } else {
        Some(d.stamp.n)
    }
}

/// Open `total` connections with at most `concurrency` handshakes in flight, calling `each`
/// for every connection index; used by every phase that connects many subscribers.
/// The tasks are returned in index order.
pub async fn staggered<F, Fut, T>(total: u64, concurrency: usize, each: F) -> Vec<JoinHandle<T>>
where
    F: Fn(u64, tokio::sync::OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut handles = Vec::with_capacity(total as usize);
    for i in 0..total {
        let Ok(permit) = gate.clone().acquire_owned().await else {
            break;
        };
        handles.push(tokio::spawn(each(i, permit)));
    }
    handles
}

/// The first of many failures, kept for the report (with the count kept elsewhere).
#[derive(Debug, Default)]
pub struct FirstError(std::sync::Mutex<Option<String>>);

impl FirstError {
    pub fn set(&self, e: &anyhow::Error) {
        if let Ok(mut g) = self.0.lock()
            && g.is_none()
        {
            *g = Some(format!("{e:#}"));
        }
    }

    pub fn take(&self) -> Option<String> {
        self.0.lock().ok().and_then(|mut g| g.take())
    }
}

/// Seconds since `start`, for rates.
pub fn secs_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::targets::Stamp;

    #[test]
    fn tracker_counts_loss_duplicates_and_strays() {
        let mut t = Tracker::new(130);
        assert!(t.record(Some(0)));
        assert!(t.record(Some(129)));
        assert!(!t.record(Some(129)));
        assert!(!t.record(Some(130)));
        assert!(!t.record(None));
        assert_eq!((t.distinct, t.duplicates, t.stray), (2, 1, 2));
        assert_eq!(t.missing(), 128);
        for k in 0..130 {
            t.record(Some(k));
        }
        assert!(t.complete());
        assert_eq!(t.duplicates, 3);
    }

    #[test]
    fn keys() {
        let d = Delivery {
            seq: Some(11),
            stamp: Stamp { t: 0, n: 4 },
        };
        assert_eq!(key_of(&d, true, 10), Some(0));
        assert_eq!(key_of(&d, true, 11), None);
        assert_eq!(key_of(&d, false, 10), Some(4));
        let transient = Delivery { seq: None, ..d };
        assert_eq!(key_of(&transient, true, 0), None);
    }

    #[test]
    fn source_addresses() {
        assert_eq!(source_ip(0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_ip(253), Ipv4Addr::new(127, 0, 0, 255));
        assert_eq!(source_ip(254), Ipv4Addr::new(127, 0, 1, 0));
        let d = Dialer {
            target: Target::Livepush,
            host: "127.0.0.1:1".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            source_ips: 4,
            source_offset: 8,
        };
        assert_eq!(d.source_for(0), Some(Ipv4Addr::new(127, 0, 0, 10)));
        assert_eq!(d.source_for(5), Some(Ipv4Addr::new(127, 0, 0, 11)));
        let remote = Dialer {
            addr: "[::1]:1".parse().unwrap(),
            ..d.clone()
        };
        assert_eq!(remote.source_for(0), None);
        let off = Dialer { source_ips: 0, ..d };
        assert_eq!(off.source_for(0), None);
    }

    #[test]
    fn base64_and_urls() {
        assert_eq!(base64(b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
        assert_eq!(
            split_url("ws://h:1/socket.io/?EIO=4&transport=websocket").unwrap(),
            ("h:1", "/socket.io/?EIO=4&transport=websocket")
        );
        assert_eq!(split_url("ws://h:1").unwrap(), ("h:1", "/"));
        assert!(split_url("wss://h/").is_err());
    }

    #[test]
    fn upgrade_answers() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n";
        check_upgrade(ok).unwrap();
        let refused = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
        let e = check_upgrade(refused).unwrap_err().to_string();
        assert!(e.contains("403"), "{e}");
        assert!(check_upgrade(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").is_err());
    }

    /// A server frame (unmasked).
    fn server_frame(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        write_frame(&mut f, fin, op, payload, None);
        f
    }

    /// Parse one masked client frame at the start of `b` with tungstenite (the reference):
    /// (opcode, payload unmasked, bytes taken), or `None` if it is not all there.
    fn client_frame(b: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
        use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
        let mut cursor = std::io::Cursor::new(b);
        let (header, len) = FrameHeader::parse(&mut cursor).unwrap()?;
        let start = cursor.position() as usize;
        let body = b.get(start..start + len as usize)?;
        let key = header.mask.expect("client frames are masked");
        let payload = body
            .iter()
            .zip(key.iter().cycle())
            .map(|(x, k)| x ^ k)
            .collect();
        Some((u8::from(header.opcode), payload, start + body.len()))
    }

    const PONG: u8 = 0xa;
    const CLOSE: u8 = 0x8;

    #[test]
    fn codec_hands_over_messages_answers_and_stops_at_the_close() {
        let big = "y".repeat(70_000);
        let mut stream = Vec::new();
        stream.extend(server_frame(true, OpCode::Text, b"one"));
        stream.extend(server_frame(false, OpCode::Text, b"tw"));
        stream.extend(server_frame(true, OpCode::Ping, b"p!"));
        stream.extend(server_frame(true, OpCode::Continuation, b"o"));
        stream.extend(server_frame(true, OpCode::Binary, &[b'b', 0xff]));
        stream.extend(server_frame(true, OpCode::Pong, b""));
        stream.extend(server_frame(true, OpCode::Text, big.as_bytes()));
        stream.extend(server_frame(true, OpCode::Close, &[0x03, 0xe8, b'b']));
        stream.extend(server_frame(true, OpCode::Text, b"after the close"));
        for cut in [1, 2, 3, 7, 100, 4096, stream.len()] {
            let mut c = Codec::new();
            let mut got: Vec<String> = Vec::new();
            let mut n = 0;
            for piece in stream.chunks(cut) {
                n += c
                    .decode(&mut piece.to_vec(), &mut |m| got.push(m.to_owned()))
                    .unwrap();
                if c.closed {
                    break;
                }
            }
            assert!(c.closed, "cut {cut}");
            assert_eq!(n, 4, "cut {cut}");
            assert_eq!(got, vec!["one", "two", "b\u{fffd}", &big], "cut {cut}");
            // A masked pong with the ping's payload, then a close with the status code.
            let (op, p, n) = client_frame(&c.out).unwrap();
            assert_eq!((op, &p[..]), (PONG, &b"p!"[..]));
            let (op, p, m) = client_frame(&c.out[n..]).unwrap();
            assert_eq!((op, &p[..]), (CLOSE, &[0x03, 0xe8][..]));
            assert_eq!(n + m, c.out.len());
        }
    }

    #[test]
    fn bad_server_frames_are_errors() {
        let decode = |b: &[u8]| Codec::new().decode(&mut b.to_vec(), &mut |_| {});
        let e = decode(&[0x81, 0x81, 0, 0, 0, 0, b'a']).unwrap_err();
        assert!(e.to_string().contains("masked"), "{e}");
        assert!(decode(&[0xc1, 0x01, b'a']).is_err(), "rsv1");
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(decode(&huge).is_err(), "too large");
        assert_eq!(decode(&[0x81, 126, 1]).unwrap(), 0);
        assert_eq!(decode(&[0x81, 1, b'a', 0x81]).unwrap(), 1);
    }

    /// A fake `ws` target: checks the upgrade request, answers with frames in the same
    /// segment as the 101, fragments, pings, and closes.
    #[tokio::test]
    async fn session_against_a_fake_server() {
        use crate::bench::targets::payload;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            while !req.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                tcp.read_exact(&mut b).await.unwrap();
                req.push(b[0]);
            }
            let req = String::from_utf8(req).unwrap();
            assert!(req.starts_with("GET / HTTP/1.1\r\n"), "{req}");
            assert!(req.contains(&format!("Host: {addr}\r\n")), "{req}");
            assert!(req.contains("Sec-WebSocket-Version: 13\r\n"), "{req}");
            assert!(req.contains("Upgrade: websocket\r\n"), "{req}");
            let key = req
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap();
            assert_eq!(key.len(), 24);
            let mut out = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n".to_vec();
            out.extend(server_frame(
                true,
                OpCode::Text,
                payload(1, 0, 64).as_bytes(),
            ));
            tcp.write_all(&out).await.unwrap();
            let p1 = payload(2, 1, 64);
            let (a, b) = p1.split_at(10);
            let mut out = server_frame(false, OpCode::Text, a.as_bytes());
            out.extend(server_frame(true, OpCode::Ping, b"hi"));
            out.extend(server_frame(true, OpCode::Continuation, b.as_bytes()));
            tcp.write_all(&out).await.unwrap();
            // The pong comes back masked.
            let mut got = Vec::new();
            let pong = loop {
                if let Some(f) = client_frame(&got) {
                    break f;
                }
                let mut b = [0u8; 64];
                let n = tcp.read(&mut b).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&b[..n]);
            };
            assert_eq!((pong.0, &pong.1[..]), (PONG, &b"hi"[..]));
            let mut out = server_frame(true, OpCode::Text, payload(3, 2, 300).as_bytes());
            out.extend(server_frame(
                true,
                OpCode::Text,
                payload(4, 3, 70_000).as_bytes(),
            ));
            // Cut inside a frame: the rest comes later.
            let (a, b) = out.split_at(out.len() - 1000);
            tcp.write_all(a).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            tcp.write_all(b).await.unwrap();
            tcp.write_all(&server_frame(true, OpCode::Close, &1000u16.to_be_bytes()))
                .await
                .unwrap();
            let mut rest = Vec::new();
            tcp.read_to_end(&mut rest).await.unwrap();
            let (op, p, _) = client_frame(&rest).unwrap();
            assert_eq!((op, &p[..]), (CLOSE, &1000u16.to_be_bytes()[..]));
        });
        let dialer = Dialer {
            target: Target::Ws,
            host: addr.to_string(),
            addr,
            source_ips: 0,
            source_offset: 0,
        };
        let mut s = Session::open(&dialer, 0, "r", None, None).await.unwrap();
        let (_, early) = s.until_ready(Duration::from_secs(5)).await.unwrap();
        assert!(early.is_empty());
        let mut seen = Vec::new();
        while s.step().await.unwrap() {
            for e in s.events() {
                match e {
                    Event::Msg(d) => seen.push((d.stamp.t, d.stamp.n)),
                    e => panic!("{e:?}"),
                }
            }
        }
        assert_eq!(seen, vec![(1, 0), (2, 1), (3, 2), (4, 3)]);
        assert!(!s.step().await.unwrap());
        drop(s);
        server.await.unwrap();
    }
}

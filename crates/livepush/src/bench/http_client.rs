//! A minimal HTTP/1.1 client for the long-poll and SSE subscribers: one keep-alive
//! connection per terminal, requests written by the caller, answers parsed here.
//!
//! Not hyper's or reqwest's client: a subscriber must cost far less than the server it
//! measures, and all it needs is a status line, four headers (`Content-Length`,
//! `Transfer-Encoding`, `Connection`, and nchan's `Last-Modified`/`Etag`), and a body sized
//! by length, chunked, or up to the end of the connection. The connection's buffer holds only
//! what was read and not yet consumed; the parsers are pure and unit-tested.

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::targets::Event;

/// The largest answer head accepted.
const MAX_HEAD: usize = 16 << 10;
/// The largest body (long-poll answer) accepted.
const MAX_BODY: usize = 64 << 20;

/// How the body of an answer is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(usize),
    Chunked,
    /// Up to the end of the connection.
    UntilClose,
}

/// The parts of an answer head a subscriber uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
    /// The server closes the connection after this answer.
    pub close: bool,
    /// nchan's message id: `Last-Modified` and `Etag`, echoed back as `If-Modified-Since`
    /// and `If-None-Match`.
    pub last_modified: Option<String>,
    pub etag: Option<String>,
}

/// Parse an answer head at the start of `buf`: the head and its length, `None` if it is not
/// all there yet.
pub fn parse_head(buf: &[u8]) -> anyhow::Result<Option<(Head, usize)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            bail!("answer head over {MAX_HEAD} bytes");
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).context("answer head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let Some(status) = parts.next().and_then(|c| c.parse::<u16>().ok()) else {
        bail!("bad status line {status_line:?}");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("bad status line {status_line:?}");
    }
    let mut head = Head {
        status,
        framing: Framing::UntilClose,
        close: version == "HTTP/1.0",
        last_modified: None,
        etag: None,
    };
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            bail!("bad header line {line:?}");
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(
                v.parse::<usize>()
                    .with_context(|| format!("Content-Length {v:?}"))?,
            );
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if k.eq_ignore_ascii_case("connection") {
            if v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")) {
                head.close = true;
            } else if v
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("keep-alive"))
            {
                head.close = false;
            }
        } else if k.eq_ignore_ascii_case("last-modified") {
            head.last_modified = Some(v.to_owned());
        } else if k.eq_ignore_ascii_case("etag") {
            head.etag = Some(v.to_owned());
        }
    }
    head.framing = if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Length(0)
    } else {
        Framing::UntilClose
    };
    if head.framing == Framing::UntilClose {
        head.close = true;
    }
    Ok(Some((head, end + 4)))
}

/// A decoder of the chunked transfer coding (RFC 9112 §7.1), fed what arrives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex size (`size` so far).
    #[default]
    Start,
    Size(usize),
    /// Skipping chunk extensions up to the line's end.
    Ext(usize),
    /// In the data, with this many bytes left.
    Data(usize),
    /// After the data: the CRLF.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one (`true`: at a line start).
    Trailer(bool),
    Done,
}

impl Chunked {
    /// Decode as much of `input` as possible, the data to `out`; returns the bytes taken (all
    /// of them unless the body ended within `input`).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> anyhow::Result<usize> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                ChunkState::Start | ChunkState::Size(_) => {
                    let size = match self.state {
                        ChunkState::Size(s) => s,
                        _ => 0,
                    };
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            let d = (b as char).to_digit(16).unwrap_or(0) as usize;
                            let s = size
                                .checked_mul(16)
                                .and_then(|s| s.checked_add(d))
                                .filter(|s| *s <= MAX_BODY)
                                .context("chunk too large")?;
                            ChunkState::Size(s)
                        }
                        _ if self.state == ChunkState::Start => bail!("bad chunk size"),
                        b'\n' => Self::after_size(size),
                        _ => ChunkState::Ext(size),
                    }
                }
                ChunkState::Ext(size) => match b {
                    b'\n' => Self::after_size(size),
                    _ => ChunkState::Ext(size),
                },
                ChunkState::Data(left) => {
                    let n = left.min(input.len() - i);
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    self.state = if n == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n)
                    };
                    continue;
                }
                ChunkState::DataEnd => match b {
                    b'\r' => ChunkState::DataEnd,
                    b'\n' => ChunkState::Start,
                    _ => bail!("no CRLF after chunk data"),
                },
                ChunkState::Trailer(at_start) => match b {
                    b'\r' => ChunkState::Trailer(at_start),
                    b'\n' if at_start => ChunkState::Done,
                    b'\n' => ChunkState::Trailer(true),
                    _ => ChunkState::Trailer(false),
                },
                ChunkState::Done => return Ok(i),
            };
            i += 1;
            if self.state == ChunkState::Done {
                return Ok(i);
            }
        }
        Ok(i)
    }

    fn after_size(size: usize) -> ChunkState {
        if size == 0 {
            ChunkState::Trailer(true)
        } else {
            ChunkState::Data(size)
        }
    }

    /// The last chunk and the trailer have come.
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

/// One keep-alive HTTP/1.1 connection.
#[derive(Debug)]
pub struct HttpConn {
    tcp: TcpStream,
    /// Read and not yet consumed (empty, without capacity, while idle).
    pub buf: Vec<u8>,
    /// The server ended the connection.
    pub eof: bool,
}

impl HttpConn {
    pub fn new(tcp: TcpStream) -> HttpConn {
        HttpConn {
            tcp,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Send a whole request.
    pub async fn send(&mut self, request: &[u8]) -> std::io::Result<()> {
        self.tcp.write_all(request).await
    }

    /// Read more into `buf`; the bytes read (0: the end). Cancel-safe.
    pub async fn read_more(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8192);
        }
        let n = self.tcp.read_buf(&mut self.buf).await?;
        if n == 0 {
            self.eof = true;
        }
        Ok(n)
    }

    /// Read up to the end of an answer head and take it off `buf`. Cancel-safe.
    pub async fn read_head(&mut self) -> anyhow::Result<Head> {
        loop {
            if let Some((head, n)) = parse_head(&self.buf)? {
                self.buf.drain(..n);
                return Ok(head);
            }
            if self.read_more().await? == 0 {
                bail!("connection closed before an answer");
            }
        }
    }

    /// Read a whole body framed as `head` says into `out`, taking it off `buf`.
    pub async fn read_body(&mut self, head: &Head, out: &mut Vec<u8>) -> anyhow::Result<()> {
        match head.framing {
            Framing::Length(n) => {
                if n > MAX_BODY {
                    bail!("body of {n} bytes");
                }
                while self.buf.len() < n {
                    if self.read_more().await? == 0 {
                        bail!("connection closed within a body");
                    }
                }
                out.extend_from_slice(&self.buf[..n]);
                self.buf.drain(..n);
            }
            Framing::Chunked => {
                let mut dec = Chunked::default();
                loop {
                    let n = dec.feed(&self.buf, out)?;
                    self.buf.drain(..n);
                    if dec.done() {
                        break;
                    }
                    if out.len() > MAX_BODY {
                        bail!("body over {MAX_BODY} bytes");
                    }
                    if self.read_more().await? == 0 {
                        bail!("connection closed within a chunked body");
                    }
                }
            }
            Framing::UntilClose => {
                while self.read_more().await? > 0 {
                    if self.buf.len() > MAX_BODY {
                        bail!("body over {MAX_BODY} bytes");
                    }
                }
                out.append(&mut self.buf);
            }
        }
        if self.buf.is_empty() && self.buf.capacity() > 64 << 10 {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// End abruptly (a TCP reset).
    pub fn abort(self) {
        let _ = self.tcp.set_zero_linger();
    }
}

/// The events of a subscriber's last step, cleared by the next one.
#[derive(Debug, Default)]
pub struct Handout {
    pub list: Vec<Event>,
    handed_out: bool,
}

impl Handout {
    /// The events of a session's opening: handed out at once (the first step clears them).
    pub fn opened(list: Vec<Event>) -> Handout {
        Handout {
            list,
            handed_out: true,
        }
    }

    /// At a step's start: forget what the last step handed out.
    pub fn start(&mut self) {
        if std::mem::take(&mut self.handed_out) {
            self.list.clear();
        }
    }

    /// Whether there is anything to hand out (the next step's start clears it).
    pub fn ready(&mut self) -> bool {
        self.handed_out = !self.list.is_empty();
        self.handed_out
    }
}

/// Percent-encode a query value (everything but unreserved characters).
pub fn query_escape(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[(b >> 4) as usize]));
            out.push(char::from(b"0123456789ABCDEF"[(b & 15) as usize]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let a = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{\"frames\":[]}";
        let (h, n) = parse_head(a).unwrap().unwrap();
        assert_eq!(&a[n..], b"{\"frames\":[]}");
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, Framing::Length(12));
        assert!(!h.close);
        assert!(parse_head(&a[..20]).unwrap().is_none());

        let sse =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n";
        let (h, _) = parse_head(sse).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Chunked);

        let nchan = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nLast-Modified: Sun, 06 Dec 2026 12:00:00 GMT\r\nEtag: 3\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}";
        let (h, _) = parse_head(nchan).unwrap().unwrap();
        assert_eq!(
            h.last_modified.as_deref(),
            Some("Sun, 06 Dec 2026 12:00:00 GMT")
        );
        assert_eq!(h.etag.as_deref(), Some("3"));
        assert!(h.close);

        let (h, _) = parse_head(b"HTTP/1.1 304 Not Modified\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(0));
        let (h, _) = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(h.close);

        assert!(parse_head(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(parse_head(b"SSH-2.0 x\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_head(&vec![b'a'; MAX_HEAD + 1]).is_err());
    }

    #[test]
    fn chunked_bodies_in_any_cut() {
        let body =
            b"5\r\nhello\r\n1;ext=1\r\n \r\nB\r\nworld, all!\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        for cut in [1, 2, 3, 5, 8, body.len()] {
            let mut d = Chunked::default();
            let mut out = Vec::new();
            let mut taken = 0;
            for piece in body.chunks(cut) {
                if d.done() {
                    break;
                }
                taken += d.feed(piece, &mut out).unwrap();
            }
            assert!(d.done(), "cut {cut}");
            assert_eq!(out, b"hello world, all!", "cut {cut}");
            assert_eq!(&body[taken..], b"NEXT", "cut {cut}");
        }
        // A stream that is still going: all taken, not done.
        let mut d = Chunked::default();
        let mut out = Vec::new();
        assert_eq!(d.feed(b"3\r\nab", &mut out).unwrap(), 5);
        assert!(!d.done());
        assert_eq!(out, b"ab");
        assert!(Chunked::default().feed(b"zz\r\n", &mut out).is_err());
        assert!(Chunked::default().feed(b"1\r\nab", &mut out).is_err());
        assert!(
            Chunked::default()
                .feed(b"fffffffffffffffffff\r\n", &mut out)
                .is_err()
        );
    }

    #[test]
    fn escapes() {
        let mut s = String::new();
        query_escape("a.b-c_d~e f:g/h+i", &mut s);
        assert_eq!(s, "a.b-c_d~e%20f%3Ag%2Fh%2Bi");
    }

    #[tokio::test]
    async fn reads_answers_over_keep_alive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut b = [0u8; 256];
            let n = tcp.read(&mut b).await.unwrap();
            assert!(b[..n].starts_with(b"GET /a HTTP/1.1\r\n"));
            tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n")
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            tcp.write_all(b"0\r\n\r\n").await.unwrap();
        });
        let mut c = HttpConn::new(TcpStream::connect(addr).await.unwrap());
        c.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let h = c.read_head().await.unwrap();
        let mut out = Vec::new();
        c.read_body(&h, &mut out).await.unwrap();
        assert_eq!(out, b"abc");
        let h = c.read_head().await.unwrap();
        out.clear();
        c.read_body(&h, &mut out).await.unwrap();
        assert_eq!(out, b"de");
        server.await.unwrap();
        assert_eq!(c.read_more().await.unwrap(), 0);
        assert!(c.eof);
    }
}

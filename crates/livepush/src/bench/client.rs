//! Light subscribers: one tokio task per connection, a TCP socket bound to one of several
//! loopback source addresses (so that more connections than one address has ephemeral ports
//! can be opened), tokio-tungstenite with a small read buffer, and a [`Proto`] that speaks the
//! target's protocol.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

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
        let url = self.target.ws_url(&self.host, room);
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(url.as_str(), tcp, Some(ws_config()))
                .await
                .with_context(|| format!("WebSocket handshake with {url}"))?;
        Ok(ws)
    }
}

/// Small buffers: a subscriber holds little while idle.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

pub type Ws = WebSocketStream<TcpStream>;

/// One subscriber connection and its protocol state.
#[derive(Debug)]
pub struct Session {
    ws: Ws,
    proto: Proto,
    events: Vec<Event>,
    replies: Vec<String>,
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
        };
        s.flush().await?;
        Ok(s)
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        for r in self.replies.drain(..) {
            self.ws.feed(Message::text(r)).await?;
        }
        self.ws.flush().await?;
        Ok(())
    }

    /// Wait for the next WebSocket message, feed it to the protocol and answer what it asks.
    /// Returns `false` when the connection has ended. Events are in [`Session::events`].
    pub async fn step(&mut self) -> anyhow::Result<bool> {
        self.events.clear();
        loop {
            let m = match self.ws.next().await {
                None => return Ok(false),
                Some(m) => m?,
            };
            match m {
                Message::Text(t) => {
                    self.proto.feed(&t, &mut self.events, &mut self.replies);
                    if !self.replies.is_empty() {
                        self.flush().await?;
                    }
                    return Ok(true);
                }
                Message::Binary(b) => {
                    let t = String::from_utf8_lossy(&b);
                    self.proto.feed(&t, &mut self.events, &mut self.replies);
                    if !self.replies.is_empty() {
                        self.flush().await?;
                    }
                    return Ok(true);
                }
                Message::Close(_) => return Ok(false),
                // Pings are answered by tungstenite itself.
                _ => {}
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
            for e in &self.events {
                match e {
                    Event::Ready {
                        epoch,
                        seq,
                        recovered,
                    } => {
                        joined = Some(Joined {
                            epoch: epoch.clone(),
                            seq: *seq,
                            recovered: *recovered,
                        })
                    }
                    Event::Msg(d) => early.push(*d),
                    Event::Error(e) => bail!("{e}"),
                }
            }
            if let Some(j) = joined {
                return Ok((j, early));
            }
        }
    }

    /// End with a close frame (a clean end, not an interruption).
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
    }

    /// End abruptly: a TCP reset, no close frame.
    pub fn abort(self) {
        let _ = self.ws.get_ref().set_zero_linger();
        drop(self);
    }
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
}

//! A connection's outgoing queue, and what happens when the terminal cannot keep up.
//!
//! Room fan-out pushes encoded [`Frame`]s (shared, one pointer each) into each member's
//! outbox; the
//! connection's writer drains everything queued at once and sends it as one batch, so a burst
//! costs one write per connection rather than one per message.
//!
//! The queue has two limits:
//! - the **soft limit** (`outbox_frames`): past it, transient messages are dropped (and
//!   counted), and a reliable message is not queued; instead the outbox remembers "room R has
//!   messages up to seq N" and, once the queue has drained, sends one `prompt{room,seq}` so the
//!   terminal pulls at its own pace. Further reliable messages of that room fold into the same
//!   prompt until it has been sent. Nothing reliable is lost: it is all in the room's history.
//! - the **hard limit** (`outbox_max_bytes`): replies (`pulled`, `joined`, `pong`, errors)
//!   are always queued, but if the queue ever holds more bytes than this the outbox is
//!   closed with [`CloseReason::SlowConsumer`]; the terminal reconnects and resumes from its
//!   last seq. Control replies a writer keeps outside the queue (WebSocket pongs) count
//!   against the same limit ([`Outbox::hold`]): no reply a client provokes can grow without
//!   bound while it does not read.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use livepush_proto::ServerFrame;
use parking_lot::Mutex;

use crate::frame::{Frame, What};
use crate::metrics::OutboxStats;

/// Identifies one connection (one session) within this process.
pub type ConnId = u64;

/// What became of a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// A transient frame dropped at the soft limit.
    Dropped,
    /// A reliable frame folded into a pending `prompt`.
    Prompted,
    /// The outbox is closed (by the hard limit now, or earlier).
    Closed,
}

/// Why an outbox was closed; the transport turns it into a close frame with this reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The queue passed its hard limit or a write stalled.
    SlowConsumer,
    /// The server is shutting down.
    Shutdown,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// The limits of one outbox.
#[derive(Debug, Clone, Copy)]
pub struct OutboxLimits {
    pub soft_frames: usize,
    pub hard_bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Frame>,
    bytes: usize,
    /// Queued frames that are not `Ambient` (u32: fewer than the soft limit plus replies).
    significant: u32,
    /// Rooms whose newest reliable messages were folded into a prompt not yet sent.
    prompts: Vec<(Arc<str>, u64)>,
    closed: Option<CloseReason>,
}

/// A connection's bounded outgoing queue.
///
/// It is also the connection's whole shared state: the one writer (a WebSocket driver, an SSE
/// stream or a parked long-poll) registers its waker here, and the WebSocket reactor's
/// timer leaves [`Signals`] here. No per-connection `Notify` or timer: an idle connection
/// should cost a few hundred bytes.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// The writer's waker. Exactly one task waits on an outbox.
    waker: AtomicWaker,
    signals: Signals,
    limits: Caps,
    stats: Arc<OutboxStats>,
}

/// [`OutboxLimits`] as stored: every connection has one, so 8 bytes rather than 16 (limits
/// past `u32::MAX` are taken as `u32::MAX`).
#[derive(Debug, Clone, Copy)]
struct Caps {
    soft_frames: u32,
    hard_bytes: u32,
}

impl Caps {
    fn soft_frames(self) -> usize {
        self.soft_frames as usize
    }

    fn hard_bytes(self) -> usize {
        self.hard_bytes as usize
    }
}

/// Requests to a connection's driver raised by its reactor's tick (`Driver::tick` in
/// `transport/ws.rs`: ping, dead peer, stalled write, shutdown, token expiry), and the times the tick
/// decides them from. Times are [`crate::clock::clock_ms`] values.
#[derive(Debug, Default)]
pub struct Signals {
    bits: AtomicU8,
    /// When the peer was last heard from.
    last_heard: AtomicU64,
    /// When the write now blocked started blocking; 0 when no write is blocked.
    blocked_since: AtomicU64,
    /// When the next heartbeat ping is due: the low 32 bits of the time, compared with
    /// wrapping arithmetic (heartbeats up to 24 days, whatever the uptime). 32 bits fit in
    /// the padding next to `bits`, so the outbox does not grow.
    next_ping: AtomicU32,
}

/// Send a WebSocket ping.
pub const SIGNAL_PING: u8 = 1;
/// Nothing heard for longer than the heartbeat allows: close with 4000.
pub const SIGNAL_DEAD: u8 = 2;
/// A write has been blocked for longer than `write_timeout`: close as a slow consumer.
pub const SIGNAL_STALLED: u8 = 4;
/// The server is shutting down: close with 1001.
pub const SIGNAL_SHUTDOWN: u8 = 8;
/// The session's token expired: `unauthorized`, then close with 4003.
pub const SIGNAL_EXPIRED: u8 = 16;

impl Signals {
    pub fn heard(&self, now_ms: u64) {
        self.last_heard.store(now_ms, Ordering::Relaxed);
    }

    pub fn last_heard(&self) -> u64 {
        self.last_heard.load(Ordering::Relaxed)
    }

    /// Record that a write blocked (keeps the first time) or that nothing is blocked (`None`).
    pub fn blocked(&self, since_ms: Option<u64>) {
        match since_ms {
            Some(t) => {
                let _ = self.blocked_since.compare_exchange(
                    0,
                    t.max(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            None => self.blocked_since.store(0, Ordering::Relaxed),
        }
    }

    pub fn blocked_since(&self) -> Option<u64> {
        Some(self.blocked_since.load(Ordering::Relaxed)).filter(|t| *t != 0)
    }

    /// Schedule the next heartbeat ping.
    pub fn ping_at(&self, at_ms: u64) {
        self.next_ping.store(at_ms as u32, Ordering::Relaxed);
    }

    /// Whether a heartbeat ping is due at `now_ms`; if so, the next one is due `every_ms`
    /// later.
    pub fn ping_due(&self, now_ms: u64, every_ms: u64) -> bool {
        let next = self.next_ping.load(Ordering::Relaxed);
        if ((now_ms as u32).wrapping_sub(next) as i32) < 0 {
            return false;
        }
        self.ping_at(now_ms + every_ms);
        true
    }

    /// Raise signals without waking the writer (the caller polls it).
    pub fn raise(&self, bits: u8) {
        self.bits.fetch_or(bits, Ordering::AcqRel);
    }

    /// Take every raised signal.
    pub fn take(&self) -> u8 {
        if self.bits.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.bits.swap(0, Ordering::AcqRel)
    }
}

/// What the writer takes from the outbox in one go.
#[derive(Debug)]
pub enum Batch {
    Frames(Vec<Frame>),
    Closed(CloseReason),
}

impl Outbox {
    pub fn new(limits: OutboxLimits, stats: Arc<OutboxStats>) -> Outbox {
        Outbox {
            state: Mutex::new(State::default()),
            waker: AtomicWaker::new(),
            signals: Signals::default(),
            limits: Caps {
                soft_frames: u32::try_from(limits.soft_frames).unwrap_or(u32::MAX),
                hard_bytes: u32::try_from(limits.hard_bytes).unwrap_or(u32::MAX),
            },
            stats,
        }
    }

    /// Queue a frame; what it is ([`Frame::what`]) decides what the soft limit does to it.
    pub fn push(&self, frame: Frame) -> Pushed {
        self.push_with(frame, true)
    }

    /// Queue a frame as a reply is queued, whatever the soft limit says (the hard limit
    /// still holds): the first message of a join's replay, so that every join moves its
    /// terminal forward (see [`crate::hub::Room::join`]).
    pub fn push_past_soft_limit(&self, frame: Frame) -> Pushed {
        self.push_with(frame, false)
    }

    fn push_with(&self, frame: Frame, soft: bool) -> Pushed {
        let mut st = self.state.lock();
        if st.closed.is_some() {
            return Pushed::Closed;
        }
        let full = st.frames.len() >= self.limits.soft_frames();
        let ambient = matches!(frame.what(), What::Ambient);
        let outcome = match frame.what() {
            What::Reply | What::Joined { .. } | What::Prompt { .. } => Pushed::Queued,
            _ if !soft => Pushed::Queued,
            What::Transient | What::Ambient if full => {
                self.stats.dropped_transient.inc();
                return Pushed::Dropped;
            }
            What::Transient | What::Ambient => Pushed::Queued,
            What::Reliable { room, seq } => {
                let pending = st.prompts.iter_mut().find(|(r, _)| r == room);
                match pending {
                    Some((_, s)) => {
                        *s = (*s).max(*seq);
                        return Pushed::Prompted;
                    }
                    None if full => {
                        st.prompts.push((room.clone(), *seq));
                        self.stats.prompted.inc();
                        return Pushed::Prompted;
                    }
                    None => Pushed::Queued,
                }
            }
        };
        st.bytes += frame.len();
        st.frames.push_back(frame);
        if !ambient {
            st.significant += 1;
        }
        if st.bytes > self.limits.hard_bytes() {
            self.overflow(st);
            return Pushed::Closed;
        }
        // Wake the writer when the queue becomes non-empty, and a parked long-poll when the
        // first significant frame arrives behind ambient ones (its waiter may have been woken
        // by the ambient frame already and gone back to sleep).
        let was_empty = st.frames.len() == 1 && st.prompts.is_empty();
        let first_significant = !ambient && st.significant == 1;
        drop(st);
        if was_empty || first_significant {
            self.waker.wake();
        }
        outcome
    }

    /// Past the hard limit: discard the queue, close as a slow consumer, wake the writer.
    fn overflow(&self, mut st: parking_lot::MutexGuard<'_, State>) {
        st.closed = Some(CloseReason::SlowConsumer);
        st.frames.clear();
        st.bytes = 0;
        st.significant = 0;
        self.stats.slow_consumer_closes.inc();
        drop(st);
        self.waker.wake();
    }

    /// Count `held` bytes that the writer keeps outside the queue (WebSocket pongs and close
    /// frames written from its own buffer, which the socket has not taken yet) against the
    /// hard limit, together with what is queued: a peer that sends pings but reads nothing
    /// is a slow consumer like any other. Past the limit the outbox closes as
    /// [`CloseReason::SlowConsumer`]; returns whether it is closed.
    pub fn hold(&self, held: usize) -> bool {
        let st = self.state.lock();
        if st.closed.is_some() {
            return true;
        }
        if st.bytes.saturating_add(held) > self.limits.hard_bytes() {
            self.overflow(st);
            return true;
        }
        false
    }

    /// Queue a typed reply frame.
    pub fn reply(&self, frame: &ServerFrame) -> Pushed {
        self.push(Frame::of(frame))
    }

    /// Make room for at most `n` more frames before the soft limit; used by join replays.
    pub fn free_slots(&self) -> usize {
        let st = self.state.lock();
        self.limits.soft_frames().saturating_sub(st.frames.len())
    }

    /// Bytes that may still be queued before the hard limit.
    pub fn free_bytes(&self) -> usize {
        let st = self.state.lock();
        self.limits.hard_bytes().saturating_sub(st.bytes)
    }

    /// Fold reliable messages of `room` up to `seq` into a prompt (used when a replay does not
    /// fit).
    pub fn prompt(&self, room: &Arc<str>, seq: u64) {
        let mut st = self.state.lock();
        if st.closed.is_some() {
            return;
        }
        match st.prompts.iter_mut().find(|(r, _)| r == room) {
            Some((_, s)) => *s = (*s).max(seq),
            None => {
                st.prompts.push((room.clone(), seq));
                self.stats.prompted.inc();
            }
        }
        drop(st);
        self.waker.wake();
    }

    /// Close the outbox; the writer sends what reason it was given and ends the connection.
    pub fn close(&self, reason: CloseReason) {
        let mut st = self.state.lock();
        if st.closed.is_none() {
            st.closed = Some(reason);
            if reason == CloseReason::SlowConsumer {
                self.stats.slow_consumer_closes.inc();
            }
        }
        drop(st);
        self.waker.wake();
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().closed.is_some()
    }

    /// Take up to `max_bytes` of queued frames (at least one frame). Pending prompts are
    /// appended once every queued frame has been taken, so a prompt always follows the
    /// messages of its room that did fit. Returns an empty batch when there is nothing.
    pub fn take(&self, max_bytes: usize) -> Batch {
        let mut st = self.state.lock();
        if let Some(reason) = st.closed {
            return Batch::Closed(reason);
        }
        let mut out = Vec::with_capacity(st.frames.len().min(256));
        let mut taken = 0;
        while let Some(f) = st.frames.front() {
            if !out.is_empty() && taken + f.len() > max_bytes {
                break;
            }
            taken += f.len();
            if let Some(f) = st.frames.pop_front() {
                out.push(f);
            }
        }
        st.bytes -= taken;
        // Which of the taken frames were ambient is not tracked; a partial take keeps the
        // count conservative (it only decides whether a parked long-poll answers early).
        st.significant = if st.frames.is_empty() {
            0
        } else {
            st.significant.min(st.frames.len() as u32)
        };
        if st.frames.is_empty() {
            // Give the queue's memory back: most connections are idle between bursts.
            st.frames = VecDeque::new();
            for (room, seq) in std::mem::take(&mut st.prompts) {
                out.push(Frame::prompt(&room, seq));
            }
        }
        // Frames left over stay queued: writers check the queue again before they sleep.
        Batch::Frames(out)
    }

    /// The heartbeat's side of the connection: what the tick reads and raises.
    pub fn signals(&self) -> &Signals {
        &self.signals
    }

    /// Raise signals and wake the writer.
    pub fn signal(&self, bits: u8) {
        self.signals.bits.fetch_or(bits, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Register the writer's waker without looking for work (a writer whose socket is
    /// backed up still wants to hear of a close).
    pub fn register(&self, cx: &mut Context<'_>) {
        self.waker.register(cx.waker());
    }

    /// Register the writer's waker, then say whether there is work: queued frames, prompts,
    /// a close or a signal. Registering first means a push racing this check still wakes.
    pub fn poll_work(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.signals.bits.load(Ordering::Acquire) != 0 {
            return Poll::Ready(());
        }
        self.poll_state(false)
    }

    /// Wait until there is something to take (or the outbox is closed).
    pub async fn ready(&self) {
        self.wait(false).await
    }

    /// Wait until there is something worth answering a parked long-poll for: anything but
    /// ambient frames (or the outbox is closed).
    pub async fn significant(&self) {
        self.wait(true).await
    }

    async fn wait(&self, significant_only: bool) {
        poll_fn(|cx| {
            self.waker.register(cx.waker());
            self.poll_state(significant_only)
        })
        .await
    }

    fn poll_state(&self, significant_only: bool) -> Poll<()> {
        let st = self.state.lock();
        let queued = if significant_only {
            st.significant > 0
        } else {
            !st.frames.is_empty()
        };
        if st.closed.is_some() || queued || !st.prompts.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// Pings come every `heartbeat` from the scheduled start, also where the 32-bit time
    /// wraps around.
    #[test]
    fn heartbeat_pings_are_due_every_interval_across_the_wrap() {
        let s = Signals::default();
        for start in [5_000u64, u64::from(u32::MAX) - 50] {
            s.ping_at(start + 100);
            assert!(!s.ping_due(start, 100));
            assert!(!s.ping_due(start + 99, 100));
            assert!(s.ping_due(start + 100, 100));
            assert!(
                !s.ping_due(start + 150, 100),
                "the next one is 100 ms later"
            );
            assert!(s.ping_due(start + 210, 100));
        }
    }

    fn outbox(soft: usize, hard: usize) -> Outbox {
        Outbox::new(
            OutboxLimits {
                soft_frames: soft,
                hard_bytes: hard,
            },
            Arc::default(),
        )
    }

    fn frames(b: Batch) -> Vec<String> {
        match b {
            Batch::Frames(v) => v
                .into_iter()
                .map(|f| {
                    let mut out = Vec::new();
                    crate::frame::join_into(&[f], b'\n', &mut out);
                    String::from_utf8(out).unwrap()
                })
                .collect(),
            Batch::Closed(r) => panic!("closed: {r:?}"),
        }
    }

    #[test]
    fn soft_limit_drops_transient_and_prompts_reliable() {
        let o = outbox(2, 1 << 20);
        let room: Arc<str> = Arc::from("r");
        assert_eq!(
            o.push(Frame::transient(Bytes::from_static(b"a"))),
            Pushed::Queued
        );
        assert_eq!(
            o.push(Frame::reliable(room.clone(), 1, Bytes::from_static(b"m1"))),
            Pushed::Queued
        );
        assert_eq!(
            o.push(Frame::transient(Bytes::from_static(b"b"))),
            Pushed::Dropped
        );
        assert_eq!(
            o.push(Frame::reliable(room.clone(), 2, Bytes::from_static(b"m2"))),
            Pushed::Prompted
        );
        assert_eq!(
            o.push(Frame::reliable(room.clone(), 3, Bytes::from_static(b"m3"))),
            Pushed::Prompted
        );
        // Replies always fit.
        assert_eq!(
            o.push(Frame::reply(Bytes::from_static(b"pong"))),
            Pushed::Queued
        );
        let got = frames(o.take(1 << 20));
        assert_eq!(got[..3], ["a", "m1", "pong"]);
        assert_eq!(got[3], r#"{"op":"prompt","room":"r","seq":3}"#);
        assert_eq!(got.len(), 4);
        // After the prompt went out, reliable messages queue normally again.
        assert_eq!(
            o.push(Frame::reliable(room.clone(), 4, Bytes::from_static(b"m4"))),
            Pushed::Queued
        );
    }

    #[test]
    fn prompt_waits_until_queue_drained() {
        let o = outbox(1, 1 << 20);
        let room: Arc<str> = Arc::from("r");
        o.push(Frame::reply(Bytes::from_static(b"aaaa")));
        o.push(Frame::reply(Bytes::from_static(b"bbbb")));
        o.push(Frame::reliable(room.clone(), 9, Bytes::from_static(b"m9")));
        assert_eq!(frames(o.take(5)), ["aaaa"]);
        let rest = frames(o.take(100));
        assert_eq!(rest[0], "bbbb");
        assert!(rest[1].contains("prompt"));
    }

    #[test]
    fn hard_limit_closes() {
        let o = outbox(100, 10);
        assert_eq!(
            o.push(Frame::reply(Bytes::from_static(b"12345"))),
            Pushed::Queued
        );
        assert_eq!(
            o.push(Frame::reply(Bytes::from_static(b"123456"))),
            Pushed::Closed
        );
        assert!(matches!(
            o.take(100),
            Batch::Closed(CloseReason::SlowConsumer)
        ));
        assert_eq!(
            o.push(Frame::transient(Bytes::from_static(b"x"))),
            Pushed::Closed
        );
    }

    #[tokio::test]
    async fn a_significant_frame_behind_an_ambient_one_wakes_a_parked_poll() {
        let o = Arc::new(outbox(10, 1000));
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.significant().await });
        tokio::task::yield_now().await;
        o.push(Frame::ambient(Bytes::from_static(b"online")));
        // Let the waiter see the ambient frame, find nothing significant, and sleep again.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished());
        o.push(Frame::transient(Bytes::from_static(b"msg")));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken by the significant frame")
            .unwrap();
    }

    #[tokio::test]
    async fn ready_wakes_on_push() {
        let o = Arc::new(outbox(10, 1000));
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.ready().await });
        tokio::task::yield_now().await;
        o.push(Frame::transient(Bytes::from_static(b"x")));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}

//! A connection's outgoing queue, and what happens when the terminal cannot keep up.
//!
//! Replies, `online` counts and join replays are queued here as encoded [`Frame`]s (shared,
//! one pointer each). What its rooms deliver live is not: the outbox keeps a cursor into
//! each room's [`Ring`] and reads it by position, so a delivery costs a room one append
//! rather than one push per member. Order is kept by one rule: before anything is queued,
//! what the rings hold for this connection is read into the queue ([`Outbox::catch_up`]), so
//! everything queued is older than everything still unread in a ring. The connection's
//! writer takes the queue, then the rings, in one batch, so a burst costs one write per
//! connection rather than one per message.
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
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use livepush_proto::ServerFrame;
use parking_lot::Mutex;

use crate::frame::{self, Frame, What};
use crate::metrics::OutboxStats;
use crate::ring::{Cursor, Reader, Ring, Sink};

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
    /// The rooms' rings this connection reads (one per room it is a member of). Everything
    /// in `frames` is older than what is unread in them: a frame is only queued after
    /// they are read into the queue ([`Outbox::catch_up`]).
    subs: Vec<Sub>,
    /// Which ring a batch reads first: each in turn, so that a bursting room cannot keep
    /// the others of a connection waiting.
    turn: u32,
    closed: Option<CloseReason>,
}

/// A ring the connection reads, and where it is in it.
#[derive(Debug)]
struct Sub {
    room: Arc<str>,
    ring: Arc<Ring>,
    cursor: Cursor,
    /// This outbox, as the ring wakes it.
    me: Weak<dyn Reader>,
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
        // What the rings hold for this connection is older than this frame: queue it first.
        let mut wake = self.catch_up(&mut st);
        let (outcome, woke) = self.enqueue(&mut st, frame, soft);
        wake |= woke;
        drop(st);
        if wake {
            self.waker.wake();
        }
        outcome
    }

    /// Queue a frame under the lock. Returns what became of it and whether the writer must
    /// be woken: when the queue becomes non-empty, and (for a parked long-poll) when the
    /// first significant frame arrives behind ambient ones, whose waiter may have been woken
    /// by the ambient frame already and gone back to sleep.
    fn enqueue(&self, st: &mut State, frame: Frame, soft: bool) -> (Pushed, bool) {
        if st.closed.is_some() {
            return (Pushed::Closed, false);
        }
        let full = st.frames.len() >= self.limits.soft_frames();
        let ambient = matches!(frame.what(), What::Ambient);
        let outcome = match frame.what() {
            What::Reply | What::Joined { .. } | What::Prompt { .. } => Pushed::Queued,
            _ if !soft => Pushed::Queued,
            What::Transient | What::Ambient if full => {
                self.stats.dropped_transient.inc();
                return (Pushed::Dropped, false);
            }
            What::Transient | What::Ambient => Pushed::Queued,
            What::Reliable { room, seq } => {
                // Past the soft limit, or behind a prompt of its room not yet sent.
                if full || st.prompts.iter().any(|(r, _)| r == room) {
                    self.fold_prompt(st, room, *seq);
                    return (Pushed::Prompted, false);
                }
                Pushed::Queued
            }
        };
        st.bytes += frame.len();
        st.frames.push_back(frame);
        if !ambient {
            st.significant += 1;
        }
        if st.bytes > self.limits.hard_bytes() {
            self.overflow(st);
            return (Pushed::Closed, true);
        }
        let was_empty = st.frames.len() == 1 && st.prompts.is_empty();
        let first_significant = !ambient && st.significant == 1;
        (outcome, was_empty || first_significant)
    }

    /// Read what the rings hold for this connection into the queue, under the queue's rules
    /// (a frame is about to be queued behind them). Returns whether the writer must be
    /// woken.
    fn catch_up(&self, st: &mut State) -> bool {
        if !st.subs.iter().any(|s| s.ring.pending(&s.cursor)) {
            return false;
        }
        let mut subs = std::mem::take(&mut st.subs);
        let mut sink = Enqueue {
            outbox: self,
            st,
            room: None,
            wake: false,
        };
        for sub in &mut subs {
            sink.room = Some(sub.room.clone());
            sub.ring
                .read(&mut sub.cursor, usize::MAX, true, &sub.me, &mut sink);
        }
        let wake = sink.wake;
        st.subs = subs;
        wake
    }

    /// Fold reliable messages of `room` up to `seq` into a pending prompt.
    fn fold_prompt(&self, st: &mut State, room: &Arc<str>, seq: u64) {
        match st.prompts.iter_mut().find(|(r, _)| r == room) {
            Some((_, s)) => *s = (*s).max(seq),
            None => {
                st.prompts.push((room.clone(), seq));
                self.stats.prompted.inc();
            }
        }
    }

    /// Read `ring` (the ring of `room`) from its head on: the connection joined the room.
    /// The ring wakes the writer when something is appended.
    pub fn subscribe(self: &Arc<Self>, room: &Arc<str>, ring: &Arc<Ring>) {
        let mut st = self.state.lock();
        if st.closed.is_some() || st.subs.iter().any(|s| Arc::ptr_eq(&s.ring, ring)) {
            return;
        }
        let me: Weak<dyn Reader> = Arc::downgrade(self) as Weak<dyn Reader>;
        let cursor = ring.subscribe(me.clone());
        st.subs.push(Sub {
            room: room.clone(),
            ring: ring.clone(),
            cursor,
            me,
        });
    }

    /// Stop reading `ring`: the connection left its room. What it holds for the connection
    /// (delivered while it was a member) is queued first.
    pub fn unsubscribe(&self, ring: &Arc<Ring>) {
        let mut st = self.state.lock();
        let wake = st.closed.is_none() && self.catch_up(&mut st);
        if let Some(i) = st.subs.iter().position(|s| Arc::ptr_eq(&s.ring, ring)) {
            let sub = st.subs.swap_remove(i);
            sub.ring.unsubscribe(&sub.cursor);
        }
        drop(st);
        if wake {
            self.waker.wake();
        }
    }

    /// Past the hard limit: discard the queue and close as a slow consumer (the caller
    /// wakes the writer).
    fn overflow(&self, st: &mut State) {
        st.closed = Some(CloseReason::SlowConsumer);
        st.frames.clear();
        st.bytes = 0;
        st.significant = 0;
        self.stats.slow_consumer_closes.inc();
    }

    /// Count `held` bytes that the writer keeps outside the queue (WebSocket pongs and close
    /// frames written from its own buffer, which the socket has not taken yet) against the
    /// hard limit, together with what is queued: a peer that sends pings but reads nothing
    /// is a slow consumer like any other. Past the limit the outbox closes as
    /// [`CloseReason::SlowConsumer`]; returns whether it is closed.
    pub fn hold(&self, held: usize) -> bool {
        let mut st = self.state.lock();
        if st.closed.is_some() {
            return true;
        }
        if st.bytes.saturating_add(held) > self.limits.hard_bytes() {
            self.overflow(&mut st);
            drop(st);
            self.waker.wake();
            return true;
        }
        false
    }

    /// Whether more than the hard limit waits for the writer: its queue and what its rooms'
    /// rings hold that it has not read. The reactor asks while the connection's socket is
    /// backed up (a writer that writes keeps reading its rings).
    pub fn over_hard_limit(&self) -> bool {
        let st = self.state.lock();
        let ringed: u64 = st.subs.iter().map(|s| s.ring.behind(&s.cursor)).sum();
        (st.bytes as u64).saturating_add(ringed) > self.limits.hard_bytes() as u64
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
        self.catch_up(&mut st);
        self.fold_prompt(&mut st, room, seq);
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

    /// Take up to `max_bytes` of frames (at least one frame), cloned out: the queue first,
    /// then its pending prompts once every queued frame has been taken (a prompt always
    /// follows the messages of its room that did fit), then what the rings hold. Returns an
    /// empty batch when there is nothing.
    pub fn take(&self, max_bytes: usize) -> Batch {
        let mut out = Vec::new();
        match self.take_into(max_bytes, &mut |a: &[Frame], b: &[Frame]| {
            out.extend(a.iter().chain(b).cloned())
        }) {
            Ok(()) => Batch::Frames(out),
            Err(reason) => Batch::Closed(reason),
        }
    }

    /// [`Outbox::take`] without cloning: hand the frames to `out` as runs, in order, each
    /// run consecutive frames of one source (the queue, the prompts, one room's ring). A
    /// WebSocket writer copies each run into one text frame, under the ring's lock: a
    /// delivery costs no reference count and no queue slot of its own. `Err` when the
    /// outbox is closed.
    pub fn take_into(&self, max_bytes: usize, out: &mut dyn Run) -> Result<(), CloseReason> {
        let mut st = self.state.lock();
        if let Some(reason) = st.closed {
            return Err(reason);
        }
        let mut n = 0;
        let mut taken = 0;
        for f in &st.frames {
            if n > 0 && taken + f.len() > max_bytes {
                break;
            }
            taken += f.len();
            n += 1;
        }
        if n > 0 {
            let (a, b) = frame::run_of(&st.frames, 0..n);
            out.run(a, b);
            st.frames.drain(..n);
            st.bytes -= taken;
        }
        // Which of the taken frames were ambient is not tracked; a partial take keeps the
        // count conservative (it only decides whether a parked long-poll answers early).
        st.significant = if st.frames.is_empty() {
            0
        } else {
            st.significant.min(st.frames.len() as u32)
        };
        if !st.frames.is_empty() {
            // Frames left over stay queued: writers check again before they sleep.
            return Ok(());
        }
        if st.frames.capacity() > 0 {
            // Give the queue's memory back: most connections are idle between bursts.
            st.frames = VecDeque::new();
        }
        let prompts = std::mem::take(&mut st.prompts);
        if !prompts.is_empty() {
            let frames: Vec<Frame> = prompts
                .iter()
                .map(|(room, seq)| Frame::prompt(room, seq.to_owned()))
                .collect();
            out.run(&frames, &[]);
            n += frames.len();
        }
        let subs = st.subs.len();
        if subs == 0 {
            return Ok(());
        }
        let first = st.turn as usize % subs;
        st.turn = st.turn.wrapping_add(1);
        let mut budget = max_bytes.saturating_sub(taken);
        let stats = &self.stats;
        for i in (first..subs).chain(0..first) {
            let sub = &mut st.subs[i];
            if !sub.ring.pending_or_park(&mut sub.cursor, &sub.me) {
                continue;
            }
            if budget == 0 && n > 0 {
                break;
            }
            let mut sink = Forward {
                room: &sub.room,
                stats,
                out: &mut *out,
                frames: 0,
            };
            budget -= sub
                .ring
                .read(&mut sub.cursor, budget, n == 0, &sub.me, &mut sink)
                .min(budget);
            n += sink.frames;
        }
        Ok(())
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
        let mut st = self.state.lock();
        let queued = if significant_only {
            st.significant > 0
        } else {
            !st.frames.is_empty()
        };
        // A ring with nothing to read has the writer parked in it before it sleeps.
        let mut ringed = false;
        for s in &mut st.subs {
            ringed |= s.ring.pending_or_park(&mut s.cursor, &s.me);
        }
        if st.closed.is_some() || queued || !st.prompts.is_empty() || ringed {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Where [`Outbox::take_into`] hands a batch: consecutive frames, as the two slices of a
/// queue's range.
pub trait Run {
    fn run(&mut self, a: &[Frame], b: &[Frame]);
}

impl<F: FnMut(&[Frame], &[Frame])> Run for F {
    fn run(&mut self, a: &[Frame], b: &[Frame]) {
        self(a, b)
    }
}

impl Reader for Outbox {
    fn wake(&self) {
        self.waker.wake();
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        for sub in &self.state.get_mut().subs {
            sub.ring.unsubscribe(&sub.cursor);
        }
    }
}

/// A ring's frames on their way into the queue ([`Outbox::catch_up`]).
struct Enqueue<'a> {
    outbox: &'a Outbox,
    st: &'a mut State,
    room: Option<Arc<str>>,
    wake: bool,
}

impl Sink for Enqueue<'_> {
    fn lagged(&mut self, dropped: u64, prompt: Option<u64>) {
        self.outbox.stats.dropped_transient.inc_by(dropped);
        if let (Some(seq), Some(room)) = (prompt, &self.room) {
            self.outbox.fold_prompt(self.st, room, seq);
            self.wake = true;
        }
    }

    fn run(&mut self, a: &[Frame], b: &[Frame]) {
        for f in a.iter().chain(b) {
            let (_, wake) = self.outbox.enqueue(self.st, f.clone(), true);
            self.wake |= wake;
        }
    }
}

/// A ring's frames on their way to the writer ([`Outbox::take_into`]).
struct Forward<'a> {
    room: &'a Arc<str>,
    stats: &'a OutboxStats,
    out: &'a mut dyn Run,
    frames: usize,
}

impl Sink for Forward<'_> {
    fn lagged(&mut self, dropped: u64, prompt: Option<u64>) {
        self.stats.dropped_transient.inc_by(dropped);
        if let Some(seq) = prompt {
            self.stats.prompted.inc();
            self.out.run(&[Frame::prompt(self.room, seq)], &[]);
            self.frames += 1;
        }
    }

    fn run(&mut self, a: &[Frame], b: &[Frame]) {
        self.frames += a.len() + b.len();
        self.out.run(a, b);
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

    /// A quiet room whose viewers come and go wakes its parked writers once in a while with
    /// nothing to read (see `Ring::unsubscribe`); a writer that then goes back to sleep must
    /// still be woken by the next message.
    #[tokio::test]
    async fn a_writer_woken_with_nothing_to_read_still_hears_of_the_next_message() {
        let o = Arc::new(outbox(10, 1 << 20));
        let ring = Arc::new(Ring::new(16, 1 << 20));
        let room: Arc<str> = Arc::from("r");
        o.subscribe(&room, &ring);
        let other = Arc::new(outbox(10, 1 << 20));
        for _ in 0..200 {
            other.subscribe(&room, &ring);
            other.unsubscribe(&ring);
        }
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.ready().await });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "nothing to read yet");
        ring.append(Frame::transient(Bytes::from_static(b"x")));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken by the append")
            .unwrap();
        assert_eq!(frames(o.take(1 << 20)), ["x"]);
    }

    proptest::proptest! {
        /// A connection reading a room's ring while replies are queued to it: what it gets is
        /// the order things happened in (a reply after every room message delivered before
        /// it, before every one delivered after it), each once; a room message it does not
        /// get is counted as dropped if transient, or covered by a `prompt` up to at least its
        /// seq if reliable.
        #[test]
        fn ring_and_queue_keep_the_order_of_events_and_report_every_loss(
            ring_frames in 1usize..5,
            soft in 1usize..5,
            ops in proptest::collection::vec((0u8..4, 1usize..200), 1..120),
        ) {
            let stats = Arc::new(OutboxStats::default());
            let o = Arc::new(Outbox::new(
                OutboxLimits { soft_frames: soft, hard_bytes: 1 << 20 },
                stats.clone(),
            ));
            let ring = Arc::new(Ring::new(ring_frames, 1 << 20));
            let room: Arc<str> = Arc::from("r");
            o.subscribe(&room, &ring);
            let (mut events, mut got) = (Vec::new(), Vec::new());
            let mut seq = 0;
            for (op, n) in ops {
                match op {
                    0 => {
                        seq += 1;
                        let text = format!("m{seq}");
                        ring.append(Frame::reliable(room.clone(), seq, Bytes::from(text.clone())));
                        events.push(text);
                    }
                    1 => {
                        let text = format!("c{}", events.len());
                        ring.append(Frame::transient(Bytes::from(text.clone())));
                        events.push(text);
                    }
                    2 => {
                        let text = format!("p{}", events.len());
                        o.push(Frame::reply(Bytes::from(text.clone())));
                        events.push(text);
                    }
                    _ => got.extend(frames(o.take(n))),
                }
            }
            loop {
                let more = frames(o.take(usize::MAX));
                if more.is_empty() {
                    break;
                }
                got.extend(more);
            }
            // What arrived, prompts aside, is the order of events, each at most once.
            let mut prompted = 0u64;
            let mut at = 0;
            for g in &got {
                if let Some(rest) = g.strip_prefix(r#"{"op":"prompt","room":"r","seq":"#) {
                    prompted = prompted.max(rest.trim_end_matches('}').parse().unwrap());
                    continue;
                }
                let i = events[at..].iter().position(|e| e == g);
                proptest::prop_assert!(i.is_some(), "{g} out of order or twice: {got:?}");
                at += i.unwrap() + 1;
            }
            let missing: Vec<&String> = events.iter().filter(|e| !got.contains(e)).collect();
            for m in &missing {
                proptest::prop_assert!(!m.starts_with('p'), "reply {m} lost");
                if let Some(n) = m.strip_prefix('m') {
                    let n: u64 = n.parse().unwrap();
                    proptest::prop_assert!(n <= prompted, "m{n} lost without a prompt");
                }
            }
            let chats = missing.iter().filter(|m| m.starts_with('c')).count() as u64;
            proptest::prop_assert_eq!(stats.dropped_transient.get(), chats);
        }
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

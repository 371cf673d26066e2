//! Per-terminal inboxes: direct messages that wait until the terminal acknowledges them, and
//! the wake-ups that bring a sleeping terminal back for them.
//!
//! An inbox works like a room with one member. A post goes to the engine
//! ([`InboxEngine`]), which gives it the terminal's next inbox `seq`, stores it, and hands it
//! to the node that holds the terminal's sessions, which pushes it to every session the
//! terminal has open (as an `inbox` frame). On every connect the server sends what is after the acknowledged
//! position (or after the position a long-poll names). `ack` advances the position. Inboxes
//! are bounded in count and age; a message dropped for either is counted, and the terminal
//! sees the gap in inbox seqs.
//!
//! When a message is waiting and the terminal is offline (no session, not within a long-poll
//! grace), the server sends it a wake datagram at the address of its last verified keepalive
//! and repeats it with back-off until the terminal connects, acknowledges, or the messages
//! expire.
//!
//! # Replays across restarts
//!
//! A keepalive must be newer than the last one accepted for its terminal, or a captured one
//! replayed from another address would redirect the terminal's wakes. The newest accepted
//! `ts` is exact in memory, but it is written to the store only when the address (or size)
//! changes and every ten minutes: one write per terminal per ten minutes instead of one per
//! keepalive (with a keepalive every 30 s, 1 write in 20; the lost `ts` is what makes a
//! restart interesting). So after a restart (clean or `kill -9`) the stored `ts` may be up to
//! ten minutes behind the last accepted one. Instead of writing more, the server uses what it
//! knows about keepalives captured before it started: each was accepted by the previous
//! process, so its `ts` was within `wake_max_skew` of that process's clock, that is at most
//! *start + skew*. Until then ([`Inboxes`]'s replay floor), a keepalive that would move a
//! registration loaded from the store (to another address or size) is refused as a replay;
//! one from the registered address and size cannot redirect anything and counts, and once this
//! process accepted a keepalive of the terminal its `ts` is exact again. The cost: a terminal
//! whose address changes within `wake_max_skew` (5 min by default) after a restart, before it
//! sent a keepalive from its old address, is woken at that address until its keepalives pass
//! the floor. A terminal with no registration at all registers at once (with `--data-dir :memory:`, or if the process died within the
//! moment between accepting its first keepalive and writing it, a replay can then register
//! first; the terminal's next keepalive moves it back).
//!
//! The same holds for an inbox forgotten while idle and loaded again: it is kept in memory
//! for at least twice `wake_max_skew` after its last keepalive, after which every keepalive it
//! accepted is too old to pass the skew check (its `ts` was at most its arrival plus the
//! skew), so the stored `ts` is enough.

use std::borrow::Borrow;
use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use livepush_proto::{InboxPosition, ServerFrame};
use parking_lot::Mutex;
use serde_json::value::RawValue;

use crate::clock::now_ms;
use crate::engine::{EngineError, InboxEngine, TerminalPresence};
use crate::frame::Frame;
use crate::metrics::InboxStats;
use crate::metrics::ReasonLabel;
use crate::outbox::{ConnId, Outbox};
use crate::store::{InboxMessage, TerminalRecord, WakeRegistration};
use crate::terminals::Terminals;
use crate::wake::WakeSocket;

/// Bounds of inboxes and the wake retry schedule.
#[derive(Debug, Clone, Copy)]
pub struct InboxSettings {
    /// Unacknowledged messages kept per terminal; the oldest is dropped past it.
    pub max_messages: usize,
    /// Age after which an unacknowledged message is dropped.
    pub ttl: Duration,
    /// Wake datagrams sent per episode after the first.
    pub wake_retries: u32,
    /// Delay before the first repeat; doubles up to `wake_retry_max`.
    pub wake_retry_first: Duration,
    pub wake_retry_max: Duration,
}

/// The answer to a post.
#[derive(Debug, Clone, Copy)]
pub struct Posted {
    pub seq: u64,
    pub online: bool,
    pub wake_sent: bool,
}

/// What the terminals API shows of an inbox.
#[derive(Debug, Clone, Copy, Default)]
pub struct InboxView {
    pub position: InboxPosition,
    pub wake_registered: bool,
    pub last_keepalive_ms: Option<u64>,
}

/// An inbox's state, under its lock.
///
/// Every connected terminal has an inbox (attached on connect, whether or not it ever gets a
/// message), so this is memory per connected terminal: what every terminal needs is inline
/// (48 bytes), and what only a terminal with waiting messages or a wake registration needs is
/// in [`Cold`], allocated only while it holds something.
#[derive(Debug, Default)]
struct State {
    delivered: u64,
    acked: u64,
    /// Last activity (ms), for eviction.
    touched_ms: u64,
    sessions: Sessions,
    /// `None` while there is nothing in it (see [`Cold::is_empty`]).
    cold: Option<Box<Cold>>,
}

/// The parts of an inbox's state that an idle terminal does not use, out of line so that it
/// does not pay for them (about 140 bytes).
#[derive(Debug, Default)]
struct Cold {
    /// Delivered, unacknowledged, kept: contiguous or with gaps where messages were dropped.
    messages: VecDeque<InboxMessage>,
    wake: Option<WakeRegistration>,
    /// When the registration was last written to the store (ms).
    wake_persisted_ms: u64,
    /// `wake` was accepted by this process (its `ts` is exact), not loaded from the store.
    wake_accepted: bool,
    /// The newest seq a finished episode tried to wake for: not retried until a newer one,
    /// or until the terminal came and left again, or moved. Only read together with `wake`,
    /// which keeps this struct alive, so it is never lost while it matters.
    woken_for: u64,
    /// A wake episode is running.
    waking: bool,
    /// A session attached since the running episode started: the episode does not mark its
    /// messages as woken for. (At most one episode runs at a time, see `waking`.)
    came: bool,
}

impl Cold {
    /// Nothing in it that must outlive it: no messages, no registration, no episode.
    /// (`woken_for` and `came` only matter while there is a registration or an episode.)
    fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.wake.is_none() && !self.waking
    }
}

impl State {
    fn wake(&self) -> Option<WakeRegistration> {
        self.cold.as_ref().and_then(|c| c.wake)
    }

    fn waking(&self) -> bool {
        self.cold.as_ref().is_some_and(|c| c.waking)
    }

    /// Where the inbox stands: newest seq, acknowledged seq, unacknowledged messages kept.
    fn position(&self) -> InboxPosition {
        InboxPosition {
            seq: self.delivered,
            acked: self.acked,
            pending: self.cold.as_ref().map_or(0, |c| {
                c.messages.iter().filter(|m| m.seq > self.acked).count() as u64
            }),
        }
    }

    fn unacked(&self) -> bool {
        self.cold
            .as_ref()
            .is_some_and(|c| c.messages.iter().any(|m| m.seq > self.acked))
    }

    /// The out-of-line part, allocated if absent. Call [`State::settle`] after anything that
    /// may empty it.
    fn cold_mut(&mut self) -> &mut Cold {
        self.cold.get_or_insert_default()
    }

    /// Free the out-of-line part once empty, and buffers it no longer needs.
    fn settle(&mut self) {
        let Some(c) = self.cold.as_deref_mut() else {
            return;
        };
        if c.is_empty() {
            self.cold = None;
            return;
        }
        if c.messages.is_empty() {
            c.messages = VecDeque::new();
        }
    }

    /// Acknowledge everything up to `seq` (capped at the delivered position). Returns the
    /// new acknowledged position if it moved.
    fn ack(&mut self, seq: u64) -> Option<u64> {
        let seq = seq.min(self.delivered);
        if seq <= self.acked {
            return None;
        }
        self.acked = seq;
        if let Some(c) = self.cold.as_deref_mut() {
            while c.messages.front().is_some_and(|m| m.seq <= seq) {
                c.messages.pop_front();
            }
        }
        self.settle();
        Some(seq)
    }
}

/// The sessions a terminal has open: nearly always one, at most a handful, so a boxed slice of
/// exactly that many, searched linearly. For one session that is 16 bytes inline and one
/// 16-byte allocation, where a hash map took 48 inline and about 90 allocated.
#[derive(Debug, Default)]
struct Sessions(Box<[(ConnId, Arc<Outbox>)]>);

impl Sessions {
    /// Add `conn`, or replace its outbox if it is there.
    fn insert(&mut self, conn: ConnId, outbox: Arc<Outbox>) {
        if let Some(slot) = self.0.iter_mut().find(|(c, _)| *c == conn) {
            slot.1 = outbox;
            return;
        }
        let mut v = Vec::with_capacity(self.0.len() + 1);
        v.extend(std::mem::take(&mut self.0));
        v.push((conn, outbox));
        self.0 = v.into_boxed_slice();
    }

    fn remove(&mut self, conn: ConnId) {
        if let Some(i) = self.0.iter().position(|(c, _)| *c == conn) {
            let mut v = std::mem::take(&mut self.0).into_vec();
            v.swap_remove(i);
            // Shrinks to the new length (frees when empty).
            self.0 = v.into_boxed_slice();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn outboxes(&self) -> impl Iterator<Item = &Arc<Outbox>> {
        self.0.iter().map(|(_, o)| o)
    }
}

/// One terminal's inbox.
#[derive(Debug)]
pub struct Inbox {
    id: Arc<str>,
    state: Mutex<State>,
}

/// An inbox as a set member, keyed by its terminal id: one pointer per terminal in the map
/// instead of a copy of the id's fat pointer beside the inbox pointer (memory per terminal).
#[derive(Debug)]
struct ById(Arc<Inbox>);

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.id
    }
}

/// As `str` hashes, which `Borrow<str>` requires.
impl Hash for ById {
    fn hash<H: Hasher>(&self, state: &mut H) {
        str::hash(&self.0.id, state);
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &ById) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById {}

/// How long an inbox nobody uses stays in memory (at least; see [`Inboxes::tick`]).
const INBOX_IDLE_MS: u64 = 300_000;

/// All inboxes of this node (loaded on demand).
#[derive(Debug)]
pub struct Inboxes {
    map: Mutex<HashSet<ById>>,
    engine: Arc<dyn InboxEngine>,
    terminals: Arc<Terminals>,
    wake: Option<Arc<WakeSocket>>,
    settings: InboxSettings,
    /// Until this `ts`, a keepalive may have been captured before this process started: it
    /// may not move a terminal's registration (see "Replays across restarts").
    replay_floor_ms: u64,
    pub stats: InboxStats,
}

impl Inboxes {
    pub fn new(
        engine: Arc<dyn InboxEngine>,
        terminals: Arc<Terminals>,
        wake: Option<Arc<WakeSocket>>,
        settings: InboxSettings,
        stats: InboxStats,
    ) -> Inboxes {
        let skew = wake.as_ref().map_or(0, |w| w.max_skew_ms());
        Inboxes {
            map: Mutex::new(HashSet::new()),
            engine,
            terminals,
            wake,
            settings,
            replay_floor_ms: now_ms().saturating_add(skew),
            stats,
        }
    }

    /// The inbox of `id`, loaded from the engine on first use.
    pub async fn get(&self, id: &str) -> Result<Arc<Inbox>, EngineError> {
        self.get_or_load(id, || Arc::from(id)).await
    }

    /// [`Inboxes::get`] for a terminal whose id is already shared: a new inbox keeps that
    /// `Arc` rather than a copy of the id (one allocation less per connected terminal).
    pub async fn get_shared(&self, id: &Arc<str>) -> Result<Arc<Inbox>, EngineError> {
        self.get_or_load(id, || id.clone()).await
    }

    async fn get_or_load(
        &self,
        id: &str,
        shared_id: impl FnOnce() -> Arc<str>,
    ) -> Result<Arc<Inbox>, EngineError> {
        if let Some(i) = self.map.lock().get(id) {
            return Ok(i.0.clone());
        }
        let record = self.engine.load_and_watch(id).await?.unwrap_or_default();
        let mut map = self.map.lock();
        if let Some(i) = map.get(id) {
            return Ok(i.0.clone());
        }
        let inbox = Arc::new(Inbox::new(shared_id(), record));
        map.insert(ById(inbox.clone()));
        Ok(inbox)
    }

    /// Load every terminal the engine says has unacknowledged messages, so that the wake scan
    /// goes on waking them after a restart.
    pub async fn load_pending(&self) -> Result<usize, EngineError> {
        let ids = self.engine.pending_terminals().await?;
        for id in &ids {
            self.get(id).await?;
        }
        Ok(ids.len())
    }

    /// What the terminals API shows (loads from the engine; `None` if never seen there).
    pub async fn view(&self, id: &str) -> Result<Option<InboxView>, EngineError> {
        if let Some(i) = self.map.lock().get(id).map(|i| i.0.clone()) {
            return Ok(Some(i.view()));
        }
        Ok(self.engine.load_terminal(id).await?.map(|r| InboxView {
            position: InboxPosition {
                seq: r.seq,
                acked: r.acked,
                pending: r.inbox.iter().filter(|m| m.seq > r.acked).count() as u64,
            },
            wake_registered: r.wake.is_some(),
            last_keepalive_ms: r.wake.map(|w| w.ts),
        }))
    }

    /// Post a direct message. Answered once durable; delivered to open sessions (when the
    /// engine hands it back), or a wake datagram goes out if the terminal is offline and
    /// registered.
    pub async fn post(
        self: &Arc<Self>,
        id: &str,
        ty: &str,
        data: &RawValue,
    ) -> Result<Posted, EngineError> {
        let inbox = self.get(id).await?;
        let ts = now_ms();
        let frame = livepush_proto::SeqTemplate::inbox(ty, data, ts);
        let posted = self.engine.post(id, &frame, ts).await;
        self.stats.posted.inc();
        let message = posted?;
        // Across nodes the engine's hand-over of this message reaches this node later, on its
        // channel: take it now (the hand-over then finds it delivered), so that a wake sent
        // from here names it, and this node's sessions get it at once.
        self.on_inbox(id, &message);
        let online = inbox.has_sessions() || self.terminals.is_online(id);
        let wake_sent = if online {
            false
        } else if self.engine.wake_elsewhere(id).await.unwrap_or(false) {
            // The node that holds the terminal's NAT mapping sends it.
            true
        } else {
            self.start_wake(&inbox).await
        };
        Ok(Posted {
            seq: message.seq,
            online,
            wake_sent,
        })
    }

    /// A direct message the engine handed over: pushed to the terminal's sessions here and
    /// kept until acknowledged (bounded). Terminals this node does not hold are not its
    /// business. A terminal's seqs come one after the other: a seq past the next one means
    /// hand-overs were lost on the way (across nodes, while the subscription connection was
    /// down), so the inbox is read again from the engine rather than delivered with a hole.
    pub fn on_inbox(self: &Arc<Self>, terminal: &str, message: &InboxMessage) {
        let Some(inbox) = self.map.lock().get(terminal).map(|i| i.0.clone()) else {
            return;
        };
        if message.seq > inbox.state.lock().delivered + 1 {
            self.reload(vec![inbox]);
            return;
        }
        self.deliver(&inbox, message);
    }

    /// The engine may have lost hand-overs (its subscription connection dropped, or its
    /// data): hold every inbox held here again, and deliver what each missed.
    pub fn relink(self: &Arc<Self>) {
        let held = self.map.lock().iter().map(|i| i.0.clone()).collect();
        self.reload(held);
    }

    fn reload(self: &Arc<Self>, held: Vec<Arc<Inbox>>) {
        let inboxes = self.clone();
        tokio::spawn(async move {
            for inbox in held {
                match inboxes.engine.load_and_watch(&inbox.id).await {
                    Ok(record) => {
                        for m in record.iter().flat_map(|r| &r.inbox) {
                            inboxes.deliver(&inbox, m);
                        }
                    }
                    Err(e) => {
                        // The next hand-over past a hole, or the next link loss, tries again.
                        tracing::warn!(error = %e, "cannot read inboxes again");
                        return;
                    }
                }
            }
        });
    }

    fn deliver(&self, inbox: &Inbox, message: &InboxMessage) {
        let delivery = inbox.deliver(message, self.settings.max_messages);
        if let Some(keep_from) = delivery.trimmed_to {
            self.stats
                .dropped
                .get_or_create(&ReasonLabel { reason: "overflow" })
                .inc_by(delivery.dropped);
            self.engine.trim(&inbox.id, keep_from);
        }
    }

    /// Open a session's view of the inbox: queue `connected` (when `greet` is given) with the
    /// inbox position, then every message after `after` (default: the acknowledged position),
    /// and register the session for live delivery, all under the inbox's lock.
    pub fn attach(
        &self,
        inbox: &Inbox,
        conn: ConnId,
        outbox: &Arc<Outbox>,
        after: Option<u64>,
        greet: Option<&dyn Fn(InboxPosition) -> ServerFrame>,
    ) {
        let mut st = inbox.state.lock();
        st.touched_ms = now_ms();
        if let Some(greet) = greet {
            outbox.reply(&greet(st.position()));
        }
        let after = after.unwrap_or(st.acked);
        if let Some(c) = &st.cold {
            for m in c.messages.iter().filter(|m| m.seq > after) {
                outbox.push(Frame::reply(m.frame.clone()));
            }
        }
        st.sessions.insert(conn, outbox.clone());
        let acked = st.acked;
        if let Some(c) = st.cold.as_deref_mut() {
            // The terminal came: if it leaves again without acknowledging, wake it again.
            c.woken_for = acked;
            c.came = true;
        }
    }

    /// A session closed.
    pub fn detach(&self, inbox: &Inbox, conn: ConnId) {
        let mut st = inbox.state.lock();
        st.sessions.remove(conn);
        st.touched_ms = now_ms();
    }

    /// The terminal handled everything up to `seq`.
    pub fn ack(&self, inbox: &Inbox, seq: u64) {
        let mut st = inbox.state.lock();
        let Some(seq) = st.ack(seq) else {
            return;
        };
        st.touched_ms = now_ms();
        drop(st);
        self.engine.ack(&inbox.id, seq);
    }

    /// Record a verified keepalive. Persisted when the address changes, and every ten minutes.
    pub async fn keepalive(&self, id: &str, reg: WakeRegistration) -> Result<(), EngineError> {
        let inbox = self.get(id).await?;
        let mut st = inbox.state.lock();
        st.touched_ms = now_ms();
        let c = st.cold_mut();
        let changed = c
            .wake
            .is_none_or(|w| w.addr != reg.addr || w.size != reg.size);
        c.wake = Some(reg);
        c.wake_accepted = true;
        if changed || reg.ts.saturating_sub(c.wake_persisted_ms) > 600_000 {
            c.wake_persisted_ms = reg.ts;
            drop(st);
            self.engine.set_wake(id, &reg);
        }
        Ok(())
    }

    /// Several nodes: hand the service list's changes on this node to the others.
    pub fn share_presence(&self) {
        let changed = self.terminals.take_changed();
        if !changed.is_empty() {
            self.engine
                .share_terminals(changed, self.terminals.retention());
        }
    }

    /// What the other nodes know of each of `terminals` (nothing on one node).
    pub async fn presence_elsewhere(
        &self,
        terminals: &[String],
    ) -> Result<Vec<Vec<TerminalPresence>>, EngineError> {
        self.engine.terminals_elsewhere(terminals).await
    }

    /// Interruptions of `terminal`'s WebSocket sessions that other nodes saw within the flap
    /// window (0 on one node). Asked only when this node saw one too, so an ordinary connect
    /// reads nothing from the engine; behind a balancer that spreads a flapping terminal over
    /// N nodes, every node has seen one after at most N interruptions.
    pub async fn interruptions_elsewhere(&self, terminal: &str) -> u32 {
        if !self.engine.shares_terminals() || !self.terminals.interrupted(terminal) {
            return 0;
        }
        let since = now_ms().saturating_sub(self.terminals.flap_window().as_millis() as u64);
        match self
            .engine
            .terminals_elsewhere(&[terminal.to_owned()])
            .await
        {
            Ok(views) => views
                .iter()
                .flatten()
                .filter(|p| p.last_seen_ms >= since)
                .map(|p| p.interruptions)
                .sum(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read interruptions seen elsewhere");
                0
            }
        }
    }

    /// The inboxes this node holds in memory, and the unacknowledged messages they keep in
    /// all: the inbox backlog the admin page shows.
    pub fn backlog(&self) -> (u64, u64) {
        let inboxes: Vec<Arc<Inbox>> = self.map.lock().iter().map(|b| b.0.clone()).collect();
        let pending = inboxes.iter().map(|i| i.position().pending).sum();
        (inboxes.len() as u64, pending)
    }

    /// Terminals seen by any node within the retention (none on one node: the local list is
    /// all there is).
    pub async fn known_terminals(&self) -> Result<Vec<String>, EngineError> {
        self.engine.known_terminals().await
    }

    /// Whether the engine accepts this keepalive as newer than any accepted on any node (see
    /// [`InboxEngine::accept_keepalive`]).
    /// Also `false` for a keepalive that may have been captured before this process started
    /// and would move the terminal's registration (see "Replays across restarts").
    pub async fn accept_keepalive(
        &self,
        id: &str,
        reg: &WakeRegistration,
    ) -> Result<bool, EngineError> {
        if reg.ts <= self.replay_floor_ms && !self.engine.remembers_every_keepalive() {
            let inbox = self.get(id).await?;
            let st = inbox.state.lock();
            let moves = st.cold.as_deref().is_some_and(|c| {
                !c.wake_accepted
                    && c.wake
                        .is_some_and(|w| w.addr != reg.addr || w.size != reg.size)
            });
            drop(st);
            if moves {
                return Ok(false);
            }
        }
        self.engine.accept_keepalive(id, reg).await
    }

    /// The `ts` of the last keepalive accepted for `id` (loaded from the store if needed):
    /// a keepalive not newer than it is a replay.
    pub async fn last_keepalive_ts(&self, id: &str) -> Option<u64> {
        let inbox = self.get(id).await.ok()?;
        let st = inbox.state.lock();
        st.wake().map(|w| w.ts)
    }

    /// Upkeep: expire old messages, start wake episodes for offline terminals with waiting
    /// messages, and forget idle inboxes (they are reloaded from the store on demand).
    pub async fn tick(&self) {
        let now = now_ms();
        let ttl = self.settings.ttl.as_millis() as u64;
        let inboxes: Vec<Arc<Inbox>> = self.map.lock().iter().map(|i| i.0.clone()).collect();
        for inbox in inboxes {
            let (expired, keep_from, wake) = {
                let mut st = inbox.state.lock();
                let mut expired = 0;
                let mut keep_from = st.delivered + 1;
                if let Some(c) = st.cold.as_deref_mut() {
                    while c.messages.front().is_some_and(|m| m.ts + ttl < now) {
                        c.messages.pop_front();
                        expired += 1;
                    }
                    keep_from = c.messages.front().map_or(keep_from, |m| m.seq);
                }
                st.settle();
                let wake = st.sessions.is_empty()
                    && !st.waking()
                    && st.wake().is_some()
                    && st.unacked()
                    && st.cold.as_ref().is_some_and(|c| st.delivered > c.woken_for);
                (expired, keep_from, wake)
            };
            if expired > 0 {
                self.stats
                    .dropped
                    .get_or_create(&ReasonLabel { reason: "expired" })
                    .inc_by(expired);
                self.engine.trim(&inbox.id, keep_from);
            }
            if wake && !self.terminals.is_online(&inbox.id) {
                self.start_wake(&inbox).await;
            }
        }
        let engine = &self.engine;
        // At least twice the keepalive skew, see "Replays across restarts".
        let idle_ms = self
            .wake
            .as_ref()
            .map_or(0, |w| w.max_skew_ms().saturating_mul(2))
            .max(INBOX_IDLE_MS);
        self.map.lock().retain(|i| {
            let st = i.0.state.lock();
            let keep = !st.sessions.is_empty()
                || st.waking()
                || st.unacked()
                || now.saturating_sub(st.touched_ms) <= idle_ms;
            if !keep {
                engine.unwatch(&i.0.id);
            }
            keep
        });
    }

    /// Another node asks this one to wake `terminal` (this node received its keepalive).
    pub fn wake_requested(self: &Arc<Self>, terminal: &str) {
        let inboxes = self.clone();
        let terminal = terminal.to_owned();
        tokio::spawn(async move {
            match inboxes.get(&terminal).await {
                Ok(inbox) => {
                    inboxes.start_wake(&inbox).await;
                }
                Err(e) => tracing::warn!(error = %e, "cannot wake a terminal for another node"),
            }
        });
    }

    /// Send the first wake datagram now and repeat it in the background with back-off while
    /// the terminal stays offline and has unacknowledged messages. Returns whether the first
    /// datagram went out.
    async fn start_wake(&self, inbox: &Arc<Inbox>) -> bool {
        let Some(socket) = self.wake.clone() else {
            return false;
        };
        let (target, reg) = {
            let mut st = inbox.state.lock();
            let delivered = st.delivered;
            let Some(c) = st.cold.as_deref_mut() else {
                return false;
            };
            let Some(reg) = c.wake else {
                return false;
            };
            if c.waking {
                // An episode is running; it will see the newer seq on its next attempt.
                return true;
            }
            c.waking = true;
            c.came = false;
            (delivered, reg)
        };
        // If the caller's future is dropped while the first wake is being sent (its HTTP
        // client went away), the episode never starts: clear `waking`, or this terminal
        // would never be woken again.
        let episode = NotStarted(inbox);
        let sent = socket.wake(&inbox.id, target, &reg).await;
        std::mem::forget(episode);
        let inbox = inbox.clone();
        let terminals = self.terminals.clone();
        let settings = self.settings;
        tokio::spawn(async move {
            let mut delay = settings.wake_retry_first;
            let mut last_target = target;
            for _ in 0..settings.wake_retries {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(settings.wake_retry_max);
                let next = {
                    let st = inbox.state.lock();
                    if !st.sessions.is_empty() || !st.unacked() {
                        None
                    } else {
                        st.wake().map(|w| (st.delivered, w))
                    }
                };
                let Some((target, reg)) = next else { break };
                if terminals.is_online(&inbox.id) {
                    break;
                }
                last_target = target;
                socket.wake(&inbox.id, target, &reg).await;
            }
            let mut st = inbox.state.lock();
            if let Some(c) = st.cold.as_deref_mut() {
                c.waking = false;
                if !c.came {
                    // The terminal never came during this episode: do not wake it again for
                    // the same messages (only for newer ones, or once it has come and left).
                    c.woken_for = c.woken_for.max(last_target);
                }
            }
            st.settle();
        });
        sent
    }
}

/// What a delivery did.
#[derive(Debug, Default)]
struct Delivery {
    trimmed_to: Option<u64>,
    dropped: u64,
}

impl Inbox {
    fn new(id: Arc<str>, r: TerminalRecord) -> Inbox {
        let mut state = State {
            delivered: r.seq,
            acked: r.acked,
            touched_ms: now_ms(),
            sessions: Sessions::default(),
            cold: Some(Box::new(Cold {
                messages: r.inbox.into(),
                wake: r.wake,
                wake_persisted_ms: r.wake.map_or(0, |w| w.ts),
                ..Cold::default()
            })),
        };
        state.settle();
        Inbox {
            id,
            state: Mutex::new(state),
        }
    }

    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// Where the inbox stands now (see [`InboxPosition`]).
    pub fn position(&self) -> InboxPosition {
        self.state.lock().position()
    }

    fn view(&self) -> InboxView {
        let st = self.state.lock();
        InboxView {
            position: st.position(),
            wake_registered: st.wake().is_some(),
            last_keepalive_ms: st.wake().map(|w| w.ts),
        }
    }

    fn has_sessions(&self) -> bool {
        !self.state.lock().sessions.is_empty()
    }

    /// Deliver a message handed over by the engine: push it to every session, keep it until
    /// acknowledged, drop the oldest past `max_messages`. Inbox seqs come in order; a seq
    /// already delivered (the record loaded from the engine had it) is not delivered twice.
    fn deliver(&self, message: &InboxMessage, max_messages: usize) -> Delivery {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let mut out = Delivery::default();
        if message.seq <= st.delivered {
            return out;
        }
        st.delivered = message.seq;
        st.touched_ms = now_ms();
        let frame = Frame::reply(message.frame.clone());
        for o in st.sessions.outboxes() {
            o.push(frame.clone());
        }
        if message.seq > st.acked {
            let c = st.cold_mut();
            c.messages.push_back(message.clone());
            while c.messages.len() > max_messages {
                c.messages.pop_front();
                out.dropped += 1;
            }
            if out.dropped > 0 {
                out.trimmed_to = c.messages.front().map(|m| m.seq);
            }
        }
        st.settle();
        out
    }
}

/// Clears an inbox's `waking` flag when dropped: see [`Inboxes::start_wake`].
struct NotStarted<'a>(&'a Inbox);

impl Drop for NotStarted<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0.state.lock().cold.as_deref_mut() {
            c.waking = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::OutboxLimits;
    use bytes::Bytes;

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(
            OutboxLimits {
                soft_frames: 16,
                hard_bytes: 1 << 16,
            },
            Arc::default(),
        ))
    }

    fn registration() -> WakeRegistration {
        WakeRegistration {
            addr: "192.0.2.1:4000".parse().unwrap(),
            size: 64,
            ts: 1,
        }
    }

    /// Every connected terminal has an inbox, so these are bytes per connected terminal (they
    /// were 224 and 248, plus a ~90-byte hash map allocation for its one session).
    #[test]
    fn an_idle_inbox_is_small() {
        assert!(size_of::<State>() <= 48, "{}", size_of::<State>());
        assert!(size_of::<Inbox>() <= 72, "{}", size_of::<Inbox>());
        assert!(size_of::<Sessions>() <= 16);
        // One pointer per terminal in the map.
        assert_eq!(size_of::<ById>(), size_of::<usize>());

        let inbox = Inbox::new(Arc::from("t"), TerminalRecord::default());
        let mut st = inbox.state.lock();
        st.sessions.insert(1, outbox());
        assert_eq!(st.sessions.len(), 1);
        assert!(
            st.cold.is_none(),
            "nothing out of line for an idle terminal"
        );
        st.sessions.insert(1, outbox());
        assert_eq!(st.sessions.len(), 1, "same connection: replaced");
        st.sessions.insert(2, outbox());
        st.sessions.remove(1);
        assert_eq!(
            st.sessions.0.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
            [2]
        );
        st.sessions.remove(2);
        assert!(st.sessions.is_empty());
    }

    fn message(seq: u64) -> InboxMessage {
        InboxMessage {
            seq,
            ts: 5,
            frame: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn the_out_of_line_part_lives_while_it_holds_something() {
        let inbox = Inbox::new(Arc::from("t"), TerminalRecord::default());
        let d = inbox.deliver(&message(1), 10);
        assert_eq!(d.dropped, 0);
        {
            let st = inbox.state.lock();
            assert_eq!(st.delivered, 1);
            assert!(st.unacked());
        }
        assert_eq!(
            inbox.deliver(&message(1), 10).dropped,
            0,
            "a repeat is ignored"
        );
        inbox.deliver(&message(2), 10);
        let mut st = inbox.state.lock();
        assert_eq!(st.delivered, 2);
        assert_eq!(st.ack(1), Some(1));
        assert!(st.cold.is_some(), "message 2 is unacknowledged");
        assert_eq!(st.ack(1), None);
        assert_eq!(st.ack(9), Some(2), "capped at the delivered position");
        assert!(st.cold.is_none(), "freed once empty");

        // A wake registration keeps it, with no message buffers.
        st.cold_mut().wake = Some(registration());
        st.settle();
        assert!(st.cold.as_ref().is_some_and(|c| c.messages.capacity() == 0));
        drop(st);
        inbox.deliver(&message(3), 10);
        let mut st = inbox.state.lock();
        st.ack(3);
        let c = st.cold.as_ref().unwrap();
        assert!(c.wake.is_some() && c.messages.capacity() == 0);
        st.cold_mut().wake = None;
        st.settle();
        assert!(st.cold.is_none());
    }

    #[test]
    fn delivery_keeps_at_most_max_messages() {
        let inbox = Inbox::new(Arc::from("t"), TerminalRecord::default());
        for seq in 1..=3 {
            assert_eq!(
                inbox.deliver(&message(seq), 2).trimmed_to,
                None.or((seq == 3).then_some(2))
            );
        }
        assert_eq!(inbox.position().pending, 2);
    }

    #[test]
    fn a_loaded_inbox_keeps_what_the_store_had() {
        let empty = Inbox::new(
            Arc::from("a"),
            TerminalRecord {
                seq: 4,
                acked: 4,
                ..TerminalRecord::default()
            },
        );
        let st = empty.state.lock();
        assert!(st.cold.is_none());
        assert_eq!((st.delivered, st.acked), (4, 4));
        drop(st);

        let reg = registration();
        let loaded = Inbox::new(
            Arc::from("b"),
            TerminalRecord {
                seq: 4,
                acked: 3,
                inbox: vec![InboxMessage {
                    seq: 4,
                    ts: 1,
                    frame: Bytes::from_static(b"{}"),
                }],
                wake: Some(reg),
            },
        );
        let view = loaded.view();
        assert!(view.wake_registered);
        assert_eq!(view.last_keepalive_ms, Some(reg.ts));
        let st = loaded.state.lock();
        assert!(st.unacked());
        assert_eq!(st.cold.as_ref().map(|c| c.wake_persisted_ms), Some(reg.ts));
    }
}

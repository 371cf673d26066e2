//! One live room on this node: its members, its recent history, and the rule that makes joins
//! and deliveries race-free.
//!
//! A room delivers only what the engine hands the node (through its [`Feed`], which keeps the
//! order and repairs gaps). Everything that decides what a member sees happens under the
//! room's one lock: delivering a message (append to the history and to the room's
//! [`Ring`], which every member's outbox reads by position) and joining (compute the replay
//! from the history, register the member, and start its cursor at the ring's head). A
//! message is therefore either in the joiner's replay or delivered live to it, never both
//! and never neither. The history here is the node's copy of the engine's recent history; replays and
//! pulls are served from it.
//!
//! **Merge window** (`--merge-ms`, off by default). With it on, delivering a message does not
//! append it to the ring: the room gathers the frames it delivers (reliable and transient)
//! and, `window` after the first one, appends them as one shared chunk, so a very busy room
//! costs one ring entry (and one run in each member's write) per window rather than one per
//! message. A message can then be delivered (in history) yet not pushed, so under the same lock
//! everything that reads the history for a member or changes the members pushes the gathered
//! frames first: a join flushes before computing its replay (otherwise the joiner would get a
//! message in its replay and again from the flush), a pull before reading its page (otherwise
//! the answer would overtake the live copy), a control command or an epoch change right
//! after it is gathered (a close then clears the members behind it), and a leave hands the
//! leaving member what was gathered while it was one.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use livepush_proto::{Position, ServerFrame, encode_pulled};
use parking_lot::Mutex;

use super::feed::{Ask, Feed, Incoming, Step};
use crate::clock::now_ms;
use crate::control::Action;
use crate::engine::{History, Retention, Snapshot};
use crate::frame::{Frame, What};
use crate::metrics::MergeStats;
use crate::outbox::{ConnId, Outbox, OutboxLimits};
use crate::ring::Ring;
use crate::store::{RoomFlags, StoredMessage};

/// A connection that joined the room.
#[derive(Debug, Clone)]
pub struct Member {
    pub terminal: Arc<str>,
    pub outbox: Arc<Outbox>,
}

/// A delivered message still kept.
#[derive(Debug, Clone)]
struct Kept {
    seq: u64,
    ts: u64,
    frame: Frame,
}

#[derive(Debug)]
struct State {
    /// Order, gaps and the epoch; `feed.delivered()` is the last seq delivered here.
    feed: Feed,
    /// Delivered messages still kept, oldest first, contiguous seqs of the feed's epoch.
    history: VecDeque<Kept>,
    /// What is delivered live, which every member's outbox reads by position
    /// ([`crate::ring`]).
    ring: Arc<Ring>,
    members: HashMap<ConnId, Member>,
    /// Unique terminals: how many of a terminal's connections are members.
    terminals: HashMap<Arc<str>, u32>,
    /// Terminals that left but still count as online until the given time (ms): long-poll
    /// terminals between two polls.
    lingering: HashMap<Arc<str>, u64>,
    /// Online count last broadcast.
    online_sent: u64,
    /// The count across nodes, when the engine shares presence; else the local count is it.
    shared_online: Option<u64>,
    flags: RoomFlags,
    /// Frames delivered but not yet pushed to the members (merge window on).
    merged: Merged,
    /// Since when (ms) the room has had no member and nothing lingering; 0 while it has.
    idle_since: u64,
    /// The hub closed the room: it takes no members any more (a join finds a new one).
    retired: bool,
}

/// How much a room keeps for members that are behind, when not told (the defaults of
/// `--outbox-frames` and `--outbox-max-bytes`).
pub const DEFAULT_RING: OutboxLimits = OutboxLimits {
    soft_frames: 1024,
    hard_bytes: 8 << 20,
};

/// A room's merge window (`--merge-ms`): how long the messages it delivers are gathered
/// before they are pushed to the members as one chunk. See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct MergeWindow {
    /// How long frames are gathered after the first one. Zero: off, each message is pushed
    /// to every member at once.
    pub window: Duration,
    /// A chunk is pushed early once it holds this many bytes (the server uses
    /// `write_batch_bytes`, so that a chunk fits in one WebSocket write and far below the
    /// outbox's hard limit). A single larger frame goes alone.
    pub max_bytes: usize,
    pub stats: MergeStats,
}

#[derive(Debug, Default)]
struct Merged {
    settings: MergeWindow,
    /// Gathered frames, in delivery order.
    frames: Vec<Frame>,
    /// Length of `frames` joined with one separator byte between them.
    bytes: usize,
    /// Highest reliable seq among `frames`.
    top_seq: Option<u64>,
    /// A flush task is sleeping out the window (at most one per room).
    scheduled: bool,
}

/// What a join did.
#[derive(Debug)]
pub struct Joined {
    pub epoch: Arc<str>,
    pub seq: u64,
    pub recovered: bool,
    pub replayed: usize,
    pub prompted: bool,
}

/// A page of history.
#[derive(Debug)]
pub struct Page {
    pub epoch: Arc<str>,
    pub latest: u64,
    pub recovered: bool,
    pub messages: Vec<Frame>,
}

/// The room's public state.
#[derive(Debug, Clone)]
pub struct RoomInfo {
    pub epoch: Arc<str>,
    pub seq: u64,
    pub online: u64,
    pub flags: RoomFlags,
}

/// Why a join was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinError {
    Closed,
    /// The hub closed this room object (idle); the hub has a new one for the room.
    Retired,
}

/// Where a room reports its terminals coming and going, when the engine counts them across
/// nodes ([`crate::engine::Engine::presence`]). Called under the room's lock: it must not
/// block (the Redis engine hands the update to a task).
pub type Presence = Arc<dyn crate::engine::Engine>;

#[derive(Debug)]
pub struct Room {
    pub id: Arc<str>,
    /// Shared with the merge window's flush task.
    state: Arc<Mutex<State>>,
    /// Held by whoever opens the room through the engine; the others wait for it.
    pub(super) opening: tokio::sync::Mutex<()>,
    /// Set when the engine counts terminals across nodes.
    presence: Option<Presence>,
}

impl Room {
    /// A room waiting for its first snapshot ([`Room::open`]); with a merge window (off when
    /// `merge.window` is zero).
    pub fn loading(id: Arc<str>, merge: MergeWindow) -> Room {
        Room::loading_with(id, merge, DEFAULT_RING, None)
    }

    /// [`Room::loading`] with a ring of the members' outbox limits (how far behind a member
    /// may fall before it is prompted: `--outbox-frames`, `--outbox-max-bytes`), reporting
    /// its terminals to an engine that counts them across nodes.
    pub fn loading_with(
        id: Arc<str>,
        merge: MergeWindow,
        ring: OutboxLimits,
        presence: Option<Presence>,
    ) -> Room {
        Room {
            id,
            state: Arc::new(Mutex::new(State {
                feed: Feed::loading(),
                history: VecDeque::new(),
                ring: Arc::new(Ring::new(ring.soft_frames, ring.hard_bytes)),
                members: HashMap::new(),
                terminals: HashMap::new(),
                lingering: HashMap::new(),
                online_sent: 0,
                shared_online: None,
                flags: RoomFlags::default(),
                merged: Merged {
                    settings: merge,
                    ..Merged::default()
                },
                idle_since: 0,
                retired: false,
            })),
            opening: tokio::sync::Mutex::new(()),
            presence,
        }
    }

    /// A terminal became present in the room on this node, or left it.
    fn report(&self, terminal: &str, present: bool) {
        if let Some(engine) = &self.presence {
            engine.presence(&self.id, terminal, present);
        }
    }

    /// Whether the room has its first snapshot (members may join).
    pub fn is_open(&self) -> bool {
        !self.state.lock().feed.is_loading()
    }

    /// The first snapshot from the engine: position, flags and kept history. Events that
    /// arrived meanwhile follow.
    pub fn open(&self, s: Snapshot, shared_online: bool, retention: Retention) -> Option<Ask> {
        let mut st = self.state.lock();
        let mut steps = Vec::new();
        st.history = s
            .history
            .into_iter()
            .map(|m| Kept {
                seq: m.seq,
                ts: m.ts,
                frame: Frame::reliable(self.id.clone(), m.seq, m.frame),
            })
            .collect();
        st.flags = s.flags;
        st.shared_online = shared_online.then_some(s.online);
        let ask = st.feed.loaded(s.epoch, s.seq, &mut steps);
        self.apply(&mut st, steps, retention);
        ask
    }

    /// A reliable message from the engine.
    pub fn on_reliable(
        &self,
        epoch: &str,
        message: StoredMessage,
        action: Option<Action>,
        retention: Retention,
    ) -> Option<Ask> {
        let mut st = self.state.lock();
        let mut steps = Vec::new();
        // The room's own epoch string when it is the current one: no allocation per message.
        let epoch = if **st.feed.epoch() == *epoch {
            st.feed.epoch().clone()
        } else {
            Arc::from(epoch)
        };
        let m = Incoming {
            epoch,
            message,
            action,
        };
        let ask = st.feed.message(m, &mut steps);
        self.apply(&mut st, steps, retention);
        ask
    }

    /// The engine says the room's history goes on in `epoch` after `seq`.
    pub fn on_epoch(&self, epoch: &str, seq: u64) -> Option<Ask> {
        self.state.lock().feed.epoch_changed(epoch, seq)
    }

    /// The answer to [`Ask::Read`].
    pub fn on_history(&self, h: History, retention: Retention) -> Option<Ask> {
        let mut st = self.state.lock();
        let mut steps = Vec::new();
        let ask = st.feed.read(h, &mut steps);
        self.apply(&mut st, steps, retention);
        ask
    }

    /// The answer to [`Ask::Snapshot`].
    pub fn on_snapshot(&self, s: Snapshot, retention: Retention) -> Option<Ask> {
        let mut st = self.state.lock();
        let mut steps = Vec::new();
        if st.shared_online.is_some() {
            st.shared_online = Some(s.online);
        }
        let ask = st.feed.snapshot(s, &mut steps);
        self.apply(&mut st, steps, retention);
        ask
    }

    /// The link to the engine's stream was lost and is back.
    pub fn on_lost(&self) -> Option<Ask> {
        self.state.lock().feed.lost()
    }

    /// The engine's stream of the room is (re)established: read what it may have missed.
    pub fn on_subscribed(&self) -> Option<Ask> {
        self.state.lock().feed.subscribed()
    }

    /// An ask could not be answered: the room's upkeep asks again.
    pub fn on_failed(&self) {
        self.state.lock().feed.failed();
    }

    /// The online count across nodes (engines that share presence).
    pub fn on_online(&self, count: u64) {
        let mut st = self.state.lock();
        if st.shared_online.is_some() {
            st.shared_online = Some(count);
        }
    }

    /// Carry out what the feed decided.
    fn apply(&self, st: &mut State, steps: Vec<Step>, retention: Retention) {
        for step in steps {
            match step {
                Step::Deliver(m) => self.deliver(st, m, retention),
                Step::Restart { epoch, seq } => self.restart(st, epoch, seq),
            }
        }
    }

    /// Append to the history, append to the ring (or gather it, with the merge window on),
    /// apply a control action.
    fn deliver(&self, st: &mut State, m: Incoming, retention: Retention) {
        let seq = m.message.seq;
        let frame = Frame::reliable(self.id.clone(), seq, m.message.frame);
        st.history.push_back(Kept {
            seq,
            ts: m.message.ts,
            frame: frame.clone(),
        });
        while st.history.len() > retention.max_messages {
            st.history.pop_front();
        }
        if st.merging() {
            self.gather(st, frame, Some(seq));
        } else if !st.members.is_empty() {
            st.ring.append(frame);
        }
        if let Some(action) = m.action {
            // Control commands are rare and should take effect at once: push what was
            // gathered, this command last, before the room changes (a close clears the
            // members right below, behind the messages before it).
            st.flush_merged(&self.id);
            if action == Action::Close {
                let left = Frame::of(&ServerFrame::Left {
                    id: None,
                    room: self.id.to_string(),
                });
                for member in st.members.values() {
                    member.outbox.push(left.clone());
                    member.outbox.unsubscribe(&st.ring);
                }
                st.members.clear();
                let gone: Vec<Arc<str>> = st
                    .terminals
                    .drain()
                    .map(|(t, _)| t)
                    .chain(st.lingering.drain().map(|(t, _)| t))
                    .collect();
                for t in gone {
                    self.report(&t, false);
                }
            }
            st.flags = action.apply(st.flags);
        }
    }

    /// The history was lost or reset: every member is told, as after a resume that failed
    /// (contract v1.1, decision 8), and goes on from `seq` in `epoch`.
    fn restart(&self, st: &mut State, epoch: Arc<str>, seq: u64) {
        st.flush_merged(&self.id);
        st.history.clear();
        let joined = Frame::of(&ServerFrame::Joined {
            id: None,
            room: self.id.to_string(),
            epoch: epoch.to_string(),
            seq,
            recovered: false,
            online: st.online(),
        });
        for member in st.members.values() {
            member.outbox.push(joined.clone());
        }
    }

    /// Deliver a transient frame to every member (dropped for members that fell more than
    /// the ring's capacity behind). Returns how many members it was delivered to: drops are
    /// only known when each member reads it.
    pub fn broadcast_transient(&self, frame: &Frame) -> usize {
        let mut st = self.state.lock();
        let members = st.members.len();
        if st.merging() {
            self.gather(&mut st, frame.clone(), None);
        } else if members > 0 {
            st.ring.append(frame.clone());
        }
        members
    }

    /// Gather a delivered frame for the current members (merge window on): push the gathered
    /// chunk first if this frame would take it past its byte cap, push it at once when it
    /// reaches the cap, and otherwise make sure a flush is scheduled. Nothing is gathered for
    /// a room without members: a later joiner gets reliable messages from history, and
    /// transient ones are live-only.
    fn gather(&self, st: &mut State, frame: Frame, seq: Option<u64>) {
        if st.members.is_empty() {
            return;
        }
        let max_bytes = st.merged.settings.max_bytes;
        if !st.merged.frames.is_empty() && st.merged.bytes + 1 + frame.len() > max_bytes {
            st.flush_merged(&self.id);
        }
        let m = &mut st.merged;
        m.bytes += frame.len() + usize::from(!m.frames.is_empty());
        m.frames.push(frame);
        if seq.is_some() {
            m.top_seq = seq;
        }
        if m.bytes >= max_bytes {
            st.flush_merged(&self.id);
        } else if !m.scheduled {
            m.scheduled = self.schedule_flush(m.settings.window);
            if !m.scheduled {
                // No runtime to sleep on (only outside the server): push at once.
                st.flush_merged(&self.id);
            }
        }
    }

    /// Start the task that flushes the gathered frames `window` from now. Frames gathered
    /// while it sleeps ride along, so one task per room at a time is enough and no frame
    /// waits longer than `window`. Returns false when there is no Tokio runtime.
    fn schedule_flush(&self, window: Duration) -> bool {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let state = Arc::clone(&self.state);
        let id = self.id.clone();
        runtime.spawn(async move {
            tokio::time::sleep(window).await;
            let mut st = state.lock();
            st.merged.scheduled = false;
            st.flush_merged(&id);
        });
        true
    }

    /// Join: reply `joined`, replay what the member missed (as much as fits in its outbox,
    /// then a `prompt`), and register it for live delivery, all under one lock.
    ///
    /// With [`Announce::UnlessResumed`] (long-poll, where every poll re-attaches), a resume
    /// that is complete in the same epoch sends no `joined`, only the messages after `since`.
    pub fn join(
        &self,
        conn: ConnId,
        member: Member,
        since: Option<&Position>,
        request_id: Option<u64>,
        announce: Announce,
    ) -> Result<Joined, JoinError> {
        let mut st = self.state.lock();
        // First push what was gathered to the members so far: the joiner is not one of them
        // yet, and its replay below covers those messages from history. Flushing after the
        // insert would send it them twice.
        st.flush_merged(&self.id);
        if st.retired {
            return Err(JoinError::Retired);
        }
        if st.flags.closed {
            return Err(JoinError::Closed);
        }
        let (recovered, from) = match since {
            None => (true, None),
            Some(p) => {
                let (recovered, from) = st.resume_from(p);
                (recovered, Some(from))
            }
        };
        if st.members.insert(conn, member.clone()).is_none() {
            let n = st.terminals.entry(member.terminal.clone()).or_default();
            *n += 1;
            let first = *n == 1;
            let lingered = st.lingering.remove(&member.terminal).is_some();
            if first && !lingered {
                self.report(&member.terminal, true);
            }
        }
        let epoch = st.feed.epoch().clone();
        let delivered = st.feed.delivered();
        let quiet = announce == Announce::UnlessResumed && since.is_some() && recovered;
        if !quiet {
            member.outbox.push(Frame::of(&ServerFrame::Joined {
                id: request_id,
                room: self.id.to_string(),
                epoch: epoch.to_string(),
                seq: delivered,
                recovered,
                online: st.online(),
            }));
        }
        let mut replayed = 0;
        let mut prompted = false;
        if let Some(from) = from {
            // A replay takes at most the free frame slots and half the free bytes of the
            // outbox, so that it can never push the connection over its hard limit; the rest
            // is announced with a `prompt` and pulled. Its first message goes whatever the
            // soft limit says (if the hard limit lets it): every join moves its terminal
            // forward, also an SSE stream's, which cannot pull and is resumed by a new join
            // (with a soft limit below the `joined` frames a join queues, a replay would
            // otherwise be empty at every reconnect).
            let mut slots = member.outbox.free_slots();
            let mut bytes = member.outbox.free_bytes() / 2;
            for m in st.history.iter().filter(|m| m.seq >= from) {
                let first = replayed == 0 && m.frame.len() <= member.outbox.free_bytes();
                if !first && (slots == 0 || m.frame.len() > bytes) {
                    member.outbox.prompt(&self.id, delivered);
                    prompted = true;
                    break;
                }
                if first {
                    member.outbox.push_past_soft_limit(m.frame.clone());
                } else {
                    member.outbox.push(m.frame.clone());
                }
                replayed += 1;
                slots = slots.saturating_sub(1);
                bytes = bytes.saturating_sub(m.frame.len());
            }
        }
        // Live delivery from here on: after the replay, which holds everything up to now.
        member.outbox.subscribe(&self.id, &st.ring);
        Ok(Joined {
            epoch,
            seq: delivered,
            recovered,
            replayed,
            prompted,
        })
    }

    /// Remove a member. Returns whether it was one.
    pub fn leave(&self, conn: ConnId) -> bool {
        self.leave_until(conn, None)
    }

    /// Remove a member but keep its terminal in the online count until `until_ms` (a
    /// long-poll terminal between two polls).
    pub fn leave_until(&self, conn: ConnId, until_ms: Option<u64>) -> bool {
        let mut st = self.state.lock();
        let Some(m) = st.members.remove(&conn) else {
            return false;
        };
        // What was delivered while it was a member still reaches it, before whatever follows
        // the leave (`left`); the other members keep gathering. A leave does not cut the
        // window short for everyone.
        if let Some(chunk) = st.merged_chunk(&self.id) {
            m.outbox.push(chunk);
        }
        m.outbox.unsubscribe(&st.ring);
        let mut last = false;
        if let Some(n) = st.terminals.get_mut(&m.terminal) {
            *n -= 1;
            if *n == 0 {
                st.terminals.remove(&m.terminal);
                last = true;
            }
        }
        match until_ms {
            Some(until) => {
                st.lingering.insert(m.terminal, until);
            }
            None if last => self.report(&m.terminal, false),
            None => {}
        }
        true
    }

    /// The terminal said `bye` over long-polling: it no longer lingers in the online count
    /// (it still counts while another connection of it is a member).
    pub fn stop_lingering(&self, terminal: &str) {
        let mut st = self.state.lock();
        if st.lingering.remove(terminal).is_some() && !st.terminals.contains_key(terminal) {
            self.report(terminal, false);
        }
    }

    /// Close the room for good if it is still idle: it takes no member any more. Returns
    /// whether it did (the hub then forgets it and closes it in the engine).
    pub fn retire(&self) -> bool {
        let mut st = self.state.lock();
        if st.members.is_empty() && st.lingering.is_empty() && st.merged.frames.is_empty() {
            st.retired = true;
        }
        st.retired
    }

    pub fn is_retired(&self) -> bool {
        self.state.lock().retired
    }

    pub fn is_member(&self, conn: ConnId) -> bool {
        self.state.lock().members.contains_key(&conn)
    }

    /// Reliable messages with `seq > since`: at most `limit`, and no more than `max_bytes`
    /// of frames (but always at least one). `recovered` is true when nothing between `since`
    /// and the first returned message is missing; a `since` beyond the latest seq is not
    /// recovered (the caller saw messages this history does not have).
    pub fn page(&self, since: u64, limit: usize, max_bytes: usize) -> Page {
        self.state.lock().page(since, limit, max_bytes)
    }

    /// Encode a `pulled` answer. The caller queues it to the puller's outbox.
    pub fn pulled(
        &self,
        since: u64,
        limit: usize,
        max_bytes: usize,
        request_id: Option<u64>,
    ) -> Frame {
        let page = {
            let mut st = self.state.lock();
            // Push what was gathered first, so that the live copies of the messages on this
            // page are queued before the answer, as they would be without a merge window.
            st.flush_merged(&self.id);
            st.page(since, limit, max_bytes)
        };
        let messages: Vec<&[u8]> = page.messages.iter().flat_map(Frame::parts).collect();
        Frame::reply(encode_pulled(
            request_id,
            &self.id,
            &page.epoch,
            page.latest,
            page.recovered,
            &messages,
        ))
    }

    pub fn info(&self) -> RoomInfo {
        let st = self.state.lock();
        RoomInfo {
            epoch: st.feed.epoch().clone(),
            seq: st.feed.delivered(),
            online: st.online(),
            flags: st.flags,
        }
    }

    pub fn flags(&self) -> RoomFlags {
        self.state.lock().flags
    }

    /// Reliable messages this node keeps of the room (its history cache), and its members on
    /// this node: what the admin page shows ([`crate::admin`]).
    pub fn depth(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.history.len(), st.members.len())
    }

    /// Periodic upkeep: broadcast the online count if it changed since the last broadcast,
    /// drop history older than the ttl, and say whether the room is idle (no member, nothing
    /// pending) and what to ask the engine again if an ask failed.
    pub fn tick(&self, now_ms: u64, retention: Retention) -> Tick {
        let mut st = self.state.lock();
        let mut out = Tick::default();
        let State {
            lingering,
            terminals,
            ..
        } = &mut *st;
        lingering.retain(|t, until| {
            let keep = *until > now_ms;
            if !keep && !terminals.contains_key(t) {
                self.report(t, false);
            }
            keep
        });
        let online = st.online();
        if online != st.online_sent {
            st.online_sent = online;
            let frame = Frame::of(&ServerFrame::Online {
                room: self.id.to_string(),
                count: online,
            });
            for m in st.members.values() {
                m.outbox.push(frame.clone());
            }
            out.online_broadcast = true;
        }
        let cutoff = now_ms.saturating_sub(retention.ttl.as_millis() as u64);
        while st.history.front().is_some_and(|m| m.ts < cutoff) {
            st.history.pop_front();
        }
        out.idle = st.members.is_empty() && st.lingering.is_empty() && st.merged.frames.is_empty();
        if !out.idle {
            st.idle_since = 0;
        } else if st.idle_since == 0 {
            st.idle_since = now_ms;
        }
        out.idle_ms = if out.idle {
            now_ms.saturating_sub(st.idle_since)
        } else {
            0
        };
        out.ask = st.feed.retry();
        out
    }
}

/// What a [`Room::tick`] found.
#[derive(Debug, Default)]
pub struct Tick {
    pub online_broadcast: bool,
    pub idle: bool,
    /// How long the room has been idle (ms).
    pub idle_ms: u64,
    /// An ask to send the engine again (the previous one failed).
    pub ask: Option<Ask>,
}

/// Whether a join answers with `joined` (see [`Room::join`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    Always,
    UnlessResumed,
}

impl State {
    fn first_kept(&self) -> u64 {
        self.history
            .front()
            .map_or(self.feed.delivered() + 1, |m| m.seq)
    }

    /// See [`Room::page`].
    fn page(&self, since: u64, limit: usize, max_bytes: usize) -> Page {
        let delivered = self.feed.delivered();
        let recovered =
            since <= delivered && (since == delivered || since + 1 >= self.first_kept());
        let mut bytes = 0;
        let messages = self
            .history
            .iter()
            .filter(|m| m.seq > since)
            .take(limit)
            .take_while(|m| {
                bytes += m.frame.len();
                bytes == m.frame.len() || bytes <= max_bytes
            })
            .map(|m| m.frame.clone())
            .collect();
        Page {
            epoch: self.feed.epoch().clone(),
            latest: delivered,
            recovered,
            messages,
        }
    }

    fn merging(&self) -> bool {
        !self.merged.settings.window.is_zero()
    }

    /// The gathered frames as one chunk, which keeps the soft limit's rules: a chunk with
    /// reliable messages is reliable up to the highest of them (past the soft limit it folds
    /// into a `prompt` up to that seq, and the terminal pulls them all), a chunk of transient
    /// messages only is transient (dropped past the soft limit).
    fn merged_chunk(&self, room: &Arc<str>) -> Option<Frame> {
        if self.merged.frames.is_empty() {
            return None;
        }
        let what = match self.merged.top_seq {
            Some(seq) => What::Reliable {
                room: room.clone(),
                seq,
            },
            None => What::Transient,
        };
        Some(Frame::chunk(what, self.merged.frames.clone()))
    }

    /// Push the gathered frames to every member as one chunk and empty the buffer. A no-op
    /// when nothing is gathered (always, with the merge window off).
    fn flush_merged(&mut self, room: &Arc<str>) {
        let Some(chunk) = self.merged_chunk(room) else {
            return;
        };
        self.ring.append(chunk);
        let merged = &mut self.merged;
        merged.settings.stats.flushes.inc();
        merged
            .settings
            .stats
            .frames
            .inc_by(merged.frames.len() as u64);
        merged.frames.clear();
        merged.bytes = 0;
        merged.top_seq = None;
    }

    /// Unique terminals: members, plus those lingering after their last poll (or the count
    /// across nodes, when the engine shares presence).
    fn online(&self) -> u64 {
        if let Some(n) = self.shared_online {
            return n;
        }
        let now = now_ms();
        let lingering = self
            .lingering
            .iter()
            .filter(|(t, until)| **until > now && !self.terminals.contains_key(*t))
            .count();
        (self.terminals.len() + lingering) as u64
    }

    /// Decide where a resume from `p` starts and whether it is complete.
    fn resume_from(&self, p: &Position) -> (bool, u64) {
        let delivered = self.feed.delivered();
        let first_kept = self.first_kept();
        if *p.epoch != **self.feed.epoch() {
            // Another history: nothing can be trusted; replay all that is kept.
            return (false, first_kept);
        }
        if p.seq > delivered {
            // The terminal saw messages this history does not have (the server lost them):
            // it cannot be told it has everything.
            return (false, delivered + 1);
        }
        let from = p.seq + 1;
        (from >= first_kept, from.max(first_kept))
    }
}

#[cfg(test)]
mod tests;

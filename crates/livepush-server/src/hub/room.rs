//! One live room: its sequence, its history, its members, and the rule that makes joins and
//! publishes race-free.
//!
//! Everything that decides what a member sees happens under the room's one lock: delivering a
//! message (append to history + push to every member's outbox) and joining (compute the replay
//! from history + register the member). A publish is therefore either in the joiner's replay
//! or delivered live to it, never both and never neither.
//!
//! A reliable publish takes the lock twice. First to take the next `seq` and hand the message
//! to the store (in `seq` order); then, once the store says it is durable, to deliver every
//! pending message up to that `seq`. Whoever's write completes first delivers on behalf of
//! those before it, so delivery is strictly in `seq` order and never waits on the disk longer
//! than the publish answer does.
//!
//! **Merge window** (`--merge-ms`, off by default). With it on, delivering a message does not
//! push it to each member: the room gathers the frames it delivers (reliable and transient)
//! and, `window` after the first one, pushes them to every member as one shared chunk (frames
//! joined by `\n`), so a very busy room costs one outbox push per member per window rather
//! than one per message. A message can then be delivered (in history) yet not pushed, so
//! under the same lock everything that reads the history for a member or changes the members
//! pushes the gathered frames first: a join flushes before computing its replay (otherwise
//! the joiner would get a message in its replay and again from the flush), a pull before
//! reading its page (otherwise the answer would overtake the live copy), a control command
//! right after it is gathered (a close then clears the members behind it), and a leave hands
//! the leaving member what was gathered while it was one.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use livepush_proto::{Position, ServerFrame, encode_frame, encode_msg, encode_pulled, join_frames};
use parking_lot::Mutex;
use serde_json::value::RawValue;

use super::control::Action;
use crate::clock::now_ms;
use crate::metrics::MergeStats;
use crate::outbox::{ConnId, Kind, Outbox, Pushed};
use crate::store::{Durable, HistoryStore, RoomFlags, RoomRecord, StoredMessage};

/// A connection that joined the room.
#[derive(Debug, Clone)]
pub struct Member {
    pub terminal: Arc<str>,
    pub outbox: Arc<Outbox>,
}

#[derive(Debug)]
struct Pending {
    message: StoredMessage,
    action: Option<Action>,
}

#[derive(Debug)]
struct State {
    epoch: Arc<str>,
    /// Last seq handed out.
    assigned: u64,
    /// Last seq delivered (durable and visible). Replays, pulls and `joined` speak of this.
    delivered: u64,
    /// Sequenced messages waiting for the store, in seq order.
    pending: VecDeque<Pending>,
    /// Delivered messages still kept, oldest first, contiguous seqs.
    history: VecDeque<StoredMessage>,
    /// Oldest seq the store still keeps (what we last asked it to trim to).
    store_keep_from: u64,
    members: HashMap<ConnId, Member>,
    /// Unique terminals: how many of a terminal's connections are members.
    terminals: HashMap<Arc<str>, u32>,
    /// Terminals that left but still count as online until the given time (ms): long-poll
    /// terminals between two polls.
    lingering: HashMap<Arc<str>, u64>,
    /// Online count last broadcast.
    online_sent: u64,
    flags: RoomFlags,
    /// Frames delivered but not yet pushed to the members (merge window on).
    merged: Merged,
}

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
    frames: Vec<Bytes>,
    /// Length of `frames` joined with `\n`.
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
    pub messages: Vec<Bytes>,
}

/// The room's public state (`GET /v1/rooms/{room}`).
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
}

/// Bounds of the history.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_messages: usize,
    pub ttl: Duration,
}

#[derive(Debug)]
pub struct Room {
    pub id: Arc<str>,
    /// Shared with the merge window's flush task.
    state: Arc<Mutex<State>>,
}

impl Room {
    /// A room that pushes every message at once (no merge window).
    pub fn new(id: Arc<str>, record: RoomRecord) -> Room {
        Room::with_merge(id, record, MergeWindow::default())
    }

    /// A room with a merge window (off when `merge.window` is zero).
    pub fn with_merge(id: Arc<str>, record: RoomRecord, merge: MergeWindow) -> Room {
        let first = record
            .history
            .first()
            .map(|m| m.seq)
            .unwrap_or(record.seq + 1);
        Room {
            id,
            state: Arc::new(Mutex::new(State {
                epoch: Arc::from(record.epoch),
                assigned: record.seq,
                delivered: record.seq,
                pending: VecDeque::new(),
                history: record.history.into(),
                store_keep_from: first,
                members: HashMap::new(),
                terminals: HashMap::new(),
                lingering: HashMap::new(),
                online_sent: 0,
                flags: record.flags,
                merged: Merged {
                    settings: merge,
                    ..Merged::default()
                },
            })),
        }
    }

    /// Take the next seq for a reliable message and submit it to the store. The message is not
    /// visible until [`Room::deliver_through`] is called with its seq.
    pub fn sequence(
        &self,
        ty: &str,
        data: &RawValue,
        ts: u64,
        action: Option<Action>,
        store: &dyn HistoryStore,
    ) -> (u64, Arc<str>, Durable) {
        let mut st = self.state.lock();
        st.assigned += 1;
        let seq = st.assigned;
        let message = StoredMessage {
            seq,
            ts,
            frame: encode_msg(&self.id, ty, data, Some(seq), ts),
        };
        let durable = store.append(&self.id, &message);
        st.pending.push_back(Pending { message, action });
        (seq, st.epoch.clone(), durable)
    }

    /// Deliver every pending message with `seq <= through`, in order: append to history,
    /// push to every member (or gather it, with the merge window on), apply control actions.
    /// Returns a store write to run in the background when a control action changed the
    /// room's flags.
    pub fn deliver_through(
        &self,
        through: u64,
        retention: Retention,
        store: &dyn HistoryStore,
    ) -> Option<Durable> {
        let mut st = self.state.lock();
        let mut flags_write = None;
        let merging = st.merging();
        while st.pending.front().is_some_and(|p| p.message.seq <= through) {
            let Some(p) = st.pending.pop_front() else {
                break;
            };
            let seq = p.message.seq;
            let frame = p.message.frame.clone();
            st.delivered = seq;
            st.history.push_back(p.message);
            while st.history.len() > retention.max_messages {
                st.history.pop_front();
            }
            if merging {
                self.gather(&mut st, frame, Some(seq));
            } else {
                for m in st.members.values() {
                    m.outbox.push(
                        frame.clone(),
                        Kind::Reliable {
                            room: &self.id,
                            seq,
                        },
                    );
                }
            }
            if let Some(action) = p.action {
                // Control commands are rare and should take effect at once: push what was
                // gathered, this command last, before the room changes (a close clears the
                // members right below, behind the messages before it).
                st.flush_merged(&self.id);
                let before = st.flags;
                match action {
                    Action::Close => {
                        st.flags.closed = true;
                        let left = encode_frame(&ServerFrame::Left {
                            id: None,
                            room: self.id.to_string(),
                        });
                        for m in st.members.values() {
                            m.outbox.push(left.clone(), Kind::Reply);
                        }
                        st.members.clear();
                        st.terminals.clear();
                        st.lingering.clear();
                    }
                    Action::Open => st.flags.closed = false,
                    Action::Mute => st.flags.muted = true,
                    Action::Unmute => st.flags.muted = false,
                    Action::StreamSwitch => {}
                }
                if st.flags != before {
                    flags_write = Some(store.set_flags(&self.id, st.flags));
                }
            }
        }
        flags_write
    }

    /// Push a transient frame to every member (dropped for members past their soft limit).
    /// Returns how many queued it; with the merge window on, how many it was gathered for
    /// (drops at the soft limit are only known when the chunk is pushed).
    pub fn broadcast_transient(&self, frame: &Bytes) -> usize {
        let mut st = self.state.lock();
        if st.merging() {
            let members = st.members.len();
            self.gather(&mut st, frame.clone(), None);
            return members;
        }
        let mut delivered = 0;
        for m in st.members.values() {
            if m.outbox.push(frame.clone(), Kind::Transient) == Pushed::Queued {
                delivered += 1;
            }
        }
        delivered
    }

    /// Gather a delivered frame for the current members (merge window on): push the gathered
    /// chunk first if this frame would take it past its byte cap, push it at once when it
    /// reaches the cap, and otherwise make sure a flush is scheduled. Nothing is gathered for
    /// a room without members: a later joiner gets reliable messages from history, and
    /// transient ones are live-only.
    fn gather(&self, st: &mut State, frame: Bytes, seq: Option<u64>) {
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
            *st.terminals.entry(member.terminal.clone()).or_default() += 1;
        }
        let quiet = announce == Announce::UnlessResumed && since.is_some() && recovered;
        if !quiet {
            let joined = ServerFrame::Joined {
                id: request_id,
                room: self.id.to_string(),
                epoch: st.epoch.to_string(),
                seq: st.delivered,
                recovered,
                online: st.online(),
            };
            member.outbox.reply(&joined);
        }
        let mut replayed = 0;
        let mut prompted = false;
        if let Some(from) = from {
            // A replay takes at most the free frame slots and half the free bytes of the
            // outbox, so that it can never push the connection over its hard limit; the rest
            // is announced with a `prompt` and pulled.
            let mut slots = member.outbox.free_slots();
            let mut bytes = member.outbox.free_bytes() / 2;
            for m in st.history.iter().filter(|m| m.seq >= from) {
                if slots == 0 || m.frame.len() > bytes {
                    member.outbox.prompt(&self.id, st.delivered);
                    prompted = true;
                    break;
                }
                member.outbox.push(m.frame.clone(), Kind::Reply);
                replayed += 1;
                slots -= 1;
                bytes -= m.frame.len();
            }
        }
        Ok(Joined {
            epoch: st.epoch.clone(),
            seq: st.delivered,
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
        if let Some((chunk, kind)) = st.merged_chunk(&self.id) {
            m.outbox.push(chunk, kind);
        }
        if let Some(n) = st.terminals.get_mut(&m.terminal) {
            *n -= 1;
            if *n == 0 {
                st.terminals.remove(&m.terminal);
            }
        }
        if let Some(until) = until_ms {
            st.lingering.insert(m.terminal, until);
        }
        true
    }

    /// The terminal said `bye` over long-polling: it no longer lingers in the online count
    /// (it still counts while another connection of it is a member).
    pub fn stop_lingering(&self, terminal: &str) {
        self.state.lock().lingering.remove(terminal);
    }

    pub fn is_member(&self, conn: ConnId) -> bool {
        self.state.lock().members.contains_key(&conn)
    }

    /// Reliable messages with `seq > since`: at most `limit`, and no more than `max_bytes`
    /// of frames (but always at least one). `recovered` is true when nothing between `since`
    /// and the first returned message is missing; a `since` beyond the latest seq is not
    /// recovered (the caller saw messages this history does not have). The history API reads
    /// this directly; it involves no member, so the merge window does not matter to it.
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
    ) -> Bytes {
        let page = {
            let mut st = self.state.lock();
            // Push what was gathered first, so that the live copies of the messages on this
            // page are queued before the answer, as they would be without a merge window.
            st.flush_merged(&self.id);
            st.page(since, limit, max_bytes)
        };
        encode_pulled(
            request_id,
            &self.id,
            &page.epoch,
            page.latest,
            page.recovered,
            &page.messages,
        )
    }

    pub fn info(&self) -> RoomInfo {
        let st = self.state.lock();
        RoomInfo {
            epoch: st.epoch.clone(),
            seq: st.delivered,
            online: st.online(),
            flags: st.flags,
        }
    }

    pub fn flags(&self) -> RoomFlags {
        self.state.lock().flags
    }

    /// Periodic upkeep: broadcast the online count if it changed since the last broadcast,
    /// drop history older than the ttl, and tell the caller up to where the store may trim.
    pub fn tick(&self, now_ms: u64, retention: Retention) -> Tick {
        let mut st = self.state.lock();
        let mut out = Tick::default();
        st.lingering.retain(|_, until| *until > now_ms);
        let online = st.online();
        if online != st.online_sent {
            st.online_sent = online;
            let frame = encode_frame(&ServerFrame::Online {
                room: self.id.to_string(),
                count: online,
            });
            for m in st.members.values() {
                m.outbox.push(frame.clone(), Kind::Ambient);
            }
            out.online_broadcast = true;
        }
        let cutoff = now_ms.saturating_sub(retention.ttl.as_millis() as u64);
        while st.history.front().is_some_and(|m| m.ts < cutoff) {
            st.history.pop_front();
        }
        let keep_from = st.history.front().map_or(st.delivered + 1, |m| m.seq);
        if keep_from > st.store_keep_from {
            st.store_keep_from = keep_from;
            out.trim_to = Some(keep_from);
        }
        out.idle = st.members.is_empty() && st.pending.is_empty() && st.merged.frames.is_empty();
        out
    }
}

/// What a [`Room::tick`] found.
#[derive(Debug, Default)]
pub struct Tick {
    pub online_broadcast: bool,
    pub trim_to: Option<u64>,
    pub idle: bool,
}

/// Whether a join answers with `joined` (see [`Room::join`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    Always,
    UnlessResumed,
}

impl State {
    /// See [`Room::page`].
    fn page(&self, since: u64, limit: usize, max_bytes: usize) -> Page {
        let first_kept = self.history.front().map_or(self.delivered + 1, |m| m.seq);
        let recovered =
            since <= self.delivered && (since == self.delivered || since + 1 >= first_kept);
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
            epoch: self.epoch.clone(),
            latest: self.delivered,
            recovered,
            messages,
        }
    }

    fn merging(&self) -> bool {
        !self.merged.settings.window.is_zero()
    }

    /// The gathered frames as one chunk, and the kind that keeps the soft limit's rules: a
    /// chunk with reliable messages is `Reliable` up to the highest of them (past the soft
    /// limit it folds into a `prompt` up to that seq, and the terminal pulls them all), a
    /// chunk of transient messages only is `Transient` (dropped past the soft limit).
    fn merged_chunk<'a>(&self, room: &'a Arc<str>) -> Option<(Bytes, Kind<'a>)> {
        if self.merged.frames.is_empty() {
            return None;
        }
        let kind = match self.merged.top_seq {
            Some(seq) => Kind::Reliable { room, seq },
            None => Kind::Transient,
        };
        Some((join_frames(&self.merged.frames), kind))
    }

    /// Push the gathered frames to every member as one chunk and empty the buffer. A no-op
    /// when nothing is gathered (always, with the merge window off).
    fn flush_merged(&mut self, room: &Arc<str>) {
        let Some((chunk, kind)) = self.merged_chunk(room) else {
            return;
        };
        for m in self.members.values() {
            m.outbox.push(chunk.clone(), kind);
        }
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

    /// Unique terminals: members, plus those lingering after their last poll.
    fn online(&self) -> u64 {
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
        let first_kept = self.history.front().map_or(self.delivered + 1, |m| m.seq);
        if *p.epoch != *self.epoch {
            // Another history: nothing can be trusted; replay all that is kept.
            return (false, first_kept);
        }
        if p.seq > self.delivered {
            // The terminal saw messages this history does not have (the server lost them):
            // it cannot be told it has everything.
            return (false, self.delivered + 1);
        }
        let from = p.seq + 1;
        (from >= first_kept, from.max(first_kept))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Batch, OutboxLimits};
    use crate::store::MemoryStore;
    use proptest::prelude::*;

    fn record() -> RoomRecord {
        RoomRecord {
            epoch: "ep".into(),
            seq: 0,
            history: vec![],
            flags: RoomFlags::default(),
        }
    }

    fn room(max: usize) -> (Room, Retention) {
        let r = Room::new(Arc::from("r"), record());
        (
            r,
            Retention {
                max_messages: max,
                ttl: Duration::from_secs(3600),
            },
        )
    }

    fn publish(r: &Room, ret: Retention, n: u64) {
        let data = RawValue::from_string(format!("{n}")).unwrap();
        let (seq, _, _) = r.sequence("gift", &data, 1_000 + n, None, &MemoryStore);
        r.deliver_through(seq, ret, &MemoryStore);
    }

    fn member(soft: usize) -> Member {
        Member {
            terminal: Arc::from("t"),
            outbox: Arc::new(Outbox::new(
                OutboxLimits {
                    soft_frames: soft,
                    hard_bytes: 1 << 24,
                },
                Arc::default(),
            )),
        }
    }

    fn resume(r: &Room, conn: ConnId, m: &Member, epoch: &str, seq: u64) -> Joined {
        let since = Position {
            epoch: epoch.into(),
            seq,
        };
        r.join(conn, m.clone(), Some(&since), None, Announce::Always)
            .unwrap()
    }

    fn seqs(m: &Member) -> (Vec<u64>, Vec<ServerFrame>) {
        let Batch::Frames(frames) = m.outbox.take(usize::MAX) else {
            panic!("closed")
        };
        let parsed: Vec<ServerFrame> = frames
            .iter()
            .flat_map(|f| livepush_proto::split_frames(std::str::from_utf8(f).unwrap()))
            .map(|f| ServerFrame::parse(f).unwrap())
            .collect();
        let s = parsed
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Msg(m) => m.seq,
                _ => None,
            })
            .collect();
        (s, parsed)
    }

    #[test]
    fn resume_replays_exactly_what_was_missed() {
        let (r, ret) = room(100);
        for n in 0..10 {
            publish(&r, ret, n);
        }
        let m = member(1000);
        let j = resume(&r, 1, &m, "ep", 4);
        assert!(j.recovered);
        publish(&r, ret, 10);
        let (s, _) = seqs(&m);
        assert_eq!(s, (5..=11).collect::<Vec<_>>());
    }

    #[test]
    fn overflow_and_epoch_mismatch_are_not_recovered() {
        let (r, ret) = room(5);
        for n in 0..10 {
            publish(&r, ret, n);
        }
        let m = member(1000);
        let j = resume(&r, 1, &m, "ep", 2);
        assert!(!j.recovered);
        assert_eq!(seqs(&m).0, vec![6, 7, 8, 9, 10]);
        let m2 = member(1000);
        let j = resume(&r, 2, &m2, "old", 9);
        assert!(!j.recovered);
        assert_eq!(seqs(&m2).0, vec![6, 7, 8, 9, 10]);
        // Exactly at the edge of what is kept: recovered.
        let m3 = member(1000);
        let j = resume(&r, 3, &m3, "ep", 5);
        assert!(j.recovered);
        // Ahead of the server: not recovered, no replay.
        let m4 = member(1000);
        let j = resume(&r, 4, &m4, "ep", 50);
        assert!(!j.recovered);
        assert!(seqs(&m4).0.is_empty());
    }

    #[test]
    fn big_replay_is_cut_and_prompted() {
        let (r, ret) = room(100);
        for n in 0..20 {
            publish(&r, ret, n);
        }
        let m = member(5);
        let j = resume(&r, 1, &m, "ep", 0);
        assert!(j.prompted);
        let (s, frames) = seqs(&m);
        assert_eq!(s, vec![1, 2, 3, 4]);
        assert!(matches!(
            frames.last(),
            Some(ServerFrame::Prompt { seq: 20, .. })
        ));
    }

    #[test]
    fn close_sends_left_and_refuses_joins() {
        let (r, ret) = room(100);
        let m = member(100);
        r.join(1, m.clone(), None, None, Announce::Always).unwrap();
        let data = RawValue::from_string(r#"{"action":"close"}"#.into()).unwrap();
        let (seq, _, _) = r.sequence("control", &data, 1, Some(Action::Close), &MemoryStore);
        assert!(r.deliver_through(seq, ret, &MemoryStore).is_some());
        let (s, frames) = seqs(&m);
        assert_eq!(s, vec![1]);
        assert!(matches!(frames.last(), Some(ServerFrame::Left { .. })));
        assert_eq!(
            r.join(2, member(10), None, None, Announce::Always)
                .unwrap_err(),
            JoinError::Closed
        );
        assert_eq!(r.info().online, 0);
    }

    #[test]
    fn delivery_waits_for_earlier_pending() {
        let (r, ret) = room(100);
        let m = member(100);
        r.join(1, m.clone(), None, None, Announce::Always).unwrap();
        let data = RawValue::from_string("1".into()).unwrap();
        let (s1, _, _) = r.sequence("gift", &data, 1, None, &MemoryStore);
        let (s2, _, _) = r.sequence("gift", &data, 1, None, &MemoryStore);
        // The second write completes first, but delivering "through s1" only releases s1,
        // and a later delivery through s2 releases s2: order holds either way.
        r.deliver_through(s1, ret, &MemoryStore);
        r.deliver_through(s2, ret, &MemoryStore);
        r.deliver_through(s1, ret, &MemoryStore);
        let (s, _) = seqs(&m);
        assert_eq!(s, vec![1, 2]);
    }

    #[test]
    fn online_counts_unique_terminals() {
        let (r, ret) = room(10);
        let a = member(10);
        let b = member(10); // same terminal "t", second connection
        r.join(1, a.clone(), None, None, Announce::Always).unwrap();
        r.join(2, b, None, None, Announce::Always).unwrap();
        assert_eq!(r.info().online, 1);
        assert!(r.tick(0, ret).online_broadcast);
        assert!(
            !r.tick(0, ret).online_broadcast,
            "unchanged count is not resent"
        );
        r.leave(1);
        assert_eq!(r.info().online, 1);
        r.leave(2);
        assert_eq!(r.info().online, 0);
    }

    // --- The merge window -------------------------------------------------------------------

    /// Long enough that the window's timer never fires in a test that does not wait for it:
    /// these tests flush by hand, as the timer would.
    const HOUR: Duration = Duration::from_secs(3600);

    fn merging(window: Duration, max_bytes: usize) -> (Room, Retention, MergeStats) {
        let stats = MergeStats::default();
        let r = Room::with_merge(
            Arc::from("r"),
            record(),
            MergeWindow {
                window,
                max_bytes,
                stats: stats.clone(),
            },
        );
        let ret = Retention {
            max_messages: 1000,
            ttl: HOUR,
        };
        (r, ret, stats)
    }

    /// What the window's timer does.
    fn flush(r: &Room) {
        r.state.lock().flush_merged(&r.id);
    }

    fn chat(r: &Room, text: &str) -> usize {
        let data = RawValue::from_string(format!("{text:?}")).unwrap();
        r.broadcast_transient(&encode_msg(&r.id, "chat", &data, None, 1))
    }

    fn raw(m: &Member) -> Vec<Bytes> {
        let Batch::Frames(frames) = m.outbox.take(usize::MAX) else {
            panic!("closed")
        };
        frames
    }

    /// Everything queued to a member, one entry per push, each split into its frames.
    fn pushes(m: &Member) -> Vec<Vec<ServerFrame>> {
        raw(m)
            .iter()
            .map(|f| {
                livepush_proto::split_frames(std::str::from_utf8(f).unwrap())
                    .map(|l| ServerFrame::parse(l).unwrap())
                    .collect()
            })
            .collect()
    }

    /// The seqs of a push (`0` for a transient message), `None` for anything but messages.
    fn msgs(push: &[ServerFrame]) -> Option<Vec<u64>> {
        push.iter()
            .map(|f| match f {
                ServerFrame::Msg(m) => Some(m.seq.unwrap_or(0)),
                _ => None,
            })
            .collect()
    }

    fn joined_fresh(r: &Room, conn: ConnId, m: &Member) {
        r.join(conn, m.clone(), None, None, Announce::Always)
            .unwrap();
        let got = pushes(m);
        assert!(matches!(got[..], [ref p] if matches!(p[..], [ServerFrame::Joined { .. }])));
    }

    #[tokio::test]
    async fn merge_window_pushes_one_chunk_per_window() {
        let (r, ret, stats) = merging(HOUR, 1 << 16);
        let a = member(100);
        joined_fresh(&r, 1, &a);
        publish(&r, ret, 1);
        publish(&r, ret, 2);
        assert_eq!(chat(&r, "hi"), 1, "gathered for the one member");
        publish(&r, ret, 3);
        assert!(
            raw(&a).is_empty(),
            "nothing is pushed before the window ends"
        );
        assert_eq!(r.info().seq, 3, "but the messages are delivered");
        flush(&r);
        let got = pushes(&a);
        assert_eq!(got.len(), 1, "one push: {got:?}");
        assert_eq!(msgs(&got[0]), Some(vec![1, 2, 0, 3]));
        assert_eq!((stats.flushes.get(), stats.frames.get()), (1, 4));
        flush(&r);
        assert!(raw(&a).is_empty());
        assert_eq!(stats.flushes.get(), 1, "an empty buffer is not pushed");
    }

    #[tokio::test]
    async fn the_window_timer_flushes() {
        let (r, ret, _) = merging(Duration::from_millis(20), 1 << 16);
        let a = member(100);
        joined_fresh(&r, 1, &a);
        for round in 0..2u64 {
            publish(&r, ret, 2 * round + 1);
            publish(&r, ret, 2 * round + 2);
            assert!(r.state.lock().merged.scheduled);
            assert!(raw(&a).is_empty());
            tokio::time::timeout(Duration::from_secs(10), a.outbox.ready())
                .await
                .expect("flushed by the timer");
            let got = pushes(&a);
            assert_eq!(got.len(), 1);
            assert_eq!(msgs(&got[0]), Some(vec![2 * round + 1, 2 * round + 2]));
            assert!(!r.state.lock().merged.scheduled);
        }
    }

    #[test]
    fn without_a_runtime_the_window_pushes_at_once() {
        let (r, ret, _) = merging(HOUR, 1 << 16);
        let a = member(100);
        joined_fresh(&r, 1, &a);
        publish(&r, ret, 1);
        assert_eq!(msgs(&pushes(&a)[0]), Some(vec![1]));
    }

    #[tokio::test]
    async fn nothing_is_gathered_without_members() {
        let (r, ret, _) = merging(HOUR, 1 << 16);
        publish(&r, ret, 1);
        assert_eq!(chat(&r, "nobody"), 0);
        assert!(r.state.lock().merged.frames.is_empty());
        assert!(!r.state.lock().merged.scheduled);
    }

    #[tokio::test]
    async fn a_join_mid_window_flushes_first_and_gets_nothing_twice() {
        let (r, ret, _) = merging(HOUR, 1 << 16);
        let a = member(100);
        joined_fresh(&r, 1, &a);
        for n in 1..=3 {
            publish(&r, ret, n);
        }
        // Resuming from 0: the replay has 1..3, and the flush must not send them again.
        let b = member(100);
        assert!(resume(&r, 2, &b, "ep", 0).recovered);
        let got_a = pushes(&a);
        assert_eq!(got_a.len(), 1);
        assert_eq!(msgs(&got_a[0]), Some(vec![1, 2, 3]), "flushed by the join");
        // A fresh join mid-window starts after the latest seq, with nothing of the buffer.
        publish(&r, ret, 4);
        let c = member(100);
        r.join(3, c.clone(), None, None, Announce::Always).unwrap();
        publish(&r, ret, 5);
        flush(&r);
        assert_eq!(seqs(&a).0, vec![4, 5]);
        assert_eq!(seqs(&b).0, vec![1, 2, 3, 4, 5]);
        let (s, frames) = seqs(&c);
        assert!(matches!(frames[0], ServerFrame::Joined { seq: 4, .. }));
        assert_eq!(s, vec![5]);
    }

    #[tokio::test]
    async fn a_pull_mid_window_queues_the_live_copies_first() {
        let (r, ret, _) = merging(HOUR, 1 << 16);
        let a = member(100);
        joined_fresh(&r, 1, &a);
        publish(&r, ret, 1);
        publish(&r, ret, 2);
        // As the session does: compute the answer, then queue it.
        a.outbox
            .push(r.pulled(0, 100, 1 << 20, Some(7)), Kind::Reply);
        let got = pushes(&a);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(msgs(&got[0]), Some(vec![1, 2]));
        assert!(
            matches!(&got[1][..], [ServerFrame::Pulled { seq: 2, messages, .. }] if messages.len() == 2)
        );
        // The history API reads without flushing (no member is involved).
        publish(&r, ret, 3);
        assert_eq!(r.page(0, 100, 1 << 20).messages.len(), 3);
        assert!(raw(&a).is_empty());
    }

    #[tokio::test]
    async fn a_leave_mid_window_hands_the_leaver_what_was_gathered() {
        let (r, ret, _) = merging(HOUR, 1 << 16);
        let a = member(100);
        let b = member(100);
        joined_fresh(&r, 1, &a);
        joined_fresh(&r, 2, &b);
        publish(&r, ret, 1);
        chat(&r, "x");
        assert!(r.leave(1));
        let got = pushes(&a);
        assert_eq!(got.len(), 1);
        assert_eq!(msgs(&got[0]), Some(vec![1, 0]));
        assert!(raw(&b).is_empty(), "the others keep gathering");
        publish(&r, ret, 2);
        flush(&r);
        assert!(raw(&a).is_empty(), "nothing after the leave");
        let got = pushes(&b);
        assert_eq!(got.len(), 1);
        assert_eq!(msgs(&got[0]), Some(vec![1, 0, 2]));
    }

    #[tokio::test]
    async fn a_close_mid_window_pushes_the_messages_before_left() {
        let (r, ret, _) = merging(HOUR, 1 << 16);
        let a = member(100);
        joined_fresh(&r, 1, &a);
        publish(&r, ret, 1);
        let data = RawValue::from_string(r#"{"action":"close"}"#.into()).unwrap();
        let (seq, _, _) = r.sequence("control", &data, 1, Some(Action::Close), &MemoryStore);
        assert!(r.deliver_through(seq, ret, &MemoryStore).is_some());
        // No flush by hand: the control command pushed everything at once.
        let got = pushes(&a);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(msgs(&got[0]), Some(vec![1, 2]));
        assert!(matches!(got[1][..], [ServerFrame::Left { .. }]));
        assert!(r.state.lock().merged.frames.is_empty());
        assert_eq!(
            r.join(2, member(10), None, None, Announce::Always)
                .unwrap_err(),
            JoinError::Closed
        );
    }

    #[tokio::test]
    async fn chunks_stay_within_the_byte_cap() {
        let data = RawValue::from_string("1".into()).unwrap();
        let frame_len = encode_msg("r", "gift", &data, Some(1), 1_001).len();
        // Exactly two frames (and their separator) fill a chunk.
        let cap = 2 * frame_len + 1;
        let (r, ret, _) = merging(HOUR, cap);
        let a = member(100);
        joined_fresh(&r, 1, &a);
        for n in 1..=5 {
            publish(&r, ret, n);
        }
        flush(&r);
        let got = raw(&a);
        assert!(got.iter().all(|c| c.len() <= cap));
        let chunks: Vec<_> = got.iter().map(|c| msgs(&pushes_of(c)).unwrap()).collect();
        assert_eq!(chunks, vec![vec![1, 2], vec![3, 4], vec![5]]);

        // A frame larger than the cap goes alone, at once.
        let (r, ret, _) = merging(HOUR, 10);
        let a = member(100);
        joined_fresh(&r, 1, &a);
        publish(&r, ret, 1);
        publish(&r, ret, 2);
        let chunks: Vec<_> = pushes(&a).iter().map(|p| msgs(p).unwrap()).collect();
        assert_eq!(chunks, vec![vec![1], vec![2]]);
    }

    fn pushes_of(chunk: &Bytes) -> Vec<ServerFrame> {
        livepush_proto::split_frames(std::str::from_utf8(chunk).unwrap())
            .map(|l| ServerFrame::parse(l).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn merged_chunks_keep_the_soft_limit_rules() {
        let (r, ret, _) = merging(HOUR, 1 << 16);
        // Soft limit of one frame, taken by `joined`: the outbox is full.
        let a = member(1);
        r.join(1, a.clone(), None, None, Announce::Always).unwrap();
        // Transient only: dropped as a whole.
        chat(&r, "a");
        chat(&r, "b");
        flush(&r);
        // With reliable messages: folded into a prompt up to the highest of them.
        publish(&r, ret, 1);
        chat(&r, "c");
        publish(&r, ret, 2);
        chat(&r, "d");
        flush(&r);
        let got = pushes(&a);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(matches!(got[0][..], [ServerFrame::Joined { .. }]));
        assert!(matches!(got[1][..], [ServerFrame::Prompt { seq: 2, .. }]));
        // Once the prompt went out, chunks queue again; a transient-only one is `Transient`.
        chat(&r, "e");
        flush(&r);
        assert_eq!(msgs(&pushes(&a)[0]), Some(vec![0]));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Publish,
        Chat,
        Flush,
        /// Join a new member, resuming from `since % (latest + 1)`, or fresh.
        Join(Option<u64>),
        /// Leave the `n % members`-th member still in the room.
        Leave(usize),
        /// Pull as the `n % members`-th member (the answer is not examined).
        Pull(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Publish),
            2 => Just(Op::Chat),
            2 => Just(Op::Flush),
            2 => proptest::option::of(0u64..1000).prop_map(Op::Join),
            1 => (0usize..100).prop_map(Op::Leave),
            1 => (0usize..100).prop_map(Op::Pull),
        ]
    }

    proptest! {
        // With the merge window on, any interleaving of publishes, transient messages, window
        // ends, joins (fresh or resuming), leaves and pulls gives every member each reliable
        // message of its membership exactly once, in order, and nothing from before it.
        #[test]
        fn merge_window_keeps_exactly_once(ops in proptest::collection::vec(op(), 1..80), cap in 40usize..400) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            // Timers are scheduled on this runtime but never run: `Op::Flush` is the window end.
            let _rt = rt.enter();
            let (r, ret, _) = merging(HOUR, cap);
            // (conn, member, first expected seq, last expected seq once left)
            let mut members: Vec<(ConnId, Member, u64, Option<u64>)> = Vec::new();
            let mut latest = 0;
            for (i, op) in ops.into_iter().enumerate() {
                let conn = i as ConnId + 1;
                let here: Vec<usize> = (0..members.len()).filter(|&k| members[k].3.is_none()).collect();
                match op {
                    Op::Publish => {
                        latest += 1;
                        publish(&r, ret, latest);
                    }
                    Op::Chat => {
                        chat(&r, "c");
                    }
                    Op::Flush => flush(&r),
                    Op::Join(since) => {
                        let m = member(1 << 20);
                        let first = match since {
                            Some(s) => {
                                let s = s % (latest + 1);
                                prop_assert!(resume(&r, conn, &m, "ep", s).recovered);
                                s + 1
                            }
                            None => {
                                r.join(conn, m.clone(), None, None, Announce::Always).unwrap();
                                latest + 1
                            }
                        };
                        members.push((conn, m, first, None));
                    }
                    Op::Leave(n) if !here.is_empty() => {
                        let k = here[n % here.len()];
                        prop_assert!(r.leave(members[k].0));
                        members[k].3 = Some(latest);
                    }
                    Op::Pull(n) if !here.is_empty() => {
                        // Like the session: the answer is queued after the pull returns.
                        let k = here[n % here.len()];
                        members[k].1.outbox.push(r.pulled(0, 1, 1 << 20, None), Kind::Reply);
                    }
                    Op::Leave(_) | Op::Pull(_) => {}
                }
            }
            flush(&r);
            for (conn, m, first, last) in &members {
                let want: Vec<u64> = (*first..=last.unwrap_or(latest)).collect();
                let (got, frames) = seqs(m);
                prop_assert_eq!(got, want, "member {}", conn);
                // A pull answer (`seq` = the latest seq when it was made) comes after the
                // live copies of every message up to that seq: it never overtakes them.
                let mut seen = first - 1;
                for f in &frames {
                    match f {
                        ServerFrame::Msg(livepush_proto::Message { seq: Some(s), .. }) => seen = *s,
                        ServerFrame::Pulled { seq, .. } => prop_assert_eq!(seen, *seq, "member {}", conn),
                        _ => {}
                    }
                }
            }
        }
    }

    proptest! {
        // The history ring: for any sequence of publishes, joins from any position, and any
        // retention, a join's replay is exactly the kept messages after `since`, contiguous and
        // in order, and `recovered` is true exactly when none after `since` is missing.
        #[test]
        fn history_ring(n in 0u64..60, max in 1usize..30, since in 0u64..70) {
            let (r, ret) = room(max);
            for i in 0..n { publish(&r, ret, i); }
            let m = member(10_000);
            let j = resume(&r, 1, &m, "ep", since);
            let (s, _) = seqs(&m);
            let first_kept = n.saturating_sub(max as u64) + 1;
            let expected: Vec<u64> = if since > n { vec![] } else { (since.max(first_kept - 1) + 1..=n).collect() };
            prop_assert_eq!(&s, &expected);
            let complete = since <= n && since + 1 >= first_kept;
            prop_assert_eq!(j.recovered, complete);
        }
    }
}

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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use livepush_proto::{Position, ServerFrame, encode_frame, encode_msg, encode_pulled};
use parking_lot::Mutex;
use serde_json::value::RawValue;

use super::control::Action;
use crate::auth::now_ms;
use crate::outbox::{Kind, Outbox, Pushed};
use crate::store::{Durable, HistoryStore, RoomFlags, RoomRecord, StoredMessage};

/// Identifies one connection (one session) within this process.
pub type ConnId = u64;

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
    state: Mutex<State>,
}

impl Room {
    pub fn new(id: Arc<str>, record: RoomRecord) -> Room {
        let first = record
            .history
            .first()
            .map(|m| m.seq)
            .unwrap_or(record.seq + 1);
        Room {
            id,
            state: Mutex::new(State {
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
            }),
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
    /// apply control actions, push to every member. Returns a store write to run in the
    /// background when a control action changed the room's flags.
    pub fn deliver_through(
        &self,
        through: u64,
        retention: Retention,
        store: &dyn HistoryStore,
    ) -> Option<Durable> {
        let mut st = self.state.lock();
        let mut flags_write = None;
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
            for m in st.members.values() {
                m.outbox.push(
                    frame.clone(),
                    Kind::Reliable {
                        room: &self.id,
                        seq,
                    },
                );
            }
            if let Some(action) = p.action {
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
    pub fn broadcast_transient(&self, frame: &Bytes) -> usize {
        let st = self.state.lock();
        let mut delivered = 0;
        for m in st.members.values() {
            if m.outbox.push(frame.clone(), Kind::Transient) == Pushed::Queued {
                delivered += 1;
            }
        }
        delivered
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

    pub fn is_member(&self, conn: ConnId) -> bool {
        self.state.lock().members.contains_key(&conn)
    }

    /// Reliable messages with `seq > since`: at most `limit`, and no more than `max_bytes`
    /// of frames (but always at least one). `recovered` is true when nothing between `since`
    /// and the first returned message is missing; a `since` beyond the latest seq is not
    /// recovered (the caller saw messages this history does not have).
    pub fn page(&self, since: u64, limit: usize, max_bytes: usize) -> Page {
        let st = self.state.lock();
        let first_kept = st.history.front().map_or(st.delivered + 1, |m| m.seq);
        let recovered = since <= st.delivered && (since == st.delivered || since + 1 >= first_kept);
        let mut bytes = 0;
        let messages = st
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
            epoch: st.epoch.clone(),
            latest: st.delivered,
            recovered,
            messages,
        }
    }

    /// Encode a `pulled` answer.
    pub fn pulled(
        &self,
        since: u64,
        limit: usize,
        max_bytes: usize,
        request_id: Option<u64>,
    ) -> Bytes {
        let page = self.page(since, limit, max_bytes);
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
        out.idle = st.members.is_empty() && st.pending.is_empty();
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

    fn room(max: usize) -> (Room, Retention) {
        let r = Room::new(
            Arc::from("r"),
            RoomRecord {
                epoch: "ep".into(),
                seq: 0,
                history: vec![],
                flags: RoomFlags::default(),
            },
        );
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
            .map(|f| ServerFrame::parse(std::str::from_utf8(f).unwrap()).unwrap())
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

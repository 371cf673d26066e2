//! The in-memory store: histories, room state, inboxes and wake registrations kept in the
//! process's memory. Nothing outlives the process: after a restart every room gets a new epoch
//! (resuming terminals are told `recovered:false`) and inboxes start empty. For tests and for
//! deployments that accept that (`--data-dir :memory:`).
//!
//! Writes apply at once, so every [`Durable`] is ready when it is returned and futures trivially
//! resolve in submission order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;

use parking_lot::Mutex;

use super::{
    Durable, HistoryStore, InboxMessage, InboxStore, RoomFlags, RoomRecord, StoreError,
    StoredMessage, TerminalRecord, WakeRegistration, ready,
};

/// Everything in memory. See the module documentation.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// In key order, for [`HistoryStore::rooms_after`].
    rooms: Mutex<BTreeMap<String, Room>>,
    terminals: Mutex<HashMap<String, TerminalRecord>>,
}

#[derive(Debug)]
struct Room {
    epoch: String,
    seq: u64,
    flags: RoomFlags,
    history: VecDeque<StoredMessage>,
}

impl Room {
    fn fresh(epoch: &str, flags: RoomFlags) -> Room {
        Room {
            epoch: epoch.to_owned(),
            seq: 0,
            flags,
            history: VecDeque::new(),
        }
    }
}

impl HistoryStore for MemoryStore {
    fn load_room(&self, room: &str, keep: usize) -> Result<Option<RoomRecord>, StoreError> {
        Ok(self.rooms.lock().get(room).map(|r| RoomRecord {
            epoch: r.epoch.clone(),
            seq: r.seq,
            history: r
                .history
                .iter()
                .skip(r.history.len().saturating_sub(keep))
                .cloned()
                .collect(),
            flags: r.flags,
        }))
    }

    fn read(
        &self,
        room: &str,
        since: u64,
        upto: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let rooms = self.rooms.lock();
        let Some(r) = rooms.get(room) else {
            return Ok(Vec::new());
        };
        let mut bytes = 0;
        let mut out = Vec::new();
        for m in r.history.iter().filter(|m| m.seq > since && m.seq <= upto) {
            bytes += m.frame.len();
            if out.len() == limit || (!out.is_empty() && bytes > max_bytes) {
                break;
            }
            out.push(m.clone());
        }
        Ok(out)
    }

    fn create_room(&self, room: &str, epoch: &str) -> Durable {
        self.rooms
            .lock()
            .insert(room.to_owned(), Room::fresh(epoch, RoomFlags::default()));
        ready()
    }

    fn append(&self, room: &str, message: &StoredMessage, flags: Option<RoomFlags>) -> Durable {
        if let Some(r) = self.rooms.lock().get_mut(room) {
            r.seq = r.seq.max(message.seq);
            if let Some(flags) = flags {
                r.flags = flags;
            }
            r.history.push_back(message.clone());
        }
        ready()
    }

    fn reset(&self, room: &str, epoch: &str) -> Durable {
        let mut rooms = self.rooms.lock();
        let flags = rooms.get(room).map(|r| r.flags).unwrap_or_default();
        rooms.insert(room.to_owned(), Room::fresh(epoch, flags));
        ready()
    }

    fn trim(&self, room: &str, keep_from: u64) -> Durable {
        if let Some(r) = self.rooms.lock().get_mut(room) {
            while r.history.front().is_some_and(|m| m.seq < keep_from) {
                r.history.pop_front();
            }
            if r.history.is_empty() {
                r.history = VecDeque::new();
            }
        }
        ready()
    }

    fn forget(&self, room: &str, epoch: &str) -> Durable {
        let mut rooms = self.rooms.lock();
        if rooms.get(room).is_some_and(|r| r.epoch == epoch) {
            rooms.remove(room);
        }
        ready()
    }

    fn rooms_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        let rooms = self.rooms.lock();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(rooms
            .range::<str, _>((from, Bound::Unbounded))
            .take(limit)
            .map(|(id, _)| id.clone())
            .collect())
    }
}

impl MemoryStore {
    /// Room records kept (tests: how many rooms the store still knows).
    #[cfg(test)]
    pub(crate) fn room_records(&self) -> usize {
        self.rooms.lock().len()
    }
}

impl InboxStore for MemoryStore {
    fn load_terminal(&self, terminal: &str) -> Result<Option<TerminalRecord>, StoreError> {
        Ok(self.terminals.lock().get(terminal).cloned())
    }

    fn append_inbox(&self, terminal: &str, message: &InboxMessage) -> Durable {
        let mut terminals = self.terminals.lock();
        let t = terminals.entry(terminal.to_owned()).or_default();
        t.seq = t.seq.max(message.seq);
        if message.seq > t.acked {
            t.inbox.push(message.clone());
        }
        ready()
    }

    fn ack_inbox(&self, terminal: &str, seq: u64) -> Durable {
        let mut terminals = self.terminals.lock();
        let t = terminals.entry(terminal.to_owned()).or_default();
        t.acked = t.acked.max(seq);
        t.seq = t.seq.max(t.acked);
        let acked = t.acked;
        t.inbox.retain(|m| m.seq > acked);
        ready()
    }

    fn trim_inbox(&self, terminal: &str, keep_from: u64) -> Durable {
        if let Some(t) = self.terminals.lock().get_mut(terminal) {
            t.inbox.retain(|m| m.seq >= keep_from);
        }
        ready()
    }

    fn set_wake(&self, terminal: &str, registration: &WakeRegistration) -> Durable {
        self.terminals
            .lock()
            .entry(terminal.to_owned())
            .or_default()
            .wake = Some(*registration);
        ready()
    }

    fn terminals_with_pending_inbox(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .terminals
            .lock()
            .iter()
            .filter(|(_, t)| t.inbox.iter().any(|m| m.seq > t.acked))
            .map(|(id, _)| id.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures_util::FutureExt;

    /// Writes of the in-memory store are done when they return.
    fn done(w: Durable) {
        w.now_or_never().expect("ready at once").expect("written");
    }

    fn msg(seq: u64) -> StoredMessage {
        StoredMessage {
            seq,
            ts: seq,
            frame: Bytes::from(vec![b'x'; 10]),
        }
    }

    /// The in-memory store keeps what the durable one keeps, for as long as the process runs.
    #[test]
    fn keeps_rooms_history_and_flags_until_reset_or_trim() {
        let s = MemoryStore::default();
        assert_eq!(s.load_room("r", 10).unwrap(), None);
        done(s.create_room("r", "E1"));
        for n in 1..=4 {
            let flags = (n == 2).then_some(RoomFlags {
                muted: true,
                closed: false,
            });
            done(s.append("r", &msg(n), flags));
        }
        let r = s.load_room("r", 2).unwrap().unwrap();
        assert_eq!((r.epoch.as_str(), r.seq), ("E1", 4));
        assert!(r.flags.muted);
        assert_eq!(r.history.iter().map(|m| m.seq).collect::<Vec<_>>(), [3, 4]);
        let page = s.read("r", 1, 3, 10, usize::MAX).unwrap();
        assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), [2, 3]);
        let capped = s.read("r", 0, 4, 10, 15).unwrap();
        assert_eq!(capped.len(), 1, "at least one, then within max_bytes");
        done(s.trim("r", 3));
        assert_eq!(s.read("r", 0, 4, 10, usize::MAX).unwrap().len(), 2);
        done(s.reset("r", "E2"));
        let r = s.load_room("r", 10).unwrap().unwrap();
        assert_eq!((r.epoch.as_str(), r.seq, r.history.len()), ("E2", 0, 0));
        assert!(r.flags.muted, "a reset keeps the flags");
    }

    /// A forget deletes the record of the epoch it names, never a newer one.
    #[test]
    fn forgets_a_room_only_under_the_epoch_it_names() {
        let s = MemoryStore::default();
        done(s.create_room("r", "E1"));
        done(s.append("r", &msg(1), None));
        done(s.forget("r", "E0"));
        assert_eq!(
            s.load_room("r", 10).unwrap().unwrap().seq,
            1,
            "a stale epoch: kept"
        );
        done(s.forget("r", "E1"));
        assert_eq!(s.load_room("r", 10).unwrap(), None);
        assert!(s.read("r", 0, 10, 10, usize::MAX).unwrap().is_empty());
        assert_eq!(s.room_records(), 0);
    }

    #[test]
    fn keeps_inboxes_until_acknowledged() {
        let s = MemoryStore::default();
        for n in 1..=3 {
            done(s.append_inbox(
                "t",
                &InboxMessage {
                    seq: n,
                    ts: n,
                    frame: Bytes::new(),
                },
            ));
        }
        assert_eq!(s.terminals_with_pending_inbox().unwrap(), ["t"]);
        done(s.ack_inbox("t", 2));
        let t = s.load_terminal("t").unwrap().unwrap();
        assert_eq!((t.seq, t.acked, t.inbox.len()), (3, 2, 1));
        done(s.ack_inbox("t", 3));
        assert!(s.terminals_with_pending_inbox().unwrap().is_empty());
    }
}

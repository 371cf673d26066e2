//! A store that fails on demand: reads of one room, and commits while the disk is "full".

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use livepush_server::store::{
    Durable, HistoryStore, InboxMessage, InboxStore, MemoryStore, RoomFlags, RoomRecord,
    StoreError, StoredMessage, TerminalRecord, WakeRegistration,
};
use parking_lot::Mutex;

/// A memory store whose reads of the room `unreadable` fail (to show `internal`), and whose
/// room appends fail while `full` is set. It keeps the contract of [`HistoryStore::recover`]:
/// a room whose append failed refuses later ones until then.
#[derive(Debug, Default)]
pub struct FaultyStore {
    inner: MemoryStore,
    unreadable: Option<&'static str>,
    pub full: AtomicBool,
    broken: Mutex<HashSet<String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("disk on fire")]
struct OnFire;

impl FaultyStore {
    /// A store whose reads of `room` fail.
    pub fn unreadable(room: &'static str) -> FaultyStore {
        FaultyStore {
            unreadable: Some(room),
            ..FaultyStore::default()
        }
    }
}

fn failed(e: StoreError) -> Durable {
    Box::pin(std::future::ready(Err(e)))
}

impl HistoryStore for FaultyStore {
    fn load_room(&self, room: &str, keep: usize) -> Result<Option<RoomRecord>, StoreError> {
        if self.unreadable == Some(room) {
            return Err(StoreError::io("reading", OnFire));
        }
        self.inner.load_room(room, keep)
    }
    fn read(
        &self,
        room: &str,
        since: u64,
        upto: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.inner.read(room, since, upto, limit, max_bytes)
    }
    fn create_room(&self, room: &str, epoch: &str) -> Durable {
        self.inner.create_room(room, epoch)
    }
    fn append(&self, room: &str, m: &StoredMessage, f: Option<RoomFlags>) -> Durable {
        if self.broken.lock().contains(room) {
            return failed(StoreError::Broken(room.into()));
        }
        if self.full.load(Ordering::SeqCst) {
            self.broken.lock().insert(room.into());
            return failed(StoreError::io("writing", OnFire));
        }
        self.inner.append(room, m, f)
    }
    fn reset(&self, room: &str, epoch: &str) -> Durable {
        self.inner.reset(room, epoch)
    }
    fn recover(&self, room: &str, epoch: &str) -> Durable {
        self.broken.lock().remove(room);
        self.inner.reset(room, epoch)
    }
    fn trim(&self, room: &str, k: u64) -> Durable {
        self.inner.trim(room, k)
    }
}

impl InboxStore for FaultyStore {
    fn load_terminal(&self, t: &str) -> Result<Option<TerminalRecord>, StoreError> {
        self.inner.load_terminal(t)
    }
    fn append_inbox(&self, t: &str, m: &InboxMessage) -> Durable {
        self.inner.append_inbox(t, m)
    }
    fn ack_inbox(&self, t: &str, seq: u64) -> Durable {
        self.inner.ack_inbox(t, seq)
    }
    fn trim_inbox(&self, t: &str, k: u64) -> Durable {
        self.inner.trim_inbox(t, k)
    }
    fn set_wake(&self, t: &str, r: &WakeRegistration) -> Durable {
        self.inner.set_wake(t, r)
    }
    fn terminals_with_pending_inbox(&self) -> Result<Vec<String>, StoreError> {
        self.inner.terminals_with_pending_inbox()
    }
}

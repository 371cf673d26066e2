//! Where the single-node engine keeps room histories, room state and terminal inboxes.
//!
//! The single-node engine ([`crate::engine::local`]) sequences messages itself (one writer
//! per room) and hands them to a store in order; the store answers each write with a
//! [`Durable`] future that resolves once the write is as durable as the store's policy
//! promises. Futures resolve in the order they were submitted, which is what lets the engine
//! hand messages to the node strictly in `seq` order as soon as they are durable, without
//! waiting on the disk any longer than the publish answer does.
//!
//! [`MemoryStore`] keeps everything in the process's memory (a restart loses every history,
//! and every room gets a new epoch, so resuming terminals are told `recovered:false`, never
//! lied to); [`RedbStore`] keeps it in one file that survives restarts and `kill -9`.

mod inbox;
mod memory;
mod redb;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

pub use self::redb::{DurabilityPolicy, OpenError, RedbStore, StoreOptions};
pub use inbox::{InboxMessage, InboxStore, TerminalRecord, WakeRegistration};
pub use memory::MemoryStore;

/// A reliable message as the hub and the store keep it: its position, its time, and its
/// `msg` frame encoded once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub ts: u64,
    pub frame: Bytes,
}

/// Room state that must survive a restart besides the history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoomFlags {
    pub muted: bool,
    pub closed: bool,
}

/// What a store knows about a room when the hub first touches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRecord {
    pub epoch: String,
    /// The last `seq` ever assigned in this epoch (even if trimmed from history since).
    pub seq: u64,
    /// Kept messages, oldest first.
    pub history: Vec<StoredMessage>,
    pub flags: RoomFlags,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A read or write failed; `source` says why.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The store's file could not be reopened after an I/O error; it is retried on the next
    /// write.
    #[error("{0} is unavailable after an I/O error")]
    Unavailable(String),
    #[error("storage is shut down")]
    Closed,
    /// An earlier write of the room failed; everything written after it was refused or
    /// discarded (never delivered) and the room starts a new epoch.
    #[error("an earlier write of room {0:?} failed")]
    Broken(String),
}

impl StoreError {
    /// An I/O failure while doing `context`.
    pub fn io(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> StoreError {
        StoreError::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }
}

/// Resolves when a submitted write is durable under the store's policy.
pub type Durable = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// A home for room histories. Implementations: [`MemoryStore`] (nothing survives a restart)
/// and [`RedbStore`] (the embedded durable store).
pub trait HistoryStore: Send + Sync + std::fmt::Debug + 'static {
    /// How long this store's commits take, for `/metrics` (stores without a file: none).
    fn commit_seconds(&self) -> Option<prometheus_client::metrics::histogram::Histogram> {
        None
    }

    /// What is known about `room`, or `None` if the store has never seen it. `history`
    /// holds at most the newest `keep` messages.
    fn load_room(&self, room: &str, keep: usize) -> Result<Option<RoomRecord>, StoreError>;

    /// Messages of `room` with `since < seq <= upto`, oldest first: at most `limit`, and no
    /// more than `max_bytes` of frames (but at least one when there is one).
    fn read(
        &self,
        room: &str,
        since: u64,
        upto: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// Record that `room` now exists with `epoch` (called once, when the engine creates it).
    fn create_room(&self, room: &str, epoch: &str) -> Durable;

    /// Append a sequenced message and, for a control message that changed them, the room's
    /// new flags, in one write. Futures of one store resolve in submission order.
    fn append(&self, room: &str, message: &StoredMessage, flags: Option<RoomFlags>) -> Durable;

    /// Start a new history of `room`: `epoch`, seq 0, no messages; its flags stay.
    fn reset(&self, room: &str, epoch: &str) -> Durable;

    /// After a failed write of `room`: start a new history as [`HistoryStore::reset`] does,
    /// and accept the room's writes again. A store whose writes can fail must, once an
    /// append or reset of a room that is answered at its commit has failed, fail every later
    /// append and reset of that room until this recover: so when a write of a room succeeds,
    /// every write of it submitted before (since the last recover) succeeded too, which is
    /// what lets the engine hand a message over as soon as its own write is durable. Stores
    /// that never fail a write need nothing more than a reset.
    fn recover(&self, room: &str, epoch: &str) -> Durable {
        self.reset(room, epoch)
    }

    /// Forget messages of `room` with `seq < keep_from` (out of the retention).
    fn trim(&self, room: &str, keep_from: u64) -> Durable;

    /// Delete `room`'s record and messages, if its epoch is still `epoch` (so a newer record
    /// is never deleted): the engine asks for it once nothing of the room is retained (see
    /// "Rooms leaving the store" in [`crate::engine::local`]); the room's next use starts a
    /// new epoch. Resolves once a [`HistoryStore::load_room`] no longer sees the record (under
    /// every durability policy: never at submission). Stores that cannot forget keep the
    /// record, which is always safe.
    fn forget(&self, room: &str, epoch: &str) -> Durable {
        let _ = (room, epoch);
        ready()
    }

    /// Up to `limit` rooms the store has a record of, in key order, after `after` (from the
    /// first with `None`): for the engine's sweep of rooms not in memory. Stores that list
    /// none (the default) have a room's record forgotten only once the room is used again.
    fn rooms_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        let _ = (after, limit);
        Ok(Vec::new())
    }

    /// Resolves once everything submitted so far is durable (called at shutdown).
    fn flush(&self) -> Durable {
        ready()
    }
}

/// A fresh epoch: 16 random alphanumerics (95 bits), so two histories of one room never share
/// an epoch.
pub fn new_epoch() -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(16)
        .map(char::from)
        .collect()
}

/// A write that is durable at once (for stores that have nothing to wait for).
pub fn ready() -> Durable {
    Box::pin(std::future::ready(Ok(())))
}

/// Everything the server persists: room histories and terminal inboxes. Implemented for any
/// type that implements both.
pub trait Store: HistoryStore + InboxStore {}

impl<T: HistoryStore + InboxStore> Store for T {}

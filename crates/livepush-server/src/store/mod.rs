//! Where room histories and room state are kept.
//!
//! The hub keeps each room's recent history in memory and serves replays and pulls from there;
//! a [`HistoryStore`] is what makes that history outlive the process. The hub sequences
//! messages itself (one writer per room per node) and hands them to the store in order; the
//! store answers each append with a [`Durable`] future that resolves once the message is as
//! durable as the store's policy promises. Futures resolve in the order they were submitted,
//! which is what lets the hub deliver messages strictly in `seq` order as soon as they are
//! durable, without waiting on the disk any longer than the publish answer does.
//!
//! [`MemoryStore`] keeps nothing beyond the hub's memory: a restart loses every history and
//! every room gets a new epoch (so resuming terminals are told `recovered:false`, never lied
//! to). The embedded durable store implements the same trait.

mod inbox;
mod memory;
mod redb;

use std::future::Future;
use std::pin::Pin;

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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Io(String),
    #[error("storage is shut down")]
    Closed,
}

/// Resolves when a submitted write is durable under the store's policy.
pub type Durable = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// A durable home for room histories. Implementations: [`MemoryStore`] (nothing survives a
/// restart), the embedded store, and later a Redis store for several nodes.
pub trait HistoryStore: Send + Sync + std::fmt::Debug + 'static {
    /// What is known about `room`, or `None` if the store has never seen it. `history`
    /// holds at most the newest `keep` messages.
    fn load_room(&self, room: &str, keep: usize) -> Result<Option<RoomRecord>, StoreError>;

    /// Record that `room` now exists with `epoch` (called once, when the hub creates it).
    fn create_room(&self, room: &str, epoch: &str) -> Durable;

    /// Append a sequenced message. Futures of one store resolve in submission order.
    fn append(&self, room: &str, message: &StoredMessage) -> Durable;

    /// Persist the room's flags (closed, muted).
    fn set_flags(&self, room: &str, flags: RoomFlags) -> Durable;

    /// Forget messages of `room` with `seq < keep_from`. Called in the background; the hub
    /// has already dropped them from memory.
    fn trim(&self, room: &str, keep_from: u64) -> Durable;

    /// Resolves once everything submitted so far is durable (called at shutdown).
    fn flush(&self) -> Durable {
        ready()
    }
}

/// A write that is durable at once (for stores that have nothing to wait for).
pub fn ready() -> Durable {
    Box::pin(std::future::ready(Ok(())))
}

/// Everything the server persists: room histories and terminal inboxes. Implemented for any
/// type that implements both.
pub trait Store: HistoryStore + InboxStore {}

impl<T: HistoryStore + InboxStore> Store for T {}

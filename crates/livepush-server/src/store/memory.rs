//! The in-memory store: nothing outlives the process.

use super::{Durable, HistoryStore, RoomFlags, RoomRecord, StoreError, StoredMessage, ready};

/// Keeps nothing: the hub's in-memory history is all there is. For tests and for deployments
/// that accept losing history on restart (`--data-dir :memory:`).
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryStore;

impl HistoryStore for MemoryStore {
    fn load_room(&self, _room: &str, _keep: usize) -> Result<Option<RoomRecord>, StoreError> {
        Ok(None)
    }

    fn create_room(&self, _room: &str, _epoch: &str) -> Durable {
        ready()
    }

    fn append(&self, _room: &str, _message: &StoredMessage) -> Durable {
        ready()
    }

    fn set_flags(&self, _room: &str, _flags: RoomFlags) -> Durable {
        ready()
    }

    fn trim(&self, _room: &str, _keep_from: u64) -> Durable {
        ready()
    }
}

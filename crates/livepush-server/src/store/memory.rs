//! The in-memory store: nothing outlives the process (histories, inboxes, registrations).

use super::{
    Durable, HistoryStore, InboxMessage, InboxStore, RoomFlags, RoomRecord, StoreError,
    StoredMessage, TerminalRecord, WakeRegistration, ready,
};

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

impl InboxStore for MemoryStore {
    fn load_terminal(&self, _terminal: &str) -> Result<Option<TerminalRecord>, StoreError> {
        Ok(None)
    }

    fn append_inbox(&self, _terminal: &str, _message: &InboxMessage) -> Durable {
        ready()
    }

    fn ack_inbox(&self, _terminal: &str, _seq: u64) -> Durable {
        ready()
    }

    fn trim_inbox(&self, _terminal: &str, _keep_from: u64) -> Durable {
        ready()
    }

    fn set_wake(&self, _terminal: &str, _registration: &WakeRegistration) -> Durable {
        ready()
    }

    fn terminals_with_pending_inbox(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
}

//! Per-terminal inboxes and wake-up registrations, behind the same kind of trait as room
//! histories: the server keeps the live state in memory, a store makes it outlive the process.

use std::net::SocketAddr;

use bytes::Bytes;

use super::{Durable, StoreError};

/// A direct message in a terminal's inbox: its inbox `seq`, time, and encoded `inbox` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    pub seq: u64,
    pub ts: u64,
    pub frame: Bytes,
}

/// Where a sleeping terminal said it can be woken: the source address of its last verified
/// keepalive, how large that keepalive was (no wake datagram may be larger), and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeRegistration {
    pub addr: SocketAddr,
    pub size: u16,
    pub ts: u64,
}

/// What a store knows of a terminal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TerminalRecord {
    /// Last inbox seq handed out.
    pub seq: u64,
    /// Last inbox seq the terminal acknowledged.
    pub acked: u64,
    /// Unacknowledged messages still kept, oldest first.
    pub inbox: Vec<InboxMessage>,
    pub wake: Option<WakeRegistration>,
}

/// A durable home for inboxes. Futures resolve in submission order, like [`super::HistoryStore`].
pub trait InboxStore: Send + Sync + std::fmt::Debug + 'static {
    /// What is known about `terminal`, or `None` if it was never stored.
    fn load_terminal(&self, terminal: &str) -> Result<Option<TerminalRecord>, StoreError>;

    /// Append a message (its seq is the terminal's next).
    fn append_inbox(&self, terminal: &str, message: &InboxMessage) -> Durable;

    /// The terminal handled everything up to `seq`: remember it and drop those messages.
    fn ack_inbox(&self, terminal: &str, seq: u64) -> Durable;

    /// Drop messages with `seq < keep_from` (expired or over the size bound) without
    /// acknowledging them.
    fn trim_inbox(&self, terminal: &str, keep_from: u64) -> Durable;

    /// Record where the terminal can be woken.
    fn set_wake(&self, terminal: &str, registration: &WakeRegistration) -> Durable;

    /// Terminals that have unacknowledged messages (to go on waking them after a restart).
    fn terminals_with_pending_inbox(&self) -> Result<Vec<String>, StoreError>;
}

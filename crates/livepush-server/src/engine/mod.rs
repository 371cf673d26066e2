//! The engine: everything the nodes of one deployment share.
//!
//! A node (one `livepush serve` process) keeps its connections, each room's members and a
//! cache of each room's recent history. Everything that must be the same whichever node a
//! terminal or the backend reaches lives behind the [`Engine`] trait:
//!
//! - **Sequencing and history.** [`Engine::publish`] gives a reliable message the room's next
//!   `seq` (contiguous `u64`s within an epoch; epochs are opaque strings), stores it in the
//!   room's history together with the room's flags when it is a control message, all in one
//!   atomic step, and resolves once that step is durable. [`Engine::history`] reads a range
//!   of it; [`Engine::reset`] starts a new epoch.
//! - **Fan-out between nodes.** A node [`opens`](Engine::open) a room when it first needs it
//!   (a first member joins, a pull) and [`closes`](Engine::close) it when it no longer does;
//!   the engine hands the node one ordered stream of [`Event`]s for the rooms it has open:
//!   reliable messages, transient messages of other nodes, online counts, epoch changes.
//!   **No node delivers a reliable message before the engine handed it over**, and the engine
//!   hands it over only once it is stored: that is what makes a message cross nodes before
//!   anyone delivers it.
//! - **Presence** across nodes, when the engine shares it ([`Engine::shares_presence`]).
//!
//! The stream's promise is order per room and nothing before it is stored. It does not
//! promise that nothing is skipped or repeated (a pub/sub link to other nodes may drop and
//! come back): the node detects a skipped `seq`, a repeated one, or another epoch, and repairs
//! from [`Engine::history`] (see `hub::feed`). On one node ([`local::LocalEngine`]) the stream
//! is exact: each reliable message is handed over once, in order, before its publish is
//! answered.
//!
//! Inboxes, acknowledgements and wake registrations sit behind the sibling seam
//! [`InboxEngine`]: sequenced and stored by the engine, delivered by the node that holds the
//! terminal's session.

pub mod local;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use livepush_proto::SeqTemplate;

use crate::control::Action;
use crate::store::{
    InboxMessage, RoomFlags, StoreError, StoredMessage, TerminalRecord, WakeRegistration,
};

/// A pending engine operation.
pub type EngineFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, EngineError>> + Send + 'a>>;

/// Why the engine could not do what it was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The store behind the engine failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The shared backend cannot be reached; the caller may retry later (HTTP 503).
    #[error("the engine is unavailable: {0}")]
    Unavailable(String),
}

/// How much of a room's history is kept: at most `max_messages`, none older than `ttl`.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_messages: usize,
    pub ttl: Duration,
}

/// A room as the engine knows it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub epoch: Arc<str>,
    /// The last seq handed over to nodes (every message up to it is stored).
    pub seq: u64,
    pub flags: RoomFlags,
    /// Terminals in the room across every node, when the engine shares presence.
    pub online: u64,
    /// The newest kept messages, oldest first (as many as asked for).
    pub history: Vec<StoredMessage>,
}

/// Reliable messages read from a room's history.
#[derive(Debug, Clone)]
pub struct History {
    pub epoch: Arc<str>,
    /// The last seq handed over to nodes.
    pub latest: u64,
    /// The oldest seq still kept (`latest + 1` when nothing is kept).
    pub first: u64,
    pub messages: Vec<StoredMessage>,
}

impl History {
    /// Whether a reader at `since` misses nothing: nothing between `since` and the first
    /// returned message is gone, and `since` is not beyond what the history ever had.
    pub fn recovered(&self, since: u64) -> bool {
        since <= self.latest && (since == self.latest || since + 1 >= self.first)
    }
}

/// A reliable message to publish.
#[derive(Debug, Clone, Copy)]
pub struct Publish<'a> {
    pub room: &'a str,
    /// The `msg` frame, encoded but for its seq.
    pub frame: &'a SeqTemplate,
    pub ts: u64,
    /// What a control message does to the room (applied with the append, atomically).
    pub action: Option<Action>,
}

/// Where a published message landed.
#[derive(Debug, Clone)]
pub struct Sequenced {
    pub epoch: Arc<str>,
    pub seq: u64,
}

/// What an engine hands its node, in order per room.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A stored reliable message (and what it does to the room, for a control message).
    Reliable {
        room: &'a str,
        epoch: &'a str,
        message: &'a StoredMessage,
        action: Option<Action>,
    },
    /// A transient message published on another node (this node's members got its own
    /// transient messages from the hub directly: they are neither stored nor ordered).
    Transient { room: &'a str, frame: &'a Bytes },
    /// The room's online count across nodes changed (engines that share presence).
    Online { room: &'a str, count: u64 },
    /// The link that carries the events was lost (and is being restored): every open room
    /// may have missed messages, or even its history (a restarted or flushed store).
    LinkLost,
    /// The engine's stream of `room`'s events is (re)established (a subscription confirmed):
    /// everything published before is in the room's history, everything after comes through
    /// the stream. A room reads what it may have missed in between, once its reads are
    /// ordered after this (an engine whose stream cannot lag behind its reads never sends it).
    Subscribed { room: &'a str },
    /// The room's history was lost or reset: it goes on in `epoch` after `seq`.
    Epoch {
        room: &'a str,
        epoch: &'a str,
        seq: u64,
    },
    /// Another node asks this one to wake `terminal`: this node received its last keepalive,
    /// so its socket holds the terminal's NAT mapping.
    Wake { terminal: &'a str },
    /// A direct message to a terminal (see [`InboxEngine`]).
    Inbox {
        terminal: &'a str,
        message: &'a InboxMessage,
    },
}

/// What receives an engine's events: the node's hub.
pub trait Node: Send + Sync + 'static {
    fn on_event(&self, event: Event<'_>);
}

/// Rooms shared between nodes. See the module documentation.
pub trait Engine: Send + Sync + std::fmt::Debug + 'static {
    /// Hand this node's events to `node` from now on. Called once, before anything else.
    fn attach(&self, node: Weak<dyn Node>);

    /// What is known of `room` (created with a new epoch if it never existed), with its newest
    /// `keep` messages, and start handing this node the room's events: the events that follow
    /// continue after the returned `seq`.
    fn open(&self, room: &str, keep: usize) -> EngineFuture<'_, Snapshot>;

    /// This node no longer needs `room`'s events.
    fn close(&self, room: &str);

    /// What is known of `room` without creating it or opening it (`None`: never published to
    /// or joined, or forgotten since, once nothing of it was retained). No history.
    fn info(&self, room: &str) -> EngineFuture<'_, Option<Snapshot>>;

    /// Sequence, store and hand over a reliable message; see the module documentation.
    fn publish<'a>(&'a self, message: Publish<'a>) -> EngineFuture<'a, Sequenced>;

    /// Counters of the shared backend's calls, for `/metrics` (none on one node).
    fn stats(&self) -> Option<crate::metrics::EngineStats> {
        None
    }

    /// How long the embedded store's commits take, for `/metrics` (none on Redis or in memory).
    fn store_commit_seconds(&self) -> Option<prometheus_client::metrics::histogram::Histogram> {
        None
    }

    /// [`Engine::publish`] for several messages at once (batch publish): one answer per
    /// message, in order; messages to one room are sequenced in the order given. Both
    /// engines make it one store commit (the single node sequences them all before awaiting
    /// any write, so its group commit takes them together) or one Redis round trip.
    fn publish_many<'a>(
        &'a self,
        batch: &'a [Publish<'a>],
    ) -> EngineFuture<'a, Vec<Result<Sequenced, EngineError>>>;

    /// Tell the other nodes that have `room` open about a transient message.
    fn broadcast(&self, room: &str, frame: &Bytes);

    /// Reliable messages of `room` with `seq > since`, up to the last one handed over: at
    /// most `limit`, and no more than `max_bytes` of frames (but at least one). `None` for a
    /// room that never existed.
    fn history(
        &self,
        room: &str,
        since: u64,
        limit: usize,
        max_bytes: usize,
    ) -> EngineFuture<'_, Option<History>>;

    /// Start a new history of `room` (a new epoch, seq 0, nothing kept; its flags stay). Nodes
    /// get an [`Event::Epoch`] after the messages published before it.
    fn reset(&self, room: &str) -> EngineFuture<'_, Sequenced>;

    /// Whether the engine counts a room's terminals across nodes. When it does not, a node's
    /// own count is the count.
    fn shares_presence(&self) -> bool {
        false
    }

    /// A terminal became present in (or left) `room` on this node.
    fn presence(&self, _room: &str, _terminal: &str, _present: bool) {}

    /// Periodic upkeep (history retention).
    fn tick(&self);

    /// Whether the engine's shared backend answered its last calls (`/healthz`).
    fn healthy(&self) -> bool {
        true
    }

    /// Resolves once everything submitted so far is durable (called at shutdown).
    fn flush(&self) -> EngineFuture<'_, ()>;

    /// Share this node's stats record (opaque JSON, for the admin page: [`crate::admin`]) for
    /// `ttl`, and list the records of every node that shared one within its `ttl`, this
    /// node's included. On one node that is `mine` alone.
    fn node_stats<'a>(&'a self, mine: &'a str, ttl: Duration) -> EngineFuture<'a, Vec<String>>;
}

/// What one node knows of a terminal, shared with the other nodes so that the service list
/// (`GET /v1/terminals`) answers the same on every node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TerminalPresence {
    /// Sessions open on the node, per transport.
    pub ws: u32,
    pub sse: u32,
    pub polls: u32,
    /// Wall clock (ms) until which a long-poll terminal counts as online after its last poll.
    pub grace_until_ms: u64,
    pub last_seen_ms: u64,
    /// WebSocket interruptions within the flap window when this was written.
    pub interruptions: u32,
}

impl TerminalPresence {
    pub fn online(&self, now_ms: u64) -> bool {
        self.ws > 0 || self.sse > 0 || self.polls > 0 || self.grace_until_ms > now_ms
    }
}

/// Inboxes shared between nodes: per-terminal direct messages sequenced and stored by the
/// engine, acknowledgements, and wake registrations. The node holding a session of the
/// terminal delivers what the engine hands it ([`Event::Inbox`]).
pub trait InboxEngine: Send + Sync + std::fmt::Debug + 'static {
    /// What is known of `terminal` (its inbox position, unacknowledged messages and wake
    /// registration), or `None` if it was never stored.
    fn load_terminal(&self, terminal: &str) -> EngineFuture<'_, Option<TerminalRecord>>;

    /// This node takes the terminal's inbox (a session, or a wake-up to send): from now on
    /// hand it the terminal's direct messages posted on any node, until
    /// [`InboxEngine::unwatch`], and load what is known of it ([`InboxEngine::load_terminal`]).
    /// Registering comes before reading, so that a message posted meanwhile is in the record,
    /// handed over, or both (the inbox drops a seq it already has), never neither.
    fn load_and_watch(&self, terminal: &str) -> EngineFuture<'_, Option<TerminalRecord>> {
        self.load_terminal(terminal)
    }

    /// This node no longer holds the terminal's inbox.
    fn unwatch(&self, _terminal: &str) {}

    /// Sequence and store a direct message (its `inbox` frame encoded but for its seq);
    /// resolves once durable, after the message was handed over as an [`Event::Inbox`].
    fn post<'a>(
        &'a self,
        terminal: &'a str,
        frame: &'a SeqTemplate,
        ts: u64,
    ) -> EngineFuture<'a, InboxMessage>;

    /// The terminal handled everything up to `seq`.
    fn ack(&self, terminal: &str, seq: u64);

    /// Messages before `keep_from` are dropped unacknowledged (expired, over the bound).
    fn trim(&self, terminal: &str, keep_from: u64);

    /// Record where the terminal can be woken.
    fn set_wake(&self, terminal: &str, registration: &WakeRegistration);

    /// Accept a keepalive (MAC checked, and newer than the last this node accepted) only if
    /// it is newer than every keepalive any node accepted for the terminal, recording its
    /// registration: `false` for a replay. Engines whose registrations belong to one node
    /// leave the check to the node's memory ([`crate::inbox::Inboxes::last_keepalive_ts`]).
    fn accept_keepalive<'a>(
        &'a self,
        _terminal: &'a str,
        _registration: &'a WakeRegistration,
    ) -> EngineFuture<'a, bool> {
        Box::pin(std::future::ready(Ok(true)))
    }

    /// Wake `terminal` from the node whose socket received its last keepalive, when that is
    /// another node and it is alive: `true` if the wake was handed over, `false` if this node
    /// should send it itself.
    fn wake_elsewhere<'a>(&'a self, _terminal: &'a str) -> EngineFuture<'a, bool> {
        Box::pin(std::future::ready(Ok(false)))
    }

    /// Whether [`InboxEngine::accept_keepalive`] compares with every keepalive ever accepted
    /// (true with Redis, where each one is written), so that a node needs no guard of its own
    /// against keepalives captured before it started (see `inbox.rs`, "Replays across
    /// restarts"): the single-node store keeps the newest `ts` only now and then.
    fn remembers_every_keepalive(&self) -> bool {
        false
    }

    /// Terminals with unacknowledged messages (to go on waking them after a restart).
    fn pending_terminals(&self) -> EngineFuture<'_, Vec<String>>;

    /// Whether the service list is shared between nodes (then the node hands its changes to
    /// [`InboxEngine::share_terminals`] and asks [`InboxEngine::terminals_elsewhere`]).
    fn shares_terminals(&self) -> bool {
        false
    }

    /// What this node now knows of terminals whose presence changed here; kept for
    /// `retention` after the terminal was last seen.
    fn share_terminals(&self, _changed: Vec<(Arc<str>, TerminalPresence)>, _retention: Duration) {}

    /// What the other live nodes know of each of `terminals` (in the same order); a node
    /// that is gone contributes its `last_seen_ms` but no session.
    fn terminals_elsewhere<'a>(
        &'a self,
        terminals: &'a [String],
    ) -> EngineFuture<'a, Vec<Vec<TerminalPresence>>> {
        Box::pin(std::future::ready(Ok(vec![Vec::new(); terminals.len()])))
    }

    /// Every terminal any node saw within the retention.
    fn known_terminals(&self) -> EngineFuture<'_, Vec<String>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }
}

/// Run an engine write in the background, logging a failure.
pub(crate) fn spawn_logged(
    what: &'static str,
    w: impl Future<Output = Result<(), StoreError>> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(e) = w.await {
            tracing::error!(error = %e, "store write failed: {what}");
        }
    });
}

//! The single-node engine: rooms sequenced in this process, their histories and terminals'
//! inboxes kept by a [`Store`] (in memory, or the embedded redb file).
//!
//! # Publishing
//!
//! A reliable publish takes the room's lock twice. First to take the next `seq`, apply a
//! control message's action to the room's flags, and hand the message (with the new flags,
//! one write) to the store, in `seq` order; then, once the store says the write is durable,
//! to hand every pending message up to it to the node, in order. Whoever's write completes
//! first hands over those before it, so the node gets each message once and strictly in
//! order, and never waits on the disk longer than the publish answer does. The node has the
//! message before its publish is answered: on one node a publisher that reads the history
//! right after sees what it published.
//!
//! A reset ([`Engine::reset`]) goes through the same queue: the messages published before it
//! are handed over in the old epoch, then an [`Event::Epoch`], then the new epoch's messages.
//!
//! # What is shown
//!
//! The engine keeps each room's recent history in memory (bounded by the retention), and
//! serves snapshots and history reads from there, so what it shows never depends on whether
//! the store has committed a write yet (under `--durability none` a write is answered before
//! it is committed). Only messages already handed to the node are shown. The store is read
//! when a room is first used after a start, and trimmed to the retention by [`Engine::tick`].
//!
//! # Rooms in memory
//!
//! Invariant: the engine holds a room only while it is used. A room nobody used for the idle
//! time ([`RoomLimits::idle`], at least [`MIN_IDLE_MS`]), with no write waiting, and that no
//! caller holds, is dropped by [`Engine::tick`] and loaded from the store again on its next
//! use; past [`RoomLimits::max_rooms`] rooms, the least recently used of those idle for
//! [`MIN_IDLE_MS`] go first. So memory and the tick's work follow the rooms in use, not every
//! room ever touched. The minimum idle time is there for `--durability none`, whose writes are
//! answered before the store commits them: a room is reloaded only once its last write is
//! readable (the store commits within a second), or a reload could hand out a seq again.
//!
//! A room that is only opened (a terminal joins or pulls it) and never published to is not
//! written to the store: it gets an epoch in memory, and the store's record is created with
//! its first publish or reset. So terminals cannot fill the store with empty rooms. Such a
//! room leaves memory only once the node closed it ([`Engine::close`], when its last member
//! left), since loaded again it gets a new epoch; that only tells terminals that come back
//! `recovered:false` for a history that never had anything.
//!
//! # Rooms leaving the store
//!
//! Invariant: the store keeps a room's record (epoch, last seq, flags) only while it retains
//! something of it: a message, or flags other than the default. When a room leaves memory
//! with nothing retained (its whole history trimmed by the retention), no member (the node
//! does not hold it: never opened, or closed since), no write waiting and default flags, the
//! engine asks the store to forget the record
//! ([`HistoryStore::forget`](crate::store::HistoryStore::forget), conditional on the epoch, so
//! a newer record is never deleted) instead of dropping it at once. Until the store answered,
//! the room stays in memory as its own tombstone: it already has a fresh epoch, not recorded,
//! so a use racing the forget never loads the record being deleted, and its first write
//! creates the new record after the forget (the store writes in submission order). The next
//! use of a forgotten room, also after a restart, gets a new epoch, with seqs from 1: terminals
//! that resume are told `recovered:false`, and there was nothing retained to replay; no seq
//! is handed out twice under one epoch. The store answers a forget only once a read no longer
//! sees the record, under `--durability none` too. A failed forget is logged and leaves the
//! record: the room, once it leaves memory, is loaded from it on its next use.
//!
//! Rooms with flags (muted, closed) keep their record: a close or mute must outlive its
//! control message's retention, or an expired "close" would reopen the room.
//!
//! Rooms not in memory (they left it with messages retained, or were not used since the
//! start) are found by a sweep of the store's records in key order, [`RoomLimits::sweep_rooms`]
//! of them per [`Engine::tick`] (`--store-sweep-rooms`): one whose newest message is past the
//! retention, with no member, is taken into memory as a tombstone and forgotten as above. A
//! record it read is not acted on if any room left memory meanwhile (it may predate that
//! room's last write); the next round looks again.
//!
//! # Failed writes
//!
//! Invariant: a message is handed to the node (delivered, shown in snapshots and the history)
//! only once its write is durable, and never after a write of its room failed before it. The
//! store refuses every append and reset of a room after one of them failed, until the engine
//! recovers the room ([`HistoryStore::recover`](crate::store::HistoryStore::recover)); so a
//! write that succeeds means every earlier one of that room did, and handing over everything
//! pending up to it stays right. The first task to see a failure of its room takes every entry
//! still pending (none of them shown), marks them discarded, and queues a recover: a new epoch,
//! handed to the node as an [`Event::Epoch`] once written (or once it failed: the store
//! re-applies it with its next commit). Each discarded publish (or reset) answers with the
//! store's error (its own, or [`StoreError::Broken`]), so a failed group commit answers every
//! publish in it with an error and delivers none of them, and the clients of the room get a new
//! epoch (`recovered:false`), never a hole. A message that was durable but discarded this way
//! (its task had not yet run) is deleted by the recover. Under `--durability none` writes are
//! answered (and handed over) before they are written; a loss there is caught by the store,
//! which gives every room a new epoch at the next start.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use livepush_proto::SeqTemplate;
use parking_lot::{Mutex, RwLock};

use super::{
    Engine, EngineError, EngineFuture, Event, History, InboxEngine, Node, Publish, Retention,
    Sequenced, Snapshot, spawn_logged,
};
use crate::clock::now_ms;
use crate::control::Action;
use crate::store::{
    InboxMessage, RoomFlags, RoomRecord, Store, StoreError, StoredMessage, TerminalRecord,
    WakeRegistration, new_epoch,
};

/// How many rooms the engine keeps in memory (see "Rooms in memory"), and how fast it sweeps
/// the stored ones (see "Rooms leaving the store").
#[derive(Debug, Clone, Copy)]
pub struct RoomLimits {
    /// A room unused this long (and at least [`MIN_IDLE_MS`]) leaves memory.
    pub idle: Duration,
    /// Most rooms kept; beyond it the least recently used leave (if idle [`MIN_IDLE_MS`]).
    pub max_rooms: usize,
    /// Stored rooms looked at per [`Engine::tick`] by the sweep of rooms not in memory: the
    /// bound on its store reads per tick.
    pub sweep_rooms: usize,
}

/// Default of [`RoomLimits::sweep_rooms`].
pub const DEFAULT_SWEEP_ROOMS: usize = 64;

impl Default for RoomLimits {
    fn default() -> Self {
        RoomLimits {
            idle: Duration::from_secs(60),
            max_rooms: 100_000,
            sweep_rooms: DEFAULT_SWEEP_ROOMS,
        }
    }
}

/// The least time a room stays in memory after its last use (see "Rooms in memory").
pub const MIN_IDLE_MS: u64 = 10_000;

/// A reliable message between its sequencing and its write: the room, its queue ticket, its
/// answer, and the write.
type Started = (
    Arc<Room>,
    (u64, Arc<AtomicBool>),
    Sequenced,
    crate::store::Durable,
);

/// See the module documentation.
pub struct LocalEngine {
    store: Arc<dyn Store>,
    retention: Retention,
    limits: RoomLimits,
    /// The rooms in memory (see "Rooms in memory").
    rooms: RwLock<HashMap<Arc<str>, Arc<Room>>>,
    /// The rooms the node holds: opened, and not closed since (in memory or not).
    held: Mutex<HashSet<Arc<str>>>,
    /// Rooms dropped from memory so far: the sweep of stored rooms does not act on a record
    /// it read before one left (it may be stale; see [`LocalEngine::sweep_store`]).
    dropped: AtomicU64,
    /// Where the next step of the sweep of stored rooms starts (after this room).
    sweep_after: Mutex<Option<String>>,
    /// Inbox sequencing state of terminals posted to recently.
    inboxes: Mutex<HashMap<Arc<str>, Arc<Inbox>>>,
    node: OnceLock<Weak<dyn Node>>,
}

impl std::fmt::Debug for LocalEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEngine")
            .field("store", &self.store)
            .field("rooms", &self.rooms.read().len())
            .finish_non_exhaustive()
    }
}

struct Room {
    id: Arc<str>,
    /// When it was last used (ms).
    used_ms: AtomicU64,
    state: Mutex<RoomState>,
}

struct RoomState {
    /// The history being written: its epoch, the last seq handed out, and the flags as of it.
    epoch: Arc<str>,
    assigned: u64,
    flags: RoomFlags,
    /// What the node has been handed: the epoch, the last seq, and the flags as of it.
    shown: Shown,
    /// Sequenced entries waiting for the store, in order.
    pending: VecDeque<Pending>,
    next_ticket: u64,
    /// Messages handed over and still kept, oldest first, contiguous seqs (of `shown.epoch`).
    history: VecDeque<StoredMessage>,
    /// The oldest seq the store was last asked to keep.
    store_keep_from: u64,
    /// The store has a record of the room (see "Rooms in memory").
    recorded: bool,
}

#[derive(Clone)]
struct Shown {
    epoch: Arc<str>,
    seq: u64,
    flags: RoomFlags,
}

struct Pending {
    /// Order of submission (seqs restart in a new epoch; tickets do not).
    ticket: u64,
    item: Item,
    /// Set when the entry is dropped unshown after a failed write (see "Failed writes").
    discarded: Arc<AtomicBool>,
}

enum Item {
    Message {
        message: StoredMessage,
        action: Option<Action>,
        /// The room's flags once this message applied.
        flags: RoomFlags,
    },
    Reset {
        epoch: Arc<str>,
    },
}

impl RoomState {
    fn from_record(record: RoomRecord, retention: Retention, now: u64) -> RoomState {
        let epoch: Arc<str> = Arc::from(record.epoch);
        let mut history: VecDeque<StoredMessage> = record.history.into();
        trim(&mut history, retention, now);
        let store_keep_from = history.front().map_or(record.seq + 1, |m| m.seq);
        RoomState {
            shown: Shown {
                epoch: epoch.clone(),
                seq: record.seq,
                flags: record.flags,
            },
            epoch,
            assigned: record.seq,
            flags: record.flags,
            pending: VecDeque::new(),
            next_ticket: 0,
            history,
            store_keep_from,
            recorded: true,
        }
    }

    /// Queue `item` behind everything pending; returns its ticket and its discarded flag.
    fn push(&mut self, item: Item) -> (u64, Arc<AtomicBool>) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let discarded = Arc::new(AtomicBool::new(false));
        self.pending.push_back(Pending {
            ticket,
            item,
            discarded: discarded.clone(),
        });
        (ticket, discarded)
    }

    /// Start a new history, `epoch`, for what is sequenced from now on.
    fn renew(&mut self, epoch: Arc<str>) -> (u64, Arc<AtomicBool>) {
        self.epoch = epoch.clone();
        self.assigned = 0;
        self.store_keep_from = 1;
        self.push(Item::Reset { epoch })
    }

    fn first_kept(&self) -> u64 {
        self.history.front().map_or(self.shown.seq + 1, |m| m.seq)
    }

    fn snapshot(&self, keep: usize) -> Snapshot {
        Snapshot {
            epoch: self.shown.epoch.clone(),
            seq: self.shown.seq,
            flags: self.shown.flags,
            online: 0,
            history: self
                .history
                .iter()
                .skip(self.history.len().saturating_sub(keep))
                .cloned()
                .collect(),
        }
    }
}

/// Drop messages beyond the retention's count, and older than its age.
fn trim(history: &mut VecDeque<StoredMessage>, retention: Retention, now: u64) {
    while history.len() > retention.max_messages {
        history.pop_front();
    }
    let cutoff = now.saturating_sub(retention.ttl.as_millis() as u64);
    while history.front().is_some_and(|m| m.ts < cutoff) {
        history.pop_front();
    }
}

/// A terminal's inbox sequencing state.
struct Inbox {
    state: Mutex<InboxState>,
}

/// An inbox post between its sequencing and its hand-over. Entries leave the front of the
/// queue once their write's outcome is known: a durable one is handed to the node, a failed
/// one is dropped (its seq stays a hole: acks are cumulative, and a node that sees a seq jump
/// reads the inbox again), and the post is answered then. So a message is delivered only once
/// durable, in seq order, and its post resolves after its hand-over. The outcome is recorded
/// by a task of its own, so a post whose caller went away does not hold back later ones.
struct PendingPost {
    seq: u64,
    message: InboxMessage,
    outcome: Option<Result<(), StoreError>>,
    answer: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

struct InboxState {
    /// The last inbox seq handed out.
    assigned: u64,
    /// Sequenced messages waiting for the store, in seq order (see [`PendingPost`]).
    pending: VecDeque<PendingPost>,
    /// When the last message was posted (ms), for forgetting idle terminals.
    touched_ms: u64,
}

/// How long a terminal's inbox sequencing state is kept after its last post. Long enough for
/// every write to have been committed, so that the seq read back from the store on the next
/// post is the last one handed out, also under `--durability none` (which commits within a
/// second).
const INBOX_IDLE_MS: u64 = 300_000;

impl LocalEngine {
    pub fn new(store: Arc<dyn Store>, retention: Retention) -> LocalEngine {
        LocalEngine {
            store,
            retention,
            limits: RoomLimits::default(),
            rooms: RwLock::new(HashMap::new()),
            held: Mutex::new(HashSet::new()),
            dropped: AtomicU64::new(0),
            sweep_after: Mutex::new(None),
            inboxes: Mutex::new(HashMap::new()),
            node: OnceLock::new(),
        }
    }

    /// Keep rooms in memory as `limits` say.
    pub fn with_room_limits(mut self, limits: RoomLimits) -> LocalEngine {
        self.limits = limits;
        self
    }

    /// Rooms in memory.
    pub fn room_count(&self) -> usize {
        self.rooms.read().len()
    }

    fn node(&self) -> Option<Arc<dyn Node>> {
        self.node.get().and_then(Weak::upgrade)
    }

    /// The room, loaded from the store on first use; created (a new epoch) if the store never
    /// had it and `create` says so.
    fn room(&self, id: &str, create: bool) -> Result<Option<Arc<Room>>, EngineError> {
        let now = now_ms();
        let used = |r: &Arc<Room>| {
            r.used_ms.store(now, Ordering::Relaxed);
            Ok(Some(r.clone()))
        };
        if let Some(r) = self.rooms.read().get(id) {
            return used(r);
        }
        let record = self.store.load_room(id, self.retention.max_messages)?;
        let mut rooms = self.rooms.write();
        if let Some(r) = rooms.get(id) {
            return used(r);
        }
        let (record, recorded) = match record {
            Some(record) => (record, true),
            // Written with its first publish or reset (see "Rooms in memory").
            None if create => (
                RoomRecord {
                    epoch: new_epoch(),
                    seq: 0,
                    history: Vec::new(),
                    flags: RoomFlags::default(),
                },
                false,
            ),
            None => return Ok(None),
        };
        let key: Arc<str> = Arc::from(id);
        let room = Arc::new(Room {
            id: key.clone(),
            used_ms: AtomicU64::new(now),
            state: Mutex::new(RoomState {
                recorded,
                ..RoomState::from_record(record, self.retention, now)
            }),
        });
        rooms.insert(key, room.clone());
        Ok(Some(room))
    }

    /// Before the first write of a room that the store has no record of: create the record
    /// (submitted first, so written first).
    fn record(&self, room: &Room, st: &mut RoomState) {
        if !st.recorded {
            st.recorded = true;
            spawn_logged("create room", self.store.create_room(&room.id, &st.epoch));
        }
    }

    /// Drop the rooms that are idle, and the least recently used beyond the limit (see
    /// "Rooms in memory"); forget those with nothing retained (see "Rooms leaving the store").
    fn evict(&self, now: u64) {
        let idle_ms = (self.limits.idle.as_millis() as u64).max(MIN_IDLE_MS);
        // Lock order: the rooms' map, then `held` (nothing takes them the other way round).
        let mut rooms = self.rooms.write();
        let held = self.held.lock();
        let unused_for = |r: &Arc<Room>| {
            // Nobody else holds it (under the map's write lock no one can take it; nor does a
            // forget of its former record), and no write of it is waiting.
            // A room the store has no record of leaves only once the node closed it: loaded
            // again it would get a new epoch under its members.
            let free = Arc::strong_count(r) == 1 && {
                let st = r.state.lock();
                st.pending.is_empty() && (st.recorded || !held.contains(&r.id))
            };
            free.then(|| now.saturating_sub(r.used_ms.load(Ordering::Relaxed)))
        };
        let before = rooms.len();
        rooms.retain(|_, r| unused_for(r).is_none_or(|t| t < idle_ms) || self.forget(r, &held));
        self.dropped
            .fetch_add((before - rooms.len()) as u64, Ordering::SeqCst);
        let over = rooms.len().saturating_sub(self.limits.max_rooms);
        if over == 0 {
            return;
        }
        let mut oldest: Vec<(u64, Arc<str>)> = rooms
            .iter()
            .filter_map(|(id, r)| {
                unused_for(r)
                    .filter(|t| *t >= MIN_IDLE_MS)
                    .map(|t| (t, id.clone()))
            })
            .collect();
        oldest.sort_unstable_by_key(|o| std::cmp::Reverse(o.0));
        for (_, id) in oldest.into_iter().take(over) {
            if !rooms.get(&id).is_some_and(|r| self.forget(r, &held)) {
                rooms.remove(&id);
                self.dropped.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// A room leaving memory: if nothing of it is retained, no member holds it and its flags
    /// are the default, ask the store to forget its record and keep the room, with a fresh
    /// epoch that is not recorded, until the store answered (see "Rooms leaving the store").
    /// Returns whether it did (the room stays).
    fn forget(&self, room: &Arc<Room>, held: &HashSet<Arc<str>>) -> bool {
        let mut st = room.state.lock();
        let retained = !st.history.is_empty() || st.flags != RoomFlags::default();
        if !st.recorded || retained || held.contains(&room.id) {
            return false;
        }
        let fresh: Arc<str> = Arc::from(new_epoch());
        let former = std::mem::replace(&mut st.epoch, fresh.clone());
        st.shown = Shown {
            epoch: fresh,
            seq: 0,
            flags: RoomFlags::default(),
        };
        st.assigned = 0;
        st.store_keep_from = 1;
        st.recorded = false;
        let forgotten = self.store.forget(&room.id, &former);
        // Held until the store answered: the room does not leave memory before.
        let tombstone = room.clone();
        tokio::spawn(async move {
            if let Err(e) = forgotten.await {
                tracing::warn!(room = %tombstone.id, error = %e, "forgetting a room failed: its record stays");
            }
        });
        true
    }

    /// One step of the sweep of the store's rooms that are not in memory (see "Rooms leaving
    /// the store"): the next [`RoomLimits::sweep_rooms`] of them in key order; those with
    /// nothing retained and no member are taken into memory as tombstones and forgotten, as if
    /// they had just left memory.
    fn sweep_store(&self, now: u64) {
        let limit = self.limits.sweep_rooms;
        if limit == 0 {
            return;
        }
        let mut after = self.sweep_after.lock();
        let ids = match self.store.rooms_after(after.as_deref(), limit) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the stored rooms to sweep");
                return;
            }
        };
        *after = (ids.len() == limit).then(|| ids.last().cloned()).flatten();
        drop(after);
        let cutoff = now.saturating_sub(self.retention.ttl.as_millis() as u64);
        let keep = self.retention.max_messages.min(1);
        for id in ids {
            if self.rooms.read().contains_key(id.as_str()) || self.held.lock().contains(id.as_str())
            {
                continue;
            }
            let dropped = self.dropped.load(Ordering::SeqCst);
            let record = match self.store.load_room(&id, keep) {
                Ok(Some(record)) => record,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(room = %id, error = %e, "cannot read a stored room to sweep");
                    continue;
                }
            };
            // Messages are in seq order, and so in time order: the newest says it all.
            let expired = record.history.last().is_none_or(|m| m.ts < cutoff);
            if !expired {
                continue;
            }
            let mut rooms = self.rooms.write();
            // Loaded, or left memory since the read (the record may be older than its last
            // write): left for the next round.
            if rooms.contains_key(id.as_str()) || self.dropped.load(Ordering::SeqCst) != dropped {
                continue;
            }
            let key: Arc<str> = Arc::from(id);
            let room = Arc::new(Room {
                id: key.clone(),
                // Leaves memory at the first eviction once forgotten.
                used_ms: AtomicU64::new(0),
                state: Mutex::new(RoomState::from_record(record, self.retention, now)),
            });
            // Not if it has flags (or is held after all).
            if self.forget(&room, &self.held.lock()) {
                rooms.insert(key, room);
            }
        }
    }

    fn created(&self, id: &str) -> Result<Arc<Room>, EngineError> {
        self.room(id, true)?
            .ok_or_else(|| EngineError::Unavailable("room creation failed".into()))
    }

    /// Hand every pending entry up to `ticket` to the node, in order.
    fn show_through(&self, room: &Room, ticket: u64) {
        let node = self.node();
        let retention = self.retention;
        let mut st = room.state.lock();
        while st.pending.front().is_some_and(|p| p.ticket <= ticket) {
            let Some(p) = st.pending.pop_front() else {
                break;
            };
            match p.item {
                Item::Message {
                    message,
                    action,
                    flags,
                } => {
                    st.shown.seq = message.seq;
                    st.shown.flags = flags;
                    if let Some(node) = &node {
                        node.on_event(Event::Reliable {
                            room: &room.id,
                            epoch: &st.shown.epoch,
                            message: &message,
                            action,
                        });
                    }
                    st.history.push_back(message);
                    while st.history.len() > retention.max_messages {
                        st.history.pop_front();
                    }
                }
                Item::Reset { epoch } => {
                    st.shown.epoch = epoch;
                    st.shown.seq = 0;
                    st.history = VecDeque::new();
                    if let Some(node) = &node {
                        node.on_event(Event::Epoch {
                            room: &room.id,
                            epoch: &st.shown.epoch,
                            seq: 0,
                        });
                    }
                }
            }
        }
    }

    /// A reliable message sequenced (its seq, the room's flags) and handed to the store, not
    /// yet durable: see [`LocalEngine::settled`].
    fn sequence(&self, p: Publish<'_>) -> Result<Started, EngineError> {
        let room = self.created(p.room)?;
        let (ticket, sequenced, durable) = {
            let mut st = room.state.lock();
            st.assigned += 1;
            let seq = st.assigned;
            let message = StoredMessage {
                seq,
                ts: p.ts,
                frame: p.frame.with_seq(seq),
            };
            let before = st.flags;
            if let Some(action) = p.action {
                st.flags = action.apply(before);
            }
            let changed = (st.flags != before).then_some(st.flags);
            self.record(&room, &mut st);
            let durable = self.store.append(&room.id, &message, changed);
            let flags = st.flags;
            let ticket = st.push(Item::Message {
                message,
                action: p.action,
                flags,
            });
            let sequenced = Sequenced {
                epoch: st.epoch.clone(),
                seq,
            };
            (ticket, sequenced, durable)
        };
        Ok((room, ticket, sequenced, durable))
    }

    /// Wait for a sequenced message's write, and hand it over (see "Failed writes").
    async fn settled(
        &self,
        started: Result<Started, EngineError>,
    ) -> Result<Sequenced, EngineError> {
        let (room, ticket, sequenced, durable) = started?;
        self.settle(&room, ticket, durable.await).await?;
        Ok(sequenced)
    }

    /// After the store answered the write of the entry `ticket`: hand it over with everything
    /// pending before it, or, if the write failed, discard the room's pending entries and
    /// recover it (see "Failed writes"). Ok only if the entry was handed over.
    async fn settle(
        &self,
        room: &Room,
        (ticket, discarded): (u64, Arc<AtomicBool>),
        stored: Result<(), StoreError>,
    ) -> Result<(), EngineError> {
        match stored {
            Ok(()) => self.show_through(room, ticket),
            Err(e) => {
                self.recover(room, ticket).await;
                return Err(e.into());
            }
        }
        if discarded.load(Ordering::SeqCst) {
            return Err(StoreError::Broken(room.id.to_string()).into());
        }
        Ok(())
    }

    /// The write of the entry `failed` failed: unless an earlier failure already did, discard
    /// every pending entry of the room and start a new epoch, handed over once the store
    /// answered its recover.
    async fn recover(&self, room: &Room, failed: u64) {
        let (ticket, durable) = {
            let mut st = room.state.lock();
            if !st.pending.iter().any(|p| p.ticket == failed) {
                return;
            }
            for p in st.pending.drain(..) {
                p.discarded.store(true, Ordering::SeqCst);
            }
            let epoch: Arc<str> = Arc::from(new_epoch());
            tracing::warn!(room = %room.id, %epoch, "a write failed: the room starts a new epoch");
            let durable = self.store.recover(&room.id, &epoch);
            (st.renew(epoch), durable)
        };
        if let Err(e) = durable.await {
            // The store re-applies it with its next commit, before anything written after it.
            tracing::warn!(room = %room.id, error = %e, "recovering the room failed");
        }
        self.show_through(room, ticket.0);
    }

    fn inbox(&self, terminal: &str) -> Result<Arc<Inbox>, EngineError> {
        if let Some(i) = self.inboxes.lock().get(terminal) {
            return Ok(i.clone());
        }
        let assigned = self.store.load_terminal(terminal)?.map_or(0, |r| r.seq);
        let mut inboxes = self.inboxes.lock();
        Ok(inboxes
            .entry(Arc::from(terminal))
            .or_insert_with(|| {
                Arc::new(Inbox {
                    state: Mutex::new(InboxState {
                        assigned,
                        pending: VecDeque::new(),
                        touched_ms: now_ms(),
                    }),
                })
            })
            .clone())
    }
}

impl Engine for LocalEngine {
    fn store_commit_seconds(&self) -> Option<prometheus_client::metrics::histogram::Histogram> {
        self.store.commit_seconds()
    }

    fn attach(&self, node: Weak<dyn Node>) {
        if self.node.set(node).is_err() {
            tracing::warn!("an engine can serve one node; a second attach was ignored");
        }
    }

    fn open(&self, room: &str, keep: usize) -> EngineFuture<'_, Snapshot> {
        let snapshot = self.created(room).map(|r| {
            self.held.lock().insert(r.id.clone());
            r.state.lock().snapshot(keep)
        });
        Box::pin(std::future::ready(snapshot))
    }

    fn close(&self, room: &str) {
        // Every room's events are handed to the one node; it ignores rooms it does not hold.
        // Closed, a room the store has no record of may leave memory (see "Rooms in memory").
        self.held.lock().remove(room);
    }

    fn info(&self, room: &str) -> EngineFuture<'_, Option<Snapshot>> {
        let info = self
            .room(room, false)
            .map(|r| r.map(|r| r.state.lock().snapshot(0)));
        Box::pin(std::future::ready(info))
    }

    fn publish<'a>(&'a self, p: Publish<'a>) -> EngineFuture<'a, Sequenced> {
        Box::pin(async move { self.settled(self.sequence(p)).await })
    }

    fn publish_many<'a>(
        &'a self,
        batch: &'a [Publish<'a>],
    ) -> EngineFuture<'a, Vec<Result<Sequenced, EngineError>>> {
        Box::pin(async move {
            // Every message sequenced and handed to the store before any write is awaited.
            let started: Vec<_> = batch.iter().map(|p| self.sequence(*p)).collect();
            Ok(futures_util::future::join_all(started.into_iter().map(|s| self.settled(s))).await)
        })
    }

    fn broadcast(&self, _room: &str, _frame: &Bytes) {
        // No other node to tell.
    }

    fn history(
        &self,
        room: &str,
        since: u64,
        limit: usize,
        max_bytes: usize,
    ) -> EngineFuture<'_, Option<History>> {
        let page = self.room(room, false).map(|r| {
            r.map(|r| {
                let st = r.state.lock();
                let mut bytes = 0;
                History {
                    epoch: st.shown.epoch.clone(),
                    latest: st.shown.seq,
                    first: st.first_kept(),
                    messages: st
                        .history
                        .iter()
                        .filter(|m| m.seq > since)
                        .take(limit)
                        .take_while(|m| {
                            bytes += m.frame.len();
                            bytes == m.frame.len() || bytes <= max_bytes
                        })
                        .cloned()
                        .collect(),
                }
            })
        });
        Box::pin(std::future::ready(page))
    }

    fn reset(&self, room: &str) -> EngineFuture<'_, Sequenced> {
        let room = self.created(room);
        Box::pin(async move {
            let room = room?;
            let (ticket, epoch, durable) = {
                let mut st = room.state.lock();
                let epoch: Arc<str> = Arc::from(new_epoch());
                self.record(&room, &mut st);
                let durable = self.store.reset(&room.id, &epoch);
                let ticket = st.renew(epoch.clone());
                (ticket, epoch, durable)
            };
            self.settle(&room, ticket, durable.await).await?;
            Ok(Sequenced { epoch, seq: 0 })
        })
    }

    fn tick(&self) {
        let now = now_ms();
        let rooms: Vec<Arc<Room>> = self.rooms.read().values().cloned().collect();
        for room in rooms {
            let keep_from = {
                let mut st = room.state.lock();
                trim(&mut st.history, self.retention, now);
                let keep_from = st.first_kept();
                // Not while a reset is pending: the store already holds the new epoch, whose
                // seqs start again below what the old one keeps.
                let resetting = st.epoch != st.shown.epoch;
                (keep_from > st.store_keep_from && !resetting).then(|| {
                    st.store_keep_from = keep_from;
                    keep_from
                })
            };
            if let Some(keep_from) = keep_from {
                spawn_logged("trim", self.store.trim(&room.id, keep_from));
            }
        }
        self.evict(now);
        self.sweep_store(now);
        self.inboxes.lock().retain(|_, i| {
            let st = i.state.lock();
            !st.pending.is_empty() || now.saturating_sub(st.touched_ms) < INBOX_IDLE_MS
        });
    }

    fn flush(&self) -> EngineFuture<'_, ()> {
        let flush = self.store.flush();
        Box::pin(async move { Ok(flush.await?) })
    }

    fn node_stats<'a>(&'a self, mine: &'a str, _ttl: Duration) -> EngineFuture<'a, Vec<String>> {
        // One node: nothing to share.
        Box::pin(std::future::ready(Ok(vec![mine.to_owned()])))
    }
}

impl InboxEngine for LocalEngine {
    fn load_terminal(&self, terminal: &str) -> EngineFuture<'_, Option<TerminalRecord>> {
        let record = self
            .store
            .load_terminal(terminal)
            .map_err(EngineError::from);
        Box::pin(std::future::ready(record))
    }

    fn post<'a>(
        &'a self,
        terminal: &'a str,
        frame: &'a SeqTemplate,
        ts: u64,
    ) -> EngineFuture<'a, InboxMessage> {
        Box::pin(async move {
            let inbox = self.inbox(terminal)?;
            let (message, durable, answered) = {
                let mut st = inbox.state.lock();
                st.assigned += 1;
                st.touched_ms = ts;
                let message = InboxMessage {
                    seq: st.assigned,
                    ts,
                    frame: frame.with_seq(st.assigned),
                };
                let durable = self.store.append_inbox(terminal, &message);
                let (answer, answered) = tokio::sync::oneshot::channel();
                st.pending.push_back(PendingPost {
                    seq: message.seq,
                    message: message.clone(),
                    outcome: None,
                    answer,
                });
                (message, durable, answered)
            };
            let (node, seq, terminal_id) = (self.node(), message.seq, terminal.to_owned());
            tokio::spawn(async move {
                let stored = durable.await;
                let mut st = inbox.state.lock();
                if let Some(p) = st.pending.iter_mut().find(|p| p.seq == seq) {
                    p.outcome = Some(stored);
                }
                while st.pending.front().is_some_and(|p| p.outcome.is_some()) {
                    let Some(PendingPost {
                        message,
                        outcome: Some(outcome),
                        answer,
                        ..
                    }) = st.pending.pop_front()
                    else {
                        break;
                    };
                    if let (Ok(()), Some(node)) = (&outcome, &node) {
                        node.on_event(Event::Inbox {
                            terminal: &terminal_id,
                            message: &message,
                        });
                    }
                    let _ = answer.send(outcome);
                }
            });
            answered.await.unwrap_or(Err(StoreError::Closed))?;
            Ok(message)
        })
    }

    fn ack(&self, terminal: &str, seq: u64) {
        spawn_logged("inbox ack", self.store.ack_inbox(terminal, seq));
    }

    fn trim(&self, terminal: &str, keep_from: u64) {
        spawn_logged("inbox trim", self.store.trim_inbox(terminal, keep_from));
    }

    fn set_wake(&self, terminal: &str, registration: &WakeRegistration) {
        spawn_logged(
            "wake registration",
            self.store.set_wake(terminal, registration),
        );
    }

    fn pending_terminals(&self) -> EngineFuture<'_, Vec<String>> {
        let ids = self
            .store
            .terminals_with_pending_inbox()
            .map_err(EngineError::from);
        Box::pin(std::future::ready(ids))
    }
}

#[cfg(test)]
mod tests;

//! The hub: this node's rooms.
//!
//! The hub opens a room through the [`Engine`] the first time a terminal of this node needs
//! it (a join, a pull), delivers to the room's members exactly what the engine hands the node
//! (reliable messages in order, through each room's [`feed`]), and carries publishes to the
//! engine. A reliable publish is never delivered here before the engine stored it: on one
//! node the engine hands it back before the publish is answered, on several nodes it arrives
//! from whichever node published it. Transient messages are not stored and have no order to
//! keep: the hub delivers this node's own ones at once and hands them to the engine for the
//! other nodes.

pub mod feed;
mod room;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use bytes::Bytes;
use livepush_proto::{Class, SeqTemplate, encode_msg, validate_room, validate_type};
use parking_lot::{Mutex, RwLock};
use serde_json::value::RawValue;

pub use room::{Announce, JoinError, Joined, Member, MergeWindow, Page, Room, RoomInfo};

use crate::clock::now_ms;
use crate::config::Config;
use crate::control::{Action, CONTROL_TYPE, ControlError};
use crate::engine::{Engine, EngineError, Event, Publish, Retention, Sequenced};
use crate::frame::Frame;
use crate::metrics::Metrics;
use crate::outbox::{ConnId, Outbox, OutboxLimits};
use feed::Ask;

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A room id or message type that does not match its pattern.
    #[error(transparent)]
    Invalid(#[from] livepush_proto::InvalidId),
    #[error("control messages are always reliable")]
    TransientControl,
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// One message of a batch publish.
#[derive(Debug, Clone, Copy)]
pub struct BatchMessage<'a> {
    pub room: &'a str,
    pub ty: &'a str,
    pub data: &'a RawValue,
    pub class: Option<Class>,
}

/// A message checked for publishing.
enum Prepared<'a> {
    Transient {
        room: &'a str,
        ty: &'a str,
        data: &'a RawValue,
    },
    Reliable(ReliableMessage<'a>),
}

/// A reliable message encoded but for its seq.
struct ReliableMessage<'a> {
    room: &'a str,
    frame: SeqTemplate,
    ts: u64,
    action: Option<Action>,
}

impl ReliableMessage<'_> {
    fn publish(&self) -> Publish<'_> {
        Publish {
            room: self.room,
            frame: &self.frame,
            ts: self.ts,
            action: self.action,
        }
    }
}

/// The answer to a publish.
#[derive(Debug, Clone)]
pub struct Published {
    pub epoch: Arc<str>,
    /// Present for reliable messages.
    pub seq: Option<u64>,
    /// Live deliveries queued on this node (transient only; reliable fan-out is not counted
    /// here to keep the answer independent of who happens to be connected).
    pub delivered: Option<usize>,
}

impl Published {
    fn reliable(s: Sequenced) -> Published {
        Published {
            epoch: s.epoch,
            seq: Some(s.seq),
            delivered: None,
        }
    }
}

/// A page of a room's history, read from the engine (`GET /v1/rooms/{room}/history`).
#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub epoch: Arc<str>,
    pub latest: u64,
    pub recovered: bool,
    pub messages: Vec<Bytes>,
}

/// This node's rooms. See the module documentation.
pub struct Hub {
    rooms: RwLock<HashMap<Arc<str>, Arc<Room>>>,
    engine: Arc<dyn Engine>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    next_conn: AtomicU64,
    /// Rooms joined in the background for a connection that could not wait for the room to
    /// open (see [`Hub::adopt_later`]), until its session takes them.
    adoptions: Mutex<HashMap<ConnId, Vec<Arc<Room>>>>,
    /// The hub itself, for the tasks that carry a room's asks to the engine.
    me: Weak<Hub>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("rooms", &self.rooms.read().len())
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl Hub {
    pub fn new(config: Arc<Config>, engine: Arc<dyn Engine>, metrics: Arc<Metrics>) -> Arc<Hub> {
        Arc::new_cyclic(|me| Hub {
            rooms: RwLock::new(HashMap::new()),
            engine,
            config,
            metrics,
            next_conn: AtomicU64::new(1),
            adoptions: Mutex::new(HashMap::new()),
            me: me.clone(),
        })
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    fn retention(&self) -> Retention {
        Retention {
            max_messages: self.config.history_size,
            ttl: self.config.history_ttl,
        }
    }

    /// Every room's merge window: `--merge-ms`, chunks capped at one WebSocket write.
    fn merge_window(&self) -> MergeWindow {
        MergeWindow {
            window: self.config.limits.merge_window,
            max_bytes: self.config.limits.write_batch_bytes,
            stats: self.metrics.merge.clone(),
        }
    }

    /// The room if this node has it open.
    pub fn open_room(&self, id: &str) -> Option<Arc<Room>> {
        self.rooms.read().get(id).filter(|r| r.is_open()).cloned()
    }

    /// The room, opened through the engine on first use (and created there if it never
    /// existed). With the single-node engine this completes without waiting.
    pub async fn room(&self, id: &str) -> Result<Arc<Room>, EngineError> {
        if let Some(r) = self.open_room(id) {
            return Ok(r);
        }
        let room = {
            let mut rooms = self.rooms.write();
            let len = rooms.len();
            let room = rooms
                .entry(Arc::from(id))
                .or_insert_with(|| {
                    let presence = self.engine.shares_presence().then(|| self.engine.clone());
                    Arc::new(Room::loading_with(
                        Arc::from(id),
                        self.merge_window(),
                        OutboxLimits {
                            soft_frames: self.config.limits.outbox_frames,
                            hard_bytes: self.config.limits.outbox_max_bytes,
                        },
                        presence,
                    ))
                })
                .clone();
            if rooms.len() != len {
                self.metrics.rooms.set(rooms.len() as i64);
            }
            room
        };
        // One opener per room; the others wait for it (and then find the room open).
        {
            let _opening = room.opening.lock().await;
            if !room.is_open() {
                let snapshot = self.engine.open(id, self.config.history_size).await?;
                let shared = self.engine.shares_presence();
                if let Some(ask) = room.open(snapshot, shared, self.retention()) {
                    self.ask(&room, ask);
                }
            }
        }
        Ok(room)
    }

    /// A connection joined `room` in the background (its session could not wait for the room
    /// to open): its session takes the room with [`Hub::take_adoptions`]. A session that
    /// ended meanwhile (its outbox closed first) leaves it at once; both sides decide under
    /// one lock, so a room is never left behind with a dead member.
    pub fn adopt_later(&self, conn: ConnId, room: Arc<Room>, outbox: &Outbox) {
        let mut adoptions = self.adoptions.lock();
        if outbox.is_closed() {
            drop(adoptions);
            room.leave(conn);
            return;
        }
        adoptions.entry(conn).or_default().push(room);
    }

    /// The rooms joined in the background for `conn` since the last call.
    pub fn take_adoptions(&self, conn: ConnId) -> Vec<Arc<Room>> {
        self.adoptions.lock().remove(&conn).unwrap_or_default()
    }

    /// The class a publish of `ty` gets, with an optional override.
    pub fn class_for(&self, ty: &str, requested: Option<Class>) -> Result<Class, PublishError> {
        if ty == CONTROL_TYPE && requested == Some(Class::Transient) {
            return Err(PublishError::TransientControl);
        }
        Ok(requested.unwrap_or_else(|| self.config.classes.class_of(ty)))
    }

    /// Publish a message to a room. A reliable message is answered once the engine stored it
    /// (and, on one node, once it was delivered here); a transient one is delivered to this
    /// node's members at once and handed to the engine for the other nodes.
    pub async fn publish(
        &self,
        room: &str,
        ty: &str,
        data: &RawValue,
        class: Option<Class>,
    ) -> Result<Published, PublishError> {
        let started = Instant::now();
        match self.prepare(room, ty, data, class)? {
            Prepared::Transient { room, ty, data } => {
                let published = self.publish_transient(room, ty, data).await;
                self.metrics
                    .observe_publish(Class::Transient, started.elapsed());
                published
            }
            Prepared::Reliable(r) => {
                let sequenced = self.engine.publish(r.publish()).await;
                self.metrics.record_publish(Class::Reliable, 0);
                self.metrics
                    .observe_publish(Class::Reliable, started.elapsed());
                Ok(Published::reliable(sequenced?))
            }
        }
    }

    /// Publish several messages (batch publish): one answer per message, in order; a refused
    /// message does not stop the others. Consecutive reliable messages go to the engine
    /// together ([`Engine::publish_many`]: one store commit, or one Redis round trip); a
    /// transient message is sent once the reliable ones before it are answered, so messages
    /// to one room keep their order.
    pub async fn publish_batch(
        &self,
        batch: &[BatchMessage<'_>],
    ) -> Vec<Result<Published, PublishError>> {
        let mut items = Vec::with_capacity(batch.len());
        let mut answers = Vec::with_capacity(batch.len());
        for m in batch {
            match self.prepare(m.room, m.ty, m.data, m.class) {
                Ok(p) => {
                    items.push(Some(p));
                    answers.push(None);
                }
                Err(e) => {
                    items.push(None);
                    answers.push(Some(Err(e)));
                }
            }
        }
        let mut run = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item {
                Some(Prepared::Reliable(r)) => run.push((i, r)),
                Some(Prepared::Transient { room, ty, data }) => {
                    self.publish_run(&mut run, &mut answers).await;
                    answers[i] = Some(self.publish_transient(room, ty, data).await);
                }
                None => {}
            }
        }
        self.publish_run(&mut run, &mut answers).await;
        answers
            .into_iter()
            .map(|a| a.expect("every message of a batch is answered"))
            .collect()
    }

    /// Hand a run of consecutive reliable messages of a batch to the engine at once.
    async fn publish_run(
        &self,
        run: &mut Vec<(usize, &ReliableMessage<'_>)>,
        answers: &mut [Option<Result<Published, PublishError>>],
    ) {
        if run.is_empty() {
            return;
        }
        let publishes: Vec<Publish<'_>> = run.iter().map(|(_, r)| r.publish()).collect();
        let sequenced = self.engine.publish_many(&publishes).await;
        for (k, (i, _)) in run.drain(..).enumerate() {
            self.metrics.record_publish(Class::Reliable, 0);
            let answer = match &sequenced {
                Ok(all) => all
                    .get(k)
                    .cloned()
                    .unwrap_or_else(|| Err(EngineError::Unavailable("no answer".into()))),
                Err(e) => Err(e.clone()),
            };
            answers[i] = Some(answer.map(Published::reliable).map_err(PublishError::from));
        }
    }

    /// Check a message to publish and encode it (all but the seq, for a reliable one).
    fn prepare<'a>(
        &self,
        room: &'a str,
        ty: &'a str,
        data: &'a RawValue,
        class: Option<Class>,
    ) -> Result<Prepared<'a>, PublishError> {
        validate_room(room)?;
        validate_type(ty)?;
        let class = self.class_for(ty, class)?;
        let action = if ty == CONTROL_TYPE {
            Some(Action::parse(data)?)
        } else {
            None
        };
        Ok(match class {
            Class::Transient => Prepared::Transient { room, ty, data },
            Class::Reliable => {
                let ts = now_ms();
                Prepared::Reliable(ReliableMessage {
                    room,
                    frame: SeqTemplate::msg(room, ty, data, ts),
                    ts,
                    action,
                })
            }
        })
    }

    async fn publish_transient(
        &self,
        room: &str,
        ty: &str,
        data: &RawValue,
    ) -> Result<Published, PublishError> {
        // A transient publish creates the room like any other use of it.
        let r = self.room(room).await?;
        let delivered = self.send_transient(&r, ty, data);
        Ok(Published {
            epoch: r.info().epoch,
            seq: None,
            delivered: Some(delivered),
        })
    }

    /// A transient message (published, or sent by a terminal): delivered to this node's
    /// members at once, and handed to the engine for the other nodes. Returns how many local
    /// connections it was delivered to (the room's members on this node).
    pub fn send_transient(&self, room: &Room, ty: &str, data: &RawValue) -> usize {
        let bytes = encode_msg(&room.id, ty, data, None, now_ms());
        let delivered = room.broadcast_transient(&Frame::transient(bytes.clone()));
        self.metrics.record_publish(Class::Transient, delivered);
        self.engine.broadcast(&room.id, &bytes);
        delivered
    }

    /// A page of the room's history as the engine keeps it; `None` for a room that never
    /// existed.
    pub async fn history(
        &self,
        room: &str,
        since: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Option<HistoryPage>, EngineError> {
        Ok(self
            .engine
            .history(room, since, limit, max_bytes)
            .await?
            .map(|h| HistoryPage {
                recovered: h.recovered(since),
                epoch: h.epoch,
                latest: h.latest,
                messages: h.messages.into_iter().map(|m| m.frame).collect(),
            }))
    }

    /// The room's public state; `None` for a room that never existed.
    pub async fn info(&self, room: &str) -> Result<Option<RoomInfo>, EngineError> {
        let Some(s) = self.engine.info(room).await? else {
            return Ok(None);
        };
        let online = if self.engine.shares_presence() {
            s.online
        } else {
            self.open_room(room).map_or(0, |r| r.info().online)
        };
        Ok(Some(RoomInfo {
            epoch: s.epoch,
            seq: s.seq,
            online,
            flags: s.flags,
        }))
    }

    /// Start a new history of the room (its members are told `joined{recovered:false}`).
    pub async fn reset(&self, room: &str) -> Result<Arc<str>, EngineError> {
        Ok(self.engine.reset(room).await?.epoch)
    }

    /// Carry a room's ask to the engine, in the background, and its answer back to the room.
    fn ask(&self, room: &Arc<Room>, ask: Ask) {
        let Some(hub) = self.me.upgrade() else {
            return;
        };
        let room = room.clone();
        tokio::spawn(async move {
            if room.is_retired() {
                return;
            }
            let retention = hub.retention();
            let next = match ask {
                Ask::Read { since } => {
                    let max_bytes = hub.config.limits.outbox_max_bytes / 4;
                    let limit = hub.config.limits.max_pull as usize;
                    match hub.engine.history(&room.id, since, limit, max_bytes).await {
                        Ok(Some(h)) => room.on_history(h, retention),
                        Ok(None) => {
                            tracing::warn!(room = %room.id, "the engine no longer knows a room this node holds");
                            room.on_failed();
                            None
                        }
                        Err(e) => {
                            tracing::warn!(room = %room.id, error = %e, "cannot read a room's history to fill a gap; retrying");
                            room.on_failed();
                            None
                        }
                    }
                }
                Ask::Snapshot => match hub.engine.open(&room.id, hub.config.history_size).await {
                    Ok(s) => room.on_snapshot(s, retention),
                    Err(e) => {
                        tracing::warn!(room = %room.id, error = %e, "cannot read a room's state; retrying");
                        room.on_failed();
                        None
                    }
                },
            };
            if let Some(next) = next {
                hub.ask(&room, next);
            }
        });
    }

    /// What the engine hands the node for rooms (inbox events go to the inboxes).
    pub fn on_event(&self, event: Event<'_>) {
        let retention = self.retention();
        match event {
            Event::Reliable {
                room,
                epoch,
                message,
                action,
            } => {
                self.metrics
                    .fanout_delay_seconds
                    .observe(now_ms().saturating_sub(message.ts) as f64 / 1000.0);
                // Loading rooms too: their feed keeps what arrives until the snapshot.
                let r = self.rooms.read().get(room).cloned();
                if let Some(r) = r
                    && let Some(ask) = r.on_reliable(epoch, message.clone(), action, retention)
                {
                    self.ask(&r, ask);
                }
            }
            Event::Transient { room, frame } => {
                if let Some(r) = self.open_room(room) {
                    let delivered = r.broadcast_transient(&Frame::transient(frame.clone()));
                    self.metrics.record_publish(Class::Transient, delivered);
                }
            }
            Event::Online { room, count } => {
                if let Some(r) = self.open_room(room) {
                    r.on_online(count);
                }
            }
            Event::Epoch { room, epoch, seq } => {
                let r = self.rooms.read().get(room).cloned();
                if let Some(r) = r
                    && let Some(ask) = r.on_epoch(epoch, seq)
                {
                    self.ask(&r, ask);
                }
            }
            Event::Subscribed { room } => {
                let r = self.rooms.read().get(room).cloned();
                if let Some(r) = r
                    && let Some(ask) = r.on_subscribed()
                {
                    self.ask(&r, ask);
                }
            }
            Event::LinkLost => {
                let rooms: Vec<Arc<Room>> = self.rooms.read().values().cloned().collect();
                for r in rooms {
                    if let Some(ask) = r.on_lost() {
                        self.ask(&r, ask);
                    }
                }
            }
            Event::Inbox { .. } | Event::Wake { .. } => {}
        }
    }

    /// Periodic upkeep of every room (online counts, history age, asks to retry) and of the
    /// engine.
    pub fn tick(&self) {
        let rooms: Vec<Arc<Room>> = self.rooms.read().values().cloned().collect();
        let now = now_ms();
        let retention = self.retention();
        let idle_after = self.config.room_idle.as_millis() as u64;
        for room in rooms {
            let tick = room.tick(now, retention);
            if let Some(ask) = tick.ask {
                self.ask(&room, ask);
            }
            if tick.idle && tick.idle_ms >= idle_after {
                self.close_idle(&room);
            }
        }
        self.engine.tick();
    }

    /// Forget a room no member has used for `room_idle`, and close it in the engine (on
    /// several nodes: unsubscribe from it). Retired under the rooms' write lock, so that no
    /// one finds it in the map afterwards, and a join that got it before finds it retired.
    fn close_idle(&self, room: &Arc<Room>) {
        let mut rooms = self.rooms.write();
        if !room.retire() {
            return;
        }
        if rooms.get(&room.id).is_some_and(|r| Arc::ptr_eq(r, room)) {
            rooms.remove(&room.id);
            self.metrics.rooms.set(rooms.len() as i64);
            // Still under the lock: a new room object for this id is opened (subscribed)
            // only after this close (unsubscribe) was queued.
            self.engine.close(&room.id);
        }
    }

    /// Every room this node holds (open or loading), for the admin page ([`crate::admin`]).
    pub fn rooms(&self) -> Vec<Arc<Room>> {
        self.rooms.read().values().cloned().collect()
    }

    pub fn room_count(&self) -> usize {
        self.rooms.read().len()
    }
}

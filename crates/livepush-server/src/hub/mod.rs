//! The hub: every room of this node, the publish path, and periodic upkeep.

pub mod control;
mod room;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use livepush_proto::{Class, encode_msg, validate_room, validate_type};
use parking_lot::RwLock;
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::value::RawValue;

pub use room::{Announce, JoinError, Joined, Member, MergeWindow, Page, Retention, Room, RoomInfo};

use crate::broker::{Broker, Envelope};
use crate::clock::now_ms;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbox::ConnId;
use crate::store::{Durable, HistoryStore, RoomFlags, RoomRecord, StoreError};
use control::{Action, CONTROL_TYPE};

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
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

/// All rooms of this node.
pub struct Hub {
    rooms: RwLock<HashMap<Arc<str>, Arc<Room>>>,
    store: Arc<dyn HistoryStore>,
    broker: Arc<dyn Broker>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    next_conn: AtomicU64,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("rooms", &self.rooms.read().len())
            .finish_non_exhaustive()
    }
}

impl Hub {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn HistoryStore>,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
    ) -> Hub {
        Hub {
            rooms: RwLock::new(HashMap::new()),
            store,
            broker,
            config,
            metrics,
            next_conn: AtomicU64::new(1),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
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

    /// The room, created (or loaded from the store) on first use.
    pub fn room(&self, id: &str) -> Result<Arc<Room>, StoreError> {
        if let Some(r) = self.rooms.read().get(id) {
            return Ok(r.clone());
        }
        let mut rooms = self.rooms.write();
        if let Some(r) = rooms.get(id) {
            return Ok(r.clone());
        }
        let record = match self.store.load_room(id, self.config.history_size)? {
            Some(record) => record,
            None => {
                let epoch = new_epoch();
                spawn_write(self.store.create_room(id, &epoch), "create room");
                RoomRecord {
                    epoch,
                    seq: 0,
                    history: Vec::new(),
                    flags: RoomFlags::default(),
                }
            }
        };
        let key: Arc<str> = Arc::from(id);
        let room = Arc::new(Room::with_merge(key.clone(), record, self.merge_window()));
        rooms.insert(key, room.clone());
        self.metrics.rooms.set(rooms.len() as i64);
        Ok(room)
    }

    /// The room if it was ever published to or joined (here or, with a durable store, before
    /// a restart); never creates one.
    pub fn existing_room(&self, id: &str) -> Result<Option<Arc<Room>>, StoreError> {
        if let Some(r) = self.rooms.read().get(id) {
            return Ok(Some(r.clone()));
        }
        if self.store.load_room(id, 0)?.is_some() {
            return self.room(id).map(Some);
        }
        Ok(None)
    }

    /// The class a publish of `ty` gets, with an optional override.
    pub fn class_for(&self, ty: &str, requested: Option<Class>) -> Result<Class, String> {
        if ty == CONTROL_TYPE && requested == Some(Class::Transient) {
            return Err("control messages are always reliable".into());
        }
        Ok(requested.unwrap_or_else(|| self.config.classes.class_of(ty)))
    }

    /// Publish a message to a room. Reliable messages are answered once durable under the
    /// store's policy and delivered to local members in seq order; transient ones are
    /// delivered live at once.
    pub async fn publish(
        &self,
        room: &str,
        ty: &str,
        data: &RawValue,
        class: Option<Class>,
    ) -> Result<Published, PublishError> {
        validate_room(room).map_err(PublishError::BadRequest)?;
        validate_type(ty).map_err(PublishError::BadRequest)?;
        let class = self
            .class_for(ty, class)
            .map_err(PublishError::BadRequest)?;
        let action = if ty == CONTROL_TYPE {
            Some(Action::parse(data).map_err(PublishError::BadRequest)?)
        } else {
            None
        };
        let room = self.room(room)?;
        let ts = now_ms();
        match class {
            Class::Transient => {
                let frame = encode_msg(&room.id, ty, data, None, ts);
                let delivered = room.broadcast_transient(&frame);
                self.metrics.record_publish(Class::Transient, delivered);
                self.broker.announce(&Envelope::Transient {
                    room: room.id.clone(),
                    frame,
                });
                Ok(Published {
                    epoch: room.info().epoch,
                    seq: None,
                    delivered: Some(delivered),
                })
            }
            Class::Reliable => {
                let (seq, epoch, durable) =
                    room.sequence(ty, data, ts, action, self.store.as_ref());
                let stored = durable.await;
                // Deliver even if the write failed: later messages are queued behind this
                // one and a room must never stall. The publisher is told it failed.
                if let Some(w) = room.deliver_through(seq, self.retention(), self.store.as_ref()) {
                    spawn_write(w, "room flags");
                }
                self.metrics.record_publish(Class::Reliable, 0);
                stored?;
                Ok(Published {
                    epoch,
                    seq: Some(seq),
                    delivered: None,
                })
            }
        }
    }

    /// A terminal-sent transient message.
    pub fn send_transient(&self, room: &Room, ty: &str, data: &RawValue) -> usize {
        let frame = encode_msg(&room.id, ty, data, None, now_ms());
        let delivered = room.broadcast_transient(&frame);
        self.metrics.record_publish(Class::Transient, delivered);
        self.broker.announce(&Envelope::Transient {
            room: room.id.clone(),
            frame,
        });
        delivered
    }

    /// Periodic upkeep of every room: online counts, history age, store trimming.
    pub fn tick(&self) {
        let rooms: Vec<Arc<Room>> = self.rooms.read().values().cloned().collect();
        let now = now_ms();
        let retention = self.retention();
        for room in rooms {
            let t = room.tick(now, retention);
            if let Some(keep_from) = t.trim_to {
                spawn_write(self.store.trim(&room.id, keep_from), "trim");
            }
        }
    }

    pub fn room_count(&self) -> usize {
        self.rooms.read().len()
    }
}

/// Run a store write in the background, logging a failure.
fn spawn_write(w: Durable, what: &'static str) {
    tokio::spawn(async move {
        if let Err(e) = w.await {
            tracing::error!(error = %e, "store write failed: {what}");
        }
    });
}

/// A fresh epoch: 16 random alphanumerics (95 bits), so two histories of one room never share
/// an epoch.
pub fn new_epoch() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(16)
        .map(char::from)
        .collect()
}

//! The admin page's figures: what a node reports of itself ([`NodeRecord`]) and the
//! [`Snapshot`] of every node that the admin API (`GET /v1/admin/stats`) answers and the
//! admin room ([`ADMIN_ROOM`]) carries live.
//!
//! Invariants:
//! - Nothing here counts on a hot path. A record is read from what the metrics, the hub, the
//!   service list and the inboxes keep anyway, and only when someone asks (the API), when
//!   someone watches (the admin room has members on this node), or, with several nodes, once
//!   per `admin_interval` to share it through the engine ([`Engine::node_stats`]).
//! - Per-room figures exist here and in the admin API only, never in `/metrics` (no per-room
//!   labels there).
//! - No rates: records carry totals and each room its `seq`; the page derives publish rates
//!   from two snapshots.
//! - The admin room is reserved ([`crate::auth::RESERVED_ROOM_PREFIX`]): no wildcard grant
//!   reaches it, only the exact grant of a token `POST /v1/admin/token` mints. What a node
//!   sends there is transient and goes to this node's members only, so a watcher gets one
//!   snapshot per interval from the node it is connected to, whatever the number of nodes.
//! - A room lists once in a snapshot: figures of the same room from several nodes are merged
//!   (the highest `seq` and online count, since with several nodes the online count is
//!   already the shared one; members added up).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use livepush_proto::encode_msg;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::clock::now_ms;
use crate::config::Limits;
use crate::engine::Engine;
use crate::frame::Frame;
use crate::hub::Hub;
use crate::inbox::Inboxes;
use crate::metrics::{ClassLabel, Metrics, ReasonLabel, TransportLabel};
use crate::terminals::{OnlineCounts, Terminals};

/// The room the admin page joins for live snapshots (type [`STATS_TYPE`], transient).
pub const ADMIN_ROOM: &str = "_livepush.admin";

/// The message type of a snapshot in the admin room.
pub const STATS_TYPE: &str = "stats";

/// A node's shared record lives this many `admin_interval`s: a node that stopped leaves the
/// node list within it.
pub const RECORD_LIFETIME_INTERVALS: u32 = 5;

/// Open connections (or terminals online) per transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PerTransport {
    pub ws: u64,
    pub longpoll: u64,
    pub sse: u64,
}

/// Messages published through this node since it started, by class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Published {
    pub reliable: u64,
    pub transient: u64,
}

/// This node's inboxes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InboxFigures {
    /// Direct messages posted through this node since it started.
    pub posted: u64,
    /// Inboxes held in memory here.
    pub inboxes: u64,
    /// Unacknowledged messages those inboxes keep (the backlog).
    pub pending: u64,
    /// Wake datagrams sent.
    pub wakes_sent: u64,
}

/// One room as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RoomFigures {
    pub room: String,
    /// Terminals in the room (across every node when the engine shares presence).
    pub online: u64,
    /// The last reliable seq delivered (its advance between snapshots is the publish rate).
    pub seq: u64,
    /// Reliable messages kept in the node's history cache (at most `history_size`).
    pub history: u64,
    /// Member connections on the node (on every node, in a snapshot).
    pub members: u64,
    pub closed: bool,
    pub muted: bool,
}

/// What one node reports of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeRecord {
    pub id: String,
    pub version: String,
    pub started_ms: u64,
    /// When the record was taken (wall clock, ms).
    pub ts: u64,
    pub uptime_s: u64,
    /// Whether the engine's shared store answers (`/healthz`).
    pub healthy: bool,
    /// Open terminal connections, per transport.
    pub connections: PerTransport,
    /// Terminals online here, in all and per transport.
    pub terminals: OnlineCounts,
    /// Rooms this node holds open (the admin room aside).
    pub rooms_open: u64,
    pub published: Published,
    /// Transient messages delivered to connections (members of their rooms).
    pub transient_deliveries: u64,
    /// Connections closed as slow consumers.
    pub slow_consumer_closes: u64,
    /// Transient messages dropped for slow terminals.
    pub dropped_transient: u64,
    /// Reliable messages replaced by a prompt for slow terminals.
    pub prompted: u64,
    pub inbox: InboxFigures,
    /// The node's busiest rooms (at most `admin_rooms`); empty in a snapshot's node list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rooms: Vec<RoomFigures>,
}

/// What the admin API answers and the admin room carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub ts: u64,
    /// The node that took the snapshot.
    pub node: String,
    /// `admin_interval` in ms: how often the admin room gets a snapshot.
    pub interval_ms: u64,
    /// Every node that shared a record recently (just this one on one node), by id.
    pub nodes: Vec<NodeRecord>,
    /// The busiest rooms of all nodes, by online count then id, at most the limit asked.
    pub rooms: Vec<RoomFigures>,
    /// Distinct rooms the nodes listed, before the limit.
    pub rooms_listed: u64,
    /// False when the other nodes' figures could not be read (the shared store does not
    /// answer): the snapshot then has this node's alone.
    pub complete: bool,
}

/// The node's admin side: what it reads its figures from, and its identity.
#[derive(Debug)]
pub struct Admin {
    id: String,
    started_ms: u64,
    limits: Limits,
    metrics: Arc<Metrics>,
    hub: Arc<Hub>,
    terminals: Arc<Terminals>,
    inboxes: Arc<Inboxes>,
}

impl Admin {
    pub fn new(
        limits: Limits,
        metrics: Arc<Metrics>,
        hub: Arc<Hub>,
        terminals: Arc<Terminals>,
        inboxes: Arc<Inboxes>,
    ) -> Admin {
        Admin {
            id: crate::store::new_epoch().chars().take(12).collect(),
            started_ms: now_ms(),
            limits,
            metrics,
            hub,
            terminals,
            inboxes,
        }
    }

    /// This node's id on the admin page (random, new at every start).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn engine(&self) -> &Arc<dyn Engine> {
        self.hub.engine()
    }

    /// How long a shared record lives.
    fn record_ttl(&self) -> Duration {
        self.limits.admin_interval * RECORD_LIFETIME_INTERVALS
    }

    /// This node's record now, with its `admin_rooms` busiest rooms.
    pub fn record(&self) -> NodeRecord {
        let m = &self.metrics;
        let open = |transport| {
            m.connections_open
                .get_or_create(&TransportLabel { transport })
                .get()
                .max(0) as u64
        };
        let published = |class| m.published.get_or_create(&ClassLabel { class }).get();
        let (inboxes, pending) = self.inboxes.backlog();
        let (rooms, rooms_open) = self.busiest_rooms(self.limits.admin_rooms);
        let now = now_ms();
        NodeRecord {
            id: self.id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_ms: self.started_ms,
            ts: now,
            uptime_s: now.saturating_sub(self.started_ms) / 1000,
            healthy: self.engine().healthy(),
            connections: PerTransport {
                ws: open("ws"),
                longpoll: open("longpoll"),
                sse: open("sse"),
            },
            terminals: self.terminals.online_counts(),
            rooms_open,
            published: Published {
                reliable: published("reliable"),
                transient: published("transient"),
            },
            transient_deliveries: m.transient_deliveries.get(),
            slow_consumer_closes: m.outbox.slow_consumer_closes.get(),
            dropped_transient: m.outbox.dropped_transient.get(),
            prompted: m.outbox.prompted.get(),
            inbox: InboxFigures {
                posted: m.inbox.posted.get(),
                inboxes,
                pending,
                wakes_sent: m
                    .wake
                    .wakes
                    .get_or_create(&ReasonLabel { reason: "sent" })
                    .get(),
            },
            rooms,
        }
    }

    /// This node's open rooms (the admin room aside), busiest first, at most `limit`, and
    /// how many there are.
    fn busiest_rooms(&self, limit: usize) -> (Vec<RoomFigures>, u64) {
        let mut rooms: Vec<RoomFigures> = self
            .hub
            .rooms()
            .iter()
            .filter(|r| r.is_open() && &*r.id != ADMIN_ROOM)
            .map(|r| {
                let info = r.info();
                let (history, members) = r.depth();
                RoomFigures {
                    room: r.id.to_string(),
                    online: info.online,
                    seq: info.seq,
                    history: history as u64,
                    members: members as u64,
                    closed: info.flags.closed,
                    muted: info.flags.muted,
                }
            })
            .collect();
        let open = rooms.len() as u64;
        by_activity(&mut rooms, limit);
        (rooms, open)
    }

    /// Share this node's record and gather every node's into a snapshot listing at most
    /// `limit` rooms. When the shared store does not answer, this node's record alone
    /// (`complete: false`): the page is most wanted then.
    pub async fn snapshot(&self, limit: usize) -> Snapshot {
        let mine = self.record();
        let json = serde_json::to_string(&mine).unwrap_or_default();
        let (shared, complete) = match self.engine().node_stats(&json, self.record_ttl()).await {
            Ok(shared) => (shared, true),
            Err(e) => {
                tracing::debug!(error = %e, "cannot gather the other nodes' admin records");
                (Vec::new(), false)
            }
        };
        let mut nodes: Vec<NodeRecord> = shared
            .iter()
            .filter_map(|s| serde_json::from_str::<NodeRecord>(s).ok())
            .filter(|n| n.id != mine.id)
            .collect();
        nodes.push(mine);
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let mut rooms: HashMap<String, RoomFigures> = HashMap::new();
        for node in &mut nodes {
            for r in std::mem::take(&mut node.rooms) {
                match rooms.get_mut(&r.room) {
                    None => {
                        rooms.insert(r.room.clone(), r);
                    }
                    Some(seen) => merge(seen, r),
                }
            }
        }
        let rooms_listed = rooms.len() as u64;
        let mut rooms: Vec<RoomFigures> = rooms.into_values().collect();
        by_activity(&mut rooms, limit);
        Snapshot {
            ts: now_ms(),
            node: self.id.clone(),
            interval_ms: self.limits.admin_interval.as_millis() as u64,
            nodes,
            rooms,
            rooms_listed,
            complete,
        }
    }

    /// Every `admin_interval`: while the admin room has members on this node, send them a
    /// snapshot; with several nodes, share this node's record even when nobody watches here
    /// (a watcher on another node lists it). Ends when the server stops.
    pub fn spawn_feed(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(self.limits.admin_interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = ticks.tick() => {}
                }
                let room = self.hub.open_room(ADMIN_ROOM).filter(|r| r.depth().1 > 0);
                if room.is_none() && !self.engine().shares_presence() {
                    continue;
                }
                let snapshot = self.snapshot(self.limits.admin_rooms).await;
                let Some(room) = room else { continue };
                let Ok(data) = serde_json::value::to_raw_value(&snapshot) else {
                    continue;
                };
                let data: &RawValue = &data;
                let frame = encode_msg(ADMIN_ROOM, STATS_TYPE, data, None, now_ms());
                room.broadcast_transient(&Frame::transient(frame));
            }
        });
    }
}

/// The same room seen by two nodes: the newer position and flags, the higher online count
/// (the shared count, or the larger share of it), members added up.
fn merge(seen: &mut RoomFigures, other: RoomFigures) {
    seen.members += other.members;
    seen.online = seen.online.max(other.online);
    seen.history = seen.history.max(other.history);
    if other.seq > seen.seq {
        seen.seq = other.seq;
        seen.closed = other.closed;
        seen.muted = other.muted;
    }
}

/// Busiest first (online count, then id), at most `limit`.
fn by_activity(rooms: &mut Vec<RoomFigures>, limit: usize) {
    rooms.sort_by(|a, b| b.online.cmp(&a.online).then_with(|| a.room.cmp(&b.room)));
    rooms.truncate(limit);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(id: &str, online: u64, seq: u64, closed: bool) -> RoomFigures {
        RoomFigures {
            room: id.into(),
            online,
            seq,
            history: seq,
            members: 1,
            closed,
            muted: false,
        }
    }

    #[test]
    fn a_room_seen_by_two_nodes_takes_the_newer_flags_and_adds_members() {
        let mut a = room("r", 3, 5, false);
        merge(&mut a, room("r", 2, 6, true));
        assert_eq!((a.online, a.seq, a.members, a.closed), (3, 6, 2, true));
        merge(&mut a, room("r", 4, 1, false));
        assert_eq!((a.online, a.seq, a.members, a.closed), (4, 6, 3, true));
    }

    #[test]
    fn rooms_are_listed_busiest_first_and_bounded() {
        let mut rooms = vec![
            room("b", 1, 0, false),
            room("c", 5, 0, false),
            room("a", 1, 0, false),
        ];
        by_activity(&mut rooms, 2);
        let ids: Vec<&str> = rooms.iter().map(|r| r.room.as_str()).collect();
        assert_eq!(ids, ["c", "a"]);
    }
}

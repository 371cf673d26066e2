//! The engine for several nodes: rooms and inboxes in Redis.
//!
//! Every `livepush serve --redis URL` process (a *node*) talks to the same Redis; any node may
//! serve any terminal and any publish.
//!
//! # Rooms
//!
//! A room is a hash `P:room:{R}` (epoch, seq, flags) and a stream `P:hist:{R}` whose entry ids
//! are `seq-1` (ts and frame). A reliable publish is one Lua script ([`PUBLISH`]): it creates
//! the room with the caller's fresh epoch if Redis does not have it (a room never used, or lost
//! with a restart without persistence or a `FLUSHALL`: then the old history is gone and the seq
//! starts again, under a new epoch, never repeating a seq of an old one), takes the next seq,
//! appends the frame (the hub's template with the seq filled in) capped at the history size,
//! sets the room's flags for a control message, and `PUBLISH`es the message on the room's
//! channel `P:ch:{R}`, all atomically. The publish is answered only after the script
//! succeeded; no node delivers a message that is not in Redis.
//!
//! A node subscribes to a room's channel when it opens the room (its first local member, or a
//! pull) and unsubscribes when the hub closes it; Redis sends a message only to the nodes
//! subscribed to its room, so its output grows with the nodes that hold members of the room,
//! not with all nodes. Messages arrive as RESP3 pushes on one subscription connection and are
//! handed to the node in arrival order, which is publish order per room. The node's feed
//! repairs what pub/sub can lose: a seq jump is read from the stream, another epoch is learnt
//! from a snapshot, and when the subscription connection drops ([`Event::LinkLost`]) every
//! open room re-reads what it missed once the connection is back (the client resubscribes by
//! itself). A read made after the data connection is back but before the channel is
//! subscribed again would miss a publish in between, with no later message to show the gap:
//! so each confirmed (re)subscription of a room's channel ([`Event::Subscribed`]) makes the
//! room read once more, after its ask in flight if there is one. The same holds when a room is
//! opened (snapshot, then SUBSCRIBE). Measured: the restart test
//! (`it::redis::a_restarted_redis_loses_nothing_…`) lost seq 21 in 2 of 60 runs before, 0 of
//! 160 after.
//!
//! A room's keys expire (`PEXPIRE`) [`ROOM_KEY_MARGIN`] after its history's retention
//! (`--history-ttl`), counted from its last publish, reset or open: by then every message in
//! the stream is past the retention, so an unused room leaves Redis with nothing lost. Its next
//! use creates it again under a new epoch, as for a room lost with a Redis restart. A room with
//! flags (muted, closed) keeps its hash `P:room:{R}` (`PERSIST`): a close or mute outlives its
//! message's retention; only its stream expires.
//!
//! A lost Redis dataset is detected by a boot key (`P:boot`, a random value set once): a node
//! that finds it changed or missing tells every open room to re-read its state, which gives
//! the room a new epoch; members are told `joined{recovered:false}`.
//!
//! # Inboxes
//!
//! A terminal's inbox is a hash `P:term:{T}` (seq, acked, the wake registration) and a sorted
//! set `P:inbox:{T}` of frames by seq. A post is one script ([`POST`]) that takes the next seq,
//! stores the frame, trims to the inbox size and publishes it on the own channel
//! `P:node:{N}` of each node in the set `P:at:{T}`: the nodes that hold the terminal's inbox
//! ([`InboxEngine::load_and_watch`] joins it in the same pipeline as the read). A channel per
//! terminal would cost a subscription per connected terminal, on every node and in Redis:
//! 0.3 KiB per idle connection on the node (docs/performance.md). A node missing from the set
//! after a lost subscription sees the next seq jump and reads the inbox again (`inbox.rs`).
//!
//! # Faults
//!
//! Every call has a timeout (`--redis-timeout`). While Redis cannot be reached, reliable
//! publishes and inbox posts answer [`EngineError::Unavailable`] (HTTP 503), transient
//! messages still reach local members, and [`RedisEngine::healthy`] is false. The connections
//! reconnect by themselves.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use livepush_proto::SeqTemplate;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind, Script, ScriptInvocation, Value};
use tokio::sync::mpsc;

use super::{
    Engine, EngineError, EngineFuture, Event, History, InboxEngine, Node, Publish, Retention,
    Sequenced, Snapshot, TerminalPresence,
};
use crate::clock::now_ms;
use crate::control::Action;
use crate::metrics::EngineStats;
use crate::store::{
    InboxMessage, RoomFlags, StoredMessage, TerminalRecord, WakeRegistration, new_epoch,
};

/// Settings of the Redis engine.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://…` (`?protocol=resp3` is added when missing: pub/sub uses RESP3 pushes).
    pub url: String,
    /// Prefix of every key and channel, so that several deployments (or tests) share a Redis.
    pub prefix: String,
    /// Longest any Redis call may take; also the connection timeout.
    pub timeout: Duration,
    pub retention: Retention,
    /// Unacknowledged inbox messages kept per terminal.
    pub inbox_size: usize,
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum RedisStartError {
    #[error("cannot connect to Redis at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("cannot subscribe to this node's channel: {0}")]
    Subscribe(String),
    #[error(
        "Redis must not evict keys (it would drop histories and sequences silently): set \
         `maxmemory-policy noeviction` (it is {0:?})"
    )]
    Eviction(String),
}

/// See the module documentation.
pub struct RedisEngine {
    settings: RedisSettings,
    /// Commands and scripts.
    conn: ConnectionManager,
    /// Subscribe and unsubscribe requests, carried out in order by one task on the
    /// subscription connection (RESP3 pushes go to the dispatcher).
    subs: mpsc::UnboundedSender<SubCmd>,
    node: OnceLock<Weak<dyn Node>>,
    /// Channels this node subscribed to.
    channels: Mutex<HashSet<String>>,
    /// The boot key's value when this node last checked it.
    boot: Mutex<Option<String>>,
    healthy: AtomicBool,
    /// This node's id: its own transient messages come back on the channel and are skipped.
    id: String,
    /// The engine itself, for background tasks.
    me: OnceLock<Weak<RedisEngine>>,
    /// Calls, errors and link losses, for `/metrics`.
    stats: EngineStats,
}

impl std::fmt::Debug for RedisEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEngine")
            .field("prefix", &self.settings.prefix)
            .field("node", &self.id)
            .finish_non_exhaustive()
    }
}

/// How long a room's Redis keys outlive its history's retention after its last publish, reset
/// or open (see "Rooms"): room keys expire after `--history-ttl` plus this margin, which
/// covers the clocks of the nodes stamping messages differing.
pub const ROOM_KEY_MARGIN: Duration = Duration::from_secs(60);

/// Lua, the start of each script that writes a room: `expire_room(ms)` lets the room's keys
/// (KEYS[1] the hash, KEYS[2] the stream) expire in `ms`, but keeps a hash with flags (see
/// "Rooms").
macro_rules! expire_room_lua {
    () => {
        r#"
local function expire_room(ms)
  local flags = redis.call('HMGET', KEYS[1], 'muted', 'closed')
  if flags[1] == '1' or flags[2] == '1' then
    redis.call('PERSIST', KEYS[1])
  else
    redis.call('PEXPIRE', KEYS[1], ms)
  end
  redis.call('PEXPIRE', KEYS[2], ms)
end
"#
    };
}

/// A reliable publish: ensure the room (a fresh epoch if Redis does not have it), next seq,
/// append, flags, expiry, announce. KEYS: room, history. ARGV: head, tail, ts, history size,
/// fresh epoch, flag field or "", flag value, channel, action name or "", key expiry (ms).
const PUBLISH: &str = concat!(
    expire_room_lua!(),
    r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[5]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local frame = ARGV[1] .. seq .. ARGV[2]
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], seq .. '-1', 't', ARGV[3], 'f', frame)
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[6], ARGV[7])
end
expire_room(ARGV[10])
redis.call('PUBLISH', ARGV[8], 'R' .. epoch .. ' ' .. seq .. ' ' .. ARGV[3] .. ' ' .. ARGV[9] .. '\n' .. frame)
return {epoch, seq}
"#
);

/// Open a room: create it if missing, expiry; its state, newest kept messages and online
/// count. KEYS: room, history, presence. ARGV: fresh epoch, how many messages, key expiry (ms).
const OPEN: &str = concat!(
    expire_room_lua!(),
    r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
expire_room(ARGV[3])
local st = redis.call('HMGET', KEYS[1], 'seq', 'muted', 'closed')
local n = tonumber(ARGV[2])
local hist = {}
if n > 0 then
  hist = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', n)
end
return {epoch, st[1], st[2] or '0', st[3] or '0', hist, redis.call('HLEN', KEYS[3])}
"#
);

/// A page of history. KEYS: room, history. ARGV: first seq wanted, count.
const HISTORY: &str = r#"
local st = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
if not st[1] then
  return false
end
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local page = redis.call('XRANGE', KEYS[2], ARGV[1] .. '-0', '+', 'COUNT', tonumber(ARGV[2]))
return {st[1], st[2], first, page}
"#;

/// Start a new history of a room, keeping its flags. KEYS: room, history. ARGV: fresh epoch,
/// channel, key expiry (ms).
const RESET: &str = concat!(
    expire_room_lua!(),
    r#"
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'seq', 0)
expire_room(ARGV[3])
redis.call('PUBLISH', ARGV[2], 'E' .. ARGV[1] .. ' 0')
return ARGV[1]
"#
);

/// A terminal became present in a room on this node (or left it): each terminal counts once
/// across nodes; this node's contributions are remembered so that another node can take them
/// back if this one dies. KEYS: presence, this node's contributions. ARGV: terminal, room,
/// 1 or 0. Returns the room's count.
const PRESENCE: &str = r#"
local member = ARGV[2] .. '\t' .. ARGV[1]
if ARGV[3] == '1' then
  if redis.call('SADD', KEYS[2], member) == 1 then
    redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
  end
elseif redis.call('SREM', KEYS[2], member) == 1 then
  if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
    redis.call('HDEL', KEYS[1], ARGV[1])
  end
end
return redis.call('HLEN', KEYS[1])
"#;

/// Take back the presence of a node that stopped refreshing its liveness key. KEYS: its
/// contributions, the node set. ARGV: key prefix, node id.
const REAP: &str = r#"
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local tab = string.find(member, '\t', 1, true)
  local room = string.sub(member, 1, tab - 1)
  local terminal = string.sub(member, tab + 1)
  local pres = ARGV[1] .. ':pres:{' .. room .. '}'
  if redis.call('HINCRBY', pres, terminal, -1) <= 0 then
    redis.call('HDEL', pres, terminal)
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"#;

/// How long a node's liveness key lives without a refresh (refreshed every upkeep tick, once
/// a second): a killed node's terminals leave the online counts within this, plus a tick.
pub const NODE_TTL: Duration = Duration::from_secs(10);

/// An inbox post: next seq, keep the frame (as `TS FRAME`), trim to the size, and hand it
/// to every node that holds the terminal's inbox, on that node's own channel. A node whose
/// channel nobody listens to is gone (or its subscription is down: it registers again when
/// the subscription is back, see [`Event::LinkLost`]) and leaves the terminal's node set.
/// KEYS: terminal, inbox, the terminal's nodes. ARGV: head, tail, size, node channel prefix,
/// ts, terminal.
const POST: &str = r#"
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local acked = tonumber(redis.call('HGET', KEYS[1], 'acked') or '0')
local frame = ARGV[1] .. seq .. ARGV[2]
if seq > acked then
  redis.call('ZADD', KEYS[2], seq, ARGV[5] .. ' ' .. frame)
  local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
  if over > 0 then
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
  end
end
local payload = 'I' .. seq .. ' ' .. ARGV[5] .. '\n' .. ARGV[6] .. '\n' .. frame
for _, node in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if redis.call('PUBLISH', ARGV[4] .. node .. '}', payload) == 0 then
    redis.call('SREM', KEYS[3], node)
  end
end
return seq
"#;

/// An acknowledgement. KEYS: terminal, inbox. ARGV: seq.
const ACK: &str = r#"
local acked = tonumber(redis.call('HGET', KEYS[1], 'acked') or '0')
local seq = tonumber(ARGV[1])
if seq > acked then
  redis.call('HSET', KEYS[1], 'acked', seq)
  local top = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
  if seq > top then
    redis.call('HSET', KEYS[1], 'seq', seq)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', seq)
end
return 1
"#;

/// Record a keepalive's wake registration if it is newer than the one kept, whichever node
/// wrote that: the one place keepalive replay is decided across nodes (and across node
/// restarts). KEYS[1] the terminal's hash; ARGV[1] the keepalive's ts, ARGV[2] the registration
/// (`ADDR SIZE TS NODE`). Returns 1 when recorded, 0 for a replay (not newer).
const KEEPALIVE: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'wake')
if cur then
  local ts = tonumber(string.match(cur, '^%S+ %S+ (%d+)'))
  if ts and ts >= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'wake', ARGV[2])
return 1
"#;

/// Each script, hashed once: redis-rs computes a script's SHA1 in `Script::new`, which a
/// publish, a presence change or an inbox post would otherwise do on every call.
macro_rules! hashed {
    ($($name:ident = $source:ident;)*) => {
        $(static $name: LazyLock<Script> = LazyLock::new(|| Script::new($source));)*
    };
}
hashed! {
    PUBLISH_SCRIPT = PUBLISH;
    OPEN_SCRIPT = OPEN;
    HISTORY_SCRIPT = HISTORY;
    RESET_SCRIPT = RESET;
    PRESENCE_SCRIPT = PRESENCE;
    REAP_SCRIPT = REAP;
    POST_SCRIPT = POST;
    ACK_SCRIPT = ACK;
    KEEPALIVE_SCRIPT = KEEPALIVE;
}

/// A terminal's hash fields (seq, acked, wake) and its kept inbox (frame, seq).
type TerminalRows = (Vec<Option<String>>, Vec<(Vec<u8>, u64)>);

/// A wake registration as kept in Redis: `ADDR SIZE TS NODE`, the node being the one whose
/// socket received the keepalive (it holds the terminal's NAT mapping).
fn encode_wake(r: &WakeRegistration, node: &str) -> String {
    format!("{} {} {} {node}", r.addr, r.size, r.ts)
}

fn decode_wake(s: &str) -> Option<(WakeRegistration, &str)> {
    let mut parts = s.split(' ');
    let r = WakeRegistration {
        addr: parts.next()?.parse().ok()?,
        size: parts.next()?.parse().ok()?,
        ts: parts.next()?.parse().ok()?,
    };
    Some((r, parts.next().unwrap_or("")))
}

fn unavailable(e: redis::RedisError) -> EngineError {
    EngineError::Unavailable(e.to_string())
}

/// Run a Redis write that nobody waits for in the background. A failure is logged as
/// `what` (at debug level when `frequent`: a write per message must not flood the log
/// while Redis is away; `/healthz` and the answered requests say so already).
fn spawn_write<T: Send + 'static>(
    what: &'static str,
    frequent: bool,
    write: impl std::future::Future<Output = redis::RedisResult<T>> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(e) = write.await {
            if frequent {
                tracing::debug!(error = %e, "{what} did not reach Redis");
            } else {
                tracing::warn!(error = %e, "{what} did not reach Redis");
            }
        }
    });
}

/// A request to the subscription task.
enum SubCmd {
    Subscribe(String, tokio::sync::oneshot::Sender<redis::RedisResult<()>>),
    Unsubscribe(String),
}

/// Carry out subscription requests in the order they were made (an unsubscribe queued
/// before a subscribe of the same channel is never overtaken by it).
async fn subscriptions(mut sub: ConnectionManager, mut rx: mpsc::UnboundedReceiver<SubCmd>) {
    while let Some(cmd) = rx.recv().await {
        match cmd {
            SubCmd::Subscribe(channel, reply) => {
                let _ = reply.send(sub.subscribe(&channel).await);
            }
            SubCmd::Unsubscribe(channel) => {
                if let Err(e) = sub.unsubscribe(&channel).await {
                    tracing::debug!(error = %e, "an unsubscribe did not reach Redis");
                }
            }
        }
    }
}

/// A message as it travels on a room's channel.
enum Wire<'a> {
    Reliable {
        epoch: &'a str,
        seq: u64,
        ts: u64,
        action: Option<Action>,
        frame: &'a [u8],
    },
    Transient {
        from: &'a str,
        frame: &'a [u8],
    },
    Epoch {
        epoch: &'a str,
        seq: u64,
    },
    /// To one node: a direct message for a terminal whose inbox it holds.
    Inbox {
        terminal: &'a str,
        seq: u64,
        ts: u64,
        frame: &'a [u8],
    },
    /// To one node: wake this terminal.
    Wake {
        terminal: &'a str,
    },
}

fn action_name(a: Option<Action>) -> &'static str {
    match a {
        None => "",
        Some(Action::Close) => "close",
        Some(Action::Open) => "open",
        Some(Action::Mute) => "mute",
        Some(Action::Unmute) => "unmute",
        Some(Action::StreamSwitch) => "stream_switch",
    }
}

fn action_of(name: &str) -> Option<Action> {
    match name {
        "close" => Some(Action::Close),
        "open" => Some(Action::Open),
        "mute" => Some(Action::Mute),
        "unmute" => Some(Action::Unmute),
        "stream_switch" => Some(Action::StreamSwitch),
        _ => None,
    }
}

fn parse_wire(payload: &[u8]) -> Option<Wire<'_>> {
    let (kind, rest) = payload.split_first()?;
    let nl = rest.iter().position(|b| *b == b'\n');
    let (head, frame) = match nl {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let head = std::str::from_utf8(head).ok()?;
    let mut parts = head.split(' ');
    match kind {
        b'R' => {
            let epoch = parts.next()?;
            let seq = parts.next()?.parse().ok()?;
            let ts = parts.next()?.parse().ok()?;
            let action = action_of(parts.next().unwrap_or(""));
            Some(Wire::Reliable {
                epoch,
                seq,
                ts,
                action,
                frame,
            })
        }
        b'T' => Some(Wire::Transient { from: head, frame }),
        b'E' => {
            let epoch = parts.next()?;
            let seq = parts.next()?.parse().ok()?;
            Some(Wire::Epoch { epoch, seq })
        }
        b'W' => Some(Wire::Wake { terminal: head }),
        b'I' => {
            // `I<seq> <ts>\n<terminal>\n<frame>`: terminal ids hold no control characters.
            let at = frame.iter().position(|b| *b == b'\n')?;
            Some(Wire::Inbox {
                terminal: std::str::from_utf8(&frame[..at]).ok()?,
                seq: parts.next()?.parse().ok()?,
                ts: parts.next()?.parse().ok()?,
                frame: &frame[at + 1..],
            })
        }
        _ => None,
    }
}

fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn string_of(v: &Value) -> Option<String> {
    match v {
        Value::Int(n) => Some(n.to_string()),
        other => bytes_of(other).map(|b| String::from_utf8_lossy(b).into_owned()),
    }
}

fn u64_of(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => string_of(other)?.parse().ok(),
    }
}

/// Stream entries `[[id, [field, value, …]], …]` as stored messages (`seq-1` ids).
fn entries(v: &Value) -> Vec<StoredMessage> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = string_of(pair.first()?)?;
            let seq: u64 = id.split('-').next()?.parse().ok()?;
            let Value::Array(fields) = pair.get(1)? else {
                return None;
            };
            let mut ts = 0;
            let mut frame = None;
            for kv in fields.chunks(2) {
                match (kv.first().and_then(bytes_of), kv.get(1)) {
                    (Some(b"t"), Some(v)) => ts = u64_of(v).unwrap_or(0),
                    (Some(b"f"), Some(v)) => frame = bytes_of(v).map(Bytes::copy_from_slice),
                    _ => {}
                }
            }
            Some(StoredMessage {
                seq,
                ts,
                frame: frame?,
            })
        })
        .collect()
}

impl RedisEngine {
    /// Connect (two connections: commands, and subscriptions), check that Redis does not
    /// evict keys, and start the dispatcher that hands pub/sub messages to the node.
    pub async fn connect(settings: RedisSettings) -> Result<Arc<RedisEngine>, RedisStartError> {
        let mut url = settings.url.clone();
        if !url.contains("protocol=") {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str("protocol=resp3");
        }
        let connect_err = |source| RedisStartError::Connect {
            url: settings.url.clone(),
            source,
        };
        let client = redis::Client::open(url.as_str()).map_err(connect_err)?;
        let base = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_max_delay(Duration::from_secs(2));
        let mut conn = ConnectionManager::new_with_config(client.clone(), base.clone())
            .await
            .map_err(connect_err)?;
        let policy: std::collections::HashMap<String, String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut conn)
            .await
            .map_err(connect_err)?;
        let policy = policy.get("maxmemory-policy").cloned().unwrap_or_default();
        if policy != "noeviction" {
            return Err(RedisStartError::Eviction(policy));
        }
        let (tx, rx) = mpsc::unbounded_channel::<PushInfo>();
        let sub = ConnectionManager::new_with_config(
            client,
            base.set_push_sender(tx).set_automatic_resubscription(),
        )
        .await
        .map_err(connect_err)?;
        let (subs, subs_rx) = mpsc::unbounded_channel();
        tokio::spawn(subscriptions(sub, subs_rx));
        let engine = Arc::new(RedisEngine {
            settings,
            conn,
            subs,
            node: OnceLock::new(),
            channels: Mutex::new(HashSet::new()),
            boot: Mutex::new(None),
            healthy: AtomicBool::new(true),
            id: new_epoch(),
            me: OnceLock::new(),
            stats: EngineStats::default(),
        });
        let _ = engine.me.set(Arc::downgrade(&engine));
        engine.check_boot().await;
        tokio::spawn(dispatch(Arc::downgrade(&engine), rx));
        // Requests addressed to this node (wake a terminal whose keepalive it received).
        engine
            .subscribe(engine.key("node", &engine.id))
            .await
            .map_err(|e| RedisStartError::Subscribe(e.to_string()))?;
        engine.presence_upkeep().await;
        Ok(engine)
    }

    fn node(&self) -> Option<Arc<dyn Node>> {
        self.node.get().and_then(Weak::upgrade)
    }

    fn key(&self, what: &str, id: &str) -> String {
        format!("{}:{what}:{{{id}}}", self.settings.prefix)
    }

    fn node_key(&self, what: &str, node: &str) -> String {
        format!("{}:{what}:{node}", self.settings.prefix)
    }

    /// Every terminal on the shared service list, scored by when it was last seen.
    fn seen_index(&self) -> String {
        format!("{}:seen", self.settings.prefix)
    }

    fn room_channel(&self, room: &str) -> String {
        self.key("ch", room)
    }

    /// When a room's keys expire after its last write (see "Rooms"), in ms; at most what
    /// Redis takes.
    fn room_keys_ms(&self) -> u64 {
        let ms = (self.settings.retention.ttl.saturating_add(ROOM_KEY_MARGIN)).as_millis();
        ms.min(i64::MAX as u128 / 2) as u64
    }

    /// The [`PUBLISH`] script's call for one message.
    fn publish_invocation(&self, p: &Publish<'_>) -> ScriptInvocation<'static> {
        let (field, value) = match p.action {
            Some(Action::Close) => ("closed", "1"),
            Some(Action::Open) => ("closed", "0"),
            Some(Action::Mute) => ("muted", "1"),
            Some(Action::Unmute) => ("muted", "0"),
            Some(Action::StreamSwitch) | None => ("", ""),
        };
        let mut invocation = PUBLISH_SCRIPT.key(self.key("room", p.room));
        invocation
            .key(self.key("hist", p.room))
            .arg(&p.frame.head[..])
            .arg(&p.frame.tail[..])
            .arg(p.ts)
            .arg(self.settings.retention.max_messages)
            .arg(new_epoch())
            .arg(field)
            .arg(value)
            .arg(self.room_channel(p.room))
            .arg(action_name(p.action))
            .arg(self.room_keys_ms());
        invocation
    }

    /// The nodes holding a terminal's inbox (see [`POST`]).
    fn holders_key(&self, terminal: &str) -> String {
        self.key("at", terminal)
    }

    fn noted<T>(&self, r: redis::RedisResult<T>) -> Result<T, EngineError> {
        self.healthy.store(r.is_ok(), Ordering::Relaxed);
        self.stats.calls.inc();
        if r.is_err() {
            self.stats.errors.inc();
        }
        r.map_err(unavailable)
    }

    async fn subscribe(&self, channel: String) -> Result<(), EngineError> {
        if self.channels.lock().contains(&channel) {
            return Ok(());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.subs.send(SubCmd::Subscribe(channel.clone(), tx));
        let r = rx.await.unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "the subscription task stopped",
            )))
        });
        self.noted(r)?;
        self.channels.lock().insert(channel);
        Ok(())
    }

    fn unsubscribe(&self, channel: String) {
        if !self.channels.lock().remove(&channel) {
            return;
        }
        let _ = self.subs.send(SubCmd::Unsubscribe(channel));
    }

    /// Upkeep of presence across nodes: refresh this node's liveness, take back the presence
    /// of dead nodes, and tell every open room its count.
    async fn presence_upkeep(&self) {
        let mut conn = self.conn.clone();
        let nodes = format!("{}:nodes", self.settings.prefix);
        let r: redis::RedisResult<((), (), Vec<String>)> = redis::pipe()
            .cmd("SET")
            .arg(self.node_key("alive", &self.id))
            .arg(1)
            .arg("PX")
            .arg(NODE_TTL.as_millis() as u64)
            .cmd("SADD")
            .arg(&nodes)
            .arg(&self.id)
            .cmd("SMEMBERS")
            .arg(&nodes)
            .query_async(&mut conn)
            .await;
        let Ok((_, _, members)) = self.noted(r) else {
            return;
        };
        for node in members.iter().filter(|n| **n != self.id) {
            let alive: redis::RedisResult<bool> = redis::cmd("EXISTS")
                .arg(self.node_key("alive", node))
                .query_async(&mut conn)
                .await;
            if let Ok(false) = alive {
                tracing::info!(node = %node, "a node stopped: its terminals leave the online counts");
                let _: redis::RedisResult<i64> = REAP_SCRIPT
                    .key(self.node_key("npres", node))
                    .key(&nodes)
                    .arg(&self.settings.prefix)
                    .arg(node)
                    .invoke_async(&mut conn)
                    .await;
            }
        }
        let rooms: Vec<String> = {
            let prefix = format!("{}:ch:{{", self.settings.prefix);
            self.channels
                .lock()
                .iter()
                .filter_map(|c| {
                    c.strip_prefix(&prefix)?
                        .strip_suffix('}')
                        .map(str::to_owned)
                })
                .collect()
        };
        if rooms.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for room in &rooms {
            pipe.cmd("HLEN").arg(self.key("pres", room));
        }
        let counts: redis::RedisResult<Vec<u64>> = pipe.query_async(&mut conn).await;
        if let (Ok(counts), Some(node)) = (counts, self.node()) {
            for (room, count) in rooms.iter().zip(counts) {
                node.on_event(Event::Online { room, count });
            }
        }
    }

    /// Compare the boot key with what this node saw before: a missing or different value
    /// means Redis lost its data; every open room then re-reads its state.
    async fn check_boot(&self) {
        let key = format!("{}:boot", self.settings.prefix);
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<(Option<String>, String)> = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg(new_epoch())
            .arg("NX")
            .cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await;
        let Ok((_, now)) = self.noted(r) else {
            return;
        };
        let before = self.boot.lock().replace(now.clone());
        if before.is_some_and(|b| b != now) {
            tracing::warn!("Redis lost its data (boot key changed): rooms get new epochs");
            if let Some(node) = self.node() {
                node.on_event(Event::LinkLost);
            }
        }
    }

    /// A channel's kind and id: `P:ch:{R}` is `("ch", R)`, `P:node:{N}` is `("node", N)`.
    fn channel_id<'c>(&self, channel: &'c str) -> Option<(&'c str, &'c str)> {
        channel
            .strip_prefix(self.settings.prefix.as_str())
            .and_then(|rest| rest.strip_prefix(':'))
            .and_then(|rest| rest.split_once(":{"))
            .and_then(|(kind, rest)| rest.strip_suffix('}').map(|id| (kind, id)))
    }

    fn on_push(&self, push: PushInfo) {
        let Some(node) = self.node() else {
            return;
        };
        match push.kind {
            PushKind::Disconnection => {
                self.stats.link_lost.inc();
                node.on_event(Event::LinkLost);
            }
            // A room's channel (re)subscribed, on opening the room or after a reconnection:
            // what was published before it is in the stream, and the room reads it (a read
            // made after the link came back but before this would miss a publish in between).
            PushKind::Subscribe => {
                let Some(channel) = push.data.first().and_then(string_of) else {
                    return;
                };
                if let Some(("ch", room)) = self.channel_id(&channel) {
                    node.on_event(Event::Subscribed { room });
                }
            }
            PushKind::Message => {
                let (Some(channel), Some(payload)) = (
                    push.data.first().and_then(string_of),
                    push.data.get(1).and_then(bytes_of),
                ) else {
                    return;
                };
                let Some(id) = self.channel_id(&channel) else {
                    return;
                };
                match (id.0, parse_wire(payload)) {
                    (
                        "ch",
                        Some(Wire::Reliable {
                            epoch,
                            seq,
                            ts,
                            action,
                            frame,
                        }),
                    ) => node.on_event(Event::Reliable {
                        room: id.1,
                        epoch,
                        message: &StoredMessage {
                            seq,
                            ts,
                            frame: Bytes::copy_from_slice(frame),
                        },
                        action,
                    }),
                    ("ch", Some(Wire::Transient { from, frame })) if from != self.id => {
                        node.on_event(Event::Transient {
                            room: id.1,
                            frame: &Bytes::copy_from_slice(frame),
                        });
                    }
                    ("ch", Some(Wire::Epoch { epoch, seq })) => node.on_event(Event::Epoch {
                        room: id.1,
                        epoch,
                        seq,
                    }),
                    ("node", Some(Wire::Wake { terminal })) => {
                        node.on_event(Event::Wake { terminal });
                    }
                    (
                        "node",
                        Some(Wire::Inbox {
                            terminal,
                            seq,
                            ts,
                            frame,
                        }),
                    ) => node.on_event(Event::Inbox {
                        terminal,
                        message: &InboxMessage {
                            seq,
                            ts,
                            frame: Bytes::copy_from_slice(frame),
                        },
                    }),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// A terminal's record; with `watch`, this node first joins the terminal's holders (in
    /// the same pipeline, so before the read: see [`InboxEngine::load_and_watch`]).
    async fn load(
        &self,
        terminal: String,
        watch: bool,
    ) -> Result<Option<TerminalRecord>, EngineError> {
        let (t, i) = (self.key("term", &terminal), self.key("inbox", &terminal));
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        if watch {
            pipe.cmd("SADD")
                .arg(self.holders_key(&terminal))
                .arg(&self.id)
                .ignore();
        }
        let r: redis::RedisResult<TerminalRows> = pipe
            .cmd("HMGET")
            .arg(&t)
            .arg("seq")
            .arg("acked")
            .arg("wake")
            .cmd("ZRANGE")
            .arg(&i)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await;
        let (fields, kept) = self.noted(r)?;
        let get = |n: usize| fields.get(n).cloned().flatten();
        if fields.iter().all(Option::is_none) {
            return Ok(None);
        }
        let number = |n: usize| get(n).and_then(|v| v.parse().ok()).unwrap_or(0u64);
        let acked = number(1);
        Ok(Some(TerminalRecord {
            seq: number(0),
            acked,
            inbox: kept
                .into_iter()
                .filter(|(_, s)| *s > acked)
                .filter_map(|(member, seq)| {
                    // `TS FRAME`
                    let at = member.iter().position(|b| *b == b' ')?;
                    let ts = std::str::from_utf8(&member[..at]).ok()?.parse().ok()?;
                    Some(InboxMessage {
                        seq,
                        ts,
                        frame: Bytes::copy_from_slice(&member[at + 1..]),
                    })
                })
                .collect(),
            wake: get(2).and_then(|w| decode_wake(&w).map(|(r, _)| r)),
        }))
    }

    async fn open_room(&self, room: &str, keep: usize) -> Result<Snapshot, EngineError> {
        let mut conn = self.conn.clone();
        let v: redis::RedisResult<Value> = OPEN_SCRIPT
            .key(self.key("room", room))
            .key(self.key("hist", room))
            .key(self.key("pres", room))
            .arg(new_epoch())
            .arg(keep)
            .arg(self.room_keys_ms())
            .invoke_async(&mut conn)
            .await;
        let v = self.noted(v)?;
        let Value::Array(parts) = v else {
            return Err(EngineError::Unavailable("unexpected answer to OPEN".into()));
        };
        let field = |i: usize| parts.get(i).and_then(string_of).unwrap_or_default();
        let mut history = parts.get(4).map(entries).unwrap_or_default();
        history.reverse();
        self.trim_old(&mut history);
        Ok(Snapshot {
            epoch: Arc::from(field(0)),
            seq: field(1).parse().unwrap_or(0),
            flags: RoomFlags {
                muted: field(2) == "1",
                closed: field(3) == "1",
            },
            online: parts.get(5).and_then(u64_of).unwrap_or(0),
            history,
        })
    }

    /// Drop messages older than the retention's age (the stream is capped by count only).
    fn trim_old(&self, history: &mut Vec<StoredMessage>) {
        let cutoff = now_ms().saturating_sub(self.settings.retention.ttl.as_millis() as u64);
        history.retain(|m| m.ts >= cutoff);
    }
}

/// Hand the subscription connection's pushes to the node, in order.
async fn dispatch(engine: Weak<RedisEngine>, mut rx: mpsc::UnboundedReceiver<PushInfo>) {
    while let Some(push) = rx.recv().await {
        let Some(engine) = engine.upgrade() else {
            return;
        };
        engine.on_push(push);
    }
}

impl Engine for RedisEngine {
    fn attach(&self, node: Weak<dyn Node>) {
        if self.node.set(node).is_err() {
            tracing::warn!("an engine can serve one node; a second attach was ignored");
        }
    }

    fn open(&self, room: &str, keep: usize) -> EngineFuture<'_, Snapshot> {
        let room = room.to_owned();
        Box::pin(async move {
            // Subscribe first: whatever is published after the snapshot is then delivered,
            // and what the snapshot already has is dropped by the feed as a repeat.
            self.subscribe(self.room_channel(&room)).await?;
            self.open_room(&room, keep).await
        })
    }

    fn close(&self, room: &str) {
        self.unsubscribe(self.room_channel(room));
    }

    fn info(&self, room: &str) -> EngineFuture<'_, Option<Snapshot>> {
        let key = self.key("room", room);
        let pres = self.key("pres", room);
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let r: redis::RedisResult<(Vec<Option<String>>, u64)> = redis::pipe()
                .cmd("HMGET")
                .arg(&key)
                .arg("epoch")
                .arg("seq")
                .arg("muted")
                .arg("closed")
                .cmd("HLEN")
                .arg(&pres)
                .query_async(&mut conn)
                .await;
            let (v, online) = self.noted(r)?;
            let Some(Some(epoch)) = v.first().cloned() else {
                return Ok(None);
            };
            let get = |i: usize| v.get(i).cloned().flatten().unwrap_or_default();
            Ok(Some(Snapshot {
                epoch: Arc::from(epoch),
                seq: get(1).parse().unwrap_or(0),
                flags: RoomFlags {
                    muted: get(2) == "1",
                    closed: get(3) == "1",
                },
                online,
                history: Vec::new(),
            }))
        })
    }

    fn stats(&self) -> Option<EngineStats> {
        Some(self.stats.clone())
    }

    fn publish<'a>(&'a self, p: Publish<'a>) -> EngineFuture<'a, Sequenced> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let r: redis::RedisResult<(String, u64)> =
                self.publish_invocation(&p).invoke_async(&mut conn).await;
            let (epoch, seq) = self.noted(r)?;
            Ok(Sequenced {
                epoch: Arc::from(epoch),
                seq,
            })
        })
    }

    fn publish_many<'a>(
        &'a self,
        batch: &'a [Publish<'a>],
    ) -> EngineFuture<'a, Vec<Result<Sequenced, EngineError>>> {
        Box::pin(async move {
            if batch.is_empty() {
                return Ok(Vec::new());
            }
            // One round trip: the script loaded (a no-op if it is) and run once per message,
            // in order; each message's error is its own.
            let invocations: Vec<_> = batch.iter().map(|p| self.publish_invocation(p)).collect();
            let mut pipe = redis::pipe();
            pipe.ignore_errors().load_script(&PUBLISH_SCRIPT);
            for i in &invocations {
                pipe.invoke_script(i);
            }
            let mut conn = self.conn.clone();
            let r: redis::RedisResult<Vec<redis::RedisResult<Value>>> =
                pipe.query_async(&mut conn).await;
            let answers = self.noted(r)?;
            Ok(answers
                .into_iter()
                .skip(1)
                .map(|a| {
                    let (epoch, seq): (String, u64) =
                        redis::from_redis_value(a.map_err(unavailable)?)
                            .map_err(|e| unavailable(e.into()))?;
                    Ok(Sequenced {
                        epoch: Arc::from(epoch),
                        seq,
                    })
                })
                .collect())
        })
    }

    fn broadcast(&self, room: &str, frame: &Bytes) {
        let mut payload = Vec::with_capacity(frame.len() + self.id.len() + 2);
        payload.push(b'T');
        payload.extend_from_slice(self.id.as_bytes());
        payload.push(b'\n');
        payload.extend_from_slice(frame);
        let channel = self.room_channel(room);
        let mut conn = self.conn.clone();
        spawn_write(
            "a transient message for the other nodes",
            true,
            async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(payload)
                    .query_async::<()>(&mut conn)
                    .await
            },
        );
    }

    fn history(
        &self,
        room: &str,
        since: u64,
        limit: usize,
        max_bytes: usize,
    ) -> EngineFuture<'_, Option<History>> {
        let room = room.to_owned();
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let r: redis::RedisResult<Value> = HISTORY_SCRIPT
                .key(self.key("room", &room))
                .key(self.key("hist", &room))
                .arg(since + 1)
                .arg(limit.max(1))
                .invoke_async(&mut conn)
                .await;
            let v = self.noted(r)?;
            let Value::Array(parts) = v else {
                return Ok(None);
            };
            let epoch = parts.first().and_then(string_of).unwrap_or_default();
            let latest = parts.get(1).and_then(u64_of).unwrap_or(0);
            let mut kept = parts.get(2).map(entries).unwrap_or_default();
            self.trim_old(&mut kept);
            let mut messages = parts.get(3).map(entries).unwrap_or_default();
            self.trim_old(&mut messages);
            let mut bytes = 0;
            messages.truncate(limit);
            let mut n = 0;
            for m in &messages {
                bytes += m.frame.len();
                if n > 0 && bytes > max_bytes {
                    break;
                }
                n += 1;
            }
            messages.truncate(n);
            let first = kept
                .first()
                .map(|m| m.seq)
                .or_else(|| messages.first().map(|m| m.seq))
                .unwrap_or(latest + 1);
            Ok(Some(History {
                epoch: Arc::from(epoch),
                latest,
                first,
                messages,
            }))
        })
    }

    fn reset(&self, room: &str) -> EngineFuture<'_, Sequenced> {
        let room = room.to_owned();
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let r: redis::RedisResult<String> = RESET_SCRIPT
                .key(self.key("room", &room))
                .key(self.key("hist", &room))
                .arg(new_epoch())
                .arg(self.room_channel(&room))
                .arg(self.room_keys_ms())
                .invoke_async(&mut conn)
                .await;
            let epoch = self.noted(r)?;
            Ok(Sequenced {
                epoch: Arc::from(epoch),
                seq: 0,
            })
        })
    }

    fn tick(&self) {
        // Once a second (the hub's upkeep): has Redis lost its data?
        if let Some(engine) = self.me.get().and_then(Weak::upgrade) {
            tokio::spawn(async move {
                engine.check_boot().await;
                engine.presence_upkeep().await;
            });
        }
    }

    fn shares_presence(&self) -> bool {
        true
    }

    fn presence(&self, room: &str, terminal: &str, present: bool) {
        let Some(engine) = self.me.get().and_then(Weak::upgrade) else {
            return;
        };
        let (room, terminal) = (room.to_owned(), terminal.to_owned());
        tokio::spawn(async move {
            let mut conn = engine.conn.clone();
            let r: redis::RedisResult<u64> = PRESENCE_SCRIPT
                .key(engine.key("pres", &room))
                .key(engine.node_key("npres", &engine.id))
                .arg(&terminal)
                .arg(&room)
                .arg(if present { "1" } else { "0" })
                .invoke_async(&mut conn)
                .await;
            match engine.noted(r) {
                Ok(count) => {
                    if let Some(node) = engine.node() {
                        node.on_event(Event::Online { room: &room, count });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "a presence change did not reach Redis"),
            }
        });
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn flush(&self) -> EngineFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Each node's record is a key `P:nstats:N` that expires after `ttl`, indexed in the
    /// sorted set `P:nstats` by when it was written (entries older than `ttl` are dropped
    /// on every call): one pipeline to write and list, one `MGET` to read.
    fn node_stats<'a>(&'a self, mine: &'a str, ttl: Duration) -> EngineFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let index = format!("{}:nstats", self.settings.prefix);
            let ttl_ms = ttl.as_millis().max(1) as u64;
            let now = now_ms();
            let r: redis::RedisResult<((), (), (), Vec<String>)> = redis::pipe()
                .cmd("SET")
                .arg(self.node_key("nstats", &self.id))
                .arg(mine)
                .arg("PX")
                .arg(ttl_ms)
                .cmd("ZADD")
                .arg(&index)
                .arg(now)
                .arg(&self.id)
                .cmd("ZREMRANGEBYSCORE")
                .arg(&index)
                .arg("-inf")
                .arg(format!("({}", now.saturating_sub(ttl_ms)))
                .cmd("ZRANGE")
                .arg(&index)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await;
            let (_, _, _, nodes) = self.noted(r)?;
            let keys: Vec<String> = nodes.iter().map(|n| self.node_key("nstats", n)).collect();
            let r: redis::RedisResult<Vec<Option<String>>> =
                redis::cmd("MGET").arg(&keys).query_async(&mut conn).await;
            Ok(self.noted(r)?.into_iter().flatten().collect())
        })
    }
}

impl InboxEngine for RedisEngine {
    fn load_terminal(&self, terminal: &str) -> EngineFuture<'_, Option<TerminalRecord>> {
        Box::pin(self.load(terminal.to_owned(), false))
    }

    fn load_and_watch(&self, terminal: &str) -> EngineFuture<'_, Option<TerminalRecord>> {
        Box::pin(self.load(terminal.to_owned(), true))
    }

    fn unwatch(&self, terminal: &str) {
        let mut conn = self.conn.clone();
        let (key, id) = (self.holders_key(terminal), self.id.clone());
        spawn_write("an inbox release", true, async move {
            redis::cmd("SREM")
                .arg(key)
                .arg(id)
                .query_async::<i64>(&mut conn)
                .await
        });
    }

    fn post<'a>(
        &'a self,
        terminal: &'a str,
        frame: &'a SeqTemplate,
        ts: u64,
    ) -> EngineFuture<'a, InboxMessage> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let r: redis::RedisResult<u64> = POST_SCRIPT
                .key(self.key("term", terminal))
                .key(self.key("inbox", terminal))
                .arg(&frame.head[..])
                .arg(&frame.tail[..])
                .key(self.holders_key(terminal))
                .arg(self.settings.inbox_size)
                .arg(format!("{}:node:{{", self.settings.prefix))
                .arg(ts)
                .arg(terminal)
                .invoke_async(&mut conn)
                .await;
            let seq = self.noted(r)?;
            Ok(InboxMessage {
                seq,
                ts,
                frame: frame.with_seq(seq),
            })
        })
    }

    fn ack(&self, terminal: &str, seq: u64) {
        let mut conn = self.conn.clone();
        let (t, i) = (self.key("term", terminal), self.key("inbox", terminal));
        spawn_write("an inbox acknowledgement", false, async move {
            ACK_SCRIPT
                .key(t)
                .key(i)
                .arg(seq)
                .invoke_async::<i64>(&mut conn)
                .await
        });
    }

    fn trim(&self, terminal: &str, keep_from: u64) {
        let mut conn = self.conn.clone();
        let key = self.key("inbox", terminal);
        spawn_write("an inbox trim", true, async move {
            redis::cmd("ZREMRANGEBYSCORE")
                .arg(key)
                .arg("-inf")
                .arg(format!("({keep_from}"))
                .query_async::<i64>(&mut conn)
                .await
        });
    }

    fn set_wake(&self, terminal: &str, registration: &WakeRegistration) {
        // Through the same check as a keepalive: a late write never replaces a newer one.
        let mut conn = self.conn.clone();
        let key = self.key("term", terminal);
        let (ts, value) = (registration.ts, encode_wake(registration, &self.id));
        spawn_write("a wake registration", false, async move {
            KEEPALIVE_SCRIPT
                .key(key)
                .arg(ts)
                .arg(value)
                .invoke_async::<i64>(&mut conn)
                .await
        });
    }

    fn accept_keepalive<'a>(
        &'a self,
        terminal: &'a str,
        registration: &'a WakeRegistration,
    ) -> EngineFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let r: redis::RedisResult<i64> = KEEPALIVE_SCRIPT
                .key(self.key("term", terminal))
                .arg(registration.ts)
                .arg(encode_wake(registration, &self.id))
                .invoke_async(&mut conn)
                .await;
            Ok(self.noted(r)? == 1)
        })
    }

    fn wake_elsewhere<'a>(&'a self, terminal: &'a str) -> EngineFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let r: redis::RedisResult<Option<String>> = redis::cmd("HGET")
                .arg(self.key("term", terminal))
                .arg("wake")
                .query_async(&mut conn)
                .await;
            let Some(wake) = self.noted(r)? else {
                return Ok(false);
            };
            let Some((_, node)) = decode_wake(&wake) else {
                return Ok(false);
            };
            if node.is_empty() || node == self.id {
                return Ok(false);
            }
            // Only a live node can send it; otherwise this node tries from its own socket.
            let mut payload = b"W".to_vec();
            payload.extend_from_slice(terminal.as_bytes());
            let r: redis::RedisResult<(bool, u64)> = redis::pipe()
                .cmd("EXISTS")
                .arg(self.node_key("alive", node))
                .cmd("PUBLISH")
                .arg(self.key("node", node))
                .arg(payload)
                .query_async(&mut conn)
                .await;
            let (alive, receivers) = self.noted(r)?;
            Ok(alive && receivers > 0)
        })
    }

    fn remembers_every_keepalive(&self) -> bool {
        true
    }

    fn pending_terminals(&self) -> EngineFuture<'_, Vec<String>> {
        // Each node wakes the terminals whose keepalives it received; after a restart it
        // learns them again from their next keepalive.
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    fn shares_terminals(&self) -> bool {
        true
    }

    fn share_terminals(&self, changed: Vec<(Arc<str>, TerminalPresence)>, retention: Duration) {
        let mut conn = self.conn.clone();
        let keep_ms = retention.as_millis().max(1) as u64;
        let mut pipe = redis::pipe();
        for (terminal, presence) in &changed {
            let key = self.key("seen", terminal);
            let json = serde_json::to_string(presence).unwrap_or_default();
            pipe.cmd("HSET").arg(&key).arg(&self.id).arg(json).ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(keep_ms).ignore();
            pipe.cmd("ZADD")
                .arg(self.seen_index())
                .arg(presence.last_seen_ms)
                .arg(&**terminal)
                .ignore();
        }
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(self.seen_index())
            .arg("-inf")
            .arg(format!("({}", now_ms().saturating_sub(keep_ms)))
            .ignore();
        spawn_write("the service list", true, async move {
            pipe.query_async::<()>(&mut conn).await
        });
    }

    fn terminals_elsewhere<'a>(
        &'a self,
        terminals: &'a [String],
    ) -> EngineFuture<'a, Vec<Vec<TerminalPresence>>> {
        Box::pin(async move {
            if terminals.is_empty() {
                // An empty pipeline has no answer to parse.
                return Ok(Vec::new());
            }
            let mut conn = self.conn.clone();
            let mut pipe = redis::pipe();
            for t in terminals {
                pipe.cmd("HGETALL").arg(self.key("seen", t));
            }
            let r: redis::RedisResult<Vec<HashMap<String, String>>> =
                pipe.query_async(&mut conn).await;
            let views = self.noted(r)?;
            let nodes: Vec<&String> = views
                .iter()
                .flat_map(|v| v.keys())
                .filter(|n| **n != self.id)
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let mut alive: HashMap<&String, bool> = HashMap::new();
            if !nodes.is_empty() {
                let mut pipe = redis::pipe();
                for n in &nodes {
                    pipe.cmd("EXISTS").arg(self.node_key("alive", n));
                }
                let r: redis::RedisResult<Vec<bool>> = pipe.query_async(&mut conn).await;
                alive = nodes.iter().copied().zip(self.noted(r)?).collect();
            }
            Ok(views
                .iter()
                .map(|v| {
                    v.iter()
                        .filter(|(n, _)| **n != self.id)
                        .filter_map(|(n, json)| {
                            let p: TerminalPresence = serde_json::from_str(json).ok()?;
                            Some(if alive.get(n).copied().unwrap_or(false) {
                                p
                            } else {
                                // A node that is gone holds no session any more.
                                TerminalPresence {
                                    last_seen_ms: p.last_seen_ms,
                                    ..TerminalPresence::default()
                                }
                            })
                        })
                        .collect()
                })
                .collect())
        })
    }

    fn known_terminals(&self) -> EngineFuture<'_, Vec<String>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let r: redis::RedisResult<Vec<String>> = redis::cmd("ZRANGE")
                .arg(self.seen_index())
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await;
            self.noted(r)
        })
    }
}

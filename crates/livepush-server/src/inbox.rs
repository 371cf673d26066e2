//! Per-terminal inboxes: direct messages that wait until the terminal acknowledges them, and
//! the wake-ups that bring a sleeping terminal back for them.
//!
//! An inbox works like a room with one member. A post takes the terminal's next inbox `seq`,
//! goes to the store, and once durable is pushed to every session the terminal has open (as
//! an `inbox` frame). On every connect the server sends what is after the acknowledged
//! position (or after the position a long-poll names). `ack` advances the position. Inboxes
//! are bounded in count and age; a message dropped for either is counted, and the terminal
//! sees the gap in inbox seqs.
//!
//! When a message is waiting and the terminal is offline (no session, not within a long-poll
//! grace), the server sends it a wake datagram at the address of its last verified keepalive
//! and repeats it with back-off until the terminal connects, acknowledges, or the messages
//! expire.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use livepush_proto::{InboxPosition, ServerFrame, encode_frame};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::value::RawValue;

use crate::auth::now_ms;
use crate::hub::ConnId;
use crate::metrics::ReasonLabel;
use crate::outbox::{Kind, Outbox};
use crate::store::{Durable, InboxMessage, Store, StoreError, TerminalRecord, WakeRegistration};
use crate::terminals::Terminals;
use crate::wake::WakeSocket;

/// Bounds of inboxes and the wake retry schedule.
#[derive(Debug, Clone, Copy)]
pub struct InboxSettings {
    /// Unacknowledged messages kept per terminal; the oldest is dropped past it.
    pub max_messages: usize,
    /// Age after which an unacknowledged message is dropped.
    pub ttl: Duration,
    /// Wake datagrams sent per episode after the first.
    pub wake_retries: u32,
    /// Delay before the first repeat; doubles up to `wake_retry_max`.
    pub wake_retry_first: Duration,
    pub wake_retry_max: Duration,
}

/// Counters of the inbox path.
#[derive(Debug, Default, Clone)]
pub struct InboxStats {
    pub posted: Counter,
    /// Messages dropped unacknowledged, by reason: overflow, expired.
    pub dropped: Family<ReasonLabel, Counter>,
}

/// The answer to a post.
#[derive(Debug, Clone, Copy)]
pub struct Posted {
    pub seq: u64,
    pub online: bool,
    pub wake_sent: bool,
}

/// What the terminals API shows of an inbox.
#[derive(Debug, Clone, Copy, Default)]
pub struct InboxView {
    pub position: InboxPosition,
    pub wake_registered: bool,
    pub last_keepalive_ms: Option<u64>,
}

#[derive(Debug)]
struct Pending {
    message: InboxMessage,
}

#[derive(Debug, Default)]
struct State {
    assigned: u64,
    delivered: u64,
    acked: u64,
    pending: VecDeque<Pending>,
    /// Delivered, unacknowledged, kept: contiguous or with gaps where messages were dropped.
    messages: VecDeque<InboxMessage>,
    sessions: HashMap<ConnId, Arc<Outbox>>,
    wake: Option<WakeRegistration>,
    /// When the registration was last written to the store (ms).
    wake_persisted_ms: u64,
    /// A wake episode is running.
    waking: bool,
    /// The newest seq a finished episode tried to wake for: not retried until a newer one,
    /// or until the terminal came and left again, or moved.
    woken_for: u64,
    /// Sessions attached so far; an episode that saw the terminal come does not mark its
    /// messages as woken for.
    attaches: u64,
    /// Last activity (ms), for eviction.
    touched_ms: u64,
}

impl State {
    fn unacked(&self) -> bool {
        self.messages.iter().any(|m| m.seq > self.acked)
    }
}

/// One terminal's inbox.
#[derive(Debug)]
pub struct Inbox {
    id: Arc<str>,
    state: Mutex<State>,
}

/// All inboxes of this node (loaded on demand).
#[derive(Debug)]
pub struct Inboxes {
    map: Mutex<HashMap<Arc<str>, Arc<Inbox>>>,
    store: Arc<dyn Store>,
    terminals: Arc<Terminals>,
    wake: Option<Arc<WakeSocket>>,
    settings: InboxSettings,
    pub stats: InboxStats,
}

fn spawn_write(w: Durable, what: &'static str) {
    tokio::spawn(async move {
        if let Err(e) = w.await {
            tracing::error!(error = %e, "store write failed: {what}");
        }
    });
}

impl Inboxes {
    pub fn new(
        store: Arc<dyn Store>,
        terminals: Arc<Terminals>,
        wake: Option<Arc<WakeSocket>>,
        settings: InboxSettings,
        stats: InboxStats,
    ) -> Inboxes {
        Inboxes {
            map: Mutex::new(HashMap::new()),
            store,
            terminals,
            wake,
            settings,
            stats,
        }
    }

    /// The inbox of `id`, loaded from the store on first use.
    pub fn get(&self, id: &str) -> Result<Arc<Inbox>, StoreError> {
        if let Some(i) = self.map.lock().get(id) {
            return Ok(i.clone());
        }
        let record = self.store.load_terminal(id)?.unwrap_or_default();
        let mut map = self.map.lock();
        if let Some(i) = map.get(id) {
            return Ok(i.clone());
        }
        let key: Arc<str> = Arc::from(id);
        let inbox = Arc::new(Inbox::new(key.clone(), record));
        map.insert(key, inbox.clone());
        Ok(inbox)
    }

    /// Load every terminal the store says has unacknowledged messages, so that the wake scan
    /// goes on waking them after a restart.
    pub fn load_pending(&self) -> Result<usize, StoreError> {
        let ids = self.store.terminals_with_pending_inbox()?;
        for id in &ids {
            self.get(id)?;
        }
        Ok(ids.len())
    }

    /// What the terminals API shows (loads from the store; `None` if never seen there).
    pub fn view(&self, id: &str) -> Result<Option<InboxView>, StoreError> {
        if let Some(i) = self.map.lock().get(id).cloned() {
            return Ok(Some(i.view()));
        }
        Ok(self.store.load_terminal(id)?.map(|r| InboxView {
            position: InboxPosition {
                seq: r.seq,
                acked: r.acked,
            },
            wake_registered: r.wake.is_some(),
            last_keepalive_ms: r.wake.map(|w| w.ts),
        }))
    }

    /// Post a direct message. Answered once durable; delivered to open sessions, or a wake
    /// datagram goes out if the terminal is offline and registered.
    pub async fn post(&self, id: &str, ty: &str, data: &RawValue) -> Result<Posted, StoreError> {
        let inbox = self.get(id)?;
        let (seq, durable) = inbox.sequence(ty, data, now_ms(), self.store.as_ref());
        let stored = durable.await;
        let delivery = inbox.deliver_through(seq, self.settings.max_messages);
        self.stats.posted.inc();
        if let Some(keep_from) = delivery.trimmed_to {
            self.stats
                .dropped
                .get_or_create(&ReasonLabel { reason: "overflow" })
                .inc_by(delivery.dropped);
            spawn_write(self.store.trim_inbox(id, keep_from), "inbox trim");
        }
        stored?;
        let online = delivery.sessions > 0 || self.terminals.is_online(id);
        let wake_sent = if online {
            false
        } else {
            self.start_wake(&inbox).await
        };
        Ok(Posted {
            seq,
            online,
            wake_sent,
        })
    }

    /// Open a session's view of the inbox: queue `connected` (when `greet` is given) with the
    /// inbox position, then every message after `after` (default: the acknowledged position),
    /// and register the session for live delivery, all under the inbox's lock.
    pub fn attach(
        &self,
        inbox: &Inbox,
        conn: ConnId,
        outbox: &Arc<Outbox>,
        after: Option<u64>,
        greet: Option<&dyn Fn(InboxPosition) -> ServerFrame>,
    ) {
        let mut st = inbox.state.lock();
        st.touched_ms = now_ms();
        if let Some(greet) = greet {
            outbox.reply(&greet(InboxPosition {
                seq: st.delivered,
                acked: st.acked,
            }));
        }
        let after = after.unwrap_or(st.acked);
        for m in st.messages.iter().filter(|m| m.seq > after) {
            outbox.push(m.frame.clone(), Kind::Reply);
        }
        st.sessions.insert(conn, outbox.clone());
        // The terminal came: if it leaves again without acknowledging, wake it again.
        st.woken_for = st.acked;
        st.attaches += 1;
    }

    /// A session closed.
    pub fn detach(&self, inbox: &Inbox, conn: ConnId) {
        let mut st = inbox.state.lock();
        st.sessions.remove(&conn);
        st.touched_ms = now_ms();
    }

    /// The terminal handled everything up to `seq`.
    pub fn ack(&self, inbox: &Inbox, seq: u64) {
        let mut st = inbox.state.lock();
        let seq = seq.min(st.delivered);
        if seq <= st.acked {
            return;
        }
        st.acked = seq;
        while st.messages.front().is_some_and(|m| m.seq <= seq) {
            st.messages.pop_front();
        }
        st.touched_ms = now_ms();
        drop(st);
        spawn_write(self.store.ack_inbox(&inbox.id, seq), "inbox ack");
    }

    /// Record a verified keepalive. Persisted when the address changes, and every ten minutes.
    pub fn keepalive(&self, id: &str, reg: WakeRegistration) -> Result<(), StoreError> {
        let inbox = self.get(id)?;
        let mut st = inbox.state.lock();
        let changed = st
            .wake
            .is_none_or(|w| w.addr != reg.addr || w.size != reg.size);
        st.wake = Some(reg);
        st.touched_ms = now_ms();
        if changed || reg.ts.saturating_sub(st.wake_persisted_ms) > 600_000 {
            st.wake_persisted_ms = reg.ts;
            drop(st);
            spawn_write(self.store.set_wake(id, &reg), "wake registration");
        }
        Ok(())
    }

    /// The `ts` of the last keepalive accepted for `id` (loaded from the store if needed):
    /// a keepalive not newer than it is a replay.
    pub fn last_keepalive_ts(&self, id: &str) -> Option<u64> {
        let inbox = self.get(id).ok()?;
        let st = inbox.state.lock();
        st.wake.map(|w| w.ts)
    }

    /// Upkeep: expire old messages, start wake episodes for offline terminals with waiting
    /// messages, and forget idle inboxes (they are reloaded from the store on demand).
    pub async fn tick(&self) {
        let now = now_ms();
        let ttl = self.settings.ttl.as_millis() as u64;
        let inboxes: Vec<Arc<Inbox>> = self.map.lock().values().cloned().collect();
        for inbox in inboxes {
            let (expired, keep_from, wake) = {
                let mut st = inbox.state.lock();
                let mut expired = 0;
                while st.messages.front().is_some_and(|m| m.ts + ttl < now) {
                    st.messages.pop_front();
                    expired += 1;
                }
                let keep_from = st.messages.front().map_or(st.delivered + 1, |m| m.seq);
                let wake = st.sessions.is_empty()
                    && !st.waking
                    && st.wake.is_some()
                    && st.unacked()
                    && st.delivered > st.woken_for;
                (expired, keep_from, wake)
            };
            if expired > 0 {
                self.stats
                    .dropped
                    .get_or_create(&ReasonLabel { reason: "expired" })
                    .inc_by(expired);
                spawn_write(self.store.trim_inbox(&inbox.id, keep_from), "inbox expiry");
            }
            if wake && !self.terminals.is_online(&inbox.id) {
                self.start_wake(&inbox).await;
            }
        }
        self.map.lock().retain(|_, i| {
            let st = i.state.lock();
            !(st.sessions.is_empty()
                && !st.waking
                && !st.unacked()
                && st.pending.is_empty()
                && now.saturating_sub(st.touched_ms) > 300_000)
        });
    }

    /// Send the first wake datagram now and repeat it in the background with back-off while
    /// the terminal stays offline and has unacknowledged messages. Returns whether the first
    /// datagram went out.
    async fn start_wake(&self, inbox: &Arc<Inbox>) -> bool {
        let Some(socket) = self.wake.clone() else {
            return false;
        };
        let (target, reg, attaches) = {
            let mut st = inbox.state.lock();
            let Some(reg) = st.wake else {
                return false;
            };
            if st.waking {
                // An episode is running; it will see the newer seq on its next attempt.
                return true;
            }
            st.waking = true;
            (st.delivered, reg, st.attaches)
        };
        let sent = socket.wake(&inbox.id, target, &reg).await;
        let inbox = inbox.clone();
        let terminals = self.terminals.clone();
        let settings = self.settings;
        tokio::spawn(async move {
            let mut delay = settings.wake_retry_first;
            let mut last_target = target;
            for _ in 0..settings.wake_retries {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(settings.wake_retry_max);
                let next = {
                    let st = inbox.state.lock();
                    if !st.sessions.is_empty() || !st.unacked() {
                        None
                    } else {
                        st.wake.map(|w| (st.delivered, w))
                    }
                };
                let Some((target, reg)) = next else { break };
                if terminals.is_online(&inbox.id) {
                    break;
                }
                last_target = target;
                socket.wake(&inbox.id, target, &reg).await;
            }
            let mut st = inbox.state.lock();
            st.waking = false;
            if st.attaches == attaches {
                // The terminal never came during this episode: do not wake it again for the
                // same messages (only for newer ones, or once it has come and left).
                st.woken_for = st.woken_for.max(last_target);
            }
        });
        sent
    }
}

/// What a delivery did.
#[derive(Debug, Default)]
struct Delivery {
    sessions: usize,
    trimmed_to: Option<u64>,
    dropped: u64,
}

impl Inbox {
    fn new(id: Arc<str>, r: TerminalRecord) -> Inbox {
        Inbox {
            id,
            state: Mutex::new(State {
                assigned: r.seq,
                delivered: r.seq,
                acked: r.acked,
                messages: r.inbox.into(),
                wake: r.wake,
                wake_persisted_ms: r.wake.map_or(0, |w| w.ts),
                touched_ms: now_ms(),
                ..State::default()
            }),
        }
    }

    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    fn view(&self) -> InboxView {
        let st = self.state.lock();
        InboxView {
            position: InboxPosition {
                seq: st.delivered,
                acked: st.acked,
            },
            wake_registered: st.wake.is_some(),
            last_keepalive_ms: st.wake.map(|w| w.ts),
        }
    }

    fn sequence(&self, ty: &str, data: &RawValue, ts: u64, store: &dyn Store) -> (u64, Durable) {
        let mut st = self.state.lock();
        st.assigned += 1;
        let seq = st.assigned;
        let frame = encode_inbox(seq, ty, data, ts);
        let message = InboxMessage { seq, ts, frame };
        let durable = store.append_inbox(&self.id, &message);
        st.pending.push_back(Pending { message });
        st.touched_ms = ts;
        (seq, durable)
    }

    fn deliver_through(&self, through: u64, max_messages: usize) -> Delivery {
        let mut st = self.state.lock();
        let mut out = Delivery {
            sessions: st.sessions.len(),
            ..Delivery::default()
        };
        while st.pending.front().is_some_and(|p| p.message.seq <= through) {
            let Some(p) = st.pending.pop_front() else {
                break;
            };
            st.delivered = p.message.seq;
            for o in st.sessions.values() {
                o.push(p.message.frame.clone(), Kind::Reply);
            }
            st.messages.push_back(p.message);
            while st.messages.len() > max_messages {
                st.messages.pop_front();
                out.dropped += 1;
            }
        }
        if out.dropped > 0 {
            out.trimmed_to = st.messages.front().map(|m| m.seq);
        }
        out
    }
}

/// Encode an `inbox` frame once; `data` is copied through as raw JSON.
fn encode_inbox(seq: u64, ty: &str, data: &RawValue, ts: u64) -> Bytes {
    #[derive(serde::Serialize)]
    struct InboxRef<'a> {
        op: &'static str,
        seq: u64,
        #[serde(rename = "type")]
        ty: &'a str,
        data: &'a RawValue,
        ts: u64,
    }
    match serde_json::to_vec(&InboxRef {
        op: "inbox",
        seq,
        ty,
        data,
        ts,
    }) {
        Ok(v) => Bytes::from(v),
        Err(_) => encode_frame(&ServerFrame::error(
            None,
            livepush_proto::ErrorCode::Internal,
            "frame encoding failed",
        )),
    }
}

use std::time::Duration;

use parking_lot::Mutex as PlMutex;
use serde_json::value::RawValue;

use super::*;
use crate::store::{HistoryStore, InboxStore, MemoryStore, StoreError};

/// A node that records what the engine hands it.
#[derive(Default)]
struct Recorder(PlMutex<Vec<String>>);

impl Node for Recorder {
    fn on_event(&self, event: Event<'_>) {
        let line = match event {
            Event::Reliable {
                epoch,
                message,
                action,
                ..
            } => format!(
                "{epoch}:{}{}",
                message.seq,
                if action.is_some() { "!" } else { "" }
            ),
            Event::Epoch { epoch, seq, .. } => format!("epoch {epoch}:{seq}"),
            Event::Inbox { terminal, message } => format!("inbox {terminal}:{}", message.seq),
            Event::Transient { .. }
            | Event::Online { .. }
            | Event::LinkLost
            | Event::Subscribed { .. }
            | Event::Wake { .. } => "other".into(),
        };
        self.0.lock().push(line);
    }
}

fn engine(max: usize) -> (Arc<LocalEngine>, Arc<Recorder>, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::default());
    let engine = Arc::new(LocalEngine::new(
        store.clone(),
        Retention {
            max_messages: max,
            ttl: Duration::from_secs(3600),
        },
    ));
    let recorder = Arc::new(Recorder::default());
    let node: Arc<dyn Node> = recorder.clone();
    engine.attach(Arc::downgrade(&node));
    (engine, recorder, store)
}

fn template(n: u64) -> &'static SeqTemplate {
    let data = RawValue::from_string(format!("{n}")).unwrap();
    // The template outlives the publish future: leaked, in tests only.
    Box::leak(Box::new(SeqTemplate::msg("r", "gift", &data, 1)))
}

fn publish(e: &LocalEngine, n: u64, action: Option<Action>) -> EngineFuture<'_, Sequenced> {
    e.publish(Publish {
        room: "r",
        frame: template(n),
        ts: 1,
        action,
    })
}

type Gate = tokio::sync::oneshot::Sender<Result<(), StoreError>>;

/// A store whose appends are durable (or fail) only when the test says so (in submission
/// order, as every store's are).
#[derive(Debug, Default)]
struct Gated {
    inner: Arc<MemoryStore>,
    gates: PlMutex<Vec<Gate>>,
}

#[derive(Debug, thiserror::Error)]
#[error("no space left on device (test)")]
struct DiskFull;

impl Gated {
    fn open_all(&self) {
        for gate in self.gates.lock().drain(..) {
            let _ = gate.send(Ok(()));
        }
    }

    /// Fail every waiting append, as a failed group commit does.
    fn fail_all(&self) {
        for gate in self.gates.lock().drain(..) {
            let _ = gate.send(Err(StoreError::io("writing (test)", DiskFull)));
        }
    }

    /// A write that waits for [`Gated::open_all`] or [`Gated::fail_all`].
    fn gate(&self) -> crate::store::Durable {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.gates.lock().push(tx);
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Closed)) })
    }
}

impl HistoryStore for Gated {
    fn load_room(&self, room: &str, keep: usize) -> Result<Option<RoomRecord>, StoreError> {
        self.inner.load_room(room, keep)
    }
    fn read(
        &self,
        room: &str,
        since: u64,
        upto: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.inner.read(room, since, upto, limit, max_bytes)
    }
    fn create_room(&self, room: &str, epoch: &str) -> crate::store::Durable {
        self.inner.create_room(room, epoch)
    }
    fn append(
        &self,
        room: &str,
        message: &StoredMessage,
        flags: Option<RoomFlags>,
    ) -> crate::store::Durable {
        drop(self.inner.append(room, message, flags));
        self.gate()
    }
    fn reset(&self, room: &str, epoch: &str) -> crate::store::Durable {
        self.inner.reset(room, epoch)
    }
    fn trim(&self, room: &str, keep_from: u64) -> crate::store::Durable {
        self.inner.trim(room, keep_from)
    }
    /// Applied when its gate opens (as a store that has not committed it yet).
    fn forget(&self, room: &str, epoch: &str) -> crate::store::Durable {
        let (gate, inner) = (self.gate(), self.inner.clone());
        let (room, epoch) = (room.to_owned(), epoch.to_owned());
        Box::pin(async move {
            gate.await?;
            inner.forget(&room, &epoch).await
        })
    }
}

impl InboxStore for Gated {
    fn load_terminal(&self, t: &str) -> Result<Option<TerminalRecord>, StoreError> {
        self.inner.load_terminal(t)
    }
    fn append_inbox(&self, t: &str, m: &InboxMessage) -> crate::store::Durable {
        drop(self.inner.append_inbox(t, m));
        self.gate()
    }
    fn ack_inbox(&self, t: &str, seq: u64) -> crate::store::Durable {
        self.inner.ack_inbox(t, seq)
    }
    fn trim_inbox(&self, t: &str, keep_from: u64) -> crate::store::Durable {
        self.inner.trim_inbox(t, keep_from)
    }
    fn set_wake(&self, t: &str, r: &WakeRegistration) -> crate::store::Durable {
        self.inner.set_wake(t, r)
    }
    fn terminals_with_pending_inbox(&self) -> Result<Vec<String>, StoreError> {
        self.inner.terminals_with_pending_inbox()
    }
}

fn gated_engine() -> (LocalEngine, Arc<Recorder>, Arc<Gated>) {
    let store = Arc::new(Gated::default());
    let e = LocalEngine::new(
        store.clone(),
        Retention {
            max_messages: 100,
            ttl: Duration::from_secs(3600),
        },
    );
    let rec = Arc::new(Recorder::default());
    let node: Arc<dyn Node> = rec.clone();
    e.attach(Arc::downgrade(&node));
    (e, rec, store)
}

#[tokio::test]
async fn messages_are_handed_over_once_in_order_before_their_publish_is_answered() {
    use futures_util::FutureExt;
    let (e, rec, store) = gated_engine();
    // Sequenced in this order (each polled once), both waiting for the store.
    let mut a = publish(&e, 1, None);
    let mut b = publish(&e, 2, None);
    assert!((&mut a).now_or_never().is_none() && (&mut b).now_or_never().is_none());
    assert!(rec.0.lock().is_empty(), "nothing before it is stored");
    store.open_all();
    // The later publish completes first: it hands over the earlier message first.
    let sb = b.await.unwrap();
    assert_eq!(sb.seq, 2);
    let epoch = sb.epoch.to_string();
    assert_eq!(*rec.0.lock(), [format!("{epoch}:1"), format!("{epoch}:2")]);
    assert_eq!(a.await.unwrap().seq, 1);
    assert_eq!(rec.0.lock().len(), 2, "nothing twice");
}

#[tokio::test]
async fn a_failed_group_commit_delivers_none_of_it_and_starts_a_new_epoch() {
    use futures_util::FutureExt;
    let (e, rec, store) = gated_engine();
    let mut first = publish(&e, 1, None);
    assert!((&mut first).now_or_never().is_none());
    store.open_all();
    let old = first.await.unwrap().epoch;
    // One group of three, whose commit fails; the last one's task happens to run first.
    let mut group: Vec<_> = (2..=4).map(|n| publish(&e, n, None)).collect();
    for p in &mut group {
        assert!(p.now_or_never().is_none());
    }
    store.fail_all();
    for p in group.into_iter().rev() {
        assert!(
            p.await.is_err(),
            "every publish of the group is answered with an error"
        );
    }
    let new = e.info("r").await.unwrap().unwrap().epoch;
    assert_ne!(new, old);
    assert_eq!(
        *rec.0.lock(),
        [format!("{old}:1"), format!("epoch {new}:0")],
        "none of the group is handed over"
    );
    let h = e.history("r", 0, 100, usize::MAX).await.unwrap().unwrap();
    assert_eq!(
        (h.epoch.clone(), h.latest, h.messages.len()),
        (new.clone(), 0, 0)
    );
    // The room goes on in its new epoch.
    let mut next = publish(&e, 5, None);
    assert!((&mut next).now_or_never().is_none());
    store.open_all();
    let next = next.await.unwrap();
    assert_eq!((next.epoch, next.seq), (new.clone(), 1));
    assert_eq!(rec.0.lock().last().unwrap(), &format!("{new}:1"));
}

#[tokio::test]
async fn a_durable_message_discarded_by_an_earlier_failure_is_not_answered_ok() {
    use futures_util::FutureExt;
    let (e, rec, store) = gated_engine();
    let mut a = publish(&e, 1, None);
    let mut b = publish(&e, 2, None);
    assert!((&mut a).now_or_never().is_none() && (&mut b).now_or_never().is_none());
    // `a` is durable, `b` failed, and `b`'s task runs first: it discards `a` as well (the
    // recover deletes it), so `a` must not be answered as published.
    let gates: Vec<Gate> = store.gates.lock().drain(..).collect();
    let mut gates = gates.into_iter();
    let _ = gates.next().unwrap().send(Ok(()));
    let _ = gates
        .next()
        .unwrap()
        .send(Err(StoreError::io("writing (test)", DiskFull)));
    assert!(b.await.is_err());
    assert!(matches!(
        a.await,
        Err(EngineError::Store(StoreError::Broken(_)))
    ));
    assert!(
        rec.0.lock().iter().all(|l| l.starts_with("epoch ")),
        "{:?}",
        rec.0.lock()
    );
}

#[tokio::test]
async fn control_flags_are_stored_with_their_message() {
    let (e, rec, store) = engine(100);
    publish(&e, 1, Some(Action::Mute)).await.unwrap();
    let record = store.load_room("r", 10).unwrap().unwrap();
    assert!(record.flags.muted);
    assert_eq!(record.seq, 1);
    assert!(rec.0.lock()[0].ends_with(":1!"), "{:?}", rec.0.lock());
    let info = e.info("r").await.unwrap().unwrap();
    assert!(info.flags.muted);
}

#[tokio::test]
async fn a_reset_comes_after_the_messages_before_it_and_starts_a_new_epoch() {
    let (e, rec, store) = engine(100);
    let first = publish(&e, 1, None).await.unwrap();
    let reset = e.reset("r").await.unwrap();
    assert_ne!(reset.epoch, first.epoch);
    let after = publish(&e, 2, None).await.unwrap();
    assert_eq!((after.epoch.clone(), after.seq), (reset.epoch.clone(), 1));
    assert_eq!(
        *rec.0.lock(),
        [
            format!("{}:1", first.epoch),
            format!("epoch {}:0", reset.epoch),
            format!("{}:1", reset.epoch)
        ]
    );
    let h = e.history("r", 0, 100, usize::MAX).await.unwrap().unwrap();
    assert_eq!(
        (h.epoch, h.latest, h.messages.len()),
        (reset.epoch.clone(), 1, 1)
    );
    assert_eq!(
        &*store.load_room("r", 10).unwrap().unwrap().epoch,
        &*reset.epoch
    );
}

#[tokio::test]
async fn history_and_snapshots_show_only_what_was_handed_over_and_kept() {
    let (e, _, _) = engine(3);
    for n in 1..=5 {
        publish(&e, n, None).await.unwrap();
    }
    let h = e.history("r", 0, 100, usize::MAX).await.unwrap().unwrap();
    assert_eq!((h.latest, h.first), (5, 3));
    assert!(!h.recovered(1) && h.recovered(2) && h.recovered(5) && !h.recovered(6));
    let s = e.open("r", 2).await.unwrap();
    assert_eq!(s.seq, 5);
    assert_eq!(s.history.iter().map(|m| m.seq).collect::<Vec<_>>(), [4, 5]);
    assert!(e.info("never").await.unwrap().is_none());
    assert!(e.history("never", 0, 1, 1).await.unwrap().is_none());
}

/// A batch is sequenced in the order given and every write is handed to the store before any
/// is awaited, so the group commit takes them together (one commit, not one per message).
#[tokio::test]
async fn a_batch_is_sequenced_in_order_and_written_together() {
    use futures_util::FutureExt;
    let (e, rec, store) = gated_engine();
    let batch: Vec<Publish<'_>> = (1..=3)
        .map(|n| Publish {
            room: "r",
            frame: template(n),
            ts: 1,
            action: None,
        })
        .collect();
    let mut all = e.publish_many(&batch);
    assert!((&mut all).now_or_never().is_none());
    assert_eq!(store.gates.lock().len(), 3, "every write waits at once");
    store.open_all();
    let seqs: Vec<u64> = all
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().seq)
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(rec.0.lock().len(), 3);
}

/// An inbox post whose write failed is never handed over (it was, "as rooms do"), and a post
/// written after it is handed over and answered even when the caller of the failed one went
/// away before its write was answered.
#[tokio::test]
async fn a_failed_inbox_write_is_not_handed_over() {
    use futures_util::FutureExt;
    let (e, rec, store) = gated_engine();
    let data = RawValue::from_string("1".into()).unwrap();
    let t = SeqTemplate::inbox("n", &data, 1);
    let mut failed = e.post("t", &t, 1);
    assert!((&mut failed).now_or_never().is_none());
    let mut abandoned = e.post("t", &t, 2);
    assert!((&mut abandoned).now_or_never().is_none());
    store.fail_all();
    assert!(failed.await.is_err());
    drop(abandoned);
    let mut written = e.post("t", &t, 3);
    assert!((&mut written).now_or_never().is_none());
    store.open_all();
    assert_eq!(written.await.unwrap().seq, 3);
    assert_eq!(*rec.0.lock(), ["inbox t:3"], "only the durable one");
}

#[tokio::test]
async fn inbox_posts_get_consecutive_seqs_and_are_handed_over() {
    let (e, rec, store) = engine(10);
    let data = RawValue::from_string("1".into()).unwrap();
    let t = SeqTemplate::inbox("n", &data, 1);
    let a = e.post("t", &t, 1).await.unwrap();
    let b = e.post("t", &t, 2).await.unwrap();
    assert_eq!((a.seq, b.seq), (1, 2));
    assert_eq!(*rec.0.lock(), ["inbox t:1", "inbox t:2"]);
    assert_eq!(store.load_terminal("t").unwrap().unwrap().seq, 2);
    // A terminal forgotten and posted to again goes on from the stored seq.
    e.inboxes.lock().clear();
    assert_eq!(e.post("t", &t, 3).await.unwrap().seq, 3);
}

#[tokio::test]
async fn idle_rooms_leave_memory_and_come_back_from_the_store() {
    let (e, _, _) = engine(100);
    let first = publish(&e, 1, None).await.unwrap();
    publish(&e, 2, None).await.unwrap();
    e.evict(now_ms() + MIN_IDLE_MS - 1);
    assert_eq!(e.room_count(), 1, "not before the idle time");
    e.evict(now_ms() + 3_600_000);
    assert_eq!(e.room_count(), 0);
    // Loaded again: same epoch, same seq; the next publish goes on from it.
    let info = e.info("r").await.unwrap().unwrap();
    assert_eq!((info.epoch, info.seq), (first.epoch.clone(), 2));
    assert_eq!(e.room_count(), 1);
    let third = publish(&e, 3, None).await.unwrap();
    assert_eq!((third.epoch, third.seq), (first.epoch, 3));
}

#[tokio::test]
async fn past_max_rooms_the_least_recently_used_leave() {
    let (e, _, _) = engine(100);
    let e = Arc::into_inner(e).unwrap().with_room_limits(RoomLimits {
        idle: Duration::from_secs(3600),
        max_rooms: 2,
        sweep_rooms: 0,
    });
    let now = now_ms();
    for (n, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
        e.open(id, 0).await.unwrap();
        e.close(id);
        e.rooms.read()[id]
            .used_ms
            .store(now + n as u64, Ordering::Relaxed);
    }
    e.evict(now + MIN_IDLE_MS - 1);
    assert_eq!(e.room_count(), 4, "none idle long enough");
    e.evict(now + MIN_IDLE_MS + 10);
    let mut kept: Vec<String> = e.rooms.read().keys().map(|k| k.to_string()).collect();
    kept.sort();
    assert_eq!(kept, ["c", "d"]);
}

#[tokio::test]
async fn a_room_with_a_write_waiting_stays() {
    use futures_util::FutureExt;
    let (e, _, store) = gated_engine();
    let mut p = publish(&e, 1, None);
    assert!((&mut p).now_or_never().is_none());
    drop(p);
    e.evict(now_ms() + 3_600_000);
    assert_eq!(e.room_count(), 1);
    store.open_all();
}

#[tokio::test]
async fn opening_a_room_writes_nothing_until_its_first_publish() {
    let (e, _, store) = engine(100);
    let opened = e.open("r", 0).await.unwrap();
    assert!(store.load_room("r", 10).unwrap().is_none());
    publish(&e, 1, None).await.unwrap();
    let record = store.load_room("r", 10).unwrap().unwrap();
    assert_eq!((&*record.epoch, record.seq), (&*opened.epoch, 1));
}

#[tokio::test]
async fn a_room_never_published_to_stays_until_the_node_closes_it() {
    let (e, _, _) = engine(100);
    let opened = e.open("r", 0).await.unwrap();
    e.evict(now_ms() + 3_600_000);
    assert_eq!(e.room_count(), 1, "its members would get a new epoch");
    assert_eq!(e.info("r").await.unwrap().unwrap().epoch, opened.epoch);
    e.close("r");
    e.evict(now_ms() + 3_600_000);
    assert_eq!(e.room_count(), 0);
}

/// A publish to `room` stamped `ts` (1: long expired under any retention).
fn publish_to<'a>(
    e: &'a LocalEngine,
    room: &'a str,
    ts: u64,
    action: Option<Action>,
) -> EngineFuture<'a, Sequenced> {
    e.publish(Publish {
        room,
        frame: template(1),
        ts,
        action,
    })
}

/// Until every forget the engine asked for is answered (they are answered by spawned tasks).
async fn forgets_answered(e: &LocalEngine) {
    for _ in 0..1000 {
        // The task waiting for a forget holds its room.
        if e.rooms.read().values().all(|r| Arc::strong_count(r) == 1) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("forgets not answered");
}

const LATER: u64 = 3_600_000;

#[tokio::test]
async fn a_room_whose_history_expired_leaves_the_store() {
    let (e, _, store) = engine(100);
    let first = publish(&e, 1, None).await.unwrap();
    e.tick();
    e.evict(now_ms() + LATER);
    forgets_answered(&e).await;
    e.evict(now_ms() + LATER);
    assert_eq!(e.room_count(), 0);
    assert_eq!(store.load_room("r", 10).unwrap(), None);
    assert_eq!(store.room_records(), 0);
    assert!(
        e.info("r").await.unwrap().is_none(),
        "as if never published to"
    );
    // Its next use: a new epoch, seqs from 1.
    let next = publish(&e, 2, None).await.unwrap();
    assert_ne!(next.epoch, first.epoch);
    assert_eq!(next.seq, 1);
    let record = store.load_room("r", 10).unwrap().unwrap();
    assert_eq!((&*record.epoch, record.seq), (&*next.epoch, 1));
}

#[tokio::test]
async fn rooms_with_something_retained_or_a_member_keep_their_record() {
    let (e, _, store) = engine(100);
    publish_to(&e, "recent", now_ms(), None).await.unwrap();
    publish_to(&e, "muted", 1, Some(Action::Mute))
        .await
        .unwrap();
    publish_to(&e, "closed", 1, Some(Action::Close))
        .await
        .unwrap();
    e.open("held", 0).await.unwrap();
    publish_to(&e, "held", 1, None).await.unwrap();
    publish_to(&e, "expired", 1, None).await.unwrap();
    e.tick();
    e.evict(now_ms() + LATER);
    forgets_answered(&e).await;
    e.evict(now_ms() + LATER);
    assert_eq!(e.room_count(), 0);
    for room in ["recent", "muted", "closed", "held"] {
        assert!(store.load_room(room, 10).unwrap().is_some(), "{room}");
    }
    assert_eq!(store.load_room("expired", 10).unwrap(), None);
    // Once the node closed it, a held room with nothing retained goes too.
    e.close("held");
    e.info("held").await.unwrap().unwrap();
    e.tick();
    e.evict(now_ms() + LATER);
    forgets_answered(&e).await;
    assert_eq!(store.load_room("held", 10).unwrap(), None);
}

/// Publish message `n` to "r" through the gated store (answered only once its gate opens).
async fn publish_gated(e: &LocalEngine, store: &Gated, n: u64) -> Sequenced {
    use futures_util::FutureExt;
    let mut p = publish(e, n, None);
    assert!((&mut p).now_or_never().is_none());
    store.open_all();
    p.await.unwrap()
}

/// "r" published to once, its history expired, and leaving memory: its forget asked for.
async fn forgetting_gated(e: &LocalEngine, store: &Gated) -> Sequenced {
    let first = publish_gated(e, store, 1).await;
    e.tick();
    e.evict(now_ms() + LATER);
    first
}

#[tokio::test]
async fn a_use_racing_the_forget_gets_a_new_epoch() {
    let (e, rec, store) = gated_engine();
    let first = forgetting_gated(&e, &store).await;
    // The forget is not answered yet: the room stays, as its own tombstone.
    e.evict(now_ms() + LATER);
    assert_eq!(e.room_count(), 1);
    let second = publish_gated(&e, &store, 2).await;
    assert_ne!(
        second.epoch, first.epoch,
        "no seq of the old epoch is handed out again"
    );
    assert_eq!(second.seq, 1);
    // Its record was created before the forget was applied, which left it alone.
    let record = store.inner.load_room("r", 10).unwrap().unwrap();
    assert_eq!((&*record.epoch, record.seq), (&*second.epoch, 1));
    assert_eq!(
        *rec.0.lock(),
        [format!("{}:1", first.epoch), format!("{}:1", second.epoch)]
    );
}

/// A redb store in `dir`, group commit.
fn redb(dir: &std::path::Path) -> Arc<crate::store::RedbStore> {
    let options = crate::store::StoreOptions::new(crate::store::DurabilityPolicy::Batch);
    Arc::new(crate::store::RedbStore::open_with(dir, options).unwrap())
}

/// Retention of the tests with many rooms: their messages (stamped 1970) are all past it.
const SHORT: Retention = Retention {
    max_messages: 100,
    ttl: Duration::from_secs(60),
};

/// Publish one long-expired message to each of `rooms` rooms.
async fn publish_once(e: &LocalEngine, rooms: usize) {
    let names: Vec<String> = (0..rooms).map(|n| format!("room-{n}")).collect();
    let batch: Vec<Publish<'_>> = names
        .iter()
        .map(|room| Publish {
            room,
            frame: template(1),
            ts: 1,
            action: None,
        })
        .collect();
    for result in e.publish_many(&batch).await.unwrap() {
        result.unwrap();
    }
}

#[tokio::test]
async fn thousands_of_rooms_published_once_leave_the_store() {
    const ROOMS: usize = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let store = redb(dir.path());
    let e = LocalEngine::new(store.clone(), SHORT);
    publish_once(&e, ROOMS).await;
    assert_eq!(store.room_records(), ROOMS as u64);
    e.tick();
    e.evict(now_ms() + LATER);
    forgets_answered(&e).await;
    e.evict(now_ms() + LATER);
    assert_eq!(e.room_count(), 0);
    assert_eq!(store.room_records(), 0);
}

#[tokio::test]
async fn stored_rooms_not_in_memory_are_swept_too() {
    let store = Arc::new(MemoryStore::default());
    let message = |ts| StoredMessage {
        seq: 1,
        ts,
        frame: Bytes::from_static(b"{}"),
    };
    for room in ["expired", "recent", "muted", "held", "reset"] {
        store.create_room(room, "E1").await.unwrap();
    }
    for room in ["expired", "muted", "held"] {
        let flags = (room == "muted").then_some(RoomFlags {
            muted: true,
            closed: false,
        });
        store.append(room, &message(1), flags).await.unwrap();
    }
    store
        .append("recent", &message(now_ms()), None)
        .await
        .unwrap();
    let e = LocalEngine::new(
        store.clone(),
        Retention {
            max_messages: 100,
            ttl: Duration::from_secs(3600),
        },
    )
    .with_room_limits(RoomLimits {
        sweep_rooms: 2,
        ..RoomLimits::default()
    });
    e.held.lock().insert(Arc::from("held"));
    // Three steps of two rooms go round the five once.
    for _ in 0..3 {
        e.tick();
    }
    assert!(
        e.sweep_after.lock().is_none(),
        "round done: the next starts over"
    );
    forgets_answered(&e).await;
    e.tick();
    assert_eq!(e.room_count(), 0, "the tombstones left memory");
    let mut kept: Vec<String> = store.rooms_after(None, 10).unwrap();
    kept.sort();
    assert_eq!(kept, ["held", "muted", "recent"]);
}

#[tokio::test]
async fn rooms_published_once_before_a_restart_leave_the_store() {
    const ROOMS: usize = 1_000;
    let dir = tempfile::tempdir().unwrap();
    {
        let store = redb(dir.path());
        publish_once(&LocalEngine::new(store.clone(), SHORT), ROOMS).await;
        store.flush().await.unwrap();
    }
    let store = redb(dir.path());
    assert_eq!(store.room_records(), ROOMS as u64);
    let e = LocalEngine::new(store.clone(), SHORT).with_room_limits(RoomLimits {
        sweep_rooms: 300,
        ..RoomLimits::default()
    });
    // Four steps go round once; each forget is answered by the store's writer.
    for _ in 0..4 {
        e.tick();
        forgets_answered(&e).await;
    }
    e.tick();
    assert_eq!(e.room_count(), 0);
    assert_eq!(store.room_records(), 0);
}

#[tokio::test]
async fn a_failed_forget_keeps_the_record_and_the_room_comes_back_from_it() {
    let (e, _, store) = gated_engine();
    let first = forgetting_gated(&e, &store).await;
    store.fail_all();
    forgets_answered(&e).await;
    e.evict(now_ms() + LATER);
    assert_eq!(e.room_count(), 0);
    let record = store.inner.load_room("r", 10).unwrap().unwrap();
    assert_eq!((&*record.epoch, record.seq), (&*first.epoch, 1));
    // Loaded from the record: the same epoch goes on, no seq handed out twice.
    let next = publish_gated(&e, &store, 2).await;
    assert_eq!((next.epoch, next.seq), (first.epoch, 2));
}

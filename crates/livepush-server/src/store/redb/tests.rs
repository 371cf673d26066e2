use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::ops::Bound;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use ::redb::backends::FileBackend;
use ::redb::{BackendError, Database, StorageBackend, TableDefinition};
use bytes::Bytes;
use proptest::prelude::*;

use super::*;

mod inbox;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn block<F: Future>(f: F) -> F::Output {
    rt().block_on(f)
}

fn msg(seq: u64) -> StoredMessage {
    StoredMessage {
        seq,
        ts: 1_000 + seq,
        frame: Bytes::from(format!("{{\"t\":\"msg\",\"seq\":{seq}}}")),
    }
}

fn options(policy: DurabilityPolicy) -> StoreOptions {
    StoreOptions {
        batch_window: Duration::from_millis(1),
        ..StoreOptions::new(policy)
    }
}

fn open(dir: &Path, policy: DurabilityPolicy) -> RedbStore {
    RedbStore::open_with(dir, options(policy)).unwrap()
}

fn append_all(store: &RedbStore, room: &str, seqs: impl IntoIterator<Item = u64>) {
    let pending: Vec<Durable> = seqs
        .into_iter()
        .map(|s| store.append(room, &msg(s), None))
        .collect();
    block(async {
        for p in pending {
            p.await.unwrap();
        }
    });
}

fn seqs(record: &RoomRecord) -> Vec<u64> {
    record.history.iter().map(|m| m.seq).collect()
}

const ALL: [DurabilityPolicy; 3] = [
    DurabilityPolicy::Sync,
    DurabilityPolicy::Batch,
    DurabilityPolicy::None,
];

#[test]
fn append_load_round_trip() {
    for policy in ALL {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), policy);
        assert_eq!(store.load_room("r", 10).unwrap(), None);
        block(store.create_room("r", "EPOCH")).unwrap();
        append_all(&store, "r", 1..=5);
        let flags = RoomFlags {
            muted: true,
            closed: false,
        };
        block(store.set_flags("r", flags)).unwrap();
        block(store.flush()).unwrap();
        let record = store.load_room("r", 10).unwrap().unwrap();
        assert_eq!(record.epoch, "EPOCH");
        assert_eq!(record.seq, 5);
        assert_eq!(record.flags, flags);
        assert_eq!(record.history, (1..=5).map(msg).collect::<Vec<_>>());
        // Rooms whose names share a prefix do not see each other's messages.
        assert_eq!(store.load_room("r2", 10).unwrap(), None);
        block(store.create_room("r2", "OTHER")).unwrap();
        append_all(&store, "r2", 1..=2);
        block(store.flush()).unwrap();
        assert_eq!(
            seqs(&store.load_room("r", 10).unwrap().unwrap()),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(seqs(&store.load_room("r2", 10).unwrap().unwrap()), [1, 2]);
    }
}

#[test]
fn restart_keeps_epoch_seq_history_and_flags() {
    for policy in ALL {
        let dir = tempfile::tempdir().unwrap();
        let flags = RoomFlags {
            muted: false,
            closed: true,
        };
        {
            let store = open(dir.path(), policy);
            block(store.create_room("r", "E1")).unwrap();
            append_all(&store, "r", 1..=7);
            block(store.set_flags("r", flags)).unwrap();
            block(store.flush()).unwrap();
        }
        for _ in 0..2 {
            let store = open(dir.path(), policy);
            let record = store.load_room("r", 100).unwrap().unwrap();
            assert_eq!(record.epoch, "E1", "{policy}");
            assert_eq!(record.seq, 7);
            assert_eq!(record.flags, flags);
            assert_eq!(record.history, (1..=7).map(msg).collect::<Vec<_>>());
        }
    }
}

#[test]
fn trim_then_reload() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), DurabilityPolicy::Batch);
        block(store.create_room("r", "E")).unwrap();
        append_all(&store, "r", 1..=10);
        block(store.trim("r", 6)).unwrap();
        let record = store.load_room("r", 100).unwrap().unwrap();
        assert_eq!(seqs(&record), [6, 7, 8, 9, 10]);
        assert!(store.trimmed_bytes_since_compaction() > 0);
        // Trimming everything keeps the last seq.
        block(store.trim("r", 11)).unwrap();
        let record = store.load_room("r", 100).unwrap().unwrap();
        assert!(record.history.is_empty());
        assert_eq!(record.seq, 10);
        append_all(&store, "r", 11..=12);
        assert!(block(store.compact()).is_ok());
        assert_eq!(store.trimmed_bytes_since_compaction(), 0);
    }
    let store = open(dir.path(), DurabilityPolicy::Batch);
    let record = store.load_room("r", 100).unwrap().unwrap();
    assert_eq!(seqs(&record), [11, 12]);
    assert_eq!(record.seq, 12);
    assert_eq!(record.epoch, "E");
}

#[test]
fn keep_limits_history_to_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), DurabilityPolicy::Batch);
    block(store.create_room("r", "E")).unwrap();
    append_all(&store, "r", 1..=10);
    assert_eq!(seqs(&store.load_room("r", 3).unwrap().unwrap()), [8, 9, 10]);
    let none = store.load_room("r", 0).unwrap().unwrap();
    assert!(none.history.is_empty());
    assert_eq!(none.seq, 10);
    assert_eq!(store.load_room("r", 10).unwrap().unwrap().history.len(), 10);
}

#[test]
fn create_room_starts_a_fresh_history() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), DurabilityPolicy::Batch);
    block(store.create_room("r", "E1")).unwrap();
    append_all(&store, "r", 1..=3);
    block(store.create_room("r", "E2")).unwrap();
    let record = store.load_room("r", 10).unwrap().unwrap();
    assert_eq!(record.epoch, "E2");
    assert_eq!(record.seq, 0);
    assert!(record.history.is_empty());
    // Writes to a room that was never created are refused, not invented.
    assert!(matches!(
        block(store.append("nope", &msg(1), None)),
        Err(StoreError::Io { .. })
    ));
    assert_eq!(store.load_room("nope", 10).unwrap(), None);
}

fn is_ready(f: &mut Durable) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(Pin::new(f).poll(&mut cx), Poll::Ready(_))
}

#[test]
fn futures_resolve_in_submission_order() {
    for policy in ALL {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), policy);
        let rooms = ["a", "b", "c"];
        for r in rooms {
            block(store.create_room(r, "E")).unwrap();
        }
        let n = if policy == DurabilityPolicy::Sync {
            60
        } else {
            600
        };
        let mut futures: Vec<Durable> = (0..n)
            .map(|i| {
                let room = rooms[i % 3];
                let seq = (i / 3 + 1) as u64;
                match i % 50 {
                    49 => store.trim(room, seq / 2),
                    _ => store.append(room, &msg(seq), None),
                }
            })
            .collect();
        let mut done = vec![false; n];
        let rt = rt();
        for i in (0..n).step_by(7).chain([n - 1]) {
            rt.block_on(&mut futures[i]).unwrap();
            done[i] = true;
            for (j, f) in futures.iter_mut().enumerate().take(i) {
                if !done[j] {
                    assert!(is_ready(f), "{policy}: future {j} not ready after {i}");
                    done[j] = true;
                }
            }
        }
    }
}

#[test]
fn garbage_file_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &garbage).unwrap();
    let err = RedbStore::open(dir.path(), DurabilityPolicy::Batch).unwrap_err();
    let text = err.to_string();
    println!("{text}");
    assert!(matches!(err, OpenError::Corrupt { .. }), "{err:?}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("corrupt or not a livepush store"), "{text}");
    // Nothing was started afresh over it.
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
}

fn damaged_store(damage: impl Fn(&mut Vec<u8>)) -> OpenError {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), DurabilityPolicy::Batch);
        block(store.create_room("r", "E")).unwrap();
        append_all(&store, "r", 1..=300);
    }
    let path = dir.path().join(FILE_NAME);
    let mut bytes = std::fs::read(&path).unwrap();
    damage(&mut bytes);
    std::fs::write(&path, &bytes).unwrap();
    let err = RedbStore::open(dir.path(), DurabilityPolicy::Batch).unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(matches!(err, OpenError::Corrupt { .. }), "{err:?}");
    err
}

#[test]
fn damaged_store_is_refused_not_trusted() {
    // Every page scribbled over.
    damaged_store(|bytes| {
        for page in bytes.chunks_mut(4096).skip(1) {
            let n = page.len().min(57);
            page[17..n].fill(0x5a);
        }
    });
    // One message's bytes changed (in every copy of its page): only checksums tell.
    damaged_store(|bytes| {
        let needle = b"\"seq\":150}";
        let found: Vec<usize> = bytes
            .windows(needle.len())
            .enumerate()
            .filter(|(_, w)| w == needle)
            .map(|(at, _)| at)
            .collect();
        assert!(!found.is_empty());
        for at in found {
            bytes[at + 6] = b'9';
        }
    });
}

#[test]
fn unknown_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), DurabilityPolicy::Batch));
    let path = dir.path().join(FILE_NAME);
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(tables::META)
            .unwrap()
            .insert(tables::META_VERSION, 99u32.to_le_bytes().as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let err = RedbStore::open(dir.path(), DurabilityPolicy::Batch).unwrap_err();
    assert!(
        matches!(err, OpenError::UnknownVersion { found: 99, .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("version 99"), "{text}");
}

#[test]
fn foreign_redb_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let t: TableDefinition<'_, u64, u64> = TableDefinition::new("something.else");
        txn.open_table(t).unwrap().insert(1, 2).unwrap();
        txn.commit().unwrap();
    }
    let err = RedbStore::open(dir.path(), DurabilityPolicy::Batch).unwrap_err();
    assert!(matches!(err, OpenError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("something.else"), "{err}");
}

#[test]
fn second_open_of_one_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path(), DurabilityPolicy::Batch);
    let err = RedbStore::open(dir.path(), DurabilityPolicy::Batch).unwrap_err();
    assert!(matches!(err, OpenError::Locked { .. }), "{err:?}");
}

#[test]
fn data_dir_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/data");
    let store = open(&nested, DurabilityPolicy::Batch);
    assert_eq!(store.path(), nested.join(FILE_NAME));
    assert!(store.path().exists());
    // A data dir that is a file cannot be used.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = RedbStore::open(&file, DurabilityPolicy::Batch).unwrap_err();
    assert!(matches!(err, OpenError::CreateDir { .. }), "{err:?}");
}

/// A forgotten room stays forgotten after a reopen; a forget naming a stale epoch deletes
/// nothing.
#[test]
fn forgotten_rooms_stay_forgotten_and_stale_forgets_do_nothing() {
    for policy in ALL {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), policy);
            for room in ["gone", "renewed", "kept"] {
                block(store.create_room(room, "E1")).unwrap();
                append_all(&store, room, 1..=3);
            }
            block(store.reset("renewed", "E2")).unwrap();
            append_all(&store, "renewed", 1..=2);
            block(store.forget("gone", "E1")).unwrap();
            // Answered: a read no longer sees it (under `none` too: never answered early).
            assert_eq!(store.load_room("gone", 10).unwrap(), None, "{policy}");
            block(store.forget("renewed", "E1")).unwrap();
            block(store.forget("never", "E1")).unwrap();
            assert_eq!(store.room_records(), 2);
            block(store.flush()).unwrap();
        }
        let store = open(dir.path(), policy);
        assert_eq!(store.load_room("gone", 10).unwrap(), None, "{policy}");
        assert!(
            store
                .read("gone", 0, 10, 10, usize::MAX)
                .unwrap()
                .is_empty()
        );
        let renewed = store.load_room("renewed", 10).unwrap().unwrap();
        assert_eq!((renewed.epoch.as_str(), seqs(&renewed)), ("E2", vec![1, 2]));
        assert_eq!(
            seqs(&store.load_room("kept", 10).unwrap().unwrap()),
            [1, 2, 3]
        );
        // Used again: a new record from scratch.
        block(store.create_room("gone", "E3")).unwrap();
        append_all(&store, "gone", 1..=1);
        block(store.flush()).unwrap();
        let again = store.load_room("gone", 10).unwrap().unwrap();
        assert_eq!(
            (again.epoch.as_str(), seqs(&again)),
            ("E3", vec![1]),
            "{policy}"
        );
    }
}

#[test]
fn unclean_stop_under_none_renews_epochs() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), DurabilityPolicy::None);
        block(store.create_room("r", "E1")).unwrap();
        append_all(&store, "r", 1..=5);
        store.crash();
    }
    let store = open(dir.path(), DurabilityPolicy::None);
    let record = store.load_room("r", 10).unwrap().unwrap();
    assert_ne!(record.epoch, "E1");
    assert_eq!(record.epoch.len(), 16);
    // What reached the disk stays, under the new epoch.
    assert_eq!(record.seq, seqs(&record).last().copied().unwrap_or(0));
    let renewed = record.epoch.clone();
    // A clean stop after that keeps the (new) epoch.
    append_all(&store, "r", record.seq + 1..=record.seq + 3);
    block(store.flush()).unwrap();
    drop(store);
    let store = open(dir.path(), DurabilityPolicy::Batch);
    assert_eq!(store.load_room("r", 10).unwrap().unwrap().epoch, renewed);
}

#[test]
fn clean_stop_under_none_keeps_epochs() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), DurabilityPolicy::None);
        block(store.create_room("r", "E1")).unwrap();
        append_all(&store, "r", 1..=5);
        // Dropping closes cleanly.
    }
    {
        let store = open(dir.path(), DurabilityPolicy::None);
        let record = store.load_room("r", 10).unwrap().unwrap();
        assert_eq!(record.epoch, "E1");
        assert_eq!(seqs(&record), [1, 2, 3, 4, 5]);
        append_all(&store, "r", 6..=8);
        // flush at shutdown marks the file clean even if the process then dies.
        block(store.flush()).unwrap();
        store.crash();
    }
    let store = open(dir.path(), DurabilityPolicy::None);
    let record = store.load_room("r", 10).unwrap().unwrap();
    assert_eq!(record.epoch, "E1");
    assert_eq!(record.seq, 8);
}

#[test]
fn writes_after_flush_under_none_mark_the_file_dirty_again() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), DurabilityPolicy::None);
        block(store.create_room("r", "E1")).unwrap();
        block(store.flush()).unwrap();
        append_all(&store, "r", 1..=3);
        store.crash();
    }
    let store = open(dir.path(), DurabilityPolicy::Batch);
    assert_ne!(store.load_room("r", 10).unwrap().unwrap().epoch, "E1");
}

#[test]
fn unclean_stop_under_batch_keeps_epochs() {
    for policy in [DurabilityPolicy::Batch, DurabilityPolicy::Sync] {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), policy);
            block(store.create_room("r", "E1")).unwrap();
            append_all(&store, "r", 1..=5);
            store.crash();
        }
        let store = open(dir.path(), policy);
        let record = store.load_room("r", 10).unwrap().unwrap();
        assert_eq!(record.epoch, "E1");
        assert_eq!(seqs(&record), [1, 2, 3, 4, 5]);
    }
}

#[test]
fn closed_store_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), DurabilityPolicy::None);
    block(store.create_room("r", "E")).unwrap();
    store.close().unwrap();
    store.close().unwrap();
    assert!(matches!(
        block(store.append("r", &msg(1), None)),
        Err(StoreError::Closed)
    ));
    assert!(matches!(block(store.flush()), Err(StoreError::Closed)));
    assert!(matches!(block(store.compact()), Err(StoreError::Closed)));
    assert!(matches!(store.load_room("r", 1), Err(StoreError::Closed)));
    // The file is released: it opens again at once.
    let again = open(dir.path(), DurabilityPolicy::Batch);
    assert_eq!(again.load_room("r", 1).unwrap().unwrap().epoch, "E");
}

/// A file backend whose writes fail while `fail` is set.
#[derive(Debug)]
struct Flaky {
    inner: FileBackend,
    fail: Arc<AtomicBool>,
}

impl Flaky {
    fn check(&self) -> std::io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            Err(std::io::Error::other("no space left on device (test)"))
        } else {
            Ok(())
        }
    }
}

impl StorageBackend for Flaky {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.inner.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.inner.close()
    }
    fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(s, e)
    }
    fn try_lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(s, e)
    }
    fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(s, e)
    }
    fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(s, e)
    }
    fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(s, e)
    }
    fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(s, e)
    }
}

fn open_flaky(dir: &Path, policy: DurabilityPolicy, fail: &Arc<AtomicBool>) -> RedbStore {
    let fail = fail.clone();
    let opener: Opener = Box::new(move |path| {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let backend = Flaky {
            inner: FileBackend::new(file)?,
            fail: fail.clone(),
        };
        Database::builder().create_with_backend(backend)
    });
    RedbStore::open_inner(dir.join(FILE_NAME), options(policy), opener).unwrap()
}

/// A flaky store with room "r" (epoch "E", messages 1 and 2) whose append of 3 just failed;
/// `fail` is still set.
fn with_failed_append(dir: &Path, policy: DurabilityPolicy, fail: &Arc<AtomicBool>) -> RedbStore {
    let store = open_flaky(dir, policy, fail);
    block(store.create_room("r", "E")).unwrap();
    append_all(&store, "r", 1..=2);
    fail.store(true, Ordering::SeqCst);
    let failed = block(store.append("r", &msg(3), None));
    assert!(matches!(failed, Err(StoreError::Io { .. })), "{failed:?}");
    store
}

#[test]
fn write_failures_are_reported_and_the_writer_recovers() {
    for policy in [DurabilityPolicy::Batch, DurabilityPolicy::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(AtomicBool::new(false));
        let store = with_failed_append(dir.path(), policy, &fail);
        let failed = block(store.set_flags(
            "r",
            RoomFlags {
                muted: true,
                closed: false,
            },
        ));
        assert!(matches!(failed, Err(StoreError::Io { .. })), "{failed:?}");
        fail.store(false, Ordering::SeqCst);
        // The room is broken: later appends and resets are refused, not written after a hole.
        let refused = block(store.append("r", &msg(4), None));
        assert!(matches!(refused, Err(StoreError::Broken(_))), "{refused:?}");
        let refused = block(store.reset("r", "E1"));
        assert!(matches!(refused, Err(StoreError::Broken(_))), "{refused:?}");
        let record = store.load_room("r", 10).unwrap().unwrap();
        // The failed message is gone (no later commit wrote it after all), but its seq and
        // the failed flags were not forgotten.
        assert_eq!(seqs(&record), [1, 2]);
        assert_eq!((record.seq, record.epoch.as_str()), (3, "E"));
        assert!(record.flags.muted);
        // A recover starts a new epoch and makes the room writable again.
        block(store.recover("r", "E2")).unwrap();
        append_all(&store, "r", 1..=2);
        drop(store);
        let store = open(dir.path(), policy);
        let record = store.load_room("r", 10).unwrap().unwrap();
        assert_eq!(seqs(&record), [1, 2]);
        assert_eq!(record.epoch, "E2");
        assert!(record.flags.muted);
    }
}

#[test]
fn a_failed_recover_is_reapplied_before_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let store = with_failed_append(dir.path(), DurabilityPolicy::Batch, &fail);
    assert!(block(store.recover("r", "E2")).is_err());
    fail.store(false, Ordering::SeqCst);
    append_all(&store, "r", [1]);
    let record = store.load_room("r", 10).unwrap().unwrap();
    assert_eq!((record.epoch.as_str(), seqs(&record)), ("E2", vec![1]));
}

#[test]
fn a_lost_write_under_none_renews_epochs_even_after_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    {
        let store = open_flaky(dir.path(), DurabilityPolicy::None, &fail);
        block(store.create_room("r", "E")).unwrap();
        append_all(&store, "r", 1..=2);
        fail.store(true, Ordering::SeqCst);
        // Answered (and so delivered) at once, then lost with its batch.
        block(store.append("r", &msg(3), None)).unwrap();
        assert!(block(store.flush()).is_err());
        fail.store(false, Ordering::SeqCst);
        store.close().unwrap();
    }
    let store = open(dir.path(), DurabilityPolicy::None);
    let record = store.load_room("r", 10).unwrap().unwrap();
    // The reopen after the failure dropped the commits not yet durable (1 and 2 as well).
    assert_ne!(
        record.epoch, "E",
        "a history that lost what it showed keeps no epoch"
    );
}

#[test]
fn failed_last_append_still_advances_the_seq() {
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    {
        let store = with_failed_append(dir.path(), DurabilityPolicy::Batch, &fail);
        fail.store(false, Ordering::SeqCst);
        // Closing applies what the failed batch owed the room record.
        store.close().unwrap();
    }
    let store = open(dir.path(), DurabilityPolicy::Batch);
    let record = store.load_room("r", 10).unwrap().unwrap();
    assert_eq!(record.seq, 3);
    assert_eq!(seqs(&record), [1, 2]);
}

#[test]
fn compaction_gives_trimmed_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), DurabilityPolicy::Batch);
    block(store.create_room("r", "E")).unwrap();
    let big = Bytes::from(vec![b'x'; 4096]);
    let pending: Vec<Durable> = (1..=2000)
        .map(|seq| {
            store.append(
                "r",
                &StoredMessage {
                    seq,
                    ts: seq,
                    frame: big.clone(),
                },
                None,
            )
        })
        .collect();
    block(async {
        for p in pending {
            p.await.unwrap();
        }
    });
    let full = store.file_len();
    block(store.trim("r", 1990)).unwrap();
    assert!(store.trimmed_bytes_since_compaction() > 2000 * 4096 * 9 / 10);
    assert!(block(store.compact()).unwrap());
    let compacted = store.file_len();
    assert!(compacted < full / 2, "{full} -> {compacted}");
    assert_eq!(
        store.load_room("r", 100).unwrap().unwrap().history.len(),
        11
    );
}

#[derive(Debug, Clone)]
enum Step {
    Append(usize, u8),
    Trim(usize, u8),
    Flags(usize, bool, bool),
    Load(u8),
    Reopen,
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..2usize, 1..6u8).prop_map(|(r, n)| Step::Append(r, n)),
        2 => (0..2usize, 0..8u8).prop_map(|(r, n)| Step::Trim(r, n)),
        1 => (0..2usize, any::<bool>(), any::<bool>()).prop_map(|(r, m, c)| Step::Flags(r, m, c)),
        1 => (0..10u8).prop_map(Step::Load),
        1 => Just(Step::Reopen),
        1 => Just(Step::Crash),
    ]
}

#[derive(Debug, Default)]
struct Model {
    seq: u64,
    keep_from: u64,
    messages: BTreeMap<u64, StoredMessage>,
    flags: RoomFlags,
}

const ROOMS: [&str; 2] = ["room", "room2"];

fn check(store: &RedbStore, models: &[Model], keep: usize) -> Result<(), TestCaseError> {
    for (room, model) in ROOMS.iter().zip(models) {
        let record = store.load_room(room, keep).unwrap().unwrap();
        prop_assert_eq!(&record.epoch, room);
        prop_assert_eq!(record.seq, model.seq);
        prop_assert_eq!(record.flags, model.flags);
        let skip = model.messages.len().saturating_sub(keep);
        let expected: Vec<StoredMessage> = model.messages.values().skip(skip).cloned().collect();
        prop_assert_eq!(record.history, expected);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_appends_trims_and_restarts_keep_exactly_what_is_expected(
        steps in proptest::collection::vec(step(), 1..24)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let mut store = open(dir.path(), DurabilityPolicy::Batch);
        let mut models: Vec<Model> = ROOMS.iter().map(|_| Model::default()).collect();
        for room in ROOMS {
            rt.block_on(store.create_room(room, room)).unwrap();
        }
        for step in steps {
            match step {
                Step::Append(r, n) => {
                    let m = &mut models[r];
                    let pending: Vec<Durable> = (0..n).map(|_| {
                        m.seq += 1;
                        let message = msg(m.seq);
                        m.messages.insert(m.seq, message.clone());
                        store.append(ROOMS[r], &message, None)
                    }).collect();
                    for p in pending {
                        rt.block_on(p).unwrap();
                    }
                }
                Step::Trim(r, n) => {
                    let m = &mut models[r];
                    let keep_from = (m.seq + 1).saturating_sub(u64::from(n)).max(m.keep_from);
                    m.keep_from = keep_from;
                    m.messages.retain(|&s, _| s >= keep_from);
                    rt.block_on(store.trim(ROOMS[r], keep_from)).unwrap();
                }
                Step::Flags(r, muted, closed) => {
                    models[r].flags = RoomFlags { muted, closed };
                    rt.block_on(store.set_flags(ROOMS[r], models[r].flags)).unwrap();
                }
                Step::Load(keep) => check(&store, &models, usize::from(keep))?,
                Step::Reopen => {
                    drop(store);
                    store = open(dir.path(), DurabilityPolicy::Batch);
                    check(&store, &models, usize::MAX)?;
                }
                Step::Crash => {
                    store.crash();
                    drop(store);
                    store = open(dir.path(), DurabilityPolicy::Batch);
                    check(&store, &models, usize::MAX)?;
                }
            }
        }
        check(&store, &models, usize::MAX)?;
    }
}

const STORM_DIR: &str = "LIVEPUSH_STORE_STORM_DIR";
const STORM_POLICY: &str = "LIVEPUSH_STORE_STORM_POLICY";

/// The child side of [`kill_9_during_a_publish_storm`]: publish until killed, printing every
/// answered seq.
#[test]
#[ignore = "run by kill_9_during_a_publish_storm in a child process"]
fn storm_child() {
    let (Ok(dir), Ok(policy)) = (std::env::var(STORM_DIR), std::env::var(STORM_POLICY)) else {
        return;
    };
    let store = RedbStore::open(Path::new(&dir), policy.parse().unwrap()).unwrap();
    let rt = rt();
    rt.block_on(store.create_room("storm", "STORMEPOCH"))
        .unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    let started = Instant::now();
    let mut seq = 0;
    while started.elapsed() < Duration::from_secs(30) {
        let pending: Vec<(u64, Durable)> = (0..64)
            .map(|_| {
                seq += 1;
                (seq, store.append("storm", &msg(seq), None))
            })
            .collect();
        for (s, p) in pending {
            rt.block_on(p).unwrap();
            writeln!(out, "acked {s}").unwrap();
        }
        out.flush().unwrap();
    }
}

/// The seq in a child's `acked N` line.
fn acked_in(line: &str) -> Option<u64> {
    line.strip_prefix("acked ").and_then(|s| s.parse().ok())
}

/// Run the ignored child test `test` in a new process of this test binary with `env`, let it
/// write until it has reported `acked N` for `at_least` writes, kill it with SIGKILL, and
/// return the highest seq it reported answered (including lines printed before the kill).
pub(super) fn kill_9_after(test: &str, env: &[(&str, &str)], at_least: u64) -> u64 {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut acked = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < at_least {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the storm child stopped answering");
        acked = acked.max(acked_in(&line).unwrap_or(0));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Whatever was printed before the kill was answered too.
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        acked = acked.max(acked_in(&line).unwrap_or(0));
    }
    reader.join().unwrap();
    acked
}

fn storm(policy: DurabilityPolicy) -> (RoomRecord, u64) {
    let dir = tempfile::tempdir().unwrap();
    let acked = kill_9_after(
        "store::redb::tests::storm_child",
        &[
            (STORM_DIR, dir.path().to_str().unwrap()),
            (STORM_POLICY, policy.as_str()),
        ],
        2_000,
    );
    let store = open(dir.path(), policy);
    let record = store.load_room("storm", usize::MAX).unwrap().unwrap();
    // No seq lost inside what is kept, none duplicated, each message is the one sent.
    assert_eq!(seqs(&record), (1..=record.seq).collect::<Vec<_>>());
    for m in &record.history {
        assert_eq!(m, &msg(m.seq));
    }
    (record, acked)
}

#[test]
fn kill_9_during_a_publish_storm() {
    let (record, acked) = storm(DurabilityPolicy::Batch);
    assert_eq!(record.epoch, "STORMEPOCH");
    assert!(record.seq >= acked, "answered {acked}, kept {}", record.seq);
    // Under `none`, answered writes may be lost, and the room's epoch says so.
    let (record, _) = storm(DurabilityPolicy::None);
    assert_ne!(record.epoch, "STORMEPOCH");
}

/// Appends per second per policy, with many publishes in flight, and the file size under a
/// steady append + trim load.
#[test]
#[ignore = "benchmark: cargo test --release -p livepush-server --lib bench_store -- --ignored --nocapture"]
fn bench_store() {
    let rt = rt();
    let frame = Bytes::from(vec![b'x'; 200]);
    for (policy, n, in_flight) in [
        (DurabilityPolicy::Sync, 500u64, 64usize),
        (DurabilityPolicy::Batch, 100_000, 256),
        (DurabilityPolicy::Batch, 2_000, 1),
        (DurabilityPolicy::None, 100_000, 256),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut options = StoreOptions::new(policy);
        if let Ok(ms) = std::env::var("LIVEPUSH_BENCH_WINDOW_MS") {
            options.batch_window = Duration::from_millis(ms.parse().unwrap());
        }
        let store = RedbStore::open_with(dir.path(), options).unwrap();
        let rooms: Vec<String> = (0..8).map(|i| format!("room{i}")).collect();
        for r in &rooms {
            rt.block_on(store.create_room(r, "E")).unwrap();
        }
        let started = Instant::now();
        let mut pending = std::collections::VecDeque::new();
        for i in 0..n {
            let message = StoredMessage {
                seq: i / 8 + 1,
                ts: i,
                frame: frame.clone(),
            };
            pending.push_back(store.append(&rooms[(i % 8) as usize], &message, None));
            if pending.len() >= in_flight {
                rt.block_on(pending.pop_front().unwrap()).unwrap();
            }
        }
        for p in pending {
            rt.block_on(p).unwrap();
        }
        let answered = started.elapsed();
        rt.block_on(store.flush()).unwrap();
        let flushed = started.elapsed();
        println!(
            "{policy:>5} in flight {in_flight:>3}: {n} appends answered in {answered:.2?} \
             ({:.0}/s), durable after {flushed:.2?}, file {} KiB",
            n as f64 / answered.as_secs_f64(),
            store.file_len() / 1024
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path(), DurabilityPolicy::Batch).unwrap();
    rt.block_on(store.create_room("r", "E")).unwrap();
    let mut pending = std::collections::VecDeque::new();
    for seq in 1..=400_000u64 {
        pending.push_back(store.append(
            "r",
            &StoredMessage {
                seq,
                ts: seq,
                frame: frame.clone(),
            },
            None,
        ));
        if pending.len() >= 256 {
            rt.block_on(pending.pop_front().unwrap()).unwrap();
        }
        if seq % 1000 == 0 {
            pending.push_back(store.trim("r", seq.saturating_sub(2000)));
        }
        if seq % 50_000 == 0 {
            println!(
                "steady load (keep ~2000 x 200 B): after {seq} appends the file is {} KiB, \
                 {} KiB trimmed since compaction",
                store.file_len() / 1024,
                store.trimmed_bytes_since_compaction() / 1024
            );
        }
    }
    for p in pending {
        rt.block_on(p).unwrap();
    }
}

#[test]
fn expired_messages_of_every_room_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open_with(
        dir.path(),
        StoreOptions {
            history_ttl: Some(Duration::from_secs(3600)),
            // Several steps for the rooms below, so the cursor goes round.
            sweep_rooms: 2,
            ..options(DurabilityPolicy::Batch)
        },
    )
    .unwrap();
    let fresh = |seq| StoredMessage {
        ts: crate::clock::now_ms(),
        ..msg(seq)
    };
    for room in ["a", "b", "c", "d", "e"] {
        block(store.create_room(room, "E")).unwrap();
        // `msg` is stamped in 1970: expired; the last one is fresh.
        append_all(&store, room, 1..=3);
        block(store.append(room, &fresh(4), None)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<Vec<u64>> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|r| seqs(&store.load_room(r, 10).unwrap().unwrap()))
            .collect();
        if left.iter().all(|s| s == &[4]) {
            break;
        }
        assert!(Instant::now() < deadline, "not swept: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Records stay, with their seq.
    assert_eq!(store.load_room("e", 10).unwrap().unwrap().seq, 4);
    assert!(store.trimmed_bytes_since_compaction() > 0);
}

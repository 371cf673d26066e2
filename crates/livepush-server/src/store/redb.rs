//! The embedded durable store: room histories, epochs and room state, and terminal inboxes
//! and wake registrations, in one redb file (`<data dir>/livepush.redb`). The table layout is
//! described in `tables.rs`.
//!
//! # Writes
//!
//! Every write (room create, append, flags, trim, forget; inbox append, ack, trim; wake
//! registration; flush) goes through one channel to one writer thread, which owns all write transactions.
//! Futures therefore resolve in submission order, room and inbox writes alike (the hub relies
//! on it), and a slow disk never blocks the caller, only its answer. Reads
//! ([`HistoryStore::load_room`], [`InboxStore::load_terminal`],
//! [`InboxStore::terminals_with_pending_inbox`]) are plain read transactions on the caller's
//! thread and never wait for the writer.
//!
//! # Durability policies
//!
//! - [`DurabilityPolicy::Sync`]: each write is its own transaction, committed with an fsync
//!   before its future resolves. A crash loses nothing that was answered.
//! - [`DurabilityPolicy::Batch`] (default): group commit. The writer takes everything that
//!   arrives within [`StoreOptions::batch_window`] (at most [`StoreOptions::max_batch`]
//!   writes), writes it in one transaction with one fsync, then resolves those futures in
//!   order. A crash loses nothing that was answered.
//! - [`DurabilityPolicy::None`]: futures resolve at submission; the writer still writes in
//!   batches, without fsync, and makes everything durable every
//!   [`StoreOptions::checkpoint_interval`] (default 1 s) and on [`HistoryStore::flush`]. A
//!   crash (kill -9, power loss) loses roughly the last checkpoint interval of answered, and
//!   already delivered, writes. So that no `(epoch, seq)` is ever reused for a different
//!   message, the file carries a "dirty" marker, made durable before the first write that is
//!   answered early and cleared by a clean `flush`/`close`. If a run under `none` did not stop
//!   cleanly, every room gets a new epoch at the next open (history and seq are kept), so
//!   resuming clients are told `recovered:false` instead of being lied to. Under `sync` and
//!   `batch` epochs never change across restarts. Inboxes have no epoch; see below.
//!
//! # Inboxes
//!
//! A terminal's inbox is its row in `livepush.terminals` (last seq handed out, last seq
//! acknowledged) and its messages in `livepush.inbox`. [`InboxStore::append_inbox`] raises the
//! row's seq to the message's and keeps the message (unless the terminal already acknowledged
//! that seq); [`InboxStore::ack_inbox`] raises the acknowledged seq and deletes the messages up
//! to it, and raises the row's seq to it too (a terminal can only acknowledge a seq that was
//! handed out); [`InboxStore::trim_inbox`] deletes messages without acknowledging them. The
//! first of these (or [`InboxStore::set_wake`]) creates the row; a trim alone does not.
//! [`InboxStore::terminals_with_pending_inbox`] scans `livepush.terminals` and, for each
//! terminal whose seq is past its acknowledged seq, looks for a kept message after it: one
//! read transaction, O(terminals) small lookups, meant to be called once after a restart
//! (thousands of terminals take milliseconds), so no index table is kept up to date for it.
//!
//! ## Inboxes under `none`
//!
//! After an unclean stop under `none`, the last answered (and delivered) inbox messages may be
//! lost, and the hub would hand their seqs out again, for other messages. Rooms get a new epoch
//! for that; an inbox has none, so its seq jumps instead. Each terminal row carries a
//! `reserved` mark, and the rule is: **under `none`, an inbox append is answered at
//! submission only if its seq is at most the terminal's durable `reserved` mark**. An append
//! beyond it is not answered early: the writer raises `reserved` to the terminal's seq at the
//! end of the append's own transaction plus [`INBOX_RESERVE_STEP`], commits that transaction
//! durably (fsync), and only then answers it. Until then nothing submitted after it is
//! answered either (submission order). So every answered inbox seq is at most a `reserved`
//! mark that is on disk, and an open that finds the file dirty (`meta["dirty"]` or
//! `meta["dirty.inbox"]`, see `tables.rs`) sets each terminal's seq to `max(seq, reserved)`:
//! the next seq the hub hands out is beyond everything that was answered before the crash.
//! The terminal sees a gap of about [`INBOX_RESERVE_STEP`] seqs at most, which it treats as
//! dropped messages, like any gap. The cost is one durable commit per terminal per
//! [`INBOX_RESERVE_STEP`] inbox messages (and one for a terminal's first message, and one per
//! terminal after an unclean restart); reservations outlive clean restarts, and an open under
//! `none` loads every terminal's reservation (one map entry per terminal) so that it need not
//! be made durable again. Under `sync` and `batch` every answered append is already durable,
//! no reservation is needed and inbox seqs never jump.
//!
//! # Failed writes
//!
//! A write that fails (disk full, I/O error) resolves the futures of its batch with
//! [`StoreError::Io`]: redb aborts the transaction, so nothing of the batch is in the file,
//! and no later commit writes it after all. The writer reopens the file if redb asks for it
//! (after an I/O error redb refuses every transaction until then) and goes on with later
//! writes. Seqs of failed appends and flags of failed updates are re-applied to the room record
//! with the next successful batch, so a seq handed out is not handed out again in the same
//! epoch after a restart; likewise the seq of a failed inbox append, the seq of a failed inbox
//! ack and a failed wake registration are re-applied to the terminal's record.
//!
//! A room whose append or reset failed (one that was to be answered at its commit) is
//! *broken*: every later append and reset of it is refused with [`StoreError::Broken`],
//! without being written, until [`HistoryStore::recover`] gives it a new epoch. So the room's
//! history never gets a hole (a failed seq followed by written ones), and a write that
//! succeeds tells the engine that every earlier write of that room did too (see
//! [`HistoryStore::recover`]). The broken set lives in the writer only: after a restart the
//! file holds the history up to the failure, none of which was lost.
//!
//! Under `none` a write answered at submission may have been delivered already when its batch
//! fails, or when a reopen drops the commits not yet made durable. The writer then keeps the
//! dirty marker set for the rest of the run (a flush or close no longer clears it), so the next
//! open gives every room a new epoch: resuming clients are told `recovered:false`, never
//! replayed a history with a hole.
//!
//! # Size
//!
//! With [`StoreOptions::history_ttl`], the writer sweeps the rooms in key order, a bounded
//! number ([`StoreOptions::sweep_rooms`]) every [`SWEEP_INTERVAL`], and deletes their messages
//! older than the TTL: the engine trims only the rooms it holds in memory, so without the
//! sweep a room nobody uses any more would keep its messages forever. A room's record (epoch,
//! seq, flags: some 60 bytes) stays until the engine forgets it
//! ([`HistoryStore::forget`]: once nothing of the room is retained; deleted only if
//! its epoch is still the one named, and never answered at submission, also under `none`, so
//! an answered forget is what a read sees). A step that deletes nothing commits nothing.
//!
//! `trim` (and `trim_inbox`, `ack_inbox`) deletes in the writer, batched with other writes.
//! redb reuses freed pages, so a steady load with steady retention keeps the file at its
//! high-water mark; the file is compacted at open and [`RedbStore::compact`] compacts it on
//! demand (see [`RedbStore::trimmed_bytes_since_compaction`] for deciding when that is
//! worthwhile).

mod tables;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::ops::Bound;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use ::redb::{
    Database, DatabaseError, MultimapTableHandle, ReadableDatabase, ReadableTable, StorageError,
    TableHandle,
};
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use super::{
    Durable, HistoryStore, InboxMessage, InboxStore, RoomFlags, RoomRecord, StoreError,
    StoredMessage, TerminalRecord, WakeRegistration, ready,
};
pub use tables::FORMAT_VERSION;
use tables::{
    FORMAT_MAGIC, INBOX, MESSAGES, META, META_DIRTY, META_FORMAT, META_INBOX_DIRTY, META_VERSION,
    ROOMS, RoomRow, TERMINALS, TerminalRow, Unreadable, WAKE, WAKE_UDP, decode_message,
    decode_wake,
};

/// The store's file inside the data directory.
pub const FILE_NAME: &str = "livepush.redb";

/// Under [`DurabilityPolicy::None`], how far beyond an inbox append's seq the terminal's
/// durable reservation is raised when the append goes past it (see "Inboxes under `none`" in
/// the module documentation): the most inbox seqs a terminal skips after an unclean stop, and
/// the number of inbox appends per terminal answered at submission per durable commit.
pub const INBOX_RESERVE_STEP: u64 = 1024;

/// How often the writer sweeps expired messages (see "Size").
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// When a write counts as done. See the module documentation for what each can lose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum DurabilityPolicy {
    /// One transaction and one fsync per write.
    Sync,
    /// Group commit: one transaction and one fsync per batch.
    #[default]
    Batch,
    /// Answer at once; fsync once per checkpoint interval.
    None,
}

impl DurabilityPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DurabilityPolicy::Sync => "sync",
            DurabilityPolicy::Batch => "batch",
            DurabilityPolicy::None => "none",
        }
    }
}

impl fmt::Display for DurabilityPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DurabilityPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(DurabilityPolicy::Sync),
            "batch" => Ok(DurabilityPolicy::Batch),
            "none" => Ok(DurabilityPolicy::None),
            other => Err(format!(
                "unknown durability policy {other:?} (expected sync, batch or none)"
            )),
        }
    }
}

/// Tuning of a [`RedbStore`]. [`StoreOptions::new`] gives the defaults for a policy.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub policy: DurabilityPolicy,
    /// `batch`/`none`: how long the writer keeps collecting writes after the first one of a
    /// batch arrived. Zero (the default) takes what is already queued: everything that
    /// arrived while the previous fsync ran, which measured best with concurrent publishers
    /// (`livepush bench publish`).
    pub batch_window: Duration,
    /// `batch`/`none`: most writes in one transaction.
    pub max_batch: usize,
    /// `none`: how often pending non-durable commits are made durable.
    pub checkpoint_interval: Duration,
    /// redb's page cache, in bytes.
    pub cache_size: usize,
    /// Verify every page's checksum at open, so that a damaged file is refused with a clear
    /// error instead of trusted (redb may panic on a damaged file it trusts). Reads the whole
    /// file once.
    pub verify_on_open: bool,
    /// Compact the file at open.
    pub compact_on_open: bool,
    /// Messages older than this leave the file, also those of rooms nobody uses any more (see
    /// "Size"); `None` keeps them until the engine trims them.
    pub history_ttl: Option<Duration>,
    /// Rooms looked at per sweep step (one step every [`SWEEP_INTERVAL`]): the bound on the
    /// sweep's work per step, and so on how long it holds up other writes.
    pub sweep_rooms: usize,
}

impl StoreOptions {
    pub fn new(policy: DurabilityPolicy) -> StoreOptions {
        StoreOptions {
            policy,
            batch_window: Duration::ZERO,
            max_batch: 1024,
            checkpoint_interval: Duration::from_secs(1),
            cache_size: 64 * 1024 * 1024,
            verify_on_open: true,
            compact_on_open: true,
            history_ttl: None,
            sweep_rooms: 64,
        }
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions::new(DurabilityPolicy::default())
    }
}

/// Why the store could not be opened. The server should stop with this message: the store
/// never starts afresh over a file it cannot read.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create data directory {}: {source}", .path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is already in use (is another livepush server running on this data directory?)",
        .path.display()
    )]
    Locked { path: PathBuf },
    #[error("{} is corrupt or not a livepush store: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{} is a livepush store of format version {found}, but this build reads only version {}",
        .path.display(),
        FORMAT_VERSION
    )]
    UnknownVersion { path: PathBuf, found: u32 },
    #[error("cannot open {}: {reason}", .path.display())]
    Other { path: PathBuf, reason: String },
}

impl OpenError {
    /// The file (or directory) the error is about.
    pub fn path(&self) -> &Path {
        match self {
            OpenError::CreateDir { path, .. }
            | OpenError::Io { path, .. }
            | OpenError::Locked { path }
            | OpenError::Corrupt { path, .. }
            | OpenError::UnknownVersion { path, .. }
            | OpenError::Other { path, .. } => path,
        }
    }

    /// An I/O error, or what redb reports as one when the file is not a redb file at all.
    fn io(path: PathBuf, source: std::io::Error) -> OpenError {
        if source.kind() == std::io::ErrorKind::InvalidData {
            OpenError::Corrupt {
                path,
                reason: source.to_string(),
            }
        } else {
            OpenError::Io { path, source }
        }
    }

    fn from_database(path: &Path, e: DatabaseError) -> OpenError {
        let path = path.to_path_buf();
        match e {
            DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
                OpenError::Locked { path }
            }
            DatabaseError::Storage(StorageError::Io(source)) => OpenError::io(path, source),
            DatabaseError::Storage(StorageError::Corrupted(reason)) => {
                OpenError::Corrupt { path, reason }
            }
            DatabaseError::UpgradeRequired(v) => OpenError::Corrupt {
                path,
                reason: format!("it is a redb file of an older format ({v})"),
            },
            other => OpenError::Other {
                path,
                reason: other.to_string(),
            },
        }
    }

    fn from_redb(path: &Path, e: ::redb::Error) -> OpenError {
        let path = path.to_path_buf();
        match e {
            ::redb::Error::Io(source) => OpenError::io(path, source),
            ::redb::Error::DatabaseAlreadyOpen | ::redb::Error::LockProtocolMismatch => {
                OpenError::Locked { path }
            }
            ::redb::Error::Corrupted(reason) => OpenError::Corrupt { path, reason },
            e @ (::redb::Error::TableTypeMismatch { .. }
            | ::redb::Error::TableIsMultimap(_)
            | ::redb::Error::TableIsNotMultimap(_)
            | ::redb::Error::TypeDefinitionChanged { .. }) => OpenError::Corrupt {
                path,
                reason: e.to_string(),
            },
            other => OpenError::Other {
                path,
                reason: other.to_string(),
            },
        }
    }
}

/// Opens (or reopens, after an I/O error) the database file.
type Opener = Box<dyn Fn(&Path) -> Result<Database, DatabaseError> + Send + Sync>;

/// One submitted write.
pub(crate) struct Job {
    op: Op,
    reply: Option<oneshot::Sender<Result<(), StoreError>>>,
}

pub(crate) enum Op {
    Create {
        room: String,
        epoch: String,
    },
    /// A message and, for a control message that changed them, the room's new flags.
    Append {
        room: String,
        seq: u64,
        ts: u64,
        frame: Bytes,
        flags: Option<RoomFlags>,
    },
    Flags {
        room: String,
        flags: RoomFlags,
    },
    /// A new history: epoch, seq 0, no messages; the flags stay.
    Reset {
        room: String,
        epoch: String,
    },
    /// A reset after a failed write, which makes the room writable again (see
    /// [`HistoryStore::recover`]).
    Recover {
        room: String,
        epoch: String,
    },
    Trim {
        room: String,
        keep_from: u64,
    },
    /// Delete the room's record and messages if its epoch is this one (never answered at
    /// submission: see [`HistoryStore::forget`]).
    Forget {
        room: String,
        epoch: String,
    },
    AppendInbox {
        terminal: String,
        seq: u64,
        ts: u64,
        frame: Bytes,
    },
    AckInbox {
        terminal: String,
        seq: u64,
    },
    TrimInbox {
        terminal: String,
        keep_from: u64,
    },
    SetWake {
        terminal: String,
        registration: WakeRegistration,
    },
    /// Make everything before it durable (and, under `none`, mark the file clean).
    Flush,
    /// Compact the file (ends a batch).
    Compact(oneshot::Sender<Result<bool, StoreError>>),
    /// Commit what is left, mark the file clean, release it and stop (ends a batch).
    Close,
    /// Tests: stop as a crash would, leaving the dirty marker as it is.
    #[cfg(test)]
    Crash,
}

impl Op {
    /// Ops that change data (as opposed to flush/compact/close).
    fn is_write(&self) -> bool {
        matches!(
            self,
            Op::Create { .. }
                | Op::Append { .. }
                | Op::Flags { .. }
                | Op::Reset { .. }
                | Op::Recover { .. }
                | Op::Trim { .. }
                | Op::Forget { .. }
                | Op::AppendInbox { .. }
                | Op::AckInbox { .. }
                | Op::TrimInbox { .. }
                | Op::SetWake { .. }
        )
    }

    /// Ops after which the writer stops collecting a batch.
    fn ends_batch(&self) -> bool {
        match self {
            Op::Compact(_) | Op::Close => true,
            #[cfg(test)]
            Op::Crash => true,
            _ => false,
        }
    }
}

/// Who may submit, and whether writes under `none` may be answered at submission.
struct Gate {
    tx: Option<mpsc::Sender<Job>>,
    /// `none` only: the dirty marker is durable, so a write may be answered at once.
    early: bool,
    /// `none` only: each terminal's inbox reservation known to be durable (a lower bound of
    /// what the file holds; terminals missing here count as having none). Raised by the writer
    /// after durable commits.
    reserved: HashMap<String, u64>,
}

impl Gate {
    /// Whether `op` may be answered before it is written, as far as inbox reservations go: an
    /// inbox append only within the terminal's durable reservation.
    fn may_answer(&self, op: &Op) -> bool {
        match op {
            Op::AppendInbox { terminal, seq, .. } => {
                self.reserved.get(terminal).is_some_and(|r| seq <= r)
            }
            // Answered once committed (readable), so a room is never loaded from a record
            // about to be deleted.
            Op::Forget { .. } => false,
            _ => true,
        }
    }
}

/// What the store handle and the writer thread share.
pub(crate) struct Shared {
    path: PathBuf,
    policy: DurabilityPolicy,
    /// `None` once closed, or while the file could not be reopened after an I/O error. The
    /// lock is taken exclusively only to compact or reopen.
    db: RwLock<Option<Database>>,
    gate: Mutex<Gate>,
    closed: AtomicBool,
    trimmed_bytes: AtomicU64,
    opener: Opener,
    /// How long each write transaction takes, fsync included (see `Writer::write`).
    commit_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Shared {
    fn open_db(&self) -> Result<Database, OpenError> {
        open_db(&self.path, &self.opener)
    }
}

/// Run the opener, turning a panic inside redb (possible on a damaged file it trusts) into an
/// error.
fn open_db(path: &Path, opener: &Opener) -> Result<Database, OpenError> {
    match catch_unwind(AssertUnwindSafe(|| opener(path))) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(OpenError::from_database(path, e)),
        Err(panic) => Err(OpenError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("reading it failed: {}", panic_message(&*panic)),
        }),
    }
}

/// A panic caught in redb or in the writer thread, as an error.
#[derive(Debug, thiserror::Error)]
#[error("panicked: {0}")]
pub(crate) struct Panicked(pub String);

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_owned()
    }
}

/// The embedded durable [`HistoryStore`] and [`InboxStore`].
///
/// Dropping it closes it (see [`RedbStore::close`]). At graceful shutdown, await
/// [`HistoryStore::flush`] (which marks the file clean) and then drop or close the store.
pub struct RedbStore {
    shared: Arc<Shared>,
    writer: Mutex<Option<thread::JoinHandle<Result<(), StoreError>>>>,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.shared.path)
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Open (creating it if missing) the store in `dir`, with default options for `policy`.
    pub fn open(dir: &Path, policy: DurabilityPolicy) -> Result<RedbStore, OpenError> {
        RedbStore::open_with(dir, StoreOptions::new(policy))
    }

    /// Open (creating it if missing) the store in `dir`.
    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<RedbStore, OpenError> {
        std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let cache_size = options.cache_size;
        let verify = options.verify_on_open;
        let opener: Opener = Box::new(move |path| {
            let mut builder = Database::builder();
            builder
                .set_cache_size(cache_size)
                .set_check_integrity_on_open(verify);
            builder.create(path)
        });
        RedbStore::open_inner(dir.join(FILE_NAME), options, opener)
    }

    fn open_inner(
        path: PathBuf,
        options: StoreOptions,
        opener: Opener,
    ) -> Result<RedbStore, OpenError> {
        let mut db = open_db(&path, &opener)?;
        let collect_reserved = options.policy == DurabilityPolicy::None;
        let prepared = match catch_unwind(AssertUnwindSafe(|| prepare(&db, collect_reserved))) {
            Ok(Ok(prepared)) => prepared,
            Ok(Err(Prepare::Redb(e))) => return Err(OpenError::from_redb(&path, e)),
            Ok(Err(Prepare::NotOurs(reason))) => return Err(OpenError::Corrupt { path, reason }),
            Ok(Err(Prepare::Version(found))) => {
                return Err(OpenError::UnknownVersion { path, found });
            }
            Err(panic) => {
                return Err(OpenError::Corrupt {
                    reason: format!("reading it failed: {}", panic_message(&*panic)),
                    path,
                });
            }
        };
        if prepared.renewed > 0 {
            tracing::warn!(
                path = %path.display(),
                rooms = prepared.renewed,
                "the last run under durability policy `none` did not stop cleanly: \
                 every room gets a new epoch"
            );
        }
        if prepared.bumped > 0 {
            tracing::warn!(
                path = %path.display(),
                terminals = prepared.bumped,
                "the last run under durability policy `none` did not stop cleanly: \
                 inbox seqs continue after their reserved marks"
            );
        }
        if options.compact_on_open {
            match catch_unwind(AssertUnwindSafe(|| db.compact())) {
                Ok(Ok(_)) => {}
                Ok(Err(::redb::CompactionError::Storage(e))) => {
                    return Err(OpenError::from_redb(&path, e.into()));
                }
                Ok(Err(e)) => {
                    tracing::warn!(path = %path.display(), error = %e, "compaction skipped");
                }
                Err(panic) => {
                    return Err(OpenError::Corrupt {
                        reason: format!("compacting it failed: {}", panic_message(&*panic)),
                        path,
                    });
                }
            }
        }
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            path: path.clone(),
            policy: options.policy,
            db: RwLock::new(Some(db)),
            gate: Mutex::new(Gate {
                tx: Some(tx),
                early: false,
                reserved: prepared.reserved,
            }),
            closed: AtomicBool::new(false),
            trimmed_bytes: AtomicU64::new(0),
            opener,
            commit_seconds: crate::metrics::latency(),
        });
        let writer = writer::Writer::new(shared.clone(), rx, &options);
        let handle = thread::Builder::new()
            .name("livepush-store".into())
            .spawn(move || writer.run())
            .map_err(|source| OpenError::Io { path, source })?;
        Ok(RedbStore {
            shared,
            writer: Mutex::new(Some(handle)),
        })
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub fn policy(&self) -> DurabilityPolicy {
        self.shared.policy
    }

    /// Current size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        std::fs::metadata(&self.shared.path).map_or(0, |m| m.len())
    }

    /// Bytes of messages deleted by `trim` since the last compaction (or open). Freed space is
    /// reused by later writes; compacting gives it back to the file system.
    pub fn trimmed_bytes_since_compaction(&self) -> u64 {
        self.shared.trimmed_bytes.load(Ordering::Relaxed)
    }

    /// Compact the file, in the writer, after everything submitted before. Resolves to whether
    /// anything was compacted. While it runs, writes queue up and `load_room` waits: call it
    /// when it is worthwhile (e.g. [`RedbStore::trimmed_bytes_since_compaction`] is large
    /// compared to [`RedbStore::file_len`]) and preferably when the server is quiet.
    pub fn compact(&self) -> impl Future<Output = Result<bool, StoreError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let sent = {
            let gate = self.shared.gate.lock();
            gate.tx.as_ref().is_some_and(|sender| {
                sender
                    .send(Job {
                        op: Op::Compact(tx),
                        reply: None,
                    })
                    .is_ok()
            })
        };
        async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            rx.await.unwrap_or(Err(StoreError::Closed))
        }
    }

    /// Make everything submitted durable, mark the file clean, release it and stop the writer
    /// (blocking until it has). Later writes fail with [`StoreError::Closed`]. Idempotent;
    /// dropping the store does the same.
    pub fn close(&self) -> Result<(), StoreError> {
        self.stop(Op::Close)
    }

    /// Room records in the file (tests: how many rooms the store still knows).
    #[cfg(test)]
    pub(crate) fn room_records(&self) -> u64 {
        let guard = self.shared.db.read();
        let db = guard.as_ref().expect("open");
        let txn = db.begin_read().unwrap();
        ::redb::ReadableTableMetadata::len(&txn.open_table(ROOMS).unwrap()).unwrap()
    }

    /// Stop as a crash would: the writer stops without marking the file clean.
    #[cfg(test)]
    pub(crate) fn crash(&self) {
        let _ = self.stop(Op::Crash);
    }

    fn stop(&self, op: Op) -> Result<(), StoreError> {
        let Some(handle) = self.writer.lock().take() else {
            return Ok(());
        };
        {
            let mut gate = self.shared.gate.lock();
            gate.early = false;
            if let Some(sender) = gate.tx.take() {
                let _ = sender.send(Job { op, reply: None });
            }
        }
        let result = match handle.join() {
            Ok(result) => result,
            Err(panic) => Err(StoreError::io(
                "the store's writer thread failed",
                Panicked(panic_message(&*panic)),
            )),
        };
        self.shared.closed.store(true, Ordering::SeqCst);
        // The writer releases the file; make sure of it even if it died.
        *self.shared.db.write() = None;
        result
    }

    /// Hand a write to the writer. Under `none` the answer is immediate once the file is
    /// marked dirty (unless `wait` asks for durability regardless, or it is an inbox append
    /// beyond the terminal's durable reservation: then it, and everything submitted after it,
    /// waits for the writer).
    fn submit(&self, op: Op, wait: bool) -> Durable {
        let (tx, rx) = oneshot::channel();
        let early = {
            let mut gate = self.shared.gate.lock();
            if gate.tx.is_none() {
                return closed();
            }
            let mut early = gate.early && !wait;
            if early && !gate.may_answer(&op) {
                // The writer opens the gate again once the reservation is durable.
                gate.early = false;
                early = false;
            }
            let job = Job {
                op,
                reply: (!early).then_some(tx),
            };
            if gate
                .tx
                .as_ref()
                .is_none_or(|sender| sender.send(job).is_err())
            {
                return closed();
            }
            early
        };
        if early {
            return ready();
        }
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Closed)) })
    }

    /// A read error as the caller sees it.
    fn read_error(&self, e: ::redb::Error) -> StoreError {
        if self.shared.closed.load(Ordering::SeqCst) {
            StoreError::Closed
        } else if matches!(e, ::redb::Error::DatabaseClosed) {
            StoreError::Unavailable(self.shared.path.display().to_string())
        } else {
            StoreError::io(format!("reading {}", self.shared.path.display()), e)
        }
    }

    fn read_terminal(&self, terminal: &str) -> Result<Option<TerminalRecord>, ::redb::Error> {
        let guard = self.shared.db.read();
        let Some(db) = guard.as_ref() else {
            return Err(::redb::Error::DatabaseClosed);
        };
        let txn = db.begin_read()?;
        let terminals = txn.open_table(TERMINALS)?;
        let Some(row) = terminals.get(terminal)? else {
            return Ok(None);
        };
        let row = TerminalRow::decode(row.value()).map_err(corrupted)?;
        let mut inbox = Vec::new();
        if let Some(first) = row.acked.checked_add(1) {
            let messages = txn.open_table(INBOX)?;
            for entry in messages.range((terminal, first)..=(terminal, u64::MAX))? {
                let (key, value) = entry?;
                let (ts, frame) = decode_message(value.value()).map_err(corrupted)?;
                inbox.push(InboxMessage {
                    seq: key.value().1,
                    ts,
                    frame: Bytes::copy_from_slice(frame),
                });
            }
        }
        let wake = match txn.open_table(WAKE)?.get((terminal, WAKE_UDP))? {
            Some(value) => Some(decode_wake(value.value()).map_err(corrupted)?),
            None => None,
        };
        Ok(Some(TerminalRecord {
            seq: row.seq,
            acked: row.acked,
            inbox,
            wake,
        }))
    }

    /// Scan of `livepush.terminals`, see the module documentation.
    fn read_pending(&self) -> Result<Vec<String>, ::redb::Error> {
        let guard = self.shared.db.read();
        let Some(db) = guard.as_ref() else {
            return Err(::redb::Error::DatabaseClosed);
        };
        let txn = db.begin_read()?;
        let terminals = txn.open_table(TERMINALS)?;
        let messages = txn.open_table(INBOX)?;
        let mut pending = Vec::new();
        for entry in terminals.iter()? {
            let (key, value) = entry?;
            let row = TerminalRow::decode(value.value()).map_err(corrupted)?;
            if row.seq <= row.acked {
                continue;
            }
            let terminal = key.value();
            if messages
                .range((terminal, row.acked + 1)..=(terminal, u64::MAX))?
                .next()
                .transpose()?
                .is_some()
            {
                pending.push(terminal.to_owned());
            }
        }
        Ok(pending)
    }

    /// Set a room's flags on their own (the engine writes them with the control message that
    /// changes them; see [`HistoryStore::append`]).
    pub fn set_flags(&self, room: &str, flags: RoomFlags) -> Durable {
        self.submit(
            Op::Flags {
                room: room.to_owned(),
                flags,
            },
            false,
        )
    }

    fn read_range(
        &self,
        room: &str,
        since: u64,
        upto: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, ::redb::Error> {
        let mut out = Vec::new();
        if since >= upto || limit == 0 {
            return Ok(out);
        }
        let guard = self.shared.db.read();
        let Some(db) = guard.as_ref() else {
            return Err(::redb::Error::DatabaseClosed);
        };
        let txn = db.begin_read()?;
        let messages = txn.open_table(MESSAGES)?;
        let mut bytes = 0;
        for entry in messages.range((room, since + 1)..=(room, upto))? {
            let (key, value) = entry?;
            let (ts, frame) = decode_message(value.value()).map_err(corrupted)?;
            bytes += frame.len();
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(StoredMessage {
                seq: key.value().1,
                ts,
                frame: Bytes::copy_from_slice(frame),
            });
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    fn read_room_ids(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, ::redb::Error> {
        let guard = self.shared.db.read();
        let Some(db) = guard.as_ref() else {
            return Err(::redb::Error::DatabaseClosed);
        };
        let txn = db.begin_read()?;
        let rooms = txn.open_table(ROOMS)?;
        let range = match after {
            Some(after) => rooms.range::<&str>((Bound::Excluded(after), Bound::Unbounded))?,
            None => rooms.range::<&str>(..)?,
        };
        let mut ids = Vec::new();
        for entry in range.take(limit) {
            ids.push(entry?.0.value().to_owned());
        }
        Ok(ids)
    }

    fn read_room(&self, room: &str, keep: usize) -> Result<Option<RoomRecord>, ::redb::Error> {
        let guard = self.shared.db.read();
        let Some(db) = guard.as_ref() else {
            return Err(::redb::Error::DatabaseClosed);
        };
        let txn = db.begin_read()?;
        let rooms = txn.open_table(ROOMS)?;
        let Some(row) = rooms.get(room)? else {
            return Ok(None);
        };
        let row = RoomRow::decode(row.value()).map_err(corrupted)?;
        let mut history = Vec::new();
        if keep > 0 {
            let messages = txn.open_table(MESSAGES)?;
            for entry in messages.range((room, 0u64)..=(room, u64::MAX))?.rev() {
                let (key, value) = entry?;
                let (ts, frame) = decode_message(value.value()).map_err(corrupted)?;
                history.push(StoredMessage {
                    seq: key.value().1,
                    ts,
                    frame: Bytes::copy_from_slice(frame),
                });
                if history.len() == keep {
                    break;
                }
            }
            history.reverse();
        }
        Ok(Some(RoomRecord {
            epoch: row.epoch,
            seq: row.seq,
            history,
            flags: row.flags,
        }))
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(path = %self.shared.path.display(), error = %e, "closing the store failed");
        }
    }
}

fn closed() -> Durable {
    Box::pin(std::future::ready(Err(StoreError::Closed)))
}

impl HistoryStore for RedbStore {
    fn commit_seconds(&self) -> Option<prometheus_client::metrics::histogram::Histogram> {
        Some(self.shared.commit_seconds.clone())
    }

    fn load_room(&self, room: &str, keep: usize) -> Result<Option<RoomRecord>, StoreError> {
        self.read_room(room, keep).map_err(|e| self.read_error(e))
    }

    fn create_room(&self, room: &str, epoch: &str) -> Durable {
        self.submit(
            Op::Create {
                room: room.to_owned(),
                epoch: epoch.to_owned(),
            },
            false,
        )
    }

    fn read(
        &self,
        room: &str,
        since: u64,
        upto: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.read_range(room, since, upto, limit, max_bytes)
            .map_err(|e| self.read_error(e))
    }

    fn append(&self, room: &str, message: &StoredMessage, flags: Option<RoomFlags>) -> Durable {
        self.submit(
            Op::Append {
                room: room.to_owned(),
                seq: message.seq,
                ts: message.ts,
                frame: message.frame.clone(),
                flags,
            },
            false,
        )
    }

    fn reset(&self, room: &str, epoch: &str) -> Durable {
        self.submit(
            Op::Reset {
                room: room.to_owned(),
                epoch: epoch.to_owned(),
            },
            false,
        )
    }

    fn recover(&self, room: &str, epoch: &str) -> Durable {
        self.submit(
            Op::Recover {
                room: room.to_owned(),
                epoch: epoch.to_owned(),
            },
            false,
        )
    }

    fn trim(&self, room: &str, keep_from: u64) -> Durable {
        self.submit(
            Op::Trim {
                room: room.to_owned(),
                keep_from,
            },
            false,
        )
    }

    fn rooms_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        self.read_room_ids(after, limit)
            .map_err(|e| self.read_error(e))
    }

    fn forget(&self, room: &str, epoch: &str) -> Durable {
        self.submit(
            Op::Forget {
                room: room.to_owned(),
                epoch: epoch.to_owned(),
            },
            false,
        )
    }

    fn flush(&self) -> Durable {
        self.submit(Op::Flush, true)
    }
}

impl InboxStore for RedbStore {
    fn load_terminal(&self, terminal: &str) -> Result<Option<TerminalRecord>, StoreError> {
        self.read_terminal(terminal).map_err(|e| self.read_error(e))
    }

    fn append_inbox(&self, terminal: &str, message: &InboxMessage) -> Durable {
        self.submit(
            Op::AppendInbox {
                terminal: terminal.to_owned(),
                seq: message.seq,
                ts: message.ts,
                frame: message.frame.clone(),
            },
            false,
        )
    }

    fn ack_inbox(&self, terminal: &str, seq: u64) -> Durable {
        self.submit(
            Op::AckInbox {
                terminal: terminal.to_owned(),
                seq,
            },
            false,
        )
    }

    fn trim_inbox(&self, terminal: &str, keep_from: u64) -> Durable {
        self.submit(
            Op::TrimInbox {
                terminal: terminal.to_owned(),
                keep_from,
            },
            false,
        )
    }

    fn set_wake(&self, terminal: &str, registration: &WakeRegistration) -> Durable {
        self.submit(
            Op::SetWake {
                terminal: terminal.to_owned(),
                registration: *registration,
            },
            false,
        )
    }

    fn terminals_with_pending_inbox(&self) -> Result<Vec<String>, StoreError> {
        self.read_pending().map_err(|e| self.read_error(e))
    }
}

/// A record redb read but livepush cannot: reported as redb reports damage.
fn corrupted(e: Unreadable) -> ::redb::Error {
    ::redb::Error::Corrupted(e.to_string())
}

/// Why the file cannot be used, found while preparing it.
enum Prepare {
    Redb(::redb::Error),
    NotOurs(String),
    Version(u32),
}

macro_rules! prepare_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Prepare {
            fn from(e: $t) -> Self {
                Prepare::Redb(e.into())
            }
        }
    )*};
}
prepare_from!(
    ::redb::TransactionError,
    ::redb::TableError,
    ::redb::StorageError,
    ::redb::CommitError
);

/// What [`prepare`] found and did.
#[derive(Debug, Default)]
struct Prepared {
    /// Rooms that got a new epoch.
    renewed: usize,
    /// Terminals whose inbox seq was moved up to their reservation.
    bumped: usize,
    /// Each terminal's (durable) inbox reservation, if asked for.
    reserved: HashMap<String, u64>,
}

/// Check (or write) the format marker, create the tables, and, if the last run answered writes
/// before they were durable and did not stop cleanly, give every room a new epoch and move
/// every terminal's inbox seq up to its reservation. With `collect_reserved`, also return each
/// terminal's reservation.
fn prepare(db: &Database, collect_reserved: bool) -> Result<Prepared, Prepare> {
    let txn = db.begin_write()?;
    let ours = txn.list_tables()?.any(|t| t.name() == META.name());
    let mut prepared = Prepared::default();
    {
        if !ours {
            let mut others: Vec<String> = txn.list_tables()?.map(|t| t.name().to_owned()).collect();
            others.extend(txn.list_multimap_tables()?.map(|t| t.name().to_owned()));
            if !others.is_empty() {
                return Err(Prepare::NotOurs(format!(
                    "it is a redb file with other tables ({}) and no livepush format marker",
                    others.join(", ")
                )));
            }
        }
        let mut meta = txn.open_table(META)?;
        if ours {
            let format = meta.get(META_FORMAT)?.map(|v| v.value().to_vec());
            if format.as_deref() != Some(FORMAT_MAGIC) {
                return Err(Prepare::NotOurs(
                    "its format marker is missing or wrong".into(),
                ));
            }
            let version = meta
                .get(META_VERSION)?
                .and_then(|v| <[u8; 4]>::try_from(v.value()).ok())
                .map(u32::from_le_bytes)
                .ok_or_else(|| Prepare::NotOurs("its format version is unreadable".into()))?;
            if version != FORMAT_VERSION {
                return Err(Prepare::Version(version));
            }
        } else {
            meta.insert(META_FORMAT, FORMAT_MAGIC)?;
            meta.insert(META_VERSION, FORMAT_VERSION.to_le_bytes().as_slice())?;
        }
        let dirty = meta.get(META_DIRTY)?.is_some_and(|v| v.value() == [1]);
        let mut rooms = txn.open_table(ROOMS)?;
        txn.open_table(MESSAGES)?;
        if dirty {
            let mut renew = Vec::new();
            for entry in rooms.iter()? {
                let (key, value) = entry?;
                let row =
                    RoomRow::decode(value.value()).map_err(|e| Prepare::NotOurs(e.to_string()))?;
                renew.push((key.value().to_owned(), row));
            }
            for (room, mut row) in renew {
                row.epoch = super::new_epoch();
                rooms.insert(room.as_str(), row.encode().as_slice())?;
                prepared.renewed += 1;
            }
        }
        let inbox_dirty = dirty
            || meta
                .get(META_INBOX_DIRTY)?
                .is_some_and(|v| v.value() == [1]);
        let mut terminals = txn.open_table(TERMINALS)?;
        txn.open_table(INBOX)?;
        txn.open_table(WAKE)?;
        if inbox_dirty || collect_reserved {
            let mut bump = Vec::new();
            for entry in terminals.iter()? {
                let (key, value) = entry?;
                let row = TerminalRow::decode(value.value())
                    .map_err(|e| Prepare::NotOurs(e.to_string()))?;
                let terminal = key.value().to_owned();
                if inbox_dirty && row.reserved > row.seq {
                    bump.push((terminal.clone(), row));
                }
                if collect_reserved {
                    prepared.reserved.insert(terminal, row.reserved);
                }
            }
            for (terminal, mut row) in bump {
                row.seq = row.reserved;
                terminals.insert(terminal.as_str(), row.encode().as_slice())?;
                prepared.bumped += 1;
            }
        }
        // Under `none` the writer marks the file dirty again before it answers anything early.
        meta.insert(META_DIRTY, [0u8].as_slice())?;
        meta.insert(META_INBOX_DIRTY, [0u8].as_slice())?;
    }
    txn.commit()?;
    Ok(prepared)
}

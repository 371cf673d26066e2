//! The writer thread: the only place write transactions happen.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use ::redb::{Durability, ReadableTable, Table};

use super::super::{RoomFlags, StoreError, WakeRegistration};
use super::tables::{
    INBOX, MESSAGES, META, META_DIRTY, META_INBOX_DIRTY, ROOMS, RoomRow, TERMINALS, TerminalRow,
    Unreadable, WAKE, WAKE_UDP, decode_message, encode_message, encode_wake,
};
use super::{
    DurabilityPolicy, INBOX_RESERVE_STEP, Job, Op, Panicked, SWEEP_INTERVAL, Shared, StoreOptions,
};
use crate::clock::now_ms;

/// What to re-apply to a room record after a failed batch, so that the record never falls
/// behind what the hub already handed out (and delivered).
#[derive(Debug, Default)]
struct Repair {
    /// A `create_room` (or `reset`) that failed: the room's epoch.
    create: Option<String>,
    /// It was a `reset`: the room's flags stay.
    keep_flags: bool,
    /// Highest seq of a failed append.
    seq: u64,
    /// Flags of a failed update.
    flags: Option<RoomFlags>,
}

/// What to re-apply to a terminal record after a failed batch.
#[derive(Debug, Default)]
struct InboxRepair {
    /// Highest seq of a failed inbox append.
    seq: u64,
    /// Highest seq of a failed ack.
    acked: u64,
    /// The last failed wake registration.
    wake: Option<WakeRegistration>,
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Job>,
    policy: DurabilityPolicy,
    window: Duration,
    max_batch: usize,
    checkpoint_interval: Duration,
    /// Jobs taken from the channel but not written yet; they come before anything still in
    /// the channel.
    carry: VecDeque<Job>,
    /// `none`: the durable state of the file has the dirty marker set.
    dirty_on_disk: bool,
    /// `none`: some commit since the last durable one was not durable.
    pending_nondurable: bool,
    last_durable: Instant,
    repairs: BTreeMap<String, Repair>,
    inbox_repairs: BTreeMap<String, InboxRepair>,
    /// `none`: inbox reservations written by commits since the last durable one; they are
    /// handed to the gate once durable.
    unpublished: HashMap<String, u64>,
    /// Rooms whose append or reset failed: their appends and resets are refused until a
    /// recover (see "Failed writes" in `redb.rs`).
    broken: HashSet<String>,
    /// `none`: a write answered at submission was lost; the dirty marker stays set.
    lost: bool,
    /// The sweep of expired messages (see "Size" in `redb.rs`): the TTL, rooms per step,
    /// the last room swept (the next step starts after it), and when the last step ran.
    history_ttl: Option<Duration>,
    sweep_rooms: usize,
    sweep_after: Option<String>,
    last_sweep: Instant,
}

/// Why one write of a batch was refused while the others went on.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum Refused {
    #[error("room {0:?} has no record")]
    NoRecord(String),
    #[error("an earlier write of room {0:?} failed")]
    Broken(String),
    #[error("{what} {key:?}: {reason}")]
    Unreadable {
        what: &'static str,
        key: String,
        reason: Unreadable,
    },
}

type Outcome = Result<(), Refused>;

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Job>,
        options: &StoreOptions,
    ) -> Self {
        Writer {
            shared,
            rx,
            policy: options.policy,
            window: options.batch_window,
            max_batch: options.max_batch.max(1),
            checkpoint_interval: options.checkpoint_interval,
            carry: VecDeque::new(),
            dirty_on_disk: false,
            pending_nondurable: false,
            last_durable: Instant::now(),
            repairs: BTreeMap::new(),
            inbox_repairs: BTreeMap::new(),
            unpublished: HashMap::new(),
            broken: HashSet::new(),
            lost: false,
            history_ttl: options.history_ttl,
            sweep_rooms: options.sweep_rooms.max(1),
            sweep_after: None,
            last_sweep: Instant::now(),
        }
    }

    /// Serve until closed. Returns the result of the final commit.
    pub(super) fn run(mut self) -> Result<(), StoreError> {
        loop {
            let Some(first) = self.next_job() else {
                // Every sender is gone without a close: finish as a close would.
                return self.finish(Vec::new());
            };
            let mut batch = vec![first];
            if self.policy != DurabilityPolicy::Sync && !batch[0].op.ends_batch() {
                self.fill(&mut batch);
            }
            let last = if batch.last().is_some_and(|j| j.op.ends_batch()) {
                batch.pop()
            } else {
                None
            };
            match last.map(|j| j.op) {
                None => {
                    let _ = self.commit(batch, false);
                    if self.sweep_due().is_some_and(|due| due <= Instant::now()) {
                        self.sweep();
                    }
                }
                Some(Op::Compact(reply)) => {
                    let _ = self.commit(batch, false);
                    let _ = reply.send(self.compact());
                }
                Some(Op::Close) => return self.finish(batch),
                #[cfg(test)]
                Some(Op::Crash) => {
                    let _ = self.commit(batch, false);
                    *self.shared.db.write() = None;
                    return Ok(());
                }
                Some(_) => unreachable!("only batch-ending ops are split off"),
            }
        }
    }

    /// Commit what is left as a clean stop, and release the file.
    fn finish(&mut self, batch: Vec<Job>) -> Result<(), StoreError> {
        let result = self.commit(batch, true);
        *self.shared.db.write() = None;
        result
    }

    /// The next job, doing `none`'s periodic durable commit and the sweep while waiting.
    fn next_job(&mut self) -> Option<Job> {
        if let Some(job) = self.carry.pop_front() {
            return Some(job);
        }
        loop {
            let checkpoint = self
                .pending_nondurable
                .then(|| self.last_durable + self.checkpoint_interval);
            let sweep = self.sweep_due();
            let Some(deadline) = checkpoint.into_iter().chain(sweep).min() else {
                return self.rx.recv().ok();
            };
            let now = Instant::now();
            if now < deadline {
                match self.rx.recv_timeout(deadline - now) {
                    Ok(job) => return Some(job),
                    Err(RecvTimeoutError::Disconnected) => return None,
                    Err(RecvTimeoutError::Timeout) => {}
                }
            }
            let now = Instant::now();
            if checkpoint.is_some_and(|c| c <= now) {
                self.checkpoint();
            }
            if sweep.is_some_and(|s| s <= now) {
                self.sweep();
            }
        }
    }

    /// When the next sweep step is due, if there is a TTL.
    fn sweep_due(&self) -> Option<Instant> {
        self.history_ttl.map(|_| self.last_sweep + SWEEP_INTERVAL)
    }

    /// One step of the sweep of expired messages.
    fn sweep(&mut self) {
        self.last_sweep = Instant::now();
        let Some(ttl) = self.history_ttl else {
            return;
        };
        let cutoff = now_ms().saturating_sub(ttl.as_millis() as u64);
        if let Err(e) = self.sweep_step(cutoff) {
            tracing::error!(path = %self.shared.path.display(), error = %e, "store sweep failed");
            self.after_failure(&e);
        }
    }

    /// Delete the messages with `ts < cutoff` of the next [`Writer::sweep_rooms`] rooms, in
    /// one durable transaction if there is anything to delete.
    fn sweep_step(&mut self, cutoff: u64) -> Result<(), ::redb::Error> {
        let guard = self.shared.db.read();
        let Some(db) = guard.as_ref() else {
            return Ok(());
        };
        let txn = db.begin_write()?;
        let mut deleted = 0;
        let swept = {
            let rooms = txn.open_table(ROOMS)?;
            let mut messages = txn.open_table(MESSAGES)?;
            let after = self.sweep_after.as_deref();
            let range = match after {
                Some(after) => rooms.range::<&str>((Bound::Excluded(after), Bound::Unbounded))?,
                None => rooms.range::<&str>(..)?,
            };
            let mut swept = Vec::with_capacity(self.sweep_rooms);
            for entry in range.take(self.sweep_rooms) {
                swept.push(entry?.0.value().to_owned());
            }
            for room in &swept {
                // Messages are in seq order, and so in time order: expired ones come first.
                let mut keep_from = u64::MAX;
                for entry in messages.range((room.as_str(), 0u64)..=(room.as_str(), u64::MAX))? {
                    let (key, value) = entry?;
                    if decode_message(value.value()).map_or(true, |(ts, _)| ts >= cutoff) {
                        keep_from = key.value().1;
                        break;
                    }
                }
                deleted += delete_messages(&mut messages, room, keep_from)?;
            }
            swept
        };
        self.sweep_after = (swept.len() == self.sweep_rooms)
            .then(|| swept.into_iter().last())
            .flatten();
        if deleted == 0 {
            txn.abort()?;
            return Ok(());
        }
        txn.commit()?;
        self.shared
            .trimmed_bytes
            .fetch_add(deleted, Ordering::Relaxed);
        Ok(())
    }

    /// Collect more jobs for the batch started by `batch[0]`.
    fn fill(&mut self, batch: &mut Vec<Job>) {
        let deadline = Instant::now() + self.window;
        while batch.len() < self.max_batch {
            let job = match self.carry.pop_front() {
                Some(job) => job,
                None => {
                    let now = Instant::now();
                    let next = if now >= deadline {
                        self.rx.try_recv().ok()
                    } else {
                        self.rx.recv_timeout(deadline - now).ok()
                    };
                    match next {
                        Some(job) => job,
                        None => break,
                    }
                }
            };
            let ends = job.op.ends_batch();
            batch.push(job);
            if ends {
                break;
            }
        }
    }

    /// `none`: make pending non-durable commits durable.
    fn checkpoint(&mut self) {
        match self.write(&[], true, None) {
            Ok(_) => self.committed(true),
            Err(e) => {
                tracing::error!(path = %self.shared.path.display(), error = %e, "store checkpoint failed");
                // Try again after another interval rather than spinning.
                self.last_durable = Instant::now();
                self.after_failure(&e);
            }
        }
    }

    fn committed(&mut self, durable: bool) {
        if durable {
            self.last_durable = Instant::now();
            self.pending_nondurable = false;
            self.publish_reserved();
        } else {
            self.pending_nondurable = true;
        }
        self.repairs.clear();
        self.inbox_repairs.clear();
    }

    /// `none`, after a durable commit: inbox appends within the reservations it made durable
    /// may be answered at submission from now on.
    fn publish_reserved(&mut self) {
        if self.unpublished.is_empty() {
            return;
        }
        let mut gate = self.shared.gate.lock();
        for (terminal, reserved) in self.unpublished.drain() {
            let known = gate.reserved.entry(terminal).or_default();
            *known = (*known).max(reserved);
        }
    }

    /// Write a batch in one transaction and resolve its futures in order. `closing` makes the
    /// commit durable and, under `none`, marks the file clean.
    fn commit(&mut self, jobs: Vec<Job>, closing: bool) -> Result<(), StoreError> {
        let none = self.policy == DurabilityPolicy::None;
        let writes = jobs.iter().any(|j| j.op.is_write());
        let flush = closing || jobs.iter().any(|j| matches!(j.op, Op::Flush));
        let mut marker = None;
        if none {
            if flush {
                if self.dirty_on_disk && !self.lost && self.close_gate() {
                    marker = Some(false);
                }
            } else if writes && !self.dirty_on_disk {
                marker = Some(true);
            }
        }
        // An inbox append that was not answered at submission may wait for the durable
        // reservation this batch makes for it (see "Inboxes under `none`").
        let reserving = jobs
            .iter()
            .any(|j| j.reply.is_some() && matches!(j.op, Op::AppendInbox { .. }));
        let durable = !none
            || flush
            || marker.is_some()
            || reserving
            || self.last_durable.elapsed() >= self.checkpoint_interval;
        let needed = writes
            || marker.is_some()
            || !self.repairs.is_empty()
            || !self.inbox_repairs.is_empty()
            || (durable && self.pending_nondurable);
        let result = if needed {
            self.write(&jobs, durable, marker)
        } else {
            Ok(vec![Ok(()); jobs.len()])
        };
        let result = match result {
            Ok(outcomes) => {
                if needed {
                    self.committed(durable);
                }
                if let Some(m) = marker {
                    self.dirty_on_disk = m;
                }
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let outcome = outcome.map_err(|e| match e {
                        Refused::Broken(room) => StoreError::Broken(room),
                        e => {
                            tracing::warn!(path = %self.shared.path.display(), error = %e, "store write refused");
                            StoreError::io(format!("writing {}", self.shared.path.display()), e)
                        }
                    });
                    if let Some(reply) = job.reply {
                        let _ = reply.send(outcome);
                    }
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(
                    path = %self.shared.path.display(),
                    error = %e,
                    writes = jobs.len(),
                    "store write failed"
                );
                self.note_failure(&jobs);
                self.after_failure(&e);
                let error = StoreError::io(format!("writing {}", self.shared.path.display()), e);
                for job in jobs {
                    if let Some(reply) = job.reply {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
                Err(error)
            }
        };
        if none && self.dirty_on_disk && !closing {
            self.open_gate();
        }
        result
    }

    /// `none`, before clearing the dirty marker: stop answering at submission, and check that
    /// nothing answered early is still queued. Returns whether the marker may be cleared by
    /// this batch's durable commit.
    fn close_gate(&mut self) -> bool {
        let mut gate = self.shared.gate.lock();
        if !self.carry.is_empty() {
            return false;
        }
        match self.rx.try_recv() {
            Ok(job) => {
                // Answered early, not in this batch: the file stays dirty.
                self.carry.push_back(job);
                false
            }
            Err(_) => {
                gate.early = false;
                true
            }
        }
    }

    /// `none`, once the dirty marker is durable: answer what waited for it (in order, before
    /// anything submitted later can be answered at once) and answer at submission from now on.
    /// An inbox append beyond its terminal's durable reservation stops this: it and what
    /// follows it wait for the durable commit of their batch, and the gate stays closed.
    fn open_gate(&mut self) {
        let mut gate = self.shared.gate.lock();
        if gate.early || gate.tx.is_none() {
            return;
        }
        while let Ok(job) = self.rx.try_recv() {
            self.carry.push_back(job);
        }
        for job in &mut self.carry {
            if !job.op.is_write() {
                continue;
            }
            if !gate.may_answer(&job.op) {
                return;
            }
            if let Some(reply) = job.reply.take() {
                let _ = reply.send(Ok(()));
            }
        }
        gate.early = true;
    }

    /// Remember what a failed batch should have done to room records, which rooms it broke,
    /// and whether it lost a write answered at submission.
    fn note_failure(&mut self, jobs: &[Job]) {
        for job in jobs {
            if job.reply.is_none() && job.op.is_write() && !self.lost {
                tracing::error!(
                    path = %self.shared.path.display(),
                    "a write answered before it was durable is lost: every room gets a new \
                     epoch at the next start"
                );
                self.lost = true;
            }
            let answered_at_commit = job.reply.is_some();
            match &job.op {
                Op::Append { room, .. } | Op::Reset { room, .. } if answered_at_commit => {
                    self.broken.insert(room.clone());
                }
                Op::Recover { room, .. } => {
                    // Re-applied before anything submitted after it.
                    self.broken.remove(room);
                }
                _ => {}
            }
            match &job.op {
                Op::Create { room, epoch } => {
                    self.repairs.insert(
                        room.clone(),
                        Repair {
                            create: Some(epoch.clone()),
                            ..Repair::default()
                        },
                    );
                }
                Op::Append {
                    room, seq, flags, ..
                } => {
                    let r = self.repairs.entry(room.clone()).or_default();
                    r.seq = r.seq.max(*seq);
                    if flags.is_some() {
                        r.flags = *flags;
                    }
                }
                Op::Reset { room, epoch } | Op::Recover { room, epoch } => {
                    self.repairs.insert(
                        room.clone(),
                        Repair {
                            create: Some(epoch.clone()),
                            keep_flags: true,
                            ..Repair::default()
                        },
                    );
                }
                Op::Flags { room, flags } => {
                    self.repairs.entry(room.clone()).or_default().flags = Some(*flags);
                }
                Op::AppendInbox { terminal, seq, .. } => {
                    let r = self.inbox_repairs.entry(terminal.clone()).or_default();
                    r.seq = r.seq.max(*seq);
                }
                Op::AckInbox { terminal, seq } => {
                    let r = self.inbox_repairs.entry(terminal.clone()).or_default();
                    r.acked = r.acked.max(*seq);
                }
                Op::SetWake {
                    terminal,
                    registration,
                } => {
                    self.inbox_repairs.entry(terminal.clone()).or_default().wake =
                        Some(*registration);
                }
                _ => {}
            }
        }
    }

    /// After a failed transaction: reopen the file if redb needs it.
    fn after_failure(&mut self, e: &::redb::Error) {
        if matches!(
            e,
            ::redb::Error::Io(_) | ::redb::Error::PreviousIo | ::redb::Error::DatabaseClosed
        ) {
            self.reopen();
        }
    }

    fn reopen(&mut self) {
        if self.pending_nondurable && !self.lost {
            tracing::error!(
                path = %self.shared.path.display(),
                "commits answered before they were durable are lost: every room gets a new \
                 epoch at the next start"
            );
            self.lost = true;
        }
        let mut db = self.shared.db.write();
        // Release the file before opening it again.
        *db = None;
        match self.shared.open_db() {
            Ok(opened) => {
                *db = Some(opened);
                tracing::info!(path = %self.shared.path.display(), "store reopened");
            }
            Err(e) => tracing::error!(error = %e, "cannot reopen the store"),
        }
        // A reopen recovers the last durable state.
        self.pending_nondurable = false;
        self.unpublished.clear();
        self.last_durable = Instant::now();
    }

    fn compact(&mut self) -> Result<bool, StoreError> {
        let mut guard = self.shared.db.write();
        let Some(db) = guard.as_mut() else {
            return Err(StoreError::Unavailable(
                self.shared.path.display().to_string(),
            ));
        };
        let result = catch_unwind(AssertUnwindSafe(|| db.compact()));
        drop(guard);
        match result {
            Ok(Ok(done)) => {
                self.shared.trimmed_bytes.store(0, Ordering::Relaxed);
                // Compaction ends with a durable commit.
                self.pending_nondurable = false;
                self.last_durable = Instant::now();
                Ok(done)
            }
            Ok(Err(e)) => {
                let e: ::redb::Error = e.into();
                self.after_failure(&e);
                Err(StoreError::io(
                    format!("compacting {}", self.shared.path.display()),
                    e,
                ))
            }
            Err(panic) => {
                self.reopen();
                Err(StoreError::io(
                    format!("compacting {}", self.shared.path.display()),
                    Panicked(super::panic_message(&*panic)),
                ))
            }
        }
    }

    /// One write transaction: pending repairs, then `jobs` in order, then the dirty marker.
    /// Returns each job's outcome; an error means nothing was written.
    fn write(
        &mut self,
        jobs: &[Job],
        durable: bool,
        marker: Option<bool>,
    ) -> Result<Vec<Outcome>, ::redb::Error> {
        if self.shared.db.read().is_none() {
            self.reopen();
        }
        let guard = self.shared.db.read();
        let Some(db) = guard.as_ref() else {
            return Err(::redb::Error::DatabaseClosed);
        };
        let started = Instant::now();
        let mut txn = db.begin_write()?;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        let mut outcomes = Vec::with_capacity(jobs.len());
        let mut recovered = Vec::new();
        let mut trimmed = 0;
        let reserved;
        {
            let mut rooms = txn.open_table(ROOMS)?;
            let mut messages = txn.open_table(MESSAGES)?;
            // Room records touched by this transaction, written back at the end. `None`: the
            // room has no record.
            let mut rows: HashMap<String, Option<RoomRow>> = HashMap::new();
            let mut terminals = InboxTxn {
                terminals: txn.open_table(TERMINALS)?,
                inbox: txn.open_table(INBOX)?,
                wake: txn.open_table(WAKE)?,
                rows: HashMap::new(),
                trimmed: 0,
            };
            for (terminal, repair) in &self.inbox_repairs {
                terminals.repair(terminal, repair)?;
            }
            for (room, repair) in &self.repairs {
                if let Some(epoch) = &repair.create {
                    let flags = match (repair.keep_flags, row_mut(&mut rows, &rooms, room)?) {
                        (true, Ok(Some(row))) => row.flags,
                        _ => RoomFlags::default(),
                    };
                    delete_messages(&mut messages, room, u64::MAX)?;
                    rows.insert(
                        room.clone(),
                        Some(RoomRow {
                            flags,
                            ..fresh_row(epoch)
                        }),
                    );
                }
                if let Ok(Some(row)) = row_mut(&mut rows, &rooms, room)? {
                    row.seq = row.seq.max(repair.seq);
                    if let Some(flags) = repair.flags {
                        row.flags = flags;
                    }
                }
            }
            for job in jobs {
                let outcome = match &job.op {
                    Op::Append { room, .. } | Op::Reset { room, .. }
                        if job.reply.is_some()
                            && self.broken.contains(room)
                            && !recovered.contains(&room) =>
                    {
                        Err(Refused::Broken(room.clone()))
                    }
                    Op::Create { room, epoch } => {
                        delete_messages(&mut messages, room, u64::MAX)?;
                        rows.insert(room.clone(), Some(fresh_row(epoch)));
                        Ok(())
                    }
                    Op::Append {
                        room,
                        seq,
                        ts,
                        frame,
                        flags,
                    } => match row_mut(&mut rows, &rooms, room)? {
                        Ok(Some(row)) => {
                            row.seq = row.seq.max(*seq);
                            if let Some(flags) = flags {
                                row.flags = *flags;
                            }
                            let value = encode_message(*ts, frame);
                            messages.insert((room.as_str(), *seq), value.as_slice())?;
                            Ok(())
                        }
                        Ok(None) => Err(Refused::NoRecord(room.clone())),
                        Err(e) => Err(e),
                    },
                    Op::Flags { room, flags } => match row_mut(&mut rows, &rooms, room)? {
                        Ok(Some(row)) => {
                            row.flags = *flags;
                            Ok(())
                        }
                        Ok(None) => Err(Refused::NoRecord(room.clone())),
                        Err(e) => Err(e),
                    },
                    Op::Reset { room, epoch } | Op::Recover { room, epoch } => {
                        if matches!(job.op, Op::Recover { .. }) {
                            recovered.push(room);
                        }
                        let flags = match row_mut(&mut rows, &rooms, room)? {
                            Ok(Some(row)) => row.flags,
                            _ => RoomFlags::default(),
                        };
                        delete_messages(&mut messages, room, u64::MAX)?;
                        rows.insert(
                            room.clone(),
                            Some(RoomRow {
                                flags,
                                ..fresh_row(epoch)
                            }),
                        );
                        Ok(())
                    }
                    Op::Trim { room, keep_from } => {
                        trimmed += delete_messages(&mut messages, room, *keep_from)?;
                        Ok(())
                    }
                    Op::Forget { room, epoch } => match row_mut(&mut rows, &rooms, room)? {
                        Ok(Some(row)) if row.epoch == *epoch => {
                            trimmed += delete_messages(&mut messages, room, u64::MAX)?;
                            // Deleted when the touched records are written back.
                            rows.insert(room.clone(), None);
                            Ok(())
                        }
                        // Gone already, or a newer epoch: nothing to forget.
                        Ok(_) => Ok(()),
                        Err(e) => Err(e),
                    },
                    op => terminals.apply(op)?,
                };
                outcomes.push(outcome);
            }
            for (room, row) in rows {
                match row {
                    Some(row) => rooms.insert(room.as_str(), row.encode().as_slice())?,
                    // No record, or a forgotten one.
                    None => rooms.remove(room.as_str())?,
                };
            }
            trimmed += terminals.trimmed;
            reserved = terminals.finish(self.policy == DurabilityPolicy::None)?;
            if let Some(dirty) = marker {
                let mut meta = txn.open_table(META)?;
                meta.insert(META_DIRTY, [u8::from(dirty)].as_slice())?;
                meta.insert(META_INBOX_DIRTY, [u8::from(dirty)].as_slice())?;
            }
        }
        txn.commit()?;
        self.shared
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        for room in recovered {
            self.broken.remove(room);
        }
        for (terminal, r) in reserved {
            let known = self.unpublished.entry(terminal).or_default();
            *known = (*known).max(r);
        }
        self.shared
            .trimmed_bytes
            .fetch_add(trimmed, Ordering::Relaxed);
        Ok(outcomes)
    }
}

/// The terminal tables of one write transaction, and the terminal records it touched (written
/// back by [`InboxTxn::finish`]).
struct InboxTxn<'t> {
    terminals: Table<'t, &'static str, &'static [u8]>,
    inbox: Table<'t, (&'static str, u64), &'static [u8]>,
    wake: Table<'t, (&'static str, &'static str), &'static [u8]>,
    rows: HashMap<String, TerminalRow>,
    /// Bytes of inbox messages deleted.
    trimmed: u64,
}

impl InboxTxn<'_> {
    /// The terminal's record in this transaction, loaded on first use, created if missing.
    /// The inner error is a record that cannot be decoded (the op fails, the batch goes on).
    fn row(&mut self, terminal: &str) -> Result<Result<&mut TerminalRow, Refused>, ::redb::Error> {
        let entry = match self.rows.entry(terminal.to_owned()) {
            Entry::Occupied(entry) => return Ok(Ok(entry.into_mut())),
            Entry::Vacant(entry) => entry,
        };
        let row = match self.terminals.get(terminal)? {
            Some(value) => match TerminalRow::decode(value.value()) {
                Ok(row) => row,
                Err(reason) => {
                    return Ok(Err(Refused::Unreadable {
                        what: "terminal",
                        key: terminal.to_owned(),
                        reason,
                    }));
                }
            },
            None => TerminalRow::default(),
        };
        Ok(Ok(entry.insert(row)))
    }

    /// Delete the terminal's messages up to its acknowledged seq.
    fn delete_acked(&mut self, terminal: &str, acked: u64) -> Result<(), ::redb::Error> {
        self.trimmed += delete_messages(&mut self.inbox, terminal, acked.saturating_add(1))?;
        Ok(())
    }

    /// Re-apply what a failed batch owed the terminal's record.
    fn repair(&mut self, terminal: &str, repair: &InboxRepair) -> Result<(), ::redb::Error> {
        let acked = match self.row(terminal)? {
            Ok(row) => {
                row.acked = row.acked.max(repair.acked);
                row.seq = row.seq.max(repair.seq).max(row.acked);
                row.acked
            }
            Err(_) => return Ok(()),
        };
        self.delete_acked(terminal, acked)?;
        if let Some(registration) = &repair.wake {
            let value = encode_wake(registration);
            self.wake.insert((terminal, WAKE_UDP), value.as_slice())?;
        }
        Ok(())
    }

    /// Apply an inbox op (anything else is left alone).
    fn apply(&mut self, op: &Op) -> Result<Outcome, ::redb::Error> {
        match op {
            Op::AppendInbox {
                terminal,
                seq,
                ts,
                frame,
            } => {
                let acked = match self.row(terminal)? {
                    Ok(row) => {
                        row.seq = row.seq.max(*seq);
                        row.acked
                    }
                    Err(e) => return Ok(Err(e)),
                };
                // A seq the terminal already acknowledged has nothing left to deliver.
                if *seq > acked {
                    let value = encode_message(*ts, frame);
                    self.inbox
                        .insert((terminal.as_str(), *seq), value.as_slice())?;
                }
            }
            Op::AckInbox { terminal, seq } => {
                let acked = match self.row(terminal)? {
                    Ok(row) => {
                        row.acked = row.acked.max(*seq);
                        // Only a seq that was handed out can be acknowledged.
                        row.seq = row.seq.max(row.acked);
                        row.acked
                    }
                    Err(e) => return Ok(Err(e)),
                };
                self.delete_acked(terminal, acked)?;
            }
            Op::TrimInbox {
                terminal,
                keep_from,
            } => {
                self.trimmed += delete_messages(&mut self.inbox, terminal, *keep_from)?;
            }
            Op::SetWake {
                terminal,
                registration,
            } => {
                if let Err(e) = self.row(terminal)? {
                    return Ok(Err(e));
                }
                let value = encode_wake(registration);
                self.wake
                    .insert((terminal.as_str(), WAKE_UDP), value.as_slice())?;
            }
            _ => {}
        }
        Ok(Ok(()))
    }

    /// Write back the touched records; under `none` (`reserve`), raise each reservation that
    /// the record's seq went past (see "Inboxes under `none`" in `redb.rs`) and return every
    /// touched terminal's reservation.
    fn finish(mut self, reserve: bool) -> Result<Vec<(String, u64)>, ::redb::Error> {
        let mut reserved = Vec::new();
        for (terminal, mut row) in std::mem::take(&mut self.rows) {
            if reserve && row.seq > row.reserved {
                row.reserved = row.seq.saturating_add(INBOX_RESERVE_STEP);
            }
            self.terminals
                .insert(terminal.as_str(), row.encode().as_slice())?;
            if reserve {
                reserved.push((terminal, row.reserved));
            }
        }
        Ok(reserved)
    }
}

fn fresh_row(epoch: &str) -> RoomRow {
    RoomRow {
        epoch: epoch.to_owned(),
        seq: 0,
        flags: RoomFlags::default(),
    }
}

/// The room's record in this transaction, loaded on first use. The inner error is a record
/// that cannot be decoded (the op fails, the batch goes on).
fn row_mut<'r>(
    rows: &'r mut HashMap<String, Option<RoomRow>>,
    rooms: &Table<'_, &'static str, &'static [u8]>,
    room: &str,
) -> Result<Result<Option<&'r mut RoomRow>, Refused>, ::redb::Error> {
    if !rows.contains_key(room) {
        let row = match rooms.get(room)? {
            Some(v) => match RoomRow::decode(v.value()) {
                Ok(row) => Some(row),
                Err(reason) => {
                    return Ok(Err(Refused::Unreadable {
                        what: "room",
                        key: room.to_owned(),
                        reason,
                    }));
                }
            },
            None => None,
        };
        rows.insert(room.to_owned(), row);
    }
    Ok(Ok(rows.get_mut(room).and_then(Option::as_mut)))
}

/// Delete the room's messages with `seq < before`. Returns the bytes deleted.
fn delete_messages(
    messages: &mut Table<'_, (&'static str, u64), &'static [u8]>,
    room: &str,
    before: u64,
) -> Result<u64, ::redb::Error> {
    if before == 0 {
        return Ok(0);
    }
    let mut bytes = 0u64;
    let overhead = room.len() as u64 + 9;
    messages.retain_in((room, 0u64)..(room, before), |_, value| {
        bytes += value.len() as u64 + overhead;
        false
    })?;
    Ok(bytes)
}

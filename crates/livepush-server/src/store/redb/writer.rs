//! The writer thread: the only place write transactions happen.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use ::redb::{Durability, ReadableTable, Table};

use super::super::{RoomFlags, StoreError};
use super::tables::{MESSAGES, META, META_DIRTY, ROOMS, RoomRow, encode_message};
use super::{DurabilityPolicy, Job, Op, Shared, StoreOptions};

/// What to re-apply to a room record after a failed batch, so that the record never falls
/// behind what the hub already handed out (and delivered).
#[derive(Debug, Default)]
struct Repair {
    /// A `create_room` that failed: the room's epoch.
    create: Option<String>,
    /// Highest seq of a failed append.
    seq: u64,
    /// Flags of a failed update.
    flags: Option<RoomFlags>,
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
}

type Outcome = Result<(), String>;

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

    /// The next job, doing `none`'s periodic durable commit while waiting.
    fn next_job(&mut self) -> Option<Job> {
        if let Some(job) = self.carry.pop_front() {
            return Some(job);
        }
        loop {
            if !self.pending_nondurable {
                return self.rx.recv().ok();
            }
            let deadline = self.last_durable + self.checkpoint_interval;
            let now = Instant::now();
            if now < deadline {
                match self.rx.recv_timeout(deadline - now) {
                    Ok(job) => return Some(job),
                    Err(RecvTimeoutError::Disconnected) => return None,
                    Err(RecvTimeoutError::Timeout) => {}
                }
            }
            self.checkpoint();
        }
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
        } else {
            self.pending_nondurable = true;
        }
        self.repairs.clear();
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
                if self.dirty_on_disk && self.close_gate() {
                    marker = Some(false);
                }
            } else if writes && !self.dirty_on_disk {
                marker = Some(true);
            }
        }
        let durable = !none
            || flush
            || marker.is_some()
            || self.last_durable.elapsed() >= self.checkpoint_interval;
        let needed = writes
            || marker.is_some()
            || !self.repairs.is_empty()
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
                    let outcome = outcome.map_err(|e| {
                        tracing::warn!(path = %self.shared.path.display(), error = %e, "store write refused");
                        StoreError::Io(e)
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
                let message = format!("writing {}: {e}", self.shared.path.display());
                self.note_failure(&jobs);
                for job in jobs {
                    if let Some(reply) = job.reply {
                        let _ = reply.send(Err(StoreError::Io(message.clone())));
                    }
                }
                self.after_failure(&e);
                Err(StoreError::Io(message))
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
    fn open_gate(&mut self) {
        let mut gate = self.shared.gate.lock();
        if gate.early || gate.tx.is_none() {
            return;
        }
        while let Ok(job) = self.rx.try_recv() {
            self.carry.push_back(job);
        }
        for job in &mut self.carry {
            if job.op.is_write()
                && let Some(reply) = job.reply.take()
            {
                let _ = reply.send(Ok(()));
            }
        }
        gate.early = true;
    }

    /// Remember what a failed batch should have done to room records.
    fn note_failure(&mut self, jobs: &[Job]) {
        for job in jobs {
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
                Op::Append { room, seq, .. } => {
                    let r = self.repairs.entry(room.clone()).or_default();
                    r.seq = r.seq.max(*seq);
                }
                Op::Flags { room, flags } => {
                    self.repairs.entry(room.clone()).or_default().flags = Some(*flags);
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
        self.last_durable = Instant::now();
    }

    fn compact(&mut self) -> Result<bool, StoreError> {
        let mut guard = self.shared.db.write();
        let Some(db) = guard.as_mut() else {
            return Err(StoreError::Io(format!(
                "{} is unavailable",
                self.shared.path.display()
            )));
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
                let message = format!("compacting {}: {e}", self.shared.path.display());
                self.after_failure(&e);
                Err(StoreError::Io(message))
            }
            Err(_) => {
                self.reopen();
                Err(StoreError::Io(format!(
                    "compacting {} failed",
                    self.shared.path.display()
                )))
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
        let mut txn = db.begin_write()?;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        let mut outcomes = Vec::with_capacity(jobs.len());
        let mut trimmed = 0;
        {
            let mut rooms = txn.open_table(ROOMS)?;
            let mut messages = txn.open_table(MESSAGES)?;
            // Room records touched by this transaction, written back at the end. `None`: the
            // room has no record.
            let mut rows: HashMap<String, Option<RoomRow>> = HashMap::new();
            for (room, repair) in &self.repairs {
                if let Some(epoch) = &repair.create {
                    delete_messages(&mut messages, room, u64::MAX)?;
                    rows.insert(room.clone(), Some(fresh_row(epoch)));
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
                    } => match row_mut(&mut rows, &rooms, room)? {
                        Ok(Some(row)) => {
                            row.seq = row.seq.max(*seq);
                            let value = encode_message(*ts, frame);
                            messages.insert((room.as_str(), *seq), value.as_slice())?;
                            Ok(())
                        }
                        Ok(None) => Err(format!("room {room:?} has no record")),
                        Err(e) => Err(e),
                    },
                    Op::Flags { room, flags } => match row_mut(&mut rows, &rooms, room)? {
                        Ok(Some(row)) => {
                            row.flags = *flags;
                            Ok(())
                        }
                        Ok(None) => Err(format!("room {room:?} has no record")),
                        Err(e) => Err(e),
                    },
                    Op::Trim { room, keep_from } => {
                        trimmed += delete_messages(&mut messages, room, *keep_from)?;
                        Ok(())
                    }
                    _ => Ok(()),
                };
                outcomes.push(outcome);
            }
            for (room, row) in rows {
                if let Some(row) = row {
                    rooms.insert(room.as_str(), row.encode().as_slice())?;
                }
            }
            if let Some(dirty) = marker {
                let mut meta = txn.open_table(META)?;
                meta.insert(META_DIRTY, [u8::from(dirty)].as_slice())?;
            }
        }
        txn.commit()?;
        self.shared
            .trimmed_bytes
            .fetch_add(trimmed, Ordering::Relaxed);
        Ok(outcomes)
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
) -> Result<Result<Option<&'r mut RoomRow>, String>, ::redb::Error> {
    if !rows.contains_key(room) {
        let row = match rooms.get(room)? {
            Some(v) => match RoomRow::decode(v.value()) {
                Ok(row) => Some(row),
                Err(e) => return Ok(Err(format!("room {room:?}: {e}"))),
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

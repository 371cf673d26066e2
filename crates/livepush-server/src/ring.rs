//! A room's ring of delivered frames, which its members' writers read by position.
//!
//! Before the ring, delivering a message to a room of N members cost N pushes into N
//! outboxes: a lock, a queue slot and a reference count increment each (and the matching
//! pop and decrement when the writer took it). In a burst that was 13 % of the server's CPU
//! (docs/performance.md, "The fan-out path"). Now a delivery is one append here; each member's
//! outbox keeps a [`Cursor`] into the ring, and its writer copies what lies between its
//! cursor and the head straight into its write buffer, under this ring's lock, in runs.
//!
//! **Waking.** A writer that has read everything *parks* in the ring (the reader registers
//! itself in `waiting`); an append wakes every parked reader, once, and empties the list. A
//! reader that is behind is not parked and is not touched by an append: under a burst the
//! cost of a message no longer grows with the members that have not caught up.
//!
//! **Falling behind.** The ring keeps at most `capacity` frames (`--outbox-frames`, the same
//! soft limit a member's own queue has) and no more than `max_bytes` of them besides the
//! newest (`--outbox-max-bytes`): a room's memory is bounded whatever its members do. A
//! reader whose cursor fell behind the oldest kept
//! frame has *lagged*: the transient messages it missed are counted as dropped, and if it
//! missed reliable ones it gets a `prompt{room, seq}` with the highest of them first, and
//! pulls them from history, exactly what an outbox past its soft limit does.
//!
//! **Memory.** Frames are shared with the room's history (reliable) or only here
//! (transient). When every reader is parked (all caught up) an append first drops what is
//! kept: a quiet room's ring holds one frame, a busy room's at most `capacity`.
//!
//! Lock order: room → outbox → ring. Nothing here locks an outbox: waking goes through the
//! reader's [`Reader::wake`], which only wakes its task.

use std::collections::VecDeque;
use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::frame::{self, Frame, What};

/// How many entries of readers that left the parked list may hold beyond the parked ones.
const STALE_SLACK: usize = 64;

/// Who reads a ring: an outbox whose writer sleeps until there is something to write.
pub trait Reader: Send + Sync {
    /// Wake the reader's writer (it then reads its rings).
    fn wake(&self);
}

/// The ring of one room. See the module documentation.
pub struct Ring {
    inner: Mutex<Inner>,
    /// The position after the newest frame: lets a writer see without the lock whether it
    /// has something to read.
    head: AtomicU64,
    /// Bytes ever appended ([`Frame::len`] each): with a cursor's own count, how far behind
    /// a reader is, without the lock.
    appended: AtomicU64,
    /// `Inner::wakes`, readable without the lock: a reader whose park names it is still
    /// parked.
    wakes: AtomicU64,
    capacity: usize,
    max_bytes: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("Ring")
            .field("base", &inner.base)
            .field("kept", &inner.frames.len())
            .field("readers", &inner.readers)
            .field("parked", &inner.parked)
            .finish()
    }
}

struct Inner {
    /// Kept frames; `frames[0]` is at position `base`.
    frames: VecDeque<Frame>,
    base: u64,
    /// Transient frames at positions before `base`, and before the head.
    transients_before_base: u64,
    transients: u64,
    /// The highest reliable seq at positions before `base`, and before the head.
    reliable_before_base: u64,
    reliable: u64,
    /// Bytes of the kept frames, and of every frame before `base`.
    bytes: usize,
    bytes_before_base: u64,
    /// Readers parked since the last wake (some may have left since: a spare wake-up).
    waiting: Vec<Weak<dyn Reader>>,
    /// The emptied list of the last wake, kept for its capacity.
    spare: Vec<Weak<dyn Reader>>,
    /// How many wakes there were: a reader's park is current while it names this one.
    wakes: u64,
    /// Subscribed readers, and how many of them are parked now.
    readers: usize,
    parked: usize,
    /// Entries of `waiting` whose reader left since it parked.
    stale: usize,
}

/// A reader's place in a ring. Kept by the reader (under its own lock), passed back to every
/// call.
#[derive(Debug, Clone)]
pub struct Cursor {
    /// The next position to read.
    pos: u64,
    /// Transient frames before `pos`, as the ring counts them.
    transients: u64,
    /// The highest reliable seq the reader has had from this ring (or that was there when
    /// it subscribed).
    reliable: u64,
    /// Bytes before `pos`, as the ring counts them.
    bytes: u64,
    /// `Some(wakes)` while parked in that generation of `waiting`.
    parked: Option<u64>,
}

/// What a reader is handed, in order: first, when it lagged, the highest reliable seq it
/// missed (to prompt for), then runs of frames.
pub trait Sink {
    /// The reader lagged: `dropped` transient frames are gone, and reliable messages up to
    /// `prompt` (when it is `Some`) must be pulled.
    fn lagged(&mut self, dropped: u64, prompt: Option<u64>);
    /// Consecutive frames, oldest first, as the two slices of a ring's range.
    fn run(&mut self, a: &[Frame], b: &[Frame]);
}

impl Ring {
    /// A ring that keeps at most `capacity` frames and, beyond its newest frame,
    /// `max_bytes` of them.
    pub fn new(capacity: usize, max_bytes: usize) -> Ring {
        Ring {
            inner: Mutex::new(Inner {
                frames: VecDeque::new(),
                base: 0,
                transients_before_base: 0,
                transients: 0,
                reliable_before_base: 0,
                reliable: 0,
                bytes: 0,
                bytes_before_base: 0,
                waiting: Vec::new(),
                spare: Vec::new(),
                wakes: 0,
                readers: 0,
                parked: 0,
                stale: 0,
            }),
            head: AtomicU64::new(0),
            appended: AtomicU64::new(0),
            wakes: AtomicU64::new(0),
            capacity: capacity.max(1),
            max_bytes,
        }
    }

    /// Append a delivered frame and wake every parked reader. Called under the room's lock,
    /// so positions follow the room's delivery order.
    pub fn append(&self, frame: Frame) {
        let mut st = self.inner.lock();
        if st.parked == st.readers && !st.frames.is_empty() {
            // Everyone has read everything kept: nothing needs it any more.
            let n = st.frames.len();
            st.evict(n);
        } else {
            let mut n = st.frames.len().saturating_sub(self.capacity - 1);
            let mut bytes = st.bytes + frame.len();
            while bytes > self.max_bytes && n < st.frames.len() {
                bytes -= st.frames[n].len();
                n += 1;
            }
            // `n` counts from the front: the oldest `n` go (at least what the frame cap says).
            if n > 0 {
                st.evict(n);
            }
        }
        match frame.what() {
            What::Transient => st.transients += 1,
            What::Reliable { seq, .. } => st.reliable = st.reliable.max(*seq),
            _ => {}
        }
        st.bytes += frame.len();
        self.appended
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        st.frames.push_back(frame);
        let head = st.base + st.frames.len() as u64;
        self.head.store(head, Ordering::Release);
        self.wake_parked(st);
    }

    /// Wake every parked reader (they read, and park again if there was nothing).
    fn wake_parked(&self, mut st: parking_lot::MutexGuard<'_, Inner>) {
        if st.waiting.is_empty() {
            return;
        }
        let spare = std::mem::take(&mut st.spare);
        let mut woken = std::mem::replace(&mut st.waiting, spare);
        st.wakes += 1;
        self.wakes.store(st.wakes, Ordering::Release);
        st.parked = 0;
        st.stale = 0;
        drop(st);
        for reader in woken.drain(..) {
            if let Some(r) = reader.upgrade() {
                r.wake();
            }
        }
        let mut st = self.inner.lock();
        if st.spare.capacity() < woken.capacity() {
            st.spare = woken;
        }
    }

    /// Subscribe a reader at the head (it reads what is appended from now on), parked.
    pub fn subscribe(&self, me: Weak<dyn Reader>) -> Cursor {
        let mut st = self.inner.lock();
        st.readers += 1;
        let mut c = Cursor {
            pos: st.base + st.frames.len() as u64,
            transients: st.transients,
            reliable: st.reliable,
            bytes: st.bytes_before_base + st.bytes as u64,
            parked: None,
        };
        st.park(&mut c, me);
        c
    }

    /// The reader leaves the ring. Its entry in `waiting`, if it was parked, stays until the
    /// next wake; so that a quiet room with many viewers coming and going does not collect
    /// them, once more than half the list has left, everyone parked is woken (a spare
    /// wake-up: they find nothing and park again), which empties it.
    pub fn unsubscribe(&self, c: &Cursor) {
        let mut st = self.inner.lock();
        st.readers = st.readers.saturating_sub(1);
        if c.parked == Some(st.wakes) {
            st.parked = st.parked.saturating_sub(1);
            st.stale += 1;
            if st.stale > st.parked + STALE_SLACK {
                self.wake_parked(st);
            }
        }
    }

    /// Whether there is something at or after the cursor (no lock).
    pub fn pending(&self, c: &Cursor) -> bool {
        self.head.load(Ordering::Acquire) > c.pos
    }

    /// Whether there is something to read; if not, make sure the reader is parked, so that
    /// the next append wakes it (a reader can be woken with nothing to read: see
    /// [`Ring::unsubscribe`]). Without the lock when it is still parked.
    pub fn pending_or_park(&self, c: &mut Cursor, me: &Weak<dyn Reader>) -> bool {
        if self.pending(c) {
            return true;
        }
        if c.parked == Some(self.wakes.load(Ordering::Acquire)) {
            return false;
        }
        let mut st = self.inner.lock();
        if st.base + st.frames.len() as u64 > c.pos {
            return true;
        }
        st.park(c, me.clone());
        false
    }

    /// Bytes appended that the reader has not read (or lost) yet (no lock).
    pub fn behind(&self, c: &Cursor) -> u64 {
        self.appended
            .load(Ordering::Relaxed)
            .saturating_sub(c.bytes)
    }

    /// Hand the sink what lies from the cursor on, up to `max_bytes` (a frame counts its
    /// [`Frame::len`] plus one separator; with `force_first` the first frame goes whatever
    /// its size). A reader that read everything parks: the next append wakes it through
    /// `me`. Returns the bytes handed.
    pub fn read(
        &self,
        c: &mut Cursor,
        max_bytes: usize,
        force_first: bool,
        me: &Weak<dyn Reader>,
        sink: &mut dyn Sink,
    ) -> usize {
        if !self.pending_or_park(c, me) {
            return 0;
        }
        let mut st = self.inner.lock();
        if c.pos < st.base {
            let dropped = st.transients_before_base.saturating_sub(c.transients);
            let prompt = (st.reliable_before_base > c.reliable).then_some(st.reliable_before_base);
            if let Some(seq) = prompt {
                c.reliable = seq;
            }
            c.pos = st.base;
            c.transients = st.transients_before_base;
            c.bytes = st.bytes_before_base;
            sink.lagged(dropped, prompt);
        }
        let start = (c.pos - st.base) as usize;
        let mut end = start;
        let mut bytes = 0;
        while end < st.frames.len() {
            let f = &st.frames[end];
            if bytes + f.len() + 1 > max_bytes && !(force_first && end == start) {
                break;
            }
            bytes += f.len() + 1;
            c.bytes += f.len() as u64;
            match f.what() {
                What::Transient => c.transients += 1,
                What::Reliable { seq, .. } => c.reliable = c.reliable.max(*seq),
                _ => {}
            }
            end += 1;
        }
        if end > start {
            let (a, b) = frame::run_of(&st.frames, start..end);
            sink.run(a, b);
        }
        c.pos = st.base + end as u64;
        if end == st.frames.len() {
            st.park(c, me.clone());
        }
        bytes
    }

    /// Frames kept now.
    pub fn kept(&self) -> usize {
        self.inner.lock().frames.len()
    }

    /// Entries in the parked list (parked readers and some that left since).
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.inner.lock().waiting.len()
    }
}

impl Inner {
    /// Drop the `n` oldest frames, keeping the counts of what was before `base`.
    fn evict(&mut self, n: usize) {
        for f in self.frames.drain(..n) {
            self.bytes -= f.len();
            self.bytes_before_base += f.len() as u64;
            match f.what() {
                What::Transient => self.transients_before_base += 1,
                What::Reliable { seq, .. } => {
                    self.reliable_before_base = self.reliable_before_base.max(*seq)
                }
                _ => {}
            }
        }
        self.base += n as u64;
        if self.frames.is_empty() {
            // Give the memory back: most rooms are quiet most of the time.
            self.frames = VecDeque::new();
        }
    }

    /// Park a reader that has read everything, once per wake.
    fn park(&mut self, c: &mut Cursor, me: Weak<dyn Reader>) {
        if c.parked == Some(self.wakes) {
            return;
        }
        c.parked = Some(self.wakes);
        self.parked += 1;
        self.waiting.push(me);
    }
}

#[cfg(test)]
mod tests;

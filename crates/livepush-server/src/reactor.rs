//! A readiness loop that drives many connections from one task per core.
//!
//! Why not a tokio task per WebSocket: tokio gives every spawned task a cache-line aligned
//! cell (384 bytes around a 272-byte driver) and every registered socket a `ScheduledIo`
//! (256 bytes, also cache-line aligned). An idle connection needs neither; together they
//! were more than a third of its memory.
//!
//! Here a [`Shard`] owns the connections handed to it. Their sockets sit in an epoll set of
//! the shard's own (a `mio::Poll`), and that set is registered with tokio once: an epoll file
//! descriptor is itself readable whenever one of its sockets is ready. The shard's task
//! drains the set's events, marks the sockets ready, and polls those connections. A
//! connection's outbox wakes it through a small per-connection waker that queues its slot
//! number in the shard's woken list. So a connection costs its boxed state, a slot, and a
//! 32-byte waker.
//!
//! The epoll set is edge-triggered (mio's only mode), so a [`Socket`] remembers whether it
//! may be read or written and forgets it only when the kernel says "would block"; a
//! connection that stops reading while data is waiting must wake itself to come back.
//!
//! A shard is also its connections' only timer: every [`Sweep::period`] it offers each of
//! them a [`Tick`] (the time, and whether the server is shutting down), and polls those that
//! have something due.
//! No timer per connection, and no table of connections besides the shard's slots.
//!
//! There is one shard per tokio worker thread, and connections are dealt out round-robin.
//! A shard polls at most [`POLLS_PER_TURN`] connections before it yields to other tasks.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::{ArcWake, AtomicWaker, waker_ref};
use mio::{Events, Interest, Token};
use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// Connections a shard polls before it lets other tasks run. Small turns keep the rest of
/// the server (publish requests, handshakes) served while a burst is written out; a 10k × 1,000
/// burst measured the same at 16, 64 and 128.
pub const POLLS_PER_TURN: usize = 64;

/// Readiness events taken from the epoll set per system call.
const EVENTS_PER_CALL: usize = 1024;

/// A connection driven by a [`Reactor`].
pub trait Conn: Send + 'static {
    /// The connection's socket, for registration and readiness.
    fn socket(&mut self) -> &mut Socket;

    /// Do whatever can be done now. `Ready` once the connection has ended; it is then
    /// dropped. Wake-ups registered with `cx` bring the shard back to this connection.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()>;

    /// The shard's timer: see whether anything is due (a heartbeat, a deadline, the
    /// shutdown). `true` to be polled now.
    fn tick(&mut self, tick: &Tick) -> bool;

    /// The connection cannot be driven: the reactor stopped (the server is shutting down,
    /// `stopping`) before it could be adopted, or its socket could not join the epoll set.
    /// End it now, without waiting for the socket.
    fn abandon(&mut self, stopping: bool);

    /// The connection's id in log lines (`conn`), if it has one.
    fn id(&self) -> Option<u64> {
        None
    }
}

/// What a shard's timer tells each connection.
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    /// [`crate::clock::clock_ms`] at this tick.
    pub now_ms: u64,
    /// [`crate::clock::now_secs`] at this tick (wall clock, for token expiry).
    pub unix_secs: u64,
    /// The server is shutting down.
    pub stopping: bool,
}

/// How often a shard ticks.
#[derive(Debug, Clone, Copy)]
pub struct Sweep {
    pub period: Duration,
}

impl Sweep {
    /// Tick at a quarter of the shortest deadline the connections keep, between 10 ms and 1 s.
    pub fn new(deadlines: &[Duration]) -> Sweep {
        let shortest = deadlines
            .iter()
            .min()
            .copied()
            .unwrap_or(Duration::from_secs(4));
        Sweep {
            period: (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        }
    }
}

/// A nonblocking TCP socket in a shard's epoll set, with the readiness the set reported.
#[derive(Debug)]
pub struct Socket {
    stream: mio::net::TcpStream,
    /// [`READABLE`] and [`WRITABLE`]: the kernel has not said "would block" since it last
    /// reported the socket ready. [`CLOSED`]: it reported the end of the stream or an error.
    ready: u8,
}

const READABLE: u8 = 1;
const WRITABLE: u8 = 2;
/// Sticky: the peer closed or the socket failed. That is reported once, possibly in the
/// same event as data, so a short read or write must not forget the socket is ready: the
/// end of the stream (or the error) is still to be read.
const CLOSED: u8 = 4;

impl Socket {
    /// Take a socket from tokio. It must not be registered anywhere else.
    pub fn from_tokio(stream: tokio::net::TcpStream) -> io::Result<Socket> {
        let std = stream.into_std()?;
        // `into_std` leaves it nonblocking; say so anyway, the epoll set depends on it.
        std.set_nonblocking(true)?;
        Ok(Socket {
            stream: mio::net::TcpStream::from_std(std),
            // Until the set says otherwise, try: data may have arrived before registration.
            ready: READABLE | WRITABLE,
        })
    }

    /// Whether a read might find something (no "would block" since the last readiness).
    pub fn may_read(&self) -> bool {
        self.ready & READABLE != 0
    }

    /// Read into `buf`. `Ready(Ok(0))` is the end of the stream; `Pending` means the shard
    /// polls the connection again when data arrives.
    pub fn poll_read(&mut self, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if !self.may_read() {
            return Poll::Pending;
        }
        loop {
            match (&self.stream).read(buf) {
                Ok(n) => {
                    // A short read emptied the socket: skip the read that would say so.
                    // Data arriving later raises a new edge.
                    if n > 0 && n < buf.len() && self.ready & CLOSED == 0 {
                        self.ready &= !READABLE;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ready &= !READABLE;
                    return Poll::Pending;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Write from `buf`. `Pending` means the socket is full; the shard polls the connection
    /// again when it drains.
    pub fn poll_write(&mut self, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.ready & WRITABLE == 0 {
            return Poll::Pending;
        }
        loop {
            match (&self.stream).write(buf) {
                Ok(n) => {
                    if n < buf.len() && self.ready & CLOSED == 0 {
                        self.ready &= !WRITABLE;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ready &= !WRITABLE;
                    return Poll::Pending;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Send FIN. Best effort: the peer may be gone.
    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// Write all of `bytes` now if the socket takes it, without waiting. For a last word
    /// (a close frame) when nothing will poll this connection again.
    pub fn write_now(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.poll_write(bytes) {
                Poll::Ready(Ok(n)) if n > 0 => bytes = &bytes[n..],
                _ => return,
            }
        }
    }
}

/// What a connection reads and writes through: its [`Socket`] itself (plain TCP), or a layer
/// over it ([`crate::tls::Stream`]). The same edge-triggered contract either way: `Pending`
/// means the socket said "would block", and its readiness brings the connection back.
pub trait Wire: Send + 'static {
    /// The socket underneath, for registration and readiness.
    fn socket(&mut self) -> &mut Socket;
    /// Whether a read might find something without waiting for the socket.
    fn may_read(&self) -> bool;
    /// Read bytes for the connection. `Ready(Ok(0))` is the end of the stream.
    fn poll_read(&mut self, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    /// Take bytes from the connection (some may wait in the layer for [`Wire::poll_flush`]).
    fn poll_write(&mut self, buf: &[u8]) -> Poll<io::Result<usize>>;
    /// Write out what the layer holds. `Ready(Ok(true))` if it held something.
    fn poll_flush(&mut self) -> Poll<io::Result<bool>>;
    /// End the sending side (best effort).
    fn shutdown_write(&mut self);
    /// Write `bytes` now if the socket takes them, without waiting (a last word).
    fn write_now(&mut self, bytes: &[u8]);
}

impl Wire for Socket {
    fn socket(&mut self) -> &mut Socket {
        self
    }

    fn may_read(&self) -> bool {
        Socket::may_read(self)
    }

    fn poll_read(&mut self, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Socket::poll_read(self, buf)
    }

    fn poll_write(&mut self, buf: &[u8]) -> Poll<io::Result<usize>> {
        Socket::poll_write(self, buf)
    }

    /// Nothing is held: every write went to the socket.
    fn poll_flush(&mut self) -> Poll<io::Result<bool>> {
        Poll::Ready(Ok(false))
    }

    fn shutdown_write(&mut self) {
        Socket::shutdown_write(self)
    }

    fn write_now(&mut self, bytes: &[u8]) {
        Socket::write_now(self, bytes)
    }
}

/// The shards of one server, and the round-robin that deals connections to them.
#[derive(Debug)]
pub struct Reactor<C> {
    shards: Box<[Arc<Shared<C>>]>,
    next: AtomicUsize,
    /// Every shard task holds a receiver until it ends: `closed()` resolves once all have.
    alive: watch::Sender<()>,
}

impl<C: Conn> Reactor<C> {
    /// Start `shards` shard tasks on the current runtime. They end once `stop` is set and
    /// their last connection has ended.
    pub fn start(
        shards: usize,
        sweep: Sweep,
        stop: watch::Receiver<bool>,
    ) -> io::Result<Reactor<C>> {
        let (alive, shard_alive) = watch::channel(());
        let shards = (0..shards.max(1))
            .map(|_| {
                let shared = Arc::new(Shared {
                    queue: Mutex::new(Queue {
                        woken: Vec::new(),
                        incoming: Vec::new(),
                        closed: false,
                    }),
                    task: AtomicWaker::new(),
                    live: AtomicUsize::new(0),
                });
                let shard = Shard::new(shared.clone(), sweep)?;
                let run = shard.run(stop.clone());
                let shard_alive = shard_alive.clone();
                tokio::spawn(async move {
                    run.await;
                    drop(shard_alive);
                });
                Ok(shared)
            })
            .collect::<io::Result<Box<[_]>>>()?;
        Ok(Reactor {
            shards,
            next: AtomicUsize::new(0),
            alive,
        })
    }

    /// Resolves once every shard has ended: the server is stopping and every connection
    /// has ended (a WebSocket with its close frame written, or given up on).
    pub async fn ended(&self) {
        self.alive.closed().await
    }

    /// Connections in the shards' slots.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.live.load(Ordering::Relaxed))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hand a connection to a shard, which polls it from now on.
    pub fn adopt(&self, conn: C) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        let shared = &self.shards[i];
        let mut queue = shared.queue.lock();
        if queue.closed {
            drop(queue);
            let mut conn = conn;
            conn.abandon(true);
            return;
        }
        queue.incoming.push(Box::new(Entry { conn, waker: None }));
        drop(queue);
        shared.task.wake();
    }
}

/// What a shard shares with the rest of the server: its queue and its task's waker.
#[derive(Debug)]
struct Shared<C> {
    queue: Mutex<Queue<C>>,
    task: AtomicWaker,
    /// Connections in the shard's slots (read by [`Reactor::len`]).
    live: AtomicUsize,
}

#[derive(Debug)]
struct Queue<C> {
    /// Slots whose connection was woken.
    woken: Vec<u32>,
    /// Connections handed over, not yet in a slot.
    incoming: Vec<Box<Entry<C>>>,
    /// The shard's task has ended; nothing more can be adopted.
    closed: bool,
}

/// A connection in its slot.
#[derive(Debug)]
struct Entry<C> {
    conn: C,
    /// Set when the connection takes its slot.
    waker: Option<Arc<ConnWaker<C>>>,
}

/// Wakes one connection: queues its slot in the shard's woken list (once until polled).
#[derive(Debug)]
struct ConnWaker<C> {
    shard: Arc<Shared<C>>,
    slot: u32,
    /// In the woken list and not polled since: further wake-ups change nothing.
    queued: AtomicBool,
}

impl<C: Conn> ArcWake for ConnWaker<C> {
    fn wake_by_ref(this: &Arc<Self>) {
        if this.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let first = {
            let mut queue = this.shard.queue.lock();
            queue.woken.push(this.slot);
            queue.woken.len() == 1
        };
        if first {
            this.shard.task.wake();
        }
    }
}

/// How a shard's turn ended, when it did not go to sleep.
enum Turn {
    /// Stopping, and no connection left.
    Done,
    /// A turn's worth of polls done; more may be waiting.
    Yield,
}

/// One task's worth of connections: an epoll set of their sockets, and the slots they sit in.
struct Shard<C> {
    shared: Arc<Shared<C>>,
    epoll: AsyncFd<mio::Poll>,
    events: Events,
    slots: Vec<Option<Box<Entry<C>>>>,
    /// Empty slots, reused last-freed first.
    free: Vec<u32>,
    live: usize,
    ticks: tokio::time::Interval,
    stopping: bool,
    /// Slots to poll: woken, ready, or new. A slot may be here twice; the second poll finds
    /// nothing to do.
    run: VecDeque<u32>,
    /// The woken list's other buffer (swapped with the queue's to take it without copying).
    spare: Vec<u32>,
}

impl<C: Conn> Shard<C> {
    fn new(shared: Arc<Shared<C>>, sweep: Sweep) -> io::Result<Shard<C>> {
        let mut ticks = tokio::time::interval(sweep.period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // tokio 1.54 deprecated the safe constructors of `AsyncFd` in favour of `unsafe`
        // ones whose contract is: the descriptor stays open, and the same, for the
        // `AsyncFd`'s whole life. A `mio::Poll` owns its epoll descriptor and closes it only
        // when dropped, which `AsyncFd` does after deregistering, so the contract holds and
        // the workspace's `forbid(unsafe_code)` can stay.
        #[allow(deprecated)]
        let epoll = AsyncFd::with_interest(mio::Poll::new()?, tokio::io::Interest::READABLE)?;
        Ok(Shard {
            shared,
            epoll,
            events: Events::with_capacity(EVENTS_PER_CALL),
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            ticks,
            stopping: false,
            run: VecDeque::new(),
            spare: Vec::new(),
        })
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let stopped = stop.wait_for(|s| *s);
        let mut stopped = std::pin::pin!(stopped);
        loop {
            let turn = std::future::poll_fn(|cx| {
                if !self.stopping && stopped.as_mut().poll(cx).is_ready() {
                    self.stopping = true;
                    // Every connection hears of the shutdown now, not at the next tick.
                    self.sweep();
                }
                self.poll_turn(cx)
            })
            .await;
            match turn {
                Turn::Done => return,
                // `yield_now`, not a wake-up of our own: tokio runs a yielded task again only
                // after it has looked for I/O and timers. A task that re-woke itself would be
                // run again at once, and tokio looks for I/O only every 61 task polls: with a
                // shard busy turn after turn, a publish request (and the shard's own epoll set)
                // would wait 61 turns to be seen. Measured: with 512 polls per turn and no
                // deferral, a 10k × 1,000 burst ran at half the rate.
                Turn::Yield => tokio::task::yield_now().await,
            }
        }
    }

    /// One turn: adopt, take events and wake-ups, tick, poll up to [`POLLS_PER_TURN`]
    /// connections. `Pending` when there is nothing to do.
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<Turn> {
        let stopping = self.stopping;
        // Registered before the queue is read, so a wake-up after that read is not lost.
        self.shared.task.register(cx.waker());
        let mut polls = 0;
        loop {
            // Until `Pending`, which registers for the next tick.
            while self.ticks.poll_tick(cx).is_ready() {
                self.sweep();
            }
            self.take_queue();
            // While a turn's worth is queued, leave further events in the set for later: a
            // slot is queued again for every event, and the queue must stay bounded.
            let more_events = self.run.len() < POLLS_PER_TURN && self.take_events(cx);
            if self.run.is_empty() {
                if more_events {
                    continue;
                }
                if stopping && self.live == 0 {
                    let mut queue = self.shared.queue.lock();
                    if queue.incoming.is_empty() {
                        queue.closed = true;
                        return Poll::Ready(Turn::Done);
                    }
                    continue;
                }
                return Poll::Pending;
            }
            while let Some(slot) = self.run.pop_front() {
                self.poll_conn(slot);
                polls += 1;
                if polls == POLLS_PER_TURN {
                    return Poll::Ready(Turn::Yield);
                }
            }
        }
    }

    /// Put handed-over connections in slots, and queue the woken ones.
    fn take_queue(&mut self) {
        let incoming = {
            let mut queue = self.shared.queue.lock();
            std::mem::swap(&mut queue.woken, &mut self.spare);
            std::mem::take(&mut queue.incoming)
        };
        self.run.extend(self.spare.drain(..));
        for entry in incoming {
            self.insert(entry);
        }
    }

    /// Offer every connection a tick; queue those with something due.
    fn sweep(&mut self) {
        let tick = Tick {
            now_ms: crate::clock::clock_ms(),
            unix_secs: crate::clock::now_secs(),
            stopping: self.stopping,
        };
        for (slot, entry) in self.slots.iter_mut().enumerate() {
            let Some(entry) = entry else { continue };
            if entry.conn.tick(&tick) {
                self.run.push_back(slot as u32);
            }
        }
    }

    fn insert(&mut self, mut entry: Box<Entry<C>>) {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let registered = self.epoll.get_mut().registry().register(
            &mut entry.conn.socket().stream,
            Token(slot as usize),
            Interest::READABLE | Interest::WRITABLE,
        );
        if let Err(e) = registered {
            let conn = entry.conn.id();
            tracing::warn!(error = %e, conn, "cannot add a connection's socket to the epoll set");
            entry.conn.abandon(false);
            self.free.push(slot);
            return;
        }
        entry.waker = Some(Arc::new(ConnWaker {
            shard: self.shared.clone(),
            slot,
            queued: AtomicBool::new(false),
        }));
        if self.stopping {
            // Handed over after the shutdown sweep: it still gets its "going away".
            entry.conn.tick(&Tick {
                now_ms: crate::clock::clock_ms(),
                unix_secs: crate::clock::now_secs(),
                stopping: true,
            });
        }
        self.slots[slot as usize] = Some(entry);
        self.live += 1;
        self.shared.live.fetch_add(1, Ordering::Relaxed);
        self.run.push_back(slot);
    }

    /// Mark the sockets the epoll set reports ready and queue their connections. Returns
    /// whether the set may hold more events than one call took.
    fn take_events(&mut self, cx: &mut Context<'_>) -> bool {
        let Shard {
            epoll,
            events,
            slots,
            run,
            ..
        } = self;
        let mut guard = match epoll.poll_read_ready_mut(cx) {
            Poll::Pending => return false,
            Poll::Ready(Ok(guard)) => guard,
            Poll::Ready(Err(e)) => {
                tracing::error!(error = %e, "epoll set of a shard failed");
                return false;
            }
        };
        match guard.get_inner_mut().poll(events, Some(Duration::ZERO)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(e) => {
                tracing::error!(error = %e, "epoll_wait of a shard failed");
                guard.clear_ready();
                drop(guard);
                return matches!(epoll.poll_read_ready_mut(cx), Poll::Ready(Ok(_)));
            }
        }
        let mut taken = 0;
        for event in events.iter() {
            taken += 1;
            let slot = event.token().0;
            let Some(Some(entry)) = slots.get_mut(slot) else {
                continue;
            };
            let mut ready = 0;
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                ready |= READABLE;
            }
            if event.is_writable() || event.is_write_closed() || event.is_error() {
                ready |= WRITABLE;
            }
            if event.is_read_closed() || event.is_error() {
                ready |= CLOSED;
            }
            entry.conn.socket().ready |= ready;
            run.push_back(slot as u32);
        }
        if taken < EVENTS_PER_CALL {
            // All taken. tokio clears readiness only if no new edge came in meanwhile.
            guard.clear_ready();
            drop(guard);
            // Poll again: either a newer edge is there (take it), or this registers the
            // task's waker for the next one. A `Ready` poll registers nothing, so returning
            // after it would leave the shard deaf to its sockets.
            matches!(epoll.poll_read_ready_mut(cx), Poll::Ready(Ok(_)))
        } else {
            true
        }
    }

    fn poll_conn(&mut self, slot: u32) {
        let Some(Some(entry)) = self.slots.get_mut(slot as usize) else {
            return;
        };
        let Some(waker) = entry.waker.as_ref() else {
            return;
        };
        // Cleared before the poll: a wake-up during it queues the slot again.
        waker.queued.store(false, Ordering::Release);
        let waker = waker_ref(waker);
        let mut cx = Context::from_waker(&waker);
        if entry.conn.poll(&mut cx).is_ready() {
            // Closing the socket would take it out of the set too, unless its descriptor was
            // duplicated somewhere; then its events would reach whoever reuses the slot.
            let _ = self
                .epoll
                .get_mut()
                .registry()
                .deregister(&mut entry.conn.socket().stream);
            self.slots[slot as usize] = None;
            self.free.push(slot);
            self.live -= 1;
            self.shared.live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Echoes what it reads, upper-cased; ends at EOF. Counts its polls.
    struct Echo {
        socket: Socket,
        pending: Vec<u8>,
        polls: Arc<AtomicUsize>,
        abandoned: Arc<AtomicBool>,
    }

    impl Conn for Echo {
        fn socket(&mut self) -> &mut Socket {
            &mut self.socket
        }

        fn poll(&mut self, _cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            loop {
                while !self.pending.is_empty() {
                    match self.socket.poll_write(&self.pending) {
                        Poll::Ready(Ok(n)) => {
                            self.pending.drain(..n);
                        }
                        Poll::Ready(Err(_)) => return Poll::Ready(()),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                let mut buf = [0u8; 16];
                match self.socket.poll_read(&mut buf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Ready(Ok(n)) => self.pending.extend(buf[..n].to_ascii_uppercase()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        }

        fn tick(&mut self, _tick: &Tick) -> bool {
            false
        }

        fn abandon(&mut self, stopping: bool) {
            assert!(stopping);
            self.abandoned.store(true, Ordering::Relaxed);
        }
    }

    const SWEEP: Sweep = Sweep {
        period: Duration::from_secs(1),
    };

    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, server) = tokio::join!(client, listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    fn echo(server: tokio::net::TcpStream) -> (Echo, Arc<AtomicUsize>, Arc<AtomicBool>) {
        let polls = Arc::new(AtomicUsize::new(0));
        let abandoned = Arc::new(AtomicBool::new(false));
        let conn = Echo {
            socket: Socket::from_tokio(server).unwrap(),
            pending: Vec::new(),
            polls: polls.clone(),
            abandoned: abandoned.clone(),
        };
        (conn, polls, abandoned)
    }

    /// Data that arrives in pieces, before and after adoption, comes back whole: readiness
    /// edges reach the connection through the nested epoll set. Reads larger than the
    /// connection's 16-byte buffer need several polls from one edge.
    #[tokio::test]
    async fn drives_connections_through_the_epoll_set() {
        let (_stop_tx, stop) = watch::channel(false);
        let reactor = Reactor::<Echo>::start(1, SWEEP, stop).unwrap();
        let mut clients = Vec::new();
        for _ in 0..3 {
            let (mut client, server) = pair().await;
            client.write_all(b"before ").await.unwrap();
            reactor.adopt(echo(server).0);
            clients.push(client);
        }
        for client in &mut clients {
            client
                .write_all(b"and after, longer than one read")
                .await
                .unwrap();
            let mut got = vec![0u8; 38];
            tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut got))
                .await
                .expect("echo in time")
                .unwrap();
            assert_eq!(&got, b"BEFORE AND AFTER, LONGER THAN ONE READ");
        }
    }

    /// Data and the end of the stream that arrive together (one epoll event) are both read:
    /// the short read of the data must not make the socket forget the end behind it.
    #[tokio::test]
    async fn data_and_end_in_one_event_are_both_read() {
        let (_stop_tx, stop) = watch::channel(false);
        let reactor = Reactor::<Echo>::start(1, SWEEP, stop).unwrap();
        let (mut client, server) = pair().await;
        reactor.adopt(echo(server).0);
        client.write_all(b"a").await.unwrap();
        let mut got = [0u8; 1];
        client.read_exact(&mut got).await.unwrap();
        // On this current-thread runtime the shard cannot run between these two: both reach
        // the server before it looks.
        client.write_all(b"xyz").await.unwrap();
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .expect("the server sees the end and closes")
            .unwrap();
        assert_eq!(rest, b"XYZ");
        assert!(reactor.is_empty());
    }

    /// A connection that ends is dropped (its socket closed), and its slot is reused.
    #[tokio::test]
    async fn ended_connections_free_their_slot() {
        let (_stop_tx, stop) = watch::channel(false);
        let reactor = Reactor::<Echo>::start(1, SWEEP, stop).unwrap();
        let (mut first, server) = pair().await;
        reactor.adopt(echo(server).0);
        first.shutdown().await.unwrap();
        let mut rest = Vec::new();
        // The server side closes once it sees EOF.
        tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut rest))
            .await
            .expect("closed in time")
            .unwrap();
        let (mut second, server) = pair().await;
        reactor.adopt(echo(server).0);
        second.write_all(b"x").await.unwrap();
        let mut got = [0u8; 1];
        second.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"X");
        let shard = &reactor.shards[0];
        assert!(shard.queue.lock().incoming.is_empty());
    }

    /// A wake-up from elsewhere (an outbox) brings the shard back to exactly that connection.
    #[tokio::test]
    async fn a_waker_polls_its_connection() {
        struct Woken {
            socket: Socket,
            waker: Arc<Mutex<Option<std::task::Waker>>>,
            polls: Arc<AtomicUsize>,
        }
        impl Conn for Woken {
            fn socket(&mut self) -> &mut Socket {
                &mut self.socket
            }
            fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
                self.polls.fetch_add(1, Ordering::Relaxed);
                *self.waker.lock() = Some(cx.waker().clone());
                Poll::Pending
            }
            fn tick(&mut self, _tick: &Tick) -> bool {
                false
            }
            fn abandon(&mut self, _stopping: bool) {}
        }
        let (_stop_tx, stop) = watch::channel(false);
        let reactor = Reactor::<Woken>::start(1, SWEEP, stop).unwrap();
        let (_client, server) = pair().await;
        let waker = Arc::new(Mutex::new(None));
        let polls = Arc::new(AtomicUsize::new(0));
        reactor.adopt(Woken {
            socket: Socket::from_tokio(server).unwrap(),
            waker: waker.clone(),
            polls: polls.clone(),
        });
        let wait_for = |n: usize| {
            let polls = polls.clone();
            async move {
                while polls.load(Ordering::Relaxed) < n {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait_for(1))
            .await
            .unwrap();
        let before = polls.load(Ordering::Relaxed);
        let w = waker.lock().clone().unwrap();
        // Woken twice before the shard gets to it: one poll.
        w.wake_by_ref();
        w.wake_by_ref();
        tokio::time::timeout(Duration::from_secs(5), wait_for(before + 1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(polls.load(Ordering::Relaxed), before + 1);
    }

    /// The shard's timer reaches every connection every period, and the shutdown comes as
    /// soon as the stop is set; a connection asking to be polled is. The shard ends once they
    /// are all gone.
    #[tokio::test]
    async fn ticks_reach_every_connection_and_carry_the_shutdown() {
        #[derive(Default)]
        struct Seen {
            ticks: usize,
            stopping: bool,
        }
        struct Ticked {
            socket: Socket,
            seen: Arc<Mutex<Seen>>,
        }
        impl Conn for Ticked {
            fn socket(&mut self) -> &mut Socket {
                &mut self.socket
            }
            fn poll(&mut self, _cx: &mut Context<'_>) -> Poll<()> {
                if self.seen.lock().stopping {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }
            fn tick(&mut self, tick: &Tick) -> bool {
                let mut seen = self.seen.lock();
                seen.ticks += 1;
                seen.stopping |= tick.stopping;
                tick.stopping
            }
            fn abandon(&mut self, _stopping: bool) {}
        }
        let sweep = Sweep {
            period: Duration::from_millis(10),
        };
        let (stop_tx, stop) = watch::channel(false);
        let reactor = Reactor::<Ticked>::start(1, sweep, stop).unwrap();
        let mut seen = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..2 {
            let (client, server) = pair().await;
            let s = Arc::new(Mutex::new(Seen::default()));
            reactor.adopt(Ticked {
                socket: Socket::from_tokio(server).unwrap(),
                seen: s.clone(),
            });
            seen.push(s);
            clients.push(client);
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while seen.iter().any(|s| s.lock().ticks < 3) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("ticks");
        assert!(seen.iter().all(|s| !s.lock().stopping));
        assert_eq!(reactor.len(), 2);
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !reactor.shards[0].queue.lock().closed {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the shard ends once its connections have");
        assert!(seen.iter().all(|s| s.lock().stopping));
        assert!(reactor.is_empty());
        tokio::time::timeout(Duration::from_secs(5), reactor.ended())
            .await
            .expect("ended() resolves once every shard has ended");
    }

    /// Once stopped with nothing left, a shard ends, and a late connection is abandoned
    /// rather than left unpolled.
    #[tokio::test]
    async fn a_stopped_shard_abandons_late_connections() {
        let (stop_tx, stop) = watch::channel(false);
        let reactor = Reactor::<Echo>::start(1, SWEEP, stop).unwrap();
        stop_tx.send(true).unwrap();
        let closed = || reactor.shards[0].queue.lock().closed;
        tokio::time::timeout(Duration::from_secs(5), async {
            while !closed() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the shard ends");
        let (_client, server) = pair().await;
        let (conn, polls, abandoned) = echo(server);
        reactor.adopt(conn);
        assert!(abandoned.load(Ordering::Relaxed));
        assert_eq!(polls.load(Ordering::Relaxed), 0);
    }
}

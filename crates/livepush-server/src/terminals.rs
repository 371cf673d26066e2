//! The service list: every terminal this node has seen, whether it is online and over what,
//! when it was last seen, and how often its WebSocket sessions were interrupted.
//!
//! Interruptions drive the move to long-polling: a terminal whose WebSocket sessions ended
//! without a close frame (TCP reset or end, heartbeat timeout) more than `flap_threshold`
//! times within `flap_window` is told to use long-polling for `flap_longpoll_for`. Clean
//! closes never count, so a terminal that connects briefly and leaves properly (a woken
//! terminal, a user closing the page) is never moved.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use livepush_proto::Transport;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use crate::clock::now_ms;
use crate::engine::TerminalPresence;

/// How often at most a terminal whose shared view did not change is shared again (to
/// refresh its `last_seen` on other nodes): see [`Terminals::take_changed`].
pub const SHARE_REFRESH: Duration = Duration::from_secs(30);

/// Settings of the flap detector and of long-poll presence.
#[derive(Debug, Clone, Copy)]
pub struct TerminalSettings {
    pub flap_threshold: u32,
    pub flap_window: Duration,
    pub flap_longpoll_for: Duration,
    /// How long a long-poll terminal counts as online after its last poll ended.
    pub poll_grace: Duration,
    /// How long an offline terminal stays on the list.
    pub retention: Duration,
}

/// One terminal on the list. There is one per connected terminal (and per recently seen
/// one), so it is kept small: times are [`Terminals::clock`] milliseconds (`u64`, 0 for
/// never) instead of `Option<Instant>`, and the flap detector's state is out of line and
/// only there while it has something to say, since almost no terminal is ever interrupted.
#[derive(Debug, Default)]
struct Entry {
    // Sessions over each transport: a process holds far fewer than 65,535 sockets.
    ws: u16,
    sse: u16,
    polls: u16,
    /// The [`Entry::shape`] of the view last shared with other nodes (0: never shared).
    shared_shape: u8,
    /// When the terminal last said `bye` over long-polling: the low 32 bits of
    /// [`Terminals::clock`] (0: never), compared with wrapping arithmetic. In the padding
    /// beside the counters, so the entry does not grow.
    bye_at: u32,
    /// When the view was last shared with other nodes, in whole seconds of
    /// [`Terminals::clock`]. With `shared_shape`, in the padding: the entry does not grow.
    shared_at: u32,
    /// A long-poll terminal stays online until then after its last poll.
    poll_grace_until: u64,
    /// Wall clock, for the API.
    last_seen_ms: u64,
    /// Monotonic, for the retention.
    last_seen: u64,
    /// `None` while the terminal has no interruption within the window and is not held on
    /// long-polling: saves the (empty) queue in every entry.
    flaps: Option<Box<Flaps>>,
}

/// The flap detector's state of one terminal.
#[derive(Debug, Default)]
struct Flaps {
    /// When WebSocket sessions ended without a close frame, oldest first.
    interruptions: VecDeque<u64>,
    /// WebSocket connects are answered with long-polling until then (0: never).
    longpoll_until: u64,
}

impl Flaps {
    fn prune(&mut self, now: u64, window: u64) {
        while self
            .interruptions
            .front()
            .is_some_and(|t| now.saturating_sub(*t) > window)
        {
            self.interruptions.pop_front();
        }
    }
}

impl Entry {
    /// What other nodes read from a shared view without a clock: over which transports the
    /// terminal is online, and whether that hangs on a long-poll grace period (whose end
    /// moves with every poll). Bit 7 is set so that 0 means "never shared".
    fn shape(&self, now: u64) -> u8 {
        0x80 | u8::from(self.ws > 0)
            | u8::from(self.sse > 0) << 1
            | u8::from(self.polls > 0) << 2
            | u8::from(self.polls == 0 && self.poll_grace_until > now) << 3
            | u8::from(self.flaps.is_some()) << 4
    }

    fn online(&self, now: u64) -> bool {
        self.ws > 0 || self.sse > 0 || self.polls > 0 || self.poll_grace_until > now
    }

    fn transports(&self, now: u64) -> Vec<Transport> {
        let mut t = Vec::new();
        if self.ws > 0 {
            t.push(Transport::Ws);
        }
        if self.polls > 0 || self.poll_grace_until > now {
            t.push(Transport::Longpoll);
        }
        if self.sse > 0 {
            t.push(Transport::Sse);
        }
        t
    }

    /// Drops interruptions older than the window, and the flap state with them once it is
    /// empty and the terminal is no longer held on long-polling.
    fn prune(&mut self, now: u64, window: u64) {
        if let Some(f) = &mut self.flaps {
            f.prune(now, window);
            if f.interruptions.is_empty() && f.longpoll_until < now {
                self.flaps = None;
            }
        }
    }

    /// WebSocket interruptions within the window.
    fn interruptions(&self, now: u64, window: u64) -> u32 {
        self.flaps.as_ref().map_or(0, |f| {
            f.interruptions
                .iter()
                .filter(|t| now.saturating_sub(**t) <= window)
                .count() as u32
        })
    }

    /// How long WebSocket connects are still answered with long-polling.
    fn longpoll_for(&self, now: u64) -> Option<u64> {
        let until = self.flaps.as_ref()?.longpoll_until;
        (until >= now).then(|| until - now)
    }
}

/// A duration in milliseconds, saturating.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What the terminals API shows of one terminal.
#[derive(Debug, Clone, Serialize)]
pub struct TerminalView {
    pub terminal: String,
    pub online: bool,
    pub transports: Vec<Transport>,
    pub last_seen_ms: u64,
    pub interruptions: Interruptions,
}

/// The flap detector's view of a terminal.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Interruptions {
    /// Interruptions within the window.
    pub count: u32,
    pub window_ms: u64,
    pub threshold: u32,
    /// While set, WebSocket connects are answered with `transport` (ms left).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub longpoll_for_ms: Option<u64>,
}

/// The service list.
#[derive(Debug)]
pub struct Terminals {
    map: Mutex<HashMap<Arc<str>, Entry>>,
    settings: TerminalSettings,
    /// Where [`Terminals::clock`] counts from.
    origin: Instant,
    /// Terminals whose presence changed since [`Terminals::take_changed`], when the list is
    /// shared between nodes (`None` on one node: nothing to collect).
    changed: Option<Mutex<HashSet<Arc<str>>>>,
}

/// See [`Terminals::online_counts`].
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
pub struct OnlineCounts {
    pub online: u64,
    pub ws: u64,
    pub longpoll: u64,
    pub sse: u64,
}

impl Terminals {
    pub fn new(settings: TerminalSettings) -> Terminals {
        Terminals {
            map: Mutex::new(HashMap::new()),
            settings,
            origin: Instant::now(),
            changed: None,
        }
    }

    /// How long an offline terminal stays on the list.
    pub fn retention(&self) -> Duration {
        self.settings.retention
    }

    /// A list shared with other nodes: changes are collected for [`Terminals::take_changed`].
    pub fn shared(settings: TerminalSettings) -> Terminals {
        Terminals {
            changed: Some(Mutex::new(HashSet::new())),
            ..Terminals::new(settings)
        }
    }

    fn mark(&self, id: &Arc<str>) {
        if let Some(c) = &self.changed {
            c.lock().insert(id.clone());
        }
    }

    /// What this node knows now of each terminal whose presence changed since the last call
    /// in a way other nodes can see. A long-poll terminal opens and ends a poll for every
    /// answer, and each marks it changed; while its polls follow one another, other nodes
    /// read the same thing ("online over long-polling") from the view already shared, so it
    /// is shared again only when its [`Entry::shape`] changes, or to refresh its
    /// `last_seen` every [`SHARE_REFRESH`] (what other nodes show lags by at most that).
    /// A view hanging on a grace period, or with interruptions, is always shared.
    pub fn take_changed(&self) -> Vec<(Arc<str>, TerminalPresence)> {
        let Some(changed) = &self.changed else {
            return Vec::new();
        };
        let ids = std::mem::take(&mut *changed.lock());
        let (now, wall) = (self.clock(), now_ms());
        let secs = (now / 1000) as u32;
        let window = ms(self.settings.flap_window);
        let mut map = self.map.lock();
        ids.into_iter()
            .filter_map(|id| {
                let e = map.get_mut(&id)?;
                let shape = e.shape(now);
                let steady = shape == e.shared_shape
                    && shape & 0x18 == 0
                    && secs.saturating_sub(e.shared_at) < SHARE_REFRESH.as_secs() as u32;
                if steady {
                    return None;
                }
                e.shared_shape = shape;
                e.shared_at = secs;
                let p = TerminalPresence {
                    ws: e.ws.into(),
                    sse: e.sse.into(),
                    polls: e.polls.into(),
                    grace_until_ms: e
                        .poll_grace_until
                        .checked_sub(now)
                        .filter(|left| *left > 0)
                        .map_or(0, |left| wall + left),
                    last_seen_ms: e.last_seen_ms,
                    interruptions: e.interruptions(now, window),
                };
                Some((id, p))
            })
            .collect()
    }

    /// Monotonic milliseconds since `origin`, plus one so that 0 is free to mean "never".
    /// Entries store these rather than `Instant`s to stay small.
    fn clock(&self) -> u64 {
        ms(self.origin.elapsed()).saturating_add(1)
    }

    fn touch<'a>(map: &'a mut HashMap<Arc<str>, Entry>, id: &Arc<str>, now: u64) -> &'a mut Entry {
        let e = map.entry(id.clone()).or_default();
        e.last_seen_ms = now_ms();
        e.last_seen = now;
        e
    }

    /// A session opened.
    pub fn opened(&self, id: &Arc<str>, transport: Transport) {
        let mut map = self.map.lock();
        let now = self.clock();
        self.mark(id);
        let e = Self::touch(&mut map, id, now);
        match transport {
            Transport::Ws => e.ws = e.ws.saturating_add(1),
            Transport::Sse => e.sse = e.sse.saturating_add(1),
            Transport::Longpoll => {
                e.polls = e.polls.saturating_add(1);
                e.poll_grace_until = 0;
            }
        }
    }

    /// A session closed. `interrupted`: a WebSocket session ended without a close frame.
    pub fn closed(&self, id: &Arc<str>, transport: Transport, interrupted: bool) {
        let mut map = self.map.lock();
        let settings = self.settings;
        let now = self.clock();
        self.mark(id);
        let e = Self::touch(&mut map, id, now);
        match transport {
            Transport::Ws => {
                e.ws = e.ws.saturating_sub(1);
                if interrupted {
                    let f = e.flaps.get_or_insert_default();
                    f.interruptions.push_back(now);
                    f.prune(now, ms(settings.flap_window));
                    if f.interruptions.len() as u32 > settings.flap_threshold {
                        f.longpoll_until = now.saturating_add(ms(settings.flap_longpoll_for));
                        tracing::info!(terminal = %id, "moving a flapping terminal to long-polling");
                    }
                }
            }
            Transport::Sse => e.sse = e.sse.saturating_sub(1),
            Transport::Longpoll => {
                e.polls = e.polls.saturating_sub(1);
                e.poll_grace_until = now.saturating_add(ms(settings.poll_grace));
            }
        }
    }

    /// A long-poll terminal said `bye`: its presence over long-polling ends now, without the
    /// grace period (other open sessions still count).
    pub fn bye(&self, id: &Arc<str>) {
        self.leave_now(id, true);
    }

    /// A poll that began before the terminal's `bye` ended: no grace period for it either.
    pub fn after_bye(&self, id: &Arc<str>) {
        self.leave_now(id, false);
    }

    fn leave_now(&self, id: &Arc<str>, stamp: bool) {
        let mut map = self.map.lock();
        let now = self.clock();
        self.mark(id);
        let e = Self::touch(&mut map, id, now);
        e.poll_grace_until = 0;
        if stamp {
            e.bye_at = (now as u32).max(1);
        }
    }

    /// A stamp of now, to ask [`Terminals::said_bye_since`] later (a poll's start).
    pub fn stamp(&self) -> u32 {
        self.clock() as u32
    }

    /// Whether the terminal said `bye` since `stamp`: a poll it abandoned before saying bye
    /// must not bring it back for the grace period when the server notices the poll ended.
    pub fn said_bye_since(&self, id: &str, stamp: u32) -> bool {
        let map = self.map.lock();
        map.get(id)
            .is_some_and(|e| e.bye_at != 0 && (e.bye_at.wrapping_sub(stamp) as i32) >= 0)
    }

    /// Whether the terminal has a session open, or polled within the grace period.
    pub fn is_online(&self, id: &str) -> bool {
        let map = self.map.lock();
        map.get(id).is_some_and(|e| e.online(self.clock()))
    }

    /// If the terminal should not use WebSocket now: how long until it may try again.
    /// `elsewhere`: the interruptions other nodes saw within the window (behind a balancer
    /// a flapping terminal's sessions are spread over the nodes); with this node's own above
    /// the threshold, the terminal is moved to long-polling here too.
    pub fn longpoll_for(&self, id: &str, elsewhere: u32) -> Option<Duration> {
        let mut map = self.map.lock();
        let now = self.clock();
        let e = map.get_mut(id)?;
        if let Some(left) = e.longpoll_for(now) {
            return Some(Duration::from_millis(left));
        }
        let seen = e.interruptions(now, ms(self.settings.flap_window));
        if elsewhere == 0 || seen + elsewhere <= self.settings.flap_threshold {
            return None;
        }
        let hold = self.settings.flap_longpoll_for;
        e.flaps.get_or_insert_default().longpoll_until = now.saturating_add(ms(hold));
        self.mark(&Arc::from(id));
        tracing::info!(terminal = %id, seen, elsewhere, "moving a terminal flapping across nodes to long-polling");
        Some(hold)
    }

    /// Whether this node saw the terminal's WebSocket sessions interrupted within the flap
    /// window: only then is it worth asking what other nodes saw.
    pub fn interrupted(&self, id: &str) -> bool {
        let map = self.map.lock();
        map.get(id)
            .is_some_and(|e| e.interruptions(self.clock(), ms(self.settings.flap_window)) > 0)
    }

    pub fn flap_window(&self) -> Duration {
        self.settings.flap_window
    }

    /// The interruption counters of a terminal never seen by this process.
    pub fn empty_interruptions(&self) -> Interruptions {
        Interruptions {
            count: 0,
            window_ms: ms(self.settings.flap_window),
            threshold: self.settings.flap_threshold,
            longpoll_for_ms: None,
        }
    }

    pub fn view(&self, id: &str) -> Option<TerminalView> {
        let mut map = self.map.lock();
        let now = self.clock();
        let e = map.get_mut(id)?;
        e.prune(now, ms(self.settings.flap_window));
        Some(self.render(id, e, now))
    }

    /// Terminals online on this node: in all, and over each transport (WebSocket,
    /// long-polling, SSE; a terminal may use several), for the admin page.
    pub fn online_counts(&self) -> OnlineCounts {
        let map = self.map.lock();
        let now = self.clock();
        let mut c = OnlineCounts::default();
        for e in map.values().filter(|e| e.online(now)) {
            c.online += 1;
            c.ws += u64::from(e.ws > 0);
            c.longpoll += u64::from(e.polls > 0 || e.poll_grace_until > now);
            c.sse += u64::from(e.sse > 0);
        }
        c
    }

    pub fn list(&self, online_only: bool) -> Vec<TerminalView> {
        let map = self.map.lock();
        let now = self.clock();
        let mut out: Vec<TerminalView> = map
            .iter()
            .filter(|(_, e)| !online_only || e.online(now))
            .map(|(id, e)| self.render(id, e, now))
            .collect();
        out.sort_by(|a, b| a.terminal.cmp(&b.terminal));
        out
    }

    fn render(&self, id: &str, e: &Entry, now: u64) -> TerminalView {
        let window = ms(self.settings.flap_window);
        TerminalView {
            terminal: id.to_owned(),
            online: e.online(now),
            transports: e.transports(now),
            last_seen_ms: e.last_seen_ms,
            interruptions: Interruptions {
                count: e.interruptions(now, window),
                window_ms: window,
                threshold: self.settings.flap_threshold,
                longpoll_for_ms: e.longpoll_for(now),
            },
        }
    }

    /// Forget terminals offline for longer than the retention, and release the flap state
    /// of those no longer flapping. On a shared list, an online terminal whose view was
    /// shared more than half the retention ago is shared again: other nodes forget views
    /// older than the retention, and a WebSocket terminal may stay connected for days.
    pub fn sweep(&self) {
        let now = self.clock();
        let retention = ms(self.settings.retention);
        let window = ms(self.settings.flap_window);
        let stale = (retention / 2000) as u32;
        let mut refresh = Vec::new();
        self.map.lock().retain(|id, e| {
            e.prune(now, window);
            let online = e.online(now);
            if online
                && self.changed.is_some()
                && ((now / 1000) as u32).saturating_sub(e.shared_at) >= stale
            {
                e.shared_shape = 0;
                refresh.push(id.clone());
            }
            online || (e.last_seen != 0 && now.saturating_sub(e.last_seen) < retention)
        });
        for id in &refresh {
            self.mark(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TerminalSettings {
        TerminalSettings {
            flap_threshold: 2,
            flap_window: Duration::from_secs(60),
            flap_longpoll_for: Duration::from_secs(30),
            poll_grace: Duration::from_millis(50),
            retention: Duration::from_secs(3600),
        }
    }

    #[test]
    fn interruptions_above_threshold_move_to_longpoll_and_clean_closes_do_not() {
        let t = Terminals::new(settings());
        let id: Arc<str> = Arc::from("t");
        for _ in 0..10 {
            t.opened(&id, Transport::Ws);
            t.closed(&id, Transport::Ws, false);
        }
        assert!(t.longpoll_for("t", 0).is_none(), "clean closes never count");
        for _ in 0..2 {
            t.opened(&id, Transport::Ws);
            t.closed(&id, Transport::Ws, true);
        }
        assert!(
            t.longpoll_for("t", 0).is_none(),
            "at the threshold: not yet"
        );
        t.opened(&id, Transport::Ws);
        t.closed(&id, Transport::Ws, true);
        assert!(t.longpoll_for("t", 0).is_some());
        let v = t.view("t").unwrap();
        assert_eq!(v.interruptions.count, 3);
        assert!(!v.online);
    }

    #[tokio::test]
    async fn long_poll_terminals_stay_online_for_the_grace() {
        let t = Terminals::new(settings());
        let id: Arc<str> = Arc::from("p");
        t.opened(&id, Transport::Longpoll);
        t.closed(&id, Transport::Longpoll, false);
        assert!(t.view("p").unwrap().online);
        assert_eq!(t.list(true).len(), 1);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(!t.view("p").unwrap().online);
        assert!(t.list(true).is_empty());
        assert_eq!(t.list(false).len(), 1);
    }

    /// There is one entry per terminal on the list; it was 104 bytes with `Instant`s and an
    /// inline `VecDeque`. Keep it from growing back.
    #[test]
    fn a_shared_list_hands_over_each_change_once() {
        assert!(Terminals::new(settings()).take_changed().is_empty());
        let t = Terminals::shared(settings());
        let id: Arc<str> = Arc::from("t");
        t.opened(&id, Transport::Ws);
        t.opened(&id, Transport::Longpoll);
        let changed = t.take_changed();
        assert_eq!(changed.len(), 1, "one entry per terminal");
        let (got, p) = &changed[0];
        assert_eq!((&**got, p.ws, p.polls, p.grace_until_ms), ("t", 1, 1, 0));
        assert!(p.online(now_ms()));
        assert!(t.take_changed().is_empty(), "nothing changed since");
        t.closed(&id, Transport::Ws, false);
        t.closed(&id, Transport::Longpoll, false);
        let (_, p) = t.take_changed().pop().expect("changed");
        assert_eq!((p.ws, p.polls), (0, 0));
        assert!(p.grace_until_ms > now_ms(), "online during the poll grace");
        assert!(!p.online(p.grace_until_ms), "and not after it");
    }

    /// A long-poll terminal ends and opens a poll for every answer: while its polls follow
    /// one another, other nodes read the same view, so it is not written again (it was, on
    /// every upkeep tick); a gap between polls (a grace period) and a new transport are.
    #[test]
    fn a_shared_list_skips_what_other_nodes_already_read() {
        let t = Terminals::shared(settings());
        let id: Arc<str> = Arc::from("lp");
        t.opened(&id, Transport::Longpoll);
        assert_eq!(t.take_changed().len(), 1);
        for _ in 0..3 {
            t.closed(&id, Transport::Longpoll, false);
            t.opened(&id, Transport::Longpoll);
        }
        assert!(t.take_changed().is_empty(), "polls that follow one another");
        t.closed(&id, Transport::Longpoll, false);
        let (_, p) = t.take_changed().pop().expect("a gap hangs on the grace");
        assert!(p.grace_until_ms > now_ms());
        t.opened(&id, Transport::Longpoll);
        assert_eq!(t.take_changed().len(), 1, "back from the gap");
        t.opened(&id, Transport::Ws);
        assert_eq!(t.take_changed().len(), 1, "a new transport");
    }

    /// An online terminal whose view has not changed for half the retention is shared again
    /// at the next sweep: other nodes forget views older than the retention.
    #[test]
    fn a_long_connected_terminal_is_shared_again_before_others_forget_it() {
        let t = Terminals::shared(TerminalSettings {
            retention: Duration::from_secs(2),
            ..settings()
        });
        let id: Arc<str> = Arc::from("ws");
        t.opened(&id, Transport::Ws);
        assert_eq!(t.take_changed().len(), 1);
        t.sweep();
        assert!(t.take_changed().is_empty(), "shared just now");
        std::thread::sleep(Duration::from_millis(1100));
        t.sweep();
        assert_eq!(t.take_changed().len(), 1);
    }

    #[test]
    fn an_entry_stays_small() {
        let size = std::mem::size_of::<Entry>();
        assert!(size <= 48, "Entry is {size} bytes");
    }

    fn flaps(t: &Terminals, id: &str) -> bool {
        t.map.lock().get(id).unwrap().flaps.is_some()
    }

    #[test]
    fn flap_state_is_released_once_pruned_empty_and_not_held_on_long_polling() {
        let t = Terminals::new(TerminalSettings {
            flap_threshold: 0,
            flap_window: Duration::from_millis(20),
            flap_longpoll_for: Duration::from_millis(500),
            ..settings()
        });
        let id: Arc<str> = Arc::from("f");
        t.opened(&id, Transport::Ws);
        t.closed(&id, Transport::Ws, false);
        assert!(!flaps(&t, "f"), "clean closes allocate nothing");
        t.opened(&id, Transport::Ws);
        t.closed(&id, Transport::Ws, true);
        assert!(flaps(&t, "f"));
        assert!(t.longpoll_for("f", 0).is_some());

        std::thread::sleep(Duration::from_millis(40));
        let v = t.view("f").unwrap();
        assert_eq!(v.interruptions.count, 0);
        assert!(v.interruptions.longpoll_for_ms.is_some());
        assert!(flaps(&t, "f"), "kept while held on long-polling");

        std::thread::sleep(Duration::from_millis(500));
        t.sweep();
        assert!(!flaps(&t, "f"));
        assert!(t.longpoll_for("f", 0).is_none());
        assert_eq!(t.view("f").unwrap().interruptions.count, 0);
    }
}

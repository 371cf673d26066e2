//! The service list: every terminal this node has seen, whether it is online and over what,
//! when it was last seen, and how often its WebSocket sessions were interrupted.
//!
//! Interruptions drive the move to long-polling: a terminal whose WebSocket sessions ended
//! without a close frame (TCP reset or end, heartbeat timeout) more than `flap_threshold`
//! times within `flap_window` is told to use long-polling for `flap_longpoll_for`. Clean
//! closes never count, so a terminal that connects briefly and leaves properly (a woken
//! terminal, a user closing the page) is never moved.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use livepush_proto::Transport;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use crate::auth::now_ms;

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

#[derive(Debug, Default)]
struct Entry {
    ws: u32,
    sse: u32,
    polls: u32,
    /// A long-poll terminal stays online until then after its last poll.
    poll_grace_until: Option<Instant>,
    last_seen_ms: u64,
    last_seen: Option<Instant>,
    interruptions: VecDeque<Instant>,
    longpoll_until: Option<Instant>,
}

impl Entry {
    fn online(&self, now: Instant) -> bool {
        self.ws > 0
            || self.sse > 0
            || self.polls > 0
            || self.poll_grace_until.is_some_and(|t| t > now)
    }

    fn transports(&self, now: Instant) -> Vec<Transport> {
        let mut t = Vec::new();
        if self.ws > 0 {
            t.push(Transport::Ws);
        }
        if self.polls > 0 || self.poll_grace_until.is_some_and(|t| t > now) {
            t.push(Transport::Longpoll);
        }
        if self.sse > 0 {
            t.push(Transport::Sse);
        }
        t
    }

    fn prune(&mut self, now: Instant, window: Duration) {
        while self
            .interruptions
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.interruptions.pop_front();
        }
    }
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
#[derive(Debug, Clone, Serialize)]
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
}

impl Terminals {
    pub fn new(settings: TerminalSettings) -> Terminals {
        Terminals {
            map: Mutex::new(HashMap::new()),
            settings,
        }
    }

    fn touch<'a>(map: &'a mut HashMap<Arc<str>, Entry>, id: &Arc<str>) -> &'a mut Entry {
        let e = map.entry(id.clone()).or_default();
        e.last_seen_ms = now_ms();
        e.last_seen = Some(Instant::now());
        e
    }

    /// A session opened.
    pub fn opened(&self, id: &Arc<str>, transport: Transport) {
        let mut map = self.map.lock();
        let e = Self::touch(&mut map, id);
        match transport {
            Transport::Ws => e.ws += 1,
            Transport::Sse => e.sse += 1,
            Transport::Longpoll => {
                e.polls += 1;
                e.poll_grace_until = None;
            }
        }
    }

    /// A session closed. `interrupted`: a WebSocket session ended without a close frame.
    pub fn closed(&self, id: &Arc<str>, transport: Transport, interrupted: bool) {
        let mut map = self.map.lock();
        let settings = self.settings;
        let e = Self::touch(&mut map, id);
        let now = Instant::now();
        match transport {
            Transport::Ws => {
                e.ws = e.ws.saturating_sub(1);
                if interrupted {
                    e.interruptions.push_back(now);
                    e.prune(now, settings.flap_window);
                    if e.interruptions.len() as u32 > settings.flap_threshold {
                        e.longpoll_until = Some(now + settings.flap_longpoll_for);
                        tracing::info!(terminal = %id, "moving a flapping terminal to long-polling");
                    }
                }
            }
            Transport::Sse => e.sse = e.sse.saturating_sub(1),
            Transport::Longpoll => {
                e.polls = e.polls.saturating_sub(1);
                e.poll_grace_until = Some(now + settings.poll_grace);
            }
        }
    }

    /// Whether the terminal has a session open, or polled within the grace period.
    pub fn is_online(&self, id: &str) -> bool {
        let map = self.map.lock();
        map.get(id).is_some_and(|e| e.online(Instant::now()))
    }

    /// If the terminal should not use WebSocket now: how long until it may try again.
    pub fn longpoll_for(&self, id: &str) -> Option<Duration> {
        let map = self.map.lock();
        let until = map.get(id)?.longpoll_until?;
        until.checked_duration_since(Instant::now())
    }

    /// The interruption counters of a terminal never seen by this process.
    pub fn empty_interruptions(&self) -> Interruptions {
        Interruptions {
            count: 0,
            window_ms: self.settings.flap_window.as_millis() as u64,
            threshold: self.settings.flap_threshold,
            longpoll_for_ms: None,
        }
    }

    pub fn view(&self, id: &str) -> Option<TerminalView> {
        let mut map = self.map.lock();
        let now = Instant::now();
        let window = self.settings.flap_window;
        let e = map.get_mut(id)?;
        e.prune(now, window);
        Some(self.render(id, e, now))
    }

    pub fn list(&self, online_only: bool) -> Vec<TerminalView> {
        let map = self.map.lock();
        let now = Instant::now();
        let mut out: Vec<TerminalView> = map
            .iter()
            .filter(|(_, e)| !online_only || e.online(now))
            .map(|(id, e)| self.render(id, e, now))
            .collect();
        out.sort_by(|a, b| a.terminal.cmp(&b.terminal));
        out
    }

    fn render(&self, id: &str, e: &Entry, now: Instant) -> TerminalView {
        let window = self.settings.flap_window;
        TerminalView {
            terminal: id.to_owned(),
            online: e.online(now),
            transports: e.transports(now),
            last_seen_ms: e.last_seen_ms,
            interruptions: Interruptions {
                count: e
                    .interruptions
                    .iter()
                    .filter(|t| now.duration_since(**t) <= window)
                    .count() as u32,
                window_ms: window.as_millis() as u64,
                threshold: self.settings.flap_threshold,
                longpoll_for_ms: e
                    .longpoll_until
                    .and_then(|t| t.checked_duration_since(now))
                    .map(|d| d.as_millis() as u64),
            },
        }
    }

    /// Forget terminals offline for longer than the retention.
    pub fn sweep(&self) {
        let now = Instant::now();
        let retention = self.settings.retention;
        self.map.lock().retain(|_, e| {
            e.online(now)
                || e.last_seen
                    .is_some_and(|t| now.duration_since(t) < retention)
        });
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
        assert!(t.longpoll_for("t").is_none(), "clean closes never count");
        for _ in 0..2 {
            t.opened(&id, Transport::Ws);
            t.closed(&id, Transport::Ws, true);
        }
        assert!(t.longpoll_for("t").is_none(), "at the threshold: not yet");
        t.opened(&id, Transport::Ws);
        t.closed(&id, Transport::Ws, true);
        assert!(t.longpoll_for("t").is_some());
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
}

//! Rate limits shared by a terminal's connections (`send`), the per-connection frame quota,
//! and the caps on what one source address and one terminal may hold open at once.
//!
//! The caps are [`Counts`]: a count is taken before a connection (or session) is served and
//! given back exactly once when it ends, so a count never exceeds what is open, and the
//! tables only hold keys that have something open.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;

use crate::config::Limits;

/// Shared per-terminal limits (across all of a terminal's connections).
#[derive(Debug)]
pub struct Limiters {
    pub(crate) send: DefaultKeyedRateLimiter<Arc<str>>,
    /// Rooms a terminal brings into this node's memory (`room_open_rate`).
    pub(crate) room_opens: DefaultKeyedRateLimiter<Arc<str>>,
    pub(crate) frame_quota: Quota,
    /// Open sessions per terminal, any transport (`max_sessions_per_terminal`).
    pub(crate) sessions: Counts<Arc<str>>,
    /// Open HTTP connections per source address (`max_connections_per_address`).
    pub(crate) addresses: Arc<Counts<IpAddr>>,
}

fn quota(rate: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Quota::per_second(rate).allow_burst(burst)
}

impl Limiters {
    pub fn new(l: &Limits) -> Limiters {
        Limiters {
            send: RateLimiter::keyed(quota(l.send_rate, l.send_burst)),
            room_opens: RateLimiter::keyed(quota(l.room_open_rate, l.room_open_burst)),
            frame_quota: quota(l.frame_rate, l.frame_burst),
            sessions: Counts::new(l.max_sessions_per_terminal),
            addresses: Arc::new(Counts::new(l.max_connections_per_address)),
        }
    }

    /// Forget terminals that have not sent for a while (called periodically).
    pub fn retain_recent(&self) {
        for limiter in [&self.send, &self.room_opens] {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// How many of something each key holds open, each at most `max`.
#[derive(Debug)]
pub struct Counts<K> {
    max: usize,
    open: Mutex<HashMap<K, usize>>,
}

impl<K: Eq + Hash + Clone> Counts<K> {
    pub fn new(max: usize) -> Counts<K> {
        Counts {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The most each key may hold.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Take one for `key`; `false` (nothing taken) when it already holds `max`.
    pub fn take(&self, key: &K) -> bool {
        let mut open = self.open.lock();
        let n = open.entry(key.clone()).or_default();
        if *n >= self.max {
            if *n == 0 {
                open.remove(key);
            }
            return false;
        }
        *n += 1;
        true
    }

    /// Give back one taken for `key`.
    pub fn give_back(&self, key: &K) {
        let mut open = self.open.lock();
        if let Some(n) = open.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                open.remove(key);
            }
        }
    }

    /// What `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.open.lock().get(key).copied().unwrap_or(0)
    }
}

impl Counts<IpAddr> {
    /// Admit a connection from `ip`, if it holds fewer than the maximum. Clones of the
    /// [`Admission`] share its one count, given back when the last is dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admission> {
        self.take(&ip).then(|| Admission {
            _held: Arc::new(Admitted {
                counts: self.clone(),
                ip,
            }),
        })
    }
}

/// One admitted connection of a source address (see [`Counts::admit`]).
#[derive(Debug, Clone)]
pub struct Admission {
    _held: Arc<Admitted>,
}

#[derive(Debug)]
struct Admitted {
    counts: Arc<Counts<IpAddr>>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.counts.give_back(&self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cap_each_key_and_forget_keys_with_nothing_open() {
        let c = Counts::new(2);
        assert!(c.take(&"a"));
        assert!(c.take(&"a"));
        assert!(!c.take(&"a"), "a third is refused");
        assert!(c.take(&"b"), "other keys are not affected");
        c.give_back(&"a");
        assert!(c.take(&"a"), "one given back makes room for one");
        c.give_back(&"a");
        c.give_back(&"a");
        c.give_back(&"b");
        assert!(c.open.lock().is_empty());
    }

    #[test]
    fn an_admission_is_given_back_when_its_last_clone_drops() {
        let c = Arc::new(Counts::new(1));
        let ip: IpAddr = [127, 0, 0, 2].into();
        let a = c.admit(ip).expect("the first is admitted");
        assert!(c.admit(ip).is_none());
        let b = a.clone();
        drop(a);
        assert_eq!(c.held(&ip), 1, "a clone still holds it");
        drop(b);
        assert_eq!(c.held(&ip), 0);
        assert!(c.admit(ip).is_some());
    }
}

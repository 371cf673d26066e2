//! Rate limits shared by a terminal's connections (`send`) and the per-connection frame quota.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::Limits;

/// Shared per-terminal limits (across all of a terminal's connections).
#[derive(Debug)]
pub struct Limiters {
    pub(crate) send: DefaultKeyedRateLimiter<Arc<str>>,
    pub(crate) frame_quota: Quota,
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
            frame_quota: quota(l.frame_rate, l.frame_burst),
        }
    }

    /// Forget terminals that have not sent for a while (called periodically).
    pub fn retain_recent(&self) {
        self.send.retain_recent();
        self.send.shrink_to_fit();
    }
}

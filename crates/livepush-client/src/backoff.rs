//! Exponential back-off with full jitter: the delay before attempt `n` is uniformly random in
//! `[0, min(max, base * 2^n)]`. Pure: the caller supplies the random number generator.

use std::time::Duration;

use rand::Rng;

/// Back-off state: how many attempts have failed since the last [`reset`](Backoff::reset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A back-off starting at attempt 0. A `max` below `base` caps every delay at `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// Attempts made since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The upper bound of the delay for `attempt`: `min(max, base * 2^attempt)`, without
    /// overflow for any `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt).unwrap_or(0);
        let doubled = if factor == 0 {
            // 2^attempt does not fit in a u32: the product certainly exceeds any sane max.
            if self.base.is_zero() {
                Duration::ZERO
            } else {
                Duration::MAX
            }
        } else {
            self.base.saturating_mul(factor)
        };
        doubled.min(self.max)
    }

    /// The delay before the next attempt; counts the attempt.
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        jitter(ceiling, rng)
    }

    /// Start over (after a successful connect).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A uniformly random duration in `[0, ceiling]`, at nanosecond resolution.
pub fn jitter<R: Rng + ?Sized>(ceiling: Duration, rng: &mut R) -> Duration {
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rng.random_range(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff::new(100 * MS, 1000 * MS);
        let c: Vec<_> = (0..6).map(|a| b.ceiling(a)).collect();
        assert_eq!(
            c,
            vec![100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(b.ceiling(31), 1000 * MS);
        assert_eq!(b.ceiling(32), 1000 * MS);
        assert_eq!(b.ceiling(u32::MAX), 1000 * MS);
    }

    #[test]
    fn zero_base_never_waits() {
        let mut b = Backoff::new(Duration::ZERO, Duration::from_secs(1));
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            assert_eq!(b.next_delay(&mut rng), Duration::ZERO);
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(10 * MS, Duration::from_secs(60));
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..10 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.attempt(), 10);
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert!(b.next_delay(&mut rng) <= 10 * MS);
    }

    #[test]
    fn jitter_spreads_over_the_whole_range() {
        // Full jitter, not "half" or "equal" jitter: small delays must occur too.
        let mut rng = StdRng::seed_from_u64(42);
        let ceiling = Duration::from_secs(1);
        let samples: Vec<_> = (0..2000).map(|_| jitter(ceiling, &mut rng)).collect();
        assert!(samples.iter().all(|d| *d <= ceiling));
        assert!(samples.iter().any(|d| *d < Duration::from_millis(100)));
        assert!(samples.iter().any(|d| *d > Duration::from_millis(900)));
        let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / 2000.0;
        assert!((0.4..0.6).contains(&mean), "mean {mean}");
    }

    proptest! {
        #[test]
        fn delays_stay_under_the_ceiling(
            base_ms in 0u64..10_000,
            max_ms in 0u64..600_000,
            attempts in 1usize..80,
            seed in any::<u64>(),
        ) {
            let mut b = Backoff::new(Duration::from_millis(base_ms), Duration::from_millis(max_ms));
            let mut rng = StdRng::seed_from_u64(seed);
            let mut prev_ceiling = Duration::ZERO;
            for n in 0..attempts {
                let ceiling = b.ceiling(u32::try_from(n).unwrap());
                prop_assert!(ceiling >= prev_ceiling, "ceiling never shrinks");
                prop_assert!(ceiling <= Duration::from_millis(max_ms));
                prev_ceiling = ceiling;
                let d = b.next_delay(&mut rng);
                prop_assert!(d <= ceiling, "{d:?} > {ceiling:?}");
            }
        }
    }
}

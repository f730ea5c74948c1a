//! A token bucket for log lines that a guest can trigger.

use std::time::{Duration, Instant};

/// Lets `burst` events through at once and then one per `every`; counts what it held back.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    every: Duration,
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl RateLimit {
    /// A full bucket.
    pub fn new(burst: u32, every: Duration) -> Self {
        RateLimit {
            burst,
            every,
            tokens: f64::from(burst),
            last: Instant::now(),
            suppressed: 0,
        }
    }

    /// `Some(n)` if this event may be logged, with `n` events suppressed since the last one
    /// that was; `None` if it must be dropped.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        if !self.every.is_zero() {
            self.tokens = (self.tokens + elapsed.as_secs_f64() / self.every.as_secs_f64())
                .min(f64::from(self.burst));
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_and_counts_what_it_held_back() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(3, Duration::from_secs(1));
        for _ in 0..3 {
            assert_eq!(r.admit(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(r.admit(t0), None);
        }
        assert_eq!(r.admit(t0 + Duration::from_millis(1100)), Some(1000));
        assert_eq!(r.admit(t0 + Duration::from_millis(1100)), None);
    }
}

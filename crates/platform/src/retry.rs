//! When to try a failed message again.

use std::time::Duration;

/// Exponential backoff with jitter. Defaults: 5 attempts, 200 ms doubling to at most 30 s.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; after the last the message is dead-lettered.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// The backoff while the store itself fails (a full disk, a busy file): short enough to
/// resume soon after it recovers, long enough not to spin.
pub(crate) const OUTAGE: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    base_delay: Duration::from_millis(100),
    max_delay: Duration::from_secs(5),
};

impl RetryPolicy {
    /// The pause after failed attempt number `attempt` (1-based): `base * 2^(attempt-1)`, capped,
    /// less up to a quarter of random jitter, so retries of many consumers spread out while each
    /// delay stays longer than the one before.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(20);
        let full = self
            .base_delay
            .saturating_mul(1 << exponent)
            .min(self.max_delay);
        full.mul_f64(1.0 - fastrand::f64() * 0.25)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_until_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        };
        for _ in 0..100 {
            let delays: Vec<_> = (1..=4).map(|attempt| policy.delay(attempt)).collect();
            assert!(
                delays.windows(2).all(|pair| pair[0] < pair[1]),
                "{delays:?}"
            );
            assert!(
                delays[0] >= Duration::from_millis(75) && delays[0] <= Duration::from_millis(100)
            );
            assert!(policy.delay(30) <= Duration::from_secs(2));
            assert!(policy.delay(30) >= Duration::from_millis(1500));
        }
    }
}

//! Per-node token buckets. Losing them on restart, or each node of a cluster
//! keeping its own, only makes the limit more lenient, so they stay in memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

/// Token buckets keyed by `K`: `rate` tokens a second, at most `burst` stored.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Past this many buckets, full ones are dropped on the next insertion.
const PRUNE_ABOVE: usize = 10_000;

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter; a `rate` of 0 lets everything through.
    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        RateLimiter { rate: rate_per_sec, burst: f64::from(burst.max(1)), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one token for `key`. `Err(seconds)` says how long until one is
    /// available.
    ///
    /// # Errors
    /// The number of seconds to wait when the bucket is empty.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), u64> {
        self.check_n(key, 1, now)
    }

    /// Takes `cost` tokens for `key` (a costly request drains the bucket
    /// faster); a cost above the burst is charged as the whole burst.
    ///
    /// # Errors
    /// The number of seconds to wait when the bucket holds too few tokens.
    pub fn check_n(&self, key: &K, cost: u32, now: Instant) -> Result<(), u64> {
        let cost = f64::from(cost.max(1)).min(self.burst);
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > PRUNE_ABOVE && !buckets.contains_key(key) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket { tokens: self.burst, updated: now });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            Ok(())
        } else {
            Err(((cost - bucket.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }

    /// Takes `cost` tokens for `key` whether or not the bucket holds them,
    /// running it into debt (down to minus the burst); returns how long the
    /// caller should wait before its next unit of work, zero when the bucket
    /// was not in debt. For work already done (a frame already read), so
    /// that it still counts against the key's other requests.
    pub fn charge(&self, key: &K, cost: u32, now: Instant) -> std::time::Duration {
        if self.rate <= 0.0 {
            return std::time::Duration::ZERO;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets.entry(key.clone()).or_insert(Bucket { tokens: self.burst, updated: now });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = ((bucket.tokens + elapsed * self.rate).min(self.burst) - f64::from(cost)).max(-self.burst);
        bucket.updated = now;
        if bucket.tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-bucket.tokens / self.rate)
        }
    }

    /// Drops buckets that have refilled completely (they behave like new ones).
    pub fn prune(&self, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (rate, burst) = (self.rate, self.burst);
        buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * rate < burst);
    }

    /// Number of buckets held.
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn charged_work_runs_the_bucket_into_debt_bounded_by_the_burst() {
        let l = RateLimiter::new(1.0, 2);
        let t = Instant::now();
        assert_eq!(l.charge(&1u8, 3, t), Duration::from_secs(1));
        assert!(l.check(&1, t).is_err(), "the debt blocks other requests");
        assert!(l.check(&1, t + Duration::from_millis(1500)).is_err(), "a second repaid it, no more");
        assert!(l.check(&1, t + Duration::from_secs(2)).is_ok(), "and is paid back at the rate");
        assert!(l.charge(&2, 1000, t) <= Duration::from_secs(2), "debt stops at minus the burst");
        assert!(l.check_n(&3, 100, t).is_ok(), "a cost above the burst is charged as the burst");
        assert!(l.check(&3, t).is_err());
        assert_eq!(RateLimiter::new(0.0, 1).charge(&1u8, 9, t), Duration::ZERO, "rate 0: no limit");
    }

    #[test]
    fn bucket_allows_burst_then_refills() {
        let l = RateLimiter::new(2.0, 3);
        let t = Instant::now();
        for _ in 0..3 {
            assert!(l.check(&"a", t).is_ok());
        }
        assert!(l.check(&"a", t).is_err());
        assert!(l.check(&"b", t).is_ok(), "buckets are per key");
        assert!(l.check(&"a", t + Duration::from_millis(600)).is_ok());
        assert!(l.check(&"a", t + Duration::from_millis(600)).is_err());
        l.prune(t + Duration::from_secs(10));
        assert!(l.is_empty());
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let l = RateLimiter::new(0.0, 0);
        let t = Instant::now();
        for _ in 0..1000 {
            assert!(l.check(&1, t).is_ok());
        }
    }
}

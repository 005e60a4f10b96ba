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
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / self.rate).ceil().max(1.0) as u64)
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

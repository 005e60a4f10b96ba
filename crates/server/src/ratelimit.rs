//! Token buckets. [`RateLimiter`] keeps them in the process; [`Limiter`]
//! keeps them in the database when the backend is shared by several nodes
//! (PostgreSQL: one statement per check on an unlogged table), so a client
//! spreading its requests over the nodes meets one limit, and in the
//! process otherwise (SQLite: one node). Losing buckets (a restart, a
//! database crash that empties the unlogged table, a database error, when a
//! check falls back to the node's own buckets) only makes a limit more
//! lenient for a moment.

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

/// How a limiter's key names its bucket in a shared store.
pub trait BucketKey {
    /// The bucket's name (hashed before it is stored).
    fn bucket_key(&self) -> String;
}

impl BucketKey for subrosa_proto::DeviceAddress {
    fn bucket_key(&self) -> String {
        format!("{}/{}", self.handle.as_str(), self.device.to_hex())
    }
}

impl BucketKey for std::net::IpAddr {
    fn bucket_key(&self) -> String {
        self.to_string()
    }
}

impl BucketKey for subrosa_proto::Handle {
    fn bucket_key(&self) -> String {
        self.as_str().to_owned()
    }
}

impl BucketKey for (subrosa_proto::Handle, subrosa_proto::Handle) {
    fn bucket_key(&self) -> String {
        format!("{}>{}", self.0.as_str(), self.1.as_str())
    }
}

/// A rate limit whose buckets every node sharing the store sees when the
/// backend offers shared buckets ([`crate::store::Store::take_tokens`]),
/// and this node's own [`RateLimiter`] otherwise.
#[derive(Debug)]
pub struct Limiter<K> {
    kind: &'static str,
    local: RateLimiter<K>,
    store: Option<std::sync::Arc<dyn crate::store::Store>>,
}

impl<K: Hash + Eq + Clone + BucketKey> Limiter<K> {
    /// A limiter named `kind` (the shared buckets' namespace) over `local`;
    /// with a store, checks go to its shared buckets when it has them.
    pub fn new(
        kind: &'static str,
        local: RateLimiter<K>,
        store: Option<std::sync::Arc<dyn crate::store::Store>>,
    ) -> Self {
        Limiter { kind, local, store }
    }

    /// [`RateLimiter::check`], across nodes.
    ///
    /// # Errors
    /// The number of seconds to wait when the bucket is empty.
    pub async fn check(&self, key: &K, now: Instant) -> Result<(), u64> {
        self.check_n(key, 1, now).await
    }

    /// [`RateLimiter::check_n`], across nodes.
    ///
    /// # Errors
    /// The number of seconds to wait when the bucket holds too few tokens.
    pub async fn check_n(&self, key: &K, cost: u32, now: Instant) -> Result<(), u64> {
        let rate = self.local.rate;
        if rate <= 0.0 {
            return Ok(());
        }
        let cost = f64::from(cost.max(1)).min(self.local.burst);
        match self.shared(key, cost, false).await {
            Some(t) if t.taken => Ok(()),
            Some(t) => Err(((cost - t.left) / rate).ceil().max(1.0) as u64),
            None => self.local.check_n(key, cost as u32, now),
        }
    }

    /// [`RateLimiter::charge`], across nodes.
    pub async fn charge(&self, key: &K, cost: u32, now: Instant) -> std::time::Duration {
        let rate = self.local.rate;
        if rate <= 0.0 {
            return std::time::Duration::ZERO;
        }
        match self.shared(key, f64::from(cost), true).await {
            Some(t) if t.left >= 0.0 => std::time::Duration::ZERO,
            Some(t) => std::time::Duration::from_secs_f64(-t.left / rate),
            None => self.local.charge(key, cost, now),
        }
    }

    /// Drops this node's full buckets (the shared ones are swept with the
    /// store).
    pub fn prune(&self, now: Instant) {
        self.local.prune(now);
    }

    async fn shared(&self, key: &K, cost: f64, debt: bool) -> Option<crate::store::Tokens> {
        let store = self.store.as_ref()?;
        let name = key.bucket_key();
        let request = crate::store::TokenRequest {
            kind: self.kind,
            key: &name,
            rate: self.local.rate,
            burst: self.local.burst,
            cost,
            debt,
        };
        match store.take_tokens(&request, crate::now_ms()).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(error = %e, "shared rate limit unavailable; using this node's");
                None
            }
        }
    }
}

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

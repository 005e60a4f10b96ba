//! Per-node wake-ups of local WebSockets.
//!
//! A send wakes the recipients' sockets on this node at once; a device
//! removal tells that device's sockets on this node to close. With
//! PostgreSQL, other nodes' sends and removals arrive through LISTEN/NOTIFY
//! ([`crate::store::Store::spawn_listener`]); sockets also re-check
//! periodically, which covers anything a lost notification missed.
//!
//! The same revocations keep the cache of device signature keys that
//! request authentication reads ([`Wakeups::cached_key`]) honest: a removal
//! (local, or another node's through the listener) drops the device's key,
//! a listener that may have missed notifications clears them all, and an
//! entry lives at most [`KEY_TTL`] anyway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use subrosa_proto::DeviceAddress;
use tokio::sync::watch;

/// What a device's subscribers watch: a counter that changes whenever
/// something arrives for it, and whether the device was removed.
#[derive(Debug, Clone, Copy, Default)]
struct Signal {
    counter: u64,
    revoked: bool,
    /// Bumped when the device's signature key changes: sockets opened with
    /// the old key close (the device reconnects with the new one).
    key_changes: u64,
}

/// Device → its [`Signal`], and the cached signature keys.
#[derive(Debug, Default)]
pub struct Wakeups {
    map: Mutex<HashMap<DeviceAddress, watch::Sender<Signal>>>,
    keys: Mutex<KeyCache>,
}

/// Longest a cached device key is used without asking the store again (the
/// backstop for a removal on another node whose notification was lost).
pub const KEY_TTL: Duration = Duration::from_secs(10);
/// Most cached keys; a full cache is emptied and refills from the store.
const MAX_CACHED_KEYS: usize = 100_000;

/// Active devices' signature keys, as last read from the store.
#[derive(Debug, Default)]
struct KeyCache {
    keys: HashMap<DeviceAddress, (Vec<u8>, Instant)>,
    /// Bumped by every revocation, so a key read from the store before a
    /// removal committed is not cached after the removal dropped it.
    generation: u64,
}

/// Why a subscription woke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// Something may have arrived: look at the inbox.
    Mail,
    /// The device was removed: close its sockets.
    Revoked,
    /// The device's keys changed: close its sockets, it may come back.
    Rekeyed,
}

/// A socket's subscription; unsubscribes on drop.
#[derive(Debug)]
pub struct Subscription {
    wakeups: Arc<Wakeups>,
    addr: DeviceAddress,
    rx: Option<watch::Receiver<Signal>>,
    /// The device's key changes when this subscription began.
    key_changes: u64,
}

impl Wakeups {
    /// Subscribes to wake-ups for a device.
    pub fn subscribe(self: &Arc<Self>, addr: &DeviceAddress) -> Subscription {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let rx = map.entry(addr.clone()).or_insert_with(|| watch::channel(Signal::default()).0).subscribe();
        let key_changes = rx.borrow().key_changes;
        Subscription { wakeups: Arc::clone(self), addr: addr.clone(), rx: Some(rx), key_changes }
    }

    /// Wakes every local socket of the device.
    pub fn wake(&self, addr: &DeviceAddress) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(addr) {
            tx.send_modify(|s| s.counter = s.counter.wrapping_add(1));
        }
    }

    /// Wakes every local socket (after a wake-up may have been missed, e.g.
    /// while the cross-node listener was reconnecting). A woken socket looks
    /// at its inbox (a missed removal is caught by its periodic re-check).
    pub fn wake_all(&self) {
        // Removals may have been missed too: forget every cached key.
        self.forget_keys();
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for tx in map.values() {
            tx.send_modify(|s| s.counter = s.counter.wrapping_add(1));
        }
    }

    /// Tells every local socket of the device that it was removed, and
    /// forgets its cached key. Sockets that subscribe later must check the
    /// device themselves.
    pub fn revoke(&self, addr: &DeviceAddress) {
        {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            keys.generation = keys.generation.wrapping_add(1);
            keys.keys.remove(addr);
        }
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(addr) {
            tx.send_modify(|s| s.revoked = true);
        }
    }

    /// The device's keys changed (`PUT /v1/accounts/keys`): its cached key
    /// goes, and its sockets, opened with the old key, close.
    pub fn keys_changed(&self, addr: &DeviceAddress) {
        {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            keys.generation = keys.generation.wrapping_add(1);
            keys.keys.remove(addr);
        }
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(addr) {
            tx.send_modify(|s| s.key_changes = s.key_changes.wrapping_add(1));
        }
    }

    /// The signature key of an active device, when cached less than
    /// [`KEY_TTL`] ago and not revoked since.
    pub fn cached_key(&self, addr: &DeviceAddress, now: Instant) -> Option<Vec<u8>> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.keys.get(addr).filter(|(_, at)| now.saturating_duration_since(*at) < KEY_TTL).map(|(k, _)| k.clone())
    }

    /// The revocation count to pass to [`Wakeups::remember_key`]: read it
    /// before asking the store.
    pub fn key_generation(&self) -> u64 {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).generation
    }

    /// Caches a key read from the store when no revocation happened since
    /// `generation` was read (else the read may predate a removal).
    pub fn remember_key(&self, addr: &DeviceAddress, key: &[u8], generation: u64, now: Instant) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.generation != generation {
            return;
        }
        if keys.keys.len() >= MAX_CACHED_KEYS {
            keys.keys.clear();
        }
        keys.keys.insert(addr.clone(), (key.to_vec(), now));
    }

    /// Forgets every cached key.
    pub fn forget_keys(&self) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.generation = keys.generation.wrapping_add(1);
        keys.keys.clear();
    }

    /// Devices with at least one subscribed socket.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when no socket is subscribed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Subscription {
    /// Waits for the next wake-up (returns at once if one came since the
    /// last call).
    pub async fn woken(&mut self) -> Woken {
        match self.rx.as_mut() {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    // The sender is never dropped while we hold a receiver;
                    // if it were, wait forever rather than spin.
                    std::future::pending::<()>().await;
                }
                let signal = *rx.borrow_and_update();
                if signal.revoked {
                    Woken::Revoked
                } else if signal.key_changes != self.key_changes {
                    Woken::Rekeyed
                } else {
                    Woken::Mail
                }
            }
            None => std::future::pending::<Woken>().await,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut map = self.wakeups.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&self.addr).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(&self.addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn wake_reaches_subscribers_and_drop_cleans_up() {
        let w = Arc::new(Wakeups::default());
        let addr: DeviceAddress = "bob/0011223344556677".parse().expect("addr");
        let mut a = w.subscribe(&addr);
        let mut b = w.subscribe(&addr);
        w.wake(&addr);
        assert_eq!(tokio::time::timeout(Duration::from_secs(1), a.woken()).await.expect("a woken"), Woken::Mail);
        assert_eq!(tokio::time::timeout(Duration::from_secs(1), b.woken()).await.expect("b woken"), Woken::Mail);
        assert!(tokio::time::timeout(Duration::from_millis(50), a.woken()).await.is_err());
        let other: DeviceAddress = "bob/8899aabbccddeeff".parse().expect("addr");
        w.revoke(&other);
        assert!(tokio::time::timeout(Duration::from_millis(50), a.woken()).await.is_err(), "revoke is per device");
        w.revoke(&addr);
        assert_eq!(tokio::time::timeout(Duration::from_secs(1), a.woken()).await.expect("a woken"), Woken::Revoked);
        assert_eq!(tokio::time::timeout(Duration::from_secs(1), b.woken()).await.expect("b woken"), Woken::Revoked);
        drop(a);
        assert_eq!(w.len(), 1);
        drop(b);
        assert!(w.is_empty());
    }

    #[test]
    fn cached_keys_go_with_revocation_and_age() {
        let w = Wakeups::default();
        let addr: DeviceAddress = "bob/0011223344556677".parse().expect("addr");
        let now = Instant::now();
        let g = w.key_generation();
        w.remember_key(&addr, b"key", g, now);
        assert_eq!(w.cached_key(&addr, now).as_deref(), Some(&b"key"[..]));
        assert!(w.cached_key(&addr, now + KEY_TTL).is_none(), "expired");
        w.revoke(&addr);
        assert!(w.cached_key(&addr, now).is_none(), "revoked");
        // A read that began before the revocation is not cached.
        w.remember_key(&addr, b"key", g, now);
        assert!(w.cached_key(&addr, now).is_none(), "stale read cached");
        let g = w.key_generation();
        w.remember_key(&addr, b"key", g, now);
        w.wake_all();
        assert!(w.cached_key(&addr, now).is_none(), "wake_all forgets keys");
    }
}

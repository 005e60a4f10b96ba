//! Per-node wake-ups of local WebSockets.
//!
//! A send wakes the recipients' sockets on this node at once. Sockets on
//! other nodes notice through their periodic re-check (a later backend can
//! forward wake-ups, e.g. through PostgreSQL LISTEN/NOTIFY).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use subrosa_proto::DeviceAddress;
use tokio::sync::watch;

/// Device → a counter that changes whenever something arrives for it.
#[derive(Debug, Default)]
pub struct Wakeups {
    map: Mutex<HashMap<DeviceAddress, watch::Sender<u64>>>,
}

/// A socket's subscription; unsubscribes on drop.
#[derive(Debug)]
pub struct Subscription {
    wakeups: Arc<Wakeups>,
    addr: DeviceAddress,
    rx: Option<watch::Receiver<u64>>,
}

impl Wakeups {
    /// Subscribes to wake-ups for a device.
    pub fn subscribe(self: &Arc<Self>, addr: &DeviceAddress) -> Subscription {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let rx = map.entry(addr.clone()).or_insert_with(|| watch::channel(0).0).subscribe();
        Subscription { wakeups: Arc::clone(self), addr: addr.clone(), rx: Some(rx) }
    }

    /// Wakes every local socket of the device.
    pub fn wake(&self, addr: &DeviceAddress) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(addr) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
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
    pub async fn woken(&mut self) {
        match self.rx.as_mut() {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    // The sender is never dropped while we hold a receiver;
                    // if it were, wait forever rather than spin.
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
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
        tokio::time::timeout(Duration::from_secs(1), a.woken()).await.expect("a woken");
        tokio::time::timeout(Duration::from_secs(1), b.woken()).await.expect("b woken");
        assert!(tokio::time::timeout(Duration::from_millis(50), a.woken()).await.is_err());
        drop(a);
        assert_eq!(w.len(), 1);
        drop(b);
        assert!(w.is_empty());
    }
}

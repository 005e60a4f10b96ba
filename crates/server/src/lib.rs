//! The Subrosa delivery service.
//!
//! It relays and orders opaque MLS ciphertext between devices: accounts and
//! devices (and link slots for provisioning new ones), key packages, per-device inboxes, per-conversation commit
//! ordering and WebSocket push. It holds no keys, parses no message content
//! and has no outbound HTTP client, so it cannot fetch a link.
//!
//! - [`start`] runs a server on a socket and returns a [`RunningServer`].
//! - [`app`] builds the router over an [`AppState`], testable without a socket.
//! - [`store::Store`] is the storage trait; [`store::SqliteStore`] the
//!   embedded backend.

#![warn(missing_docs)]

#[cfg(feature = "test-attacks")]
pub mod attacks;
mod auth;
mod blobs;
pub mod cli;
mod config;
pub mod conn;
mod delivery;
mod error;
mod hooks;
pub mod kt;
pub mod metrics;
pub mod ratelimit;
pub mod relay;
mod routes;
mod server;
pub mod store;
pub mod wakeup;
mod ws;

use std::net::IpAddr;
use std::sync::Arc;

use subrosa_proto::{DeviceAddress, Handle};
use tokio::sync::watch;

pub use auth::now_ms;
pub use config::{parse_duration, DatabaseUrl, Limits, ServerConfig, TlsConfig};
pub use error::{AppError, ServerError};
pub use routes::app;
pub use server::{open_store, start, RunningServer, ShutdownTrigger};

use ratelimit::{Limiter, RateLimiter};

/// How often the key directory publishes at most, by default.
pub const DEFAULT_KT_PUBLISH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);
/// Key-package claims one account may make of another's an hour (and at once).
pub const CLAIMS_PER_PAIR_PER_HOUR: f64 = 30.0;
/// One-time key packages other accounts may claim of one account an hour
/// (and at once), all requesters together; past it, claims get the
/// last-resort packages.
pub const ONE_TIME_CLAIMS_PER_TARGET_PER_HOUR: f64 = 20.0;
use store::Store;
use wakeup::Wakeups;

/// What every request handler shares: the store, the limits and the
/// per-node helpers (socket wake-ups, rate-limit buckets). Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) limits: Arc<Limits>,
    pub(crate) wakeups: Arc<Wakeups>,
    pub(crate) device_limiter: Arc<Limiter<DeviceAddress>>,
    pub(crate) registration_limiter: Arc<Limiter<IpAddr>>,
    /// Unsigned link creations, per client IP: a bucket apart from
    /// registrations, so one cannot starve the other.
    pub(crate) link_create_limiter: Arc<Limiter<IpAddr>>,
    pub(crate) link_poll_limiter: Arc<Limiter<IpAddr>>,
    /// Key-package claims per (requester account, target account).
    pub(crate) claim_limiter: Arc<Limiter<(Handle, Handle)>>,
    /// One-time key packages claimed of a target account by other
    /// accounts, all requesters together.
    pub(crate) claim_target_limiter: Arc<Limiter<Handle>>,
    /// Unsigned key-transparency reads (head, audit), per client IP.
    pub(crate) kt_public_limiter: Arc<Limiter<IpAddr>>,
    pub(crate) shutdown: watch::Receiver<bool>,
    shutdown_tx: Arc<watch::Sender<bool>>,
    /// Counters for `--metrics-listen` (no identifiers in them).
    pub(crate) metrics: metrics::SharedMetrics,
    /// The call relay's token issuer, when `--relay-listen` runs one.
    pub(crate) relay: Option<Arc<relay::Issuer>>,
    /// The relay's end for call sockets (`GET /v1/calls/ws`), with it.
    pub(crate) call_sockets: Option<relay::socket::CallSockets>,
    /// The key directory, opened on first use (or by [`start`]).
    kt: Arc<tokio::sync::OnceCell<Arc<kt::KtService>>>,
    kt_publish_interval: std::time::Duration,
    /// The file recording the highest head this node signed.
    kt_mark: Option<std::path::PathBuf>,
    /// The malicious-operator controller (test builds only; never installed
    /// by the `subrosa-server` binary).
    #[cfg(feature = "test-attacks")]
    pub(crate) attacks: Option<Arc<attacks::Attacks>>,
}

impl AppState {
    /// A state over a store with these limits.
    pub fn new(store: Arc<dyn Store>, limits: Limits) -> Self {
        let device_limiter = RateLimiter::new(f64::from(limits.requests_per_second), limits.burst);
        let registration_limiter =
            RateLimiter::new(f64::from(limits.registrations_per_minute) / 60.0, limits.registrations_per_minute);
        // Polls of unsigned link responses, per client IP: as generous as a
        // device's signed requests.
        let link_poll_limiter = RateLimiter::new(f64::from(limits.requests_per_second), limits.burst);
        let link_create_limiter =
            RateLimiter::new(f64::from(limits.registrations_per_minute) / 60.0, limits.registrations_per_minute);
        // Unsigned directory reads cost one token per epoch they cover: a
        // full audit chunk (64 epochs) a second, ten in a burst.
        let kt_public_rate = if limits.requests_per_second == 0 { 0.0 } else { 64.0 };
        let kt_public_limiter = RateLimiter::new(kt_public_rate, 640);
        // 30 claims of one account's packages by another an hour, 30 at once:
        // far above starting conversations, far below draining 50 packages
        // that the owner refills at every receive.
        let claim_rate = if limits.requests_per_second == 0 { 0.0 } else { CLAIMS_PER_PAIR_PER_HOUR / 3600.0 };
        let claim_limiter = RateLimiter::new(claim_rate, CLAIMS_PER_PAIR_PER_HOUR as u32);
        // Many accounts (each under its pair limit) together draw at most
        // this many one-time packages of one target an hour; the owner's
        // devices refill theirs at every receive.
        let target_rate =
            if limits.requests_per_second == 0 { 0.0 } else { ONE_TIME_CLAIMS_PER_TARGET_PER_HOUR / 3600.0 };
        let claim_target_limiter = RateLimiter::new(target_rate, ONE_TIME_CLAIMS_PER_TARGET_PER_HOUR as u32);
        let (shutdown_tx, shutdown) = watch::channel(false);
        // Buckets in the database when the backend shares them between nodes.
        let shared = || Some(Arc::clone(&store));
        AppState {
            limits: Arc::new(limits),
            wakeups: Arc::new(Wakeups::default()),
            device_limiter: Arc::new(Limiter::new("device", device_limiter, shared())),
            registration_limiter: Arc::new(Limiter::new("register", registration_limiter, shared())),
            link_create_limiter: Arc::new(Limiter::new("link", link_create_limiter, shared())),
            link_poll_limiter: Arc::new(Limiter::new("link-poll", link_poll_limiter, shared())),
            claim_limiter: Arc::new(Limiter::new("claim", claim_limiter, shared())),
            claim_target_limiter: Arc::new(Limiter::new("claim-target", claim_target_limiter, shared())),
            kt_public_limiter: Arc::new(Limiter::new("kt", kt_public_limiter, shared())),
            store,
            shutdown,
            shutdown_tx: Arc::new(shutdown_tx),
            metrics: Arc::default(),
            relay: None,
            call_sockets: None,
            kt: Arc::new(tokio::sync::OnceCell::new()),
            kt_publish_interval: DEFAULT_KT_PUBLISH_INTERVAL,
            kt_mark: None,
            #[cfg(feature = "test-attacks")]
            attacks: None,
        }
    }

    /// Issues call-relay tokens with this issuer (`POST /v1/calls/token`)
    /// and hands call sockets (`GET /v1/calls/ws`) to the relay through
    /// `sockets`.
    #[must_use]
    pub fn with_relay(mut self, issuer: Arc<relay::Issuer>, sockets: relay::socket::CallSockets) -> Self {
        self.relay = Some(issuer);
        self.call_sockets = Some(sockets);
        self
    }

    /// Publishes key-directory epochs at most this often (default
    /// [`DEFAULT_KT_PUBLISH_INTERVAL`]); changes made meanwhile share an epoch.
    #[must_use]
    pub fn with_kt_publish_interval(mut self, interval: std::time::Duration) -> Self {
        self.kt_publish_interval = interval;
        self
    }

    /// Records the highest directory head this node signs in `path` (a
    /// file outside the database), and refuses to open a directory that is
    /// behind it (a database restored from an older backup).
    #[must_use]
    pub fn with_kt_mark(mut self, path: std::path::PathBuf) -> Self {
        self.kt_mark = Some(path);
        self
    }

    /// Installs the malicious-operator controller (test builds only).
    #[cfg(feature = "test-attacks")]
    #[must_use]
    pub fn with_attacks(mut self, attacks: Arc<attacks::Attacks>) -> Self {
        self.attacks = Some(attacks);
        self
    }

    /// The key directory and its publisher (opened, and its VRF key created,
    /// on first use).
    ///
    /// # Errors
    /// 500 when the directory's tables cannot be read.
    pub async fn kt(&self) -> Result<Arc<kt::KtService>, AppError> {
        Ok(self.kt_open().await?)
    }

    /// [`AppState::kt`] with the directory's own error.
    ///
    /// # Errors
    /// When the directory's tables cannot be read.
    pub async fn kt_open(&self) -> Result<Arc<kt::KtService>, kt::KtError> {
        let service = self
            .kt
            .get_or_try_init(|| async {
                kt::KtService::open_marked(self.store.kt_storage(), self.kt_publish_interval, self.kt_mark.clone())
                    .await
                    .map(Arc::new)
            })
            .await?;
        Ok(Arc::clone(service))
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Closes every open WebSocket of this state (part of a graceful shutdown).
    pub fn close_sockets(&self) {
        self.shutdown_tx.send_replace(true);
    }
}

//! Running the service on a socket: [`start`] and [`RunningServer`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum_server::tls_rustls::RustlsConfig;
use axum_server::Handle;
use hyper_util::rt::TokioTimer;
use subrosa_proto::MAX_CLOCK_SKEW_MS;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::conn::GuardAcceptor;
use crate::store::{PgStore, SqliteStore, Store};
use crate::{app, now_ms, AppState, DatabaseUrl, ServerConfig, ServerError};

/// How long a graceful shutdown waits for requests in flight.
const GRACE: Duration = Duration::from_secs(10);

/// A server accepting connections.
#[derive(Debug)]
pub struct RunningServer {
    local_addr: SocketAddr,
    https: bool,
    handle: Handle,
    state: AppState,
    server: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    listener: Option<JoinHandle<()>>,
    stop_sweeper: watch::Sender<bool>,
    metrics_addr: Option<SocketAddr>,
    relay_addr: Option<SocketAddr>,
}

/// The file in the data directory that records the highest directory head
/// this node signed.
pub const KT_MARK_FILE: &str = "kt-signed-head";

/// Opens the store a configuration names (creating the data directory).
///
/// # Errors
/// [`ServerError::DataDir`], [`ServerError::Config`], [`ServerError::Store`].
pub async fn open_store(config: &ServerConfig) -> Result<Arc<dyn Store>, ServerError> {
    let url = DatabaseUrl::parse(config.database.as_deref(), &config.data_dir)?;
    if let DatabaseUrl::Postgres(url) = &url {
        // Nothing is kept in the data directory with PostgreSQL.
        return Ok(Arc::new(PgStore::connect_with(url, config.postgres).await?));
    }
    let data_dir = config.data_dir.clone();
    tokio::task::spawn_blocking(move || -> Result<Arc<dyn Store>, ServerError> {
        std::fs::create_dir_all(&data_dir)
            .map_err(|source| ServerError::DataDir { path: data_dir.display().to_string(), source })?;
        match url {
            DatabaseUrl::Sqlite(path) => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent)
                        .map_err(|source| ServerError::DataDir { path: parent.display().to_string(), source })?;
                }
                Ok(Arc::new(SqliteStore::open(&path)?))
            }
            DatabaseUrl::Postgres(_) => Err(ServerError::Config("unreachable: PostgreSQL is opened above".into())),
        }
    })
    .await
    .map_err(|e| ServerError::Config(format!("opening the store failed: {e}")))?
}

async fn tls_config(tls: &crate::TlsConfig) -> Result<RustlsConfig, ServerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert_path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| ServerError::Tls(format!("cannot read certificate {}: {e}", tls.cert_path.display())))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(format!("no certificate in {}", tls.cert_path.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_path)
        .map_err(|e| ServerError::Tls(format!("cannot read private key {}: {e}", tls.key_path.display())))?;
    // An explicit provider, so a process that links several rustls providers
    // (the CLI running the server in-process) cannot make this ambiguous.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(format!("certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(RustlsConfig::from_config(Arc::new(config)))
}

/// Binds, opens and migrates the store, spawns the server and the expiry
/// sweeper, and returns once the socket accepts connections.
///
/// # Errors
/// Any [`ServerError`]: an unusable data directory or database URL, a
/// database that cannot be opened, an address that cannot be bound, or TLS
/// files that cannot be loaded.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    let store = open_store(&config).await?;
    let tls = match &config.tls {
        Some(t) => Some(tls_config(t).await?),
        None => None,
    };
    let listener = std::net::TcpListener::bind(config.listen)
        .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    listener.set_nonblocking(true).map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;

    // The highest head this node signed is kept outside the database, so a
    // database restored from an older backup is noticed (kt::SignedMark).
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| ServerError::DataDir { path: config.data_dir.display().to_string(), source })?;
    // A blob lives at most as long as the message that points at it.
    let limits = crate::Limits { blob_ttl: config.message_ttl, ..config.limits.clone() };
    let state = AppState::new(Arc::clone(&store), limits)
        .with_kt_publish_interval(config.kt_publish_interval)
        .with_kt_mark(config.data_dir.join(KT_MARK_FILE));
    let relay = match config.relay_listen {
        Some(addr) => Some(crate::relay::bind(addr, Some(store.as_ref())).await?),
        None => None,
    };
    let (call_sockets, call_events) = crate::relay::socket::channel();
    let state = match &relay {
        Some((_, issuer)) => state.with_relay(Arc::clone(issuer), call_sockets),
        None => state,
    };
    #[cfg(feature = "test-attacks")]
    let state = match &config.attacks {
        Some(a) => state.with_attacks(Arc::clone(a)),
        None => state,
    };
    // Opens the key directory now: its VRF key is created at first start.
    state.kt_open().await.map_err(|e| ServerError::Config(format!("cannot open the key directory: {e}")))?;
    let service = app(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let handle = Handle::new();
    let https = tls.is_some();
    // Connections are capped per address and closed when idle before TLS
    // or HTTP see them; hyper gets a timer so its header timeout runs
    // (without one it never fires: a slowloris held sockets for ever).
    let guard = GuardAcceptor::new(&config.limits, Arc::clone(&state.metrics));
    let server = match tls {
        Some(tls) => {
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls).acceptor(guard);
            let mut srv = axum_server::from_tcp(listener).acceptor(acceptor).handle(handle.clone());
            http_timeouts(srv.http_builder(), &config.limits);
            tokio::spawn(async move {
                if let Err(e) = srv.serve(service).await {
                    tracing::error!(error = %e, "server stopped");
                }
            })
        }
        None => {
            let mut srv = axum_server::from_tcp(listener).acceptor(guard).handle(handle.clone());
            http_timeouts(srv.http_builder(), &config.limits);
            tokio::spawn(async move {
                if let Err(e) = srv.serve(service).await {
                    tracing::error!(error = %e, "server stopped");
                }
            })
        }
    };
    if handle.listening().await.is_none() {
        return Err(ServerError::Config("the server stopped before it was ready".into()));
    }
    let (stop_sweeper, stop) = watch::channel(false);
    let listener = store.spawn_listener(Arc::clone(&state.wakeups), stop.clone());
    let relay_addr = match relay {
        Some((socket, issuer)) => {
            let addr = socket.local_addr().ok();
            crate::relay::spawn(socket, issuer, crate::relay::RelayLimits::default(), call_events, stop.clone());
            addr
        }
        None => None,
    };
    let sweeper = tokio::spawn(sweep_loop(state.clone(), config.message_ttl, config.effective_sweep_interval(), stop));
    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let (metrics_listener, bound) =
                crate::metrics::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })?;
            crate::metrics::serve(state.clone(), metrics_listener);
            Some(bound)
        }
        None => None,
    };
    tracing::info!(addr = %local_addr, https, "listening");
    Ok(RunningServer {
        local_addr,
        https,
        handle,
        state,
        server,
        sweeper,
        listener,
        stop_sweeper,
        metrics_addr,
        relay_addr,
    })
}

/// hyper's own timeouts: request headers must arrive within
/// [`crate::Limits::header_timeout`]; HTTP/2 connections are pinged and
/// dropped when the pings go unanswered.
fn http_timeouts(
    builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    limits: &crate::Limits,
) {
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
}

/// One sweep: expired inbox rows and their messages, stale nonces, old send
/// ids, expired link slots; then backend housekeeping.
async fn sweep_once(state: &AppState, ttl: Duration) {
    let now = now_ms();
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let cutoff = now.saturating_sub(ttl_ms);
    let nonce_cutoff = now.saturating_sub(MAX_CLOCK_SKEW_MS);
    match state.store.sweep(cutoff, nonce_cutoff, cutoff, now).await {
        Ok(report) => tracing::debug!(?report, "swept"),
        Err(e) => tracing::error!(error = %e, "sweep failed"),
    }
    if let Err(e) = state.store.maintenance().await {
        tracing::warn!(error = %e, "storage maintenance failed");
    }
    state.device_limiter.prune(Instant::now());
    state.registration_limiter.prune(Instant::now());
    state.link_create_limiter.prune(Instant::now());
    state.claim_limiter.prune(Instant::now());
    state.claim_target_limiter.prune(Instant::now());
    state.link_poll_limiter.prune(Instant::now());
    state.kt_public_limiter.prune(Instant::now());
}

async fn sweep_loop(state: AppState, ttl: Duration, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => sweep_once(&state, ttl).await,
            _ = stop.changed() => return,
        }
    }
}

impl RunningServer {
    /// The bound address (the real port when the configuration asked for 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where `GET /metrics` is served, when a metrics address was given.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where the call relay listens (UDP), when `--relay-listen` was given.
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.relay_addr
    }

    /// The base URL, `http://ADDR:PORT` or `https://…`.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.local_addr)
    }

    /// The shared state (its store, for example).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// A handle that starts a graceful shutdown from elsewhere (a signal
    /// handler), after which [`RunningServer::wait`] returns.
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger { handle: self.handle.clone(), state: self.state.clone() }
    }

    /// Stops accepting, closes WebSockets, lets requests in flight finish
    /// (up to 10 s), stops the sweeper and checkpoints the store.
    pub async fn shutdown(self) {
        self.shutdown_trigger().trigger();
        self.wait().await;
    }

    /// Runs until the server stops (after a [`ShutdownTrigger`] fired), then
    /// finishes like [`RunningServer::shutdown`].
    pub async fn wait(self) {
        if let Err(e) = self.server.await {
            tracing::error!(error = %e, "server task failed");
        }
        self.state.close_sockets();
        self.stop_sweeper.send_replace(true);
        let _ = self.sweeper.await;
        if let Some(listener) = self.listener {
            let _ = listener.await;
        }
        if let Err(e) = self.state.store.maintenance().await {
            tracing::warn!(error = %e, "final storage maintenance failed");
        }
        tracing::info!("server stopped");
    }
}

/// Starts a graceful shutdown of a [`RunningServer`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger {
    handle: Handle,
    state: AppState,
}

impl ShutdownTrigger {
    /// Starts the graceful shutdown; returns at once.
    pub fn trigger(&self) {
        self.state.close_sockets();
        self.handle.graceful_shutdown(Some(GRACE));
    }
}

//! The PostgreSQL backend: many stateless server nodes share one database.
//!
//! A `deadpool-postgres` pool of `tokio-postgres` connections, with timeouts
//! on every step (waiting for a connection, connecting, each operation), so
//! an unreachable database answers [`StoreError::Unavailable`] rather than
//! hanging, and the pool reconnects by itself once the database is back.
//!
//! The rules are not here: they are written once in `store::rules`, and
//! this backend supplies their statements (`Pg`) inside its transaction.
//! What SQLite gets from its single writer is done here with row locks:
//!
//! - **Inbox order.** A send locks its recipients' device rows (in id order,
//!   so overlapping sends cannot deadlock) before it draws inbox ids from the
//!   sequence. For any one device, sends therefore draw and commit one at a
//!   time, so its ids become visible in increasing order and a socket that
//!   pushed everything up to id N never later meets a committed id below N.
//!   (A sequence alone would not do: values are drawn in one order and
//!   committed in another.) See the README.
//! - **Commit ordering.** `UPDATE conversations SET epoch = epoch + 1 WHERE
//!   id = $1 AND epoch = $2`: of concurrent commits for one epoch, on any
//!   nodes, one updates the row and the others find no row → `stale_epoch`.
//! - **Key packages.** `DELETE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED)`
//!   hands each one-time package out once and never makes a claim wait.
//! - **Wake-ups.** A send and a device removal `pg_notify` in their
//!   transaction (delivered only on commit); every node LISTENs on a
//!   dedicated connection ([`PgStore`]'s listener) and wakes its sockets.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use subrosa_proto::{
    AccountInfo, BlobId, ClaimResponse, ConversationId, DeviceAddress, DeviceId, DeviceRecord, Envelope, Epoch, Handle,
    KeyPackageCount, LinkId, MessageKind, SendId, SendRequest, B64,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    rules, LinkRecord, NewAccount, Quota, SendOutcome, Store, StoreError, StoreStats, SweepReport, TokenRequest, Tokens,
};
use crate::wakeup::Wakeups;

/// Schema migrations, applied in order; `schema_migrations` records which
/// ran. Append new steps, never edit old ones.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema (the SQLite backend's migrations 1 and 2).
    r"
    CREATE TABLE accounts (
        handle TEXT PRIMARY KEY,
        identity_key BYTEA NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE devices (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        handle TEXT NOT NULL REFERENCES accounts(handle),
        device_id TEXT NOT NULL,
        signature_key BYTEA NOT NULL,
        certificate BYTEA NOT NULL,
        active BOOLEAN NOT NULL DEFAULT TRUE,
        created_at BIGINT NOT NULL,
        UNIQUE (handle, device_id)
    );
    CREATE TABLE nonces (
        handle TEXT NOT NULL,
        device_id TEXT NOT NULL,
        nonce TEXT NOT NULL,
        timestamp BIGINT NOT NULL,
        PRIMARY KEY (handle, device_id, nonce)
    );
    CREATE INDEX nonces_by_time ON nonces(timestamp);
    CREATE TABLE key_packages (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        device BIGINT NOT NULL REFERENCES devices(id),
        data BYTEA NOT NULL
    );
    CREATE INDEX key_packages_by_device ON key_packages(device, id);
    CREATE TABLE last_resort_packages (
        device BIGINT PRIMARY KEY REFERENCES devices(id),
        data BYTEA NOT NULL
    );
    CREATE TABLE conversations (
        id BYTEA PRIMARY KEY,
        epoch BIGINT NOT NULL
    );
    CREATE TABLE send_ids (
        device BIGINT NOT NULL REFERENCES devices(id),
        send_id BYTEA NOT NULL,
        epoch BIGINT,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (device, send_id)
    );
    CREATE INDEX send_ids_by_time ON send_ids(created_at);
    CREATE TABLE messages (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        conversation BYTEA NOT NULL,
        sender BIGINT NOT NULL REFERENCES devices(id),
        kind TEXT NOT NULL,
        ciphertext BYTEA NOT NULL,
        created_at BIGINT NOT NULL
    );
    -- Ciphertext does not compress; keep it out of line without trying.
    ALTER TABLE messages ALTER COLUMN ciphertext SET STORAGE EXTERNAL;
    -- Ids come from a sequence with CACHE 1 (the default), so values are
    -- handed out in one increasing order across sessions; `send` draws them
    -- under the recipient devices' row locks (see there and the README).
    CREATE TABLE inbox (
        id BIGINT GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
        device BIGINT NOT NULL REFERENCES devices(id),
        message BIGINT NOT NULL REFERENCES messages(id),
        created_at BIGINT NOT NULL
    );
    CREATE INDEX inbox_by_device ON inbox(device, id);
    CREATE INDEX inbox_by_message ON inbox(message);
    CREATE INDEX inbox_by_time ON inbox(created_at);
    CREATE TABLE links (
        link BYTEA PRIMARY KEY,
        handle TEXT NOT NULL REFERENCES accounts(handle),
        request BYTEA NOT NULL,
        response BYTEA,
        expires_at BIGINT NOT NULL
    );
    CREATE INDEX links_by_expiry ON links(expires_at);
    ",
    // 2: the key-transparency directory (SQLite's migration 3; see
    // `store::kt` and `postgres/kt.rs`).
    r"
    CREATE TABLE kt_records (
        key BYTEA PRIMARY KEY,
        value BYTEA NOT NULL
    );
    CREATE TABLE kt_values (
        label BYTEA NOT NULL,
        epoch BIGINT NOT NULL,
        version BIGINT NOT NULL,
        value BYTEA NOT NULL,
        node_label_val BYTEA NOT NULL,
        node_label_len BIGINT NOT NULL,
        PRIMARY KEY (label, epoch)
    );
    CREATE TABLE kt_epochs (
        epoch BIGINT PRIMARY KEY,
        root_hash BYTEA NOT NULL
    );
    CREATE TABLE kt_vrf (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        private_key BYTEA NOT NULL
    );
    ",
    // 3: signed directory heads (SQLite's migration 4; see `store::kt`):
    // the head-signing key and directory id, and every head signed, one per
    // epoch.
    r"
    CREATE TABLE kt_signing (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        private_key BYTEA NOT NULL,
        directory_id BYTEA NOT NULL
    );
    CREATE TABLE kt_signed_heads (
        epoch BIGINT PRIMARY KEY,
        head BYTEA NOT NULL
    );
    ",
    // 4: conversation rosters (SQLite's migration 5; see `store::RosterChange`).
    r"
    ALTER TABLE conversations ADD COLUMN has_roster BOOLEAN NOT NULL DEFAULT FALSE;
    CREATE TABLE conversation_members (
        conversation BYTEA NOT NULL,
        device BIGINT NOT NULL REFERENCES devices(id),
        PRIMARY KEY (conversation, device)
    );
    CREATE INDEX conversation_members_by_device ON conversation_members(device);
    ALTER TABLE messages ADD COLUMN roster BYTEA;
    ",
    // 5: bytes of undelivered ciphertext per sending device, for the
    // quotas (see `store::Quota`), counted from what is stored now; and
    // conversations whose roster emptied (see `store::RosterChange`) go.
    r"
    CREATE TABLE device_usage (
        device BIGINT PRIMARY KEY REFERENCES devices(id),
        bytes BIGINT NOT NULL
    );
    INSERT INTO device_usage (device, bytes)
        SELECT sender, SUM(octet_length(ciphertext)) FROM messages GROUP BY sender;
    DELETE FROM conversations c WHERE c.has_roster
        AND NOT EXISTS (SELECT 1 FROM conversation_members m WHERE m.conversation = c.id);
    ",
    // 6: rate-limit buckets every node shares (see `Store::take_tokens`).
    // Unlogged: no WAL, no fsync per check; a crash empties the table,
    // which only refills every bucket. Keys are salted hashes, never a
    // client's address in the clear; the salt is random per database.
    r"
    CREATE UNLOGGED TABLE rate_buckets (
        key BYTEA PRIMARY KEY,
        tokens DOUBLE PRECISION NOT NULL,
        updated_ms BIGINT NOT NULL,
        taken BOOLEAN NOT NULL
    ) WITH (fillfactor = 70);
    CREATE TABLE rate_salt (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        salt BYTEA NOT NULL
    );
    INSERT INTO rate_salt (id, salt)
        VALUES (1, decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
    ",
    // 7: vacuum the delivery tables after every 1000 deleted rows, not after
    // a fifth of the table, and without throttling: acknowledged ciphertext
    // becomes free space within one autovacuum cycle (autovacuum_naptime,
    // 1 min by default) rather than whenever the table grew enough.
    r"
    ALTER TABLE inbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
                           autovacuum_vacuum_cost_delay = 0);
    ALTER TABLE messages SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
                              autovacuum_vacuum_cost_delay = 0,
                              toast.autovacuum_vacuum_scale_factor = 0, toast.autovacuum_vacuum_threshold = 1000,
                              toast.autovacuum_vacuum_cost_delay = 0);
    ",
    // 8: one-time key-package claims per (claimer, target) account in the
    // current hour (see `store::ClaimKind::Counted`); the sweeper deletes
    // windows an hour old.
    r"
    CREATE TABLE claim_windows (
        claimer TEXT NOT NULL,
        target TEXT NOT NULL,
        window_start BIGINT NOT NULL,
        claims BIGINT NOT NULL,
        PRIMARY KEY (claimer, target)
    );
    ",
    // 9: attachment blobs (SQLite's migration 8; see `store::BlobLimits`),
    // in the database so that any node serves any blob.
    r"
    CREATE TABLE blobs (
        id BIGSERIAL PRIMARY KEY,
        blob BYTEA NOT NULL UNIQUE,
        owner BIGINT NOT NULL REFERENCES devices(id),
        size BIGINT NOT NULL,
        received BIGINT NOT NULL DEFAULT 0,
        complete BOOLEAN NOT NULL DEFAULT FALSE,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL
    );
    CREATE INDEX blobs_by_owner ON blobs(owner);
    CREATE INDEX blobs_by_expiry ON blobs(expires_at);
    CREATE TABLE blob_readers (
        blob BIGINT NOT NULL REFERENCES blobs(id),
        device BIGINT NOT NULL REFERENCES devices(id),
        fetched BOOLEAN NOT NULL DEFAULT FALSE,
        PRIMARY KEY (blob, device)
    );
    CREATE TABLE blob_pieces (
        id BIGSERIAL PRIMARY KEY,
        blob BIGINT NOT NULL REFERENCES blobs(id),
        start BIGINT NOT NULL,
        data BYTEA NOT NULL,
        UNIQUE (blob, start)
    );
    ",
    // 10: disappearing messages (SQLite's migration 9): a message's expiry
    // as its sender declared it; the sweep deletes it then.
    r"
    ALTER TABLE messages ADD COLUMN expires_at BIGINT;
    CREATE INDEX messages_by_expiry ON messages(expires_at) WHERE expires_at IS NOT NULL;
    ",
    // 11: key packages under their MLS ciphersuite (SQLite's migration 10):
    // the classical suite 1 for those stored before; a last-resort package
    // per (device, suite).
    r"
    ALTER TABLE key_packages ADD COLUMN suite INTEGER NOT NULL DEFAULT 1;
    CREATE INDEX key_packages_by_device_suite ON key_packages(device, suite, id);
    ALTER TABLE last_resort_packages ADD COLUMN suite INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE last_resort_packages DROP CONSTRAINT last_resort_packages_pkey;
    ALTER TABLE last_resort_packages ADD PRIMARY KEY (device, suite);
    ",
    // 12: the call relay's token key (SQLite's migration 11), one row
    // shared by every node: a token one node issues, another accepts.
    r"
    CREATE TABLE relay_key (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        key BYTEA NOT NULL
    );
    ",
];

/// First key of the advisory lock taken around migrations (the second is
/// the schema's name hashed, so schemas migrate independently).
const MIGRATION_LOCK: i32 = 0x5342_5253; // "SBRS"
/// First key of the advisory lock a sweep holds (one node sweeps at a time).
const SWEEP_LOCK: i32 = 0x5342_5257; // "SBRW"
/// A rate-limit bucket unused this long is full whatever its limiter, so
/// the sweep forgets it.
const BUCKET_IDLE_MS: u64 = 3600 * 1000;
/// Connections per node.
pub const POOL_SIZE: usize = 16;
/// Waiting for a free pooled connection, or for a new one.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting (TCP and start-up).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One whole store operation (a batched one's wait for its batch included);
/// past this it answers `Unavailable`.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// One store operation that may go with others: `job` in the next batch of
/// `queue` (when there is one), else (or when the batch hands it back)
/// `alone`, through the same rule; all of it within [`OP_TIMEOUT`], as
/// [`in_tx!`] bounds an operation that never waits for a batch. So a hung
/// database makes it answer `Unavailable` after `OP_TIMEOUT`, not after the
/// batch wait plus that.
async fn batched<J: Send + 'static, T: Send + 'static>(
    queue: Option<&batch::Queue<J, Option<T>>>,
    job: impl FnOnce() -> J,
    alone: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let work = async {
        if let Some(queue) = queue {
            if let Some(out) = queue.run(job()).await {
                return Ok(out);
            }
        }
        alone.await
    };
    match tokio::time::timeout(OP_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Unavailable("database operation timed out".into())),
    }
}
/// Attempts of a transaction that failed before it started (a stale pooled
/// connection) or was rolled back by a deadlock or serialization failure.
const ATTEMPTS: u32 = 4;
/// Listener: pause before reconnecting, and how often it checks its connection.
const LISTEN_RETRY: Duration = Duration::from_secs(1);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(8);
const LISTEN_PROBE: Duration = Duration::from_secs(10);
/// Device addresses per notification (a payload must stay under 8000 bytes;
/// an address is at most 49).
const ADDRS_PER_NOTIFY: usize = 100;

/// How a node uses its database: connections and batch workers. Both
/// should follow the database host's cores; the defaults suit a database
/// on the node's own two cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgOptions {
    /// Pooled connections at most ([`POOL_SIZE`] by default).
    pub pool_size: usize,
    /// Workers per batch queue (four queues: plain sends,
    /// acknowledgements, rate-limit checks, socket reads), each holding a
    /// connection while its batch runs; 0 runs every operation alone (2 by
    /// default).
    pub batch_workers: usize,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions { pool_size: POOL_SIZE, batch_workers: batch::WORKERS }
    }
}

impl PgOptions {
    /// Whether these options leave room: at least one connection for
    /// operations that run alone once every batch worker holds one.
    ///
    /// # Errors
    /// The reason, as one line naming the command-line options.
    pub fn check(&self) -> Result<(), String> {
        let held = self.batch_workers.saturating_mul(batch::QUEUES);
        if self.pool_size == 0 || self.pool_size <= held {
            return Err(format!(
                "--db-pool-size must be above {held} (--db-batch-workers {} in each of {} batch queues, each \
                 worker holding a connection), got {}",
                self.batch_workers,
                batch::QUEUES,
                self.pool_size
            ));
        }
        Ok(())
    }
}

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    config: tokio_postgres::Config,
    /// TLS as the URL's `sslmode` asks (see [`tls`]); used by the pool and
    /// the listener alike.
    tls: MakeRustlsConnect,
    channel: String,
    /// Salt of the rate-limit bucket keys (`rate_salt`).
    bucket_salt: Vec<u8>,
    /// Plain sends and acknowledgements, committed in batches ([`batch`]);
    /// `None` in the copies the batch workers hold ([`PgStore::without_queues`]).
    sends: Option<Arc<batch::Queue<batch::SendJob, Option<SendOutcome>>>>,
    acks: Option<Arc<batch::Queue<batch::AckJob, Option<u64>>>>,
    /// Checks of the shared rate-limit buckets, a statement per batch.
    tokens: Option<Arc<batch::Queue<batch::TokenJob, Option<Tokens>>>>,
    /// Sockets' inbox reads, a statement per batch.
    fetches: Option<Arc<batch::Queue<batch::FetchJob, Option<Vec<Envelope>>>>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The configuration may hold a password: leave it out.
        f.debug_struct("PgStore").field("channel", &self.channel).finish_non_exhaustive()
    }
}

/// A failure inside an operation: a database error (classified by the
/// caller: retried, unavailable or internal) or an answer about the data.
#[derive(Debug)]
enum Fail {
    Db(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Db(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

type R<T> = Result<T, Fail>;

fn db_error(e: &tokio_postgres::Error) -> StoreError {
    if e.is_closed() {
        return StoreError::Unavailable(format!("database connection lost: {e}"));
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            // Connection exceptions, insufficient resources, operator
            // intervention (shutdown, cannot connect now), lock timeouts and
            // rolled-back transactions: the database may answer later.
            if c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57")
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::LOCK_NOT_AVAILABLE
            {
                StoreError::Unavailable(e.to_string())
            } else {
                StoreError::Internal(e.to_string())
            }
        }
        // No SQL state: an I/O error, a timeout, a failed connect.
        None => StoreError::Unavailable(e.to_string()),
    }
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => db_error(&e),
        other => StoreError::Unavailable(format!("no database connection: {other}")),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn parse_device_id(s: &str) -> Result<DeviceId, StoreError> {
    s.parse().map_err(|_| StoreError::Internal("stored device id is not valid".into()))
}

fn parse_handle(s: &str) -> Result<Handle, StoreError> {
    Handle::new(s).map_err(|_| StoreError::Internal("stored handle is not valid".into()))
}

fn device_record(device_id: &str, key: Vec<u8>, cert: Vec<u8>) -> Result<DeviceRecord, StoreError> {
    Ok(DeviceRecord { device_id: parse_device_id(device_id)?, signature_key: B64(key), certificate: B64(cert) })
}

/// The NOTIFY channel of a schema: `subrosa_wake_<schema>`, or for a schema
/// name too long for a channel (63 bytes), a 64-bit FNV-1a hash of it.
fn channel_name(schema: &str) -> String {
    let plain = format!("subrosa_wake_{schema}");
    if plain.len() <= 63 {
        return plain;
    }
    let hash = schema.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("subrosa_wake_{hash:016x}")
}

/// Quotes an identifier for SQL.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

async fn query<C: GenericClient>(c: &C, sql: &str, params: &[&(dyn ToSql + Sync)]) -> R<Vec<Row>> {
    let stmt = c.prepare_cached(sql).await?;
    Ok(c.query(&stmt, params).await?)
}

async fn query_opt<C: GenericClient>(c: &C, sql: &str, params: &[&(dyn ToSql + Sync)]) -> R<Option<Row>> {
    let stmt = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&stmt, params).await?)
}

async fn execute<C: GenericClient>(c: &C, sql: &str, params: &[&(dyn ToSql + Sync)]) -> R<u64> {
    let stmt = c.prepare_cached(sql).await?;
    Ok(c.execute(&stmt, params).await?)
}

/// Runs `$body` (an expression awaiting on `$tx`) in a transaction: retried
/// when the connection turned out dead before the transaction started or
/// the database rolled it back (deadlock, serialization failure), bounded by
/// [`OP_TIMEOUT`].
macro_rules! in_tx {
    ($self:ident, |$tx:ident| $body:expr) => {{
        let work = async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let mut client = $self.pool.get().await.map_err(pool_error)?;
                let $tx = match client.transaction().await {
                    Ok(tx) => tx,
                    Err(e) if attempt < ATTEMPTS => {
                        tracing::debug!(error = %e, "database connection unusable; retrying");
                        continue;
                    }
                    Err(e) => return Err(db_error(&e)),
                };
                let result: R<_> = async {
                    let body: R<_> = $body;
                    let out = body?;
                    $tx.commit().await?;
                    Ok(out)
                }
                .await;
                match result {
                    Ok(out) => return Ok(out),
                    Err(Fail::Store(e)) => return Err(e),
                    Err(Fail::Db(e)) => {
                        let retry = matches!(
                            e.code(),
                            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
                        );
                        if retry && attempt < ATTEMPTS {
                            tracing::debug!(error = %e, "transaction rolled back by the database; retrying");
                            continue;
                        }
                        return Err(db_error(&e));
                    }
                }
            }
        };
        match tokio::time::timeout(OP_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable("database operation timed out".into())),
        }
    }};
}

/// Like [`in_tx!`] for reads outside a transaction: retried once on a
/// connection that turned out to be closed (harmless for a read).
macro_rules! on_client {
    ($self:ident, |$c:ident| $body:expr) => {{
        let work = async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let $c = $self.pool.get().await.map_err(pool_error)?;
                let result: R<_> = $body;
                match result {
                    Ok(out) => return Ok(out),
                    Err(Fail::Store(e)) => return Err(e),
                    Err(Fail::Db(e)) if e.is_closed() && attempt < 2 => {
                        tracing::debug!(error = %e, "database connection lost; retrying the read");
                    }
                    Err(Fail::Db(e)) => return Err(db_error(&e)),
                }
            }
        };
        match tokio::time::timeout(OP_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable("database operation timed out".into())),
        }
    }};
}

impl PgStore {
    /// Connects to `url` (`postgres://…`; the schema is the connection's
    /// `search_path`, e.g. `?options=-csearch_path%3Dsubrosa`), runs pending
    /// migrations under an advisory lock (safe when several nodes start at
    /// once) and returns the store.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached;
    /// [`StoreError::Internal`] for a bad URL, a schema newer than this
    /// build or a failed migration.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, PgOptions::default()).await
    }

    /// [`PgStore::connect`] with a pool and batch workers sized by
    /// `options` (checked by [`PgOptions::check`]).
    ///
    /// # Errors
    /// As [`PgStore::connect`]; [`StoreError::Internal`] for options that
    /// do not hold.
    pub async fn connect_with(url: &str, options: PgOptions) -> Result<Self, StoreError> {
        options.check().map_err(StoreError::Internal)?;
        let tls::Parsed { mut config, tls, .. } = tls::parse(url)?;
        if config.get_application_name().is_none() {
            config.application_name("subrosa-server");
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.keepalives_interval(Duration::from_secs(5));
        config.keepalives_retries(3);
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Internal(format!("cannot build the connection pool: {e}")))?;
        let mut store = PgStore {
            pool,
            config,
            tls,
            channel: String::new(),
            bucket_salt: Vec::new(),
            sends: None,
            acks: None,
            tokens: None,
            fetches: None,
        };
        let schema = store.migrate().await?;
        store.channel = channel_name(&schema);
        store.bucket_salt = on_client!(store, |c| async {
            let row = query_opt(&c, "SELECT salt FROM rate_salt WHERE id = 1", &[]).await?;
            row.map(|r| r.get::<_, Vec<u8>>(0))
                .ok_or_else(|| Fail::Store(StoreError::Internal("the rate-limit salt is missing".into())))
        }
        .await)?;
        if options.batch_workers > 0 {
            let workers = options.batch_workers;
            store.sends = Some(batch::Queue::spawn(&store, workers, batch::run_sends));
            store.acks = Some(batch::Queue::spawn(&store, workers, batch::run_acks));
            store.tokens = Some(batch::Queue::spawn(&store, workers, batch::run_tokens));
            store.fetches = Some(batch::Queue::spawn(&store, workers, batch::run_fetches));
        }
        Ok(store)
    }

    /// A copy without the batch queues, for their workers: a worker holding
    /// a queue's sender would keep that queue's workers alive after the
    /// last store handle is gone.
    fn without_queues(&self) -> Self {
        PgStore { sends: None, acks: None, tokens: None, fetches: None, ..self.clone() }
    }

    /// For plain sends, acknowledgements, rate-limit checks and inbox
    /// reads ([`super::BATCH_KINDS`]): the batches run so far, the jobs they
    /// took and the jobs they answered (the rest ran alone).
    pub fn batch_counts(&self) -> [[u64; 3]; 4] {
        let of = |q: Option<[u64; 3]>| q.unwrap_or_default();
        [
            of(self.sends.as_ref().map(|q| q.counts())),
            of(self.acks.as_ref().map(|q| q.counts())),
            of(self.tokens.as_ref().map(|q| q.counts())),
            of(self.fetches.as_ref().map(|q| q.counts())),
        ]
    }

    /// The schema version this build migrates to.
    pub fn schema_version() -> usize {
        MIGRATIONS.len()
    }

    /// Applies pending migrations in one transaction holding a transaction
    /// advisory lock; returns the schema migrated.
    async fn migrate(&self) -> Result<String, StoreError> {
        in_tx!(self, |tx| async {
            let schema: Option<String> = query_opt(&tx, "SELECT current_schema()", &[]).await?.and_then(|r| r.get(0));
            let Some(schema) = schema else {
                return Err(Fail::Store(StoreError::Internal(
                    "no schema to create tables in: the search_path names no existing schema".into(),
                )));
            };
            tx.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&MIGRATION_LOCK, &schema]).await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version INTEGER PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
            )
            .await?;
            let row = tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[]).await?;
            let version = usize::try_from(row.get::<_, i32>(0)).unwrap_or(0);
            if version > MIGRATIONS.len() {
                return Err(Fail::Store(StoreError::Internal(format!(
                    "database schema version {version} is newer than this server ({})",
                    MIGRATIONS.len()
                ))));
            }
            for (i, step) in MIGRATIONS.iter().enumerate().skip(version) {
                tx.batch_execute(step).await?;
                let v = i32::try_from(i + 1).unwrap_or(i32::MAX);
                tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&v]).await?;
            }
            Ok::<_, Fail>(schema)
        }
        .await)
    }

    /// Spawns the node's listener: a dedicated connection LISTENing on this
    /// schema's channel that wakes (or revokes) local sockets named in other
    /// nodes' notifications. It reconnects when the connection drops, and
    /// then wakes every local socket, since a notification may have been
    /// missed meanwhile.
    pub fn spawn_listener(&self, wakeups: Arc<Wakeups>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        let config = self.config.clone();
        let tls = self.tls.clone();
        let channel = self.channel.clone();
        tokio::spawn(async move {
            let mut first = true;
            let mut pause = LISTEN_RETRY;
            loop {
                tokio::select! {
                    (reason, listened) = listen_once(&config, &tls, &channel, &wakeups, first) => {
                        tracing::warn!(reason = %reason, "database listener lost; reconnecting");
                        // Back off while the database stays unreachable.
                        pause = if listened { LISTEN_RETRY } else { (pause * 2).min(LISTEN_RETRY_MAX) };
                    }
                    _ = stop.changed() => return,
                }
                first = false;
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    }
}

/// One listening connection, until it fails; returns why, and whether it
/// got as far as listening.
async fn listen_once(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    channel: &str,
    wakeups: &Wakeups,
    first: bool,
) -> (String, bool) {
    let (client, mut connection) = match config.connect(tls.clone()).await {
        Ok(c) => c,
        Err(e) => return (format!("cannot connect: {e}"), false),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "listener connection failed");
                    return;
                }
                None => return,
            }
        }
    });
    let result = async {
        if let Err(e) = client.batch_execute(&format!("LISTEN {}", quote_ident(channel))).await {
            return (format!("LISTEN failed: {e}"), false);
        }
        if !first {
            // Whatever was notified while we were away is lost: every local
            // socket looks at its inbox (and its device) again.
            wakeups.wake_all();
        }
        tracing::debug!("listening for other nodes' wake-ups");
        let mut probe = tokio::time::interval(LISTEN_PROBE);
        probe.reset();
        loop {
            tokio::select! {
                payload = rx.recv() => match payload {
                    Some(p) => apply_notification(wakeups, &p),
                    None => return ("connection closed".to_owned(), true),
                },
                _ = probe.tick() => {
                    // A half-open connection never errors by itself.
                    match tokio::time::timeout(CONNECT_TIMEOUT, client.simple_query("")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return (format!("probe failed: {e}"), true),
                        Err(_) => return ("probe timed out".to_owned(), true),
                    }
                }
            }
        }
    }
    .await;
    driver.abort();
    result
}

/// Payload: `w ADDR…` (mail for these devices), `r ADDR…` (removed) or
/// `k ADDR…` (their keys changed).
fn apply_notification(wakeups: &Wakeups, payload: &str) {
    let mut parts = payload.split_ascii_whitespace();
    let apply: fn(&Wakeups, &DeviceAddress) = match parts.next() {
        Some("w") => Wakeups::wake,
        Some("r") => Wakeups::revoke,
        Some("k") => Wakeups::keys_changed,
        _ => return,
    };
    for addr in parts.filter_map(|a| a.parse::<DeviceAddress>().ok()) {
        apply(wakeups, &addr);
    }
}

async fn notify<C: GenericClient>(c: &C, channel: &str, kind: &str, addrs: &[DeviceAddress]) -> R<()> {
    for chunk in addrs.chunks(ADDRS_PER_NOTIFY) {
        let mut payload = kind.to_owned();
        for a in chunk {
            payload.push(' ');
            payload.push_str(&a.to_string());
        }
        execute(c, "SELECT pg_notify($1, $2)", &[&channel, &payload]).await?;
    }
    Ok(())
}

async fn device_row<C: GenericClient>(c: &C, addr: &DeviceAddress) -> R<Option<i64>> {
    Ok(query_opt(
        c,
        "SELECT id FROM devices WHERE handle = $1 AND device_id = $2 AND active",
        &[&addr.handle.as_str(), &addr.device.to_hex()],
    )
    .await?
    .map(|r| r.get(0)))
}

/// An account with its active devices.
async fn account_in<C: GenericClient>(c: &C, handle: &Handle) -> R<Option<AccountInfo>> {
    let Some(row) = query_opt(c, "SELECT identity_key FROM accounts WHERE handle = $1", &[&handle.as_str()]).await?
    else {
        return Ok(None);
    };
    let identity_key: Vec<u8> = row.get(0);
    let rows = query(
        c,
        "SELECT device_id, signature_key, certificate FROM devices
         WHERE handle = $1 AND active ORDER BY id",
        &[&handle.as_str()],
    )
    .await?;
    let devices =
        rows.into_iter().map(|r| device_record(r.get(0), r.get(1), r.get(2))).collect::<Result<Vec<_>, _>>()?;
    Ok(Some(AccountInfo { handle: handle.clone(), identity_key: B64(identity_key), devices, kt: None }))
}

async fn require_device<C: GenericClient>(c: &C, addr: &DeviceAddress) -> R<i64> {
    device_row(c, addr).await?.ok_or_else(|| Fail::Store(StoreError::UnknownDevice(addr.clone())))
}

async fn active_devices<C: GenericClient>(c: &C, handle: &Handle) -> R<u64> {
    let row = query_opt(c, "SELECT COUNT(*) FROM devices WHERE handle = $1 AND active", &[&handle.as_str()]).await?;
    Ok(row.map(|r| to_u64(r.get(0))).unwrap_or(0))
}

/// Locks the account row; false when there is no such account.
async fn lock_account<C: GenericClient>(c: &C, handle: &Handle) -> R<bool> {
    Ok(query_opt(c, "SELECT 1 FROM accounts WHERE handle = $1 FOR NO KEY UPDATE", &[&handle.as_str()]).await?.is_some())
}

async fn count_packages<C: GenericClient>(c: &C, device: i64) -> R<KeyPackageCount> {
    let suite = |r: &tokio_postgres::Row| u16::try_from(r.get::<_, i32>(0)).unwrap_or(0);
    let one_time = query(c, "SELECT suite, COUNT(*) FROM key_packages WHERE device = $1 GROUP BY suite", &[&device])
        .await?
        .iter()
        .map(|r| (suite(r), to_u64(r.get(1))))
        .collect::<Vec<_>>();
    let last_resort = query(c, "SELECT suite FROM last_resort_packages WHERE device = $1", &[&device])
        .await?
        .iter()
        .map(suite)
        .collect::<Vec<_>>();
    Ok(rules::package_count(&one_time, &last_resort))
}

/// Deletes the messages among `messages` that no inbox row refers to. The
/// rows are locked first (in id order), so of two transactions deleting
/// the last two inbox rows of one message, the second sees the first's
/// deletion and drops the message.
async fn drop_orphans<C: GenericClient>(c: &C, mut messages: Vec<i64>) -> R<u64> {
    if messages.is_empty() {
        return Ok(0);
    }
    messages.sort_unstable();
    messages.dedup();
    query(c, "SELECT id FROM messages WHERE id = ANY($1) ORDER BY id FOR UPDATE", &[&messages]).await?;
    let gone = query(
        c,
        "DELETE FROM messages m WHERE m.id = ANY($1) AND NOT EXISTS (SELECT 1 FROM inbox i WHERE i.message = m.id)
         RETURNING m.sender, octet_length(m.ciphertext)",
        &[&messages],
    )
    .await?;
    release(c, &gone).await?;
    Ok(gone.len() as u64)
}

/// Gives the bytes of deleted messages (rows of `sender, bytes`) back to
/// their senders' quotas, locking the counters in device order (no deadlock
/// between two transactions releasing for the same senders).
async fn release<C: GenericClient>(c: &C, gone: &[Row]) -> R<()> {
    let mut freed: std::collections::BTreeMap<i64, i64> = std::collections::BTreeMap::new();
    for r in gone {
        *freed.entry(r.get(0)).or_default() += i64::from(r.get::<_, i32>(1));
    }
    if freed.is_empty() {
        return Ok(());
    }
    let (devices, bytes): (Vec<i64>, Vec<i64>) = freed.into_iter().unzip();
    query(c, "SELECT device FROM device_usage WHERE device = ANY($1) ORDER BY device FOR NO KEY UPDATE", &[&devices])
        .await?;
    execute(
        c,
        "UPDATE device_usage u SET bytes = GREATEST(u.bytes - f.b, 0)
         FROM unnest($1::bigint[], $2::bigint[]) AS f(d, b) WHERE u.device = ANY($1::bigint[]) AND u.device = f.d",
        &[&devices, &bytes],
    )
    .await?;
    Ok(())
}

/// Undelivered bytes sent by this device, and by its account's devices.
async fn usage<C: GenericClient>(c: &C, device: i64, handle: &Handle) -> R<(u64, u64)> {
    let row = query_opt(
        c,
        "SELECT COALESCE((SELECT bytes FROM device_usage WHERE device = $1), 0),
                COALESCE((SELECT SUM(u.bytes) FROM device_usage u JOIN devices d ON d.id = u.device
                          WHERE d.handle = $2), 0)::BIGINT",
        &[&device, &handle.as_str()],
    )
    .await?;
    Ok(row.map(|r| (to_u64(r.get(0)), to_u64(r.get(1)))).unwrap_or((0, 0)))
}

/// Forgets each of these conversations whose roster is now empty: its last
/// member device left or was removed (see `store::RosterChange`).
async fn drop_if_unmanned<C: GenericClient>(c: &C, conversations: &[Vec<u8>]) -> R<()> {
    if conversations.is_empty() {
        return Ok(());
    }
    execute(
        c,
        "DELETE FROM conversations c WHERE c.id = ANY($1) AND c.has_roster
         AND NOT EXISTS (SELECT 1 FROM conversation_members m WHERE m.conversation = c.id)",
        &[&conversations],
    )
    .await?;
    Ok(())
}

async fn count_table<C: GenericClient>(c: &C, table: &str) -> R<u64> {
    // `table` only ever comes from the fixed list in `stats`.
    let rows = query(c, &format!("SELECT COUNT(*) FROM {table}"), &[]).await?;
    Ok(rows.first().map(|r| to_u64(r.get(0))).unwrap_or(0))
}

#[async_trait]
impl Store for PgStore {
    async fn register(&self, account: NewAccount, now_ms: u64) -> Result<(), StoreError> {
        let channel = self.channel.as_str();
        in_tx!(self, |tx| async { rules::register(&mut Pg { c: &tx, channel }, &account, now_ms).await }.await)
    }

    async fn add_device(&self, handle: &Handle, device: DeviceRecord, now_ms: u64) -> Result<(), StoreError> {
        let channel = self.channel.as_str();
        in_tx!(self, |tx| async { rules::add_device(&mut Pg { c: &tx, channel }, handle, &device, now_ms).await }.await)
    }

    async fn replace_keys(
        &self,
        caller: &DeviceAddress,
        identity_key: Vec<u8>,
        devices: Vec<DeviceRecord>,
    ) -> Result<(), StoreError> {
        let channel = self.channel.as_str();
        in_tx!(self, |tx| async {
            rules::replace_keys(&mut Pg { c: &tx, channel }, caller, &identity_key, &devices).await
        }
        .await)
    }

    async fn remove_device(&self, addr: &DeviceAddress) -> Result<(), StoreError> {
        let channel = self.channel.as_str();
        in_tx!(self, |tx| async { rules::remove_device(&mut Pg { c: &tx, channel }, addr).await }.await)
    }

    async fn delete_account(&self, caller: &DeviceAddress) -> Result<Vec<DeviceAddress>, StoreError> {
        let channel = self.channel.as_str();
        in_tx!(self, |tx| async { rules::delete_account(&mut Pg { c: &tx, channel }, caller).await }.await)
    }

    async fn device(&self, addr: &DeviceAddress) -> Result<Option<DeviceRecord>, StoreError> {
        on_client!(self, |c| async {
            let row = query_opt(
                &c,
                "SELECT device_id, signature_key, certificate FROM devices
                 WHERE handle = $1 AND device_id = $2 AND active",
                &[&addr.handle.as_str(), &addr.device.to_hex()],
            )
            .await?;
            Ok(row.map(|r| device_record(r.get(0), r.get(1), r.get(2))).transpose()?)
        }
        .await)
    }

    async fn account(&self, handle: &Handle) -> Result<Option<AccountInfo>, StoreError> {
        on_client!(self, |c| async { account_in(&c, handle).await }.await)
    }

    async fn check_nonce(&self, addr: &DeviceAddress, nonce: &str, timestamp_ms: u64) -> Result<bool, StoreError> {
        // A write: in a transaction, so a lost connection is retried only
        // when nothing can have been stored.
        in_tx!(self, |tx| async {
            let inserted = execute(
                &tx,
                "INSERT INTO nonces (handle, device_id, nonce, timestamp) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[&addr.handle.as_str(), &addr.device.to_hex(), &nonce, &to_i64(timestamp_ms)],
            )
            .await?;
            Ok(inserted == 1)
        }
        .await)
    }

    async fn upload_key_packages_in(
        &self,
        addr: &DeviceAddress,
        one_time: Vec<(u16, Vec<u8>)>,
        last_resort: Vec<(u16, Vec<u8>)>,
        replace: bool,
    ) -> Result<KeyPackageCount, StoreError> {
        let channel = self.channel.as_str();
        in_tx!(self, |tx| async {
            rules::upload_key_packages(&mut Pg { c: &tx, channel }, addr, &one_time, &last_resort, replace).await
        }
        .await)
    }

    async fn key_package_count(&self, addr: &DeviceAddress) -> Result<KeyPackageCount, StoreError> {
        on_client!(self, |c| async {
            let device = require_device(&c, addr).await?;
            count_packages(&c, device).await
        }
        .await)
    }

    async fn claim_key_packages_in(
        &self,
        handle: &Handle,
        requester: &DeviceAddress,
        kind: super::ClaimKind,
        suite: u16,
    ) -> Result<ClaimResponse, StoreError> {
        let channel = self.channel.as_str();
        in_tx!(self, |tx| async {
            rules::claim_key_packages(&mut Pg { c: &tx, channel }, handle, requester, kind, suite).await
        }
        .await)
    }

    async fn one_time_claims_left(&self, claimer: &Handle, target: &Handle, now_ms: u64) -> Result<u64, StoreError> {
        on_client!(self, |c| async {
            let row = query_opt(
                &c,
                "SELECT window_start, claims FROM claim_windows WHERE claimer = $1 AND target = $2",
                &[&claimer.as_str(), &target.as_str()],
            )
            .await?;
            Ok(rules::one_time_claims_left(row.map(|r| (to_u64(r.get(0)), to_u64(r.get(1)))), now_ms))
        }
        .await)
    }

    async fn send_within(
        &self,
        sender: &DeviceAddress,
        request: &SendRequest,
        quota: &Quota,
        now_ms: u64,
    ) -> Result<SendOutcome, StoreError> {
        // A plain send goes with the node's others in one transaction; what
        // the batch hands back runs alone, through the same rule.
        let plain = request.commit.is_none() && super::send_bytes(request) <= batch::MAX_BATCHED_SEND_BYTES;
        batched(
            self.sends.as_deref().filter(|_| plain),
            || batch::SendJob { sender: sender.clone(), request: request.clone(), quota: *quota, now_ms },
            async {
                in_tx!(self, |tx| async { send_tx(&tx, &self.channel, sender, request, quota, now_ms).await }.await)
            },
        )
        .await
    }

    async fn stored_bytes(&self, addr: &DeviceAddress) -> Result<(u64, u64), StoreError> {
        on_client!(self, |c| async {
            let row = query_opt(
                &c,
                "SELECT id FROM devices WHERE handle = $1 AND device_id = $2",
                &[&addr.handle.as_str(), &addr.device.to_hex()],
            )
            .await?;
            match row {
                Some(r) => usage(&c, r.get(0), &addr.handle).await,
                None => Ok((0, 0)),
            }
        }
        .await)
    }

    async fn send_with_nonce(
        &self,
        sender: &DeviceAddress,
        nonce: &str,
        timestamp_ms: u64,
        request: &SendRequest,
        quota: &Quota,
        now_ms: u64,
    ) -> Result<Option<SendOutcome>, StoreError> {
        // The nonce and the send in one transaction: one commit per send.
        let result = in_tx!(self, |tx| async {
            let inserted = execute(
                &tx,
                "INSERT INTO nonces (handle, device_id, nonce, timestamp) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[&sender.handle.as_str(), &sender.device.to_hex(), &nonce, &to_i64(timestamp_ms)],
            )
            .await?;
            if inserted == 0 {
                return Ok(None);
            }
            send_tx(&tx, &self.channel, sender, request, quota, now_ms).await.map(Some)
        }
        .await);
        match result {
            // A refused send rolled its nonce back with it: remember the
            // nonce alone (the rare path; no savepoint round trips on the
            // common one).
            Err(
                refused @ (StoreError::UnknownDevice(_)
                | StoreError::StaleEpoch { .. }
                | StoreError::NotAMember
                | StoreError::QuotaExceeded { .. }),
            ) => {
                self.check_nonce(sender, nonce, timestamp_ms).await?;
                Err(refused)
            }
            other => other,
        }
    }

    async fn fetch_inbox(
        &self,
        addr: &DeviceAddress,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Envelope>, StoreError> {
        // Fetches of many sockets at once go in one statement.
        batched(self.fetches.as_deref(), || batch::FetchJob { device: addr.clone(), after, limit, max_bytes }, async {
            on_client!(self, |c| async {
                let Some(device) = device_row(&c, addr).await? else { return Ok(Vec::new()) };
                let rows = query(
                    &c,
                    "SELECT i.id, m.conversation, d.handle, d.device_id, m.kind, m.ciphertext, m.created_at, m.roster
                         FROM inbox i
                         JOIN messages m ON m.id = i.message
                         JOIN devices d ON d.id = m.sender
                         WHERE i.device = $1 AND i.id > $2
                         ORDER BY i.id
                         LIMIT $3",
                    &[&device, &to_i64(after), &i64::try_from(limit).unwrap_or(i64::MAX)],
                )
                .await?;
                Ok(envelopes(&rows, 0, max_bytes)?)
            }
            .await)
        })
        .await
    }

    async fn ack(&self, addr: &DeviceAddress, ids: &[u64]) -> Result<u64, StoreError> {
        let channel = self.channel.as_str();
        batched(self.acks.as_deref(), || batch::AckJob { device: addr.clone(), ids: ids.to_vec() }, async {
            in_tx!(self, |tx| async { rules::ack(&mut Pg { c: &tx, channel }, addr, ids).await }.await)
        })
        .await
    }

    async fn conversation_epoch(&self, conversation: &ConversationId) -> Result<Epoch, StoreError> {
        on_client!(self, |c| async {
            let epoch = query_opt(&c, "SELECT epoch FROM conversations WHERE id = $1", &[&&conversation.0[..]]).await?;
            Ok(Epoch(epoch.map(|r| to_u64(r.get(0))).unwrap_or(0)))
        }
        .await)
    }

    async fn relay_key(&self, candidate: [u8; 32]) -> Result<[u8; 32], StoreError> {
        in_tx!(self, |tx| async {
            execute(
                &tx,
                "INSERT INTO relay_key (id, key) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
                &[&&candidate[..]],
            )
            .await?;
            let row = query_opt(&tx, "SELECT key FROM relay_key WHERE id = 1", &[]).await?;
            let key: Vec<u8> =
                row.map(|r| r.get(0)).ok_or_else(|| StoreError::Internal("the relay key row is missing".into()))?;
            let key: [u8; 32] =
                key.try_into().map_err(|_| StoreError::Internal("the stored relay key is not 32 bytes".into()))?;
            Ok(key)
        }
        .await)
    }

    async fn in_roster(&self, conversation: &ConversationId, device: &DeviceAddress) -> Result<bool, StoreError> {
        on_client!(self, |c| async {
            let Some(row) = device_row(&c, device).await? else { return Ok(false) };
            let found = query_opt(
                &c,
                "SELECT 1 FROM conversations c JOIN conversation_members m ON m.conversation = c.id
                 WHERE c.id = $1 AND c.has_roster AND m.device = $2",
                &[&&conversation.0[..], &row],
            )
            .await?;
            Ok(found.is_some())
        }
        .await)
    }

    async fn create_link(
        &self,
        link: &LinkId,
        handle: &Handle,
        request: Vec<u8>,
        expires_at_ms: u64,
    ) -> Result<(), StoreError> {
        let channel = self.channel.as_str();
        in_tx!(self, |tx| async {
            rules::create_link(&mut Pg { c: &tx, channel }, link, handle, &request, expires_at_ms).await
        }
        .await)
    }

    async fn link(&self, link: &LinkId, handle: &Handle, now_ms: u64) -> Result<LinkRecord, StoreError> {
        on_client!(self, |c| async {
            let row = query_opt(
                &c,
                "SELECT request, expires_at, response IS NOT NULL FROM links
                 WHERE link = $1 AND handle = $2 AND expires_at > $3",
                &[&&link.0[..], &handle.as_str(), &to_i64(now_ms)],
            )
            .await?
            .ok_or(Fail::Store(StoreError::UnknownLink))?;
            Ok(LinkRecord {
                link: *link,
                handle: handle.clone(),
                request: row.get(0),
                expires_at: to_u64(row.get(1)),
                approved: row.get(2),
            })
        }
        .await)
    }

    async fn approve_link(
        &self,
        link: &LinkId,
        handle: &Handle,
        response: Vec<u8>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let channel = self.channel.as_str();
        in_tx!(self, |tx| async {
            rules::approve_link(&mut Pg { c: &tx, channel }, link, handle, &response, now_ms).await
        }
        .await)
    }

    async fn take_link_response(&self, link: &LinkId, now_ms: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let channel = self.channel.as_str();
        in_tx!(self, |tx| async { rules::take_link_response(&mut Pg { c: &tx, channel }, link, now_ms).await }.await)
    }

    async fn create_blob(
        &self,
        owner: &DeviceAddress,
        blob: &BlobId,
        size: u64,
        readers: &[DeviceAddress],
        limits: &super::BlobLimits,
        now_ms: u64,
        expires_at_ms: u64,
    ) -> Result<(), StoreError> {
        let channel = self.channel.as_str();
        in_tx!(self, |tx| async {
            rules::create_blob(&mut Pg { c: &tx, channel }, owner, blob, size, readers, limits, now_ms, expires_at_ms)
                .await
        }
        .await)
    }

    async fn append_blob(
        &self,
        owner: &DeviceAddress,
        blob: &BlobId,
        offset: u64,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<super::BlobStatus, StoreError> {
        let channel = self.channel.as_str();
        in_tx!(self, |tx| async {
            rules::append_blob(&mut Pg { c: &tx, channel }, owner, blob, offset, bytes, now_ms).await
        }
        .await)
    }

    async fn blob_status(
        &self,
        caller: &DeviceAddress,
        blob: &BlobId,
        now_ms: u64,
    ) -> Result<super::BlobStatus, StoreError> {
        let channel = self.channel.as_str();
        on_client!(self, |c| async { rules::blob_status(&mut Pg { c: &c, channel }, caller, blob, now_ms).await }.await)
    }

    async fn finish_blob(
        &self,
        owner: &DeviceAddress,
        blob: &BlobId,
        now_ms: u64,
    ) -> Result<super::BlobStatus, StoreError> {
        let channel = self.channel.as_str();
        in_tx!(self, |tx| async { rules::finish_blob(&mut Pg { c: &tx, channel }, owner, blob, now_ms).await }.await)
    }

    async fn read_blob(
        &self,
        reader: &DeviceAddress,
        blob: &BlobId,
        offset: u64,
        length: u64,
        now_ms: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let channel = self.channel.as_str();
        on_client!(self, |c| async {
            rules::read_blob(&mut Pg { c: &c, channel }, reader, blob, offset, length, now_ms).await
        }
        .await)
    }

    async fn blob_fetched(&self, reader: &DeviceAddress, blob: &BlobId, now_ms: u64) -> Result<bool, StoreError> {
        let channel = self.channel.as_str();
        in_tx!(self, |tx| async { rules::blob_fetched(&mut Pg { c: &tx, channel }, reader, blob, now_ms).await }.await)
    }

    async fn sweep(
        &self,
        inbox_before_ms: u64,
        nonces_before_ms: u64,
        send_ids_before_ms: u64,
        now_ms: u64,
    ) -> Result<SweepReport, StoreError> {
        in_tx!(self, |tx| async {
            // Every node sweeps; one at a time is enough (the others skip
            // this round rather than wait or contend for the same rows).
            let ours: bool = query_opt(
                &tx,
                "SELECT pg_try_advisory_xact_lock($1, hashtext(COALESCE(current_schema(), '')))",
                &[&SWEEP_LOCK],
            )
            .await?
            .map(|r| r.get(0))
            .unwrap_or(false);
            if !ours {
                return Ok(SweepReport::default());
            }
            let mut messages: Vec<i64> =
                query(&tx, "DELETE FROM inbox WHERE created_at < $1 RETURNING message", &[&to_i64(inbox_before_ms)])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
            // Disappearing messages: gone at their expiry, delivered or not.
            messages.extend(
                query(
                    &tx,
                    "DELETE FROM inbox WHERE message IN
                     (SELECT id FROM messages WHERE expires_at IS NOT NULL AND expires_at <= $1)
                     RETURNING message",
                    &[&to_i64(now_ms)],
                )
                .await?
                .iter()
                .map(|r| r.get::<_, i64>(0)),
            );
            let inbox_rows = messages.len() as u64;
            messages.sort_unstable();
            messages.dedup();
            let mut dropped = drop_orphans(&tx, messages).await?;
            // Anything else without an inbox row (none is expected).
            let strays = query(
                &tx,
                "DELETE FROM messages m WHERE NOT EXISTS (SELECT 1 FROM inbox i WHERE i.message = m.id)
                 RETURNING m.sender, octet_length(m.ciphertext)",
                &[],
            )
            .await?;
            release(&tx, &strays).await?;
            dropped += strays.len() as u64;
            let nonces = execute(&tx, "DELETE FROM nonces WHERE timestamp < $1", &[&to_i64(nonces_before_ms)]).await?;
            let send_ids =
                execute(&tx, "DELETE FROM send_ids WHERE created_at < $1", &[&to_i64(send_ids_before_ms)]).await?;
            let links = execute(&tx, "DELETE FROM links WHERE expires_at <= $1", &[&to_i64(now_ms)]).await?;
            let expired: Vec<i64> =
                query(&tx, "SELECT id FROM blobs WHERE expires_at <= $1 FOR UPDATE", &[&to_i64(now_ms)])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
            for blob in &expired {
                rules::BlobStatements::delete_blob(&mut Pg { c: &tx, channel: self.channel.as_str() }, *blob).await?;
            }
            let blobs = expired.len() as u64;
            // A claim window an hour old counts nothing any more.
            execute(
                &tx,
                "DELETE FROM claim_windows WHERE window_start <= $1",
                &[&to_i64(now_ms.saturating_sub(super::CLAIM_WINDOW_MS))],
            )
            .await?;
            // Every limiter's bucket is full an hour after its last use.
            execute(
                &tx,
                "DELETE FROM rate_buckets WHERE updated_ms < $1",
                &[&to_i64(now_ms.saturating_sub(BUCKET_IDLE_MS))],
            )
            .await?;
            Ok(SweepReport { inbox_rows, messages: dropped, nonces, send_ids, links, blobs })
        }
        .await)
    }

    async fn take_tokens(&self, request: &TokenRequest<'_>, now_ms: u64) -> Result<Option<Tokens>, StoreError> {
        let key = {
            let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            h.update(&self.bucket_salt);
            h.update(request.kind.as_bytes());
            h.update(&[0]);
            h.update(request.key.as_bytes());
            h.finish().as_ref()[..16].to_vec()
        };
        let initial = (request.burst - request.cost).max(-request.burst);
        let per_ms = request.rate / 1000.0;
        let job = batch::TokenJob {
            key,
            initial,
            now_ms: to_i64(now_ms),
            burst: request.burst,
            cost: request.cost,
            debt: request.debt,
            per_ms,
        };
        // Alone: the batch's one statement with one row (an upsert, so it
        // always answers the row).
        let alone = async {
            let answers = on_client!(self, |c| async { batch::take_distinct(&c, &[&job]).await }.await)?;
            answers.get(&job.key).copied().ok_or_else(|| StoreError::Internal("a bucket check answered no row".into()))
        };
        batched(self.tokens.as_deref(), || job.clone(), alone).await.map(Some)
    }

    fn kt_storage(&self) -> Arc<dyn super::kt::KtStorage> {
        Arc::new(self.clone())
    }

    fn pool_state(&self) -> Option<super::PoolState> {
        let s = self.pool.status();
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        Some(super::PoolState {
            max: n(s.max_size),
            open: n(s.size),
            idle: n(s.available),
            waiting: n(s.waiting),
            batches: self.batch_counts(),
        })
    }

    async fn maintenance(&self) -> Result<(), StoreError> {
        // Autovacuum reclaims deleted rows; nothing to do per sweep.
        Ok(())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        on_client!(self, |c| async {
            Ok(StoreStats {
                accounts: count_table(&c, "accounts").await?,
                devices: count_table(&c, "devices").await?,
                one_time_key_packages: count_table(&c, "key_packages").await?,
                last_resort_key_packages: count_table(&c, "last_resort_packages").await?,
                messages: count_table(&c, "messages").await?,
                handshake_messages: count_table(&c, "messages WHERE kind <> 'application'").await?,
                inbox_rows: count_table(&c, "inbox").await?,
                nonces: count_table(&c, "nonces").await?,
                send_ids: count_table(&c, "send_ids").await?,
                conversations: count_table(&c, "conversations").await?,
                links: count_table(&c, "links").await?,
                blobs: count_table(&c, "blobs").await?,
                blob_bytes: query_opt(&c, "SELECT COALESCE(SUM(received), 0)::BIGINT FROM blobs", &[])
                    .await?
                    .map(|r| to_u64(r.get(0)))
                    .unwrap_or(0),
            })
        }
        .await)
    }

    fn spawn_listener(&self, wakeups: Arc<Wakeups>, stop: watch::Receiver<bool>) -> Option<JoinHandle<()>> {
        Some(PgStore::spawn_listener(self, wakeups, stop))
    }
}

/// The blob statements (see [`rules::BlobStatements`]); `lock_blob` takes
/// the blob's row lock, so appends, finishes and fetches of one blob run
/// one at a time on any nodes.
impl<C: GenericClient + Sync> rules::BlobStatements for Pg<'_, C> {
    async fn account_blob_bytes(&mut self, handle: &Handle) -> R<u64> {
        let row = query_opt(
            self.c,
            "SELECT COALESCE(SUM(b.size), 0)::BIGINT FROM blobs b JOIN devices d ON d.id = b.owner WHERE d.handle = $1",
            &[&handle.as_str()],
        )
        .await?;
        Ok(row.map(|r| to_u64(r.get(0))).unwrap_or(0))
    }

    async fn insert_blob(
        &mut self,
        blob: &BlobId,
        owner: i64,
        size: u64,
        now_ms: u64,
        expires_at_ms: u64,
    ) -> R<Option<i64>> {
        Ok(query_opt(
            self.c,
            "INSERT INTO blobs (blob, owner, size, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (blob) DO NOTHING RETURNING id",
            &[&&blob.0[..], &owner, &to_i64(size), &to_i64(now_ms), &to_i64(expires_at_ms)],
        )
        .await?
        .map(|r| r.get(0)))
    }

    async fn insert_blob_readers(&mut self, blob: i64, readers: &[i64]) -> R<()> {
        execute(
            self.c,
            "INSERT INTO blob_readers (blob, device) SELECT $1, unnest($2::bigint[]) ON CONFLICT DO NOTHING",
            &[&blob, &readers],
        )
        .await?;
        Ok(())
    }

    async fn lock_blob(&mut self, blob: &BlobId, now_ms: u64) -> R<Option<rules::BlobRow>> {
        pg_blob_row(self.c, blob, now_ms, " FOR UPDATE").await
    }

    async fn blob(&mut self, blob: &BlobId, now_ms: u64) -> R<Option<rules::BlobRow>> {
        pg_blob_row(self.c, blob, now_ms, "").await
    }

    async fn append_piece(&mut self, blob: i64, offset: u64, bytes: &[u8]) -> R<()> {
        execute(
            self.c,
            "INSERT INTO blob_pieces (blob, start, data) VALUES ($1, $2, $3)",
            &[&blob, &to_i64(offset), &bytes],
        )
        .await?;
        execute(
            self.c,
            "UPDATE blobs SET received = $2 WHERE id = $1",
            &[&blob, &to_i64(offset.saturating_add(bytes.len() as u64))],
        )
        .await?;
        Ok(())
    }

    async fn set_blob_complete(&mut self, blob: i64) -> R<()> {
        execute(self.c, "UPDATE blobs SET complete = TRUE WHERE id = $1", &[&blob]).await?;
        Ok(())
    }

    async fn is_blob_reader(&mut self, blob: i64, device: i64) -> R<bool> {
        Ok(query_opt(self.c, "SELECT 1 FROM blob_readers WHERE blob = $1 AND device = $2", &[&blob, &device])
            .await?
            .is_some())
    }

    async fn blob_pieces(&mut self, blob: i64, offset: u64, length: u64) -> R<Vec<(u64, Vec<u8>)>> {
        let rows = query(
            self.c,
            "SELECT start, data FROM blob_pieces
             WHERE blob = $1 AND start < $3 AND start + octet_length(data) > $2 ORDER BY start",
            &[&blob, &to_i64(offset), &to_i64(offset.saturating_add(length))],
        )
        .await?;
        Ok(rows.iter().map(|r| (to_u64(r.get(0)), r.get(1))).collect())
    }

    async fn mark_blob_fetched(&mut self, blob: i64, device: i64) -> R<u64> {
        execute(self.c, "UPDATE blob_readers SET fetched = TRUE WHERE blob = $1 AND device = $2", &[&blob, &device])
            .await?;
        let row =
            query_opt(self.c, "SELECT COUNT(*) FROM blob_readers WHERE blob = $1 AND NOT fetched", &[&blob]).await?;
        Ok(row.map(|r| to_u64(r.get(0))).unwrap_or(0))
    }

    async fn delete_blob(&mut self, blob: i64) -> R<()> {
        for sql in [
            "DELETE FROM blob_pieces WHERE blob = $1",
            "DELETE FROM blob_readers WHERE blob = $1",
            "DELETE FROM blobs WHERE id = $1",
        ] {
            execute(self.c, sql, &[&blob]).await?;
        }
        Ok(())
    }
}

async fn pg_blob_row<C: GenericClient>(c: &C, blob: &BlobId, now_ms: u64, lock: &str) -> R<Option<rules::BlobRow>> {
    let sql =
        format!("SELECT id, owner, size, received, complete FROM blobs WHERE blob = $1 AND expires_at > $2{lock}");
    Ok(query_opt(c, &sql, &[&&blob.0[..], &to_i64(now_ms)]).await?.map(|r| rules::BlobRow {
        row: r.get(0),
        owner: r.get(1),
        size: to_u64(r.get(2)),
        received: to_u64(r.get(3)),
        complete: r.get(4),
    }))
}

/// The active devices of a conversation's roster.
async fn roster_of<C: GenericClient>(tx: &C, conversation: &[u8]) -> R<Vec<DeviceAddress>> {
    let rows = query(
        tx,
        "SELECT d.handle, d.device_id FROM conversation_members m JOIN devices d ON d.id = m.device
         WHERE m.conversation = $1 AND d.active",
        &[&conversation],
    )
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let handle: String = r.get(0);
        let device: String = r.get(1);
        out.push(DeviceAddress { handle: parse_handle(&handle)?, device: parse_device_id(&device)? });
    }
    Ok(out)
}

/// Applies an accepted commit's roster change inside the caller's transaction.
async fn set_roster<C: GenericClient>(tx: &C, conversation: &[u8], change: super::RosterChange<'_>) -> R<()> {
    let devices = match change {
        super::RosterChange::Replace(devices) => {
            execute(tx, "DELETE FROM conversation_members WHERE conversation = $1", &[&conversation]).await?;
            devices
        }
        super::RosterChange::Extend(devices) => devices,
    };
    let handles: Vec<&str> = devices.iter().map(|a| a.handle.as_str()).collect();
    let device_ids: Vec<String> = devices.iter().map(|a| a.device.to_hex()).collect();
    // A device the server no longer knows (revoked) is not a member.
    execute(
        tx,
        "INSERT INTO conversation_members (conversation, device)
         SELECT DISTINCT $1::bytea, d.id FROM devices d
         JOIN unnest($2::text[], $3::text[]) AS r(handle, device_id)
           ON d.handle = r.handle AND d.device_id = r.device_id
         WHERE d.active
         ON CONFLICT DO NOTHING",
        &[&conversation, &handles, &device_ids],
    )
    .await?;
    execute(tx, "UPDATE conversations SET has_roster = TRUE WHERE id = $1", &[&conversation]).await?;
    drop_if_unmanned(tx, &[conversation.to_vec()]).await
}

/// The statements of [`super::rules`] inside one transaction. Concurrent
/// transactions, on this node or others, are kept apart with row locks,
/// always taken in the order the rules call these: the account, then
/// conversations (in id order), then devices (in id order), then the
/// sender's usage counter.
struct Pg<'a, C> {
    c: &'a C,
    channel: &'a str,
}

impl<C: GenericClient + Sync> rules::Statements for Pg<'_, C> {
    type Error = Fail;

    async fn device_row(&mut self, addr: &DeviceAddress) -> R<Option<i64>> {
        device_row(self.c, addr).await
    }

    async fn lock_device(&mut self, addr: &DeviceAddress) -> R<Option<i64>> {
        Ok(query_opt(
            self.c,
            "SELECT id FROM devices WHERE handle = $1 AND device_id = $2 AND active FOR NO KEY UPDATE",
            &[&addr.handle.as_str(), &addr.device.to_hex()],
        )
        .await?
        .map(|r| r.get(0)))
    }

    async fn lock_account(&mut self, handle: &Handle) -> R<bool> {
        lock_account(self.c, handle).await
    }

    async fn active_devices(&mut self, handle: &Handle) -> R<u64> {
        active_devices(self.c, handle).await
    }

    async fn claim_send_id(&mut self, sender: i64, send_id: &SendId, now_ms: u64) -> R<Option<rules::SeenSend>> {
        // Inserted first: a concurrent send with the same id waits here for
        // the first to commit (then this one is a duplicate) or roll back.
        let send_id = &send_id.0[..];
        let fresh = execute(
            self.c,
            "INSERT INTO send_ids (device, send_id, epoch, created_at) VALUES ($1, $2, NULL, $3)
             ON CONFLICT (device, send_id) DO NOTHING",
            &[&sender, &send_id, &to_i64(now_ms)],
        )
        .await?;
        if fresh == 1 {
            return Ok(None);
        }
        let row = query_opt(
            self.c,
            "SELECT epoch, created_at FROM send_ids WHERE device = $1 AND send_id = $2",
            &[&sender, &send_id],
        )
        .await?
        .ok_or_else(|| Fail::Store(StoreError::Unavailable("send id vanished; retry".into())))?;
        let epoch: Option<i64> = row.get(0);
        Ok(Some(rules::SeenSend { epoch: epoch.map(|e| Epoch(to_u64(e))), created_at: to_u64(row.get(1)) }))
    }

    async fn set_send_epoch(&mut self, sender: i64, send_id: &SendId, epoch: Epoch) -> R<()> {
        execute(
            self.c,
            "UPDATE send_ids SET epoch = $3 WHERE device = $1 AND send_id = $2",
            &[&sender, &&send_id.0[..], &to_i64(epoch.0)],
        )
        .await?;
        Ok(())
    }

    async fn conversation(&mut self, conversation: &ConversationId, sender: i64) -> R<rules::ConversationState> {
        let row = query_opt(
            self.c,
            "SELECT c.epoch, NOT c.has_roster OR EXISTS (
                 SELECT 1 FROM conversation_members m WHERE m.conversation = c.id AND m.device = $2)
             FROM conversations c WHERE c.id = $1",
            &[&&conversation.0[..], &sender],
        )
        .await?;
        Ok(match row {
            Some(r) => rules::ConversationState { epoch: Epoch(to_u64(r.get(0))), sender_allowed: r.get(1) },
            None => rules::ConversationState { epoch: Epoch(0), sender_allowed: true },
        })
    }

    async fn advance_epoch(&mut self, conversation: &ConversationId, from: Epoch) -> R<Option<Epoch>> {
        // Of concurrent commits for one epoch, on any nodes, one updates
        // (or creates) the row and the others find none: stale.
        let c = &conversation.0[..];
        let bumped = query_opt(
            self.c,
            "UPDATE conversations SET epoch = epoch + 1 WHERE id = $1 AND epoch = $2 RETURNING epoch",
            &[&c, &to_i64(from.0)],
        )
        .await?;
        let bumped =
            match bumped {
                Some(r) => Some(r),
                None if from.0 == 0 => query_opt(
                    self.c,
                    "INSERT INTO conversations (id, epoch) VALUES ($1, 1) ON CONFLICT (id) DO NOTHING RETURNING epoch",
                    &[&c],
                )
                .await?,
                None => None,
            };
        Ok(bumped.map(|r| Epoch(to_u64(r.get(0)))))
    }

    async fn roster(&mut self, conversation: &ConversationId) -> R<Vec<DeviceAddress>> {
        roster_of(self.c, &conversation.0[..]).await
    }

    async fn set_roster(&mut self, conversation: &ConversationId, change: super::RosterChange<'_>) -> R<()> {
        set_roster(self.c, &conversation.0[..], change).await
    }

    async fn lock_recipients(&mut self, addrs: &[&DeviceAddress]) -> R<Vec<Option<i64>>> {
        // In id order (no deadlock between sends with overlapping
        // recipients); a device removed meanwhile is not returned, since
        // the lock re-checks `active`. The inbox ids are drawn only after
        // this, while the transaction holds every recipient's row: for each
        // device, sends draw and commit one at a time, so its ids commit in
        // increasing order.
        let handles: Vec<&str> = addrs.iter().map(|a| a.handle.as_str()).collect();
        let device_ids: Vec<String> = addrs.iter().map(|a| a.device.to_hex()).collect();
        let rows = query(
            self.c,
            // The ids first, each by its index (a join over the whole
            // table is what the planner picks before it has statistics),
            // then the rows locked by primary key in id order.
            "SELECT d.id, d.handle, d.device_id FROM devices d
             WHERE d.id = ANY(ARRAY(
                 SELECT f.id FROM unnest($1::text[], $2::text[]) AS r(handle, device_id)
                 CROSS JOIN LATERAL (
                     SELECT id FROM devices WHERE handle = r.handle AND device_id = r.device_id LIMIT 1) f))
               AND d.active
             ORDER BY d.id
             FOR NO KEY UPDATE",
            &[&handles, &device_ids],
        )
        .await?;
        let mut row_of: HashMap<(String, String), i64> = HashMap::with_capacity(rows.len());
        for r in &rows {
            row_of.insert((r.get(1), r.get(2)), r.get(0));
        }
        Ok(addrs.iter().zip(device_ids).map(|(a, d)| row_of.get(&(a.handle.as_str().to_owned(), d)).copied()).collect())
    }

    async fn add_usage(&mut self, device: i64, bytes: u64) -> R<u64> {
        // Locks the sender's counter, so its own sends are counted one after
        // another; sends of the account's other devices in flight at the
        // same moment are not seen, so an account may pass its quota by at
        // most one send per device.
        let total: i64 = query_opt(
            self.c,
            "INSERT INTO device_usage (device, bytes) VALUES ($1, $2)
             ON CONFLICT (device) DO UPDATE SET bytes = device_usage.bytes + excluded.bytes RETURNING bytes",
            &[&device, &to_i64(bytes)],
        )
        .await?
        .map(|r| r.get(0))
        .ok_or_else(|| Fail::Store(StoreError::Internal("usage update returned no row".into())))?;
        Ok(to_u64(total))
    }

    async fn account_usage(&mut self, handle: &Handle) -> R<u64> {
        let row = query_opt(
            self.c,
            "SELECT COALESCE(SUM(u.bytes), 0)::BIGINT FROM device_usage u JOIN devices d ON d.id = u.device
             WHERE d.handle = $1",
            &[&handle.as_str()],
        )
        .await?;
        Ok(row.map(|r| to_u64(r.get(0))).unwrap_or(0))
    }

    async fn insert_message(
        &mut self,
        conversation: &ConversationId,
        sender: i64,
        kind: MessageKind,
        ciphertext: &[u8],
        roster: Option<&[u8]>,
        expires_at: Option<u64>,
        now_ms: u64,
    ) -> R<i64> {
        query_opt(
            self.c,
            "INSERT INTO messages (conversation, sender, kind, ciphertext, created_at, roster, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            &[
                &&conversation.0[..],
                &sender,
                &kind.as_str(),
                &ciphertext,
                &to_i64(now_ms),
                &roster,
                &expires_at.map(to_i64),
            ],
        )
        .await?
        .map(|r| r.get(0))
        .ok_or_else(|| Fail::Store(StoreError::Internal("insert returned no id".into())))
    }

    async fn insert_inbox(&mut self, rows: &[(i64, i64)], now_ms: u64) -> R<()> {
        let (devices, messages): (Vec<i64>, Vec<i64>) = rows.iter().copied().unzip();
        execute(
            self.c,
            "INSERT INTO inbox (device, message, created_at)
             SELECT d, m, $3 FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS t(d, m, n) ORDER BY n",
            &[&devices, &messages, &to_i64(now_ms)],
        )
        .await?;
        Ok(())
    }

    async fn notify_wake(&mut self, addrs: &[DeviceAddress]) -> R<()> {
        notify(self.c, self.channel, "w", addrs).await
    }

    async fn insert_device(&mut self, handle: &Handle, device: &DeviceRecord, now_ms: u64) -> R<bool> {
        let inserted = execute(
            self.c,
            "INSERT INTO devices (handle, device_id, signature_key, certificate, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (handle, device_id) DO NOTHING",
            &[
                &handle.as_str(),
                &device.device_id.to_hex(),
                &device.signature_key.as_slice(),
                &device.certificate.as_slice(),
                &to_i64(now_ms),
            ],
        )
        .await?;
        Ok(inserted == 1)
    }

    async fn lock_conversations_of(&mut self, device: i64) -> R<Vec<ConversationId>> {
        let rows = query(
            self.c,
            "SELECT c.id FROM conversations c JOIN conversation_members m ON m.conversation = c.id
             WHERE m.device = $1 ORDER BY c.id FOR NO KEY UPDATE OF c",
            &[&device],
        )
        .await?;
        rows.iter()
            .map(|r| {
                ConversationId::from_slice(r.get::<_, &[u8]>(0))
                    .map_err(|_| Fail::Store(StoreError::Internal("stored conversation id is not valid".into())))
            })
            .collect()
    }

    async fn deactivate(&mut self, device: i64) -> R<()> {
        execute(self.c, "UPDATE devices SET active = FALSE WHERE id = $1", &[&device]).await?;
        Ok(())
    }

    async fn delete_key_packages(&mut self, device: i64, last_resort: bool) -> R<()> {
        execute(self.c, "DELETE FROM key_packages WHERE device = $1", &[&device]).await?;
        if last_resort {
            execute(self.c, "DELETE FROM last_resort_packages WHERE device = $1", &[&device]).await?;
        }
        Ok(())
    }

    async fn leave_rosters(&mut self, device: i64, conversations: &[ConversationId]) -> R<()> {
        execute(self.c, "DELETE FROM conversation_members WHERE device = $1", &[&device]).await?;
        let ids: Vec<Vec<u8>> = conversations.iter().map(|c| c.0.to_vec()).collect();
        drop_if_unmanned(self.c, &ids).await
    }

    async fn delete_inbox_of(&mut self, device: i64) -> R<Vec<i64>> {
        Ok(query(self.c, "DELETE FROM inbox WHERE device = $1 RETURNING message", &[&device])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn drop_orphans(&mut self, messages: Vec<i64>) -> R<u64> {
        drop_orphans(self.c, messages).await
    }

    async fn notify_revoked(&mut self, addr: &DeviceAddress) -> R<()> {
        notify(self.c, self.channel, "r", std::slice::from_ref(addr)).await
    }

    async fn count_key_packages(&mut self, device: i64) -> R<KeyPackageCount> {
        count_packages(self.c, device).await
    }

    async fn insert_key_packages(&mut self, device: i64, packages: &[(u16, Vec<u8>)]) -> R<()> {
        let suites: Vec<i32> = packages.iter().map(|(s, _)| i32::from(*s)).collect();
        let data: Vec<&[u8]> = packages.iter().map(|(_, d)| d.as_slice()).collect();
        execute(
            self.c,
            "INSERT INTO key_packages (device, suite, data)
             SELECT $1, s, d FROM unnest($2::int[], $3::bytea[]) WITH ORDINALITY AS t(s, d, n) ORDER BY n",
            &[&device, &suites, &data],
        )
        .await?;
        Ok(())
    }

    async fn set_last_resort(&mut self, device: i64, suite: u16, package: &[u8]) -> R<()> {
        execute(
            self.c,
            "INSERT INTO last_resort_packages (device, suite, data) VALUES ($1, $2, $3)
             ON CONFLICT (device, suite) DO UPDATE SET data = excluded.data",
            &[&device, &i32::from(suite), &package],
        )
        .await?;
        Ok(())
    }

    async fn identity_key(&mut self, handle: &Handle) -> R<Option<Vec<u8>>> {
        Ok(query_opt(self.c, "SELECT identity_key FROM accounts WHERE handle = $1", &[&handle.as_str()])
            .await?
            .map(|r| r.get(0)))
    }

    async fn devices_of(&mut self, handle: &Handle) -> R<Vec<(i64, DeviceRecord)>> {
        let rows = query(
            self.c,
            "SELECT id, device_id, signature_key, certificate FROM devices
             WHERE handle = $1 AND active ORDER BY id",
            &[&handle.as_str()],
        )
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push((r.get(0), device_record(r.get(1), r.get(2), r.get(3))?));
        }
        Ok(out)
    }

    async fn take_one_time(&mut self, device: i64, suite: u16) -> R<Option<Vec<u8>>> {
        // SKIP LOCKED: a package another claim is taking is not waited
        // for, so each is handed out once and no claim blocks.
        Ok(query_opt(
            self.c,
            "DELETE FROM key_packages WHERE id =
               (SELECT id FROM key_packages WHERE device = $1 AND suite = $2
                ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING data",
            &[&device, &i32::from(suite)],
        )
        .await?
        .map(|r| r.get(0)))
    }

    async fn account(&mut self, handle: &Handle) -> R<Option<AccountInfo>> {
        account_in(self.c, handle).await
    }

    async fn set_identity_key(&mut self, handle: &Handle, key: &[u8]) -> R<()> {
        execute(self.c, "UPDATE accounts SET identity_key = $1 WHERE handle = $2", &[&key, &handle.as_str()]).await?;
        Ok(())
    }

    async fn set_device_keys(&mut self, device: i64, record: &DeviceRecord) -> R<()> {
        execute(
            self.c,
            "UPDATE devices SET signature_key = $1, certificate = $2 WHERE id = $3",
            &[&record.signature_key.as_slice(), &record.certificate.as_slice(), &device],
        )
        .await?;
        Ok(())
    }

    async fn insert_account(&mut self, handle: &Handle, identity_key: &[u8], now_ms: u64) -> R<bool> {
        let inserted = execute(
            self.c,
            "INSERT INTO accounts (handle, identity_key, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (handle) DO NOTHING",
            &[&handle.as_str(), &identity_key, &to_i64(now_ms)],
        )
        .await?;
        Ok(inserted == 1)
    }

    async fn account_exists(&mut self, handle: &Handle) -> R<bool> {
        Ok(query_opt(self.c, "SELECT 1 FROM accounts WHERE handle = $1", &[&handle.as_str()]).await?.is_some())
    }

    async fn insert_link(&mut self, link: &LinkId, handle: &Handle, request: &[u8], expires_at_ms: u64) -> R<bool> {
        let inserted = execute(
            self.c,
            "INSERT INTO links (link, handle, request, expires_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (link) DO NOTHING",
            &[&&link.0[..], &handle.as_str(), &request, &to_i64(expires_at_ms)],
        )
        .await?;
        Ok(inserted == 1)
    }

    async fn lock_link(&mut self, link: &LinkId, handle: &Handle, now_ms: u64) -> R<Option<bool>> {
        Ok(query_opt(
            self.c,
            "SELECT response IS NOT NULL FROM links WHERE link = $1 AND handle = $2 AND expires_at > $3
             FOR UPDATE",
            &[&&link.0[..], &handle.as_str(), &to_i64(now_ms)],
        )
        .await?
        .map(|r| r.get(0)))
    }

    async fn set_link_response(&mut self, link: &LinkId, response: &[u8]) -> R<()> {
        execute(self.c, "UPDATE links SET response = $2 WHERE link = $1", &[&&link.0[..], &response]).await?;
        Ok(())
    }

    async fn lock_link_response(&mut self, link: &LinkId, now_ms: u64) -> R<Option<Option<Vec<u8>>>> {
        Ok(query_opt(
            self.c,
            "SELECT response FROM links WHERE link = $1 AND expires_at > $2 FOR UPDATE",
            &[&&link.0[..], &to_i64(now_ms)],
        )
        .await?
        .map(|r| r.get(0)))
    }

    async fn delete_link(&mut self, link: &LinkId) -> R<()> {
        execute(self.c, "DELETE FROM links WHERE link = $1", &[&&link.0[..]]).await?;
        Ok(())
    }

    async fn purge_account(&mut self, handle: &Handle) -> R<()> {
        for statement in rules::PURGE_ACCOUNT {
            execute(self.c, &statement.replace("?1", "$1"), &[&handle.as_str()]).await?;
        }
        for statement in rules::PURGE_UNREADABLE_BLOBS {
            execute(self.c, statement, &[]).await?;
        }
        let empty: &[u8] = &[];
        execute(
            self.c,
            "UPDATE devices SET signature_key = $2, certificate = $2 WHERE handle = $1",
            &[&handle.as_str(), &empty],
        )
        .await?;
        execute(self.c, "UPDATE accounts SET identity_key = $2 WHERE handle = $1", &[&handle.as_str(), &empty]).await?;
        Ok(())
    }

    async fn notify_keys_changed(&mut self, addr: &DeviceAddress) -> R<()> {
        notify(self.c, self.channel, "k", std::slice::from_ref(addr)).await
    }

    async fn delete_inbox_rows(&mut self, device: i64, ids: &[u64]) -> R<Vec<i64>> {
        let ids: Vec<i64> = ids.iter().filter_map(|&i| i64::try_from(i).ok()).collect();
        Ok(query(self.c, "DELETE FROM inbox WHERE device = $1 AND id = ANY($2) RETURNING message", &[&device, &ids])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn last_resort(&mut self, device: i64, suite: u16) -> R<Option<Vec<u8>>> {
        Ok(query_opt(
            self.c,
            "SELECT data FROM last_resort_packages WHERE device = $1 AND suite = $2",
            &[&device, &i32::from(suite)],
        )
        .await?
        .map(|r| r.get(0)))
    }

    async fn lock_claim_window(&mut self, claimer: &Handle, target: &Handle, now_ms: u64) -> R<(u64, u64)> {
        // The insert waits for a concurrent claim's insert of the same pair
        // to commit; the row lock then orders the two claims.
        execute(
            self.c,
            "INSERT INTO claim_windows (claimer, target, window_start, claims) VALUES ($1, $2, $3, 0)
             ON CONFLICT (claimer, target) DO NOTHING",
            &[&claimer.as_str(), &target.as_str(), &to_i64(now_ms)],
        )
        .await?;
        let row = query_opt(
            self.c,
            "SELECT window_start, claims FROM claim_windows WHERE claimer = $1 AND target = $2 FOR UPDATE",
            &[&claimer.as_str(), &target.as_str()],
        )
        .await?
        .ok_or_else(|| StoreError::Internal("claim window vanished under its lock".into()))?;
        Ok((to_u64(row.get(0)), to_u64(row.get(1))))
    }

    async fn set_claim_window(&mut self, claimer: &Handle, target: &Handle, start_ms: u64, claims: u64) -> R<()> {
        execute(
            self.c,
            "UPDATE claim_windows SET window_start = $3, claims = $4 WHERE claimer = $1 AND target = $2",
            &[&claimer.as_str(), &target.as_str(), &to_i64(start_ms), &to_i64(claims)],
        )
        .await?;
        Ok(())
    }
}

/// Envelopes from fetched rows (`i.id, m.conversation, d.handle,
/// d.device_id, m.kind, m.ciphertext, m.created_at, m.roster` from column
/// `at` on), stopping once their ciphertexts pass `max_bytes` (always at
/// least one).
fn envelopes(rows: &[Row], at: usize, max_bytes: usize) -> Result<Vec<Envelope>, StoreError> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for r in rows {
        let ciphertext: Vec<u8> = r.get(at + 5);
        if !out.is_empty() && bytes.saturating_add(ciphertext.len()) > max_bytes {
            break;
        }
        bytes = bytes.saturating_add(ciphertext.len());
        let conversation: Vec<u8> = r.get(at + 1);
        let kind: &str = r.get(at + 4);
        out.push(Envelope {
            id: to_u64(r.get(at)),
            conversation: ConversationId::from_slice(&conversation)
                .map_err(|_| StoreError::Internal("stored conversation id is not valid".into()))?,
            sender: DeviceAddress { handle: parse_handle(r.get(at + 2))?, device: parse_device_id(r.get(at + 3))? },
            kind: MessageKind::parse(kind)
                .ok_or_else(|| StoreError::Internal("stored message kind is not valid".into()))?,
            ciphertext: B64(ciphertext),
            server_time: to_u64(r.get(at + 6)),
            roster: r.get::<_, Option<Vec<u8>>>(at + 7).map(|b| super::decode_roster(&b)).transpose()?,
        });
    }
    Ok(out)
}

/// The body of [`Store::send`], inside its transaction.
async fn send_tx<C: GenericClient + Sync>(
    tx: &C,
    channel: &str,
    sender: &DeviceAddress,
    request: &SendRequest,
    quota: &Quota,
    now_ms: u64,
) -> R<SendOutcome> {
    rules::send(&mut Pg { c: tx, channel }, sender, request, quota, now_ms).await
}

/// Creates schema `schema` in the database at `url` and returns a URL whose
/// connections use it (`search_path`). For tests and for operators who keep
/// several deployments in one database.
///
/// # Errors
/// [`StoreError::Unavailable`] / [`StoreError::Internal`] as for
/// [`PgStore::connect`].
pub async fn create_schema(url: &str, schema: &str) -> Result<String, StoreError> {
    let (client, conn) = connect_admin(url).await?;
    let result = client
        .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(schema)))
        .await
        .map_err(|e| db_error(&e));
    conn.abort();
    result?;
    Ok(schema_url(url, schema))
}

/// Drops schema `schema` (and everything in it) in the database at `url`.
///
/// # Errors
/// As [`create_schema`].
pub async fn drop_schema(url: &str, schema: &str) -> Result<(), StoreError> {
    let (client, conn) = connect_admin(url).await?;
    let result = client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", quote_ident(schema)))
        .await
        .map_err(|e| db_error(&e));
    conn.abort();
    result
}

/// `url` with its connections' `search_path` set to `schema`.
pub fn schema_url(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

async fn connect_admin(url: &str) -> Result<(tokio_postgres::Client, JoinHandle<()>), StoreError> {
    let tls::Parsed { mut config, tls, .. } = tls::parse(url)?;
    config.connect_timeout(CONNECT_TIMEOUT);
    let (client, conn) = config.connect(tls).await.map_err(|e| db_error(&e))?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((client, conn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    /// A fresh schema for one test, dropped when this goes out of scope
    /// (panics included).
    pub(crate) struct TestSchema {
        base: String,
        name: String,
    }

    impl Drop for TestSchema {
        fn drop(&mut self) {
            let (base, name) = (self.base.clone(), self.name.clone());
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    let _ = rt.block_on(drop_schema(&base, &name));
                }
            })
            .join();
        }
    }

    async fn open() -> Option<(TestSchema, Arc<dyn Store>)> {
        let (schema, store) = open_pg().await?;
        Some((schema, Arc::new(store)))
    }

    async fn open_pg() -> Option<(TestSchema, PgStore)> {
        let Ok(base) = std::env::var("SUBROSA_TEST_POSTGRES") else {
            // Straight to stderr: the test harness captures eprintln! of passing tests.
            let test = std::thread::current().name().unwrap_or("a PostgreSQL test").to_string();
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!(
                    "skipped {test}: SUBROSA_TEST_POSTGRES is not set
"
                ),
            );
            return None;
        };
        let name = format!("s_{}", hex::encode(rand::random::<[u8; 6]>()));
        let url = create_schema(&base, &name).await.expect("create test schema");
        let schema = TestSchema { base, name };
        let store = PgStore::connect(&url).await.expect("connect");
        Some((schema, store))
    }

    /// A node's concurrent plain sends and acknowledgements are committed
    /// together, many to a transaction; each still gets its own answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_sends_and_acks_share_transactions() {
        let Some((_schema, pg)) = open_pg().await else { return };
        let store: Arc<dyn Store> = Arc::new(pg.clone());
        let senders: Vec<DeviceAddress> =
            futures_util::future::join_all((0..64).map(|_| conformance::account(&store, "s"))).await;
        let bob = conformance::account(&store, "bob").await;
        let conv = conformance::random_conversation();
        let [[batches_before, ..], ..] = pg.batch_counts();
        let answers = futures_util::future::join_all(senders.iter().map(|from| {
            let (store, bob) = (Arc::clone(&store), bob.clone());
            async move {
                let req = conformance::send_request(
                    conv,
                    None,
                    vec![(MessageKind::Application, vec![bob], from.to_string().into_bytes())],
                );
                store.send(from, &req, 1).await
            }
        }))
        .await;
        assert!(answers.iter().all(|a| a.as_ref().is_ok_and(|o| !o.duplicate)), "every send stored: {answers:?}");
        let [[batches, jobs, stored], ..] = pg.batch_counts();
        assert_eq!((jobs, stored), (64, 64), "every plain send was stored by a batch");
        assert!(batches - batches_before < 32, "64 sends at once took {} transactions", batches - batches_before);
        let inbox = store.fetch_inbox(&bob, 0, 100, usize::MAX).await.expect("fetch");
        assert_eq!(inbox.len(), 64);
        // Reads at once, each with its own cursor, limit and byte bound.
        let reads = futures_util::future::join_all((0..40usize).map(|k| {
            let (store, bob) = (Arc::clone(&store), bob.clone());
            let (after, bytes) = (inbox[k].id, 2 * inbox[0].ciphertext.0.len());
            async move { (k, store.fetch_inbox(&bob, after, 5 + k % 3, bytes).await) }
        }))
        .await;
        for (k, read) in reads {
            let read = read.expect("fetch");
            let ids: Vec<u64> = read.iter().map(|e| e.id).collect();
            let want: Vec<u64> = inbox[k + 1..].iter().take(2).map(|e| e.id).collect();
            assert_eq!(ids, want, "read {k}: past its cursor, in order, within its bytes");
        }
        let stranger = DeviceAddress { handle: bob.handle.clone(), device: subrosa_proto::DeviceId([9; 8]) };
        assert!(store.fetch_inbox(&stranger, 0, 10, usize::MAX).await.expect("fetch").is_empty());
        let [.., [fetch_batches, fetches, fetched]] = pg.batch_counts();
        assert_eq!((fetches, fetched), (42, 42), "every read answered by a batch");
        assert!(fetch_batches < 40, "40 reads at once took {fetch_batches} statements");
        let acks = futures_util::future::join_all(inbox.iter().map(|e| {
            let (store, bob) = (Arc::clone(&store), bob.clone());
            async move { store.ack(&bob, &[e.id]).await }
        }))
        .await;
        assert!(acks.iter().all(|a| matches!(a, Ok(1))), "each acknowledgement deleted its row: {acks:?}");
        let [_, [ack_batches, ack_jobs, acked], _, _] = pg.batch_counts();
        assert_eq!((ack_jobs, acked), (64, 64));
        assert!(ack_batches < 32, "64 acknowledgements at once took {ack_batches} transactions");
        assert_eq!(store.stats().await.expect("stats").messages, 0, "every message went with its last row");
    }

    macro_rules! conformance_tests {
        ($($name:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some((_schema, store)) = open().await else { return };
                    conformance::$name(store).await;
                }
            )*
        };
    }

    conformance::with_behaviours!(conformance_tests);

    /// Nodes starting together migrate once (the advisory lock); a schema
    /// newer than the build is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_starts_migrate_once_and_newer_schemas_are_refused() {
        let Ok(base) = std::env::var("SUBROSA_TEST_POSTGRES") else {
            // Straight to stderr: the test harness captures eprintln! of passing tests.
            let test = std::thread::current().name().unwrap_or("a PostgreSQL test").to_string();
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!(
                    "skipped {test}: SUBROSA_TEST_POSTGRES is not set
"
                ),
            );
            return;
        };
        let name = format!("s_{}", hex::encode(rand::random::<[u8; 6]>()));
        let url = create_schema(&base, &name).await.expect("create test schema");
        let _schema = TestSchema { base, name };
        let starts: Vec<_> = (0..6)
            .map(|_| {
                tokio::spawn({
                    let url = url.clone();
                    async move { PgStore::connect(&url).await }
                })
            })
            .collect();
        let mut stores = Vec::new();
        for s in starts {
            stores.push(s.await.expect("task").expect("connect"));
        }
        let (client, conn) = connect_admin(&url).await.expect("admin");
        let versions: Vec<i32> = client
            .query("SELECT version FROM schema_migrations ORDER BY version", &[])
            .await
            .expect("versions")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let expected: Vec<i32> = (1..=i32::try_from(PgStore::schema_version()).expect("small")).collect();
        assert_eq!(versions, expected);
        let store: Arc<dyn Store> = Arc::new(stores.remove(0));
        conformance::register_and_look_up(store).await;

        client.execute("INSERT INTO schema_migrations (version) VALUES (999)", &[]).await.expect("bump");
        conn.abort();
        match PgStore::connect(&url).await {
            Err(StoreError::Internal(m)) => assert!(m.contains("newer than this server"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// The delivery tables are vacuumed after every 1000 deletions, and a
    /// shared rate-limit bucket never holds its key in the clear.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delivery_tables_vacuum_often_and_bucket_keys_are_hashed() {
        let Ok(base) = std::env::var("SUBROSA_TEST_POSTGRES") else {
            eprintln!("skipped: SUBROSA_TEST_POSTGRES is not set");
            return;
        };
        let name = format!("s_{}", hex::encode(rand::random::<[u8; 6]>()));
        let url = create_schema(&base, &name).await.expect("create test schema");
        let _schema = TestSchema { base, name };
        let store = PgStore::connect(&url).await.expect("connect");
        let client = store.pool.get().await.expect("client");
        for table in ["inbox", "messages"] {
            let row = client
                .query_one(
                    "SELECT array_to_string(reloptions, ',') FROM pg_class WHERE oid = $1::text::regclass",
                    &[&table],
                )
                .await
                .expect("reloptions");
            let options: String = row.get(0);
            assert!(options.contains("autovacuum_vacuum_threshold=1000"), "{table}: {options}");
            assert!(options.contains("autovacuum_vacuum_scale_factor=0"), "{table}: {options}");
        }
        let request =
            TokenRequest { kind: "register", key: "203.0.113.7", rate: 1.0, burst: 2.0, cost: 1.0, debt: false };
        let first = store.take_tokens(&request, 1_000).await.expect("take").expect("shared");
        assert!(first.taken);
        assert!(store.take_tokens(&request, 1_000).await.expect("take").expect("shared").taken);
        let third = store.take_tokens(&request, 1_000).await.expect("take").expect("shared");
        assert!(!third.taken, "the burst is spent");
        assert!(store.take_tokens(&request, 2_000).await.expect("take").expect("shared").taken, "refilled");
        let rows = client.query("SELECT key FROM rate_buckets", &[]).await.expect("buckets");
        assert_eq!(rows.len(), 1);
        let key: Vec<u8> = rows[0].get(0);
        assert!(!key.windows(4).any(|w| w == b"203."), "the address is stored in the clear");
    }

    /// The whole schema a new database gets (tables with their persistence
    /// and storage options, columns, constraints, indexes), the test's
    /// schema name left out: a change (a migration added, or one edited in
    /// place, which databases already migrated would never run) is a
    /// visible decision. After a deliberate change,
    /// `SUBROSA_WRITE_SNAPSHOTS=1` with `SUBROSA_TEST_POSTGRES` set writes
    /// `tests/data/postgres-schema.txt` again; review its diff.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn schema_snapshot() {
        let Some((schema, store)) = open_pg().await else { return };
        let c = store.pool.get().await.expect("connection");
        let mut out = format!("-- {} migrations\n", PgStore::schema_version());
        let tables = c
            .query(
                "SELECT c.relname, c.relpersistence::text, coalesce(array_to_string(c.reloptions, ', '), '')
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = current_schema() AND c.relkind = 'r' ORDER BY c.relname",
                &[],
            )
            .await
            .expect("tables");
        for t in &tables {
            let (table, persistence, options): (String, String, String) = (t.get(0), t.get(1), t.get(2));
            let unlogged = if persistence == "u" { " UNLOGGED" } else { "" };
            out.push_str(&format!("\nTABLE{unlogged} {table} ({options})\n"));
            let columns = c
                .query(
                    "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                            coalesce(pg_get_expr(d.adbin, d.adrelid), ''), a.attstorage::text
                     FROM pg_attribute a
                     JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                     LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                     WHERE n.nspname = current_schema() AND c.relname = $1 AND a.attnum > 0 AND NOT a.attisdropped
                     ORDER BY a.attnum",
                    &[&table],
                )
                .await
                .expect("columns");
            for col in &columns {
                let (name, ty, not_null, default, storage): (String, String, bool, String, String) =
                    (col.get(0), col.get(1), col.get(2), col.get(3), col.get(4));
                let not_null = if not_null { " NOT NULL" } else { "" };
                let default = if default.is_empty() { String::new() } else { format!(" DEFAULT {default}") };
                out.push_str(&format!("  {name} {ty}{not_null}{default} storage {storage}\n"));
            }
            let constraints = c
                .query(
                    "SELECT k.conname, pg_get_constraintdef(k.oid)
                     FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = current_schema() AND c.relname = $1 ORDER BY k.conname",
                    &[&table],
                )
                .await
                .expect("constraints");
            for k in &constraints {
                out.push_str(&format!("  CONSTRAINT {} {}\n", k.get::<_, String>(0), k.get::<_, String>(1)));
            }
        }
        let indexes = c
            .query("SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() ORDER BY indexname", &[])
            .await
            .expect("indexes");
        out.push('\n');
        for i in &indexes {
            out.push_str(&format!("{};\n", i.get::<_, String>(0).replace(&format!("{}.", schema.name), "")));
        }
        crate::store::check_schema_snapshot(
            "tests/data/postgres-schema.txt",
            include_str!("../../tests/data/postgres-schema.txt"),
            &out,
        );
    }

    /// The pool and the batch workers follow `PgOptions`: zero workers run
    /// every operation alone, through the same rules; options that leave
    /// no connection for a lone operation are refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pool_and_batch_workers_follow_the_options() {
        let Some((schema, default)) = open_pg().await else { return };
        assert_eq!(default.pool_state().expect("pool").max, POOL_SIZE as u64);
        let url = schema_url(&schema.base, &schema.name);
        let store = PgStore::connect_with(&url, PgOptions { pool_size: 5, batch_workers: 0 }).await.expect("connect");
        assert_eq!(store.pool_state().expect("pool").max, 5);
        assert!(store.sends.is_none() && store.acks.is_none() && store.tokens.is_none() && store.fetches.is_none());
        let request = TokenRequest { kind: "device", key: "alone", rate: 0.001, burst: 2.0, cost: 1.0, debt: false };
        let taken: Vec<bool> = futures_util::future::join_all((0..3).map(|_| store.take_tokens(&request, 5_000)))
            .await
            .into_iter()
            .map(|t| t.expect("take").expect("shared").taken)
            .collect();
        assert_eq!(taken.iter().filter(|t| **t).count(), 2, "the burst, alone: {taken:?}");
        assert_eq!(store.batch_counts(), [[0; 3]; 4], "no batch ran");
        let one = PgStore::connect_with(&url, PgOptions { pool_size: 5, batch_workers: 1 }).await.expect("connect");
        assert!(one.take_tokens(&request, 5_000).await.expect("take").is_some());
        assert_eq!(one.batch_counts()[2][..2], [1, 1], "one batch of one check");
        for (pool_size, batch_workers) in [(8, 2), (0, 0), (4, 1)] {
            let e = PgStore::connect_with(&url, PgOptions { pool_size, batch_workers }).await.expect_err("refused");
            assert!(e.to_string().contains("--db-pool-size must be above"), "{e}");
        }
    }

    /// The batch workers hold no queue: once the last store handle goes,
    /// every queue goes with it (and its workers, whose channel closes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_queues_go_with_the_last_store_handle() {
        let Some((_schema, store)) = open_pg().await else { return };
        let queues = [
            store.sends.as_ref().map(|q| Arc::downgrade(q) as std::sync::Weak<dyn std::any::Any + Send + Sync>),
            store.acks.as_ref().map(|q| Arc::downgrade(q) as std::sync::Weak<dyn std::any::Any + Send + Sync>),
            store.tokens.as_ref().map(|q| Arc::downgrade(q) as std::sync::Weak<dyn std::any::Any + Send + Sync>),
            store.fetches.as_ref().map(|q| Arc::downgrade(q) as std::sync::Weak<dyn std::any::Any + Send + Sync>),
        ];
        drop(store);
        for (k, q) in queues.into_iter().enumerate() {
            assert!(q.expect("a queue").upgrade().is_none(), "queue {k} outlived the store");
        }
    }

    /// Checks of shared buckets made at once are answered in batches, each
    /// as if made alone: one bucket checked 40 times at once hands out its
    /// burst exactly, a charge goes into debt, and other buckets are apart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_bucket_checks_share_statements_and_keep_the_limit() {
        let Some((_schema, store)) = open_pg().await else { return };
        let one = |key: String, debt: bool| {
            let store = store.clone();
            async move {
                let request = TokenRequest { kind: "device", key: &key, rate: 0.001, burst: 10.0, cost: 1.0, debt };
                store.take_tokens(&request, 5_000).await.expect("take").expect("shared")
            }
        };
        let same = futures_util::future::join_all((0..40).map(|_| one("alice".into(), false))).await;
        assert_eq!(same.iter().filter(|t| t.taken).count(), 10, "the burst, and no more");
        let others = futures_util::future::join_all((0..30).map(|i| one(format!("d{i}"), false))).await;
        assert!(others.iter().all(|t| t.taken && (t.left - 9.0).abs() < 1e-9), "each bucket its own: {others:?}");
        let charged = futures_util::future::join_all((0..12).map(|_| one("bob".into(), true))).await;
        assert!(charged.iter().all(|t| t.taken));
        let mut left: Vec<f64> = charged.iter().map(|t| t.left).collect();
        left.sort_by(f64::total_cmp);
        assert!((left[0] + 2.0).abs() < 1e-9, "twelve charges on a burst of ten owe two: {left:?}");
        let [_, _, [batches, jobs, answered], _] = store.batch_counts();
        assert_eq!((jobs, answered), (82, 82), "every check answered by a batch");
        assert!(batches < 82, "{batches} batches for 82 checks at once");
        // A check that runs alone (its batch failed) uses the same statement.
        let alone = store.without_queues();
        let check = |key: &'static str| {
            let alone = alone.clone();
            async move {
                let request = TokenRequest { kind: "device", key, rate: 0.001, burst: 10.0, cost: 1.0, debt: false };
                alone.take_tokens(&request, 5_000).await.expect("take").expect("shared")
            }
        };
        assert!(!check("alice").await.taken, "alone, the spent bucket is still spent");
        let fresh = check("carol").await;
        assert!(fresh.taken && (fresh.left - 9.0).abs() < 1e-9, "{fresh:?}");
        assert_eq!(store.batch_counts()[2][1], 82, "those two went alone");
    }

    #[test]
    fn channel_names_fit() {
        assert_eq!(channel_name("public"), "subrosa_wake_public");
        let long = "s".repeat(63);
        let c = channel_name(&long);
        assert!(c.len() <= 63 && c.starts_with("subrosa_wake_"), "{c}");
        assert_ne!(c, channel_name(&"t".repeat(63)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_all_passes() {
        let Some((_schema, store)) = open().await else { return };
        conformance::run_all(store).await;
    }
}

mod batch;
mod kt;
pub mod tls;

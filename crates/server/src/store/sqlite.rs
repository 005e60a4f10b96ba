//! The embedded SQLite backend.
//!
//! Writes go to one writer thread that owns the write connection and commits
//! in groups: it takes every write waiting in its queue, runs them in one
//! `BEGIN IMMEDIATE` transaction, commits once, and only then answers every
//! write of the group. One write's failure undoes that write only: a group
//! whose write failed is rolled back and run again with each write in its
//! own `SAVEPOINT` (see `Group`). Durability is unchanged: WAL with
//! `synchronous=FULL`, so a send acknowledged to the client survives a power
//! loss; but one fsync now covers every write that queued up while the
//! previous group was being committed. Reads run on a small pool of
//! read-only connections (WAL lets them read the last commit while the
//! writer works), from `spawn_blocking`. Deleted content is overwritten
//! (`secure_delete=ON`) and the WAL is truncated by [`Store::maintenance`].

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode as SqliteCode, OptionalExtension, TransactionBehavior};
use subrosa_proto::{
    AccountInfo, BlobId, ClaimResponse, ConversationId, DeviceAddress, DeviceId, DeviceRecord, Envelope, Epoch, Handle,
    KeyPackageCount, LinkId, MessageKind, SendId, SendRequest, B64,
};

use super::{rules, LinkRecord, NewAccount, Quota, SendOutcome, Store, StoreError, StoreStats, SweepReport};

/// Schema migrations, applied in order; `PRAGMA user_version` records how
/// many ran. Append new steps, never edit old ones.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r"
    CREATE TABLE accounts (
        handle TEXT PRIMARY KEY,
        identity_key BLOB NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE devices (
        id INTEGER PRIMARY KEY,
        handle TEXT NOT NULL REFERENCES accounts(handle),
        device_id TEXT NOT NULL,
        signature_key BLOB NOT NULL,
        certificate BLOB NOT NULL,
        active INTEGER NOT NULL DEFAULT 1,
        created_at INTEGER NOT NULL,
        UNIQUE (handle, device_id)
    );
    CREATE TABLE nonces (
        handle TEXT NOT NULL,
        device_id TEXT NOT NULL,
        nonce TEXT NOT NULL,
        timestamp INTEGER NOT NULL,
        PRIMARY KEY (handle, device_id, nonce)
    ) WITHOUT ROWID;
    CREATE INDEX nonces_by_time ON nonces(timestamp);
    CREATE TABLE key_packages (
        id INTEGER PRIMARY KEY,
        device INTEGER NOT NULL REFERENCES devices(id),
        data BLOB NOT NULL
    );
    CREATE INDEX key_packages_by_device ON key_packages(device, id);
    CREATE TABLE last_resort_packages (
        device INTEGER PRIMARY KEY REFERENCES devices(id),
        data BLOB NOT NULL
    );
    CREATE TABLE conversations (
        id BLOB PRIMARY KEY,
        epoch INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE send_ids (
        device INTEGER NOT NULL REFERENCES devices(id),
        send_id BLOB NOT NULL,
        epoch INTEGER,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (device, send_id)
    ) WITHOUT ROWID;
    CREATE INDEX send_ids_by_time ON send_ids(created_at);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation BLOB NOT NULL,
        sender INTEGER NOT NULL REFERENCES devices(id),
        kind TEXT NOT NULL,
        ciphertext BLOB NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE inbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device INTEGER NOT NULL REFERENCES devices(id),
        message INTEGER NOT NULL REFERENCES messages(id),
        created_at INTEGER NOT NULL
    );
    CREATE INDEX inbox_by_device ON inbox(device, id);
    CREATE INDEX inbox_by_message ON inbox(message);
    CREATE INDEX inbox_by_time ON inbox(created_at);
    ",
    // 2: link slots for provisioning new devices. A rowid table: a slot's
    // request and response may be megabytes, which WITHOUT ROWID handles badly.
    r"
    CREATE TABLE links (
        id INTEGER PRIMARY KEY,
        link BLOB NOT NULL UNIQUE,
        handle TEXT NOT NULL REFERENCES accounts(handle),
        request BLOB NOT NULL,
        response BLOB,
        expires_at INTEGER NOT NULL
    );
    CREATE INDEX links_by_expiry ON links(expires_at);
    ",
    // 3: the key-transparency directory (see `store::kt` and `sqlite_kt.rs`).
    r"
    CREATE TABLE kt_records (
        key BLOB PRIMARY KEY,
        value BLOB NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE kt_values (
        label BLOB NOT NULL,
        epoch INTEGER NOT NULL,
        version INTEGER NOT NULL,
        value BLOB NOT NULL,
        node_label_val BLOB NOT NULL,
        node_label_len INTEGER NOT NULL,
        PRIMARY KEY (label, epoch)
    ) WITHOUT ROWID;
    CREATE TABLE kt_epochs (
        epoch INTEGER PRIMARY KEY,
        root_hash BLOB NOT NULL
    );
    CREATE TABLE kt_vrf (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        private_key BLOB NOT NULL
    );
    ",
    // 4: signed directory heads (see `store::kt`): the head-signing key and
    // directory id, and every head signed, one per epoch.
    r"
    CREATE TABLE kt_signing (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        private_key BLOB NOT NULL,
        directory_id BLOB NOT NULL
    );
    CREATE TABLE kt_signed_heads (
        epoch INTEGER PRIMARY KEY,
        head BLOB NOT NULL
    );
    ",
    // 5: conversation rosters (see `store::RosterChange`). Conversations
    // made before this step have `has_roster = 0` until their next commit.
    r"
    ALTER TABLE conversations ADD COLUMN has_roster INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE conversation_members (
        conversation BLOB NOT NULL,
        device INTEGER NOT NULL REFERENCES devices(id),
        PRIMARY KEY (conversation, device)
    ) WITHOUT ROWID;
    CREATE INDEX conversation_members_by_device ON conversation_members(device);
    ALTER TABLE messages ADD COLUMN roster BLOB;
    ",
    // 6: bytes of undelivered ciphertext per sending device, for the
    // quotas (see `store::Quota`), counted from what is stored now; and
    // conversations whose roster emptied (see `store::RosterChange`) go.
    r"
    CREATE TABLE device_usage (
        device INTEGER PRIMARY KEY REFERENCES devices(id),
        bytes INTEGER NOT NULL
    );
    INSERT INTO device_usage (device, bytes)
        SELECT sender, SUM(length(ciphertext)) FROM messages GROUP BY sender;
    DELETE FROM conversations WHERE has_roster = 1
        AND NOT EXISTS (SELECT 1 FROM conversation_members m WHERE m.conversation = conversations.id);
    ",
    // 7: one-time key-package claims per (claimer, target) account in the
    // current hour (see `store::ClaimKind::Counted`); the sweeper deletes
    // windows an hour old.
    r"
    CREATE TABLE claim_windows (
        claimer TEXT NOT NULL,
        target TEXT NOT NULL,
        window_start INTEGER NOT NULL,
        claims INTEGER NOT NULL,
        PRIMARY KEY (claimer, target)
    ) WITHOUT ROWID;
    ",
    // 8: attachment blobs (see `store::BlobLimits`): the opaque bytes in
    // pieces as uploaded (rowid tables: a piece is up to megabytes), the
    // devices that may fetch each blob and whether they did.
    r"
    CREATE TABLE blobs (
        id INTEGER PRIMARY KEY,
        blob BLOB NOT NULL UNIQUE,
        owner INTEGER NOT NULL REFERENCES devices(id),
        size INTEGER NOT NULL,
        received INTEGER NOT NULL DEFAULT 0,
        complete INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    );
    CREATE INDEX blobs_by_owner ON blobs(owner);
    CREATE INDEX blobs_by_expiry ON blobs(expires_at);
    CREATE TABLE blob_readers (
        blob INTEGER NOT NULL REFERENCES blobs(id),
        device INTEGER NOT NULL REFERENCES devices(id),
        fetched INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (blob, device)
    ) WITHOUT ROWID;
    CREATE TABLE blob_pieces (
        id INTEGER PRIMARY KEY,
        blob INTEGER NOT NULL REFERENCES blobs(id),
        start INTEGER NOT NULL,
        data BLOB NOT NULL,
        UNIQUE (blob, start)
    );
    ",
    // 9: disappearing messages: a message's expiry as its sender declared
    // it (`SendRequest::expires_at`); the sweep deletes it then, delivered
    // or not.
    r"
    ALTER TABLE messages ADD COLUMN expires_at INTEGER;
    CREATE INDEX messages_by_expiry ON messages(expires_at) WHERE expires_at IS NOT NULL;
    ",
    // 10: key packages under their MLS ciphersuite (the classical suite 1
    // for those stored before), so claims ask for one suite; a last-resort
    // package per (device, suite).
    r"
    ALTER TABLE key_packages ADD COLUMN suite INTEGER NOT NULL DEFAULT 1;
    CREATE INDEX key_packages_by_device_suite ON key_packages(device, suite, id);
    CREATE TABLE last_resort_packages_by_suite (
        device INTEGER NOT NULL REFERENCES devices(id),
        suite INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (device, suite)
    );
    INSERT INTO last_resort_packages_by_suite (device, suite, data) SELECT device, 1, data FROM last_resort_packages;
    DROP TABLE last_resort_packages;
    ALTER TABLE last_resort_packages_by_suite RENAME TO last_resort_packages;
    ",
    // 11: the call relay's token key, one row shared by every node of the
    // database (a token one node issues, another accepts).
    r"
    CREATE TABLE relay_key (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        key BLOB NOT NULL
    );
    ",
];

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The write connection: the writer thread holds the lock for the length
    /// of a group; [`SqliteStore::run`] takes it for work that manages its
    /// own transactions (the key directory, checkpoints).
    conn: Arc<Mutex<Connection>>,
    writer: mpsc::Sender<Job>,
    readers: Arc<Readers>,
    path: PathBuf,
}

/// Most writes committed together (bounds how long one group holds the lock).
const MAX_GROUP: usize = 512;
/// Statements each connection keeps prepared.
const STATEMENT_CACHE: usize = 64;
/// Read connections, and reads running at once. Bounded: each connection
/// parses the schema when it opens, so opening one per burst of reads (and
/// closing it after) would cost more than the reads themselves; and SQLite's
/// allocator takes a process-wide lock, so more readers than cores contend.
const READERS: usize = 4;

/// A queued write. The writer runs it inside the group's open transaction,
/// and may run it a second time (see [`Group`]): a write is a function of
/// the database and of what it captured (`Fn`, never `FnOnce`), so after a
/// rollback it does again exactly what its first run did.
trait Write: Send {
    /// Runs the write, in a savepoint of its own when `guarded`; true when
    /// it succeeded. Its result waits for [`Write::finish`].
    fn run(&mut self, conn: &Connection, guarded: bool) -> bool;
    /// Answers the last run's result once its group is over: `Ok` when the
    /// group committed, else why not (a write never run answers that).
    fn finish(self: Box<Self>, committed: Result<(), &StoreError>);
}

type Job = Box<dyn Write>;

/// A write waiting in the queue or in its group, with where to answer.
struct Queued<T, F> {
    f: F,
    result: Option<Result<T, StoreError>>,
    answer: tokio::sync::oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Write for Queued<T, F>
where
    T: Send,
    F: Fn(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection, guarded: bool) -> bool {
        let result = if guarded { in_savepoint(conn, &self.f) } else { caught(|| (self.f)(conn)) };
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, committed: Result<(), &StoreError>) {
        let answer = match (self.result, committed) {
            (Some(Err(e)), _) => Err(e),
            (_, Err(e)) => Err(copy_err(e)),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (None, Ok(())) => Err(StoreError::Internal("a write was never run".into())),
        };
        let _ = self.answer.send(answer);
    }
}

/// A copy of a group's failure for each write of the group.
fn copy_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(detail) => StoreError::Unavailable(detail.clone()),
        other => StoreError::Internal(other.to_string()),
    }
}

fn writer_stopped() -> StoreError {
    StoreError::Internal("the storage writer stopped".into())
}

/// Runs `f`; a panic counts as a failure.
fn caught<T>(f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(StoreError::Internal("a storage write panicked".into())))
}

/// Runs a statement without parameters (a transaction's or a savepoint's),
/// kept prepared.
fn exec(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql).and_then(|mut s| s.execute([])).map(|_| ()).map_err(map_err)
}

/// Runs `f` inside a savepoint: its writes stay in the group only when it
/// succeeds. A panic counts as a failure.
fn in_savepoint<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
    let stmt = |sql: &str| exec(conn, sql);
    stmt("SAVEPOINT job")?;
    let result = caught(|| f(conn));
    let result = result.and_then(|v| stmt("RELEASE job").map(|_| v));
    if result.is_err() {
        forget_device_rows();
    }
    if result.is_err() && !conn.is_autocommit() {
        // Undo this write only; the group goes on. (When SQLite rolled the
        // whole transaction back itself, the writer notices.)
        let _ = stmt("ROLLBACK TO job");
        let _ = stmt("RELEASE job");
    }
    result
}

/// The writer thread: one group per turn, until every sender is gone. A
/// group runs its writes without savepoints unless the group before it had
/// a write that failed (see [`Group`]).
fn writer_loop(conn: &Mutex<Connection>, rx: &mpsc::Receiver<Job>) {
    remember_device_rows();
    let mut guarded = false;
    while let Ok(first) = rx.recv() {
        // A write's panic is caught, so only a panic in `run` can poison
        // the lock, and rusqlite rolls a transaction back when it unwinds:
        // a poisoned lock is still usable.
        let guard = conn.lock().unwrap_or_else(|p| p.into_inner());
        guarded = run_group(&guard, first, rx, guarded);
    }
}

/// Runs `first` and every write queued behind it (up to [`MAX_GROUP`]) in
/// one transaction, commits once, then answers them all. True when a write
/// of the group failed.
fn run_group(conn: &Connection, first: Job, rx: &mpsc::Receiver<Job>, guarded: bool) -> bool {
    let mut group = Group { conn, ran: Vec::new(), in_tx: false, guarded, failed: false };
    let mut next = Some(first);
    let mut taken = 0usize;
    while let Some(job) = next.take() {
        taken += 1;
        group.add(job);
        if taken < MAX_GROUP {
            next = rx.try_recv().ok();
        }
    }
    group.commit()
}

/// One group commit. Savepoints cost: SQLite copies every page a write
/// touches into the savepoint's journal before changing it, which was a
/// fifth of the server's instructions per delivered message (callgrind).
/// So a group runs its writes bare while they all succeed. When one fails,
/// its partial changes are mixed with the others': the whole group is
/// rolled back and run again from its first write, each write in its own
/// savepoint (so the failed one undoes only itself), and so is the next
/// group. A stream of failing writes (stale commits, an attacker's refused
/// sends) thus keeps the writer guarded, costing what it did before, and
/// a write runs at most twice.
struct Group<'c> {
    conn: &'c Connection,
    /// Writes run in the open transaction, waiting for its commit.
    ran: Vec<Job>,
    in_tx: bool,
    guarded: bool,
    failed: bool,
}

impl Group<'_> {
    fn add(&mut self, mut job: Job) {
        if !self.in_tx {
            if let Err(e) = exec(self.conn, "BEGIN IMMEDIATE") {
                job.finish(Err(&e));
                return;
            }
            self.in_tx = true;
        }
        let ok = job.run(self.conn, self.guarded);
        self.ran.push(job);
        self.failed |= !ok;
        if !ok {
            // What it looked up may be undone with it (see `WRITER_DEVICE_ROWS`).
            forget_device_rows();
        }
        if self.conn.is_autocommit() {
            // SQLite rolled the whole transaction back (I/O error, full
            // disk): nothing of this group is stored.
            forget_device_rows();
            self.in_tx = false;
            let e = StoreError::Unavailable("the write transaction was rolled back".into());
            for job in self.ran.drain(..) {
                job.finish(Err(&e));
            }
        } else if !ok && !self.guarded {
            self.run_again_guarded();
        }
    }

    /// Undoes the group and runs what it ran again, each write in its own
    /// savepoint.
    fn run_again_guarded(&mut self) {
        self.guarded = true;
        self.in_tx = false;
        let _ = self.conn.execute_batch("ROLLBACK");
        if !self.conn.is_autocommit() {
            // The failed write's changes are still in it, so nothing more
            // may run in it and it must never commit: every write of the
            // group is answered, a later write's BEGIN fails and is
            // answered too, and `commit` tries the rollback again.
            let e = StoreError::Internal("the write transaction could not be rolled back".into());
            for job in self.ran.drain(..) {
                job.finish(Err(&e));
            }
            return;
        }
        for job in std::mem::take(&mut self.ran) {
            self.add(job);
        }
    }

    /// Commits, answers every write, and says whether one failed.
    fn commit(self) -> bool {
        if !self.in_tx && !self.conn.is_autocommit() {
            // A transaction given up on (see `run_again_guarded`).
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        if self.in_tx {
            let committed = exec(self.conn, "COMMIT");
            if committed.is_err() {
                forget_device_rows();
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
            }
            for job in self.ran {
                job.finish(committed.as_ref().map(|_| ()));
            }
        }
        self.failed
    }
}

/// Turns on the query planner stability guarantee. Without it, a statement
/// whose plan looked at a bound value (`LIMIT ?`, and more with the bundled
/// build's STAT4) is marked expired whenever that parameter is bound again,
/// so every run of a cached statement was parsed and planned anew
/// (perf: sqlite3Reprepare, a tenth of the server's CPU at saturation). The
/// plans do not depend on the values here: the tables have no statistics.
fn stable_plans(conn: &Connection) -> Result<(), StoreError> {
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map(|_| ()).map_err(map_err)
}

/// The pool of read-only connections.
#[derive(Debug)]
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection: at most [`READERS`] reads run at once.
    permits: Arc<tokio::sync::Semaphore>,
}

impl Readers {
    fn take(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(conn);
        }
        let conn = Connection::open(&self.path).map_err(|e| match e.sqlite_error_code() {
            Some(_) => map_err(e),
            None => StoreError::Unavailable(e.to_string()),
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(map_err)?;
        conn.execute_batch("PRAGMA query_only=ON;").map_err(map_err)?;
        stable_plans(&conn)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < READERS {
            idle.push(conn);
        }
    }
}

pub(super) fn map_err(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(
            SqliteCode::DatabaseBusy
            | SqliteCode::DatabaseLocked
            | SqliteCode::CannotOpen
            | SqliteCode::DiskFull
            | SqliteCode::SystemIoFailure
            | SqliteCode::ReadOnly
            | SqliteCode::PermissionDenied,
        ) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Internal(e.to_string()),
    }
}

pub(super) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl SqliteStore {
    /// Opens (creating when missing) the database file and runs pending
    /// migrations.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the file cannot be opened;
    /// [`StoreError::Internal`] when the schema is newer than this build or a
    /// migration fails.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path).map_err(|e| match e.sqlite_error_code() {
            Some(_) => map_err(e),
            None => StoreError::Unavailable(e.to_string()),
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(map_err)?;
        // journal_mode answers with a row, so it cannot go through execute_batch.
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(map_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unavailable(format!("cannot switch the database to WAL mode (got {mode})")));
        }
        // temp_store=MEMORY: the per-write savepoints of a group keep their
        // undo pages in memory rather than in a temporary file (pwrite).
        conn.execute_batch(
            "PRAGMA synchronous=FULL; PRAGMA secure_delete=ON; PRAGMA foreign_keys=ON; PRAGMA temp_store=MEMORY;",
        )
        .map_err(map_err)?;
        migrate(&mut conn)?;
        stable_plans(&conn)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let conn = Arc::new(Mutex::new(conn));
        let (writer, jobs) = mpsc::channel::<Job>();
        let writer_conn = Arc::clone(&conn);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(&writer_conn, &jobs))
            .map_err(|e| StoreError::Internal(format!("cannot start the storage writer: {e}")))?;
        let readers = Arc::new(Readers {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(READERS)),
        });
        Ok(SqliteStore { conn, writer, readers, path: path.to_path_buf() })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version (number of migrations applied).
    pub fn schema_version() -> usize {
        MIGRATIONS.len()
    }

    pub(super) async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave a transaction open
            // (rusqlite rolls back on drop), so a poisoned lock is still usable.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Internal(format!("storage task failed: {e}")))?
    }

    /// Queues a write for the writer thread; answers once its group is
    /// committed (or with its own error, which undid only its own changes).
    /// `f` may run twice, the first run rolled back (see [`Group`]).
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.queue(f)?.await.map_err(|_| writer_stopped())?
    }

    /// Queues a write; its answer comes on the receiver.
    fn queue<T, F>(&self, f: F) -> Result<tokio::sync::oneshot::Receiver<Result<T, StoreError>>, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (answer, rx) = tokio::sync::oneshot::channel();
        self.writer.send(Box::new(Queued { f, result: None, answer })).map_err(|_| writer_stopped())?;
        Ok(rx)
    }

    /// Runs a read on a read-only connection (the last committed state),
    /// never waiting for the writer.
    pub(super) async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let readers = Arc::clone(&self.readers);
        let permit = Arc::clone(&readers.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Internal("the read pool is closed".into()))?;
        tokio::task::spawn_blocking(move || {
            let conn = readers.take()?;
            let result = f(&conn);
            readers.give_back(conn);
            drop(permit);
            result
        })
        .await
        .map_err(|e| StoreError::Internal(format!("storage task failed: {e}")))?
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(map_err)?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(StoreError::Internal(format!(
            "database schema version {version} is newer than this server ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive).map_err(map_err)?;
        tx.execute_batch(step).map_err(map_err)?;
        tx.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap_or(i64::MAX)).map_err(map_err)?;
        tx.commit().map_err(map_err)?;
    }
    Ok(())
}

/// Most active devices the writer remembers (about 100 bytes each).
const DEVICE_ROWS: usize = 100_000;

std::thread_local! {
    /// The writer thread's memory of active devices' row ids: every send
    /// and acknowledgement looks its devices up, a sixth of the server's
    /// instructions per message when each was a query. `None` on every
    /// other thread (readers, [`SqliteStore::run`]), which always query.
    ///
    /// Why it stays true: a device's row is never deleted and its id never
    /// changes, and a row only ever turns inactive ([`Sql::deactivate`],
    /// which forgets everything). A row found inside a transaction that is
    /// then undone (a device added by a write that failed, or by a group
    /// that did not commit) must not be remembered, so every failed write
    /// and every group that does not commit forgets everything too.
    static WRITER_DEVICE_ROWS: std::cell::RefCell<Option<HashMap<DeviceAddress, i64>>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes this thread (the writer) remember device rows.
fn remember_device_rows() {
    WRITER_DEVICE_ROWS.with_borrow_mut(|rows| *rows = Some(HashMap::new()));
}

/// Forgets every device row this thread remembers (see [`WRITER_DEVICE_ROWS`]).
fn forget_device_rows() {
    WRITER_DEVICE_ROWS.with_borrow_mut(|rows| {
        if let Some(rows) = rows {
            rows.clear();
        }
    });
}

/// The internal row id of an active device.
fn device_row(conn: &Connection, addr: &DeviceAddress) -> Result<Option<i64>, StoreError> {
    if let Some(row) = WRITER_DEVICE_ROWS.with_borrow(|rows| rows.as_ref().and_then(|r| r.get(addr).copied())) {
        return Ok(Some(row));
    }
    let row = conn
        .prepare_cached("SELECT id FROM devices WHERE handle = ?1 AND device_id = ?2 AND active = 1")
        .and_then(|mut s| s.query_row(params![addr.handle.as_str(), addr.device.to_hex()], |r| r.get(0)).optional())
        .map_err(map_err)?;
    if let Some(row) = row {
        WRITER_DEVICE_ROWS.with_borrow_mut(|rows| {
            if let Some(rows) = rows {
                if rows.len() >= DEVICE_ROWS {
                    rows.clear();
                }
                rows.insert(addr.clone(), row);
            }
        });
    }
    Ok(row)
}

/// How many active devices the account has.
fn active_devices(conn: &Connection, handle: &Handle) -> Result<u64, StoreError> {
    conn.query_row("SELECT COUNT(*) FROM devices WHERE handle = ?1 AND active = 1", [handle.as_str()], |r| {
        r.get::<_, i64>(0)
    })
    .map(to_u64)
    .map_err(map_err)
}

/// An account with its active devices, in a read or a write.
fn account_in(conn: &Connection, handle: &Handle) -> Result<Option<AccountInfo>, StoreError> {
    let handle = handle.clone();
    let identity_key: Option<Vec<u8>> = conn
        .query_row("SELECT identity_key FROM accounts WHERE handle = ?1", [handle.as_str()], |r| r.get(0))
        .optional()
        .map_err(map_err)?;
    let Some(identity_key) = identity_key else {
        return Ok(None);
    };
    let mut stmt = conn
        .prepare(
            "SELECT device_id, signature_key, certificate FROM devices
             WHERE handle = ?1 AND active = 1 ORDER BY id",
        )
        .map_err(map_err)?;
    let rows = stmt
        .query_map([handle.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, Vec<u8>>(2)?))
        })
        .map_err(map_err)?;
    let mut devices = Vec::new();
    for row in rows {
        let (d, k, c) = row.map_err(map_err)?;
        devices.push(device_record(&d, k, c)?);
    }
    Ok(Some(AccountInfo { handle, identity_key: B64(identity_key), devices, kt: None }))
}

fn require_device(conn: &Connection, addr: &DeviceAddress) -> Result<i64, StoreError> {
    device_row(conn, addr)?.ok_or_else(|| StoreError::UnknownDevice(addr.clone()))
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

fn count_packages(conn: &Connection, device: i64) -> Result<KeyPackageCount, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT suite, COUNT(*) FROM key_packages WHERE device = ?1 GROUP BY suite")
        .map_err(map_err)?;
    let one_time = stmt
        .query_map([device], |r| Ok((r.get::<_, u16>(0)?, to_u64(r.get::<_, i64>(1)?))))
        .map_err(map_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err)?;
    let mut stmt = conn.prepare_cached("SELECT suite FROM last_resort_packages WHERE device = ?1").map_err(map_err)?;
    let last_resort = stmt
        .query_map([device], |r| r.get::<_, u16>(0))
        .map_err(map_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err)?;
    Ok(rules::package_count(&one_time, &last_resort))
}

fn count(conn: &Connection, table: &str) -> Result<u64, StoreError> {
    // `table` only ever comes from the fixed list in `stats`.
    conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get::<_, i64>(0)).map(to_u64).map_err(map_err)
}

/// The statements of [`super::rules`] over the writer's transaction. Writes
/// run one at a time, so nothing here needs a lock: what a rule reads stays
/// true until the group commits. Every statement is synchronous (the
/// futures are ready at once; see [`super::rules::ready`]).
struct Sql<'a>(&'a Connection);

impl rules::Statements for Sql<'_> {
    type Error = StoreError;

    async fn device_row(&mut self, addr: &DeviceAddress) -> Result<Option<i64>, StoreError> {
        device_row(self.0, addr)
    }

    async fn lock_device(&mut self, addr: &DeviceAddress) -> Result<Option<i64>, StoreError> {
        device_row(self.0, addr)
    }

    async fn lock_account(&mut self, handle: &Handle) -> Result<bool, StoreError> {
        self.0
            .prepare_cached("SELECT EXISTS(SELECT 1 FROM accounts WHERE handle = ?1)")
            .and_then(|mut s| s.query_row([handle.as_str()], |r| r.get(0)))
            .map_err(map_err)
    }

    async fn active_devices(&mut self, handle: &Handle) -> Result<u64, StoreError> {
        active_devices(self.0, handle)
    }

    async fn claim_send_id(
        &mut self,
        sender: i64,
        send_id: &SendId,
        now_ms: u64,
    ) -> Result<Option<rules::SeenSend>, StoreError> {
        let seen: Option<(Option<i64>, i64)> = self
            .0
            .prepare_cached("SELECT epoch, created_at FROM send_ids WHERE device = ?1 AND send_id = ?2")
            .and_then(|mut s| s.query_row(params![sender, &send_id.0[..]], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .map_err(map_err)?;
        if let Some((epoch, created_at)) = seen {
            return Ok(Some(rules::SeenSend {
                epoch: epoch.map(|e| Epoch(to_u64(e))),
                created_at: to_u64(created_at),
            }));
        }
        self.0
            .prepare_cached("INSERT INTO send_ids (device, send_id, epoch, created_at) VALUES (?1, ?2, NULL, ?3)")
            .and_then(|mut s| s.execute(params![sender, &send_id.0[..], to_i64(now_ms)]))
            .map_err(map_err)?;
        Ok(None)
    }

    async fn set_send_epoch(&mut self, sender: i64, send_id: &SendId, epoch: Epoch) -> Result<(), StoreError> {
        self.0
            .prepare_cached("UPDATE send_ids SET epoch = ?3 WHERE device = ?1 AND send_id = ?2")
            .and_then(|mut s| s.execute(params![sender, &send_id.0[..], to_i64(epoch.0)]))
            .map(|_| ())
            .map_err(map_err)
    }

    async fn conversation(
        &mut self,
        conversation: &ConversationId,
        sender: i64,
    ) -> Result<rules::ConversationState, StoreError> {
        let state: Option<(i64, bool)> = self
            .0
            .prepare_cached(
                "SELECT c.epoch, c.has_roster = 0 OR EXISTS (
                     SELECT 1 FROM conversation_members m WHERE m.conversation = c.id AND m.device = ?2)
                 FROM conversations c WHERE c.id = ?1",
            )
            .and_then(|mut s| {
                s.query_row(params![&conversation.0[..], sender], |r| Ok((r.get(0)?, r.get(1)?))).optional()
            })
            .map_err(map_err)?;
        let (epoch, sender_allowed) = state.unwrap_or((0, true));
        Ok(rules::ConversationState { epoch: Epoch(to_u64(epoch)), sender_allowed })
    }

    async fn advance_epoch(&mut self, conversation: &ConversationId, from: Epoch) -> Result<Option<Epoch>, StoreError> {
        let next = from.0.checked_add(1).ok_or_else(|| StoreError::Internal("epoch overflow".into()))?;
        let c = &conversation.0[..];
        let changed = if from.0 == 0 {
            self.0
                .prepare_cached("INSERT INTO conversations (id, epoch) VALUES (?1, 1) ON CONFLICT (id) DO NOTHING")
                .and_then(|mut s| s.execute([c]))
        } else {
            self.0
                .prepare_cached("UPDATE conversations SET epoch = ?3 WHERE id = ?1 AND epoch = ?2")
                .and_then(|mut s| s.execute(params![c, to_i64(from.0), to_i64(next)]))
        }
        .map_err(map_err)?;
        Ok((changed == 1).then_some(Epoch(next)))
    }

    async fn roster(&mut self, conversation: &ConversationId) -> Result<Vec<DeviceAddress>, StoreError> {
        roster_of(self.0, &conversation.0[..])
    }

    async fn set_roster(
        &mut self,
        conversation: &ConversationId,
        change: super::RosterChange<'_>,
    ) -> Result<(), StoreError> {
        set_roster(self.0, &conversation.0[..], change)
    }

    async fn lock_recipients(&mut self, addrs: &[&DeviceAddress]) -> Result<Vec<Option<i64>>, StoreError> {
        addrs.iter().map(|a| device_row(self.0, a)).collect()
    }

    async fn add_usage(&mut self, device: i64, bytes: u64) -> Result<u64, StoreError> {
        // Two statements rather than one with RETURNING: SQLite gathers a
        // RETURNING statement's rows in a temporary table it opens and
        // closes each time, which cost more than the second look-up.
        self.0
            .prepare_cached(
                "INSERT INTO device_usage (device, bytes) VALUES (?1, ?2)
                 ON CONFLICT (device) DO UPDATE SET bytes = bytes + excluded.bytes",
            )
            .and_then(|mut s| s.execute(params![device, to_i64(bytes)]))
            .map_err(map_err)?;
        self.0
            .prepare_cached("SELECT bytes FROM device_usage WHERE device = ?1")
            .and_then(|mut s| s.query_row([device], |r| r.get::<_, i64>(0)))
            .map(to_u64)
            .map_err(map_err)
    }

    async fn account_usage(&mut self, handle: &Handle) -> Result<u64, StoreError> {
        self.0
            .prepare_cached(
                "SELECT COALESCE(SUM(u.bytes), 0) FROM device_usage u JOIN devices d ON d.id = u.device
                 WHERE d.handle = ?1",
            )
            .and_then(|mut s| s.query_row([handle.as_str()], |r| r.get::<_, i64>(0)))
            .map(to_u64)
            .map_err(map_err)
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
    ) -> Result<i64, StoreError> {
        self.0
            .prepare_cached(
                "INSERT INTO messages (conversation, sender, kind, ciphertext, created_at, roster, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    &conversation.0[..],
                    sender,
                    kind.as_str(),
                    ciphertext,
                    to_i64(now_ms),
                    roster,
                    expires_at.map(to_i64)
                ])
            })
            .map_err(map_err)?;
        Ok(self.0.last_insert_rowid())
    }

    async fn insert_inbox(&mut self, rows: &[(i64, i64)], now_ms: u64) -> Result<(), StoreError> {
        let mut insert = self
            .0
            .prepare_cached("INSERT INTO inbox (device, message, created_at) VALUES (?1, ?2, ?3)")
            .map_err(map_err)?;
        for (device, message) in rows {
            insert.execute(params![device, message, to_i64(now_ms)]).map_err(map_err)?;
        }
        Ok(())
    }

    async fn notify_wake(&mut self, _addrs: &[DeviceAddress]) -> Result<(), StoreError> {
        // One node: the caller wakes its own sockets after the commit.
        Ok(())
    }

    async fn insert_device(&mut self, handle: &Handle, device: &DeviceRecord, now_ms: u64) -> Result<bool, StoreError> {
        let inserted = self
            .0
            .execute(
                "INSERT INTO devices (handle, device_id, signature_key, certificate, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (handle, device_id) DO NOTHING",
                params![
                    handle.as_str(),
                    device.device_id.to_hex(),
                    device.signature_key.as_slice(),
                    device.certificate.as_slice(),
                    to_i64(now_ms)
                ],
            )
            .map_err(map_err)?;
        Ok(inserted == 1)
    }

    async fn lock_conversations_of(&mut self, device: i64) -> Result<Vec<ConversationId>, StoreError> {
        let mut stmt = self
            .0
            .prepare_cached("SELECT conversation FROM conversation_members WHERE device = ?1 ORDER BY conversation")
            .map_err(map_err)?;
        let rows = stmt.query_map([device], |r| r.get::<_, Vec<u8>>(0)).map_err(map_err)?;
        let mut out = Vec::new();
        for row in rows {
            let id = row.map_err(map_err)?;
            out.push(
                ConversationId::from_slice(&id)
                    .map_err(|_| StoreError::Internal("stored conversation id is not valid".into()))?,
            );
        }
        Ok(out)
    }

    async fn deactivate(&mut self, device: i64) -> Result<(), StoreError> {
        forget_device_rows();
        self.0.execute("UPDATE devices SET active = 0 WHERE id = ?1", [device]).map(|_| ()).map_err(map_err)
    }

    async fn delete_key_packages(&mut self, device: i64, last_resort: bool) -> Result<(), StoreError> {
        self.0.execute("DELETE FROM key_packages WHERE device = ?1", [device]).map_err(map_err)?;
        if last_resort {
            self.0.execute("DELETE FROM last_resort_packages WHERE device = ?1", [device]).map_err(map_err)?;
        }
        Ok(())
    }

    async fn leave_rosters(&mut self, device: i64, conversations: &[ConversationId]) -> Result<(), StoreError> {
        self.0.execute("DELETE FROM conversation_members WHERE device = ?1", [device]).map_err(map_err)?;
        drop_if_unmanned(self.0, conversations.iter().map(|c| c.0.to_vec()))
    }

    async fn delete_inbox_of(&mut self, device: i64) -> Result<Vec<i64>, StoreError> {
        let mut stmt = self.0.prepare("DELETE FROM inbox WHERE device = ?1 RETURNING message").map_err(map_err)?;
        let rows = stmt.query_map([device], |r| r.get(0)).map_err(map_err)?;
        rows.collect::<Result<_, _>>().map_err(map_err)
    }

    async fn drop_orphans(&mut self, mut messages: Vec<i64>) -> Result<u64, StoreError> {
        messages.sort_unstable();
        messages.dedup();
        drop_orphans(self.0, messages)
    }

    async fn notify_revoked(&mut self, _addr: &DeviceAddress) -> Result<(), StoreError> {
        Ok(())
    }

    async fn count_key_packages(&mut self, device: i64) -> Result<KeyPackageCount, StoreError> {
        count_packages(self.0, device)
    }

    async fn insert_key_packages(&mut self, device: i64, packages: &[(u16, Vec<u8>)]) -> Result<(), StoreError> {
        let mut insert = self
            .0
            .prepare_cached("INSERT INTO key_packages (device, suite, data) VALUES (?1, ?2, ?3)")
            .map_err(map_err)?;
        for (suite, kp) in packages {
            insert.execute(params![device, suite, kp]).map_err(map_err)?;
        }
        Ok(())
    }

    async fn set_last_resort(&mut self, device: i64, suite: u16, package: &[u8]) -> Result<(), StoreError> {
        self.0
            .execute(
                "INSERT INTO last_resort_packages (device, suite, data) VALUES (?1, ?2, ?3)
                 ON CONFLICT (device, suite) DO UPDATE SET data = excluded.data",
                params![device, suite, package],
            )
            .map(|_| ())
            .map_err(map_err)
    }

    async fn identity_key(&mut self, handle: &Handle) -> Result<Option<Vec<u8>>, StoreError> {
        self.0
            .query_row("SELECT identity_key FROM accounts WHERE handle = ?1", [handle.as_str()], |r| r.get(0))
            .optional()
            .map_err(map_err)
    }

    async fn devices_of(&mut self, handle: &Handle) -> Result<Vec<(i64, DeviceRecord)>, StoreError> {
        let mut stmt = self
            .0
            .prepare(
                "SELECT id, device_id, signature_key, certificate FROM devices
                 WHERE handle = ?1 AND active = 1 ORDER BY id",
            )
            .map_err(map_err)?;
        let rows = stmt
            .query_map([handle.as_str()], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?, r.get::<_, Vec<u8>>(3)?))
            })
            .map_err(map_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, device_id, key, cert) = row.map_err(map_err)?;
            out.push((id, device_record(&device_id, key, cert)?));
        }
        Ok(out)
    }

    async fn take_one_time(&mut self, device: i64, suite: u16) -> Result<Option<Vec<u8>>, StoreError> {
        self.0
            .query_row(
                "DELETE FROM key_packages WHERE id =
                   (SELECT id FROM key_packages WHERE device = ?1 AND suite = ?2 ORDER BY id LIMIT 1)
                 RETURNING data",
                params![device, suite],
                |r| r.get(0),
            )
            .optional()
            .map_err(map_err)
    }

    async fn last_resort(&mut self, device: i64, suite: u16) -> Result<Option<Vec<u8>>, StoreError> {
        self.0
            .query_row(
                "SELECT data FROM last_resort_packages WHERE device = ?1 AND suite = ?2",
                params![device, suite],
                |r| r.get(0),
            )
            .optional()
            .map_err(map_err)
    }

    async fn lock_claim_window(
        &mut self,
        claimer: &Handle,
        target: &Handle,
        now_ms: u64,
    ) -> Result<(u64, u64), StoreError> {
        // Writes run one at a time: nothing to lock.
        self.0
            .execute(
                "INSERT OR IGNORE INTO claim_windows (claimer, target, window_start, claims) VALUES (?1, ?2, ?3, 0)",
                params![claimer.as_str(), target.as_str(), to_i64(now_ms)],
            )
            .map_err(map_err)?;
        let (start, claims): (i64, i64) = self
            .0
            .query_row(
                "SELECT window_start, claims FROM claim_windows WHERE claimer = ?1 AND target = ?2",
                params![claimer.as_str(), target.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(map_err)?;
        Ok((to_u64(start), to_u64(claims)))
    }

    async fn set_claim_window(
        &mut self,
        claimer: &Handle,
        target: &Handle,
        start_ms: u64,
        claims: u64,
    ) -> Result<(), StoreError> {
        self.0
            .execute(
                "UPDATE claim_windows SET window_start = ?3, claims = ?4 WHERE claimer = ?1 AND target = ?2",
                params![claimer.as_str(), target.as_str(), to_i64(start_ms), to_i64(claims)],
            )
            .map(|_| ())
            .map_err(map_err)
    }

    async fn account(&mut self, handle: &Handle) -> Result<Option<AccountInfo>, StoreError> {
        account_in(self.0, handle)
    }

    async fn set_identity_key(&mut self, handle: &Handle, key: &[u8]) -> Result<(), StoreError> {
        self.0
            .execute("UPDATE accounts SET identity_key = ?1 WHERE handle = ?2", params![key, handle.as_str()])
            .map(|_| ())
            .map_err(map_err)
    }

    async fn set_device_keys(&mut self, device: i64, record: &DeviceRecord) -> Result<(), StoreError> {
        self.0
            .execute(
                "UPDATE devices SET signature_key = ?1, certificate = ?2 WHERE id = ?3",
                params![record.signature_key.as_slice(), record.certificate.as_slice(), device],
            )
            .map(|_| ())
            .map_err(map_err)
    }

    async fn insert_account(&mut self, handle: &Handle, identity_key: &[u8], now_ms: u64) -> Result<bool, StoreError> {
        let inserted = self
            .0
            .execute(
                "INSERT INTO accounts (handle, identity_key, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (handle) DO NOTHING",
                params![handle.as_str(), identity_key, to_i64(now_ms)],
            )
            .map_err(map_err)?;
        Ok(inserted == 1)
    }

    async fn account_exists(&mut self, handle: &Handle) -> Result<bool, StoreError> {
        self.0
            .query_row("SELECT EXISTS(SELECT 1 FROM accounts WHERE handle = ?1)", [handle.as_str()], |r| r.get(0))
            .map_err(map_err)
    }

    async fn insert_link(
        &mut self,
        link: &LinkId,
        handle: &Handle,
        request: &[u8],
        expires_at_ms: u64,
    ) -> Result<bool, StoreError> {
        let inserted = self
            .0
            .execute(
                "INSERT INTO links (link, handle, request, expires_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (link) DO NOTHING",
                params![&link.0[..], handle.as_str(), request, to_i64(expires_at_ms)],
            )
            .map_err(map_err)?;
        Ok(inserted == 1)
    }

    async fn lock_link(&mut self, link: &LinkId, handle: &Handle, now_ms: u64) -> Result<Option<bool>, StoreError> {
        self.0
            .query_row(
                "SELECT response IS NOT NULL FROM links WHERE link = ?1 AND handle = ?2 AND expires_at > ?3",
                params![&link.0[..], handle.as_str(), to_i64(now_ms)],
                |r| r.get(0),
            )
            .optional()
            .map_err(map_err)
    }

    async fn set_link_response(&mut self, link: &LinkId, response: &[u8]) -> Result<(), StoreError> {
        self.0
            .execute("UPDATE links SET response = ?2 WHERE link = ?1", params![&link.0[..], response])
            .map(|_| ())
            .map_err(map_err)
    }

    async fn lock_link_response(&mut self, link: &LinkId, now_ms: u64) -> Result<Option<Option<Vec<u8>>>, StoreError> {
        self.0
            .query_row(
                "SELECT response FROM links WHERE link = ?1 AND expires_at > ?2",
                params![&link.0[..], to_i64(now_ms)],
                |r| r.get(0),
            )
            .optional()
            .map_err(map_err)
    }

    async fn delete_link(&mut self, link: &LinkId) -> Result<(), StoreError> {
        self.0.execute("DELETE FROM links WHERE link = ?1", [&link.0[..]]).map(|_| ()).map_err(map_err)
    }

    async fn purge_account(&mut self, handle: &Handle) -> Result<(), StoreError> {
        for statement in rules::PURGE_ACCOUNT {
            self.0.execute(statement, [handle.as_str()]).map_err(map_err)?;
        }
        for statement in rules::PURGE_UNREADABLE_BLOBS {
            self.0.execute(statement, []).map_err(map_err)?;
        }
        self.0
            .execute("UPDATE devices SET signature_key = X'', certificate = X'' WHERE handle = ?1", [handle.as_str()])
            .map_err(map_err)?;
        self.0
            .execute("UPDATE accounts SET identity_key = X'' WHERE handle = ?1", [handle.as_str()])
            .map(|_| ())
            .map_err(map_err)
    }

    async fn notify_keys_changed(&mut self, _addr: &DeviceAddress) -> Result<(), StoreError> {
        // One node: the caller drops its own cache after the commit.
        Ok(())
    }

    async fn delete_inbox_rows(&mut self, device: i64, ids: &[u64]) -> Result<Vec<i64>, StoreError> {
        // A look-up, then a delete by row id: cheaper than one statement
        // with RETURNING (see `add_usage`).
        let mut find =
            self.0.prepare_cached("SELECT message FROM inbox WHERE id = ?1 AND device = ?2").map_err(map_err)?;
        let mut delete = self.0.prepare_cached("DELETE FROM inbox WHERE id = ?1").map_err(map_err)?;
        let mut messages = Vec::new();
        for &id in ids {
            let message: Option<i64> =
                find.query_row(params![to_i64(id), device], |r| r.get(0)).optional().map_err(map_err)?;
            if let Some(message) = message {
                delete.execute([to_i64(id)]).map_err(map_err)?;
                messages.push(message);
            }
        }
        Ok(messages)
    }
}

/// Stores a send (see [`Store::send`]) inside the caller's transaction.
/// The blob statements (see [`rules::BlobStatements`]); downloads run them
/// on a read-only connection, the rest on the writer's transaction.
impl rules::BlobStatements for Sql<'_> {
    async fn account_blob_bytes(&mut self, handle: &Handle) -> Result<u64, StoreError> {
        self.0
            .prepare_cached(
                "SELECT COALESCE(SUM(b.size), 0) FROM blobs b JOIN devices d ON d.id = b.owner WHERE d.handle = ?1",
            )
            .and_then(|mut s| s.query_row([handle.as_str()], |r| r.get::<_, i64>(0)))
            .map(to_u64)
            .map_err(map_err)
    }

    async fn insert_blob(
        &mut self,
        blob: &BlobId,
        owner: i64,
        size: u64,
        now_ms: u64,
        expires_at_ms: u64,
    ) -> Result<Option<i64>, StoreError> {
        let inserted = self
            .0
            .prepare_cached(
                "INSERT INTO blobs (blob, owner, size, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (blob) DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![&blob.0[..], owner, to_i64(size), to_i64(now_ms), to_i64(expires_at_ms)])
            })
            .map_err(map_err)?;
        Ok((inserted == 1).then(|| self.0.last_insert_rowid()))
    }

    async fn insert_blob_readers(&mut self, blob: i64, readers: &[i64]) -> Result<(), StoreError> {
        let mut insert = self
            .0
            .prepare_cached("INSERT OR IGNORE INTO blob_readers (blob, device) VALUES (?1, ?2)")
            .map_err(map_err)?;
        for device in readers {
            insert.execute(params![blob, device]).map_err(map_err)?;
        }
        Ok(())
    }

    async fn lock_blob(&mut self, blob: &BlobId, now_ms: u64) -> Result<Option<rules::BlobRow>, StoreError> {
        blob_row(self.0, blob, now_ms)
    }

    async fn blob(&mut self, blob: &BlobId, now_ms: u64) -> Result<Option<rules::BlobRow>, StoreError> {
        blob_row(self.0, blob, now_ms)
    }

    async fn append_piece(&mut self, blob: i64, offset: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.0
            .prepare_cached("INSERT INTO blob_pieces (blob, start, data) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![blob, to_i64(offset), bytes]))
            .map_err(map_err)?;
        self.0
            .prepare_cached("UPDATE blobs SET received = ?2 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![blob, to_i64(offset.saturating_add(bytes.len() as u64))]))
            .map_err(map_err)?;
        Ok(())
    }

    async fn set_blob_complete(&mut self, blob: i64) -> Result<(), StoreError> {
        self.0
            .prepare_cached("UPDATE blobs SET complete = 1 WHERE id = ?1")
            .and_then(|mut s| s.execute([blob]))
            .map(|_| ())
            .map_err(map_err)
    }

    async fn is_blob_reader(&mut self, blob: i64, device: i64) -> Result<bool, StoreError> {
        self.0
            .prepare_cached("SELECT EXISTS(SELECT 1 FROM blob_readers WHERE blob = ?1 AND device = ?2)")
            .and_then(|mut s| s.query_row(params![blob, device], |r| r.get(0)))
            .map_err(map_err)
    }

    async fn blob_pieces(&mut self, blob: i64, offset: u64, length: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut stmt = self
            .0
            .prepare_cached(
                "SELECT start, data FROM blob_pieces
                 WHERE blob = ?1 AND start < ?3 AND start + length(data) > ?2 ORDER BY start",
            )
            .map_err(map_err)?;
        let rows = stmt
            .query_map(params![blob, to_i64(offset), to_i64(offset.saturating_add(length))], |r| {
                Ok((to_u64(r.get(0)?), r.get(1)?))
            })
            .map_err(map_err)?;
        rows.collect::<Result<_, _>>().map_err(map_err)
    }

    async fn mark_blob_fetched(&mut self, blob: i64, device: i64) -> Result<u64, StoreError> {
        self.0
            .prepare_cached("UPDATE blob_readers SET fetched = 1 WHERE blob = ?1 AND device = ?2")
            .and_then(|mut s| s.execute(params![blob, device]))
            .map_err(map_err)?;
        self.0
            .prepare_cached("SELECT COUNT(*) FROM blob_readers WHERE blob = ?1 AND fetched = 0")
            .and_then(|mut s| s.query_row([blob], |r| r.get::<_, i64>(0)))
            .map(to_u64)
            .map_err(map_err)
    }

    async fn delete_blob(&mut self, blob: i64) -> Result<(), StoreError> {
        for sql in [
            "DELETE FROM blob_pieces WHERE blob = ?1",
            "DELETE FROM blob_readers WHERE blob = ?1",
            "DELETE FROM blobs WHERE id = ?1",
        ] {
            self.0.prepare_cached(sql).and_then(|mut s| s.execute([blob])).map_err(map_err)?;
        }
        Ok(())
    }
}

fn blob_row(conn: &Connection, blob: &BlobId, now_ms: u64) -> Result<Option<rules::BlobRow>, StoreError> {
    conn.prepare_cached("SELECT id, owner, size, received, complete FROM blobs WHERE blob = ?1 AND expires_at > ?2")
        .and_then(|mut s| {
            s.query_row(params![&blob.0[..], to_i64(now_ms)], |r| {
                Ok(rules::BlobRow {
                    row: r.get(0)?,
                    owner: r.get(1)?,
                    size: to_u64(r.get(2)?),
                    received: to_u64(r.get(3)?),
                    complete: r.get(4)?,
                })
            })
            .optional()
        })
        .map_err(map_err)
}

fn store_send(
    tx: &Connection,
    sender: &DeviceAddress,
    request: &SendRequest,
    quota: &Quota,
    now_ms: u64,
) -> Result<SendOutcome, StoreError> {
    rules::ready(rules::send(&mut Sql(tx), sender, request, quota, now_ms))
}

/// Undelivered bytes sent by this device, and by its account's devices.
fn usage(conn: &Connection, device: i64, handle: &Handle) -> Result<(u64, u64), StoreError> {
    conn.prepare_cached(
        "SELECT COALESCE((SELECT bytes FROM device_usage WHERE device = ?1), 0),
                COALESCE((SELECT SUM(u.bytes) FROM device_usage u JOIN devices d ON d.id = u.device
                          WHERE d.handle = ?2), 0)",
    )
    .and_then(|mut s| s.query_row(params![device, handle.as_str()], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))))
    .map(|(d, a)| (to_u64(d), to_u64(a)))
    .map_err(map_err)
}

/// Deletes the messages among `messages` that no inbox row refers to any
/// more, and gives their bytes back to their senders' quotas. Returns how
/// many went.
fn drop_orphans(tx: &Connection, messages: impl IntoIterator<Item = i64>) -> Result<u64, StoreError> {
    let mut freed: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
    let mut dropped = 0u64;
    {
        // A look-up, then a delete by row id: cheaper than one statement
        // with RETURNING (see `Sql::add_usage`).
        let mut orphan = tx
            .prepare_cached(
                "SELECT sender, length(ciphertext) FROM messages WHERE id = ?1
                 AND NOT EXISTS (SELECT 1 FROM inbox WHERE message = ?1)",
            )
            .map_err(map_err)?;
        let mut drop_message = tx.prepare_cached("DELETE FROM messages WHERE id = ?1").map_err(map_err)?;
        for m in messages {
            let gone: Option<(i64, i64)> =
                orphan.query_row([m], |r| Ok((r.get(0)?, r.get(1)?))).optional().map_err(map_err)?;
            if let Some((sender, bytes)) = gone {
                drop_message.execute([m]).map_err(map_err)?;
                dropped += 1;
                *freed.entry(sender).or_default() += bytes;
            }
        }
    }
    release(tx, freed)?;
    Ok(dropped)
}

/// Gives bytes back to their senders' quotas.
fn release(tx: &Connection, freed: std::collections::HashMap<i64, i64>) -> Result<(), StoreError> {
    let mut update =
        tx.prepare_cached("UPDATE device_usage SET bytes = MAX(bytes - ?2, 0) WHERE device = ?1").map_err(map_err)?;
    for (device, bytes) in freed {
        update.execute(params![device, bytes]).map_err(map_err)?;
    }
    Ok(())
}

/// Forgets each of these conversations whose roster is now empty: its last
/// member device left or was removed (see `store::RosterChange`).
fn drop_if_unmanned(tx: &Connection, conversations: impl IntoIterator<Item = Vec<u8>>) -> Result<(), StoreError> {
    let mut drop = tx
        .prepare_cached(
            "DELETE FROM conversations WHERE id = ?1 AND has_roster = 1
             AND NOT EXISTS (SELECT 1 FROM conversation_members WHERE conversation = ?1)",
        )
        .map_err(map_err)?;
    for c in conversations {
        drop.execute([c]).map_err(map_err)?;
    }
    Ok(())
}

/// The active devices of a conversation's roster.
fn roster_of(tx: &Connection, conversation: &[u8]) -> Result<Vec<DeviceAddress>, StoreError> {
    let mut stmt = tx
        .prepare_cached(
            "SELECT d.handle, d.device_id FROM conversation_members m JOIN devices d ON d.id = m.device
             WHERE m.conversation = ?1 AND d.active = 1",
        )
        .map_err(map_err)?;
    let rows =
        stmt.query_map([conversation], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(map_err)?;
    let mut out = Vec::new();
    for row in rows {
        let (handle, device) = row.map_err(map_err)?;
        out.push(DeviceAddress { handle: parse_handle(&handle)?, device: parse_device_id(&device)? });
    }
    Ok(out)
}

/// Applies an accepted commit's roster change inside the caller's transaction.
fn set_roster(tx: &Connection, conversation: &[u8], change: super::RosterChange<'_>) -> Result<(), StoreError> {
    let devices = match change {
        super::RosterChange::Replace(devices) => {
            tx.prepare_cached("DELETE FROM conversation_members WHERE conversation = ?1")
                .and_then(|mut s| s.execute([conversation]))
                .map_err(map_err)?;
            devices
        }
        super::RosterChange::Extend(devices) => devices,
    };
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO conversation_members (conversation, device) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )
        .map_err(map_err)?;
    for addr in devices {
        // A device the server no longer knows (revoked) is not a member.
        if let Some(row) = device_row(tx, addr)? {
            insert.execute(params![conversation, row]).map_err(map_err)?;
        }
    }
    tx.prepare_cached("UPDATE conversations SET has_roster = 1 WHERE id = ?1")
        .and_then(|mut s| s.execute([conversation]))
        .map_err(map_err)?;
    drop_if_unmanned(tx, [conversation.to_vec()])
}

/// Remembers a nonce inside the caller's transaction; false when it was used before.
fn insert_nonce(conn: &Connection, addr: &DeviceAddress, nonce: &str, timestamp_ms: u64) -> Result<bool, StoreError> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO nonces (handle, device_id, nonce, timestamp) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![addr.handle.as_str(), addr.device.to_hex(), nonce, to_i64(timestamp_ms)]))
        .map_err(map_err)?;
    Ok(inserted == 1)
}

#[async_trait]
impl Store for SqliteStore {
    async fn register(&self, account: NewAccount, now_ms: u64) -> Result<(), StoreError> {
        self.write(move |tx| rules::ready(rules::register(&mut Sql(tx), &account, now_ms))).await
    }

    async fn add_device(&self, handle: &Handle, device: DeviceRecord, now_ms: u64) -> Result<(), StoreError> {
        let handle = handle.clone();
        self.write(move |tx| rules::ready(rules::add_device(&mut Sql(tx), &handle, &device, now_ms))).await
    }

    async fn replace_keys(
        &self,
        caller: &DeviceAddress,
        identity_key: Vec<u8>,
        devices: Vec<DeviceRecord>,
    ) -> Result<(), StoreError> {
        let caller = caller.clone();
        self.write(move |tx| rules::ready(rules::replace_keys(&mut Sql(tx), &caller, &identity_key, &devices))).await
    }

    async fn remove_device(&self, addr: &DeviceAddress) -> Result<(), StoreError> {
        let addr = addr.clone();
        self.write(move |tx| rules::ready(rules::remove_device(&mut Sql(tx), &addr))).await
    }

    async fn delete_account(&self, caller: &DeviceAddress) -> Result<Vec<DeviceAddress>, StoreError> {
        let caller = caller.clone();
        self.write(move |tx| rules::ready(rules::delete_account(&mut Sql(tx), &caller))).await
    }

    async fn device(&self, addr: &DeviceAddress) -> Result<Option<DeviceRecord>, StoreError> {
        let addr = addr.clone();
        self.read(move |conn| {
            let row: Option<(String, Vec<u8>, Vec<u8>)> = conn
                .prepare_cached(
                    "SELECT device_id, signature_key, certificate FROM devices
                     WHERE handle = ?1 AND device_id = ?2 AND active = 1",
                )
                .and_then(|mut s| {
                    s.query_row(params![addr.handle.as_str(), addr.device.to_hex()], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .optional()
                })
                .map_err(map_err)?;
            row.map(|(d, k, c)| device_record(&d, k, c)).transpose()
        })
        .await
    }

    async fn account(&self, handle: &Handle) -> Result<Option<AccountInfo>, StoreError> {
        let handle = handle.clone();
        self.read(move |conn| account_in(conn, &handle)).await
    }

    async fn check_nonce(&self, addr: &DeviceAddress, nonce: &str, timestamp_ms: u64) -> Result<bool, StoreError> {
        let addr = addr.clone();
        let nonce = nonce.to_owned();
        self.write(move |conn| insert_nonce(conn, &addr, &nonce, timestamp_ms)).await
    }

    async fn upload_key_packages_in(
        &self,
        addr: &DeviceAddress,
        one_time: Vec<(u16, Vec<u8>)>,
        last_resort: Vec<(u16, Vec<u8>)>,
        replace: bool,
    ) -> Result<KeyPackageCount, StoreError> {
        let addr = addr.clone();
        self.write(move |tx| {
            rules::ready(rules::upload_key_packages(&mut Sql(tx), &addr, &one_time, &last_resort, replace))
        })
        .await
    }

    async fn key_package_count(&self, addr: &DeviceAddress) -> Result<KeyPackageCount, StoreError> {
        let addr = addr.clone();
        self.read(move |conn| {
            let device = require_device(conn, &addr)?;
            count_packages(conn, device)
        })
        .await
    }

    async fn claim_key_packages_in(
        &self,
        handle: &Handle,
        requester: &DeviceAddress,
        kind: super::ClaimKind,
        suite: u16,
    ) -> Result<ClaimResponse, StoreError> {
        let handle = handle.clone();
        let requester = requester.clone();
        // Writes run one at a time, so two claims cannot both read the
        // same one-time package before either deletes it.
        self.write(move |tx| rules::ready(rules::claim_key_packages(&mut Sql(tx), &handle, &requester, kind, suite)))
            .await
    }

    async fn one_time_claims_left(&self, claimer: &Handle, target: &Handle, now_ms: u64) -> Result<u64, StoreError> {
        let (claimer, target) = (claimer.clone(), target.clone());
        let stored = self
            .read(move |conn| {
                conn.prepare_cached("SELECT window_start, claims FROM claim_windows WHERE claimer = ?1 AND target = ?2")
                    .and_then(|mut s| {
                        s.query_row(params![claimer.as_str(), target.as_str()], |r| {
                            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                        })
                        .optional()
                    })
                    .map_err(map_err)
            })
            .await?;
        Ok(rules::one_time_claims_left(stored.map(|(s, c)| (to_u64(s), to_u64(c))), now_ms))
    }

    async fn send_within(
        &self,
        sender: &DeviceAddress,
        request: &SendRequest,
        quota: &Quota,
        now_ms: u64,
    ) -> Result<SendOutcome, StoreError> {
        let sender = sender.clone();
        let request = request.clone();
        let quota = *quota;
        self.write(move |tx| store_send(tx, &sender, &request, &quota, now_ms)).await
    }

    async fn stored_bytes(&self, addr: &DeviceAddress) -> Result<(u64, u64), StoreError> {
        let addr = addr.clone();
        self.read(move |conn| {
            let row: Option<i64> = conn
                .prepare_cached("SELECT id FROM devices WHERE handle = ?1 AND device_id = ?2")
                .and_then(|mut s| {
                    s.query_row(params![addr.handle.as_str(), addr.device.to_hex()], |r| r.get(0)).optional()
                })
                .map_err(map_err)?;
            match row {
                Some(device) => usage(conn, device, &addr.handle),
                None => Ok((0, 0)),
            }
        })
        .await
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
        let sender = sender.clone();
        let nonce = nonce.to_owned();
        let request = request.clone();
        let quota = *quota;
        // One write, one commit: the nonce, then the send in a savepoint of
        // its own, so a refused send keeps the nonce remembered.
        self.write(move |tx| {
            if !insert_nonce(tx, &sender, &nonce, timestamp_ms)? {
                return Ok(Ok(None));
            }
            Ok(in_savepoint(tx, |tx| store_send(tx, &sender, &request, &quota, now_ms)).map(Some))
        })
        .await?
    }

    async fn fetch_inbox(
        &self,
        addr: &DeviceAddress,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Envelope>, StoreError> {
        let addr = addr.clone();
        self.read(move |conn| {
            // One statement: each statement outside a transaction opens a
            // read of the WAL of its own, which cost as much as the device
            // look-up itself. An inactive or unknown device finds nothing.
            let mut stmt = conn
                .prepare_cached(
                    "SELECT i.id, m.conversation, d.handle, d.device_id, m.kind, m.ciphertext, m.created_at, m.roster
                     FROM inbox i
                     JOIN messages m ON m.id = i.message
                     JOIN devices d ON d.id = m.sender
                     WHERE i.device = (SELECT id FROM devices WHERE handle = ?1 AND device_id = ?2 AND active = 1)
                       AND i.id > ?3
                     ORDER BY i.id
                     LIMIT ?4",
                )
                .map_err(map_err)?;
            let mut rows = stmt
                .query(params![
                    addr.handle.as_str(),
                    addr.device.to_hex(),
                    to_i64(after),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ])
                .map_err(map_err)?;
            let mut out = Vec::new();
            let mut bytes = 0usize;
            while let Some(r) = rows.next().map_err(map_err)? {
                let ciphertext: Vec<u8> = r.get(5).map_err(map_err)?;
                if !out.is_empty() && bytes.saturating_add(ciphertext.len()) > max_bytes {
                    break;
                }
                bytes = bytes.saturating_add(ciphertext.len());
                let conversation: Vec<u8> = r.get(1).map_err(map_err)?;
                let handle: String = r.get(2).map_err(map_err)?;
                let device_id: String = r.get(3).map_err(map_err)?;
                let kind: String = r.get(4).map_err(map_err)?;
                out.push(Envelope {
                    id: to_u64(r.get(0).map_err(map_err)?),
                    conversation: ConversationId::from_slice(&conversation)
                        .map_err(|_| StoreError::Internal("stored conversation id is not valid".into()))?,
                    sender: DeviceAddress { handle: parse_handle(&handle)?, device: parse_device_id(&device_id)? },
                    kind: MessageKind::parse(&kind)
                        .ok_or_else(|| StoreError::Internal("stored message kind is not valid".into()))?,
                    ciphertext: B64(ciphertext),
                    server_time: to_u64(r.get(6).map_err(map_err)?),
                    roster: r
                        .get::<_, Option<Vec<u8>>>(7)
                        .map_err(map_err)?
                        .map(|b| super::decode_roster(&b))
                        .transpose()?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn ack(&self, addr: &DeviceAddress, ids: &[u64]) -> Result<u64, StoreError> {
        let addr = addr.clone();
        let ids = ids.to_vec();
        self.write(move |tx| rules::ready(rules::ack(&mut Sql(tx), &addr, &ids))).await
    }

    async fn conversation_epoch(&self, conversation: &ConversationId) -> Result<Epoch, StoreError> {
        let conversation = *conversation;
        self.read(move |conn| {
            let epoch: Option<i64> = conn
                .query_row("SELECT epoch FROM conversations WHERE id = ?1", [&conversation.0[..]], |r| r.get(0))
                .optional()
                .map_err(map_err)?;
            Ok(Epoch(epoch.map(to_u64).unwrap_or(0)))
        })
        .await
    }

    async fn relay_key(&self, candidate: [u8; 32]) -> Result<[u8; 32], StoreError> {
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(map_err)?;
            tx.execute("INSERT OR IGNORE INTO relay_key (id, key) VALUES (1, ?1)", [&candidate[..]])
                .map_err(map_err)?;
            let key: Option<Vec<u8>> =
                tx.query_row("SELECT key FROM relay_key WHERE id = 1", [], |r| r.get(0)).optional().map_err(map_err)?;
            tx.commit().map_err(map_err)?;
            key.ok_or_else(|| StoreError::Internal("the relay key row is missing".into()))?
                .try_into()
                .map_err(|_| StoreError::Internal("the stored relay key is not 32 bytes".into()))
        })
        .await
    }

    async fn in_roster(&self, conversation: &ConversationId, device: &DeviceAddress) -> Result<bool, StoreError> {
        let conversation = *conversation;
        let device = device.clone();
        self.read(move |conn| {
            let Some(row) = device_row(conn, &device)? else { return Ok(false) };
            conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM conversations c JOIN conversation_members m ON m.conversation = c.id
                 WHERE c.id = ?1 AND c.has_roster = 1 AND m.device = ?2)",
                params![&conversation.0[..], row],
                |r| r.get(0),
            )
            .map_err(map_err)
        })
        .await
    }

    async fn create_link(
        &self,
        link: &LinkId,
        handle: &Handle,
        request: Vec<u8>,
        expires_at_ms: u64,
    ) -> Result<(), StoreError> {
        let link = *link;
        let handle = handle.clone();
        self.write(move |tx| rules::ready(rules::create_link(&mut Sql(tx), &link, &handle, &request, expires_at_ms)))
            .await
    }

    async fn link(&self, link: &LinkId, handle: &Handle, now_ms: u64) -> Result<LinkRecord, StoreError> {
        let link = *link;
        let handle = handle.clone();
        self.read(move |conn| {
            let row: Option<(Vec<u8>, i64, bool)> = conn
                .query_row(
                    "SELECT request, expires_at, response IS NOT NULL FROM links
                     WHERE link = ?1 AND handle = ?2 AND expires_at > ?3",
                    params![&link.0[..], handle.as_str(), to_i64(now_ms)],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(map_err)?;
            let (request, expires_at, approved) = row.ok_or(StoreError::UnknownLink)?;
            Ok(LinkRecord { link, handle, request, expires_at: to_u64(expires_at), approved })
        })
        .await
    }

    async fn approve_link(
        &self,
        link: &LinkId,
        handle: &Handle,
        response: Vec<u8>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let link = *link;
        let handle = handle.clone();
        self.write(move |tx| rules::ready(rules::approve_link(&mut Sql(tx), &link, &handle, &response, now_ms))).await
    }

    async fn take_link_response(&self, link: &LinkId, now_ms: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let link = *link;
        self.write(move |tx| rules::ready(rules::take_link_response(&mut Sql(tx), &link, now_ms))).await
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
        let (owner, blob, readers, limits) = (owner.clone(), *blob, readers.to_vec(), *limits);
        self.write(move |tx| {
            rules::ready(rules::create_blob(
                &mut Sql(tx),
                &owner,
                &blob,
                size,
                &readers,
                &limits,
                now_ms,
                expires_at_ms,
            ))
        })
        .await
    }

    async fn append_blob(
        &self,
        owner: &DeviceAddress,
        blob: &BlobId,
        offset: u64,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<super::BlobStatus, StoreError> {
        let (owner, blob, bytes) = (owner.clone(), *blob, bytes.to_vec());
        self.write(move |tx| rules::ready(rules::append_blob(&mut Sql(tx), &owner, &blob, offset, &bytes, now_ms)))
            .await
    }

    async fn blob_status(
        &self,
        caller: &DeviceAddress,
        blob: &BlobId,
        now_ms: u64,
    ) -> Result<super::BlobStatus, StoreError> {
        let (caller, blob) = (caller.clone(), *blob);
        self.read(move |conn| rules::ready(rules::blob_status(&mut Sql(conn), &caller, &blob, now_ms))).await
    }

    async fn finish_blob(
        &self,
        owner: &DeviceAddress,
        blob: &BlobId,
        now_ms: u64,
    ) -> Result<super::BlobStatus, StoreError> {
        let (owner, blob) = (owner.clone(), *blob);
        self.write(move |tx| rules::ready(rules::finish_blob(&mut Sql(tx), &owner, &blob, now_ms))).await
    }

    async fn read_blob(
        &self,
        reader: &DeviceAddress,
        blob: &BlobId,
        offset: u64,
        length: u64,
        now_ms: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let (reader, blob) = (reader.clone(), *blob);
        // A read-only connection: downloads never queue behind the writer.
        self.read(move |conn| rules::ready(rules::read_blob(&mut Sql(conn), &reader, &blob, offset, length, now_ms)))
            .await
    }

    async fn blob_fetched(&self, reader: &DeviceAddress, blob: &BlobId, now_ms: u64) -> Result<bool, StoreError> {
        let (reader, blob) = (reader.clone(), *blob);
        self.write(move |tx| rules::ready(rules::blob_fetched(&mut Sql(tx), &reader, &blob, now_ms))).await
    }

    async fn sweep(
        &self,
        inbox_before_ms: u64,
        nonces_before_ms: u64,
        send_ids_before_ms: u64,
        now_ms: u64,
    ) -> Result<SweepReport, StoreError> {
        self.write(move |tx| {
            let mut inbox_rows =
                tx.execute("DELETE FROM inbox WHERE created_at < ?1", [to_i64(inbox_before_ms)]).map_err(map_err)?;
            // Disappearing messages: gone at their expiry, delivered or not.
            inbox_rows += tx
                .execute(
                    "DELETE FROM inbox WHERE message IN
                     (SELECT id FROM messages WHERE expires_at IS NOT NULL AND expires_at <= ?1)",
                    [to_i64(now_ms)],
                )
                .map_err(map_err)?;
            let (messages, freed) = {
                let mut stmt = tx
                    .prepare(
                        "DELETE FROM messages WHERE NOT EXISTS (SELECT 1 FROM inbox WHERE inbox.message = messages.id)
                         RETURNING sender, length(ciphertext)",
                    )
                    .map_err(map_err)?;
                let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))).map_err(map_err)?;
                let mut freed: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
                let mut messages = 0usize;
                for row in rows {
                    let (sender, bytes) = row.map_err(map_err)?;
                    messages += 1;
                    *freed.entry(sender).or_default() += bytes;
                }
                (messages, freed)
            };
            release(tx, freed)?;
            let nonces =
                tx.execute("DELETE FROM nonces WHERE timestamp < ?1", [to_i64(nonces_before_ms)]).map_err(map_err)?;
            let send_ids = tx
                .execute("DELETE FROM send_ids WHERE created_at < ?1", [to_i64(send_ids_before_ms)])
                .map_err(map_err)?;
            let links = tx.execute("DELETE FROM links WHERE expires_at <= ?1", [to_i64(now_ms)]).map_err(map_err)?;
            let blobs = {
                let mut stmt = tx.prepare("SELECT id FROM blobs WHERE expires_at <= ?1").map_err(map_err)?;
                let rows = stmt.query_map([to_i64(now_ms)], |r| r.get::<_, i64>(0)).map_err(map_err)?;
                rows.collect::<Result<Vec<i64>, _>>().map_err(map_err)?
            };
            for blob in &blobs {
                rules::ready(rules::BlobStatements::delete_blob(&mut Sql(tx), *blob))?;
            }
            // A claim window an hour old counts nothing any more.
            tx.execute(
                "DELETE FROM claim_windows WHERE window_start <= ?1",
                [to_i64(now_ms.saturating_sub(super::CLAIM_WINDOW_MS))],
            )
            .map_err(map_err)?;
            Ok(SweepReport {
                inbox_rows: inbox_rows as u64,
                messages: messages as u64,
                nonces: nonces as u64,
                send_ids: send_ids as u64,
                links: links as u64,
                blobs: blobs.len() as u64,
            })
        })
        .await
    }

    async fn maintenance(&self) -> Result<(), StoreError> {
        self.run(|conn| {
            // Answers (busy, log frames, checkpointed frames); a busy checkpoint
            // is retried at the next sweep.
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).map_err(map_err)
        })
        .await
    }

    fn kt_storage(&self) -> Arc<dyn super::kt::KtStorage> {
        Arc::new(self.clone())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.read(|conn| {
            Ok(StoreStats {
                accounts: count(conn, "accounts")?,
                devices: count(conn, "devices")?,
                one_time_key_packages: count(conn, "key_packages")?,
                last_resort_key_packages: count(conn, "last_resort_packages")?,
                messages: count(conn, "messages")?,
                handshake_messages: count(conn, "messages WHERE kind <> 'application'")?,
                inbox_rows: count(conn, "inbox")?,
                nonces: count(conn, "nonces")?,
                send_ids: count(conn, "send_ids")?,
                conversations: count(conn, "conversations")?,
                links: count(conn, "links")?,
                blobs: count(conn, "blobs")?,
                blob_bytes: conn
                    .query_row("SELECT COALESCE(SUM(received), 0) FROM blobs", [], |r| r.get::<_, i64>(0))
                    .map(to_u64)
                    .map_err(map_err)?,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    fn open() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("server.db")).expect("open store");
        (dir, Arc::new(store))
    }

    /// The whole schema a new data directory gets, as SQLite keeps it: a
    /// change (a migration added, or one edited in place, which databases
    /// already migrated would never run) is a visible decision. After a
    /// deliberate change, `SUBROSA_WRITE_SNAPSHOTS=1 cargo test -p
    /// subrosa-server schema_snapshot` writes the file again; review its diff.
    #[test]
    fn schema_snapshot() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("server.db")).expect("open store");
        let conn = store.conn.lock().expect("lock");
        let mut q = conn
            .prepare("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type, name")
            .expect("query");
        let rows = q
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
            .expect("rows");
        let mut schema = format!("-- {} migrations\n", SqliteStore::schema_version());
        for row in rows {
            let (kind, name, sql) = row.expect("row");
            schema.push_str(&format!("\n-- {kind} {name}\n{sql};\n"));
        }
        crate::store::check_schema_snapshot(
            "tests/data/sqlite-schema.sql",
            include_str!("../../tests/data/sqlite-schema.sql"),
            &schema,
        );
    }

    macro_rules! conformance_tests {
        ($($name:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let (_dir, store) = open();
                    conformance::$name(store).await;
                }
            )*
        };
    }

    conformance::with_behaviours!(conformance_tests);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_all_passes() {
        let (_dir, store) = open();
        conformance::run_all(store).await;
    }

    #[test]
    fn reopening_keeps_data_and_schema_version() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("server.db");
        drop(SqliteStore::open(&path).expect("first open"));
        let store = SqliteStore::open(&path).expect("second open");
        let conn = store.conn.lock().unwrap_or_else(|p| p.into_inner());
        let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
        assert_eq!(v as usize, SqliteStore::schema_version());
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("mode");
        assert_eq!(mode, "wal");
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).expect("sync");
        assert_eq!(sync, 2, "synchronous must be FULL");
        let secure: i64 = conn.query_row("PRAGMA secure_delete", [], |r| r.get(0)).expect("secure");
        assert_eq!(secure, 1);
    }

    /// A database made by the first schema (in the wild before link slots)
    /// is migrated in place and keeps its data.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn version_one_database_is_migrated() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("server.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(MIGRATIONS[0]).expect("schema 1");
            conn.pragma_update(None, "user_version", 1).expect("version");
            conn.execute("INSERT INTO accounts (handle, identity_key, created_at) VALUES ('old-timer', x'07', 1)", [])
                .expect("account");
            conn.execute(
                "INSERT INTO devices (handle, device_id, signature_key, certificate, created_at)
                 VALUES ('old-timer', '0011223344556677', x'01', x'02', 1)",
                [],
            )
            .expect("device");
            conn.execute("INSERT INTO key_packages (device, data) VALUES (1, x'0a')", []).expect("one-time");
            conn.execute("INSERT INTO last_resort_packages (device, data) VALUES (1, x'0b')", []).expect("last");
        }
        let store = SqliteStore::open(&path).expect("migrate");
        let handle = Handle::new("old-timer").expect("handle");
        let info = store.account(&handle).await.expect("account").expect("kept");
        assert_eq!(info.devices.len(), 1);
        // Key packages stored before suites were filed are the classical
        // suite's.
        let addr = DeviceAddress { handle: handle.clone(), device: info.devices[0].device_id };
        let count = store.key_package_count(&addr).await.expect("count");
        assert_eq!(
            count.of(subrosa_proto::CLASSICAL_SUITE),
            subrosa_proto::SuiteCount { suite: 1, one_time: 1, last_resort: true }
        );
        assert_eq!(count.of(65100).one_time, 0);
        let link = LinkId([1; 6]);
        store.create_link(&link, &handle, b"req".to_vec(), 10).await.expect("links table exists");
        assert!(store.link(&link, &handle, 5).await.is_ok());
        let conn = store.conn.lock().unwrap_or_else(|p| p.into_inner());
        let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
        assert_eq!(v as usize, SqliteStore::schema_version());
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("server.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.pragma_update(None, "user_version", 999).expect("set version");
        }
        assert!(matches!(SqliteStore::open(&path), Err(StoreError::Internal(_))));
    }

    /// After delivery and maintenance, no byte of the ciphertext is left in
    /// the database files.
    /// Key-directory reads go to the read pool: they are answered while
    /// the write connection is held (a long group commit, a checkpoint).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn key_directory_reads_do_not_wait_for_the_writer() {
        use crate::store::kt::{KtSelector, KtStorage as _};
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("server.db")).expect("open");
        let (held_tx, held_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .run(move |_| {
                        let _ = held_tx.send(());
                        let _ = release_rx.recv();
                        Ok(())
                    })
                    .await
            })
        };
        held_rx.await.expect("the writer's connection is held");
        // Without the read pool these would wait for the release below,
        // which comes only after them: the guard turns that hang into a failure.
        let reads = async {
            store.kt_highest_signed().await.expect("highest");
            store.kt_signed_head(1).await.expect("head");
            store.kt_epoch_roots(0, 10).await.expect("roots");
            store.kt_records(vec![vec![1, 2, 3]]).await.expect("records");
            store.kt_values(b"alice".to_vec()).await.expect("values");
            store.kt_select(vec![b"alice".to_vec()], KtSelector::Newest).await.expect("select");
        };
        let answered = tokio::time::timeout(std::time::Duration::from_secs(30), reads).await.is_ok();
        release_tx.send(()).expect("release");
        holder.await.expect("task").expect("holder");
        assert!(answered, "a key-directory read waited for the writer");
    }

    /// How a queued write of the group tests behaves.
    #[derive(Clone, Copy)]
    enum Outcome {
        Stores,
        FailsAfterStoring,
        PanicsAfterStoring,
    }

    /// Queues writes that each add the account `handle` and then do as
    /// told, all while the write connection is held, so the writer takes
    /// them as one group; answers once that group is over.
    async fn one_group(store: &SqliteStore, writes: &[(&'static str, Outcome)]) -> Vec<Result<(), StoreError>> {
        let held = store.conn.lock().expect("lock");
        let mut answers = Vec::new();
        for &(handle, outcome) in writes {
            let rx = store.queue(move |tx: &Connection| {
                tx.execute("INSERT INTO accounts (handle, identity_key, created_at) VALUES (?1, x'00', 0)", [handle])
                    .map_err(map_err)?;
                match outcome {
                    Outcome::Stores => Ok(()),
                    Outcome::FailsAfterStoring => Err(StoreError::Internal("refused".into())),
                    Outcome::PanicsAfterStoring => panic!("a write panics"),
                }
            });
            answers.push(rx.expect("queue"));
        }
        drop(held);
        let mut out = Vec::new();
        for rx in answers {
            out.push(rx.await.expect("answered"));
        }
        out
    }

    fn stored_accounts(store: &SqliteStore) -> Vec<String> {
        let conn = store.conn.lock().expect("lock");
        let mut q = conn.prepare("SELECT handle FROM accounts ORDER BY handle").expect("query");
        let rows = q.query_map([], |r| r.get(0)).expect("rows");
        rows.map(|r| r.expect("row")).collect()
    }

    /// A group runs its writes without savepoints; a write that fails
    /// after changing rows must still undo only its own changes, whether it
    /// fails first, in the middle or last, with an error or a panic, and
    /// the writes after it in the group go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_fails_in_a_group_undoes_only_itself() {
        use Outcome::{FailsAfterStoring as Fails, PanicsAfterStoring as Panics, Stores};
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("server.db")).expect("open");
        let answers =
            one_group(&store, &[("a", Stores), ("b", Fails), ("c", Stores), ("d", Panics), ("e", Stores)]).await;
        let ok: Vec<bool> = answers.iter().map(Result::is_ok).collect();
        assert_eq!(ok, [true, false, true, false, true]);
        assert!(matches!(&answers[1], Err(StoreError::Internal(m)) if m == "refused"), "{:?}", answers[1]);
        assert_eq!(stored_accounts(&store), ["a", "c", "e"]);
        // The next group (guarded after a failure), a failure first.
        let answers = one_group(&store, &[("f", Fails), ("g", Stores)]).await;
        assert_eq!(answers.iter().map(Result::is_ok).collect::<Vec<_>>(), [false, true]);
        // And the one after it (bare again), a failure last.
        let answers = one_group(&store, &[("h", Stores), ("i", Stores), ("j", Fails)]).await;
        assert_eq!(answers.iter().map(Result::is_ok).collect::<Vec<_>>(), [true, true, false]);
        // A write that fails because of what an earlier write of its group
        // did sees that write's changes when the group runs again.
        let answers = one_group(&store, &[("k", Stores), ("k", Stores), ("l", Stores)]).await;
        assert_eq!(answers.iter().map(Result::is_ok).collect::<Vec<_>>(), [true, false, true]);
        assert_eq!(stored_accounts(&store), ["a", "c", "e", "g", "h", "i", "k", "l"]);
    }

    /// The writer remembers device rows; one that a failed write added
    /// (and found) is gone with that write, so it must not be remembered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_device_row_found_by_a_write_that_failed_is_not_remembered() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("server.db")).expect("open");
        store
            .write(|tx| {
                tx.execute("INSERT INTO accounts (handle, identity_key, created_at) VALUES ('alice', x'00', 0)", [])
                    .map_err(map_err)
            })
            .await
            .expect("account");
        let addr = DeviceAddress {
            handle: parse_handle("alice").expect("handle"),
            device: DeviceId::from_slice(&[7; 8]).expect("device id"),
        };
        for outcome in [Outcome::FailsAfterStoring, Outcome::PanicsAfterStoring] {
            let added = addr.clone();
            let failed = store
                .write(move |tx| {
                    tx.execute(
                        "INSERT INTO devices (handle, device_id, signature_key, certificate, created_at)
                         VALUES ('alice', ?1, x'', x'', 0)",
                        [added.device.to_hex()],
                    )
                    .map_err(map_err)?;
                    assert!(device_row(tx, &added)?.is_some(), "the write sees its own device");
                    match outcome {
                        Outcome::PanicsAfterStoring => panic!("a write panics"),
                        _ => Err::<(), _>(StoreError::Internal("refused".into())),
                    }
                })
                .await;
            assert!(failed.is_err());
            let looked_up = addr.clone();
            let found = store.write(move |tx| device_row(tx, &looked_up)).await.expect("look-up");
            assert_eq!(found, None, "a device row undone with its write was remembered");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delivered_ciphertext_leaves_the_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("server.db");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).expect("open"));
        let marker = b"UNIQUE-MARKER-https://example.invalid/secret-link-7f3a9c".repeat(40);
        let (alice, bob) = conformance::two_devices(&store).await;
        let req = conformance::send_request(
            conformance::random_conversation(),
            None,
            vec![(MessageKind::Application, vec![bob.clone()], marker.clone())],
        );
        store.send(&alice, &req, 1_000).await.expect("send");
        store.maintenance().await.expect("checkpoint");
        let contains = |needle: &[u8]| {
            let mut found = false;
            for suffix in ["", "-wal"] {
                let file = PathBuf::from(format!("{}{suffix}", path.display()));
                if let Ok(bytes) = std::fs::read(&file) {
                    found |= bytes.windows(needle.len()).any(|w| w == needle);
                }
            }
            found
        };
        assert!(contains(&marker[..56]), "the marker should be stored before delivery");
        let env = store.fetch_inbox(&bob, 0, 10, usize::MAX).await.expect("fetch");
        let ids: Vec<u64> = env.iter().map(|e| e.id).collect();
        assert_eq!(store.ack(&bob, &ids).await.expect("ack"), 1);
        store.maintenance().await.expect("checkpoint");
        assert!(!contains(&marker[..56]), "delivered ciphertext is still in the database files");
    }
}

//! The client's local store: one SQLCipher database encrypted at rest.
//!
//! The database key is derived from the user's passphrase with Argon2id
//! (parameters and salt in `kdf.json` beside the database, which holds no
//! secret). Everything the client keeps lives in the database: identity and
//! device keys, MLS group state and key packages (through the mls-rs storage
//! traits implemented here), contacts, conversations, history, and the outbox
//! of sends not yet acknowledged by the server.
//!
//! mls-rs writes through [`GroupStore`] and [`KeyPackageStore`], which share
//! the connection; callers wrap an MLS operation and everything derived from
//! it in [`Store::transaction`], so a crash can never keep one without the other.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use mls_rs_core::group::{EpochRecord, GroupState, GroupStateStorage};
use mls_rs_core::key_package::{KeyPackageData, KeyPackageStorage};
use mls_rs_core::mls_rs_codec::{MlsDecode, MlsEncode};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ClientError;

const DB_FILE: &str = "subrosa.db";
const KDF_FILE: &str = "kdf.json";
/// MLS epochs kept per group, for late messages of earlier epochs.
const EPOCHS_KEPT: i64 = 3;

/// Argon2id parameters, stored beside the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KdfParams {
    version: u32,
    algorithm: String,
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
    salt: String,
}

impl KdfParams {
    fn new_random() -> Self {
        let salt: [u8; 16] = rand::random();
        // OWASP's Argon2id baseline (19 MiB, 2 passes): about 30 ms here, paid
        // once per command.
        KdfParams {
            version: 1,
            algorithm: "argon2id".into(),
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
            salt: hex::encode(salt),
        }
    }

    fn derive(&self, passphrase: &str) -> Result<Zeroizing<[u8; 32]>, ClientError> {
        if self.algorithm != "argon2id" || self.version != 1 {
            return Err(ClientError::Store(format!("unsupported key derivation {}", self.algorithm)));
        }
        let salt = hex::decode(&self.salt).map_err(|_| ClientError::Store("kdf.json: bad salt".into()))?;
        let params = argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|e| ClientError::Store(format!("kdf.json: {e}")))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut key = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase.as_bytes(), &salt, key.as_mut())
            .map_err(|e| ClientError::Store(format!("key derivation: {e}")))?;
        Ok(key)
    }
}

const SCHEMA: &[&str] = &[
    // v1
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
     CREATE TABLE mls_group (id BLOB PRIMARY KEY, state BLOB NOT NULL);
     CREATE TABLE mls_epoch (group_id BLOB NOT NULL, epoch INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (group_id, epoch));
     CREATE TABLE mls_key_package (id BLOB PRIMARY KEY, data BLOB NOT NULL, last_resort INTEGER NOT NULL DEFAULT 0);
     CREATE TABLE contacts (handle TEXT PRIMARY KEY, identity_key BLOB NOT NULL, verified INTEGER NOT NULL DEFAULT 0, added_at INTEGER NOT NULL);
     CREATE TABLE conversations (id BLOB PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, peer TEXT, created_at INTEGER NOT NULL, last_activity INTEGER NOT NULL);
     CREATE INDEX conversations_peer ON conversations (peer);
     CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, conversation BLOB NOT NULL, message_id BLOB NOT NULL,
        sender TEXT NOT NULL, sender_device TEXT NOT NULL, sent_at INTEGER NOT NULL, received_at INTEGER NOT NULL,
        body TEXT NOT NULL, outgoing INTEGER NOT NULL, system INTEGER NOT NULL DEFAULT 0, UNIQUE (conversation, message_id));
     CREATE TABLE processed (digest BLOB PRIMARY KEY, at INTEGER NOT NULL);
     CREATE TABLE outbox (send_id BLOB PRIMARY KEY, request BLOB NOT NULL, created_at INTEGER NOT NULL);",
    // v2: messages stored by any command are shown by the next `receive`;
    // conversations this device was removed from stay readable but inactive.
    "ALTER TABLE messages ADD COLUMN seen INTEGER NOT NULL DEFAULT 1;
     CREATE INDEX messages_unseen ON messages (seen) WHERE seen = 0;
     ALTER TABLE conversations ADD COLUMN active INTEGER NOT NULL DEFAULT 1;",
    // v3: a verified contact whose identity key changed blocks sending until
    // the user verifies again or accepts the change.
    "ALTER TABLE contacts ADD COLUMN key_change_pending INTEGER NOT NULL DEFAULT 0;",
    // v4: key transparency (the directory roots this device verified form
    // one append-only chain; heads other members reported wait here to be
    // checked against it), per-conversation sequence numbers (a dropped
    // message shows as a gap), and alerts for the user.
    "CREATE TABLE kt_roots (epoch INTEGER PRIMARY KEY, root BLOB NOT NULL);
     CREATE TABLE kt_gossip (epoch INTEGER NOT NULL, root BLOB NOT NULL, source TEXT NOT NULL, PRIMARY KEY (epoch, root, source));
     CREATE TABLE seq_out (conversation BLOB PRIMARY KEY, last INTEGER NOT NULL);
     CREATE TABLE seq_in (conversation BLOB NOT NULL, device TEXT NOT NULL, last INTEGER NOT NULL, PRIMARY KEY (conversation, device));
     CREATE TABLE alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, text TEXT NOT NULL UNIQUE, shown INTEGER NOT NULL DEFAULT 0);",
    // v5: a staged commit waiting for the server's answer, stored with its
    // exact request (and send id) before it is posted, so a lost answer is
    // completed by re-posting the same bytes; `commit_digest` recognises the
    // echo of it, `meta` says what to re-stage when another commit won.
    "CREATE TABLE pending_commits (conversation BLOB PRIMARY KEY, send_id BLOB NOT NULL, request BLOB NOT NULL,
        commit_digest BLOB NOT NULL, meta BLOB NOT NULL, created_at INTEGER NOT NULL);",
];

/// A message as stored in history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredMessage {
    /// End-to-end message id (hex).
    pub id: String,
    /// Conversation id (hex).
    pub conversation: String,
    /// The conversation as the user names it: the peer's handle or the group name.
    pub target: String,
    /// True in a group conversation.
    pub group: bool,
    /// Sender handle.
    pub from: String,
    /// Sender device id (hex).
    pub device: String,
    /// Sender's clock, ms since the Unix epoch.
    pub sent_at: u64,
    /// When this device stored it, ms since the Unix epoch.
    pub received_at: u64,
    /// The text.
    pub text: String,
    /// Sent by this account.
    pub outgoing: bool,
    /// A system line (membership, key changes), not a user's message.
    pub system: bool,
}

/// A contact: a handle whose identity key this device has seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Contact {
    /// Handle.
    pub handle: String,
    /// Identity key (hex).
    pub identity_key: String,
    /// Verified by the user (safety number compared).
    pub verified: bool,
}

/// A conversation row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRow {
    /// Id.
    pub id: subrosa_proto::ConversationId,
    /// "direct" or "group".
    pub kind: String,
    /// Group name (empty for direct).
    pub name: String,
    /// Peer handle for direct conversations.
    pub peer: Option<String>,
    /// False once this device was removed from it or left.
    pub active: bool,
}

impl ConversationRow {
    /// How the user names it: the peer's handle or the group name.
    pub fn target(&self) -> String {
        self.peer.clone().unwrap_or_else(|| self.name.clone())
    }
}

const MESSAGE_COLUMNS: &str =
    "SELECT seq, message_id, sender, sender_device, sent_at, received_at, body, outgoing, system FROM messages";

fn message_from_row(r: &rusqlite::Row<'_>, c: &ConversationRow) -> rusqlite::Result<(i64, StoredMessage)> {
    Ok((
        r.get(0)?,
        StoredMessage {
            id: hex::encode(r.get::<_, Vec<u8>>(1)?),
            conversation: c.id.to_hex(),
            target: c.target(),
            group: c.kind == "group",
            from: r.get(2)?,
            device: r.get(3)?,
            sent_at: r.get::<_, i64>(4)? as u64,
            received_at: r.get::<_, i64>(5)? as u64,
            text: r.get(6)?,
            outgoing: r.get(7)?,
            system: r.get(8)?,
        },
    ))
}

/// A queued send: its idempotency key and the request body.
pub type QueuedSend = (Vec<u8>, Vec<u8>);

/// A staged commit stored before it is posted.
#[derive(Clone)]
pub struct PendingCommit {
    /// The conversation.
    pub conversation: subrosa_proto::ConversationId,
    /// The send id of `request` (the server's idempotency key).
    pub send_id: [u8; 16],
    /// The exact request bytes, re-posted as they are.
    pub request: Vec<u8>,
    /// SHA-256 of the commit message (recognises its echo).
    pub commit_digest: Vec<u8>,
    /// What the commit does, encoded by the client (to re-stage it).
    pub meta: Vec<u8>,
}

impl std::fmt::Debug for PendingCommit {
    /// The conversation and send id; never the meta (it may hold a
    /// message's text).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingCommit")
            .field("conversation", &self.conversation)
            .field("send_id", &hex::encode(self.send_id))
            .finish_non_exhaustive()
    }
}

/// The encrypted local store. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish_non_exhaustive()
    }
}

fn sql(e: rusqlite::Error) -> ClientError {
    ClientError::Store(e.to_string())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Store {
    /// True when `home` holds a store.
    pub fn exists(home: &Path) -> bool {
        home.join(DB_FILE).exists()
    }

    /// Creates a new store in `home` (which must not hold one).
    ///
    /// # Errors
    /// [`ClientError::AlreadyRegistered`] or I/O and database errors.
    pub fn create(home: &Path, passphrase: &str) -> Result<Self, ClientError> {
        if Self::exists(home) {
            return Err(ClientError::AlreadyRegistered(home.display().to_string()));
        }
        std::fs::create_dir_all(home).map_err(|e| ClientError::Io(format!("{}: {e}", home.display())))?;
        restrict_permissions(home);
        let kdf = KdfParams::new_random();
        let json = serde_json::to_vec_pretty(&kdf).map_err(|e| ClientError::Store(e.to_string()))?;
        std::fs::write(home.join(KDF_FILE), json).map_err(|e| ClientError::Io(e.to_string()))?;
        let key = kdf.derive(passphrase)?;
        let store = Self::open_with_key(home, &key)?;
        store.migrate()?;
        Ok(store)
    }

    /// Removes a store that was being created when its command failed, and
    /// `home` itself when the command created it: no half-made account stays.
    pub fn remove_unfinished(home: &Path, home_existed: bool) {
        for f in [DB_FILE, "subrosa.db-wal", "subrosa.db-shm", KDF_FILE] {
            let _ = std::fs::remove_file(home.join(f));
        }
        if !home_existed {
            let _ = std::fs::remove_dir(home);
        }
    }

    /// Opens the store in `home`.
    ///
    /// # Errors
    /// [`ClientError::NotRegistered`] when there is none,
    /// [`ClientError::WrongPassphrase`] when the passphrase does not open it.
    pub fn open(home: &Path, passphrase: &str) -> Result<Self, ClientError> {
        if !Self::exists(home) {
            return Err(ClientError::NotRegistered(home.display().to_string()));
        }
        let raw = std::fs::read(home.join(KDF_FILE)).map_err(|e| ClientError::Io(format!("kdf.json: {e}")))?;
        let kdf: KdfParams =
            serde_json::from_slice(&raw).map_err(|_| ClientError::Store("kdf.json is damaged".into()))?;
        let key = kdf.derive(passphrase)?;
        let store = Self::open_with_key(home, &key)?;
        store.migrate()?;
        Ok(store)
    }

    fn open_with_key(home: &Path, key: &[u8; 32]) -> Result<Self, ClientError> {
        let path = home.join(DB_FILE);
        let conn = Connection::open(&path).map_err(sql)?;
        // SQLCipher logs decryption failures to stderr by itself; the user
        // gets our one clear line instead.
        let pragma = Zeroizing::new(format!("PRAGMA key = \"x'{}'\";", hex::encode(key)));
        conn.execute_batch(&pragma).map_err(sql)?;
        let _ = conn.query_row("PRAGMA cipher_log_level = NONE", [], |_| Ok(()));
        // The first read proves the key: SQLCipher cannot tell a wrong key
        // from a damaged file, and either way nothing is changed.
        if conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)).is_err() {
            return Err(ClientError::WrongPassphrase);
        }
        conn.busy_timeout(std::time::Duration::from_secs(15)).map_err(sql)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA secure_delete = ON; PRAGMA foreign_keys = ON;")
            .map_err(sql)?;
        restrict_permissions(&path);
        Ok(Store { conn: Arc::new(Mutex::new(conn)), path })
    }

    fn migrate(&self) -> Result<(), ClientError> {
        let conn = self.lock();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql)?;
        for (i, step) in SCHEMA.iter().enumerate().skip(version.max(0) as usize) {
            conn.execute_batch(&format!("BEGIN; {step}; PRAGMA user_version = {}; COMMIT;", i + 1)).map_err(sql)?;
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A poisoned lock means a panic elsewhere; the connection itself is fine.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in one write transaction: all of it is stored, or none.
    ///
    /// # Errors
    /// Whatever `f` returns, or a database error.
    pub fn transaction<T>(&self, f: impl FnOnce() -> Result<T, ClientError>) -> Result<T, ClientError> {
        self.lock().execute_batch("BEGIN IMMEDIATE").map_err(sql)?;
        match f() {
            Ok(v) => {
                self.lock().execute_batch("COMMIT").map_err(sql)?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.lock().execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Reads a meta value.
    ///
    /// # Errors
    /// Database errors.
    pub fn meta(&self, key: &str) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError> {
        self.lock()
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get::<_, Vec<u8>>(0))
            .optional()
            .map(|v| v.map(Zeroizing::new))
            .map_err(sql)
    }

    /// Writes a meta value.
    ///
    /// # Errors
    /// Database errors.
    pub fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map(|_| ())
            .map_err(sql)
    }

    /// The directory root this device verified for `epoch`.
    ///
    /// # Errors
    /// Database errors.
    pub fn kt_root(&self, epoch: u64) -> Result<Option<Vec<u8>>, ClientError> {
        self.lock()
            .query_row("SELECT root FROM kt_roots WHERE epoch = ?1", [epoch as i64], |r| r.get(0))
            .optional()
            .map_err(sql)
    }

    /// The first and last epochs of the verified chain.
    ///
    /// # Errors
    /// Database errors.
    pub fn kt_range(&self) -> Result<Option<(u64, u64)>, ClientError> {
        self.lock()
            .query_row("SELECT MIN(epoch), MAX(epoch) FROM kt_roots", [], |r| {
                Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?))
            })
            .map(|o| o.map(|(a, b)| (a as u64, b as u64)))
            .map_err(sql)
    }

    /// Records verified roots for epochs `from`, `from + 1`, ….
    ///
    /// # Errors
    /// Database errors.
    pub fn put_kt_roots(&self, from: u64, roots: &[[u8; 32]]) -> Result<(), ClientError> {
        let conn = self.lock();
        for (i, root) in roots.iter().enumerate() {
            conn.execute(
                "INSERT OR IGNORE INTO kt_roots (epoch, root) VALUES (?1, ?2)",
                params![(from + i as u64) as i64, &root[..]],
            )
            .map_err(sql)?;
        }
        Ok(())
    }

    /// Keeps a directory head another member reported, to check later.
    ///
    /// # Errors
    /// Database errors.
    pub fn push_kt_gossip(&self, epoch: u64, root: &[u8; 32], source: &str) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT OR IGNORE INTO kt_gossip (epoch, root, source) VALUES (?1, ?2, ?3)",
                params![epoch as i64, &root[..], source],
            )
            .map(|_| ())
            .map_err(sql)
    }

    /// The reported heads not checked yet.
    ///
    /// # Errors
    /// Database errors.
    pub fn kt_gossip(&self) -> Result<Vec<(u64, [u8; 32], String)>, ClientError> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT epoch, root, source FROM kt_gossip ORDER BY epoch").map_err(sql)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?, r.get::<_, String>(2)?)))
            .map_err(sql)?;
        let mut out = Vec::new();
        for row in rows {
            let (epoch, root, source) = row.map_err(sql)?;
            if let Ok(root) = <[u8; 32]>::try_from(root.as_slice()) {
                out.push((epoch, root, source));
            }
        }
        Ok(out)
    }

    /// Forgets a checked head.
    ///
    /// # Errors
    /// Database errors.
    pub fn drop_kt_gossip(&self, epoch: u64, root: &[u8; 32], source: &str) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "DELETE FROM kt_gossip WHERE epoch = ?1 AND root = ?2 AND source = ?3",
                params![epoch as i64, &root[..], source],
            )
            .map(|_| ())
            .map_err(sql)
    }

    /// The next sequence number this device sends with in a conversation.
    ///
    /// # Errors
    /// Database errors.
    pub fn next_seq(&self, conversation: &subrosa_proto::ConversationId) -> Result<u64, ClientError> {
        self.lock()
            .query_row(
                "INSERT INTO seq_out (conversation, last) VALUES (?1, 1)
                 ON CONFLICT (conversation) DO UPDATE SET last = last + 1 RETURNING last",
                [&conversation.0[..]],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(sql)
    }

    /// Records that `seq` arrived from `device` in a conversation. Returns
    /// how many numbers it skipped (a gap), or `None` when it is older than
    /// the newest seen (it arrived late, out of order).
    ///
    /// # Errors
    /// Database errors.
    pub fn arrived_seq(
        &self,
        conversation: &subrosa_proto::ConversationId,
        device: &str,
        seq: u64,
    ) -> Result<Option<u64>, ClientError> {
        let conn = self.lock();
        let last: u64 = conn
            .query_row(
                "SELECT last FROM seq_in WHERE conversation = ?1 AND device = ?2",
                params![&conversation.0[..], device],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map_err(sql)?
            .map_or(0, |n| n as u64);
        if seq <= last {
            return Ok(None);
        }
        conn.execute(
            "INSERT INTO seq_in (conversation, device, last) VALUES (?1, ?2, ?3)
             ON CONFLICT (conversation, device) DO UPDATE SET last = excluded.last",
            params![&conversation.0[..], device, seq as i64],
        )
        .map_err(sql)?;
        Ok(Some(seq - last - 1))
    }

    /// Records an alert for the user (once per distinct text).
    ///
    /// # Errors
    /// Database errors.
    pub fn add_alert(&self, text: &str) -> Result<(), ClientError> {
        self.lock()
            .execute("INSERT OR IGNORE INTO alerts (at, text) VALUES (?1, ?2)", params![now_ms() as i64, text])
            .map(|_| ())
            .map_err(sql)
    }

    /// Alerts not shown yet, oldest first; marks them shown.
    ///
    /// # Errors
    /// Database errors.
    pub fn take_alerts(&self) -> Result<Vec<String>, ClientError> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT text FROM alerts WHERE shown = 0 ORDER BY id").map_err(sql)?;
        let texts =
            stmt.query_map([], |r| r.get::<_, String>(0)).map_err(sql)?.collect::<Result<Vec<_>, _>>().map_err(sql)?;
        conn.execute("UPDATE alerts SET shown = 1 WHERE shown = 0", []).map_err(sql)?;
        Ok(texts)
    }

    /// The pinned identity key of a handle, if any.
    ///
    /// # Errors
    /// Database errors.
    pub fn contact_key(&self, handle: &str) -> Result<Option<Vec<u8>>, ClientError> {
        self.lock()
            .query_row("SELECT identity_key FROM contacts WHERE handle = ?1", [handle], |r| r.get(0))
            .optional()
            .map_err(sql)
    }

    /// Pins a contact's identity key on first use.
    ///
    /// # Errors
    /// Database errors.
    pub fn pin_contact(&self, handle: &str, identity_key: &[u8]) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO contacts (handle, identity_key, added_at) VALUES (?1, ?2, ?3) ON CONFLICT (handle) DO NOTHING",
                params![handle, identity_key, now_ms() as i64],
            )
            .map(|_| ())
            .map_err(sql)
    }

    /// Marks a contact verified (its pinned identity key compared in person).
    ///
    /// # Errors
    /// Database errors.
    pub fn set_verified(&self, handle: &str, verified: bool) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "UPDATE contacts SET verified = ?2, key_change_pending = 0 WHERE handle = ?1",
                params![handle, verified],
            )
            .map(|_| ())
            .map_err(sql)
    }

    /// Pins a contact's new identity key: unverified from now on. Returns
    /// whether it had been verified (then sending waits for the user).
    ///
    /// # Errors
    /// Database errors.
    pub fn change_contact_key(&self, handle: &str, identity_key: &[u8]) -> Result<bool, ClientError> {
        let conn = self.lock();
        let was_verified: bool = conn
            .query_row("SELECT verified FROM contacts WHERE handle = ?1", [handle], |r| r.get(0))
            .optional()
            .map_err(sql)?
            .unwrap_or(false);
        conn.execute(
            "UPDATE contacts SET identity_key = ?2, verified = 0, key_change_pending = ?3 WHERE handle = ?1",
            params![handle, identity_key, was_verified],
        )
        .map_err(sql)?;
        Ok(was_verified)
    }

    /// Whether a verified contact's key changed and the user has not yet
    /// verified again or accepted it.
    ///
    /// # Errors
    /// Database errors.
    pub fn key_change_pending(&self, handle: &str) -> Result<bool, ClientError> {
        self.lock()
            .query_row("SELECT key_change_pending FROM contacts WHERE handle = ?1", [handle], |r| r.get(0))
            .optional()
            .map(|o| o.unwrap_or(false))
            .map_err(sql)
    }

    /// The user accepted (or verified) a contact's changed key.
    ///
    /// # Errors
    /// Database errors.
    pub fn clear_key_change(&self, handle: &str) -> Result<(), ClientError> {
        self.lock()
            .execute("UPDATE contacts SET key_change_pending = 0 WHERE handle = ?1", [handle])
            .map(|_| ())
            .map_err(sql)
    }

    /// All contacts by handle.
    ///
    /// # Errors
    /// Database errors.
    pub fn contacts(&self) -> Result<Vec<Contact>, ClientError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare("SELECT handle, identity_key, verified FROM contacts ORDER BY handle").map_err(sql)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Contact {
                    handle: r.get(0)?,
                    identity_key: hex::encode(r.get::<_, Vec<u8>>(1)?),
                    verified: r.get::<_, i64>(2)? != 0,
                })
            })
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// Records a conversation.
    ///
    /// # Errors
    /// Database errors.
    pub fn add_conversation(
        &self,
        id: &subrosa_proto::ConversationId,
        kind: &str,
        name: &str,
        peer: Option<&str>,
    ) -> Result<(), ClientError> {
        let now = now_ms() as i64;
        self.lock()
            .execute(
                "INSERT INTO conversations (id, kind, name, peer, created_at, last_activity) VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (id) DO NOTHING",
                params![id.as_bytes().as_slice(), kind, name, peer, now],
            )
            .map(|_| ())
            .map_err(sql)
    }

    /// Forgets a conversation and its MLS state (a creation the server refused).
    ///
    /// # Errors
    /// Database errors.
    pub fn forget_conversation(&self, id: &subrosa_proto::ConversationId) -> Result<(), ClientError> {
        let conn = self.lock();
        let id = id.as_bytes().as_slice();
        for q in [
            "DELETE FROM conversations WHERE id = ?1",
            "DELETE FROM mls_group WHERE id = ?1",
            "DELETE FROM mls_epoch WHERE group_id = ?1",
        ] {
            conn.execute(q, [id]).map_err(sql)?;
        }
        Ok(())
    }

    /// The most recently active direct conversation with `peer`.
    ///
    /// # Errors
    /// Database errors.
    pub fn direct_conversation(&self, peer: &str) -> Result<Option<subrosa_proto::ConversationId>, ClientError> {
        let id: Option<Vec<u8>> = self
            .lock()
            .query_row(
                "SELECT id FROM conversations WHERE kind = 'direct' AND peer = ?1 AND active = 1
                 ORDER BY last_activity DESC, created_at DESC LIMIT 1",
                [peer],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)?;
        id.map(|b| subrosa_proto::ConversationId::from_slice(&b).map_err(|e| ClientError::Store(e.to_string())))
            .transpose()
    }

    /// A conversation by id.
    ///
    /// # Errors
    /// Database errors.
    pub fn conversation(&self, id: &subrosa_proto::ConversationId) -> Result<Option<ConversationRow>, ClientError> {
        self.lock()
            .query_row(
                "SELECT kind, name, peer, active FROM conversations WHERE id = ?1",
                [id.as_bytes().as_slice()],
                |r| {
                    Ok(ConversationRow {
                        id: *id,
                        kind: r.get(0)?,
                        name: r.get(1)?,
                        peer: r.get(2)?,
                        active: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(sql)
    }

    /// Stores a message unless one with the same id is already in the
    /// conversation. Returns whether it was new.
    ///
    /// # Errors
    /// Database errors.
    pub fn insert_message(
        &self,
        m: &StoredMessage,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        seen: bool,
    ) -> Result<bool, ClientError> {
        let conn = self.lock();
        let n = conn
            .execute(
                "INSERT INTO messages (conversation, message_id, sender, sender_device, sent_at, received_at, body, outgoing, system, seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (conversation, message_id) DO NOTHING",
                params![
                    conversation.as_bytes().as_slice(),
                    message_id,
                    m.from,
                    m.device,
                    m.sent_at as i64,
                    m.received_at as i64,
                    m.text,
                    m.outgoing,
                    m.system,
                    seen
                ],
            )
            .map_err(sql)?;
        if n > 0 {
            conn.execute(
                "UPDATE conversations SET last_activity = ?2 WHERE id = ?1",
                params![conversation.as_bytes().as_slice(), m.received_at as i64],
            )
            .map_err(sql)?;
        }
        Ok(n > 0)
    }

    /// Removes a message from history (a send that never left, moved elsewhere).
    ///
    /// # Errors
    /// Database errors.
    pub fn delete_message(
        &self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
    ) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "DELETE FROM messages WHERE conversation = ?1 AND message_id = ?2",
                params![conversation.as_bytes().as_slice(), message_id],
            )
            .map(|_| ())
            .map_err(sql)
    }

    /// History of the given conversations, oldest first.
    ///
    /// # Errors
    /// Database errors.
    pub fn history(&self, conversations: &[ConversationRow]) -> Result<Vec<StoredMessage>, ClientError> {
        let conn = self.lock();
        let mut out = Vec::new();
        let mut stmt = conn.prepare(&format!("{MESSAGE_COLUMNS} WHERE conversation = ?1 ORDER BY seq")).map_err(sql)?;
        for c in conversations {
            let rows = stmt.query_map([c.id.as_bytes().as_slice()], |r| message_from_row(r, c)).map_err(sql)?;
            for row in rows {
                out.push(row.map_err(sql)?);
            }
        }
        out.sort_by_key(|(seq, _)| *seq);
        Ok(out.into_iter().map(|(_, m)| m).collect())
    }

    fn conversations_where(
        &self,
        filter: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<ConversationRow>, ClientError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT id, kind, name, peer, active FROM conversations WHERE {filter} ORDER BY created_at, rowid"
            ))
            .map_err(sql)?;
        let rows = stmt
            .query_map(args, |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
            .map_err(sql)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, kind, name, peer, active) = row.map_err(sql)?;
            let id = subrosa_proto::ConversationId::from_slice(&id).map_err(|e| ClientError::Store(e.to_string()))?;
            out.push(ConversationRow { id, kind, name, peer, active });
        }
        Ok(out)
    }

    /// Direct conversations with a peer.
    ///
    /// # Errors
    /// Database errors.
    pub fn conversations_with(&self, peer: &str) -> Result<Vec<ConversationRow>, ClientError> {
        self.conversations_where("kind = 'direct' AND peer = ?1", &[&peer])
    }

    /// Groups with this name (active ones first).
    ///
    /// # Errors
    /// Database errors.
    pub fn groups_named(&self, name: &str) -> Result<Vec<ConversationRow>, ClientError> {
        let mut v = self.conversations_where("kind = 'group' AND name = ?1", &[&name])?;
        v.sort_by_key(|c| !c.active);
        Ok(v)
    }

    /// Every group.
    ///
    /// # Errors
    /// Database errors.
    pub fn group_rows(&self) -> Result<Vec<ConversationRow>, ClientError> {
        self.conversations_where("kind = 'group'", &[])
    }

    /// Every active conversation.
    ///
    /// # Errors
    /// Database errors.
    pub fn active_conversations(&self) -> Result<Vec<ConversationRow>, ClientError> {
        self.conversations_where("active = 1", &[])
    }

    /// Renames a group locally (after a rename commit).
    ///
    /// # Errors
    /// Database errors.
    pub fn set_conversation_name(&self, id: &subrosa_proto::ConversationId, name: &str) -> Result<(), ClientError> {
        self.lock()
            .execute("UPDATE conversations SET name = ?2 WHERE id = ?1", params![id.as_bytes().as_slice(), name])
            .map(|_| ())
            .map_err(sql)
    }

    /// Marks a conversation left: history stays, MLS state goes.
    ///
    /// # Errors
    /// Database errors.
    pub fn deactivate_conversation(&self, id: &subrosa_proto::ConversationId) -> Result<(), ClientError> {
        let conn = self.lock();
        let id = id.as_bytes().as_slice();
        conn.execute("UPDATE conversations SET active = 0 WHERE id = ?1", [id]).map_err(sql)?;
        conn.execute("DELETE FROM mls_group WHERE id = ?1", [id]).map_err(sql)?;
        conn.execute("DELETE FROM mls_epoch WHERE group_id = ?1", [id]).map_err(sql)?;
        Ok(())
    }

    /// Messages stored but not yet shown by `receive`, oldest first; marks them shown.
    ///
    /// # Errors
    /// Database errors.
    pub fn take_unseen(&self) -> Result<Vec<StoredMessage>, ClientError> {
        let rows: Vec<(i64, Vec<u8>)> = {
            let conn = self.lock();
            let mut stmt =
                conn.prepare("SELECT seq, conversation FROM messages WHERE seen = 0 ORDER BY seq").map_err(sql)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(sql)?;
            rows.collect::<Result<_, _>>().map_err(sql)?
        };
        let mut out = Vec::new();
        for (seq, conv) in rows {
            let id = subrosa_proto::ConversationId::from_slice(&conv).map_err(|e| ClientError::Store(e.to_string()))?;
            let row = self
                .conversation(&id)?
                .ok_or_else(|| ClientError::Store("message of an unknown conversation".into()))?;
            let conn = self.lock();
            let m = conn
                .query_row(&format!("{MESSAGE_COLUMNS} WHERE seq = ?1"), [seq], |r| message_from_row(r, &row))
                .map_err(sql)?;
            conn.execute("UPDATE messages SET seen = 1 WHERE seq = ?1", [seq]).map_err(sql)?;
            out.push(m.1);
        }
        Ok(out)
    }

    /// Whether a delivered ciphertext (by digest) was already processed.
    ///
    /// # Errors
    /// Database errors.
    pub fn is_processed(&self, digest: &[u8]) -> Result<bool, ClientError> {
        self.lock()
            .query_row("SELECT 1 FROM processed WHERE digest = ?1", [digest], |_| Ok(()))
            .optional()
            .map(|o| o.is_some())
            .map_err(sql)
    }

    /// Records a processed ciphertext digest.
    ///
    /// # Errors
    /// Database errors.
    pub fn mark_processed(&self, digest: &[u8]) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO processed (digest, at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![digest, now_ms() as i64],
            )
            .map(|_| ())
            .map_err(sql)
    }

    /// Queues a send request until the server acknowledges it.
    ///
    /// # Errors
    /// Database errors.
    pub fn push_outbox(&self, send_id: &[u8], request: &[u8]) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO outbox (send_id, request, created_at) VALUES (?1, ?2, ?3)",
                params![send_id, request, now_ms() as i64],
            )
            .map(|_| ())
            .map_err(sql)
    }

    /// Queued sends, oldest first.
    ///
    /// # Errors
    /// Database errors.
    pub fn outbox(&self) -> Result<Vec<QueuedSend>, ClientError> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT send_id, request FROM outbox ORDER BY created_at, rowid").map_err(sql)?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// Removes an acknowledged send.
    ///
    /// # Errors
    /// Database errors.
    pub fn pop_outbox(&self, send_id: &[u8]) -> Result<(), ClientError> {
        self.lock().execute("DELETE FROM outbox WHERE send_id = ?1", [send_id]).map(|_| ()).map_err(sql)
    }

    /// Stores a staged commit's request before it is posted (one per
    /// conversation: mls-rs stages one commit at a time).
    ///
    /// # Errors
    /// Database errors.
    pub fn put_pending_commit(&self, p: &PendingCommit) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO pending_commits (conversation, send_id, request, commit_digest, meta, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    p.conversation.as_bytes().as_slice(),
                    &p.send_id[..],
                    p.request,
                    p.commit_digest,
                    p.meta,
                    now_ms() as i64
                ],
            )
            .map(|_| ())
            .map_err(sql)
    }

    /// The staged commit waiting in a conversation, if any.
    ///
    /// # Errors
    /// Database errors.
    pub fn pending_commit(
        &self,
        conversation: &subrosa_proto::ConversationId,
    ) -> Result<Option<PendingCommit>, ClientError> {
        self.lock()
            .query_row(
                "SELECT send_id, request, commit_digest, meta FROM pending_commits WHERE conversation = ?1",
                [conversation.as_bytes().as_slice()],
                |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                },
            )
            .optional()
            .map_err(sql)?
            .map(|(send_id, request, commit_digest, meta)| {
                Ok(PendingCommit {
                    conversation: *conversation,
                    send_id: send_id
                        .try_into()
                        .map_err(|_| ClientError::Store("pending commit: bad send id".into()))?,
                    request,
                    commit_digest,
                    meta,
                })
            })
            .transpose()
    }

    /// Conversations with a staged commit waiting, oldest first.
    ///
    /// # Errors
    /// Database errors.
    pub fn pending_commit_conversations(&self) -> Result<Vec<subrosa_proto::ConversationId>, ClientError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare("SELECT conversation FROM pending_commits ORDER BY created_at, rowid").map_err(sql)?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).map_err(sql)?;
        let ids: Vec<Vec<u8>> = rows.collect::<Result<_, _>>().map_err(sql)?;
        ids.iter()
            .map(|b| subrosa_proto::ConversationId::from_slice(b).map_err(|e| ClientError::Store(e.to_string())))
            .collect()
    }

    /// Forgets a conversation's staged commit (applied or discarded).
    ///
    /// # Errors
    /// Database errors.
    pub fn delete_pending_commit(&self, conversation: &subrosa_proto::ConversationId) -> Result<(), ClientError> {
        self.lock()
            .execute("DELETE FROM pending_commits WHERE conversation = ?1", [conversation.as_bytes().as_slice()])
            .map(|_| ())
            .map_err(sql)
    }

    /// Marks the next key package stored as the last-resort one (kept after use).
    pub fn key_packages(&self) -> KeyPackageStore {
        KeyPackageStore { store: self.clone() }
    }

    /// Marks the key package generated last as the last-resort one: kept
    /// after use, since the server may hand it out more than once.
    ///
    /// # Errors
    /// Database errors.
    pub fn mark_newest_key_package_last_resort(&self) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "UPDATE mls_key_package SET last_resort = 1 WHERE rowid = (SELECT max(rowid) FROM mls_key_package)",
                [],
            )
            .map(|_| ())
            .map_err(sql)
    }

    /// The MLS group state storage over this store.
    pub fn groups(&self) -> GroupStore {
        GroupStore { store: self.clone() }
    }
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if path.is_dir() { 0o700 } else { 0o600 };
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}
#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) {}

/// Errors of the mls-rs storage adapters.
#[derive(Debug, thiserror::Error)]
#[error("local store: {0}")]
pub struct StorageError(String);

impl mls_rs_core::error::IntoAnyError for StorageError {
    fn into_dyn_error(self) -> Result<Box<dyn std::error::Error + Send + Sync>, Self> {
        Ok(Box::new(self))
    }
}

fn serr(e: impl std::fmt::Display) -> StorageError {
    StorageError(e.to_string())
}

/// mls-rs group state storage over the local store.
#[derive(Clone, Debug)]
pub struct GroupStore {
    store: Store,
}

impl GroupStateStorage for GroupStore {
    type Error = StorageError;

    fn state(&self, group_id: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, Self::Error> {
        self.store
            .lock()
            .query_row("SELECT state FROM mls_group WHERE id = ?1", [group_id], |r| r.get::<_, Vec<u8>>(0))
            .optional()
            .map(|o| o.map(Zeroizing::new))
            .map_err(serr)
    }

    fn epoch(&self, group_id: &[u8], epoch_id: u64) -> Result<Option<Zeroizing<Vec<u8>>>, Self::Error> {
        self.store
            .lock()
            .query_row(
                "SELECT data FROM mls_epoch WHERE group_id = ?1 AND epoch = ?2",
                params![group_id, epoch_id as i64],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()
            .map(|o| o.map(Zeroizing::new))
            .map_err(serr)
    }

    fn write(
        &mut self,
        state: GroupState,
        inserts: Vec<EpochRecord>,
        updates: Vec<EpochRecord>,
    ) -> Result<(), Self::Error> {
        let conn = self.store.lock();
        conn.execute(
            "INSERT INTO mls_group (id, state) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET state = excluded.state",
            params![state.id, state.data.as_slice()],
        )
        .map_err(serr)?;
        for e in inserts.iter().chain(updates.iter()) {
            conn.execute(
                "INSERT INTO mls_epoch (group_id, epoch, data) VALUES (?1, ?2, ?3)
                 ON CONFLICT (group_id, epoch) DO UPDATE SET data = excluded.data",
                params![state.id, e.id as i64, e.data.as_slice()],
            )
            .map_err(serr)?;
        }
        // Old epochs' secrets are deleted: forward secrecy across epochs.
        conn.execute(
            "DELETE FROM mls_epoch WHERE group_id = ?1 AND epoch <= (SELECT max(epoch) FROM mls_epoch WHERE group_id = ?1) - ?2",
            params![state.id, EPOCHS_KEPT],
        )
        .map_err(serr)?;
        Ok(())
    }

    fn max_epoch_id(&self, group_id: &[u8]) -> Result<Option<u64>, Self::Error> {
        self.store
            .lock()
            .query_row("SELECT max(epoch) FROM mls_epoch WHERE group_id = ?1", [group_id], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map(|o| o.map(|v| v as u64))
            .map_err(serr)
    }
}

/// mls-rs key package storage over the local store. One-time packages are
/// deleted when used; the last-resort package is kept.
#[derive(Clone, Debug)]
pub struct KeyPackageStore {
    store: Store,
}

impl KeyPackageStorage for KeyPackageStore {
    type Error = StorageError;

    fn delete(&mut self, id: &[u8]) -> Result<(), Self::Error> {
        self.store
            .lock()
            .execute("DELETE FROM mls_key_package WHERE id = ?1 AND last_resort = 0", [id])
            .map(|_| ())
            .map_err(serr)
    }

    fn insert(&mut self, id: Vec<u8>, pkg: KeyPackageData) -> Result<(), Self::Error> {
        let data = Zeroizing::new(pkg.mls_encode_to_vec().map_err(serr)?);
        self.store
            .lock()
            .execute(
                "INSERT INTO mls_key_package (id, data) VALUES (?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET data = excluded.data",
                params![id, data.as_slice()],
            )
            .map(|_| ())
            .map_err(serr)
    }

    fn get(&self, id: &[u8]) -> Result<Option<KeyPackageData>, Self::Error> {
        let data: Option<Vec<u8>> = self
            .store
            .lock()
            .query_row("SELECT data FROM mls_key_package WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .map_err(serr)?;
        match data {
            None => Ok(None),
            Some(d) => {
                let d = Zeroizing::new(d);
                KeyPackageData::mls_decode(&mut d.as_slice()).map(Some).map_err(serr)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use subrosa_core::{DeviceIdentity, Engine};

    fn count(store: &Store) -> i64 {
        store.lock().query_row("SELECT count(*) FROM mls_key_package", [], |r| r.get(0)).unwrap_or(-1)
    }

    #[test]
    fn the_last_resort_key_package_survives_use_and_one_time_ones_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::create(&dir.path().join("home"), "pw").expect("store");
        let crypto = subrosa_core::default_crypto();
        let id = DeviceIdentity::generate(&crypto, "alice".parse().expect("handle"), 0).expect("identity");
        let engine = Engine::new(crypto, id, store.groups(), store.key_packages());
        engine.generate_key_package().expect("one-time");
        engine.generate_key_package().expect("last resort");
        store.mark_newest_key_package_last_resort().expect("mark");
        let ids: Vec<(Vec<u8>, bool)> = {
            let conn = store.lock();
            let mut stmt = conn.prepare("SELECT id, last_resort FROM mls_key_package ORDER BY rowid").expect("prepare");
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).expect("query");
            rows.collect::<Result<_, _>>().expect("rows")
        };
        assert_eq!(ids.iter().map(|(_, l)| *l).collect::<Vec<_>>(), [false, true]);
        // mls-rs deletes a key package once a Welcome used it.
        let mut kps = store.key_packages();
        for (id, _) in &ids {
            KeyPackageStorage::delete(&mut kps, id).expect("delete");
        }
        assert_eq!(count(&store), 1);
        assert!(KeyPackageStorage::get(&kps, &ids[1].0).expect("get").is_some());
    }

    #[test]
    fn a_wrong_passphrase_opens_nothing_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        Store::create(&home, "right").expect("store").set_meta("k", b"v").expect("meta");
        assert!(matches!(Store::open(&home, "wrong"), Err(ClientError::WrongPassphrase)));
        let store = Store::open(&home, "right").expect("opens");
        assert_eq!(store.meta("k").expect("meta").map(|v| v.to_vec()), Some(b"v".to_vec()));
    }
}

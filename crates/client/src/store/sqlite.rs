//! The SQLCipher backend: one database encrypted at rest.
//!
//! The database key is derived from the user's passphrase with Argon2id
//! (parameters and salt in `kdf.json` beside the database, which holds no
//! secret). Everything the client keeps lives in the database: identity and
//! device keys, MLS group state and key packages, contacts, conversations,
//! history, and the outbox of sends not yet acknowledged by the server.
//!
//! One connection, behind the store's gate (see the module header of
//! `store`): a transaction is `BEGIN IMMEDIATE` (a write) or `BEGIN` (a
//! read) when the gate is taken and `COMMIT` or `ROLLBACK` when it is left,
//! so other processes on the same database see all of a write or none of
//! it, and threads of this one wait for the gate. The mutex around the
//! connection is only ever taken for one statement, by the gate's holder.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::*;
use crate::ClientError;
use subrosa_session::SystemEvent;

const DB_FILE: &str = "subrosa.db";
pub(crate) const KDF_FILE: &str = "kdf.json";

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
    // v5: no takeover. Every conversation id this device ever knew stays
    // here for good (a Welcome reusing one is refused), seeded from
    // everything an older store holds; the accounts ever seen in each
    // conversation (re-adding one makes a new conversation); and member
    // devices that arrived in a Welcome or commit, waiting for (or failing)
    // the key-directory check.
    "CREATE TABLE known_conversations (id BLOB PRIMARY KEY, at INTEGER NOT NULL, linked_only INTEGER NOT NULL DEFAULT 0);
     INSERT OR IGNORE INTO known_conversations (id, at) SELECT id, created_at FROM conversations;
     INSERT OR IGNORE INTO known_conversations (id, at) SELECT id, 0 FROM mls_group;
     INSERT OR IGNORE INTO known_conversations (id, at) SELECT DISTINCT conversation, 0 FROM messages;
     INSERT OR IGNORE INTO known_conversations (id, at) SELECT DISTINCT conversation, 0 FROM seq_out;
     CREATE TABLE past_members (conversation BLOB NOT NULL, handle TEXT NOT NULL, PRIMARY KEY (conversation, handle));
     INSERT OR IGNORE INTO past_members (conversation, handle) SELECT DISTINCT conversation, sender FROM messages;
     INSERT OR IGNORE INTO past_members (conversation, handle) SELECT id, peer FROM conversations WHERE peer IS NOT NULL;
     CREATE TABLE member_checks (conversation BLOB NOT NULL, handle TEXT NOT NULL, device TEXT NOT NULL,
        device_key BLOB NOT NULL, identity_key BLOB NOT NULL, added_by TEXT NOT NULL, welcome INTEGER NOT NULL,
        state TEXT NOT NULL, why TEXT NOT NULL DEFAULT '', PRIMARY KEY (conversation, handle, device));",
    // v6: post-compromise security. When this device last replaced its own
    // keys in each conversation and how many messages it sent since; when
    // each other member device last committed (every commit carries a path),
    // so members that stopped updating show as stale; when each key-package
    // secret was made, so replaced ones can be erased. Conversations from
    // before this step have no row: their keys never rotated, so they are
    // due at once.
    "CREATE TABLE key_updates (conversation BLOB PRIMARY KEY, last_update INTEGER NOT NULL, sent_since INTEGER NOT NULL DEFAULT 0);
     CREATE TABLE member_updates (conversation BLOB NOT NULL, device TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (conversation, device));
     ALTER TABLE mls_key_package ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;",
    // v7: offline-first sending. The outbox holds a message's content and
    // id until it is flushed, and is encrypted then, at the epoch current
    // after the inbox was processed; the request is kept once made, so a
    // post whose answer was lost goes again byte for byte. Rows from before hold
    // only a request (no conversation, message id or content): they are
    // re-posted as they are. Outgoing messages carry a state (NULL reads
    // as `sent`: everything stored before had left or was in the outbox).
    "ALTER TABLE messages ADD COLUMN state TEXT;
     ALTER TABLE messages ADD COLUMN state_reason TEXT;
     CREATE TABLE outbox_v5 (id INTEGER PRIMARY KEY AUTOINCREMENT, send_id BLOB NOT NULL UNIQUE,
        conversation BLOB, message_id BLOB, content BLOB, request BLOB, created_at INTEGER NOT NULL,
        CHECK (request IS NOT NULL OR (conversation IS NOT NULL AND message_id IS NOT NULL AND content IS NOT NULL)));
     INSERT INTO outbox_v5 (send_id, request, created_at) SELECT send_id, request, created_at FROM outbox ORDER BY created_at, rowid;
     DROP TABLE outbox;
     ALTER TABLE outbox_v5 RENAME TO outbox;",
    // v8: signed directory heads. The signed heads this device holds (one
    // per epoch), at most one pending gossiped head per member (its
    // newest), and alerts that name whom they concern, carry a fork's proof
    // and can be cleared. Unsigned heads gossiped before are no evidence:
    // dropped. A fork recorded from unsigned heads was never proven: it
    // becomes a cleared-on-sight alert and no longer blocks sending.
    "CREATE TABLE kt_signed_heads (epoch INTEGER PRIMARY KEY, head BLOB NOT NULL);
     CREATE TABLE kt_head_gossip (source TEXT PRIMARY KEY, epoch INTEGER NOT NULL, head BLOB NOT NULL);
     DELETE FROM kt_gossip;
     ALTER TABLE alerts ADD COLUMN concerns TEXT;
     ALTER TABLE alerts ADD COLUMN kind TEXT NOT NULL DEFAULT 'notice';
     ALTER TABLE alerts ADD COLUMN proof TEXT;
     ALTER TABLE alerts ADD COLUMN cleared INTEGER NOT NULL DEFAULT 0;
     INSERT OR IGNORE INTO alerts (at, text, concerns)
        SELECT CAST(strftime('%s', 'now') AS INTEGER) * 1000,
               'an earlier version of Subrosa blocked sending for an unproven key-directory fork (' || CAST(value AS TEXT)
               || '); only two conflicting signed heads prove a fork now, so sending is allowed again',
               'the server'
        FROM meta WHERE key = 'kt_fork';
     DELETE FROM meta WHERE key = 'kt_fork';",
    // v9: a staged commit waiting for the server's answer, stored with its
    // exact request (and send id) before it is posted, so a lost answer is
    // completed by re-posting the same bytes; `commit_digest` recognises the
    // echo of it, `meta` says what to re-stage when another commit won.
    "CREATE TABLE pending_commits (conversation BLOB PRIMARY KEY, send_id BLOB NOT NULL, request BLOB NOT NULL,
        commit_digest BLOB NOT NULL, meta BLOB NOT NULL, created_at INTEGER NOT NULL);",
    // v10: system lines stored as typed events (JSON of
    // `subrosa_session::SystemEvent`), each front end rendering them in its
    // own words; `body` keeps the neutral English rendering. Lines stored
    // before have no event and are shown as they were written.
    "ALTER TABLE messages ADD COLUMN event TEXT;",
    // v11: a front end that connects later (the daemon's subscribers)
    // replays what arrived since a time without reading all of history.
    "CREATE INDEX messages_received ON messages (received_at);",
    // v12: a contact's key before its last change. Its account's devices
    // not yet carried to the new key still hold it, and their messages are
    // not dropped meanwhile. Contacts whose key changed before this step
    // have none: nothing to tolerate.
    "ALTER TABLE contacts ADD COLUMN previous_key BLOB;",
    // v13: replies, edits, deletes for everyone, reactions and receipts. A
    // message keeps the id it answers, when the edit applied last was sent
    // (edits may arrive out of order), whether it was deleted (its text
    // is then gone), the other accounts one of ours went to, and when the
    // user read it (read receipts). Messages stored before count as read:
    // no receipts are owed for old history. Actions that came before the
    // message they concern wait in `early_actions`; receipts this device
    // owes wait in `receipts_due` until the outbox takes them.
    "ALTER TABLE messages ADD COLUMN reply_to BLOB;
     ALTER TABLE messages ADD COLUMN edited_at INTEGER;
     ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE messages ADD COLUMN recipients TEXT;
     ALTER TABLE messages ADD COLUMN read_at INTEGER;
     UPDATE messages SET read_at = received_at;
     CREATE TABLE reactions (conversation BLOB NOT NULL, message_id BLOB NOT NULL, member TEXT NOT NULL,
        emoji TEXT NOT NULL, at INTEGER NOT NULL, seq INTEGER PRIMARY KEY AUTOINCREMENT,
        UNIQUE (conversation, message_id, member, emoji));
     CREATE TABLE receipts (conversation BLOB NOT NULL, message_id BLOB NOT NULL, member TEXT NOT NULL,
        state TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (conversation, message_id, member));
     CREATE TABLE early_actions (seq INTEGER PRIMARY KEY AUTOINCREMENT, conversation BLOB NOT NULL, target BLOB NOT NULL,
        sender TEXT NOT NULL, device TEXT NOT NULL, content BLOB NOT NULL);
     CREATE INDEX early_actions_target ON early_actions (conversation, target);
     CREATE TABLE receipts_due (seq INTEGER PRIMARY KEY AUTOINCREMENT, conversation BLOB NOT NULL, message_id BLOB NOT NULL,
        author TEXT NOT NULL, kind TEXT NOT NULL, UNIQUE (conversation, message_id, kind));",
    // v14 (attach): the files of attachment messages: the pointer, key and
    // checks each message carried, where its download stands, the sealed
    // blob kept in the home directory, and where the user saved it.
    "CREATE TABLE attachments (conversation BLOB NOT NULL, message_id BLOB NOT NULL, idx INTEGER NOT NULL,
        blob BLOB NOT NULL, key BLOB NOT NULL, sha256 BLOB NOT NULL, size INTEGER NOT NULL, name TEXT NOT NULL,
        media_type TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, local TEXT, saved TEXT,
        PRIMARY KEY (conversation, message_id, idx));
     CREATE INDEX attachments_state ON attachments (state);",
    // v15 (vanish): disappearing messages. When each message disappears
    // (the conversation's timer, agreed on in the MLS group context, at the
    // time it was sent or read); rows past it are deleted with their
    // reactions, receipts and attachments.
    "ALTER TABLE messages ADD COLUMN expires_at INTEGER;
     CREATE INDEX messages_expiry ON messages (expires_at) WHERE expires_at IS NOT NULL;",
    // v16 (links): a message's link preview, as its sender's device made
    // it (`LinkPreview::to_stored`: link, title, description, thumbnail).
    "ALTER TABLE messages ADD COLUMN preview BLOB;",
    // v17 (big): a group's MLS state in pieces of 65536 bytes, each
    // with its SHA-256, so a write replaces only the pieces that changed
    // (a message changes the ratchets at the end of the state, not the
    // tree before them). `mls_group` keeps one row per group, state empty.
    "CREATE TABLE mls_group_chunk (group_id BLOB NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
        data BLOB NOT NULL, PRIMARY KEY (group_id, idx));
     WITH RECURSIVE piece (id, idx) AS (
        SELECT id, 0 FROM mls_group
        UNION ALL
        SELECT piece.id, piece.idx + 1 FROM piece JOIN mls_group g ON g.id = piece.id
        WHERE (piece.idx + 1) * 65536 < length(g.state))
     INSERT INTO mls_group_chunk (group_id, idx, hash, data)
        SELECT piece.id, piece.idx, x'', substr(g.state, piece.idx * 65536 + 1, 65536)
        FROM piece JOIN mls_group g ON g.id = piece.id;
     UPDATE mls_group SET state = x'';",
    // v18 (lead): a reaction taken back is kept, marked `removed`, with
    // when it was taken back, so that an "add" sent earlier but arriving
    // later (from another device of the same account, or after a reorder)
    // cannot bring it back. Rows before this step are all present ones.
    "ALTER TABLE reactions ADD COLUMN removed INTEGER NOT NULL DEFAULT 0;",
    // v19: a staged commit's request with its large Welcomes by reference
    // is kept beside the whole request (no longer in its place), with when
    // its blobs were uploaded and until when a re-post may name them;
    // after that, a re-post uploads them again. A row that a release
    // before this step already rewrote keeps its references: its whole
    // Welcomes are gone, and posting it as it is is all there is left.
    "ALTER TABLE pending_commits ADD COLUMN by_reference BLOB;
     ALTER TABLE pending_commits ADD COLUMN uploaded_at INTEGER;
     ALTER TABLE pending_commits ADD COLUMN reuse_until INTEGER;",
    // v20 (pieces): a group's MLS state in content-defined pieces (see
    // `write_group_pieces`), each stored once under its SHA-256, and in
    // `mls_group.pieces` the list naming them in order. A leaf added to
    // the tree shifted every fixed-offset piece after it (v17), so a
    // commit wrote the whole state again; now it writes the pieces around
    // what changed. The conversion of v17's pieces runs in Rust
    // (`convert_v17_pieces`), in the same transaction.
    "CREATE TABLE mls_group_piece (group_id BLOB NOT NULL, hash BLOB NOT NULL, data BLOB NOT NULL,
        PRIMARY KEY (group_id, hash));
     ALTER TABLE mls_group ADD COLUMN pieces BLOB NOT NULL DEFAULT x'';",
];

/// The schema step (its number, counting from 1) after whose SQL
/// [`convert_v17_pieces`] runs.
const PIECES_STEP: usize = 20;

/// Smallest, usual and largest size of a stored piece of a group's state
/// (FastCDC's cut points: where the bytes before them say, so an insertion
/// moves only the cuts next to it). Only writes depend on these: a stored
/// state names its pieces and their lengths, so other values (or another
/// chunker) would cost at most one full write, never a wrong read.
const PIECE_MIN: usize = 4096;
const PIECE_AVG: usize = 16384;
const PIECE_MAX: usize = 65536;

/// One entry of a group's list of pieces: the piece's SHA-256, then its
/// length (u32, big-endian).
const PIECE_ENTRY: usize = 36;

/// Writes a group's state as content-defined pieces, each stored once per
/// group under its SHA-256, and the list naming them in order. Inserts the
/// pieces not stored yet and deletes those no longer named (overwritten on
/// disk: `secure_delete`). Returns how many pieces it inserted.
///
/// `written`, this store's last written states, saves hashing again the
/// pieces a state still begins with (all but the secrets at its end after
/// a batch of messages): a piece whose bytes equal those of the last
/// written state's piece there has that piece's hash.
fn write_group_pieces(
    conn: &Connection,
    written: Option<&Mutex<WrittenStates>>,
    group_id: &[u8],
    state: &[u8],
) -> Result<usize, ClientError> {
    use std::collections::HashSet;
    let mut cache = written.map(lock);
    let last = cache.as_mut().and_then(|c| c.take(group_id));
    let (cuts, list) = {
        let stored;
        let (old_list, old_state) = match &last {
            Some(last) => (last.list.as_slice(), Some(last.state.as_slice())),
            None => {
                stored = stored_piece_list(conn, group_id)?;
                (stored.as_deref().unwrap_or_default(), None)
            }
        };
        let cuts = cut_state(state, old_list, old_state)?;
        let list = encode_piece_list(&cuts);
        (cuts, list)
    };
    let stored: HashSet<Vec<u8>> = {
        // The primary key's index holds the hashes: this reads no piece.
        let mut stmt = conn.prepare_cached("SELECT hash FROM mls_group_piece WHERE group_id = ?1").map_err(sql)?;
        let rows = stmt.query_map([group_id], |r| r.get::<_, Vec<u8>>(0)).map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)?
    };
    let mut insert =
        conn.prepare_cached("INSERT INTO mls_group_piece (group_id, hash, data) VALUES (?1, ?2, ?3)").map_err(sql)?;
    let mut named = HashSet::with_capacity(cuts.len());
    let mut inserted = 0;
    for (hash, piece) in &cuts {
        if named.insert(hash.to_vec()) && !stored.contains(hash.as_slice()) {
            insert.execute(params![group_id, hash.as_slice(), piece]).map_err(sql)?;
            inserted += 1;
        }
    }
    let mut delete =
        conn.prepare_cached("DELETE FROM mls_group_piece WHERE group_id = ?1 AND hash = ?2").map_err(sql)?;
    for gone in stored.difference(&named) {
        delete.execute(params![group_id, gone]).map_err(sql)?;
    }
    conn.execute(
        "INSERT INTO mls_group (id, state, pieces) VALUES (?1, x'', ?2)
         ON CONFLICT (id) DO UPDATE SET pieces = excluded.pieces",
        params![group_id, list],
    )
    .map_err(sql)?;
    if let Some(cache) = cache.as_mut() {
        cache.put(group_id, list, state, last);
    }
    Ok(inserted)
}

/// The most this store keeps of the states it last wrote (a 10,000-member
/// post-quantum group's state is about 29 MB); a larger state is not kept.
const WRITTEN_STATES_BYTES: usize = 64 << 20;

/// The states this store last wrote, most recent last, each with the list
/// naming its pieces: the next write of a group compares its bytes with
/// them instead of hashing the pieces again. Each entry is consistent in
/// itself (the list names exactly that state's pieces), whatever became
/// of the transaction that wrote it: a write rolled back afterwards leaves
/// an entry naming pieces the database lacks, and the write that uses it
/// inserts them, since it asks the database which pieces it holds. Held in
/// memory only, wiped when dropped or replaced.
#[derive(Default)]
struct WrittenStates {
    entries: Vec<WrittenState>,
}

struct WrittenState {
    group_id: Vec<u8>,
    list: Vec<u8>,
    state: Zeroizing<Vec<u8>>,
}

impl WrittenStates {
    /// Takes out the group's entry, if kept.
    fn take(&mut self, group_id: &[u8]) -> Option<WrittenState> {
        let i = self.entries.iter().position(|e| e.group_id == group_id)?;
        Some(self.entries.remove(i))
    }

    /// Keeps `state` as the group's last written one, in the buffer of the
    /// entry it replaces when that is large enough (a smaller one is
    /// dropped, and wiped, rather than grown: growing would copy the
    /// secrets and free the old buffer unwiped). The oldest entries go
    /// when the total would pass [`WRITTEN_STATES_BYTES`].
    fn put(&mut self, group_id: &[u8], list: Vec<u8>, state: &[u8], old: Option<WrittenState>) {
        if state.len() > WRITTEN_STATES_BYTES {
            return;
        }
        let mut buffer = match old {
            Some(old) if old.state.capacity() >= state.len() => old.state,
            _ => Zeroizing::new(Vec::with_capacity(state.len())),
        };
        buffer.clear();
        buffer.extend_from_slice(state);
        let mut total = state.len();
        let mut keep = self.entries.len();
        while keep > 0 && total + self.entries[keep - 1].state.capacity() <= WRITTEN_STATES_BYTES {
            total += self.entries[keep - 1].state.capacity();
            keep -= 1;
        }
        self.entries.drain(..keep);
        self.entries.push(WrittenState { group_id: group_id.to_vec(), list, state: buffer });
    }
}

/// A piece of a group's state, with its SHA-256.
type Piece<'s> = ([u8; 32], &'s [u8]);

/// `state` cut into pieces, each with its SHA-256: FastCDC's cuts over
/// the whole state. `old`, the list of the state stored before, saves the
/// scan for cut points over the pieces the state still begins with (all
/// but the secrets at the end after a message): a FastCDC cut depends only
/// on the bytes from the piece's start up to and including the byte after
/// the cut, so a stored piece whose bytes and following byte are unchanged
/// is cut again where it was. The last unchanged piece is scanned again:
/// the byte after it may have changed, and if it was the stored state's
/// last piece, the old end cut it, not its content. The result is the
/// same as a scan of the whole state (a test holds it to that).
///
/// `old_state`, when given, is the state `old` names (this store's own
/// copy of what it last wrote): a piece is unchanged when its bytes equal
/// that state's there, and keeps its hash without hashing it again.
fn cut_state<'s>(state: &'s [u8], old: &[u8], old_state: Option<&[u8]>) -> Result<Vec<Piece<'s>>, ClientError> {
    use sha2::Digest as _;
    let old: Vec<(&[u8], usize)> = piece_list(old)?.collect();
    let mut cuts: Vec<Piece<'s>> = Vec::with_capacity(old.len() + 1);
    let mut from = 0;
    for (hash, len) in &old {
        let Some(piece) = state.get(from..from + len) else {
            break;
        };
        let digest: [u8; 32] = match old_state {
            Some(was) if was.get(from..from + len) == Some(piece) => match <[u8; 32]>::try_from(*hash) {
                Ok(h) => h,
                Err(_) => break,
            },
            Some(_) => break,
            None => sha2::Sha256::digest(piece).into(),
        };
        if digest.as_slice() != *hash {
            break;
        }
        cuts.push((digest, piece));
        from += len;
    }
    if let Some((_, piece)) = cuts.pop() {
        from -= piece.len();
    }
    let rest = &state[from..];
    cuts.extend(fastcdc::v2020::FastCDC::new(rest, PIECE_MIN, PIECE_AVG, PIECE_MAX).map(|c| {
        let piece = &rest[c.offset..c.offset + c.length];
        (sha2::Sha256::digest(piece).into(), piece)
    }));
    Ok(cuts)
}

/// A group's stored list of pieces (`None`: no such group).
fn stored_piece_list(conn: &Connection, group_id: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
    conn.query_row("SELECT pieces FROM mls_group WHERE id = ?1", [group_id], |r| r.get(0)).optional().map_err(sql)
}

/// The list naming `cuts` in order: each piece's SHA-256, then its length
/// (a piece is at most a few PIECE_MAX, far below u32's range).
fn encode_piece_list(cuts: &[Piece<'_>]) -> Vec<u8> {
    let mut list = Vec::with_capacity(cuts.len() * PIECE_ENTRY);
    for (hash, piece) in cuts {
        list.extend_from_slice(hash);
        list.extend_from_slice(&(piece.len() as u32).to_be_bytes());
    }
    list
}

/// A group's list of pieces, as (SHA-256, length) pairs.
fn piece_list(list: &[u8]) -> Result<impl Iterator<Item = (&[u8], usize)>, ClientError> {
    if list.len() % PIECE_ENTRY != 0 {
        return Err(ClientError::Store("group state: its list of pieces is damaged".into()));
    }
    Ok(list.chunks_exact(PIECE_ENTRY).map(|e| {
        let (hash, len) = e.split_at(32);
        (hash, u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize)
    }))
}

/// Step v20's conversion: each group's state, read from its v17 pieces in
/// order, is written again as content-defined pieces, and the v17 table
/// goes (its pages overwritten: `secure_delete`).
fn convert_v17_pieces(conn: &Connection) -> Result<(), ClientError> {
    let groups: Vec<Vec<u8>> = {
        let mut stmt = conn.prepare("SELECT id FROM mls_group").map_err(sql)?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)?
    };
    for id in groups {
        let size: i64 = conn
            .query_row("SELECT COALESCE(SUM(length(data)), 0) FROM mls_group_chunk WHERE group_id = ?1", [&id], |r| {
                r.get(0)
            })
            .map_err(sql)?;
        let mut state = Zeroizing::new(Vec::with_capacity(usize::try_from(size).unwrap_or(0)));
        {
            let mut stmt =
                conn.prepare("SELECT data FROM mls_group_chunk WHERE group_id = ?1 ORDER BY idx").map_err(sql)?;
            let mut rows = stmt.query([&id]).map_err(sql)?;
            while let Some(r) = rows.next().map_err(sql)? {
                let piece = r.get_ref(0).map_err(sql)?;
                state.extend_from_slice(piece.as_blob().map_err(|e| ClientError::Store(format!("group state: {e}")))?);
            }
        }
        write_group_pieces(conn, None, &id, &state)?;
    }
    conn.execute_batch("DROP TABLE mls_group_chunk").map_err(sql)
}

const MESSAGE_COLUMNS: &str =
    "SELECT seq, message_id, sender, sender_device, sent_at, received_at, body, outgoing, system, \
     state, state_reason, event, reply_to, edited_at, deleted, recipients, conversation, preview, expires_at FROM messages";

fn receipt_kind(s: &str) -> Option<subrosa_core::content::ReceiptKind> {
    match s {
        "delivered" => Some(subrosa_core::content::ReceiptKind::Delivered),
        "read" => Some(subrosa_core::content::ReceiptKind::Read),
        _ => None,
    }
}

fn receipt_name(k: subrosa_core::content::ReceiptKind) -> &'static str {
    match k {
        subrosa_core::content::ReceiptKind::Read => "read",
        _ => "delivered",
    }
}

/// A message row with its reactions and receipts (read with `conn`, the
/// connection the row came from).
fn message_from_row(
    r: &rusqlite::Row<'_>,
    c: &ConversationRow,
    conn: &Connection,
) -> rusqlite::Result<(i64, StoredMessage)> {
    let (seq, mut m) = message_columns(r, c)?;
    let conversation: Vec<u8> = r.get(16)?;
    let message_id: Vec<u8> = r.get(1)?;
    let mut stmt = conn.prepare_cached(
        "SELECT member, emoji FROM reactions WHERE conversation = ?1 AND message_id = ?2 AND removed = 0 ORDER BY seq",
    )?;
    let rows =
        stmt.query_map(params![conversation, message_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    for row in rows {
        let (member, emoji) = row?;
        match m.reactions.iter_mut().find(|x| x.emoji == emoji) {
            Some(x) => x.from.push(member),
            None => m.reactions.push(Reaction { emoji, from: vec![member] }),
        }
    }
    if let Some(stored) = m.state {
        // A damaged list reads as none: the message stays `sent`.
        let recipients: Vec<String> =
            r.get::<_, Option<String>>(15)?.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default();
        if !recipients.is_empty() {
            let mut stmt =
                conn.prepare_cached("SELECT member, state FROM receipts WHERE conversation = ?1 AND message_id = ?2")?;
            let rows = stmt.query_map(params![conversation, message_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut receipts = Vec::new();
            for row in rows {
                let (member, state) = row?;
                if let Some(k) = receipt_kind(&state) {
                    receipts.push((member, k));
                }
            }
            let (state, detail) = receipt_state(stored, &recipients, &receipts);
            m.state = Some(state);
            m.receipts = detail;
        }
    }
    Ok((seq, m))
}

fn message_columns(r: &rusqlite::Row<'_>, c: &ConversationRow) -> rusqlite::Result<(i64, StoredMessage)> {
    let outgoing: bool = r.get(7)?;
    let system: bool = r.get(8)?;
    let state = if outgoing && !system {
        // NULL (rows of v4, and this account's messages from its other
        // devices, which came through the server) reads as sent.
        Some(r.get::<_, Option<String>>(9)?.as_deref().and_then(MessageState::parse).unwrap_or(MessageState::Sent))
    } else {
        None
    };
    let reason = if state == Some(MessageState::Failed) { r.get(10)? } else { None };
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
            outgoing,
            system,
            event: if system { r.get::<_, Option<String>>(11)?.as_deref().and_then(SystemEvent::decode) } else { None },
            state,
            reason,
            reply_to: r.get::<_, Option<Vec<u8>>>(12)?.map(hex::encode),
            edited: r.get::<_, Option<i64>>(13)?.is_some(),
            deleted: r.get(14)?,
            reactions: Vec::new(),
            receipts: Vec::new(),
            // One that does not read (it cannot be, short of a bug) is left out.
            preview: r
                .get::<_, Option<Vec<u8>>>(17)?
                .and_then(|b| subrosa_core::preview::LinkPreview::from_stored(&b).ok())
                .map(Into::into),
            expires_at: r.get::<_, Option<i64>>(18)?.map(|t| t as u64),
            request: false,
            dangerous_links: Vec::new(),
        },
    ))
}

fn queued_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<QueuedSend, String>> {
    let id: i64 = r.get(0)?;
    let send_id: Vec<u8> = r.get(1)?;
    let conversation: Option<Vec<u8>> = r.get(2)?;
    let message_id: Option<Vec<u8>> = r.get(3)?;
    let content: Option<Vec<u8>> = r.get(4)?;
    let request: Option<Vec<u8>> = r.get(5)?;
    let Ok(send_id) = <[u8; 16]>::try_from(send_id.as_slice()) else {
        return Ok(Err(format!("outbox row {id}: bad send id")));
    };
    let message = match (conversation, message_id) {
        (Some(c), Some(m)) => {
            let (Ok(c), Ok(m)) = (subrosa_proto::ConversationId::from_slice(&c), <[u8; 16]>::try_from(m.as_slice()))
            else {
                return Ok(Err(format!("outbox row {id}: bad conversation or message id")));
            };
            Some((c, m))
        }
        _ => None,
    };
    Ok(Ok(QueuedSend { id, send_id, message, content, request }))
}

const OUTBOX_COLUMNS: &str = "SELECT id, send_id, conversation, message_id, content, request FROM outbox";

/// The SQLCipher store of one device.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    gate: Gate,
    path: PathBuf,
    written: Mutex<WrittenStates>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

fn sql(e: rusqlite::Error) -> ClientError {
    ClientError::Store(e.to_string())
}

impl SqliteStore {
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
        let key = Self::derive_key(home, passphrase)?;
        Self::open_with_derived_key(home, &key)
    }

    /// The key of the store in `home` derived from `passphrase` (Argon2id
    /// with the parameters in `kdf.json`: the slow part of opening). Not
    /// checked here: [`SqliteStore::open_with_derived_key`] tells a wrong one.
    ///
    /// # Errors
    /// [`ClientError::NotRegistered`] when there is no store, or a damaged `kdf.json`.
    pub fn derive_key(home: &Path, passphrase: &str) -> Result<Zeroizing<[u8; 32]>, ClientError> {
        if !Self::exists(home) {
            return Err(ClientError::NotRegistered(home.display().to_string()));
        }
        let raw = std::fs::read(home.join(KDF_FILE)).map_err(|e| ClientError::Io(format!("kdf.json: {e}")))?;
        let kdf: KdfParams =
            serde_json::from_slice(&raw).map_err(|_| ClientError::Store("kdf.json is damaged".into()))?;
        kdf.derive(passphrase)
    }

    /// Opens the store in `home` with a key from [`SqliteStore::derive_key`]
    /// (possibly one cached for the session, see [`crate::keycache`]).
    ///
    /// # Errors
    /// [`ClientError::NotRegistered`] when there is none,
    /// [`ClientError::WrongPassphrase`] when the key does not open it
    /// (nothing is changed then).
    pub fn open_with_derived_key(home: &Path, key: &[u8; 32]) -> Result<Self, ClientError> {
        if !Self::exists(home) {
            return Err(ClientError::NotRegistered(home.display().to_string()));
        }
        let store = Self::open_with_key(home, key)?;
        store.migrate()?;
        Ok(store)
    }

    pub(crate) fn open_with_key(home: &Path, key: &[u8; 32]) -> Result<Self, ClientError> {
        let path = home.join(DB_FILE);
        let conn = Connection::open(&path).map_err(sql)?;
        // SQLCipher logs decryption failures to stderr by itself; the user
        // gets our one clear line instead.
        conn.execute_batch(&key_pragma(key)).map_err(sql)?;
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
        Ok(SqliteStore { conn: Mutex::new(conn), gate: Gate::default(), path, written: Mutex::default() })
    }

    fn migrate(&self) -> Result<(), ClientError> {
        self.migrate_to(SCHEMA.len())
    }

    pub(crate) fn migrate_to(&self, last: usize) -> Result<(), ClientError> {
        let conn = self.lock();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql)?;
        for (i, step) in SCHEMA.iter().enumerate().take(last).skip(version.max(0) as usize) {
            conn.execute_batch(&format!("BEGIN; {step};")).map_err(sql)?;
            let done = if i + 1 == PIECES_STEP { convert_v17_pieces(&conn) } else { Ok(()) }
                .and_then(|()| conn.execute_batch(&format!("PRAGMA user_version = {}; COMMIT;", i + 1)).map_err(sql));
            if let Err(e) = done {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
        Ok(())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Connection> {
        lock(&self.conn)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere; the connection (or the
    // copy of written states, replaced whole) itself is fine.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SqliteStore {
    /// Begins the outermost transaction. One a panicking closure left open
    /// (unwinding freed the gate but ran no ROLLBACK) never committed: it
    /// is rolled back first.
    fn begin(&self, statement: &str) -> Result<(), ClientError> {
        let conn = self.lock();
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        conn.execute_batch(statement).map_err(sql)
    }
}

impl Backend for SqliteStore {
    fn read_dyn(&self, f: &mut dyn FnMut(&dyn Tx) -> Result<(), ClientError>) -> Result<(), ClientError> {
        let entered = self.gate.enter(false)?;
        let tx = SqliteTx { conn: &self.conn, written: &self.written };
        if !entered.outer() {
            return f(&tx);
        }
        self.begin("BEGIN")?;
        let result = f(&tx);
        // A read changed nothing: ending it either way only ends its snapshot.
        let end = self.lock().execute_batch("COMMIT").map_err(sql);
        if end.is_err() {
            let _ = self.lock().execute_batch("ROLLBACK");
        }
        result.and(end)
    }

    fn write_dyn(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), ClientError>) -> Result<(), ClientError> {
        let entered = self.gate.enter(true)?;
        let mut tx = SqliteTx { conn: &self.conn, written: &self.written };
        if !entered.outer() {
            // A write inside a write is a savepoint: what it did goes with
            // it when it fails, and the outer one goes on (or not) as it
            // decides; nothing is durable before the outer one commits.
            self.lock().execute_batch("SAVEPOINT nested").map_err(sql)?;
            return match f(&mut tx) {
                Ok(()) => self.lock().execute_batch("RELEASE nested").map_err(sql),
                Err(e) => {
                    let _ = self.lock().execute_batch("ROLLBACK TO nested; RELEASE nested");
                    Err(e)
                }
            };
        }
        self.begin("BEGIN IMMEDIATE")?;
        match f(&mut tx) {
            Ok(()) => match self.lock().execute_batch("COMMIT") {
                Ok(()) => Ok(()),
                Err(e) => {
                    let _ = self.lock().execute_batch("ROLLBACK");
                    Err(sql(e))
                }
            },
            Err(e) => {
                let _ = self.lock().execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }
}

/// One transaction's view of the database (the gate is held meanwhile).
struct SqliteTx<'a> {
    conn: &'a Mutex<Connection>,
    written: &'a Mutex<WrittenStates>,
}

impl SqliteTx<'_> {
    fn lock(&self) -> MutexGuard<'_, Connection> {
        lock(self.conn)
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
}

impl SqliteTx<'_> {
    fn group_state_row(&self, group_id: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError> {
        let conn = self.lock();
        // The state's whole size first, so the buffer is allocated once:
        // a buffer that grew would leave copies of the group's secrets in
        // the memory it let go, where zeroizing cannot reach them.
        let Some(list) = stored_piece_list(&conn, group_id)? else {
            return Ok(None);
        };
        // The size the list claims; each piece is checked against it below,
        // and a damaged list claiming too much is an error, not an abort.
        let size: usize = piece_list(&list)?.map(|(_, len)| len).sum();
        let mut state = Zeroizing::new(Vec::new());
        state
            .try_reserve_exact(size)
            .map_err(|_| ClientError::Store(format!("group state: its list of pieces claims {size} bytes")))?;
        let mut stmt =
            conn.prepare_cached("SELECT data FROM mls_group_piece WHERE group_id = ?1 AND hash = ?2").map_err(sql)?;
        for (hash, len) in piece_list(&list)? {
            let mut rows = stmt.query(params![group_id, hash]).map_err(sql)?;
            let Some(r) = rows.next().map_err(sql)? else {
                return Err(ClientError::Store("group state: a piece is missing".into()));
            };
            let piece =
                r.get_ref(0).map_err(sql)?.as_blob().map_err(|e| ClientError::Store(format!("group state: {e}")))?;
            if piece.len() != len {
                return Err(ClientError::Store("group state: a piece is not the length its list says".into()));
            }
            state.extend_from_slice(piece);
        }
        Ok(Some(state))
    }
}

impl Meta for SqliteTx<'_> {
    fn meta(&self, key: &str) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError> {
        self.lock()
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get::<_, Vec<u8>>(0))
            .optional()
            .map(|v| v.map(Zeroizing::new))
            .map_err(sql)
    }

    fn delete_meta(&mut self, key: &str) -> Result<(), ClientError> {
        self.lock().execute("DELETE FROM meta WHERE key = ?1", [key]).map(|_| ()).map_err(sql)
    }

    fn meta_keys(&self, prefix: &str) -> Result<Vec<String>, ClientError> {
        let conn = self.lock();
        // substr compares bytes exactly, where LIKE would treat `_` and `%`
        // in the prefix as patterns.
        let mut stmt = conn
            .prepare_cached("SELECT key FROM meta WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key")
            .map_err(sql)?;
        let rows = stmt.query_map([prefix], |r| r.get::<_, String>(0)).map_err(sql)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql)
    }

    fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map(|_| ())
            .map_err(sql)
    }
}

impl Directory for SqliteTx<'_> {
    fn kt_root(&self, epoch: u64) -> Result<Option<Vec<u8>>, ClientError> {
        self.lock()
            .query_row("SELECT root FROM kt_roots WHERE epoch = ?1", [epoch as i64], |r| r.get(0))
            .optional()
            .map_err(sql)
    }

    fn kt_range(&self) -> Result<Option<(u64, u64)>, ClientError> {
        self.lock()
            .query_row("SELECT MIN(epoch), MAX(epoch) FROM kt_roots", [], |r| {
                Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?))
            })
            .map(|o| o.map(|(a, b)| (a as u64, b as u64)))
            .map_err(sql)
    }

    fn put_kt_roots(&mut self, from: u64, roots: &[[u8; 32]]) -> Result<(), ClientError> {
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

    fn kt_signed_head(&self, epoch: u64) -> Result<Option<Vec<u8>>, ClientError> {
        self.lock()
            .query_row("SELECT head FROM kt_signed_heads WHERE epoch = ?1", [epoch as i64], |r| r.get(0))
            .optional()
            .map_err(sql)
    }

    fn kt_newest_signed_head(&self) -> Result<Option<Vec<u8>>, ClientError> {
        self.lock()
            .query_row("SELECT head FROM kt_signed_heads ORDER BY epoch DESC LIMIT 1", [], |r| r.get(0))
            .optional()
            .map_err(sql)
    }

    fn put_kt_signed_head(&mut self, epoch: u64, head: &[u8]) -> Result<(), ClientError> {
        self.lock()
            .execute("INSERT OR IGNORE INTO kt_signed_heads (epoch, head) VALUES (?1, ?2)", params![epoch as i64, head])
            .map(|_| ())
            .map_err(sql)
    }

    fn push_kt_head_gossip(&mut self, source: &str, epoch: u64, head: &[u8]) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO kt_head_gossip (source, epoch, head) VALUES (?1, ?2, ?3)
                 ON CONFLICT (source) DO UPDATE SET epoch = excluded.epoch, head = excluded.head
                 WHERE excluded.epoch > kt_head_gossip.epoch",
                params![source, epoch as i64, head],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn kt_head_gossip(&self) -> Result<Vec<(String, Vec<u8>)>, ClientError> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT source, head FROM kt_head_gossip ORDER BY epoch").map_err(sql)?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(sql)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql)
    }

    fn drop_kt_head_gossip(&mut self, source: &str, head: &[u8]) -> Result<(), ClientError> {
        self.lock()
            .execute("DELETE FROM kt_head_gossip WHERE source = ?1 AND head = ?2", params![source, head])
            .map(|_| ())
            .map_err(sql)
    }

    fn add_alert_about(&mut self, concerns: &str, text: &str, proof: Option<&str>) -> Result<(), ClientError> {
        let kind = if proof.is_some() { "fork" } else { "notice" };
        self.lock()
            .execute(
                "INSERT OR IGNORE INTO alerts (at, text, concerns, kind, proof) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![now_ms() as i64, text, concerns, kind, proof],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn alerts(&self) -> Result<Vec<Alert>, ClientError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT id, at, concerns, kind, text, proof FROM alerts WHERE cleared = 0 ORDER BY id")
            .map_err(sql)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Alert {
                    id: r.get::<_, i64>(0)? as u64,
                    at: r.get::<_, i64>(1)? as u64,
                    concerns: r.get(2)?,
                    fork: r.get::<_, String>(3)? == "fork",
                    text: r.get(4)?,
                    proof: r.get(5)?,
                })
            })
            .map_err(sql)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql)
    }

    fn clear_alerts(&mut self, forks: bool) -> Result<usize, ClientError> {
        let sql_text = if forks {
            "UPDATE alerts SET cleared = 1, shown = 1 WHERE cleared = 0"
        } else {
            "UPDATE alerts SET cleared = 1, shown = 1 WHERE cleared = 0 AND kind != 'fork'"
        };
        self.lock().execute(sql_text, []).map_err(sql)
    }

    fn open_fork(&self) -> Result<Option<String>, ClientError> {
        self.lock()
            .query_row("SELECT text FROM alerts WHERE kind = 'fork' AND cleared = 0 ORDER BY id LIMIT 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql)
    }

    fn add_alert(&mut self, text: &str) -> Result<(), ClientError> {
        self.lock()
            .execute("INSERT OR IGNORE INTO alerts (at, text) VALUES (?1, ?2)", params![now_ms() as i64, text])
            .map(|_| ())
            .map_err(sql)
    }

    fn take_alerts(&mut self) -> Result<Vec<String>, ClientError> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT text FROM alerts WHERE shown = 0 ORDER BY id").map_err(sql)?;
        let texts =
            stmt.query_map([], |r| r.get::<_, String>(0)).map_err(sql)?.collect::<Result<Vec<_>, _>>().map_err(sql)?;
        conn.execute("UPDATE alerts SET shown = 1 WHERE shown = 0", []).map_err(sql)?;
        Ok(texts)
    }
}

impl Contacts for SqliteTx<'_> {
    fn contact_key(&self, handle: &str) -> Result<Option<Vec<u8>>, ClientError> {
        self.lock()
            .query_row("SELECT identity_key FROM contacts WHERE handle = ?1", [handle], |r| r.get(0))
            .optional()
            .map_err(sql)
    }

    fn pin_contact(&mut self, handle: &str, identity_key: &[u8]) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO contacts (handle, identity_key, added_at) VALUES (?1, ?2, ?3) ON CONFLICT (handle) DO NOTHING",
                params![handle, identity_key, now_ms() as i64],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn set_verified(&mut self, handle: &str, verified: bool) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "UPDATE contacts SET verified = ?2, key_change_pending = 0 WHERE handle = ?1",
                params![handle, verified],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn change_contact_key(&mut self, handle: &str, identity_key: &[u8]) -> Result<bool, ClientError> {
        let conn = self.lock();
        let was_verified: bool = conn
            .query_row("SELECT verified FROM contacts WHERE handle = ?1", [handle], |r| r.get(0))
            .optional()
            .map_err(sql)?
            .unwrap_or(false);
        conn.execute(
            "UPDATE contacts SET previous_key = CASE WHEN identity_key = ?2 THEN previous_key ELSE identity_key END, \
             identity_key = ?2, verified = 0, key_change_pending = ?3 WHERE handle = ?1",
            params![handle, identity_key, was_verified],
        )
        .map_err(sql)?;
        Ok(was_verified)
    }

    fn key_change_pending(&self, handle: &str) -> Result<bool, ClientError> {
        self.lock()
            .query_row("SELECT key_change_pending FROM contacts WHERE handle = ?1", [handle], |r| r.get(0))
            .optional()
            .map(|o| o.unwrap_or(false))
            .map_err(sql)
    }

    fn clear_key_change(&mut self, handle: &str) -> Result<(), ClientError> {
        self.lock()
            .execute("UPDATE contacts SET key_change_pending = 0 WHERE handle = ?1", [handle])
            .map(|_| ())
            .map_err(sql)
    }

    fn contact_previous_key(&self, handle: &str) -> Result<Option<Vec<u8>>, ClientError> {
        self.lock()
            .query_row("SELECT previous_key FROM contacts WHERE handle = ?1", [handle], |r| r.get(0))
            .optional()
            .map(Option::flatten)
            .map_err(sql)
    }

    fn contacts(&self) -> Result<Vec<Contact>, ClientError> {
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
}

impl Conversations for SqliteTx<'_> {
    fn add_conversation(
        &mut self,
        id: &subrosa_proto::ConversationId,
        kind: &str,
        name: &str,
        peer: Option<&str>,
    ) -> Result<(), ClientError> {
        let now = now_ms() as i64;
        let conn = self.lock();
        conn.execute(
            "INSERT INTO conversations (id, kind, name, peer, created_at, last_activity) VALUES (?1, ?2, ?3, ?4, ?5, ?5)
             ON CONFLICT (id) DO NOTHING",
            params![id.as_bytes().as_slice(), kind, name, peer, now],
        )
        .map_err(sql)?;
        conn.execute(
            "INSERT OR IGNORE INTO known_conversations (id, at) VALUES (?1, ?2)",
            params![id.as_bytes().as_slice(), now],
        )
        .map_err(sql)?;
        // Creating or joining gave this device fresh keys in it.
        conn.execute(
            "INSERT INTO key_updates (conversation, last_update, sent_since) VALUES (?1, ?2, 0)
             ON CONFLICT (conversation) DO NOTHING",
            params![id.as_bytes().as_slice(), now],
        )
        .map(|_| ())
        .map_err(sql)
    }

    fn conversation_created_at(&self, id: &subrosa_proto::ConversationId) -> Result<u64, ClientError> {
        self.lock()
            .query_row("SELECT created_at FROM conversations WHERE id = ?1", [id.as_bytes().as_slice()], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map(|v| v.unwrap_or(0) as u64)
            .map_err(sql)
    }

    fn known_conversation(&self, id: &subrosa_proto::ConversationId) -> Result<Option<bool>, ClientError> {
        self.lock()
            .query_row("SELECT linked_only FROM known_conversations WHERE id = ?1", [id.as_bytes().as_slice()], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql)
    }

    fn add_linked_conversation(
        &mut self,
        id: &subrosa_proto::ConversationId,
        kind: &str,
        name: &str,
        peer: Option<&str>,
    ) -> Result<(), ClientError> {
        let fresh = self.known_conversation(id)?.is_none();
        self.add_conversation(id, kind, name, peer)?;
        if fresh {
            self.lock()
                .execute("UPDATE known_conversations SET linked_only = 1 WHERE id = ?1", [id.as_bytes().as_slice()])
                .map_err(sql)?;
        }
        Ok(())
    }

    fn note_members(&mut self, id: &subrosa_proto::ConversationId, handles: &[&str]) -> Result<(), ClientError> {
        let conn = self.lock();
        for h in handles {
            conn.execute(
                "INSERT OR IGNORE INTO past_members (conversation, handle) VALUES (?1, ?2)",
                params![id.as_bytes().as_slice(), h],
            )
            .map_err(sql)?;
        }
        Ok(())
    }

    fn was_member(&self, id: &subrosa_proto::ConversationId, handle: &str) -> Result<bool, ClientError> {
        self.lock()
            .query_row(
                "SELECT 1 FROM past_members WHERE conversation = ?1 AND handle = ?2",
                params![id.as_bytes().as_slice(), handle],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
            .map_err(sql)
    }

    fn add_member_check(&mut self, c: &MemberCheck) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO member_checks (conversation, handle, device, device_key, identity_key, added_by, welcome, state, why)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (conversation, handle, device) DO UPDATE SET device_key = excluded.device_key,
                    identity_key = excluded.identity_key, added_by = excluded.added_by, state = excluded.state,
                    why = excluded.why",
                params![
                    c.conversation.as_bytes().as_slice(),
                    c.handle,
                    c.device,
                    c.device_key,
                    c.identity_key,
                    c.added_by,
                    c.welcome,
                    c.state,
                    c.why
                ],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn member_checks(
        &self,
        conversation: Option<&subrosa_proto::ConversationId>,
        state: &str,
    ) -> Result<Vec<MemberCheck>, ClientError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(
                "SELECT conversation, handle, device, device_key, identity_key, added_by, welcome, state, why FROM member_checks
                 WHERE state = ?1 AND (?2 IS NULL OR conversation = ?2) ORDER BY rowid",
            )
            .map_err(sql)?;
        let conv = conversation.map(|c| c.as_bytes().to_vec());
        let rows = stmt
            .query_map(params![state, conv], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                ))
            })
            .map_err(sql)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, handle, device, device_key, identity_key, added_by, welcome, state, why) = row.map_err(sql)?;
            let conversation =
                subrosa_proto::ConversationId::from_slice(&id).map_err(|e| ClientError::Store(e.to_string()))?;
            out.push(MemberCheck {
                conversation,
                handle,
                device,
                device_key,
                identity_key,
                added_by,
                welcome,
                state,
                why,
            });
        }
        Ok(out)
    }

    fn set_member_check(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        handle: &str,
        device: &str,
        state: &str,
        why: &str,
    ) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "UPDATE member_checks SET state = ?4, why = ?5 WHERE conversation = ?1 AND handle = ?2 AND device = ?3",
                params![conversation.as_bytes().as_slice(), handle, device, state, why],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn drop_member_check(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        handle: &str,
        device: Option<&str>,
    ) -> Result<usize, ClientError> {
        self.lock()
            .execute(
                "DELETE FROM member_checks WHERE conversation = ?1 AND handle = ?2 AND (?3 IS NULL OR device = ?3)",
                params![conversation.as_bytes().as_slice(), handle, device],
            )
            .map_err(sql)
    }

    fn drop_refused_conversation(&mut self, id: &subrosa_proto::ConversationId) -> Result<(), ClientError> {
        {
            let conn = self.lock();
            let b = id.as_bytes().as_slice();
            for q in [
                "DELETE FROM messages WHERE conversation = ?1",
                "DELETE FROM reactions WHERE conversation = ?1",
                "DELETE FROM receipts WHERE conversation = ?1",
                "DELETE FROM early_actions WHERE conversation = ?1",
                "DELETE FROM receipts_due WHERE conversation = ?1",
                "DELETE FROM member_checks WHERE conversation = ?1",
                "DELETE FROM seq_in WHERE conversation = ?1",
            ] {
                conn.execute(q, [b]).map_err(sql)?;
            }
        }
        self.forget_conversation(id)
    }

    fn forget_conversation(&mut self, id: &subrosa_proto::ConversationId) -> Result<(), ClientError> {
        let conn = self.lock();
        let id = id.as_bytes().as_slice();
        for q in [
            "DELETE FROM conversations WHERE id = ?1",
            "DELETE FROM mls_group WHERE id = ?1",
            "DELETE FROM mls_group_piece WHERE group_id = ?1",
            "DELETE FROM mls_epoch WHERE group_id = ?1",
            "DELETE FROM key_updates WHERE conversation = ?1",
        ] {
            conn.execute(q, [id]).map_err(sql)?;
        }
        // The copy of its last written state goes too (wiped).
        drop(lock(self.written).take(id));
        Ok(())
    }

    fn direct_conversation(&self, peer: &str) -> Result<Option<subrosa_proto::ConversationId>, ClientError> {
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

    fn conversation(&self, id: &subrosa_proto::ConversationId) -> Result<Option<ConversationRow>, ClientError> {
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

    fn conversations_with(&self, peer: &str) -> Result<Vec<ConversationRow>, ClientError> {
        self.conversations_where("kind = 'direct' AND peer = ?1", &[&peer])
    }

    fn conversations_by_prefix(&self, prefix: &str) -> Result<Vec<ConversationRow>, ClientError> {
        let pattern = format!("{prefix}%");
        self.conversations_where("lower(hex(id)) LIKE ?1", &[&pattern])
    }

    fn groups_named(&self, name: &str) -> Result<Vec<ConversationRow>, ClientError> {
        let mut v = self.conversations_where("kind = 'group' AND name = ?1", &[&name])?;
        v.sort_by_key(|c| !c.active);
        Ok(v)
    }

    fn group_rows(&self) -> Result<Vec<ConversationRow>, ClientError> {
        self.conversations_where("kind = 'group'", &[])
    }

    fn active_conversations(&self) -> Result<Vec<ConversationRow>, ClientError> {
        self.conversations_where("active = 1", &[])
    }

    fn set_conversation_name(&mut self, id: &subrosa_proto::ConversationId, name: &str) -> Result<(), ClientError> {
        self.lock()
            .execute("UPDATE conversations SET name = ?2 WHERE id = ?1", params![id.as_bytes().as_slice(), name])
            .map(|_| ())
            .map_err(sql)
    }

    fn deactivate_conversation(&mut self, id: &subrosa_proto::ConversationId) -> Result<(), ClientError> {
        let conn = self.lock();
        let id = id.as_bytes().as_slice();
        conn.execute("UPDATE conversations SET active = 0 WHERE id = ?1", [id]).map_err(sql)?;
        conn.execute("DELETE FROM mls_group WHERE id = ?1", [id]).map_err(sql)?;
        conn.execute("DELETE FROM mls_group_piece WHERE group_id = ?1", [id]).map_err(sql)?;
        conn.execute("DELETE FROM mls_epoch WHERE group_id = ?1", [id]).map_err(sql)?;
        drop(lock(self.written).take(id));
        Ok(())
    }

    fn retire_conversation(&mut self, id: &subrosa_proto::ConversationId) -> Result<(), ClientError> {
        self.lock()
            .execute("UPDATE conversations SET active = 0 WHERE id = ?1", [id.as_bytes().as_slice()])
            .map(|_| ())
            .map_err(sql)
    }

    fn key_update_state(&self, conversation: &subrosa_proto::ConversationId) -> Result<(u64, u64), ClientError> {
        self.lock()
            .query_row(
                "SELECT last_update, sent_since FROM key_updates WHERE conversation = ?1",
                [conversation.as_bytes().as_slice()],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .optional()
            .map(|v| v.unwrap_or((0, 0)))
            .map_err(sql)
    }

    fn note_sent(&mut self, conversation: &subrosa_proto::ConversationId) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO key_updates (conversation, last_update, sent_since) VALUES (?1, 0, 1)
                 ON CONFLICT (conversation) DO UPDATE SET sent_since = sent_since + 1",
                [conversation.as_bytes().as_slice()],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn note_own_update(&mut self, conversation: &subrosa_proto::ConversationId, at_ms: u64) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO key_updates (conversation, last_update, sent_since) VALUES (?1, ?2, 0)
                 ON CONFLICT (conversation) DO UPDATE SET last_update = excluded.last_update, sent_since = 0",
                params![conversation.as_bytes().as_slice(), at_ms as i64],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn note_member_update(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        device: &subrosa_proto::DeviceAddress,
        at_ms: u64,
    ) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO member_updates (conversation, device, at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (conversation, device) DO UPDATE SET at = max(at, excluded.at)",
                params![conversation.as_bytes().as_slice(), device.to_string(), at_ms as i64],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn member_update(
        &self,
        conversation: &subrosa_proto::ConversationId,
        device: &subrosa_proto::DeviceAddress,
    ) -> Result<Option<u64>, ClientError> {
        self.lock()
            .query_row(
                "SELECT at FROM member_updates WHERE conversation = ?1 AND device = ?2",
                params![conversation.as_bytes().as_slice(), device.to_string()],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.map(|t| t as u64))
            .map_err(sql)
    }
}

impl History for SqliteTx<'_> {
    fn next_seq(&mut self, conversation: &subrosa_proto::ConversationId) -> Result<u64, ClientError> {
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

    fn release_seq(&mut self, conversation: &subrosa_proto::ConversationId, seq: u64) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "UPDATE seq_out SET last = last - 1 WHERE conversation = ?1 AND last = ?2",
                params![&conversation.0[..], seq as i64],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn arrived_seq(
        &mut self,
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

    fn insert_message(
        &mut self,
        m: &StoredMessage,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        seen: bool,
    ) -> Result<bool, ClientError> {
        let conn = self.lock();
        let n = conn
            .execute(
                "INSERT INTO messages (conversation, message_id, sender, sender_device, sent_at, received_at, body, outgoing, system, seen, state, event, reply_to, read_at, preview, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16) ON CONFLICT (conversation, message_id) DO NOTHING",
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
                    seen,
                    m.state.map(MessageState::as_str),
                    m.event.as_ref().map(SystemEvent::encode).transpose().map_err(|e| ClientError::Bug(e.to_string()))?,
                    m.reply_to.as_deref().and_then(|h| hex::decode(h).ok()),
                    // This account's own messages and system lines owe nobody a receipt.
                    (m.outgoing || m.system).then_some(m.received_at as i64),
                    m.preview.as_ref().map(|p| p.to_core().to_stored()).transpose()?,
                    m.expires_at.map(|t| t as i64),
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

    fn delete_message(
        &mut self,
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

    fn set_message_expiry(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        expires_at: u64,
    ) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "UPDATE messages SET expires_at = ?3 WHERE conversation = ?1 AND message_id = ?2 AND expires_at IS NULL",
                params![conversation.as_bytes().as_slice(), message_id, expires_at as i64],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn delete_expired(&mut self, now_ms: u64) -> Result<Vec<String>, ClientError> {
        let conn = self.lock();
        let now = now_ms as i64;
        let expired = "SELECT conversation, message_id FROM messages WHERE expires_at IS NOT NULL AND expires_at <= ?1";
        let mut files = Vec::new();
        {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT local FROM attachments WHERE local IS NOT NULL AND (conversation, message_id) IN ({expired})"
                ))
                .map_err(sql)?;
            let rows = stmt.query_map([now], |r| r.get::<_, String>(0)).map_err(sql)?;
            for row in rows {
                files.push(row.map_err(sql)?);
            }
        }
        for table in ["attachments", "reactions", "receipts", "receipts_due"] {
            conn.execute(&format!("DELETE FROM {table} WHERE (conversation, message_id) IN ({expired})"), [now])
                .map_err(sql)?;
        }
        // A message deleted for everyone keeps its row (a "deleted" line),
        // never its files.
        let deleted = "SELECT conversation, message_id FROM messages WHERE deleted = 1";
        {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT local FROM attachments WHERE local IS NOT NULL AND (conversation, message_id) IN ({deleted})"
                ))
                .map_err(sql)?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(sql)?;
            for row in rows {
                files.push(row.map_err(sql)?);
            }
        }
        conn.execute(&format!("DELETE FROM attachments WHERE (conversation, message_id) IN ({deleted})"), [])
            .map_err(sql)?;
        conn.execute("DELETE FROM messages WHERE expires_at IS NOT NULL AND expires_at <= ?1", [now]).map_err(sql)?;
        Ok(files)
    }

    fn history(&self, conversations: &[ConversationRow]) -> Result<Vec<StoredMessage>, ClientError> {
        let conn = self.lock();
        let mut out = Vec::new();
        let mut stmt = conn.prepare(&format!("{MESSAGE_COLUMNS} WHERE conversation = ?1 ORDER BY seq")).map_err(sql)?;
        for c in conversations {
            let rows = stmt.query_map([c.id.as_bytes().as_slice()], |r| message_from_row(r, c, &conn)).map_err(sql)?;
            for row in rows {
                out.push(row.map_err(sql)?);
            }
        }
        out.sort_by_key(|(seq, _)| *seq);
        Ok(out.into_iter().map(|(_, m)| m).collect())
    }

    fn received_after_seq(&self, after_seq: u64, since_ms: u64) -> Result<Vec<(u64, StoredMessage)>, ClientError> {
        let rows: Vec<(i64, Vec<u8>)> = {
            let conn = self.lock();
            let mut stmt = conn
                .prepare("SELECT seq, conversation FROM messages WHERE seq > ?1 AND received_at >= ?2 ORDER BY seq")
                .map_err(sql)?;
            let bound = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            let rows =
                stmt.query_map([bound(after_seq), bound(since_ms)], |r| Ok((r.get(0)?, r.get(1)?))).map_err(sql)?;
            rows.collect::<Result<_, _>>().map_err(sql)?
        };
        let mut conversations: std::collections::HashMap<Vec<u8>, Option<ConversationRow>> =
            std::collections::HashMap::new();
        let mut out = Vec::with_capacity(rows.len());
        for (seq, conv) in rows {
            if !conversations.contains_key(&conv) {
                let id =
                    subrosa_proto::ConversationId::from_slice(&conv).map_err(|e| ClientError::Store(e.to_string()))?;
                let row = self.conversation(&id)?.filter(|r| r.kind != "own");
                conversations.insert(conv.clone(), row);
            }
            let Some(Some(row)) = conversations.get(&conv) else { continue };
            let conn = self.lock();
            let m = conn
                .query_row(&format!("{MESSAGE_COLUMNS} WHERE seq = ?1"), [seq], |r| message_from_row(r, row, &conn))
                .map_err(sql)?;
            out.push((u64::try_from(m.0).unwrap_or(0), m.1));
        }
        Ok(out)
    }

    fn take_unseen(&mut self) -> Result<Vec<StoredMessage>, ClientError> {
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
                .query_row(&format!("{MESSAGE_COLUMNS} WHERE seq = ?1"), [seq], |r| message_from_row(r, &row, &conn))
                .map_err(sql)?;
            conn.execute("UPDATE messages SET seen = 1 WHERE seq = ?1", [seq]).map_err(sql)?;
            out.push(m.1);
        }
        Ok(out)
    }

    fn is_processed(&self, digest: &[u8]) -> Result<bool, ClientError> {
        self.lock()
            .query_row("SELECT 1 FROM processed WHERE digest = ?1", [digest], |_| Ok(()))
            .optional()
            .map(|o| o.is_some())
            .map_err(sql)
    }

    fn mark_processed(&mut self, digest: &[u8]) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO processed (digest, at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![digest, now_ms() as i64],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn set_message_state(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        state: MessageState,
        reason: Option<&str>,
    ) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "UPDATE messages SET state = ?3, state_reason = ?4 WHERE conversation = ?1 AND message_id = ?2",
                params![conversation.as_bytes().as_slice(), message_id, state.as_str(), reason],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn message(
        &self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
    ) -> Result<Option<StoredMessage>, ClientError> {
        let Some(row) = self.conversation(conversation)? else { return Ok(None) };
        let conn = self.lock();
        conn.query_row(
            &format!("{MESSAGE_COLUMNS} WHERE conversation = ?1 AND message_id = ?2"),
            params![conversation.as_bytes().as_slice(), message_id],
            |r| message_from_row(r, &row, &conn),
        )
        .optional()
        .map(|o| o.map(|(_, m)| m))
        .map_err(sql)
    }
}

impl Annotations for SqliteTx<'_> {
    fn set_reaction(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        member: &str,
        emoji: &str,
        on: bool,
        at: u64,
    ) -> Result<(), ClientError> {
        let conn = self.lock();
        let c = conversation.as_bytes().as_slice();
        let stored: Option<(i64, bool)> = conn
            .query_row(
                "SELECT at, removed FROM reactions WHERE conversation = ?1 AND message_id = ?2 AND member = ?3 AND emoji = ?4",
                params![c, message_id, member, emoji],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql)?;
        if let Some((prev_at, removed)) = stored {
            if !subrosa_session::store::reaction_supersedes(at, on, prev_at as u64, !removed) {
                return Ok(());
            }
            if removed != on {
                // The same state, sent later: it keeps its place.
                conn.execute(
                    "UPDATE reactions SET at = ?5 WHERE conversation = ?1 AND message_id = ?2 AND member = ?3 AND emoji = ?4",
                    params![c, message_id, member, emoji, at as i64],
                )
                .map_err(sql)?;
                return Ok(());
            }
            // Changed: a reaction added again comes last, as a new one.
            conn.execute(
                "DELETE FROM reactions WHERE conversation = ?1 AND message_id = ?2 AND member = ?3 AND emoji = ?4",
                params![c, message_id, member, emoji],
            )
            .map_err(sql)?;
        }
        conn.execute(
            "INSERT INTO reactions (conversation, message_id, member, emoji, at, removed) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![c, message_id, member, emoji, at as i64, !on],
        )
        .map_err(sql)?;
        conn.execute("UPDATE messages SET seen = 0 WHERE conversation = ?1 AND message_id = ?2", params![c, message_id])
            .map(|_| ())
            .map_err(sql)
    }

    fn edit_message(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        text: &str,
        at: u64,
    ) -> Result<bool, ClientError> {
        self.lock()
            .execute(
                "UPDATE messages SET body = ?3, edited_at = ?4, seen = 0 WHERE conversation = ?1 AND message_id = ?2
                 AND deleted = 0 AND (edited_at IS NULL OR edited_at <= ?4)",
                params![conversation.as_bytes().as_slice(), message_id, text, at as i64],
            )
            .map(|n| n > 0)
            .map_err(sql)
    }

    fn erase_message(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
    ) -> Result<(), ClientError> {
        // `secure_delete` is on: the old text is overwritten in the file,
        // not only unlinked.
        let conn = self.lock();
        let c = conversation.as_bytes().as_slice();
        for q in [
            "UPDATE messages SET body = '', preview = NULL, deleted = 1, seen = 0 WHERE conversation = ?1 AND message_id = ?2",
            "DELETE FROM reactions WHERE conversation = ?1 AND message_id = ?2",
            "DELETE FROM early_actions WHERE conversation = ?1 AND target = ?2",
        ] {
            conn.execute(q, params![c, message_id]).map_err(sql)?;
        }
        Ok(())
    }

    fn mark_unseen(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
    ) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "UPDATE messages SET seen = 0 WHERE conversation = ?1 AND message_id = ?2",
                params![conversation.as_bytes().as_slice(), message_id],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn set_recipients(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        members: &[String],
    ) -> Result<(), ClientError> {
        let json = serde_json::to_string(members).map_err(|e| ClientError::Bug(e.to_string()))?;
        self.lock()
            .execute(
                "UPDATE messages SET recipients = ?3 WHERE conversation = ?1 AND message_id = ?2",
                params![conversation.as_bytes().as_slice(), message_id, json],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn add_receipt(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        member: &str,
        kind: subrosa_core::content::ReceiptKind,
        at: u64,
    ) -> Result<(), ClientError> {
        // A read receipt is never replaced by a delivery receipt.
        self.lock()
            .execute(
                "INSERT INTO receipts (conversation, message_id, member, state, at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (conversation, message_id, member) DO UPDATE SET state = excluded.state, at = excluded.at
                 WHERE receipts.state <> 'read'",
                params![conversation.as_bytes().as_slice(), message_id, member, receipt_name(kind), at as i64],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn push_early_action(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        target: &[u8],
        action: &EarlyAction,
    ) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO early_actions (conversation, target, sender, device, content) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![conversation.as_bytes().as_slice(), target, action.from, action.device, action.content],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn early_actions_from(
        &self,
        conversation: &subrosa_proto::ConversationId,
        sender: &str,
    ) -> Result<usize, ClientError> {
        let n: i64 = self
            .lock()
            .query_row(
                "SELECT COUNT(*) FROM early_actions WHERE conversation = ?1 AND sender = ?2",
                params![conversation.as_bytes().as_slice(), sender],
                |r| r.get(0),
            )
            .map_err(sql)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn take_early_actions(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        target: &[u8],
    ) -> Result<Vec<EarlyAction>, ClientError> {
        let conn = self.lock();
        let c = conversation.as_bytes().as_slice();
        let actions = {
            let mut stmt = conn
                .prepare("SELECT sender, device, content FROM early_actions WHERE conversation = ?1 AND target = ?2 ORDER BY seq")
                .map_err(sql)?;
            let rows = stmt
                .query_map(params![c, target], |r| {
                    Ok(EarlyAction { from: r.get(0)?, device: r.get(1)?, content: r.get(2)? })
                })
                .map_err(sql)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(sql)?
        };
        conn.execute("DELETE FROM early_actions WHERE conversation = ?1 AND target = ?2", params![c, target])
            .map_err(sql)?;
        Ok(actions)
    }

    fn push_receipt_due(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8; 16],
        author: &str,
        kind: subrosa_core::content::ReceiptKind,
    ) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO receipts_due (conversation, message_id, author, kind) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                params![conversation.as_bytes().as_slice(), message_id.as_slice(), author, receipt_name(kind)],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn take_receipts_due(&mut self) -> Result<Vec<ReceiptDue>, ClientError> {
        let conn = self.lock();
        let rows: Vec<(Vec<u8>, Vec<u8>, String, String)> = {
            let mut stmt = conn
                .prepare("SELECT conversation, message_id, author, kind FROM receipts_due ORDER BY seq")
                .map_err(sql)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).map_err(sql)?;
            rows.collect::<Result<_, _>>().map_err(sql)?
        };
        conn.execute("DELETE FROM receipts_due", []).map_err(sql)?;
        let mut out: Vec<ReceiptDue> = Vec::new();
        for (c, m, author, kind) in rows {
            // A damaged row owes nothing.
            let (Ok(conversation), Ok(id), Some(kind)) = (
                subrosa_proto::ConversationId::from_slice(&c),
                <[u8; 16]>::try_from(m.as_slice()),
                receipt_kind(&kind),
            ) else {
                continue;
            };
            match out.iter_mut().find(|d| d.conversation == conversation && d.author == author && d.kind == kind) {
                Some(d) => d.ids.push(id),
                None => out.push(ReceiptDue { conversation, author, kind, ids: vec![id] }),
            }
        }
        Ok(out)
    }

    fn mark_read(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        at: u64,
    ) -> Result<Vec<([u8; 16], String)>, ClientError> {
        let conn = self.lock();
        let c = conversation.as_bytes().as_slice();
        let rows: Vec<(Vec<u8>, String)> = {
            let mut stmt = conn
                .prepare(
                    "SELECT message_id, sender FROM messages WHERE conversation = ?1 AND read_at IS NULL ORDER BY seq",
                )
                .map_err(sql)?;
            let rows = stmt.query_map([c], |r| Ok((r.get(0)?, r.get(1)?))).map_err(sql)?;
            rows.collect::<Result<_, _>>().map_err(sql)?
        };
        conn.execute(
            "UPDATE messages SET read_at = ?2 WHERE conversation = ?1 AND read_at IS NULL",
            params![c, at as i64],
        )
        .map_err(sql)?;
        Ok(rows.into_iter().filter_map(|(m, from)| Some((<[u8; 16]>::try_from(m.as_slice()).ok()?, from))).collect())
    }
}

impl Outbox for SqliteTx<'_> {
    fn push_outbox_request(&mut self, send_id: &[u8; 16], request: &[u8]) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO outbox (send_id, request, created_at) VALUES (?1, ?2, ?3)",
                params![&send_id[..], request, now_ms() as i64],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn push_outbox(
        &mut self,
        send_id: &[u8; 16],
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8; 16],
        content: &[u8],
    ) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO outbox (send_id, conversation, message_id, content, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![&send_id[..], conversation.as_bytes().as_slice(), &message_id[..], content, now_ms() as i64],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn outbox(&self) -> Result<Vec<QueuedSend>, ClientError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!("{OUTBOX_COLUMNS} ORDER BY id")).map_err(sql)?;
        let rows = stmt.query_map([], queued_from_row).map_err(sql)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(sql)?.map_err(ClientError::Store)?);
        }
        Ok(out)
    }

    fn outbox_row(&self, id: i64) -> Result<Option<QueuedSend>, ClientError> {
        self.lock()
            .query_row(&format!("{OUTBOX_COLUMNS} WHERE id = ?1"), [id], queued_from_row)
            .optional()
            .map_err(sql)?
            .transpose()
            .map_err(ClientError::Store)
    }

    fn outbox_is_empty(&self) -> Result<bool, ClientError> {
        self.lock().query_row("SELECT NOT EXISTS (SELECT 1 FROM outbox)", [], |r| r.get(0)).map_err(sql)
    }

    fn set_outbox_request(&mut self, id: i64, request: &[u8]) -> Result<(), ClientError> {
        self.lock()
            .execute("UPDATE outbox SET request = ?2 WHERE id = ?1", params![id, request])
            .map(|_| ())
            .map_err(sql)
    }

    fn pop_outbox(&mut self, id: i64) -> Result<(), ClientError> {
        self.lock().execute("DELETE FROM outbox WHERE id = ?1", [id]).map(|_| ()).map_err(sql)
    }

    fn set_pending_commit_by_reference(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        send_id: &[u8; 16],
        by_reference: &ByReference,
    ) -> Result<bool, ClientError> {
        let n = self
            .lock()
            .execute(
                "UPDATE pending_commits SET by_reference = ?3, uploaded_at = ?4, reuse_until = ?5
                 WHERE conversation = ?1 AND send_id = ?2",
                params![
                    conversation.as_bytes().as_slice(),
                    &send_id[..],
                    by_reference.request,
                    by_reference.uploaded_at_ms as i64,
                    by_reference.reuse_until_ms as i64
                ],
            )
            .map_err(sql)?;
        Ok(n == 1)
    }

    fn put_pending_commit(&mut self, p: &PendingCommit) -> Result<(), ClientError> {
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

    fn pending_commit(
        &self,
        conversation: &subrosa_proto::ConversationId,
    ) -> Result<Option<PendingCommit>, ClientError> {
        self.lock()
            .query_row(
                "SELECT send_id, request, commit_digest, meta, by_reference, uploaded_at, reuse_until
                 FROM pending_commits WHERE conversation = ?1",
                [conversation.as_bytes().as_slice()],
                |r| {
                    let by_reference = match (r.get(4)?, r.get::<_, Option<i64>>(5)?, r.get::<_, Option<i64>>(6)?) {
                        (Some(request), Some(at), Some(until)) => Some(ByReference {
                            request,
                            uploaded_at_ms: at.max(0) as u64,
                            reuse_until_ms: until.max(0) as u64,
                        }),
                        _ => None,
                    };
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        by_reference,
                    ))
                },
            )
            .optional()
            .map_err(sql)?
            .map(|(send_id, request, commit_digest, meta, by_reference)| {
                Ok(PendingCommit {
                    conversation: *conversation,
                    send_id: send_id
                        .try_into()
                        .map_err(|_| ClientError::Store("pending commit: bad send id".into()))?,
                    request,
                    commit_digest,
                    meta,
                    by_reference,
                })
            })
            .transpose()
    }

    fn pending_commit_conversations(&self) -> Result<Vec<subrosa_proto::ConversationId>, ClientError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare("SELECT conversation FROM pending_commits ORDER BY created_at, rowid").map_err(sql)?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).map_err(sql)?;
        let ids: Vec<Vec<u8>> = rows.collect::<Result<_, _>>().map_err(sql)?;
        ids.iter()
            .map(|b| subrosa_proto::ConversationId::from_slice(b).map_err(|e| ClientError::Store(e.to_string())))
            .collect()
    }

    fn delete_pending_commit(&mut self, conversation: &subrosa_proto::ConversationId) -> Result<(), ClientError> {
        self.lock()
            .execute("DELETE FROM pending_commits WHERE conversation = ?1", [conversation.as_bytes().as_slice()])
            .map(|_| ())
            .map_err(sql)
    }
}

impl MlsState for SqliteTx<'_> {
    fn mark_newest_key_package_last_resort(&mut self) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "UPDATE mls_key_package SET last_resort = 1 WHERE rowid = (SELECT max(rowid) FROM mls_key_package)",
                [],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn erase_key_packages_before(&mut self, cutoff_ms: u64) -> Result<usize, ClientError> {
        let conn = self.lock();
        let n = conn.execute("DELETE FROM mls_key_package WHERE created_at < ?1", [cutoff_ms as i64]).map_err(sql)?;
        // One last-resort package per suite, made together: the newest
        // `SUITES.len()` stay marked.
        conn.execute(
            "UPDATE mls_key_package SET last_resort = 0 WHERE last_resort = 1
               AND rowid NOT IN
                 (SELECT rowid FROM mls_key_package WHERE last_resort = 1 ORDER BY rowid DESC LIMIT ?1)",
            [subrosa_core::SUITES.len() as i64],
        )
        .map_err(sql)?;
        Ok(n)
    }

    fn group_state(&self, group_id: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError> {
        self.group_state_row(group_id)
    }

    fn group_state_version(&self, group_id: &[u8]) -> Result<Option<subrosa_core::StateVersion>, ClientError> {
        use sha2::Digest as _;
        // The list of pieces (their hashes and lengths, in order) names
        // the state; reading it reads no piece.
        let list = stored_piece_list(&self.lock(), group_id)?;
        Ok(list.map(|list| sha2::Sha256::digest(&list).into()))
    }

    fn group_epoch(&self, group_id: &[u8], epoch: u64) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError> {
        self.lock()
            .query_row(
                "SELECT data FROM mls_epoch WHERE group_id = ?1 AND epoch = ?2",
                params![group_id, epoch as i64],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()
            .map(|o| o.map(Zeroizing::new))
            .map_err(sql)
    }

    fn max_group_epoch(&self, group_id: &[u8]) -> Result<Option<u64>, ClientError> {
        self.lock()
            .query_row("SELECT max(epoch) FROM mls_epoch WHERE group_id = ?1", [group_id], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map(|o| o.map(|v| v as u64))
            .map_err(sql)
    }

    fn put_group_state(&mut self, group_id: &[u8], state: &[u8], epochs: &[(u64, &[u8])]) -> Result<(), ClientError> {
        let conn = self.lock();
        write_group_pieces(&conn, Some(self.written), group_id, state)?;
        conn.execute(
            "INSERT INTO known_conversations (id, at) VALUES (?1, ?2)
             ON CONFLICT (id) DO UPDATE SET linked_only = 0",
            params![group_id, now_ms() as i64],
        )
        .map_err(sql)?;
        for (epoch, data) in epochs {
            conn.execute(
                "INSERT INTO mls_epoch (group_id, epoch, data) VALUES (?1, ?2, ?3)
                 ON CONFLICT (group_id, epoch) DO UPDATE SET data = excluded.data",
                params![group_id, *epoch as i64, data],
            )
            .map_err(sql)?;
        }
        conn.execute(
            "DELETE FROM mls_epoch WHERE group_id = ?1 AND epoch <= (SELECT max(epoch) FROM mls_epoch WHERE group_id = ?1) - ?2",
            params![group_id, EPOCHS_KEPT as i64],
        )
        .map_err(sql)?;
        Ok(())
    }

    fn key_package(&self, id: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError> {
        self.lock()
            .query_row("SELECT data FROM mls_key_package WHERE id = ?1", [id], |r| r.get::<_, Vec<u8>>(0))
            .optional()
            .map(|o| o.map(Zeroizing::new))
            .map_err(sql)
    }

    fn put_key_package(&mut self, id: &[u8], data: &[u8]) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "INSERT INTO mls_key_package (id, data, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET data = excluded.data",
                params![id, data, now_ms() as i64],
            )
            .map(|_| ())
            .map_err(sql)
    }

    fn delete_key_package(&mut self, id: &[u8]) -> Result<(), ClientError> {
        self.lock()
            .execute("DELETE FROM mls_key_package WHERE id = ?1 AND last_resort = 0", [id])
            .map(|_| ())
            .map_err(sql)
    }
}

/// The SQLCipher `PRAGMA key` statement for a raw key. The key's hex form
/// is a secret as much as the key: it is built in place, in buffers that are
/// allocated once (no growth leaves a copy behind) and wiped on drop.
fn key_pragma(key: &[u8; 32]) -> Zeroizing<String> {
    const HEAD: &str = "PRAGMA key = \"x'";
    const TAIL: &str = "'\";";
    let mut hex_form = Zeroizing::new([0u8; 64]);
    let mut pragma = Zeroizing::new(String::with_capacity(HEAD.len() + 64 + TAIL.len()));
    pragma.push_str(HEAD);
    if hex::encode_to_slice(key, hex_form.as_mut()).is_ok() {
        for &b in hex_form.iter() {
            pragma.push(char::from(b));
        }
    }
    pragma.push_str(TAIL);
    pragma
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if path.is_dir() { 0o700 } else { 0o600 };
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}
#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) {}

const ATTACHMENT_COLUMNS: &str =
    "SELECT conversation, message_id, idx, blob, key, sha256, size, name, media_type, state, reason, local, saved \
     FROM attachments";

fn attachment_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<AttachmentRow>> {
    let conversation: Vec<u8> = r.get(0)?;
    let blob: Vec<u8> = r.get(3)?;
    let key: Zeroizing<Vec<u8>> = Zeroizing::new(r.get(4)?);
    let sha256: Vec<u8> = r.get(5)?;
    let state: String = r.get(9)?;
    let (Ok(conversation), Ok(blob), Ok(key), Ok(sha256), Some(state)) = (
        subrosa_proto::ConversationId::from_slice(&conversation),
        <[u8; 16]>::try_from(blob.as_slice()),
        <[u8; 32]>::try_from(key.as_slice()),
        <[u8; 32]>::try_from(sha256.as_slice()),
        AttachmentState::parse(&state, r.get(10)?),
    ) else {
        return Ok(None);
    };
    Ok(Some(AttachmentRow {
        conversation,
        message_id: r.get(1)?,
        index: r.get(2)?,
        file: subrosa_core::attachment::AttachedFile {
            blob,
            key: Zeroizing::new(key),
            sha256,
            size: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
            name: r.get(7)?,
            media_type: r.get(8)?,
        },
        state,
        local: r.get(11)?,
        saved: r.get(12)?,
    }))
}

impl SqliteTx<'_> {
    fn attachments_where(
        &self,
        filter: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<AttachmentRow>, ClientError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!("{ATTACHMENT_COLUMNS} WHERE {filter} ORDER BY rowid")).map_err(sql)?;
        let rows = stmt.query_map(args, attachment_from_row).map_err(sql)?;
        let mut out = Vec::new();
        for row in rows {
            match row.map_err(sql)? {
                Some(a) => out.push(a),
                None => return Err(ClientError::Store("an attachment row is not valid".into())),
            }
        }
        Ok(out)
    }
}

impl AttachmentStore for SqliteTx<'_> {
    fn put_attachments(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        files: &[subrosa_core::attachment::AttachedFile],
        state: AttachmentState,
    ) -> Result<(), ClientError> {
        let conn = self.lock();
        let mut insert = conn
            .prepare(
                "INSERT OR IGNORE INTO attachments
                 (conversation, message_id, idx, blob, key, sha256, size, name, media_type, state, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )
            .map_err(sql)?;
        for (index, f) in (0u32..).zip(files) {
            insert
                .execute(rusqlite::params![
                    &conversation.0[..],
                    message_id,
                    index,
                    &f.blob[..],
                    &f.key[..],
                    &f.sha256[..],
                    i64::try_from(f.size).unwrap_or(i64::MAX),
                    f.name,
                    f.media_type,
                    state.as_str(),
                    state.reason(),
                ])
                .map_err(sql)?;
        }
        Ok(())
    }

    fn attachments_of(
        &self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
    ) -> Result<Vec<AttachmentRow>, ClientError> {
        self.attachments_where("conversation = ?1 AND message_id = ?2", &[&&conversation.0[..], &message_id])
    }

    fn attachments_in(&self, conversation: &subrosa_proto::ConversationId) -> Result<Vec<AttachmentRow>, ClientError> {
        self.attachments_where("conversation = ?1", &[&&conversation.0[..]])
    }

    fn pending_attachments(&self) -> Result<Vec<AttachmentRow>, ClientError> {
        self.attachments_where("state = 'pending'", &[])
    }

    fn unsaved_attachments(&self) -> Result<Vec<AttachmentRow>, ClientError> {
        self.attachments_where("state = 'stored' AND saved IS NULL", &[])
    }

    fn set_attachment(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        index: u32,
        state: &AttachmentState,
        local: Option<&str>,
        saved: Option<&str>,
    ) -> Result<(), ClientError> {
        self.lock()
            .execute(
                "UPDATE attachments SET state = ?4, reason = ?5, local = COALESCE(?6, local), saved = COALESCE(?7, saved)
                 WHERE conversation = ?1 AND message_id = ?2 AND idx = ?3",
                rusqlite::params![&conversation.0[..], message_id, index, state.as_str(), state.reason(), local, saved],
            )
            .map(|_| ())
            .map_err(sql)
    }
}

/// Every table, index and trigger of `conn` as SQLite keeps its text, with
/// the schema version: what a schema snapshot compares.
#[cfg(test)]
fn schema_text(conn: &Connection) -> String {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
    let mut q = conn
        .prepare("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type, name")
        .expect("query");
    let rows = q
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
        .expect("rows");
    let mut out = format!("-- user_version {version}\n");
    for row in rows {
        let (kind, name, sql) = row.expect("row");
        out.push_str(&format!("\n-- {kind} {name}\n{sql};\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mls_rs_core::key_package::KeyPackageStorage;
    use std::sync::Arc;
    use subrosa_core::{DeviceIdentity, Engine};
    use subrosa_session::store::conformance;

    macro_rules! conformance_tests {
        ($($name:ident),* $(,)?) => {
            $(
                #[test]
                fn $name() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    conformance::$name(Store::create(&dir.path().join("home"), "pw").expect("store"));
                }
            )*
        };
    }

    subrosa_session::with_behaviours!(conformance_tests);

    /// Bytes that look like a group's state to a chunker: no pattern.
    fn noise(len: usize, seed: u8) -> Vec<u8> {
        use sha2::Digest as _;
        (0..len.div_ceil(32) as u32)
            .flat_map(|i| sha2::Sha256::digest([&[seed][..], &i.to_be_bytes()].concat()))
            .take(len)
            .collect()
    }

    /// A new store, as the raw SQLite store and the `Store` over it.
    fn piece_store() -> (tempfile::TempDir, Arc<SqliteStore>, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let sqlite = Arc::new(SqliteStore::create(&dir.path().join("home"), "pw").expect("store"));
        let store = Store::from_arc(sqlite.clone());
        (dir, sqlite, store)
    }

    /// How many pieces of the group's state the store holds.
    fn piece_rows(sqlite: &SqliteStore, id: &[u8]) -> i64 {
        sqlite
            .lock()
            .query_row("SELECT count(*) FROM mls_group_piece WHERE group_id = ?1", [id], |r| r.get(0))
            .expect("count")
    }

    /// The group's state as stored, if any.
    fn stored_state(store: &Store, id: &[u8]) -> Option<Vec<u8>> {
        store.read(|tx| tx.group_state(id)).expect("read").map(|s| s.to_vec())
    }

    /// A group's state is stored in content-defined pieces, each once under
    /// its SHA-256, and a list naming them in order. Bytes inserted early in
    /// the state (a leaf added to the tree) cost the pieces around them,
    /// not every piece after them; the pieces no longer named go.
    #[test]
    fn a_group_state_is_stored_in_pieces_and_an_insertion_writes_only_the_pieces_around_it() {
        let (_dir, sqlite, store) = piece_store();
        let id = [5u8; 16];
        let written = |state: &[u8]| write_group_pieces(&sqlite.lock(), None, &id, state).expect("written");
        let rows = || piece_rows(&sqlite, &id);
        let list = || -> Vec<(Vec<u8>, usize)> {
            let list = stored_piece_list(&sqlite.lock(), &id).expect("read").expect("list");
            piece_list(&list).expect("list").map(|(h, l)| (h.to_vec(), l)).collect()
        };
        let read = || stored_state(&store, &id);

        let mut state = noise(1_000_000, 1);
        let first = written(&state);
        let pieces = list();
        assert_eq!(first, pieces.len());
        assert_eq!(rows(), pieces.len() as i64);
        assert!((40..=100).contains(&pieces.len()), "about 16 KiB each: {}", pieces.len());
        assert_eq!(pieces.iter().map(|(_, l)| l).sum::<usize>(), state.len());
        assert!(pieces.iter().all(|(_, l)| (PIECE_MIN..=PIECE_MAX).contains(l) || *l == pieces[pieces.len() - 1].1));
        let empty: i64 = sqlite
            .lock()
            .query_row("SELECT length(state) FROM mls_group WHERE id = ?1", [&id[..]], |r| r.get(0))
            .expect("row");
        assert_eq!(empty, 0, "the group's row holds no state of its own");
        assert_eq!(read(), Some(state.clone()));
        assert_eq!(written(&state), 0, "nothing changed");

        // 1,200 bytes (a post-quantum leaf) inserted a tenth of the way in.
        state.splice(100_000..100_000, noise(1200, 2));
        let after_insert = written(&state);
        assert!((1..=3).contains(&after_insert), "the pieces around the insertion only: {after_insert}");
        assert_eq!(rows(), list().len() as i64, "the piece it replaced is gone");
        assert_eq!(read(), Some(state.clone()));

        // A change at the end (the ratchets) writes the last piece only.
        *state.last_mut().expect("bytes") ^= 1;
        assert_eq!(written(&state), 1);
        // Shorter: the pieces past the end go.
        state.truncate(70_000);
        assert!(written(&state) <= 1);
        assert_eq!(rows(), list().len() as i64);
        assert_eq!(read(), Some(state.clone()));

        // A piece the state holds twice is stored once and named twice.
        let twice: Vec<u8> = [noise(70_000, 3), noise(70_000, 3)].concat();
        written(&twice);
        assert!(list().len() > rows() as usize, "{} named, {} stored", list().len(), rows());
        assert_eq!(read(), Some(twice));

        assert_eq!(store.read(|tx| tx.group_state(&[6u8; 16])).expect("read"), None);
        // A piece gone from under its list is a clear error, not a wrong state.
        sqlite
            .lock()
            .execute("DELETE FROM mls_group_piece WHERE rowid = (SELECT max(rowid) FROM mls_group_piece)", [])
            .expect("delete");
        let err = store.read(|tx| tx.group_state(&id)).expect_err("damaged");
        assert!(err.to_string().contains("a piece is missing"), "{err}");
        // A list claiming more than memory holds (30 pieces of 4 GiB) is an
        // error too, not an abort on allocating it.
        let huge: Vec<u8> = (0..30).flat_map(|_| [[0u8; 32].as_slice(), &u32::MAX.to_be_bytes()].concat()).collect();
        sqlite
            .lock()
            .execute("UPDATE mls_group SET pieces = ?2 WHERE id = ?1", params![&id[..], huge])
            .expect("damage");
        let err = store.read(|tx| tx.group_state(&id)).expect_err("damaged");
        assert!(err.to_string().contains("group state"), "{err}");
    }

    /// The store keeps a copy of the state it last wrote, and the next
    /// write compares with it instead of hashing the unchanged pieces
    /// again. The copy may name pieces the database never kept (its
    /// transaction rolled back): the next write still stores every piece
    /// its list names, since it asks the database which it holds.
    #[test]
    fn a_write_after_a_rolled_back_one_stores_every_piece_it_names() {
        let (_dir, sqlite, store) = piece_store();
        let id = [9u8; 16];
        let put = |state: &[u8]| store.write(|tx| tx.put_group_state(&id, state, &[])).expect("written");
        let read = || stored_state(&store, &id);
        let stored_list = || stored_piece_list(&sqlite.lock(), &id).expect("read").expect("list");
        let rows_and_names = || -> (i64, usize) {
            let list = stored_list();
            let names: std::collections::HashSet<&[u8]> = piece_list(&list).expect("list").map(|(h, _)| h).collect();
            (piece_rows(&sqlite, &id), names.len())
        };

        let a = noise(600_000, 11);
        put(&a);
        {
            let kept = lock(&sqlite.written);
            assert_eq!(kept.entries.len(), 1);
            assert_eq!(kept.entries[0].state.as_slice(), a.as_slice());
            assert_eq!(kept.entries[0].list, stored_list(), "the copy names what it holds");
        }
        // B, 200 KB of new bytes in the middle, written and abandoned.
        let mut b = a.clone();
        b.splice(300_000..300_000, noise(200_000, 12));
        let abandoned: Result<(), ClientError> = store.write(|tx| {
            tx.put_group_state(&id, &b, &[])?;
            Err(ClientError::Store("abandoned".into()))
        });
        assert!(abandoned.is_err());
        assert_eq!(read(), Some(a.clone()), "the database still holds A");
        // C is B with its last byte changed: most of its pieces are B's,
        // which the copy knows and the database never kept.
        let mut c = b.clone();
        *c.last_mut().expect("bytes") ^= 1;
        put(&c);
        assert_eq!(read(), Some(c.clone()));
        let (rows, names) = rows_and_names();
        assert_eq!(rows, names as i64, "every piece named is stored, and nothing else");
        put(&a);
        assert_eq!(read(), Some(a));
    }

    /// The copies of written states stay within their budget, the most
    /// recent kept; a state larger than the budget is not copied.
    #[test]
    fn the_copies_of_written_states_stay_within_their_budget() {
        let mut kept = WrittenStates::default();
        let big = vec![1u8; 30 << 20];
        for g in 0..3u8 {
            kept.put(&[g], vec![g], &big, None);
        }
        let groups: Vec<&[u8]> = kept.entries.iter().map(|e| e.group_id.as_slice()).collect();
        assert_eq!(groups, [[1u8].as_slice(), &[2u8]], "the oldest went");
        let again = kept.take(&[2]);
        assert!(again.is_some() && kept.take(&[2]).is_none());
        kept.put(&[2], vec![2], &big[..1000], again);
        assert_eq!(kept.entries.last().map(|e| e.state.len()), Some(1000));
        kept.put(&[3], vec![3], &vec![0u8; WRITTEN_STATES_BYTES + 1], None);
        assert!(kept.take(&[3]).is_none(), "too large to copy");
    }

    /// A write that reuses the stored list's unchanged pieces cuts the
    /// state exactly where a scan of the whole state would: after changes
    /// at the start, in the middle, at the end, insertions, deletions,
    /// truncations and extensions, and over pieces forced to their largest
    /// size (a run of zeros has no content cut).
    #[test]
    fn cutting_from_the_stored_pieces_cuts_where_a_whole_scan_does() {
        use sha2::Digest as _;
        let list = |cuts: &[Piece<'_>]| hex::encode(encode_piece_list(cuts));
        let whole = |state: &[u8]| list(&cut_state(state, &[], None).expect("cut"));
        let mut seed = 0u64;
        let mut next = |bound: usize| -> usize {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as usize) % bound.max(1)
        };
        let mut state = [noise(300_000, 7), vec![0u8; 200_000], noise(100_000, 8)].concat();
        let mut stored = whole(&state);
        for round in 0..300 {
            let before = state.clone();
            let at = match round % 3 {
                0 => next(state.len()),
                1 => state.len().saturating_sub(next(40_000)),
                _ => next(70_000).min(state.len()),
            };
            match next(5) {
                0 => state.splice(at..at, noise(1 + next(3_000), round as u8)).for_each(drop),
                1 => state.drain(at..(at + 1 + next(3_000)).min(state.len())).for_each(drop),
                2 if !state.is_empty() => {
                    let i = at.min(state.len() - 1);
                    state[i] ^= 1 + next(255) as u8;
                }
                3 => state.truncate(state.len().saturating_sub(next(20_000))),
                _ => state.extend(noise(next(20_000), round as u8)),
            }
            let old = hex::decode(&stored).expect("hex");
            // Hashing the stored pieces, or comparing with the state they
            // name (the store's copy of its last write): the same cuts.
            let cuts = cut_state(&state, &old, None).expect("cut");
            let compared = cut_state(&state, &old, Some(&before)).expect("cut");
            assert!(cuts.iter().all(|(h, p)| *h == <[u8; 32]>::from(sha2::Sha256::digest(p))));
            assert!(compared.iter().all(|(h, p)| *h == <[u8; 32]>::from(sha2::Sha256::digest(p))));
            assert_eq!(cuts.iter().map(|(_, p)| p.len()).sum::<usize>(), state.len());
            let again = list(&cuts);
            assert_eq!(again, whole(&state), "round {round}");
            assert_eq!(list(&compared), again, "round {round}, compared");
            stored = again;
        }
        // The first byte of a piece changed: the cut before it read that
        // byte, so the piece before it is cut again too.
        let stored = whole(&state);
        let starts: Vec<usize> = cut_state(&state, &[], None)
            .expect("cut")
            .iter()
            .scan(0, |at, (_, p)| {
                *at += p.len();
                Some(*at)
            })
            .collect();
        for &at in &starts[..starts.len() - 1] {
            let mut changed = state.clone();
            changed[at] ^= 0x5A;
            let old = hex::decode(&stored).expect("hex");
            let cuts = cut_state(&changed, &old, None).expect("cut");
            assert_eq!(list(&cuts), whole(&changed), "piece at {at}");
            let compared = cut_state(&changed, &old, Some(&state)).expect("cut");
            assert_eq!(list(&compared), whole(&changed), "piece at {at}, compared");
        }
        // A damaged list is refused, not trusted.
        assert!(cut_state(&state, &[0u8; 35], None).is_err());
    }

    /// The stored form of a group's state, pinned: the list of pieces
    /// (SHA-256 and big-endian length of each) and where FastCDC cut a
    /// known state. A change of either is a visible decision (the cuts
    /// only decide what a write costs; the list decides what reads).
    #[test]
    fn group_state_pieces_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sqlite = SqliteStore::create(&dir.path().join("home"), "pw").expect("store");
        let id = [5u8; 16];
        write_group_pieces(&sqlite.lock(), None, &id, b"state").expect("written");
        let list = stored_piece_list(&sqlite.lock(), &id).expect("read").expect("list");
        assert_eq!(
            hex::encode(&list),
            // SHA-256("state"), then 5 as a big-endian u32.
            "4ba69735ca53765ed6a709edb56c6ea236b7193a3b29a6b390c346f0f4340e4e00000005",
        );
        write_group_pieces(&sqlite.lock(), None, &id, &noise(300_000, 1)).expect("written");
        let list = stored_piece_list(&sqlite.lock(), &id).expect("read").expect("list");
        let cuts: Vec<usize> = piece_list(&list).expect("list").map(|(_, l)| l).collect();
        assert_eq!(
            cuts,
            [
                24126, 6105, 11755, 16457, 7331, 24062, 16728, 24450, 7407, 23397, 15201, 39859, 7585, 19352, 14516,
                18108, 20357, 3204
            ]
        );
    }

    fn count(store: &SqliteStore) -> i64 {
        store.lock().query_row("SELECT count(*) FROM mls_key_package", [], |r| r.get(0)).unwrap_or(-1)
    }

    #[test]
    fn the_last_resort_key_package_survives_use_and_one_time_ones_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sqlite = Arc::new(SqliteStore::create(&dir.path().join("home"), "pw").expect("store"));
        let store = Store::from_arc(sqlite.clone());
        let crypto = subrosa_core::default_crypto();
        let id = DeviceIdentity::generate(&crypto, "alice".parse().expect("handle"), 0).expect("identity");
        let engine = Engine::new(crypto, id, store.groups(), store.key_packages());
        engine.generate_key_package().expect("one-time");
        engine.generate_key_package().expect("last resort");
        store.write(|tx| tx.mark_newest_key_package_last_resort()).expect("mark");
        let ids: Vec<(Vec<u8>, bool)> = {
            let conn = sqlite.lock();
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
        assert_eq!(count(&sqlite), 1);
        assert!(KeyPackageStorage::get(&kps, &ids[1].0).expect("get").is_some());
    }

    /// A fork recorded by the first release from unsigned heads was never
    /// proven: the migration turns it into an alert naming the server, and
    /// nothing blocks sending any more.
    #[test]
    fn an_old_unproven_fork_becomes_an_alert_and_stops_blocking() {
        let step = SCHEMA.iter().position(|s| s.contains("CREATE TABLE kt_head_gossip")).expect("the step");
        let conn = Connection::open_in_memory().expect("db");
        for s in &SCHEMA[..step] {
            conn.execute_batch(s).expect("older steps");
        }
        conn.execute("INSERT INTO meta (key, value) VALUES ('kt_fork', ?1)", [b"the server showed bob X".as_slice()])
            .expect("fork");
        conn.execute("INSERT INTO kt_gossip (epoch, root, source) VALUES (3, ?1, 'bob')", [[7u8; 32].as_slice()])
            .expect("gossip");
        conn.execute_batch(SCHEMA[step]).expect("the step runs");
        let forks: i64 =
            conn.query_row("SELECT count(*) FROM meta WHERE key = 'kt_fork'", [], |r| r.get(0)).expect("q");
        assert_eq!(forks, 0);
        let (text, concerns, kind): (String, String, String) = conn
            .query_row("SELECT text, concerns, kind FROM alerts", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("one alert");
        assert!(text.contains("the server showed bob X") && text.contains("sending is allowed again"), "{text}");
        assert_eq!((concerns.as_str(), kind.as_str()), ("the server", "notice"));
        let gossip: i64 = conn.query_row("SELECT count(*) FROM kt_gossip", [], |r| r.get(0)).expect("q");
        assert_eq!(gossip, 0, "unsigned heads are no evidence");
    }

    /// The whole schema a new store gets, as SQLite keeps it: a change (a
    /// migration added, or one edited in place, which stores already
    /// migrated would never run) is a visible decision. After a deliberate
    /// change, `SUBROSA_WRITE_SNAPSHOTS=1 cargo test -p subrosa-client
    /// schema_snapshot` writes the file again; review its diff.
    #[test]
    fn schema_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::create(&dir.path().join("home"), "pw").expect("store");
        let schema = schema_text(&store.lock());
        if std::env::var_os("SUBROSA_WRITE_SNAPSHOTS").is_some() {
            // A deliberate change: written, not compared (the compiled-in
            // copy is the old one); review the file's diff.
            let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/schema.sql");
            std::fs::write(&file, &schema).expect("write the snapshot");
            return;
        }
        assert!(
            schema == include_str!("schema.sql"),
            "the client store's schema changed: if deliberate, write src/store/schema.sql again \
             (SUBROSA_WRITE_SNAPSHOTS=1) and review its diff"
        );
    }

    /// A home for a store of passphrase "pw" (its `kdf.json` written, no
    /// database yet), and the store key: for stores made as an older
    /// release left them (`migrate_to`).
    fn home_of_passphrase_pw() -> (tempfile::TempDir, std::path::PathBuf, Zeroizing<[u8; 32]>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).expect("home");
        let kdf = KdfParams::new_random();
        std::fs::write(home.join(KDF_FILE), serde_json::to_vec(&kdf).expect("json")).expect("kdf");
        let key = kdf.derive("pw").expect("key");
        (dir, home, key)
    }

    /// v19: a staged commit stored before (its request perhaps already
    /// rewritten with a reference, as v18's release did) reads back as it
    /// was, with no form by reference beside it: it is posted as it is.
    #[test]
    fn a_pending_commit_of_v18_survives_the_migration_as_it_was() {
        let (_dir, home, key) = home_of_passphrase_pw();
        let conv = subrosa_proto::ConversationId([5; 16]);
        {
            let old = SqliteStore::open_with_key(&home, &key).expect("open");
            old.migrate_to(18).expect("v18");
            old.lock()
                .execute(
                    "INSERT INTO pending_commits (conversation, send_id, request, commit_digest, meta, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 1)",
                    params![&conv.0[..], &[6u8; 16][..], b"a request by reference".as_slice(), &[7u8; 32][..], b"m"],
                )
                .expect("row");
        }
        let store = Store::from_arc(Arc::new(SqliteStore::open(&home, "pw").expect("migrates")));
        let got = store.read(|tx| tx.pending_commit(&conv)).expect("read").expect("kept");
        assert_eq!(
            (got.send_id, got.request.as_slice(), got.meta.as_slice()),
            ([6; 16], &b"a request by reference"[..], &b"m"[..])
        );
        assert!(got.by_reference.is_none());
    }

    #[test]
    fn outbox_rows_of_v4_survive_the_migration_byte_for_byte_and_old_sends_read_as_sent() {
        let (_dir, home, key) = home_of_passphrase_pw();
        // A store as the previous release (schema v4) left it: two sends
        // whose answers never came, and a message it had sent.
        let requests: [&[u8]; 2] = [b"{\"conversation\":\"first request\"}", b"second request \x00\xff"];
        {
            let old = SqliteStore::open_with_key(&home, &key).expect("open");
            old.migrate_to(4).expect("v4");
            let conn = old.lock();
            for (i, r) in requests.iter().enumerate() {
                conn.execute(
                    "INSERT INTO outbox (send_id, request, created_at) VALUES (?1, ?2, ?3)",
                    params![vec![i as u8; 16], r, 10 - i as i64],
                )
                .expect("outbox row");
            }
            conn.execute(
                "INSERT INTO conversations (id, kind, name, peer, created_at, last_activity) VALUES (?1, 'direct', '', 'bob', 1, 1)",
                [&[7u8; 16][..]],
            )
            .expect("conversation");
            conn.execute(
                "INSERT INTO messages (conversation, message_id, sender, sender_device, sent_at, received_at, body, outgoing)
                 VALUES (?1, ?2, 'alice', '00', 1, 1, 'old', 1)",
                params![&[7u8; 16][..], &[1u8; 16][..]],
            )
            .expect("message");
        }
        let sqlite = Arc::new(SqliteStore::open(&home, "pw").expect("migrates"));
        let store = Store::from_arc(sqlite.clone());
        let queued = store.read(|tx| tx.outbox()).expect("outbox");
        // In the order v4 would have sent them (created_at), bytes untouched.
        let got: Vec<(Vec<u8>, Option<Vec<u8>>)> =
            queued.iter().map(|q| (q.send_id.to_vec(), q.request.clone())).collect();
        assert_eq!(got, [(vec![1u8; 16], Some(requests[1].to_vec())), (vec![0u8; 16], Some(requests[0].to_vec()))]);
        assert!(queued.iter().all(|q| q.message.is_none() && q.content.is_none()));
        let conv =
            store.read(|tx| tx.conversation(&subrosa_proto::ConversationId([7; 16]))).expect("row").expect("exists");
        let h = store.read(|tx| tx.history(&[conv])).expect("history");
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].state, Some(MessageState::Sent));
        // A new row needs its content (or a request): the schema says so.
        let bad = sqlite.lock().execute("INSERT INTO outbox (send_id, created_at) VALUES (?1, 1)", [&[9u8; 16][..]]);
        assert!(bad.is_err(), "a row with neither content nor request is refused");
    }

    #[test]
    fn a_store_of_v9_gains_typed_system_lines_the_received_index_previous_keys_and_receipts() {
        let (_dir, home, key) = home_of_passphrase_pw();
        // As the release before typed system lines left it: a contact whose
        // key changed once, and a system line written as English.
        {
            let old = SqliteStore::open_with_key(&home, &key).expect("open");
            old.migrate_to(9).expect("v9");
            let conn = old.lock();
            conn.execute(
                "INSERT INTO contacts (handle, identity_key, added_at) VALUES ('bob', ?1, 1)",
                [&[1u8; 32][..]],
            )
            .expect("contact");
            conn.execute(
                "INSERT INTO conversations (id, kind, name, peer, created_at, last_activity) VALUES (?1, 'direct', '', 'bob', 1, 1)",
                [&[7u8; 16][..]],
            )
            .expect("conversation");
            conn.execute(
                "INSERT INTO messages (conversation, message_id, sender, sender_device, sent_at, received_at, body, outgoing, system)
                 VALUES (?1, ?2, 'bob', '00', 1, 1, 'bob''s identity key changed', 0, 1)",
                params![&[7u8; 16][..], &[1u8; 16][..]],
            )
            .expect("message");
            conn.execute(
                "INSERT INTO messages (conversation, message_id, sender, sender_device, sent_at, received_at, body, outgoing, system)
                 VALUES (?1, ?2, 'bob', '00', 2, 2, 'an old hello', 0, 0)",
                params![&[7u8; 16][..], &[2u8; 16][..]],
            )
            .expect("message");
        }
        // A group's state as one row, before v17 cut it into pieces.
        let group_state: Vec<u8> = (0..150_000u32).map(|i| (i % 253) as u8).collect();
        {
            let old = SqliteStore::open_with_key(&home, &key).expect("open");
            old.lock()
                .execute("INSERT INTO mls_group (id, state) VALUES (?1, ?2)", params![&[7u8; 16][..], &group_state])
                .expect("group");
        }
        let sqlite = Arc::new(SqliteStore::open(&home, "pw").expect("migrates"));
        let version: i64 = sqlite.lock().query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
        assert_eq!(version, SCHEMA.len() as i64);
        let store = Store::from_arc(sqlite.clone());
        // v17 cut the state into fixed pieces, v20 into content-defined
        // ones: the same state, read from them, and already stored as the
        // next write would store it; v17's table is gone.
        let read = store.read(|tx| tx.group_state(&[7u8; 16])).expect("read").expect("kept");
        assert_eq!(read.as_slice(), group_state.as_slice());
        assert_eq!(write_group_pieces(&sqlite.lock(), None, &[7u8; 16], &group_state).expect("written"), 0);
        let v17: i64 = sqlite
            .lock()
            .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'mls_group_chunk'", [], |r| r.get(0))
            .expect("q");
        assert_eq!(v17, 0);
        // v10: the old line has no event and shows as written.
        let conv =
            store.read(|tx| tx.conversation(&subrosa_proto::ConversationId([7; 16]))).expect("row").expect("exists");
        let h = store.read(|tx| tx.history(&[conv])).expect("history");
        assert_eq!((h[0].text.as_str(), h[0].system, h[0].event.clone()), ("bob's identity key changed", true, None));
        // v11: replay by time finds it.
        assert_eq!(store.read(|tx| tx.received_after_seq(0, 0)).expect("since").len(), 2);
        // v13: an old message is no reply, unedited, and counts as read
        // (no read receipt is owed for history from before receipts).
        let hello = &h[1];
        assert_eq!((hello.reply_to.clone(), hello.edited, hello.deleted), (None, false, false));
        let id = subrosa_proto::ConversationId([7; 16]);
        assert!(store.write(|tx| tx.mark_read(&id, 3)).expect("read").is_empty());
        // v12: no previous key until the next change, which records it.
        assert_eq!(store.read(|tx| tx.contact_previous_key("bob")).expect("previous"), None);
        store.write(|tx| tx.change_contact_key("bob", &[2; 32])).expect("change");
        assert_eq!(store.read(|tx| tx.contact_previous_key("bob")).expect("previous"), Some(vec![1; 32]));
    }

    #[test]
    fn history_json_objects_carry_state_for_own_messages_only() {
        // The command-line contract (`history --json`, `receive --json`): a snapshot.
        let mut m = StoredMessage {
            id: "00".repeat(16),
            conversation: "11".repeat(16),
            target: "bob".into(),
            from: "alice".into(),
            device: "22".repeat(8),
            sent_at: 1,
            received_at: 2,
            text: "hi".into(),
            outgoing: true,
            state: Some(MessageState::Failed),
            reason: Some("server refused (too_large): at most 1 recipients per part".into()),
            ..StoredMessage::default()
        };
        assert_eq!(
            serde_json::to_string(&m).expect("json"),
            format!(
                "{{\"id\":\"{}\",\"conversation\":\"{}\",\"target\":\"bob\",\"group\":false,\"from\":\"alice\",\
                 \"device\":\"{}\",\"sent_at\":1,\"received_at\":2,\"text\":\"hi\",\"outgoing\":true,\"system\":false,\
                 \"state\":\"failed\",\"reason\":\"server refused (too_large): at most 1 recipients per part\"}}",
                "00".repeat(16),
                "11".repeat(16),
                "22".repeat(8)
            )
        );
        m.state = Some(MessageState::Queued);
        m.reason = None;
        assert!(serde_json::to_string(&m).expect("json").ends_with(",\"system\":false,\"state\":\"queued\"}"));
        m.outgoing = false;
        m.state = None;
        assert!(serde_json::to_string(&m).expect("json").ends_with(",\"system\":false}"));
        // A system line carries its typed event.
        let line = StoredMessage {
            text: "bob left".into(),
            system: true,
            event: Some(SystemEvent::Left { member: "bob".into() }),
            ..StoredMessage::default()
        };
        assert!(serde_json::to_string(&line).expect("json").ends_with(
            r#","text":"bob left","outgoing":false,"system":true,"event":{"event":"left","member":"bob"}}"#
        ));
        // Replies, edits, deletes, reactions and receipts: the fields and
        // their names (absent when there is nothing to say).
        let annotated = StoredMessage {
            text: "now".into(),
            outgoing: true,
            state: Some(MessageState::Delivered),
            reply_to: Some("33".repeat(16)),
            edited: true,
            deleted: false,
            reactions: vec![crate::store::Reaction { emoji: "+1".into(), from: vec!["bob".into(), "carol".into()] }],
            receipts: vec![
                crate::store::MemberReceipt { member: "bob".into(), state: MessageState::Read },
                crate::store::MemberReceipt { member: "carol".into(), state: MessageState::Delivered },
            ],
            ..StoredMessage::default()
        };
        assert!(serde_json::to_string(&annotated).expect("json").ends_with(&format!(
            r#","text":"now","outgoing":true,"system":false,"state":"delivered","reply_to":"{}","edited":true,"reactions":[{{"emoji":"+1","from":["bob","carol"]}}],"receipts":[{{"member":"bob","state":"read"}},{{"member":"carol","state":"delivered"}}]}}"#,
            "33".repeat(16)
        )));
        let deleted = StoredMessage { deleted: true, ..StoredMessage::default() };
        assert!(serde_json::to_string(&deleted).expect("json").ends_with(r#","system":false,"deleted":true}"#));
    }

    #[test]
    fn the_key_pragma_is_the_hex_of_the_key() {
        let key = [0xabu8; 32];
        assert_eq!(*key_pragma(&key), format!("PRAGMA key = \"x'{}'\";", "ab".repeat(32)));
    }

    #[test]
    fn a_wrong_passphrase_opens_nothing_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        Store::create(&home, "right").expect("store").write(|tx| tx.set_meta("k", b"v")).expect("meta");
        assert!(matches!(Store::open(&home, "wrong"), Err(ClientError::WrongPassphrase)));
        let store = Store::open(&home, "right").expect("opens");
        assert_eq!(store.read(|tx| tx.meta("k")).expect("meta").map(|v| v.to_vec()), Some(b"v".to_vec()));
    }
}

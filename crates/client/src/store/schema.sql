-- user_version 20

-- index attachments_state
CREATE INDEX attachments_state ON attachments (state);

-- index conversations_peer
CREATE INDEX conversations_peer ON conversations (peer);

-- index early_actions_target
CREATE INDEX early_actions_target ON early_actions (conversation, target);

-- index messages_expiry
CREATE INDEX messages_expiry ON messages (expires_at) WHERE expires_at IS NOT NULL;

-- index messages_received
CREATE INDEX messages_received ON messages (received_at);

-- index messages_unseen
CREATE INDEX messages_unseen ON messages (seen) WHERE seen = 0;

-- table alerts
CREATE TABLE alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, text TEXT NOT NULL UNIQUE, shown INTEGER NOT NULL DEFAULT 0, concerns TEXT, kind TEXT NOT NULL DEFAULT 'notice', proof TEXT, cleared INTEGER NOT NULL DEFAULT 0);

-- table attachments
CREATE TABLE attachments (conversation BLOB NOT NULL, message_id BLOB NOT NULL, idx INTEGER NOT NULL,
        blob BLOB NOT NULL, key BLOB NOT NULL, sha256 BLOB NOT NULL, size INTEGER NOT NULL, name TEXT NOT NULL,
        media_type TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, local TEXT, saved TEXT,
        PRIMARY KEY (conversation, message_id, idx));

-- table contacts
CREATE TABLE contacts (handle TEXT PRIMARY KEY, identity_key BLOB NOT NULL, verified INTEGER NOT NULL DEFAULT 0, added_at INTEGER NOT NULL, key_change_pending INTEGER NOT NULL DEFAULT 0, previous_key BLOB);

-- table conversations
CREATE TABLE conversations (id BLOB PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, peer TEXT, created_at INTEGER NOT NULL, last_activity INTEGER NOT NULL, active INTEGER NOT NULL DEFAULT 1);

-- table early_actions
CREATE TABLE early_actions (seq INTEGER PRIMARY KEY AUTOINCREMENT, conversation BLOB NOT NULL, target BLOB NOT NULL,
        sender TEXT NOT NULL, device TEXT NOT NULL, content BLOB NOT NULL);

-- table key_updates
CREATE TABLE key_updates (conversation BLOB PRIMARY KEY, last_update INTEGER NOT NULL, sent_since INTEGER NOT NULL DEFAULT 0);

-- table known_conversations
CREATE TABLE known_conversations (id BLOB PRIMARY KEY, at INTEGER NOT NULL, linked_only INTEGER NOT NULL DEFAULT 0);

-- table kt_gossip
CREATE TABLE kt_gossip (epoch INTEGER NOT NULL, root BLOB NOT NULL, source TEXT NOT NULL, PRIMARY KEY (epoch, root, source));

-- table kt_head_gossip
CREATE TABLE kt_head_gossip (source TEXT PRIMARY KEY, epoch INTEGER NOT NULL, head BLOB NOT NULL);

-- table kt_roots
CREATE TABLE kt_roots (epoch INTEGER PRIMARY KEY, root BLOB NOT NULL);

-- table kt_signed_heads
CREATE TABLE kt_signed_heads (epoch INTEGER PRIMARY KEY, head BLOB NOT NULL);

-- table member_checks
CREATE TABLE member_checks (conversation BLOB NOT NULL, handle TEXT NOT NULL, device TEXT NOT NULL,
        device_key BLOB NOT NULL, identity_key BLOB NOT NULL, added_by TEXT NOT NULL, welcome INTEGER NOT NULL,
        state TEXT NOT NULL, why TEXT NOT NULL DEFAULT '', PRIMARY KEY (conversation, handle, device));

-- table member_updates
CREATE TABLE member_updates (conversation BLOB NOT NULL, device TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (conversation, device));

-- table messages
CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, conversation BLOB NOT NULL, message_id BLOB NOT NULL,
        sender TEXT NOT NULL, sender_device TEXT NOT NULL, sent_at INTEGER NOT NULL, received_at INTEGER NOT NULL,
        body TEXT NOT NULL, outgoing INTEGER NOT NULL, system INTEGER NOT NULL DEFAULT 0, seen INTEGER NOT NULL DEFAULT 1, state TEXT, state_reason TEXT, event TEXT, reply_to BLOB, edited_at INTEGER, deleted INTEGER NOT NULL DEFAULT 0, recipients TEXT, read_at INTEGER, expires_at INTEGER, preview BLOB, UNIQUE (conversation, message_id));

-- table meta
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);

-- table mls_epoch
CREATE TABLE mls_epoch (group_id BLOB NOT NULL, epoch INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (group_id, epoch));

-- table mls_group
CREATE TABLE mls_group (id BLOB PRIMARY KEY, state BLOB NOT NULL, pieces BLOB NOT NULL DEFAULT x'');

-- table mls_group_piece
CREATE TABLE mls_group_piece (group_id BLOB NOT NULL, hash BLOB NOT NULL, data BLOB NOT NULL,
        PRIMARY KEY (group_id, hash));

-- table mls_key_package
CREATE TABLE mls_key_package (id BLOB PRIMARY KEY, data BLOB NOT NULL, last_resort INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL DEFAULT 0);

-- table outbox
CREATE TABLE "outbox" (id INTEGER PRIMARY KEY AUTOINCREMENT, send_id BLOB NOT NULL UNIQUE,
        conversation BLOB, message_id BLOB, content BLOB, request BLOB, created_at INTEGER NOT NULL,
        CHECK (request IS NOT NULL OR (conversation IS NOT NULL AND message_id IS NOT NULL AND content IS NOT NULL)));

-- table past_members
CREATE TABLE past_members (conversation BLOB NOT NULL, handle TEXT NOT NULL, PRIMARY KEY (conversation, handle));

-- table pending_commits
CREATE TABLE pending_commits (conversation BLOB PRIMARY KEY, send_id BLOB NOT NULL, request BLOB NOT NULL,
        commit_digest BLOB NOT NULL, meta BLOB NOT NULL, created_at INTEGER NOT NULL, by_reference BLOB, uploaded_at INTEGER, reuse_until INTEGER);

-- table processed
CREATE TABLE processed (digest BLOB PRIMARY KEY, at INTEGER NOT NULL);

-- table reactions
CREATE TABLE reactions (conversation BLOB NOT NULL, message_id BLOB NOT NULL, member TEXT NOT NULL,
        emoji TEXT NOT NULL, at INTEGER NOT NULL, seq INTEGER PRIMARY KEY AUTOINCREMENT, removed INTEGER NOT NULL DEFAULT 0,
        UNIQUE (conversation, message_id, member, emoji));

-- table receipts
CREATE TABLE receipts (conversation BLOB NOT NULL, message_id BLOB NOT NULL, member TEXT NOT NULL,
        state TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (conversation, message_id, member));

-- table receipts_due
CREATE TABLE receipts_due (seq INTEGER PRIMARY KEY AUTOINCREMENT, conversation BLOB NOT NULL, message_id BLOB NOT NULL,
        author TEXT NOT NULL, kind TEXT NOT NULL, UNIQUE (conversation, message_id, kind));

-- table seq_in
CREATE TABLE seq_in (conversation BLOB NOT NULL, device TEXT NOT NULL, last INTEGER NOT NULL, PRIMARY KEY (conversation, device));

-- table seq_out
CREATE TABLE seq_out (conversation BLOB PRIMARY KEY, last INTEGER NOT NULL);

-- table sqlite_sequence
CREATE TABLE sqlite_sequence(name,seq);

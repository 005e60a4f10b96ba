-- 11 migrations

-- index blobs_by_expiry
CREATE INDEX blobs_by_expiry ON blobs(expires_at);

-- index blobs_by_owner
CREATE INDEX blobs_by_owner ON blobs(owner);

-- index conversation_members_by_device
CREATE INDEX conversation_members_by_device ON conversation_members(device);

-- index inbox_by_device
CREATE INDEX inbox_by_device ON inbox(device, id);

-- index inbox_by_message
CREATE INDEX inbox_by_message ON inbox(message);

-- index inbox_by_time
CREATE INDEX inbox_by_time ON inbox(created_at);

-- index key_packages_by_device
CREATE INDEX key_packages_by_device ON key_packages(device, id);

-- index key_packages_by_device_suite
CREATE INDEX key_packages_by_device_suite ON key_packages(device, suite, id);

-- index links_by_expiry
CREATE INDEX links_by_expiry ON links(expires_at);

-- index messages_by_expiry
CREATE INDEX messages_by_expiry ON messages(expires_at) WHERE expires_at IS NOT NULL;

-- index nonces_by_time
CREATE INDEX nonces_by_time ON nonces(timestamp);

-- index send_ids_by_time
CREATE INDEX send_ids_by_time ON send_ids(created_at);

-- table accounts
CREATE TABLE accounts (
        handle TEXT PRIMARY KEY,
        identity_key BLOB NOT NULL,
        created_at INTEGER NOT NULL
    );

-- table blob_pieces
CREATE TABLE blob_pieces (
        id INTEGER PRIMARY KEY,
        blob INTEGER NOT NULL REFERENCES blobs(id),
        start INTEGER NOT NULL,
        data BLOB NOT NULL,
        UNIQUE (blob, start)
    );

-- table blob_readers
CREATE TABLE blob_readers (
        blob INTEGER NOT NULL REFERENCES blobs(id),
        device INTEGER NOT NULL REFERENCES devices(id),
        fetched INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (blob, device)
    ) WITHOUT ROWID;

-- table blobs
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

-- table claim_windows
CREATE TABLE claim_windows (
        claimer TEXT NOT NULL,
        target TEXT NOT NULL,
        window_start INTEGER NOT NULL,
        claims INTEGER NOT NULL,
        PRIMARY KEY (claimer, target)
    ) WITHOUT ROWID;

-- table conversation_members
CREATE TABLE conversation_members (
        conversation BLOB NOT NULL,
        device INTEGER NOT NULL REFERENCES devices(id),
        PRIMARY KEY (conversation, device)
    ) WITHOUT ROWID;

-- table conversations
CREATE TABLE conversations (
        id BLOB PRIMARY KEY,
        epoch INTEGER NOT NULL
    , has_roster INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;

-- table device_usage
CREATE TABLE device_usage (
        device INTEGER PRIMARY KEY REFERENCES devices(id),
        bytes INTEGER NOT NULL
    );

-- table devices
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

-- table inbox
CREATE TABLE inbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device INTEGER NOT NULL REFERENCES devices(id),
        message INTEGER NOT NULL REFERENCES messages(id),
        created_at INTEGER NOT NULL
    );

-- table key_packages
CREATE TABLE key_packages (
        id INTEGER PRIMARY KEY,
        device INTEGER NOT NULL REFERENCES devices(id),
        data BLOB NOT NULL
    , suite INTEGER NOT NULL DEFAULT 1);

-- table kt_epochs
CREATE TABLE kt_epochs (
        epoch INTEGER PRIMARY KEY,
        root_hash BLOB NOT NULL
    );

-- table kt_records
CREATE TABLE kt_records (
        key BLOB PRIMARY KEY,
        value BLOB NOT NULL
    ) WITHOUT ROWID;

-- table kt_signed_heads
CREATE TABLE kt_signed_heads (
        epoch INTEGER PRIMARY KEY,
        head BLOB NOT NULL
    );

-- table kt_signing
CREATE TABLE kt_signing (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        private_key BLOB NOT NULL,
        directory_id BLOB NOT NULL
    );

-- table kt_values
CREATE TABLE kt_values (
        label BLOB NOT NULL,
        epoch INTEGER NOT NULL,
        version INTEGER NOT NULL,
        value BLOB NOT NULL,
        node_label_val BLOB NOT NULL,
        node_label_len INTEGER NOT NULL,
        PRIMARY KEY (label, epoch)
    ) WITHOUT ROWID;

-- table kt_vrf
CREATE TABLE kt_vrf (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        private_key BLOB NOT NULL
    );

-- table last_resort_packages
CREATE TABLE "last_resort_packages" (
        device INTEGER NOT NULL REFERENCES devices(id),
        suite INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (device, suite)
    );

-- table links
CREATE TABLE links (
        id INTEGER PRIMARY KEY,
        link BLOB NOT NULL UNIQUE,
        handle TEXT NOT NULL REFERENCES accounts(handle),
        request BLOB NOT NULL,
        response BLOB,
        expires_at INTEGER NOT NULL
    );

-- table messages
CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation BLOB NOT NULL,
        sender INTEGER NOT NULL REFERENCES devices(id),
        kind TEXT NOT NULL,
        ciphertext BLOB NOT NULL,
        created_at INTEGER NOT NULL
    , roster BLOB, expires_at INTEGER);

-- table nonces
CREATE TABLE nonces (
        handle TEXT NOT NULL,
        device_id TEXT NOT NULL,
        nonce TEXT NOT NULL,
        timestamp INTEGER NOT NULL,
        PRIMARY KEY (handle, device_id, nonce)
    ) WITHOUT ROWID;

-- table relay_key
CREATE TABLE relay_key (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        key BLOB NOT NULL
    );

-- table send_ids
CREATE TABLE send_ids (
        device INTEGER NOT NULL REFERENCES devices(id),
        send_id BLOB NOT NULL,
        epoch INTEGER,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (device, send_id)
    ) WITHOUT ROWID;

-- table sqlite_sequence
CREATE TABLE sqlite_sequence(name,seq);

//! Storage behind one trait.
//!
//! Every piece of state that a second server node sharing the same database
//! would need lives behind [`Store`]: accounts, devices, key packages, nonces
//! of signed requests, send ids, conversation epochs, inboxes and link slots. Only
//! per-node conveniences (socket wake-ups, rate-limit buckets) live in memory.
//!
//! The store never reads the clock: callers hand in `now_ms` (milliseconds
//! since the Unix epoch), so tests are deterministic.

use async_trait::async_trait;
use subrosa_proto::{
    AccountInfo, BlobId, ClaimResponse, ConversationId, DeviceAddress, DeviceId, DeviceRecord, Envelope, Epoch, Handle,
    KeyPackageCount, LinkId, SendRequest,
};

mod batch;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

/// A schema snapshot's check: `actual` (the schema a new database gets)
/// against `committed` (the file `file` below the crate, compiled in). With
/// `SUBROSA_WRITE_SNAPSHOTS` set it writes `actual` to the file instead, for
/// a deliberate change, and passes: review the file's diff.
#[cfg(test)]
pub(crate) fn check_schema_snapshot(file: &str, committed: &str, actual: &str) {
    if std::env::var_os("SUBROSA_WRITE_SNAPSHOTS").is_some() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        std::fs::write(&path, actual).expect("write the snapshot");
        return;
    }
    assert!(
        actual == committed,
        "the schema changed: if deliberate, write {file} again (SUBROSA_WRITE_SNAPSHOTS=1) and review its diff"
    );
}
pub mod kt;
pub mod postgres;
mod rules;
mod sqlite;
mod sqlite_kt;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Why a storage operation failed: either an answer about the data (a taken
/// handle, a stale epoch) or a failure of the backend itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The handle is taken.
    #[error("handle taken")]
    HandleTaken,
    /// The account already has a device with this id.
    #[error("device id taken")]
    DeviceTaken,
    /// No account has this handle.
    #[error("unknown handle")]
    UnknownHandle,
    /// No active device has this address.
    #[error("unknown device {0}")]
    UnknownDevice(DeviceAddress),
    /// No device of the handle has a key package.
    #[error("no key package")]
    NoKeyPackage,
    /// The device already holds as many one-time key packages as allowed.
    #[error("too many key packages stored")]
    TooManyKeyPackages,
    /// The account already has [`MAX_DEVICES_PER_ACCOUNT`] active devices.
    #[error("too many devices")]
    TooManyDevices,
    /// The device is the account's last active device and cannot be removed.
    #[error("last device")]
    LastDevice,
    /// No link slot has this id, it expired, or it belongs to another account.
    #[error("unknown link")]
    UnknownLink,
    /// A link slot with this id exists already (pick another random id).
    #[error("link id taken")]
    LinkTaken,
    /// The link slot has been approved already.
    #[error("link already approved")]
    LinkAlreadyApproved,
    /// A commit was made for an epoch that is not the conversation's current one.
    #[error("stale epoch, current is {}", current.0)]
    StaleEpoch {
        /// The conversation's current epoch.
        current: Epoch,
    },
    /// The sending device is not in the conversation's roster.
    #[error("not a member of the conversation")]
    NotAMember,
    /// A key-set replacement that does not list exactly the account's
    /// active devices, or changes another device's signature key.
    #[error("invalid key set: {0}")]
    KeySet(&'static str),
    /// The send would take its device's, or its account's, undelivered
    /// ciphertext past the [`Quota`].
    #[error("{scope} quota of {limit} bytes of undelivered messages reached")]
    QuotaExceeded {
        /// Whose quota.
        scope: QuotaScope,
        /// The quota, in bytes.
        limit: u64,
    },
    /// The blob would be larger than the server's maximum blob size.
    #[error("a blob may be at most {limit} bytes")]
    BlobTooLarge {
        /// The maximum, in bytes.
        limit: u64,
    },
    /// The blob would take its uploader's account past its blob quota.
    #[error("the account's quota of {limit} bytes of stored attachments is reached")]
    BlobQuotaExceeded {
        /// The quota, in bytes.
        limit: u64,
    },
    /// A blob (even an expired, not yet swept one) has this id.
    #[error("blob id taken")]
    BlobTaken,
    /// No such blob for this device (see [`Store::create_blob`]).
    #[error("unknown blob")]
    UnknownBlob,
    /// An upload piece does not start at the blob's received bytes.
    #[error("the upload is at byte {received}")]
    BlobOffset {
        /// Bytes received so far.
        received: u64,
    },
    /// An upload piece would go past the blob's declared size.
    #[error("more bytes than the blob's declared size of {size}")]
    BlobOverrun {
        /// The declared size.
        size: u64,
    },
    /// The blob is not complete (finish before every byte, or a download
    /// before the finish).
    #[error("the blob is not complete")]
    BlobIncomplete,
    /// The backend is unreachable or busy; the operation may succeed later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The backend failed, or holds data it should not (a bug in us).
    #[error("storage failure: {0}")]
    Internal(String),
}

/// The one rule for replacing an account's keys ([`Store::replace_keys`]),
/// shared by every backend: `new` lists exactly the devices of `current`;
/// only `caller` may change its signature key; certificates change for
/// every device only with the identity key. Returns the devices whose key
/// packages are now stale.
///
/// # Errors
/// [`StoreError::KeySet`].
pub fn check_key_set(
    current: &AccountInfo,
    caller: &DeviceAddress,
    identity_key: &[u8],
    new: &[DeviceRecord],
) -> Result<Vec<DeviceId>, StoreError> {
    if identity_key.is_empty() || identity_key.len() > 256 {
        return Err(StoreError::KeySet("the identity key must be 1 to 256 bytes"));
    }
    let mut ids: Vec<DeviceId> = new.iter().map(|d| d.device_id).collect();
    ids.sort();
    ids.dedup();
    let mut have: Vec<DeviceId> = current.devices.iter().map(|d| d.device_id).collect();
    have.sort();
    if ids.len() != new.len() || ids != have {
        return Err(StoreError::KeySet("the key set must list exactly the account's active devices"));
    }
    let rotated = identity_key != current.identity_key.as_slice();
    let mut stale = Vec::new();
    for d in new {
        let old = current
            .devices
            .iter()
            .find(|o| o.device_id == d.device_id)
            .ok_or(StoreError::KeySet("the key set must list exactly the account's active devices"))?;
        if d.signature_key.is_empty() || d.signature_key.len() > 256 || d.certificate.len() > 4096 {
            return Err(StoreError::KeySet("a device key or certificate has an invalid size"));
        }
        let own = d.device_id == caller.device;
        if d.signature_key != old.signature_key && !own {
            return Err(StoreError::KeySet("only a device itself may change its signature key"));
        }
        if d.certificate != old.certificate && !own && !rotated {
            return Err(StoreError::KeySet("another device's certificate changes only with the identity key"));
        }
        if rotated || d != old {
            stale.push(d.device_id);
        }
    }
    Ok(stale)
}

/// Which key package a claim hands out of each device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimKind {
    /// A one-time package, or the last-resort one when none is left.
    OneTime,
    /// The last-resort package, or a one-time one for a device without a
    /// last-resort package: for a claim past its target's one-time budget,
    /// which must not drain the target's one-time packages yet must still
    /// reach every device.
    LastResortFirst,
    /// [`ClaimKind::OneTime`] while the requester's account has made fewer
    /// than [`ONE_TIME_CLAIMS_PER_CLAIMER`] claims that drew one-time
    /// packages of this target in the current window ([`CLAIM_WINDOW_MS`],
    /// which starts at the first claim; now is `now_ms`), and counts the
    /// claim when it drew one; else [`ClaimKind::LastResortFirst`]. So one
    /// claimer cannot spend the target's shared budget alone. A claim of the
    /// requester's own account's packages is [`ClaimKind::OneTime`].
    Counted {
        /// The time, ms since the Unix epoch.
        now_ms: u64,
    },
}

/// Claims drawing one-time packages that one account may make of another's
/// in one [`CLAIM_WINDOW_MS`] (each takes one package of every device);
/// past them it gets last-resort packages (see [`ClaimKind::Counted`]).
pub const ONE_TIME_CLAIMS_PER_CLAIMER: u64 = 2;
/// The window of [`ONE_TIME_CLAIMS_PER_CLAIMER`]: an hour.
pub const CLAIM_WINDOW_MS: u64 = 3_600_000;

/// Whose stored bytes a [`StoreError::QuotaExceeded`] counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaScope {
    /// The sending device's.
    Device,
    /// All the devices of the sender's account together.
    Account,
}

impl std::fmt::Display for QuotaScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuotaScope::Device => "device",
            QuotaScope::Account => "account",
        })
    }
}

/// How many bytes of ciphertext a sender may have stored and not yet
/// delivered.
///
/// The rule (both backends keep it inside the send's transaction; the
/// conformance suite checks it): a message's ciphertext counts once, for
/// the device that sent it, whatever its number of recipients, from the
/// send until the message row goes (its last recipient acknowledged it,
/// the recipients were removed, or it expired). A send is refused with
/// [`StoreError::QuotaExceeded`] when it would take the device's total past
/// `device_bytes`, or the total of all the account's devices (removed ones
/// included: what they sent is still stored) past `account_bytes`. A
/// duplicate send is answered before the check and costs nothing. Checked
/// after membership and the epoch guard, before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Most undelivered bytes one device may have sent; `u64::MAX`: no limit.
    pub device_bytes: u64,
    /// Most undelivered bytes one account's devices may have sent together.
    pub account_bytes: u64,
}

impl Quota {
    /// No quota.
    pub const UNLIMITED: Quota = Quota { device_bytes: u64::MAX, account_bytes: u64::MAX };

    /// Whether a sender whose device and account already have `device` and
    /// `account` bytes stored may store `incoming` more.
    ///
    /// # Errors
    /// [`StoreError::QuotaExceeded`] naming the first quota it would pass.
    pub fn check(&self, device: u64, account: u64, incoming: u64) -> Result<(), StoreError> {
        if device.saturating_add(incoming) > self.device_bytes {
            return Err(StoreError::QuotaExceeded { scope: QuotaScope::Device, limit: self.device_bytes });
        }
        if account.saturating_add(incoming) > self.account_bytes {
            return Err(StoreError::QuotaExceeded { scope: QuotaScope::Account, limit: self.account_bytes });
        }
        Ok(())
    }
}

/// The bytes a send stores (its parts' ciphertexts, each once).
pub(crate) fn send_bytes(request: &SendRequest) -> u64 {
    request.parts.iter().map(|p| p.ciphertext.len() as u64).fold(0, u64::saturating_add)
}

/// One check of a shared token bucket: `rate` tokens a second refill it up
/// to `burst`; a check takes `cost` tokens when it holds them, and a charge
/// (`debt`) takes them anyway, down to minus the burst. Buckets are keyed by
/// `kind` and `key`; a backend stores no key in the clear (PostgreSQL keeps
/// a salted hash) and may forget a bucket an hour after its last use (a
/// forgotten bucket is a full one, so forgetting is lenient, never strict).
#[derive(Debug, Clone, Copy)]
pub struct TokenRequest<'a> {
    /// Which limiter (`device`, `register`…).
    pub kind: &'a str,
    /// Whose bucket (a device address, a client address…).
    pub key: &'a str,
    /// Tokens added a second.
    pub rate: f64,
    /// Most tokens held.
    pub burst: f64,
    /// Tokens this request costs.
    pub cost: f64,
    /// Take the tokens even when the bucket holds too few.
    pub debt: bool,
}

/// What a shared bucket answered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tokens {
    /// The tokens were taken.
    pub taken: bool,
    /// Tokens left (negative: in debt).
    pub left: f64,
}

/// A new account with its first device.
#[derive(Debug, Clone)]
pub struct NewAccount {
    /// The handle.
    pub handle: Handle,
    /// The account identity public key.
    pub identity_key: Vec<u8>,
    /// The first device.
    pub device: DeviceRecord,
}

/// The result of a stored (or de-duplicated) send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOutcome {
    /// True when the send id had been stored before; nothing was stored again.
    pub duplicate: bool,
    /// The conversation's epoch after the send, when it carried a commit.
    pub epoch: Option<Epoch>,
    /// When the send was (first) stored, ms since the Unix epoch.
    pub server_time: u64,
    /// The recipient devices that got new inbox rows (empty for a duplicate).
    pub recipients: Vec<DeviceAddress>,
}

/// What one expiry sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Inbox rows past their time to live.
    pub inbox_rows: u64,
    /// Message rows no inbox row points at any more.
    pub messages: u64,
    /// Nonces old enough that their requests would be refused as stale anyway.
    pub nonces: u64,
    /// Send ids past their retention.
    pub send_ids: u64,
    /// Expired link slots.
    pub links: u64,
    /// Expired blobs (finished or not).
    pub blobs: u64,
}

/// A connection pool's state, for operators (`subrosa_db_pool_*` metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolState {
    /// Most connections the pool opens.
    pub max: u64,
    /// Connections open now (idle and in use).
    pub open: u64,
    /// Open connections idle in the pool.
    pub idle: u64,
    /// Requests waiting for a connection.
    pub waiting: u64,
    /// Batches ([`BATCH_KINDS`]: plain sends, acknowledgements, rate-limit
    /// checks, inbox reads): how many ran, the requests they took, and how
    /// many of those they answered (the rest ran alone).
    pub batches: [[u64; 3]; 4],
}

/// The kinds of request a backend takes in batches, in [`PoolState::batches`]' order.
pub const BATCH_KINDS: [&str; 4] = ["send", "ack", "rate_limit", "fetch"];

/// Row counts, for operators, tests and the demo's "what the server stored".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Accounts.
    pub accounts: u64,
    /// Devices, removed ones included (their rows stay, so that their ids
    /// are never given out again).
    pub devices: u64,
    /// Stored one-time key packages.
    pub one_time_key_packages: u64,
    /// Stored last-resort key packages.
    pub last_resort_key_packages: u64,
    /// Stored ciphertexts (each once, whatever its number of recipients).
    pub messages: u64,
    /// Of those, commits and Welcomes (the rest are application messages).
    pub handshake_messages: u64,
    /// Undelivered (unacknowledged) inbox rows.
    pub inbox_rows: u64,
    /// Remembered nonces of signed requests.
    pub nonces: u64,
    /// Remembered send ids.
    pub send_ids: u64,
    /// Conversations with a server-ordered epoch.
    pub conversations: u64,
    /// Open (not yet swept) link slots.
    pub links: u64,
    /// Stored blobs (uploading, or waiting for their recipients).
    pub blobs: u64,
    /// Bytes of those blobs received so far.
    pub blob_bytes: u64,
}

/// The limits of [`Store::create_blob`].
///
/// The blob rule (written once in `store::rules`; the conformance suite
/// checks it on every backend): a blob has a declared size, an owner (the
/// uploading device) and readers (the devices that may download it). Its
/// size counts against the owner's account from its creation until it
/// goes: when every reader said it fetched it ([`Store::blob_fetched`]), or
/// at its expiry (the message TTL), finished or not. Only the owner appends
/// (at exactly the received offset), asks its status and finishes it; only
/// a reader downloads a finished blob; to anyone else it is
/// [`StoreError::UnknownBlob`], as is an expired one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLimits {
    /// Largest blob, in bytes.
    pub max_bytes: u64,
    /// Most bytes of blobs one account's devices may have stored together;
    /// `u64::MAX`: no limit.
    pub account_bytes: u64,
}

impl BlobLimits {
    /// No limits.
    pub const UNLIMITED: BlobLimits = BlobLimits { max_bytes: u64::MAX, account_bytes: u64::MAX };

    /// The largest blob actually taken: the blob a file of `max_bytes`
    /// seals to (padding and tags, [`subrosa_proto::blob::blob_len`]), so
    /// that any file up to the advertised size fits and nothing larger does.
    /// The server sees only blobs; their length grows with the file's.
    pub fn max_blob(&self) -> u64 {
        if self.max_bytes == u64::MAX {
            return u64::MAX;
        }
        subrosa_proto::blob::blob_len(self.max_bytes)
    }
}

/// A blob upload as the store answers it.
pub use subrosa_proto::BlobStatus;

/// A link slot as stored: the new device's opaque request, and the opaque
/// response once a device of the account approved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRecord {
    /// The slot id.
    pub link: LinkId,
    /// The account the new device wants to join.
    pub handle: Handle,
    /// The opaque request.
    pub request: Vec<u8>,
    /// When the slot expires, ms since the Unix epoch.
    pub expires_at: u64,
    /// True once a device approved it.
    pub approved: bool,
}

/// How an accepted commit changes a conversation's roster.
///
/// The roster rule (both backends implement it inside the send's
/// transaction; the conformance suite checks it):
///
/// - A conversation with a roster accepts sends of any kind only from a
///   device in it; anyone else gets [`StoreError::NotAMember`] and changes
///   nothing, so a non-member cannot move the epoch or post anything.
/// - An accepted commit (a send with a [`CommitGuard`]) sets the roster to
///   what this function returns; inactive or unknown devices in it are
///   skipped. A removed device leaves every roster ([`Store::remove_device`]).
/// - A conversation without a roster (an unknown one, or one created before
///   rosters existed) accepts sends from anyone until its first commit.
/// - A conversation's row (epoch and roster) stays while any device of its
///   roster remains, and goes in the same transaction as the change that
///   empties the roster (its last member device removed, or a commit that
///   leaves no active device): the server keeps nothing about a
///   conversation nobody is in, and the id is then unknown (epoch 0) again.
///
/// [`CommitGuard`]: subrosa_proto::CommitGuard
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RosterChange<'a> {
    /// The roster becomes exactly these devices.
    Replace(Vec<&'a DeviceAddress>),
    /// These devices are added to the roster (an older client's commit,
    /// which declares no member list: its sender and recipients are all
    /// members).
    Extend(Vec<&'a DeviceAddress>),
}

/// The roster change an accepted send makes: `None` for a send without a
/// commit guard; the committer's declared member list when it has one; else
/// the sender and every recipient.
pub fn roster_change<'a>(sender: &'a DeviceAddress, request: &'a SendRequest) -> Option<RosterChange<'a>> {
    let guard = request.commit.as_ref()?;
    Some(match &guard.members {
        Some(members) => RosterChange::Replace(members.iter().collect()),
        None => RosterChange::Extend(
            std::iter::once(sender).chain(request.parts.iter().flat_map(|p| p.recipients.iter())).collect(),
        ),
    })
}

/// Each part's recipients as stored: as the request names them, and for a
/// commit part of a commit (`roster` is the roster before it, empty for
/// other sends) also every roster device, so an accepted commit reaches
/// every member whoever the committer named. A committer that declares its
/// member list gets its own commit back too (the echo: a lost answer never
/// desyncs it); an older client, which would not recognise its own commit,
/// does not.
pub fn part_recipients(
    request: &SendRequest,
    sender: &DeviceAddress,
    roster: &[DeviceAddress],
) -> Vec<Vec<DeviceAddress>> {
    let echo = request.commit.as_ref().is_some_and(|g| g.members.is_some());
    request
        .parts
        .iter()
        .map(|part| {
            let mut out = part.recipients.clone();
            if request.commit.is_some() && part.kind == subrosa_proto::MessageKind::Commit {
                let mut named: std::collections::HashSet<&DeviceAddress> = part.recipients.iter().collect();
                for addr in roster.iter().filter(|a| *a != sender) {
                    if named.insert(addr) {
                        out.push(addr.clone());
                    }
                }
                if echo && named.insert(sender) {
                    out.push(sender.clone());
                }
            }
            out
        })
        .collect()
}

/// Largest roster sent with a commit: every member gets it, so it costs
/// O(members²) per commit; larger conversations get none (and no check).
pub const MAX_ROSTER_IN_ENVELOPE: usize = 1000;

/// A roster as stored beside a commit (JSON of the device addresses), or
/// `None` when it is over [`MAX_ROSTER_IN_ENVELOPE`].
pub(crate) fn encode_roster(roster: &[DeviceAddress]) -> Result<Option<Vec<u8>>, StoreError> {
    if roster.len() > MAX_ROSTER_IN_ENVELOPE {
        return Ok(None);
    }
    serde_json::to_vec(roster).map(Some).map_err(|e| StoreError::Internal(format!("roster encoding: {e}")))
}

/// A stored roster.
pub(crate) fn decode_roster(bytes: &[u8]) -> Result<Vec<DeviceAddress>, StoreError> {
    serde_json::from_slice(bytes).map_err(|_| StoreError::Internal("stored roster is not valid".into()))
}

/// Most one-time key packages one device may have stored at once.
pub const MAX_STORED_KEY_PACKAGES: u64 = 1000;

/// Most active devices one account may have.
pub const MAX_DEVICES_PER_ACCOUNT: u64 = 16;

/// The delivery service's storage.
///
/// Implementations must make every method atomic (all or nothing) and safe
/// under concurrent calls from several tasks and several server nodes.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Creates an account and its first device.
    ///
    /// # Errors
    /// [`StoreError::HandleTaken`] when the handle exists.
    async fn register(&self, account: NewAccount, now_ms: u64) -> Result<(), StoreError>;

    /// Adds a device to an existing account (device linking builds on this).
    /// Atomic with its check of the device count: concurrent additions never
    /// take an account past [`MAX_DEVICES_PER_ACCOUNT`] active devices.
    ///
    /// # Errors
    /// [`StoreError::UnknownHandle`]; [`StoreError::DeviceTaken`] when the
    /// account has or had a device with this id (a removed device's id is
    /// never reused); [`StoreError::TooManyDevices`].
    async fn add_device(&self, handle: &Handle, device: DeviceRecord, now_ms: u64) -> Result<(), StoreError>;

    /// Removes (deactivates) an active device: from then on it is unknown to
    /// [`Store::device`], [`Store::account`], claims and sends, it is in no
    /// conversation's roster, and its
    /// one-time and last-resort key packages, its pending inbox rows and the
    /// messages left without any inbox row are deleted. Atomic with its check
    /// of the device count: concurrent removals never leave an account
    /// without an active device.
    ///
    /// # Errors
    /// [`StoreError::UnknownDevice`] when no active device has this address;
    /// [`StoreError::LastDevice`] when it is the account's only active device.
    async fn remove_device(&self, addr: &DeviceAddress) -> Result<(), StoreError>;

    /// Replaces the account's published keys, for `caller`, an active device
    /// of it: the identity key and every active device's certificate (the
    /// identity key rotated after a removal), or the caller's own signature
    /// key and certificate (`devices rekey`). `devices` must list exactly
    /// the active devices; see [`check_key_set`] for the rule. Key packages
    /// made under the old keys are deleted (every device's when the identity
    /// key changes, else the caller's): each device uploads new ones.
    ///
    /// # Errors
    /// [`StoreError::UnknownDevice`] for an unknown caller;
    /// [`StoreError::KeySet`] when the set breaks the rule.
    async fn replace_keys(
        &self,
        caller: &DeviceAddress,
        identity_key: Vec<u8>,
        devices: Vec<DeviceRecord>,
    ) -> Result<(), StoreError>;

    /// Deletes the account of `caller` (an active device of it): every
    /// device is removed as [`Store::remove_device`] removes one (the
    /// last-device rule does not apply), and everything stored for the
    /// account goes: key packages, inboxes, send ids, blobs it uploaded or
    /// could read, nonces, link slots, claim windows, its devices' keys.
    /// What its devices sent and others have not fetched yet stays for
    /// them (their leave proposals among it) until fetched or expired,
    /// under device ids without keys. The handle stays as a tombstone (an account with an empty
    /// identity key and no device): [`Store::register`] refuses it as
    /// taken, and [`Store::account`] answers it so that the key directory
    /// publishes the deletion. Returns the devices removed.
    ///
    /// # Errors
    /// [`StoreError::UnknownDevice`] for a caller that is not an active device.
    async fn delete_account(&self, caller: &DeviceAddress) -> Result<Vec<DeviceAddress>, StoreError>;

    /// An active device, for checking its signatures.
    ///
    /// # Errors
    /// Backend failures only; an unknown device is `Ok(None)`.
    async fn device(&self, addr: &DeviceAddress) -> Result<Option<DeviceRecord>, StoreError>;

    /// An account's identity key and active devices.
    ///
    /// # Errors
    /// Backend failures only; an unknown handle is `Ok(None)`.
    async fn account(&self, handle: &Handle) -> Result<Option<AccountInfo>, StoreError>;

    /// Remembers the nonce of a signed request. Returns false when this device
    /// used the nonce before (a replay). `timestamp_ms` is the request's
    /// signed timestamp; the nonce may be forgotten once that is out of the
    /// clock-skew window.
    ///
    /// # Errors
    /// Backend failures only.
    async fn check_nonce(&self, addr: &DeviceAddress, nonce: &str, timestamp_ms: u64) -> Result<bool, StoreError>;

    /// Stores one-time key packages and optionally replaces the last-resort
    /// one; with `replace`, first drops every one-time package the device
    /// still has (in the same transaction, so a claim sees old or new, never
    /// none).
    ///
    /// # Errors
    /// [`StoreError::UnknownDevice`], [`StoreError::TooManyKeyPackages`] when
    /// the device would hold more than [`MAX_STORED_KEY_PACKAGES`].
    async fn upload_key_packages(
        &self,
        addr: &DeviceAddress,
        one_time: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
        replace: bool,
    ) -> Result<KeyPackageCount, StoreError> {
        let classical = |kp| (subrosa_proto::CLASSICAL_SUITE, kp);
        let one_time = one_time.into_iter().map(classical).collect();
        let last_resort = last_resort.into_iter().map(classical).collect();
        self.upload_key_packages_in(addr, one_time, last_resort, replace).await
    }

    /// [`Store::upload_key_packages`] with each package under its MLS
    /// ciphersuite (at most one last-resort package per suite; each replaces
    /// the one of its suite). Claims ask for one suite. The bound holds per
    /// suite.
    ///
    /// # Errors
    /// As [`Store::upload_key_packages`].
    async fn upload_key_packages_in(
        &self,
        addr: &DeviceAddress,
        one_time: Vec<(u16, Vec<u8>)>,
        last_resort: Vec<(u16, Vec<u8>)>,
        replace: bool,
    ) -> Result<KeyPackageCount, StoreError>;

    /// How many key packages this device has stored.
    ///
    /// # Errors
    /// [`StoreError::UnknownDevice`].
    async fn key_package_count(&self, addr: &DeviceAddress) -> Result<KeyPackageCount, StoreError>;

    /// Hands out one key package of every active device of `handle` except
    /// `requester`: a one-time package (deleted in the same transaction, so it
    /// is handed out at most once) or else the device's last-resort package.
    ///
    /// # Errors
    /// [`StoreError::UnknownHandle`]; [`StoreError::NoKeyPackage`] when no
    /// device has a package.
    async fn claim_key_packages(
        &self,
        handle: &Handle,
        requester: &DeviceAddress,
    ) -> Result<ClaimResponse, StoreError> {
        self.claim_key_packages_of(handle, requester, ClaimKind::OneTime).await
    }

    /// [`Store::claim_key_packages`], choosing which package of each
    /// device comes first (see [`ClaimKind`]).
    ///
    /// # Errors
    /// As [`Store::claim_key_packages`].
    async fn claim_key_packages_of(
        &self,
        handle: &Handle,
        requester: &DeviceAddress,
        kind: ClaimKind,
    ) -> Result<ClaimResponse, StoreError> {
        self.claim_key_packages_in(handle, requester, kind, subrosa_proto::CLASSICAL_SUITE).await
    }

    /// [`Store::claim_key_packages_of`] for packages of one MLS ciphersuite:
    /// a device with none of `suite` gets none (never one of another suite).
    ///
    /// # Errors
    /// As [`Store::claim_key_packages`].
    async fn claim_key_packages_in(
        &self,
        handle: &Handle,
        requester: &DeviceAddress,
        kind: ClaimKind,
        suite: u16,
    ) -> Result<ClaimResponse, StoreError>;

    /// How many more claims drawing one-time packages `claimer`'s account
    /// may make of `target`'s at `now_ms` (see [`ClaimKind::Counted`]): a
    /// plain read, so the caller can leave the target's budget alone for a
    /// claimer past its own allowance. The claim itself decides again
    /// inside its transaction.
    ///
    /// # Errors
    /// Backend failures only.
    async fn one_time_claims_left(&self, claimer: &Handle, target: &Handle, now_ms: u64) -> Result<u64, StoreError>;

    /// Stores every part of a send for its recipients, atomically, together
    /// with the send id and (when the send carries a commit) the epoch bump
    /// and the new roster (see [`roster_change`] and the module docs). The
    /// request must already be checked against the limits. A send id seen
    /// before answers as a duplicate before any other check. Every backend
    /// checks in one order (written once in `store::rules::send`): the
    /// sender, the send id, membership, the epoch guard, the recipients,
    /// the quota; so a stale commit naming a device removed since is told
    /// [`StoreError::StaleEpoch`].
    ///
    /// # Errors
    /// [`StoreError::UnknownDevice`] for a recipient that is not an active
    /// device; [`StoreError::NotAMember`] when the conversation has a roster
    /// and the sender is not in it (whatever the epoch);
    /// [`StoreError::StaleEpoch`] when the commit guard's epoch is not the
    /// conversation's current one.
    async fn send(
        &self,
        sender: &DeviceAddress,
        request: &SendRequest,
        now_ms: u64,
    ) -> Result<SendOutcome, StoreError> {
        self.send_within(sender, request, &Quota::UNLIMITED, now_ms).await
    }

    /// [`Store::send`] within a [`Quota`] of undelivered bytes.
    ///
    /// # Errors
    /// As [`Store::send`], and [`StoreError::QuotaExceeded`].
    async fn send_within(
        &self,
        sender: &DeviceAddress,
        request: &SendRequest,
        quota: &Quota,
        now_ms: u64,
    ) -> Result<SendOutcome, StoreError>;

    /// Bytes of undelivered ciphertext this device sent, and its account's
    /// devices together (see [`Quota`]).
    ///
    /// # Errors
    /// Backend failures only; an unknown device has `(0, 0)`.
    async fn stored_bytes(&self, addr: &DeviceAddress) -> Result<(u64, u64), StoreError>;

    /// [`Store::check_nonce`] for a signed send request, then
    /// [`Store::send_within`] when the nonce is new; `Ok(None)` (nothing stored) when it is not. The
    /// nonce stays remembered when the send itself is refused. Backends may
    /// do both in one transaction (SQLite does: one commit per send).
    ///
    /// # Errors
    /// As [`Store::check_nonce`] and [`Store::send`].
    async fn send_with_nonce(
        &self,
        sender: &DeviceAddress,
        nonce: &str,
        timestamp_ms: u64,
        request: &SendRequest,
        quota: &Quota,
        now_ms: u64,
    ) -> Result<Option<SendOutcome>, StoreError> {
        if !self.check_nonce(sender, nonce, timestamp_ms).await? {
            return Ok(None);
        }
        self.send_within(sender, request, quota, now_ms).await.map(Some)
    }

    /// Up to `limit` envelopes of this device with an id above `after`, oldest
    /// first, stopping early once their ciphertexts add up to `max_bytes`
    /// (always at least one envelope when any is pending).
    ///
    /// # Errors
    /// Backend failures only.
    async fn fetch_inbox(
        &self,
        addr: &DeviceAddress,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Envelope>, StoreError>;

    /// Deletes this device's inbox rows among `ids` (other devices' rows are
    /// left alone), and every message whose last inbox row went. Returns how
    /// many rows were deleted.
    ///
    /// # Errors
    /// Backend failures only.
    async fn ack(&self, addr: &DeviceAddress, ids: &[u64]) -> Result<u64, StoreError>;

    /// The conversation's current epoch (0 for an unknown conversation).
    ///
    /// # Errors
    /// Backend failures only.
    async fn conversation_epoch(&self, conversation: &ConversationId) -> Result<Epoch, StoreError>;

    /// Whether an active device is in the conversation's roster (false for
    /// an unknown conversation and for one without a roster yet): who may
    /// have a call relay token.
    ///
    /// # Errors
    /// Backend failures only.
    async fn in_roster(&self, conversation: &ConversationId, device: &DeviceAddress) -> Result<bool, StoreError>;

    /// The call relay's token key: the stored one, or else `candidate`,
    /// stored now (when several nodes race, all get the one stored first),
    /// so every node of the database accepts the tokens any of them issued.
    ///
    /// # Errors
    /// Backend failures only.
    async fn relay_key(&self, candidate: [u8; 32]) -> Result<[u8; 32], StoreError>;

    /// Opens a link slot for a new device of `handle`, expiring at
    /// `expires_at_ms`. The caller picks the random id.
    ///
    /// # Errors
    /// [`StoreError::UnknownHandle`]; [`StoreError::LinkTaken`] when a slot
    /// (even an expired, not yet swept one) has this id.
    async fn create_link(
        &self,
        link: &LinkId,
        handle: &Handle,
        request: Vec<u8>,
        expires_at_ms: u64,
    ) -> Result<(), StoreError>;

    /// A link slot of `handle` that has not expired at `now_ms`.
    ///
    /// # Errors
    /// [`StoreError::UnknownLink`] when there is none, it expired, or it
    /// belongs to another account.
    async fn link(&self, link: &LinkId, handle: &Handle, now_ms: u64) -> Result<LinkRecord, StoreError>;

    /// Stores the opaque response of a slot of `handle`, once.
    ///
    /// # Errors
    /// [`StoreError::UnknownLink`] as for [`Store::link`];
    /// [`StoreError::LinkAlreadyApproved`] when a response is stored already
    /// (it is left as it was).
    async fn approve_link(
        &self,
        link: &LinkId,
        handle: &Handle,
        response: Vec<u8>,
        now_ms: u64,
    ) -> Result<(), StoreError>;

    /// What the new device polls: `None` while the slot waits for approval;
    /// the response once approved, and then the slot is deleted in the same
    /// transaction, so the response is handed out at most once.
    ///
    /// # Errors
    /// [`StoreError::UnknownLink`] when there is no such slot or it expired.
    async fn take_link_response(&self, link: &LinkId, now_ms: u64) -> Result<Option<Vec<u8>>, StoreError>;

    /// Opens an upload of `size` bytes owned by `owner`, readable by
    /// `readers`, gone at `expires_at_ms` (see [`BlobLimits`] for the
    /// rule). The caller picks the random id.
    ///
    /// # Errors
    /// [`StoreError::UnknownDevice`] for an owner or a reader that is not an
    /// active device; [`StoreError::BlobTooLarge`];
    /// [`StoreError::BlobQuotaExceeded`]; [`StoreError::BlobTaken`] (pick
    /// another id).
    #[allow(clippy::too_many_arguments)]
    async fn create_blob(
        &self,
        owner: &DeviceAddress,
        blob: &BlobId,
        size: u64,
        readers: &[DeviceAddress],
        limits: &BlobLimits,
        now_ms: u64,
        expires_at_ms: u64,
    ) -> Result<(), StoreError>;

    /// Appends `bytes` to the owner's unfinished blob at `offset`, which
    /// must be its received count; returns the new status.
    ///
    /// # Errors
    /// [`StoreError::UnknownBlob`]; [`StoreError::BlobOffset`] when
    /// `offset` is not where the received bytes end (or the blob is
    /// finished); [`StoreError::BlobOverrun`].
    async fn append_blob(
        &self,
        owner: &DeviceAddress,
        blob: &BlobId,
        offset: u64,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<BlobStatus, StoreError>;

    /// The status of a blob, for its owner or a reader.
    ///
    /// # Errors
    /// [`StoreError::UnknownBlob`].
    async fn blob_status(&self, caller: &DeviceAddress, blob: &BlobId, now_ms: u64) -> Result<BlobStatus, StoreError>;

    /// Marks the owner's blob complete once every declared byte arrived
    /// (again: no change).
    ///
    /// # Errors
    /// [`StoreError::UnknownBlob`]; [`StoreError::BlobIncomplete`].
    async fn finish_blob(&self, owner: &DeviceAddress, blob: &BlobId, now_ms: u64) -> Result<BlobStatus, StoreError>;

    /// Up to `length` bytes of a finished blob from `offset`, for a reader
    /// (empty at or past the end).
    ///
    /// # Errors
    /// [`StoreError::UnknownBlob`]; [`StoreError::BlobIncomplete`].
    async fn read_blob(
        &self,
        reader: &DeviceAddress,
        blob: &BlobId,
        offset: u64,
        length: u64,
        now_ms: u64,
    ) -> Result<Vec<u8>, StoreError>;

    /// A reader says it fetched the blob to its end; once every reader did,
    /// the blob is deleted (returns true then).
    ///
    /// # Errors
    /// [`StoreError::UnknownBlob`].
    async fn blob_fetched(&self, reader: &DeviceAddress, blob: &BlobId, now_ms: u64) -> Result<bool, StoreError>;

    /// Deletes inbox rows stored before `inbox_before_ms` and the messages
    /// left without any, nonces with a timestamp before `nonces_before_ms`,
    /// send ids stored before `send_ids_before_ms`, and link slots and blobs
    /// expired at `now_ms` (expiry at or before it).
    ///
    /// # Errors
    /// Backend failures only.
    async fn sweep(
        &self,
        inbox_before_ms: u64,
        nonces_before_ms: u64,
        send_ids_before_ms: u64,
        now_ms: u64,
    ) -> Result<SweepReport, StoreError>;

    /// Backend housekeeping after a sweep (SQLite: checkpoint and truncate the
    /// write-ahead log, so deleted content leaves the files).
    ///
    /// # Errors
    /// Backend failures only.
    async fn maintenance(&self) -> Result<(), StoreError>;

    /// Row counts.
    ///
    /// # Errors
    /// Backend failures only.
    async fn stats(&self) -> Result<StoreStats, StoreError>;

    /// The connection pool's state, read without touching the database (so
    /// it is known when the database is not); `None` for a backend without
    /// a pool (SQLite: one writer thread and fixed readers).
    fn pool_state(&self) -> Option<PoolState> {
        None
    }

    /// Takes tokens from a rate-limit bucket that every node sharing this
    /// database sees (see [`TokenRequest`]); `Ok(None)` when the backend
    /// serves one node only, whose in-process buckets are then used (the
    /// default: SQLite).
    ///
    /// # Errors
    /// Backend failures only (callers fall back to the node's own buckets).
    async fn take_tokens(&self, _request: &TokenRequest<'_>, _now_ms: u64) -> Result<Option<Tokens>, StoreError> {
        Ok(None)
    }

    /// The key-transparency tables of the same database.
    fn kt_storage(&self) -> std::sync::Arc<dyn kt::KtStorage>;
    /// Starts forwarding other nodes' wake-ups and device removals into this
    /// node's `wakeups` until `stop` changes (PostgreSQL: LISTEN/NOTIFY).
    /// Backends that serve a single node have nothing to forward and return
    /// `None`.
    fn spawn_listener(
        &self,
        _wakeups: std::sync::Arc<crate::wakeup::Wakeups>,
        _stop: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        None
    }
}

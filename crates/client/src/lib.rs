//! The Subrosa client: the protocol engine of `subrosa-core` wrapped with
//! networking to the server and an encrypted local store.
//!
//! [`Subrosa`] is one device of one account. Every state change is committed
//! to the store before anything leaves the device, and a delivered message
//! is acknowledged only after the store committed it.

mod annotations;
pub mod attachment;
pub mod blobs;
pub mod calls;
mod conversations;
mod devices;
pub mod files;
mod handle;
pub mod keycache;
mod keys;
pub mod kt;
pub mod linklist;
mod members;
mod moves;
pub mod net;
pub mod preview;
mod rotation;
pub mod store;
#[cfg(feature = "test-senders")]
mod testing;
pub mod welcomes;

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use subrosa_core::content::Body;
use subrosa_core::{CoreError, DeviceIdentity};
use subrosa_proto::{
    AckRequest, AckResponse, ConversationId, DeviceRecord, Empty, ErrorCode, Handle, InboxResponse, KeyPackageCount,
    KeyPackageUpload, MessageId, RegisterRequest, SendResponse, ServerFrame, B64,
};

pub use conversations::{GroupSummary, Target};
pub use devices::{DeviceEntry, LinkApproved};
pub use handle::{Client, ClientEvent};
pub use rotation::Rekeyed;
use store::{now_ms, OnDisk, Store};
pub use store::{Contact, ConversationRow, MessageState, StoredMessage};
pub use subrosa_session::{format_duration, Advice, Session, SystemClock, SystemEvent, LOADED_GROUPS};
use subrosa_session::{Outgoing, Prepared};

pub use subrosa_session::ClientError;

/// What receiving produced, in order.
#[derive(Debug, Clone)]
pub enum Received {
    /// A new message (or system line) stored in history.
    Message(StoredMessage),
    /// A message that could not be decrypted or authenticated and was dropped.
    Dropped {
        /// Claimed sender (as the server said).
        from: String,
        /// Why.
        reason: String,
    },
    /// A security alert for the user (a key-directory fork, a ghost device).
    Alert(String),
    /// A queued message the server refused: it will not be sent.
    Failed(FailedSend),
    /// One of this account's messages reached the server (it was queued):
    /// the message, in its new state.
    Sent(StoredMessage),
}

/// A queued send the server refused (or that could no longer be encrypted).
#[derive(Debug, Clone)]
pub struct FailedSend {
    /// The message, marked failed in history; `None` for a send queued by
    /// an older version, whose outbox kept only the ciphertext.
    pub message: Option<StoredMessage>,
    /// Why.
    pub reason: String,
}

type RefusedSend = (Option<(ConversationId, [u8; 16])>, ClientError);

/// What a send that is stored here but not yet on the server says.
pub const QUEUED: &str = "not yet on the server; the next subrosa command sends it";

/// How often a connected `follow` looks for sends another command queued.
const OUTBOX_RETRY: Duration = Duration::from_secs(10);

/// Whether an error leaves a send queued (and a command may carry on
/// offline): the server could not be reached, did not answer in time or
/// sensibly, or answered 5xx or 429. Anything else is a refusal.
pub(crate) fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Network(_) | ClientError::Protocol(_) | ClientError::Pending(_) => true,
        ClientError::Server { status, .. } => *status >= 500 || *status == 429,
        _ => false,
    }
}

/// How many one-time key packages to keep on the server.
pub(crate) const KEY_PACKAGE_TARGET: u64 = 50;
/// Refill when fewer than this remain.
const KEY_PACKAGE_LOW: u64 = 10;

/// One device of one account: its [`Session`] (the messenger rules over
/// the store, which it dereferences to) and the signed server API.
pub struct Subrosa {
    session: Session,
    api: net::Api,
    /// Queued sends the server refused, reported by the command that flushed them.
    failed: std::sync::Mutex<Vec<RefusedSend>>,
    /// Queued messages the server took since the last report (conversation,
    /// message id): their state changed to sent.
    sent: std::sync::Mutex<Vec<(ConversationId, [u8; 16])>>,
    /// The connected socket's sending half while [`Self::follow_with`]
    /// holds a socket with binary frames: the outbox goes out over it
    /// (signed HTTP otherwise, and always for commits).
    frames: std::sync::Mutex<Option<std::sync::Weak<net::FrameLink>>>,
    /// The home directory (its attachment folder holds sealed files).
    home: std::path::PathBuf,
    /// The dangerous-link list as last read and verified (`Some(None)`:
    /// none imported); forgotten by every import through this device.
    link_list: std::sync::Mutex<Option<Option<std::sync::Arc<subrosa_core::linklist::LinkList>>>>,
}

impl std::ops::Deref for Subrosa {
    type Target = Session;

    fn deref(&self) -> &Session {
        &self.session
    }
}

impl std::fmt::Debug for Subrosa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subrosa").field("session", &self.session).finish_non_exhaustive()
    }
}

pub(crate) const META_IDENTITY: &str = "identity";
pub(crate) const META_SERVER: &str = "server_url";

/// A text a message may carry: not empty, at most 64 KiB.
pub(crate) fn check_text(text: &str) -> Result<(), ClientError> {
    if text.is_empty() {
        return Err(ClientError::Input("empty message".into()));
    }
    if text.len() > subrosa_core::content::MAX_TEXT_BYTES {
        return Err(ClientError::Input(format!("message too long: {} bytes, at most 64 KiB", text.len())));
    }
    Ok(())
}

impl Subrosa {
    /// Creates the account `handle` and this device on `server`, in a new
    /// store in `home`.
    ///
    /// # Errors
    /// [`ClientError::AlreadyRegistered`], URL errors, and the server's
    /// refusal (e.g. `handle_taken`). On any error the new store is removed.
    pub async fn register(home: &Path, passphrase: &str, handle: &str, server: &str) -> Result<Self, ClientError> {
        let handle = Handle::new(handle).map_err(|e| ClientError::Input(e.to_string()))?;
        net::check_server_url(server)?;
        let existed = home.exists();
        let result = Self::register_inner(home, passphrase, handle, server).await;
        if result.is_err() && !matches!(result, Err(ClientError::AlreadyRegistered(_))) {
            Store::remove_unfinished(home, existed);
        }
        result
    }

    async fn register_inner(home: &Path, passphrase: &str, handle: Handle, server: &str) -> Result<Self, ClientError> {
        let store = Store::create(home, passphrase)?;
        let crypto = subrosa_core::default_crypto();
        let identity = DeviceIdentity::generate(&crypto, handle.clone(), now_ms())?;
        let secret = identity.to_secret_bytes()?;
        store.write(|tx| {
            tx.set_meta(META_IDENTITY, &secret)?;
            tx.set_meta(META_SERVER, server.as_bytes())
        })?;
        let me = Self::assemble(home, store, identity, server)?;
        let id = me.engine().identity();
        let req = RegisterRequest {
            handle,
            identity_key: B64(id.identity_public().to_vec()),
            device: DeviceRecord {
                device_id: id.device_id(),
                signature_key: B64(id.device_public().to_vec()),
                certificate: B64(id.certificate().to_bytes()?),
            },
        };
        let _: Empty = me.api.call(Method::POST, "/v1/accounts", Some(&req)).await?;
        // The directory's head-signing key is pinned now, before anything
        // this device is told by others could depend on it.
        me.kt_head_key().await?;
        me.upload_key_packages(KEY_PACKAGE_TARGET as usize, true).await?;
        me.note_key_packages_fresh()?;
        Ok(me)
    }

    /// Opens the device in `home`.
    ///
    /// # Errors
    /// [`ClientError::NotRegistered`], [`ClientError::WrongPassphrase`].
    pub fn open(home: &Path, passphrase: &str) -> Result<Self, ClientError> {
        Self::from_store(home, Store::open(home, passphrase)?)
    }

    /// The device whose store in `home` is already open (e.g. with a key
    /// from the session cache, [`keycache::KeyCache`]).
    ///
    /// # Errors
    /// [`ClientError::NotRegistered`] when the store holds no device.
    pub fn from_store(home: &Path, store: Store) -> Result<Self, ClientError> {
        let crypto = subrosa_core::default_crypto();
        let (secret, server) = store.read(|tx| Ok((tx.meta(META_IDENTITY)?, tx.meta(META_SERVER)?)))?;
        let secret = secret.ok_or_else(|| ClientError::NotRegistered(home.display().to_string()))?;
        let identity = DeviceIdentity::from_secret_bytes(&crypto, &secret)?;
        let server = server.ok_or_else(|| ClientError::Store("no server URL stored".into()))?;
        let server = String::from_utf8(server.to_vec()).map_err(|_| ClientError::Store("server URL".into()))?;
        let me = Self::assemble(home, store, identity, &server)?;
        // Disappearing messages past their time go at start-up, before
        // anything could show them.
        me.sweep_expired()?;
        Ok(me)
    }

    pub(crate) fn assemble(
        home: &Path,
        store: Store,
        identity: DeviceIdentity,
        server: &str,
    ) -> Result<Self, ClientError> {
        let crypto = subrosa_core::default_crypto();
        let api = net::Api::new(server, identity.clone(), crypto.clone())?;
        let session = Session::new(crypto, identity, store, std::sync::Arc::new(SystemClock));
        Ok(Subrosa {
            session,
            api,
            failed: std::sync::Mutex::new(Vec::new()),
            sent: std::sync::Mutex::new(Vec::new()),
            frames: std::sync::Mutex::new(None),
            home: home.to_path_buf(),
            link_list: std::sync::Mutex::new(None),
        })
    }

    /// Deletes the disappearing messages whose time came: their rows,
    /// reactions, receipts and attachment rows in one transaction, then the
    /// sealed files those kept (a file left by a crash in between is a
    /// sealed blob whose key went with its row). Returns how many files
    /// went.
    ///
    /// # Errors
    /// Store errors; a file that exists but cannot be deleted.
    pub fn sweep_expired(&self) -> Result<usize, ClientError> {
        let now = self.now_ms();
        let files = self.store().write(|tx| tx.delete_expired(now))?;
        let folder = files::folder(&self.home);
        let mut gone = 0;
        for name in files {
            // Names are ours (`files.rs`), never a path: refuse anything else.
            if name.contains(['/', '\\']) || name.starts_with('.') {
                continue;
            }
            match std::fs::remove_file(folder.join(&name)) {
                Ok(()) => gone += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ClientError::Io(format!("delete {name}: {e}"))),
            }
        }
        Ok(gone)
    }

    /// The signed server API of this device.
    pub fn api(&self) -> &net::Api {
        &self.api
    }

    /// The server URL.
    pub fn server(&self) -> &str {
        self.api.base().as_str()
    }

    /// Uploads `count` one-time key packages of every suite this device
    /// speaks ([`subrosa_core::SUITES`]), and with `last_resort` a
    /// last-resort package of each.
    pub(crate) async fn upload_key_packages(&self, count: usize, last_resort: bool) -> Result<(), ClientError> {
        let counts: Vec<_> = subrosa_core::SUITES.iter().map(|s| (*s, count)).collect();
        self.upload_key_packages_with(&counts, last_resort, false).await
    }

    /// Uploads `count` one-time key packages of every suite and a
    /// last-resort one of each, replacing every package the server still
    /// holds for this device.
    pub(crate) async fn upload_key_packages_replacing(&self, count: usize) -> Result<(), ClientError> {
        let counts: Vec<_> = subrosa_core::SUITES.iter().map(|s| (*s, count)).collect();
        self.upload_key_packages_with(&counts, true, true).await
    }

    /// Uploads one-time packages (`counts`: how many of each suite) and,
    /// with `last_resort`, a last-resort package of every suite (made
    /// together, so the store keeps the newest of each: see
    /// `erase_key_packages_before`).
    async fn upload_key_packages_with(
        &self,
        counts: &[(subrosa_core::CipherSuite, usize)],
        last_resort: bool,
        replace: bool,
    ) -> Result<(), ClientError> {
        let (one_time, mut last) = self.store().write(|tx| {
            let mut one_time = Vec::new();
            for (suite, count) in counts {
                for _ in 0..*count {
                    one_time.push(B64(self.engine().generate_key_package_in(*suite)?));
                }
            }
            let mut last = Vec::new();
            if last_resort {
                for suite in subrosa_core::SUITES {
                    last.push(B64(self.engine().generate_key_package_in(suite)?));
                    tx.mark_newest_key_package_last_resort()?;
                }
            }
            Ok((one_time, last))
        })?;
        let first = if last.is_empty() { None } else { Some(last.remove(0)) };
        let upload = KeyPackageUpload { one_time, last_resort: first, more_last_resort: last, replace };
        let _: KeyPackageCount = self.api.call(Method::POST, "/v1/keypackages", Some(&upload)).await?;
        Ok(())
    }

    async fn refill_key_packages(&self) -> Result<(), ClientError> {
        let count: KeyPackageCount = self.api.call::<(), _>(Method::GET, "/v1/keypackages", None).await?;
        let by_suite: Vec<_> = subrosa_core::SUITES.iter().map(|s| (*s, count.of(u16::from(*s)))).collect();
        if by_suite.iter().any(|(_, c)| c.one_time == 0) {
            // 50 packages gone between two commands of this device is not
            // people starting conversations: someone is draining them (new
            // conversations fall back to the last-resort package meanwhile).
            self.store().write(|tx| {
                tx.add_alert(
                    "every one-time key package of this device was claimed since its last check; \
                 someone may be draining them (new conversations use the last-resort package until the refill)",
                )
            })?;
        }
        let missing_last_resort = by_suite.iter().any(|(_, c)| !c.last_resort);
        let counts: Vec<_> = by_suite
            .iter()
            .filter(|(_, c)| c.one_time < KEY_PACKAGE_LOW)
            .map(|(s, c)| (*s, (KEY_PACKAGE_TARGET - c.one_time.min(KEY_PACKAGE_TARGET)) as usize))
            .collect();
        if !counts.is_empty() || missing_last_resort {
            self.upload_key_packages_with(&counts, missing_last_resort, false).await?;
        }
        Ok(())
    }

    /// Sends what is queued, oldest first: a request made earlier is posted
    /// again byte for byte (same send id: the server stores it once); a
    /// message not yet encrypted is encrypted now, after the inbox was
    /// processed (`drained` says the caller just did; otherwise this does),
    /// so it goes out at the conversation's current epoch, never under keys
    /// a removal or an update already retired. A send the server refuses
    /// (4xx) is marked failed and reported by [`Self::take_failed_sends`]
    /// (and by `receive` as [`Received::Failed`]); the rest carries on.
    ///
    /// # Errors
    /// The first network error, 5xx or 429 answer (everything not sent stays
    /// queued), and store errors.
    pub async fn flush_outbox(&self) -> Result<(), ClientError> {
        self.flush_outbox_inner(false).await
    }

    pub(crate) async fn flush_outbox_inner(&self, drained: bool) -> Result<(), ClientError> {
        let queued = self.store().read(|tx| tx.outbox())?;
        if queued.is_empty() {
            return Ok(());
        }
        if !drained && queued.iter().any(|q| q.request.is_none()) {
            self.drain_inbox(true).await?;
        }
        // Several messages are encrypted together, their groups' state
        // written once; each is still posted after that state is stored.
        let seqs: std::collections::HashMap<i64, Option<u64>> =
            self.prepare_all_queued(self.kt_latest()?)?.into_iter().collect();
        // A conversation whose oldest queued message cannot be encrypted yet
        // keeps its later ones queued too: they never overtake it.
        let mut waiting: Vec<ConversationId> = Vec::new();
        for q in self.store().read(|tx| tx.outbox())? {
            if q.message.is_some_and(|(c, _)| waiting.contains(&c)) {
                continue;
            }
            // A conversation with its own commit still waiting for the
            // server's answer holds its messages back until it settles: they
            // must go out at the epoch that commit makes, not the one before.
            if let (None, Some((c, _))) = (&q.request, q.message) {
                if self.store().read(|tx| tx.pending_commit(&c))?.is_some() {
                    waiting.push(c);
                    continue;
                }
            }
            let (request, seq) = match self.encrypt_queued(q.id) {
                Ok(Some((request, seq))) => (request, seq.or(seqs.get(&q.id).copied().flatten())),
                Ok(None) => continue, // another process sent it meanwhile
                Err(ClientError::Core(CoreError::Mls(mls_rs::error::MlsError::CommitRequired))) => {
                    // Proposals wait for a commit (the next sync makes it).
                    if let Some((c, _)) = q.message {
                        waiting.push(c);
                    }
                    continue;
                }
                Err(ClientError::Core(e)) if e.is_moved() => {
                    // Moving to post-quantum keys: it goes to the new
                    // conversation once that is joined.
                    if let Some((c, _)) = q.message {
                        waiting.push(c);
                    }
                    continue;
                }
                Err(ClientError::Core(CoreError::UnknownConversation)) => {
                    let gone = ClientError::Input("this device is no longer a member of the conversation".into());
                    self.refused(&q, None, gone)?;
                    continue;
                }
                Err(e @ ClientError::Core(_)) => {
                    self.refused(&q, None, e)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match self.post_send(request).await {
                Ok(_) => {
                    self.queued_sent(&q)?;
                    if let Some(m) = q.message {
                        self.sent.lock().unwrap_or_else(|p| p.into_inner()).push(m);
                    }
                }
                Err(e) if is_transient(&e) => return Err(e),
                Err(e) => self.refused(&q, seq, e)?,
            }
        }
        Ok(())
    }

    /// Posts one queued request (its JSON bytes, as stored): as a send
    /// frame on the device's socket when one with binary frames is up and
    /// the request is not a commit, else as a signed HTTP request. Either
    /// way the answer comes only once the server stored it durably, and a
    /// retry (same send id) is stored once.
    async fn post_send(&self, request: Vec<u8>) -> Result<(), ClientError> {
        if let Some(link) = self.frame_link() {
            if let Ok(parsed) = serde_json::from_slice::<subrosa_proto::SendRequest>(&request) {
                if parsed.commit.is_none() {
                    return link.send(parsed).await;
                }
            }
        }
        self.api.call_raw::<SendResponse>(Method::POST, "/v1/messages", request).await.map(|_| ())
    }

    /// The socket's sending half, while one with binary frames is open.
    fn frame_link(&self) -> Option<std::sync::Arc<net::FrameLink>> {
        let guard = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().and_then(std::sync::Weak::upgrade).filter(|l| l.is_open())
    }

    fn set_frame_link(&self, link: Option<&std::sync::Arc<net::FrameLink>>) {
        *self.frames.lock().unwrap_or_else(|p| p.into_inner()) = link.map(std::sync::Arc::downgrade);
    }

    /// The request of a queued send (see [`Session::prepare_queued`]).
    fn encrypt_queued(&self, id: i64) -> Result<Option<Prepared>, ClientError> {
        let kt_head = self.kt_latest()?;
        self.prepare_queued(id, kt_head)
    }

    /// A queued send the server refused, or that can no longer be
    /// encrypted: out of the queue, its message marked failed. The sequence
    /// number it took, when still the last, is given back: recipients should
    /// not be told of a gap for a message nobody got.
    fn refused(&self, q: &store::QueuedSend, seq: Option<u64>, e: ClientError) -> Result<(), ClientError> {
        self.queued_refused(q, seq, &e.to_string())?;
        self.lock_failed().push((q.message, e));
        Ok(())
    }

    fn lock_failed(&self) -> std::sync::MutexGuard<'_, Vec<RefusedSend>> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queued sends the server refused since the last call: each will not
    /// be sent (its message is marked failed in history).
    ///
    /// # Errors
    /// Store errors.
    pub fn take_failed_sends(&self) -> Result<Vec<FailedSend>, ClientError> {
        let failed = std::mem::take(&mut *self.lock_failed());
        let mut out = Vec::with_capacity(failed.len());
        for (message, e) in failed {
            let message = match message {
                Some((c, m)) => self.store().read(|tx| tx.message(&c, &m))?,
                None => None,
            };
            out.push(FailedSend { message, reason: e.to_string() });
        }
        Ok(out)
    }

    /// Stores `text` in history and the outbox in one transaction; when the
    /// server is `online`, sends the outbox (this message last).
    ///
    /// # Errors
    /// [`ClientError::Pending`] while the message is queued (the server is
    /// unreachable or did not answer); the server's refusal, after which
    /// nothing of it stays queued.
    #[allow(clippy::too_many_arguments)]
    async fn send_content(
        &self,
        conversation: ConversationId,
        target: &str,
        group: bool,
        body: &Body,
        shown: Option<&str>,
        message_id: MessageId,
        online: bool,
    ) -> Result<Option<StoredMessage>, ClientError> {
        let to = Outgoing { conversation, target, group };
        self.queue_body(&to, body, message_id, rand::random(), shown)?;
        if !online {
            return Err(ClientError::Pending(QUEUED.into()));
        }
        let flushed = self.flush_outbox_inner(true).await;
        // Exit codes hang on this: refused only when the server said so,
        // sent only when it answered; anything else stays queued.
        let own = {
            let mut failed = self.lock_failed();
            let i = failed.iter().position(|(m, _)| *m == Some((conversation, message_id.0)));
            i.map(|i| failed.remove(i).1)
        };
        if let Some(e) = own {
            return Err(e);
        }
        if shown.is_none() {
            // No history line: the outbox row says whether it went.
            let queued = self.store().read(|tx| tx.outbox())?;
            if queued.iter().any(|q| q.message == Some((conversation, message_id.0))) {
                drop(flushed);
                return Err(ClientError::Pending(QUEUED.into()));
            }
            return Ok(None);
        }
        match self.store().read(|tx| tx.message(&conversation, &message_id.0))? {
            // Receipts may have come already.
            Some(m) if matches!(m.state, Some(MessageState::Sent | MessageState::Delivered | MessageState::Read)) => {
                Ok(Some(m))
            }
            Some(m) if m.state == Some(MessageState::Failed) => {
                Err(ClientError::SendRefused(m.reason.unwrap_or_default()))
            }
            // Whatever stopped the flush (the server went away, did not
            // answer), the message is in the outbox.
            _ => {
                drop(flushed);
                Err(ClientError::Pending(QUEUED.into()))
            }
        }
    }

    /// Sends a text message to `to`. The message is stored in history and
    /// queued before it is sent; if the server cannot be reached it stays
    /// queued and is retried (idempotently) by the next send or receive.
    ///
    /// # Errors
    /// Unknown conversation, key mismatch, network and server errors.
    pub async fn send_text(&self, to: &Target, text: &str) -> Result<StoredMessage, ClientError> {
        self.send_text_with(to, text, false).await
    }

    /// As [`Self::send_text`]; `accept_key_change` sends even when a verified
    /// contact's identity key changed (they stay unverified).
    ///
    /// # Errors
    /// As [`Self::send_text`], and [`ClientError::KeyChanged`].
    pub async fn send_text_with(
        &self,
        to: &Target,
        text: &str,
        accept_key_change: bool,
    ) -> Result<StoredMessage, ClientError> {
        self.send_text_as(to, text, accept_key_change, MessageId(rand::random())).await
    }

    /// As [`Self::send_text_with`], under the message id `message_id` (so a
    /// caller can find the message when it stays queued).
    pub(crate) async fn send_text_as(
        &self,
        to: &Target,
        text: &str,
        accept_key_change: bool,
        message_id: MessageId,
    ) -> Result<StoredMessage, ClientError> {
        check_text(text)?;
        self.send_body_as(to, Body::Text(text.to_string()), Some(text.to_string()), accept_key_change, message_id)
            .await?
            .ok_or_else(|| ClientError::Bug("a text stored no history line".into()))
    }

    /// Sends `text` with the preview of its first link that this device
    /// made ([`preview::make`]).
    ///
    /// # Errors
    /// As [`Self::send_text_with`]; [`ClientError::Input`] for a preview
    /// out of its limits or of a link the text does not carry.
    pub async fn send_with_preview(
        &self,
        to: &Target,
        text: &str,
        preview: subrosa_core::preview::LinkPreview,
        accept_key_change: bool,
    ) -> Result<StoredMessage, ClientError> {
        check_text(text)?;
        preview.check(text).map_err(|e| ClientError::Input(format!("preview: {e}")))?;
        let body = Body::Preview { text: text.to_string(), preview };
        self.send_body_as(to, body, Some(text.to_string()), accept_key_change, MessageId(rand::random()))
            .await?
            .ok_or_else(|| ClientError::Bug("a text stored no history line".into()))
    }

    /// Sends a message of any kind to `to`, stored in the outbox (and, when
    /// `shown` is given, in history as that line) before it is sent, with
    /// the same checks, queueing and retries as a text
    /// ([`Self::send_text`]). A first message to a handle starts the
    /// conversation.
    ///
    /// # Errors
    /// As [`Self::send_text`]. `Ok(None)` when the server took a body
    /// without a history line.
    pub async fn send_body(
        &self,
        to: &Target,
        body: Body,
        shown: Option<String>,
    ) -> Result<Option<StoredMessage>, ClientError> {
        self.send_body_as(to, body, shown, false, MessageId(rand::random())).await
    }

    /// As [`Self::send_body`], under the message id `message_id`;
    /// `accept_key_change` as in [`Self::send_text_with`].
    pub(crate) async fn send_body_as(
        &self,
        to: &Target,
        body: Body,
        shown: Option<String>,
        accept_key_change: bool,
        message_id: MessageId,
    ) -> Result<Option<StoredMessage>, ClientError> {
        let shown = shown.as_deref();
        if let Target::Conversation(id) = to {
            self.conversation(id)?;
        }
        // Encrypt only after every pending commit is processed: a message
        // must never go out at an epoch a removal already ended, nor miss a
        // member just added. Offline-first: when the server cannot be
        // reached, a message to a conversation this device has is queued
        // (and sent by the next command); a new conversation needs the
        // server's key packages.
        let offline = match self.catch_up().await {
            Ok(()) => None,
            Err(e) if is_transient(&e) => Some(e),
            Err(e) => return Err(e),
        };
        let online = offline.is_none();
        self.kt_blocked()?;
        match to {
            Target::Conversation(id) => {
                // Read again: catching up may have ended it.
                let row = self.conversation(id)?;
                if !row.active {
                    return Err(ClientError::Input(format!("you are no longer a member of {}", row.target())));
                }
                let mut handles: Vec<Handle> =
                    self.engine().members(&row.id)?.into_iter().map(|m| m.address.handle).collect();
                handles.dedup();
                self.check_key_changes(&handles, accept_key_change)?;
                self.check_members_accepted(&row.id, &format!("#{}", row.id.to_hex()))?;
                let group = row.kind == "group";
                self.send_content(row.id, &row.target(), group, &body, shown, message_id, online).await
            }
            Target::Direct(peer) => {
                self.check_key_changes(std::slice::from_ref(peer), accept_key_change)?;
                let existing = self.store().read(|tx| tx.direct_conversation(peer.as_str()))?;
                // A text that starts a conversation is kept with the staged
                // conversation, so a lost answer still sends it; any other
                // kind is sent once the conversation exists.
                let first = match (&body, shown) {
                    (Body::Text(t), Some(_)) => Some((message_id, t.clone())),
                    _ => None,
                };
                if let Some(c) = &existing {
                    self.check_members_accepted(c, &format!("#{}", c.to_hex()))?;
                }
                let conversation = match (existing, offline) {
                    (Some(c), _) => c,
                    (None, None) => self.start_direct(peer, first.clone()).await?,
                    (None, Some(e)) => {
                        return Err(ClientError::Network(format!(
                            "a first message to {peer} needs the server (for their keys), and it cannot be reached: {e}"
                        )))
                    }
                };
                match self.send_content(conversation, peer.as_str(), false, &body, shown, message_id, online).await {
                    Err(e) if existing.is_some() && e.code() == Some(ErrorCode::UnknownHandle) => {
                        // The peer's devices in this conversation are gone from
                        // the server (its keys changed, or devices went without
                        // a commit reaching us): start over with its current
                        // devices and move the message there.
                        self.store().write(|tx| {
                            tx.delete_message(&conversation, &message_id.0)?;
                            tx.deactivate_conversation(&conversation)
                        })?;
                        let fresh = self.start_direct(peer, first).await?;
                        self.send_content(fresh, peer.as_str(), false, &body, shown, message_id, true).await
                    }
                    other => other,
                }
            }
        }
    }

    async fn ack(&self, ids: Vec<u64>) -> Result<(), ClientError> {
        if ids.is_empty() {
            return Ok(());
        }
        let _: AckResponse = self.api.call(Method::POST, "/v1/inbox/ack", Some(&AckRequest { ids })).await?;
        Ok(())
    }

    /// Fetches and processes everything queued. Returns how many envelopes.
    async fn drain_inbox(&self, ack: bool) -> Result<usize, ClientError> {
        let mut total = 0;
        loop {
            let inbox: InboxResponse = self.api.call::<(), _>(Method::GET, "/v1/inbox?limit=500", None).await?;
            if inbox.messages.is_empty() {
                break;
            }
            let batch = self.process_fetched(&inbox.messages).await?;
            total += batch.ids.len();
            if ack {
                self.ack(batch.ids).await?;
                self.release_welcome_blobs(&batch.blobs).await;
            }
            // A Welcome whose blob could not be downloaded stays queued.
            if let Some(e) = batch.stopped {
                return Err(e);
            }
            if !ack {
                break;
            }
        }
        Ok(total)
    }

    /// Brings this device up to date: processes the inbox and commits the
    /// leave proposals it saw. Messages are stored for the next `receive`.
    ///
    /// # Errors
    /// Network, server and store errors.
    pub async fn sync(&self) -> Result<(), ClientError> {
        // A key switch whose answer was lost comes first: until it is
        // settled, this device may not know which key the server checks.
        self.finish_key_switch().await?;
        self.resolve_pending_commits_or_wait().await?;
        self.catch_up().await?;
        self.flush_outbox_inner(true).await
    }

    /// Processes the inbox, checks the directory and commits the leave
    /// proposals seen: everything a send must do before it encrypts.
    pub(crate) async fn catch_up(&self) -> Result<(), ClientError> {
        self.drain_inbox(true).await?;
        // An identity key handed over by another device of this account is
        // adopted as soon as the directory lists it, before the checks that
        // compare this account's keys with the directory.
        self.finish_key_switch().await?;
        self.check_members().await?;
        self.check_directory().await?;
        self.commit_pending_leaves_or_wait().await?;
        self.update_due_keys().await?;
        self.move_to_post_quantum().await
    }

    /// Checks the directory heads other members reported and this account's
    /// own directory entry.
    async fn check_directory(&self) -> Result<(), ClientError> {
        self.kt_check_gossip().await?;
        self.kt_monitor_self().await
    }

    fn emit(&self, on: &mut (dyn FnMut(&Received) + Send)) -> Result<usize, ClientError> {
        let dropped: Vec<Received> =
            self.take_dropped().into_iter().map(|d| Received::Dropped { from: d.from, reason: d.reason }).collect();
        let (unseen, alerts) = self.store().write(|tx| Ok((tx.take_unseen()?, tx.take_alerts()?)))?;
        let failed = self.take_failed_sends()?;
        let n = dropped.len() + unseen.len() + alerts.len() + failed.len();
        let mut unseen = unseen;
        self.mark_shown(&mut unseen)?;
        for m in unseen {
            on(&Received::Message(m));
        }
        for d in &dropped {
            on(d);
        }
        for f in failed {
            on(&Received::Failed(f));
        }
        for a in alerts {
            on(&Received::Alert(a));
        }
        // Not counted: nothing arrived.
        let sent = std::mem::take(&mut *self.sent.lock().unwrap_or_else(|p| p.into_inner()));
        for (c, m) in sent {
            if let Some(m) = self.store().read(|tx| tx.message(&c, &m))? {
                on(&Received::Sent(m));
            }
        }
        Ok(n)
    }

    /// Fetches, decrypts and stores everything queued, then reports every
    /// message not yet shown (including those other commands stored); when
    /// there was none, waits up to `wait` for messages pushed over the
    /// WebSocket. With `ack == false` nothing is acknowledged (the server
    /// delivers it again; the store shows it once).
    ///
    /// # Errors
    /// Network, server and store errors; messages that fail to decrypt are
    /// reported as [`Received::Dropped`], not as errors.
    pub async fn receive(
        &self,
        wait: Duration,
        ack: bool,
        on: &mut (dyn FnMut(&Received) + Send),
    ) -> Result<usize, ClientError> {
        if ack {
            self.finish_key_switch().await?;
        }
        self.resolve_pending_commits_or_wait().await?;
        self.drain_inbox(ack).await?;
        if ack {
            // A new identity key handed over by another device of this
            // account is adopted before this account's entry is checked.
            self.finish_key_switch().await?;
        }
        self.check_members().await?;
        self.check_directory().await?;
        if ack {
            // Only a device that acknowledged what it processed sends: a
            // flush may fetch the inbox again, acknowledging.
            self.commit_pending_leaves_or_wait().await?;
            self.flush_outbox_inner(true).await?;
        }
        let mut shown = self.emit(on)?;
        if shown == 0 && !wait.is_zero() {
            let deadline = Instant::now() + wait;
            let mut ws = self.api.connect().await?;
            while shown == 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(left, net::next_frame(&mut ws)).await {
                    Err(_) | Ok(Ok(None)) => break,
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(Some(ServerFrame::Messages { messages }))) => {
                        let batch = self.process_fetched(&messages).await?;
                        self.finish_key_switch().await?;
                        self.check_members().await?;
                        if ack {
                            net::send_ack(&mut ws, batch.ids).await?;
                            self.release_welcome_blobs(&batch.blobs).await;
                        }
                        if let Some(e) = batch.stopped {
                            return Err(e);
                        }
                        if ack {
                            self.commit_pending_leaves_or_wait().await?;
                        }
                        self.kt_check_gossip().await?;
                        shown += self.emit(on)?;
                    }
                    Ok(Ok(Some(ServerFrame::Error(e)))) => return Err(ClientError::Server { status: 0, body: e }),
                }
            }
            let _ = ws.close().await;
        }
        // The files of messages deleted for everyone in what came go now.
        self.sweep_expired()?;
        if ack {
            self.maintain_keys().await?;
        } else {
            self.refill_key_packages().await?;
        }
        Ok(shown)
    }

    /// Stays connected and reports messages as they are pushed, until the
    /// connection ends or an error occurs; `on_connected` hears when the
    /// connection is up and what was queued meanwhile was fetched and sent.
    async fn follow_with(
        &self,
        on: &mut (dyn FnMut(&Received) + Send),
        on_connected: &mut (dyn FnMut() + Send),
    ) -> Result<(), ClientError> {
        // A commit still without an answer is retried like a lost connection.
        self.resolve_pending_commits().await.map_err(|e| match e {
            ClientError::Pending(text) => ClientError::Network(text),
            e => e,
        })?;
        // What was queued while the server was away goes first, encrypted
        // after the inbox is processed.
        self.catch_up().await?;
        self.flush_outbox_inner(true).await?;
        self.maintain_keys().await?;
        self.emit(on)?;
        let mut ws = self.api.connect().await?;
        // Sends go out on this socket while it lives (the `Weak` dies
        // with it); cleared on the way out, so no send waits on a socket
        // nobody reads.
        self.set_frame_link(ws.frame_link().as_ref());
        let followed = self.follow_socket(&mut ws, on, on_connected).await;
        self.set_frame_link(None);
        followed
    }

    async fn follow_socket(
        &self,
        ws: &mut net::Socket,
        on: &mut (dyn FnMut(&Received) + Send),
        on_connected: &mut (dyn FnMut() + Send),
    ) -> Result<(), ClientError> {
        on_connected();
        let mut tick = tokio::time::interval(OUTBOX_RETRY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let frame = tokio::select! {
                frame = net::next_frame(ws) => frame?,
                _ = tick.tick() => {
                    self.sweep_expired()?;
                    // Another command queued a send (a 503, a timeout) while
                    // this one stayed connected.
                    if !self.store().read(|tx| tx.outbox_is_empty())? {
                        self.flush_outbox_inner(false).await?;
                    }
                    // A device that stays connected for weeks (the daemon,
                    // the TUI) rotates its keys like one that runs commands,
                    // and its receipts never leave other members more
                    // generations behind than they accept (`rotation`).
                    self.update_due_keys().await?;
                    self.move_to_post_quantum().await?;
                    self.emit(on)?;
                    continue;
                }
            };
            match frame {
                None => return Err(ClientError::Network("the server closed the connection".into())),
                Some(ServerFrame::Messages { messages }) => {
                    let batch = self.process_fetched(&messages).await?;
                    self.finish_key_switch().await?;
                    self.check_members().await?;
                    net::send_ack(ws, batch.ids).await?;
                    self.release_welcome_blobs(&batch.blobs).await;
                    // What stopped short is fetched again after reconnecting.
                    if let Some(e) = batch.stopped {
                        return Err(e);
                    }
                    self.commit_pending_leaves_or_wait().await?;
                    self.kt_check_gossip().await?;
                    if !self.store().read(|tx| tx.outbox_is_empty())? {
                        self.flush_outbox_inner(true).await?;
                    }
                    self.emit(on)?;
                }
                Some(ServerFrame::Error(e)) => return Err(ClientError::Server { status: 0, body: e }),
            }
        }
    }

    /// [`Self::follow_with`], reconnecting after network loss and server
    /// errors (backoff from 0.5 s doubling to 10 s, reset after a connection
    /// that lasted); `on_retry` hears each failure and the wait before the
    /// next try; `on_connected` each time the device is connected and
    /// caught up. Returns only on what retrying cannot fix (refused
    /// credentials, a removed device, a local store error). The one
    /// receive loop every front end shares, through [`Client::run`].
    ///
    /// # Errors
    /// As said.
    pub(crate) async fn follow_reconnecting_with(
        &self,
        on: &mut (dyn FnMut(&Received) + Send),
        on_retry: &mut (dyn FnMut(&ClientError, Duration) + Send),
        on_connected: &mut (dyn FnMut() + Send),
    ) -> Result<(), ClientError> {
        const FIRST: Duration = Duration::from_millis(500);
        let mut backoff = FIRST;
        loop {
            let started = Instant::now();
            let e = match self.follow_with(on, on_connected).await {
                Ok(()) => return Ok(()),
                Err(e) if is_transient(&e) => e,
                Err(e) => return Err(e),
            };
            if started.elapsed() > Duration::from_secs(10) {
                backoff = FIRST;
            }
            on_retry(&e, backoff);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// The conversation `id` (not the hidden one of this account's own
    /// devices), or [`ClientError::UnknownTarget`].
    ///
    /// # Errors
    /// As said; store errors.
    pub fn conversation(&self, id: &ConversationId) -> Result<ConversationRow, ClientError> {
        match self.store().read(|tx| tx.conversation(id))? {
            Some(row) if row.kind != "own" => Ok(row),
            _ => Err(ClientError::UnknownTarget(format!("#{}", id.to_hex()))),
        }
    }

    /// History of the conversation `id`, oldest first, this account's
    /// messages and system lines included.
    ///
    /// # Errors
    /// [`ClientError::UnknownTarget`] for a conversation this device does
    /// not have.
    pub fn history(&self, id: &ConversationId) -> Result<Vec<StoredMessage>, ClientError> {
        let row = self.conversation(id)?;
        // A conversation that moved to post-quantum keys goes on under a
        // new id: its history is the old ones' and its own.
        let rows = self.store().read(|tx| {
            let mut rows = Vec::new();
            for old in subrosa_session::moves::moved_into(tx, &row.id)? {
                rows.extend(tx.conversation(&old)?);
            }
            rows.push(row);
            Ok(rows)
        })?;
        let mut history = self.store().read(|tx| tx.history(&rows))?;
        self.mark_shown(&mut history)?;
        Ok(history)
    }

    /// History with `peer`: every direct conversation with them (a new one
    /// starts when their devices change), oldest first.
    ///
    /// # Errors
    /// [`ClientError::UnknownTarget`] when there is none.
    pub fn history_with(&self, peer: &Handle) -> Result<Vec<StoredMessage>, ClientError> {
        let convs = self.store().read(|tx| tx.conversations_with(peer.as_str()))?;
        if convs.is_empty() {
            return Err(ClientError::UnknownTarget(peer.to_string()));
        }
        let mut history = self.store().read(|tx| tx.history(&convs))?;
        self.mark_shown(&mut history)?;
        Ok(history)
    }

    /// Contacts, by handle.
    ///
    /// # Errors
    /// Store errors.
    pub fn contacts(&self) -> Result<Vec<Contact>, ClientError> {
        self.store().read(|tx| tx.contacts())
    }
}

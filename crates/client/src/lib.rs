//! The Subrosa client: the protocol engine of `subrosa-core` wrapped with
//! networking to the server and an encrypted local store.
//!
//! [`Subrosa`] is one device of one account. Every state change is committed
//! to the store before anything leaves the device, and a delivered message
//! is acknowledged only after the store committed it.

mod conversations;
mod devices;
pub mod kt;
pub mod net;
pub mod store;

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use sha2::{Digest, Sha256};
use subrosa_core::content::{Body, Content};
use subrosa_core::{ConversationKind, CoreError, DeviceIdentity, Engine, Event};
use subrosa_proto::{
    AckRequest, AckResponse, ConversationId, DeviceAddress, DeviceRecord, Empty, Envelope, ErrorBody, ErrorCode,
    Handle, InboxResponse, KeyPackageCount, KeyPackageUpload, MessageId, MessageKind, RegisterRequest, SendId,
    SendPart, SendRequest, SendResponse, ServerFrame, B64,
};

pub use conversations::{GroupSummary, Target};
pub use devices::{DeviceEntry, LinkApproved};
use store::{now_ms, GroupStore, KeyPackageStore, Store};
pub use store::{Contact, StoredMessage};

/// Everything that can go wrong in the client, each with a one-line message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The passphrase does not open the store.
    #[error("wrong passphrase: the local store could not be opened (nothing was changed)")]
    WrongPassphrase,
    /// No account in this home directory.
    #[error("no account in {0}: run `subrosa register HANDLE --server URL` first")]
    NotRegistered(String),
    /// The home directory already holds an account.
    #[error("{0} already holds an account; use another --home")]
    AlreadyRegistered(String),
    /// A server URL that is not usable.
    #[error("invalid server URL {0}")]
    BadUrl(String),
    /// Plain http to a non-loopback host.
    #[error("refusing plain http to {0}: use https:// (plain http is allowed only to a loopback address)")]
    InsecureUrl(String),
    /// The server refused the request.
    #[error("server refused ({}): {}", .body.code.as_str(), .body.message)]
    Server {
        /// HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
    },
    /// The server could not be reached.
    #[error("network: {0}")]
    Network(String),
    /// The server answered something unexpected.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Bad user input.
    #[error("{0}")]
    Input(String),
    /// The target is neither a contact nor a conversation.
    #[error("unknown conversation {0:?}: no conversation with that handle or group yet")]
    UnknownTarget(String),
    /// A key package or member that does not match the expected identity.
    #[error("refused keys for {handle}: {why}")]
    KeyMismatch {
        /// Whose.
        handle: String,
        /// What did not match.
        why: String,
    },
    /// A verified contact's identity key changed.
    #[error("{0}'s identity key changed since you verified it: compare safety numbers again (`subrosa verify {0}`), or send with --accept-key-change")]
    KeyChanged(String),
    /// The server showed this device a key directory inconsistent with what
    /// it or another member saw before.
    #[error("key directory fork: {0}; sending is blocked on this device")]
    DirectoryFork(String),
    /// Protocol engine failure.
    #[error("{0}")]
    Core(#[from] CoreError),
    /// Local store failure.
    #[error("local store: {0}")]
    Store(String),
    /// File system failure.
    #[error("{0}")]
    Io(String),
    /// The work is stored on this device but not yet on the server (it could
    /// not be reached, or did not answer): the next command finishes it,
    /// exactly once. The CLI exits 75 (EX_TEMPFAIL) for this.
    #[error("{0}")]
    Pending(String),
    /// A bug in Subrosa.
    #[error("internal error: {0}")]
    Bug(String),
}

impl ClientError {
    fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { body, .. } => Some(body.code),
            _ => None,
        }
    }
}

type DeviceEngine = Engine<subrosa_core::DefaultCrypto, GroupStore, KeyPackageStore>;

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
}

/// How many one-time key packages to keep on the server.
pub(crate) const KEY_PACKAGE_TARGET: u64 = 50;
/// Refill when fewer than this remain.
const KEY_PACKAGE_LOW: u64 = 10;

/// One device of one account.
pub struct Subrosa {
    store: Store,
    engine: DeviceEngine,
    api: net::Api,
    /// Messages dropped while processing, reported by the next receive.
    dropped: std::sync::Mutex<Vec<Received>>,
    /// Conversations with a leave proposal this device should commit.
    to_commit: std::sync::Mutex<Vec<(ConversationId, DeviceAddress)>>,
    /// Per conversation, the sender of the last commit this device could
    /// not process (named if the conversation turns out stuck).
    unprocessable: std::sync::Mutex<std::collections::HashMap<ConversationId, DeviceAddress>>,
}

impl std::fmt::Debug for Subrosa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subrosa").field("device", &self.engine.identity()).finish_non_exhaustive()
    }
}

pub(crate) const META_IDENTITY: &str = "identity";
pub(crate) const META_SERVER: &str = "server_url";

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
        store.set_meta(META_IDENTITY, &identity.to_secret_bytes()?)?;
        store.set_meta(META_SERVER, server.as_bytes())?;
        let me = Self::assemble(store, identity, server)?;
        let id = me.engine.identity();
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
        me.upload_key_packages(KEY_PACKAGE_TARGET as usize, true).await?;
        Ok(me)
    }

    /// Opens the device in `home`.
    ///
    /// # Errors
    /// [`ClientError::NotRegistered`], [`ClientError::WrongPassphrase`].
    pub fn open(home: &Path, passphrase: &str) -> Result<Self, ClientError> {
        let store = Store::open(home, passphrase)?;
        let crypto = subrosa_core::default_crypto();
        let secret =
            store.meta(META_IDENTITY)?.ok_or_else(|| ClientError::NotRegistered(home.display().to_string()))?;
        let identity = DeviceIdentity::from_secret_bytes(&crypto, &secret)?;
        let server = store.meta(META_SERVER)?.ok_or_else(|| ClientError::Store("no server URL stored".into()))?;
        let server = String::from_utf8(server.to_vec()).map_err(|_| ClientError::Store("server URL".into()))?;
        Self::assemble(store, identity, &server)
    }

    pub(crate) fn assemble(store: Store, identity: DeviceIdentity, server: &str) -> Result<Self, ClientError> {
        let crypto = subrosa_core::default_crypto();
        let api = net::Api::new(server, identity.clone(), crypto.clone())?;
        let engine = Engine::new(crypto, identity, store.groups(), store.key_packages());
        Ok(Subrosa {
            store,
            engine,
            api,
            dropped: std::sync::Mutex::new(Vec::new()),
            to_commit: std::sync::Mutex::new(Vec::new()),
            unprocessable: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// This account's handle.
    pub fn handle(&self) -> &Handle {
        self.engine.identity().handle()
    }

    /// This device's identity.
    pub fn identity(&self) -> &DeviceIdentity {
        self.engine.identity()
    }

    /// The signed server API of this device.
    pub fn api(&self) -> &net::Api {
        &self.api
    }

    /// The server URL.
    pub fn server(&self) -> &str {
        self.api.base().as_str()
    }

    pub(crate) async fn upload_key_packages(&self, count: usize, last_resort: bool) -> Result<(), ClientError> {
        let (one_time, last) = self.store.transaction(|| {
            let mut one_time = Vec::with_capacity(count);
            for _ in 0..count {
                one_time.push(B64(self.engine.generate_key_package()?));
            }
            let last = if last_resort {
                let kp = self.engine.generate_key_package()?;
                self.store.mark_newest_key_package_last_resort()?;
                Some(B64(kp))
            } else {
                None
            };
            Ok((one_time, last))
        })?;
        let _: KeyPackageCount = self
            .api
            .call(Method::POST, "/v1/keypackages", Some(&KeyPackageUpload { one_time, last_resort: last }))
            .await?;
        Ok(())
    }

    async fn refill_key_packages(&self) -> Result<(), ClientError> {
        let count: KeyPackageCount = self.api.call::<(), _>(Method::GET, "/v1/keypackages", None).await?;
        if count.one_time < KEY_PACKAGE_LOW || !count.last_resort {
            self.upload_key_packages(
                (KEY_PACKAGE_TARGET - count.one_time.min(KEY_PACKAGE_TARGET)) as usize,
                !count.last_resort,
            )
            .await?;
        }
        Ok(())
    }

    async fn post_outbox(&self, send_id: &[u8], request: Vec<u8>) -> Result<(), ClientError> {
        match self.api.call_raw::<SendResponse>(Method::POST, "/v1/messages", request).await {
            Ok(_) => self.store.pop_outbox(send_id),
            Err(e @ (ClientError::Network(_) | ClientError::Protocol(_))) => Err(ClientError::Network(format!(
                "{e}; the message is stored and will be sent by the next send or receive"
            ))),
            Err(e @ ClientError::Server { status, .. }) if status >= 500 || status == 429 => Err(ClientError::Network(
                format!("{e}; the message is stored and will be sent by the next send or receive"),
            )),
            Err(e) => {
                // The server will never take it (bad request): drop it from the queue.
                self.store.pop_outbox(send_id)?;
                Err(e)
            }
        }
    }

    /// Sends what earlier commands queued but could not deliver.
    ///
    /// # Errors
    /// Network and server errors.
    pub async fn flush_outbox(&self) -> Result<(), ClientError> {
        for (send_id, request) in self.store.outbox()? {
            self.post_outbox(&send_id, request).await?;
        }
        Ok(())
    }

    /// Encrypts `content` for a conversation, stores it in history and the
    /// outbox in one transaction, then posts it.
    async fn send_content(
        &self,
        conversation: ConversationId,
        target: &str,
        group: bool,
        text: &str,
        message_id: MessageId,
    ) -> Result<StoredMessage, ClientError> {
        let sent_at = now_ms();
        let kt_head = self.kt_latest()?;
        let send_id = SendId(rand::random());
        let me = self.engine.identity().address();
        let stored = StoredMessage {
            id: message_id.to_hex(),
            conversation: conversation.to_hex(),
            target: target.to_string(),
            group,
            from: me.handle.to_string(),
            device: me.device.to_hex(),
            sent_at,
            received_at: sent_at,
            text: text.to_string(),
            outgoing: true,
            system: false,
        };
        let request = self.store.transaction(|| {
            let seq = self.store.next_seq(&conversation)?;
            let content = Content::text(message_id, sent_at, text).with_context(seq, kt_head);
            let (ciphertext, recipients) = self.engine.encrypt(&conversation, &content)?;
            let req = SendRequest {
                conversation,
                send_id,
                commit: None,
                parts: vec![SendPart { kind: MessageKind::Application, recipients, ciphertext: B64(ciphertext) }],
            };
            let bytes = serde_json::to_vec(&req).map_err(|e| ClientError::Bug(e.to_string()))?;
            self.store.insert_message(&stored, &conversation, &message_id.0, true)?;
            self.store.push_outbox(&send_id.0, &bytes)?;
            Ok(bytes)
        })?;
        self.post_outbox(&send_id.0, request).await?;
        Ok(stored)
    }

    /// Sends a text message to `target` (a group name or a handle; `@handle`
    /// forces a handle). The message is stored in history and queued before
    /// it is sent; if the server cannot be reached it stays queued and is
    /// retried (idempotently) by the next send or receive.
    ///
    /// # Errors
    /// Unknown target, key mismatch, network and server errors.
    pub async fn send_text(&self, target: &str, text: &str) -> Result<StoredMessage, ClientError> {
        self.send_text_with(target, text, false).await
    }

    /// As [`Self::send_text`]; `accept_key_change` sends even when a verified
    /// contact's identity key changed (they stay unverified).
    ///
    /// # Errors
    /// As [`Self::send_text`], and [`ClientError::KeyChanged`].
    pub async fn send_text_with(
        &self,
        target: &str,
        text: &str,
        accept_key_change: bool,
    ) -> Result<StoredMessage, ClientError> {
        if text.is_empty() {
            return Err(ClientError::Input("empty message".into()));
        }
        if text.len() > subrosa_core::content::MAX_TEXT_BYTES {
            return Err(ClientError::Input(format!("message too long: {} bytes, at most 64 KiB", text.len())));
        }
        // Resolve the name the user typed before catching up (a concurrent
        // rename must not make it unknown), but encrypt only after every
        // pending commit is processed: a message must never go out at an
        // epoch a removal already ended, nor miss a member just added.
        let typed = self.resolve(target);
        self.sync().await?;
        self.kt_blocked()?;
        let resolved = match typed {
            Ok(Target::Group(row)) => {
                Target::Group(self.store.conversation(&row.id)?.ok_or(ClientError::Bug("group vanished".into()))?)
            }
            _ => self.resolve(target)?,
        };
        match resolved {
            Target::Group(row) => {
                if !row.active {
                    return Err(ClientError::Input(format!("you are no longer a member of {}", row.name)));
                }
                let mut handles: Vec<Handle> =
                    self.engine.members(&row.id)?.into_iter().map(|m| m.address.handle).collect();
                handles.dedup();
                self.check_key_changes(&handles, accept_key_change)?;
                self.send_content(row.id, &row.name, true, text, MessageId(rand::random())).await
            }
            Target::Direct(peer) => {
                self.check_key_changes(std::slice::from_ref(&peer), accept_key_change)?;
                let existing = self.store.direct_conversation(peer.as_str())?;
                let message_id = MessageId(rand::random());
                let first = Some((message_id, text.to_string()));
                let conversation = match existing {
                    Some(c) => c,
                    None => self.start_direct(&peer, first.clone()).await?,
                };
                match self.send_content(conversation, peer.as_str(), false, text, message_id).await {
                    Err(e) if existing.is_some() && e.code() == Some(ErrorCode::UnknownHandle) => {
                        // The peer's devices in this conversation are gone from
                        // the server (its keys changed, or devices went without
                        // a commit reaching us): start over with its current
                        // devices and move the message there.
                        self.store.transaction(|| {
                            self.store.delete_message(&conversation, &message_id.0)?;
                            self.store.deactivate_conversation(&conversation)
                        })?;
                        let fresh = self.start_direct(&peer, first).await?;
                        self.send_content(fresh, peer.as_str(), false, text, message_id).await
                    }
                    other => other,
                }
            }
        }
    }

    /// Processes one envelope inside one store transaction; what it yields is
    /// stored (and shown by the next receive). The caller acknowledges it.
    fn process_envelope(&self, env: &Envelope) -> Result<(), ClientError> {
        let digest = Sha256::digest(env.ciphertext.as_slice()).to_vec();
        if self.store.is_processed(&digest)? {
            // Delivered again after a crash before the ack: already stored.
            return Ok(());
        }
        let result = self.store.transaction(|| {
            let event = match env.kind {
                MessageKind::Welcome => self.engine.join(env.ciphertext.as_slice())?,
                MessageKind::Commit | MessageKind::Application => {
                    if let Some(row) = self.store.conversation(&env.conversation)? {
                        if !row.active {
                            return Err(CoreError::UnknownConversation.into());
                        }
                    }
                    // The echo of this device's own staged commit, whose
                    // answer was lost: processing it applies the staged
                    // commit (mls-rs recognises it), then it is finished
                    // as if the answer had come.
                    let own = match env.kind {
                        MessageKind::Commit => self
                            .store
                            .pending_commit(&env.conversation)?
                            .filter(|p| p.commit_digest == digest && env.sender == self.identity().address()),
                        _ => None,
                    };
                    let event = self.engine.process(&env.conversation, env.ciphertext.as_slice())?;
                    if let Some(own) = own {
                        self.finish_pending(&own)?;
                        return self.store.mark_processed(&digest);
                    }
                    event
                }
            };
            self.apply_event(env, event)?;
            self.store.mark_processed(&digest)
        });
        match result {
            Ok(()) => Ok(()),
            Err(ClientError::Core(e)) => {
                if env.kind == MessageKind::Commit {
                    self.lock_unprocessable().insert(env.conversation, env.sender.clone());
                    if self.store.conversation(&env.conversation)?.is_some_and(|r| r.active) {
                        // The server ordered it, so nobody can commit in this
                        // conversation any more (RFC 9750 §5.3): say who.
                        self.store.add_alert(&format!(
                            "{} sent a commit to conversation #{} that could not be processed; changes there will fail until it is recreated without them",
                            env.sender,
                            env.conversation.to_hex()
                        ))?;
                    }
                }
                // Undecryptable or unauthenticated: tampered, replayed, not
                // for us, or from a device we refuse. Drop it (it can never
                // become readable) and say so.
                self.store.mark_processed(&digest)?;
                self.lock_dropped().push(Received::Dropped { from: env.sender.to_string(), reason: e.to_string() });
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn lock_dropped(&self) -> std::sync::MutexGuard<'_, Vec<Received>> {
        self.dropped.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock_unprocessable(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<ConversationId, DeviceAddress>> {
        self.unprocessable.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_to_commit(&self) -> std::sync::MutexGuard<'_, Vec<(ConversationId, DeviceAddress)>> {
        self.to_commit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a system line (membership, renames) in a conversation's history.
    pub(crate) fn system_line(
        &self,
        row: &store::ConversationRow,
        from: &DeviceAddress,
        text: String,
    ) -> Result<(), ClientError> {
        let id: [u8; 16] = rand::random();
        let now = now_ms();
        let m = StoredMessage {
            id: hex::encode(id),
            conversation: row.id.to_hex(),
            target: row.target(),
            group: row.kind == "group",
            from: from.handle.to_string(),
            device: from.device.to_hex(),
            sent_at: now,
            received_at: now,
            text,
            outgoing: from.handle == *self.handle(),
            system: true,
        };
        let seen = m.outgoing && from.device == self.identity().device_id();
        self.store.insert_message(&m, &row.id, &id, seen).map(|_| ())
    }

    fn who(&self, h: &Handle) -> String {
        if h == self.handle() {
            "you".into()
        } else {
            h.to_string()
        }
    }

    fn apply_event(&self, env: &Envelope, event: Event) -> Result<(), ClientError> {
        let me = self.handle().clone();
        match event {
            Event::Joined { conversation, info, members } => {
                if !members.iter().any(|m| m.address == env.sender) {
                    return Err(CoreError::IdentityMismatch("welcome from a device that is not a member".into()).into());
                }
                for m in &members {
                    self.check_member_key(&m.address.handle, &m.identity_key)?;
                }
                match info.kind {
                    ConversationKind::Direct => {
                        let peer = members
                            .iter()
                            .map(|m| &m.address.handle)
                            .find(|h| **h != me)
                            .ok_or(ClientError::Core(CoreError::Malformed("direct conversation without a peer")))?;
                        self.store.add_conversation(&conversation, "direct", "", Some(peer.as_str()))?;
                    }
                    ConversationKind::Group => {
                        self.store.add_conversation(&conversation, "group", &info.name, None)?;
                        let row = self.conversation_row(&conversation)?;
                        let text = if env.sender.handle == me {
                            format!("this device joined {}", info.name)
                        } else {
                            format!("{} added you to {}", env.sender.handle, info.name)
                        };
                        self.system_line(&row, &env.sender, text)?;
                    }
                }
                Ok(())
            }
            Event::Message { conversation, sender, content } => {
                if sender.address != env.sender {
                    return Err(CoreError::IdentityMismatch(
                        "server-claimed sender differs from the MLS sender".into(),
                    )
                    .into());
                }
                self.check_member_key(&sender.address.handle, &sender.identity_key)?;
                let row = self.conversation_row(&conversation)?;
                if let Some((epoch, root)) = content.kt_head {
                    self.store.push_kt_gossip(epoch, &root, sender.address.handle.as_str())?;
                }
                let text = match content.body {
                    Body::Text(t) => t,
                    _ => return Ok(()),
                };
                let late = self.note_sequence(&row, &sender.address, content.seq)?;
                let m = StoredMessage {
                    id: content.message_id.to_hex(),
                    conversation: conversation.to_hex(),
                    target: row.target(),
                    group: row.kind == "group",
                    from: sender.address.handle.to_string(),
                    device: sender.address.device.to_hex(),
                    sent_at: content.sent_at_ms,
                    received_at: now_ms(),
                    text,
                    outgoing: sender.address.handle == me,
                    system: false,
                };
                // A sender's retry carries the same message id: shown once.
                let new = self.store.insert_message(&m, &conversation, &content.message_id.0, false)?;
                if late && new {
                    self.system_line(
                        &row,
                        &sender.address,
                        format!("the message above from {} arrived out of order", self.who(&sender.address.handle)),
                    )?;
                }
                Ok(())
            }
            Event::Commit { conversation, committer, added, removed, removed_self, left, renamed, .. } => {
                // A device whose certificate is not by its account's known
                // identity key is refused: the commit is not applied.
                for m in &added {
                    self.check_member_key(&m.address.handle, &m.identity_key)?;
                }
                let mut row = self.conversation_row(&conversation)?;
                let by = &committer.address;
                if let Some(info) = renamed {
                    self.store.set_conversation_name(&conversation, &info.name)?;
                    row.name = info.name.clone();
                    self.system_line(&row, by, format!("{} renamed the group to {}", self.who(&by.handle), info.name))?;
                }
                let remaining: Vec<DeviceAddress> = if removed_self {
                    Vec::new()
                } else {
                    self.engine.members(&conversation)?.into_iter().map(|m| m.address).collect()
                };
                let mut handles: Vec<&Handle> = added.iter().map(|m| &m.address.handle).collect();
                handles.dedup();
                for h in handles {
                    let already = remaining.iter().any(|a| a.handle == *h && !added.iter().any(|m| m.address == *a));
                    let text = if already || *h == by.handle {
                        format!("{}'s new device joined", self.who(h))
                    } else {
                        format!("{} added {}", self.who(&by.handle), self.who(h))
                    };
                    self.system_line(&row, by, text)?;
                }
                let mut gone: Vec<&DeviceAddress> = removed.iter().map(|m| &m.address).collect();
                gone.dedup_by(|a, b| a.handle == b.handle);
                for a in gone {
                    let still_there = remaining.iter().any(|r| r.handle == a.handle);
                    let text = if left.contains(a) {
                        format!("{} left", self.who(&a.handle))
                    } else if still_there || a.handle == by.handle {
                        format!("{} removed a device of {}", self.who(&by.handle), self.who(&a.handle))
                    } else {
                        format!("{} removed {}", self.who(&by.handle), self.who(&a.handle))
                    };
                    self.system_line(&row, by, text)?;
                }
                if removed_self {
                    self.store.deactivate_conversation(&conversation)?;
                } else if let Some(server) = &env.roster {
                    self.compare_roster(&conversation, server, &remaining)?;
                }
                Ok(())
            }
            Event::LeaveProposed { conversation, member } => {
                self.lock_to_commit().push((conversation, member.address));
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Compares the roster the server keeps for a conversation (sent with
    /// each commit) with the MLS roster after it: a device the server lets
    /// send there that is not a member is an alert. (Members the server
    /// left out are not: a revoked device leaves the server's roster before
    /// the commit that removes it.)
    fn compare_roster(
        &self,
        conversation: &ConversationId,
        server: &[DeviceAddress],
        members: &[DeviceAddress],
    ) -> Result<(), ClientError> {
        let members: std::collections::HashSet<&DeviceAddress> = members.iter().collect();
        let extra: Vec<String> = server.iter().filter(|a| !members.contains(a)).map(|a| a.to_string()).collect();
        if extra.is_empty() {
            return Ok(());
        }
        self.store.add_alert(&format!(
            "the server lets {} send to conversation #{}, though not a member: it does not keep this conversation's roster honestly",
            extra.join(", "),
            conversation.to_hex()
        ))
    }

    /// Notes a sender's sequence number: a gap becomes a system line before
    /// the message (the server dropped or is withholding messages). Returns
    /// true when the message is older than one already shown (reordered).
    fn note_sequence(&self, row: &store::ConversationRow, from: &DeviceAddress, seq: u64) -> Result<bool, ClientError> {
        if seq == 0 || (from.handle == *self.handle() && from.device == self.identity().device_id()) {
            return Ok(false);
        }
        let device = format!("{}/{}", from.handle, from.device.to_hex());
        match self.store.arrived_seq(&row.id, &device, seq)? {
            None => Ok(true),
            Some(0) => Ok(false),
            Some(missing) => {
                let what = if missing == 1 { "1 message".to_string() } else { format!("{missing} messages") };
                self.system_line(
                    row,
                    from,
                    format!(
                        "{what} from {} did not arrive: the server dropped or is withholding them",
                        self.who(&from.handle)
                    ),
                )?;
                Ok(false)
            }
        }
    }

    fn conversation_row(&self, id: &ConversationId) -> Result<store::ConversationRow, ClientError> {
        self.store.conversation(id)?.ok_or(ClientError::Core(CoreError::UnknownConversation))
    }

    /// Pins a contact's identity key on first sight; refuses a different one.
    /// For this account's own handle, the key must be our own identity key.
    fn check_member_key(&self, handle: &Handle, identity_key: &[u8]) -> Result<(), ClientError> {
        if handle == self.handle() {
            return if identity_key == self.identity().identity_public() {
                Ok(())
            } else {
                Err(CoreError::IdentityMismatch("a device of this account not certified by its identity key".into())
                    .into())
            };
        }
        match self.store.contact_key(handle.as_str())? {
            None => self.store.pin_contact(handle.as_str(), identity_key),
            Some(k) if k == identity_key => Ok(()),
            Some(_) => Err(CoreError::IdentityMismatch(format!(
                "{handle}'s identity key differs from the one this device has seen"
            ))
            .into()),
        }
    }

    async fn ack(&self, ids: Vec<u64>) -> Result<(), ClientError> {
        if ids.is_empty() {
            return Ok(());
        }
        let _: AckResponse = self.api.call(Method::POST, "/v1/inbox/ack", Some(&AckRequest { ids })).await?;
        Ok(())
    }

    fn process_batch(&self, envs: &[Envelope]) -> Result<Vec<u64>, ClientError> {
        let mut ids = Vec::with_capacity(envs.len());
        for env in envs {
            self.process_envelope(env)?;
            ids.push(env.id);
        }
        Ok(ids)
    }

    /// Fetches and processes everything queued. Returns how many envelopes.
    async fn drain_inbox(&self, ack: bool) -> Result<usize, ClientError> {
        let mut total = 0;
        loop {
            let inbox: InboxResponse = self.api.call::<(), _>(Method::GET, "/v1/inbox?limit=500", None).await?;
            if inbox.messages.is_empty() {
                break;
            }
            let ids = self.process_batch(&inbox.messages)?;
            total += ids.len();
            if !ack {
                break;
            }
            self.ack(ids).await?;
        }
        Ok(total)
    }

    /// Brings this device up to date: processes the inbox and commits the
    /// leave proposals it saw. Messages are stored for the next `receive`.
    ///
    /// # Errors
    /// Network, server and store errors.
    pub async fn sync(&self) -> Result<(), ClientError> {
        self.resolve_pending_commits_or_wait().await?;
        self.flush_outbox().await?;
        self.drain_inbox(true).await?;
        self.check_directory().await?;
        self.commit_pending_leaves_or_wait().await
    }

    /// Checks the directory heads other members reported and this account's
    /// own directory entry.
    async fn check_directory(&self) -> Result<(), ClientError> {
        self.kt_check_gossip().await?;
        self.kt_monitor_self().await
    }

    fn emit(&self, on: &mut dyn FnMut(&Received)) -> Result<usize, ClientError> {
        let dropped: Vec<Received> = std::mem::take(&mut *self.lock_dropped());
        let unseen = self.store.take_unseen()?;
        let alerts = self.store.take_alerts()?;
        let n = dropped.len() + unseen.len() + alerts.len();
        for m in unseen {
            on(&Received::Message(m));
        }
        for d in &dropped {
            on(d);
        }
        for a in alerts {
            on(&Received::Alert(a));
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
        on: &mut dyn FnMut(&Received),
    ) -> Result<usize, ClientError> {
        self.resolve_pending_commits_or_wait().await?;
        self.flush_outbox().await?;
        self.drain_inbox(ack).await?;
        self.check_directory().await?;
        if ack {
            self.commit_pending_leaves_or_wait().await?;
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
                        let ids = self.process_batch(&messages)?;
                        if ack {
                            net::send_ack(&mut ws, ids).await?;
                            self.commit_pending_leaves_or_wait().await?;
                        }
                        self.kt_check_gossip().await?;
                        shown += self.emit(on)?;
                    }
                    Ok(Ok(Some(ServerFrame::Error(e)))) => return Err(ClientError::Server { status: 0, body: e }),
                }
            }
            let _ = ws.close(None).await;
        }
        self.refill_key_packages().await?;
        Ok(shown)
    }

    /// Stays connected and reports messages as they are pushed, until the
    /// connection ends or an error occurs.
    ///
    /// # Errors
    /// Network, server and store errors.
    pub async fn follow(&self, on: &mut dyn FnMut(&Received)) -> Result<(), ClientError> {
        // A commit still without an answer is retried like a lost connection.
        self.resolve_pending_commits().await.map_err(|e| match e {
            ClientError::Pending(text) => ClientError::Network(text),
            e => e,
        })?;
        self.flush_outbox().await?;
        self.refill_key_packages().await?;
        self.emit(on)?;
        let mut ws = self.api.connect().await?;
        loop {
            match net::next_frame(&mut ws).await? {
                None => return Err(ClientError::Network("the server closed the connection".into())),
                Some(ServerFrame::Messages { messages }) => {
                    let ids = self.process_batch(&messages)?;
                    net::send_ack(&mut ws, ids).await?;
                    self.commit_pending_leaves_or_wait().await?;
                    self.kt_check_gossip().await?;
                    self.emit(on)?;
                }
                Some(ServerFrame::Error(e)) => return Err(ClientError::Server { status: 0, body: e }),
            }
        }
    }

    /// [`Self::follow`], reconnecting after network loss and server errors
    /// (backoff from 0.5 s doubling to 10 s, reset after a connection that
    /// lasted); `on_retry` hears each failure and the wait before the next
    /// try. Returns only on what retrying cannot fix (refused credentials,
    /// a removed device, a local store error).
    ///
    /// # Errors
    /// As [`Self::follow`], minus the ones it retries.
    pub async fn follow_reconnecting(
        &self,
        on: &mut dyn FnMut(&Received),
        on_retry: &mut dyn FnMut(&ClientError, Duration),
    ) -> Result<(), ClientError> {
        const FIRST: Duration = Duration::from_millis(500);
        let mut backoff = FIRST;
        loop {
            let started = Instant::now();
            let e = match self.follow(on).await {
                Ok(()) => return Ok(()),
                Err(e @ ClientError::Network(_)) => e,
                Err(e @ ClientError::Server { status, .. }) if status >= 500 => e,
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

    /// History of a conversation (a group name or a handle), oldest first,
    /// this account's messages and system lines included.
    ///
    /// # Errors
    /// [`ClientError::UnknownTarget`] when there is no conversation.
    pub fn history(&self, target: &str) -> Result<Vec<StoredMessage>, ClientError> {
        let convs = match self.resolve(target)? {
            Target::Group(row) => vec![row],
            Target::Direct(peer) => self.store.conversations_with(peer.as_str())?,
        };
        if convs.is_empty() {
            return Err(ClientError::UnknownTarget(target.to_string()));
        }
        self.store.history(&convs)
    }

    /// Contacts, by handle.
    ///
    /// # Errors
    /// Store errors.
    pub fn contacts(&self) -> Result<Vec<Contact>, ClientError> {
        self.store.contacts()
    }
}

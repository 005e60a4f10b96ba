//! The session: one device's messenger rules over its store.
//!
//! [`Session`] applies what arrives (Welcomes, commits, application
//! messages) inside one store transaction per envelope: the checks that
//! refuse a takeover or a key this device has not pinned, the sequence
//! numbers that reveal a gap or a reorder, the system lines, the handover of
//! a new identity key. It never touches the network: what needs the server
//! afterwards (a leave to commit, member devices to look up in the key
//! directory) is left in the store or in [`Session::next_leave_to_commit`]
//! for the caller, and the time comes from its [`Clock`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subrosa_core::content::{Body, Content, IdentityHandover};
use subrosa_core::{ConversationKind, CoreError, DeviceIdentity, Engine, Event, MemberInfo};
use subrosa_proto::{ConversationId, DeviceAddress, Envelope, Handle, MessageId, MessageKind, B64};

use crate::store::{
    ConversationRow, GroupStore, KeyPackageStore, MemberCheck, PendingCommit, Store, StoredMessage, Tx,
};
use crate::{ClientError, SystemEvent};

/// The MLS crypto provider the session is built with: AWS-LC on the native
/// clients, RustCrypto (pure Rust, for wasm32) with `--features browser`.
#[cfg(feature = "awslc")]
pub type Crypto = subrosa_core::DefaultCrypto;
/// The MLS crypto provider the session is built with: AWS-LC on the native
/// clients, RustCrypto (pure Rust, for wasm32) with `--features browser`.
#[cfg(not(feature = "awslc"))]
pub type Crypto = subrosa_core::RustCrypto;

/// The MLS engine of a session, over its store.
pub type SessionEngine = Engine<Crypto, GroupStore, KeyPackageStore>;

/// Groups a session keeps loaded between calls (the most recently used):
/// a daemon or the terminal UI then decodes a large group's state once,
/// not for every message. At 10,000 members one takes some tens of MB.
pub const LOADED_GROUPS: usize = 4;

/// What an unsupported content kind is stored and shown as.
pub const UNSUPPORTED_TEXT: &str = "unsupported message (sent by a newer Subrosa)";

/// Meta key of an identity key handed over by another device of this
/// account, adopted once the directory lists it.
pub const META_PENDING_IDENTITY: &str = "pending_identity";
/// Meta key of this device's own identity-key rotation not yet published.
pub const META_PENDING_KEY_SET: &str = "pending_key_set";
/// Meta key of this account's identity public key before the last one this
/// device adopted: the account's other devices hold it until they adopt
/// the new one too.
pub const META_PREVIOUS_IDENTITY_KEY: &str = "previous_identity_key";

/// A member check waiting for the key directory.
pub const UNCHECKED: &str = "unchecked";
/// A member check the key directory contradicted.
pub const CONTRADICTED: &str = "contradicted";

/// Where the session's time comes from (ms since the Unix epoch). The
/// native clients use [`SystemClock`]; tests hand in a fixed one.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now, in ms since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system's clock (not on wasm32, which has none: a web client hands
/// its own [`Clock`] in).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

#[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        crate::store::now_ms()
    }
}

/// One device of one account: its identity, store and MLS engine, and the
/// rules that apply what arrives.
pub struct Session {
    /// The account's handle (never changes, whatever keys rotate).
    handle: Handle,
    store: Store,
    engine: SessionEngine,
    clock: Arc<dyn Clock>,
    /// Messages dropped while processing, reported by the next receive.
    dropped: Mutex<Vec<Dropped>>,
    /// Conversations with a leave proposal this device should commit.
    to_commit: Mutex<Vec<(ConversationId, DeviceAddress)>>,
    /// Per conversation, the sender of the last commit this device could
    /// not process (named if the conversation turns out stuck).
    unprocessable: Mutex<HashMap<ConversationId, DeviceAddress>>,
    /// Call signals that arrived, for a call this process runs.
    calls: Mutex<Vec<crate::IncomingSignal>>,
}

/// A message that could not be decrypted or authenticated and was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Claimed sender (as the server said).
    pub from: String,
    /// Why.
    pub reason: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("device", &self.engine.identity()).finish_non_exhaustive()
    }
}

impl Session {
    /// The session of `identity` over `store`, with `crypto` and `clock`.
    pub fn new(crypto: Crypto, identity: DeviceIdentity, store: Store, clock: Arc<dyn Clock>) -> Self {
        let handle = identity.handle().clone();
        let groups = store.groups();
        let engine = Engine::new(crypto, identity, groups.clone(), store.key_packages())
            .with_loaded_groups(Arc::new(groups), LOADED_GROUPS);
        Session {
            handle,
            store,
            engine,
            clock,
            dropped: Mutex::new(Vec::new()),
            to_commit: Mutex::new(Vec::new()),
            unprocessable: Mutex::new(HashMap::new()),
            calls: Mutex::new(Vec::new()),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The MLS engine.
    pub fn engine(&self) -> &SessionEngine {
        &self.engine
    }

    /// Now, by the session's clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// A fresh random id, from the crypto provider's random source.
    ///
    /// # Errors
    /// [`ClientError::Core`] when the random source fails.
    pub fn random_id(&self) -> Result<[u8; 16], ClientError> {
        let mut id = [0u8; 16];
        subrosa_core::random_bytes(self.engine.crypto(), &mut id)?;
        Ok(id)
    }

    /// The messages dropped since the last call.
    pub fn take_dropped(&self) -> Vec<Dropped> {
        std::mem::take(&mut *self.lock_dropped())
    }

    /// The oldest leave proposal seen and not yet handed out, for the
    /// caller to commit (conversation, leaving device).
    pub fn next_leave_to_commit(&self) -> Option<(ConversationId, DeviceAddress)> {
        let mut q = self.lock_to_commit();
        (!q.is_empty()).then(|| q.remove(0))
    }

    /// Processes one envelope inside one store transaction; what it yields is
    /// stored (and shown by the next receive). The caller acknowledges it.
    pub fn process_envelope(&self, env: &Envelope) -> Result<(), ClientError> {
        let digest = envelope_digest(env);
        if self.store.read(|tx| was_processed(tx, env, &digest))? {
            // Delivered again after a crash before the ack: already stored.
            return Ok(());
        }
        let result = self.apply_envelope(env, &digest);
        self.settle_envelope(env, &digest, result)?;
        // The delivery receipt it owes, queued with it (one per batch when
        // it came in one).
        self.queue_receipts().map(|_| ())
    }

    /// Applies one envelope in one write (a savepoint inside a batch):
    /// all of it is stored, or none of it and the error says why.
    fn apply_envelope(&self, env: &Envelope, digest: &[u8]) -> Result<(), ClientError> {
        self.store.write(|tx| {
            // Checked again inside the write: another thread may have
            // applied the same envelope since the caller looked.
            if was_processed(&*tx, env, digest)? {
                return Ok(());
            }
            let event = match env.kind {
                MessageKind::Welcome => {
                    // A blocked account's invitation is not joined (and is
                    // acknowledged, so the server keeps nothing of it).
                    if crate::requests::is_blocked(&*tx, env.sender.handle.as_str())? {
                        return tx.mark_processed(digest);
                    }
                    let seen: &dyn Tx = &*tx;
                    // A conversation this device saw move continues here:
                    // joined only as that move (MLS checks it).
                    let moving = crate::moves::moving_conversations(seen)?;
                    self.engine.join_resuming(
                        env.ciphertext.as_slice(),
                        |id| self.check_welcome_id(seen, env, id),
                        &moving,
                        |id, info, members| self.check_welcome_members(seen, env, id, info, members),
                    )?
                }
                MessageKind::Commit | MessageKind::Application => {
                    let row = tx.conversation(&env.conversation)?;
                    // A blocked account writing where this device no longer
                    // is (a conversation left when blocking it): dropped
                    // without a word, like everything else of theirs.
                    if !row.as_ref().is_some_and(|r| r.active)
                        && crate::requests::is_blocked(&*tx, env.sender.handle.as_str())?
                    {
                        return tx.mark_processed(digest);
                    }
                    if let Some(row) = row {
                        // A conversation that moved still reads the
                        // messages sent there before their senders saw the
                        // move, while its keys are kept (see `moves`).
                        let late_in_moved =
                            env.kind == MessageKind::Application && crate::moves::moved_to(&*tx, &row.id)?.is_some();
                        if !row.active && !late_in_moved {
                            return Err(CoreError::UnknownConversation.into());
                        }
                    }
                    // The echo of this device's own staged commit, whose
                    // answer was lost: processing it applies the staged
                    // commit (mls-rs recognises it), then it is finished
                    // as if the answer had come.
                    let own = match env.kind {
                        MessageKind::Commit => tx.pending_commit(&env.conversation)?.filter(|p| {
                            p.commit_digest == Sha256::digest(env.ciphertext.as_slice()).as_slice()
                                && env.sender == self.identity().address()
                        }),
                        _ => None,
                    };
                    let event = self.engine.process(&env.conversation, env.ciphertext.as_slice())?;
                    if let Some(own) = own {
                        self.finish_pending(tx, &own)?;
                        return tx.mark_processed(digest);
                    }
                    event
                }
            };
            self.apply_event(tx, env, event)?;
            tx.mark_processed(digest)
        })
    }

    /// What follows an envelope's outcome: a refusal or an undecryptable
    /// message is stored as such (and the envelope counts as processed);
    /// other errors are the caller's.
    fn settle_envelope(
        &self,
        env: &Envelope,
        digest: &[u8],
        result: Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        match result {
            Ok(()) => Ok(()),
            Err(ClientError::Refused { conversation, why }) => {
                // Nothing of it was stored (the transaction rolled back);
                // the user sees who tried what, in the conversation it
                // concerns when this device has it, and as an alert.
                self.store.write(|tx| {
                    tx.mark_processed(digest)?;
                    if let Some(row) = conversation.map(|c| tx.conversation(&c)).transpose()?.flatten() {
                        self.record_system_line(tx, &row, &env.sender, SystemEvent::Warning { text: why.clone() })?;
                    }
                    tx.add_alert(&why)
                })
            }
            // The store failed underneath MLS: the message may be fine.
            // Nothing is marked processed, so it is neither dropped nor
            // acknowledged; the server delivers it again.
            Err(ClientError::Core(e)) if e.is_storage_failure() => Err(ClientError::Store(e.to_string())),
            Err(ClientError::Core(e)) => {
                if env.kind == MessageKind::Commit {
                    self.lock_unprocessable().insert(env.conversation, env.sender.clone());
                }
                self.store.write(|tx| {
                    if env.kind == MessageKind::Commit && tx.conversation(&env.conversation)?.is_some_and(|r| r.active) {
                        // Remembered: a member may re-create it without them.
                        tx.set_meta(&stuck_key(&env.conversation), env.sender.to_string().as_bytes())?;
                        // The server ordered it, so nobody can commit in this
                        // conversation any more (RFC 9750 §5.3): say who.
                        tx.add_alert(&format!(
                            "{} sent a commit to conversation #{} that could not be processed; changes there will fail until it is recreated without them",
                            env.sender,
                            env.conversation.to_hex()
                        ))?;
                    }
                    // Undecryptable or unauthenticated: tampered, replayed,
                    // not for us, or from a device we refuse. Drop it (it can
                    // never become readable) and say so.
                    tx.mark_processed(digest)
                })?;
                self.lock_dropped().push(Dropped { from: env.sender.to_string(), reason: e.to_string() });
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn lock_dropped(&self) -> MutexGuard<'_, Vec<Dropped>> {
        self.dropped.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_unprocessable(&self) -> MutexGuard<'_, HashMap<ConversationId, DeviceAddress>> {
        self.unprocessable.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sender of the last commit to `conversation` this device could
    /// not process, if any (forgotten once asked): who made it stuck.
    pub fn take_unprocessable(&self, conversation: &ConversationId) -> Option<DeviceAddress> {
        self.lock_unprocessable().remove(conversation)
    }

    pub(crate) fn lock_calls(&self) -> MutexGuard<'_, Vec<crate::IncomingSignal>> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_to_commit(&self) -> MutexGuard<'_, Vec<(ConversationId, DeviceAddress)>> {
        self.to_commit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a system line (membership, renames) in a conversation's
    /// history, in a transaction of its own or as a savepoint of the one
    /// this thread has open.
    pub fn system_line(
        &self,
        row: &ConversationRow,
        from: &DeviceAddress,
        event: SystemEvent,
    ) -> Result<(), ClientError> {
        self.store.write(|tx| self.record_system_line(tx, row, from, event))
    }

    /// Records a system line (membership, renames) in a conversation's history.
    pub fn record_system_line(
        &self,
        tx: &mut dyn Tx,
        row: &ConversationRow,
        from: &DeviceAddress,
        event: SystemEvent,
    ) -> Result<(), ClientError> {
        // The conversation of this account's own devices is never shown.
        if row.kind == "own" {
            return Ok(());
        }
        let id = self.random_id()?;
        let now = self.now_ms();
        let m = StoredMessage {
            id: hex::encode(id),
            conversation: row.id.to_hex(),
            target: row.target(),
            group: row.kind == "group",
            from: from.handle.to_string(),
            device: from.device.to_hex(),
            sent_at: now,
            received_at: now,
            text: event.render(self.handle().as_str()),
            outgoing: from.handle == *self.handle(),
            system: true,
            state: None,
            reason: None,
            event: Some(event),
            ..StoredMessage::default()
        };
        let seen = m.outgoing && from.device == self.identity().device_id();
        tx.insert_message(&m, &row.id, &id, seen).map(|_| ())
    }

    /// A Welcome for a conversation id this device knows or ever knew is a
    /// takeover attempt (or a re-admission of a removed member): refused
    /// before anything is joined or stored.
    fn check_welcome_id(&self, tx: &dyn Tx, env: &Envelope, id: &ConversationId) -> Result<(), ClientError> {
        let refuse = match tx.known_conversation(id)? {
            None => false,
            // Known only from the history the approving device handed over
            // when this one was linked: that account's Welcome is expected.
            Some(true) => env.sender.handle != *self.handle(),
            Some(false) => true,
        };
        if refuse {
            return Err(ClientError::Refused {
                conversation: Some(*id),
                why: format!(
                    "{} (device {}) sent an invitation to conversation #{} that this device already knows or knew; \
                     it was refused and the conversation is unchanged (someone may be trying to take it over)",
                    env.sender.handle,
                    env.sender.device.to_hex(),
                    id.to_hex()
                ),
            });
        }
        Ok(())
    }

    /// What a Welcome must show before it is joined: its sender among the
    /// members, every member certified by the identity key pinned for its
    /// account, and a direct conversation between exactly two accounts, the
    /// inviter's and ours.
    fn check_welcome_members(
        &self,
        tx: &dyn Tx,
        env: &Envelope,
        id: &ConversationId,
        info: &subrosa_core::ConversationInfo,
        members: &[subrosa_core::MemberInfo],
    ) -> Result<(), ClientError> {
        if !members.iter().any(|m| m.address == env.sender) {
            return Err(CoreError::IdentityMismatch("welcome from a device that is not a member".into()).into());
        }
        for m in members {
            // A key change that waits for the directory (committed in
            // another conversation by a device the pinned key certified) is
            // not a mismatch: the invitation's members are looked up like
            // any, and it is refused after all if the directory disagrees.
            if let Err(e) = self.check_pinned_key(tx, &m.address.handle, &m.identity_key) {
                let awaiting = tx
                    .member_checks(None, UNCHECKED)?
                    .iter()
                    .any(|c| c.handle == m.address.handle.as_str() && c.identity_key == m.identity_key && !c.welcome);
                if !awaiting {
                    return Err(e);
                }
            }
        }
        if info.kind == ConversationKind::Own && members.iter().any(|m| m.address.handle != *self.handle()) {
            return Err(ClientError::Refused {
                conversation: None,
                why: format!(
                    "{} (device {}) sent an invitation to conversation #{} of this account's own devices with \
                     another account in it; it was refused",
                    env.sender.handle,
                    env.sender.device.to_hex(),
                    id.to_hex()
                ),
            });
        }
        if info.kind == ConversationKind::Direct {
            let mut accounts: Vec<&Handle> = members.iter().map(|m| &m.address.handle).collect();
            accounts.sort();
            accounts.dedup();
            if accounts.len() != 2 || !accounts.contains(&self.handle()) {
                let names: Vec<String> = accounts.iter().map(|h| h.to_string()).collect();
                return Err(ClientError::Refused {
                    conversation: None,
                    why: format!(
                        "{} (device {}) sent an invitation to a direct conversation #{} whose members are the \
                         accounts {}; a direct conversation holds exactly two accounts, so it was refused",
                        env.sender.handle,
                        env.sender.device.to_hex(),
                        id.to_hex(),
                        names.join(", ")
                    ),
                });
            }
        }
        Ok(())
    }

    /// Queues member devices for the key-directory check (run after the
    /// store transaction, [`Self::check_members`]).
    fn queue_member_checks<'a>(
        &self,
        tx: &mut dyn Tx,
        conversation: &ConversationId,
        added_by: &DeviceAddress,
        welcome: bool,
        members: impl IntoIterator<Item = &'a subrosa_core::MemberInfo>,
    ) -> Result<(), ClientError> {
        let me = self.identity().address();
        for m in members {
            if m.address == me {
                continue;
            }
            tx.add_member_check(&MemberCheck {
                conversation: *conversation,
                handle: m.address.handle.to_string(),
                device: m.address.device.to_hex(),
                device_key: m.device_key.clone(),
                identity_key: m.identity_key.clone(),
                added_by: added_by.to_string(),
                welcome,
                state: "unchecked".into(),
                why: String::new(),
            })?;
        }
        Ok(())
    }

    fn apply_event(&self, tx: &mut dyn Tx, env: &Envelope, event: Event) -> Result<(), ClientError> {
        let me = self.handle().clone();
        match event {
            Event::Joined { conversation, info, members } => {
                // Checked before joining (`check_welcome_members`); the
                // directory check follows outside this transaction.
                tx.note_members(&conversation, &members.iter().map(|m| m.address.handle.as_str()).collect::<Vec<_>>())?;
                self.queue_member_checks(tx, &conversation, &env.sender, true, &members)?;
                if let Some(old) = crate::moves::continues(&*tx, &conversation)? {
                    // The same members, kind and name (MLS checked them
                    // against the old conversation): it goes on here.
                    let old_row = self.conversation_row(tx, &old)?;
                    tx.add_conversation(&conversation, &old_row.kind, &old_row.name, old_row.peer.as_deref())?;
                    let row = self.conversation_row(tx, &conversation)?;
                    return self.finish_move(tx, &old, &row, &env.sender);
                }
                tx.set_meta(&crate::moves::pq_check_key(&conversation), &[])?;
                match info.kind {
                    ConversationKind::Direct => {
                        let peer = members
                            .iter()
                            .map(|m| &m.address.handle)
                            .find(|h| **h != me)
                            .ok_or(ClientError::Core(CoreError::Malformed("direct conversation without a peer")))?;
                        tx.add_conversation(&conversation, "direct", "", Some(peer.as_str()))?;
                        self.note_invitation(tx, &conversation, &env.sender.handle)?;
                    }
                    // Nothing to show: it only carries identity keys.
                    ConversationKind::Own => tx.add_conversation(&conversation, "own", "", None)?,
                    ConversationKind::Group => {
                        tx.add_conversation(&conversation, "group", &info.name, None)?;
                        self.note_invitation(tx, &conversation, &env.sender.handle)?;
                        let row = self.conversation_row(tx, &conversation)?;
                        let event = if env.sender.handle == me {
                            SystemEvent::JoinedGroup { group: info.name.clone() }
                        } else {
                            SystemEvent::AddedYou { by: env.sender.handle.to_string(), group: info.name.clone() }
                        };
                        self.record_system_line(tx, &row, &env.sender, event)?;
                        self.retire_replaced(tx, &row, &env.sender, &members)?;
                    }
                }
                Ok(())
            }
            Event::Message { conversation, sender, content, disappearing } => {
                if sender.address != env.sender {
                    return Err(CoreError::IdentityMismatch(
                        "server-claimed sender differs from the MLS sender".into(),
                    )
                    .into());
                }
                self.check_sender_key(tx, &conversation, &sender)?;
                // A blocked account's messages are never stored or shown;
                // decrypted all the same, so the keys stay in step, and
                // counted in its sequence, so unblocking shows no gap for
                // what was dropped on purpose.
                if crate::requests::is_blocked(&*tx, sender.address.handle.as_str())? {
                    if content.seq != 0 {
                        let device = format!("{}/{}", sender.address.handle, sender.address.device.to_hex());
                        tx.arrived_seq(&conversation, &device, content.seq)?;
                    }
                    return Ok(());
                }
                let row = self.conversation_row(tx, &conversation)?;
                // The sender's head is evidence, checked at the end of the
                // sync (at most one pending per member: its newest).
                if let Some(head) = &content.kt_head {
                    if let Ok(h) = subrosa_proto::kt::SignedHead::decode(head) {
                        tx.push_kt_head_gossip(sender.address.handle.as_str(), h.epoch, head)?;
                    } else {
                        tx.push_kt_head_gossip(sender.address.handle.as_str(), u64::MAX, head)?;
                    }
                }
                let late = self.note_sequence(tx, &row, &sender.address, content.seq)?;
                // The account's own conversation carries identity keys and
                // nothing else; an identity key anywhere else is ignored.
                if row.kind == "own" || matches!(content.body, Body::IdentityKey(_)) {
                    if let (Body::IdentityKey(h), true) =
                        (&content.body, row.kind == "own" && sender.address.handle == me)
                    {
                        self.receive_handover(tx, &sender.address, h)?;
                    }
                    return Ok(());
                }
                // Disappearing messages: the timer the group context holds
                // where the message was read, from when it was sent (never
                // later than now, so a sender's clock cannot keep it longer).
                let expiry = disappearing
                    .map(|s| content.sent_at_ms.min(self.now_ms()).saturating_add(u64::from(s).saturating_mul(1000)));
                let message_id = content.message_id;
                self.apply_content(tx, &row, &sender.address, content, late)?;
                if let Some(at) = expiry {
                    tx.set_message_expiry(&conversation, &message_id.0, at)?;
                }
                Ok(())
            }
            Event::Commit {
                conversation,
                committer,
                added,
                removed,
                removed_self,
                left,
                renamed,
                disappearing,
                updated,
                moved_to,
                ..
            } => {
                let mut row = self.conversation_row(tx, &conversation)?;
                let by = &committer.address;
                if let Some((to, suite)) = moved_to {
                    // The committer names the new id: one this device knows
                    // would have its own move write over that conversation's
                    // keys. Refused like any commit that cannot be
                    // processed (the alert names the committer).
                    if tx.known_conversation(&to)?.is_some() {
                        return Err(CoreError::IdentityMismatch(format!(
                            "{by} moved conversation #{} to #{}, a conversation this device already knows",
                            conversation.to_hex(),
                            to.to_hex()
                        ))
                        .into());
                    }
                    self.note_move(tx, &conversation, &to, false)?;
                    let text = format!(
                        "{} moved this conversation to {}; it continues as #{} once they send the invitation",
                        by.handle,
                        crate::moves::suite_words(suite.into()),
                        to.to_hex()
                    );
                    self.record_system_line(tx, &row, by, SystemEvent::Note { text })?;
                }
                // Every commit carries a path: the committer's keys are new.
                tx.note_member_update(&conversation, by, self.now_ms())?;
                self.erase_moved_keys(tx, &conversation)?;
                // A member's new certificate may say it can do post-quantum
                // conversations now: the client looks again.
                if !updated.is_empty() && moved_to.is_none() {
                    tx.set_meta(&crate::moves::pq_check_key(&conversation), &[])?;
                }
                // A device that changed its keys (`devices rekey`, or its
                // account's identity key rotated) is checked against the
                // directory like an added one; a new identity key for a
                // contact is a key change, shown as such.
                let mut changed_flags = Vec::new();
                let mut unchanged = Vec::new();
                for (old, m) in &updated {
                    // A device of the account not yet carried to its new
                    // key, refreshing its leaf under the previous one: an
                    // ordinary update, nothing to look up.
                    let previous = self.previous_key_of(&*tx, &m.address.handle)?;
                    let still_previous =
                        old.identity_key == m.identity_key && previous.as_deref() == Some(&m.identity_key[..]);
                    if m.address.handle == me {
                        if still_previous {
                            unchanged.push(m);
                        } else if !self.is_own_identity_key_in(&*tx, &m.identity_key)? {
                            changed_flags.push((m, "a device of this account is certified by another identity key"));
                        }
                    } else if let Some(pinned) = tx.contact_key(m.address.handle.as_str())? {
                        if pinned != m.identity_key {
                            // Only a device the pinned key had certified may
                            // carry its account to a new key (a rotation),
                            // and the pin moves only once the key directory
                            // lists that key (`settle_member_check`): a
                            // revoked device whose removal has not landed
                            // yet still holds the old key and could certify
                            // a key of its own making. Until then the device
                            // waits for the directory like an added one. Any
                            // other device (one already flagged, say, added
                            // by another member) is flagged again.
                            if still_previous {
                                unchanged.push(m);
                            } else if old.identity_key != pinned {
                                changed_flags
                                    .push((m, "a device not certified by the identity key pinned for its account"));
                            }
                        }
                    }
                }
                self.queue_member_checks(
                    tx,
                    &conversation,
                    by,
                    false,
                    updated
                        .iter()
                        .map(|(_, m)| m)
                        .filter(|m| !changed_flags.iter().any(|(f, _)| f.address == m.address))
                        .filter(|m| !unchanged.iter().any(|u| u.address == m.address)),
                )?;
                // The commit is applied whatever it adds, so this device stays
                // in step with the epoch; a device certified by another key
                // than the one pinned for its account is flagged instead, and
                // sending here waits for the user (see `check_members`).
                let mut flagged = Vec::new();
                for m in &added {
                    if let Err(e) = self.check_pinned_key(&*tx, &m.address.handle, &m.identity_key) {
                        flagged.push((m, e.to_string()));
                    }
                }
                tx.note_members(&conversation, &added.iter().map(|m| m.address.handle.as_str()).collect::<Vec<_>>())?;
                self.queue_member_checks(
                    tx,
                    &conversation,
                    by,
                    false,
                    added.iter().filter(|m| !flagged.iter().any(|(f, _)| f.address == m.address)),
                )?;
                if let Some(seconds) = disappearing {
                    let event = SystemEvent::Disappearing { by: by.handle.to_string(), seconds };
                    self.record_system_line(tx, &row, by, event)?;
                }
                if let Some(info) = renamed {
                    tx.set_conversation_name(&conversation, &info.name)?;
                    row.name = info.name.clone();
                    self.record_system_line(
                        tx,
                        &row,
                        by,
                        SystemEvent::Renamed { by: by.handle.to_string(), name: info.name.clone() },
                    )?;
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
                    let event = if already || *h == by.handle {
                        SystemEvent::NewDevice { member: h.to_string() }
                    } else {
                        SystemEvent::Added { by: by.handle.to_string(), member: h.to_string() }
                    };
                    self.record_system_line(tx, &row, by, event)?;
                }
                for (m, why) in flagged {
                    self.flag_member(&row, by, m, &why)?;
                }
                for (m, why) in changed_flags {
                    self.flag_member(&row, by, m, why)?;
                }
                let mut gone: Vec<&DeviceAddress> = removed.iter().map(|m| &m.address).collect();
                for a in &gone {
                    tx.drop_member_check(&conversation, a.handle.as_str(), Some(&a.device.to_hex()))?;
                }
                gone.dedup_by(|a, b| a.handle == b.handle);
                for a in gone {
                    let still_there = remaining.iter().any(|r| r.handle == a.handle);
                    let (by, member) = (by.handle.to_string(), a.handle.to_string());
                    let event = if left.contains(a) {
                        SystemEvent::Left { member }
                    } else if still_there || a.handle.as_str() == by {
                        SystemEvent::RemovedDevice { by, member }
                    } else {
                        SystemEvent::Removed { by, member }
                    };
                    self.record_system_line(tx, &row, &committer.address, event)?;
                }
                if removed_self {
                    tx.deactivate_conversation(&conversation)?;
                } else {
                    if let Some(server) = &env.roster {
                        self.compare_roster(tx, &conversation, server, &remaining)?;
                    }
                    if row.kind == "direct" {
                        // A direct conversation holds exactly two accounts: one
                        // that grew a third is closed here (the next send to the
                        // peer starts a new one).
                        let mut third: Vec<&str> = remaining
                            .iter()
                            .map(|a| a.handle.as_str())
                            .filter(|h| *h != me.as_str() && Some(*h) != row.peer.as_deref())
                            .collect();
                        third.dedup();
                        if !third.is_empty() {
                            let why = format!(
                                "{} added {} to the direct conversation #{}; a direct conversation holds exactly two \
                                 accounts, so this device closed it (your next message starts a new one)",
                                by.handle,
                                third.join(", "),
                                conversation.to_hex()
                            );
                            self.record_system_line(tx, &row, by, SystemEvent::Warning { text: why.clone() })?;
                            tx.add_alert(&why)?;
                            tx.deactivate_conversation(&conversation)?;
                        }
                    }
                }
                Ok(())
            }
            Event::LeaveProposed { conversation, member } => {
                // Queued once however often it is seen (a batch applied
                // again after a failed attempt sees it twice).
                let leave = (conversation, member.address);
                let mut q = self.lock_to_commit();
                if !q.contains(&leave) {
                    q.push(leave);
                }
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
        tx: &mut dyn Tx,
        conversation: &ConversationId,
        server: &[DeviceAddress],
        members: &[DeviceAddress],
    ) -> Result<(), ClientError> {
        let members: std::collections::HashSet<&DeviceAddress> = members.iter().collect();
        let extra: Vec<String> = server.iter().filter(|a| !members.contains(a)).map(|a| a.to_string()).collect();
        if extra.is_empty() {
            return Ok(());
        }
        tx.add_alert(&format!(
            "the server lets {} send to conversation #{}, though not a member: it does not keep this conversation's roster honestly",
            extra.join(", "),
            conversation.to_hex()
        ))
    }

    /// Applies an authenticated application message of a shown conversation
    /// (its sender checked, its sequence number noted; `late` when it is
    /// older than one already shown). The one place each content kind
    /// gets its meaning: a kind adds its arm here and keeps its rules in a
    /// module of its own.
    pub(crate) fn apply_content(
        &self,
        tx: &mut dyn Tx,
        row: &ConversationRow,
        sender: &DeviceAddress,
        content: subrosa_core::content::Content,
        late: bool,
    ) -> Result<(), ClientError> {
        let mut preview = None;
        let (text, reply_to) = match content.body {
            Body::Text(t) => (t, None),
            Body::Reply { text, reply_to } => (text, Some(reply_to.to_hex())),
            // Shown as the sender's word; this device never fetches the link.
            Body::Preview { text, preview: p } => {
                preview = Some(p.into());
                (text, None)
            }
            // They change what is stored already (see `annotations`); they
            // are no lines of their own.
            Body::Reaction { .. } | Body::Edit { .. } | Body::Delete { .. } | Body::Receipt { .. } => {
                return self.apply_action(tx, row, sender, &content).map(|_| ());
            }
            Body::Attachment(a) => {
                let files = a.files;
                let caption = Content { body: Body::Text(a.caption), ..content };
                return self.apply_attachment(tx, row, sender, caption, &files, late);
            }
            Body::Call(signal) => return self.apply_call(tx, row, sender, content.sent_at_ms, &signal),
            // A kind from a newer Subrosa is stored and shown as such; it
            // counts in the sender's sequence like any message.
            _ => (UNSUPPORTED_TEXT.to_string(), None),
        };
        let m = StoredMessage {
            id: content.message_id.to_hex(),
            conversation: row.id.to_hex(),
            target: row.target(),
            group: row.kind == "group",
            from: sender.handle.to_string(),
            device: sender.device.to_hex(),
            sent_at: content.sent_at_ms,
            received_at: self.now_ms(),
            text,
            outgoing: sender.handle == *self.handle(),
            system: false,
            state: None,
            reason: None,
            event: None,
            reply_to,
            preview,
            ..StoredMessage::default()
        };
        // A sender's retry carries the same message id: shown once.
        let new = tx.insert_message(&m, &row.id, &content.message_id.0, false)?;
        if new {
            self.after_stored(tx, row, &m, &content.message_id)?;
        }
        if late && new {
            self.record_system_line(tx, row, sender, SystemEvent::Late { from: sender.handle.to_string() })?;
        }
        Ok(())
    }

    /// Notes a sender's sequence number: a gap becomes a system line before
    /// the message (the server dropped or is withholding messages). Returns
    /// true when the message is older than one already shown (reordered).
    fn note_sequence(
        &self,
        tx: &mut dyn Tx,
        row: &ConversationRow,
        from: &DeviceAddress,
        seq: u64,
    ) -> Result<bool, ClientError> {
        if seq == 0 || (from.handle == *self.handle() && from.device == self.identity().device_id()) {
            return Ok(false);
        }
        let device = format!("{}/{}", from.handle, from.device.to_hex());
        match tx.arrived_seq(&row.id, &device, seq)? {
            None => Ok(true),
            Some(0) => Ok(false),
            Some(missing) => {
                self.record_system_line(tx, row, from, SystemEvent::Gap { from: from.handle.to_string(), missing })?;
                Ok(false)
            }
        }
    }

    fn conversation_row(&self, tx: &dyn Tx, id: &ConversationId) -> Result<ConversationRow, ClientError> {
        tx.conversation(id)?.ok_or(ClientError::Core(CoreError::UnknownConversation))
    }

    /// Pins a contact's identity key on first sight; refuses a different one.
    /// For this account's own handle, the key must be our own identity key.
    fn check_member_key(&self, tx: &mut dyn Tx, handle: &Handle, identity_key: &[u8]) -> Result<(), ClientError> {
        if handle != self.handle() && tx.contact_key(handle.as_str())?.is_none() {
            return tx.pin_contact(handle.as_str(), identity_key);
        }
        self.check_pinned_key(&*tx, handle, identity_key)
    }

    /// The sender check of an application message: its key is the one
    /// pinned for its account (or pinned now, on first sight), or one of two
    /// keys tolerated while an account changes its identity key:
    /// - the new key of a device that carried its account to it by a commit,
    ///   while the key directory has not been asked yet (the device is
    ///   queued with exactly that key); the pin moves once it confirms;
    /// - the key pinned before the last change, for devices of the account
    ///   that still carry it (they adopt the new key when they next run);
    ///   never for a device flagged in this conversation.
    fn check_sender_key(
        &self,
        tx: &mut dyn Tx,
        conversation: &ConversationId,
        sender: &MemberInfo,
    ) -> Result<(), ClientError> {
        let refused = match self.check_member_key(tx, &sender.address.handle, &sender.identity_key) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let (handle, device) = (sender.address.handle.as_str(), sender.address.device.to_hex());
        let this_device = |c: &MemberCheck| c.handle == handle && c.device == device;
        if tx
            .member_checks(Some(conversation), UNCHECKED)?
            .iter()
            .any(|c| this_device(c) && c.identity_key == sender.identity_key)
        {
            return Ok(());
        }
        let previous = self.previous_key_of(&*tx, &sender.address.handle)?;
        if previous.as_deref() == Some(&sender.identity_key[..])
            && !tx.member_checks(Some(conversation), CONTRADICTED)?.iter().any(this_device)
        {
            return Ok(());
        }
        Err(refused)
    }

    /// The identity key `handle` held before its last change (for this
    /// account: before the key this device adopted last).
    pub(crate) fn previous_key_of(&self, tx: &dyn Tx, handle: &Handle) -> Result<Option<Vec<u8>>, ClientError> {
        if handle == self.handle() {
            Ok(tx.meta(META_PREVIOUS_IDENTITY_KEY)?.map(|k| k.to_vec()))
        } else {
            tx.contact_previous_key(handle.as_str())
        }
    }

    /// As [`Self::check_member_key`], without pinning a key seen for the
    /// first time: keys that arrive in Welcomes and commits are pinned only
    /// once the key directory confirmed them ([`Self::check_members`]).
    fn check_pinned_key(&self, tx: &dyn Tx, handle: &Handle, identity_key: &[u8]) -> Result<(), ClientError> {
        if handle == self.handle() {
            return if self.is_own_identity_key_in(tx, identity_key)? {
                Ok(())
            } else {
                Err(CoreError::IdentityMismatch("a device of this account not certified by its identity key".into())
                    .into())
            };
        }
        match tx.contact_key(handle.as_str())? {
            None => Ok(()),
            Some(k) if k == identity_key => Ok(()),
            Some(_) => Err(CoreError::IdentityMismatch(format!(
                "{handle}'s identity key differs from the one this device has seen"
            ))
            .into()),
        }
    }

    /// Processes a batch of envelopes in one store transaction (one
    /// fsync for all of them on the SQLCipher store, not one each).
    ///
    /// Optimistically, application messages work on groups the engine
    /// keeps in memory for the batch and writes once at its end. Should
    /// any envelope of the batch fail (undecryptable, refused, a store
    /// error), that attempt is rolled back whole and the batch is applied
    /// again envelope by envelope, each in a savepoint of its own, so one
    /// that fails leaves nothing of itself and the others stand. Returns
    /// the delivery ids, to acknowledge once this returned (never before: a
    /// crash before the commit loses nothing, the server delivers them
    /// again).
    ///
    /// # Errors
    /// Store errors (then nothing of the batch is stored); an envelope that
    /// cannot be decrypted or is refused is not an error (see
    /// [`Self::process_envelope`]).
    pub fn process_batch(&self, envs: &[Envelope]) -> Result<Vec<u64>, ClientError> {
        let ids: Vec<u64> = envs.iter().map(|e| e.id).collect();
        let fast = self.store.write(|tx| {
            // Begun inside the transaction: the store's gate makes this
            // thread the only one in a batch until it ends.
            self.engine.begin_batch();
            for env in envs {
                let digest = envelope_digest(env);
                if self.store.read(|tx| was_processed(tx, env, &digest))? {
                    continue;
                }
                self.apply_envelope(env, &digest)?;
            }
            // One delivery receipt per conversation and author for the batch.
            self.queue_receipts_in(tx)?;
            Ok(self.engine.end_batch()?)
        });
        self.engine.abort_batch();
        if fast.is_ok() {
            return Ok(ids);
        }
        // A leave the failed attempt queued is queued once (see
        // `apply_event`), and another thread may have taken some meanwhile:
        // the queue is left as it is.
        self.store.write(|_| {
            for env in envs {
                self.process_envelope(env)?;
            }
            Ok(ids)
        })
    }
    /// This account's handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// This device's identity (a snapshot: `devices rekey` replaces it).
    pub fn identity(&self) -> std::sync::Arc<DeviceIdentity> {
        self.engine.identity()
    }

    /// A warning line in every active conversation with `handle`.
    pub fn key_change_lines(&self, tx: &mut dyn Tx, handle: &Handle) -> Result<(), ClientError> {
        let who = subrosa_proto::DeviceAddress { handle: handle.clone(), device: subrosa_proto::DeviceId([0; 8]) };
        for row in tx.active_conversations()? {
            let with_them = row.peer.as_deref() == Some(handle.as_str())
                || (row.kind == "group"
                    && self.engine.members(&row.id).is_ok_and(|m| m.iter().any(|m| m.address.handle == *handle)));
            if with_them {
                self.record_system_line(tx, &row, &who, SystemEvent::KeyChanged { member: handle.to_string() })?;
            }
        }
        Ok(())
    }

    /// Refuses to send to conversations with a verified contact whose key
    /// changed, unless the user accepts the change.
    pub fn check_key_changes(&self, handles: &[Handle], accept: bool) -> Result<(), ClientError> {
        self.store.write(|tx| {
            for h in handles {
                if tx.key_change_pending(h.as_str())? {
                    if accept {
                        tx.clear_key_change(h.as_str())?;
                    } else {
                        return Err(ClientError::KeyChanged(h.to_string()));
                    }
                }
            }
            Ok(())
        })
    }

    /// The server ordered this staged commit: apply it (inside the caller's
    /// transaction), remember its digest so its echo is skipped, and do
    /// what follows from it.
    pub fn finish_pending(&self, tx: &mut dyn Tx, pending: &PendingCommit) -> Result<(), ClientError> {
        let conversation = &pending.conversation;
        let meta = PendingMeta::decode(&pending.meta)?;
        if self.engine.has_pending_commit(conversation)? {
            self.engine.confirm_commit(conversation)?;
        }
        tx.mark_processed(&pending.commit_digest)?;
        tx.delete_pending_commit(conversation)?;
        // Every commit carries a path: this device's keys there are new.
        tx.note_own_update(conversation, self.now_ms())?;
        self.erase_moved_keys(tx, conversation)?;
        if let StagedChange::Create { kind, name, peer, .. } = &meta.change {
            tx.add_conversation(conversation, kind, name, peer.as_deref())?;
            // Whoever this account starts a conversation with is a contact.
            for handle in self.other_members(conversation)? {
                crate::requests::add_contact(tx, &handle)?;
            }
        }
        if let StagedChange::Move { to } = &meta.change {
            self.note_move(tx, conversation, to, true)?;
        }
        // This device's certificate may say more now: look again.
        if let StagedChange::Credential = &meta.change {
            tx.set_meta(&crate::moves::pq_check_key(conversation), &[])?;
        }
        let Some(mut row) = tx.conversation(conversation)? else { return Ok(()) };
        if let (StagedChange::Create { .. }, Some(old)) = (&meta.change, crate::moves::continues(&*tx, conversation)?) {
            let me = self.identity().address();
            self.finish_move(tx, &old, &row, &me)?;
        }
        if row.kind == "group" {
            let name = self.engine.info(conversation)?.name;
            if name != row.name {
                tx.set_conversation_name(conversation, &name)?;
                row.name = name;
            }
        }
        if let StagedChange::Disappearing { seconds } = meta.change {
            let me = self.identity().address();
            let event = SystemEvent::Disappearing { by: me.handle.to_string(), seconds };
            self.record_system_line(tx, &row, &me, event)?;
        } else if let Some((from, text)) = meta.line {
            self.record_system_line(tx, &row, &from, SystemEvent::Note { text })?;
        }
        Ok(())
    }

    /// The server will never order this staged commit: drop it (inside the
    /// caller's transaction); a new conversation is forgotten.
    pub fn drop_pending(&self, tx: &mut dyn Tx, pending: &PendingCommit) -> Result<(), ClientError> {
        let conversation = &pending.conversation;
        tx.delete_pending_commit(conversation)?;
        if let StagedChange::Create { .. } = PendingMeta::decode(&pending.meta)?.change {
            return tx.forget_conversation(conversation);
        }
        if self.engine.has_pending_commit(conversation)? {
            self.engine.discard_commit(conversation)?;
        }
        Ok(())
    }

    /// On joining a group: an active group of the same name whose accounts
    /// are all in the new one, and of which the inviter is a member, is the
    /// one the inviter re-created to re-add someone: it is retired here.
    fn retire_replaced(
        &self,
        tx: &mut dyn Tx,
        joined: &ConversationRow,
        inviter: &subrosa_proto::DeviceAddress,
        members: &[MemberInfo],
    ) -> Result<(), ClientError> {
        for old in tx.groups_named(&joined.name)? {
            if old.id == joined.id || !old.active {
                continue;
            }
            let Ok(old_members) = self.engine.members(&old.id) else { continue };
            let inviter_was_there = old_members.iter().any(|m| m.address.handle == inviter.handle);
            // A group stuck here too (its culprit is known on this device),
            // re-created by another member with everyone but the culprit.
            if let Some(culprit) = stuck_culprit_in(&*tx, &old.id)? {
                let culprit_out = !members.iter().any(|m| m.address == culprit);
                let rest_moved = old_members
                    .iter()
                    .filter(|o| o.address != culprit)
                    .all(|o| members.iter().any(|m| m.address.handle == o.address.handle));
                if inviter_was_there && *inviter != culprit && culprit_out && rest_moved {
                    self.record_system_line(
                        tx,
                        &old,
                        inviter,
                        SystemEvent::Note {
                            text: format!(
                                "{} re-created {} without {culprit}, who made it stuck, as a new conversation #{}; \
                                 this one is retired",
                                inviter.handle,
                                old.name,
                                joined.id.to_hex()
                            ),
                        },
                    )?;
                    tx.deactivate_conversation(&old.id)?;
                    continue;
                }
            }
            let all_moved = old_members.iter().all(|o| members.iter().any(|m| m.address.handle == o.address.handle));
            if inviter_was_there && all_moved {
                self.record_system_line(
                    tx,
                    &old,
                    inviter,
                    SystemEvent::Note {
                        text: format!(
                            "{} re-created {} as a new conversation #{} to re-add a former member; this one is retired",
                            inviter.handle,
                            old.name,
                            joined.id.to_hex()
                        ),
                    },
                )?;
                tx.deactivate_conversation(&old.id)?;
            }
        }
        Ok(())
    }

    /// Whether `key` is this account's identity key, or the one another
    /// device handed over and this device is about to adopt.
    ///
    /// # Errors
    /// Store errors.
    pub(crate) fn is_own_identity_key(&self, key: &[u8]) -> Result<bool, ClientError> {
        self.store.read(|tx| self.is_own_identity_key_in(tx, key))
    }

    /// As [`Self::is_own_identity_key`], inside a transaction.
    ///
    /// # Errors
    /// Store errors.
    fn is_own_identity_key_in(&self, tx: &dyn Tx, key: &[u8]) -> Result<bool, ClientError> {
        if key == self.identity().identity_public() {
            return Ok(true);
        }
        Ok(self.pending_identity(tx)?.is_some_and(|p| p.identity_public() == key))
    }

    fn pending_identity(&self, tx: &dyn Tx) -> Result<Option<DeviceIdentity>, ClientError> {
        match tx.meta(META_PENDING_IDENTITY)? {
            Some(secret) => Ok(Some(DeviceIdentity::from_secret_bytes(self.engine.crypto(), &secret)?)),
            None => Ok(None),
        }
    }

    /// Stores an identity key handed over by another device of this
    /// account, to adopt once the directory lists it (inside the caller's
    /// transaction).
    fn receive_handover(&self, tx: &mut dyn Tx, from: &DeviceAddress, h: &IdentityHandover) -> Result<(), ClientError> {
        let me = self.identity();
        if h.identity_public == me.identity_public() {
            return Ok(());
        }
        // This device's own rotation is stored and not yet published: the
        // two would race for the directory. Keep ours; say so.
        if tx.meta(META_PENDING_KEY_SET)?.is_some() {
            return tx.add_alert(&format!(
                "your device {} sent a new identity key while this device was rotating it too; this device's \
                 rotation goes on and the other key was ignored",
                from.device.to_hex()
            ));
        }
        let Some((_, certificate)) = h.certificates.iter().find(|(d, _)| *d == me.device_id().0) else {
            return tx.add_alert(&format!(
                "your device {} sent a new identity key without a certificate for this device; it was ignored",
                from.device.to_hex()
            ));
        };
        match me.adopt_identity_key(self.engine.crypto(), &h.identity_public, &h.identity_secret, certificate) {
            Ok(new) => tx.set_meta(META_PENDING_IDENTITY, &new.to_secret_bytes()?),
            Err(e) => tx.add_alert(&format!(
                "your device {} sent a new identity key that does not check out ({e}); it was ignored",
                from.device.to_hex()
            )),
        }
    }

    /// Marks a member device contradicted: system line, alert, and sending
    /// there blocked until the user accepts or removes it.
    fn flag_member(
        &self,
        row: &ConversationRow,
        by: &DeviceAddress,
        m: &MemberInfo,
        why: &str,
    ) -> Result<(), ClientError> {
        self.store.write(|tx| {
            tx.add_member_check(&MemberCheck {
                conversation: row.id,
                handle: m.address.handle.to_string(),
                device: m.address.device.to_hex(),
                device_key: m.device_key.clone(),
                identity_key: m.identity_key.clone(),
                added_by: by.to_string(),
                welcome: false,
                state: CONTRADICTED.into(),
                why: why.to_string(),
            })
        })?;
        self.contradicted_line(row, &by.to_string(), m.address.handle.as_str(), &m.address.device.to_hex(), why)
    }

    pub(crate) fn contradicted_line(
        &self,
        row: &ConversationRow,
        by: &str,
        handle: &str,
        device: &str,
        why: &str,
    ) -> Result<(), ClientError> {
        let target = row.target();
        // The command names the conversation by its id: a group's name is
        // any member's choice and must never become part of a command the
        // user is told to type.
        let text = format!(
            "{by} added a device {device} of {handle} to {target} that the key directory does not confirm ({why}); \
             sending there is blocked until you accept it (subrosa accept-device #{} {device}) or remove it",
            row.id.to_hex()
        );
        let from = by
            .split_once('/')
            .and_then(|(h, d)| Some(DeviceAddress { handle: Handle::new(h).ok()?, device: d.parse().ok()? }))
            .unwrap_or_else(|| self.identity().address());
        let event = SystemEvent::DeviceNotConfirmed {
            by: by.to_string(),
            member: handle.to_string(),
            device: device.to_string(),
            target,
            why: why.to_string(),
        };
        self.system_line(row, &from, event)?;
        self.store.write(|tx| tx.add_alert(&text))
    }
}

/// What a staged commit changes, stored with it so that it can be staged
/// again when another member's commit wins its epoch. Persisted (JSON, in
/// `pending_commits.meta`): a change of form needs a migration.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case", deny_unknown_fields)]
pub enum StagedChange {
    /// A new conversation (never staged again: its id is new).
    Create {
        /// `direct` or `group`.
        kind: String,
        /// The group's name (empty for a direct conversation).
        name: String,
        /// The peer of a direct conversation.
        peer: Option<String>,
        /// A message to send once the server confirmed the conversation
        /// (starting a 1:1 by sending), with its message id.
        first: Option<(MessageId, String)>,
    },
    /// Adds the devices of these key packages (those not members yet).
    Add {
        /// The claimed key packages.
        key_packages: Vec<B64>,
    },
    /// Removes these devices (those still members). `notify` sends them the
    /// commit (false for revoked devices, which the server no longer knows).
    Remove {
        /// The devices.
        devices: Vec<DeviceAddress>,
        /// Whether the removed devices get the commit.
        notify: bool,
    },
    /// Renames the group.
    Rename {
        /// The new name.
        name: String,
    },
    /// Sets the disappearing-messages timer (`None`: off).
    Disappearing {
        /// Seconds.
        seconds: Option<u32>,
    },
    /// Commits the proposals received (members' leaves).
    Pending,
    /// Nothing but fresh keys for this device (the periodic update).
    Update,
    /// This device's new credential (a new signature key or a certificate by
    /// the account's new identity key), with fresh keys.
    Credential,
    /// Moves the conversation to the post-quantum suite under the new id
    /// `to` (an MLS ReInit; see [`crate::moves`]).
    Move {
        /// The new conversation's id.
        to: ConversationId,
    },
}

impl std::fmt::Debug for StagedChange {
    /// Names the change; never the text of a first message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StagedChange::Create { kind, first, .. } => f
                .debug_struct("Create")
                .field("kind", kind)
                .field("first", &first.as_ref().map(|_| "<redacted>"))
                .finish_non_exhaustive(),
            StagedChange::Add { key_packages } => f.debug_struct("Add").field("count", &key_packages.len()).finish(),
            StagedChange::Remove { devices, notify } => {
                f.debug_struct("Remove").field("devices", devices).field("notify", notify).finish()
            }
            StagedChange::Rename { .. } => f.debug_struct("Rename").finish_non_exhaustive(),
            StagedChange::Disappearing { seconds } => f.debug_struct("Disappearing").field("seconds", seconds).finish(),
            StagedChange::Pending => f.write_str("Pending"),
            StagedChange::Update => f.write_str("Update"),
            StagedChange::Credential => f.write_str("Credential"),
            StagedChange::Move { to } => f.debug_struct("Move").field("to", to).finish(),
        }
    }
}

/// A staged commit's [`StagedChange`] and the history line to write once it
/// is applied (by whom, what).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingMeta {
    /// The change.
    pub change: StagedChange,
    /// The line for history once applied.
    pub line: Option<(DeviceAddress, String)>,
}

impl PendingMeta {
    /// Decodes the stored form.
    ///
    /// # Errors
    /// [`ClientError::Store`] for bytes this version cannot read.
    pub fn decode(bytes: &[u8]) -> Result<Self, ClientError> {
        serde_json::from_slice(bytes).map_err(|e| ClientError::Store(format!("pending commit: {e}")))
    }
}

/// Where the device that made a conversation stuck is remembered (its
/// address), so the conversation can be re-created without it.
pub fn stuck_key(conversation: &ConversationId) -> String {
    format!("stuck:{}", conversation.to_hex())
}

/// The device remembered as having made `conversation` stuck.
pub fn stuck_culprit_in(tx: &dyn Tx, conversation: &ConversationId) -> Result<Option<DeviceAddress>, ClientError> {
    Ok(tx.meta(&stuck_key(conversation))?.and_then(|v| std::str::from_utf8(&v).ok().and_then(|t| t.parse().ok())))
}
/// What marks an envelope processed: its kind, conversation and claimed
/// sender with its ciphertext, so a valid ciphertext the server first
/// delivers under another sender (dropped) does not make the genuine
/// delivery look done. A persisted format (byte snapshot in the tests).
pub fn envelope_digest(env: &Envelope) -> Vec<u8> {
    let sender = env.sender.to_string();
    let mut h = Sha256::new();
    h.update(b"subrosa processed envelope v2\0");
    h.update(env.kind.as_str().as_bytes());
    h.update([0]);
    h.update(env.conversation.0);
    h.update((sender.len() as u64).to_be_bytes());
    h.update(sender.as_bytes());
    h.update(env.ciphertext.as_slice());
    h.finalize().to_vec()
}

/// Whether `env` was processed: its digest, or the ciphertext-only digest
/// stores from before kept (and this device's own commits still record,
/// as their staged form knows only the ciphertext). Since the change,
/// ciphertext-only digests are written for this device's own commits
/// alone, so the server cannot plant one by a misnamed delivery.
fn was_processed(tx: &dyn Tx, env: &Envelope, digest: &[u8]) -> Result<bool, ClientError> {
    Ok(tx.is_processed(digest)? || tx.is_processed(&Sha256::digest(env.ciphertext.as_slice()))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored form of a pending commit's meta: a change of it is a
    /// visible decision (and needs a migration of stored rows).
    #[test]
    fn pending_meta_bytes_are_stable() {
        let alice =
            DeviceAddress { handle: Handle::new("alice").expect("handle"), device: subrosa_proto::DeviceId([1; 8]) };
        let cases = [
            (
                PendingMeta {
                    change: StagedChange::Create {
                        kind: "direct".into(),
                        name: String::new(),
                        peer: Some("bob".into()),
                        first: Some((MessageId([2; 16]), "hi".into())),
                    },
                    line: None,
                },
                r#"{"change":{"change":"create","kind":"direct","name":"","peer":"bob","first":["02020202020202020202020202020202","hi"]},"line":null}"#,
            ),
            (
                PendingMeta {
                    change: StagedChange::Remove { devices: vec![alice.clone()], notify: false },
                    line: Some((alice.clone(), "you removed a device".into())),
                },
                r#"{"change":{"change":"remove","devices":[{"handle":"alice","device":"0101010101010101"}],"notify":false},"line":[{"handle":"alice","device":"0101010101010101"},"you removed a device"]}"#,
            ),
            (
                PendingMeta { change: StagedChange::Add { key_packages: vec![B64(vec![0xAB, 0xCD])] }, line: None },
                r#"{"change":{"change":"add","key_packages":["q80="]},"line":null}"#,
            ),
            (
                PendingMeta { change: StagedChange::Rename { name: "club".into() }, line: None },
                r#"{"change":{"change":"rename","name":"club"},"line":null}"#,
            ),
            (
                PendingMeta { change: StagedChange::Pending, line: None },
                r#"{"change":{"change":"pending"},"line":null}"#,
            ),
            (
                PendingMeta { change: StagedChange::Disappearing { seconds: Some(3600) }, line: None },
                r#"{"change":{"change":"disappearing","seconds":3600},"line":null}"#,
            ),
            (
                PendingMeta { change: StagedChange::Disappearing { seconds: None }, line: None },
                r#"{"change":{"change":"disappearing","seconds":null},"line":null}"#,
            ),
            (PendingMeta { change: StagedChange::Update, line: None }, r#"{"change":{"change":"update"},"line":null}"#),
            (
                PendingMeta { change: StagedChange::Credential, line: None },
                r#"{"change":{"change":"credential"},"line":null}"#,
            ),
            (
                PendingMeta { change: StagedChange::Move { to: ConversationId([0xCD; 16]) }, line: None },
                r#"{"change":{"change":"move","to":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"},"line":null}"#,
            ),
        ];
        for (meta, json) in cases {
            assert_eq!(String::from_utf8(serde_json::to_vec(&meta).expect("encode")).expect("utf-8"), json);
            assert_eq!(PendingMeta::decode(json.as_bytes()).expect("decode"), meta);
        }
        assert!(PendingMeta::decode(br#"{"change":{"change":"explode"},"line":null}"#).is_err());
        let first = StagedChange::Create {
            kind: "direct".into(),
            name: String::new(),
            peer: None,
            first: Some((MessageId([0; 16]), "secret words".into())),
        };
        assert!(!format!("{first:?}").contains("secret"), "Debug never shows a message");
    }
}

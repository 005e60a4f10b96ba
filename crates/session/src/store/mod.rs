//! The client's local store: one trait, two backends.
//!
//! Everything the client keeps (identity and device keys, MLS group state
//! and key packages, contacts, conversations, history, the outbox and the
//! key directory's state) is reached through a transaction on a [`Store`]:
//! [`Store::read`] hands its closure a `&dyn Tx` (only the reading methods
//! of the repositories can be called), [`Store::write`] a `&mut dyn Tx`, and
//! everything a write closure did is stored when it returns `Ok`, or none of
//! it when it returns `Err`. The repositories are one trait per aggregate
//! ([`Meta`], [`Contacts`], [`Conversations`], [`History`], [`Annotations`], [`Outbox`],
//! [`Directory`], [`MlsState`]); [`Tx`] is all of them.
//!
//! Two backends implement them: `SqliteStore` in `subrosa-client` (one
//! SQLCipher database encrypted at rest, the store of every real device) and [`MemoryStore`]
//! (for tests, and later for clients with nowhere to keep a file). Both run
//! the behaviours of `conformance.rs`.
//!
//! # How concurrency works
//!
//! A transaction holds the store's gate for its whole duration: a second
//! thread's read or write waits until the first one committed or rolled
//! back, so nothing another task does can join an open transaction or be
//! rolled back with it, and two writers serialize. The gate is re-entrant
//! for the thread holding it, because mls-rs writes group state through
//! [`GroupStore`] and [`KeyPackageStore`] from inside the engine call that a
//! write closure makes: those writes join the transaction of the closure
//! that caused them, so a crash can never keep the one without the other.
//! A closure never awaits (it is not `async`), so no other task can run on
//! that thread meanwhile. A write begun inside a read transaction is a bug
//! and refused.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;

use mls_rs_core::group::{EpochRecord, GroupState, GroupStateStorage};
use mls_rs_core::key_package::{KeyPackageData, KeyPackageStorage};
use mls_rs_core::mls_rs_codec::{MlsDecode, MlsEncode};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ClientError;

#[cfg(any(test, feature = "conformance"))]
#[doc(hidden)]
pub mod conformance;
mod memory;

pub use memory::MemoryStore;

/// MLS epochs kept per group, for late messages of earlier epochs.
pub const EPOCHS_KEPT: u64 = 3;

/// A member device whose keys the key directory has not confirmed yet
/// (`state` "unchecked"), or contradicted ("contradicted").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberCheck {
    /// The conversation.
    pub conversation: subrosa_proto::ConversationId,
    /// The device's account.
    pub handle: String,
    /// The device id (hex).
    pub device: String,
    /// The device's signature key, as its certificate in the group says.
    pub device_key: Vec<u8>,
    /// The identity key that certified it.
    pub identity_key: Vec<u8>,
    /// Who added it ("handle/device").
    pub added_by: String,
    /// True when it came with the Welcome that let this device in.
    pub welcome: bool,
    /// "unchecked" or "contradicted".
    pub state: String,
    /// What contradicted it (empty while unchecked).
    pub why: String,
}

/// A message as stored in history. Its JSON form is what `history --json`
/// prints; front ends that get it from a daemon read it back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// For this account's own messages: queued, sent or failed. `None` for
    /// others' messages and system lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<MessageState>,
    /// Why a message failed (the server's refusal), with [`MessageState::Failed`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For a system line: what it says, typed, for each front end to render
    /// in its own words (`text` is the neutral English rendering). `None`
    /// for messages, and for lines stored by a version before the typed
    /// events or of an event this version does not know.
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "known_event")]
    pub event: Option<crate::SystemEvent>,
    /// The message this one answers (its id, hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Its author changed its text: `text` is the text now.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub edited: bool,
    /// Its author deleted it for everyone: the text is gone from the store.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub deleted: bool,
    /// Reactions to it, by emoji, in the order they first came.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub reactions: Vec<Reaction>,
    /// For this account's own messages in conversations of up to
    /// [`RECEIPT_DETAIL_LIMIT`] other accounts: where it is for each of
    /// them (`sent`, `delivered` or `read`).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub receipts: Vec<MemberReceipt>,
    /// The preview of its first link that its sender's device made (the
    /// sender's word: front ends sanitise it before printing).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub preview: Option<MessagePreview>,
    /// When every member device deletes it (disappearing messages), ms
    /// since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expires_at: Option<u64>,
    /// In a message request not yet accepted (see `requests`): set by the
    /// front end that shows it, never stored.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub request: bool,
    /// Its links that are on this device's dangerous-link list: set when
    /// it is read for showing, never stored (the list may change).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub dangerous_links: Vec<String>,
}

/// A message's link preview as front ends show it: the link, its title and
/// description, and whether an image came with it (the image itself stays
/// in the store; `history --json` does not carry it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagePreview {
    /// The link.
    pub url: String,
    /// The page's title, as the sender's device read it.
    pub title: String,
    /// The page's description, as the sender's device read it.
    pub description: String,
    /// A thumbnail came with it.
    pub has_thumbnail: bool,
    /// The thumbnail (kept in the store, never in JSON).
    #[serde(skip)]
    pub thumbnail: Option<subrosa_core::preview::Thumbnail>,
}

impl From<subrosa_core::preview::LinkPreview> for MessagePreview {
    fn from(p: subrosa_core::preview::LinkPreview) -> Self {
        MessagePreview {
            url: p.url,
            title: p.title,
            description: p.description,
            has_thumbnail: p.thumbnail.is_some(),
            thumbnail: p.thumbnail,
        }
    }
}

impl MessagePreview {
    /// The preview as the content encoding carries it.
    pub fn to_core(&self) -> subrosa_core::preview::LinkPreview {
        subrosa_core::preview::LinkPreview {
            url: self.url.clone(),
            title: self.title.clone(),
            description: self.description.clone(),
            thumbnail: self.thumbnail.clone(),
        }
    }
}

/// Above this many other accounts, a message's receipts are not listed
/// member by member (its `state` still says whether all have it).
pub const RECEIPT_DETAIL_LIMIT: usize = 100;

/// One reaction to a message and who reacted with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaction {
    /// The emoji (as sent: front ends sanitise it before printing).
    pub emoji: String,
    /// The accounts that reacted with it, in the order they did.
    pub from: Vec<String>,
}

/// Where one of this account's messages is for one other account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberReceipt {
    /// The account.
    pub member: String,
    /// `sent` (no receipt yet), `delivered` or `read`.
    pub state: MessageState,
}

/// A receipt this device owes: the messages of one author in one
/// conversation that it stored (or its user read) since it last sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptDue {
    /// The conversation.
    pub conversation: subrosa_proto::ConversationId,
    /// The author of the messages, to whose devices the receipt goes.
    pub author: String,
    /// Delivered or read.
    pub kind: subrosa_core::content::ReceiptKind,
    /// The messages, in the order they were noted.
    pub ids: Vec<[u8; 16]>,
}

/// An edit, delete or reaction that came before the message it concerns,
/// kept until that message arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlyAction {
    /// The sender's account.
    pub from: String,
    /// The sender's device (hex).
    pub device: String,
    /// The encoded content (as [`subrosa_core::content::Content::encode`]).
    pub content: Vec<u8>,
}

/// A system line's event as read back: one this version does not know (from
/// a newer daemon) is `None`, as in the store, and the line keeps its text.
fn known_event<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<crate::SystemEvent>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(v.and_then(|v| serde_json::from_value(v).ok()))
}

/// Where one of this account's own messages is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum MessageState {
    /// Stored on this device, not yet on the server: the next command that
    /// reaches the server sends it.
    Queued,
    /// The server stored it for the recipients.
    Sent,
    /// The server refused it; it will not be sent (see `reason`).
    Failed,
    /// Every other account it went to has it on a device (their receipts
    /// said so). Never stored: read from the receipts.
    Delivered,
    /// Every other account it went to has read it.
    Read,
}

impl MessageState {
    /// The stable name (as in `history --json`).
    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Queued => "queued",
            MessageState::Sent => "sent",
            MessageState::Failed => "failed",
            MessageState::Delivered => "delivered",
            MessageState::Read => "read",
        }
    }

    /// Reads [`Self::as_str`]'s names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(MessageState::Queued),
            "sent" => Some(MessageState::Sent),
            "failed" => Some(MessageState::Failed),
            "delivered" => Some(MessageState::Delivered),
            "read" => Some(MessageState::Read),
            _ => None,
        }
    }
}

/// A security alert as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    /// Its number.
    pub id: u64,
    /// When it was raised, ms since the Unix epoch.
    pub at: u64,
    /// Whom it concerns: a member's handle, or "the server" (none for
    /// alerts from before this was recorded).
    pub concerns: Option<String>,
    /// A proven key-directory fork (blocks sending until cleared).
    pub fork: bool,
    /// What happened.
    pub text: String,
    /// For a fork: the proof (JSON: both signed heads).
    #[serde(skip)]
    pub proof: Option<String>,
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

/// A send in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedSend {
    /// Row id: the order of sending.
    pub id: i64,
    /// The idempotency key the server stores the send under.
    pub send_id: [u8; 16],
    /// The conversation and end-to-end message id; `None` for a row of v4.
    pub message: Option<(subrosa_proto::ConversationId, [u8; 16])>,
    /// The encoded content (not yet encrypted); `None` for a row of v4.
    pub content: Option<Vec<u8>>,
    /// The request body, once encrypted: posted byte for byte until answered.
    pub request: Option<Vec<u8>>,
}

/// A staged commit stored before it is posted.
#[derive(Clone)]
pub struct PendingCommit {
    /// The conversation.
    pub conversation: subrosa_proto::ConversationId,
    /// The send id of `request` (the server's idempotency key).
    pub send_id: [u8; 16],
    /// The exact request bytes, every Welcome whole: re-posted as they
    /// are, or with a large Welcome by reference ([`Self::by_reference`]).
    pub request: Vec<u8>,
    /// SHA-256 of the commit message (recognises its echo).
    pub commit_digest: Vec<u8>,
    /// What the commit does, encoded by the client (to re-stage it).
    pub meta: Vec<u8>,
    /// The request as last posted with its large Welcomes by reference,
    /// once their blobs were uploaded whole (none until then).
    pub by_reference: Option<ByReference>,
}

/// A staged commit's request with its large Welcomes uploaded as blobs and
/// referenced: posted again as it is while its blobs are young, so a re-post
/// uploads nothing; the whole request stays beside it, to upload again once
/// they are not.
#[derive(Clone, PartialEq, Eq)]
pub struct ByReference {
    /// The request bytes, references in place of the large Welcomes.
    pub request: Vec<u8>,
    /// When the blobs were uploaded (ms since the Unix epoch, this
    /// device's clock).
    pub uploaded_at_ms: u64,
    /// Until when a re-post may name them (ms, this device's clock).
    pub reuse_until_ms: u64,
}

impl ByReference {
    /// Whether a post at `now_ms` may name these blobs.
    pub fn usable_at(&self, now_ms: u64) -> bool {
        (self.uploaded_at_ms..self.reuse_until_ms).contains(&now_ms)
    }
}

impl std::fmt::Debug for ByReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByReference")
            .field("uploaded_at_ms", &self.uploaded_at_ms)
            .field("reuse_until_ms", &self.reuse_until_ms)
            .finish_non_exhaustive()
    }
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

/// Milliseconds since the Unix epoch, by the system clock (none on wasm32:
/// a web client hands its clock in).
#[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Small named values: this device's identity, the server URL, pinned keys.
pub trait Meta {
    /// Reads a meta value.
    ///
    /// # Errors
    /// Database errors.
    fn meta(&self, key: &str) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError>;

    /// Writes a meta value.
    ///
    /// # Errors
    /// Database errors.
    fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<(), ClientError>;

    /// Deletes a meta value (nothing when absent).
    ///
    /// # Errors
    /// Database errors.
    fn delete_meta(&mut self, key: &str) -> Result<(), ClientError>;

    /// The keys that start with `prefix`, in order (so rows kept one per
    /// item, such as `call.<id>`, can be swept).
    ///
    /// # Errors
    /// Database errors.
    fn meta_keys(&self, prefix: &str) -> Result<Vec<String>, ClientError>;
}

/// The key directory's state: the verified chain of roots, signed heads,
/// heads members gossiped, and the alerts for the user.
pub trait Directory {
    /// The directory root this device verified for `epoch`.
    ///
    /// # Errors
    /// Database errors.
    fn kt_root(&self, epoch: u64) -> Result<Option<Vec<u8>>, ClientError>;

    /// The first and last epochs of the verified chain.
    ///
    /// # Errors
    /// Database errors.
    fn kt_range(&self) -> Result<Option<(u64, u64)>, ClientError>;

    /// Records verified roots for epochs `from`, `from + 1`, ….
    ///
    /// # Errors
    /// Database errors.
    fn put_kt_roots(&mut self, from: u64, roots: &[[u8; 32]]) -> Result<(), ClientError>;

    /// The signed head this device holds for `epoch`.
    ///
    /// # Errors
    /// Database errors.
    fn kt_signed_head(&self, epoch: u64) -> Result<Option<Vec<u8>>, ClientError>;

    /// The newest signed head this device holds.
    ///
    /// # Errors
    /// Database errors.
    fn kt_newest_signed_head(&self) -> Result<Option<Vec<u8>>, ClientError>;

    /// Keeps a verified signed head (the first one kept for an epoch stays).
    ///
    /// # Errors
    /// Database errors.
    fn put_kt_signed_head(&mut self, epoch: u64, head: &[u8]) -> Result<(), ClientError>;

    /// Keeps the head a member's message carried, to check later: one per
    /// member, the newest epoch (an older one is ignored).
    ///
    /// # Errors
    /// Database errors.
    fn push_kt_head_gossip(&mut self, source: &str, epoch: u64, head: &[u8]) -> Result<(), ClientError>;

    /// The gossiped heads not checked yet: `(member, head)`.
    ///
    /// # Errors
    /// Database errors.
    fn kt_head_gossip(&self) -> Result<Vec<(String, Vec<u8>)>, ClientError>;

    /// Forgets a checked head (unless a newer one came meanwhile).
    ///
    /// # Errors
    /// Database errors.
    fn drop_kt_head_gossip(&mut self, source: &str, head: &[u8]) -> Result<(), ClientError>;

    /// Records an alert naming whom it concerns; `proof` (JSON) makes it a
    /// proven fork, which blocks sending until cleared. The same text twice
    /// is one alert (a cleared one stays cleared).
    ///
    /// # Errors
    /// Database errors.
    fn add_alert_about(&mut self, concerns: &str, text: &str, proof: Option<&str>) -> Result<(), ClientError>;

    /// Alerts not cleared, oldest first.
    ///
    /// # Errors
    /// Database errors.
    fn alerts(&self) -> Result<Vec<Alert>, ClientError>;

    /// Clears alerts: every notice, and proven forks too when `forks`.
    /// Returns how many were cleared.
    ///
    /// # Errors
    /// Database errors.
    fn clear_alerts(&mut self, forks: bool) -> Result<usize, ClientError>;

    /// The first proven fork not cleared, if any.
    ///
    /// # Errors
    /// Database errors.
    fn open_fork(&self) -> Result<Option<String>, ClientError>;

    /// Records an alert for the user (once per distinct text).
    ///
    /// # Errors
    /// Database errors.
    fn add_alert(&mut self, text: &str) -> Result<(), ClientError>;

    /// Alerts not shown yet, oldest first; marks them shown.
    ///
    /// # Errors
    /// Database errors.
    fn take_alerts(&mut self) -> Result<Vec<String>, ClientError>;
}

/// Contacts: identity keys pinned on first use, and their verification.
pub trait Contacts {
    /// The pinned identity key of a handle, if any.
    ///
    /// # Errors
    /// Database errors.
    fn contact_key(&self, handle: &str) -> Result<Option<Vec<u8>>, ClientError>;

    /// Pins a contact's identity key on first use.
    ///
    /// # Errors
    /// Database errors.
    fn pin_contact(&mut self, handle: &str, identity_key: &[u8]) -> Result<(), ClientError>;

    /// Marks a contact verified (its pinned identity key compared in person).
    ///
    /// # Errors
    /// Database errors.
    fn set_verified(&mut self, handle: &str, verified: bool) -> Result<(), ClientError>;

    /// Pins a contact's new identity key: unverified from now on. Returns
    /// whether it had been verified (then sending waits for the user).
    ///
    /// # Errors
    /// Database errors.
    fn change_contact_key(&mut self, handle: &str, identity_key: &[u8]) -> Result<bool, ClientError>;

    /// The key a contact's pin held before its last change, if it changed:
    /// devices of that account not yet carried to the new key still hold
    /// it (see `Session`'s sender check).
    ///
    /// # Errors
    /// Database errors.
    fn contact_previous_key(&self, handle: &str) -> Result<Option<Vec<u8>>, ClientError>;

    /// Whether a verified contact's key changed and the user has not yet
    /// verified again or accepted it.
    ///
    /// # Errors
    /// Database errors.
    fn key_change_pending(&self, handle: &str) -> Result<bool, ClientError>;

    /// The user accepted (or verified) a contact's changed key.
    ///
    /// # Errors
    /// Database errors.
    fn clear_key_change(&mut self, handle: &str) -> Result<(), ClientError>;

    /// All contacts by handle.
    ///
    /// # Errors
    /// Database errors.
    fn contacts(&self) -> Result<Vec<Contact>, ClientError>;
}

/// Conversations, the ids this device ever knew, past members, member
/// devices waiting for the directory check, and key-update bookkeeping.
pub trait Conversations {
    /// Records a conversation.
    ///
    /// # Errors
    /// Database errors.
    fn add_conversation(
        &mut self,
        id: &subrosa_proto::ConversationId,
        kind: &str,
        name: &str,
        peer: Option<&str>,
    ) -> Result<(), ClientError>;

    /// When this device recorded the conversation (created or joined it), ms.
    ///
    /// # Errors
    /// Database errors.
    fn conversation_created_at(&self, id: &subrosa_proto::ConversationId) -> Result<u64, ClientError>;

    /// True when this device knows or ever knew the conversation id (its
    /// tombstone outlives leaving, removal and forgetting).
    ///
    /// # Errors
    /// Database errors.
    fn ever_knew(&self, id: &subrosa_proto::ConversationId) -> Result<bool, ClientError> {
        Ok(self.known_conversation(id)?.is_some())
    }

    /// Whether this device ever knew the conversation id: `Some(true)` when
    /// it knows it only from the history a linking device handed over (it
    /// never held the group), `Some(false)` otherwise.
    ///
    /// # Errors
    /// Database errors.
    fn known_conversation(&self, id: &subrosa_proto::ConversationId) -> Result<Option<bool>, ClientError>;

    /// Records a conversation known from the history a linking device
    /// handed over: this device never held it, so a Welcome from this
    /// account's own device may still let it join (once).
    ///
    /// # Errors
    /// Database errors.
    fn add_linked_conversation(
        &mut self,
        id: &subrosa_proto::ConversationId,
        kind: &str,
        name: &str,
        peer: Option<&str>,
    ) -> Result<(), ClientError>;

    /// Records that these accounts were members of a conversation.
    ///
    /// # Errors
    /// Database errors.
    fn note_members(&mut self, id: &subrosa_proto::ConversationId, handles: &[&str]) -> Result<(), ClientError>;

    /// True when `handle` was ever seen as a member of the conversation.
    ///
    /// # Errors
    /// Database errors.
    fn was_member(&self, id: &subrosa_proto::ConversationId, handle: &str) -> Result<bool, ClientError>;

    /// Queues a member device for the key-directory check.
    ///
    /// # Errors
    /// Database errors.
    fn add_member_check(&mut self, c: &MemberCheck) -> Result<(), ClientError>;

    /// Member devices in `state` ("unchecked" or "contradicted"), of one
    /// conversation or of all.
    ///
    /// # Errors
    /// Database errors.
    fn member_checks(
        &self,
        conversation: Option<&subrosa_proto::ConversationId>,
        state: &str,
    ) -> Result<Vec<MemberCheck>, ClientError>;

    /// Sets a member check's state.
    ///
    /// # Errors
    /// Database errors.
    fn set_member_check(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        handle: &str,
        device: &str,
        state: &str,
        why: &str,
    ) -> Result<(), ClientError>;

    /// Drops a member check (confirmed, accepted by the user, or the device
    /// left the conversation). `device` None drops every device of `handle`.
    ///
    /// # Errors
    /// Database errors.
    fn drop_member_check(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        handle: &str,
        device: Option<&str>,
    ) -> Result<usize, ClientError>;

    /// Deletes a conversation this device refused after joining it (its
    /// Welcome failed the key-directory check): row, history and MLS state
    /// go, the tombstone stays.
    ///
    /// # Errors
    /// Database errors.
    fn drop_refused_conversation(&mut self, id: &subrosa_proto::ConversationId) -> Result<(), ClientError>;

    /// Forgets a conversation and its MLS state (a creation the server refused).
    ///
    /// # Errors
    /// Database errors.
    fn forget_conversation(&mut self, id: &subrosa_proto::ConversationId) -> Result<(), ClientError>;

    /// The most recently active direct conversation with `peer`.
    ///
    /// # Errors
    /// Database errors.
    fn direct_conversation(&self, peer: &str) -> Result<Option<subrosa_proto::ConversationId>, ClientError>;

    /// A conversation by id.
    ///
    /// # Errors
    /// Database errors.
    fn conversation(&self, id: &subrosa_proto::ConversationId) -> Result<Option<ConversationRow>, ClientError>;

    /// Direct conversations with a peer.
    ///
    /// # Errors
    /// Database errors.
    fn conversations_with(&self, peer: &str) -> Result<Vec<ConversationRow>, ClientError>;

    /// Conversations whose id (hex) starts with `prefix` (lowercase hex).
    ///
    /// # Errors
    /// Database errors.
    fn conversations_by_prefix(&self, prefix: &str) -> Result<Vec<ConversationRow>, ClientError>;

    /// Groups with this name (active ones first).
    ///
    /// # Errors
    /// Database errors.
    fn groups_named(&self, name: &str) -> Result<Vec<ConversationRow>, ClientError>;

    /// Every group.
    ///
    /// # Errors
    /// Database errors.
    fn group_rows(&self) -> Result<Vec<ConversationRow>, ClientError>;

    /// Every active conversation.
    ///
    /// # Errors
    /// Database errors.
    fn active_conversations(&self) -> Result<Vec<ConversationRow>, ClientError>;

    /// Renames a group locally (after a rename commit).
    ///
    /// # Errors
    /// Database errors.
    fn set_conversation_name(&mut self, id: &subrosa_proto::ConversationId, name: &str) -> Result<(), ClientError>;

    /// Marks a conversation left: history stays, MLS state goes.
    ///
    /// # Errors
    /// Database errors.
    fn deactivate_conversation(&mut self, id: &subrosa_proto::ConversationId) -> Result<(), ClientError>;

    /// Marks a conversation retired, keeping its MLS state (a conversation
    /// that moved: messages members sent there before they saw the move
    /// are still read; [`Self::deactivate_conversation`] erases it later).
    ///
    /// # Errors
    /// Database errors.
    fn retire_conversation(&mut self, id: &subrosa_proto::ConversationId) -> Result<(), ClientError>;

    /// When this device last replaced its keys in `conversation` (ms; 0 when
    /// never) and how many messages it sent there since.
    ///
    /// # Errors
    /// Database errors.
    fn key_update_state(&self, conversation: &subrosa_proto::ConversationId) -> Result<(u64, u64), ClientError>;

    /// Counts one message this device sent in `conversation`.
    ///
    /// # Errors
    /// Database errors.
    fn note_sent(&mut self, conversation: &subrosa_proto::ConversationId) -> Result<(), ClientError>;

    /// Records that this device's keys in `conversation` are fresh as of
    /// `at_ms` (it committed, created or joined).
    ///
    /// # Errors
    /// Database errors.
    fn note_own_update(&mut self, conversation: &subrosa_proto::ConversationId, at_ms: u64) -> Result<(), ClientError>;

    /// Records that member `device` committed (and so replaced its keys) in
    /// `conversation` at `at_ms`.
    ///
    /// # Errors
    /// Database errors.
    fn note_member_update(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        device: &subrosa_proto::DeviceAddress,
        at_ms: u64,
    ) -> Result<(), ClientError>;

    /// When `device` was last seen committing in `conversation` (ms).
    ///
    /// # Errors
    /// Database errors.
    fn member_update(
        &self,
        conversation: &subrosa_proto::ConversationId,
        device: &subrosa_proto::DeviceAddress,
    ) -> Result<Option<u64>, ClientError>;
}

/// Messages, sequence numbers, and the digests of processed ciphertexts.
pub trait History {
    /// The next sequence number this device sends with in a conversation.
    ///
    /// # Errors
    /// Database errors.
    fn next_seq(&mut self, conversation: &subrosa_proto::ConversationId) -> Result<u64, ClientError>;

    /// Gives back a sequence number a send took and never used (the server
    /// refused it), when no later send took one since.
    ///
    /// # Errors
    /// Database errors.
    fn release_seq(&mut self, conversation: &subrosa_proto::ConversationId, seq: u64) -> Result<(), ClientError>;

    /// Records that `seq` arrived from `device` in a conversation. Returns
    /// how many numbers it skipped (a gap), or `None` when it is older than
    /// the newest seen (it arrived late, out of order).
    ///
    /// # Errors
    /// Database errors.
    fn arrived_seq(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        device: &str,
        seq: u64,
    ) -> Result<Option<u64>, ClientError>;

    /// Stores a message unless one with the same id is already in the
    /// conversation. Returns whether it was new.
    ///
    /// # Errors
    /// Database errors.
    fn insert_message(
        &mut self,
        m: &StoredMessage,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        seen: bool,
    ) -> Result<bool, ClientError>;

    /// Removes a message from history (a send that never left, moved elsewhere).
    ///
    /// # Errors
    /// Database errors.
    fn delete_message(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
    ) -> Result<(), ClientError>;

    /// Sets when a stored message disappears (a message that already has an
    /// expiry keeps it; an unknown one is left alone).
    ///
    /// # Errors
    /// Database errors.
    fn set_message_expiry(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        expires_at: u64,
    ) -> Result<(), ClientError>;

    /// Deletes every message whose expiry is at or before `now_ms`, with
    /// its reactions, receipts and attachment rows, and the attachment rows
    /// of messages deleted for everyone, and returns the file names (in the
    /// attachment folder) of the sealed blobs those rows kept, for the
    /// caller to delete.
    ///
    /// # Errors
    /// Database errors.
    fn delete_expired(&mut self, now_ms: u64) -> Result<Vec<String>, ClientError>;

    /// History of the given conversations, oldest first.
    ///
    /// # Errors
    /// Database errors.
    fn history(&self, conversations: &[ConversationRow]) -> Result<Vec<StoredMessage>, ClientError>;

    /// Every message and system line stored after the one numbered
    /// `after_seq` (the store's own arrival number, which only grows: a
    /// high-water mark) and at or after `since_ms` (its `received_at`), in
    /// every conversation but the hidden one of the account's own devices,
    /// in arrival order, each with its arrival number: what a front end
    /// that connects later replays.
    ///
    /// # Errors
    /// Database errors.
    fn received_after_seq(&self, after_seq: u64, since_ms: u64) -> Result<Vec<(u64, StoredMessage)>, ClientError>;

    /// Messages stored but not yet shown by `receive`, oldest first; marks them shown.
    ///
    /// # Errors
    /// Database errors.
    fn take_unseen(&mut self) -> Result<Vec<StoredMessage>, ClientError>;

    /// Whether a delivered ciphertext (by digest) was already processed.
    ///
    /// # Errors
    /// Database errors.
    fn is_processed(&self, digest: &[u8]) -> Result<bool, ClientError>;

    /// Records a processed ciphertext digest.
    ///
    /// # Errors
    /// Database errors.
    fn mark_processed(&mut self, digest: &[u8]) -> Result<(), ClientError>;

    /// Sets the state of one of this account's messages (and why, when it failed).
    ///
    /// # Errors
    /// Database errors.
    fn set_message_state(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        state: MessageState,
        reason: Option<&str>,
    ) -> Result<(), ClientError>;

    /// One message of a conversation, by its end-to-end id.
    ///
    /// # Errors
    /// Database errors.
    fn message(
        &self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
    ) -> Result<Option<StoredMessage>, ClientError>;
}

/// Whether a reaction set (`on`) or taken back at `at` replaces what is
/// stored for the same member, emoji and message (set or taken back at
/// `prev_at`). The one sent last wins; at the same time, taking back wins.
/// So every device ends in the same state whatever order the two arrive
/// in: the author's other devices and each member see one answer.
#[must_use]
pub fn reaction_supersedes(at: u64, on: bool, prev_at: u64, prev_on: bool) -> bool {
    at > prev_at || (at == prev_at && !on && prev_on)
}

/// What members do to stored messages: reactions, edits, deletes for
/// everyone and receipts, and the receipts this device owes. The rules
/// (who may do what) are the session's; these only store.
pub trait Annotations {
    /// Sets (`on`) or takes back `member`'s reaction `emoji` to a message,
    /// sent at `at`, unless what is stored was sent later
    /// ([`reaction_supersedes`]): a store keeps what was taken back, so
    /// an older "add" that arrives late cannot bring it back.
    ///
    /// # Errors
    /// Database errors.
    fn set_reaction(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        member: &str,
        emoji: &str,
        on: bool,
        at: u64,
    ) -> Result<(), ClientError>;

    /// Replaces a message's text by the edit sent at `at`, unless an edit
    /// sent later was applied already (edits may arrive out of order).
    /// Returns whether it was applied. The message is shown again by the
    /// next `take_unseen`.
    ///
    /// # Errors
    /// Database errors.
    fn edit_message(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        text: &str,
        at: u64,
    ) -> Result<bool, ClientError>;

    /// Deletes a message for everyone: its text and reactions go from the
    /// store (the row stays, marked deleted, and is shown again by the next
    /// `take_unseen`), and so do actions kept for it.
    ///
    /// # Errors
    /// Database errors.
    fn erase_message(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
    ) -> Result<(), ClientError>;

    /// Shows a message again by the next `take_unseen` (a reaction changed).
    ///
    /// # Errors
    /// Database errors.
    fn mark_unseen(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
    ) -> Result<(), ClientError>;

    /// The other accounts one of this account's messages went to.
    ///
    /// # Errors
    /// Database errors.
    fn set_recipients(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        members: &[String],
    ) -> Result<(), ClientError>;

    /// Records `member`'s receipt for a message; a read receipt is never
    /// replaced by a delivery receipt.
    ///
    /// # Errors
    /// Database errors.
    fn add_receipt(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        member: &str,
        kind: subrosa_core::content::ReceiptKind,
        at: u64,
    ) -> Result<(), ClientError>;

    /// Keeps an action that came before the message `target` it concerns.
    ///
    /// # Errors
    /// Database errors.
    fn push_early_action(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        target: &[u8],
        action: &EarlyAction,
    ) -> Result<(), ClientError>;

    /// How many actions `sender` has waiting in `conversation` for messages
    /// that have not arrived.
    ///
    /// # Errors
    /// Database errors.
    fn early_actions_from(
        &self,
        conversation: &subrosa_proto::ConversationId,
        sender: &str,
    ) -> Result<usize, ClientError>;

    /// The actions kept for `target`, in arrival order; forgets them.
    ///
    /// # Errors
    /// Database errors.
    fn take_early_actions(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        target: &[u8],
    ) -> Result<Vec<EarlyAction>, ClientError>;

    /// Notes that this device owes `author` a receipt for a message (once
    /// per message and kind).
    ///
    /// # Errors
    /// Database errors.
    fn push_receipt_due(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8; 16],
        author: &str,
        kind: subrosa_core::content::ReceiptKind,
    ) -> Result<(), ClientError>;

    /// The receipts owed, one per conversation, author and kind (ids in
    /// the order they were noted); forgets them.
    ///
    /// # Errors
    /// Database errors.
    fn take_receipts_due(&mut self) -> Result<Vec<ReceiptDue>, ClientError>;

    /// Marks every message of other accounts in a conversation read;
    /// returns those not read before, oldest first, with their authors.
    ///
    /// # Errors
    /// Database errors.
    fn mark_read(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        at: u64,
    ) -> Result<Vec<([u8; 16], String)>, ClientError>;
}

/// A message's state from its stored state and its receipts: `read` when
/// every account it went to read it, `delivered` when every one has it;
/// and the per-member detail (up to [`RECEIPT_DETAIL_LIMIT`] accounts).
pub fn receipt_state(
    stored: MessageState,
    recipients: &[String],
    receipts: &[(String, subrosa_core::content::ReceiptKind)],
) -> (MessageState, Vec<MemberReceipt>) {
    use subrosa_core::content::ReceiptKind;
    let of = |member: &str| receipts.iter().find(|(m, _)| m == member).map(|(_, k)| *k);
    if recipients.is_empty() || !matches!(stored, MessageState::Sent) {
        return (stored, Vec::new());
    }
    let state = if recipients.iter().all(|r| of(r) == Some(ReceiptKind::Read)) {
        MessageState::Read
    } else if recipients.iter().all(|r| of(r).is_some()) {
        MessageState::Delivered
    } else {
        MessageState::Sent
    };
    let detail = if recipients.len() <= RECEIPT_DETAIL_LIMIT {
        recipients
            .iter()
            .map(|r| MemberReceipt {
                member: r.clone(),
                state: match of(r) {
                    Some(ReceiptKind::Read) => MessageState::Read,
                    Some(_) => MessageState::Delivered,
                    None => MessageState::Sent,
                },
            })
            .collect()
    } else {
        Vec::new()
    };
    (state, detail)
}

/// Sends not yet answered by the server, and staged commits waiting for theirs.
pub trait Outbox {
    /// Queues a request made already (a leave proposal): posted as it is,
    /// byte for byte, until the server answers.
    ///
    /// # Errors
    /// Database errors.
    fn push_outbox_request(&mut self, send_id: &[u8; 16], request: &[u8]) -> Result<(), ClientError>;

    /// Queues a message for sending: its content (encrypted only when it
    /// is flushed) under a fresh send id.
    ///
    /// # Errors
    /// Database errors.
    fn push_outbox(
        &mut self,
        send_id: &[u8; 16],
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8; 16],
        content: &[u8],
    ) -> Result<(), ClientError>;

    /// Queued sends, oldest first.
    ///
    /// # Errors
    /// Database errors, or a damaged row.
    fn outbox(&self) -> Result<Vec<QueuedSend>, ClientError>;

    /// One queued send, as it is now (another process may have encrypted or
    /// sent it meanwhile).
    ///
    /// # Errors
    /// Database errors, or a damaged row.
    fn outbox_row(&self, id: i64) -> Result<Option<QueuedSend>, ClientError>;

    /// Whether anything is queued.
    ///
    /// # Errors
    /// Database errors.
    fn outbox_is_empty(&self) -> Result<bool, ClientError>;

    /// Keeps the encrypted request of a queued send: from now on it is
    /// posted byte for byte until the server answers.
    ///
    /// # Errors
    /// Database errors.
    fn set_outbox_request(&mut self, id: i64, request: &[u8]) -> Result<(), ClientError>;

    /// Removes a send the server answered (stored or refused).
    ///
    /// # Errors
    /// Database errors.
    fn pop_outbox(&mut self, id: i64) -> Result<(), ClientError>;

    /// Stores a staged commit's request before it is posted (one per
    /// conversation: mls-rs stages one commit at a time).
    ///
    /// # Errors
    /// Database errors.
    fn put_pending_commit(&mut self, p: &PendingCommit) -> Result<(), ClientError>;

    /// The staged commit waiting in a conversation, if any.
    ///
    /// # Errors
    /// Database errors.
    fn pending_commit(
        &self,
        conversation: &subrosa_proto::ConversationId,
    ) -> Result<Option<PendingCommit>, ClientError>;

    /// Conversations with a staged commit waiting, oldest first.
    ///
    /// # Errors
    /// Database errors.
    fn pending_commit_conversations(&self) -> Result<Vec<subrosa_proto::ConversationId>, ClientError>;

    /// Keeps beside the staged commit `send_id` its request with large
    /// Welcomes by reference (replacing an earlier one), its whole request
    /// and its place in line unchanged. False when that commit is no
    /// longer staged.
    ///
    /// # Errors
    /// Database errors.
    fn set_pending_commit_by_reference(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        send_id: &[u8; 16],
        by_reference: &ByReference,
    ) -> Result<bool, ClientError>;

    /// Forgets a conversation's staged commit (applied or discarded).
    ///
    /// # Errors
    /// Database errors.
    fn delete_pending_commit(&mut self, conversation: &subrosa_proto::ConversationId) -> Result<(), ClientError>;
}

/// mls-rs group state and key-package secrets.
pub trait MlsState {
    /// Marks the key package generated last as the last-resort one: kept
    /// after use, since the server may hand it out more than once.
    ///
    /// # Errors
    /// Database errors.
    fn mark_newest_key_package_last_resort(&mut self) -> Result<(), ClientError>;

    /// Erases key-package secrets made before `cutoff_ms` (replaced ones:
    /// the server no longer hands their packages out), last-resort ones
    /// included, and keeps only the newest last-resort package of each suite
    /// marked as such (the newest `SUITES.len()`: they are made together).
    ///
    /// # Errors
    /// Database errors.
    fn erase_key_packages_before(&mut self, cutoff_ms: u64) -> Result<usize, ClientError>;

    /// A group's current state.
    ///
    /// # Errors
    /// Database errors.
    fn group_state(&self, group_id: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError>;

    /// A digest naming the group's stored state (equal digests, equal
    /// bytes), cheaper than reading the state; `None` for no group, or a
    /// state the backend cannot name.
    ///
    /// # Errors
    /// Database errors.
    fn group_state_version(&self, group_id: &[u8]) -> Result<Option<subrosa_core::StateVersion>, ClientError>;

    /// One stored epoch of a group.
    ///
    /// # Errors
    /// Database errors.
    fn group_epoch(&self, group_id: &[u8], epoch: u64) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError>;

    /// The newest epoch stored for a group.
    ///
    /// # Errors
    /// Database errors.
    fn max_group_epoch(&self, group_id: &[u8]) -> Result<Option<u64>, ClientError>;

    /// Writes a group's state and epochs (new or updated). Epochs more than
    /// [`EPOCHS_KEPT`] older than the newest are deleted (forward secrecy
    /// across epochs), and the group id stays known for good (see
    /// [`Conversations::known_conversation`]), whatever becomes of the group.
    ///
    /// # Errors
    /// Database errors.
    fn put_group_state(&mut self, group_id: &[u8], state: &[u8], epochs: &[(u64, &[u8])]) -> Result<(), ClientError>;

    /// A key package's secrets (MLS-encoded `KeyPackageData`).
    ///
    /// # Errors
    /// Database errors.
    fn key_package(&self, id: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError>;

    /// Stores a key package's secrets, made now.
    ///
    /// # Errors
    /// Database errors.
    fn put_key_package(&mut self, id: &[u8], data: &[u8]) -> Result<(), ClientError>;

    /// Deletes a used key package, unless it is the last-resort one.
    ///
    /// # Errors
    /// Database errors.
    fn delete_key_package(&mut self, id: &[u8]) -> Result<(), ClientError>;
}

/// Where one file of an attachment message stands on this device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttachmentState {
    /// Sent by this account: the sender has the file.
    Sent,
    /// Received; its blob is not downloaded and checked yet.
    Pending,
    /// Downloaded and checked; kept sealed in the home directory.
    Stored,
    /// Refused (altered, gone from the server…), with why: nothing kept.
    Refused(String),
}

/// One file of an attachment message, as this device keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentRow {
    /// The conversation.
    pub conversation: subrosa_proto::ConversationId,
    /// The message's end-to-end id.
    pub message_id: Vec<u8>,
    /// Its place in the message, from 0.
    pub index: u32,
    /// The pointer, key and checks the message carried.
    pub file: subrosa_core::attachment::AttachedFile,
    /// Where it stands.
    pub state: AttachmentState,
    /// The sealed blob's file name in the home directory's attachment
    /// folder, once stored.
    pub local: Option<String>,
    /// Where the plaintext was saved, when the user asked for it.
    pub saved: Option<String>,
}

/// The attachments of messages.
pub trait AttachmentStore {
    /// Stores the files of a message, all in `state`; a message whose files
    /// are stored already is left as it is.
    ///
    /// # Errors
    /// Database errors.
    fn put_attachments(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        files: &[subrosa_core::attachment::AttachedFile],
        state: AttachmentState,
    ) -> Result<(), ClientError>;

    /// A message's files, in order.
    ///
    /// # Errors
    /// Database errors.
    fn attachments_of(
        &self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
    ) -> Result<Vec<AttachmentRow>, ClientError>;

    /// Every file of a conversation's messages, in the order they were
    /// stored (each message's in its order): one read for a whole history.
    ///
    /// # Errors
    /// Database errors.
    fn attachments_in(&self, conversation: &subrosa_proto::ConversationId) -> Result<Vec<AttachmentRow>, ClientError>;

    /// Received files not yet downloaded, oldest first.
    ///
    /// # Errors
    /// Database errors.
    fn pending_attachments(&self) -> Result<Vec<AttachmentRow>, ClientError>;

    /// Stored files not yet saved anywhere, oldest first.
    ///
    /// # Errors
    /// Database errors.
    fn unsaved_attachments(&self) -> Result<Vec<AttachmentRow>, ClientError>;

    /// Records where a file stands: its state, and (when given) its sealed
    /// blob's file name and where its plaintext was saved.
    ///
    /// # Errors
    /// Database errors.
    fn set_attachment(
        &mut self,
        conversation: &subrosa_proto::ConversationId,
        message_id: &[u8],
        index: u32,
        state: &AttachmentState,
        local: Option<&str>,
        saved: Option<&str>,
    ) -> Result<(), ClientError>;
}

impl AttachmentState {
    /// The stored form: `sent`, `pending`, `stored`, `refused`.
    pub fn as_str(&self) -> &'static str {
        match self {
            AttachmentState::Sent => "sent",
            AttachmentState::Pending => "pending",
            AttachmentState::Stored => "stored",
            AttachmentState::Refused(_) => "refused",
        }
    }

    /// From its stored form and reason.
    pub fn parse(s: &str, reason: Option<String>) -> Option<Self> {
        Some(match s {
            "sent" => AttachmentState::Sent,
            "pending" => AttachmentState::Pending,
            "stored" => AttachmentState::Stored,
            "refused" => AttachmentState::Refused(reason.unwrap_or_default()),
            _ => return None,
        })
    }

    /// Why it was refused.
    pub fn reason(&self) -> Option<&str> {
        match self {
            AttachmentState::Refused(r) => Some(r),
            _ => None,
        }
    }
}

/// Every repository: what a transaction offers.
pub trait Tx:
    Meta + Contacts + Conversations + History + Annotations + Outbox + Directory + MlsState + AttachmentStore
{
}

impl<
        T: Meta
            + Contacts
            + Conversations
            + History
            + Annotations
            + Outbox
            + Directory
            + MlsState
            + AttachmentStore
            + ?Sized,
    > Tx for T
{
}

/// A storage backend: runs closures in transactions. [`Store`] wraps one
/// with the typed entry points; a backend only has to say how a transaction
/// begins, commits and rolls back.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Runs `f` in a read transaction: one consistent view, nothing written.
    ///
    /// # Errors
    /// Whatever `f` returns, or a database error.
    fn read_dyn(&self, f: &mut dyn FnMut(&dyn Tx) -> Result<(), ClientError>) -> Result<(), ClientError>;

    /// Runs `f` in a write transaction: everything it wrote is stored when it
    /// returns `Ok`, nothing when it returns `Err`.
    ///
    /// # Errors
    /// Whatever `f` returns, or a database error (then nothing is stored).
    fn write_dyn(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<(), ClientError>) -> Result<(), ClientError>;
}

/// The local store: cheap to clone, clones share one backend.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Arc<dyn Backend>,
}

impl Store {
    /// A store over `backend`.
    pub fn new(backend: impl Backend + 'static) -> Self {
        Store { backend: Arc::new(backend) }
    }

    /// A store over a shared backend.
    pub fn from_arc(backend: Arc<dyn Backend>) -> Self {
        Store { backend }
    }

    /// A new, empty store in memory (nothing outlives it), on the system clock.
    #[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
    pub fn memory() -> Self {
        Self::new(MemoryStore::new())
    }

    /// Runs `f` in a read transaction: one consistent view of the store.
    ///
    /// # Errors
    /// Whatever `f` returns, or a database error.
    pub fn read<T>(&self, f: impl FnOnce(&dyn Tx) -> Result<T, ClientError>) -> Result<T, ClientError> {
        let mut f = Some(f);
        let mut out = None;
        self.backend.read_dyn(&mut |tx| {
            let f = f.take().ok_or_else(|| ClientError::Bug("a read closure ran twice".into()))?;
            out = Some(f(tx)?);
            Ok(())
        })?;
        out.ok_or_else(|| ClientError::Bug("a read closure never ran".into()))
    }

    /// Runs `f` in one write transaction: all of it is stored, or none.
    ///
    /// # Errors
    /// Whatever `f` returns, or a database error.
    pub fn write<T>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<T, ClientError>) -> Result<T, ClientError> {
        let mut f = Some(f);
        let mut out = None;
        self.backend.write_dyn(&mut |tx| {
            let f = f.take().ok_or_else(|| ClientError::Bug("a write closure ran twice".into()))?;
            out = Some(f(tx)?);
            Ok(())
        })?;
        out.ok_or_else(|| ClientError::Bug("a write closure never ran".into()))
    }

    /// The mls-rs group state storage over this store.
    pub fn groups(&self) -> GroupStore {
        GroupStore { store: self.clone(), last: subrosa_core::LastVersions::default() }
    }

    /// The mls-rs key package storage over this store.
    pub fn key_packages(&self) -> KeyPackageStore {
        KeyPackageStore { store: self.clone() }
    }
}

/// The lock a transaction holds for its whole duration, re-entrant for the
/// thread that holds it (see the module header).
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<GateState>,
    free: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    owner: Option<ThreadId>,
    depth: usize,
    write: bool,
}

/// A held gate; dropping it leaves (and frees the gate when outermost).
#[derive(Debug)]
pub struct Entered<'a> {
    gate: &'a Gate,
    outer: bool,
}

impl Entered<'_> {
    /// True for the transaction that took the gate (it begins and ends the
    /// backend's transaction); false when this thread's own open
    /// transaction was joined.
    pub fn outer(&self) -> bool {
        self.outer
    }
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the gate, or joins this thread's open transaction.
    ///
    /// # Errors
    /// [`ClientError::Bug`] for a write inside a read transaction.
    pub fn enter(&self, write: bool) -> Result<Entered<'_>, ClientError> {
        let me = std::thread::current().id();
        let mut s = self.lock();
        if s.owner == Some(me) {
            if write && !s.write {
                return Err(ClientError::Bug("a store write inside a read transaction".into()));
            }
            s.depth += 1;
            return Ok(Entered { gate: self, outer: false });
        }
        while s.owner.is_some() {
            s = self.free.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        *s = GateState { owner: Some(me), depth: 1, write };
        Ok(Entered { gate: self, outer: true })
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.depth = s.depth.saturating_sub(1);
        if s.depth == 0 {
            *s = GateState::default();
            self.gate.free.notify_one();
        }
    }
}

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

/// mls-rs group state storage over a [`Store`]: reads and writes join the
/// transaction this thread has open (the one whose engine call made them),
/// or run in one of their own.
///
/// It also names the versions of the states it reads and writes, for the
/// engine's loaded groups ([`subrosa_core::GroupVersions`]): clones share
/// them.
#[derive(Clone, Debug)]
pub struct GroupStore {
    store: Store,
    /// Per thread and group, the version of the state last read or written
    /// (in the transaction that read or wrote it).
    last: subrosa_core::LastVersions,
}

impl subrosa_core::GroupVersions for GroupStore {
    fn stored_version(&self, group_id: &[u8]) -> Option<subrosa_core::StateVersion> {
        self.store.read(|tx| tx.group_state_version(group_id)).ok().flatten()
    }

    fn take_last(&self, group_id: &[u8]) -> Option<subrosa_core::StateVersion> {
        self.last.take(group_id)
    }
}

impl GroupStateStorage for GroupStore {
    type Error = StorageError;

    fn state(&self, group_id: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, Self::Error> {
        let (state, version) =
            self.store.read(|tx| Ok((tx.group_state(group_id)?, tx.group_state_version(group_id)?))).map_err(serr)?;
        self.last.note(group_id, version);
        Ok(state)
    }

    fn epoch(&self, group_id: &[u8], epoch_id: u64) -> Result<Option<Zeroizing<Vec<u8>>>, Self::Error> {
        self.store.read(|tx| tx.group_epoch(group_id, epoch_id)).map_err(serr)
    }

    fn write(
        &mut self,
        state: GroupState,
        inserts: Vec<EpochRecord>,
        updates: Vec<EpochRecord>,
    ) -> Result<(), Self::Error> {
        let epochs: Vec<(u64, &[u8])> =
            inserts.iter().chain(updates.iter()).map(|e| (e.id, e.data.as_slice())).collect();
        let version = self
            .store
            .write(|tx| {
                tx.put_group_state(&state.id, &state.data, &epochs)?;
                tx.group_state_version(&state.id)
            })
            .map_err(serr)?;
        self.last.note(&state.id, version);
        Ok(())
    }

    fn max_epoch_id(&self, group_id: &[u8]) -> Result<Option<u64>, Self::Error> {
        self.store.read(|tx| tx.max_group_epoch(group_id)).map_err(serr)
    }
}

/// mls-rs key package storage over a [`Store`]. One-time packages are
/// deleted when used; the last-resort package is kept.
#[derive(Clone, Debug)]
pub struct KeyPackageStore {
    store: Store,
}

impl KeyPackageStorage for KeyPackageStore {
    type Error = StorageError;

    fn delete(&mut self, id: &[u8]) -> Result<(), Self::Error> {
        self.store.write(|tx| tx.delete_key_package(id)).map_err(serr)
    }

    fn insert(&mut self, id: Vec<u8>, pkg: KeyPackageData) -> Result<(), Self::Error> {
        let data = Zeroizing::new(pkg.mls_encode_to_vec().map_err(serr)?);
        self.store.write(|tx| tx.put_key_package(&id, &data)).map_err(serr)
    }

    fn get(&self, id: &[u8]) -> Result<Option<KeyPackageData>, Self::Error> {
        match self.store.read(|tx| tx.key_package(id)).map_err(serr)? {
            None => Ok(None),
            Some(d) => KeyPackageData::mls_decode(&mut d.as_slice()).map(Some).map_err(serr),
        }
    }
}

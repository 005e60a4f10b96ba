//! [`Client`]: one device, shared by every front end.
//!
//! A `Client` is cheap to clone and `Send + Sync`: a terminal UI, a daemon
//! answering several sockets, a bot or a benchmark hold clones of one and
//! call it from any task. [`Client::events`] hands each subscriber its own
//! stream of typed [`ClientEvent`]s; [`Client::run`] (or
//! [`Client::spawn`]) keeps the device connected, reconnecting by itself,
//! and publishes everything that arrives, every alert and every change of
//! connection. Commands address conversations by id
//! ([`ConversationId`]); resolving what a user typed (`@handle`, a group
//! name, `#id`) is the command line's business ([`Subrosa::resolve`]).

use std::sync::Arc;
use std::time::Duration;

use subrosa_proto::{ConversationId, Handle, MessageId};
use tokio::sync::broadcast;

use subrosa_core::MemberInfo;

use crate::store::{ConversationRow, StoredMessage};
use crate::{ClientError, FailedSend, Received, Subrosa};

/// How many events a subscriber may fall behind before it misses some
/// (it is then told how many, [`broadcast::error::RecvError::Lagged`]; the
/// messages themselves stay in history).
const EVENT_BUFFER: usize = 4096;

/// Something that happened on this device, for every front end.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ClientEvent {
    /// A message arrived and is stored in history.
    Message(StoredMessage),
    /// A system line was stored in a conversation's history: membership,
    /// devices, key changes, a gap, a late message, a warning.
    System(StoredMessage),
    /// A message that could not be decrypted or authenticated was dropped.
    Dropped {
        /// The claimed sender (as the server said).
        from: String,
        /// Why.
        reason: String,
    },
    /// A security alert (a key-directory fork, a ghost device, a refused
    /// takeover).
    Alert(String),
    /// A queued message the server refused: it will not be sent.
    SendFailed(FailedSend),
    /// One of this account's messages changed state: it was queued and the
    /// server has it now (the message, in its new state).
    MessageState(StoredMessage),
    /// Connected to the server (again): what was queued meanwhile was
    /// fetched and sent.
    Connected,
    /// The connection was lost; the next try is in `retry_in`.
    Disconnected {
        /// Why.
        reason: String,
        /// When the next attempt is.
        retry_in: Duration,
    },
}

impl From<&Received> for ClientEvent {
    fn from(r: &Received) -> Self {
        match r {
            Received::Message(m) if m.system => ClientEvent::System(m.clone()),
            Received::Message(m) => ClientEvent::Message(m.clone()),
            Received::Dropped { from, reason } => ClientEvent::Dropped { from: from.clone(), reason: reason.clone() },
            Received::Alert(a) => ClientEvent::Alert(a.clone()),
            Received::Failed(f) => ClientEvent::SendFailed(f.clone()),
            Received::Sent(m) => ClientEvent::MessageState(m.clone()),
        }
    }
}

struct Inner {
    device: Subrosa,
    events: broadcast::Sender<ClientEvent>,
}

/// One device, shared: see the module documentation.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("device", &self.inner.device).finish_non_exhaustive()
    }
}

impl Client {
    /// The shared handle of an opened device.
    pub fn new(device: Subrosa) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Client { inner: Arc::new(Inner { device, events }) }
    }

    /// The device, for every command not yet on the handle.
    pub fn device(&self) -> &Subrosa {
        &self.inner.device
    }

    /// A new subscription: every event published from now on, in order.
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.inner.events.subscribe()
    }

    fn publish(&self, e: ClientEvent) {
        // No subscriber is not an error: everything stays in history.
        let _ = self.inner.events.send(e);
    }

    /// Keeps the device connected and publishes what happens, until an
    /// error retrying cannot fix (refused credentials, a removed device,
    /// the local store).
    ///
    /// # Errors
    /// What retrying cannot fix (refused credentials, a removed device, a
    /// local store error); network loss is retried with backoff.
    pub async fn run(&self) -> Result<(), ClientError> {
        let mut publish_received = |r: &Received| self.publish(r.into());
        let mut on_retry = |e: &ClientError, wait: Duration| {
            self.publish(ClientEvent::Disconnected { reason: e.to_string(), retry_in: wait })
        };
        let mut on_connected = || self.publish(ClientEvent::Connected);
        self.inner.device.follow_reconnecting_with(&mut publish_received, &mut on_retry, &mut on_connected).await
    }

    /// [`Self::run`] on a task of the current tokio runtime.
    pub fn spawn(&self) -> tokio::task::JoinHandle<Result<(), ClientError>> {
        let me = self.clone();
        tokio::spawn(async move { me.run().await })
    }

    /// Sends `text` to the conversation `id`; returns the stored message,
    /// in state `sent`, or `queued` when the server cannot be reached (it
    /// goes out with the next connection, and a
    /// [`ClientEvent::MessageState`] says so).
    ///
    /// # Errors
    /// [`ClientError::UnknownTarget`] for a conversation this device does
    /// not have (or no longer takes part in); as [`Subrosa::send_text`]
    /// except [`ClientError::Pending`].
    pub async fn send_text(&self, id: &ConversationId, text: &str) -> Result<StoredMessage, ClientError> {
        let device = &self.inner.device;
        match device.store().read(|tx| tx.conversation(id))? {
            Some(row) if row.active && row.kind != "own" => {}
            _ => return Err(ClientError::UnknownTarget(format!("#{}", id.to_hex()))),
        }
        self.send_text_to(&crate::Target::Conversation(*id), text).await
    }

    /// As [`Self::send_text`], to a conversation or to a handle (a first
    /// message to them starts the conversation, which needs the server):
    /// a message stored and queued comes back in state `queued`, never as
    /// [`ClientError::Pending`], so a caller does not send it twice.
    ///
    /// # Errors
    /// As [`Subrosa::send_text`] except [`ClientError::Pending`] for a
    /// message that was stored.
    pub async fn send_text_to(&self, to: &crate::Target, text: &str) -> Result<StoredMessage, ClientError> {
        crate::check_text(text)?;
        let body = subrosa_core::content::Body::Text(text.to_string());
        self.send_body(to, body, Some(text.to_string()))
            .await?
            .ok_or_else(|| ClientError::Bug("a text stored no history line".into()))
    }

    /// Sends `text` with the preview of its first link (made by this
    /// device, [`crate::preview::make`]): as [`Self::send_text_to`], a
    /// message stored and queued comes back in state `queued`.
    ///
    /// # Errors
    /// As [`Subrosa::send_with_preview`] except [`ClientError::Pending`].
    pub async fn send_with_preview(
        &self,
        to: &crate::Target,
        text: &str,
        preview: subrosa_core::preview::LinkPreview,
    ) -> Result<StoredMessage, ClientError> {
        crate::check_text(text)?;
        preview.check(text).map_err(|e| ClientError::Input(format!("preview: {e}")))?;
        let body = subrosa_core::content::Body::Preview { text: text.to_string(), preview };
        self.send_body(to, body, Some(text.to_string()))
            .await?
            .ok_or_else(|| ClientError::Bug("a text stored no history line".into()))
    }

    /// Sends `text` to the conversation `id` in answer to its message
    /// `reply_to`: as [`Self::send_text`], a reply stored and queued comes
    /// back in state `queued`, never as [`ClientError::Pending`].
    ///
    /// # Errors
    /// As [`Subrosa::reply`] except [`ClientError::Pending`] for a reply
    /// that was stored.
    pub async fn reply(
        &self,
        id: &ConversationId,
        text: &str,
        reply_to: MessageId,
    ) -> Result<StoredMessage, ClientError> {
        crate::check_text(text)?;
        let body = subrosa_core::content::Body::Reply { text: text.to_string(), reply_to };
        // The message answered must be one this conversation has.
        self.inner.device.check_action(id, &body)?;
        self.send_body(&crate::Target::Conversation(*id), body, Some(text.to_string()))
            .await?
            .ok_or_else(|| ClientError::Bug("a reply stored no history line".into()))
    }

    /// Sends a message of any kind (see [`Subrosa::send_body`]) to a
    /// conversation or a handle. With a history line (`shown`), a message
    /// stored and queued comes back in state `queued`, as with
    /// [`Self::send_text_to`]; without one, `Ok(None)` once the server took
    /// it.
    ///
    /// # Errors
    /// As [`Subrosa::send_body`]; [`ClientError::Pending`] only for a body
    /// without a history line that stays queued (it goes out with the next
    /// connection, exactly once).
    pub async fn send_body(
        &self,
        to: &crate::Target,
        body: subrosa_core::content::Body,
        shown: Option<String>,
    ) -> Result<Option<StoredMessage>, ClientError> {
        let device = &self.inner.device;
        let message_id = MessageId(rand::random());
        let with_line = shown.is_some();
        match device.send_body_as(to, body, shown, false, message_id).await {
            Err(ClientError::Pending(why)) if with_line => {
                let conversation = match to {
                    crate::Target::Conversation(id) => Some(*id),
                    crate::Target::Direct(peer) => device.direct_conversation(peer)?,
                };
                let stored = match conversation {
                    Some(id) => device.store().read(|tx| tx.message(&id, &message_id.0))?,
                    None => None,
                };
                stored.map(Some).ok_or(ClientError::Pending(why))
            }
            other => other,
        }
    }

    /// Every conversation this device takes part in (1:1 and groups, not
    /// the hidden one of the account's own devices), and those it left.
    ///
    /// # Errors
    /// Store errors.
    pub fn conversations(&self) -> Result<Vec<ConversationRow>, ClientError> {
        let store = self.inner.device.store();
        let mut rows = store.read(|tx| {
            let mut rows = tx.active_conversations()?;
            for g in tx.group_rows()? {
                if !rows.iter().any(|r| r.id == g.id) {
                    rows.push(g);
                }
            }
            Ok(rows)
        })?;
        rows.retain(|r| r.kind != "own");
        Ok(rows)
    }

    /// The conversation `id`, or [`ClientError::UnknownTarget`].
    fn row(&self, id: &ConversationId) -> Result<ConversationRow, ClientError> {
        match self.inner.device.store().read(|tx| tx.conversation(id))? {
            Some(row) if row.kind != "own" => Ok(row),
            _ => Err(ClientError::UnknownTarget(format!("#{}", id.to_hex()))),
        }
    }

    /// The member devices of the conversation `id`.
    ///
    /// # Errors
    /// [`ClientError::UnknownTarget`]; engine errors.
    pub fn members(&self, id: &ConversationId) -> Result<Vec<MemberInfo>, ClientError> {
        self.row(id)?;
        Ok(self.inner.device.engine().members(id)?)
    }

    /// Creates a group `name` with the accounts `handles`; returns its id.
    ///
    /// # Errors
    /// As [`Subrosa::create_group`].
    pub async fn create_group(&self, name: &str, handles: &[String]) -> Result<ConversationId, ClientError> {
        let g = self.inner.device.create_group(name, handles).await?;
        g.id.parse().map_err(|_| ClientError::Bug("a group id that is not hex".into()))
    }

    /// Adds the account `handle` to the group `id`. A former member makes
    /// the group continue as a new conversation: its id is returned then.
    ///
    /// # Errors
    /// [`ClientError::UnknownTarget`]; as [`Subrosa::group_add`].
    pub async fn group_add(&self, id: &ConversationId, handle: &str) -> Result<Option<ConversationId>, ClientError> {
        self.row(id)?;
        match self.inner.device.group_add(id, handle).await? {
            Some(g) => Ok(Some(g.id.parse().map_err(|_| ClientError::Bug("a group id that is not hex".into()))?)),
            None => Ok(None),
        }
    }

    /// Removes every device of `handle` from the group `id`.
    ///
    /// # Errors
    /// [`ClientError::UnknownTarget`]; as [`Subrosa::group_remove`].
    pub async fn group_remove(&self, id: &ConversationId, handle: &str) -> Result<(), ClientError> {
        self.row(id)?;
        self.inner.device.group_remove(id, handle).await
    }

    /// Renames the group `id`.
    ///
    /// # Errors
    /// [`ClientError::UnknownTarget`]; as [`Subrosa::group_rename`].
    pub async fn group_rename(&self, id: &ConversationId, name: &str) -> Result<(), ClientError> {
        self.row(id)?;
        self.inner.device.group_rename(id, name).await
    }

    /// Sets the disappearing-messages timer.
    ///
    /// # Errors
    /// [`ClientError::UnknownTarget`]; as [`Subrosa::set_disappearing`].
    pub async fn set_disappearing(&self, id: &ConversationId, seconds: Option<u32>) -> Result<bool, ClientError> {
        self.row(id)?;
        self.inner.device.set_disappearing(id, seconds).await
    }

    /// Leaves the group `id`.
    ///
    /// # Errors
    /// [`ClientError::UnknownTarget`]; as [`Subrosa::group_leave`].
    pub async fn group_leave(&self, id: &ConversationId) -> Result<(), ClientError> {
        self.row(id)?;
        self.inner.device.group_leave(id).await
    }

    /// The history of the conversation `id`, oldest first.
    ///
    /// # Errors
    /// [`ClientError::UnknownTarget`] for a conversation this device does not have.
    pub fn history(&self, id: &ConversationId) -> Result<Vec<StoredMessage>, ClientError> {
        let store = self.inner.device.store();
        let mut history = store.read(|tx| match tx.conversation(id)? {
            Some(row) if row.kind != "own" => tx.history(&[row]),
            _ => Err(ClientError::UnknownTarget(format!("#{}", id.to_hex()))),
        })?;
        self.inner.device.mark_shown(&mut history)?;
        Ok(history)
    }

    // ---- Added for the terminal UI (issue 12): a direct conversation by
    // handle, safety numbers and verification. Thin delegations to
    // `Subrosa`; nothing else in the TUI reaches past the handle. ----

    /// The direct conversation with `handle` (`@` optional): the one this
    /// device has, else one a Welcome waiting on the server brings, else a
    /// new one (which needs the server, for their keys).
    ///
    /// # Errors
    /// [`ClientError::Input`] for a malformed handle or this account's own;
    /// a blocked key directory; as [`Subrosa::sync`]; an unknown handle.
    pub async fn open_direct(&self, handle: &str) -> Result<ConversationId, ClientError> {
        let peer = Handle::new(handle.trim_start_matches('@')).map_err(|e| ClientError::Input(e.to_string()))?;
        let device = &self.inner.device;
        let existing = || device.direct_conversation(&peer);
        if let Some(id) = existing()? {
            return Ok(id);
        }
        device.sync().await?;
        if let Some(id) = existing()? {
            return Ok(id);
        }
        device.kt_blocked()?;
        device.start_direct(&peer, None).await
    }

    /// The safety number with `handle`: as [`Subrosa::safety_number`].
    ///
    /// # Errors
    /// As [`Subrosa::safety_number`].
    pub async fn safety_number(&self, handle: &str) -> Result<String, ClientError> {
        self.inner.device.safety_number(handle).await
    }

    /// Marks `handle` verified if `compared` (the number the user compared)
    /// is still their safety number: as [`Subrosa::verify_safety_number`],
    /// one transaction.
    ///
    /// # Errors
    /// As [`Subrosa::verify_safety_number`].
    pub async fn verify_safety_number(&self, handle: &str, compared: &str) -> Result<(), ClientError> {
        self.inner.device.verify_safety_number(handle, compared).await
    }

    /// Whether `handle` is a verified contact: as [`Subrosa::is_verified`].
    ///
    /// # Errors
    /// Store errors.
    pub fn is_verified(&self, handle: &str) -> Result<bool, ClientError> {
        self.inner.device.is_verified(handle)
    }
    // ---- End of the terminal UI's additions. ----

    /// Calls the conversation `id` (see [`crate::calls`]): as
    /// [`Subrosa::place_call`].
    ///
    /// # Errors
    /// [`ClientError::UnknownTarget`]; as [`Subrosa::place_call`].
    pub async fn place_call(
        &self,
        id: &ConversationId,
        options: &crate::calls::CallOptions,
        on: &mut (dyn FnMut(crate::calls::CallProgress) + Send),
    ) -> Result<crate::calls::CallReport, ClientError> {
        self.row(id)?;
        self.inner.device.place_call(id, options, on).await
    }

    /// Waits for a call and answers it: as [`Subrosa::answer_call`].
    ///
    /// # Errors
    /// As [`Subrosa::answer_call`].
    pub async fn answer_call(
        &self,
        options: &crate::calls::CallOptions,
        on: &mut (dyn FnMut(crate::calls::CallProgress) + Send),
    ) -> Result<crate::calls::CallReport, ClientError> {
        self.inner.device.answer_call(options, on).await
    }
}

// A front end moves clones across tasks and threads.
const _: fn() = || {
    fn shared<T: Send + Sync + Clone + 'static>() {}
    shared::<Client>();
};

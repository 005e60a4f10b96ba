//! The outbox rules: what a send stores, when it is encrypted, and what
//! becomes of it when the server takes or refuses it. The caller posts the
//! requests (`subrosa-client` over HTTPS) and reports the answer.
//!
//! A message is stored in history (state `queued`) and in the outbox in one
//! transaction, and encrypted only when it is about to be posted, at the
//! conversation's epoch then (after the inbox was processed), so it never
//! goes out under keys a removal or an update already retired. The request
//! made is stored before it leaves (with the advanced ratchet, in the same
//! transaction): a post whose answer was lost goes again byte for byte.

use subrosa_core::content::{Body, Content};
use subrosa_core::CoreError;
use subrosa_proto::{ConversationId, MessageId, MessageKind, SendId, SendPart, SendRequest, B64};

use crate::store::{MessageState, QueuedSend, StoredMessage};
use crate::{ClientError, Session};

/// A queued send's request body, and the sequence number it took when it
/// was encrypted just now (`None` for a request made earlier).
pub type Prepared = (Vec<u8>, Option<u64>);

/// Where a new message goes.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// The conversation.
    pub conversation: ConversationId,
    /// The conversation as the user names it (stored with the message).
    pub target: &'a str,
    /// True in a group.
    pub group: bool,
}

impl Session {
    /// Stores `text` in history (queued) and in the outbox, in one
    /// transaction, under `message_id` and the idempotency key `send_id`.
    ///
    /// # Errors
    /// Store errors; [`ClientError::Core`] for a text too long to encode.
    pub fn queue_text(
        &self,
        to: &Outgoing<'_>,
        text: &str,
        message_id: MessageId,
        send_id: [u8; 16],
    ) -> Result<StoredMessage, ClientError> {
        self.queue_body(to, &Body::Text(text.to_string()), message_id, send_id, Some(text))?
            .ok_or_else(|| ClientError::Bug("a text stored no history line".into()))
    }

    /// Stores a message of any kind in the outbox under `message_id` and
    /// the idempotency key `send_id`, and, when `shown` is given, a history
    /// line saying it (state `queued`), in one transaction. Kinds that are
    /// not lines of their own (a reaction, a receipt, a call signal) pass
    /// `None`: they are kept where their kind keeps them.
    ///
    /// # Errors
    /// Store errors; [`ClientError::Core`] for a body that cannot be
    /// encoded (too large).
    pub fn queue_body(
        &self,
        to: &Outgoing<'_>,
        body: &Body,
        message_id: MessageId,
        send_id: [u8; 16],
        shown: Option<&str>,
    ) -> Result<Option<StoredMessage>, ClientError> {
        let sent_at = self.now_ms();
        let me = self.identity().address();
        let expires_at = self.expiry_from(&to.conversation, sent_at)?;
        let stored = shown.map(|text| StoredMessage {
            id: message_id.to_hex(),
            conversation: to.conversation.to_hex(),
            target: to.target.to_string(),
            group: to.group,
            from: me.handle.to_string(),
            device: me.device.to_hex(),
            sent_at,
            received_at: sent_at,
            text: text.to_string(),
            outgoing: true,
            system: false,
            state: Some(MessageState::Queued),
            reason: None,
            event: None,
            reply_to: match body {
                Body::Reply { reply_to, .. } => Some(reply_to.to_hex()),
                _ => None,
            },
            preview: match body {
                Body::Preview { preview, .. } => Some(preview.clone().into()),
                _ => None,
            },
            expires_at,
            ..StoredMessage::default()
        });
        let content = Content::new(message_id, sent_at, body.clone()).encode()?;
        self.store().write(|tx| {
            if let Some(stored) = &stored {
                tx.insert_message(stored, &to.conversation, &message_id.0, true)?;
                // Writing in a conversation accepts it (a request) and
                // makes its peer a contact.
                self.accept_in(tx, &to.conversation)?;
            }
            tx.note_sent(&to.conversation)?;
            tx.push_outbox(&send_id, &to.conversation, &message_id.0, &content)
        })?;
        Ok(stored)
    }

    /// When a message sent at `sent_at` in `conversation` disappears: `None`
    /// while its timer is off (and for a conversation this device does not
    /// hold yet).
    ///
    /// # Errors
    /// Engine and storage errors.
    pub fn expiry_from(&self, conversation: &ConversationId, sent_at: u64) -> Result<Option<u64>, ClientError> {
        let seconds = match self.engine().disappearing(conversation) {
            Ok(s) => s,
            Err(CoreError::UnknownConversation) => None,
            Err(e) => return Err(e.into()),
        };
        Ok(seconds.map(|s| sent_at.saturating_add(u64::from(s).saturating_mul(1000))))
    }

    /// The request of the queued send `id`: the one made before, or a new
    /// one, encrypted now at the conversation's current epoch with the next
    /// sequence number and `kt_head` (the newest signed directory head this
    /// device holds). One transaction, re-reading the row, so two processes
    /// flushing at once make one request. `None` when the row is gone (sent
    /// by another process).
    ///
    /// # Errors
    /// [`CoreError::UnknownConversation`] when this device is no longer in
    /// the conversation; [`ClientError::Core`] when it cannot be encrypted
    /// (`CommitRequired`: proposals wait for a commit); store errors.
    pub fn prepare_queued(&self, id: i64, kt_head: Option<Vec<u8>>) -> Result<Option<Prepared>, ClientError> {
        self.store().write(|tx| self.prepare_in(tx, id, kt_head))
    }

    /// Encrypts every queued send not encrypted yet, oldest first, in one
    /// transaction whose groups stay loaded across the messages and are
    /// written once, at its end, with every request made (a flush of `n`
    /// messages to a large group writes its state once, not `n` times).
    /// Nothing made here has left the device before this returns: the
    /// requests and the ratchets that made them are durable together, so a
    /// crash can never make a key serve twice. A conversation with its own
    /// commit pending is left for later, as [`Self::prepare_queued`] does.
    /// Returns the outbox id and sequence number of each one made (none
    /// when any one of them could not be: then nothing of the batch is
    /// kept, and each is made one by one by [`Self::prepare_queued`],
    /// which says why it cannot be).
    ///
    /// # Errors
    /// Store errors.
    pub fn prepare_all_queued(&self, kt_head: Option<Vec<u8>>) -> Result<Vec<(i64, Option<u64>)>, ClientError> {
        let made = self.store().write(|tx| {
            let rows = tx.outbox()?;
            let mut made = Vec::new();
            if rows.iter().filter(|q| q.request.is_none()).count() < 2 {
                return Ok(made);
            }
            // Begun inside the transaction: the store's gate makes this
            // thread the only one in a batch until it ends.
            self.engine().begin_batch();
            for q in rows {
                let Some((c, _)) = q.message else { continue };
                if q.request.is_some() || tx.pending_commit(&c)?.is_some() {
                    continue;
                }
                if let Some((_, seq)) = self.prepare_in(tx, q.id, kt_head.clone())? {
                    made.push((q.id, seq));
                }
            }
            self.engine().end_batch()?;
            Ok(made)
        });
        self.engine().abort_batch();
        match made {
            Err(ClientError::Core(_)) => Ok(Vec::new()),
            made => made,
        }
    }

    fn prepare_in(
        &self,
        tx: &mut dyn crate::store::Tx,
        id: i64,
        kt_head: Option<Vec<u8>>,
    ) -> Result<Option<Prepared>, ClientError> {
        {
            let Some(q) = tx.outbox_row(id)? else { return Ok(None) };
            if let Some(request) = q.request {
                return Ok(Some((request, None)));
            }
            let (Some((conversation, _)), Some(content)) = (q.message, q.content) else {
                return Err(ClientError::Store("an outbox row with neither request nor content".into()));
            };
            // Its history line stays where it was written (`conversation`);
            // the message goes where the conversation is now (`to`): the
            // one it moved to, if it moved (see `moves`).
            let to = match crate::moves::moved_to(&*tx, &conversation)? {
                Some(to) => to,
                None => conversation,
            };
            if !tx.conversation(&to)?.is_some_and(|r| r.active) {
                return Err(CoreError::UnknownConversation.into());
            }
            // Moving and not yet joined to where: it waits.
            if crate::moves::moving(&*tx, &to)?.is_some() {
                return Err(CoreError::Moving.into());
            }
            let content = Content::decode(&content)?;
            // A receipt goes to its author's devices only, unnumbered (see
            // `annotations`); everything else to every member, numbered.
            let receipt_to = match &content.body {
                Body::Receipt { ids, .. } => {
                    let first = ids.first().ok_or(ClientError::Bug("a receipt without ids".into()))?;
                    Some(tx.message(&conversation, &first.0)?.map(|m| m.from))
                }
                _ => None,
            };
            if let Some(author) = &receipt_to {
                // Queued before a fork was proven (in the same sync): dropped
                // with the block on sending (see `annotations`).
                if tx.open_fork()?.is_some() {
                    tx.pop_outbox(id)?;
                    return Ok(None);
                }
                let members = self.engine().members(&to)?;
                if !author.as_ref().is_some_and(|a| members.iter().any(|m| m.address.handle.as_str() == a)) {
                    // The author left (or the message is gone): nobody to tell.
                    tx.pop_outbox(id)?;
                    return Ok(None);
                }
            }
            let seq = if receipt_to.is_some() { 0 } else { tx.next_seq(&to)? };
            let content = content.with_context(seq, kt_head);
            let (ciphertext, mut recipients) = self.engine().encrypt(&to, &content)?;
            match receipt_to {
                Some(author) => recipients.retain(|a| Some(a.handle.as_str()) == author.as_deref()),
                None => {
                    let me = self.handle();
                    let mut others: Vec<String> =
                        recipients.iter().filter(|a| a.handle != *me).map(|a| a.handle.to_string()).collect();
                    others.sort();
                    others.dedup();
                    tx.set_recipients(&conversation, &content.message_id.0, &others)?;
                }
            }
            // The server deletes it at its expiry, delivered or not: the
            // expiry of its history line, or (a reaction, a receipt) the
            // timer from now.
            let expires_at = match tx.message(&conversation, &content.message_id.0)?.and_then(|m| m.expires_at) {
                Some(at) => Some(at),
                None => self.expiry_from(&to, self.now_ms())?,
            };
            let req = SendRequest {
                conversation: to,
                send_id: SendId(q.send_id),
                commit: None,
                parts: vec![SendPart { kind: MessageKind::Application, recipients, ciphertext: B64(ciphertext) }],
                expires_at,
            };
            let bytes = serde_json::to_vec(&req).map_err(|e| ClientError::Bug(e.to_string()))?;
            tx.set_outbox_request(id, &bytes)?;
            Ok(Some((bytes, (seq != 0).then_some(seq))))
        }
    }

    /// The server took the queued send: out of the queue, its message sent.
    ///
    /// # Errors
    /// Store errors.
    pub fn queued_sent(&self, q: &QueuedSend) -> Result<(), ClientError> {
        self.store().write(|tx| {
            tx.pop_outbox(q.id)?;
            match q.message {
                Some((c, m)) => tx.set_message_state(&c, &m, MessageState::Sent, None),
                None => Ok(()),
            }
        })
    }

    /// The server refused the queued send (or it can no longer be
    /// encrypted): out of the queue, its message failed with `reason`. The
    /// sequence number it took (`seq`), when still the last, is given back:
    /// recipients are not told of a gap for a message nobody got.
    ///
    /// # Errors
    /// Store errors.
    pub fn queued_refused(&self, q: &QueuedSend, seq: Option<u64>, reason: &str) -> Result<(), ClientError> {
        self.store().write(|tx| {
            tx.pop_outbox(q.id)?;
            match q.message {
                Some((c, m)) => {
                    if let Some(seq) = seq {
                        tx.release_seq(&c, seq)?;
                    }
                    tx.set_message_state(&c, &m, MessageState::Failed, Some(reason))
                }
                None => Ok(()),
            }
        })
    }
}

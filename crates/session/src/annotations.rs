//! Replies, reactions, edits, deletes for everyone and receipts: the rules.
//!
//! - A reaction is one per member per emoji; taking it back removes it. A
//!   reaction to a deleted message or a system line is ignored.
//! - Only a message's author (the account that sent it, from any of its
//!   devices) may edit or delete it. Anyone else's edit or delete is never
//!   applied: it becomes a typed system line in the conversation
//!   ([`SystemEvent::EditRefused`], [`SystemEvent::DeleteRefused`]). Edits
//!   may arrive out of order: the one sent last wins. A delete drops the
//!   text (and the reactions) from the store; the row stays, marked deleted,
//!   and nothing edits it back.
//! - An edit, delete or reaction that comes before the message it concerns
//!   is kept ([`Annotations::push_early_action`]) and applied, under the
//!   same rules, when that message arrives.
//! - Receipts: a device owes a delivery receipt for each message of another
//!   account it stored, and (when the user allows read receipts) a read
//!   receipt once the user read it. They are queued once per batch, one
//!   per conversation, author and kind, and go to the devices of the author
//!   only, unnumbered: no other member can miss one, so none ever shows as
//!   a gap, and no member learns when another read someone else's message.
//!   The server sees one more small padded message, and its timing.

use subrosa_core::content::{Body, Content, ReceiptKind, MAX_RECEIPT_IDS};
use subrosa_proto::{ConversationId, DeviceAddress, Handle, MessageId};

use crate::rotation::RECEIPTS_STOP_AFTER_MESSAGES;
use crate::store::{ConversationRow, EarlyAction, StoredMessage, Tx};
use crate::{ClientError, Outgoing, Session, SystemEvent};

/// Meta key of the read-receipt setting ("off" turns them off; on by default).
pub const META_READ_RECEIPTS: &str = "setting:read_receipts";

/// Most reactions, edits and deletes one member may have waiting in a
/// conversation for messages that have not arrived; past it the newest
/// are dropped (a real client's actions follow their messages closely).
pub(crate) const MAX_EARLY_ACTIONS_PER_MEMBER: usize = 256;

impl Session {
    /// Applies a reaction, edit, delete or receipt from `sender` (inside
    /// the caller's transaction). Returns false for any other body.
    pub(crate) fn apply_action(
        &self,
        tx: &mut dyn Tx,
        row: &ConversationRow,
        sender: &DeviceAddress,
        content: &Content,
    ) -> Result<bool, ClientError> {
        let target = match &content.body {
            Body::Reaction { target, .. } | Body::Edit { target, .. } | Body::Delete { target } => *target,
            Body::Receipt { kind, ids } => {
                self.apply_receipt(tx, &row.id, sender, *kind, ids)?;
                return Ok(true);
            }
            _ => return Ok(false),
        };
        let Some(m) = tx.message(&row.id, &target.0)? else {
            // Kept until the message it concerns arrives (if ever), up to a
            // bound per member: one member's actions for ids that never
            // come must not fill another's store.
            if tx.early_actions_from(&row.id, sender.handle.as_str())? >= MAX_EARLY_ACTIONS_PER_MEMBER {
                return Ok(true);
            }
            let encoded = content.encode()?;
            let early =
                EarlyAction { from: sender.handle.to_string(), device: sender.device.to_hex(), content: encoded };
            tx.push_early_action(&row.id, &target.0, &early)?;
            return Ok(true);
        };
        let by = sender.handle.as_str();
        match &content.body {
            // Nothing to react to on a system line or a deleted message.
            Body::Reaction { emoji, remove, .. } if !m.system && !m.deleted => {
                tx.set_reaction(&row.id, &target.0, by, emoji, !remove, content.sent_at_ms)?;
            }
            Body::Edit { text, .. } => {
                if m.system || m.from != by {
                    let event = SystemEvent::EditRefused { from: by.to_string(), author: m.from.clone() };
                    self.record_system_line(tx, row, sender, event)?;
                } else {
                    tx.edit_message(&row.id, &target.0, text, content.sent_at_ms)?;
                }
            }
            Body::Delete { .. } => {
                if m.system || m.from != by {
                    let event = SystemEvent::DeleteRefused { from: by.to_string(), author: m.from.clone() };
                    self.record_system_line(tx, row, sender, event)?;
                } else {
                    tx.erase_message(&row.id, &target.0)?;
                }
            }
            _ => {}
        }
        Ok(true)
    }

    /// Records `sender`'s receipts for this account's messages; receipts
    /// for anyone else's messages, or from this account, say nothing here.
    fn apply_receipt(
        &self,
        tx: &mut dyn Tx,
        conversation: &ConversationId,
        sender: &DeviceAddress,
        kind: ReceiptKind,
        ids: &[MessageId],
    ) -> Result<(), ClientError> {
        if sender.handle == *self.handle() {
            return Ok(());
        }
        let now = self.now_ms();
        for id in ids {
            if tx.message(conversation, &id.0)?.is_some_and(|m| m.outgoing && !m.system) {
                tx.add_receipt(conversation, &id.0, sender.handle.as_str(), kind, now)?;
            }
        }
        Ok(())
    }

    /// What follows a message newly stored: the actions that waited for
    /// it, the delivery receipt owed to its author (another account's), or
    /// the accounts it went to (this account's, from another device).
    pub(crate) fn after_stored(
        &self,
        tx: &mut dyn Tx,
        row: &ConversationRow,
        m: &StoredMessage,
        id: &MessageId,
    ) -> Result<(), ClientError> {
        for early in tx.take_early_actions(&row.id, &id.0)? {
            let (Ok(handle), Ok(device)) = (Handle::new(&early.from), early.device.parse()) else { continue };
            // Decoded when it came; a row that no longer decodes is dropped.
            let Ok(content) = Content::decode(&early.content) else { continue };
            self.apply_action(tx, row, &DeviceAddress { handle, device }, &content)?;
        }
        if m.outgoing {
            let others = self.other_members(&row.id)?;
            tx.set_recipients(&row.id, &id.0, &others)?;
        } else if !m.system && !crate::requests::is_request(&*tx, &row.id)? {
            // A request owes no receipts until it is accepted.
            tx.push_receipt_due(&row.id, &id.0, &m.from, ReceiptKind::Delivered)?;
        }
        Ok(())
    }

    /// The accounts of a conversation other than this one, sorted.
    pub(crate) fn other_members(&self, conversation: &ConversationId) -> Result<Vec<String>, ClientError> {
        let mut others: Vec<String> = self
            .engine()
            .members(conversation)?
            .into_iter()
            .map(|m| m.address.handle)
            .filter(|h| h != self.handle())
            .map(|h| h.to_string())
            .collect();
        others.sort();
        others.dedup();
        Ok(others)
    }

    /// Whether this device sends read receipts (the user's setting; on
    /// unless turned off).
    ///
    /// # Errors
    /// Store errors.
    pub fn read_receipts(&self) -> Result<bool, ClientError> {
        Ok(self.store().read(|tx| tx.meta(META_READ_RECEIPTS))?.is_none_or(|v| v.as_slice() != b"off"))
    }

    /// Turns read receipts on or off for this device.
    ///
    /// # Errors
    /// Store errors.
    pub fn set_read_receipts(&self, on: bool) -> Result<(), ClientError> {
        self.store().write(|tx| {
            if on {
                tx.delete_meta(META_READ_RECEIPTS)
            } else {
                tx.set_meta(META_READ_RECEIPTS, b"off")
            }
        })
    }

    /// The user read the conversation: its messages are marked read and,
    /// unless read receipts are off, a read receipt is queued for their
    /// authors. Returns how many messages were newly read.
    ///
    /// # Errors
    /// Store errors.
    pub fn mark_read(&self, conversation: &ConversationId) -> Result<usize, ClientError> {
        let send = self.read_receipts()?;
        self.store().write(|tx| {
            let read = tx.mark_read(conversation, self.now_ms())?;
            if send && !crate::requests::is_request(&*tx, conversation)? {
                for (id, author) in &read {
                    if author != self.handle().as_str() {
                        tx.push_receipt_due(conversation, id, author, ReceiptKind::Read)?;
                    }
                }
            }
            self.queue_receipts_in(tx)?;
            Ok(read.len())
        })
    }

    /// Queues the receipts this device owes (one send per conversation,
    /// author and kind, in chunks of [`MAX_RECEIPT_IDS`]), in the caller's
    /// transaction. Returns how many sends were queued.
    pub(crate) fn queue_receipts_in(&self, tx: &mut dyn Tx) -> Result<usize, ClientError> {
        let mut queued = 0;
        let due = tx.take_receipts_due()?;
        // A proven directory fork blocks every send of this device,
        // receipts included: they would carry the head to other members
        // under keys the server may have swapped. They are dropped, not
        // kept for later: a receipt is no message the user wrote.
        if tx.open_fork()?.is_some() {
            return Ok(0);
        }
        for due in due {
            // Only to a conversation this device is still in.
            let Some(row) = tx.conversation(&due.conversation)?.filter(|r| r.active && r.kind != "own") else {
                continue;
            };
            let target = row.target();
            let to = Outgoing { conversation: row.id, target: &target, group: row.kind == "group" };
            for ids in due.ids.chunks(MAX_RECEIPT_IDS) {
                // Bounded by the generations other members can skip (see
                // `rotation::RECEIPTS_STOP_AFTER_MESSAGES`): past it, the
                // receipts wait for no one; the messages were stored.
                if tx.key_update_state(&row.id)?.1 >= RECEIPTS_STOP_AFTER_MESSAGES {
                    break;
                }
                let body = Body::Receipt { kind: due.kind, ids: ids.iter().copied().map(MessageId).collect() };
                let (message_id, send_id) = (MessageId(self.random_id()?), self.random_id()?);
                self.queue_body(&to, &body, message_id, send_id, None)?;
                queued += 1;
            }
        }
        Ok(queued)
    }

    /// Queues the receipts this device owes, in a transaction of its own.
    ///
    /// # Errors
    /// Store errors.
    pub fn queue_receipts(&self) -> Result<usize, ClientError> {
        self.store().write(|tx| self.queue_receipts_in(tx))
    }

    /// Checks that this account may react to, edit, delete or answer the
    /// message `target` of `conversation`, before it is sent.
    ///
    /// # Errors
    /// [`ClientError::Input`] for no such message, a system line, a deleted
    /// message, or (editing and deleting) another account's message.
    pub fn check_action(&self, conversation: &ConversationId, body: &Body) -> Result<(), ClientError> {
        let (target, author_only, what) = match body {
            Body::Reaction { target, .. } => (target, false, "react to"),
            Body::Edit { target, .. } => (target, true, "edit"),
            Body::Delete { target } => (target, true, "delete"),
            Body::Reply { reply_to, .. } => (reply_to, false, "reply to"),
            _ => return Ok(()),
        };
        let m = self.store().read(|tx| tx.message(conversation, &target.0))?;
        let Some(m) = m else {
            return Err(ClientError::Input(format!("no message {} in this conversation", target.to_hex())));
        };
        if m.system {
            return Err(ClientError::Input(format!("{} is a system line: you cannot {what} it", target.to_hex())));
        }
        if m.deleted && !matches!(body, Body::Reply { .. }) {
            return Err(ClientError::Input(format!("message {} was deleted", target.to_hex())));
        }
        if author_only && m.from != self.handle().as_str() {
            return Err(ClientError::Input(format!(
                "message {} is {}'s: only its author may {what} it",
                target.to_hex(),
                m.from
            )));
        }
        Ok(())
    }

    /// Applies this account's own reaction, edit or delete to its store
    /// once it is queued or sent (the server never echoes it back).
    ///
    /// # Errors
    /// Store errors.
    pub fn apply_own_action(&self, conversation: &ConversationId, body: &Body) -> Result<(), ClientError> {
        let me = self.identity().address();
        let now = self.now_ms();
        self.store().write(|tx| {
            let Some(row) = tx.conversation(conversation)? else { return Ok(()) };
            let content =
                Content { message_id: MessageId([0; 16]), sent_at_ms: now, body: body.clone(), seq: 0, kt_head: None };
            self.apply_action(tx, &row, &me, &content).map(|_| ())
        })
    }
}

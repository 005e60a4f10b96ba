//! Message requests and blocking.
//!
//! A **contact** is an account this account wrote to, created a
//! conversation with, or accepted a request from. A conversation another
//! account brought this one into (a Welcome: a first message, a group
//! invitation) is a **request** unless its inviter is a contact or another
//! device of this account: it is stored and shown (marked `request`), but
//! this device owes it no delivery or read receipts until the user accepts
//! it (`accept`) or writes in it, and then the delivery receipts it
//! withheld. A **blocked** account is dropped: its
//! invitations are not joined, its messages are never stored or shown (each
//! is still processed, so the conversation's keys stay in step, and
//! acknowledged, so the server keeps nothing), while its commits apply as
//! ever (a group shared with others must not fall out of step because of
//! one member).
//!
//! All three are plain rows of the meta table (`contact:HANDLE`,
//! `request:ID`, `blocked:HANDLE`), so both store backends hold them
//! without a schema of their own.

use subrosa_core::content::ReceiptKind;
use subrosa_proto::{ConversationId, Handle};

use crate::store::{StoredMessage, Tx};
use crate::{ClientError, Session};

fn contact_key(handle: &str) -> String {
    format!("contact:{handle}")
}

pub(crate) fn request_key(conversation: &ConversationId) -> String {
    format!("request:{}", conversation.to_hex())
}

fn blocked_key(handle: &str) -> String {
    format!("blocked:{handle}")
}

/// Whether `handle` is a contact (see the module docs).
///
/// # Errors
/// Store errors.
pub fn is_contact(tx: &dyn Tx, handle: &str) -> Result<bool, ClientError> {
    Ok(tx.meta(&contact_key(handle))?.is_some())
}

/// Makes `handle` a contact.
///
/// # Errors
/// Store errors.
pub fn add_contact(tx: &mut dyn Tx, handle: &str) -> Result<(), ClientError> {
    tx.set_meta(&contact_key(handle), b"1")
}

/// Whether the conversation is a request not yet accepted.
///
/// # Errors
/// Store errors.
pub fn is_request(tx: &dyn Tx, conversation: &ConversationId) -> Result<bool, ClientError> {
    Ok(tx.meta(&request_key(conversation))?.is_some())
}

/// Marks `messages` as every front end shows them: each one in a message
/// request not yet accepted gets `request`, and its link preview (a
/// stranger's words, and picture, of a page) is held back, kept in the
/// store, until the request is accepted. One read per conversation.
///
/// # Errors
/// Store errors.
pub fn mark_requests(tx: &dyn Tx, messages: &mut [StoredMessage]) -> Result<(), ClientError> {
    let mut known: Vec<(String, bool)> = Vec::new();
    for m in messages {
        let request = match known.iter().find(|(c, _)| *c == m.conversation) {
            Some((_, r)) => *r,
            None => {
                let r = match m.conversation.parse::<ConversationId>() {
                    Ok(id) => is_request(tx, &id)?,
                    Err(_) => false,
                };
                known.push((m.conversation.clone(), r));
                r
            }
        };
        m.request = request;
        if request {
            m.preview = None;
        }
    }
    Ok(())
}

/// Whether `handle` is blocked.
///
/// # Errors
/// Store errors.
pub fn is_blocked(tx: &dyn Tx, handle: &str) -> Result<bool, ClientError> {
    Ok(tx.meta(&blocked_key(handle))?.is_some())
}

impl Session {
    /// A Welcome from `inviter` was joined: the conversation is a request
    /// unless the inviter is this account or a contact.
    pub(crate) fn note_invitation(
        &self,
        tx: &mut dyn Tx,
        conversation: &ConversationId,
        inviter: &Handle,
    ) -> Result<(), ClientError> {
        if inviter != self.handle() && !is_contact(&*tx, inviter.as_str())? {
            tx.set_meta(&request_key(conversation), inviter.as_str().as_bytes())?;
        }
        Ok(())
    }

    /// This account wrote in the conversation or accepted it: no longer a
    /// request, and its inviter (for a direct conversation, the peer)
    /// becomes a contact.
    ///
    /// # Errors
    /// Store errors.
    pub fn accept_in(&self, tx: &mut dyn Tx, conversation: &ConversationId) -> Result<bool, ClientError> {
        let key = request_key(conversation);
        let inviter = tx.meta(&key)?;
        if let Some(inviter) = &inviter {
            if let Ok(h) = std::str::from_utf8(inviter) {
                add_contact(tx, h)?;
            }
            tx.delete_meta(&key)?;
            // The delivery receipts withheld while it was a request go now
            // (read receipts only for what is read from now on).
            if let Some(row) = tx.conversation(conversation)? {
                for m in tx.history(std::slice::from_ref(&row))? {
                    if m.outgoing || m.system {
                        continue;
                    }
                    if let Some(id) = hex::decode(&m.id).ok().and_then(|b| <[u8; 16]>::try_from(b).ok()) {
                        tx.push_receipt_due(conversation, &id, &m.from, ReceiptKind::Delivered)?;
                    }
                }
                self.queue_receipts_in(tx)?;
            }
        }
        if let Some(peer) = tx.conversation(conversation)?.and_then(|r| r.peer) {
            add_contact(tx, &peer)?;
        }
        Ok(inviter.is_some())
    }

    /// Accepts a request (see [`Self::accept_in`]); false when it was none.
    ///
    /// # Errors
    /// Store errors.
    pub fn accept(&self, conversation: &ConversationId) -> Result<bool, ClientError> {
        self.store().write(|tx| self.accept_in(tx, conversation))
    }

    /// Whether the conversation is a request not yet accepted.
    ///
    /// # Errors
    /// Store errors.
    pub fn is_request(&self, conversation: &ConversationId) -> Result<bool, ClientError> {
        self.store().read(|tx| is_request(tx, conversation))
    }

    /// The conversation's disappearing-messages timer in seconds, as its
    /// members agreed on it in the MLS group (so a device that joined after
    /// it was set knows it too, though no line in its history says so);
    /// `None` when off or when this device is no longer a member.
    pub fn disappearing_timer(&self, conversation: &ConversationId) -> Option<u32> {
        self.engine().disappearing(conversation).ok().flatten()
    }

    /// Blocks or unblocks an account (see the module docs). Blocking also
    /// ends any request from it. Returns whether anything changed.
    ///
    /// # Errors
    /// Store errors.
    pub fn set_blocked(&self, handle: &Handle, blocked: bool) -> Result<bool, ClientError> {
        self.store().write(|tx| {
            let key = blocked_key(handle.as_str());
            let was = tx.meta(&key)?.is_some();
            if blocked {
                tx.set_meta(&key, b"1")?;
                tx.delete_meta(&contact_key(handle.as_str()))?;
            } else {
                tx.delete_meta(&key)?;
            }
            Ok(was != blocked)
        })
    }

    /// Whether `handle` is blocked.
    ///
    /// # Errors
    /// Store errors.
    pub fn is_blocked(&self, handle: &str) -> Result<bool, ClientError> {
        self.store().read(|tx| is_blocked(tx, handle))
    }
}

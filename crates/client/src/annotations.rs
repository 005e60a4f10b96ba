//! Replies, reactions, edits, deletes for everyone and read receipts, sent
//! through [`Subrosa::send_body`]. The rules (who may do what, what is
//! stored) are the session's (`subrosa_session`'s `annotations`); here a
//! command is checked against this device's store before anything is
//! queued, and applied to it once it is queued or sent (the server never
//! echoes a device's own message back to it).

use subrosa_core::content::Body;
use subrosa_proto::{ConversationId, MessageId};

use crate::store::StoredMessage;
use crate::{ClientError, Subrosa, Target};

impl Subrosa {
    /// The conversation a reaction, edit, delete or reply to an existing
    /// message goes to: one this device has (a direct one is never started
    /// for it).
    fn existing_conversation(&self, to: &Target) -> Result<ConversationId, ClientError> {
        match to {
            Target::Conversation(id) => Ok(self.conversation(id)?.id),
            Target::Direct(peer) => self
                .store()
                .read(|tx| tx.direct_conversation(peer.as_str()))?
                .ok_or_else(|| ClientError::UnknownTarget(peer.to_string())),
        }
    }

    /// Sends a reaction, edit or delete of `body` to `to`'s conversation,
    /// after checking it may be sent, and applies it here once queued.
    async fn send_action(&self, to: &Target, body: Body) -> Result<(), ClientError> {
        let conversation = self.existing_conversation(to)?;
        self.check_action(&conversation, &body)?;
        let result = self.send_body(&Target::Conversation(conversation), body.clone(), None).await;
        if matches!(result, Ok(_) | Err(ClientError::Pending(_))) {
            self.apply_own_action(&conversation, &body)?;
        }
        result.map(|_| ())
    }

    /// Reacts to the message `target` with `emoji`, or (`remove`) takes
    /// this account's reaction back.
    ///
    /// # Errors
    /// [`ClientError::Input`] for an emoji that is not one short emoji, or
    /// no such message (see `Session::check_action`); as
    /// [`Self::send_body`] otherwise ([`ClientError::Pending`]: queued).
    pub async fn react(&self, to: &Target, target: MessageId, emoji: &str, remove: bool) -> Result<(), ClientError> {
        let emoji = emoji.trim();
        if emoji.is_empty()
            || emoji.len() > subrosa_core::content::MAX_EMOJI_BYTES
            || emoji.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(ClientError::Input(format!(
                "a reaction is one emoji (at most {} bytes, no spaces or control characters)",
                subrosa_core::content::MAX_EMOJI_BYTES
            )));
        }
        self.send_action(to, Body::Reaction { target, emoji: emoji.to_string(), remove }).await
    }

    /// Replaces the text of this account's message `target`, for everyone.
    ///
    /// # Errors
    /// [`ClientError::Input`] for an empty or too long text, no such
    /// message, or another account's message; as [`Self::send_body`].
    pub async fn edit(&self, to: &Target, target: MessageId, text: &str) -> Result<(), ClientError> {
        check_text(text)?;
        self.send_action(to, Body::Edit { target, text: text.to_string() }).await
    }

    /// Deletes this account's message `target` for everyone: every member
    /// device drops its text.
    ///
    /// # Errors
    /// [`ClientError::Input`] for no such message or another account's
    /// message; as [`Self::send_body`].
    pub async fn delete_for_everyone(&self, to: &Target, target: MessageId) -> Result<(), ClientError> {
        self.send_action(to, Body::Delete { target }).await
    }

    /// Sends `text` in answer to the message `reply_to`
    /// (`accept_key_change` as in [`Self::send_text_with`]).
    ///
    /// # Errors
    /// [`ClientError::Input`] for an empty or too long text, or no such
    /// message; as [`Self::send_body`].
    pub async fn reply(
        &self,
        to: &Target,
        text: &str,
        reply_to: MessageId,
        accept_key_change: bool,
    ) -> Result<StoredMessage, ClientError> {
        check_text(text)?;
        let conversation = self.existing_conversation(to)?;
        let body = Body::Reply { text: text.to_string(), reply_to };
        self.check_action(&conversation, &body)?;
        let to = Target::Conversation(conversation);
        let id = MessageId(rand::random());
        match self.send_body_as(&to, body, Some(text.to_string()), accept_key_change, id).await? {
            Some(m) => Ok(m),
            None => Err(ClientError::Bug("a reply sent without its history row".into())),
        }
    }

    /// The user read the conversation: marks it read and sends the read
    /// receipts owed (unless read receipts are off). Returns how many
    /// messages were newly read.
    ///
    /// # Errors
    /// Store errors; [`ClientError::Pending`] when the receipts stay queued.
    pub async fn read(&self, conversation: &ConversationId) -> Result<usize, ClientError> {
        let n = self.mark_read(conversation)?;
        self.flush_outbox().await?;
        Ok(n)
    }
}

fn check_text(text: &str) -> Result<(), ClientError> {
    if text.is_empty() {
        return Err(ClientError::Input("empty message".into()));
    }
    if text.len() > subrosa_core::content::MAX_TEXT_BYTES {
        return Err(ClientError::Input(format!("message too long: {} bytes, at most 64 KiB", text.len())));
    }
    Ok(())
}

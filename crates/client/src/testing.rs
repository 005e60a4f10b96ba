//! Test builds only (feature `test-senders`, never in a release binary): a
//! misbehaving or newer sender, built from the library, for end-to-end tests
//! that drive the real binaries as the receivers.

use subrosa_core::content::{Body, ReceiptKind};
use subrosa_proto::{ConversationId, MessageId};

use crate::{ClientError, Subrosa};

impl Subrosa {
    /// Sends `body` to the direct conversation with `peer`, carrying
    /// `kt_head` as its gossiped directory head whatever it is (numbered in
    /// the sender's sequence like any message). Not stored in history.
    ///
    /// # Errors
    /// No conversation with `peer`; engine, network and server errors.
    pub async fn test_send_raw(&self, peer: &str, body: Body, kt_head: Option<Vec<u8>>) -> Result<(), ClientError> {
        self.sync().await?;
        let conversation = self
            .store()
            .read(|tx| tx.direct_conversation(peer))?
            .ok_or_else(|| ClientError::UnknownTarget(peer.to_string()))?;
        self.post_content_now(conversation, body, kt_head).await
    }

    /// The newest signed directory head this device holds (what it gossips).
    ///
    /// # Errors
    /// Store errors.
    pub fn test_newest_head(&self) -> Result<Option<Vec<u8>>, ClientError> {
        self.kt_latest()
    }
}

impl Subrosa {
    /// Owes `author` a delivery receipt for `id` in `conversation` `times`
    /// over (as `times` batches would), queues them under the receipt rules
    /// and sends what was queued. Returns how many receipts were queued.
    ///
    /// # Errors
    /// Store, network and server errors.
    pub async fn test_owe_receipts(
        &self,
        conversation: ConversationId,
        author: &str,
        id: MessageId,
        times: usize,
    ) -> Result<usize, ClientError> {
        let mut queued = 0;
        for _ in 0..times {
            self.store().write(|tx| tx.push_receipt_due(&conversation, &id.0, author, ReceiptKind::Delivered))?;
            queued += self.queue_receipts()?;
        }
        self.flush_outbox().await?;
        Ok(queued)
    }

    /// Sends `body` to every member of `conversation` at once, without the
    /// catch-up and key update a command makes first (and outside history).
    ///
    /// # Errors
    /// Engine, network and server errors.
    pub async fn test_post_now(&self, conversation: ConversationId, body: Body) -> Result<(), ClientError> {
        self.post_content_now(conversation, body, None).await
    }
}

//! Attachment messages (content kind 7) as they arrive: the caption is
//! stored like a text, and each file's pointer, key and checks beside it,
//! pending until the client downloads and checks its blob.

use subrosa_core::attachment::AttachedFile;
use subrosa_core::content::Content;
use subrosa_proto::DeviceAddress;

use crate::store::{AttachmentState, ConversationRow, Tx};
use crate::{ClientError, Session};

impl Session {
    /// Stores an attachment message: `caption` (a text content with the
    /// message's id and time) and its `files`, in the transaction that
    /// stores the message, so neither goes without the other. A message
    /// delivered again is stored once, files included.
    pub(crate) fn apply_attachment(
        &self,
        tx: &mut dyn Tx,
        row: &ConversationRow,
        sender: &DeviceAddress,
        caption: Content,
        files: &[AttachedFile],
        late: bool,
    ) -> Result<(), ClientError> {
        let new = tx.message(&row.id, &caption.message_id.0)?.is_none();
        let message_id = caption.message_id;
        self.apply_content(tx, row, sender, caption, late)?;
        // A delete for everyone that came first was applied as it was
        // stored: nothing of the message is fetched.
        let deleted = tx.message(&row.id, &message_id.0)?.is_some_and(|m| m.deleted);
        if new && !deleted {
            // Every member device but the sender's fetches the blobs (this
            // account's other devices too).
            tx.put_attachments(&row.id, &message_id.0, files, AttachmentState::Pending)?;
        }
        Ok(())
    }
}

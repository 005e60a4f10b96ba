//! Post-compromise security: this device replaces its own keys.
//!
//! MLS heals a compromised device only when that device commits fresh leaf
//! and path keys: until then a copy of its state reads every new message.
//! So a device commits an update (an empty commit with a path) in each
//! conversation after it sent [`UPDATE_AFTER_MESSAGES`](subrosa_session::rotation::UPDATE_AFTER_MESSAGES) messages there, or
//! [`UPDATE_PERIOD_MS`](subrosa_session::rotation::UPDATE_PERIOD_MS) after its last update, at its next command (a
//! `receive` included, so receive-only devices rotate too; a device that
//! stays connected, the daemon or the TUI, checks every 10 seconds). Every other
//! commit it makes carries a path as well (the engine requires one), so any
//! commit counts as an update. Above [`LARGE_GROUP_MEMBERS`](subrosa_session::rotation::LARGE_GROUP_MEMBERS) members the
//! period stretches to [`LARGE_GROUP_PERIOD_MS`](subrosa_session::rotation::LARGE_GROUP_PERIOD_MS) and the message count
//! triggers at most once a day, which bounds what a big group's members
//! process per day; after [`UPDATE_AFTER_MESSAGES_ANY_SIZE`](subrosa_session::rotation::UPDATE_AFTER_MESSAGES_ANY_SIZE)
//! messages any conversation updates, because receipts (sent to their
//! author's devices only) leave the other members behind in this device's
//! ratchet, and an MLS receiver accepts at most 1,024 generations ahead.
//! Members that have not committed for [`STALE_AFTER_MS`](subrosa_session::rotation::STALE_AFTER_MS)
//! are shown as stale by `members`.
//!
//! Key packages age too: a copy of the device's state holds their private
//! keys, and with them could join conversations started later. Every
//! [`KEY_PACKAGE_MAX_AGE_MS`](subrosa_session::rotation::KEY_PACKAGE_MAX_AGE_MS) the device uploads a fresh set, the
//! last-resort package included, and the server drops the old one-time
//! packages in the same step; the secrets of the generation before are
//! erased (one generation is kept for Welcomes still in flight).

use subrosa_core::CoreError;
use subrosa_proto::ConversationId;

use crate::store::now_ms;
use crate::{ClientError, Subrosa, KEY_PACKAGE_TARGET};
use subrosa_session::StagedChange;

pub(crate) use subrosa_session::rotation::{is_stale, update_due, KEY_PACKAGE_MAX_AGE_MS};

/// When this device last replaced its key packages (ms, little-endian u64).
const META_KEY_PACKAGES_ROTATED: &str = "key_packages_rotated_at";

/// What [`Subrosa::rekey`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rekeyed {
    /// Conversations whose keys this device replaced.
    pub conversations: usize,
    /// Conversations where the update is stored but not yet on the server.
    pub pending: usize,
}

impl Subrosa {
    /// Commits an update of this device's keys wherever one is due, and
    /// replaces its key packages when they are old. Called by every command
    /// that talks to the server.
    ///
    /// # Errors
    /// Network and server errors of the key-package upload; a conversation
    /// whose update fails for another reason is reported as an alert and the
    /// others go on.
    pub(crate) async fn maintain_keys(&self) -> Result<(), ClientError> {
        self.finish_key_switch().await?;
        self.update_due_keys().await?;
        self.move_to_post_quantum().await?;
        self.rotate_key_packages(false).await?;
        self.refill_key_packages().await
    }

    /// Commits an update of this device's keys in every conversation where
    /// one is due (see the module documentation).
    ///
    /// # Errors
    /// As [`Self::maintain_keys`].
    pub(crate) async fn update_due_keys(&self) -> Result<(), ClientError> {
        self.update_keys_where(update_due).await.map(|_| ())
    }

    /// Replaces this device's keys in every conversation now, and its key
    /// packages (`subrosa devices rekey`): after it, a copy of this device's
    /// state taken before can read nothing new and join nothing new.
    ///
    /// # Errors
    /// Network, server and store errors.
    pub async fn rekey(&self) -> Result<Rekeyed, ClientError> {
        self.sync().await?;
        // A new signature key, published, then a commit with the new
        // credential (and fresh path keys) in every conversation, and new
        // key packages: nothing signed or decrypted with the old state is
        // any use after it.
        self.rotate_device_key().await
    }

    async fn update_keys_where(&self, due: impl Fn(u64, u64, u64, usize) -> bool) -> Result<Rekeyed, ClientError> {
        let mut done = Rekeyed { conversations: 0, pending: 0 };
        for row in self.store().read(|tx| tx.active_conversations())? {
            // Read as each comes: updating one conversation's keys may
            // have processed commits of the next.
            let (last, sent) = self.store().read(|tx| tx.key_update_state(&row.id))?;
            let now = now_ms();
            // The rule is most eager for small conversations: when even a
            // two-device one would not be due, skip loading the group (every
            // command runs this over every conversation).
            if !due(now, last, sent, 0) {
                continue;
            }
            let members = match self.engine().members(&row.id) {
                Ok(m) => m.len(),
                Err(CoreError::UnknownConversation) => continue,
                Err(e) => return Err(e.into()),
            };
            // A conversation whose last change still waits for the server
            // gets its update after that one settles (which counts anyway).
            if !due(now, last, sent, members) || self.store().read(|tx| tx.pending_commit(&row.id))?.is_some() {
                continue;
            }
            // Moving: the new conversation starts with fresh keys anyway.
            if self.store().read(|tx| subrosa_session::moves::moving(tx, &row.id))?.is_some() {
                continue;
            }
            match self.update_conversation_keys(&row.id).await {
                Ok(()) => done.conversations += 1,
                Err(ClientError::Pending(_)) => done.pending += 1,
                Err(e @ (ClientError::Network(_) | ClientError::Store(_) | ClientError::Bug(_))) => return Err(e),
                Err(e) => {
                    // One conversation that refuses an update must not stop
                    // every command: say so, go on with the others.
                    let alert =
                        format!("could not update this device's keys in conversation #{}: {e}", row.id.to_hex());
                    self.store().write(|tx| tx.add_alert(&alert))?;
                }
            }
        }
        Ok(done)
    }

    async fn update_conversation_keys(&self, conversation: &ConversationId) -> Result<(), ClientError> {
        self.commit_with_retry(conversation, StagedChange::Update, None).await?;
        Ok(())
    }

    /// Uploads a fresh set of key packages that replaces the server's old
    /// ones, when the last rotation is older than [`KEY_PACKAGE_MAX_AGE_MS`]
    /// (or always, with `force`), then erases the secrets of the generation
    /// before the last one.
    pub(crate) async fn rotate_key_packages(&self, force: bool) -> Result<(), ClientError> {
        let now = now_ms();
        let last = self
            .store()
            .read(|tx| tx.meta(META_KEY_PACKAGES_ROTATED))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_le_bytes);
        if !force && last.is_some_and(|t| now.saturating_sub(t) < KEY_PACKAGE_MAX_AGE_MS) {
            return Ok(());
        }
        self.upload_key_packages_replacing(KEY_PACKAGE_TARGET as usize).await?;
        self.store().write(|tx| {
            // Packages made before the previous rotation were replaced at
            // least one rotation ago: no Welcome for them can still come.
            tx.erase_key_packages_before(last.unwrap_or(0))?;
            tx.set_meta(META_KEY_PACKAGES_ROTATED, &now.to_le_bytes())
        })
    }

    /// Records at registration that the key packages are new.
    pub(crate) fn note_key_packages_fresh(&self) -> Result<(), ClientError> {
        self.store().write(|tx| tx.set_meta(META_KEY_PACKAGES_ROTATED, &now_ms().to_le_bytes()))
    }

    /// When each member device of `conversation` last replaced its keys, as
    /// far as this device saw (its commits; otherwise when this device joined).
    ///
    /// # Errors
    /// Store errors.
    pub(crate) fn member_last_update(
        &self,
        conversation: &ConversationId,
        device: &subrosa_proto::DeviceAddress,
    ) -> Result<u64, ClientError> {
        let own = *device == self.engine().identity().address();
        self.store().read(|tx| {
            if own {
                return Ok(tx.key_update_state(conversation)?.0);
            }
            Ok(match tx.member_update(conversation, device)? {
                Some(t) => t,
                None => tx.conversation_created_at(conversation)?,
            })
        })
    }
}

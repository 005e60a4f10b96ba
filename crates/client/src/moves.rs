//! Moving classical conversations to the post-quantum suite (MLS ReInit):
//! the network half. The rules, and what is remembered, are in
//! `subrosa_session::moves`.
//!
//! At every command that talks to the server, each conversation marked to
//! be looked at is checked: when every member device's certificate says it
//! can do the post-quantum suite (and this device's does), this device
//! claims a post-quantum key package of every member device first (so a
//! server that withholds one stops the move before anything changed), then
//! commits the ReInit in the old conversation, then creates the new one
//! with those packages and sends its Welcome. Two members that try at once
//! race for the epoch like any commit; the loser applies the winner's move
//! and waits for its Welcome. A move whose new conversation could not be
//! created yet (no answer, a crash) is completed by the next command.

use subrosa_core::PQ_CIPHERSUITE;
use subrosa_proto::{ConversationId, Handle};
use subrosa_session::directory::pq_fits;
use subrosa_session::moves::{moving, pq_check_key, META_PQ_SCANNED, PQ_CHECK_PREFIX};
use subrosa_session::{PendingMeta, StagedChange};

use crate::conversations::Posted;
use crate::store::ConversationRow;
use crate::{ClientError, Subrosa};

impl Subrosa {
    /// Looks at every conversation marked as maybe able to move, and moves
    /// those that can (see the module documentation).
    ///
    /// # Errors
    /// Network (the marks stay for the next command) and store errors; a
    /// conversation that cannot move for another reason is an alert, and
    /// the others go on.
    pub(crate) async fn move_to_post_quantum(&self) -> Result<(), ClientError> {
        if !self.identity().certificate().supports(PQ_CIPHERSUITE) {
            return Ok(());
        }
        // Stores from before moves existed: look at everything once.
        if self.store().read(|tx| tx.meta(META_PQ_SCANNED))?.is_none() {
            self.store().write(|tx| {
                for row in tx.active_conversations()? {
                    tx.set_meta(&pq_check_key(&row.id), &[])?;
                }
                tx.set_meta(META_PQ_SCANNED, &[1])
            })?;
        }
        for key in self.store().read(|tx| tx.meta_keys(PQ_CHECK_PREFIX))? {
            let id = key.strip_prefix(PQ_CHECK_PREFIX).and_then(|h| h.parse::<ConversationId>().ok());
            let outcome = match id {
                Some(id) => self.move_conversation(&id).await,
                None => Ok(true),
            };
            match outcome {
                Ok(true) => self.store().write(|tx| tx.delete_meta(&key))?,
                // Waiting for an answer (the next command posts it again),
                // for the creator, or for another member's move.
                Ok(false) | Err(ClientError::Pending(_)) => {}
                Err(e @ (ClientError::Network(_) | ClientError::Store(_) | ClientError::Bug(_))) => return Err(e),
                Err(e) => {
                    let alert = match id {
                        Some(id) => format!("could not move conversation #{} to post-quantum keys: {e}", id.to_hex()),
                        None => format!("could not move a conversation to post-quantum keys: {e}"),
                    };
                    self.store().write(|tx| {
                        tx.add_alert(&alert)?;
                        // A move half done (its ReInit applied) is tried
                        // again by the next command; one not begun waits
                        // for the next change of keys.
                        match id {
                            Some(id) if moving(&*tx, &id)?.is_some_and(|m| m.creates) => Ok(()),
                            _ => tx.delete_meta(&key),
                        }
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Moves `id` if it can: true when there is nothing more to do for it,
    /// false to look again at the next command.
    async fn move_conversation(&self, id: &ConversationId) -> Result<bool, ClientError> {
        let Some(row) = self.store().read(|tx| tx.conversation(id))? else { return Ok(true) };
        if !row.active {
            return Ok(true);
        }
        if let Some(m) = self.store().read(|tx| moving(tx, id))? {
            // Applied here: the committer creates the new conversation (at
            // once, or at the next command after a lost answer or a crash);
            // the others wait for its Welcome, and create it themselves
            // once the committer is overdue (it may be gone for good).
            if self.store().read(|tx| tx.conversation(&m.to))?.is_some() {
                return Ok(true);
            }
            if self.store().read(|tx| tx.pending_commit(&m.to))?.is_some() || !m.creates_at(self.now_ms()) {
                return Ok(false);
            }
            let key_packages = self.claim_roster(id).await?;
            return self.create_moved(&row, &m.to, &key_packages).await;
        }
        if self.store().read(|tx| tx.pending_commit(id))?.is_some() {
            return Ok(false);
        }
        if !self.engine().can_move_to(id, PQ_CIPHERSUITE)? || !pq_fits(self.engine().members(id)?.len()) {
            return Ok(true);
        }
        // Every member device's package first: a server that withholds one
        // stops the move before anything changed.
        let key_packages = self.claim_roster(id).await?;
        let to = ConversationId(self.random_id()?);
        let line =
            format!("you moved this conversation to post-quantum keys (ML-KEM-768 + X25519) as #{}", to.to_hex());
        if !self.commit_with_retry(id, StagedChange::Move { to }, Some(line)).await? {
            // Nothing committed: another member's move came first (keep
            // looking, for the fallback), or there was nothing to move.
            return Ok(self.store().read(|tx| moving(tx, id))?.is_none());
        }
        // Ours won unless another member's move did: then it is theirs to
        // create (see `moving`).
        match self.store().read(|tx| moving(tx, id))? {
            Some(m) if m.creates && m.to == to => self.create_moved(&row, &to, &key_packages).await,
            // Another member's move won: theirs to create.
            _ => Ok(false),
        }
    }

    /// A key package of the post-quantum suite for every member device of
    /// `id` but this one, each checked against its account's identity key
    /// and the key directory; an error when any device has none.
    async fn claim_roster(&self, id: &ConversationId) -> Result<Vec<Vec<u8>>, ClientError> {
        let members = self.engine().members(id)?;
        let me = self.identity().address();
        let mut handles: Vec<Handle> = members.iter().map(|m| m.address.handle.clone()).collect();
        handles.sort();
        handles.dedup();
        let mut out = Vec::new();
        let mut covered = vec![me.clone()];
        for h in &handles {
            for (device, kp) in self.claim_devices(h, false, PQ_CIPHERSUITE).await? {
                let address = subrosa_proto::DeviceAddress { handle: h.clone(), device };
                if members.iter().any(|m| m.address == address) && !covered.contains(&address) {
                    covered.push(address);
                    out.push(kp);
                }
            }
        }
        // Every member's certificate says it can do post-quantum (see
        // `can_move_to`), and a device always keeps a last-resort package:
        // a device without one was withheld by the server.
        if let Some(m) = members.iter().find(|m| !covered.contains(&m.address)) {
            return Err(ClientError::KeyMismatch {
                handle: m.address.handle.to_string(),
                why: format!(
                    "the server withheld the post-quantum key packages of device {} (its certificate says it can do \
                     post-quantum conversations); the conversation stays as it is",
                    m.address.device.to_hex()
                ),
            });
        }
        Ok(out)
    }

    /// Creates `to`, the conversation `old` moved to, and sends its
    /// Welcome: stored as pending first, so a lost answer is completed by
    /// the next command like any new conversation's. True when it is
    /// created; false when another member's creation was ordered first
    /// (this device then joins that one's Welcome) or the answer is
    /// missing.
    async fn create_moved(
        &self,
        old: &ConversationRow,
        to: &ConversationId,
        key_packages: &[Vec<u8>],
    ) -> Result<bool, ClientError> {
        // The kind and name are the old conversation's (MLS carries them
        // over); the row is written when the server took the Welcome.
        let change = StagedChange::Create {
            kind: old.kind.clone(),
            name: old.name.clone(),
            peer: old.peer.clone(),
            first: None,
        };
        let meta = PendingMeta { change, line: None };
        let pending = self.store().write(|tx| {
            let out = self.engine().create_moved(&old.id, to, key_packages)?;
            self.store_pending(tx, &out, &meta)
        })?;
        match self.post_pending(&pending).await {
            Ok(Posted::Applied) => Ok(true),
            Ok(Posted::Stale) => {
                self.store().write(|tx| {
                    self.drop_pending(tx, &pending)?;
                    self.created_elsewhere(tx, &old.id)
                })?;
                Ok(false)
            }
            // No answer: the pending creation is posted again by the next
            // command (`resolve_pending_commits`).
            Err(ClientError::Pending(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

//! Staging commits: what a change to a conversation's membership, name or
//! keys becomes, and the request that asks the server to order it. The
//! request is stored before it is posted (with the staged commit, in the
//! transaction that staged it), so a lost answer is completed by posting the
//! same bytes again; the caller posts it.

use sha2::{Digest, Sha256};
use subrosa_core::{ConversationInfo, ConversationKind, CoreError, OutgoingCommit};
use subrosa_proto::{CommitGuard, ConversationId, DeviceAddress, MessageKind, SendId, SendPart, SendRequest, B64};

use crate::store::{PendingCommit, Tx};
use crate::{ClientError, PendingMeta, Session, StagedChange};

impl Session {
    /// Stages `change` (inside the caller's transaction); `None` when there
    /// is nothing left to change.
    pub fn stage_change(
        &self,
        conversation: &ConversationId,
        change: &StagedChange,
    ) -> Result<Option<OutgoingCommit>, ClientError> {
        match self.stage_change_inner(conversation, change) {
            // A conversation that moved takes no more commits: said plainly.
            Err(ClientError::Core(e)) if e.is_moved() => Err(CoreError::Moving.into()),
            other => other,
        }
    }

    fn stage_change_inner(
        &self,
        conversation: &ConversationId,
        change: &StagedChange,
    ) -> Result<Option<OutgoingCommit>, ClientError> {
        let members: Vec<DeviceAddress> = self.engine().members(conversation)?.into_iter().map(|m| m.address).collect();
        let out = match change {
            StagedChange::Create { .. } => None,
            StagedChange::Add { key_packages } => {
                let mut new = Vec::new();
                for kp in key_packages {
                    if !members.contains(&self.engine().inspect_key_package(kp.as_slice())?.address()) {
                        new.push(kp.as_slice().to_vec());
                    }
                }
                if new.is_empty() {
                    None
                } else {
                    Some(self.engine().add_members(conversation, &new)?)
                }
            }
            StagedChange::Remove { devices, notify } => {
                let gone: Vec<DeviceAddress> = devices.iter().filter(|d| members.contains(d)).cloned().collect();
                if gone.is_empty() {
                    None
                } else {
                    let mut out = self.engine().remove_members(conversation, &gone)?;
                    if !notify {
                        out.commit_recipients.retain(|a| !gone.contains(a));
                    }
                    Some(out)
                }
            }
            StagedChange::Rename { name } => {
                let info = ConversationInfo { kind: ConversationKind::Group, name: name.clone() };
                Some(self.engine().rename(conversation, &info)?)
            }
            StagedChange::Disappearing { seconds } => {
                if self.engine().disappearing(conversation)? == seconds.filter(|s| *s > 0) {
                    None
                } else {
                    Some(self.engine().set_disappearing(conversation, *seconds)?)
                }
            }
            StagedChange::Update => Some(self.engine().update_keys(conversation)?),
            StagedChange::Credential => {
                let me = self.identity();
                if self.engine().leaf_is(conversation, &me)? {
                    None
                } else {
                    Some(self.engine().update_credential(conversation, &me)?)
                }
            }
            StagedChange::Move { to } => match self.engine().move_to(conversation, *to, subrosa_core::PQ_CIPHERSUITE) {
                Ok(o) => Some(o),
                // Another member's move was applied first: nothing to do.
                Err(e) if e.is_moved() => None,
                Err(e) => return Err(e.into()),
            },
            StagedChange::Pending => match self.engine().commit_pending(conversation) {
                // A leaver forgot the group's keys when it proposed to
                // leave, and may be revoked since (its account deleted):
                // the commit goes to those who stay.
                Ok(Some(mut o)) => {
                    let after = o.members_after.clone();
                    o.commit_recipients.retain(|a| after.contains(a));
                    Some(o)
                }
                Ok(None) => None,
                // Moved: the members continue in the new conversation.
                Err(CoreError::UnknownConversation) => None,
                Err(e) if e.is_moved() => None,
                Err(e) => return Err(e.into()),
            },
        };
        Ok(out)
    }

    /// Builds the request of a staged commit and stores it as pending
    /// (inside the caller's transaction, the one that staged it).
    pub fn store_pending(
        &self,
        tx: &mut dyn Tx,
        out: &OutgoingCommit,
        meta: &PendingMeta,
    ) -> Result<PendingCommit, ClientError> {
        let mut parts = Vec::new();
        // The server wants the commit itself past epoch 0 (it reads its
        // framing): alone in a conversation, this device sends it to itself.
        let recipients = match (out.commit_recipients.is_empty(), out.epoch.0) {
            (false, _) => out.commit_recipients.clone(),
            (true, 0) => Vec::new(),
            (true, _) => vec![self.identity().address()],
        };
        if !recipients.is_empty() {
            parts.push(SendPart { kind: MessageKind::Commit, recipients, ciphertext: B64(out.commit.clone()) });
        }
        if let Some(w) = &out.welcome {
            parts.push(SendPart {
                kind: MessageKind::Welcome,
                recipients: out.welcome_recipients.clone(),
                ciphertext: B64(w.clone()),
            });
        }
        let send_id = SendId(self.random_id()?);
        let req = SendRequest {
            conversation: out.conversation,
            send_id,
            commit: Some(CommitGuard { epoch: out.epoch, members: Some(out.members_after.clone()) }),
            parts,
            expires_at: None,
        };
        let pending = PendingCommit {
            conversation: out.conversation,
            send_id: send_id.0,
            request: serde_json::to_vec(&req).map_err(|e| ClientError::Bug(e.to_string()))?,
            commit_digest: Sha256::digest(&out.commit).to_vec(),
            meta: serde_json::to_vec(meta).map_err(|e| ClientError::Bug(e.to_string()))?,
            by_reference: None,
        };
        tx.put_pending_commit(&pending)?;
        Ok(pending)
    }
}

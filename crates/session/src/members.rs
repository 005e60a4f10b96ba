//! Member devices checked against the key directory: the verdict and what
//! follows from it. The caller looks each account up (a network call,
//! never inside the store transaction that queued the device) and hands
//! the verified answer here.
//!
//! A device the directory confirms is pinned on first sight and dropped
//! from the queue. One it contradicts: from a Welcome, the conversation is
//! refused after all (its state, history and row go; its id stays known,
//! so it cannot come back); from a commit, the commit stays applied (the
//! device stays in step with the epoch) but the device is "contradicted":
//! a system line and an alert name who added which device, and sending
//! there is refused until the user accepts or removes it.

use crate::store::MemberCheck;
use crate::{ClientError, Session, CONTRADICTED, UNCHECKED};

/// What the key directory proved about one account, as the caller fetched
/// and verified it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DirectoryAnswer {
    /// The directory proves these keys.
    Keys {
        /// The account's identity key.
        identity_key: Vec<u8>,
        /// Its devices: id (hex) and signature key.
        devices: Vec<(String, Vec<u8>)>,
    },
    /// The directory contradicts anything claimed for the account (why).
    Contradicts(String),
}

impl Session {
    /// Why the directory's `answer` contradicts the queued device `c`, or
    /// `None` when it confirms it.
    ///
    /// # Errors
    /// Store errors.
    pub fn member_verdict(&self, c: &MemberCheck, answer: &DirectoryAnswer) -> Result<Option<String>, ClientError> {
        Ok(match answer {
            DirectoryAnswer::Contradicts(why) => Some(why.clone()),
            DirectoryAnswer::Keys { identity_key, .. } if *identity_key != c.identity_key => Some(format!(
                "the directory lists another identity key for {}; this device is certified by a key it does not know",
                c.handle
            )),
            // A device of this account must carry this account's key (or
            // the one handed over and about to be adopted).
            DirectoryAnswer::Keys { .. }
                if c.handle == self.handle().as_str() && !self.is_own_identity_key(&c.identity_key)? =>
            {
                Some("a device of this account is certified by an identity key this device does not hold".into())
            }
            DirectoryAnswer::Keys { devices, .. } => {
                let listed = devices.iter().any(|(d, key)| *d == c.device && *key == c.device_key);
                (!listed).then(|| format!("the directory does not list this device of {}", c.handle))
            }
        })
    }

    /// Applies the verdict on the queued device `c` (see the module
    /// documentation), in one transaction; nothing when the device is no
    /// longer queued (removed meanwhile, or its conversation refused).
    ///
    /// # Errors
    /// Store errors.
    pub fn settle_member_check(&self, c: &MemberCheck, verdict: Option<String>) -> Result<(), ClientError> {
        self.store().write(|tx| {
            let still = tx
                .member_checks(Some(&c.conversation), UNCHECKED)?
                .into_iter()
                .any(|p| p.handle == c.handle && p.device == c.device);
            if !still {
                return Ok(());
            }
            let Some(why) = verdict else {
                // Confirmed: pinned on first sight, like a claim's keys. A
                // device queued with another key than the pinned one carried
                // its account to a new key by a commit, and only a device the
                // pinned key certified could (`apply_event`): the directory
                // now lists that key, so the pin moves to it.
                if c.handle != self.handle().as_str() {
                    match tx.contact_key(&c.handle)? {
                        None => tx.pin_contact(&c.handle, &c.identity_key)?,
                        Some(pinned) if pinned != c.identity_key => {
                            let handle = subrosa_proto::Handle::new(&c.handle).map_err(|_| {
                                ClientError::Store(format!("bad handle {:?} in a member check", c.handle))
                            })?;
                            tx.change_contact_key(&c.handle, &c.identity_key)?;
                            self.key_change_lines(tx, &handle)?;
                        }
                        Some(_) => {}
                    }
                }
                return tx.drop_member_check(&c.conversation, &c.handle, Some(&c.device)).map(|_| ());
            };
            let Some(row) = tx.conversation(&c.conversation)? else { return Ok(()) };
            if c.welcome {
                let what = if row.kind == "group" {
                    format!("the group {}", row.name)
                } else {
                    format!("a direct conversation with {}", row.target())
                };
                let text = format!(
                    "refused the invitation from {} to {what} (#{}): {}'s device {} in it is not confirmed by the \
                     key directory ({why})",
                    c.added_by,
                    c.conversation.to_hex(),
                    c.handle,
                    c.device
                );
                tx.drop_refused_conversation(&c.conversation)?;
                return tx.add_alert(&text);
            }
            tx.set_member_check(&c.conversation, &c.handle, &c.device, CONTRADICTED, &why)?;
            self.contradicted_line(&row, &c.added_by, &c.handle, &c.device, &why)
        })
    }

    /// Refuses to send to a conversation with a member device the key
    /// directory contradicted and the user has not accepted.
    ///
    /// # Errors
    /// [`ClientError::DeviceNotAccepted`] naming the first such device
    /// (`target` is how the user named the conversation); store errors.
    pub fn check_members_accepted(
        &self,
        conversation: &subrosa_proto::ConversationId,
        target: &str,
    ) -> Result<(), ClientError> {
        match self.store().read(|tx| tx.member_checks(Some(conversation), CONTRADICTED))?.into_iter().next() {
            None => Ok(()),
            Some(c) => Err(ClientError::DeviceNotAccepted {
                target: target.to_string(),
                handle: c.handle,
                device: c.device,
                by: c.added_by,
                why: c.why,
            }),
        }
    }
}

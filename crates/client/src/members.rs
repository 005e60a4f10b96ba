//! Member keys checked against the key directory.
//!
//! Every member device that arrives in a Welcome (all of the group's) or in
//! a commit (the ones it adds) is first checked against the identity key
//! pinned for its account, inside the store transaction that applies it.
//! The key-directory lookup is a network call, so it never runs inside that
//! transaction: the device is queued as "unchecked" there, and
//! [`Subrosa::check_members`] looks each account up once the transaction
//! committed. A device the directory confirms is dropped from the queue. One
//! it contradicts:
//! - from a Welcome: the conversation is refused after all: its state,
//!   history and row go (its id stays known, so it cannot come back);
//! - from a commit: the commit stays applied (the device stays in step with
//!   the epoch) but the device is "contradicted": a system line and an alert
//!   name who added which device, and sending there is refused until the
//!   user accepts it (`accept-device`) or removes it.

use std::collections::HashMap;

use reqwest::Method;

use subrosa_proto::{AccountInfo, ConversationId, ErrorCode, Handle};

use crate::conversations::Target;
use crate::store::MemberCheck;
use crate::{ClientError, Subrosa};

use subrosa_session::{SystemEvent, CONTRADICTED, UNCHECKED};

/// What the directory says about one account, fetched once per pass.
enum Lookup {
    /// The directory proves these keys.
    Keys(AccountInfo),
    /// The directory contradicts anything claimed for the account.
    Contradicts(String),
}

impl Subrosa {
    async fn directory_lookup(&self, handle: &str) -> Result<Lookup, ClientError> {
        let Ok(h) = Handle::new(handle) else {
            return Ok(Lookup::Contradicts(format!("{handle:?} is not a handle")));
        };
        let info: AccountInfo = match self.api.call::<(), _>(Method::GET, &format!("/v1/accounts/{h}"), None).await {
            Ok(i) => i,
            Err(e) if e.code() == Some(ErrorCode::UnknownHandle) => {
                return Ok(Lookup::Contradicts(format!("the directory has no account {h}")))
            }
            Err(e) => return Err(e),
        };
        match self.kt_verify(&h, info.identity_key.as_slice(), &info.devices, info.kt.as_ref()).await {
            Ok(()) => Ok(Lookup::Keys(info)),
            Err(ClientError::KeyMismatch { why, .. }) => {
                Ok(Lookup::Contradicts(format!("the server's answer for {h} is not what the directory proves: {why}")))
            }
            Err(e) => Err(e),
        }
    }

    /// Checks every queued member device against the key directory, outside
    /// any store transaction (one lookup per account per pass). A fork or a
    /// network failure leaves the rest queued for the next command.
    ///
    /// # Errors
    /// Network, server and store errors.
    pub(crate) async fn check_members(&self) -> Result<(), ClientError> {
        let pending = self.store().read(|tx| tx.member_checks(None, UNCHECKED))?;
        if pending.is_empty() {
            return Ok(());
        }
        let mut seen: HashMap<String, Lookup> = HashMap::new();
        for c in pending {
            if !seen.contains_key(&c.handle) {
                let l = match self.directory_lookup(&c.handle).await {
                    Ok(l) => l,
                    Err(ClientError::DirectoryFork(_)) => return Ok(()),
                    Err(e) => return Err(e),
                };
                seen.insert(c.handle.clone(), l);
            }
            let verdict = match &seen[&c.handle] {
                Lookup::Contradicts(why) => Some(why.clone()),
                Lookup::Keys(info) if info.identity_key.as_slice() != c.identity_key.as_slice() => Some(format!(
                    "the directory lists another identity key for {}; this device is certified by a key it does not know",
                    c.handle
                )),
                // A device of this account must carry this account's key
                // (or the one handed over and about to be adopted).
                Lookup::Keys(_) if c.handle == self.handle().as_str() && !self.is_own_identity_key(&c.identity_key)? => {
                    Some("a device of this account is certified by an identity key this device does not hold".into())
                }
                Lookup::Keys(info) => {
                    let listed = info
                        .devices
                        .iter()
                        .any(|d| d.device_id.to_hex() == c.device && d.signature_key.as_slice() == c.device_key);
                    (!listed).then(|| format!("the directory does not list this device of {}", c.handle))
                }
            };
            self.store().write(|_| {
                // The conversation may have changed meanwhile (the device
                // removed, the conversation refused): only a row still queued counts.
                let still = self
                    .store()
                    .read(|tx| tx.member_checks(Some(&c.conversation), UNCHECKED))?
                    .into_iter()
                    .any(|p| p.handle == c.handle && p.device == c.device);
                if !still {
                    return Ok(());
                }
                match verdict {
                    None => {
                        // Confirmed: pinned on first sight, like a claim's keys.
                        if c.handle != self.handle().as_str()
                            && self.store().read(|tx| tx.contact_key(&c.handle))?.is_none()
                        {
                            self.store().write(|tx| tx.pin_contact(&c.handle, &c.identity_key))?;
                        }
                        self.store()
                            .write(|tx| tx.drop_member_check(&c.conversation, &c.handle, Some(&c.device)))
                            .map(|_| ())
                    }
                    Some(why) => self.contradicted(&c, &why),
                }
            })?;
        }
        Ok(())
    }

    fn contradicted(&self, c: &MemberCheck, why: &str) -> Result<(), ClientError> {
        let Some(row) = self.store().read(|tx| tx.conversation(&c.conversation))? else { return Ok(()) };
        if c.welcome {
            let what = if row.kind == "group" {
                format!("the group {}", row.name)
            } else {
                format!("a direct conversation with {}", row.target())
            };
            let text = format!(
                "refused the invitation from {} to {what} (#{}): {}'s device {} in it is not confirmed by the key \
                 directory ({why})",
                c.added_by,
                c.conversation.to_hex(),
                c.handle,
                c.device
            );
            self.store().write(|tx| tx.drop_refused_conversation(&c.conversation))?;
            return self.store().write(|tx| tx.add_alert(&text));
        }
        self.store().write(|tx| tx.set_member_check(&c.conversation, &c.handle, &c.device, CONTRADICTED, why))?;
        self.contradicted_line(&row, &c.added_by, &c.handle, &c.device, why)
    }

    /// Refuses to send to a conversation with a member device the key
    /// directory contradicted and the user has not accepted.
    pub(crate) fn check_members_accepted(
        &self,
        conversation: &ConversationId,
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

    /// Accepts a member device the key directory contradicted (the user
    /// checked it another way): sending to the conversation is no longer
    /// blocked by it. `device` is its id in hex (a unique prefix will do).
    /// Returns the handle whose device was accepted.
    ///
    /// # Errors
    /// Unknown target, or no such flagged device.
    pub fn accept_device(&self, target: &str, device: &str) -> Result<String, ClientError> {
        let conversation = match self.resolve(target)? {
            Target::Conversation(row) => row,
            Target::Direct(peer) => self
                .store()
                .read(|tx| tx.direct_conversation(peer.as_str()))?
                .and_then(|id| self.store().read(|tx| tx.conversation(&id)).transpose())
                .transpose()?
                .ok_or_else(|| ClientError::UnknownTarget(target.to_string()))?,
        };
        let device = device.trim().to_ascii_lowercase();
        let flagged = self.store().read(|tx| tx.member_checks(Some(&conversation.id), CONTRADICTED))?;
        let matching: Vec<&MemberCheck> =
            flagged.iter().filter(|c| !device.is_empty() && c.device.starts_with(&device)).collect();
        let c = match matching.as_slice() {
            [c] => *c,
            [] => {
                return Err(ClientError::Input(format!(
                    "no device {device:?} waits for acceptance in {}",
                    conversation.target()
                )))
            }
            _ => return Err(ClientError::Input(format!("{device:?} matches several devices; give more of its id"))),
        };
        self.store().write(|_| {
            self.store().write(|tx| tx.drop_member_check(&conversation.id, &c.handle, Some(&c.device)))?;
            self.system_line(
                &conversation,
                &self.identity().address(),
                SystemEvent::Note { text: format!("you accepted {}'s device {}", c.handle, c.device) },
            )
        })?;
        Ok(c.handle.clone())
    }
}

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

use crate::store::MemberCheck;
use crate::{ClientError, Subrosa};

use subrosa_session::{DirectoryAnswer, SystemEvent, CONTRADICTED, UNCHECKED};

impl Subrosa {
    async fn directory_lookup(&self, handle: &str) -> Result<DirectoryAnswer, ClientError> {
        let Ok(h) = Handle::new(handle) else {
            return Ok(DirectoryAnswer::Contradicts(format!("{handle:?} is not a handle")));
        };
        let info: AccountInfo = match self.api.call::<(), _>(Method::GET, &format!("/v1/accounts/{h}"), None).await {
            Ok(i) => i,
            Err(e) if e.code() == Some(ErrorCode::UnknownHandle) => {
                return Ok(DirectoryAnswer::Contradicts(format!("the directory has no account {h}")))
            }
            Err(e) => return Err(e),
        };
        match self.kt_verify(&h, info.identity_key.as_slice(), &info.devices, info.kt.as_ref()).await {
            Ok(()) => Ok(DirectoryAnswer::Keys {
                identity_key: info.identity_key.0,
                devices: info.devices.into_iter().map(|d| (d.device_id.to_hex(), d.signature_key.0)).collect(),
            }),
            Err(ClientError::KeyMismatch { why, .. }) => Ok(DirectoryAnswer::Contradicts(format!(
                "the server's answer for {h} is not what the directory proves: {why}"
            ))),
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
        let mut seen: HashMap<String, DirectoryAnswer> = HashMap::new();
        for c in pending {
            if !seen.contains_key(&c.handle) {
                let l = match self.directory_lookup(&c.handle).await {
                    Ok(l) => l,
                    Err(ClientError::DirectoryFork(_)) => return Ok(()),
                    Err(e) => return Err(e),
                };
                seen.insert(c.handle.clone(), l);
            }
            let verdict = self.member_verdict(&c, &seen[&c.handle])?;
            self.settle_member_check(&c, verdict)?;
        }
        Ok(())
    }

    /// Accepts a member device the key directory contradicted (the user
    /// checked it another way): sending to the conversation is no longer
    /// blocked by it. `device` is its id in hex (a unique prefix will do).
    /// Returns the handle whose device was accepted.
    ///
    /// # Errors
    /// Unknown conversation, or no such flagged device.
    pub fn accept_device(&self, id: &ConversationId, device: &str) -> Result<String, ClientError> {
        let conversation = self.conversation(id)?;
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

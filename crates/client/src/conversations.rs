//! Conversations: resolving what the user names, starting 1:1s, groups and
//! their membership, and getting commits ordered by the server.

use reqwest::Method;
use subrosa_core::{ConversationInfo, ConversationKind, CoreError, MemberInfo, OutgoingCommit};
use subrosa_proto::{
    ClaimRequest, ClaimResponse, CommitGuard, ConversationId, ErrorCode, Handle, MessageKind, SendId, SendPart,
    SendRequest, SendResponse, B64,
};

use crate::store::ConversationRow;
use crate::{ClientError, Subrosa};

/// What a user names: a group (by name) or a handle.
#[derive(Debug, Clone)]
pub enum Target {
    /// A group conversation.
    Group(ConversationRow),
    /// The 1:1 conversation with a handle (which may not exist yet).
    Direct(Handle),
}

/// A group as `subrosa groups` lists it.
#[derive(Debug, Clone)]
pub struct GroupSummary {
    /// Its name.
    pub name: String,
    /// Its id (hex).
    pub id: String,
    /// Member handles (this account included), sorted.
    pub members: Vec<String>,
    /// False once this device left or was removed.
    pub active: bool,
}

/// How many times a commit is retried after losing a race.
const COMMIT_ATTEMPTS: usize = 8;
/// Longest group name, in bytes.
const MAX_GROUP_NAME: usize = 64;

enum Submitted {
    Accepted,
    Stale,
}

fn check_group_name(name: &str) -> Result<(), ClientError> {
    if name.trim().is_empty() || name.len() > MAX_GROUP_NAME || name.chars().any(char::is_control) {
        return Err(ClientError::Input(format!(
            "invalid group name {name:?}: 1 to {MAX_GROUP_NAME} bytes, no control characters"
        )));
    }
    if name.starts_with('@') {
        return Err(ClientError::Input("a group name cannot start with '@'".into()));
    }
    Ok(())
}

impl Subrosa {
    /// Resolves a target: an active group with that name, else a handle
    /// (`@handle` always means the handle).
    ///
    /// # Errors
    /// [`ClientError::UnknownTarget`] or an ambiguous group name.
    pub fn resolve(&self, target: &str) -> Result<Target, ClientError> {
        if let Some(h) = target.strip_prefix('@') {
            return Handle::new(h).map(Target::Direct).map_err(|_| ClientError::UnknownTarget(target.to_string()));
        }
        let groups = self.store.groups_named(target)?;
        let active: Vec<_> = groups.iter().filter(|g| g.active).collect();
        match (active.len(), groups.first()) {
            (1, _) => return Ok(Target::Group(active[0].clone())),
            (0, Some(g)) => return Ok(Target::Group(g.clone())),
            (0, None) => {}
            (n, _) => {
                return Err(ClientError::Input(format!(
                    "{n} groups are named {target:?}; rename one with `group rename`"
                )))
            }
        }
        Handle::new(target).map(Target::Direct).map_err(|_| ClientError::UnknownTarget(target.to_string()))
    }

    /// Resolves a group by the name the user typed, then brings the device
    /// up to date, then reloads it by id: a concurrent rename by another
    /// member does not make the typed name unknown. A name not known yet is
    /// looked up again after catching up (a rename this device has not seen).
    async fn group_synced(&self, name: &str) -> Result<ConversationRow, ClientError> {
        let row = match self.group_by_name(name) {
            Ok(row) => row,
            Err(ClientError::Input(_)) => {
                // Perhaps renamed, or created, by another member: catch up first.
                self.sync().await?;
                return self.group_by_name(name);
            }
            Err(e) => return Err(e),
        };
        self.sync().await?;
        match self.store.conversation(&row.id)? {
            Some(r) if r.active => Ok(r),
            Some(r) => Err(ClientError::Input(format!("you are no longer a member of {}", r.name))),
            None => Err(ClientError::Bug("group vanished".into())),
        }
    }

    fn group_by_name(&self, name: &str) -> Result<ConversationRow, ClientError> {
        match self.resolve(name) {
            Ok(Target::Group(row)) if row.active => Ok(row),
            Ok(Target::Group(row)) => Err(ClientError::Input(format!("you are no longer a member of {}", row.name))),
            Ok(Target::Direct(_)) | Err(ClientError::UnknownTarget(_)) => {
                Err(ClientError::Input(format!("unknown group {name:?}: see `subrosa groups`")))
            }
            Err(e) => Err(e),
        }
    }

    /// Claims one key package of every device of `handle` (other than this
    /// one) and checks each against the account's identity key: pinned for
    /// contacts, our own for this account. `required` makes "no device" an
    /// error; otherwise it yields nothing.
    pub(crate) async fn claim(&self, handle: &Handle, required: bool) -> Result<Vec<Vec<u8>>, ClientError> {
        Ok(self.claim_devices(handle, required).await?.into_iter().map(|(_, kp)| kp).collect())
    }

    /// As [`Self::claim`], with the device each key package is for.
    pub(crate) async fn claim_devices(
        &self,
        handle: &Handle,
        required: bool,
    ) -> Result<Vec<(subrosa_proto::DeviceId, Vec<u8>)>, ClientError> {
        let req = ClaimRequest { handle: handle.clone() };
        let claim: ClaimResponse = match self.api.call(Method::POST, "/v1/keypackages/claim", Some(&req)).await {
            Ok(c) => c,
            Err(e) => {
                return match e.code() {
                    Some(ErrorCode::UnknownHandle) => Err(ClientError::Input(format!(
                        "unknown handle {handle}: no such account on {}",
                        self.server()
                    ))),
                    Some(ErrorCode::NoKeyPackage) if !required => Ok(Vec::new()),
                    Some(ErrorCode::NoKeyPackage) => {
                        Err(ClientError::Input(format!("{handle} has no device that can be added right now")))
                    }
                    _ => Err(e),
                }
            }
        };
        let expected = if handle == self.handle() {
            Some(self.identity().identity_public().to_vec())
        } else {
            self.store.contact_key(handle.as_str())?
        };
        // The directory must vouch for exactly the keys offered, and every
        // package must be for one of the devices it vouches for.
        self.kt_verify(handle, claim.identity_key.as_slice(), &claim.devices, claim.kt.as_ref()).await?;
        if let Some(d) = claim.devices.iter().find(|d| !self.is_certified(d, claim.identity_key.as_slice(), handle)) {
            return Err(ClientError::KeyMismatch {
                handle: handle.to_string(),
                why: format!(
                    "the key directory lists a device {} not certified by their identity key (a ghost device?)",
                    d.device_id.to_hex()
                ),
            });
        }
        let mut key_packages = Vec::new();
        for p in &claim.packages {
            if !claim.devices.contains(&p.device) {
                return Err(ClientError::KeyMismatch {
                    handle: handle.to_string(),
                    why: "a key package is for a device the key directory does not list".into(),
                });
            }
            let cert = self.engine.inspect_key_package(p.key_package.as_slice()).map_err(|e| {
                ClientError::KeyMismatch { handle: handle.to_string(), why: format!("invalid key package: {e}") }
            })?;
            let ok = cert.handle() == *handle
                && cert.identity_key() == claim.identity_key.as_slice()
                && cert.device_id() == p.device.device_id
                && cert.device_key() == p.device.signature_key.as_slice();
            if !ok {
                return Err(ClientError::KeyMismatch {
                    handle: handle.to_string(),
                    why: "a key package is not certified by the account's identity key".into(),
                });
            }
            key_packages.push((p.device.device_id, p.key_package.as_slice().to_vec()));
        }
        // Every package is certified by the identity key offered. When that
        // key is not the one pinned, the contact's key changed (or the
        // server swapped it): pin the new one unverified and say so in every
        // conversation with them; a verified contact blocks sending until the
        // user verifies again or accepts.
        if let Some(pinned) = &expected {
            if *pinned != claim.identity_key.as_slice() {
                if handle == self.handle() {
                    return Err(ClientError::KeyMismatch {
                        handle: handle.to_string(),
                        why: "the server offers this account an identity key that is not ours".into(),
                    });
                }
                let was_verified = self.store.transaction(|| {
                    let was = self.store.change_contact_key(handle.as_str(), claim.identity_key.as_slice())?;
                    self.key_change_lines(handle)?;
                    Ok(was)
                })?;
                if was_verified {
                    return Err(ClientError::KeyChanged(handle.to_string()));
                }
            }
        }
        if key_packages.is_empty() && required {
            return Err(ClientError::Input(format!("{handle} has no device that can be added right now")));
        }
        if expected.is_none() && handle != self.handle() {
            self.store.pin_contact(handle.as_str(), claim.identity_key.as_slice())?;
        }
        Ok(key_packages)
    }

    /// A warning line in every active conversation with `handle`.
    pub(crate) fn key_change_lines(&self, handle: &Handle) -> Result<(), ClientError> {
        let who = subrosa_proto::DeviceAddress { handle: handle.clone(), device: subrosa_proto::DeviceId([0; 8]) };
        for row in self.store.active_conversations()? {
            let with_them = row.peer.as_deref() == Some(handle.as_str())
                || (row.kind == "group"
                    && self.engine.members(&row.id).is_ok_and(|m| m.iter().any(|m| m.address.handle == *handle)));
            if with_them {
                self.system_line(
                    &row,
                    &who,
                    format!(
                        "warning: {handle}'s identity key changed; compare safety numbers again (subrosa verify {handle})"
                    ),
                )?;
            }
        }
        Ok(())
    }

    /// Refuses to send to conversations with a verified contact whose key
    /// changed, unless the user accepts the change.
    pub(crate) fn check_key_changes(&self, handles: &[Handle], accept: bool) -> Result<(), ClientError> {
        for h in handles {
            if self.store.key_change_pending(h.as_str())? {
                if accept {
                    self.store.clear_key_change(h.as_str())?;
                } else {
                    return Err(ClientError::KeyChanged(h.to_string()));
                }
            }
        }
        Ok(())
    }

    /// Starts a 1:1 conversation with `peer`, this account's other devices
    /// included, and sends the Welcome.
    pub(crate) async fn start_direct(&self, peer: &Handle) -> Result<ConversationId, ClientError> {
        if peer == self.handle() {
            return Err(ClientError::Input("cannot start a conversation with yourself".into()));
        }
        let mut key_packages = self.claim(peer, true).await?;
        key_packages.extend(self.claim(&self.handle().clone(), false).await?);
        let out = self
            .store
            .transaction(|| Ok(self.engine.create_conversation(&ConversationInfo::direct(), &key_packages)?))?;
        self.submit_new(&out, "direct", "", Some(peer.as_str())).await?;
        Ok(out.conversation)
    }

    /// Sends the commit and Welcome of a new conversation; on success records it.
    async fn submit_new(
        &self,
        out: &OutgoingCommit,
        kind: &str,
        name: &str,
        peer: Option<&str>,
    ) -> Result<(), ClientError> {
        match self.submit(out).await {
            Ok(Submitted::Accepted) => self.store.transaction(|| {
                self.engine.confirm_commit(&out.conversation)?;
                self.store.add_conversation(&out.conversation, kind, name, peer)
            }),
            Ok(Submitted::Stale) => {
                self.store.transaction(|| self.store.forget_conversation(&out.conversation))?;
                Err(ClientError::Protocol("the server refused a new conversation's first commit".into()))
            }
            Err(e) => {
                self.store.transaction(|| self.store.forget_conversation(&out.conversation))?;
                Err(e)
            }
        }
    }

    /// Posts a staged commit (and its Welcome) with the epoch guard.
    async fn submit(&self, out: &OutgoingCommit) -> Result<Submitted, ClientError> {
        let mut parts = Vec::new();
        if !out.commit_recipients.is_empty() {
            parts.push(SendPart {
                kind: MessageKind::Commit,
                recipients: out.commit_recipients.clone(),
                ciphertext: B64(out.commit.clone()),
            });
        }
        if let Some(w) = &out.welcome {
            parts.push(SendPart {
                kind: MessageKind::Welcome,
                recipients: out.welcome_recipients.clone(),
                ciphertext: B64(w.clone()),
            });
        }
        let req = SendRequest {
            conversation: out.conversation,
            send_id: SendId(rand::random()),
            commit: Some(CommitGuard { epoch: out.epoch, members: None }),
            parts,
        };
        match self.api.call::<_, SendResponse>(Method::POST, "/v1/messages", Some(&req)).await {
            Ok(_) => Ok(Submitted::Accepted),
            Err(e) if e.code() == Some(ErrorCode::StaleEpoch) => Ok(Submitted::Stale),
            Err(e) => Err(e),
        }
    }

    /// Stages a commit with `stage`, submits it, and when another member's
    /// commit won the epoch, drops ours, processes theirs and tries again.
    /// Returns false when `stage` had nothing to commit.
    pub(crate) async fn commit_with_retry(
        &self,
        conversation: &ConversationId,
        mut stage: impl FnMut() -> Result<Option<OutgoingCommit>, ClientError>,
    ) -> Result<bool, ClientError> {
        for _ in 0..COMMIT_ATTEMPTS {
            let Some(out) = self.store.transaction(&mut stage)? else { return Ok(false) };
            match self.submit(&out).await {
                Ok(Submitted::Accepted) => {
                    self.store.transaction(|| Ok(self.engine.confirm_commit(conversation)?))?;
                    return Ok(true);
                }
                Ok(Submitted::Stale) => {
                    self.store.transaction(|| Ok(self.engine.discard_commit(conversation)?))?;
                    self.flush_outbox().await?;
                    self.drain_inbox(true).await?;
                }
                Err(e) => {
                    self.store.transaction(|| Ok(self.engine.discard_commit(conversation)?))?;
                    return Err(e);
                }
            }
        }
        Err(ClientError::Network("the conversation kept changing under us; try again".into()))
    }

    /// Commits the leave proposals seen while processing.
    pub(crate) async fn commit_pending_leaves(&self) -> Result<(), ClientError> {
        loop {
            let (next, leaver) = {
                let mut q = self.lock_to_commit();
                if q.is_empty() {
                    return Ok(());
                }
                q.remove(0)
            };
            let Some(row) = self.store.conversation(&next)?.filter(|r| r.active) else { continue };
            let committed = self
                .commit_with_retry(&next, || match self.engine.commit_pending(&next) {
                    Ok(o) => Ok(o),
                    Err(CoreError::UnknownConversation) => Ok(None),
                    Err(e) => Err(e.into()),
                })
                .await?;
            if committed {
                // Our own commit is never delivered back to us: say it here.
                self.store.transaction(|| self.system_line(&row, &leaver, format!("{} left", leaver.handle)))?;
            }
        }
    }

    /// Creates a group with these handles (and this account's other devices).
    ///
    /// # Errors
    /// Invalid or taken name, unknown handles, key mismatches, network errors.
    pub async fn create_group(&self, name: &str, handles: &[String]) -> Result<GroupSummary, ClientError> {
        check_group_name(name)?;
        if self.store.groups_named(name)?.iter().any(|g| g.active) {
            return Err(ClientError::Input(format!("you already have a group named {name:?}")));
        }
        let mut members: Vec<Handle> = Vec::new();
        for h in handles {
            let h = Handle::new(h.trim_start_matches('@')).map_err(|e| ClientError::Input(e.to_string()))?;
            if h == *self.handle() {
                return Err(ClientError::Input("you are in the group already; name the others".into()));
            }
            if !members.contains(&h) {
                members.push(h);
            }
        }
        if members.is_empty() {
            return Err(ClientError::Input("name at least one other member".into()));
        }
        self.sync().await?;
        let mut key_packages = Vec::new();
        for h in &members {
            key_packages.extend(self.claim(h, true).await?);
        }
        key_packages.extend(self.claim(&self.handle().clone(), false).await?);
        let info = ConversationInfo { kind: ConversationKind::Group, name: name.to_string() };
        let out = self.store.transaction(|| Ok(self.engine.create_conversation(&info, &key_packages)?))?;
        self.submit_new(&out, "group", name, None).await?;
        let row = self.store.conversation(&out.conversation)?.ok_or(ClientError::Bug("group vanished".into()))?;
        let names: Vec<String> = members.iter().map(|h| h.to_string()).collect();
        self.store.transaction(|| {
            self.system_line(&row, &self.identity().address(), format!("you created {name} with {}", names.join(", ")))
        })?;
        self.group_summary(&row)
    }

    fn group_summary(&self, row: &ConversationRow) -> Result<GroupSummary, ClientError> {
        let mut members: Vec<String> = if row.active {
            self.engine.members(&row.id)?.into_iter().map(|m| m.address.handle.to_string()).collect()
        } else {
            Vec::new()
        };
        members.sort();
        members.dedup();
        Ok(GroupSummary { name: row.name.clone(), id: row.id.to_hex(), members, active: row.active })
    }

    /// Adds every device of `handle` to the group.
    ///
    /// # Errors
    /// Unknown group or handle, already a member, network errors.
    pub async fn group_add(&self, name: &str, handle: &str) -> Result<(), ClientError> {
        let handle = Handle::new(handle.trim_start_matches('@')).map_err(|e| ClientError::Input(e.to_string()))?;
        let row = self.group_synced(name).await?;
        if self.engine.members(&row.id)?.iter().any(|m| m.address.handle == handle) {
            return Err(ClientError::Input(format!("{handle} is already a member of {}", row.name)));
        }
        let key_packages = self.claim(&handle, true).await?;
        self.commit_with_retry(&row.id, || Ok(Some(self.engine.add_members(&row.id, &key_packages)?))).await?;
        self.store.transaction(|| self.system_line(&row, &self.identity().address(), format!("you added {handle}")))
    }

    /// Removes every device of `handle` from the group.
    ///
    /// # Errors
    /// Unknown group, not a member, network errors.
    pub async fn group_remove(&self, name: &str, handle: &str) -> Result<(), ClientError> {
        let handle = Handle::new(handle.trim_start_matches('@')).map_err(|e| ClientError::Input(e.to_string()))?;
        if handle == *self.handle() {
            return Err(ClientError::Input("to leave a group use `group leave NAME`".into()));
        }
        let row = self.group_synced(name).await?;
        let devices_of = |members: Vec<MemberInfo>| -> Vec<_> {
            members.into_iter().filter(|m| m.address.handle == handle).map(|m| m.address).collect()
        };
        if devices_of(self.engine.members(&row.id)?).is_empty() {
            return Err(ClientError::Input(format!("{handle} is not a member of {}", row.name)));
        }
        let done = self
            .commit_with_retry(&row.id, || {
                let devices = devices_of(self.engine.members(&row.id)?);
                if devices.is_empty() {
                    return Ok(None);
                }
                Ok(Some(self.engine.remove_members(&row.id, &devices)?))
            })
            .await?;
        if done {
            self.store
                .transaction(|| self.system_line(&row, &self.identity().address(), format!("you removed {handle}")))?;
        }
        Ok(())
    }

    /// Renames the group (the new name travels inside the encryption).
    ///
    /// # Errors
    /// Unknown group, invalid or taken name, network errors.
    pub async fn group_rename(&self, name: &str, new_name: &str) -> Result<(), ClientError> {
        check_group_name(new_name)?;
        let row = self.group_synced(name).await?;
        if new_name != row.name && self.store.groups_named(new_name)?.iter().any(|g| g.active) {
            return Err(ClientError::Input(format!("you already have a group named {new_name:?}")));
        }
        let info = ConversationInfo { kind: ConversationKind::Group, name: new_name.to_string() };
        self.commit_with_retry(&row.id, || Ok(Some(self.engine.rename(&row.id, &info)?))).await?;
        self.store.transaction(|| {
            self.store.set_conversation_name(&row.id, new_name)?;
            let mut row = row.clone();
            row.name = new_name.to_string();
            self.system_line(&row, &self.identity().address(), format!("you renamed the group to {new_name}"))
        })
    }

    /// Leaves the group: proposes this device's removal (the next member
    /// online commits it) and forgets the group's keys.
    ///
    /// # Errors
    /// Unknown group, network errors.
    pub async fn group_leave(&self, name: &str) -> Result<(), ClientError> {
        let row = self.group_synced(name).await?;
        let (proposal, recipients) = self.store.transaction(|| Ok(self.engine.propose_leave(&row.id)?))?;
        if !recipients.is_empty() {
            let req = SendRequest {
                conversation: row.id,
                send_id: SendId(rand::random()),
                commit: None,
                parts: vec![SendPart { kind: MessageKind::Commit, recipients, ciphertext: B64(proposal) }],
            };
            let _: SendResponse = self.api.call(Method::POST, "/v1/messages", Some(&req)).await?;
        }
        self.store.transaction(|| {
            self.system_line(&row, &self.identity().address(), "you left".to_string())?;
            self.store.deactivate_conversation(&row.id)
        })
    }

    /// Every group this device knows.
    ///
    /// # Errors
    /// Store errors.
    pub fn groups(&self) -> Result<Vec<GroupSummary>, ClientError> {
        self.store.group_rows()?.iter().map(|r| self.group_summary(r)).collect()
    }

    /// Every member device of a conversation (group name or handle).
    ///
    /// # Errors
    /// Unknown target.
    pub fn members(&self, target: &str) -> Result<Vec<MemberInfo>, ClientError> {
        let id = match self.resolve(target)? {
            Target::Group(row) if row.active => row.id,
            Target::Group(row) => {
                return Err(ClientError::Input(format!("you are no longer a member of {}", row.name)))
            }
            Target::Direct(peer) => self
                .store
                .direct_conversation(peer.as_str())?
                .ok_or_else(|| ClientError::UnknownTarget(target.into()))?,
        };
        Ok(self.engine.members(&id)?)
    }
}

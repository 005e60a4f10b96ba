//! Conversations: starting 1:1s, groups and their membership, and getting
//! commits ordered by the server. Everything here takes conversation ids:
//! what a user types (a group name, `@handle`, `#ID`) is resolved by the
//! front end (the CLI's rules are in its `target` module).

use reqwest::Method;

use subrosa_core::{CipherSuite, ConversationInfo, ConversationKind, MemberInfo, CIPHERSUITE, PQ_CIPHERSUITE};
use subrosa_proto::{
    AccountInfo, ClaimRequest, ClaimResponse, ConversationId, DeviceAddress, DeviceRecord, ErrorCode, Handle,
    MessageId, MessageKind, SendId, SendPart, SendRequest, SendResponse, B64,
};

use subrosa_session::directory::{can_do_pq, pq_fits, pq_withheld, pq_withheld_error};

use subrosa_session::{stuck_culprit_in, stuck_key, PendingMeta, StagedChange, SystemEvent};

use crate::store::{now_ms, ConversationRow, PendingCommit};
use crate::{ClientError, Subrosa};

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A conversation this device has, by id.
    Conversation(ConversationId),
    /// The direct conversation with an account, started by the first
    /// message when there is none.
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

/// What the server said to a staged commit.
pub(crate) enum Posted {
    /// It is the commit of its epoch (now or on an earlier post).
    Applied,
    /// Another commit won the epoch.
    Stale,
}

/// The text of [`ClientError::Pending`] for a commit whose answer is missing.
const COMMIT_PENDING: &str = "not yet on the server; the next subrosa command sends it";

/// True for failures after which the server may or may not have the post
/// (no answer, or one that says "try again").
fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Network(_) | ClientError::Protocol(_) => true,
        ClientError::Server { status, .. } => *status >= 500 || *status == 429 || *status == 0,
        _ => false,
    }
}

fn check_group_name(name: &str) -> Result<(), ClientError> {
    if name.trim().is_empty() || name.len() > MAX_GROUP_NAME || name.chars().any(char::is_control) {
        return Err(ClientError::Input(format!(
            "invalid group name {name:?}: 1 to {MAX_GROUP_NAME} bytes, no control characters"
        )));
    }
    if name.starts_with('@') || name.starts_with('#') {
        return Err(ClientError::Input("a group name cannot start with '@' or '#'".into()));
    }
    Ok(())
}

impl Subrosa {
    /// Brings the device up to date, then reads the group `id` again: it
    /// must still be a group this device takes part in.
    async fn group_synced(&self, id: &ConversationId) -> Result<ConversationRow, ClientError> {
        self.conversation(id)?;
        self.sync().await?;
        let row = self.conversation(id)?;
        if row.kind != "group" {
            return Err(ClientError::Input(format!("#{} is a direct conversation, not a group", id.to_hex())));
        }
        if !row.active {
            return Err(ClientError::Input(format!("you are no longer a member of {}", row.name)));
        }
        Ok(row)
    }

    /// Claims one key package of `suite` of every device of `handle` (other
    /// than this one) and checks each against the account's identity key:
    /// pinned for contacts, our own for this account. `required` makes "no
    /// device" an error; otherwise it yields nothing.
    pub(crate) async fn claim(
        &self,
        handle: &Handle,
        required: bool,
        suite: CipherSuite,
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        Ok(self.claim_devices(handle, required, suite).await?.into_iter().map(|(_, kp)| kp).collect())
    }

    /// As [`Self::claim`], with the device each key package is for.
    pub(crate) async fn claim_devices(
        &self,
        handle: &Handle,
        required: bool,
        suite: CipherSuite,
    ) -> Result<Vec<(subrosa_proto::DeviceId, Vec<u8>)>, ClientError> {
        Ok(self.claim_in(handle, required, suite).await?.0)
    }

    /// The key packages of a new conversation with every device of
    /// `handles` (`true`: the account must have one) and this account's
    /// other devices, and its suite: the post-quantum one when every such
    /// device can do it, as the identity keys state in the directory's
    /// certificates; otherwise the classical one. A device whose
    /// certificate says it can, yet whose post-quantum package the server
    /// does not hand out, is refused ([`pq_withheld`]): the server cannot
    /// push a conversation down to the classical suite. When some device
    /// cannot, the post-quantum packages already claimed go unused.
    pub(crate) async fn claim_for_new(
        &self,
        handles: &[(Handle, bool)],
    ) -> Result<(CipherSuite, Vec<Vec<u8>>), ClientError> {
        let mut all = handles.to_vec();
        all.push((self.handle().clone(), false));
        let mut pq = Vec::new();
        let mut classical_only = false;
        // An account the server said had no post-quantum package at all,
        // though every device of it can do post-quantum: judged after the
        // classical claim, which checks its keys against the pinned ones
        // first (a changed key is said as such).
        let mut suspect = None;
        for (h, required) in &all {
            let (packages, devices) = self.claim_in(h, false, PQ_CIPHERSUITE).await?;
            let (devices, answered) = match devices {
                Some(d) => (d, true),
                // No post-quantum package at all: ask the directory which
                // devices the account has and what they can do.
                None => (self.directory_devices(h).await?, false),
            };
            let others: Vec<&DeviceRecord> = devices.iter().filter(|d| !self.is_me(h, d)).collect();
            let withheld = pq_withheld(&devices, &[], &self.identity().address(), h);
            if others.iter().any(|d| !can_do_pq(d)) {
                classical_only = true;
            } else if !answered && !withheld.is_empty() {
                classical_only = true;
                suspect = Some((h.clone(), devices.clone()));
            } else if *required && packages.is_empty() {
                return Err(ClientError::Input(format!("{h} has no device that can be added right now")));
            }
            pq.extend(packages.into_iter().map(|(_, kp)| kp));
        }
        // Every device but this one sent a package; too many for a
        // post-quantum Welcome to leave the group room to grow: classical.
        if !classical_only && pq_fits(pq.len() + 1) {
            return Ok((PQ_CIPHERSUITE, pq));
        }
        let mut key_packages = Vec::new();
        for (h, required) in &all {
            key_packages.extend(self.claim(h, *required, CIPHERSUITE).await?);
        }
        if let Some((h, devices)) = suspect {
            let withheld = pq_withheld(&devices, &[], &self.identity().address(), &h);
            return Err(pq_withheld_error(&h, &withheld));
        }
        Ok((CIPHERSUITE, key_packages))
    }

    fn is_me(&self, handle: &Handle, d: &DeviceRecord) -> bool {
        *handle == *self.handle() && d.device_id == self.identity().device_id()
    }

    /// An account's devices as the key directory proves them.
    async fn directory_devices(&self, handle: &Handle) -> Result<Vec<DeviceRecord>, ClientError> {
        let info: AccountInfo = self.api.call::<(), _>(Method::GET, &format!("/v1/accounts/{handle}"), None).await?;
        self.kt_verify(handle, info.identity_key.as_slice(), &info.devices, info.kt.as_ref()).await?;
        Ok(info.devices.into_iter().filter(|d| self.is_certified(d, info.identity_key.as_slice(), handle)).collect())
    }

    /// As [`Self::claim_devices`], with every device of the account the
    /// directory lists (`None` when the server had no package to hand out).
    /// A post-quantum claim refuses an account with a device that can do
    /// post-quantum yet got no package ([`pq_withheld`]).
    async fn claim_in(
        &self,
        handle: &Handle,
        required: bool,
        suite: CipherSuite,
    ) -> Result<(Vec<(subrosa_proto::DeviceId, Vec<u8>)>, Option<Vec<DeviceRecord>>), ClientError> {
        let req = ClaimRequest { handle: handle.clone(), suite: suite.into() };
        let claim: ClaimResponse = match self.api.call(Method::POST, "/v1/keypackages/claim", Some(&req)).await {
            Ok(c) => c,
            Err(e) => {
                return match e.code() {
                    Some(ErrorCode::UnknownHandle) => Err(ClientError::Input(format!(
                        "unknown handle {handle}: no such account on {}",
                        self.server()
                    ))),
                    Some(ErrorCode::NoKeyPackage) if !required => Ok((Vec::new(), None)),
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
            self.store().read(|tx| tx.contact_key(handle.as_str()))?
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
            let cert = self.engine().inspect_key_package(p.key_package.as_slice()).map_err(|e| {
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
            if subrosa_core::key_package_suite(p.key_package.as_slice()).ok() != Some(suite) {
                return Err(ClientError::KeyMismatch {
                    handle: handle.to_string(),
                    why: format!("a key package of another ciphersuite than the {} one asked for", u16::from(suite)),
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
                let was_verified = self.store().write(|tx| {
                    let was = tx.change_contact_key(handle.as_str(), claim.identity_key.as_slice())?;
                    self.key_change_lines(tx, handle)?;
                    Ok(was)
                })?;
                if was_verified {
                    return Err(ClientError::KeyChanged(handle.to_string()));
                }
            }
        }
        if suite == PQ_CIPHERSUITE {
            let claimed: Vec<_> = key_packages.iter().map(|(d, _)| *d).collect();
            let withheld = pq_withheld(&claim.devices, &claimed, &self.identity().address(), handle);
            if !withheld.is_empty() {
                return Err(pq_withheld_error(handle, &withheld));
            }
        }
        if key_packages.is_empty() && required {
            return Err(ClientError::Input(format!("{handle} has no device that can be added right now")));
        }
        if expected.is_none() && handle != self.handle() {
            self.store().write(|tx| tx.pin_contact(handle.as_str(), claim.identity_key.as_slice()))?;
        }
        Ok((key_packages, Some(claim.devices)))
    }

    /// Starts a 1:1 conversation with `peer`, this account's other devices
    /// included, and sends the Welcome. `first` is a message the caller
    /// sends once the conversation exists: when the server's answer is lost
    /// it is kept with the staged conversation and sent by the command that
    /// completes it.
    pub(crate) async fn start_direct(
        &self,
        peer: &Handle,
        first: Option<(MessageId, String)>,
    ) -> Result<ConversationId, ClientError> {
        if peer == self.handle() {
            return Err(ClientError::Input("cannot start a conversation with yourself".into()));
        }
        let (suite, key_packages) = self.claim_for_new(&[(peer.clone(), true)]).await?;
        let change =
            StagedChange::Create { kind: "direct".into(), name: String::new(), peer: Some(peer.to_string()), first };
        self.create_conversation(&ConversationInfo::direct(), suite, &key_packages, change, None).await
    }

    /// Creates a conversation: stages it and stores the staged commit in one
    /// transaction, then posts it. A lost answer leaves it pending (the next
    /// command completes it); a refusal forgets it.
    pub(crate) async fn create_conversation(
        &self,
        info: &ConversationInfo,
        suite: CipherSuite,
        key_packages: &[Vec<u8>],
        change: StagedChange,
        line: Option<String>,
    ) -> Result<ConversationId, ClientError> {
        let line = line.map(|l| (self.identity().address(), l));
        let meta = PendingMeta { change, line };
        let pending = self.store().write(|tx| {
            let out = self.engine().create_conversation_in(info, suite, key_packages)?;
            self.store_pending(tx, &out, &meta)
        })?;
        match self.post_pending(&pending).await? {
            Posted::Applied => Ok(pending.conversation),
            Posted::Stale => {
                self.store().write(|tx| self.drop_pending(tx, &pending))?;
                Err(ClientError::Protocol("the server refused a new conversation's first commit".into()))
            }
        }
    }

    /// Posts a stored staged commit (the same request, the same send id, however
    /// often). Applied: confirmed here. Stale: left for the caller. No answer:
    /// left pending ([`ClientError::Pending`]). Refused: discarded, and the
    /// refusal returned.
    ///
    /// A Welcome over the inline limit is uploaded first and goes by
    /// reference (`crate::welcomes`). Once its blob is whole, the request
    /// by reference is stored beside the whole one, so a re-post soon after
    /// (a lost answer, a restart) sends the same reference instead of
    /// uploading again; a later one uploads again.
    pub(crate) async fn post_pending(&self, pending: &PendingCommit) -> Result<Posted, ClientError> {
        let body = match &pending.by_reference {
            Some(r) if r.usable_at(self.now_ms()) => Ok(r.request.clone()),
            _ => match self.with_welcome_references(&pending.request).await {
                Ok(Some(r)) => {
                    self.store().write(|tx| {
                        tx.set_pending_commit_by_reference(&pending.conversation, &pending.send_id, &r).map(|_| ())
                    })?;
                    Ok(r.request)
                }
                Ok(None) => Ok(pending.request.clone()),
                Err(e) => Err(e),
            },
        };
        let posted = match body {
            Ok(body) => self.api.call_raw::<SendResponse>(Method::POST, "/v1/messages", body).await,
            Err(e) => Err(e),
        };
        match posted {
            Ok(_) => {
                self.store().write(|tx| self.finish_pending(tx, pending))?;
                Ok(Posted::Applied)
            }
            Err(e) if e.code() == Some(ErrorCode::StaleEpoch) => Ok(Posted::Stale),
            Err(e) if is_transient(&e) => Err(ClientError::Pending(COMMIT_PENDING.into())),
            Err(e) => {
                self.store().write(|tx| self.drop_pending(tx, pending))?;
                Err(e)
            }
        }
    }

    /// After a stale answer: processes the inbox with the staged commit still
    /// in place, so that if the server did order ours (an earlier post whose
    /// answer was lost) its echo applies it. Returns true when it did;
    /// otherwise the staged commit is dropped (another one won).
    ///
    /// # Errors
    /// When nothing this device could process moved the conversation on
    /// (the winning commit is one it cannot process, RFC 9750 §5.3): an
    /// alert names its sender, and retrying would not help.
    async fn settle_stale(&self, conversation: &ConversationId) -> Result<bool, ClientError> {
        let before = self.engine().epoch(conversation).ok();
        self.flush_outbox().await?;
        self.drain_inbox(true).await?;
        let Some(pending) = self.store().read(|tx| tx.pending_commit(conversation))? else { return Ok(true) };
        self.store().write(|tx| self.drop_pending(tx, &pending))?;
        if before.is_some() && self.engine().epoch(conversation).ok() == before {
            let text = self.stuck_alert(conversation)?;
            return Err(ClientError::Protocol(text));
        }
        Ok(false)
    }

    /// Completes the staged commits earlier commands left pending: re-posts
    /// each (the server answers a duplicate for one it ordered); one that
    /// lost its epoch is staged again after the winner is processed.
    ///
    /// # Errors
    /// [`ClientError::Pending`] while the server does not answer; store errors.
    pub(crate) async fn resolve_pending_commits(&self) -> Result<(), ClientError> {
        for conversation in self.store().read(|tx| tx.pending_commit_conversations())? {
            let Some(pending) = self.store().read(|tx| tx.pending_commit(&conversation))? else { continue };
            let meta = PendingMeta::decode(&pending.meta)?;
            match self.post_pending(&pending).await {
                Ok(Posted::Applied) => {
                    if let StagedChange::Create { peer: Some(peer), first: Some((id, text)), .. } = meta.change {
                        let body = subrosa_core::content::Body::Text(text.clone());
                        self.send_content(conversation, &peer, false, &body, Some(&text), id, true).await?;
                    }
                }
                Ok(Posted::Stale) => {
                    match self.settle_stale(&conversation).await {
                        Ok(true) => continue,
                        Ok(false) => {}
                        // Stuck: the alert says so; other work goes on.
                        Err(ClientError::Protocol(_)) => continue,
                        Err(e) => return Err(e),
                    }
                    if let StagedChange::Create { .. } = meta.change {
                        self.store().write(|tx| {
                            tx.add_alert("the server refused a conversation this device created; it is gone")
                        })?;
                    } else if self.store().read(|tx| tx.conversation(&conversation))?.is_some_and(|r| r.active) {
                        if let Err(e) = self.commit_with_retry_from(&conversation, meta.change, meta.line).await {
                            if matches!(e, ClientError::Pending(_)) {
                                return Err(e);
                            }
                            self.store()
                                .write(|tx| tx.add_alert(&format!("a change you made could not be completed: {e}")))?;
                        }
                    }
                }
                Err(e @ ClientError::Pending(_)) => return Err(e),
                Err(e) => {
                    self.store().write(|tx| tx.add_alert(&format!("the server refused a change you made: {e}")))?
                }
            }
        }
        Ok(())
    }

    /// [`Self::resolve_pending_commits`], leaving what still has no answer
    /// for a later command: the rest of this one goes on (a message is still
    /// stored and queued; a change to a conversation whose earlier change
    /// still waits is refused by [`Self::commit_with_retry`]).
    ///
    /// # Errors
    /// As [`Self::resolve_pending_commits`], but for [`ClientError::Pending`].
    pub(crate) async fn resolve_pending_commits_or_wait(&self) -> Result<(), ClientError> {
        match self.resolve_pending_commits().await {
            Err(ClientError::Pending(_)) => Ok(()),
            other => other,
        }
    }

    /// Stages `change`, stores it and posts it; when another member's commit
    /// won the epoch, processes that one and stages the change again.
    /// Returns false when there was nothing to commit. `line` goes into
    /// history, from this device, once the commit is applied.
    ///
    /// # Errors
    /// [`ClientError::Pending`] when the server's answer is missing (the
    /// next command completes it); the server's refusal (the change is
    /// dropped); store and engine errors.
    pub(crate) async fn commit_with_retry(
        &self,
        conversation: &ConversationId,
        change: StagedChange,
        line: Option<String>,
    ) -> Result<bool, ClientError> {
        let line = line.map(|l| (self.identity().address(), l));
        self.commit_with_retry_from(conversation, change, line).await
    }

    /// [`Self::commit_with_retry`] with a history line by someone else (a
    /// member's leave, committed by this device).
    async fn commit_with_retry_from(
        &self,
        conversation: &ConversationId,
        change: StagedChange,
        line: Option<(DeviceAddress, String)>,
    ) -> Result<bool, ClientError> {
        if self.store().read(|tx| tx.pending_commit(conversation))?.is_some() {
            return Err(ClientError::Input(
                "an earlier change to this conversation still waits for the server's answer; try again later".into(),
            ));
        }
        let meta = PendingMeta { change, line };
        for _ in 0..COMMIT_ATTEMPTS {
            let staged = self.store().write(|tx| {
                let Some(out) = self.stage_change(conversation, &meta.change)? else { return Ok(None) };
                self.store_pending(tx, &out, &meta).map(Some)
            })?;
            let Some(pending) = staged else { return Ok(false) };
            match self.post_pending(&pending).await? {
                Posted::Applied => return Ok(true),
                Posted::Stale => {
                    if self.settle_stale(conversation).await? {
                        return Ok(true);
                    }
                }
            }
        }
        Err(ClientError::Network("the conversation kept changing under us; try again".into()))
    }

    /// An alert that a conversation is stuck: the server ordered a commit
    /// this device cannot process (RFC 9750 §5.3), naming who sent it.
    fn stuck_alert(&self, conversation: &ConversationId) -> Result<String, ClientError> {
        let who = self.take_unprocessable(conversation);
        if let Some(who) = &who {
            self.store().write(|tx| tx.set_meta(&stuck_key(conversation), who.to_string().as_bytes()))?;
        }
        let text = match who {
            Some(who) => format!(
                "conversation #{} is stuck: {who} won an epoch with a commit that could not be processed; changes there fail until it is recreated without them",
                conversation.to_hex()
            ),
            None => format!(
                "conversation #{} is stuck: the server ordered a commit this device never received or could not process",
                conversation.to_hex()
            ),
        };
        self.store().write(|tx| tx.add_alert(&text))?;
        Ok(text)
    }

    /// [`Self::commit_pending_leaves`]; a commit left without an answer is
    /// stored and completed by a later command, so this command goes on.
    ///
    /// # Errors
    /// As [`Self::commit_pending_leaves`], but for [`ClientError::Pending`].
    pub(crate) async fn commit_pending_leaves_or_wait(&self) -> Result<(), ClientError> {
        match self.commit_pending_leaves().await {
            Err(ClientError::Pending(_)) => Ok(()),
            other => other,
        }
    }

    /// Commits the leave proposals seen while processing.
    pub(crate) async fn commit_pending_leaves(&self) -> Result<(), ClientError> {
        loop {
            let Some((next, leaver)) = self.next_leave_to_commit() else { return Ok(()) };
            if !self.store().read(|tx| tx.conversation(&next))?.is_some_and(|r| r.active) {
                continue;
            }
            let meta_line = format!("{} left", leaver.handle);
            self.commit_with_retry_from(&next, StagedChange::Pending, Some((leaver, meta_line))).await?;
        }
    }

    fn stuck_culprit(&self, conversation: &ConversationId) -> Result<Option<DeviceAddress>, ClientError> {
        self.store().read(|tx| stuck_culprit_in(tx, conversation))
    }

    /// Re-creates the group `id`, stuck because a member won an epoch with a
    /// commit nobody can process (RFC 9750 §5.3), as a new conversation of
    /// the same name with every member account but without the culprit
    /// device; the stuck one is retired here, and on every member device
    /// that saw it stuck too.
    ///
    /// # Errors
    /// Unknown group, a group that is not stuck on this device, network
    /// errors, key mismatches.
    pub async fn group_recreate(&self, id: &ConversationId) -> Result<GroupSummary, ClientError> {
        let old = self.group_synced(id).await?;
        let Some(culprit) = self.stuck_culprit(&old.id)? else {
            return Err(ClientError::Input(format!(
                "{} is not stuck on this device; to take someone out, use `subrosa group remove`",
                old.name
            )));
        };
        let mut members: Vec<Handle> = self
            .engine()
            .members(&old.id)?
            .into_iter()
            .filter(|m| m.address != culprit)
            .map(|m| m.address.handle)
            .filter(|h| h != self.handle())
            .collect();
        members.sort();
        members.dedup();
        // The culprit's account stays through its other devices (take it
        // out with `group remove` afterwards); the culprit device is left
        // out of every claim.
        // The new conversation keeps the old one's suite.
        let suite = self.engine().suite(&old.id)?;
        let mut key_packages = Vec::new();
        for h in &members {
            key_packages.extend(self.claim_devices_except(h, &culprit, suite).await?);
        }
        key_packages.extend(self.claim_devices_except(&self.handle().clone(), &culprit, suite).await?);
        let retired = |new: &ConversationId| {
            format!("you re-created {} without {culprit} as #{}; this one is retired", old.name, new.to_hex())
        };
        let replaces = format!("you re-created {} (it replaces #{}, stuck by {culprit})", old.name, old.id.to_hex());
        self.replace_group(&old, &members, suite, &key_packages, retired, replaces).await
    }

    /// Creates the group that replaces `old` under its name, with
    /// `key_packages` (the devices of `members` and of this account), and
    /// retires `old`: one transaction notes the members, writes
    /// `retired(new id)` in the old conversation and `replaces` in the new.
    async fn replace_group(
        &self,
        old: &ConversationRow,
        members: &[Handle],
        suite: CipherSuite,
        key_packages: &[Vec<u8>],
        retired: impl FnOnce(&ConversationId) -> String,
        replaces: String,
    ) -> Result<GroupSummary, ClientError> {
        let info = ConversationInfo { kind: ConversationKind::Group, name: old.name.clone() };
        let change = StagedChange::Create { kind: "group".into(), name: old.name.clone(), peer: None, first: None };
        let id = self.create_conversation(&info, suite, key_packages, change, None).await?;
        let row = self.store().read(|tx| tx.conversation(&id))?.ok_or(ClientError::Bug("group vanished".into()))?;
        let me = self.identity().address();
        self.store().write(|tx| {
            let mut all: Vec<&str> = members.iter().map(|h| h.as_str()).collect();
            all.push(self.handle().as_str());
            tx.note_members(&row.id, &all)?;
            self.record_system_line(tx, old, &me, SystemEvent::Note { text: retired(&row.id) })?;
            tx.deactivate_conversation(&old.id)?;
            self.record_system_line(tx, &row, &me, SystemEvent::Note { text: replaces })
        })?;
        self.group_summary(&row)
    }

    /// The key packages of `handle`'s devices, except `device`'s.
    async fn claim_devices_except(
        &self,
        handle: &Handle,
        device: &DeviceAddress,
        suite: CipherSuite,
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        let packages = self.claim(handle, false, suite).await?;
        let mut kept = Vec::new();
        for kp in packages {
            if self.engine().inspect_key_package(&kp)?.address() != *device {
                kept.push(kp);
            }
        }
        Ok(kept)
    }

    /// Creates a group with these handles (and this account's other devices).
    ///
    /// # Errors
    /// Invalid or taken name, unknown handles, key mismatches, network errors.
    pub async fn create_group(&self, name: &str, handles: &[String]) -> Result<GroupSummary, ClientError> {
        check_group_name(name)?;
        if self.store().read(|tx| tx.groups_named(name))?.iter().any(|g| g.active) {
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
        let wanted: Vec<(Handle, bool)> = members.iter().map(|h| (h.clone(), true)).collect();
        let (suite, key_packages) = self.claim_for_new(&wanted).await?;
        let info = ConversationInfo { kind: ConversationKind::Group, name: name.to_string() };
        let names: Vec<String> = members.iter().map(|h| h.to_string()).collect();
        let change = StagedChange::Create { kind: "group".into(), name: name.to_string(), peer: None, first: None };
        let line = format!("you created {name} with {}", names.join(", "));
        let id = self.create_conversation(&info, suite, &key_packages, change, Some(line)).await?;
        let row = self.store().read(|tx| tx.conversation(&id))?.ok_or(ClientError::Bug("group vanished".into()))?;
        self.store().write(|tx| tx.note_members(&row.id, &names.iter().map(String::as_str).collect::<Vec<_>>()))?;
        self.group_summary(&row)
    }

    fn group_summary(&self, row: &ConversationRow) -> Result<GroupSummary, ClientError> {
        let mut members: Vec<String> = if row.active {
            self.engine().members(&row.id)?.into_iter().map(|m| m.address.handle.to_string()).collect()
        } else {
            Vec::new()
        };
        members.sort();
        members.dedup();
        Ok(GroupSummary { name: row.name.clone(), id: row.id.to_hex(), members, active: row.active })
    }

    /// Adds every device of `handle` to the group. Someone who was a
    /// member before cannot rejoin the same conversation (their devices
    /// refuse a Welcome for an id they knew), so for them the group starts
    /// over: a new conversation with the current members, them, and the
    /// same name; the old one is retired here and, when they join the new
    /// one, for every member. Returns the new group in that case.
    ///
    /// # Errors
    /// Unknown group or handle, already a member, network errors.
    pub async fn group_add(&self, id: &ConversationId, handle: &str) -> Result<Option<GroupSummary>, ClientError> {
        let handle = Handle::new(handle.trim_start_matches('@')).map_err(|e| ClientError::Input(e.to_string()))?;
        let row = self.group_synced(id).await?;
        if self.engine().members(&row.id)?.iter().any(|m| m.address.handle == handle) {
            return Err(ClientError::Input(format!("{handle} is already a member of {}", row.name)));
        }
        if self.store().read(|tx| tx.was_member(&row.id, handle.as_str()))? {
            return self.recreate_with(&row, &handle).await.map(Some);
        }
        let suite = self.engine().suite(&row.id)?;
        let key_packages = self.claim(&handle, true, suite).await?.into_iter().map(B64).collect();
        self.commit_with_retry(&row.id, StagedChange::Add { key_packages }, Some(format!("you added {handle}")))
            .await?;
        self.store().write(|tx| tx.note_members(&row.id, &[handle.as_str()]))?;
        Ok(None)
    }

    /// A new conversation for the group `old` with its current members plus
    /// `handle`, under the same name; `old` is retired.
    async fn recreate_with(&self, old: &ConversationRow, handle: &Handle) -> Result<GroupSummary, ClientError> {
        let mut members: Vec<Handle> = self
            .engine()
            .members(&old.id)?
            .into_iter()
            .map(|m| m.address.handle)
            .filter(|h| h != self.handle())
            .collect();
        members.push(handle.clone());
        members.sort();
        members.dedup();
        // The new conversation keeps the old one's suite.
        let suite = self.engine().suite(&old.id)?;
        let mut key_packages = Vec::new();
        for h in &members {
            key_packages.extend(self.claim(h, h == handle, suite).await?);
        }
        key_packages.extend(self.claim(&self.handle().clone(), false, suite).await?);
        let retired = |new: &ConversationId| {
            format!(
                "you re-added {handle}, who was a member before: the group continues in a new conversation #{}; \
                 this one is retired",
                new.to_hex()
            )
        };
        let replaces = format!(
            "you re-created {} with {} (it replaces #{}, retired because {handle} was a member before)",
            old.name,
            members.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(", "),
            old.id.to_hex()
        );
        self.replace_group(old, &members, suite, &key_packages, retired, replaces).await
    }

    /// Removes every device of `handle` from the group.
    ///
    /// # Errors
    /// Unknown group, not a member, network errors.
    pub async fn group_remove(&self, id: &ConversationId, handle: &str) -> Result<(), ClientError> {
        let handle = Handle::new(handle.trim_start_matches('@')).map_err(|e| ClientError::Input(e.to_string()))?;
        if handle == *self.handle() {
            return Err(ClientError::Input("to leave a group use `group leave NAME`".into()));
        }
        let row = self.group_synced(id).await?;
        let devices_of = |members: Vec<MemberInfo>| -> Vec<_> {
            members.into_iter().filter(|m| m.address.handle == handle).map(|m| m.address).collect()
        };
        if devices_of(self.engine().members(&row.id)?).is_empty() {
            return Err(ClientError::Input(format!("{handle} is not a member of {}", row.name)));
        }
        let devices = devices_of(self.engine().members(&row.id)?);
        let change = StagedChange::Remove { devices, notify: true };
        self.commit_with_retry(&row.id, change, Some(format!("you removed {handle}"))).await?;
        // The checks of the devices it removed are moot now.
        self.store().write(|tx| tx.drop_member_check(&row.id, handle.as_str(), None))?;
        Ok(())
    }

    /// Renames the group (the new name travels inside the encryption).
    ///
    /// # Errors
    /// Unknown group, invalid or taken name, network errors.
    pub async fn group_rename(&self, id: &ConversationId, new_name: &str) -> Result<(), ClientError> {
        check_group_name(new_name)?;
        let row = self.group_synced(id).await?;
        if new_name != row.name && self.store().read(|tx| tx.groups_named(new_name))?.iter().any(|g| g.active) {
            return Err(ClientError::Input(format!("you already have a group named {new_name:?}")));
        }
        let change = StagedChange::Rename { name: new_name.to_string() };
        self.commit_with_retry(&row.id, change, Some(format!("you renamed the group to {new_name}"))).await?;
        Ok(())
    }

    /// Sets the conversation's disappearing-messages timer (`None`: off) by
    /// a commit every member applies; each member sees who set it to what.
    /// Messages sent from then on disappear from every member's store, and
    /// from the server, that long after they were sent. Returns false when
    /// the timer was that already.
    ///
    /// # Errors
    /// Unknown conversation, one this device left, a member whose client
    /// does not support the timer (MLS refuses the commit before it is
    /// sent), network errors.
    pub async fn set_disappearing(&self, id: &ConversationId, seconds: Option<u32>) -> Result<bool, ClientError> {
        self.conversation(id)?;
        self.sync().await?;
        let row = self.conversation(id)?;
        if !row.active {
            return Err(ClientError::Input(format!("you are no longer in #{}", id.to_hex())));
        }
        let change = StagedChange::Disappearing { seconds: seconds.filter(|s| *s > 0) };
        self.commit_with_retry(&row.id, change, None).await
    }

    /// Leaves the group: proposes this device's removal (the next member
    /// online commits it) and forgets the group's keys.
    ///
    /// # Errors
    /// Unknown group, network errors.
    pub async fn group_leave(&self, id: &ConversationId) -> Result<(), ClientError> {
        let row = self.group_synced(id).await?;
        self.leave_row(&row).await
    }

    /// Blocks `handle` (see `subrosa_session::requests`): from then on
    /// nothing of theirs is shown and their invitations are not joined;
    /// this device leaves its direct conversations with them and the
    /// groups whose only other member they are. Groups shared with others
    /// stay (their messages there are dropped all the same). Returns the
    /// conversations left.
    ///
    /// # Errors
    /// A malformed handle, this account's own; network errors (the block
    /// itself is stored first).
    pub async fn block(&self, handle: &str) -> Result<Vec<ConversationId>, ClientError> {
        let handle = Handle::new(handle.trim_start_matches('@')).map_err(|e| ClientError::Input(e.to_string()))?;
        if handle == *self.handle() {
            return Err(ClientError::Input("you cannot block your own account".into()));
        }
        self.set_blocked(&handle, true)?;
        self.sync().await?;
        let mut left = Vec::new();
        for row in self.store().read(|tx| tx.active_conversations())? {
            if row.kind != "direct" && row.kind != "group" {
                continue;
            }
            let others: Vec<Handle> = self
                .engine()
                .members(&row.id)?
                .into_iter()
                .map(|m| m.address.handle)
                .filter(|h| h != self.handle())
                .collect();
            if !others.is_empty() && others.iter().all(|h| *h == handle) {
                self.leave_row(&row).await?;
                left.push(row.id);
            }
        }
        Ok(left)
    }

    /// Deletes this account: in every conversation this device first
    /// removes the account's other devices (a commit) and then proposes its
    /// own leave (a member can never commit its own removal; the next
    /// member online commits it), then the server revokes every device and
    /// deletes everything it holds for the account, and the key directory
    /// records the deletion. The handle cannot be registered again. The
    /// local store is left for the caller to delete. Returns how many
    /// conversations it left.
    ///
    /// # Errors
    /// Network errors (run it again: what is done is not done twice).
    pub async fn delete_account(&self) -> Result<usize, ClientError> {
        self.sync().await?;
        let me = self.identity().address();
        let mut left = 0;
        for row in self.store().read(|tx| tx.active_conversations())? {
            if row.kind != "direct" && row.kind != "group" {
                continue;
            }
            let siblings: Vec<DeviceAddress> = self
                .engine()
                .members(&row.id)?
                .into_iter()
                .map(|m| m.address)
                .filter(|a| a.handle == me.handle && *a != me)
                .collect();
            if !siblings.is_empty() {
                let change = StagedChange::Remove { devices: siblings, notify: false };
                self.commit_with_retry(&row.id, change, None).await?;
            }
            self.leave_row(&row).await?;
            left += 1;
        }
        let _: subrosa_proto::Empty = self.api.call::<(), _>(Method::DELETE, "/v1/accounts", None).await?;
        Ok(left)
    }

    /// Takes a block back: `handle`'s new messages show again (what came
    /// while it was blocked is gone for good). Returns whether it was
    /// blocked.
    ///
    /// # Errors
    /// A malformed handle; store errors.
    pub fn unblock(&self, handle: &str) -> Result<bool, ClientError> {
        let handle = Handle::new(handle.trim_start_matches('@')).map_err(|e| ClientError::Input(e.to_string()))?;
        self.set_blocked(&handle, false)
    }

    /// The message requests not yet accepted: active conversations another
    /// account who is not a contact brought this one into.
    ///
    /// # Errors
    /// Store errors.
    pub fn requests(&self) -> Result<Vec<ConversationRow>, ClientError> {
        let mut out = Vec::new();
        for row in self.store().read(|tx| tx.active_conversations())? {
            if self.is_request(&row.id)? {
                out.push(row);
            }
        }
        Ok(out)
    }

    /// Proposes this device's removal from the conversation `row` (the next
    /// member online commits it) and forgets its keys.
    async fn leave_row(&self, row: &ConversationRow) -> Result<(), ClientError> {
        // The proposal is queued in the outbox in the transaction that makes
        // it and forgets the group: a lost answer re-posts the same bytes.
        let queued = self.store().write(|tx| {
            let (proposal, recipients) = self.engine().propose_leave(&row.id)?;
            let me = self.handle().to_string();
            self.record_system_line(tx, row, &self.identity().address(), SystemEvent::Left { member: me })?;
            tx.deactivate_conversation(&row.id)?;
            if recipients.is_empty() {
                return Ok(None);
            }
            let send_id = SendId(rand::random());
            let req = SendRequest {
                conversation: row.id,
                send_id,
                commit: None,
                parts: vec![SendPart { kind: MessageKind::Commit, recipients, ciphertext: B64(proposal) }],
                expires_at: None,
            };
            let bytes = serde_json::to_vec(&req).map_err(|e| ClientError::Bug(e.to_string()))?;
            tx.push_outbox_request(&send_id.0, &bytes)?;
            Ok(Some(()))
        })?;
        if queued.is_some() {
            self.flush_outbox_inner(true).await?;
        }
        Ok(())
    }

    /// Every group this device knows.
    ///
    /// # Errors
    /// Store errors.
    pub fn groups(&self) -> Result<Vec<GroupSummary>, ClientError> {
        self.store().read(|tx| tx.group_rows())?.iter().map(|r| self.group_summary(r)).collect()
    }

    /// Every member device of the conversation `id`.
    ///
    /// # Errors
    /// Unknown conversation, or one this device no longer takes part in.
    pub fn members(&self, id: &ConversationId) -> Result<Vec<MemberInfo>, ClientError> {
        Ok(self.engine().members(&self.active_conversation(id)?)?)
    }

    /// The MLS ciphersuite of the conversation `id` (it keeps the one it
    /// was created with).
    ///
    /// # Errors
    /// As [`Self::members`].
    pub fn conversation_suite(&self, id: &ConversationId) -> Result<CipherSuite, ClientError> {
        Ok(self.engine().suite(&self.active_conversation(id)?)?)
    }

    /// The member devices of the conversation `id` that have not replaced
    /// their keys for 30 days or more (as far as this device saw), with
    /// how many whole days it has been.
    ///
    /// # Errors
    /// As [`Self::members`]; store errors.
    pub fn stale_members(&self, id: &ConversationId) -> Result<Vec<(subrosa_proto::DeviceAddress, u64)>, ClientError> {
        let id = self.active_conversation(id)?;
        let now = now_ms();
        let mut stale = Vec::new();
        for m in self.engine().members(&id)? {
            let last = self.member_last_update(&id, &m.address)?;
            if crate::rotation::is_stale(now, last) {
                stale.push((m.address, now.saturating_sub(last) / (24 * 3_600_000)));
            }
        }
        Ok(stale)
    }

    /// The current direct conversation with `peer`, if there is one.
    ///
    /// # Errors
    /// Store errors.
    pub fn direct_conversation(&self, peer: &Handle) -> Result<Option<ConversationId>, ClientError> {
        self.store().read(|tx| tx.direct_conversation(peer.as_str()))
    }

    fn active_conversation(&self, id: &ConversationId) -> Result<ConversationId, ClientError> {
        let row = self.conversation(id)?;
        if !row.active {
            return Err(ClientError::Input(format!("you are no longer a member of {}", row.target())));
        }
        Ok(row.id)
    }
}

//! Replacing this device's long-term keys: its signature key (`subrosa
//! devices rekey`), and the certificate it carries once its account's
//! identity key rotates.
//!
//! A switch is stored before anything is sent, so a lost answer or a crash
//! never strands the device between two keys:
//! 1. The new identity and the account's new key set are stored as pending.
//! 2. The key set is published (`PUT /v1/accounts/keys`), the same request
//!    as often as needed; when the server already holds the new signature
//!    key (its answer was lost), the old one is refused and the new one
//!    tried.
//! 3. Adopted in one transaction: the new identity replaces the old,
//!    the pending values go, and every conversation is marked for a leaf
//!    update; key packages are replaced (the server deleted the old ones).
//! 4. In every conversation, a commit replaces this device's leaf with the
//!    new credential (fresh path keys too). A conversation whose commit is
//!    pending gets it after that one settles; every command retries until
//!    none is left.
//!
//! Members see the same device with new keys and check them against the key
//! directory like a newly added device.
//!
//! Removing a device rotates the account's identity key (see ARCHITECTURE.md,
//! "Decisions"): the remover makes a new identity key, certifies every
//! remaining device's unchanged signature key with it, hands the key pair to
//! the remaining devices in the conversation of the account's own devices
//! (an MLS group of exactly those devices: the removed one is out of it
//! before anything is sent), and only then publishes the new key set. A
//! device that receives the handover adopts it once the directory lists the
//! new key, and carries it into its conversations the same way.

use reqwest::Method;
use subrosa_core::content::{Body, Content, IdentityHandover};
use subrosa_core::{ConversationInfo, CoreError, DeviceIdentity};
use subrosa_proto::{
    AccountInfo, ConversationId, DeviceAddress, DeviceRecord, ErrorCode, KeySetUpdate, MessageId, MessageKind, SendId,
    SendPart, SendRequest, SendResponse, B64,
};

use crate::rotation::Rekeyed;
use subrosa_session::StagedChange;
use subrosa_session::{META_PENDING_IDENTITY, META_PENDING_KEY_SET, META_PREVIOUS_IDENTITY_KEY};

use crate::store::now_ms;
use crate::{ClientError, Subrosa, META_IDENTITY};

/// Set while some conversation's leaf still carries the old credential.
const META_LEAVES_DUE: &str = "leaf_updates_due";
/// Set while a rotated identity key still has to reach the other devices.
const META_PENDING_HANDOVER: &str = "pending_handover";
/// Set once a device was revoked, until the identity key rotation starts.
pub(crate) const META_ROTATION_DUE: &str = "identity_rotation_due";

impl Subrosa {
    /// Replaces this device's signature key: a new key certified by the
    /// account's identity key, published, then carried into every
    /// conversation by a commit.
    ///
    /// # Errors
    /// Network, server and store errors; [`ClientError::Pending`] when the
    /// switch is stored but not yet on the server (the next command
    /// finishes it).
    pub(crate) async fn rotate_device_key(&self) -> Result<Rekeyed, ClientError> {
        let me = self.identity();
        let new = me.with_new_device_key(self.engine().crypto(), now_ms())?;
        let info: AccountInfo =
            self.api.call::<(), _>(Method::GET, &format!("/v1/accounts/{}", self.handle()), None).await?;
        self.kt_verify(self.handle(), info.identity_key.as_slice(), &info.devices, info.kt.as_ref()).await?;
        let mut devices = info.devices;
        let own = devices
            .iter_mut()
            .find(|d| d.device_id == me.device_id())
            .ok_or_else(|| ClientError::Protocol("the server does not list this device".into()))?;
        *own = DeviceRecord {
            device_id: me.device_id(),
            signature_key: B64(new.device_public().to_vec()),
            certificate: B64(new.certificate().to_bytes()?),
        };
        let update = KeySetUpdate { identity_key: B64(me.identity_public().to_vec()), devices };
        let request = serde_json::to_vec(&update).map_err(|e| ClientError::Bug(e.to_string()))?;
        self.store().write(|tx| {
            tx.set_meta(META_PENDING_IDENTITY, &new.to_secret_bytes()?)?;
            tx.set_meta(META_PENDING_KEY_SET, &request)
        })?;
        self.finish_pending_switch().await
    }

    /// Publishes and adopts a stored key switch, then updates the leaves
    /// still carrying the old credential. Every command that talks to the
    /// server calls it first; it costs one meta read when nothing is due.
    ///
    /// # Errors
    /// Network, server and store errors; a refused switch is dropped and its
    /// refusal returned.
    pub(crate) async fn finish_key_switch(&self) -> Result<Rekeyed, ClientError> {
        let done = self.finish_pending_switch().await?;
        if self.store().read(|tx| tx.meta(META_ROTATION_DUE))?.is_some()
            && self.store().read(|tx| tx.meta(META_PENDING_IDENTITY))?.is_none()
        {
            return self.rotate_identity_key().await;
        }
        Ok(done)
    }

    async fn finish_pending_switch(&self) -> Result<Rekeyed, ClientError> {
        let Some(secret) = self.store().read(|tx| tx.meta(META_PENDING_IDENTITY))? else {
            return self.update_stale_leaves().await;
        };
        let new = DeviceIdentity::from_secret_bytes(self.engine().crypto(), &secret)?;
        if new.address() != self.identity().address() {
            return Err(ClientError::Store("a pending key switch for another device".into()));
        }
        if let Some(request) = self.store().read(|tx| tx.meta(META_PENDING_KEY_SET))? {
            let update: KeySetUpdate =
                serde_json::from_slice(&request).map_err(|e| ClientError::Store(format!("pending key set: {e}")))?;
            if self.store().read(|tx| tx.meta(META_PENDING_HANDOVER))?.is_some() {
                self.hand_over(&new, &update).await?;
                self.store().write(|tx| tx.delete_meta(META_PENDING_HANDOVER))?;
            }
            if let Err(e) = self.publish_key_set(&update, &new).await {
                if e.code().is_some() && e.code() != Some(ErrorCode::Unauthorized) && !is_retryable(&e) {
                    // Refused for good: keep the keys this device has.
                    self.store().write(|tx| {
                        tx.delete_meta(META_PENDING_IDENTITY)?;
                        tx.delete_meta(META_PENDING_KEY_SET)?;
                        tx.delete_meta(META_PENDING_HANDOVER)
                    })?;
                    self.api.set_identity((*self.identity()).clone());
                }
                return Err(e);
            }
        } else if !self.handover_published(&new).await? {
            // Handed over by another device, not yet in the directory: wait
            // (the next command looks again).
            return Ok(Rekeyed { conversations: 0, pending: 0 });
        }
        let old_key = self.identity().identity_public().to_vec();
        self.store().write(|tx| {
            // The account's other devices hold the old key until they adopt
            // the new one: their messages are not dropped meanwhile.
            if old_key != new.identity_public() {
                tx.set_meta(META_PREVIOUS_IDENTITY_KEY, &old_key)?;
            }
            tx.set_meta(META_IDENTITY, &new.to_secret_bytes()?)?;
            tx.delete_meta(META_PENDING_IDENTITY)?;
            tx.delete_meta(META_PENDING_KEY_SET)?;
            tx.set_meta(META_LEAVES_DUE, &[1])
        })?;
        self.engine().set_identity(new.clone());
        self.api.set_identity(new);
        self.rotate_key_packages(true).await?;
        self.update_stale_leaves().await
    }

    async fn publish_key_set(&self, update: &KeySetUpdate, new: &DeviceIdentity) -> Result<(), ClientError> {
        let put = || self.api.call::<_, AccountInfo>(Method::PUT, "/v1/accounts/keys", Some(update));
        match put().await {
            Ok(_) => Ok(()),
            // The answer to an earlier attempt was lost and the server holds
            // the new signature key already: the same request, signed by it.
            Err(e)
                if e.code() == Some(ErrorCode::Unauthorized)
                    && new.device_public() != self.identity().device_public() =>
            {
                self.api.set_identity(new.clone());
                put().await.map(|_| ())
            }
            Err(e) => Err(e),
        }
    }

    /// Commits this device's new credential in every conversation whose leaf
    /// still carries the old one. Returns how many were updated and how many
    /// are left for a later command.
    async fn update_stale_leaves(&self) -> Result<Rekeyed, ClientError> {
        let mut done = Rekeyed { conversations: 0, pending: 0 };
        if self.store().read(|tx| tx.meta(META_LEAVES_DUE))?.is_none() {
            return Ok(done);
        }
        let me = self.identity();
        let mut left = 0;
        for row in self.store().read(|tx| tx.active_conversations())? {
            match self.engine().leaf_is(&row.id, &me) {
                Ok(true) | Err(CoreError::UnknownConversation) => continue,
                Ok(false) => {}
                Err(e) => return Err(e.into()),
            }
            if self.store().read(|tx| tx.pending_commit(&row.id))?.is_some() {
                left += 1;
                continue;
            }
            match self.commit_with_retry(&row.id, StagedChange::Credential, None).await {
                Ok(_) => done.conversations += 1,
                Err(ClientError::Pending(_)) => left += 1,
                Err(e @ (ClientError::Network(_) | ClientError::Store(_) | ClientError::Bug(_))) => return Err(e),
                Err(e) => {
                    self.store().write(|tx| {
                        tx.add_alert(&format!(
                            "could not carry this device's new keys into conversation #{}: {e}",
                            row.id.to_hex()
                        ))
                    })?;
                }
            }
        }
        if left == 0 {
            self.store().write(|tx| tx.delete_meta(META_LEAVES_DUE))?;
        }
        done.pending = left;
        Ok(done)
    }
}

/// Failures after which the same request may succeed later.
fn is_retryable(e: &ClientError) -> bool {
    matches!(e.code(), Some(ErrorCode::RateLimited | ErrorCode::Unavailable | ErrorCode::Internal))
}

impl Subrosa {
    /// Rotates the account's identity key (after a device was removed and
    /// revoked): every remaining device is re-certified by a new key, which
    /// is handed to them and then published; see the module documentation.
    ///
    /// # Errors
    /// A device listed by the server that the current identity key did not
    /// certify (a ghost: it is never certified by the new key); network,
    /// server and store errors; [`ClientError::Pending`] when the handover
    /// or the publication waits for the server (the next command goes on).
    pub(crate) async fn rotate_identity_key(&self) -> Result<Rekeyed, ClientError> {
        let me = self.identity();
        let crypto = self.engine().crypto();
        let now = now_ms();
        let new = me.with_new_identity_key(crypto, now)?;
        let info: AccountInfo =
            self.api.call::<(), _>(Method::GET, &format!("/v1/accounts/{}", self.handle()), None).await?;
        self.kt_verify(self.handle(), info.identity_key.as_slice(), &info.devices, info.kt.as_ref()).await?;
        let mut devices = Vec::new();
        for d in info.devices {
            if !self.is_certified(&d, me.identity_public(), self.handle()) {
                return Err(ClientError::KeyMismatch {
                    handle: self.handle().to_string(),
                    why: format!(
                        "the server lists a device {} that your identity key did not certify; it is not \
                         carried over to the new key (remove it first)",
                        d.device_id.to_hex()
                    ),
                });
            }
            let certificate = if d.device_id == me.device_id() {
                new.certificate().clone()
            } else {
                let key = mls_rs::crypto::SignaturePublicKey::new(d.signature_key.as_slice().to_vec());
                new.certify(crypto, d.device_id, &key, now)?
            };
            devices.push(DeviceRecord {
                device_id: d.device_id,
                signature_key: d.signature_key,
                certificate: B64(certificate.to_bytes()?),
            });
        }
        let update = KeySetUpdate { identity_key: B64(new.identity_public().to_vec()), devices };
        let request = serde_json::to_vec(&update).map_err(|e| ClientError::Bug(e.to_string()))?;
        self.store().write(|tx| {
            tx.set_meta(META_PENDING_IDENTITY, &new.to_secret_bytes()?)?;
            tx.set_meta(META_PENDING_KEY_SET, &request)?;
            tx.set_meta(META_PENDING_HANDOVER, &[1])?;
            tx.delete_meta(META_ROTATION_DUE)
        })?;
        self.finish_pending_switch().await
    }

    /// Sends the new identity key pair to the account's other devices in
    /// the conversation of its own devices, which must hold exactly this
    /// device and the other devices of `update` (it is made, or devices
    /// no longer listed are removed from it, first).
    async fn hand_over(&self, new: &DeviceIdentity, update: &KeySetUpdate) -> Result<(), ClientError> {
        let me = self.identity().address();
        let others: Vec<DeviceAddress> = update
            .devices
            .iter()
            .filter(|d| d.device_id != me.device)
            .map(|d| DeviceAddress { handle: self.handle().clone(), device: d.device_id })
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        let conversation = match self.own_conversation()? {
            Some(id) => id,
            None => self.create_own_conversation().await?,
        };
        let members: Vec<DeviceAddress> =
            self.engine().members(&conversation)?.into_iter().map(|m| m.address).filter(|a| *a != me).collect();
        let gone: Vec<DeviceAddress> = members.iter().filter(|a| !others.contains(a)).cloned().collect();
        if !gone.is_empty() {
            let change = StagedChange::Remove { devices: gone, notify: false };
            self.commit_with_retry(&conversation, change, None).await?;
        }
        // Never encrypt the key to a device that is not one of the listed
        // ones (a removal still pending, a device the server slipped in).
        let members: Vec<DeviceAddress> =
            self.engine().members(&conversation)?.into_iter().map(|m| m.address).filter(|a| *a != me).collect();
        if members.iter().any(|a| !others.contains(a)) {
            return Err(ClientError::Pending(
                "the new identity key waits until the removed device is out of this account's own conversation; \
                 the next subrosa command goes on"
                    .into(),
            ));
        }
        let handover = IdentityHandover {
            identity_public: new.identity_public().to_vec(),
            identity_secret: new.identity_secret_bytes(),
            certificates: update.devices.iter().map(|d| (d.device_id.0, d.certificate.as_slice().to_vec())).collect(),
        };
        self.post_content_now(conversation, Body::IdentityKey(handover), None).await
    }

    /// Encrypts `body` at the conversation's current epoch (numbered in this
    /// device's sequence, the ratchet state stored before anything leaves)
    /// and posts it at once, outside the outbox and history: for content the
    /// user never sees, such as an identity key handover.
    pub(crate) async fn post_content_now(
        &self,
        conversation: ConversationId,
        body: Body,
        kt_head: Option<Vec<u8>>,
    ) -> Result<(), ClientError> {
        let request = self.store().write(|tx| {
            let seq = tx.next_seq(&conversation)?;
            let content = Content { message_id: MessageId(rand::random()), sent_at_ms: now_ms(), body, seq, kt_head };
            let (ciphertext, recipients) = self.engine().encrypt(&conversation, &content)?;
            Ok(SendRequest {
                conversation,
                send_id: SendId(rand::random()),
                commit: None,
                parts: vec![SendPart { kind: MessageKind::Application, recipients, ciphertext: B64(ciphertext) }],
                expires_at: None,
            })
        })?;
        let _: SendResponse = self.api.call(Method::POST, "/v1/messages", Some(&request)).await?;
        Ok(())
    }

    /// The active conversation of this account's own devices, if any.
    fn own_conversation(&self) -> Result<Option<ConversationId>, ClientError> {
        Ok(self.store().read(|tx| tx.active_conversations())?.into_iter().find(|r| r.kind == "own").map(|r| r.id))
    }

    async fn create_own_conversation(&self) -> Result<ConversationId, ClientError> {
        let (suite, key_packages) = self.claim_for_new(&[]).await?;
        let change = StagedChange::Create { kind: "own".into(), name: String::new(), peer: None, first: None };
        self.create_conversation(&ConversationInfo::own(), suite, &key_packages, change, None).await
    }

    /// Whether the directory lists `new`'s identity key and this device's
    /// certificate by it (a handed-over key is adopted only then).
    async fn handover_published(&self, new: &DeviceIdentity) -> Result<bool, ClientError> {
        let info: AccountInfo =
            self.api.call::<(), _>(Method::GET, &format!("/v1/accounts/{}", self.handle()), None).await?;
        self.kt_verify(self.handle(), info.identity_key.as_slice(), &info.devices, info.kt.as_ref()).await?;
        let own = new.certificate().to_bytes()?;
        Ok(info.identity_key.as_slice() == new.identity_public()
            && info.devices.iter().any(|d| d.device_id == new.device_id() && d.certificate.as_slice() == own))
    }
}

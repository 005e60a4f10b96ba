//! Several devices per account: linking a new one, listing and removing.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use subrosa_core::link::{check_fingerprint, link_code, parse_link_code, HistoryItem, PendingLink};
use subrosa_proto::{
    AccountInfo, AddDeviceRequest, ConversationId, DeviceAddress, DeviceId, DeviceRecord, Empty, ErrorCode, Handle,
    LinkApproveRequest, LinkCreateRequest, LinkCreated, LinkResponse, LinkSlot, B64,
};

use crate::store::{now_ms, OnDisk, Store, StoredMessage};
use crate::{net, ClientError, Subrosa, KEY_PACKAGE_TARGET, META_IDENTITY, META_SERVER};

/// How many recent messages per conversation a new device may be given.
const HISTORY_PER_CONVERSATION: usize = 200;

/// A device of this account, as the server lists it and this device checked it.
#[derive(Debug, Clone)]
pub struct DeviceEntry {
    /// Device id.
    pub id: DeviceId,
    /// Its signature key.
    pub key: Vec<u8>,
    /// True when its certificate is valid and by this account's identity key.
    pub certified: bool,
    /// True for the device running this.
    pub this_device: bool,
}

/// The outcome of approving a link.
#[derive(Debug, Clone)]
pub struct LinkApproved {
    /// The new device.
    pub device: DeviceId,
    /// Conversations it was added to.
    pub conversations: usize,
}

impl Subrosa {
    /// Links this new device (in a new store in `home`) to the existing
    /// account `handle`: publishes a link request, calls `on_code` with the
    /// code to show, and waits up to `timeout` for another device of the
    /// account to approve it.
    ///
    /// # Errors
    /// [`ClientError::AlreadyRegistered`], unknown handle, the code expiring
    /// unapproved, an approval that does not verify. On error nothing is left.
    pub async fn link_new(
        home: &Path,
        passphrase: &str,
        handle: &str,
        server: &str,
        with_history: bool,
        timeout: Duration,
        on_code: &mut dyn FnMut(&str),
    ) -> Result<Self, ClientError> {
        let handle = Handle::new(handle).map_err(|e| ClientError::Input(e.to_string()))?;
        net::check_server_url(server)?;
        if Store::exists(home) {
            return Err(ClientError::AlreadyRegistered(home.display().to_string()));
        }
        let existed = home.exists();
        let result = Self::link_new_inner(home, passphrase, handle, server, with_history, timeout, on_code).await;
        if result.is_err() {
            Store::remove_unfinished(home, existed);
        }
        result
    }

    async fn link_new_inner(
        home: &Path,
        passphrase: &str,
        handle: Handle,
        server: &str,
        with_history: bool,
        timeout: Duration,
        on_code: &mut dyn FnMut(&str),
    ) -> Result<Self, ClientError> {
        let crypto = subrosa_core::default_crypto();
        let pending = PendingLink::new(&crypto, &handle, with_history)?;
        let request = pending.request().to_bytes()?;
        let created: LinkCreated = net::call_unsigned(
            server,
            Method::POST,
            "/v1/links",
            Some(&LinkCreateRequest { handle: handle.clone(), request: B64(request.clone()) }),
        )
        .await
        .map_err(|e| match e.code() {
            Some(ErrorCode::UnknownHandle) => {
                ClientError::Input(format!("unknown handle {handle}: no such account on {server}"))
            }
            _ => e,
        })?;
        on_code(&link_code(created.link, &request));
        let path = format!("/v1/links/{}/response", created.link);
        let deadline = Instant::now() + timeout;
        let grant = loop {
            let r: Result<LinkResponse, ClientError> =
                net::call_unsigned::<(), _>(server, Method::GET, &path, None).await;
            match r {
                Ok(LinkResponse { response: Some(g) }) => break g,
                Ok(_) => {}
                Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                    return Err(ClientError::Input("the link code expired before a device approved it".into()))
                }
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Input(format!(
                    "no device approved the link within {} s; run `subrosa link` again",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let granted = pending.complete_grant(&crypto, grant.as_slice())?;
        let (identity, history) = (granted.identity, granted.history);
        let store = Store::create(home, passphrase)?;
        store.write(|tx| tx.set_meta(META_IDENTITY, &identity.to_secret_bytes()?))?;
        store.write(|tx| tx.set_meta(META_SERVER, server.as_bytes()))?;
        let me = Self::assemble(home, store, identity, server)?;
        // The directory key the approving device pinned; a grant without
        // one (an older approving device) pins on first use instead.
        if let Some(key) = granted.directory_key {
            me.pin_head_key(&crate::kt::HeadKey::from_bytes(&key)?)?;
        }
        me.store().write(|_| me.import_history(&history))?;
        me.upload_key_packages(KEY_PACKAGE_TARGET as usize, true).await?;
        Ok(me)
    }

    fn import_history(&self, items: &[HistoryItem]) -> Result<(), ClientError> {
        for it in items {
            let conv = ConversationId(it.conversation);
            let peer = (!it.peer.is_empty()).then_some(it.peer.as_str());
            // Known from the approving device's history only: the Welcome
            // that device sends for it is the one this device may join.
            self.store().write(|tx| tx.add_linked_conversation(&conv, &it.kind, &it.name, peer))?;
            let m = StoredMessage {
                id: hex::encode(&it.message_id),
                conversation: conv.to_hex(),
                target: peer.map(str::to_string).unwrap_or_else(|| it.name.clone()),
                group: it.kind == "group",
                from: it.from.clone(),
                device: it.device.clone(),
                sent_at: it.sent_at,
                received_at: now_ms(),
                text: it.text.clone(),
                outgoing: it.from == self.handle().as_str(),
                system: it.system,
                state: None,
                reason: None,
                event: None,
                ..StoredMessage::default()
            };
            self.store().write(|tx| tx.insert_message(&m, &conv, &it.message_id, true))?;
        }
        Ok(())
    }

    fn recent_history(&self) -> Result<Vec<HistoryItem>, ClientError> {
        let mut out = Vec::new();
        for row in self.store().read(|tx| tx.active_conversations())? {
            let msgs = self.store().read(|tx| tx.history(std::slice::from_ref(&row)))?;
            let skip = msgs.len().saturating_sub(HISTORY_PER_CONVERSATION);
            for m in msgs.into_iter().skip(skip) {
                out.push(HistoryItem {
                    conversation: row.id.0,
                    kind: row.kind.clone(),
                    name: row.name.clone(),
                    peer: row.peer.clone().unwrap_or_default(),
                    message_id: hex::decode(&m.id).unwrap_or_default(),
                    from: m.from,
                    device: m.device,
                    sent_at: m.sent_at,
                    text: m.text,
                    system: m.system,
                });
            }
        }
        Ok(out)
    }

    /// Approves a new device's link code: checks its keys against the code,
    /// certifies it, registers it with the server, sends it the account key
    /// (and recent history when it asked), then adds it to every conversation
    /// once it published key packages (waiting up to `timeout`).
    ///
    /// # Errors
    /// A malformed, wrong or expired code; a request altered by the server;
    /// network errors.
    pub async fn link_accept(&self, code: &str, timeout: Duration) -> Result<LinkApproved, ClientError> {
        let (link, fingerprint) = parse_link_code(code).map_err(|_| {
            ClientError::Input("that is not a link code: it has 26 letters and digits, like 0ABC1-…".into())
        })?;
        let slot: LinkSlot =
            self.api.call::<(), _>(Method::GET, &format!("/v1/links/{link}"), None).await.map_err(|e| {
                match e.code() {
                    Some(ErrorCode::NotFound) => ClientError::Input("unknown or expired link code".into()),
                    _ => e,
                }
            })?;
        check_fingerprint(slot.request.as_slice(), &fingerprint)?;
        let request = subrosa_core::link::LinkRequest::from_bytes(slot.request.as_slice())?;
        let history = if request.with_history { self.recent_history()? } else { Vec::new() };
        let directory_key = self.kt_head_key().await?.to_bytes();
        let (grant, cert) = self.identity().grant_link_with(
            self.engine().crypto(),
            slot.request.as_slice(),
            history,
            now_ms(),
            &directory_key,
        )?;
        let record = DeviceRecord {
            device_id: cert.device_id(),
            signature_key: B64(cert.device_key().to_vec()),
            certificate: B64(cert.to_bytes()?),
        };
        let _: AccountInfo =
            self.api.call(Method::POST, "/v1/devices", Some(&AddDeviceRequest { device: record })).await?;
        let _: Empty = self
            .api
            .call(
                Method::POST,
                &format!("/v1/links/{link}/approve"),
                Some(&LinkApproveRequest { response: B64(grant.to_vec()) }),
            )
            .await?;
        let conversations = self.add_own_device(cert.device_id(), timeout).await?;
        Ok(LinkApproved { device: cert.device_id(), conversations })
    }

    /// Adds a newly linked device of this account to every active conversation.
    async fn add_own_device(&self, device: DeviceId, timeout: Duration) -> Result<usize, ClientError> {
        self.sync().await?;
        let me = self.handle().clone();
        let address = DeviceAddress { handle: me.clone(), device };
        let deadline = Instant::now() + timeout;
        let mut added = 0;
        for row in self.store().read(|tx| tx.active_conversations())? {
            if self.engine().members(&row.id)?.iter().any(|m| m.address == address) {
                continue;
            }
            let suite = self.engine().suite(&row.id)?;
            let kp = loop {
                let claimed = self.claim_devices(&me, false, suite).await?;
                if let Some((_, kp)) = claimed.into_iter().find(|(d, _)| *d == device) {
                    break kp;
                }
                if Instant::now() >= deadline {
                    return Err(ClientError::Input(format!(
                        "the new device published no key packages within {} s; it was linked but joined {added} conversations",
                        timeout.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            };
            let change = subrosa_session::StagedChange::Add { key_packages: vec![B64(kp)] };
            if self.commit_with_retry(&row.id, change, Some("your new device joined".into())).await? {
                added += 1;
            }
        }
        Ok(added)
    }

    /// The safety number with `handle`, from the identity key this device
    /// has pinned for it (fetched and pinned on first use).
    ///
    /// # Errors
    /// Unknown handle, network errors.
    pub async fn safety_number(&self, handle: &str) -> Result<String, ClientError> {
        let handle = Handle::new(handle.trim_start_matches('@')).map_err(|e| ClientError::Input(e.to_string()))?;
        if handle == *self.handle() {
            return Err(ClientError::Input("a safety number is between you and someone else".into()));
        }
        let key = match self.store().read(|tx| tx.contact_key(handle.as_str()))? {
            Some(k) => k,
            None => {
                let info: AccountInfo =
                    self.api.call::<(), _>(Method::GET, &format!("/v1/accounts/{handle}"), None).await.map_err(
                        |e| match e.code() {
                            Some(ErrorCode::UnknownHandle) => ClientError::Input(format!("unknown handle {handle}")),
                            _ => e,
                        },
                    )?;
                self.kt_verify(&handle, info.identity_key.as_slice(), &info.devices, info.kt.as_ref()).await?;
                self.store().write(|tx| tx.pin_contact(handle.as_str(), info.identity_key.as_slice()))?;
                info.identity_key.into_inner()
            }
        };
        Ok(subrosa_core::safety::safety_number((self.handle(), self.identity().identity_public()), (&handle, &key)))
    }

    /// Marks `handle` verified after the user compared safety numbers.
    ///
    /// # Errors
    /// Unknown contact.
    pub fn mark_verified(&self, handle: &str) -> Result<(), ClientError> {
        let handle = Handle::new(handle.trim_start_matches('@')).map_err(|e| ClientError::Input(e.to_string()))?;
        if self.store().read(|tx| tx.contact_key(handle.as_str()))?.is_none() {
            return Err(ClientError::Input(format!("{handle} is not a contact yet")));
        }
        self.store().write(|tx| tx.set_verified(handle.as_str(), true))
    }

    /// Marks `handle` verified if `compared` is the safety number with them,
    /// in one transaction with reading the key it is computed from: a key
    /// that changes in between is never marked verified under the old
    /// number. Whitespace in `compared` does not count.
    ///
    /// # Errors
    /// [`ClientError::Input`] for another number (nothing is marked); as
    /// [`Self::safety_number`].
    pub async fn verify_safety_number(&self, handle: &str, compared: &str) -> Result<(), ClientError> {
        // Pins the key first when it is not known yet (needs the server).
        self.safety_number(handle).await?;
        let handle = Handle::new(handle.trim_start_matches('@')).map_err(|e| ClientError::Input(e.to_string()))?;
        let digits = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
        let identity = self.identity();
        let mine = (self.handle(), identity.identity_public());
        self.store().write(|tx| {
            let key = tx
                .contact_key(handle.as_str())?
                .ok_or_else(|| ClientError::Input(format!("{handle} is not a contact yet")))?;
            let number = subrosa_core::safety::safety_number(mine, (&handle, &key));
            if digits(&number) != digits(compared) {
                return Err(ClientError::Input("not verified: that is not the safety number with this contact".into()));
            }
            tx.set_verified(handle.as_str(), true)
        })
    }

    /// Whether `handle` is a verified contact.
    ///
    /// # Errors
    /// Store errors.
    pub fn is_verified(&self, handle: &str) -> Result<bool, ClientError> {
        Ok(self.store().read(|tx| tx.contacts())?.iter().any(|c| c.handle == handle && c.verified))
    }

    /// This account's devices as the server lists them, each certificate
    /// checked against this account's identity key.
    ///
    /// # Errors
    /// Network errors.
    pub async fn devices(&self) -> Result<Vec<DeviceEntry>, ClientError> {
        let info: AccountInfo =
            self.api.call::<(), _>(Method::GET, &format!("/v1/accounts/{}", self.handle()), None).await?;
        self.kt_verify(self.handle(), info.identity_key.as_slice(), &info.devices, info.kt.as_ref()).await?;
        Ok(info
            .devices
            .into_iter()
            .map(|d| {
                let certified = self.is_certified(&d, self.identity().identity_public(), self.handle());
                DeviceEntry {
                    id: d.device_id,
                    key: d.signature_key.into_inner(),
                    certified,
                    this_device: d.device_id == self.identity().device_id(),
                }
            })
            .collect())
    }

    /// Removes a device of this account: revokes it on the server first (from
    /// then on it can neither send, commit nor receive, and it leaves every
    /// conversation's roster there), then commits its removal in each
    /// conversation. Returns the number of conversations. Run again after a
    /// lost answer, it finishes the work (a device already revoked but still
    /// in a conversation is removed from it).
    ///
    /// # Errors
    /// Unknown device, this device, network errors; [`ClientError::Pending`]
    /// when a removal commit's answer is missing (the next command completes
    /// it); the first failed removal commit, after trying every conversation.
    pub async fn remove_device(&self, id: &str) -> Result<usize, ClientError> {
        let device: DeviceId = id.parse().map_err(|_| ClientError::Input(format!("invalid device id {id:?}")))?;
        if device == self.identity().device_id() {
            return Err(ClientError::Input("this is the device you are using; remove it from another device".into()));
        }
        let address = DeviceAddress { handle: self.handle().clone(), device };
        let on_server = self.devices().await?.iter().any(|d| d.id == device);
        let in_conversation = |row: &crate::store::ConversationRow| -> Result<bool, ClientError> {
            Ok(self.engine().members(&row.id)?.iter().any(|m| m.address == address))
        };
        let mut known_here = false;
        for row in self.store().read(|tx| tx.active_conversations())? {
            known_here |= in_conversation(&row)?;
        }
        if !on_server && !known_here {
            return Err(ClientError::Input(format!("no device {device} in this account (see `subrosa devices`)")));
        }
        if on_server {
            // Revocation first: a stolen device that keeps committing could
            // otherwise win every epoch and never get removed.
            let _: AccountInfo = self.api.call::<(), _>(Method::DELETE, &format!("/v1/devices/{device}"), None).await?;
        }
        self.sync().await?;
        // It held the account's identity key: a new one is due for the
        // devices that remain (started below, or by the next command).
        self.store().write(|tx| tx.set_meta(crate::keys::META_ROTATION_DUE, &[1]))?;
        let mut n = 0;
        let mut first_error = None;
        let mut pending = None;
        for row in self.store().read(|tx| tx.active_conversations())? {
            if !in_conversation(&row)? {
                continue;
            }
            // The revoked device is no longer known to the server: it does
            // not get the commit.
            let change = subrosa_session::StagedChange::Remove { devices: vec![address.clone()], notify: false };
            match self.commit_with_retry(&row.id, change, Some("you removed a device".into())).await {
                Ok(true) => n += 1,
                Ok(false) => {}
                // Stored: the next command completes it; the other
                // conversations are staged (and stored) all the same.
                Err(e @ ClientError::Pending(_)) => pending = Some(e),
                Err(e) => {
                    first_error.get_or_insert(ClientError::Protocol(format!(
                        "the device is revoked, but removing it from conversation #{} failed: {e}",
                        row.id.to_hex()
                    )));
                }
            }
        }
        match (first_error, pending) {
            (Some(ClientError::Protocol(text)), Some(_)) => Err(ClientError::Protocol(format!(
                "{text} (the removals from other conversations are stored; the next command completes them)"
            ))),
            (Some(e), _) | (None, Some(e)) => Err(e),
            (None, None) => {
                // The removed device held the account's identity key: a new
                // one for the devices that remain, so nothing it certifies
                // is accepted any more (contacts see a key change).
                self.finish_key_switch().await?;
                Ok(n)
            }
        }
    }
}

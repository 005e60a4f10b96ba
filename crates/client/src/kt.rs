//! Key transparency on the client: every set of keys the server hands out
//! for a handle must be what the server's auditable key directory (akd)
//! publishes for it, and every directory root this device sees must lie on
//! one append-only chain.
//!
//! - A lookup proof comes with every key fetch (claims and account
//!   answers). It is verified against its epoch's root with the directory's
//!   VRF key, pinned on first use, and its value must be
//!   [`directory_value`] of exactly the keys offered. It also carries the
//!   server's [`SignedHead`] for that epoch, checked against the
//!   head-signing key pinned at registration (or passed on when linking).
//! - What those answers mean (the chain of roots, gossiped heads, proven
//!   forks) is decided by the session (`subrosa_session::directory`); this
//!   module fetches, verifies akd's proofs and hands the results over.
//! - At each sync the device looks up its own handle and raises an alert
//!   when the directory lists an identity key or a device that is not this
//!   account's.

use akd::{AkdLabel, AppendOnlyProof, Digest, SingleAppendOnlyProof};
use protobuf::Message;
use reqwest::Method;
use subrosa_proto::kt::{directory_value, KtAudit, KtHead, KtLookup, SignedHead, AKD_DOMAIN_LABEL, MAX_AUDIT_EPOCHS};
use subrosa_proto::{AccountInfo, DeviceRecord, Handle};

use crate::store::Alert;
use crate::{ClientError, Subrosa};

/// The akd configuration Subrosa's directory uses.
pub type KtConfig = akd::ExperimentalConfiguration<SubrosaLabel>;

/// Subrosa's akd domain label.
#[derive(Debug, Clone, Copy)]
pub struct SubrosaLabel;

impl akd::DomainLabel for SubrosaLabel {
    fn domain_label() -> &'static [u8] {
        AKD_DOMAIN_LABEL
    }
}

const META_KT_VRF: &str = "kt_vrf_key";
pub use subrosa_session::UNSUPPORTED_TEXT;

fn digest(b: &[u8], what: &str) -> Result<Digest, ClientError> {
    Digest::try_from(b).map_err(|_| ClientError::Protocol(format!("{what}: not a 32-byte hash")))
}

use subrosa_session::directory::{directory_refused, ChainStep, GossipStep, ServerHeadAnswer, META_KT_HEAD_KEY};
pub use subrosa_session::directory::{ForkProof, HeadKey, THE_SERVER};

/// Decodes a signed head and checks its signature under `key` and that it
/// names `key`'s directory (the session's rule, on this build's provider).
///
/// # Errors
/// A one-line reason when it is malformed, of another directory, or not
/// validly signed.
pub fn verify_signed_head(key: &HeadKey, bytes: &[u8]) -> Result<SignedHead, String> {
    subrosa_session::directory::verify_signed_head(&subrosa_core::default_crypto(), key, bytes)
}

/// Checks a fork proof (see [`ForkProof::verify`]) on this build's provider.
///
/// # Errors
/// A one-line reason when it does not prove a fork.
pub fn verify_fork_proof(proof: &ForkProof) -> Result<(), String> {
    proof.verify(&subrosa_core::default_crypto())
}

/// Decodes and checks append-only proofs for epochs `from..=to` that start
/// at `start` (the root this side knows for `from`). Returns the roots.
///
/// # Errors
/// [`ClientError::Protocol`] for malformed answers, [`ClientError::KeyMismatch`]
/// (with handle `directory`) when a proof does not verify.
pub async fn verify_audit(audit: &KtAudit, from: u64, to: u64) -> Result<Vec<Digest>, ClientError> {
    if audit.from != from || audit.to != to || to <= from {
        return Err(ClientError::Protocol(format!(
            "directory audit: asked for epochs {from}..{to}, got {}..{}",
            audit.from, audit.to
        )));
    }
    let n = (to - from) as usize;
    if audit.root_hashes.len() != n + 1 || audit.proofs.len() != n {
        return Err(ClientError::Protocol("directory audit: wrong number of roots or proofs".into()));
    }
    let roots =
        audit.root_hashes.iter().map(|r| digest(r.as_slice(), "directory root")).collect::<Result<Vec<_>, _>>()?;
    let mut proofs = Vec::with_capacity(n);
    for p in &audit.proofs {
        let spec = akd::proto::specs::types::SingleAppendOnlyProof::parse_from_bytes(p.as_slice())
            .map_err(|_| ClientError::Protocol("directory audit: undecodable proof".into()))?;
        proofs.push(
            SingleAppendOnlyProof::try_from(&spec)
                .map_err(|_| ClientError::Protocol("directory audit: malformed proof".into()))?,
        );
    }
    let proof = AppendOnlyProof { proofs, epochs: (from..to).collect() };
    akd::auditor::audit_verify::<KtConfig>(roots.clone(), proof).await.map_err(|e| ClientError::KeyMismatch {
        handle: "the key directory".into(),
        why: format!("epochs {from}..{to} are not append-only: {e}"),
    })?;
    Ok(roots)
}

/// Verifies, without state, that `lookup` proves `handle` maps to
/// [`directory_value`] of exactly `identity_key` and `devices` under the
/// directory's VRF key. Returns the proof's epoch and root.
///
/// # Errors
/// [`ClientError::KeyMismatch`] when the proof is missing, malformed, does
/// not verify, or vouches for other keys.
pub fn verify_lookup(
    vrf_public_key: &[u8],
    handle: &Handle,
    identity_key: &[u8],
    devices: &[DeviceRecord],
    lookup: Option<&KtLookup>,
) -> Result<(u64, Digest), ClientError> {
    let lookup = lookup.ok_or_else(|| ClientError::KeyMismatch {
        handle: handle.to_string(),
        why: "the server sent no key-directory proof for them".into(),
    })?;
    verify_lookup_value(vrf_public_key, handle, lookup, &directory_value(identity_key, devices))
}

/// As [`verify_lookup`], for a directory value given as bytes.
///
/// # Errors
/// As [`verify_lookup`].
pub fn verify_lookup_value(
    vrf_public_key: &[u8],
    handle: &Handle,
    lookup: &KtLookup,
    expected_value: &[u8],
) -> Result<(u64, Digest), ClientError> {
    let refused = |why: String| ClientError::KeyMismatch { handle: handle.to_string(), why };
    let root = digest(lookup.root_hash.as_slice(), "directory root")?;
    let spec = akd::proto::specs::types::LookupProof::parse_from_bytes(lookup.proof.as_slice())
        .map_err(|_| refused("undecodable key-directory proof".into()))?;
    let proof = akd::LookupProof::try_from(&spec).map_err(|_| refused("malformed key-directory proof".into()))?;
    let label = AkdLabel(handle.as_str().as_bytes().to_vec());
    let result = akd::client::lookup_verify::<KtConfig>(vrf_public_key, root, lookup.epoch, label, proof)
        .map_err(|e| refused(format!("the key-directory proof does not verify: {e}")))?;
    if result.value.0 != expected_value {
        return Err(refused("the key directory lists other keys for them than the server offered".into()));
    }
    Ok((lookup.epoch, root))
}

impl Subrosa {
    /// The directory's current head (unsigned request, as anyone may ask).
    pub(crate) async fn kt_head(&self) -> Result<KtHead, ClientError> {
        self.api.call::<(), _>(Method::GET, "/v1/kt/head", None).await
    }

    /// The directory's VRF public key, pinned the first time it is needed.
    async fn kt_vrf_key(&self) -> Result<Vec<u8>, ClientError> {
        if let Some(k) = self.store().read(|tx| tx.meta(META_KT_VRF))? {
            return Ok(k.to_vec());
        }
        let head = self.kt_head().await?;
        self.store().write(|tx| tx.set_meta(META_KT_VRF, head.vrf_public_key.as_slice()))?;
        Ok(head.vrf_public_key.into_inner())
    }

    /// The directory's head-signing key: pinned at registration (homes made
    /// before signed heads pin it on first use), passed on when linking.
    ///
    /// # Errors
    /// Network errors; [`ClientError::Protocol`] when the server does not
    /// sign its heads or its head does not verify under its own key.
    pub async fn kt_head_key(&self) -> Result<HeadKey, ClientError> {
        if let Some(k) = self.store().read(|tx| tx.meta(META_KT_HEAD_KEY))? {
            return HeadKey::from_bytes(&k);
        }
        let head = self.kt_head().await?;
        // Pinned on first use, like the VRF key.
        let (Some(key), Some(signed)) = (head.signing_key.as_ref(), head.signed.as_ref()) else {
            return Err(ClientError::Protocol("the server does not sign its key-directory heads".into()));
        };
        let key: [u8; 32] = key
            .as_slice()
            .try_into()
            .map_err(|_| ClientError::Protocol("the head-signing key is not 32 bytes".into()))?;
        let decoded = SignedHead::decode(signed.as_slice()).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let pinned = HeadKey { key, directory_id: decoded.directory_id };
        verify_signed_head(&pinned, signed.as_slice()).map_err(ClientError::Protocol)?;
        self.pin_head_key(&pinned)?;
        Ok(pinned)
    }

    /// The newest signed head this device holds, to tell other members.
    pub(crate) fn kt_latest(&self) -> Result<Option<Vec<u8>>, ClientError> {
        self.store().read(|tx| tx.kt_newest_signed_head())
    }

    /// Checks that the directory vouches for exactly these keys of `handle`,
    /// under a head the server signed.
    pub(crate) async fn kt_verify(
        &self,
        handle: &Handle,
        identity_key: &[u8],
        devices: &[DeviceRecord],
        lookup: Option<&KtLookup>,
    ) -> Result<(), ClientError> {
        self.kt_blocked()?;
        let vrf = self.kt_vrf_key().await?;
        let key = self.kt_head_key().await?;
        let (epoch, root) = verify_lookup(&vrf, handle, identity_key, devices, lookup)?;
        let signed = lookup.and_then(|l| l.signed_head.as_ref()).ok_or_else(|| {
            directory_refused(format!("the server sent no signed head for epoch {epoch} with the keys of {handle}"))
        })?;
        let head = verify_signed_head(&key, signed.as_slice())
            .map_err(|why| directory_refused(format!("the server's head for epoch {epoch}: {why}")))?;
        if head.epoch != epoch || head.root != root.as_ref() || head.vrf_public_key.as_slice() != vrf.as_slice() {
            return Err(directory_refused(format!(
                "the server's signed head does not match its proof at epoch {epoch}"
            )));
        }
        self.kt_accept_server_head(&head, signed.as_slice(), None).await
    }

    /// Takes a head the server signed into this device's view (the
    /// session's rules), fetching and verifying the append-only proofs that
    /// join a new epoch to the chain. `for_member`: the member whose
    /// gossiped head made us ask (for the alert's wording).
    async fn kt_accept_server_head(
        &self,
        head: &SignedHead,
        bytes: &[u8],
        for_member: Option<&str>,
    ) -> Result<(), ClientError> {
        let refused = |e: ClientError| -> ClientError {
            match e {
                ClientError::KeyMismatch { why, .. } => {
                    self.kt_chain_refused(head.epoch, &why, for_member).unwrap_or_else(|e| e)
                }
                e => e,
            }
        };
        let (start, end) = match self.kt_server_head(head, bytes).map_err(refused)? {
            ChainStep::Audit { start, end } => (start, end),
            _ => return Ok(()),
        };
        let root = head.root;
        let roots = self.kt_fetch_roots(start, end).await.map_err(refused)?;
        self.kt_extend_chain(head.epoch, &root, start, &roots).map_err(refused)?;
        self.kt_keep_head(head.epoch, bytes)
    }

    /// The roots of epochs `start..=end`, linked by append-only proofs the
    /// server sends (verified here, in chunks).
    ///
    /// # Errors
    /// [`ClientError::KeyMismatch`] when a proof does not verify or chunks
    /// do not join; network errors.
    async fn kt_fetch_roots(&self, start: u64, end: u64) -> Result<Vec<Digest>, ClientError> {
        let mut roots: Vec<Digest> = Vec::new();
        let mut from = start;
        while from < end {
            let to = end.min(from + MAX_AUDIT_EPOCHS);
            let audit: KtAudit =
                self.api.call::<(), _>(Method::GET, &format!("/v1/kt/audit?from={from}&to={to}"), None).await?;
            let chunk = verify_audit(&audit, from, to).await?;
            if let Some(&prev) = roots.last() {
                if chunk.first() != Some(&prev) {
                    return Err(directory_refused(format!("epoch {from} has two roots in the server's proofs")));
                }
                roots.extend_from_slice(&chunk[1..]);
            } else {
                roots = chunk;
            }
            from = to;
        }
        Ok(roots)
    }

    /// Checks the heads other members' messages carried (one per member,
    /// its newest). Findings are alerts, not errors: receiving goes on.
    pub(crate) async fn kt_check_gossip(&self) -> Result<(), ClientError> {
        for (source, bytes) in self.store().read(|tx| tx.kt_head_gossip())? {
            // Pinned before any head is judged.
            self.kt_head_key().await?;
            match self.kt_check_one(&source, &bytes).await {
                Ok(()) | Err(ClientError::DirectoryFork(_)) | Err(ClientError::KeyMismatch { .. }) => {
                    self.store().write(|tx| tx.drop_kt_head_gossip(&source, &bytes))?
                }
                // The server could not be asked now: checked at a later sync.
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn kt_check_one(&self, source: &str, bytes: &[u8]) -> Result<(), ClientError> {
        let head = match self.kt_gossip_step(source, bytes)? {
            GossipStep::AskServer(head) => head,
            _ => return Ok(()),
        };
        // Ask the server for its own signed head of that epoch.
        let path = format!("/v1/kt/head?epoch={}", head.epoch);
        let answer = match self.api.call::<(), KtHead>(Method::GET, &path, None).await {
            Ok(KtHead { signed: Some(s), .. }) => ServerHeadAnswer::Signed(s.into_inner()),
            Ok(_) => ServerHeadAnswer::Unsigned,
            Err(ClientError::Server { status, body }) if status < 500 => {
                // The server's words, kept to one line of printable text.
                ServerHeadAnswer::Refused(body.message.chars().filter(|c| !c.is_control()).take(200).collect())
            }
            Err(e) => return Err(e),
        };
        let (server_head, theirs) = self.kt_gossip_with_server_head(source, &head, bytes, answer)?;
        self.kt_accept_server_head(&server_head, &theirs, Some(source)).await
    }

    /// Looks up this account in the directory and alerts when it lists an
    /// identity key or a device that none of this account's devices made.
    pub(crate) async fn kt_monitor_self(&self) -> Result<(), ClientError> {
        let me = self.handle().clone();
        let info: AccountInfo = self.api.call::<(), _>(Method::GET, &format!("/v1/accounts/{me}"), None).await?;
        if let Err(e) = self.kt_verify(&me, info.identity_key.as_slice(), &info.devices, info.kt.as_ref()).await {
            return match e {
                ClientError::KeyMismatch { why, .. } => {
                    self.store().write(|tx| {
                        tx.add_alert_about(
                    THE_SERVER,
                    &format!("the server's answer about this account ({me}) is not what its key directory says: {why}"),
                    None,
                )
                    })
                }
                // Already recorded and alerted; receiving goes on.
                ClientError::DirectoryFork(_) => Ok(()),
                e => Err(e),
            };
        }
        self.kt_check_own_listing(info.identity_key.as_slice(), &info.devices)
    }

    /// Alerts not shown yet (directory forks, ghost devices, …).
    ///
    /// # Errors
    /// Store errors.
    pub fn take_alerts(&self) -> Result<Vec<String>, ClientError> {
        self.store().write(|tx| tx.take_alerts())
    }

    /// Every alert not cleared, oldest first.
    ///
    /// # Errors
    /// Store errors.
    pub fn alerts(&self) -> Result<Vec<Alert>, ClientError> {
        self.store().read(|tx| tx.alerts())
    }

    /// The proof of the newest proven fork not cleared (JSON), if any.
    ///
    /// # Errors
    /// Store errors.
    pub fn fork_proof(&self) -> Result<Option<String>, ClientError> {
        Ok(self.store().read(|tx| tx.alerts())?.into_iter().rev().find_map(|a| a.proof))
    }

    /// Clears alerts. A proven fork is cleared only with `forks` (the user
    /// confirmed): sending is allowed again, and the same fork is not raised
    /// again. Returns how many were cleared and how many forks remain.
    ///
    /// # Errors
    /// Store errors.
    pub fn clear_alerts(&self, forks: bool) -> Result<(usize, usize), ClientError> {
        let cleared = self.store().write(|tx| tx.clear_alerts(forks))?;
        let remaining = self.store().read(|tx| tx.alerts())?.iter().filter(|a| a.fork).count();
        Ok((cleared, remaining))
    }
}

/// What [`audit`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// The first epoch checked.
    pub from: u64,
    /// The server's current epoch, the last one checked.
    pub to: u64,
    /// The root hash of `to`.
    pub root: Digest,
}

/// Checks, for anyone, that the server's key directory only ever grew:
/// fetches append-only proofs for every pair of consecutive epochs from
/// `from` (default 1) to the current one and verifies each. `on_chunk`
/// hears the last epoch verified so far.
///
/// # Errors
/// [`ClientError::KeyMismatch`] on the first proof that does not verify,
/// network and protocol errors.
pub async fn audit(server: &str, from: Option<u64>, on_chunk: &mut dyn FnMut(u64)) -> Result<AuditReport, ClientError> {
    let head: KtHead = crate::net::call_unsigned::<(), _>(server, Method::GET, "/v1/kt/head", None).await?;
    let first = from.unwrap_or(1).max(1);
    if first > head.epoch {
        return Err(ClientError::Input(format!(
            "nothing to audit: the directory is at epoch {} (asked to start at {first})",
            head.epoch
        )));
    }
    let head_root = digest(head.root_hash.as_slice(), "directory root")?;
    let mut last: Option<Digest> = None;
    let mut at = first;
    while at < head.epoch {
        let to = head.epoch.min(at + MAX_AUDIT_EPOCHS);
        let path = format!("/v1/kt/audit?from={at}&to={to}");
        let answer: KtAudit = crate::net::call_unsigned::<(), _>(server, Method::GET, &path, None).await?;
        let roots = verify_audit(&answer, at, to).await?;
        if let Some(prev) = last {
            if roots.first() != Some(&prev) {
                return Err(ClientError::KeyMismatch {
                    handle: "the key directory".into(),
                    why: format!("epoch {at} has two different roots in consecutive answers"),
                });
            }
        }
        last = roots.last().copied();
        at = to;
        on_chunk(at);
    }
    if let Some(l) = last {
        if l != head_root {
            return Err(ClientError::KeyMismatch {
                handle: "the key directory".into(),
                why: format!("the head's root for epoch {} is not the one its proofs lead to", head.epoch),
            });
        }
    }
    Ok(AuditReport { from: first, to: head.epoch, root: head_root })
}

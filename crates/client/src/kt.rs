//! Key transparency on the client: every set of keys the server hands out
//! for a handle must be what the server's auditable key directory (akd)
//! publishes for it, and every directory root this device sees must lie on
//! one append-only chain.
//!
//! - A lookup proof comes with every key fetch (claims and account
//!   answers). It is verified against its epoch's root with the directory's
//!   VRF key, pinned on first use, and its value must be
//!   [`directory_value`] of exactly the keys offered.
//! - The roots this device has verified are stored. A root for a new epoch
//!   is accepted only with append-only proofs from the newest one stored; a
//!   root for a known epoch must equal the stored one. Anything else means
//!   the server showed different directories: a fork.
//! - Each message carries the sender's newest verified head; receivers
//!   check it the same way, so a server showing two members different views
//!   is caught when they talk.
//! - At each sync the device looks up its own handle and raises an alert
//!   when the directory lists an identity key or a device that is not this
//!   account's.
//!
//! A detected fork is recorded and blocks every send from this device.

use akd::{AkdLabel, AppendOnlyProof, Digest, SingleAppendOnlyProof};
use protobuf::Message;
use reqwest::Method;
use subrosa_proto::kt::{directory_value, KtAudit, KtHead, KtLookup, AKD_DOMAIN_LABEL, MAX_AUDIT_EPOCHS};
use subrosa_proto::{AccountInfo, DeviceRecord, Handle};

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
const META_KT_FORK: &str = "kt_fork";

fn digest(b: &[u8], what: &str) -> Result<Digest, ClientError> {
    Digest::try_from(b).map_err(|_| ClientError::Protocol(format!("{what}: not a 32-byte hash")))
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
    /// The directory's current head (unsigned, as anyone may ask).
    pub(crate) async fn kt_head(&self) -> Result<KtHead, ClientError> {
        self.api.call::<(), _>(Method::GET, "/v1/kt/head", None).await
    }

    /// Fails when this device has detected a directory fork.
    pub(crate) fn kt_blocked(&self) -> Result<(), ClientError> {
        match self.store.meta(META_KT_FORK)? {
            Some(why) => Err(ClientError::DirectoryFork(String::from_utf8_lossy(&why).into_owned())),
            None => Ok(()),
        }
    }

    /// The directory's VRF public key, pinned the first time it is needed.
    async fn kt_vrf_key(&self) -> Result<Vec<u8>, ClientError> {
        if let Some(k) = self.store.meta(META_KT_VRF)? {
            return Ok(k.to_vec());
        }
        let head = self.kt_head().await?;
        self.store.set_meta(META_KT_VRF, head.vrf_public_key.as_slice())?;
        Ok(head.vrf_public_key.into_inner())
    }

    /// The newest head this device verified, to tell other members.
    pub(crate) fn kt_latest(&self) -> Result<Option<(u64, [u8; 32])>, ClientError> {
        let Some((_, hi)) = self.store.kt_range()? else { return Ok(None) };
        Ok(self.store.kt_root(hi)?.and_then(|r| <[u8; 32]>::try_from(r.as_slice()).ok()).map(|r| (hi, r)))
    }

    /// Checks that the directory vouches for exactly these keys of `handle`.
    pub(crate) async fn kt_verify(
        &self,
        handle: &Handle,
        identity_key: &[u8],
        devices: &[DeviceRecord],
        lookup: Option<&KtLookup>,
    ) -> Result<(), ClientError> {
        self.kt_blocked()?;
        let vrf = self.kt_vrf_key().await?;
        let (epoch, root) = verify_lookup(&vrf, handle, identity_key, devices, lookup)?;
        self.kt_track(epoch, root, None).await
    }

    /// Makes sure `(epoch, root)` lies on the one chain this device has
    /// seen, fetching append-only proofs to reach it. `reported_by` names
    /// the member whose message carried it (None: the server's own answer).
    pub(crate) async fn kt_track(
        &self,
        epoch: u64,
        root: Digest,
        reported_by: Option<&str>,
    ) -> Result<(), ClientError> {
        let Some((lo, hi)) = self.store.kt_range()? else {
            // First sight: trusted on first use, like the VRF key.
            return self.store.put_kt_roots(epoch, &[root]);
        };
        let known = |e: u64| -> Result<Digest, ClientError> {
            let r = self.store.kt_root(e)?.ok_or_else(|| ClientError::Bug(format!("no stored root for epoch {e}")))?;
            digest(&r, "stored directory root")
        };
        let (start, end) = if epoch < lo { (epoch, lo) } else { (hi, epoch) };
        if (lo..=hi).contains(&epoch) {
            return if known(epoch)? == root { Ok(()) } else { self.kt_fork(epoch, reported_by) };
        }
        let mut roots = Vec::new();
        let mut from = start;
        while from < end {
            let to = end.min(from + MAX_AUDIT_EPOCHS);
            let audit: KtAudit =
                self.api.call::<(), _>(Method::GET, &format!("/v1/kt/audit?from={from}&to={to}"), None).await?;
            let chunk = match verify_audit(&audit, from, to).await {
                Ok(c) => c,
                Err(ClientError::KeyMismatch { .. }) => return self.kt_fork(epoch, reported_by),
                Err(e) => return Err(e),
            };
            if let Some(&prev) = roots.last() {
                if chunk.first() != Some(&prev) {
                    return self.kt_fork(epoch, reported_by);
                }
                roots.extend_from_slice(&chunk[1..]);
            } else {
                roots = chunk;
            }
            from = to;
        }
        // The chain must join ours at its known end and reach the new root.
        let joins = if epoch < lo { roots.last() == Some(&known(lo)?) } else { roots.first() == Some(&known(hi)?) };
        let reaches = if epoch < lo { roots.first() == Some(&root) } else { roots.last() == Some(&root) };
        if !joins || !reaches {
            return self.kt_fork(epoch, reported_by);
        }
        self.store.transaction(|| self.store.put_kt_roots(start, &roots))
    }

    /// Records a fork, alerts, and fails.
    fn kt_fork(&self, epoch: u64, reported_by: Option<&str>) -> Result<(), ClientError> {
        let why = match reported_by {
            Some(who) => format!(
                "the server showed {who} a different key directory at epoch {epoch} than it showed this device: \
                 it may be impersonating someone in your conversations"
            ),
            None => format!(
                "the server's key directory at epoch {epoch} does not extend the one this device saw before: \
                 it may be showing different people different keys"
            ),
        };
        self.store.transaction(|| {
            self.store.set_meta(META_KT_FORK, why.as_bytes())?;
            self.store.add_alert(&format!("{why}; sending is blocked on this device"))
        })?;
        Err(ClientError::DirectoryFork(why))
    }

    /// Checks the heads other members reported. A fork found this way is
    /// recorded and alerted, not returned: receiving goes on.
    pub(crate) async fn kt_check_gossip(&self) -> Result<(), ClientError> {
        for (epoch, root, source) in self.store.kt_gossip()? {
            match self.kt_track(epoch, root, Some(&source)).await {
                Ok(()) | Err(ClientError::DirectoryFork(_)) => self.store.drop_kt_gossip(epoch, &root, &source)?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Looks up this account in the directory and alerts when it lists an
    /// identity key or a device that none of this account's devices made.
    pub(crate) async fn kt_monitor_self(&self) -> Result<(), ClientError> {
        let me = self.handle().clone();
        let info: AccountInfo = self.api.call::<(), _>(Method::GET, &format!("/v1/accounts/{me}"), None).await?;
        if let Err(e) = self.kt_verify(&me, info.identity_key.as_slice(), &info.devices, info.kt.as_ref()).await {
            return match e {
                ClientError::KeyMismatch { why, .. } => self.store.add_alert(&format!(
                    "the server's answer about this account ({me}) is not what its key directory says: {why}"
                )),
                // Already recorded and alerted; receiving goes on.
                ClientError::DirectoryFork(_) => Ok(()),
                e => Err(e),
            };
        }
        let own_key = self.identity().identity_public();
        if info.identity_key.as_slice() != own_key {
            self.store.add_alert(&format!(
                "the key directory lists an identity key for {me} that is not this account's: \
                 the server may be impersonating you"
            ))?;
        }
        for d in &info.devices {
            if !self.is_certified(d, own_key, &me) {
                self.store.add_alert(&format!(
                    "the key directory lists a device {} for {me} that none of your devices added: \
                     the server may be adding a ghost device (it is refused and gets nothing)",
                    d.device_id.to_hex()
                ))?;
            }
        }
        Ok(())
    }

    /// Alerts not shown yet (directory forks, ghost devices, …).
    ///
    /// # Errors
    /// Store errors.
    pub fn take_alerts(&self) -> Result<Vec<String>, ClientError> {
        self.store.take_alerts()
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

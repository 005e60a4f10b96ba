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
//! - The roots this device has verified are stored, and every signed head
//!   it holds. A root for a new epoch is accepted only with append-only
//!   proofs from the newest one stored; a root for a known epoch must equal
//!   the stored one.
//! - Each message carries the sender's newest signed head. It is evidence,
//!   never a verdict: a head that is not validly signed is the sender's
//!   fault (dropped, an alert names them); a validly signed head this device
//!   cannot match needs the server's own signed head for that epoch and an
//!   append-only proof to it, and a refusal is recorded against the server;
//!   only two validly signed heads with one epoch and different roots prove
//!   a fork. Each member has at most one pending head (its newest).
//! - A proven fork is an alert with its proof (both signed heads); it
//!   blocks every send from this device until the user clears it.
//! - At each sync the device looks up its own handle and raises an alert
//!   when the directory lists an identity key or a device that is not this
//!   account's.

use akd::{AkdLabel, AppendOnlyProof, Digest, SingleAppendOnlyProof};
use aws_lc_rs::signature::{UnparsedPublicKey, ED25519};
use protobuf::Message;
use reqwest::Method;
use serde::{Deserialize, Serialize};
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
/// The pinned head-signing key (32 bytes) and directory id (16 bytes).
const META_KT_HEAD_KEY: &str = "kt_head_key";
/// How a fork's alert ends.
const FORK_BLOCKS: &str = "; sending is blocked on this device";
/// Whom an alert about the server concerns.
pub const THE_SERVER: &str = "the server";
pub use subrosa_session::UNSUPPORTED_TEXT;

fn digest(b: &[u8], what: &str) -> Result<Digest, ClientError> {
    Digest::try_from(b).map_err(|_| ClientError::Protocol(format!("{what}: not a 32-byte hash")))
}

/// The key that signs a directory's heads, and the directory's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadKey {
    /// Ed25519 public key.
    pub key: [u8; 32],
    /// The directory id every head it signs names.
    pub directory_id: [u8; 16],
}

impl HeadKey {
    /// 48 bytes: key, then directory id (as stored and passed on at linking).
    pub fn to_bytes(&self) -> Vec<u8> {
        [&self.key[..], &self.directory_id[..]].concat()
    }

    /// Reads [`HeadKey::to_bytes`].
    ///
    /// # Errors
    /// [`ClientError::Protocol`] for any other length.
    pub fn from_bytes(b: &[u8]) -> Result<Self, ClientError> {
        let bad = || ClientError::Protocol("a head-signing key is 48 bytes".into());
        if b.len() != 48 {
            return Err(bad());
        }
        Ok(HeadKey {
            key: b[..32].try_into().map_err(|_| bad())?,
            directory_id: b[32..].try_into().map_err(|_| bad())?,
        })
    }
}

/// Decodes a signed head and checks its signature under `key` and that it
/// names `key`'s directory.
///
/// # Errors
/// A one-line reason when it is malformed, of another directory, or not
/// validly signed.
pub fn verify_signed_head(key: &HeadKey, bytes: &[u8]) -> Result<SignedHead, String> {
    let head = SignedHead::decode(bytes).map_err(|e| e.to_string())?;
    if head.directory_id != key.directory_id {
        return Err("the head names another directory".into());
    }
    UnparsedPublicKey::new(&ED25519, key.key)
        .verify(&head.to_be_signed(), &head.signature)
        .map_err(|_| "the head's signature does not verify".to_string())?;
    Ok(head)
}

/// The proof of a fork that `subrosa alerts export` writes: two heads,
/// both validly signed by the directory's key, for one epoch with different
/// roots. Anyone holding the key can check it with [`ForkProof::verify`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForkProof {
    /// What this is.
    pub kind: String,
    /// The epoch both heads are for.
    pub epoch: u64,
    /// The head-signing public key (hex).
    pub signing_key: String,
    /// The directory id (hex).
    pub directory_id: String,
    /// The two signed heads (hex of [`SignedHead::encode`]).
    pub heads: [String; 2],
    /// Where each came from.
    pub sources: [String; 2],
}

impl ForkProof {
    /// Checks that the proof shows two different, validly signed heads for
    /// one epoch.
    ///
    /// # Errors
    /// A one-line reason when it does not.
    pub fn verify(&self) -> Result<(), String> {
        let hex32 = |s: &str| -> Result<Vec<u8>, String> { hex::decode(s).map_err(|e| e.to_string()) };
        let key = HeadKey::from_bytes(&[hex32(&self.signing_key)?, hex32(&self.directory_id)?].concat())
            .map_err(|e| e.to_string())?;
        let a = verify_signed_head(&key, &hex32(&self.heads[0])?)?;
        let b = verify_signed_head(&key, &hex32(&self.heads[1])?)?;
        if a.epoch != self.epoch || b.epoch != self.epoch {
            return Err("the heads are not for the proof's epoch".into());
        }
        if a.root == b.root {
            return Err("the heads do not conflict".into());
        }
        Ok(())
    }
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

/// A server answer that contradicts what this device verified before.
fn directory_refused(why: String) -> ClientError {
    ClientError::KeyMismatch { handle: "the key directory".into(), why }
}

impl Subrosa {
    /// The directory's current head (unsigned request, as anyone may ask).
    pub(crate) async fn kt_head(&self) -> Result<KtHead, ClientError> {
        self.api.call::<(), _>(Method::GET, "/v1/kt/head", None).await
    }

    /// Fails when this device holds a proven directory fork not cleared.
    pub(crate) fn kt_blocked(&self) -> Result<(), ClientError> {
        match self.store().read(|tx| tx.open_fork())? {
            Some(why) => Err(ClientError::DirectoryFork(why.trim_end_matches(FORK_BLOCKS).to_string())),
            None => Ok(()),
        }
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

    /// Pins a head-signing key (a new device, from the device that approved
    /// it). An already pinned key is kept.
    ///
    /// # Errors
    /// Store errors.
    pub fn pin_head_key(&self, key: &HeadKey) -> Result<(), ClientError> {
        if self.store().read(|tx| tx.meta(META_KT_HEAD_KEY))?.is_none() {
            self.store().write(|tx| tx.set_meta(META_KT_HEAD_KEY, &key.to_bytes()))?;
        }
        Ok(())
    }

    /// The pinned head-signing key, if any (no network).
    pub(crate) fn kt_pinned_head_key(&self) -> Result<Option<HeadKey>, ClientError> {
        self.store().read(|tx| tx.meta(META_KT_HEAD_KEY))?.map(|k| HeadKey::from_bytes(&k)).transpose()
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

    /// Takes a head the server signed into this device's view: a second
    /// head for a held epoch proves a fork; a new epoch must extend the
    /// chain of roots (append-only proofs). `for_member`: the member whose
    /// gossiped head made us ask (for the alert's wording).
    async fn kt_accept_server_head(
        &self,
        head: &SignedHead,
        bytes: &[u8],
        for_member: Option<&str>,
    ) -> Result<(), ClientError> {
        if let Some(held) = self.store().read(|tx| tx.kt_signed_head(head.epoch))? {
            if held == bytes {
                return Ok(());
            }
            if let Ok(key) = self.kt_head_key().await {
                if let Ok(h) = verify_signed_head(&key, &held) {
                    if h.root != head.root {
                        return self.kt_proven_fork(
                            head.epoch,
                            (&held, "held by this device"),
                            (bytes, "now sent by the server"),
                        );
                    }
                }
            }
            return Ok(());
        }
        let root = digest(&head.root, "directory root")?;
        match self.kt_track(head.epoch, root).await {
            Ok(()) => self.store().write(|tx| tx.put_kt_signed_head(head.epoch, bytes)),
            Err(ClientError::KeyMismatch { why, .. }) => {
                let asked = for_member.map(|m| format!(" (asked because of {m}'s head)")).unwrap_or_default();
                let text = format!(
                    "the server's key directory at epoch {} does not extend what this device saw before{asked}: {why}",
                    head.epoch
                );
                self.store().write(|tx| tx.add_alert_about(THE_SERVER, &text, None))?;
                Err(directory_refused(text))
            }
            Err(e) => Err(e),
        }
    }

    /// Makes sure `(epoch, root)` lies on the one chain of roots this device
    /// has seen, fetching append-only proofs to reach it.
    ///
    /// # Errors
    /// [`ClientError::KeyMismatch`] when it does not (the server's answers
    /// contradict each other); network errors.
    async fn kt_track(&self, epoch: u64, root: Digest) -> Result<(), ClientError> {
        let Some((lo, hi)) = self.store().read(|tx| tx.kt_range())? else {
            // First sight: trusted on first use, like the VRF key.
            return self.store().write(|tx| tx.put_kt_roots(epoch, &[root]));
        };
        let known = |e: u64| -> Result<Digest, ClientError> {
            let r = self
                .store()
                .read(|tx| tx.kt_root(e))?
                .ok_or_else(|| ClientError::Bug(format!("no stored root for epoch {e}")))?;
            digest(&r, "stored directory root")
        };
        let broken =
            || directory_refused(format!("the root of epoch {epoch} is not on the chain this device verified"));
        let (start, end) = if epoch < lo { (epoch, lo) } else { (hi, epoch) };
        if (lo..=hi).contains(&epoch) {
            return if known(epoch)? == root { Ok(()) } else { Err(broken()) };
        }
        let mut roots = Vec::new();
        let mut from = start;
        while from < end {
            let to = end.min(from + MAX_AUDIT_EPOCHS);
            let audit: KtAudit =
                self.api.call::<(), _>(Method::GET, &format!("/v1/kt/audit?from={from}&to={to}"), None).await?;
            let chunk = verify_audit(&audit, from, to).await?;
            if let Some(&prev) = roots.last() {
                if chunk.first() != Some(&prev) {
                    return Err(broken());
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
            return Err(broken());
        }
        self.store().write(|_| self.store().write(|tx| tx.put_kt_roots(start, &roots)))
    }

    /// Records a proven fork (two validly signed heads for one epoch with
    /// different roots) with its proof, alerts, and fails: sending is
    /// blocked until the user clears it.
    fn kt_proven_fork(&self, epoch: u64, a: (&[u8], &str), b: (&[u8], &str)) -> Result<(), ClientError> {
        let key = self.kt_pinned_head_key()?.ok_or_else(|| ClientError::Bug("a fork without a pinned key".into()))?;
        let proof = ForkProof {
            kind: "subrosa key-directory fork".into(),
            epoch,
            signing_key: hex::encode(key.key),
            directory_id: hex::encode(key.directory_id),
            heads: [hex::encode(a.0), hex::encode(b.0)],
            sources: [a.1.to_string(), b.1.to_string()],
        };
        let json = serde_json::to_string(&proof).map_err(|e| ClientError::Bug(e.to_string()))?;
        let why = format!(
            "the server signed two different key-directory heads for epoch {epoch}, one {} and one {}: it is showing \
             different people different keys and may be impersonating someone in your conversations \
             (`subrosa alerts export FILE` writes the proof)",
            a.1, b.1
        );
        self.store().write(|tx| tx.add_alert_about(THE_SERVER, &format!("{why}{FORK_BLOCKS}"), Some(&json)))?;
        Err(ClientError::DirectoryFork(why))
    }

    /// Checks the heads other members' messages carried (one per member,
    /// its newest). Findings are alerts, not errors: receiving goes on.
    pub(crate) async fn kt_check_gossip(&self) -> Result<(), ClientError> {
        for (source, bytes) in self.store().read(|tx| tx.kt_head_gossip())? {
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
        let key = self.kt_head_key().await?;
        let head = match verify_signed_head(&key, bytes) {
            Ok(h) => h,
            Err(why) => {
                // Only the member's own device put it in the message: the
                // server is not blamed.
                return self.store().write(|tx| {
                    tx.add_alert_about(
                        source,
                        &format!(
                            "{source}'s message carried a key-directory head that the server did not sign ({why}); \
                         it was ignored: {source}'s device or app misbehaves"
                        ),
                        None,
                    )
                });
            }
        };
        if let Some(held) = self.store().read(|tx| tx.kt_signed_head(head.epoch))? {
            if held == bytes {
                return Ok(());
            }
            // Held heads were verified when kept; one that no longer is
            // (never expected) is no evidence either way.
            let Ok(mine) = verify_signed_head(&key, &held) else { return Ok(()) };
            if mine.root == head.root {
                return Ok(());
            }
            return self.kt_proven_fork(
                head.epoch,
                (&held, "shown to this device"),
                (bytes, &format!("held by {source}")),
            );
        }
        if self.store().read(|tx| tx.kt_range())?.is_some_and(|(lo, _)| head.epoch < lo) {
            // Older than anything this device saw: nothing to compare.
            return Ok(());
        }
        // Ask the server for its own signed head of that epoch: a different
        // root proves a fork; the same root must extend this device's chain.
        let path = format!("/v1/kt/head?epoch={}", head.epoch);
        let answer: Result<KtHead, ClientError> = self.api.call::<(), _>(Method::GET, &path, None).await;
        let refused = |why: String| -> Result<(), ClientError> {
            let text = format!(
                "the server would not confirm the key-directory head for epoch {} that {source}'s message carried \
                 (signed by the server itself): {why}",
                head.epoch
            );
            self.store().write(|tx| tx.add_alert_about(THE_SERVER, &text, None))?;
            Err(directory_refused(text))
        };
        let answer = match answer {
            Ok(a) => a,
            Err(ClientError::Server { status, body }) if status < 500 => {
                // The server's words, kept to one line of printable text.
                let said: String = body.message.chars().filter(|c| !c.is_control()).take(200).collect();
                return refused(said);
            }
            Err(e) => return Err(e),
        };
        let Some(theirs) = answer.signed else { return refused("it sent no signed head".into()) };
        let server_head = match verify_signed_head(&key, theirs.as_slice()) {
            Ok(h) if h.epoch == head.epoch => h,
            Ok(_) => return refused("it sent a head for another epoch".into()),
            Err(why) => return refused(why),
        };
        if server_head.root != head.root {
            return self.kt_proven_fork(
                head.epoch,
                (theirs.as_slice(), "shown to this device"),
                (bytes, &format!("held by {source}")),
            );
        }
        self.kt_accept_server_head(&server_head, theirs.as_slice(), Some(source)).await
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
        let me_now = self.identity();
        let own_key = me_now.identity_public();
        if info.identity_key.as_slice() != own_key {
            self.store().write(|tx| {
                tx.add_alert_about(
                    THE_SERVER,
                    &format!(
                        "the key directory lists an identity key for {me} that is not this account's: \
                     the server may be impersonating you"
                    ),
                    None,
                )
            })?;
        }
        for d in &info.devices {
            if !self.is_certified(d, own_key, &me) {
                self.store().write(|tx| {
                    tx.add_alert_about(
                        THE_SERVER,
                        &format!(
                            "the key directory lists a device {} for {me} that none of your devices added: \
                         the server may be adding a ghost device (it is refused and gets nothing)",
                            d.device_id.to_hex()
                        ),
                        None,
                    )
                })?;
            }
        }
        Ok(())
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

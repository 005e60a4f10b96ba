//! The key directory's rules: signed heads, the one chain of roots, heads
//! gossiped by members, and proven forks. The caller does what needs the
//! network and akd's proofs (lookups, append-only audits) and hands the
//! verified result here; this module decides what it means and records it.
//!
//! - Every head this device keeps is signed by the directory's key, pinned
//!   at registration (or passed on when linking) and names its directory.
//! - A root for a new epoch is taken only when append-only proofs join it
//!   to the chain this device holds; a root for a known epoch must equal the
//!   stored one. The first root is trusted on first use, like the keys.
//! - A head a member's message carried is evidence, never a verdict: one
//!   not validly signed is the member's fault (an alert names them); one
//!   this device cannot match needs the server's own signed head for that
//!   epoch; a refusal is recorded against the server. Only two validly
//!   signed heads for one epoch with different roots prove a fork.
//! - A proven fork is an alert with its proof (both heads); it blocks every
//!   send from this device until the user clears it.

use mls_rs_core::crypto::{CipherSuite, CipherSuiteProvider, CryptoProvider, SignaturePublicKey};
use serde::{Deserialize, Serialize};
use subrosa_core::DeviceCertificate;
use subrosa_proto::kt::SignedHead;
use subrosa_proto::{DeviceRecord, Handle};

use crate::{ClientError, Crypto, Session};

/// Meta key of the pinned head-signing key (32 bytes) and directory id (16 bytes).
pub const META_KT_HEAD_KEY: &str = "kt_head_key";
/// How a fork's alert ends.
pub const FORK_BLOCKS: &str = "; sending is blocked on this device";
/// Whom an alert about the server concerns.
pub const THE_SERVER: &str = "the server";

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

/// Decodes a signed head and checks its signature under `key` (Ed25519,
/// through the crypto provider) and that it names `key`'s directory.
///
/// # Errors
/// A one-line reason when it is malformed, of another directory, or not
/// validly signed.
pub fn verify_signed_head(crypto: &Crypto, key: &HeadKey, bytes: &[u8]) -> Result<SignedHead, String> {
    let head = SignedHead::decode(bytes).map_err(|e| e.to_string())?;
    if head.directory_id != key.directory_id {
        return Err("the head names another directory".into());
    }
    // Ed25519 whatever suite the conversations use.
    let ed25519 = crypto
        .cipher_suite_provider(CipherSuite::CURVE25519_AES128)
        .ok_or_else(|| "this build cannot verify Ed25519 signatures".to_string())?;
    ed25519
        .verify(&SignaturePublicKey::new(key.key.to_vec()), &head.signature, &head.to_be_signed())
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
    pub fn verify(&self, crypto: &Crypto) -> Result<(), String> {
        let hex = |s: &str| -> Result<Vec<u8>, String> { hex::decode(s).map_err(|e| e.to_string()) };
        let key = HeadKey::from_bytes(&[hex(&self.signing_key)?, hex(&self.directory_id)?].concat())
            .map_err(|e| e.to_string())?;
        let a = verify_signed_head(crypto, &key, &hex(&self.heads[0])?)?;
        let b = verify_signed_head(crypto, &key, &hex(&self.heads[1])?)?;
        if a.epoch != self.epoch || b.epoch != self.epoch {
            return Err("the heads are not for the proof's epoch".into());
        }
        if a.root == b.root {
            return Err("the heads do not conflict".into());
        }
        Ok(())
    }
}

/// A server answer that contradicts what this device verified before.
pub fn directory_refused(why: String) -> ClientError {
    ClientError::KeyMismatch { handle: "the key directory".into(), why }
}

/// What joining a root to the chain needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainStep {
    /// On the chain already (or the first root, now stored).
    Done,
    /// Append-only proofs for epochs `start..=end` (fetched and verified by
    /// the caller, then handed to [`Session::kt_extend_chain`]).
    Audit {
        /// First epoch.
        start: u64,
        /// Last epoch.
        end: u64,
    },
}

/// What checking a member's gossiped head needs next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GossipStep {
    /// Settled (nothing wrong, or an alert was recorded).
    Done,
    /// The server's own signed head for the gossiped head's epoch, for
    /// [`Session::kt_gossip_with_server_head`].
    AskServer(SignedHead),
}

/// Whether the identity key states, in `d`'s certificate, that the device
/// can take part in post-quantum conversations (a certificate that does not
/// decode says nothing). The directory carries every certificate, so the
/// server cannot change the answer without the key directory noticing.
pub fn can_do_pq(d: &DeviceRecord) -> bool {
    DeviceCertificate::from_bytes(d.certificate.as_slice()).is_ok_and(|c| c.supports(subrosa_core::PQ_CIPHERSUITE))
}

/// Most member devices a new conversation may have and still be made in
/// the post-quantum suite. A Welcome carries the whole ratchet tree, about
/// 2.85 KB a device in that suite (0.5 KB in the classical one), and the
/// server takes at most 1 MiB a ciphertext
/// (`subrosa_proto::limits::MAX_CIPHERTEXT_BYTES`): a post-quantum group
/// stopped accepting members near 370 devices until a Welcome over 768 KiB
/// went by reference through the blob store (`subrosa_proto::welcome_ref`).
/// Larger conversations still start classical: raising this cap is a
/// decision of its own (a post-quantum Welcome for 10,000 devices is 28 MB
/// for every new device to download).
pub const PQ_MAX_DEVICES: usize = 256;

/// Whether a new conversation of `devices` member devices, every one of
/// which can do post-quantum, is made in the post-quantum suite.
pub fn pq_fits(devices: usize) -> bool {
    devices <= PQ_MAX_DEVICES
}

/// The devices of `devices` (an account's, as the directory lists them)
/// that can do post-quantum conversations yet have no package in
/// `claimed` (a post-quantum claim's devices). A non-empty answer means
/// the server withheld post-quantum key packages to push the conversation
/// to the classical suite: refused, never followed. The devices of `me`'s
/// own account are left out: one just linked has published no package yet,
/// and joins each conversation once it has (the linking device waits for
/// its package).
pub fn pq_withheld<'a>(
    devices: &'a [DeviceRecord],
    claimed: &[subrosa_proto::DeviceId],
    me: &subrosa_proto::DeviceAddress,
    handle: &Handle,
) -> Vec<&'a DeviceRecord> {
    devices.iter().filter(|d| *handle != me.handle && can_do_pq(d) && !claimed.contains(&d.device_id)).collect()
}

/// The refusal for [`pq_withheld`] devices.
pub fn pq_withheld_error(handle: &Handle, withheld: &[&DeviceRecord]) -> ClientError {
    let ids: Vec<String> = withheld.iter().map(|d| d.device_id.to_hex()).collect();
    ClientError::KeyMismatch {
        handle: handle.to_string(),
        why: format!(
            "the server withheld the post-quantum key packages of device {} (its certificate says it can do post-quantum conversations); refusing to fall back to a classical conversation",
            ids.join(", ")
        ),
    }
}

/// What the server answered when asked for its signed head of an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerHeadAnswer {
    /// Its signed head (bytes as sent).
    Signed(Vec<u8>),
    /// It answered without one.
    Unsigned,
    /// It refused (its words, already kept to one printable line).
    Refused(String),
}

impl Session {
    /// Whether the device record `d` carries a valid certificate of
    /// `handle`'s identity key `identity_key` for its own id and signature
    /// key.
    pub fn is_certified(&self, d: &DeviceRecord, identity_key: &[u8], handle: &Handle) -> bool {
        DeviceCertificate::from_bytes(d.certificate.as_slice()).is_ok_and(|c| {
            c.verify(self.engine().crypto()).is_ok()
                && c.identity_key() == identity_key
                && c.device_key() == d.signature_key.as_slice()
                && c.device_id() == d.device_id
                && c.handle() == *handle
        })
    }

    /// What the directory (as the caller verified it) lists for this very
    /// account, against what this device holds: an identity key that is
    /// not this account's, or a device none of its devices certified, is an
    /// alert against the server (it may be impersonating the user, or
    /// adding a ghost device that is refused and gets nothing).
    ///
    /// # Errors
    /// Store errors.
    pub fn kt_check_own_listing(&self, identity_key: &[u8], devices: &[DeviceRecord]) -> Result<(), ClientError> {
        let me = self.handle().clone();
        let own_key = self.identity().identity_public().to_vec();
        let mut alerts = Vec::new();
        if identity_key != own_key {
            alerts.push(format!(
                "the key directory lists an identity key for {me} that is not this account's: \
                 the server may be impersonating you"
            ));
        }
        for d in devices {
            if !self.is_certified(d, &own_key, &me) {
                alerts.push(format!(
                    "the key directory lists a device {} for {me} that none of your devices added: \
                     the server may be adding a ghost device (it is refused and gets nothing)",
                    d.device_id.to_hex()
                ));
            }
        }
        self.store().write(|tx| alerts.iter().try_for_each(|a| tx.add_alert_about(THE_SERVER, a, None)))
    }

    /// Fails when this device holds a proven directory fork not cleared.
    ///
    /// # Errors
    /// [`ClientError::DirectoryFork`]; store errors.
    pub fn kt_blocked(&self) -> Result<(), ClientError> {
        match self.store().read(|tx| tx.open_fork())? {
            Some(why) => Err(ClientError::DirectoryFork(why.trim_end_matches(FORK_BLOCKS).to_string())),
            None => Ok(()),
        }
    }

    /// The pinned head-signing key, if any.
    ///
    /// # Errors
    /// Store errors; a damaged key.
    pub fn kt_pinned_head_key(&self) -> Result<Option<HeadKey>, ClientError> {
        self.store().read(|tx| tx.meta(META_KT_HEAD_KEY))?.map(|k| HeadKey::from_bytes(&k)).transpose()
    }

    /// Pins a head-signing key; one already pinned is kept.
    ///
    /// # Errors
    /// Store errors.
    pub fn pin_head_key(&self, key: &HeadKey) -> Result<(), ClientError> {
        self.store().write(|tx| {
            if tx.meta(META_KT_HEAD_KEY)?.is_none() {
                tx.set_meta(META_KT_HEAD_KEY, &key.to_bytes())?;
            }
            Ok(())
        })
    }

    /// Verifies `bytes` as a head signed by the pinned key.
    fn verify_head(&self, key: &HeadKey, bytes: &[u8]) -> Result<SignedHead, String> {
        verify_signed_head(self.engine().crypto(), key, bytes)
    }

    fn pinned_key(&self) -> Result<HeadKey, ClientError> {
        self.kt_pinned_head_key()?.ok_or_else(|| ClientError::Bug("no pinned head-signing key".into()))
    }

    /// Where `(epoch, root)` stands against the chain of roots this device
    /// verified: on it (or the first root, stored now), or what proofs
    /// would join it.
    ///
    /// # Errors
    /// [`ClientError::KeyMismatch`] (the key directory) when a known epoch
    /// has another root; store errors.
    pub fn kt_chain_step(&self, epoch: u64, root: &[u8; 32]) -> Result<ChainStep, ClientError> {
        self.store().write(|tx| {
            let Some((lo, hi)) = tx.kt_range()? else {
                // First sight: trusted on first use, like the VRF key.
                tx.put_kt_roots(epoch, &[*root])?;
                return Ok(ChainStep::Done);
            };
            if (lo..=hi).contains(&epoch) {
                return if tx.kt_root(epoch)?.as_deref() == Some(&root[..]) {
                    Ok(ChainStep::Done)
                } else {
                    Err(chain_broken(epoch))
                };
            }
            Ok(if epoch < lo {
                ChainStep::Audit { start: epoch, end: lo }
            } else {
                ChainStep::Audit { start: hi, end: epoch }
            })
        })
    }

    /// Joins `(epoch, root)` to the chain with `roots`, the roots of epochs
    /// `start..=end` that verified append-only proofs link (as
    /// [`ChainStep::Audit`] asked): they must start or end at the chain's
    /// known end and reach `root`.
    ///
    /// # Errors
    /// [`ClientError::KeyMismatch`] (the key directory) when they do not;
    /// store errors.
    pub fn kt_extend_chain(
        &self,
        epoch: u64,
        root: &[u8; 32],
        start: u64,
        roots: &[[u8; 32]],
    ) -> Result<(), ClientError> {
        self.store().write(|tx| {
            let Some((lo, hi)) = tx.kt_range()? else {
                return Err(ClientError::Bug("extending a chain this device does not hold".into()));
            };
            let known = |e: u64| tx.kt_root(e);
            let (joins, reaches) = if epoch < lo {
                (roots.last().map(|r| &r[..]) == known(lo)?.as_deref(), roots.first() == Some(root))
            } else {
                (roots.first().map(|r| &r[..]) == known(hi)?.as_deref(), roots.last() == Some(root))
            };
            let expected = if epoch < lo { lo - epoch } else { epoch - hi } as usize + 1;
            if !joins || !reaches || roots.len() != expected {
                return Err(chain_broken(epoch));
            }
            tx.put_kt_roots(start, roots)
        })
    }

    /// Takes a head the server signed (checked by the caller against the
    /// pinned key) into this device's view. A second head for a held epoch
    /// with another root proves a fork; the same one is done; a new epoch
    /// must be joined to the chain first ([`ChainStep::Audit`]), then kept
    /// with [`Self::kt_keep_head`].
    ///
    /// # Errors
    /// [`ClientError::DirectoryFork`] for a proven fork (recorded);
    /// [`ClientError::KeyMismatch`] for a broken chain; store errors.
    pub fn kt_server_head(&self, head: &SignedHead, bytes: &[u8]) -> Result<ChainStep, ClientError> {
        if let Some(held) = self.store().read(|tx| tx.kt_signed_head(head.epoch))? {
            if held == bytes {
                return Ok(ChainStep::Done);
            }
            let key = self.pinned_key()?;
            if let Ok(h) = self.verify_head(&key, &held) {
                if h.root != head.root {
                    return Err(self.kt_proven_fork(
                        head.epoch,
                        (&held, "held by this device"),
                        (bytes, "now sent by the server"),
                    )?);
                }
            }
            return Ok(ChainStep::Done);
        }
        match self.kt_chain_step(head.epoch, &head.root)? {
            ChainStep::Done => {
                self.kt_keep_head(head.epoch, bytes)?;
                Ok(ChainStep::Done)
            }
            audit => Ok(audit),
        }
    }

    /// Keeps a signed head whose root is on the chain.
    ///
    /// # Errors
    /// Store errors.
    pub fn kt_keep_head(&self, epoch: u64, bytes: &[u8]) -> Result<(), ClientError> {
        self.store().write(|tx| tx.put_kt_signed_head(epoch, bytes))
    }

    /// A server head whose root does not extend this device's chain:
    /// recorded against the server (`for_member`: whose gossiped head made
    /// this device ask). Returns the error to fail with.
    ///
    /// # Errors
    /// Store errors.
    pub fn kt_chain_refused(
        &self,
        epoch: u64,
        why: &str,
        for_member: Option<&str>,
    ) -> Result<ClientError, ClientError> {
        let asked = for_member.map(|m| format!(" (asked because of {m}'s head)")).unwrap_or_default();
        let text = format!(
            "the server's key directory at epoch {epoch} does not extend what this device saw before{asked}: {why}"
        );
        self.store().write(|tx| tx.add_alert_about(THE_SERVER, &text, None))?;
        Ok(directory_refused(text))
    }

    /// Records a proven fork (two validly signed heads for one epoch with
    /// different roots) with its proof and an alert; sending is blocked
    /// until the user clears it. Returns the error to fail with.
    ///
    /// # Errors
    /// Store errors.
    pub fn kt_proven_fork(&self, epoch: u64, a: (&[u8], &str), b: (&[u8], &str)) -> Result<ClientError, ClientError> {
        let key = self.pinned_key()?;
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
        Ok(ClientError::DirectoryFork(why))
    }

    /// The first look at a head `source`'s message carried (see the module
    /// documentation). Findings are alerts, not errors: receiving goes on.
    ///
    /// # Errors
    /// Store errors.
    pub fn kt_gossip_step(&self, source: &str, bytes: &[u8]) -> Result<GossipStep, ClientError> {
        let key = self.pinned_key()?;
        let head = match self.verify_head(&key, bytes) {
            Ok(h) => h,
            Err(why) => {
                // Only the member's own device put it in the message: the
                // server is not blamed.
                self.store().write(|tx| {
                    tx.add_alert_about(
                        source,
                        &format!(
                            "{source}'s message carried a key-directory head that the server did not sign ({why}); \
                             it was ignored: {source}'s device or app misbehaves"
                        ),
                        None,
                    )
                })?;
                return Ok(GossipStep::Done);
            }
        };
        if let Some(held) = self.store().read(|tx| tx.kt_signed_head(head.epoch))? {
            if held == bytes {
                return Ok(GossipStep::Done);
            }
            // Held heads were verified when kept; one that no longer is
            // (never expected) is no evidence either way.
            let Ok(mine) = self.verify_head(&key, &held) else { return Ok(GossipStep::Done) };
            if mine.root != head.root {
                self.kt_proven_fork(
                    head.epoch,
                    (&held, "shown to this device"),
                    (bytes, &format!("held by {source}")),
                )?;
            }
            return Ok(GossipStep::Done);
        }
        if self.store().read(|tx| tx.kt_range())?.is_some_and(|(lo, _)| head.epoch < lo) {
            // Older than anything this device saw: nothing to compare.
            return Ok(GossipStep::Done);
        }
        Ok(GossipStep::AskServer(head))
    }

    /// What the server's answer about the gossiped `head` (carried by
    /// `source`, as `bytes`) means: a different root proves a fork; a
    /// refusal is recorded against the server; the same root gives the
    /// server's head, for the caller to take in with
    /// [`Self::kt_server_head`].
    ///
    /// # Errors
    /// [`ClientError::DirectoryFork`] and [`ClientError::KeyMismatch`]
    /// (recorded as alerts); store errors.
    pub fn kt_gossip_with_server_head(
        &self,
        source: &str,
        head: &SignedHead,
        bytes: &[u8],
        answer: ServerHeadAnswer,
    ) -> Result<(SignedHead, Vec<u8>), ClientError> {
        let refused = |why: String| -> Result<(SignedHead, Vec<u8>), ClientError> {
            let text = format!(
                "the server would not confirm the key-directory head for epoch {} that {source}'s message carried \
                 (signed by the server itself): {why}",
                head.epoch
            );
            self.store().write(|tx| tx.add_alert_about(THE_SERVER, &text, None))?;
            Err(directory_refused(text))
        };
        let theirs = match answer {
            ServerHeadAnswer::Signed(b) => b,
            ServerHeadAnswer::Unsigned => return refused("it sent no signed head".into()),
            ServerHeadAnswer::Refused(said) => return refused(said),
        };
        let key = self.pinned_key()?;
        let server_head = match self.verify_head(&key, &theirs) {
            Ok(h) if h.epoch == head.epoch => h,
            Ok(_) => return refused("it sent a head for another epoch".into()),
            Err(why) => return refused(why),
        };
        if server_head.root != head.root {
            return Err(self.kt_proven_fork(
                head.epoch,
                (&theirs, "shown to this device"),
                (bytes, &format!("held by {source}")),
            )?);
        }
        Ok((server_head, theirs))
    }
}

fn chain_broken(epoch: u64) -> ClientError {
    directory_refused(format!("the root of epoch {epoch} is not on the chain this device verified"))
}

#[cfg(test)]
mod pq_tests {
    use super::*;

    /// The one-ciphertext limit the bound is made for, and room to grow.
    #[test]
    fn large_conversations_start_classical() {
        assert!(pq_fits(2) && pq_fits(PQ_MAX_DEVICES));
        assert!(!pq_fits(PQ_MAX_DEVICES + 1));
        // Near 2.85 KB a device in a post-quantum Welcome: the bound's
        // Welcome fits one ciphertext with room for about 100 more devices.
        let per_device = 2_850;
        assert!(PQ_MAX_DEVICES * per_device + 100 * per_device < subrosa_proto::limits::MAX_CIPHERTEXT_BYTES);
    }
    use subrosa_core::DeviceIdentity;
    use subrosa_proto::{DeviceAddress, B64};

    fn record(id: &DeviceIdentity) -> DeviceRecord {
        DeviceRecord {
            device_id: id.device_id(),
            signature_key: B64(id.device_public().to_vec()),
            certificate: B64(id.certificate().to_bytes().expect("certificate")),
        }
    }

    /// A device whose certificate lists the post-quantum suite and that got
    /// no package counts as withheld; this device, and a device whose
    /// certificate does not decode, never do.
    #[test]
    fn a_capable_device_without_a_package_is_withheld() {
        let crypto = Crypto::default();
        let bob = Handle::new("bob").expect("handle");
        let (one, two) = (
            DeviceIdentity::generate(&crypto, bob.clone(), 1).expect("identity"),
            DeviceIdentity::generate(&crypto, bob.clone(), 1).expect("identity"),
        );
        let devices = vec![record(&one), record(&two)];
        assert!(devices.iter().all(can_do_pq));
        let alice = DeviceAddress { handle: Handle::new("alice").expect("handle"), device: one.device_id() };
        let all = [one.device_id(), two.device_id()];
        assert!(pq_withheld(&devices, &all, &alice, &bob).is_empty());
        let withheld = pq_withheld(&devices, &[one.device_id()], &alice, &bob);
        assert_eq!(withheld.iter().map(|d| d.device_id).collect::<Vec<_>>(), vec![two.device_id()]);
        assert!(pq_withheld_error(&bob, &withheld).to_string().contains("withheld the post-quantum key packages"));
        // Bob's own device asking about bob's devices: his own account is
        // left out (a device just linked has no package yet).
        let me = DeviceAddress { handle: bob.clone(), device: two.device_id() };
        assert!(pq_withheld(&devices, &[one.device_id()], &me, &bob).is_empty());
        // A certificate that says nothing decodable claims nothing.
        let mut junk = record(&one);
        junk.certificate = B64(vec![1, 2, 3]);
        assert!(!can_do_pq(&junk));
        assert!(pq_withheld(&[junk], &[], &alice, &bob).is_empty());
    }
}

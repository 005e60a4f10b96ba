//! Key transparency: what the server's auditable key directory publishes.
//!
//! The directory (Meta's `akd`) maps each handle (the label) to a digest of
//! the account's public keys (the value, [`directory_value`]). Every change
//! to an account's keys is published in a new epoch whose root hash commits
//! to the whole directory; a lookup proof shows what a handle maps to at an
//! epoch, and an append-only proof shows that one epoch's directory only
//! grew into the next. The proofs are akd's protobuf encodings, opaque here.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /v1/kt/head[?epoch=N]` | [`KtHead`] (the latest, or epoch N) |
//! | `GET /v1/kt/lookup/{handle}` | [`KtLookup`] |
//! | `GET /v1/kt/audit?from=A&to=B` | [`KtAudit`] |
//!
//! All three are signed like every other request, except that `audit` and
//! `head` may also be called unsigned, so that anyone can audit.
//! [`crate::AccountInfo`] and [`crate::ClaimResponse`] carry a [`KtLookup`]
//! for the handle they describe.
//!
//! Every head the server hands out is signed ([`SignedHead`]) with the
//! directory's Ed25519 head-signing key, which clients pin on first use, as
//! a Certificate Transparency log signs its tree heads: a member's copy of a
//! head is then evidence that can be checked, and two signed heads with one
//! epoch and different roots prove that the server showed two directories.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{DeviceRecord, B64};

/// akd's domain-separation label for Subrosa's directory. Server and
/// clients use `akd::ExperimentalConfiguration<L>` (akd 0.13, feature
/// `experimental`) with an `L: akd::DomainLabel` returning these bytes.
pub const AKD_DOMAIN_LABEL: &[u8] = b"subrosa key directory v1";

/// The most epochs one `audit` request may span.
pub const MAX_AUDIT_EPOCHS: u64 = 64;

/// The directory's current epoch, its root hash and its VRF public key
/// (a client pins the VRF key the first time it sees it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KtHead {
    /// The latest published epoch (0 before the first publish).
    pub epoch: u64,
    /// The root hash of that epoch (32 bytes).
    pub root_hash: B64,
    /// The VRF public key that hides labels in the tree.
    pub vrf_public_key: B64,
    /// The head-signing public key (Ed25519, 32 bytes), pinned by clients
    /// at registration. Absent only from servers older than signed heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<B64>,
    /// This head as [`SignedHead::encode`] writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<B64>,
}

/// A lookup proof for one handle at one epoch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KtLookup {
    /// The epoch the proof is for.
    pub epoch: u64,
    /// That epoch's root hash (32 bytes).
    pub root_hash: B64,
    /// akd's `LookupProof`, protobuf-encoded.
    pub proof: B64,
    /// The signed head of `epoch` ([`SignedHead::encode`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_head: Option<B64>,
}

/// Append-only proofs from epoch `from` to epoch `to`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KtAudit {
    /// The first epoch (at least 1).
    pub from: u64,
    /// The last epoch, at most [`MAX_AUDIT_EPOCHS`] after `from`.
    pub to: u64,
    /// The root hashes of epochs `from..=to`, in order.
    pub root_hashes: Vec<B64>,
    /// `proofs[i]` shows that epoch `from + i` grew into `from + i + 1`:
    /// akd's `SingleAppendOnlyProof`, protobuf-encoded. One fewer than
    /// `root_hashes`.
    pub proofs: Vec<B64>,
}

/// Domain separation of a head signature: the signature is over this label
/// followed by [`SignedHead::to_be_signed`].
pub const HEAD_SIGNATURE_LABEL: &[u8] = b"subrosa signed directory head v1\n";
/// The version byte of [`SignedHead`]'s encoding.
pub const SIGNED_HEAD_VERSION: u8 = 1;
/// Bytes of an encoded [`SignedHead`].
pub const SIGNED_HEAD_LEN: usize = TBS_LEN + 64;
const TBS_LEN: usize = 1 + 16 + 8 + 32 + 32 + 8;

/// A directory head as the server signed it: which directory, which epoch,
/// its root, the VRF key of the tree, and when it was signed.
///
/// Encoding (version 1, 161 bytes, big-endian integers):
/// `0x01 || directory_id[16] || epoch u64 || root[32] || vrf_public_key[32]
/// || signed_at_ms u64 || signature[64]`, the signature being Ed25519 over
/// [`HEAD_SIGNATURE_LABEL`] followed by everything before it. The decoder
/// accepts exactly this length and version; it does not check the signature
/// (the holder of the pinned key does).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SignedHead {
    /// Random id of the directory, made with its signing key.
    pub directory_id: [u8; 16],
    /// The epoch.
    pub epoch: u64,
    /// The root hash of that epoch.
    pub root: [u8; 32],
    /// The directory's VRF public key.
    pub vrf_public_key: [u8; 32],
    /// When the server signed it, ms since the Unix epoch.
    pub signed_at_ms: u64,
    /// Ed25519 signature.
    pub signature: [u8; 64],
}

impl std::fmt::Debug for SignedHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedHead")
            .field("directory_id", &hex::encode(self.directory_id))
            .field("epoch", &self.epoch)
            .field("root", &hex::encode(self.root))
            .finish_non_exhaustive()
    }
}

/// Why bytes are not a [`SignedHead`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed signed directory head")]
pub struct SignedHeadError;

impl SignedHead {
    /// The bytes the signature covers, after [`HEAD_SIGNATURE_LABEL`].
    pub fn to_be_signed(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD_SIGNATURE_LABEL.len() + TBS_LEN);
        out.extend_from_slice(HEAD_SIGNATURE_LABEL);
        out.push(SIGNED_HEAD_VERSION);
        out.extend_from_slice(&self.directory_id);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.root);
        out.extend_from_slice(&self.vrf_public_key);
        out.extend_from_slice(&self.signed_at_ms.to_be_bytes());
        out
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.to_be_signed().split_off(HEAD_SIGNATURE_LABEL.len());
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes untrusted bytes (the signature is not checked here).
    ///
    /// # Errors
    /// [`SignedHeadError`] for any other length or version.
    pub fn decode(bytes: &[u8]) -> Result<Self, SignedHeadError> {
        if bytes.len() != SIGNED_HEAD_LEN || bytes[0] != SIGNED_HEAD_VERSION {
            return Err(SignedHeadError);
        }
        let mut at = 1;
        let mut take = |n: usize| {
            let s = &bytes[at..at + n];
            at += n;
            s
        };
        let arr16 = |s: &[u8]| <[u8; 16]>::try_from(s).map_err(|_| SignedHeadError);
        let arr32 = |s: &[u8]| <[u8; 32]>::try_from(s).map_err(|_| SignedHeadError);
        let u64_be = |s: &[u8]| <[u8; 8]>::try_from(s).map(u64::from_be_bytes).map_err(|_| SignedHeadError);
        Ok(SignedHead {
            directory_id: arr16(take(16))?,
            epoch: u64_be(take(8))?,
            root: arr32(take(32))?,
            vrf_public_key: arr32(take(32))?,
            signed_at_ms: u64_be(take(8))?,
            signature: <[u8; 64]>::try_from(take(64)).map_err(|_| SignedHeadError)?,
        })
    }
}

/// The directory value for an account: SHA-256 over a domain separator, the
/// identity key and every device record, sorted by device id, each field
/// length-prefixed. Adding, removing or changing a device, or the identity
/// key, changes it; both the server (when it publishes) and the clients
/// (when they check a lookup) compute it.
pub fn directory_value(identity_key: &[u8], devices: &[DeviceRecord]) -> [u8; 32] {
    let mut sorted: Vec<&DeviceRecord> = devices.iter().collect();
    sorted.sort_by_key(|d| d.device_id);
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(b"subrosa directory value v1");
    field(identity_key);
    for d in sorted {
        field(d.device_id.as_bytes());
        field(d.signature_key.as_slice());
        field(d.certificate.as_slice());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeviceId;

    fn device(id: u8, key: u8) -> DeviceRecord {
        DeviceRecord {
            device_id: DeviceId([id; 8]),
            signature_key: B64(vec![key; 32]),
            certificate: B64(vec![key ^ 1; 70]),
        }
    }

    #[test]
    fn signed_head_bytes_are_stable() {
        let head = SignedHead {
            directory_id: [1; 16],
            epoch: 0x0102_0304_0506_0708,
            root: [2; 32],
            vrf_public_key: [3; 32],
            signed_at_ms: 1_700_000_000_000,
            signature: [4; 64],
        };
        let bytes = head.encode();
        assert_eq!(bytes.len(), SIGNED_HEAD_LEN);
        // A change of this encoding is a visible decision: clients pin and
        // gossip these bytes, and `alerts export` writes them.
        let expected = concat!(
            "01",
            "01010101010101010101010101010101",
            "0102030405060708",
            "0202020202020202020202020202020202020202020202020202020202020202",
            "0303030303030303030303030303030303030303030303030303030303030303",
            "0000018bcfe56800",
            "04040404040404040404040404040404040404040404040404040404040404040404040404040404040404040404040404040404040404040404040404040404",
        );
        assert_eq!(hex::encode(&bytes), expected);
        let tbs = head.to_be_signed();
        assert!(tbs.starts_with(b"subrosa signed directory head v1\n"));
        assert_eq!(&tbs[HEAD_SIGNATURE_LABEL.len()..], &bytes[..TBS_LEN]);
        assert_eq!(SignedHead::decode(&bytes), Ok(head));
        for n in 0..bytes.len() {
            assert!(SignedHead::decode(&bytes[..n]).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(SignedHead::decode(&longer).is_err());
        let mut v2 = bytes;
        v2[0] = 2;
        assert!(SignedHead::decode(&v2).is_err());
    }

    #[test]
    fn value_ignores_order_but_not_content() {
        let (a, b) = (device(1, 10), device(2, 20));
        let v = directory_value(b"ik", &[a.clone(), b.clone()]);
        assert_eq!(v, directory_value(b"ik", &[b.clone(), a.clone()]));
        assert_ne!(v, directory_value(b"ik", std::slice::from_ref(&a)));
        assert_ne!(v, directory_value(b"other", &[a.clone(), b.clone()]));
        assert_ne!(v, directory_value(b"ik", &[a, device(2, 21)]));
    }
}
